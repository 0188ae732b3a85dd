//! `host provision`: `validate` (no root) and `apply --root` on a small
//! root directory (privileged tier: it chowns). The QEMU lifecycle test
//! boots an image with a config in fw_cfg.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{host, require_root, text};

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/provisioning-example.toml"
);
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f t@x";

fn validate(text_: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, text_).unwrap();
    let out = host()
        .args(["provision", "validate"])
        .arg(&file)
        .output()
        .unwrap();
    (out.status.success(), text(&out))
}

#[test]
fn validate_takes_the_documented_example() {
    let out = host()
        .args(["provision", "validate", EXAMPLE])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(": valid\n"), "{t}");
    assert!(t.contains("  account alice\n"), "{t}");
    assert!(
        t.contains("  write /etc/systemd/network/05-cairn-provision-0.network\n"),
        "{t}"
    );
    assert!(t.contains("  start cairn-app-web.service\n"), "{t}");
    assert!(t.contains("  kernel arguments mitigations=auto"), "{t}");
}

#[test]
fn validate_refuses_what_the_node_would_refuse() {
    // An app option `host app run` itself refuses.
    let (ok, t) =
        validate("version = 1\n[[apps]]\nname = \"web\"\nimage = \"web:1\"\nmemory = \"lots\"\n");
    assert!(
        !ok && t.contains("apps[0] (web)") && t.contains("lots"),
        "{t}"
    );
    let (ok, t) = validate("version = 1\n[[apps]]\nname = \"-web\"\nimage = \"web:1\"\n");
    assert!(!ok && t.contains("apps[0]"), "{t}");
    // Unknown keys, with their line.
    let (ok, t) = validate("version = 1\nhostname = \"a\"\nhost-name = \"b\"\n");
    assert!(
        !ok && t.contains("line 3") && t.contains("host-name"),
        "{t}"
    );
    // Not TOML at all, and too big.
    let (ok, t) = validate("\u{0}\u{1}");
    assert!(!ok && t.contains("node config"), "{t}");
    let (ok, t) = validate(&format!("version = 1\n#{}\n", "x".repeat(5 << 20)));
    assert!(!ok && t.contains("is over"), "{t}");
}

/// A root with the account files of a Debian tree, trimmed.
fn small_root(dir: &Path) {
    for d in ["etc", "var/roothome", "var/lib"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let files = [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n", 0o644),
        ("etc/shadow", "root:!*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n", 0o640),
        ("etc/group", "root:x:0:\nsudo:x:27:\nnogroup:x:65534:\n", 0o644),
        ("etc/gshadow", "root:*::\nsudo:*::\nnogroup:*::\n", 0o640),
    ];
    for (path, content, mode) in files {
        let p = dir.join(path);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

fn apply(root: &Path, config: &str) -> (bool, String) {
    let file = root.parent().unwrap().join("config.toml");
    std::fs::write(&file, config).unwrap();
    let out = host()
        .args(["provision", "apply", "--root"])
        .arg(root)
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    (out.status.success(), text(&out))
}

fn state(root: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(root.join("var/lib/cairn/provision/state.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn apply_writes_inside_the_root_once() {
    require_root("provision apply chowns what it writes");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    small_root(&root);
    let config = format!(
        "version = 1\nhostname = \"node-7\"\n\
         [[users]]\nname = \"root\"\nssh-authorized-keys = [\"{KEY}\"]\n\
         [[users]]\nname = \"alice\"\ngroups = [\"sudo\"]\nssh-authorized-keys = [\"{KEY}\"]\n\
         password-hash = \"$y$j9T$abc$def\"\n\
         [[files]]\npath = \"/var/lib/app/token\"\nmode = \"0640\"\nowner = \"alice\"\ncontent = \"t\\n\"\n\
         [[health]]\nname = \"ok\"\nkind = \"wanted\"\nscript = \"#!/bin/sh\\ntrue\\n\"\n\
         [[apps]]\nname = \"web\"\nimage = \"web:1\"\n"
    );
    let (ok, t) = apply(&root, &config);
    assert!(ok, "{t}");
    assert!(t.contains("Provisioning: applied"), "{t}");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    assert_eq!(read("etc/hostname"), "node-7\n");
    assert!(read("etc/passwd").contains("\nalice:x:1000:1000::/home/alice:/bin/bash\n"));
    assert!(read("etc/group").contains("\nsudo:x:27:alice\n"));
    assert!(read("etc/group").contains("\nalice:x:1000:\n"));
    assert!(read("etc/gshadow").contains("\nsudo:*::alice\n"));
    assert!(read("etc/shadow").contains("\nalice:$y$j9T$abc$def:"));
    // The account files keep their modes.
    let mode = |p: &str| std::fs::metadata(root.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("etc/shadow"), 0o640);
    assert_eq!(mode("etc/passwd"), 0o644);
    let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
    assert_eq!(
        (meta("var/home/alice").uid(), mode("var/home/alice")),
        (1000, 0o700)
    );
    assert_eq!(
        (
            meta("var/home/alice/.ssh/authorized_keys").uid(),
            mode("var/home/alice/.ssh/authorized_keys")
        ),
        (1000, 0o600)
    );
    assert!(read("var/roothome/.ssh/authorized_keys").contains(KEY));
    assert_eq!(
        (
            meta("var/lib/app/token").uid(),
            meta("var/lib/app/token").gid()
        ),
        (1000, 1000)
    );
    assert_eq!(mode("var/lib/app/token"), 0o640);
    assert_eq!(mode("etc/cairn/health.d/wanted/ok"), 0o755);
    assert_eq!(
        std::fs::read_link(
            root.join("etc/systemd/system/multi-user.target.wants/cairn-app-web.service")
        )
        .unwrap(),
        Path::new("../cairn-app-web.service")
    );
    let s = state(&root);
    assert_eq!(s["result"], "applied");
    assert_eq!(s["accounts"], serde_json::json!(["root", "alice"]));
    assert_eq!(s["configSha256"].as_str().unwrap().len(), 64);

    let out = host()
        .args(["provision", "show", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("\nProvisioning: applied at "), "{shown}");
    assert!(shown.contains("  accounts: root, alice\n"), "{shown}");
    assert!(
        shown.contains("    /var/home/alice/.ssh/authorized_keys\n"),
        "{shown}"
    );
    assert!(shown.contains("  apps: cairn-app-web.service\n"), "{shown}");

    // The stamp: a second run changes nothing, whatever the config says.
    let (ok, t) = apply(&root, "version = 1\nhostname = \"other\"\n");
    assert!(ok && t.contains("already provisioned"), "{t}");
    assert_eq!(read("etc/hostname"), "node-7\n");
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn a_bad_config_or_a_symlink_out_fails_with_nothing_written() {
    require_root("provision apply chowns what it writes");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    small_root(&root);
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("etc/cairn")).unwrap();
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();

    let (ok, t) = apply(
        &root,
        "version = 1\nhostname = \"n\"\n[[users]]\nname = \"bob\"\n\
         [[health]]\nname = \"x\"\nkind = \"required\"\nscript = \"#!/bin/sh\\n\"\n",
    );
    assert!(!ok, "{t}");
    assert!(
        t.contains("cairn is not a directory") && t.contains("symlink"),
        "{t}"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(
        !root.join("etc/hostname").exists(),
        "nothing is written before the check"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/passwd")).unwrap(),
        passwd
    );
    assert_eq!(state(&root)["result"], "failed");

    // A config that does not parse is recorded too, with its source and why.
    let (ok, t) = apply(&root, "version = 1\nhostname = \"-n\"\n");
    assert!(!ok && t.contains("hostname"), "{t}");
    let s = state(&root);
    assert_eq!(s["result"], "failed");
    assert!(s["source"].as_str().unwrap().ends_with("config.toml"));
    assert!(s["error"].as_str().unwrap().contains("is not a hostname"));

    // A time zone the tree has no data for.
    let (ok, t) = apply(&root, "version = 1\ntimezone = \"Mars/Olympus_Mons\"\n");
    assert!(
        !ok && t.contains("not in this tree's time zone database"),
        "{t}"
    );
    assert!(!root.join("etc/localtime").exists());

    // A failure is tried again: a good config then applies.
    std::fs::remove_file(root.join("etc/cairn")).unwrap();
    let zone = root.join("usr/share/zoneinfo/Etc");
    std::fs::create_dir_all(&zone).unwrap();
    std::fs::write(zone.join("UTC"), "TZif").unwrap();
    std::os::unix::fs::symlink("Etc/UTC", root.join("usr/share/zoneinfo/UTC")).unwrap();
    let (ok, t) = apply(&root, "version = 1\nhostname = \"n\"\ntimezone = \"UTC\"\n");
    assert!(ok, "{t}");
    assert_eq!(state(&root)["result"], "applied");
    assert_eq!(
        std::fs::read_link(root.join("etc/localtime")).unwrap(),
        Path::new("../usr/share/zoneinfo/UTC")
    );
}

/// Removes a loop device when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// Kills a child process when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn apply_found(root: &Path) -> (bool, String) {
    let out = host()
        .args(["provision", "apply", "--root"])
        .arg(root)
        .output()
        .unwrap();
    (out.status.success(), text(&out))
}

fn fresh_root(dir: &Path, name: &str) -> std::path::PathBuf {
    let root = dir.join(name);
    small_root(&root);
    root
}

/// The sources in their order, each read where a node finds it: fw_cfg's
/// file, a labelled filesystem on a loop device, a URL on the kernel command
/// line (a real HTTP server on loopback), the embedded file.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn every_source_is_found_in_its_order() {
    require_root("loop devices and mounts for the config drive");
    let dir = tempfile::tempdir().unwrap();
    let config = |h: &str| format!("version = 1\nhostname = \"{h}\"\n");
    let embed = |root: &Path, h: &str| {
        let p = root.join("var/lib/cairn/provision/embedded.toml");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, config(h)).unwrap();
    };
    let hostname = |root: &Path| std::fs::read_to_string(root.join("etc/hostname")).unwrap();

    // Nothing anywhere: recorded, and never looked for again.
    let root = fresh_root(dir.path(), "none");
    let (ok, t) = apply_found(&root);
    assert!(ok && t.contains("no node config"), "{t}");
    assert_eq!(state(&root)["result"], "no-config");
    embed(&root, "late");
    let (ok, t) = apply_found(&root);
    assert!(ok && t.contains("already provisioned"), "{t}");

    // Embedded alone.
    let root = fresh_root(dir.path(), "embedded");
    embed(&root, "from-image");
    let (ok, t) = apply_found(&root);
    assert!(ok, "{t}");
    assert_eq!(hostname(&root), "from-image\n");
    assert_eq!(
        state(&root)["source"],
        "embedded /var/lib/cairn/provision/embedded.toml"
    );

    // fw_cfg wins over the embedded config.
    let root = fresh_root(dir.path(), "fwcfg");
    embed(&root, "from-image");
    let fw = root.join("sys/firmware/qemu_fw_cfg/by_name/opt/org.cairn/config");
    std::fs::create_dir_all(&fw).unwrap();
    std::fs::write(fw.join("raw"), config("from-fw-cfg")).unwrap();
    let (ok, t) = apply_found(&root);
    assert!(ok, "{t}");
    assert_eq!(hostname(&root), "from-fw-cfg\n");
    assert_eq!(state(&root)["source"], "fw_cfg opt/org.cairn/config");

    // A config drive: ext4 labelled CAIRNCFG on a loop device.
    let root = fresh_root(dir.path(), "drive");
    embed(&root, "from-image");
    let content = dir.path().join("drive-content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("config.toml"), config("from-drive")).unwrap();
    let img = dir.path().join("drive.img");
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-L", "CAIRNCFG", "-d"])
        .arg(&content)
        .arg(&img)
        .arg("8M")
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", text(&mkfs));
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let device = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let by_label = root.join("dev/disk/by-label");
    std::fs::create_dir_all(&by_label).unwrap();
    std::os::unix::fs::symlink(&device.0, by_label.join("CAIRNCFG")).unwrap();
    let (ok, t) = apply_found(&root);
    assert!(ok, "{t}");
    assert_eq!(hostname(&root), "from-drive\n");
    assert_eq!(state(&root)["source"], format!("config drive {}", device.0));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&device.0),
        "the config drive stays mounted:\n{mounts}"
    );
    drop(device);

    // A URL on the kernel command line, from a real HTTP server.
    let served = dir.path().join("served");
    std::fs::create_dir(&served).unwrap();
    std::fs::write(served.join("node.toml"), config("from-url")).unwrap();
    std::fs::write(
        served.join("huge.toml"),
        format!("version = 1\n#{}\n", "x".repeat(5 << 20)),
    )
    .unwrap();
    let port = cairn_test_support::free_port();
    let _server = Server(
        std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
                "--directory",
            ])
            .arg(&served)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = |file: &str| format!("http://127.0.0.1:{port}/{file}");
    let with_cmdline = |name: &str, file: &str| {
        let root = fresh_root(dir.path(), name);
        embed(&root, "from-image");
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(
            root.join("proc/cmdline"),
            format!(
                "root=LABEL=root quiet cairn.config.url={} panic=10\n",
                url(file)
            ),
        )
        .unwrap();
        root
    };
    let root = with_cmdline("url", "node.toml");
    let (ok, t) = apply_found(&root);
    assert!(ok, "{t}");
    assert_eq!(hostname(&root), "from-url\n");
    assert_eq!(state(&root)["source"], url("node.toml"));
    // Missing and oversized configs fail, and the embedded one is not used instead.
    for (name, file, says) in [
        ("url-404", "gone.toml", "HTTP 404"),
        ("url-huge", "huge.toml", "over"),
    ] {
        let root = with_cmdline(name, file);
        let (ok, t) = apply_found(&root);
        assert!(!ok && t.contains(says), "{file}: {t}");
        assert_eq!(state(&root)["result"], "failed");
        assert!(!root.join("etc/hostname").exists());
    }
}
