//! Resource limits: parsing what users type, and writing cgroup v2 files.
//! The writer takes the cgroup root as a path so tests run it against a
//! temp dir.

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
}

/// `256M`, `1.5G`, `512k`, `1048576`, with binary multiples.
pub fn parse_memory(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => bail!(
                    "memory limit {s:?}: unknown unit {c:?} (use a number of bytes, or k, m, g, t)"
                ),
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let v: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .with_context(|| format!("memory limit {s:?} is not a positive size like 256M or 1G"))?;
    let bytes = (v * mult as f64) as u64;
    if bytes < 1 << 20 {
        bail!("memory limit {s:?} is below 1M: the container could not start");
    }
    Ok(bytes)
}

/// `0.5` → 50000 µs of every 100000 µs.
pub fn parse_cpus(s: &str) -> Result<u64> {
    let v: f64 = s
        .trim()
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .with_context(|| format!("--cpus {s:?} is not a positive number of CPUs like 0.5 or 2"))?;
    let quota = (v * CPU_PERIOD_US as f64).round() as u64;
    if quota < 1000 {
        bail!("--cpus {s:?} is below 0.01 CPUs");
    }
    Ok(quota)
}

pub fn parse_pids(s: &str) -> Result<u64> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .with_context(|| format!("--pids {s:?} is not a positive whole number"))
}

pub fn parse_cpu_weight(s: &str) -> Result<u64> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|v| (1..=10000).contains(v))
        .with_context(|| format!("--cpu-weight {s:?} must be a whole number from 1 to 10000"))
}

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

    pub fn add_process(&self, name: &str, pid: i32) -> Result<()> {
        write(&self.path(name).join("cgroup.procs"), &pid.to_string())
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

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_syntax() {
        assert_eq!(parse_memory("256M").unwrap(), 256 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_memory("2097152").unwrap(), 2 << 20);
        let e = parse_memory("12Q").unwrap_err().to_string();
        assert!(e.contains("unknown unit 'Q'"), "{e}");
        assert!(parse_memory("-1M").is_err());
        assert!(
            parse_memory("12").is_err(),
            "12 bytes is too small to run anything"
        );
        assert!(parse_memory("M").is_err());
        assert_eq!(parse_cpus("0.5").unwrap(), 50_000);
        assert_eq!(parse_cpus("2").unwrap(), 200_000);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("half").is_err());
        assert_eq!(parse_pids("256").unwrap(), 256);
        assert!(parse_pids("0").is_err());
        assert!(parse_cpu_weight("10001").is_err());
        assert_eq!(parse_cpu_weight("100").unwrap(), 100);
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
        m.add_process("web", 4242).unwrap();
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
