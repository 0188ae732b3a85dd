//! Bootable disk images of a composed commit.
//!
//! The disk boots on BIOS machines with GRUB: GPT with a 1 MiB BIOS boot
//! partition holding GRUB's core.img (built with `grub-mkimage`; it finds
//! /boot by its label), GRUB's boot.img in the MBR, a 512 MiB ext4 /boot and
//! the root partition. `/boot/grub/grub.cfg` is a symlink into the `loader`
//! directory that libostree's grub2 backend rewrites on every deployment
//! change (through our generator, `host` as `grub2-generate`), so upgrades
//! and rollbacks switch what boots with no code of ours in the boot path
//! beyond the boot counter at the top of that menu (see [`grub`]).
//!
//! The image is written to a temporary file next to the output and renamed
//! into place only when everything succeeded; loop devices and mounts are
//! held by guards that release them on every path.

pub mod deploy;
pub mod disk;
pub use cairn_contracts::grub;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::progress::Progress;

pub use deploy::SourceCommit;

/// Size of the /boot partition. Each deployment with a distinct kernel keeps
/// a kernel and initramfs there (about 60 MB for Debian's), and libostree
/// needs room for a new one before it drops an old one.
pub const BOOT_MIB: u64 = 512;
/// File system label of /boot; the tree's /etc/fstab mounts `LABEL=boot`.
pub const BOOT_LABEL: &str = "boot";
/// File system label of the root partition; the kernel finds `root=LABEL=root`.
pub const ROOT_LABEL: &str = "root";

/// Output format of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// A sparse raw disk image.
    Raw,
    /// QEMU's copy-on-write format (converted with `qemu-img convert`).
    #[default]
    Qcow2,
}

impl std::str::FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(format!("unknown image format {other:?}: use raw or qcow2")),
        }
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// OSTree repository holding the commit.
    pub repo: PathBuf,
    /// Ref (branch) to deploy; the deployment's origin becomes `cairn:<ref>`.
    pub ref_: String,
    /// Deploy this commit (a checksum in `repo`) instead of the ref's head;
    /// the origin still follows the ref.
    pub commit: Option<String>,
    pub format: ImageFormat,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// URL of the `cairn` remote on the node; default: file:// of `repo`.
    pub remote_url: Option<String>,
    /// Kernel arguments after the tree's own.
    pub extra_kargs: Vec<String>,
    /// What the node checks before it installs an update.
    pub trust: Trust,
    /// A node config to embed (checked by the caller), read by first-boot
    /// provisioning when no other source has one.
    pub node_config: Option<Vec<u8>>,
    /// Output file.
    pub output: PathBuf,
    /// No progress output.
    pub quiet: bool,
}

/// What a node verifies before it installs an update from its remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Commits and summaries signed by one of these armored public keys
    /// (files): the remote gets `gpg-verify=true` and `gpg-verify-summary=true`
    /// with the keys imported, and the deployed commit must verify too.
    Keys(Vec<PathBuf>),
    /// Nothing: whoever answers the node's HTTP requests can install a root
    /// file system on it. For lab images only (`--insecure-no-verify`).
    InsecureNoVerify,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ImageReport {
    pub output: PathBuf,
    pub commit: String,
    pub version: Option<String>,
    pub kargs: Vec<String>,
    pub remote_url: String,
    /// Bytes the output file occupies on disk (it is sparse or qcow2).
    pub allocated_bytes: u64,
    pub elapsed: Duration,
}

/// Smallest disk that holds /boot, the GPT and a root file system worth having.
const MIN_SIZE: u64 = (BOOT_MIB + disk::BIOS_BOOT_MIB + 1024) << 20;

/// Write a bootable disk image of `opts.ref_`.
/// The command line's strings that end up in the image's boot entries and
/// ostree remote config: one word each, so none can add a line or a key.
fn check_inputs(opts: &ImageOptions) -> Result<()> {
    crate::manifest::check_ref(&opts.ref_).map_err(|m| anyhow::anyhow!("--ref: {m}"))?;
    let word =
        |s: &str| !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c.is_control());
    for k in &opts.extra_kargs {
        if !word(k) {
            bail!("--karg {k:?}: one kernel argument per --karg, without spaces or control characters");
        }
    }
    if let Some(url) = &opts.remote_url {
        if !word(url) {
            bail!("--remote-url {url:?}: a URL has no spaces or control characters");
        }
    }
    if opts.trust == Trust::Keys(Vec::new()) {
        bail!("no trusted key given: a node must know whose updates to install");
    }
    Ok(())
}

/// The trusted keys, read and parsed before anything is written.
fn load_trust(trust: &Trust) -> Result<Option<Vec<crate::keys::PublicKey>>> {
    match trust {
        Trust::InsecureNoVerify => Ok(None),
        Trust::Keys(paths) => paths
            .iter()
            .map(|p| crate::keys::PublicKey::load(p).context("--trust"))
            .collect::<Result<Vec<_>>>()
            .map(Some),
    }
}

pub fn write_image(opts: &ImageOptions) -> Result<ImageReport> {
    let started = Instant::now();
    let progress = Progress::new(opts.quiet);
    check_inputs(opts)?;
    let trusted = load_trust(&opts.trust)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("writing a disk image needs root (loop devices, mounts); run it again as root");
    }
    if opts.size < MIN_SIZE {
        bail!(
            "disk size {} MiB is too small: /boot alone takes {BOOT_MIB} MiB; use at least {} MiB",
            opts.size >> 20,
            MIN_SIZE >> 20
        );
    }
    let repo = std::path::absolute(&opts.repo)
        .with_context(|| format!("resolving {}", opts.repo.display()))?;
    let output = std::path::absolute(&opts.output)
        .with_context(|| format!("resolving {}", opts.output.display()))?;
    let out_dir = output
        .parent()
        .context("the output path has no parent directory")?
        .to_owned();
    let out_name = output
        .file_name()
        .context("the output path has no file name")?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;

    let source = deploy::read_source(&repo, &opts.ref_, opts.commit.as_deref())?;
    let remote_url = opts
        .remote_url
        .clone()
        .unwrap_or_else(|| format!("file://{}", repo.display()));
    let kargs = deploy::kernel_args(&source.kargs, &opts.extra_kargs, ROOT_LABEL);
    progress.note(&format!(
        "image of {} ({}) -> {}",
        opts.ref_,
        source.checksum,
        output.display()
    ));

    // Both temporary files live next to the output (same file system, so the
    // final rename is atomic) and are deleted on drop unless persisted.
    let raw = tempfile::Builder::new()
        .prefix(&format!(".{out_name}."))
        .suffix(".raw.tmp")
        .tempfile_in(&out_dir)
        .with_context(|| format!("creating a temporary file in {}", out_dir.display()))?;
    raw.as_file()
        .set_len(opts.size)
        .with_context(|| format!("sizing {} to {} bytes", raw.path().display(), opts.size))?;

    let step = progress.step("partition");
    let layout = disk::partition(raw.path(), BOOT_MIB)?;
    step.finish("");

    let step = progress.step("GRUB");
    let scratch = tempfile::tempdir().context("creating a scratch directory for core.img")?;
    let core = scratch.path().join("core.img");
    disk::grub_mkimage(&core, BOOT_LABEL)?;
    disk::install_grub_bios(raw.path(), layout.bios, &core)?;
    drop(scratch);
    step.finish("");

    fill(
        raw.path(),
        &layout,
        &repo,
        &source,
        opts,
        &remote_url,
        &kargs,
        trusted.as_deref(),
        &progress,
    )?;

    let written = match opts.format {
        ImageFormat::Raw => raw,
        ImageFormat::Qcow2 => {
            let step = progress.step("qemu-img convert");
            let qcow = tempfile::Builder::new()
                .prefix(&format!(".{out_name}."))
                .suffix(".qcow2.tmp")
                .tempfile_in(&out_dir)
                .with_context(|| format!("creating a temporary file in {}", out_dir.display()))?;
            let out = Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(raw.path())
                .arg(qcow.path())
                .output()
                .context("running qemu-img (Debian package qemu-utils)")?;
            if !out.status.success() {
                bail!(
                    "qemu-img convert to {}: {}",
                    qcow.path().display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            drop(raw);
            step.finish("");
            qcow
        }
    };
    let file = written
        .persist(&output)
        .with_context(|| format!("renaming the finished image to {}", output.display()))?;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Temporary files are private (0600); a finished image is an ordinary file.
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", output.display()))?;
    let allocated_bytes = file
        .metadata()
        .map(|m| m.blocks() * 512)
        .with_context(|| format!("reading {}", output.display()))?;
    Ok(ImageReport {
        output,
        commit: source.checksum.clone(),
        version: source.version.clone(),
        kargs,
        remote_url,
        allocated_bytes,
        elapsed: started.elapsed(),
    })
}

/// File systems, OSTree deployment and bootloader, with every loop device and
/// mount released before returning, on success and on error alike.
#[allow(clippy::too_many_arguments)]
fn fill(
    image: &Path,
    layout: &disk::Layout,
    repo: &Path,
    source: &SourceCommit,
    opts: &ImageOptions,
    remote_url: &str,
    kargs: &[String],
    trusted: Option<&[crate::keys::PublicKey]>,
    progress: &Progress,
) -> Result<()> {
    // Guards drop in reverse order of declaration: mounts, then loop devices,
    // then the mount point directory.
    let dirs = disk::MountDir::new()?;
    let step = progress.step("file systems");
    let boot_dev = disk::LoopDevice::attach(image, layout.boot)?;
    let root_dev = disk::LoopDevice::attach(image, layout.root)?;
    disk::mkfs_ext4(boot_dev.path(), BOOT_LABEL)?;
    disk::mkfs_ext4(root_dev.path(), ROOT_LABEL)?;
    let root_mnt = disk::Mount::ext4(root_dev.path(), &dirs.path().join("root"))?;
    let boot_mnt = disk::Mount::ext4(boot_dev.path(), &root_mnt.target().join("boot"))?;
    deploy::prepare_boot_for_grub(boot_mnt.target())?;
    disk::copy_grub_modules(&boot_mnt.target().join("grub"))?;
    step.finish("");

    let step = progress.step("deploy");
    deploy::deploy(
        root_mnt.target(),
        repo,
        source,
        &opts.ref_,
        remote_url,
        kargs,
        trusted,
    )?;
    if let Some(config) = &opts.node_config {
        deploy::embed_node_config(root_mnt.target(), config)?;
    }
    step.finish("");

    let step = progress.step("unmount");
    nix::unistd::sync();
    boot_mnt.unmount()?;
    root_mnt.unmount()?;
    boot_dev.detach()?;
    root_dev.detach()?;
    drop(dirs);
    step.finish("");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!("raw".parse(), Ok(ImageFormat::Raw));
        assert_eq!("qcow2".parse(), Ok(ImageFormat::Qcow2));
        assert!("vmdk".parse::<ImageFormat>().is_err());
    }

    /// Options writing `dir/disk.img` of `size` bytes from `dir/repo`.
    fn options_in(dir: &Path, size: u64) -> ImageOptions {
        ImageOptions {
            repo: dir.join("repo"),
            ref_: "x".into(),
            commit: None,
            format: ImageFormat::Raw,
            size,
            remote_url: None,
            trust: Trust::InsecureNoVerify,
            node_config: None,
            extra_kargs: vec![],
            output: dir.join("disk.img"),
            quiet: true,
        }
    }

    #[test]
    fn refuses_tiny_disks_before_touching_anything() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options_in(dir.path(), 100 << 20);
        let err = write_image(&opts).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("too small") || msg.contains("needs root"),
            "{msg}"
        );
        assert!(!opts.output.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn command_line_strings_cannot_add_lines_to_boot_entries_or_config() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options_in(dir.path(), 8 << 30);
        let cases = [
            ImageOptions {
                extra_kargs: vec!["quiet\nlinux /evil".into()],
                ..opts.clone()
            },
            ImageOptions {
                extra_kargs: vec!["a b".into()],
                ..opts.clone()
            },
            ImageOptions {
                remote_url: Some("http://x\n[remote \"evil\"]".into()),
                ..opts.clone()
            },
            ImageOptions {
                ref_: "a b".into(),
                ..opts.clone()
            },
        ];
        for bad in cases {
            let msg = format!("{:#}", write_image(&bad).unwrap_err());
            assert!(
                msg.contains("--karg") || msg.contains("--remote-url") || msg.contains("--ref"),
                "{msg}"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
