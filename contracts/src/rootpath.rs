//! Paths inside a root that is not ours to trust: an image's tree, a
//! container's root file system. Used by the image import and the runtime
//! alike, so both resolve a hostile path the same way.

use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Resolve `rel` (a path from a layer or an image config) inside `root`
/// without ever leaving it. Symlinks met on the way are followed relative to
/// `root` (absolute targets restart at `root`, `..` stops at `root`). When
/// `follow_last` is false the last component is not resolved, which is what
/// creating or deleting that entry needs.
///
/// This is a path computation (for callers that need a path, e.g. a mount
/// target); the layer code of `cairn-oci` itself works on directory fds.
pub fn resolve_in_root(root: &Path, rel: &Path, follow_last: bool) -> Result<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = Vec::new();
    push_components(&mut pending, rel);
    pending.reverse();
    let mut current: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            current.pop();
            continue;
        }
        let is_last = pending.is_empty();
        let mut candidate = root.to_path_buf();
        candidate.extend(current.iter());
        candidate.push(&part);
        if is_last && !follow_last {
            current.push(part);
            break;
        }
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    bail!(
                        "too many levels of symbolic links resolving {}",
                        rel.display()
                    );
                }
                let target = fs::read_link(&candidate)
                    .with_context(|| format!("reading link {}", candidate.display()))?;
                if target.is_absolute() {
                    current.clear();
                }
                let mut more = Vec::new();
                push_components(&mut more, &target);
                for c in more.into_iter().rev() {
                    pending.push(c);
                }
            }
            _ => current.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(current.iter());
    Ok(out)
}

/// The components of `p` that name something (`..` kept, `/` and `.` dropped).
pub fn push_components(out: &mut Vec<std::ffi::OsString>, p: &Path) {
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::ParentDir => out.push("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_and_dotdot_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("d/up")).unwrap();
        let r = |p: &str, last| resolve_in_root(root, Path::new(p), last).unwrap();
        assert_eq!(r("abs/passwd", true), root.join("etc/passwd"));
        assert_eq!(r("d/up/etc", true), root.join("etc"));
        assert_eq!(r("../../x", true), root.join("x"));
        // The last component is left alone when asked (to create or remove it).
        assert_eq!(r("abs", false), root.join("abs"));
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in_root(root, Path::new("loop/x"), true).is_err());
    }
}
