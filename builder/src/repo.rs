//! The OSTree repository side: open or create, write a commit in one
//! transaction, resolve refs/versions/checksums, read commit metadata.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use glib::prelude::*;
use ostree::gio;

/// Opens `path`, creating an `archive` repository (servable over plain HTTP as is) if missing.
pub fn open_or_create(path: &Path, mode: ostree::RepoMode) -> Result<ostree::Repo> {
    let repo = ostree::Repo::new_for_path(path);
    if path.join("config").exists() {
        repo.open(gio::Cancellable::NONE)
            .with_context(|| format!("opening OSTree repository {}", path.display()))?;
    } else {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        repo.create(mode, gio::Cancellable::NONE)
            .with_context(|| format!("creating OSTree repository {}", path.display()))?;
    }
    Ok(repo)
}

pub fn open(path: &Path) -> Result<ostree::Repo> {
    if !path.join("config").exists() {
        bail!(
            "{} is not an OSTree repository (no config file)",
            path.display()
        );
    }
    let repo = ostree::Repo::new_for_path(path);
    repo.open(gio::Cancellable::NONE)
        .with_context(|| format!("opening OSTree repository {}", path.display()))?;
    Ok(repo)
}

/// A commit as cairn reads it back.
#[derive(Debug, Clone)]
pub struct CommitInfo {
    pub checksum: String,
    pub parent: Option<String>,
    pub timestamp: u64,
    pub subject: String,
    /// The commit's `a{sv}` metadata.
    pub metadata: glib::Variant,
}

impl CommitInfo {
    pub fn version(&self) -> Option<String> {
        self.string("version")
    }

    pub fn string(&self, key: &str) -> Option<String> {
        glib::VariantDict::new(Some(&self.metadata))
            .lookup::<String>(key)
            .ok()
            .flatten()
    }

    pub fn strings(&self, key: &str) -> Vec<String> {
        glib::VariantDict::new(Some(&self.metadata))
            .lookup::<Vec<String>>(key)
            .ok()
            .flatten()
            .unwrap_or_default()
    }
}

pub fn load_commit(repo: &ostree::Repo, checksum: &str) -> Result<CommitInfo> {
    let (commit, _) = repo
        .load_commit(checksum)
        .with_context(|| format!("loading commit {checksum}"))?;
    let metadata = commit.child_value(0);
    let parent = ostree::commit_get_parent(&commit).map(|s| s.to_string());
    let subject: String = commit.child_value(3).get().unwrap_or_default();
    let timestamp = ostree::commit_get_timestamp(&commit);
    Ok(CommitInfo {
        checksum: checksum.to_string(),
        parent,
        timestamp,
        subject,
        metadata,
    })
}

/// The commit a ref points to, if the ref exists.
pub fn ref_head(repo: &ostree::Repo, refname: &str) -> Result<Option<String>> {
    Ok(repo
        .resolve_rev(refname, true)
        .with_context(|| format!("resolving ref {refname}"))?
        .map(|s| s.to_string()))
}

/// Every commit of a ref's history that is present locally, newest first.
pub fn history(repo: &ostree::Repo, refname: &str) -> Result<Vec<CommitInfo>> {
    let mut out = Vec::new();
    let mut next = ref_head(repo, refname)?;
    while let Some(c) = next {
        let Ok(info) = load_commit(repo, &c) else {
            break;
        };
        next = info.parent.clone();
        out.push(info);
    }
    Ok(out)
}

/// Resolves a ref, a version of some ref, or a (prefix of a) checksum to a commit.
pub fn resolve_commit(repo: &ostree::Repo, rev: &str) -> Result<String> {
    if let Ok(Some(c)) = repo.resolve_rev(rev, true) {
        return Ok(c.to_string());
    }
    let refs = repo
        .list_refs(None, gio::Cancellable::NONE)
        .context("listing refs")?;
    let mut names: Vec<String> = refs.keys().map(|k| k.to_string()).collect();
    names.sort();
    for name in &names {
        for info in history(repo, name)? {
            if info.version().as_deref() == Some(rev) {
                return Ok(info.checksum);
            }
        }
    }
    Err(anyhow!(
        "no commit, ref or version {rev:?} in this repository (refs: {})",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    ))
}

/// What to write as one commit.
pub struct NewCommit<'a> {
    pub refname: &'a str,
    pub parent: Option<&'a str>,
    pub subject: &'a str,
    pub timestamp: u64,
    pub metadata: BTreeMap<String, glib::Variant>,
    /// Add `ostree.bootable`/`ostree.linux` (libostree reads the tree's kernel).
    pub bootable: bool,
    /// Sign the commit with this GPG key before the ref moves.
    pub gpg_key: Option<&'a str>,
    pub gpg_homedir: Option<&'a Path>,
}

/// Writes `root` as a commit and moves the ref, all inside one transaction:
/// if anything fails the transaction is aborted and the ref is untouched.
pub fn write_commit(repo: &ostree::Repo, root: &Path, spec: NewCommit<'_>) -> Result<String> {
    let cancellable = gio::Cancellable::NONE;
    repo.prepare_transaction(cancellable)
        .context("starting an OSTree transaction")?;
    let result = (|| -> Result<String> {
        let mtree = ostree::MutableTree::new();
        // Device nodes, sockets and fifos cannot be stored; a tree must not contain them.
        let modifier = ostree::RepoCommitModifier::new(
            ostree::RepoCommitModifierFlags::NONE,
            Some(Box::new(|_repo, path, info| match info.file_type() {
                gio::FileType::Regular | gio::FileType::Directory | gio::FileType::SymbolicLink => {
                    ostree::RepoCommitFilterResult::Allow
                }
                _ => {
                    tracing::warn!("skipping special file {path}");
                    ostree::RepoCommitFilterResult::Skip
                }
            })),
        );
        let dir = gio::File::for_path(root);
        repo.write_directory_to_mtree(&dir, &mtree, Some(&modifier), cancellable)
            .with_context(|| format!("writing {} into the repository", root.display()))?;
        let tree = repo
            .write_mtree(&mtree, cancellable)
            .context("writing the root tree")?;
        let tree = tree
            .downcast::<ostree::RepoFile>()
            .map_err(|_| anyhow!("libostree returned a non-repo file for the tree"))?;

        let dict = glib::VariantDict::new(None);
        for (k, v) in &spec.metadata {
            dict.insert_value(k, v);
        }
        if spec.bootable {
            ostree::commit_metadata_for_bootable(&tree, &dict, cancellable)
                .context("reading the tree's kernel for ostree.bootable metadata")?;
        }
        let metadata = dict.end();
        let checksum = repo
            .write_commit_with_time(
                spec.parent,
                Some(spec.subject),
                None,
                Some(&metadata),
                &tree,
                spec.timestamp,
                cancellable,
            )
            .context("writing the commit object")?;
        if let Some(key) = spec.gpg_key {
            let homedir = spec.gpg_homedir.map(|p| p.display().to_string());
            repo.sign_commit(&checksum, key, homedir.as_deref(), cancellable)
                .with_context(|| format!("signing commit {checksum} with GPG key {key}"))?;
        }
        repo.transaction_set_ref(None, spec.refname, Some(&checksum));
        Ok(checksum.to_string())
    })();
    match result {
        Ok(checksum) => {
            repo.commit_transaction(cancellable)
                .context("completing the OSTree transaction")?;
            Ok(checksum)
        }
        Err(e) => {
            let _ = repo.abort_transaction(cancellable);
            Err(e)
        }
    }
}

/// The tree content checksum of a commit (what `ostree log` prints as
/// ContentChecksum): independent of timestamps, parents and metadata.
pub fn content_checksum(repo: &ostree::Repo, checksum: &str) -> Result<String> {
    let (commit, _) = repo.load_commit(checksum)?;
    ostree::commit_get_content_checksum(&commit)
        .map(|s| s.to_string())
        .ok_or_else(|| anyhow!("commit {checksum} has no content checksum"))
}
