//! Applying OCI image layers (tar streams) onto a directory: the changeset
//! rules of the OCI image spec, whiteouts and opaque directories included.
//!
//! Every path of a layer is resolved *inside* the destination, the way a
//! chroot would resolve it: a symlink in a lower layer that points at `/` or
//! `../..` can never make a later entry land outside the tree.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Name prefix that marks a whiteout: `dir/.wh.name` deletes `dir/name`.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// `dir/.wh..wh..opq` hides everything lower layers put into `dir`.
pub const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// What applying one layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Device nodes, fifos and sockets: OSTree cannot store them, so they are
    /// left out (a container gets its own /dev at run time).
    pub skipped_special: u64,
}

/// Resolve `rel` (a path from a layer or an image config) inside `root`
/// without ever leaving it. Symlinks met on the way are followed relative to
/// `root` (absolute targets restart at `root`, `..` stops at `root`). When
/// `follow_last` is false the last component is not resolved, which is what
/// creating or deleting that entry needs.
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

fn push_components(out: &mut Vec<std::ffi::OsString>, p: &Path) {
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::ParentDir => out.push("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// Remove whatever is at `path` (file, symlink or whole directory tree).
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Layer entry path, made relative and checked: no `..` may climb out.
fn clean_entry_path(p: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                bail!(
                    "layer entry {} climbs out of the image with '..'",
                    p.display()
                )
            }
            Component::Prefix(_) => bail!("layer entry {} is not a Unix path", p.display()),
        }
    }
    Ok(out)
}

/// Apply one uncompressed layer tar stream onto `dest`.
/// Ownership is kept when running as root; otherwise the files belong to the
/// caller (enough for unit tests, which check the changeset rules).
pub fn apply_layer<R: Read>(reader: R, dest: &Path) -> Result<LayerStats> {
    let as_root = nix::unistd::geteuid().is_root();
    let mut archive = tar::Archive::new(reader);
    let mut stats = LayerStats::default();
    // Paths this layer created: an opaque marker hides lower layers only.
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut opaque: Vec<PathBuf> = Vec::new();
    // Directory modes are applied last so a read-only dir can still be filled.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();

    for entry in archive.entries().context("reading layer tar")? {
        let mut entry = entry.context("reading layer tar entry")?;
        let raw_path = entry
            .path()
            .context("layer entry with a bad path")?
            .into_owned();
        let rel = clean_entry_path(&raw_path)?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        stats.entries += 1;
        let file_name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();

        if file_name == OPAQUE_WHITEOUT {
            stats.opaque_dirs += 1;
            opaque.push(parent_rel);
            continue;
        }
        if let Some(victim) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            stats.whiteouts += 1;
            let parent = resolve_in_root(dest, &parent_rel, true)?;
            let target = parent.join(victim);
            remove_any(&target)
                .with_context(|| format!("applying whiteout {}", raw_path.display()))?;
            continue;
        }

        let parent = resolve_in_root(dest, &parent_rel, true)?;
        fs::create_dir_all(&parent)
            .with_context(|| format!("creating parent of {}", raw_path.display()))?;
        let target = parent.join(&file_name);
        let header = entry.header().clone();
        let xattrs = layer_xattrs(&mut entry, as_root)
            .with_context(|| format!("reading the xattrs of {}", raw_path.display()))?;
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&target)?;
                        fs::create_dir(&target)?;
                    }
                    Err(_) => fs::create_dir(&target)
                        .with_context(|| format!("creating {}", target.display()))?,
                }
                set_xattrs(&target, &xattrs)?;
                dir_modes.push((target.clone(), mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_any(&target)?;
                let mut f = fs::File::create(&target)
                    .with_context(|| format!("creating {}", target.display()))?;
                io::copy(&mut entry, &mut f)
                    .with_context(|| format!("writing {}", target.display()))?;
                drop(f);
                own(&target, &header, as_root)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
                // After chown, which drops security.capability.
                set_xattrs(&target, &xattrs)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .context("symlink without a target")?
                    .context("symlink without a target")?
                    .into_owned();
                remove_any(&target)?;
                symlink(&link, &target)
                    .with_context(|| format!("creating symlink {}", target.display()))?;
                own(&target, &header, as_root)?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .context("hard link without a target")?
                    .context("hard link without a target")?
                    .into_owned();
                let source = resolve_in_root(dest, &clean_entry_path(&link)?, false)?;
                remove_any(&target)?;
                fs::hard_link(&source, &target).with_context(|| {
                    format!("hard link {} -> {}", raw_path.display(), link.display())
                })?;
            }
            tar::EntryType::Char
            | tar::EntryType::Block
            | tar::EntryType::Fifo
            | tar::EntryType::GNUSparse => {
                stats.skipped_special += 1;
                tracing::debug!("skipping special file {}", raw_path.display());
                continue;
            }
            // pax/GNU long-name headers are consumed by the tar crate; others carry no file.
            _ => continue,
        }
        created.insert(rel);
    }

    for dir in &opaque {
        let abs = resolve_in_root(dest, dir, true)?;
        let Ok(read) = fs::read_dir(&abs) else {
            continue;
        };
        for child in read {
            let child = child?;
            let rel_child = dir.join(child.file_name());
            if !created.contains(&rel_child) {
                remove_any(&child.path())
                    .with_context(|| format!("applying opaque dir {}", dir.display()))?;
            }
        }
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting mode of {}", dir.display()))?;
    }
    Ok(stats)
}

/// The pax prefix under which tar (GNU, bsdtar, Go's archive/tar, so every
/// image builder) records extended attributes.
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// The extended attributes of a layer entry that belong to the file itself:
/// `user.*`, file capabilities and POSIX ACLs. `trusted.*` and
/// `security.selinux` describe the machine that built the image, not the
/// file, and are left out; without root only `user.*` can be set at all.
fn layer_xattrs<R: Read>(
    entry: &mut tar::Entry<R>,
    as_root: bool,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let Some(extensions) = entry.pax_extensions()? else {
        return Ok(out);
    };
    for ext in extensions {
        let ext = ext?;
        let Ok(key) = ext.key() else { continue };
        let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) else {
            continue;
        };
        let wanted = name.starts_with("user.")
            || (as_root
                && matches!(
                    name,
                    "security.capability" | "system.posix_acl_access" | "system.posix_acl_default"
                ));
        if wanted {
            out.push((name.to_string(), ext.value_bytes().to_vec()));
        }
    }
    Ok(out)
}

fn set_xattrs(path: &Path, xattrs: &[(String, Vec<u8>)]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if xattrs.is_empty() {
        return Ok(());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path with a NUL byte: {}", path.display()))?;
    for (name, value) in xattrs {
        let c_name = std::ffi::CString::new(name.as_bytes())
            .with_context(|| format!("xattr name with a NUL byte on {}", path.display()))?;
        // SAFETY: both strings are NUL-terminated and live across the call;
        // the value pointer and length describe one live slice.
        let rc = unsafe {
            libc::lsetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!(
                    "setting xattr {name} on {} (the file system must support it)",
                    path.display()
                )
            });
        }
    }
    Ok(())
}

fn own(path: &Path, header: &tar::Header, as_root: bool) -> Result<()> {
    if !as_root {
        return Ok(());
    }
    let uid = header.uid().unwrap_or(0) as u32;
    let gid = header.gid().unwrap_or(0) as u32;
    nix::unistd::fchownat(
        None,
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("chown {}", path.display()))?;
    Ok(())
}

/// Wrap a (possibly compressed) layer blob in the right decompressor,
/// chosen by the magic bytes so OCI and Docker media types both work.
pub fn decompress<'a, R: io::BufRead + 'a>(mut reader: R) -> Result<Box<dyn Read + 'a>> {
    let head = reader.fill_buf().context("reading layer")?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(
            zstd::stream::read::Decoder::with_buffer(reader).context("starting zstd")?,
        ))
    } else {
        Ok(Box::new(reader))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, Option<&str>, char)]) -> Vec<u8> {
        // (path, content or link target, kind: f=file d=dir l=symlink)
        let mut b = tar::Builder::new(Vec::new());
        for (path, data, kind) in entries {
            let mut h = tar::Header::new_gnu();
            match kind {
                'd' => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, path, io::empty()).unwrap();
                }
                'l' => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, path, data.unwrap()).unwrap();
                }
                _ => {
                    let d = data.unwrap_or("").as_bytes();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(d.len() as u64);
                    b.append_data(&mut h, path, d).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let base = tar_of(&[
            ("etc/", None, 'd'),
            ("etc/keep", Some("k"), 'f'),
            ("etc/gone", Some("g"), 'f'),
            ("data/", None, 'd'),
            ("data/old1", Some("1"), 'f'),
            ("data/sub/", None, 'd'),
            ("data/sub/old2", Some("2"), 'f'),
            ("tree/", None, 'd'),
            ("tree/a/", None, 'd'),
            ("tree/a/b", Some("b"), 'f'),
        ]);
        let s = apply_layer(&base[..], dir.path()).unwrap();
        assert_eq!(s.entries, 10);
        let upper = tar_of(&[
            ("etc/.wh.gone", Some(""), 'f'),
            ("data/new", Some("n"), 'f'),
            ("data/.wh..wh..opq", Some(""), 'f'),
            (".wh.tree", Some(""), 'f'),
            ("etc/keep", Some("changed"), 'f'),
        ]);
        let s = apply_layer(&upper[..], dir.path()).unwrap();
        assert_eq!((s.whiteouts, s.opaque_dirs), (2, 1));
        let root = dir.path();
        assert_eq!(
            fs::read_to_string(root.join("etc/keep")).unwrap(),
            "changed"
        );
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("tree").exists());
        // Opaque: lower content gone, this layer's entry (listed before the marker) kept.
        assert_eq!(fs::read_to_string(root.join("data/new")).unwrap(), "n");
        assert!(!root.join("data/old1").exists());
        assert!(!root.join("data/sub").exists());
    }

    #[test]
    fn symlinks_cannot_escape_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let evil_target = outside.path().to_str().unwrap().to_string();
        let l1 = tar_of(&[
            ("escape", Some(evil_target.as_str()), 'l'),
            ("up", Some("../../.."), 'l'),
        ]);
        apply_layer(&l1[..], dir.path()).unwrap();
        let l2 = tar_of(&[
            ("escape/pwned", Some("x"), 'f'),
            ("up/pwned2", Some("y"), 'f'),
        ]);
        apply_layer(&l2[..], dir.path()).unwrap();
        assert!(!outside.path().join("pwned").exists());
        // Both land inside the tree, resolved as a chroot would.
        let inside = resolve_in_root(dir.path(), Path::new("escape/pwned"), true).unwrap();
        assert!(inside.starts_with(dir.path()));
        assert!(inside.exists());
        assert!(dir.path().join("pwned2").exists());
    }

    #[test]
    fn dotdot_entries_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        // set_path refuses "..", so write the name bytes directly.
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = apply_layer(&data[..], dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("climbs out"), "{err:#}");
    }

    #[test]
    fn gzip_and_zstd_layers_are_recognised() {
        use std::io::Write;
        let plain = tar_of(&[("hello", Some("world"), 'f')]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&plain[..], 1).unwrap();
        for blob in [plain.clone(), gz, zs] {
            let dir = tempfile::tempdir().unwrap();
            let r = decompress(io::BufReader::new(&blob[..])).unwrap();
            apply_layer(r, dir.path()).unwrap();
            assert_eq!(
                fs::read_to_string(dir.path().join("hello")).unwrap(),
                "world"
            );
        }
    }

    /// One pax extended-header record: "LEN key=value\n", LEN counting itself.
    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let body_len = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body_len + 1;
        while len.to_string().len() + body_len != len {
            len += 1;
        }
        let mut r = format!("{len} {key}=").into_bytes();
        r.extend_from_slice(value);
        r.push(b'\n');
        r
    }

    #[test]
    fn pax_xattrs_are_kept_and_host_specific_ones_dropped() {
        let mut b = tar::Builder::new(Vec::new());
        let mut pax = pax_record("SCHILY.xattr.user.cairn.origin", b"layer-1");
        pax.extend(pax_record("SCHILY.xattr.trusted.overlay.opaque", b"y"));
        pax.extend(pax_record(
            "SCHILY.xattr.security.selinux",
            b"system_u:object_r:bin_t:s0",
        ));
        // cap_net_bind_service=ep as the kernel stores it (VFS_CAP_REVISION_2).
        let mut cap = Vec::new();
        for word in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
            cap.extend_from_slice(&word.to_le_bytes());
        }
        pax.extend(pax_record("SCHILY.xattr.security.capability", &cap));
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(pax.len() as u64);
        b.append_data(&mut h, "PaxHeaders/tool", pax.as_slice())
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o755);
        h.set_size(2);
        b.append_data(&mut h, "usr/bin/tool", &b"hi"[..]).unwrap();
        let data = b.into_inner().unwrap();

        let dir = tempfile::tempdir().unwrap();
        apply_layer(data.as_slice(), dir.path()).unwrap();
        let tool = dir.path().join("usr/bin/tool");
        assert_eq!(fs::read(&tool).unwrap(), b"hi");
        let get = |name: &str| -> Option<Vec<u8>> {
            let c_path = std::ffi::CString::new(tool.to_str().unwrap()).unwrap();
            let c_name = std::ffi::CString::new(name).unwrap();
            let mut buf = vec![0u8; 256];
            // SAFETY: valid C strings and a live buffer of the given length.
            let n = unsafe {
                libc::lgetxattr(
                    c_path.as_ptr(),
                    c_name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            (n >= 0).then(|| buf[..n as usize].to_vec())
        };
        assert_eq!(get("user.cairn.origin").as_deref(), Some(&b"layer-1"[..]));
        assert_eq!(get("trusted.overlay.opaque"), None);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(
                get("security.capability"),
                Some(cap),
                "file capability kept"
            );
        } else {
            eprintln!("NOT TESTED without root: the security.capability xattr (file capabilities)");
        }
        // SELinux-less hosts may still report a label of their own; it must
        // not be the image builder's.
        assert_ne!(
            get("security.selinux").as_deref(),
            Some(&b"system_u:object_r:bin_t:s0"[..])
        );
    }
}
