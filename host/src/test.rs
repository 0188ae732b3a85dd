//! `host test`: boot tests for users' images (cairn-testbed), with results
//! as TAP on stdout and JUnit XML.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_testbed::report::{junit, tap_line, tap_plan};
use cairn_testbed::{Accel, BootOptions, CheckResult, Observer, Outcome};
use cairn_updater::provision::config::User;
use cairn_updater::provision::NodeConfig;
use clap::{Args, Subcommand, ValueEnum};

#[derive(Debug, Subcommand)]
pub enum TestCommand {
    /// Boot IMAGE under QEMU on a throwaway overlay (the image is never
    /// written), provision it with an SSH key made for the run, and run
    /// each check in it as root. TAP on stdout; exit status 1 when a check
    /// fails or the machine does not come up.
    Boot(BootArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AccelArg {
    /// QEMU's emulator: slow, works everywhere.
    Tcg,
    /// Hardware virtualisation (/dev/kvm).
    Kvm,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// The disk image (raw or qcow2), as `host compose image` writes it.
    image: PathBuf,
    /// A check: an executable, or a directory whose executable files are
    /// each one (in name order). Settings in its header, e.g.
    /// `# cairn-test: timeout = 5m`, `reboot = true`, `memory = 2G`.
    #[arg(long = "check", value_name = "PATH", required = true)]
    checks: Vec<PathBuf>,
    /// A node config (docs/provisioning.md) to provision the machine with;
    /// the run's SSH key is added to root's keys.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Also write the results as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Where a failure's serial console, journal and output are saved.
    #[arg(long, value_name = "DIR", default_value = "host-test-artifacts")]
    artifacts: PathBuf,
    /// The machine's memory (a check's `memory` setting raises it).
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = crate::containers::parse_size)]
    memory: u64,
    #[arg(long, value_name = "N", default_value_t = 2)]
    cpus: u32,
    /// How long a boot may take to answer SSH (each reboot too).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = crate::containers::parse_duration)]
    boot_timeout: Duration,
    /// How QEMU runs the machine. TCG unless asked: on machines that are
    /// themselves VMs, KVM often starts and then hangs the guest's kernel.
    #[arg(long, value_enum, default_value = "tcg")]
    accel: AccelArg,
}

pub fn run(cmd: TestCommand) -> Result<ExitCode> {
    match cmd {
        TestCommand::Boot(args) => boot(args),
    }
}

/// TAP points on stdout as checks end, progress on stderr.
struct Tap;

impl Observer for Tap {
    fn step(&mut self, what: &str) {
        eprintln!("host test: {what}");
    }
    fn result(&mut self, n: usize, result: &CheckResult) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(tap_line(n, result).as_bytes());
        let _ = out.flush();
    }
}

fn boot(args: BootArgs) -> Result<ExitCode> {
    let checks = cairn_testbed::discover(&args.checks)?;
    let user_config = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(NodeConfig::parse(&text, &p.display().to_string())?)
        }
        None => None,
    };
    let opts = BootOptions {
        image: args.image.clone(),
        checks,
        memory_mib: args.memory.div_ceil(1 << 20),
        cpus: args.cpus,
        accel: match args.accel {
            AccelArg::Tcg => Accel::Tcg,
            AccelArg::Kvm => Accel::Kvm,
        },
        boot_timeout: args.boot_timeout,
        artifacts: args.artifacts.clone(),
    };
    print!("{}", tap_plan(opts.checks.len()));
    let report = cairn_testbed::boot(
        &opts,
        &|key| with_root_key(user_config.as_ref(), key),
        &mut Tap,
    )?;
    let suite = format!("host test boot {}", args.image.display());
    let mut results = report.results.clone();
    if let Some(why) = &report.boot_error {
        println!("Bail out! {} did not come up", args.image.display());
        eprintln!("error: {why}");
        if let Some(dir) = &report.boot_artifacts {
            eprintln!("host test: its serial console is in {}", dir.display());
        }
        results.push(CheckResult {
            name: "boot".into(),
            outcome: Outcome::Error { why: why.clone() },
            duration: report.total,
            reboots: 0,
            output: String::new(),
            artifacts: report.boot_artifacts.clone(),
        });
    }
    if let Some(path) = &args.junit {
        write_junit(path, &junit(&suite, &results, report.total))?;
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    if let Some(first) = report.time_to_first_check {
        let console = match report.console_login_at {
            Some(t) => format!("{:.1} s", t.as_secs_f64()),
            None => "not seen".into(),
        };
        eprintln!(
            "host test: first check ran {:.1} s after the start (console login prompt: {console}); \
             {} of {} checks passed in {:.1} s",
            first.as_secs_f64(),
            report.results.iter().filter(|r| r.passed()).count(),
            report.results.len(),
            report.total.as_secs_f64()
        );
    }
    if failed > 0 && report.boot_error.is_none() {
        eprintln!(
            "host test: {failed} failed; their console, journal and output are under {}",
            args.artifacts.display()
        );
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn write_junit(path: &Path, xml: &str) -> Result<()> {
    cairn_contracts::durable::write(path, xml.as_bytes())
        .with_context(|| format!("writing JUnit results to {}", path.display()))
}

/// The user's node config (or an empty one) with `key` among root's SSH
/// keys, checked as provisioning will check it.
fn with_root_key(user: Option<&NodeConfig>, key: &str) -> Result<String> {
    let mut config = user.cloned().unwrap_or_else(|| NodeConfig {
        version: 1,
        ..Default::default()
    });
    match config.users.iter_mut().find(|u| u.name == "root") {
        Some(root) => root.ssh_authorized_keys.push(key.to_string()),
        None => config.users.push(User {
            name: "root".into(),
            ssh_authorized_keys: vec![key.to_string()],
            ..Default::default()
        }),
    }
    let text = toml::to_string(&config).context("writing the node config")?;
    NodeConfig::parse(&text, "(the config with the run's SSH key)")?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvXJLvFt0ud1Q0Vsvm4d0VxqXbqQ3uS3mJc1oqGK9x7 run";

    #[test]
    fn the_runs_key_joins_roots_keys() {
        let alone = NodeConfig::parse(&with_root_key(None, KEY).unwrap(), "t").unwrap();
        assert_eq!(alone.users.len(), 1);
        assert_eq!(alone.users[0].ssh_authorized_keys, [KEY]);
        let user = NodeConfig::parse(
            &format!(
                "version = 1\nhostname = \"n1\"\n[[users]]\nname = \"root\"\nssh-authorized-keys = [\"{}\"]\n",
                KEY.replace(" run", " mine")
            ),
            "t",
        )
        .unwrap();
        let merged = NodeConfig::parse(&with_root_key(Some(&user), KEY).unwrap(), "t").unwrap();
        assert_eq!(merged.hostname.as_deref(), Some("n1"));
        assert_eq!(merged.users.len(), 1);
        assert_eq!(merged.users[0].ssh_authorized_keys.len(), 2);
    }
}
