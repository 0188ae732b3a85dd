//! The operations that change a sysroot: upgrade, deploy, switch, rollback,
//! cleanup, pin, kargs. Each takes the sysroot lock for its whole duration.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ostree::gio;
use ostree::glib;

use crate::commit::{boot_files, short, CommitInfo};
use crate::plan::{self, BootNeed, Plan, PlanOptions, Request, Snapshot, Staging};
use crate::pull::{pull, PullRequest};
use crate::report::{
    Change, ChangeKind, CleanupAction, CleanupEntry, CleanupReport, CommitRef, DeploymentRef,
    Fetch, KargsReport, Observer, PinReport, RollbackReport, Step, UpdateReport, UpdateResult,
    Written,
};
use crate::status::{split_refspec, Origin, Roles};
use crate::sysroot::{require_root, SysrootLock, SysrootTarget, STATEROOT};

pub use crate::report::Outcome;

#[derive(Debug, Clone, Default)]
pub struct UpgradeOptions {
    pub check: bool,
    pub download_only: bool,
    /// Deploy what an earlier `--download-only` fetched, without the network.
    pub cache_only: bool,
    pub allow_downgrade: bool,
    /// Show pull progress (a bar on a terminal).
    pub progress: bool,
    /// A health state file (`host health check`'s): the commits it lists as
    /// bad are refused with [`crate::plan::Refusal::BadCommit`]. Read under the sysroot
    /// lock the deployment is written in, so a commit is never staged after
    /// being marked bad (the agent sets it; `host upgrade` does not).
    pub bad_commits: Option<PathBuf>,
}

/// A locked, loaded sysroot.
struct Session {
    sysroot: ostree::Sysroot,
    repo: ostree::Repo,
    path: std::path::PathBuf,
    _lock: SysrootLock,
}

impl Session {
    fn begin(target: &SysrootTarget, what: &str, obs: &mut dyn Observer) -> Result<Self> {
        require_root(what)?;
        let sysroot = target.open_for_write()?;
        let lock = SysrootLock::acquire(&sysroot, &mut || obs.step(&Step::WaitingForLock))?;
        let repo = sysroot.repo();
        Ok(Session {
            repo,
            path: target.path().to_path_buf(),
            sysroot,
            _lock: lock,
        })
    }

    fn booted(&self) -> bool {
        self.sysroot.booted_deployment().is_some()
    }

    /// The deployment new ones are based on: booted, or index 0.
    fn merge_deployment(&self) -> Result<ostree::Deployment> {
        self.sysroot
            .merge_deployment(Some(STATEROOT))
            .ok_or_else(|| {
                anyhow!(
                    "no `{STATEROOT}` deployment in {}: install the system first",
                    self.path.display()
                )
            })
    }

    /// The deployment whose origin `upgrade` and `deploy` follow: the one
    /// that boots next when it is not the booted one (a `host switch` or
    /// `host deploy` waiting for its reboot), else the merge deployment. As
    /// rpm-ostree does: after `switch`, `upgrade` updates the new ref.
    fn origin_deployment(&self) -> Result<ostree::Deployment> {
        let merge = self.merge_deployment()?;
        Ok(match self.sysroot.deployments().into_iter().next() {
            Some(next) if next.osname() == STATEROOT && !next.equal(&merge) => next,
            _ => merge,
        })
    }

    /// Fails naming the configured remotes unless `remote` is one of them.
    fn require_remote(&self, remote: &str) -> Result<()> {
        let remotes: Vec<String> = self
            .repo
            .remote_list()
            .iter()
            .map(|r| r.to_string())
            .collect();
        if !remotes.iter().any(|r| r == remote) {
            bail!(
                "remote `{remote}` is not configured in {}/ostree/repo (configured: {})",
                self.path.display(),
                if remotes.is_empty() {
                    "none".to_string()
                } else {
                    remotes.join(", ")
                }
            );
        }
        Ok(())
    }

    /// The plain facts the planner starts from.
    fn snapshot(&self) -> Result<Snapshot> {
        let merge = self.merge_deployment()?;
        let current = CommitInfo::load(&self.repo, &merge.csum())?;
        let next = match self.sysroot.deployments().into_iter().next() {
            Some(d) if d.csum() != current.checksum => {
                Some(CommitInfo::load(&self.repo, &d.csum())?)
            }
            _ => None,
        };
        Ok(Snapshot {
            current_kargs: merge
                .bootconfig()
                .and_then(|b| b.get("options"))
                .map(|o| o.to_string())
                .unwrap_or_default(),
            current_refspec: self.origin_of(&merge).ok().map(|o| o.refspec),
            current,
            next,
        })
    }

    fn origin_of(&self, d: &ostree::Deployment) -> Result<Origin> {
        d.origin()
            .as_ref()
            .and_then(Origin::from_keyfile)
            .ok_or_else(|| {
                anyhow!(
                    "deployment {}.{} has no origin refspec: use `host switch REMOTE:REF`",
                    d.csum(),
                    d.deployserial()
                )
            })
    }
}

fn new_origin(
    sysroot: &ostree::Sysroot,
    refspec: &str,
    override_commit: Option<&str>,
) -> glib::KeyFile {
    let kf = sysroot.origin_new_from_refspec(refspec);
    if let Some(c) = override_commit {
        kf.set_string("origin", "override-commit", c);
    }
    kf
}

fn remote_of(origin: &Origin) -> Result<&str> {
    origin.remote.as_deref().ok_or_else(|| {
        anyhow!(
            "origin refspec `{}` names no remote: use `host switch REMOTE:REF`",
            origin.refspec
        )
    })
}

/// Report the planned change before anything is written (a power cut while
/// staging then comes after it, as the lifecycle test expects).
fn planned(
    report: &mut UpdateReport,
    kind: ChangeKind,
    refspec: &str,
    plan: &Staging,
    obs: &mut dyn Observer,
) {
    let change = Change::new(kind, refspec, &plan.from, &plan.to);
    obs.step(&Step::Planned {
        change: change.clone(),
    });
    report.change = Some(change);
}

/// Pull and report it as steps.
fn pull_observed(
    s: &Session,
    req: &PullRequest,
    what: Fetch,
    progress: bool,
    obs: &mut dyn Observer,
) -> Result<crate::pull::PullStats> {
    // Trust follows the OS version: the keys of the deployment this update
    // is based on (crate::trust), installed before anything is fetched.
    let keyring = crate::trust::follow_deployment(
        &s.sysroot,
        &s.path,
        &s.repo,
        req.remote,
        &s.origin_deployment()?,
    )?;
    obs.step(&Step::Fetching { what });
    pull(&s.repo, req, progress).map_err(|e| match keyring {
        crate::trust::Keyring::Shipped {
            deployment,
            fingerprints,
        } if s.repo.remote_get_gpg_verify(req.remote).unwrap_or(false) => e.context(format!(
            "remote {} trusts the keys deployment {deployment} ships: {}",
            req.remote,
            fingerprints.join(", ")
        )),
        _ => e,
    })
}

fn fetched(report: &mut UpdateReport, stats: crate::pull::PullStats, obs: &mut dyn Observer) {
    obs.step(&Step::Fetched {
        stats: stats.clone(),
    });
    report.pulled = Some(stats);
}

/// What the kernel and initramfs of `csum` need in /boot; `None` when there
/// is nothing new to write there.
fn measure_boot(s: &Session, csum: &str) -> Result<Option<BootNeed>> {
    let Some(new) = boot_files(&s.repo, csum)? else {
        return Ok(None);
    };
    for d in s.sysroot.deployments() {
        if let Some(b) = boot_files(&s.repo, &d.csum())? {
            if b.files == new.files {
                // Same kernel and initramfs: libostree reuses the files in /boot.
                return Ok(None);
            }
        }
    }
    let dir = s.path.join("boot");
    let st = nix::sys::statvfs::statvfs(&dir)
        .with_context(|| format!("checking free space in {}", dir.display()))?;
    Ok(Some(BootNeed {
        dir,
        kernel_version: new.kernel_version.clone(),
        // Room for the loader entries written next to them.
        need: new.size() + 64 * 1024,
        free: st.blocks_available() as u64 * st.fragment_size() as u64,
    }))
}

/// The checksums the health state at `path` lists as bad on this node.
fn bad_commits(path: Option<&Path>) -> Vec<String> {
    path.map(|p| {
        crate::health::HealthState::load(p)
            .bad_commits
            .into_iter()
            .map(|b| b.checksum)
            .collect()
    })
    .unwrap_or_default()
}

/// Run the planner; `None` (the report says why) when there is nothing to
/// do. A refusal is returned as an error that downcasts to [`Refusal`].
fn plan_update(
    snap: &Snapshot,
    req: &Request,
    opts: &PlanOptions,
    bad: &[String],
    boot: Option<&BootNeed>,
    report: &mut UpdateReport,
) -> Result<Option<Staging>> {
    match plan::plan(snap, req, opts, bad, boot)? {
        Plan::Unchanged { why } => {
            report.result = UpdateResult::Unchanged { why };
            Ok(None)
        }
        Plan::Stage(staging) => Ok(Some(*staging)),
    }
}

/// An empty update report, filled in as the operation goes.
fn new_report() -> UpdateReport {
    UpdateReport {
        unpinned: None,
        pulled: None,
        change: None,
        manifest_kargs: None,
        // Replaced by the planner's verdict or what was written.
        result: UpdateResult::UpdateAvailable,
    }
}

/// Write a planned deployment, in the locked session that planned it: nothing
/// (another operation, a commit marked bad) changes between the two.
fn stage(s: &Session, plan: &Staging, report: &mut UpdateReport) -> Result<()> {
    report.manifest_kargs = plan.kargs.clone();
    let origin = new_origin(&s.sysroot, &plan.refspec, plan.override_commit.as_deref());
    let kargs: Option<Vec<&str>> = plan
        .kargs
        .as_ref()
        .map(|k| k.iter().map(String::as_str).collect());
    write_deployment(s, &plan.to.checksum, &origin, kargs.as_deref(), &plan.to)
        .map(|written| report.result = UpdateResult::Deployed { written })?;
    follow_keys_after_write(s);
    Ok(())
}

/// After the deployment updates follow changed (a new one written, a
/// rollback), make the remote's keyring its keys now, so `host status`
/// judges signatures with the keys the next pull will use. The next pull
/// does it again before fetching, so a failure here is only a warning.
fn follow_keys_after_write(s: &Session) {
    let result = (|| -> Result<()> {
        s.sysroot
            .load_if_changed(gio::Cancellable::NONE)
            .context("reloading the sysroot")?;
        let d = s.origin_deployment()?;
        let origin = s.origin_of(&d)?;
        let remote = remote_of(&origin)?;
        crate::trust::follow_deployment(&s.sysroot, &s.path, &s.repo, remote, &d)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("the remote's keyring is left as it was: {e:#}");
    }
}

/// Write a new deployment of `csum`: staged on a booted system (finalized at
/// shutdown, so /etc edits made before the reboot are merged), written
/// directly on a non-booted sysroot.
/// Room in /boot is checked by the planner before this; `kargs` needs no
/// check: it redeploys a commit whose kernel and initramfs are in /boot already.
fn write_deployment(
    s: &Session,
    csum: &str,
    origin: &glib::KeyFile,
    kargs: Option<&[&str]>,
    commit: &CommitInfo,
) -> Result<Written> {
    let what = commit.describe();
    let mut written = Written {
        commit: commit.into(),
        staged: false,
        replaced_staged: None,
        restaged: None,
    };
    let merge = s.merge_deployment()?;
    failpoint!("deploy::before-write");
    let opts = ostree::SysrootDeployTreeOpts {
        override_kernel_argv: kargs,
        ..Default::default()
    };
    if s.booted() {
        if let Some(staged) = s.sysroot.staged_deployment() {
            if staged.csum() != csum {
                written.replaced_staged = Some(describe_deployment(&s.repo, &staged));
            } else {
                written.restaged = Some(describe_deployment(&s.repo, &staged));
            }
        }
        s.sysroot
            .stage_tree_with_options(
                Some(STATEROOT),
                csum,
                Some(origin),
                Some(&merge),
                &opts,
                gio::Cancellable::NONE,
            )
            .with_context(|| format!("staging a deployment of {what}"))?;
        failpoint!("deploy::after-stage");
        crate::bootloader::arm(&s.path, &s.repo)
            .context("the deployment is staged, but GRUB's boot counter could not be armed")?;
        written.staged = true;
        return Ok(written);
    }
    crate::bootloader::require_generator(&s.path, &s.repo)?;
    let write = || -> Result<()> {
        let new = s
            .sysroot
            .deploy_tree_with_options(
                Some(STATEROOT),
                csum,
                Some(origin),
                Some(&merge),
                Some(&opts),
                gio::Cancellable::NONE,
            )
            .with_context(|| format!("writing a deployment of {what}"))?;
        failpoint!("deploy::after-deploy-tree");
        s.sysroot
            .simple_write_deployment(
                Some(STATEROOT),
                &new,
                Some(&merge),
                ostree::SysrootSimpleWriteDeploymentFlags::NO_CLEAN,
                gio::Cancellable::NONE,
            )
            .with_context(|| boot_config_failed("the new boot configuration", &s.path))
    };
    write().map_err(|e| discard_unwritten(&s.path, e))?;
    failpoint!("deploy::after-bootloader-swap");
    crate::bootloader::arm(&s.path, &s.repo)
        .context("the deployment is written, but GRUB's boot counter could not be armed")?;
    crate::bootloader::checkpoint_boot(&s.path)?;
    s.sysroot
        .cleanup(gio::Cancellable::NONE)
        .context("cleaning up old deployments")?;
    Ok(written)
}

/// The new boot configuration, without libostree's cleanup after it: the
/// caller removes what it replaced only once GRUB can see the new one
/// ([`crate::bootloader::checkpoint_boot`]).
fn write_deployments(s: &Session, deployments: &[ostree::Deployment]) -> Result<()> {
    s.sysroot.write_deployments_with_options(
        deployments,
        &ostree::SysrootWriteDeploymentsOpts {
            do_postclean: false,
        },
        gio::Cancellable::NONE,
    )?;
    Ok(())
}

/// What a failed boot configuration write says: libostree runs the GRUB
/// generator in that step, and hides the generator's own output unless
/// `OSTREE_DEBUG_GRUB2` is set.
fn boot_config_failed(what: &str, sysroot: &Path) -> String {
    format!(
        "writing {what} in {}/boot (on a GRUB disk this runs the menu generator, \
         ${}; set OSTREE_DEBUG_GRUB2=1 to see its output)",
        sysroot.display(),
        crate::bootloader::GENERATOR_ENV
    )
}

/// Undo what a failed deployment change left on disk, so a failure changes
/// nothing: libostree keeps a new deployment directory, its kernel copy and a
/// half-written `loader.N` until the next cleanup. Those are exactly what
/// `prepare_cleanup` removes (deployments not in the list, the boot version
/// not in use), and it does not prune the repo, so a pulled commit stays for
/// the next try. It runs on a freshly loaded sysroot: the session's object
/// may not have seen how far the write got (a reload is skipped when
/// `ostree/deploy` kept its mtime), and cleaning by a stale list could remove
/// what was just swapped in.
fn discard_unwritten(sysroot: &Path, err: anyhow::Error) -> anyhow::Error {
    let fresh = ostree::Sysroot::new(Some(&gio::File::for_path(sysroot)));
    let cleaned = fresh
        .load(gio::Cancellable::NONE)
        .and_then(|()| fresh.prepare_cleanup(gio::Cancellable::NONE));
    match cleaned {
        Ok(()) => err,
        Err(e) => {
            let cleanup = if sysroot == Path::new("/") {
                "host cleanup".to_string()
            } else {
                format!("host cleanup --sysroot {}", sysroot.display())
            };
            anyhow!(
                "{err:#}\nremoving what the failed write left in {} failed too ({e}); \
                 `{cleanup}` removes it",
                sysroot.display()
            )
        }
    }
}

/// `host upgrade`: fetch the origin ref's head and deploy it.
pub fn upgrade(
    target: &SysrootTarget,
    opts: &UpgradeOptions,
    obs: &mut dyn Observer,
) -> Result<UpdateReport> {
    let mut report = new_report();
    let s = Session::begin(target, "upgrade", obs)?;
    let snap = s.snapshot()?;
    let origin = s.origin_of(&s.origin_deployment()?)?;
    let remote = remote_of(&origin)?;
    if let Some(c) = &origin.override_commit {
        obs.step(&Step::Unpins {
            commit: c.clone(),
            refspec: origin.refspec.clone(),
        });
        report.unpinned = Some(c.clone());
    }
    if !opts.cache_only {
        let stats = pull_observed(
            &s,
            &PullRequest {
                remote,
                ref_: &origin.ref_,
                commit: None,
                commit_only: opts.check,
                depth: 0,
            },
            Fetch::Ref {
                refspec: origin.refspec.clone(),
            },
            opts.progress,
            obs,
        )?;
        failpoint!("pull::after-pull");
        fetched(&mut report, stats, obs);
    }
    let new_csum = s
        .repo
        .resolve_rev(&origin.refspec, true)
        .with_context(|| format!("resolving {}", origin.refspec))?
        .ok_or_else(|| {
            anyhow!(
                "{} has not been downloaded yet: run `host upgrade --download-only` first",
                origin.refspec
            )
        })?
        .to_string();
    let new = CommitInfo::load(&s.repo, &new_csum)?;
    let writes = !opts.check && !opts.download_only;
    // Only `--cache-only` can find the commit incomplete (a pull fetches it all).
    let partial = opts.cache_only && !opts.check && {
        let (_, state) = s.repo.load_commit(&new_csum)?;
        state.contains(ostree::RepoCommitState::PARTIAL)
    };
    let boot = if writes && !partial {
        measure_boot(&s, &new_csum)?
    } else {
        None
    };
    let req = Request::Upgrade {
        origin: origin.clone(),
        target: new,
    };
    let plan_opts = PlanOptions {
        allow_downgrade: opts.allow_downgrade,
        stage: writes,
    };
    // Read under the sysroot lock held until the deployment is written.
    let bad = bad_commits(opts.bad_commits.as_deref());
    let Some(plan) = plan_update(&snap, &req, &plan_opts, &bad, boot.as_ref(), &mut report)? else {
        return Ok(report);
    };
    planned(
        &mut report,
        ChangeKind::Upgrade,
        &origin.refspec,
        &plan,
        obs,
    );
    if opts.check {
        report.result = UpdateResult::UpdateAvailable;
        return Ok(report);
    }
    if partial {
        bail!(
            "commit {} is only partly downloaded: run `host upgrade --download-only` first",
            short(&new_csum)
        );
    }
    if opts.download_only {
        report.result = UpdateResult::Downloaded;
        return Ok(report);
    }
    stage(&s, &plan, &mut report)?;
    Ok(report)
}

/// Find a commit of `remote:ref`'s history by version or checksum (prefix).
fn find_in_history(s: &Session, refspec: &str, wanted: &str) -> Result<CommitInfo> {
    let head = s
        .repo
        .resolve_rev(refspec, false)
        .with_context(|| format!("resolving {refspec}"))?
        .map(|c| c.to_string())
        .ok_or_else(|| anyhow!("{refspec} does not exist"))?;
    let mut next = Some(head);
    let mut seen = Vec::new();
    while let Some(csum) = next {
        let Ok((commit, _)) = s.repo.load_commit(&csum) else {
            break;
        };
        let info = CommitInfo::from_variant(&csum, &commit);
        let hex = wanted.len() >= 8 && wanted.chars().all(|c| c.is_ascii_hexdigit());
        if info.version.as_deref() == Some(wanted) || (hex && csum.starts_with(wanted)) {
            return Ok(info);
        }
        seen.push(
            info.version
                .clone()
                .unwrap_or_else(|| short(&csum).to_string()),
        );
        next = info.parent.clone();
    }
    bail!(
        "no commit with version or checksum `{wanted}` in the history of {refspec} (versions seen: {})",
        if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
    )
}

/// `host deploy VERSION|CHECKSUM`: deploy one commit from the origin ref's history.
pub fn deploy(
    target: &SysrootTarget,
    wanted: &str,
    progress: bool,
    obs: &mut dyn Observer,
) -> Result<UpdateReport> {
    let mut report = new_report();
    let s = Session::begin(target, "deploy", obs)?;
    let snap = s.snapshot()?;
    let origin = s.origin_of(&s.origin_deployment()?)?;
    let remote = remote_of(&origin)?;
    pull_observed(
        &s,
        &PullRequest {
            remote,
            ref_: &origin.ref_,
            commit: None,
            commit_only: true,
            depth: -1,
        },
        Fetch::History {
            refspec: origin.refspec.clone(),
        },
        progress,
        obs,
    )?;
    let found = find_in_history(&s, &origin.refspec, wanted)?;
    let req = Request::Deploy {
        origin: origin.clone(),
        target: found.clone(),
    };
    // Planned before the download too: a no-op or refused commit is not fetched.
    let peek = PlanOptions::default();
    if plan_update(&snap, &req, &peek, &[], None, &mut report)?.is_none() {
        return Ok(report);
    }
    let stats = pull_observed(
        &s,
        &PullRequest {
            remote,
            ref_: &origin.ref_,
            commit: Some(&found.checksum),
            commit_only: false,
            depth: 0,
        },
        Fetch::Commit {
            commit: CommitRef::from(&found),
        },
        progress,
        obs,
    )?;
    failpoint!("pull::after-pull");
    fetched(&mut report, stats, obs);
    let boot = measure_boot(&s, &found.checksum)?;
    let plan_opts = PlanOptions {
        stage: true,
        ..Default::default()
    };
    let Some(plan) = plan_update(&snap, &req, &plan_opts, &[], boot.as_ref(), &mut report)? else {
        return Ok(report);
    };
    planned(&mut report, ChangeKind::Deploy, &origin.refspec, &plan, obs);
    stage(&s, &plan, &mut report)?;
    Ok(report)
}

/// `host switch REMOTE:REF`: move the node to another ref (and remote).
pub fn switch(
    target: &SysrootTarget,
    refspec: &str,
    progress: bool,
    obs: &mut dyn Observer,
) -> Result<UpdateReport> {
    let mut report = new_report();
    let (remote, ref_) = split_refspec(refspec);
    let remote = remote.ok_or_else(|| {
        anyhow!("`{refspec}` is not REMOTE:REF (for example cairn:cairn/bookworm/x86_64/container-host)")
    })?;
    let s = Session::begin(target, "switch", obs)?;
    s.require_remote(&remote)?;
    let snap = s.snapshot()?;
    let stats = pull_observed(
        &s,
        &PullRequest {
            remote: &remote,
            ref_: &ref_,
            commit: None,
            commit_only: false,
            depth: 0,
        },
        Fetch::Ref {
            refspec: refspec.to_string(),
        },
        progress,
        obs,
    )?;
    failpoint!("pull::after-pull");
    fetched(&mut report, stats, obs);
    let new_csum = s
        .repo
        .resolve_rev(refspec, false)?
        .ok_or_else(|| anyhow!("{refspec} did not resolve after pulling it"))?
        .to_string();
    let new = CommitInfo::load(&s.repo, &new_csum)?;
    let boot = measure_boot(&s, &new_csum)?;
    let req = Request::Switch {
        refspec: refspec.to_string(),
        target: new,
    };
    let plan_opts = PlanOptions {
        stage: true,
        ..Default::default()
    };
    let Some(plan) = plan_update(&snap, &req, &plan_opts, &[], boot.as_ref(), &mut report)? else {
        return Ok(report);
    };
    planned(&mut report, ChangeKind::Switch, refspec, &plan, obs);
    stage(&s, &plan, &mut report)?;
    Ok(report)
}

/// Makes the deployment updates are based on follow `refspec` (REMOTE:REF)
/// without deploying anything: the next `host upgrade`, or the agent's next
/// check, pulls and stages that ref's head. What a node config's
/// `[update] ref` does at first boot (a channel, say). Returns the refspec
/// it followed before.
pub fn follow(target: &SysrootTarget, refspec: &str, obs: &mut dyn Observer) -> Result<String> {
    let (remote, _) = split_refspec(refspec);
    let remote = remote.ok_or_else(|| {
        anyhow!("`{refspec}` is not REMOTE:REF (for example cairn:cairn/bookworm/x86_64/container-host)")
    })?;
    let s = Session::begin(target, "follow", obs)?;
    s.require_remote(&remote)?;
    let d = s.origin_deployment()?;
    let origin = d
        .origin()
        .ok_or_else(|| anyhow!("deployment {} has no origin file", d.csum()))?;
    let before = origin
        .string("origin", "refspec")
        .map(|r| r.to_string())
        .unwrap_or_default();
    origin.set_string("origin", "refspec", refspec);
    // A commit pinned by `host deploy` would keep it from following the ref.
    let _ = origin.remove_key("origin", "override-commit");
    s.sysroot
        .write_origin_file(&d, Some(&origin), gio::Cancellable::NONE)
        .with_context(|| format!("writing the origin of deployment {}", d.csum()))?;
    Ok(before)
}

/// Remote options a new URL keeps: how the remote verifies what it serves
/// and how it reaches its server. Anything else a remote had is dropped
/// with its old URL (a `contenturl`, say, would point at the old server).
const KEPT_REMOTE_OPTIONS: &[&str] = &[
    "gpg-verify",
    "gpg-verify-summary",
    "gpgkeypath",
    "sign-verify",
    "sign-verify-summary",
    "verification-ed25519-file",
    "verification-ed25519-key",
    "tls-permissive",
    "tls-ca-path",
    "tls-client-cert-path",
    "tls-client-key-path",
];

/// Points `remote` at `url`, keeping how it verifies what it serves (its
/// signature settings and trusted keys). What a node config's
/// `[update] url` does at first boot. Returns the URL it had.
pub fn set_remote_url(target: &SysrootTarget, remote: &str, url: &str) -> Result<String> {
    let mut quiet = |_: &crate::report::Step| {};
    let s = Session::begin(target, "set-remote-url", &mut quiet)?;
    s.require_remote(remote)?;
    let before = s
        .repo
        .remote_get_url(remote)
        .map(|u| u.to_string())
        .unwrap_or_default();
    let options = glib::VariantDict::new(None);
    for key in KEPT_REMOTE_OPTIONS {
        if let Ok(Some(value)) = s.repo.remote_option(remote, key, None) {
            options.insert_value(key, &glib::variant::ToVariant::to_variant(value.as_str()));
        }
    }
    s.repo
        .remote_change(
            None::<&gio::File>,
            ostree::RepoRemoteChange::Replace,
            remote,
            Some(url),
            Some(&options.end()),
            gio::Cancellable::NONE,
        )
        .with_context(|| format!("pointing remote {remote} at {url}"))?;
    Ok(before)
}

fn describe_deployment(repo: &ostree::Repo, d: &ostree::Deployment) -> String {
    deployment_ref(repo, 0, d).describe()
}

/// `d` at `index`, with its commit's version when the commit loads.
fn deployment_ref(repo: &ostree::Repo, index: usize, d: &ostree::Deployment) -> DeploymentRef {
    DeploymentRef {
        index,
        checksum: d.csum().to_string(),
        serial: d.deployserial(),
        version: CommitInfo::load(repo, &d.csum())
            .ok()
            .and_then(|c| c.version),
    }
}

/// `host rollback`: the previous deployment boots next; twice goes back.
/// A staged deployment is dropped (with a warning): the booted one stays.
pub fn rollback(target: &SysrootTarget, obs: &mut dyn Observer) -> Result<RollbackReport> {
    let s = Session::begin(target, "rollback", obs)?;
    let roles = Roles::of(&s.sysroot);
    let plan = rollback_plan(&roles).map_err(|e| match e {
        RollbackError::Empty => anyhow!("no deployments in {}", s.path.display()),
        RollbackError::OnlyOne(i) => anyhow!(
            "there is no rollback deployment: {} is the only one",
            describe_deployment(&s.repo, &roles.deployments[i])
        ),
    })?;
    let dropped_staged = plan
        .drops_staged
        .map(|st| deployment_ref(&s.repo, st, &roles.deployments[st]));
    let new_order: Vec<ostree::Deployment> = plan
        .order
        .iter()
        // A new reference to the same object: libostree recognises the booted
        // deployment by identity (`Deployment::clone` would deep-copy it).
        .map(|&i| Clone::clone(&roles.deployments[i]))
        .collect();
    let next = deployment_ref(&s.repo, 0, &new_order[0]);
    crate::bootloader::require_generator(&s.path, &s.repo)?;
    failpoint!("rollback::before-write");
    write_deployments(&s, &new_order)
        .with_context(|| boot_config_failed("the new boot order", &s.path))
        .map_err(|e| discard_unwritten(&s.path, e))?;
    failpoint!("rollback::after-write");
    // What boots next has booted before: no counting.
    crate::bootloader::disarm(&s.path, &s.repo)?;
    crate::bootloader::checkpoint_boot(&s.path)?;
    s.sysroot
        .cleanup(gio::Cancellable::NONE)
        .context("cleaning up after the new boot order")?;
    follow_keys_after_write(&s);
    Ok(RollbackReport {
        dropped_staged,
        next,
    })
}

/// The new boot order of a rollback, as indexes into the current list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RollbackPlan {
    pub order: Vec<usize>,
    /// A staged deployment that the new order leaves out.
    pub drops_staged: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RollbackError {
    Empty,
    /// Only this deployment (of its stateroot): nothing to roll back to.
    OnlyOne(usize),
}

/// What boots next after `host rollback`:
/// - a staged deployment exists: it is dropped, the booted one stays default;
/// - a written pending deployment boots next: the booted one becomes default again;
/// - otherwise the rollback deployment (first after the booted/default one, same
///   stateroot) swaps places with the current one; a second rollback swaps back.
pub(crate) fn rollback_plan(roles: &Roles) -> Result<RollbackPlan, RollbackError> {
    let n = roles.deployments.len();
    if let Some(st) = roles.staged {
        let order: Vec<usize> = (0..n).filter(|&i| i != st).collect();
        if order.is_empty() {
            return Err(RollbackError::Empty);
        }
        return Ok(RollbackPlan {
            order,
            drops_staged: Some(st),
        });
    }
    if let Some(b) = roles.booted.filter(|&b| b > 0) {
        let order = std::iter::once(b)
            .chain((0..n).filter(|&i| i != b))
            .collect();
        return Ok(RollbackPlan {
            order,
            drops_staged: None,
        });
    }
    let cur = roles.current.ok_or(RollbackError::Empty)?;
    let rb = roles.rollback().ok_or(RollbackError::OnlyOne(cur))?;
    let order = [rb, cur]
        .into_iter()
        .chain((0..n).filter(|&i| i != rb && i != cur))
        .collect();
    Ok(RollbackPlan {
        order,
        drops_staged: None,
    })
}

#[derive(Debug, Clone, Default)]
pub struct CleanupOptions {
    /// Remove deployments that would boot next instead of the booted one.
    pub pending: bool,
    /// Remove the (unpinned) deployments after the booted/default one.
    pub rollback: bool,
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// `host cleanup`: drop pending and/or rollback deployments, then remove
/// deployment directories, /boot files and repo objects nothing refers to.
pub fn cleanup(
    target: &SysrootTarget,
    opts: &CleanupOptions,
    obs: &mut dyn Observer,
) -> Result<CleanupReport> {
    let s = Session::begin(target, "cleanup", obs)?;
    let roles = Roles::of(&s.sysroot);
    let rollback_from = roles.current.map(|c| c + 1).unwrap_or(usize::MAX);
    let cur_os = roles.current.map(|c| roles.deployments[c].osname());
    let mut keep = Vec::new();
    let mut entries = Vec::new();
    let mut removed = 0;
    for (i, d) in roles.deployments.iter().enumerate() {
        let pending = opts.pending && roles.is_pending(i);
        let rollback =
            opts.rollback && i >= rollback_from && Some(d.osname()) == cur_os && !d.is_pinned();
        if opts.rollback && i >= rollback_from && d.is_pinned() {
            entries.push(CleanupEntry {
                action: CleanupAction::KeptPinned,
                deployment: deployment_ref(&s.repo, i, d),
            });
        }
        if pending || rollback {
            entries.push(CleanupEntry {
                action: if pending {
                    CleanupAction::RemovedPending
                } else {
                    CleanupAction::RemovedRollback
                },
                deployment: deployment_ref(&s.repo, i, d),
            });
            removed += 1;
        } else {
            keep.push(Clone::clone(d)); // same object, not a deep copy
        }
    }
    let not_booted = (opts.pending && roles.booted.is_none()).then(|| s.path.display().to_string());
    if removed > 0 {
        crate::bootloader::require_generator(&s.path, &s.repo)?;
        failpoint!("cleanup::before-write");
        write_deployments(&s, &keep)
            .with_context(|| boot_config_failed("the remaining deployments", &s.path))
            .map_err(|e| discard_unwritten(&s.path, e))?;
        if let (Some(b), Some(first)) = (roles.booted, keep.first()) {
            if roles.deployments[b].equal(first) {
                // The unproven deployment is gone: the booted one boots next.
                crate::bootloader::disarm(&s.path, &s.repo)?;
            }
        }
    }
    crate::bootloader::checkpoint_boot(&s.path)?;
    failpoint!("cleanup::before-prune");
    let objects = s.path.join("ostree/repo/objects");
    let before = dir_size(&objects);
    s.sysroot
        .cleanup(gio::Cancellable::NONE)
        .context("removing unused deployments and pruning the repo")?;
    let after = dir_size(&objects);
    Ok(CleanupReport {
        deployments: entries,
        not_booted,
        freed_bytes: before.saturating_sub(after),
        changed: removed > 0 || before != after,
    })
}

/// `host pin INDEX [--unpin]`: keep a deployment through upgrades and cleanups.
pub fn pin(
    target: &SysrootTarget,
    index: usize,
    pinned: bool,
    obs: &mut dyn Observer,
) -> Result<PinReport> {
    let s = Session::begin(target, "pin", obs)?;
    let ds = s.sysroot.deployments();
    let d = ds.get(index).ok_or_else(|| {
        anyhow!(
            "no deployment {index}: there are {} (see `host status`)",
            ds.len()
        )
    })?;
    let mut report = PinReport {
        deployment: deployment_ref(&s.repo, index, d),
        pinned,
        changed: false,
    };
    if d.is_pinned() == pinned {
        return Ok(report);
    }
    failpoint!("pin::before-write");
    s.sysroot
        .deployment_set_pinned(d, pinned)
        .with_context(|| format!("changing the pin of deployment {index}"))?;
    report.changed = true;
    Ok(report)
}

/// Kernel argument edits, applied in order: delete, replace, append.
#[derive(Debug, Clone, Default)]
pub struct KargsEdit {
    pub append: Vec<String>,
    pub delete: Vec<String>,
    pub replace: Vec<String>,
}

impl KargsEdit {
    pub fn is_empty(&self) -> bool {
        self.append.is_empty() && self.delete.is_empty() && self.replace.is_empty()
    }

    /// Apply to a kernel command line; `ostree=` is libostree's and left alone.
    pub fn apply(&self, current: &str) -> Result<Vec<String>> {
        let ka = ostree::KernelArgs::from_string(current);
        for d in &self.delete {
            ka.delete(d)
                .with_context(|| format!("deleting kernel argument `{d}`: it is not set"))?;
        }
        for r in &self.replace {
            ka.replace(r);
        }
        for a in &self.append {
            ka.append(a);
        }
        Ok(ka.to_strv().iter().map(|s| s.to_string()).collect())
    }
}

/// `host kargs`: the kernel arguments, or deploy the same commit again with
/// edited ones.
pub fn kargs(
    target: &SysrootTarget,
    edit: &KargsEdit,
    obs: &mut dyn Observer,
) -> Result<KargsReport> {
    if edit.is_empty() {
        let sysroot = target.open()?;
        let d = sysroot
            .merge_deployment(Some(STATEROOT))
            .ok_or_else(|| anyhow!("no `{STATEROOT}` deployment in {}", target.path().display()))?;
        let options = d
            .bootconfig()
            .and_then(|b| b.get("options"))
            .unwrap_or_default()
            .to_string();
        return Ok(KargsReport::Current { options });
    }
    let s = Session::begin(target, "kargs", obs)?;
    // Edit what boots next: a staged deployment (kept, restaged with the new
    // arguments) or the booted/default one.
    let merge = match s.sysroot.staged_deployment() {
        Some(staged) => staged,
        None => s.merge_deployment()?,
    };
    let current = merge
        .bootconfig()
        .and_then(|b| b.get("options"))
        .map(|o| o.to_string())
        .unwrap_or_default();
    let new = edit.apply(&current)?;
    let current_list: Vec<&str> = current.split_whitespace().collect();
    if new
        .iter()
        .map(String::as_str)
        .eq(current_list.iter().copied())
    {
        return Ok(KargsReport::Unchanged);
    }
    let refs: Vec<&str> = new.iter().map(String::as_str).collect();
    let origin = merge
        .origin()
        .ok_or_else(|| anyhow!("deployment {} has no origin", merge.csum()))?;
    let info = CommitInfo::load(&s.repo, &merge.csum())?;
    let written = write_deployment(&s, &merge.csum(), &origin, Some(&refs), &info)?;
    Ok(KargsReport::Deployed {
        kargs: new,
        written,
    })
}

/// `--reboot` only makes sense on the running system.
pub fn ensure_can_reboot(target: &SysrootTarget) -> Result<()> {
    let sysroot = target.open()?;
    if sysroot.booted_deployment().is_none() {
        bail!(
            "--reboot needs a booted cairn system; {} is not the running system",
            target.path().display()
        );
    }
    Ok(())
}

/// Reboot the running system (through systemd, so staged deployments are finalized).
pub fn reboot() -> Result<()> {
    let status = std::process::Command::new("systemctl")
        .arg("reboot")
        .status()
        .context("running `systemctl reboot`")?;
    if !status.success() {
        bail!("`systemctl reboot` failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(i: i32, os: &str) -> ostree::Deployment {
        let csum = format!("{i:064x}");
        let d = ostree::Deployment::new(i, os, &csum, 0, Some(&csum), 0);
        // libostree compares deployments' boot configs too (as loaded ones have).
        let bootconfig = ostree::BootconfigParser::new();
        bootconfig.set("options", "rw");
        d.set_bootconfig(Some(&bootconfig));
        d
    }

    fn roles(oses: &[&str], booted: Option<usize>, staged: Option<usize>) -> Roles {
        let ds: Vec<_> = oses
            .iter()
            .enumerate()
            .map(|(i, os)| deployment(i as i32, os))
            .collect();
        let b = booted.map(|i| ds[i].clone());
        Roles::from_parts(ds, b.as_ref(), staged)
    }

    #[test]
    fn rollback_on_a_disk_swaps_the_first_two_and_back() {
        let r = roles(&["cairn", "cairn", "cairn"], None, None);
        assert_eq!(rollback_plan(&r).unwrap().order, [1, 0, 2]);
    }

    #[test]
    fn rollback_on_a_booted_node_boots_the_previous_one() {
        let r = roles(&["cairn", "cairn"], Some(0), None);
        let plan = rollback_plan(&r).unwrap();
        assert_eq!(plan.order, [1, 0]);
        assert_eq!(plan.drops_staged, None);
    }

    #[test]
    fn rollback_with_a_pending_deployment_boots_the_booted_one_again() {
        // 0 was written (not staged) after booting 1.
        let r = roles(&["cairn", "cairn", "cairn"], Some(1), None);
        assert!(r.is_pending(0));
        assert_eq!(r.rollback(), Some(2));
        assert_eq!(rollback_plan(&r).unwrap().order, [1, 0, 2]);
    }

    #[test]
    fn rollback_with_a_staged_deployment_drops_it_and_says_which() {
        let r = roles(&["cairn", "cairn", "cairn"], Some(1), Some(0));
        let plan = rollback_plan(&r).unwrap();
        assert_eq!(plan.order, [1, 2]);
        assert_eq!(plan.drops_staged, Some(0));
    }

    #[test]
    fn rollback_skips_other_stateroots_and_needs_a_second_deployment() {
        let r = roles(&["cairn", "other", "cairn"], None, None);
        assert_eq!(rollback_plan(&r).unwrap().order, [2, 0, 1]);
        let r = roles(&["cairn", "other"], None, None);
        assert_eq!(rollback_plan(&r), Err(RollbackError::OnlyOne(0)));
        assert_eq!(
            rollback_plan(&roles(&[], None, None)),
            Err(RollbackError::Empty)
        );
    }

    #[test]
    fn kargs_edits_apply_in_order() {
        let edit = KargsEdit {
            append: vec!["quiet".into()],
            delete: vec!["console=ttyS0".into()],
            replace: vec!["root=LABEL=newroot".into()],
        };
        let out = edit
            .apply("root=LABEL=root rw console=ttyS0 ostree=/ostree/boot.1/cairn/x/0")
            .unwrap();
        assert_eq!(
            out,
            [
                "root=LABEL=newroot",
                "rw",
                "ostree=/ostree/boot.1/cairn/x/0",
                "quiet"
            ]
        );
    }

    #[test]
    fn deleting_a_missing_karg_is_an_error() {
        let edit = KargsEdit {
            delete: vec!["nosuch=1".into()],
            ..Default::default()
        };
        let err = edit.apply("rw").unwrap_err();
        assert!(format!("{err:#}").contains("nosuch=1"), "{err:#}");
    }
}
