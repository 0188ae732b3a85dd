//! `host-full`: every `host` command (the `host` executable hands it all but
//! the container commands, see exe.rs). Argument parsing only; every
//! command is a thin call into the `cairn-builder`, `cairn-updater`,
//! `cairn-oci` or `cairn-runtime` library.

mod agent;
mod app;
mod cli;
mod compose;
mod compose_image;
mod containers;
mod exe;
mod fleet;
mod health;
mod node;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if let Some(code) = grub_generator() {
        return code;
    }
    let cli = cli::Cli::parse();
    exe::init_logging(cli.verbose);
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            // One error style everywhere: the error and its causes, once, on stderr.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `host` is also libostree's GRUB menu generator: run as `grub2-generate -o
/// FILE` (a symlink in the tree; see docs/image.md). Otherwise, on a node whose
/// tree carries that symlink, point libostree's grub2 backend at it for this
/// process's own deployment changes (set here, before any thread starts).
fn grub_generator() -> Option<ExitCode> {
    use cairn_builder::image::grub;
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some(std::ffi::OsStr::new(grub::GENERATOR_NAME))
    {
        let rest: Vec<String> = args.collect();
        let result = grub::generator_output(&rest).and_then(|out| grub::generate(&out));
        return Some(match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        });
    }
    if std::env::var_os("OSTREE_GRUB2_EXEC").is_none()
        && std::path::Path::new(grub::GENERATOR_PATH).exists()
    {
        std::env::set_var("OSTREE_GRUB2_EXEC", grub::GENERATOR_PATH);
    }
    None
}
