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
    fn reboot(&mut self) -> Result<()>;
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
}

pub struct Machine {
    pub config: AgentConfig,
    pub record: Record,
}

/// How long to wait while a fleet lock is denied before asking again.
const LOCK_RETRY: Duration = Duration::from_secs(300);

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
                Ok(Answer::Granted) => self.record.holds_fleet_lock = true,
                Ok(Answer::Denied { value, .. }) => {
                    self.record.last_result = Some(format!("waiting for a reboot slot: {value}"));
                    self.go(State::WaitingForLock { checksum })?;
                    return Ok(Some(LOCK_RETRY + env.jitter(self.config.jitter)));
                }
                Err(e) => {
                    self.record.last_result = Some(format!("FleetLock server unreachable: {e:#}"));
                    self.go(State::WaitingForLock { checksum })?;
                    return Ok(Some(LOCK_RETRY + env.jitter(self.config.jitter)));
                }
            }
        }
        self.go(State::Rebooting { checksum })?;
        env.reboot()?;
        Ok(None)
    }
}

fn short(c: &str) -> &str {
    &c[..c.len().min(12)]
}

pub fn load_record(path: &Path) -> Option<Record> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Writes the record atomically (temp file + rename).
pub fn save_record(path: &Path, record: &Record) -> Result<()> {
    let dir = path.parent().context("state file has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), serde_json::to_vec_pretty(record)?)?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The real world: the updater library on a sysroot, the FleetLock client, systemd.
pub struct NodeEnv {
    pub target: SysrootTarget,
    pub fleet: Option<fleetlock::Client>,
    /// False when acting on a `--sysroot` that is not the running system.
    pub can_reboot: bool,
}

impl Env for NodeEnv {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn check(&mut self, stage: bool) -> Result<Found> {
        // A commit that failed its health checks here is never staged again.
        let health = crate::health::HealthState::load(Path::new(crate::health::STATE_FILE));
        if stage && !health.bad_commits.is_empty() {
            let mut log = Vec::new();
            let peek = crate::upgrade(
                &self.target,
                &crate::UpgradeOptions {
                    check: true,
                    ..Default::default()
                },
                &mut log,
            )?;
            if let crate::Outcome::UpdateAvailable { checksum } = peek {
                if health.is_bad(&checksum) {
                    tracing::warn!(
                        "agent: not staging {checksum}: it failed its health checks on this node"
                    );
                    return Ok(Found::Nothing);
                }
            }
        }
        let opts = crate::UpgradeOptions {
            check: !stage,
            ..Default::default()
        };
        let mut log = Vec::new();
        let outcome = crate::upgrade(&self.target, &opts, &mut log);
        tracing::info!("agent: {}", String::from_utf8_lossy(&log).trim_end());
        Ok(match outcome? {
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

    fn reboot(&mut self) -> Result<()> {
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

/// After a boot: a slot taken for the reboot into `checksum` is given back
/// once that deployment is the one running.
///
/// The slot is held until the new boot passed its health checks (a node
/// that stays unhealthy keeps it, and its group's rollout stops).
pub fn after_boot(
    record: &mut Record,
    booted: Option<&str>,
    healthy: bool,
    fleet: Option<&fleetlock::Client>,
) -> Result<()> {
    if let State::Rebooting { checksum } = &record.state {
        if booted == Some(checksum.as_str()) {
            record.last_result = Some(format!("booted {}", short(checksum)));
        } else {
            record.last_result = Some(format!(
                "rebooted, but {} is not the booted deployment",
                short(checksum)
            ));
        }
        record.state = State::Idle;
    }
    if record.holds_fleet_lock && !healthy {
        record.last_result =
            Some("holding the reboot slot until this boot passes its health checks".into());
        return Ok(());
    }
    if record.holds_fleet_lock {
        if let Some(client) = fleet {
            match client.steady_state()? {
                Answer::Granted => record.holds_fleet_lock = false,
                Answer::Denied { value, .. } => bail!("releasing the FleetLock slot: {value}"),
            }
        }
    }
    Ok(())
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
        let health = crate::health::HealthState::load(Path::new(crate::health::STATE_FILE));
        let healthy = booted_csum.is_some() && health.last_healthy == booted_csum;
        if let Err(e) = after_boot(r, booted_csum.as_deref(), healthy, fleet.as_ref()) {
            tracing::warn!("agent: {e:#}");
        }
    }
    let mut env = NodeEnv {
        target,
        fleet,
        can_reboot: booted,
    };
    let mut machine = Machine::new(config, record);
    loop {
        let wait = machine.step(&mut env);
        let wait = match wait {
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
        match wait {
            None => return Ok(()),
            Some(_) if once => return Ok(()),
            Some(w) => std::thread::sleep(w),
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
        fn reboot(&mut self) -> Result<()> {
            self.log.push("reboot".into());
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
        assert_eq!(env.log, vec!["check stage=true", "reboot"]);
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
        assert_eq!(env.log, vec!["check stage=true", "reboot"]);
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
        assert_eq!(env.log, vec!["check stage=true", "lock", "lock", "reboot"]);
        assert!(m.record.holds_fleet_lock);
        // After the reboot, with no server reachable in this test, the record still says Idle.
        let mut r = m.record.clone();
        let mut unhealthy = r.clone();
        after_boot(&mut unhealthy, Some("c2"), false, None).unwrap();
        assert!(
            unhealthy.holds_fleet_lock,
            "an unhealthy boot keeps its slot"
        );
        after_boot(&mut r, Some("c2"), true, None).unwrap();
        assert_eq!(r.state, State::Idle);
        assert_eq!(r.last_result.as_deref(), Some("booted c2"));
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
