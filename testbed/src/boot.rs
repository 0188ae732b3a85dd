//! `host test boot`: boot an image, run each check as root over SSH, reboot
//! when a check asks (autopkgtest's mark API), and report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::check::Check;
use crate::machine::{ephemeral_key, Accel, Machine, MachineConfig, Network, FORWARDED_HOST};
use crate::report::{CheckResult, Outcome};

/// The machine's directory for checks, helpers and the reboot mark.
const GUEST_DIR: &str = "/var/lib/cairn-test";
/// What `cairn-test-reboot MARK` writes before it stops the check.
const MARK_FILE: &str = "/var/lib/cairn-test/reboot-mark";
/// How many reboots one check may ask for.
const MAX_REBOOTS: u32 = 10;
/// The most of a mark read back.
const MAX_MARK: usize = 4096;

/// The reboot helper a check calls: `cairn-test-reboot MARK` (also as
/// `/tmp/autopkgtest-reboot`). It records the mark durably, then kills the
/// check's process group (the `timeout` the runner started leads it), so
/// that the runner reboots the machine and runs the check again with
/// `CAIRN_TEST_REBOOT_MARK=MARK`.
const REBOOT_HELPER: &str = r#"#!/bin/sh
# cairn-test-reboot MARK: reboot the machine, then run this check again
# with CAIRN_TEST_REBOOT_MARK=MARK (and AUTOPKGTEST_REBOOT_MARK=MARK).
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: cairn-test-reboot MARK" >&2
    exit 2
fi
printf '%s' "$1" > /var/lib/cairn-test/reboot-mark.tmp &&
    sync /var/lib/cairn-test/reboot-mark.tmp &&
    mv /var/lib/cairn-test/reboot-mark.tmp /var/lib/cairn-test/reboot-mark &&
    sync /var/lib/cairn-test || exit 1
kill -KILL 0
"#;

/// What `host test boot` is asked for.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub image: PathBuf,
    pub checks: Vec<Check>,
    /// Memory in MiB; a check's `memory` raises it.
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    /// How long a boot (first or after a reboot) may take to reach SSH.
    pub boot_timeout: Duration,
    /// Where a failure's serial console and journal are saved.
    pub artifacts: PathBuf,
    pub network: Network,
}

/// What a run found.
#[derive(Debug)]
pub struct BootReport {
    pub results: Vec<CheckResult>,
    /// From the start to the first check running.
    pub time_to_first_check: Option<Duration>,
    /// From QEMU's start to the first login prompt on the serial console
    /// (multi-user reached), if one was seen before SSH answered.
    pub console_login_at: Option<Duration>,
    pub total: Duration,
    /// The machine never came up: why, with its console's end.
    pub boot_error: Option<String>,
    /// Where the console of a failed boot was saved.
    pub boot_artifacts: Option<PathBuf>,
}

impl BootReport {
    pub fn passed(&self) -> bool {
        self.boot_error.is_none() && self.results.iter().all(CheckResult::passed)
    }
}

/// What the caller sees while a run goes on.
pub trait Observer {
    /// A step (booting, up, rebooting): a line of progress.
    fn step(&mut self, what: &str);
    /// Check number `n` (from 1) ended.
    fn result(&mut self, n: usize, result: &CheckResult);
}

/// Boot `opts.image` on an overlay, provisioned with the node config
/// `node_config` makes from the run's public SSH key, and run the checks.
/// An error is something the run itself could not do (no QEMU, a bad
/// image file); a machine that does not come up is a report with
/// `boot_error`.
pub fn boot(
    opts: &BootOptions,
    node_config: &dyn Fn(&str) -> Result<String>,
    obs: &mut dyn Observer,
) -> Result<BootReport> {
    let started = Instant::now();
    let work = crate::machine::work_dir()?;
    let mut machine = start_machine(
        &MachineSpec {
            image: &opts.image,
            checks: &opts.checks,
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            accel: opts.accel,
            network: &opts.network,
        },
        work.path(),
        |key| node_config(key),
        obs,
    )?;
    let mut report = BootReport {
        results: Vec::new(),
        time_to_first_check: None,
        console_login_at: None,
        total: Duration::ZERO,
        boot_error: None,
        boot_artifacts: None,
    };
    let mut boot_id = match machine.wait_for_ssh(opts.boot_timeout, None) {
        Ok(id) => id,
        Err(e) => {
            machine.kill();
            let dir = opts.artifacts.join("boot");
            report.boot_artifacts = save_console(&machine, &dir).ok().map(|_| dir);
            report.boot_error = Some(format!("{e:#}"));
            report.total = started.elapsed();
            return Ok(report);
        }
    };
    report.console_login_at = machine.console_login_at;
    obs.step(&format!(
        "up after {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    install_helpers(&machine)?;
    for (i, check) in opts.checks.iter().enumerate() {
        if report.time_to_first_check.is_none() {
            report.time_to_first_check = Some(started.elapsed());
        }
        obs.step(&format!("running {}", check.name));
        let result = run_check(
            &mut machine,
            check,
            &mut boot_id,
            &Limits {
                boot_timeout: opts.boot_timeout,
                artifacts: &opts.artifacts,
                phase: Phase::Boot,
            },
            obs,
        );
        obs.result(i + 1, &result);
        report.results.push(result);
    }
    report.total = started.elapsed();
    Ok(report)
}

/// The machine a run boots.
pub(crate) struct MachineSpec<'a> {
    pub image: &'a Path,
    pub checks: &'a [Check],
    /// Memory in MiB; a check's `memory` raises it.
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    pub network: &'a Network,
}

/// Make the run's SSH key, write the node config `node_config` makes from
/// its public half, and power the machine on (in `work`).
pub(crate) fn start_machine(
    spec: &MachineSpec,
    work: &Path,
    node_config: impl FnOnce(&str) -> Result<String>,
    obs: &mut dyn Observer,
) -> Result<Machine> {
    let key = ephemeral_key(work)?;
    let config_path = work.join("node.toml");
    std::fs::write(&config_path, node_config(&key.public)?)?;
    let memory_mib = spec
        .checks
        .iter()
        .filter_map(|c| c.memory_mib)
        .fold(spec.memory_mib, u64::max);
    obs.step(&format!(
        "booting {} ({memory_mib} MiB, {} CPUs, {})",
        spec.image.display(),
        spec.cpus,
        spec.accel.name()
    ));
    Machine::start(
        MachineConfig {
            image: spec.image.to_path_buf(),
            memory_mib,
            cpus: spec.cpus,
            accel: spec.accel,
            node_config: config_path,
            workdir: work.to_path_buf(),
            network: spec.network.clone(),
        },
        &key,
    )
}

/// What a check's run needs besides the check: how long a reboot it asks
/// for may take, and where its failure's logs go.
pub(crate) struct Limits<'a> {
    pub boot_timeout: Duration,
    pub artifacts: &'a Path,
    /// What the machine runs now, given to the check as
    /// `CAIRN_TEST_PHASE`.
    pub phase: Phase,
}

/// Where in a run a check runs; a check reads it from `CAIRN_TEST_PHASE`
/// (e.g. to write state before an upgrade and verify it after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The image as it boots: `test boot`, and `test upgrade` before it
    /// upgrades.
    Boot,
    /// After `host upgrade --reboot`: the new release.
    Upgrade,
    /// After `host rollback --reboot`: the old release again.
    Rollback,
}

impl Phase {
    /// Its name: the value of `CAIRN_TEST_PHASE`, and the prefix of a
    /// `test upgrade` result (`upgrade/NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Boot => "boot",
            Phase::Upgrade => "upgrade",
            Phase::Rollback => "rollback",
        }
    }
}

pub(crate) fn install_helpers(m: &Machine) -> Result<()> {
    let helper = format!("{GUEST_DIR}/bin/cairn-test-reboot");
    m.ok(&format!(
        "set -e; mkdir -p {GUEST_DIR}/bin {GUEST_DIR}/checks; chmod 0700 {GUEST_DIR}; \
         cat > {helper}.tmp <<'CAIRN_EOF'\n{REBOOT_HELPER}CAIRN_EOF\n\
         chmod 0755 {helper}.tmp; mv {helper}.tmp {helper}; \
         ln -sfn {helper} /tmp/autopkgtest-reboot"
    ))
    .context("installing the reboot helper in the machine")?;
    Ok(())
}

/// Single-quoted for the machine's shell.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub(crate) fn run_check(
    m: &mut Machine,
    check: &Check,
    boot_id: &mut String,
    opts: &Limits,
    obs: &mut dyn Observer,
) -> CheckResult {
    let started = Instant::now();
    let mut result = CheckResult {
        name: check.name.clone(),
        outcome: Outcome::Passed,
        duration: Duration::ZERO,
        reboots: 0,
        output: String::new(),
        artifacts: None,
    };
    result.outcome = match drive(m, check, boot_id, opts, obs, &mut result) {
        Ok(o) => o,
        Err(e) => Outcome::Error {
            why: format!("{e:#}"),
        },
    };
    result.duration = started.elapsed();
    if !result.passed() {
        let dir = opts.artifacts.join(&check.name);
        if save_failure(m, &dir, &result.output).is_ok() {
            result.artifacts = Some(dir);
        }
    }
    result
}

/// Copy the check in, run it, reboot while it asks; its outcome.
fn drive(
    m: &mut Machine,
    check: &Check,
    boot_id: &mut String,
    opts: &Limits,
    obs: &mut dyn Observer,
    result: &mut CheckResult,
) -> Result<Outcome> {
    let target = format!("{GUEST_DIR}/checks/{}", check.name);
    let q = quote(&target);
    let upload = m.run(
        &format!("cat > {q}.tmp && chmod 0755 {q}.tmp && mv {q}.tmp {q}"),
        Some(&check.path),
        Duration::from_secs(300),
    )?;
    if upload.status != Some(0) {
        anyhow::bail!(
            "copying {} into the machine failed: {}",
            check.path.display(),
            upload.output.trim()
        );
    }
    let mut mark: Option<String> = None;
    loop {
        let mut env = format!(
            "CAIRN_TEST_PHASE={} CAIRN_TEST_HOST={FORWARDED_HOST} ",
            opts.phase.name()
        );
        if let Some(m) = &mark {
            env.push_str(&format!(
                "CAIRN_TEST_REBOOT_MARK={0} AUTOPKGTEST_REBOOT_MARK={0} ",
                quote(m)
            ));
        }
        let script = format!(
            "rm -f {MARK_FILE}; cd {GUEST_DIR} && {env}PATH={GUEST_DIR}/bin:$PATH \
             timeout -k 10 {secs} {q} 2>&1",
            secs = check.timeout.as_secs().max(1)
        );
        let ran = m.run(&script, None, check.timeout + Duration::from_secs(60))?;
        result.output.push_str(&ran.output);
        match ran.status {
            None => {
                return Ok(Outcome::TimedOut {
                    after: check.timeout,
                })
            }
            Some(124) | Some(137) if ran.elapsed >= check.timeout => {
                return Ok(Outcome::TimedOut {
                    after: check.timeout,
                })
            }
            _ => {}
        }
        let asked = m
            .run(
                &format!("cat {MARK_FILE} 2>/dev/null"),
                None,
                Duration::from_secs(60),
            )
            .ok()
            .filter(|r| r.status == Some(0))
            .map(|r| r.output.chars().take(MAX_MARK).collect::<String>());
        let Some(next) = asked else {
            return Ok(match ran.status {
                Some(0) => Outcome::Passed,
                Some(255) if m.run("true", None, Duration::from_secs(30))?.status != Some(0) => {
                    Outcome::Error {
                        why: "the connection to the machine went away (did it reboot or crash? \
                              a check reboots with cairn-test-reboot MARK)"
                            .into(),
                    }
                }
                Some(code) => Outcome::Failed { exit: code },
                None => unreachable!("handled above"),
            });
        };
        if !check.reboot {
            anyhow::bail!(
                "it asked for a reboot (mark {next:?}), but its header does not allow one: \
                 add `# cairn-test: reboot = true`"
            );
        }
        if result.reboots >= MAX_REBOOTS {
            anyhow::bail!("it asked for more than {MAX_REBOOTS} reboots");
        }
        obs.step(&format!("{}: rebooting (mark {next:?})", check.name));
        let _ = m.run(
            &format!("rm -f {MARK_FILE}; sync; systemctl reboot"),
            None,
            Duration::from_secs(60),
        );
        *boot_id = m
            .wait_for_ssh(opts.boot_timeout, Some(boot_id))
            .context("after the reboot it asked for")?;
        install_helpers(m)?;
        result.reboots += 1;
        mark = Some(next);
    }
}

pub(crate) fn save_console(m: &Machine, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(&m.serial_log, dir.join("serial.log"))?;
    Ok(())
}

/// The console, the journal of the boot the check failed in and its output.
pub(crate) fn save_failure(m: &Machine, dir: &Path, output: &str) -> Result<()> {
    save_console(m, dir)?;
    std::fs::write(dir.join("output.txt"), output)?;
    let journal = match m.run(
        "journalctl -b --no-pager -o short-monotonic",
        None,
        Duration::from_secs(120),
    ) {
        Ok(r) if r.status == Some(0) => r.output,
        Ok(r) => format!("(journalctl failed: {:?})\n{}", r.status, r.output),
        Err(e) => format!("(the machine did not answer: {e:#})\n"),
    };
    std::fs::write(dir.join("journal.txt"), journal)?;
    Ok(())
}
