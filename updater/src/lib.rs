//! cairn-updater: move a node between host trees atomically (status, upgrade,
//! rollback, deploy, switch, cleanup, pin, kargs) over libostree's sysroot API.
//!
//! Every operation that changes a sysroot takes its lock (see [`sysroot::SysrootLock`]),
//! and lets libostree do each write atomically: a deployment directory is
//! written first, then the bootloader configuration is swapped in one rename.
//! Named failpoints between those steps (feature `failpoints`, armed with the
//! `FAILPOINTS` environment variable) let tests kill an operation anywhere.

#[macro_use]
pub mod failpoints;
pub mod agent;
pub mod bootloader;
pub mod commit;
pub mod fleetlock;
pub mod health;
pub mod ops;
pub mod plan;
pub mod provision;
pub mod pull;
pub mod recovery;
pub mod report;
pub mod status;
pub mod sysroot;
pub mod trust;

pub use ops::{
    cleanup, deploy, follow, kargs, pin, rollback, set_remote_url, switch, upgrade, CleanupOptions,
    KargsEdit, Outcome, UpgradeOptions,
};
pub use plan::Refusal;
pub use report::{
    CleanupReport, KargsReport, Observer, PinReport, RollbackReport, Step, UpdateReport,
};
pub use status::Status;

/// The status of a sysroot (`verbose` adds package lists), with what the
/// update agent last did there.
pub fn read_status(target: &SysrootTarget, verbose: bool) -> anyhow::Result<Status> {
    status::read_status_with(target, verbose, agent::summary)
}
pub use sysroot::{SysrootTarget, STATEROOT};
