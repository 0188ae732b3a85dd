//! A real etcd (Debian's etcd-server, installed by scripts/setup), one
//! member, for the FleetLock tests.

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to start it.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// The address it listens on (clients and its peer port); a QEMU test
    /// gives one its guests reach.
    pub addr: IpAddr,
    /// Member name (shows in its log).
    pub name: String,
    /// Where its stderr goes (kept for the failure message); discarded if None.
    pub log: Option<PathBuf>,
    /// How long it may take to report healthy.
    pub timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            name: "test".into(),
            log: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// A running etcd; dropping it kills it and removes its data directory.
pub struct Etcd {
    child: Child,
    url: String,
    port: u16,
    // Dropped after the child is killed (fields drop after Drop::drop).
    _data: tempfile::TempDir,
}

fn etcd_binary() -> io::Result<&'static str> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "etcd is not installed: scripts/setup installs Debian's etcd-server; these tests need a real etcd",
            )
        })
}

fn port_on(addr: IpAddr) -> io::Result<u16> {
    Ok(TcpListener::bind((addr, 0))?.local_addr()?.port())
}

/// GET /health answers 200 with `"health":"true"` once it has a leader.
fn healthy(addr: IpAddr, port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.") && reply.contains(" 200 ") && reply.contains(r#""health":"true""#)
}

impl Etcd {
    /// On 127.0.0.1; panics if it does not become healthy.
    pub fn start() -> Etcd {
        Etcd::try_start(&EtcdOptions::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// On `addr`; panics if it does not become healthy.
    pub fn start_on(addr: IpAddr) -> Etcd {
        Etcd::try_start(&EtcdOptions {
            addr,
            ..EtcdOptions::default()
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts it and waits until it reports healthy.
    pub fn try_start(opts: &EtcdOptions) -> io::Result<Etcd> {
        let etcd = etcd_binary()?;
        let data = tempfile::Builder::new().prefix("etcd-").tempdir()?;
        let (client, peer) = (port_on(opts.addr)?, port_on(opts.addr)?);
        let host = match opts.addr {
            IpAddr::V6(a) => format!("[{a}]"),
            IpAddr::V4(a) => a.to_string(),
        };
        let url = format!("http://{host}:{client}");
        let peer_url = format!("http://{host}:{peer}");
        let stderr = match &opts.log {
            Some(log) => Stdio::from(std::fs::File::create(log)?),
            None => Stdio::null(),
        };
        let child = Command::new(etcd)
            .arg("--name")
            .arg(&opts.name)
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", opts.name))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {etcd}: {e}")))?;
        let mut etcd = Etcd {
            child,
            url,
            port: client,
            _data: data,
        };
        let deadline = Instant::now() + opts.timeout;
        while !healthy(opts.addr, client) {
            let log = || {
                opts.log
                    .as_ref()
                    .and_then(|l| std::fs::read_to_string(l).ok())
                    .unwrap_or_default()
            };
            if let Some(status) = etcd.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "etcd exited ({status}) before it was healthy: {}",
                    log()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "etcd did not become healthy on {} within {:?}: {}",
                    etcd.url,
                    opts.timeout,
                    log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(etcd)
    }

    /// Its client URL, `http://ADDR:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its client port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs etcd (scripts/setup installs it), no root.
    #[test]
    fn starts_healthy_and_drop_removes_its_data() {
        let etcd = Etcd::start();
        assert!(healthy(IpAddr::V4(Ipv4Addr::LOCALHOST), etcd.port()));
        let data = etcd._data.path().to_path_buf();
        drop(etcd);
        assert!(!data.exists());
    }
}
