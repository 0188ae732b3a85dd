//! The fleet network's etcd load at fleet scale, simulated on one machine:
//! N nodes with C serving containers each, through ONE etcd, with the real
//! client ([`cairn_etcd::Etcd`]), the real key layout and values and the
//! agent's own rhythm:
//!
//! - each node joins as the agent does: agrees on the fleet CIDR and leases
//!   a subnet with [`Leaser`] (a lease of the subnet grace, 5 min, renewed
//!   every 10 s);
//! - each node grants its registration lease (TTL 10 s, renewed every
//!   TTL/3, as `Registrar`) and puts one [`Instance`] per container under it;
//! - W nodes follow `/cairn/services/` with a watch, as the agent's DNS
//!   follower does; F of them keep a real [`Mirror`] (the others count and
//!   time events without keeping them, so memory stays bounded);
//! - then M single instances are put, one every `--interval-ms`, each
//!   timed from the put to every watcher's sight of it;
//! - last, the fleet idles (keepalives only) for `--idle` seconds.
//!
//! The watchers open their streams before the fleet registers (every put
//! goes to every watcher: N² × C deliveries, a fleet booting at once), or
//! with `--late-watchers` after it, from the current revision (a starting
//! agent reads a snapshot first; that read is timed separately, and fails
//! once the registry's answer is over the client's bound). A registration
//! lease that runs out is replaced and the node's instances put again, as
//! the agent does. Printed: join and registration times, put latencies,
//! watch deliveries and bytes, propagation percentiles (every watcher, and
//! the last one per probe), keepalive rate and latency per phase, etcd's
//! RSS and CPU (from /proc/PID with --etcd-pid) and some of its metrics.
//!
//! Figures only, nothing asserted; `scripts/sim-fleet-network` starts etcd
//! and runs this. Flags: --etcd URL --etcd-pid PID --nodes N --containers C
//! --watchers W --mirrors F --events M --interval-ms MS --idle SECS
//! --concurrency K --keepalive-threads K --late-watchers --no-subnets

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cairn_contracts::network::{FleetNetwork, Ipv4Net, SubnetRecord};
use cairn_contracts::services::{Instance, ServicePort, ETCD_SERVICES_PREFIX};
use cairn_etcd::{Etcd, Event, Mirror};
use cairn_network::dns::Directory;
use cairn_network::lease::Leaser;

/// The registration lease's TTL and renewal, as the agent's.
const REGISTRATION_TTL: i64 = 10;
/// The subnet grace of a default network.toml, and its renewal.
const SUBNET_GRACE: &str = "5m";
const SUBNET_RENEW: Duration = Duration::from_secs(10);
const WATCH_STACK: usize = 256 * 1024;

const USAGE: &str = "usage: sim-fleet [--etcd URL] [--etcd-pid PID] [--nodes N (1000)] [--containers C (50)]
    [--watchers W (all nodes)] [--mirrors F (2)] [--events M (200)] [--interval-ms MS (50)]
    [--idle SECS (10)] [--concurrency K (64)] [--keepalive-threads K (nodes/4, 8..250)] [--late-watchers] [--no-subnets]";

#[derive(Debug, Clone)]
struct Args {
    etcd: String,
    etcd_pid: Option<i32>,
    nodes: usize,
    containers: usize,
    watchers: usize,
    mirrors: usize,
    events: usize,
    interval: Duration,
    idle: Duration,
    concurrency: usize,
    keepalive_threads: usize,
    late_watchers: bool,
    subnets: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        etcd: "http://127.0.0.1:2379".into(),
        etcd_pid: None,
        nodes: 1000,
        containers: 50,
        watchers: usize::MAX,
        mirrors: 2,
        events: 200,
        interval: Duration::from_millis(50),
        idle: Duration::from_secs(10),
        concurrency: 64,
        keepalive_threads: 0,
        late_watchers: false,
        subnets: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        let num = |v: String| -> Result<u64> {
            v.parse()
                .map_err(|_| anyhow!("{flag} {v:?}: not a whole number"))
        };
        match flag.as_str() {
            "--etcd" => a.etcd = value()?,
            "--etcd-pid" => a.etcd_pid = Some(num(value()?)? as i32),
            "--nodes" => a.nodes = num(value()?)? as usize,
            "--containers" => a.containers = num(value()?)? as usize,
            "--watchers" => a.watchers = num(value()?)? as usize,
            "--mirrors" => a.mirrors = num(value()?)? as usize,
            "--events" => a.events = num(value()?)? as usize,
            "--interval-ms" => a.interval = Duration::from_millis(num(value()?)?),
            "--idle" => a.idle = Duration::from_secs(num(value()?)?),
            "--concurrency" => a.concurrency = num(value()?)?.max(1) as usize,
            "--keepalive-threads" => a.keepalive_threads = num(value()?)? as usize,
            "--late-watchers" => a.late_watchers = true,
            "--no-subnets" => a.subnets = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other:?} (see --help)"),
        }
    }
    if a.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    a.watchers = a.watchers.min(a.nodes);
    if a.keepalive_threads == 0 {
        // About four nodes a thread: a slow etcd delays a few renewals, not
        // the fleet's (each real node renews its own).
        a.keepalive_threads = (a.nodes / 4).clamp(8, 250);
    }
    a.mirrors = a.mirrors.min(a.watchers);
    Ok(a)
}

// ---------------------------------------------------------------- etcd's process

#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    rss_kib: u64,
    hwm_kib: u64,
    cpu_secs: f64,
    threads: u64,
}

fn proc_sample(pid: Option<i32>) -> Option<ProcSample> {
    let pid = pid?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ProcSample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_secs: ticks as f64 / hz,
        threads: field("Threads:"),
    })
}

/// Bytes this process's open connections to etcd have received (TCP's
/// own count, from `ss`): what the watch streams carried, to within the
/// small answers of puts and keepalives. 0 when `ss` cannot tell.
fn own_received(etcd: &str) -> u64 {
    let Some(port) = etcd
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
    else {
        return 0;
    };
    let Ok(out) = std::process::Command::new("ss")
        .args(["-tinpH", &format!("dport = :{port}")])
        .output()
    else {
        return 0;
    };
    let me = format!("pid={},", std::process::id());
    let (mut mine, mut total) = (false, 0u64);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.starts_with([' ', '\t']) {
            mine = line.contains(&me);
            continue;
        }
        if !mine {
            continue;
        }
        if let Some(v) = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("bytes_received:"))
            .and_then(|v| v.parse::<u64>().ok())
        {
            total += v;
        }
    }
    total
}

/// One HTTP/1.0 exchange with etcd, the body of the answer.
fn raw_http(base: &str, method: &str, path: &str, body: &str) -> Result<Vec<u8>> {
    let host = base
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{base}: only http:// here"))?
        .trim_end_matches('/');
    let mut s = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header in etcd's answer"))?;
    Ok(all.split_off(at + 4))
}

/// Prometheus counters and gauges of etcd's we print (summed over labels).
const METRICS: &[&str] = &[
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_debugging_mvcc_watch_stream_total",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvcc_slow_watcher_total",
    "etcd_debugging_mvcc_pending_events_total",
    "etcd_network_client_grpc_sent_bytes_total",
    "etcd_network_client_grpc_received_bytes_total",
    "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_lease_granted_total",
    "etcd_debugging_lease_renewed_total",
];

fn metrics(base: &str) -> BTreeMap<&'static str, f64> {
    let mut out = BTreeMap::new();
    let Ok(body) = raw_http(base, "GET", "/metrics", "") else {
        return out;
    };
    let text = String::from_utf8_lossy(&body);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        for m in METRICS {
            let Some(rest) = line.strip_prefix(m) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *out.entry(*m).or_insert(0.0) += v;
            }
        }
    }
    out
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn unb64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The keys and values of a `/v3/kv/range` answer.
fn parse_range(body: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            (
                String::from_utf8_lossy(&unb64(kv["key"].as_str().unwrap_or_default()))
                    .into_owned(),
                unb64(kv["value"].as_str().unwrap_or_default()),
            )
        })
        .collect()
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

// ---------------------------------------------------------------- figures

fn pct(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

fn dist(v: &mut [u64]) -> String {
    v.sort_unstable();
    if v.is_empty() {
        return "(none)".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  max {}  (n={})",
        ms(pct(v, 0.5)),
        ms(pct(v, 0.9)),
        ms(pct(v, 0.99)),
        ms(*v.last().unwrap_or(&0)),
        v.len()
    )
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// Runs `f(i)` for i in 0..n on `threads` threads, each with its own etcd
/// client (one connection each: ureq keeps one idle connection per host).
fn pool<T: Send + 'static>(
    url: &str,
    n: usize,
    threads: usize,
    f: impl Fn(&Etcd, usize) -> Result<T> + Send + Sync + 'static,
) -> Result<Vec<T>> {
    let next = Arc::new(AtomicUsize::new(0));
    let f = Arc::new(f);
    let out: Arc<Mutex<Vec<Option<T>>>> = Arc::new(Mutex::new((0..n).map(|_| None).collect()));
    let mut handles = Vec::new();
    for _ in 0..threads.min(n) {
        let (next, f, out) = (next.clone(), f.clone(), out.clone());
        let etcd = Etcd::new(&[url.to_string()])?;
        handles.push(
            std::thread::Builder::new()
                .stack_size(WATCH_STACK * 4)
                .spawn(move || -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        let v = f(&etcd, i)?;
                        out.lock().unwrap()[i] = Some(v);
                    }
                })?,
        );
    }
    for h in handles {
        h.join().map_err(|_| anyhow!("a worker panicked"))??;
    }
    let v = std::mem::take(&mut *out.lock().unwrap());
    Ok(v.into_iter().map(|x| x.expect("every index ran")).collect())
}

// ---------------------------------------------------------------- keepalives

/// Keepalive phases; the last closes the others and is not printed.
const PHASES: [&str; 6] = ["join", "watch", "register", "propagate", "idle", "end"];

#[derive(Default)]
struct PhaseKa {
    latency_us: Vec<u64>,
    late_max_us: u64,
    errors: u64,
    expired: u64,
    started: Option<Instant>,
    ended: Option<Instant>,
}

struct Keepalives {
    phase: AtomicUsize,
    phases: Mutex<Vec<PhaseKa>>,
    stop: AtomicBool,
}

impl Keepalives {
    fn set_phase(&self, p: usize) {
        let now = Instant::now();
        let mut ph = self.phases.lock().unwrap();
        let old = self.phase.swap(p, Ordering::SeqCst);
        ph[old].ended = Some(now);
        ph[p].started = Some(now);
    }
}

/// Where new leases go, one sender per thread, and the threads.
type KeepaliveThreads = (Vec<mpsc::Sender<Job>>, Vec<JoinHandle<()>>);

struct Job {
    lease: i64,
    period: Duration,
    node: usize,
    /// A registration lease: when it runs out, the node publishes its
    /// instances again under a new one, as the agent's Registrar does.
    registry: Option<Arc<Registry>>,
}

/// What registering a node takes, and what became of it.
struct Registry {
    subnets: Vec<Ipv4Net>,
    containers: usize,
    /// Each node's registration lease now.
    current: Vec<AtomicI64>,
    /// Whether the node's first registration is done (until then, the
    /// registering thread handles a lost lease itself).
    complete: Vec<AtomicBool>,
    /// Registrations started again because the lease ran out.
    redone: AtomicU64,
    /// Puts done, and puts retried after an error (etcd timing out).
    puts: AtomicU64,
    retried: AtomicU64,
    /// Nodes that gave up registering.
    failed: AtomicU64,
}

/// Grants node `i` a registration lease and puts its instances under it;
/// starts again under a new lease if etcd let the lease run out meanwhile.
/// The latency of each put.
fn register_node(
    etcd: &Etcd,
    reg: &Registry,
    i: usize,
    on_lease: &mut dyn FnMut(i64),
) -> Result<Vec<u64>> {
    let mut took = Vec::with_capacity(reg.containers);
    'again: for _attempt in 0..20 {
        let lease = etcd.lease_grant(REGISTRATION_TTL)?;
        reg.current[i].store(lease, Ordering::SeqCst);
        on_lease(lease);
        for k in 0..reg.containers {
            let name = format!("app{k:02}");
            let inst = instance(i, &name, &name, address(reg.subnets[i], k));
            let value = serde_json::to_vec(&inst)?;
            let t = Instant::now();
            let mut tries = 0;
            loop {
                match etcd.put(&inst.etcd_key(&name), &value, Some(lease)) {
                    Ok(()) => {
                        took.push(t.elapsed().as_micros() as u64);
                        reg.puts.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(e) if format!("{e:#}").contains("lease not found") => {
                        reg.redone.fetch_add(1, Ordering::Relaxed);
                        continue 'again;
                    }
                    // As the agent: try again at its next scan.
                    Err(e) if tries < 10 => {
                        tries += 1;
                        reg.retried.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("{e:#}");
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    Err(e) => return Err(e.context(format!("node {i} registering {name}"))),
                }
            }
        }
        return Ok(took);
    }
    bail!("node {i}: its registration lease ran out 20 times while it registered")
}

/// K threads renew every lease at its period, each from a heap of due times.
fn start_keepalives(url: &str, threads: usize, ka: Arc<Keepalives>) -> Result<KeepaliveThreads> {
    let mut txs = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (tx, rx) = mpsc::channel::<Job>();
        txs.push(tx);
        let etcd = Etcd::new(&[url.to_string()])?;
        let ka = ka.clone();
        handles.push(
            std::thread::Builder::new()
                .stack_size(WATCH_STACK)
                .spawn(move || {
                    let mut jobs: Vec<Job> = Vec::new();
                    let mut heap: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
                    while !ka.stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        let wait = heap
                            .peek()
                            .map(|Reverse((due, _))| due.saturating_duration_since(now))
                            .unwrap_or(Duration::from_millis(100))
                            .min(Duration::from_millis(100));
                        match rx.recv_timeout(wait) {
                            Ok(j) => {
                                heap.push(Reverse((Instant::now() + j.period, jobs.len())));
                                jobs.push(j);
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
                        }
                        while let Some(Reverse((due, ix))) = heap.peek().copied() {
                            let now = Instant::now();
                            if due > now || ka.stop.load(Ordering::Relaxed) {
                                break;
                            }
                            heap.pop();
                            let job = &mut jobs[ix];
                            let late = now - due;
                            let r = etcd.lease_keepalive(job.lease);
                            let took = now.elapsed();
                            let expired = matches!(&r, Err(e) if e.to_string().contains("expired"));
                            {
                                let p = ka.phase.load(Ordering::Relaxed);
                                let mut ph = ka.phases.lock().unwrap();
                                let ph = &mut ph[p];
                                ph.latency_us.push(took.as_micros() as u64);
                                ph.late_max_us = ph.late_max_us.max(late.as_micros() as u64);
                                if expired {
                                    ph.expired += 1;
                                } else if r.is_err() {
                                    ph.errors += 1;
                                }
                            }
                            match r {
                                Ok(()) => heap.push(Reverse((due + job.period, ix))),
                                Err(_) if expired => {
                                    // The agent publishes everything again under a new lease.
                                    let Some(reg) = job.registry.clone() else {
                                        continue;
                                    };
                                    let i = job.node;
                                    if reg.current[i].load(Ordering::SeqCst) != job.lease
                                        || !reg.complete[i].load(Ordering::SeqCst)
                                    {
                                        continue;
                                    }
                                    reg.redone.fetch_add(1, Ordering::Relaxed);
                                    if register_node(&etcd, &reg, i, &mut |_| {}).is_ok() {
                                        job.lease = reg.current[i].load(Ordering::SeqCst);
                                        heap.push(Reverse((Instant::now() + job.period, ix)));
                                    }
                                }
                                Err(_) => heap.push(Reverse((
                                    Instant::now() + Duration::from_millis(500),
                                    ix,
                                ))),
                            }
                        }
                    }
                })?,
        );
    }
    Ok((txs, handles))
}

// ---------------------------------------------------------------- watchers

struct Shared {
    base: Instant,
    /// Nanoseconds after `base` each probe was put (0: not yet).
    sent: Vec<AtomicU64>,
    probe_prefix: String,
    end_key: String,
    ready: AtomicUsize,
    finished: AtomicUsize,
    events: AtomicU64,
    batches: AtomicU64,
    probes_seen: AtomicU64,
    phase: Arc<Keepalives>,
}

#[derive(Default)]
struct WatchResult {
    /// (probe, microseconds from put to sight)
    seen: Vec<(u32, u64)>,
    /// Batches with events while the fleet registered: how often the
    /// agent would rebuild its DNS directory.
    register_batches: u64,
    errors: u64,
    first_error: Option<String>,
    mirror: Option<Mirror>,
}

fn watcher(url: String, full: bool, start_revision: Option<i64>, s: Arc<Shared>) -> WatchResult {
    let mut r = WatchResult::default();
    let etcd = match Etcd::new(&[url]) {
        Ok(e) => e,
        Err(e) => {
            r.first_error = Some(format!("{e:#}"));
            s.ready.fetch_add(1, Ordering::SeqCst);
            s.finished.fetch_add(1, Ordering::SeqCst);
            return r;
        }
    };
    // As the agent: a snapshot, then a watch from the revision after it.
    // Late watchers start from the revision they are given; those with a
    // full mirror try the agent's snapshot first.
    let mut mirror = Mirror::default();
    let mut from_snapshot = None;
    if full || start_revision.is_none() {
        for attempt in 0.. {
            match etcd.snapshot(ETCD_SERVICES_PREFIX) {
                Ok(snap) => {
                    from_snapshot = Some(snap.revision);
                    if full {
                        mirror = Mirror::from_snapshot(snap);
                    }
                    break;
                }
                Err(e) => {
                    r.errors += 1;
                    r.first_error
                        .get_or_insert_with(|| format!("snapshot: {e:#}"));
                    if start_revision.is_some() || attempt >= 10 {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
    let Some(mut revision) = from_snapshot.or(start_revision) else {
        s.ready.fetch_add(1, Ordering::SeqCst);
        s.finished.fetch_add(1, Ordering::SeqCst);
        return r;
    };
    let mut ready = false;
    let mut done = false;
    while !done {
        let res = etcd.watch_prefix(
            ETCD_SERVICES_PREFIX,
            revision + 1,
            Duration::from_secs(60),
            |rev, events| {
                if !ready {
                    ready = true;
                    s.ready.fetch_add(1, Ordering::SeqCst);
                }
                revision = revision.max(rev);
                if events.is_empty() {
                    return true;
                }
                let now = s.base.elapsed().as_nanos() as u64;
                s.events.fetch_add(events.len() as u64, Ordering::Relaxed);
                s.batches.fetch_add(1, Ordering::Relaxed);
                if s.phase.phase.load(Ordering::Relaxed) == 2 {
                    r.register_batches += 1;
                }
                for ev in &events {
                    let Event::Put { key, .. } = ev else { continue };
                    if let Some(k) = key.strip_prefix(&s.probe_prefix) {
                        if let Some(sent) = k
                            .parse::<usize>()
                            .ok()
                            .and_then(|k| s.sent.get(k).map(|t| (k, t.load(Ordering::SeqCst))))
                        {
                            if sent.1 > 0 {
                                r.seen
                                    .push((sent.0 as u32, now.saturating_sub(sent.1) / 1000));
                                s.probes_seen.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else if *key == s.end_key {
                        done = true;
                    }
                }
                if full {
                    mirror.apply(rev, events);
                }
                !done
            },
        );
        if let Err(e) = res {
            r.errors += 1;
            r.first_error.get_or_insert_with(|| format!("{e:#}"));
            if !ready {
                ready = true;
                s.ready.fetch_add(1, Ordering::SeqCst);
            }
            if s.phase.stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if full {
        r.mirror = Some(mirror);
    }
    s.finished.fetch_add(1, Ordering::SeqCst);
    r
}

// ---------------------------------------------------------------- the fleet

fn node_id(i: usize) -> String {
    format!("{:032x}", 0x51a1_0000_0000_u64 + i as u64)
}

fn hostname(i: usize) -> String {
    format!("node-{i:05}")
}

/// A /24 per node in a CIDR with room for twice the fleet.
fn fleet_cidr(nodes: usize) -> Ipv4Net {
    let bits = (2 * nodes).next_power_of_two().trailing_zeros() as u8;
    let prefix = 24u8.saturating_sub(bits).max(8);
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) & mask);
    Ipv4Net::new(addr, prefix).expect("a masked address")
}

fn instance(i: usize, container: &str, service: &str, address: Ipv4Addr) -> Instance {
    Instance {
        container: container.to_string(),
        address,
        services: vec![ServicePort {
            name: service.to_string(),
            port: Some(8080),
        }],
        monitor_pid: 100_000 + i as i32,
        monitor_start: 1_234_567,
        node: hostname(i),
        node_id: node_id(i),
    }
}

fn address(subnet: Ipv4Net, c: usize) -> Ipv4Addr {
    let hosts = (1u32 << (32 - u32::from(subnet.prefix)))
        .saturating_sub(3)
        .max(1);
    Ipv4Addr::from(u32::from(subnet.addr) + 2 + (c as u32 % hosts))
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let (n, c, w) = (a.nodes, a.containers, a.watchers);
    println!(
        "sim-fleet: {n} nodes x {c} containers = {} instances, {w} watchers ({} with a full mirror{}), {} probes every {} ms, etcd {}",
        n * c,
        a.mirrors,
        if a.late_watchers { ", started after registration" } else { "" },
        a.events,
        a.interval.as_millis(),
        a.etcd
    );
    let etcd = Etcd::new(std::slice::from_ref(&a.etcd))?;
    etcd.healthy().context("etcd is not healthy")?;
    if !etcd.get_prefix(ETCD_SERVICES_PREFIX)?.is_empty() {
        bail!("etcd already holds keys under {ETCD_SERVICES_PREFIX}: run against an empty etcd");
    }
    let mut samples: Vec<(&str, Option<ProcSample>, Instant)> =
        vec![("start", proc_sample(a.etcd_pid), Instant::now())];
    let m0 = metrics(&a.etcd);
    let ka = Arc::new(Keepalives {
        phase: AtomicUsize::new(0),
        phases: Mutex::new((0..PHASES.len()).map(|_| PhaseKa::default()).collect()),
        stop: AtomicBool::new(false),
    });
    ka.set_phase(0);
    let (ka_tx, ka_handles) = start_keepalives(&a.etcd, a.keepalive_threads, ka.clone())?;
    let ka_tx = Arc::new(Mutex::new(ka_tx));
    let k_threads = a.keepalive_threads;
    let send_job = {
        let ka_tx = ka_tx.clone();
        move |i: usize, job: Job| {
            let _ = ka_tx.lock().unwrap()[i % k_threads].send(job);
        }
    };

    // 1. Join: every node leases its subnet as the agent does.
    let state = tempfile::Builder::new().prefix("sim-fleet-").tempdir()?;
    let cidr = fleet_cidr(n);
    let t = Instant::now();
    let subnets: Vec<Ipv4Net> = if a.subnets {
        // Parsed as the agent reads network.toml, so new keys keep their defaults.
        let cfg = FleetNetwork::parse(&format!(
            "etcd-endpoints = [\"{}\"]\ncidr = \"{cidr}\"\nnode-prefix = 24\nmode = \"vxlan\"\nsubnet-grace = \"{SUBNET_GRACE}\"\n",
            a.etcd
        ))?;
        let dir = state.path().to_path_buf();
        let send_job = send_job.clone();
        pool(&a.etcd, n, a.concurrency, move |etcd, i| {
            let d = dir.join(i.to_string());
            std::fs::create_dir_all(&d)?;
            let leaser = Leaser::new(etcd.clone(), &cfg, Path::new(&d))?;
            leaser.agree()?;
            let held = leaser.acquire(&SubnetRecord {
                node: node_id(i),
                hostname: hostname(i),
                underlay: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 1 + i as u32),
                vtep_mac: Some(format!(
                    "02:00:{:02x}:{:02x}:{:02x}:01",
                    (i >> 16) & 255,
                    (i >> 8) & 255,
                    i & 255
                )),
            })?;
            send_job(
                i,
                Job {
                    lease: held.lease,
                    period: SUBNET_RENEW,
                    node: i,
                    registry: None,
                },
            );
            Ok(held.subnet)
        })?
    } else {
        (0..n)
            .map(|i| cidr.subnet(24, i as u32).expect("cidr holds the fleet"))
            .collect()
    };
    let join_secs = t.elapsed().as_secs_f64();
    if a.subnets {
        let distinct: std::collections::BTreeSet<_> = subnets.iter().collect();
        println!(
            "join: {n} nodes leased {} distinct /24s of {cidr} in {join_secs:.2} s ({:.0} nodes/s)",
            distinct.len(),
            n as f64 / join_secs
        );
    }
    samples.push(("joined", proc_sample(a.etcd_pid), Instant::now()));

    // 2. Watchers (before registration unless --late-watchers).
    let probe_node = 0;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        sent: (0..a.events).map(|_| AtomicU64::new(0)).collect(),
        probe_prefix: format!("{ETCD_SERVICES_PREFIX}probe/{}/probe-", node_id(probe_node)),
        end_key: format!("{ETCD_SERVICES_PREFIX}sim-end/{}/end", node_id(probe_node)),
        ready: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        events: AtomicU64::new(0),
        batches: AtomicU64::new(0),
        probes_seen: AtomicU64::new(0),
        phase: ka.clone(),
    });
    let mut watchers: Vec<JoinHandle<WatchResult>> = Vec::new();
    let mut watch_secs = 0.0;
    let start_watchers =
        |start_revision: Option<i64>, watchers: &mut Vec<JoinHandle<WatchResult>>| -> Result<f64> {
            let t = Instant::now();
            for i in 0..w {
                let (url, s) = (a.etcd.clone(), shared.clone());
                let full = i < a.mirrors;
                watchers.push(
                    std::thread::Builder::new()
                        .name(format!("watch-{i}"))
                        .stack_size(WATCH_STACK)
                        .spawn(move || watcher(url, full, start_revision, s))?,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(300);
            while shared.ready.load(Ordering::SeqCst) < w && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "watch: {}/{w} watch streams open on {ETCD_SERVICES_PREFIX} in {secs:.2} s",
                shared.ready.load(Ordering::SeqCst)
            );
            Ok(secs)
        };
    ka.set_phase(1);
    if !a.late_watchers {
        watch_secs = start_watchers(None, &mut watchers)?;
    }
    samples.push(("watching", proc_sample(a.etcd_pid), Instant::now()));

    // 3. Registration: a lease per node, one put per container under it.
    ka.set_phase(2);
    let recv_reg = own_received(&a.etcd);
    let t = Instant::now();
    let registry = Arc::new(Registry {
        containers: c,
        current: (0..n).map(|_| AtomicI64::new(0)).collect(),
        complete: (0..n).map(|_| AtomicBool::new(false)).collect(),
        redone: AtomicU64::new(0),
        puts: AtomicU64::new(0),
        retried: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        subnets,
    });
    let _progress = {
        let (registry, shared, pid, ka) =
            (registry.clone(), shared.clone(), a.etcd_pid, ka.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            while ka.phase.load(Ordering::SeqCst) == 2 {
                for _ in 0..100 {
                    std::thread::sleep(Duration::from_millis(100));
                    if ka.phase.load(Ordering::SeqCst) != 2 {
                        return;
                    }
                }
                println!(
                    "register: {:.0} s: {} puts done ({} retried, {} registrations redone), {} watch deliveries; etcd RSS {}",
                    t.elapsed().as_secs_f64(),
                    registry.puts.load(Ordering::Relaxed),
                    registry.retried.load(Ordering::Relaxed),
                    registry.redone.load(Ordering::Relaxed),
                    shared.events.load(Ordering::Relaxed),
                    proc_sample(pid).map(|s| mib(s.rss_kib)).unwrap_or_else(|| "?".into())
                );
            }
        })
    };
    let put_us = {
        let registry = registry.clone();
        let send_job = send_job.clone();
        pool(&a.etcd, n, a.concurrency, move |etcd, i| {
            let mut on_lease = |lease| {
                send_job(
                    i,
                    Job {
                        lease,
                        period: Duration::from_millis(REGISTRATION_TTL as u64 * 1000 / 3),
                        node: i,
                        registry: Some(registry.clone()),
                    },
                )
            };
            // A node that cannot register is counted, not fatal: the
            // figures of the rest still tell what happened.
            match register_node(etcd, &registry, i, &mut on_lease) {
                Ok(took) => {
                    registry.complete[i].store(true, Ordering::SeqCst);
                    Ok(took)
                }
                Err(e) => {
                    if registry.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        println!("register: node {i} gave up: {e:#}");
                    }
                    Ok(Vec::new())
                }
            }
        })?
    };
    let register_put_secs = t.elapsed().as_secs_f64();
    let mut put_lat: Vec<u64> = put_us.into_iter().flatten().collect();
    let redone = registry.redone.load(Ordering::Relaxed);
    if redone > 0 {
        println!("register: {redone} registrations started again: the node's lease ran out first");
    }
    println!(
        "register: {} instances put in {register_put_secs:.2} s ({:.0} puts/s); put latency {}",
        n * c,
        (n * c) as f64 / register_put_secs,
        dist(&mut put_lat)
    );
    // Until every watcher has seen every registration (more, when leases
    // ran out and nodes registered again), or nothing came for a minute.
    let want = (n * c * w) as u64;
    let (mut seen, mut changed) = (shared.events.load(Ordering::Relaxed), Instant::now());
    let mut last_print = Instant::now();
    while !a.late_watchers && !shared.phase.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        let now = shared.events.load(Ordering::Relaxed);
        if now != seen {
            (seen, changed) = (now, Instant::now());
        }
        let quiet = changed.elapsed();
        if (now >= want && quiet > Duration::from_secs(2)) || quiet > Duration::from_secs(60) {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            last_print = Instant::now();
            println!(
                "register: watchers have seen {now}/{want} events after {:.0} s",
                t.elapsed().as_secs_f64()
            );
        }
    }
    let register_seen_secs = (changed - t).as_secs_f64();
    let register_events = shared.events.load(Ordering::Relaxed);
    let register_batches = shared.batches.load(Ordering::Relaxed);
    let register_recv = own_received(&a.etcd).saturating_sub(recv_reg);
    if !a.late_watchers {
        println!(
            "register: every watcher saw {register_events}/{want} registrations {register_seen_secs:.2} s after the first put ({:.0} events/s delivered, in {register_batches} batches; {:.0} MB read by the watchers)",
            register_events as f64 / register_seen_secs,
            register_recv as f64 / 1e6
        );
    }
    samples.push(("registered", proc_sample(a.etcd_pid), Instant::now()));
    let m_reg = metrics(&a.etcd);

    // A node joining now: the agent's first read of the registry.
    let raw_body = raw_http(
        &a.etcd,
        "POST",
        "/v3/kv/range",
        &format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            b64(ETCD_SERVICES_PREFIX.as_bytes()),
            b64(&prefix_end(ETCD_SERVICES_PREFIX))
        ),
    )
    .unwrap_or_default();
    let raw = raw_body.len();
    // What a node's mirror of it would hold, and what the agent's DNS
    // follower does with it at every change: rebuild the directory.
    let entries = parse_range(&raw_body);
    drop(raw_body);
    let mirror_keys = entries.len();
    let mirror_bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut runs = Vec::new();
    let mut names = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let d = Directory::from_entries(&entries);
        runs.push(t.elapsed().as_secs_f64() * 1000.0);
        names = d.len();
    }
    drop(entries);
    runs.sort_by(f64::total_cmp);
    let rebuild_ms = runs.get(1).copied().unwrap_or(0.0);
    println!(
        "registry: {mirror_keys} keys, {:.1} MB of keys and values (a node's mirror); its DNS directory rebuilt in {rebuild_ms:.1} ms ({names} names)",
        mirror_bytes as f64 / 1e6
    );
    let t = Instant::now();
    let late_snapshot = match etcd.snapshot(ETCD_SERVICES_PREFIX) {
        Ok(s) => format!("{} keys in {:.2} s", s.kvs.len(), t.elapsed().as_secs_f64()),
        Err(e) => format!("FAILED after {:.2} s: {e:#}", t.elapsed().as_secs_f64()),
    };
    println!(
        "late join: the registry's snapshot is {:.1} MB of JSON (client bound {} MiB): {late_snapshot}",
        raw as f64 / 1e6,
        cairn_etcd::MAX_ANSWER >> 20
    );
    if a.late_watchers {
        let rev = etcd.snapshot("/cairn/sim/nothing/")?.revision;
        watch_secs = start_watchers(Some(rev), &mut watchers)?;
    }

    // 4. Propagation: single puts, each timed to every watcher.
    ka.set_phase(3);
    let prober = Etcd::new(std::slice::from_ref(&a.etcd))?;
    let probe_lease = registry.current[probe_node].load(Ordering::SeqCst);
    let recv_prop = own_received(&a.etcd);
    let events_before = shared.events.load(Ordering::Relaxed);
    let m_prop0 = metrics(&a.etcd);
    let cpu_prop0 = proc_sample(a.etcd_pid);
    let t = Instant::now();
    let mut probe_put_us = Vec::new();
    for k in 0..a.events {
        let due = t + a.interval * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let name = format!("probe-{k}");
        let inst = instance(
            probe_node,
            &name,
            "probe",
            address(registry.subnets[probe_node], k),
        );
        let value = serde_json::to_vec(&inst)?;
        shared.sent[k].store(shared.base.elapsed().as_nanos() as u64, Ordering::SeqCst);
        let p = Instant::now();
        prober.put(&inst.etcd_key("probe"), &value, Some(probe_lease))?;
        probe_put_us.push(p.elapsed().as_micros() as u64);
    }
    let want_probes = (a.events * w) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.probes_seen.load(Ordering::Relaxed) < want_probes && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let prop_secs = t.elapsed().as_secs_f64();
    let prop_events = shared.events.load(Ordering::Relaxed) - events_before;
    let prop_recv = own_received(&a.etcd).saturating_sub(recv_prop);
    let cpu_prop1 = proc_sample(a.etcd_pid);
    let m_prop1 = metrics(&a.etcd);
    println!(
        "propagate: {} probes put over {prop_secs:.1} s, {}/{want_probes} sightings; {prop_events} events delivered; put latency {}",
        a.events,
        shared.probes_seen.load(Ordering::Relaxed),
        dist(&mut probe_put_us)
    );
    samples.push(("propagated", proc_sample(a.etcd_pid), Instant::now()));

    // 5. Idle: only keepalives, and watch streams with nothing to say.
    ka.set_phase(4);
    let idle0 = proc_sample(a.etcd_pid);
    std::thread::sleep(a.idle);
    let idle1 = proc_sample(a.etcd_pid);
    samples.push(("idle", proc_sample(a.etcd_pid), Instant::now()));
    ka.set_phase(PHASES.len() - 1);
    let m_end = metrics(&a.etcd);

    // The end: a key every watcher stops at.
    etcd.put(&shared.end_key, b"{}", Some(probe_lease))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while shared.finished.load(Ordering::SeqCst) < watchers.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ka.stop.store(true, Ordering::SeqCst);
    let mut results = Vec::new();
    let mut stragglers = 0;
    for h in watchers {
        if h.is_finished() {
            results.push(h.join().map_err(|_| anyhow!("a watcher panicked"))?);
        } else {
            stragglers += 1;
        }
    }
    drop(ka_tx);
    for h in ka_handles {
        let _ = h.join();
    }

    // ------------------------------------------------------------ figures
    let mut pairs = Vec::with_capacity(a.events * w);
    let mut last_seen = vec![0u64; a.events];
    let mut seen_by = vec![0usize; a.events];
    let (mut errors, mut first_error, mut reg_batches) = (0, None, Vec::new());
    for r in &results {
        for &(k, us) in &r.seen {
            pairs.push(us);
            last_seen[k as usize] = last_seen[k as usize].max(us);
            seen_by[k as usize] += 1;
        }
        errors += r.errors;
        if first_error.is_none() {
            first_error.clone_from(&r.first_error);
        }
        reg_batches.push(r.register_batches);
    }
    let everywhere = seen_by.iter().filter(|&&s| s == w).count();
    let mut last: Vec<u64> = last_seen
        .iter()
        .zip(&seen_by)
        .filter(|(_, &s)| s == w)
        .map(|(l, _)| *l)
        .collect();
    println!(
        "propagation, put -> seen, every watcher x probe: {}",
        dist(&mut pairs)
    );
    println!(
        "propagation, put -> seen by the LAST watcher ({everywhere}/{} probes reached all {w}): {}",
        a.events,
        dist(&mut last)
    );
    println!(
        "watchers: {errors} stream errors{}, {stragglers} never finished",
        first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );

    // The agent rebuilds its DNS directory from the mirror at each batch.
    let mirror = results.iter().find_map(|r| r.mirror.as_ref());
    if let Some(m) = mirror {
        println!(
            "mirror: a watcher's Mirror holds {} keys at the end (it started from {})",
            m.entries.len(),
            if a.late_watchers {
                "a snapshot if it could read one"
            } else {
                "the empty registry"
            }
        );
    }
    reg_batches.sort_unstable();
    let per_watcher_batches = pct(&reg_batches, 0.5);

    let ka_phases = ka.phases.lock().unwrap();
    println!();
    println!(
        "keepalives (registration lease every {:.1} s{}):",
        REGISTRATION_TTL as f64 / 3.0,
        if a.subnets {
            ", subnet lease every 10 s"
        } else {
            ""
        }
    );
    let expect = n as f64 * (3.0 / REGISTRATION_TTL as f64 + if a.subnets { 0.1 } else { 0.0 });
    let mut ka_rows = Vec::new();
    for (p, name) in PHASES[..PHASES.len() - 1].iter().enumerate() {
        let ph = &ka_phases[p];
        let (Some(s), Some(e)) = (ph.started, ph.ended) else {
            continue;
        };
        let secs = (e - s).as_secs_f64();
        let mut l = ph.latency_us.clone();
        l.sort_unstable();
        let rate = l.len() as f64 / secs.max(1e-9);
        println!(
            "  {name:<10} {secs:>7.1} s  {rate:>7.0}/s  latency p50 {} p99 {}  late by up to {}  errors {} expired {}",
            ms(pct(&l, 0.5)),
            ms(pct(&l, 0.99)),
            ms(ph.late_max_us),
            ph.errors,
            ph.expired
        );
        ka_rows.push((name, rate, pct(&l, 0.99), ph.late_max_us, ph.expired));
    }
    println!("  steady state wants {expect:.0}/s");

    println!();
    println!(
        "etcd (pid {}):",
        a.etcd_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into())
    );
    let mut prev: Option<(ProcSample, Instant)> = None;
    for (name, s, at) in &samples {
        if let Some(s) = s {
            let cpu = prev
                .map(|(p, t)| {
                    let secs = (*at - t).as_secs_f64();
                    format!(
                        "  +{:.1} CPU s over {:.1} s ({:.0}% of a core)",
                        s.cpu_secs - p.cpu_secs,
                        secs,
                        100.0 * (s.cpu_secs - p.cpu_secs) / secs.max(1e-9)
                    )
                })
                .unwrap_or_default();
            println!(
                "  {name:<11} RSS {:>8}  peak {:>8}  threads {:>4}  CPU {:>7.1} s{cpu}",
                mib(s.rss_kib),
                mib(s.hwm_kib),
                s.threads,
                s.cpu_secs
            );
            prev = Some((*s, *at));
        }
    }
    let delta = |m1: &BTreeMap<&str, f64>, m0: &BTreeMap<&str, f64>, k: &str| {
        m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0)
    };
    for k in METRICS {
        if let Some(v) = m_end.get(k) {
            println!(
                "  {k} = {v:.0} (at start {:.0})",
                m0.get(k).copied().unwrap_or(0.0)
            );
        }
    }
    let prop_grpc = delta(
        &m_prop1,
        &m_prop0,
        "etcd_network_client_grpc_sent_bytes_total",
    );

    // ------------------------------------------------------------ summary
    let cpu = |x: Option<ProcSample>, y: Option<ProcSample>| match (x, y) {
        (Some(x), Some(y)) => y.cpu_secs - x.cpu_secs,
        _ => f64::NAN,
    };
    let etcd_end = samples.last().and_then(|s| s.1);
    let idle_cpu = cpu(idle0, idle1) / a.idle.as_secs_f64().max(1e-9);
    let prop_cpu = cpu(cpu_prop0, cpu_prop1) / prop_secs.max(1e-9);
    let bytes_per_delivery = prop_recv as f64 / prop_events.max(1) as f64;
    let deliveries_per_s = prop_events as f64 / prop_secs.max(1e-9);
    pairs.sort_unstable();
    last.sort_unstable();
    println!();
    println!("==================== summary: {n} nodes x {c} containers, {w} watchers ====================");
    let row = |k: &str, v: String| println!("{k:<46} {v}");
    if a.subnets {
        row(
            "join (subnet leases, agent's Leaser)",
            format!("{join_secs:.2} s for {n} nodes"),
        );
    }
    row("watch streams opened", format!("{w} in {watch_secs:.2} s"));
    row(
        "register N x C instances (puts)",
        format!(
            "{} in {register_put_secs:.2} s = {:.0} puts/s",
            n * c,
            (n * c) as f64 / register_put_secs
        ),
    );
    row(
        "  put latency p50 / p99",
        format!("{} / {}", ms(pct(&put_lat, 0.5)), ms(pct(&put_lat, 0.99))),
    );
    if !a.late_watchers {
        row(
            "  ... until every watcher saw every one",
            format!("{register_seen_secs:.2} s ({register_events} of {want} deliveries)"),
        );
        row(
            "  watch deliveries/s during registration",
            format!("{:.0}", register_events as f64 / register_seen_secs),
        );
        row(
            "  watch batches per watcher (p50)",
            format!(
                "{per_watcher_batches} -> agent's DNS rebuilds, est. <= {:.1} CPU s per node",
                per_watcher_batches as f64 * rebuild_ms / 1000.0
            ),
        );
    }
    row(
        "late join: registry snapshot",
        format!("{:.1} MB: {late_snapshot}", raw as f64 / 1e6),
    );
    row(
        "watch events delivered in total",
        format!(
            "{} (of {} = {} events x {w} watchers)",
            shared.events.load(Ordering::Relaxed),
            w * if a.late_watchers {
                a.events + 1
            } else {
                n * c + a.events + 1
            },
            if a.late_watchers {
                a.events + 1
            } else {
                n * c + a.events + 1
            }
        ),
    );
    row(
        "propagation put->seen p50 / p90 / p99 / max",
        format!(
            "{} / {} / {} / {}",
            ms(pct(&pairs, 0.5)),
            ms(pct(&pairs, 0.9)),
            ms(pct(&pairs, 0.99)),
            ms(pairs.last().copied().unwrap_or(0))
        ),
    );
    row(
        "propagation put->LAST watcher p50 / p99",
        format!(
            "{} / {} ({everywhere}/{} probes everywhere)",
            ms(pct(&last, 0.5)),
            ms(pct(&last, 0.99)),
            a.events
        ),
    );
    row(
        "probe fan-out: deliveries/s, bytes each",
        format!(
            "{deliveries_per_s:.0}/s, {bytes_per_delivery:.0} B of HTTP+JSON ({:.0} B gRPC inside etcd)",
            prop_grpc / prop_events.max(1) as f64
        ),
    );
    for (name, rate, p99, late, expired) in &ka_rows {
        row(
            &format!("keepalives/s during {name}"),
            format!(
                "{rate:.0}/s (p99 {}, late <= {}, expired {expired})",
                ms(*p99),
                ms(*late)
            ),
        );
    }
    if let Some(e) = etcd_end {
        row(
            "etcd RSS at the end / peak",
            format!("{} / {}", mib(e.rss_kib), mib(e.hwm_kib)),
        );
        let s0 = samples[0].1.unwrap_or_default();
        row(
            "etcd CPU s in total",
            format!("{:.1}", e.cpu_secs - s0.cpu_secs),
        );
    }
    row(
        "etcd CPU while probing (1 put / interval)",
        format!("{:.0}% of a core", 100.0 * prop_cpu),
    );
    row(
        "etcd CPU at rest (keepalives only)",
        format!("{:.0}% of a core", 100.0 * idle_cpu),
    );
    row(
        "etcd db size",
        format!(
            "{:.1} MB",
            m_end
                .get("etcd_mvcc_db_total_size_in_bytes")
                .copied()
                .unwrap_or(0.0)
                / 1e6
        ),
    );
    row(
        "etcd slow watchers at the end of registration",
        format!(
            "{:.0}",
            m_reg
                .get("etcd_debugging_mvcc_slow_watcher_total")
                .copied()
                .unwrap_or(0.0)
        ),
    );
    {
        row(
            "one node's mirror / DNS rebuild",
            format!(
                "{mirror_keys} keys, {:.1} MB payload / {rebuild_ms:.1} ms",
                mirror_bytes as f64 / 1e6
            ),
        );
    }
    row(
        "registrations redone (lease ran out) / nodes failed",
        format!(
            "{} / {}",
            registry.redone.load(Ordering::Relaxed),
            registry.failed.load(Ordering::Relaxed)
        ),
    );
    row(
        "watch stream errors / stragglers",
        format!("{errors} / {stragglers}"),
    );
    Ok(())
}
