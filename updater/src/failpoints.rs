//! Failpoints (the `fail` crate) at each step of an operation.
//!
//! Arm them with `FAILPOINTS="name=action;…"`. Besides the `fail` crate's own
//! actions (`panic`, `sleep(ms)`, `off`, …), `return(kill)` sends SIGKILL to the
//! process at that point (a power cut, as far as the disk can tell) and
//! `return` or `return(error)` fails the operation there with an error.
//! Names: see [`ALL`].

/// Every failpoint, in the order an operation meets them.
pub const ALL: &[&str] = &[
    "pull::after-pull",
    "deploy::before-write",
    "deploy::after-deploy-tree",
    "deploy::after-bootloader-swap",
    "deploy::after-stage",
    "rollback::before-write",
    "rollback::after-write",
    "cleanup::before-write",
    "cleanup::before-prune",
    "pin::before-write",
];

/// Read `FAILPOINTS` for the lifetime of the returned guard. Without the
/// `failpoints` feature this does nothing.
pub fn setup() -> Option<fail::FailScenario<'static>> {
    if std::env::var_os("FAILPOINTS").is_some() {
        Some(fail::FailScenario::setup())
    } else {
        None
    }
}

/// What a `return(arg)` action does at failpoint `name`.
pub fn trigger(name: &str, arg: Option<String>) -> anyhow::Error {
    if arg.as_deref() == Some("kill") {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    anyhow::anyhow!("failpoint {name} triggered")
}

/// `failpoint!("step")` inside a function returning `anyhow::Result<_>`.
macro_rules! failpoint {
    ($name:expr) => {
        fail::fail_point!($name, |arg: Option<String>| {
            Err($crate::failpoints::trigger($name, arg))
        })
    };
}
