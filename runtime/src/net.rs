//! Container networking: a host bridge, one veth pair per container, and a
//! host-local address allocator kept on disk. All link work goes through
//! netlink (rtnetlink), never ip(8).

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use cairn_contracts::network::{DEFAULT_BRIDGE, DEFAULT_SUBNET};

/// Which bridge containers attach to and the host's address on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// The containers' link MTU (both veth ends); None: the kernel's 1500.
    /// The fleet network lowers it under VXLAN, whose headers take 50 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self::parse(DEFAULT_BRIDGE, DEFAULT_SUBNET).expect("default network is valid")
    }
}

impl NetworkConfig {
    /// `subnet` is the gateway address with its prefix, e.g. `10.88.0.1/16`.
    pub fn parse(bridge: &str, subnet: &str) -> Result<Self> {
        check_ifname(bridge)?;
        let (addr, prefix) = subnet.split_once('/').ok_or_else(|| {
            anyhow!("subnet {subnet:?}: write it as GATEWAY/PREFIX, e.g. 10.88.0.1/16")
        })?;
        let gateway: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("subnet {subnet:?}: {addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| anyhow!("subnet {subnet:?}: prefix must be 8..=30"))?;
        let cfg = Self {
            bridge: bridge.to_string(),
            gateway,
            prefix,
            mtu: None,
        };
        if gateway == cfg.network() || gateway == cfg.broadcast() {
            bail!("subnet {subnet:?}: the gateway must be a host address of the subnet");
        }
        Ok(cfg)
    }
    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & self.mask())
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) | !self.mask())
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

pub fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        bail!("interface name {name:?}: 1 to 15 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// Host-local address allocator: one JSON file per bridge, changed under an
/// exclusive lock. Addresses are handed out round-robin after the last one
/// given, so a freed address is not reused while others are free.
pub struct Allocator {
    file: PathBuf,
    lock: PathBuf,
    cfg: NetworkConfig,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AllocState {
    #[serde(default)]
    last: Option<Ipv4Addr>,
    /// address → owner (container id).
    #[serde(default)]
    allocated: BTreeMap<Ipv4Addr, String>,
}

impl Allocator {
    pub fn new(dir: &Path, cfg: &NetworkConfig) -> Self {
        Self {
            file: dir.join(format!("{}.json", cfg.bridge)),
            lock: dir.join(format!("{}.lock", cfg.bridge)),
            cfg: cfg.clone(),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut AllocState) -> Result<T>) -> Result<T> {
        if let Some(d) = self.file.parent() {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let lockf = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)
            .with_context(|| format!("opening {}", self.lock.display()))?;
        let _guard = nix::fcntl::Flock::lock(lockf, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", self.lock.display()))?;
        let mut state: AllocState = match fs::read(&self.file) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("parsing {}", self.file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AllocState::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.file.display())),
        };
        let out = f(&mut state)?;
        // Not synced: it is on every bridged start's path, and each
        // persistent container's synced record keeps its address.
        cairn_contracts::durable::replace(&self.file, &serde_json::to_vec_pretty(&state)?)?;
        Ok(out)
    }

    /// Reserve an address for `owner`: the one asked for, or the next free one.
    pub fn allocate(&self, owner: &str, wanted: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        let cfg = self.cfg.clone();
        self.with_state(|st| {
            if let Some(ip) = wanted {
                if !cfg.contains(ip) || ip == cfg.network() || ip == cfg.broadcast() {
                    bail!(
                        "--ip {ip}: not a host address of {}/{} on bridge {}",
                        cfg.network(),
                        cfg.prefix,
                        cfg.bridge
                    );
                }
                if ip == cfg.gateway {
                    bail!("--ip {ip}: that is the bridge's own (gateway) address");
                }
                if let Some(o) = st.allocated.get(&ip) {
                    bail!("--ip {ip}: address in use by container {o}");
                }
                st.allocated.insert(ip, owner.to_string());
                return Ok(ip);
            }
            let first = u32::from(cfg.network()) + 1;
            let last = u32::from(cfg.broadcast()) - 1;
            let start = st
                .last
                .map(u32::from)
                .filter(|l| (first..=last).contains(l))
                .unwrap_or(last);
            let count = last - first + 1;
            for i in 1..=count {
                let cand = first + (start - first + i) % count;
                let ip = Ipv4Addr::from(cand);
                if ip != cfg.gateway && !st.allocated.contains_key(&ip) {
                    st.allocated.insert(ip, owner.to_string());
                    st.last = Some(ip);
                    return Ok(ip);
                }
            }
            bail!(
                "no free address left on bridge {} ({}/{})",
                cfg.bridge,
                cfg.network(),
                cfg.prefix
            )
        })
    }

    /// Give back every address held by `owner`.
    pub fn release(&self, owner: &str) -> Result<()> {
        self.with_state(|st| {
            st.allocated.retain(|_, o| o != owner);
            Ok(())
        })
    }
}

/// Run netlink requests on a small single-threaded runtime of our own.
fn netlink<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the netlink event loop")?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

async fn link_index(h: &rtnetlink::Handle, name: &str) -> Result<Option<u32>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
    }
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// Make sure the bridge exists, is up and carries the gateway address.
pub fn ensure_bridge(cfg: &NetworkConfig) -> Result<()> {
    let cfg = cfg.clone();
    netlink(move |h| async move {
        let idx = match link_index(&h, &cfg.bridge).await? {
            Some(i) => i,
            None => {
                match h
                    .link()
                    .add(rtnetlink::LinkBridge::new(&cfg.bridge).build())
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    Err(e) if is_exists(&e) => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("creating bridge {}", cfg.bridge))
                    }
                }
                link_index(&h, &cfg.bridge)
                    .await?
                    .ok_or_else(|| anyhow!("bridge {} vanished", cfg.bridge))?
            }
        };
        match h
            .address()
            .add(idx, cfg.gateway.into(), cfg.prefix)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if is_exists(&e) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("adding {}/{} to {}", cfg.gateway, cfg.prefix, cfg.bridge)
                })
            }
        }
        h.link()
            .set(rtnetlink::LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing {} up", cfg.bridge))?;
        Ok(())
    })
}

/// Delete a link by name; a missing link is fine.
pub fn delete_link(name: &str) -> Result<()> {
    let name = name.to_string();
    netlink(move |h| async move {
        if let Some(idx) = link_index(&h, &name).await? {
            match h.link().del(idx).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
                Err(e) => return Err(e).with_context(|| format!("deleting link {name}")),
            }
        }
        Ok(())
    })
}

/// Give the process `pid` (in its own network namespace) an `eth0` on the
/// bridge with address `ip`, loopback up and a default route via the bridge.
/// `host_if` names the host end of the veth pair.
pub fn attach(cfg: &NetworkConfig, pid: i32, host_if: &str, ip: Ipv4Addr) -> Result<()> {
    check_ifname(host_if)?;
    // Created inside the container's namespace, so the name cannot clash.
    let peer = "eth0".to_string();
    let c = cfg.clone();
    let (hi, pr) = (host_if.to_string(), peer.clone());
    let res = netlink(move |h| async move {
        let br = link_index(&h, &c.bridge)
            .await?
            .ok_or_else(|| anyhow!("bridge {} does not exist", c.bridge))?;
        // One request: the host end enslaved to the bridge and up, the peer
        // created directly inside the container's namespace (moving it there
        // afterwards costs a synchronize_net in the kernel, ~15 ms).
        use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
        let mut peer = rtnetlink::LinkUnspec::new_with_name(&pr).setns_by_pid(pid as u32);
        let mut veth = rtnetlink::LinkMessageBuilder::<rtnetlink::LinkVeth>::new_with_info_kind(
            InfoKind::Veth,
        )
        .name(hi.clone());
        if let Some(mtu) = c.mtu {
            peer = peer.mtu(mtu);
            veth = veth.mtu(mtu);
        }
        let veth = veth
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .controller(br)
            .up()
            .build();
        h.link()
            .add(veth)
            .execute()
            .await
            .with_context(|| format!("creating veth pair {hi}/{pr} on {}", c.bridge))?;
        Ok(())
    });
    if let Err(e) = res {
        let _ = delete_link(host_if);
        return Err(e);
    }
    // Configure the inside from a thread that joins the container's netns.
    let ns_path = format!("/proc/{pid}/ns/net");
    let c = cfg.clone();
    let inside = std::thread::spawn(move || -> Result<()> {
        let ns = fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {ns_path}"))?;
        netlink(move |h| async move {
            // A new network namespace starts with loopback as ifindex 1.
            let lo = 1;
            h.link()
                .set(rtnetlink::LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await?;
            let idx = link_index(&h, &peer)
                .await?
                .ok_or_else(|| anyhow!("{peer} did not arrive in the container"))?;
            h.address()
                .add(idx, ip.into(), c.prefix)
                .execute()
                .await
                .with_context(|| format!("adding {ip}/{} to eth0", c.prefix))?;
            h.link()
                .set(rtnetlink::LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .context("bringing eth0 up")?;
            let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(c.gateway)
                .build();
            h.route()
                .add(route)
                .execute()
                .await
                .with_context(|| format!("adding default route via {}", c.gateway))?;
            Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow!("network setup thread panicked"))
    .and_then(|r| r);
    if let Err(e) = inside {
        let _ = delete_link(host_if);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_config() {
        let c = NetworkConfig::default();
        assert_eq!((c.bridge.as_str(), c.prefix), ("cairn0", 16));
        assert_eq!(c.network(), Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 88, 255, 255));
        assert!(c.contains(Ipv4Addr::new(10, 88, 3, 4)));
        assert!(!c.contains(Ipv4Addr::new(10, 89, 0, 1)));
        assert!(NetworkConfig::parse("br", "10.0.0.0/24").is_err());
        assert!(NetworkConfig::parse("br", "10.0.0.1").is_err());
        assert!(NetworkConfig::parse("a-name-much-too-long", "10.0.0.1/24").is_err());
    }

    #[test]
    fn allocator_never_hands_out_an_address_twice() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = NetworkConfig::parse("t0", "192.168.7.1/29").unwrap(); // hosts .1-.6, .1 is the gateway
        let a = Allocator::new(dir.path(), &cfg);
        let ips: Vec<_> = (0..5)
            .map(|i| a.allocate(&format!("c{i}"), None).unwrap())
            .collect();
        let mut sorted = ips.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 5);
        assert!(!ips.contains(&cfg.gateway));
        assert!(a
            .allocate("c5", None)
            .unwrap_err()
            .to_string()
            .contains("no free address"));
        // Freed addresses come back, but only after the round-robin passes them.
        a.release("c1").unwrap();
        assert_eq!(a.allocate("c6", None).unwrap(), ips[1]);
        // Persistence: a fresh allocator sees the same state.
        let b = Allocator::new(dir.path(), &cfg);
        assert_eq!(
            b.with_state(|st| Ok(st.allocated.get(&ips[0]).cloned()))
                .unwrap()
                .as_deref(),
            Some("c0")
        );
        let e = b.allocate("x", Some(ips[0])).unwrap_err().to_string();
        assert!(e.contains("in use by container c0"), "{e}");
        assert!(b.allocate("x", Some(cfg.gateway)).is_err());
        assert!(b.allocate("x", Some(Ipv4Addr::new(10, 0, 0, 1))).is_err());
        b.release("c3").unwrap();
        assert_eq!(b.allocate("x", Some(ips[3])).unwrap(), ips[3]);
    }

    #[test]
    fn round_robin_skips_recently_freed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = NetworkConfig::parse("t1", "10.1.0.1/24").unwrap();
        let a = Allocator::new(dir.path(), &cfg);
        let first = a.allocate("a", None).unwrap();
        a.release("a").unwrap();
        let second = a.allocate("b", None).unwrap();
        assert_ne!(first, second);
    }
}
