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

/// Print a report: its JSON (`to_json` writes it; the report's own field
/// order is kept), or its text.
fn show<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, value)?;
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
            if !status.verified && !status.deployments.is_empty() {
                eprintln!("{}", render::UNVERIFIED_WARNING);
            }
            let pending = status.deployments.iter().any(|d| d.pending);
            if booted {
                status = status.only_booted();
            }
            show(json, &status, || render::status(&status, verbose))?;
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
            show(json, &report, || render::update(&report))?;
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
            show(json, &report, || render::rollback(&report))?;
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
            show(json, &report, || render::update(&report))?;
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
            show(json, &report, || render::update(&report))?;
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
            show(json, &report, || render::cleanup(&report))?;
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Pin {
            index,
            unpin,
            sysroot,
        } => {
            let report =
                cairn_updater::pin(&sysroot.target(), index, !unpin, &mut show_step(false))?;
            show(false, &report, || render::pin(&report))?;
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
            show(false, &report, || render::kargs(&report))?;
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

    #[command(flatten)]
    pub signing: crate::compose::SigningArgs,

    /// Only refresh the summary; generate no static deltas.
    #[arg(long)]
    pub no_deltas: bool,
}

pub fn publish(args: PublishArgs) -> Result<ExitCode> {
    use cairn_builder::publish::{publish, PublishOptions};
    let report = publish(
        &args.repo,
        &PublishOptions {
            signer: args.signing.signer()?,
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
        CleanupReport, KargsReport, PinReport, RollbackReport, Status, Step, UpdateReport,
    };
    use std::fmt::Write as _;

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

    /// Said on every `host status` of a node whose updates are not verified.
    pub const UNVERIFIED_WARNING: &str =
        "warning: this node installs updates WITHOUT verifying signatures \
        (its remote has gpg-verify or gpg-verify-summary off): anyone who can answer its update \
        requests can replace its root file system. Write the image with --trust KEYFILE.";

    /// `host status`: `●` marks the booted deployment.
    pub fn status(st: &Status, verbose: bool) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = status_into(&mut s, st, verbose);
        s
    }

    fn status_into(out: &mut String, st: &Status, verbose: bool) -> std::fmt::Result {
        if !st.is_booted {
            writeln!(
                out,
                "Sysroot {} (not booted: index 0 boots next; diffs are against it)",
                st.sysroot
            )?;
        }
        if st.deployments.is_empty() {
            writeln!(out, "No deployments.")?;
        }
        for d in &st.deployments {
            let mark = if d.booted { "●" } else { " " };
            let mut flags = Vec::new();
            for (set, name) in [
                (d.staged, "staged"),
                (d.pending && !d.staged, "pending"),
                (d.rollback, "rollback"),
                (d.pinned, "pinned"),
            ] {
                if set {
                    flags.push(name);
                }
            }
            let flags = if flags.is_empty() {
                String::new()
            } else {
                format!(" ({})", flags.join(", "))
            };
            writeln!(
                out,
                "{mark} {} {} {}{flags}",
                d.index,
                d.stateroot,
                d.origin
                    .as_ref()
                    .map(|o| o.refspec.as_str())
                    .unwrap_or("(no origin)")
            )?;
            writeln!(
                out,
                "      Version: {} ({})",
                d.version.as_deref().unwrap_or("(none)"),
                d.timestamp
            )?;
            writeln!(out, "       Commit: {}.{}", d.checksum, d.serial)?;
            match &d.signature {
                Some(sig) if sig.trusted => writeln!(
                    out,
                    "    Signed by: {} ({})",
                    sig.user.as_deref().unwrap_or("?"),
                    sig.fingerprint
                )?,
                Some(sig) => writeln!(
                    out,
                    "    Signature: {} (NOT trusted by this node)",
                    if sig.fingerprint.is_empty() {
                        "unreadable"
                    } else {
                        &sig.fingerprint
                    }
                )?,
                None => {}
            }
            if let Some(o) = d.origin.as_ref().and_then(|o| o.override_commit.as_ref()) {
                writeln!(out, "     Override: commit {o} (set by `host deploy`)")?;
            }
            if let Some(diff) = &d.package_diff {
                writeln!(out, "         Diff: {}", diff.summary())?;
                if verbose {
                    for line in diff.lines() {
                        writeln!(out, "               {line}")?;
                    }
                }
            }
            if verbose {
                writeln!(out, "  Kernel args: {}", d.kernel_args.join(" "))?;
                if let Some(p) = &d.packages {
                    writeln!(out, "     Packages: {}", p.len())?;
                }
            }
        }
        let short = |c: &str| c.chars().take(12).collect::<String>();
        if let Some(b) = &st.boot_counter {
            writeln!(out, "Boot counter: {}", b.describe())?;
        }
        if let Some(a) = &st.agent {
            let update = a
                .update
                .as_deref()
                .map(|u| format!(" {}", short(u)))
                .unwrap_or_default();
            writeln!(out, "Agent: policy {}, {}{update}", a.policy, a.state)?;
            if let Some(t) = &a.last_check {
                writeln!(
                    out,
                    "       last check {t}: {}",
                    a.last_result.as_deref().unwrap_or("-")
                )?;
            }
            if let Some(t) = &a.next_window {
                writeln!(out, "       next update window {t}")?;
            }
            if a.holds_fleet_lock {
                writeln!(out, "       holds a FleetLock reboot slot")?;
            }
        }
        if let Some(h) = &st.health {
            if let (Some(c), Some(r)) = (&h.last_checked, &h.last_result) {
                writeln!(out, "Health: {} {r}", short(c))?;
            }
            for b in &h.bad_commits {
                writeln!(
                    out,
                    "        rolled back from {} at {}: {}",
                    short(&b.checksum),
                    b.at,
                    b.reason
                )?;
            }
        }
        if let Some(p) = &st.provision {
            let text = crate::provision::render_state(p);
            // The headline and, when it failed, why.
            for line in text
                .lines()
                .filter(|l| !l.starts_with("  ") || l.starts_with("  error:"))
            {
                writeln!(out, "{line}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_updater::commit::CommitInfo;
    use cairn_updater::pull::PullStats;
    use cairn_updater::report::{
        Change, ChangeKind, CleanupAction, CleanupEntry, CommitRef, DeploymentRef, Fetch, NoChange,
        UpdateResult, Written,
    };
    use cairn_updater::status::{AgentSummary, BadCommitSummary, HealthSummary};
    use cairn_updater::{CleanupReport, RollbackReport, Status, UpdateReport};

    const REF: &str = "cairn:cairn/bookworm/x86_64/container-host";

    fn commit(version: &str, n: u8, packages: &[&str]) -> CommitInfo {
        CommitInfo {
            checksum: format!("{n:02x}").repeat(32),
            version: Some(version.into()),
            timestamp: 1_700_000_000 + u64::from(n) * 86_400,
            parent: None,
            packages: packages.iter().map(|p| p.to_string()).collect(),
            has_packages: !packages.is_empty(),
            kargs: Vec::new(),
        }
    }

    fn deployment(index: usize, version: &str, n: u8) -> DeploymentRef {
        DeploymentRef {
            index,
            checksum: format!("{n:02x}").repeat(32),
            serial: 0,
            version: Some(version.into()),
        }
    }

    fn json(v: &impl serde::Serialize) -> serde_json::Value {
        serde_json::to_value(v).unwrap()
    }

    fn staged_upgrade() -> UpdateReport {
        let (v1, v2) = (
            commit("1.0", 1, &["systemd=252.38-1~deb12u1"]),
            commit("2.0", 2, &["jq=1.6-2.1", "systemd=252.39-1~deb12u1"]),
        );
        UpdateReport {
            unpinned: None,
            pulled: Some(PullStats {
                bytes_transferred: 3 * 1024 * 1024,
                objects_fetched: 42,
                metadata_fetched: 7,
                ..Default::default()
            }),
            change: Some(Change::new(ChangeKind::Upgrade, REF, &v1, &v2)),
            manifest_kargs: None,
            result: UpdateResult::Deployed {
                written: Written {
                    commit: CommitRef::from(&v2),
                    staged: true,
                    replaced_staged: None,
                    restaged: None,
                },
            },
        }
    }

    #[test]
    fn an_upgrade_renders_its_steps_then_its_end() {
        let r = staged_upgrade();
        let mut text = render::step(&Step::Fetching {
            what: Fetch::Ref {
                refspec: REF.into(),
            },
        });
        text += &render::step(&Step::Fetched {
            stats: r.pulled.clone().unwrap(),
        });
        text += &render::step(&Step::Planned {
            change: r.change.clone().unwrap(),
        });
        text += &render::update(&r);
        assert_eq!(
            text,
            format!(
                "Fetching {REF}…\n\
                 \x20 fetched 42 objects (7 metadata), 3.0 MiB\n\
                 Update on {REF}:\n\
                 \x20 1.0 (010101010101) -> 2.0 (020202020202)\n\
                 \x20 Timestamp: 2023-11-15T22:13:20Z -> 2023-11-16T22:13:20Z\n\
                 \x20 Packages: 1 upgraded, 1 added\n\
                 \x20   upgraded   systemd 252.38-1~deb12u1 -> 252.39-1~deb12u1\n\
                 \x20   added      jq 1.6-2.1\n\
                 Staged 2.0 (020202020202): it is finalized at shutdown and boots next \
                 (changes to /etc made before the reboot are kept).\n"
            )
        );
        assert_eq!(
            r.outcome(),
            Outcome::Deployed {
                checksum: "02".repeat(32),
                staged: true
            }
        );
    }

    #[test]
    fn an_upgrade_report_as_json() {
        let v = json(&staged_upgrade());
        assert_eq!(v["result"]["kind"], "deployed");
        assert_eq!(v["result"]["written"]["staged"], true);
        assert_eq!(v["result"]["written"]["commit"]["version"], "2.0");
        assert_eq!(v["change"]["kind"], "upgrade");
        assert_eq!(v["change"]["refspec"], REF);
        assert_eq!(v["change"]["from"]["checksum"], "01".repeat(32));
        assert_eq!(v["change"]["packages"]["added"][0]["name"], "jq");
        assert_eq!(v["pulled"]["objectsFetched"], 42);
        assert_eq!(v["unpinned"], serde_json::Value::Null);
    }

    #[test]
    fn no_update_renders_the_planners_reason() {
        let v1 = commit("1.0", 1, &[]);
        let r = UpdateReport {
            unpinned: None,
            pulled: None,
            change: None,
            manifest_kargs: None,
            result: UpdateResult::Unchanged {
                why: NoChange::Latest {
                    target: CommitRef::from(&v1),
                    refspec: REF.into(),
                },
            },
        };
        assert_eq!(
            render::update(&r),
            format!("No update: 1.0 (010101010101) is already the latest on {REF}.\n")
        );
        assert_eq!(r.outcome(), Outcome::Unchanged);
        let v = json(&r);
        assert_eq!(v["result"]["kind"], "unchanged");
        assert_eq!(v["result"]["why"]["reason"], "latest");
        assert_eq!(v["result"]["why"]["target"]["version"], "1.0");
    }

    #[test]
    fn a_rollback_that_drops_a_staged_deployment_says_so() {
        let r = RollbackReport {
            dropped_staged: Some(deployment(0, "2.0", 2)),
            next: deployment(0, "1.0", 1),
        };
        assert_eq!(
            render::rollback(&r),
            "WARNING: dropping the staged deployment 2.0 (020202020202).0: it will not be \
             finalized at shutdown. Run `host upgrade` to stage it again.\n\
             Rolled back: 1.0 (010101010101).0 boots next.\n"
        );
        let v = json(&r);
        assert_eq!(v["droppedStaged"]["version"], "2.0");
        assert_eq!(v["next"]["checksum"], "01".repeat(32));
        let plain = RollbackReport {
            dropped_staged: None,
            ..r
        };
        assert_eq!(
            render::rollback(&plain),
            "Rolled back: 1.0 (010101010101).0 boots next.\n"
        );
    }

    #[test]
    fn cleanup_lists_deployments_in_order_then_the_prune() {
        let r = CleanupReport {
            deployments: vec![
                CleanupEntry {
                    action: CleanupAction::RemovedPending,
                    deployment: deployment(0, "3.0", 3),
                },
                CleanupEntry {
                    action: CleanupAction::KeptPinned,
                    deployment: deployment(2, "1.0", 1),
                },
            ],
            not_booted: None,
            freed_bytes: 2048,
            changed: true,
        };
        assert_eq!(
            render::cleanup(&r),
            "Removing pending deployment 0: 3.0 (030303030303).0\n\
             Keeping pinned deployment 2: 1.0 (010101010101).0\n\
             Removed 1 deployment(s); pruned the repo: 2.0 KiB freed.\n"
        );
        assert_eq!(json(&r)["deployments"][1]["action"], "keptPinned");
    }

    #[test]
    fn waiting_for_the_lock_is_one_line() {
        assert_eq!(
            render::step(&Step::WaitingForLock),
            "Waiting for the sysroot lock: another `host` or `ostree` operation is running…\n"
        );
    }

    fn fixture(name: &str) -> Status {
        let path = format!(
            "{}/../updater/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn golden(name: &str, actual: &str) {
        let path = format!(
            "{}/../updater/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            actual, want,
            "rendering differs from {path} (UPDATE_GOLDEN=1 rewrites it)"
        );
    }

    #[test]
    fn text_of_booted_system_with_staged_update() {
        let status = fixture("status-booted-staged.json");
        let out = render::status(&status, false);
        golden("status-booted-staged.txt", &out);
    }

    #[test]
    fn verbose_text_lists_package_changes() {
        let status = fixture("status-booted-staged.json");
        let out = render::status(&status, true);
        golden("status-booted-staged-verbose.txt", &out);
    }

    #[test]
    fn text_of_non_booted_sysroot() {
        let status = fixture("status-sysroot.json");
        let out = render::status(&status, false);
        golden("status-sysroot.txt", &out);
    }

    #[test]
    fn agent_and_health_render_when_present() {
        let mut status = fixture("status-booted-staged.json");
        status.agent = Some(AgentSummary {
            policy: "apply".into(),
            state: "waiting-for-window".into(),
            update: Some("c0ffee0123456789".into()),
            last_check: Some("2026-11-24T05:00:00Z".into()),
            last_result: Some("update c0ffee012345 staged".into()),
            next_step: None,
            next_window: Some("2026-11-28T02:00:00Z".into()),
            holds_fleet_lock: false,
        });
        status.health = Some(HealthSummary {
            last_checked: Some("beef00112233445566".into()),
            last_result: Some("3 checks passed".into()),
            last_healthy: Some("beef00112233445566".into()),
            checked_at: None,
            bad_commits: vec![BadCommitSummary {
                checksum: "badbadbad0001".into(),
                reason: "failed: 10-app (required: exit status 1)".into(),
                at: "2026-11-23T01:00:00Z".into(),
            }],
        });
        let mut failed = cairn_updater::provision::apply::ProvisionState::failed(
            Some("fw_cfg opt/org.cairn/config".into()),
            "node config fw_cfg opt/org.cairn/config: hostname: \"-x\" is not a hostname".into(),
        );
        failed.at = "2026-11-23T00:59:00Z".into();
        failed.files = vec!["/etc/motd".into()];
        status.provision = Some(failed);
        let out = render::status(&status, false);
        let text = out;
        assert!(
            text.contains("Provisioning: FAILED at 2026-11-23T00:59:00Z from fw_cfg opt/org.cairn/config\n  error: node config fw_cfg opt/org.cairn/config: hostname:"),
            "{text}"
        );
        assert!(!text.contains("files:"), "{text}");
        assert!(
            text.contains("Agent: policy apply, waiting-for-window c0ffee012345\n"),
            "{text}"
        );
        assert!(
            text.contains("       last check 2026-11-24T05:00:00Z: update c0ffee012345 staged\n"),
            "{text}"
        );
        assert!(
            text.contains("       next update window 2026-11-28T02:00:00Z\n"),
            "{text}"
        );
        assert!(
            text.contains("Health: beef00112233 3 checks passed\n"),
            "{text}"
        );
        assert!(
            text.contains("rolled back from badbadbad000 at 2026-11-23T01:00:00Z: failed: 10-app"),
            "{text}"
        );
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["agent"]["state"], "waiting-for-window");
        assert_eq!(json["health"]["badCommits"][0]["checksum"], "badbadbad0001");
        assert_eq!(json["provision"]["result"], "failed");
        assert_eq!(json["provision"]["source"], "fw_cfg opt/org.cairn/config");
    }
}
