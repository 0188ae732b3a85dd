//! One QEMU virtual machine booted from a disk image, and the control channel
//! into it.
//!
//! - TCG only (`-accel tcg`): KVM on the build machines hangs guests.
//! - The image is never written: every machine boots from a qcow2 overlay in
//!   its own work directory, which survives power cuts (unlike `-snapshot`).
//! - User-mode networking: the guest reaches the host's loopback at 10.0.2.2.
//! - Control channel: a virtio-serial port (`org.cairn.test.control`) on which
//!   the test image's `cairn-test-control.service` runs a root shell. Kernel
//!   and boot messages go to the serial console, never to this port, and every
//!   command's output is framed by sentinels carrying a fresh nonce.
//! - Every QEMU run writes its own serial log; all of them are printed when
//!   the test panics while the machine is alive.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Name of the virtio-serial port the guest's control shell listens on.
pub const CONTROL_PORT: &str = "org.cairn.test.control";

/// How long a boot may take under TCG until the control shell answers. A
/// boot takes well under a minute of wall time on the build machine; the rest
/// is headroom for a loaded CI machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Default limit for one command in the guest.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// How to start the machine.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Disk image (qcow2 or raw); only ever read.
    pub image: PathBuf,
    /// Work directory: overlay, sockets, serial logs. Created; emptied first.
    pub workdir: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    /// More QEMU arguments, e.g. a second `-drive` with an update to bring in.
    pub extra_args: Vec<String>,
    /// Appended to the user-mode netdev, e.g. `,hostfwd=tcp:127.0.0.1:2222-:22`.
    pub net_options: String,
}

impl VmConfig {
    pub fn new(image: &Path, workdir: &Path) -> VmConfig {
        VmConfig {
            image: image.to_owned(),
            workdir: workdir.to_owned(),
            memory_mib: 1536,
            cpus: 2,
            extra_args: Vec::new(),
            net_options: String::new(),
        }
    }
}

/// Result of one command run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub status: i32,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit status {}\n--- stdout\n{}--- stderr\n{}---",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A running (or powered-off) virtual machine.
pub struct Vm {
    config: VmConfig,
    overlay: PathBuf,
    qemu: Option<Child>,
    control: Option<UnixStream>,
    /// Bytes read from the control port and not yet consumed.
    pending: Vec<u8>,
    /// Serial log of every QEMU run, in order.
    logs: Vec<PathBuf>,
    /// Everything read from the control port (appended), for failure reports.
    transcript: PathBuf,
    boot_id: Option<String>,
    started: Instant,
}

static NONCE: AtomicU64 = AtomicU64::new(0);

fn nonce() -> String {
    let n = NONCE.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:08x}{n}", std::process::id(), t)
}

/// `qemu-system-x86_64`, or a loud error saying how to get it.
pub fn qemu_binary() -> Result<PathBuf> {
    let name = "qemu-system-x86_64";
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} is not installed: the QEMU boot tests cannot run. Install the Debian package qemu-system-x86 (scripts/setup does)")
}

impl Vm {
    /// Create the overlay and start QEMU; does not wait for the guest.
    pub fn start(config: VmConfig) -> Result<Vm> {
        // Fail loudly before doing anything else when QEMU is missing.
        qemu_binary()?;
        let _ = std::fs::remove_dir_all(&config.workdir);
        std::fs::create_dir_all(&config.workdir)
            .with_context(|| format!("creating {}", config.workdir.display()))?;
        let overlay = config.workdir.join("overlay.qcow2");
        cairn_testbed::machine::make_overlay(&config.image, &overlay)?;
        let mut vm = Vm {
            transcript: config.workdir.join("control.log"),
            config,
            overlay,
            qemu: None,
            control: None,
            pending: Vec::new(),
            logs: Vec::new(),
            boot_id: None,
            started: Instant::now(),
        };
        vm.power_on()?;
        Ok(vm)
    }

    /// Start a QEMU process on the overlay (first start, or after a power cut).
    fn power_on(&mut self) -> Result<()> {
        // Loudly, when it is missing.
        qemu_binary()?;
        let run = self.logs.len();
        let log = self.config.workdir.join(format!("serial-{run}.log"));
        let socket = self.config.workdir.join(format!("control-{run}.sock"));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("listening on {}", socket.display()))?;
        listener.set_nonblocking(true)?;
        let stderr_path = self.config.workdir.join(format!("qemu-{run}.stderr"));
        let stderr = std::fs::File::create(&stderr_path)?;
        let mut cmd = cairn_testbed::machine::qemu_command(
            cairn_testbed::Accel::Tcg,
            self.config.memory_mib.into(),
            self.config.cpus,
            &log,
            &self.overlay,
        );
        cmd.arg("-netdev")
            .arg(format!("user,id=net0{}", self.config.net_options))
            .args(["-device", "virtio-net-pci,netdev=net0"])
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .arg("-chardev")
            .arg(format!("socket,id=control,path={}", socket.display()))
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=vser0.0,chardev=control,name={CONTROL_PORT}"
            ))
            .args(&self.config.extra_args)
            .stderr(stderr);
        let child = cmd.spawn().context("starting qemu-system-x86_64")?;
        self.logs.push(log);
        self.qemu = Some(child);
        self.started = Instant::now();
        self.pending.clear();
        self.boot_id = None;

        // QEMU connects to the socket while it initialises its devices.
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.check_alive()?;
                    if Instant::now() > deadline {
                        bail!("QEMU did not connect to the control socket within 60 s");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).context("accepting QEMU's control connection"),
            }
        };
        stream.set_nonblocking(false)?;
        self.control = Some(stream);
        let _ = std::fs::remove_file(&socket);
        Ok(())
    }

    /// Error (with QEMU's stderr) if the QEMU process has exited.
    fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.qemu.as_mut() else {
            bail!("the machine is powered off");
        };
        if let Some(status) = child.try_wait()? {
            self.qemu = None;
            let run = self.logs.len().saturating_sub(1);
            let stderr =
                std::fs::read_to_string(self.config.workdir.join(format!("qemu-{run}.stderr")))
                    .unwrap_or_default();
            bail!("QEMU exited ({status}): {}", stderr.trim());
        }
        Ok(())
    }

    /// Read more bytes from the control port into `pending`, waiting at most
    /// until `deadline`. Returns false on timeout.
    fn fill(&mut self, deadline: Instant) -> Result<bool> {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let wait = (deadline - now).min(Duration::from_secs(1));
        let stream = self.control.as_mut().context("no control connection")?;
        stream.set_read_timeout(Some(wait))?;
        let mut buf = [0u8; 8192];
        match stream.read(&mut buf) {
            Ok(0) => {
                self.check_alive()?;
                bail!("QEMU closed the control connection");
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                let mut t = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.transcript)?;
                t.write_all(&buf[..n])?;
                Ok(true)
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                self.check_alive()?;
                Ok(true)
            }
            Err(e) => Err(e).context("reading the control port"),
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stream = self.control.as_mut().context("no control connection")?;
        stream
            .write_all(line.as_bytes())
            .and_then(|_| stream.write_all(b"\n"))
            .context("writing to the control port")
    }

    /// Wait until the guest's control shell announces itself after a boot;
    /// returns the guest's boot id.
    pub fn wait_ready(&mut self) -> Result<String> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let marker = b"cairn-control-ready ";
        loop {
            if let Some(pos) = find(&self.pending, marker) {
                let rest = &self.pending[pos + marker.len()..];
                if let Some(eol) = rest.iter().position(|&b| b == b'\n') {
                    let id = String::from_utf8_lossy(&rest[..eol]).trim().to_string();
                    self.pending.drain(..pos + marker.len() + eol + 1);
                    self.boot_id = Some(id.clone());
                    return Ok(id);
                }
            }
            if !self.fill(deadline)? {
                bail!(
                    "the guest's control shell did not come up within {} s of QEMU starting",
                    BOOT_TIMEOUT.as_secs()
                );
            }
        }
    }

    /// Boot id of the current boot (after `wait_ready`).
    pub fn boot_id(&self) -> Option<&str> {
        self.boot_id.as_deref()
    }

    /// Wall time since this QEMU process was started.
    pub fn since_power_on(&self) -> Duration {
        self.started.elapsed()
    }

    /// Run a shell command in the guest as root; stdin is /dev/null.
    pub fn run(&mut self, command: &str) -> Result<Output> {
        self.run_timeout(command, COMMAND_TIMEOUT)
    }

    pub fn run_timeout(&mut self, command: &str, timeout: Duration) -> Result<Output> {
        let n = nonce();
        let encoded = base64_encode(command.as_bytes());
        // The command travels base64-encoded, so nothing in it can break the
        // framing. Its stdout and stderr go to files first, so the frame is
        // printed in one piece after it finished, and the sentinels are only
        // ever printed by printf with the nonce as an argument.
        let line = format!(
            "( eval \"$(printf %s '{encoded}' | base64 -d)\" ) </dev/null \
             >/run/cairn-test-control.out 2>/run/cairn-test-control.err; rc=$?; \
             printf '\\n%s-%s\\n' BEGIN {n}; cat /run/cairn-test-control.out; \
             printf '\\n%s-%s\\n' STDERR {n}; cat /run/cairn-test-control.err; \
             printf '\\n%s-%s %d\\n' END {n} \"$rc\""
        );
        self.send(&line)?;
        let deadline = Instant::now() + timeout;
        let begin = format!("\nBEGIN-{n}\n").into_bytes();
        let mid = format!("\nSTDERR-{n}\n").into_bytes();
        let end = format!("\nEND-{n} ").into_bytes();
        loop {
            if let Some(out) = parse_framed(&self.pending, &begin, &mid, &end) {
                let (output, consumed) = out?;
                self.pending.drain(..consumed);
                return Ok(output);
            }
            if !self.fill(deadline)? {
                bail!(
                    "command did not finish within {} s in the guest: {command}",
                    timeout.as_secs()
                );
            }
        }
    }

    /// Run a command that must succeed; returns its stdout.
    pub fn ok(&mut self, command: &str) -> Result<String> {
        let out = self.run(command)?;
        if !out.success() {
            bail!("guest command failed: {command}\n{out}");
        }
        Ok(out.stdout)
    }

    /// Wait for the boot to finish (`systemctl is-system-running --wait`):
    /// returns systemd's verdict (`running`, or `degraded` with failed units).
    pub fn wait_booted(&mut self) -> Result<String> {
        let out = self.run_timeout("systemctl is-system-running --wait", BOOT_TIMEOUT)?;
        Ok(out.stdout.trim().to_string())
    }

    /// `systemctl reboot` and wait for the control shell of the next boot.
    /// Returns the new boot id.
    pub fn reboot(&mut self) -> Result<String> {
        let old = self.boot_id.clone();
        self.pending.clear();
        self.send("systemctl reboot")?;
        let id = self.wait_ready()?;
        if Some(&id) == old.as_ref() {
            bail!("the guest announced the old boot id {id} after a reboot");
        }
        Ok(id)
    }

    /// Kill QEMU without warning (a power cut) and start it again on the same
    /// disk; returns the boot id of the new boot.
    pub fn power_cut_and_restart(&mut self) -> Result<String> {
        self.power_off();
        self.power_on()?;
        self.wait_ready()
    }

    /// Kill QEMU; the disk keeps whatever reached it.
    pub fn power_off(&mut self) {
        self.control = None;
        if let Some(mut child) = self.qemu.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Serial logs of every QEMU run so far.
    pub fn serial_logs(&self) -> &[PathBuf] {
        &self.logs
    }

    /// The last `lines` lines of the current QEMU run's serial console.
    pub fn serial_tail(&self, lines: usize) -> String {
        let body = self
            .logs
            .last()
            .and_then(|log| std::fs::read(log).ok())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Everything the serial console of every run printed, with headers.
    pub fn serial_text(&self) -> String {
        let mut text = String::new();
        for (i, log) in self.logs.iter().enumerate() {
            let body = std::fs::read(log).unwrap_or_default();
            text.push_str(&format!(
                "===== serial console, QEMU run {i} ({}) =====\n",
                log.display()
            ));
            text.push_str(&String::from_utf8_lossy(&body));
            text.push('\n');
        }
        text
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.power_off();
        if std::thread::panicking() {
            // The serial console comes last: where a log is cut to its tail
            // (CI), the tail should show where the guest stopped.
            let transcript = std::fs::read(&self.transcript).unwrap_or_default();
            eprintln!(
                "===== control channel transcript ({}) =====\n{}",
                self.transcript.display(),
                String::from_utf8_lossy(&transcript)
            );
            eprintln!("{}", self.serial_text());
        }
        // The overlay can be large; the logs stay for inspection.
        let _ = std::fs::remove_file(&self.overlay);
    }
}

/// `qcow2` or `raw`, as qemu-img sees the file.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parse one framed reply: `\nBEGIN-n\n<stdout>\nSTDERR-n\n<stderr>\nEND-n <rc>\n`.
/// Returns None until the whole frame has arrived, else the output and how
/// many bytes of `buf` it used (everything before it is stale and dropped).
fn parse_framed(
    buf: &[u8],
    begin: &[u8],
    mid: &[u8],
    end: &[u8],
) -> Option<Result<(Output, usize)>> {
    let b = find(buf, begin)?;
    let after_begin = b + begin.len();
    let m = after_begin + find(&buf[after_begin..], mid)?;
    let after_mid = m + mid.len();
    let e = after_mid + find(&buf[after_mid..], end)?;
    let after_end = e + end.len();
    let eol = after_end + buf[after_end..].iter().position(|&c| c == b'\n')?;
    let status = String::from_utf8_lossy(&buf[after_end..eol])
        .trim()
        .to_string();
    let status = match status.parse::<i32>() {
        Ok(s) => s,
        Err(_) => {
            return Some(Err(anyhow!(
                "bad exit status {status:?} on the control port"
            )))
        }
    };
    let text = |r: &[u8]| String::from_utf8_lossy(r).into_owned();
    Some(Ok((
        Output {
            stdout: text(&buf[after_begin..m]),
            stderr: text(&buf[after_mid..e]),
            status,
        },
        eol + 1,
    )))
}

fn base64_encode(data: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), enc, "{plain:?}");
        }
    }

    fn frame(n: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        (
            format!("\nBEGIN-{n}\n").into_bytes(),
            format!("\nSTDERR-{n}\n").into_bytes(),
            format!("\nEND-{n} ").into_bytes(),
        )
    }

    #[test]
    fn framed_reply_ignores_noise_and_keeps_exact_stdout() {
        let (b, m, e) = frame("42");
        let buf = b"stale junk\ncairn-control-ready x\n\nBEGIN-42\nno newline at end\nSTDERR-42\noops\n\nEND-42 3\nnext";
        let (out, used) = parse_framed(buf, &b, &m, &e).unwrap().unwrap();
        assert_eq!(out.stdout, "no newline at end");
        assert_eq!(out.stderr, "oops\n");
        assert_eq!(out.status, 3);
        assert_eq!(&buf[used..], b"next");
    }

    #[test]
    fn framed_reply_waits_for_the_whole_frame() {
        let (b, m, e) = frame("7");
        assert!(parse_framed(b"\nBEGIN-7\nhello\n", &b, &m, &e).is_none());
        assert!(parse_framed(b"\nBEGIN-7\nhi\n\nSTDERR-7\n\nEND-7 0", &b, &m, &e).is_none());
        // Another command's frame does not count.
        assert!(parse_framed(b"\nBEGIN-8\n\nSTDERR-8\n\nEND-8 0\n", &b, &m, &e).is_none());
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(), nonce());
    }
}
