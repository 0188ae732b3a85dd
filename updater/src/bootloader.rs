//! Boot counting on GRUB nodes: the user-space half of greenboot's scheme.
//!
//! The GRUB menu (written by libostree through our generator, see
//! `cairn_contracts::grub`) counts `boot_counter` down on every boot
//! while `boot_success=0`, and once it has run out boots the previous
//! deployment (menu entry 1) with `boot_counter=-1`. Here:
//! - a new deployment that boots next **arms** the counter
//!   (`boot_counter=3`, `boot_success=0`);
//! - a rollback, or dropping the deployment that would have booted next,
//!   **disarms** it;
//! - `host health check` **proves** a healthy boot of the default deployment
//!   (`boot_success=1`, counter removed), or, when GRUB fell back, records the
//!   default commit as bad and makes the booted deployment the default again
//!   (that policy is `recovery.rs`, above the operations; this module is the
//!   mechanism).
//!
//! Only sysroots whose repository says `sysroot.bootloader=grub2` are
//! touched; the environment block is `/boot/grub/grubenv`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cairn_contracts::grub::{GrubEnv, BOOT_ATTEMPTS, BOOT_COUNTER, BOOT_SUCCESS, GRUBENV};
use serde::{Deserialize, Serialize};

/// Makes what was just written to `/boot` visible to GRUB before anything
/// it replaced goes. GRUB reads ext4 without replaying its journal: a
/// committed rename of `/boot/loader` that is still only in the journal is
/// invisible to it, so after a power cut it would boot the old menu, whose
/// `ostree=/ostree/boot.N` paths libostree's cleanup may already have
/// removed from the root file system (the QEMU power-cut test found this
/// after an interrupted `host rollback`). A freeze/thaw cycle checkpoints
/// the journal. Done only when `/boot` is a file system of its own (as on
/// every cairn disk): freezing the root file system would stall the
/// machine; where the file system cannot freeze, a sync must do.
///
/// The two ioctls follow each other at once; a SIGKILL between them would
/// leave `/boot` frozen until `fsfreeze -u /boot`.
pub fn checkpoint_boot(sysroot: &Path) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;
    const FIFREEZE: nix::libc::c_ulong = 0xC004_5877; // _IOWR('X', 119, int)
    const FITHAW: nix::libc::c_ulong = 0xC004_5878; // _IOWR('X', 120, int)
    let boot = sysroot.join("boot");
    let dir = std::fs::File::open(&boot).with_context(|| format!("opening {}", boot.display()))?;
    let separate = std::fs::metadata(sysroot)
        .map(|root| root.dev() != dir.metadata().map(|m| m.dev()).unwrap_or(root.dev()))
        .unwrap_or(false);
    // SAFETY: syncfs on a descriptor this function owns.
    if unsafe { nix::libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncing the file system of {}", boot.display()));
    }
    if !separate {
        return Ok(());
    }
    // SAFETY: FIFREEZE and FITHAW take no argument; the descriptor is ours.
    if unsafe { nix::libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            // Cannot freeze (tmpfs, vfat), or another process froze it and
            // will thaw it: the sync above is what there is.
            Some(nix::libc::EOPNOTSUPP) | Some(nix::libc::ENOTTY) | Some(nix::libc::EBUSY) => {
                Ok(())
            }
            _ => Err(e)
                .with_context(|| format!("freezing {} to checkpoint its journal", boot.display())),
        };
    }
    // SAFETY: as above.
    if unsafe { nix::libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "thawing {} (run `fsfreeze -u {}`)",
                boot.display(),
                boot.display()
            )
        });
    }
    Ok(())
}

/// Does this sysroot boot with GRUB (libostree's grub2 backend)?
pub fn uses_grub(repo: &ostree::Repo) -> bool {
    repo.copy_config()
        .string("sysroot", "bootloader")
        .is_ok_and(|b| b == "grub2")
}

/// Refuse, before anything is written, to change the deployments of a GRUB
/// sysroot when no menu generator is named: libostree's grub2 backend would
/// then run this machine's grub-mkconfig (chrooted into the new deployment on
/// a disk that is not booted), which fails there, or where it works writes a
/// menu for the wrong machine. `host-full` names itself (see its
/// `grub_generator`); this guards every other caller of the library.
pub fn require_generator(sysroot: &Path, repo: &ostree::Repo) -> Result<()> {
    if uses_grub(repo) && std::env::var_os(GENERATOR_ENV).is_none() {
        anyhow::bail!(
            "{} boots with GRUB, but {GENERATOR_ENV} is not set, so libostree would write its \
             menu with this machine's grub-mkconfig; nothing was changed. Run the operation \
             through `host`, which writes the menu itself, or set {GENERATOR_ENV} to cairn's \
             generator ({} on a cairn node)",
            sysroot.display(),
            cairn_contracts::grub::GENERATOR_PATH
        );
    }
    Ok(())
}

pub use cairn_contracts::grub::GENERATOR_ENV;

/// The environment block of the sysroot at `sysroot` (`/` when booted).
pub fn grubenv_path(sysroot: &Path) -> PathBuf {
    sysroot.join("boot").join(GRUBENV)
}

/// What the environment block says about the boot counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CounterState {
    /// Nothing armed: the default deployment is proven (or never counted).
    Off,
    /// A new default deployment has `attempts` boots left to become healthy.
    Counting,
    /// The attempts ran out: GRUB booted the previous deployment.
    FellBack,
}

/// The boot counter as `host status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootCounter {
    pub state: CounterState,
    /// `boot_counter`: boots left (GRUB counts down before each boot), -1
    /// after a fallback; null when not armed.
    pub boot_counter: Option<i64>,
    /// `boot_success`: false while a new deployment is unproven.
    pub boot_success: Option<bool>,
}

impl BootCounter {
    pub fn of(env: &GrubEnv) -> BootCounter {
        let counter = env.get(BOOT_COUNTER).and_then(|c| c.parse::<i64>().ok());
        let success = env.get(BOOT_SUCCESS).map(|s| s == "1");
        let state = match (counter, success) {
            (Some(c), Some(false)) if c < 0 => CounterState::FellBack,
            (Some(_), Some(false)) => CounterState::Counting,
            _ => CounterState::Off,
        };
        BootCounter {
            state,
            boot_counter: counter,
            boot_success: success,
        }
    }

    pub fn describe(&self) -> String {
        match (self.state, self.boot_counter) {
            (CounterState::Off, _) => "off (the default deployment is proven)".into(),
            (CounterState::Counting, Some(n)) => format!(
                "armed: the default deployment has {n} of {BOOT_ATTEMPTS} boots left to reach a healthy user space"
            ),
            (CounterState::Counting, None) => "armed".into(),
            (CounterState::FellBack, _) => {
                "ran out: GRUB booted the previous deployment".into()
            }
        }
    }
}

/// The counter of a GRUB sysroot, `None` on other bootloaders.
pub fn read(sysroot: &Path, repo: &ostree::Repo) -> Result<Option<BootCounter>> {
    if !uses_grub(repo) {
        return Ok(None);
    }
    Ok(Some(BootCounter::of(&GrubEnv::read(&grubenv_path(
        sysroot,
    ))?)))
}

fn update(sysroot: &Path, change: impl FnOnce(&mut GrubEnv)) -> Result<()> {
    let path = grubenv_path(sysroot);
    let mut env = GrubEnv::read(&path)?;
    let before = env.clone();
    change(&mut env);
    if env != before {
        env.write(&path)
            .with_context(|| format!("updating the boot counter in {}", path.display()))?;
    }
    Ok(())
}

/// A new, unproven deployment boots next: give it [`BOOT_ATTEMPTS`] boots.
pub fn arm(sysroot: &Path, repo: &ostree::Repo) -> Result<()> {
    if !uses_grub(repo) {
        return Ok(());
    }
    update(sysroot, |env| {
        env.set(BOOT_COUNTER, &BOOT_ATTEMPTS.to_string());
        env.set(BOOT_SUCCESS, "0");
    })
}

/// A proven deployment boots next (or the default one proved itself): stop counting.
pub fn disarm(sysroot: &Path, repo: &ostree::Repo) -> Result<()> {
    if !uses_grub(repo) {
        return Ok(());
    }
    update(sysroot, |env| {
        env.unset(BOOT_COUNTER);
        env.set(BOOT_SUCCESS, "1");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What GRUB would read: the file system's on-disk metadata, without
    /// replaying its journal (debugfs does not replay it either).
    fn on_disk_link(image: &Path, name: &str) -> String {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("stat /{name}")])
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    #[ignore = "privileged: needs root (mounts an ext4 image); run by scripts/test"]
    fn a_swapped_loader_link_is_on_disk_for_grub_after_the_checkpoint() {
        assert!(nix::unistd::geteuid().is_root(), "run as root");
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("boot.ext4");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let ok =
            |cmd: &mut std::process::Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
        ok(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image));
        let sysroot = dir.path().join("sysroot");
        let boot = sysroot.join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        ok(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&boot));
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _mounted = Unmount(boot.clone());
        std::fs::create_dir(boot.join("loader.0")).unwrap();
        std::os::unix::fs::symlink("loader.0", boot.join("loader")).unwrap();
        checkpoint_boot(&sysroot).unwrap();
        // libostree's swap: a new link renamed over the old one, then fsync.
        std::fs::create_dir(boot.join("loader.1")).unwrap();
        std::os::unix::fs::symlink("loader.1", boot.join("loader.tmp")).unwrap();
        std::fs::rename(boot.join("loader.tmp"), boot.join("loader")).unwrap();
        std::fs::File::open(&boot).unwrap().sync_all().unwrap();
        checkpoint_boot(&sysroot).unwrap();
        let seen = on_disk_link(&image, "loader");
        assert!(seen.contains("Fast link dest: \"loader.1\""), "{seen}");
        let tmp = on_disk_link(&image, "loader.tmp");
        assert!(
            !tmp.contains("Fast link dest"),
            "the rename is on disk: {tmp}"
        );
        // Still writable: thawed.
        std::fs::write(boot.join("after"), "x").unwrap();
    }

    fn env(pairs: &[(&str, &str)]) -> GrubEnv {
        let mut e = GrubEnv::default();
        for (k, v) in pairs {
            e.set(k, v);
        }
        e
    }

    #[test]
    fn counter_states_follow_greenboot() {
        let c = BootCounter::of(&env(&[]));
        assert_eq!(c.state, CounterState::Off);
        let c = BootCounter::of(&env(&[("boot_counter", "2"), ("boot_success", "0")]));
        assert_eq!(c.state, CounterState::Counting);
        assert_eq!(c.boot_counter, Some(2));
        assert!(
            c.describe().contains("2 of 3 boots left"),
            "{}",
            c.describe()
        );
        let c = BootCounter::of(&env(&[("boot_counter", "-1"), ("boot_success", "0")]));
        assert_eq!(c.state, CounterState::FellBack);
        // Proven: success wins over a stale counter.
        let c = BootCounter::of(&env(&[("boot_counter", "1"), ("boot_success", "1")]));
        assert_eq!(c.state, CounterState::Off);
        assert_eq!(c.boot_success, Some(true));
    }

    #[test]
    fn arm_and_disarm_keep_other_variables() {
        let dir = tempfile::tempdir().unwrap();
        let sysroot = dir.path();
        std::fs::create_dir_all(sysroot.join("boot/grub")).unwrap();
        env(&[("saved_entry", "x")])
            .write(&grubenv_path(sysroot))
            .unwrap();
        update(sysroot, |e| {
            e.set(BOOT_COUNTER, "3");
            e.set(BOOT_SUCCESS, "0");
        })
        .unwrap();
        let e = GrubEnv::read(&grubenv_path(sysroot)).unwrap();
        assert_eq!(BootCounter::of(&e).state, CounterState::Counting);
        assert_eq!(e.get("saved_entry"), Some("x"));
        assert_eq!(
            std::fs::metadata(grubenv_path(sysroot)).unwrap().len(),
            1024
        );
    }
}
