//! A directory served over HTTP on 127.0.0.1 (forwarded into a `host test`
//! machine, or a QEMU user-network guest's 10.0.2.2), by Python's static
//! server, as any static server would serve
//! an archive repository; killed on drop.
//!
//! It listens on loopback only and serves the directory as it is: what the
//! directory holds (symlinks included) is the caller's.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub struct HttpServer {
    child: Child,
    pub port: u16,
    pub root: PathBuf,
    /// Its request log (stderr), when asked for one.
    pub log: Option<PathBuf>,
}

impl HttpServer {
    /// Serves `root` on a port the kernel picks (no window in which another
    /// process could take it), its request log in `log` if given.
    pub fn start(root: &Path, log: Option<&Path>) -> Result<HttpServer> {
        if !root.is_dir() {
            bail!("{} is not a directory to serve", root.display());
        }
        let stderr = match log {
            Some(log) => Stdio::from(
                std::fs::File::create(log)
                    .with_context(|| format!("creating {}", log.display()))?,
            ),
            None => Stdio::null(),
        };
        let mut cmd = Command::new("python3");
        let mut child = crate::machine::die_with_runner(&mut cmd)
            .args(["-u", "-m", "http.server", "--bind", "127.0.0.1"])
            .arg("--directory")
            .arg(root)
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("starting python3 -m http.server (Debian package python3)")?;
        // Its first line names the port: "Serving HTTP on 127.0.0.1 port N (…".
        let stdout = child.stdout.take().context("the server's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Drained to the end so that the server never blocks on it.
            for _ in lines {}
        });
        let first = rx.recv_timeout(Duration::from_secs(30));
        let port = match &first {
            Ok(Some(Ok(line))) => line
                .split_once(" port ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|p| p.parse::<u16>().ok()),
            _ => None,
        };
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            let logged = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            bail!(
                "the HTTP server for {} did not start (its first line: {first:?}): {}",
                root.display(),
                logged.trim()
            );
        };
        Ok(HttpServer {
            child,
            port,
            root: root.to_owned(),
            log: log.map(Path::to_owned),
        })
    }

    /// What it answered (its request log): (requests, body bytes) served
    /// since the log had `from` lines, and the log's current line count.
    /// Body bytes are the sizes of the files answered with 200 (the server
    /// logs no sizes; it sends whole files).
    pub fn served_since(&self, from: usize) -> (usize, u64, usize) {
        let Some(log) = &self.log else {
            return (0, 0, from);
        };
        let Ok(file) = std::fs::File::open(log) else {
            return (0, 0, from);
        };
        let lines: Vec<String> = std::io::BufReader::new(file)
            .lines()
            .map_while(|l| l.ok())
            .collect();
        let (mut requests, mut bytes) = (0, 0);
        for line in lines.iter().skip(from) {
            let Some(req) = line.split('"').nth(1) else {
                continue;
            };
            let mut parts = req.split_whitespace();
            let (Some("GET"), Some(path)) = (parts.next(), parts.next()) else {
                continue;
            };
            requests += 1;
            let status = line.split('"').nth(2).unwrap_or("").trim();
            if status.starts_with("200") {
                let path = path.split('?').next().unwrap_or(path);
                let inside = Path::new(path.trim_start_matches('/'));
                if inside
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
                {
                    bytes += std::fs::metadata(self.root.join(inside))
                        .map(|m| m.len())
                        .unwrap_or(0);
                }
            }
        }
        (requests, bytes, lines.len())
    }
}

impl HttpServer {
    /// How many GET requests it answered under `prefix` (e.g. `/deltas/`:
    /// did the machine fetch static deltas?).
    pub fn requests_under(&self, prefix: &str) -> usize {
        let Some(log) = &self.log else {
            return 0;
        };
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.split('"')
                    .nth(1)
                    .and_then(|req| req.strip_prefix("GET "))
                    .is_some_and(|path| path.starts_with(prefix))
            })
            .count()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_a_directory_and_counts_what_it_sent() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config"), "[core]\nmode=archive-z2\n").unwrap();
        let log = dir.path().join("log");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("config"), "0123456789").unwrap();
        let server = HttpServer::start(&root, Some(&log)).unwrap();
        let get = |path: &str| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        };
        assert!(get("/config").ends_with("0123456789"));
        assert!(get("/nosuch").starts_with("HTTP/1.0 404"));
        // Outside the directory is not served.
        assert!(!get("/../config").contains("archive-z2"));
        let (requests, bytes, _) = server.served_since(0);
        assert_eq!((requests, bytes), (3, 10));
        assert_eq!(server.requests_under("/conf"), 1);
        assert_eq!(server.requests_under("/deltas/"), 0);
        assert!(HttpServer::start(&dir.path().join("nosuch"), None).is_err());
    }
}
