//! The node commands end to end on sysroots the tests build themselves: a source
//! archive repo with commits of tiny synthetic trees (committed through the
//! ostree crate), a sysroot initialised through the ostree crate with a first
//! deployment, then the real `host` binary acting on it with `--sysroot`.
//! Stock `ostree admin status` cross-checks the result.
//!
//! Privileged tier: deployments are written as root.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ostree::gio;
use ostree::glib;
use ostree::prelude::*;

const REF: &str = "cairn/bookworm/x86_64/container-host";
const REFSPEC: &str = "cairn:cairn/bookworm/x86_64/container-host";
/// Commit timestamps: fixed, increasing, so downgrades are deliberate.
const T0: u64 = 1_795_000_000;

mod common;
use common::{host, text};

fn require_root() {
    common::require_root("it writes OSTree deployments");
}

/// One tree to commit.
struct Tree<'a> {
    version: &'a str,
    hello: &'a str,
    packages: &'a [&'a str],
    /// Kernel bytes (the initramfs is a few bytes).
    kernel: Vec<u8>,
    time: u64,
    /// More files under /usr/share/data: (name, bytes).
    extra: Vec<(String, Vec<u8>)>,
    /// `cairn.kargs`.
    kargs: &'a [&'a str],
    /// Files at any path of the tree: (path relative to its root, bytes).
    files: Vec<(String, Vec<u8>)>,
}

impl<'a> Tree<'a> {
    fn new(version: &'a str, n: u64) -> Self {
        Tree {
            version,
            hello: version,
            packages: &["bash=5.2.15-2+b2", "systemd=252.38-1~deb12u1"],
            kernel: b"kernel 6.1.0-test".to_vec(),
            time: T0 + n * 1000,
            extra: Vec::new(),
            kargs: &["rw", "console=ttyS0"],
            files: Vec::new(),
        }
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    src: ostree::Repo,
    gnupg: Option<GpgHome>,
}

impl Fixture {
    fn src_path(&self) -> PathBuf {
        self.dir.path().join("src")
    }

    fn sysroot(&self) -> PathBuf {
        self.dir.path().join("sysroot")
    }

    /// Source repo with v1 on REF, a sysroot with remote `cairn` and v1 deployed.
    fn new() -> Self {
        Self::build(false, None)
    }

    fn build(gpg: bool, boot_tmpfs: Option<&str>) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = ostree::Repo::new_for_path(&src_path);
        src.create(ostree::RepoMode::Archive, gio::Cancellable::NONE)
            .unwrap();
        let gnupg = gpg.then(|| GpgHome::new(&dir.path().join("gnupg"), "cairn test"));
        let fx = Fixture { dir, src, gnupg };
        let v1 = fx.commit(REF, &Tree::new("1.0", 1));
        if let Some(g) = &fx.gnupg {
            fx.src
                .sign_commit(&v1, &g.key, Some(g.home_str()), gio::Cancellable::NONE)
                .unwrap();
        }

        let sysroot_path = fx.sysroot();
        std::fs::create_dir_all(sysroot_path.join("boot")).unwrap();
        if let Some(size) = boot_tmpfs {
            nix::mount::mount(
                Some("tmpfs"),
                &sysroot_path.join("boot"),
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(format!("size={size}").as_str()),
            )
            .unwrap();
        }
        let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(&sysroot_path)));
        sysroot.ensure_initialized(gio::Cancellable::NONE).unwrap();
        sysroot.load(gio::Cancellable::NONE).unwrap();
        sysroot
            .init_osname("cairn", gio::Cancellable::NONE)
            .unwrap();
        let repo = sysroot.repo();
        let opts = glib::VariantDict::new(None);
        opts.insert("gpg-verify", fx.gnupg.is_some());
        if let Some(g) = &fx.gnupg {
            let key = fx.dir.path().join("cairn.gpg");
            g.export(&key);
            opts.insert("gpgkeypath", key.to_str().unwrap());
        }
        let url = format!("file://{}", fx.src_path().display());
        repo.remote_add(
            "cairn",
            Some(&url),
            Some(&opts.end()),
            gio::Cancellable::NONE,
        )
        .unwrap();
        // A main context of this thread's own: tests run in parallel threads,
        // and libostree's pull iterates the thread-default context (on the
        // shared global one, concurrent pulls race and fail now and then).
        glib::MainContext::new()
            .with_thread_default(|| {
                repo.pull(
                    "cairn",
                    &[REF],
                    ostree::RepoPullFlags::NONE,
                    None,
                    gio::Cancellable::NONE,
                )
            })
            .unwrap()
            .unwrap();
        let csum = repo.resolve_rev(REFSPEC, false).unwrap().unwrap();
        let origin = sysroot.origin_new_from_refspec(REFSPEC);
        let d = sysroot
            .deploy_tree(
                Some("cairn"),
                &csum,
                Some(&origin),
                None,
                &["root=LABEL=root", "rw", "console=ttyS0"],
                gio::Cancellable::NONE,
            )
            .unwrap();
        sysroot
            .simple_write_deployment(
                Some("cairn"),
                &d,
                None,
                ostree::SysrootSimpleWriteDeploymentFlags::NONE,
                gio::Cancellable::NONE,
            )
            .unwrap();
        fx
    }

    /// Commit a synthetic tree to `ref_` in the source repo; returns the checksum.
    fn commit(&self, ref_: &str, t: &Tree) -> String {
        let root = self.dir.path().join(format!("tree-{}", t.time));
        let _ = std::fs::remove_dir_all(&root);
        let kdir = root.join("usr/lib/modules/6.1.0-test");
        std::fs::create_dir_all(&kdir).unwrap();
        std::fs::create_dir_all(root.join("usr/etc")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        // The top level of a bootable tree, so a deployment can be entered as `/`.
        for d in ["sysroot", "boot", "run", "tmp", "dev", "proc", "var"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (link, target) in [
            ("ostree", "sysroot/ostree"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
        ] {
            std::os::unix::fs::symlink(target, root.join(link)).unwrap();
        }
        std::fs::write(kdir.join("vmlinuz"), &t.kernel).unwrap();
        std::fs::write(kdir.join("initramfs.img"), b"initramfs").unwrap();
        std::fs::write(root.join("usr/etc/os-release"), "ID=cairn\n").unwrap();
        std::fs::write(root.join("usr/bin/hello"), t.hello).unwrap();
        if !t.extra.is_empty() {
            std::fs::create_dir_all(root.join("usr/share/data")).unwrap();
        }
        for (name, data) in &t.extra {
            std::fs::write(root.join("usr/share/data").join(name), data).unwrap();
        }
        for (path, data) in &t.files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }

        let parent = self.src.resolve_rev(ref_, true).unwrap();
        let tx = self.src.auto_transaction(gio::Cancellable::NONE).unwrap();
        let mtree = ostree::MutableTree::new();
        let modifier = ostree::RepoCommitModifier::new(
            ostree::RepoCommitModifierFlags::CANONICAL_PERMISSIONS,
            None,
        );
        self.src
            .write_directory_to_mtree(
                &gio::File::for_path(&root),
                &mtree,
                Some(&modifier),
                gio::Cancellable::NONE,
            )
            .unwrap();
        let tree = self
            .src
            .write_mtree(&mtree, gio::Cancellable::NONE)
            .unwrap();
        let tree = tree.downcast::<ostree::RepoFile>().unwrap();
        let meta = glib::VariantDict::new(None);
        meta.insert("version", t.version);
        let packages: Vec<String> = t.packages.iter().map(|p| p.to_string()).collect();
        meta.insert_value("cairn.packages", &packages.to_variant());
        let kargs: Vec<String> = t.kargs.iter().map(|p| p.to_string()).collect();
        meta.insert_value("cairn.kargs", &kargs.to_variant());
        let csum = self
            .src
            .write_commit_with_time(
                parent.as_deref(),
                Some(t.version),
                None,
                Some(&meta.end()),
                &tree,
                t.time,
                gio::Cancellable::NONE,
            )
            .unwrap();
        self.src.transaction_set_ref(None, ref_, Some(&csum));
        tx.commit(gio::Cancellable::NONE).unwrap();
        csum.to_string()
    }

    fn run(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let sysroot = self.sysroot();
        let mut cmd = host();
        cmd.args(args).arg("--sysroot").arg(&sysroot);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// Run `host ARGS --sysroot …` and require success.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, &[]);
        assert!(
            out.status.success(),
            "host {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Run it and require failure; returns stdout+stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args, &[]);
        assert!(
            !out.status.success(),
            "host {args:?} should fail:\n{}",
            text(&out)
        );
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        text(&out)
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    /// (version, checksum) per deployment, in boot order.
    fn versions(&self) -> Vec<String> {
        self.status()["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["version"].as_str().unwrap_or("-").to_string())
            .collect()
    }

    fn ostree_admin_status(&self) -> String {
        let out = Command::new("ostree")
            .arg("admin")
            .arg("status")
            .arg(format!("--sysroot={}", self.sysroot().display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "ostree admin status: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// A complete, bootable default deployment: /boot/loader points at a loader
    /// dir whose entries name existing kernels and initramfs, and deployments.
    fn assert_bootable(&self) {
        let sysroot = self.sysroot();
        let boot = sysroot.join("boot");
        let loader = std::fs::read_link(boot.join("loader")).expect("/boot/loader symlink");
        let entries_dir = boot.join(&loader).join("entries");
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&entries_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        assert!(
            !entries.is_empty(),
            "no entries in {}",
            entries_dir.display()
        );
        let admin = self.ostree_admin_status();
        let listed = admin.lines().filter(|l| l.starts_with("  cairn ")).count();
        assert_eq!(
            listed,
            entries.len(),
            "entries vs ostree admin status:\n{admin}"
        );
        for entry in entries {
            let conf = std::fs::read_to_string(&entry).unwrap();
            let field = |k: &str| {
                conf.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k} ")))
                    .unwrap_or_else(|| panic!("{k} missing in {}:\n{conf}", entry.display()))
                    .trim()
                    .to_string()
            };
            for k in ["linux", "initrd"] {
                let p = boot.join(field(k).trim_start_matches('/'));
                let len = std::fs::metadata(&p)
                    .unwrap_or_else(|e| panic!("{} ({k}): {e}", p.display()))
                    .len();
                assert!(len > 0, "{} is empty", p.display());
            }
            let options = field("options");
            let ostree_arg = options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("ostree="))
                .unwrap_or_else(|| panic!("no ostree= in {options}"));
            let deployment = sysroot.join(ostree_arg.trim_start_matches('/'));
            assert!(
                deployment.join("usr/bin/hello").is_file(),
                "{} (from {}) is not a complete deployment",
                deployment.display(),
                entry.display()
            );
        }
    }
}

impl Drop for Fixture {
    /// libostree makes each deployment root immutable (chattr +i): lift that so
    /// the temp dir can be removed.
    fn drop(&mut self) {
        let deploy = self.sysroot().join("ostree/deploy");
        for os in std::fs::read_dir(&deploy).into_iter().flatten().flatten() {
            for d in std::fs::read_dir(os.path().join("deploy"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = Command::new("chattr").arg("-i").arg(d.path()).status();
            }
        }
    }
}

/// Parsed `ostree admin status` (text only in 2022.7): stateroot, checksum,
/// serial, version, pinned, refspec per deployment; with `flags` (a booted
/// system) also the `*` booted mark and the (staged|pending|rollback) marker.
fn parse_admin_status(s: &str, flags: bool) -> Vec<BTreeMap<&'static str, String>> {
    let mut out: Vec<BTreeMap<&'static str, String>> = Vec::new();
    for line in s.lines() {
        let head = line
            .strip_prefix("* ")
            .map(|r| (true, r))
            .or_else(|| line.strip_prefix("  ").map(|r| (false, r)))
            .filter(|(_, r)| !r.starts_with(' '));
        if let Some((booted, rest)) = head {
            let mut words = rest.split_whitespace();
            let stateroot = words.next().unwrap().to_string();
            let (csum, serial) = words.next().unwrap().rsplit_once('.').unwrap();
            let mut m = BTreeMap::new();
            m.insert("stateroot", stateroot);
            m.insert("checksum", csum.to_string());
            m.insert("serial", serial.to_string());
            m.insert("pinned", "false".to_string());
            if flags {
                m.insert("booted", booted.to_string());
                let marker = words
                    .next()
                    .unwrap_or("")
                    .trim_matches(|c| c == '(' || c == ')');
                m.insert("marker", marker.to_string());
            }
            out.push(m);
        } else if let Some(v) = line.trim().strip_prefix("Version: ") {
            out.last_mut().unwrap().insert("version", v.to_string());
        } else if line.trim() == "Pinned: yes" {
            out.last_mut().unwrap().insert("pinned", "true".to_string());
        } else if let Some(r) = line.trim().strip_prefix("origin refspec: ") {
            out.last_mut().unwrap().insert("refspec", r.to_string());
        }
    }
    out
}

fn status_as_admin_fields(
    status: &serde_json::Value,
    flags: bool,
) -> Vec<BTreeMap<&'static str, String>> {
    status["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let mut m = BTreeMap::new();
            m.insert("stateroot", d["stateroot"].as_str().unwrap().to_string());
            m.insert("checksum", d["checksum"].as_str().unwrap().to_string());
            m.insert("serial", d["serial"].to_string());
            m.insert("pinned", d["pinned"].to_string());
            if let Some(v) = d["version"].as_str() {
                m.insert("version", v.to_string());
            }
            if let Some(r) = d["origin"]["refspec"].as_str() {
                m.insert("refspec", r.to_string());
            }
            if flags {
                m.insert("booted", d["booted"].to_string());
                let marker = if d["staged"] == true {
                    "staged"
                } else if d["pending"] == true {
                    "pending"
                } else if d["rollback"] == true {
                    "rollback"
                } else {
                    ""
                };
                m.insert("marker", marker.to_string());
            }
            m
        })
        .collect()
}

/// A throwaway GnuPG home with one signing key; its agent is stopped on drop.
struct GpgHome {
    home: PathBuf,
    key: String,
}

impl GpgHome {
    fn new(home: &Path, name: &str) -> Self {
        std::fs::create_dir_all(home).unwrap();
        std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let mut g = GpgHome {
            home: home.to_path_buf(),
            key: String::new(),
        };
        let out = g
            .gpg()
            .args(["--passphrase", "", "--quick-gen-key"])
            .arg(format!("{name} <test@cairn.invalid>"))
            .args(["ed25519", "sign", "never"])
            .output()
            .unwrap();
        assert!(out.status.success(), "gpg key: {}", text(&out));
        let out = g
            .gpg()
            .args(["--list-keys", "--with-colons"])
            .output()
            .unwrap();
        let listing = String::from_utf8(out.stdout).unwrap();
        g.key = listing
            .lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .map(|l| l.trim_matches(':').to_string())
            .expect("fingerprint");
        g
    }

    fn gpg(&self) -> Command {
        let mut c = Command::new("gpg");
        c.arg("--homedir")
            .arg(&self.home)
            .args(["--batch", "--pinentry-mode", "loopback"]);
        c
    }

    fn home_str(&self) -> &str {
        self.home.to_str().unwrap()
    }

    /// The public key, armored, for a remote's `gpgkeypath`.
    fn export(&self, to: &Path) {
        let out = self
            .gpg()
            .args(["--armor", "--export", &self.key])
            .output()
            .unwrap();
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{}",
            text(&out)
        );
        std::fs::write(to, out.stdout).unwrap();
    }
}

impl Drop for GpgHome {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn upgrade_shows_the_change_and_status_agrees_with_stock_ostree() {
    let fx = Fixture::new();
    assert_eq!(fx.versions(), ["1.0"]);
    let out = fx.run(&["upgrade", "--unchanged-exit-77"], &[]);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));

    let mut t = Tree::new("2.0", 2);
    t.packages = &["bash=5.2.15-2+b2", "jq=1.6-2.1", "systemd=252.39-1~deb12u1"];
    let v2 = fx.commit(REF, &t);

    let check = fx.ok(&["upgrade", "--check"]);
    assert!(check.contains("1.0") && check.contains("2.0"), "{check}");
    assert!(check.contains("1 upgraded, 1 added"), "{check}");
    assert_eq!(fx.versions(), ["1.0"], "--check must not deploy");

    let up = fx.ok(&["upgrade"]);
    assert!(up.contains("1 upgraded, 1 added"), "{up}");
    assert!(
        up.contains("upgraded   systemd 252.38-1~deb12u1 -> 252.39-1~deb12u1"),
        "{up}"
    );
    assert_eq!(fx.versions(), ["2.0", "1.0"]);
    fx.assert_bootable();

    let status = fx.status();
    assert_eq!(status["apiVersion"], "cairn.status/v1");
    let d = &status["deployments"];
    assert_eq!(d[0]["checksum"], v2.as_str());
    assert_eq!(d[0]["origin"]["refspec"], REFSPEC);
    assert_eq!(d[1]["rollback"], true);
    assert_eq!(d[0]["timestamp"], "2026-11-18T11:40:00Z");
    // The rollback's diff is against the default (v2): the reverse change.
    assert_eq!(d[1]["packageDiff"]["downgraded"][0]["name"], "systemd");
    assert_eq!(d[1]["packageDiff"]["removed"][0]["name"], "jq");
    assert_eq!(
        status_as_admin_fields(&status, false),
        parse_admin_status(&fx.ostree_admin_status(), false),
        "host status --json vs ostree admin status"
    );
    let human = fx.ok(&["status"]);
    assert!(human.contains(&format!("Commit: {v2}.0")), "{human}");
    assert!(human.contains("Diff: 1 downgraded, 1 removed"), "{human}");
    let booted = fx.ok(&["status", "--json", "--booted"]);
    let booted: serde_json::Value = serde_json::from_str(&booted).unwrap();
    assert_eq!(booted["deployments"].as_array().unwrap().len(), 1);

    let again = fx.run(&["upgrade", "--unchanged-exit-77"], &[]);
    assert_eq!(again.status.code(), Some(77), "{}", text(&again));
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn rollback_twice_goes_back() {
    let fx = Fixture::new();
    fx.commit(REF, &Tree::new("2.0", 2));
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions(), ["2.0", "1.0"]);
    let out = fx.ok(&["rollback"]);
    assert!(out.contains("1.0"), "{out}");
    assert_eq!(fx.versions(), ["1.0", "2.0"]);
    fx.assert_bootable();
    fx.ok(&["rollback"]);
    assert_eq!(fx.versions(), ["2.0", "1.0"]);
    fx.assert_bootable();
    assert_eq!(
        status_as_admin_fields(&fx.status(), false),
        parse_admin_status(&fx.ostree_admin_status(), false)
    );
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn deploy_by_version_and_downgrades_only_when_allowed() {
    let fx = Fixture::new();
    let v2 = fx.commit(REF, &Tree::new("2.0", 2));
    fx.commit(REF, &Tree::new("3.0", 3));
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions(), ["3.0", "1.0"]);

    let out = fx.ok(&["deploy", "2.0"]);
    assert!(out.contains("3.0") && out.contains("2.0"), "{out}");
    let status = fx.status();
    assert_eq!(status["deployments"][0]["checksum"], v2.as_str());
    assert_eq!(
        status["deployments"][0]["origin"]["overrideCommit"],
        v2.as_str()
    );
    fx.assert_bootable();
    let err = fx.fails(&["deploy", "9.9"]);
    assert!(
        err.contains("no commit with version or checksum `9.9`"),
        "{err}"
    );

    // Upgrading follows the ref head again.
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions()[0], "3.0");
    // By checksum prefix.
    fx.ok(&["deploy", &v2[..12]]);
    assert_eq!(fx.versions()[0], "2.0");
    fx.ok(&["upgrade"]);

    // The server publishes an older commit (timestamp before 3.0).
    let mut old = Tree::new("0.9", 0);
    old.time = T0;
    fx.commit(REF, &old);
    let err = fx.fails(&["upgrade"]);
    assert!(err.contains("refusing to downgrade"), "{err}");
    assert_eq!(fx.versions()[0], "3.0");
    fx.ok(&["upgrade", "--allow-downgrade"]);
    assert_eq!(fx.versions()[0], "0.9");
    fx.assert_bootable();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn switch_pin_and_cleanup() {
    let fx = Fixture::new();
    let green = fx.commit("cairn/green", &Tree::new("green-1", 2));
    let err = fx.fails(&["switch", "cairn:cairn/nosuch"]);
    assert!(err.contains("cairn:cairn/nosuch"), "{err}");
    let err = fx.fails(&["switch", "elsewhere:cairn/green"]);
    assert!(
        err.contains("remote `elsewhere` is not configured"),
        "{err}"
    );
    assert_eq!(fx.versions(), ["1.0"]);

    fx.ok(&["switch", "cairn:cairn/green"]);
    let status = fx.status();
    assert_eq!(status["deployments"][0]["checksum"], green.as_str());
    assert_eq!(
        status["deployments"][0]["origin"]["refspec"],
        "cairn:cairn/green"
    );
    fx.assert_bootable();

    // Pin the old blue deployment; two upgrades later it is still there.
    fx.ok(&["pin", "1"]);
    fx.commit("cairn/green", &Tree::new("green-2", 3));
    fx.ok(&["upgrade"]);
    fx.commit("cairn/green", &Tree::new("green-3", 4));
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions(), ["green-3", "green-2", "1.0"]);
    assert_eq!(fx.status()["deployments"][2]["pinned"], true);
    assert_eq!(
        status_as_admin_fields(&fx.status(), false),
        parse_admin_status(&fx.ostree_admin_status(), false)
    );

    let out = fx.ok(&["cleanup", "-r"]);
    assert!(out.contains("Keeping pinned deployment 2"), "{out}");
    assert_eq!(fx.versions(), ["green-3", "1.0"]);
    fx.ok(&["pin", "1", "--unpin"]);
    fx.ok(&["cleanup", "--rollback"]);
    assert_eq!(fx.versions(), ["green-3"]);
    fx.assert_bootable();
    let err = fx.fails(&["pin", "5"]);
    assert!(err.contains("no deployment 5"), "{err}");
    let err = fx.fails(&["rollback"]);
    assert!(err.contains("no rollback deployment"), "{err}");
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn kargs_make_a_new_deployment_of_the_same_commit() {
    let fx = Fixture::new();
    let before = fx.status();
    fx.ok(&[
        "kargs",
        "--append",
        "quiet",
        "--replace",
        "root=LABEL=other",
    ]);
    let after = fx.status();
    let d = &after["deployments"];
    assert_eq!(d.as_array().unwrap().len(), 2);
    assert_eq!(d[0]["checksum"], before["deployments"][0]["checksum"]);
    let args: Vec<&str> = d[0]["kernelArgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"quiet") && args.contains(&"root=LABEL=other"),
        "{args:?}"
    );
    let printed = fx.ok(&["kargs"]);
    assert!(printed.contains("quiet"), "{printed}");
    let err = fx.fails(&["kargs", "--delete", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    fx.assert_bootable();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn download_only_then_deploy_without_the_network() {
    let fx = Fixture::new();
    fx.commit(REF, &Tree::new("2.0", 2));
    let out = fx.ok(&["upgrade", "--download-only"]);
    assert!(out.contains("Downloaded 2.0"), "{out}");
    assert_eq!(fx.versions(), ["1.0"]);
    // The server goes away; the download is already local.
    std::fs::rename(fx.src_path(), fx.dir.path().join("src-gone")).unwrap();
    let err = fx.fails(&["upgrade"]);
    assert!(err.contains("pulling"), "{err}");
    fx.ok(&["upgrade", "--cache-only"]);
    assert_eq!(fx.versions(), ["2.0", "1.0"]);
    fx.assert_bootable();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn corrupt_object_and_unreachable_server_leave_deployments_untouched() {
    let fx = Fixture::new();
    let before = fx.status();
    let mut t = Tree::new("2.0", 2);
    t.hello = "a brand new file body that is not in v1";
    fx.commit(REF, &t);
    // Replace every content object of the source repo that v1 did not have
    // with the body of another (valid) object: the checksum no longer matches.
    let objects = fx.src_path().join("objects");
    let mut new_objects = Vec::new();
    let mut old_object = None;
    for dir in std::fs::read_dir(&objects).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "filez") {
                let in_sysroot = fx
                    .sysroot()
                    .join("ostree/repo/objects")
                    .join(p.parent().unwrap().file_name().unwrap())
                    .join(p.file_name().unwrap())
                    .with_extension("file")
                    .exists();
                if in_sysroot {
                    old_object = Some(p);
                } else {
                    new_objects.push(p);
                }
            }
        }
    }
    let donor = std::fs::read(old_object.unwrap()).unwrap();
    for p in &new_objects {
        std::fs::write(p, &donor).unwrap();
    }
    let corrupted = new_objects.len();
    assert!(corrupted > 0);
    let err = fx.fails(&["upgrade"]);
    assert!(err.contains("pulling cairn:"), "{err}");
    assert_eq!(fx.status(), before);
    fx.assert_bootable();

    // An unreachable server.
    let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(fx.sysroot())));
    sysroot.load(gio::Cancellable::NONE).unwrap();
    let repo = sysroot.repo();
    repo.remote_delete("cairn", gio::Cancellable::NONE).unwrap();
    let opts = glib::VariantDict::new(None);
    opts.insert("gpg-verify", false);
    repo.remote_add(
        "cairn",
        Some("http://127.0.0.1:9/repo"),
        Some(&opts.end()),
        gio::Cancellable::NONE,
    )
    .unwrap();
    let err = fx.fails(&["upgrade"]);
    assert!(err.contains("http://127.0.0.1:9/repo"), "{err}");
    assert_eq!(fx.status(), before);
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn unsigned_or_wrongly_signed_commits_are_refused() {
    let fx = Fixture::build(true, None);
    assert_eq!(fx.versions(), ["1.0"]);
    let g = fx.gnupg.as_ref().unwrap();

    fx.commit(REF, &Tree::new("2.0", 2));
    let err = fx.fails(&["upgrade"]);
    assert!(err.contains("GPG") || err.contains("signature"), "{err}");
    assert_eq!(fx.versions(), ["1.0"]);

    let other = GpgHome::new(&fx.dir.path().join("gnupg-other"), "someone else");
    let v3 = fx.commit(REF, &Tree::new("3.0", 3));
    fx.src
        .sign_commit(
            &v3,
            &other.key,
            Some(other.home_str()),
            gio::Cancellable::NONE,
        )
        .unwrap();
    let err = fx.fails(&["upgrade"]);
    assert!(
        err.contains("GPG") || err.contains("signature") || err.contains("key"),
        "{err}"
    );
    assert_eq!(fx.versions(), ["1.0"]);

    let v4 = fx.commit(REF, &Tree::new("4.0", 4));
    fx.src
        .sign_commit(&v4, &g.key, Some(g.home_str()), gio::Cancellable::NONE)
        .unwrap();
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions(), ["4.0", "1.0"]);
    fx.assert_bootable();
    // Status names the signer, verified against the remote's keys.
    let st = fx.status();
    let sig = &st["deployments"][0]["signature"];
    assert_eq!(sig["trusted"], true, "{st:#}");
    assert!(
        g.key.ends_with(sig["fingerprint"].as_str().unwrap())
            || sig["fingerprint"].as_str().unwrap().ends_with(&g.key),
        "{st:#}"
    );
    assert_eq!(sig["user"], "cairn test", "{st:#}");
    let text = fx.ok(&["status"]);
    assert!(text.contains("Signed by: cairn test ("), "{text}");

    // Signed summaries: the remote now also verifies the summary.
    let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(fx.sysroot())));
    sysroot.load(gio::Cancellable::NONE).unwrap();
    let repo = sysroot.repo();
    let url = repo.remote_get_url("cairn").unwrap();
    let key = repo
        .remote_option("cairn", "gpgkeypath", None)
        .unwrap()
        .unwrap();
    repo.remote_delete("cairn", gio::Cancellable::NONE).unwrap();
    let opts = glib::VariantDict::new(None);
    opts.insert("gpg-verify", true);
    opts.insert("gpg-verify-summary", true);
    opts.insert("gpgkeypath", key.as_str());
    repo.remote_add(
        "cairn",
        Some(&url),
        Some(&opts.end()),
        gio::Cancellable::NONE,
    )
    .unwrap();
    let sign = |c: &str| {
        fx.src
            .sign_commit(c, &g.key, Some(g.home_str()), gio::Cancellable::NONE)
            .unwrap()
    };
    let v5 = fx.commit(REF, &Tree::new("5.0", 5));
    sign(&v5);
    let published = fx.publish(&["--gpg-sign", &g.key, "--gpg-homedir", g.home_str()]);
    assert!(published.contains("signed"), "{published}");
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions()[0], "5.0");
    let v6 = fx.commit(REF, &Tree::new("6.0", 6));
    sign(&v6);
    fx.publish(&[]);
    let err = fx.fails(&["upgrade"]);
    assert!(err.contains("summary") || err.contains("GPG"), "{err}");
    assert_eq!(fx.versions()[0], "5.0");

    // A tampered summary: a good signature of the previous summary next to
    // a summary that names another head.
    fx.publish(&["--gpg-sign", &g.key, "--gpg-homedir", g.home_str()]);
    let sig = std::fs::read(fx.src_path().join("summary.sig")).unwrap();
    let v7 = fx.commit(REF, &Tree::new("7.0", 7));
    sign(&v7);
    fx.publish(&[]);
    std::fs::write(fx.src_path().join("summary.sig"), sig).unwrap();
    let before = fx.status();
    let err = fx.fails(&["upgrade"]);
    assert!(
        err.contains("summary") || err.contains("GPG") || err.contains("signature"),
        "{err}"
    );
    assert_eq!(fx.status(), before, "nothing staged, nothing moved");
}

/// A release key made by `host compose keygen DIR`: its home, fingerprint
/// and armored public key.
struct ReleaseKey {
    home: PathBuf,
    fingerprint: String,
    public: Vec<u8>,
}

impl ReleaseKey {
    fn new(dir: &Path, name: &str) -> Self {
        let out = host()
            .args(["compose", "keygen", "--name", name])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "keygen: {}", text(&out));
        let fingerprint = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("fingerprint "))
            .expect("keygen prints the fingerprint")
            .to_string();
        let public = std::fs::read(dir.join("cairn-release.asc")).unwrap();
        ReleaseKey {
            home: dir.to_path_buf(),
            fingerprint,
            public,
        }
    }

    fn sign(&self, repo: &ostree::Repo, commit: &str) {
        repo.sign_commit(
            commit,
            &self.fingerprint,
            Some(self.home.to_str().unwrap()),
            gio::Cancellable::NONE,
        )
        .unwrap();
    }

    /// The tree file that makes a tree trust this key.
    fn shipped(&self) -> (String, Vec<u8>) {
        (
            format!(
                "{}/{}.asc",
                cairn_contracts::trust::TRUSTED_KEYS_DIR,
                self.fingerprint
            ),
            self.public.clone(),
        )
    }
}

impl Drop for ReleaseKey {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--kill", "all"])
            .output();
    }
}

/// Issue #14: trust follows the OS version. The image trusts key A (the
/// remote's keyring, as `compose image --trust` writes it); a tree shipping
/// A, then one signed by A shipping B, rotate the node to B: afterwards A is
/// refused, B accepted, nothing staged by the refusal.
/// A node config's `[update] url` (what `host test upgrade` provisions):
/// the remote fetches from the new URL and verifies exactly as before.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn a_new_remote_url_keeps_the_remotes_signature_checks() {
    let fx = Fixture::build(true, None);
    let target = cairn_updater::SysrootTarget::from_option(Some(fx.sysroot()));
    let open = || {
        let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(fx.sysroot())));
        sysroot.load(gio::Cancellable::NONE).unwrap();
        sysroot.repo()
    };
    let repo = open();
    let url = repo.remote_get_url("cairn").unwrap().to_string();
    let key = repo.remote_option("cairn", "gpgkeypath", None).unwrap();
    assert!(key.is_some());

    let before =
        cairn_updater::set_remote_url(&target, "cairn", "http://127.0.0.1:9/repo").unwrap();
    assert_eq!(before, url);
    let repo = open();
    assert_eq!(
        repo.remote_get_url("cairn").unwrap(),
        "http://127.0.0.1:9/repo"
    );
    assert!(repo.remote_get_gpg_verify("cairn").unwrap());
    assert_eq!(
        repo.remote_option("cairn", "gpgkeypath", None).unwrap(),
        key
    );
    let err =
        cairn_updater::set_remote_url(&target, "elsewhere", "http://127.0.0.1:9/").unwrap_err();
    assert!(
        format!("{err:#}").contains("remote `elsewhere` is not configured"),
        "{err:#}"
    );

    // Back on the real URL, an unsigned commit is still refused and a
    // signed one still deploys.
    cairn_updater::set_remote_url(&target, "cairn", &url).unwrap();
    fx.commit(REF, &Tree::new("2.0-unsigned", 2));
    let err = fx.fails(&["upgrade"]);
    assert!(err.contains("GPG") || err.contains("signature"), "{err}");
    let v3 = fx.commit(REF, &Tree::new("3.0", 3));
    let g = fx.gnupg.as_ref().unwrap();
    fx.src
        .sign_commit(&v3, &g.key, Some(g.home_str()), gio::Cancellable::NONE)
        .unwrap();
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions(), ["3.0", "1.0"]);
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn trusted_keys_follow_the_deployment_and_rotate_from_a_to_b() {
    let fx = Fixture::build(false, None);
    let a = ReleaseKey::new(&fx.dir.path().join("key-a"), "key a");
    let b = ReleaseKey::new(&fx.dir.path().join("key-b"), "key b");
    assert_ne!(a.fingerprint, b.fingerprint);

    // The node's remote as the image writer makes it: verifying, key A in
    // the remote's keyring, no gpgkeypath.
    let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(fx.sysroot())));
    sysroot.load(gio::Cancellable::NONE).unwrap();
    let repo = sysroot.repo();
    let url = repo.remote_get_url("cairn").unwrap();
    repo.remote_delete("cairn", gio::Cancellable::NONE).unwrap();
    let opts = glib::VariantDict::new(None);
    opts.insert("gpg-verify", true);
    opts.insert("gpg-verify-summary", false);
    repo.remote_add(
        "cairn",
        Some(&url),
        Some(&opts.end()),
        gio::Cancellable::NONE,
    )
    .unwrap();
    let stream = gio::MemoryInputStream::from_bytes(&glib::Bytes::from(&a.public));
    let n = repo
        .remote_gpg_import(
            "cairn",
            Some(&stream),
            &[a.fingerprint.as_str()],
            gio::Cancellable::NONE,
        )
        .unwrap();
    assert_eq!(n, 1);
    let keyring = fx.sysroot().join("ostree/repo/cairn.trustedkeys.gpg");
    let image_keyring = std::fs::read(&keyring).unwrap();
    drop(repo);
    drop(sysroot);

    let tree = |version, n, keys: &[&ReleaseKey]| {
        let mut t = Tree::new(version, n);
        t.files = keys.iter().map(|k| k.shipped()).collect();
        t
    };

    // v1 (the deployed one) ships no key: the image's keyring (A) stays.
    let v11 = fx.commit(REF, &tree("1.1", 2, &[&a]));
    a.sign(&fx.src, &v11);
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions(), ["1.1", "1.0"]);
    assert_eq!(std::fs::read(&keyring).unwrap(), image_keyring);

    // v2 signed by A ships B: accepted (verified with v1.1's key, A).
    let v2 = fx.commit(REF, &tree("2.0", 3, &[&b]));
    a.sign(&fx.src, &v2);
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions(), ["2.0", "1.1"]);
    // Status judges with the keys updates now follow (v2's: B). v2 still
    // names its signer, A, no longer trusted for an update.
    let st = fx.status();
    let sig = &st["deployments"][0]["signature"];
    assert_eq!(sig["trusted"], false, "{st:#}");
    assert!(
        a.fingerprint
            .ends_with(sig["fingerprint"].as_str().unwrap()),
        "{st:#}"
    );
    let text = fx.ok(&["status"]);
    assert!(
        text.contains(&format!("Signature: {} (NOT trusted", a.fingerprint)),
        "{text}"
    );

    // v3 signed by A: refused now that updates follow v2 (trusts B only).
    let before = fx.status();
    let v3 = fx.commit(REF, &tree("3.0", 4, &[&b]));
    a.sign(&fx.src, &v3);
    let err = fx.fails(&["upgrade"]);
    assert!(
        err.contains(&b.fingerprint),
        "names the keys it trusts: {err}"
    );
    assert!(
        err.contains("GPG") || err.contains("signature") || err.contains("key"),
        "{err}"
    );
    assert_eq!(fx.status(), before, "nothing staged, nothing moved");
    let err = fx.fails(&["upgrade", "--check"]);
    assert!(err.contains(&b.fingerprint), "{err}");

    // v3' signed by B: accepted.
    let v3b = fx.commit(REF, &tree("3.1", 5, &[&b]));
    b.sign(&fx.src, &v3b);
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions()[0], "3.1");
    let st = fx.status();
    let sig = &st["deployments"][0]["signature"];
    assert_eq!(sig["trusted"], true, "{st:#}");
    assert!(
        b.fingerprint
            .ends_with(sig["fingerprint"].as_str().unwrap()),
        "{st:#}"
    );
    fx.assert_bootable();

    // A tree shipping a key file that is a symlink out of it: the update
    // that follows it is refused before anything is fetched.
    let csum = fx.status()["deployments"][0]["checksum"]
        .as_str()
        .unwrap()
        .to_string();
    let deployment = std::fs::read_dir(fx.sysroot().join("ostree/deploy/cairn/deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().starts_with(&csum))
        .expect("the deployment of 3.1");
    let key_file = deployment.join(b.shipped().0);
    let saved = std::fs::read(&key_file).unwrap();
    let outside = fx.dir.path().join("outside.asc");
    std::fs::write(&outside, &a.public).unwrap();
    std::fs::remove_file(&key_file).unwrap();
    std::os::unix::fs::symlink(&outside, &key_file).unwrap();
    let err = fx.fails(&["upgrade", "--check"]);
    assert!(err.contains("symlink"), "{err}");
    std::fs::remove_file(&key_file).unwrap();
    std::fs::write(&key_file, saved).unwrap();
}

/// Umounts the tmpfs /boot of a fixture.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn full_boot_is_refused_before_anything_is_written() {
    let fx = Fixture::build(false, Some("256k"));
    let _umount = Unmount(fx.sysroot().join("boot"));
    let before = fx.status();
    let mut t = Tree::new("2.0", 2);
    t.kernel = (0..400 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    fx.commit(REF, &t);
    let err = fx.fails(&["upgrade"]);
    assert!(err.contains("not enough space in"), "{err}");
    assert!(err.contains("host cleanup -r"), "{err}");
    assert_eq!(fx.status(), before);
    fx.assert_bootable();
    // A small kernel fits.
    fx.commit(REF, &Tree::new("3.0", 3));
    fx.ok(&["upgrade"]);
    assert_eq!(fx.versions()[0], "3.0");
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn a_second_operation_waits_for_the_sysroot_lock() {
    let fx = Fixture::new();
    fx.commit(REF, &Tree::new("2.0", 2));
    let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(fx.sysroot())));
    sysroot.load(gio::Cancellable::NONE).unwrap();
    sysroot.lock().unwrap();
    let mut child = host()
        .args(["upgrade", "--sysroot"])
        .arg(fx.sysroot())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("Waiting for the sysroot lock"), "{first}");
    assert_eq!(
        fx.versions(),
        ["1.0"],
        "nothing happens while the lock is held"
    );
    sysroot.unlock();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert_eq!(fx.versions(), ["2.0", "1.0"]);
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn sigkill_at_every_step_leaves_a_bootable_sysroot() {
    let fx = Fixture::new();
    let v1 = fx.status()["deployments"][0]["checksum"].clone();
    for (n, (point, switched)) in (2..).zip([
        ("pull::after-pull", false),
        ("deploy::before-write", false),
        ("deploy::after-deploy-tree", false),
        ("deploy::after-bootloader-swap", true),
    ]) {
        let csum = fx.commit(REF, &Tree::new(&format!("{n}.0"), n));
        let before = fx.status()["deployments"][0]["checksum"].clone();
        let out = fx.run(
            &["upgrade"],
            &[("FAILPOINTS", &format!("{point}=return(kill)"))],
        );
        assert_eq!(out.status.signal(), Some(9), "{point}: {}", text(&out));
        fx.assert_bootable();
        let now = fx.status()["deployments"][0]["checksum"].clone();
        if switched {
            assert_eq!(now, csum.as_str(), "{point}");
        } else {
            assert_eq!(now, before, "{point}");
        }
        // The next run completes the job (or finds it done).
        let out = fx.run(&["upgrade"], &[]);
        assert!(out.status.success(), "after {point}: {}", text(&out));
        assert_eq!(fx.status()["deployments"][0]["checksum"], csum.as_str());
        fx.assert_bootable();
    }

    for point in ["rollback::before-write", "rollback::after-write"] {
        let out = fx.run(
            &["rollback"],
            &[("FAILPOINTS", &format!("{point}=return(kill)"))],
        );
        assert_eq!(out.status.signal(), Some(9), "{point}: {}", text(&out));
        fx.assert_bootable();
    }
    let out = fx.run(
        &["cleanup", "-r"],
        &[("FAILPOINTS", "cleanup::before-write=panic")],
    );
    assert!(!out.status.success(), "{}", text(&out));
    fx.assert_bootable();
    let out = fx.run(
        &["cleanup", "-r"],
        &[("FAILPOINTS", "cleanup::before-prune=return(kill)")],
    );
    assert_eq!(out.status.signal(), Some(9), "{}", text(&out));
    fx.assert_bootable();
    fx.ok(&["cleanup"]);
    fx.assert_bootable();
    assert_ne!(fx.status()["deployments"][0]["checksum"], v1);
}

/// The sysroot as a cairn disk image has it: `sysroot.bootloader=grub2`,
/// `/boot/grub/grub.cfg -> ../loader/grub.cfg`, an empty environment block,
/// and the first menu written from the first deployment's entry.
fn make_grub_disk(fx: &Fixture) {
    use cairn_builder::image::{deploy::prepare_boot_for_grub, grub};
    let sysroot = fx.sysroot();
    prepare_boot_for_grub(&sysroot.join("boot")).unwrap();
    grub::generate(&sysroot.join("boot/loader/grub.cfg")).unwrap();
    let repo = ostree::Repo::new_for_path(sysroot.join("ostree/repo"));
    repo.open(gio::Cancellable::NONE).unwrap();
    let config = repo.copy_config();
    config.set_string("sysroot", "bootloader", "grub2");
    repo.write_config(&config).unwrap();
}

/// A build machine's environment: no `OSTREE_GRUB2_EXEC`, and neither the
/// tree's generator nor grub-mkconfig within reach (libostree's default is
/// the absolute /usr/sbin/grub-mkconfig, run chrooted in the new deployment,
/// which the synthetic trees lack, as a cairn tree does).
fn run_offline(fx: &Fixture, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let empty = fx.dir.path().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let mut cmd = host();
    cmd.args(args)
        .arg("--sysroot")
        .arg(fx.sysroot())
        .env_remove("OSTREE_GRUB2_EXEC")
        .env("PATH", &empty);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The deployment each entry of the GRUB menu GRUB would read boots (its
/// `ostree=` argument, a link through `ostree/boot.N`, resolved).
fn menu_deployments(fx: &Fixture) -> Vec<PathBuf> {
    let cfg_path = fx.sysroot().join("boot/grub/grub.cfg");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(
        cfg.starts_with("# Written by cairn's GRUB generator"),
        "{}:\n{cfg}",
        cfg_path.display()
    );
    cfg.lines()
        .filter(|l| l.trim_start().starts_with("linux "))
        .map(|l| {
            l.split_whitespace()
                .find_map(|a| a.strip_prefix("ostree="))
                .unwrap_or_else(|| panic!("no ostree= in {l}"))
        })
        .map(|a| std::fs::canonicalize(fx.sysroot().join(a.trim_start_matches('/'))).unwrap())
        .collect()
}

/// What a failed operation must leave as it was: the names under /boot (two
/// levels: loader dirs, kernels), the deployment dirs, the `ostree/boot.*`
/// links, and the menu.
fn disk_state(fx: &Fixture) -> Vec<String> {
    let sysroot = fx.sysroot();
    let mut names = Vec::new();
    let mut list = |dir: &Path, depth: usize| {
        for e in walk(dir, depth) {
            names.push(e.strip_prefix(&sysroot).unwrap().display().to_string());
        }
    };
    list(&sysroot.join("boot"), 3);
    list(&sysroot.join("ostree/deploy/cairn/deploy"), 1);
    list(&sysroot.join("ostree"), 1);
    names.sort();
    names.push(std::fs::read_to_string(sysroot.join("boot/grub/grub.cfg")).unwrap());
    names.push(
        String::from_utf8_lossy(&std::fs::read(sysroot.join("boot/grub/grubenv")).unwrap()).into(),
    );
    names
}

fn walk(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if depth > 1 && e.file_type().unwrap().is_dir() {
            out.extend(walk(&p, depth - 1));
        }
        out.push(p);
    }
    out
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn offline_servicing_of_a_grub_disk_from_a_machine_without_the_generator() {
    let fx = Fixture::new();
    make_grub_disk(&fx);
    let sysroot = fx.sysroot().display().to_string();
    let deployment = |i: usize| std::fs::canonicalize(fx.deployment_dir(i)).unwrap();
    // The point: this machine is not a cairn node.
    assert!(!Path::new(cairn_contracts::grub::GENERATOR_PATH).exists());

    fx.commit(REF, &Tree::new("2.0", 2));
    let loader = || std::fs::read_link(fx.sysroot().join("boot/loader")).unwrap();
    let old_loader = loader();
    let out = run_offline(&fx, &["upgrade"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fx.versions(), ["2.0", "1.0"]);
    // libostree's grub2 backend ran the generator: the menu of the new
    // loader dir lists the new deployment first and keeps the old one.
    assert_ne!(loader(), old_loader, "the loader was not swapped");
    assert_eq!(menu_deployments(&fx), [deployment(0), deployment(1)]);
    let env = cairn_contracts::grub::GrubEnv::read(&fx.sysroot().join("boot/grub/grubenv"));
    assert_eq!(env.unwrap().get("boot_counter"), Some("3"), "armed");
    fx.assert_bootable();

    let out = run_offline(&fx, &["rollback"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fx.versions(), ["1.0", "2.0"]);
    assert_eq!(menu_deployments(&fx), [deployment(0), deployment(1)]);

    // Forced failures after the new deployment dir is written: a generator
    // that fails (so libostree's boot configuration write fails), and an
    // error right after deploy_tree. Nothing may be left behind.
    let failing = fx.dir.path().join("failing-generator");
    std::fs::write(&failing, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).unwrap();
    fx.commit(REF, &Tree::new("3.0", 3));
    let failing = failing.to_str().unwrap();
    for (envs, says) in [
        (
            ("OSTREE_GRUB2_EXEC", failing),
            format!("writing the new boot configuration in {sysroot}/boot"),
        ),
        (
            ("FAILPOINTS", "deploy::after-deploy-tree=return"),
            "failpoint deploy::after-deploy-tree triggered".to_string(),
        ),
    ] {
        let before = disk_state(&fx);
        let out = run_offline(&fx, &["upgrade"], &[envs]);
        assert_eq!(out.status.code(), Some(1), "{envs:?}: {}", text(&out));
        assert!(text(&out).contains(&says), "{envs:?}: {}", text(&out));
        assert_eq!(disk_state(&fx), before, "{envs:?}: {}", text(&out));
        assert_eq!(fx.versions(), ["1.0", "2.0"]);
        fx.assert_bootable();
    }

    // And the disk takes the next upgrade.
    let out = run_offline(&fx, &["upgrade"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fx.versions(), ["3.0", "1.0"]);
    assert_eq!(menu_deployments(&fx), [deployment(0), deployment(1)]);
    fx.assert_bootable();
}

#[test]
fn mutating_commands_need_root_and_say_so() {
    if nix::unistd::Uid::effective().is_root() {
        // Checked as an unprivileged user only; as root there is nothing to show.
        let out = host()
            .args(["upgrade", "--sysroot", "/nonexistent-sysroot"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("/nonexistent-sysroot"), "{err}");
        return;
    }
    let out = host()
        .args(["upgrade", "--sysroot", "/nonexistent-sysroot"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
}

/// A static-file HTTP server on 127.0.0.1 for the source repo: counts body
/// bytes and requests, and can cut the connection on object requests (a
/// network failure in the middle of a pull).
struct HttpServer {
    port: u16,
    state: std::sync::Arc<std::sync::Mutex<ServerState>>,
}

#[derive(Default)]
struct ServerState {
    bytes: u64,
    /// Paths served with 200, in order.
    served: Vec<String>,
    /// Serve this many more object requests, then drop the connection on each.
    objects_left: Option<usize>,
}

impl HttpServer {
    fn start(root: PathBuf) -> Self {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(std::sync::Mutex::new(ServerState::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let root = root.clone();
                let st = st.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut byte = [0u8; 1];
                    while !buf.ends_with(b"\r\n\r\n") {
                        if conn.read(&mut byte).unwrap_or(0) == 0 {
                            return;
                        }
                        buf.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let rel = path.trim_start_matches("/repo/");
                    {
                        let mut s = st.lock().unwrap();
                        if rel.starts_with("objects/") {
                            match s.objects_left {
                                Some(0) => return, // connection dropped, no reply
                                Some(n) => s.objects_left = Some(n - 1),
                                None => {}
                            }
                        }
                    }
                    match std::fs::read(root.join(rel)) {
                        Ok(body) => {
                            let _ = write!(
                                conn,
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = conn.write_all(&body);
                            let mut s = st.lock().unwrap();
                            s.bytes += body.len() as u64;
                            s.served.push(rel.to_string());
                        }
                        Err(_) => {
                            let _ = conn.write_all(
                                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            );
                        }
                    }
                });
            }
        });
        HttpServer { port, state }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/repo", self.port)
    }
}

impl Fixture {
    /// `host compose publish --repo SRC EXTRA…`.
    fn publish(&self, extra: &[&str]) -> String {
        let out = host()
            .args(["compose", "publish", "--repo"])
            .arg(self.src_path())
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "publish: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Point the sysroot's remote `cairn` at `url`.
    fn set_remote_url(&self, url: &str) {
        let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(self.sysroot())));
        sysroot.load(gio::Cancellable::NONE).unwrap();
        let repo = sysroot.repo();
        repo.remote_delete("cairn", gio::Cancellable::NONE).unwrap();
        let opts = glib::VariantDict::new(None);
        opts.insert("gpg-verify", false);
        repo.remote_add(
            "cairn",
            Some(url),
            Some(&opts.end()),
            gio::Cancellable::NONE,
        )
        .unwrap();
    }
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn http_pull_resumes_after_a_cut_and_uses_static_deltas() {
    let fx = Fixture::new();
    let server = HttpServer::start(fx.src_path());
    fx.set_remote_url(&server.url());
    let mut t = Tree::new("2.0", 2);
    t.extra = (0..40)
        .map(|i| {
            (
                format!("f{i}"),
                format!("file {i} ").repeat(2000).into_bytes(),
            )
        })
        .collect();
    fx.commit(REF, &t);
    // Object by object first (no delta), so the cut lands between objects.
    fx.publish(&["--no-deltas"]);
    let before = fx.status();

    // The connection drops after 10 objects: clear error, nothing deployed.
    server.state.lock().unwrap().objects_left = Some(10);
    let err = fx.fails(&["upgrade"]);
    assert!(err.contains(&server.url()), "{err}");
    assert_eq!(fx.status(), before);
    fx.assert_bootable();

    // Again with the network back: only what is missing is fetched.
    let first: Vec<String> = {
        let mut s = server.state.lock().unwrap();
        s.objects_left = None;
        std::mem::take(&mut s.served)
    };
    let first_objects: Vec<&String> = first.iter().filter(|p| p.starts_with("objects/")).collect();
    assert!(first_objects.len() >= 5, "{first:?}");
    let out = fx.ok(&["upgrade"]);
    assert!(out.contains("2.0"), "{out}");
    let second = std::mem::take(&mut server.state.lock().unwrap().served);
    for p in &first_objects {
        if p.ends_with(".filez") {
            assert!(!second.contains(p), "{p} fetched twice");
        }
    }
    assert_eq!(fx.versions(), ["2.0", "1.0"]);

    // One file changes; publish makes a delta; the node fetches it in a few requests.
    let mut t3 = Tree::new("3.0", 3);
    t3.extra = t.extra.clone();
    t3.extra[0].1 = b"changed".to_vec();
    fx.commit(REF, &t3);
    let published = fx.publish(&[]);
    assert!(published.contains("generated"), "{published}");
    server.state.lock().unwrap().bytes = 0;
    let out = fx.ok(&["upgrade"]);
    assert!(out.contains("via 1 static delta(s)"), "{out}");
    let s = server.state.lock().unwrap();
    assert!(
        s.served.iter().any(|p| p.starts_with("deltas/")),
        "{:?}",
        s.served
    );
    drop(s);
    assert_eq!(fx.versions()[0], "3.0");
    fx.assert_bootable();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn manifest_kernel_arguments_follow_upgrades_and_local_edits_stay() {
    let fx = Fixture::new();
    fx.ok(&["kargs", "--append", "local=1"]);
    let mut t = Tree::new("2.0", 2);
    t.kargs = &["rw", "console=ttyS1", "systemd.unified_cgroup_hierarchy=1"];
    fx.commit(REF, &t);
    let out = fx.ok(&["upgrade"]);
    assert!(
        out.contains("Kernel arguments (from the manifest)"),
        "{out}"
    );
    let status = fx.status();
    let args: Vec<&str> = status["deployments"][0]["kernelArgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .filter(|a| !a.starts_with("ostree="))
        .collect();
    assert_eq!(
        args,
        [
            "root=LABEL=root",
            "rw",
            "local=1",
            "console=ttyS1",
            "systemd.unified_cgroup_hierarchy=1"
        ]
    );
    // Same manifest arguments: libostree carries them over unchanged.
    let mut t3 = Tree::new("3.0", 3);
    t3.kargs = t.kargs;
    fx.commit(REF, &t3);
    let out = fx.ok(&["upgrade"]);
    assert!(!out.contains("Kernel arguments"), "{out}");
    let status = fx.status();
    assert_eq!(
        status["deployments"][0]["kernelArgs"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    fx.assert_bootable();
}

/// Enter the default deployment as if it were booted: a private mount and pid
/// namespace, the physical sysroot at /sysroot and /boot, the host's /usr (for
/// `host`, `ostree` and their libraries), a fresh /run with /run/ostree-booted,
/// then `chroot` into the deployment and run `script` with /bin/sh. libostree
/// then sees a booted system: `host` stages deployments, and `ostree admin
/// finalize-staged` does what ostree-finalize-staged.service does at shutdown.
/// The fixture directory is visible at the same path inside.
const BOOT_SIM: &str = r#"set -euo pipefail
S=$1; D=$2; HOST=$3; FX=$4
mount --make-rprivate /
mount --bind "$S" "$D/sysroot"
mount --bind "$S/boot" "$D/boot"
mount --bind /usr "$D/usr"
mount -t tmpfs tmpfs "$D/run"
touch "$D/run/ostree-booted"
cp "$HOST" "$D/run/host"
cp "$HOST-full" "$D/run/host-full"
cp "$HOST-monitor" "$D/run/host-monitor"
mount -t tmpfs tmpfs "$D/tmp"
mkdir -p "$D$FX"
mount --bind "$FX" "$D$FX"
mount --rbind /dev "$D/dev"
mount -t proc proc "$D/proc"
exec chroot "$D" /bin/sh -ec "$5"
"#;

impl Fixture {
    fn deployment_dir(&self, index: usize) -> PathBuf {
        let st = self.status();
        let d = &st["deployments"][index];
        self.sysroot().join(format!(
            "ostree/deploy/cairn/deploy/{}.{}",
            d["checksum"].as_str().unwrap(),
            d["serial"]
        ))
    }

    /// Run `script` inside the default deployment, booted (see BOOT_SIM).
    fn booted(&self, script: &str) -> Output {
        self.booted_command(script).output().unwrap()
    }

    fn booted_command(&self, script: &str) -> Command {
        let sim = self.dir.path().join("boot-sim.sh");
        std::fs::write(&sim, BOOT_SIM).unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--pid", "--fork", "bash"])
            .arg(&sim)
            .arg(self.sysroot())
            .arg(self.deployment_dir(0))
            .arg(env!("CARGO_BIN_EXE_host"))
            .arg(self.dir.path())
            .arg(script);
        cmd
    }

    fn read_json(&self, name: &str) -> serde_json::Value {
        let p = self.dir.path().join(name);
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    }
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn booted_upgrade_is_staged_and_keeps_etc_edits_made_before_the_reboot() {
    let fx = Fixture::new();
    let v2 = fx.commit(REF, &Tree::new("2.0", 2));
    let d = fx.dir.path().display().to_string();
    let out = fx.booted(&format!(
        "/run/host upgrade
         /run/host status > {d}/staged.txt
         /run/host status --json > {d}/staged.json
         ostree admin status > {d}/staged-admin.txt
         /run/host status --pending-exit-77 > /dev/null || echo pending=$? > {d}/pending.txt
         echo kept > /etc/edited-before-reboot
         ostree admin finalize-staged
         /run/host status --json > {d}/finalized.json"
    ));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Staged 2.0"), "{stdout}");

    let staged = fx.read_json("staged.json");
    assert_eq!(staged["isBooted"], true);
    let ds = &staged["deployments"];
    assert_eq!(ds[0]["checksum"], v2.as_str());
    assert_eq!(ds[0]["staged"], true);
    assert_eq!(ds[0]["pending"], true);
    assert_eq!(ds[1]["booted"], true);
    assert_eq!(staged["diffBaseIndex"], 1);
    let text_status = std::fs::read_to_string(fx.dir.path().join("staged.txt")).unwrap();
    assert!(
        text_status.contains("  0 cairn cairn:cairn/bookworm/x86_64/container-host (staged)"),
        "{text_status}"
    );
    assert!(text_status.contains("● 1 cairn"), "{text_status}");

    let admin = std::fs::read_to_string(fx.dir.path().join("staged-admin.txt")).unwrap();
    assert_eq!(
        status_as_admin_fields(&staged, true),
        parse_admin_status(&admin, true),
        "host status vs ostree admin status on the booted system:\n{admin}"
    );
    let pending = std::fs::read_to_string(fx.dir.path().join("pending.txt")).unwrap();
    assert_eq!(pending, "pending=77\n");
    let finalized = fx.read_json("finalized.json");
    assert_eq!(finalized["deployments"][0]["staged"], false);
    assert_eq!(finalized["deployments"][0]["pending"], true);
    // The edit made after staging is in the new deployment's /etc.
    let new_etc = fx.deployment_dir(0).join("etc/edited-before-reboot");
    assert_eq!(std::fs::read_to_string(&new_etc).unwrap(), "kept\n");
    assert_eq!(fx.versions(), ["2.0", "1.0"]);
    fx.assert_bootable();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn booted_upgrade_after_switch_follows_the_new_ref() {
    let fx = Fixture::new();
    let green = fx.commit("cairn/green", &Tree::new("green-1", 2));
    let d = fx.dir.path().display().to_string();
    // The second green commit appears between the switch and the upgrade:
    // the upgrade must find it on green, not go back to the booted ref.
    let script = format!(
        "/run/host switch cairn:cairn/green > {d}/switch.txt
         touch {d}/switched
         while [ ! -e {d}/green-2 ]; do sleep 0.1; done
         /run/host upgrade > {d}/upgrade.txt
         /run/host status --json > {d}/after.json"
    );
    let mut booted = fx
        .booted_command(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let switched = fx.dir.path().join("switched");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !switched.exists() && booted.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "switch never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    fx.commit("cairn/green", &Tree::new("green-2", 3));
    std::fs::write(fx.dir.path().join("green-2"), "").unwrap();
    let out = booted.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let switch = std::fs::read_to_string(fx.dir.path().join("switch.txt")).unwrap();
    assert!(
        switch.contains(&green[..12]) || switch.contains("green-1"),
        "{switch}"
    );
    let upgrade = std::fs::read_to_string(fx.dir.path().join("upgrade.txt")).unwrap();
    assert!(upgrade.contains("cairn:cairn/green"), "{upgrade}");
    let after = fx.read_json("after.json");
    let next = &after["deployments"][0];
    assert_eq!(next["version"], "green-2", "{after:#}");
    assert_eq!(next["origin"]["refspec"], "cairn:cairn/green");
    assert_eq!(next["staged"], true);
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn booted_rollback_drops_a_staged_deployment_loudly() {
    let fx = Fixture::new();
    fx.commit(REF, &Tree::new("2.0", 2));
    let d = fx.dir.path().display().to_string();
    let out = fx.booted(&format!(
        "/run/host upgrade
         /run/host upgrade --unchanged-exit-77 || echo unchanged=$? > {d}/again.txt
         /run/host rollback > {d}/rollback.txt
         /run/host status --json > {d}/after.json
         test ! -e /run/ostree/staged-deployment"
    ));
    assert!(out.status.success(), "{}", text(&out));
    let again = std::fs::read_to_string(fx.dir.path().join("again.txt")).unwrap();
    assert_eq!(again, "unchanged=77\n", "the staged commit is already next");
    let rollback = std::fs::read_to_string(fx.dir.path().join("rollback.txt")).unwrap();
    assert!(
        rollback.contains("WARNING: dropping the staged deployment 2.0"),
        "{rollback}"
    );
    let after = fx.read_json("after.json");
    let ds = after["deployments"].as_array().unwrap();
    assert_eq!(ds.len(), 1, "{after}");
    assert_eq!(ds[0]["booted"], true);
    assert_eq!(ds[0]["version"], "1.0");
    fx.assert_bootable();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn booted_cleanup_pending_and_kargs_over_a_staged_deployment() {
    let fx = Fixture::new();
    fx.commit(REF, &Tree::new("2.0", 2));
    let d = fx.dir.path().display().to_string();
    let out = fx.booted(&format!(
        "/run/host upgrade
         /run/host cleanup -p > {d}/cleanup.txt
         /run/host status --json > {d}/cleaned.json
         /run/host upgrade
         /run/host kargs --append quiet > {d}/kargs.txt
         /run/host status --json > {d}/kargs.json"
    ));
    assert!(out.status.success(), "{}", text(&out));
    let cleanup = std::fs::read_to_string(fx.dir.path().join("cleanup.txt")).unwrap();
    assert!(
        cleanup.contains("Removing pending deployment 0: 2.0"),
        "{cleanup}"
    );
    let cleaned = fx.read_json("cleaned.json");
    assert_eq!(cleaned["deployments"].as_array().unwrap().len(), 1);
    assert_eq!(cleaned["deployments"][0]["booted"], true);

    let kargs = std::fs::read_to_string(fx.dir.path().join("kargs.txt")).unwrap();
    assert!(kargs.contains("Restaging 2.0"), "{kargs}");
    let after = fx.read_json("kargs.json");
    let d0 = &after["deployments"][0];
    // The staged update is kept, with the new argument.
    assert_eq!(d0["staged"], true);
    assert_eq!(d0["version"], "2.0");
    assert!(
        d0["kernelArgs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "quiet"),
        "{d0}"
    );
    assert_eq!(after["deployments"][1]["booted"], true);
    fx.assert_bootable();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn booted_sigkill_while_staging_leaves_the_booted_default() {
    let fx = Fixture::new();
    fx.commit(REF, &Tree::new("2.0", 2));
    let d = fx.dir.path().display().to_string();
    let out = fx.booted(&format!(
        "for point in deploy::before-write deploy::after-stage; do
             FAILPOINTS=$point=return\\(kill\\) /run/host upgrade > /dev/null 2>&1 && exit 1
             /run/host status --json > {d}/$point.json
         done"
    ));
    assert!(out.status.success(), "{}", text(&out));
    let before = fx.read_json("deploy::before-write.json");
    assert_eq!(before["deployments"].as_array().unwrap().len(), 1);
    // Killed right after staging: the staged deployment is complete and would
    // be finalized at shutdown; the booted one is still the default on disk.
    let after = fx.read_json("deploy::after-stage.json");
    assert_eq!(after["deployments"][0]["staged"], true, "{after}");
    assert_eq!(after["deployments"][1]["booted"], true);
    assert_eq!(fx.versions(), ["1.0"]);
    fx.assert_bootable();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn booted_upgrade_refuses_a_head_older_than_the_staged_deployment() {
    let fx = Fixture::new();
    let older = fx.commit(REF, &Tree::new("2.0", 2));
    fx.commit(REF, &Tree::new("3.0", 3));
    let d = fx.dir.path().display().to_string();
    let src = fx.src_path().display().to_string();
    let out = fx.booted(&format!(
        "/run/host upgrade > /dev/null
         ostree --repo={src} reset {REF} {older}
         /run/host upgrade > {d}/refused.txt 2>&1 && exit 1
         /run/host status --json > {d}/after.json"
    ));
    assert!(out.status.success(), "{}", text(&out));
    let refused = std::fs::read_to_string(fx.dir.path().join("refused.txt")).unwrap();
    assert!(refused.contains("older than the deployed 3.0"), "{refused}");
    let after = fx.read_json("after.json");
    assert_eq!(after["deployments"][0]["version"], "3.0");
    assert_eq!(after["deployments"][0]["staged"], true);
}
