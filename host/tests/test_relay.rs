//! `host test relay PORT`, what QEMU starts for each connection a machine
//! under `host test` opens to a forwarded port: the machine's bytes reach
//! 127.0.0.1:PORT, the end of its request reaches the server as an end of
//! stream (a half close), and the server's answer comes back whole.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};

#[test]
fn the_relay_carries_a_request_and_its_answer_across_a_half_close() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let answering = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        // Reads to the end: only the relay's half close ends it.
        let mut request = Vec::new();
        conn.read_to_end(&mut request).unwrap();
        let answer: Vec<u8> = b"answer to "
            .iter()
            .chain(&request)
            .copied()
            .chain(std::iter::repeat_n(b'x', 300_000))
            .collect();
        conn.write_all(&answer).unwrap();
        request
    });
    let mut relay = Command::new(env!("CARGO_BIN_EXE_host-full"))
        .args(["test", "relay", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    relay.stdin.take().unwrap().write_all(b"GET /").unwrap();
    let out = relay.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(answering.join().unwrap(), b"GET /");
    assert!(out.stdout.starts_with(b"answer to GET /xxx"));
    assert_eq!(out.stdout.len(), b"answer to GET /".len() + 300_000);
    assert!(out.stderr.is_empty(), "its streams are the machine's");
}

#[test]
fn a_relay_to_a_closed_port_fails_without_writing_to_the_connection() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_host-full"))
        .args(["test", "relay", &port.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
}
