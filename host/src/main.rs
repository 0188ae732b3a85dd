//! `host`: the one cairn executable. Argument parsing only; every command is a
//! thin call into the `cairn-builder`, `cairn-updater` or `cairn-runtime` library.

mod agent;
mod app;
mod cli;
mod compose;
mod compose_image;
mod fleet;
mod health;
mod lazy_ostree;
mod node;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.verbose);
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            // One error style everywhere: the error and its causes, once, on stderr.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}
