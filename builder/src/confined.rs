//! File system access that cannot leave a directory.
//!
//! Two directories are not trusted to point only at themselves: the staged
//! tree (its content comes from packages, a rootfs archive and postprocess
//! scripts) and the manifest's directory (its files come from a checkout).
//! A symlink in either must never make the builder read or write the build
//! machine's own files, so every access here goes through `openat2(2)`:
//!
//! - [`Root`]: writes into the staged tree. Parent directories resolve with
//!   `RESOLVE_IN_ROOT`, like a chroot: an absolute symlink or `..` in the
//!   tree resolves inside the tree, as it would on a booted node. The final
//!   component is never followed (a symlink there is replaced or removed, not
//!   written through), and modes and owners are set on the open file
//!   (`fchmod`/`fchown`), never through a path.
//! - [`open_source`]: reads a file the manifest names, `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS` from the manifest's directory, `O_NOFOLLOW`.
//!
//! Recursive operations (`remove_dir_all`, directory walks) and renames use
//! `/proc/self/fd/N/NAME` paths: the kernel resolves the descriptor's
//! directory itself, and these operations do not follow a symlink in NAME.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// `openat2(2)` with `O_CLOEXEC` always added; retries `EAGAIN`/`EINTR`
/// (the kernel asks for a retry when a rename raced a `RESOLVE_IN_ROOT` walk).
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &Path,
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str())?;
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = resolve;
    for _ in 0..64 {
        // SAFETY: valid fd, NUL-terminated path and an open_how of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as libc::c_int) });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        )
    })
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `/proc/self/fd/N`: a path the kernel resolves to the descriptor's file.
fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// What a path may be refused for, in the words the errors use.
fn explain(e: io::Error, what: &str) -> io::Error {
    let msg = match e.raw_os_error() {
        Some(libc::EXDEV) => {
            format!("{what} leads outside its directory (`..` or an absolute symlink)")
        }
        Some(libc::ELOOP) => format!("{what} is or goes through a symlink"),
        _ => return io::Error::new(e.kind(), format!("{what}: {e}")),
    };
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

/// A file the manifest names, opened for reading (the manifest reads it
/// once, at load).
#[derive(Debug)]
pub struct Source {
    pub file: File,
    pub metadata: std::fs::Metadata,
}

/// Opens `rel` (relative, no `..`) beneath `dir` without following any
/// symlink (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, `O_NOFOLLOW`), or, with
/// `follow_symlinks`, `path` as the system would. Either way only a regular
/// file is accepted: a directory, device, fifo or socket is refused.
pub fn open_source(dir: &Path, path: &Path, follow_symlinks: bool) -> io::Result<Source> {
    // O_PATH first: a device or fifo is refused without ever being opened
    // (opening one runs its driver, or blocks).
    let handle: OwnedFd = if follow_symlinks {
        std::os::unix::fs::OpenOptionsExt::custom_flags(
            std::fs::OpenOptions::new().read(true),
            libc::O_PATH,
        )
        .open(path)?
        .into()
    } else {
        let rel = path.strip_prefix(dir).map_err(|_| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not inside the manifest's directory {}",
                    path.display(),
                    dir.display()
                ),
            )
        })?;
        let base = File::open(dir)?;
        openat2(
            base.as_fd(),
            rel,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
        )
        .map_err(|e| explain(e, &path.display().to_string()))?
    };
    let st = nix::sys::stat::fstat(handle.as_raw_fd()).map_err(io::Error::from)?;
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG {
        let what = match kind {
            libc::S_IFDIR => "a directory",
            libc::S_IFLNK => "a symlink",
            _ => "not a regular file (a device, fifo or socket)",
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is {what}", path.display()),
        ));
    }
    if !follow_symlinks && st.st_nlink > 1 {
        // A hard link is a second name of a file that may live anywhere on
        // this file system (a checkout made next to the build machine's
        // secrets): not "inside the manifest's directory" in any sense.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} has {} hard links, so it may be a file from outside the manifest's directory: copy it, or set follow-symlinks = true to accept it",
                path.display(),
                st.st_nlink
            ),
        ));
    }
    // The same inode, now opened for reading.
    let file = File::open(fd_path(handle.as_fd()))?;
    let metadata = file.metadata()?;
    Ok(Source { file, metadata })
}

/// The staged tree: every path is resolved inside it.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// A name in a directory of the tree: the directory is open (resolved inside
/// the tree), the name is never followed.
#[derive(Debug)]
pub struct At {
    dir: OwnedFd,
    name: OsString,
    /// The path in the tree, for messages (`/etc/motd`).
    pub display: String,
}

const IN_ROOT: u64 = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;

/// `path` relative to the tree root: leading `/` dropped, `.` dropped, and
/// `..` refused (inside the tree it would be clamped anyway; in a key it is a mistake).
fn relative(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} must not contain `..`", path.display()),
                ))
            }
        }
    }
    Ok(out)
}

impl Root {
    /// Opens the tree's directory; `path` itself must not be a symlink (a
    /// base copied from a symlink to `/` would make the build machine the tree).
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = std::os::unix::fs::OpenOptionsExt::custom_flags(
            std::fs::OpenOptions::new().read(true),
            libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "opening the tree {} (it must be a directory, not a symlink): {e}",
                    path.display()
                ),
            )
        })?;
        Ok(Root {
            fd: fd.into(),
            path: path.to_owned(),
        })
    }

    /// The tree's directory on the build machine (for messages and bwrap).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_dir_fd(&self, rel: &Path) -> io::Result<OwnedFd> {
        if rel.as_os_str().is_empty() {
            return openat2(
                self.fd.as_fd(),
                Path::new("."),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
                IN_ROOT,
            );
        }
        openat2(
            self.fd.as_fd(),
            rel,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            IN_ROOT,
        )
    }

    /// The directory `path` of the tree (symlinks resolved inside the tree),
    /// created 0755 with its missing parents when `create`.
    pub fn dir(&self, path: impl AsRef<Path>, create: bool) -> io::Result<Dir> {
        let path = path.as_ref();
        let rel = relative(path)?;
        let what = || format!("/{}", rel.display());
        match self.open_dir_fd(&rel) {
            Ok(fd) => return Ok(Dir { fd }),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{} in the tree: {e}", what()),
                ))
            }
        }
        let mut cur = PathBuf::new();
        for comp in rel.components() {
            let next = cur.join(comp);
            match self.open_dir_fd(&next) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let parent = self.open_dir_fd(&cur)?;
                    let name = cstring(comp.as_os_str())?;
                    // SAFETY: valid dirfd and NUL-terminated name.
                    let r = unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) };
                    if let Err(e) = cvt(r) {
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(io::Error::new(
                                e.kind(),
                                format!("creating /{} in the tree: {e}", next.display()),
                            ));
                        }
                    }
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("/{} in the tree: {e}", next.display()),
                    ))
                }
            }
            cur = next;
        }
        self.open_dir_fd(&rel).map(|fd| Dir { fd }).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{} in the tree (a dangling symlink?): {e}", what()),
            )
        })
    }

    /// `path`'s parent directory (resolved inside the tree; created when
    /// `create`) and its last name, which is never followed.
    pub fn at(&self, path: impl AsRef<Path>, create: bool) -> io::Result<At> {
        let path = path.as_ref();
        let rel = relative(path)?;
        let Some(name) = rel.file_name().map(OsStr::to_owned) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names the tree's root", path.display()),
            ));
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = self.dir(parent, create)?;
        Ok(At {
            dir: dir.fd,
            name,
            display: format!("/{}", rel.display()),
        })
    }

    /// Opens a file of the tree for reading, symlinks resolved inside the tree.
    pub fn open_read(&self, path: impl AsRef<Path>) -> io::Result<File> {
        let rel = relative(path.as_ref())?;
        openat2(self.fd.as_fd(), &rel, libc::O_RDONLY, 0, IN_ROOT).map(File::from)
    }

    /// Opens a regular file of the tree for reading (symlinks resolved
    /// inside the tree). Anything else is refused before it is opened for
    /// reading: opening a fifo blocks, opening a device runs its driver.
    pub fn open_regular(&self, path: impl AsRef<Path>) -> io::Result<File> {
        let rel = relative(path.as_ref())?;
        let handle = openat2(self.fd.as_fd(), &rel, libc::O_PATH, 0, IN_ROOT)?;
        let st = nix::sys::stat::fstat(handle.as_raw_fd()).map_err(io::Error::from)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("/{} is not a regular file", rel.display()),
            ));
        }
        // The same inode, now opened for reading.
        File::open(fd_path(handle.as_fd()))
    }

    pub fn read_to_string(&self, path: impl AsRef<Path>) -> io::Result<String> {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut self.open_read(path)?, &mut s)?;
        Ok(s)
    }

    /// Replaces `path` with a file holding `contents`, root-owned, `mode`.
    pub fn write(&self, path: impl AsRef<Path>, contents: &[u8], mode: u32) -> io::Result<()> {
        let at = self.at(path, true)?;
        let mut f = at.create_file()?;
        f.write_all(contents)?;
        at.finish_file(&f, mode)
    }
}

/// An open directory of the tree.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// A path naming this directory that the kernel resolves through the
    /// descriptor (for walks and recursive removal; valid while `self` lives).
    pub fn path(&self) -> PathBuf {
        fd_path(self.fd.as_fd())
    }
}

impl At {
    /// `/proc/self/fd/N/NAME`: only for operations that do not follow NAME
    /// (lstat, unlink, rmdir, rename, remove_dir_all, readlink, symlink).
    pub fn path(&self) -> PathBuf {
        fd_path(self.dir.as_fd()).join(&self.name)
    }

    /// `lstat`: `None` if nothing is there.
    pub fn lstat(&self) -> io::Result<Option<std::fs::Metadata>> {
        match std::fs::symlink_metadata(self.path()) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.lstat().ok().flatten().is_some_and(|m| m.is_dir())
    }

    /// Removes whatever is there (a symlink itself, not its target; a
    /// directory recursively). Nothing there is fine.
    pub fn remove(&self) -> io::Result<()> {
        match self.lstat()? {
            None => Ok(()),
            Some(m) if m.is_dir() => std::fs::remove_dir_all(self.path()),
            Some(_) => std::fs::remove_file(self.path()),
        }
        .map_err(|e| io::Error::new(e.kind(), format!("removing {}: {e}", self.display)))
    }

    /// A new, empty file in place of whatever non-directory was there.
    pub fn create_file(&self) -> io::Result<File> {
        if self.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is a directory in the tree", self.display),
            ));
        }
        self.remove()?;
        let fd = openat2(
            self.dir.as_fd(),
            Path::new(&self.name),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
        )
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", self.display)))?;
        Ok(File::from(fd))
    }

    /// Owner root:root (when running as root), then `mode`: on the open file,
    /// in that order, so chown cannot clear bits the mode asks for.
    pub fn finish_file(&self, f: &File, mode: u32) -> io::Result<()> {
        if nix::unistd::geteuid().is_root() {
            // SAFETY: valid descriptor.
            cvt(unsafe { libc::fchown(f.as_raw_fd(), 0, 0) })?;
        }
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o7777) })
            .map_err(|e| io::Error::new(e.kind(), format!("chmod {}: {e}", self.display)))
    }

    /// Replaces whatever non-directory is there with a symlink to `target`.
    pub fn symlink(&self, target: impl AsRef<Path>) -> io::Result<()> {
        if self.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is a directory in the tree", self.display),
            ));
        }
        self.remove()?;
        std::os::unix::fs::symlink(target.as_ref(), self.path()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "linking {} -> {}: {e}",
                    self.display,
                    target.as_ref().display()
                ),
            )
        })
    }

    /// Renames this entry to `to` (both inside the tree; nothing followed).
    pub fn rename_to(&self, to: &At) -> io::Result<()> {
        std::fs::rename(self.path(), to.path()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("moving {} to {}: {e}", self.display, to.display),
            )
        })
    }

    /// chmod of a directory (opened `O_NOFOLLOW|O_DIRECTORY`, never a symlink).
    pub fn chmod_dir(&self, mode: u32) -> io::Result<()> {
        let fd = openat2(
            self.dir.as_fd(),
            Path::new(&self.name),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
        )?;
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode & 0o7777) })
            .map_err(|e| io::Error::new(e.kind(), format!("chmod {}: {e}", self.display)))
    }

    /// Creates this directory (0755) if missing; a non-directory there is an error.
    pub fn mkdir(&self) -> io::Result<()> {
        match self.lstat()? {
            Some(m) if m.is_dir() => Ok(()),
            Some(_) => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", self.display),
            )),
            None => std::fs::create_dir(self.path())
                .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", self.display))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_never_leave_the_tree() {
        let base = tempfile::tempdir().unwrap();
        let outside = base.path().join("outside");
        let tree = base.path().join("tree");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("opt")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../..", tree.join("etc/up")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), tree.join("etc/motd")).unwrap();
        std::fs::write(outside.join("victim"), "host file").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("srv")).unwrap();
        let root = Root::open(&tree).unwrap();

        // Dangling inside the tree (the target exists only on the build machine): refused.
        let e = root.write("/srv/x", b"0", 0o644).unwrap_err();
        assert!(e.to_string().contains("/srv"), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        std::fs::create_dir_all(tree.join(outside.strip_prefix("/").unwrap())).unwrap();
        root.write("/opt/x", b"1", 0o644).unwrap();
        root.write("/etc/up/y", b"2", 0o644).unwrap();
        root.write("/etc/motd", b"3", 0o4755).unwrap();
        // An absolute symlink resolved as in a chroot; the final name replaced.
        assert_eq!(
            std::fs::read_to_string(tree.join(outside.strip_prefix("/").unwrap()).join("x"))
                .unwrap(),
            "1"
        );
        assert_eq!(std::fs::read_to_string(tree.join("y")).unwrap(), "2");
        assert!(!tree.join("etc/motd").is_symlink());
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "host file"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        assert!(root.at("/etc/../x", true).is_err());
        assert!(root.at("/", true).is_err());
    }

    #[test]
    fn sources_are_regular_files_beneath_the_directory() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("m");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(base.path().join("secret"), "s").unwrap();
        std::fs::write(dir.join("sub/ok"), "ok").unwrap();
        std::os::unix::fs::symlink(base.path().join("secret"), dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("../secret", dir.join("rel")).unwrap();
        std::os::unix::fs::symlink("sub", dir.join("inner")).unwrap();
        nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::hard_link(base.path().join("secret"), dir.join("hard")).unwrap();
        assert!(open_source(&dir, &dir.join("sub/ok"), false).is_ok());
        for bad in ["abs", "rel", "inner/ok", "../secret", "sub", "fifo", "hard"] {
            let e = open_source(&dir, &dir.join(bad), false).unwrap_err();
            assert!(!e.to_string().is_empty(), "{bad}");
        }
        assert!(open_source(&dir, &dir.join("abs"), true).is_ok());
        assert!(open_source(&dir, &dir.join("fifo"), true).is_err());
        assert!(open_source(&dir, &base.path().join("secret"), false).is_err());
    }
}
