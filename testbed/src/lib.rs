//! cairn-testbed: boot tests for users. `host test boot` boots a disk image
//! under QEMU on a throwaway overlay, provisions it through first-boot
//! provisioning (QEMU fw_cfg) with an SSH key made for the run, and runs
//! check executables in it as root; a check may reboot the machine and be
//! run again with its mark (autopkgtest's API). Results come as TAP and
//! JUnit XML. `host test upgrade` boots the release a fleet runs, upgrades
//! it over HTTP from an archive repository, rolls back, runs the checks
//! after each, and cuts the power at random moments of further updates.
//!
//! The real image boots: no test-only image, no control shell. The node
//! config (with the run's key merged in) is the caller's to make.

pub mod boot;
pub mod check;
pub mod http;
pub mod machine;
pub mod report;
pub mod upgrade;

pub use boot::{boot, BootOptions, BootReport, Observer};
pub use check::{discover, Check};
pub use machine::{relay, Accel, Network, FORWARDED_HOST};
pub use report::{CheckResult, Outcome};
pub use upgrade::{upgrade, UpdateSource, UpgradeOptions, UpgradeReport};
