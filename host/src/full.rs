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
mod net;
mod node;
mod provision;
mod pull_progress;
mod test;

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

/// `host` is also libostree's GRUB menu generator (see
/// `cairn_contracts::grub::is_generator_call`): run as `grub2-generate -o
/// FILE` (a symlink in the tree; see docs/image.md), or as itself when
/// libostree spawns it. Otherwise, unless the caller named a generator, point
/// libostree's grub2 backend at this very executable for this process's own
/// deployment changes (set here, before any thread starts). Not the tree's
/// symlink, and never grub-mkconfig: a build machine servicing a mounted disk
/// (`--sysroot`) has neither the symlink nor a menu to write for that disk,
/// and libostree runs a generator not named `grub2-mkconfig` as is, with no
/// chroot into the new deployment, so the running binary writes the disk's
/// menu on any machine.
fn grub_generator() -> Option<ExitCode> {
    use cairn_builder::image::grub;
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let from_libostree = std::env::var_os(grub::BOOTVERSION_ENV).is_some();
    if grub::is_generator_call(&argv0, &rest, from_libostree) {
        let result = grub::generator_output(&rest).and_then(|out| grub::generate(&out));
        return Some(match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        });
    }
    if std::env::var_os(grub::GENERATOR_ENV).is_none() {
        // Without it the updater refuses to change a GRUB sysroot (see
        // cairn_updater::bootloader::require_generator): nothing is lost.
        if let Ok(me) = std::env::current_exe() {
            std::env::set_var(grub::GENERATOR_ENV, me);
        }
    }
    None
}
