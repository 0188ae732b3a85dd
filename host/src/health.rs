//! `host health …`: the health checks that gate a new deployment.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_updater::health::{self, Verdict};
use cairn_updater::SysrootTarget;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum HealthCommand {
    /// Run the health checks; on the first boot of a deployment, a failing
    /// required check rolls back to the previous deployment and reboots.
    ///
    /// Checks are executables in required/ and wanted/ under
    /// /usr/lib/cairn/health.d and /etc/cairn/health.d; meant to run once per boot.
    Check {
        /// Act on the sysroot at DIR instead of the running system.
        #[arg(long, value_name = "DIR")]
        sysroot: Option<PathBuf>,
        /// Roll back but do not reboot.
        #[arg(long)]
        no_reboot: bool,
        /// Time each check may take.
        #[arg(long, default_value = "60s")]
        timeout: String,
        /// Where the health state is kept (shown by `host status`).
        #[arg(long, value_name = "FILE", default_value = health::STATE_FILE)]
        state_file: PathBuf,
    },
}

pub fn run(cmd: HealthCommand) -> Result<ExitCode> {
    let HealthCommand::Check {
        sysroot,
        no_reboot,
        timeout,
        state_file,
    } = cmd;
    let timeout: Duration = cairn_contracts::duration::parse(&timeout).context("--timeout")?;
    let target = SysrootTarget::from_option(sysroot);
    // GRUB ran out of boot attempts for the default deployment: undo it first.
    let mut step = crate::node::show_step(false);
    if let Some(r) =
        cairn_updater::recovery::recover_from_fallback(&target, &state_file, &mut step)?
    {
        print!("{}", crate::node::render::fallback(&r));
    }
    let sysroot = target.open()?;
    let booted = sysroot
        .booted_deployment()
        .context("no booted deployment: health checks gate the running system")?;
    let has_rollback = sysroot.deployments().len() > 1;
    let (verdict, report) = health::gate(
        std::path::Path::new("/"),
        &state_file,
        &booted.csum(),
        has_rollback,
        timeout,
        &mut || {
            let r = cairn_updater::rollback(&target, &mut step)?;
            print!("{}", crate::node::render::rollback(&r));
            Ok(())
        },
    )?;
    for r in &report.results {
        let mark = if r.passed { "ok  " } else { "FAIL" };
        println!(
            "{mark} {:?} {} {}",
            r.kind,
            r.name,
            if r.passed { "" } else { &r.detail }
        );
        if !r.passed && !r.output.is_empty() {
            for line in r.output.lines() {
                println!("     {line}");
            }
        }
    }
    match verdict {
        Verdict::Healthy => {
            if cairn_updater::recovery::prove_booted(&target)? {
                println!("boot counter cleared: the booted deployment is proven");
            }
            println!("healthy: {}", report.summary());
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Unhealthy { reason } => {
            eprintln!("error: unhealthy ({reason}); no earlier deployment to roll back to");
            Ok(ExitCode::FAILURE)
        }
        Verdict::RolledBack { reason } => {
            eprintln!("unhealthy ({reason}): rolled back; the previous deployment boots next");
            if !no_reboot {
                cairn_updater::ops::reboot()?;
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
