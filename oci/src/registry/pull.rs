//! Resolve a reference to its manifest, and download an image's blobs into
//! an OCI layout, each verified as it streams.

use std::collections::VecDeque;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::image::{ImageIndex, ImageManifest};
use sha2::Digest as _;

use super::client::{Client, Failure};
use super::reference::{Platform, Reference};
use super::PullProgress;
use crate::limits::ImportLimits;
use crate::source::{sha256_hex, Sha256};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// What a pull is asked for besides the reference.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The manifest to take from an image index.
    pub platform: Platform,
    /// Blobs downloaded at once.
    pub parallel: usize,
    pub limits: ImportLimits,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            platform: Platform::host(),
            parallel: 3,
            limits: ImportLimits::default(),
        }
    }
}

/// A reference resolved to the image manifest for one platform.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub reference: Reference,
    /// What the reference itself points at: the index's digest for a
    /// multi-platform image, else the manifest's. Pinning this keeps every
    /// platform's choice reproducible.
    pub digest: Sha256,
    /// The chosen image manifest's digest (what the store records).
    pub manifest_digest: Sha256,
    pub media_type: String,
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
}

impl Resolved {
    /// The config and layer blobs: `(digest, size)`.
    pub fn blobs(&self) -> Result<Vec<(Sha256, u64)>> {
        let mut v = vec![(
            Sha256::parse(self.manifest.config().digest().as_ref())?,
            self.manifest.config().size(),
        )];
        for l in self.manifest.layers() {
            v.push((Sha256::parse(l.digest().as_ref())?, l.size()));
        }
        Ok(v)
    }
}

/// Fetch a manifest or index by tag or digest: at most the metadata limit,
/// checked against the digest when asked by digest. Returns the bytes, their
/// digest and the media type.
fn fetch_manifest(
    client: &Client,
    target: &str,
    expect: Option<&Sha256>,
    limits: &ImportLimits,
    progress: &dyn PullProgress,
) -> Result<(Vec<u8>, Sha256, String)> {
    let what = format!("fetching manifest {}@{target}", client.reference.repository);
    let (body, content_type) = client
        .with_retries(&what, progress, || {
            let resp = client.get(&format!("manifests/{target}"), &[("Accept", ACCEPT)])?;
            let content_type = resp.content_type().to_string();
            let mut body = Vec::new();
            resp.into_reader()
                .take(limits.max_metadata_size + 1)
                .read_to_end(&mut body)?;
            if body.len() as u64 > limits.max_metadata_size {
                return Err(Failure::fatal(anyhow!(
                    "the manifest is over {} bytes (the metadata limit): refused",
                    limits.max_metadata_size
                )));
            }
            Ok((body, content_type))
        })
        .with_context(|| what.clone())?;
    let digest = Sha256(sha256_hex(&body));
    if let Some(want) = expect {
        if *want != digest {
            bail!(
                "registry {} served {}@{want} with content {digest}: refused (the registry is \
                 corrupt or tampered with)",
                client.reference.registry,
                client.reference.repository
            );
        }
    }
    // The document's own mediaType wins over the header (registries
    // sometimes answer a generic type).
    let declared = serde_json::from_slice::<serde_json::Value>(&body)
        .with_context(|| format!("the manifest {digest} is not JSON"))?
        .get("mediaType")
        .and_then(|m| m.as_str())
        .map(str::to_string);
    let media_type = declared.unwrap_or(content_type);
    Ok((body, digest, media_type))
}

/// Resolve `reference` to the image manifest for `opts.platform`.
pub fn resolve(
    client: &Client,
    reference: &Reference,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<Resolved> {
    let limits = &opts.limits;
    let (mut bytes, top, mut media) = fetch_manifest(
        client,
        &reference.target(),
        reference.digest.as_ref(),
        limits,
        progress,
    )?;
    let mut digest = top.clone();
    if media == OCI_INDEX || media == DOCKER_LIST {
        let index = ImageIndex::from_reader(&bytes[..])
            .with_context(|| format!("parsing the image index {top} of {reference}"))?;
        let want = &opts.platform;
        let chosen = index
            .manifests()
            .iter()
            .find(|m| {
                m.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == want.os
                        && p.architecture().to_string() == want.architecture
                        && want
                            .variant
                            .as_ref()
                            .map_or(true, |v| p.variant().as_deref() == Some(v.as_str()))
                })
            })
            .ok_or_else(|| {
                let listed: Vec<String> = index
                    .manifests()
                    .iter()
                    .filter_map(|m| m.platform().as_ref())
                    .map(|p| {
                        let mut s = format!("{}/{}", p.os(), p.architecture());
                        if let Some(v) = p.variant() {
                            s.push_str(&format!("/{v}"));
                        }
                        s
                    })
                    .collect();
                anyhow!(
                    "{reference} has no image for {want}; it has {} (pick one with --platform)",
                    if listed.is_empty() {
                        "none with a platform".to_string()
                    } else {
                        listed.join(", ")
                    }
                )
            })?;
        let d = Sha256::parse(chosen.digest().as_ref())?;
        let inner_media = chosen.media_type().to_string();
        if inner_media != OCI_MANIFEST && inner_media != DOCKER_MANIFEST {
            bail!("the index of {reference} lists {d} as {inner_media}: only image manifests are taken from an index");
        }
        (bytes, digest, media) =
            fetch_manifest(client, &d.to_string(), Some(&d), limits, progress)?;
    }
    if media != OCI_MANIFEST && media != DOCKER_MANIFEST {
        bail!(
            "{reference} is a {media:?}; cairn takes OCI and Docker v2 schema 2 images (schema 1 \
             and artifacts are not images it runs)"
        );
    }
    let manifest = ImageManifest::from_reader(&bytes[..])
        .with_context(|| format!("parsing the image manifest {digest} of {reference}"))?;
    if manifest.layers().len() > limits.max_layers {
        bail!(
            "{reference} has {} layers, over the limit of {} (--max-layers)",
            manifest.layers().len(),
            limits.max_layers
        );
    }
    if manifest.config().size() > limits.max_metadata_size {
        bail!(
            "the config of {reference} is {} bytes, over the metadata limit",
            manifest.config().size()
        );
    }
    let layer_bytes: u64 = manifest
        .layers()
        .iter()
        .map(|l| l.size())
        .fold(0, u64::saturating_add);
    if layer_bytes > limits.max_image_size {
        bail!(
            "the layers of {reference} are {layer_bytes} bytes compressed, over the image size limit of {} (--max-image-size)",
            limits.max_image_size
        );
    }
    Ok(Resolved {
        reference: reference.clone(),
        digest: top,
        manifest_digest: digest,
        media_type: media,
        manifest_bytes: bytes,
        manifest,
    })
}

/// Download the blobs of `resolved` into a new OCI layout at `layout`
/// (index.json naming the one manifest). Returns the bytes fetched.
pub fn pull_layout(
    client: &Client,
    resolved: &Resolved,
    layout: &Path,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<u64> {
    let blobs_dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs_dir)
        .with_context(|| format!("creating {}", blobs_dir.display()))?;
    let mut blobs = resolved.blobs()?;
    // One blob listed twice is fetched once.
    blobs.sort_by(|a, b| a.0 .0.cmp(&b.0 .0));
    blobs.dedup_by(|a, b| a.0 == b.0);
    let total: u64 = blobs.iter().map(|b| b.1).fold(0, u64::saturating_add);
    progress.resolved(&resolved.manifest_digest.to_string(), blobs.len(), total);

    let queue = Mutex::new(blobs.into_iter().collect::<VecDeque<_>>());
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let fetched = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..opts.parallel.max(1) {
            s.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Some((digest, size)) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                match fetch_blob(client, &digest, size, &blobs_dir, &stop, progress) {
                    Ok(n) => {
                        fetched.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let m = &resolved.manifest_digest;
    std::fs::write(blobs_dir.join(m.hex()), &resolved.manifest_bytes)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": resolved.media_type,
            "digest": m.to_string(),
            "size": resolved.manifest_bytes.len(),
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(fetched.into_inner())
}

/// One blob into `dir/<hex>`: streamed through sha256 into `<hex>.partial`,
/// never past its descriptor's size; a dropped connection resumes where it
/// broke (a range request) or starts over if the registry ignores ranges.
/// The file gets its final name only once its digest matched.
fn fetch_blob(
    client: &Client,
    digest: &Sha256,
    size: u64,
    dir: &Path,
    stop: &AtomicBool,
    progress: &dyn PullProgress,
) -> Result<u64> {
    let done = dir.join(digest.hex());
    let partial = dir.join(format!("{}.partial", digest.hex()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut have: u64 = 0;
    let mut fetched: u64 = 0;
    progress.blob_started(&digest.to_string(), size);
    let what = format!("downloading blob {digest}");
    client
        .with_retries(&what, progress, || {
            let range = format!("bytes={have}-");
            let mut headers = vec![("Accept-Encoding", "identity")];
            if have > 0 {
                headers.push(("Range", range.as_str()));
            }
            let resp = client.get(&format!("blobs/{digest}"), &headers)?;
            if have > 0 && resp.status() != 206 {
                // The registry sent the whole blob again: start over.
                file.set_len(0).map_err(Failure::from)?;
                file.rewind().map_err(Failure::from)?;
                hasher = sha2::Sha256::new();
                have = 0;
            }
            let remaining = size - have;
            if let Some(len) = resp
                .header("Content-Length")
                .and_then(|l| l.parse::<u64>().ok())
            {
                if len != remaining {
                    return Err(Failure::fatal(anyhow!(
                    "the registry sends {len} bytes of blob {digest} where {remaining} are due \
                     (its descriptor says {size}): refused"
                )));
                }
            }
            let mut reader = resp.into_reader().take(remaining + 1);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Err(Failure::fatal(anyhow!("stopped: another blob failed")));
                }
                let n = reader.read(&mut buf).map_err(Failure::from)?;
                if n == 0 {
                    break;
                }
                if have + n as u64 > size {
                    return Err(Failure::fatal(anyhow!(
                        "blob {digest} is longer than its descriptor's {size} bytes: refused"
                    )));
                }
                file.write_all(&buf[..n])
                    .with_context(|| format!("writing {}", partial.display()))?;
                hasher.update(&buf[..n]);
                have += n as u64;
                fetched += n as u64;
                progress.blob_advanced(&digest.to_string(), n as u64);
            }
            if have < size {
                return Err(Failure::transient(anyhow!(
                    "the connection ended after {have} of {size} bytes"
                )));
            }
            Ok(())
        })
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })
        .with_context(|| what.clone())?;
    let got = hex::encode(hasher.finalize());
    if got != digest.hex() {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "blob {digest} from {} has content sha256:{got}: refused (the registry's copy is \
             corrupt or was tampered with)",
            client.reference.registry
        );
    }
    file.sync_all()?;
    std::fs::rename(&partial, &done)
        .with_context(|| format!("renaming {} into place", partial.display()))?;
    progress.blob_finished(&digest.to_string());
    Ok(fetched)
}
