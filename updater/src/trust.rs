//! Trust follows the OS version: before every pull, the remote's keyring
//! becomes exactly the public keys shipped in the deployment the update is
//! based on (`cairn_contracts::trust::TRUSTED_KEYS_DIR` in that deployment's
//! tree). Rotating from key A to key B is then one update signed by A that
//! ships B; once it is the deployment updates follow, A is refused.
//!
//! libostree verifies a remote's commits and summary against
//! `<repo>/<remote>.trustedkeys.gpg` (plus any `gpgkeypath`, which cairn
//! never sets: it would be read from the root of whatever machine runs an
//! offline `--sysroot` operation). That file is rebuilt here with libostree's
//! own `remote_gpg_import` into a scratch repository and renamed over the old
//! one, so a reader sees the old keyring or the new one. A deployment that
//! ships no key leaves the keyring as it is (the image's `--trust` keys).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cairn_contracts::trust::{
    check_public_key, KEY_SUFFIX, MAX_PUBLIC_KEY_BYTES, MAX_TRUSTED_KEYS, TRUSTED_KEYS_DIR,
};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use ostree::gio;
use ostree::gio::prelude::FileExt;
use ostree::glib;

/// One key file a deployment ships: its file name (`<FINGERPRINT>.asc`) and
/// its armored bytes, checked ([`check_public_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippedKey {
    pub name: String,
    pub armored: Vec<u8>,
}

impl ShippedKey {
    /// The key id the file is named by (its primary key's fingerprint).
    pub fn fingerprint(&self) -> &str {
        self.name.strip_suffix(KEY_SUFFIX).unwrap_or(&self.name)
    }
}

/// What a pull is verified with, for messages and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keyring {
    /// The keys shipped in this deployment (its directory).
    Shipped {
        deployment: String,
        fingerprints: Vec<String>,
    },
    /// The deployment ships none: the remote's keyring as it was.
    Unchanged,
}

fn open_at(dir: Option<&OwnedFd>, name: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        dir.map(|d| d.as_raw_fd()),
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The keys shipped in the tree at `root` (a deployment's directory), in
/// file name order: `None` when the tree has no [`TRUSTED_KEYS_DIR`].
/// Read inside `root` only: no symlink is followed below it (one on the way
/// or as a key file is an error, as is anything but a regular file named
/// `*.asc`), each key at most [`MAX_PUBLIC_KEY_BYTES`], at most
/// [`MAX_TRUSTED_KEYS`] of them, armored public keys only.
pub fn shipped_keys(root: &Path) -> Result<Option<Vec<ShippedKey>>> {
    let what = |p: &Path| format!("{}/{}", root.display(), p.display());
    let mut dir = open_at(None, root, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
        .with_context(|| format!("opening deployment {}", root.display()))?;
    let mut walked = PathBuf::new();
    for part in Path::new(TRUSTED_KEYS_DIR).components() {
        walked.push(part);
        dir = match open_at(Some(&dir), part.as_os_str().as_ref(), OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(d) => d,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP | Errno::ENOTDIR) => bail!(
                "{} is a symlink or not a directory: a tree's trusted keys are read without following symlinks",
                what(&walked)
            ),
            Err(e) => return Err(e).with_context(|| format!("opening {}", what(&walked))),
        };
    }
    let listing = nix::dir::Dir::from_fd(
        nix::unistd::dup(dir.as_raw_fd()).with_context(|| format!("reading {}", what(&walked)))?,
    )
    .with_context(|| format!("reading {}", what(&walked)))?;
    let mut names = Vec::new();
    for entry in listing.into_iter() {
        let entry = entry.with_context(|| format!("reading {}", what(&walked)))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(KEY_SUFFIX) {
            continue;
        }
        names.push(name);
    }
    names.sort();
    if names.len() > MAX_TRUSTED_KEYS {
        bail!(
            "{} holds {} keys, more than {MAX_TRUSTED_KEYS}",
            what(&walked),
            names.len()
        );
    }
    let mut keys = Vec::new();
    for name in names {
        let path = walked.join(&name);
        let fd = match open_at(
            Some(&dir),
            Path::new(&name),
            OFlag::O_RDONLY | OFlag::O_NONBLOCK,
        ) {
            Ok(fd) => fd,
            Err(Errno::ELOOP) => bail!(
                "{} is a symlink: a tree's trusted keys are read without following symlinks",
                what(&path)
            ),
            Err(e) => return Err(e).with_context(|| format!("opening {}", what(&path))),
        };
        let file = std::fs::File::from(fd);
        let meta = file
            .metadata()
            .with_context(|| format!("reading {}", what(&path)))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", what(&path));
        }
        let mut armored = Vec::new();
        file.take(MAX_PUBLIC_KEY_BYTES + 1)
            .read_to_end(&mut armored)
            .with_context(|| format!("reading {}", what(&path)))?;
        check_public_key(&what(&path), &armored)?;
        keys.push(ShippedKey { name, armored });
    }
    Ok(Some(keys))
}

/// The keyring libostree reads for `remote` of `repo`.
fn keyring_path(repo: &ostree::Repo, remote: &str) -> Result<PathBuf> {
    let dir = repo
        .path()
        .path()
        .context("the repository has no local path")?;
    Ok(dir.join(format!("{remote}.trustedkeys.gpg")))
}

/// Make `remote`'s keyring exactly `keys` (each file must hold the key its
/// name names): imported by libostree into a scratch repository next to
/// `repo`, then renamed over the remote's keyring (synced).
pub fn install_keyring(repo: &ostree::Repo, remote: &str, keys: &[ShippedKey]) -> Result<()> {
    let target = keyring_path(repo, remote)?;
    let repo_dir = target.parent().context("the keyring has no directory")?;
    let scratch = tempfile::Builder::new()
        .prefix("cairn-keyring-")
        .tempdir_in(repo_dir.join("tmp"))
        .or_else(|_| tempfile::tempdir())
        .context("creating a scratch directory for the keyring")?;
    let scratch_repo = ostree::Repo::new(&gio::File::for_path(scratch.path().join("repo")));
    scratch_repo
        .create(ostree::RepoMode::Archive, gio::Cancellable::NONE)
        .context("creating a scratch repository for the keyring")?;
    scratch_repo
        .remote_add(
            remote,
            Some("file:///nonexistent"),
            None,
            gio::Cancellable::NONE,
        )
        .context("adding the scratch remote")?;
    for key in keys {
        let stream = gio::MemoryInputStream::from_bytes(&glib::Bytes::from(&key.armored));
        let imported = scratch_repo
            .remote_gpg_import(
                remote,
                Some(&stream),
                &[key.fingerprint()],
                gio::Cancellable::NONE,
            )
            .with_context(|| {
                format!(
                    "importing trusted key {} (it must hold the key whose fingerprint is its name)",
                    key.name
                )
            })?;
        if imported == 0 {
            bail!(
                "trusted key {} holds no key {}",
                key.name,
                key.fingerprint()
            );
        }
    }
    let built = std::fs::read(keyring_path(&scratch_repo, remote)?)
        .context("reading the keyring libostree built")?;
    if std::fs::read(&target).ok().as_deref() == Some(built.as_slice()) {
        return Ok(());
    }
    cairn_contracts::durable::write_mode(&target, &built, 0o644)
        .with_context(|| format!("replacing the keyring {}", target.display()))
}

/// Before a pull from `remote`: make its keyring the keys `deployment` (of
/// `sysroot`, whose directory is `sysroot_path`) ships, if it ships any.
pub fn follow_deployment(
    sysroot: &ostree::Sysroot,
    sysroot_path: &Path,
    repo: &ostree::Repo,
    remote: &str,
    deployment: &ostree::Deployment,
) -> Result<Keyring> {
    let rel = sysroot.deployment_dirpath(deployment);
    let root = sysroot_path.join(rel.as_str());
    let describe = format!("{}.{}", deployment.csum(), deployment.deployserial());
    let keys = shipped_keys(&root).with_context(|| {
        format!("reading the keys deployment {describe} trusts for its updates")
    })?;
    match keys {
        Some(keys) if !keys.is_empty() => {
            install_keyring(repo, remote, &keys).with_context(|| {
                format!("trusting the keys deployment {describe} ships for remote {remote}")
            })?;
            Ok(Keyring::Shipped {
                deployment: describe,
                fingerprints: keys.iter().map(|k| k.fingerprint().to_string()).collect(),
            })
        }
        _ => Ok(Keyring::Unchanged),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_contracts::trust::{ARMOR_PUBLIC, ARMOR_SECRET};

    fn key(body: &str) -> String {
        format!("{ARMOR_PUBLIC}\n\n{body}\n-----END PGP PUBLIC KEY BLOCK-----\n")
    }

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("root").join(TRUSTED_KEYS_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        (t, dir)
    }

    #[test]
    fn keys_are_read_in_name_order_and_other_names_ignored() {
        let (t, dir) = tree();
        let root = t.path().join("root");
        std::fs::write(dir.join("BBBB.asc"), key("b")).unwrap();
        std::fs::write(dir.join("AAAA.asc"), key("a")).unwrap();
        std::fs::write(dir.join("README"), "not a key").unwrap();
        let keys = shipped_keys(&root).unwrap().unwrap();
        let names: Vec<_> = keys.iter().map(|k| k.fingerprint()).collect();
        assert_eq!(names, ["AAAA", "BBBB"]);
        assert_eq!(keys[0].armored, key("a").as_bytes());
        // No directory: nothing shipped (the keyring stays as it is).
        let bare = t.path().join("bare");
        std::fs::create_dir_all(bare.join("usr/share")).unwrap();
        assert_eq!(shipped_keys(&bare).unwrap(), None);
    }

    #[test]
    fn hostile_trees_are_refused() {
        // A key file that is a symlink out of the deployment.
        let (t, dir) = tree();
        let root = t.path().join("root");
        let outside = t.path().join("outside.asc");
        std::fs::write(&outside, key("x")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("AAAA.asc")).unwrap();
        let e = format!("{:#}", shipped_keys(&root).unwrap_err());
        assert!(e.contains("symlink"), "{e}");

        // A directory on the way that is a symlink out.
        let (t, dir) = tree();
        let root = t.path().join("root");
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("AAAA.asc"), key("x")).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        let e = format!("{:#}", shipped_keys(&root).unwrap_err());
        assert!(e.contains("symlink"), "{e}");
        // Higher up: usr/share/cairn -> a directory holding trusted-keys/.
        std::fs::remove_file(&dir).unwrap();
        let ext = t.path().join("ext");
        std::fs::create_dir_all(ext.join("trusted-keys")).unwrap();
        std::fs::write(ext.join("trusted-keys/AAAA.asc"), key("x")).unwrap();
        std::fs::remove_dir_all(root.join("usr/share/cairn")).unwrap();
        std::os::unix::fs::symlink(&ext, root.join("usr/share/cairn")).unwrap();
        let e = format!("{:#}", shipped_keys(&root).unwrap_err());
        assert!(e.contains("symlink"), "{e}");

        // Oversize, a secret key, garbage, a directory named like a key.
        let (t, dir) = tree();
        let root = t.path().join("root");
        let mut big = key("x").into_bytes();
        big.resize(MAX_PUBLIC_KEY_BYTES as usize + 2, b'a');
        std::fs::write(dir.join("AAAA.asc"), &big).unwrap();
        let e = format!("{:#}", shipped_keys(&root).unwrap_err());
        assert!(e.contains("larger than"), "{e}");
        std::fs::write(dir.join("AAAA.asc"), format!("{ARMOR_SECRET}\nx\n")).unwrap();
        let e = format!("{:#}", shipped_keys(&root).unwrap_err());
        assert!(e.contains("SECRET"), "{e}");
        std::fs::write(dir.join("AAAA.asc"), b"\x99\x01\x0dgarbage").unwrap();
        let e = format!("{:#}", shipped_keys(&root).unwrap_err());
        assert!(e.contains("not an armored public key"), "{e}");
        std::fs::remove_file(dir.join("AAAA.asc")).unwrap();
        std::fs::create_dir(dir.join("AAAA.asc")).unwrap();
        let e = format!("{:#}", shipped_keys(&root).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }
}
