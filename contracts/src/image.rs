//! What an application image is to every crate: its name, its record and
//! where a state root keeps it. The store's layout is a contract between
//! the image store (`cairn-oci`, which writes it through libostree) and the
//! container runtime, which reads a checked-out image without libostree:
//!
//! ```text
//! <repo>                               OSTree repository, refs cairn/app/NAME/TAG (see [`repo_dir`])
//! <root>/checkouts/<commit>/           read-only tree of an image commit
//! <root>/checkouts/<commit>.json       its record ([`ImageInfo`])
//! ```
//!
//! On a booted node the default state root's repository is the host's own
//! (`/ostree/repo`): a pulled image's files are objects next to the host's
//! and the baked apps', each stored once. Any other state root (tests,
//! `--root`) keeps a private `<root>/repo`.
//!
//! Apps baked into a host tree are not in the store: their files are part
//! of the host commit (one OSTree store for host and apps, so an app
//! update is a delta of the files that changed and a rollback needs no
//! import), and containers run from the booted deployment's copy:
//!
//! ```text
//! /usr/lib/cairn/apps/<app>/image.json  its record ([`ImageInfo`], name cairn-app-<app>, tag baked)
//! /usr/lib/cairn/apps/<app>/rootfs/     the image's unpacked layers
//! ```

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Prefix of every image ref in the node repository.
pub const REF_PREFIX: &str = "cairn/app/";

/// A checkout record is a few KiB; anything much larger is not one.
const MAX_RECORD_SIZE: u64 = 1 << 20;

/// What a container needs to know from the image config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

/// An image in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    pub tag: String,
    /// The OSTree ref holding it.
    #[serde(rename = "ref")]
    pub ostree_ref: String,
    /// The OSTree commit of its root file system.
    pub commit: String,
    /// `sha256:…` of the OCI manifest (of the config, for `docker save` input,
    /// which has no manifest blob).
    pub manifest_digest: String,
    pub config: ImageConfig,
}

impl ImageInfo {
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }
}

/// `NAME[:TAG]`, checked so it maps onto an OSTree ref.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    pub name: String,
    pub tag: String,
}

impl ImageName {
    pub fn parse(s: &str) -> Result<Self> {
        let (name, tag) = match s.rsplit_once(':') {
            Some((n, t)) => (n, t),
            None => (s, "latest"),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !name_ok {
            bail!("image name {name:?}: use lowercase letters, digits, '.', '_' and '-' (starting with a letter or digit)");
        }
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.as_bytes()[0].is_ascii_alphanumeric()
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            bail!("image tag {tag:?}: use letters, digits, '.', '_' and '-' (starting with a letter or digit)");
        }
        Ok(Self {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }

    pub fn ostree_ref(&self) -> String {
        format!("{REF_PREFIX}{}/{}", self.name, self.tag)
    }
}

/// A container that uses an image commit (from the runtime's records):
/// such a commit's checkout is kept, and its image cannot be removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InUse {
    pub container: String,
    pub commit: String,
}

/// Where a host tree carries its baked apps (see the module docs).
pub const BAKED_APPS_DIR: &str = "/usr/lib/cairn/apps";
/// A baked app's image is `cairn-app-<app>:baked`.
pub const BAKED_IMAGE_PREFIX: &str = "cairn-app-";
pub const BAKED_TAG: &str = "baked";
/// A baked app's record and root, inside its directory.
pub const BAKED_RECORD: &str = "image.json";
pub const BAKED_ROOTFS: &str = "rootfs";

/// The image name of baked app `app`.
pub fn baked_image_name(app: &str) -> String {
    format!("{BAKED_IMAGE_PREFIX}{app}")
}

/// Reads a record file (a checkout's or a baked app's) without following a
/// symlink, bounded.
fn read_record(path: &Path) -> Option<ImageInfo> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let mut bytes = Vec::new();
    f.take(MAX_RECORD_SIZE).read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A baked app's image, `cairn-app-APP[:baked]` or `cairn-app-APP@sha256:…`,
/// and the root it runs from, read from `apps_dir` (normally
/// [`BAKED_APPS_DIR`]). `None` when the reference names no baked app or
/// anything does not match (a symlinked record or root included).
pub fn resolve_baked(apps_dir: &Path, reference: &str) -> Option<(ImageInfo, PathBuf)> {
    let (name, tag, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, None, Some(d)),
        None => match reference.rsplit_once(':') {
            Some((n, t)) => (n, Some(t), None),
            None => (reference, None, None),
        },
    };
    let app = name.strip_prefix(BAKED_IMAGE_PREFIX)?;
    // One plain directory name: what `[[apps]] name` allows.
    if app.is_empty()
        || !app
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        || tag.is_some_and(|t| t != BAKED_TAG)
    {
        return None;
    }
    let dir = apps_dir.join(app);
    let info = read_record(&dir.join(BAKED_RECORD))?;
    let rootfs = dir.join(BAKED_ROOTFS);
    let is_dir = std::fs::symlink_metadata(&rootfs).ok()?.is_dir();
    let matches = info.name == name
        && info.tag == BAKED_TAG
        && digest.map_or(true, |d| d == info.manifest_digest);
    (is_dir && matches).then_some((info, rootfs))
}

/// Every baked app image under `apps_dir`, sorted by name.
pub fn baked_images(apps_dir: &Path) -> Vec<ImageInfo> {
    let Ok(rd) = std::fs::read_dir(apps_dir) else {
        return Vec::new();
    };
    let mut out: Vec<ImageInfo> = rd
        .flatten()
        .filter_map(|e| {
            let app = e.file_name().into_string().ok()?;
            resolve_baked(apps_dir, &baked_image_name(&app)).map(|(i, _)| i)
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The default state root of a node's container runtime and image store.
pub const DEFAULT_ROOT: &str = "/var/lib/cairn";

/// The booted host's OSTree repository.
pub const HOST_REPO: &str = "/ostree/repo";

/// Present on a system booted from an OSTree deployment (written by
/// ostree-prepare-root).
pub const OSTREE_BOOTED: &str = "/run/ostree-booted";

/// Make the objects of the host repository at `repo` root's alone (0700).
/// Images keep their owners there (an app's files owned by uid 1000 are
/// objects owned by uid 1000 on the node): a local user with that uid
/// could otherwise open and rewrite them by their predictable path, and
/// with them every container (and baked app) that shares the object. The
/// image writer sets it, the image store keeps it; libostree's own users
/// are root.
pub fn protect_host_repo_objects(repo: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let objects = repo.join("objects");
    let meta = std::fs::symlink_metadata(&objects)
        .with_context(|| format!("reading {}", objects.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", objects.display());
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(&objects, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} root's alone (0700)", objects.display()))?;
    }
    Ok(())
}

/// Whether `root`'s images live in the host's repository: the node's
/// default state root on a booted OSTree system.
pub fn uses_host_repo(root: &Path) -> bool {
    root == Path::new(DEFAULT_ROOT) && Path::new(OSTREE_BOOTED).exists()
}

/// The image repository of a state root: the host's ([`uses_host_repo`])
/// or the root's own.
pub fn repo_dir(root: &Path) -> PathBuf {
    if uses_host_repo(root) {
        HOST_REPO.into()
    } else {
        own_repo_dir(root)
    }
}

/// A state root's private repository: where every image lived before nodes
/// kept them in the host's (moved from there on first use).
pub fn own_repo_dir(root: &Path) -> PathBuf {
    root.join("repo")
}

/// Where a state root keeps its image checkouts.
pub fn checkouts_dir(root: &Path) -> PathBuf {
    root.join("checkouts")
}

/// The record of a checked-out commit, next to its tree.
pub fn checkout_record(checkouts: &Path, commit: &str) -> PathBuf {
    checkouts.join(format!("{commit}.json"))
}

/// Keep the image's record next to its checkout so that later runs need no
/// libostree (see [`resolve_checked_out`]). A commit never changes, so the
/// record never goes stale.
pub fn write_checkout_record(checkouts: &Path, info: &ImageInfo) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(info)?;
    crate::durable::write(&checkout_record(checkouts, &info.commit), &bytes)
}

/// Remove the checkout of `commit` and its record, whichever exist;
/// returns whether there was a checkout.
pub fn remove_checkout(checkouts: &Path, commit: &str) -> Result<bool> {
    let record = checkout_record(checkouts, commit);
    if record.exists() {
        std::fs::remove_file(&record).with_context(|| format!("removing {}", record.display()))?;
    }
    let co = checkouts.join(commit);
    if !co.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&co).with_context(|| format!("removing checkout {}", co.display()))?;
    Ok(true)
}

fn is_checksum(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `NAME[:TAG]` resolved without libostree, when its commit is already
/// checked out: the ref is read from the repository's own file
/// (`refs/heads/cairn/app/NAME/TAG`, one checksum, replaced atomically by
/// libostree when the ref moves) and the image's record from the checkout's
/// record. `None` (the store must resolve and check it out) for a digest
/// reference, a missing ref file, checkout or record, or anything that does
/// not match.
pub fn resolve_checked_out(
    repo: &Path,
    checkouts: &Path,
    reference: &str,
) -> Option<(ImageInfo, PathBuf)> {
    if reference.contains('@') || reference.starts_with("sha256:") {
        return None;
    }
    let name = ImageName::parse(reference).ok()?;
    let r = name.ostree_ref();
    let commit = std::fs::read_to_string(repo.join("refs/heads").join(&r)).ok()?;
    let commit = commit.trim();
    if !is_checksum(commit) {
        return None;
    }
    let tree = checkouts.join(commit);
    let info = read_record(&checkout_record(checkouts, commit))?;
    if info.commit != commit || info.name != name.name || info.tag != name.tag || !tree.is_dir() {
        return None;
    }
    Some((
        ImageInfo {
            ostree_ref: r,
            ..info
        },
        tree,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_onto_refs() {
        let n = ImageName::parse("busybox").unwrap();
        assert_eq!((n.name.as_str(), n.tag.as_str()), ("busybox", "latest"));
        assert_eq!(n.ostree_ref(), "cairn/app/busybox/latest");
        for bad in ["Busybox", "a/b", "x:", ":t", "-x", "x:-t"] {
            assert!(ImageName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_baked_app_resolves_from_the_tree_and_nothing_else_does() {
        let apps = tempfile::tempdir().unwrap();
        let digest = format!("sha256:{}", "c".repeat(64));
        let info = ImageInfo {
            name: baked_image_name("web"),
            tag: BAKED_TAG.into(),
            ostree_ref: String::new(),
            commit: String::new(),
            manifest_digest: digest.clone(),
            config: ImageConfig::default(),
        };
        let dir = apps.path().join("web");
        std::fs::create_dir_all(dir.join(BAKED_ROOTFS)).unwrap();
        std::fs::write(dir.join(BAKED_RECORD), serde_json::to_vec(&info).unwrap()).unwrap();
        for good in [
            "cairn-app-web",
            "cairn-app-web:baked",
            &format!("cairn-app-web@{digest}"),
        ] {
            let (found, root) = resolve_baked(apps.path(), good).unwrap();
            assert_eq!(
                (found, root),
                (info.clone(), dir.join(BAKED_ROOTFS)),
                "{good}"
            );
        }
        for other in [
            "web",
            "cairn-app-web:v1",
            "cairn-app-db",
            "cairn-app-../web",
            "cairn-app-",
            &format!("cairn-app-web@sha256:{}", "d".repeat(64)),
        ] {
            assert!(resolve_baked(apps.path(), other).is_none(), "{other}");
        }
        assert_eq!(baked_images(apps.path()), vec![info.clone()]);
        // A record or root that is a symlink is not followed.
        std::fs::remove_dir(dir.join(BAKED_ROOTFS)).unwrap();
        std::os::unix::fs::symlink("/", dir.join(BAKED_ROOTFS)).unwrap();
        assert!(resolve_baked(apps.path(), "cairn-app-web").is_none());
        std::fs::remove_file(dir.join(BAKED_ROOTFS)).unwrap();
        std::fs::create_dir(dir.join(BAKED_ROOTFS)).unwrap();
        std::fs::rename(dir.join(BAKED_RECORD), apps.path().join("elsewhere.json")).unwrap();
        std::os::unix::fs::symlink("../elsewhere.json", dir.join(BAKED_RECORD)).unwrap();
        assert!(resolve_baked(apps.path(), "cairn-app-web").is_none());
    }

    #[test]
    fn a_checked_out_image_resolves_from_its_files_only() {
        let root = tempfile::tempdir().unwrap();
        let (repo, checkouts) = (repo_dir(root.path()), checkouts_dir(root.path()));
        let commit = "a".repeat(64);
        let info = ImageInfo {
            name: "web".into(),
            tag: "v1".into(),
            ostree_ref: String::new(),
            commit: commit.clone(),
            manifest_digest: format!("sha256:{}", "b".repeat(64)),
            config: ImageConfig::default(),
        };
        std::fs::create_dir_all(repo.join("refs/heads/cairn/app/web")).unwrap();
        std::fs::write(
            repo.join("refs/heads/cairn/app/web/v1"),
            format!("{commit}\n"),
        )
        .unwrap();
        // The ref alone is not enough: no checkout, no record.
        assert!(resolve_checked_out(&repo, &checkouts, "web:v1").is_none());
        std::fs::create_dir_all(checkouts.join(&commit)).unwrap();
        write_checkout_record(&checkouts, &info).unwrap();
        let (found, tree) = resolve_checked_out(&repo, &checkouts, "web:v1").unwrap();
        assert_eq!(tree, checkouts.join(&commit));
        assert_eq!(found.ostree_ref, "cairn/app/web/v1");
        // Digests, other tags and a record of another image are not resolved here.
        assert!(resolve_checked_out(&repo, &checkouts, "web@sha256:00").is_none());
        assert!(resolve_checked_out(&repo, &checkouts, "web:v2").is_none());
        let other = ImageInfo {
            name: "evil".into(),
            ..info
        };
        write_checkout_record(&checkouts, &other).unwrap();
        assert!(resolve_checked_out(&repo, &checkouts, "web:v1").is_none());
        assert!(remove_checkout(&checkouts, &commit).unwrap());
        assert!(!checkout_record(&checkouts, &commit).exists());
    }
}
