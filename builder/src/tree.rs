//! Turning an installed root into a host tree: added files, units, users,
//! kernel arguments, postprocess scripts, removals, and finally the OSTree
//! layout (kernel under /usr/lib/modules, /etc in /usr/etc, an empty /var
//! recreated by tmpfiles.d, the standard top-level symlinks).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::confined::{At, Root};
use crate::manifest::{Group, PostprocessScript, SourceFile, User};

/// Where the dpkg database lives in a composed tree: under /usr, so the package
/// list is part of the commit and readable from it.
pub const DPKG_DB: &str = "usr/lib/sysimage/dpkg";
/// Kernel arguments of the tree, one per line (read by the image writer).
pub const KARGS_FILE: &str = "usr/lib/cairn/kargs";
pub const TMPFILES_VAR: &str = "usr/lib/tmpfiles.d/cairn-var.conf";
const SYSUSERS: &str = "usr/lib/sysusers.d/cairn.conf";

/// Facts about the prepared tree that go into commit metadata.
#[derive(Debug, Clone, Default)]
pub struct TreeFacts {
    pub kernel: Option<String>,
}

/// Writes the manifest's `files` into the tree: the bytes read when the
/// manifest was loaded, the same ones its digest was computed from.
pub fn add_files(root: &Root, files: &[SourceFile]) -> Result<()> {
    for (i, f) in files.iter().enumerate() {
        let mode = match f.mode {
            Some(m) => m.bits(),
            None => {
                let m = f.src_mode;
                if m & 0o7000 != 0 {
                    tracing::warn!(
                        "files[{i}]: {} has mode {:04o}; setuid, setgid and sticky bits are dropped unless `mode` asks for them",
                        f.src.display(),
                        m & 0o7777
                    );
                }
                m & 0o777
            }
        };
        let at = root
            .at(&f.dst, true)
            .with_context(|| format!("files[{i}].dst {}", f.dst))?;
        let mut out = at.create_file()?;
        out.write_all(&f.content)
            .with_context(|| format!("writing {} to {}", f.src.display(), f.dst))?;
        at.finish_file(&out, mode)?;
    }
    Ok(())
}

/// Writes the manifest's `[trust] keys` into the tree, each as
/// `TRUSTED_KEYS_DIR/<FINGERPRINT>.asc` (0644): the keys a node verifies
/// this tree's updates with.
pub fn add_trusted_keys(root: &Root, keys: &[crate::keys::PublicKey]) -> Result<()> {
    use cairn_contracts::trust::{key_file_name, TRUSTED_KEYS_DIR};
    for key in keys {
        let fingerprint = key
            .fingerprints
            .first()
            .with_context(|| format!("key file {} holds no key", key.path.display()))?;
        let dst = format!("/{TRUSTED_KEYS_DIR}/{}", key_file_name(fingerprint));
        let at = root
            .at(&dst, true)
            .with_context(|| format!("trust.keys: {dst}"))?;
        let mut out = at.create_file()?;
        out.write_all(&key.armored)
            .with_context(|| format!("writing {} to {dst}", key.path.display()))?;
        at.finish_file(&out, 0o644)?;
    }
    Ok(())
}

/// Copies a build-machine file (the host binary, an app archive) into the
/// tree at `dst` as root:root with `mode`, creating parents (0755) inside the tree.
pub fn install_file(root: &Root, src: &Path, dst: &str, mode: u32) -> Result<()> {
    let mut input =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let at = root.at(dst, true)?;
    let mut out = at.create_file()?;
    std::io::copy(&mut input, &mut out)
        .with_context(|| format!("copying {} to {dst}", src.display()))?;
    at.finish_file(&out, mode)?;
    Ok(())
}

/// Install the running `host`: its container executable at `dst` and the
/// others next to it (`cairn_contracts::names::executables`), debug info
/// stripped (dead weight on a node).
pub fn self_install(root: &Root, binary: &Path, dst: &str, scratch: &Path) -> Result<()> {
    use cairn_contracts::names::executables;
    for (from, to) in executables(binary)
        .into_iter()
        .zip(executables(Path::new(dst)))
    {
        let to = to.to_str().context("self-install path is not UTF-8")?;
        install_stripped(root, &from, to, scratch)?;
    }
    Ok(())
}

fn install_stripped(root: &Root, binary: &Path, dst: &str, scratch: &Path) -> Result<()> {
    if !binary.is_file() {
        bail!(
            "self-install: {} does not exist (build all of host's executables: cargo build -p host)",
            binary.display()
        );
    }
    let stripped = scratch.join("host-stripped");
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&stripped)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let from = if ok {
        stripped.as_path()
    } else {
        tracing::warn!(
            "objcopy --strip-debug failed on {}; keeping it unstripped",
            binary.display()
        );
        binary
    };
    install_file(root, from, dst, 0o755)?;
    let _ = std::fs::remove_file(&stripped);
    Ok(())
}

pub fn write_kargs(root: &Root, kargs: &[String]) -> Result<()> {
    let text: String = kargs.iter().map(|k| format!("{k}\n")).collect();
    root.write(KARGS_FILE, text.as_bytes(), 0o644)
        .with_context(|| format!("writing /{KARGS_FILE}"))
}

/// Users and groups go to sysusers.d: systemd-sysusers creates them at boot,
/// so they survive the 3-way /etc merge of later upgrades. (Names, gecos,
/// home and shell are validated with the manifest, so no field can end a
/// line or a quote.)
pub fn write_sysusers(root: &Root, users: &[User], groups: &[Group]) -> Result<()> {
    if users.is_empty() && groups.is_empty() {
        return Ok(());
    }
    let mut text = String::from("# Generated by cairn from the compose manifest.\n");
    for g in groups {
        let gid = g.gid.map(|g| g.to_string()).unwrap_or_else(|| "-".into());
        writeln!(text, "g {} {gid}", g.name).ok();
    }
    for u in users {
        let id = u.uid.map(|u| u.to_string()).unwrap_or_else(|| "-".into());
        let gecos = u.gecos.clone().unwrap_or_else(|| "-".into());
        let home = u.home.clone().unwrap_or_else(|| "-".into());
        let shell = u.shell.clone().unwrap_or_else(|| "-".into());
        writeln!(text, "u {} {id} \"{gecos}\" {home} {shell}", u.name).ok();
        for g in &u.groups {
            writeln!(text, "m {} {g}", u.name).ok();
        }
    }
    root.write(SYSUSERS, text.as_bytes(), 0o644)
        .with_context(|| format!("writing /{SYSUSERS}"))
}

const UNIT_DIRS: &[&str] = &[
    "etc/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
];

fn find_unit(root: &Root, unit: &str) -> Option<String> {
    // A template instance (foo@bar.service) is enabled from its template file.
    let template = unit.split_once('@').and_then(|(pre, post)| {
        post.rsplit_once('.')
            .map(|(_, ext)| format!("{pre}@.{ext}"))
    });
    for dir in UNIT_DIRS {
        for name in std::iter::once(unit.to_string()).chain(template.clone()) {
            let p = format!("/{dir}/{name}");
            if root
                .at(&p, false)
                .is_ok_and(|a| a.lstat().ok().flatten().is_some())
            {
                return Some(p);
            }
        }
    }
    None
}

/// `[Install]` keys of a unit file of the tree (read inside the tree).
fn install_section(root: &Root, path: &str) -> Result<Vec<(String, String)>> {
    let text = root
        .read_to_string(path)
        .with_context(|| format!("reading {path} in the tree"))?;
    let mut in_install = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_install = line == "[Install]";
        } else if in_install {
            if let Some((k, v)) = line.split_once('=') {
                for word in v.split_whitespace() {
                    out.push((k.trim().to_string(), word.to_string()));
                }
            }
        }
    }
    Ok(out)
}

/// Enables, disables and masks units the way `systemctl --root` does, without
/// depending on the build machine's systemd: the symlinks are the whole effect.
/// Names read from the tree's `[Install]` sections are checked like the
/// manifest's: a `WantedBy=../../x` cannot place a link anywhere else.
pub fn apply_units(
    root: &Root,
    enable: &[String],
    disable: &[String],
    mask: &[String],
) -> Result<()> {
    const ETC: &str = "/etc/systemd/system";
    if !disable.is_empty() {
        if let Ok(etc) = root.dir(ETC, false) {
            let base = etc.path();
            for entry in walkdir::WalkDir::new(&base).min_depth(1).max_depth(2) {
                let entry = entry?;
                if disable
                    .iter()
                    .any(|u| *u == *entry.file_name().to_string_lossy())
                    && entry.path_is_symlink()
                {
                    std::fs::remove_file(entry.path()).with_context(|| {
                        format!(
                            "units.disable: removing {ETC}/{}",
                            entry
                                .path()
                                .strip_prefix(&base)
                                .unwrap_or(entry.path())
                                .display()
                        )
                    })?;
                }
            }
        }
    }
    let mut seen = BTreeSet::new();
    let mut queue: Vec<String> = enable.to_vec();
    while let Some(unit) = queue.pop() {
        if !seen.insert(unit.clone()) {
            continue;
        }
        let Some(target) = find_unit(root, &unit) else {
            bail!("units.enable: no unit file {unit} in the tree (looked in /etc, /usr/lib and /lib systemd/system)");
        };
        let keys = install_section(root, &target)?;
        if keys.is_empty() {
            bail!("units.enable: {unit} has no [Install] section, so there is nothing to enable; pull it in from another unit");
        }
        for (key, value) in keys {
            if !["WantedBy", "RequiredBy", "UpheldBy", "Alias", "Also"].contains(&key.as_str()) {
                continue;
            }
            crate::manifest::check_unit_name(&value).map_err(|m| {
                anyhow::anyhow!(
                    "units.enable: {target} in the tree has {key}={value}: {m}; fix the unit file"
                )
            })?;
            let link = match key.as_str() {
                "WantedBy" => format!("{ETC}/{value}.wants/{unit}"),
                "RequiredBy" => format!("{ETC}/{value}.requires/{unit}"),
                "UpheldBy" => format!("{ETC}/{value}.upholds/{unit}"),
                "Alias" => format!("{ETC}/{value}"),
                _ => {
                    queue.push(value);
                    continue;
                }
            };
            root.at(&link, true)?.symlink(&target)?;
        }
    }
    for unit in mask {
        root.at(format!("{ETC}/{unit}"), true)?
            .symlink("/dev/null")?;
    }
    Ok(())
}

/// Capabilities a postprocess script keeps: what a package job run as root
/// in a chroot needs to own, mode and relabel the tree's files and to drop
/// to a user. Not CAP_MKNOD (bwrap's /dev allows devices: a node of the
/// build machine's disk would be raw access to it), not CAP_DAC_READ_SEARCH
/// (open_by_handle_at reaches any file of the file system the tree is on),
/// not CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_NET_*, CAP_SYS_CHROOT.
pub const POSTPROCESS_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_SETFCAP",
];

/// The bubblewrap arguments a postprocess script runs under (before the command).
///
/// Namespaces: mount, pid, net, ipc, uts, cgroup: everything but a user
/// namespace (`--unshare-all` would add one, and as root bwrap maps only uid
/// 0 in it, so `chown` to any package user fails; capabilities are limited
/// with `--cap-drop` instead, and bwrap sets no_new_privs so no exec regains
/// any). The tree is the only bind (read-write, nosuid, nodev) and `/`;
/// `/proc` is the new pid namespace's, `/dev` a minimal tmpfs, `/tmp` and
/// `/run` fresh tmpfs; the script itself is bound read-only, copied by
/// bwrap from `script_fd` (nothing of it is left on the build machine).
fn postprocess_sandbox(root: &Path, script_fd: RawFd) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = [
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "cairn-postprocess",
        "--cap-drop",
        "ALL",
    ]
    .iter()
    .map(Into::into)
    .collect();
    for cap in POSTPROCESS_CAPS {
        a.push("--cap-add".into());
        a.push(cap.into());
    }
    a.extend(["--bind".into(), root.into(), "/".into()]);
    for arg in [
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run",
    ] {
        a.push(arg.into());
    }
    a.extend([
        "--ro-bind-data".into(),
        script_fd.to_string().into(),
        "/run/cairn-postprocess".into(),
    ]);
    for arg in [
        "--chdir",
        "/",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/sbin:/usr/bin:/sbin:/bin",
        "--setenv",
        "LC_ALL",
        "C.UTF-8",
    ] {
        a.push(arg.into());
    }
    a
}

/// Runs postprocess scripts inside the tree under bubblewrap (see
/// [`postprocess_sandbox`]), each script's text as read when the manifest
/// was loaded. A failing script names itself, its exit status and the tail
/// of its output.
pub fn run_postprocess(
    root: &Root,
    scripts: &[PostprocessScript],
    env: &[(String, String)],
) -> Result<()> {
    if scripts.is_empty() {
        return Ok(());
    }
    // The mount points bwrap uses must be directories of the tree, not
    // symlinks to somewhere (the layout step recreates them anyway).
    for d in ["proc", "dev", "tmp", "run"] {
        let at = root.at(d, false)?;
        if !at.is_dir() {
            at.remove()?;
            at.mkdir()?;
        }
    }
    let has_sh = ["bin/sh", "usr/bin/sh"].iter().any(|p| {
        root.at(p, false)
            .is_ok_and(|a| a.lstat().ok().flatten().is_some())
    });
    for script in scripts {
        let name = &script.name;
        if !has_sh {
            bail!("postprocess {name}: the tree has no /bin/sh to run it with");
        }
        // The text goes to bwrap through an anonymous file: a compose killed
        // mid-script leaves no copy of it behind.
        let body = script_memfd(&script.body)
            .with_context(|| format!("postprocess {name}: passing the script to bwrap"))?;
        let fd = body.as_raw_fd();
        let mut cmd = Command::new("bwrap");
        cmd.args(postprocess_sandbox(root.path(), fd));
        // SAFETY: only fcntl, which is async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // bwrap is the one process that inherits the descriptor.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        for (k, v) in env {
            cmd.args(["--setenv", k, v]);
        }
        cmd.args(["/bin/sh", "-e", "/run/cairn-postprocess"]);
        cmd.stdin(Stdio::null());
        let out = cmd
            .output()
            .with_context(|| format!("postprocess {name}: starting bwrap (run scripts/setup)"))?;
        if !out.status.success() {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let status = match out.status.code() {
                Some(c) => format!("exit status {c}"),
                None => out.status.to_string(),
            };
            bail!(
                "postprocess script {name} failed with {status}; last output:\n{}",
                crate::apt::tail(&text, 20)
            );
        }
    }
    Ok(())
}

/// `text` in a memfd (close-on-exec), positioned at its start for bwrap to read.
fn script_memfd(text: &str) -> std::io::Result<std::fs::File> {
    // SAFETY: a NUL-terminated name and plain flags.
    let fd = unsafe { libc::memfd_create(c"cairn-postprocess".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(text.as_bytes())?;
    std::io::Seek::rewind(&mut file)?;
    Ok(file)
}

pub fn remove_files(root: &Root, paths: &[String]) -> Result<()> {
    for p in paths {
        let at = match root.at(p, false) {
            Ok(at) => at,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!("remove-files: {p} is not in the tree");
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("remove-files: {p}")),
        };
        if at.lstat()?.is_none() {
            tracing::info!("remove-files: {p} is not in the tree");
            continue;
        }
        at.remove()
            .with_context(|| format!("remove-files: removing {p}"))?;
    }
    Ok(())
}

/// The installed packages of the tree, read from a copy of its dpkg status
/// file (a regular file read inside the tree: a symlink in it cannot make
/// dpkg-query read the build machine's database).
pub fn installed_packages(root: &Root) -> Result<crate::apt::PackageSet> {
    let status = match root.open_read("var/lib/dpkg/status") {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(crate::apt::PackageSet::default())
        }
        Err(e) => return Err(e).context("reading /var/lib/dpkg/status in the tree"),
    };
    let admin = tempfile::tempdir()?;
    std::fs::create_dir(admin.path().join("updates"))?;
    let mut copy = std::fs::File::create(admin.path().join("status"))?;
    std::io::copy(&mut { status }, &mut copy)?;
    crate::apt::installed_packages(admin.path())
}

/// Rearranges a root into the layout libostree deploys. Every step works on
/// names whose directories are resolved inside the tree and never follows a
/// symlink in the last component: a `/var -> /` in a rootfs is replaced, not
/// emptied.
pub fn ostree_layout(root: &Root) -> Result<TreeFacts> {
    let facts = TreeFacts {
        kernel: move_kernel(root)?,
    };

    let mut tmpfiles =
        String::from("# Generated by cairn: what the packages put in /var, recreated at boot.\n");
    let dpkg = root.at("var/lib/dpkg", false).ok().filter(At::is_dir);
    if let Some(dpkg) = dpkg {
        let dest = root.at(DPKG_DB, true)?;
        dpkg.rename_to(&dest)
            .with_context(|| format!("moving the dpkg database to /{DPKG_DB}"))?;
        writeln!(tmpfiles, "L /var/lib/dpkg - - - - ../../{DPKG_DB}").ok();
    }

    let etc = root.at("etc", false)?;
    if etc.is_dir() {
        let usr_etc = root.at("usr/etc", true)?;
        if usr_etc.lstat()?.is_some() {
            bail!("the tree already has /usr/etc; cairn moves /etc there and cannot merge the two");
        }
        etc.rename_to(&usr_etc).context("moving /etc to /usr/etc")?;
    } else if root
        .at("usr/etc", false)
        .is_ok_and(|a| a.lstat().ok().flatten().is_some())
    {
        bail!("the tree already has /usr/etc; cairn moves /etc there and cannot merge the two");
    }

    // /usr/local belongs to the machine, not the tree (as on rpm-ostree systems).
    let usr_local = root.at("usr/local", true)?;
    if usr_local.is_dir() {
        let dest = root.dir("var/usrlocal", true)?;
        move_contents(&usr_local, &dest)?;
        std::fs::remove_dir(usr_local.path())?;
    }
    if usr_local.lstat()?.is_none() {
        usr_local.symlink("../var/usrlocal")?;
    }

    // Top-level directories that are per-machine state move under /var.
    for (dir, var) in [
        ("home", "home"),
        ("root", "roothome"),
        ("opt", "opt"),
        ("srv", "srv"),
        ("mnt", "mnt"),
    ] {
        let p = root.at(dir, false)?;
        if let Some(md) = p.lstat()?.filter(|m| m.is_dir()) {
            let dest = root.dir(format!("var/{var}"), true)?;
            root.at(format!("var/{var}"), false)?.chmod_dir(md.mode())?;
            move_contents(&p, &dest)?;
            std::fs::remove_dir(p.path())?;
        }
    }
    let var = root.at("var", false)?;
    if var.is_dir() {
        let dir = root.dir("var", false)?;
        writeln!(tmpfiles, "{}", var_tmpfiles(&dir.path())?).ok();
    } else {
        writeln!(tmpfiles).ok();
    }
    root.write(TMPFILES_VAR, tmpfiles.as_bytes(), 0o644)
        .with_context(|| format!("writing /{TMPFILES_VAR}"))?;
    if var.is_dir() {
        clear_dir(&var)?;
    }

    for d in ["boot", "dev", "proc", "sys", "run", "sysroot", "var"] {
        let p = root.at(d, false)?;
        match p.lstat()? {
            Some(m) if m.is_dir() => clear_dir(&p)?,
            Some(_) => {
                p.remove()?;
                p.mkdir()?;
            }
            None => p.mkdir()?,
        }
        p.chmod_dir(0o755)?;
    }
    let tmp = root.at("tmp", false)?;
    if tmp.is_dir() {
        tmp.remove()?;
    }
    for (link, target) in [
        ("home", "var/home"),
        ("root", "var/roothome"),
        ("opt", "var/opt"),
        ("srv", "var/srv"),
        ("mnt", "var/mnt"),
        ("media", "run/media"),
        ("tmp", "sysroot/tmp"),
        ("ostree", "sysroot/ostree"),
    ] {
        let p = root.at(link, false)?;
        if p.is_dir() {
            p.remove()?;
        }
        p.symlink(target)?;
    }
    // Debian's /vmlinuz and /initrd.img links point into the now empty /boot.
    let top = root.dir("", false)?;
    for entry in std::fs::read_dir(top.path())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if (name.starts_with("vmlinuz") || name.starts_with("initrd.img"))
            && entry.file_type()?.is_symlink()
        {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(facts)
}

/// tmpfiles.d lines that recreate /var's directories and symlinks (its files
/// are per-machine state and are dropped, as libostree would ignore them).
/// `var` is the tree's /var (a `/proc/self/fd` path of the open directory).
fn var_tmpfiles(var: &Path) -> Result<String> {
    let mut out = String::new();
    let mut dropped = 0usize;
    for entry in walkdir::WalkDir::new(var).min_depth(1).sort_by_file_name() {
        let entry = entry?;
        let md = entry.path().symlink_metadata()?;
        let path = Path::new("/var").join(entry.path().strip_prefix(var).expect("under var"));
        let path = path.display().to_string();
        if path.contains(|c: char| c.is_whitespace() || c.is_control()) {
            dropped += 1;
            continue;
        }
        if md.is_dir() {
            writeln!(
                out,
                "d {path} {:04o} {} {} - -",
                md.mode() & 0o7777,
                md.uid(),
                md.gid()
            )
            .ok();
        } else if md.file_type().is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            let target = target.display().to_string();
            if target.contains(|c: char| c.is_whitespace() || c.is_control()) {
                dropped += 1;
                continue;
            }
            writeln!(out, "L {path} - - - - {target}").ok();
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::info!("/var: {dropped} files dropped (per-machine state; create them with tmpfiles.d if needed)");
    }
    Ok(out)
}

/// Moves the entries of the directory `from` into `to` (both in the tree).
fn move_contents(from: &At, to: &crate::confined::Dir) -> Result<()> {
    for entry in std::fs::read_dir(from.path())? {
        let entry = entry?;
        let dest = to.path().join(entry.file_name());
        if dest.symlink_metadata().is_ok() {
            bail!(
                "both {}/{} and its destination under /var exist; cannot merge them",
                from.display,
                entry.file_name().to_string_lossy()
            );
        }
        std::fs::rename(entry.path(), &dest)?;
    }
    Ok(())
}

/// Empties the directory `dir` (checked to be one, not a symlink).
fn clear_dir(dir: &At) -> Result<()> {
    for entry in
        std::fs::read_dir(dir.path()).with_context(|| format!("reading {}", dir.display))?
    {
        let entry = entry?;
        let p = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .with_context(|| {
            format!(
                "removing {}/{}",
                dir.display,
                entry.file_name().to_string_lossy()
            )
        })?;
    }
    Ok(())
}

/// Moves `/boot/vmlinuz-KVER` and its initramfs to `/usr/lib/modules/KVER/`,
/// where libostree looks for them. Returns the kernel version, if any.
fn move_kernel(root: &Root) -> Result<Option<String>> {
    let exists = |p: &str| {
        root.at(p, false)
            .is_ok_and(|a| a.lstat().ok().flatten().is_some())
    };
    let mut kernels = BTreeSet::new();
    let boot = root.at("boot", false)?;
    if boot.is_dir() {
        for entry in std::fs::read_dir(boot.path())? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(kver) = name.strip_prefix("vmlinuz-") {
                kernels.insert(kver.to_string());
            }
        }
    }
    if let Ok(modules) = root.dir("usr/lib/modules", false) {
        for entry in std::fs::read_dir(modules.path())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() && exists(&format!("usr/lib/modules/{name}/vmlinuz")) {
                kernels.insert(name);
            }
        }
    }
    let kver = match kernels.len() {
        0 => return Ok(None),
        1 => kernels.into_iter().next().expect("one"),
        _ => bail!(
            "the tree has {} kernels ({}); a host tree boots exactly one: remove the others",
            kernels.len(),
            kernels.into_iter().collect::<Vec<_>>().join(", ")
        ),
    };
    if kver.contains(|c: char| c.is_whitespace() || c.is_control()) || kver == ".." || kver == "." {
        bail!("the tree's kernel version {kver:?} is not a usable directory name");
    }
    let dir = format!("usr/lib/modules/{kver}");
    root.dir(&dir, true)?;
    let mv = |from: &str, to: &str| -> Result<()> {
        root.at(from, false)?
            .rename_to(&root.at(format!("{dir}/{to}"), false)?)?;
        Ok(())
    };
    if exists(&format!("boot/vmlinuz-{kver}")) {
        mv(&format!("boot/vmlinuz-{kver}"), "vmlinuz")?;
    }
    for initrd in [
        format!("boot/initrd.img-{kver}"),
        format!("boot/initramfs-{kver}.img"),
    ] {
        if exists(&initrd) {
            mv(&initrd, "initramfs.img")?;
        }
    }
    if !exists(&format!("{dir}/initramfs.img")) {
        bail!(
            "kernel {kver} has no initramfs (/boot/initrd.img-{kver} or /usr/lib/modules/{kver}/initramfs.img); \
             install dracut and ostree-boot so one is generated with the ostree module"
        );
    }
    if exists(&format!("boot/config-{kver}")) {
        mv(&format!("boot/config-{kver}"), "config")?;
    }
    Ok(Some(kver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_enabled_from_their_install_section() {
        let root = tempfile::tempdir().unwrap();
        let lib = root.path().join("usr/lib/systemd/system");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("a.service"), "[Unit]\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\nAlias=b.service\nAlso=c.socket\n").unwrap();
        std::fs::write(
            lib.join("c.socket"),
            "[Socket]\n[Install]\nWantedBy=sockets.target\n",
        )
        .unwrap();
        std::fs::write(
            lib.join("getty@.service"),
            "[Install]\nWantedBy=getty.target\n",
        )
        .unwrap();
        let tree = Root::open(root.path()).unwrap();
        apply_units(
            &tree,
            &["a.service".into(), "getty@ttyS0.service".into()],
            &[],
            &["d.service".into()],
        )
        .unwrap();
        let etc = root.path().join("etc/systemd/system");
        let link = |p: &str| {
            std::fs::read_link(etc.join(p))
                .unwrap()
                .display()
                .to_string()
        };
        assert_eq!(
            link("multi-user.target.wants/a.service"),
            "/usr/lib/systemd/system/a.service"
        );
        assert_eq!(link("b.service"), "/usr/lib/systemd/system/a.service");
        assert_eq!(
            link("sockets.target.wants/c.socket"),
            "/usr/lib/systemd/system/c.socket"
        );
        assert_eq!(
            link("getty.target.wants/getty@ttyS0.service"),
            "/usr/lib/systemd/system/getty@.service"
        );
        assert_eq!(link("d.service"), "/dev/null");

        apply_units(&tree, &[], &["a.service".into()], &[]).unwrap();
        assert!(etc
            .join("multi-user.target.wants/a.service")
            .symlink_metadata()
            .is_err());

        let err = apply_units(&tree, &["missing.service".into()], &[], &[]).unwrap_err();
        assert!(
            err.to_string().contains("no unit file missing.service"),
            "{err}"
        );
    }

    /// The layout step on a tree whose top-level directories are symlinks to
    /// the build machine: the links are replaced, their targets untouched.
    /// (It used to empty the target of `/var`, and move a kernel out of the
    /// target of `/boot`.)
    #[test]
    fn layout_never_follows_the_trees_symlinks_out() {
        let base = tempfile::tempdir().unwrap();
        let outside = base.path().join("outside");
        std::fs::create_dir_all(outside.join("lib/dpkg")).unwrap();
        std::fs::write(outside.join("keep"), "host").unwrap();
        std::fs::write(outside.join("vmlinuz-6.1.0-x"), "host kernel").unwrap();
        std::fs::write(outside.join("initrd.img-6.1.0-x"), "host initrd").unwrap();
        let t = base.path().join("tree");
        std::fs::create_dir_all(t.join("usr/lib")).unwrap();
        for link in ["var", "boot", "home", "opt", "run", "tmp", "etc"] {
            std::os::unix::fs::symlink(&outside, t.join(link)).unwrap();
        }
        std::os::unix::fs::symlink(&outside, t.join("usr/local")).unwrap();
        let root = Root::open(&t).unwrap();
        let facts = ostree_layout(&root).unwrap();
        assert_eq!(facts.kernel, None);
        let mut left: Vec<String> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["initrd.img-6.1.0-x", "keep", "lib", "vmlinuz-6.1.0-x"]
        );
        assert!(outside.join("lib/dpkg").is_dir());
        for d in ["var", "boot", "run"] {
            let md = std::fs::symlink_metadata(t.join(d)).unwrap();
            assert!(md.is_dir(), "/{d} is a directory of the tree now");
        }
        assert_eq!(
            std::fs::read_link(t.join("home")).unwrap(),
            Path::new("var/home")
        );
        let tmpfiles = std::fs::read_to_string(t.join(TMPFILES_VAR)).unwrap();
        assert!(!tmpfiles.contains("dpkg"), "{tmpfiles}");
    }

    #[test]
    fn var_becomes_tmpfiles_lines() {
        let root = tempfile::tempdir().unwrap();
        let var = root.path().join("var");
        std::fs::create_dir_all(var.join("lib/app")).unwrap();
        std::fs::write(var.join("lib/app/state"), "x").unwrap();
        std::os::unix::fs::symlink("../run/lock", var.join("lock")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(var.join("lib/app"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        let text = var_tmpfiles(&var).unwrap();
        let uid = nix::unistd::getuid();
        let gid = nix::unistd::getgid();
        assert_eq!(
            text,
            format!("d /var/lib 0755 {uid} {gid} - -\nd /var/lib/app 0750 {uid} {gid} - -\nL /var/lock - - - - ../run/lock\n")
        );
    }
}
