//! The etcd v3 operations cairn's node services need, over etcd's JSON
//! gateway (`/v3/kv/*`, `/v3/lease/*`, `/v3/watch`): plain HTTP, so no gRPC
//! stack and no async runtime. The FleetLock server keeps its semaphores
//! here; the fleet network leases subnets and mirrors them with [`Mirror`].
//!
//! etcd is a peer we trust with routing, not with our memory: every answer
//! is bounded before it is parsed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

/// The largest answer read from etcd: a range over a few thousand records,
/// or one watch message. Anything bigger is refused, not buffered.
pub const MAX_ANSWER: u64 = 16 << 20;
/// Keys per range request when a prefix is read whole: 2,000 instance
/// records are about 1 MB, well under [`MAX_ANSWER`].
pub const SNAPSHOT_PAGE: usize = 2000;

#[derive(Debug, Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    agent: ureq::Agent,
}

/// A key's value and the revision it was last modified at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A key with its value and revisions, as a range returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// The lease the key is bound to (0: none).
    pub lease: i64,
}

/// Every key under a prefix, and the store revision the read saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
}

/// One change a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl Etcd {
    /// `endpoints`: client URLs such as `http://127.0.0.1:2379`.
    pub fn new(endpoints: &[String]) -> Result<Etcd> {
        if endpoints.is_empty() {
            bail!("no etcd endpoint given");
        }
        for ep in endpoints {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                bail!("etcd endpoint {ep:?}: write it as a URL, e.g. http://10.0.0.5:2379");
            }
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .redirects(0)
            .build();
        Ok(Etcd {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            agent,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Posts to the first endpoint that answers.
    fn call(&self, path: &str, body: Value) -> Result<Value> {
        let mut last = None;
        for ep in &self.endpoints {
            let url = format!("{ep}{path}");
            match self.agent.post(&url).send_json(body.clone()) {
                Ok(resp) => return read_json(resp.into_reader(), &url),
                Err(ureq::Error::Status(code, resp)) => {
                    let mut text = String::new();
                    let _ = resp.into_reader().take(4096).read_to_string(&mut text);
                    last = Some(anyhow!("etcd {url} answered {code}: {}", text.trim()));
                }
                Err(e) => last = Some(anyhow!("etcd {url} unreachable: {e}")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no etcd endpoint")))
    }

    pub fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let v = self.call("/v3/kv/range", json!({ "key": B64.encode(key) }))?;
        let Some(kv) = v["kvs"].as_array().and_then(|a| a.first()) else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            value: decode(&kv["value"])?,
            mod_revision: int(&kv["mod_revision"]),
        }))
    }

    /// Every key under `prefix` with its value, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .snapshot(prefix)?
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect())
    }

    /// Every key under `prefix`, with revisions and leases, and the revision
    /// of the store the read saw (a watch from `revision + 1` misses nothing).
    pub fn snapshot(&self, prefix: &str) -> Result<Snapshot> {
        self.snapshot_paged(prefix, SNAPSHOT_PAGE)
    }

    /// [`Etcd::snapshot`] read `page` keys at a time, every page at the
    /// first page's revision: one consistent view, and no answer grows with
    /// the fleet past [`MAX_ANSWER`].
    pub fn snapshot_paged(&self, prefix: &str, page: usize) -> Result<Snapshot> {
        let end = B64.encode(prefix_end(prefix));
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let mut body =
                json!({ "key": B64.encode(&from), "range_end": end, "limit": page.to_string() });
            if revision > 0 {
                body["revision"] = json!(revision.to_string());
            }
            let v = self.call("/v3/kv/range", body)?;
            if revision == 0 {
                revision = int(&v["header"]["revision"]);
            }
            let mut last = None;
            for kv in v["kvs"].as_array().into_iter().flatten() {
                let key = key_of(kv)?;
                last = Some(key.clone());
                kvs.push(KeyValue {
                    key,
                    value: decode(&kv["value"])?,
                    mod_revision: int(&kv["mod_revision"]),
                    lease: int(&kv["lease"]),
                });
            }
            match (v["more"].as_bool().unwrap_or(false), last) {
                (true, Some(last)) => {
                    // The next page starts just after the last key.
                    from = last.into_bytes();
                    from.push(0);
                }
                _ => return Ok(Snapshot { revision, kvs }),
            }
        }
    }

    /// Writes `value` only if the key is still at `expected` (`None`: the key
    /// must not exist). Returns whether the write happened.
    pub fn put_if(&self, key: &str, expected: Option<i64>, value: &[u8]) -> Result<bool> {
        self.put_if_leased(key, expected, value, None)
    }

    /// [`Etcd::put_if`], the key bound to `lease` (it goes when the lease
    /// expires or is revoked).
    pub fn put_if_leased(
        &self,
        key: &str,
        expected: Option<i64>,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<bool> {
        let compare = match expected {
            Some(rev) => {
                json!({ "key": B64.encode(key), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string() })
            }
            None => {
                json!({ "key": B64.encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
            }
        };
        let mut put = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if let Some(l) = lease {
            put["lease"] = json!(l.to_string());
        }
        let v = self.call(
            "/v3/kv/txn",
            json!({ "compare": [compare], "success": [{ "request_put": put }] }),
        )?;
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }

    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<()> {
        let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if let Some(l) = lease {
            body["lease"] = json!(l.to_string());
        }
        self.call("/v3/kv/put", body)?;
        Ok(())
    }

    /// Deletes `key` only if it is still at `mod_revision`. Returns whether
    /// it was deleted.
    pub fn delete_if(&self, key: &str, mod_revision: i64) -> Result<bool> {
        let v = self.call(
            "/v3/kv/txn",
            json!({
                "compare": [{ "key": B64.encode(key), "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision.to_string() }],
                "success": [{ "request_delete_range": { "key": B64.encode(key) } }],
            }),
        )?;
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }

    pub fn lease_grant(&self, ttl_secs: i64) -> Result<i64> {
        let v = self.call("/v3/lease/grant", json!({ "TTL": ttl_secs.to_string() }))?;
        let id = int(&v["ID"]);
        if id == 0 {
            bail!("etcd granted no lease: {v}");
        }
        Ok(id)
    }

    /// Renews the lease; an error if it has expired (its keys are gone).
    pub fn lease_keepalive(&self, id: i64) -> Result<()> {
        let v = self.call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))?;
        if int(&v["result"]["TTL"]) <= 0 {
            bail!("etcd lease {id:x} expired");
        }
        Ok(())
    }

    /// Ends the lease now, and with it every key bound to it.
    pub fn lease_revoke(&self, id: i64) -> Result<()> {
        match self.call("/v3/lease/revoke", json!({ "ID": id.to_string() })) {
            Ok(_) => Ok(()),
            // Already gone is what revoking wanted.
            Err(e) if e.to_string().contains("requested lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// etcd's `/health` on the first endpoint that answers.
    pub fn healthy(&self) -> Result<()> {
        let mut last = None;
        for ep in &self.endpoints {
            let url = format!("{ep}/health");
            match self.agent.get(&url).call() {
                Ok(resp) => {
                    let v = read_json(resp.into_reader(), &url)?;
                    if v["health"].as_str() == Some("true") {
                        return Ok(());
                    }
                    last = Some(anyhow!("etcd {url} is not healthy: {v}"));
                }
                Err(e) => last = Some(anyhow!("etcd {url}: {e}")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no etcd endpoint")))
    }

    /// Streams the changes under `prefix` from `start_revision` on, calling
    /// `on_events` with each batch and the revision it brings the store to.
    /// Returns when `on_events` answers false, with an error when the stream
    /// breaks or the revision was compacted (read a new snapshot then).
    /// `idle` bounds how long a silent stream is trusted: etcd is asked for
    /// progress messages, so silence that long means a dead peer.
    pub fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
        idle: Duration,
        mut on_events: impl FnMut(i64, Vec<Event>) -> bool,
    ) -> Result<()> {
        let body = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
            "progress_notify": true,
        }});
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout_read(idle)
            .redirects(0)
            .build();
        let mut last = None;
        for ep in &self.endpoints {
            let url = format!("{ep}/v3/watch");
            let resp = match agent.post(&url).send_json(body.clone()) {
                Ok(r) => r,
                Err(e) => {
                    last = Some(anyhow!("etcd {url}: {e}"));
                    continue;
                }
            };
            let mut lines = BufReader::new(resp.into_reader());
            loop {
                let mut line = Vec::new();
                let n = (&mut lines)
                    .take(MAX_ANSWER + 1)
                    .read_until(b'\n', &mut line)
                    .with_context(|| format!("reading the watch stream from {url}"))?;
                if n == 0 {
                    bail!("etcd {url} closed the watch stream");
                }
                if n as u64 > MAX_ANSWER {
                    bail!("etcd {url} sent a watch message over {MAX_ANSWER} bytes");
                }
                let msg: Value = serde_json::from_slice(&line)
                    .with_context(|| format!("etcd {url} sent a watch message that is not JSON"))?;
                if let Some(err) = msg.get("error") {
                    bail!("etcd {url} ended the watch: {err}");
                }
                let r = &msg["result"];
                if r["canceled"].as_bool() == Some(true) || int(&r["compact_revision"]) > 0 {
                    bail!(
                        "etcd {url} cancelled the watch (compacted to revision {}): {}",
                        int(&r["compact_revision"]),
                        r["cancel_reason"].as_str().unwrap_or("no reason given")
                    );
                }
                let mut events = Vec::new();
                for ev in r["events"].as_array().into_iter().flatten() {
                    let key = key_of(&ev["kv"])?;
                    events.push(match ev["type"].as_str() {
                        Some("DELETE") => Event::Delete { key },
                        _ => Event::Put {
                            key,
                            value: decode(&ev["kv"]["value"])?,
                        },
                    });
                }
                let revision = int(&r["header"]["revision"]);
                if !on_events(revision, events) {
                    return Ok(());
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no etcd endpoint")))
    }
}

/// A local copy of every key under a prefix, kept current by a watch: readers
/// answer from it and never wait on etcd.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub revision: i64,
    pub entries: BTreeMap<String, Vec<u8>>,
}

impl Mirror {
    pub fn from_snapshot(s: Snapshot) -> Mirror {
        Mirror {
            revision: s.revision,
            entries: s.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
        }
    }

    /// Applies a watch batch; whether anything changed.
    pub fn apply(&mut self, revision: i64, events: Vec<Event>) -> bool {
        let mut changed = false;
        for ev in events {
            changed |= match ev {
                Event::Put { key, value } => self.entries.insert(key, value.clone()) != Some(value),
                Event::Delete { key } => self.entries.remove(&key).is_some(),
            };
        }
        self.revision = self.revision.max(revision);
        changed
    }
}

fn read_json(reader: impl Read, url: &str) -> Result<Value> {
    let mut body = Vec::new();
    reader
        .take(MAX_ANSWER + 1)
        .read_to_end(&mut body)
        .with_context(|| format!("reading etcd's answer from {url}"))?;
    if body.len() as u64 > MAX_ANSWER {
        bail!("etcd {url} answered with over {MAX_ANSWER} bytes");
    }
    serde_json::from_slice(&body).with_context(|| format!("etcd {url} answered with no JSON"))
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn decode(v: &Value) -> Result<Vec<u8>> {
    B64.decode(v.as_str().unwrap_or_default())
        .context("etcd sent invalid base64")
}

fn key_of(kv: &Value) -> Result<String> {
    String::from_utf8(decode(&kv["key"])?).context("etcd key is not UTF-8")
}

/// The smallest key after every key with `prefix` (etcd's range_end idiom).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_bumps_the_last_byte() {
        assert_eq!(super::prefix_end("/a/b/"), b"/a/b0".to_vec());
    }

    #[test]
    fn mirror_applies_puts_and_deletes() {
        let mut m = Mirror::default();
        let put = |k: &str, v: &str| Event::Put {
            key: k.into(),
            value: v.into(),
        };
        assert!(m.apply(5, vec![put("/a", "1"), put("/b", "2")]));
        assert!(!m.apply(6, vec![put("/a", "1")]), "same value: no change");
        assert!(m.apply(7, vec![Event::Delete { key: "/b".into() }]));
        assert!(!m.apply(3, vec![Event::Delete { key: "/b".into() }]));
        assert_eq!(m.revision, 7, "an older batch never moves it back");
        assert_eq!(m.entries.keys().collect::<Vec<_>>(), ["/a"]);
    }

    #[test]
    fn endpoints_must_be_urls() {
        let e = Etcd::new(&["10.0.0.5:2379".into()]).unwrap_err();
        assert!(e.to_string().contains("write it as a URL"), "{e}");
        assert!(Etcd::new(&[]).is_err());
    }
}
