//! `host app` commands that run and supervise containers: the ones both
//! executables serve (see `exe.rs`), so they never need libostree. Argument
//! parsing only; the work is done by `cairn_runtime`.

use std::ffi::OsString;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use cairn_contracts::network::{read_node_network, DEFAULT_BRIDGE, DEFAULT_SUBNET, NODE_NETWORK};
use cairn_contracts::services::{ServicePort, REGISTRATION_DIR};
use cairn_runtime::cgroup::{self, Limits};
use cairn_runtime::container::PendingUserns;
use cairn_runtime::engine::{HealthCheck, MIN_HEALTH_INTERVAL};
use cairn_runtime::image::ImageInfo;
use cairn_runtime::net::NetworkConfig;
use cairn_runtime::spec::Volume;
use cairn_runtime::state::{RestartPolicy, DEFAULT_ROOT};
use cairn_runtime::{RunOptions, RunOutcome, Runtime};

/// An image and its checkout.
pub type CheckedOut = (ImageInfo, PathBuf);
use clap::{Args, Subcommand};

mod quick;
#[allow(unused_imports)] // used by the container executable only
pub use quick::{quick_run, QuickRun};

/// The environment variables that stand in for flags (clap's `env`, and
/// [`quick_run`]).
pub const ENV_ROOT: &str = "CAIRN_ROOT";
pub const ENV_BAKED_APPS: &str = "CAIRN_BAKED_APPS";
pub const ENV_BRIDGE: &str = "CAIRN_BRIDGE";
pub const ENV_SUBNET: &str = "CAIRN_SUBNET";
pub const ENV_NODE_NETWORK: &str = "CAIRN_NODE_NETWORK";
pub const ENV_REGISTRATION_DIR: &str = "CAIRN_REGISTRATION_DIR";

/// Options of every `host app` command.
#[derive(Debug, Args)]
pub struct AppGlobals {
    /// State directory: image repository, checkouts, containers, addresses.
    #[arg(long, env = ENV_ROOT, default_value = DEFAULT_ROOT, global = true)]
    pub root: PathBuf,

    /// Where the host tree's baked apps are (tests point it elsewhere).
    #[arg(long, env = ENV_BAKED_APPS, default_value = cairn_contracts::image::BAKED_APPS_DIR, global = true, hide = true)]
    pub baked_apps: PathBuf,

    /// Host bridge that containers attach to [default: the fleet network's,
    /// else cairn0].
    #[arg(long, env = ENV_BRIDGE, global = true)]
    bridge: Option<String>,

    /// The bridge's address and prefix; containers get addresses from this
    /// subnet [default: the subnet this node leased in its fleet network,
    /// else 10.88.0.1/16].
    #[arg(long, env = ENV_SUBNET, global = true)]
    subnet: Option<String>,

    /// What the fleet network agent leased (see `host net status`).
    #[arg(long, env = ENV_NODE_NETWORK, default_value = NODE_NETWORK, global = true, hide = true)]
    node_network: PathBuf,
}

impl AppGlobals {
    /// The bridge and subnet: given ones win, then the fleet network's
    /// lease, then the single-node defaults.
    fn network(&self) -> Result<(String, String, Option<Ipv4Addr>, Option<u32>)> {
        let leased = match &self.subnet {
            Some(_) => None,
            None => read_node_network(&self.node_network)?,
        };
        let bridge = self
            .bridge
            .clone()
            .or_else(|| leased.as_ref().map(|n| n.bridge.clone()))
            .unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        // The fleet network's DNS answers on the bridge's address.
        let dns = leased
            .as_ref()
            .and_then(|n| n.gateway.split('/').next()?.parse().ok());
        let mtu = leased.as_ref().map(|n| n.mtu);
        let subnet = self
            .subnet
            .clone()
            .or_else(|| leased.map(|n| n.gateway))
            .unwrap_or_else(|| DEFAULT_SUBNET.to_string());
        Ok((bridge, subnet, dns, mtu))
    }
}

/// The container commands of `host app`.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ContainerSub {
    /// Create and start a container.
    Run(Box<RunArgs>),
    /// List containers with their status and health.
    Ps {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop a container: SIGTERM, then SIGKILL after the timeout.
    Stop {
        name: String,
        /// Seconds to wait before SIGKILL.
        #[arg(short = 't', long, default_value_t = 10)]
        timeout: u64,
    },
    /// Remove a container and everything it holds (address, veth, cgroup).
    Rm {
        name: String,
        /// Stop it first if it is running.
        #[arg(short, long)]
        force: bool,
    },
    /// Print a container's stdout and stderr.
    Logs {
        name: String,
        /// Keep printing until the container has stopped.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command inside a running container.
    Exec {
        /// Keep stdin open (it always is: accepted for podman's spelling).
        #[arg(short, long)]
        interactive: bool,
        /// Run it on a pseudo-terminal wired to this terminal (Ctrl-C,
        /// window size and full-screen programs work).
        #[arg(short, long)]
        tty: bool,
        name: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Everything known about a container, as JSON.
    Inspect { name: String },
    /// Supervise a detached container (started by `run -d`).
    #[command(hide = true)]
    Monitor { name: String },
}

/// `app run`'s choices and defaults (clap's and [`quick_run`]'s).
const NETWORKS: [&str; 2] = ["bridge", "none"];
const USERNS_MODES: [&str; 2] = ["auto", "host"];
const DEFAULT_NETWORK: &str = NETWORKS[0];
const DEFAULT_USERNS: &str = USERNS_MODES[0];
/// `--userns host`: the container keeps the host's ids.
pub const USERNS_HOST: &str = USERNS_MODES[1];
const DEFAULT_HEALTH_INTERVAL: &str = "10s";
const DEFAULT_HEALTH_RETRIES: u32 = 3;
const DEFAULT_RESTART: &str = "no";
const DEFAULT_STOP_TIMEOUT: u64 = 10;
const DEFAULT_LOG_MAX_SIZE: &str = "10M";
const DEFAULT_LOG_MAX_FILES: u32 = 3;
const LOG_MAX_FILES: std::ops::RangeInclusive<i64> = 1..=100;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Container name (default: a random one).
    #[arg(long)]
    name: Option<String>,
    /// Run in the background under a monitor; print the name.
    #[arg(short, long, conflicts_with = "tty")]
    detach: bool,
    /// Keep stdin open (a foreground container's always is: accepted for
    /// podman's spelling, `-it`).
    #[arg(short, long)]
    interactive: bool,
    /// Run on a pseudo-terminal wired to this terminal (Ctrl-C, window
    /// size and full-screen programs work); foreground only.
    #[arg(short, long)]
    tty: bool,
    /// Remove the container when it exits.
    #[arg(long)]
    rm: bool,
    /// Memory limit, e.g. 256M (cgroup v2 memory.max).
    #[arg(long, value_parser = parse_memory)]
    memory: Option<u64>,
    /// CPU limit in CPUs, e.g. 0.5 (cgroup v2 cpu.max).
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<u64>,
    /// Relative CPU weight 1-10000 (cgroup v2 cpu.weight).
    #[arg(long, value_parser = parse_cpu_weight)]
    cpu_weight: Option<u64>,
    /// Maximum number of processes (cgroup v2 pids.max).
    #[arg(long, value_parser = parse_pids)]
    pids: Option<u64>,
    /// Address on the bridge (default: the next free one).
    #[arg(long)]
    ip: Option<Ipv4Addr>,
    /// `bridge` (default) or `none` (loopback only).
    #[arg(long, default_value = DEFAULT_NETWORK, value_parser = NETWORKS)]
    network: String,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Bind mount SRC:DST[:ro]; repeatable.
    #[arg(short = 'v', long = "volume", value_name = "SRC:DST[:ro]", value_parser = parse_volume)]
    volume: Vec<Volume>,
    /// Health check, run with /bin/sh -c inside the container.
    #[arg(long)]
    health_cmd: Option<String>,
    /// Time between health checks.
    #[arg(long, default_value = DEFAULT_HEALTH_INTERVAL, value_parser = parse_duration)]
    health_interval: Duration,
    /// Consecutive failures before the container counts as unhealthy.
    #[arg(long, default_value_t = DEFAULT_HEALTH_RETRIES)]
    health_retries: u32,
    /// Register the container as an instance of service NAME (port PORT)
    /// while it runs and passes its health check: NAME.service.cairn
    /// resolves to it fleet-wide (docs/network.md). Repeatable.
    #[arg(long = "service", value_name = "NAME[:PORT]", value_parser = parse_service)]
    services: Vec<ServicePort>,
    /// Where the monitor publishes its registration (the fleet network
    /// agent reads it).
    #[arg(long, env = ENV_REGISTRATION_DIR, default_value = REGISTRATION_DIR, hide = true)]
    registration_dir: PathBuf,
    /// Restart policy: no, on-failure or always (with back-off).
    #[arg(long, default_value = DEFAULT_RESTART, value_parser = parse_restart)]
    restart: RestartPolicy,
    /// Seconds between SIGTERM and SIGKILL when stopping.
    #[arg(long, default_value_t = DEFAULT_STOP_TIMEOUT)]
    stop_timeout: u64,
    /// A detached container's log is rotated once it reaches this size
    /// (0: never).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_LOG_MAX_SIZE, value_parser = parse_size)]
    log_max_size: u64,
    /// Log files kept, the current one included.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LOG_MAX_FILES, value_parser = clap::value_parser!(u32).range(LOG_MAX_FILES))]
    log_max_files: u32,
    /// User namespace: `auto` (default) gives the container its own range
    /// of host ids, so its root is no one on the host; `host` runs it with
    /// the host's ids (root in the container is root on the node).
    #[arg(long, default_value = DEFAULT_USERNS, value_parser = USERNS_MODES)]
    userns: String,
    /// Image: NAME[:TAG], NAME@sha256:… or sha256:…
    pub image: String,
    /// Command to run instead of the image's Cmd.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

pub fn runtime(cmd: &AppGlobals) -> Result<Runtime> {
    let (bridge, subnet, dns, mtu) = cmd.network()?;
    let mut network = NetworkConfig::parse(&bridge, &subnet)?;
    network.mtu = mtu;
    let mut rt = Runtime::new(&cmd.root, network);
    rt.dns = dns;
    rt.baked_apps = cmd.baked_apps.clone();
    rt.monitor_command = Some(Box::new(move |root: &Path, name: &str| {
        // Always the executable without libostree (see exe.rs).
        let mut c = std::process::Command::new(crate::exe::container_executable());
        c.args(monitor_args(root, &bridge, &subnet, name));
        c
    }));
    Ok(rt)
}

/// A detached container's monitor command line (after argv[0]): an ordinary
/// `host app … monitor NAME`, which [`monitor_invocation`] reads back exactly.
fn monitor_args(root: &Path, bridge: &str, subnet: &str, name: &str) -> [OsString; 9] {
    [
        "app".into(),
        "--root".into(),
        root.into(),
        "--bridge".into(),
        bridge.into(),
        "--subnet".into(),
        subnet.into(),
        "monitor".into(),
        name.into(),
    ]
}

/// The monitor's own command line, recognised without clap: an idle monitor
/// per container is the product's memory cost, and parsing (clap's code and
/// tables) is most of what such a process would otherwise keep mapped.
/// Anything else is parsed as usual.
#[allow(dead_code)] // used by the container executable only
pub fn monitor_invocation(args: &[OsString]) -> Option<(AppGlobals, String)> {
    let [_, app, root_flag, root, bridge_flag, bridge, subnet_flag, subnet, monitor, name] = args
    else {
        return None;
    };
    let name = name.to_str()?;
    let shape = [app, root_flag, bridge_flag, subnet_flag, monitor]
        == ["app", "--root", "--bridge", "--subnet", "monitor"];
    if !shape || name.is_empty() {
        return None;
    }
    let globals = AppGlobals {
        root: root.into(),
        bridge: Some(bridge.to_str()?.to_string()),
        subnet: Some(subnet.to_str()?.to_string()),
        node_network: PathBuf::from(NODE_NETWORK),
        // The monitor runs from the tree its record names.
        baked_apps: PathBuf::from(cairn_contracts::image::BAKED_APPS_DIR),
    };
    Some((globals, name.to_string()))
}

/// Supervise container `name` (the monitor's whole life).
#[allow(dead_code)] // used by the container executable only
pub fn supervise(globals: &AppGlobals, name: &str) -> Result<ExitCode> {
    monitor(&runtime(globals)?, name)
}

fn monitor(rt: &Runtime, name: &str) -> Result<ExitCode> {
    // Idle, the monitor waits in `host-monitor`, which runs it again with
    // this same command line (see cairn_runtime::idle). Without that
    // executable it waits in this process.
    let exe = crate::exe::container_executable();
    let waiter = cairn_contracts::names::monitor_executable(&exe);
    let idle = waiter.is_file().then(|| cairn_runtime::monitor::IdleExec {
        waiter,
        waiter_args: Vec::new(),
        resume: std::iter::once(exe.into_os_string())
            .chain(std::env::args_os().skip(1))
            .collect(),
    });
    let code = cairn_runtime::monitor::supervise(rt, name, idle)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Run a container command. `image` is `run`'s image when the caller's
/// image store has checked it out; without it, `run` of an image that is
/// not checked out fails with [`cairn_runtime::NotCheckedOut`] before
/// anything is made. `begun`: `run`'s namespaces, if the caller began them
/// (see `begin_namespaces` in main.rs).
pub fn run(
    rt: &Runtime,
    cmd: ContainerSub,
    image: Option<CheckedOut>,
    begun: Option<PendingUserns>,
) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        ContainerSub::Run(a) => {
            let opts = run_options(*a)?;
            drop(out);
            match rt.run_image(&opts, image, begun)? {
                RunOutcome::Detached { name, ip } => {
                    let ip = ip.map(|i| format!(" {i}")).unwrap_or_default();
                    println!("{name}{ip}");
                }
                RunOutcome::Exited { code, .. } => {
                    return Ok(ExitCode::from(code.clamp(0, 255) as u8))
                }
            }
        }
        ContainerSub::Ps { json } => {
            let list = rt.ps()?;
            if json {
                serde_json::to_writer_pretty(&mut out, &list)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{:<20} {:<24} {:<11} {:<10} {:<15} {:>4} RESTARTS",
                    "NAME", "IMAGE", "STATUS", "HEALTH", "ADDRESS", "EXIT"
                )?;
                for c in list {
                    let health = c
                        .health
                        .map(|h| format!("{h:?}").to_lowercase())
                        .unwrap_or_else(|| "-".into());
                    let ip = c.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
                    let exit = c
                        .exit_code
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "-".into());
                    writeln!(
                        out,
                        "{:<20} {:<24} {:<11} {:<10} {:<15} {:>4} {}",
                        c.name,
                        c.image,
                        c.status.to_string(),
                        health,
                        ip,
                        exit,
                        c.restarts
                    )?;
                }
            }
        }
        ContainerSub::Stop { name, timeout } => {
            if rt.stop(&name, std::time::Duration::from_secs(timeout))? {
                writeln!(out, "stopped {name}")?;
            } else {
                writeln!(out, "{name} was not running")?;
            }
        }
        ContainerSub::Rm { name, force } => {
            rt.rm(&name, force)?;
            writeln!(out, "removed {name}")?;
        }
        ContainerSub::Logs { name, follow } => rt.logs(&name, follow, &mut out)?,
        ContainerSub::Exec {
            name, command, tty, ..
        } => {
            drop(out);
            let code = rt.exec(&name, &command, tty)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        ContainerSub::Inspect { name } => {
            serde_json::to_writer_pretty(&mut out, &rt.inspect(&name)?)?;
            writeln!(out)?;
        }
        ContainerSub::Monitor { name } => {
            drop(out);
            return monitor(rt, &name);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The typed run spec of `host app run`'s arguments (each already parsed
/// by its flag's value parser).
fn run_options(a: RunArgs) -> Result<RunOptions> {
    let health = match a.health_cmd {
        Some(cmd) => {
            // Only with a check: the interval alone is not used.
            if a.health_interval < MIN_HEALTH_INTERVAL {
                bail!("--health-interval must be at least {MIN_HEALTH_INTERVAL:?}");
            }
            Some(HealthCheck {
                cmd,
                interval: a.health_interval,
                retries: a.health_retries,
            })
        }
        None => None,
    };
    Ok(RunOptions {
        image: a.image,
        name: a.name,
        command: a.command,
        env: a.env,
        volumes: a.volume,
        limits: Limits {
            memory: a.memory,
            cpu_quota_us: a.cpus,
            cpu_weight: a.cpu_weight,
            pids: a.pids,
        },
        ip: a.ip,
        no_network: a.network == "none",
        restart: a.restart,
        health,
        detach: a.detach,
        auto_remove: a.rm,
        stop_timeout: a.stop_timeout,
        tty: a.tty,
        log: cairn_runtime::state::LogConfig {
            max_size: a.log_max_size,
            max_files: a.log_max_files,
        },
        userns_host: a.userns == USERNS_HOST,
        services: a.services,
        registration_dir: Some(a.registration_dir),
        dns: None,
    })
}

fn parse_service(s: &str) -> Result<ServicePort, String> {
    s.parse().map_err(|e: anyhow::Error| format!("{e:#}"))
}

/// A size flag (`--log-max-size`, `--memory`, the import limits, a disk
/// image's `--size`): cairn_contracts::size's grammar.
pub fn parse_size(s: &str) -> Result<u64, String> {
    cairn_contracts::size::parse(s).map_err(|e| format!("{e:#}"))
}

/// `--memory`: a size (`256M`, `1.5G`, `1048576`) of at least 1M.
fn parse_memory(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s).map_err(|e| format!("memory limit: {e}"))?;
    if bytes < cgroup::MIN_MEMORY {
        return Err(format!(
            "memory limit {s:?} is below 1M: the container could not start"
        ));
    }
    Ok(bytes)
}

/// `--cpus`: `0.5` → 50000 µs of every 100000 µs.
fn parse_cpus(s: &str) -> Result<u64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("--cpus {s:?} is not a positive number of CPUs like 0.5 or 2"))?;
    let quota = (v * cgroup::CPU_PERIOD_US as f64).round() as u64;
    if quota < cgroup::MIN_CPU_QUOTA_US {
        return Err(format!("--cpus {s:?} is below 0.01 CPUs"));
    }
    Ok(quota)
}

fn parse_pids(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("--pids {s:?} is not a positive whole number"))
}

fn parse_cpu_weight(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|v| (1..=cgroup::MAX_CPU_WEIGHT).contains(v))
        .ok_or_else(|| format!("--cpu-weight {s:?} must be a whole number from 1 to 10000"))
}

/// `-v SRC:DST[:ro|:rw]`.
fn parse_volume(s: &str) -> Result<Volume, String> {
    Volume::parse(s).map_err(|e| format!("{e:#}"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    cairn_contracts::duration::parse(s).map_err(|e| format!("{e:#}"))
}

fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
    Ok(match s {
        "no" => RestartPolicy::No,
        "on-failure" => RestartPolicy::OnFailure,
        "always" => RestartPolicy::Always,
        _ => return Err(format!("--restart {s:?}: use no, on-failure or always")),
    })
}

/// Checks `args` (what follows `host app run`) exactly as `run` parses
/// them, so a node config's apps fail validation where the node would fail.
#[allow(dead_code)] // used by the full executable only
pub fn check_run_args(args: &[String]) -> Result<()> {
    #[derive(Debug, clap::Parser)]
    #[command(name = "host app run", no_binary_name = true)]
    struct RunOnly {
        #[command(flatten)]
        args: RunArgs,
    }
    let parsed = <RunOnly as clap::Parser>::try_parse_from(args)
        .map_err(|e| anyhow::anyhow!("{}", e.render().to_string().trim_end()))?;
    let opts = run_options(parsed.args)?;
    if let Some(name) = &opts.name {
        cairn_runtime::engine::check_name(name)?;
    }
    Ok(())
}

/// The container commands of `host`'s command tree, as the container
/// executable parses them (full.rs parses all of it).
#[derive(Debug, clap::Parser)]
#[command(name = "host")]
#[allow(dead_code)] // parsed by the container executable only
pub struct ContainerCli {
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: ContainerTop,
}

#[derive(Debug, clap::Subcommand)]
#[allow(dead_code)] // parsed by the container executable only
pub enum ContainerTop {
    App {
        #[command(flatten)]
        globals: AppGlobals,

        #[command(subcommand)]
        command: ContainerSub,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_monitor_command_line_is_read_back_exactly() {
        let root = Path::new("/var/lib/cairn");
        let args: Vec<OsString> = std::iter::once(OsString::from("/usr/bin/host"))
            .chain(monitor_args(root, "cairn0", "10.88.0.1/16", "web"))
            .collect();
        let (g, name) = monitor_invocation(&args).expect("recognised");
        assert_eq!((g.root.as_path(), name.as_str()), (root, "web"));
        assert_eq!(
            (g.bridge.as_deref(), g.subnet.as_deref()),
            (Some("cairn0"), Some("10.88.0.1/16"))
        );
        // The same line parses the same through clap (the hidden subcommand).
        use clap::Parser;
        let ContainerTop::App { globals, command } =
            ContainerCli::try_parse_from(&args).unwrap().command;
        assert_eq!(globals.root, root);
        assert!(matches!(command, ContainerSub::Monitor { name } if name == "web"));
        // Anything else goes through clap.
        for bad in [
            &args[..args.len() - 1],
            &[args.clone(), vec!["x".into()]].concat()[..],
        ] {
            assert!(monitor_invocation(bad).is_none());
        }
        let mut other = args.clone();
        other[8] = "logs".into();
        assert!(monitor_invocation(&other).is_none());
    }

    use super::*;

    #[test]
    fn limit_syntax() {
        assert_eq!(parse_memory("256M").unwrap(), 256 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_memory("2097152").unwrap(), 2 << 20);
        let e = parse_memory("12Q").unwrap_err();
        assert!(e.contains("unknown unit 'Q'"), "{e}");
        assert!(parse_memory("-1M").is_err());
        assert!(
            parse_memory("12").is_err(),
            "12 bytes is too small to run anything"
        );
        assert!(parse_memory("M").is_err());
        assert_eq!(parse_cpus("0.5").unwrap(), 50_000);
        assert_eq!(parse_cpus("2").unwrap(), 200_000);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("half").is_err());
        assert!(parse_cpus("-1").unwrap_err().contains("--cpus"));
        assert_eq!(parse_pids("256").unwrap(), 256);
        assert!(parse_pids("0").is_err());
        assert!(parse_cpu_weight("10001").is_err());
        assert_eq!(parse_cpu_weight("100").unwrap(), 100);
    }

    #[test]
    fn restart_policies_are_named_as_recorded() {
        for name in ["no", "on-failure", "always"] {
            let p = parse_restart(name).unwrap();
            assert_eq!(serde_json::to_value(p).unwrap(), name);
        }
        assert!(parse_restart("sometimes")
            .unwrap_err()
            .contains("--restart"));
    }

    /// `host app run`'s arguments, as clap parses them.
    fn run_args(args: &[&str]) -> Result<RunOptions> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let cli = Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        run_options(cli.run)
    }

    #[test]
    fn run_spec_from_the_command_line() {
        let o = run_args(&[
            "--memory=64M",
            "--cpus=0.5",
            "--cpu-weight=200",
            "--pids=32",
            "-v",
            "/tmp:/data:ro",
            "--health-cmd=true",
            "--health-interval=1s",
            "--health-retries=2",
            "--restart=on-failure",
            "busybox",
            "sh",
            "-c",
            "x",
        ])
        .unwrap();
        assert_eq!(
            o.limits,
            Limits {
                memory: Some(64 << 20),
                cpu_quota_us: Some(50_000),
                cpu_weight: Some(200),
                pids: Some(32),
            }
        );
        assert_eq!(o.volumes.len(), 1);
        assert!(o.volumes[0].readonly && o.volumes[0].destination == "/data");
        assert_eq!(
            o.health,
            Some(HealthCheck {
                cmd: "true".into(),
                interval: Duration::from_secs(1),
                retries: 2
            })
        );
        assert_eq!(o.restart, RestartPolicy::OnFailure);
        assert_eq!(o.command, ["sh", "-c", "x"]);
        // Bad values are refused with the flag named, before anything runs.
        for (args, msg) in [
            (&["--memory=12Q", "i"][..], "unknown unit 'Q'"),
            (&["--cpus=-1", "i"], "--cpus"),
            (&["--cpu-weight=0", "i"], "--cpu-weight"),
            (&["--pids=0", "i"], "--pids"),
            (
                &["-v", "/nonexistent-src:/data", "i"],
                "does not exist on the host",
            ),
            (&["--restart=sometimes", "i"], "--restart"),
            (&["--health-interval=1x", "i"], "--health-interval"),
            (
                &["--health-cmd=true", "--health-interval=10ms", "i"],
                "at least 100ms",
            ),
        ] {
            let e = run_args(args).unwrap_err().to_string();
            assert!(e.contains(msg), "{args:?}: {e}");
        }
        // An interval is only checked with a check to time.
        run_args(&["--health-interval=10ms", "i"]).unwrap();
    }
}
