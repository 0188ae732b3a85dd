//! The few etcd v3 operations the FleetLock server needs, over etcd's JSON
//! gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/lease/*`): plain HTTP, so
//! no gRPC stack and no async runtime for four calls.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

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

impl Etcd {
    /// `endpoints`: client URLs such as `http://127.0.0.1:2379`.
    pub fn new(endpoints: &[String]) -> Result<Etcd> {
        if endpoints.is_empty() {
            bail!("no etcd endpoint given");
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build();
        Ok(Etcd {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            agent,
        })
    }

    /// Posts to the first endpoint that answers.
    fn call(&self, path: &str, body: Value) -> Result<Value> {
        let mut last = None;
        for ep in &self.endpoints {
            let url = format!("{ep}{path}");
            match self.agent.post(&url).send_json(body.clone()) {
                Ok(resp) => {
                    return resp
                        .into_json::<Value>()
                        .with_context(|| format!("reading etcd's answer from {url}"))
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    last = Some(anyhow!("etcd {url} answered {code}: {text}"));
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
        let v = self.call(
            "/v3/kv/range",
            json!({ "key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix)) }),
        )?;
        let mut out = Vec::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            let key = String::from_utf8(decode(&kv["key"])?).context("etcd key is not UTF-8")?;
            out.push((key, decode(&kv["value"])?));
        }
        Ok(out)
    }

    /// Writes `value` only if the key is still at `expected` (`None`: the key
    /// must not exist). Returns whether the write happened.
    pub fn put_if(&self, key: &str, expected: Option<i64>, value: &[u8]) -> Result<bool> {
        let compare = match expected {
            Some(rev) => {
                json!({ "key": B64.encode(key), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string() })
            }
            None => {
                json!({ "key": B64.encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
            }
        };
        let v = self.call(
            "/v3/kv/txn",
            json!({
                "compare": [compare],
                "success": [{ "request_put": { "key": B64.encode(key), "value": B64.encode(value) } }],
            }),
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

    pub fn lease_grant(&self, ttl_secs: i64) -> Result<i64> {
        let v = self.call("/v3/lease/grant", json!({ "TTL": ttl_secs.to_string() }))?;
        let id = int(&v["ID"]);
        if id == 0 {
            bail!("etcd granted no lease: {v}");
        }
        Ok(id)
    }

    pub fn lease_keepalive(&self, id: i64) -> Result<()> {
        let v = self.call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))?;
        if int(&v["result"]["TTL"]) <= 0 {
            bail!("etcd lease {id} expired");
        }
        Ok(())
    }
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
    #[test]
    fn prefix_end_bumps_the_last_byte() {
        assert_eq!(super::prefix_end("/a/b/"), b"/a/b0".to_vec());
    }
}
