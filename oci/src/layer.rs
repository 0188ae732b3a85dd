//! Applying OCI image layers (tar streams) onto a directory: the changeset
//! rules of the OCI image spec, whiteouts and opaque directories included.
//!
//! Every path of a layer is resolved *inside* the destination, the way a
//! chroot would resolve it: a symlink in a lower layer that points at `/` or
//! `../..` can never make a later entry land outside the tree.
//!
//! Every write into the tree goes through directory file descriptors: each
//! step of a path is one name opened beneath the directory reached so far
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so the kernel never
//! follows a symlink for us; the symlinks a layer made are followed by this
//! code, lexically and inside the root. Files are created `O_EXCL |
//! O_NOFOLLOW`, owners and modes set on the open file (`fchown`, `fchmod`),
//! never on a path, and a symlink is never chmodded. Directory modes, applied
//! at the end of a layer, re-open the directory with no symlink allowed
//! anywhere on the way: a directory a later entry replaced by a symlink (or
//! whose parent it replaced) is skipped, never followed to the host.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::limits::ImportLimits;
use cairn_contracts::rootpath::push_components;

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

/// Small safe wrappers over the `*at` system calls the layer code uses.
/// Every one of them works on a directory fd and a single name (or an open
/// file), and none follows a symlink in the last component.
pub(crate) mod at {
    use std::ffi::{CString, OsStr, OsString};
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};

    pub const RESOLVE_NO_XDEV: u64 = 0x01;
    pub const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    pub const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    pub const RESOLVE_BENEATH: u64 = 0x08;
    /// Beneath the directory, no symlink (magic or not) anywhere on the way,
    /// no mount point crossed.
    pub const STRICT: u64 =
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;

    /// `struct open_how` of openat2(2).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }

    pub fn cstr(p: &OsStr) -> io::Result<CString> {
        CString::new(p.as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))
    }

    fn cvt(rc: libc::c_int) -> io::Result<()> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// openat2(2); `O_CLOEXEC` is always added. `mode` only with `O_CREAT`.
    pub fn openat2(
        dir: BorrowedFd<'_>,
        path: &OsStr,
        flags: i32,
        mode: u32,
        resolve: u64,
    ) -> io::Result<OwnedFd> {
        let c = cstr(path)?;
        let how = OpenHow {
            flags: u64::from((flags | libc::O_CLOEXEC) as u32),
            mode: u64::from(mode),
            resolve,
        };
        for _ in 0..128 {
            // SAFETY: a NUL-terminated path and an open_how that live across
            // the call, with its exact size.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            };
            if rc >= 0 {
                // SAFETY: the kernel returned a new descriptor we now own.
                return Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // EAGAIN: a concurrent rename; try again.
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                Some(libc::ENOSYS) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "openat2(2) is missing: cairn needs Linux 5.6 or later",
                    ))
                }
                _ => return Err(e),
            }
        }
        Err(io::Error::other("openat2(2) kept failing with EAGAIN"))
    }

    /// fstatat(2) of `name` in `dir`, not following a symlink.
    pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
        let c = cstr(name)?;
        // SAFETY: zeroed stat is a valid out buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, C string and out pointer.
        cvt(unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(st)
    }

    /// The file an fd (O_PATH ones included) refers to.
    pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
        // SAFETY: zeroed stat is a valid out buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, empty C string, AT_EMPTY_PATH, out pointer.
        cvt(unsafe {
            libc::fstatat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                &mut st,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(st)
    }

    pub fn is_dir(st: &libc::stat) -> bool {
        st.st_mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: valid fd and C string.
        cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) })
    }

    pub fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, flags: i32) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: valid fd and C string.
        cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) })
    }

    pub fn symlink_at(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        let (t, c) = (cstr(target)?, cstr(name)?);
        // SAFETY: valid fd and C strings.
        cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) })
    }

    /// linkat(2) without AT_SYMLINK_FOLLOW: a symlink is linked, not followed.
    pub fn link_at(
        odir: BorrowedFd<'_>,
        oname: &OsStr,
        ndir: BorrowedFd<'_>,
        nname: &OsStr,
    ) -> io::Result<()> {
        let (o, n) = (cstr(oname)?, cstr(nname)?);
        // SAFETY: valid fds and C strings.
        cvt(unsafe {
            libc::linkat(
                odir.as_raw_fd(),
                o.as_ptr(),
                ndir.as_raw_fd(),
                n.as_ptr(),
                0,
            )
        })
    }

    /// Owner of `name` in `dir` itself (a symlink is not followed).
    pub fn chown_at(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: valid fd and C string.
        cvt(unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                c.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: valid fd.
        cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })
    }

    pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
        // SAFETY: valid fd.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })
    }

    pub fn fsetxattr(fd: BorrowedFd<'_>, name: &str, value: &[u8]) -> io::Result<()> {
        let c = cstr(OsStr::new(name))?;
        // SAFETY: valid fd, C string, and a pointer/length of one live slice.
        cvt(unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                c.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })
    }

    /// The target of the symlink an O_PATH|O_NOFOLLOW fd refers to.
    pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<OsString> {
        let mut buf = vec![0u8; 4097];
        // SAFETY: valid fd, empty C string, live buffer of the given length.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(OsString::from_vec(buf))
    }

    /// The names in a directory, `.` and `..` left out.
    pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
        let fd = openat2(
            dir,
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
            0,
        )?;
        let mut d = nix::dir::Dir::from_fd(fd.into_raw_fd()).map_err(io::Error::from)?;
        let mut out = Vec::new();
        for e in d.iter() {
            let e = e.map_err(io::Error::from)?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        Ok(out)
    }
}

/// A directory inside the tree: an O_PATH fd and its physical path from the
/// root (no symlink in it).
pub(crate) struct TreeDir {
    pub fd: OwnedFd,
    pub phys: PathBuf,
}

/// The destination tree of a layer, held by a directory fd.
pub(crate) struct Tree {
    root: OwnedFd,
    max_depth: usize,
}

impl Tree {
    pub fn open(dest: &Path, max_depth: usize) -> Result<Self> {
        let root = at::openat2(
            unsafe_cwd(),
            dest.as_os_str(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            0,
        )
        .with_context(|| format!("opening {}", dest.display()))?;
        Ok(Self { root, max_depth })
    }

    /// Resolve directory `rel` the way a chroot at the root would: symlinks
    /// met on the way are read and followed by this code (absolute targets
    /// restart at the root, `..` stops there), every step is one name opened
    /// with no symlink followed by the kernel. Missing directories are made
    /// (0755) when `create`; otherwise a missing one, or one that is not a
    /// directory, gives `None`.
    pub fn dir(&self, rel: &Path, create: bool) -> Result<Option<TreeDir>> {
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, rel);
        pending.reverse();
        let mut stack: Vec<(OwnedFd, OsString)> = Vec::new();
        let mut hops = 0;
        let mut steps = 0;
        while let Some(part) = pending.pop() {
            // Symlink targets of 4 KiB full of `d/..` chained 40 deep would
            // otherwise cost ~50k lookups per entry.
            steps += 1;
            if steps > MAX_RESOLVE_STEPS {
                bail!(
                    "resolving {} takes more than {MAX_RESOLVE_STEPS} steps through symbolic links",
                    rel.display()
                );
            }
            if part == ".." {
                stack.pop();
                continue;
            }
            let cur = stack.last().map_or(self.root.as_fd(), |(fd, _)| fd.as_fd());
            let open = || at::openat2(cur, &part, libc::O_PATH | libc::O_NOFOLLOW, 0, at::STRICT);
            let fd = match open() {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    match at::mkdir_at(cur, &part, 0o755) {
                        // 0755 whatever the importer's umask (it would be
                        // committed as is).
                        Ok(()) => at::openat2(
                            cur,
                            &part,
                            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                            0,
                            at::STRICT,
                        )
                        .and_then(|d| at::fchmod(d.as_fd(), 0o755))
                        .with_context(|| {
                            format!("creating directory {}", phys_of(&stack, &part).display())
                        })?,
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("creating directory {}", phys_of(&stack, &part).display())
                            })
                        }
                    }
                    open()
                        .with_context(|| format!("opening {}", phys_of(&stack, &part).display()))?
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("opening {}", phys_of(&stack, &part).display()))
                }
            };
            let st = at::fstat(fd.as_fd())?;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    stack.push((fd, part));
                    if stack.len() > self.max_depth {
                        bail!(
                            "{} resolves to a path more than {} directories deep",
                            rel.display(),
                            self.max_depth
                        );
                    }
                }
                libc::S_IFLNK => {
                    hops += 1;
                    if hops > 40 {
                        bail!(
                            "too many levels of symbolic links resolving {}",
                            rel.display()
                        );
                    }
                    let target = at::readlink_fd(fd.as_fd())?;
                    if target.as_bytes().starts_with(b"/") {
                        stack.clear();
                    }
                    let mut more = Vec::new();
                    push_components(&mut more, Path::new(&target));
                    pending.extend(more.into_iter().rev());
                }
                _ if create => bail!(
                    "{} is not a directory (resolving {})",
                    phys_of(&stack, &part).display(),
                    rel.display()
                ),
                _ => return Ok(None),
            }
        }
        let phys: PathBuf = stack.iter().map(|(_, n)| n.as_os_str()).collect();
        let fd = match stack.pop() {
            Some((fd, _)) => fd,
            None => self.root.try_clone()?,
        };
        Ok(Some(TreeDir { fd, phys }))
    }

    /// A directory by its physical path, no symlink allowed on the way:
    /// `None` when it is gone or no longer a directory.
    fn reopen_dir(&self, phys: &Path) -> Result<Option<OwnedFd>> {
        let p: &OsStr = if phys.as_os_str().is_empty() {
            OsStr::new(".")
        } else {
            phys.as_os_str()
        };
        match at::openat2(
            self.root.as_fd(),
            p,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
            at::STRICT,
        ) {
            Ok(fd) => Ok(Some(fd)),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("opening {}", phys.display())),
        }
    }
}

/// Path components (symlink targets included) one resolution may walk.
const MAX_RESOLVE_STEPS: usize = 1024;

fn unsafe_cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a valid dirfd for the *at calls for the whole run.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

fn phys_of(stack: &[(OwnedFd, OsString)], last: &OsStr) -> PathBuf {
    let mut p: PathBuf = stack.iter().map(|(_, n)| n.as_os_str()).collect();
    p.push(last);
    p
}

/// Remove whatever `name` in `dir` is (file, symlink or a whole directory
/// tree, walked by fds: a symlink inside is removed, never followed).
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = match at::stat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if at::is_dir(&st) {
        let d = at::openat2(
            dir,
            name,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
            at::STRICT,
        )?;
        for child in at::list_dir(d.as_fd())? {
            remove_at(d.as_fd(), &child)?;
        }
        at::unlink_at(dir, name, libc::AT_REMOVEDIR)
    } else {
        at::unlink_at(dir, name, 0)
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

/// A path for messages: long names cut short.
fn shown(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    if s.chars().count() > 160 {
        let head: String = s.chars().take(120).collect();
        format!("{head}… ({} bytes)", p.len())
    } else {
        s.into_owned()
    }
}

/// Whiteout names: `.wh.NAME` only as the last component, NAME a real name
/// (not empty, `.`, `..` or another whiteout); `.wh..wh..opq` only as a
/// marker file. Anything else is refused, naming the entry.
fn check_whiteout_names(rel: &Path, kind: tar::EntryType) -> Result<()> {
    let comps: Vec<&OsStr> = rel.iter().collect();
    for (i, c) in comps.iter().enumerate() {
        let b = c.as_bytes();
        let Some(victim) = b.strip_prefix(WHITEOUT_PREFIX.as_bytes()) else {
            continue;
        };
        if i + 1 != comps.len() {
            bail!(
                "layer entry {}: the whiteout name {:?} is used as a directory",
                rel.display(),
                c
            );
        }
        if kind == tar::EntryType::Directory {
            bail!(
                "layer entry {}: a directory named like a whiteout",
                rel.display()
            );
        }
        if b == OPAQUE_WHITEOUT.as_bytes() {
            continue;
        }
        if victim.is_empty()
            || victim == b"."
            || victim == b".."
            || victim.starts_with(WHITEOUT_PREFIX.as_bytes())
        {
            bail!(
                "layer entry {}: whiteout of {:?} is not a whiteout of a file in the directory",
                rel.display(),
                String::from_utf8_lossy(victim)
            );
        }
    }
    Ok(())
}

/// Apply one uncompressed layer tar stream onto `dest`. `entries` counts the
/// entries of all layers so far (against `limits.max_entries`).
/// Ownership is kept when running as root; otherwise the files belong to the
/// caller (enough for unit tests, which check the changeset rules).
pub fn apply_layer_limited<R: Read>(
    reader: R,
    dest: &Path,
    limits: &ImportLimits,
    entries: &mut u64,
) -> Result<LayerStats> {
    let as_root = nix::unistd::geteuid().is_root();
    let tree = Tree::open(dest, limits.max_path_depth)?;
    let mut archive = tar::Archive::new(TarGuard::new(reader, limits.max_tar_header_size));
    let mut stats = LayerStats::default();
    // Physical paths this layer made: an opaque marker hides lower layers only.
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut opaque: Vec<PathBuf> = Vec::new();
    // Directory modes are applied last so a read-only dir can still be filled.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();

    for entry in archive.entries().context("reading layer tar")? {
        let mut entry = entry.context("reading layer tar entry")?;
        *entries += 1;
        let raw_bytes = entry.path_bytes().into_owned();
        if *entries > limits.max_entries {
            bail!(
                "entry {} is past the limit of {} entries for the whole image (ImportLimits::max_entries, `host app import --max-entries`)",
                shown(&raw_bytes),
                limits.max_entries
            );
        }
        if raw_bytes.len() > limits.max_path_len {
            bail!(
                "layer entry {}: its path is longer than the limit of {} bytes (ImportLimits::max_path_len, `host app import --max-path-len`)",
                shown(&raw_bytes),
                limits.max_path_len
            );
        }
        let raw_path = PathBuf::from(OsString::from_vec(raw_bytes));
        let rel = clean_entry_path(&raw_path)?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        if rel.iter().count() > limits.max_path_depth {
            bail!(
                "layer entry {}: more than {} path components (ImportLimits::max_path_depth, `host app import --max-path-depth`)",
                shown(raw_path.as_os_str().as_bytes()),
                limits.max_path_depth
            );
        }
        stats.entries += 1;
        let kind = entry.header().entry_type();
        check_whiteout_names(&rel, kind)?;
        let file_name = rel.file_name().unwrap_or_default().to_os_string();
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();

        if file_name == OPAQUE_WHITEOUT {
            stats.opaque_dirs += 1;
            opaque.push(parent_rel);
            continue;
        }
        if let Some(victim) = file_name
            .as_bytes()
            .strip_prefix(WHITEOUT_PREFIX.as_bytes())
        {
            stats.whiteouts += 1;
            if let Some(parent) = tree.dir(&parent_rel, false)? {
                remove_at(parent.fd.as_fd(), OsStr::from_bytes(victim))
                    .with_context(|| format!("applying whiteout {}", raw_path.display()))?;
            }
            continue;
        }
        if matches!(
            kind,
            tar::EntryType::Char
                | tar::EntryType::Block
                | tar::EntryType::Fifo
                | tar::EntryType::GNUSparse
        ) {
            stats.skipped_special += 1;
            tracing::debug!("skipping special file {}", raw_path.display());
            continue;
        }
        if !matches!(
            kind,
            tar::EntryType::Directory
                | tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::Symlink
                | tar::EntryType::Link
        ) {
            // pax/GNU long-name headers are consumed by the tar crate; others carry no file.
            continue;
        }

        let parent = tree
            .dir(&parent_rel, true)
            .with_context(|| format!("creating parent of {}", raw_path.display()))?
            .ok_or_else(|| anyhow!("no parent for {}", raw_path.display()))?;
        let pfd = parent.fd.as_fd();
        let phys = parent.phys.join(&file_name);
        let header = entry.header().clone();
        let xattrs = layer_xattrs(&mut entry, as_root)
            .with_context(|| format!("reading the xattrs of {}", raw_path.display()))?;
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = owner(&header, &raw_path)?;
        let ctx = |what: &str| format!("{what} {}", raw_path.display());
        match kind {
            tar::EntryType::Directory => {
                match at::stat_at(pfd, &file_name) {
                    Ok(st) if at::is_dir(&st) => {}
                    Ok(_) => {
                        remove_at(pfd, &file_name).with_context(|| ctx("replacing"))?;
                        at::mkdir_at(pfd, &file_name, 0o700).with_context(|| ctx("creating"))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        at::mkdir_at(pfd, &file_name, 0o700).with_context(|| ctx("creating"))?
                    }
                    Err(e) => return Err(e).with_context(|| ctx("reading")),
                }
                let fd = at::openat2(
                    pfd,
                    &file_name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                    at::STRICT,
                )
                .with_context(|| ctx("opening"))?;
                if as_root {
                    at::fchown(fd.as_fd(), uid, gid).with_context(|| ctx("chown"))?;
                }
                set_xattrs(fd.as_fd(), &xattrs, &raw_path)?;
                dir_modes.push((phys.clone(), mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_at(pfd, &file_name).with_context(|| ctx("replacing"))?;
                let fd = at::openat2(
                    pfd,
                    &file_name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                    at::STRICT,
                )
                .with_context(|| ctx("creating"))?;
                let mut f = fs::File::from(fd);
                io::copy(&mut entry, &mut f).with_context(|| ctx("writing"))?;
                if as_root {
                    at::fchown(f.as_fd(), uid, gid).with_context(|| ctx("chown"))?;
                }
                // After chown, which clears setuid/setgid bits.
                at::fchmod(f.as_fd(), mode).with_context(|| ctx("chmod"))?;
                // After chown, which drops security.capability.
                set_xattrs(f.as_fd(), &xattrs, &raw_path)?;
            }
            tar::EntryType::Symlink => {
                let link = link_name(&entry, &raw_path, limits)?;
                remove_at(pfd, &file_name).with_context(|| ctx("replacing"))?;
                at::symlink_at(&link, pfd, &file_name).with_context(|| ctx("creating symlink"))?;
                if as_root {
                    at::chown_at(pfd, &file_name, uid, gid).with_context(|| ctx("chown"))?;
                }
            }
            tar::EntryType::Link => {
                let link = link_name(&entry, &raw_path, limits)?;
                let src = clean_entry_path(Path::new(&link))?;
                let (Some(src_name), Some(src_parent)) = (src.file_name(), src.parent()) else {
                    bail!("hard link {} has no target", raw_path.display());
                };
                // The target as the archive names it: no symlink anywhere on
                // its way, and the last component linked itself (linkat
                // without AT_SYMLINK_FOLLOW), so it is inside the tree.
                let src_dir = tree.reopen_dir(src_parent)?.ok_or_else(|| {
                    anyhow!(
                        "hard link {} -> {}: the target's directory is missing or reached through a symbolic link",
                        raw_path.display(),
                        src.display()
                    )
                })?;
                let st = at::stat_at(src_dir.as_fd(), src_name).with_context(|| {
                    format!(
                        "hard link {} -> {}: no such target",
                        raw_path.display(),
                        src.display()
                    )
                })?;
                if at::is_dir(&st) {
                    bail!(
                        "hard link {} -> {}: the target is a directory",
                        raw_path.display(),
                        src.display()
                    );
                }
                remove_at(pfd, &file_name).with_context(|| ctx("replacing"))?;
                at::link_at(src_dir.as_fd(), src_name, pfd, &file_name).with_context(|| {
                    format!("hard link {} -> {}", raw_path.display(), src.display())
                })?;
            }
            _ => unreachable!("filtered above"),
        }
        // The entry and the directories on its way are this layer's.
        let mut p = phys.as_path();
        while created.insert(p.to_path_buf()) {
            match p.parent() {
                Some(pp) if !pp.as_os_str().is_empty() => p = pp,
                _ => break,
            }
        }
    }

    // Each directory once, however many markers (or symlinks) name it.
    let mut cleared: HashSet<PathBuf> = HashSet::new();
    for dir in &opaque {
        let Some(d) = tree.dir(dir, false)? else {
            continue;
        };
        if !cleared.insert(d.phys.clone()) {
            continue;
        }
        for child in at::list_dir(d.fd.as_fd())? {
            if !created.contains(&d.phys.join(&child)) {
                remove_at(d.fd.as_fd(), &child)
                    .with_context(|| format!("applying opaque dir {}", dir.display()))?;
            }
        }
    }
    // Children before parents; when a directory is listed twice, the last
    // entry's mode wins.
    let mut done: HashSet<PathBuf> = HashSet::new();
    for (dir, mode) in dir_modes.into_iter().rev() {
        if !done.insert(dir.clone()) {
            continue;
        }
        // Re-opened with no symlink on the way: a directory a later entry
        // replaced (by a symlink, say) is not chmodded through it.
        if let Some(fd) = tree.reopen_dir(&dir)? {
            at::fchmod(fd.as_fd(), mode)
                .with_context(|| format!("setting mode of {}", dir.display()))?;
        }
    }
    Ok(stats)
}

/// The link target of a symlink or hard link entry, checked for length.
fn link_name<R: Read>(
    entry: &tar::Entry<R>,
    raw_path: &Path,
    limits: &ImportLimits,
) -> Result<OsString> {
    let link = entry
        .link_name_bytes()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("link {} without a target", raw_path.display()))?;
    if link.len() > limits.max_path_len {
        bail!(
            "link {}: its target is longer than the limit of {} bytes (ImportLimits::max_path_len, `host app import --max-path-len`)",
            raw_path.display(),
            limits.max_path_len
        );
    }
    Ok(OsString::from_vec(link.into_owned()))
}

/// Owner of an entry: ids that do not fit a uid_t (or are -1, which chown
/// takes as "leave unchanged", i.e. root) are refused.
fn owner(header: &tar::Header, path: &Path) -> Result<(u32, u32)> {
    let uid = header.uid().unwrap_or(0);
    let gid = header.gid().unwrap_or(0);
    let max = u64::from(u32::MAX - 1);
    if uid > max || gid > max {
        bail!(
            "layer entry {}: owner {uid}:{gid} is out of range (ids go up to {max})",
            path.display()
        );
    }
    Ok((uid as u32, gid as u32))
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

fn set_xattrs(fd: BorrowedFd<'_>, xattrs: &[(String, Vec<u8>)], path: &Path) -> Result<()> {
    for (name, value) in xattrs {
        at::fsetxattr(fd, name, value).with_context(|| {
            format!(
                "setting xattr {name} on {} (the file system must support it)",
                path.display()
            )
        })?;
    }
    Ok(())
}

/// Watches the tar framing of a stream as it passes to the tar crate, which
/// reads a pax extended header or a GNU long name/link whole into memory,
/// whatever size its header claims: such a header larger than `max_meta` is
/// refused before its data is read. The framing follows the tar crate's own
/// rules (pax `size` overriding the next entry's, GNU sparse extension
/// blocks); after the end-of-archive block the rest passes unchecked.
pub(crate) struct TarGuard<R> {
    inner: R,
    max_meta: u64,
    block: Box<[u8; 512]>,
    filled: usize,
    /// Data (and padding) bytes of the current entry still to pass.
    skip: u64,
    /// Data of a pax header being collected (to find its `size`), and its length.
    capture: Option<(Vec<u8>, u64)>,
    pending_pax_size: Option<u64>,
    sparse_ext: bool,
    sparse_ext_bytes: u64,
    sparse_skip: u64,
    done: bool,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R, max_meta: u64) -> Self {
        Self {
            inner,
            max_meta,
            block: Box::new([0; 512]),
            filled: 0,
            skip: 0,
            capture: None,
            pending_pax_size: None,
            sparse_ext: false,
            sparse_ext_bytes: 0,
            sparse_skip: 0,
            done: false,
        }
    }

    fn observe(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() && !self.done {
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                if let Some((buf, len)) = &mut self.capture {
                    let want = (*len as usize).saturating_sub(buf.len()).min(n);
                    buf.extend_from_slice(&data[..want]);
                    if buf.len() as u64 == *len {
                        self.end_capture();
                    }
                }
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (512 - self.filled).min(data.len());
            self.block[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == 512 {
                self.filled = 0;
                self.on_block()?;
            }
        }
        Ok(())
    }

    fn end_capture(&mut self) {
        if let Some((buf, _)) = self.capture.take() {
            self.pending_pax_size = pax_size(&buf);
        }
    }

    fn on_block(&mut self) -> io::Result<()> {
        let block = *self.block;
        let b = &block[..];
        if self.sparse_ext {
            // GnuExtSparseHeader: 21 entries of 24 bytes, then isextended.
            // The tar crate keeps every entry in memory: bound the chain.
            self.sparse_ext_bytes += 512;
            if self.sparse_ext_bytes > self.max_meta {
                return Err(io::Error::other(format!(
                    "a GNU sparse file's extension headers in the layer tar are over the limit of {} bytes (ImportLimits::max_tar_header_size, `host app import --max-tar-header-size`)",
                    self.max_meta
                )));
            }
            if b[504] != 1 {
                self.sparse_ext = false;
                self.skip = self.sparse_skip;
            }
            return Ok(());
        }
        if b.iter().all(|&x| x == 0) {
            self.done = true;
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(b);
        let et = h.entry_type();
        let recognized = h.as_gnu().is_some() || h.as_ustar().is_some();
        let is_ext = et.is_gnu_longname()
            || et.is_gnu_longlink()
            || et.is_pax_local_extensions()
            || et.is_pax_global_extensions();
        let mut size = h.entry_size()?;
        if !is_ext {
            if let Some(p) = self.pending_pax_size {
                size = p;
            }
        }
        let meta = recognized
            && (et.is_gnu_longname() || et.is_gnu_longlink() || et.is_pax_local_extensions());
        if meta {
            if size > self.max_meta {
                return Err(io::Error::other(format!(
                    "a {} header of {size} bytes in the layer tar is over the limit of {} bytes (ImportLimits::max_tar_header_size, `host app import --max-tar-header-size`)",
                    if et.is_pax_local_extensions() { "pax" } else { "GNU long name" },
                    self.max_meta
                )));
            }
            if et.is_pax_local_extensions() {
                self.capture = Some((Vec::with_capacity(size as usize), size));
                if size == 0 {
                    self.end_capture();
                }
            }
        } else {
            self.pending_pax_size = None;
        }
        let padded = size
            .checked_add(511)
            .ok_or_else(|| io::Error::other("tar entry size overflows"))?
            & !511;
        let sparse_extended =
            !meta && et.is_gnu_sparse() && h.as_gnu().is_some_and(|g| g.is_extended());
        if sparse_extended {
            self.sparse_ext = true;
            self.sparse_ext_bytes = 0;
            self.sparse_skip = padded;
        } else {
            self.skip = padded;
        }
        Ok(())
    }
}

/// The `size` of pax extension data, as the tar crate reads it.
fn pax_size(data: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse().ok();
    }
    None
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

/// Wrap a (possibly compressed) layer blob in the right decompressor,
/// chosen by the magic bytes so OCI and Docker media types both work.
pub fn decompress<'a, R: io::BufRead + 'a>(mut reader: R) -> Result<Box<dyn Read + 'a>> {
    let head = reader.fill_buf().context("reading layer")?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut d = zstd::stream::read::Decoder::with_buffer(reader).context("starting zstd")?;
        // At most a 128 MiB window (zstd's own default limit), stated here.
        d.window_log_max(27).context("starting zstd")?;
        Ok(Box::new(d))
    } else {
        Ok(Box::new(reader))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_contracts::rootpath::resolve_in_root;

    /// One uncompressed layer onto `dest`, with the default limits.
    fn apply_layer<R: Read>(reader: R, dest: &Path) -> Result<LayerStats> {
        apply_layer_limited(reader, dest, &ImportLimits::default(), &mut 0)
    }

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

    // ------------------------------------------------------------ hostile layers

    /// One entry of a hand-made layer.
    enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a [u8], u32),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    fn layer(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            match e {
                E::Dir(p, mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::File(p, data, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p, *data).unwrap();
                }
                E::Sym(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
                E::Hard(p, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn deferred_dir_modes_never_follow_a_symlink_to_the_host() {
        use std::os::unix::fs::PermissionsExt;
        let host = tempfile::tempdir().unwrap();
        let host_file = host.path().join("host-file");
        fs::write(&host_file, "host").unwrap();
        fs::set_permissions(&host_file, fs::Permissions::from_mode(0o644)).unwrap();
        let host_dir = host.path().join("q");
        fs::create_dir(&host_dir).unwrap();
        fs::set_permissions(&host_dir, fs::Permissions::from_mode(0o755)).unwrap();
        let (hf, hd) = (
            host_file.to_str().unwrap().to_string(),
            host.path().to_str().unwrap().to_string(),
        );
        let dir = tempfile::tempdir().unwrap();
        // v/ (setuid, world-writable) then v -> host file; p/q/ then p -> host dir.
        let l = layer(&[
            E::Dir("v/", 0o4777),
            E::Sym("v", &hf),
            E::Dir("p/", 0o755),
            E::Dir("p/q/", 0o6777),
            E::Sym("p", &hd),
        ]);
        apply_layer(&l[..], dir.path()).unwrap();
        assert_eq!(mode_of(&host_file), 0o644, "host file chmodded through v");
        assert_eq!(mode_of(&host_dir), 0o755, "host dir chmodded through p");
        // Across layers too: a lower layer's symlink, a directory through it.
        let l2 = layer(&[E::Dir("v/", 0o4777), E::Sym("v", &hf)]);
        apply_layer(&l2[..], dir.path()).unwrap();
        assert_eq!(mode_of(&host_file), 0o644);
        assert!(fs::symlink_metadata(dir.path().join("v"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn writes_through_symlinks_stay_in_the_root() {
        let host = tempfile::tempdir().unwrap();
        fs::write(host.path().join("victim"), "host").unwrap();
        let hd = host.path().to_str().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let l1 = layer(&[E::Sym("d", &hd), E::Sym("f", &format!("{hd}/victim"))]);
        apply_layer(&l1[..], dir.path()).unwrap();
        // A file through the symlinked dir, a file over the symlink, a
        // whiteout and an opaque marker through the symlinked dir.
        let l2 = layer(&[
            E::File("d/new", b"x", 0o644),
            E::File("f", b"replaced", 0o644),
            E::File("d/.wh.victim", b"", 0o644),
            E::File("d/.wh..wh..opq", b"", 0o644),
        ]);
        apply_layer(&l2[..], dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(host.path().join("victim")).unwrap(),
            "host"
        );
        assert!(!host.path().join("new").exists());
        assert_eq!(
            fs::read_to_string(dir.path().join("f")).unwrap(),
            "replaced"
        );
        let inside = resolve_in_root(dir.path(), Path::new("d/new"), true).unwrap();
        assert!(inside.starts_with(dir.path()) && inside.exists());
    }

    #[test]
    fn hard_links_stay_inside_and_never_go_through_a_symlink() {
        let host = tempfile::tempdir().unwrap();
        fs::write(host.path().join("secret"), "host").unwrap();
        let hd = host.path().to_str().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let base = layer(&[
            E::Dir("real/", 0o755),
            E::File("real/f", b"inside", 0o644),
            E::Sym("via", "real"),
            E::Sym("esc", &hd),
            E::Hard("ok", "real/f"),
        ]);
        apply_layer(&base[..], dir.path()).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("ok")).unwrap(), "inside");
        for target in ["via/f", "esc/secret"] {
            let l = layer(&[E::Hard("h", target)]);
            let err = format!("{:#}", apply_layer(&l[..], dir.path()).unwrap_err());
            assert!(err.contains(target), "{target}: {err}");
            assert!(!dir.path().join("h").exists());
        }
        // A link to a symlink links the symlink itself, not the host file.
        let l = layer(&[E::Hard("h2", "esc")]);
        apply_layer(&l[..], dir.path()).unwrap();
        assert!(fs::symlink_metadata(dir.path().join("h2"))
            .unwrap()
            .file_type()
            .is_symlink());
        // A hard link later replaced by a file leaves its target alone.
        let l = layer(&[E::File("ok", b"new", 0o4755)]);
        apply_layer(&l[..], dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("real/f")).unwrap(),
            "inside"
        );
        assert_eq!(mode_of(&dir.path().join("real/f")), 0o644);
    }

    #[test]
    fn odd_whiteouts_are_refused_naming_the_entry() {
        for (path, kind) in [
            (".wh..", 'f'),
            (".wh...", 'f'),
            (".wh.", 'f'),
            ("sub/.wh..", 'f'),
            ("sub/.wh...", 'f'),
            (".wh.x/child", 'f'),
            (".wh..wh..opq/child", 'f'),
            (".wh..wh..wh..opq", 'f'),
            (".wh..wh..opq/", 'd'),
            (".wh.sub/", 'd'),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let base = layer(&[E::Dir("sub/", 0o755), E::File("sub/keep", b"k", 0o644)]);
            apply_layer(&base[..], dir.path()).unwrap();
            let l = if kind == 'd' {
                layer(&[E::Dir(path, 0o755)])
            } else {
                layer(&[E::File(path, b"", 0o644)])
            };
            let err = format!("{:#}", apply_layer(&l[..], dir.path()).unwrap_err());
            let shown = path.trim_end_matches('/');
            assert!(err.contains(shown), "{path}: {err}");
            assert!(dir.path().join("sub/keep").exists(), "{path}");
            assert!(dir.path().exists(), "{path}");
        }
    }

    #[test]
    fn owners_out_of_range_are_refused() {
        for uid in [u64::from(u32::MAX), 1 << 32, (1 << 32) + 1000] {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o4755);
            h.set_size(1);
            h.set_uid(uid);
            b.append_data(&mut h, "suid", &b"x"[..]).unwrap();
            let data = b.into_inner().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let err = format!("{:#}", apply_layer(&data[..], dir.path()).unwrap_err());
            assert!(
                err.contains("out of range") && err.contains("suid"),
                "{err}"
            );
        }
    }

    #[test]
    fn entry_count_path_length_and_depth_limits() {
        let limits = ImportLimits {
            max_entries: 3,
            max_path_len: 64,
            max_path_depth: 4,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let many = layer(&[
            E::File("a", b"", 0o644),
            E::File("b", b"", 0o644),
            E::File("c", b"", 0o644),
            E::File("d", b"", 0o644),
        ]);
        let err = format!(
            "{:#}",
            apply_layer_limited(&many[..], dir.path(), &limits, &mut 0).unwrap_err()
        );
        assert!(err.contains("max_entries") && err.contains(" d "), "{err}");
        // Counted across layers.
        let mut used = 0;
        let two = layer(&[E::File("a", b"", 0o644), E::File("b", b"", 0o644)]);
        apply_layer_limited(&two[..], dir.path(), &limits, &mut used).unwrap();
        assert!(apply_layer_limited(&two[..], dir.path(), &limits, &mut used).is_err());

        let long = "x".repeat(100);
        let l = layer(&[E::File(&long, b"", 0o644)]);
        let err = format!(
            "{:#}",
            apply_layer_limited(&l[..], dir.path(), &limits, &mut 0).unwrap_err()
        );
        assert!(err.contains("max_path_len"), "{err}");
        let l = layer(&[E::Sym("s", &long)]);
        let err = format!(
            "{:#}",
            apply_layer_limited(&l[..], dir.path(), &limits, &mut 0).unwrap_err()
        );
        assert!(err.contains("max_path_len"), "{err}");
        let l = layer(&[E::File("a/b/c/d/e", b"", 0o644)]);
        let err = format!(
            "{:#}",
            apply_layer_limited(&l[..], dir.path(), &limits, &mut 0).unwrap_err()
        );
        assert!(err.contains("max_path_depth"), "{err}");
        // Deep through symlinks: each hop short, the resolved path too deep.
        let dir = tempfile::tempdir().unwrap();
        let l = layer(&[
            E::Sym("s", "a/b/c"),
            E::Sym("t", "s/d/e"),
            E::File("t/f", b"", 0o644),
        ]);
        let err = format!(
            "{:#}",
            apply_layer_limited(&l[..], dir.path(), &limits, &mut 0).unwrap_err()
        );
        assert!(err.contains("deep"), "{err}");
    }

    /// A raw header (ustar) of `kind` and `size`, its data, padded.
    fn raw_entry(
        out: &mut Vec<u8>,
        name: &str,
        kind: tar::EntryType,
        size_field: u64,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size_field);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    #[test]
    fn huge_pax_and_long_name_headers_are_refused_before_being_read() {
        // A pax header claiming 64 GiB: refused at its header, nothing buffered.
        let mut t = Vec::new();
        raw_entry(
            &mut t,
            "PaxHeaders/x",
            tar::EntryType::XHeader,
            64 << 30,
            b"",
        );
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", apply_layer(&t[..], dir.path()).unwrap_err());
        assert!(err.contains("max_tar_header_size"), "{err}");
        // A GNU long name of 2 MiB (the data is there, and small per limit).
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(2 << 20);
        h.set_path("././@LongLink").unwrap();
        h.set_cksum();
        b.append(&h, &vec![b'a'; 2 << 20][..]).unwrap();
        let t = b.into_inner().unwrap();
        let err = format!("{:#}", apply_layer(&t[..], dir.path()).unwrap_err());
        assert!(err.contains("max_tar_header_size"), "{err}");
    }

    #[test]
    fn tar_framing_follows_pax_sizes_and_long_names() {
        // pax size overriding the header's, then a long GNU name, then a
        // file whose data looks like a huge pax header: all applied right.
        let mut t = Vec::new();
        let pax = pax_record("size", b"600");
        raw_entry(
            &mut t,
            "PaxHeaders/a",
            tar::EntryType::XHeader,
            pax.len() as u64,
            &pax,
        );
        let mut fake = Vec::new();
        raw_entry(&mut fake, "fake", tar::EntryType::XHeader, 64 << 30, b"");
        fake.resize(600, b'z');
        raw_entry(&mut t, "a", tar::EntryType::Regular, 0, &fake);
        let mut b = tar::Builder::new(t);
        let long = format!("{}/file", "d".repeat(150));
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(3);
        b.append_data(&mut h, &long, &b"end"[..]).unwrap();
        let t = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        apply_layer(&t[..], dir.path()).unwrap();
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), fake);
        assert_eq!(fs::read(dir.path().join(&long)).unwrap(), b"end");
    }

    #[test]
    fn replacing_kinds_of_entries() {
        let dir = tempfile::tempdir().unwrap();
        // A directory replaced by a file, then a child of it: refused, named.
        let l = layer(&[
            E::Dir("d/", 0o755),
            E::File("d/x", b"1", 0o644),
            E::File("d", b"now a file", 0o644),
            E::File("d/child", b"", 0o644),
        ]);
        let err = format!("{:#}", apply_layer(&l[..], dir.path()).unwrap_err());
        assert!(
            err.contains("d/child") && err.contains("not a directory"),
            "{err}"
        );
        // A symlink replaced by a directory: the directory is real.
        let dir = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let l = layer(&[
            E::Sym("s", host.path().to_str().unwrap()),
            E::Dir("s/", 0o700),
            E::File("s/in", b"x", 0o644),
        ]);
        apply_layer(&l[..], dir.path()).unwrap();
        assert!(fs::symlink_metadata(dir.path().join("s")).unwrap().is_dir());
        assert_eq!(mode_of(&dir.path().join("s")), 0o700);
        assert!(!host.path().join("in").exists());
    }

    #[test]
    fn symlink_chains_and_sparse_header_chains_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let detour = "d/../".repeat(300);
        let t1 = format!("{detour}s2");
        let t2 = format!("{detour}s3");
        let t3 = format!("{detour}s4");
        let t4 = format!("{detour}d");
        let l = layer(&[
            E::Dir("d/", 0o755),
            E::Sym("s1", &t1),
            E::Sym("s2", &t2),
            E::Sym("s3", &t3),
            E::Sym("s4", &t4),
            E::File("s1/f", b"", 0o644),
        ]);
        let err = format!("{:#}", apply_layer(&l[..], dir.path()).unwrap_err());
        assert!(err.contains("steps") && err.contains("s1/f"), "{err}");

        // A GNU sparse header followed by an endless chain of extension blocks.
        let mut h = tar::Header::new_gnu();
        h.set_path("sparse").unwrap();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(0);
        h.set_mode(0o644);
        h.as_gnu_mut().unwrap().isextended[0] = 1;
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        for _ in 0..4096 {
            let mut ext = [0u8; 512];
            ext[504] = 1;
            t.extend_from_slice(&ext);
        }
        let limits = ImportLimits {
            max_tar_header_size: 64 << 10,
            ..Default::default()
        };
        let err = format!(
            "{:#}",
            apply_layer_limited(&t[..], dir.path(), &limits, &mut 0).unwrap_err()
        );
        assert!(
            err.contains("sparse") && err.contains("max_tar_header_size"),
            "{err}"
        );
    }

    #[test]
    fn implicit_parents_are_0755_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let l = layer(&[E::File("usr/lib/x", b"", 0o644)]);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let r = apply_layer(&l[..], dir.path());
        nix::sys::stat::umask(old);
        r.unwrap();
        assert_eq!(mode_of(&dir.path().join("usr")), 0o755);
        assert_eq!(mode_of(&dir.path().join("usr/lib")), 0o755);
        assert_eq!(mode_of(&dir.path().join("usr/lib/x")), 0o644);
    }
}
