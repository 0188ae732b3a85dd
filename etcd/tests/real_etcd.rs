//! The client against a real etcd on loopback (Debian's etcd-server,
//! installed by scripts/setup). No root needed.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use cairn_etcd::{Etcd, Event, Mirror};

fn client(etcd: &cairn_test_support::Etcd) -> Etcd {
    Etcd::new(&[etcd.url().to_string()]).unwrap()
}

#[test]
fn create_only_puts_bound_to_a_lease_go_with_it() {
    let server = cairn_test_support::Etcd::start();
    let c = client(&server);
    c.healthy().unwrap();
    let lease = c.lease_grant(30).unwrap();
    assert!(c.put_if_leased("/t/a", None, b"one", Some(lease)).unwrap());
    assert!(
        !c.put_if_leased("/t/a", None, b"two", Some(lease)).unwrap(),
        "a second create of the same key must lose"
    );
    let snap = c.snapshot("/t/").unwrap();
    assert_eq!(snap.kvs.len(), 1);
    assert_eq!(snap.kvs[0].value, b"one");
    assert_eq!(snap.kvs[0].lease, lease);
    assert!(snap.revision >= snap.kvs[0].mod_revision);
    // A stale revision cannot delete; the current one can.
    assert!(!c.delete_if("/t/a", snap.kvs[0].mod_revision - 1).unwrap());
    c.lease_keepalive(lease).unwrap();
    c.lease_revoke(lease).unwrap();
    assert!(
        c.get("/t/a").unwrap().is_none(),
        "revoking the lease removes its keys"
    );
    assert!(
        c.lease_keepalive(lease).is_err(),
        "a revoked lease cannot be renewed"
    );
    c.lease_revoke(lease).unwrap();
}

#[test]
fn a_watch_from_a_snapshot_misses_nothing() {
    let server = cairn_test_support::Etcd::start();
    let c = client(&server);
    c.put("/w/before", b"0", None).unwrap();
    c.put("/other", b"x", None).unwrap();
    let mut mirror = Mirror::from_snapshot(c.snapshot("/w/").unwrap());
    // Written between the snapshot and the watch: must still arrive.
    c.put("/w/between", b"1", None).unwrap();
    let (tx, rx) = mpsc::channel();
    let watcher = c.clone();
    let from = mirror.revision + 1;
    std::thread::spawn(move || {
        let _ = watcher.watch_prefix("/w/", from, Duration::from_secs(30), |rev, evs| {
            tx.send((rev, evs)).is_ok()
        });
    });
    c.put("/w/after", b"2", None).unwrap();
    c.put("/other", b"y", None).unwrap();
    assert!(c
        .delete_if(
            "/w/before",
            c.get("/w/before").unwrap().unwrap().mod_revision
        )
        .unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while mirror.entries.contains_key("/w/before") || !mirror.entries.contains_key("/w/after") {
        let left = deadline.saturating_duration_since(Instant::now());
        let (rev, evs) = rx
            .recv_timeout(left)
            .expect("the watch delivered every change");
        assert!(
            evs.iter().all(|e| match e {
                Event::Put { key, .. } | Event::Delete { key } => key.starts_with("/w/"),
            }),
            "only the prefix is watched: {evs:?}"
        );
        mirror.apply(rev, evs);
    }
    let keys: Vec<_> = mirror.entries.keys().cloned().collect();
    assert_eq!(keys, ["/w/after", "/w/between"]);
}

#[test]
fn a_compacted_revision_is_an_error_not_silence() {
    let server = cairn_test_support::Etcd::start();
    let c = client(&server);
    for i in 0..5 {
        c.put("/c/k", i.to_string().as_bytes(), None).unwrap();
    }
    let rev = c.snapshot("/c/").unwrap().revision;
    // Compact through the gateway, as an operator's etcdctl compact would.
    ureq::post(&format!("{}/v3/kv/compaction", server.url()))
        .send_json(serde_json::json!({ "revision": rev.to_string() }))
        .unwrap();
    let e = c
        .watch_prefix("/c/", 2, Duration::from_secs(10), |_, _| true)
        .unwrap_err();
    assert!(e.to_string().contains("compacted"), "{e}");
}

#[test]
fn a_paged_snapshot_is_whole_and_of_one_revision() {
    let server = cairn_test_support::Etcd::start();
    let c = client(&server);
    for i in 0..7 {
        c.put(&format!("/p/k{i}"), b"v", None).unwrap();
    }
    c.put("/q", b"outside", None).unwrap();
    let whole = c.snapshot("/p/").unwrap();
    let paged = c.snapshot_paged("/p/", 2).unwrap();
    assert_eq!(paged, whole);
    assert_eq!(paged.kvs.len(), 7);
    let keys: Vec<_> = paged.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["/p/k0", "/p/k1", "/p/k2", "/p/k3", "/p/k4", "/p/k5", "/p/k6"]
    );
}
