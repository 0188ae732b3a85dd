//! The container runtime proven inside a booted cairn host (issue 6, QEMU):
//! pure cgroup v2, the host's own systemd, the image's own `host` binary.
//!
//! One guest, three boots (each boot costs 80-120 s under TCG, so every
//! check shares them):
//!
//! 1. v1 boots. An app baked in by the manifest's `[[apps]]` (a busybox
//!    httpd) is running from the host tree (nothing imported: the image
//!    store holds nothing), it answers on its bridge address from the
//!    host, is healthy, has the
//!    manifest's limits in its cgroup, and runs in its own user namespace
//!    with the image's files still owned by root. Then limits hold: a fork
//!    bomb stops at `pids.max`, a memory hog is OOM-killed alone while a
//!    neighbour keeps running, `cpu.max` throttles a busy loop (those
//!    containers are removed again).
//! 2. `host upgrade --reboot` to a v2 commit whose app image differs from
//!    v1's in one file, its page (served over HTTP from the build machine's
//!    loopback, 10.0.2.2 in the guest): v2 is booted, the app runs again
//!    after the reboot (a new container of this boot) and serves v2. The
//!    bytes the upgrade fetched are counted: about that file, not the
//!    image's layer.
//! 3. `host rollback --reboot`: v1 is booted and the app serves v1 again,
//!    with nothing fetched or imported.
//!
//! The image (`tests/support/apps_image.rs`): the test host
//! (`manifests/test-host.toml`, so its cached package stage is reused) plus
//! an `[[apps]]` entry for a busybox OCI layout the test writes, composed
//! into `build/qemu-tests/apps/`.
//!
//! Run with `cargo test -p qemu-tests --test runtime -- --test-threads=1` as
//! root.

#[path = "support/apps_image.rs"]
mod apps_image;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use apps_image::*;
use qemu_tests::fixture::{
    compose_into, host_binary, ostree_cli, run_host, start_update_repo, HttpServer,
};
use qemu_tests::guest::{booted_commit, rebooting_output, run_rebooting};
use qemu_tests::Vm;
use serde_json::Value;

/// `host app ps --json` entry of a container.
fn ps_entry(vm: &mut Vm, name: &str) -> Value {
    let ps = must(vm.ok("host app ps --json"));
    let ps: Value = serde_json::from_str(&ps)
        .unwrap_or_else(|e| panic!("host app ps --json is not JSON ({e}):\n{ps}"));
    let entries = ps
        .as_array()
        .or_else(|| ps["containers"].as_array())
        .unwrap_or_else(|| panic!("host app ps --json: no array:\n{ps:#}"));
    entries
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} is not in host app ps:\n{ps:#}"))
}

/// Poll `check` (a guest command) until it succeeds, for at most `limit`.
fn wait_for(vm: &mut Vm, what: &str, check: &str, limit: Duration) -> String {
    let diag = format!(
        "host app ps; systemctl status --no-pager -l cairn-app-{APP}.service | tail -20; \
         host app logs {APP} | tail -20; ip -o addr; ip route"
    );
    wait_for_in(vm, what, check, limit, &diag)
}

/// The baked app, checked from the guest's host side: unit active, running
/// in `ps` (and healthy), serving its page on its bridge address.
fn assert_app_serving(vm: &mut Vm, page_text: &str) -> Value {
    let active = must(vm.run(&format!("systemctl is-active cairn-app-{APP}.service")));
    assert_eq!(
        active.stdout.trim(),
        "active",
        "unit of the baked app: {active}\n{}",
        must(vm.run(&format!(
            "systemctl status --no-pager -l cairn-app-{APP}.service; journalctl -b -u cairn-app-{APP}.service --no-pager | tail -40"
        )))
    );
    let page = wait_for(
        vm,
        "the baked app answering on its address",
        &http_get(APP_IP, APP_PORT),
        // Generous: scripts/test boots this guest beside lifecycle's.
        Duration::from_secs(180),
    );
    assert!(page.contains("200 OK"), "{page}");
    assert!(page.contains(page_text), "{page}");
    must(vm.ok(&format!("ping -c 1 -W 5 {APP_IP}")));

    // The health command (wget inside the container) passes.
    let started = Instant::now();
    loop {
        let entry = ps_entry(vm, APP);
        if entry["health"] == "healthy" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the baked app is not healthy after 180 s: {entry:#}\n{}",
            must(vm.run(&format!(
                "host app inspect {APP}; host app logs {APP} | tail"
            )))
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let entry = ps_entry(vm, APP);
    assert_eq!(entry["status"], "running", "{entry:#}");
    assert_eq!(entry["ip"], APP_IP, "{entry:#}");
    entry
}

/// The first boot of v1: the baked app's pinned image is in the store and
/// verifies, the app serves and is healthy, its manifest limits are in its
/// cgroup, and it runs in its own user namespace with the image's owners
/// kept. Returns its `host app ps` entry.
fn assert_baked_app_after_first_boot(vm: &mut Vm, image: &AppsImage) -> Value {
    // The pinned image is the tree's: listed, but nothing was imported.
    let images = must(vm.ok("host app images --json"));
    assert!(images.contains(&image.digest), "{images}");
    assert_store_empty(vm, "after the first boot");
    let sizes = must(vm.ok(
        "du -sb /usr/lib/cairn/apps/web | cut -f1; du -sb --apparent-size /sysroot/ostree/repo/objects | cut -f1",
    ));
    eprintln!("runtime: figures: baked app files in the tree, bytes; the node's whole OSTree object store, bytes: {}", sizes.split_whitespace().collect::<Vec<_>>().join(", "));

    let first = assert_app_serving(vm, APP_PAGE);
    let inspect = must(vm.ok(&format!("host app inspect {APP}")));
    eprintln!("runtime: baked app after boot: {first}");
    assert!(inspect.contains(&image.digest), "{inspect}");
    // Its limits from the manifest are in force in its cgroup.
    let limits = must(vm.ok(&format!(
        "cat /sys/fs/cgroup/cairn.slice/{APP}/memory.max /sys/fs/cgroup/cairn.slice/{APP}/pids.max"
    )));
    assert_eq!(
        limits.split_whitespace().collect::<Vec<_>>(),
        ["67108864", "64"],
        "{limits}"
    );
    // Its own user namespace: root inside is an unused, unprivileged uid
    // range on the node, and the image's files still belong to root.
    let map = must(vm.ok(&format!("host app exec {APP} cat /proc/self/uid_map")));
    let fields: Vec<u64> = map
        .split_whitespace()
        .map(|f| f.parse().expect("uid_map field"))
        .collect();
    assert_eq!(fields.len(), 3, "{map}");
    assert!(
        fields[0] == 0 && fields[1] >= 0x4000_0000 && fields[2] == 65536,
        "{map}"
    );
    let owner = must(vm.ok(&format!("host app exec {APP} stat -c %u:%g /bin")));
    assert_eq!(owner.trim(), "0:0", "image files keep their owner: {owner}");
    first
}

/// A baked app is never imported: the node's image store holds no
/// `cairn-app-` image and no checkout of one (only what the test pulled).
fn assert_store_empty(vm: &mut Vm, when: &str) {
    let store = must(vm.ok("ostree --repo=/ostree/repo refs | grep cairn-app-; \
         grep -l '\"name\": \"cairn-app-' /var/lib/cairn/checkouts/*.json 2>/dev/null; true"));
    assert!(
        store.trim().is_empty(),
        "{when}: a baked app is in the image store: {store}"
    );
}

/// The image pulled into the node, from the registry on the build
/// machine's loopback.
const PULLED: &str = "busybox:v1";

/// `host app pull` stores the image in the host's repository (issue 17):
/// its ref is one of /ostree/repo's, its checkout hardlinks the
/// repository's objects, and files it shares with the host tree (the baked
/// app's busybox: the same layout) are the same object, so the pull adds
/// little to the repository. Returns the pulled commit.
fn assert_pulled_image_is_stored_with_the_host(
    vm: &mut Vm,
    registry_port: u16,
    layer: u64,
) -> String {
    let objects_bytes = |vm: &mut Vm| -> u64 {
        must(vm.ok("du -sb /ostree/repo/objects | cut -f1"))
            .trim()
            .parse()
            .expect("du of the repository's objects")
    };
    let before = objects_bytes(vm);
    let pull = must(vm.ok(&format!(
        "host app pull --tls-verify=false 10.0.2.2:{registry_port}/apps/{PULLED}"
    )));
    let added = objects_bytes(vm).saturating_sub(before);
    let commit = must(vm.ok("ostree --repo=/ostree/repo rev-parse cairn/app/busybox/v1"))
        .trim()
        .to_string();
    let out = must(vm.ok(&format!(
        "host app run --rm --network none {PULLED} /bin/echo pulled-ok"
    )));
    assert!(out.contains("pulled-ok"), "{out}");
    let objects = must(vm.ok("stat -c %a /ostree/repo/objects"));
    assert_eq!(
        objects.trim(),
        "700",
        "the image writer makes objects root's alone"
    );
    let stat = |vm: &mut Vm, p: &str| must(vm.ok(&format!("stat -c '%i %h' {p}")));
    let pulled = stat(
        vm,
        &format!("/var/lib/cairn/checkouts/{commit}/bin/busybox"),
    );
    let baked = stat(vm, &format!("/usr/lib/cairn/apps/{APP}/rootfs/bin/busybox"));
    eprintln!(
        "runtime: figures: pulling {PULLED} (a {layer}-byte layer) added {added} bytes to /ostree/repo/objects; \
         its busybox and the baked app's: inode and links {} / {}; pull said: {}",
        pulled.trim(),
        baked.trim(),
        pull.lines().last().unwrap_or("").trim()
    );
    assert_eq!(
        pulled.split(' ').next(),
        baked.split(' ').next(),
        "the pulled image's busybox is the host tree's object, not a copy"
    );
    assert!(
        added < layer / 4,
        "the pull added {added} bytes to the host repository: its files are the host's"
    );
    commit
}

/// The pulled image still runs (its ref kept it through the host update's
/// prune).
fn assert_pulled_image_runs(vm: &mut Vm, when: &str) {
    let out = must(vm.run(&format!(
        "host app run --rm --network none {PULLED} /bin/echo pulled-ok"
    )));
    assert!(out.stdout.contains("pulled-ok"), "{when}: {out}");
}

/// Value of `key` in a flat-keyed cgroup file (`key value` lines).
fn cg_value(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
}

/// Limits hold, in containers started next to the baked app (and removed
/// again): pids.max stops a fork bomb, memory.max OOM-kills a hog alone,
/// cpu.max throttles a busy loop.
fn assert_limits_hold_pids_memory_cpu(vm: &mut Vm) {
    let cg = "/sys/fs/cgroup/cairn.slice";
    assert_eq!(
        must(vm.ok("stat -fc %T /sys/fs/cgroup")).trim(),
        "cgroup2fs"
    );

    // pids.max: a fork bomb in a container capped at 16 processes.
    must(vm.ok(&format!(
        "host app run -d --name bomb --pids 16 {APP_IMAGE} sleep 3600"
    )));
    let bomb = must(vm.run_timeout(
        "host app exec bomb /bin/sh -c 'i=0; while [ $i -lt 100 ]; do sleep 600 & i=$((i+1)); done; true'",
        Duration::from_secs(180),
    ));
    eprintln!("runtime: fork bomb: {bomb}");
    let current: u64 = must(vm.ok(&format!("cat {cg}/bomb/pids.current")))
        .trim()
        .parse()
        .expect("pids.current");
    let procs: u64 = must(vm.ok(&format!(
        "find {cg}/bomb -name cgroup.procs -exec cat {{}} + | wc -l"
    )))
    .trim()
    .parse()
    .expect("process count");
    let events = must(vm.ok(&format!("cat {cg}/bomb/pids.events")));
    eprintln!("runtime: fork bomb stopped at {procs} processes (pids.current {current}); pids.events: {events}");
    assert!(current <= 16, "pids.current {current}");
    assert!(procs < 17, "{procs} processes in the container's cgroup");
    assert!(procs >= 10, "the bomb did fork: only {procs} processes");
    assert!(cg_value(&events, "max") > 0, "pids.events: {events}");
    must(vm.ok("host app rm --force bomb"));

    // memory.max: the hog is OOM-killed; its neighbour keeps running.
    must(vm.ok(&format!(
        "host app run -d --name neighbour {APP_IMAGE} sleep 3600"
    )));
    let neighbour_pid = ps_entry(vm, "neighbour")["id"].clone();
    let neighbour_before = must(vm.ok("host app inspect neighbour"));
    must(vm.ok(&format!(
        "host app run -d --name hog --memory 32M {APP_IMAGE} /bin/sh -c \
         'head -c 209715200 /dev/zero | tail >/dev/null; echo \"hog exit $?\"; exec sleep 3600'"
    )));
    let log = wait_for(
        vm,
        "the memory hog finished",
        "host app logs hog | grep 'hog exit'",
        Duration::from_secs(180),
    );
    let mem_events = must(vm.ok(&format!("cat {cg}/hog/memory.events")));
    let peak = must(vm.run(&format!("cat {cg}/hog/memory.peak"))).stdout;
    eprintln!("runtime: memory hog: {log} memory.events: {mem_events} memory.peak {peak}");
    assert_eq!(log.trim(), "hog exit 137", "the hog was not SIGKILLed");
    assert!(
        cg_value(&mem_events, "oom_kill") > 0,
        "memory.events: {mem_events}"
    );
    let dmesg = must(vm.ok("dmesg | grep -i 'memory cgroup out of memory' || true"));
    eprintln!("runtime: kernel: {dmesg}");
    assert_eq!(
        ps_entry(vm, "hog")["status"],
        "running",
        "the hog's own pid 1 survives"
    );
    let nb = ps_entry(vm, "neighbour");
    assert_eq!(nb["status"], "running", "{nb:#}");
    assert_eq!(nb["id"], neighbour_pid);
    assert_eq!(nb["restarts"], 0, "{nb:#}");
    let neighbour_after = must(vm.ok("host app inspect neighbour"));
    let pid_of = |inspect: &str| -> Value {
        let v: Value = serde_json::from_str(inspect).expect("inspect JSON");
        v["state"]["pid"].clone()
    };
    assert_eq!(pid_of(&neighbour_before), pid_of(&neighbour_after));
    must(vm.ok("host app exec neighbour true"));
    must(vm.ok("host app rm --force hog && host app rm --force neighbour"));

    // cpu.max: a busy loop at 0.2 CPUs for ~3 s of wall time.
    must(vm.ok(&format!(
        "host app run -d --name busy --cpus 0.2 {APP_IMAGE} /bin/sh -c 'while :; do :; done'"
    )));
    let max = must(vm.ok(&format!("cat {cg}/busy/cpu.max")));
    assert_eq!(max.trim(), "20000 100000", "cpu.max");
    let out = must(vm.ok(&format!(
        "a=$(cat {cg}/busy/cpu.stat); t0=$(date +%s%N); sleep 3; \
         b=$(cat {cg}/busy/cpu.stat); t1=$(date +%s%N); \
         echo \"$a\" | sed 's/^/before_/'; echo \"$b\" | sed 's/^/after_/'; echo \"wall_usec $(( (t1 - t0) / 1000 ))\""
    )));
    let usage = cg_value(&out, "after_usage_usec") - cg_value(&out, "before_usage_usec");
    let throttled = cg_value(&out, "after_nr_throttled") - cg_value(&out, "before_nr_throttled");
    let wall = cg_value(&out, "wall_usec");
    eprintln!(
        "runtime: cpu.max 0.2: used {:.2} s of CPU in {:.2} s wall ({:.0} %), throttled {throttled} times",
        usage as f64 / 1e6,
        wall as f64 / 1e6,
        100.0 * usage as f64 / wall as f64
    );
    assert!(throttled > 0, "not throttled:\n{out}");
    assert!(
        usage * 2 < wall,
        "a 0.2 CPU container used {usage} us of CPU in {wall} us:\n{out}"
    );
    must(vm.ok("host app rm --force busy"));
}

/// Size of the largest blob of an OCI layout (its one layer).
fn largest_blob(layout: &std::path::Path) -> u64 {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap_or_else(|e| panic!("reading {}: {e}", layout.display()))
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// The page v2 of the baked app serves.
const APP_PAGE_V2: &str = "cairn baked app v2: hello again from busybox httpd";

/// v2 of the apps host: the same host with a new image for the app, composed
/// on top of the image's commit in a repository of its own and published.
/// Returns (repository, v2 commit, v2 app digest).
fn prepare_apps_v2(v1: &AppsImage) -> Result<(PathBuf, String, String)> {
    let host = host_binary()?;
    let dir = v1.repo.parent().expect("repo has a parent").join("upgrade");
    let digest = write_busybox_layout(&dir.join("busybox-oci-v2"), APP_PAGE_V2)?;
    let repo = dir.join("repo");
    let ref_ = v1.ref_.as_str();
    let reusable = ostree_cli(&repo, &["rev-parse", &format!("{ref_}^")])
        .is_ok_and(|parent| parent == v1.commit)
        && ostree_cli(&repo, &["show", "--print-metadata-key=cairn.apps", ref_])
            .is_ok_and(|apps| apps.contains(&digest));
    if !reusable {
        let _ = std::fs::remove_dir_all(&repo);
        start_update_repo(&repo, &v1.repo, ref_, &v1.commit)?;
        let manifest = dir.join("apps-host-v2.toml");
        std::fs::write(
            &manifest,
            apps_manifest(v1.host_manifest, "busybox-oci-v2", &digest),
        )?;
        compose_into(&repo, &manifest)?;
    }
    run_host(
        &host,
        &[
            "compose".as_ref(),
            "publish".as_ref(),
            "--repo".as_ref(),
            repo.as_os_str(),
        ],
    )?;
    let commit = ostree_cli(&repo, &["rev-parse", ref_])?;
    Ok((repo, commit, digest))
}

/// The whole runtime tier in one guest, three boots: v1 (the baked app
/// runs under its limits; pids, memory and cpu limits hold), `host upgrade
/// --reboot` to v2 (the app runs again in a new container and serves v2),
/// `host rollback --reboot` to v1 (it serves v1 again).
#[test]
fn baked_app_and_limits_hold_through_host_upgrade_and_rollback_reboots() {
    let v1 = apps_image();
    let (repo, v2, v2_digest) = must(prepare_apps_v2(v1));
    let http_log = repo.with_file_name("http.log");
    let server = must(HttpServer::start(&repo, Some(&http_log)));
    let registry = cairn_test_support::registry::Registry::start();
    let layout = v1.repo.parent().unwrap().join("busybox-oci");
    must(
        registry
            .push(
                &format!("oci:{}", layout.display()),
                &format!("apps/{PULLED}"),
                false,
            )
            .map_err(anyhow::Error::from),
    );
    let layer = largest_blob(&layout);
    let mut vm = boot("runtime");

    // Boot 1, v1.
    let first = assert_baked_app_after_first_boot(&mut vm, v1);
    assert_limits_hold_pids_memory_cpu(&mut vm);
    let pulled = assert_pulled_image_is_stored_with_the_host(&mut vm, registry.port(), layer);

    // Boot 2: `host upgrade --reboot` to v2.
    must(vm.ok(&format!(
        "set -e; ostree --repo=/ostree/repo remote delete --if-exists cairn; \
         ostree --repo=/ostree/repo remote add --no-gpg-verify cairn http://10.0.2.2:{}/",
        server.port
    )));
    let started = Instant::now();
    let log = "/var/lib/cairn-test/upgrade.log";
    let (_, _, mark) = server.served_since(0);
    run_rebooting(&mut vm, "host upgrade --reboot", log);
    let upgrade = rebooting_output(&mut vm, "host upgrade --reboot", log);
    let (requests, fetched, mark) = server.served_since(mark);
    eprintln!(
        "runtime: figures: a one-file app change fetched {fetched} bytes in {requests} HTTP requests \
         (the app's layer alone is {layer} bytes); host upgrade said: {}",
        upgrade.lines().find(|l| l.contains("fetched")).unwrap_or("(no fetch line)").trim()
    );
    assert!(
        fetched < layer / 4,
        "a one-file app change fetched {fetched} bytes, the layer is {layer}:\n{upgrade}"
    );
    assert_boot_finished(&mut vm);
    assert_eq!(booted_commit(&mut vm), v2);
    let entry = assert_app_serving(&mut vm, APP_PAGE_V2);
    eprintln!(
        "runtime: upgraded to {v2}, app v2 serving again {:.1} s after the upgrade (and its reboot) began: {entry}",
        started.elapsed().as_secs_f64()
    );
    // A new container of this boot, not the record of the last one.
    assert_ne!(entry["created"], first["created"], "{entry:#}");
    // v1 stays deployed next to v2 (the rollback target).
    let commit = must(vm.ok("host status --json"));
    assert!(commit.contains(&v1.commit), "{commit}");
    let inspect = must(vm.ok(&format!("host app inspect {APP}")));
    assert!(inspect.contains(&v2_digest), "{inspect}");
    assert_store_empty(&mut vm, "after the upgrade");
    assert_pulled_image_runs(&mut vm, "after the upgrade");
    let upgraded = entry;

    // Boot 3: `host rollback --reboot` to v1.
    let started = Instant::now();
    let log = "/var/lib/cairn-test/rollback.log";
    run_rebooting(&mut vm, "host rollback --reboot", log);
    rebooting_output(&mut vm, "host rollback --reboot", log);
    assert_boot_finished(&mut vm);
    assert_eq!(booted_commit(&mut vm), v1.commit);
    let entry = assert_app_serving(&mut vm, APP_PAGE);
    assert_ne!(entry["created"], upgraded["created"], "{entry:#}");
    let inspect = must(vm.ok(&format!("host app inspect {APP}")));
    assert!(inspect.contains(&v1.digest), "{inspect}");
    assert!(!inspect.contains(&v2_digest), "{inspect}");
    assert_store_empty(&mut vm, "after the rollback");
    assert_pulled_image_runs(&mut vm, "after the rollback");
    let rmi = must(vm.ok(&format!("host app rmi {PULLED}")));
    assert!(rmi.contains("cleanup freed"), "{rmi}");
    let left = must(vm.run(&format!(
        "ostree --repo=/ostree/repo refs | grep cairn/app/; ls /var/lib/cairn/checkouts | grep {pulled}"
    )));
    assert!(
        left.stdout.trim().is_empty(),
        "the pulled image is gone: {left}"
    );
    let (requests, bytes, _) = server.served_since(mark);
    eprintln!("runtime: figures: the rollback fetched {bytes} bytes in {requests} HTTP requests");
    assert!(
        bytes < 64 << 10,
        "a rollback fetches nothing of the app: {bytes} bytes"
    );
    eprintln!(
        "runtime: rolled back to {}, app v1 serving {:.1} s after the rollback began: {entry}",
        v1.commit,
        started.elapsed().as_secs_f64()
    );
}
