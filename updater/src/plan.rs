//! The update planner: what `host upgrade`, `host deploy` and `host switch`
//! (and the agent) would write, decided from plain facts gathered under the
//! sysroot lock. Pure: no libostree sysroot, no root, no I/O, so every case is
//! unit-tested here; `ops` gathers the facts and stages the [`Staging`] it returns.

use std::fmt;
use std::path::PathBuf;

use crate::commit::CommitInfo;
use crate::pull::human_bytes;
use crate::report::NoChange;
use crate::status::Origin;

/// The deployments an update starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The merge deployment's commit (booted, or the default): new deployments
    /// are based on it.
    pub current: CommitInfo,
    /// The merge deployment's kernel command line.
    pub current_kargs: String,
    /// The merge deployment's origin refspec, if it has one.
    pub current_refspec: Option<String>,
    /// The deployment that boots next, when it is not the merge deployment (a
    /// staged or pending one, possibly newer than the booted one).
    pub next: Option<CommitInfo>,
}

/// What is asked for, with the target commit already resolved (and pulled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Follow `origin`'s ref to its head `target`.
    Upgrade { origin: Origin, target: CommitInfo },
    /// Deploy `target`, one commit of `origin`'s ref history (pins the origin to it).
    Deploy { origin: Origin, target: CommitInfo },
    /// Move to `refspec`, whose head is `target`.
    Switch { refspec: String, target: CommitInfo },
}

impl Request {
    pub fn target(&self) -> &CommitInfo {
        match self {
            Request::Upgrade { target, .. }
            | Request::Deploy { target, .. }
            | Request::Switch { target, .. } => target,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// An upgrade may go to an older commit than the deployed one.
    pub allow_downgrade: bool,
    /// A deployment will be written (not `--check` or `--download-only`):
    /// /boot must have room for it.
    pub stage: bool,
}

/// What the target's kernel and initramfs need in /boot, measured when they
/// are not already there (libostree reuses identical files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootNeed {
    pub dir: PathBuf,
    pub kernel_version: String,
    pub need: u64,
    pub free: u64,
}

/// A planned update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to do, and why.
    Unchanged {
        why: NoChange,
    },
    Stage(Box<Staging>),
}

/// One deployment to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staging {
    pub from: CommitInfo,
    pub to: CommitInfo,
    /// The new deployment's origin.
    pub refspec: String,
    /// Set by `deploy`: the origin stays on this commit through upgrades.
    pub override_commit: Option<String>,
    /// An upgrade of an origin that `deploy` pinned to this commit: upgrading
    /// drops the pin.
    pub unpins: Option<String>,
    /// New kernel arguments when the manifests' `cairn.kargs` differ; `None`
    /// keeps the merge deployment's.
    pub kargs: Option<Vec<String>>,
}

/// Why an update is refused. Nothing has been written when one is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// An upgrade to a commit older than the newest deployed one.
    Downgrade {
        refspec: String,
        to: Box<CommitInfo>,
        newest: Box<CommitInfo>,
    },
    /// The commit failed its health checks on this node.
    BadCommit { commit: Box<CommitInfo> },
    /// /boot cannot hold the target's kernel and initramfs.
    NotEnoughBootSpace { what: String, boot: Box<BootNeed> },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Downgrade {
                refspec,
                to,
                newest,
            } => write!(
                f,
                "{} on {refspec} is older than the deployed {} ({} < {}): refusing to downgrade. \
                 Pass --allow-downgrade if that is intended",
                to.describe(),
                newest.describe(),
                to.timestamp_rfc3339(),
                newest.timestamp_rfc3339()
            ),
            Refusal::BadCommit { commit } => write!(
                f,
                "{} failed its health checks on this node: refusing to stage it again \
                 (it is listed in the bad commits of the health state)",
                commit.describe()
            ),
            Refusal::NotEnoughBootSpace { what, boot } => write!(
                f,
                "not enough space in {}: the kernel and initramfs of {what} (kernel {}) need {}, \
                 only {} is free. Nothing was changed. Free space with `host cleanup -r` \
                 (removes the rollback deployment) and try again",
                boot.dir.display(),
                boot.kernel_version,
                human_bytes(boot.need),
                human_bytes(boot.free)
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Decide an update. Checked in this order: already there (a no-op even for a
/// bad commit: nothing would be written), bad commit, downgrade (upgrades
/// only: `deploy` is how one goes back), room in /boot (only when staging).
pub fn plan(
    snap: &Snapshot,
    req: &Request,
    opts: &PlanOptions,
    bad_commits: &[String],
    boot: Option<&BootNeed>,
) -> Result<Plan, Refusal> {
    let target = req.target();
    let boots_next = target.checksum == snap.current.checksum
        || snap
            .next
            .as_ref()
            .is_some_and(|n| n.checksum == target.checksum);
    let unchanged = match req {
        Request::Upgrade { origin, .. } => boots_next.then(|| NoChange::Latest {
            target: target.into(),
            refspec: origin.refspec.clone(),
        }),
        Request::Deploy { .. } => boots_next.then(|| NoChange::AlreadyDeployed {
            target: target.into(),
        }),
        Request::Switch { refspec, .. } => (boots_next
            && snap.current_refspec.as_deref() == Some(refspec.as_str()))
        .then(|| NoChange::AlreadyOn {
            refspec: refspec.clone(),
            target: target.into(),
        }),
    };
    if let Some(why) = unchanged {
        return Ok(Plan::Unchanged { why });
    }
    if bad_commits.contains(&target.checksum) {
        return Err(Refusal::BadCommit {
            commit: Box::new(target.clone()),
        });
    }
    if let Request::Upgrade { origin, .. } = req {
        // What boots next may be newer than the booted commit.
        let newest = match &snap.next {
            Some(n) if n.timestamp > snap.current.timestamp => n,
            _ => &snap.current,
        };
        if target.timestamp < newest.timestamp && !opts.allow_downgrade {
            return Err(Refusal::Downgrade {
                refspec: origin.refspec.clone(),
                to: Box::new(target.clone()),
                newest: Box::new(newest.clone()),
            });
        }
    }
    if opts.stage {
        if let Some(b) = boot.filter(|b| b.free < b.need) {
            return Err(Refusal::NotEnoughBootSpace {
                what: target.describe(),
                boot: Box::new(b.clone()),
            });
        }
    }
    let (refspec, override_commit, unpins) = match req {
        Request::Upgrade { origin, .. } => {
            (origin.refspec.clone(), None, origin.override_commit.clone())
        }
        Request::Deploy { origin, target } => {
            (origin.refspec.clone(), Some(target.checksum.clone()), None)
        }
        Request::Switch { refspec, .. } => (refspec.clone(), None, None),
    };
    Ok(Plan::Stage(Box::new(Staging {
        kargs: kargs_for_update(&snap.current_kargs, &snap.current, target),
        from: snap.current.clone(),
        to: target.clone(),
        refspec,
        override_commit,
        unpins,
    })))
}

/// Kernel arguments for a deployment of `to` based on one of `from` whose
/// command line is `current`: the arguments `from`'s manifest set
/// (`cairn.kargs`) and `to`'s no longer does are removed, new ones added; the
/// rest (including `host kargs` edits) carries over. `None` when the
/// manifests agree: libostree keeps the merge deployment's arguments.
fn kargs_for_update(current: &str, from: &CommitInfo, to: &CommitInfo) -> Option<Vec<String>> {
    if from.kargs == to.kargs {
        return None;
    }
    let ka = ostree::KernelArgs::from_string(current);
    for gone in from.kargs.iter().filter(|k| !to.kargs.contains(k)) {
        // Already removed by hand (`host kargs --delete`): nothing to do.
        let _ = ka.delete(gone);
    }
    for new in to.kargs.iter().filter(|k| !from.kargs.contains(k)) {
        ka.append(new);
    }
    Some(ka.to_strv().iter().map(|s| s.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REF: &str = "cairn:cairn/test";

    fn commit(version: &str, timestamp: u64) -> CommitInfo {
        CommitInfo {
            checksum: format!("{:0>64}", version.replace('.', "")),
            version: Some(version.into()),
            timestamp,
            parent: None,
            packages: Vec::new(),
            has_packages: false,
            kargs: Vec::new(),
        }
    }

    fn origin(override_commit: Option<&str>) -> Origin {
        Origin {
            refspec: REF.into(),
            remote: Some("cairn".into()),
            ref_: "cairn/test".into(),
            override_commit: override_commit.map(String::from),
        }
    }

    fn on(current: &CommitInfo) -> Snapshot {
        Snapshot {
            current: current.clone(),
            current_kargs: "root=LABEL=root rw".into(),
            current_refspec: Some(REF.into()),
            next: None,
        }
    }

    fn upgrade(target: &CommitInfo) -> Request {
        Request::Upgrade {
            origin: origin(None),
            target: target.clone(),
        }
    }

    fn staging(p: Result<Plan, Refusal>) -> Staging {
        match p {
            Ok(Plan::Stage(s)) => *s,
            other => panic!("expected a staging, got {other:?}"),
        }
    }

    fn stage() -> PlanOptions {
        PlanOptions {
            stage: true,
            ..Default::default()
        }
    }

    #[test]
    fn upgrade_to_a_newer_head_stages_it_on_the_ref() {
        let (v1, v2) = (commit("1.0", 10), commit("2.0", 20));
        let s = staging(plan(&on(&v1), &upgrade(&v2), &stage(), &[], None));
        assert_eq!(s.to, v2);
        assert_eq!(s.from, v1);
        assert_eq!(s.refspec, REF);
        assert_eq!(s.override_commit, None);
        assert_eq!(s.unpins, None);
        assert_eq!(s.kargs, None);
    }

    #[test]
    fn upgrade_to_what_is_booted_or_boots_next_is_unchanged() {
        let (v1, v2) = (commit("1.0", 10), commit("2.0", 20));
        let p = plan(&on(&v1), &upgrade(&v1), &stage(), &[], None).unwrap();
        assert_eq!(
            p,
            Plan::Unchanged {
                why: NoChange::Latest {
                    target: (&v1).into(),
                    refspec: REF.into()
                }
            }
        );
        let mut snap = on(&v1);
        snap.next = Some(v2.clone());
        let p = plan(&snap, &upgrade(&v2), &stage(), &[], None).unwrap();
        assert!(matches!(p, Plan::Unchanged { .. }), "{p:?}");
    }

    #[test]
    fn downgrade_is_refused_unless_allowed_and_compares_with_what_boots_next() {
        let (v1, v2, v3) = (commit("1.0", 10), commit("2.0", 20), commit("3.0", 30));
        // Booted 1.0, 3.0 staged: 2.0 is older than what boots next.
        let mut snap = on(&v1);
        snap.next = Some(v3.clone());
        let err = plan(&snap, &upgrade(&v2), &stage(), &[], None).unwrap_err();
        assert_eq!(
            err,
            Refusal::Downgrade {
                refspec: REF.into(),
                to: Box::new(v2.clone()),
                newest: Box::new(v3.clone())
            }
        );
        assert!(err.to_string().contains("refusing to downgrade"), "{err}");
        assert!(err.to_string().contains("--allow-downgrade"), "{err}");
        let opts = PlanOptions {
            allow_downgrade: true,
            stage: true,
        };
        assert_eq!(staging(plan(&snap, &upgrade(&v2), &opts, &[], None)).to, v2);
    }

    #[test]
    fn deploy_version_pins_the_origin_and_may_go_back() {
        let (v2, v3) = (commit("2.0", 20), commit("3.0", 30));
        let req = Request::Deploy {
            origin: origin(None),
            target: v2.clone(),
        };
        let s = staging(plan(&on(&v3), &req, &stage(), &[], None));
        assert_eq!(s.to, v2);
        assert_eq!(s.refspec, REF);
        assert_eq!(s.override_commit.as_deref(), Some(v2.checksum.as_str()));
        let p = plan(&on(&v2), &req, &stage(), &[], None).unwrap();
        assert_eq!(
            p,
            Plan::Unchanged {
                why: NoChange::AlreadyDeployed {
                    target: (&v2).into()
                }
            }
        );
    }

    #[test]
    fn upgrading_a_pinned_origin_follows_the_ref_again() {
        let (v2, v3) = (commit("2.0", 20), commit("3.0", 30));
        let req = Request::Upgrade {
            origin: origin(Some(&v2.checksum)),
            target: v3.clone(),
        };
        let s = staging(plan(&on(&v2), &req, &stage(), &[], None));
        assert_eq!(s.unpins.as_deref(), Some(v2.checksum.as_str()));
        assert_eq!(s.override_commit, None);
        assert_eq!(s.refspec, REF);
    }

    #[test]
    fn switch_changes_the_origin_and_is_unchanged_only_on_the_same_ref() {
        let (v1, green) = (commit("1.0", 10), commit("green-1", 5));
        let req = Request::Switch {
            refspec: "cairn:cairn/green".into(),
            target: green.clone(),
        };
        // An older commit on another ref is not a downgrade.
        let s = staging(plan(&on(&v1), &req, &stage(), &[], None));
        assert_eq!(s.refspec, "cairn:cairn/green");
        assert_eq!(s.to, green);
        // Same commit, other ref: a new deployment with the new origin.
        let same = Request::Switch {
            refspec: "cairn:cairn/green".into(),
            target: v1.clone(),
        };
        assert!(matches!(
            plan(&on(&v1), &same, &stage(), &[], None),
            Ok(Plan::Stage(_))
        ));
        let mut snap = on(&green);
        snap.current_refspec = Some("cairn:cairn/green".into());
        assert_eq!(
            plan(&snap, &req, &stage(), &[], None).unwrap(),
            Plan::Unchanged {
                why: NoChange::AlreadyOn {
                    refspec: "cairn:cairn/green".into(),
                    target: (&green).into()
                }
            }
        );
    }

    #[test]
    fn a_bad_commit_is_refused_for_every_request_but_is_no_reason_to_fail_a_no_op() {
        let (v1, v2) = (commit("1.0", 10), commit("2.0", 20));
        let bad = [v2.checksum.clone()];
        let requests = [
            upgrade(&v2),
            Request::Deploy {
                origin: origin(None),
                target: v2.clone(),
            },
            Request::Switch {
                refspec: "cairn:cairn/green".into(),
                target: v2.clone(),
            },
        ];
        for req in &requests {
            let err = plan(&on(&v1), req, &stage(), &bad, None).unwrap_err();
            assert_eq!(
                err,
                Refusal::BadCommit {
                    commit: Box::new(v2.clone())
                },
                "{req:?}"
            );
            assert!(err.to_string().contains("health checks"), "{err}");
            // Checking for updates refuses it too: it will never be staged.
            let check = PlanOptions::default();
            assert!(plan(&on(&v1), req, &check, &bad, None).is_err());
        }
        // Already booted (nothing to roll back to): nothing is written.
        let p = plan(&on(&v2), &upgrade(&v2), &stage(), &bad, None).unwrap();
        assert!(matches!(p, Plan::Unchanged { .. }), "{p:?}");
    }

    #[test]
    fn a_full_boot_is_refused_when_staging_only() {
        let (v1, v2) = (commit("1.0", 10), commit("2.0", 20));
        let boot = BootNeed {
            dir: "/sysroot/boot".into(),
            kernel_version: "6.1.0".into(),
            need: 400 * 1024,
            free: 256 * 1024,
        };
        let err = plan(&on(&v1), &upgrade(&v2), &stage(), &[], Some(&boot)).unwrap_err();
        assert_eq!(
            err,
            Refusal::NotEnoughBootSpace {
                what: v2.describe(),
                boot: Box::new(boot.clone())
            }
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("not enough space in /sysroot/boot"),
            "{msg}"
        );
        assert!(msg.contains("host cleanup -r"), "{msg}");
        // `--check` and `--download-only` write nothing to /boot.
        let check = PlanOptions::default();
        assert!(plan(&on(&v1), &upgrade(&v2), &check, &[], Some(&boot)).is_ok());
        let roomy = BootNeed {
            free: boot.need,
            ..boot
        };
        assert!(plan(&on(&v1), &upgrade(&v2), &stage(), &[], Some(&roomy)).is_ok());
    }

    #[test]
    fn manifest_kargs_changes_are_applied_and_hand_edits_kept() {
        let mut v1 = commit("1.0", 10);
        v1.kargs = vec!["quiet".into(), "mitigations=auto".into()];
        let mut v2 = commit("2.0", 20);
        v2.kargs = vec!["quiet".into(), "iommu=pt".into()];
        let mut snap = on(&v1);
        snap.current_kargs = "root=LABEL=root rw quiet mitigations=auto console=ttyS0".into();
        let s = staging(plan(&snap, &upgrade(&v2), &stage(), &[], None));
        assert_eq!(
            s.kargs.unwrap(),
            [
                "root=LABEL=root",
                "rw",
                "quiet",
                "console=ttyS0",
                "iommu=pt"
            ]
        );
    }
}
