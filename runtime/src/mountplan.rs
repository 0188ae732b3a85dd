//! The container's mounts as a value: every step the launcher's child takes
//! to build the container's file system view, computed from the OCI config
//! in the parent before the clone. Parsing mount options, shifting tmpfs and
//! devpts ids into the user namespace and checking destinations all happen
//! here, so a mistake is reported (with the mount's destination) before any
//! process exists, and the sequence is unit tested without root.
//!
//! The child walks the plan through [`MountOps`], a seam as thin as the
//! syscalls it stands for; [`SysOps`] makes the real calls (the privileged
//! tests prove them). Only what the running kernel decides stays for the
//! walk: where a destination resolves inside the new root, and whether a
//! masked or read-only path exists.

use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{MntFlags, MsFlags};
use oci_spec::runtime::Spec;

use crate::mountfd;
use crate::userns::IdRange;

/// A mount destination inside the container: absolute, normalised, never
/// the root itself and without `..`, so it can only name something below
/// the root (symlinks on the way are resolved at mount time, inside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dest(String);

impl Dest {
    pub(crate) fn parse(s: &str) -> Result<Self> {
        if !s.starts_with('/') {
            bail!("mount destination {s:?} is not an absolute path");
        }
        let mut out = String::with_capacity(s.len());
        for c in Path::new(s).components() {
            match c {
                Component::Normal(n) => {
                    let n = n.to_str().context("not UTF-8")?;
                    out.push('/');
                    out.push_str(n);
                }
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    bail!("mount destination {s:?} may not contain '..'")
                }
            }
        }
        if out.is_empty() {
            bail!("mount destination {s:?} is the container's root");
        }
        if out.contains('\0') {
            bail!("mount destination {s:?} contains a NUL byte");
        }
        Ok(Self(out))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One step of the container's mount setup, in the order the child takes
/// them. Paths in steps before [`Step::PivotRoot`] are host paths or
/// [`Dest`]s below the new root; after it, container paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// `/` and everything below it private (recursively), so no mount made
    /// here propagates back to the host.
    MakeRootPrivate,
    /// An image layer mounted over itself idmapped through the container's
    /// user namespace (read-only, not recursive): the shared checkout is
    /// owned by host ids, through this mount by the container's.
    IdmapLower { path: PathBuf },
    /// The read-only overlay root at [`MountPlan::root`]; `data` is its
    /// `lowerdir=` option.
    MountRoot { data: CString },
    /// A file system (proc, tmpfs, ...) made with mount(2).
    Mount {
        dest: Dest,
        source: Option<CString>,
        fstype: Option<CString>,
        flags: MsFlags,
        data: Option<CString>,
    },
    /// A bind mount, made with open_tree/mount_setattr/move_mount so that
    /// `attrs` (mountfd::MOUNT_ATTR_*) hold on every mount of the tree.
    /// `idmap`: try an idmapped mount first (a user namespace).
    Bind {
        dest: Dest,
        source: PathBuf,
        recursive: bool,
        attrs: u64,
        idmap: bool,
    },
    /// A character device (mode 0666) in the container's /dev tmpfs.
    Device { dest: Dest, major: u64, minor: u64 },
    Symlink { dest: Dest, target: &'static str },
    /// A directory for a later mount, in a file system made above.
    Mkdir { dest: Dest },
    /// pivot_root into [`MountPlan::root`] and detach the old root.
    PivotRoot,
    /// A container path hidden: a directory under an empty read-only tmpfs,
    /// anything else under /dev/null; absent, nothing to hide.
    Mask { path: PathBuf },
    /// A container path bound over itself read-only, nosuid, nodev and
    /// noexec all the way down, if it exists.
    ReadOnly { path: PathBuf },
}

/// The container's mounts, computed before the clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountPlan {
    /// Where the root is mounted and pivoted into.
    pub root: PathBuf,
    pub steps: Vec<Step>,
}

/// Device nodes of the container's /dev (name, major, minor): the set
/// runc and Docker give.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
    ("core", "/proc/kcore"),
];

/// Mount points the /dev tmpfs needs for the mounts that follow it.
const DEV_DIRS: &[&str] = &["pts", "shm", "mqueue"];

/// Mount options split into mount(2) flags, file system data, and whether
/// the mount is a bind.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MountOptions {
    pub flags: MsFlags,
    pub data: Vec<String>,
    pub bind: bool,
}

pub(crate) fn mount_options(opts: &[String]) -> Result<MountOptions> {
    let mut out = MountOptions {
        flags: MsFlags::empty(),
        data: Vec::new(),
        bind: false,
    };
    for o in opts {
        match o.as_str() {
            "ro" => out.flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => out.flags |= MsFlags::MS_NOSUID,
            "nodev" => out.flags |= MsFlags::MS_NODEV,
            "noexec" => out.flags |= MsFlags::MS_NOEXEC,
            "strictatime" => out.flags |= MsFlags::MS_STRICTATIME,
            "relatime" => out.flags |= MsFlags::MS_RELATIME,
            "bind" => out.bind = true,
            "rbind" => {
                out.bind = true;
                out.flags |= MsFlags::MS_REC;
            }
            // Joined with ',' into the data string: one option each.
            "" => bail!("empty mount option"),
            other if other.contains([',', '\0']) => {
                bail!("mount option {other:?} contains ',' or a NUL byte")
            }
            other => out.data.push(other.to_string()),
        }
    }
    Ok(out)
}

/// Mount data for a container in the user namespace `range`: file systems
/// the launcher makes (it mounts them before joining the namespace) belong
/// to the container's root, and devpts' tty group is the container's.
fn userns_mount_data(typ: Option<&str>, data: &mut Vec<String>, range: &IdRange) -> Result<()> {
    match typ {
        Some("tmpfs") => {
            data.retain(|o| !o.starts_with("uid=") && !o.starts_with("gid="));
            data.push(format!("uid={}", range.host_start));
            data.push(format!("gid={}", range.host_start));
        }
        Some("devpts") => {
            for o in data.iter_mut() {
                if let Some(g) = o.strip_prefix("gid=") {
                    let g: u32 = g.parse().with_context(|| format!("mount option {o:?}"))?;
                    *o = format!("gid={}", range.host_id(g).unwrap_or(range.host_start));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{what} {s:?} contains a NUL byte"))
}

/// The attributes a bind mount's flags ask for, applied to the whole tree.
fn bind_attrs(flags: MsFlags) -> u64 {
    let mut attrs = 0;
    for (flag, attr) in [
        (MsFlags::MS_RDONLY, mountfd::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, mountfd::MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, mountfd::MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, mountfd::MOUNT_ATTR_NOEXEC),
    ] {
        if flags.contains(flag) {
            attrs |= attr;
        }
    }
    attrs
}

/// One of the config's mounts as steps (a /dev tmpfs brings its devices,
/// links and mount points).
fn mount_steps(
    m: &oci_spec::runtime::Mount,
    userns: Option<&IdRange>,
    steps: &mut Vec<Step>,
) -> Result<()> {
    let dest = Dest::parse(&m.destination().to_string_lossy())?;
    let typ = m.typ().as_deref();
    let mut o = mount_options(m.options().as_deref().unwrap_or(&[]))?;
    if o.bind || typ == Some("bind") {
        if let Some(d) = o.data.first() {
            // A bind mount has no file system to take it: it would be lost.
            bail!("option {d:?} has no meaning for a bind mount");
        }
        let source = m.source().clone().context("bind mount without a source")?;
        steps.push(Step::Bind {
            dest,
            source,
            recursive: o.flags.contains(MsFlags::MS_REC),
            attrs: bind_attrs(o.flags),
            idmap: userns.is_some(),
        });
        return Ok(());
    }
    if let Some(range) = userns {
        userns_mount_data(typ, &mut o.data, range)?;
    }
    let data = o.data.join(",");
    let is_dev = dest.as_str() == "/dev";
    steps.push(Step::Mount {
        source: m
            .source()
            .as_ref()
            .map(|s| cstring("source", &s.to_string_lossy()))
            .transpose()?,
        fstype: typ.map(|t| cstring("type", t)).transpose()?,
        flags: o.flags,
        data: (!data.is_empty())
            .then(|| cstring("data", &data))
            .transpose()?,
        dest,
    });
    if is_dev {
        let under = |name: &str| Dest(format!("/dev/{name}"));
        for &(name, major, minor) in DEVICES {
            steps.push(Step::Device {
                dest: under(name),
                major,
                minor,
            });
        }
        for &(name, target) in DEV_LINKS {
            steps.push(Step::Symlink {
                dest: under(name),
                target,
            });
        }
        for name in DEV_DIRS {
            steps.push(Step::Mkdir { dest: under(name) });
        }
    }
    Ok(())
}

impl MountPlan {
    /// The mounts of `spec`, its root an overlay of `lowers` (read-only, top
    /// first; the scaffold, index 0, is the launcher's own, the rest are
    /// image trees); `userns`: the container's id range, if it has a user
    /// namespace.
    pub(crate) fn new(spec: &Spec, lowers: &[&Path], userns: Option<&IdRange>) -> Result<Self> {
        let root = spec.root().as_ref().context("config has no root")?;
        let mut steps = vec![Step::MakeRootPrivate];
        let mut lowerdir = String::from("lowerdir=");
        for (i, l) in lowers.iter().enumerate() {
            let s = l.to_string_lossy();
            if s.contains([':', ',']) {
                bail!("path {s} contains ':' or ',' and cannot be an overlay layer");
            }
            if i > 0 {
                lowerdir.push(':');
                if userns.is_some() {
                    steps.push(Step::IdmapLower {
                        path: l.to_path_buf(),
                    });
                }
            }
            lowerdir.push_str(&s);
        }
        steps.push(Step::MountRoot {
            data: cstring("overlay layer", &lowerdir)?,
        });
        for m in spec.mounts().iter().flatten() {
            mount_steps(m, userns, &mut steps)
                .with_context(|| format!("mount at {}", m.destination().display()))?;
        }
        steps.push(Step::PivotRoot);
        let linux = spec.linux().as_ref();
        for p in linux.and_then(|l| l.masked_paths().as_ref()).into_iter().flatten() {
            cstring("masked path", p)?;
            steps.push(Step::Mask { path: p.into() });
        }
        for p in linux.and_then(|l| l.readonly_paths().as_ref()).into_iter().flatten() {
            cstring("read-only path", p)?;
            steps.push(Step::ReadOnly { path: p.into() });
        }
        Ok(Self {
            root: root.path().clone(),
            steps,
        })
    }

    /// Take the steps in order through `ops`, stopping at the first that
    /// fails (the container must not start with a mount missing).
    pub(crate) fn apply<O: MountOps>(&self, ops: &mut O) -> Result<()> {
        for step in &self.steps {
            self.apply_step(step, ops)?;
        }
        Ok(())
    }

    fn apply_step<O: MountOps>(&self, step: &Step, ops: &mut O) -> Result<()> {
        let root = self.root.as_path();
        match step {
            Step::MakeRootPrivate => ops
                .mount(
                    None,
                    Path::new("/"),
                    None,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None,
                )
                .context("making / private"),
            Step::IdmapLower { path } => {
                let tree = ops
                    .clone_tree(path, false)
                    .with_context(|| format!("cloning image tree {}", path.display()))?;
                ops.set_attrs(&tree, mountfd::MOUNT_ATTR_IDMAP | mountfd::MOUNT_ATTR_RDONLY)
                    .with_context(|| {
                        format!(
                            "idmapping image tree {} (its file system must support idmapped mounts: ext4, xfs, btrfs; run with --userns=host otherwise)",
                            path.display()
                        )
                    })?;
                ops.attach(tree, path)
                    .with_context(|| format!("mounting idmapped {}", path.display()))
            }
            Step::MountRoot { data } => ops
                .mount(
                    Some(c"overlay"),
                    root,
                    Some(c"overlay"),
                    MsFlags::MS_RDONLY,
                    Some(data),
                )
                .with_context(|| format!("mounting the read-only root at {}", root.display())),
            Step::Mount {
                dest,
                source,
                fstype,
                flags,
                data,
            } => {
                let target = ops.resolve(root, dest, true)?;
                ops.mount(
                    source.as_deref(),
                    &target,
                    fstype.as_deref(),
                    *flags,
                    data.as_deref(),
                )
                .with_context(|| {
                    format!(
                        "mounting {} at {dest}",
                        fstype.as_deref().map_or("?".into(), CStr::to_string_lossy)
                    )
                })
            }
            Step::Bind {
                dest,
                source,
                recursive,
                attrs,
                idmap,
            } => {
                let target = ops.resolve(root, dest, true)?;
                let src = source.display();
                let tree = ops
                    .clone_tree(source, *recursive)
                    .with_context(|| format!("cloning volume {src}"))?;
                // A file system without idmapped mounts gets the plain bind:
                // its files show up as owned by nobody inside (documented in
                // docs/runtime.md).
                let idmapped =
                    *idmap && ops.set_attrs(&tree, attrs | mountfd::MOUNT_ATTR_IDMAP).is_ok();
                if !idmapped {
                    ops.set_attrs(&tree, *attrs)
                        .with_context(|| format!("setting the options of volume {src}"))?;
                }
                ops.attach(tree, &target)
                    .with_context(|| format!("bind mounting {src} at {dest}"))
            }
            Step::Device { dest, major, minor } => {
                let path = ops.resolve(root, dest, false)?;
                ops.mknod(&path, *major, *minor)
                    .with_context(|| format!("mknod {dest}"))
            }
            Step::Symlink { dest, target } => {
                let path = ops.resolve(root, dest, false)?;
                ops.symlink(Path::new(target), &path)
                    .with_context(|| format!("symlink {dest}"))
            }
            Step::Mkdir { dest } => {
                let path = ops.resolve(root, dest, false)?;
                ops.mkdir(&path)
                    .with_context(|| format!("creating mount point {dest}"))
            }
            Step::PivotRoot => ops.pivot_root(root),
            Step::Mask { path } => {
                let p = path.display();
                match ops.kind(path) {
                    Some(Kind::Dir) => ops.mount(
                        Some(c"tmpfs"),
                        path,
                        Some(c"tmpfs"),
                        MsFlags::MS_RDONLY,
                        None,
                    ),
                    Some(Kind::Other) => {
                        ops.mount(Some(c"/dev/null"), path, None, MsFlags::MS_BIND, None)
                    }
                    None => Ok(()),
                }
                .with_context(|| format!("masking {p}"))
            }
            Step::ReadOnly { path } => {
                if ops.kind(path).is_none() {
                    return Ok(());
                }
                let p = path.display();
                let tree = ops
                    .clone_tree(path, true)
                    .with_context(|| format!("binding {p}"))?;
                ops.set_attrs(
                    &tree,
                    mountfd::MOUNT_ATTR_RDONLY
                        | mountfd::MOUNT_ATTR_NOSUID
                        | mountfd::MOUNT_ATTR_NODEV
                        | mountfd::MOUNT_ATTR_NOEXEC,
                )
                .with_context(|| format!("making {p} read-only"))?;
                ops.attach(tree, path)
                    .with_context(|| format!("making {p} read-only"))
            }
        }
    }
}

/// What a path is, for masking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    Other,
}

/// The calls a [`MountPlan`] is carried out with: the syscalls, one each
/// (or the fixed few of pivot_root and mknod), so the walk above holds all
/// the decisions.
pub(crate) trait MountOps {
    /// A detached mount tree (an open_tree fd).
    type Tree;
    fn mount(
        &mut self,
        source: Option<&CStr>,
        target: &Path,
        fstype: Option<&CStr>,
        flags: MsFlags,
        data: Option<&CStr>,
    ) -> nix::Result<()>;
    fn clone_tree(&mut self, path: &Path, recursive: bool) -> nix::Result<Self::Tree>;
    /// With [`mountfd::MOUNT_ATTR_IDMAP`] in `attrs`, through the
    /// container's user namespace.
    fn set_attrs(&mut self, tree: &Self::Tree, attrs: u64) -> nix::Result<()>;
    fn attach(&mut self, tree: Self::Tree, target: &Path) -> nix::Result<()>;
    /// The host path of `dest` below `root`, never outside it.
    /// `follow_last`: resolve a symlink in the last component too (a mount
    /// target; not for an entry about to be created).
    fn resolve(&mut self, root: &Path, dest: &Dest, follow_last: bool) -> Result<PathBuf>;
    fn mknod(&mut self, path: &Path, major: u64, minor: u64) -> Result<()>;
    fn symlink(&mut self, target: &Path, link: &Path) -> Result<()>;
    fn mkdir(&mut self, path: &Path) -> Result<()>;
    /// Make `new_root` the root and the working directory; detach the old.
    fn pivot_root(&mut self, new_root: &Path) -> Result<()>;
    /// What `path` is, following symlinks; None if it does not exist.
    fn kind(&mut self, path: &Path) -> Option<Kind>;
}

/// `dest` below `root`: symlinks on the way are followed inside `root`
/// (an absolute target restarts at `root`, `..` stops there), so the result
/// never leaves it; one that comes back to `root` itself is refused, a mount
/// there would cover the whole container.
pub(crate) fn resolve_dest(root: &Path, dest: &Dest, follow_last: bool) -> Result<PathBuf> {
    let target = crate::layer::resolve_in_root(root, dest.as_path(), follow_last)
        .with_context(|| format!("resolving {dest} in the container's root"))?;
    if target == root || !target.starts_with(root) {
        bail!("mount destination {dest} resolves to the container's root");
    }
    Ok(target)
}

/// The real calls.
pub(crate) struct SysOps<'a> {
    /// The container's user namespace, for idmapped mounts.
    pub userns: Option<&'a OwnedFd>,
}

impl MountOps for SysOps<'_> {
    type Tree = OwnedFd;

    fn mount(
        &mut self,
        source: Option<&CStr>,
        target: &Path,
        fstype: Option<&CStr>,
        flags: MsFlags,
        data: Option<&CStr>,
    ) -> nix::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn clone_tree(&mut self, path: &Path, recursive: bool) -> nix::Result<OwnedFd> {
        mountfd::clone_tree(path, recursive)
    }

    fn set_attrs(&mut self, tree: &OwnedFd, attrs: u64) -> nix::Result<()> {
        let userns = if attrs & mountfd::MOUNT_ATTR_IDMAP != 0 {
            Some(self.userns.ok_or(nix::errno::Errno::EINVAL)?)
        } else {
            None
        };
        mountfd::set_attrs(tree, attrs, userns)
    }

    fn attach(&mut self, tree: OwnedFd, target: &Path) -> nix::Result<()> {
        mountfd::attach(&tree, target)
    }

    fn resolve(&mut self, root: &Path, dest: &Dest, follow_last: bool) -> Result<PathBuf> {
        resolve_dest(root, dest, follow_last)
    }

    fn mknod(&mut self, path: &Path, major: u64, minor: u64) -> Result<()> {
        use nix::sys::stat::{fchmodat, makedev, mknod, FchmodatFlags, Mode, SFlag};
        let mode = Mode::from_bits_truncate(0o666);
        mknod(path, SFlag::S_IFCHR, mode, makedev(major, minor))?;
        // mknod honours the umask: set the mode explicitly.
        fchmodat(None, path, mode, FchmodatFlags::FollowSymlink)?;
        Ok(())
    }

    fn symlink(&mut self, target: &Path, link: &Path) -> Result<()> {
        Ok(std::os::unix::fs::symlink(target, link)?)
    }

    fn mkdir(&mut self, path: &Path) -> Result<()> {
        Ok(std::fs::create_dir_all(path)?)
    }

    fn pivot_root(&mut self, new_root: &Path) -> Result<()> {
        nix::unistd::chdir(new_root).context("chdir to the new root")?;
        nix::unistd::pivot_root(".", ".").context("pivot_root")?;
        nix::mount::umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
        nix::unistd::chdir("/")?;
        Ok(())
    }

    fn kind(&mut self, path: &Path) -> Option<Kind> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Some(Kind::Dir),
            Ok(_) => Some(Kind::Other),
            Err(_) => None,
        }
    }
}
