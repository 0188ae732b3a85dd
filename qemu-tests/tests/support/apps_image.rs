//! The apps test image shared by the QEMU tests that boot a node with an app
//! (`tests/upgrade.rs`, `provision.rs`, `host_test.rs`, `fleet_network.rs`)
//! and the guest benchmark
//! (`examples/bench-runtime-guest.rs`): a busybox OCI layout this code writes
//! (deterministic tar, so the same busybox gives the same digest and an
//! unchanged compose is skipped) and a manifest under `build/qemu-tests/`
//! that includes a host manifest and adds the `[[apps]]` entry, composed into
//! its own repository there and written as a qcow2 image named after the
//! commit and the `host` binary.
//!
//! Two hosts: the test's ([`apps_image`], `build/qemu-tests/apps/`) is the
//! test host itself (`qemu-tests/manifests/test-host.toml`), so its package
//! set is the boot tests' and the cached package stage is reused (no second
//! mmdebstrap run); the benchmark's ([`bench_image`],
//! `build/qemu-tests/apps-bench-release/` from its release build) is
//! `qemu-tests/manifests/bench-host.toml`, the test host plus crun, the peer
//! runtime it compares against.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qemu_tests::fixture::{
    build_dir, compose_unless_changed, workspace, write_image_unless_present, DirLock,
    TEST_MANIFEST,
};
use qemu_tests::{remove_stale_runs, Vm, VmConfig};

/// Unwrap with the whole error chain in the panic message.
pub fn must<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// What a variant of the apps image is composed from, and where.
pub struct AppsHost {
    /// The host manifest (relative to the workspace) the written one includes.
    pub manifest: &'static str,
    /// Its directory under `build/` (`-release` is appended in a release
    /// build, so the benchmark's release `host` never moves a debug ref).
    pub dir: &'static str,
}

/// The test's apps host: the test host itself, whose package set (and so
/// cached package stage) the boot tests share.
pub const APPS_HOST: AppsHost = AppsHost {
    manifest: TEST_MANIFEST,
    dir: "qemu-tests/apps",
};
/// The guest benchmark's: the test host plus crun.
pub const BENCH_HOST: AppsHost = AppsHost {
    manifest: "qemu-tests/manifests/bench-host.toml",
    dir: "qemu-tests/apps-bench",
};
/// The baked app: name, address, port, and what its httpd serves.
pub const APP: &str = "web";
pub const APP_IP: &str = "10.88.0.50";
pub const APP_PORT: u16 = 8080;
pub const APP_PAGE: &str = "cairn baked app: hello from busybox httpd";
/// The baked app's image, run from the host tree (cairn_contracts::image).
pub const APP_IMAGE: &str = "cairn-app-web:baked";

pub struct AppsImage {
    /// The host manifest it includes ([`AppsHost::manifest`]).
    pub host_manifest: &'static str,
    pub image: PathBuf,
    pub repo: PathBuf,
    pub ref_: String,
    pub commit: String,
    pub digest: String,
}

/// The test's apps image ([`APPS_HOST`]), built once per process.
pub fn apps_image() -> &'static AppsImage {
    static IMAGE: OnceLock<std::result::Result<AppsImage, String>> = OnceLock::new();
    built_once(&IMAGE, &APPS_HOST)
}

/// The guest benchmark's apps image ([`BENCH_HOST`], with crun), built once
/// per process.
pub fn bench_image() -> &'static AppsImage {
    static IMAGE: OnceLock<std::result::Result<AppsImage, String>> = OnceLock::new();
    built_once(&IMAGE, &BENCH_HOST)
}

fn built_once(
    cell: &'static OnceLock<std::result::Result<AppsImage, String>>,
    host: &AppsHost,
) -> &'static AppsImage {
    match cell.get_or_init(|| build_apps_image(host).map_err(|e| format!("{e:#}"))) {
        Ok(image) => image,
        Err(e) => panic!("building the apps image of {} failed: {e}", host.manifest),
    }
}

pub fn build_apps_image(apps_host: &AppsHost) -> Result<AppsImage> {
    if !cairn_test_support::is_root() {
        bail!("the QEMU runtime tests compose trees and write disk images, which needs root; run them as root (scripts/test does)");
    }
    // A release build (the benchmark) installs the release `host` in the
    // tree: its own repository, so it never moves a debug build's ref.
    let dir = build_dir(&if cfg!(debug_assertions) {
        apps_host.dir.to_string()
    } else {
        format!("{}-release", apps_host.dir)
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // scripts/test runs two lanes of tests that boot this image: whichever
    // comes first composes and writes it, the other waits, then finds it.
    let _lock = DirLock::take(&dir, libc::LOCK_EX)?;

    let digest = write_busybox_layout(&dir.join("busybox-oci"), APP_PAGE)?;
    let manifest = dir.join("apps-host.toml");
    std::fs::write(
        &manifest,
        apps_manifest(apps_host.manifest, "busybox-oci", &digest),
    )
    .with_context(|| format!("writing {}", manifest.display()))?;

    let repo = dir.join("repo");
    let started = Instant::now();
    let (ref_, commit) = compose_unless_changed(&repo, &manifest)?;
    eprintln!(
        "apps image: composed {commit} in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (image, took) = write_image_unless_present(&dir.join("images"), &repo, &ref_, &commit)?;
    if took > Duration::ZERO {
        eprintln!(
            "apps image: wrote {} in {:.1} s",
            image.display(),
            took.as_secs_f64()
        );
    }
    Ok(AppsImage {
        host_manifest: apps_host.manifest,
        image,
        repo,
        ref_,
        commit,
        digest,
    })
}

/// A manifest (to be written under `build/`) that includes `host_manifest`
/// (relative to the workspace) and adds the app `web` from the OCI layout
/// `image` (relative to the written manifest).
pub fn apps_manifest(host_manifest: &str, image: &str, digest: &str) -> String {
    format!(
        "# Written by qemu-tests (tests/support/apps_image.rs): the apps test host.\n\
         include = [{include:?}]\n\n\
         [[apps]]\n\
         name = \"{APP}\"\n\
         image = \"{image}\"\n\
         digest = \"{digest}\"\n\
         memory = \"64M\"\n\
         pids = \"64\"\n\
         ip = \"{APP_IP}\"\n\
         health-cmd = \"wget -q -O- http://127.0.0.1:{APP_PORT}/\"\n\
         health-interval = \"3s\"\n",
        include = workspace().join(host_manifest).to_string_lossy()
    )
}

/// An OCI image layout of the build machine's static busybox with every
/// applet linked and a page for httpd; Cmd serves it on port 8080. The tar
/// is deterministic (sorted, fixed mtime and owners), so the same busybox
/// always gives the same manifest digest, which is returned.
pub fn write_busybox_layout(layout: &Path, page: &str) -> Result<String> {
    // The same bytes as the layout this file wrote by hand before
    // cairn-test-support, so composes cached on its digest stay valid.
    let page = format!("{page}\n");
    let port = APP_PORT.to_string();
    let exposed = format!("{APP_PORT}/tcp");
    let spec = cairn_test_support::LayoutSpec {
        applets: cairn_test_support::Applets::All,
        dirs: &["www", "etc", "tmp"],
        files: &[
            ("www/index.html", page.as_bytes()),
            ("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"),
            ("etc/group", b"root:x:0:\n"),
        ],
        cmd: &["/bin/httpd", "-f", "-p", &port, "-h", "/www"],
        exposed_ports: &[&exposed],
        created: Some("1970-01-01T00:00:00Z"),
        ref_name: Some("busybox:web"),
    };
    cairn_test_support::busybox_layout(layout, &spec)
        .with_context(|| format!("writing the busybox layout {}", layout.display()))
}

/// Boot `image` (with more QEMU arguments) on its control shell in a fresh
/// overlay (`build/qemu-tests/runs/apps-<name>.<pid>`) and wait until
/// systemd says the boot finished; fails if it ends degraded.
pub fn boot_with(image: &AppsImage, name: &str, extra_args: Vec<String>) -> Vm {
    let runs = build_dir("qemu-tests/runs");
    remove_stale_runs(&runs, &format!("apps-{name}"));
    let workdir = runs.join(format!("apps-{name}.{}", std::process::id()));
    let mut config = VmConfig::new(&image.image, &workdir);
    config.extra_args = extra_args;
    let mut vm = must(Vm::start(config));
    must(vm.wait_ready());
    assert_boot_finished(&mut vm);
    vm
}

fn assert_boot_finished(vm: &mut Vm) {
    let state = must(vm.wait_booted());
    eprintln!(
        "apps image: boot finished ({state}) {:.1} s after QEMU started",
        vm.since_power_on().as_secs_f64()
    );
    if state != "running" {
        let failed = must(vm.run(&format!(
            "systemctl --failed --no-legend; \
             for u in $(systemctl --failed --no-legend --plain | awk '{{print $1}}'); do \
             systemctl status --no-pager -l \"$u\" | tail -20; done; \
             journalctl -b -u cairn-app-{APP}.service --no-pager | tail -40; \
             journalctl -b -p err --no-pager | tail -50"
        )));
        panic!("boot ended {state:?}, not running:\n{}", failed.stdout);
    }
}

/// Poll `check` (a guest command) every second until it succeeds, for at
/// most `limit`; then fail with `diag`'s output (a guest command too).
pub fn wait_for_in(vm: &mut Vm, what: &str, check: &str, limit: Duration, diag: &str) -> String {
    let started = std::time::Instant::now();
    loop {
        let out = must(vm.run(check));
        if out.success() {
            return out.stdout;
        }
        if started.elapsed() > limit {
            let state = vm.run(diag).map(|o| o.to_string()).unwrap_or_default();
            panic!(
                "{what}: not within {} s; last try: {check}\n{out}\nstate:\n{state}",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A guest command that GETs `/` from `ip:port` with bash alone (the host
/// has no HTTP client) and prints the response.
pub fn http_get(ip: &str, port: u16) -> String {
    format!(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/{port} && \
         printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3 && cat <&3'"
    )
}
