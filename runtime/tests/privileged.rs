//! Privileged tests of the runtime: real imports, namespaces, mounts, veths.
//!
//! They behave like `#[ignore = "privileged: needs root; run by scripts/test"]`
//! tests (listed as ignored unless `--ignored`/`--include-ignored` is given),
//! but run under a harness of our own, for two reasons: containers are forked
//! from the test process, which is best kept single-threaded, and detached
//! containers need a monitor process — this binary run as `--monitor`.
//!
//! Every test builds its images itself (an OCI layout of the host's static
//! busybox; one test also with buildah, skopeo and umoci, through
//! `support/tool_images.rs`), uses a temporary state root, its own bridge
//! (`ct<pid>`) and subnet, and removes all of it in Drop guards, failed or
//! not.

#[path = "support/store.rs"]
mod store;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use store::StoreExt;

use cairn_runtime::cgroup::Limits;
use cairn_runtime::engine::HealthCheck;
use cairn_runtime::net::NetworkConfig;
use cairn_runtime::spec::Volume;
use cairn_runtime::state::{Health, RestartPolicy, Status};
use cairn_runtime::{RunOptions, RunOutcome, Runtime};
use sha2::Digest as _;

#[path = "support/tool_images.rs"]
mod tool_images;

// ---------------------------------------------------------------- harness

type TestFn = fn();

const TESTS: &[(&str, TestFn)] = &[
    (
        "a_detached_containers_log_is_rotated_by_size",
        a_detached_containers_log_is_rotated_by_size,
    ),
    (
        "import_verify_whiteouts_and_archive",
        import_verify_whiteouts_and_archive,
    ),
    (
        "digest_mismatch_is_refused_and_leaves_nothing",
        digest_mismatch_is_refused_and_leaves_nothing,
    ),
    (
        "exit_codes_and_bad_input_leave_nothing",
        exit_codes_and_bad_input_leave_nothing,
    ),
    ("read_only_root_and_isolation", read_only_root_and_isolation),
    (
        "containers_talk_over_the_bridge",
        containers_talk_over_the_bridge,
    ),
    ("health_exec_stop_and_restart", health_exec_stop_and_restart),
    (
        "an_idle_monitor_stays_one_process_and_wakes_for_each_event",
        an_idle_monitor_stays_one_process_and_wakes_for_each_event,
    ),
    (
        "cleanup_after_rm_and_after_a_crashed_monitor",
        cleanup_after_rm_and_after_a_crashed_monitor,
    ),
    (
        "cgroup_v2_placement_and_cleanup",
        cgroup_v2_placement_and_cleanup,
    ),
    (
        "auto_remove_records_live_on_tmpfs",
        auto_remove_records_live_on_tmpfs,
    ),
    (
        "user_namespace_holder_maps_the_range_and_is_reaped",
        user_namespace_holder_maps_the_range_and_is_reaped,
    ),
    (
        "prune_keeps_what_tags_and_containers_use",
        prune_keeps_what_tags_and_containers_use,
    ),
    (
        "user_namespace_maps_root_and_keeps_image_owners",
        user_namespace_maps_root_and_keeps_image_owners,
    ),
    (
        "volumes_are_read_only_nosuid_nodev_all_the_way_down",
        volumes_are_read_only_nosuid_nodev_all_the_way_down,
    ),
    (
        "exec_cannot_rewrite_the_host_binary",
        exec_cannot_rewrite_the_host_binary,
    ),
    (
        "images_made_by_tools_run_in_a_user_namespace",
        images_made_by_tools_run_in_a_user_namespace,
    ),
    (
        "foreground_run_reaps_only_its_own_children",
        foreground_run_reaps_only_its_own_children,
    ),
    (
        "detached_start_is_reported_over_a_pipe",
        detached_start_is_reported_over_a_pipe,
    ),
];

/// Exit codes of the attacker in [`exec_cannot_rewrite_the_host_binary`].
const ATTACK_DENIED: i32 = 42;
const ATTACK_WORKED: i32 = 43;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("/evil") {
        // This binary, run inside a container through the image's
        // `#!/proc/self/exe` script: CVE-2019-5736 in miniature. Whoever
        // can open the host's binary for writing can replace it.
        let access = nix::unistd::access("/proc/self/exe", nix::unistd::AccessFlags::W_OK);
        let open = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/exe");
        eprintln!(
            "attacker: access {access:?}, open {:?}",
            open.as_ref().err()
        );
        let denied = access == Err(nix::errno::Errno::EACCES)
            && open.is_err_and(|e| e.raw_os_error() == Some(libc::EACCES));
        std::process::exit(if denied { ATTACK_DENIED } else { ATTACK_WORKED });
    }
    if args.get(1).map(String::as_str) == Some("--idle") {
        // An idle monitor's waiting room, as host-monitor is (idle::wait
        // takes "--idle" for the program name).
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        if let Err(e) = cairn_runtime::idle::wait(&args) {
            eprintln!("idle: {e:#}");
        }
        std::process::exit(1);
    }
    if args.get(1).map(String::as_str) == Some("--monitor") {
        // Entry point of a detached container's monitor:
        // --monitor ROOT BRIDGE SUBNET NAME [CGROUP_ROOT SLICE]
        let cg = (args.len() > 7).then(|| (args[6].as_str(), args[7].as_str()));
        let rt = runtime_at(Path::new(&args[2]), &args[3], &args[4], cg);
        // Idle, it waits in this same binary (--idle above), so these tests
        // cover the hand-off the product's monitor makes.
        let exe = std::env::current_exe().expect("own path");
        let idle = cairn_runtime::monitor::IdleExec {
            waiter: exe.clone(),
            waiter_args: vec!["--idle".into()],
            resume: std::iter::once(exe.into_os_string())
                .chain(std::env::args_os().skip(1))
                .collect(),
        };
        let code = match cairn_runtime::monitor::supervise(&rt, &args[5], Some(idle)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("monitor: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
    let list = args.iter().any(|a| a == "--list");
    let run_ignored = args
        .iter()
        .any(|a| a == "--ignored" || a == "--include-ignored");
    let filters: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<_> = TESTS
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .collect();
    if list {
        for (n, _) in &selected {
            println!("{n}: test");
        }
        return;
    }
    let filtered = TESTS.len() - selected.len();
    println!("\nrunning {} tests", selected.len());
    if !run_ignored {
        for (n, _) in &selected {
            println!("test {n} ... ignored, privileged: needs root; run by scripts/test");
        }
        println!("\ntest result: ok. 0 passed; 0 failed; {} ignored; 0 measured; {filtered} filtered out\n", selected.len());
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        panic!("privileged runtime tests must run as root (namespaces, mounts, veths): run scripts/test as root");
    }
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, f) in &selected {
        print!("test {name} ... ");
        std::io::stdout().flush().ok();
        let t = Instant::now();
        match std::panic::catch_unwind(f) {
            Ok(()) => {
                println!("ok ({:.1}s)", t.elapsed().as_secs_f64());
                passed += 1;
            }
            Err(_) => {
                println!("FAILED");
                failed.push(*name);
            }
        }
    }
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    if !failed.is_empty() {
        println!("\nfailures:\n    {}", failed.join("\n    "));
    }
    println!(
        "\ntest result: {verdict}. {passed} passed; {} failed; 0 ignored; 0 measured; {filtered} filtered out\n",
        failed.len()
    );
    if !failed.is_empty() {
        std::process::exit(101);
    }
}

// ---------------------------------------------------------------- fixtures

/// A runtime over `root`; `cgroups` (root, slice) overrides the cgroup location.
fn runtime_at(root: &Path, bridge: &str, subnet: &str, cgroups: Option<(&str, &str)>) -> Runtime {
    let mut rt = Runtime::new(root, NetworkConfig::parse(bridge, subnet).unwrap());
    if let Some((cg_root, slice)) = cgroups {
        rt.cgroups = cairn_runtime::cgroup::CgroupManager::new(cg_root, slice);
    }
    let (b, s) = (bridge.to_string(), subnet.to_string());
    let cg = cgroups.map(|(r, s)| (r.to_string(), s.to_string()));
    rt.monitor_command = Some(Box::new(move |root: &Path, name: &str| {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.arg("--monitor").arg(root).arg(&b).arg(&s).arg(name);
        if let Some((r, s)) = &cg {
            c.arg(r).arg(s);
        }
        c
    }));
    rt
}

fn volume(s: &str) -> Volume {
    Volume::parse(s).unwrap()
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A temporary runtime with its own root, bridge and subnet; Drop removes
/// every container (stopping it), the bridge and the root.
struct Env {
    rt: Runtime,
    _root: tempfile::TempDir,
    layout: PathBuf,
}

impl Env {
    fn new() -> Self {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let pid = std::process::id();
        let bridge = format!("ct{}x{n}", pid % 1_000_000);
        let subnet = format!(
            "10.{}.{}.1/24",
            100 + (pid % 100),
            (pid / 100 + n * 37) % 250
        );
        let root = tempfile::tempdir().unwrap();
        let rt = runtime_at(root.path(), &bridge, &subnet, None);
        let layout = root.path().join("busybox-oci");
        make_busybox_layout(&layout);
        Env {
            rt,
            _root: root,
            layout,
        }
    }

    fn import(&self) -> cairn_runtime::image::ImageInfo {
        self.rt.import(&self.layout, None).unwrap()
    }

    fn opts(&self, name: &str, cmd: &[&str]) -> RunOptions {
        RunOptions {
            image: "busybox:test".into(),
            name: Some(name.into()),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            stop_timeout: 2,
            ..Default::default()
        }
    }

    /// Start detached and wait until it has exited; returns (exit code, log).
    fn run_to_end(&self, opts: RunOptions) -> (i32, String) {
        let name = opts.name.clone().unwrap();
        let mut o = opts;
        o.detach = true;
        self.rt.run(&o).unwrap();
        let st = self.wait_status(&name, &[Status::Exited], Duration::from_secs(20));
        let mut log = Vec::new();
        self.rt.logs(&name, false, &mut log).unwrap();
        (
            st.exit_code.unwrap(),
            String::from_utf8_lossy(&log).into_owned(),
        )
    }

    fn wait_status(
        &self,
        name: &str,
        want: &[Status],
        limit: Duration,
    ) -> cairn_runtime::state::ContainerState {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.rt.state(name).unwrap();
            if want.contains(&st.observed()) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: still {:?} (want {want:?}): {st:?}",
                st.observed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self, name: &str) -> String {
        let mut log = Vec::new();
        self.rt.logs(name, false, &mut log).unwrap();
        String::from_utf8_lossy(&log).into_owned()
    }

    fn wait_log(&self, name: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = self.log(name);
            if l.contains(needle) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: log never showed {needle:?}:\n{l}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The allocator's address → owner map, as text.
    fn allocations(&self) -> String {
        let f = std::fs::read(
            self.rt
                .paths
                .net()
                .join(format!("{}.json", self.rt.network.bridge)),
        )
        .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&f).unwrap_or_default();
        v["allocated"].to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(list) = self.rt.ps() {
            for c in list {
                let _ = self.rt.rm(&c.name, true);
            }
        }
        let _ = cairn_runtime::net::delete_link(&self.rt.network.bridge);
    }
}

fn sha256(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// Write a blob into the layout; returns an OCI descriptor for it.
fn blob(layout: &Path, media: &str, data: &[u8]) -> serde_json::Value {
    let h = sha256(data);
    std::fs::write(layout.join("blobs/sha256").join(&h), data).unwrap();
    serde_json::json!({ "mediaType": media, "digest": format!("sha256:{h}"), "size": data.len() })
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar_header(tar::EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = tar_header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, path, std::io::empty()).unwrap();
}

/// An OCI image layout of the host's static busybox, in three layers
/// (gzip, plain tar, zstd) that exercise whiteouts and an opaque directory.
fn make_busybox_layout(layout: &Path) {
    make_busybox_layout_version(layout, "1");
}

/// The same image with `etc/image-version` saying `version`.
fn make_busybox_layout_version(layout: &Path, version: &str) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static is installed (scripts/setup)");
    let applets = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    let applets = String::from_utf8(applets.stdout).unwrap();

    let mut l1 = tar::Builder::new(Vec::new());
    for d in [
        "bin/",
        "etc/",
        "root/",
        "data/",
        "data/sub/",
        "www/",
        "home/",
    ] {
        add_dir(&mut l1, d);
    }
    add_file(&mut l1, "bin/busybox", &busybox, 0o755);
    for a in applets.lines().filter(|a| *a != "busybox") {
        let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0);
        l1.append_link(&mut h, format!("bin/{a}"), "busybox")
            .unwrap();
    }
    add_file(
        &mut l1,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    );
    add_file(
        &mut l1,
        "etc/group",
        b"root:x:0:\nnogroup:x:65534:\n",
        0o644,
    );
    add_file(&mut l1, "etc/gone", b"lower layer\n", 0o644);
    add_file(&mut l1, "etc/image-version", version.as_bytes(), 0o644);
    add_file(&mut l1, "data/old", b"old\n", 0o644);
    add_file(&mut l1, "data/sub/deep", b"deep\n", 0o644);
    add_file(&mut l1, "www/index.html", b"hello over http\n", 0o644);
    // Owned by a user of the image: it keeps its owner inside a user namespace.
    let mut h = tar_header(tar::EntryType::Directory, 0o750, 0);
    h.set_uid(1000);
    h.set_gid(1000);
    l1.append_data(&mut h, "home/app/", std::io::empty())
        .unwrap();
    let mut h = tar_header(tar::EntryType::Regular, 0o640, 4);
    h.set_uid(1000);
    h.set_gid(100);
    l1.append_data(&mut h, "home/app/owned", &b"app\n"[..])
        .unwrap();
    // Interpreted by whatever runs it: see exec_cannot_rewrite_the_host_binary.
    add_file(&mut l1, "evil", b"#!/proc/self/exe\n", 0o755);
    let l1 = l1.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&l1).unwrap();
    let l1gz = gz.finish().unwrap();

    let mut l2 = tar::Builder::new(Vec::new());
    add_dir(&mut l2, "etc/");
    add_file(&mut l2, "etc/.wh.gone", b"", 0o644);
    add_file(&mut l2, "etc/added", b"upper layer\n", 0o644);
    add_dir(&mut l2, "data/");
    add_file(&mut l2, "data/.wh..wh..opq", b"", 0o644);
    add_file(&mut l2, "data/new", b"new\n", 0o644);
    let l2 = l2.into_inner().unwrap();

    let mut l3 = tar::Builder::new(Vec::new());
    add_file(&mut l3, "etc/zstd-layer", b"zstd\n", 0o644);
    let l3 = l3.into_inner().unwrap();
    let l3z = zstd::encode_all(&l3[..], 3).unwrap();

    let config = serde_json::json!({
        "created": "2026-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/sh", "-c", "echo hello from busybox"],
            "WorkingDir": "/",
            "StopSignal": "SIGUSR1",
            "ExposedPorts": { "8080/tcp": {} },
            "Labels": { "org.example.test": "yes" }
        },
        "rootfs": { "type": "layers", "diff_ids": [
            format!("sha256:{}", sha256(&l1)),
            format!("sha256:{}", sha256(&l2)),
            format!("sha256:{}", sha256(&l3)),
        ]}
    });
    let cfg = blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": [
            blob(layout, "application/vnd.oci.image.layer.v1.tar+gzip", &l1gz),
            blob(layout, "application/vnd.oci.image.layer.v1.tar", &l2),
            blob(layout, "application/vnd.oci.image.layer.v1.tar+zstd", &l3z),
        ]
    });
    let mut m = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    m["annotations"] =
        serde_json::json!({ "org.opencontainers.image.ref.name": "localhost/busybox:test" });
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [m] });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

fn descriptor_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn link_exists(name: &str) -> bool {
    // iproute2's view, not the runtime's own netlink code.
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "dev", name])
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    out.status.success()
}

/// The kernel removes a dead container's veth pair with its network
/// namespace, asynchronously: allow it a moment.
fn link_gone(name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while link_exists(name) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

// ---------------------------------------------------------------- tests

fn import_verify_whiteouts_and_archive() {
    let env = Env::new();
    let info = env.import();
    assert_eq!((info.name.as_str(), info.tag.as_str()), ("busybox", "test"));
    assert_eq!(info.manifest_digest, descriptor_digest(&env.layout));
    assert_eq!(
        info.config.cmd,
        ["/bin/sh", "-c", "echo hello from busybox"]
    );
    assert_eq!(info.config.exposed_ports, ["8080/tcp"]);
    assert_eq!(
        info.config
            .labels
            .get("org.example.test")
            .map(String::as_str),
        Some("yes")
    );
    let images = env.rt.images().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].ostree_ref, "cairn/app/busybox/test");

    let (v, objects) = env.rt.verify("busybox:test").unwrap();
    assert_eq!(v.commit, info.commit);
    assert!(objects > 5, "{objects} objects");
    // The stock ostree CLI agrees about the ref and the repository's health.
    let repo = env.rt.paths.repo();
    let out = std::process::Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args(["rev-parse", "cairn/app/busybox/test"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), info.commit);
    let fsck = std::process::Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .arg("fsck")
        .status()
        .unwrap();
    assert!(fsck.success());

    // Whiteouts, the opaque dir and all three compressions, as the tree shows them.
    let repo_h = env.rt.repo().unwrap();
    let tree = cairn_oci::store::ensure_checkout(&repo_h, &info.commit, &env.rt.paths.checkouts())
        .unwrap();
    assert!(!tree.join("etc/gone").exists(), "whiteout applied");
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/added")).unwrap(),
        "upper layer\n"
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/zstd-layer")).unwrap(),
        "zstd\n"
    );
    assert!(tree.join("data/new").exists());
    assert!(
        !tree.join("data/old").exists() && !tree.join("data/sub").exists(),
        "opaque dir applied"
    );
    assert!(tree.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(tree.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );

    // By digest.
    let by_digest = env
        .rt
        .repo()
        .map(|r| cairn_oci::image::resolve(&r, &format!("busybox@{}", info.manifest_digest)))
        .unwrap()
        .unwrap();
    assert_eq!(by_digest.commit, info.commit);

    // The same layout as an oci-archive tar: same content, same commit.
    let archive = env.layout.with_extension("tar");
    let mut b = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    b.append_dir_all(".", &env.layout).unwrap();
    b.finish().unwrap();
    drop(b);
    let a = env.rt.import(&archive, Some("busybox:archive")).unwrap();
    assert_eq!(
        root_tree(&env, &a.commit),
        root_tree(&env, &info.commit),
        "same tree, stored once"
    );
    assert_eq!(env.rt.images().unwrap().len(), 2);

    // A docker save archive of the same image.
    let dsave = env.layout.with_extension("docker.tar");
    make_docker_save(&env.layout, &dsave);
    let d = env.rt.import(&dsave, None).unwrap();
    assert_eq!(d.reference(), "busybox:docker");
    assert_eq!(root_tree(&env, &d.commit), root_tree(&env, &info.commit));

    env.rt.rmi("busybox:archive").unwrap();
    env.rt.rmi("busybox:docker").unwrap();
    assert_eq!(env.rt.images().unwrap().len(), 1);
    assert!(env
        .rt
        .rmi("busybox:archive")
        .unwrap_err()
        .to_string()
        .contains("no image busybox:archive"));
    assert!(
        env.rt.verify("busybox:test").is_ok(),
        "shared objects survive the prune"
    );

    // Corrupt one stored file object: verify names the image and fails.
    let mut biggest: Option<(u64, PathBuf)> = None;
    for e in walk(&env.rt.paths.repo().join("objects")) {
        let meta = std::fs::symlink_metadata(&e).unwrap();
        if e.extension().is_some_and(|x| x == "file") && meta.is_file() {
            let len = meta.len();
            if biggest.as_ref().map_or(true, |(l, _)| len > *l) {
                biggest = Some((len, e));
            }
        }
    }
    let (_, obj) = biggest.unwrap();
    let mut data = std::fs::read(&obj).unwrap();
    data[1000] ^= 0xff;
    std::fs::write(&obj, &data).unwrap();
    let err = format!("{:#}", env.rt.verify("busybox:test").unwrap_err());
    assert!(
        err.contains("corrupt") && err.contains("busybox:test"),
        "{err}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The (contents, metadata) checksums of a commit's root directory.
fn root_tree(env: &Env, commit: &str) -> String {
    let (v, _) = env.rt.repo().unwrap().load_commit(commit).unwrap();
    format!("{} {}", v.child_value(6), v.child_value(7))
}

/// `docker save` layout: manifest.json, <config hex>.json, uncompressed layer tars.
fn make_docker_save(layout: &Path, out: &Path) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdig = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&mdig)).unwrap())
            .unwrap();
    let chex = manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut put = |name: &str, data: &[u8]| {
        let mut h = tar_header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    put(
        &format!("{chex}.json"),
        &std::fs::read(layout.join("blobs/sha256").join(&chex)).unwrap(),
    );
    let mut layers = Vec::new();
    for (i, l) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let hex = l["digest"].as_str().unwrap().trim_start_matches("sha256:");
        let raw = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
        let mut plain = Vec::new();
        std::io::copy(
            &mut cairn_oci::layer::decompress(std::io::BufReader::new(&raw[..])).unwrap(),
            &mut plain,
        )
        .unwrap();
        put(&format!("layer{i}/layer.tar"), &plain);
        layers.push(format!("layer{i}/layer.tar"));
    }
    let m = serde_json::json!([{ "Config": format!("{chex}.json"), "RepoTags": ["busybox:docker"], "Layers": layers }]);
    put("manifest.json", m.to_string().as_bytes());
    b.finish().unwrap();
}

fn digest_mismatch_is_refused_and_leaves_nothing() {
    let env = Env::new();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.layout.join("index.json")).unwrap()).unwrap();
    let mdig = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.layout.join("blobs/sha256").join(&mdig)).unwrap(),
    )
    .unwrap();
    // Flip one byte in the last (zstd) layer: same size, other content.
    let lhex = manifest["layers"][2]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let lpath = env.layout.join("blobs/sha256").join(&lhex);
    let mut data = std::fs::read(&lpath).unwrap();
    let good = data.clone();
    let at = data.len() - 6;
    data[at] ^= 0x55;
    std::fs::write(&lpath, &data).unwrap();
    let err = format!("{:#}", env.rt.import(&env.layout, None).unwrap_err());
    assert!(
        err.contains("mismatch") || err.contains("zstd") || err.contains("layer 3"),
        "{err}"
    );
    assert!(env.rt.images().unwrap().is_empty(), "nothing committed");
    let leftovers: Vec<_> = std::fs::read_dir(env.rt.paths.repo().join("tmp"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("cairn-import-"))
        .collect();
    assert!(leftovers.is_empty(), "staging removed: {leftovers:?}");
    std::fs::write(&lpath, &good).unwrap();

    // A tampered config (content no longer matches its digest).
    let chex = manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let cpath = env.layout.join("blobs/sha256").join(&chex);
    let cfg = std::fs::read(&cpath).unwrap();
    std::fs::write(
        &cpath,
        String::from_utf8_lossy(&cfg).replace("hello from", "HELLO FROM"),
    )
    .unwrap();
    let err = format!("{:#}", env.rt.import(&env.layout, None).unwrap_err());
    assert!(err.contains("digest mismatch"), "{err}");
    std::fs::write(&cpath, &cfg).unwrap();

    // A missing blob.
    std::fs::rename(&lpath, lpath.with_extension("away")).unwrap();
    let err = format!("{:#}", env.rt.import(&env.layout, None).unwrap_err());
    assert!(err.contains("missing from the image"), "{err}");
    std::fs::rename(lpath.with_extension("away"), &lpath).unwrap();
    assert!(env.rt.images().unwrap().is_empty());
    env.import();
    assert_eq!(
        env.rt.images().unwrap().len(),
        1,
        "the intact image imports"
    );
}

fn exit_codes_and_bad_input_leave_nothing() {
    let env = Env::new();
    env.import();
    // Foreground: the exit status of the container process comes back.
    let mut o = env.opts("fg", &["sh", "-c", "exit 7"]);
    o.auto_remove = true;
    match env.rt.run(&o).unwrap() {
        RunOutcome::Exited { code, .. } => assert_eq!(code, 7),
        other => panic!("{other:?}"),
    }
    assert!(!env.rt.paths.container("fg").exists(), "--rm removed it");
    // A foreground run from a threaded program: exec (from another thread)
    // and inspect find the container once it runs, the run ends with it,
    // and its records stay. Another thread may take the SIGCHLD of its end;
    // the monitor must not wait for it (its signalfd is non-blocking).
    std::thread::scope(|s| {
        let wait = "while [ ! -e /tmp/done ]; do sleep 0.05; done";
        let fg = s.spawn(|| env.rt.run(&env.opts("fgexec", &["sh", "-c", wait])));
        let running = env.wait_status("fgexec", &[Status::Running], Duration::from_secs(20));
        let checks = || -> anyhow::Result<()> {
            let inspect = env.rt.inspect("fgexec")?;
            anyhow::ensure!(inspect["config"]["hostname"] == "fgexec", "{inspect}");
            let touch = ["touch".into(), "/tmp/done".into()];
            anyhow::ensure!(env.rt.exec("fgexec", &touch, false)? == 0, "touch failed");
            Ok(())
        };
        let checked = checks();
        if let (Err(_), Some(pid)) = (&checked, running.pid) {
            // Its end, or this test would wait for it forever (its monitor
            // is this process: no stop).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let outcome = fg.join().unwrap();
        checked.unwrap();
        match outcome.unwrap() {
            RunOutcome::Exited { code, .. } => assert_eq!(code, 0),
            other => panic!("{other:?}"),
        }
    });
    let fgexec = env.rt.paths.container("fgexec");
    assert!(fgexec.join(cairn_runtime::state::CONFIG_FILE).is_file());
    env.rt.rm("fgexec", false).unwrap();
    // The image's own Cmd.
    let (code, log) = env.run_to_end(env.opts("cmd", &[]));
    assert_eq!((code, log.trim()), (0, "hello from busybox"));
    let (code, _) = env.run_to_end(env.opts("false", &["false"]));
    assert_eq!(code, 1);
    // pid 1 of its namespace: even SIGKILL from inside does not reach it.
    let (code, _) = env.run_to_end(env.opts("init", &["sh", "-c", "kill -9 $$; exit 255"]));
    assert_eq!(code, 255);

    let before = env.allocations();
    let links = |_: ()| -> std::collections::BTreeSet<String> {
        std::fs::read_dir("/sys/class/net")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let nlinks = links(());
    let bad: Vec<(RunOptions, &str)> = vec![
        (RunOptions { image: "nosuch:1".into(), ..env.opts("b1", &["true"]) }, "image nosuch:1 is not checked out"),
        (env.opts("b2", &["/bin/nosuch"]), "not found in the image"),
        (env.opts("b3", &["nosuch-cmd"]), "not found in the image's PATH"),
        (RunOptions { limits: Limits { memory: Some(12), ..Default::default() }, ..env.opts("b4", &["true"]) }, "below 1M"),
        (RunOptions { limits: Limits { cpu_quota_us: Some(0), ..Default::default() }, ..env.opts("b5", &["true"]) }, "0.01 CPUs"),
        (RunOptions { ip: Some(Ipv4Addr::new(192, 0, 2, 1)), ..env.opts("b6", &["true"]) }, "not a host address"),
        (RunOptions { volumes: vec![Volume { source: "/nonexistent-src".into(), destination: "/data".into(), readonly: false }], ..env.opts("b7", &["true"]) }, "does not exist on the host"),
        (RunOptions { image: "busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000".into(), ..env.opts("b8", &["true"]) }, "is not checked out"),
    ];
    for (o, want) in bad {
        let name = o.name.clone().unwrap();
        let err = format!("{:#}", env.rt.run(&o).unwrap_err());
        assert!(err.contains(want), "{name}: {err}");
        assert!(
            !env.rt.paths.container(&name).exists(),
            "{name}: container dir left behind"
        );
    }
    // Limits on this hybrid host are refused with a clear message; on a v2
    // host (the QEMU guest) they are applied instead.
    if cairn_runtime::cgroup::detect(Path::new("/sys/fs/cgroup"))
        == cairn_runtime::cgroup::Layout::Legacy
    {
        let err = format!(
            "{:#}",
            env.rt
                .run(&RunOptions {
                    limits: Limits {
                        memory: Some(64 << 20),
                        ..Default::default()
                    },
                    ..env.opts("b9", &["true"])
                })
                .unwrap_err()
        );
        assert!(err.contains("unified cgroup v2"), "{err}");
        assert!(!env.rt.paths.container("b9").exists());
    }
    assert_eq!(
        env.allocations(),
        before,
        "no address allocation left behind"
    );
    let new: Vec<_> = links(()).difference(&nlinks).cloned().collect();
    assert!(new.is_empty(), "no veth left behind: {new:?}");
    // Name clash.
    env.rt
        .run(&RunOptions {
            detach: true,
            ..env.opts("dup", &["sleep", "30"])
        })
        .unwrap();
    let err = env
        .rt
        .run(&RunOptions {
            detach: true,
            ..env.opts("dup", &["true"])
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert!(env
        .rt
        .rm("dup", false)
        .unwrap_err()
        .to_string()
        .contains("is running"));
    env.rt.rm("dup", true).unwrap();
}

/// `run -d` hears from its monitor over the readiness pipe: an error it
/// writes, its death without a word, or the container running.
fn detached_start_is_reported_over_a_pipe() {
    let mut env = Env::new();
    env.import();
    let real = env.rt.monitor_command.take();
    let sh = |script: &'static str| -> cairn_runtime::MonitorCommand {
        Box::new(move |_: &Path, _: &str| {
            let mut c = std::process::Command::new("/bin/sh");
            c.arg("-c").arg(script);
            c
        })
    };
    let detached = |env: &Env, name: &str| RunOptions {
        detach: true,
        ..env.opts(name, &["sleep", "30"])
    };
    // What a monitor whose first start failed says.
    env.rt.monitor_command = Some(sh(
        r#"printf 'Eno luck\0' >&"$CAIRN_MONITOR_READY_FD"; sleep 0.2"#,
    ));
    let err = format!("{:#}", env.rt.run(&detached(&env, "p1")).unwrap_err());
    assert_eq!(err, "no luck");
    assert!(!env.rt.paths.container("p1").exists());
    // A monitor that dies first.
    env.rt.monitor_command = Some(sh("exit 3"));
    let err = format!("{:#}", env.rt.run(&detached(&env, "p2")).unwrap_err());
    assert!(
        err.contains("the container monitor exited (exit status: 3) before starting the container"),
        "{err}"
    );
    assert!(!env.rt.paths.container("p2").exists());
    // The real one: running once `run` returns, and the readiness pipe is
    // not the container's (its stdout and stderr are the log's one pipe).
    env.rt.monitor_command = real;
    env.rt.run(&detached(&env, "p3")).unwrap();
    let st = env.rt.state("p3").unwrap();
    assert_eq!(st.status, Status::Running);
    let fd_dir = format!("/proc/{}/fd", st.pid.unwrap());
    let log_pipe = std::fs::read_link(format!("{fd_dir}/1")).unwrap();
    assert!(
        log_pipe.to_string_lossy().starts_with("pipe:"),
        "{log_pipe:?}"
    );
    assert_eq!(std::fs::read_link(format!("{fd_dir}/2")).unwrap(), log_pipe);
    for fd in std::fs::read_dir(&fd_dir).unwrap() {
        let fd = fd.unwrap();
        let target = std::fs::read_link(fd.path()).unwrap();
        assert!(
            target == log_pipe || !target.to_string_lossy().starts_with("pipe:"),
            "the container holds another pipe as fd {:?}: {target:?}",
            fd.file_name()
        );
    }
    env.rt.rm("p3", true).unwrap();
}

fn read_only_root_and_isolation() {
    let env = Env::new();
    env.import();
    let vol = tempfile::tempdir().unwrap();
    std::fs::write(vol.path().join("in"), "from host\n").unwrap();
    let script = r#"
        touch /x 2>&1; echo "root-write=$?"
        echo data > /tmp/t && echo "tmp-write=ok"
        echo data > /run/t && echo "run-write=ok"
        echo "pid=$$"
        echo "hostname=$(hostname)"
        echo "procs=$(ls /proc | grep -c '^[0-9]')"
        echo "ifaces=$(ls /sys/class/net | sort | tr '\n' ,)"
        grep -q ' /work' /proc/mounts && echo "host-mounts=visible" || echo "host-mounts=hidden"
        grep NoNewPrivs /proc/self/status | tr -d '\t '
        grep Seccomp: /proc/self/status | tr -d '\t '
        grep CapEff /proc/self/status | tr -d '\t '
        echo "timer_list=$(wc -c < /proc/timer_list)"
        echo "keys=$(wc -c < /proc/keys)"
        echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null && echo "procsys=writable" || echo "procsys=readonly"
        echo "vol=$(cat /vol/in)"
        echo x > /vol/out 2>/dev/null && echo "vol-write=ok" || echo "vol-write=refused"
        echo x > /rw/out && echo "rw-write=ok"
        echo "user=$(id -u):$(id -g)"
        unshare -m true 2>/dev/null && echo "unshare=allowed" || echo "unshare=denied"
        ls /dev | sort | tr '\n' ,
        echo
        echo "env=$GREETING"
        echo "umask=$(umask)"
    "#;
    let rw = tempfile::tempdir().unwrap();
    let o = RunOptions {
        env: vec!["GREETING=hi".into()],
        volumes: vec![
            volume(&format!("{}:/vol:ro", vol.path().display())),
            volume(&format!("{}:/rw", rw.path().display())),
        ],
        ..env.opts("iso", &["sh", "-c", script])
    };
    // The container's umask is its own (0022 by default), not its caller's.
    let caller = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let (code, log) = env.run_to_end(o);
    nix::sys::stat::umask(caller);
    assert_eq!(code, 0, "{log}");
    let has = |s: &str| assert!(log.contains(s), "missing {s:?} in:\n{log}");
    has("Read-only file system");
    has("root-write=1");
    has("tmp-write=ok");
    has("run-write=ok");
    has("pid=1");
    has("hostname=iso");
    has("ifaces=eth0,lo,");
    has("host-mounts=hidden");
    has("NoNewPrivs:1");
    has("Seccomp:2");
    has("timer_list=0");
    has("keys=0");
    has("procsys=readonly");
    has("vol=from host");
    has("vol-write=refused");
    has("rw-write=ok");
    has("user=0:0");
    has("unshare=denied");
    has("env=hi");
    has("umask=0022");
    assert!(
        log.contains(",null,") && log.contains(",pts,") && !log.contains(",sda"),
        "{log}"
    );
    let procs: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        procs <= 4,
        "only the container's processes are visible: {procs}"
    );
    assert!(
        !log.contains("CapEff:000001ffffffffff") && !log.contains("CapEff:0000003fffffffff"),
        "capabilities reduced: {log}"
    );
    assert_eq!(
        std::fs::read_to_string(rw.path().join("out")).unwrap(),
        "x\n"
    );
    // Nothing the container did reached the image.
    let info = env.rt.verify("busybox:test").unwrap().0;
    let tree = env.rt.paths.checkouts().join(&info.commit);
    assert!(!tree.join("x").exists() && !tree.join("tmp/t").exists());
}

fn containers_talk_over_the_bridge() {
    let env = Env::new();
    env.import();
    let net = env.rt.network.clone();
    let a_ip = Ipv4Addr::from(u32::from(net.gateway) + 9);
    let a = RunOptions {
        ip: Some(a_ip),
        detach: true,
        ..env.opts(
            "srv",
            &["sh", "-c", "echo listening; sleep 1000 | nc -l -p 8080"],
        )
    };
    match env.rt.run(&a).unwrap() {
        RunOutcome::Detached { ip, .. } => assert_eq!(ip, Some(a_ip)),
        other => panic!("{other:?}"),
    }
    env.wait_log("srv", "listening");
    // Address in use.
    let err = env
        .rt
        .run(&RunOptions {
            ip: Some(a_ip),
            ..env.opts("clash", &["true"])
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use"), "{err}");
    assert!(!env.rt.paths.container("clash").exists());
    // Container → container (ping and TCP), container → host. (The servers
    // read from a pipe that stays open: busybox nc quits when stdin ends.)
    let client = format!("ping -c 1 -W 3 {a_ip} >/dev/null && echo ping-ok; ping -c 1 -W 3 {} >/dev/null && echo gw-ok; ok=1; for i in 1 2 3 4 5 6 7 8 9 10; do echo hello-from-b | nc -w 3 {a_ip} 8080 && {{ ok=0; break; }}; sleep 0.3; done; echo nc=$ok", net.gateway);
    let (code, log) = env.run_to_end(env.opts("cli", &["sh", "-c", &client]));
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("ping-ok") && log.contains("gw-ok") && log.contains("nc=0"),
        "{log}"
    );
    if !env.log("srv").contains("hello-from-b") {
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        env.log("srv").contains("hello-from-b"),
        "server log:\n{}\nclient log:\n{log}",
        env.log("srv")
    );
    // Host → container, by address, no NAT in between.
    let b = RunOptions {
        detach: true,
        ..env.opts(
            "srv2",
            &["sh", "-c", "echo listening; sleep 1000 | nc -l -p 9090"],
        )
    };
    let RunOutcome::Detached { ip: Some(b_ip), .. } = env.rt.run(&b).unwrap() else {
        panic!()
    };
    assert_ne!(b_ip, a_ip);
    env.wait_log("srv2", "listening");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match std::net::TcpStream::connect_timeout(&(b_ip, 9090).into(), Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connecting to {b_ip}:9090: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    s.write_all(b"hello-from-host\n").unwrap();
    drop(s);
    env.wait_log("srv2", "hello-from-host");
}

fn health_exec_stop_and_restart() {
    let env = Env::new();
    env.import();
    let o = RunOptions {
        detach: true,
        health: Some(HealthCheck {
            cmd: "test -e /tmp/ok".into(),
            interval: Duration::from_millis(200),
            retries: 1,
        }),
        stop_timeout: 1,
        ..env.opts("hc", &["sleep", "1000"])
    };
    env.rt.run(&o).unwrap();
    let health = |want: Health| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ps = env.rt.ps().unwrap();
            let c = ps.iter().find(|c| c.name == "hc").unwrap();
            if c.health == Some(want) {
                assert_eq!(c.status, Status::Running);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "health never became {want:?}: {c:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    health(Health::Unhealthy);
    assert_eq!(
        env.rt
            .exec("hc", &["touch".into(), "/tmp/ok".into()], false)
            .unwrap(),
        0
    );
    health(Health::Healthy);
    assert_eq!(
        env.rt
            .exec("hc", &["sh".into(), "-c".into(), "exit 3".into()], false)
            .unwrap(),
        3
    );
    assert!(env
        .rt
        .exec("hc", &["nosuch".into()], false)
        .unwrap_err()
        .to_string()
        .contains("not found"));
    let inspect = env.rt.inspect("hc").unwrap();
    assert_eq!(inspect["state"]["status"], "running");
    assert_eq!(inspect["config"]["hostname"], "hc");
    assert!(inspect["container"]["ip"].is_string());
    // sleep as pid 1 ignores SIGTERM: stop escalates to SIGKILL after the timeout.
    let t = Instant::now();
    assert!(env.rt.stop("hc", Duration::from_secs(1)).unwrap());
    assert!(t.elapsed() >= Duration::from_millis(900));
    let st = env.rt.state("hc").unwrap();
    assert_eq!((st.observed(), st.exit_code), (Status::Exited, Some(137)));
    assert!(
        !env.rt.stop("hc", Duration::from_secs(1)).unwrap(),
        "already stopped"
    );

    // A shell that traps the image's StopSignal (SIGUSR1) stops promptly.
    env.rt
        .run(&RunOptions {
            detach: true,
            ..env.opts(
                "term",
                &[
                    "sh",
                    "-c",
                    "trap 'echo got-usr1; exit 0' USR1; trap 'echo got-term' TERM; echo up; while true; do sleep 0.1; done",
                ],
            )
        })
        .unwrap();
    env.wait_log("term", "up");
    env.rt.stop("term", Duration::from_secs(10)).unwrap();
    assert_eq!(env.rt.state("term").unwrap().exit_code, Some(0));
    let log = env.log("term");
    assert!(
        log.contains("got-usr1") && !log.contains("got-term"),
        "{log}"
    );

    // Restart on failure, with back-off, until stopped.
    env.rt
        .run(&RunOptions {
            detach: true,
            restart: RestartPolicy::OnFailure,
            ..env.opts("flaky", &["sh", "-c", "echo run; exit 1"])
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.rt.state("flaky").unwrap().restarts < 3 {
        assert!(
            Instant::now() < deadline,
            "no restarts: {:?}",
            env.rt.state("flaky").unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(env.log("flaky").matches("run").count() >= 3);
    env.rt.stop("flaky", Duration::from_secs(2)).unwrap();
    let st = env.wait_status("flaky", &[Status::Exited], Duration::from_secs(5));
    assert_eq!(st.exit_code, Some(1));
    // Exit 0 under on-failure: no restart.
    let (code, _) = env.run_to_end(RunOptions {
        restart: RestartPolicy::OnFailure,
        ..env.opts("fine", &["true"])
    });
    assert_eq!((code, env.rt.state("fine").unwrap().restarts), (0, 0));
}

/// A detached monitor with nothing in flight waits in the idle executable
/// (here this binary's `--idle`), the same process, and comes back for
/// each event: output, a health check, the container's end and restart,
/// a stop request.
fn an_idle_monitor_stays_one_process_and_wakes_for_each_event() {
    let env = Env::new();
    env.import();
    let idle_now = |name: &str| -> bool {
        let st = env.rt.state(name).unwrap();
        std::fs::read(format!("/proc/{}/cmdline", st.monitor_pid.unwrap()))
            .map(|c| c.split(|b| *b == 0).any(|a| a == b"--idle"))
            .unwrap_or(false)
    };
    let until = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !ok() {
            assert!(Instant::now() < deadline, "{what} never happened");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    env.rt
        .run(&RunOptions {
            detach: true,
            restart: RestartPolicy::OnFailure,
            health: Some(HealthCheck {
                cmd: "test -e /tmp/ok".into(),
                interval: Duration::from_millis(1200),
                retries: 1,
            }),
            stop_timeout: 1,
            ..env.opts(
                "idler",
                &[
                    "sh",
                    "-c",
                    "echo run; while [ ! -e /tmp/stop ]; do sleep 0.1; done; exit 3",
                ],
            )
        })
        .unwrap();
    let first = env.rt.state("idler").unwrap();
    until("going idle after the start", &|| idle_now("idler"));
    // Output written while idle reaches the log.
    env.wait_log("idler", "run");
    // The health check brings it back, and it goes idle again.
    until("an unhealthy check", &|| {
        env.rt.state("idler").unwrap().health.map(|h| h.status) == Some(Health::Unhealthy)
    });
    assert_eq!(
        env.rt
            .exec("idler", &["touch".into(), "/tmp/ok".into()], false)
            .unwrap(),
        0
    );
    until("a healthy check", &|| {
        env.rt.state("idler").unwrap().health.map(|h| h.status) == Some(Health::Healthy)
    });
    until("going idle after the check", &|| idle_now("idler"));
    // The container's end: restarted (a new /tmp, so the check fails again).
    env.rt
        .exec("idler", &["touch".into(), "/tmp/stop".into()], false)
        .unwrap();
    until("a restart", &|| {
        let st = env.rt.state("idler").unwrap();
        st.restarts == 1 && st.observed() == Status::Running
    });
    until("going idle after the restart", &|| idle_now("idler"));
    assert_eq!(
        env.log("idler").matches("run").count(),
        2,
        "{}",
        env.log("idler")
    );
    let now = env.rt.state("idler").unwrap();
    assert_eq!(
        (now.monitor_pid, now.monitor_start),
        (first.monitor_pid, first.monitor_start),
        "one monitor process throughout"
    );
    assert_ne!(now.pid, first.pid, "a new container process");
    // A stop request while idle.
    assert!(env.rt.stop("idler", Duration::from_secs(5)).unwrap());
    let st = env.rt.state("idler").unwrap();
    assert_eq!((st.observed(), st.restarts), (Status::Exited, 1));
    assert!(st.stop_requested);
}

/// A chatty detached container fills its log only up to the limit:
/// `container.log` and `max_files - 1` rotated files, each at most
/// `max_size`, the oldest output dropped; `logs` gives what is kept, in
/// order, and the monitor's own messages still land in the log.
fn a_detached_containers_log_is_rotated_by_size() {
    let env = Env::new();
    env.import();
    let line = |i: u32| format!("line-{i:05}-0123456789abcdefghijklmnopqrstuvwxyz");
    // 6000 lines of 47 bytes: 282,000 bytes, over three files of 64 KiB.
    let script = "i=0; while [ $i -lt 6000 ]; do printf 'line-%05d-0123456789abcdefghijklmnopqrstuvwxyz\\n' $i; i=$((i+1)); done";
    let max_size = 64 << 10;
    let (code, log) = env.run_to_end(RunOptions {
        log: cairn_runtime::state::LogConfig {
            max_size,
            max_files: 3,
        },
        ..env.opts("chatty", &["/bin/sh", "-c", script])
    });
    assert_eq!(code, 0, "{log}");
    let dir = env.rt.paths.container("chatty");
    let mut files: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .filter(|(n, _)| n.starts_with("container.log"))
        .collect();
    files.sort();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["container.log", "container.log.1", "container.log.2"],
        "{files:?}"
    );
    assert!(files.iter().all(|(_, size)| *size <= max_size), "{files:?}");
    assert_eq!(files[1].1, max_size, "a rotated file is full: {files:?}");
    // What is kept is the newest output, whole and in order.
    let lines: Vec<&str> = log.lines().collect();
    let last = lines.iter().rposition(|l| l.starts_with("line-")).unwrap();
    assert_eq!(
        lines[last],
        line(5999),
        "{:?}",
        &lines[last.saturating_sub(2)..]
    );
    let first_whole = lines
        .iter()
        .position(|l| l.len() == 47 && l.starts_with("line-"))
        .unwrap();
    let first: u32 = lines[first_whole][5..10].parse().unwrap();
    assert!(first > 0, "the oldest output was dropped");
    for (k, l) in lines[first_whole..=last].iter().enumerate() {
        assert_eq!(*l, line(first + k as u32), "line {k} after the first kept");
    }
    let kept: u64 = files.iter().map(|(_, s)| s).sum();
    assert!(kept > 2 * max_size && kept <= 3 * max_size, "{kept}");
}

fn cleanup_after_rm_and_after_a_crashed_monitor() {
    let env = Env::new();
    env.import();
    for name in ["tidy", "crash"] {
        env.rt
            .run(&RunOptions {
                detach: true,
                ..env.opts(name, &["sleep", "1000"])
            })
            .unwrap();
    }
    let rec = |n: &str| env.rt.record(n).unwrap();
    let (tidy, crash) = (rec("tidy"), rec("crash"));
    assert!(link_exists(&tidy.host_if) && link_exists(&crash.host_if));
    assert!(env.allocations().contains(&tidy.id) && env.allocations().contains(&crash.id));

    env.rt.rm("tidy", true).unwrap();
    assert!(link_gone(&tidy.host_if), "veth removed");
    assert!(!env.allocations().contains(&tidy.id), "address released");
    assert!(!env.rt.paths.container("tidy").exists());
    assert!(
        !env.rt.paths.container_run("tidy").exists(),
        "per-boot scratch removed"
    );

    // Kill the monitor hard: the container dies with it (PDEATHSIG), ps says so.
    let st = env.rt.state("crash").unwrap();
    let (monitor, pid) = (st.monitor_pid.unwrap(), st.pid.unwrap());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists()
        || Path::new(&format!("/proc/{monitor}")).exists()
    {
        assert!(
            Instant::now() < deadline,
            "container {pid} outlived its monitor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ps = env.rt.ps().unwrap();
    assert_eq!(
        ps.iter().find(|c| c.name == "crash").unwrap().status,
        Status::Dead
    );
    let err = env
        .rt
        .exec("crash", &["true".into()], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not running"), "{err}");
    env.rt.rm("crash", false).unwrap();
    assert!(link_gone(&crash.host_if));
    assert!(!env.allocations().contains(&crash.id));
    assert!(env.rt.ps().unwrap().is_empty());
    assert!(!env.rt.paths.run_root().exists(), "nothing left in /run");
    // The image is free again.
    env.rt.rmi("busybox:test").unwrap();
    assert!(env.rt.images().unwrap().is_empty());
}

/// The cgroup v2 code path on this hybrid machine's (controller-less)
/// unified hierarchy: the container lands in its own cgroup, sees it as the
/// root of its cgroup namespace, and the cgroup is gone after `rm`. Limits
/// themselves need controllers, so they are proven in the QEMU guest.
fn cgroup_v2_placement_and_cleanup() {
    let unified = "/sys/fs/cgroup/unified";
    if !Path::new(unified).join("cgroup.controllers").exists() {
        // A pure v2 host: the default location is already unified.
        return cgroup_checks(Env::new(), "/sys/fs/cgroup", "cairn.slice");
    }
    let slice = format!("cairnt{}.slice", std::process::id());
    // Declared before the Env, so dropped after it: the slice goes last.
    struct RemoveSlice(PathBuf);
    impl Drop for RemoveSlice {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _slice_guard = RemoveSlice(Path::new(unified).join(&slice));
    let mut env = Env::new();
    env.rt = runtime_at(
        env._root.path(),
        &env.rt.network.bridge.clone(),
        &subnet_of(&env),
        Some((unified, &slice)),
    );
    cgroup_checks(env, unified, &slice);
}

fn subnet_of(env: &Env) -> String {
    format!("{}/{}", env.rt.network.gateway, env.rt.network.prefix)
}

fn cgroup_checks(env: Env, cg_root: &str, slice: &str) {
    env.import();
    let dir = Path::new(cg_root).join(slice);
    env.rt
        .run(&RunOptions {
            detach: true,
            ..env.opts("cg", &["sleep", "1000"])
        })
        .unwrap();
    let pid = env.rt.state("cg").unwrap().pid.unwrap();
    let procs = std::fs::read_to_string(dir.join("cg/cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "pid {pid} not in {}: {procs}",
        dir.display()
    );
    let (code, log) = env.run_to_end(env.opts("cgself", &["cat", "/proc/self/cgroup"]));
    assert_eq!(code, 0);
    assert!(
        log.lines().any(|l| l == "0::/"),
        "own cgroup namespace root: {log}"
    );
    env.rt.rm("cg", true).unwrap();
    assert!(
        !dir.join("cg").exists(),
        "cgroup removed with the container"
    );
    assert!(
        !dir.join("cgself").exists(),
        "cgroup removed when the container exited"
    );
}

/// A `--rm` container keeps its records on tmpfs behind a symlink: visible
/// to ps/inspect/exec/stop like any other, gone with it, and what a reboot
/// leaves (a dangling link) is neither listed nor blocking its name.
fn auto_remove_records_live_on_tmpfs() {
    let env = Env::new();
    env.import();
    let opts = RunOptions {
        detach: true,
        auto_remove: true,
        ..env.opts("brief", &["sleep", "1000"])
    };
    env.rt.run(&opts).unwrap();
    let dir = env.rt.paths.container("brief");
    let target = std::fs::read_link(&dir).expect("a --rm container's records are a symlink");
    assert_eq!(target, env.rt.paths.container_volatile("brief"));
    assert!(
        target.starts_with(cairn_runtime::state::RUN_BASE),
        "{target:?}"
    );
    assert!(target.join("container.json").is_file() && target.join("state.json").is_file());
    env.wait_status("brief", &[Status::Running], Duration::from_secs(10));
    let ps = env.rt.ps().unwrap();
    assert_eq!(ps.len(), 1);
    assert_eq!(
        (ps[0].name.as_str(), ps[0].status),
        ("brief", Status::Running)
    );
    assert_eq!(env.rt.exec("brief", &["true".into()], false).unwrap(), 0);
    // The name is taken while it runs.
    let err = format!("{:#}", env.rt.run(&opts).unwrap_err());
    assert!(err.contains("already exists"), "{err}");

    // Stopped, it removes itself: link, records and scratch.
    env.rt.stop("brief", Duration::from_secs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.symlink_metadata().is_ok() {
        assert!(Instant::now() < deadline, "--rm container was not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!target.exists() && !env.rt.paths.container_run("brief").exists());
    assert!(env.rt.ps().unwrap().is_empty());

    // After a reboot only the link is left: no container, the name is free.
    std::os::unix::fs::symlink(
        env.rt.paths.container_volatile("ghost"),
        env.rt.paths.container("ghost"),
    )
    .unwrap();
    assert!(env.rt.ps().unwrap().is_empty());
    assert!(env.rt.record("ghost").is_err());
    let (code, _) = env.run_to_end(RunOptions {
        auto_remove: false,
        ..env.opts("ghost", &["true"])
    });
    assert_eq!(code, 0);
    assert!(
        env.rt.paths.container("ghost").is_dir(),
        "a plain directory now"
    );
    assert!(!env
        .rt
        .paths
        .container("ghost")
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());
}

/// A re-import that moves a tag (what a baked app's unit does after every
/// host upgrade or rollback) leaves the old image's checkout behind; `prune`
/// removes it once no container uses it, with leftovers of interrupted
/// checkouts, and keeps what a tag or a container still needs.
fn prune_keeps_what_tags_and_containers_use() {
    let env = Env::new();
    let v1 = env.import();
    env.rt
        .run(&RunOptions {
            detach: true,
            ..env.opts("old", &["sleep", "1000"])
        })
        .unwrap();
    let layout2 = env.layout.with_file_name("busybox-oci-v2");
    make_busybox_layout_version(&layout2, "2");
    let v2 = env.rt.import(&layout2, None).unwrap();
    assert_eq!(v2.reference(), "busybox:test");
    assert_ne!(v1.commit, v2.commit);
    let (code, log) = env.run_to_end(env.opts("new", &["cat", "/etc/image-version"]));
    assert_eq!((code, log.as_str()), (0, "2"));
    let co = env.rt.paths.checkouts();
    assert!(co.join(&v1.commit).is_dir() && co.join(&v2.commit).is_dir());
    let stale = format!(".tmp-{}-999999999", v2.commit);
    std::fs::create_dir_all(co.join(&stale).join("etc")).unwrap();

    // v1 is untagged but container "old" runs from it: only the leftover goes.
    let p = env.rt.prune().unwrap();
    assert_eq!(p.checkouts, vec![stale.clone()]);
    assert!(co.join(&v1.commit).is_dir());
    assert_eq!(
        env.rt
            .exec(
                "old",
                &["cat", "/etc/image-version"].map(String::from),
                false
            )
            .unwrap(),
        0
    );

    env.rt.rm("old", true).unwrap();
    let p = env.rt.prune().unwrap();
    assert_eq!(p.checkouts, vec![v1.commit.clone()]);
    assert!(!co.join(&v1.commit).exists());
    assert!(!co.join(format!("{}.json", v1.commit)).exists());
    // What the tag points at is whole, and the repository is healthy.
    assert!(co.join(&v2.commit).is_dir());
    assert_eq!(env.rt.verify("busybox:test").unwrap().0.commit, v2.commit);
    let fsck = std::process::Command::new("ostree")
        .arg(format!("--repo={}", env.rt.paths.repo().display()))
        .arg("fsck")
        .status()
        .unwrap();
    assert!(fsck.success());
    let p = env.rt.prune().unwrap();
    assert!(p.checkouts.is_empty() && p.objects == 0, "{p:?}");
    let (code, _) = env.run_to_end(env.opts("again", &["true"]));
    assert_eq!(code, 0);
}

/// The host uid of a process, from /proc.
fn host_uid(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// The short-lived child that makes a container's user namespace (it shares
/// our memory, see `container::PendingUserns`) maps exactly the range, and
/// is reaped whether the namespaces are taken or given up.
fn user_namespace_holder_maps_the_range_and_is_reaped() {
    use cairn_runtime::container::PendingUserns;
    use cairn_runtime::userns::{IdRange, POOL_START, RANGE_SIZE};
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let children = || {
        std::fs::read_to_string(format!(
            "/proc/self/task/{}/children",
            nix::unistd::gettid()
        ))
        .unwrap()
    };
    let before = children();
    let range = IdRange {
        host_start: POOL_START + 7 * RANGE_SIZE,
        size: RANGE_SIZE,
    };
    // Given up before it is finished: killed by nothing, it just goes.
    drop(PendingUserns::spawn().unwrap());
    assert_eq!(children(), before, "a dropped holder is reaped");

    let fds = PendingUserns::spawn().unwrap().finish(&range).unwrap();
    // `cmd` run in the namespace of `ns` (a `CLONE_NEW*` kind).
    let output_in = |ns: &std::os::fd::OwnedFd, kind: libc::c_int, cmd: &[&str]| {
        let fd = ns.as_raw_fd();
        let mut c = std::process::Command::new(cmd[0]);
        c.args(&cmd[1..]);
        // SAFETY: setns only, between fork and exec.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, kind) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        out
    };
    let out = output_in(
        &fds.user,
        libc::CLONE_NEWUSER,
        &["cat", "/proc/self/uid_map", "/proc/self/gid_map"],
    );
    let maps = String::from_utf8(out.stdout).unwrap();
    let want = format!("0 {} {}", range.host_start, range.size);
    let lines: Vec<String> = maps
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(lines, [want.clone(), want], "{maps}");
    // The network namespace is the user namespace's: a fresh one, with
    // only its loopback.
    let out = output_in(&fds.net, libc::CLONE_NEWNET, &["ip", "-o", "link"]);
    let links = String::from_utf8_lossy(&out.stdout);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains(": lo:"), "{links}");
    drop(fds);
    assert_eq!(
        children(),
        before,
        "the holder is reaped with its namespaces' fds"
    );
}

fn user_namespace_maps_root_and_keeps_image_owners() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    env.import();
    let script = r#"
        echo "uid_map=$(cat /proc/self/uid_map | tr -s ' ' | sed 's/^ //')"
        echo "id=$(id -u):$(id -g)"
        echo "owned=$(stat -c %u:%g:%a /home/app/owned)"
        echo "home=$(stat -c %u:%g:%a /home/app)"
        echo "etc=$(stat -c %u:%g:%a /etc)"
        echo "slash=$(stat -c %u:%g /)"
        echo x > /run/w && echo "run=$(stat -c %u /run/w)"
        ping -c1 -W2 127.0.0.1 >/dev/null 2>&1 && echo "ping=ok" || echo "ping=denied"
        nc -l -p 80 -w 1 </dev/null >/dev/null 2>&1 & sleep 0.2; netstat -ltn | grep -q ':80 ' && echo "port80=ok"
        mount -t tmpfs none /mnt 2>/dev/null && echo "mount=allowed" || echo "mount=denied"
    "#;
    let (code, log) = env.run_to_end(env.opts("u1", &["sh", "-c", script]));
    assert_eq!(code, 0, "{log}");
    let has = |s: &str| assert!(log.contains(s), "missing {s:?} in:\n{log}");
    has(&format!(
        "uid_map=0 {} 65536",
        cairn_runtime::userns::POOL_START
    ));
    has("id=0:0");
    has("owned=1000:100:640");
    has("home=1000:1000:750");
    has("etc=0:0:755");
    has("slash=0:0");
    has("run=0");
    has("ping=ok");
    has("port80=ok");
    has("mount=denied");

    // From the host: two containers, two disjoint unprivileged ranges.
    for name in ["u2", "u3"] {
        env.rt
            .run(&RunOptions {
                detach: true,
                ..env.opts(name, &["sleep", "1000"])
            })
            .unwrap();
    }
    let uid = |name: &str| {
        let st = env.wait_status(name, &[Status::Running], Duration::from_secs(10));
        host_uid(st.pid.unwrap())
    };
    let (u2, u3) = (uid("u2"), uid("u3"));
    let range = cairn_runtime::userns::RANGE_SIZE;
    assert!(
        u2 >= cairn_runtime::userns::POOL_START,
        "u2 runs as host uid {u2}"
    );
    assert!(u2.abs_diff(u3) >= range, "ranges overlap: {u2} and {u3}");
    // exec and health checks enter the same namespace.
    assert_eq!(env.rt.exec("u2", &["true".into()], false).unwrap(), 0);
    // rm frees the range; the next container may take it again.
    let claims = env.rt.paths.userns_claims();
    let taken = || {
        std::fs::read(&claims)
            .unwrap()
            .chunks(32)
            .filter(|slot| slot.iter().any(|&b| b != 0))
            .count()
    };
    let before = taken();
    env.rt.rm("u2", true).unwrap();
    assert_eq!(taken(), before - 1);
    env.rt
        .run(&RunOptions {
            detach: true,
            ..env.opts("u4", &["sleep", "1000"])
        })
        .unwrap();
    assert_eq!(uid("u4"), u2, "the freed range is reused");
    // --userns=host: root is root.
    env.rt
        .run(&RunOptions {
            detach: true,
            userns_host: true,
            ..env.opts("u5", &["sleep", "1000"])
        })
        .unwrap();
    assert_eq!(uid("u5"), 0);
    // State that holds image trees (setuid files) is root's alone.
    for dir in [env.rt.paths.root.clone(), env.rt.paths.run_root()] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
    }
}

/// A mount of `what` at `dir`, unmounted on drop.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn volumes_are_read_only_nosuid_nodev_all_the_way_down() {
    let env = Env::new();
    env.import();
    let src = tempfile::tempdir().unwrap();
    let sub = src.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let _guard = MountGuard(sub.clone());
    std::fs::write(sub.join("file"), "below\n").unwrap();
    for dir in [src.path(), sub.as_path()] {
        // /dev/null's numbers: harmless, but a device all the same.
        nix::sys::stat::mknod(
            &dir.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
    }
    let script = r#"
        echo x > /ro/sub/file 2>/dev/null && echo "ro-sub-write=ok" || echo "ro-sub-write=refused"
        echo x > /ro/top 2>/dev/null && echo "ro-top-write=ok" || echo "ro-top-write=refused"
        echo x > /rw/sub/new 2>/dev/null && echo "rw-sub-write=ok" || echo "rw-sub-write=refused"
        for d in /ro /ro/sub /rw /rw/sub; do
            cat $d/null >/dev/null 2>&1 && echo "dev $d=open" || echo "dev $d=refused"
        done
        grep -E ' /(ro|rw)/sub ' /proc/self/mountinfo
    "#;
    let o = RunOptions {
        volumes: vec![
            volume(&format!("{}:/ro:ro", src.path().display())),
            volume(&format!("{}:/rw", src.path().display())),
        ],
        ..env.opts("vol", &["sh", "-c", script])
    };
    let (code, log) = env.run_to_end(o);
    assert_eq!(code, 0, "{log}");
    let has = |s: &str| assert!(log.contains(s), "missing {s:?} in:\n{log}");
    has("ro-sub-write=refused");
    has("ro-top-write=refused");
    has("rw-sub-write=ok");
    for d in ["/ro", "/ro/sub", "/rw", "/rw/sub"] {
        has(&format!("dev {d}=refused"));
    }
    for line in log.lines().filter(|l| l.contains("/sub ")) {
        assert!(
            line.contains("nosuid") && line.contains("nodev"),
            "submount without nosuid,nodev: {line}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(sub.join("file")).unwrap(),
        "below\n"
    );
}

fn exec_cannot_rewrite_the_host_binary() {
    let env = Env::new();
    env.import();
    // The attacker (this test binary, started by the kernel for the image's
    // `#!/proc/self/exe` script) needs the host's dynamic loader and
    // libraries: lend them read-only.
    let o = RunOptions {
        detach: true,
        volumes: vec![volume("/usr/lib:/lib:ro"), volume("/usr/lib64:/lib64:ro")],
        ..env.opts("target", &["sleep", "1000"])
    };
    env.rt.run(&o).unwrap();
    env.wait_status("target", &[Status::Running], Duration::from_secs(10));
    let code = env.rt.exec("target", &["/evil".into()], false).unwrap();
    assert_eq!(
        code, ATTACK_DENIED,
        "exec'ing the host binary inside the container must not let it write that binary (exit {code})"
    );
    // The process that entered the container stays non-dumpable.
    assert!(!nix::sys::prctl::get_dumpable().unwrap());
}

/// Images made by buildah, skopeo and umoci (`support/tool_images.rs`; the
/// same images hostile_images.rs imports and checks as trees) run as
/// containers in their own user namespace (the default): the image's
/// `User` (1000, buildah) is the process's uid inside, the user's home has
/// the owner and mode the image gave it, the file the upper layer deleted
/// is absent (and present in the one-layer image, so the check can fail),
/// root-owned binaries are 0:0 inside while the container's 0 maps to an
/// unprivileged range on the host, seen inside (uid_map) and outside (the
/// process's host uid).
fn images_made_by_tools_run_in_a_user_namespace() {
    use tool_images::{APP_UID, HOME_MODE};
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let (bw, uw) = (work.path().join("buildah"), work.path().join("umoci"));
    std::fs::create_dir_all(&bw).unwrap();
    std::fs::create_dir_all(&uw).unwrap();
    let b = tool_images::buildah_and_skopeo(&bw);
    let umoci = tool_images::umoci(&uw);
    let import = |path: PathBuf, name: &str, tag: Option<&str>| {
        let info = env
            .rt
            .import_with(
                &path,
                &cairn_oci::image::ImportOptions {
                    name: Some(name.into()),
                    tag: tag.map(Into::into),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("importing {name}: {e:#}"));
        assert_eq!(info.reference(), name);
    };
    import(b.oci.clone(), "toolimg:oci", Some("v2"));
    import(b.oci.clone(), "toolimg:v1", Some("v1"));
    import(b.oci_archive.clone(), "toolimg:arch", None);
    import(b.docker_archive.clone(), "toolimg:docker", None);
    import(umoci, "umoci:app", None);

    // No applet links in these images: busybox's shell runs its applets.
    let script = r#"
        echo "id=$(id)"
        echo "uid_map=$(tr -s ' ' </proc/self/uid_map | sed 's/^ //')"
        echo "gid_map=$(tr -s ' ' </proc/self/gid_map | sed 's/^ //')"
        echo "home=$(stat -c %u:%g:%a /home/app)"
        echo "home_list=$(ls -a /home/app 2>&1 | tr '\n' ' ')"
        echo "busybox=$(stat -c %u:%g:%a /bin/busybox /bin/pinger | tr '\n' ' ')"
        echo "etc=$(ls -a /etc | tr '\n' ' ')"
        test -e /etc/gone && echo "gone=present" || echo "gone=absent"
    "#;
    let app = format!("uid={APP_UID}(app) gid={APP_UID}(app) groups={APP_UID}(app)");
    let root = "uid=0(root) gid=0(root) groups=0(root)".to_string();
    // (image, made by, `id` inside, whether etc/gone was deleted)
    let cases = [
        ("toolimg:oci", "buildah push oci:DIR:v2", &app, true),
        ("toolimg:arch", "skopeo copy oci-archive:", &app, true),
        ("toolimg:docker", "buildah push docker-archive:", &app, true),
        ("toolimg:v1", "skopeo copy oci:DIR:v1", &app, false),
        ("umoci:app", "umoci", &root, true),
    ];
    for (n, (image, what, id, whiteout)) in cases.into_iter().enumerate() {
        let name = format!("tool{n}");
        let (code, log) = env.run_to_end(RunOptions {
            image: image.into(),
            no_network: true,
            ..env.opts(&name, &["/bin/busybox", "sh", "-c", script])
        });
        let range = env
            .rt
            .record(&name)
            .unwrap()
            .userns
            .expect("own user namespace");
        assert!(
            range.host_start >= cairn_runtime::userns::POOL_START
                && range.size == cairn_runtime::userns::RANGE_SIZE,
            "{what}: {range:?}"
        );
        let start = range.host_start;
        let etc = if whiteout { "" } else { "gone " };
        let gone = if whiteout { "absent" } else { "present" };
        let expected = format!(
            "id={id}\n\
             uid_map=0 {start} 65536\n\
             gid_map=0 {start} 65536\n\
             home={APP_UID}:{APP_UID}:{HOME_MODE:o}\n\
             home_list=. .. \n\
             busybox=0:0:755 0:0:755 \n\
             etc=. .. {etc}group hostname hosts passwd resolv.conf \n\
             gone={gone}\n"
        );
        assert_eq!(log, expected, "{what} ({image}): exit {code}");
        assert_eq!(code, 0, "{what}");
        env.rt.rm(&name, false).unwrap();
    }

    // From the host: the process runs as the image's user mapped into the
    // container's range, never as a host user.
    for (image, uid) in [("toolimg:docker", APP_UID), ("umoci:app", 0)] {
        let name = format!("sleeper-{}", image.replace(':', "-"));
        env.rt
            .run(&RunOptions {
                image: image.into(),
                detach: true,
                no_network: true,
                ..env.opts(&name, &["/bin/busybox", "sleep", "1000"])
            })
            .unwrap();
        let st = env.wait_status(&name, &[Status::Running], Duration::from_secs(10));
        let start = env.rt.record(&name).unwrap().userns.unwrap().host_start;
        assert_eq!(host_uid(st.pid.unwrap()), start + uid, "{image}");
    }
}

/// A foreground `run` waits for its own children only: a child the caller
/// started before, already ended and not yet waited for, is still the
/// caller's to wait for afterwards, with its exit status. (Waiting for any
/// child instead stole other threads' children in threaded callers.)
fn foreground_run_reaps_only_its_own_children() {
    let env = Env::new();
    env.import();
    let mut other = std::process::Command::new("/bin/sh")
        .args(["-c", "exit 7"])
        .spawn()
        .unwrap();
    // Until it is a zombie (state Z, after the name in parentheses).
    let stat = format!("/proc/{}/stat", other.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&stat)
        .unwrap()
        .rsplit_once(") ")
        .map(|(_, rest)| !rest.starts_with('Z'))
        .unwrap()
    {
        assert!(Instant::now() < deadline, "sh never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    let outcome = env
        .rt
        .run(&RunOptions {
            no_network: true,
            auto_remove: true,
            ..env.opts("fg", &["true"])
        })
        .unwrap();
    assert!(
        matches!(outcome, RunOutcome::Exited { code: 0, .. }),
        "{outcome:?}"
    );
    let status = other
        .wait()
        .expect("the caller's own child is still there to wait for");
    assert_eq!(status.code(), Some(7));
}
