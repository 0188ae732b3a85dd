//! Resource limits and the cgroup v2 files they go to. Every write to a
//! cgroup file goes through [`CgroupManager`]; what users type is parsed
//! by `host`, so limits arrive here as numbers. The manager takes the
//! cgroup root as a path so tests run it against a temp dir.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Default CFS period used for `--cpus`.
pub const CPU_PERIOD_US: u64 = 100_000;

/// A container's share of the machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// memory.max in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// cpu.max quota in µs per [`CPU_PERIOD_US`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_us: Option<u64>,
    /// cpu.weight, 1..=10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// pids.max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// Refuse values the kernel would reject or no container could run
    /// under, before anything is created.
    pub fn validate(&self) -> Result<()> {
        if self.memory.is_some_and(|m| m < MIN_MEMORY) {
            bail!("memory limit below 1M: the container could not start");
        }
        if self.cpu_quota_us.is_some_and(|q| q < MIN_CPU_QUOTA_US) {
            bail!("CPU limit below 0.01 CPUs");
        }
        if self
            .cpu_weight
            .is_some_and(|w| !(1..=MAX_CPU_WEIGHT).contains(&w))
        {
            bail!("CPU weight must be from 1 to {MAX_CPU_WEIGHT}");
        }
        if self.pids == Some(0) {
            bail!("process limit must be positive");
        }
        Ok(())
    }
}

/// Smallest memory.max a container starts under.
pub const MIN_MEMORY: u64 = 1 << 20;
/// Smallest cpu.max quota (0.01 CPUs of [`CPU_PERIOD_US`]).
pub const MIN_CPU_QUOTA_US: u64 = 1000;
/// cpu.weight's upper bound (the kernel's).
pub const MAX_CPU_WEIGHT: u64 = 10_000;

/// How this host mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Pure v2 at the root (what composed cairn hosts boot with).
    Unified,
    /// Controllers in v1 hierarchies (hybrid or legacy).
    Legacy,
}

pub fn detect(root: &Path) -> Layout {
    if root.join("cgroup.controllers").exists() {
        Layout::Unified
    } else {
        Layout::Legacy
    }
}

/// cgroup v2 writer for one slice (`<root>/<slice>/<name>`).
#[derive(Debug, Clone)]
pub struct CgroupManager {
    pub root: PathBuf,
    pub slice: String,
}

impl CgroupManager {
    pub fn new(root: impl Into<PathBuf>, slice: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            slice: slice.into(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(&self.slice).join(name)
    }

    /// Refuse limits where they cannot be enforced, before anything is created.
    pub fn check_supported(&self, limits: &Limits) -> Result<()> {
        if !limits.is_empty() && detect(&self.root) != Layout::Unified {
            bail!(
                "resource limits need the unified cgroup v2 hierarchy, but {} holds cgroup v1 controllers \
                 (a hybrid or legacy host); boot with systemd.unified_cgroup_hierarchy=1 as cairn hosts do, \
                 or run without --memory/--cpus/--cpu-weight/--pids",
                self.root.display()
            );
        }
        Ok(())
    }

    /// Create the container's cgroup and write its limits.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<PathBuf> {
        let slice = self.root.join(&self.slice);
        fs::create_dir_all(&slice)
            .with_context(|| format!("creating cgroup {}", slice.display()))?;
        let wanted = ["cpu", "memory", "pids"];
        let available =
            fs::read_to_string(self.root.join("cgroup.controllers")).unwrap_or_default();
        let enable: Vec<String> = wanted
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        for dir in [&self.root, &slice] {
            if !enable.is_empty() {
                write(&dir.join("cgroup.subtree_control"), &enable.join(" "))?;
            }
        }
        let cg = slice.join(name);
        fs::create_dir_all(&cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
        let res = (|| -> Result<()> {
            if let Some(m) = limits.memory {
                write(&cg.join("memory.max"), &m.to_string())?;
                // No swap beyond the limit, so the limit means what it says.
                if cg.join("memory.swap.max").exists() {
                    write(&cg.join("memory.swap.max"), "0")?;
                }
            }
            if let Some(q) = limits.cpu_quota_us {
                write(&cg.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
            }
            if let Some(w) = limits.cpu_weight {
                write(&cg.join("cpu.weight"), &w.to_string())?;
            }
            if let Some(p) = limits.pids {
                write(&cg.join("pids.max"), &p.to_string())?;
            }
            Ok(())
        })();
        if res.is_err() {
            let _ = fs::remove_dir(&cg);
        }
        res.map(|()| cg)
    }

    /// Kill what is left in the cgroup and remove it. Missing is fine.
    pub fn remove(&self, name: &str) -> Result<()> {
        let cg = self.path(name);
        if !cg.exists() {
            return Ok(());
        }
        if cg.join("cgroup.kill").exists() {
            let _ = fs::write(cg.join("cgroup.kill"), "1");
        }
        for _ in 0..100 {
            match fs::remove_dir(&cg) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                // Processes still exiting (EBUSY): give them a moment.
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        fs::remove_dir(&cg).with_context(|| format!("removing cgroup {}", cg.display()))
    }
}

/// Move `pid` (0: the caller) into the cgroup at `dir`, a directory
/// [`CgroupManager::create`] made: for code handed that directory rather
/// than the manager (a container's launch, `exec`), so that it writes no
/// cgroup file itself.
pub fn add_process_at(dir: &Path, pid: i32) -> Result<()> {
    write(&dir.join("cgroup.procs"), &pid.to_string())
}

/// `dir`'s `cgroup.procs`, open for writing, for a process forked later to
/// join the cgroup by writing `0` to it: between fork and exec a child
/// must not allocate, and opening by path would.
pub fn procs_handle(dir: &Path) -> Result<fs::File> {
    let path = dir.join("cgroup.procs");
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_out_of_range() {
        let ok = Limits {
            memory: Some(MIN_MEMORY),
            cpu_quota_us: Some(MIN_CPU_QUOTA_US),
            cpu_weight: Some(MAX_CPU_WEIGHT),
            pids: Some(1),
        };
        ok.validate().unwrap();
        for (bad, msg) in [
            (
                Limits {
                    memory: Some(12),
                    ..ok.clone()
                },
                "below 1M",
            ),
            (
                Limits {
                    cpu_quota_us: Some(0),
                    ..ok.clone()
                },
                "0.01 CPUs",
            ),
            (
                Limits {
                    cpu_weight: Some(0),
                    ..ok.clone()
                },
                "1 to 10000",
            ),
            (
                Limits {
                    cpu_weight: Some(10_001),
                    ..ok.clone()
                },
                "1 to 10000",
            ),
            (
                Limits {
                    pids: Some(0),
                    ..ok.clone()
                },
                "positive",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(msg), "{e}");
        }
    }

    #[test]
    fn writer_against_a_fake_cgroup_root() {
        let root = tempfile::tempdir().unwrap();
        fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let m = CgroupManager::new(root.path(), "cairn.slice");
        let limits = Limits {
            memory: Some(256 << 20),
            cpu_quota_us: Some(50_000),
            cpu_weight: Some(200),
            pids: Some(64),
        };
        m.check_supported(&limits).unwrap();
        let cg = m.create("web", &limits).unwrap();
        assert_eq!(cg, root.path().join("cairn.slice/web"));
        let read = |f: &str| fs::read_to_string(cg.join(f)).unwrap();
        assert_eq!(read("memory.max"), "268435456");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("cpu.weight"), "200");
        assert_eq!(read("pids.max"), "64");
        let sub =
            fs::read_to_string(root.path().join("cairn.slice/cgroup.subtree_control")).unwrap();
        assert_eq!(sub, "+cpu +memory +pids");
        add_process_at(&m.path("web"), 4242).unwrap();
        assert_eq!(read("cgroup.procs"), "4242");
    }

    #[test]
    fn limits_refused_on_a_legacy_layout() {
        let root = tempfile::tempdir().unwrap(); // no cgroup.controllers: v1/hybrid
        let m = CgroupManager::new(root.path(), "cairn.slice");
        m.check_supported(&Limits::default()).unwrap();
        let e = m
            .check_supported(&Limits {
                pids: Some(5),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("unified cgroup v2"), "{e}");
    }
}
