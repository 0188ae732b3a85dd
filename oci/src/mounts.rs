//! Which mount a path is on, from `/proc/self/mountinfo`: link(2) fails
//! with EXDEV across two mounts even of one filesystem, so a checkout that
//! hardlinks into a repository must be written through the repository's
//! mount.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo: what it needs here.
#[derive(Debug, PartialEq)]
struct Mount {
    /// `major:minor` of the filesystem.
    device: String,
    /// The directory of the filesystem mounted (`/` unless a bind mount).
    root: PathBuf,
    mount_point: PathBuf,
    read_only: bool,
}

/// `dir` (a directory) seen through the mount holding `other`, when `dir`
/// is on another mount of the same filesystem, that mount shows it, and it
/// is writable there. None when they already share a mount, or nothing
/// would help.
pub fn alias_in_mount_of(dir: &Path, other: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mounts: Vec<Mount> = text.lines().filter_map(parse_line).collect();
    let dir = dir.canonicalize().ok()?;
    let other = other.canonicalize().ok()?;
    let alias = alias_of(&mounts, &dir, &other)?;
    let (a, b) = (
        std::fs::metadata(&alias).ok()?,
        std::fs::metadata(&dir).ok()?,
    );
    (a.dev() == b.dev() && a.ino() == b.ino()).then_some(alias)
}

fn alias_of(mounts: &[Mount], dir: &Path, other: &Path) -> Option<PathBuf> {
    let (d, o) = (mount_of(mounts, dir)?, mount_of(mounts, other)?);
    if d.mount_point == o.mount_point || d.device != o.device || o.read_only {
        return None;
    }
    let in_fs = d.root.join(dir.strip_prefix(&d.mount_point).ok()?);
    let rel = in_fs.strip_prefix(&o.root).ok()?;
    Some(o.mount_point.join(rel))
}

/// The mount `path` (canonical) is on: the longest mount point above it,
/// the last of those (a later mount hides an earlier one).
fn mount_of<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    let mut best: Option<&Mount> = None;
    for m in mounts.iter().filter(|m| path.starts_with(&m.mount_point)) {
        let longer = |b: &Mount| m.mount_point.as_os_str().len() >= b.mount_point.as_os_str().len();
        if best.map_or(true, longer) {
            best = Some(m);
        }
    }
    best
}

fn parse_line(line: &str) -> Option<Mount> {
    let mut f = line.split(' ');
    let (_id, _parent, device) = (f.next()?, f.next()?, f.next()?);
    let (root, mount_point, options) = (f.next()?, f.next()?, f.next()?);
    Some(Mount {
        device: device.to_string(),
        root: unescape(root),
        mount_point: unescape(mount_point),
        read_only: options.split(',').any(|o| o == "ro"),
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A booted OSTree node: the sysroot at /sysroot, the deployment at /,
    /// the stateroot's var bind-mounted at /var.
    const NODE: &str = "\
22 1 253:3 /ostree/deploy/cairn/deploy/abc.0 / rw,relatime shared:1 - ext4 /dev/vda3 rw
23 22 253:3 / /sysroot rw,relatime shared:2 - ext4 /dev/vda3 rw
24 22 253:3 /ostree/deploy/cairn/deploy/abc.0/usr /usr ro,relatime shared:3 - ext4 /dev/vda3 rw
25 22 253:3 /ostree/deploy/cairn/var /var rw,relatime shared:4 - ext4 /dev/vda3 rw
26 22 0:21 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
27 25 0:30 / /var/with\\040space rw - tmpfs tmpfs rw";

    fn node() -> Vec<Mount> {
        NODE.lines().filter_map(parse_line).collect()
    }

    #[test]
    fn var_is_reached_through_the_sysroot() {
        let m = node();
        assert_eq!(
            alias_of(
                &m,
                Path::new("/var/lib/cairn/checkouts"),
                Path::new("/sysroot/ostree/repo")
            ),
            Some(PathBuf::from(
                "/sysroot/ostree/deploy/cairn/var/lib/cairn/checkouts"
            ))
        );
    }

    #[test]
    fn no_alias_on_one_mount_another_filesystem_or_a_read_only_mount() {
        let m = node();
        let repo = Path::new("/sysroot/ostree/repo");
        assert_eq!(alias_of(&m, Path::new("/sysroot/x"), repo), None);
        assert_eq!(alias_of(&m, Path::new("/run/x"), repo), None);
        assert_eq!(
            alias_of(&m, Path::new("/var/lib"), Path::new("/usr/lib")),
            None
        );
    }

    #[test]
    fn escapes_and_stacked_mounts() {
        let m = node();
        let on = mount_of(&m, Path::new("/var/with space/x")).unwrap();
        assert_eq!(on.device, "0:30");
        assert_eq!(unescape(r"a\134b\011"), PathBuf::from("a\\b\t"));
        assert_eq!(unescape(r"a\9"), PathBuf::from(r"a\9"));
        let stacked: Vec<Mount> = "1 0 1:1 / /m rw - x x rw\n2 0 1:2 / /m rw - x x rw"
            .lines()
            .filter_map(parse_line)
            .collect();
        assert_eq!(mount_of(&stacked, Path::new("/m/f")).unwrap().device, "1:2");
    }
}
