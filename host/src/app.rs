//! `host app …`: import and run application containers. Argument parsing
//! only; the work is done by `cairn_runtime`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use cairn_runtime::cgroup::{self, Limits};
use cairn_runtime::engine::{HealthCheck, MIN_HEALTH_INTERVAL};
use cairn_runtime::image::{ImportLimits, ImportOptions};
use cairn_runtime::net::{NetworkConfig, DEFAULT_BRIDGE, DEFAULT_SUBNET};
use cairn_runtime::spec::Volume;
use cairn_runtime::state::{RestartPolicy, DEFAULT_ROOT};
use cairn_runtime::{RunOptions, RunOutcome, Runtime};
use clap::{Args, Subcommand};

/// Immutable application containers: import OCI images, run, supervise.
#[derive(Debug, Args)]
pub struct AppCommand {
    /// State directory: image repository, checkouts, containers, addresses.
    #[arg(long, env = "CAIRN_ROOT", default_value = DEFAULT_ROOT, global = true)]
    root: PathBuf,

    /// Host bridge that containers attach to.
    #[arg(long, env = "CAIRN_BRIDGE", default_value = DEFAULT_BRIDGE, global = true)]
    bridge: String,

    /// The bridge's address and prefix; containers get addresses from this subnet.
    #[arg(long, env = "CAIRN_SUBNET", default_value = DEFAULT_SUBNET, global = true)]
    subnet: String,

    #[command(subcommand)]
    command: AppSub,
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum AppSub {
    /// Import an OCI image layout directory, an oci-archive tar or a docker save tar.
    Import {
        /// The image directory or archive; PATH:TAG picks a tag of an OCI
        /// layout (or docker save archive) that holds several.
        path: PathBuf,
        /// Name it NAME[:TAG] (default: the name recorded in the image).
        #[arg(long)]
        name: Option<String>,
        /// The tag to import from a layout holding several (as PATH:TAG).
        #[arg(long)]
        tag: Option<String>,
        /// Refuse images whose layers uncompress to more than this (bytes, or
        /// with a K, M, G or T suffix: powers of 1024).
        #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = parse_size)]
        max_image_size: u64,
        /// Refuse a layer that uncompresses to more than N times its size.
        #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_ratio)]
        max_ratio: u64,
        /// Refuse images with more layers than this.
        #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_layers)]
        max_layers: usize,
        /// Refuse images with more files (tar entries, all layers) than this.
        #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_entries)]
        max_entries: u64,
        /// Uncompressed bytes of a layer before its ratio is checked.
        #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = parse_size)]
        ratio_grace: u64,
        /// Refuse entry paths and link targets longer than this (bytes).
        #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_path_len)]
        max_path_len: usize,
        /// Refuse entry paths with more components than this.
        #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_path_depth)]
        max_path_depth: usize,
        /// Refuse an index, manifest, config or manifest.json larger than this.
        #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_size)]
        max_metadata_size: u64,
        /// Refuse a pax header or GNU long name in a tar larger than this.
        #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
        max_tar_header_size: u64,
        /// Refuse an oci-archive or docker save tar with more entries than this.
        #[arg(long, value_name = "N", default_value_t = ImportLimits::default().max_archive_entries)]
        max_archive_entries: usize,
    },
    /// List imported images.
    Images {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (refused while a container uses it).
    Rmi {
        /// NAME[:TAG] or NAME@sha256:…
        image: String,
    },
    /// Remove what no image tag and no container uses: checkouts and
    /// objects of images a re-import replaced (a baked app's after every
    /// host upgrade or rollback).
    Prune,
    /// Check every object of an image against its checksum.
    Verify {
        /// NAME[:TAG] or NAME@sha256:…
        image: String,
    },
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

#[derive(Debug, Args)]
struct RunArgs {
    /// Container name (default: a random one).
    #[arg(long)]
    name: Option<String>,
    /// Run in the background under a monitor; print the name.
    #[arg(short, long)]
    detach: bool,
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
    #[arg(long, default_value = "bridge", value_parser = ["bridge", "none"])]
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
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    health_interval: Duration,
    /// Consecutive failures before the container counts as unhealthy.
    #[arg(long, default_value_t = 3)]
    health_retries: u32,
    /// Restart policy: no, on-failure or always (with back-off).
    #[arg(long, default_value = "no", value_parser = parse_restart)]
    restart: RestartPolicy,
    /// Seconds between SIGTERM and SIGKILL when stopping.
    #[arg(long, default_value_t = 10)]
    stop_timeout: u64,
    /// User namespace: `auto` (default) gives the container its own range
    /// of host ids, so its root is no one on the host; `host` runs it with
    /// the host's ids (root in the container is root on the node).
    #[arg(long, default_value = "auto", value_parser = ["auto", "host"])]
    userns: String,
    /// Image: NAME[:TAG], NAME@sha256:… or sha256:…
    image: String,
    /// Command to run instead of the image's Cmd.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn runtime(cmd: &AppCommand) -> Result<Runtime> {
    let mut rt = Runtime::new(&cmd.root, NetworkConfig::parse(&cmd.bridge, &cmd.subnet)?);
    let (bridge, subnet) = (cmd.bridge.clone(), cmd.subnet.clone());
    rt.monitor_command = Some(Box::new(move |root: &Path, name: &str| {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        let mut c = std::process::Command::new(exe);
        c.arg("app")
            .arg("--root")
            .arg(root)
            .arg("--bridge")
            .arg(&bridge);
        c.arg("--subnet").arg(&subnet).arg("monitor").arg(name);
        c
    }));
    Ok(rt)
}

pub fn run(cmd: AppCommand) -> Result<ExitCode> {
    let rt = runtime(&cmd)?;
    let mut out = std::io::stdout().lock();
    match cmd.command {
        AppSub::Import {
            path,
            name,
            tag,
            max_image_size,
            max_ratio,
            max_layers,
            max_entries,
            ratio_grace,
            max_path_len,
            max_path_depth,
            max_metadata_size,
            max_tar_header_size,
            max_archive_entries,
        } => {
            let opts = ImportOptions {
                name,
                tag,
                limits: ImportLimits {
                    max_image_size,
                    max_ratio,
                    ratio_grace,
                    max_entries,
                    max_path_len,
                    max_path_depth,
                    max_metadata_size,
                    max_layers,
                    max_tar_header_size,
                    max_archive_entries,
                },
            };
            let info = rt.import_with(&path, &opts)?;
            writeln!(
                out,
                "imported {} {}",
                info.reference(),
                info.manifest_digest
            )?;
            writeln!(out, "commit {}", info.commit)?;
        }
        AppSub::Images { json } => {
            let images = rt.images()?;
            if json {
                serde_json::to_writer_pretty(&mut out, &images)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{:<30} {:<20} {:<12} COMMIT", "NAME", "TAG", "DIGEST")?;
                for i in images {
                    let d = i.manifest_digest.trim_start_matches("sha256:");
                    writeln!(
                        out,
                        "{:<30} {:<20} {:<12} {}",
                        i.name,
                        i.tag,
                        &d[..12.min(d.len())],
                        &i.commit[..12]
                    )?;
                }
            }
        }
        AppSub::Rmi { image } => {
            let info = rt.rmi(&image)?;
            writeln!(out, "removed {} {}", info.reference(), info.manifest_digest)?;
        }
        AppSub::Prune => {
            let p = rt.prune()?;
            for c in &p.checkouts {
                writeln!(out, "removed checkout {c}")?;
            }
            writeln!(
                out,
                "pruned {} checkouts, {} objects, {} bytes",
                p.checkouts.len(),
                p.objects,
                p.bytes
            )?;
        }
        AppSub::Verify { image } => {
            let (info, n) = rt.verify(&image)?;
            writeln!(
                out,
                "ok {} {}: {n} objects verified",
                info.reference(),
                info.manifest_digest
            )?;
        }
        AppSub::Run(a) => {
            let opts = run_options(*a)?;
            drop(out);
            match rt.run(&opts)? {
                RunOutcome::Detached { name, ip } => {
                    let ip = ip.map(|i| format!(" {i}")).unwrap_or_default();
                    println!("{name}{ip}");
                }
                RunOutcome::Exited { code, .. } => {
                    return Ok(ExitCode::from(code.clamp(0, 255) as u8))
                }
            }
        }
        AppSub::Ps { json } => {
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
        AppSub::Stop { name, timeout } => {
            if rt.stop(&name, std::time::Duration::from_secs(timeout))? {
                writeln!(out, "stopped {name}")?;
            } else {
                writeln!(out, "{name} was not running")?;
            }
        }
        AppSub::Rm { name, force } => {
            rt.rm(&name, force)?;
            writeln!(out, "removed {name}")?;
        }
        AppSub::Logs { name, follow } => rt.logs(&name, follow, &mut out)?,
        AppSub::Exec { name, command } => {
            drop(out);
            let code = rt.exec(&name, &command)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        AppSub::Inspect { name } => {
            serde_json::to_writer_pretty(&mut out, &rt.inspect(&name)?)?;
            writeln!(out)?;
        }
        AppSub::Monitor { name } => {
            drop(out);
            let code = cairn_runtime::monitor::supervise(&rt, &name)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
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
        userns_host: a.userns == "host",
    })
}

/// `--memory`: `256M`, `1.5G`, `512k`, `1048576`, with binary multiples.
fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => {
                    return Err(format!(
                    "memory limit {s:?}: unknown unit {c:?} (use a number of bytes, or k, m, g, t)"
                ))
                }
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let v: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("memory limit {s:?} is not a positive size like 256M or 1G"))?;
    let bytes = (v * mult as f64) as u64;
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

fn parse_duration(s: &str) -> Result<Duration, String> {
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

/// `123`, `64K`, `512M`, `16G`, `1T` (powers of 1024) as bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&s[..s.len() - 1], 10),
        Some(b'M') => (&s[..s.len() - 1], 20),
        Some(b'G') => (&s[..s.len() - 1], 30),
        Some(b'T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: a size is a number of bytes, or with K, M, G or T"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_import_limit_defaults() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("16G"), Ok(16 << 30));
        assert!(parse_size("1X").is_err() && parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
        // The flags' defaults are the library's.
        let d = ImportLimits::default();
        assert_eq!(parse_size("16G"), Ok(d.max_image_size));
        assert_eq!(parse_size("8M"), Ok(d.ratio_grace));
        assert_eq!(parse_size("4M"), Ok(d.max_metadata_size));
        assert_eq!(parse_size("1M"), Ok(d.max_tar_header_size));
    }

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
