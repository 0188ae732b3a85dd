//! The new mount API (Linux ≥ 5.12 for `mount_setattr`): detached copies of
//! a tree (`open_tree`), attributes applied to a whole tree at once
//! (`mount_setattr` with `AT_RECURSIVE`: read-only, nosuid, nodev, idmapped),
//! then attached where they belong (`move_mount`). The old
//! `mount(MS_BIND|MS_REMOUNT|MS_RDONLY)` changes only the top mount of a
//! recursive bind, which is how `-v /:/host:ro` stayed writable below.
//!
//! nix 0.29 has no wrappers for these calls, hence the raw syscalls.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;

const OPEN_TREE_CLONE: u32 = 1;
const OPEN_TREE_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
const AT_RECURSIVE: u32 = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;
pub const MOUNT_ATTR_IDMAP: u64 = 0x10_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cpath(p: &Path) -> nix::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

/// A detached copy of the mount tree at `path` (with its submounts when
/// `recursive`), not visible anywhere until attached.
pub fn clone_tree(path: &Path, recursive: bool) -> nix::Result<OwnedFd> {
    let c = cpath(path)?;
    let mut flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: `c` is NUL-terminated and outlives the call, which only reads
    // it; the other arguments are integers.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a non-negative result is a descriptor open_tree just made
    // for us: nothing else owns or closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Set `attrs` on the detached tree `tree` and every mount below it;
/// `userns` (with [`MOUNT_ATTR_IDMAP`]) maps file owners through that user
/// namespace's id map.
pub fn set_attrs(tree: &OwnedFd, attrs: u64, userns: Option<&OwnedFd>) -> nix::Result<()> {
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |u| u.as_raw_fd() as u64),
    };
    let empty = c"";
    // SAFETY: the struct and the empty path live across the call and the
    // size passed is the struct's (the kernel reads no further, and only
    // during the call); `tree` and `userns` are borrowed, so open, for it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as u32 | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Attach the detached tree `tree` at `target`.
pub fn attach(tree: &OwnedFd, target: &Path) -> nix::Result<()> {
    let c = cpath(target)?;
    let empty = c"";
    // SAFETY: NUL-terminated strings that outlive the call, which only reads
    // them; `tree` is borrowed, so open, for it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Bind `source` at `target` with `attrs` applied to every mount of the
/// tree (recursive bind), through the user namespace `idmap` where the file
/// systems support idmapped mounts. Returns whether the tree is idmapped:
/// a file system without support (tmpfs before Linux 6.3, proc, sysfs)
/// gets the plain bind, its files then show up as owned by nobody inside.
pub fn bind_tree(
    source: &Path,
    target: &Path,
    attrs: u64,
    idmap: Option<&OwnedFd>,
) -> nix::Result<bool> {
    let tree = clone_tree(source, true)?;
    let mut idmapped = false;
    if let Some(userns) = idmap {
        match set_attrs(&tree, attrs | MOUNT_ATTR_IDMAP, Some(userns)) {
            Ok(()) => idmapped = true,
            Err(Errno::EINVAL | Errno::EPERM | Errno::EOPNOTSUPP) => set_attrs(&tree, attrs, None)?,
            Err(e) => return Err(e),
        }
    } else if attrs != 0 {
        set_attrs(&tree, attrs, None)?;
    }
    attach(&tree, target)?;
    Ok(idmapped)
}
