//! Harness that boots cairn disk images under QEMU and talks to the guest.
//!
//! [`fixture::test_image`] composes the test manifest
//! (`qemu-tests/manifests/test-host.toml`: the real `container-host.toml`
//! plus a control channel) with the `host` binary, writes a disk image of it
//! with `host compose image` and caches both under `<workspace>/build/`.
//! [`vm::Vm`] boots such an image under TCG and runs commands in it.

pub mod fixture;
pub mod vm;

pub use fixture::{test_image, TestImage};
pub use vm::{Output, Vm, VmConfig};

/// Boot the test image in a fresh overlay (work directory
/// `build/qemu-tests/runs/<name>`) and wait until its control shell answers.
pub fn boot_test_image(name: &str) -> anyhow::Result<Vm> {
    let image = test_image();
    let workdir = fixture::build_dir(&format!("qemu-tests/runs/{name}"));
    let mut vm = Vm::start(VmConfig::new(&image.image, &workdir))?;
    vm.wait_ready()?;
    Ok(vm)
}
