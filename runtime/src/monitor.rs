//! The per-container monitor: one small process per container that starts
//! it, keeps its output in the log, reaps it, records how it ended, runs the
//! health check and restarts it per policy with back-off.
//!
//! It is single-threaded and event driven: a signalfd delivers SIGCHLD and
//! stop requests, `poll` times the health checks and back-off. A detached
//! one waits in `host-monitor` while it is idle (see [`crate::idle`]).

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::Spec;

use crate::console::Console;
use crate::container::{self, ExecTarget};
use crate::context::Runtime;
use crate::idle::{monitor_signals, Handoff};
use crate::logfile::LogSink;
use crate::state::{
    read_json, write_json, ContainerRecord, ContainerState, Health, HealthState, RestartPolicy,
    Status,
};

/// The environment variable that gives a detached monitor the number of
/// the inherited fd on which `run -d` waits: the monitor writes
/// [`READY_RUNNING`] once the container runs, or [`READY_FAILED`], the
/// error and a NUL if its first start failed, then closes it. End of file
/// with nothing written tells `run` the monitor died.
pub const READY_FD_ENV: &str = "CAIRN_MONITOR_READY_FD";
pub const READY_RUNNING: u8 = b'R';
pub const READY_FAILED: u8 = b'E';

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run this long resets the back-off.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);
/// A detached monitor waits shorter spells (before a frequent health
/// check) in place: going idle and back costs two execs and reading the
/// records again, a few ms.
const MIN_IDLE: Duration = Duration::from_secs(1);

/// Whether nothing is in flight (no health check running, no stop under
/// way) and the next check is far enough off to go idle until it.
fn quiet(
    checking: bool,
    kill_at: Option<Instant>,
    next_check: Option<Instant>,
    now: Instant,
) -> bool {
    !checking
        && kill_at.is_none()
        && next_check.map_or(true, |at| at.saturating_duration_since(now) >= MIN_IDLE)
}

/// Where a detached monitor goes while it is idle (see [`crate::idle`]):
/// the small executable, and the command line that runs this monitor
/// again. The binary knows both; the library does not.
pub struct IdleExec {
    pub waiter: PathBuf,
    /// Arguments before [`crate::idle::wait`]'s own (none for `host-monitor`).
    pub waiter_args: Vec<OsString>,
    pub resume: Vec<OsString>,
}

struct Monitor<'a> {
    rt: &'a Runtime,
    record: ContainerRecord,
    spec: Spec,
    state: ContainerState,
    sfd: SignalFd,
    cgroup: Option<std::path::PathBuf>,
    /// The first start's namespaces, begun by a foreground `run`.
    early_userns: Option<container::PendingUserns>,
    /// Where `run -d` waits to hear the first start's outcome.
    ready: Option<std::fs::File>,
    /// Whether this container's registration file is published now.
    registered: bool,
    /// A detached container's log (its output arrives on a pipe); None in
    /// the foreground, where the output is the terminal's.
    log: Option<LogSink>,
    /// A foreground `run -t`: the container's pseudo-terminal.
    console: Option<Console>,
    /// Where to wait while idle; None: wait in this process.
    idle: Option<IdleExec>,
    /// The wait before the next restart.
    backoff: Duration,
}

/// A pidfd of `pid` (Linux ≥ 5.3), readable once it has exited; `None`
/// where the kernel has none (SIGCHLD alone then tells).
pub(crate) fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    // SAFETY: a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn exit_code(ws: WaitStatus) -> Option<i32> {
    match ws {
        WaitStatus::Exited(_, c) => Some(c),
        WaitStatus::Signaled(_, s, _) => Some(128 + s as i32),
        _ => None,
    }
}

/// Whether our child `pid` has ended: `Some` with its exit code, or with
/// `None` when its status is lost (something else waited for it). Only
/// `pid` is waited for, never any child (`waitpid(-1)`): a foreground `run`
/// supervises in the caller's process, and reaping any child there took
/// the children of the caller's other threads — their own waits then
/// failed with ECHILD, and of two foreground runs in parallel threads one
/// could take the other's container, which then never saw it end.
fn reap(pid: Pid) -> Option<Option<i32>> {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(ws @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => Some(exit_code(ws)),
        Ok(_) => None,
        Err(nix::errno::Errno::ECHILD) => Some(None),
        Err(_) => None,
    }
}

/// The readiness pipe named by [`READY_FD_ENV`], if this monitor was given
/// one. Taken out of the environment and made close-on-exec, so neither
/// the container nor a health check inherits it (its holders would keep
/// `run` from seeing the monitor die).
fn take_ready_fd() -> Option<std::fs::File> {
    let v = std::env::var_os(READY_FD_ENV)?;
    // Single-threaded here: the monitor has not started anything yet.
    std::env::remove_var(READY_FD_ENV);
    let fd: i32 = v.to_str()?.parse().ok().filter(|fd| *fd > 2)?;
    // Only an open pipe: a stale variable must not make us write elsewhere.
    // SAFETY: fstat and fcntl on a number; neither takes ownership.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return None;
        }
        if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) != 0 {
            return None;
        }
        // SAFETY: inherited for us alone; nothing else in this process owns it.
        Some(std::fs::File::from_raw_fd(fd))
    }
}

impl Monitor<'_> {
    /// Tell `run -d` (if it waits) how the first start went; once.
    fn report_ready(&mut self, outcome: std::result::Result<(), &str>) {
        use std::io::Write;
        let Some(mut f) = self.ready.take() else {
            return;
        };
        let msg = match outcome {
            Ok(()) => vec![READY_RUNNING],
            Err(e) => {
                let mut m = vec![READY_FAILED];
                m.extend(e.bytes().filter(|&b| b != 0));
                m.push(0);
                m
            }
        };
        // `run` may be gone (killed while waiting): nothing to tell then.
        let _ = f.write_all(&msg);
    }

    fn save(&mut self) -> Result<()> {
        write_json(
            &self
                .rt
                .paths
                .container(&self.record.name)
                .join(crate::state::STATE_FILE),
            &self.state,
            crate::state::Durability::of(&self.record),
        )?;
        self.sync_registration();
        Ok(())
    }

    /// A container with services is an instance of them while it runs and
    /// its health check (if any) passes: its registration file exists
    /// exactly then. Failing to write it costs the container nothing but
    /// its listing, so it is logged, never fatal.
    fn sync_registration(&mut self) {
        let Some(dir) = &self.record.registration_dir else {
            return;
        };
        let healthy = match (&self.record.health, &self.state.health) {
            (None, _) => true,
            (Some(_), Some(h)) => h.status == Health::Healthy,
            (Some(_), None) => false,
        };
        let serving = self.state.status == Status::Running && healthy;
        if serving == self.registered {
            return;
        }
        let file = dir.join(format!("{}.json", self.record.name));
        let result = match (
            serving,
            self.record.ip,
            self.state.monitor_pid,
            self.state.monitor_start,
        ) {
            (true, Some(address), Some(monitor_pid), Some(monitor_start)) => {
                let instance = cairn_contracts::services::Instance {
                    container: self.record.name.clone(),
                    address,
                    services: self.record.services.clone(),
                    monitor_pid,
                    monitor_start,
                    node: String::new(),
                    node_id: String::new(),
                };
                std::fs::create_dir_all(dir)
                    .map_err(anyhow::Error::from)
                    .and_then(|()| Ok(serde_json::to_vec(&instance)?))
                    .and_then(|b| cairn_contracts::durable::replace(&file, &b))
            }
            (true, ..) => Err(anyhow::anyhow!("no address or monitor to publish")),
            (false, ..) => match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
        };
        match result {
            Ok(()) => self.registered = serving,
            Err(e) => eprintln!("monitor: registration {}: {e:#}", file.display()),
        }
    }

    fn start(&mut self) -> Result<Pid> {
        let paths = &self.rt.paths;
        let run = paths.container_run(&self.record.name);
        let checkout = self.record.image_root(paths);
        let scaffold = run.join("scaffold");
        let record = &self.record;
        // Begun first: the kernel makes the namespaces while we build the scaffold.
        let userns = match self.early_userns.take() {
            Some(p) => Some(p),
            None => crate::spec::userns_range(&self.spec)
                .map(|_| container::PendingUserns::spawn())
                .transpose()?,
        };
        crate::state::create_private_dir(&paths.run_root())?;
        std::fs::create_dir_all(run.join("rootfs"))
            .with_context(|| format!("creating {}", run.display()))?;
        let t0 = std::time::Instant::now();
        container::make_scaffold(
            &self.spec,
            &scaffold,
            &checkout,
            &crate::context::generated_files(record),
        )?;
        tracing::debug!("monitor: scaffold made in {:?}", t0.elapsed());
        if record.network.is_some() && self.state.restarts > 0 {
            // The previous instance's veth goes away with its namespace, but
            // asynchronously: make sure the name is free.
            crate::net::delete_link(&record.host_if)?;
        }
        let mut attach_network;
        let prepare: Option<&mut dyn FnMut(Pid) -> Result<()>> = match (&record.network, record.ip)
        {
            (Some(net), Some(ip)) => {
                attach_network =
                    move |pid: Pid| crate::net::attach(net, pid.as_raw(), &record.host_if, ip);
                Some(&mut attach_network)
            }
            _ => None,
        };
        // The container inherits stdout and stderr: the log's pipe while it
        // is made, the log file again for the monitor's own messages. With
        // a console, stdin, stdout and stderr are its terminal, and ours
        // come back afterwards.
        if let Some(log) = &self.log {
            for fd in [1, 2] {
                nix::unistd::dup2(log.writer().as_raw_fd(), fd)?;
            }
        }
        let mut ours = Vec::new();
        if let Some(console) = &self.console {
            for fd in [0, 1, 2] {
                ours.push((fd, nix::unistd::dup(fd)?));
                nix::unistd::dup2(console.slave().as_raw_fd(), fd)?;
            }
        }
        let launched = container::launch(
            &self.spec,
            &[&scaffold, &checkout],
            self.cgroup.as_deref(),
            prepare,
            userns,
        );
        for (fd, saved) in ours {
            nix::unistd::dup2(saved, fd)?;
            let _ = nix::unistd::close(saved);
        }
        if let Some(log) = &self.log {
            for fd in [1, 2] {
                nix::unistd::dup2(log.file().as_raw_fd(), fd)?;
            }
        }
        launched
    }

    /// Wait for a signal, the container's end (`child`, a pidfd) or the
    /// timeout. The pidfd makes the container's end seen even when another
    /// thread of this process takes the SIGCHLD (a foreground `run` from a
    /// threaded program): the signal mask that feeds the signalfd is per
    /// thread. `None`: look at the children.
    fn wait_signal(
        &mut self,
        timeout: Option<Duration>,
        child: Option<&OwnedFd>,
    ) -> Result<Option<Signal>> {
        let deadline = timeout.map(|d| Instant::now() + d);
        loop {
            let t = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                        .unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            let mut fds = vec![PollFd::new(self.sfd.as_fd(), PollFlags::POLLIN)];
            if let Some(c) = child {
                fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            }
            let log_at = fds.len();
            if let Some(log) = &self.log {
                fds.push(PollFd::new(log.reader(), PollFlags::POLLIN));
            }
            let stdin = std::io::stdin();
            let console_slots = self
                .console
                .as_ref()
                .map(|c| c.poll_fds(stdin.as_fd(), &mut fds));
            let n = match nix::poll::poll(&mut fds, t) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => return Ok(None),
                Err(e) => return Err(e).context("poll"),
            };
            let ready = |i: usize| fds.get(i).and_then(|f| f.any()).unwrap_or(false);
            let signalled = ready(0);
            let exited = child.is_some() && ready(1);
            let output = self.log.is_some() && ready(log_at);
            let (typed, shown) = console_slots
                .map(|slots| slots.ready(&fds))
                .unwrap_or_default();
            drop(fds);
            if output {
                self.drain_log();
            }
            if let Some(console) = &self.console {
                if typed || shown {
                    console.pump(typed, shown);
                }
            }
            if signalled {
                let sig = self
                    .sfd
                    .read_signal()?
                    .and_then(|si| Signal::try_from(si.ssi_signo as i32).ok());
                if sig == Some(Signal::SIGWINCH) {
                    if let Some(console) = &self.console {
                        console.resize();
                    }
                    continue;
                }
                return Ok(sig);
            }
            if n == 0 || exited {
                return Ok(None);
            }
            // Only output or input: keep waiting for the rest.
        }
    }

    /// Copy the container's pending output into its log. A log that cannot
    /// be written (a full disk) costs the output, never the supervision.
    fn drain_log(&mut self) {
        if let Some(log) = &mut self.log {
            if let Err(e) = log.drain() {
                eprintln!("monitor: {e:#}");
            }
        }
    }

    /// Supervise one run of the container, begun at `started`; returns its
    /// exit code. `resumed_check`: when a resumed monitor's next health
    /// check is due.
    fn run_once(
        &mut self,
        pid: Pid,
        started: Instant,
        resumed_check: Option<Instant>,
    ) -> Result<i32> {
        let health = self.record.health.clone();
        let mut next_check = resumed_check.or_else(|| {
            health
                .as_ref()
                .map(|h| Instant::now() + Duration::from_millis(h.interval_ms))
        });
        let mut check_pid: Option<(Pid, Instant)> = None;
        let mut kill_at: Option<Instant> = None;
        let child = pidfd_open(pid);
        loop {
            let now = Instant::now();
            let deadlines = [next_check, kill_at, check_pid.map(|(_, d)| d)];
            let idle_now = quiet(check_pid.is_some(), kill_at, next_check, now);
            // About to go idle: only look at what is already pending.
            let timeout = if self.idle.is_some() && idle_now {
                Some(Duration::ZERO)
            } else {
                deadlines
                    .iter()
                    .flatten()
                    .min()
                    .map(|d| d.saturating_duration_since(now))
            };
            let sig = self.wait_signal(timeout, child.as_ref())?;
            match sig {
                Some(Signal::SIGCHLD) | None => {}
                Some(s) => {
                    // A stop request (or Ctrl-C in the foreground): pass it on, no restart.
                    self.state.stop_requested = true;
                    self.save()?;
                    // `stop` (SIGTERM) asks with the image's StopSignal.
                    let s = match (s, &self.record.stop_signal) {
                        (Signal::SIGTERM, Some(name)) => {
                            crate::state::parse_signal(name).unwrap_or(Signal::SIGTERM)
                        }
                        (s, _) => s,
                    };
                    let _ = nix::sys::signal::kill(pid, s);
                    kill_at.get_or_insert(
                        Instant::now() + Duration::from_secs(self.record.stop_timeout),
                    );
                }
            }
            if let Some(code) = reap(pid) {
                if let Some((hp, _)) = check_pid {
                    let _ = nix::sys::signal::kill(hp, Signal::SIGKILL);
                    let _ = waitpid(hp, None);
                }
                return Ok(code.unwrap_or(255));
            }
            if let Some((hp, _)) = check_pid {
                if let Some(code) = reap(hp) {
                    check_pid = None;
                    self.record_health(code)?;
                }
            }
            let now = Instant::now();
            if kill_at.is_some_and(|k| now >= k) {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                kill_at = None;
            }
            if let Some((hp, deadline)) = check_pid {
                if now >= deadline {
                    // Took longer than the interval: that is a failure.
                    let _ = nix::sys::signal::kill(hp, Signal::SIGKILL);
                }
            }
            if let (Some(h), Some(at)) = (&health, next_check) {
                if now >= at && check_pid.is_none() {
                    let interval = Duration::from_millis(h.interval_ms);
                    let target = ExecTarget {
                        pid: pid.as_raw(),
                        cgroup: self.cgroup.clone(),
                    };
                    let null = || std::process::Stdio::null();
                    match container::spawn_in(
                        &target,
                        &self.spec,
                        &["/bin/sh".into(), "-c".into(), h.cmd.clone()],
                        self.spec
                            .process()
                            .as_ref()
                            .and_then(|p| p.env().clone())
                            .as_deref()
                            .unwrap_or(&[]),
                        Some((null(), null(), null())),
                        false,
                    ) {
                        Ok(child) => {
                            check_pid = Some((Pid::from_raw(child.id() as i32), now + interval))
                        }
                        Err(e) => {
                            eprintln!("monitor: health check could not start: {e:#}");
                            self.record_health(None)?;
                        }
                    }
                    next_check = Some(now + interval);
                }
            }
            if quiet(check_pid.is_some(), kill_at, next_check, Instant::now()) {
                // Returns only if the idle executable could not be run.
                self.hand_off(pid, started, next_check);
            }
        }
    }

    /// Nothing in flight: wait in the idle executable (see [`crate::idle`]),
    /// which execs this monitor again at its next event. Returns only if
    /// that exec failed; the monitor then waits in this process from now on.
    fn hand_off(&mut self, pid: Pid, started: Instant, next_check: Option<Instant>) {
        use std::os::unix::process::CommandExt;
        let (Some(idle), Some(log)) = (&self.idle, &self.log) else {
            return;
        };
        let handoff = Handoff {
            pid: pid.as_raw(),
            log_read: log.reader().as_raw_fd(),
            log_write: log.writer().as_raw_fd(),
            log_file: log.file().as_raw_fd(),
            log: self.record.log,
            wake_at: next_check.map(crate::idle::ns_of),
            started: crate::idle::ns_of(started),
            backoff_ms: self.backoff.as_millis() as u64,
        };
        let fds = [log.reader(), log.writer(), log.file()];
        let err = match fds
            .iter()
            .try_for_each(|fd| crate::idle::set_inherited(*fd, true))
        {
            Ok(()) => std::process::Command::new(&idle.waiter)
                .args(&idle.waiter_args)
                .arg(&self.record.name)
                .arg(self.rt.paths.container(&self.record.name))
                .arg(handoff.encode())
                .arg("--")
                .args(&idle.resume)
                .exec()
                .into(),
            Err(e) => e,
        };
        for fd in fds {
            let _ = crate::idle::set_inherited(fd, false);
        }
        eprintln!(
            "monitor: idling in {} failed ({err:#}); the monitor waits itself from now on",
            idle.waiter.display()
        );
        self.idle = None;
    }

    fn record_health(&mut self, code: Option<i32>) -> Result<()> {
        let retries = self.record.health.as_ref().map_or(3, |h| h.retries.max(1));
        let h = self.state.health.get_or_insert(HealthState {
            status: Health::Starting,
            failing_streak: 0,
            last_exit: None,
            last_check: None,
        });
        h.last_exit = code;
        h.last_check = Some(crate::state::now());
        if code == Some(0) {
            h.failing_streak = 0;
            h.status = Health::Healthy;
        } else {
            h.failing_streak += 1;
            if h.failing_streak >= retries {
                h.status = Health::Unhealthy;
            }
        }
        self.save()
    }
}

/// Where a supervised container's stdin, stdout and stderr go.
pub(crate) enum Output {
    /// This process's own (a foreground `run`).
    Inherited,
    /// A detached container's rotated log.
    Log(LogSink),
    /// A pseudo-terminal wired to this process's terminal (`run -t`).
    Console(Console),
}

/// Be the background monitor of container `name` until it has exited for
/// good (per its restart policy and stop requests); returns the last exit
/// code. Stdin becomes /dev/null, stdout and stderr (inherited by the
/// container) its log. (`run` in the foreground supervises in-process, see
/// [`supervise_loaded`].)
///
/// Started by `run -d`, it reports the first start on the pipe named by
/// [`READY_FD_ENV`]. With `idle`, it waits there between events; run again
/// from it, it carries on where it left off (see [`crate::idle`]).
pub fn supervise(rt: &Runtime, name: &str, idle: Option<IdleExec>) -> Result<i32> {
    let resumed = take_resume()?;
    let ready = take_ready_fd();
    let dir = rt.paths.container(name);
    let record: ContainerRecord = read_json(&dir.join(crate::state::RECORD_FILE))?;
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), 0)?;
    let log = match &resumed {
        // SAFETY: the idle executable exec'd us with these open for us alone.
        Some(h) => unsafe {
            LogSink::adopt(
                dir.clone(),
                record.log,
                crate::idle::adopt_fd(h.log_file, libc::S_IFREG, "log file")?,
                crate::idle::adopt_fd(h.log_read, libc::S_IFIFO, "log pipe")?,
                crate::idle::adopt_fd(h.log_write, libc::S_IFIFO, "log pipe")?,
            )
        },
        None => LogSink::open(&dir, record.log, true),
    }
    .with_context(|| format!("opening the log of {name}"))?;
    let spec: Spec = read_json(&dir.join(crate::state::CONFIG_FILE))?;
    let state: ContainerState = read_json(&dir.join(crate::state::STATE_FILE)).unwrap_or_default();
    let start = Start {
        early_userns: None,
        ready,
        idle,
        resumed,
    };
    supervise_with(rt, record, spec, state, Output::Log(log), start)
}

/// The hand-off this monitor was run again with, if it was (see
/// [`crate::idle`]). Taken out of the environment, so nothing it starts
/// inherits it.
fn take_resume() -> Result<Option<Handoff>> {
    let Some(text) = std::env::var_os(crate::idle::RESUME_ENV) else {
        return Ok(None);
    };
    // Single-threaded here: the monitor has not started anything yet.
    std::env::remove_var(crate::idle::RESUME_ENV);
    let h = Handoff::decode(text.to_str().context("monitor hand-off is not UTF-8")?)?;
    // Only a container that is our child, exited or not (WNOWAIT: it stays
    // to be reaped by run_once): a stale or forged hand-off names another.
    // SAFETY: waitid fills the siginfo it is given; nothing else.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    if unsafe { libc::waitid(libc::P_PID, h.pid as libc::id_t, &mut info, flags) } != 0 {
        bail!(
            "monitor hand-off: pid {} is not this monitor's container: {}",
            h.pid,
            std::io::Error::last_os_error()
        );
    }
    Ok(Some(h))
}

/// How a monitor's supervision begins.
struct Start {
    /// The first start's namespaces, begun by a foreground `run`.
    early_userns: Option<container::PendingUserns>,
    /// Where `run -d` waits to hear how the first start went.
    ready: Option<std::fs::File>,
    idle: Option<IdleExec>,
    /// Run again from the idle executable: the container already runs.
    resumed: Option<Handoff>,
}

/// Supervise a container in this process, its records already in hand:
/// `run` in the foreground has just written them (and begun the first
/// start's namespaces, `early_userns`), and parsing the OCI config back
/// would cost a short container's start several ms in a VM. `ready`: where
/// `run -d` waits to hear how the first start went.
pub(crate) fn supervise_loaded(
    rt: &Runtime,
    record: ContainerRecord,
    spec: Spec,
    state: ContainerState,
    early_userns: Option<container::PendingUserns>,
    ready: Option<std::fs::File>,
    output: Output,
) -> Result<i32> {
    let start = Start {
        early_userns,
        ready,
        idle: None,
        resumed: None,
    };
    supervise_with(rt, record, spec, state, output, start)
}

fn supervise_with(
    rt: &Runtime,
    record: ContainerRecord,
    spec: Spec,
    mut state: ContainerState,
    output: Output,
    start: Start,
) -> Result<i32> {
    let (log, console) = match output {
        Output::Inherited => (None, None),
        Output::Log(l) => (Some(l), None),
        Output::Console(c) => (None, Some(c)),
    };
    let name = record.name.clone();
    let name = name.as_str();
    if start.resumed.is_none() {
        let me = std::process::id() as i32;
        state.monitor_pid = Some(me);
        state.monitor_start = crate::state::proc_start_time(me);
        state.boot_id = crate::state::boot_id();
        state.stop_requested = false;
        state.error = None;
        state.health = record.health.as_ref().map(|_| HealthState {
            status: Health::Starting,
            failing_streak: 0,
            last_exit: None,
            last_check: None,
        });
    }
    let mask = monitor_signals();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
    // Non-blocking: in a threaded program another thread that does not
    // block SIGCHLD can take a signal between our poll and our read (the
    // container's end is then seen on its pidfd, see wait_signal).
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("signalfd")?;
    // Only a detached monitor idles: a foreground one is its caller's process.
    let idle = start.idle.filter(|_| log.is_some() && console.is_none());
    let mut m = Monitor {
        rt,
        record,
        spec,
        state,
        sfd,
        cgroup: None,
        early_userns: start.early_userns,
        ready: start.ready,
        registered: false,
        log,
        console,
        idle,
        backoff: BACKOFF_START,
    };
    let res = supervise_inner(&mut m, start.resumed);
    // What the container wrote last.
    m.drain_log();
    if let Some(console) = &m.console {
        console.drain();
    }
    if m.cgroup.is_some() {
        if let Err(e) = rt.cgroups.remove(name) {
            eprintln!("monitor: {e:#}");
        }
    }
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
    match res {
        Ok(code) => {
            m.state.status = Status::Exited;
            m.state.exit_code = Some(code);
            m.state.finished_at = Some(crate::state::now());
            if m.record.auto_remove {
                // Its records go now; the final state is only written
                // should they stay behind.
                let t0 = std::time::Instant::now();
                if let Err(e) = rt.remove_container_files(&m.record) {
                    m.save()?;
                    return Err(e);
                }
                tracing::debug!("monitor: {} removed in {:?}", name, t0.elapsed());
            } else {
                m.save()?;
            }
            Ok(code)
        }
        Err(e) => {
            m.state.status = Status::Failed;
            let msg = format!("{e:#}");
            m.state.error = Some(msg.clone());
            m.state.finished_at = Some(crate::state::now());
            let _ = m.save();
            m.report_ready(Err(&msg));
            Err(e)
        }
    }
}

fn supervise_inner(m: &mut Monitor, mut resumed: Option<Handoff>) -> Result<i32> {
    let rt = m.rt;
    let t0 = Instant::now();
    let unified = crate::cgroup::detect(&rt.cgroups.root) == crate::cgroup::Layout::Unified;
    match (&resumed, unified) {
        (Some(h), _) => {
            // Made by this monitor before it went idle.
            m.cgroup = unified.then(|| rt.cgroups.path(&m.record.name));
            m.backoff = Duration::from_millis(h.backoff_ms);
            m.registered = m
                .record
                .registration_dir
                .as_ref()
                .is_some_and(|d| d.join(format!("{}.json", m.record.name)).exists());
        }
        (None, true) => {
            m.cgroup = Some(rt.cgroups.create(&m.record.name, &m.record.limits)?);
            tracing::debug!("monitor: cgroup made in {:?}", t0.elapsed());
        }
        (None, false) => rt.cgroups.check_supported(&m.record.limits)?,
    }
    if let (Some(net), None) = (&m.record.network, &resumed) {
        crate::net::ensure_bridge(net)?;
    }
    let mut first = resumed.is_none();
    loop {
        let (pid, started, next_check) = match resumed.take() {
            Some(h) => (
                Pid::from_raw(h.pid),
                crate::idle::instant_of(h.started),
                h.wake_at.map(crate::idle::instant_of),
            ),
            None => {
                let t0 = Instant::now();
                let pid = match m.start() {
                    Ok(pid) => {
                        tracing::debug!("monitor: {} started in {:?}", m.record.name, t0.elapsed());
                        pid
                    }
                    // The first start reports its failure to `run`; later ones are retried.
                    Err(e) if first => return Err(e),
                    Err(e) => {
                        eprintln!("monitor: restart failed: {e:#}");
                        m.state.exit_code = Some(127);
                        if !backoff_wait(m)? {
                            return Ok(127);
                        }
                        continue;
                    }
                };
                first = false;
                m.state.status = Status::Running;
                m.state.pid = Some(pid.as_raw());
                m.state.started_at = Some(crate::state::now());
                m.state.exit_code = None;
                m.save()?;
                m.report_ready(Ok(()));
                (pid, Instant::now(), None)
            }
        };
        let code = m.run_once(pid, started, next_check)?;
        tracing::debug!(
            "monitor: {} exited with {code} after {:?}",
            m.record.name,
            started.elapsed()
        );
        m.state.exit_code = Some(code);
        m.state.pid = None;
        m.state.finished_at = Some(crate::state::now());
        let again = !m.state.stop_requested
            && match m.record.restart {
                RestartPolicy::No => false,
                RestartPolicy::OnFailure => code != 0,
                RestartPolicy::Always => true,
            };
        if !again {
            return Ok(code);
        }
        if started.elapsed() >= BACKOFF_RESET_AFTER {
            m.backoff = BACKOFF_START;
        }
        if !backoff_wait(m)? {
            return Ok(code);
        }
    }
}

/// Wait before a restart; false when a stop request arrived meanwhile.
fn backoff_wait(m: &mut Monitor) -> Result<bool> {
    m.state.status = Status::Restarting;
    m.state.restarts += 1;
    m.save()?;
    let until = Instant::now() + m.backoff;
    m.backoff = (m.backoff * 2).min(BACKOFF_MAX);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(true);
        }
        match m.wait_signal(Some(left), None)? {
            // Nothing of ours is left to reap: run_once reaped the
            // container and its health check.
            Some(Signal::SIGCHLD) | None => {}
            Some(_) => {
                m.state.stop_requested = true;
                return Ok(false);
            }
        }
    }
}
