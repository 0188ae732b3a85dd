//! Boot the composed container host under QEMU and check what a node must be.
//! Run with `cargo test -p qemu-tests -- --test-threads=1` as root.

use std::path::Path;

use qemu_tests::fixture::{ostree_cli, TEST_KARG};
use qemu_tests::{boot_test_image, test_image, Vm};

/// Unwrap with the whole error chain in the panic message.
fn must<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// Boot the test image in a fresh overlay and wait until systemd says the
/// boot is finished; fails if it ends degraded.
fn boot(name: &str) -> Vm {
    let mut vm = must(boot_test_image(name));
    assert_boot_finished(&mut vm);
    vm
}

fn assert_boot_finished(vm: &mut Vm) {
    let state = must(vm.wait_booted());
    eprintln!(
        "boot finished ({state}) {:.1} s after QEMU started",
        vm.since_power_on().as_secs_f64()
    );
    if state != "running" {
        let failed = must(vm.run(
            "systemctl --failed --no-legend; \
             for u in $(systemctl --failed --no-legend --plain | awk '{print $1}'); do \
             systemctl status --no-pager -l \"$u\" | tail -20; done; \
             journalctl -b -p err --no-pager | tail -50",
        ));
        panic!("boot ended {state:?}, not running:\n{}", failed.stdout);
    }
}

#[test]
fn boots_the_composed_tree_to_multi_user() {
    let image = test_image();
    let mut vm = boot("multi-user");

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

    // The booted deployment is the composed commit, with the origin and remote
    // that `host upgrade` follows.
    let deployment = must(vm.ok(
        r#"set -e; arg=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^ostree=//p'); readlink -f "/sysroot$arg""#,
    ));
    let name = Path::new(deployment.trim())
        .file_name()
        .expect("deployment directory")
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        name.split('.').next(),
        Some(image.commit.as_str()),
        "booted deployment {deployment}"
    );
    assert!(
        deployment.contains("/ostree/deploy/cairn/deploy/"),
        "stateroot cairn: {deployment}"
    );
    let origin = must(vm.ok(&format!("cat {}.origin", deployment.trim())));
    assert!(
        origin.contains(&format!("refspec=cairn:{}", image.ref_)),
        "origin:\n{origin}"
    );
    let repo_config = must(vm.ok("cat /ostree/repo/config"));
    assert!(repo_config.contains("[remote \"cairn\"]"), "{repo_config}");
    assert!(repo_config.contains("bootloader=grub2"), "{repo_config}");

    // `host status --json` (updater) names the booted deployment and its version.
    let status = must(vm.ok("host status --json"));
    let status: serde_json::Value = serde_json::from_str(&status)
        .unwrap_or_else(|e| panic!("host status --json is not JSON ({e}):\n{status}"));
    let booted: Vec<_> = status["deployments"]
        .as_array()
        .expect("deployments array")
        .iter()
        .filter(|d| d["booted"] == true)
        .collect();
    assert_eq!(booted.len(), 1, "one booted deployment: {status:#}");
    assert_eq!(booted[0]["checksum"], image.commit.as_str(), "{status:#}");
    assert_eq!(booted[0]["stateroot"], "cairn", "{status:#}");
    let version = image
        .version
        .as_deref()
        .expect("the composed commit has a version");
    assert_eq!(booted[0]["version"], version, "{status:#}");

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
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        conn.write_all(format!("HTTP/1.0 200 OK\r\n\r\n{reply}\n").as_bytes())
            .expect("reply");
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
}

#[test]
fn var_and_etc_survive_reboot_and_power_cut() {
    let image = test_image();
    let before = std::fs::metadata(&image.image).expect("image");
    let mut vm = boot("persistence");
    let first_boot = vm.boot_id().expect("boot id").to_string();

    must(vm.ok(
        "mkdir -p /var/lib/cairn-test && echo reboot > /var/lib/cairn-test/marker \
         && echo etc-edit > /etc/cairn-test && sync",
    ));
    let second_boot = must(vm.reboot());
    assert_ne!(first_boot, second_boot);
    assert_boot_finished(&mut vm);
    assert_eq!(must(vm.ok("cat /var/lib/cairn-test/marker")), "reboot\n");
    assert_eq!(must(vm.ok("cat /etc/cairn-test")), "etc-edit\n");

    // A power cut after sync loses nothing and the node comes back.
    must(vm.ok("echo power-cut > /var/lib/cairn-test/marker2 && sync"));
    let third_boot = must(vm.power_cut_and_restart());
    assert_ne!(second_boot, third_boot);
    assert_boot_finished(&mut vm);
    assert_eq!(must(vm.ok("cat /var/lib/cairn-test/marker")), "reboot\n");
    assert_eq!(
        must(vm.ok("cat /var/lib/cairn-test/marker2")),
        "power-cut\n"
    );
    let deployments = must(vm.ok("ls /ostree/deploy/cairn/deploy | grep -v origin"));
    assert_eq!(
        deployments.trim(),
        format!("{}.0", image.commit),
        "still the one deployment"
    );
    assert_eq!(vm.serial_logs().len(), 2, "one serial log per QEMU run");
    drop(vm);

    // The image under test was only ever read.
    let after = std::fs::metadata(&image.image).expect("image");
    assert_eq!(before.len(), after.len());
    assert_eq!(before.modified().ok(), after.modified().ok());
    // Cross-check with the stock CLI that the repository still has the commit
    // (its ref may have moved on: other test processes compose into it too).
    assert_eq!(
        must(ostree_cli(&image.repo, &["rev-parse", &image.commit])),
        image.commit
    );
}

/// The kernel command line of the running guest, one argument per item.
fn cmdline(vm: &mut Vm) -> Vec<String> {
    must(vm.ok("cat /proc/cmdline"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Serial of the booted deployment (the N of `<checksum>.N`).
fn booted_serial(vm: &mut Vm) -> String {
    let path = must(vm.ok(
        r#"set -e; arg=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^ostree=//p'); readlink -f "/sysroot$arg""#,
    ));
    path.trim()
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_bootloader_follows_libostree_deployments() {
    let image = test_image();
    let mut vm = boot("bootloader");

    // The image's kernel arguments: the tree's, then --karg, then root.
    let args = cmdline(&mut vm);
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
    assert_eq!(booted_serial(&mut vm), "0");

    // A new deployment written by libostree (stock CLI: no code of ours)
    // boots next, with its own kernel arguments.
    must(vm.ok(&format!(
        "ostree admin deploy --os=cairn --karg-append=cairn.second=1 cairn:{}",
        image.ref_
    )));
    must(vm.reboot());
    assert_boot_finished(&mut vm);
    let args = cmdline(&mut vm);
    assert!(args.iter().any(|a| a == "cairn.second=1"), "{args:?}");
    assert!(
        args.iter().any(|a| a == TEST_KARG),
        "carried over: {args:?}"
    );
    assert_eq!(booted_serial(&mut vm), "1");

    // And `host rollback` switches back to the first one.
    must(vm.ok("host rollback"));
    must(vm.reboot());
    assert_boot_finished(&mut vm);
    let args = cmdline(&mut vm);
    assert!(!args.iter().any(|a| a == "cairn.second=1"), "{args:?}");
    assert_eq!(booted_serial(&mut vm), "0");
}
