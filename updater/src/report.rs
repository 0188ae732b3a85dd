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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
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
        match &self.version {
            Some(v) => format!("{v} ({})", short(&self.checksum)),
            None => short(&self.checksum).to_string(),
        }
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

/// An observer that ignores every step.
pub fn quiet() -> impl Observer {
    |_: &Step| {}
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
