//! What the runtime keeps on disk under its root directory, and how it tells
//! a live container from a dead one after a crash or a reboot.
//!
//! ```text
//! <root>/repo, <root>/checkouts  the image store (`cairn_contracts::image`)
//! <root>/net/<bridge>.json       address allocations
//! <root>/containers/<name>/      container.json (what was asked)
//!                                config.json    (the OCI runtime config)
//!                                state.json     (what the monitor saw)
//!                                container.log  (stdout and stderr; rotated: .1, .2, …)
//! /run/cairn/<hash>/<name>/      scaffold/, rootfs/ (per boot, tmpfs)
//! ```
//!
//! A `--rm` container's `<root>/containers/<name>` is a symlink to
//! `/run/cairn/<hash>/<name>/record/`: it is removed when it exits anyway,
//! so its records stay off the node's disk (no inode churn on every short
//! run) and a reboot takes them along, as `--rm` asks. The dangling link a
//! reboot leaves is not a container, and its name is free again.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cgroup::Limits;
use crate::net::NetworkConfig;

pub use cairn_contracts::image::DEFAULT_ROOT;

#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
}

impl ContainerRecord {
    /// The image tree this container runs from.
    pub fn image_root(&self, paths: &Paths) -> PathBuf {
        self.image_root
            .clone()
            .unwrap_or_else(|| paths.checkouts().join(&self.image_commit))
    }
}

impl Paths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn repo(&self) -> PathBuf {
        cairn_contracts::image::repo_dir(&self.root)
    }
    pub fn checkouts(&self) -> PathBuf {
        cairn_contracts::image::checkouts_dir(&self.root)
    }
    pub fn net(&self) -> PathBuf {
        self.root.join("net")
    }
    /// User namespace id ranges claimed by containers (see `userns.rs`).
    pub fn userns_claims(&self) -> PathBuf {
        self.root.join("userns.claims")
    }
    pub fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }
    pub fn container(&self, name: &str) -> PathBuf {
        self.containers().join(name)
    }
    /// Per-boot scratch (mount points, generated files) on tmpfs, one
    /// directory per state root: `/run/cairn/<hash of the root path>`. The
    /// hash only tells roots apart (FNV-1a): a SHA-256 here was 5 % of the
    /// code a short `run` executes, which a VM without KVM translates anew
    /// at every start.
    pub fn run_root(&self) -> PathBuf {
        let h = self
            .root
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        Path::new(RUN_BASE).join(format!("{:012x}", h >> 16))
    }
    pub fn container_run(&self, name: &str) -> PathBuf {
        self.run_root().join(name)
    }
    /// Where a `--rm` container's records live (see the module doc).
    pub fn container_volatile(&self, name: &str) -> PathBuf {
        self.container_run(name).join("record")
    }
}

/// Create `dir` (and its parents) and make `dir` itself private to root
/// (0700): state directories hold image trees with setuid files and
/// containers' records, which no local user may reach.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let meta = fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (0700)", dir.display()))?;
    }
    Ok(())
}

/// Where per-boot scratch lives (a tmpfs on every systemd host).
pub const RUN_BASE: &str = "/run/cairn";

/// How much of a detached container's output its log keeps (see
/// [`crate::logfile`]): `container.log` up to `max_size` bytes (0: no
/// limit), `max_files` files in all with the rotated ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogConfig {
    pub max_size: u64,
    pub max_files: u32,
}

impl Default for LogConfig {
    /// About what docker's and podman's users set: 10 MiB × 3.
    fn default() -> Self {
        Self {
            max_size: 10 << 20,
            max_files: 3,
        }
    }
}

/// What to do when the container's process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    No,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    /// Run with `/bin/sh -c` inside the container.
    pub cmd: String,
    pub interval_ms: u64,
    /// Consecutive failures before the container counts as unhealthy.
    pub retries: u32,
}

/// What was asked for when the container was created (never changes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub name: String,
    pub image: String,
    pub image_commit: String,
    /// The tree it runs from: a store checkout, or a baked app's root in
    /// the host tree. None in records written before baked apps ran from
    /// the tree: the checkout of `image_commit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_root: Option<PathBuf>,
    pub manifest_digest: String,
    pub created: String,
    pub ip: Option<Ipv4Addr>,
    pub network: Option<NetworkConfig>,
    /// Host end of the veth pair.
    pub host_if: String,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub restart: RestartPolicy,
    pub health: Option<HealthConfig>,
    /// `--rm`: remove everything once the container exits for good.
    #[serde(default)]
    pub auto_remove: bool,
    /// Seconds between SIGTERM and SIGKILL on stop.
    pub stop_timeout: u64,
    /// Log rotation (records from before it: the defaults).
    #[serde(default)]
    pub log: LogConfig,
    /// What `stop` sends first: the image's StopSignal, else SIGTERM.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// The container's own host id range (its user namespace); `None`:
    /// the host's ids (`--userns=host`, and records written before
    /// containers had user namespaces).
    #[serde(default)]
    pub userns: Option<crate::userns::IdRange>,
    /// `--service`: the services this container is an instance of while it
    /// serves, published in `registration_dir` (see contracts::services).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<cairn_contracts::services::ServicePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_dir: Option<PathBuf>,
    /// The resolver its /etc/resolv.conf names (the fleet network's DNS
    /// on the bridge); None: the node's own resolvers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Created,
    Running,
    Restarting,
    Exited,
    /// The container could not be started at all (see `error`).
    Failed,
    /// Recorded as running, but its monitor is gone (crash or reboot).
    Dead,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        f.write_str(&s.unwrap_or_default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    pub status: Health,
    pub failing_streak: u32,
    pub last_exit: Option<i32>,
    pub last_check: Option<String>,
}

/// What the monitor last wrote down.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerState {
    pub status: Status,
    pub monitor_pid: Option<i32>,
    pub monitor_start: Option<u64>,
    pub boot_id: String,
    /// Host pid of the container's first process.
    pub pid: Option<i32>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub restarts: u32,
    pub error: Option<String>,
    pub health: Option<HealthState>,
    /// Set by `stop`: the monitor must not restart it.
    #[serde(default)]
    pub stop_requested: bool,
}

impl ContainerState {
    /// Whether the monitor that wrote this is still alive (same boot, same
    /// process, not a reused pid).
    pub fn monitor_alive(&self) -> bool {
        match (self.monitor_pid, self.monitor_start) {
            (Some(pid), Some(start)) => {
                self.boot_id == boot_id() && proc_start_time(pid) == Some(start)
            }
            _ => false,
        }
    }

    /// The status to show: a running container whose monitor is gone is dead.
    pub fn observed(&self) -> Status {
        match self.status {
            // Not started yet: no monitor to ask about.
            Status::Created if self.monitor_pid.is_none() => Status::Created,
            Status::Running | Status::Restarting | Status::Created if !self.monitor_alive() => {
                Status::Dead
            }
            s => s,
        }
    }
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `SIGTERM`, `TERM`, `15`, as in an image's StopSignal.
pub fn parse_signal(s: &str) -> anyhow::Result<nix::sys::signal::Signal> {
    use std::str::FromStr;
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map_err(|_| anyhow::anyhow!("no signal number {n}"));
    }
    let name = if t.starts_with("SIG") {
        t.to_string()
    } else {
        format!("SIG{t}")
    };
    nix::sys::signal::Signal::from_str(&name.to_ascii_uppercase())
        .map_err(|_| anyhow::anyhow!("unknown stop signal {s:?}"))
}

/// Kernel boot id: tells a reboot apart from a live host.
pub fn boot_id() -> String {
    cairn_contracts::procfs::read_small("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub use cairn_contracts::services::proc_start_time;

/// Remove a container's record directory: the directory itself, or the
/// symlink of a `--rm` container together with what it points to.
pub fn remove_record_dir(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            if let Ok(target) = fs::read_link(dir) {
                if target.is_dir() {
                    fs::remove_dir_all(&target)
                        .with_context(|| format!("removing {}", target.display()))?;
                }
            }
            fs::remove_file(dir).with_context(|| format!("removing {}", dir.display()))
        }
        Ok(_) => fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", dir.display())),
    }
}

/// A container's records, in its directory (`Paths::container`).
pub const RECORD_FILE: &str = "container.json";
pub const STATE_FILE: &str = "state.json";
/// Its OCI runtime config.
pub const CONFIG_FILE: &str = "config.json";

/// How a record is written (both atomically, see `cairn_contracts::durable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced before returning: the container outlives a reboot, and a
    /// power cut must not leave it without its records.
    Synced,
    /// Not synced: a `--rm` container's records live on `/run` and go with
    /// the boot anyway (and its start stays as fast as the kernel allows).
    Volatile,
}

impl Durability {
    /// What the records of `r` need.
    pub fn of(r: &ContainerRecord) -> Self {
        if r.auto_remove {
            Self::Volatile
        } else {
            Self::Synced
        }
    }
}

/// Writes a record as compact JSON: programs read these (`inspect` prints
/// them indented), and the indenting formatter's code was 5 % of the
/// distinct instructions a `run` executes, each translated again at every
/// start under QEMU's TCG.
pub fn write_json<T: Serialize>(path: &Path, v: &T, durability: Durability) -> Result<()> {
    let bytes = serde_json::to_vec(v)?;
    match durability {
        Durability::Synced => cairn_contracts::durable::write(path, &bytes),
        Durability::Volatile => cairn_contracts::durable::replace(path, &bytes),
    }
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let b = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_uses_pid_start_time_and_boot_id() {
        let me = std::process::id() as i32;
        let mut st = ContainerState {
            status: Status::Running,
            monitor_pid: Some(me),
            monitor_start: proc_start_time(me),
            boot_id: boot_id(),
            ..Default::default()
        };
        assert!(st.monitor_alive());
        assert_eq!(st.observed(), Status::Running);
        st.monitor_start = st.monitor_start.map(|s| s + 1); // a reused pid
        assert_eq!(st.observed(), Status::Dead);
        st.monitor_start = proc_start_time(me);
        st.boot_id = "another-boot".into();
        assert_eq!(st.observed(), Status::Dead);
        st.status = Status::Exited;
        assert_eq!(st.observed(), Status::Exited);
        assert_eq!(Status::Restarting.to_string(), "restarting");
    }

    #[test]
    fn stop_signals() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("SIGQUIT").unwrap(), Signal::SIGQUIT);
        assert_eq!(parse_signal("int").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert!(parse_signal("SIGNOPE").is_err());
    }
}
