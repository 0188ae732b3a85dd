//! cairn-testbed: boot tests for users. `host test boot` boots a disk image
//! under QEMU on a throwaway overlay, provisions it through first-boot
//! provisioning (QEMU fw_cfg) with an SSH key made for the run, and runs
//! check executables in it as root; a check may reboot the machine and be
//! run again with its mark (autopkgtest's API). Results come as TAP and
//! JUnit XML.
//!
//! The real image boots: no test-only image, no control shell. The node
//! config (with the run's key merged in) is the caller's to make.

pub mod boot;
pub mod check;
pub mod machine;
pub mod report;

pub use boot::{boot, BootOptions, BootReport, Observer};
pub use check::{discover, Check};
pub use machine::Accel;
pub use report::{CheckResult, Outcome};
