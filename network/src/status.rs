//! `host net status`: what this node leased, its peers as etcd has them,
//! and cairn's routes as the kernel has them.

use std::path::Path;

use anyhow::Result;
use cairn_contracts::network::{read_node_network, Ipv4Net, NodeNetwork, ETCD_SUBNETS_PREFIX};
use cairn_etcd::Etcd;
use serde::Serialize;

use crate::lease::parse_record;
use crate::links::{self, InstalledRoute};

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// None: the node is not in a fleet network (single-node bridge).
    pub node: Option<NodeNetwork>,
    /// "ok", or why etcd could not be read.
    pub etcd: String,
    pub peers: Vec<Peer>,
    pub routes: Vec<InstalledRoute>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Peer {
    pub subnet: String,
    pub hostname: String,
    pub node: String,
    pub underlay: String,
    /// Whether the kernel has a route of cairn's to it.
    pub routed: bool,
}

pub fn status(node_network: &Path) -> Result<Status> {
    let node = read_node_network(node_network)?;
    let routes = links::installed_routes()?;
    let mut peers = Vec::new();
    let mut etcd_state = "not configured".to_string();
    if let Some(n) = &node {
        match Etcd::new(&n.etcd_endpoints).and_then(|e| e.snapshot(ETCD_SUBNETS_PREFIX)) {
            Ok(snap) => {
                etcd_state = "ok".into();
                for kv in snap.kvs {
                    let (Some(net), Some(rec)) =
                        (Ipv4Net::from_etcd_key(&kv.key), parse_record(&kv.value))
                    else {
                        continue;
                    };
                    if net.to_string() == n.subnet {
                        continue;
                    }
                    peers.push(Peer {
                        subnet: net.to_string(),
                        routed: routes.iter().any(|r| r.destination == net.to_string()),
                        hostname: rec.hostname,
                        node: rec.node,
                        underlay: rec.underlay.to_string(),
                    });
                }
            }
            Err(e) => etcd_state = format!("{e:#}"),
        }
    }
    Ok(Status {
        node,
        etcd: etcd_state,
        peers,
        routes,
    })
}
