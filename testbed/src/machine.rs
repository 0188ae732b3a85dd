//! One QEMU machine booted from a user's disk image on a throwaway qcow2
//! overlay, reached over SSH (port 22 forwarded to loopback) with an
//! ephemeral key.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The most of a check's output kept (its head and tail are what matter).
const MAX_OUTPUT: usize = 1 << 20;

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    /// QEMU's name for it (`-accel`).
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// The QEMU command line every cairn machine starts from (the users' runner
/// and the project's own QEMU tests): a PC without default devices or
/// display, `memory_mib` and `cpus`, the serial console into `serial_log`,
/// and `overlay` as its virtio disk.
pub fn qemu_command(
    accel: Accel,
    memory_mib: u64,
    cpus: u32,
    serial_log: &Path,
    overlay: &Path,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", accel.name(), "-nodefaults", "-display", "none"])
        .args(["-machine", "pc"])
        .args(["-m", &memory_mib.to_string(), "-smp", &cpus.to_string()])
        .arg("-chardev")
        .arg(format!("file,id=serial0,path={}", serial_log.display()))
        .args(["-serial", "chardev:serial0"])
        // cache=writeback (QEMU's default, spelled out): the guest's flushes
        // reach the host file, so a power cut (SIGKILL) loses only what the
        // guest had not synced, as on real hardware. Never cache=unsafe here.
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=virtio,cache=writeback",
            overlay.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// What a machine is started with.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub image: PathBuf,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    /// The node config handed to first-boot provisioning (QEMU fw_cfg
    /// `opt/org.cairn/config`).
    pub node_config: PathBuf,
    /// Where the overlay, key and logs go (removed by the caller).
    pub workdir: PathBuf,
    pub network: Network,
}

/// What the machine's network reaches besides its own SSH port, which the
/// runner reaches on 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Ports of the build machine's loopback the machine reaches, as
    /// [`FORWARDED_HOST`]`:PORT` (the run's HTTP server, `--forward`).
    pub forwards: Vec<u16>,
    /// QEMU's whole user network besides: the build machine's loopback
    /// as 10.0.2.2 and whatever the build machine reaches. Off, nothing
    /// but `forwards` (QEMU's `restrict=on`): the image under test is
    /// not trusted with the build machine's services.
    pub open: bool,
    /// The program QEMU starts for each connection to a forwarded port,
    /// with the port appended: it must relay its stdin and stdout to
    /// 127.0.0.1:PORT ([`relay`]).
    pub relay: Vec<std::ffi::OsString>,
}

/// Where the machine reaches a forwarded port of the build machine: the
/// address QEMU's user network gives forwards (`guestfwd`), beside the
/// gateway 10.0.2.2 and the resolver 10.0.2.3, which it does not allow.
pub const FORWARDED_HOST: &str = "10.0.2.4";

impl Network {
    /// QEMU's `-netdev` value: SSH forwarded in, `forwards` out through a
    /// relay per connection (a `cmd:` guestfwd; a chardev one takes a
    /// single connection), restricted unless `open`.
    pub fn netdev(&self, ssh_port: u16) -> String {
        let mut v = format!("user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22");
        if !self.open {
            v.push_str(",restrict=on");
        }
        for port in &self.forwards {
            let argv: Vec<String> = self
                .relay
                .iter()
                .map(|a| shell_word(&a.to_string_lossy()))
                .chain([port.to_string()])
                .collect();
            // QEMU's option syntax: a comma in a value is written twice.
            let cmd = argv.join(" ").replace(',', ",,");
            v.push_str(&format!(",guestfwd=tcp:{FORWARDED_HOST}:{port}-cmd:{cmd}"));
        }
        v
    }
}

/// `s` single-quoted for QEMU's (GLib's) parse of a `cmd:` command line.
fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Relay stdin and stdout to 127.0.0.1:`port` until the server closes the
/// connection: what QEMU starts for each connection the machine opens to
/// a forwarded port (stdin, stdout and stderr are that connection, so
/// nothing else may be written to them).
pub fn relay(port: u16) -> Result<()> {
    use std::io::Write as _;
    use std::net::{Shutdown, TcpStream};
    let server = TcpStream::connect(("127.0.0.1", port))?;
    let mut to_server = server.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_server);
        // The machine is done sending: the server sees the end of its
        // request, and its answer still comes back.
        let _ = to_server.shutdown(Shutdown::Write);
    });
    let mut from_server = server;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = from_server.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
}

/// An SSH key pair made for one run.
#[derive(Debug, Clone)]
pub struct Key {
    pub private: PathBuf,
    pub public: String,
}

/// Make an ed25519 key pair in `dir` with openssh-client's ssh-keygen.
pub fn ephemeral_key(dir: &Path) -> Result<Key> {
    let private = dir.join("id_ed25519");
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "cairn-host-test",
            "-f",
        ])
        .arg(&private)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (Debian package openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let public = std::fs::read_to_string(private.with_extension("pub"))?
        .trim()
        .to_string();
    Ok(Key { private, public })
}

/// Ends `cmd`'s process when the runner dies, however it dies (a killed
/// runner must not leave a machine or a server running).
pub fn die_with_runner(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// What every run's directory is named after: `cairn-host-test-PID-…`.
const WORK_DIR_PREFIX: &str = "cairn-host-test-";
/// In a run's directory, locked (flock) while the run lives: the lock goes
/// with the run however it ends, in any PID namespace.
const WORK_DIR_LOCK: &str = ".run.lock";

/// A run's directory (overlay, key, console, logs): 0700, as the overlay
/// holds the machine's disk with its host keys; removed when dropped.
pub struct WorkDir {
    dir: tempfile::TempDir,
    /// Held for the run's life (see [`WORK_DIR_LOCK`]).
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl WorkDir {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A new run's directory. Directories that killed runs left behind (a
/// SIGKILL skips the cleanup; each holds a disk overlay of gigabytes) are
/// removed first.
pub fn work_dir() -> Result<WorkDir> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = std::env::temp_dir();
    remove_abandoned_work_dirs(&tmp);
    let dir = tempfile::Builder::new()
        .prefix(&format!("{WORK_DIR_PREFIX}{}-", std::process::id()))
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&tmp)
        .context("creating a work directory")?;
    let file = std::fs::File::create(dir.path().join(WORK_DIR_LOCK))
        .context("creating the work directory's lock")?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .context("locking the work directory")?;
    Ok(WorkDir { dir, _lock: lock })
}

/// Remove the work directories in `tmp` of runs that have ended: real
/// directories (a symlink is not followed) this user owns whose lock file
/// nobody holds. A directory without its lock file (a run that is just
/// starting) is left alone.
fn remove_abandoned_work_dirs(tmp: &Path) {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(WORK_DIR_PREFIX))
        {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != me {
            continue;
        }
        let Ok(lock) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(entry.path().join(WORK_DIR_LOCK))
        else {
            continue;
        };
        // Held until the directory is gone, so no run takes it meanwhile.
        if let Ok(_held) =
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A running (or powered-off) machine. Dropping it kills QEMU.
pub struct Machine {
    config: MachineConfig,
    overlay: PathBuf,
    pub serial_log: PathBuf,
    ssh_port: u16,
    known_hosts: PathBuf,
    key: PathBuf,
    qemu: Option<Child>,
    powered_on: Instant,
    /// When the console first showed a login prompt (getty at multi-user),
    /// from power-on: a bare boot's time, seen in the same run.
    pub console_login_at: Option<Duration>,
}

/// What a command in the machine did.
#[derive(Debug)]
pub struct Ran {
    /// The exit status (ssh's own failures are 255); None when killed by
    /// the local deadline (or by a signal).
    pub status: Option<i32>,
    /// Its standard output, then its standard error.
    pub output: String,
    /// Its standard output alone.
    pub stdout: String,
    pub elapsed: Duration,
}

impl Machine {
    /// Make the overlay and start QEMU.
    pub fn start(config: MachineConfig, key: &Key) -> Result<Machine> {
        let overlay = config.workdir.join("overlay.qcow2");
        make_overlay(&config.image, &overlay)?;
        let mut m = Machine {
            serial_log: config.workdir.join("serial.log"),
            known_hosts: config.workdir.join("known_hosts"),
            key: key.private.clone(),
            ssh_port: free_port()?,
            overlay,
            config,
            qemu: None,
            powered_on: Instant::now(),
            console_login_at: None,
        };
        m.power_on()?;
        Ok(m)
    }

    fn power_on(&mut self) -> Result<()> {
        let c = &self.config;
        let stderr = std::fs::File::create(c.workdir.join("qemu.stderr"))?;
        let mut cmd = qemu_command(
            c.accel,
            c.memory_mib,
            c.cpus,
            &self.serial_log,
            &self.overlay,
        );
        let child = die_with_runner(&mut cmd)
            .arg("-netdev")
            .arg(c.network.netdev(self.ssh_port))
            .args(["-device", "virtio-net-pci,netdev=net0"])
            .arg("-fw_cfg")
            .arg(format!(
                "name=opt/org.cairn/config,file={}",
                c.node_config.display()
            ))
            .stderr(stderr)
            .spawn()
            .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
        self.qemu = Some(child);
        self.powered_on = Instant::now();
        self.console_login_at = None;
        Ok(())
    }

    fn watch_console(&mut self) {
        if self.console_login_at.is_some() {
            return;
        }
        let text = std::fs::read(&self.serial_log).unwrap_or_default();
        if text.windows(7).any(|w| w == b"login: ") {
            self.console_login_at = Some(self.powered_on.elapsed());
        }
    }

    /// QEMU's exit status if it has ended.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.qemu.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kill QEMU at once (a power cut).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Cut the power and switch the machine on again, on the same disk.
    /// The console so far is kept as `serial.N.log` (N = 1, 2, …); its
    /// path is returned.
    pub fn power_cut_and_restart(&mut self) -> Result<PathBuf> {
        self.kill();
        let kept = (1..)
            .map(|n| self.config.workdir.join(format!("serial.{n}.log")))
            .find(|p| !p.exists())
            .expect("an unused name");
        std::fs::rename(&self.serial_log, &kept)
            .with_context(|| format!("keeping the console in {}", kept.display()))?;
        self.power_on()?;
        Ok(kept)
    }

    /// Start `script` in the machine without waiting: its output goes to
    /// `output`. The returned ssh process ends with the command, or when
    /// the machine goes away.
    pub fn spawn(&self, script: &str, output: &Path) -> Result<Child> {
        let out = std::fs::File::create(output)
            .with_context(|| format!("creating {}", output.display()))?;
        self.ssh()
            .arg(script)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("running ssh (Debian package openssh-client)")
    }

    fn ssh(&self) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-i")
            .arg(&self.key)
            .args(["-p", &self.ssh_port.to_string()])
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            // The machine makes its host key at first boot: trusted on
            // first use, for this run only (and loopback only).
            .args(["-o", "StrictHostKeyChecking=accept-new"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"])
            .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6"])
            .arg("root@127.0.0.1")
            .stdin(Stdio::null());
        c
    }

    /// Run `script` (a shell command line) as root in the machine, with
    /// `input` as its standard input, killed after `deadline`.
    pub fn run(&self, script: &str, input: Option<&Path>, deadline: Duration) -> Result<Ran> {
        let mut cmd = self.ssh();
        cmd.arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = input {
            cmd.stdin(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?);
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .context("running ssh (Debian package openssh-client)")?;
        // Both pipes drained on threads so that neither can fill and stall.
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if started.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stdout = out.join().unwrap_or_default();
        let mut output = stdout.clone();
        output.push_str(&err.join().unwrap_or_default());
        Ok(Ran {
            status: status.and_then(|s| s.code()),
            output,
            stdout,
            elapsed: started.elapsed(),
        })
    }

    /// What a command printed (stdout, then stderr), or an error with it.
    pub fn ok(&self, script: &str) -> Result<String> {
        self.ok_stdout(script).map(|r| r.output)
    }

    /// A command that must succeed; its run, to read its stdout alone.
    pub fn ok_stdout(&self, script: &str) -> Result<Ran> {
        let r = self.run(script, None, Duration::from_secs(120))?;
        match r.status {
            Some(0) => Ok(r),
            s => bail!(
                "`{script}` in the machine failed ({s:?}): {}",
                r.output.trim()
            ),
        }
    }

    /// Wait until SSH answers, giving up after `timeout` or when QEMU ends.
    /// Returns the boot id.
    pub fn wait_for_ssh(&mut self, timeout: Duration, not_boot: Option<&str>) -> Result<String> {
        let started = Instant::now();
        loop {
            self.watch_console();
            if let Some(status) = self.exited() {
                let stderr = std::fs::read_to_string(self.config.workdir.join("qemu.stderr"))
                    .unwrap_or_default();
                bail!(
                    "QEMU ended ({status}) before the machine came up: {}\n{}",
                    stderr.trim(),
                    self.serial_tail()
                );
            }
            if let Ok(r) = self.run(
                "cat /proc/sys/kernel/random/boot_id",
                None,
                Duration::from_secs(30),
            ) {
                let id = r.output.trim().to_string();
                if r.status == Some(0) && !id.is_empty() && Some(id.as_str()) != not_boot {
                    return Ok(id);
                }
            }
            if started.elapsed() > timeout {
                bail!(
                    "{} did not come up: no SSH login within {} s (a config it refused, no network, \
                     or it does not boot; see its serial console below)\n{}",
                    self.config.image.display(),
                    timeout.as_secs(),
                    self.serial_tail()
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// The end of the serial console, for errors.
    pub fn serial_tail(&self) -> String {
        let text = std::fs::read(&self.serial_log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text[text.len().saturating_sub(4000)..]).into_owned();
        format!("--- last of {} ---\n{text}", self.serial_log.display())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}

fn drain<R: std::io::Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let Some(mut r) = r else {
            return String::new();
        };
        let mut buf = Vec::new();
        let _ = r.by_ref().take(MAX_OUTPUT as u64).read_to_end(&mut buf);
        // Keep reading (and dropping) so the writer never blocks.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// A qcow2 overlay at `overlay` over `image` (raw or qcow2), which is then
/// never written: every machine boots from one, which also survives its
/// power cuts (unlike `-snapshot`).
pub fn make_overlay(image: &Path, overlay: &Path) -> Result<()> {
    let format = image_format(image)?;
    let image = image
        .canonicalize()
        .with_context(|| format!("image {}", image.display()))?;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", &format, "-b"])
        .arg(&image)
        .arg(overlay)
        .stdin(Stdio::null())
        .output()
        .context("running qemu-img (Debian package qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img could not make an overlay of {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The format qemu-img sees in `image`: raw or qcow2, standing alone. A
/// hostile qcow2 could name a backing file or an external data file (any
/// file of this machine, `/etc/shadow` say) and hand its bytes to the guest
/// as a disk, so either is refused.
fn image_format(image: &Path) -> Result<String> {
    if !image.is_file() {
        bail!("image {} is not a file", image.display());
    }
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .context("running qemu-img (Debian package qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img cannot read {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    check_standalone(image, &info)
}

fn check_standalone(image: &Path, info: &serde_json::Value) -> Result<String> {
    let format = info["format"]
        .as_str()
        .ok_or_else(|| anyhow!("qemu-img names no format for {}", image.display()))?;
    if !matches!(format, "raw" | "qcow2") {
        bail!(
            "{}: a {format:?} image; raw or qcow2 expected (as host compose image writes them)",
            image.display()
        );
    }
    if let Some(backing) = info.get("backing-filename") {
        bail!(
            "{}: refused, it names a backing file ({backing}): give a standalone image \
             (qemu-img convert -O qcow2 IMAGE OUT)",
            image.display()
        );
    }
    if let Some(data) = info["format-specific"]["data"].get("data-file") {
        bail!(
            "{}: refused, it names an external data file ({data}): give a standalone image",
            image.display()
        );
    }
    Ok(format.to_string())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port on 127.0.0.1")?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_is_restricted_to_its_forwards_unless_open() {
        let mut n = Network {
            forwards: vec![8080, 5000],
            open: false,
            relay: vec!["/opt/a,b/host's".into(), "test".into(), "relay".into()],
        };
        assert_eq!(
            n.netdev(2222),
            "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,restrict=on,\
             guestfwd=tcp:10.0.2.4:8080-cmd:'/opt/a,,b/host'\\''s' 'test' 'relay' 8080,\
             guestfwd=tcp:10.0.2.4:5000-cmd:'/opt/a,,b/host'\\''s' 'test' 'relay' 5000"
        );
        n.open = true;
        n.forwards.clear();
        assert_eq!(
            n.netdev(2222),
            "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22"
        );
    }

    #[test]
    fn directories_of_runs_that_ended_are_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let path = |n: &str| tmp.path().join(n);
        let dir = |n: &str, lock: bool| {
            std::fs::create_dir(path(n)).unwrap();
            std::fs::write(path(n).join("overlay.qcow2"), "disk").unwrap();
            if lock {
                std::fs::write(path(n).join(WORK_DIR_LOCK), "").unwrap();
            }
        };
        dir(&format!("{WORK_DIR_PREFIX}1-ended"), true);
        dir(&format!("{WORK_DIR_PREFIX}2-starting"), false);
        dir(&format!("{WORK_DIR_PREFIX}3-running"), true);
        dir("unrelated", true);
        let running = nix::fcntl::Flock::lock(
            std::fs::File::open(path(&format!("{WORK_DIR_PREFIX}3-running/{WORK_DIR_LOCK}")))
                .unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        // A symlink with a run's name is not followed or removed.
        std::os::unix::fs::symlink(path("unrelated"), path(&format!("{WORK_DIR_PREFIX}4-link")))
            .unwrap();
        remove_abandoned_work_dirs(tmp.path());
        assert!(!path(&format!("{WORK_DIR_PREFIX}1-ended")).exists());
        for kept in [
            format!("{WORK_DIR_PREFIX}2-starting"),
            format!("{WORK_DIR_PREFIX}3-running"),
            "unrelated/overlay.qcow2".to_string(),
            format!("{WORK_DIR_PREFIX}4-link"),
        ] {
            assert!(path(&kept).exists(), "{kept} was removed");
        }
        drop(running);
        remove_abandoned_work_dirs(tmp.path());
        assert!(!path(&format!("{WORK_DIR_PREFIX}3-running")).exists());
    }

    #[test]
    fn a_live_runs_directory_is_kept() {
        let run = work_dir().unwrap();
        remove_abandoned_work_dirs(&std::env::temp_dir());
        assert!(run.path().join(WORK_DIR_LOCK).exists());
    }

    #[test]
    fn a_runs_directory_is_the_runners_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = work_dir().unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn images_that_reach_other_files_are_refused() {
        let image = Path::new("disk.qcow2");
        let plain: serde_json::Value =
            serde_json::from_str(r#"{"format": "qcow2", "format-specific": {"data": {}}}"#)
                .unwrap();
        assert_eq!(check_standalone(image, &plain).unwrap(), "qcow2");
        for (info, says) in [
            (
                r#"{"format": "qcow2", "backing-filename": "/etc/shadow"}"#,
                "backing file",
            ),
            (
                r#"{"format": "qcow2", "format-specific": {"data": {"data-file": "/etc/shadow"}}}"#,
                "data file",
            ),
            (r#"{"format": "vmdk"}"#, "raw or qcow2"),
        ] {
            let v: serde_json::Value = serde_json::from_str(info).unwrap();
            let e = format!("{:#}", check_standalone(image, &v).unwrap_err());
            assert!(e.contains(says) && e.contains("disk.qcow2"), "{e}");
        }
    }

    /// The same through the real qemu-img (scripts/setup installs
    /// qemu-utils): a qcow2 over a host file is refused, a plain one taken.
    #[test]
    fn qemu_img_sees_the_backing_file() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, vec![7u8; 1 << 20]).unwrap();
        let over = d.path().join("over.qcow2");
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&secret)
            .arg(&over)
            .status()
            .expect("qemu-img (Debian package qemu-utils) is needed by this test");
        assert!(made.success());
        let e = format!("{:#}", image_format(&over).unwrap_err());
        assert!(e.contains("backing file"), "{e}");
        assert_eq!(image_format(&secret).unwrap(), "raw");
    }
}
