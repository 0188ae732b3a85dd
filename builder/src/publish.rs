//! `host compose publish`: make a repository ready to serve to nodes. For each
//! ref, a static delta from the previous commit to the head (a node then
//! fetches a small update in a few requests), then a fresh summary (which lists
//! the refs and the deltas), optionally GPG-signed.

use std::path::Path;

use anyhow::{Context, Result};
use ostree::gio;
use ostree::glib;

#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Who signs the summary (none: unsigned).
    pub signer: Option<crate::keys::Signer>,
    /// Skip static deltas (summary only).
    pub no_deltas: bool,
}

/// What publishing did for one ref.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefReport {
    pub refname: String,
    pub head: String,
    /// `Some((from, generated))`: the delta from the parent; `generated` is
    /// false when it already existed. `None`: the head has no parent here.
    pub delta_from: Option<(String, bool)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishReport {
    pub refs: Vec<RefReport>,
    pub summary_signed: bool,
}

/// Generate missing static deltas (parent → head of each ref) and regenerate
/// the summary of the repository at `path`.
pub fn publish(path: &Path, opts: &PublishOptions) -> Result<PublishReport> {
    let repo = ostree::Repo::new_for_path(path);
    repo.open(gio::Cancellable::NONE)
        .with_context(|| format!("opening the OSTree repo {}", path.display()))?;
    let refs = repo
        .list_refs(None, gio::Cancellable::NONE)
        .with_context(|| format!("listing the refs of {}", path.display()))?;
    let mut refs: Vec<(String, String)> = refs.into_iter().collect();
    refs.sort();
    let existing: Vec<String> = repo
        .list_static_delta_names(gio::Cancellable::NONE)
        .context("listing existing static deltas")?
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut report = PublishReport::default();
    for (refname, head) in refs {
        let (commit, _) = repo
            .load_commit(&head)
            .with_context(|| format!("loading {refname} ({head})"))?;
        let parent = ostree::commit_get_parent(&commit)
            .map(|p| p.to_string())
            .filter(|p| repo.load_commit(p).is_ok());
        let delta_from = match parent {
            Some(from) if !opts.no_deltas => {
                let name = format!("{from}-{head}");
                let generated = !existing.contains(&name);
                if generated {
                    let params = glib::VariantDict::new(None);
                    // Commit and delta superblock together: one request less.
                    params.insert("inline-parts", true);
                    repo.static_delta_generate(
                        ostree::StaticDeltaGenerateOpt::Major,
                        Some(&from),
                        &head,
                        None,
                        Some(&params.end()),
                        gio::Cancellable::NONE,
                    )
                    .with_context(|| {
                        format!("generating the static delta {from} -> {head} for {refname}")
                    })?;
                }
                Some((from, generated))
            }
            _ => None,
        };
        report.refs.push(RefReport {
            refname,
            head,
            delta_from,
        });
    }
    repo.regenerate_summary(None, gio::Cancellable::NONE)
        .with_context(|| format!("regenerating the summary of {}", path.display()))?;
    if let Some(signer) = &opts.signer {
        signer.sign_summary(&repo)?;
        report.summary_signed = true;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ostree::prelude::*;

    /// Commit a one-file tree to `refname` (bare-user: no root needed).
    fn commit(repo: &ostree::Repo, dir: &Path, refname: &str, body: &str) -> String {
        let root = dir.join(format!("tree-{body}"));
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/hello"), body.repeat(1000)).unwrap();
        let parent = repo.resolve_rev(refname, true).unwrap();
        let tx = repo.auto_transaction(gio::Cancellable::NONE).unwrap();
        let mtree = ostree::MutableTree::new();
        repo.write_directory_to_mtree(
            &gio::File::for_path(&root),
            &mtree,
            None,
            gio::Cancellable::NONE,
        )
        .unwrap();
        let tree = repo.write_mtree(&mtree, gio::Cancellable::NONE).unwrap();
        let tree = tree.downcast::<ostree::RepoFile>().unwrap();
        let csum = repo
            .write_commit(
                parent.as_deref(),
                None,
                None,
                None,
                &tree,
                gio::Cancellable::NONE,
            )
            .unwrap();
        repo.transaction_set_ref(None, refname, Some(&csum));
        tx.commit(gio::Cancellable::NONE).unwrap();
        csum.to_string()
    }

    #[test]
    fn deltas_from_parent_to_head_and_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo");
        let repo = ostree::Repo::new_for_path(&path);
        repo.create(ostree::RepoMode::BareUser, gio::Cancellable::NONE)
            .unwrap();
        let a1 = commit(&repo, dir.path(), "test/a", "one");
        let a2 = commit(&repo, dir.path(), "test/a", "two");
        let b1 = commit(&repo, dir.path(), "test/b", "three");

        let report = publish(&path, &PublishOptions::default()).unwrap();
        assert_eq!(report.refs.len(), 2);
        assert_eq!(report.refs[0].refname, "test/a");
        assert_eq!(report.refs[0].head, a2);
        assert_eq!(report.refs[0].delta_from, Some((a1.clone(), true)));
        assert_eq!(report.refs[1].head, b1);
        assert_eq!(report.refs[1].delta_from, None);
        assert!(path.join("summary").is_file());
        let deltas: Vec<String> = repo
            .list_static_delta_names(gio::Cancellable::NONE)
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(deltas, vec![format!("{a1}-{a2}")]);

        // Publishing again finds the delta and does not redo it.
        let again = publish(&path, &PublishOptions::default()).unwrap();
        assert_eq!(again.refs[0].delta_from, Some((a1, false)));
    }
}
