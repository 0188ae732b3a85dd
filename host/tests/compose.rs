//! `host compose tree|diff` end to end, hermetic: the base is a small root the
//! test builds itself (busybox, a fake kernel, a fake dpkg database), the
//! repository a temp dir. Privileged tier: trees are committed as root-owned.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use cairn_test_support::compose_tree_args;
use common::{host, ostree_cli};

fn require_root() {
    common::require_root("it commits root-owned trees");
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        require_root();
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        env.make_base();
        env
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn write(&self, p: &str, text: &str) {
        let path = self.path(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A tiny Debian-like root: busybox as /bin/sh, a kernel and initramfs in
    /// /boot, /etc, /var content, a unit, and a dpkg status file.
    fn make_base(&self) {
        let r = self.path("base");
        for d in [
            "usr/bin",
            "usr/share",
            "usr/lib/systemd/system",
            "etc",
            "var/lib/demo",
            "var/log",
            "boot",
            "root",
            "tmp",
            "dev",
            "home",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let busybox =
            busybox.expect("busybox-static must be installed (scripts/setup installs it)");
        std::fs::copy(busybox, r.join("usr/bin/busybox")).unwrap();
        for applet in ["sh", "echo", "cat", "sleep", "test", "ping"] {
            std::os::unix::fs::symlink("busybox", r.join("usr/bin").join(applet)).unwrap();
        }
        self.write("base/etc/os-release", "ID=cairn-test\n");
        self.write("base/var/log/old.log", "dropped\n");
        self.write("base/root/.profile", "dropped\n");
        self.write("base/boot/vmlinuz-6.1.0-test", "not really a kernel\n");
        self.write(
            "base/boot/initrd.img-6.1.0-test",
            "not really an initramfs\n",
        );
        self.write(
            "base/usr/lib/systemd/system/demo.service",
            "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
        );
        self.write(
            "base/var/lib/dpkg/status",
            &dpkg_status(&[("busybox", "1:1.35.0-4"), ("demo", "1.0-1")]),
        );
        self.write("files/motd", "welcome to cairn\n");
        self.write("files/cairn-tool", "#!/bin/sh\necho tool\n");
    }

    fn manifest(&self, extra: &str) -> PathBuf {
        let text = format!(
            r#"ref = "test/x86_64/base"
version-prefix = "7"
rootfs = "base"
kernel-args = ["console=ttyS0", "quiet"]
remove-files = ["/usr/share/nothing-here"]

[metadata]
"cairn.test" = "yes"

[[files]]
src = "files/motd"
dst = "/etc/motd"

[[files]]
src = "files/cairn-tool"
dst = "/usr/bin/cairn-tool"
mode = "0755"

[units]
enable = ["demo.service"]

[[users]]
name = "app"
uid = 900
groups = ["wheel"]

[[groups]]
name = "wheel"
gid = 10
{extra}"#
        );
        let p = self.path("manifest.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn host(&self, args: &[&str]) -> Output {
        let out = host()
            .args(args)
            .current_dir(self.dir.path())
            .env("SOURCE_DATE_EPOCH", "1795000000")
            .env_remove("CAIRN_REPO")
            .env_remove("CAIRN_CACHE")
            .env_remove("CAIRN_GPG_KEY")
            .env_remove("CAIRN_GPG_HOMEDIR")
            // The build machine's container configuration stays out.
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"))
            .output()
            .unwrap();
        eprintln!(
            "$ host {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn compose(&self, repo: &str, extra_args: &[&str]) -> Output {
        let mut extra = vec!["--bare-user", "--quiet"];
        extra.extend_from_slice(extra_args);
        let args = compose_tree_args(repo, "cache", "manifest.toml", &extra);
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        self.host(&args)
    }

    fn ostree(&self, repo: &str, args: &[&str]) -> String {
        ostree_cli(&self.path(repo), args)
    }

    fn ref_head(&self, repo: &str) -> Option<String> {
        let p = self.path(repo).join("refs/heads/test/x86_64/base");
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    }
}

fn dpkg_status(pkgs: &[(&str, &str)]) -> String {
    pkgs.iter()
        .map(|(n, v)| {
            format!(
                "Package: {n}\nStatus: install ok installed\nArchitecture: amd64\nVersion: {v}\n\n"
            )
        })
        .collect()
}

fn field<'a>(out: &'a Output, key: &str) -> &'a str {
    let stdout = std::str::from_utf8(&out.stdout).unwrap();
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")));
    line.unwrap_or_else(|| panic!("no `{key}` line in output:\n{stdout}"))
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn compose_lays_out_an_ostree_tree_that_stock_tools_read() {
    let env = Env::new();
    env.manifest("[[postprocess]]\nname = \"stamp\"\ninline = \"echo composed > /usr/share/stamp; test -e /etc/motd\"\n");
    let out = env.compose("repo", &[]);
    assert!(out.status.success());
    let commit = field(&out, "commit").to_string();
    assert_eq!(field(&out, "version"), "7.20261118.0");
    assert_eq!(env.ref_head("repo").as_deref(), Some(commit.as_str()));

    env.ostree("repo", &["fsck"]);
    let ls = env.ostree("repo", &["ls", "-R", &commit]);
    for expected in [
        "/usr/lib/modules/6.1.0-test/vmlinuz",
        "/usr/lib/modules/6.1.0-test/initramfs.img",
        "/usr/etc/os-release",
        "/usr/etc/motd",
        "/usr/bin/cairn-tool",
        "/usr/share/stamp",
        "/usr/lib/sysimage/dpkg/status",
        "/usr/lib/cairn/kargs",
        "/usr/lib/sysusers.d/cairn.conf",
        "/usr/lib/tmpfiles.d/cairn-var.conf",
        "/usr/etc/systemd/system/multi-user.target.wants/demo.service -> /usr/lib/systemd/system/demo.service",
        "/home -> var/home",
        "/root -> var/roothome",
        "/tmp -> sysroot/tmp",
        "/ostree -> sysroot/ostree",
        "/usr/local -> ../var/usrlocal",
    ] {
        assert!(ls.lines().any(|l| l.ends_with(expected)), "ostree ls lacks {expected}:\n{ls}");
    }
    for absent in [
        " /etc",
        " /boot/",
        " /var/",
        "/var/log/old.log",
        "/.profile",
    ] {
        assert!(
            !ls.lines().any(|l| l.contains(absent)),
            "ostree ls should not have {absent}:\n{ls}"
        );
    }
    assert!(
        ls.lines()
            .any(|l| l.starts_with("-00755 0 0") && l.ends_with("/usr/bin/cairn-tool")),
        "{ls}"
    );

    let show = |key: &str| {
        env.ostree(
            "repo",
            &["show", &format!("--print-metadata-key={key}"), &commit],
        )
    };
    assert_eq!(show("version").trim(), "'7.20261118.0'");
    assert_eq!(show("ostree.bootable").trim(), "true");
    assert_eq!(show("cairn.kernel").trim(), "'6.1.0-test'");
    assert_eq!(show("cairn.kargs").trim(), "['console=ttyS0', 'quiet']");
    assert_eq!(
        show("cairn.packages").trim(),
        "['busybox=1:1.35.0-4', 'demo=1.0-1']"
    );
    assert_eq!(show("cairn.test").trim(), "'yes'");
    assert_eq!(show("cairn.inputhash").trim().len(), 66);
    let log = env.ostree("repo", &["log", "test/x86_64/base"]);
    assert!(log.contains("ContentChecksum:"), "{log}");

    let cat = |p: &str| env.ostree("repo", &["cat", &commit, p]);
    assert_eq!(cat("/usr/lib/cairn/kargs"), "console=ttyS0\nquiet\n");
    assert_eq!(cat("/usr/lib/sysusers.d/cairn.conf"), "# Generated by cairn from the compose manifest.\ng wheel 10\nu app 900 \"-\" - -\nm app wheel\n");
    let tmpfiles = cat("/usr/lib/tmpfiles.d/cairn-var.conf");
    assert!(
        tmpfiles.contains("d /var/lib/demo 0755 0 0 - -"),
        "{tmpfiles}"
    );
    assert!(
        tmpfiles.contains("d /var/roothome 0755 0 0 - -"),
        "{tmpfiles}"
    );
    assert!(
        tmpfiles.contains("L /var/lib/dpkg - - - - ../../usr/lib/sysimage/dpkg"),
        "{tmpfiles}"
    );
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn same_inputs_and_source_date_epoch_give_the_same_checksums() {
    let env = Env::new();
    env.manifest("");
    let a = env.compose("repo-a", &[]);
    let b = env.compose("repo-b", &[]);
    assert!(a.status.success() && b.status.success());
    assert_eq!(field(&a, "content-checksum"), field(&b, "content-checksum"));
    assert_eq!(field(&a, "commit"), field(&b, "commit"));
    // The stock tool computes the same content checksum.
    let log = env.ostree("repo-a", &["log", "test/x86_64/base"]);
    assert!(
        log.contains(&format!(
            "ContentChecksum:  {}",
            field(&a, "content-checksum")
        )),
        "{log}"
    );
}

/// Pins the exact content checksum of a fully synthetic tree (no binaries from
/// the build machine), as rpm-ostree does: any change to the layout code or to
/// how the tree is committed shows up here and must be deliberate.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn synthetic_tree_has_a_pinned_content_checksum() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    for d in ["usr/bin", "etc", "var/lib/x", "boot"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
        std::fs::set_permissions(base.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(base.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        base.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(base.join("etc/hostname"), "pinned\n").unwrap();
    std::fs::set_permissions(
        base.join("etc/hostname"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("m.toml"),
        "ref = \"test/pinned\"\nrootfs = \"base\"\nkernel-args = [\"quiet\"]\n",
    )
    .unwrap();
    let out = host()
        .args([
            "compose",
            "tree",
            "--bare-user",
            "--repo",
            "repo",
            "--cache",
            "cache",
            "--quiet",
            "m.toml",
        ])
        .current_dir(dir.path())
        .env("SOURCE_DATE_EPOCH", "1795000000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        field(&out, "content-checksum"),
        "f098f1d937f946658a64a81d52129f69a5ed878fb6c0a88e71374de107e95d19",
        "the synthetic tree's content checksum changed; if the layout change is deliberate, update the pin"
    );
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn unless_changed_writes_nothing_until_an_input_changes() {
    let env = Env::new();
    env.manifest("");
    let first = env.compose("repo", &["--unless-changed"]);
    assert!(first.status.success());
    let head = env.ref_head("repo").unwrap();

    let again = env.compose("repo", &["--unless-changed"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).starts_with("no changes"));
    assert_eq!(
        env.ref_head("repo").unwrap(),
        head,
        "a no-op compose must not move the ref"
    );

    env.write("files/motd", "a new welcome\n");
    let changed = env.compose("repo", &["--unless-changed"]);
    assert!(changed.status.success());
    assert_ne!(field(&changed, "commit"), head);
    assert_eq!(
        field(&changed, "version"),
        "7.20261118.1",
        "serials count up and are never reused"
    );
    let parent = env.ostree(
        "repo",
        &["rev-parse", &format!("{}^", field(&changed, "commit"))],
    );
    assert_eq!(
        parent.trim(),
        head,
        "the new commit's parent is the previous head"
    );

    let reused = env.compose("repo", &["--version", "7.20261118.0"]);
    assert!(!reused.status.success());
    assert!(String::from_utf8_lossy(&reused.stderr).contains("already exists"));
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn failing_postprocess_names_the_script_and_leaves_the_repo_as_it_was() {
    let env = Env::new();
    env.manifest("");
    assert!(env.compose("repo", &[]).status.success());
    let head = env.ref_head("repo").unwrap();
    let refs_before = env.ostree("repo", &["refs"]);

    env.manifest("[[postprocess]]\nname = \"breaks\"\ninline = \"echo about to fail; echo details >&2; exit 3\"\n");
    let out = env.compose("repo", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("postprocess script breaks failed with exit status 3"),
        "{err}"
    );
    assert!(
        err.contains("about to fail") && err.contains("details"),
        "{err}"
    );
    assert_eq!(env.ref_head("repo").unwrap(), head);
    assert_eq!(env.ostree("repo", &["refs"]), refs_before);
    env.ostree("repo", &["fsck"]);
    let leftovers: Vec<_> = std::fs::read_dir(env.path("cache/work"))
        .map(|r| r.count())
        .into_iter()
        .collect();
    assert_eq!(
        leftovers,
        vec![0],
        "the work directory is removed on failure"
    );
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn postprocess_has_no_network() {
    let env = Env::new();
    env.manifest(
        "[[postprocess]]\nname = \"net\"\ninline = \"cat /proc/net/dev > /usr/share/netdev\"\n",
    );
    let out = env.compose("repo", &[]);
    assert!(out.status.success());
    let dev = env.ostree("repo", &["cat", field(&out, "commit"), "/usr/share/netdev"]);
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(
        ifaces,
        vec!["lo"],
        "postprocess must run in an empty network namespace"
    );
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn a_killed_compose_moves_no_ref_and_the_next_one_succeeds() {
    let env = Env::new();
    env.manifest("");
    assert!(env.compose("repo", &[]).status.success());
    let head = env.ref_head("repo").unwrap();

    env.manifest(
        "[[postprocess]]\nname = \"slow\"\ninline = \"touch /usr/share/started; sleep 60\"\n",
    );
    let mut child = host()
        .args([
            "compose",
            "tree",
            "--bare-user",
            "--repo",
            "repo",
            "--cache",
            "cache",
            "--quiet",
            "manifest.toml",
        ])
        .current_dir(env.dir.path())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let started = walkdir_find(&env.path("cache/work"), "started");
        if started {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the compose never reached its postprocess script"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap(); // SIGKILL: no cleanup code runs
    child.wait().unwrap();
    assert_eq!(env.ref_head("repo").unwrap(), head);
    env.ostree("repo", &["fsck"]);

    env.manifest("");
    env.write("files/motd", "after the kill\n");
    let out = env.compose("repo", &[]);
    assert!(
        out.status.success(),
        "a compose after a killed one must succeed"
    );
    assert_eq!(
        std::fs::read_dir(env.path("cache/work")).unwrap().count(),
        0
    );
}

fn walkdir_find(dir: &Path, name: &str) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten()
        .any(|e| e.path().join("rootfs/usr/share").join(name).exists())
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn diff_reports_packages_and_files_between_versions() {
    let env = Env::new();
    env.manifest("");
    let a = env.compose("repo", &[]);
    assert!(a.status.success());
    env.write(
        "base/var/lib/dpkg/status",
        &dpkg_status(&[("busybox", "1:1.36.1-1"), ("extra", "2.0")]),
    );
    env.write("files/motd", "changed\n");
    let b = env.compose("repo", &[]);
    assert!(b.status.success());

    let out = env.host(&[
        "compose",
        "diff",
        "--repo",
        "repo",
        "-f",
        "7.20261118.0",
        "test/x86_64/base",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("packages: 1 upgraded, 1 removed, 1 added"),
        "{text}"
    );
    assert!(
        text.contains("upgraded   busybox 1:1.35.0-4 -> 1:1.36.1-1"),
        "{text}"
    );
    assert!(text.contains("removed    demo 1.0-1"), "{text}");
    assert!(text.contains("added      extra 2.0"), "{text}");
    assert!(text.contains("  M /usr/etc/motd"), "{text}");
    assert!(text.contains("  M /usr/lib/sysimage/dpkg/status"), "{text}");

    let json = env.host(&[
        "compose",
        "diff",
        "--repo",
        "repo",
        "--json",
        field(&a, "commit"),
        field(&b, "commit"),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["packages"]["upgraded"][0]["name"], "busybox");

    let bad = env.host(&[
        "compose",
        "diff",
        "--repo",
        "repo",
        "nope",
        "test/x86_64/base",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no commit, ref or version \"nope\""));
}

/// Every commit of a tree with packages carries an SPDX SBOM of them;
/// `compose sbom` prints it for a ref, a version or a checksum. Copyright
/// files are read inside the tree: a symlink out of it reads nothing of the
/// build machine.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn sbom_lists_the_trees_packages_and_compose_sbom_prints_it() {
    let env = Env::new();
    env.manifest("");
    env.write(
        "base/var/lib/dpkg/status",
        &dpkg_status(&[
            ("busybox", "1:1.35.0-4"),
            ("demo", "1.0-1"),
            ("libstdc++6", "12.2.0-14"),
        ]),
    );
    env.write(
        "base/usr/share/doc/demo/copyright",
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n\
         Files: *\nCopyright: 2026 Demo\nLicense: GPL-2+\n\n\
         Files: vendored/*\nCopyright: 2020 Other\nLicense: Expat\n",
    );
    // Free text: not machine readable, so no license is claimed.
    env.write(
        "base/usr/share/doc/busybox/copyright",
        "This is busybox, licensed under\nLicense: GPL-2\n",
    );
    env.write(
        "outside/copyright",
        "Format: x\n\nFiles: *\nLicense: Build-Machine-Secret\n",
    );
    std::fs::create_dir_all(env.path("base/usr/share/doc/libstdc++6")).unwrap();
    std::os::unix::fs::symlink(
        env.path("outside/copyright"),
        env.path("base/usr/share/doc/libstdc++6/copyright"),
    )
    .unwrap();
    let out = env.compose("repo", &[]);
    assert!(out.status.success());
    assert_eq!(field(&out, "packages"), "3");
    let commit = field(&out, "commit").to_string();

    let printed = |rev: &str| {
        let out = env.host(&["compose", "sbom", "--repo", "repo", rev]);
        assert!(out.status.success(), "compose sbom {rev}");
        out.stdout
    };
    let sbom = printed("test/x86_64/base");
    assert_eq!(printed("7.20261118.0"), sbom);
    assert_eq!(printed(&commit), sbom);
    // The file in the tree, as stock tools read it.
    assert_eq!(
        env.ostree("repo", &["cat", &commit, "/usr/share/cairn/sbom.spdx.json"])
            .as_bytes(),
        &sbom[..]
    );

    let doc: serde_json::Value = serde_json::from_slice(&sbom).unwrap();
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    assert_eq!(doc["creationInfo"]["created"], "2026-11-18T11:06:40Z");
    let pkgs = doc["packages"].as_array().unwrap();
    let summary: Vec<(String, String, String, String)> = pkgs
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["versionInfo"].as_str().unwrap().to_string(),
                p["licenseDeclared"].as_str().unwrap().to_string(),
                p["externalRefs"][0]["referenceLocator"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    let row = |n: &str, v: &str, l: &str, purl: &str| {
        (
            n.to_string(),
            v.to_string(),
            l.to_string(),
            purl.to_string(),
        )
    };
    assert_eq!(
        summary,
        [
            row(
                "busybox",
                "1:1.35.0-4",
                "NOASSERTION",
                "pkg:deb/debian/busybox@1%3A1.35.0-4?arch=amd64"
            ),
            row(
                "demo",
                "1.0-1",
                "GPL-2.0-or-later AND MIT",
                "pkg:deb/debian/demo@1.0-1?arch=amd64"
            ),
            row(
                "libstdc++6",
                "12.2.0-14",
                "NOASSERTION",
                "pkg:deb/debian/libstdc%2B%2B6@12.2.0-14?arch=amd64"
            ),
        ]
    );
    assert!(!String::from_utf8_lossy(&sbom).contains("Build-Machine-Secret"));
    assert_eq!(doc["relationships"].as_array().unwrap().len(), 3);

    // A tree without a dpkg database carries no SBOM, and says so.
    std::fs::remove_file(env.path("base/var/lib/dpkg/status")).unwrap();
    let bare = env.compose("repo", &[]);
    assert!(bare.status.success());
    let none = env.host(&["compose", "sbom", "--repo", "repo", "test/x86_64/base"]);
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("has no SBOM at /usr/share/cairn/sbom.spdx.json"),
        "{err}"
    );
    // The older commit still has its own.
    assert_eq!(printed(&commit), sbom);
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn rootfs_tarball_base_composes_like_the_directory() {
    let env = Env::new();
    let status = Command::new("tar")
        .args(["--numeric-owner", "-czf", "base.tar.gz", "-C", "base", "."])
        .current_dir(env.dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    env.manifest("");
    let dir_build = env.compose("repo-dir", &[]);
    let text = std::fs::read_to_string(env.path("manifest.toml"))
        .unwrap()
        .replace("rootfs = \"base\"", "rootfs = \"base.tar.gz\"");
    std::fs::write(env.path("manifest.toml"), text).unwrap();
    let tar_build = env.compose("repo-tar", &[]);
    assert!(dir_build.status.success() && tar_build.status.success());
    assert_eq!(
        field(&dir_build, "content-checksum"),
        field(&tar_build, "content-checksum")
    );
}

/// Processes whose command line names `dir` (a gpg-agent left running).
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn keygen_keys_sign_commits_promotions_and_summaries() {
    let env = Env::new();
    env.manifest("");
    let keys = env.path("keys");
    let made = env.host(&["compose", "keygen", "keys", "--name", "cairn test"]);
    assert!(made.status.success());
    let fpr = field(&made, "fingerprint").to_string();
    assert_eq!(fpr.len(), 40, "{fpr}");
    assert_eq!(field(&made, "public-key"), "keys/cairn-release.asc");
    let public = std::fs::read_to_string(keys.join("cairn-release.asc")).unwrap();
    assert!(public.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"));
    assert!(!public.contains("PRIVATE"));
    let mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the key directory is private");
    // An existing key is never replaced.
    let again = env.host(&["compose", "keygen", "keys"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));

    // The home alone (as the README's main command sets it) names the key.
    let signed = |args: &[&str]| {
        let out = host()
            .args(args)
            .current_dir(env.dir.path())
            .env("SOURCE_DATE_EPOCH", "1795000000")
            .env("CAIRN_GPG_HOMEDIR", &keys)
            .env_remove("CAIRN_GPG_KEY")
            .env_remove("CAIRN_REPO")
            .env_remove("CAIRN_CACHE")
            .output()
            .unwrap();
        eprintln!(
            "$ CAIRN_GPG_HOMEDIR=keys host {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success());
        out
    };
    // The tree ships its public key ([trust] keys), named by fingerprint.
    env.manifest("\n[trust]\nkeys = [\"keys/cairn-release.asc\"]\n");
    let tree = compose_tree_args("repo", "cache", "manifest.toml", &["--quiet"]);
    let tree: Vec<&str> = tree.iter().map(|a| a.to_str().unwrap()).collect();
    let composed = signed(&tree);
    let shipped = Command::new("ostree")
        .arg(format!("--repo={}", env.path("repo").display()))
        .args(["cat", "test/x86_64/base"])
        .arg(format!(
            "/{}/{fpr}.asc",
            cairn_contracts::trust::TRUSTED_KEYS_DIR
        ))
        .output()
        .unwrap();
    assert!(shipped.status.success(), "{}", common::text(&shipped));
    assert_eq!(String::from_utf8_lossy(&shipped.stdout), public);
    let promoted = signed(&[
        "compose",
        "promote",
        "--repo",
        "repo",
        "--from",
        "test/x86_64/base",
        "--to",
        "test/x86_64/stable",
    ]);
    let published = signed(&["compose", "publish", "--repo", "repo", "--no-deltas"]);
    assert!(String::from_utf8_lossy(&published.stdout).contains("summary regenerated and signed"));
    assert!(env.path("repo/summary.sig").is_file());
    // No gpg-agent of the key's home outlives the commands.
    assert_eq!(processes_naming(&keys), Vec::<String>::new());

    // Stock ostree verifies both commits against the exported public key
    // (libostree reads keyring files, *.gpg, from a directory).
    let trusted = env.path("trusted");
    std::fs::create_dir_all(&trusted).unwrap();
    let binary = Command::new("gpg")
        .arg("--homedir")
        .arg(&keys)
        .args(["--batch", "--export", &fpr])
        .output()
        .unwrap();
    assert!(binary.status.success());
    std::fs::write(trusted.join("cairn-test.gpg"), binary.stdout).unwrap();
    for commit in [field(&composed, "commit"), field(&promoted, "commit")] {
        let shown = env.ostree(
            "repo",
            &[
                "show",
                &format!("--gpg-homedir={}", trusted.display()),
                commit,
            ],
        );
        assert!(shown.contains("Good signature"), "{shown}");
        assert!(
            shown.contains(&fpr[24..]),
            "signed by the keygen key: {shown}"
        );
    }
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(&keys)
        .args(["--kill", "all"])
        .status();

    // A key the home does not hold fails the compose, and the ref stays.
    let bad = env.compose(
        "repo-bad",
        &[
            "--gpg-sign",
            "0000DEADBEEF",
            "--gpg-homedir",
            keys.to_str().unwrap(),
        ],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("signing commit"));
    assert!(
        env.ref_head("repo-bad").is_none(),
        "a failed signature must not move the ref"
    );
    // A home without a key says how to make one.
    std::fs::create_dir_all(env.path("empty-home")).unwrap();
    std::fs::set_permissions(
        env.path("empty-home"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let none = env.compose("repo-none", &["--gpg-homedir", "empty-home"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("holds no secret key"));
    assert!(env.ref_head("repo-none").is_none());
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(env.path("empty-home"))
        .args(["--kill", "all"])
        .status();
}

/// Without --trust or --insecure-no-verify no image is written: a node must
/// know whose updates to install. Checked before root is needed.
#[test]
fn an_image_without_trusted_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = |extra: &[&str]| {
        let out = host()
            .args(["compose", "image", "--repo", "repo", "--ref", "a/b"])
            .args(extra)
            .args(["-o", "disk.qcow2"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(!dir.path().join("disk.qcow2").exists());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = image(&[]);
    assert!(err.contains("--trust KEYFILE"), "{err}");
    assert!(err.contains("host compose keygen"), "{err}");
    assert!(err.contains("--insecure-no-verify"), "{err}");
    // A secret key is never written into an image.
    std::fs::write(
        dir.path().join("secret.asc"),
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nxx\n",
    )
    .unwrap();
    let err = image(&["--trust", "secret.asc"]);
    assert!(err.contains("SECRET key"), "{err}");
}

/// Regression: a base root without /var (or /etc) failed in the layout step
/// ("reading …/rootfs/var: No such file or directory").
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn rootfs_without_var_or_etc_composes() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("base/usr/share")).unwrap();
    std::fs::write(dir.path().join("base/usr/share/x"), "x\n").unwrap();
    std::fs::write(
        dir.path().join("m.toml"),
        "ref = \"x/y\"\nrootfs = \"base\"\n",
    )
    .unwrap();
    let out = host()
        .args([
            "compose",
            "tree",
            "--bare-user",
            "--repo",
            "repo",
            "--cache",
            "cache",
            "--quiet",
            "m.toml",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn promote_moves_a_tested_tree_to_another_channel_without_rebuilding() {
    let env = Env::new();
    env.manifest("");
    let tested = env.compose("repo", &[]);
    assert!(tested.status.success());
    env.write("files/motd", "untested change\n");
    let untested = env.compose("repo", &[]);
    assert!(untested.status.success());

    // Promote the first (tested) commit by its version.
    let promoted = env.host(&[
        "compose",
        "promote",
        "--repo",
        "repo",
        "--from",
        "test/x86_64/base",
        "--to",
        "test/x86_64/stable",
        "7.20261118.0",
    ]);
    assert!(promoted.status.success());
    assert_eq!(
        field(&promoted, "content-checksum"),
        field(&tested, "content-checksum")
    );
    assert_eq!(field(&promoted, "promoted-from"), field(&tested, "commit"));
    assert_ne!(field(&promoted, "commit"), field(&tested, "commit"));
    let commit = field(&promoted, "commit").to_string();
    let show = |key: &str| {
        env.ostree(
            "repo",
            &["show", &format!("--print-metadata-key={key}"), &commit],
        )
    };
    assert_eq!(show("cairn.promoted-from-ref").trim(), "'test/x86_64/base'");
    assert_eq!(
        show("cairn.packages").trim(),
        "['busybox=1:1.35.0-4', 'demo=1.0-1']"
    );
    assert!(show("version").trim().starts_with("'7."));
    env.ostree("repo", &["fsck"]);

    // The next promotion chains onto the channel's head.
    let next = env.host(&[
        "compose",
        "promote",
        "--repo",
        "repo",
        "--from",
        "test/x86_64/base",
        "--to",
        "test/x86_64/stable",
    ]);
    assert!(next.status.success());
    assert_eq!(
        field(&next, "content-checksum"),
        field(&untested, "content-checksum")
    );
    let parent = env.ostree(
        "repo",
        &["rev-parse", &format!("{}^", field(&next, "commit"))],
    );
    assert_eq!(parent.trim(), commit);

    // Nothing new to promote, and only what the source channel carried.
    let again = env.host(&[
        "compose",
        "promote",
        "--repo",
        "repo",
        "--from",
        "test/x86_64/base",
        "--to",
        "test/x86_64/stable",
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to promote"));
    let foreign = env.host(&[
        "compose",
        "promote",
        "--repo",
        "repo",
        "--from",
        "test/x86_64/stable",
        "--to",
        "test/x86_64/other",
        field(&tested, "commit"),
    ]);
    assert!(!foreign.status.success());
    assert!(String::from_utf8_lossy(&foreign.stderr)
        .contains("is not in the history of test/x86_64/stable"));
}

/// `promote --tested-by FILE` gates on a JUnit result: a failing or empty
/// one is refused and moves nothing; a passing one's sha256 goes into the
/// promoted commit.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn promote_is_gated_on_a_passing_test_result_and_records_it() {
    let env = Env::new();
    env.manifest("");
    assert!(env.compose("repo", &[]).status.success());
    let promote = |junit: &str| {
        env.host(&[
            "compose",
            "promote",
            "--repo",
            "repo",
            "--from",
            "test/x86_64/base",
            "--to",
            "test/x86_64/stable",
            "--tested-by",
            junit,
        ])
    };
    env.write(
        "failed.xml",
        r#"<testsuites tests="2" failures="1"><testsuite name="host test boot x" tests="2" failures="1"><testcase name="a"/><testcase name="b"><failure message="exited with status 3"/></testcase></testsuite></testsuites>"#,
    );
    env.write(
        "empty.xml",
        "<testsuite name=\"x\" tests=\"0\"></testsuite>",
    );
    for (file, says) in [
        ("failed.xml", "1 of 2 tests failed"),
        ("empty.xml", "no test case"),
        ("missing.xml", "missing.xml"),
    ] {
        let out = promote(file);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{file}: {err}");
        assert!(
            !env.path("repo")
                .join("refs/heads/test/x86_64/stable")
                .exists(),
            "{file}: nothing promoted"
        );
    }
    let passed = r#"<testsuites tests="2" failures="0" errors="0"><testsuite name="host test boot x" tests="2"><testcase name="a"/><testcase name="b"/></testsuite></testsuites>"#;
    env.write("passed.xml", passed);
    let out = promote("passed.xml");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(passed.as_bytes()))
    );
    let commit = field(&out, "commit").to_string();
    let show = |key: &str| {
        env.ostree(
            "repo",
            &["show", &format!("--print-metadata-key={key}"), &commit],
        )
    };
    assert_eq!(show("cairn.tested-by").trim(), format!("'{digest}'"));
    assert_eq!(show("cairn.tested-by-summary").trim(), "'2 tests passed'");

    // A boot test and an upgrade test: both must pass, both are recorded.
    let upgrade = r#"<testsuite name="host test upgrade x" tests="3"><testcase name="boot"/><testcase name="upgrade"/><testcase name="rollback"/></testsuite>"#;
    env.write("upgrade.xml", upgrade);
    let promote_both = |second: &str| {
        env.host(&[
            "compose",
            "promote",
            "--repo",
            "repo",
            "--from",
            "test/x86_64/base",
            "--to",
            "test/x86_64/both",
            "--tested-by",
            "passed.xml",
            "--tested-by",
            second,
        ])
    };
    let out = promote_both("failed.xml");
    assert!(!out.status.success());
    assert!(!env
        .path("repo")
        .join("refs/heads/test/x86_64/both")
        .exists());
    let out = promote_both("upgrade.xml");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let both = field(&out, "commit").to_string();
    let show = |key: &str| {
        env.ostree(
            "repo",
            &["show", &format!("--print-metadata-key={key}"), &both],
        )
    };
    let upgrade_digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(upgrade.as_bytes()))
    );
    assert_eq!(
        show("cairn.tested-by").trim(),
        format!("'{digest} {upgrade_digest}'")
    );
    assert_eq!(
        show("cairn.tested-by-summary").trim(),
        "'2 tests passed; 3 tests passed'"
    );
}

/// An OCI image layout (`DIR/oci`) of a busybox root with one uncompressed
/// layer; returns the manifest digest (`sha256:…`).
fn make_oci_layout(dir: &Path) -> String {
    let spec = cairn_test_support::LayoutSpec {
        applets: cairn_test_support::Applets::Only(&["sh"]),
        cmd: &["/bin/sh", "-c", "sleep 3600"],
        ref_name: Some("demo:1"),
        ..Default::default()
    };
    cairn_test_support::busybox_layout(&dir.join("oci"), &spec).unwrap()
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn apps_are_verified_and_baked_into_the_tree_with_a_unit() {
    let env = Env::new();
    let digest = make_oci_layout(env.dir.path());
    let app = |digest: &str| {
        format!("[[apps]]\nname = \"web\"\nimage = \"oci\"\ndigest = \"{digest}\"\nmemory = \"64M\"\npids = \"32\"\nip = \"10.88.0.50\"\n")
    };
    env.manifest(&app(&digest));
    let out = env.compose("repo", &[]);
    assert!(out.status.success());
    let commit = field(&out, "commit").to_string();
    let ls = env.ostree("repo", &["ls", "-R", &commit, "/usr"]);
    for needed in [
        "/usr/lib/cairn/apps/web/image.json",
        "/usr/lib/cairn/apps/web/rootfs/bin/busybox",
        "/usr/lib/systemd/system/cairn-app-web.service",
        "/usr/etc/systemd/system/multi-user.target.wants/cairn-app-web.service -> /usr/lib/systemd/system/cairn-app-web.service",
    ] {
        assert!(ls.lines().any(|l| l.ends_with(needed)), "tree lacks {needed}:\n{ls}");
    }
    let unit = env.ostree(
        "repo",
        &[
            "cat",
            &commit,
            "/usr/lib/systemd/system/cairn-app-web.service",
        ],
    );
    assert!(
        unit.contains(&format!("\"cairn-app-web@{digest}\"")),
        "{unit}"
    );
    assert!(unit.contains("\"--memory\" \"64M\""), "{unit}");
    let apps = env.ostree(
        "repo",
        &["show", "--print-metadata-key=cairn.apps", &commit],
    );
    assert_eq!(apps.trim(), format!("['web@{digest}']"));
    // The image's files are the tree's (one store), its record beside them,
    // and only root enters the app's directory (setuid files of images).
    let record = env.ostree(
        "repo",
        &["cat", &commit, "/usr/lib/cairn/apps/web/image.json"],
    );
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["name"], "cairn-app-web");
    assert_eq!(record["tag"], "baked");
    assert_eq!(record["manifest_digest"], digest.as_str());
    let dir = env.ostree("repo", &["ls", "-d", &commit, "/usr/lib/cairn/apps/web"]);
    assert!(dir.starts_with("d00700 0 0"), "{dir}");
    assert!(
        !unit.contains("\"import\""),
        "the node never imports a baked app: {unit}"
    );

    // Any other image than the pinned one is refused, and nothing is committed.
    let head = env.ref_head("repo").unwrap();
    env.manifest(&app(&format!("sha256:{}", "0".repeat(64))));
    let wrong = env.compose("repo", &[]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("but the manifest pins"));
    assert_eq!(env.ref_head("repo").unwrap(), head);

    // A corrupted blob is caught by the verification.
    let blobs = env.path("oci/blobs/sha256");
    let layer = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&layer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&layer, bytes).unwrap();
    env.manifest(&app(&digest));
    let corrupt = env.compose("repo", &[]);
    assert!(!corrupt.status.success());
    assert_eq!(env.ref_head("repo").unwrap(), head);
}

/// `[[apps]] image = "REGISTRY/REPO:TAG"`: the compose resolves the tag,
/// bakes that digest, records it in the commit metadata and the lock, and
/// `--lock` bakes the locked digest after the tag moved on.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn apps_baked_from_a_registry_are_pinned_in_the_lock() {
    let env = Env::new();
    let registry = cairn_test_support::Registry::start();
    let layout = |name: &str, page: &str| {
        let spec = cairn_test_support::LayoutSpec {
            applets: cairn_test_support::Applets::Only(&["sh"]),
            files: &[("www/index.html", page.as_bytes())],
            cmd: &["/bin/sh", "-c", "sleep 3600"],
            ..Default::default()
        };
        let dir = env.path(name);
        cairn_test_support::busybox_layout(&dir, &spec).unwrap();
        format!("oci:{}", dir.display())
    };
    let v1 = registry
        .push(&layout("v1", "one\n"), "apps/web:1", false)
        .unwrap();
    env.write(
        "registries.conf",
        &format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            registry.host()
        ),
    );
    let reference = format!("{}/apps/web:1", registry.host());
    env.manifest(&format!(
        "[[apps]]\nname = \"web\"\nimage = \"{reference}\"\n"
    ));
    let out = env.compose("repo", &[]);
    assert!(out.status.success());
    let first = field(&out, "commit").to_string();
    let show = |key: &str, commit: &str| {
        env.ostree(
            "repo",
            &["show", &format!("--print-metadata-key={key}"), commit],
        )
    };
    // The app's page as baked into a commit of a repository.
    let page = |repo: &str, commit: &str| {
        env.ostree(
            repo,
            &[
                "cat",
                commit,
                "/usr/lib/cairn/apps/web/rootfs/www/index.html",
            ],
        )
    };
    assert_eq!(show("cairn.apps", &first).trim(), format!("['web@{v1}']"));
    assert_eq!(page("repo", &first), "one\n");
    let out = env.host(&[
        "compose",
        "lock",
        "--repo",
        "repo",
        &first,
        "-o",
        "lock.toml",
    ]);
    assert!(out.status.success());
    let lock = std::fs::read_to_string(env.path("lock.toml")).unwrap();
    assert!(
        lock.contains(&format!(
            "[[app]]\nname = \"web\"\nimage = \"{reference}\"\ndigest = \"{v1}\""
        )),
        "{lock}"
    );

    // The tag moves on. --unless-changed sees it (the resolved digest is an
    // input); --lock still bakes what the lock says.
    let v2 = registry
        .push(&layout("v2", "two\n"), "apps/web:1", false)
        .unwrap();
    assert_ne!(v1, v2);
    let out = env.compose("repo", &["--unless-changed"]);
    assert!(out.status.success());
    let second = field(&out, "commit").to_string();
    assert_ne!(second, first, "a moved tag is a change");
    assert_eq!(show("cairn.apps", &second).trim(), format!("['web@{v2}']"));
    let out = env.compose("other", &["--lock", "lock.toml"]);
    assert!(out.status.success());
    let locked = field(&out, "commit").to_string();
    assert_eq!(show("cairn.apps", &locked).trim(), format!("['web@{v1}']"));
    assert_eq!(page("other", &locked), "one\n");

    // A digest in the manifest pins as the lock does: the tag is only a
    // name for the reader, the pinned image is what is baked.
    env.manifest(&format!(
        "[[apps]]\nname = \"web\"\nimage = \"{reference}\"\ndigest = \"{v1}\"\n"
    ));
    let out = env.compose("repo", &[]);
    assert!(out.status.success());
    let pinned = field(&out, "commit").to_string();
    assert_eq!(show("cairn.apps", &pinned).trim(), format!("['web@{v1}']"));
    // A digest the registry does not have fails the compose and moves nothing.
    let head = env.ref_head("repo");
    env.manifest(&format!(
        "[[apps]]\nname = \"web\"\nimage = \"{reference}\"\ndigest = \"sha256:{}\"\n",
        "0".repeat(64)
    ));
    let out = env.compose("repo", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apps: web") && err.contains("404"), "{err}");
    assert_eq!(env.ref_head("repo"), head);
}

/// The tree's own symlinks never lead the compose's writes onto the build
/// machine: parents resolve inside the tree (like a chroot), the last
/// component of a path is never followed. Before, a rootfs with `/var ->
/// DIR` had DIR emptied by the layout step, a `dst` below an absolute
/// symlink was written on the build machine, and `remove-files` below one
/// removed build-machine files.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn tree_symlinks_never_lead_writes_onto_the_build_machine() {
    let env = Env::new();
    let victim = env.path("host-victim");
    std::fs::create_dir_all(victim.join("state")).unwrap();
    std::fs::write(victim.join("keep"), "host file\n").unwrap();
    let v = victim.display().to_string();
    let base = env.path("base");
    std::fs::remove_dir_all(base.join("var")).unwrap();
    std::os::unix::fs::symlink(&victim, base.join("var")).unwrap();
    std::fs::create_dir_all(base.join("usr/lib")).unwrap();
    std::os::unix::fs::symlink("/", base.join("usr/lib/escape")).unwrap();
    std::os::unix::fs::symlink(&victim, base.join("usr/share/gone")).unwrap();
    std::os::unix::fs::symlink(victim.join("keep"), base.join("etc/motd")).unwrap();
    let p = env.manifest(&format!(
        "[[files]]\nsrc = \"files/cairn-tool\"\ndst = \"/usr/lib/escape{v}/planted\"\n"
    ));
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("/usr/share/nothing-here", "/usr/share/gone/keep");
    std::fs::write(&p, text).unwrap();
    let out = env.compose("repo", &[]);
    assert!(out.status.success(), "{}", common::text(&out));
    let mut left: Vec<String> = std::fs::read_dir(&victim)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec!["keep", "state"],
        "the build machine's directory changed"
    );
    assert_eq!(
        std::fs::read_to_string(victim.join("keep")).unwrap(),
        "host file\n"
    );
    let commit = field(&out, "commit").to_string();
    assert_eq!(
        env.ostree("repo", &["cat", &commit, "/usr/etc/motd"]),
        "welcome to cairn\n",
        "/etc/motd was a symlink: replaced by the file, not written through"
    );

    // A unit of the tree whose [Install] names a path: refused, nothing created outside.
    env.write(
        "base/usr/lib/systemd/system/evil.service",
        &format!(
            "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=../../../../../../../..{v}/x\n"
        ),
    );
    let text = std::fs::read_to_string(&p).unwrap().replace(
        "enable = [\"demo.service\"]",
        "enable = [\"demo.service\", \"evil.service\"]",
    );
    std::fs::write(&p, text).unwrap();
    let out = env.compose("repo", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("evil.service") && err.contains("WantedBy"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 2);
}

/// A `files` source that is a symlink to a build-machine file (a secret)
/// stops the compose before anything is built; it is not shipped.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn a_source_symlink_to_a_build_machine_file_is_not_shipped() {
    let env = Env::new();
    std::fs::remove_file(env.path("files/motd")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", env.path("files/motd")).unwrap();
    env.manifest("");
    let out = env.compose("repo", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("files[0].src")
            && err.contains("manifest.toml line")
            && err.contains("symlink"),
        "{err}"
    );
    assert!(env.ref_head("repo").is_none());
}

/// `compose lock` prints what the commit recorded; `compose verify`
/// re-composes from it into a scratch repository: `identical` for the same
/// inputs, the differing path and a non-zero exit once an input changed.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn compose_lock_and_verify_a_small_tree() {
    let env = Env::new();
    env.manifest("[[postprocess]]\nname = \"stamp\"\ninline = \"echo $SOURCE_DATE_EPOCH $CAIRN_VERSION > /usr/share/stamp\"\n");
    let out = env.compose("repo", &[]);
    assert!(out.status.success());
    let commit = field(&out, "commit").to_string();
    let content = field(&out, "content-checksum").to_string();

    let out = env.host(&["compose", "lock", "--repo", "repo", &commit]);
    assert!(out.status.success());
    let lock = String::from_utf8(out.stdout).unwrap();
    assert!(
        lock.starts_with("format = 1\nsource-date-epoch = 1795000000\n"),
        "{lock}"
    );
    assert!(lock.contains("manifest-digest = \""), "{lock}");
    assert!(lock.contains("host-digest = \""), "{lock}");
    // A rootfs base: no packages, no sources.
    assert!(!lock.contains("[[package]]"), "{lock}");
    assert!(env
        .ostree(
            "repo",
            &["show", "--print-metadata-key=cairn.lock", &commit]
        )
        .contains("format = 1"));
    let out = env.host(&[
        "compose",
        "lock",
        "--repo",
        "repo",
        "test/x86_64/base",
        "-o",
        "lock.toml",
    ]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(env.path("lock.toml")).unwrap(),
        lock
    );

    // Verified under another SOURCE_DATE_EPOCH: the recorded one is used.
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "compose",
            "verify",
            "--repo",
            "repo",
            "--cache",
            "cache",
            "--manifest",
            "manifest.toml",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let out = host()
            .args(&args)
            .current_dir(env.path(""))
            .env("SOURCE_DATE_EPOCH", "1")
            .output()
            .unwrap();
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let out = verify(&[&commit]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("identical {content}")
    );
    // The scratch repository is gone, and the original repository has no new commit.
    let leftovers: Vec<_> = std::fs::read_dir(env.path("cache"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".verify-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(env.ref_head("repo").as_deref(), Some(commit.as_str()));

    // `compose tree --lock` with the recorded lock gives the same tree.
    let out = env.compose(
        "repo2",
        &["--lock", "lock.toml", "--version", "7.20261118.0"],
    );
    assert!(out.status.success());
    assert_eq!(field(&out, "content-checksum"), content);

    // An input the manifest digest does not cover (the base's content) changed:
    // verify names the path and fails.
    env.write("base/etc/os-release", "ID=cairn-test-changed\n");
    let out = verify(&[&commit]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("differs "), "{stdout}");
    assert!(stdout.contains("  M /usr/etc/os-release"), "{stdout}");

    // A changed manifest is refused with what to do.
    env.manifest("");
    let out = verify(&[&commit]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("was composed from a manifest with digest"),
        "{stderr}"
    );
    let out = env.compose("repo2", &["--lock", "lock.toml"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the lock was written for manifest digest")
    );

    // A hostile lock is refused before anything is composed.
    env.write(
        "bad.toml",
        &lock.replace("format = 1", "format = 1\nsurprise = true"),
    );
    let out = env.compose("repo3", &["--lock", "bad.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("surprise"));
    assert!(!env.path("repo3").exists());
}
