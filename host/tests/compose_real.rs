//! Composes the shipped `manifests/container-host.toml` from real Debian
//! packages (the machine's apt sources) and checks the tree with stock
//! `ostree` commands. Privileged tier: root, mmdebstrap, network to the apt
//! mirror. The package stage is cached in `<checkout>/build/cache`, shared
//! with `scripts/compose`, so only the first run installs packages.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use cairn_test_support::compose_tree_args;
use common::{host, ostree_cli};

const REF: &str = "cairn/bookworm/x86_64/container-host";

fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn ostree(repo: &Path, args: &[&str]) -> String {
    ostree_cli(repo, args)
}

#[test]
#[ignore = "privileged: needs root, mmdebstrap and the apt mirror; run by scripts/test"]
fn container_host_manifest_composes_a_bootable_container_host() {
    common::require_root("mmdebstrap --mode=root");
    let root = checkout();
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    // A private copy: the binary is an input of the tree, and must not change
    // between the two composes even if the workspace is rebuilt meanwhile.
    let host = tmp.path().join("host");
    let built = cairn_contracts::names::executables(Path::new(env!("CARGO_BIN_EXE_host")));
    for (from, to) in built.iter().zip(cairn_contracts::names::executables(&host)) {
        std::fs::copy(from, to).unwrap();
    }
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(&host);
        let mut all = vec!["--bare-user"];
        all.extend_from_slice(extra);
        cmd.args(compose_tree_args(
            &repo,
            root.join("build/cache"),
            root.join("manifests/container-host.toml"),
            &all,
        ));
        let out = cmd.output().unwrap();
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "compose of container-host.toml failed"
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let stdout = run(&[]);
    let commit = stdout
        .lines()
        .find_map(|l| l.strip_prefix("commit "))
        .unwrap()
        .to_string();

    let kver = ostree(
        &repo,
        &["show", "--print-metadata-key=cairn.kernel", &commit],
    );
    let kver = kver.trim().trim_matches('\'').to_string();
    assert!(kver.ends_with("-amd64"), "kernel version {kver}");
    let ls = ostree(&repo, &["ls", "-R", &commit, "/usr"]);
    for needed in [
        format!("/usr/lib/modules/{kver}/vmlinuz"),
        format!("/usr/lib/modules/{kver}/initramfs.img"),
        "/usr/bin/host".to_string(),
        "/usr/lib/ostree/ostree-prepare-root".to_string(),
        "/usr/lib/systemd/network/10-uplink.network".to_string(),
        "/usr/lib/systemd/network/20-cairn0.netdev".to_string(),
        "/usr/lib/systemd/network/20-cairn0.network".to_string(),
        "/usr/etc/systemd/system/multi-user.target.wants/systemd-networkd.service".to_string(),
        "/usr/etc/fstab".to_string(),
        "/usr/lib/sysimage/dpkg/status".to_string(),
        "/usr/lib/x86_64-linux-gnu/libostree-1.so.1".to_string(),
    ] {
        assert!(
            ls.lines().any(|l| l.contains(&needed)),
            "tree lacks {needed}"
        );
    }
    assert!(
        ls.lines()
            .any(|l| l.starts_with("-00755 0 0") && l.ends_with("/usr/bin/host")),
        "/usr/bin/host must be an executable file"
    );
    let top = ostree(&repo, &["ls", &commit, "/"]);
    assert!(top.contains("/ostree -> sysroot/ostree") && top.contains("/home -> var/home"));
    assert!(
        !top.lines().any(|l| l.ends_with(" /etc")),
        "/etc must be in /usr/etc:\n{top}"
    );
    assert_eq!(
        ostree(&repo, &["ls", &commit, "/boot"]).lines().count(),
        1,
        "/boot is empty"
    );
    assert_eq!(
        ostree(&repo, &["ls", &commit, "/var"]).lines().count(),
        1,
        "/var is empty"
    );

    let kargs = ostree(&repo, &["cat", &commit, "/usr/lib/cairn/kargs"]);
    assert!(
        kargs
            .lines()
            .any(|k| k == "systemd.unified_cgroup_hierarchy=1"),
        "{kargs}"
    );
    let netdev = ostree(
        &repo,
        &["cat", &commit, "/usr/lib/systemd/network/20-cairn0.netdev"],
    );
    assert!(netdev.contains("Kind=bridge"));

    // The initramfs is dracut's, with the ostree module that pivots into the deployment.
    let initramfs = tmp.path().join("initramfs.img");
    let bytes = Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args([
            "cat",
            &commit,
            &format!("/usr/lib/modules/{kver}/initramfs.img"),
        ])
        .output()
        .unwrap();
    std::fs::write(&initramfs, bytes.stdout).unwrap();
    let listing = Command::new("lsinitrd")
        .arg(&initramfs)
        .output()
        .expect("lsinitrd (dracut-core)");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("ostree-prepare-root"),
        "the initramfs lacks ostree-prepare-root"
    );

    let show = |key: &str| {
        ostree(
            &repo,
            &["show", &format!("--print-metadata-key={key}"), &commit],
        )
    };
    assert!(show("version").trim().starts_with("'1."));
    assert_eq!(show("ostree.bootable").trim(), "true");
    let packages = show("cairn.packages");
    for p in [
        "'systemd=",
        "'ostree-boot=",
        "'linux-image-amd64=",
        "'dracut=",
    ] {
        assert!(packages.contains(p), "package list lacks {p}");
    }
    // The SBOM lists the same packages, each with the SHA-256 of its .deb,
    // and licenses from the machine-readable copyright files.
    let sbom = Command::new(&host)
        .args(["compose", "sbom", "--repo"])
        .arg(&repo)
        .arg(REF)
        .output()
        .unwrap();
    assert!(sbom.status.success(), "compose sbom failed");
    let doc: serde_json::Value = serde_json::from_slice(&sbom.stdout).unwrap();
    let listed = doc["packages"].as_array().unwrap();
    assert_eq!(listed.len(), packages.matches('=').count());
    for p in listed {
        assert_eq!(p["checksums"][0]["algorithm"], "SHA256", "{p}");
    }
    let systemd = listed.iter().find(|p| p["name"] == "systemd").unwrap();
    assert!(
        systemd["licenseDeclared"]
            .as_str()
            .unwrap()
            .contains("LGPL-2.1-or-later"),
        "{systemd}"
    );
    ostree(&repo, &["fsck"]);
    let log = ostree(&repo, &["log", REF]);
    assert!(log.contains("ContentChecksum:"));

    // Nothing changed: no new commit, and it says so.
    let again = run(&["--unless-changed"]);
    assert!(again.starts_with("no changes"), "{again}");
    assert_eq!(ostree(&repo, &["rev-parse", REF]).trim(), commit);

    // The lock names every installed package with its .deb's sha256, and a
    // re-compose from it (cached stage) gives the very same tree.
    let cache = root.join("build/cache");
    let lock_out = Command::new(&host)
        .args(["compose", "lock", "--repo"])
        .arg(&repo)
        .arg(REF)
        .output()
        .unwrap();
    assert!(lock_out.status.success(), "compose lock failed");
    let lock = String::from_utf8(lock_out.stdout).unwrap();
    assert_eq!(
        lock.matches("[[package]]").count(),
        packages.matches('=').count(),
        "{lock}"
    );
    assert!(lock.contains("sources = [\"deb "), "{lock}");
    let verify = Command::new(&host)
        .args(["compose", "verify", "--quiet", "--repo"])
        .arg(&repo)
        .arg("--cache")
        .arg(&cache)
        .arg("--manifest")
        .arg(root.join("manifests/container-host.toml"))
        .arg(REF)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&verify.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&verify.stderr));
    assert!(verify.status.success(), "compose verify: {stdout}");
    let content = repo_content_checksum(&repo, &commit);
    assert_eq!(stdout.trim(), format!("identical {content}"));

    // A locked version the mirror does not have fails, naming it and --debs.
    let mut bogus = String::new();
    let mut name = String::new();
    let mut replaced = false;
    for line in lock.lines() {
        // The name of the package whose version is replaced: the first.
        if let (false, Some(n)) = (replaced, line.strip_prefix("name = ")) {
            name = n.trim_matches('"').to_string();
        }
        if !replaced && line.starts_with("version = ") {
            bogus.push_str("version = \"9.9.9-cairn-bogus\"\n");
            replaced = true;
            continue;
        }
        bogus.push_str(line);
        bogus.push('\n');
    }
    let bogus_path = tmp.path().join("bogus.toml");
    std::fs::write(&bogus_path, bogus).unwrap();
    let out = Command::new(&host)
        .args(compose_tree_args(
            tmp.path().join("repo-bogus"),
            &cache,
            root.join("manifests/container-host.toml"),
            &["--quiet", "--lock", bogus_path.to_str().unwrap()],
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("{name}=9.9.9-cairn-bogus")) && err.contains("--debs DIR"),
        "{err}"
    );
    assert!(!tmp.path().join("repo-bogus/refs/heads").join(REF).exists());
}

fn repo_content_checksum(repo: &Path, commit: &str) -> String {
    ostree(repo, &["log", commit])
        .lines()
        .find_map(|l| l.trim().strip_prefix("ContentChecksum:"))
        .map(|c| c.trim().to_string())
        .expect("ContentChecksum in ostree log")
}

#[test]
#[ignore = "privileged: needs root and the apt mirror; run by scripts/test"]
fn an_unknown_package_fails_in_seconds_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("m.toml");
    std::fs::write(
        &manifest,
        "ref = \"test/unknown\"\n[packages]\nsuite = \"bookworm\"\ninstall = [\"cairn-no-such-package\"]\n",
    )
    .unwrap();
    let out = host()
        .args(compose_tree_args(
            tmp.path().join("repo"),
            checkout().join("build/cache"),
            &manifest,
            &["--quiet"],
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("does not exist in the configured sources"),
        "{err}"
    );
    assert!(err.contains("cairn-no-such-package"), "{err}");
    assert!(!tmp.path().join("repo/refs/heads/test/unknown").exists());
}
