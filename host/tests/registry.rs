//! `host app pull` against a real registry on loopback (Debian's
//! docker-registry, images pushed with skopeo): tags, digests, indexes of
//! several platforms, basic auth, TLS, a corrupted blob, a dropped
//! connection and a registry that is down. No root needed: the image store
//! is a bare-user-only repository in a temporary directory.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use cairn_test_support::oci::write_blob;
use cairn_test_support::{
    busybox_layout, output_text, Applets, LayoutSpec, Registry, RegistryOptions,
};

/// A node's state root and environment with nothing of the build
/// machine's: no credentials or registries.conf of its own.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        Node {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn host(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_host"));
        c.arg("app")
            .args(args)
            .env("CAIRN_ROOT", self.root())
            .env("HOME", self.dir.path())
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.path().join("registries.conf"),
            )
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("SSL_CERT_FILE");
        for (k, v) in env {
            c.env(k, v);
        }
        eprintln!("$ host app {}", args.join(" "));
        let out = c.output().unwrap();
        eprintln!("{}", output_text(&out));
        out
    }

    fn pull_ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let mut all = vec!["pull"];
        all.extend_from_slice(args);
        let out = self.host(&all, env);
        assert!(out.status.success(), "pull failed: {}", output_text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn pull_err(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let mut all = vec!["pull"];
        all.extend_from_slice(args);
        let out = self.host(&all, env);
        assert!(
            !out.status.success(),
            "pull should have failed: {}",
            output_text(&out)
        );
        assert!(out.stdout.is_empty(), "a failed pull prints no result");
        String::from_utf8(out.stderr).unwrap()
    }

    /// `host app images --json`: (name:tag, manifest digest).
    fn images(&self) -> Vec<(String, String)> {
        let out = self.host(&["images", "--json"], &[]);
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    format!(
                        "{}:{}",
                        i["name"].as_str().unwrap(),
                        i["tag"].as_str().unwrap()
                    ),
                    i["manifest_digest"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Nothing of a download is left in the repository's work directory.
    fn assert_no_leftovers(&self) {
        let tmp = self.root().join("repo/tmp");
        let left: Vec<String> = std::fs::read_dir(&tmp)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("cairn-"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "left behind in {}: {left:?}",
            tmp.display()
        );
    }
}

/// A busybox layout named `name` pushed to `registry` as `repo_tag`;
/// returns the digest the registry stores.
fn pushed(registry: &Registry, dir: &Path, name: &str, repo_tag: &str) -> String {
    let (layout, _) = busybox(dir, name);
    registry
        .push(&format!("oci:{}", layout.display()), repo_tag, false)
        .unwrap()
}

fn busybox(dir: &Path, name: &str) -> (PathBuf, String) {
    let layout = dir.join(name);
    let digest = busybox_layout(
        &layout,
        &LayoutSpec {
            applets: Applets::Only(&["sh", "true", "cat"]),
            files: &[("etc/which", name.as_bytes())],
            ..LayoutSpec::default()
        },
    )
    .unwrap();
    (layout, digest)
}

#[test]
fn pull_by_tag_and_by_digest_and_registries_conf_marks_the_registry_insecure() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let digest = pushed(&registry, work.path(), "web", "team/web:1.0");
    let node = Node::new();
    let reference = format!("{}/team/web:1.0", registry.host());

    // Plain HTTP is refused unless the registry is declared insecure.
    let err = node.pull_err(&[&reference, "--retry=0"], &[]);
    assert!(err.contains("cannot reach registry"), "{err}");
    node.assert_no_leftovers();

    let out = node.pull_ok(&[&reference, "--tls-verify=false"], &[]);
    assert!(out.contains(&format!("as web:1.0 {digest}")), "{out}");
    assert!(out.contains(&format!("digest {digest}")), "{out}");
    assert_eq!(node.images(), vec![("web:1.0".to_string(), digest.clone())]);
    let out = node.pull_ok(&[&reference, "--tls-verify=false"], &[]);
    assert!(out.contains("is up to date"), "{out}");

    // registries.conf (podman's format) instead of the flag.
    std::fs::write(
        node.dir.path().join("registries.conf"),
        format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            registry.host()
        ),
    )
    .unwrap();
    let by_digest = format!("{}/team/web@{digest}", registry.host());
    let out = node.pull_ok(&[&by_digest], &[]);
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        out.contains(&format!("as web:sha256-{hex} {digest}")),
        "{out}"
    );
    // --tls-verify=true overrides registries.conf.
    let err = node.pull_err(&[&by_digest, "--tls-verify=true", "--retry=0"], &[]);
    assert!(err.contains("cannot reach registry"), "{err}");

    // A digest the registry does not have, a tag it does not have.
    let missing = format!("{}/team/web@sha256:{}", registry.host(), "0".repeat(64));
    let err = node.pull_err(&[&missing], &[]);
    assert!(err.contains("404"), "{err}");
    let err = node.pull_err(&[&format!("{}/team/web:2.0", registry.host())], &[]);
    assert!(err.contains("404"), "{err}");

    let out = node.host(&["verify", "web:1.0"], &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    node.assert_no_leftovers();
}

/// An OCI layout whose tag `multi` is an index of an amd64 and an arm64
/// image (the same busybox layer; only the config's architecture differs).
fn two_platform_layout(dir: &Path) -> PathBuf {
    let (layout, amd64) = busybox(dir, "multi");
    let blobs = layout.join("blobs/sha256");
    let read = |d: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(blobs.join(d.trim_start_matches("sha256:"))).unwrap())
            .unwrap()
    };
    let manifest = read(&amd64);
    let mut config = read(manifest["config"]["digest"].as_str().unwrap());
    config["architecture"] = "arm64".into();
    let (cfg_digest, cfg_size) = write_blob(&blobs, config.to_string().as_bytes()).unwrap();
    let mut arm = manifest.clone();
    arm["config"]["digest"] = cfg_digest.into();
    arm["config"]["size"] = cfg_size.into();
    let arm_bytes = arm.to_string();
    let (arm64_digest, arm_size) = write_blob(&blobs, arm_bytes.as_bytes()).unwrap();
    let amd_size = std::fs::read(blobs.join(amd64.trim_start_matches("sha256:")))
        .unwrap()
        .len();
    let m = "application/vnd.oci.image.manifest.v1+json";
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": m, "digest": amd64, "size": amd_size, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": m, "digest": arm64_digest, "size": arm_size, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        ],
    });
    let (index_digest, index_size) = write_blob(&blobs, index.to_string().as_bytes()).unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": index_digest, "size": index_size,
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }]});
    std::fs::write(layout.join("index.json"), top.to_string()).unwrap();
    layout
}

#[test]
fn an_index_of_several_platforms_gives_this_machines_or_the_one_asked_for() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = two_platform_layout(work.path());
    let index_digest = registry
        .push(&format!("oci:{}:multi", layout.display()), "multi:1", true)
        .unwrap();
    // skopeo compressed the layer on the way: the registry's manifests.
    let index = registry.manifest(&format!("multi@{index_digest}")).unwrap();
    let for_arch = |arch: &str| {
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["platform"]["architecture"] == arch)
            .map(|m| m["digest"].as_str().unwrap().to_string())
            .unwrap()
    };
    let (amd64, arm64) = (for_arch("amd64"), for_arch("arm64"));
    let node = Node::new();
    let reference = format!("{}/multi:1", registry.host());
    let insecure = "--tls-verify=false";

    let out = node.pull_ok(&[&reference, insecure], &[]);
    assert!(out.contains(&format!("as multi:1 {amd64}")), "{out}");
    // The digest to pin is the index's: every platform resolves through it.
    let pinned = cairn_test_support::line_value(&out, "digest").unwrap();
    assert_eq!(pinned, index_digest);
    let out = node.pull_ok(
        &[
            &format!("{}/multi@{pinned}", registry.host()),
            insecure,
            "--name=multi:pinned",
        ],
        &[],
    );
    assert!(out.contains(&format!("as multi:pinned {amd64}")), "{out}");

    let out = node.pull_ok(
        &[
            &reference,
            insecure,
            "--platform=linux/arm64",
            "--name=multi:arm",
        ],
        &[],
    );
    assert!(out.contains(&format!("as multi:arm {arm64}")), "{out}");
    let err = node.pull_err(&[&reference, insecure, "--platform=linux/s390x"], &[]);
    assert!(
        err.contains("no image for linux/s390x") && err.contains("linux/amd64, linux/arm64/v8"),
        "{err}"
    );
    node.assert_no_leftovers();
}

#[test]
fn basic_auth_takes_credentials_from_an_authfile() {
    let registry = Registry::try_start(RegistryOptions {
        basic_auth: Some(("ci".into(), "s3cret".into())),
        ..RegistryOptions::default()
    })
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let digest = pushed(&registry, work.path(), "private", "private:1");
    let node = Node::new();
    let reference = format!("{}/private:1", registry.host());
    let insecure = "--tls-verify=false";

    let err = node.pull_err(&[&reference, insecure], &[]);
    assert!(err.contains("needs credentials"), "{err}");

    let auth = |user_pass: &str| {
        serde_json::json!({"auths": {registry.host(): {
            "auth": base64::engine::general_purpose::STANDARD.encode(user_pass)
        }}})
        .to_string()
    };
    let wrong = work.path().join("wrong.json");
    std::fs::write(&wrong, auth("ci:guess")).unwrap();
    let err = node.pull_err(
        &[&reference, insecure, "--authfile", wrong.to_str().unwrap()],
        &[],
    );
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(!err.contains("guess"), "no password in errors: {err}");

    let err = node.pull_err(
        &[&reference, insecure, "--authfile", "/nonexistent/auth.json"],
        &[],
    );
    assert!(err.contains("does not exist"), "{err}");

    // Where podman keeps them: $XDG_RUNTIME_DIR/containers/auth.json.
    std::fs::create_dir_all(node.dir.path().join("containers")).unwrap();
    std::fs::write(
        node.dir.path().join("containers/auth.json"),
        auth("ci:s3cret"),
    )
    .unwrap();
    let out = node.pull_ok(&[&reference, insecure], &[]);
    assert!(out.contains(&format!("as private:1 {digest}")), "{out}");
}

#[test]
fn tls_is_verified_against_the_system_cas_unless_told_otherwise() {
    let registry = Registry::try_start(RegistryOptions {
        tls: true,
        ..RegistryOptions::default()
    })
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let digest = pushed(&registry, work.path(), "tls", "tls:1");
    let node = Node::new();
    let reference = format!("{}/tls:1", registry.host());

    // Self-signed: not trusted by the system's CAs.
    let err = node.pull_err(&[&reference, "--retry=0"], &[]);
    assert!(err.contains("cannot reach registry"), "{err}");
    // Trusted once it is among them (SSL_CERT_FILE replaces the system bundle).
    let cert = registry.ca_certificate().unwrap();
    let out = node.pull_ok(&[&reference], &[("SSL_CERT_FILE", cert.to_str().unwrap())]);
    assert!(out.contains(&format!("as tls:1 {digest}")), "{out}");
    // Or not checked at all.
    let out = node.pull_ok(&[&reference, "--tls-verify=false", "--name=tls:2"], &[]);
    assert!(out.contains(&format!("as tls:2 {digest}")), "{out}");
}

#[test]
fn a_corrupted_blob_is_refused_and_nothing_is_stored() {
    let name = "corrupt";
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let digest = pushed(&registry, work.path(), "corrupt", "corrupt:1");
    let manifest = registry.manifest(&format!("{name}@{digest}")).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let data = registry.blob_data(layer.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&data).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&data, bytes).unwrap();

    let node = Node::new();
    let err = node.pull_err(
        &[
            &format!("{}/corrupt:1", registry.host()),
            "--tls-verify=false",
        ],
        &[],
    );
    assert!(
        err.contains(&format!("blob {layer}")) && err.contains("tampered"),
        "{err}"
    );
    assert!(node.images().is_empty());
    node.assert_no_leftovers();
}

#[test]
fn a_registry_that_is_down_fails_clearly() {
    let node = Node::new();
    let port = cairn_test_support::free_port();
    let started = std::time::Instant::now();
    let err = node.pull_err(
        &[
            &format!("127.0.0.1:{port}/app:1"),
            "--tls-verify=false",
            "--retry=1",
        ],
        &[],
    );
    assert!(
        err.contains(&format!("cannot reach registry 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        err.contains("attempt 2 in 1 s"),
        "the retry is reported: {err}"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "fails within the retries, not a hang"
    );
    assert!(node.images().is_empty());
    node.assert_no_leftovers();
}

/// A TCP proxy in front of the registry that cuts the first download of
/// `blob` after `cut_after` bytes of the answer, and notes whether a later
/// request asked for a range.
struct DroppingProxy {
    port: u16,
    cut: Arc<AtomicBool>,
    ranged: Arc<AtomicBool>,
}

impl DroppingProxy {
    fn start(upstream: u16, blob: String, cut_after: usize) -> DroppingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let ranged = Arc::new(AtomicBool::new(false));
        let (c, r) = (cut.clone(), ranged.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let (cut, ranged, blob) = (c.clone(), r.clone(), blob.clone());
                let armed = Arc::new(AtomicBool::new(false));
                // client → server: watch the requests.
                let (mut from, mut to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let arm = armed.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if text.contains(&format!("/blobs/{blob}")) {
                            if text.to_ascii_lowercase().contains("range: bytes=") {
                                ranged.store(true, Ordering::SeqCst);
                            } else if !cut.load(Ordering::SeqCst) {
                                arm.store(true, Ordering::SeqCst);
                            }
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
                // server → client: cut the armed answer.
                let (mut from, mut to) = (server, client);
                let cut = c.clone();
                std::thread::spawn(move || {
                    let mut sent = 0usize;
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if armed.load(Ordering::SeqCst) {
                            let room = cut_after.saturating_sub(sent).min(n);
                            let _ = to.write_all(&buf[..room]);
                            sent += room;
                            if sent >= cut_after {
                                cut.store(true, Ordering::SeqCst);
                                let _ = to.shutdown(Shutdown::Both);
                                let _ = from.shutdown(Shutdown::Both);
                                break;
                            }
                            continue;
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        });
        DroppingProxy { port, cut, ranged }
    }
}

#[test]
fn a_connection_dropped_in_the_middle_of_a_blob_resumes() {
    let name = "dropped";
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let digest = pushed(&registry, work.path(), "dropped", "dropped:1");
    let manifest = registry.manifest(&format!("{name}@{digest}")).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let size = manifest["layers"][0]["size"].as_u64().unwrap();
    assert!(size > 400_000, "the layer is big enough to cut: {size}");
    let proxy = DroppingProxy::start(registry.port(), layer, 200_000);

    let node = Node::new();
    let out = node.pull_ok(
        &[
            &format!("127.0.0.1:{}/dropped:1", proxy.port),
            "--tls-verify=false",
        ],
        &[],
    );
    assert!(out.contains(&format!("as dropped:1 {digest}")), "{out}");
    assert!(
        proxy.cut.load(Ordering::SeqCst),
        "the proxy cut the download"
    );
    assert!(
        proxy.ranged.load(Ordering::SeqCst),
        "the retry resumed with a range request"
    );
    // Fetched about the blob once, not twice.
    let fetched: u64 = out
        .split(" bytes in ")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        fetched < size + 100_000,
        "fetched {fetched} bytes for a {size}-byte layer"
    );
    let verified = node.host(&["verify", "dropped:1"], &[]);
    assert!(verified.status.success());
}
