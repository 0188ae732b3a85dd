//! FleetLock client and server against a real etcd on loopback (Debian's
//! etcd-server, installed by scripts/setup). No root needed.

use std::collections::BTreeMap;

use cairn_etcd::Etcd as EtcdClient;
use cairn_test_support::{free_port, Etcd};
use cairn_updater::fleetlock::server::{self, Config, Store, DEFAULT_PREFIX};
use cairn_updater::fleetlock::{Answer, Client};

fn config(etcd: &Etcd, default_slots: u32, groups: &[(&str, u32)]) -> Config {
    Config {
        etcd: vec![etcd.url().to_string()],
        listen: "127.0.0.1:0".into(),
        default_slots,
        groups: groups
            .iter()
            .map(|(g, n)| (g.to_string(), *n))
            .collect::<BTreeMap<_, _>>(),
        prefix: DEFAULT_PREFIX.into(),
    }
}

fn denied_kind(a: &Answer) -> &str {
    match a {
        Answer::Denied { kind, .. } => kind,
        Answer::Granted => "granted",
    }
}

#[test]
fn slots_are_granted_up_to_the_group_limit_and_freed_at_steady_state() {
    let etcd = Etcd::start();
    let srv = server::start(config(&etcd, 1, &[("blue", 2)]), 4).unwrap();
    let base = format!("http://{}", srv.addr);
    let node = |id: &str, group: &str| Client::new(&base, id, group);

    assert_eq!(node("a", "blue").pre_reboot().unwrap(), Answer::Granted);
    assert_eq!(node("b", "blue").pre_reboot().unwrap(), Answer::Granted);
    let full = node("c", "blue").pre_reboot().unwrap();
    match &full {
        Answer::Denied {
            status,
            kind,
            value,
        } => {
            assert_eq!((*status, kind.as_str()), (409, "failed_lock"));
            assert!(
                value.contains("all 2 slots") && value.contains("a, b"),
                "{value}"
            );
        }
        Answer::Granted => panic!("a third node must not get one of two slots"),
    }
    // Idempotent: asking again while holding is still granted.
    assert_eq!(node("a", "blue").pre_reboot().unwrap(), Answer::Granted);
    // Groups are independent; an unnamed group has the default slot count.
    assert_eq!(node("g1", "green").pre_reboot().unwrap(), Answer::Granted);
    assert_eq!(
        denied_kind(&node("g2", "green").pre_reboot().unwrap()),
        "failed_lock"
    );

    assert_eq!(node("a", "blue").steady_state().unwrap(), Answer::Granted);
    assert_eq!(
        node("a", "blue").steady_state().unwrap(),
        Answer::Granted,
        "releasing twice is fine"
    );
    assert_eq!(node("c", "blue").pre_reboot().unwrap(), Answer::Granted);

    // The operator's view, straight from etcd.
    let store = Store::new(
        EtcdClient::new(&[etcd.url().to_string()]).unwrap(),
        DEFAULT_PREFIX,
    );
    let groups = store.groups().unwrap();
    let blue = groups.iter().find(|g| g.group == "blue").unwrap();
    let ids: Vec<&str> = blue.holders.iter().map(|h| h.id.as_str()).collect();
    assert_eq!((blue.slots, ids), (2, vec!["b", "c"]));
    assert_eq!(store.servers().unwrap(), vec![srv.addr.to_string()]);
    srv.stop();
}

#[test]
fn a_node_that_never_comes_back_holds_its_slot_until_an_operator_frees_it() {
    let etcd = Etcd::start();
    let srv = server::start(config(&etcd, 1, &[]), 2).unwrap();
    let base = format!("http://{}", srv.addr);
    assert_eq!(
        Client::new(&base, "lost", "g").pre_reboot().unwrap(),
        Answer::Granted
    );
    // The rollout stops: nobody else gets the slot.
    assert_eq!(
        denied_kind(&Client::new(&base, "next", "g").pre_reboot().unwrap()),
        "failed_lock"
    );
    let store = Store::new(
        EtcdClient::new(&[etcd.url().to_string()]).unwrap(),
        DEFAULT_PREFIX,
    );
    assert!(store.release("g", "lost").unwrap());
    assert!(!store.release("g", "lost").unwrap(), "already free");
    assert_eq!(
        Client::new(&base, "next", "g").pre_reboot().unwrap(),
        Answer::Granted
    );
}

#[test]
fn two_servers_racing_for_the_last_slot_grant_it_once() {
    let etcd = Etcd::start();
    let one = server::start(config(&etcd, 1, &[]), 4).unwrap();
    let two = server::start(config(&etcd, 1, &[]), 4).unwrap();
    let bases = [
        format!("http://{}", one.addr),
        format!("http://{}", two.addr),
    ];
    let granted: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let base = bases[i % 2].clone();
                s.spawn(move || {
                    Client::new(&base, &format!("node{i}"), "race")
                        .pre_reboot()
                        .unwrap()
                        == Answer::Granted
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        granted.iter().filter(|g| **g).count(),
        1,
        "exactly one node may reboot: {granted:?}"
    );
    let mut servers = Store::new(
        EtcdClient::new(&[etcd.url().to_string()]).unwrap(),
        DEFAULT_PREFIX,
    )
    .servers()
    .unwrap();
    servers.sort();
    let mut expected = vec![one.addr.to_string(), two.addr.to_string()];
    expected.sort();
    assert_eq!(servers, expected);
}

#[test]
fn malformed_requests_get_a_clear_error() {
    let etcd = Etcd::start();
    let srv = server::start(config(&etcd, 1, &[]), 2).unwrap();
    let url = format!("http://{}/v1/pre-reboot", srv.addr);
    let status_and_body = |r: Result<ureq::Response, ureq::Error>| match r {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let body = r#"{"client_params":{"id":"a","group":"g"}}"#;
    let (code, text) = status_and_body(ureq::post(&url).send_string(body));
    assert_eq!(code, 400);
    assert!(text.contains("missing_header"), "{text}");
    let (code, text) = status_and_body(
        ureq::post(&url)
            .set("fleet-lock-protocol", "true")
            .send_string("{}"),
    );
    assert_eq!(code, 400);
    assert!(text.contains("bad_request"), "{text}");
    let bad_group = r#"{"client_params":{"id":"a","group":"../x"}}"#;
    let (code, text) = status_and_body(
        ureq::post(&url)
            .set("fleet-lock-protocol", "true")
            .send_string(bad_group),
    );
    assert_eq!(code, 400);
    assert!(text.contains("group"), "{text}");
    let (code, _) = status_and_body(ureq::get(&format!("http://{}/v1/other", srv.addr)).call());
    assert_eq!(code, 404);
}

#[test]
fn a_server_without_etcd_refuses_to_start() {
    let cfg = Config {
        etcd: vec![format!("http://127.0.0.1:{}", free_port())],
        listen: "127.0.0.1:0".into(),
        default_slots: 1,
        groups: BTreeMap::new(),
        prefix: DEFAULT_PREFIX.into(),
    };
    let err = server::start(cfg, 1).err().expect("no etcd, no server");
    assert!(format!("{err:#}").contains("reaching etcd"), "{err:#}");
}
