//! `host test upgrade`: boot the release a fleet runs now, upgrade it over
//! HTTP to the head of a ref in an archive repository, run the checks on
//! the new deployment, roll back, run them again; then cut the power at
//! random moments of further upgrades and rollbacks and prove that each
//! time the machine boots a complete deployment.
//!
//! Each step is one result (TAP point, JUnit case): `boot`, the checks on
//! the old release as `boot/NAME`, `upgrade`, the checks again as
//! `upgrade/NAME`, `rollback`, `rollback/NAME`, `power cut N`. A check
//! learns which from `CAIRN_TEST_PHASE` (`boot`, `upgrade`, `rollback`).
//! When the boot, the upgrade or the rollback fails, the steps after it do
//! not run (the caller bails out).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_contracts::names::{REMOTE, STATEROOT};
use serde_json::Value;

use crate::boot::{
    install_helpers, quote, run_check, save_console, save_failure, start_machine, Limits,
    MachineSpec, Phase,
};
use crate::check::Check;
use crate::http::HttpServer;
use crate::machine::{Accel, Machine, Network, FORWARDED_HOST};
use crate::report::{CheckResult, Outcome};
use crate::Observer;

/// What `host test upgrade` is asked for.
#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    /// The image of the release to upgrade from.
    pub from: PathBuf,
    /// An archive repository holding `ref_`.
    pub repo: PathBuf,
    pub ref_: String,
    pub checks: Vec<Check>,
    /// Power cuts after the rollback, each at a random moment of an
    /// upgrade or a rollback.
    pub power_cuts: u32,
    /// Seeds those moments (the same seed, the same moments).
    pub seed: u64,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    /// How long a boot may take to reach SSH.
    pub boot_timeout: Duration,
    /// How long `host upgrade` may take to fetch and stage.
    pub upgrade_timeout: Duration,
    pub artifacts: PathBuf,
    /// The run's HTTP server is forwarded besides.
    pub network: Network,
}

impl UpgradeOptions {
    /// How many results a run that goes to its end reports.
    pub fn planned(&self) -> usize {
        3 + 3 * self.checks.len() + self.power_cuts as usize
    }
}

/// Where the machine fetches its update from: its node config must say so.
#[derive(Debug, Clone)]
pub struct UpdateSource {
    /// `REMOTE:REF`
    pub refspec: String,
    /// The served repository, as the machine reaches it.
    pub url: String,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct UpgradeReport {
    pub results: Vec<CheckResult>,
    /// The commit the image booted.
    pub from_commit: Option<String>,
    /// The head of the ref: what the upgrade must boot.
    pub to_commit: String,
    /// From `host upgrade --reboot` to SSH on the new deployment.
    pub upgrade_wall: Option<Duration>,
    pub rollback_wall: Option<Duration>,
    /// Requests and bytes the HTTP server answered.
    pub served: (usize, u64),
    /// Of those requests, how many were for static deltas.
    pub delta_requests: usize,
    pub total: Duration,
}

impl UpgradeReport {
    pub fn passed(&self) -> bool {
        self.results.iter().all(CheckResult::passed)
    }
}

/// Run the whole scenario. An error is something the run itself could not
/// do (no QEMU, a bad repository); whatever the machine does is a result.
pub fn upgrade(
    opts: &UpgradeOptions,
    node_config: &dyn Fn(&str, &UpdateSource) -> Result<String>,
    obs: &mut dyn Observer,
) -> Result<UpgradeReport> {
    let started = Instant::now();
    let to_commit = ref_head(&opts.repo, &opts.ref_)?;
    let work = crate::machine::work_dir()?;
    let server = HttpServer::start(&opts.repo, Some(&work.path().join("http.log")))?;
    let source = UpdateSource {
        refspec: format!("{REMOTE}:{}", opts.ref_),
        url: format!("http://{FORWARDED_HOST}:{}/", server.port),
    };
    obs.step(&format!(
        "serving {} on 127.0.0.1:{} ({} in the machine); {} is at {to_commit}",
        opts.repo.display(),
        server.port,
        source.url,
        opts.ref_
    ));
    let mut network = opts.network.clone();
    network.forwards.push(server.port);
    let mut m = start_machine(
        &MachineSpec {
            image: &opts.from,
            checks: &opts.checks,
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            accel: opts.accel,
            network: &network,
        },
        work.path(),
        |key| node_config(key, &source),
        obs,
    )?;
    let mut run = Run {
        report: UpgradeReport {
            to_commit,
            ..Default::default()
        },
        opts,
        obs,
    };
    let _ = run.scenario(&mut m, work.path());
    m.kill();
    let (requests, bytes, _) = server.served_since(0);
    run.report.served = (requests, bytes);
    run.report.delta_requests = server.requests_under("/deltas/");
    run.report.total = started.elapsed();
    Ok(run.report)
}

/// The state of one run; each step pushes its result.
struct Run<'a> {
    report: UpgradeReport,
    opts: &'a UpgradeOptions,
    obs: &'a mut dyn Observer,
}

/// A step failed and the scenario cannot go on.
struct Stop;

impl Run<'_> {
    fn push(&mut self, result: CheckResult) -> std::result::Result<(), Stop> {
        let passed = result.passed();
        self.report.results.push(result);
        self.obs.result(
            self.report.results.len(),
            self.report.results.last().unwrap(),
        );
        if passed {
            Ok(())
        } else {
            Err(Stop)
        }
    }

    /// A step's result; on failure the machine's console and journal (or
    /// only the console, when it does not answer) go to `artifacts/NAME`.
    fn step_result(
        &self,
        m: &Machine,
        name: &str,
        started: Instant,
        output: String,
        outcome: Result<()>,
    ) -> CheckResult {
        let mut r = CheckResult {
            name: name.to_string(),
            outcome: Outcome::Passed,
            duration: started.elapsed(),
            reboots: 0,
            output,
            artifacts: None,
        };
        if let Err(e) = outcome {
            r.outcome = Outcome::Error {
                why: format!("{e:#}"),
            };
            let dir = self.opts.artifacts.join(name.replace(' ', "-"));
            let saved = save_failure(m, &dir, &r.output).or_else(|_| save_console(m, &dir));
            if saved.is_ok() {
                r.artifacts = Some(dir);
            }
        }
        r
    }

    fn scenario(&mut self, m: &mut Machine, work: &Path) -> std::result::Result<(), Stop> {
        let opts = self.opts;
        // ---- boot the old release
        let t = Instant::now();
        let booted = m.wait_for_ssh(opts.boot_timeout, None).and_then(|id| {
            let st = status(m)?;
            let from = booted_commit(&st)?;
            if from == self.report.to_commit {
                bail!(
                    "{} already runs {}'s head {from}: there is nothing to upgrade to",
                    opts.from.display(),
                    opts.ref_
                );
            }
            Ok((id, from))
        });
        let (mut boot_id, from) = match booted {
            Ok(v) => v,
            Err(e) => {
                let r = self.step_result(m, "boot", t, String::new(), Err(e));
                m.kill();
                return self.push(r);
            }
        };
        self.report.from_commit = Some(from.clone());
        let to = self.report.to_commit.clone();
        self.obs.step(&format!(
            "up after {:.0} s on {from}",
            t.elapsed().as_secs_f64()
        ));
        let r = self.step_result(m, "boot", t, String::new(), Ok(()));
        self.push(r)?;
        // The checks on the old release first: a check that fails here
        // fails without the upgrade, and one can leave state for later.
        // (A machine that cannot take the helpers fails each check.)
        let _ = install_helpers(m);
        self.checks(m, &mut boot_id, Phase::Boot);

        // ---- upgrade, then the checks on the new deployment
        let (wall, output, outcome) = self.switch(m, &mut boot_id, "host upgrade --reboot", &to);
        self.report.upgrade_wall = Some(wall);
        let outcome = outcome.and_then(|st| {
            let rollback = deployments(&st)
                .into_iter()
                .find(|d| d["booted"] != true)
                .and_then(|d| d["checksum"].as_str().map(str::to_string));
            if rollback.as_deref() != Some(from.as_str()) {
                bail!("{from} is not the rollback deployment after the upgrade: {st:#}");
            }
            Ok(())
        });
        let r = self.step_result(m, "upgrade", Instant::now() - wall, output, outcome);
        self.push(r)?;
        self.checks(m, &mut boot_id, Phase::Upgrade);

        // ---- rollback, then the checks on the old release again
        let (wall, output, outcome) = self.switch(m, &mut boot_id, "host rollback --reboot", &from);
        self.report.rollback_wall = Some(wall);
        let r = self.step_result(
            m,
            "rollback",
            Instant::now() - wall,
            output,
            outcome.map(drop),
        );
        self.push(r)?;
        self.checks(m, &mut boot_id, Phase::Rollback);

        // ---- power cuts
        if opts.power_cuts > 0 {
            self.obs.step(&format!(
                "{} power cuts, seed {} (--seed {} cuts at the same moments)",
                opts.power_cuts, opts.seed, opts.seed
            ));
        }
        let mut rng = SplitMix64(opts.seed);
        let mut on = from.clone();
        for n in 1..=opts.power_cuts {
            let (op, window) = if on == from {
                ("host upgrade --reboot", self.report.upgrade_wall)
            } else {
                ("host rollback --reboot", self.report.rollback_wall)
            };
            let window = window.unwrap_or(Duration::from_secs(60)).as_millis() as u64;
            let at = Duration::from_millis(rng.next() % window.max(1));
            let name = format!("power cut {n}");
            let t = Instant::now();
            let log = work.join(format!("power-cut-{n}.log"));
            let (output, outcome) = match self.power_cut(m, op, at, &log, [&from, &to]) {
                Ok((now, output)) => {
                    on = now;
                    (output, Ok(()))
                }
                Err((output, e)) => (output, Err(e)),
            };
            let r = self.step_result(m, &name, t, output, outcome);
            self.push(r)?;
        }
        Ok(())
    }

    /// Run `command` (it reboots), wait for the next boot and check that
    /// it booted `expect`. Its wall time, output and the new status.
    fn switch(
        &mut self,
        m: &mut Machine,
        boot_id: &mut String,
        command: &str,
        expect: &str,
    ) -> (Duration, String, Result<Value>) {
        self.obs.step(&format!("{command} (to {expect})"));
        let t = Instant::now();
        let ran = match m.run(command, None, self.opts.upgrade_timeout) {
            Ok(r) => r,
            Err(e) => return (t.elapsed(), String::new(), Err(e)),
        };
        let mut output = ran.output.clone();
        // 255: ssh lost the connection, as the machine went down.
        let outcome = match ran.status {
            Some(0) | Some(255) => m
                .wait_for_ssh(self.opts.boot_timeout, Some(boot_id))
                .with_context(|| format!("after `{command}`"))
                .and_then(|id| {
                    *boot_id = id;
                    let _ = install_helpers(m);
                    let st = status(m)?;
                    let now = booted_commit(&st)?;
                    if now != expect {
                        bail!("`{command}` booted {now}, not {expect}");
                    }
                    Ok(st)
                }),
            Some(code) => Err(anyhow::anyhow!("`{command}` failed (exit status {code})")),
            None => Err(anyhow::anyhow!(
                "`{command}` did not end within {} s",
                self.opts.upgrade_timeout.as_secs()
            )),
        };
        let wall = t.elapsed();
        output.push_str(&format!(
            "({command}: {:.1} s to SSH on the next boot)\n",
            wall.as_secs_f64()
        ));
        (wall, output, outcome)
    }

    /// Each check as `PHASE/NAME`, its failure's logs under `artifacts/PHASE`.
    fn checks(&mut self, m: &mut Machine, boot_id: &mut String, phase: Phase) {
        let opts = self.opts;
        let artifacts = opts.artifacts.join(phase.name());
        for check in &opts.checks {
            self.obs
                .step(&format!("{}: running {}", phase.name(), check.name));
            let mut r = run_check(
                m,
                check,
                boot_id,
                &Limits {
                    boot_timeout: opts.boot_timeout,
                    artifacts: &artifacts,
                    phase,
                },
                self.obs,
            );
            r.name = format!("{}/{}", phase.name(), r.name);
            // A failed check does not stop the scenario: the next phase
            // is worth knowing about too.
            let _ = self.push(r);
        }
    }

    /// Start `op`, cut the power `at` into it, boot again: the commit the
    /// machine came up on (one of `allowed`), its boot id and what it said.
    fn power_cut(
        &mut self,
        m: &mut Machine,
        op: &str,
        at: Duration,
        log: &Path,
        allowed: [&str; 2],
    ) -> std::result::Result<(String, String), (String, anyhow::Error)> {
        self.obs.step(&format!(
            "`{op}`, the power cut {:.1} s into it",
            at.as_secs_f64()
        ));
        let before = m
            .run(
                "cat /proc/sys/kernel/random/boot_id",
                None,
                Duration::from_secs(60),
            )
            .map(|r| r.output.trim().to_string())
            .unwrap_or_default();
        let mut ssh = m
            .spawn(&format!("{op} 2>&1"), log)
            .map_err(|e| (String::new(), e))?;
        std::thread::sleep(at);
        let console = m.power_cut_and_restart();
        let _ = ssh.kill();
        let _ = ssh.wait();
        let said = std::fs::read_to_string(log).unwrap_or_default();
        let mut output = format!(
            "power cut {:.1} s into `{op}`; what it printed by then:\n{said}",
            at.as_secs_f64()
        );
        let console = console.map_err(|e| (output.clone(), e))?;
        output.push_str(&format!(
            "(the console up to the cut: {})\n",
            console.display()
        ));
        let checked = m
            .wait_for_ssh(self.opts.boot_timeout, Some(&before))
            .context("after the power cut")
            .and_then(|_| {
                let st = status(m)?;
                let now = booted_commit(&st)?;
                if !allowed.contains(&now.as_str()) {
                    bail!("it booted {now}, neither {} nor {}", allowed[0], allowed[1]);
                }
                complete_deployments(m, &st)?;
                Ok(now)
            });
        match checked {
            Ok(now) => {
                let which = if now == allowed[0] {
                    "the old release"
                } else {
                    "the new release"
                };
                output.push_str(&format!("booted {now}, every deployment complete\n"));
                self.obs.step(&format!(
                    "power cut {:.1} s into `{op}` (last output seen: {}): booted {which}, every deployment complete",
                    at.as_secs_f64(),
                    last_output_seen(&said)
                ));
                Ok((now, output))
            }
            Err(e) => Err((output, e)),
        }
    }
}

/// What the command had been seen to print when the cut came. Output in
/// flight is lost with the machine, so this names the last thing seen, not
/// the phase the cut landed in: an upgrade to a release that is already the
/// rollback target, for one, only reorders the boot entries and reboots
/// within seconds of its last line.
fn last_output_seen(said: &str) -> &'static str {
    if said.contains("closed by remote host") || said.contains("Connection to") {
        "the connection closed by the reboot"
    } else if said.contains("Staged") || said.contains("boots next") {
        "the new boot configuration written"
    } else if said.contains("Update on") || said.contains("fetched") {
        "the update fetched"
    } else if said.contains("Fetching") {
        "the fetch begun"
    } else {
        "nothing yet"
    }
}

/// `host status --json` of the machine.
fn status(m: &Machine) -> Result<Value> {
    let ran = m.ok_stdout("host status --json")?;
    serde_json::from_str(&ran.stdout)
        .with_context(|| format!("reading `host status --json`: {}", ran.output.trim()))
}

fn deployments(st: &Value) -> Vec<&Value> {
    st["deployments"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn booted_commit(st: &Value) -> Result<String> {
    deployments(st)
        .into_iter()
        .find(|d| d["booted"] == true)
        .and_then(|d| d["checksum"].as_str())
        .map(str::to_string)
        .with_context(|| format!("`host status --json` names no booted deployment: {st}"))
}

/// Every deployment `host status` lists has its tree and its origin.
fn complete_deployments(m: &Machine, st: &Value) -> Result<()> {
    for d in deployments(st) {
        let (Some(csum), Some(serial)) = (d["checksum"].as_str(), d["serial"].as_u64()) else {
            bail!("a deployment without checksum or serial: {d}");
        };
        if !is_checksum(csum) {
            bail!("not a checksum: {csum:?}");
        }
        let dir = format!("/ostree/deploy/{STATEROOT}/deploy/{csum}.{serial}");
        m.ok(&format!(
            "test -d {0}/usr/bin && test -f {1}",
            quote(&dir),
            quote(&format!("{dir}.origin"))
        ))
        .with_context(|| format!("deployment {csum}.{serial} is incomplete"))?;
    }
    Ok(())
}

fn is_checksum(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The commit `ref_` names in the archive repository `repo`, read without
/// leaving it (the ref's characters are checked, no component is a symlink).
pub fn ref_head(repo: &Path, ref_: &str) -> Result<String> {
    let ok = !ref_.is_empty()
        && ref_.len() <= 255
        && ref_.split('/').all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if !ok {
        bail!("--ref {ref_:?}: a ref is names of letters, digits, `.`, `_` and `-` joined by `/`");
    }
    let config = read_small(&repo.join("config"), 64 << 10)
        .with_context(|| format!("{} is not an OSTree repository (no config)", repo.display()))?;
    let mode = config
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("mode")
                .map(|v| v.trim_start_matches([' ', '=']))
        })
        .unwrap_or("bare");
    if !mode.trim().starts_with("archive") {
        bail!(
            "{} is a `{}` repository: a machine fetches over HTTP only from an archive repository \
             (host compose writes one)",
            repo.display(),
            mode.trim()
        );
    }
    let path: PathBuf = ["refs", "heads"]
        .iter()
        .chain(ref_.split('/').collect::<Vec<_>>().iter())
        .collect();
    let text = read_small(&repo.join(&path), 128)
        .with_context(|| format!("{} has no ref {ref_}", repo.display()))?;
    let commit = text.trim();
    if !is_checksum(commit) {
        bail!(
            "ref {ref_} in {} holds {commit:?}, not a commit checksum",
            repo.display()
        );
    }
    Ok(commit.to_string())
}

/// A regular file of at most `limit` bytes, opened without following a
/// symlink at its last component.
fn read_small(path: &Path, limit: u64) -> Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if !f.metadata()?.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mut text = String::new();
    f.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        bail!("{} is larger than {limit} bytes", path.display());
    }
    Ok(text)
}

/// A small, seedable generator for the moments of the power cuts.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(mode: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config"),
            format!("[core]\nrepo_version=1\nmode={mode}\n"),
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("refs/heads/cairn/x")).unwrap();
        d
    }

    #[test]
    fn the_refs_head_is_read_inside_the_repository() {
        let c = "a".repeat(64);
        let d = repo("archive-z2");
        std::fs::write(d.path().join("refs/heads/cairn/x/green"), format!("{c}\n")).unwrap();
        assert_eq!(ref_head(d.path(), "cairn/x/green").unwrap(), c);
        for bad in [
            "../../config",
            "cairn/../x",
            "/etc/passwd",
            "",
            "cairn//x",
            "cairn/x/.hidden",
        ] {
            let e = ref_head(d.path(), bad).unwrap_err().to_string();
            assert!(e.contains("--ref"), "{bad:?}: {e}");
        }
        let e = format!("{:#}", ref_head(d.path(), "cairn/x/blue").unwrap_err());
        assert!(e.contains("has no ref cairn/x/blue"), "{e}");
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("refs/heads/cairn/x/link"))
            .unwrap();
        assert!(ref_head(d.path(), "cairn/x/link").is_err());
        std::fs::write(d.path().join("refs/heads/cairn/x/junk"), "not a commit").unwrap();
        let e = ref_head(d.path(), "cairn/x/junk").unwrap_err().to_string();
        assert!(e.contains("not a commit checksum"), "{e}");
        let bare = repo("bare");
        let e = ref_head(bare.path(), "cairn/x/green")
            .unwrap_err()
            .to_string();
        assert!(e.contains("archive repository"), "{e}");
        let e = format!(
            "{:#}",
            ref_head(&d.path().join("nosuch"), "cairn/x").unwrap_err()
        );
        assert!(e.contains("not an OSTree repository"), "{e}");
    }

    #[test]
    fn the_same_seed_cuts_at_the_same_moments() {
        let a: Vec<u64> = {
            let mut r = SplitMix64(7);
            (0..3).map(|_| r.next() % 1000).collect()
        };
        let mut r = SplitMix64(7);
        assert_eq!(a, (0..3).map(|_| r.next() % 1000).collect::<Vec<_>>());
        let mut other = SplitMix64(8);
        assert_ne!(a, (0..3).map(|_| other.next() % 1000).collect::<Vec<_>>());
    }
}
