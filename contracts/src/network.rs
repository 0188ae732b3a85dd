//! The node's container network: the single-node bridge everyone starts
//! with, and the fleet network a node joins when it is configured for one
//! (`/etc/cairn/network.toml`, written by hand or by provisioning). The
//! fleet network's agent publishes what it leased in [`NODE_NETWORK`], and
//! `host` reads its containers' bridge from there: this module is the one
//! owner of both files' shape.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The bridge containers attach to, and its address on a single node.
pub const DEFAULT_BRIDGE: &str = "cairn0";
pub const DEFAULT_SUBNET: &str = "10.88.0.1/16";

/// The fleet network's config on a node.
pub const NETWORK_CONFIG: &str = "/etc/cairn/network.toml";
/// What the agent leased, for `host` and status: [`NodeNetwork`] as JSON.
pub const NODE_NETWORK: &str = "/run/cairn/network/node.json";
/// The agent's memory across reboots: the subnet it held last.
pub const NETWORK_STATE_DIR: &str = "/var/lib/cairn/network";
/// Where the agent shadows the tree's networkd file for the bridge, so
/// networkd keeps the leased address instead of the single-node one.
pub const NETWORKD_RUNTIME_DIR: &str = "/run/systemd/network";
/// The tree's networkd file for the bridge (shadowed by name under /run).
pub const BRIDGE_NETWORK_FILE: &str = "20-cairn0.network";

/// etcd keys of the fleet network.
pub const ETCD_PREFIX: &str = "/cairn/network/";
/// The fleet's CIDR and node prefix, set by the first node, checked by all.
pub const ETCD_CONFIG_KEY: &str = "/cairn/network/config";
/// One key per leased subnet: `<prefix><a.b.c.d>-<len>` → [`SubnetRecord`].
pub const ETCD_SUBNETS_PREFIX: &str = "/cairn/network/subnets/";

/// The nftables table the egress masquerade lives in (nothing else does).
pub const NFT_TABLE: &str = "cairn";

/// The kernel route protocol number cairn's routes carry, so the agent
/// removes only what it added (`ip route show proto 211`).
pub const ROUTE_PROTOCOL: u8 = 211;
/// The VXLAN device, its VNI and UDP port (IANA's).
pub const VXLAN_DEVICE: &str = "cairn-vx";
pub const VXLAN_VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 4789;
/// The outer headers a VXLAN packet adds on IPv4.
pub const VXLAN_OVERHEAD: u32 = 50;

/// An IPv4 network, e.g. `10.88.0.0/14`; host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Net> {
        if prefix > 32 {
            bail!("{addr}/{prefix}: the prefix must be 0..=32");
        }
        let net = Ipv4Net { addr, prefix };
        if u32::from(addr) & !net.mask() != 0 {
            bail!(
                "{addr}/{prefix}: host bits are set; the network is {}/{prefix}",
                Ipv4Addr::from(u32::from(addr) & net.mask())
            );
        }
        Ok(net)
    }
    pub fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }
    /// Whether `inner` lies wholly inside this network.
    pub fn covers(&self, inner: &Ipv4Net) -> bool {
        inner.prefix >= self.prefix && self.contains(inner.addr)
    }
    /// The first host address: the bridge's (gateway) address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + 1)
    }
    /// The `index`th subnet of length `prefix` inside this network.
    pub fn subnet(&self, prefix: u8, index: u32) -> Option<Ipv4Net> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let count = 1u64 << (prefix - self.prefix);
        if u64::from(index) >= count {
            return None;
        }
        let step = 1u64 << (32 - prefix);
        let addr = u64::from(u32::from(self.addr)) + u64::from(index) * step;
        Some(Ipv4Net {
            addr: Ipv4Addr::from(addr as u32),
            prefix,
        })
    }
    /// How many subnets of length `prefix` it holds.
    pub fn subnet_count(&self, prefix: u8) -> u64 {
        if prefix < self.prefix || prefix > 32 {
            0
        } else {
            1u64 << (prefix - self.prefix)
        }
    }
    /// The subnet's etcd key.
    pub fn etcd_key(&self) -> String {
        format!("{ETCD_SUBNETS_PREFIX}{}-{}", self.addr, self.prefix)
    }
    /// The subnet an etcd key names (inverse of [`Ipv4Net::etcd_key`]).
    pub fn from_etcd_key(key: &str) -> Option<Ipv4Net> {
        let (addr, prefix) = key.strip_prefix(ETCD_SUBNETS_PREFIX)?.split_once('-')?;
        Ipv4Net::new(addr.parse().ok()?, prefix.parse().ok()?).ok()
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Ipv4Net> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| {
            anyhow!("{s:?}: write a network as ADDRESS/PREFIX, e.g. 10.88.0.0/14")
        })?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("{s:?}: {addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| anyhow!("{s:?}: {prefix:?} is not a prefix length"))?;
        Ipv4Net::new(addr, prefix)
    }
}

/// How packets reach another node's containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A direct route via the peer's underlay address when it is on one of
    /// this node's links, VXLAN otherwise.
    #[default]
    Auto,
    /// Direct routes only: every node shares one L2.
    HostGw,
    /// VXLAN for every peer.
    Vxlan,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::HostGw => "host-gw",
            Mode::Vxlan => "vxlan",
        })
    }
}

/// `/etc/cairn/network.toml`, and a node config's `[fleet]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FleetNetwork {
    /// etcd client URLs of the fleet's members.
    pub etcd_endpoints: Vec<String>,
    /// The fleet's container network; every node leases one subnet of it.
    #[serde(default = "default_cidr")]
    pub cidr: String,
    /// The length of each node's subnet.
    #[serde(default = "default_node_prefix")]
    pub node_prefix: u8,
    #[serde(default)]
    pub mode: Mode,
    /// The interface peers reach this node on (default: the one the
    /// default route leaves by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_interface: Option<String>,
    /// How long a silent node keeps its subnet (and how long a reboot may
    /// take without losing it): the TTL of its etcd lease.
    #[serde(default = "default_grace")]
    pub subnet_grace: String,
    /// Masquerade what containers send beyond the fleet cidr (to the
    /// internet, say) behind the node's address. Off: inside and outside
    /// the fleet, a container's packets keep its own address, and the
    /// network beyond must route the cidr to the nodes.
    #[serde(default)]
    pub masquerade_egress: bool,
}

fn default_cidr() -> String {
    "10.88.0.0/14".into()
}
fn default_node_prefix() -> u8 {
    24
}
fn default_grace() -> String {
    "5m".into()
}

/// The shortest and longest subnet grace: renewed at a third of it, so
/// shorter would spin; longer keeps dead nodes' subnets for a day.
const GRACE_BOUNDS: (Duration, Duration) = (Duration::from_secs(6), Duration::from_secs(86_400));

impl FleetNetwork {
    /// Every check, naming the key at fault.
    pub fn validate(&self) -> Result<()> {
        if self.etcd_endpoints.is_empty() {
            bail!("etcd-endpoints: name at least one etcd client URL");
        }
        for (i, ep) in self.etcd_endpoints.iter().enumerate() {
            let rest = ep
                .strip_prefix("http://")
                .or_else(|| ep.strip_prefix("https://"))
                .unwrap_or_default();
            let bad = |c: char| c.is_whitespace() || c.is_control();
            if rest.is_empty() || rest.starts_with('/') || ep.contains(bad) || ep.len() > 256 {
                bail!("etcd-endpoints[{i}] {ep:?}: write an http:// or https:// URL");
            }
        }
        let cidr = self.cidr().context("cidr")?;
        if !(8..=28).contains(&cidr.prefix) {
            bail!("cidr {cidr}: its prefix must be 8..=28");
        }
        if self.node_prefix <= cidr.prefix || self.node_prefix > 28 {
            bail!(
                "node-prefix {}: must be longer than the cidr's /{} and at most 28",
                self.node_prefix,
                cidr.prefix
            );
        }
        if let Some(i) = &self.underlay_interface {
            if i.is_empty() || i.len() > 15 || i.contains(['/', ' ']) {
                bail!("underlay-interface {i:?}: not an interface name");
            }
        }
        let grace = self.subnet_grace().context("subnet-grace")?;
        if grace < GRACE_BOUNDS.0 || grace > GRACE_BOUNDS.1 {
            bail!(
                "subnet-grace {}: must be {}s..={}s",
                self.subnet_grace,
                GRACE_BOUNDS.0.as_secs(),
                GRACE_BOUNDS.1.as_secs()
            );
        }
        Ok(())
    }
    pub fn cidr(&self) -> Result<Ipv4Net> {
        self.cidr.parse()
    }
    pub fn subnet_grace(&self) -> Result<Duration> {
        crate::duration::parse(&self.subnet_grace)
    }
    /// Parses and checks a `network.toml`.
    pub fn parse(text: &str) -> Result<FleetNetwork> {
        let cfg: FleetNetwork = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// What the fleet agrees on, kept at [`ETCD_CONFIG_KEY`]: a node configured
/// otherwise refuses to join instead of routing into someone else's subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FleetAgreement {
    pub cidr: String,
    pub node_prefix: u8,
}

/// A leased subnet's etcd value: who holds it and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SubnetRecord {
    /// The holder's /etc/machine-id: how a rebooted node finds its subnet.
    pub node: String,
    pub hostname: String,
    /// The address peers send to (the node's underlay address).
    pub underlay: Ipv4Addr,
    /// The MAC of the holder's VXLAN device (none in host-gw mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
}

/// [`NODE_NETWORK`]: the agent's answer to "which bridge, which subnet".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeNetwork {
    pub bridge: String,
    /// The leased subnet, e.g. `10.88.3.0/24`.
    pub subnet: String,
    /// The bridge's address and prefix, as `host --subnet` takes it.
    pub gateway: String,
    pub cidr: String,
    pub mode: Mode,
    pub underlay_interface: String,
    pub underlay: Ipv4Addr,
    /// The containers' MTU (the underlay's less VXLAN's overhead, when used).
    pub mtu: u32,
    pub etcd_endpoints: Vec<String>,
}

/// Reads [`NODE_NETWORK`] under `root`; `None` when the node is not in a
/// fleet network (no agent has written it).
pub fn read_node_network(path: &std::path::Path) -> Result<Option<NodeNetwork>> {
    match std::fs::read(path) {
        Ok(b) if b.len() > 64 * 1024 => bail!("{} is over 64 KiB", path.display()),
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_strictly_and_split_into_subnets() {
        let n: Ipv4Net = "10.88.0.0/14".parse().unwrap();
        assert_eq!(n.subnet_count(24), 1024);
        assert_eq!(n.subnet(24, 0).unwrap().to_string(), "10.88.0.0/24");
        assert_eq!(n.subnet(24, 1023).unwrap().to_string(), "10.91.255.0/24");
        assert!(n.subnet(24, 1024).is_none());
        assert!(n.subnet(12, 0).is_none());
        assert!(n.covers(&"10.90.1.0/24".parse().unwrap()));
        assert!(!n.covers(&"10.92.0.0/24".parse().unwrap()));
        assert!(!n.covers(&"10.0.0.0/8".parse().unwrap()));
        let e = "10.88.0.1/14".parse::<Ipv4Net>().unwrap_err().to_string();
        assert!(e.contains("host bits"), "{e}");
        assert!("10.88.0.0".parse::<Ipv4Net>().is_err());
        assert!("10.88.0.0/33".parse::<Ipv4Net>().is_err());
        let s = n.subnet(24, 5).unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 5, 1));
        assert_eq!(Ipv4Net::from_etcd_key(&s.etcd_key()), Some(s));
        assert_eq!(
            Ipv4Net::from_etcd_key("/cairn/network/subnets/10.88.5.7-24"),
            None
        );
        assert_eq!(Ipv4Net::from_etcd_key("/elsewhere/10.88.5.0-24"), None);
    }

    #[test]
    fn fleet_config_defaults_and_checks() {
        let c = FleetNetwork::parse("etcd-endpoints = [\"http://10.0.2.2:2379\"]\n").unwrap();
        assert_eq!(
            (c.cidr.as_str(), c.node_prefix, c.mode),
            ("10.88.0.0/14", 24, Mode::Auto)
        );
        assert_eq!(c.subnet_grace().unwrap(), Duration::from_secs(300));
        for (text, want) in [
            ("etcd-endpoints = []", "etcd-endpoints"),
            ("etcd-endpoints = [\"10.0.0.1:2379\"]", "etcd-endpoints[0]"),
            ("etcd-endpoints = [\"http://\"]", "etcd-endpoints[0]"),
            (
                "etcd-endpoints = [\"http://a b:2379\"]",
                "etcd-endpoints[0]",
            ),
            (
                "etcd-endpoints = [\"http://e\"]\ncidr = \"10.88.0.1/14\"",
                "cidr",
            ),
            (
                "etcd-endpoints = [\"http://e\"]\nnode-prefix = 14",
                "node-prefix",
            ),
            (
                "etcd-endpoints = [\"http://e\"]\nnode-prefix = 30",
                "node-prefix",
            ),
            (
                "etcd-endpoints = [\"http://e\"]\nsubnet-grace = \"1s\"",
                "subnet-grace",
            ),
            ("etcd-endpoints = [\"http://e\"]\nmode = \"nat\"", "mode"),
            (
                "etcd-endpoints = [\"http://e\"]\nmasquerade = true",
                "masquerade",
            ),
            (
                "etcd-endpoints = [\"http://e\"]\nunderlay-interface = \"../x\"",
                "underlay-interface",
            ),
        ] {
            let e = format!("{:#}", FleetNetwork::parse(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
