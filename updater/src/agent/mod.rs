//! `host agent`: automatic updates, as an explicit state machine.
//!
//! ```text
//!  Idle ─► Checking ─► UpToDate ─────────────────────────────► (next check)
//!              │   └─► UpdateAvailable   (policy check) ──────► (next check)
//!              └─────► Staged ─┬───────────────────────────────► (policy stage: next check)
//!                              ├─► WaitingForWindow ─┐
//!                              ├─► WaitingForLock ◄──┤ (fleet-lock; retried)
//!                              └─► Rebooting ◄───────┘
//!  any failure ─► Failed ─► Checking
//! ```
//!
//! Every transition goes through [`Machine::go`], which refuses the ones not
//! drawn above. Side effects (checking and staging through the updater
//! library, the clock, FleetLock, rebooting) sit behind [`Env`], so the
//! machine is tested with a recording fake and run for real by [`NodeEnv`].
//! The state is persisted (`/var/lib/cairn/agent/state.json`) so `host status`
//! can show it and a reboot into the new deployment can release its
//! FleetLock slot.

pub mod config;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use config::{AgentConfig, Policy, Strategy};

use crate::fleetlock::{self, Answer};
use crate::status::AgentSummary;
use crate::sysroot::SysrootTarget;

pub const STATE_FILE: &str = "/var/lib/cairn/agent/state.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum State {
    Idle,
    Checking,
    UpToDate,
    UpdateAvailable { checksum: String },
    Staged { checksum: String },
    WaitingForWindow { checksum: String },
    WaitingForLock { checksum: String },
    Rebooting { checksum: String },
    Failed { error: String },
}

impl State {
    fn kind(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Checking => "checking",
            State::UpToDate => "up-to-date",
            State::UpdateAvailable { .. } => "update-available",
            State::Staged { .. } => "staged",
            State::WaitingForWindow { .. } => "waiting-for-window",
            State::WaitingForLock { .. } => "waiting-for-lock",
            State::Rebooting { .. } => "rebooting",
            State::Failed { .. } => "failed",
        }
    }
}

/// The transitions the diagram allows.
pub fn allowed(from: &State, to: &State) -> bool {
    use State::*;
    matches!(
        (from, to),
        (
            Idle | UpToDate | UpdateAvailable { .. } | Staged { .. } | Failed { .. },
            Checking
        ) | (Checking, UpToDate | UpdateAvailable { .. } | Staged { .. })
            | (
                Staged { .. },
                WaitingForWindow { .. } | WaitingForLock { .. } | Rebooting { .. }
            )
            | (
                WaitingForWindow { .. },
                WaitingForLock { .. } | Rebooting { .. } | Checking
            )
            | (
                WaitingForLock { .. },
                WaitingForLock { .. } | Rebooting { .. } | Checking
            )
            | (_, Failed { .. })
            | (_, Idle)
    )
}

/// What a check or stage found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Nothing,
    Available { checksum: String },
    Staged { checksum: String },
}

/// The world the machine acts on.
pub trait Env {
    fn now(&self) -> DateTime<Utc>;
    /// Look for an update; with `stage`, download and stage it.
    fn check(&mut self, stage: bool) -> Result<Found>;
    fn fleet_lock(&mut self) -> Result<Answer>;
    /// Reboot, with `record` saved first: systemd stops the agent as soon as
    /// the reboot is asked for, and the next boot must find the record
    /// saying which commit it rebooted for and that it holds the slot.
    fn reboot(&mut self, record: &Record) -> Result<()>;
    /// A random extra wait in `0..=max` (jitter spreads a fleet's checks).
    fn jitter(&mut self, max: Duration) -> Duration;
}

/// Persisted with the state for `host status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub state: State,
    pub policy: Policy,
    pub last_check: Option<DateTime<Utc>>,
    pub last_result: Option<String>,
    pub next_step: Option<DateTime<Utc>>,
    pub next_window: Option<DateTime<Utc>>,
    /// FleetLock slot taken before the reboot, released once the new boot is up.
    pub holds_fleet_lock: bool,
    /// The commit the slot was taken for: released only once that commit is
    /// the booted one and passed its health checks.
    #[serde(default)]
    pub lock_for: Option<String>,
}

pub struct Machine {
    pub config: AgentConfig,
    pub record: Record,
}

/// The longest wait between two requests for a fleet lock that was denied
/// (shorter when the check interval is shorter).
const LOCK_RETRY: Duration = Duration::from_secs(300);

/// How often a slot that should be given back is offered again while the
/// FleetLock server cannot be reached.
const RELEASE_RETRY: Duration = Duration::from_secs(30);

impl Machine {
    pub fn new(config: AgentConfig, previous: Option<Record>) -> Machine {
        let mut record = previous.unwrap_or(Record {
            state: State::Idle,
            policy: config.policy,
            last_check: None,
            last_result: None,
            next_step: None,
            next_window: None,
            holds_fleet_lock: false,
            lock_for: None,
        });
        record.policy = config.policy;
        Machine { config, record }
    }

    pub fn state(&self) -> &State {
        &self.record.state
    }

    fn go(&mut self, to: State) -> Result<()> {
        if !allowed(&self.record.state, &to) {
            bail!(
                "agent: transition {} -> {} is not allowed",
                self.record.state.kind(),
                to.kind()
            );
        }
        tracing::info!("agent: {} -> {}", self.record.state.kind(), to.kind());
        self.record.state = to;
        Ok(())
    }

    fn next_check(&self, env: &mut dyn Env) -> Duration {
        self.config.interval + env.jitter(self.config.jitter)
    }

    fn lock_retry(&self, env: &mut dyn Env) -> Duration {
        self.config.interval.min(LOCK_RETRY) + env.jitter(self.config.jitter)
    }

    /// Runs the machine until it has to wait; returns how long (None: it is done, e.g. rebooting or off).
    pub fn step(&mut self, env: &mut dyn Env) -> Result<Option<Duration>> {
        if self.config.policy == Policy::Off {
            if self.record.state != State::Idle {
                self.go(State::Idle)?;
            }
            return Ok(None);
        }
        match self.record.state.clone() {
            State::Staged { checksum } if self.config.policy == Policy::Apply => {
                self.apply(env, checksum)
            }
            State::WaitingForWindow { checksum } | State::WaitingForLock { checksum } => {
                self.apply(env, checksum)
            }
            State::Rebooting { .. } => Ok(None),
            // Idle, up to date, available, failed, or a check interrupted by a
            // restart; and a staged update under `stage` (it applies at the
            // next reboot), where we look for something newer.
            _ => {
                self.check(env)?;
                self.step_after_check(env)
            }
        }
    }

    fn step_after_check(&mut self, env: &mut dyn Env) -> Result<Option<Duration>> {
        match self.record.state.clone() {
            State::Staged { checksum } if self.config.policy == Policy::Apply => {
                self.apply(env, checksum)
            }
            _ => Ok(Some(self.next_check(env))),
        }
    }

    fn check(&mut self, env: &mut dyn Env) -> Result<()> {
        // An update staged earlier stays staged while we look again.
        let staged_before = match &self.record.state {
            State::Staged { checksum } => Some(checksum.clone()),
            _ => None,
        };
        self.go(State::Checking)?;
        self.record.last_check = Some(env.now());
        let stage = matches!(self.config.policy, Policy::Stage | Policy::Apply);
        match env.check(stage) {
            Ok(Found::Nothing) => {
                self.record.last_result = Some("no update".into());
                match staged_before {
                    Some(checksum) => self.go(State::Staged { checksum }),
                    None => self.go(State::UpToDate),
                }
            }
            Ok(Found::Available { checksum }) => {
                self.record.last_result = Some(format!("update {} available", short(&checksum)));
                self.go(State::UpdateAvailable { checksum })
            }
            Ok(Found::Staged { checksum }) => {
                self.record.last_result = Some(format!("update {} staged", short(&checksum)));
                self.go(State::Staged { checksum })
            }
            Err(e) => {
                let error = format!("{e:#}");
                self.record.last_result = Some(format!("check failed: {error}"));
                self.go(State::Failed { error })
            }
        }
    }

    fn apply(&mut self, env: &mut dyn Env, checksum: String) -> Result<Option<Duration>> {
        let now = env.now();
        let needs_window = matches!(self.config.strategy, Strategy::Window | Strategy::FleetLock);
        if let (true, Some(window)) = (needs_window, self.config.window.clone()) {
            let opens = window.next_open(now);
            self.record.next_window = Some(opens);
            if !window.contains(now) {
                if !matches!(self.record.state, State::WaitingForWindow { .. }) {
                    self.go(State::WaitingForWindow { checksum })?;
                }
                let wait = (opens - now).to_std().unwrap_or_default();
                return Ok(Some(wait + env.jitter(self.config.jitter)));
            }
        }
        if self.config.strategy == Strategy::FleetLock {
            match env.fleet_lock() {
                Ok(Answer::Granted) => {
                    self.record.holds_fleet_lock = true;
                    self.record.lock_for = Some(checksum.clone());
                }
                Ok(Answer::Denied { value, .. }) => {
                    self.record.last_result = Some(format!("waiting for a reboot slot: {value}"));
                    self.go(State::WaitingForLock { checksum })?;
                    return Ok(Some(self.lock_retry(env)));
                }
                Err(e) => {
                    self.record.last_result = Some(format!("FleetLock server unreachable: {e:#}"));
                    self.go(State::WaitingForLock { checksum })?;
                    return Ok(Some(self.lock_retry(env)));
                }
            }
        }
        self.go(State::Rebooting { checksum })?;
        env.reboot(&self.record)?;
        Ok(None)
    }
}

fn short(c: &str) -> &str {
    &c[..c.len().min(12)]
}

/// What `host status` shows of the agent, from its record under the node's
/// `/var` (`var`).
pub fn summary(var: &Path) -> Option<AgentSummary> {
    let record = load_record(&var.join(STATE_FILE.trim_start_matches("/var/")))?;
    let value = serde_json::to_value(&record.state).ok()?;
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    Some(AgentSummary {
        policy: serde_json::to_value(record.policy)
            .ok()?
            .as_str()?
            .to_string(),
        state: value["state"].as_str()?.to_string(),
        update: value["checksum"].as_str().map(str::to_string),
        last_check: time(record.last_check),
        last_result: record.last_result,
        next_step: time(record.next_step),
        next_window: time(record.next_window),
        holds_fleet_lock: record.holds_fleet_lock,
    })
}

pub fn load_record(path: &Path) -> Option<Record> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Writes the record atomically and durably (see [`cairn_contracts::durable`]).
pub fn save_record(path: &Path, record: &Record) -> Result<()> {
    cairn_contracts::durable::write(path, &serde_json::to_vec_pretty(record)?)
}

/// The real world: the updater library on a sysroot, the FleetLock client, systemd.
pub struct NodeEnv {
    pub target: SysrootTarget,
    pub fleet: Option<fleetlock::Client>,
    /// False when acting on a `--sysroot` that is not the running system.
    pub can_reboot: bool,
    /// The health state `host health check` keeps for this node (bad commits).
    pub health_state: PathBuf,
    /// Where the agent's record is kept.
    pub state_file: PathBuf,
}

/// One line per upgrade round: its result, and the change when there is one;
/// the whole report as JSON at debug level (it is long).
fn log_report(r: &crate::UpdateReport) {
    use crate::report::UpdateResult;
    let result = match &r.result {
        UpdateResult::Unchanged { .. } => "no update",
        UpdateResult::UpdateAvailable => "update available",
        UpdateResult::Downloaded => "downloaded",
        UpdateResult::Deployed { written } if written.staged => "staged",
        UpdateResult::Deployed { .. } => "deployed",
    };
    let change = r
        .change
        .as_ref()
        .map(|c| format!(": {} -> {}", c.from.describe(), c.to.describe()))
        .unwrap_or_default();
    tracing::info!("agent: upgrade: {result}{change}");
    tracing::debug!(report = %serde_json::to_string(r).unwrap_or_default(), "agent: upgrade report");
}

impl Env for NodeEnv {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn check(&mut self, stage: bool) -> Result<Found> {
        let opts = crate::UpgradeOptions {
            check: !stage,
            // A commit that failed its health checks here is never staged
            // again: the upgrade refuses it under the lock it stages in.
            bad_commits: stage.then(|| self.health_state.clone()),
            ..Default::default()
        };
        let mut log_step = |step: &crate::Step| {
            // Only waiting is worth a line while it happens; the report has the rest.
            if let crate::Step::WaitingForLock = step {
                tracing::info!("agent: waiting for the sysroot lock");
            }
        };
        let report = crate::upgrade(&self.target, &opts, &mut log_step);
        if let Ok(r) = &report {
            log_report(r);
        }
        let outcome = match report.map(|r| r.outcome()) {
            Err(e) => match e.downcast_ref::<crate::Refusal>() {
                Some(crate::Refusal::BadCommit { commit }) => {
                    tracing::warn!(
                        "agent: not staging {}: it failed its health checks on this node",
                        commit.checksum
                    );
                    return Ok(Found::Nothing);
                }
                _ => return Err(e),
            },
            Ok(o) => o,
        };
        Ok(match outcome {
            crate::Outcome::Unchanged => Found::Nothing,
            crate::Outcome::UpdateAvailable { checksum }
            | crate::Outcome::Downloaded { checksum } => Found::Available { checksum },
            crate::Outcome::Deployed { checksum, .. } => Found::Staged { checksum },
        })
    }

    fn fleet_lock(&mut self) -> Result<Answer> {
        match &self.fleet {
            Some(c) => c.pre_reboot(),
            None => bail!("no [fleet-lock] configured"),
        }
    }

    fn reboot(&mut self, record: &Record) -> Result<()> {
        save_record(&self.state_file, record)?;
        if !self.can_reboot {
            tracing::warn!(
                "agent: would reboot now, but {} is not the running system",
                self.target.path().display()
            );
            return Ok(());
        }
        crate::ops::reboot()
    }

    fn jitter(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        let mut b = [0u8; 8];
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .is_err()
        {
            return Duration::ZERO;
        }
        Duration::from_millis(u64::from_le_bytes(b) % (max.as_millis() as u64 + 1))
    }
}

/// After a boot: settles the reboot the agent made before it (the record
/// still says `rebooting`).
pub fn settle_reboot(record: &mut Record, booted: Option<&str>) {
    if let State::Rebooting { checksum } = &record.state {
        if booted == Some(checksum.as_str()) {
            record.last_result = Some(format!("booted {}", short(checksum)));
        } else {
            record.last_result = Some(format!(
                "rebooted, but {} is not the booted deployment",
                short(checksum)
            ));
        }
        if record.holds_fleet_lock && record.lock_for.is_none() {
            // A record written before `lock_for` existed.
            record.lock_for = Some(checksum.clone());
        }
        record.state = State::Idle;
    }
}

/// What to do with the FleetLock slot the node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotAction {
    /// No slot held.
    None,
    /// Keep it; the reason is for the log and `host status`.
    Keep(String),
    Release,
}

/// The slot is given back only once the commit it was taken for is the
/// booted deployment and passed its health checks here. A node whose update
/// failed its health checks (and rolled itself back), that came up on another
/// deployment, or that is not healthy yet keeps it: its group's rollout stops
/// there until an operator looks and frees the slot (`host fleet release`),
/// or the node itself reboots into a later update (it may: it holds the slot).
pub fn slot_action(
    record: &Record,
    booted: Option<&str>,
    health: &crate::health::HealthState,
) -> SlotAction {
    if !record.holds_fleet_lock {
        return SlotAction::None;
    }
    let Some(target) = record.lock_for.as_deref().or(booted) else {
        return SlotAction::Keep("keeping the reboot slot: no booted deployment to judge".into());
    };
    if health.is_bad(target) {
        return SlotAction::Keep(format!(
            "update {} failed its health checks here and was rolled back: keeping the reboot \
             slot so the group's rollout stops (an operator frees it with `host fleet release`)",
            short(target)
        ));
    }
    if booted != Some(target) {
        return SlotAction::Keep(format!(
            "rebooted for {} but {} is booted: keeping the reboot slot so the group's rollout \
             stops (an operator frees it with `host fleet release`)",
            short(target),
            booted.map(short).unwrap_or("nothing")
        ));
    }
    if health.last_healthy.as_deref() != Some(target) {
        return SlotAction::Keep(
            "holding the reboot slot until this boot passes its health checks".into(),
        );
    }
    SlotAction::Release
}

/// Gives the slot back if [`slot_action`] says so; true when the record changed.
fn settle_slot(
    record: &mut Record,
    booted: Option<&str>,
    fleet: Option<&fleetlock::Client>,
    health_state: &Path,
) -> Result<bool> {
    let health = crate::health::HealthState::load(health_state);
    match slot_action(record, booted, &health) {
        SlotAction::None => Ok(false),
        SlotAction::Keep(why) => {
            tracing::info!("agent: {why}");
            Ok(false)
        }
        SlotAction::Release => {
            let client = fleet.context(
                "this node holds a FleetLock slot but no [fleet-lock] is configured to give it back to",
            )?;
            match client.steady_state()? {
                Answer::Granted => {
                    record.holds_fleet_lock = false;
                    record.lock_for = None;
                    record.last_result = Some(format!(
                        "{} is healthy: gave the reboot slot back",
                        booted.map(short).unwrap_or_default()
                    ));
                    tracing::info!("agent: gave the FleetLock slot back");
                    Ok(true)
                }
                Answer::Denied { value, .. } => bail!("giving the FleetLock slot back: {value}"),
            }
        }
    }
}

/// The checksum of the deployment running now, if `target` is the booted system.
fn booted_checksum(target: &SysrootTarget) -> Option<String> {
    let sysroot = target.open().ok()?;
    sysroot.booted_deployment().map(|d| d.csum().to_string())
}

/// The agent's main loop (`once`: stop at the first wait).
pub fn run(
    config: AgentConfig,
    target: SysrootTarget,
    state_file: PathBuf,
    health_state: PathBuf,
    once: bool,
) -> Result<()> {
    let fleet = config
        .fleet_lock
        .as_ref()
        .map(|f| fleetlock::Client::new(&f.base_url, &f.id, &f.group));
    let booted_csum = booted_checksum(&target);
    let booted = booted_csum.is_some() && target.path() == Path::new("/");
    let mut record = load_record(&state_file);
    if let Some(r) = record.as_mut() {
        settle_reboot(r, booted_csum.as_deref());
    }
    let mut env = NodeEnv {
        target,
        fleet: fleet.clone(),
        can_reboot: booted,
        health_state: health_state.clone(),
        state_file: state_file.clone(),
    };
    let mut machine = Machine::new(config, record);
    // A slot to give back is offered again every RELEASE_RETRY until the
    // server takes it (the network may come up after the agent does).
    let offer = |record: &mut Record| match settle_slot(
        record,
        booted_csum.as_deref(),
        fleet.as_ref(),
        &health_state,
    ) {
        Ok(_) => false,
        Err(e) => {
            tracing::warn!("agent: {e:#}");
            true
        }
    };
    let mut release_pending = offer(&mut machine.record);
    loop {
        let wait = match machine.step(&mut env) {
            Ok(w) => w,
            Err(e) => {
                save_record(&state_file, &machine.record)?;
                return Err(e);
            }
        };
        machine.record.next_step = wait
            .and_then(|w| chrono::Duration::from_std(w).ok())
            .map(|w| Utc::now() + w);
        save_record(&state_file, &machine.record)?;
        let wait = match wait {
            Some(_) if once => return Ok(()),
            Some(w) => w,
            None if release_pending && !matches!(machine.state(), State::Rebooting { .. }) => {
                Duration::MAX
            }
            None => return Ok(()),
        };
        let until = std::time::Instant::now().checked_add(wait);
        loop {
            let left = until
                .map(|u| u.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or(Duration::MAX);
            if left.is_zero() {
                break;
            }
            if !release_pending {
                if until.is_none() {
                    // Only the slot kept the agent running (e.g. policy off).
                    return Ok(());
                }
                std::thread::sleep(left);
                break;
            }
            std::thread::sleep(left.min(RELEASE_RETRY));
            release_pending = offer(&mut machine.record);
            save_record(&state_file, &machine.record)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        now: DateTime<Utc>,
        checks: Vec<Result<Found>>,
        locks: Vec<Answer>,
        log: Vec<String>,
    }

    impl Env for Fake {
        fn now(&self) -> DateTime<Utc> {
            self.now
        }
        fn check(&mut self, stage: bool) -> Result<Found> {
            self.log.push(format!("check stage={stage}"));
            self.checks.remove(0)
        }
        fn fleet_lock(&mut self) -> Result<Answer> {
            self.log.push("lock".into());
            Ok(self.locks.remove(0))
        }
        fn reboot(&mut self, record: &Record) -> Result<()> {
            // What the next boot will read: rebooting, and the slot if taken.
            self.log.push(format!(
                "reboot ({}, slot {:?})",
                record.state.kind(),
                record
                    .lock_for
                    .as_deref()
                    .filter(|_| record.holds_fleet_lock)
            ));
            Ok(())
        }
        fn jitter(&mut self, _max: Duration) -> Duration {
            Duration::ZERO
        }
    }

    fn fake(now: &str, checks: Vec<Result<Found>>, locks: Vec<Answer>) -> Fake {
        Fake {
            now: DateTime::parse_from_rfc3339(now)
                .unwrap()
                .with_timezone(&Utc),
            checks,
            locks,
            log: Vec::new(),
        }
    }

    fn staged() -> Result<Found> {
        Ok(Found::Staged {
            checksum: "c2".into(),
        })
    }

    fn machine(cfg: &str) -> Machine {
        Machine::new(
            AgentConfig::from_str(cfg, Some("node1".into())).unwrap(),
            None,
        )
    }

    #[test]
    fn off_does_nothing() {
        let mut m = machine("policy = \"off\"");
        let mut env = fake("2026-11-24T12:00:00Z", vec![], vec![]);
        assert_eq!(m.step(&mut env).unwrap(), None);
        assert!(env.log.is_empty());
    }

    #[test]
    fn check_reports_without_staging() {
        let mut m = machine("policy = \"check\"\ninterval = \"1h\"");
        let mut env = fake(
            "2026-11-24T12:00:00Z",
            vec![Ok(Found::Available {
                checksum: "c2".into(),
            })],
            vec![],
        );
        assert_eq!(m.step(&mut env).unwrap(), Some(Duration::from_secs(3600)));
        assert_eq!(env.log, vec!["check stage=false"]);
        assert_eq!(
            m.state(),
            &State::UpdateAvailable {
                checksum: "c2".into()
            }
        );
    }

    #[test]
    fn stage_stays_staged_and_keeps_looking() {
        let mut m = machine("policy = \"stage\"");
        let mut env = fake(
            "2026-11-24T12:00:00Z",
            vec![staged(), Ok(Found::Nothing)],
            vec![],
        );
        m.step(&mut env).unwrap();
        assert_eq!(
            m.state(),
            &State::Staged {
                checksum: "c2".into()
            }
        );
        m.step(&mut env).unwrap();
        assert_eq!(
            m.state(),
            &State::Staged {
                checksum: "c2".into()
            },
            "a later empty check keeps the staged update"
        );
        assert_eq!(env.log, vec!["check stage=true", "check stage=true"]);
    }

    #[test]
    fn apply_immediately_reboots() {
        let mut m = machine("policy = \"apply\"");
        let mut env = fake("2026-11-24T12:00:00Z", vec![staged()], vec![]);
        assert_eq!(m.step(&mut env).unwrap(), None);
        assert_eq!(
            env.log,
            vec!["check stage=true", "reboot (rebooting, slot None)"]
        );
        assert_eq!(
            m.state(),
            &State::Rebooting {
                checksum: "c2".into()
            }
        );
    }

    #[test]
    fn apply_waits_for_the_window() {
        let mut m = machine("policy = \"apply\"\n[reboot]\nstrategy = \"window\"\n[window]\ndays = [\"sat\"]\nstart = \"02:00\"\nlength = \"1h\"\n");
        // Tuesday noon UTC: the next window opens Saturday 02:00.
        let mut env = fake("2026-11-24T12:00:00Z", vec![staged()], vec![]);
        let wait = m.step(&mut env).unwrap().unwrap();
        assert_eq!(wait, Duration::from_secs((3 * 24 + 14) * 3600));
        assert_eq!(
            m.state(),
            &State::WaitingForWindow {
                checksum: "c2".into()
            }
        );
        env.now = DateTime::parse_from_rfc3339("2026-11-28T02:10:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(m.step(&mut env).unwrap(), None);
        assert_eq!(
            env.log,
            vec!["check stage=true", "reboot (rebooting, slot None)"]
        );
    }

    #[test]
    fn fleet_lock_gates_the_reboot_and_is_released_after_boot() {
        let mut m = machine("policy = \"apply\"\n[reboot]\nstrategy = \"fleet-lock\"\n[fleet-lock]\nbase-url = \"http://x\"\n");
        let denied = Answer::Denied {
            status: 409,
            kind: "failed_lock".into(),
            value: "all 1 slots are held".into(),
        };
        let mut env = fake(
            "2026-11-24T12:00:00Z",
            vec![staged()],
            vec![denied, Answer::Granted],
        );
        assert_eq!(m.step(&mut env).unwrap(), Some(LOCK_RETRY));
        assert_eq!(
            m.state(),
            &State::WaitingForLock {
                checksum: "c2".into()
            }
        );
        assert_eq!(m.step(&mut env).unwrap(), None);
        // The record the reboot saves already holds the slot for c2.
        assert_eq!(
            env.log,
            vec![
                "check stage=true",
                "lock",
                "lock",
                "reboot (rebooting, slot Some(\"c2\"))"
            ]
        );
        assert!(m.record.holds_fleet_lock);
        assert_eq!(m.record.lock_for.as_deref(), Some("c2"));
        let health = |healthy: Option<&str>, bad: &[&str]| crate::health::HealthState {
            last_healthy: healthy.map(str::to_string),
            bad_commits: bad
                .iter()
                .map(|c| crate::health::BadCommit {
                    checksum: c.to_string(),
                    reason: "10-app (required: exit status 1)".into(),
                    at: Utc::now(),
                })
                .collect(),
            ..Default::default()
        };
        // The new boot: released only once c2 is booted and passed its checks.
        let mut r = m.record.clone();
        settle_reboot(&mut r, Some("c2"));
        assert_eq!(r.state, State::Idle);
        assert_eq!(r.last_result.as_deref(), Some("booted c2"));
        assert!(matches!(
            slot_action(&r, Some("c2"), &health(Some("c1"), &[])),
            SlotAction::Keep(why) if why.contains("until this boot passes")
        ));
        assert_eq!(
            slot_action(&r, Some("c2"), &health(Some("c2"), &[])),
            SlotAction::Release
        );
        // c2 failed its checks and the node rolled back to c1 (healthy there):
        // the slot stays taken, so the group's rollout stops at this node.
        let mut r = m.record.clone();
        settle_reboot(&mut r, Some("c1"));
        assert!(r.last_result.as_deref().unwrap().contains("not the booted"));
        assert!(matches!(
            slot_action(&r, Some("c1"), &health(Some("c1"), &["c2"])),
            SlotAction::Keep(why) if why.contains("failed its health checks") && why.contains("host fleet release")
        ));
        // Back on something else for another reason: kept as well.
        assert!(matches!(
            slot_action(&r, Some("c1"), &health(Some("c1"), &[])),
            SlotAction::Keep(why) if why.contains("rebooted for c2 but c1 is booted")
        ));
        // A later update may be taken by the node holding the slot.
        let mut m2 = Machine::new(m.config.clone(), Some(r));
        let mut env = fake(
            "2026-11-24T13:00:00Z",
            vec![Ok(Found::Staged {
                checksum: "c3".into(),
            })],
            vec![Answer::Granted],
        );
        assert_eq!(m2.step(&mut env).unwrap(), None);
        assert_eq!(m2.record.lock_for.as_deref(), Some("c3"));
    }

    #[test]
    fn a_denied_lock_is_asked_again_within_the_check_interval() {
        let mut m = machine("policy = \"apply\"\ninterval = \"1m\"\n[reboot]\nstrategy = \"fleet-lock\"\n[fleet-lock]\nbase-url = \"http://x\"\n");
        let denied = Answer::Denied {
            status: 409,
            kind: "failed_lock".into(),
            value: "all 1 slots are held".into(),
        };
        let mut env = fake("2026-11-24T12:00:00Z", vec![staged()], vec![denied]);
        assert_eq!(m.step(&mut env).unwrap(), Some(Duration::from_secs(60)));
        assert!(!m.record.holds_fleet_lock);
    }

    #[test]
    fn failures_are_recorded_and_retried() {
        let mut m = machine("policy = \"stage\"");
        let mut env = fake(
            "2026-11-24T12:00:00Z",
            vec![Err(anyhow::anyhow!("remote unreachable")), staged()],
            vec![],
        );
        m.step(&mut env).unwrap();
        assert!(matches!(m.state(), State::Failed { error } if error.contains("unreachable")));
        m.step(&mut env).unwrap();
        assert_eq!(
            m.state(),
            &State::Staged {
                checksum: "c2".into()
            }
        );
    }

    #[test]
    fn the_transition_table_refuses_shortcuts() {
        let c = || "c".to_string();
        assert!(!allowed(&State::Idle, &State::Rebooting { checksum: c() }));
        assert!(!allowed(&State::UpToDate, &State::Staged { checksum: c() }));
        assert!(!allowed(
            &State::Checking,
            &State::Rebooting { checksum: c() }
        ));
        assert!(!allowed(
            &State::Rebooting { checksum: c() },
            &State::Checking
        ));
        assert!(allowed(
            &State::Staged { checksum: c() },
            &State::Rebooting { checksum: c() }
        ));
        let mut m = machine("policy = \"check\"");
        assert!(m.go(State::Rebooting { checksum: c() }).is_err());
    }
}
