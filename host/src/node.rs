//! The node commands (`host status|upgrade|rollback|deploy|switch|cleanup|pin|kargs`),
//! thin calls into `cairn_updater`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use cairn_updater::{
    ops::{ensure_can_reboot, reboot},
    CleanupOptions, KargsEdit, Outcome, Step, SysrootTarget, UpgradeOptions,
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
        /// Print the report as JSON (steps are not shown).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sysroot: SysrootArg,
    },

    /// Make the previous deployment boot next; running it again goes back.
    /// A staged deployment is dropped, with a warning.
    Rollback {
        /// Reboot into it (running system only).
        #[arg(short, long)]
        reboot: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
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
        /// Print the report as JSON (steps are not shown).
        #[arg(long)]
        json: bool,
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
        /// Print the report as JSON (steps are not shown).
        #[arg(long)]
        json: bool,
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
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
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

/// Shows an operation's steps as they happen: as text on stdout, or with
/// `--json` (where stdout holds only the report) just the wait for the lock,
/// on stderr.
pub(crate) fn show_step(json: bool) -> impl FnMut(&Step) {
    move |step: &Step| {
        if json {
            if let Step::WaitingForLock = step {
                eprint!("{}", render::step(step));
            }
        } else {
            print!("{}", render::step(step));
            // Seen before the operation goes on (a test reads the lock wait
            // while the lock is still held).
            let _ = std::io::stdout().flush();
        }
    }
}

/// Print a report: its JSON (`value`), or its text.
fn show(
    json: bool,
    value: impl FnOnce() -> serde_json::Result<serde_json::Value>,
    text: impl FnOnce() -> String,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &value()?)?;
        writeln!(out)?;
    } else {
        out.write_all(text().as_bytes())?;
    }
    out.flush()?;
    Ok(())
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
            let mut out = std::io::stdout().lock();
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
            json,
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
            let report = cairn_updater::upgrade(&target, &opts, &mut show_step(json))?;
            show(
                json,
                || serde_json::to_value(&report),
                || render::update(&report),
            )?;
            let outcome = report.outcome();
            if outcome == Outcome::Unchanged && unchanged_exit_77 {
                return Ok(ExitCode::from(77));
            }
            after(&outcome, do_reboot)
        }
        NodeCommand::Rollback {
            reboot: do_reboot,
            json,
            sysroot,
        } => {
            let target = sysroot.target();
            check_reboot(do_reboot, &target)?;
            let report = cairn_updater::rollback(&target, &mut show_step(json))?;
            show(
                json,
                || serde_json::to_value(&report),
                || render::rollback(&report),
            )?;
            after(&report.outcome(), do_reboot)
        }
        NodeCommand::Deploy {
            revision,
            reboot: do_reboot,
            json,
            sysroot,
        } => {
            let target = sysroot.target();
            check_reboot(do_reboot, &target)?;
            let report = cairn_updater::deploy(&target, &revision, progress, &mut show_step(json))?;
            show(
                json,
                || serde_json::to_value(&report),
                || render::update(&report),
            )?;
            after(&report.outcome(), do_reboot)
        }
        NodeCommand::Switch {
            refspec,
            reboot: do_reboot,
            json,
            sysroot,
        } => {
            let target = sysroot.target();
            check_reboot(do_reboot, &target)?;
            let report = cairn_updater::switch(&target, &refspec, progress, &mut show_step(json))?;
            show(
                json,
                || serde_json::to_value(&report),
                || render::update(&report),
            )?;
            after(&report.outcome(), do_reboot)
        }
        NodeCommand::Cleanup {
            pending,
            rollback,
            json,
            sysroot,
        } => {
            let report = cairn_updater::cleanup(
                &sysroot.target(),
                &CleanupOptions { pending, rollback },
                &mut show_step(json),
            )?;
            show(
                json,
                || serde_json::to_value(&report),
                || render::cleanup(&report),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Pin {
            index,
            unpin,
            sysroot,
        } => {
            let report =
                cairn_updater::pin(&sysroot.target(), index, !unpin, &mut show_step(false))?;
            show(
                false,
                || serde_json::to_value(&report),
                || render::pin(&report),
            )?;
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
            let report = cairn_updater::kargs(&target, &edit, &mut show_step(false))?;
            show(
                false,
                || serde_json::to_value(&report),
                || render::kargs(&report),
            )?;
            after(&report.outcome(), do_reboot)
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

/// Text of the updater's reports and steps: what `host` has always printed
/// for each operation (tests match these strings). Each function returns
/// whole lines.
pub(crate) mod render {
    use cairn_updater::commit::short;
    use cairn_updater::pull::human_bytes;
    use cairn_updater::report::{
        Change, ChangeKind, CleanupAction, FallbackReport, Fetch, NoChange, UpdateResult, Written,
    };
    use cairn_updater::{
        CleanupReport, KargsReport, PinReport, RollbackReport, Step, UpdateReport,
    };

    /// A step, shown while the operation runs.
    pub fn step(step: &Step) -> String {
        match step {
            Step::WaitingForLock => {
                "Waiting for the sysroot lock: another `host` or `ostree` operation is running…\n"
                    .to_string()
            }
            Step::Unpins { commit, refspec } => format!(
                "Note: the deployment was pinned to commit {} by `host deploy`; upgrading follows {refspec} again.\n",
                short(commit)
            ),
            Step::Fetching { what } => match what {
                Fetch::Ref { refspec } => format!("Fetching {refspec}…\n"),
                Fetch::History { refspec } => format!("Fetching the history of {refspec}…\n"),
                Fetch::Commit { commit } => format!("Fetching {}…\n", commit.describe()),
            },
            Step::Fetched { stats } => format!("  {}\n", stats.describe()),
            Step::Planned { change: c } => change(c),
        }
    }

    /// The heading, "from -> to" and the package diff.
    pub fn change(c: &Change) -> String {
        let mut s = match c.kind {
            ChangeKind::Upgrade => format!("Update on {}:\n", c.refspec),
            ChangeKind::Deploy => format!("Deploying from {}:\n", c.refspec),
            ChangeKind::Switch => format!("Switching to {}:\n", c.refspec),
        };
        s += &format!("  {} -> {}\n", c.from.describe(), c.to.describe());
        s += &format!(
            "  Timestamp: {} -> {}\n",
            c.from.timestamp_rfc3339(),
            c.to.timestamp_rfc3339()
        );
        if let Some(diff) = &c.packages {
            s += &format!("  Packages: {}\n", diff.summary());
            for line in diff.lines() {
                s += &format!("    {line}\n");
            }
        }
        s
    }

    pub fn no_change(why: &NoChange) -> String {
        match why {
            NoChange::Latest { target, refspec } => format!(
                "No update: {} is already the latest on {refspec}.\n",
                target.describe()
            ),
            NoChange::AlreadyDeployed { target } => {
                format!(
                    "{} is already deployed and boots next.\n",
                    target.describe()
                )
            }
            NoChange::AlreadyOn { refspec, target } => {
                format!("Already on {refspec} at {}.\n", target.describe())
            }
        }
    }

    fn written(w: &Written) -> String {
        let mut s = String::new();
        if let Some(d) = &w.replaced_staged {
            s += &format!("WARNING: this replaces the staged deployment {d}.\n");
        }
        if let Some(d) = &w.restaged {
            s += &format!("Restaging {d}.\n");
        }
        let what = w.commit.describe();
        if w.staged {
            s += &format!("Staged {what}: it is finalized at shutdown and boots next (changes to /etc made before the reboot are kept).\n");
        } else {
            s += &format!("Deployed {what}: it boots next.\n");
        }
        s
    }

    /// The end of an upgrade, deploy or switch (its steps were shown already).
    pub fn update(r: &UpdateReport) -> String {
        match &r.result {
            UpdateResult::Unchanged { why } => no_change(why),
            UpdateResult::UpdateAvailable => String::new(),
            UpdateResult::Downloaded => format!(
                "Downloaded {}; run `host upgrade` (or `host upgrade --cache-only`) to deploy it.\n",
                r.change.as_ref().map(|c| c.to.describe()).unwrap_or_default()
            ),
            UpdateResult::Deployed { written: w } => {
                let mut s = String::new();
                if let Some(k) = &r.manifest_kargs {
                    s += &format!("  Kernel arguments (from the manifest): {}\n", k.join(" "));
                }
                s + &written(w)
            }
        }
    }

    pub fn rollback(r: &RollbackReport) -> String {
        let mut s = String::new();
        if let Some(d) = &r.dropped_staged {
            s += &format!(
                "WARNING: dropping the staged deployment {}: it will not be finalized at shutdown. \
                 Run `host upgrade` to stage it again.\n",
                d.describe()
            );
        }
        s + &format!("Rolled back: {} boots next.\n", r.next.describe())
    }

    pub fn cleanup(r: &CleanupReport) -> String {
        let mut s = String::new();
        for e in &r.deployments {
            let (i, d) = (e.deployment.index, e.deployment.describe());
            s += &match e.action {
                CleanupAction::KeptPinned => format!("Keeping pinned deployment {i}: {d}\n"),
                CleanupAction::RemovedPending => format!("Removing pending deployment {i}: {d}\n"),
                CleanupAction::RemovedRollback => {
                    format!("Removing rollback deployment {i}: {d}\n")
                }
            };
        }
        if let Some(path) = &r.not_booted {
            s += &format!("No pending deployments: {path} is not booted.\n");
        }
        s + &format!(
            "Removed {} deployment(s); pruned the repo: {} freed.\n",
            r.removed(),
            human_bytes(r.freed_bytes)
        )
    }

    pub fn pin(r: &PinReport) -> String {
        let state = if r.pinned { "pinned" } else { "unpinned" };
        let i = r.deployment.index;
        if r.changed {
            format!(
                "Deployment {i} ({}) is now {state}.\n",
                r.deployment.describe()
            )
        } else {
            format!("Deployment {i} is already {state}.\n")
        }
    }

    pub fn kargs(r: &KargsReport) -> String {
        match r {
            KargsReport::Current { options } => format!("{options}\n"),
            KargsReport::Unchanged => "Kernel arguments unchanged.\n".to_string(),
            KargsReport::Deployed { kargs, written: w } => {
                format!("Kernel arguments: {}\n", kargs.join(" ")) + &written(w)
            }
        }
    }

    pub fn fallback(r: &FallbackReport) -> String {
        format!(
            "Deployment of {} {}: making the booted deployment the default again.\n",
            short(&r.bad),
            r.reason
        ) + &rollback(&r.rollback)
    }
}
