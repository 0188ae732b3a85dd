//! `-t`: a container (or an exec'd command) on a pseudo-terminal of its
//! own, wired to the caller's terminal. The container's side (the slave)
//! becomes its stdin, stdout, stderr and controlling terminal; this process
//! copies the caller's keystrokes to the master and the master's output to
//! the caller, with the caller's terminal in raw mode, so Ctrl-C and
//! friends reach the container's foreground processes as the characters
//! they are, and passes window size changes on (SIGWINCH).

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{bail, Context, Result};
use nix::poll::{PollFd, PollFlags};
use nix::sys::termios::{self, SetArg, Termios};

nix::ioctl_read_bad!(get_winsize, libc::TIOCGWINSZ, libc::winsize);
nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);

pub struct Console {
    master: OwnedFd,
    slave: OwnedFd,
    /// The caller's terminal settings, restored on drop.
    saved: Option<Termios>,
    /// The caller's stdin has not ended; the master still reads.
    input_open: Cell<bool>,
    output_open: Cell<bool>,
    /// Typed input the container has not taken yet. The master is
    /// non-blocking: a container that does not read (its input queue full)
    /// must not stop its output from being shown, or both sides wait on
    /// each other. While this holds bytes, the caller's input waits.
    pending: RefCell<Vec<u8>>,
}

impl Console {
    /// A new pseudo-terminal the size of the caller's (stdin) terminal, and
    /// that terminal in raw mode. Fails if stdin is not a terminal.
    pub fn open() -> Result<Self> {
        let stdin = std::io::stdin();
        if !nix::unistd::isatty(stdin.as_raw_fd()).unwrap_or(false) {
            bail!("-t needs a terminal on stdin (run it from one, or leave -t out)");
        }
        let pty = nix::pty::openpty(None, None).context("openpty")?;
        for fd in [&pty.master, &pty.slave] {
            nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )?;
        }
        nix::fcntl::fcntl(
            pty.master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let mut console = Self {
            master: pty.master,
            slave: pty.slave,
            saved: None,
            input_open: Cell::new(true),
            output_open: Cell::new(true),
            pending: RefCell::new(Vec::new()),
        };
        console.resize();
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .context("setting the terminal to raw mode")?;
        console.saved = Some(saved);
        Ok(console)
    }

    /// Copy both ways until `child` has exited; returns its status.
    pub fn attach(&self, child: &mut std::process::Child) -> Result<std::process::ExitStatus> {
        let stdin = std::io::stdin();
        loop {
            if let Some(status) = child.try_wait()? {
                self.drain();
                return Ok(status);
            }
            let mut fds = Vec::new();
            let slots = self.poll_fds(stdin.as_fd(), &mut fds);
            // The child's end is looked at every 100 ms.
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8));
            let (typed, shown) = slots.ready(&fds);
            drop(fds);
            self.pump(typed, shown);
        }
    }

    /// Add the directions still open, the caller's `stdin` and the master,
    /// to a poll set: the caller's input only when the container took what
    /// came before, the master for output and, while input waits, for room.
    pub fn poll_fds<'a>(&'a self, stdin: BorrowedFd<'a>, fds: &mut Vec<PollFd<'a>>) -> PollSlots {
        let waiting = !self.pending.borrow().is_empty();
        let mut slot = |flags: PollFlags, fd: BorrowedFd<'a>| {
            (!flags.is_empty()).then(|| {
                fds.push(PollFd::new(fd, flags));
                fds.len() - 1
            })
        };
        let mut master = PollFlags::empty();
        if self.output_open() {
            master |= PollFlags::POLLIN;
        }
        if waiting {
            master |= PollFlags::POLLOUT;
        }
        let typed = if self.input_open() && !waiting {
            PollFlags::POLLIN
        } else {
            PollFlags::empty()
        };
        PollSlots {
            typed: slot(typed, stdin),
            shown: slot(master, self.master()),
        }
    }

    /// The container's side.
    pub fn slave(&self) -> BorrowedFd<'_> {
        self.slave.as_fd()
    }

    pub fn master(&self) -> BorrowedFd<'_> {
        self.master.as_fd()
    }

    /// Give the pseudo-terminal the caller's window size.
    pub fn resize(&self) {
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: the ioctls read and write one winsize through valid
        // pointers on descriptors we hold.
        unsafe {
            if get_winsize(std::io::stdin().as_raw_fd(), &mut ws).is_ok() {
                let _ = set_winsize(self.master.as_raw_fd(), &ws);
            }
        }
    }

    pub fn input_open(&self) -> bool {
        self.input_open.get()
    }

    pub fn output_open(&self) -> bool {
        self.output_open.get()
    }

    /// Copy what is readable: the caller's input to the container, the
    /// container's output to the caller. The end of the caller's input, or
    /// an error on either side, ends that direction.
    pub fn pump(&self, input_ready: bool, output_ready: bool) {
        let mut buf = [0u8; 16 << 10];
        self.flush_input();
        if input_ready && self.pending.borrow().is_empty() {
            match nix::unistd::read(std::io::stdin().as_raw_fd(), &mut buf) {
                Ok(n @ 1..) => {
                    self.pending.borrow_mut().extend_from_slice(&buf[..n]);
                    self.flush_input();
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Ok(_) | Err(_) => self.input_open.set(false),
            }
        }
        if output_ready {
            match nix::unistd::read(self.master.as_raw_fd(), &mut buf) {
                Ok(n @ 1..) => {
                    let _ = write_all(std::io::stdout().as_fd(), &buf[..n]);
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Ok(_) | Err(_) => self.output_open.set(false),
            }
        }
    }

    /// Hand the container as much of the waiting input as it takes now.
    fn flush_input(&self) {
        let mut pending = self.pending.borrow_mut();
        while !pending.is_empty() {
            match nix::unistd::write(self.master.as_fd(), &pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(_) => {
                    // The container's side is gone: nothing more goes in.
                    pending.clear();
                    self.input_open.set(false);
                }
            }
        }
    }

    /// The container's remaining output, once it has exited.
    pub fn drain(&self) {
        let mut fds = [nix::poll::PollFd::new(
            self.master.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        while self.output_open()
            && matches!(
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
                Ok(1..)
            )
        {
            self.pump(false, true);
        }
    }
}

fn write_all(fd: BorrowedFd, mut data: &[u8]) -> nix::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where [`Console::poll_fds`] put the console's descriptors.
pub struct PollSlots {
    typed: Option<usize>,
    shown: Option<usize>,
}

impl PollSlots {
    /// Whether the caller typed something and the container showed
    /// something, as `poll` found them.
    pub fn ready(&self, fds: &[PollFd]) -> (bool, bool) {
        let ready = |slot: Option<usize>| {
            slot.and_then(|i| fds.get(i))
                .and_then(|f| f.any())
                .unwrap_or(false)
        };
        (ready(self.typed), ready(self.shown))
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// In the container's first process, before its exec: a new session whose
/// controlling terminal is its stdin (the console's slave).
pub(crate) fn take_controlling_terminal() -> nix::Result<()> {
    nix::unistd::setsid()?;
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal).
    let r = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    nix::errno::Errno::result(r).map(drop)
}
