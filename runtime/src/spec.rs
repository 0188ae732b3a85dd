//! Every container is described as an OCI runtime config (`config.json`);
//! the launcher does what that config says. Building it is pure, so it is
//! unit tested without root.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxIdMappingBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder,
    LinuxSyscallBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use crate::cgroup::{Limits, CPU_PERIOD_US};
use crate::image::ImageConfig;
use crate::userns::IdRange;
use cairn_contracts::rootpath::resolve_in_root;

pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `-v SRC:DST[:ro|:rw]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Volume {
    pub source: PathBuf,
    pub destination: String,
    pub readonly: bool,
}

impl Volume {
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, ro) = match parts[..] {
            [src, dst] => (src, dst, false),
            [src, dst, "ro"] => (src, dst, true),
            [src, dst, "rw"] => (src, dst, false),
            _ => bail!("-v {s:?}: write it as SRC:DST, SRC:DST:ro or SRC:DST:rw"),
        };
        if !src.starts_with('/') || !dst.starts_with('/') {
            bail!("-v {s:?}: both paths must be absolute");
        }
        if dst.split('/').any(|c| c == "..") {
            bail!("-v {s:?}: the destination may not contain '..'");
        }
        if dst == "/" {
            bail!("-v {s:?}: cannot mount over the container's root");
        }
        let source = PathBuf::from(src);
        if !source.exists() {
            bail!("-v {s:?}: {src} does not exist on the host");
        }
        Ok(Self {
            source,
            destination: dst.trim_end_matches('/').to_string(),
            readonly: ro,
        })
    }
}

/// Docker's default set minus MKNOD (this runtime keeps no device allow-list,
/// so device nodes must not be creatable).
pub const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::NetRaw,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

// Shared with build.rs, which compiles the default filter once, at build time.
include!("denied_syscalls.rs");

pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

pub fn default_seccomp() -> Result<LinuxSeccomp> {
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .syscalls(vec![LinuxSyscallBuilder::default()
            .names(
                DENIED_SYSCALLS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(libc::EPERM as u32)
            .build()?])
        .build()?)
}

/// Everything the config is made from.
pub struct SpecInput<'a> {
    pub hostname: &'a str,
    pub image: &'a ImageConfig,
    /// The image's tree, to resolve the user and the command in.
    pub image_root: &'a Path,
    /// Where the container's root will be mounted.
    pub rootfs: &'a Path,
    /// Replaces the image's Cmd (the Entrypoint stays).
    pub command: &'a [String],
    pub env: &'a [String],
    pub volumes: &'a [Volume],
    pub limits: &'a Limits,
    pub cgroups_path: Option<PathBuf>,
    /// The container's own host id range (a user namespace); `None` runs it
    /// with the host's ids (`--userns=host`).
    pub userns: Option<IdRange>,
    /// Its stdin, stdout and stderr are a console (`-t`).
    pub terminal: bool,
}

/// The argv to run: Entrypoint + (command or Cmd), per the OCI image spec.
pub fn argv(image: &ImageConfig, command: &[String]) -> Vec<String> {
    let mut v = image.entrypoint.clone();
    v.extend(if command.is_empty() {
        image.cmd.clone()
    } else {
        command.to_vec()
    });
    v
}

/// Image Env, then `-e` values (later ones win), and a PATH if there is none.
pub fn merged_env(image: &[String], extra: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for e in image.iter().chain(extra) {
        let (k, _) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("-e {e:?}: write it as KEY=VALUE"))?;
        if k.is_empty() {
            bail!("-e {e:?}: empty variable name");
        }
        out.retain(|o| o.split_once('=').map(|(ok, _)| ok) != Some(k));
        out.push(e.clone());
    }
    if !out.iter().any(|e| e.starts_with("PATH=")) {
        out.insert(0, DEFAULT_PATH.to_string());
    }
    Ok(out)
}

/// Find the program in the image the way execvp would, so a missing command
/// is reported before anything is set up. Returns the absolute in-container path.
pub fn find_program(root: &Path, program: &str, env: &[String]) -> Result<String> {
    let is_exec = |p: &str| -> bool {
        use std::os::unix::fs::PermissionsExt;
        resolve_in_root(root, Path::new(p), true)
            .ok()
            .and_then(|h| std::fs::metadata(h).ok())
            .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        if is_exec(program) {
            return Ok(program.to_string());
        }
        bail!("command {program:?} not found in the image (or not executable)");
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(&DEFAULT_PATH[5..]);
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let cand = format!("{}/{program}", dir.trim_end_matches('/'));
        if is_exec(&cand) {
            return Ok(cand);
        }
    }
    bail!("command {program:?} not found in the image's PATH ({path})")
}

/// The most of an image's /etc/passwd or /etc/group that is read.
const USER_DB_MAX: u64 = 4 << 20;

/// `User` of the image config: `uid`, `uid:gid`, `name` or `name:group`,
/// names looked up in the image's /etc/passwd and /etc/group.
pub fn resolve_user(root: &Path, user: Option<&str>) -> Result<(u32, u32, Vec<u32>)> {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Ok((0, 0, vec![]));
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let read = |f: &str| -> Result<String> {
        use std::io::Read;
        let Some(file) = resolve_in_root(root, Path::new(f), true)
            .ok()
            .and_then(|p| std::fs::File::open(p).ok())
        else {
            return Ok(String::new());
        };
        // The image's file: bounded, a huge one must not exhaust the node.
        let mut text = String::new();
        file.take(USER_DB_MAX + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("reading the image's {f}"))?;
        if text.len() as u64 > USER_DB_MAX {
            bail!("the image's {f} is larger than {} KiB", USER_DB_MAX / 1024);
        }
        Ok(text)
    };
    let passwd = read("/etc/passwd")?;
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(uid) => {
            let gid = passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 3 && f[2] == u)
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(0);
            (uid, gid)
        }
        Err(_) => {
            let f = passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 3 && f[0] == u)
                .ok_or_else(|| anyhow!("user {u:?} of the image is not in its /etc/passwd"))?;
            (
                f[2].parse().context("bad uid in /etc/passwd")?,
                f[3].parse().context("bad gid in /etc/passwd")?,
            )
        }
    };
    let group = read("/etc/group")?;
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[0] == g)
                .ok_or_else(|| anyhow!("group {g:?} of the image is not in its /etc/group"))?[2]
                .parse()
                .context("bad gid in /etc/group")?,
        };
    }
    let name = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == uid.to_string())
        .map(|f| f[0].to_string());
    let mut extra: Vec<u32> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| {
            f.len() > 3
                && name
                    .as_deref()
                    .is_some_and(|n| f[3].split(',').any(|m| m == n))
        })
        .filter_map(|f| f[2].parse().ok())
        .filter(|g| *g != gid)
        .collect();
    extra.sort_unstable();
    extra.dedup();
    Ok((uid, gid, extra))
}

fn mount(dst: &str, typ: &str, src: &str, opts: &[&str]) -> Result<Mount> {
    Ok(MountBuilder::default()
        .destination(dst)
        .typ(typ)
        .source(src)
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// The user namespace id range of a config, if it asks for one.
pub fn userns_range(spec: &Spec) -> Option<IdRange> {
    let linux = spec.linux().as_ref()?;
    let wants = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::User);
    let m = linux.uid_mappings().as_ref()?.first()?;
    (wants && m.container_id() == 0).then(|| IdRange {
        host_start: m.host_id(),
        size: m.size(),
    })
}

/// The OCI runtime config of a container.
pub fn build(input: &SpecInput) -> Result<Spec> {
    let mut env = merged_env(&input.image.env, input.env)?;
    if input.terminal && !env.iter().any(|e| e.starts_with("TERM=")) {
        // What podman and docker give a container with a terminal.
        env.push("TERM=xterm".into());
    }
    let mut args = argv(input.image, input.command);
    if args.is_empty() {
        bail!("the image has no Entrypoint or Cmd: give a command after the image name");
    }
    args[0] = find_program(input.image_root, &args[0], &env)?;
    let (uid, gid, extra) = resolve_user(input.image_root, input.image.user.as_deref())?;
    let caps: HashSet<Capability> = DEFAULT_CAPABILITIES.iter().copied().collect();
    let process = ProcessBuilder::default()
        .terminal(input.terminal)
        .args(args)
        .env(env)
        .cwd(
            input
                .image
                .working_dir
                .clone()
                .unwrap_or_else(|| "/".into()),
        )
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .additional_gids(extra)
                .build()?,
        )
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps.clone())
                .inheritable(HashSet::new())
                .ambient(HashSet::new())
                .build()?,
        )
        .no_new_privileges(true)
        .build()?;

    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount("/tmp", "tmpfs", "tmpfs", &["nosuid", "nodev", "mode=1777"])?,
        mount("/run", "tmpfs", "tmpfs", &["nosuid", "nodev", "mode=755"])?,
    ];
    for v in input.volumes {
        let src = v.source.to_str().context("volume source is not UTF-8")?;
        let mut opts = vec!["rbind", "nosuid", "nodev"];
        if v.readonly {
            opts.push("ro");
        }
        mounts.push(mount(&v.destination, "bind", src, &opts)?);
    }

    let ns = |t| LinuxNamespaceBuilder::default().typ(t).build();
    let mut namespaces = vec![
        ns(LinuxNamespaceType::Pid)?,
        ns(LinuxNamespaceType::Mount)?,
        ns(LinuxNamespaceType::Network)?,
        ns(LinuxNamespaceType::Uts)?,
        ns(LinuxNamespaceType::Ipc)?,
        ns(LinuxNamespaceType::Cgroup)?,
    ];
    if input.userns.is_some() {
        namespaces.push(ns(LinuxNamespaceType::User)?);
    }
    let mut res = LinuxResourcesBuilder::default();
    if let Some(m) = input.limits.memory {
        res = res.memory(LinuxMemoryBuilder::default().limit(m as i64).build()?);
    }
    if input.limits.cpu_quota_us.is_some() || input.limits.cpu_weight.is_some() {
        let mut cpu = LinuxCpuBuilder::default();
        if let Some(q) = input.limits.cpu_quota_us {
            cpu = cpu.quota(q as i64).period(CPU_PERIOD_US);
        }
        if let Some(w) = input.limits.cpu_weight {
            // OCI speaks cgroup v1 shares; convert the v2 weight back (runc's formula, inverted).
            cpu = cpu.shares(2 + ((w.saturating_sub(1)) * 262142) / 9999);
        }
        res = res.cpu(cpu.build()?);
    }
    if let Some(p) = input.limits.pids {
        res = res.pids(LinuxPidsBuilder::default().limit(p as i64).build()?);
    }
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(res.build()?)
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .seccomp(default_seccomp()?)
        .rootfs_propagation("private");
    if let Some(cg) = &input.cgroups_path {
        linux = linux.cgroups_path(cg.clone());
    }
    if let Some(r) = &input.userns {
        let map = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(r.host_start)
            .size(r.size)
            .build()?;
        linux = linux.uid_mappings(vec![map]).gid_mappings(vec![map]);
    }
    Ok(SpecBuilder::default()
        .version("1.0.2")
        .hostname(input.hostname)
        .root(
            RootBuilder::default()
                .path(input.rootfs)
                .readonly(true)
                .build()?,
        )
        .process(process)
        .mounts(mounts)
        .linux(linux.build()?)
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn image_tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("bin/busybox"), "#!").unwrap();
        std::fs::set_permissions(
            r.join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        std::fs::write(
            r.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:1000:1000::/srv:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:\nweb:x:1000:\nlog:x:4:web\n").unwrap();
        d
    }

    #[test]
    fn oci_config_from_image_and_options() {
        let tree = image_tree();
        let image = ImageConfig {
            entrypoint: vec!["sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            env: vec!["PATH=/bin".into(), "A=1".into()],
            working_dir: Some("/srv".into()),
            user: Some("web".into()),
            ..Default::default()
        };
        let limits = Limits {
            memory: Some(64 << 20),
            cpu_quota_us: Some(50_000),
            cpu_weight: Some(100),
            pids: Some(32),
        };
        let vol_src = tempfile::tempdir().unwrap();
        let v = Volume::parse(&format!("{}:/data:ro", vol_src.path().display())).unwrap();
        let spec = build(&SpecInput {
            hostname: "web1",
            image: &image,
            image_root: tree.path(),
            rootfs: Path::new("/x/rootfs"),
            command: &["echo bye".to_string()],
            env: &["A=2".to_string(), "B=3".to_string()],
            volumes: &[v],
            limits: &limits,
            cgroups_path: Some("/cairn.slice/web1".into()),
            userns: None,
            terminal: false,
        })
        .unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/bin/sh", "-c", "echo bye"]);
        assert_eq!(p.env().as_ref().unwrap(), &["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(p.cwd(), Path::new("/srv"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(p.user().additional_gids().as_ref().unwrap(), &[4]);
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .as_ref()
            .unwrap();
        assert!(
            caps.contains(&Capability::NetRaw)
                && !caps.contains(&Capability::SysAdmin)
                && !caps.contains(&Capability::Mknod)
        );
        assert_eq!(spec.hostname().as_deref(), Some("web1"));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let mounts = spec.mounts().as_ref().unwrap();
        let data = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/data"))
            .unwrap();
        assert!(data.options().as_ref().unwrap().contains(&"ro".to_string()));
        assert!(mounts
            .iter()
            .any(|m| m.destination() == Path::new("/tmp") && m.typ().as_deref() == Some("tmpfs")));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(linux.namespaces().as_ref().unwrap().len(), 6);
        let r = linux.resources().as_ref().unwrap();
        assert_eq!(r.memory().unwrap().limit(), Some(64 << 20));
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(50_000));
        assert_eq!(r.pids().unwrap().limit(), 32);
        let sc = linux.seccomp().as_ref().unwrap();
        assert!(sc.syscalls().as_ref().unwrap()[0]
            .names()
            .contains(&"kexec_load".to_string()));
        // It round-trips as config.json.
        let json = serde_json::to_string(&spec).unwrap();
        let back: Spec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
    }

    /// The check of execCPUAffinity that third_party/oci-spec writes out
    /// instead of a regex: CPU lists of ASCII numbers and ranges only.
    #[test]
    fn a_read_back_spec_checks_exec_cpu_affinity() {
        let process = |affinity: &str| {
            serde_json::from_value::<oci_spec::runtime::Process>(serde_json::json!({
                "cwd": "/",
                "user": {"uid": 0, "gid": 0},
                "execCPUAffinity": {"initial": affinity, "final": affinity},
            }))
        };
        for good in ["0", "7", "0-3", "0-3,7", "1,2,3", "10-20,30-40"] {
            let p = process(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            let affinity = p.exec_cpu_affinity().as_ref().unwrap();
            assert_eq!(affinity.cpu_affinity_final().as_deref(), Some(good));
        }
        for bad in [
            "", ",", "1,", ",1", "1-", "-1", "1-2-3", "1--2", "a", "1 ", "\u{0663}", "1,,2",
        ] {
            assert!(process(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn missing_command_and_bad_input() {
        let tree = image_tree();
        let err = find_program(tree.path(), "nginx", &["PATH=/bin:/usr/bin".into()]).unwrap_err();
        assert!(
            err.to_string().contains("not found in the image's PATH"),
            "{err}"
        );
        assert_eq!(find_program(tree.path(), "sh", &[]).unwrap(), "/bin/sh");
        let empty = ImageConfig::default();
        let r = build(&SpecInput {
            hostname: "h",
            image: &empty,
            image_root: tree.path(),
            rootfs: Path::new("/r"),
            command: &[],
            env: &[],
            volumes: &[],
            limits: &Limits::default(),
            cgroups_path: None,
            userns: None,
            terminal: false,
        });
        assert!(r.unwrap_err().to_string().contains("no Entrypoint or Cmd"));
        assert!(Volume::parse("/tmp").is_err());
        assert!(Volume::parse("/tmp:/x:rx").is_err());
        assert!(Volume::parse("/nonexistent-path-xyz:/x").is_err());
        assert!(merged_env(&[], &["NOEQUALS".into()]).is_err());
        assert_eq!(
            resolve_user(tree.path(), Some("1000:4")).unwrap(),
            (1000, 4, vec![])
        );
        assert!(resolve_user(tree.path(), Some("nobody")).is_err());
        // The image's user database is read inside the image, and bounded.
        let hostile = tempfile::tempdir().unwrap();
        std::fs::create_dir(hostile.path().join("etc")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), "app:x:7:7::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("passwd"),
            hostile.path().join("etc/passwd"),
        )
        .unwrap();
        let err = resolve_user(hostile.path(), Some("app")).unwrap_err();
        assert!(err.to_string().contains("not in its /etc/passwd"), "{err}");
        std::fs::remove_file(hostile.path().join("etc/passwd")).unwrap();
        let f = std::fs::File::create(hostile.path().join("etc/passwd")).unwrap();
        f.set_len(USER_DB_MAX + 1).unwrap();
        let err = resolve_user(hostile.path(), Some("app")).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }
}
