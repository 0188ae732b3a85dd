//! Carries this node's serving instances into etcd: monitors publish one
//! file per container in the registration directory while it runs and is
//! healthy (see contracts::services); the agent puts one key per service
//! under a lease of its own, renewed every few seconds, and deletes a key
//! as soon as its file goes. A node that dies takes its keys along when
//! that lease runs out.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cairn_contracts::network::Ipv4Net;
use cairn_contracts::services::{
    parse_etcd_key, parse_instance, proc_start_time, ETCD_SERVICES_PREFIX, MAX_INSTANCE_BYTES,
};
use cairn_etcd::Etcd;

/// Files read per scan at most: a node runs tens of containers, not more.
const MAX_FILES: usize = 4096;

pub struct Registrar {
    etcd: Etcd,
    dir: PathBuf,
    node: String,
    node_id: String,
    subnet: Ipv4Net,
    ttl_secs: i64,
    lease: Option<i64>,
    /// What is in etcd now, by key.
    published: BTreeMap<String, Vec<u8>>,
}

impl Registrar {
    pub fn new(
        etcd: Etcd,
        dir: &Path,
        node: &str,
        node_id: &str,
        subnet: Ipv4Net,
        ttl_secs: i64,
    ) -> Registrar {
        Registrar {
            etcd,
            dir: dir.to_path_buf(),
            node: node.to_string(),
            node_id: node_id.to_string(),
            subnet,
            ttl_secs,
            lease: None,
            published: BTreeMap::new(),
        }
    }

    /// The keys this node's serving instances should have: every valid
    /// file whose monitor is alive and whose address is on this node.
    /// A bad file is skipped with a line in `skipped`.
    pub fn desired(&self, skipped: &mut Vec<String>) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
            Err(e) => {
                skipped.push(format!("{}: {e}", self.dir.display()));
                return out;
            }
        };
        for entry in entries.flatten().take(MAX_FILES) {
            let path = entry.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let instance = match read_bounded(&path).and_then(|b| parse_instance(&b)) {
                Ok(i) => i,
                Err(e) => {
                    skipped.push(format!("{}: {e:#}", path.display()));
                    continue;
                }
            };
            if instance.container != stem || !self.subnet.contains(instance.address) {
                skipped.push(format!(
                    "{}: container {} at {} is not this node's ({})",
                    path.display(),
                    instance.container,
                    instance.address,
                    self.subnet
                ));
                continue;
            }
            // A monitor killed outright leaves its file: never carry it on.
            if proc_start_time(instance.monitor_pid) != Some(instance.monitor_start) {
                continue;
            }
            let mut instance = instance;
            instance.node = self.node.clone();
            instance.node_id = self.node_id.clone();
            let Ok(value) = serde_json::to_vec(&instance) else {
                continue;
            };
            for s in &instance.services {
                out.insert(instance.etcd_key(&s.name), value.clone());
            }
        }
        out
    }

    /// Removes keys of this node left by an earlier run of the agent.
    pub fn forget_earlier_runs(&mut self) -> Result<()> {
        for kv in self.etcd.snapshot(ETCD_SERVICES_PREFIX)?.kvs {
            if parse_etcd_key(&kv.key).is_some_and(|(_, node, _)| node == self.node_id) {
                self.etcd.delete_if(&kv.key, kv.mod_revision)?;
            }
        }
        Ok(())
    }

    /// Makes etcd hold exactly the desired keys; whether anything changed.
    pub fn sync(&mut self, skipped: &mut Vec<String>) -> Result<bool> {
        let desired = self.desired(skipped);
        if desired == self.published {
            return Ok(false);
        }
        let lease = match self.lease {
            Some(l) => l,
            None => {
                let l = self.etcd.lease_grant(self.ttl_secs)?;
                self.lease = Some(l);
                l
            }
        };
        let gone: Vec<String> = self
            .published
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(v) = self.etcd.get(&key)? {
                self.etcd.delete_if(&key, v.mod_revision)?;
            }
            self.published.remove(&key);
        }
        for (key, value) in desired {
            if self.published.get(&key) != Some(&value) {
                self.etcd
                    .put(&key, &value, Some(lease))
                    .with_context(|| format!("registering {key}"))?;
                self.published.insert(key, value);
            }
        }
        Ok(true)
    }

    /// Renews the lease; if it ran out, every key went with it: publish
    /// them all again under a new one at the next sync.
    pub fn keepalive(&mut self) -> Result<()> {
        let Some(lease) = self.lease else {
            return Ok(());
        };
        match self.etcd.lease_keepalive(lease) {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("expired") => {
                tracing::warn!("the registration lease ran out; registering again");
                self.lease = None;
                self.published.clear();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// How many keys this node has in etcd now.
    pub fn published(&self) -> usize {
        self.published.len()
    }
}

/// Reads a regular file, not through a symlink, at most the size a
/// registration may have.
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if !f.metadata()?.is_file() {
        anyhow::bail!("not a regular file");
    }
    let mut bytes = Vec::new();
    f.take(MAX_INSTANCE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}
