//! The fleet network on booted nodes (issue 16, QEMU): two guests of the
//! apps image share one virtual L2, a QEMU `stream` netdev over a unix
//! socket in the run directory (nothing leaves loopback), and reach a real
//! etcd on the build machine's loopback through user-mode networking
//! (10.0.2.2). Each gets its fleet network from a node config in fw_cfg;
//! `cairn-net.service` does the rest.
//!
//! Checked: the nodes lease different subnets and route to each other's
//! (host-gw); a container on A fetches `web.service.cairn` served by a
//! container on B, whose server logs the client container's own address;
//! no NAT rule exists on either node; a failed health check takes the
//! instance out of A's DNS; node A itself resolves `web.service.cairn`
//! through systemd-resolved; a new instance on A answers in B's DNS; the
//! same in VXLAN mode; B powered off: its subnet and records expire on A.
//!
//! Run with `cargo test -p qemu-tests --test fleet_network -- --test-threads=1` as root.

#[path = "support/apps_image.rs"]
mod apps_image;

use std::path::Path;
use std::time::{Duration, Instant};

use apps_image::*;
use qemu_tests::fixture::build_dir;
use qemu_tests::{Vm, VmConfig};
use serde_json::Value;

/// The underlay NIC: its PCI slot fixes its name in the guest (ens9).
const UNDERLAY_SLOT: u32 = 9;
const UNDERLAY_IF: &str = "ens9";
/// The nodes' grace: short, so a powered-off node's subnet expires in the test.
const GRACE: &str = "10s";

struct Node {
    vm: Vm,
    name: &'static str,
}

fn config(name: &str, n: u8, etcd_port: u16) -> String {
    format!(
        r#"version = 1
hostname = "{name}"

[[network.interfaces]]
mac = "52:54:00:fe:00:0{n}"
addresses = ["192.168.100.{n}/24"]

[fleet]
etcd-endpoints = ["http://10.0.2.2:{etcd_port}"]
cidr = "10.240.0.0/16"
mode = "host-gw"
underlay-interface = "{UNDERLAY_IF}"
subnet-grace = "{GRACE}"
"#
    )
}

fn start(name: &'static str, n: u8, config: &Path, l2: &Path, server: bool) -> Node {
    let runs = build_dir("qemu-tests/runs");
    qemu_tests::remove_stale_runs(&runs, &format!("fleetnet-{name}"));
    let workdir = runs.join(format!("fleetnet-{name}.{}", std::process::id()));
    let mut cfg = VmConfig::new(&apps_image().image, &workdir);
    cfg.memory_mib = 1024;
    // One vCPU each: in CI these two boot beside the other lane's guest on a
    // two-core machine, and every vCPU is a host thread under TCG.
    cfg.cpus = 1;
    cfg.extra_args = vec![
        "-fw_cfg".into(),
        format!("name=opt/org.cairn/config,file={}", config.display()),
        "-netdev".into(),
        format!(
            "stream,id=l2,server={},addr.type=unix,addr.path={}",
            if server { "on" } else { "off" },
            l2.display()
        ),
        "-device".into(),
        format!("virtio-net-pci,netdev=l2,mac=52:54:00:fe:00:0{n},addr={UNDERLAY_SLOT:#x}"),
    ];
    Node {
        vm: must(Vm::start(cfg)),
        name,
    }
}

impl Node {
    fn ok(&mut self, cmd: &str) -> String {
        match self.vm.ok(cmd) {
            Ok(out) => out,
            Err(e) => {
                let diag = self.diag();
                panic!("{}: {e:#}\n{diag}", self.name)
            }
        }
    }

    fn diag(&mut self) -> String {
        self.vm
            .run(
                "systemctl --failed --no-legend; journalctl -b -u cairn-net --no-pager | tail -40; \
                 ip -4 addr; ip route; host app ps",
            )
            .map(|o| o.to_string())
            .unwrap_or_default()
    }

    fn net(&mut self) -> Value {
        serde_json::from_str(&self.ok("host net status --json")).unwrap()
    }

    /// Polls `check` (a guest command) until it succeeds.
    fn wait(&mut self, what: &str, check: &str, limit: Duration) -> (String, Duration) {
        let t0 = Instant::now();
        loop {
            let out = must(self.vm.run(check));
            if out.success() {
                return (out.stdout, t0.elapsed());
            }
            if t0.elapsed() > limit {
                let diag = self.diag();
                panic!(
                    "{}: {what}: not within {limit:?}: {out}\n{}",
                    self.name, diag
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `nslookup NAME` against this node's own DNS, from inside `container`.
    fn lookup(&self, container: &str, name: &str) -> String {
        format!("host app exec {container} nslookup {name}")
    }
}

fn subnet_prefix(subnet: &str) -> String {
    subnet.trim_end_matches(".0/24").to_string()
}

#[test]
fn containers_on_two_booted_nodes_find_and_reach_each_other() {
    cairn_test_support::require_root("boots QEMU guests");
    let etcd = cairn_test_support::Etcd::start();
    let work = tempfile::tempdir().unwrap();
    let l2 = work.path().join("l2.sock");
    let (ca, cb) = (work.path().join("a.toml"), work.path().join("b.toml"));
    std::fs::write(&ca, config("fleet-a", 1, etcd.port())).unwrap();
    std::fs::write(&cb, config("fleet-b", 2, etcd.port())).unwrap();

    // A listens on the L2 socket, B connects to it: both boot side by side.
    let t0 = Instant::now();
    let mut a = start("fleet-a", 1, &ca, &l2, true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !l2.exists() {
        assert!(
            Instant::now() < deadline,
            "QEMU made no L2 socket at {}",
            l2.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut b = start("fleet-b", 2, &cb, &l2, false);
    for n in [&mut a, &mut b] {
        must(n.vm.wait_ready());
    }
    eprintln!(
        "fleet_network: both nodes up {:.0} s after QEMU started",
        t0.elapsed().as_secs_f64()
    );
    for n in [&mut a, &mut b] {
        let link = n.ok(&format!("ip -o link show dev {UNDERLAY_IF}"));
        assert!(link.contains("52:54:00:fe:00:0"), "{link}");
        n.wait(
            "cairn-net to lease",
            "test -s /run/cairn/network/node.json",
            Duration::from_secs(180),
        );
    }
    let (na, nb) = (a.net(), b.net());
    let sa = na["node"]["subnet"].as_str().unwrap().to_string();
    let sb = nb["node"]["subnet"].as_str().unwrap().to_string();
    assert_ne!(sa, sb, "two nodes got one subnet");
    assert_eq!(na["node"]["underlay"], "192.168.100.1");
    let (pa, pb) = (subnet_prefix(&sa), subnet_prefix(&sb));
    let (route, _) = a.wait(
        "A's route to B's subnet",
        &format!("ip route show proto 211 | grep -F '{sb} via 192.168.100.2'"),
        Duration::from_secs(60),
    );
    eprintln!("fleet_network: A {sa}, B {sb}; A routes {}", route.trim());

    // The baked app's image (in the host tree) runs the tests'
    // containers. B serves `web` while /run/flag/ok exists on B.
    b.ok("mkdir -p /run/flag && touch /run/flag/ok");
    let web_ip = format!("{pb}.20");
    b.ok(&format!(
        "host app run -d --name web-b --ip {web_ip} --service web:{APP_PORT} \
         --health-cmd 'test -e /flag/ok' --health-interval 1s --health-retries 1 \
         -v /run/flag:/flag:ro {APP_IMAGE} /bin/httpd -f -vv -p {APP_PORT} -h /www"
    ));
    // A long-lived client on A, to exec lookups and fetches in.
    let client_ip = format!("{pa}.30");
    a.ok(&format!(
        "host app run -d --name client --ip {client_ip} {APP_IMAGE} /bin/sleep 100000"
    ));
    a.wait(
        "web in A's DNS",
        &format!(
            "{} | grep -F '{web_ip}'",
            a.lookup("client", "web.service.cairn")
        ),
        Duration::from_secs(60),
    );
    let page = a.ok(&format!(
        "host app exec client wget -q -O - http://web.service.cairn:{APP_PORT}/"
    ));
    assert!(page.contains(APP_PAGE), "{page}");
    let logs = b.ok("host app logs web-b");
    assert!(
        logs.lines().any(|l| l.starts_with(&format!("{client_ip}:"))
            || l.starts_with(&format!("[::ffff:{client_ip}]:"))),
        "B's server must log the client container's own address {client_ip}: {logs}"
    );
    for n in [&mut a, &mut b] {
        let rules = n.ok("(nft list ruleset 2>/dev/null; iptables-save 2>/dev/null) | grep -ciE 'masquerade|snat|dnat' || true");
        assert_eq!(rules.trim(), "0", "{}: a NAT rule exists", n.name);
    }
    // The node itself resolves *.cairn (resolved sends the zone to the
    // bridge's DNS); other names still go to its DHCP resolvers.
    a.wait(
        "node A resolving web.service.cairn",
        &format!("getent hosts web.service.cairn | grep -F '{web_ip}'"),
        Duration::from_secs(60),
    );
    let resolv = a.ok("readlink /etc/resolv.conf; resolvectl domain cairn0");
    assert!(resolv.contains("~cairn"), "{resolv}");
    let services: Value = serde_json::from_str(&b.ok("host service ls --json")).unwrap();
    assert_eq!(services[0]["node"], "fleet-b", "{services}");

    // A failed health check takes it out of DNS fleet-wide.
    b.ok("rm /run/flag/ok");
    let (_, gone) = a.wait(
        "web to leave A's DNS",
        &format!(
            "! {} | grep -F '{web_ip}'",
            a.lookup("client", "web.service.cairn")
        ),
        Duration::from_secs(30),
    );
    eprintln!(
        "fleet_network: failed health check (interval 1 s) out of A's DNS within {:.1} s",
        gone.as_secs_f64()
    );
    b.ok("touch /run/flag/ok");

    // A new instance on A, seen in B's DNS.
    b.ok(&format!(
        "host app run -d --name probe {APP_IMAGE} /bin/sleep 100000"
    ));
    a.ok(&format!(
        "host app run -d --name web-a --service web:{APP_PORT} {APP_IMAGE}"
    ));
    let (_, seen) = b.wait(
        "web-a in B's DNS",
        &format!(
            "{} | grep -F '{pa}.'",
            b.lookup("probe", "web.service.cairn")
        ),
        Duration::from_secs(30),
    );
    eprintln!(
        "fleet_network: a new instance on A in B's DNS {:.1} s after `run -d` returned (each poll is a `host app exec` under TCG)",
        seen.as_secs_f64()
    );

    // VXLAN: the same nodes, their subnets back, routes through cairn-vx.
    for n in [&mut a, &mut b] {
        n.ok("sed -i 's/^mode = .*/mode = \"vxlan\"/' /etc/cairn/network.toml && systemctl restart cairn-net");
    }
    let (vx, _) = a.wait(
        "A's VXLAN route to B",
        &format!("ip route show proto 211 | grep -F '{sb} via {pb}.0 dev cairn-vx'"),
        Duration::from_secs(60),
    );
    eprintln!("fleet_network: VXLAN route {}", vx.trim());
    assert_eq!(a.net()["node"]["subnet"], sa.as_str());
    let page = a.ok(&format!(
        "host app exec client wget -q -O - http://{web_ip}:{APP_PORT}/"
    ));
    assert!(page.contains(APP_PAGE), "over VXLAN: {page}");

    // B powered off: its subnet and its records expire on A.
    b.vm.power_off();
    let off = Instant::now();
    a.wait(
        "B's subnet to leave A's routes",
        &format!("! ip route show proto 211 | grep -F '{sb}'"),
        Duration::from_secs(120),
    );
    a.wait(
        "B's records to leave the directory",
        &format!("! host service ls --json | grep -F '{web_ip}'"),
        Duration::from_secs(120),
    );
    eprintln!(
        "fleet_network: B powered off; its subnet and records gone on A within {:.0} s (grace {GRACE}, records 10 s)",
        off.elapsed().as_secs_f64()
    );
    drop(etcd);
}
