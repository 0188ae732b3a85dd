//! `host agent --once` on real sysroots (privileged tier): two nodes (sysroot
//! directories deployed with the stock ostree CLI from a repository that
//! `host compose tree` wrote) in one FleetLock group with one slot, served
//! by `host fleet serve` on a real etcd on loopback. The first node stages
//! the update and takes the slot; the second stages it and is told to wait;
//! the slot stays taken (the first node never booted its update) until the
//! operator frees it with `host fleet release`, and then the second node
//! gets it. The QEMU fleet test (qemu-tests/tests/fleet.rs) covers the
//! reboots and the health checks.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_test_support::{compose_tree_args, free_port, line_value, ostree_cli, Etcd};
use common::{host, require_root, text};
use serde_json::Value;

const REF: &str = "test/x86_64/agent";

/// Kills its processes and removes the work directory (deployments carry
/// libostree's immutable bit) even when the test fails.
struct Work {
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for Work {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("chattr")
            .arg("-R")
            .arg("-i")
            .arg(self.dir.path())
            .stderr(Stdio::null())
            .status();
    }
}

fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{what} exited before listening"
        );
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("starting a command");
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn compose(w: &Path, release: &str) -> String {
    std::fs::write(w.join("files/release"), release).unwrap();
    let out =
        run(host()
            .current_dir(w)
            .args(compose_tree_args("repo", "cache", "m.toml", &["--quiet"])));
    line_value(&out, "commit").unwrap_or_else(|| {
        ostree_cli(&w.join("repo"), &["rev-parse", REF])
            .trim()
            .to_string()
    })
}

fn node_config(w: &Path, id: &str, port: u16) -> PathBuf {
    let root = w.join(format!("config-{id}"));
    std::fs::create_dir_all(root.join("etc/cairn")).unwrap();
    std::fs::write(
        root.join("etc/cairn/agent.toml"),
        format!(
            "policy = \"apply\"\ninterval = \"1m\"\njitter = \"0s\"\n\
             [reboot]\nstrategy = \"fleet-lock\"\n\
             [fleet-lock]\nbase-url = \"http://127.0.0.1:{port}\"\ngroup = \"blue\"\nid = \"{id}\"\n"
        ),
    )
    .unwrap();
    root
}

fn agent_once(w: &Path, id: &str, port: u16) -> Value {
    let config = node_config(w, id, port);
    let state = w.join(format!("agent-{id}.json"));
    run(host()
        .args(["agent", "--once", "--sysroot"])
        .arg(w.join(id))
        .arg("--config-root")
        .arg(&config)
        .arg("--state-file")
        .arg(&state)
        .arg("--health-state")
        .arg(w.join(format!("health-{id}.json"))));
    serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap()
}

fn holders(etcd: &str) -> Vec<String> {
    let out = run(host().args(["fleet", "status", "--json", "--etcd", etcd]));
    let v: Value = serde_json::from_str(&out).unwrap();
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["group"] == "blue")
        .flat_map(|g| g["holders"].as_array().unwrap().clone())
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn agent_once_stages_on_a_sysroot_and_waits_for_the_fleet_lock() {
    require_root("it deploys into sysroot directories");
    let mut work = Work {
        dir: tempfile::tempdir_in("/var/tmp").unwrap(),
        children: Vec::new(),
    };
    let w = work.dir.path().to_owned();

    // A small bootable-looking tree, v1 and v2 differing in one file.
    let base = w.join("base");
    std::fs::create_dir_all(base.join("usr/lib/modules/6.1.0-agent")).unwrap();
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::create_dir_all(w.join("files")).unwrap();
    std::fs::write(
        base.join("usr/lib/modules/6.1.0-agent/vmlinuz"),
        vec![1u8; 4096],
    )
    .unwrap();
    std::fs::write(
        base.join("usr/lib/modules/6.1.0-agent/initramfs.img"),
        vec![2u8; 4096],
    )
    .unwrap();
    std::fs::write(base.join("etc/os-release"), "ID=cairn-agent-test\n").unwrap();
    std::fs::write(
        w.join("m.toml"),
        format!(
            "ref = \"{REF}\"\nversion-prefix = \"1\"\nrootfs = \"base\"\n\
             [[files]]\nsrc = \"files/release\"\ndst = \"/usr/lib/release\"\n"
        ),
    )
    .unwrap();
    let v1 = compose(&w, "v1\n");

    // Two nodes on v1, set up with the stock tools.
    let url = format!("file://{}", w.join("repo").display());
    for id in ["node-a", "node-b", "node-c"] {
        let s = w.join(id);
        let sr = format!("--sysroot={}", s.display());
        std::fs::create_dir_all(&s).unwrap();
        run(Command::new("ostree").args(["admin", "init-fs"]).arg(&s));
        run(Command::new("ostree").args(["admin", "os-init", "cairn", &sr]));
        let repo = format!("--repo={}/ostree/repo", s.display());
        run(Command::new("ostree").args([
            &repo,
            "remote",
            "add",
            "--no-gpg-verify",
            "cairn",
            &url,
            REF,
        ]));
        run(Command::new("ostree").args([&repo, "pull", "cairn", REF]));
        run(Command::new("ostree").args([
            "admin",
            "deploy",
            &sr,
            "--os=cairn",
            &format!("cairn:{REF}"),
        ]));
    }
    let v2 = compose(&w, "v2\n");
    assert_ne!(v1, v2);

    // etcd and one FleetLock server on loopback, one slot in group blue.
    let etcd = Etcd::start();
    let etcd_url = etcd.url().to_string();
    let port = free_port();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut server = host()
            .args(["fleet", "serve", "--etcd", &etcd_url, "--slots", "1"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        if server.try_wait().unwrap().is_none() {
            wait_listening(port, &mut server, "host fleet serve");
            work.children.push(server);
            break;
        }
        assert!(Instant::now() < deadline, "host fleet serve never started");
    }

    // Node A stages v2 and takes the slot ("would reboot": not the running system).
    let a = agent_once(&w, "node-a", port);
    assert_eq!(a["state"], "rebooting", "{a:#}");
    assert_eq!(a["checksum"], v2.as_str(), "{a:#}");
    assert_eq!(a["holds_fleet_lock"], true, "{a:#}");
    assert_eq!(a["lock_for"], v2.as_str(), "{a:#}");
    let st: Value = serde_json::from_str(&run(host()
        .args(["status", "--json", "--sysroot"])
        .arg(w.join("node-a"))))
    .unwrap();
    assert_eq!(
        st["deployments"][0]["checksum"],
        v2.as_str(),
        "v2 deployed first: {st:#}"
    );
    assert_eq!(holders(&etcd_url), vec!["node-a"]);

    // Node B stages v2 too, and waits for the slot.
    let b = agent_once(&w, "node-b", port);
    assert_eq!(b["state"], "waiting-for-lock", "{b:#}");
    assert_eq!(b["checksum"], v2.as_str(), "{b:#}");
    assert_eq!(b["holds_fleet_lock"], false, "{b:#}");
    assert!(
        b["last_result"]
            .as_str()
            .unwrap()
            .contains("waiting for a reboot slot"),
        "{b:#}"
    );

    // Node A runs again: v2 is not what runs there, so the slot stays taken.
    let a = agent_once(&w, "node-a", port);
    assert_eq!(a["holds_fleet_lock"], true, "{a:#}");
    assert_eq!(holders(&etcd_url), vec!["node-a"]);
    let b = agent_once(&w, "node-b", port);
    assert_eq!(b["state"], "waiting-for-lock", "{b:#}");

    // The operator frees it; node B gets it on its next round.
    let out = run(host().args([
        "fleet", "release", "--etcd", &etcd_url, "--group", "blue", "node-a",
    ]));
    assert!(out.contains("released node-a"), "{out}");
    let b = agent_once(&w, "node-b", port);
    assert_eq!(b["state"], "rebooting", "{b:#}");
    assert_eq!(b["lock_for"], v2.as_str(), "{b:#}");
    assert_eq!(holders(&etcd_url), vec!["node-b"]);

    // Node C's own health state says v2 failed its checks there: its agent
    // never stages v2 and asks for no slot.
    std::fs::write(
        w.join("health-node-c.json"),
        serde_json::json!({
            "last_checked": null, "last_result": null, "last_healthy": null,
            "checked_at": null,
            "bad_commits": [{"checksum": v2, "reason": "test: required check failed",
                             "at": "2026-11-24T00:00:00Z"}]
        })
        .to_string(),
    )
    .unwrap();
    let c = agent_once(&w, "node-c", port);
    assert_eq!(c["holds_fleet_lock"], false, "{c:#}");
    assert_ne!(c["state"], "rebooting", "{c:#}");
    assert_ne!(c["state"], "waiting-for-lock", "{c:#}");
    let st: Value = serde_json::from_str(&run(host()
        .args(["status", "--json", "--sysroot"])
        .arg(w.join("node-c"))))
    .unwrap();
    assert_eq!(st["deployments"].as_array().unwrap().len(), 1, "{st:#}");
    assert_eq!(st["deployments"][0]["checksum"], v1.as_str(), "{st:#}");
    assert_eq!(holders(&etcd_url), vec!["node-b"]);
}
