//! The DNS responder over real sockets on 127.0.0.1 (no root needed): the
//! zone is answered over UDP and TCP, other names are relayed from the
//! upstreams with the client's id, and hostile clients break nothing.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use cairn_contracts::services::Instance;
use cairn_network::dns::{self, Directory, Server};
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

const LOCAL: &str = "127.0.0.1:0";

fn directory(service: &str, container: &str, node: &str, addr: &str) -> Arc<RwLock<Directory>> {
    let i = Instance {
        container: container.into(),
        address: addr.parse().unwrap(),
        services: vec![format!("{service}:80").parse().unwrap()],
        monitor_pid: 1,
        monitor_start: 1,
        node: node.into(),
        node_id: "0123".into(),
    };
    let mut entries = BTreeMap::new();
    entries.insert(i.etcd_key(service), serde_json::to_vec(&i).unwrap());
    let d = Directory::from_entries(&entries);
    assert_eq!(d.skipped, 0);
    Arc::new(RwLock::new(d))
}

fn server(upstreams: Vec<SocketAddr>) -> Server {
    let d = directory("web", "web-1", "node-a", "10.88.1.20");
    dns::start(LOCAL.parse().unwrap(), d, upstreams).unwrap()
}

fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn udp_ask(to: SocketAddr, bytes: &[u8]) -> Message {
    let s = UdpSocket::bind(LOCAL).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    s.send_to(bytes, to).unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, from) = s.recv_from(&mut buf).expect("a UDP answer");
    assert_eq!(from, to);
    Message::from_vec(&buf[..n]).unwrap()
}

fn tcp_send(s: &mut TcpStream, bytes: &[u8]) {
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).unwrap();
}

fn tcp_read(s: &mut TcpStream) -> std::io::Result<Message> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf)?;
    Ok(Message::from_vec(&buf).unwrap())
}

fn tcp_connect(to: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    s
}

fn tcp_ask(to: SocketAddr, bytes: &[u8]) -> Message {
    let mut s = tcp_connect(to);
    tcp_send(&mut s, bytes);
    tcp_read(&mut s).expect("a TCP answer")
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[test]
fn the_zone_is_answered_over_udp_and_tcp() {
    let s = server(vec![]);
    assert_eq!(s.udp_addr().port(), s.tcp_addr().port());

    let r = udp_ask(
        s.udp_addr(),
        &query(11, "web.service.cairn.", RecordType::A),
    );
    assert_eq!((r.id(), r.response_code()), (11, ResponseCode::NoError));
    assert!(r.authoritative());
    assert_eq!(addresses(&r), ["10.88.1.20".parse::<Ipv4Addr>().unwrap()]);

    let r = udp_ask(
        s.udp_addr(),
        &query(12, "nothing.service.cairn.", RecordType::A),
    );
    assert_eq!((r.id(), r.response_code()), (12, ResponseCode::NXDomain));

    // Several queries on one connection.
    let mut c = tcp_connect(s.tcp_addr());
    tcp_send(&mut c, &query(21, "WEB-1.node-a.cairn", RecordType::A));
    let r = tcp_read(&mut c).unwrap();
    assert_eq!(r.id(), 21);
    assert_eq!(addresses(&r), ["10.88.1.20".parse::<Ipv4Addr>().unwrap()]);
    tcp_send(&mut c, &query(22, "web.service.cairn.", RecordType::SRV));
    let r = tcp_read(&mut c).unwrap();
    assert_eq!(
        (r.id(), r.answers().len(), r.additionals().len()),
        (22, 1, 1)
    );
}

#[test]
fn other_names_are_relayed_with_the_clients_id() {
    // U answers only cairn. and has no upstream: SERVFAIL for the rest.
    let u = dns::start(
        LOCAL.parse().unwrap(),
        directory("up", "up-1", "node-u", "10.88.9.9"),
        vec![],
    )
    .unwrap();
    assert_eq!(u.udp_addr(), u.tcp_addr());
    let s = server(vec![u.udp_addr()]);

    let r = udp_ask(s.udp_addr(), &query(0xbeef, "x.example.", RecordType::A));
    assert_eq!(
        (r.id(), r.response_code()),
        (0xbeef, ResponseCode::ServFail)
    );
    assert_eq!(r.message_type(), MessageType::Response);
    let r = tcp_ask(s.tcp_addr(), &query(0xcafe, "x.example.", RecordType::A));
    assert_eq!(
        (r.id(), r.response_code()),
        (0xcafe, ResponseCode::ServFail)
    );
    // The zone stays S's own: U's service is not S's.
    let r = udp_ask(s.udp_addr(), &query(3, "up.service.cairn.", RecordType::A));
    assert_eq!(r.response_code(), ResponseCode::NXDomain);

    // Upstream gone: SERVFAIL all the same, and soon.
    drop(u);
    let t = Instant::now();
    let r = udp_ask(s.udp_addr(), &query(0xf00d, "x.example.", RecordType::A));
    assert_eq!(
        (r.id(), r.response_code()),
        (0xf00d, ResponseCode::ServFail)
    );
    let r = tcp_ask(s.tcp_addr(), &query(0xf00e, "x.example.", RecordType::A));
    assert_eq!(
        (r.id(), r.response_code()),
        (0xf00e, ResponseCode::ServFail)
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// An upstream that answers every query with A 192.0.2.7, over UDP and TCP
/// on one port, and notes the ids it was asked with.
struct FakeUpstream {
    addr: SocketAddr,
    ids: Arc<Mutex<Vec<u16>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

fn fake_reply(query: &[u8]) -> Vec<u8> {
    let q = Message::from_vec(query).unwrap();
    let mut r = Message::new();
    r.set_id(q.id()).set_message_type(MessageType::Response);
    r.add_queries(q.queries().iter().cloned());
    let name = q.queries()[0].name().clone();
    r.add_answer(Record::from_rdata(
        name,
        60,
        RData::A(A("192.0.2.7".parse().unwrap())),
    ));
    r.to_vec().unwrap()
}

impl FakeUpstream {
    fn start() -> FakeUpstream {
        let (udp, tcp) = dns::bind_udp_and_tcp(LOCAL.parse().unwrap()).unwrap();
        let addr = udp.local_addr().unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let ids = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (i, st) = (ids.clone(), stop.clone());
        let t1 = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    i.lock().unwrap().push(u16::from_be_bytes([buf[0], buf[1]]));
                    udp.send_to(&fake_reply(&buf[..n]), from).unwrap();
                }
            }
        });
        let (i, st) = (ids.clone(), stop.clone());
        let t2 = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                        let mut len = [0u8; 2];
                        c.read_exact(&mut len).unwrap();
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        c.read_exact(&mut q).unwrap();
                        i.lock().unwrap().push(u16::from_be_bytes([q[0], q[1]]));
                        tcp_send(&mut c, &fake_reply(&q));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        });
        FakeUpstream {
            addr,
            ids,
            stop,
            threads: vec![t1, t2],
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A port on which nothing listens, UDP or TCP.
fn dead_port() -> SocketAddr {
    let u = UdpSocket::bind(LOCAL).unwrap();
    let addr = u.local_addr().unwrap();
    drop(u);
    addr
}

#[test]
fn upstreams_are_tried_in_order_and_their_answer_relayed() {
    let up = FakeUpstream::start();
    let s = server(vec![dead_port(), up.addr]);
    let expected = ["192.0.2.7".parse::<Ipv4Addr>().unwrap()];

    let r = udp_ask(s.udp_addr(), &query(0x1234, "www.example.", RecordType::A));
    assert_eq!((r.id(), r.response_code()), (0x1234, ResponseCode::NoError));
    assert_eq!(addresses(&r), expected);
    assert!(!r.authoritative());

    let r = tcp_ask(s.tcp_addr(), &query(0x4321, "www.example.", RecordType::A));
    assert_eq!((r.id(), r.response_code()), (0x4321, ResponseCode::NoError));
    assert_eq!(addresses(&r), expected);

    assert_eq!(up.ids.lock().unwrap().len(), 2, "one query each way");
}

#[test]
fn tcp_connections_are_bounded_and_come_back() {
    let s = server(vec![]);
    let q = query(7, "web.service.cairn.", RecordType::A);
    let mut held: Vec<TcpStream> = (0..65).map(|_| tcp_connect(s.tcp_addr())).collect();

    // The 65th is closed unanswered (or reset).
    let last = held.last_mut().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = last.write_all(&[0, 12]);
    let mut byte = [0u8; 1];
    match last.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the 65th connection was served: {other:?}"),
    }
    // The first 64 are served.
    tcp_send(&mut held[0], &q);
    assert_eq!(tcp_read(&mut held[0]).unwrap().id(), 7);
    tcp_send(&mut held[63], &q);
    assert_eq!(tcp_read(&mut held[63]).unwrap().id(), 7);

    // Once they close, a new one is served.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = tcp_connect(s.tcp_addr());
        tcp_send(&mut c, &q);
        match tcp_read(&mut c) {
            Ok(r) => {
                assert_eq!(addresses(&r).len(), 1);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("no answer after the others closed: {e}"),
        }
    }
}

#[test]
fn hostile_input_breaks_nothing() {
    let s = server(vec![]);
    let c = UdpSocket::bind(LOCAL).unwrap();
    for garbage in [&[0u8][..], &[], &[0xff; 12], &[0xff; 4096]] {
        c.send_to(garbage, s.udp_addr()).unwrap();
    }
    // Too big for the buffer: cut, then refused as malformed.
    c.send_to(&[0u8; 9000], s.udp_addr()).unwrap();
    // A TCP message of one byte, and one that never comes.
    let mut t = tcp_connect(s.tcp_addr());
    tcp_send(&mut t, &[0]);
    let mut byte = [0u8; 1];
    assert!(matches!(t.read(&mut byte), Ok(0) | Err(_)));
    let mut idle = tcp_connect(s.tcp_addr());
    idle.write_all(&[0x10]).unwrap();

    let r = udp_ask(
        s.udp_addr(),
        &query(99, "web.service.cairn.", RecordType::A),
    );
    assert_eq!((r.id(), addresses(&r).len()), (99, 1));
    let r = tcp_ask(
        s.tcp_addr(),
        &query(98, "web.service.cairn.", RecordType::A),
    );
    assert_eq!((r.id(), addresses(&r).len()), (98, 1));
}

#[test]
fn a_dropped_server_frees_its_port() {
    let s = server(vec![]);
    let (udp, tcp) = (s.udp_addr(), s.tcp_addr());
    drop(s);
    UdpSocket::bind(udp).expect("the UDP port is free again");
    TcpListener::bind(tcp).expect("the TCP port is free again");
}
