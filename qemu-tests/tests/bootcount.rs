//! Boot counting in GRUB, proven by reboots (issue 7, QEMU): a deployment
//! that never reaches user space comes back to the previous one without a
//! human.
//!
//! Boot v1 (the test image) and point its remote at an HTTP server on the
//! host's loopback that serves:
//! - v2: the test host plus one file (healthy);
//! - v3: v2 whose `/usr/lib/systemd/systemd` exits at once, so PID 1 dies,
//!   the kernel panics and (`panic=10`) reboots.
//!
//! `host deploy v2` arms the counter, v2 boots, its health check proves it
//! (`boot_success=1`, counter gone). `host upgrade` to v3 arms it again; v3
//! panics on each of its 3 attempts, GRUB then boots v2 with
//! `boot_counter=-1`, and v2's health check records v3 as bad, makes v2 the
//! default again and clears the counter. No input but the one reboot.
//!
//! Run with `cargo test -p qemu-tests --test bootcount -- --test-threads=1`
//! as root.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use qemu_tests::fixture::{
    build_dir, host_binary, ostree_cli, run_host, workspace, HttpServer, TEST_MANIFEST,
};
use qemu_tests::{boot_test_image, test_image, TestImage, Vm};
use serde_json::Value;

fn must<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

const V2_FILE: &str = "/usr/share/cairn-test/bootcount-v2";
/// What replaces systemd in v3: init that exits, so the kernel panics.
const BROKEN_INIT: &str = "#!/bin/sh\n\
    echo 'cairn bootcount test: this init exits at once' >/dev/console\n\
    exit 1\n";

struct Commits {
    repo: PathBuf,
    v2: String,
    v3: String,
}

/// v2 and v3 on the image's ref, composed through manifests into a repository
/// of this test process that starts from v1 (objects hardlinked).
fn compose_updates(image: &TestImage) -> Result<Commits> {
    let dir = build_dir(&format!("qemu-tests/bootcount/{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let repo = dir.join("repo");
    let ref_ = image.ref_.as_str();
    ostree_cli(&repo, &["init", "--mode=archive"])?;
    ostree_cli(
        &repo,
        &["pull-local", &image.repo.to_string_lossy(), &image.commit],
    )?;
    ostree_cli(&repo, &["refs", &format!("--create={ref_}"), &image.commit])?;
    std::fs::write(dir.join("bootcount-v2"), "healthy v2\n")?;
    std::fs::write(dir.join("broken-init"), BROKEN_INIT)?;
    let v2_manifest = dir.join("v2.toml");
    std::fs::write(
        &v2_manifest,
        format!(
            "# v2: the test host and one more file; it boots and is healthy.\n\
             include = [{:?}]\n\n\
             [[files]]\nsrc = \"bootcount-v2\"\ndst = \"{V2_FILE}\"\nmode = \"0644\"\n",
            workspace().join(TEST_MANIFEST).to_string_lossy()
        ),
    )?;
    let v3_manifest = dir.join("v3.toml");
    std::fs::write(
        &v3_manifest,
        format!(
            "# v3: v2 whose init exits at once: it never reaches user space.\n\
             include = [{:?}]\n\n\
             [[files]]\nsrc = \"broken-init\"\ndst = \"/usr/lib/systemd/systemd\"\nmode = \"0755\"\n",
            v2_manifest.to_string_lossy()
        ),
    )?;
    let host = host_binary()?;
    let mut commits = Vec::new();
    for manifest in [&v2_manifest, &v3_manifest] {
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
        commits.push(
            qemu_tests::fixture::line_value(&out, "commit")
                .context("`host compose tree` printed no commit line")?,
        );
    }
    run_host(
        &host,
        &["compose", "publish", "--repo", &repo.to_string_lossy()],
    )?;
    Ok(Commits {
        repo,
        v2: commits[0].clone(),
        v3: commits[1].clone(),
    })
}

fn status(vm: &mut Vm) -> Value {
    let text = must(vm.ok("host status --json"));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("host status --json is not JSON ({e}):\n{text}"))
}

fn grubenv(vm: &mut Vm) -> String {
    must(vm.ok("grep -v '^#' /boot/grub/grubenv || true"))
}

/// Wait for the boot (and so cairn-health.service) to finish.
fn wait_health(vm: &mut Vm, what: &str) {
    let state = must(vm.wait_booted());
    let health = must(vm.run("systemctl is-active cairn-health.service; journalctl -b -u cairn-health.service --no-pager | tail -20"));
    eprintln!(
        "bootcount: {what}: boot {state} {:.1} s after QEMU started; health:\n{}",
        vm.since_power_on().as_secs_f64(),
        health.stdout
    );
    assert!(
        health.stdout.starts_with("active"),
        "{what}: cairn-health.service did not succeed:\n{}",
        health.stdout
    );
}

#[test]
fn a_deployment_that_never_reaches_user_space_falls_back_by_itself() {
    let image = test_image();
    let started = Instant::now();
    let commits = must(compose_updates(image));
    eprintln!(
        "bootcount: v2 {} and v3 {} composed in {:.1} s",
        commits.v2,
        commits.v3,
        started.elapsed().as_secs_f64()
    );
    let server = must(HttpServer::start(&commits.repo, None));
    let url = format!("http://10.0.2.2:{}/", server.port);

    let mut vm = must(boot_test_image("bootcount"));
    wait_health(&mut vm, "v1");
    must(vm.ok(&format!(
        "set -e; ostree --repo=/ostree/repo remote delete --if-exists cairn; \
         ostree --repo=/ostree/repo remote add --no-gpg-verify cairn {url}"
    )));
    let s = status(&mut vm);
    assert_eq!(s["bootCounter"]["state"], "off", "{s:#}");

    // ---- a healthy new deployment: armed, booted, proven
    let out = must(vm.ok(&format!("host deploy {}", &commits.v2[..16])));
    eprintln!("bootcount: host deploy v2:\n{out}");
    let env = grubenv(&mut vm);
    assert!(
        env.contains("boot_counter=3\n") && env.contains("boot_success=0\n"),
        "armed for v2:\n{env}"
    );
    let s = status(&mut vm);
    assert_eq!(s["bootCounter"]["state"], "counting", "{s:#}");
    assert_eq!(s["bootCounter"]["bootCounter"], 3, "{s:#}");
    let text = must(vm.ok("host status"));
    assert!(text.contains("Boot counter: armed"), "{text}");

    must(vm.reboot());
    wait_health(&mut vm, "v2");
    let s = status(&mut vm);
    let d0 = &s["deployments"][0];
    assert_eq!(d0["checksum"], commits.v2.as_str(), "{s:#}");
    assert_eq!(d0["booted"], true, "{s:#}");
    assert_eq!(s["bootCounter"]["state"], "off", "{s:#}");
    assert_eq!(s["bootCounter"]["bootSuccess"], true, "{s:#}");
    assert_eq!(s["bootCounter"]["bootCounter"], Value::Null, "{s:#}");
    let env = grubenv(&mut vm);
    assert!(
        env.contains("boot_success=1\n") && !env.contains("boot_counter="),
        "v2 proven:\n{env}"
    );

    // ---- a deployment that never reaches user space
    let out = must(vm.ok("host upgrade"));
    eprintln!("bootcount: host upgrade to v3:\n{out}");
    let s = status(&mut vm);
    assert_eq!(
        s["deployments"][0]["checksum"],
        commits.v3.as_str(),
        "{s:#}"
    );
    assert_eq!(s["bootCounter"]["state"], "counting", "{s:#}");
    let rebooted = Instant::now();
    // One reboot; the rest happens without anyone: 3 panicking boots of v3,
    // then GRUB boots v2. Four boots in a row can take longer than the
    // harness waits for one on a loaded machine: wait up to three times.
    let old_boot = vm.boot_id().expect("booted").to_string();
    let mut next = vm.reboot();
    for _ in 0..2 {
        match &next {
            Ok(_) => break,
            Err(e) => eprintln!("bootcount: still waiting for the fallback boot ({e:#})"),
        }
        next = vm.wait_ready();
    }
    let new_boot = must(next);
    assert_ne!(new_boot, old_boot, "the machine did not reboot");
    let fallback_time = rebooted.elapsed();
    wait_health(&mut vm, "v2 after the fallback");
    let serial = vm.serial_text();
    let panics = serial.matches("Kernel panic").count();
    let init_exits = serial
        .matches("cairn bootcount test: this init exits at once")
        .count();
    eprintln!(
        "bootcount: back on v2 {:.1} s after the reboot into v3; {panics} kernel panics, {init_exits} broken inits on the serial console",
        fallback_time.as_secs_f64()
    );
    assert!(panics >= 3, "v3 had 3 attempts, saw {panics} panics");

    let s = status(&mut vm);
    let d0 = &s["deployments"][0];
    assert_eq!(d0["checksum"], commits.v2.as_str(), "v2 is default: {s:#}");
    assert_eq!(d0["booted"], true, "v2 is booted: {s:#}");
    let bad = s["health"]["badCommits"]
        .as_array()
        .unwrap_or_else(|| panic!("no health state: {s:#}"));
    let v3 = bad
        .iter()
        .find(|b| b["checksum"] == commits.v3.as_str())
        .unwrap_or_else(|| panic!("v3 not recorded as bad: {s:#}"));
    assert!(
        v3["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("did not boot to a healthy user space in 3 attempts"),
        "{v3:#}"
    );
    assert_eq!(s["bootCounter"]["state"], "off", "{s:#}");
    assert_eq!(s["bootCounter"]["bootCounter"], Value::Null, "{s:#}");
    let text = must(vm.ok("host status"));
    assert!(
        text.contains("did not boot to a healthy user space"),
        "{text}"
    );

    // The fallback survives another reboot: v2 stays the default.
    must(vm.reboot());
    wait_health(&mut vm, "v2 again");
    let s = status(&mut vm);
    assert_eq!(
        s["deployments"][0]["checksum"],
        commits.v2.as_str(),
        "{s:#}"
    );
    assert_eq!(s["deployments"][0]["booted"], true, "{s:#}");
    drop(server);
    let _ = std::fs::remove_dir_all(commits.repo.parent().unwrap());
}
