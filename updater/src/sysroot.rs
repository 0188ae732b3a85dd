//! Opening and locking the sysroot: small RAII wrappers over libostree.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ostree::gio;

pub use cairn_contracts::names::STATEROOT;

/// Which sysroot to act on: the running system, or a mounted disk.
#[derive(Debug, Clone)]
pub struct SysrootTarget {
    path: Option<PathBuf>,
}

impl SysrootTarget {
    /// A sysroot at `dir` (for example a mounted, non-booted disk), or with
    /// `None` the running system (`/`).
    pub fn from_option(dir: Option<PathBuf>) -> Self {
        SysrootTarget { path: dir }
    }

    /// The directory, `/` for the running system.
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new("/"))
    }

    /// Open and load the sysroot (no lock: for reading).
    pub fn open(&self) -> Result<ostree::Sysroot> {
        self.open_inner(false)
    }

    /// Open and load the sysroot to change it. On a booted system whose
    /// /sysroot is mounted read-only, libostree then remounts it writable in a
    /// private mount namespace of this process (as `ostree admin` does).
    pub fn open_for_write(&self) -> Result<ostree::Sysroot> {
        self.open_inner(true)
    }

    fn open_inner(&self, write: bool) -> Result<ostree::Sysroot> {
        let path = self.path();
        let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(path)));
        if write {
            sysroot
                .initialize_with_mount_namespace(gio::Cancellable::NONE)
                .with_context(|| {
                    format!("preparing the sysroot at {} for writing", path.display())
                })?;
        }
        sysroot.load(gio::Cancellable::NONE).with_context(|| {
            format!(
                "loading the OSTree sysroot at {} (is it a cairn system disk? \
                 pass --sysroot DIR for a mounted one)",
                path.display()
            )
        })?;
        Ok(sysroot)
    }
}

/// Changing a sysroot needs root; say so up front instead of failing halfway.
pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("`host {what}` changes the system's deployments and must run as root (try: sudo host {what} …)");
    }
    Ok(())
}

/// The sysroot lock, held for the guard's lifetime and released on drop.
/// Only one operation changes a sysroot at a time; a second one waits here.
pub struct SysrootLock {
    sysroot: ostree::Sysroot,
}

impl SysrootLock {
    /// Take the lock, waiting (after calling `waiting`, so the caller can say
    /// so) if another operation holds it. The sysroot is (re)loaded once the
    /// lock is held.
    pub fn acquire(sysroot: &ostree::Sysroot, waiting: &mut dyn FnMut()) -> Result<Self> {
        let got = sysroot
            .try_lock()
            .context("taking the sysroot lock (ostree/lock)")?;
        if !got {
            waiting();
            sysroot
                .lock()
                .context("waiting for the sysroot lock (ostree/lock)")?;
        }
        let guard = SysrootLock {
            sysroot: sysroot.clone(),
        };
        sysroot
            .load(gio::Cancellable::NONE)
            .context("reloading the sysroot after taking its lock")?;
        Ok(guard)
    }
}

impl Drop for SysrootLock {
    fn drop(&mut self) {
        self.sysroot.unlock();
    }
}
