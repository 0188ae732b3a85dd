//! What changed between two commits: packages (from commit metadata, so it
//! works on metadata-only pulls) and files (by walking both trees, skipping
//! every subtree whose checksum is unchanged).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;

pub use cairn_contracts::packages::{compare_versions, Package, PackageChange, PackageDiff};

use crate::repo;

/// File-level changes between two commits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FileDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub modified: Vec<String>,
}

/// Both halves of `compose diff`.
#[derive(Debug, Clone, Serialize)]
pub struct CommitDiff {
    pub from: String,
    pub to: String,
    pub from_version: Option<String>,
    pub to_version: Option<String>,
    pub packages: PackageDiff,
    pub files: FileDiff,
}

pub fn diff_commits(repo: &ostree::Repo, from_rev: &str, to_rev: &str) -> Result<CommitDiff> {
    let from = repo::resolve_commit(repo, from_rev)?;
    let to = repo::resolve_commit(repo, to_rev)?;
    let a = repo::load_commit(repo, &from)?;
    let b = repo::load_commit(repo, &to)?;
    let pkgs = |c: &repo::CommitInfo| {
        crate::apt::PackageSet::from_lines(&c.strings(cairn_contracts::metadata::PACKAGES)).0
    };
    let packages = PackageDiff::between_maps(&pkgs(&a), &pkgs(&b));
    let files = diff_files(repo, &from, repo, &to)?;
    Ok(CommitDiff {
        from,
        to,
        from_version: a.version(),
        to_version: b.version(),
        packages,
        files,
    })
}

/// The file changes from commit `from` of `repo_a` to commit `to` of
/// `repo_b` (two repositories: `compose verify` compares a scratch compose
/// with the original without copying either).
pub fn diff_files(
    repo_a: &ostree::Repo,
    from: &str,
    repo_b: &ostree::Repo,
    to: &str,
) -> Result<FileDiff> {
    let mut files = FileDiff::default();
    let (ta, _) = root_tree(repo_a, from)?;
    let (tb, _) = root_tree(repo_b, to)?;
    diff_trees((repo_a, repo_b), "", Some(&ta), Some(&tb), &mut files)?;
    Ok(files)
}

fn root_tree(repo: &ostree::Repo, commit: &str) -> Result<(String, String)> {
    let (v, _) = repo.load_commit(commit)?;
    let contents: Vec<u8> = v.child_value(6).get().unwrap_or_default();
    let meta: Vec<u8> = v.child_value(7).get().unwrap_or_default();
    Ok((hex::encode(contents), hex::encode(meta)))
}

type DirTree = (BTreeMap<String, String>, BTreeMap<String, String>);

fn load_dirtree(repo: &ostree::Repo, checksum: &str) -> Result<DirTree> {
    let v = repo
        .load_variant(ostree::ObjectType::DirTree, checksum)
        .with_context(|| format!("loading dirtree {checksum} (is the commit fully pulled?)"))?;
    let files: Vec<(String, Vec<u8>)> = v.child_value(0).get().unwrap_or_default();
    let dirs: Vec<(String, Vec<u8>, Vec<u8>)> = v.child_value(1).get().unwrap_or_default();
    Ok((
        files
            .into_iter()
            .map(|(n, c)| (n, hex::encode(c)))
            .collect(),
        dirs.into_iter()
            .map(|(n, c, m)| (n, format!("{}{}", hex::encode(c), hex::encode(m))))
            .collect(),
    ))
}

fn diff_trees(
    repos: (&ostree::Repo, &ostree::Repo),
    prefix: &str,
    a: Option<&str>,
    b: Option<&str>,
    out: &mut FileDiff,
) -> Result<()> {
    let empty = DirTree::default();
    let ta = match a {
        Some(c) => load_dirtree(repos.0, c)?,
        None => empty.clone(),
    };
    let tb = match b {
        Some(c) => load_dirtree(repos.1, c)?,
        None => empty,
    };
    for (name, ca) in &ta.0 {
        match tb.0.get(name) {
            None => out.removed.push(format!("{prefix}/{name}")),
            Some(cb) if cb != ca => out.modified.push(format!("{prefix}/{name}")),
            _ => {}
        }
    }
    for name in tb.0.keys() {
        if !ta.0.contains_key(name) {
            out.added.push(format!("{prefix}/{name}"));
        }
    }
    // Directory entries carry contents+meta checksums: equal means an identical subtree.
    for (name, ca) in &ta.1 {
        let path = format!("{prefix}/{name}");
        match tb.1.get(name) {
            Some(cb) if cb == ca => {}
            Some(cb) => diff_trees(repos, &path, Some(&ca[..64]), Some(&cb[..64]), out)?,
            None => {
                out.removed.push(format!("{path}/"));
            }
        }
    }
    for name in tb.1.keys() {
        if !ta.1.contains_key(name) {
            out.added.push(format!("{prefix}/{name}/"));
        }
    }
    Ok(())
}
