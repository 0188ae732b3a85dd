//! Helpers shared by the `host` integration tests (each test file includes
//! this module; not every file uses every helper).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Privileged-tier tests call this first: without root they fail loudly
/// instead of passing without testing anything.
pub fn require_root(why: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test must run as root ({why}); run it through scripts/test"
    );
}

/// The `host` binary under test.
pub fn host() -> Command {
    Command::new(env!("CARGO_BIN_EXE_host"))
}

/// Exit status and both streams, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Stock `ostree --repo=REPO ARGS…` (tests cross-check our results with it);
/// panics with its stderr if it fails.
pub fn ostree_cli(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args(args)
        .output()
        .expect("stock ostree CLI (package ostree) for cross-checks");
    assert!(
        out.status.success(),
        "ostree {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
