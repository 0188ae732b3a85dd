//! A detached container's log: its stdout and stderr go into a pipe that
//! the monitor drains into `container.log`, rotated by size so a chatty
//! container cannot fill the node's disk: once the file would pass
//! `max_size`, it becomes `container.log.1` (`.1` becomes `.2`, …) and a
//! new one is started; `max_files` files are kept in all. The monitor's
//! own messages go straight to the current file.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::state::LogConfig;

/// The current log of a container directory.
pub const LOG_FILE: &str = "container.log";

/// `container.log` (n = 0) or its n-th rotated predecessor.
pub fn log_path(dir: &Path, n: u32) -> PathBuf {
    match n {
        0 => dir.join(LOG_FILE),
        n => dir.join(format!("{LOG_FILE}.{n}")),
    }
}

pub struct LogSink {
    dir: PathBuf,
    config: LogConfig,
    file: File,
    size: u64,
    read: OwnedFd,
    write: OwnedFd,
    /// Point this process's stdout and stderr at the current file (the
    /// monitor: its own messages belong in the log).
    own_output: bool,
}

fn open_append(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

impl LogSink {
    /// The log of container directory `dir`; with `own_output`, this
    /// process's stdout and stderr follow the current file.
    pub fn open(dir: &Path, config: LogConfig, own_output: bool) -> Result<Self> {
        let path = log_path(dir, 0);
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe2")?;
        // The monitor never blocks on it: it drains what is there.
        nix::fcntl::fcntl(
            read.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let sink = Self {
            dir: dir.to_path_buf(),
            config,
            file,
            size,
            read,
            write,
            own_output,
        };
        sink.redirect_own_output()?;
        Ok(sink)
    }

    /// The log a monitor had before an exec (see [`crate::idle`]): its
    /// current `file` and pipe, this process's stdout and stderr following
    /// the file. The descriptors become close-on-exec again.
    pub fn adopt(
        dir: PathBuf,
        config: LogConfig,
        file: OwnedFd,
        read: OwnedFd,
        write: OwnedFd,
    ) -> Result<Self> {
        for fd in [&file, &read, &write] {
            crate::idle::set_inherited(fd.as_fd(), false)?;
        }
        nix::fcntl::fcntl(
            read.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let file = File::from(file);
        let size = file.metadata()?.len();
        let sink = Self {
            dir,
            config,
            file,
            size,
            read,
            write,
            own_output: true,
        };
        sink.redirect_own_output()?;
        Ok(sink)
    }

    /// The current file, the pipe's read end and its write end, to hand
    /// over across an exec.
    pub fn into_fds(self) -> (OwnedFd, OwnedFd, OwnedFd) {
        (self.file.into(), self.read, self.write)
    }

    /// The current file (the monitor's own stdout and stderr).
    pub fn file(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The pipe's write end: the container's stdout and stderr.
    pub fn writer(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// The pipe's read end, to poll.
    pub fn reader(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Copy what the pipe holds now into the log.
    pub fn drain(&mut self) -> Result<()> {
        let mut buf = [0u8; 64 << 10];
        loop {
            match nix::unistd::read(self.read.as_raw_fd(), &mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.write(&buf[..n])?,
                Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("reading the container's output"),
            }
        }
    }

    fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let max = self.config.max_size;
            if max > 0 && self.size >= max {
                self.rotate()?;
            }
            let room = if max > 0 { max - self.size } else { u64::MAX };
            let n = data.len().min(room.min(usize::MAX as u64) as usize);
            self.file
                .write_all(&data[..n])
                .with_context(|| format!("writing {}", log_path(&self.dir, 0).display()))?;
            self.size += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        let keep = self.config.max_files.max(1);
        if keep == 1 {
            // Nothing to keep: start the one file over (it is O_APPEND).
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        for n in (1..keep - 1).rev() {
            let from = log_path(&self.dir, n);
            if from.exists() {
                std::fs::rename(&from, log_path(&self.dir, n + 1))
                    .with_context(|| format!("rotating {}", from.display()))?;
            }
        }
        std::fs::rename(log_path(&self.dir, 0), log_path(&self.dir, 1))
            .context("rotating container.log")?;
        self.file = open_append(&log_path(&self.dir, 0))?;
        self.size = 0;
        self.redirect_own_output()
    }

    fn redirect_own_output(&self) -> Result<()> {
        if self.own_output {
            for fd in [1, 2] {
                nix::unistd::dup2(self.file.as_raw_fd(), fd)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<(String, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// A sink for `dir` and the write end a container would hold.
    fn open_sink(dir: &Path, max_size: u64, max_files: u32) -> (LogSink, std::fs::File) {
        let config = LogConfig {
            max_size,
            max_files,
        };
        let sink = LogSink::open(dir, config, false).unwrap();
        let pipe = std::fs::File::from(sink.writer().try_clone_to_owned().unwrap());
        (sink, pipe)
    }

    #[test]
    fn rotates_by_size_and_keeps_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, mut pipe) = open_sink(dir.path(), 100, 3);
        pipe.write_all(&[b'a'; 100]).unwrap();
        sink.drain().unwrap();
        assert_eq!(files(dir.path()), [("container.log".into(), 100)]);
        // 250 more: the full file becomes .1, and so on; the oldest goes.
        pipe.write_all(&[b'b'; 120]).unwrap();
        sink.drain().unwrap();
        pipe.write_all(&[b'c'; 130]).unwrap();
        sink.drain().unwrap();
        assert_eq!(
            files(dir.path()),
            [
                ("container.log".into(), 50),
                ("container.log.1".into(), 100),
                ("container.log.2".into(), 100),
            ]
        );
        let read = |n| std::fs::read(log_path(dir.path(), n)).unwrap();
        assert_eq!(read(2), [b'b'; 100], "the a's are gone");
        assert_eq!(read(1), [[b'b'; 20].as_slice(), &[b'c'; 80]].concat());
        assert_eq!(read(0), [b'c'; 50]);

        // One file kept: it starts over.
        let one = tempfile::tempdir().unwrap();
        let (mut sink, mut pipe) = open_sink(one.path(), 10, 1);
        pipe.write_all(b"0123456789abc").unwrap();
        sink.drain().unwrap();
        assert_eq!(files(one.path()), [("container.log".into(), 3)]);
        assert_eq!(std::fs::read(log_path(one.path(), 0)).unwrap(), b"abc");

        // No limit.
        let free = tempfile::tempdir().unwrap();
        let (mut sink, mut pipe) = open_sink(free.path(), 0, 3);
        pipe.write_all(&[b'x'; 5000]).unwrap();
        sink.drain().unwrap();
        assert_eq!(files(free.path()), [("container.log".into(), 5000)]);
    }
}
