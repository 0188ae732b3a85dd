//! Reboot coordination with the FleetLock protocol, both ends.
//!
//! A node asks for a reboot slot before it reboots into a new deployment
//! (`POST <base>/v1/pre-reboot`) and gives it back once the new boot is
//! healthy (`POST <base>/v1/steady-state`); each request carries the header
//! `fleet-lock-protocol: true` and `{"client_params":{"id":…,"group":…}}`;
//! 200 means granted. The client works with any FleetLock server (airlock on
//! etcd, fleetlock on Kubernetes); [`server`] is cairn's own, on etcd.

pub mod server;

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

pub const PROTOCOL_HEADER: &str = "fleet-lock-protocol";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientParams {
    pub id: String,
    pub group: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub client_params: ClientParams,
}

/// The body of every non-200 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: String,
    pub value: String,
}

/// What a server said to a lock request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Granted,
    /// Not now (e.g. every slot of the group is taken); try again later.
    Denied {
        status: u16,
        kind: String,
        value: String,
    },
}

/// A node's side of the protocol.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    params: ClientParams,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, id: &str, group: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            params: ClientParams {
                id: id.to_string(),
                group: group.to_string(),
            },
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .build(),
        }
    }

    /// Ask for a reboot slot.
    pub fn pre_reboot(&self) -> Result<Answer> {
        self.post("/v1/pre-reboot")
    }

    /// Give the slot back (the new boot is healthy).
    pub fn steady_state(&self) -> Result<Answer> {
        self.post("/v1/steady-state")
    }

    fn post(&self, path: &str) -> Result<Answer> {
        let url = format!("{}{path}", self.base);
        let body = Request {
            client_params: self.params.clone(),
        };
        match self
            .agent
            .post(&url)
            .set(PROTOCOL_HEADER, "true")
            .send_json(serde_json::to_value(&body)?)
        {
            Ok(_) => Ok(Answer::Granted),
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let err: ErrorBody = serde_json::from_str(&text).unwrap_or(ErrorBody {
                    kind: "unknown".into(),
                    value: text,
                });
                Ok(Answer::Denied {
                    status,
                    kind: err.kind,
                    value: err.value,
                })
            }
            Err(e) => {
                Err(anyhow!(e)).with_context(|| format!("FleetLock server {url} unreachable"))
            }
        }
    }
}
