//! `host app …`: the image store (import, list, verify, remove, prune) and,
//! through [`containers`], the container commands. Argument parsing only;
//! the work is done by `cairn_oci::store` and `cairn_runtime`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use cairn_oci::image::{ImportLimits, ImportOptions};
use cairn_oci::registry::{ClientOptions, Platform, PullOptions, Reference};
use cairn_oci::store::Store;
use clap::{Args, Subcommand};

use crate::containers::{self, parse_size, AppGlobals, ContainerSub};

/// Immutable application containers: import OCI images, run, supervise.
#[derive(Debug, Args)]
pub struct AppCommand {
    #[command(flatten)]
    globals: AppGlobals,

    #[command(subcommand)]
    command: AppSub,
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum AppSub {
    /// Import an OCI image layout directory, an oci-archive tar or a docker save tar.
    Import {
        /// The image directory or archive; PATH:TAG picks a tag of an OCI
        /// layout (or docker save archive) that holds several.
        path: PathBuf,
        /// Name it NAME[:TAG] (default: the name recorded in the image).
        #[arg(long)]
        name: Option<String>,
        /// The tag to import from a layout holding several (as PATH:TAG).
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Pull an image from a registry (the OCI distribution API) into the
    /// store, every blob checked against its digest as it streams.
    Pull {
        /// REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]; the registry is
        /// always named (no search list).
        reference: String,
        /// Store it as NAME[:TAG] [default: the repository's last component
        /// and the reference's tag].
        #[arg(long)]
        name: Option<String>,
        /// The image to take from a multi-platform index [default: this
        /// machine's, linux/amd64 on x86_64].
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        /// Credentials, a containers-auth.json file [default: podman's:
        /// $REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json,
        /// ~/.config/containers/auth.json, ~/.docker/config.json].
        #[arg(long, value_name = "FILE")]
        authfile: Option<PathBuf>,
        /// false: allow plain HTTP and unchecked certificates; true: verified
        /// HTTPS only [default: false for registries registries.conf marks
        /// insecure, else true].
        #[arg(long, value_name = "BOOL", require_equals = true, num_args = 0..=1, default_missing_value = "true")]
        tls_verify: Option<bool>,
        /// Further attempts after a network error, 429 or 5xx (waiting 1 s,
        /// 2 s, 4 s…); a dropped download resumes where it broke.
        #[arg(long, value_name = "N", default_value_t = 3)]
        retry: u32,
        /// Blobs downloaded at once.
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
        parallel: u32,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List imported images.
    Images {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (refused while a container uses it).
    Rmi {
        /// NAME[:TAG] or NAME@sha256:…
        image: String,
    },
    /// Remove what no image tag and no container uses: checkouts and
    /// objects of images a re-import replaced (a baked app's after every
    /// host upgrade or rollback).
    Prune,
    /// Check every object of an image against its checksum.
    Verify {
        /// NAME[:TAG] or NAME@sha256:…
        image: String,
    },
    #[command(flatten)]
    Container(ContainerSub),
}

/// The bounds an import (or a pull's import) checks while it reads.
#[derive(Debug, Args)]
struct LimitArgs {
    /// Refuse images whose layers uncompress to more than this (bytes, or
    /// with a K, M, G or T suffix: powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = parse_size)]
    max_image_size: u64,
    /// Refuse a layer that uncompresses to more than N times its size.
    #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_ratio)]
    max_ratio: u64,
    /// Refuse images with more layers than this.
    #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_layers)]
    max_layers: usize,
    /// Refuse images with more files (tar entries, all layers) than this.
    #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_entries)]
    max_entries: u64,
    /// Uncompressed bytes of a layer before its ratio is checked.
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = parse_size)]
    ratio_grace: u64,
    /// Refuse entry paths and link targets longer than this (bytes).
    #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_path_len)]
    max_path_len: usize,
    /// Refuse entry paths with more components than this.
    #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_path_depth)]
    max_path_depth: usize,
    /// Refuse an index, manifest, config or manifest.json larger than this.
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_size)]
    max_metadata_size: u64,
    /// Refuse a pax header or GNU long name in a tar larger than this.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    max_tar_header_size: u64,
    /// Refuse an oci-archive or docker save tar with more entries than this.
    #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_archive_entries)]
    max_archive_entries: usize,
}

impl LimitArgs {
    fn limits(&self) -> ImportLimits {
        ImportLimits {
            max_image_size: self.max_image_size,
            max_ratio: self.max_ratio,
            ratio_grace: self.ratio_grace,
            max_entries: self.max_entries,
            max_path_len: self.max_path_len,
            max_path_depth: self.max_path_depth,
            max_metadata_size: self.max_metadata_size,
            max_layers: self.max_layers,
            max_tar_header_size: self.max_tar_header_size,
            max_archive_entries: self.max_archive_entries,
        }
    }
}

pub fn run(cmd: AppCommand) -> Result<ExitCode> {
    let rt = containers::runtime(&cmd.globals)?;
    let store = Store::new(&cmd.globals.root).with_baked_apps(&cmd.globals.baked_apps);
    let mut out = std::io::stdout().lock();
    match cmd.command {
        AppSub::Import {
            path,
            name,
            tag,
            limits,
        } => {
            let opts = ImportOptions {
                name,
                tag,
                limits: limits.limits(),
            };
            let info = store.import_with(&path, &opts)?;
            writeln!(
                out,
                "imported {} {}",
                info.reference(),
                info.manifest_digest
            )?;
            writeln!(out, "commit {}", info.commit)?;
        }
        AppSub::Pull {
            reference,
            name,
            platform,
            authfile,
            tls_verify,
            retry,
            parallel,
            limits,
        } => {
            let reference = Reference::parse(&reference)?;
            let opts = PullOptions {
                platform: match platform {
                    Some(p) => Platform::parse(&p)?,
                    None => Platform::host(),
                },
                parallel: parallel as usize,
                limits: limits.limits(),
            };
            let mut client = ClientOptions {
                tls_verify,
                retries: retry,
                ..ClientOptions::default()
            };
            if let Some(f) = authfile {
                client.auth_files = vec![f];
                client.auth_files_explicit = true;
            }
            let started = std::time::Instant::now();
            let progress = crate::pull_progress::PullBars::new();
            let pulled = store.pull(&reference, name.as_deref(), &client, &opts, &progress)?;
            progress.finish();
            let img = &pulled.image;
            if pulled.up_to_date {
                writeln!(
                    out,
                    "{} is up to date: {} {}",
                    reference,
                    img.reference(),
                    img.manifest_digest
                )?;
            } else {
                writeln!(
                    out,
                    "pulled {reference} as {} {} ({} bytes in {:.1} s)",
                    img.reference(),
                    img.manifest_digest,
                    pulled.fetched,
                    started.elapsed().as_secs_f64()
                )?;
            }
            writeln!(out, "digest {}", pulled.resolved_digest)?;
            writeln!(out, "commit {}", img.commit)?;
        }
        AppSub::Images { json } => {
            // Baked apps first: they are part of the host tree, not the store.
            let mut images = store.baked();
            images.extend(store.images()?);
            if json {
                serde_json::to_writer_pretty(&mut out, &images)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{:<30} {:<20} {:<12} COMMIT", "NAME", "TAG", "DIGEST")?;
                for i in images {
                    let d = i.manifest_digest.trim_start_matches("sha256:");
                    writeln!(
                        out,
                        "{:<30} {:<20} {:<12} {}",
                        i.name,
                        i.tag,
                        &d[..12.min(d.len())],
                        if i.commit.is_empty() {
                            "(host tree)"
                        } else {
                            &i.commit[..12.min(i.commit.len())]
                        }
                    )?;
                }
            }
        }
        AppSub::Rmi { image } => {
            let info = store.rmi(&image, &rt.images_in_use()?)?;
            writeln!(out, "removed {} {}", info.reference(), info.manifest_digest)?;
            if store.uses_host_repo() {
                let freed = host_repo_cleanup()?;
                writeln!(out, "the host repository's cleanup freed {freed} bytes")?;
            }
        }
        AppSub::Prune => {
            let p = store.prune(&rt.images_in_use()?)?;
            for c in &p.checkouts {
                writeln!(out, "removed checkout {c}")?;
            }
            if p.objects_left_to_host {
                let freed = host_repo_cleanup()?;
                writeln!(
                    out,
                    "pruned {} checkouts; the host repository's cleanup freed {freed} bytes",
                    p.checkouts.len()
                )?;
            } else {
                writeln!(
                    out,
                    "pruned {} checkouts, {} objects, {} bytes",
                    p.checkouts.len(),
                    p.objects,
                    p.bytes
                )?;
            }
        }
        AppSub::Verify { image } => {
            let (info, n) = store.verify(&image)?;
            writeln!(
                out,
                "ok {} {}: {n} objects verified",
                info.reference(),
                info.manifest_digest
            )?;
        }
        AppSub::Container(c) => {
            drop(out);
            // The runtime reads only checkouts: make `run`'s first.
            let image = match &c {
                ContainerSub::Run(a) => Some(store.checkout(&a.image)?),
                _ => None,
            };
            return containers::run(&rt, c, image, None);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// On a node, images are objects of the host's repository: only the host's
/// cleanup (`host cleanup` without options), which also knows the
/// deployments, deletes what no ref reaches. Returns the bytes it freed.
fn host_repo_cleanup() -> Result<u64> {
    let report = cairn_updater::cleanup(
        &cairn_updater::SysrootTarget::from_option(None),
        &cairn_updater::CleanupOptions {
            pending: false,
            rollback: false,
        },
        &mut crate::node::show_step(true),
    )?;
    Ok(report.freed_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_import_limit_defaults() {
        // The flags' defaults are the library's.
        let d = ImportLimits::default();
        assert_eq!(parse_size("16G"), Ok(d.max_image_size));
        assert_eq!(parse_size("8M"), Ok(d.ratio_grace));
        assert_eq!(parse_size("4M"), Ok(d.max_metadata_size));
        assert_eq!(parse_size("1M"), Ok(d.max_tar_header_size));
    }
}
