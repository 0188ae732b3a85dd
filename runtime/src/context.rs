//! What every part of the runtime works against: where the node's state
//! lives, its cgroup manager and bridge network ([`Runtime`]), and what a
//! container's records bring along, the files generated into its root and
//! their removal. The operations (`engine`) and the monitor both build on
//! it; neither imports the other's internals.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cgroup::{self, CgroupManager};
use crate::net::{Allocator, NetworkConfig};
use crate::state::{self, ContainerRecord, Paths};

/// Builds the command that runs `supervise` for a detached container
/// (given the root dir and the container name). The binary knows its own
/// command line; the library does not.
pub type MonitorCommand = Box<dyn Fn(&Path, &str) -> std::process::Command + Send + Sync>;

pub struct Runtime {
    pub paths: Paths,
    pub network: NetworkConfig,
    pub cgroups: CgroupManager,
    pub monitor_command: Option<MonitorCommand>,
    /// The resolver containers get when their run names none (the fleet
    /// network's DNS on the bridge).
    pub dns: Option<std::net::Ipv4Addr>,
}

impl Runtime {
    pub fn new(root: impl Into<PathBuf>, network: NetworkConfig) -> Self {
        Self {
            paths: Paths::new(root),
            network,
            cgroups: CgroupManager::new("/sys/fs/cgroup", "cairn.slice"),
            monitor_command: None,
            dns: None,
        }
    }

    /// Release everything a container holds and delete its directory.
    pub fn remove_container_files(&self, r: &ContainerRecord) -> Result<()> {
        if let Some(net) = &r.network {
            // The container's processes are gone, so its network namespace
            // is being torn down and the kernel removes both veth ends with
            // it. Deleting the host end here would only wait for that (tens
            // of ms of RCU grace periods), so only a link that belongs to a
            // live namespace (a failed start) is removed by the caller.
            Allocator::new(&self.paths.net(), net).release(&r.id)?;
        }
        if let Some(range) = &r.userns {
            crate::userns::Allocator::new(&self.paths.userns_claims()).release(&r.id, range)?;
        }
        if cgroup::detect(&self.cgroups.root) == cgroup::Layout::Unified {
            self.cgroups.remove(&r.name)?;
        }
        let run = self.paths.container_run(&r.name);
        if run.exists() {
            std::fs::remove_dir_all(&run).with_context(|| format!("removing {}", run.display()))?;
            // Gone once the last container of this root is.
            let _ = std::fs::remove_dir(self.paths.run_root());
        }
        state::remove_record_dir(&self.paths.container(&r.name))
    }
}

/// Files the runtime provides inside a container (over the image's own).
pub(crate) fn generated_files(r: &ContainerRecord) -> Vec<(&'static str, String)> {
    let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
    if let Some(ip) = r.ip {
        hosts.push_str(&format!("{ip}\t{}\n", r.name));
    }
    vec![
        ("/etc/hostname", format!("{}\n", r.name)),
        ("/etc/hosts", hosts),
        (
            "/etc/resolv.conf",
            match r.dns {
                Some(ip) => format!("nameserver {ip}\n"),
                None => resolv_conf(),
            },
        ),
    ]
}

/// The host's resolvers, minus loopback ones a container cannot reach.
fn resolv_conf() -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    host.lines()
        .filter(|l| !(l.starts_with("nameserver") && (l.contains(" 127.") || l.contains(" ::1"))))
        .map(|l| format!("{l}\n"))
        .collect()
}
