//! The fleet network end to end, on one machine: two "nodes" are network
//! namespaces on one virtual L2 (a bridge with an address from the
//! benchmarking range 198.18.0.0/15), etcd listens on that bridge, each
//! node runs the real `host net agent`, and real containers run by
//! `host app` inside each node reach each other across nodes, in host-gw
//! and VXLAN mode, with their own addresses.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{require_root, text};

const LAN_ADDR: &str = "198.18.77.254";
const CIDR: &str = "10.240.0.0/16";

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip(8)");
    assert!(out.status.success(), "ip {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node: a network namespace with an underlay veth on the lan bridge.
struct Node {
    ns: String,
    dir: PathBuf,
    underlay: String,
    agent: Option<Child>,
}

impl Node {
    fn new(tag: &str, lan: &str, n: u8, base: &Path) -> Node {
        let ns = format!("cnt-{tag}-{}", std::process::id());
        let host_end = format!("cu{tag}{}", std::process::id() % 100_000);
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &host_end, "master", lan, "up"]);
        let underlay = format!("198.18.77.{n}");
        for cmd in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{underlay}/24"), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
        ] {
            let mut all = vec!["-n", ns.as_str()];
            all.extend(cmd.iter().copied());
            ip(&all);
        }
        let dir = base.join(tag);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::write(
            dir.join("machine-id"),
            format!("{:032x}\n", 0xcafe_0000 + u32::from(n)),
        )
        .unwrap();
        Node {
            ns,
            dir,
            underlay,
            agent: None,
        }
    }

    /// `host ARGS` inside the node, with the node's own app root and lease.
    fn host(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, env!("CARGO_BIN_EXE_host")]);
        c.env("CAIRN_ROOT", self.dir.join("apps"));
        c.env("CAIRN_NODE_NETWORK", self.dir.join("node.json"));
        c.env("CAIRN_REGISTRATION_DIR", self.dir.join("services"));
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.host().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{} host {args:?}: {}",
            self.ns,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn in_ns(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command of the build machine's, run inside the node's namespace.
    fn ns_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .unwrap()
    }

    /// [`Node::ns_output`]'s stdout and stderr, whether it failed or not.
    fn host_ns(&self, args: &[&str]) -> String {
        let out = self.ns_output(args);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// [`Node::ns_output`]'s stdout; it must succeed.
    fn in_ns_cmd(&self, args: &[&str]) -> String {
        let out = self.ns_output(args);
        assert!(out.status.success(), "{} {args:?}: {}", self.ns, text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn write_config(&self, etcd: &str, mode: &str, cidr: &str) -> PathBuf {
        let path = self
            .dir
            .join(format!("network-{mode}-{}.toml", cidr.replace('/', "_")));
        std::fs::write(
            &path,
            format!(
                "etcd-endpoints = [\"{etcd}\"]\ncidr = \"{cidr}\"\nnode-prefix = 24\nmode = \"{mode}\"\nunderlay-interface = \"eth0\"\nsubnet-grace = \"6s\"\n"
            ),
        )
        .unwrap();
        path
    }

    fn agent_command(&self, config: &Path) -> Command {
        let mut c = self.host();
        c.args(["net", "agent", "--no-networkd", "--config"])
            .arg(config)
            .arg("--node-network")
            .arg(self.dir.join("node.json"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--machine-id")
            .arg(self.dir.join("machine-id"));
        c
    }

    fn start_agent(&mut self, config: &Path) -> serde_json::Value {
        self.stop_agent();
        let _ = std::fs::remove_file(self.dir.join("node.json"));
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        let child = self
            .agent_command(config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(b) = std::fs::read(self.dir.join("node.json")) {
                return serde_json::from_slice(&b).unwrap();
            }
            if let Some(st) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("{}'s agent exited ({st}): {}", self.ns, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{}'s agent never joined: {}",
                self.ns,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["net", "status", "--json"])).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_agent();
        // Containers first: their processes would keep the namespace alive.
        for c in ["web", "web2"] {
            let _ = self.host().args(["app", "rm", "-f", c]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

struct Lan(String);
impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn busybox_image(dir: &Path) -> PathBuf {
    let layout = dir.join("oci");
    let spec = cairn_test_support::LayoutSpec {
        applets: cairn_test_support::Applets::Only(&[
            "sh", "httpd", "wget", "cat", "sleep", "test", "nslookup", "timeout",
        ]),
        dirs: &["www"],
        files: &[("www/index.html", b"served by node B\n")],
        cmd: &["/bin/sh"],
        ..Default::default()
    };
    cairn_test_support::busybox_layout(&layout, &spec).unwrap();
    layout
}

/// A's client container fetches B's page across the fleet; B's server
/// log shows the client's own address.
fn fetch_across(a: &Node, b: &Node, client_ip: &str, server_ip: &str) {
    let url = format!("http://{server_ip}:8080/");
    let out = a.ok(&[
        "app", "run", "--rm", "--ip", client_ip, "bb", "wget", "-q", "-O", "-", &url,
    ]);
    assert_eq!(out, "served by node B\n");
    let logs = b.ok(&["app", "logs", "web"]);
    // httpd -vv starts each line with the peer: `IP:PORT` or `[::ffff:IP]:PORT`.
    let from_client = |l: &str| {
        l.starts_with(&format!("{client_ip}:")) || l.starts_with(&format!("[::ffff:{client_ip}]:"))
    };
    assert!(
        logs.lines().any(from_client),
        "the server must see the client container's own address {client_ip} (no NAT): {logs}"
    );
}

#[test]
#[ignore = "privileged: needs root, network namespaces and etcd; run by scripts/test"]
fn containers_on_two_nodes_reach_each_other_with_their_own_addresses() {
    require_root("creates network namespaces, bridges and containers");
    let tmp = tempfile::tempdir().unwrap();
    let lan_name = format!("cnl{}", std::process::id() % 100_000);
    ip(&["link", "add", &lan_name, "type", "bridge"]);
    let lan = Lan(lan_name);
    ip(&["addr", "add", &format!("{LAN_ADDR}/24"), "dev", &lan.0]);
    ip(&["link", "set", &lan.0, "up"]);
    let etcd = cairn_test_support::Etcd::start_on(LAN_ADDR.parse().unwrap());
    let url = etcd.url().to_string();

    let mut a = Node::new("a", &lan.0, 1, tmp.path());
    let mut b = Node::new("b", &lan.0, 2, tmp.path());
    let image = busybox_image(tmp.path());
    for n in [&a, &b] {
        n.ok(&["app", "import", image.to_str().unwrap(), "--name", "bb"]);
    }

    // host-gw: each node leases its own /24 and routes to the other's.
    let cfg_a = a.write_config(&url, "host-gw", CIDR);
    let cfg_b = b.write_config(&url, "host-gw", CIDR);
    let na = a.start_agent(&cfg_a);
    let nb = b.start_agent(&cfg_b);
    let (sa, sb) = (
        na["subnet"].as_str().unwrap(),
        nb["subnet"].as_str().unwrap(),
    );
    assert_ne!(sa, sb, "two nodes got one subnet");
    for s in [sa, sb] {
        assert!(s.starts_with("10.240.") && s.ends_with(".0/24"), "{s}");
    }
    let prefix = |s: &str| s.trim_end_matches(".0/24").to_string();
    let (pa, pb) = (prefix(sa), prefix(sb));
    assert!(a
        .in_ns(&["-4", "addr", "show", "dev", "cairn0"])
        .contains(&format!("{pa}.1/24")));
    let route = wait_for("A's route to B's subnet", Duration::from_secs(20), || {
        let r = a.in_ns(&["route", "show", "proto", "211"]);
        r.contains(sb).then_some(r)
    });
    assert!(route.contains(&format!("via {}", b.underlay)), "{route}");

    // A server on B, a client on A, by address: no NAT anywhere. The
    // server is an instance of service `web` while /flag/ok exists.
    let web_ip = format!("{pb}.20");
    let flag = tmp.path().join("flag");
    std::fs::create_dir_all(&flag).unwrap();
    std::fs::write(flag.join("ok"), "").unwrap();
    let volume = format!("{}:/flag:ro", flag.display());
    b.ok(&[
        "app",
        "run",
        "-d",
        "--name",
        "web",
        "--ip",
        &web_ip,
        "--service",
        "web:8080",
        "--health-cmd",
        "test -e /flag/ok",
        "--health-interval",
        "500ms",
        "--health-retries",
        "1",
        "-v",
        &volume,
        "bb",
        "httpd",
        "-f",
        "-vv",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    fetch_across(&a, &b, &format!("{pa}.30"), &web_ip);

    // Found by name: A's container resolves web.service.cairn through A's
    // DNS (its resolv.conf names A's bridge), which answers from etcd.
    let listed = wait_for(
        "web in `host service ls` on A",
        Duration::from_secs(20),
        || {
            let out = a.ok(&["service", "ls", "--json"]);
            out.contains(&web_ip).then_some(out)
        },
    );
    let rows: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(rows[0]["service"], "web", "{rows}");
    assert_eq!(rows[0]["port"], 8080, "{rows}");
    let by_name = a.ok(&[
        "app",
        "run",
        "--rm",
        "bb",
        "wget",
        "-q",
        "-O",
        "-",
        "http://web.service.cairn:8080/",
    ]);
    assert_eq!(by_name, "served by node B\n");
    let srv = a.ok(&[
        "app",
        "run",
        "--rm",
        "bb",
        "nslookup",
        "-type=SRV",
        "web.service.cairn",
    ]);
    assert!(srv.contains("8080") && srv.contains("web."), "{srv}");

    // A failed health check takes the instance out of DNS everywhere.
    std::fs::remove_file(flag.join("ok")).unwrap();
    let failed = Instant::now();
    let gateway_a = format!("{pa}.1");
    wait_for("web to leave A's DNS", Duration::from_secs(10), || {
        let out = a.host_ns(&["/bin/busybox", "nslookup", "web.service.cairn", &gateway_a]);
        (!out.contains(&web_ip)).then_some(out)
    });
    eprintln!(
        "a failed health check left the other node's DNS {:.2} s after the flag went (interval 500 ms)",
        failed.elapsed().as_secs_f64()
    );
    std::fs::write(flag.join("ok"), "").unwrap();

    // A new instance on A is visible on B at once.
    let gateway_b = format!("{pb}.1");
    let started = Instant::now();
    a.ok(&[
        "app",
        "run",
        "-d",
        "--name",
        "web2",
        "--service",
        "web:8080",
        "bb",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let ran = started.elapsed();
    let web2 = wait_for("web2 in B's DNS", Duration::from_secs(10), || {
        let out = b.host_ns(&["/bin/busybox", "nslookup", "web.service.cairn", &gateway_b]);
        out.contains(&format!("{pa}.")).then_some(out)
    });
    eprintln!(
        "a new instance on A answered in B's DNS {:.2} s after `host app run -d` returned: {web2}",
        (started.elapsed() - ran).as_secs_f64()
    );
    a.ok(&["app", "rm", "-f", "web2"]);
    let st = a.status();
    assert_eq!(st["node"]["subnet"], sa);
    assert_eq!(st["etcd"], "ok");
    assert_eq!(st["peers"][0]["subnet"], sb, "{st}");
    assert_eq!(st["peers"][0]["routed"], true, "{st}");

    // A hostile record (underlay on loopback) is never routed.
    let c = cairn_etcd::Etcd::new(std::slice::from_ref(&url)).unwrap();
    let rec =
        br#"{"node":"ffffffffffffffffffffffffffffffff","hostname":"evil","underlay":"127.0.0.1"}"#;
    c.put("/cairn/network/subnets/10.240.250.0-24", rec, None)
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let routes = a.in_ns(&["route", "show", "proto", "211"]);
    assert!(!routes.contains("10.240.250.0"), "{routes}");
    assert!(
        a.log()
            .contains("10.240.250.0/24: underlay address 127.0.0.1"),
        "{}",
        a.log()
    );

    // A node configured for another fleet CIDR refuses to join.
    let wrong = a.write_config(&url, "host-gw", "10.241.0.0/16");
    let out = a.agent_command(&wrong).output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("the fleet in etcd uses 10.240.0.0/16"),
        "{}",
        text(&out)
    );

    // VXLAN: the same nodes take their subnets back and route through cairn-vx.
    let vx_a = a.write_config(&url, "vxlan", CIDR);
    let vx_b = b.write_config(&url, "vxlan", CIDR);
    assert_eq!(a.start_agent(&vx_a)["subnet"], sa, "{}", a.log());
    assert_eq!(b.start_agent(&vx_b)["subnet"], sb, "{}", b.log());
    assert!(a.log().contains("(held before)"), "{}", a.log());
    let route = wait_for("A's VXLAN route to B", Duration::from_secs(20), || {
        let r = a.in_ns(&["route", "show", "proto", "211"]);
        (r.contains(sb) && r.contains("dev cairn-vx")).then_some(r)
    });
    assert!(route.contains("onlink"), "{route}");
    assert_eq!(a.status()["node"]["mtu"], 1450);
    fetch_across(&a, &b, &format!("{pa}.31"), &web_ip);
    // Containers started now get the tunnel's MTU on their link.
    let mtu = a.ok(&["app", "run", "--rm", "bb", "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1450");

    // Beyond the fleet: without masquerade a container's packets keep its
    // address, which the LAN cannot route back; with masquerade-egress they
    // leave behind the node's. Inside the fleet nothing changes.
    let outside = format!("http://{LAN_ADDR}:{}/health", etcd.port());
    // (Under `sh -c … || exit 1`, so wget is not the container's first
    // process, which ignores timeout's signals as every PID namespace's
    // init does.)
    let out = a
        .host()
        .args([
            "app",
            "run",
            "--rm",
            "bb",
            "sh",
            "-c",
            &format!("timeout 3 wget -q -O - {outside} || exit 1"),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "reached beyond the fleet without NAT: {}",
        text(&out)
    );
    let masq_a = a.dir.join("network-masquerade.toml");
    std::fs::write(
        &masq_a,
        std::fs::read_to_string(&vx_a).unwrap() + "masquerade-egress = true\n",
    )
    .unwrap();
    assert_eq!(a.start_agent(&masq_a)["subnet"], sa);
    let health = a.ok(&[
        "app",
        "run",
        "--rm",
        "bb",
        "sh",
        "-c",
        &format!("timeout 10 wget -q -O - {outside} || exit 1"),
    ]);
    assert!(health.contains("health"), "{health}");
    let table = a.in_ns_cmd(&["nft", "list", "table", "ip", "cairn"]);
    assert!(
        table.contains("masquerade") && table.contains(&format!("ip daddr != {CIDR}")),
        "{table}"
    );
    fetch_across(&a, &b, &format!("{pa}.32"), &web_ip);

    // B dies: its lease runs out after the grace (6 s) and A drops the route.
    b.stop_agent();
    let started = Instant::now();
    wait_for("B's subnet to expire on A", Duration::from_secs(30), || {
        let r = a.in_ns(&["route", "show", "proto", "211"]);
        (!r.contains(sb)).then_some(r)
    });
    eprintln!(
        "B's subnet left A's routes {:.1} s after B's agent died",
        started.elapsed().as_secs_f64()
    );
    let gone = wait_for(
        "B's instances to leave the directory",
        Duration::from_secs(30),
        || {
            let out = a.ok(&["service", "ls", "--json"]);
            (!out.contains(&web_ip)).then_some(out)
        },
    );
    assert!(!gone.contains(&web_ip));
    eprintln!(
        "B's service records left the directory {:.1} s after B's agent died (registration TTL 10 s)",
        started.elapsed().as_secs_f64()
    );
    assert!(a.status()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["subnet"] != sb));
    drop(etcd);
}
