//! A release upgrade proven the way a user's pipeline proves one (issues 5,
//! 6, 17 and 18): one `host test upgrade` run, the users' runner, on the
//! apps image (the test host plus a baked busybox httpd app, composed by
//! `tests/support/apps_image.rs`). Under TCG a boot costs one to two
//! minutes, so the node's state, the runtime and the update share the run's
//! boots:
//!
//! - **boot** (v1 as the image boots, provisioned through fw_cfg with the
//!   run's key, the node's own `/etc` and `/var` files and `[update]`
//!   pointing at v2's repository served over HTTP from the build machine's
//!   loopback): the checks below, including the runtime's limits and a pull
//!   from a real registry.
//! - **upgrade**: `host upgrade --reboot` to v2 (a new page for the app and
//!   one more file) with its static delta; the checks again on v2.
//! - **rollback**: `host rollback --reboot`; the checks again on v1.
//! - **three power cuts** at seeded random moments of further upgrades and
//!   rollbacks, each followed by a boot of a complete deployment.
//!
//! The checks (written by this test, run as root over SSH; each reads
//! `CAIRN_TEST_PHASE`):
//!
//! - `10-node`: the node's provisioned files are kept, its health check
//!   passed, no boot counter is left armed (and after an upgrade or a
//!   rollback the boot was proven), the booted commit is the phase's, and
//!   only v2 has v2's file.
//! - `20-baked-app`: the app baked into the tree runs from it (nothing
//!   imported into the image store), answers on its bridge address with the
//!   phase's page, is healthy, is a new container of this boot, has the
//!   manifest's limits in its cgroup, and runs in its own user namespace
//!   with the image's files still owned by root.
//! - `30-limits` (on the first boot): a fork bomb stops at `pids.max`, a
//!   memory hog is OOM-killed alone while its neighbour keeps running,
//!   `cpu.max` throttles a busy loop; later boots find none of those
//!   containers back.
//! - `40-pulled-image`: `host app pull` from the registry on the build
//!   machine's loopback (forwarded into the machine: `--forward`) stores the image in the host's repository, sharing
//!   the host tree's objects; it still runs after the upgrade and the
//!   rollback; `host app rmi` then removes it.
//!
//! The runner's TAP and JUnit are read back; the bytes it served (upgrade,
//! rollback and the cut upgrades together) stay under a quarter of the
//! app's layer, and a static delta was fetched. The checks' `figures:`
//! lines are printed.
//!
//! Run with `cargo test -p qemu-tests --test upgrade -- --nocapture` as
//! root.

#[path = "support/apps_image.rs"]
mod apps_image;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Result;
use apps_image::*;
use qemu_tests::fixture::{
    build_dir, compose_into, host_binary, ostree_cli, run_host, write_check,
};

/// The file only v2 has.
const V2_FILE: &str = "/usr/share/cairn-test/upgrade-v2";
const V2_TEXT: &str = "cairn QEMU upgrade test: this is v2";
/// The page v2 of the baked app serves.
const APP_PAGE_V2: &str = "cairn baked app v2: hello again from busybox httpd";
/// The node's own state, from its node config.
const ETC_FILE: &str = "/etc/cairn-test/upgrade.conf";
const ETC_TEXT: &str = "made on v1 before the upgrade";
const VAR_FILE: &str = "/var/lib/cairn-test/upgrade-data";
const VAR_TEXT: &str = "node data from v1";
/// The image pulled into the node, and the repository it is pushed to.
const PULLED: &str = "busybox:v1";
/// The power cuts' seed: the same moments every run.
const SEED: &str = "20261203";

/// v2 of the apps host: a new image for the app and one more file,
/// composed on top of the image's commit in a repository of its own and
/// published (summary, static delta from v1). Returns (repository, v2
/// commit, v2 app digest).
fn prepare_v2(v1: &AppsImage) -> Result<(PathBuf, String, String)> {
    let host = host_binary()?;
    let dir = v1.repo.parent().expect("repo has a parent").join("upgrade");
    std::fs::create_dir_all(&dir)?;
    let digest = write_busybox_layout(&dir.join("busybox-oci-v2"), APP_PAGE_V2)?;
    std::fs::write(dir.join("upgrade-v2"), format!("{V2_TEXT}\n"))?;
    let repo = dir.join("repo");
    let ref_ = v1.ref_.as_str();
    let reusable = ostree_cli(&repo, &["rev-parse", &format!("{ref_}^")])
        .is_ok_and(|parent| parent == v1.commit)
        && ostree_cli(&repo, &["show", "--print-metadata-key=cairn.apps", ref_])
            .is_ok_and(|apps| apps.contains(&digest))
        && ostree_cli(&repo, &["cat", ref_, V2_FILE]).is_ok_and(|t| t == V2_TEXT);
    if !reusable {
        let _ = std::fs::remove_dir_all(&repo);
        qemu_tests::fixture::start_update_repo(&repo, &v1.repo, ref_, &v1.commit)?;
        let manifest = dir.join("apps-host-v2.toml");
        std::fs::write(
            &manifest,
            format!(
                "{}\n[[files]]\nsrc = \"upgrade-v2\"\ndst = \"{V2_FILE}\"\nmode = \"0644\"\n",
                apps_manifest(v1.host_manifest, "busybox-oci-v2", &digest)
            ),
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

/// What the checks are written from.
struct Facts<'a> {
    v1: &'a str,
    v2: &'a str,
    v1_digest: &'a str,
    v2_digest: &'a str,
    registry_port: u16,
    /// The app's layer, bytes: a pull must add much less than this.
    layer: u64,
}

/// Lines every check starts with: strict shell, `fail` with the state of
/// the node, `wait_until` with a limit.
fn check_prelude(timeout: &str) -> String {
    format!(
        r#"#!/bin/sh
# cairn-test: timeout = {timeout}
set -eu
phase=$CAIRN_TEST_PHASE
fail() {{
    echo "FAIL ($phase): $*"
    host app ps || true
    systemctl status --no-pager -l cairn-app-{APP}.service 2>&1 | tail -20 || true
    exit 1
}}
# wait_until SECONDS WHAT COMMAND...: poll COMMAND every 2 s.
wait_until() {{
    limit=$(( $(date +%s) + $1 )); what=$2; shift 2
    until "$@"; do
        [ "$(date +%s)" -lt "$limit" ] || fail "$what: not within the limit"
        sleep 2
    done
}}
# SSH answers before the boot has finished: the health check may still run.
systemctl is-system-running --wait >/dev/null || true
"#
    )
}

fn node_check(f: &Facts) -> String {
    let Facts { v1, v2, .. } = f;
    format!(
        r#"{prelude}
test "$(cat {ETC_FILE})" = "{ETC_TEXT}" || fail "{ETC_FILE} lost"
test "$(cat {VAR_FILE})" = "{VAR_TEXT}" || fail "{VAR_FILE} lost"
systemctl is-active cairn-health.service || fail "the health check did not pass"
if grep -q '^boot_counter=' /boot/grub/grubenv; then fail "the boot counter is still armed"; fi
deployment=$(readlink -f "/sysroot$(sed 's/.*ostree=\([^ ]*\).*/\1/' /proc/cmdline)")
commit=$(basename "$deployment" | cut -d. -f1)
case $phase in
boot|rollback) want={v1} ;;
upgrade) want={v2} ;;
*) fail "unknown phase" ;;
esac
test "$commit" = "$want" || fail "booted $commit, not $want"
if [ "$want" = {v2} ]; then
    test "$(cat {V2_FILE})" = "{V2_TEXT}" || fail "v2 without its file"
elif [ -e {V2_FILE} ]; then
    fail "v1 has {V2_FILE}"
fi
# An upgrade or a rollback arms the counter; the healthy boot cleared it.
if [ "$phase" != boot ]; then
    grep -qx 'boot_success=1' /boot/grub/grubenv || fail "the boot was not proven"
fi
# Where this boot's time went (under TCG a boot is most of a run).
echo "figures: $phase: $(systemd-analyze 2>&1 | head -1)"
echo "figures: $phase: slowest units: $(systemd-analyze blame 2>&1 | grep -v '[.]device$' |
    head -5 | awk '{{ printf "%s %s, ", $2, $1 }}')"
echo "on $commit, the node's state kept"
"#,
        prelude = check_prelude("3m")
    )
}

fn baked_app_check(f: &Facts) -> String {
    let Facts {
        v1_digest,
        v2_digest,
        ..
    } = f;
    let cg = format!("/sys/fs/cgroup/cairn.slice/{APP}");
    format!(
        r#"{prelude}
case $phase in
upgrade) page='{APP_PAGE_V2}'; digest={v2_digest}; other={v1_digest} ;;
*) page='{APP_PAGE}'; digest={v1_digest}; other={v2_digest} ;;
esac
systemctl is-active cairn-app-{APP}.service || fail "the baked app's unit is not active"
get() {{
    timeout 5 bash -c 'exec 3<>/dev/tcp/{APP_IP}/{APP_PORT} && printf "GET / HTTP/1.0\r\n\r\n" >&3 && cat <&3' \
        > /var/lib/cairn-test/app-reply 2>&1 && grep -q '200 OK' /var/lib/cairn-test/app-reply
}}
wait_until 180 "the baked app answering on {APP_IP}:{APP_PORT}" get
grep -qF "$page" /var/lib/cairn-test/app-reply ||
    fail "it serves another page: $(cat /var/lib/cairn-test/app-reply)"
ping -c 1 -W 5 {APP_IP} >/dev/null || fail "{APP_IP} does not answer a ping"
healthy() {{ [ "$(host app ps | awk '$1 == "{APP}" {{ print $4 }}')" = healthy ]; }}
wait_until 180 "the baked app healthy" healthy
# NAME IMAGE STATUS HEALTH ADDRESS EXIT RESTARTS
set -- $(host app ps | awk '$1 == "{APP}"')
test "$3" = running || fail "status $3"
test "$5" = {APP_IP} || fail "address $5"
inspect=$(host app inspect {APP})
echo "$inspect" | grep -q "$digest" || fail "not the phase's image $digest"
if echo "$inspect" | grep -q "$other"; then fail "still names $other"; fi
# A new container each boot, not the record of the last one.
created=$(echo "$inspect" | grep -m1 '"created"')
if [ -f /var/lib/cairn-test/app-created ] &&
    [ "$(cat /var/lib/cairn-test/app-created)" = "$created" ]; then
    fail "the container of an earlier boot: $created"
fi
echo "$created" > /var/lib/cairn-test/app-created
# Run from the tree: nothing imported into the image store.
if ostree --repo=/ostree/repo refs | grep cairn-app-; then fail "a baked app in the image store"; fi
if grep -l '"name": "cairn-app-' /var/lib/cairn/checkouts/*.json 2>/dev/null; then
    fail "a baked app checked out into the image store"
fi
# The manifest's limits.
test "$(cat {cg}/memory.max) $(cat {cg}/pids.max)" = "67108864 64" ||
    fail "limits $(cat {cg}/memory.max) $(cat {cg}/pids.max)"
# Its own user namespace: root inside is an unused, unprivileged uid range
# on the node, and the image's files still belong to root.
set -- $(host app exec {APP} cat /proc/self/uid_map)
[ "$1" = 0 ] && [ "$2" -ge 1073741824 ] && [ "$3" = 65536 ] || fail "uid_map $*"
test "$(host app exec {APP} stat -c %u:%g /bin)" = 0:0 || fail "image files changed owner"
if [ "$phase" = boot ]; then
    echo "figures: baked app files in the tree $(du -sb /usr/lib/cairn/apps/{APP} | cut -f1) bytes; the node's object store $(du -sb --apparent-size /sysroot/ostree/repo/objects | cut -f1) bytes"
fi
echo "serving '$page' from $digest, healthy, $created"
"#,
        prelude = check_prelude("8m")
    )
}

fn limits_check() -> String {
    let cg = "/sys/fs/cgroup/cairn.slice";
    format!(
        r#"{prelude}
if [ "$phase" != boot ]; then
    for c in bomb neighbour hog busy; do
        if host app inspect $c >/dev/null 2>&1; then fail "$c, removed on the first boot, is back"; fi
    done
    echo "none of the first boot's limit containers is back"
    exit 0
fi
test "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs || fail "not cgroup v2"
value() {{ awk -v k="$2" '$1 == k {{ print $2 }}' "$1"; }}

# pids.max: a fork bomb in a container capped at 16 processes. (Its
# sleeps keep the exec's output open: it goes nowhere.)
host app run -d --name bomb --pids 16 {APP_IMAGE} sleep 3600 >/dev/null
timeout 180 host app exec bomb /bin/sh -c \
    'i=0; while [ $i -lt 100 ]; do sleep 600 & i=$((i+1)); done; true' \
    </dev/null >/dev/null 2>&1 || true
current=$(cat {cg}/bomb/pids.current)
procs=$(find {cg}/bomb -name cgroup.procs -exec cat {{}} + | wc -l)
max_events=$(value {cg}/bomb/pids.events max)
echo "figures: fork bomb stopped at $procs processes (pids.current $current, pids.events max $max_events)"
[ "$current" -le 16 ] || fail "pids.current $current"
[ "$procs" -lt 17 ] || fail "$procs processes in the bomb's cgroup"
[ "$procs" -ge 10 ] || fail "the bomb did not fork: $procs processes"
[ "$max_events" -gt 0 ] || fail "pids.events max $max_events"
host app rm --force bomb >/dev/null

# memory.max: the hog is OOM-killed; its neighbour keeps running.
host app run -d --name neighbour {APP_IMAGE} sleep 3600 >/dev/null
pid_before=$(host app inspect neighbour | grep '"pid":')
host app run -d --name hog --memory 32M {APP_IMAGE} /bin/sh -c \
    'head -c 209715200 /dev/zero | tail >/dev/null; echo "hog exit $?"; exec sleep 3600' >/dev/null
finished() {{ host app logs hog | grep -q 'hog exit'; }}
wait_until 180 "the memory hog finished" finished
said=$(host app logs hog | grep 'hog exit')
oom=$(value {cg}/hog/memory.events oom_kill)
echo "figures: memory hog: $said, oom_kill $oom, memory.peak $(cat {cg}/hog/memory.peak 2>/dev/null || echo -)"
test "$said" = "hog exit 137" || fail "the hog was not SIGKILLed: $said"
[ "$oom" -gt 0 ] || fail "memory.events oom_kill $oom"
# NAME IMAGE STATUS HEALTH ADDRESS EXIT RESTARTS
set -- $(host app ps | awk '$1 == "hog"')
test "$3" = running || fail "the hog's own pid 1 did not survive: $*"
set -- $(host app ps | awk '$1 == "neighbour"')
test "$3" = running || fail "the neighbour: $*"
test "$7" = 0 || fail "the neighbour restarted: $*"
test "$(host app inspect neighbour | grep '"pid":')" = "$pid_before" || fail "the neighbour's process changed"
host app exec neighbour true || fail "the neighbour does not run a command"
host app rm --force hog >/dev/null
host app rm --force neighbour >/dev/null

# cpu.max: a busy loop at 0.2 CPUs for about 3 s of wall time.
host app run -d --name busy --cpus 0.2 {APP_IMAGE} /bin/sh -c 'while :; do :; done' >/dev/null
test "$(cat {cg}/busy/cpu.max)" = "20000 100000" || fail "cpu.max $(cat {cg}/busy/cpu.max)"
u0=$(value {cg}/busy/cpu.stat usage_usec); n0=$(value {cg}/busy/cpu.stat nr_throttled)
t0=$(date +%s%N); sleep 3; t1=$(date +%s%N)
u1=$(value {cg}/busy/cpu.stat usage_usec); n1=$(value {cg}/busy/cpu.stat nr_throttled)
used=$((u1 - u0)); throttled=$((n1 - n0)); wall=$(( (t1 - t0) / 1000 ))
echo "figures: cpu.max 0.2: used $used us of CPU in $wall us of wall time, throttled $throttled times"
[ "$throttled" -gt 0 ] || fail "not throttled"
[ $((used * 2)) -lt "$wall" ] || fail "a 0.2 CPU container used $used us in $wall us"
host app rm --force busy >/dev/null
echo "pids, memory and cpu limits hold"
"#,
        prelude = check_prelude("10m")
    )
}

fn pull_check(f: &Facts) -> String {
    let Facts {
        registry_port,
        layer,
        ..
    } = f;
    format!(
        r#"{prelude}
ran() {{ host app run --rm --network none {PULLED} /bin/echo pulled-ok | grep -qx pulled-ok; }}
case $phase in
boot)
    before=$(du -sb /ostree/repo/objects | cut -f1)
    said=$(host app pull --tls-verify=false "$CAIRN_TEST_HOST:{registry_port}/apps/{PULLED}" 2>&1) ||
        fail "the pull failed: $said"
    added=$(( $(du -sb /ostree/repo/objects | cut -f1) - before ))
    commit=$(ostree --repo=/ostree/repo rev-parse cairn/app/busybox/v1)
    echo "$commit" > /var/lib/cairn-test/pulled-commit
    ran || fail "the pulled image does not run"
    test "$(stat -c %a /ostree/repo/objects)" = 700 || fail "the objects are not root's alone"
    pulled=$(stat -c %i /var/lib/cairn/checkouts/$commit/bin/busybox)
    baked=$(stat -c %i /usr/lib/cairn/apps/{APP}/rootfs/bin/busybox)
    echo "figures: pulling {PULLED} (a {layer}-byte layer) added $added bytes to /ostree/repo/objects; busybox inode pulled $pulled, baked $baked; the pull said: $(echo "$said" | tail -1)"
    test "$pulled" = "$baked" || fail "the pulled busybox is a copy, not the tree's object"
    [ "$added" -lt $(({layer} / 4)) ] || fail "the pull added $added bytes: its files are the host's"
    ;;
upgrade)
    ran || fail "the pulled image does not run after the upgrade"
    ;;
rollback)
    ran || fail "the pulled image does not run after the rollback"
    commit=$(cat /var/lib/cairn-test/pulled-commit)
    said=$(host app rmi {PULLED} 2>&1) || fail "rmi failed: $said"
    echo "$said" | grep -q "cleanup freed" || fail "rmi said: $said"
    if ostree --repo=/ostree/repo refs | grep cairn/app/; then fail "its ref is left"; fi
    if [ -e "/var/lib/cairn/checkouts/$commit" ]; then fail "its checkout is left"; fi
    ;;
esac
echo "the pulled image is the host's ($phase)"
"#,
        prelude = check_prelude("5m")
    )
}

/// Size of the largest blob of an OCI layout (its one layer).
fn largest_blob(layout: &Path) -> u64 {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap_or_else(|e| panic!("reading {}: {e}", layout.display()))
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_release_upgrades_rolls_back_and_survives_power_cuts_with_its_apps_under_host_test() {
    let t0 = Instant::now();
    let v1 = apps_image();
    let image_before = std::fs::metadata(&v1.image).expect("image");
    let (repo, v2, v2_digest) = must(prepare_v2(v1));
    assert_ne!(v1.commit, v2);
    eprintln!(
        "upgrade: v1 {} v2 {v2}; prepared in {:.1} s",
        v1.commit,
        t0.elapsed().as_secs_f64()
    );
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
    let facts = Facts {
        v1: &v1.commit,
        v2: &v2,
        v1_digest: &v1.digest,
        v2_digest: &v2_digest,
        registry_port: registry.port(),
        layer: largest_blob(&layout),
    };

    let run = build_dir("qemu-tests/runs").join(format!("upgrade.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    let checks = run.join("checks");
    std::fs::create_dir_all(&checks).expect("run dir");
    write_check(&checks, "10-node", &node_check(&facts));
    write_check(&checks, "20-baked-app", &baked_app_check(&facts));
    write_check(&checks, "30-limits", &limits_check());
    write_check(&checks, "40-pulled-image", &pull_check(&facts));
    let config = run.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n\
             [[files]]\npath = \"{ETC_FILE}\"\ncontent = \"{ETC_TEXT}\\n\"\n\
             [[files]]\npath = \"{VAR_FILE}\"\ncontent = \"{VAR_TEXT}\\n\"\n"
        ),
    )
    .expect("node config");
    let junit = run.join("junit.xml");

    let started = Instant::now();
    // Its progress (stderr) is shown as it comes, and kept for the figures.
    let mut child = Command::new(must(host_binary()))
        .args(["test", "upgrade", "--from"])
        .arg(&v1.image)
        .arg("--repo")
        .arg(&repo)
        .args(["--ref", &v1.ref_, "--power-cut", "3", "--seed", SEED])
        .arg("--check")
        .arg(&checks)
        .arg("--config")
        .arg(&config)
        .arg("--junit")
        .arg(&junit)
        .arg("--artifacts")
        .arg(run.join("artifacts"))
        .args(["--memory", "1536M", "--boot-timeout", "15m"])
        .args(["--forward", &facts.registry_port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running host test upgrade");
    let err = child.stderr.take().expect("stderr");
    let progress = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(err)).map_while(|l| l.ok()) {
            eprintln!("upgrade: {line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let out = child.wait_with_output().expect("host test upgrade");
    let stderr = progress.join().expect("its stderr");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "upgrade: host test upgrade took {:.1} s:\n{stdout}",
        took.as_secs_f64()
    );
    let xml = std::fs::read_to_string(&junit).expect("JUnit written");
    for (_, figures) in xml.lines().filter_map(|l| l.split_once("figures: ")) {
        let text = [
            ("&apos;", "'"),
            ("&quot;", "\""),
            ("&lt;", "<"),
            ("&gt;", ">"),
        ]
        .iter()
        .fold(figures.to_string(), |t, (from, to)| t.replace(from, to))
        .replace("&amp;", "&");
        eprintln!("upgrade: figures: {text}");
    }
    assert!(
        out.status.success(),
        "host test upgrade failed: {}",
        out.status
    );

    let names = ["10-node", "20-baked-app", "30-limits", "40-pulled-image"];
    let mut steps = vec!["boot".to_string()];
    steps.extend(names.iter().map(|n| format!("boot/{n}")));
    steps.push("upgrade".into());
    steps.extend(names.iter().map(|n| format!("upgrade/{n}")));
    steps.push("rollback".into());
    steps.extend(names.iter().map(|n| format!("rollback/{n}")));
    steps.extend((1..=3).map(|n| format!("power cut {n}")));
    assert!(
        stdout.starts_with(&format!("TAP version 14\n1..{}\n", steps.len())),
        "{stdout}"
    );
    for (n, name) in steps.iter().enumerate() {
        let line = format!("ok {} - {name}\n", n + 1);
        assert!(stdout.contains(&line), "no {line:?} in:\n{stdout}");
    }
    assert!(
        xml.contains(&format!(
            "<testsuites tests=\"{}\" failures=\"0\" errors=\"0\"",
            steps.len()
        )),
        "{xml}"
    );

    // v2 came over HTTP with its static delta, and everything the server
    // sent (the upgrade, the rollback, the cut upgrades) is small next to
    // the app's layer: a one-file app change fetches about that file.
    let deltas = stderr
        .lines()
        .find_map(|l| l.split_once("static delta requests: "))
        .and_then(|(_, n)| n.trim().parse::<u32>().ok());
    assert!(
        matches!(deltas, Some(n) if n > 0),
        "no static delta fetched:\n{stderr}"
    );
    let served: u64 = stderr
        .lines()
        .find_map(|l| l.strip_suffix(" bytes served"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bytes served in:\n{stderr}"));
    eprintln!(
        "upgrade: figures: the server sent {served} bytes in all (the app's layer alone is {} bytes); the whole test {:.0} s",
        facts.layer,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        served < facts.layer / 4,
        "{served} bytes served for a one-file app change; the layer is {}",
        facts.layer
    );

    // The image under test was only ever read.
    let image_after = std::fs::metadata(&v1.image).expect("image");
    assert_eq!(image_before.len(), image_after.len());
    assert_eq!(image_before.modified().ok(), image_after.modified().ok());
    let _ = std::fs::remove_dir_all(&run);
    drop(registry);
}
