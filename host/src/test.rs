//! `host test`: boot tests for users' images (cairn-testbed), with results
//! as TAP on stdout and JUnit XML.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_testbed::report::{junit, tap_line, tap_plan};
use cairn_testbed::{
    Accel, BootOptions, CheckResult, Network, Observer, Outcome, UpdateSource, UpgradeOptions,
};
use cairn_updater::provision::config::{Update, User};
use cairn_updater::provision::NodeConfig;
use clap::{Args, Subcommand, ValueEnum};

#[derive(Debug, Subcommand)]
pub enum TestCommand {
    /// Boot IMAGE under QEMU on a throwaway overlay (the image is never
    /// written), provision it with an SSH key made for the run, and run
    /// each check in it as root. TAP on stdout; exit status 1 when a check
    /// fails or the machine does not come up.
    Boot(BootArgs),
    /// Boot the release a fleet runs now (--from) and run the checks;
    /// upgrade it to the head of --ref in the archive repository --repo
    /// (served over HTTP on loopback) with `host upgrade --reboot`, run
    /// them again; `host rollback --reboot`, run them once more (a check
    /// reads CAIRN_TEST_PHASE: boot, upgrade, rollback); then cut the
    /// power --power-cut times at random moments of further upgrades and
    /// rollbacks, checking that it boots a complete deployment each time.
    /// TAP on stdout.
    Upgrade(UpgradeArgs),
    /// What QEMU starts for each connection the machine opens to a
    /// forwarded port: relays stdin and stdout to 127.0.0.1:PORT.
    #[command(hide = true)]
    Relay { port: u16 },
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
    #[command(flatten)]
    machine: MachineArgs,
}

/// What both runs take: the machine and where results go.
#[derive(Debug, Args)]
pub struct MachineArgs {
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
    /// Let the machine reach this port of the build machine's loopback,
    /// as 10.0.2.4:PORT (CAIRN_TEST_HOST in a check's environment).
    /// Repeat for more ports.
    #[arg(long = "forward", value_name = "PORT")]
    forwards: Vec<u16>,
    /// Give the machine QEMU's whole user network: the build machine's
    /// loopback as 10.0.2.2 and whatever the build machine reaches.
    /// Without it the machine reaches only its forwarded ports: the image
    /// under test is not trusted with the build machine's services.
    #[arg(long)]
    open_network: bool,
}

impl MachineArgs {
    fn accel(&self) -> Accel {
        match self.accel {
            AccelArg::Tcg => Accel::Tcg,
            AccelArg::Kvm => Accel::Kvm,
        }
    }

    fn network(&self) -> Result<Network> {
        let exe = std::env::current_exe().context("finding this executable for the port relay")?;
        Ok(Network {
            forwards: self.forwards.clone(),
            open: self.open_network,
            relay: vec![exe.into(), "test".into(), "relay".into()],
        })
    }

    fn user_config(&self) -> Result<Option<NodeConfig>> {
        let Some(p) = &self.config else {
            return Ok(None);
        };
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        Ok(Some(NodeConfig::parse(&text, &p.display().to_string())?))
    }
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The disk image of the release to upgrade from (raw or qcow2).
    #[arg(long, value_name = "IMAGE")]
    from: PathBuf,
    /// The archive repository holding the new release, as `host compose`
    /// writes it (and as the fleet's server will serve it).
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The ref the machine follows in that repository; its head is the
    /// release under test.
    #[arg(long = "ref", value_name = "REF")]
    ref_: String,
    /// A check, run on the old release, after the upgrade and after the
    /// rollback: an executable, or a directory whose executable files are
    /// each one.
    #[arg(long = "check", value_name = "PATH")]
    checks: Vec<PathBuf>,
    /// Cut the power N times after the rollback, each at a random moment
    /// of an upgrade or a rollback (within the time the first one took).
    #[arg(long, value_name = "N", default_value_t = 0)]
    power_cut: u32,
    /// Seeds the moments of the power cuts (printed when not given).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// How long `host upgrade` may take to fetch and stage the release.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = crate::containers::parse_duration)]
    upgrade_timeout: Duration,
    #[command(flatten)]
    machine: MachineArgs,
}

pub fn run(cmd: TestCommand) -> Result<ExitCode> {
    match cmd {
        TestCommand::Boot(args) => boot(args),
        TestCommand::Upgrade(args) => upgrade(args),
        // Its streams are the machine's connection: an error goes nowhere
        // but the exit status, and QEMU closes the connection.
        TestCommand::Relay { port } => Ok(match cairn_testbed::relay(port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        }),
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
    let m = &args.machine;
    let user_config = m.user_config()?;
    let opts = BootOptions {
        image: args.image.clone(),
        checks,
        memory_mib: m.memory.div_ceil(1 << 20),
        cpus: m.cpus,
        accel: m.accel(),
        boot_timeout: m.boot_timeout,
        artifacts: m.artifacts.clone(),
        network: m.network()?,
    };
    print!("{}", tap_plan(opts.checks.len()));
    let report = cairn_testbed::boot(
        &opts,
        &|key| node_config(user_config.as_ref(), key, None),
        &mut Tap,
    )?;
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
    if let Some(first) = report.time_to_first_check {
        let console = match report.console_login_at {
            Some(t) => format!("{:.1} s", t.as_secs_f64()),
            None => "not seen".into(),
        };
        eprintln!(
            "host test: first check ran {:.1} s after the start (console login prompt: {console})",
            first.as_secs_f64(),
        );
    }
    let suite = format!("host test boot {}", args.image.display());
    finish(m, &suite, &results, report.total)
}

fn upgrade(args: UpgradeArgs) -> Result<ExitCode> {
    let checks = if args.checks.is_empty() {
        Vec::new()
    } else {
        cairn_testbed::discover(&args.checks)?
    };
    let m = &args.machine;
    let user_config = m.user_config()?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let opts = UpgradeOptions {
        from: args.from.clone(),
        repo: args.repo.clone(),
        ref_: args.ref_.clone(),
        checks,
        power_cuts: args.power_cut,
        seed,
        memory_mib: m.memory.div_ceil(1 << 20),
        cpus: m.cpus,
        accel: m.accel(),
        boot_timeout: m.boot_timeout,
        upgrade_timeout: args.upgrade_timeout,
        artifacts: m.artifacts.clone(),
        network: m.network()?,
    };
    // Fail on a bad repository or ref before anything boots.
    cairn_testbed::upgrade::ref_head(&opts.repo, &opts.ref_)?;
    print!("{}", tap_plan(opts.planned()));
    let report = cairn_testbed::upgrade(
        &opts,
        &|key, source| node_config(user_config.as_ref(), key, Some(source)),
        &mut Tap,
    )?;
    if report.results.len() < opts.planned() {
        if let Some(failed) = report.results.iter().find(|r| !r.passed()) {
            println!(
                "Bail out! {} failed: the steps after it did not run",
                failed.name
            );
        }
    }
    let secs = |d: Option<Duration>| match d {
        Some(d) => format!("{:.1} s", d.as_secs_f64()),
        None => "-".into(),
    };
    eprintln!(
        "host test: {} -> {}: upgrade and reboot {}, rollback and reboot {}; {} HTTP requests, {} bytes served\nhost test: static delta requests: {}",
        report.from_commit.as_deref().unwrap_or("?"),
        report.to_commit,
        secs(report.upgrade_wall),
        secs(report.rollback_wall),
        report.served.0,
        report.served.1,
        report.delta_requests
    );
    let suite = format!("host test upgrade {} -> {}", args.from.display(), args.ref_);
    finish(m, &suite, &report.results, report.total)
}

/// JUnit if asked, the summary line, and the exit status.
fn finish(
    m: &MachineArgs,
    suite: &str,
    results: &[CheckResult],
    total: Duration,
) -> Result<ExitCode> {
    if let Some(path) = &m.junit {
        write_junit(path, &junit(suite, results, total))?;
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    eprintln!(
        "host test: {} of {} passed in {:.1} s",
        results.len() - failed,
        results.len(),
        total.as_secs_f64()
    );
    if failed > 0 {
        eprintln!(
            "host test: {failed} failed; their console, journal and output are under {}",
            m.artifacts.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn write_junit(path: &Path, xml: &str) -> Result<()> {
    cairn_contracts::durable::write(path, xml.as_bytes())
        .with_context(|| format!("writing JUnit results to {}", path.display()))
}

/// The user's node config (or an empty one) with `key` among root's SSH
/// keys and, for an upgrade run, following the served repository; checked
/// as provisioning will check it.
fn node_config(
    user: Option<&NodeConfig>,
    key: &str,
    source: Option<&UpdateSource>,
) -> Result<String> {
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
    if let Some(source) = source {
        // The run decides where updates come from: the user's [update]
        // would point the machine elsewhere.
        config.update = Some(Update {
            ref_: source.refspec.clone(),
            url: Some(source.url.clone()),
        });
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
        let alone = NodeConfig::parse(&node_config(None, KEY, None).unwrap(), "t").unwrap();
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
        let merged = NodeConfig::parse(&node_config(Some(&user), KEY, None).unwrap(), "t").unwrap();
        assert_eq!(merged.hostname.as_deref(), Some("n1"));
        assert_eq!(merged.users.len(), 1);
        assert_eq!(merged.users[0].ssh_authorized_keys.len(), 2);
    }
}
