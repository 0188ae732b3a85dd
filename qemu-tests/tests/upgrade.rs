//! The updater proven by reboots (issue 5, QEMU): boot v1 (the test image),
//! publish v2 over HTTP from the host's loopback, `host upgrade --reboot`,
//! check v2 booted with v1 as rollback and the node's /etc and /var kept,
//! `host rollback --reboot` back to v1, then cut the power in the middle of
//! another `host upgrade` and check the node boots a complete deployment and
//! upgrades again.
//!
//! Run with `cargo test -p qemu-tests --test upgrade -- --test-threads=1` as
//! root.
//!
//! v2 is composed from a manifest that includes the test manifest and adds one
//! file, into its own archive repository under `build/qemu-tests/upgrades/`
//! that starts from v1 (imported from the fixture repository by hardlinks), so
//! v2's parent is v1 and `host compose publish` writes the v1 → v2 static
//! delta. The fixture repository itself is never moved: the other boot tests
//! keep their cached image. v2 is reused by later runs while v1 is the same
//! commit; an flock lets concurrent test processes share it safely.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qemu_tests::fixture::{
    build_dir, host_binary, ostree_cli, run_host, workspace, DirLock, HttpServer, TEST_MANIFEST,
};
use qemu_tests::{boot_test_image, test_image, TestImage, Vm};
use serde_json::Value;

/// Unwrap with the whole error chain in the panic message.
fn must<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// The file only v2 has.
const V2_FILE: &str = "/usr/share/cairn-test/upgrade-v2";
const V2_TEXT: &str = "cairn QEMU upgrade test: this is v2\n";

/// The update: a commit on the test ref whose parent is the image's commit.
struct Update {
    repo: PathBuf,
    commit: String,
    version: String,
}

/// Remove the v2 directories of other v1 commits that no process uses.
fn remove_stale_updates(parent: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_key = name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit());
        if path == keep || !is_key || !path.is_dir() {
            continue;
        }
        if let Ok(_lock) = DirLock::take(&path, libc::LOCK_EX | libc::LOCK_NB) {
            let _ = std::fs::remove_dir_all(&path);
            let _ = std::fs::remove_file(path.with_extension("lock"));
        }
    }
}

/// v2 for the image's commit, in `build/qemu-tests/upgrades/<v1>/`; the
/// returned lock (shared) keeps other test processes from removing it.
fn prepare_update(image: &TestImage) -> Result<(Update, DirLock)> {
    let parent_dir = build_dir("qemu-tests/upgrades");
    std::fs::create_dir_all(&parent_dir)?;
    let dir = parent_dir.join(&image.commit[..16]);
    let lock = DirLock::take(&dir, libc::LOCK_EX)?;
    remove_stale_updates(&parent_dir, &dir);
    let repo = dir.join("repo");
    let ref_ = image.ref_.as_str();
    let reusable = ostree_cli(&repo, &["rev-parse", &format!("{ref_}^")])
        .is_ok_and(|parent| parent == image.commit)
        && ostree_cli(&repo, &["cat", ref_, V2_FILE]).is_ok_and(|t| t == V2_TEXT.trim());
    let host = host_binary()?;
    if reusable {
        eprintln!("upgrade: reusing v2 in {}", repo.display());
    } else {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // v1 into a repository of our own: objects are hardlinked, nothing copied.
        ostree_cli(&repo, &["init", "--mode=archive"])?;
        ostree_cli(
            &repo,
            &["pull-local", &image.repo.to_string_lossy(), &image.commit],
        )?;
        ostree_cli(&repo, &["refs", &format!("--create={ref_}"), &image.commit])?;
        let manifest = dir.join("v2.toml");
        std::fs::write(dir.join("upgrade-v2"), V2_TEXT)?;
        std::fs::write(
            &manifest,
            format!(
                "# v2 of the test host for the QEMU upgrade test: one more file.\n\
                 include = [{:?}]\n\n\
                 [[files]]\nsrc = \"upgrade-v2\"\ndst = \"{V2_FILE}\"\nmode = \"0644\"\n",
                workspace().join(TEST_MANIFEST).to_string_lossy()
            ),
        )?;
        let out = run_host(
            &host,
            &[
                "compose",
                "tree",
                "--repo",
                &repo.to_string_lossy(),
                "--cache",
                &build_dir("cache").to_string_lossy(),
                &manifest.to_string_lossy(),
            ],
        )?;
        eprintln!(
            "upgrade: composed v2 in {:.1} s:\n{out}",
            started.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    let out = run_host(
        &host,
        &["compose", "publish", "--repo", &repo.to_string_lossy()],
    )?;
    eprintln!(
        "upgrade: published in {:.1} s:\n{out}",
        started.elapsed().as_secs_f64()
    );
    let commit = ostree_cli(&repo, &["rev-parse", ref_])?;
    let parent = ostree_cli(&repo, &["rev-parse", &format!("{ref_}^")])?;
    if parent != image.commit {
        bail!(
            "v2 {commit} has parent {parent}, not the image's commit {}",
            image.commit
        );
    }
    let version = ostree_cli(&repo, &["show", "--print-metadata-key=version", &commit])?
        .trim_matches('\'')
        .to_string();
    lock.set(libc::LOCK_SH)?;
    Ok((
        Update {
            repo,
            commit,
            version,
        },
        lock,
    ))
}

/// What `server` answered (its request log):
/// (requests, body bytes) served since the log had `from` lines, and the
/// log's current line count. Body bytes are the sizes of the files
/// answered with 200 (http.server logs no sizes; it sends whole files).
fn served_since(server: &HttpServer, from: usize) -> (usize, u64, usize) {
    let Some(log) = &server.log else {
        return (0, 0, from);
    };
    let file = match std::fs::File::open(log) {
        Ok(f) => f,
        Err(_) => return (0, 0, from),
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(|l| l.ok()).collect();
    let (mut requests, mut bytes) = (0, 0);
    for line in lines.iter().skip(from) {
        let Some(req) = line.split('"').nth(1) else {
            continue;
        };
        let mut parts = req.split_whitespace();
        let (Some("GET"), Some(path)) = (parts.next(), parts.next()) else {
            continue;
        };
        requests += 1;
        let status = line.split('"').nth(2).unwrap_or("").trim();
        if status.starts_with("200") {
            let path = path
                .split('?')
                .next()
                .unwrap_or(path)
                .trim_start_matches('/');
            bytes += std::fs::metadata(server.root.join(path))
                .map(|m| m.len())
                .unwrap_or(0);
        }
    }
    (requests, bytes, lines.len())
}

/// Wait until systemd says the boot is finished; fails if it ends degraded.
fn assert_boot_finished(vm: &mut Vm, what: &str) {
    let state = must(vm.wait_booted());
    eprintln!(
        "upgrade: {what}: boot finished ({state}) {:.1} s after QEMU started",
        vm.since_power_on().as_secs_f64()
    );
    if state != "running" {
        let failed = must(vm.run(
            "systemctl --failed --no-legend; \
             for u in $(systemctl --failed --no-legend --plain | awk '{print $1}'); do \
             systemctl status --no-pager -l \"$u\" | tail -20; done; \
             journalctl -b -p err --no-pager | tail -50",
        ));
        panic!(
            "{what}: boot ended {state:?}, not running:\n{}",
            failed.stdout
        );
    }
}

/// Start `command` detached in the guest (it reboots the machine), its output
/// to `log` (which must be under /var to survive); if it fails, reboot anyway
/// so the test sees the failure in the log instead of waiting for a boot that
/// never comes. Returns the new boot id and the wall time until the control
/// shell of the new boot answered.
fn run_rebooting(vm: &mut Vm, command: &str, log: &str) -> (String, Duration) {
    let old = vm.boot_id().expect("booted").to_string();
    let started = Instant::now();
    must(vm.ok(&format!(
        "mkdir -p \"$(dirname {log})\"; setsid -f sh -c '\
         s=$(date +%s%N); {command} >{log} 2>&1; rc=$?; \
         echo \"exit $rc after $(( ($(date +%s%N) - s) / 1000000 )) ms\" >>{log}; sync; \
         [ $rc = 0 ] || systemctl reboot' </dev/null >/dev/null 2>&1"
    )));
    let id = must(vm.wait_ready());
    assert_ne!(id, old, "`{command}` did not reboot the machine");
    (id, started.elapsed())
}

/// Output of a rebooting command (written before the reboot); fails if it
/// recorded a non-zero exit.
fn rebooting_output(vm: &mut Vm, command: &str, log: &str) -> String {
    let text = must(vm.ok(&format!("cat {log}")));
    if let Some(line) = text.lines().find(|l| l.starts_with("exit ")) {
        assert!(line.starts_with("exit 0 "), "`{command}` failed:\n{text}");
    }
    text
}

fn status(vm: &mut Vm) -> Value {
    let text = must(vm.ok("host status --json"));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("host status --json is not JSON ({e}):\n{text}"))
}

fn deployments(status: &Value) -> &Vec<Value> {
    status["deployments"].as_array().expect("deployments array")
}

/// The booted deployment; exactly one.
fn booted(status: &Value) -> &Value {
    let booted: Vec<_> = deployments(status)
        .iter()
        .filter(|d| d["booted"] == true)
        .collect();
    assert_eq!(booted.len(), 1, "one booted deployment: {status:#}");
    booted[0]
}

/// The deployment marked rollback; exactly one.
fn rollback(status: &Value) -> &Value {
    let rb: Vec<_> = deployments(status)
        .iter()
        .filter(|d| d["rollback"] == true)
        .collect();
    assert_eq!(rb.len(), 1, "one rollback deployment: {status:#}");
    rb[0]
}

/// The commit of the running deployment, from the kernel command line (not
/// from our own `host status`).
fn running_commit(vm: &mut Vm) -> String {
    let path = must(vm.ok(
        r#"set -e; arg=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^ostree=//p'); readlink -f "/sysroot$arg""#,
    ));
    let name = Path::new(path.trim())
        .file_name()
        .expect("deployment directory")
        .to_string_lossy()
        .into_owned();
    name.split('.').next().unwrap_or_default().to_string()
}

const ETC_FILE: &str = "/etc/cairn-test/upgrade.conf";
const VAR_FILE: &str = "/var/lib/cairn-test/upgrade-data";

/// The node's own state made on v1 is all there.
fn assert_node_state_kept(vm: &mut Vm, what: &str) {
    assert_eq!(
        must(vm.ok(&format!("cat {ETC_FILE}"))),
        "made on v1 before the upgrade\n",
        "{what}: new /etc file"
    );
    let fstab = must(vm.ok("tail -n 1 /etc/fstab"));
    assert_eq!(
        fstab, "# cairn-test: edited on v1\n",
        "{what}: edited /etc/fstab"
    );
    assert_eq!(
        must(vm.ok(&format!("cat {VAR_FILE}"))),
        "node data from v1\n",
        "{what}: /var data"
    );
}

#[test]
fn upgrade_over_http_reboot_rollback_and_power_cut() {
    let image = test_image();
    let v1 = image.commit.clone();
    let v1_version = image.version.clone().expect("v1 has a version");
    let (update, _update_lock) = must(prepare_update(image));
    let v2 = update.commit.clone();
    assert_ne!(v1, v2);
    assert_ne!(v1_version, update.version);
    eprintln!(
        "upgrade: v1 {v1} ({v1_version}), v2 {v2} ({})",
        update.version
    );

    // Not in the machine's work directory, which Vm::start empties.
    let http_log = update
        .repo
        .with_file_name(format!("http.{}.log", std::process::id()));
    let server = must(HttpServer::start(&update.repo, Some(&http_log)));
    let url = format!("http://10.0.2.2:{}/", server.port);

    // ---- boot v1
    let mut vm = must(boot_test_image("upgrade"));
    assert_boot_finished(&mut vm, "v1");
    let boot_time = vm.since_power_on();
    let st = status(&mut vm);
    assert_eq!(booted(&st)["checksum"], v1.as_str(), "{st:#}");
    assert_eq!(deployments(&st).len(), 1, "{st:#}");

    // Point the node's remote at the HTTP server (the image's remote is the
    // file:// path of the repository it was written from).
    must(vm.ok(&format!(
        "set -e; ostree --repo=/ostree/repo remote delete --if-exists cairn; \
         ostree --repo=/ostree/repo remote add --no-gpg-verify cairn {url}; \
         ostree --repo=/ostree/repo remote show-url cairn"
    )));

    // The node's own state, made on v1.
    must(vm.ok(&format!(
        "set -e; mkdir -p $(dirname {ETC_FILE}) $(dirname {VAR_FILE}); \
         echo 'made on v1 before the upgrade' > {ETC_FILE}; \
         echo '# cairn-test: edited on v1' >> /etc/fstab; \
         echo 'node data from v1' > {VAR_FILE}; sync"
    )));

    // ---- the update is seen
    let check = must(vm.run("host upgrade --check --unchanged-exit-77"));
    assert!(check.success(), "host upgrade --check: {check}");
    assert!(check.stdout.contains(&update.version), "{check}");

    // ---- host upgrade --reboot
    let (_, _, mark) = served_since(&server, 0);
    let (_, reboot_wall) = run_rebooting(
        &mut vm,
        "host upgrade --reboot",
        "/var/lib/cairn-test/upgrade-1.log",
    );
    let (requests, bytes, mark) = served_since(&server, mark);
    assert_boot_finished(&mut vm, "v2 after host upgrade --reboot");
    let log = rebooting_output(
        &mut vm,
        "host upgrade --reboot",
        "/var/lib/cairn-test/upgrade-1.log",
    );
    eprintln!(
        "upgrade: host upgrade --reboot: {requests} HTTP requests, {bytes} bytes served; \
         {:.1} s from the command to the next boot's control shell; output:\n{log}",
        reboot_wall.as_secs_f64()
    );
    assert!(log.contains("Staged"), "{log}");
    assert!(requests > 0, "the upgrade fetched nothing over HTTP");
    let deltas = std::fs::read_to_string(&http_log).unwrap_or_default();
    assert!(
        deltas.contains("GET /deltas/"),
        "the upgrade did not use the static delta:\n{deltas}"
    );

    // v2 booted, v1 is the rollback, the node's state kept.
    assert_eq!(running_commit(&mut vm), v2);
    let st = status(&mut vm);
    let b = booted(&st);
    assert_eq!(b["checksum"], v2.as_str(), "{st:#}");
    assert_eq!(b["version"], update.version.as_str(), "{st:#}");
    assert_eq!(b["index"], 0, "{st:#}");
    let rb = rollback(&st);
    assert_eq!(rb["checksum"], v1.as_str(), "{st:#}");
    assert_eq!(rb["version"], v1_version.as_str(), "{st:#}");
    assert_eq!(
        b["origin"]["refspec"],
        format!("cairn:{}", image.ref_).as_str(),
        "{st:#}"
    );
    assert_eq!(must(vm.ok(&format!("cat {V2_FILE}"))), V2_TEXT);
    assert_node_state_kept(&mut vm, "after the upgrade");
    let text = must(vm.ok("host status"));
    eprintln!("upgrade: host status on v2:\n{text}");

    // ---- host rollback --reboot
    let rb_log = "/var/lib/cairn-test/rollback.log";
    let (_, rollback_wall) = run_rebooting(&mut vm, "host rollback --reboot", rb_log);
    assert_boot_finished(&mut vm, "v1 after host rollback --reboot");
    let log = rebooting_output(&mut vm, "host rollback --reboot", rb_log);
    eprintln!(
        "upgrade: host rollback --reboot: {:.1} s to the next boot's control shell; output:\n{log}",
        rollback_wall.as_secs_f64()
    );
    assert_eq!(running_commit(&mut vm), v1);
    let st = status(&mut vm);
    assert_eq!(booted(&st)["checksum"], v1.as_str(), "{st:#}");
    assert_eq!(rollback(&st)["checksum"], v2.as_str(), "{st:#}");
    let gone = must(vm.run(&format!("test -e {V2_FILE}")));
    assert!(!gone.success(), "v1 has {V2_FILE}");
    assert_node_state_kept(&mut vm, "after the rollback");
    let (_, _, mark) = served_since(&server, mark);

    // ---- power cut in the middle of an upgrade
    must(vm.ok(
        "setsid -f sh -c 'host upgrade >/run/cairn-upgrade.log 2>&1; echo \"exit $?\" >>/run/cairn-upgrade.log' \
         </dev/null >/dev/null 2>&1",
    ));
    let started = Instant::now();
    let at_cut = loop {
        let log = must(vm.ok("cat /run/cairn-upgrade.log 2>/dev/null || true"));
        // Cut once the deploy has begun (after the pull and the change
        // report), or when it finished, or when it takes too long.
        if log.contains("Update on")
            || log.contains("exit ")
            || started.elapsed() > Duration::from_secs(300)
        {
            break log;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let cut_after = started.elapsed();
    let phase = if at_cut.contains("exit ") {
        "after `host upgrade` exited (staged, not finalized)"
    } else if at_cut.contains("Staged") {
        "after staging, before `host upgrade` exited"
    } else if at_cut.contains("Update on") {
        "while staging the deployment"
    } else {
        "while pulling"
    };
    eprintln!(
        "upgrade: power cut {:.1} s into `host upgrade`, {phase}; its output so far:\n{at_cut}",
        cut_after.as_secs_f64()
    );
    let before_cut = vm.boot_id().expect("booted").to_string();
    let after_cut = must(vm.power_cut_and_restart());
    assert_ne!(before_cut, after_cut);
    assert_boot_finished(&mut vm, "after the power cut");
    let now = running_commit(&mut vm);
    assert!(now == v1 || now == v2, "booted {now}, neither v1 nor v2");
    let st = status(&mut vm);
    assert_eq!(booted(&st)["checksum"], now.as_str(), "{st:#}");
    let text = must(vm.ok("host status && ostree admin status"));
    eprintln!(
        "upgrade: after the power cut booted {} ({}):\n{text}",
        if now == v1 { "v1" } else { "v2" },
        now
    );
    // Every deployment listed is complete: its directory and origin exist.
    for d in deployments(&st) {
        let dir = format!(
            "/ostree/deploy/cairn/deploy/{}.{}",
            d["checksum"].as_str().expect("checksum"),
            d["serial"]
        );
        must(vm.ok(&format!("test -d {dir}/usr/bin && test -f {dir}.origin")));
    }
    assert_eq!(
        must(vm.ok(&format!("cat {VAR_FILE}"))),
        "node data from v1\n"
    );

    // ---- the node upgrades again; an /etc edit made after staging is kept
    if now == v1 {
        let out = must(vm.ok("host upgrade"));
        eprintln!("upgrade: host upgrade after the power cut:\n{out}");
        assert!(out.contains("Staged"), "{out}");
        must(vm.ok("echo 'made after staging' > /etc/cairn-test/after-staging && sync"));
        must(vm.reboot());
        assert_boot_finished(&mut vm, "v2 after the upgrade following the power cut");
        assert_eq!(
            must(vm.ok("cat /etc/cairn-test/after-staging")),
            "made after staging\n"
        );
    }
    assert_eq!(running_commit(&mut vm), v2);
    let st = status(&mut vm);
    assert_eq!(booted(&st)["checksum"], v2.as_str(), "{st:#}");
    assert_eq!(must(vm.ok(&format!("cat {V2_FILE}"))), V2_TEXT);
    assert_node_state_kept(&mut vm, "after the power cut and the new upgrade");
    let (requests, bytes, _) = served_since(&server, mark);
    eprintln!(
        "upgrade: after the rollback: {requests} HTTP requests, {bytes} bytes served (objects were local)"
    );
    eprintln!(
        "upgrade: figures: v1 boot {:.1} s; upgrade+reboot {:.1} s; rollback+reboot {:.1} s; {} QEMU runs",
        boot_time.as_secs_f64(),
        reboot_wall.as_secs_f64(),
        rollback_wall.as_secs_f64(),
        vm.serial_logs().len()
    );
    drop(vm);
    drop(server);
    let _ = std::fs::remove_file(&http_log);
}
