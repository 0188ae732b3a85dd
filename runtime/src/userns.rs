//! User namespaces for containers: each container gets its own disjoint
//! range of host uids and gids (as podman's `--userns=auto` does), so root
//! inside a container is an unprivileged, otherwise unused uid on the host.
//!
//! Ranges are handed out from a fixed pool, one claim file per range under
//! `<root>/userns/` (created with `O_EXCL`, so two starts never share one),
//! and freed when the container is removed. The image's files keep their
//! owners: the launcher mounts the image tree and volumes *idmapped*
//! through the range (see `container.rs`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// First host id of the pool. Far above any distribution's users and
/// `/etc/subuid` defaults (100000…), below 2^31 so no tool sees a negative id.
pub const POOL_START: u32 = 0x4000_0000;
/// Ids per container: 0–65535 inside, the whole 16-bit range images use.
pub const RANGE_SIZE: u32 = 65536;
/// Ranges in the pool (up to 0x8000_0000).
pub const POOL_RANGES: u32 = 16384;

/// One container's ids: container id `n` is host id `host_start + n`, for
/// `n < size`; the same mapping for uids and gids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub host_start: u32,
    pub size: u32,
}

impl IdRange {
    /// The line the kernel takes in `/proc/PID/uid_map` and `gid_map`.
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.host_start, self.size)
    }
    /// The host id of container id `id`, if the range covers it.
    pub fn host_id(&self, id: u32) -> Option<u32> {
        (id < self.size).then(|| self.host_start + id)
    }
}

/// Hands out [`IdRange`]s from the pool, one claim file each.
pub struct Allocator {
    dir: PathBuf,
}

impl Allocator {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn claim_path(&self, slot: u32) -> PathBuf {
        self.dir.join(format!("{}", POOL_START + slot * RANGE_SIZE))
    }

    /// Claim the first free range for container `id`.
    pub fn allocate(&self, id: &str) -> Result<IdRange> {
        crate::state::create_private_dir(&self.dir)?;
        for slot in 0..POOL_RANGES {
            let path = self.claim_path(slot);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(id.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(IdRange {
                        host_start: POOL_START + slot * RANGE_SIZE,
                        size: RANGE_SIZE,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        bail!(
            "all {POOL_RANGES} user namespace ranges in {} are taken: remove containers (host app rm)",
            self.dir.display()
        )
    }

    /// Free the range of container `id`; a range claimed by another id is left alone.
    pub fn release(&self, id: &str, range: &IdRange) -> Result<()> {
        let Some(slot) = range
            .host_start
            .checked_sub(POOL_START)
            .map(|o| o / RANGE_SIZE)
        else {
            return Ok(());
        };
        let path = self.claim_path(slot);
        match std::fs::read_to_string(&path) {
            Ok(owner) if owner == id => {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_disjoint_and_freed_only_by_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(&dir.path().join("userns"));
        let r1 = a.allocate("one").unwrap();
        let r2 = a.allocate("two").unwrap();
        assert_eq!(r1.host_start, POOL_START);
        assert_eq!(r2.host_start, POOL_START + RANGE_SIZE);
        assert_eq!(r1.map_line(), format!("0 {POOL_START} 65536\n"));
        assert_eq!(r1.host_id(1000), Some(POOL_START + 1000));
        assert_eq!(r1.host_id(RANGE_SIZE), None);
        // Someone else's id does not free it.
        a.release("two", &r1).unwrap();
        assert_eq!(
            a.allocate("three").unwrap().host_start,
            POOL_START + 2 * RANGE_SIZE
        );
        a.release("one", &r1).unwrap();
        assert_eq!(a.allocate("four").unwrap(), r1);
    }
}
