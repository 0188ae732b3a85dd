//! The image store: OCI images imported into an OSTree repository, one ref per
//! image (`cairn/app/<name>/<tag>`), the manifest digest and the image
//! config kept in the commit metadata.

use std::cell::Cell;
use std::io::{BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use gio::prelude::*;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

use crate::layer;
pub use crate::limits::ImportLimits;
use crate::source::{archive_member, HashingReader, Sha256, Source};

pub use cairn_contracts::image::{ImageConfig, ImageInfo, ImageName, REF_PREFIX};
const META_NAME: &str = "cairn.app.name";
const META_TAG: &str = "cairn.app.tag";
const META_DIGEST: &str = "cairn.app.manifest-digest";
const META_CONFIG: &str = "cairn.app.config";
const META_SOURCE: &str = "cairn.app.source-format";
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// What a container needs to know from the image config.
fn image_config_from_oci(c: &ImageConfiguration) -> ImageConfig {
    let Some(cfg) = c.config() else {
        return ImageConfig::default();
    };
    ImageConfig {
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

/// The name in a reference from an image's own metadata, e.g.
/// `registry.example/library/busybox:1.36` → `busybox:1.36`.
fn name_from_annotation(s: &str) -> Option<ImageName> {
    let s = s.split('@').next()?;
    let last = s.rsplit('/').next()?;
    // A bare tag ("latest") is what many tools write: no name in it.
    if !s.contains('/') && !s.contains(':') {
        return None;
    }
    ImageName::parse(&last.to_ascii_lowercase()).ok()
}

/// What [`import_with`] is asked for besides the image itself.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// `NAME[:TAG]` to store it under (default: the name recorded in the image).
    pub name: Option<String>,
    /// Which tag of an OCI layout holding several (the
    /// `org.opencontainers.image.ref.name` annotation), or of a docker save
    /// archive (its RepoTags). `PATH:TAG` as the path means the same.
    pub tag: Option<String>,
    pub limits: ImportLimits,
}

/// Make `dir` a directory only its owner (root) can enter: made 0700 when
/// missing (parents as usual), tightened to 0700 when it exists. The image
/// store holds setuid-root files of images, which any local user could run
/// as root through a world-searchable path.
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    // The directory itself (a symlinked state root is followed, as any
    // path the administrator gives), chmodded by fd.
    let f = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let meta = f.metadata()?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        f.set_permissions(std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (0700)", dir.display()))?;
    }
    Ok(())
}

/// Open the node's image repository, creating it on first use. Bare mode as
/// root (checkouts hardlink to the objects and keep ownership), bare-user-only
/// otherwise (tests without root). The repository and its `tmp` are 0700.
pub fn open_repo(path: &Path) -> Result<ostree::Repo> {
    let mode = if nix::unistd::geteuid().is_root() {
        ostree::RepoMode::Bare
    } else {
        ostree::RepoMode::BareUserOnly
    };
    private_dir(path)?;
    let p = path.to_str().context("repository path is not UTF-8")?;
    let repo = if path.join("config").exists() {
        ostree::Repo::open_at(libc::AT_FDCWD, p, gio::Cancellable::NONE)
    } else {
        ostree::Repo::create_at(libc::AT_FDCWD, p, mode, None, gio::Cancellable::NONE)
    }
    .with_context(|| format!("opening image repository {}", path.display()))?;
    private_dir(&path.join("tmp"))?;
    Ok(repo)
}

/// Open the booted host's repository to keep images in (it must exist; its
/// modes are libostree's and stay as they are).
pub fn open_host_repo(path: &Path) -> Result<ostree::Repo> {
    if !path.join("config").is_file() {
        bail!(
            "{} is not an OSTree repository: is this a booted cairn node?",
            path.display()
        );
    }
    let p = path.to_str().context("repository path is not UTF-8")?;
    ostree::Repo::open_at(libc::AT_FDCWD, p, gio::Cancellable::NONE)
        .with_context(|| format!("opening the host repository {}", path.display()))
}

fn repo_path(repo: &ostree::Repo) -> Result<PathBuf> {
    repo.path().path().context("repository has no local path")
}

/// Import an OCI image layout directory, an oci-archive tar or a `docker save`
/// tar into `repo`. `name` (`NAME[:TAG]`) overrides the name recorded in the
/// image. Nothing is committed unless every blob matched its digest.
pub fn import(repo: &ostree::Repo, path: &Path, name: Option<&str>) -> Result<ImageInfo> {
    import_with(
        repo,
        path,
        &ImportOptions {
            name: name.map(str::to_string),
            ..Default::default()
        },
    )
}

/// `PATH:TAG` (skopeo's `oci:PATH:TAG`) when PATH exists and `PATH:TAG`
/// does not; the explicit tag, if any, must agree.
pub fn split_path_tag(path: &Path, tag: Option<&str>) -> Result<(PathBuf, Option<String>)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if !path.exists() {
        if let Some(i) = bytes.iter().rposition(|&b| b == b':') {
            let (p, t) = (&bytes[..i], &bytes[i + 1..]);
            let p = Path::new(std::ffi::OsStr::from_bytes(p));
            if !t.is_empty() && !t.contains(&b'/') && p.exists() {
                let t = String::from_utf8_lossy(t).into_owned();
                if let Some(flag) = tag.filter(|f| *f != t) {
                    bail!(
                        "{}: tag {t:?} in the path and --tag {flag:?} disagree",
                        path.display()
                    );
                }
                return Ok((p.to_path_buf(), Some(t)));
            }
        }
    }
    Ok((path.to_path_buf(), tag.map(str::to_string)))
}

/// Prefix of the staging directories in `<repo>/tmp`: `cairn-import-PID-…`.
const STAGING_PREFIX: &str = "cairn-import-";

/// A private work directory in `<repo>/tmp`, removed when dropped (on every
/// error return and when unwinding); those of killed imports and pulls are
/// removed first.
pub(crate) fn staging_dir(repo: &ostree::Repo) -> Result<tempfile::TempDir> {
    // The directory itself is 0700 (tempfile's): the repository's tmp may
    // be the host's, whose mode is libostree's to keep.
    let staging_parent = repo_path(repo)?.join("tmp");
    remove_stale_staging(&staging_parent);
    tempfile::Builder::new()
        .prefix(&format!("{STAGING_PREFIX}{}-", std::process::id()))
        .tempdir_in(&staging_parent)
        .with_context(|| {
            format!(
                "creating a staging directory in {}",
                staging_parent.display()
            )
        })
}

/// Remove staging directories left by imports whose process is gone (killed
/// mid-way: a failed import removes its own).
fn remove_stale_staging(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// [`import`] with a tag and limits (see [`ImportOptions`]).
pub fn import_with(repo: &ostree::Repo, path: &Path, opts: &ImportOptions) -> Result<ImageInfo> {
    import_into(repo, path, opts, false)
}

/// [`import_with`], clearing setuid/setgid bits and file capabilities
/// first when `strip` (a repository others can read, see
/// [`strip_privileges`]).
pub(crate) fn import_into(
    repo: &ostree::Repo,
    path: &Path,
    opts: &ImportOptions,
    strip: bool,
) -> Result<ImageInfo> {
    let staging = staging_dir(repo)?;
    let rootfs = staging.path().join("rootfs");
    let image = unpack(path, opts, &rootfs)?;
    if strip {
        strip_privileges(&rootfs)?;
    }
    let image_name = match opts.name.as_deref() {
        Some(n) => ImageName::parse(n)?,
        None => image.name.ok_or_else(|| {
            anyhow!(
                "{} carries no image name: pass --name NAME[:TAG]",
                path.display()
            )
        })?,
    };
    let commit = commit_tree(
        repo,
        &rootfs,
        &image_name,
        &image.manifest_digest,
        &image.config,
        image.format,
        image.created,
    )?;
    Ok(ImageInfo {
        name: image_name.name.clone(),
        tag: image_name.tag.clone(),
        ostree_ref: image_name.ostree_ref(),
        commit,
        manifest_digest: image.manifest_digest.to_string(),
        config: image.config,
    })
}

/// An image [`unpack`] wrote out.
#[derive(Debug)]
pub struct Unpacked {
    /// The name recorded in the image, if any (looked for only when
    /// `ImportOptions::name` is None).
    pub name: Option<ImageName>,
    pub manifest_digest: Sha256,
    pub config: ImageConfig,
    /// The config's `created`, in seconds since the epoch (0 if absent).
    pub created: u64,
    /// `oci` or `docker-save`.
    pub format: &'static str,
}

/// Verify and apply an image's layers into `rootfs`, a directory made here
/// (mode 0755) that must not exist yet, with the same checks and limits as
/// an import. The builder bakes apps this way, straight into a host tree.
pub fn unpack(path: &Path, opts: &ImportOptions, rootfs: &Path) -> Result<Unpacked> {
    let limits = &opts.limits;
    let (path, tag) = split_path_tag(path, opts.tag.as_deref())?;
    let path = path.as_path();
    let source = Source::open_limited(path, limits)?;
    std::fs::create_dir(rootfs).with_context(|| format!("creating {}", rootfs.display()))?;
    // The image's `/`: 0755 whatever the importer's umask (layers rarely
    // carry a `./` entry, and it would be skipped).
    std::fs::set_permissions(rootfs, std::fs::Permissions::from_mode(0o755))?;

    let (name, manifest_digest, config, format) = if source.has("index.json") {
        let (n, d, c) = unpack_oci(&source, rootfs, opts.name.is_none(), tag.as_deref(), limits)?;
        (n, d, c, "oci")
    } else if source.has("manifest.json") {
        let (n, d, c) = unpack_docker(&source, rootfs, tag.as_deref(), limits)?;
        (n, d, c, "docker-save")
    } else {
        bail!("{}: neither an OCI image layout (index.json) nor a docker save archive (manifest.json)", path.display());
    };
    let created = config
        .created()
        .as_deref()
        .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
        .map(|t| t.timestamp().max(0) as u64)
        .unwrap_or(0);
    Ok(Unpacked {
        name,
        manifest_digest,
        config: image_config_from_oci(&config),
        created,
        format,
    })
}

/// Running totals of one import, against its [`ImportLimits`].
#[derive(Debug, Default)]
struct Usage {
    bytes: u64,
    entries: u64,
}

/// OCI layout: index → manifest → config + layers.
fn unpack_oci(
    source: &Source,
    rootfs: &Path,
    want_name: bool,
    tag: Option<&str>,
    limits: &ImportLimits,
) -> Result<(Option<ImageName>, Sha256, ImageConfiguration)> {
    let index_bytes = source.read_file_limited("index.json", limits.max_metadata_size)?;
    let index = ImageIndex::from_reader(&index_bytes[..])
        .context("parsing index.json of the OCI layout")?;
    let (desc_digest, desc_size, annotation) = pick_manifest(source, &index, tag, 0, limits)?;
    let manifest_bytes =
        source.read_blob_limited(&desc_digest, Some(desc_size), limits.max_metadata_size)?;
    let manifest = ImageManifest::from_reader(&manifest_bytes[..])
        .with_context(|| format!("parsing image manifest {desc_digest}"))?;
    if manifest.layers().len() > limits.max_layers {
        bail!(
            "image manifest {desc_digest} lists {} layers, over the limit of {} (ImportLimits::max_layers, `host app import --max-layers`)",
            manifest.layers().len(),
            limits.max_layers
        );
    }
    let cfg_digest = Sha256::parse(manifest.config().digest().as_ref())?;
    let cfg_bytes = source.read_blob_limited(
        &cfg_digest,
        Some(manifest.config().size()),
        limits.max_metadata_size,
    )?;
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
    let mut usage = Usage::default();
    for (i, layer) in manifest.layers().iter().enumerate() {
        let digest = Sha256::parse(layer.digest().as_ref())?;
        let name = Source::blob_name(&digest);
        if !source.has(&name) {
            bail!("layer {digest} is missing from the image");
        }
        let label = format!("layer {} of {} ({digest})", i + 1, diff_ids.len());
        apply_verified(
            source.open_file(&name)?,
            rootfs,
            Some((&digest, layer.size())),
            &Sha256::parse(&diff_ids[i])?,
            limits,
            &mut usage,
        )
        .with_context(|| format!("applying {label}"))?;
    }
    let name = if want_name {
        annotation.as_deref().and_then(name_from_annotation)
    } else {
        None
    };
    Ok((name, desc_digest, config))
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME_ANNOTATION))
        .map(String::as_str)
}

/// Whether a `ref.name` annotation names `tag`: the tag itself (what skopeo
/// and buildah write) or a full reference ending in `:tag`.
fn tag_matches(ref_name: &str, tag: &str) -> bool {
    ref_name == tag
        || ref_name
            .split('@')
            .next()
            .and_then(|r| r.rsplit_once(':'))
            .is_some_and(|(n, t)| t == tag && !t.contains('/') && !n.is_empty())
}

/// The OCI name of this host's architecture.
pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Choose the image manifest in an index: by tag (the `ref.name`
/// annotation) when one is asked for; the only one; or, in an index of
/// platform variants, the one for this host's platform. Several tags and no
/// tag asked for is an error listing them.
fn pick_manifest(
    source: &Source,
    index: &ImageIndex,
    tag: Option<&str>,
    depth: u32,
    limits: &ImportLimits,
) -> Result<(Sha256, u64, Option<String>)> {
    let manifests = index.manifests();
    if manifests.is_empty() {
        bail!("the image index lists no manifests");
    }
    let mut tags: Vec<&str> = manifests.iter().filter_map(ref_name).collect();
    tags.sort_unstable();
    tags.dedup();
    let mut candidates: Vec<&Descriptor> = match tag {
        Some(t) => {
            let c: Vec<_> = manifests
                .iter()
                .filter(|m| ref_name(m).is_some_and(|r| tag_matches(r, t)))
                .collect();
            if c.is_empty() {
                if tags.is_empty() {
                    bail!("tag {t:?} asked for, but the image index names no tags (no org.opencontainers.image.ref.name annotation)");
                }
                bail!(
                    "no manifest is tagged {t:?}; the layout holds tags {}",
                    tags.join(", ")
                );
            }
            c
        }
        None => {
            if tags.len() > 1 {
                bail!(
                    "the layout holds tags {}: pick one with PATH:TAG or --tag",
                    tags.join(", ")
                );
            }
            // One tag over several manifests: the tagged ones (an untagged
            // leftover is not a platform variant).
            manifests
                .iter()
                .filter(|m| tags.is_empty() || ref_name(m).is_some())
                .collect()
        }
    };
    // The same manifest listed under several tags is one choice.
    candidates.dedup_by(|a, b| a.digest() == b.digest());
    let chosen = if candidates.len() == 1 {
        candidates[0]
    } else {
        let (os, arch) = ("linux", host_arch());
        candidates
            .iter()
            .copied()
            .find(|m| {
                m.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == os && p.architecture().to_string() == arch
                })
            })
            .ok_or_else(|| {
                let platforms: Vec<String> = candidates
                    .iter()
                    .map(|m| {
                        m.platform()
                            .as_ref()
                            .map_or("(no platform)".to_string(), |p| {
                                format!("{}/{}", p.os(), p.architecture())
                            })
                    })
                    .collect();
                anyhow!(
                    "the image index has {} manifests, for {}; none is for {os}/{arch} (this host)",
                    candidates.len(),
                    platforms.join(", ")
                )
            })?
    };
    let digest = Sha256::parse(chosen.digest().as_ref())?;
    let annotation = ref_name(chosen).map(str::to_string);
    let media = chosen.media_type().to_string();
    if media.contains("image.index") || media.contains("manifest.list") {
        if depth >= 2 {
            bail!(
                "image indexes nested more than two deep (or an index that lists itself): refused"
            );
        }
        let bytes =
            source.read_blob_limited(&digest, Some(chosen.size()), limits.max_metadata_size)?;
        let inner = ImageIndex::from_reader(&bytes[..]).context("parsing nested image index")?;
        let (d, s, a) = pick_manifest(source, &inner, None, depth + 1, limits)?;
        return Ok((d, s, a.or(annotation)));
    }
    Ok((digest, chosen.size(), annotation))
}

/// Counts the bytes read through it into a shared cell, and refuses to read
/// past `max` (a blob's descriptor size).
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
    max: Option<u64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.count.get() + n as u64;
        self.count.set(total);
        if let Some(max) = self.max.filter(|m| total > *m) {
            return Err(std::io::Error::other(format!(
                "the blob is larger than its descriptor's {max} bytes"
            )));
        }
        Ok(n)
    }
}

/// The uncompressed stream of a layer, against the image's size limit and
/// the layer's compression ratio.
struct Metered<'a, R> {
    inner: R,
    compressed: Rc<Cell<u64>>,
    produced: u64,
    before: u64,
    limits: &'a ImportLimits,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.produced += n as u64;
        let l = self.limits;
        if self.before + self.produced > l.max_image_size {
            return Err(std::io::Error::other(format!(
                "the image's layers uncompress to more than {} bytes (ImportLimits::max_image_size, `host app import --max-image-size`)",
                l.max_image_size
            )));
        }
        let compressed = self.compressed.get().max(1);
        if self.produced > l.ratio_grace && self.produced / compressed >= l.max_ratio {
            return Err(std::io::Error::other(format!(
                "{} bytes uncompressed from {compressed} compressed, a ratio over {}:1 (ImportLimits::max_ratio, `host app import --max-ratio`): a decompression bomb?",
                self.produced, l.max_ratio
            )));
        }
        Ok(n)
    }
}

/// Apply one layer blob while hashing it: the compressed bytes against the
/// manifest digest (when there is one), the uncompressed stream against the
/// config's diff_id; sizes, ratio and entries against `limits`.
fn apply_verified(
    blob: Box<dyn Read>,
    rootfs: &Path,
    compressed: Option<(&Sha256, u64)>,
    diff_id: &Sha256,
    limits: &ImportLimits,
    usage: &mut Usage,
) -> Result<()> {
    let count = Rc::new(Cell::new(0));
    let mut outer = HashingReader::new(Counted {
        inner: blob,
        count: count.clone(),
        max: compressed.map(|(_, s)| s),
    });
    {
        let decompressed = layer::decompress(BufReader::with_capacity(256 * 1024, &mut outer))?;
        let mut inner = HashingReader::new(Metered {
            inner: decompressed,
            compressed: count.clone(),
            produced: 0,
            before: usage.bytes,
            limits,
        });
        layer::apply_layer_limited(&mut inner, rootfs, limits, &mut usage.entries)?;
        let (got, n) = inner.finish().context("reading layer")?;
        usage.bytes += n;
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
    tag: Option<&str>,
    limits: &ImportLimits,
) -> Result<(Option<ImageName>, Sha256, ImageConfiguration)> {
    let entries: Vec<DockerManifestEntry> = serde_json::from_slice(
        &source.read_file_limited("manifest.json", limits.max_metadata_size)?,
    )
    .context("parsing manifest.json of the docker save archive")?;
    let all_tags = || -> String {
        let t: Vec<&str> = entries
            .iter()
            .flat_map(|e| e.repo_tags.iter().flatten())
            .map(String::as_str)
            .collect();
        if t.is_empty() {
            "none".to_string()
        } else {
            t.join(", ")
        }
    };
    let (entry, repo_tag) = match tag {
        Some(t) => entries
            .iter()
            .find_map(|e| {
                e.repo_tags
                    .iter()
                    .flatten()
                    .find(|r| tag_matches(r, t))
                    .map(|r| (e, Some(r)))
            })
            .ok_or_else(|| {
                anyhow!(
                    "no image of the docker save archive is tagged {t:?}; its tags: {}",
                    all_tags()
                )
            })?,
        None => match &entries[..] {
            [entry] => (entry, entry.repo_tags.as_ref().and_then(|t| t.first())),
            _ => bail!(
                "the docker save archive holds {} images (tags: {}); pick one with PATH:TAG or --tag",
                entries.len(),
                all_tags()
            ),
        },
    };
    if entry.layers.len() > limits.max_layers {
        bail!(
            "manifest.json lists {} layers, over the limit of {} (ImportLimits::max_layers, `host app import --max-layers`)",
            entry.layers.len(),
            limits.max_layers
        );
    }
    let config_name = archive_member(&entry.config)?;
    let cfg_bytes = source.read_file_limited(config_name, limits.max_metadata_size)?;
    let cfg_hex = config_name
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
    let mut usage = Usage::default();
    for (i, l) in entry.layers.iter().enumerate() {
        let member = archive_member(l)?;
        let label = format!("layer {} of {} ({member})", i + 1, diff_ids.len());
        apply_verified(
            source.open_file(member)?,
            rootfs,
            None,
            &Sha256::parse(&diff_ids[i])?,
            limits,
            &mut usage,
        )
        .with_context(|| format!("applying {label}"))?;
    }
    let name = repo_tag.and_then(|t| name_from_annotation(&format!("x/{t}")));
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

/// Drop an image's ref (its objects stay until a prune).
pub fn remove(repo: &ostree::Repo, reference: &str) -> Result<ImageInfo> {
    let info = resolve(repo, reference)?;
    repo.set_ref_immediate(None, &info.ostree_ref, None, gio::Cancellable::NONE)
        .with_context(|| format!("deleting ref {}", info.ostree_ref))?;
    Ok(info)
}

/// Copy image `info` of `from` into `to` as the same name, digest and
/// config (a state root's private repository moving into the host's),
/// clearing privileges when `strip`. Returns the new commit.
pub fn copy_image(
    from: &ostree::Repo,
    to: &ostree::Repo,
    info: &ImageInfo,
    strip: bool,
) -> Result<String> {
    let staging = staging_dir(to)?;
    let rootfs = staging.path().join("rootfs");
    from.checkout_at(
        Some(&checkout_options(from)),
        libc::AT_FDCWD,
        &rootfs,
        &info.commit,
        gio::Cancellable::NONE,
    )
    .with_context(|| format!("checking out {} ({})", info.reference(), info.commit))?;
    if strip {
        strip_privileges(&rootfs)?;
    }
    let (v, _) = from.load_commit(&info.commit)?;
    let dict = glib::VariantDict::new(Some(&v.child_value(0)));
    let format = dict
        .lookup::<String>(META_SOURCE)
        .ok()
        .flatten()
        .unwrap_or_else(|| "oci".into());
    commit_tree(
        to,
        &rootfs,
        &ImageName::parse(&info.reference())?,
        &Sha256::parse(&info.manifest_digest)?,
        &info.config,
        &format,
        ostree::commit_get_timestamp(&v),
    )
}

/// How a commit of `repo` is checked out: hardlinks keeping owners from a
/// bare repository (as root), a user checkout otherwise.
pub(crate) fn checkout_options(repo: &ostree::Repo) -> ostree::RepoCheckoutAtOptions {
    ostree::RepoCheckoutAtOptions {
        mode: if repo.mode() == ostree::RepoMode::Bare {
            ostree::RepoCheckoutMode::None
        } else {
            ostree::RepoCheckoutMode::User
        },
        ..Default::default()
    }
}

/// Clear setuid and setgid bits, file capabilities and group/other write
/// bits of the regular files in an unpacked image. Inside a container they
/// grant nothing (it runs with no_new_privs, from a read-only root), but in
/// the host's repository (baked apps, and pulled images on a node) its
/// files are objects shared with the host tree and other images: an
/// image's setuid-root binary must not become one of the host's, nor may
/// anyone but root rewrite an object. Returns how many files changed.
pub fn strip_privileges(rootfs: &Path) -> Result<usize> {
    use std::os::unix::ffi::OsStrExt;
    let mut changed = 0;
    for entry in walkdir::WalkDir::new(rootfs).follow_links(false) {
        let entry = entry.with_context(|| format!("walking {}", rootfs.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path();
        let mode = entry.metadata()?.permissions().mode();
        let path_c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path and a static name; lremovexattr
        // never follows a symlink (and this is a regular file).
        let had_caps =
            unsafe { libc::lremovexattr(path_c.as_ptr(), c"security.capability".as_ptr()) == 0 };
        const CLEARED: u32 = 0o6022;
        if mode & CLEARED != 0 {
            std::fs::set_permissions(
                path,
                std::fs::Permissions::from_mode(mode & 0o7777 & !CLEARED),
            )
            .with_context(|| format!("clearing setuid/setgid/write bits of {}", path.display()))?;
        }
        if had_caps || mode & CLEARED != 0 {
            changed += 1;
        }
    }
    Ok(changed)
}

/// Delete the objects no ref reaches; returns how many and their bytes.
/// Only for a repository of images alone: the host's also holds
/// deployments, which its sysroot cleanup accounts for.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripped_files_lose_setuid_setgid_and_write_for_others_directories_keep_theirs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::create_dir(dir.path().join("shared")).unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        for (p, m) in [
            ("bin/su", 0o4755),
            ("bin/wall", 0o2755),
            ("bin/ls", 0o755),
            ("etc/shared", 0o666),
        ] {
            std::fs::write(dir.path().join(p), "x").unwrap();
            std::fs::set_permissions(dir.path().join(p), std::fs::Permissions::from_mode(m))
                .unwrap();
        }
        std::fs::set_permissions(
            dir.path().join("shared"),
            std::fs::Permissions::from_mode(0o3777),
        )
        .unwrap();
        std::os::unix::fs::symlink("/usr/bin/passwd", dir.path().join("bin/passwd")).unwrap();
        assert_eq!(strip_privileges(dir.path()).unwrap(), 3);
        assert_eq!(mode("etc/shared"), 0o644);
        assert_eq!(
            (mode("bin/su"), mode("bin/wall"), mode("bin/ls")),
            (0o755, 0o755, 0o755)
        );
        assert_eq!(mode("shared"), 0o3777, "directories keep theirs");
        assert_eq!(strip_privileges(dir.path()).unwrap(), 0);
    }

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
            name_from_annotation("registry.example/library/busybox:1.36").unwrap(),
            ImageName {
                name: "busybox".into(),
                tag: "1.36".into()
            }
        );
        assert_eq!(name_from_annotation("latest"), None);
    }

    // ------------------------------------------------------------ hostile images

    use std::io::Write as _;

    fn hex256(d: &[u8]) -> String {
        crate::source::sha256_hex(d)
    }

    fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, d) in files {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(d.len() as u64);
            b.append_data(&mut h, p, *d).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(d: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(d).unwrap();
        gz.finish().unwrap()
    }

    fn put(layout: &Path, data: &[u8]) -> serde_json::Value {
        let h = hex256(data);
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::write(layout.join("blobs/sha256").join(&h), data).unwrap();
        serde_json::json!({ "digest": format!("sha256:{h}"), "size": data.len() })
    }

    /// An image manifest over `layers` (uncompressed tar, blob); returns its descriptor.
    fn image(layout: &Path, layers: &[(Vec<u8>, Vec<u8>)]) -> serde_json::Value {
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": { "Cmd": ["/bin/sh"] },
            "rootfs": { "type": "layers", "diff_ids":
                layers.iter().map(|(t, _)| format!("sha256:{}", hex256(t))).collect::<Vec<_>>() }
        });
        let mut cfg = put(layout, config.to_string().as_bytes());
        cfg["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
        let ls: Vec<_> = layers
            .iter()
            .map(|(_, b)| {
                let mut d = put(layout, b);
                d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
                d
            })
            .collect();
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": cfg, "layers": ls,
        });
        let mut d = put(layout, m.to_string().as_bytes());
        d["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
        d
    }

    fn write_index(layout: &Path, manifests: Vec<serde_json::Value>) {
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": manifests });
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
    }

    fn tagged(mut d: serde_json::Value, tag: &str) -> serde_json::Value {
        d["annotations"] = serde_json::json!({ REF_NAME_ANNOTATION: tag });
        d
    }

    /// A layout of one gzip layer holding `files`.
    fn simple_layout(layout: &Path, files: &[(&str, &[u8])]) -> serde_json::Value {
        let t = tar_with(files);
        let g = gzip(&t);
        image(layout, &[(t, g)])
    }

    struct Store {
        _dir: tempfile::TempDir,
        repo: ostree::Repo,
        path: PathBuf,
    }

    fn store() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo");
        let repo = open_repo(&path).unwrap();
        Store {
            _dir: dir,
            repo,
            path,
        }
    }

    impl Store {
        /// A failed import left nothing: no ref, nothing in tmp.
        fn assert_clean(&self) {
            assert!(list(&self.repo).unwrap().is_empty(), "nothing committed");
            let left: Vec<_> = std::fs::read_dir(self.path.join("tmp"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().starts_with(STAGING_PREFIX))
                .collect();
            assert!(left.is_empty(), "staging left behind: {left:?}");
        }

        fn import_err(&self, path: &Path, opts: &ImportOptions) -> String {
            let e = import_with(&self.repo, path, opts).unwrap_err();
            self.assert_clean();
            format!("{e:#}")
        }
    }

    fn named() -> ImportOptions {
        ImportOptions {
            name: Some("t:1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_decompression_bomb_is_refused_early_and_leaves_nothing() {
        let s = store();
        let dir = tempfile::tempdir().unwrap();
        let zeros = vec![0u8; 24 << 20];
        let d = simple_layout(dir.path(), &[("zeros", &zeros)]);
        write_index(dir.path(), vec![d]);
        let opts = ImportOptions {
            limits: ImportLimits {
                ratio_grace: 1 << 20,
                ..Default::default()
            },
            ..named()
        };
        let err = s.import_err(dir.path(), &opts);
        assert!(
            err.contains("max_ratio") && err.contains("layer 1 of 1"),
            "{err}"
        );
        // The default grace lets small, very compressible layers through.
        import_with(&s.repo, dir.path(), &named()).unwrap_err();
        let small = simple_layout(dir.path(), &[("zeros", &zeros[..4 << 20])]);
        write_index(dir.path(), vec![small]);
        import_with(&s.repo, dir.path(), &named()).unwrap();
    }

    #[test]
    fn image_size_and_layer_count_limits() {
        let s = store();
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..600_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let t1 = tar_with(&[("a", &data)]);
        let t2 = tar_with(&[("b", b"b")]);
        let d = image(
            dir.path(),
            &[(t1.clone(), gzip(&t1)), (t2.clone(), gzip(&t2))],
        );
        write_index(dir.path(), vec![d]);
        let opts = |l: ImportLimits| ImportOptions {
            limits: l,
            ..named()
        };
        let err = s.import_err(
            dir.path(),
            &opts(ImportLimits {
                max_image_size: 300_000,
                ..Default::default()
            }),
        );
        assert!(
            err.contains("max_image_size") && err.contains("layer 1 of 2"),
            "{err}"
        );
        let err = s.import_err(
            dir.path(),
            &opts(ImportLimits {
                max_layers: 1,
                ..Default::default()
            }),
        );
        assert!(
            err.contains("max_layers") && err.contains("2 layers"),
            "{err}"
        );
        let err = s.import_err(
            dir.path(),
            &opts(ImportLimits {
                max_entries: 1,
                ..Default::default()
            }),
        );
        assert!(
            err.contains("max_entries") && err.contains("layer 2 of 2"),
            "{err}"
        );
        import_with(&s.repo, dir.path(), &named()).unwrap();
    }

    #[test]
    fn metadata_sizes_are_checked_before_reading() {
        let s = store();
        let dir = tempfile::tempdir().unwrap();
        let mut d = simple_layout(dir.path(), &[("f", b"x")]);
        let good = d.clone();
        // A descriptor claiming 1 GiB: refused without reading.
        d["size"] = (1u64 << 30).into();
        write_index(dir.path(), vec![d.clone()]);
        let err = s.import_err(dir.path(), &named());
        assert!(
            err.contains("max_metadata_size") && err.contains("1073741824"),
            "{err}"
        );
        // A blob far larger than its descriptor: read only size + 1 bytes.
        let hex = good["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        let p = dir.path().join("blobs/sha256").join(&hex);
        let orig = std::fs::read(&p).unwrap();
        let mut big = orig.clone();
        big.resize(64 << 20, b' ');
        std::fs::write(&p, &big).unwrap();
        write_index(dir.path(), vec![good.clone()]);
        let err = s.import_err(dir.path(), &named());
        assert!(err.contains("mismatch"), "{err}");
        std::fs::write(&p, &orig).unwrap();
        // An index.json over the limit.
        let mut huge = serde_json::json!({ "schemaVersion": 2, "manifests": [good] }).to_string();
        huge.push_str(&" ".repeat(5 << 20));
        std::fs::write(dir.path().join("index.json"), huge).unwrap();
        let err = s.import_err(dir.path(), &named());
        assert!(
            err.contains("index.json") && err.contains("max_metadata_size"),
            "{err}"
        );
    }

    #[test]
    fn layout_files_must_be_plain_files_inside_it() {
        let s = store();
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = simple_layout(dir.path(), &[("f", b"x")]);
        write_index(dir.path(), vec![d.clone()]);
        // index.json as a symlink to a (valid) file elsewhere.
        let idx = dir.path().join("index.json");
        std::fs::rename(&idx, outside.path().join("index.json")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("index.json"), &idx).unwrap();
        let err = s.import_err(dir.path(), &named());
        assert!(
            err.contains("index.json") && err.contains("symbolic link"),
            "{err}"
        );
        std::fs::remove_file(&idx).unwrap();
        write_index(dir.path(), vec![d.clone()]);
        // The manifest blob as a symlink to a host copy of it, then to /dev/zero.
        let hex = d["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        let p = dir.path().join("blobs/sha256").join(&hex);
        let copy = outside.path().join("m");
        std::fs::rename(&p, &copy).unwrap();
        for target in [copy.as_path(), Path::new("/dev/zero")] {
            std::os::unix::fs::symlink(target, &p).unwrap();
            let err = s.import_err(dir.path(), &named());
            assert!(err.contains(&hex) && err.contains("symbolic link"), "{err}");
            std::fs::remove_file(&p).unwrap();
        }
        // A fifo (would block a plain open) and the blobs dir as a symlink.
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = s.import_err(dir.path(), &named());
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_file(&p).unwrap();
        std::fs::rename(&copy, &p).unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::rename(&blobs, outside.path().join("blobs")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("blobs"), &blobs).unwrap();
        let err = s.import_err(dir.path(), &named());
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_file(&blobs).unwrap();
        std::fs::rename(outside.path().join("blobs"), &blobs).unwrap();
        import_with(&s.repo, dir.path(), &named()).unwrap();
    }

    #[test]
    fn a_layout_with_several_tags() {
        let s = store();
        let dir = tempfile::tempdir().unwrap();
        let a = simple_layout(dir.path(), &[("which", b"a")]);
        let b = simple_layout(dir.path(), &[("which", b"b")]);
        write_index(dir.path(), vec![tagged(a, "a"), tagged(b.clone(), "b")]);
        let err = s.import_err(dir.path(), &named());
        assert!(
            err.contains("tags a, b") && err.contains("PATH:TAG"),
            "{err}"
        );
        let err = s.import_err(
            dir.path(),
            &ImportOptions {
                tag: Some("c".into()),
                ..named()
            },
        );
        assert!(err.contains("\"c\"") && err.contains("a, b"), "{err}");
        let info = import_with(
            &s.repo,
            dir.path(),
            &ImportOptions {
                tag: Some("b".into()),
                ..named()
            },
        )
        .unwrap();
        assert_eq!(info.manifest_digest, b["digest"].as_str().unwrap());
        // PATH:TAG, as skopeo's oci:PATH:TAG.
        let with_tag = PathBuf::from(format!("{}:a", dir.path().display()));
        let info_a = import_with(&s.repo, &with_tag, &named()).unwrap();
        assert_ne!(info_a.manifest_digest, info.manifest_digest);
        assert!(import_with(
            &s.repo,
            &with_tag,
            &ImportOptions {
                tag: Some("b".into()),
                ..named()
            }
        )
        .is_err());
        // A path that really has a ':' is a path.
        let (p, t) = split_path_tag(dir.path(), None).unwrap();
        assert_eq!((p.as_path(), t), (dir.path(), None));
    }

    #[test]
    fn docker_archive_member_paths_are_checked() {
        let s = store();
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_with(&[("f", b"x")]);
        let cfg = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", hex256(&layer))] }
        })
        .to_string();
        let chex = hex256(cfg.as_bytes());
        for (config, layer_path) in [
            (format!("{chex}.json"), "../../../etc/passwd".to_string()),
            (format!("{chex}.json"), "/etc/passwd".to_string()),
            (format!("../{chex}.json"), "l/layer.tar".to_string()),
        ] {
            let path = dir.path().join("docker.tar");
            let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
            let mut add = |n: &str, d: &[u8]| {
                let mut h = tar::Header::new_gnu();
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, n, d).unwrap();
            };
            add(&format!("{chex}.json"), cfg.as_bytes());
            add("l/layer.tar", &layer);
            let m = serde_json::json!([{ "Config": config, "RepoTags": ["x:y"], "Layers": [layer_path] }]);
            add("manifest.json", m.to_string().as_bytes());
            b.finish().unwrap();
            drop(b);
            let err = s.import_err(&path, &named());
            assert!(err.contains("not a plain path"), "{err}");
        }
    }

    #[test]
    fn the_store_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let repo = dir.path().join("state/repo");
        open_repo(&repo).unwrap();
        assert_eq!(mode(&repo), 0o700);
        assert_eq!(mode(&repo.join("tmp")), 0o700);
        // Existing, world-readable ones are tightened.
        std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(repo.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        open_repo(&repo).unwrap();
        assert_eq!(mode(&repo), 0o700);
        assert_eq!(mode(&repo.join("tmp")), 0o700);
        let state = dir.path().join("state");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
    }

    #[test]
    fn odd_digests_a_layer_twice_and_an_untagged_leftover() {
        let s = store();
        let dir = tempfile::tempdir().unwrap();
        let t = tar_with(&[("f", b"x")]);
        let g = gzip(&t);
        // The same layer listed twice: applied twice, fine.
        let d = image(
            dir.path(),
            &[(t.clone(), g.clone()), (t.clone(), g.clone())],
        );
        // Plus an untagged manifest next to the tagged one.
        let other = simple_layout(dir.path(), &[("other", b"y")]);
        write_index(dir.path(), vec![tagged(d.clone(), "only"), other]);
        let info = import_with(&s.repo, dir.path(), &named()).unwrap();
        assert_eq!(info.manifest_digest, d["digest"].as_str().unwrap());
        // Digests that are not lowercase sha256.
        for bad in [
            format!("sha512:{}", "0".repeat(128)),
            format!("sha256:{}", hex256(b"x").to_uppercase()),
            "sha256:../../../etc/passwd".to_string(),
        ] {
            let mut d2 = d.clone();
            d2["digest"] = bad.clone().into();
            write_index(dir.path(), vec![d2]);
            let err = format!(
                "{:#}",
                import_with(&s.repo, dir.path(), &named()).unwrap_err()
            );
            assert!(
                err.contains("digest") || err.contains("Invalid encoded"),
                "{bad}: {err}"
            );
        }
    }
}
