//! Finding a node config at first boot and applying its plan to a root.
//!
//! Everything is resolved before anything is written: the accounts files
//! are edited in memory, every owner is looked up, and only then are the
//! files written, each inside the root through directory descriptors opened
//! with `O_NOFOLLOW`, so no symlink in the root can lead a write out of it.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, mkdirat, Mode};
use nix::unistd::{fchown, fchownat, Gid, Uid};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::{NodeConfig, MAX_CONFIG_BYTES};
use super::render::{Account, Entry, Plan};

/// The stamp: present once a boot provisioned the node (or found nothing
/// to apply), so later boots never do it again. `host status` shows it.
pub const STATE_FILE: &str = "/var/lib/cairn/provision/state.json";
pub use cairn_contracts::names::PROVISION_EMBEDDED_CONFIG as EMBEDDED_CONFIG;
/// QEMU: `-fw_cfg name=opt/org.cairn/config,file=config.toml`.
pub const FW_CFG_NAME: &str = "opt/org.cairn/config";
const FW_CFG_DIR: &str = "/sys/firmware/qemu_fw_cfg/by_name";
/// A filesystem with this label holding `config.toml`.
pub const CONFIG_DRIVE_LABEL: &str = "CAIRNCFG";
pub const CONFIG_DRIVE_FILE: &str = "config.toml";
/// `cairn.config.url=https://…` on the kernel command line.
pub const URL_KARG: &str = "cairn.config.url";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisionResult {
    Applied,
    Failed,
    /// No source held a config: nothing to do, and never looked for again.
    NoConfig,
}

/// What a boot's provisioning did (the stamp's content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionState {
    pub result: ProvisionResult,
    /// Where the config came from: `fw_cfg opt/org.cairn/config`, `config drive /dev/vdb`, a URL, …
    pub source: Option<String>,
    pub at: String,
    pub config_sha256: Option<String>,
    pub error: Option<String>,
    pub accounts: Vec<String>,
    pub files: Vec<String>,
    pub units: Vec<String>,
    /// Kernel arguments added (as a new deployment).
    pub kernel_args: Vec<String>,
    /// The `REMOTE:REF` updates follow since.
    #[serde(default)]
    pub follows: Option<String>,
    /// The URL updates are fetched from since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_url: Option<String>,
}

impl ProvisionState {
    pub fn load(var: &Path) -> Option<ProvisionState> {
        let path = var.join(STATE_FILE.trim_start_matches("/var/"));
        let text = read_bounded(&path, 1 << 20).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn save(&self, root: &Path) -> Result<()> {
        let path = root.join(STATE_FILE.trim_start_matches('/'));
        let json = serde_json::to_vec_pretty(self)?;
        cairn_contracts::durable::write_mode(&path, &json, 0o644)
    }

    pub fn failed(source: Option<String>, error: String) -> ProvisionState {
        ProvisionState {
            result: ProvisionResult::Failed,
            source,
            at: now(),
            config_sha256: None,
            error: Some(error),
            accounts: Vec::new(),
            files: Vec::new(),
            units: Vec::new(),
            kernel_args: Vec::new(),
            follows: None,
            remote_url: None,
        }
    }

    pub fn no_config() -> ProvisionState {
        ProvisionState {
            result: ProvisionResult::NoConfig,
            error: None,
            ..ProvisionState::failed(None, String::new())
        }
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A config as read from its source.
#[derive(Debug, Clone)]
pub struct Found {
    pub source: String,
    pub text: String,
}

impl Found {
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.text.as_bytes()))
    }
}

/// Reads at most `limit` bytes of a regular file (never through a final
/// symlink); more is an error, not a truncation.
pub fn read_bounded(path: &Path, limit: u64) -> Result<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    file.take(limit + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {} (a node config is UTF-8 TOML)", path.display()))?;
    if text.len() as u64 > limit {
        bail!("{} is over {limit} bytes", path.display());
    }
    Ok(text)
}

use std::os::unix::fs::OpenOptionsExt as _;

/// The first source that holds a config, in the documented order: QEMU
/// fw_cfg, a config drive, a URL on the kernel command line, the config
/// embedded in the image. `root` is `/` on a node.
pub fn find_config(root: &Path) -> Result<Option<Found>> {
    let fw = root
        .join(FW_CFG_DIR.trim_start_matches('/'))
        .join(FW_CFG_NAME)
        .join("raw");
    if fw.exists() {
        return Ok(Some(Found {
            source: format!("fw_cfg {FW_CFG_NAME}"),
            text: read_bounded(&fw, MAX_CONFIG_BYTES)?,
        }));
    }
    let drive = root.join("dev/disk/by-label").join(CONFIG_DRIVE_LABEL);
    if root == Path::new("/") {
        wait_for_devices();
    }
    if drive.exists() {
        return read_config_drive(&drive).map(Some);
    }
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default();
    if let Some(url) = cmdline
        .split_ascii_whitespace()
        .find_map(|a| a.strip_prefix(URL_KARG).and_then(|v| v.strip_prefix('=')))
    {
        return fetch(url).map(Some);
    }
    let embedded = root.join(EMBEDDED_CONFIG.trim_start_matches('/'));
    if embedded.exists() {
        return Ok(Some(Found {
            source: format!("embedded {EMBEDDED_CONFIG}"),
            text: read_bounded(&embedded, MAX_CONFIG_BYTES)?,
        }));
    }
    Ok(None)
}

/// Waits (at most a minute) until udev has named the devices the kernel
/// found at boot, so that a config drive's label link exists if the drive
/// does. Only a boot that looks for its config waits: the unit does not
/// order itself after systemd-udev-settle.service, which every boot would
/// wait for (seconds on real hardware, 7-12 s under TCG).
fn wait_for_devices() {
    let settled = std::process::Command::new("udevadm")
        .args(["settle", "--timeout=60"])
        .stdin(std::process::Stdio::null())
        .status();
    if !matches!(settled, Ok(s) if s.success()) {
        tracing::warn!(
            "udevadm settle did not finish ({settled:?}); looking for a config drive anyway"
        );
    }
}

/// Mounts the labelled filesystem read-only (no devices, setuid or exec)
/// on a private directory, reads `config.toml`, and unmounts it.
fn read_config_drive(link: &Path) -> Result<Found> {
    let device = std::fs::canonicalize(link)
        .with_context(|| format!("resolving the config drive {}", link.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("cairn-config-drive-")
        .tempdir_in("/run")
        .context("making a mount point under /run")?;
    let flags = nix::mount::MsFlags::MS_RDONLY
        | nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOEXEC;
    let mut mounted = Err(anyhow::anyhow!("no filesystem type fits"));
    for fstype in ["vfat", "iso9660", "ext4"] {
        match nix::mount::mount(Some(&device), dir.path(), Some(fstype), flags, None::<&str>) {
            Ok(()) => {
                mounted = Ok(());
                break;
            }
            Err(e) => mounted = Err(anyhow::anyhow!("{fstype}: {e}")),
        }
    }
    mounted.with_context(|| {
        format!(
            "mounting the config drive {} (label {CONFIG_DRIVE_LABEL}; vfat, iso9660 or ext4)",
            device.display()
        )
    })?;
    let text = read_bounded(&dir.path().join(CONFIG_DRIVE_FILE), MAX_CONFIG_BYTES);
    let _ = nix::mount::umount2(dir.path(), nix::mount::MntFlags::MNT_DETACH);
    Ok(Found {
        source: format!("config drive {}", device.display()),
        text: text.with_context(|| format!("the config drive {}", device.display()))?,
    })
}

/// Fetches a config over HTTP(S), bounded, retrying while the network
/// comes up (up to two minutes).
fn fetch(url: &str) -> Result<Found> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        bail!("{URL_KARG}={url}: only http:// and https:// URLs are fetched");
    }
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .redirects(0)
        .build();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let attempt = agent.get(url).call();
        match attempt {
            Ok(resp) => {
                let mut text = String::new();
                resp.into_reader()
                    .take(MAX_CONFIG_BYTES + 1)
                    .read_to_string(&mut text)
                    .with_context(|| format!("reading {url} (a node config is UTF-8 TOML)"))?;
                if text.len() as u64 > MAX_CONFIG_BYTES {
                    bail!("{url}: the config is over {MAX_CONFIG_BYTES} bytes");
                }
                return Ok(Found {
                    source: url.to_string(),
                    text,
                });
            }
            Err(ureq::Error::Status(code, _)) => bail!("fetching {url}: HTTP {code}"),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::info!("fetching {url}: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            Err(e) => bail!("fetching {url}: {e} (gave up after two minutes)"),
        }
    }
}

/// Applies `plan` to `root`: accounts, then files, links and directories.
/// Returns the stamp to save (the caller adds kernel arguments and saves).
pub fn apply(root: &Path, plan: &Plan, found: &Found) -> Result<ProvisionState> {
    let etc = root.join("etc");
    let mut db = AccountsDb::load(&etc)?;
    for a in &plan.accounts {
        db.ensure(a)?;
    }
    // Every owner resolves before the first write.
    let mut resolved = Vec::new();
    for e in &plan.entries {
        let ids = match e {
            Entry::Dir { owner, group, .. } | Entry::File { owner, group, .. } => {
                Some((db.uid(owner)?, db.gid(group)?))
            }
            Entry::Symlink { .. } => None,
        };
        resolved.push((e, ids));
    }
    // A time zone the tree has no data for would leave a dangling link.
    for e in &plan.entries {
        if let Entry::Symlink { path, target } = e {
            if path == "/etc/localtime" {
                let zone = Path::new("usr/share/zoneinfo")
                    .join(target.trim_start_matches("../usr/share/zoneinfo/"));
                let file = cairn_contracts::rootpath::resolve_in_root(root, &zone, true)?;
                if !file.is_file() {
                    bail!(
                        "timezone: {} is not in this tree's time zone database (/{})",
                        target.trim_start_matches("../usr/share/zoneinfo/"),
                        zone.display()
                    );
                }
            }
        }
    }
    let root_fd = open_dir(None, root)?;
    for e in &plan.entries {
        preflight(&root_fd, e.path(), matches!(e, Entry::Dir { .. }))?;
    }
    db.save(&etc)?;
    for (e, ids) in resolved {
        write_entry(&root_fd, e, ids).with_context(|| format!("writing {}", e.path()))?;
    }
    Ok(ProvisionState {
        result: ProvisionResult::Applied,
        source: Some(found.source.clone()),
        at: now(),
        config_sha256: Some(found.sha256()),
        error: None,
        accounts: plan.accounts.iter().map(|a| a.name.clone()).collect(),
        files: plan.entries.iter().map(|e| e.path().to_string()).collect(),
        units: plan.units.clone(),
        kernel_args: Vec::new(),
        follows: None,
        remote_url: None,
    })
}

/// Parses a found config, naming its source in errors.
pub fn parse(found: &Found) -> Result<NodeConfig> {
    NodeConfig::parse(&found.text, &found.source)
}

fn open_dir(at: Option<&OwnedFd>, path: &Path) -> Result<OwnedFd> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let fd = match at {
        Some(dir) => openat(Some(dir.as_raw_fd()), path, flags, Mode::empty()),
        None => nix::fcntl::open(path, flags, Mode::empty()),
    }
    .with_context(|| format!("opening the directory {}", path.display()))?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The directory holding `path` (relative components of an absolute,
/// normalized path), created root:root 0755 where missing, never followed
/// through a symlink.
fn parent_dir(root: &OwnedFd, path: &str) -> Result<(OwnedFd, String)> {
    let mut parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let name = parts.pop().context("an empty path")?.to_string();
    let mut dir = open_dir(Some(root), Path::new("."))?;
    for p in parts {
        match mkdirat(Some(dir.as_raw_fd()), p, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => bail!("creating {p} in {path}: {e}"),
        }
        dir = open_dir(Some(&dir), Path::new(p)).with_context(|| {
            format!("{path}: {p} is not a directory (a symlink is never followed)")
        })?;
    }
    Ok((dir, name))
}

/// Refuses, before anything is written, a path whose existing directories
/// are not all real directories (a symlink there would lead out of the root).
fn preflight(root: &OwnedFd, path: &str, is_dir: bool) -> Result<()> {
    let mut parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if !is_dir {
        parts.pop();
    }
    let mut dir = open_dir(Some(root), Path::new("."))?;
    for p in parts {
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
        match openat(Some(dir.as_raw_fd()), p, flags, Mode::empty()) {
            // SAFETY: a new descriptor that nothing else owns.
            Ok(fd) => dir = unsafe { OwnedFd::from_raw_fd(fd) },
            Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => bail!(
                "{path}: {p} is not a directory ({e}); provisioning never writes through a symlink"
            ),
        }
    }
    Ok(())
}

fn write_entry(root: &OwnedFd, e: &Entry, ids: Option<(u32, u32)>) -> Result<()> {
    let (dir, name) = parent_dir(root, e.path())?;
    let dirfd = Some(dir.as_raw_fd());
    match e {
        Entry::Dir { mode, .. } => {
            match mkdirat(dirfd, name.as_str(), Mode::from_bits_truncate(*mode)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(err) => bail!("mkdir: {err}"),
            }
            let fd = open_dir(Some(&dir), Path::new(&name))?;
            let (uid, gid) = ids.context("a directory without an owner")?;
            fchown(
                fd.as_raw_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )?;
            fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(*mode))?;
        }
        Entry::File { mode, content, .. } => {
            let tmp = format!(".{name}.cairn-provision");
            let _ =
                nix::unistd::unlinkat(dirfd, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
            let fd = openat(
                dirfd,
                tmp.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )?;
            // SAFETY: a new descriptor that nothing else owns.
            let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            std::io::Write::write_all(&mut file, content)?;
            let (uid, gid) = ids.context("a file without an owner")?;
            fchown(
                file.as_raw_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )?;
            fchmod(file.as_raw_fd(), Mode::from_bits_truncate(*mode))?;
            file.sync_all()?;
            nix::fcntl::renameat(dirfd, tmp.as_str(), dirfd, name.as_str())?;
        }
        Entry::Symlink { target, .. } => {
            let tmp = format!(".{name}.cairn-provision");
            let _ =
                nix::unistd::unlinkat(dirfd, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
            nix::unistd::symlinkat(target.as_str(), dirfd, tmp.as_str())?;
            fchownat(
                dirfd,
                tmp.as_str(),
                Some(Uid::from_raw(0)),
                Some(Gid::from_raw(0)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
            nix::fcntl::renameat(dirfd, tmp.as_str(), dirfd, name.as_str())?;
        }
    }
    nix::unistd::fsync(dir.as_fd().as_raw_fd())?;
    Ok(())
}

/// /etc/passwd, shadow, group and gshadow, edited as lines (what
/// systemd-sysusers and useradd write), so it works on any root.
struct AccountsDb {
    files: Vec<(&'static str, Vec<String>, bool)>,
}

const PASSWD: usize = 0;
const SHADOW: usize = 1;
const GROUP: usize = 2;
const GSHADOW: usize = 3;
/// Where new accounts' ids start (Debian's FIRST_UID).
const FIRST_ID: u32 = 1000;
const LAST_ID: u32 = 59999;

impl AccountsDb {
    fn load(etc: &Path) -> Result<AccountsDb> {
        let mut files = Vec::new();
        for name in ["passwd", "shadow", "group", "gshadow"] {
            let path = etc.join(name);
            let (lines, present) = match read_bounded(&path, 16 << 20) {
                Ok(t) => (t.lines().map(str::to_string).collect(), true),
                Err(_) if matches!(name, "gshadow") && !path.exists() => (Vec::new(), false),
                Err(e) => return Err(e),
            };
            files.push((name, lines, present));
        }
        Ok(AccountsDb { files })
    }

    fn find(&self, file: usize, name: &str) -> Option<Vec<String>> {
        self.files[file]
            .1
            .iter()
            .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.first().is_some_and(|n| n == name))
    }

    fn set(&mut self, file: usize, name: &str, fields: Vec<String>) {
        let line = fields.join(":");
        let lines = &mut self.files[file].1;
        match lines.iter().position(|l| l.split(':').next() == Some(name)) {
            Some(i) => lines[i] = line,
            None => lines.push(line),
        }
    }

    fn uid(&self, name: &str) -> Result<u32> {
        self.find(PASSWD, name)
            .and_then(|f| f.get(2).and_then(|u| u.parse().ok()))
            .with_context(|| format!("no user {name:?} in /etc/passwd (list it under [[users]])"))
    }

    fn gid(&self, name: &str) -> Result<u32> {
        self.find(GROUP, name)
            .and_then(|f| f.get(2).and_then(|g| g.parse().ok()))
            .with_context(|| format!("no group {name:?} in /etc/group"))
    }

    fn free_id(&self) -> Result<u32> {
        let used = |file: usize| -> Vec<u32> {
            self.files[file]
                .1
                .iter()
                .filter_map(|l| l.split(':').nth(2)?.parse().ok())
                .collect()
        };
        let (u, g) = (used(PASSWD), used(GROUP));
        (FIRST_ID..=LAST_ID)
            .find(|id| !u.contains(id) && !g.contains(id))
            .context("no free user id between 1000 and 59999")
    }

    fn ensure(&mut self, a: &Account) -> Result<()> {
        for g in &a.groups {
            self.gid(g).with_context(|| {
                format!("users: {}: group {g:?} does not exist in the tree", a.name)
            })?;
        }
        if self.find(PASSWD, &a.name).is_none() {
            let id = self.free_id()?.to_string();
            let home = if a.name == "root" {
                "/root".to_string()
            } else {
                format!("/home/{}", a.name)
            };
            self.set(
                PASSWD,
                &a.name,
                vec![
                    a.name.clone(),
                    "x".into(),
                    id.clone(),
                    id.clone(),
                    String::new(),
                    home,
                    "/bin/bash".into(),
                ],
            );
            self.set(
                SHADOW,
                &a.name,
                vec![
                    a.name.clone(),
                    "*".into(),
                    String::new(),
                    "0".into(),
                    "99999".into(),
                    "7".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                ],
            );
            if self.find(GROUP, &a.name).is_none() {
                self.set(
                    GROUP,
                    &a.name,
                    vec![a.name.clone(), "x".into(), id, String::new()],
                );
                if self.files[GSHADOW].2 {
                    self.set(
                        GSHADOW,
                        &a.name,
                        vec![a.name.clone(), "!".into(), String::new(), String::new()],
                    );
                }
            }
        }
        if let Some(hash) = &a.password_hash {
            let mut f = self
                .find(SHADOW, &a.name)
                .with_context(|| format!("users: {} has no /etc/shadow entry", a.name))?;
            f.resize(9.max(f.len()), String::new());
            f[1] = hash.clone();
            self.set(SHADOW, &a.name, f);
        }
        for g in &a.groups {
            for (file, members_at) in [(GROUP, 3), (GSHADOW, 3)] {
                if file == GSHADOW && !self.files[GSHADOW].2 {
                    continue;
                }
                let Some(mut f) = self.find(file, g) else {
                    continue;
                };
                f.resize(4.max(f.len()), String::new());
                let mut members: Vec<String> = f[members_at]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect();
                if !members.contains(&a.name) {
                    members.push(a.name.clone());
                }
                f[members_at] = members.join(",");
                self.set(file, g, f);
            }
        }
        Ok(())
    }

    /// Each file replaced atomically and durably, keeping its mode and owner.
    fn save(&self, etc: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        for (name, lines, present) in &self.files {
            if !present {
                continue;
            }
            let path = etc.join(name);
            let meta = std::fs::symlink_metadata(&path)?;
            if !meta.is_file() {
                bail!("{} is not a regular file", path.display());
            }
            let mut text = lines.join("\n");
            text.push('\n');
            if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
                continue;
            }
            cairn_contracts::durable::write_mode(&path, text.as_bytes(), meta.mode() & 0o7777)?;
            std::os::unix::fs::lchown(&path, Some(meta.uid()), Some(meta.gid()))
                .with_context(|| format!("restoring the owner of {}", path.display()))?;
        }
        Ok(())
    }
}

/// The stamp's path under `root`.
pub fn state_path(root: &Path) -> PathBuf {
    root.join(STATE_FILE.trim_start_matches('/'))
}
