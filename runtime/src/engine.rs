//! The operations behind `host app …`: images, run, ps, stop, rm, logs,
//! exec, inspect. State lives under one root directory.

use std::io::{Read, Seek, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::cgroup::{self, Limits};
use crate::context::Runtime;
use crate::image::{self, ImageInfo};
use crate::net::Allocator;
use crate::spec::{self, Volume};
use crate::state::{
    self, read_json, write_json, ContainerRecord, ContainerState, HealthConfig, RestartPolicy,
    Status,
};

/// Everything `host app run` takes, typed: `host` parses what users type
/// (with error messages naming its flags); this library takes values.
/// The image of a `run` is not checked out: the runtime reads images only
/// from their checkouts (see [`Runtime::run`]), so the caller has the image
/// store check it out and runs again. Returned before anything is made.
#[derive(Debug)]
pub struct NotCheckedOut {
    pub reference: String,
}

impl std::fmt::Display for NotCheckedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image {} is not checked out (import it, or check it out through the image store)",
            self.reference
        )
    }
}

impl std::error::Error for NotCheckedOut {}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub image: String,
    pub name: Option<String>,
    pub command: Vec<String>,
    /// KEY=VALUE, over the image's environment.
    pub env: Vec<String>,
    pub volumes: Vec<Volume>,
    pub limits: Limits,
    pub ip: Option<Ipv4Addr>,
    /// No network namespace wiring (loopback only).
    pub no_network: bool,
    pub restart: RestartPolicy,
    pub health: Option<HealthCheck>,
    pub detach: bool,
    pub auto_remove: bool,
    /// Seconds between the stop signal and SIGKILL.
    pub stop_timeout: u64,
    /// Rotation of a detached container's log.
    pub log: crate::state::LogConfig,
    /// `-t`: run in the foreground on a pseudo-terminal of its own, wired
    /// to this process's terminal.
    pub tty: bool,
    /// Run with the host's uids and gids (no user namespace): root in the
    /// container is root on the host. Only for images that need it.
    pub userns_host: bool,
    /// Services this container is an instance of while it runs and passes
    /// its health check (needs a network and a DNS-safe name).
    pub services: Vec<cairn_contracts::services::ServicePort>,
    /// Where its monitor publishes it (default: the node's
    /// [`cairn_contracts::services::REGISTRATION_DIR`]).
    pub registration_dir: Option<PathBuf>,
    /// The one resolver of the container's /etc/resolv.conf (the fleet
    /// network's DNS, which forwards what is not its own); None: the
    /// node's resolvers.
    pub dns: Option<Ipv4Addr>,
}

/// A container's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Run with `/bin/sh -c` inside the container.
    pub cmd: String,
    /// Time between checks, at least [`MIN_HEALTH_INTERVAL`].
    pub interval: Duration,
    /// Consecutive failures before the container counts as unhealthy
    /// (0 counts as 1).
    pub retries: u32,
}

/// Checks more often than this would mostly measure their own cost.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub enum RunOutcome {
    Detached { name: String, ip: Option<Ipv4Addr> },
    Exited { name: String, code: i32 },
}

/// One line of `ps`.
#[derive(Debug, Clone, Serialize)]
pub struct PsEntry {
    pub name: String,
    pub id: String,
    pub image: String,
    pub status: Status,
    pub health: Option<state::Health>,
    pub ip: Option<Ipv4Addr>,
    pub exit_code: Option<i32>,
    pub restarts: u32,
    pub created: String,
}

/// Removes what a failed `run` created, unless disarmed.
struct Undo<'a> {
    rt: &'a Runtime,
    record: Option<ContainerRecord>,
    dir: Option<PathBuf>,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Some(r) = &self.record {
            let _ = self.rt.remove_container_files(r);
        } else if let Some(d) = &self.dir {
            let _ = state::remove_record_dir(d);
        }
    }
}

pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !ok {
        bail!("container name {name:?}: 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit");
    }
    Ok(())
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    let mut filled = 0;
    while filled < bytes {
        // Names and ids need to be unique, not secret: GRND_INSECURE never
        // blocks, as /dev/urandom did not, even before the kernel's
        // generator is seeded early at boot (when baked apps start).
        let flags = libc::GRND_INSECURE;
        // SAFETY: writes at most the rest of `buf`, which we own.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), bytes - filled, flags) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("getrandom");
        }
        filled += n as usize;
    }
    Ok(hex::encode(buf))
}

impl Runtime {
    /// The image and its checkout, read from the checkout's files (no
    /// libostree: loading it is most of a short container's start). An
    /// image that is not checked out yet is a [`NotCheckedOut`] error:
    /// the image store (`cairn_oci::store::Store::checkout`) makes it.
    fn image_and_checkout(&self, reference: &str) -> Result<(ImageInfo, PathBuf)> {
        image::resolve_baked(&self.baked_apps, reference)
            .or_else(|| {
                image::resolve_checked_out(&self.paths.repo(), &self.paths.checkouts(), reference)
            })
            .ok_or_else(|| {
                NotCheckedOut {
                    reference: reference.to_string(),
                }
                .into()
            })
    }

    /// The image commits containers use (stopped ones included): the image
    /// store keeps their checkouts and refuses to remove their images.
    pub fn images_in_use(&self) -> Result<Vec<image::InUse>> {
        Ok(self
            .records()?
            .into_iter()
            .map(|r| image::InUse {
                container: r.name,
                commit: r.image_commit,
            })
            .collect())
    }

    // ---- containers ---------------------------------------------------

    fn records(&self) -> Result<Vec<ContainerRecord>> {
        let dir = self.paths.containers();
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        for e in rd {
            let p = e?.path().join(state::RECORD_FILE);
            if p.exists() {
                out.push(read_json(&p)?);
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created));
        Ok(out)
    }

    pub fn record(&self, name: &str) -> Result<ContainerRecord> {
        check_name(name)?;
        let p = self.paths.container(name).join(state::RECORD_FILE);
        if !p.exists() {
            bail!("no container named {name}");
        }
        read_json(&p)
    }

    pub fn state(&self, name: &str) -> Result<ContainerState> {
        Ok(read_json(&self.paths.container(name).join(state::STATE_FILE)).unwrap_or_default())
    }

    /// Create a container and start it: in the foreground (returns its exit
    /// code) or under a detached monitor.
    pub fn run(&self, opts: &RunOptions) -> Result<RunOutcome> {
        self.run_image(opts, None, None)
    }

    /// [`Runtime::run`] of an image the caller has resolved and checked out
    /// (the image store's `checkout`; `None`: find it from `opts.image`).
    /// `begun`: the container's namespaces, begun by a caller that expected
    /// a foreground run with a user namespace before it had parsed its
    /// command line (they take half a ms); dropped if it guessed wrong.
    pub fn run_image(
        &self,
        opts: &RunOptions,
        image: Option<(ImageInfo, PathBuf)>,
        begun: Option<crate::container::PendingUserns>,
    ) -> Result<RunOutcome> {
        let t0 = Instant::now();
        if !nix::unistd::geteuid().is_root() {
            bail!("running containers needs root (namespaces, mounts, netlink): run it as root");
        }
        if opts.tty && opts.detach {
            bail!("-t runs a container in the foreground; a detached one's output is its log (host app logs)");
        }
        if opts.tty && !nix::unistd::isatty(0).unwrap_or(false) {
            bail!("-t needs a terminal on stdin (run it from one, or leave -t out)");
        }
        let name = match &opts.name {
            Some(n) => n.clone(),
            None => format!("c-{}", random_hex(4)?),
        };
        check_name(&name)?;
        let limits = opts.limits.clone();
        limits.validate()?;
        self.cgroups.check_supported(&limits)?;
        let volumes = &opts.volumes;
        for v in volumes {
            // Checked again here: the source may have gone since it was named.
            if !v.source.exists() {
                bail!(
                    "volume {}:{}: {} does not exist on the host",
                    v.source.display(),
                    v.destination,
                    v.source.display()
                );
            }
        }
        let health = match &opts.health {
            Some(h) => {
                if h.interval < MIN_HEALTH_INTERVAL {
                    bail!("the health check interval must be at least {MIN_HEALTH_INTERVAL:?}");
                }
                Some(HealthConfig {
                    cmd: h.cmd.clone(),
                    interval_ms: h.interval.as_millis() as u64,
                    retries: h.retries.max(1),
                })
            }
            None => None,
        };
        if opts.auto_remove && opts.restart != RestartPolicy::No {
            bail!("--rm and --restart cannot be combined");
        }
        if opts.no_network && opts.ip.is_some() {
            bail!("--ip needs the network (drop --network none)");
        }
        if !opts.services.is_empty() {
            if opts.no_network {
                bail!("--service needs the network (drop --network none)");
            }
            if opts.services.len() > cairn_contracts::services::MAX_SERVICES {
                bail!(
                    "--service: at most {} per container",
                    cairn_contracts::services::MAX_SERVICES
                );
            }
            cairn_contracts::services::check_label(
                "--service needs a container name that is a DNS label; --name",
                &name,
            )?;
        }
        // Its namespaces take a while: begun now (if the caller has not),
        // they are made while the image is resolved and the records are
        // written (see PendingUserns). A detached container's monitor begins
        // its own.
        let early_userns = match (!opts.userns_host && !opts.detach, begun) {
            (false, _) => None,
            (true, Some(begun)) => Some(begun),
            (true, None) => Some(crate::container::PendingUserns::spawn()?),
        };
        let (img, checkout) = match image {
            Some(found) => found,
            None => self.image_and_checkout(&opts.image)?,
        };
        tracing::debug!(
            "run: image {} resolved after {:?}",
            img.reference(),
            t0.elapsed()
        );
        if let Some(s) = &img.config.stop_signal {
            state::parse_signal(s)
                .with_context(|| format!("StopSignal of image {}", img.reference()))?;
        }

        let dir = self.paths.container(&name);
        self.claim_name(&name, opts.auto_remove)?;
        let mut undo = Undo {
            rt: self,
            record: None,
            dir: Some(dir.clone()),
        };
        let id = random_hex(16)?;
        let network = (!opts.no_network).then(|| self.network.clone());
        let mut record = ContainerRecord {
            id: id.clone(),
            name: name.clone(),
            image: img.reference(),
            image_commit: img.commit.clone(),
            image_root: Some(checkout.clone()),
            manifest_digest: img.manifest_digest.clone(),
            created: state::now(),
            ip: None,
            network: network.clone(),
            host_if: format!("cn{}", &id[..10]),
            limits: limits.clone(),
            restart: opts.restart,
            health,
            auto_remove: opts.auto_remove,
            stop_timeout: opts.stop_timeout,
            log: opts.log,
            stop_signal: img.config.stop_signal.clone(),
            userns: None,
            services: opts.services.clone(),
            registration_dir: (!opts.services.is_empty()).then(|| {
                opts.registration_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(cairn_contracts::services::REGISTRATION_DIR))
            }),
            dns: opts.dns.or(self.dns).filter(|_| !opts.no_network),
        };
        if !opts.userns_host {
            let range = crate::userns::Allocator::new(&self.paths.userns_claims()).allocate(&id)?;
            record.userns = Some(range);
        }
        undo.record = Some(record.clone());
        // Made by the monitor at each start, on tmpfs (see Paths::run_root).
        let rootfs = self.paths.container_run(&name).join("rootfs");
        let cgroups_path = (cgroup::detect(&self.cgroups.root) == cgroup::Layout::Unified)
            .then(|| PathBuf::from("/").join(&self.cgroups.slice).join(&name));
        let spec = spec::build(&spec::SpecInput {
            hostname: &name,
            image: &img.config,
            image_root: &checkout,
            rootfs: &rootfs,
            command: &opts.command,
            env: &opts.env,
            volumes,
            limits: &limits,
            cgroups_path,
            userns: record.userns,
            terminal: opts.tty,
        })
        .with_context(|| format!("image {}", img.reference()))?;
        if let Some(net) = &network {
            record.ip = Some(Allocator::new(&self.paths.net(), net).allocate(&id, opts.ip)?);
        }
        if let (Some(range), Some(p)) = (&record.userns, spec.process()) {
            let u = p.user();
            let ids = [u.uid(), u.gid()]
                .into_iter()
                .chain(u.additional_gids().iter().flatten().copied());
            for id in ids {
                if range.host_id(id).is_none() {
                    bail!(
                        "image {}: its user runs with id {id}, outside the container's id range 0-{} (use a smaller id in the image, or --userns=host)",
                        img.reference(),
                        range.size - 1
                    );
                }
            }
        }
        let durability = state::Durability::of(&record);
        write_json(&dir.join(state::CONFIG_FILE), &spec, durability)?;
        write_json(&dir.join(state::RECORD_FILE), &record, durability)?;
        write_json(
            &dir.join(state::STATE_FILE),
            &ContainerState::default(),
            durability,
        )?;
        undo.record = Some(record.clone());

        tracing::debug!("run: container {name} prepared after {:?}", t0.elapsed());
        if !opts.detach {
            let output = match opts.tty {
                true => crate::monitor::Output::Console(crate::console::Console::open()?),
                false => crate::monitor::Output::Inherited,
            };
            let code = crate::monitor::supervise_loaded(
                self,
                record,
                spec,
                ContainerState::default(),
                early_userns,
                None,
                output,
            )?;
            std::mem::forget(undo);
            return Ok(RunOutcome::Exited { name, code });
        }
        let make = self.monitor_command.as_ref().ok_or_else(|| {
            anyhow!("this program cannot start detached containers (no monitor command)")
        })?;
        // The monitor points its own stdio at the log (see supervise).
        let mut cmd = make(&self.paths.root, &name);
        let null = std::process::Stdio::null;
        cmd.stdin(null()).stdout(null()).stderr(null());
        // The monitor says on this pipe when the container runs, or why it
        // could not start (see monitor::READY_FD_ENV). Close-on-exec here so
        // no other child of ours holds it open; only the monitor inherits it.
        let (ready_r, ready_w) = ready_pipe()?;
        let ready_fd = ready_w.as_raw_fd();
        cmd.env(crate::monitor::READY_FD_ENV, ready_fd.to_string());
        // SAFETY: setsid only detaches the monitor from our session; fcntl
        // only clears the close-on-exec flag of the child's copy of the fd.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if libc::fcntl(ready_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting the container monitor")?;
        // Ours closed, the monitor's end of it (or its death) is what we read.
        drop(ready_w);
        match wait_ready(ready_r, Duration::from_secs(60))? {
            Ready::Running => {}
            Ready::Failed(msg) => {
                let _ = child.wait();
                bail!(
                    "{}",
                    if msg.is_empty() {
                        "the container failed to start".into()
                    } else {
                        msg
                    }
                );
            }
            Ready::Closed => {
                // The monitor ended without a word: it died (or failed
                // before it could say so; then its state may tell why).
                let status = child.wait()?;
                let st = self.state(&name)?;
                if st.status == Status::Created || st.status == Status::Failed {
                    bail!(
                        "the container monitor exited ({status}) before starting the container{}",
                        st.error.map(|e| format!(": {e}")).unwrap_or_default()
                    );
                }
            }
        }
        std::mem::forget(undo);
        // Reap the monitor whenever it ends, should this process live on.
        std::thread::spawn(move || child.wait());
        Ok(RunOutcome::Detached {
            name,
            ip: record.ip,
        })
    }

    /// Create the container's record directory, which claims its name
    /// (atomically: mkdir or symlink fail if it exists). A `--rm`
    /// container's records go to tmpfs, behind a symlink (see
    /// [`state`](crate::state)).
    fn claim_name(&self, name: &str, volatile: bool) -> Result<()> {
        let dir = self.paths.container(name);
        state::create_private_dir(&self.paths.root)?;
        std::fs::create_dir_all(self.paths.containers())
            .with_context(|| format!("creating {}", self.paths.containers().display()))?;
        let claim = || {
            if volatile {
                std::os::unix::fs::symlink(self.paths.container_volatile(name), &dir)
            } else {
                std::fs::create_dir(&dir)
            }
        };
        let mut res = claim();
        if matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists)
            && dir
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
            && !dir.exists()
        {
            // What a reboot leaves of a --rm container: not a container.
            let _ = std::fs::remove_file(&dir);
            res = claim();
        }
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("a container named {name} already exists (host app rm {name})")
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
        if volatile {
            let target = self.paths.container_volatile(name);
            if let Err(e) = state::create_private_dir(&self.paths.run_root())
                .and_then(|()| std::fs::create_dir_all(&target).map_err(Into::into))
            {
                let _ = std::fs::remove_file(&dir);
                return Err(e).with_context(|| format!("creating {}", target.display()));
            }
        }
        Ok(())
    }

    pub fn ps(&self) -> Result<Vec<PsEntry>> {
        let mut out = Vec::new();
        for r in self.records()? {
            let st = self.state(&r.name)?;
            out.push(PsEntry {
                status: st.observed(),
                health: st.health.as_ref().map(|h| h.status),
                exit_code: st.exit_code,
                restarts: st.restarts,
                name: r.name,
                id: r.id,
                image: r.image,
                ip: r.ip,
                created: r.created,
            });
        }
        Ok(out)
    }

    /// SIGTERM, then SIGKILL after `timeout`. Returns false if it was not running.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<bool> {
        self.record(name)?;
        let st = self.state(name)?;
        match st.observed() {
            Status::Running | Status::Restarting => {}
            Status::Dead => {
                // The monitor is gone; its child died with it (PDEATHSIG).
                if let Some(pid) = st.pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Ok(false);
            }
            _ => return Ok(false),
        }
        let monitor =
            nix::unistd::Pid::from_raw(st.monitor_pid.context("no monitor pid recorded")?);
        nix::sys::signal::kill(monitor, nix::sys::signal::Signal::SIGTERM)
            .context("signalling the monitor")?;
        let gone = |deadline: Instant| -> Result<bool> {
            while Instant::now() < deadline {
                if !self.state(name)?.monitor_alive() {
                    return Ok(true);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(false)
        };
        if gone(Instant::now() + timeout)? {
            return Ok(true);
        }
        if let Some(pid) = self.state(name)?.pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !gone(Instant::now() + Duration::from_secs(10))? {
            bail!("container {name} did not stop; its monitor is pid {monitor}");
        }
        Ok(true)
    }

    /// Remove a container (stopping it first with `force`).
    pub fn rm(&self, name: &str, force: bool) -> Result<()> {
        let r = self.record(name)?;
        let st = self.state(name)?;
        match st.observed() {
            Status::Running | Status::Restarting if !force => {
                bail!("container {name} is running: stop it first (host app stop {name}) or use --force")
            }
            Status::Running | Status::Restarting | Status::Dead => {
                self.stop(name, Duration::ZERO)?;
            }
            _ => {}
        }
        self.remove_container_files(&r)
    }

    /// Copy the log to `out`, the rotated files first (oldest first); with
    /// `follow`, keep going (across rotations) until the monitor ends.
    pub fn logs(&self, name: &str, follow: bool, out: &mut dyn Write) -> Result<()> {
        use crate::logfile::log_path;
        use std::os::unix::fs::MetadataExt;
        let r = self.record(name)?;
        let dir = self.paths.container(name);
        for n in (1..r.log.max_files.max(1)).rev() {
            // A file rotated away between listing and opening is skipped.
            if let Ok(mut f) = std::fs::File::open(log_path(&dir, n)) {
                std::io::copy(&mut f, out)?;
            }
        }
        let path = log_path(&dir, 0);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(_) if !follow => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        loop {
            std::io::copy(&mut f, out)?;
            out.flush()?;
            if !follow || !self.state(name)?.monitor_alive() {
                // One last read for what was written just before the end.
                std::io::copy(&mut f, out)?;
                return Ok(());
            }
            // Rotated: the rest of the old file, then the new one.
            let rotated = std::fs::metadata(&path)
                .is_ok_and(|m| m.ino() != f.metadata().map(|o| o.ino()).unwrap_or(0));
            if rotated {
                std::io::copy(&mut f, out)?;
                f = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                continue;
            }
            let pos = f.stream_position()?;
            std::thread::sleep(Duration::from_millis(200));
            f.seek(std::io::SeekFrom::Start(pos))?;
        }
    }

    /// Run a command in a running container; returns its exit code. With
    /// `tty`, on a pseudo-terminal wired to this process's terminal.
    pub fn exec(&self, name: &str, argv: &[String], tty: bool) -> Result<i32> {
        let r = self.record(name)?;
        let st = self.state(name)?;
        let pid = match (st.observed(), st.pid) {
            (Status::Running, Some(pid)) => pid,
            (s, _) => bail!("container {name} is not running ({s})"),
        };
        if argv.is_empty() {
            bail!("exec needs a command");
        }
        let spec: oci_spec::runtime::Spec =
            read_json(&self.paths.container(name).join(state::CONFIG_FILE))?;
        let env = spec
            .process()
            .as_ref()
            .and_then(|p| p.env().clone())
            .unwrap_or_default();
        let checkout = r.image_root(&self.paths);
        let mut argv = argv.to_vec();
        argv[0] = spec::find_program(&checkout, &argv[0], &env)?;
        let cgroup = (cgroup::detect(&self.cgroups.root) == cgroup::Layout::Unified)
            .then(|| self.cgroups.path(name));
        let console = tty.then(crate::console::Console::open).transpose()?;
        let stdio = match &console {
            Some(c) => {
                let slave = || -> Result<std::process::Stdio> {
                    Ok(c.slave().try_clone_to_owned()?.into())
                };
                Some((slave()?, slave()?, slave()?))
            }
            None => None,
        };
        let mut env = env;
        if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        let mut child = crate::container::spawn_in(
            &crate::container::ExecTarget { pid, cgroup },
            &spec,
            &argv,
            &env,
            stdio,
            tty,
        )?;
        let status = match &console {
            Some(c) => c.attach(&mut child)?,
            None => child.wait()?,
        };
        use std::os::unix::process::ExitStatusExt;
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }

    /// Everything known about a container, as JSON.
    pub fn inspect(&self, name: &str) -> Result<serde_json::Value> {
        let r = self.record(name)?;
        let st = self.state(name)?;
        let config: serde_json::Value =
            read_json(&self.paths.container(name).join(state::CONFIG_FILE))?;
        let mut state = serde_json::to_value(&st)?;
        state["status"] = serde_json::to_value(st.observed())?;
        Ok(serde_json::json!({ "container": r, "state": state, "config": config }))
    }
}

/// What a detached container's monitor said on its readiness pipe.
enum Ready {
    Running,
    /// It could not start the container; why.
    Failed(String),
    /// End of file with nothing said: the monitor is gone.
    Closed,
}

/// A close-on-exec pipe whose write end is not fd 0, 1 or 2 (the child's
/// stdio setup would take those before its pre_exec runs).
fn ready_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    if w.as_raw_fd() > 2 {
        return Ok((r, w));
    }
    let high = nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::F_DUPFD_CLOEXEC(3))
        .context("dup of the readiness pipe")?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok((r, unsafe { OwnedFd::from_raw_fd(high) }))
}

/// Block until the monitor writes on `pipe` or closes it: one byte
/// [`monitor::READY_RUNNING`](crate::monitor::READY_RUNNING), or
/// [`monitor::READY_FAILED`](crate::monitor::READY_FAILED), the error and
/// a NUL.
fn wait_ready(pipe: OwnedFd, timeout: Duration) -> Result<Ready> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the container did not start within {} s", timeout.as_secs());
        }
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, ms) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(e).context("waiting for the container monitor"),
        }
    }
    let mut f = std::fs::File::from(pipe);
    let mut first = [0u8; 1];
    let n = loop {
        match f.read(&mut first) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r.context("reading from the container monitor")?,
        }
    };
    if n == 0 {
        return Ok(Ready::Closed);
    }
    if first[0] == crate::monitor::READY_RUNNING {
        return Ok(Ready::Running);
    }
    // The error follows, up to a NUL (or the end of the pipe).
    let mut msg = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(end) = buf[..n].iter().position(|&b| b == 0) {
                    msg.extend_from_slice(&buf[..end]);
                    break;
                }
                msg.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Ok(Ready::Failed(
        String::from_utf8_lossy(&msg).trim().to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_hex_of_the_length_asked_and_differ() {
        let a = random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, random_hex(16).unwrap());
        assert_eq!(random_hex(4).unwrap().len(), 8);
    }

    #[test]
    fn container_names() {
        check_name("web-1.a_b").unwrap();
        assert!(check_name("-x").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
    }
}
