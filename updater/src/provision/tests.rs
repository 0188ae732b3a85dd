use super::config::{json_schema, NodeConfig};
use super::render::{render, Entry};

const EXAMPLE: &str = include_str!("../../../docs/provisioning-example.toml");
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f me@x";

fn file<'a>(plan: &'a super::Plan, path: &str) -> &'a str {
    plan.entries
        .iter()
        .find_map(|e| match e {
            Entry::File {
                path: p, content, ..
            } if p == path => Some(std::str::from_utf8(content).unwrap()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{path} is not rendered"))
}

fn refused(text: &str) -> String {
    match NodeConfig::parse(text, "test.toml") {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn the_documented_example_parses_and_renders() {
    let c = NodeConfig::parse(EXAMPLE, "docs/provisioning-example.toml").unwrap();
    let plan = render(&c).unwrap();
    assert_eq!(file(&plan, "/etc/hostname"), "node-1.example.net\n");
    assert!(plan.entries.contains(&Entry::Symlink {
        path: "/etc/localtime".into(),
        target: "../usr/share/zoneinfo/Europe/Berlin".into()
    }));
    assert_eq!(
        file(&plan, "/etc/systemd/network/05-cairn-provision-0.network"),
        "# Written by cairn provisioning from the node config.\n[Match]\nMACAddress=52:54:00:12:34:56\n\n\
         [Network]\nDHCP=no\nAddress=192.0.2.10/24\nGateway=192.0.2.1\nDNS=192.0.2.53\n\n\
         [Route]\nDestination=198.51.100.0/24\nGateway=192.0.2.254\n"
    );
    assert!(file(&plan, "/var/roothome/.ssh/authorized_keys").ends_with("ops@example.net\n"));
    let alice = plan
        .entries
        .iter()
        .find(|e| e.path() == "/var/home/alice/.ssh/authorized_keys")
        .unwrap();
    assert!(matches!(alice, Entry::File { mode: 0o600, owner, .. } if owner == "alice"));
    assert_eq!(plan.accounts[1].name, "alice");
    assert_eq!(plan.accounts[1].groups, ["sudo"]);
    assert_eq!(plan.accounts[1].password_hash, None);
    assert_eq!(
        file(&plan, "/etc/sysctl.d/90-cairn-provision.conf"),
        "# Written by cairn provisioning from the node config.\nnet.core.somaxconn = 1024\nvm.swappiness = 10\n"
    );
    // The agent reads its drop-in back with its own parser.
    let agent = file(&plan, "/etc/cairn/agent.d/50-provision.toml");
    let cfg = crate::agent::AgentConfig::from_str(agent, Some("m".into())).unwrap();
    assert_eq!(cfg.policy, crate::agent::Policy::Apply);
    assert_eq!(cfg.strategy, crate::agent::Strategy::FleetLock);
    assert_eq!(cfg.fleet_lock.unwrap().group, "workers");
    // The fleet network's agent reads its config back with its own parser.
    let fleet = file(&plan, cairn_contracts::network::NETWORK_CONFIG);
    assert!(
        fleet.starts_with("# Written by cairn provisioning"),
        "{fleet}"
    );
    assert!(
        fleet.contains("etcd-endpoints = [\"http://192.0.2.5:2379\"]"),
        "{fleet}"
    );
    assert!(fleet.contains("cidr = \"10.88.0.0/14\""), "{fleet}");
    assert!(fleet.contains("node-prefix = 24"), "{fleet}");
    assert!(fleet.contains("mode = \"auto\""), "{fleet}");
    let net = cairn_contracts::network::FleetNetwork::parse(fleet).unwrap();
    assert_eq!(Some(&net), c.fleet.as_ref());
    assert!(plan.entries.iter().any(|e| matches!(
        e,
        Entry::File { path, mode: 0o644, .. } if path == "/etc/cairn/network.toml"
    )));
    let check = plan
        .entries
        .iter()
        .find(|e| e.path() == "/etc/cairn/health.d/required/gateway-reachable")
        .unwrap();
    assert!(matches!(check, Entry::File { mode: 0o755, .. }));
    let unit = file(&plan, "/etc/systemd/system/cairn-app-web.service");
    assert!(unit.contains(
        "ExecStart=\"/usr/bin/host\" \"app\" \"run\" \"--detach\" \"--name\" \"web\" \"--restart\" \"always\" \"--memory\" \"128M\" \"web:1\"\n"
    ), "{unit}");
    assert_eq!(plan.units, ["cairn-app-web.service"]);
    assert_eq!(file(&plan, "/etc/motd"), "cairn node 1\n");
    assert_eq!(plan.kernel_args, ["mitigations=auto"]);
    assert_eq!(
        plan.follow.as_deref(),
        Some("cairn:cairn/bookworm/x86_64/green")
    );
    assert_eq!(
        plan.remote_url.as_deref(),
        Some("https://updates.example.net/cairn/repo")
    );
}

#[test]
fn a_minimal_config_renders_nothing_but_what_it_says() {
    let c = NodeConfig::parse("version = 1\nhostname = \"n1\"\n", "t").unwrap();
    let plan = render(&c).unwrap();
    assert_eq!(plan.entries.len(), 1);
    assert!(plan.accounts.is_empty() && plan.kernel_args.is_empty() && plan.units.is_empty());
}

#[test]
fn a_fleet_section_renders_the_network_config_with_its_defaults() {
    let c = NodeConfig::parse(
        "version = 1\n[fleet]\netcd-endpoints = [\"http://10.0.2.2:2379\"]\n",
        "t",
    )
    .unwrap();
    let plan = render(&c).unwrap();
    assert_eq!(plan.entries.len(), 1);
    let text = file(&plan, "/etc/cairn/network.toml");
    assert_eq!(
        text,
        "# Written by cairn provisioning from the node config.\n\
         etcd-endpoints = [\"http://10.0.2.2:2379\"]\n\
         cidr = \"10.88.0.0/14\"\n\
         node-prefix = 24\n\
         mode = \"auto\"\n\
         subnet-grace = \"5m\"\n\
         masquerade-egress = false\n"
    );
    cairn_contracts::network::FleetNetwork::parse(text).unwrap();
}

#[test]
fn unknown_keys_are_refused_with_their_line() {
    let e = refused(
        "version = 1\nhostname = \"a\"\n\n[[users]]\nname = \"bob\"\nshell = \"/bin/zsh\"\n",
    );
    assert!(e.contains("line 6"), "{e}");
    assert!(e.contains("shell"), "{e}");
    let e = refused("version = 1\n[agent]\npolicy = \"apply\"\nwindw = {}\n");
    assert!(e.contains("line 4") && e.contains("windw"), "{e}");
}

#[test]
fn bad_values_are_refused_naming_their_key() {
    let cases: &[(&str, &str)] = &[
        ("version = 2", "version: 2"),
        ("version = 1\nhostname = \"-bad\"", "hostname"),
        ("version = 1\nhostname = \"a b\"", "hostname"),
        ("version = 1\ntimezone = \"../../etc/shadow\"", "timezone"),
        ("version = 1\n[[users]]\nname = \"Root\"", "users[0].name"),
        (
            "version = 1\n[[users]]\nname = \"a\"\n[[users]]\nname = \"a\"",
            "listed twice",
        ),
        (
            "version = 1\n[[users]]\nname = \"a\"\nssh-authorized-keys = [\"ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQAB x\"]",
            "not a ssh-ed25519 key",
        ),
        (
            "version = 1\n[[users]]\nname = \"a\"\nssh-authorized-keys = [\"command=\\\"sh\\\" ssh-ed25519 AAAA\"]",
            "ssh-authorized-keys[0]",
        ),
        (
            "version = 1\n[[users]]\nname = \"a\"\nssh-authorized-keys = [\"ssh-ed25519 !!!\"]",
            "base64",
        ),
        (
            "version = 1\n[[users]]\nname = \"a\"\npassword-hash = \"hunter2\"",
            "clear-text",
        ),
        (
            "version = 1\n[[network.interfaces]]\nname = \"eth0\"\nmac = \"52:54:00:00:00:01\"",
            "exactly one of",
        ),
        (
            "version = 1\n[[network.interfaces]]\nname = \"eth0\"\naddresses = [\"192.0.2.1\"]",
            "no prefix length",
        ),
        (
            "version = 1\n[[network.interfaces]]\nname = \"eth0\"\naddresses = [\"192.0.2.1/33\"]",
            "prefix length",
        ),
        (
            "version = 1\n[[network.interfaces]]\nname = \"eth0\"\nroutes = [{ destination = \"10.1.2.3/8\", gateway = \"10.0.0.1\" }]",
            "host bits",
        ),
        (
            "version = 1\n[[network.interfaces]]\nname = \"eth0\"\ndhcp = false",
            "unconfigured",
        ),
        (
            "version = 1\n[[network.interfaces]]\nname = \"eth0\"\n[[network.interfaces]]\nname = \"eth0\"",
            "twice",
        ),
        ("version = 1\n[sysctl]\n\"kernel.x\" = \"1\\n2\"", "one non-empty line"),
        ("version = 1\n[sysctl]\n\"../x\" = 1", "not a sysctl key"),
        (
            "version = 1\n[[files]]\npath = \"/usr/bin/x\"\ncontent = \"\"",
            "under /etc or /var",
        ),
        (
            "version = 1\n[[files]]\npath = \"/etc/../usr/bin/x\"\ncontent = \"\"",
            "plain absolute path",
        ),
        (
            "version = 1\n[[files]]\npath = \"/etc/x\"\ncontent = \"\"\ncontent-base64 = \"\"",
            "not both",
        ),
        ("version = 1\n[[files]]\npath = \"/etc/x\"", "give `content`"),
        (
            "version = 1\n[[files]]\npath = \"/etc/shadow\"\ncontent = \"\"",
            "written by provisioning itself",
        ),
        (
            "version = 1\n[[files]]\npath = \"/var/lib/cairn/provision/state.json\"\ncontent = \"\"",
            "written by provisioning itself",
        ),
        (
            "version = 1\n[[files]]\npath = \"/etc/x\"\nmode = \"10644\"\ncontent = \"\"",
            "mode",
        ),
        (
            "version = 1\n[[files]]\npath = \"/etc/x\"\ncontent-base64 = \"%%%\"",
            "does not decode",
        ),
        ("version = 1\n[agent]\ninterval = \"5s\"", "under a minute"),
        (
            "version = 1\n[agent.reboot]\nstrategy = \"fleet-lock\"",
            "needs [fleet-lock]",
        ),
        (
            "version = 1\n[fleet]\netcd-endpoints = [\"etcd:2379\"]",
            "fleet: etcd-endpoints[0]",
        ),
        (
            "version = 1\n[fleet]\netcd-endpoints = [\"http://e:2379\"]\ncidr = \"10.88.0.1/14\"",
            "fleet: cidr",
        ),
        (
            "version = 1\n[fleet]\netcd-endpoints = [\"http://e:2379\"]\nmode = \"nat\"",
            "mode",
        ),
        (
            "version = 1\n[[health]]\nname = \"x\"\nkind = \"required\"\nscript = \"echo\"",
            "interpreter line",
        ),
        (
            "version = 1\n[[health]]\nname = \"../x\"\nkind = \"wanted\"\nscript = \"#!/bin/sh\"",
            "health[0].name",
        ),
        ("version = 1\nkernel-args = [\"a b\"]", "kernel-args[0]"),
        ("version = 1\n[update]\nref = \"cairn/x\"", "not REMOTE:REF"),
        ("version = 1\n[update]\nref = \"cairn:../x\"", "update.ref"),
        (
            "version = 1\n[update]\nref = \"cairn:x\"\nurl = \"file:///etc\"",
            "update.url",
        ),
        (
            "version = 1\n[update]\nref = \"cairn:x\"\nurl = \"http://h/r\\n[remote \\\"evil\\\"]\"",
            "update.url",
        ),
        (
            "version = 1\n[update]\nref = \"cairn:x\"\nurl = \"https:///path\"",
            "update.url",
        ),
        (
            "version = 1\n[[apps]]\nname = \"a\"\nimage = \"x\"\n[[apps]]\nname = \"a\"\nimage = \"y\"",
            "listed twice",
        ),
    ];
    for (text, expect) in cases {
        let e = refused(text);
        assert!(
            e.contains(expect),
            "{text:?}: {e:?} does not say {expect:?}"
        );
        assert!(e.starts_with("node config test.toml"), "{e}");
    }
}

#[test]
fn a_file_may_not_replace_what_another_key_writes() {
    let c = NodeConfig::parse(
        "version = 1\nhostname = \"a\"\n[[files]]\npath = \"/etc/hostname\"\ncontent = \"b\\n\"\n",
        "t",
    )
    .unwrap();
    let e = render(&c).unwrap_err().to_string();
    assert!(e.contains("/etc/hostname is written twice"), "{e}");
}

#[test]
fn files_keep_mode_owner_and_decoded_content() {
    let c = NodeConfig::parse(
        &format!(
            "version = 1\n[[users]]\nname = \"bob\"\nssh-authorized-keys = [\"{KEY}\"]\n\
             [[files]]\npath = \"/var/lib/app/key\"\nmode = \"0600\"\nowner = \"bob\"\ncontent-base64 = \"AAEC\"\n"
        ),
        "t",
    )
    .unwrap();
    let plan = render(&c).unwrap();
    let f = plan
        .entries
        .iter()
        .find(|e| e.path() == "/var/lib/app/key")
        .unwrap();
    assert_eq!(
        f,
        &Entry::File {
            path: "/var/lib/app/key".into(),
            mode: 0o600,
            owner: "bob".into(),
            group: "bob".into(),
            content: vec![0, 1, 2],
        }
    );
}

/// docs/provisioning.schema.json is what the types parse (UPDATE_GOLDEN=1 rewrites it).
#[test]
fn the_published_schema_is_current() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/provisioning.schema.json"
    );
    let now = json_schema();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &now).unwrap();
    }
    let published = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        published == now,
        "docs/provisioning.schema.json is stale: run UPDATE_GOLDEN=1 cargo test -p cairn-updater provision"
    );
}
