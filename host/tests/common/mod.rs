//! Helpers shared by the `host` integration tests (each test file includes
//! this module; not every file uses every helper). The rest live in
//! cairn-test-support, shared with the other crates' tests.
#![allow(dead_code, unused_imports)]

use std::process::Command;

pub use cairn_test_support::{ostree_cli, output_text as text, require_root};

/// The `host` binary under test.
pub fn host() -> Command {
    cairn_test_support::Host::new(env!("CARGO_BIN_EXE_host")).command()
}
