//! The container path loads no libostree (src/exe.rs): the `host`
//! executable has no DT_NEEDED entry for libostree, gio, gobject or glib,
//! neither a foreground `host app run` nor a detached container's monitor
//! maps them, and every other command still works through `host-full`.

mod common;

use std::path::Path;

use common::{host, text};
use object::read::elf::{Dyn as _, ElfFile64, ProgramHeader as _};

/// The DT_NEEDED entries of an ELF executable.
fn needed(path: &Path) -> Vec<String> {
    let data = std::fs::read(path).unwrap();
    let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    let (dyns, link) = sections
        .dynamic(endian, &*data)
        .unwrap()
        .expect("a dynamically linked executable");
    let strings = sections.strings(endian, &*data, link).unwrap();
    dyns.iter()
        .filter(|d| d.tag32(endian) == Some(object::elf::DT_NEEDED))
        .map(|d| String::from_utf8(d.string(endian, strings).unwrap().to_vec()).unwrap())
        .collect()
}

/// Whether an ELF executable names a dynamic loader (PT_INTERP): cargo's
/// link does, scripts/build's static one does not.
fn has_interpreter(path: &Path) -> bool {
    let data = std::fs::read(path).unwrap();
    let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let endian = elf.endian();
    elf.elf_program_headers()
        .iter()
        .any(|p| p.p_type(endian) == object::elf::PT_INTERP)
}

const LAZY: [&str; 4] = [
    "libostree-1.so.1",
    "libgio-2.0.so.0",
    "libgobject-2.0.so.0",
    "libglib-2.0.so.0",
];

#[test]
fn only_the_full_executable_links_libostree() {
    for exe in [
        env!("CARGO_BIN_EXE_host"),
        env!("CARGO_BIN_EXE_host-monitor"),
    ] {
        let libs = needed(Path::new(exe));
        // The parse is real: what the binary does need is there. Linked
        // static, as scripts/build links them, it has no loader and needs
        // nothing.
        if has_interpreter(Path::new(exe)) {
            assert!(libs.iter().any(|l| l == "libc.so.6"), "{libs:?}");
        } else {
            assert!(libs.is_empty(), "{exe} is static and needs {libs:?}");
        }
        for lazy in LAZY {
            assert!(
                !libs.iter().any(|l| l == lazy),
                "{exe} links {lazy}: {libs:?}"
            );
        }
    }
    let full = needed(Path::new(env!("CARGO_BIN_EXE_host-full")));
    assert!(full.iter().any(|l| l == LAZY[0]), "{full:?}");
}

/// The ELF dynamic tag of packed relative relocations (gABI; not named
/// by the object crate's version here).
const DT_RELR: u32 = 36;

/// The three executables are position independent (ET_DYN with DF_1_PIE),
/// with packed relocations.
#[test]
fn every_executable_is_pie() {
    for exe in [
        env!("CARGO_BIN_EXE_host"),
        env!("CARGO_BIN_EXE_host-full"),
        env!("CARGO_BIN_EXE_host-monitor"),
    ] {
        let data = std::fs::read(exe).unwrap();
        let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
        let endian = elf.endian();
        assert_eq!(
            elf.elf_header().e_type.get(endian),
            object::elf::ET_DYN,
            "{exe} is not PIE"
        );
        let sections = elf.elf_section_table();
        let (dyns, _) = sections.dynamic(endian, &*data).unwrap().unwrap();
        let pie = dyns.iter().any(|d| {
            d.tag32(endian) == Some(object::elf::DT_FLAGS_1)
                && d.val32(endian).unwrap_or(0) & object::elf::DF_1_PIE != 0
        });
        assert!(pie, "{exe} has no DF_1_PIE");
        // Its relative relocations are packed (DT_RELR, see build.rs).
        assert!(
            dyns.iter().any(|d| d.tag32(endian) == Some(DT_RELR)),
            "{exe} has no DT_RELR"
        );
    }
}

/// No hand-written machine code in the product: it builds for any
/// architecture Rust and Debian do.
#[test]
fn no_assembly_in_the_product() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut found = Vec::new();
    for krate in ["contracts", "oci", "builder", "updater", "runtime", "host"] {
        for e in walk(&ws.join(krate).join("src")) {
            let text = std::fs::read_to_string(&e).unwrap();
            let needle = ["asm", "!("].concat();
            if text.contains(&needle) {
                found.push(e.display().to_string());
            }
        }
    }
    assert!(found.is_empty(), "assembly in {found:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The objects the dynamic loader mapped while running `host ARGS`, from
/// glibc's LD_DEBUG=files trace.
fn loaded_objects(args: &[&str]) -> (std::process::Output, String) {
    let out = host().args(args).env("LD_DEBUG", "files").output().unwrap();
    let trace = String::from_utf8_lossy(&out.stderr).into_owned();
    // The trace works at all: the libraries linked directly are in it.
    assert!(trace.contains("file=libc.so.6"), "{}", text(&out));
    (out, trace)
}

#[test]
fn only_commands_that_use_them_load_the_libraries() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap();
    let (out, trace) = loaded_objects(&["app", "ps", "--root", root_s]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("NAME"));
    for lazy in LAZY {
        assert!(!trace.contains(lazy), "{lazy} loaded by app ps:\n{trace}");
    }

    // `app verify` opens (here: creates) the image repository through
    // libostree: `host` hands it to `host-full` (which needs the library;
    // the loader names it by the argv[0] it keeps), which looks it up.
    let (out, trace) = loaded_objects(&["app", "verify", "--root", root_s, "nosuch:1"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        trace.contains("file=libostree-1.so.1 [0];  needed by"),
        "{trace}"
    );
    assert!(
        trace.contains("error: no image nosuch:1 in the store"),
        "{}",
        text(&out)
    );
    // libostree made a real repository (stock ostree reads it back).
    assert!(root.join("repo/config").is_file());
    let refs = common::ostree_cli(&root.join("repo"), &["refs"]);
    assert_eq!(refs.trim(), "");

    // Help, errors and every other command are `host-full`'s, unchanged.
    let out = host().args(["app", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("import") && help.contains("run"), "{help}");
    let out = host().args(["app", "nosuch"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = host().args(["status", "--help"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// A one-layer OCI image layout (`DIR/oci`) of the host's static busybox
/// with `/marker` holding `marker`.
fn busybox_layout(dir: &Path, marker: &str) {
    let spec = cairn_test_support::LayoutSpec {
        applets: cairn_test_support::Applets::Only(&["sh", "cat", "true", "sleep"]),
        files: &[("marker", marker.as_bytes())],
        cmd: &["/bin/cat", "/marker"],
        ..Default::default()
    };
    cairn_test_support::busybox_layout(&dir.join("oci"), &spec).unwrap();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn the_container_path_maps_none_of_them() {
    common::require_root("runs containers");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap().to_string();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    busybox_layout(&a, "image A");
    busybox_layout(&b, "image B");
    let app = |args: &[&str]| -> (String, bool) {
        let mut all = vec!["app", "--root", &root_s];
        all.extend_from_slice(args);
        let (out, trace) = loaded_objects(&all);
        assert!(out.status.success(), "{}", text(&out));
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            LAZY.iter().any(|l| trace.contains(&format!("file={l}"))),
        )
    };
    let run = ["run", "--rm", "--network", "none", "bb:1"];

    // Import needs libostree, and so does the first run (the checkout).
    let (_, loaded) = app(&["import", a.join("oci").to_str().unwrap(), "--name", "bb:1"]);
    assert!(loaded, "import must load libostree");
    let (out, loaded) = app(&run);
    assert_eq!((out.as_str(), loaded), ("image A", true));
    // From now on the checkout and its record are enough.
    let (out, loaded) = app(&run);
    assert_eq!((out.as_str(), loaded), ("image A", false));

    // The ref moves to another image: never the stale checkout.
    let (_, loaded) = app(&["import", b.join("oci").to_str().unwrap(), "--name", "bb:1"]);
    assert!(loaded);
    let (out, loaded) = app(&run);
    assert_eq!((out.as_str(), loaded), ("image B", true));
    let (out, loaded) = app(&run);
    assert_eq!((out.as_str(), loaded), ("image B", false));

    // A digest reference goes through the repository.
    let images: serde_json::Value = serde_json::from_str(&app(&["images", "--json"]).0).unwrap();
    let img = &images.as_array().unwrap()[0];
    let commit = img["commit"].as_str().unwrap().to_string();
    let by_digest = format!("bb@{}", img["manifest_digest"].as_str().unwrap());
    let (out, loaded) = app(&["run", "--rm", "--network", "none", &by_digest]);
    assert_eq!((out.as_str(), loaded), ("image B", true));

    // rmi takes the checkout and its record along.
    let record = root.join("checkouts").join(format!("{commit}.json"));
    assert!(record.is_file() && root.join("checkouts").join(&commit).is_dir());
    app(&["rmi", "bb:1"]);
    assert!(!record.exists() && !root.join("checkouts").join(&commit).exists());

    // A running container: neither `host app run` in the foreground nor
    // the monitor of a detached one maps them (/proc/PID/maps).
    let (_, loaded) = app(&["import", a.join("oci").to_str().unwrap(), "--name", "bb:2"]);
    assert!(loaded);
    app(&["run", "--rm", "--network", "none", "bb:2", "true"]); // checks it out
    let mapped = |pid: u32, what: &str| {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert!(
            maps.contains("/host"),
            "{what}: not the host executable:\n{maps}"
        );
        for lazy in LAZY {
            let stem = lazy.split(".so").next().unwrap();
            assert!(!maps.contains(stem), "{what} maps {lazy}:\n{maps}");
        }
    };
    let mut fg = host()
        .args(["app", "--root", &root_s, "run", "--rm", "--name", "fg"])
        .args(["--network", "none", "bb:2", "sleep", "30"])
        .spawn()
        .unwrap();
    wait_running(&root_s, "fg");
    mapped(fg.id(), "host app run");
    let out = host()
        .args(["app", "--root", &root_s, "run", "-d", "--name", "bg"])
        .args(["--network", "none", "bb:2", "sleep", "30"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    wait_running(&root_s, "bg");
    let inspect = host()
        .args(["app", "--root", &root_s, "inspect", "bg"])
        .output()
        .unwrap();
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let monitor = inspect["state"]["monitor_pid"]
        .as_u64()
        .expect("a monitor pid");
    // Idle, it waits in `host-monitor`, the same process, which maps
    // neither these nor the container executable.
    let exe = || std::fs::read_link(format!("/proc/{monitor}/exe")).unwrap();
    for _ in 0..100 {
        if exe().ends_with("host-monitor") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(exe().ends_with("host-monitor"), "{:?}", exe());
    mapped(monitor as u32, "the idle monitor");
    let maps = std::fs::read_to_string(format!("/proc/{monitor}/maps")).unwrap();
    let container_exe = Path::new(env!("CARGO_BIN_EXE_host")).display().to_string();
    assert!(
        !maps.lines().any(|l| l.ends_with(&container_exe)),
        "the idle monitor maps {container_exe}:\n{maps}"
    );
    for name in ["fg", "bg"] {
        let out = host()
            .args(["app", "--root", &root_s, "rm", "--force", name])
            .output()
            .unwrap();
        assert!(out.status.success() || name == "fg", "{}", text(&out));
    }
    let _ = fg.wait();
}

/// Wait until `host app ps` shows NAME running (at most 30 s).
fn wait_running(root: &str, name: &str) {
    for _ in 0..300 {
        let out = host()
            .args(["app", "--root", root, "ps", "--json"])
            .output()
            .unwrap();
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let running = list
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == name && c["status"] == "running");
        if running {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("container {name} did not start");
}

/// A baked app runs from the host tree (`/usr/lib/cairn/apps/<app>`, here a
/// directory standing in for it): no import, no store, no libostree.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn a_baked_app_runs_from_the_tree_without_an_import_or_libostree() {
    use cairn_contracts::image::{ImageInfo, BAKED_RECORD, BAKED_ROOTFS};
    common::require_root("runs containers");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let apps = tmp.path().join("apps");
    busybox_layout(tmp.path(), "baked into the tree");
    let dir = apps.join("web");
    std::fs::create_dir_all(&dir).unwrap();
    let image = cairn_oci::image::unpack(
        &tmp.path().join("oci"),
        &cairn_oci::image::ImportOptions::default(),
        &dir.join(BAKED_ROOTFS),
    )
    .unwrap();
    let digest = image.manifest_digest.to_string();
    let record = ImageInfo {
        name: "cairn-app-web".into(),
        tag: "baked".into(),
        ostree_ref: String::new(),
        commit: String::new(),
        manifest_digest: digest.clone(),
        config: image.config,
    };
    std::fs::write(dir.join(BAKED_RECORD), serde_json::to_vec(&record).unwrap()).unwrap();
    let (root_s, apps_s) = (root.to_str().unwrap(), apps.to_str().unwrap());
    let app = |args: &[&str]| {
        let mut all = vec!["app", "--root", root_s, "--baked-apps", apps_s];
        all.extend_from_slice(args);
        loaded_objects(&all)
    };

    let pinned = format!("cairn-app-web@{digest}");
    let (out, trace) = app(&["run", "--rm", "--network", "none", &pinned]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "baked into the tree");
    for lazy in LAZY {
        assert!(!trace.contains(&format!("file={lazy}")), "{lazy} loaded");
    }
    assert!(!root.join("repo").exists(), "nothing was imported");
    assert!(!root.join("checkouts").exists(), "nothing was checked out");
    // Another digest is not this app.
    let other = format!("cairn-app-web@sha256:{}", "0".repeat(64));
    let (out, _) = app(&["run", "--rm", "--network", "none", &other]);
    assert!(!out.status.success());

    // Listed with the store's images; not the store's to remove or verify.
    let (out, _) = app(&["images", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["name"], "cairn-app-web", "{listed}");
    for refused in [
        &["rmi", "cairn-app-web:baked"][..],
        &["verify", "cairn-app-web:baked"],
    ] {
        let (out, _) = app(refused);
        assert!(!out.status.success());
        assert!(
            text(&out).contains("baked into the host tree"),
            "{}",
            text(&out)
        );
    }
}

/// `host` on a pseudo-terminal of the test's own, as a user's terminal.
struct OnPty {
    master: std::fs::File,
    child: std::process::Child,
    seen: String,
}

impl OnPty {
    fn start(args: &[&str], rows: u16, cols: u16) -> OnPty {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let pty = nix::pty::openpty(None, None).unwrap();
        set_size(&pty.master, rows, cols);
        let slave = pty.slave;
        let mut cmd = host();
        cmd.args(args);
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave.try_clone().unwrap());
        // SAFETY: setsid and one ioctl on the child's own stdin.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(slave);
        let master = std::fs::File::from(pty.master);
        nix::fcntl::fcntl(
            master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        OnPty {
            master,
            child,
            seen: String::new(),
        }
    }

    /// Read until `what` appeared (panics with what was seen after 20 s).
    fn expect(&mut self, what: &str) {
        use std::io::Read;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !self.seen.contains(what) {
            let mut buf = [0u8; 4096];
            match self.master.read(&mut buf) {
                Ok(n) if n > 0 => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {what:?} on the terminal; it showed:\n{}",
                self.seen
            );
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.master.write_all(bytes).unwrap();
    }

    /// Type `bytes` as fast as the terminal takes them while reading what
    /// it shows, until all went in and `what` appeared (60 s at most).
    fn send_while_reading(&mut self, mut bytes: &[u8], what: &str) {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !bytes.is_empty() || !self.seen.contains(what) {
            let mut idle = true;
            if !bytes.is_empty() {
                if let Ok(n @ 1..) = self.master.write(&bytes[..bytes.len().min(1024)]) {
                    bytes = &bytes[n..];
                    idle = false;
                }
            }
            let mut buf = [0u8; 16 << 10];
            if let Ok(n @ 1..) = self.master.read(&mut buf) {
                self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                idle = false;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stalled with {} bytes still to type; the terminal showed (last 2000 bytes):\n{}",
                bytes.len(),
                &self.seen[self.seen.len().saturating_sub(2000)..]
            );
            if idle {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    fn exit_code(mut self) -> i32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            // Keep reading: a full terminal buffer would block the child.
            let _ = std::io::Read::read(&mut self.master, &mut [0u8; 4096]);
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running:\n{}",
                self.seen
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn set_size(fd: &impl std::os::fd::AsRawFd, rows: u16, cols: u16) {
    let ws = nix::libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    assert_eq!(
        unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCSWINSZ, &ws) },
        0
    );
}

/// `run -it` and `exec -it`: the container's stdio is a terminal of the
/// caller's size that follows resizes, Ctrl-C reaches its foreground
/// process, and the exit code comes back.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn run_and_exec_with_a_terminal() {
    common::require_root("runs containers");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap().to_string();
    let spec = cairn_test_support::LayoutSpec {
        applets: cairn_test_support::Applets::Only(&[
            "sh", "echo", "sleep", "stty", "test", "read",
        ]),
        cmd: &["/bin/sh"],
        ..Default::default()
    };
    cairn_test_support::busybox_layout(&tmp.path().join("oci"), &spec).unwrap();
    let out = host()
        .args(["app", "--root", &root_s, "import"])
        .arg(tmp.path().join("oci"))
        .args(["--name", "tty:1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // `host app run -it` of the image, on a terminal of ROWS x COLS.
    let run_it = |command: &[&str], rows: u16, cols: u16| {
        let mut args = vec!["app", "--root", &root_s, "run", "-it", "--rm"];
        args.extend(["--network", "none", "tty:1"]);
        args.extend_from_slice(command);
        OnPty::start(&args, rows, cols)
    };
    let run = |script: &str| run_it(&["sh", "-c", script], 33, 101);

    // A terminal of the caller's size; the exit code comes back.
    let mut t = run("test -t 0 && test -t 1 && test -t 2 && echo TTY-OK; stty size; exit 7");
    t.expect("TTY-OK");
    t.expect("33 101");
    assert_eq!(t.exit_code(), 7);

    // A resize reaches it.
    let mut t = run("echo ready; read line; stty size");
    t.expect("ready");
    set_size(&t.master, 50, 120);
    std::thread::sleep(std::time::Duration::from_millis(300));
    t.send(b"go\r");
    t.expect("50 120");
    assert_eq!(t.exit_code(), 0);

    // Input the container does not read yet does not stop its output from
    // being shown (each side would wait for the other): 60 KiB typed while
    // it prints 200 KiB, then it reads every line.
    let mut t = run(
        "i=0; while test $i -lt 2500; do echo output-line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; \
         i=$((i+1)); done; echo OUT-DONE; n=0; \
         while read l; do n=$((n+1)); test $n -ge 600 && break; done; echo READ-$n",
    );
    let line = format!("{}\r", "y".repeat(99));
    t.send_while_reading(line.repeat(600).as_bytes(), "READ-600");
    assert!(t.seen.contains("OUT-DONE"), "all output shown");
    assert_eq!(t.exit_code(), 0);

    // An interactive shell, as a user gets one: Ctrl-C interrupts what it
    // runs, and its exit code comes back.
    let mut t = run_it(&["sh"], 33, 101);
    t.expect("# ");
    t.send(b"sleep 60\r");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let interrupted = std::time::Instant::now();
    t.send(b"\x03");
    t.send(b"echo after-$((20+22))\r");
    t.expect("after-42");
    assert!(
        interrupted.elapsed().as_secs() < 10,
        "Ctrl-C did not interrupt sleep:\n{}",
        t.seen
    );
    t.send(b"exit 4\r");
    assert_eq!(t.exit_code(), 4);

    // exec -it into a running container.
    let out = host()
        .args([
            "app",
            "--root",
            &root_s,
            "run",
            "-d",
            "--name",
            "bg",
            "--network",
            "none",
        ])
        .args(["tty:1", "sleep", "600"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mut t = OnPty::start(
        &[
            "app",
            "--root",
            &root_s,
            "exec",
            "-it",
            "bg",
            "sh",
            "-c",
            "test -t 0 && echo EXEC-TTY; stty size; exit 3",
        ],
        40,
        90,
    );
    t.expect("EXEC-TTY");
    t.expect("40 90");
    assert_eq!(t.exit_code(), 3);
    let out = host()
        .args(["app", "--root", &root_s, "rm", "--force", "bg"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // Without a terminal, -t says so.
    let out = host()
        .args([
            "app",
            "--root",
            &root_s,
            "run",
            "-t",
            "--rm",
            "--network",
            "none",
            "tty:1",
            "sh",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("-t needs a terminal"), "{}", text(&out));
}
