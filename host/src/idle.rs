//! `host-monitor`: where a detached container's monitor waits while it is
//! idle (see `cairn_runtime::idle`). It links only that module, so an idle
//! monitor maps a few hundred kilobytes of code instead of the container
//! executable's megabytes.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Returns only on an error: it execs the monitor again otherwise.
    if let Err(e) = cairn_runtime::idle::wait(&args) {
        eprintln!("error: {e:#}");
    }
    ExitCode::FAILURE
}
