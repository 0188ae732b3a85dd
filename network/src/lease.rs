//! Subnet leases: each node holds one subnet of the fleet CIDR as an etcd
//! key created by compare-and-swap and bound to an etcd lease the node
//! keeps alive. A node that goes silent loses its subnet when the lease's
//! TTL (the subnet grace) runs out; a node that comes back in time finds
//! its own record by machine id and rebinds it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cairn_contracts::network::{
    FleetAgreement, FleetNetwork, Ipv4Net, SubnetRecord, ETCD_CONFIG_KEY, ETCD_SUBNETS_PREFIX,
};
use cairn_etcd::Etcd;
use sha2::{Digest, Sha256};

/// A subnet this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub subnet: Ipv4Net,
    pub lease: i64,
    /// Whether it is the subnet this node held before (same record or the
    /// one remembered in the state directory).
    pub reclaimed: bool,
}

pub struct Leaser {
    etcd: Etcd,
    cidr: Ipv4Net,
    node_prefix: u8,
    ttl_secs: i64,
    /// The subnet held last, kept across reboots.
    memory: PathBuf,
}

/// A record that does not parse is another program's key or a hostile one:
/// it still occupies its subnet, but is never routed to.
pub fn parse_record(value: &[u8]) -> Option<SubnetRecord> {
    if value.len() > 4096 {
        return None;
    }
    serde_json::from_slice(value).ok()
}

impl Leaser {
    pub fn new(etcd: Etcd, cfg: &FleetNetwork, state_dir: &Path) -> Result<Leaser> {
        Ok(Leaser {
            etcd,
            cidr: cfg.cidr()?,
            node_prefix: cfg.node_prefix,
            ttl_secs: cfg.subnet_grace()?.as_secs().max(1) as i64,
            memory: state_dir.join("subnet"),
        })
    }

    /// The fleet's CIDR and node prefix: the first node writes them, every
    /// other node must have the same, or it would route into subnets that
    /// overlap its peers'.
    pub fn agree(&self) -> Result<()> {
        let ours = FleetAgreement {
            cidr: self.cidr.to_string(),
            node_prefix: self.node_prefix,
        };
        let bytes = serde_json::to_vec(&ours)?;
        if self.etcd.put_if(ETCD_CONFIG_KEY, None, &bytes)? {
            return Ok(());
        }
        let Some(found) = self.etcd.get(ETCD_CONFIG_KEY)? else {
            bail!("etcd key {ETCD_CONFIG_KEY} vanished while it was being checked; try again");
        };
        let theirs: FleetAgreement = serde_json::from_slice(&found.value)
            .with_context(|| format!("etcd key {ETCD_CONFIG_KEY} is not a cairn fleet network"))?;
        if theirs != ours {
            bail!(
                "this node is configured for cidr {} with /{} subnets, but the fleet in etcd uses {} with /{} (key {ETCD_CONFIG_KEY}): fix cidr and node-prefix in the node's network.toml",
                ours.cidr,
                ours.node_prefix,
                theirs.cidr,
                theirs.node_prefix
            );
        }
        Ok(())
    }

    fn remembered(&self) -> Option<Ipv4Net> {
        let text = std::fs::read_to_string(&self.memory).ok()?;
        let net: Ipv4Net = text.trim().parse().ok()?;
        (net.prefix == self.node_prefix && self.cidr.covers(&net)).then_some(net)
    }

    /// Leases a subnet for `record.node`: its own record if etcd still has
    /// it, else the subnet it held last if free, else a free one (searched
    /// from a place derived from the machine id, so nodes starting together
    /// rarely race for the same key).
    pub fn acquire(&self, record: &SubnetRecord) -> Result<Held> {
        let value = serde_json::to_vec(record)?;
        let lease = self.etcd.lease_grant(self.ttl_secs)?;
        let held = self.acquire_with(record, &value, lease);
        match held {
            Ok(h) => {
                cairn_contracts::durable::write(&self.memory, format!("{}\n", h.subnet).as_bytes())
                    .with_context(|| {
                        format!("remembering the subnet in {}", self.memory.display())
                    })?;
                Ok(h)
            }
            Err(e) => {
                let _ = self.etcd.lease_revoke(lease);
                Err(e)
            }
        }
    }

    fn acquire_with(&self, record: &SubnetRecord, value: &[u8], lease: i64) -> Result<Held> {
        let snap = self.etcd.snapshot(ETCD_SUBNETS_PREFIX)?;
        let mut taken = std::collections::BTreeSet::new();
        for kv in &snap.kvs {
            let Some(net) = Ipv4Net::from_etcd_key(&kv.key) else {
                continue;
            };
            taken.insert(net);
            let ours = parse_record(&kv.value).is_some_and(|r| r.node == record.node);
            if ours && net.prefix == self.node_prefix && self.cidr.covers(&net) {
                // Rebind our record to the new lease, unless it changed under us.
                if self
                    .etcd
                    .put_if_leased(&kv.key, Some(kv.mod_revision), value, Some(lease))?
                {
                    return Ok(Held {
                        subnet: net,
                        lease,
                        reclaimed: true,
                    });
                }
            }
        }
        // Any overlap counts: a key of another length blocks what it covers.
        let free = |net: &Ipv4Net| !taken.iter().any(|t| t.covers(net) || net.covers(t));
        // The remembered subnet first, then every other in search order.
        let count = self.cidr.subnet_count(self.node_prefix);
        let start = start_index(&record.node, count);
        let remembered = self.remembered();
        let candidates = remembered.into_iter().chain((0..count).filter_map(|i| {
            self.cidr
                .subnet(self.node_prefix, ((start + i) % count) as u32)
        }));
        for net in candidates.filter(|n| free(n)) {
            if self
                .etcd
                .put_if_leased(&net.etcd_key(), None, value, Some(lease))?
            {
                return Ok(Held {
                    subnet: net,
                    lease,
                    reclaimed: Some(net) == remembered,
                });
            }
        }
        bail!(
            "no free /{} subnet left in {} ({} leased): widen cidr or lengthen node-prefix",
            self.node_prefix,
            self.cidr,
            taken.len()
        )
    }

    /// Rewrites our record (say, a new VXLAN MAC), still bound to the lease.
    pub fn update(&self, held: &Held, record: &SubnetRecord) -> Result<()> {
        self.etcd.put(
            &held.subnet.etcd_key(),
            &serde_json::to_vec(record)?,
            Some(held.lease),
        )
    }

    pub fn keepalive(&self, held: &Held) -> Result<()> {
        self.etcd.lease_keepalive(held.lease)
    }

    /// Gives the subnet back now (a node leaving the fleet for good).
    pub fn release(&self, held: &Held) -> Result<()> {
        self.etcd.lease_revoke(held.lease)?;
        let _ = std::fs::remove_file(&self.memory);
        Ok(())
    }
}

fn start_index(node: &str, count: u64) -> u64 {
    let d = Sha256::digest(node.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % count.max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn start_index_spreads_and_stays_in_range() {
        let a = super::start_index("a", 1024);
        let b = super::start_index("b", 1024);
        assert!(a < 1024 && b < 1024);
        assert_ne!(a, b);
        assert_eq!(super::start_index("x", 0), 0);
    }
}
