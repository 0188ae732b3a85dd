//! What cairn reads from an OSTree commit: version, timestamp, packages, kernel.

use anyhow::{Context, Result};
use cairn_contracts::metadata as meta_keys;
use ostree::gio;
use ostree::glib;
use ostree::prelude::*;

/// The metadata of one commit that status and upgrade show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub checksum: String,
    pub version: Option<String>,
    /// Seconds since the epoch (the commit's own timestamp).
    pub timestamp: u64,
    pub parent: Option<String>,
    /// `cairn.packages`: sorted `name=version` strings (empty if absent).
    pub packages: Vec<String>,
    pub has_packages: bool,
    /// `cairn.kargs`: the kernel arguments the manifest asks for (empty if absent).
    pub kargs: Vec<String>,
}

impl CommitInfo {
    pub fn load(repo: &ostree::Repo, checksum: &str) -> Result<Self> {
        let (commit, _state) = repo
            .load_commit(checksum)
            .with_context(|| format!("loading commit {checksum} from the sysroot repo"))?;
        Ok(Self::from_variant(checksum, &commit))
    }

    pub fn from_variant(checksum: &str, commit: &glib::Variant) -> Self {
        let meta = glib::VariantDict::new(Some(&commit.child_value(0)));
        let version = meta.lookup::<String>(meta_keys::VERSION).ok().flatten();
        let packages = meta
            .lookup::<Vec<String>>(meta_keys::PACKAGES)
            .ok()
            .flatten();
        CommitInfo {
            checksum: checksum.to_string(),
            version,
            timestamp: ostree::commit_get_timestamp(commit),
            parent: ostree::commit_get_parent(commit).map(|p| p.to_string()),
            has_packages: packages.is_some(),
            kargs: meta
                .lookup::<Vec<String>>(meta_keys::KARGS)
                .ok()
                .flatten()
                .unwrap_or_default(),
            packages: packages.unwrap_or_default(),
        }
    }

    /// "1.2 (abcdef012345)" or just the short checksum.
    pub fn describe(&self) -> String {
        describe(self.version.as_deref(), &self.checksum)
    }

    pub fn timestamp_rfc3339(&self) -> String {
        format_timestamp(self.timestamp)
    }
}

/// How a commit is named to people: "1.2 (abcdef012345)", or just the
/// short checksum of a commit without a version.
pub fn describe(version: Option<&str>, checksum: &str) -> String {
    match version {
        Some(v) => format!("{v} ({})", short(checksum)),
        None => short(checksum).to_string(),
    }
}

pub fn short(checksum: &str) -> &str {
    &checksum[..checksum.len().min(12)]
}

pub fn format_timestamp(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| secs.to_string())
}

/// The kernel and initramfs a commit carries, as libostree finds them
/// (`/usr/lib/modules/$KVER/{vmlinuz,initramfs.img}`): object checksums and sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    pub kernel_version: String,
    pub files: Vec<(String, u64)>,
}

impl BootFiles {
    pub fn size(&self) -> u64 {
        self.files.iter().map(|(_, s)| s).sum()
    }
}

pub fn boot_files(repo: &ostree::Repo, checksum: &str) -> Result<Option<BootFiles>> {
    let (root, _) = repo
        .read_commit(checksum, gio::Cancellable::NONE)
        .with_context(|| format!("reading the tree of commit {checksum}"))?;
    let modules = root.resolve_relative_path("usr/lib/modules");
    let Ok(children) = modules.enumerate_children(
        "standard::name,standard::type",
        gio::FileQueryInfoFlags::NOFOLLOW_SYMLINKS,
        gio::Cancellable::NONE,
    ) else {
        return Ok(None);
    };
    for info in children.flatten() {
        if info.file_type() != gio::FileType::Directory {
            continue;
        }
        let kver = info.name().to_string_lossy().to_string();
        let dir = modules.child(&kver);
        let mut files = Vec::new();
        for name in ["vmlinuz", "initramfs.img"] {
            let f = dir.child(name);
            let Ok(fi) = f.query_info(
                "standard::size",
                gio::FileQueryInfoFlags::NOFOLLOW_SYMLINKS,
                gio::Cancellable::NONE,
            ) else {
                continue;
            };
            let rf = f
                .downcast::<ostree::RepoFile>()
                .map_err(|_| anyhow::anyhow!("{kver}/{name} in {checksum} is not a repo file"))?;
            rf.ensure_resolved()?;
            files.push((rf.checksum().to_string(), fi.size() as u64));
        }
        if files.iter().any(|_| true) && dir.child("vmlinuz").query_exists(gio::Cancellable::NONE) {
            return Ok(Some(BootFiles {
                kernel_version: kver,
                files,
            }));
        }
    }
    Ok(None)
}
