//! A detached monitor's idle hand-off. Between events a monitor has one job,
//! copying the container's output into its log, yet the container
//! executable it runs as maps megabytes of code its start path touched.
//! So once nothing is in flight it `execve`s the small `host-monitor`
//! ([`cairn_contracts::names::monitor_executable`]), which keeps the same
//! process — pid, start time, children, signal mask, the container's
//! parent — drains the log, and execs the monitor back as soon as
//! something needs it: a signal (a stop request, SIGCHLD), the container's
//! end, or the next health check. Pending signals and the unreaped
//! container survive both execs, so the monitor sees each event as if it
//! had waited itself.
//!
//! This module is all `host-monitor` runs: it must stay small (no serde, no
//! OCI types), since what it touches is the idle monitor's memory.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::logfile::LogSink;
use crate::state::LogConfig;

/// The environment variable that hands a [`Handoff`] back to the monitor.
pub const RESUME_ENV: &str = "CAIRN_MONITOR_RESUME";

/// How often `host-monitor` tries to exec the monitor back, a second apart.
const EXEC_ATTEMPTS: u32 = 30;

/// What an idle monitor carries across the two execs. Descriptors are
/// inherited (not close-on-exec) for the exec only; times are
/// CLOCK_MONOTONIC nanoseconds, which an exec does not reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// The running container: this process's child.
    pub pid: i32,
    /// The log pipe's read end (drained), its write end (kept open across
    /// restarts) and the current log file.
    pub log_read: RawFd,
    pub log_write: RawFd,
    pub log_file: RawFd,
    pub log: LogConfig,
    /// When the next health check is due, if the container has one.
    pub wake_at: Option<u64>,
    /// When this run of the container began (a long run resets the back-off).
    pub started: u64,
    /// The back-off before the next restart.
    pub backoff_ms: u64,
}

impl Handoff {
    pub fn encode(&self) -> String {
        let wake = self.wake_at.map(|w| w.to_string()).unwrap_or_default();
        format!(
            "pid={},read={},write={},file={},max_size={},max_files={},wake={wake},started={},backoff={}",
            self.pid,
            self.log_read,
            self.log_write,
            self.log_file,
            self.log.max_size,
            self.log.max_files,
            self.started,
            self.backoff_ms
        )
    }

    /// Read back what [`encode`](Self::encode) wrote; every field once,
    /// nothing else.
    pub fn decode(text: &str) -> Result<Self> {
        let mut fields: [Option<&str>; 9] = [None; 9];
        const KEYS: [&str; 9] = [
            "pid",
            "read",
            "write",
            "file",
            "max_size",
            "max_files",
            "wake",
            "started",
            "backoff",
        ];
        for item in text.split(',') {
            let (key, value) = item
                .split_once('=')
                .with_context(|| format!("monitor hand-off: {item:?} is not KEY=VALUE"))?;
            let at = KEYS
                .iter()
                .position(|k| *k == key)
                .with_context(|| format!("monitor hand-off: unknown key {key:?}"))?;
            if fields[at].replace(value).is_some() {
                bail!("monitor hand-off: {key} given twice");
            }
        }
        fn num<T: std::str::FromStr>(key: &str, v: Option<&str>) -> Result<T> {
            v.with_context(|| format!("monitor hand-off: no {key}"))?
                .parse()
                .ok()
                .with_context(|| format!("monitor hand-off: {key} is not a number"))
        }
        let fd = |i: usize| -> Result<RawFd> {
            let fd: RawFd = num(KEYS[i], fields[i])?;
            // 0-2 are stdio: never one of ours.
            if fd <= 2 {
                bail!(
                    "monitor hand-off: {} {fd} is not a descriptor of ours",
                    KEYS[i]
                );
            }
            Ok(fd)
        };
        let pid: i32 = num("pid", fields[0])?;
        if pid <= 1 {
            bail!("monitor hand-off: pid {pid} is not a container");
        }
        Ok(Self {
            pid,
            log_read: fd(1)?,
            log_write: fd(2)?,
            log_file: fd(3)?,
            log: LogConfig {
                max_size: num("max_size", fields[4])?,
                max_files: num("max_files", fields[5])?,
            },
            wake_at: match fields[6] {
                Some("") => None,
                w => Some(num("wake", w)?),
            },
            started: num("started", fields[7])?,
            backoff_ms: num("backoff", fields[8])?,
        })
    }
}

/// Now on CLOCK_MONOTONIC (what `Instant` reads), in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: fills the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// `at` on CLOCK_MONOTONIC in nanoseconds, to hand over.
pub fn ns_of(at: std::time::Instant) -> u64 {
    let (now, now_ns) = (std::time::Instant::now(), monotonic_ns());
    match at.checked_duration_since(now) {
        Some(ahead) => now_ns.saturating_add(ahead.as_nanos() as u64),
        None => now_ns.saturating_sub(now.duration_since(at).as_nanos() as u64),
    }
}

/// The `Instant` of a handed-over time (the inverse of [`ns_of`]).
pub fn instant_of(ns: u64) -> std::time::Instant {
    let (now, now_ns) = (std::time::Instant::now(), monotonic_ns());
    if ns >= now_ns {
        now + Duration::from_nanos(ns - now_ns)
    } else {
        now.checked_sub(Duration::from_nanos(now_ns - ns))
            .unwrap_or(now)
    }
}

/// The signals a monitor handles itself; blocked, so only its signalfd
/// sees them (and they stay pending across the hand-off's execs).
pub fn monitor_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        // A console's window changed size (the foreground monitor's).
        Signal::SIGWINCH,
    ] {
        s.add(sig);
    }
    s
}

/// Take descriptor `fd` named by a hand-off if it is of the kind expected
/// (`S_IFIFO` or `S_IFREG`): a stale or forged hand-off must not make us
/// read or write something else.
///
/// # Safety
/// `fd` must be owned by nothing else in this process.
pub unsafe fn adopt_fd(fd: RawFd, kind: libc::mode_t, what: &str) -> Result<OwnedFd> {
    // SAFETY: fstat on a number; it takes no ownership.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != kind {
        bail!("monitor hand-off: descriptor {fd} is not the {what}");
    }
    // SAFETY: the caller's promise.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is inherited by an exec.
pub fn set_inherited(fd: BorrowedFd<'_>, inherited: bool) -> Result<()> {
    let flags = if inherited {
        nix::fcntl::FdFlag::empty()
    } else {
        nix::fcntl::FdFlag::FD_CLOEXEC
    };
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// `host-monitor NAME DIR HANDOFF -- MONITOR-ARGV…` (`args` from the
/// program name on): wait for the monitor's next event, keeping the log of
/// container directory DIR, then exec MONITOR-ARGV with the hand-off in
/// [`RESUME_ENV`]. Returns only if the arguments are wrong or the monitor
/// cannot be run again.
pub fn wait(args: &[OsString]) -> Result<()> {
    let [_, _name, dir, handoff, dashes, resume @ ..] = args else {
        bail!("usage: host-monitor NAME DIR HANDOFF -- MONITOR-ARGV… (run by a container's monitor, not by hand)");
    };
    if dashes != "--" || resume.is_empty() {
        bail!("host-monitor: no monitor command after --");
    }
    let h = Handoff::decode(
        handoff
            .to_str()
            .context("host-monitor: hand-off is not UTF-8")?,
    )?;
    // SAFETY: the monitor exec'd us with these open for us alone.
    let (read, write, file) = unsafe {
        (
            adopt_fd(h.log_read, libc::S_IFIFO, "log pipe")?,
            adopt_fd(h.log_write, libc::S_IFIFO, "log pipe")?,
            adopt_fd(h.log_file, libc::S_IFREG, "log file")?,
        )
    };
    let mut log = LogSink::adopt(PathBuf::from(dir), h.log, file, read, write)?;
    let sfd = SignalFd::with_flags(
        &monitor_signals(),
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )
    .context("signalfd")?;
    let child = crate::monitor::pidfd_open(nix::unistd::Pid::from_raw(h.pid));
    loop {
        let timeout = match h.wake_at {
            Some(at) => {
                let left = Duration::from_nanos(at.saturating_sub(monotonic_ns()));
                // Rounded up: waking a moment early would only bounce.
                let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = vec![
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(log.reader(), PollFlags::POLLIN),
        ];
        if let Some(c) = &child {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
        }
        let n = match nix::poll::poll(&mut fds, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("host-monitor: poll"),
        };
        let ready = |i: usize| fds.get(i).and_then(|f| f.any()).unwrap_or(false);
        let (event, output) = (n == 0 || ready(0) || ready(2), ready(1));
        drop(fds);
        if output {
            if let Err(e) = log.drain() {
                // As the monitor does: a full disk costs output, not supervision.
                eprintln!("monitor: {e:#}");
            }
        }
        if event {
            break;
        }
    }
    // Rotation may have opened a new file: hand back the current one.
    let (file, read, write) = log.into_fds();
    for fd in [&file, &read, &write] {
        set_inherited(fd.as_fd(), true)?;
    }
    let back = Handoff {
        log_read: read.as_raw_fd(),
        log_write: write.as_raw_fd(),
        log_file: file.as_raw_fd(),
        ..h
    };
    // A failed exec (a passing ENOMEM, say) is tried again for a while:
    // giving up ends this process, and the container with it (PDEATHSIG).
    let program = std::path::Path::new(&resume[0]);
    let mut attempt = 1;
    loop {
        let err = std::process::Command::new(program)
            .args(&resume[1..])
            .env(RESUME_ENV, back.encode())
            .exec();
        if attempt == EXEC_ATTEMPTS {
            bail!(
                "host-monitor: running the monitor again ({}): {err}; gave up after {attempt} tries",
                program.display()
            );
        }
        eprintln!(
            "monitor: running the monitor again ({}): {err}; trying again in a second",
            program.display()
        );
        std::thread::sleep(Duration::from_secs(1));
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Handoff {
        Handoff {
            pid: 4242,
            log_read: 5,
            log_write: 6,
            log_file: 7,
            log: LogConfig {
                max_size: 10 << 20,
                max_files: 3,
            },
            wake_at: Some(123_456_789_000),
            started: 42,
            backoff_ms: 800,
        }
    }

    #[test]
    fn a_handoff_reads_back_as_written() {
        let h = sample();
        assert_eq!(Handoff::decode(&h.encode()).unwrap(), h);
        let no_check = Handoff {
            wake_at: None,
            ..sample()
        };
        assert_eq!(Handoff::decode(&no_check.encode()).unwrap(), no_check);
    }

    #[test]
    fn a_time_survives_the_handoff() {
        let now = std::time::Instant::now();
        for at in [
            now + Duration::from_secs(30),
            now.checked_sub(Duration::from_millis(1500)).unwrap_or(now),
        ] {
            let back = instant_of(ns_of(at));
            let diff = if back > at { back - at } else { at - back };
            assert!(diff < Duration::from_millis(50), "{diff:?}");
        }
    }

    #[test]
    fn a_bad_handoff_is_refused() {
        let good = sample().encode();
        for (bad, why) in [
            (good.replace("pid=4242", "pid=1"), "pid 1"),
            (good.replace("read=5", "read=0"), "stdin as the log pipe"),
            (good.replace("file=7", "file=x"), "not a number"),
            (format!("{good},pid=4242"), "a key twice"),
            (format!("{good},extra=1"), "an unknown key"),
            (good.replace(",backoff=800", ""), "a missing key"),
            (good.replace("max_files=3", "max_files"), "no value"),
            (String::new(), "nothing"),
        ] {
            assert!(Handoff::decode(&bad).is_err(), "{why}: {bad}");
        }
    }

    #[test]
    fn adopting_refuses_a_descriptor_of_the_wrong_kind() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        // SAFETY: refused before it is owned (the kind does not match).
        assert!(unsafe { adopt_fd(fd, libc::S_IFIFO, "log pipe") }.is_err());
        drop(f);
    }
}
