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
    IdmapLower {
        path: PathBuf,
    },
    /// The read-only overlay root at [`MountPlan::root`]; `data` is its
    /// `lowerdir=` option.
    MountRoot {
        data: CString,
    },
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
    Device {
        dest: Dest,
        major: u64,
        minor: u64,
    },
    Symlink {
        dest: Dest,
        target: &'static str,
    },
    /// A directory for a later mount, in a file system made above.
    Mkdir {
        dest: Dest,
    },
    /// pivot_root into [`MountPlan::root`] and detach the old root.
    PivotRoot,
    /// A container path hidden: a directory under an empty read-only tmpfs,
    /// anything else under /dev/null; absent, nothing to hide.
    Mask {
        path: PathBuf,
    },
    /// A container path bound over itself read-only, nosuid, nodev and
    /// noexec all the way down, if it exists.
    ReadOnly {
        path: PathBuf,
    },
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
        for p in linux
            .and_then(|l| l.masked_paths().as_ref())
            .into_iter()
            .flatten()
        {
            cstring("masked path", p)?;
            steps.push(Step::Mask { path: p.into() });
        }
        for p in linux
            .and_then(|l| l.readonly_paths().as_ref())
            .into_iter()
            .flatten()
        {
            cstring("read-only path", p)?;
            steps.push(Step::ReadOnly { path: p.into() });
        }
        Ok(Self {
            root: root.path().clone(),
            steps,
        })
    }

    /// Take the steps in order through `ops`, stopping at the first that
    /// fails (the container must not start with a mount missing). Runs in
    /// the launcher's child after the clone (what it may do there is in
    /// `container::child_main`): it allocates only to resolve destinations,
    /// for the paths of open_tree and move_mount, and for errors.
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
                let idmapped = *idmap
                    && ops
                        .set_attrs(&tree, attrs | mountfd::MOUNT_ATTR_IDMAP)
                        .is_ok();
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
    let target = cairn_contracts::rootpath::resolve_in_root(root, dest.as_path(), follow_last)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mountfd::{
        MOUNT_ATTR_IDMAP as IDMAP, MOUNT_ATTR_NODEV as NODEV, MOUNT_ATTR_NOEXEC as NOEXEC,
        MOUNT_ATTR_NOSUID as NOSUID, MOUNT_ATTR_RDONLY as RDONLY,
    };
    use oci_spec::runtime::{LinuxBuilder, Mount, MountBuilder, RootBuilder, SpecBuilder};
    use std::collections::HashMap;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn d(s: &str) -> Dest {
        Dest::parse(s).unwrap()
    }

    fn fs_mount(dest: &str, source: &str, fstype: &str, flags: MsFlags, data: &str) -> Step {
        Step::Mount {
            dest: d(dest),
            source: Some(c(source)),
            fstype: Some(c(fstype)),
            flags,
            data: (!data.is_empty()).then(|| c(data)),
        }
    }

    fn bind(dest: &str, source: &str, recursive: bool, attrs: u64, idmap: bool) -> Step {
        Step::Bind {
            dest: d(dest),
            source: source.into(),
            recursive,
            attrs,
            idmap,
        }
    }

    fn mnt(dest: &str, typ: Option<&str>, source: Option<&str>, opts: &[&str]) -> Mount {
        let mut b = MountBuilder::default()
            .destination(dest)
            .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        if let Some(t) = typ {
            b = b.typ(t);
        }
        if let Some(s) = source {
            b = b.source(s);
        }
        b.build().unwrap()
    }

    fn spec_with(mounts: Vec<Mount>, masked: &[&str], readonly: &[&str]) -> Spec {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        SpecBuilder::default()
            .root(
                RootBuilder::default()
                    .path("/r")
                    .readonly(true)
                    .build()
                    .unwrap(),
            )
            .mounts(mounts)
            .linux(
                LinuxBuilder::default()
                    .masked_paths(strings(masked))
                    .readonly_paths(strings(readonly))
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    /// The config `spec::build` makes, with a read-only and a writable volume.
    pub(crate) fn built_spec(userns: Option<IdRange>) -> Spec {
        use std::os::unix::fs::PermissionsExt;
        let tree = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tree.path().join("bin")).unwrap();
        std::fs::write(tree.path().join("bin/true"), "").unwrap();
        std::fs::set_permissions(
            tree.path().join("bin/true"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let image = crate::image::ImageConfig {
            cmd: vec!["/bin/true".into()],
            ..Default::default()
        };
        let src = tree.path().display();
        let volumes = [
            crate::spec::Volume::parse(&format!("{src}:/data:ro")).unwrap(),
            crate::spec::Volume::parse(&format!("{src}/bin:/srv/bin")).unwrap(),
        ];
        crate::spec::build(&crate::spec::SpecInput {
            hostname: "h",
            image: &image,
            image_root: tree.path(),
            rootfs: Path::new("/r"),
            command: &[],
            env: &[],
            volumes: &volumes,
            limits: &Default::default(),
            cgroups_path: None,
            userns,
            terminal: false,
        })
        .unwrap()
    }

    /// /dev's nodes, links and mount points, as steps.
    fn dev_steps() -> Vec<Step> {
        let mut v = Vec::new();
        for (name, major, minor) in [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        ] {
            v.push(Step::Device {
                dest: d(&format!("/dev/{name}")),
                major,
                minor,
            });
        }
        for (name, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
            ("core", "/proc/kcore"),
        ] {
            v.push(Step::Symlink {
                dest: d(&format!("/dev/{name}")),
                target,
            });
        }
        for name in ["pts", "shm", "mqueue"] {
            v.push(Step::Mkdir {
                dest: d(&format!("/dev/{name}")),
            });
        }
        v
    }

    #[test]
    fn built_config_gives_the_exact_steps() {
        let spec = built_spec(None);
        let vol = spec
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new("/data"))
            .and_then(|m| m.source().clone())
            .unwrap();
        let vol = vol.to_str().unwrap();
        let plan = MountPlan::new(&spec, &[Path::new("/s"), Path::new("/i")], None).unwrap();
        assert_eq!(plan.root, Path::new("/r"));
        let f = |v: &[MsFlags]| v.iter().fold(MsFlags::empty(), |a, b| a | *b);
        use MsFlags as M;
        let mut want = vec![
            Step::MakeRootPrivate,
            Step::MountRoot {
                data: c("lowerdir=/s:/i"),
            },
            fs_mount(
                "/proc",
                "proc",
                "proc",
                f(&[M::MS_NOSUID, M::MS_NOEXEC, M::MS_NODEV]),
                "",
            ),
            fs_mount(
                "/dev",
                "tmpfs",
                "tmpfs",
                f(&[M::MS_NOSUID, M::MS_STRICTATIME]),
                "mode=755,size=65536k",
            ),
        ];
        want.extend(dev_steps());
        want.extend([
            fs_mount(
                "/dev/pts",
                "devpts",
                "devpts",
                f(&[M::MS_NOSUID, M::MS_NOEXEC]),
                "newinstance,ptmxmode=0666,mode=0620,gid=5",
            ),
            fs_mount(
                "/dev/shm",
                "shm",
                "tmpfs",
                f(&[M::MS_NOSUID, M::MS_NOEXEC, M::MS_NODEV]),
                "mode=1777,size=65536k",
            ),
            fs_mount(
                "/dev/mqueue",
                "mqueue",
                "mqueue",
                f(&[M::MS_NOSUID, M::MS_NOEXEC, M::MS_NODEV]),
                "",
            ),
            fs_mount(
                "/sys",
                "sysfs",
                "sysfs",
                f(&[M::MS_NOSUID, M::MS_NOEXEC, M::MS_NODEV, M::MS_RDONLY]),
                "",
            ),
            fs_mount(
                "/tmp",
                "tmpfs",
                "tmpfs",
                f(&[M::MS_NOSUID, M::MS_NODEV]),
                "mode=1777",
            ),
            fs_mount(
                "/run",
                "tmpfs",
                "tmpfs",
                f(&[M::MS_NOSUID, M::MS_NODEV]),
                "mode=755",
            ),
            bind("/data", vol, true, NOSUID | NODEV | RDONLY, false),
            bind(
                "/srv/bin",
                &format!("{vol}/bin"),
                true,
                NOSUID | NODEV,
                false,
            ),
            Step::PivotRoot,
        ]);
        for p in crate::spec::MASKED_PATHS {
            want.push(Step::Mask { path: p.into() });
        }
        for p in crate::spec::READONLY_PATHS {
            want.push(Step::ReadOnly { path: p.into() });
        }
        assert_eq!(plan.steps, want);
    }

    #[test]
    fn user_namespace_shifts_ids_and_idmaps_layers_and_volumes() {
        let range = IdRange {
            host_start: 100_000,
            size: 65536,
        };
        let spec = built_spec(Some(range));
        let lowers = [Path::new("/s"), Path::new("/i1"), Path::new("/i2")];
        let plan = MountPlan::new(&spec, &lowers, Some(&range)).unwrap();
        // The image layers, not the launcher's scaffold, are idmapped.
        assert_eq!(
            plan.steps[..4],
            [
                Step::MakeRootPrivate,
                Step::IdmapLower { path: "/i1".into() },
                Step::IdmapLower { path: "/i2".into() },
                Step::MountRoot {
                    data: c("lowerdir=/s:/i1:/i2")
                },
            ]
        );
        let data_of = |dest: &str| {
            plan.steps.iter().find_map(|s| match s {
                Step::Mount { dest: d, data, .. } if d.as_str() == dest => {
                    Some(data.as_ref().map(|c| c.to_str().unwrap().to_string()))
                }
                _ => None,
            })
        };
        assert_eq!(
            data_of("/dev").unwrap().unwrap(),
            "mode=755,size=65536k,uid=100000,gid=100000"
        );
        assert_eq!(
            data_of("/dev/pts").unwrap().unwrap(),
            "newinstance,ptmxmode=0666,mode=0620,gid=100005"
        );
        assert_eq!(data_of("/proc").unwrap(), None, "proc takes no ids");
        assert!(plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Bind { .. }))
            .all(|s| matches!(s, Step::Bind { idmap: true, .. })));
        // A tmpfs's own uid= and gid= give way to the container's root.
        let spec = spec_with(
            vec![mnt(
                "/tmp",
                Some("tmpfs"),
                Some("tmpfs"),
                &["uid=5", "mode=1777", "gid=7"],
            )],
            &[],
            &[],
        );
        let plan = MountPlan::new(&spec, &[Path::new("/s")], Some(&range)).unwrap();
        assert_eq!(
            plan.steps[2],
            fs_mount(
                "/tmp",
                "tmpfs",
                "tmpfs",
                MsFlags::empty(),
                "mode=1777,uid=100000,gid=100000"
            )
        );
    }

    #[test]
    fn bind_options_become_attributes_of_the_whole_tree() {
        let spec = spec_with(
            vec![
                mnt(
                    "/all",
                    Some("bind"),
                    Some("/v"),
                    &["rbind", "ro", "nosuid", "nodev", "noexec"],
                ),
                mnt("/top", None, Some("/v"), &["bind", "rw"]),
                mnt("/typed", Some("bind"), Some("/v"), &[]),
                mnt("/x", Some("bind"), Some("/v"), &["noexec", "rbind"]),
            ],
            &[],
            &[],
        );
        let plan = MountPlan::new(&spec, &[Path::new("/s")], None).unwrap();
        assert_eq!(
            plan.steps[2..6],
            [
                bind("/all", "/v", true, RDONLY | NOSUID | NODEV | NOEXEC, false),
                bind("/top", "/v", false, 0, false),
                bind("/typed", "/v", false, 0, false),
                bind("/x", "/v", true, NOEXEC, false),
            ]
        );
        let o = mount_options(&["nosuid".into(), "mode=755".into(), "ro".into()]).unwrap();
        assert_eq!(
            o,
            MountOptions {
                flags: MsFlags::MS_NOSUID | MsFlags::MS_RDONLY,
                data: vec!["mode=755".into()],
                bind: false,
            }
        );
    }

    #[test]
    fn destinations_never_leave_the_root() {
        assert_eq!(d("/a//./b/").as_str(), "/a/b");
        for bad in ["/a/../b", "/..", "a/b", "", "/", "//./"] {
            assert!(Dest::parse(bad).is_err(), "{bad:?}");
        }
        let spec = spec_with(
            vec![mnt("/srv/../etc", Some("tmpfs"), Some("tmpfs"), &[])],
            &[],
            &[],
        );
        let e = format!(
            "{:#}",
            MountPlan::new(&spec, &[Path::new("/s")], None).unwrap_err()
        );
        assert!(e.contains("/srv/../etc") && e.contains("'..'"), "{e}");
        // Symlinks met at mount time are followed inside the root, never
        // out of it; one that leads back to the root itself is refused.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/", root.join("evil")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("up")).unwrap();
        let r = |p: &str| resolve_dest(&root, &d(p), true);
        assert_eq!(r("/evil/etc").unwrap(), root.join("etc"));
        assert_eq!(r("/abs").unwrap(), root.join("etc"));
        assert_eq!(r("/up/etc/x").unwrap(), root.join("etc/x"));
        for escape in ["/evil", "/up", "/evil/up/."] {
            let e = format!("{:#}", r(escape).unwrap_err());
            assert!(
                e.contains("resolves to the container's root"),
                "{escape}: {e}"
            );
        }
        // Not followed where the entry is about to be made.
        assert_eq!(
            resolve_dest(&root, &d("/evil"), false).unwrap(),
            root.join("evil")
        );
    }

    #[test]
    fn bad_options_are_refused_naming_the_destination() {
        let range = IdRange {
            host_start: 100_000,
            size: 65536,
        };
        let cases: &[(Mount, &str)] = &[
            (
                mnt("/vol", Some("bind"), Some("/v"), &["rbind", "nosiud"]),
                "\"nosiud\" has no meaning for a bind mount",
            ),
            (
                mnt("/t", Some("tmpfs"), Some("tmpfs"), &["mode=755,size=1k"]),
                "contains ','",
            ),
            (
                mnt("/t", Some("tmpfs"), Some("tmpfs"), &["nosuid", ""]),
                "empty mount option",
            ),
            (
                mnt("/t", Some("tmpfs"), Some("tmpfs"), &["mode=7\u{0}55"]),
                "NUL",
            ),
            (
                mnt("/dev/pts", Some("devpts"), Some("devpts"), &["gid=tty"]),
                "\"gid=tty\"",
            ),
            (
                mnt("/vol", Some("bind"), None, &["rbind"]),
                "without a source",
            ),
            (mnt("/t", Some("tmp\u{0}fs"), Some("tmpfs"), &[]), "NUL"),
        ];
        for (m, why) in cases {
            let spec = spec_with(vec![m.clone()], &[], &[]);
            let e = format!(
                "{:#}",
                MountPlan::new(&spec, &[Path::new("/s")], Some(&range)).unwrap_err()
            );
            let dest = m.destination().display().to_string();
            assert!(
                e.starts_with(&format!("mount at {dest}:")) && e.contains(why),
                "{e}"
            );
        }
        let spec = spec_with(vec![], &[], &[]);
        let e = MountPlan::new(&spec, &[Path::new("/s"), Path::new("/a:b")], None).unwrap_err();
        assert!(e.to_string().contains("/a:b"), "{e}");
        let spec = spec_with(vec![], &["/proc/\u{0}x"], &[]);
        assert!(MountPlan::new(&spec, &[Path::new("/s")], None).is_err());
    }

    /// What the walk asked of the seam.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Mount {
            source: Option<String>,
            target: PathBuf,
            fstype: Option<String>,
            flags: MsFlags,
            data: Option<String>,
        },
        CloneTree {
            path: PathBuf,
            recursive: bool,
        },
        SetAttrs {
            tree: usize,
            attrs: u64,
        },
        Attach {
            tree: usize,
            target: PathBuf,
        },
        Resolve {
            dest: String,
            follow_last: bool,
        },
        Mknod {
            path: PathBuf,
            major: u64,
            minor: u64,
        },
        Symlink {
            target: PathBuf,
            link: PathBuf,
        },
        Mkdir {
            path: PathBuf,
        },
        PivotRoot {
            root: PathBuf,
        },
        Kind {
            path: PathBuf,
        },
    }

    /// A recording seam: trees are numbered by the call that made them.
    #[derive(Default)]
    struct Fake {
        calls: Vec<Call>,
        /// This call (by index) fails.
        fail_at: Option<usize>,
        /// set_attrs with MOUNT_ATTR_IDMAP fails (no idmapped mounts).
        no_idmap: bool,
        kinds: HashMap<PathBuf, Kind>,
    }

    impl Fake {
        fn record(&mut self, call: Call) -> nix::Result<()> {
            self.calls.push(call);
            if self.fail_at == Some(self.calls.len() - 1) {
                return Err(nix::errno::Errno::EIO);
            }
            Ok(())
        }
    }

    fn s(c: Option<&CStr>) -> Option<String> {
        c.map(|c| c.to_str().unwrap().to_string())
    }

    impl MountOps for Fake {
        type Tree = usize;
        fn mount(
            &mut self,
            source: Option<&CStr>,
            target: &Path,
            fstype: Option<&CStr>,
            flags: MsFlags,
            data: Option<&CStr>,
        ) -> nix::Result<()> {
            self.record(Call::Mount {
                source: s(source),
                target: target.into(),
                fstype: s(fstype),
                flags,
                data: s(data),
            })
        }
        fn clone_tree(&mut self, path: &Path, recursive: bool) -> nix::Result<usize> {
            self.record(Call::CloneTree {
                path: path.into(),
                recursive,
            })?;
            Ok(self.calls.len() - 1)
        }
        fn set_attrs(&mut self, tree: &usize, attrs: u64) -> nix::Result<()> {
            self.record(Call::SetAttrs { tree: *tree, attrs })?;
            if self.no_idmap && attrs & IDMAP != 0 {
                return Err(nix::errno::Errno::EINVAL);
            }
            Ok(())
        }
        fn attach(&mut self, tree: usize, target: &Path) -> nix::Result<()> {
            self.record(Call::Attach {
                tree,
                target: target.into(),
            })
        }
        fn resolve(&mut self, root: &Path, dest: &Dest, follow_last: bool) -> Result<PathBuf> {
            self.record(Call::Resolve {
                dest: dest.to_string(),
                follow_last,
            })?;
            Ok(root.join(&dest.as_str()[1..]))
        }
        fn mknod(&mut self, path: &Path, major: u64, minor: u64) -> Result<()> {
            Ok(self.record(Call::Mknod {
                path: path.into(),
                major,
                minor,
            })?)
        }
        fn symlink(&mut self, target: &Path, link: &Path) -> Result<()> {
            Ok(self.record(Call::Symlink {
                target: target.into(),
                link: link.into(),
            })?)
        }
        fn mkdir(&mut self, path: &Path) -> Result<()> {
            Ok(self.record(Call::Mkdir { path: path.into() })?)
        }
        fn pivot_root(&mut self, new_root: &Path) -> Result<()> {
            Ok(self.record(Call::PivotRoot {
                root: new_root.into(),
            })?)
        }
        fn kind(&mut self, path: &Path) -> Option<Kind> {
            // Infallible: a failure here reads as "absent".
            let _ = self.record(Call::Kind { path: path.into() });
            self.kinds.get(path).copied()
        }
    }

    fn walk_spec() -> Spec {
        spec_with(
            vec![
                mnt(
                    "/tmp",
                    Some("tmpfs"),
                    Some("tmpfs"),
                    &["nosuid", "mode=1777"],
                ),
                mnt("/vol", Some("bind"), Some("/v"), &["rbind", "ro"]),
            ],
            &["/proc/kcore", "/sys/firmware", "/proc/absent"],
            &["/proc/sys", "/proc/gone"],
        )
    }

    fn fake() -> Fake {
        Fake {
            kinds: [
                ("/proc/kcore", Kind::Other),
                ("/sys/firmware", Kind::Dir),
                ("/proc/sys", Kind::Dir),
            ]
            .into_iter()
            .map(|(p, k)| (PathBuf::from(p), k))
            .collect(),
            ..Default::default()
        }
    }

    fn mount_call(
        source: Option<&str>,
        target: &str,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Call {
        Call::Mount {
            source: source.map(str::to_string),
            target: target.into(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        }
    }

    #[test]
    fn walk_makes_the_calls_of_the_plan() {
        let range = IdRange {
            host_start: 100_000,
            size: 65536,
        };
        let plan = MountPlan::new(
            &walk_spec(),
            &[Path::new("/s"), Path::new("/i")],
            Some(&range),
        )
        .unwrap();
        let mut ops = fake();
        plan.apply(&mut ops).unwrap();
        let resolve = |dest: &str| Call::Resolve {
            dest: dest.into(),
            follow_last: true,
        };
        let want = vec![
            mount_call(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None),
            Call::CloneTree {
                path: "/i".into(),
                recursive: false,
            },
            Call::SetAttrs {
                tree: 1,
                attrs: IDMAP | RDONLY,
            },
            Call::Attach {
                tree: 1,
                target: "/i".into(),
            },
            mount_call(
                Some("overlay"),
                "/r",
                Some("overlay"),
                MsFlags::MS_RDONLY,
                Some("lowerdir=/s:/i"),
            ),
            resolve("/tmp"),
            mount_call(
                Some("tmpfs"),
                "/r/tmp",
                Some("tmpfs"),
                MsFlags::MS_NOSUID,
                Some("mode=1777,uid=100000,gid=100000"),
            ),
            resolve("/vol"),
            Call::CloneTree {
                path: "/v".into(),
                recursive: true,
            },
            Call::SetAttrs {
                tree: 8,
                attrs: RDONLY | IDMAP,
            },
            Call::Attach {
                tree: 8,
                target: "/r/vol".into(),
            },
            Call::PivotRoot { root: "/r".into() },
            Call::Kind {
                path: "/proc/kcore".into(),
            },
            mount_call(
                Some("/dev/null"),
                "/proc/kcore",
                None,
                MsFlags::MS_BIND,
                None,
            ),
            Call::Kind {
                path: "/sys/firmware".into(),
            },
            mount_call(
                Some("tmpfs"),
                "/sys/firmware",
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            ),
            Call::Kind {
                path: "/proc/absent".into(),
            },
            Call::Kind {
                path: "/proc/sys".into(),
            },
            Call::CloneTree {
                path: "/proc/sys".into(),
                recursive: true,
            },
            Call::SetAttrs {
                tree: 18,
                attrs: RDONLY | NOSUID | NODEV | NOEXEC,
            },
            Call::Attach {
                tree: 18,
                target: "/proc/sys".into(),
            },
            Call::Kind {
                path: "/proc/gone".into(),
            },
        ];
        assert_eq!(ops.calls, want);

        // Without idmapped mounts on the volume's file system, the plain
        // attributes still hold.
        let mut ops = Fake {
            no_idmap: true,
            ..fake()
        };
        let plan = MountPlan::new(&walk_spec(), &[Path::new("/s")], Some(&range)).unwrap();
        plan.apply(&mut ops).unwrap();
        let vol: Vec<_> = ops
            .calls
            .iter()
            .filter(|c| matches!(c, Call::SetAttrs { .. }))
            .take(2)
            .collect();
        assert_eq!(
            vol,
            [
                &Call::SetAttrs {
                    tree: 5,
                    attrs: RDONLY | IDMAP
                },
                &Call::SetAttrs {
                    tree: 5,
                    attrs: RDONLY
                },
            ]
        );
    }

    #[test]
    fn dev_tmpfs_is_populated_below_the_root() {
        let spec = spec_with(
            vec![mnt("/dev", Some("tmpfs"), Some("tmpfs"), &["mode=755"])],
            &[],
            &[],
        );
        let plan = MountPlan::new(&spec, &[Path::new("/s")], None).unwrap();
        let mut ops = fake();
        plan.apply(&mut ops).unwrap();
        let calls = &ops.calls;
        assert_eq!(
            calls[3],
            mount_call(
                Some("tmpfs"),
                "/r/dev",
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=755")
            )
        );
        assert_eq!(
            calls[4..6],
            [
                Call::Resolve {
                    dest: "/dev/null".into(),
                    follow_last: false
                },
                Call::Mknod {
                    path: "/r/dev/null".into(),
                    major: 1,
                    minor: 3
                },
            ]
        );
        assert!(calls.contains(&Call::Symlink {
            target: "pts/ptmx".into(),
            link: "/r/dev/ptmx".into()
        }));
        assert!(calls.contains(&Call::Mkdir {
            path: "/r/dev/pts".into()
        }));
    }

    #[test]
    fn walk_stops_at_the_first_failure() {
        let plan = MountPlan::new(&walk_spec(), &[Path::new("/s")], None).unwrap();
        let mut all = fake();
        plan.apply(&mut all).unwrap();
        for n in 0..all.calls.len() {
            if matches!(all.calls[n], Call::Kind { .. }) {
                continue; // cannot fail: "absent"
            }
            let mut ops = Fake {
                fail_at: Some(n),
                ..fake()
            };
            let e = plan.apply(&mut ops).unwrap_err();
            assert_eq!(ops.calls, all.calls[..=n], "failing call {n}: {e:#}");
        }
        let mut ops = Fake {
            fail_at: all.calls.iter().position(
                |c| matches!(c, Call::Mount { target, .. } if target == Path::new("/r/tmp")),
            ),
            ..fake()
        };
        let e = format!("{:#}", plan.apply(&mut ops).unwrap_err());
        assert_eq!(e, "mounting tmpfs at /tmp: EIO: I/O error");
    }
}
