//! Guest-side helpers the QEMU tests share: `host status` of the guest, the
//! running deployment from the kernel command line, and commands that
//! reboot the guest. They panic with the whole error chain, as the tests do.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::Vm;

fn must<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// The guest's `host status --json`.
pub fn status(vm: &mut Vm) -> Value {
    let text = must(vm.ok("host status --json"));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("host status --json is not JSON ({e}):\n{text}"))
}

/// The deployments of a [`status`].
pub fn deployments(status: &Value) -> &Vec<Value> {
    status["deployments"].as_array().expect("deployments array")
}

/// The booted deployment of a [`status`]; exactly one.
pub fn booted(status: &Value) -> &Value {
    let booted: Vec<_> = deployments(status)
        .iter()
        .filter(|d| d["booted"] == true)
        .collect();
    assert_eq!(booted.len(), 1, "one booted deployment: {status:#}");
    booted[0]
}

/// The booted deployment's commit, from `host status`.
pub fn booted_commit(vm: &mut Vm) -> String {
    let st = status(vm);
    booted(&st)["checksum"]
        .as_str()
        .unwrap_or_else(|| panic!("booted deployment without a checksum: {st:#}"))
        .to_string()
}

/// The directory of the running deployment, from the kernel command line
/// (not from our own `host status`).
pub fn running_deployment(vm: &mut Vm) -> String {
    must(vm.ok(
        r#"set -e; arg=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^ostree=//p'); readlink -f "/sysroot$arg""#,
    ))
    .trim()
    .to_string()
}

/// The commit of the running deployment (the checksum of `<checksum>.N`).
pub fn running_commit(vm: &mut Vm) -> String {
    let path = running_deployment(vm);
    let name = Path::new(&path)
        .file_name()
        .expect("deployment directory")
        .to_string_lossy()
        .into_owned();
    name.split('.').next().unwrap_or_default().to_string()
}

/// Start `command` detached in the guest (it reboots the machine), its output
/// to `log` (which must be under /var to survive); if it fails, reboot anyway
/// so the test sees the failure in the log instead of waiting for a boot that
/// never comes. Returns the new boot id and the wall time until the control
/// shell of the new boot answered; [`rebooting_output`] reads the log.
pub fn run_rebooting(vm: &mut Vm, command: &str, log: &str) -> (String, Duration) {
    let old = vm.boot_id().expect("booted").to_string();
    let started = Instant::now();
    must(vm.ok(&format!(
        "mkdir -p \"$(dirname {log})\"; setsid -f sh -c '\
         s=$(date +%s%N); {command} >{log} 2>&1; rc=$?; \
         echo \"exit $rc after $(( ($(date +%s%N) - s) / 1000000 )) ms\" >>{log}; sync; \
         [ $rc = 0 ] || systemctl reboot' </dev/null >/dev/null 2>&1"
    )));
    let id = must(vm.wait_ready());
    assert_ne!(id, old, "`{command}` did not reboot the machine");
    (id, started.elapsed())
}

/// Output of a rebooting command (written before the reboot); fails if it
/// recorded a non-zero exit.
pub fn rebooting_output(vm: &mut Vm, command: &str, log: &str) -> String {
    let text = must(vm.ok(&format!("cat {log}")));
    if let Some(line) = text.lines().find(|l| l.starts_with("exit ")) {
        assert!(line.starts_with("exit 0 "), "`{command}` failed:\n{text}");
    }
    text
}
