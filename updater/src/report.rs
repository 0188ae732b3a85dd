//! What the operations return: typed reports, for the caller to render (the
//! `host` binary shows them as text or JSON; the agent logs them). The
//! library itself prints nothing. Steps that are worth showing while an
//! operation still runs (waiting for the lock, a pull starting, the change
//! about to be written) go to an [`Observer`] the caller supplies.

use serde::Serialize;

use crate::commit::{format_timestamp, short, CommitInfo};
use crate::pull::PullStats;
use cairn_contracts::packages::PackageDiff;

/// How an operation ended, for exit codes and follow-ups (reboot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do: already on that commit.
    Unchanged,
    /// `--check`: an update exists, nothing was downloaded or deployed.
    UpdateAvailable { checksum: String },
    /// `--download-only`: the commit is in the local repo, not deployed.
    Downloaded { checksum: String },
    /// A new deployment boots next. `staged`: finalized at shutdown.
    Deployed { checksum: String, staged: bool },
}

/// The facts about a commit that reports carry (not its package list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitRef {
    pub checksum: String,
    pub version: Option<String>,
    /// Seconds since the epoch.
    pub timestamp: u64,
}

impl CommitRef {
    /// "1.2 (abcdef012345)" or just the short checksum.
    pub fn describe(&self) -> String {
        crate::commit::describe(self.version.as_deref(), &self.checksum)
    }

    pub fn timestamp_rfc3339(&self) -> String {
        format_timestamp(self.timestamp)
    }
}

impl From<&CommitInfo> for CommitRef {
    fn from(c: &CommitInfo) -> Self {
        CommitRef {
            checksum: c.checksum.clone(),
            version: c.version.clone(),
            timestamp: c.timestamp,
        }
    }
}

/// One deployment, as status numbers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentRef {
    pub index: usize,
    pub checksum: String,
    pub serial: i32,
    /// Its commit's version, when the commit could be loaded.
    pub version: Option<String>,
}

impl DeploymentRef {
    /// "1.2 (abcdef012345).0", as `host status` names a deployment.
    pub fn describe(&self) -> String {
        match &self.version {
            Some(v) => format!("{v} ({}).{}", short(&self.checksum), self.serial),
            None => format!("{}.{}", short(&self.checksum), self.serial),
        }
    }
}

/// Which operation planned a change (it decides the heading of the change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ChangeKind {
    Upgrade,
    Deploy,
    Switch,
}

/// What a deployment about to be written changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    pub kind: ChangeKind,
    /// The ref followed (upgrade, deploy) or switched to.
    pub refspec: String,
    pub from: CommitRef,
    pub to: CommitRef,
    /// When both commits list their packages.
    pub packages: Option<PackageDiff>,
}

impl Change {
    pub fn new(kind: ChangeKind, refspec: &str, from: &CommitInfo, to: &CommitInfo) -> Self {
        Change {
            kind,
            refspec: refspec.to_string(),
            from: from.into(),
            to: to.into(),
            packages: (from.has_packages && to.has_packages)
                .then(|| PackageDiff::between(&from.packages, &to.packages)),
        }
    }
}

/// Why an update writes nothing (the planner's verdict).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "camelCase")]
pub enum NoChange {
    /// Upgrade: the ref's head already is booted or boots next.
    Latest { target: CommitRef, refspec: String },
    /// Deploy: that commit already boots next.
    AlreadyDeployed { target: CommitRef },
    /// Switch: already on that ref at its head.
    AlreadyOn { refspec: String, target: CommitRef },
}

/// A step of a running operation, reported as it happens (the report at the
/// end repeats what matters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "camelCase")]
pub enum Step {
    /// Another operation holds the sysroot lock; this one waits for it.
    WaitingForLock,
    /// An upgrade drops the commit pin `host deploy` set on the origin.
    Unpins { commit: String, refspec: String },
    /// A pull starts.
    Fetching { what: Fetch },
    /// A pull ended.
    Fetched { stats: PullStats },
    /// The planned change, before anything is written.
    Planned { change: Change },
}

/// What a pull fetches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Fetch {
    /// The head of a ref.
    Ref { refspec: String },
    /// The commit history of a ref (metadata only).
    History { refspec: String },
    /// One commit.
    Commit { commit: CommitRef },
}

/// Receives the [`Step`]s of an operation while it runs.
pub trait Observer {
    fn step(&mut self, step: &Step);
}

impl<F: FnMut(&Step)> Observer for F {
    fn step(&mut self, step: &Step) {
        self(step)
    }
}

/// A deployment written by an update, kargs edit or switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Written {
    pub commit: CommitRef,
    /// Staged (finalized at shutdown) rather than written directly.
    pub staged: bool,
    /// A different staged deployment that this one replaced.
    pub replaced_staged: Option<String>,
    /// The same commit was staged already and is staged again.
    pub restaged: Option<String>,
}

/// What `upgrade`, `deploy` or `switch` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateReport {
    /// Upgrade only: the override commit `host deploy` had set, now dropped.
    pub unpinned: Option<String>,
    /// The last pull (the commit itself, not the history lookup).
    pub pulled: Option<PullStats>,
    /// Set when the planner found something to do.
    pub change: Option<Change>,
    /// Kernel arguments the new commit's manifest sets (when they differ).
    pub manifest_kargs: Option<Vec<String>>,
    pub result: UpdateResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum UpdateResult {
    Unchanged {
        why: NoChange,
    },
    /// `--check`: `change.to` is available.
    UpdateAvailable,
    /// `--download-only`: `change.to` is in the local repo.
    Downloaded,
    Deployed {
        written: Written,
    },
}

impl UpdateReport {
    pub fn outcome(&self) -> Outcome {
        let target = || {
            self.change
                .as_ref()
                .map(|c| c.to.checksum.clone())
                .unwrap_or_default()
        };
        match &self.result {
            UpdateResult::Unchanged { .. } => Outcome::Unchanged,
            UpdateResult::UpdateAvailable => Outcome::UpdateAvailable { checksum: target() },
            UpdateResult::Downloaded => Outcome::Downloaded { checksum: target() },
            UpdateResult::Deployed { written } => Outcome::Deployed {
                checksum: written.commit.checksum.clone(),
                staged: written.staged,
            },
        }
    }
}

/// What `rollback` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackReport {
    /// A staged deployment that was dropped (it will not be finalized).
    pub dropped_staged: Option<DeploymentRef>,
    /// What boots next now (its index is in the new order).
    pub next: DeploymentRef,
}

impl RollbackReport {
    pub fn outcome(&self) -> Outcome {
        Outcome::Deployed {
            checksum: self.next.checksum.clone(),
            staged: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CleanupAction {
    /// A pinned rollback deployment, kept.
    KeptPinned,
    RemovedPending,
    RemovedRollback,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupEntry {
    pub action: CleanupAction,
    pub deployment: DeploymentRef,
}

/// What `cleanup` did, deployments in their old order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupReport {
    pub deployments: Vec<CleanupEntry>,
    /// `--pending` on a sysroot that is not booted (nothing is pending there).
    pub not_booted: Option<String>,
    /// Bytes the repo prune freed.
    pub freed_bytes: u64,
    /// Something changed on disk.
    pub changed: bool,
}

impl CleanupReport {
    pub fn removed(&self) -> usize {
        self.deployments
            .iter()
            .filter(|e| e.action != CleanupAction::KeptPinned)
            .count()
    }

    pub fn outcome(&self) -> Outcome {
        if self.changed {
            Outcome::Deployed {
                checksum: String::new(),
                staged: false,
            }
        } else {
            Outcome::Unchanged
        }
    }
}

/// What `pin` or `pin --unpin` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PinReport {
    pub deployment: DeploymentRef,
    pub pinned: bool,
    /// False: it already was.
    pub changed: bool,
}

/// What `kargs` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum KargsReport {
    /// No edit: the merge deployment's kernel command line.
    Current {
        options: String,
    },
    Unchanged,
    Deployed {
        kargs: Vec<String>,
        written: Written,
    },
}

impl KargsReport {
    pub fn outcome(&self) -> Outcome {
        match self {
            KargsReport::Current { .. } | KargsReport::Unchanged => Outcome::Unchanged,
            KargsReport::Deployed { written, .. } => Outcome::Deployed {
                checksum: written.commit.checksum.clone(),
                staged: written.staged,
            },
        }
    }
}

/// What `host health check` did after GRUB fell back from a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FallbackReport {
    /// The commit recorded as bad.
    pub bad: String,
    pub reason: String,
    pub rollback: RollbackReport,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(version: &str, n: u8, packages: &[&str]) -> CommitInfo {
        CommitInfo {
            checksum: format!("{n:02x}").repeat(32),
            version: Some(version.into()),
            timestamp: u64::from(n),
            parent: None,
            packages: packages.iter().map(|p| p.to_string()).collect(),
            has_packages: !packages.is_empty(),
            kargs: Vec::new(),
        }
    }

    fn report(change: Option<Change>, result: UpdateResult) -> UpdateReport {
        UpdateReport {
            unpinned: None,
            pulled: None,
            change,
            manifest_kargs: None,
            result,
        }
    }

    #[test]
    fn an_update_report_gives_the_outcome_exit_codes_and_reboots_follow() {
        let (v1, v2) = (commit("1.0", 1, &[]), commit("2.0", 2, &[]));
        let change = Some(Change::new(ChangeKind::Upgrade, "r:x", &v1, &v2));
        let why = NoChange::Latest {
            target: (&v1).into(),
            refspec: "r:x".into(),
        };
        assert_eq!(
            report(None, UpdateResult::Unchanged { why }).outcome(),
            Outcome::Unchanged
        );
        assert_eq!(
            report(change.clone(), UpdateResult::UpdateAvailable).outcome(),
            Outcome::UpdateAvailable {
                checksum: v2.checksum.clone()
            }
        );
        assert_eq!(
            report(change.clone(), UpdateResult::Downloaded).outcome(),
            Outcome::Downloaded {
                checksum: v2.checksum.clone()
            }
        );
        let written = Written {
            commit: (&v2).into(),
            staged: true,
            replaced_staged: None,
            restaged: None,
        };
        assert_eq!(
            report(change, UpdateResult::Deployed { written }).outcome(),
            Outcome::Deployed {
                checksum: v2.checksum,
                staged: true
            }
        );
    }

    #[test]
    fn a_change_diffs_packages_only_when_both_commits_list_them() {
        let (v1, v2) = (commit("1.0", 1, &["a=1"]), commit("2.0", 2, &["a=2"]));
        let c = Change::new(ChangeKind::Deploy, "r:x", &v1, &v2);
        assert_eq!(
            c.packages.map(|d| d.summary()).as_deref(),
            Some("1 upgraded")
        );
        let bare = commit("3.0", 3, &[]);
        assert_eq!(
            Change::new(ChangeKind::Switch, "r:y", &v2, &bare).packages,
            None
        );
    }

    #[test]
    fn names_match_what_status_shows() {
        let c = CommitRef::from(&commit("1.0", 0xab, &[]));
        assert_eq!(c.describe(), "1.0 (abababababab)");
        let d = DeploymentRef {
            index: 1,
            checksum: c.checksum.clone(),
            serial: 2,
            version: None,
        };
        assert_eq!(d.describe(), "abababababab.2");
    }

    #[test]
    fn cleanup_and_kargs_outcomes() {
        let d = DeploymentRef {
            index: 1,
            checksum: "c".repeat(64),
            serial: 0,
            version: None,
        };
        let r = CleanupReport {
            deployments: vec![
                CleanupEntry {
                    action: CleanupAction::KeptPinned,
                    deployment: d.clone(),
                },
                CleanupEntry {
                    action: CleanupAction::RemovedRollback,
                    deployment: d,
                },
            ],
            not_booted: None,
            freed_bytes: 0,
            changed: true,
        };
        assert_eq!(r.removed(), 1);
        assert!(matches!(r.outcome(), Outcome::Deployed { .. }));
        assert_eq!(KargsReport::Unchanged.outcome(), Outcome::Unchanged);
    }

    #[test]
    fn reports_serialize_with_tagged_kinds() {
        let v1 = commit("1.0", 1, &[]);
        let r = report(
            None,
            UpdateResult::Unchanged {
                why: NoChange::AlreadyOn {
                    refspec: "r:x".into(),
                    target: (&v1).into(),
                },
            },
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["result"]["kind"], "unchanged");
        assert_eq!(v["result"]["why"]["reason"], "alreadyOn");
        assert_eq!(v["result"]["why"]["target"]["version"], "1.0");
        assert_eq!(v["manifestKargs"], serde_json::Value::Null);
        let step = serde_json::to_value(Step::Fetching {
            what: Fetch::History {
                refspec: "r:x".into(),
            },
        })
        .unwrap();
        assert_eq!(step["step"], "fetching");
        assert_eq!(step["what"]["kind"], "history");
    }
}
