//! The image store: OCI images imported into an OSTree repository, one ref per
//! image (`cairn/app/<name>/<tag>`), the manifest digest and the image
//! config kept in the commit metadata.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use gio::prelude::*;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use crate::layer;
use crate::source::{HashingReader, Sha256, Source};

/// Prefix of every image ref in the node repository.
pub const REF_PREFIX: &str = "cairn/app/";
const META_NAME: &str = "cairn.app.name";
const META_TAG: &str = "cairn.app.tag";
const META_DIGEST: &str = "cairn.app.manifest-digest";
const META_CONFIG: &str = "cairn.app.config";
const META_SOURCE: &str = "cairn.app.source-format";
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

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

impl ImageConfig {
    fn from_oci(c: &ImageConfiguration) -> Self {
        let Some(cfg) = c.config() else {
            return Self::default();
        };
        Self {
            entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
            cmd: cfg.cmd().clone().unwrap_or_default(),
            env: cfg.env().clone().unwrap_or_default(),
            working_dir: cfg.working_dir().clone().filter(|s| !s.is_empty()),
            user: cfg.user().clone().filter(|s| !s.is_empty()),
            exposed_ports: cfg.exposed_ports().clone().unwrap_or_default(),
            labels: cfg
                .labels()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            stop_signal: cfg.stop_signal().clone(),
        }
    }
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

    /// From a reference in an image's own metadata, e.g.
    /// `registry.example/library/busybox:1.36` → `busybox:1.36`.
    fn from_annotation(s: &str) -> Option<Self> {
        let s = s.split('@').next()?;
        let last = s.rsplit('/').next()?;
        // A bare tag ("latest") is what many tools write: no name in it.
        if !s.contains('/') && !s.contains(':') {
            return None;
        }
        Self::parse(&last.to_ascii_lowercase()).ok()
    }

    pub fn ostree_ref(&self) -> String {
        format!("{REF_PREFIX}{}/{}", self.name, self.tag)
    }
}

/// Open the node's image repository, creating it on first use. Bare mode as
/// root (checkouts hardlink to the objects and keep ownership), bare-user-only
/// otherwise (tests without root).
pub fn open_repo(path: &Path) -> Result<ostree::Repo> {
    let mode = if nix::unistd::geteuid().is_root() {
        ostree::RepoMode::Bare
    } else {
        ostree::RepoMode::BareUserOnly
    };
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let p = path.to_str().context("repository path is not UTF-8")?;
    let repo = if path.join("config").exists() {
        ostree::Repo::open_at(libc::AT_FDCWD, p, gio::Cancellable::NONE)
    } else {
        ostree::Repo::create_at(libc::AT_FDCWD, p, mode, None, gio::Cancellable::NONE)
    }
    .with_context(|| format!("opening image repository {}", path.display()))?;
    Ok(repo)
}

fn repo_path(repo: &ostree::Repo) -> Result<PathBuf> {
    repo.path().path().context("repository has no local path")
}

/// Import an OCI image layout directory, an oci-archive tar or a `docker save`
/// tar into `repo`. `name` (`NAME[:TAG]`) overrides the name recorded in the
/// image. Nothing is committed unless every blob matched its digest.
pub fn import(repo: &ostree::Repo, path: &Path, name: Option<&str>) -> Result<ImageInfo> {
    let source = Source::open(path)?;
    let staging_parent = repo_path(repo)?.join("tmp");
    std::fs::create_dir_all(&staging_parent)?;
    let staging = tempfile::Builder::new()
        .prefix("cairn-import-")
        .tempdir_in(&staging_parent)
        .with_context(|| {
            format!(
                "creating a staging directory in {}",
                staging_parent.display()
            )
        })?;
    let rootfs = staging.path().join("rootfs");
    std::fs::create_dir(&rootfs)?;

    let (found_name, digest, config, format) = if source.has("index.json") {
        let (n, d, c) = unpack_oci(&source, &rootfs, name.is_none())?;
        (n, d, c, "oci")
    } else if source.has("manifest.json") {
        let (n, d, c) = unpack_docker(&source, &rootfs)?;
        (n, d, c, "docker-save")
    } else {
        bail!("{}: neither an OCI image layout (index.json) nor a docker save archive (manifest.json)", path.display());
    };
    let image_name = match name {
        Some(n) => ImageName::parse(n)?,
        None => found_name.ok_or_else(|| {
            anyhow!(
                "{} carries no image name: pass --name NAME[:TAG]",
                path.display()
            )
        })?,
    };
    let created = config
        .created()
        .as_deref()
        .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
        .map(|t| t.timestamp().max(0) as u64)
        .unwrap_or(0);
    let cfg = ImageConfig::from_oci(&config);
    let commit = commit_tree(repo, &rootfs, &image_name, &digest, &cfg, format, created)?;
    Ok(ImageInfo {
        name: image_name.name.clone(),
        tag: image_name.tag.clone(),
        ostree_ref: image_name.ostree_ref(),
        commit,
        manifest_digest: digest.to_string(),
        config: cfg,
    })
}

/// OCI layout: index → manifest → config + layers.
fn unpack_oci(
    source: &Source,
    rootfs: &Path,
    want_name: bool,
) -> Result<(Option<ImageName>, Sha256, ImageConfiguration)> {
    let index = ImageIndex::from_reader(source.open_file("index.json")?)
        .context("parsing index.json of the OCI layout")?;
    let (desc_digest, desc_size, annotation) = pick_manifest(source, &index, 0)?;
    let manifest_bytes = source.read_blob(&desc_digest, Some(desc_size))?;
    let manifest = ImageManifest::from_reader(&manifest_bytes[..])
        .with_context(|| format!("parsing image manifest {desc_digest}"))?;
    let cfg_digest = Sha256::parse(manifest.config().digest().as_ref())?;
    let cfg_bytes = source.read_blob(&cfg_digest, Some(manifest.config().size()))?;
    let config = ImageConfiguration::from_reader(&cfg_bytes[..])
        .with_context(|| format!("parsing image config {cfg_digest}"))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        bail!(
            "image config lists {} layers (diff_ids) but the manifest has {}",
            diff_ids.len(),
            manifest.layers().len()
        );
    }
    for (i, layer) in manifest.layers().iter().enumerate() {
        let digest = Sha256::parse(layer.digest().as_ref())?;
        let name = Source::blob_name(&digest);
        if !source.has(&name) {
            bail!("layer {digest} is missing from the image");
        }
        apply_verified(
            source.open_file(&name)?,
            rootfs,
            Some((&digest, layer.size())),
            &Sha256::parse(&diff_ids[i])?,
        )
        .with_context(|| format!("applying layer {} of {} ({digest})", i + 1, diff_ids.len()))?;
    }
    let name = if want_name {
        annotation.as_deref().and_then(ImageName::from_annotation)
    } else {
        None
    };
    Ok((name, desc_digest, config))
}

/// Choose the image manifest in an index: the only one, or the linux/amd64 one.
fn pick_manifest(
    source: &Source,
    index: &ImageIndex,
    depth: u32,
) -> Result<(Sha256, u64, Option<String>)> {
    let manifests = index.manifests();
    let chosen = if manifests.len() == 1 {
        &manifests[0]
    } else {
        manifests
            .iter()
            .find(|m| {
                m.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
                })
            })
            .ok_or_else(|| {
                anyhow!(
                    "the image index has {} manifests and none is for linux/amd64",
                    manifests.len()
                )
            })?
    };
    let digest = Sha256::parse(chosen.digest().as_ref())?;
    let annotation = chosen
        .annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME_ANNOTATION).cloned());
    let media = chosen.media_type().to_string();
    if media.contains("image.index") || media.contains("manifest.list") {
        if depth > 2 {
            bail!("image indexes nested too deeply");
        }
        let bytes = source.read_blob(&digest, Some(chosen.size()))?;
        let inner = ImageIndex::from_reader(&bytes[..]).context("parsing nested image index")?;
        let (d, s, a) = pick_manifest(source, &inner, depth + 1)?;
        return Ok((d, s, a.or(annotation)));
    }
    Ok((digest, chosen.size(), annotation))
}

/// Apply one layer blob while hashing it: the compressed bytes against the
/// manifest digest (when there is one), the uncompressed stream against the
/// config's diff_id.
fn apply_verified(
    blob: Box<dyn Read>,
    rootfs: &Path,
    compressed: Option<(&Sha256, u64)>,
    diff_id: &Sha256,
) -> Result<()> {
    let mut outer = HashingReader::new(blob);
    {
        let decompressed = layer::decompress(BufReader::with_capacity(256 * 1024, &mut outer))?;
        let mut inner = HashingReader::new(decompressed);
        layer::apply_layer(&mut inner, rootfs)?;
        let (got, _) = inner.finish().context("reading layer")?;
        if got != diff_id.hex() {
            bail!("digest mismatch: uncompressed layer is sha256:{got}, the image config says {diff_id}");
        }
    }
    let (got, size) = outer.finish().context("reading layer")?;
    if let Some((digest, want_size)) = compressed {
        if got != digest.hex() {
            bail!("digest mismatch: layer blob {digest} has content sha256:{got}; the image is corrupt or was tampered with");
        }
        if size != want_size {
            bail!(
                "size mismatch: layer blob {digest} is {size} bytes, the manifest says {want_size}"
            );
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// `docker save` layout: manifest.json → config (named by its digest) and
/// uncompressed layer tars checked against the config's diff_ids.
fn unpack_docker(
    source: &Source,
    rootfs: &Path,
) -> Result<(Option<ImageName>, Sha256, ImageConfiguration)> {
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&source.read_file("manifest.json")?)
            .context("parsing manifest.json of the docker save archive")?;
    let [entry] = &entries[..] else {
        bail!(
            "the docker save archive holds {} images; import one at a time",
            entries.len()
        );
    };
    let cfg_bytes = source.read_file(&entry.config)?;
    let cfg_hex = entry
        .config
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .trim_end_matches(".json")
        .to_string();
    let cfg_digest = Sha256::parse(&format!("sha256:{cfg_hex}"))
        .with_context(|| format!("config {} is not named by its digest", entry.config))?;
    crate::source::verify(&cfg_digest, &cfg_bytes, None)?;
    let config = ImageConfiguration::from_reader(&cfg_bytes[..]).context("parsing image config")?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != entry.layers.len() {
        bail!(
            "image config lists {} layers but manifest.json has {}",
            diff_ids.len(),
            entry.layers.len()
        );
    }
    for (i, l) in entry.layers.iter().enumerate() {
        apply_verified(
            source.open_file(l)?,
            rootfs,
            None,
            &Sha256::parse(&diff_ids[i])?,
        )
        .with_context(|| format!("applying layer {} of {} ({l})", i + 1, diff_ids.len()))?;
    }
    let name = entry
        .repo_tags
        .as_ref()
        .and_then(|t| t.first())
        .and_then(|t| ImageName::from_annotation(&format!("x/{t}")));
    Ok((name, cfg_digest, config))
}

fn commit_tree(
    repo: &ostree::Repo,
    rootfs: &Path,
    name: &ImageName,
    digest: &Sha256,
    cfg: &ImageConfig,
    format: &str,
    time: u64,
) -> Result<String> {
    let cancel = gio::Cancellable::NONE;
    repo.prepare_transaction(cancel)
        .context("starting an OSTree transaction")?;
    let result = (|| -> Result<String> {
        let mtree = ostree::MutableTree::new();
        let modifier = (repo.mode() == ostree::RepoMode::BareUserOnly).then(|| {
            ostree::RepoCommitModifier::new(
                ostree::RepoCommitModifierFlags::CANONICAL_PERMISSIONS,
                None,
            )
        });
        repo.write_directory_to_mtree(
            &gio::File::for_path(rootfs),
            &mtree,
            modifier.as_ref(),
            cancel,
        )
        .context("writing the image tree into the repository")?;
        let root = repo.write_mtree(&mtree, cancel)?;
        let root = root
            .downcast::<ostree::RepoFile>()
            .map_err(|_| anyhow!("write_mtree returned no RepoFile"))?;
        let meta = glib::VariantDict::new(None);
        meta.insert(META_NAME, name.name.as_str());
        meta.insert(META_TAG, name.tag.as_str());
        meta.insert(META_DIGEST, digest.to_string().as_str());
        meta.insert(META_CONFIG, serde_json::to_string(cfg)?.as_str());
        meta.insert(META_SOURCE, format);
        let meta = meta.end();
        let subject = format!("{}:{} {digest}", name.name, name.tag);
        let commit = repo.write_commit_with_time(
            None,
            Some(&subject),
            None,
            Some(&meta),
            &root,
            time,
            cancel,
        )?;
        repo.transaction_set_ref(None, &name.ostree_ref(), Some(&commit));
        repo.commit_transaction(cancel)
            .context("committing the OSTree transaction")?;
        Ok(commit.to_string())
    })();
    if result.is_err() {
        let _ = repo.abort_transaction(cancel);
    }
    result
}

/// Read an image's record back from its commit.
pub fn load(repo: &ostree::Repo, ostree_ref: &str, commit: &str) -> Result<ImageInfo> {
    let (v, _) = repo
        .load_commit(commit)
        .with_context(|| format!("loading commit {commit}"))?;
    let dict = glib::VariantDict::new(Some(&v.child_value(0)));
    let get = |k: &str| -> Result<String> {
        dict.lookup::<String>(k).ok().flatten().ok_or_else(|| {
            anyhow!("commit {commit} of {ostree_ref} lacks {k}: not imported by cairn")
        })
    };
    Ok(ImageInfo {
        name: get(META_NAME)?,
        tag: get(META_TAG)?,
        ostree_ref: ostree_ref.to_string(),
        commit: commit.to_string(),
        manifest_digest: get(META_DIGEST)?,
        config: serde_json::from_str(&get(META_CONFIG)?)
            .context("image config in commit metadata")?,
    })
}

/// All images, sorted by name and tag.
pub fn list(repo: &ostree::Repo) -> Result<Vec<ImageInfo>> {
    let refs = repo
        .list_refs(None, gio::Cancellable::NONE)
        .context("listing refs")?;
    let mut out = Vec::new();
    for (r, commit) in refs {
        if r.starts_with(REF_PREFIX) {
            out.push(load(repo, &r, &commit)?);
        }
    }
    out.sort_by(|a, b| (&a.name, &a.tag).cmp(&(&b.name, &b.tag)));
    Ok(out)
}

/// Find an image by `NAME[:TAG]`, `NAME@sha256:…` or a bare `sha256:…`.
pub fn resolve(repo: &ostree::Repo, reference: &str) -> Result<ImageInfo> {
    let (base, digest) = match reference.split_once('@') {
        Some((b, d)) => (Some(b), Some(Sha256::parse(d)?)),
        None if reference.starts_with("sha256:") => (None, Some(Sha256::parse(reference)?)),
        None => (Some(reference), None),
    };
    if let Some(d) = digest {
        let d = d.to_string();
        let base_name = base
            .map(|b| ImageName::parse(b).map(|n| n.name))
            .transpose()?;
        return list(repo)?
            .into_iter()
            .find(|i| i.manifest_digest == d && base_name.as_ref().map_or(true, |n| *n == i.name))
            .ok_or_else(|| {
                anyhow!("no image {reference} in the store: import it with `host app import`")
            });
    }
    let name = ImageName::parse(base.unwrap_or_default())?;
    let r = name.ostree_ref();
    let commit = repo
        .resolve_rev(&r, true)
        .with_context(|| format!("resolving {r}"))?
        .ok_or_else(|| {
            anyhow!(
                "no image {}:{} in the store: import it with `host app import`",
                name.name,
                name.tag
            )
        })?;
    load(repo, &r, &commit)
}

/// Drop an image's ref and prune objects nothing references any more.
pub fn remove(repo: &ostree::Repo, reference: &str) -> Result<ImageInfo> {
    let info = resolve(repo, reference)?;
    repo.set_ref_immediate(None, &info.ostree_ref, None, gio::Cancellable::NONE)
        .with_context(|| format!("deleting ref {}", info.ostree_ref))?;
    prune_objects(repo)?;
    Ok(info)
}

/// Delete the objects no ref reaches; returns how many and their bytes.
pub fn prune_objects(repo: &ostree::Repo) -> Result<(u64, u64)> {
    let (_, objects, bytes) = repo
        .prune(
            ostree::RepoPruneFlags::REFS_ONLY,
            -1,
            gio::Cancellable::NONE,
        )
        .context("pruning unreferenced objects of the image store")?;
    Ok((objects.max(0) as u64, bytes))
}

/// Check every object of an image against its checksum (an fsck limited to
/// the image). Returns how many objects were checked.
pub fn verify(repo: &ostree::Repo, reference: &str) -> Result<(ImageInfo, usize)> {
    let info = resolve(repo, reference)?;
    let objects = repo
        .traverse_commit(&info.commit, 0, gio::Cancellable::NONE)
        .with_context(|| format!("walking commit {}", info.commit))?;
    for obj in &objects {
        repo.fsck_object(obj.object_type(), obj.checksum(), gio::Cancellable::NONE)
            .with_context(|| {
                format!(
                    "object {}.{:?} of {} is corrupt",
                    obj.checksum(),
                    obj.object_type(),
                    info.reference()
                )
            })?;
    }
    Ok((info, objects.len()))
}

/// The record of a checked-out commit, next to its tree:
/// `<checkouts>/<commit>.json`, the [`ImageInfo`] read from the commit.
pub fn checkout_record(checkouts: &Path, commit: &str) -> PathBuf {
    checkouts.join(format!("{commit}.json"))
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

/// Keep the image's record next to its checkout so that later runs need no
/// libostree (see [`resolve_checked_out`]). A commit never changes, so the
/// record never goes stale.
pub fn write_checkout_record(checkouts: &Path, info: &ImageInfo) -> Result<()> {
    crate::state::write_json(&checkout_record(checkouts, &info.commit), info)
}

/// `NAME[:TAG]` resolved without libostree, when its commit is already
/// checked out: the ref is read from the repository's own file
/// (`refs/heads/cairn/app/NAME/TAG`, one checksum, replaced atomically by
/// libostree when the ref moves) and the image's record from the checkout's
/// record. `None` (use [`resolve`] and [`ensure_checkout`]) for a digest
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
    if commit.len() != 64 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let tree = checkouts.join(commit);
    let info: ImageInfo = crate::state::read_json(&checkout_record(checkouts, commit)).ok()?;
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

/// A read-only tree of `commit`, shared by every container of that commit:
/// `<dir>/<commit>`, made once (hardlinks into the repository when it can).
pub fn ensure_checkout(repo: &ostree::Repo, commit: &str, dir: &Path) -> Result<PathBuf> {
    let dest = dir.join(commit);
    if dest.exists() {
        return Ok(dest);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".tmp-{commit}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let opts = ostree::RepoCheckoutAtOptions {
        mode: if repo.mode() == ostree::RepoMode::Bare {
            ostree::RepoCheckoutMode::None
        } else {
            ostree::RepoCheckoutMode::User
        },
        ..Default::default()
    };
    if let Err(e) = repo.checkout_at(
        Some(&opts),
        libc::AT_FDCWD,
        &tmp,
        commit,
        gio::Cancellable::NONE,
    ) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("checking out {commit} into {}", tmp.display()));
    }
    match std::fs::rename(&tmp, &dest) {
        Ok(()) => Ok(dest),
        // Another process won the race: theirs is as good as ours.
        Err(_) if dest.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dest)
        }
        Err(e) => Err(e).with_context(|| format!("renaming checkout to {}", dest.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        let n = ImageName::parse("busybox").unwrap();
        assert_eq!((n.name.as_str(), n.tag.as_str()), ("busybox", "latest"));
        assert_eq!(n.ostree_ref(), "cairn/app/busybox/latest");
        let n = ImageName::parse("web-1.x:v2_0").unwrap();
        assert_eq!(n.tag, "v2_0");
        assert!(ImageName::parse("Busybox").is_err());
        assert!(ImageName::parse("a/b").is_err());
        assert!(ImageName::parse("x:").is_err());
        assert_eq!(
            ImageName::from_annotation("registry.example/library/busybox:1.36").unwrap(),
            ImageName {
                name: "busybox".into(),
                tag: "1.36".into()
            }
        );
        assert_eq!(ImageName::from_annotation("latest"), None);
    }
}
