//! Harness that boots cairn disk images under QEMU and talks to the guest.
//!
//! [`fixture::test_image`] composes the test manifest
//! (`qemu-tests/manifests/test-host.toml`: the real `container-host.toml`
//! plus a control channel) with the `host` binary, writes a disk image of it
//! with `host compose image` and caches both under `<workspace>/build/`.
//! [`vm::Vm`] boots such an image under TCG and runs commands in it.

pub mod fixture;
pub mod guest;
pub mod vm;

pub use fixture::{test_image, TestImage};
pub use vm::{Output, Vm, VmConfig};

/// Boot the test image in a fresh overlay (work directory
/// `build/qemu-tests/runs/<name>.<pid>`, so concurrent test processes never
/// share one) and wait until its control shell answers.
pub fn boot_test_image(name: &str) -> anyhow::Result<Vm> {
    let image = test_image();
    let runs = fixture::build_dir("qemu-tests/runs");
    remove_stale_runs(&runs, name);
    let workdir = runs.join(format!("{name}.{}", std::process::id()));
    let mut vm = Vm::start(VmConfig::new(&image.image, &workdir))?;
    vm.wait_ready()?;
    Ok(vm)
}

/// Remove earlier work directories of `name` whose test process is gone.
pub fn remove_stale_runs(runs: &std::path::Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
