//! `host fleet serve`: a FleetLock server whose state lives in etcd, so a
//! fleet without Kubernetes has one, and several servers can share the work.
//!
//! Each group is a counting semaphore stored in one etcd key
//! (`<prefix>/groups/<group>`: slots and holders, JSON), changed only by
//! compare-and-swap on its mod revision: two servers, or two requests, never
//! hand out the same last slot. A holder keeps its slot until it reports
//! steady state or an operator frees it: a node that never comes back stops
//! the rollout of its group, which is the point. Each running server keeps a
//! key under `<prefix>/servers/` alive with an etcd lease, so operators see
//! which servers are up.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{ClientParams, ErrorBody, Request, PROTOCOL_HEADER};
use cairn_etcd::Etcd;

pub const DEFAULT_PREFIX: &str = "/cairn/fleetlock";

#[derive(Debug, Clone)]
pub struct Config {
    pub etcd: Vec<String>,
    /// Address to listen on, e.g. `127.0.0.1:3333` (port 0: any free port).
    pub listen: String,
    /// Slots of a group not named in `groups`.
    pub default_slots: u32,
    pub groups: BTreeMap<String, u32>,
    pub prefix: String,
}

impl Config {
    pub fn slots_for(&self, group: &str) -> u32 {
        self.groups
            .get(group)
            .copied()
            .unwrap_or(self.default_slots)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub id: String,
    /// RFC 3339 time the slot was taken.
    pub since: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Semaphore {
    pub group: String,
    pub slots: u32,
    pub holders: Vec<Holder>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// Taken now, or already held by this id (requests are idempotent).
    Granted,
    Full(Semaphore),
}

/// The semaphores in etcd.
#[derive(Debug, Clone)]
pub struct Store {
    etcd: Etcd,
    prefix: String,
}

/// Compare-and-swap retries before a request gives up (heavy contention).
const CAS_TRIES: usize = 64;

impl Store {
    pub fn new(etcd: Etcd, prefix: &str) -> Store {
        Store {
            etcd,
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    fn key(&self, group: &str) -> String {
        format!("{}/groups/{group}", self.prefix)
    }

    fn load(&self, group: &str, slots: u32) -> Result<(Semaphore, Option<i64>)> {
        match self.etcd.get(&self.key(group))? {
            None => Ok((
                Semaphore {
                    group: group.to_string(),
                    slots,
                    holders: Vec::new(),
                },
                None,
            )),
            Some(v) => {
                let sem: Semaphore = serde_json::from_slice(&v.value).with_context(|| {
                    format!("etcd key {} is not a cairn semaphore", self.key(group))
                })?;
                Ok((sem, Some(v.mod_revision)))
            }
        }
    }

    pub fn acquire(&self, group: &str, id: &str, slots: u32) -> Result<Acquired> {
        for _ in 0..CAS_TRIES {
            let (mut sem, rev) = self.load(group, slots)?;
            if sem.holders.iter().any(|h| h.id == id) {
                return Ok(Acquired::Granted);
            }
            // The server's configuration is authoritative for the slot count.
            sem.slots = slots;
            if sem.holders.len() >= slots as usize {
                return Ok(Acquired::Full(sem));
            }
            sem.holders.push(Holder {
                id: id.to_string(),
                since: chrono::Utc::now().to_rfc3339(),
            });
            if self
                .etcd
                .put_if(&self.key(group), rev, &serde_json::to_vec(&sem)?)?
            {
                return Ok(Acquired::Granted);
            }
        }
        bail!("group {group}: too much contention on its semaphore; try again")
    }

    /// Frees `id`'s slot; false if it held none.
    pub fn release(&self, group: &str, id: &str) -> Result<bool> {
        for _ in 0..CAS_TRIES {
            let (mut sem, rev) = self.load(group, 0)?;
            let before = sem.holders.len();
            sem.holders.retain(|h| h.id != id);
            if sem.holders.len() == before {
                return Ok(false);
            }
            if self
                .etcd
                .put_if(&self.key(group), rev, &serde_json::to_vec(&sem)?)?
            {
                return Ok(true);
            }
        }
        bail!("group {group}: too much contention on its semaphore; try again")
    }

    pub fn groups(&self) -> Result<Vec<Semaphore>> {
        let mut out = Vec::new();
        for (key, value) in self.etcd.get_prefix(&format!("{}/groups/", self.prefix))? {
            let sem: Semaphore = serde_json::from_slice(&value)
                .with_context(|| format!("etcd key {key} is not a cairn semaphore"))?;
            out.push(sem);
        }
        Ok(out)
    }

    /// Addresses of the servers whose lease is alive.
    pub fn servers(&self) -> Result<Vec<String>> {
        let prefix = format!("{}/servers/", self.prefix);
        Ok(self
            .etcd
            .get_prefix(&prefix)?
            .into_iter()
            .map(|(k, _)| k.trim_start_matches(&prefix).to_string())
            .collect())
    }
}

/// A group name or node id as it may appear in an etcd key.
fn check_name(what: &str, s: &str) -> std::result::Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{what} must be 1 to 253 characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c))
    {
        return Err(format!(
            "{what} {s:?} may only hold letters, digits and -_.:@"
        ));
    }
    Ok(())
}

/// A server answering on its socket until `stop` is set.
pub struct Running {
    pub addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    http: Arc<tiny_http::Server>,
}

impl Running {
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Blocks until the server stops (never, unless an error stops it).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // unblock() wakes one blocked recv(); every worker may be in one.
        for _ in 0..self.threads.len() {
            self.http.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds, registers with etcd under a lease, and answers on `workers` threads.
pub fn start(config: Config, workers: usize) -> Result<Running> {
    let etcd = Etcd::new(&config.etcd)?;
    let store = Store::new(etcd.clone(), &config.prefix);
    // Fail early and clearly when etcd is not there.
    store.groups().context("reaching etcd")?;
    let http = tiny_http::Server::http(&config.listen)
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", config.listen))?;
    let addr = http
        .server_addr()
        .to_ip()
        .context("the FleetLock server is not on an IP socket")?;
    let http = Arc::new(http);
    let stop = Arc::new(AtomicBool::new(false));
    let config = Arc::new(config);
    let mut threads = Vec::new();

    let lease = etcd.lease_grant(15)?;
    etcd.put(
        &format!("{}/servers/{addr}", store.prefix),
        chrono::Utc::now().to_rfc3339().as_bytes(),
        Some(lease),
    )?;
    {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Err(e) = etcd.lease_keepalive(lease) {
                    tracing::warn!("keeping the server's etcd lease alive: {e:#}");
                }
                for _ in 0..50 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }));
    }
    for _ in 0..workers.max(1) {
        let http = http.clone();
        let stop = stop.clone();
        let store = store.clone();
        let config = config.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match http.recv() {
                    Ok(req) => handle(req, &store, &config),
                    Err(_) => return,
                }
            }
        }));
    }
    Ok(Running {
        addr,
        stop,
        threads,
        http,
    })
}

fn respond(req: tiny_http::Request, status: u16, body: Option<ErrorBody>) {
    let text = body
        .map(|b| serde_json::to_string(&b).unwrap_or_default())
        .unwrap_or_default();
    let header =
        tiny_http::Header::from_bytes("Content-Type", "application/json").expect("valid header");
    let _ = req.respond(
        tiny_http::Response::from_string(text)
            .with_status_code(status)
            .with_header(header),
    );
}

fn err(kind: &str, value: impl Into<String>) -> Option<ErrorBody> {
    Some(ErrorBody {
        kind: kind.into(),
        value: value.into(),
    })
}

fn handle(mut req: tiny_http::Request, store: &Store, config: &Config) {
    let path = req.url().to_string();
    let pre_reboot = match (req.method(), path.as_str()) {
        (tiny_http::Method::Post, "/v1/pre-reboot") => true,
        (tiny_http::Method::Post, "/v1/steady-state") => false,
        _ => {
            let msg = format!("no endpoint {} {path}", req.method());
            return respond(req, 404, err("not_found", msg));
        }
    };
    let has_header = req
        .headers()
        .iter()
        .any(|h| h.field.equiv(PROTOCOL_HEADER) && h.value.as_str().eq_ignore_ascii_case("true"));
    if !has_header {
        return respond(
            req,
            400,
            err(
                "missing_header",
                format!("header `{PROTOCOL_HEADER}: true` is required"),
            ),
        );
    }
    let mut body = String::new();
    if req
        .as_reader()
        .take(64 * 1024)
        .read_to_string(&mut body)
        .is_err()
    {
        return respond(req, 400, err("bad_request", "unreadable body"));
    }
    let parsed: Request = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            return respond(
                req,
                400,
                err(
                    "bad_request",
                    format!("body is not a FleetLock request: {e}"),
                ),
            )
        }
    };
    let ClientParams { id, group } = parsed.client_params;
    if let Err(m) = check_name("id", &id).and_then(|_| check_name("group", &group)) {
        return respond(req, 400, err("bad_request", m));
    }
    let result = if pre_reboot {
        store
            .acquire(&group, &id, config.slots_for(&group))
            .map(|a| match a {
                Acquired::Granted => {
                    tracing::info!("group {group}: slot granted to {id}");
                    (200, None)
                }
                Acquired::Full(sem) => {
                    let holders: Vec<&str> = sem.holders.iter().map(|h| h.id.as_str()).collect();
                    (
                        409,
                        err(
                            "failed_lock",
                            format!(
                                "group {group}: all {} slots are held (by {})",
                                sem.slots,
                                holders.join(", ")
                            ),
                        ),
                    )
                }
            })
    } else {
        store.release(&group, &id).map(|freed| {
            if freed {
                tracing::info!("group {group}: {id} released its slot");
            }
            (200, None)
        })
    };
    match result {
        Ok((status, body)) => respond(req, status, body),
        Err(e) => respond(req, 503, err("etcd_unavailable", format!("{e:#}"))),
    }
}
