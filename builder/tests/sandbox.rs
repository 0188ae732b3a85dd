//! Postprocess scripts run sandboxed (`tree::run_postprocess`): what a
//! script cannot reach on the build machine, and that ordinary package-job
//! work still succeeds. The tree is tiny and built here: busybox, plus perl
//! and its libraries for the open_by_handle_at probe.
//! Privileged tier: bwrap runs as root exactly as in a compose.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cairn_builder::confined::Root;
use cairn_builder::manifest::PostprocessScript;
use cairn_builder::tree;

fn require_root() {
    cairn_test_support::require_root("postprocess runs bwrap as root in a compose");
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        require_root();
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
        };
        let t = f.tree();
        for d in ["usr/bin", "etc", "tmp", "dev", "proc", "run", "usr/share"] {
            std::fs::create_dir_all(t.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("usr/bin", t.join("bin")).unwrap();
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static must be installed (scripts/setup installs it)");
        std::fs::copy(busybox, t.join("usr/bin/busybox")).unwrap();
        for applet in [
            "sh", "cat", "echo", "ls", "grep", "mknod", "chown", "chmod", "mkdir", "touch", "id",
            "su", "mount", "wc", "head", "hostname", "stat", "nsenter", "ping", "ln", "rm", "dd",
        ] {
            std::os::unix::fs::symlink("busybox", t.join("usr/bin").join(applet)).unwrap();
        }
        std::fs::write(t.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        f
    }

    fn tree(&self) -> PathBuf {
        self.dir.path().join("tree")
    }

    /// Copies perl and the libraries it links into the tree.
    fn add_perl(&self) {
        let out = std::process::Command::new("ldd")
            .arg("/usr/bin/perl")
            .output()
            .expect("ldd");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut files = vec![PathBuf::from("/usr/bin/perl")];
        for line in text.lines() {
            let path = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from);
            files.extend(path);
        }
        for f in files {
            let dst = self.tree().join(f.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(&f, &dst).unwrap();
        }
    }

    fn run(&self, body: &str) -> anyhow::Result<()> {
        let script = PostprocessScript {
            name: "probe".into(),
            body: body.to_string(),
        };
        let root = Root::open(&self.tree()).unwrap();
        tree::run_postprocess(&root, &[script], &[])
    }

    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.tree().join(p)).unwrap_or_default()
    }
}

fn cap_field(status: &str, key: &str) -> u64 {
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("{key} in {status}"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

/// Capability numbers (linux/capability.h).
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_CHROOT: u32 = 18;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_MKNOD: u32 = 27;
const CAP_SETFCAP: u32 = 31;

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn postprocess_keeps_only_the_package_job_capabilities() {
    let f = Fixture::new();
    f.run("cat /proc/self/status > /status").unwrap();
    let status = f.read("status");
    let allowed = [
        CAP_CHOWN,
        CAP_DAC_OVERRIDE,
        CAP_FOWNER,
        CAP_FSETID,
        CAP_SETGID,
        CAP_SETUID,
        CAP_SETFCAP,
    ]
    .iter()
    .fold(0u64, |m, c| m | 1 << c);
    for key in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
        assert_eq!(cap_field(&status, key), allowed, "{key} in\n{status}");
    }
    for cap in [
        CAP_DAC_READ_SEARCH,
        CAP_SYS_ADMIN,
        CAP_SYS_PTRACE,
        CAP_SYS_MODULE,
        CAP_NET_ADMIN,
        CAP_NET_RAW,
        CAP_MKNOD,
        CAP_SYS_CHROOT,
    ] {
        assert_eq!(cap_field(&status, "CapEff:") & (1 << cap), 0, "cap {cap}");
    }
    // No exec can gain capabilities back (setuid files, file capabilities).
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
}

/// The classic container escape (open_by_handle_at, "shocker"): a handle
/// for the file system's root opens any file of the build machine's file
/// system the tree is on. The probe works outside the sandbox and is
/// refused inside.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn postprocess_cannot_use_open_by_handle_at() {
    let f = Fixture::new();
    f.add_perl();
    // x86_64: name_to_handle_at = 303, open_by_handle_at = 304; AT_FDCWD = -100.
    let probe = r#"
        my $h = pack("LlC128", 128, 0, (0) x 128);
        my $mnt = pack("l", 0);
        my $path = "/";
        syscall(303, -100, $path, $h, $mnt, 0) == 0 or do { print "NOHANDLE $!"; exit 0 };
        open(my $fh, "<", "/") or die;
        my $r = syscall(304, fileno($fh), $h, 0);
        print $r >= 0 ? "OPENED" : "REFUSED " . ($! + 0);
    "#;
    std::fs::write(f.tree().join("probe.pl"), probe).unwrap();
    let outside = std::process::Command::new(f.tree().join("usr/bin/perl"))
        .arg(f.tree().join("probe.pl"))
        .output()
        .unwrap();
    let outside = String::from_utf8_lossy(&outside.stdout).into_owned();
    assert_eq!(outside, "OPENED", "the probe must work outside the sandbox");
    f.run("/usr/bin/perl /probe.pl > /probe.out").unwrap();
    assert_eq!(f.read("probe.out"), "REFUSED 1", "EPERM expected inside");
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn postprocess_cannot_reach_the_build_machine() {
    let f = Fixture::new();
    let secret_dir = f.dir.path().join("host-only");
    std::fs::create_dir_all(&secret_dir).unwrap();
    let secret = secret_dir.join("secret");
    std::fs::write(&secret, "build machine secret").unwrap();
    // A device node already in the tree (e.g. from a rootfs archive): the
    // tree is mounted nodev.
    nix::sys::stat::mknod(
        &f.tree().join("usr/share/zero"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 5),
    )
    .unwrap();
    // /tmp as a symlink to a build-machine directory: replaced, not followed.
    std::fs::remove_dir(f.tree().join("tmp")).unwrap();
    std::os::unix::fs::symlink(&secret_dir, f.tree().join("tmp")).unwrap();
    let s = secret.display();
    let d = secret_dir.display();
    let script = format!(
        r#"
r=/result; : > $r
for p in {s} /oldroot{s} /proc/1/root{s} /proc/1/root/etc/hostname; do
    if cat "$p" >/dev/null 2>&1; then echo "read $p" >> $r; fi
done
echo x > {d}/written 2>/dev/null && echo "wrote {d}" >> $r
echo x > /tmp/written 2>/dev/null || echo "no tmp" >> $r
mount -t tmpfs none /usr/share 2>/dev/null && echo mounted >> $r
mknod /dev/sdz b 8 0 2>/dev/null && echo "mknod" >> $r
dd if=/usr/share/zero of=/dev/null bs=1 count=1 2>/dev/null && echo "opened device" >> $r
nsenter -t 1 -m true 2>/dev/null && echo nsenter >> $r
ls /proc | grep -c '^[0-9]' > /pids
cat /proc/net/dev > /netdev
hostname > /hostname
echo done >> $r
"#
    );
    f.run(&script).unwrap();
    assert_eq!(
        f.read("result"),
        "done\n",
        "the sandbox let the script do that"
    );
    assert_eq!(
        std::fs::read_dir(&secret_dir).unwrap().count(),
        1,
        "nothing written into the build machine's directory"
    );
    assert!(f.tree().join("tmp").is_dir() && !f.tree().join("tmp").is_symlink());
    let pids: usize = f.read("pids").trim().parse().unwrap();
    assert!(
        pids <= 4,
        "{pids} processes visible: host processes leak in"
    );
    let ifaces: Vec<String> = f
        .read("netdev")
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_string()))
        .collect();
    assert_eq!(ifaces, vec!["lo"], "no network but loopback");
    assert_eq!(f.read("hostname"), "cairn-postprocess\n");
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn ordinary_postprocess_work_still_succeeds() {
    let f = Fixture::new();
    std::fs::write(f.tree().join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
    f.run(
        r#"
echo 'app:x:900:900::/var/lib/app:/bin/sh' >> /etc/passwd
echo 'shadowed' > /etc/shadow
chown 0:42 /etc/shadow
chmod 0640 /etc/shadow
mkdir -p /usr/share/app
chown 900:900 /usr/share/app
chown 1000:1000 /usr/bin/tool
chmod 4755 /usr/bin/tool
ln -s ../share/app /usr/bin/app-data
su -s /bin/sh app -c 'id -u' > /usr/share/uid
rm -f /etc/motd
echo "$CAIRN_REF" > /usr/share/env-clean
"#,
    )
    .unwrap();
    let t = f.tree();
    assert!(f.read("etc/passwd").contains("app:x:900:900"));
    let md = |p: &str| std::fs::symlink_metadata(t.join(p)).unwrap();
    assert_eq!((md("etc/shadow").uid(), md("etc/shadow").gid()), (0, 42));
    assert_eq!(md("etc/shadow").mode() & 0o7777, 0o640);
    assert_eq!(md("usr/share/app").uid(), 900);
    assert_eq!(md("usr/bin/tool").uid(), 1000);
    assert_eq!(md("usr/bin/tool").mode() & 0o7777, 0o4755);
    assert_eq!(f.read("usr/share/uid"), "900\n");
    assert_eq!(f.read("usr/share/env-clean"), "\n");
}

/// The script reaches bwrap through an anonymous in-memory file (no copy on
/// the build machine's disk, so a killed compose leaves none behind): it is
/// `/run/cairn-postprocess`, read-only, byte for byte, also beyond a pipe's
/// buffer.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn the_script_is_passed_read_only_without_a_file() {
    let f = Fixture::new();
    let body = format!(
        "cat /run/cairn-postprocess > /copy\n\
         if (echo x >> /run/cairn-postprocess) 2>/dev/null; then echo writable > /writable; fi\n\
         #{}\n",
        "x".repeat(200_000)
    );
    f.run(&body).unwrap();
    assert!(
        f.read("copy") == body,
        "the script bwrap ran is not the body"
    );
    assert!(
        !f.tree().join("writable").exists(),
        "the script is writable"
    );
}
