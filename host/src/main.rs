//! `host`, the container executable: `host app run|exec|ps|stop|…` and the
//! monitors of detached containers, with no libostree in the process. Every
//! other command (and any argument this one cannot parse, help included)
//! is handed to `host-full` (see exe.rs), which serves them all.

mod containers;
mod exe;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use containers::{AppGlobals, ContainerSub};

/// The container commands of `host`'s command tree (full.rs has all of it).
#[derive(Debug, Parser)]
#[command(name = "host")]
struct ContainerCli {
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: TopCommand,
}

#[derive(Debug, Subcommand)]
enum TopCommand {
    App(ContainerApp),
}

#[derive(Debug, Args)]
struct ContainerApp {
    #[command(flatten)]
    globals: AppGlobals,

    #[command(subcommand)]
    command: ContainerSub,
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if let Some((globals, name)) = containers::monitor_invocation(&args) {
        if std::env::var_os("RUST_LOG").is_some() {
            exe::init_logging(0);
        }
        return containers::supervise(&globals, &name).unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        });
    }
    // `host [-v…] app …`: only then is it worth parsing here.
    let first_command = args
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'));
    if first_command.is_some_and(|c| c == "app") {
        if let Ok(cli) = ContainerCli::try_parse_from(&args) {
            exe::init_logging(cli.verbose);
            let TopCommand::App(app) = cli.command;
            let result = containers::runtime(&app.globals)
                .and_then(|rt| containers::run(&rt, app.command, None));
            match result {
                Ok(code) => return code,
                // The image store checks it out: that needs libostree.
                Err(e) if e.downcast_ref::<cairn_runtime::NotCheckedOut>().is_some() => {}
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    exe::exec_full(&args)
}
