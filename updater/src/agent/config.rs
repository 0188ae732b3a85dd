//! The agent's configuration: TOML fragments, defaults under /usr, the
//! operator's overrides under /etc (a later fragment's keys win), all keys
//! optional and unknown keys rejected.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, NaiveTime, Timelike, Utc, Weekday};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Defaults shipped in the tree, then the machine's own settings.
pub const DEFAULT_PATHS: &[&str] = &["/usr/lib/cairn/agent.toml", "/etc/cairn/agent.toml"];
/// Drop-ins, read in name order after the files above.
pub const DROPIN_DIR: &str = "/etc/cairn/agent.d";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Do nothing.
    #[default]
    Off,
    /// Look for updates and report them.
    Check,
    /// Download and stage updates; they apply at the next reboot, whoever makes it.
    Stage,
    /// Stage, then reboot into them following the reboot strategy.
    Apply,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Reboot as soon as an update is staged.
    #[default]
    Immediate,
    /// Reboot only inside the update window.
    Window,
    /// Inside the window if one is set, and only with a FleetLock slot.
    FleetLock,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Fragment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowFragment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootFragment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_lock: Option<FleetLockFragment>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WindowFragment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RebootFragment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FleetLockFragment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Days and hours in a time zone when reboots (and, with `apply`, updates) may happen.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub days: Vec<Weekday>,
    pub start: NaiveTime,
    pub length: Duration,
    pub timezone: Zone,
}

/// An IANA time zone from the node's own tz database (`/usr/share/zoneinfo`,
/// Debian's tzdata), so a tzdata update in a new tree moves the windows too.
#[derive(Clone)]
pub struct Zone {
    name: String,
    tz: jiff::tz::TimeZone,
}

impl Zone {
    pub fn named(name: &str) -> Result<Zone> {
        let tz = if name == "UTC" {
            // Needs no database, so the default works on any root.
            jiff::tz::TimeZone::UTC
        } else {
            jiff::tz::TimeZone::get(name).map_err(|e| {
                anyhow::anyhow!(
                    "agent configuration: window.timezone: {name:?} is not an IANA time zone \
                     of this machine's tz database (e.g. Europe/Berlin; is tzdata installed?): {e}"
                )
            })?
        };
        Ok(Zone {
            name: name.to_string(),
            tz,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.name == other.name
    }
}

impl std::fmt::Debug for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FleetLockConfig {
    pub base_url: String,
    pub group: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub policy: Policy,
    pub interval: Duration,
    pub jitter: Duration,
    pub window: Option<Window>,
    pub strategy: Strategy,
    pub fleet_lock: Option<FleetLockConfig>,
    /// The files it was read from, for status and errors.
    pub sources: Vec<PathBuf>,
}

impl AgentConfig {
    /// Reads the default files and drop-ins under `root` (`/` on a node).
    pub fn load(root: &Path) -> Result<AgentConfig> {
        let mut files: Vec<PathBuf> = DEFAULT_PATHS
            .iter()
            .map(|p| root.join(p.trim_start_matches('/')))
            .collect();
        if let Ok(rd) = std::fs::read_dir(root.join(DROPIN_DIR.trim_start_matches('/'))) {
            let mut dropins: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            dropins.sort();
            files.extend(dropins);
        }
        let existing: Vec<PathBuf> = files.into_iter().filter(|f| f.exists()).collect();
        Self::from_files(&existing, machine_id(root))
    }

    pub fn from_files(files: &[PathBuf], default_id: Option<String>) -> Result<AgentConfig> {
        let mut merged = Fragment::default();
        for f in files {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let frag: Fragment = toml::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "agent configuration {}: {}",
                    f.display(),
                    e.to_string().trim_end()
                )
            })?;
            merged = merge(merged, frag);
        }
        resolve(merged, files.to_vec(), default_id)
    }

    pub fn from_str(text: &str, default_id: Option<String>) -> Result<AgentConfig> {
        let frag: Fragment = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("agent configuration: {}", e.to_string().trim_end()))?;
        resolve(frag, Vec::new(), default_id)
    }
}

fn merge(base: Fragment, top: Fragment) -> Fragment {
    let window = match (base.window, top.window) {
        (None, w) | (w, None) => w,
        (Some(a), Some(b)) => Some(WindowFragment {
            days: b.days.or(a.days),
            start: b.start.or(a.start),
            length: b.length.or(a.length),
            timezone: b.timezone.or(a.timezone),
        }),
    };
    let fleet_lock = match (base.fleet_lock, top.fleet_lock) {
        (None, f) | (f, None) => f,
        (Some(a), Some(b)) => Some(FleetLockFragment {
            base_url: b.base_url.or(a.base_url),
            group: b.group.or(a.group),
            id: b.id.or(a.id),
        }),
    };
    Fragment {
        policy: top.policy.or(base.policy),
        interval: top.interval.or(base.interval),
        jitter: top.jitter.or(base.jitter),
        window,
        reboot: top.reboot.or(base.reboot),
        fleet_lock,
    }
}

/// Checks one fragment as the agent would read it alone (`default_id`
/// stands in for the machine id a missing fleet-lock id defaults to).
pub fn check_fragment(f: &Fragment, default_id: &str) -> Result<()> {
    resolve(f.clone(), Vec::new(), Some(default_id.to_string())).map(drop)
}

fn resolve(f: Fragment, sources: Vec<PathBuf>, default_id: Option<String>) -> Result<AgentConfig> {
    let interval = parse_duration("interval", f.interval.as_deref().unwrap_or("1h"))?;
    if interval < Duration::from_secs(60) {
        bail!("agent configuration: interval {:?} is under a minute; that would hammer the update server", f.interval.unwrap_or_default());
    }
    let jitter = parse_duration("jitter", f.jitter.as_deref().unwrap_or("5m"))?;
    let window = match f.window {
        None => None,
        Some(w) => {
            let days = match w.days {
                None => vec![Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun],
                Some(d) => d
                    .iter()
                    .map(|s| s.parse::<Weekday>().map_err(|_| anyhow::anyhow!("agent configuration: window.days: {s:?} is not a day (mon, tue, …)")))
                    .collect::<Result<_>>()?,
            };
            let start = w.start.as_deref().unwrap_or("00:00");
            let start = NaiveTime::parse_from_str(start, "%H:%M").map_err(|_| {
                anyhow::anyhow!("agent configuration: window.start: {start:?} is not HH:MM")
            })?;
            let length = parse_duration("window.length", w.length.as_deref().unwrap_or("1h"))?;
            if length.is_zero() || length > Duration::from_secs(7 * 86_400) {
                bail!("agent configuration: window.length must be between 1s and 7 days");
            }
            let timezone = Zone::named(w.timezone.as_deref().unwrap_or("UTC"))?;
            Some(Window {
                days,
                start,
                length,
                timezone,
            })
        }
    };
    let strategy = f.reboot.and_then(|r| r.strategy).unwrap_or_default();
    let fleet_lock = match f.fleet_lock {
        None => None,
        Some(fl) => Some(FleetLockConfig {
            base_url: fl.base_url.ok_or_else(|| anyhow::anyhow!("agent configuration: fleet-lock.base-url is missing"))?,
            group: fl.group.unwrap_or_else(|| "default".into()),
            id: match fl.id.or(default_id) {
                Some(id) => id,
                None => bail!("agent configuration: fleet-lock.id is missing and the machine has no /etc/machine-id"),
            },
        }),
    };
    if strategy == Strategy::Window && window.is_none() {
        bail!("agent configuration: reboot.strategy = \"window\" needs a [window]");
    }
    if strategy == Strategy::FleetLock && fleet_lock.is_none() {
        bail!("agent configuration: reboot.strategy = \"fleet-lock\" needs [fleet-lock] base-url");
    }
    Ok(AgentConfig {
        policy: f.policy.unwrap_or_default(),
        interval,
        jitter,
        window,
        strategy,
        fleet_lock,
        sources,
    })
}

fn machine_id(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join("etc/machine-id"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s != "uninitialized")
}

/// A duration of the agent configuration (one grammar for all of cairn:
/// [`cairn_contracts::duration`]), the key named in the error.
fn parse_duration(key: &str, text: &str) -> Result<Duration> {
    cairn_contracts::duration::parse(text).with_context(|| format!("agent configuration: {key}"))
}

impl Window {
    /// The window occurrences that could contain `now` or follow it.
    fn occurrences(
        &self,
        now: DateTime<Utc>,
    ) -> impl Iterator<Item = (DateTime<Utc>, DateTime<Utc>)> + '_ {
        let today = jiff::Timestamp::from_second(now.timestamp())
            .map(|t| t.to_zoned(self.timezone.tz.clone()).date())
            .ok();
        let start_time = jiff::civil::time(
            self.start.hour() as i8,
            self.start.minute() as i8,
            self.start.second() as i8,
            0,
        );
        (-7i64..=8).filter_map(move |offset| {
            let day = today?.checked_add(jiff::Span::new().days(offset)).ok()?;
            let weekday = day.weekday().to_monday_zero_offset() as u32;
            if !self
                .days
                .iter()
                .any(|d| d.num_days_from_monday() == weekday)
            {
                return None;
            }
            // "Compatible": a start time skipped by a DST change starts as
            // far after the change as it was after the hour it skipped; a
            // repeated one starts at its first occurrence.
            let start = self
                .timezone
                .tz
                .to_ambiguous_timestamp(day.to_datetime(start_time))
                .compatible()
                .ok()?;
            let start = DateTime::from_timestamp(start.as_second(), 0)?;
            let end = start + chrono::Duration::from_std(self.length).ok()?;
            Some((start, end))
        })
    }

    pub fn contains(&self, now: DateTime<Utc>) -> bool {
        self.occurrences(now).any(|(s, e)| s <= now && now < e)
    }

    /// `now` if inside a window, else the start of the next one.
    pub fn next_open(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        if self.contains(now) {
            return now;
        }
        self.occurrences(now)
            .map(|(s, _)| s)
            .filter(|s| *s > now)
            .min()
            .unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("x", "90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("x", "1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_duration("x", "2d").unwrap(),
            Duration::from_secs(172_800)
        );
        for bad in ["", "5x", "h"] {
            let err = format!("{:#}", parse_duration("x", bad).unwrap_err());
            assert!(err.starts_with("agent configuration: x: "), "{err}");
        }
    }

    #[test]
    fn fragments_merge_and_later_keys_win() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::fs::write(&a, "policy = \"stage\"\ninterval = \"2h\"\n[window]\ndays = [\"sat\"]\nstart = \"03:00\"\n").unwrap();
        std::fs::write(&b, "policy = \"apply\"\n[window]\ntimezone = \"Europe/Berlin\"\n[reboot]\nstrategy = \"window\"\n").unwrap();
        let c = AgentConfig::from_files(&[a, b], Some("m1".into())).unwrap();
        assert_eq!(c.policy, Policy::Apply);
        assert_eq!(c.interval, Duration::from_secs(7200));
        let w = c.window.unwrap();
        assert_eq!(
            (w.days, w.start, w.timezone),
            (
                vec![Weekday::Sat],
                NaiveTime::from_hms_opt(3, 0, 0).unwrap(),
                Zone::named("Europe/Berlin").unwrap()
            )
        );
        assert_eq!(c.strategy, Strategy::Window);
    }

    #[test]
    fn bad_configuration_is_refused_with_the_key() {
        let cases = [
            ("polcy = \"off\"", "polcy"),
            ("interval = \"10s\"", "under a minute"),
            ("[window]\ndays = [\"someday\"]", "window.days"),
            ("[window]\nstart = \"25:00\"", "window.start"),
            ("[window]\ntimezone = \"Mars/Olympus\"", "window.timezone"),
            ("[reboot]\nstrategy = \"window\"", "needs a [window]"),
            ("[reboot]\nstrategy = \"fleet-lock\"", "needs [fleet-lock]"),
            ("[fleet-lock]\ngroup = \"g\"", "base-url is missing"),
        ];
        for (text, expected) in cases {
            let e = format!(
                "{:#}",
                AgentConfig::from_str(text, Some("m".into())).unwrap_err()
            );
            assert!(e.contains(expected), "{text:?}: {e}");
        }
        let ok = AgentConfig::from_str("", None).unwrap();
        assert_eq!((ok.policy, ok.strategy), (Policy::Off, Strategy::Immediate));
    }

    /// A window in Berlin from its `days` (TOML array), start and length.
    fn berlin_window(days: &str, start: &str, length: &str) -> Window {
        let text = format!(
            "[window]\ndays = {days}\nstart = \"{start}\"\nlength = \"{length}\"\ntimezone = \"Europe/Berlin\"\n"
        );
        AgentConfig::from_str(&text, None).unwrap().window.unwrap()
    }

    #[test]
    fn windows_follow_days_hours_and_time_zones() {
        let w = berlin_window("[\"sat\", \"sun\"]", "23:00", "2h");
        // Saturday 2026-11-21 23:00 in Berlin is 22:00 UTC (CET, +01:00).
        assert!(!w.contains(utc("2026-11-21T21:59:00Z")));
        assert!(w.contains(utc("2026-11-21T22:00:00Z")));
        // It runs past midnight into Sunday.
        assert!(w.contains(utc("2026-11-21T23:30:00Z")));
        assert!(!w.contains(utc("2026-11-22T00:00:00Z")));
        // Tuesday: the next window is Saturday's.
        assert_eq!(
            w.next_open(utc("2026-11-24T12:00:00Z")),
            utc("2026-11-28T22:00:00Z")
        );
        assert_eq!(
            w.next_open(utc("2026-11-21T22:30:00Z")),
            utc("2026-11-21T22:30:00Z")
        );
        // Summer time: the same local hour is 21:00 UTC.
        assert!(w.contains(utc("2026-06-20T21:00:00Z")));
    }

    #[test]
    fn a_window_starting_in_a_skipped_hour_opens_after_the_change() {
        // Berlin skips 02:00-03:00 on Sunday 2026-03-29: 02:30 does not
        // exist that night, so the window opens at 03:30 CEST (01:30 UTC).
        let w = berlin_window("[\"sun\"]", "02:30", "1h");
        assert_eq!(
            w.next_open(utc("2026-03-28T12:00:00Z")),
            utc("2026-03-29T01:30:00Z")
        );
        // On the night clocks go back, 02:30 happens twice: the first counts.
        assert_eq!(
            w.next_open(utc("2026-10-24T12:00:00Z")),
            utc("2026-10-25T00:30:00Z")
        );
    }
}
