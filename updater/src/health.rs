//! Health checks that gate a new deployment (`host health check`, run at
//! every boot once the default tree ships its unit; see docs/fleet.md).
//!
//! Checks are executables in `required/` and `wanted/` under
//! `/usr/lib/cairn/health.d` (shipped in the tree) and `/etc/cairn/health.d`
//! (the machine's own; a file there with the same name replaces the shipped
//! one, and an empty file or a link to /dev/null disables it). A failing
//! *required* check on the first boot of a deployment rolls back to the
//! previous deployment and reboots, and the commit is recorded as bad so the
//! agent never stages it again; a failing *wanted* check is only reported.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const DIRS: &[&str] = &["/usr/lib/cairn/health.d", "/etc/cairn/health.d"];
pub const STATE_FILE: &str = "/var/lib/cairn/health/state.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Required,
    Wanted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub kind: Kind,
    pub passed: bool,
    /// "exit status 3", "killed after 60s", …
    pub detail: String,
    /// Last lines of its output.
    pub output: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub results: Vec<CheckResult>,
}

impl Report {
    pub fn required_failures(&self) -> Vec<&CheckResult> {
        self.results
            .iter()
            .filter(|r| !r.passed && r.kind == Kind::Required)
            .collect()
    }

    pub fn healthy(&self) -> bool {
        self.required_failures().is_empty()
    }

    pub fn summary(&self) -> String {
        let failed: Vec<String> = self
            .results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| format!("{} ({:?}: {})", r.name, r.kind, r.detail).to_lowercase())
            .collect();
        if failed.is_empty() {
            format!("{} checks passed", self.results.len())
        } else {
            format!("failed: {}", failed.join(", "))
        }
    }
}

/// The checks to run: name → path, later directories replacing earlier ones.
pub fn discover(root: &Path) -> Result<Vec<(String, Kind, PathBuf)>> {
    let mut found: BTreeMap<(u8, String), (Kind, PathBuf)> = BTreeMap::new();
    for dir in DIRS {
        for (kind, sub, order) in [
            (Kind::Required, "required", 0u8),
            (Kind::Wanted, "wanted", 1u8),
        ] {
            let d = root.join(dir.trim_start_matches('/')).join(sub);
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                found.insert((order, name), (kind, entry.path()));
            }
        }
    }
    let mut out = Vec::new();
    for ((_, name), (kind, path)) in found {
        let disabled = std::fs::read_link(&path).is_ok_and(|t| t == Path::new("/dev/null"))
            || std::fs::metadata(&path).is_ok_and(|m| m.len() == 0);
        if !disabled {
            out.push((name, kind, path));
        }
    }
    Ok(out)
}

/// Runs every check (each with `timeout`), in name order, required first.
pub fn run_checks(root: &Path, timeout: Duration) -> Result<Report> {
    let mut report = Report::default();
    for (name, kind, path) in discover(root)? {
        let result = run_one(&name, kind, &path, timeout);
        tracing::info!(
            "health check {name}: {}",
            if result.passed {
                "passed"
            } else {
                &result.detail
            }
        );
        report.results.push(result);
    }
    Ok(report)
}

fn run_one(name: &str, kind: Kind, path: &Path, timeout: Duration) -> CheckResult {
    let fail = |detail: String, output: String| CheckResult {
        name: name.to_string(),
        kind,
        passed: false,
        detail,
        output,
    };
    if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 == 0) {
        return fail("not executable".into(), String::new());
    }
    let out_file = match tempfile::tempfile() {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot capture output: {e}"), String::new()),
    };
    let child = Command::new(path)
        .stdin(Stdio::null())
        .stdout(
            out_file
                .try_clone()
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        )
        .stderr(
            out_file
                .try_clone()
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        )
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start: {e}"), String::new()),
    };
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break None,
        }
    };
    let mut output = String::new();
    let mut f = out_file;
    use std::io::Seek;
    let _ = f.rewind();
    let _ = f.take(1 << 20).read_to_string(&mut output);
    let lines: Vec<&str> = output.lines().collect();
    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
    match status {
        Some(s) if s.success() => CheckResult {
            name: name.to_string(),
            kind,
            passed: true,
            detail: "ok".into(),
            output: tail,
        },
        Some(s) => fail(
            s.code()
                .map(|c| format!("exit status {c}"))
                .unwrap_or_else(|| s.to_string()),
            tail,
        ),
        None => fail(format!("killed after {}s", timeout.as_secs()), tail),
    }
}

/// What the node remembers about health across boots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    /// The deployment checksum the last check ran on, and what it found.
    pub last_checked: Option<String>,
    pub last_result: Option<String>,
    pub last_healthy: Option<String>,
    pub checked_at: Option<DateTime<Utc>>,
    /// Commits that failed a required check here: never staged again.
    #[serde(default)]
    pub bad_commits: Vec<BadCommit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadCommit {
    pub checksum: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

impl HealthState {
    pub fn load(path: &Path) -> HealthState {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Durably: the bad-commit list must survive a power cut.
    pub fn save(&self, path: &Path) -> Result<()> {
        cairn_contracts::durable::write(path, &serde_json::to_vec_pretty(self)?)
    }

    pub fn is_bad(&self, checksum: &str) -> bool {
        self.bad_commits.iter().any(|b| b.checksum == checksum)
    }
}

/// What `host health check` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Required checks failed; the previous deployment boots next.
    RolledBack {
        reason: String,
    },
    /// Required checks failed and there is nothing to roll back to.
    Unhealthy {
        reason: String,
    },
}

/// Runs the checks on the booted deployment `booted` and acts on the result:
/// records it, and on a required failure marks the commit bad and calls
/// `rollback` (which makes the previous deployment boot next).
pub fn gate(
    root: &Path,
    state_file: &Path,
    booted: &str,
    has_rollback: bool,
    timeout: Duration,
    rollback: &mut dyn FnMut() -> Result<()>,
) -> Result<(Verdict, Report)> {
    let report = run_checks(root, timeout)?;
    let mut state = HealthState::load(state_file);
    // Only the first boots of a deployment are gated: one that was healthy
    // here before is not rolled back for a passing problem.
    let gating = state.last_healthy.as_deref() != Some(booted);
    state.last_checked = Some(booted.to_string());
    state.checked_at = Some(Utc::now());
    state.last_result = Some(report.summary());
    let verdict = if report.healthy() {
        state.last_healthy = Some(booted.to_string());
        Verdict::Healthy
    } else if !gating {
        Verdict::Unhealthy {
            reason: report.summary(),
        }
    } else {
        let reason = report.summary();
        if !state.is_bad(booted) {
            state.bad_commits.push(BadCommit {
                checksum: booted.to_string(),
                reason: reason.clone(),
                at: Utc::now(),
            });
        }
        if has_rollback {
            // Record first: if the rollback is cut short, the next boot still knows.
            state.save(state_file)?;
            rollback()?;
            Verdict::RolledBack { reason }
        } else {
            Verdict::Unhealthy { reason }
        }
    };
    state.save(state_file)?;
    Ok((verdict, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(root: &Path, rel: &str, body: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn etc_replaces_and_disables_shipped_checks() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        script(r, "usr/lib/cairn/health.d/required/10-net", "exit 1");
        script(r, "etc/cairn/health.d/required/10-net", "exit 0");
        script(r, "usr/lib/cairn/health.d/required/20-disk", "exit 1");
        std::fs::create_dir_all(r.join("etc/cairn/health.d/required")).unwrap();
        std::os::unix::fs::symlink("/dev/null", r.join("etc/cairn/health.d/required/20-disk"))
            .unwrap();
        script(
            r,
            "usr/lib/cairn/health.d/wanted/30-ntp",
            "echo drift; exit 2",
        );
        let report = run_checks(r, Duration::from_secs(10)).unwrap();
        let names: Vec<(&str, bool)> = report
            .results
            .iter()
            .map(|c| (c.name.as_str(), c.passed))
            .collect();
        assert_eq!(names, vec![("10-net", true), ("30-ntp", false)]);
        assert!(
            report.healthy(),
            "a wanted failure does not make the boot unhealthy"
        );
        assert_eq!(report.results[1].detail, "exit status 2");
        assert_eq!(report.results[1].output, "drift");
    }

    #[test]
    fn a_required_failure_rolls_back_once_and_marks_the_commit_bad() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        script(
            r,
            "usr/lib/cairn/health.d/required/10-app",
            "echo app down >&2; exit 1",
        );
        let state = r.join("state.json");
        let mut rollbacks = 0;
        let (verdict, _) = gate(r, &state, "c2", true, Duration::from_secs(10), &mut || {
            rollbacks += 1;
            Ok(())
        })
        .unwrap();
        assert!(
            matches!(&verdict, Verdict::RolledBack { reason } if reason.contains("10-app")),
            "{verdict:?}"
        );
        assert_eq!(rollbacks, 1);
        let saved = HealthState::load(&state);
        assert!(saved.is_bad("c2"));
        assert_eq!(saved.bad_commits.len(), 1);
        assert_eq!(saved.last_healthy, None);

        // Nothing to roll back to: reported, not acted on.
        let (verdict, _) = gate(r, &state, "c2", false, Duration::from_secs(10), &mut || {
            panic!("no rollback")
        })
        .unwrap();
        assert!(matches!(verdict, Verdict::Unhealthy { .. }));
        assert_eq!(
            HealthState::load(&state).bad_commits.len(),
            1,
            "recorded once"
        );
    }

    #[test]
    fn a_deployment_that_was_healthy_is_not_rolled_back_later() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let state = r.join("state.json");
        script(
            r,
            "usr/lib/cairn/health.d/required/10-app",
            "test -e /nonexistent-cairn-flag || exit 0; exit 1",
        );
        let (v, _) = gate(r, &state, "c1", true, Duration::from_secs(10), &mut || {
            panic!("healthy")
        })
        .unwrap();
        assert_eq!(v, Verdict::Healthy);
        script(r, "usr/lib/cairn/health.d/required/10-app", "exit 1");
        let (v, _) = gate(r, &state, "c1", true, Duration::from_secs(10), &mut || {
            panic!("must not roll back")
        })
        .unwrap();
        assert!(matches!(v, Verdict::Unhealthy { .. }));
        assert!(!HealthState::load(&state).is_bad("c1"));
    }

    #[test]
    fn hung_and_broken_checks_fail_with_a_reason() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        script(r, "usr/lib/cairn/health.d/required/10-hang", "sleep 30");
        let plain = r.join("usr/lib/cairn/health.d/required/20-noexec");
        std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let report = run_checks(r, Duration::from_millis(300)).unwrap();
        let details: Vec<&str> = report.results.iter().map(|c| c.detail.as_str()).collect();
        assert_eq!(details, vec!["killed after 0s", "not executable"]);
        assert!(!report.healthy());
    }
}
