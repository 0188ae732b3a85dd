//! The node commands (`host status|upgrade|rollback|deploy|switch|cleanup|pin|kargs`),
//! thin calls into `cairn_updater`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use cairn_updater::{
    ops::{ensure_can_reboot, reboot},
    CleanupOptions, KargsEdit, Outcome, SysrootTarget, UpgradeOptions,
};
use clap::{Args, Subcommand};

/// Which sysroot to act on.
#[derive(Debug, Args)]
pub struct SysrootArg {
    /// Act on the OSTree sysroot at DIR (a mounted, non-booted disk) instead of
    /// the running system. Deployments are then written directly, not staged.
    #[arg(long, value_name = "DIR")]
    pub sysroot: Option<PathBuf>,
}

impl SysrootArg {
    fn target(&self) -> SysrootTarget {
        SysrootTarget::from_option(self.sysroot.clone())
    }
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum NodeCommand {
    /// Show the deployments: booted (●), staged, pending, rollback, pinned,
    /// version, commit, origin and the package diff against the booted one
    /// (`-v` lists every package change and the kernel arguments).
    Status {
        /// JSON following docs/status-v1.schema.json (apiVersion cairn.status/v1).
        #[arg(long)]
        json: bool,
        /// Only the booted deployment (the default one on a non-booted sysroot).
        #[arg(long)]
        booted: bool,
        /// Exit with 77 when a deployment other than the booted one boots next
        /// (staged or pending): a reboot would change the system.
        #[arg(long)]
        pending_exit_77: bool,
        /// Every package change and the kernel arguments of each deployment.
        #[arg(short, long)]
        verbose: bool,
        #[command(flatten)]
        sysroot: SysrootArg,
    },

    /// Fetch the newest commit of the origin ref and deploy it (staged on a
    /// running system: finalized at shutdown, so /etc edits made before the
    /// reboot are kept).
    Upgrade {
        /// Only report whether an update exists (fetches commit metadata only).
        #[arg(long, conflicts_with_all = ["download_only", "cache_only"])]
        check: bool,
        /// Download the update and stop; a later `host upgrade` deploys it
        /// without downloading it again.
        #[arg(long, conflicts_with = "cache_only")]
        download_only: bool,
        /// Deploy what `--download-only` fetched, without contacting the remote.
        #[arg(short = 'C', long)]
        cache_only: bool,
        /// Reboot into the new deployment (running system only).
        #[arg(short, long)]
        reboot: bool,
        /// Accept a commit older than the deployed one.
        #[arg(long)]
        allow_downgrade: bool,
        /// Exit with 77 when there is no update.
        #[arg(long)]
        unchanged_exit_77: bool,
        #[command(flatten)]
        sysroot: SysrootArg,
    },

    /// Make the previous deployment boot next; running it again goes back.
    /// A staged deployment is dropped, with a warning.
    Rollback {
        /// Reboot into it (running system only).
        #[arg(short, long)]
        reboot: bool,
        #[command(flatten)]
        sysroot: SysrootArg,
    },

    /// Deploy one commit of the origin ref's history, by version or checksum.
    Deploy {
        /// A `version` from the commit metadata, or a commit checksum (or a
        /// prefix of at least 8 hex digits).
        revision: String,
        /// Reboot into it (running system only).
        #[arg(short, long)]
        reboot: bool,
        #[command(flatten)]
        sysroot: SysrootArg,
    },

    /// Move the node to another ref (and remote), e.g. from blue to green.
    Switch {
        /// REMOTE:REF, for example cairn:cairn/bookworm/x86_64/container-host.
        refspec: String,
        /// Reboot into it (running system only).
        #[arg(short, long)]
        reboot: bool,
        #[command(flatten)]
        sysroot: SysrootArg,
    },

    /// Remove pending and/or rollback deployments, then prune unused files
    /// from /boot, the deployments and the repo.
    Cleanup {
        /// Remove the deployments that would boot next instead of the booted one.
        #[arg(short, long)]
        pending: bool,
        /// Remove the rollback deployments (pinned ones are kept).
        #[arg(short, long)]
        rollback: bool,
        #[command(flatten)]
        sysroot: SysrootArg,
    },

    /// Pin a deployment (see `host status` for indexes) so upgrades and
    /// cleanups keep it, or unpin it.
    Pin {
        /// Index of the deployment, as `host status` shows it.
        index: usize,
        /// Remove the pin instead.
        #[arg(long)]
        unpin: bool,
        #[command(flatten)]
        sysroot: SysrootArg,
    },

    /// Print the kernel arguments, or edit them: a new deployment of the same
    /// commit boots next with the new arguments.
    Kargs {
        /// Add KEY[=VALUE] (repeatable).
        #[arg(long, value_name = "KEY[=VALUE]")]
        append: Vec<String>,
        /// Remove KEY[=VALUE] (repeatable).
        #[arg(long, value_name = "KEY[=VALUE]")]
        delete: Vec<String>,
        /// Replace the value of KEY with VALUE (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        replace: Vec<String>,
        /// Reboot into it (running system only).
        #[arg(short, long)]
        reboot: bool,
        #[command(flatten)]
        sysroot: SysrootArg,
    },
}

fn after(outcome: &Outcome, do_reboot: bool) -> Result<ExitCode> {
    if do_reboot && matches!(outcome, Outcome::Deployed { .. }) {
        reboot()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn check_reboot(do_reboot: bool, target: &SysrootTarget) -> Result<()> {
    if do_reboot {
        ensure_can_reboot(target)?;
    }
    Ok(())
}

pub fn run(cmd: NodeCommand) -> Result<ExitCode> {
    // Failpoints are armed only when FAILPOINTS is set (tests).
    let _failpoints = cairn_updater::failpoints::setup();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let progress = std::io::stderr().is_terminal();
    match cmd {
        NodeCommand::Status {
            json,
            booted,
            pending_exit_77,
            verbose,
            sysroot,
        } => {
            let mut status = cairn_updater::read_status(&sysroot.target(), verbose)?;
            let pending = status.deployments.iter().any(|d| d.pending);
            if booted {
                status = status.only_booted();
            }
            if json {
                status.write_json(&mut out)?;
            } else {
                status.write_text(&mut out, verbose)?;
            }
            out.flush()?;
            if pending_exit_77 && pending {
                return Ok(ExitCode::from(77));
            }
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Upgrade {
            check,
            download_only,
            cache_only,
            reboot: do_reboot,
            allow_downgrade,
            unchanged_exit_77,
            sysroot,
        } => {
            let target = sysroot.target();
            check_reboot(do_reboot && !check && !download_only, &target)?;
            let opts = UpgradeOptions {
                check,
                download_only,
                cache_only,
                allow_downgrade,
                progress,
                bad_commits: None,
            };
            let outcome = cairn_updater::upgrade(&target, &opts, &mut out)?;
            if outcome == Outcome::Unchanged && unchanged_exit_77 {
                return Ok(ExitCode::from(77));
            }
            after(&outcome, do_reboot)
        }
        NodeCommand::Rollback {
            reboot: do_reboot,
            sysroot,
        } => {
            let target = sysroot.target();
            check_reboot(do_reboot, &target)?;
            let outcome = cairn_updater::rollback(&target, &mut out)?;
            after(&outcome, do_reboot)
        }
        NodeCommand::Deploy {
            revision,
            reboot: do_reboot,
            sysroot,
        } => {
            let target = sysroot.target();
            check_reboot(do_reboot, &target)?;
            let outcome = cairn_updater::deploy(&target, &revision, progress, &mut out)?;
            after(&outcome, do_reboot)
        }
        NodeCommand::Switch {
            refspec,
            reboot: do_reboot,
            sysroot,
        } => {
            let target = sysroot.target();
            check_reboot(do_reboot, &target)?;
            let outcome = cairn_updater::switch(&target, &refspec, progress, &mut out)?;
            after(&outcome, do_reboot)
        }
        NodeCommand::Cleanup {
            pending,
            rollback,
            sysroot,
        } => {
            cairn_updater::cleanup(
                &sysroot.target(),
                &CleanupOptions { pending, rollback },
                &mut out,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Pin {
            index,
            unpin,
            sysroot,
        } => {
            cairn_updater::pin(&sysroot.target(), index, !unpin, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Kargs {
            append,
            delete,
            replace,
            reboot: do_reboot,
            sysroot,
        } => {
            let target = sysroot.target();
            check_reboot(do_reboot, &target)?;
            let edit = KargsEdit {
                append,
                delete,
                replace,
            };
            let outcome = cairn_updater::kargs(&target, &edit, &mut out)?;
            after(&outcome, do_reboot)
        }
    }
}

/// `host compose publish` (defined here so compose.rs only gains one variant).
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The OSTree repository to publish (archive mode, as composed).
    #[arg(long, env = "CAIRN_REPO", default_value = "build/repo")]
    pub repo: PathBuf,

    /// Sign the summary with this GPG key id.
    #[arg(long, value_name = "KEYID")]
    pub gpg_sign: Option<String>,

    /// GPG home directory holding the signing key.
    #[arg(long, value_name = "DIR", requires = "gpg_sign")]
    pub gpg_homedir: Option<PathBuf>,

    /// Only refresh the summary; generate no static deltas.
    #[arg(long)]
    pub no_deltas: bool,
}

pub fn publish(args: PublishArgs) -> Result<ExitCode> {
    use cairn_builder::publish::{publish, PublishOptions};
    let report = publish(
        &args.repo,
        &PublishOptions {
            gpg_sign: args.gpg_sign,
            gpg_homedir: args.gpg_homedir,
            no_deltas: args.no_deltas,
        },
    )?;
    for r in &report.refs {
        match &r.delta_from {
            Some((from, true)) => println!("{} {}: delta from {from} generated", r.refname, r.head),
            Some((from, false)) => println!("{} {}: delta from {from} present", r.refname, r.head),
            None => println!("{} {}: no parent commit, no delta", r.refname, r.head),
        }
    }
    println!(
        "summary regenerated{}",
        if report.summary_signed {
            " and signed"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
