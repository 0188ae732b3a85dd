//! The one writer of every state file: a temporary file in the same
//! directory, renamed over the old one, so a reader (or a crash) sees the
//! old content or the new, never a half-written file. [`write`] also
//! fsyncs the file and then the directory, so a power cut keeps the new
//! content once it returns: the health state holds the list of bad commits,
//! and losing it would let the agent stage a commit that already failed.
//! [`replace`] skips the syncs, for files a reboot discards anyway (on
//! `/run`) or that are written on a hot path and can be rebuilt.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Replace `path` with `bytes`, durably (see the module doc); mode 0600.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, 0o600, true)
}

/// [`write`] with the file's mode (e.g. 0644 for what others read).
pub fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_file(path, bytes, mode, true)
}

/// Replace `path` with `bytes` atomically but without syncing: after a
/// power cut it may hold the old content (see the module doc); mode 0600.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, 0o600, false)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .with_context(|| format!("{} has no directory", path.display()))?;
    let temporary = || {
        tempfile::Builder::new()
            .prefix(".tmp-")
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(dir)
    };
    // The directory is made only when missing: most writes replace a file
    // in one that exists, and a start writes several.
    let mut tmp = match temporary() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            temporary()
        }
        other => other,
    }
    .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| {
            if sync {
                tmp.as_file().sync_all()
            } else {
                Ok(())
            }
        })
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    if sync {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        super::write(&path, b"one").unwrap();
        super::write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn modes_and_the_unsynced_replace() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let a = dir.path().join("a");
        super::write_mode(&a, b"menu", 0o644).unwrap();
        assert_eq!(mode(&a), 0o644);
        let b = dir.path().join("b");
        super::replace(&b, b"one").unwrap();
        super::replace(&b, b"two").unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"two");
        assert_eq!(mode(&b), 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        assert!(super::replace(std::path::Path::new("relative"), b"x").is_err());
    }
}
