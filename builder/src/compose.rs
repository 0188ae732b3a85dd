//! `compose tree`: manifest → prepared root → one OSTree commit on the manifest's ref.
//!
//! The pipeline, in order: resolve the base (apt simulation or a rootfs
//! digest) → input hash → no-op check → version → stage (cached mmdebstrap
//! output or the rootfs) copied into a work directory → files, units, users,
//! kernel arguments, postprocess, removals → SBOM → OSTree layout → commit
//! and ref move in one libostree transaction. Nothing touches the repository
//! before the tree is complete, so a failure or an interruption leaves it as
//! it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cairn_contracts::metadata as meta_keys;
use sha2::{Digest, Sha256};

use crate::manifest::{Base, Manifest, Packages};
use crate::progress::Progress;
use crate::repo::{self, NewCommit};
use crate::{stage, tree};

/// Bump when the meaning of the input hash changes.
const INPUT_FORMAT: &str = "cairn-input-v1";

pub struct ComposeOptions {
    /// Repository to commit into; created (in `repo_mode`) if missing.
    pub repo: PathBuf,
    pub repo_mode: ostree::RepoMode,
    /// Downloaded packages, apt indices and installed package stages.
    pub cache: PathBuf,
    /// Explicit version instead of the automatic `<prefix>.<date>.<serial>`.
    pub version: Option<String>,
    pub dry_run: bool,
    /// Write nothing when the input hash equals the ref's head.
    pub unless_changed: bool,
    /// The `host` executable to install where the manifest's `self-install` says.
    pub host_binary: Option<PathBuf>,
    /// Fixed time for the commit and the automatic version (reproducible builds).
    pub source_date_epoch: Option<i64>,
    /// Who signs the commit (none: unsigned).
    pub signer: Option<crate::keys::Signer>,
    pub progress: Progress,
    /// `--lock`: compose exactly the lock's packages instead of resolving.
    pub lock: Option<crate::lock::Lock>,
    /// `--debs`: the locked `.deb`s come from this directory.
    pub lock_debs: Option<PathBuf>,
    /// Install the packages again even when the stage cache has them.
    pub rebuild_stage: bool,
}

impl ComposeOptions {
    pub fn new(repo: PathBuf, cache: PathBuf) -> ComposeOptions {
        ComposeOptions {
            repo,
            repo_mode: ostree::RepoMode::Archive,
            cache,
            version: None,
            dry_run: false,
            unless_changed: false,
            host_binary: None,
            source_date_epoch: std::env::var("SOURCE_DATE_EPOCH")
                .ok()
                .and_then(|s| s.parse().ok()),
            signer: None,
            progress: Progress::silent(),
            lock: None,
            lock_debs: None,
            rebuild_stage: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed {
        refname: String,
        checksum: String,
        version: String,
        content_checksum: String,
        packages: usize,
    },
    Unchanged {
        refname: String,
        checksum: String,
        version: Option<String>,
    },
    DryRun {
        refname: String,
        manifest: String,
        packages: Vec<String>,
        input_hash: String,
    },
}

/// The base of the tree, resolved but not yet installed.
enum ResolvedBase<'a> {
    Packages {
        packages: &'a Packages,
        resolved: stage::ResolvedPackages,
    },
    Rootfs {
        path: &'a Path,
        digest: String,
    },
}

pub fn compose_tree(manifest: &Manifest, opts: &ComposeOptions) -> Result<Outcome> {
    let progress = &opts.progress;
    // Directories the compose creates get the same modes on every machine.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let refname = manifest.refname.clone();
    if let Some(v) = &opts.version {
        crate::manifest::check_version(v).map_err(|m| anyhow::anyhow!("--version: {m}"))?;
    }
    // Computed at load from the bytes of every file the manifest copies or
    // runs, the same bytes that go into the tree.
    let manifest_digest = manifest.digest();
    std::fs::create_dir_all(&opts.cache)
        .with_context(|| format!("creating cache directory {}", opts.cache.display()))?;
    let _lock = CacheLock::acquire(&opts.cache, progress)?;

    if let Some(lock) = &opts.lock {
        if lock.manifest_digest != manifest_digest {
            bail!(
                "the lock was written for manifest digest {}, but {} has digest {manifest_digest}: \
                 the manifest (or a file or script it names) changed since that commit; \
                 compose with the manifest the lock's commit was composed from, or without --lock",
                lock.manifest_digest,
                manifest.path.display()
            );
        }
        if matches!(manifest.base, Base::Rootfs(_)) && !lock.packages.is_empty() {
            bail!(
                "the lock lists {} packages, but manifest {} has no [packages] (it uses `rootfs`): \
                 the lock belongs to another tree",
                lock.packages.len(),
                manifest.path.display()
            );
        }
    } else if opts.lock_debs.is_some() {
        bail!("--debs needs --lock: the .debs are checked against a lock's checksums");
    }
    let base = match &manifest.base {
        Base::Packages(packages) => ResolvedBase::Packages {
            packages,
            resolved: match &opts.lock {
                Some(lock) => stage::resolve_locked(
                    packages,
                    lock,
                    opts.lock_debs.as_deref(),
                    &opts.cache,
                    progress,
                )?,
                None => stage::resolve(packages, &opts.cache, progress)?,
            },
        },
        Base::Rootfs(path) => ResolvedBase::Rootfs {
            path,
            digest: stage::rootfs_digest(path)?,
        },
    };

    let host_binary = match (&manifest.self_install, &opts.host_binary) {
        (Some(_), None) => bail!(
            "manifest {}: key `self-install` needs the host binary to install; \
             run the compose through `host compose tree`",
            manifest.path.display()
        ),
        (Some(_), Some(b)) => Some(b.clone()),
        (None, _) => None,
    };
    // Registry apps resolve to digests first: what a tag names now is an
    // input like the package set.
    let apps = crate::apps::prepare(&manifest.apps, opts.lock.as_ref().map(|l| &l.apps[..]))?;
    let app_digests: Vec<String> = apps
        .iter()
        .filter_map(|a| Some(format!("{} {}", a.app.name, a.resolved_digest()?)))
        .collect();
    let input_hash = input_hash(manifest_digest, &base, host_binary.as_deref(), &app_digests)?;

    if opts.dry_run {
        let packages = match &base {
            ResolvedBase::Packages { resolved, .. } => resolved.set.to_lines(),
            ResolvedBase::Rootfs { .. } => Vec::new(),
        };
        return Ok(Outcome::DryRun {
            refname,
            manifest: manifest.to_toml(),
            packages,
            input_hash,
        });
    }

    let repo = repo::open_or_create(&opts.repo, opts.repo_mode)?;
    check_writable(&opts.repo)?;
    let head = repo::ref_head(&repo, &refname)?;
    let history = repo::history(&repo, &refname)?;
    if opts.unless_changed {
        if let Some(head_info) = history.first() {
            if head_info.string(meta_keys::INPUT_HASH).as_deref() == Some(input_hash.as_str()) {
                return Ok(Outcome::Unchanged {
                    refname,
                    checksum: head_info.checksum.clone(),
                    version: head_info.version(),
                });
            }
        }
    }

    let now = opts
        .source_date_epoch
        .unwrap_or_else(|| chrono::Utc::now().timestamp());
    let existing: Vec<String> = history.iter().filter_map(|c| c.version()).collect();
    let version = match &opts.version {
        Some(v) => {
            if existing.contains(v) {
                bail!("version {v} already exists on ref {refname}; versions are never reused: pick another or omit --version");
            }
            v.clone()
        }
        None => next_version(manifest.version_prefix.as_deref(), now, &existing),
    };

    // Work in the cache's file system so copies can reflink and renames stay cheap.
    let work_parent = opts.cache.join("work");
    clean_stale_work(&work_parent)?;
    std::fs::create_dir_all(&work_parent)?;
    let work = tempfile::Builder::new()
        .prefix("compose-")
        .tempdir_in(&work_parent)?;
    let root = work.path().join("rootfs");

    let (step, locked_packages) = match &base {
        ResolvedBase::Packages { packages, resolved } => {
            // Installed before the step starts, so its own progress is not
            // nested inside "preparing the tree".
            let staged = stage::ensure_stage(
                packages,
                resolved,
                &opts.cache,
                opts.rebuild_stage,
                progress,
            )?;
            let step = progress.step("preparing the tree");
            step.message("recording the packages in the lock");
            let locked = match &opts.lock {
                // Verified against the lock before anything was installed.
                Some(lock) => lock.packages.clone(),
                None => lock_packages(&staged.rootfs, &opts.cache, resolved)?,
            };
            step.message("copying the package stage");
            stage::copy_tree(&staged.rootfs, &root)?;
            (step, locked)
        }
        ResolvedBase::Rootfs { path, .. } => {
            let step = progress.step("preparing the tree");
            step.message("unpacking the base rootfs");
            stage::unpack_rootfs(path, &root)?;
            (step, Vec::new())
        }
    };
    let lock = crate::lock::Lock {
        format: crate::lock::FORMAT,
        source_date_epoch: now,
        manifest_digest: manifest_digest.to_string(),
        host_digest: crate::lock::composer_digest()?,
        sources: match &base {
            ResolvedBase::Packages { resolved, .. } => {
                resolved.sources.iter().map(|s| s.0.clone()).collect()
            }
            ResolvedBase::Rootfs { .. } => Vec::new(),
        },
        packages: locked_packages,
        apps: apps.iter().filter_map(|a| a.locked()).collect(),
    };
    // From here on every write into the tree resolves inside it.
    let tree = crate::confined::Root::open(&root)?;
    let baked_apps = customize(
        manifest,
        &apps,
        &tree,
        work.path(),
        host_binary.as_deref(),
        &refname,
        &version,
        now,
    )?;
    // After the scripts, so it lists what the tree ships; before the layout
    // moves the dpkg database (the SBOM goes to /usr, which the layout keeps).
    step.message("writing the SBOM");
    let sbom_sources = match &base {
        ResolvedBase::Packages { resolved, .. } => crate::sbom::ChecksumSources {
            // With a lock: exactly the verified .debs.
            debs: Some(match &resolved.locked {
                Some(locked) => locked.pool(),
                None => stage::debs_dir(&opts.cache),
            }),
            lists: Some(
                crate::apt::AptState {
                    dir: crate::apt::AptState::dir_for(&opts.cache, &resolved.sources),
                }
                .lists_dir(),
            ),
        },
        ResolvedBase::Rootfs { .. } => crate::sbom::ChecksumSources::default(),
    };
    crate::sbom::write_into(&tree, now, &sbom_sources)?;
    step.finish("");
    let installed = tree::installed_packages(&tree)?;
    let facts = tree::ostree_layout(&tree)?;

    let step = progress.step("committing");
    let mut metadata: BTreeMap<String, glib::Variant> = BTreeMap::new();
    use glib::prelude::ToVariant;
    for (k, v) in &manifest.metadata {
        metadata.insert(k.clone(), v.to_variant());
    }
    metadata.insert(meta_keys::VERSION.into(), version.to_variant());
    metadata.insert(meta_keys::INPUT_HASH.into(), input_hash.to_variant());
    metadata.insert(
        meta_keys::MANIFEST_DIGEST.into(),
        manifest_digest.to_variant(),
    );
    metadata.insert(
        meta_keys::PACKAGES.into(),
        installed.to_lines().to_variant(),
    );
    metadata.insert(meta_keys::KARGS.into(), manifest.kernel_args.to_variant());
    metadata.insert(meta_keys::LOCK.into(), lock.to_toml().to_variant());
    if !baked_apps.is_empty() {
        metadata.insert(meta_keys::APPS.into(), baked_apps.to_variant());
    }
    if let Some(k) = &facts.kernel {
        metadata.insert(meta_keys::KERNEL.into(), k.to_variant());
    }
    let subject = format!("{refname} {version}");
    let checksum = repo::write_commit(
        &repo,
        &root,
        NewCommit {
            refname: &refname,
            parent: head.as_deref(),
            subject: &subject,
            timestamp: u64::try_from(now).unwrap_or(0),
            metadata,
            bootable: facts.kernel.is_some(),
            signer: opts.signer.as_ref(),
        },
    )?;
    let content_checksum = repo::content_checksum(&repo, &checksum)?;
    step.finish(&checksum);
    Ok(Outcome::Committed {
        refname,
        checksum,
        version,
        content_checksum,
        packages: installed.0.len(),
    })
}

/// The lock's packages from an installed stage: its dpkg database, with
/// the SHA-256 of each `.deb` taken as the SBOM takes it.
fn lock_packages(
    stage_root: &Path,
    cache: &Path,
    resolved: &stage::ResolvedPackages,
) -> Result<Vec<crate::lock::LockedPackage>> {
    let root = crate::confined::Root::open(stage_root)?;
    let sources = crate::sbom::ChecksumSources {
        debs: Some(stage::debs_dir(cache)),
        lists: Some(
            crate::apt::AptState {
                dir: crate::apt::AptState::dir_for(cache, &resolved.sources),
            }
            .lists_dir(),
        ),
    };
    let mut out = Vec::new();
    for p in crate::sbom::installed_with_checksums(&root, &sources)? {
        let Some(sha256) = p.sha256 else {
            bail!(
                "no SHA-256 for the installed {}={} ({}): its .deb is neither in {} nor in the apt indices, \
                 so the lock cannot record it; remove the stage {} and compose again",
                p.name,
                p.version,
                p.arch,
                stage::debs_dir(cache).display(),
                stage_root.parent().unwrap_or(stage_root).display()
            );
        };
        out.push(crate::lock::LockedPackage {
            name: p.name,
            version: p.version,
            architecture: p.arch,
            sha256,
        });
    }
    out.sort();
    Ok(out)
}

/// What `compose verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The re-composed tree has the commit's content checksum.
    Identical { content_checksum: String },
    /// It does not: the paths that differ (original → re-composed).
    Differs {
        original: String,
        recomposed: String,
        files: crate::diff::FileDiff,
    },
}

/// Re-composes commit `rev` of `opts.repo` from its recorded lock (packages,
/// sources, `SOURCE_DATE_EPOCH`, version) and `manifest` into a scratch
/// repository in the cache (removed afterwards, also on error) and compares
/// the trees. A different composing executable than recorded is a warning.
pub fn verify(manifest: &Manifest, rev: &str, mut opts: ComposeOptions) -> Result<Verification> {
    let repo = repo::open(&opts.repo)?;
    let commit = repo::resolve_commit(&repo, rev)?;
    let info = repo::load_commit(&repo, &commit)?;
    let text = info.string(meta_keys::LOCK).ok_or_else(|| {
        anyhow::anyhow!(
            "commit {commit} ({rev}) records no lockfile (`{}`): it was composed before cairn recorded \
             its inputs, so it cannot be verified; compose it again and verify the new commit",
            meta_keys::LOCK
        )
    })?;
    let lock = crate::lock::Lock::parse(&text, &format!("the lock of commit {commit}"))?;
    if lock.manifest_digest != manifest.digest() {
        bail!(
            "manifest {} has digest {}, but commit {commit} was composed from a manifest with digest {}: \
             check out the manifest (and the files and scripts it names) the commit was composed from",
            manifest.path.display(),
            manifest.digest(),
            lock.manifest_digest
        );
    }
    let me = crate::lock::composer_digest()?;
    if me != lock.host_digest {
        let warning = format!(
            "this executable (sha256 {me}) is not the one that composed {commit} (sha256 {}): \
             the result may differ because the composer differs",
            lock.host_digest
        );
        // A warning, not progress: printed under --quiet too.
        tracing::warn!("{warning}");
    }
    std::fs::create_dir_all(&opts.cache)
        .with_context(|| format!("creating cache directory {}", opts.cache.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".verify-")
        .tempdir_in(&opts.cache)
        .with_context(|| format!("creating a scratch repository in {}", opts.cache.display()))?;
    let original_repo = std::mem::replace(&mut opts.repo, scratch.path().join("repo"));
    opts.repo_mode = ostree::RepoMode::BareUser;
    opts.version = info.version();
    opts.source_date_epoch = Some(lock.source_date_epoch);
    opts.lock = Some(lock);
    opts.dry_run = false;
    opts.unless_changed = false;
    opts.signer = None;
    let Outcome::Committed {
        checksum,
        content_checksum,
        ..
    } = compose_tree(manifest, &opts)?
    else {
        bail!("the scratch compose of {commit} committed nothing");
    };
    let original = repo::content_checksum(&repo, &commit)?;
    if original == content_checksum {
        return Ok(Verification::Identical { content_checksum });
    }
    let scratch_repo = repo::open(&opts.repo)?;
    let files =
        crate::diff::diff_files(&repo, &commit, &scratch_repo, &checksum).with_context(|| {
            format!(
                "comparing {commit} of {} with the re-composed tree",
                original_repo.display()
            )
        })?;
    Ok(Verification::Differs {
        original,
        recomposed: content_checksum,
        files,
    })
}

/// A directory already in the OSTree layout, committed as is (`compose commit`).
pub struct PreparedCommit<'a> {
    pub root: &'a Path,
    pub refname: &'a str,
    pub version: Option<&'a str>,
    pub subject: Option<&'a str>,
}

/// Commits a prepared directory onto a ref, with the parent set to the ref's
/// head. Returns (commit checksum, content checksum).
pub fn commit_prepared(
    opts: &ComposeOptions,
    spec: PreparedCommit<'_>,
) -> Result<(String, String)> {
    crate::manifest::check_ref(spec.refname).map_err(|m| anyhow::anyhow!("--ref: {m}"))?;
    if let Some(v) = spec.version {
        crate::manifest::check_version(v).map_err(|m| anyhow::anyhow!("--version: {m}"))?;
    }
    if !spec.root.is_dir() {
        bail!("{} is not a directory", spec.root.display());
    }
    if spec.root.join("etc").is_dir() && !spec.root.join("usr/etc").exists() {
        bail!(
            "{} has /etc but no /usr/etc: it is not in the OSTree layout; use `compose tree` with `rootfs = ...` to lay it out",
            spec.root.display()
        );
    }
    let repo = repo::open_or_create(&opts.repo, opts.repo_mode)?;
    let head = repo::ref_head(&repo, spec.refname)?;
    let now = opts
        .source_date_epoch
        .unwrap_or_else(|| chrono::Utc::now().timestamp());
    let mut metadata: BTreeMap<String, glib::Variant> = BTreeMap::new();
    use glib::prelude::ToVariant;
    if let Some(v) = spec.version {
        metadata.insert(meta_keys::VERSION.into(), v.to_variant());
    }
    let bootable = spec.root.join("usr/lib/modules").is_dir();
    let subject = spec
        .subject
        .map(str::to_string)
        .unwrap_or_else(|| format!("{} commit", spec.refname));
    let checksum = repo::write_commit(
        &repo,
        spec.root,
        NewCommit {
            refname: spec.refname,
            parent: head.as_deref(),
            subject: &subject,
            timestamp: u64::try_from(now).unwrap_or(0),
            metadata,
            bootable,
            signer: opts.signer.as_ref(),
        },
    )?;
    let content = repo::content_checksum(&repo, &checksum)?;
    Ok((checksum, content))
}

/// What `compose promote` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    pub source: String,
    pub commit: String,
    pub version: String,
    pub content_checksum: String,
}

/// The test result a promotion is gated on (`--tested-by`): every test
/// passed; recorded in the promoted commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestEvidence {
    /// `sha256:<hex>` of the result file.
    pub digest: String,
    /// What it counted, e.g. `12 tests passed`.
    pub summary: String,
}

/// Moves a tested commit from one channel (ref) to another without
/// rebuilding: a new commit on `to` with the very same tree (same content
/// checksum) and metadata, its own version, and its parent on `to`.
/// `rev` (a checksum or version; default: the head of `from`) must be in
/// `from`'s history, so only what was tested there is promoted.
pub fn promote(
    opts: &ComposeOptions,
    from: &str,
    to: &str,
    rev: Option<&str>,
    tested_by: Option<&TestEvidence>,
) -> Result<Promotion> {
    crate::manifest::check_ref(to).map_err(|m| anyhow::anyhow!("--to: {m}"))?;
    if let Some(v) = &opts.version {
        crate::manifest::check_version(v).map_err(|m| anyhow::anyhow!("--version: {m}"))?;
    }
    let repo = repo::open(&opts.repo)?;
    let history = repo::history(&repo, from)?;
    if history.is_empty() {
        bail!("ref {from} does not exist in {}", opts.repo.display());
    }
    let source = match rev {
        None => history[0].clone(),
        Some(rev) => {
            let wanted = repo::resolve_commit(&repo, rev)?;
            history.iter().find(|c| c.checksum == wanted).cloned().ok_or_else(|| {
                anyhow::anyhow!("commit {wanted} ({rev}) is not in the history of {from}: only what {from} carried can be promoted")
            })?
        }
    };
    let target = repo::history(&repo, to)?;
    if target.first().is_some_and(|head| {
        repo::content_checksum(&repo, &head.checksum).ok()
            == repo::content_checksum(&repo, &source.checksum).ok()
    }) {
        bail!(
            "{to} already carries the tree of {} (same content checksum); nothing to promote",
            source.checksum
        );
    }
    let now = opts
        .source_date_epoch
        .unwrap_or_else(|| chrono::Utc::now().timestamp());
    let existing: Vec<String> = target.iter().filter_map(|c| c.version()).collect();
    let version = match &opts.version {
        Some(v) if existing.contains(v) => {
            bail!("version {v} already exists on ref {to}; pick another or omit --version")
        }
        Some(v) => v.clone(),
        None => next_version(
            version_prefix(source.version().as_deref()).as_deref(),
            now,
            &existing,
        ),
    };

    // Same metadata (packages, kernel, kargs, input hash), a new version, and where it came from.
    use glib::prelude::ToVariant;
    let dict = glib::VariantDict::new(Some(&source.metadata));
    dict.insert_value(meta_keys::VERSION, &version.to_variant());
    dict.insert_value(meta_keys::PROMOTED_FROM, &source.checksum.to_variant());
    dict.insert_value(meta_keys::PROMOTED_FROM_REF, &from.to_variant());
    if let Some(v) = source.version() {
        dict.insert_value(meta_keys::PROMOTED_FROM_VERSION, &v.to_variant());
    }
    // An earlier promotion's evidence is for the same tree: it stays unless
    // this one brings its own.
    if let Some(t) = tested_by {
        dict.insert_value(meta_keys::TESTED_BY, &t.digest.to_variant());
        dict.insert_value(meta_keys::TESTED_BY_SUMMARY, &t.summary.to_variant());
    }
    let metadata = dict.end();
    let parent = target.first().map(|c| c.checksum.clone());
    let subject = format!(
        "{to} {version} (promoted from {from} {})",
        source.version().unwrap_or_default()
    );
    let commit = repo::write_commit_of_tree(
        &repo,
        &source.checksum,
        to,
        parent.as_deref(),
        &subject,
        u64::try_from(now).unwrap_or(0),
        &metadata,
        opts.signer.as_ref(),
    )?;
    let content_checksum = repo::content_checksum(&repo, &commit)?;
    Ok(Promotion {
        source: source.checksum,
        commit,
        version,
        content_checksum,
    })
}

/// `1.20261124.3` → `1`; versions without the date form have no prefix.
fn version_prefix(version: Option<&str>) -> Option<String> {
    let v = version?;
    let mut parts: Vec<&str> = v.split('.').collect();
    if parts.len() >= 3 {
        let serial = parts.pop()?;
        let date = parts.pop()?;
        if date.len() == 8
            && date.chars().all(|c| c.is_ascii_digit())
            && serial.chars().all(|c| c.is_ascii_digit())
        {
            return if parts.is_empty() {
                None
            } else {
                Some(parts.join("."))
            };
        }
    }
    None
}

#[allow(clippy::too_many_arguments)]
fn customize(
    manifest: &Manifest,
    apps: &[crate::apps::Prepared],
    root: &crate::confined::Root,
    scratch: &Path,
    host_binary: Option<&Path>,
    refname: &str,
    version: &str,
    now: i64,
) -> Result<Vec<String>> {
    let m = manifest;
    tree::add_files(root, &m.files)?;
    tree::add_trusted_keys(root, &m.trusted_keys)?;
    if let (Some(dst), Some(bin)) = (&m.self_install, host_binary) {
        tree::self_install(root, bin, dst, scratch)?;
    }
    let apps = crate::apps::bake(root, apps, scratch)?;
    tree::write_kargs(root, &m.kernel_args)?;
    tree::write_sysusers(root, &m.users, &m.groups)?;
    tree::apply_units(root, &m.units.enable, &m.units.disable, &m.units.mask)?;
    let env = vec![
        ("CAIRN_REF".to_string(), refname.to_string()),
        ("CAIRN_VERSION".to_string(), version.to_string()),
        ("SOURCE_DATE_EPOCH".to_string(), now.to_string()),
    ];
    tree::run_postprocess(root, &m.postprocess, &env)?;
    tree::remove_files(root, &m.remove_files)?;
    Ok(apps)
}

/// Everything that determines the tree's content, hashed: the manifest's
/// meaning, the exact package set (or base root), and the installed binary.
fn input_hash(
    manifest_digest: &str,
    base: &ResolvedBase<'_>,
    host_binary: Option<&Path>,
    registry_apps: &[String],
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(INPUT_FORMAT);
    h.update("\nmanifest ");
    h.update(manifest_digest);
    match base {
        ResolvedBase::Packages { resolved: r, .. } => {
            h.update("\nsources\n");
            for s in &r.sources {
                h.update(&s.0);
                h.update("\n");
            }
            h.update("packages\n");
            for l in r.set.to_lines() {
                h.update(l);
                h.update("\n");
            }
        }
        ResolvedBase::Rootfs { digest, .. } => {
            h.update("\nrootfs ");
            h.update(digest);
        }
    }
    // (Absent when there are none, so other trees hash as before.)
    for app in registry_apps {
        h.update("\napp ");
        h.update(app);
    }
    if let Some(bin) = host_binary {
        // Every executable (see tree::self_install), by its name.
        for path in cairn_contracts::names::executables(bin) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            h.update(format!("\n{name} "));
            h.update(
                crate::manifest::file_sha256(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            );
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// `<prefix>.<YYYYMMDD>.<serial>`, the serial one past the highest already
/// used on the ref that day (so a version is never handed out twice).
pub fn next_version(prefix: Option<&str>, now: i64, existing: &[String]) -> String {
    let date = chrono::DateTime::from_timestamp(now, 0)
        .unwrap_or_default()
        .format("%Y%m%d")
        .to_string();
    let stem = match prefix {
        Some(p) if !p.is_empty() => format!("{p}.{date}"),
        _ => date,
    };
    let serial = existing
        .iter()
        .filter_map(|v| {
            v.strip_prefix(&stem)?
                .strip_prefix('.')?
                .parse::<u64>()
                .ok()
        })
        .max()
        .map_or(0, |s| s + 1);
    format!("{stem}.{serial}")
}

fn check_writable(repo: &Path) -> Result<()> {
    let probe = repo.join("tmp");
    match tempfile::tempfile_in(&probe) {
        Ok(_) => Ok(()),
        Err(e) => bail!(
            "repository {} is not writable ({e}); check its permissions and free space",
            repo.display()
        ),
    }
}

fn clean_stale_work(dir: &Path) -> Result<()> {
    // Only called under the cache lock, so no other compose is using these.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for entry in rd.flatten() {
            tracing::info!(
                "removing leftover work directory {}",
                entry.path().display()
            );
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing leftover {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// One compose at a time per cache: they share the apt state and stages.
struct CacheLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl CacheLock {
    fn acquire(cache: &Path, progress: &Progress) -> Result<CacheLock> {
        let path = cache.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(l) => l,
            Err((file, _)) => {
                progress.note(&format!(
                    "waiting for another compose using {}",
                    cache.display()
                ));
                nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| e)
                    .with_context(|| format!("locking {}", path.display()))?
            }
        };
        Ok(CacheLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_per_day_and_never_repeat() {
        let day = 1_795_000_000; // 2026-11-18
        assert_eq!(next_version(Some("1"), day, &[]), "1.20261118.0");
        let existing = vec![
            "1.20261118.0".to_string(),
            "1.20261118.4".to_string(),
            "1.20261117.9".to_string(),
        ];
        assert_eq!(next_version(Some("1"), day, &existing), "1.20261118.5");
        assert_eq!(next_version(None, day, &existing), "20261118.0");
        assert_eq!(
            next_version(Some("1"), day + 86_400, &existing),
            "1.20261119.0"
        );
    }
}
