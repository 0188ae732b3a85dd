//! The node's image store on top of [`cairn_oci::image`]: read-only
//! checkouts of image commits shared by containers, and their records, so
//! a container's start needs no libostree once its image is checked out.
//! The OCI side (import, verification, the repository's refs) is
//! re-exported, so `image::` names both.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use cairn_oci::image::*;

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
    crate::state::write_json(
        &checkout_record(checkouts, &info.commit),
        info,
        crate::state::Durability::Synced,
    )
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
    // 0700: checkouts share the repository's inodes, setuid files included.
    private_dir(dir)?;
    let dest = dir.join(commit);
    if dest.exists() {
        return Ok(dest);
    }
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
