//! A real OCI registry on loopback: Debian's docker-registry (the CNCF
//! distribution registry, installed by scripts/setup), with filesystem
//! storage in a temporary directory, optionally behind htpasswd basic auth
//! and TLS; images pushed into it with Debian's skopeo.

use std::io::{self, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::{free_port, output_text};

/// How to start it.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// `(user, password)`: require basic auth from an htpasswd file.
    pub basic_auth: Option<(String, String)>,
    /// Serve HTTPS with a self-signed certificate for 127.0.0.1.
    pub tls: bool,
}

/// A running registry; dropping it kills it and removes its storage.
pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    opts: RegistryOptions,
}

fn need(binary: &str, package: &str) -> io::Result<()> {
    if Path::new(binary).exists() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{binary} is not installed: scripts/setup installs Debian's {package}; these tests need the real one"),
    ))
}

fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            output_text(&out)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether something answers HTTP (or a TLS handshake) on the port.
fn answers(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: registry\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = [0u8; 16];
    matches!(s.read(&mut reply), Ok(n) if n > 0)
}

impl Registry {
    /// Plain HTTP, no auth; panics if it does not start.
    pub fn start() -> Registry {
        Registry::try_start(RegistryOptions::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(opts: RegistryOptions) -> io::Result<Registry> {
        need("/usr/bin/docker-registry", "docker-registry")?;
        need("/usr/bin/skopeo", "skopeo")?;
        let dir = tempfile::Builder::new().prefix("registry-").tempdir()?;
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        if opts.tls {
            // A CA and a leaf it signs: webpki refuses a self-signed
            // certificate as an end entity.
            need("/usr/bin/openssl", "openssl")?;
            let d = dir.path();
            let ec = [
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ];
            run(Command::new("openssl")
                .args(["req", "-x509", "-days", "2", "-subj", "/CN=cairn test CA"])
                .args(ec)
                .arg("-keyout")
                .arg(d.join("ca.key"))
                .arg("-out")
                .arg(d.join("ca.pem")))?;
            run(Command::new("openssl")
                .args(["req", "-subj", "/CN=127.0.0.1"])
                .args(ec)
                .arg("-keyout")
                .arg(d.join("key.pem"))
                .arg("-out")
                .arg(d.join("leaf.csr")))?;
            std::fs::write(
                d.join("leaf.ext"),
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
            )?;
            run(Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
                .arg("-in")
                .arg(d.join("leaf.csr"))
                .arg("-CA")
                .arg(d.join("ca.pem"))
                .arg("-CAkey")
                .arg(d.join("ca.key"))
                .arg("-extfile")
                .arg(d.join("leaf.ext"))
                .arg("-out")
                .arg(d.join("cert.pem")))?;
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                d.join("cert.pem").display(),
                d.join("key.pem").display()
            ));
        }
        if let Some((user, password)) = &opts.basic_auth {
            need("/usr/bin/htpasswd", "apache2-utils")?;
            let line = run(Command::new("htpasswd").args(["-Bbn", user, password]))?;
            std::fs::write(dir.path().join("htpasswd"), line.trim())?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: cairn-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = dir.path().join("registry.log");
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::File::create(
                dir.path().join("registry.err"),
            )?))
            .spawn()?;
        let mut registry = Registry {
            child,
            port,
            dir,
            opts,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !answers(port) {
            if let Some(status) = registry.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "docker-registry exited ({status}): {}",
                    std::fs::read_to_string(registry.dir.path().join("registry.err"))
                        .unwrap_or_default()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(
                    "docker-registry did not answer within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`: the registry part of a reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The CA (PEM) that signed its certificate, when it serves TLS.
    pub fn ca_certificate(&self) -> Option<PathBuf> {
        self.opts.tls.then(|| self.dir.path().join("ca.pem"))
    }

    /// The file holding blob `hex` in its storage.
    pub fn blob_data(&self, hex: &str) -> PathBuf {
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// `skopeo copy` of `source` (e.g. `oci:/path:tag`) to `REPO:TAG` in
    /// this registry; `all` copies every platform of an index. Returns the
    /// digest of what the registry stores (skopeo compresses layers on the
    /// way, so it is not the layout's).
    pub fn push(&self, source: &str, repo_tag: &str, all: bool) -> io::Result<String> {
        let digestfile = self.dir.path().join("pushed.digest");
        let mut c = self.skopeo();
        c.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if all {
            c.arg("--all");
        }
        if let Some((user, password)) = &self.opts.basic_auth {
            c.arg(format!("--dest-creds={user}:{password}"));
        }
        c.arg("--digestfile").arg(&digestfile);
        c.arg(source)
            .arg(format!("docker://{}/{repo_tag}", self.host()));
        run(&mut c)?;
        Ok(std::fs::read_to_string(&digestfile)?.trim().to_string())
    }

    /// The manifest (or index) `REPO:TAG` or `REPO@DIGEST` as the registry
    /// serves it.
    pub fn manifest(&self, reference: &str) -> io::Result<serde_json::Value> {
        let mut c = self.skopeo();
        c.args(["inspect", "--raw", "--tls-verify=false"]);
        if let Some((user, password)) = &self.opts.basic_auth {
            c.arg(format!("--creds={user}:{password}"));
        }
        c.arg(format!("docker://{}/{reference}", self.host()));
        serde_json::from_str(&run(&mut c)?).map_err(io::Error::other)
    }

    fn skopeo(&self) -> Command {
        let mut c = Command::new("skopeo");
        // skopeo keeps state under $HOME: keep it out of the caller's.
        c.env("HOME", self.dir.path());
        c
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
