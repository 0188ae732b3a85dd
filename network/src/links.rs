//! The kernel side of the fleet network, all over netlink: the bridge's
//! leased address, the VXLAN device, and one route per peer subnet (with a
//! permanent neighbour and FDB entry per VXLAN peer). Every route carries
//! [`ROUTE_PROTOCOL`], so reconciling removes only what cairn added.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, bail, Context, Result};
use cairn_contracts::network::{
    Ipv4Net, ROUTE_PROTOCOL, VXLAN_DEVICE, VXLAN_OVERHEAD, VXLAN_PORT, VXLAN_VNI,
};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use rtnetlink::packet_route::AddressFamily;

const MAIN_TABLE: u8 = 254;

/// The link peers reach this node on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub index: u32,
    pub addr: Ipv4Addr,
    /// The link's own network (its address's prefix).
    pub net: Ipv4Net,
    pub mtu: u32,
}

/// How one peer subnet is reached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// A route via the peer's underlay address, on a shared link.
    Direct { via: Ipv4Addr },
    /// Through the VXLAN device to the peer's VTEP.
    Vxlan { underlay: Ipv4Addr, mac: [u8; 6] },
}

/// A peer subnet and its path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub subnet: Ipv4Net,
    pub path: Path,
}

/// A route of cairn's in the kernel, as `host net status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstalledRoute {
    pub destination: String,
    pub gateway: Option<Ipv4Addr>,
    pub device: String,
}

/// Runs netlink requests on a small single-threaded runtime of our own
/// (the runtime crate has the same runner: neither depends on the other).
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

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

struct LinkInfo {
    index: u32,
    mtu: u32,
    mac: Option<Vec<u8>>,
}

async fn link(h: &rtnetlink::Handle, name: &str) -> Result<Option<LinkInfo>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => {
            let mut info = LinkInfo {
                index: l.header.index,
                mtu: 1500,
                mac: None,
            };
            for a in l.attributes {
                match a {
                    LinkAttribute::Mtu(m) => info.mtu = m,
                    LinkAttribute::Address(mac) => info.mac = Some(mac),
                    _ => {}
                }
            }
            Ok(Some(info))
        }
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
    }
}

async fn ipv4_addresses(h: &rtnetlink::Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(a) = addrs.try_next().await? {
        for attr in &a.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                out.push((*ip, a.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// The interface the default route leaves by (from /proc/net/route: one
/// read, no netlink dump of the whole table).
fn default_route_interface() -> Result<String> {
    let text = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
        })
        .next()
        .ok_or_else(|| {
            anyhow!("this node has no default route: set underlay-interface in the network config")
        })
}

/// Finds the underlay: `name`, or the default route's interface, and its
/// first IPv4 address.
pub fn underlay(name: Option<&str>) -> Result<Underlay> {
    let name = match name {
        Some(n) => n.to_string(),
        None => default_route_interface()?,
    };
    netlink(move |h| async move {
        let info = link(&h, &name)
            .await?
            .ok_or_else(|| anyhow!("underlay interface {name} does not exist"))?;
        let (addr, prefix) = *ipv4_addresses(&h, info.index)
            .await?
            .first()
            .ok_or_else(|| anyhow!("underlay interface {name} has no IPv4 address (yet)"))?;
        let net = Ipv4Net::new(
            Ipv4Addr::from(u32::from(addr) & Ipv4Net { addr, prefix }.mask()),
            prefix,
        )?;
        Ok(Underlay {
            name,
            index: info.index,
            addr,
            net,
            mtu: info.mtu,
        })
    })
}

/// The bridge exists, is up, and carries exactly `gateway/prefix` as its
/// IPv4 address (the single-node address it may have had is removed).
pub fn ensure_bridge(bridge: &str, gateway: Ipv4Addr, prefix: u8) -> Result<()> {
    let bridge = bridge.to_string();
    netlink(move |h| async move {
        let index = match link(&h, &bridge).await? {
            Some(l) => l.index,
            None => {
                match h
                    .link()
                    .add(rtnetlink::LinkBridge::new(&bridge).build())
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e).with_context(|| format!("creating bridge {bridge}")),
                }
                link(&h, &bridge)
                    .await?
                    .ok_or_else(|| anyhow!("bridge {bridge} vanished"))?
                    .index
            }
        };
        let present = ipv4_addresses(&h, index).await?;
        for (ip, len) in &present {
            if (*ip, *len) != (gateway, prefix) {
                let mut msgs = h
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .set_address_filter(IpAddr::V4(*ip))
                    .execute();
                while let Some(m) = msgs.try_next().await? {
                    h.address()
                        .del(m)
                        .execute()
                        .await
                        .with_context(|| format!("removing {ip}/{len} from {bridge}"))?;
                }
            }
        }
        if !present.contains(&(gateway, prefix)) {
            match h
                .address()
                .add(index, gateway.into(), prefix)
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("adding {gateway}/{prefix} to {bridge}"))
                }
            }
        }
        h.link()
            .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing {bridge} up"))?;
        Ok(())
    })
}

/// The VTEP MAC of a node: fixed by its machine id, locally administered
/// and unicast. Set explicitly, because udev gives a device created with a
/// random MAC a new one right after (MACAddressPolicy=persistent), and
/// peers would then send to a MAC that no longer exists.
pub fn vtep_mac(machine_id: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("cairn-vtep:{machine_id}").as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&d[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// The VXLAN device on `underlay`, up, with MAC `mac` and `subnet`'s
/// network address as its own /32 (the VTEP address peers' routes point
/// at). Returns its MTU. A device left in another shape is made anew.
pub fn ensure_vxlan(underlay: &Underlay, subnet: Ipv4Net, mac: [u8; 6]) -> Result<u32> {
    let u = underlay.clone();
    netlink(move |h| async move {
        let mtu = u.mtu.saturating_sub(VXLAN_OVERHEAD);
        if let Some(l) = link(&h, VXLAN_DEVICE).await? {
            let addrs = ipv4_addresses(&h, l.index).await?;
            if l.mtu != mtu
                || l.mac.as_deref() != Some(&mac[..])
                || !addrs.iter().all(|(ip, _)| *ip == subnet.addr)
            {
                h.link().del(l.index).execute().await.ok();
            }
        }
        if link(&h, VXLAN_DEVICE).await?.is_none() {
            let msg = rtnetlink::LinkVxlan::new(VXLAN_DEVICE, VXLAN_VNI)
                .dev(u.index)
                .local(u.addr)
                .port(VXLAN_PORT)
                .learning(false)
                .mtu(mtu)
                .address(mac.to_vec())
                .build();
            h.link().add(msg).execute().await.with_context(|| {
                format!("creating the VXLAN device {VXLAN_DEVICE} on {}", u.name)
            })?;
        }
        let l = link(&h, VXLAN_DEVICE)
            .await?
            .ok_or_else(|| anyhow!("{VXLAN_DEVICE} vanished"))?;
        match h
            .address()
            .add(l.index, subnet.addr.into(), 32)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("adding {}/32 to {VXLAN_DEVICE}", subnet.addr))
            }
        }
        h.link()
            .set(rtnetlink::LinkUnspec::new_with_index(l.index).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing {VXLAN_DEVICE} up"))?;
        if l.mac.as_deref() != Some(&mac[..]) {
            bail!("{VXLAN_DEVICE} did not take MAC {}", format_mac(&mac));
        }
        Ok(mtu)
    })
}

/// Removes the VXLAN device (and with it its routes, neighbours and FDB).
pub fn remove_vxlan() -> Result<()> {
    netlink(|h| async move {
        if let Some(l) = link(&h, VXLAN_DEVICE).await? {
            h.link()
                .del(l.index)
                .execute()
                .await
                .with_context(|| format!("deleting {VXLAN_DEVICE}"))?;
        }
        Ok(())
    })
}

/// Forwarding on, as a router must: the node forwards between its bridge
/// and its underlay.
pub fn enable_forwarding() -> Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
        .context("turning on IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)")
}

fn ours(r: &rtnetlink::packet_route::route::RouteMessage) -> bool {
    r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) && r.header.table == MAIN_TABLE
}

fn destination(r: &rtnetlink::packet_route::route::RouteMessage) -> Option<Ipv4Net> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
            Ipv4Net::new(*ip, r.header.destination_prefix_length).ok()
        }
        _ => None,
    })
}

/// Makes the kernel's cairn routes exactly `routes`: adds or replaces each,
/// removes every other route of cairn's, and keeps the VXLAN device's
/// neighbour and FDB entries to the VXLAN peers.
pub fn program(underlay: &Underlay, routes: &[Route]) -> Result<()> {
    let u = underlay.clone();
    let routes = routes.to_vec();
    netlink(move |h| async move {
        let vx = link(&h, VXLAN_DEVICE).await?.map(|l| l.index);
        let wanted: BTreeSet<Ipv4Net> = routes.iter().map(|r| r.subnet).collect();
        // Stale routes first, so a subnet that moved paths is not doubled.
        let mut dump = h
            .route()
            .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut stale = Vec::new();
        while let Some(r) = dump.try_next().await? {
            if ours(&r) && !destination(&r).is_some_and(|d| wanted.contains(&d)) {
                stale.push(r);
            }
        }
        for r in stale {
            let d = destination(&r);
            if let Err(e) = h.route().del(r).execute().await {
                if errno(&e) != Some(libc::ESRCH) {
                    return Err(e).with_context(|| format!("removing the route to {d:?}"));
                }
            }
        }
        let mut vx_neigh: BTreeMap<Ipv4Addr, [u8; 6]> = BTreeMap::new();
        let mut vx_fdb: BTreeMap<[u8; 6], Ipv4Addr> = BTreeMap::new();
        for r in &routes {
            let builder = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(r.subnet.addr, r.subnet.prefix)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
            let msg = match &r.path {
                Path::Direct { via } => builder.gateway(*via).output_interface(u.index).build(),
                Path::Vxlan { underlay, mac } => {
                    let vx = vx.ok_or_else(|| {
                        anyhow!(
                            "peer {} needs VXLAN, but {VXLAN_DEVICE} does not exist",
                            r.subnet
                        )
                    })?;
                    vx_neigh.insert(r.subnet.addr, *mac);
                    vx_fdb.insert(*mac, *underlay);
                    builder
                        .gateway(r.subnet.addr)
                        .output_interface(vx)
                        .onlink()
                        .build()
                }
            };
            if let Path::Vxlan {
                underlay: peer,
                mac,
            } = &r.path
            {
                let vx = vx.expect("checked above");
                h.neighbours()
                    .add(vx, IpAddr::V4(r.subnet.addr))
                    .link_layer_address(mac)
                    .replace()
                    .execute()
                    .await
                    .with_context(|| {
                        format!("adding the neighbour of {} on {VXLAN_DEVICE}", r.subnet)
                    })?;
                let mut fdb = h.neighbours().add_bridge(vx, mac).replace();
                fdb.message_mut().header.flags = NeighbourFlags::Own;
                fdb.message_mut()
                    .attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        *peer,
                    )));
                fdb.execute()
                    .await
                    .with_context(|| format!("adding the FDB entry of {} ({peer})", r.subnet))?;
            }
            h.route()
                .add(msg)
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding the route to {} ({:?})", r.subnet, r.path))?;
        }
        if let Some(vx) = vx {
            prune_vxlan_entries(&h, vx, &vx_neigh, &vx_fdb).await?;
        }
        Ok(())
    })
}

/// Removes the VXLAN device's neighbour and FDB entries of peers that left.
async fn prune_vxlan_entries(
    h: &rtnetlink::Handle,
    vx: u32,
    neigh: &BTreeMap<Ipv4Addr, [u8; 6]>,
    fdb: &BTreeMap<[u8; 6], Ipv4Addr>,
) -> Result<()> {
    for family in [AddressFamily::Inet, AddressFamily::Bridge] {
        let mut dump = h.neighbours().get().set_address_family(family).execute();
        let mut stale = Vec::new();
        while let Some(n) = dump.try_next().await? {
            if n.header.ifindex != vx {
                continue;
            }
            let keep = match family {
                AddressFamily::Inet => n.attributes.iter().any(|a| {
                    matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) if neigh.contains_key(ip))
                }),
                _ => n.attributes.iter().any(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(m) => {
                        <[u8; 6]>::try_from(m.as_slice()).is_ok_and(|m| fdb.contains_key(&m))
                    }
                    _ => false,
                }),
            };
            if !keep {
                stale.push(n);
            }
        }
        for n in stale {
            if let Err(e) = h.neighbours().del(n).execute().await {
                if !matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ESRCH)) {
                    return Err(e).context("removing a stale VXLAN neighbour or FDB entry");
                }
            }
        }
    }
    Ok(())
}

/// The egress masquerade: with `on`, packets from `subnet` to anywhere
/// outside `cidr` leave behind the node's address; fleet traffic is never
/// touched. It lives alone in nftables table `ip cairn`, replaced in one
/// transaction; off removes the table. nft(8) is the kernel's own
/// ruleset tool (the tree ships nftables for this).
pub fn set_masquerade(on: bool, subnet: Ipv4Net, cidr: Ipv4Net) -> Result<()> {
    use std::io::Write;
    let table = cairn_contracts::network::NFT_TABLE;
    let script = if on {
        format!(
            "table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {subnet} ip daddr != {cidr} masquerade\n  }}\n}}\n"
        )
    } else {
        format!("table ip {table} {{}}\ndelete table ip {table}\n")
    };
    let mut child = match std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        // Nothing to remove where there is no nftables tool.
        Err(e) if !on && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).context("running nft for masquerade-egress (is nftables installed?)")
        }
    };
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .context("writing the nft script")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft refused the cairn table: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// cairn's routes in the kernel now.
pub fn installed_routes() -> Result<Vec<InstalledRoute>> {
    netlink(|h| async move {
        let mut names = BTreeMap::new();
        let mut links = h.link().get().execute();
        while let Some(l) = links.try_next().await? {
            for a in l.attributes {
                if let LinkAttribute::IfName(n) = a {
                    names.insert(l.header.index, n);
                }
            }
        }
        let mut out = Vec::new();
        let mut dump = h
            .route()
            .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = dump.try_next().await? {
            if !ours(&r) {
                continue;
            }
            let mut gateway = None;
            let mut device = String::new();
            for a in &r.attributes {
                match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
                    RouteAttribute::Oif(i) => device = names.get(i).cloned().unwrap_or_default(),
                    _ => {}
                }
            }
            out.push(InstalledRoute {
                destination: destination(&r).map(|d| d.to_string()).unwrap_or_default(),
                gateway,
                device,
            });
        }
        Ok(out)
    })
}

/// A MAC as `aa:bb:cc:dd:ee:ff`, and back.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("{text:?} is not a MAC address");
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            bail!("{text:?} is not a MAC address");
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| anyhow!("{text:?} is not a MAC address"))?;
    }
    // A multicast or all-zero MAC would flood or drop: a hostile record.
    if mac[0] & 1 == 1 || mac == [0; 6] {
        bail!("{text:?} is not a unicast MAC address");
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip_and_refuse_multicast() {
        let m = parse_mac("02:42:ac:11:00:02").unwrap();
        assert_eq!(format_mac(&m), "02:42:ac:11:00:02");
        assert!(parse_mac("ff:ff:ff:ff:ff:ff").is_err());
        assert!(parse_mac("00:00:00:00:00:00").is_err());
        assert!(parse_mac("02:42:ac:11:00").is_err());
        assert!(parse_mac("02:42:ac:11:00:0g").is_err());
        let v = vtep_mac("0123456789abcdef0123456789abcdef");
        assert_eq!(v[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(parse_mac(&format_mac(&v)).unwrap(), v);
        assert_ne!(v, vtep_mac("fedcba9876543210fedcba9876543210"));
    }
}
