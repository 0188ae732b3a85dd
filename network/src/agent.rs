//! The fleet network agent (`host net agent`, `cairn-net.service`): joins
//! the fleet, leases this node's subnet, gives the bridge its address, and
//! routes to every other node's subnet from a watch-fed mirror of etcd. It
//! exits with an error when its lease is lost (systemd starts it again, and
//! the new run asks for the same subnet back).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cairn_contracts::network::{
    FleetNetwork, Ipv4Net, Mode, NodeNetwork, SubnetRecord, BRIDGE_NETWORK_FILE,
    ETCD_SUBNETS_PREFIX,
};
use cairn_contracts::services::{check_label, DNS_ZONE, ETCD_SERVICES_PREFIX};
use cairn_etcd::{Etcd, Mirror};

use crate::dns::{self, Directory};
use crate::lease::{parse_record, Held, Leaser};
use crate::links::{self, Path as RoutePath, Route, Underlay};
use crate::registry::Registrar;

/// Where the agent reads and writes; the defaults are the node's paths,
/// tests give their own.
#[derive(Debug, Clone)]
pub struct Paths {
    pub node_network: PathBuf,
    pub state_dir: PathBuf,
    /// networkd's runtime directory, to shadow the bridge's file (None: no
    /// networkd here).
    pub networkd_dir: Option<PathBuf>,
    pub machine_id: PathBuf,
    /// Where monitors publish serving containers (contracts::services).
    pub registration_dir: PathBuf,
    /// The DNS responder's port on the bridge address (53 on a node).
    pub dns_port: u16,
}

/// Where the agent is, for its log lines and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Joined { subnet: Ipv4Net, reclaimed: bool },
    Routed { peers: usize },
    Registered { keys: usize },
}

/// Joins and serves until the lease is lost or etcd stays away longer than
/// the grace. `progress` hears each step.
pub fn run(
    cfg: &FleetNetwork,
    bridge: &str,
    paths: &Paths,
    mut progress: impl FnMut(Progress),
) -> Result<()> {
    cfg.validate()?;
    let etcd = Etcd::new(&cfg.etcd_endpoints)?;
    let grace = cfg.subnet_grace()?;
    wait_for_etcd(&etcd, grace)?;
    let leaser = Leaser::new(etcd.clone(), cfg, &paths.state_dir)?;
    leaser.agree()?;
    let underlay = links::underlay(cfg.underlay_interface.as_deref())?;
    let cidr = cfg.cidr()?;
    if cidr.contains(underlay.addr) {
        bail!(
            "the underlay address {} of {} lies inside the fleet cidr {cidr}: pick a cidr the nodes' own network does not use",
            underlay.addr,
            underlay.name
        );
    }
    let node = read_machine_id(&paths.machine_id)?;
    let hostname = dns_hostname(&node);
    let mut record = SubnetRecord {
        node,
        hostname,
        underlay: underlay.addr,
        vtep_mac: None,
    };
    let held = leaser.acquire(&record)?;
    tracing::info!(subnet = %held.subnet, reclaimed = held.reclaimed, "leased");
    let mut mtu = underlay.mtu;
    if cfg.mode != Mode::HostGw {
        let mac = links::vtep_mac(&record.node);
        let vx_mtu = links::ensure_vxlan(&underlay, held.subnet, mac)?;
        record.vtep_mac = Some(links::format_mac(&mac));
        leaser.update(&held, &record)?;
        mtu = vx_mtu;
    } else {
        links::remove_vxlan()?;
    }
    links::ensure_bridge(bridge, held.subnet.gateway(), held.subnet.prefix)?;
    links::enable_forwarding()?;
    links::set_masquerade(cfg.masquerade_egress, held.subnet, cidr)?;
    if let Some(dir) = &paths.networkd_dir {
        shadow_networkd(dir, bridge, &held.subnet)?;
    }
    let published = NodeNetwork {
        bridge: bridge.to_string(),
        subnet: held.subnet.to_string(),
        gateway: format!("{}/{}", held.subnet.gateway(), held.subnet.prefix),
        cidr: cidr.to_string(),
        mode: cfg.mode,
        underlay_interface: underlay.name.clone(),
        underlay: underlay.addr,
        mtu,
        etcd_endpoints: cfg.etcd_endpoints.clone(),
    };
    if let Some(dir) = paths.node_network.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Read by `host app` and `host net status`: no secret in it.
    cairn_contracts::durable::write_mode(
        &paths.node_network,
        &serde_json::to_vec_pretty(&published)?,
        0o644,
    )
    .with_context(|| format!("writing {}", paths.node_network.display()))?;
    progress(Progress::Joined {
        subnet: held.subnet,
        reclaimed: held.reclaimed,
    });
    notify_ready();

    // Routes and the DNS directory each follow etcd on a thread of their
    // own; this thread publishes registrations and keeps the leases alive,
    // and returns the first fatal error of any.
    let (fatal_tx, fatal_rx) = mpsc::channel::<anyhow::Error>();
    let (routed_tx, routed_rx) = mpsc::channel::<usize>();
    let (own, mode, u) = (held.subnet, cfg.mode, underlay.clone());
    spawn_follower(
        &etcd,
        ETCD_SUBNETS_PREFIX,
        grace,
        fatal_tx.clone(),
        move |m| {
            let (routes, skipped) = plan_routes(cidr, own, mode, &u, &m.entries);
            for s in skipped {
                tracing::warn!("{s}");
            }
            links::program(&u, &routes)?;
            let _ = routed_tx.send(routes.len());
            Ok(())
        },
    );
    let directory = Arc::new(RwLock::new(Directory::default()));
    let dir = directory.clone();
    spawn_follower(&etcd, ETCD_SERVICES_PREFIX, grace, fatal_tx, move |m| {
        let d = Directory::from_entries(&m.entries);
        *dir.write().unwrap_or_else(|p| p.into_inner()) = d;
        Ok(())
    });
    let gateway = held.subnet.gateway();
    let _dns = dns::start(
        SocketAddr::from((gateway, paths.dns_port)),
        directory,
        dns::system_upstreams(&[IpAddr::V4(gateway)]),
    )
    .with_context(|| format!("starting the DNS responder on {gateway}:{}", paths.dns_port))?;
    let mut registrar = Registrar::new(
        etcd.clone(),
        &paths.registration_dir,
        &record.hostname,
        &record.node,
        held.subnet,
        REGISTRATION_TTL.as_secs() as i64,
    );
    registrar.forget_earlier_runs()?;
    serve(
        &leaser,
        &held,
        grace,
        &mut registrar,
        &fatal_rx,
        &routed_rx,
        &mut progress,
    )
}

/// How long a silent watch is trusted: etcd sends a progress message every
/// 10 minutes (its default) on a quiet prefix, so longer silence is a dead
/// connection. Lease renewals notice an unreachable etcd much sooner.
const WATCH_IDLE: Duration = Duration::from_secs(11 * 60);

/// How long a dead node's service records outlive it.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(10);
/// How often registration files are looked at: a new instance is in etcd
/// within this, and everywhere a watch later.
const SCAN_EVERY: Duration = Duration::from_millis(250);

fn serve(
    leaser: &Leaser,
    held: &Held,
    grace: Duration,
    registrar: &mut Registrar,
    fatal: &mpsc::Receiver<anyhow::Error>,
    routed: &mpsc::Receiver<usize>,
    progress: &mut impl FnMut(Progress),
) -> Result<()> {
    let subnet_every = (grace / 3).min(Duration::from_secs(10));
    let registration_every = REGISTRATION_TTL / 3;
    let (mut subnet_at, mut registration_at) = (Instant::now(), Instant::now());
    let mut last_ok = Instant::now();
    let mut warned = std::collections::BTreeSet::new();
    loop {
        if let Ok(peers) = routed.recv_timeout(SCAN_EVERY) {
            progress(Progress::Routed { peers });
        }
        if let Ok(e) = fatal.try_recv() {
            return Err(e.context("following the fleet in etcd"));
        }
        let mut skipped = Vec::new();
        match registrar.sync(&mut skipped) {
            Ok(true) => progress(Progress::Registered {
                keys: registrar.published(),
            }),
            Ok(false) => {}
            Err(e) => tracing::warn!("registering this node's services: {e:#}; trying again"),
        }
        for s in skipped {
            // Once per bad file, not four times a second.
            if warned.insert(s.clone()) {
                tracing::warn!("registration skipped: {s}");
            }
        }
        let now = Instant::now();
        if now >= registration_at {
            registration_at = now + registration_every;
            if let Err(e) = registrar.keepalive() {
                tracing::warn!("renewing the registration lease: {e:#}; trying again");
            }
        }
        if now < subnet_at {
            continue;
        }
        subnet_at = now + subnet_every;
        match leaser.keepalive(held) {
            Ok(()) => last_ok = Instant::now(),
            Err(e) if e.to_string().contains("expired") => {
                return Err(e.context(format!(
                    "the lease on {} ran out (etcd did not hear from this node for {}s); restart the agent to lease again",
                    held.subnet,
                    grace.as_secs()
                )))
            }
            Err(e) if last_ok.elapsed() > grace => {
                return Err(e.context(format!(
                    "etcd has been unreachable longer than the subnet grace ({}s)",
                    grace.as_secs()
                )))
            }
            Err(e) => tracing::warn!("renewing the subnet lease: {e:#}; trying again"),
        }
    }
}

/// Follows `prefix` on a thread: `apply` sees the mirror at start and after
/// every change. A broken watch resumes from a new snapshot; only failing
/// longer than `grace` is fatal (sent on `fatal`).
fn spawn_follower(
    etcd: &Etcd,
    prefix: &'static str,
    grace: Duration,
    fatal: mpsc::Sender<anyhow::Error>,
    apply: impl FnMut(&Mirror) -> Result<()> + Send + 'static,
) {
    let etcd = etcd.clone();
    std::thread::spawn(move || {
        let e = follow_prefix(&etcd, prefix, grace, apply);
        let _ = fatal.send(e);
    });
}

/// Mirrors `prefix` and calls `apply` whenever it changes; returns only an
/// error.
fn follow_prefix(
    etcd: &Etcd,
    prefix: &str,
    grace: Duration,
    mut apply: impl FnMut(&Mirror) -> Result<()>,
) -> anyhow::Error {
    let mut failing_since: Option<Instant> = None;
    loop {
        let result = (|| -> Result<()> {
            let mut mirror = Mirror::from_snapshot(etcd.snapshot(prefix)?);
            apply(&mirror)?;
            failing_since = None;
            let mut err = None;
            etcd.watch_prefix(prefix, mirror.revision + 1, WATCH_IDLE, |rev, events| {
                if mirror.apply(rev, events) {
                    if let Err(e) = apply(&mirror) {
                        err = Some(e);
                        return false;
                    }
                }
                true
            })?;
            Err(err.unwrap_or_else(|| anyhow!("the watch ended")))
        })();
        let e = result.expect_err("the loop only returns errors");
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > grace {
            return e;
        }
        tracing::warn!("following {prefix}: {e:#}; resuming");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The routes to every valid peer subnet in `entries` (etcd key → record),
/// and a line for each record skipped. A record is skipped, not trusted,
/// when its subnet lies outside the fleet or is ours, its underlay address
/// is inside the fleet or not a unicast address, or it needs a path this
/// mode cannot give it.
pub fn plan_routes(
    cidr: Ipv4Net,
    own: Ipv4Net,
    mode: Mode,
    underlay: &Underlay,
    entries: &BTreeMap<String, Vec<u8>>,
) -> (Vec<Route>, Vec<String>) {
    let mut routes = Vec::new();
    let mut skipped = Vec::new();
    for (key, value) in entries {
        let Some(subnet) = Ipv4Net::from_etcd_key(key) else {
            skipped.push(format!("etcd key {key}: not a subnet key; ignored"));
            continue;
        };
        if subnet == own {
            continue;
        }
        if !cidr.covers(&subnet) || subnet.prefix != own.prefix {
            skipped.push(format!(
                "{subnet}: not a /{} subnet of {cidr}; not routed",
                own.prefix
            ));
            continue;
        }
        let Some(rec) = parse_record(value) else {
            skipped.push(format!(
                "{subnet}: its record is not a cairn subnet record; not routed"
            ));
            continue;
        };
        let u = rec.underlay;
        if !unicast(u) || cidr.contains(u) || u == underlay.addr {
            skipped.push(format!(
                "{subnet}: underlay address {u} cannot be a peer; not routed"
            ));
            continue;
        }
        let on_link = underlay.net.contains(u);
        let direct = match mode {
            Mode::HostGw => true,
            Mode::Vxlan => false,
            Mode::Auto => on_link,
        };
        let path = if direct {
            if !on_link {
                skipped.push(format!(
                    "{subnet}: peer {u} is not on {} ({}); host-gw needs one L2, use mode = \"auto\" or \"vxlan\"",
                    underlay.name, underlay.net
                ));
                continue;
            }
            RoutePath::Direct { via: u }
        } else {
            match rec.vtep_mac.as_deref().map(links::parse_mac) {
                Some(Ok(mac)) => RoutePath::Vxlan { underlay: u, mac },
                _ => {
                    skipped.push(format!(
                        "{subnet}: peer {u} has no valid VXLAN MAC (is it in host-gw mode?); not routed"
                    ));
                    continue;
                }
            }
        };
        routes.push(Route { subnet, path });
    }
    routes.sort();
    (routes, skipped)
}

fn unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_link_local())
}

fn wait_for_etcd(etcd: &Etcd, grace: Duration) -> Result<()> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        match etcd.healthy() {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() < grace => {
                tracing::warn!("waiting for etcd ({}): {e:#}", etcd.endpoints().join(", "));
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(e.context(format!(
                    "etcd did not answer within the subnet grace ({}s)",
                    grace.as_secs()
                )))
            }
        }
    }
}

/// The node's name in DNS (`CONTAINER.NODE.cairn`): its hostname when that
/// is a DNS label, else one made from the machine id.
fn dns_hostname(machine_id: &str) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let first = host.split('.').next().unwrap_or_default().to_string();
    if check_label("node", &first).is_ok() {
        first
    } else {
        format!("node-{}", &machine_id[..machine_id.len().min(12)])
    }
}

fn read_machine_id(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the machine id from {}", path.display()))?;
    let id = text.trim();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{}: not a machine id (32 hex digits)", path.display());
    }
    Ok(id.to_string())
}

/// networkd owns the bridge on a node and would put the tree's single-node
/// address back; a file of the same name under /run takes precedence.
fn shadow_networkd(dir: &Path, bridge: &str, subnet: &Ipv4Net) -> Result<()> {
    // DNS= and Domains=~cairn: networkd hands them to systemd-resolved,
    // which then sends the node's own *.cairn queries (only those) to the
    // fleet network's DNS on this bridge.
    let text = format!(
        "# Written by cairn-net.service: the leased subnet {subnet} (see /etc/cairn/network.toml).\n\
         [Match]\nName={bridge}\n\n[Network]\nAddress={gw}/{}\nDNS={gw}\nDomains=~{DNS_ZONE}\n\
         ConfigureWithoutCarrier=yes\nIgnoreCarrierLoss=yes\n\n[Link]\nRequiredForOnline=no\n",
        subnet.prefix,
        gw = subnet.gateway(),
    );
    let path = dir.join(BRIDGE_NETWORK_FILE);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // networkd reads it as its own user: 0644.
    cairn_contracts::durable::write_mode(&path, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    // networkd reads its files again only when told; the address is set
    // already, this keeps networkd from taking it back later.
    match std::process::Command::new("networkctl")
        .arg("reload")
        .status()
    {
        Ok(st) if st.success() => {}
        Ok(st) => tracing::warn!(
            "networkctl reload: {st}; networkd sees {} at its next reload",
            path.display()
        ),
        Err(e) => tracing::warn!(
            "networkctl reload: {e}; networkd sees {} at its next reload",
            path.display()
        ),
    }
    Ok(())
}

/// Tells systemd (Type=notify) the node's subnet is ready: containers may
/// start. No NOTIFY_SOCKET: nothing to tell.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = sent {
        tracing::warn!("telling systemd the network is ready: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn underlay() -> Underlay {
        Underlay {
            name: "eth0".into(),
            index: 2,
            addr: "192.168.50.2".parse().unwrap(),
            net: "192.168.50.0/24".parse().unwrap(),
            mtu: 1500,
        }
    }

    fn rec(underlay: &str, mac: Option<&str>) -> Vec<u8> {
        serde_json::to_vec(&SubnetRecord {
            node: "0".repeat(32),
            hostname: "n".into(),
            underlay: underlay.parse().unwrap(),
            vtep_mac: mac.map(String::from),
        })
        .unwrap()
    }

    #[test]
    fn routes_go_direct_on_link_and_through_vxlan_beyond_and_hostile_records_are_skipped() {
        let cidr: Ipv4Net = "10.88.0.0/14".parse().unwrap();
        let own: Ipv4Net = "10.88.1.0/24".parse().unwrap();
        let mac = Some("02:00:00:00:00:07");
        let mut e = BTreeMap::new();
        let key = |s: &str| s.parse::<Ipv4Net>().unwrap().etcd_key();
        e.insert(key("10.88.1.0/24"), rec("192.168.50.2", mac)); // ours
        e.insert(key("10.88.2.0/24"), rec("192.168.50.3", mac)); // on link
        e.insert(key("10.88.3.0/24"), rec("172.16.0.9", mac)); // beyond
        e.insert(key("10.88.4.0/24"), rec("10.89.0.1", mac)); // underlay inside the fleet
        e.insert(key("10.88.5.0/24"), rec("127.0.0.1", mac)); // loopback
        e.insert(key("10.88.6.0/24"), b"{not json".to_vec());
        e.insert(
            key("10.88.7.0/24"),
            rec("172.16.0.10", Some("ff:ff:ff:ff:ff:ff")),
        );
        e.insert(key("10.88.8.0/25"), rec("192.168.50.4", mac)); // wrong length
        e.insert(key("10.99.0.0/24"), rec("192.168.50.5", mac)); // outside the fleet
        e.insert(
            "/cairn/network/subnets/junk".into(),
            rec("192.168.50.6", mac),
        );

        let (routes, skipped) = plan_routes(cidr, own, Mode::Auto, &underlay(), &e);
        let got: Vec<String> = routes
            .iter()
            .map(|r| format!("{} {:?}", r.subnet, r.path))
            .collect();
        assert_eq!(
            got,
            [
                "10.88.2.0/24 Direct { via: 192.168.50.3 }",
                "10.88.3.0/24 Vxlan { underlay: 172.16.0.9, mac: [2, 0, 0, 0, 0, 7] }"
            ]
        );
        assert_eq!(skipped.len(), 7, "{skipped:#?}");

        // host-gw cannot reach beyond the link; vxlan goes through the tunnel for all.
        let (routes, skipped) = plan_routes(cidr, own, Mode::HostGw, &underlay(), &e);
        assert_eq!(routes.len(), 1);
        assert!(
            skipped.iter().any(|s| s.contains("host-gw needs one L2")),
            "{skipped:#?}"
        );
        let (routes, _) = plan_routes(cidr, own, Mode::Vxlan, &underlay(), &e);
        assert!(routes
            .iter()
            .all(|r| matches!(r.path, RoutePath::Vxlan { .. })));
        assert_eq!(routes.len(), 2);
    }

    #[test]
    fn machine_ids_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("machine-id");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(read_machine_id(&p).unwrap().len(), 32);
        std::fs::write(&p, "uninitialized\n").unwrap();
        assert!(read_machine_id(&p).is_err());
    }
}
