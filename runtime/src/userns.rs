//! User namespaces for containers: each container gets its own disjoint
//! range of host uids and gids (as podman's `--userns=auto` does), so root
//! inside a container is an unprivileged, otherwise unused uid on the host.
//!
//! Ranges are handed out from a fixed pool, claimed in one table file
//! (`<root>/userns.claims`, changed under a lock, so two starts never share
//! one), and freed when the container is removed. The image's files keep their
//! owners: the launcher mounts the image tree and volumes *idmapped*
//! through the range (see `container.rs`).

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

/// Bytes of one slot of the claims table: the owning container's id,
/// NUL-padded; all NULs is a free slot.
const SLOT: usize = 32;

/// Hands out [`IdRange`]s from the pool. The claims are one table file,
/// a [`SLOT`]-byte record per range, changed under an exclusive `flock`:
/// a claim rewrites bytes in place instead of making a file, which on a
/// busy ext4 costs a start a good part of a millisecond.
pub struct Allocator {
    table: PathBuf,
}

impl Allocator {
    pub fn new(table: &Path) -> Self {
        Self {
            table: table.to_path_buf(),
        }
    }

    /// The table, open and locked (the lock goes with the file).
    fn open_locked(&self) -> Result<nix::fcntl::Flock<std::fs::File>> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.table)
            .with_context(|| format!("opening {}", self.table.display()))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", self.table.display()))
    }

    fn slot_bytes(id: &str) -> Result<[u8; SLOT]> {
        if id.is_empty() || id.len() > SLOT || id.bytes().any(|b| b == 0) {
            bail!("container id {id:?} cannot own a user namespace range (1-{SLOT} bytes, no NUL)");
        }
        let mut b = [0u8; SLOT];
        b[..id.len()].copy_from_slice(id.as_bytes());
        Ok(b)
    }

    /// Claim the first free range for container `id`.
    pub fn allocate(&self, id: &str) -> Result<IdRange> {
        use std::os::unix::fs::FileExt;
        let owner = Self::slot_bytes(id)?;
        let f = self.open_locked()?;
        let len = f.metadata()?.len();
        let mut chunk = vec![0u8; 128 * SLOT];
        let mut slot = 0u32;
        while slot < POOL_RANGES && u64::from(slot) * (SLOT as u64) < len {
            let at = u64::from(slot) * SLOT as u64;
            let n = f
                .read_at(&mut chunk, at)
                .with_context(|| format!("reading {}", self.table.display()))?;
            if n < SLOT {
                break;
            }
            match chunk[..n - n % SLOT]
                .chunks(SLOT)
                .position(|c| c.iter().all(|&b| b == 0))
            {
                Some(free) => {
                    slot += free as u32;
                    break;
                }
                None => slot += (n / SLOT) as u32,
            }
        }
        if slot >= POOL_RANGES {
            bail!(
                "all {POOL_RANGES} user namespace ranges in {} are taken: remove containers (host app rm)",
                self.table.display()
            );
        }
        f.write_all_at(&owner, u64::from(slot) * SLOT as u64)
            .with_context(|| format!("writing {}", self.table.display()))?;
        Ok(IdRange {
            host_start: POOL_START + slot * RANGE_SIZE,
            size: RANGE_SIZE,
        })
    }

    /// Free the range of container `id`; a range claimed by another id is left alone.
    pub fn release(&self, id: &str, range: &IdRange) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(slot) = range
            .host_start
            .checked_sub(POOL_START)
            .map(|o| o / RANGE_SIZE)
            .filter(|&s| s < POOL_RANGES)
        else {
            return Ok(());
        };
        let owner = Self::slot_bytes(id)?;
        let f = self.open_locked()?;
        let at = u64::from(slot) * SLOT as u64;
        let mut held = [0u8; SLOT];
        if f.read_exact_at(&mut held, at).is_ok() && held == owner {
            f.write_all_at(&[0u8; SLOT], at)
                .with_context(|| format!("writing {}", self.table.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_disjoint_and_freed_only_by_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(&dir.path().join("userns.claims"));
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

    #[test]
    fn concurrent_claims_never_share_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("userns.claims");
        let starts = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|t| {
                    let table = &table;
                    s.spawn(move || {
                        (0..100)
                            .map(|i| {
                                Allocator::new(table)
                                    .allocate(&format!("{t}-{i}"))
                                    .unwrap()
                                    .host_start
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect::<Vec<_>>()
        });
        let distinct: std::collections::HashSet<_> = starts.iter().collect();
        assert_eq!(distinct.len(), 400);
        assert_eq!(*starts.iter().max().unwrap(), POOL_START + 399 * RANGE_SIZE);
    }

    #[test]
    fn a_torn_slot_stays_taken_and_a_full_pool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("userns.claims");
        // A claim cut short by a power cut: one byte of an id.
        std::fs::write(&table, b"x").unwrap();
        let a = Allocator::new(&table);
        assert_eq!(
            a.allocate("one").unwrap().host_start,
            POOL_START,
            "a short table ends before slot 0 is whole: it is free"
        );
        let mut torn = vec![0u8; 2 * SLOT];
        torn[SLOT + 5] = b'z';
        std::fs::write(&table, &torn).unwrap();
        assert_eq!(a.allocate("two").unwrap().host_start, POOL_START);
        assert_eq!(
            a.allocate("three").unwrap().host_start,
            POOL_START + 2 * RANGE_SIZE,
            "a slot with any byte set is taken"
        );
        std::fs::write(&table, vec![b'f'; POOL_RANGES as usize * SLOT]).unwrap();
        let err = a.allocate("four").unwrap_err().to_string();
        assert!(err.contains("are taken"), "{err}");
        assert!(Allocator::slot_bytes(&"a".repeat(SLOT + 1)).is_err());
        assert!(Allocator::slot_bytes("a\0b").is_err());
    }
}
