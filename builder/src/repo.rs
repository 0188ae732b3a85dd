//! The OSTree repository side: open or create, write a commit in one
//! transaction, resolve refs/versions/checksums, read commit metadata.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use gio::prelude::*;
use glib::prelude::*;
use ostree::gio;

use crate::keys::Signer;

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
    /// Sign the commit before the ref moves.
    pub signer: Option<&'a Signer>,
}

/// Writes `root` as a commit and moves the ref. Large subtrees are written
/// first by worker threads (their objects only); then one transaction writes
/// the rest, the commit, and moves the ref. If anything fails that
/// transaction is aborted and the ref is untouched (objects already written
/// are unreferenced until the next prune).
pub fn write_commit(repo: &ostree::Repo, root: &Path, spec: NewCommit<'_>) -> Result<String> {
    let cancellable = gio::Cancellable::NONE;
    let repo_path = repo
        .path()
        .path()
        .ok_or_else(|| anyhow!("the repository has no local path"))?;
    let prewritten = parallel::prewrite_subtrees(&repo_path, root)?;
    repo.prepare_transaction(cancellable)
        .context("starting an OSTree transaction")?;
    let result = (|| -> Result<String> {
        let mtree = ostree::MutableTree::new();
        let skip: std::collections::HashSet<String> = prewritten
            .keys()
            .map(|p| format!("/{}", p.display()))
            .collect();
        let modifier = parallel::modifier(Some(skip));
        let dir = gio::File::for_path(root);
        repo.write_directory_to_mtree(&dir, &mtree, Some(&modifier), cancellable)
            .with_context(|| format!("writing {} into the repository", root.display()))?;
        for (rel, (contents, meta)) in &prewritten {
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let (name, parents) = parts.split_last().expect("a subtree is never the root");
            let parents: Vec<&str> = parents.iter().map(String::as_str).collect();
            // (MutableTree::walk's binding loses the path array, so walk by lookup.)
            let mut parent = mtree.clone();
            for part in &parents {
                let (_, sub) = parent
                    .lookup(part)
                    .with_context(|| format!("finding /{} in the tree", parents.join("/")))?;
                parent = sub.ok_or_else(|| {
                    anyhow!("/{} is not a directory in the tree", parents.join("/"))
                })?;
            }
            let child = parent.ensure_dir(name)?;
            if !child.fill_empty_from_dirtree(repo, contents, meta) {
                bail!("could not graft the prewritten subtree /{}", rel.display());
            }
        }
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
        if let Some(signer) = spec.signer {
            signer.sign_commit(repo, &checksum)?;
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

/// A new commit of an existing commit's tree (no file is read or written
/// again), moving `refname` in the same transaction.
#[allow(clippy::too_many_arguments)]
pub fn write_commit_of_tree(
    repo: &ostree::Repo,
    source: &str,
    refname: &str,
    parent: Option<&str>,
    subject: &str,
    timestamp: u64,
    metadata: &glib::Variant,
    signer: Option<&Signer>,
) -> Result<String> {
    let cancellable = gio::Cancellable::NONE;
    let (root, _) = repo
        .read_commit(source, cancellable)
        .with_context(|| format!("reading commit {source}"))?;
    let root = root
        .downcast::<ostree::RepoFile>()
        .map_err(|_| anyhow!("libostree returned a non-repo file for {source}"))?;
    repo.prepare_transaction(cancellable)
        .context("starting an OSTree transaction")?;
    let result = (|| -> Result<String> {
        let checksum = repo
            .write_commit_with_time(
                parent,
                Some(subject),
                None,
                Some(metadata),
                &root,
                timestamp,
                cancellable,
            )
            .context("writing the commit object")?;
        if let Some(signer) = signer {
            signer.sign_commit(repo, &checksum)?;
        }
        repo.transaction_set_ref(None, refname, Some(&checksum));
        Ok(checksum.to_string())
    })();
    match result {
        Ok(c) => {
            repo.commit_transaction(cancellable)
                .context("completing the OSTree transaction")?;
            Ok(c)
        }
        Err(e) => {
            let _ = repo.abort_transaction(cancellable);
            Err(e)
        }
    }
}

/// Spreading a commit over all cores: libostree writes one directory walk on
/// one thread (checksums, and zlib for archive repos), so big subtrees are
/// handed to worker threads, each with its own repository handle and
/// transaction, and grafted into the final tree by checksum.
mod parallel {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use anyhow::{anyhow, Context, Result};
    use glib::prelude::*;
    use ostree::gio;

    /// Held by a worker while it starts or ends its transaction. libostree
    /// makes a transaction's staging directory and only then locks it, and
    /// ending a transaction sweeps the repository's unlocked staging
    /// directories: a worker ending its transaction while another was
    /// starting one removed the other's directory under it
    /// (`opendir(staging-…): No such file or directory`).
    static TMPDIR: Mutex<()> = Mutex::new(());

    /// Subtrees smaller than this stay in the main walk.
    const MIN_SUBTREE: u64 = 1 << 20;
    const MAX_DEPTH: usize = 4;

    pub fn modifier(skip: Option<std::collections::HashSet<String>>) -> ostree::RepoCommitModifier {
        ostree::RepoCommitModifier::new(
            ostree::RepoCommitModifierFlags::NONE,
            Some(Box::new(move |_repo, path, info| {
                if skip.as_ref().is_some_and(|s| s.contains(path)) {
                    return ostree::RepoCommitFilterResult::Skip;
                }
                // Device nodes, sockets and fifos cannot be stored in a commit.
                match info.file_type() {
                    gio::FileType::Regular
                    | gio::FileType::Directory
                    | gio::FileType::SymbolicLink => ostree::RepoCommitFilterResult::Allow,
                    _ => {
                        tracing::warn!("skipping special file {path}");
                        ostree::RepoCommitFilterResult::Skip
                    }
                }
            })),
        )
    }

    /// Disjoint subtrees of `root` worth a thread each, smallest first.
    fn plan(root: &Path, threads: usize) -> Result<Vec<(PathBuf, u64)>> {
        let mut sizes: BTreeMap<PathBuf, u64> = BTreeMap::new();
        let mut children: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
        for entry in walkdir::WalkDir::new(root).min_depth(1) {
            let entry = entry.with_context(|| format!("walking {}", root.display()))?;
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("under root")
                .to_path_buf();
            if entry.file_type().is_dir() && entry.depth() <= MAX_DEPTH {
                let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
                children.entry(parent).or_default().push(rel.clone());
                sizes.entry(rel).or_insert(0);
            } else if entry.file_type().is_file() {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                for anc in rel.ancestors().skip(1) {
                    if anc.as_os_str().is_empty() {
                        break;
                    }
                    if let Some(s) = sizes.get_mut(anc) {
                        *s += len;
                    }
                }
            }
        }
        let total: u64 = children
            .get(Path::new(""))
            .map(|top| top.iter().map(|d| sizes[d]).sum())
            .unwrap_or(0);
        let target = (total / (threads as u64 * 4)).max(MIN_SUBTREE);
        let mut out = Vec::new();
        let mut stack: Vec<PathBuf> = children.get(Path::new("")).cloned().unwrap_or_default();
        while let Some(dir) = stack.pop() {
            let size = sizes[&dir];
            let kids = children.get(&dir);
            if size > target
                && kids.is_some_and(|k| !k.is_empty())
                && dir.components().count() < MAX_DEPTH
            {
                stack.extend(kids.into_iter().flatten().cloned());
            } else if size >= MIN_SUBTREE {
                out.push((dir, size));
            }
        }
        // Ascending: workers pop() from the end, so the largest subtrees start first.
        out.sort_by_key(|(_, size)| *size);
        Ok(out)
    }

    type Written = BTreeMap<PathBuf, (String, String)>;

    pub fn prewrite_subtrees(repo_path: &Path, root: &Path) -> Result<Written> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if threads < 2 {
            return Ok(Written::new());
        }
        let queue = plan(root, threads)?;
        if queue.is_empty() {
            return Ok(Written::new());
        }
        let queue = Mutex::new(queue);
        let written = Mutex::new(Written::new());
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..threads)
                .map(|_| scope.spawn(|| worker(repo_path, root, &queue, &written)))
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| anyhow!("a commit worker thread panicked"))??;
            }
            Ok(())
        })?;
        Ok(written.into_inner().expect("no poisoned lock"))
    }

    fn worker(
        repo_path: &Path,
        root: &Path,
        queue: &Mutex<Vec<(PathBuf, u64)>>,
        written: &Mutex<Written>,
    ) -> Result<()> {
        let cancellable = gio::Cancellable::NONE;
        let repo = ostree::Repo::new_for_path(repo_path);
        repo.open(cancellable)?;
        // No syncfs per worker: the final transaction's syncfs covers the
        // whole file system (these objects included) before the ref moves,
        // so durability is the same as one stock commit, with one sync.
        repo.set_disable_fsync(true);
        {
            let _tmpdir = TMPDIR.lock().expect("no poisoned lock");
            repo.prepare_transaction(cancellable)?;
        }
        let modifier = modifier(None);
        let result = (|| -> Result<()> {
            loop {
                let next = queue.lock().expect("no poisoned lock").pop();
                let Some((rel, _)) = next else { return Ok(()) };
                let mtree = ostree::MutableTree::new();
                let dir = gio::File::for_path(root.join(&rel));
                repo.write_directory_to_mtree(&dir, &mtree, Some(&modifier), cancellable)
                    .with_context(|| format!("writing /{}", rel.display()))?;
                let tree = repo.write_mtree(&mtree, cancellable)?;
                let tree = tree
                    .downcast::<ostree::RepoFile>()
                    .map_err(|_| anyhow!("libostree returned a non-repo file"))?;
                tree.ensure_resolved()?;
                let contents = tree
                    .tree_get_contents_checksum()
                    .ok_or_else(|| anyhow!("no contents checksum for /{}", rel.display()))?;
                let meta = tree
                    .tree_get_metadata_checksum()
                    .ok_or_else(|| anyhow!("no metadata checksum for /{}", rel.display()))?;
                written
                    .lock()
                    .expect("no poisoned lock")
                    .insert(rel, (contents.to_string(), meta.to_string()));
            }
        })();
        let _tmpdir = TMPDIR.lock().expect("no poisoned lock");
        match result {
            Ok(()) => {
                repo.commit_transaction(cancellable)?;
                Ok(())
            }
            Err(e) => {
                let _ = repo.abort_transaction(cancellable);
                Err(e)
            }
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
