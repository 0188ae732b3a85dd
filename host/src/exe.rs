//! `host` is two executables (see `cairn_contracts::names::full_executable`),
//! and a third where an idle monitor waits (idle.rs): `host` runs, execs
//! and supervises containers and loads no libostree or glib (about 60
//! shared libraries: most of a short container's start, and most of an idle
//! monitor's memory); `host-full` links everything. `host`
//! hands every other command to `host-full` with `execve`, so the process,
//! its arguments, standard streams and exit code stay the caller's.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use cairn_contracts::names;

fn current() -> PathBuf {
    // /proc/self/exe names the file even when run through a symlink.
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}

/// The executable that serves the container commands (the monitor of a
/// detached container is always this one).
pub fn container_executable() -> PathBuf {
    names::container_executable(&current())
}

/// Replace this process with `host-full`, same arguments (argv[0] too: the
/// GRUB generator is told by its name). Returns only if that fails.
#[allow(dead_code)] // used by the container executable only
pub fn exec_full(args: &[OsString]) -> ExitCode {
    let full = names::full_executable(&container_executable());
    let mut cmd = std::process::Command::new(&full);
    if let Some((argv0, rest)) = args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    let err = cmd.exec();
    eprintln!(
        "error: running {}: {err}: every command but the container ones is served by it; \
         install it next to {}",
        full.display(),
        container_executable().display()
    );
    ExitCode::FAILURE
}

/// Log to stderr: -v info, -vv debug; RUST_LOG overrides.
pub fn init_logging(verbose: u8) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // Levels per target (`debug`, `warn,cairn_runtime=debug`); not
    // env-filter's span and field filters, which would link regex.
    let from_env = std::env::var("RUST_LOG").ok().and_then(|v| {
        v.parse::<Targets>()
            .inspect_err(|e| eprintln!("warning: RUST_LOG={v:?} ignored: {e}"))
            .ok()
    });
    let filter = from_env.unwrap_or_else(|| default.parse().expect("a level"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only for a terminal: logs and CI output stay plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false)
                .without_time(),
        )
        .with(filter)
        .init();
}
