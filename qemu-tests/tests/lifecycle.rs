//! A node's life under QEMU where SSH cannot watch (issues 5 and 7), on the
//! test image's control shell (a root shell on a virtio-serial port). Under
//! TCG a boot costs one to two minutes, so every boot serves several checks.
//! (Upgrade, rollback and power cuts are proven with the users' runner, `host
//! test upgrade`, in `upgrade.rs`.)
//!
//! 1. **First boot of v1**: multi-user with nothing failed, read-only
//!    `/usr`, the tree's kernel, the composed commit with its origin and
//!    remote, `host status`, pure cgroup v2, the container bridge, the build
//!    machine's loopback reachable, GRUB's menu and environment block, the
//!    kernel arguments in order. A deployment written by stock libostree
//!    (`ostree admin deploy --karg-append`) gets its own menu entry from our
//!    generator, and is undeployed again. Its remote verifies signatures: an
//!    unsigned summary is refused before anything is staged.
//! 2. **It upgrades to a v3 that never reaches user space** (its
//!    `/usr/lib/systemd/systemd` exits, so the kernel panics and `panic=10`
//!    reboots): `host upgrade` arms the counter, one reboot, and without
//!    anyone v3 panics on its 3 attempts, GRUB boots v1 with
//!    `boot_counter=-1`, and its health check records v3 as bad and makes v1
//!    the default again. Only the serial console sees this.
//!
//! v2 (v1 plus a file) and v3 (v2 with a broken init) are composed with
//! `host compose tree` into an archive repository of their own under
//! `build/qemu-tests/updates/<v1>/` that starts from v1 (imported from the
//! fixture repository by hardlinks), so `host compose publish` writes the
//! static deltas. The ref serves v2 until phase 2 moves it to v3.
//! (That an `/etc` edit made after staging is kept is proven without a
//! reboot in `host/tests/node.rs`.) The
//! fixture repository is never moved, so the image stays cached; the updates
//! are reused by later runs while v1 is the same commit.
//!
//! Run with `cargo test -p qemu-tests --test lifecycle` as root.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_contracts::names::PUBLIC_KEY_FILE;
use qemu_tests::fixture::{
    build_dir, compose_into, host_binary, ostree_cli, run_host, start_update_repo, workspace,
    DirLock, HttpServer, TEST_KARG, TEST_MANIFEST,
};
use qemu_tests::guest::{booted, deployments, running_commit, running_deployment, status};
use qemu_tests::{boot_test_image, test_image, TestImage, Vm};
use serde_json::Value;

/// Unwrap with the whole error chain in the panic message.
fn must<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// The file only v2 (and v3) have.
const V2_FILE: &str = "/usr/share/cairn-test/upgrade-v2";
const V2_TEXT: &str = "cairn QEMU upgrade test: this is v2\n";
/// What replaces systemd in v3: an init that exits, so the kernel panics.
const BROKEN_INIT: &str = "#!/bin/sh\n\
    echo 'cairn lifecycle test: this init exits at once' >/dev/console\n\
    exit 1\n";
const BROKEN_INIT_SAYS: &str = "cairn lifecycle test: this init exits at once";

/// The updates: commits on the test ref, v1 → v2 → v3, signed by the
/// release key in `keys` (made with the updates, kept with them).
struct Updates {
    repo: PathBuf,
    keys: PathBuf,
    ref_: String,
    v2: String,
    v2_version: String,
    v3: String,
}

impl Updates {
    /// Point the ref at `commit` and publish (summary, static delta from its
    /// parent), as a release pipeline would, with a signed summary.
    fn publish(&self, commit: &str) -> Result<()> {
        self.publish_summary(commit, true)
    }

    fn publish_summary(&self, commit: &str, signed: bool) -> Result<()> {
        ostree_cli(&self.repo, &["reset", &self.ref_, commit])?;
        let started = Instant::now();
        let repo = self.repo.to_string_lossy();
        let keys = self.keys.to_string_lossy();
        let mut args = vec!["compose", "publish", "--repo", &repo];
        if signed {
            args.extend(["--gpg-homedir", &keys]);
        }
        let out = run_host(&host_binary()?, &args)?;
        eprintln!(
            "lifecycle: published {commit} in {:.1} s:\n{out}",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// Remove the update directories of other v1 commits that no process uses.
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

/// v2 and v3 for the image's commit, in `build/qemu-tests/updates/<v1>/`,
/// with the ref on v2 and published. The returned lock (exclusive: the test
/// moves the ref) keeps other test processes from using or removing it.
fn prepare_updates(image: &TestImage) -> Result<(Updates, DirLock)> {
    let parent_dir = build_dir("qemu-tests/updates");
    std::fs::create_dir_all(&parent_dir)?;
    let dir = parent_dir.join(&image.commit[..16]);
    let lock = DirLock::take(&dir, libc::LOCK_EX)?;
    remove_stale_updates(&parent_dir, &dir);
    let repo = dir.join("repo");
    let keys = dir.join("keys");
    let ref_ = image.ref_.clone();
    let recorded = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let (v2, v3) = (recorded("v2.commit"), recorded("v3.commit"));
    let parent_of = |c: &str| ostree_cli(&repo, &["rev-parse", &format!("{c}^")]).ok();
    let reusable = !v2.is_empty()
        && !v3.is_empty()
        && parent_of(&v2).as_deref() == Some(image.commit.as_str())
        && parent_of(&v3).as_deref() == Some(v2.as_str())
        && ostree_cli(&repo, &["cat", &v2, V2_FILE]).is_ok_and(|t| t == V2_TEXT.trim())
        && keys.join(PUBLIC_KEY_FILE).is_file()
        && ostree_cli(&repo, &["fsck", "--quiet"]).is_ok();
    let (v2, v3) = if reusable {
        eprintln!("lifecycle: reusing v2 and v3 in {}", repo.display());
        (v2, v3)
    } else {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        start_update_repo(&repo, &image.repo, &ref_, &image.commit)?;
        std::fs::write(dir.join("upgrade-v2"), V2_TEXT)?;
        std::fs::write(dir.join("broken-init"), BROKEN_INIT)?;
        let v2_manifest = dir.join("v2.toml");
        std::fs::write(
            &v2_manifest,
            format!(
                "# v2 of the test host: one more file; it boots and is healthy.\n\
                 include = [{:?}]\n\n\
                 [[files]]\nsrc = \"upgrade-v2\"\ndst = \"{V2_FILE}\"\nmode = \"0644\"\n",
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
        let v2 = compose_into(&repo, &v2_manifest)?;
        let v3 = compose_into(&repo, &v3_manifest)?;
        // Signed as a release pipeline signs them: a key made for these
        // updates, used for their commits and every summary.
        let made = run_host(
            &host_binary()?,
            &["compose".as_ref(), "keygen".as_ref(), keys.as_os_str()],
        )?;
        let fingerprint = made
            .lines()
            .find_map(|l| l.strip_prefix("fingerprint "))
            .context("keygen printed no fingerprint")?
            .to_string();
        for commit in [&v2, &v3] {
            ostree_cli(
                &repo,
                &[
                    "gpg-sign",
                    &format!("--gpg-homedir={}", keys.display()),
                    commit,
                    &fingerprint,
                ],
            )?;
        }
        let _ = std::process::Command::new("gpgconf")
            .arg("--homedir")
            .arg(&keys)
            .args(["--kill", "all"])
            .status();
        std::fs::write(dir.join("v2.commit"), &v2)?;
        std::fs::write(dir.join("v3.commit"), &v3)?;
        eprintln!(
            "lifecycle: composed v2 and v3 in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        (v2, v3)
    };
    for (name, commit, parent) in [("v2", &v2, &image.commit), ("v3", &v3, &v2)] {
        let actual = ostree_cli(&repo, &["rev-parse", &format!("{commit}^")])?;
        if &actual != parent {
            bail!("{name} {commit} has parent {actual}, expected {parent}");
        }
    }
    let v2_version = ostree_cli(&repo, &["show", "--print-metadata-key=version", &v2])?
        .trim_matches('\'')
        .to_string();
    let updates = Updates {
        repo,
        keys,
        ref_,
        v2,
        v2_version,
        v3,
    };
    updates.publish(&updates.v2)?;
    Ok((updates, lock))
}

/// Wait until systemd says the boot is finished; fails if it ends degraded
/// or if the node's health check (cairn-health.service) did not succeed.
fn assert_boot_finished(vm: &mut Vm, what: &str) {
    let state = must(vm.wait_booted());
    eprintln!(
        "lifecycle: {what}: boot finished ({state}) {:.1} s after QEMU started",
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
    let health = must(vm.run(
        "systemctl is-active cairn-health.service; \
         journalctl -b -u cairn-health.service --no-pager | tail -20",
    ));
    assert!(
        health.stdout.starts_with("active"),
        "{what}: cairn-health.service did not succeed:\n{}",
        health.stdout
    );
}

/// The kernel command line of the running guest, one argument per item.
fn cmdline(vm: &mut Vm) -> Vec<String> {
    must(vm.ok("cat /proc/cmdline"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn grubenv(vm: &mut Vm) -> String {
    must(vm.ok("grep -v '^#' /boot/grub/grubenv || true"))
}

/// What a freshly booted node must be.
fn first_boot_checks(vm: &mut Vm, image: &TestImage) {
    must(vm.ok("systemctl is-active multi-user.target"));

    // /usr is the read-only deployment; /etc and /var are the node's.
    let usr = must(vm.run("touch /usr/.cairn-test"));
    assert!(!usr.success(), "/usr is writable: {usr}");
    assert!(usr.stderr.contains("Read-only file system"), "{usr}");
    for dir in ["/etc", "/var"] {
        must(vm.ok(&format!(
            "echo x > {dir}/.cairn-test && rm {dir}/.cairn-test"
        )));
    }

    // The kernel is the tree's.
    let kernel = must(vm.ok("uname -r"));
    assert_eq!(
        kernel.trim(),
        image.kernel,
        "running kernel vs cairn.kernel"
    );

    // The booted deployment is the composed commit, serial 0, with the
    // origin and remote that `host upgrade` follows.
    let deployment = running_deployment(vm);
    assert!(
        deployment.contains("/ostree/deploy/cairn/deploy/"),
        "stateroot cairn: {deployment}"
    );
    assert_eq!(
        running_commit(vm),
        image.commit,
        "booted deployment {deployment}"
    );
    assert!(deployment.ends_with(".0"), "serial 0: {deployment}");
    let origin = must(vm.ok(&format!("cat {deployment}.origin")));
    assert!(
        origin.contains(&format!("refspec=cairn:{}", image.ref_)),
        "origin:\n{origin}"
    );
    let repo_config = must(vm.ok("cat /ostree/repo/config"));
    assert!(repo_config.contains("[remote \"cairn\"]"), "{repo_config}");
    assert!(repo_config.contains("bootloader=grub2"), "{repo_config}");

    // `host status --json` names the booted deployment and its version.
    let st = status(vm);
    let b = booted(&st);
    assert_eq!(b["checksum"], image.commit.as_str(), "{st:#}");
    assert_eq!(b["stateroot"], "cairn", "{st:#}");
    let version = image
        .version
        .as_deref()
        .expect("the composed commit has a version");
    assert_eq!(b["version"], version, "{st:#}");
    assert_eq!(deployments(&st).len(), 1, "{st:#}");
    assert_eq!(st["bootCounter"]["state"], "off", "{st:#}");

    // Pure cgroup v2 with the controllers containers need.
    let fs = must(vm.ok("stat -fc %T /sys/fs/cgroup"));
    assert_eq!(fs.trim(), "cgroup2fs");
    let controllers = must(vm.ok("cat /sys/fs/cgroup/cgroup.controllers"));
    for c in ["cpu", "memory", "pids"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "controller {c} missing: {controllers}"
        );
    }

    // The container bridge is up with its address.
    let link = must(vm.ok("ip -o link show dev cairn0"));
    let flags = link.split(['<', '>']).nth(1).unwrap_or("");
    assert!(flags.split(',').any(|f| f == "UP"), "cairn0 not up: {link}");
    let addr = must(vm.ok("ip -o -4 addr show dev cairn0"));
    assert!(addr.contains("10.88.0.1/16"), "cairn0 address: {addr}");

    // User-mode networking: a server on the host's loopback is 10.0.2.2.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().unwrap().port();
    let token = format!("cairn-{}", std::process::id());
    let reply = token.clone();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
        // Read the whole request first: closing a socket with unread bytes
        // sends a reset, and the guest's `cat` would lose the reply.
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        conn.write_all(format!("HTTP/1.0 200 OK\r\n\r\n{reply}\n").as_bytes())
            .expect("reply");
        // Half-close, then wait for the guest to close its end, so nothing
        // it sends late can turn our close into a reset.
        let _ = conn.shutdown(std::net::Shutdown::Write);
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
    });
    let fetched = must(vm.ok(&format!(
        "exec 3<>/dev/tcp/10.0.2.2/{port}; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    )));
    server.join().expect("server thread");
    assert!(fetched.contains(&token), "guest fetched: {fetched}");

    // /boot is mounted and holds the GRUB menu libostree had our generator
    // write, and GRUB's environment block (boot counter: nothing armed).
    let cfg = must(vm.ok("cat /boot/grub/grub.cfg"));
    assert!(cfg.contains("ostree="), "grub.cfg:\n{cfg}");
    assert!(
        cfg.contains("load_env boot_counter boot_success"),
        "grub.cfg:\n{cfg}"
    );
    let env = must(vm.ok("stat -c %s /boot/grub/grubenv; grep -v '^#' /boot/grub/grubenv || true"));
    assert_eq!(env.lines().next(), Some("1024"), "grubenv:\n{env}");
    assert!(!env.contains("boot_counter="), "grubenv:\n{env}");

    // The image's kernel arguments: the tree's, then --karg, then root.
    let args = cmdline(vm);
    for want in [
        "systemd.unified_cgroup_hierarchy=1",
        TEST_KARG,
        "root=LABEL=root",
        "rw",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
    }
    let pos = |k: &str| args.iter().position(|a| a == k).unwrap();
    assert!(pos("systemd.unified_cgroup_hierarchy=1") < pos(TEST_KARG));
    assert!(pos(TEST_KARG) < pos("root=LABEL=root"));

    // A deployment written by stock libostree (no code of ours but the
    // generator it runs) becomes the default menu entry with its own kernel
    // arguments, the image's carried over. Undeployed again, the menu is as
    // before. (Every later boot of this test proves GRUB follows the menu.)
    must(vm.ok(&format!(
        "ostree admin deploy --os=cairn --karg-append=cairn.second=1 cairn:{}",
        image.ref_
    )));
    let cfg = must(vm.ok("cat /boot/grub/grub.cfg"));
    assert_eq!(cfg.matches("\nmenuentry ").count(), 2, "grub.cfg:\n{cfg}");
    let default_linux = cfg
        .lines()
        .find(|l| l.trim_start().starts_with("linux "))
        .unwrap_or_else(|| panic!("no linux line in grub.cfg:\n{cfg}"));
    for want in ["cairn.second=1", TEST_KARG] {
        assert!(
            default_linux.split_whitespace().any(|a| a == want),
            "{want} missing from the default entry: {default_linux}"
        );
    }
    must(vm.ok("ostree admin undeploy 0"));
    let cfg = must(vm.ok("cat /boot/grub/grub.cfg"));
    assert_eq!(cfg.matches("\nmenuentry ").count(), 1, "grub.cfg:\n{cfg}");
    assert!(!cfg.contains("cairn.second=1"), "grub.cfg:\n{cfg}");
    let st = status(vm);
    assert_eq!(deployments(&st).len(), 1, "{st:#}");
}

#[test]
fn a_node_boots_refuses_an_unsigned_update_and_falls_back_from_a_broken_one() {
    let t0 = Instant::now();
    let image = test_image();
    let image_before = std::fs::metadata(&image.image).expect("image");
    let v1 = image.commit.clone();
    let v1_version = image.version.clone().expect("v1 has a version");
    let (updates, _updates_lock) = must(prepare_updates(image));
    let (v2, v3) = (updates.v2.clone(), updates.v3.clone());
    assert_ne!(v1, v2);
    assert_ne!(v1_version, updates.v2_version);
    eprintln!(
        "lifecycle: v1 {v1} ({v1_version}), v2 {v2} ({}), v3 {v3} (never boots); prepared in {:.1} s",
        updates.v2_version,
        t0.elapsed().as_secs_f64()
    );

    // Not in the machine's work directory, which Vm::start empties.
    let http_log = updates
        .repo
        .with_file_name(format!("http.{}.log", std::process::id()));
    let server = must(HttpServer::start(&updates.repo, Some(&http_log)));
    let url = format!("http://10.0.2.2:{}/", server.port);

    // ---- 1. first boot of v1
    let mut vm = must(boot_test_image("lifecycle"));
    assert_boot_finished(&mut vm, "v1");
    let boot_time = vm.since_power_on();
    first_boot_checks(&mut vm, image);

    // Point the node's remote at the HTTP server (the image's remote is the
    // file:// path of the repository it was written from), verifying
    // commits and summary against the updates' release key, as an image
    // written with --trust does.
    let public_key = std::fs::read_to_string(updates.keys.join(PUBLIC_KEY_FILE))
        .expect("the updates' public key");
    must(vm.ok(&format!(
        "set -e; ostree --repo=/ostree/repo remote delete --if-exists cairn; \
         ostree --repo=/ostree/repo remote add --set=gpg-verify=true \
           --set=gpg-verify-summary=true cairn {url}; \
         ostree --repo=/ostree/repo remote gpg-import --stdin cairn <<'CAIRN_KEY'\n{public_key}CAIRN_KEY\n\
         ostree --repo=/ostree/repo remote show-url cairn"
    )));
    assert_eq!(
        status(&mut vm)["verified"],
        true,
        "the node verifies its updates"
    );

    // An unsigned summary is refused before anything is fetched or staged.
    must(updates.publish_summary(&updates.v2, false));
    let before = status(&mut vm)["deployments"].clone();
    let refused = must(vm.run("host upgrade"));
    assert!(
        !refused.success(),
        "an unsigned summary was accepted: {refused}"
    );
    assert!(
        refused.stderr.contains("GPG") || refused.stderr.contains("signature"),
        "{refused}"
    );
    assert_eq!(status(&mut vm)["deployments"], before, "nothing staged");

    let now = v1.clone();
    // ---- 2. the node upgrades, to a v3 that never reaches user space;
    // GRUB and the health check fall back to what ran before (`now`)
    must(updates.publish(&v3));
    let out = must(vm.ok("host upgrade"));
    eprintln!("lifecycle: host upgrade to v3:\n{out}");
    let st = status(&mut vm);
    assert_eq!(st["deployments"][0]["checksum"], v3.as_str(), "{st:#}");
    assert_eq!(st["bootCounter"]["state"], "counting", "{st:#}");
    assert_eq!(st["bootCounter"]["bootCounter"], 3, "{st:#}");
    let text = must(vm.ok("host status"));
    assert!(text.contains("Boot counter: armed"), "{text}");
    let env = grubenv(&mut vm);
    assert!(
        env.contains("boot_counter=3\n") && env.contains("boot_success=0\n"),
        "armed for v3:\n{env}"
    );

    let rebooted = Instant::now();
    // One reboot; the rest happens without anyone: 3 panicking boots of v3,
    // then GRUB boots v2. Four boots in a row can take longer than the
    // harness waits for one on a loaded machine: wait up to three times.
    let old_boot = vm.boot_id().expect("booted").to_string();
    let mut next = vm.reboot();
    for _ in 0..2 {
        match &next {
            Ok(_) => break,
            Err(e) => eprintln!(
                "lifecycle: still waiting for the fallback boot ({e:#}); the serial console's tail:\n{}",
                vm.serial_tail(40)
            ),
        }
        next = vm.wait_ready();
    }
    let new_boot = must(next);
    assert_ne!(new_boot, old_boot, "the machine did not reboot");
    let fallback_time = rebooted.elapsed();
    assert_boot_finished(&mut vm, "the fallback from v3");
    let serial = vm.serial_text();
    let panics = serial.matches("Kernel panic").count();
    let init_exits = serial.matches(BROKEN_INIT_SAYS).count();
    eprintln!(
        "lifecycle: back on {now} {:.1} s after the reboot into v3; {panics} kernel panics, {init_exits} broken inits on the serial console",
        fallback_time.as_secs_f64()
    );
    assert!(panics >= 3, "v3 had 3 attempts, saw {panics} panics");
    assert!(init_exits >= 3, "v3's init ran {init_exits} times, not 3");

    let st = status(&mut vm);
    let d0 = &st["deployments"][0];
    assert_eq!(d0["checksum"], now.as_str(), "{now} is the default: {st:#}");
    assert_eq!(d0["booted"], true, "{now} is booted: {st:#}");
    let bad = st["health"]["badCommits"]
        .as_array()
        .unwrap_or_else(|| panic!("no health state: {st:#}"));
    let v3_bad = bad
        .iter()
        .find(|b| b["checksum"] == v3.as_str())
        .unwrap_or_else(|| panic!("v3 not recorded as bad: {st:#}"));
    assert!(
        v3_bad["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("did not boot to a healthy user space in 3 attempts"),
        "{v3_bad:#}"
    );
    assert_eq!(st["bootCounter"]["state"], "off", "{st:#}");
    assert_eq!(st["bootCounter"]["bootCounter"], Value::Null, "{st:#}");
    let text = must(vm.ok("host status"));
    assert!(
        text.contains("did not boot to a healthy user space"),
        "{text}"
    );
    // The next boot stays on `now`: its deployment is GRUB's default entry and
    // nothing is armed. (Booting once more would prove only what the boots
    // above already did: GRUB boots entry 0.) The deployment comes from
    // `host status`, not /proc/cmdline: the fallback rewrote the boot
    // entries, so this boot's `ostree=` path may name another one by now.
    let fallback_dir = format!("/ostree/deploy/cairn/deploy/{}.{}", now, d0["serial"]);
    let cfg = must(vm.ok("cat /boot/grub/grub.cfg"));
    let default_linux = cfg
        .lines()
        .find(|l| l.trim_start().starts_with("linux "))
        .unwrap_or_else(|| panic!("no linux line in grub.cfg:\n{cfg}"));
    let default_target = default_linux
        .split_whitespace()
        .find_map(|a| a.strip_prefix("ostree="))
        .unwrap_or_else(|| panic!("no ostree= in the default entry: {default_linux}"));
    let target = must(vm.ok(&format!("readlink -f /sysroot{default_target}")));
    assert_eq!(
        target.trim(),
        format!("/sysroot{fallback_dir}"),
        "GRUB's default entry is not the deployment of {now}:\n{cfg}"
    );
    let env = grubenv(&mut vm);
    assert!(!env.contains("boot_counter="), "armed again:\n{env}");

    let runs = vm.serial_logs().len();
    drop(vm);
    eprintln!(
        "lifecycle: figures: v1 boot {:.1} s; 3 failed boots of v3 + fallback {:.1} s; total {:.0} s",
        boot_time.as_secs_f64(),
        fallback_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        runs, 1,
        "one QEMU run: the fallback happened without anyone"
    );

    // The image under test was only ever read.
    let image_after = std::fs::metadata(&image.image).expect("image");
    assert_eq!(image_before.len(), image_after.len());
    assert_eq!(image_before.modified().ok(), image_after.modified().ok());
    drop(server);
    let _ = std::fs::remove_file(&http_log);
}
