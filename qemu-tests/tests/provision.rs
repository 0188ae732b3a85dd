//! First-boot provisioning proven on booted nodes (issue 15, QEMU).
//!
//! Node A boots the apps test image (support/apps_image.rs; its
//! baked busybox image is what the config's app runs) with a node config in
//! QEMU fw_cfg and port 22 forwarded to 127.0.0.1:
//!
//! 1. first boot: the hostname, root's SSH key (a real `ssh` login from the
//!    build machine runs `host status`), no password logins, a static
//!    address on the NIC matched by MAC, the agent's settings (the running
//!    agent reports them), the channel updates follow, a health check, an
//!    app started by its unit; `host status` names the source.
//! 2. a reboot: nothing is provisioned again (the stamp keeps its time), and
//!    the app is started at boot by its unit.
//!
//! Node B boots the plain test image with a config that does not parse: the
//! boot ends degraded with the reason on the console and in `host status`,
//! the node stays usable, and its machine id and SSH host key are its own,
//! not A's. Given a good config with a kernel argument, its next boot
//! provisions and reboots into a new deployment that has the argument.
//!
//! Run with `cargo test -p qemu-tests --test provision -- --test-threads=1` as root.

#[path = "support/apps_image.rs"]
mod apps_image;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use apps_image::*;
use qemu_tests::fixture::build_dir;
use qemu_tests::{test_image, Vm, VmConfig};
use serde_json::Value;

const HOSTNAME: &str = "prov-node-a";
/// QEMU's MAC for the first NIC.
const MAC: &str = "52:54:00:12:34:56";
/// An address the node has only if the config's static settings took.
const STATIC_IP: &str = "10.0.2.77";
const ECHO: &str = "echo";
const ECHO_IP: &str = "10.88.0.77";
/// A kernel argument node B's second config adds.
const KARG: &str = "cairn.provisioned=1";
/// A channel the node follows from its first boot on.
const FOLLOW: &str = "cairn:cairn/test/green";

fn boot(image: &Path, name: &str, config: &Path, ssh_port: Option<u16>) -> Vm {
    let runs = build_dir("qemu-tests/runs");
    qemu_tests::remove_stale_runs(&runs, &format!("provision-{name}"));
    let workdir = runs.join(format!("provision-{name}.{}", std::process::id()));
    let mut vm_config = VmConfig::new(image, &workdir);
    vm_config.extra_args = vec![
        "-fw_cfg".into(),
        format!("name=opt/org.cairn/config,file={}", config.display()),
    ];
    if let Some(port) = ssh_port {
        vm_config.net_options = format!(",hostfwd=tcp:127.0.0.1:{port}-:22");
    }
    let mut vm = must(Vm::start(vm_config));
    must(vm.wait_ready());
    vm
}

fn status(vm: &mut Vm) -> Value {
    let out = must(vm.ok("host status --json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("host status --json ({e}):\n{out}"))
}

/// Poll `check` in the guest until it succeeds, for at most `limit`.
fn wait_for(vm: &mut Vm, what: &str, check: &str, limit: Duration) -> String {
    let diag =
        "systemctl --failed --no-legend; journalctl -b -u cairn-provision --no-pager | tail -30; \
                host app ps; journalctl -b -u cairn-app-echo --no-pager | tail -20";
    wait_for_in(vm, what, check, limit, diag)
}

fn ssh(key: &Path, known_hosts: &Path, port: u16, command: &str) -> std::process::Output {
    must(
        Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .args([
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                "ConnectTimeout=20",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .arg("-i")
            .arg(key)
            .args(["-p", &port.to_string(), "root@127.0.0.1", command])
            .output()
            .map_err(|e| anyhow::anyhow!("running ssh (Debian package openssh-client): {e}")),
    )
}

/// The node's ed25519 host key, as `TYPE BASE64`.
fn host_key(vm: &mut Vm) -> String {
    let key = must(vm.ok("cat /etc/ssh/ssh_host_ed25519_key.pub"));
    key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

#[test]
fn nodes_get_their_identity_from_a_node_config_once() {
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("id_ed25519");
    let out = must(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "qemu-tests", "-f"])
            .arg(&key)
            .output()
            .map_err(anyhow::Error::from),
    );
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let known_hosts = work.path().join("known_hosts");
    let port = cairn_test_support::free_port();

    let config = work.path().join("node-a.toml");
    std::fs::write(
        &config,
        format!(
            r##"version = 1
hostname = "{HOSTNAME}"

[[users]]
name = "root"
ssh-authorized-keys = ["{public}"]

[[network.interfaces]]
mac = "{MAC}"
addresses = ["10.0.2.15/24", "{STATIC_IP}/24"]
gateway = "10.0.2.2"
dns = ["10.0.2.3"]

[update]
ref = "{FOLLOW}"

[agent]
policy = "check"
interval = "2h"

[[health]]
name = "provisioned"
kind = "wanted"
script = "#!/bin/sh\ntest -s /etc/hostname\n"

[[apps]]
name = "{ECHO}"
image = "{APP_IMAGE}"
ip = "{ECHO_IP}"
memory = "64M"
"##,
            public = public.trim()
        ),
    )
    .unwrap();

    // --- node A, first boot ---
    let image = apps_image();
    let mut a = boot(&image.image, "a", &config, Some(port));
    let state = must(a.wait_booted());
    let st = status(&mut a);
    assert_eq!(
        st["provision"]["result"], "applied",
        "{:#}",
        st["provision"]
    );
    assert_eq!(st["provision"]["source"], "fw_cfg opt/org.cairn/config");
    let applied_at = st["provision"]["at"].clone();
    assert_eq!(
        state, "running",
        "first boot ended {state}: {:#}",
        st["provision"]
    );
    assert_eq!(must(a.ok("cat /proc/sys/kernel/hostname")).trim(), HOSTNAME);
    assert_eq!(st["provision"]["follows"], FOLLOW);
    let booted = qemu_tests::guest::booted(&st);
    assert_eq!(booted["origin"]["refspec"], FOLLOW, "{booted:#}");
    let text = must(a.ok("host status"));
    assert!(text.contains("Provisioning: applied at "), "{text}");

    // Remote access: the key logs in, and nothing else could.
    let login = ssh(&key, &known_hosts, port, "hostname; host status");
    let login_text = String::from_utf8_lossy(&login.stdout);
    assert!(
        login.status.success(),
        "ssh root@127.0.0.1:{port}: {}\n{}",
        login.status,
        String::from_utf8_lossy(&login.stderr)
    );
    assert!(
        login_text.starts_with(&format!("{HOSTNAME}\n")),
        "{login_text}"
    );
    assert!(login_text.contains("Provisioning: applied"), "{login_text}");
    let sshd =
        must(a.ok("sshd -T | grep -Ei '^(passwordauthentication|kbdinteractiveauthentication) '"));
    assert!(
        sshd.contains("passwordauthentication no")
            && sshd.contains("kbdinteractiveauthentication no"),
        "{sshd}"
    );
    // The client saw the node's own host key.
    let a_key = host_key(&mut a);
    let known = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(known.contains(&a_key), "known_hosts {known} lacks {a_key}");

    // The static address, from the config's networkd file.
    wait_for(
        &mut a,
        "the static address",
        &format!("ip -4 -o addr show | grep -F ' {STATIC_IP}/24 '"),
        Duration::from_secs(60),
    );
    let iface = must(a.ok(&format!(
        "ip -o link | grep -i {MAC} | awk -F': ' '{{print $2}}'"
    )));
    let link = must(a.ok(&format!("networkctl status --no-pager {}", iface.trim())));
    assert!(link.contains("05-cairn-provision-0.network"), "{link}");

    // The agent runs with the config's settings.
    wait_for(
        &mut a,
        "the agent's policy from the config",
        "host status --json | grep -q '\"policy\": \"check\"'",
        Duration::from_secs(120),
    );
    assert!(must(a.ok("cat /etc/cairn/agent.d/50-provision.toml")).contains("interval = \"2h\""));
    must(a.ok("test -x /etc/cairn/health.d/wanted/provisioned"));

    // The app: started by its unit, from the image baked into the tree.
    let page = wait_for(
        &mut a,
        "the provisioned app answering",
        &http_get(ECHO_IP, APP_PORT),
        Duration::from_secs(180),
    );
    assert!(page.contains(APP_PAGE), "{page}");
    let a_machine_id = must(a.ok("cat /etc/machine-id")).trim().to_string();
    assert_eq!(a_machine_id.len(), 32, "{a_machine_id}");

    // --- node A, second boot: nothing provisioned again ---
    must(a.reboot());
    let st = status(&mut a);
    assert_eq!(
        st["provision"]["at"], applied_at,
        "provisioned twice: {:#}",
        st["provision"]
    );
    let journal = must(a.ok("journalctl -b -u cairn-provision --no-pager -o cat"));
    assert!(journal.contains("already provisioned"), "{journal}");
    assert_eq!(must(a.ok("cat /proc/sys/kernel/hostname")).trim(), HOSTNAME);
    let page = wait_for(
        &mut a,
        "the provisioned app after a reboot",
        &http_get(ECHO_IP, APP_PORT),
        Duration::from_secs(180),
    );
    assert!(page.contains(APP_PAGE), "{page}");
    assert_eq!(
        host_key(&mut a),
        a_key,
        "the host key changed across a reboot"
    );
    a.power_off();

    // --- node B: a bad config ---
    let bad = work.path().join("node-b.toml");
    std::fs::write(&bad, "version = 1\nhostname = \"ok\"\nhostnme = \"typo\"\n").unwrap();
    let mut b = boot(&test_image().image, "b", &bad, None);
    let state = must(b.wait_booted());
    assert_eq!(
        state, "degraded",
        "a failed provisioning shows in the boot's state"
    );
    let st = status(&mut b);
    assert_eq!(st["provision"]["result"], "failed", "{:#}", st["provision"]);
    let error = st["provision"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("line 3") && error.contains("hostnme"),
        "{error}"
    );
    let text = must(b.ok("host status"));
    assert!(text.contains("Provisioning: FAILED"), "{text}");
    // On the console too (the serial log), and the node is still usable.
    let console = b.serial_text();
    assert!(
        console.contains("provisioning failed"),
        "console:\n{console}"
    );
    assert_ne!(must(b.ok("cat /proc/sys/kernel/hostname")).trim(), "ok");
    // Its own identity, not A's.
    let b_machine_id = must(b.ok("cat /etc/machine-id")).trim().to_string();
    assert_eq!(b_machine_id.len(), 32, "{b_machine_id}");
    assert_ne!(b_machine_id, a_machine_id, "two nodes share a machine id");
    assert_ne!(host_key(&mut b), a_key, "two nodes share an SSH host key");

    // --- node B, fixed: the next boot tries again, and kernel arguments
    // come as a new deployment the node reboots into by itself ---
    std::fs::write(
        &bad,
        format!("version = 1\nhostname = \"prov-node-b\"\nkernel-args = [\"{KARG}\"]\n"),
    )
    .unwrap();
    let first = b.boot_id().map(str::to_string);
    // A new QEMU process reads the fw_cfg file again. The control shell
    // starts after provisioning, so the boot that reboots never answers:
    // the one that does runs the new deployment.
    must(b.power_cut_and_restart());
    assert_ne!(b.boot_id().map(str::to_string), first);
    must(b.wait_booted());
    let cmdline = must(b.ok("cat /proc/cmdline"));
    assert!(cmdline.split_whitespace().any(|a| a == KARG), "{cmdline}");
    let st = status(&mut b);
    assert_eq!(
        st["provision"]["result"], "applied",
        "{:#}",
        st["provision"]
    );
    assert_eq!(st["provision"]["kernelArgs"], serde_json::json!([KARG]));
    assert_eq!(
        st["deployments"].as_array().map(Vec::len),
        Some(2),
        "{st:#}"
    );
    assert_eq!(
        must(b.ok("cat /proc/sys/kernel/hostname")).trim(),
        "prov-node-b"
    );
    b.power_off();
}
