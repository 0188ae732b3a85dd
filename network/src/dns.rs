//! The fleet's DNS responder: answers the `cairn.` zone from a local copy
//! of the service registrations in etcd ([`Directory`]) and forwards every
//! other name to the node's own upstream resolvers.
//!
//! - `NAME.service.cairn` A: every serving instance of NAME; SRV: one per
//!   instance that publishes a port for NAME, its target's A record in the
//!   additional section.
//! - `CONTAINER.NODE.cairn` A: that container's address (NODE is the
//!   hostname of the node it runs on).
//!
//! Answers live for [`TTL`] second: instances come and go with their health
//! checks. A query never waits for etcd: the directory is a local copy
//! behind a lock, rebuilt by whoever follows the watch. Everything read from
//! the network is bounded, and nothing read from it can make this panic.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_contracts::services::{parse_etcd_key, parse_instance, Instance, DNS_ZONE};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// The time to live of every answer, and of a negative one (the SOA's
/// minimum): an instance that stops serving is gone from caches at once.
pub const TTL: u32 = 1;
/// The largest UDP query read (and the payload size advertised over EDNS).
pub const UDP_BUFFER: usize = 4096;
/// How long one upstream has to answer a forwarded query.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Open TCP connections served at once; more are closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// How long a TCP client may take to send a whole query.
pub const TCP_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// UDP queries being forwarded at once; more get SERVFAIL at once.
pub const MAX_FORWARDS: usize = 64;
/// The most upstreams [`system_upstreams`] returns (as the resolver does).
pub const MAX_UPSTREAMS: usize = 3;
/// systemd-resolved's list of its real upstreams.
pub const RESOLVED_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// systemd-resolved's stub listeners: never upstreams of ours.
pub const RESOLVED_STUBS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(127, 0, 0, 53), Ipv4Addr::new(127, 0, 0, 54)];

/// How often the server's threads look at their stop flag.
const TICK: Duration = Duration::from_millis(200);
/// Records a query may carry besides its question (an EDNS OPT, a cookie,
/// a TSIG…): anything more is not a query we answer.
const MAX_QUERY_RECORDS: u32 = 8;
/// The UDP payload every client can take.
const MIN_UDP_PAYLOAD: usize = 512;
const MAX_TCP_MESSAGE: usize = u16::MAX as usize;
const MAX_RESOLV_CONF: u64 = 64 * 1024;
/// The label under the zone that holds services.
const SERVICE_LABEL: &str = "service";

const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NOTIMP: u8 = 4;

/// The names of the zone, built from the etcd mirror of
/// [`cairn_contracts::services::ETCD_SERVICES_PREFIX`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    /// Owner names relative to the zone, lowercase (`web.service`,
    /// `web-1.node-b`).
    names: BTreeMap<String, Owner>,
    /// Names that only exist because names below them do (`service`,
    /// `node-b`): they answer NODATA, never NXDOMAIN, or a resolver that
    /// trusts NXDOMAIN for a whole subtree (RFC 8020) would lose the names
    /// below.
    parents: BTreeSet<String>,
    /// Entries left out: a key or value that does not parse, or a value
    /// that disagrees with its key.
    pub skipped: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Owner {
    a: BTreeSet<Ipv4Addr>,
    /// (port, target relative to the zone)
    srv: BTreeSet<(u16, String)>,
}

impl Directory {
    /// Builds the zone from etcd's `<prefix><service>/<node id>/<container>`
    /// → [`Instance`] entries. A container on a node whose hostname is
    /// `service` is reachable by its services only: `CONTAINER.service.cairn`
    /// is a service's name.
    pub fn from_entries(entries: &BTreeMap<String, Vec<u8>>) -> Directory {
        let mut d = Directory::default();
        for (key, value) in entries {
            let Some((service, i)) = instance_of(key, value) else {
                d.skipped += 1;
                continue;
            };
            let host = (!i.node.is_empty() && i.node != SERVICE_LABEL)
                .then(|| format!("{}.{}", i.container, i.node));
            let port = i
                .services
                .iter()
                .find(|s| s.name == service)
                .and_then(|s| s.port);
            let owner = d
                .names
                .entry(format!("{service}.{SERVICE_LABEL}"))
                .or_default();
            owner.a.insert(i.address);
            if let (Some(port), Some(host)) = (port, &host) {
                owner.srv.insert((port, host.clone()));
            }
            if let Some(host) = host {
                d.names.entry(host).or_default().a.insert(i.address);
            }
        }
        for name in d.names.keys() {
            let mut rest = name.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                d.parents.insert(parent.to_string());
                rest = parent;
            }
        }
        d
    }

    /// How many names the zone holds (besides its apex and parents).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The service a key names and its instance, if the two agree.
fn instance_of(key: &str, value: &[u8]) -> Option<(String, Instance)> {
    let (service, node_id, container) = parse_etcd_key(key)?;
    let i = parse_instance(value).ok()?;
    let agrees = i.container == container
        && i.services.iter().any(|s| s.name == service)
        && (i.node_id.is_empty() || i.node_id == node_id);
    agrees.then(|| (service.to_string(), i))
}

/// What a received message calls for.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: forward the query as it is; `servfail` if no upstream
    /// answers.
    Forward { servfail: Vec<u8> },
    /// Not a query: say nothing.
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// Answers one DNS query message received over UDP (the answer fits the
/// client's UDP payload size, truncated otherwise): `Some(response)` for a
/// name in the zone, an error response for a malformed query whose header
/// parses, `None` for a name outside the zone (to be forwarded) and for
/// anything that is not a query.
pub fn answer(query: &[u8], directory: &Directory) -> Option<Vec<u8>> {
    match respond(query, directory, Transport::Udp) {
        Outcome::Reply(r) => Some(r),
        Outcome::Forward { .. } | Outcome::Ignore => None,
    }
}

fn respond(query: &[u8], directory: &Directory, transport: Transport) -> Outcome {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        // No header, or a response: answering could start a loop.
        return Outcome::Ignore;
    }
    let opcode = (query[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Outcome::Reply(raw_error(query, RCODE_NOTIMP));
    }
    let count = |at: usize| u32::from(u16::from_be_bytes([query[at], query[at + 1]]));
    if count(4) != 1 || count(6) + count(8) + count(10) > MAX_QUERY_RECORDS {
        return Outcome::Reply(raw_error(query, RCODE_FORMERR));
    }
    let Ok(msg) = Message::from_vec(query) else {
        return Outcome::Reply(raw_error(query, RCODE_FORMERR));
    };
    let Some(q) = msg.queries().first() else {
        return Outcome::Reply(raw_error(query, RCODE_FORMERR));
    };
    let Some(relative) = in_zone(q.name()) else {
        let mut r = response_to(&msg);
        r.set_response_code(ResponseCode::ServFail);
        let servfail = r
            .to_vec()
            .unwrap_or_else(|_| raw_error(query, RCODE_SERVFAIL));
        return Outcome::Forward { servfail };
    };
    let mut r = response_to(&msg);
    r.set_authoritative(true);
    if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
        r.set_authoritative(false)
            .set_response_code(ResponseCode::Refused);
    } else {
        fill(
            &mut r,
            q.name(),
            q.query_type(),
            relative.as_deref(),
            directory,
        );
    }
    let limit = match transport {
        Transport::Tcp => MAX_TCP_MESSAGE,
        Transport::Udp => msg.extensions().as_ref().map_or(MIN_UDP_PAYLOAD, |e| {
            usize::from(e.max_payload()).clamp(MIN_UDP_PAYLOAD, UDP_BUFFER)
        }),
    };
    Outcome::Reply(encode_within(r, limit).unwrap_or_else(|| raw_error(query, RCODE_SERVFAIL)))
}

/// A response to `msg` carrying its question (and an OPT if it had one).
fn response_to(msg: &Message) -> Message {
    let mut r = Message::new();
    r.set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(msg.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(msg.checking_disabled());
    r.add_queries(msg.queries().iter().cloned());
    if msg.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_BUFFER as u16).set_version(0);
        r.set_edns(edns);
    }
    r
}

/// Where `name` is in the zone: `None` outside it, `Some(None)` for a name
/// inside that no cairn name can be (a label of other bytes),
/// `Some(Some(relative))` otherwise (lowercase, `""` for the apex).
fn in_zone(name: &Name) -> Option<Option<String>> {
    let labels: Vec<&[u8]> = name.iter().collect();
    let (last, below) = labels.split_last()?;
    if !last.eq_ignore_ascii_case(DNS_ZONE.as_bytes()) {
        return None;
    }
    let mut relative = String::new();
    for label in below {
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        {
            return Some(None);
        }
        if !relative.is_empty() {
            relative.push('.');
        }
        relative.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
    }
    Some(Some(relative))
}

/// Puts the zone's answer for (`name`, `qtype`) into `r`.
fn fill(r: &mut Message, name: &Name, qtype: RecordType, relative: Option<&str>, d: &Directory) {
    let any = qtype == RecordType::ANY;
    let exists = match relative {
        Some("") => {
            if any || qtype == RecordType::SOA {
                r.add_answer(soa());
            }
            true
        }
        Some(rel) => match d.names.get(rel) {
            Some(owner) => {
                if any || qtype == RecordType::A {
                    for addr in &owner.a {
                        r.add_answer(Record::from_rdata(name.clone(), TTL, RData::A(A(*addr))));
                    }
                }
                if any || qtype == RecordType::SRV {
                    add_srv(r, name, owner, d);
                }
                true
            }
            None => d.parents.contains(rel),
        },
        None => false,
    };
    if !exists {
        r.set_response_code(ResponseCode::NXDomain);
    }
    if r.answers().is_empty() {
        // NXDOMAIN or NODATA: the SOA says how long to remember it.
        r.add_name_server(soa());
    }
}

fn add_srv(r: &mut Message, name: &Name, owner: &Owner, d: &Directory) {
    for (port, target) in &owner.srv {
        let Ok(target_name) = Name::from_ascii(format!("{target}.{DNS_ZONE}.")) else {
            continue;
        };
        r.add_answer(Record::from_rdata(
            name.clone(),
            TTL,
            RData::SRV(SRV::new(0, 0, *port, target_name.clone())),
        ));
        for addr in d.names.get(target).map(|o| &o.a).into_iter().flatten() {
            r.add_additional(Record::from_rdata(
                target_name.clone(),
                TTL,
                RData::A(A(*addr)),
            ));
        }
    }
}

fn zone_name(prefix: &str) -> Name {
    Name::from_ascii(format!("{prefix}{DNS_ZONE}.")).unwrap_or_else(|_| Name::root())
}

fn soa() -> Record {
    let apex = zone_name("");
    let soa = SOA::new(apex.clone(), zone_name("hostmaster."), 1, 60, 60, 60, TTL);
    Record::from_rdata(apex, TTL, RData::SOA(soa))
}

/// Encodes `r` in at most `limit` bytes: the additional section goes
/// first, then answers, with the TC bit set (the client asks again over
/// TCP).
fn encode_within(mut r: Message, limit: usize) -> Option<Vec<u8>> {
    let mut bytes = r.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    r.take_additionals();
    bytes = r.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    r.set_truncated(true);
    r.take_name_servers();
    while bytes.len() > limit && !r.answers().is_empty() {
        let n = r.answers().len();
        let keep = (n * limit / bytes.len()).min(n - 1);
        r.answers_mut().truncate(keep);
        bytes = r.to_vec().ok()?;
    }
    (bytes.len() <= limit).then_some(bytes)
}

/// An error response made of the query's header alone: id, opcode and RD
/// kept, no sections.
fn raw_error(query: &[u8], rcode: u8) -> Vec<u8> {
    let mut r = vec![0u8; 12];
    r[0] = query.first().copied().unwrap_or(0);
    r[1] = query.get(1).copied().unwrap_or(0);
    r[2] = 0x80 | (query.get(2).copied().unwrap_or(0) & 0x79);
    r[3] = 0x80 | (rcode & 0x0f);
    r
}

/// A running responder; dropping it stops its threads and closes its
/// sockets.
pub struct Server {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    directory: Arc<RwLock<Directory>>,
    upstreams: Vec<SocketAddr>,
    tcp_connections: Arc<AtomicUsize>,
    forwards: Arc<AtomicUsize>,
}

impl Shared {
    fn respond(&self, query: &[u8], transport: Transport) -> Outcome {
        // A writer that panicked left a whole directory behind: use it.
        let d = self.directory.read().unwrap_or_else(|e| e.into_inner());
        respond(query, &d, transport)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Binds UDP and TCP on `bind` (with port 0, TCP takes the port UDP got)
/// and serves until the [`Server`] is dropped. Names outside the zone go to
/// `upstreams`, in order.
pub fn start(
    bind: SocketAddr,
    directory: Arc<RwLock<Directory>>,
    upstreams: Vec<SocketAddr>,
) -> Result<Server> {
    let (udp, tcp) = bind_udp_and_tcp(bind)?;
    let udp_addr = udp.local_addr()?;
    let tcp_addr = tcp.local_addr()?;
    udp.set_read_timeout(Some(TICK))?;
    tcp.set_nonblocking(true)?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        directory,
        upstreams,
        tcp_connections: Arc::new(AtomicUsize::new(0)),
        forwards: Arc::new(AtomicUsize::new(0)),
    });
    let mut server = Server {
        udp_addr,
        tcp_addr,
        shared: shared.clone(),
        threads: Vec::new(),
    };
    let s = shared.clone();
    server.threads.push(
        thread::Builder::new()
            .name("dns-udp".into())
            .spawn(move || serve_udp(udp, s))
            .context("starting the DNS UDP thread")?,
    );
    server.threads.push(
        thread::Builder::new()
            .name("dns-tcp".into())
            .spawn(move || serve_tcp(tcp, shared))
            .context("starting the DNS TCP thread")?,
    );
    tracing::debug!(%udp_addr, %tcp_addr, "DNS responder listening");
    Ok(server)
}

/// A UDP socket and a TCP listener on one address (DNS answers on both).
/// With port 0, the port UDP drew may be taken for TCP: it draws again.
pub fn bind_udp_and_tcp(bind: SocketAddr) -> Result<(UdpSocket, TcpListener)> {
    let mut tries = 0;
    loop {
        let udp = UdpSocket::bind(bind).with_context(|| format!("binding DNS on udp {bind}"))?;
        let addr = udp.local_addr()?;
        match TcpListener::bind(addr) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(_) if bind.port() == 0 && tries < 16 => tries += 1,
            Err(e) => return Err(e).with_context(|| format!("binding DNS on tcp {addr}")),
        }
    }
}

impl Server {
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Connections and forwards see the flag within a tick; a client
        // that does not read its answer holds one no longer than this.
        let deadline = Instant::now() + Duration::from_secs(1);
        while (self.shared.tcp_connections.load(Ordering::Relaxed) > 0
            || self.shared.forwards.load(Ordering::Relaxed) > 0)
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One of a bounded number of places, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(counter.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn transient(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

fn serve_udp(sock: UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; UDP_BUFFER];
    while !shared.stopped() {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if transient(e.kind()) => continue,
            Err(e) => {
                tracing::debug!("DNS udp receive: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let query = &buf[..n];
        let servfail = match shared.respond(query, Transport::Udp) {
            Outcome::Reply(r) => {
                let _ = sock.send_to(&r, peer);
                continue;
            }
            Outcome::Ignore => continue,
            Outcome::Forward { servfail } => servfail,
        };
        // No upstream, or too many queries on their way to one: SERVFAIL now.
        let slot = if shared.upstreams.is_empty() {
            None
        } else {
            Slot::take(&shared.forwards, MAX_FORWARDS)
        };
        let (Some(slot), Ok(reply_sock)) = (slot, sock.try_clone()) else {
            let _ = sock.send_to(&servfail, peer);
            continue;
        };
        let query = query.to_vec();
        let s = shared.clone();
        let spawned = thread::Builder::new()
            .name("dns-forward".into())
            .spawn(move || {
                let _slot = slot;
                let reply = forward_udp(&query, &s).unwrap_or(servfail);
                if !s.stopped() {
                    let _ = reply_sock.send_to(&reply, peer);
                }
            });
        if let Err(e) = spawned {
            tracing::debug!("DNS forward thread: {e}");
        }
    }
}

/// A query id of our own for a forwarded query, so a reply has to be
/// guessed, not just aimed.
fn random_id() -> [u8; 2] {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() as u16).to_be_bytes()
}

/// The first upstream's answer to `query` (over UDP), with the client's id.
fn forward_udp(query: &[u8], shared: &Shared) -> Option<Vec<u8>> {
    let id = random_id();
    let mut ours = query.to_vec();
    ours[..2].copy_from_slice(&id);
    let mut buf = vec![0u8; MAX_TCP_MESSAGE];
    for up in &shared.upstreams {
        let local: SocketAddr = match up {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let Ok(sock) = UdpSocket::bind(local) else {
            continue;
        };
        if sock.connect(up).is_err()
            || sock.set_read_timeout(Some(TICK)).is_err()
            || sock.send(&ours).is_err()
        {
            continue;
        }
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        while !shared.stopped() && Instant::now() < deadline {
            match sock.recv(&mut buf) {
                Ok(n) if n >= 12 && buf[..2] == id && buf[2] & 0x80 != 0 => {
                    let mut reply = buf[..n].to_vec();
                    reply[..2].copy_from_slice(&query[..2]);
                    return Some(reply);
                }
                Ok(_) => {}
                Err(e) if transient(e.kind()) => {}
                // Refused: nothing listens there.
                Err(_) => break,
            }
        }
        if shared.stopped() {
            return None;
        }
        tracing::debug!(upstream = %up, "DNS upstream did not answer");
    }
    None
}

fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                // At the limit the connection is closed unanswered.
                let Some(slot) = Slot::take(&shared.tcp_connections, MAX_TCP_CONNECTIONS) else {
                    continue;
                };
                let s = shared.clone();
                let spawned = thread::Builder::new()
                    .name("dns-tcp-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        serve_connection(stream, &s);
                    });
                if let Err(e) = spawned {
                    tracing::debug!("DNS tcp connection thread: {e}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut fds = [nix::poll::PollFd::new(
                    listener.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, TICK.as_millis() as u16);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors, most likely: let some close first.
                tracing::debug!("DNS tcp accept: {e}");
                thread::sleep(TICK);
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes by `deadline`; false on end of stream,
/// error, timeout or stop.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant, shared: &Shared) -> bool {
    let mut got = 0;
    while got < buf.len() {
        if shared.stopped() || Instant::now() >= deadline {
            return false;
        }
        match stream.read(&mut buf[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(e) if transient(e.kind()) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads one length-prefixed message by `deadline`.
fn read_message(stream: &mut TcpStream, deadline: Instant, shared: &Shared) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    if !read_full(stream, &mut len, deadline, shared) {
        return None;
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    read_full(stream, &mut msg, deadline, shared).then_some(msg)
}

fn write_message(stream: &mut TcpStream, msg: &[u8]) -> bool {
    let Ok(len) = u16::try_from(msg.len()) else {
        return false;
    };
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed).is_ok()
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(TICK)))
        .and_then(|_| stream.set_write_timeout(Some(TCP_READ_TIMEOUT)))
        .and_then(|_| stream.set_nodelay(true));
    if setup.is_err() {
        return;
    }
    loop {
        let Some(query) = read_message(&mut stream, Instant::now() + TCP_READ_TIMEOUT, shared)
        else {
            return;
        };
        let reply = match shared.respond(&query, Transport::Tcp) {
            Outcome::Reply(r) => r,
            Outcome::Ignore => return,
            Outcome::Forward { servfail } => forward_tcp(&query, shared).unwrap_or(servfail),
        };
        if shared.stopped() || !write_message(&mut stream, &reply) {
            return;
        }
    }
}

/// The first upstream's answer to `query` (over TCP), with the client's id.
fn forward_tcp(query: &[u8], shared: &Shared) -> Option<Vec<u8>> {
    let id = random_id();
    let mut ours = query.to_vec();
    ours[..2].copy_from_slice(&id);
    for up in &shared.upstreams {
        if shared.stopped() {
            return None;
        }
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        let Ok(mut s) = TcpStream::connect_timeout(up, FORWARD_TIMEOUT) else {
            continue;
        };
        let ready = s
            .set_read_timeout(Some(TICK))
            .and_then(|_| s.set_write_timeout(Some(FORWARD_TIMEOUT)))
            .and_then(|_| s.set_nodelay(true));
        if ready.is_err() || !write_message(&mut s, &ours) {
            continue;
        }
        match read_message(&mut s, deadline, shared) {
            Some(mut reply) if reply.len() >= 12 && reply[..2] == id && reply[2] & 0x80 != 0 => {
                reply[..2].copy_from_slice(&query[..2]);
                return Some(reply);
            }
            _ => tracing::debug!(upstream = %up, "DNS upstream did not answer over tcp"),
        }
    }
    None
}

/// The node's upstream resolvers: systemd-resolved's real ones when it
/// runs, else `/etc/resolv.conf`'s, less `exclude` (the responder's own
/// addresses: it must never forward to itself).
pub fn system_upstreams(exclude: &[IpAddr]) -> Vec<SocketAddr> {
    let path = if std::path::Path::new(RESOLVED_RESOLV_CONF).exists() {
        RESOLVED_RESOLV_CONF
    } else {
        RESOLV_CONF
    };
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(f) => {
            if let Err(e) = f.take(MAX_RESOLV_CONF).read_to_string(&mut text) {
                tracing::warn!("reading {path}: {e}");
            }
        }
        Err(e) => tracing::warn!("reading {path}: {e}"),
    }
    parse_resolv_conf(&text, exclude)
}

/// The `nameserver` lines of a resolv.conf, on port 53: at most
/// [`MAX_UPSTREAMS`], without duplicates, systemd-resolved's stubs, the
/// unspecified address, link-local ones with a zone, or `exclude`.
pub fn parse_resolv_conf(text: &str, exclude: &[IpAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let stub = matches!(ip, IpAddr::V4(v4) if RESOLVED_STUBS.contains(&v4));
        let addr = SocketAddr::new(ip, 53);
        if stub || ip.is_unspecified() || exclude.contains(&ip) || out.contains(&addr) {
            continue;
        }
        out.push(addr);
        if out.len() == MAX_UPSTREAMS {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_contracts::services::ServicePort;
    use hickory_proto::op::Query;

    fn instance(container: &str, node: &str, addr: &str, services: &[&str]) -> Instance {
        Instance {
            container: container.into(),
            address: addr.parse().unwrap(),
            services: services
                .iter()
                .map(|s| s.parse::<ServicePort>().unwrap())
                .collect(),
            monitor_pid: 1,
            monitor_start: 1,
            node: node.into(),
            node_id: format!("id-{node}"),
        }
    }

    fn put(entries: &mut BTreeMap<String, Vec<u8>>, i: &Instance) {
        for s in &i.services {
            entries.insert(i.etcd_key(&s.name), serde_json::to_vec(i).unwrap());
        }
    }

    fn directory() -> Directory {
        let mut e = BTreeMap::new();
        put(
            &mut e,
            &instance("web-1", "node-a", "10.88.1.20", &["web:8080", "admin"]),
        );
        put(
            &mut e,
            &instance("web-2", "node-b", "10.88.2.20", &["web:8080"]),
        );
        put(&mut e, &instance("web-3", "node-b", "10.88.2.21", &["web"]));
        Directory::from_entries(&e)
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(4242).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn ask(name: &str, qtype: RecordType, d: &Directory) -> Message {
        let r = answer(&query(name, qtype), d).expect("an answer");
        Message::from_vec(&r).unwrap()
    }

    fn addrs(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(format!("{} {}", r.name(), a.0)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_directory_holds_services_and_containers() {
        let d = directory();
        assert_eq!(d.skipped, 0);
        let names: Vec<&str> = d.names.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "admin.service",
                "web-1.node-a",
                "web-2.node-b",
                "web-3.node-b",
                "web.service"
            ]
        );
        let web = &d.names["web.service"];
        assert_eq!(web.a.len(), 3);
        assert_eq!(
            web.srv.iter().cloned().collect::<Vec<_>>(),
            [
                (8080, "web-1.node-a".to_string()),
                (8080, "web-2.node-b".to_string())
            ]
        );
        assert!(d.parents.contains("service") && d.parents.contains("node-b"));
    }

    #[test]
    fn hostile_entries_are_skipped_and_counted() {
        let mut e = BTreeMap::new();
        let good = instance("web-1", "node-a", "10.88.1.20", &["web:8080"]);
        put(&mut e, &good);
        let json = serde_json::to_vec(&good).unwrap();
        // keys that do not parse
        e.insert("/cairn/services/web/id".into(), json.clone());
        e.insert("/cairn/services/web/id/web-1/x".into(), json.clone());
        e.insert("/elsewhere/web/id/web-1".into(), json.clone());
        // values that do not parse or validate
        e.insert("/cairn/services/web/id/web-9".into(), b"{not json".to_vec());
        e.insert("/cairn/services/web/id/big".into(), vec![b' '; 20_000]);
        let mut evil = good.clone();
        evil.container = "Web.1".into();
        e.insert(
            "/cairn/services/web/id/Web.1".into(),
            serde_json::to_vec(&evil).unwrap(),
        );
        let mut evil = good.clone();
        evil.node = "node.a".into();
        e.insert(
            "/cairn/services/web/id-node-a/x1".into(),
            serde_json::to_vec(&evil).unwrap(),
        );
        // keys that disagree with their value
        e.insert("/cairn/services/db/id-node-a/web-1".into(), json.clone());
        e.insert("/cairn/services/web/id-node-a/web-2".into(), json.clone());
        e.insert("/cairn/services/web/other-id/web-1".into(), json.clone());
        let d = Directory::from_entries(&e);
        assert_eq!(d.skipped, 10);
        assert_eq!(d.len(), 2);
        assert!(d.names.contains_key("web.service") && d.names.contains_key("web-1.node-a"));
    }

    #[test]
    fn a_service_answers_every_instance_sorted() {
        let r = ask("web.service.cairn.", RecordType::A, &directory());
        assert_eq!(r.id(), 4242);
        assert_eq!(r.message_type(), MessageType::Response);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.authoritative());
        assert!(r.recursion_desired());
        assert_eq!(
            addrs(r.answers()),
            [
                "web.service.cairn. 10.88.1.20",
                "web.service.cairn. 10.88.2.20",
                "web.service.cairn. 10.88.2.21"
            ]
        );
        assert!(r.answers().iter().all(|a| a.ttl() == TTL));
        assert_eq!(r.queries().len(), 1);
    }

    #[test]
    fn srv_names_each_instance_with_a_port_and_adds_its_address() {
        let r = ask("_x.web.service.cairn.", RecordType::SRV, &directory());
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        let r = ask("web.service.cairn", RecordType::SRV, &directory());
        let srv: Vec<String> = r
            .answers()
            .iter()
            .map(|a| match a.data() {
                RData::SRV(s) => format!(
                    "{} {} {} {}",
                    s.priority(),
                    s.weight(),
                    s.port(),
                    s.target()
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            srv,
            [
                "0 0 8080 web-1.node-a.cairn.",
                "0 0 8080 web-2.node-b.cairn."
            ]
        );
        assert_eq!(
            addrs(r.additionals()),
            [
                "web-1.node-a.cairn. 10.88.1.20",
                "web-2.node-b.cairn. 10.88.2.20"
            ]
        );
        // A service without ports: the name exists, no SRV.
        let r = ask("admin.service.cairn", RecordType::SRV, &directory());
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.answers().is_empty());
    }

    #[test]
    fn a_container_answers_its_address() {
        let r = ask("web-3.node-b.cairn.", RecordType::A, &directory());
        assert_eq!(addrs(r.answers()), ["web-3.node-b.cairn. 10.88.2.21"]);
        assert!(r.authoritative());
    }

    #[test]
    fn names_are_case_insensitive_and_echo_the_question() {
        let r = ask("WeB.SerVICE.Cairn.", RecordType::A, &directory());
        assert_eq!(r.answers().len(), 3);
        assert_eq!(r.answers()[0].name().to_ascii(), "WeB.SerVICE.Cairn.");
        let r = ask("WEB-1.NODE-A.CAIRN", RecordType::A, &directory());
        assert_eq!(r.answers().len(), 1);
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_types_nodata() {
        let d = directory();
        for name in [
            "db.service.cairn.",
            "web-9.node-a.cairn.",
            "x.web.service.cairn.",
            "a.b.c.cairn.",
            "we_b.service.cairn.",
        ] {
            let r = ask(name, RecordType::A, &d);
            assert_eq!(r.response_code(), ResponseCode::NXDomain, "{name}");
            assert!(r.authoritative() && r.answers().is_empty(), "{name}");
            assert_eq!(r.name_servers().len(), 1, "{name}: the SOA");
            assert_eq!(r.name_servers()[0].ttl(), TTL);
        }
        for (name, qtype) in [
            ("web.service.cairn.", RecordType::AAAA),
            ("web-1.node-a.cairn.", RecordType::TXT),
            ("service.cairn.", RecordType::A),
            ("node-b.cairn.", RecordType::A),
            ("cairn.", RecordType::A),
        ] {
            let r = ask(name, qtype, &d);
            assert_eq!(r.response_code(), ResponseCode::NoError, "{name}");
            assert!(r.authoritative() && r.answers().is_empty(), "{name}");
        }
        let r = ask("cairn.", RecordType::SOA, &d);
        assert_eq!(r.answers().len(), 1);
        // An empty directory still owns the zone.
        let r = ask("web.service.cairn.", RecordType::A, &Directory::default());
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn names_outside_the_zone_are_not_answered() {
        let d = directory();
        for name in [
            "example.com.",
            "cairn.example.",
            "web.service.cairn.example.",
            ".",
        ] {
            assert_eq!(answer(&query(name, RecordType::A), &d), None, "{name}");
        }
        let out = respond(&query("example.com.", RecordType::A), &d, Transport::Udp);
        let Outcome::Forward { servfail } = out else {
            panic!("{out:?}")
        };
        let m = Message::from_vec(&servfail).unwrap();
        assert_eq!((m.id(), m.response_code()), (4242, ResponseCode::ServFail));
        assert_eq!(m.queries().len(), 1);
    }

    #[test]
    fn two_questions_are_formerr() {
        let mut m = Message::new();
        m.set_id(7);
        m.add_query(Query::query(
            Name::from_ascii("web.service.cairn.").unwrap(),
            RecordType::A,
        ));
        m.add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        let r = Message::from_vec(&answer(&m.to_vec().unwrap(), &directory()).unwrap()).unwrap();
        assert_eq!((r.id(), r.response_code()), (7, ResponseCode::FormErr));
        assert!(r.answers().is_empty());
        // and no question at all
        let mut q = query("web.service.cairn.", RecordType::A);
        q[5] = 0;
        let r = Message::from_vec(&answer(&q, &directory()).unwrap()).unwrap();
        assert_eq!(r.response_code(), ResponseCode::FormErr);
    }

    #[test]
    fn garbage_gets_formerr_or_nothing_and_never_a_panic() {
        let d = directory();
        for bad in [&b""[..], b"\x00", b"\x12\x34\x01\x00\x00\x01"] {
            assert_eq!(answer(bad, &d), None);
        }
        // A response is never answered.
        let mut resp = query("web.service.cairn.", RecordType::A);
        resp[2] |= 0x80;
        assert_eq!(answer(&resp, &d), None);
        // A header with a question that is cut short: FORMERR.
        let q = query("web.service.cairn.", RecordType::A);
        for cut in 12..q.len() {
            let r = Message::from_vec(&answer(&q[..cut], &d).unwrap()).unwrap();
            assert_eq!(
                (r.id(), r.response_code()),
                (4242, ResponseCode::FormErr),
                "{cut}"
            );
        }
        // Counts that promise the earth.
        let mut big = q.clone();
        big[6..12].copy_from_slice(&[0xff; 6]);
        let r = Message::from_vec(&answer(&big, &d).unwrap()).unwrap();
        assert_eq!(r.response_code(), ResponseCode::FormErr);
        // A compression loop in the name.
        let mut looped = q[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        let r = Message::from_vec(&answer(&looped, &d).unwrap()).unwrap();
        assert_eq!(r.response_code(), ResponseCode::FormErr);
        // Another opcode.
        let mut notify = q.clone();
        notify[2] = 4 << 3;
        let r = Message::from_vec(&answer(&notify, &d).unwrap()).unwrap();
        assert_eq!(r.response_code(), ResponseCode::NotImp);
        // Pseudo-random bytes: whatever they are, no panic.
        let mut x: u32 = 0x1234_5678;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = answer(&bytes, &d);
            let mut framed = q[..12].to_vec();
            framed[2] = 1;
            framed.extend_from_slice(&bytes);
            let _ = answer(&framed, &d);
        }
    }

    #[test]
    fn big_answers_fit_the_clients_payload() {
        let mut e = BTreeMap::new();
        for n in 0..300u32 {
            let i = instance(
                &format!("web-{n}"),
                &format!("node-{}", n % 7),
                &format!("10.88.{}.{}", n / 200, n % 200 + 2),
                &["web:8080"],
            );
            put(&mut e, &i);
        }
        let d = Directory::from_entries(&e);
        let bytes = answer(&query("web.service.cairn.", RecordType::SRV), &d).unwrap();
        assert!(bytes.len() <= MIN_UDP_PAYLOAD);
        let r = Message::from_vec(&bytes).unwrap();
        assert!(r.truncated());
        // EDNS raises the limit; TCP takes them all.
        let mut m = Message::from_vec(&query("web.service.cairn.", RecordType::A)).unwrap();
        m.set_edns(Edns::new().set_max_payload(4096).clone());
        let bytes = answer(&m.to_vec().unwrap(), &d).unwrap();
        assert!(bytes.len() <= UDP_BUFFER);
        let r = Message::from_vec(&bytes).unwrap();
        assert!(r.answers().len() > 200 && r.extensions().is_some());
        let Outcome::Reply(bytes) = respond(
            &query("web.service.cairn.", RecordType::SRV),
            &d,
            Transport::Tcp,
        ) else {
            panic!()
        };
        let r = Message::from_vec(&bytes).unwrap();
        assert_eq!((r.answers().len(), r.additionals().len()), (300, 300));
    }

    #[test]
    fn resolv_conf_gives_real_upstreams_only() {
        let text = "# written by resolved\n\
                    nameserver 127.0.0.53\n\
                    search example.internal\n\
                    ; nameserver 9.9.9.9\n\
                    nameserver 10.0.0.2 # comment\n\
                    nameserver   10.0.0.2\n\
                    nameserver 127.0.0.54\n\
                    nameserver 10.88.0.1\n\
                    nameserver fe80::1%eth0\n\
                    nameserver not-an-address\n\
                    nameserver 0.0.0.0\n\
                    nameserver 2001:db8::53\n\
                    nameserver 10.0.0.3\n\
                    nameserver 10.0.0.4\n";
        let exclude: [IpAddr; 1] = ["10.88.0.1".parse().unwrap()];
        let got: Vec<String> = parse_resolv_conf(text, &exclude)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.0.0.2:53", "[2001:db8::53]:53", "10.0.0.3:53"]);
        assert!(parse_resolv_conf("nameserver 127.0.0.53\n", &[]).is_empty());
        assert!(parse_resolv_conf("", &[]).is_empty());
    }
}
