//! Service registration: a container run with `--service NAME[:PORT]` is
//! an instance of NAME while it runs and passes its health check. Its
//! monitor says so with a file in the node's registration directory; the
//! fleet network agent carries those files into etcd under a lease of the
//! node's, and every node's DNS answers from a watch-fed copy of them. One
//! etcd client per node, not per container: a fleet of 1,000 nodes with 50
//! containers each keeps 1,000 leases alive, not 50,000.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Where monitors publish serving instances: `<dir>/<container>.json`.
pub const REGISTRATION_DIR: &str = "/run/cairn/services";
/// etcd: `<prefix><service>/<node machine id>/<container>` → [`Instance`].
pub const ETCD_SERVICES_PREFIX: &str = "/cairn/services/";
/// The DNS zone containers and nodes resolve: `NAME.service.cairn`,
/// `CONTAINER.NODE.cairn`.
pub const DNS_ZONE: &str = "cairn";
/// The largest registration a reader accepts (file or etcd value).
pub const MAX_INSTANCE_BYTES: usize = 16 * 1024;
/// How many services one container may name.
pub const MAX_SERVICES: usize = 16;

/// `NAME` or `NAME:PORT`, as `--service` takes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A DNS label cairn accepts for services, containers and nodes: 1–63 of
/// lowercase letters, digits and `-`, not starting or ending with `-`.
pub fn check_label(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !ok {
        bail!("{what} {s:?}: 1 to 63 lowercase letters, digits or '-', not at either end (it becomes a DNS name)");
    }
    Ok(())
}

impl FromStr for ServicePort {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<ServicePort> {
        let (name, port) = match s.split_once(':') {
            Some((n, p)) => {
                let port: u16 = p.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
                    anyhow::anyhow!("--service {s:?}: the port must be 1..=65535")
                })?;
                (n, Some(port))
            }
            None => (s, None),
        };
        check_label("--service", name)?;
        Ok(ServicePort {
            name: name.to_string(),
            port,
        })
    }
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One serving container: the registration file's content, and (with the
/// node filled in) its etcd value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Instance {
    pub container: String,
    pub address: Ipv4Addr,
    pub services: Vec<ServicePort>,
    /// The monitor that wrote it, and its start time (clock ticks since
    /// boot): a file whose monitor is gone is stale, never carried on.
    pub monitor_pid: i32,
    pub monitor_start: u64,
    /// The node's hostname and machine id (set by the agent).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_id: String,
}

impl Instance {
    /// Checks what a reader must not trust blindly.
    pub fn validate(&self) -> Result<()> {
        check_label("container", &self.container)?;
        if self.services.is_empty() || self.services.len() > MAX_SERVICES {
            bail!("an instance names 1 to {MAX_SERVICES} services");
        }
        for s in &self.services {
            check_label("service", &s.name)?;
        }
        if !self.node.is_empty() {
            check_label("node", &self.node)?;
        }
        Ok(())
    }

    /// The instance's etcd key for `service`.
    pub fn etcd_key(&self, service: &str) -> String {
        format!(
            "{ETCD_SERVICES_PREFIX}{service}/{}/{}",
            self.node_id, self.container
        )
    }
}

/// Parses an etcd key into (service, node id, container).
pub fn parse_etcd_key(key: &str) -> Option<(&str, &str, &str)> {
    let rest = key.strip_prefix(ETCD_SERVICES_PREFIX)?;
    let mut parts = rest.split('/');
    let (s, n, c) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || s.is_empty() || n.is_empty() || c.is_empty() {
        return None;
    }
    Some((s, n, c))
}

/// Start time of a live process (clock ticks since boot), field 22 of
/// /proc/PID/stat; None for a missing or zombie process. With the pid it
/// names one process for good: pids are reused, start times are not.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = crate::procfs::read_small(&format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = after.split_whitespace();
    if matches!(fields.next(), Some("Z") | Some("X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Parses a registration (file or etcd value), bounded and checked.
pub fn parse_instance(bytes: &[u8]) -> Result<Instance> {
    if bytes.len() > MAX_INSTANCE_BYTES {
        bail!("over {MAX_INSTANCE_BYTES} bytes");
    }
    let i: Instance = serde_json::from_slice(bytes)?;
    i.validate()?;
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_flags_parse_and_refuse_what_dns_cannot_carry() {
        assert_eq!(
            "web:8080".parse::<ServicePort>().unwrap(),
            ServicePort {
                name: "web".into(),
                port: Some(8080)
            }
        );
        assert_eq!("db".parse::<ServicePort>().unwrap().port, None);
        for bad in [
            "",
            "Web",
            "a.b",
            "-x",
            "x-",
            "web:0",
            "web:99999",
            "web:",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<ServicePort>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn instances_round_trip_through_their_key_and_are_bounded() {
        let i = Instance {
            container: "web-1".into(),
            address: "10.88.3.20".parse().unwrap(),
            services: vec!["web:8080".parse().unwrap()],
            monitor_pid: 42,
            monitor_start: 7,
            node: "node-b".into(),
            node_id: "0123".into(),
        };
        let key = i.etcd_key("web");
        assert_eq!(parse_etcd_key(&key), Some(("web", "0123", "web-1")));
        assert_eq!(parse_etcd_key("/cairn/services/web/x"), None);
        assert_eq!(parse_etcd_key("/cairn/services/web/x/y/z"), None);
        let bytes = serde_json::to_vec(&i).unwrap();
        assert_eq!(parse_instance(&bytes).unwrap(), i);
        assert!(parse_instance(&vec![b' '; MAX_INSTANCE_BYTES + 1]).is_err());
        let mut evil = i.clone();
        evil.container = "../x".into();
        assert!(parse_instance(&serde_json::to_vec(&evil).unwrap()).is_err());
    }
}
