//! The OSTree side of a disk image, all through libostree's sysroot API:
//! initialise the sysroot on the mounted root partition, make the stateroot,
//! pull the commit from the source repository, point the remote at where
//! updates will come from, deploy and write the deployment (libostree writes
//! the BLS boot entry), then the first GRUB menu from that entry.

use std::path::Path;

use anyhow::{bail, Context, Result};
use gio::prelude::*;

use cairn_contracts::names::{REMOTE, STATEROOT as OSNAME};

/// What the image's source commit says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceCommit {
    pub checksum: String,
    /// `cairn.kargs` from the commit metadata, else `/usr/lib/cairn/kargs` in the tree.
    pub kargs: Vec<String>,
    /// `version` metadata, if any.
    pub version: Option<String>,
}

fn no_cancel() -> Option<&'static gio::Cancellable> {
    None
}

/// Resolve `ref_` (or take `commit`, a checksum, when given) in the source
/// repository and read the kernel arguments the tree asks for.
pub fn read_source(repo_path: &Path, ref_: &str, commit: Option<&str>) -> Result<SourceCommit> {
    let repo = ostree::Repo::new_for_path(repo_path);
    repo.open(no_cancel())
        .with_context(|| format!("opening OSTree repository {}", repo_path.display()))?;
    let wanted = commit.unwrap_or(ref_);
    if commit.is_some_and(|c| c.len() != 64 || !c.bytes().all(|b| b.is_ascii_hexdigit())) {
        bail!("--commit {wanted}: expected a full 64-digit commit checksum");
    }
    let checksum = repo
        .resolve_rev(wanted, false)
        .with_context(|| {
            format!(
                "resolving {wanted} in {} (list refs with `ostree refs --repo {}`)",
                repo_path.display(),
                repo_path.display()
            )
        })?
        .with_context(|| format!("ref {ref_} not found in {}", repo_path.display()))?
        .to_string();
    let (commit, _) = repo
        .load_commit(&checksum)
        .with_context(|| format!("loading commit {checksum} from {}", repo_path.display()))?;
    let meta = glib::VariantDict::new(Some(&commit.child_value(0)));
    let version = meta.lookup::<String>("version").ok().flatten();
    let kargs = match meta.lookup::<Vec<String>>(cairn_contracts::metadata::KARGS) {
        Ok(Some(kargs)) => kargs,
        Ok(None) => kargs_from_tree(&repo, &checksum)?,
        Err(err) => {
            bail!("commit {checksum}: metadata cairn.kargs is not an array of strings: {err}")
        }
    };
    Ok(SourceCommit {
        checksum,
        kargs,
        version,
    })
}

/// `/usr/lib/cairn/kargs` (one argument per line) of a commit, if it exists.
fn kargs_from_tree(repo: &ostree::Repo, checksum: &str) -> Result<Vec<String>> {
    let (root, _) = repo
        .read_commit(checksum, no_cancel())
        .with_context(|| format!("reading the tree of commit {checksum}"))?;
    let file = root.resolve_relative_path("usr/lib/cairn/kargs");
    match file.load_contents(no_cancel()) {
        Ok((bytes, _)) => Ok(parse_kargs_file(&String::from_utf8_lossy(&bytes))),
        Err(err) if err.matches(gio::IOErrorEnum::NotFound) => {
            tracing::warn!("commit {checksum} names no kernel arguments (no cairn.kargs metadata, no /usr/lib/cairn/kargs)");
            Ok(Vec::new())
        }
        Err(err) => Err(err).context("reading /usr/lib/cairn/kargs from the tree"),
    }
}

/// One argument per line; blank lines and `#` comments ignored.
pub fn parse_kargs_file(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The full kernel command line of the first deployment: the tree's, then the
/// caller's, then the root file system (libostree adds `ostree=` itself).
pub fn kernel_args(tree: &[String], extra: &[String], root_label: &str) -> Vec<String> {
    let mut args: Vec<String> = tree.iter().chain(extra).cloned().collect();
    if !args.iter().any(|a| a.starts_with("root=")) {
        args.push(format!("root=LABEL={root_label}"));
    }
    if !args.iter().any(|a| a == "rw" || a == "ro") {
        args.push("rw".into());
    }
    args
}

/// libostree's grub2 backend writes `loader.N/grub.cfg` and flips the
/// `loader` symlink on every deployment change; GRUB reads `grub/grub.cfg`,
/// a symlink into it. The environment block next to it holds the boot
/// counter (empty until an update arms it).
pub fn prepare_boot_for_grub(boot: &Path) -> Result<()> {
    let grub = boot.join("grub");
    std::fs::create_dir_all(&grub).with_context(|| format!("creating {}", grub.display()))?;
    std::os::unix::fs::symlink("../loader/grub.cfg", grub.join("grub.cfg"))
        .with_context(|| format!("creating {}/grub.cfg symlink", grub.display()))?;
    super::grub::GrubEnv::default().write(&boot.join(super::grub::GRUBENV))?;
    Ok(())
}

/// The directories of a physical OSTree root, as `ostree admin init-fs`
/// makes them (that is CLI-only code): the deployment's `/tmp` is a symlink
/// to `sysroot/tmp`, the others are mount points the initramfs may use.
pub fn physical_root_skeleton(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (dir, mode) in [
        ("boot", 0o755),
        ("dev", 0o755),
        ("home", 0o755),
        ("proc", 0o755),
        ("run", 0o755),
        ("sys", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
    ] {
        let path = root.join(dir);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    Ok(())
}

/// Everything libostree does for the image, on the mounted root (with /boot
/// mounted below it). All libostree objects are dropped on return, so the
/// file systems can be unmounted afterwards.
pub fn deploy(
    sysroot_path: &Path,
    source_repo: &Path,
    source: &SourceCommit,
    ref_: &str,
    remote_url: &str,
    kargs: &[String],
    trusted: Option<&[crate::keys::PublicKey]>,
) -> Result<()> {
    physical_root_skeleton(sysroot_path)?;
    let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(sysroot_path)));
    sysroot.ensure_initialized(no_cancel()).with_context(|| {
        format!(
            "initialising an OSTree sysroot in {}",
            sysroot_path.display()
        )
    })?;
    sysroot
        .load(no_cancel())
        .context("loading the new sysroot")?;
    sysroot
        .init_osname(OSNAME, no_cancel())
        .with_context(|| format!("creating stateroot {OSNAME}"))?;

    // The first deployment is written without a bootloader backend: libostree
    // still writes the BLS entry and swaps `loader`, and the menu is generated
    // here in-process (the grub2 backend would exec a generator, which needs
    // the `host` executable; this library may run in any process). Every later
    // change on the node goes through libostree's grub2 backend.
    let repo = sysroot.repo();
    set_bootloader(&repo, "none")?;
    cairn_contracts::image::protect_host_repo_objects(&sysroot_path.join("ostree/repo"))?;

    // Signed commits and a signed summary, or (a lab image) neither.
    let verify = trusted.is_some();
    let remote_opts = glib::VariantDict::new(None);
    remote_opts.insert_value("gpg-verify", &verify.to_variant());
    remote_opts.insert_value("gpg-verify-summary", &verify.to_variant());
    repo.remote_add(
        REMOTE,
        Some(remote_url),
        Some(&remote_opts.end()),
        no_cancel(),
    )
    .with_context(|| format!("adding remote {REMOTE} = {remote_url}"))?;
    for key in trusted.unwrap_or_default() {
        let stream = gio::MemoryInputStream::from_bytes(&glib::Bytes::from(&key.armored));
        let ids: Vec<&str> = key.fingerprints.iter().map(String::as_str).collect();
        let imported = repo
            .remote_gpg_import(REMOTE, Some(&stream), &ids, no_cancel())
            .with_context(|| {
                format!(
                    "importing the keys of {} into remote {REMOTE}",
                    key.path.display()
                )
            })?;
        if imported as usize != ids.len() {
            bail!(
                "importing {}: {imported} of {} keys were imported into remote {REMOTE}",
                key.path.display(),
                ids.len()
            );
        }
    }

    let source_url = format!("file://{}", source_repo.display());
    let pull_opts = glib::VariantDict::new(None);
    pull_opts.insert_value("refs", &vec![source.checksum.clone()].to_variant());
    pull_opts.insert_value("depth", &0i32.to_variant());
    repo.pull_with_options(&source_url, &pull_opts.end(), None, no_cancel())
        .with_context(|| format!("pulling commit {} from {source_url}", source.checksum))?;
    if verify {
        // The first deployment answers to the same keys as every later one.
        repo.verify_commit_for_remote(&source.checksum, REMOTE, no_cancel())
            .and_then(|r| r.require_valid_signature())
            .map_err(|e| {
                anyhow::anyhow!(
                    "commit {} is not signed by a key given with --trust ({e}); sign it with `host compose tree --gpg-homedir DIR` or `host compose promote --gpg-homedir DIR`",
                    source.checksum
                )
            })?;
    }
    repo.set_ref_immediate(Some(REMOTE), ref_, Some(&source.checksum), no_cancel())
        .with_context(|| format!("setting ref {REMOTE}:{ref_}"))?;

    let origin = sysroot.origin_new_from_refspec(&format!("{REMOTE}:{ref_}"));
    let argv: Vec<&str> = kargs.iter().map(String::as_str).collect();
    let deployment = sysroot
        .deploy_tree(
            Some(OSNAME),
            &source.checksum,
            Some(&origin),
            None,
            &argv,
            no_cancel(),
        )
        .with_context(|| format!("deploying commit {}", source.checksum))?;
    sysroot
        .simple_write_deployment(
            Some(OSNAME),
            &deployment,
            None,
            ostree::SysrootSimpleWriteDeploymentFlags::NONE,
            no_cancel(),
        )
        .context("writing the deployment and its boot entry")?;
    sysroot.unload();
    super::grub::generate(&sysroot_path.join("boot/loader/grub.cfg"))
        .context("writing the first GRUB menu")?;
    set_bootloader(&repo, "grub2")?;
    Ok(())
}

/// Writes `config` into the stateroot's /var (the node's /var), private to
/// root: it may carry password hashes.
pub fn embed_node_config(sysroot_path: &Path, config: &[u8]) -> Result<()> {
    let rel = cairn_contracts::names::PROVISION_EMBEDDED_CONFIG
        .strip_prefix("/var/")
        .context("the embedded config lives under /var")?;
    let path = sysroot_path
        .join(format!("ostree/deploy/{OSNAME}/var"))
        .join(rel);
    let dir = path.parent().context("a config path has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    cairn_contracts::durable::write_mode(&path, config, 0o600)
        .with_context(|| format!("embedding the node config at {}", path.display()))
}

fn set_bootloader(repo: &ostree::Repo, value: &str) -> Result<()> {
    let config = repo.copy_config();
    config.set_string("sysroot", "bootloader", value);
    repo.write_config(&config)
        .with_context(|| format!("setting sysroot.bootloader={value} in the sysroot repository"))?;
    // libostree reads sysroot.bootloader when the configuration is loaded.
    repo.reload_config(no_cancel())
        .context("reloading the sysroot repository's configuration")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kargs_order_tree_then_extra_then_root() {
        let args = kernel_args(&v(&["console=ttyS0"]), &v(&["quiet"]), "root");
        assert_eq!(
            args,
            v(&["console=ttyS0", "quiet", "root=LABEL=root", "rw"])
        );
    }

    #[test]
    fn kargs_keep_an_explicit_root_and_ro() {
        let args = kernel_args(&[], &v(&["root=/dev/vda2", "ro"]), "root");
        assert_eq!(args, v(&["root=/dev/vda2", "ro"]));
    }

    #[test]
    fn kargs_file_skips_comments_and_blanks() {
        let text =
            "# from the manifest\nconsole=ttyS0,115200\n\n  systemd.unified_cgroup_hierarchy=1  \n";
        assert_eq!(
            parse_kargs_file(text),
            v(&["console=ttyS0,115200", "systemd.unified_cgroup_hierarchy=1"])
        );
    }

    #[test]
    fn skeleton_has_a_sticky_tmp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        physical_root_skeleton(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("tmp"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o1777);
        assert!(dir.path().join("boot").is_dir());
    }

    #[test]
    fn boot_chain_for_the_grub2_backend() {
        let dir = tempfile::tempdir().unwrap();
        prepare_boot_for_grub(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("grub/grub.cfg")).unwrap(),
            Path::new("../loader/grub.cfg")
        );
        let env = std::fs::read(dir.path().join("grub/grubenv")).unwrap();
        assert_eq!(env.len(), 1024);
        assert!(env.starts_with(b"# GRUB Environment Block\n#"));
    }
}
