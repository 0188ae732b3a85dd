//! `host compose image` on its failure paths: whatever goes wrong, no output
//! file, no temporary file and no loop device are left behind. (The success
//! path is proven by booting its output in tests/lifecycle.rs.)

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
    require_root();
    let host = host_binary().unwrap_or_else(|e| panic!("{e:#}"));
    let work = build_dir("qemu-tests/image-writer");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

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
        .args(["compose", "image", "--quiet", "--ref", "no/such/ref"])
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
        .args(["compose", "image", "--quiet", "--ref", "test/nokernel"])
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
