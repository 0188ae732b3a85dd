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
    /// Where the booted host tree carries its baked apps
    /// ([`cairn_contracts::image::BAKED_APPS_DIR`]).
    pub baked_apps: PathBuf,
}

impl Runtime {
    pub fn new(root: impl Into<PathBuf>, network: NetworkConfig) -> Self {
        Self {
            paths: Paths::new(root),
            network,
            cgroups: CgroupManager::new("/sys/fs/cgroup", "cairn.slice"),
            monitor_command: None,
            dns: None,
            baked_apps: cairn_contracts::image::BAKED_APPS_DIR.into(),
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
        if let Some(dir) = &r.registration_dir {
            // A --rm container's monitor removes it without a last save.
            let _ = std::fs::remove_file(dir.join(format!("{}.json", r.name)));
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

/// The host's resolvers, minus loopback ones a container cannot reach. A
/// host on systemd-resolved names only its stub (127.0.0.53): its real
/// upstreams are in resolved's own file, which is read instead.
fn resolv_conf() -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let upstreams = std::fs::read_to_string("/run/systemd/resolve/resolv.conf");
    container_resolv_conf(&host, upstreams.ok().as_deref())
}

fn container_resolv_conf(host: &str, resolved: Option<&str>) -> String {
    let loopback =
        |l: &str| l.starts_with("nameserver") && (l.contains(" 127.") || l.contains(" ::1"));
    let reachable = |text: &str| -> String {
        text.lines()
            .filter(|l| !loopback(l))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let only_stub = host.lines().any(loopback)
        && !host
            .lines()
            .any(|l| l.starts_with("nameserver") && !loopback(l));
    match resolved {
        Some(real) if only_stub => reachable(real),
        _ => reachable(host),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_host_on_resolved_gives_containers_its_real_upstreams() {
        let stub = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n";
        let real = "nameserver 192.0.2.53\nsearch lan\n";
        let got = super::container_resolv_conf(stub, Some(real));
        assert_eq!(got, "nameserver 192.0.2.53\nsearch lan\n");
        // Without resolved's file: nothing unreachable, at least.
        assert!(!super::container_resolv_conf(stub, None).contains("127.0.0.53"));
        let plain = "nameserver 10.0.2.3\n";
        assert_eq!(super::container_resolv_conf(plain, Some(real)), plain);
    }
}
