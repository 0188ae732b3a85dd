//! `host compose image` on its failure paths: whatever goes wrong, no output
//! file, no temporary file and no loop device are left behind; and the trust
//! it writes into a node, and the node config it embeds. (Booting its output
//! is proven in tests/lifecycle.rs; applying a config in tests/provision.rs.)

use std::path::Path;
use std::process::Command;

use qemu_tests::fixture::{build_dir, host_binary};

fn require_root() {
    cairn_test_support::require_root("loop devices, mounts");
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One image writer at a time in this file: a test looks for any mount or
/// loop device the writer leaves, and must not see the other test's.
static ONE_WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Root, the `host` under test and an empty work directory `sub` of build/;
/// hold the guard for the whole test.
fn setup(
    sub: &str,
) -> (
    std::sync::MutexGuard<'static, ()>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let guard = ONE_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let host = host_binary().unwrap_or_else(|e| panic!("{e:#}"));
    let work = build_dir(sub);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    (guard, host, work)
}

/// Loop devices whose backing file lies in `dir`.
fn loops_backed_by(dir: &Path) -> Vec<String> {
    let out =
        sh(Command::new("losetup").args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"]));
    out.lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_tree_that_cannot_deploy_leaves_nothing_behind() {
    let (_one_writer, host, work) = setup("qemu-tests/image-writer");

    // A commit without a kernel: everything up to the deployment works (GPT,
    // GRUB, loop devices, file systems, mounts), then libostree refuses.
    let repo = work.join("repo");
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::write(tree.join("usr/bin/hello"), "#!/bin/sh\necho hello\n").unwrap();
    sh(Command::new("ostree")
        .args(["init", "--mode=archive"])
        .arg(format!("--repo={}", repo.display())));
    sh(Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args(["commit", "--branch=test/nokernel"])
        .arg(&tree));

    let out_dir = work.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    for format in ["raw", "qcow2"] {
        let output = out_dir.join(format!("disk.{format}"));
        let res = Command::new(&host)
            .args([
                "compose",
                "image",
                "--quiet",
                // Lab image: the failure under test comes later.
                "--insecure-no-verify",
                "--ref",
                "test/nokernel",
                "--size",
                "2G",
            ])
            .arg("--repo")
            .arg(&repo)
            .args(["--format", format])
            .arg("-o")
            .arg(&output)
            .output()
            .expect("run host");
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(
            !res.status.success(),
            "deploying a tree without a kernel succeeded"
        );
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("error: ")).count(),
            1,
            "one error line: {stderr}"
        );
        assert!(
            stderr.contains("deploying commit"),
            "names the failed step: {stderr}"
        );
        assert!(!output.exists(), "{} was left behind", output.display());
        let left: Vec<_> = std::fs::read_dir(&out_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "temporary files left behind: {left:?}");
        assert_eq!(
            loops_backed_by(&out_dir),
            Vec::<String>::new(),
            "loop devices left attached"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.lines().any(|l| l.contains("/cairn-image-")),
            "a mount of the image writer is left:\n{mounts}"
        );
    }

    // And a ref that does not exist fails before touching anything.
    let res = Command::new(&host)
        .args([
            "compose",
            "image",
            "--quiet",
            "--insecure-no-verify",
            "--ref",
            "no/such/ref",
        ])
        .arg("--repo")
        .arg(&repo)
        .arg("-o")
        .arg(out_dir.join("x.qcow2"))
        .output()
        .expect("run host");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(stderr.contains("no/such/ref"), "{stderr}");
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);

    // So does a --commit that is not a full checksum.
    let res = Command::new(&host)
        .args([
            "compose",
            "image",
            "--quiet",
            "--insecure-no-verify",
            "--ref",
            "test/nokernel",
        ])
        .args(["--commit", "abc123"])
        .arg("--repo")
        .arg(&repo)
        .arg("-o")
        .arg(out_dir.join("x.qcow2"))
        .output()
        .expect("run host");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(stderr.contains("64-digit commit checksum"), "{stderr}");
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&work);
}

/// `host compose keygen DIR`; returns the fingerprint.
fn keygen(host: &Path, dir: &Path) -> String {
    let out = sh(Command::new(host).args(["compose", "keygen"]).arg(dir));
    out.lines()
        .find_map(|l| l.strip_prefix("fingerprint "))
        .expect("keygen prints the fingerprint")
        .to_string()
}

/// The byte offset and size of partition `name` of a GPT disk image.
fn partition(image: &Path, name: &str) -> (u64, u64) {
    let dump = sh(Command::new("sfdisk").arg("--dump").arg(image));
    let line = dump
        .lines()
        .find(|l| l.contains(&format!("name=\"{name}\"")))
        .unwrap_or_else(|| panic!("no partition {name}:\n{dump}"));
    let field = |key: &str| -> u64 {
        line.split(',')
            .find_map(|f| {
                f.trim()
                    .split_once('=')
                    .filter(|(k, _)| k.trim().ends_with(key))
            })
            .map(|(_, v)| v.trim().parse().unwrap())
            .unwrap()
    };
    (field("start") * 512, field("size") * 512)
}

/// A loop device over part of a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(image: &Path, (offset, size): (u64, u64)) -> Loop {
        let dev = sh(Command::new("losetup")
            .args(["--find", "--show"])
            .args([
                "--offset",
                &offset.to_string(),
                "--sizelimit",
                &size.to_string(),
            ])
            .arg(image));
        Loop(dev.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Unmounted on drop.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn an_image_trusts_only_its_keys_and_its_node_verifies_updates() {
    let (_one_writer, host, work) = setup("qemu-tests/image-writer-trust");

    // A tree libostree deploys (a kernel and an initramfs where it looks for
    // them; they never boot here), committed unsigned and then signed.
    let repo = work.join("repo");
    let tree = work.join("tree");
    let modules = tree.join("usr/lib/modules/6.1.0-cairn-test");
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::write(modules.join("vmlinuz"), "not a kernel\n").unwrap();
    std::fs::write(modules.join("initramfs.img"), "not an initramfs\n").unwrap();
    std::fs::create_dir_all(tree.join("usr/etc")).unwrap();
    std::fs::write(tree.join("usr/etc/hostname"), "trust-test\n").unwrap();
    std::fs::write(
        tree.join("usr/etc/os-release"),
        "ID=cairn\nNAME=cairn\nVERSION_ID=test\n",
    )
    .unwrap();
    let ostree = |args: &[&str]| {
        sh(Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(args))
    };
    sh(Command::new("ostree")
        .args(["init", "--mode=archive"])
        .arg(format!("--repo={}", repo.display())));
    ostree(&["commit", "--branch=test/unsigned", tree.to_str().unwrap()]);
    let signed = ostree(&[
        "commit",
        "--branch=test/signed",
        "--subject=signed",
        tree.to_str().unwrap(),
    ]);
    let keys = work.join("keys");
    let fpr = keygen(&host, &keys);
    ostree(&[
        "gpg-sign",
        &format!("--gpg-homedir={}", keys.display()),
        signed.trim(),
        &fpr,
    ]);
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(&keys)
        .args(["--kill", "all"])
        .status();
    let other = work.join("other-keys");
    keygen(&host, &other);

    let out_dir = work.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let node_config = work.join("node.toml");
    std::fs::write(&node_config, "version = 1\nhostname = \"embedded-1\"\n").unwrap();
    let bad_config = work.join("bad.toml");
    std::fs::write(
        &bad_config,
        "version = 1\nhostname = \"embedded-1\"\nhostnme = \"x\"\n",
    )
    .unwrap();
    let write_with = |ref_: &str, key: &Path, output: &Path, config: &Path| {
        Command::new(&host)
            .args([
                "compose", "image", "--quiet", "--format", "raw", "--size", "2G",
            ])
            .arg("--config")
            .arg(config)
            .arg("--repo")
            .arg(&repo)
            .args(["--ref", ref_])
            .arg("--trust")
            .arg(key)
            .arg("-o")
            .arg(output)
            .output()
            .expect("run host")
    };
    let write = |ref_: &str, key: &Path, output: &Path| write_with(ref_, key, output, &node_config);

    // Refused: a commit without a signature, and one signed by a key the
    // image is not told to trust. Nothing is left behind.
    for (ref_, key) in [
        ("test/unsigned", keys.join("cairn-release.asc")),
        ("test/signed", other.join("cairn-release.asc")),
    ] {
        let res = write(ref_, &key, &out_dir.join("refused.raw"));
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(
            !res.status.success(),
            "{ref_} trusted with {}",
            key.display()
        );
        assert!(
            stderr.contains("is not signed by a key given with --trust"),
            "{stderr}"
        );
        assert_eq!(
            std::fs::read_dir(&out_dir).unwrap().count(),
            0,
            "output or temporary files left behind"
        );
        assert_eq!(loops_backed_by(&out_dir), Vec::<String>::new());
    }

    // Refused: a node config that would fail on the node, before any disk is made.
    let res = write_with(
        "test/signed",
        &keys.join("cairn-release.asc"),
        &out_dir.join("refused.raw"),
        &bad_config,
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && stderr.contains("line 3"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);

    // Written: the signed commit, trusted with its key, with its node config.
    let image = out_dir.join("signed.raw");
    let res = write("test/signed", &keys.join("cairn-release.asc"), &image);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let root = Loop::attach(&image, partition(&image, "root"));
    let boot = Loop::attach(&image, partition(&image, "boot"));
    sh(Command::new("mount").arg(&root.0).arg(&mnt));
    let _root_mount = Mounted(mnt.clone());
    sh(Command::new("mount").arg(&boot.0).arg(mnt.join("boot")));
    let _boot_mount = Mounted(mnt.join("boot"));
    let config = std::fs::read_to_string(mnt.join("ostree/repo/config")).unwrap();
    assert!(config.contains("gpg-verify=true"), "{config}");
    assert!(config.contains("gpg-verify-summary=true"), "{config}");
    assert!(
        mnt.join("ostree/repo/cairn.trustedkeys.gpg").is_file(),
        "the key is in the remote's keyring"
    );
    let status = Command::new(&host)
        .args(["status", "--json", "--sysroot"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(status.status.success());
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["verified"], true, "{json:#}");
    assert_eq!(
        json["deployments"][0]["checksum"],
        signed.trim(),
        "{json:#}"
    );
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(!stderr.contains("WITHOUT verifying"), "{stderr}");
    // The node config, in the node's /var, for root only.
    let embedded = mnt.join("ostree/deploy/cairn/var/lib/cairn/provision/embedded.toml");
    assert_eq!(
        std::fs::read(&embedded).unwrap(),
        std::fs::read(&node_config).unwrap()
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&embedded).unwrap().mode() & 0o7777, 0o600);
    drop(_boot_mount);
    drop(_root_mount);
    drop(boot);
    drop(root);
    let _ = std::fs::remove_dir_all(&work);
}
