//! Starting a container process from its OCI runtime config: namespaces,
//! a read-only root, pivot_root, masked paths, capabilities, no_new_privs and
//! seccomp — and entering a running container for `exec` and health checks.
//!
//! Everything that can fail for a reason the user controls is prepared in the
//! parent (the mounts as a `MountPlan`); the child walks what was prepared
//! and reports the first failure through a close-on-exec pipe (an empty pipe
//! means the exec happened). What the child may do is in `child_main`.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::CloneFlags;
use nix::unistd::{Gid, Pid, Uid};
use oci_spec::runtime::{LinuxSeccompAction, Spec};

use crate::mountplan::{MountPlan, SysOps};
use crate::seccomp_bpf;
use crate::userns::IdRange;

/// What the child needs, computed before the clone.
struct ChildPlan {
    /// The container's user namespace and the namespaces it owns, made
    /// before the clone (see [`PendingUserns`]).
    userns: Option<(IdRange, UsernsFds)>,
    mounts: MountPlan,
    hostname: String,
    security: Security,
    cwd: PathBuf,
    exe: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Its stdin is a console (`-t`): make it the controlling terminal.
    terminal: bool,
}

/// Credentials and restrictions applied right before exec.
#[derive(Clone)]
pub struct Security {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    bounding: HashSet<caps::Capability>,
    effective: HashSet<caps::Capability>,
    no_new_privs: bool,
    seccomp: Option<seccompiler::BpfProgram>,
    /// The process's umask: the spec's, else 0022 (as runc and crun), never
    /// the one of whoever ran `host`.
    umask: nix::sys::stat::Mode,
}

/// A process's umask when its spec names none.
const DEFAULT_UMASK: u32 = 0o022;

fn oci_caps(set: &Option<oci_spec::runtime::Capabilities>) -> Result<HashSet<caps::Capability>> {
    let mut out = HashSet::new();
    for c in set.iter().flatten() {
        let name = serde_json::to_value(c)?;
        let name = name.as_str().unwrap_or_default();
        out.insert(
            caps::Capability::from_str(name).map_err(|e| anyhow!("capability {name}: {e}"))?,
        );
    }
    Ok(out)
}

include!(concat!(env!("OUT_DIR"), "/default_seccomp.rs"));

/// Compile the config's seccomp section (default allow, named syscalls
/// refused with an errno) into a BPF program. The default profile comes
/// precompiled (see build.rs).
pub fn compile_seccomp(spec: &Spec) -> Result<Option<seccompiler::BpfProgram>> {
    let Some(sc) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) else {
        return Ok(None);
    };
    if sc.default_action() != LinuxSeccompAction::ScmpActAllow {
        bail!("seccomp: only profiles with defaultAction SCMP_ACT_ALLOW are supported");
    }
    let mut names = Vec::new();
    let mut errno = None;
    for s in sc.syscalls().iter().flatten() {
        if s.action() != LinuxSeccompAction::ScmpActErrno || s.args().is_some() {
            bail!("seccomp: only SCMP_ACT_ERRNO rules without argument filters are supported");
        }
        let e = s.errno_ret().unwrap_or(libc::EPERM as u32);
        if errno.is_some_and(|x| x != e) {
            bail!("seccomp: all rules must return the same errno");
        }
        errno = Some(e);
        names.extend(s.names().iter().cloned());
    }
    let errno = errno.unwrap_or(libc::EPERM as u32);
    if errno == libc::EPERM as u32
        && !DEFAULT_SECCOMP_BPF.is_empty()
        && names
            .iter()
            .map(String::as_str)
            .eq(crate::spec::DENIED_SYSCALLS.iter().copied())
    {
        return Ok(Some(
            DEFAULT_SECCOMP_BPF
                .iter()
                .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
                .collect(),
        ));
    }
    compile_errno_filter(&names, errno).map(Some)
}

/// A filter refusing `names` with `errno`, compiled now.
fn compile_errno_filter(names: &[String], errno: u32) -> Result<seccompiler::BpfProgram> {
    let program = seccompiler_errno_filter(names, errno)?;
    let insns: Vec<seccomp_bpf::Insn> = program.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect();
    Ok(
        match seccomp_bpf::compact_for(&insns, std::env::consts::ARCH) {
            Some(short) => short
                .into_iter()
                .map(|(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
                .collect(),
            None => program,
        },
    )
}

/// seccompiler's own program refusing `names` with `errno`.
fn seccompiler_errno_filter<S: AsRef<str>>(
    names: &[S],
    errno: u32,
) -> Result<seccompiler::BpfProgram> {
    let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| anyhow!("seccomp: {e}: no filters on this architecture"))?;
    let rules: Vec<_> = names
        .iter()
        .map(|n| serde_json::json!({ "syscall": n.as_ref() }))
        .collect();
    let json = serde_json::json!({ "main": {
        "mismatch_action": "allow",
        "match_action": { "errno": errno },
        "filter": rules,
    }});
    let mut map = seccompiler::compile_from_json(json.to_string().as_bytes(), arch)
        .map_err(|e| anyhow!("compiling the seccomp filter: {e}"))?;
    map.remove("main")
        .ok_or_else(|| anyhow!("compiling the seccomp filter: no program came out"))
}

impl Security {
    pub fn from_spec(spec: &Spec) -> Result<Self> {
        let p = spec.process().as_ref().context("config has no process")?;
        let c = p.capabilities().as_ref();
        Ok(Self {
            uid: p.user().uid(),
            gid: p.user().gid(),
            groups: p.user().additional_gids().clone().unwrap_or_default(),
            bounding: oci_caps(c.map_or(&None, |c| c.bounding()))?,
            effective: oci_caps(c.map_or(&None, |c| c.effective()))?,
            no_new_privs: p.no_new_privileges().unwrap_or(false),
            seccomp: compile_seccomp(spec)?,
            umask: match p.user().umask().unwrap_or(DEFAULT_UMASK) {
                m if m <= 0o777 => nix::sys::stat::Mode::from_bits_truncate(m),
                m => bail!("process.user.umask {m:#o} is not a umask (at most 0777)"),
            },
        })
    }

    /// Drop to the configured credentials and restrictions. Runs in the child.
    fn apply(&self) -> Result<()> {
        for c in caps::all() {
            if !self.bounding.contains(&c) {
                // Capabilities the kernel does not know fail with EINVAL: fine.
                let _ = caps::drop(None, caps::CapSet::Bounding, c);
            }
        }
        let mut groups: Vec<Gid> = vec![Gid::from_raw(self.gid)];
        groups.extend(self.groups.iter().map(|g| Gid::from_raw(*g)));
        nix::unistd::setgroups(&groups).context("setgroups")?;
        let g = Gid::from_raw(self.gid);
        nix::unistd::setresgid(g, g, g).context("setresgid")?;
        let u = Uid::from_raw(self.uid);
        nix::unistd::setresuid(u, u, u).context("setresuid")?;
        let _ = caps::clear(None, caps::CapSet::Ambient);
        caps::set(None, caps::CapSet::Inheritable, &HashSet::new())
            .context("clearing inheritable capabilities")?;
        if self.uid == 0 {
            caps::set(None, caps::CapSet::Effective, &self.effective)
                .context("setting effective capabilities")?;
            caps::set(None, caps::CapSet::Permitted, &self.effective)
                .context("setting permitted capabilities")?;
        }
        nix::sys::stat::umask(self.umask);
        if self.no_new_privs {
            nix::sys::prctl::set_no_new_privs().context("no_new_privs")?;
        }
        if let Some(bpf) = &self.seccomp {
            seccompiler::apply_filter(bpf)
                .map_err(|e| anyhow!("installing seccomp filter: {e}"))?;
        }
        Ok(())
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow!("{s:?} contains a NUL byte"))
}

impl ChildPlan {
    /// `lowers`: the overlay's read-only layers, top first; the scaffold
    /// (index 0) is the launcher's own, the rest are image trees.
    fn new(spec: &Spec, lowers: &[&Path], userns: Option<(IdRange, UsernsFds)>) -> Result<Self> {
        let p = spec.process().as_ref().context("config has no process")?;
        let args = p.args().clone().unwrap_or_default();
        if args.is_empty() {
            bail!("config has no process args");
        }
        let mounts = MountPlan::new(spec, lowers, userns.as_ref().map(|(range, _)| range))?;
        Ok(Self {
            userns,
            mounts,
            hostname: spec.hostname().clone().unwrap_or_default(),
            security: Security::from_spec(spec)?,
            cwd: p.cwd().clone(),
            exe: cstring(&args[0])?,
            argv: args.iter().map(|a| cstring(a)).collect::<Result<_>>()?,
            envp: p
                .env()
                .iter()
                .flatten()
                .map(|e| cstring(e))
                .collect::<Result<_>>()?,
            terminal: p.terminal().unwrap_or(false),
        })
    }
}

/// Mount points the read-only root must provide: the scaffold layer of the
/// overlay holds them, so the shared image checkout is never touched.
pub fn make_scaffold(
    spec: &Spec,
    scaffold: &Path,
    image_root: &Path,
    files: &[(&str, String)],
) -> Result<()> {
    let _ = fs::remove_dir_all(scaffold);
    fs::create_dir_all(scaffold).with_context(|| format!("creating {}", scaffold.display()))?;
    for m in spec.mounts().iter().flatten() {
        let dst = m.destination();
        if dst.to_string_lossy().starts_with("/dev/") {
            continue; // made inside the /dev tmpfs
        }
        let rel = dst.strip_prefix("/").unwrap_or(dst);
        // Symlinks are not followed: a scaffold entry shadows one, so a
        // hostile `/tmp -> /` in an image cannot put a mount over its root.
        let in_image = plain_path_meta(image_root, rel).map(|m| m.file_type());
        let source_is_file =
            m.typ().as_deref() == Some("bind") && m.source().as_ref().is_some_and(|s| s.is_file());
        let target = scaffold.join(rel);
        if source_is_file {
            if !in_image.is_some_and(|t| t.is_file()) {
                fs::create_dir_all(target.parent().unwrap_or(scaffold))?;
                fs::write(&target, "")?;
            }
        } else if !in_image.is_some_and(|t| t.is_dir()) {
            fs::create_dir_all(&target)
                .with_context(|| format!("creating mount point {}", target.display()))?;
        }
    }
    let mut made: Option<PathBuf> = None;
    for (path, content) in files {
        let target = scaffold.join(path.trim_start_matches('/'));
        let dir = target.parent().unwrap_or(scaffold);
        // The files share /etc: its directory is made once.
        if made.as_deref() != Some(dir) {
            fs::create_dir_all(dir)?;
            made = Some(dir.to_path_buf());
        }
        fs::write(&target, content).with_context(|| format!("writing {}", target.display()))?;
    }
    if let Some(range) = crate::spec::userns_range(spec) {
        own_scaffold(scaffold, image_root, Path::new(""), &range)?;
    }
    Ok(())
}

/// Give the scaffold's entries the owners (and directories the modes) their
/// namesakes have in the image, shifted into the container's id range: an
/// overlay directory takes its attributes from the topmost layer, so
/// without this `/etc` would show up as owned by nobody. Entries the image
/// lacks belong to the container's root.
fn own_scaffold(scaffold: &Path, image_root: &Path, rel: &Path, range: &IdRange) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let path = scaffold.join(rel);
    let meta = fs::symlink_metadata(&path)?;
    let image = if rel.as_os_str().is_empty() {
        fs::symlink_metadata(image_root).ok()
    } else {
        plain_path_meta(image_root, rel)
    }
    .filter(|m| m.file_type() == meta.file_type());
    let (uid, gid) = image.as_ref().map_or((0, 0), |m| (m.uid(), m.gid()));
    let host = |id: u32| range.host_id(id).unwrap_or(range.host_start);
    nix::unistd::fchownat(
        None,
        &path,
        Some(Uid::from_raw(host(uid))),
        Some(Gid::from_raw(host(gid))),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("chown {}", path.display()))?;
    if meta.is_dir() {
        if let Some(m) = &image {
            fs::set_permissions(&path, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
        for entry in fs::read_dir(&path)? {
            own_scaffold(scaffold, image_root, &rel.join(entry?.file_name()), range)?;
        }
    }
    Ok(())
}

/// What `rel` in `root` is (its metadata, not followed) when no component
/// of it is a symlink.
fn plain_path_meta(root: &Path, rel: &Path) -> Option<fs::Metadata> {
    let mut p = root.to_path_buf();
    let mut last: Option<fs::Metadata> = None;
    for c in rel.components() {
        if last.as_ref().is_some_and(|m| !m.is_dir()) {
            return None;
        }
        p.push(c);
        let m = fs::symlink_metadata(&p).ok()?;
        if m.file_type().is_symlink() {
            return None;
        }
        last = Some(m);
    }
    last
}

/// The container's side of the launch, in its new namespaces. Every mount
/// is made while the child still has the host's credentials; with a user
/// namespace it joins that namespace only at the end, right before dropping
/// to the container's credentials. The container's mount, pid and cgroup
/// namespaces belong to the host's user namespace, so its root holds no
/// capability over them (it cannot undo a read-only mount or unmask a
/// path); its network, uts and ipc namespaces are its user namespace's
/// own, so it may ping, bind low ports and set its hostname.
fn child_setup(plan: &ChildPlan) -> Result<std::convert::Infallible> {
    nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP).context("unshare(cgroup)")?;
    let mut ops = SysOps {
        userns: plan.userns.as_ref().map(|(_, fds)| &fds.user),
    };
    plan.mounts.apply(&mut ops)?;
    nix::unistd::sethostname(&plan.hostname).context("sethostname")?;
    if let Some((_, fds)) = &plan.userns {
        nix::sched::setns(fds.user.as_fd(), CloneFlags::CLONE_NEWUSER)
            .context("joining the container's user namespace")?;
    }
    if plan.terminal {
        crate::console::take_controlling_terminal().context("taking the console as terminal")?;
    }
    plan.security.apply()?;
    // Changing credentials cleared the parent-death signal.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    nix::unistd::chdir(&plan.cwd)
        .with_context(|| format!("working directory {}", plan.cwd.display()))?;
    reset_signals();
    nix::unistd::execve(&plan.exe, &plan.argv, &plan.envp)
        .with_context(|| format!("executing {:?}", plan.exe))
}

/// Children start with default signal handling and nothing blocked.
fn reset_signals() {
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    for s in nix::sys::signal::Signal::iterator() {
        if !matches!(
            s,
            nix::sys::signal::Signal::SIGKILL | nix::sys::signal::Signal::SIGSTOP
        ) {
            // SAFETY: SIG_DFL runs no code of ours in a signal context,
            // which is what makes `signal` unsafe in general.
            unsafe {
                let _ = nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigDfl);
            }
        }
    }
}

/// Mark every inherited descriptor above stderr close-on-exec.
fn cloexec_from_3() {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets fd flags and
    // closes nothing, so no OwnedFd of ours goes stale; integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            4u32, /* CLOSE_RANGE_CLOEXEC */
        );
    }
}

/// The namespaces a container's init is made in besides its pid namespace.
fn container_namespaces(plan: &ChildPlan) -> CloneFlags {
    if plan.userns.is_some() {
        // The others come from the user namespace (see UsernsFds).
        CloneFlags::CLONE_NEWNS
    } else {
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
    }
}

/// Join the network, uts and ipc namespaces the user namespace owns.
fn join_owned_namespaces(plan: &ChildPlan) -> nix::Result<()> {
    if let Some((_, fds)) = &plan.userns {
        nix::sched::setns(fds.net.as_fd(), CloneFlags::CLONE_NEWNET)?;
        nix::sched::setns(fds.uts.as_fd(), CloneFlags::CLONE_NEWUTS)?;
        nix::sched::setns(fds.ipc.as_fd(), CloneFlags::CLONE_NEWIPC)?;
    }
    Ok(())
}

/// The child's side of [`launch`]. `born_in_namespaces`: clone3 made it in
/// its namespaces already (otherwise it unshares them). `handshake`: tell the
/// parent the namespaces exist, then wait for its go (network, cgroup).
///
/// It runs in a copy of the parent's address space (clone3 or fork, never
/// CLONE_VM), so nothing it writes reaches the parent, and it has a single
/// thread. It never returns: execve or `_exit`. It is not restricted to
/// async-signal-safe calls, and this is why that is sound:
/// - It allocates: resolving mount destinations, paths made C strings for
///   open_tree and move_mount, execve's argv arrays, credentials, and error
///   messages on a failure. The parsing and C strings of the plans are made
///   before the clone to keep this small, not because allocating here is
///   wrong: the clone3 child comes from a single-threaded parent, so no
///   other thread can hold the allocator's lock, and glibc's fork takes and
///   resets that lock around the fork for the forked child.
/// - It takes no other lock another thread may hold at the fork: no stdio,
///   no `std::env`, no tracing, no mutex shared with the parent. The one
///   exception is anyhow capturing a backtrace for an error, which reads the
///   environment (once per process) and, when RUST_BACKTRACE asks for one,
///   takes the unwinder's locks: only on a failure, and only a concern in
///   the forked child of a threaded parent.
/// - It calls nothing that depends on glibc's fork bookkeeping, which the
///   clone3 child skips (atfork handlers, the cached thread id in its TLS):
///   no pthread calls, no robust mutexes.
fn child_main(
    plan: &ChildPlan,
    born_in_namespaces: bool,
    handshake: Option<(OwnedFd, OwnedFd)>,
    err_w: OwnedFd,
) -> ! {
    let mut err = fs::File::from(err_w);
    // Not dumpable until its execve (see spawn_in).
    let _ = nix::sys::prctl::set_dumpable(false);
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if !born_in_namespaces {
        if let Err(e) = nix::sched::unshare(container_namespaces(plan)) {
            let _ = err.write_all(format!("unshare: {e}").as_bytes());
            // SAFETY: _exit only ends this process; the destructors and atexit
            // handlers it skips belong to the parent's copy of the state.
            unsafe { libc::_exit(127) };
        }
    }
    // Before the handshake: the parent wires the network into it.
    if let Err(e) = join_owned_namespaces(plan) {
        let _ = err.write_all(format!("joining the container's namespaces: {e}").as_bytes());
        // SAFETY: as above.
        unsafe { libc::_exit(127) };
    }
    if let Some((ready_w, sync_r)) = handshake {
        let _ = fs::File::from(ready_w).write_all(b"r");
        let mut go = [0u8; 1];
        if !matches!(fs::File::from(sync_r).read(&mut go), Ok(1)) {
            // SAFETY: as above.
            unsafe { libc::_exit(1) };
        }
    }
    cloexec_from_3();
    let e = match child_setup(plan) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let _ = err.write_all(format!("{e:#}").as_bytes());
    // SAFETY: as above.
    unsafe { libc::_exit(127) }
}

/// Start the container process described by `spec`, its root an overlay of
/// `lowers` (read-only, top first). `prepare`, if any, runs in the parent
/// with the child's pid once the child has its namespaces, before it goes on
/// (network setup); if it fails, the child is killed. Returns the child's
/// pid once it has exec'd.
///
/// A single-threaded caller makes the child with one clone3(2), directly in
/// its new namespaces and, with `cgroup`, inside that cgroup (v2,
/// CLONE_INTO_CGROUP, as crun does). Otherwise, or where the kernel lacks
/// clone3, the child is forked (safe in a threaded process): the calling
/// thread first unshares its pid namespace *for children*, so the child is
/// pid 1 of a new one, then switches back; the child unshares the others,
/// and the parent moves it into the cgroup by writing `cgroup.procs`. That
/// move takes the cgroup subsystem's threadgroup lock for writing, which
/// waits for an RCU grace period: tens of ms under TCG, a few on real
/// hardware. When the parent has nothing to do before the child goes on
/// (no network, no cgroup move) the two do not wait for each other.
///
/// `userns`: the namespaces begun earlier (see [`PendingUserns`]), which
/// a spec with a user namespace needs.
pub fn launch(
    spec: &Spec,
    lowers: &[&Path],
    cgroup: Option<&Path>,
    prepare: Option<&mut dyn FnMut(Pid) -> Result<()>>,
    userns: Option<PendingUserns>,
) -> Result<Pid> {
    let t0 = std::time::Instant::now();
    let userns = match crate::spec::userns_range(spec) {
        Some(range) => {
            let pending = userns.context(
                "internal error: a container with a user namespace was launched without one begun",
            )?;
            let fds = pending.finish(&range)?;
            tracing::debug!("launch: user namespace ready after {:?}", t0.elapsed());
            Some((range, fds))
        }
        None => None,
    };
    let plan = ChildPlan::new(spec, lowers, userns)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut born = None;
    if single_threaded() {
        let cgroup_fd: Option<OwnedFd> = match cgroup {
            Some(dir) => Some(
                fs::File::open(dir)
                    .with_context(|| format!("opening cgroup {}", dir.display()))?
                    .into(),
            ),
            None => None,
        };
        let flags = container_namespaces(&plan) | CloneFlags::CLONE_NEWPID;
        // The child may wait for the parent only if the parent has work.
        let handshake = prepare.is_some();
        let pipes = if handshake {
            Some((
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?,
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?,
            ))
        } else {
            None
        };
        // SAFETY: single-threaded, checked above, as clone3_fork requires;
        // the child does only what child_main documents and never returns.
        match unsafe { clone3_fork(flags, cgroup_fd.as_ref()) } {
            Some(Ok(nix::unistd::ForkResult::Child)) => {
                drop(err_r);
                let handshake = pipes.map(|((_, ready_w), (sync_r, _))| (ready_w, sync_r));
                child_main(&plan, true, handshake, err_w)
            }
            Some(Ok(nix::unistd::ForkResult::Parent { child })) => {
                let pipes = pipes.map(|((ready_r, _), (_, sync_w))| (ready_r, sync_w));
                born = Some((child, pipes));
            }
            Some(Err(e)) => return Err(e).context("clone3"),
            None => {} // no clone3 here: fork below
        }
    }
    let (pid, pipes, placed) = match born {
        Some((pid, pipes)) => (pid, pipes, true),
        None => {
            let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            let (sync_r, sync_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            let own_pid_ns: OwnedFd = fs::File::open("/proc/thread-self/ns/pid_for_children")
                .context("opening our pid namespace")?
                .into();
            nix::sched::unshare(CloneFlags::CLONE_NEWPID).context("unshare(pid)")?;
            // SAFETY: other threads may exist here; the child relies only on
            // what glibc's fork leaves usable (see child_main) and never
            // returns.
            let forked = unsafe { nix::unistd::fork() };
            let restored = nix::sched::setns(own_pid_ns.as_fd(), CloneFlags::CLONE_NEWPID);
            let pid = match forked.context("fork")? {
                nix::unistd::ForkResult::Child => {
                    drop((ready_r, sync_w, err_r));
                    child_main(&plan, false, Some((ready_w, sync_r)), err_w)
                }
                nix::unistd::ForkResult::Parent { child } => child,
            };
            if let Err(e) = restored {
                kill_child(pid);
                return Err(e).context("returning to our pid namespace");
            }
            (pid, Some((ready_r, sync_w)), false)
        }
    };
    drop(err_w);
    if let Some((ready_r, sync_w)) = pipes {
        let mut ready = [0u8; 1];
        if !matches!(fs::File::from(ready_r).read(&mut ready), Ok(1)) {
            let mut msg = String::new();
            let _ = fs::File::from(err_r).read_to_string(&mut msg);
            kill_child(pid);
            bail!("creating the container's namespaces: {msg}");
        }
        tracing::debug!("launch: namespaces ready after {:?}", t0.elapsed());
        if let (Some(dir), false) = (cgroup, placed) {
            if let Err(e) = crate::cgroup::add_process_at(dir, pid.as_raw()) {
                kill_child(pid);
                return Err(e);
            }
        }
        if let Some(prepare) = prepare {
            if let Err(e) = prepare(pid) {
                kill_child(pid);
                return Err(e);
            }
        }
        tracing::debug!("launch: cgroup and network after {:?}", t0.elapsed());
        let mut w = fs::File::from(sync_w);
        if let Err(e) = w.write_all(b"g") {
            kill_child(pid);
            return Err(e).context("starting the container process");
        }
    }
    let mut msg = String::new();
    let _ = fs::File::from(err_r).read_to_string(&mut msg);
    if !msg.is_empty() {
        let _ = nix::sys::wait::waitpid(pid, None);
        bail!("starting the container: {msg}");
    }
    tracing::debug!("launch: mounted and exec'd after {:?}", t0.elapsed());
    Ok(pid)
}

/// A container's user namespace and the namespaces it owns, held by file
/// descriptors.
pub struct UsernsFds {
    pub user: OwnedFd,
    pub net: OwnedFd,
    pub uts: OwnedFd,
    pub ipc: OwnedFd,
    /// The exiting child that made them, reaped with these fds.
    _holder: Holder,
}

/// A user namespace that maps container ids 0.. onto a range, with a
/// network, uts and ipc namespace it owns, being made by a short-lived
/// child (a namespace needs a process to be born in). Making a network
/// namespace is the slowest step of a start (about a ms), so it is begun
/// early, `run` as soon as the range is claimed, a monitor before it builds
/// the scaffold, and the kernel works on the other CPU meanwhile.
/// [`finish`](Self::finish) maps the ids (while the child still makes the
/// network namespace) and takes the namespaces by file descriptor. The
/// launcher mounts idmapped through the user namespace; the container's
/// init joins the others at once and the user namespace last.
pub struct PendingUserns {
    /// The child says `u` once it is in the user namespace, then `n` once
    /// it made the others (`e` instead: it failed).
    ready: OwnedFd,
    holder: Holder,
}

/// The child that makes the namespaces and the stack it runs on. Dropped,
/// it lets the child go, reaps it, and only then unmaps the stack.
struct Holder {
    /// Closing it lets the child exit.
    hold: Option<OwnedFd>,
    pid: Pid,
    /// Kept only to be unmapped (by its own drop) after the child is reaped.
    _stack: HolderStack,
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.hold.take());
        let _ = nix::sys::wait::waitpid(self.pid, None);
        // `_stack` is dropped after this, with the child gone.
    }
}

/// What [`holder_main`] gets: descriptor numbers in its copy of our table.
struct HolderArgs {
    ready: RawFd,
    hold: RawFd,
    hold_parent_end: RawFd,
    /// The CPUs the holder moves to: ours but the one we run on (see
    /// [`other_cpus`]); `None` on a single CPU.
    away: Option<libc::cpu_set_t>,
}

/// The CPUs this thread may run on, but the one it runs on now, or `None`
/// if that leaves none. The kernel starts a new task on its parent's CPU
/// and lets it run first: the holder's namespaces (0.4-0.5 ms, mostly the
/// network namespace) would then run while we wait, not while we write the
/// records, with the other CPU idle.
fn other_cpus() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data (all zero: no CPU); sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return None;
    }
    // SAFETY: no arguments; -1 on failure.
    let here = unsafe { libc::sched_getcpu() };
    if here < 0 || here as usize >= libc::CPU_SETSIZE as usize {
        return None;
    }
    // SAFETY: `here` is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_CLR(here as usize, &mut set) };
    (unsafe { libc::CPU_COUNT(&set) } > 0).then_some(set)
}

/// The holder's stack, with its [`HolderArgs`] at the bottom.
struct HolderStack {
    base: *mut libc::c_void,
}

const HOLDER_STACK: usize = 64 * 1024;

impl HolderStack {
    fn new(args: HolderArgs) -> Result<Self> {
        // SAFETY: no pointer is passed in; the result is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HOLDER_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping a stack");
        }
        // SAFETY: the mapping is fresh, writable, page-aligned (more than
        // HolderArgs needs) and far larger than it; nothing else uses it yet.
        unsafe { base.cast::<HolderArgs>().write(args) };
        Ok(Self { base })
    }
    fn args(&self) -> *mut libc::c_void {
        self.base
    }
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the same mapping (allowed for `add`);
        // the stack grows down from there. Page-aligned, so 16-byte aligned
        // as the ABI wants a new stack.
        unsafe { self.base.cast::<u8>().add(HOLDER_STACK).cast() }
    }
}

impl Drop for HolderStack {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours. A Holder drops it only after reaping
        // the child that ran on it; without a child (clone failed) nobody
        // else uses it.
        unsafe { libc::munmap(self.base, HOLDER_STACK) };
    }
}

/// The holder: it shares our memory (CLONE_VM, so no page tables are
/// copied and our later writes fault nothing in) but nothing else. It
/// touches only its own stack and its [`HolderArgs`], and makes raw
/// syscalls through `libc::syscall`, which are not cancellation points and
/// take no locks. It runs on the TLS of the thread that cloned it: the only
/// TLS write is `errno` when a syscall fails, which leaves that thread a
/// wrong `errno` if it reads one at that instant; a failure here fails the
/// start anyway.
extern "C" fn holder_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the HolderArgs of a HolderStack that outlives us,
    // written before the clone and never again: shared reads only.
    let args = unsafe { &*arg.cast::<HolderArgs>() };
    let sys = |nr: libc::c_long, a: libc::c_long, b: libc::c_long, c: libc::c_long| {
        // SAFETY: the calls below take integers, except read and write,
        // given one byte on this stack or in a static that outlives the
        // call, and sched_setaffinity, given a set in HolderArgs. Descriptors are our copies (no CLONE_FILES).
        unsafe { libc::syscall(nr, a, b, c) }
    };
    let say = |what: &u8| {
        sys(
            libc::SYS_write,
            args.ready.into(),
            (what as *const u8) as libc::c_long,
            1,
        )
    };
    sys(libc::SYS_close, args.hold_parent_end.into(), 0, 0);
    if let Some(away) = &args.away {
        // Off the parent's CPU (see other_cpus); no matter if it fails.
        sys(
            libc::SYS_sched_setaffinity,
            0,
            std::mem::size_of::<libc::cpu_set_t>() as libc::c_long,
            (away as *const libc::cpu_set_t) as libc::c_long,
        );
    }
    // The user namespace first: it owns the ones made after it.
    let user = sys(libc::SYS_unshare, libc::CLONE_NEWUSER.into(), 0, 0) == 0;
    say(if user { &b'u' } else { &b'e' });
    let others = user
        && sys(
            libc::SYS_unshare,
            (libc::CLONE_NEWNET | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC).into(),
            0,
            0,
        ) == 0;
    say(if others { &b'n' } else { &b'e' });
    // Held until the parent has the namespaces: EOF when it closes its end
    // or dies.
    let mut b = 0u8;
    sys(
        libc::SYS_read,
        args.hold.into(),
        (&mut b as *mut u8) as libc::c_long,
        1,
    );
    0
}

impl PendingUserns {
    pub fn spawn() -> Result<Self> {
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (hold_r, hold_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let away = other_cpus();
        let stack = HolderStack::new(HolderArgs {
            ready: ready_w.as_raw_fd(),
            hold: hold_r.as_raw_fd(),
            hold_parent_end: hold_w.as_raw_fd(),
            away,
        })?;
        // SAFETY: the child shares our memory (CLONE_VM) but touches only
        // its stack and its HolderArgs, with raw syscalls (see holder_main);
        // both outlive it: `stack` moves into the Holder, which reaps the
        // child before unmapping it. No CLONE_FILES: the child has its own
        // copy of the descriptors named in HolderArgs, so we may close ours.
        let pid = unsafe {
            libc::clone(
                holder_main,
                stack.top(),
                libc::CLONE_VM | libc::SIGCHLD,
                stack.args(),
            )
        };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("clone (user namespace holder)");
        }
        // The holder moves itself when it runs first; when it waits behind
        // us on our CPU, it is moved here (see other_cpus).
        if let Some(away) = &away {
            // SAFETY: `away` is a valid set of the size given.
            unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), away) };
        }
        // The child has its own copies of the descriptors.
        drop((ready_w, hold_r));
        Ok(Self {
            ready: ready_r,
            holder: Holder {
                hold: Some(hold_w),
                pid: Pid::from_raw(pid),
                _stack: stack,
            },
        })
    }

    fn expect(&self, what: u8) -> Result<()> {
        let mut b = [0u8; 1];
        if !matches!(nix::unistd::read(self.ready.as_raw_fd(), &mut b), Ok(1)) || b[0] != what {
            bail!("creating a user namespace failed (is user.max_user_namespaces 0?)");
        }
        Ok(())
    }

    /// Map container ids 0.. onto `range` and take the namespaces.
    pub fn finish(mut self, range: &IdRange) -> Result<UsernsFds> {
        let child = self.holder.pid;
        let open = |ns: &str| -> Result<OwnedFd> {
            let path = format!("/proc/{child}/ns/{ns}");
            Ok(fs::File::open(&path)
                .with_context(|| format!("opening {path}"))?
                .into())
        };
        self.expect(b'u')?;
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{child}/{file}");
            fs::write(&path, range.map_line())
                .with_context(|| format!("writing {path} ({})", range.map_line().trim()))?;
        }
        let user = open("user")?;
        self.expect(b'n')?;
        let (net, uts, ipc) = (open("net")?, open("uts")?, open("ipc")?);
        // Let it go now; `UsernsFds` reaps it once it had time to exit.
        drop(self.holder.hold.take());
        Ok(UsernsFds {
            user,
            net,
            uts,
            ipc,
            _holder: self.holder,
        })
    }
}

fn kill_child(pid: Pid) {
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, None);
}

/// Whether this process has a single thread (then nothing can hold a lock
/// across a raw clone3, see [`clone3_fork`]).
fn single_threaded() -> bool {
    // Field 20 of /proc/self/stat, counted after the ")" that ends the name.
    cairn_contracts::procfs::read_small("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            rest.split_whitespace().nth(17)?.parse::<u32>().ok()
        })
        == Some(1)
}

/// A fork-like clone3(2): the child in new namespaces `flags` and, with
/// `cgroup`, inside that cgroup. None where the kernel lacks clone3 or a
/// flag (ENOSYS, EINVAL, E2BIG): the caller forks instead.
///
/// # Safety
/// clone3 bypasses glibc's fork bookkeeping (atfork handlers, the resets of
/// its internal locks, the child's cached thread id). The caller must be
/// single-threaded, so no lock is held by a thread the child lacks; the
/// child may then allocate, but must not rely on that bookkeeping (no
/// pthread calls, no atfork handlers) and must end in execve or `_exit`,
/// never returning into code that takes it for the parent.
unsafe fn clone3_fork(
    flags: CloneFlags,
    cgroup: Option<&OwnedFd>,
) -> Option<nix::Result<nix::unistd::ForkResult>> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let mut args = CloneArgs {
        flags: flags.bits() as u32 as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    // SAFETY: `args` lives across the call and the size passed is its own;
    // the kernel reads it (and borrows the cgroup fd) only during the call.
    // No CLONE_VM and no new stack: the child continues here on a copy of
    // this address space, like fork.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        0 => Some(Ok(nix::unistd::ForkResult::Child)),
        pid if pid > 0 => Some(Ok(nix::unistd::ForkResult::Parent {
            child: Pid::from_raw(pid as i32),
        })),
        _ => match nix::errno::Errno::last() {
            nix::errno::Errno::ENOSYS | nix::errno::Errno::EINVAL | nix::errno::Errno::E2BIG => {
                None
            }
            e => Some(Err(e)),
        },
    }
}

/// How to enter a running container.
pub struct ExecTarget {
    pub pid: i32,
    pub cgroup: Option<PathBuf>,
}

/// Run `argv` inside the running container `target` with the container's own
/// credentials and restrictions (`spec`). The caller waits for the child.
pub fn spawn_in(
    target: &ExecTarget,
    spec: &Spec,
    argv: &[String],
    env: &[String],
    stdio: Option<(
        std::process::Stdio,
        std::process::Stdio,
        std::process::Stdio,
    )>,
    terminal: bool,
) -> Result<std::process::Child> {
    let p = spec.process().as_ref().context("config has no process")?;
    let security = Security::from_spec(spec)?;
    let open = |ns: &str| -> Result<OwnedFd> {
        let path = format!("/proc/{}/ns/{ns}", target.pid);
        Ok(fs::File::open(&path)
            .with_context(|| format!("opening {path}: is the container running?"))?
            .into())
    };
    let namespaces: Vec<(OwnedFd, CloneFlags)> = vec![
        (open("ipc")?, CloneFlags::CLONE_NEWIPC),
        (open("uts")?, CloneFlags::CLONE_NEWUTS),
        (open("net")?, CloneFlags::CLONE_NEWNET),
        (open("cgroup")?, CloneFlags::CLONE_NEWCGROUP),
        (open("mnt")?, CloneFlags::CLONE_NEWNS),
    ];
    // Joined last, after the namespaces its root holds no capability over.
    let user_ns = match crate::spec::userns_range(spec) {
        Some(_) => Some(open("user")?),
        None => None,
    };
    let pid_ns = open("pid")?;
    let own_pid_ns: OwnedFd = fs::File::open("/proc/thread-self/ns/pid_for_children")?.into();
    let cgroup_procs = target
        .cgroup
        .as_deref()
        .map(crate::cgroup::procs_handle)
        .transpose()?;
    let cwd = p.cwd().clone();
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    for e in env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    if let Some((i, o, e)) = stdio {
        cmd.stdin(i).stdout(o).stderr(e);
    }
    // SAFETY: the closure runs in the child std forks (glibc's fork: the
    // allocator's lock is reset in the child), which has one thread and a
    // copy of our memory. Besides syscalls on the descriptors opened above
    // (the cgroup's `cgroup.procs` too) it allocates (setgroups' list, the
    // capability sets, error messages) and takes no other lock, as
    // child_main explains; the backtrace caveat there applies to its errors.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(mut procs) = cgroup_procs.as_ref() {
                let _ = procs.write_all(b"0");
            }
            for (fd, flag) in &namespaces {
                nix::sched::setns(fd.as_fd(), *flag).map_err(std::io::Error::from)?;
            }
            if let Some(fd) = &user_ns {
                nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWUSER)
                    .map_err(std::io::Error::from)?;
            }
            if terminal {
                crate::console::take_controlling_terminal().map_err(std::io::Error::from)?;
            }
            security
                .apply()
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            nix::unistd::chdir(&cwd).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    // The child is a copy of this process, visible in the container's pid
    // namespace from its fork to its execve: not dumpable, so the
    // container can neither ptrace it nor open its /proc/PID/exe, mem or
    // fds (the CVE-2019-5736 class). The flag is inherited by the fork and
    // reset by the kernel at execve of the container's program.
    nix::sys::prctl::set_dumpable(false).context("making this process non-dumpable")?;
    // Children of this process land in the container's pid namespace from
    // here until we switch back.
    nix::sched::setns(pid_ns.as_fd(), CloneFlags::CLONE_NEWPID)
        .context("entering the container's pid namespace")?;
    let child = cmd.spawn();
    nix::sched::setns(own_pid_ns.as_fd(), CloneFlags::CLONE_NEWPID)
        .context("returning to our pid namespace")?;
    child.with_context(|| format!("running {:?} in the container", argv[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_goes_to_our_other_cpus() {
        // SAFETY: plain data, filled by sched_getaffinity.
        let mut ours: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut ours) }, 0);
        let allowed = unsafe { libc::CPU_COUNT(&ours) };
        match other_cpus() {
            None => assert_eq!(allowed, 1, "CPUs to move to were left out"),
            Some(away) => {
                assert_eq!(unsafe { libc::CPU_COUNT(&away) }, allowed - 1);
                for cpu in 0..libc::CPU_SETSIZE as usize {
                    if unsafe { libc::CPU_ISSET(cpu, &away) } {
                        assert!(
                            unsafe { libc::CPU_ISSET(cpu, &ours) },
                            "CPU {cpu} is not ours"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_compact_seccomp_filter_decides_as_seccompilers() {
        use seccomp_bpf::decide;
        let arch = seccomp_bpf::audit_arch(std::env::consts::ARCH).unwrap();
        let long: Vec<_> =
            seccompiler_errno_filter(crate::spec::DENIED_SYSCALLS, libc::EPERM as u32)
                .unwrap()
                .iter()
                .map(|i| (i.code, i.jt, i.jf, i.k))
                .collect();
        let short = compile_seccomp(&crate::mountplan::tests::built_spec(None))
            .unwrap()
            .unwrap();
        let short: Vec<_> = short.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect();
        assert!(
            short.len() * 4 < long.len(),
            "{} vs {}",
            short.len(),
            long.len()
        );
        let mut denied = 0;
        for nr in 0..4096 {
            let want = decide(&long, arch, nr).unwrap();
            assert_eq!(decide(&short, arch, nr), Some(want), "syscall {nr}");
            denied += usize::from(want != 0x7fff_0000);
        }
        assert_eq!(denied, crate::spec::DENIED_SYSCALLS.len());
        assert_eq!(
            decide(&short, !arch, 0),
            decide(&long, !arch, 0),
            "another arch"
        );
        if std::env::consts::ARCH == "x86_64" {
            // x32 numbers name the same calls: refused, not allowed.
            for nr in [0x4000_0000 + libc::SYS_mount as u32, 0x4000_0000, u32::MAX] {
                assert_eq!(decide(&short, arch, nr), Some(0x0005_0001), "x32 {nr:#x}");
            }
        }
        // A list of its own (not the precompiled default) is compacted too.
        let custom = compile_errno_filter(&["chroot".to_string()], 38).unwrap();
        let custom: Vec<_> = custom.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect();
        let chroot = libc::SYS_chroot as u32;
        assert_eq!(decide(&custom, arch, chroot), Some(0x0005_0000 | 38));
        assert_eq!(decide(&custom, arch, chroot + 1), Some(0x7fff_0000));
        assert!(custom.len() < 10, "{custom:?}");
    }

    #[test]
    fn a_filter_that_is_no_plain_deny_list_is_kept_as_it_is() {
        let arch = seccomp_bpf::audit_arch(std::env::consts::ARCH).unwrap();
        let ld_nr = (0x20, 0, 0, 0);
        let ret = |k| (0x06u16, 0u8, 0u8, k);
        // An opcode outside the subset (a load of an argument).
        assert_eq!(
            seccomp_bpf::compact(&[(0x20, 0, 0, 16), ret(0)], arch),
            None
        );
        // Two actions for refused calls.
        let two = [
            ld_nr,
            (0x15, 2, 0, 1),
            (0x15, 2, 0, 2),
            ret(0x7fff_0000),
            ret(0x0005_0001),
            ret(0x0005_0002),
        ];
        assert_eq!(seccomp_bpf::compact(&two, arch), None);
        // A number beyond the simulated range refused, next to one within.
        let far = [
            ld_nr,
            (0x15, 2, 0, 7),
            (0x15, 1, 0, 5000),
            ret(0x7fff_0000),
            ret(0x0005_0001),
        ];
        assert_eq!(seccomp_bpf::decide(&far, arch, 5000), Some(0x0005_0001));
        assert_eq!(seccomp_bpf::compact(&far, arch), None);
        let near = [
            ld_nr,
            (0x15, 2, 0, 7),
            (0x15, 1, 0, 9),
            ret(0x7fff_0000),
            ret(0x0005_0001),
        ];
        assert!(seccomp_bpf::compact(&near, arch).is_some());
        // A bit test.
        let bits = [ld_nr, (0x45, 1, 0, 4), ret(0x7fff_0000), ret(0x0005_0001)];
        assert_eq!(seccomp_bpf::compact(&bits, arch), None);
        // A jump out of the program.
        assert_eq!(seccomp_bpf::decide(&[(0x05, 0, 0, 9)], arch, 0), None);
        // Too long for 8-bit jumps.
        let mut many = vec![ld_nr];
        for nr in 0..300u32 {
            many.push((0x15, 0, 1, nr));
            many.push(ret(0x0005_0001));
        }
        many.push(ret(0x7fff_0000));
        assert_eq!(seccomp_bpf::compact(&many, arch), None);
    }

    #[test]
    fn default_seccomp_profile_compiles() {
        let spec = crate::mountplan::tests::built_spec(None);
        let bpf = compile_seccomp(&spec).unwrap().unwrap();
        assert!(bpf.len() > crate::spec::DENIED_SYSCALLS.len());
        // The precompiled default is what compiling the profile now gives.
        let names: Vec<String> = crate::spec::DENIED_SYSCALLS
            .iter()
            .map(|s| s.to_string())
            .collect();
        let fresh = compile_errno_filter(&names, libc::EPERM as u32).unwrap();
        assert_eq!(bpf, fresh);
        let other = compile_errno_filter(&names[1..], libc::EPERM as u32).unwrap();
        assert_ne!(bpf, other);
        let sec = Security::from_spec(&spec).unwrap();
        assert!(sec.bounding.contains(&caps::Capability::CAP_NET_RAW));
        assert!(!sec.bounding.contains(&caps::Capability::CAP_SYS_ADMIN));
    }

    #[test]
    fn the_umask_is_the_specs_or_0022() {
        let mut spec = crate::mountplan::tests::built_spec(None);
        let umask = |spec: &Spec| Security::from_spec(spec).map(|s| s.umask.bits());
        assert_eq!(umask(&spec).unwrap(), 0o022);
        let mut process = spec.process().clone().unwrap();
        let mut user = process.user().clone();
        user.set_umask(Some(0o077));
        process.set_user(user.clone());
        spec.set_process(Some(process.clone()));
        assert_eq!(umask(&spec).unwrap(), 0o077);
        user.set_umask(Some(0o1777));
        process.set_user(user);
        spec.set_process(Some(process));
        let err = umask(&spec).err().unwrap().to_string();
        assert!(err.contains("process.user.umask 0o1777"), "{err}");
    }

    #[test]
    fn scaffold_holds_missing_mount_points_and_generated_files() {
        use std::os::unix::fs::PermissionsExt;
        let image = tempfile::tempdir().unwrap();
        let r = image.path();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::create_dir_all(r.join("proc")).unwrap(); // the image has /proc already
        std::os::unix::fs::symlink("/", r.join("tmp")).unwrap(); // and a hostile /tmp
        std::fs::write(r.join("bin/app"), "").unwrap();
        std::fs::set_permissions(r.join("bin/app"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let vol_dir = tempfile::tempdir().unwrap();
        let vol_file = vol_dir.path().join("cfg");
        std::fs::write(&vol_file, "x").unwrap();
        let volumes = [
            crate::spec::Volume::parse(&format!("{}:/srv/data", vol_dir.path().display())).unwrap(),
            crate::spec::Volume::parse(&format!("{}:/etc/app.conf:ro", vol_file.display()))
                .unwrap(),
        ];
        let cfg = crate::image::ImageConfig {
            cmd: vec!["/bin/app".into()],
            ..Default::default()
        };
        let spec = crate::spec::build(&crate::spec::SpecInput {
            hostname: "h",
            image: &cfg,
            image_root: r,
            rootfs: Path::new("/r"),
            command: &[],
            env: &[],
            volumes: &volumes,
            limits: &Default::default(),
            cgroups_path: None,
            userns: None,
            terminal: false,
        })
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let sc = out.path().join("scaffold");
        make_scaffold(&spec, &sc, r, &[("/etc/hostname", "h\n".into())]).unwrap();
        assert!(!sc.join("proc").exists(), "the image provides /proc");
        for d in ["dev", "sys", "run", "tmp", "srv/data"] {
            assert!(sc.join(d).is_dir(), "{d}");
        }
        assert!(
            !sc.join("dev/pts").exists(),
            "made inside the /dev tmpfs instead"
        );
        assert!(
            sc.join("etc/app.conf").is_file(),
            "file volume gets a file mount point"
        );
        assert_eq!(
            std::fs::read_to_string(sc.join("etc/hostname")).unwrap(),
            "h\n"
        );
    }
}
