//! One-layer OCI image layouts of the build machine's static busybox
//! (Debian's busybox-static), written by hand: blobs, index.json, oci-layout.
//!
//! The layer is a deterministic tar (GNU tar: sorted, mtime 0, owner 0), so
//! the same busybox and spec always give the same manifest digest: the QEMU
//! tests key cached composes on it.

use std::io;
use std::path::Path;
use std::process::Command;

use sha2::{Digest as _, Sha256};

/// Which busybox applets get a `/bin/NAME -> busybox` link.
#[derive(Clone, Copy, Debug)]
pub enum Applets<'a> {
    /// Every applet of `busybox --list`.
    All,
    Only(&'a [&'a str]),
}

/// What goes in the image besides `/bin/busybox`.
#[derive(Clone, Copy, Debug)]
pub struct LayoutSpec<'a> {
    pub applets: Applets<'a>,
    /// Empty directories (relative to the root), made before the files.
    pub dirs: &'a [&'a str],
    /// Files (path relative to the root, contents); mode 0644.
    pub files: &'a [(&'a str, &'a [u8])],
    /// The config's `Cmd`.
    pub cmd: &'a [&'a str],
    /// The config's `ExposedPorts` (`"8080/tcp"`); left out if empty.
    pub exposed_ports: &'a [&'a str],
    /// The config's `created`; left out if None.
    pub created: Option<&'a str>,
    /// The `org.opencontainers.image.ref.name` annotation in index.json.
    pub ref_name: Option<&'a str>,
}

impl Default for LayoutSpec<'_> {
    fn default() -> Self {
        LayoutSpec {
            applets: Applets::All,
            dirs: &[],
            files: &[],
            cmd: &["/bin/sh"],
            exposed_ports: &[],
            created: None,
            ref_name: None,
        }
    }
}

/// The static busybox of this machine.
pub fn busybox_path() -> io::Result<&'static Path> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "busybox is not installed (Debian package busybox-static; scripts/setup installs it)",
            )
        })
}

/// Writes `data` into `blobs` (a layout's `blobs/sha256`); returns its
/// digest (`sha256:…`) and size.
pub fn write_blob(blobs: &Path, data: &[u8]) -> io::Result<(String, usize)> {
    let hex = hex::encode(Sha256::digest(data));
    std::fs::write(blobs.join(&hex), data)?;
    Ok((format!("sha256:{hex}"), data.len()))
}

fn other(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Writes the layout at `layout` (replacing whatever was there; the rootfs
/// is staged in `<layout>.work`, removed afterwards) and returns the
/// manifest digest (`sha256:…`).
pub fn busybox_layout(layout: &Path, spec: &LayoutSpec) -> io::Result<String> {
    let busybox = busybox_path()?;
    let work = layout.with_extension("work");
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    for d in spec.dirs {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy(busybox, rootfs.join("bin/busybox")).map_err(|e| other("copying busybox", e))?;
    let listed;
    let applets: Vec<&str> = match spec.applets {
        Applets::Only(names) => names.to_vec(),
        Applets::All => {
            let out = Command::new(busybox)
                .arg("--list")
                .output()
                .map_err(|e| other("busybox --list", e))?;
            listed = String::from_utf8_lossy(&out.stdout).into_owned();
            listed.lines().map(str::trim).collect()
        }
    };
    for applet in applets {
        if !applet.is_empty() && applet != "busybox" {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
        }
    }
    for (path, data) in spec.files {
        let path = rootfs.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, data)?;
    }
    let layer = work.join("layer.tar");
    let status = Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--format=gnu",
            "-C",
        ])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()
        .map_err(|e| other("running tar", e))?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "tar of {} failed: {status}",
            rootfs.display()
        )));
    }

    let _ = std::fs::remove_dir_all(layout);
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let (layer_digest, layer_size) = write_blob(&blobs, &std::fs::read(&layer)?)?;
    // Keys in the order the QEMU tests' layout had them: with serde_json's
    // sorted maps the order does not matter, with preserve_order it would.
    let mut config = serde_json::Map::new();
    if let Some(created) = spec.created {
        config.insert("created".into(), created.into());
    }
    config.insert("architecture".into(), "amd64".into());
    config.insert("os".into(), "linux".into());
    let mut inner = serde_json::Map::new();
    inner.insert("Cmd".into(), spec.cmd.into());
    if !spec.exposed_ports.is_empty() {
        let ports = spec
            .exposed_ports
            .iter()
            .map(|p| (p.to_string(), serde_json::json!({})))
            .collect();
        inner.insert("ExposedPorts".into(), serde_json::Value::Object(ports));
    }
    config.insert("config".into(), inner.into());
    config.insert(
        "rootfs".into(),
        serde_json::json!({ "type": "layers", "diff_ids": [layer_digest] }),
    );
    let config = serde_json::Value::Object(config);
    let (config_digest, config_size) = write_blob(&blobs, config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size }],
    });
    let (manifest_digest, manifest_size) = write_blob(&blobs, manifest.to_string().as_bytes())?;
    let mut descriptor = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": manifest_size,
    });
    if let Some(name) = spec.ref_name {
        descriptor["annotations"] =
            serde_json::json!({ "org.opencontainers.image.ref.name": name });
    }
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [descriptor] });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(manifest_digest)
}

/// The digest of the first manifest in a layout's index.json.
pub fn index_digest(layout: &Path) -> io::Result<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)
            .map_err(io::Error::other)?;
    index["manifests"][0]["digest"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| io::Error::other("index.json has no manifests[0].digest"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(files: &'a [(&'a str, &'a [u8])]) -> LayoutSpec<'a> {
        LayoutSpec {
            applets: Applets::Only(&["sh", "cat"]),
            files,
            cmd: &["/bin/cat", "/marker"],
            ref_name: Some("busybox:t"),
            ..LayoutSpec::default()
        }
    }

    /// Needs busybox-static and GNU tar (scripts/setup installs them).
    #[test]
    fn same_spec_same_digest_and_a_complete_layout() {
        let dir = tempfile::tempdir().unwrap();
        let a = busybox_layout(&dir.path().join("a"), &spec(&[("marker", b"1")])).unwrap();
        let b = busybox_layout(&dir.path().join("b"), &spec(&[("marker", b"1")])).unwrap();
        let c = busybox_layout(&dir.path().join("c"), &spec(&[("marker", b"2")])).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let layout = dir.path().join("a");
        assert_eq!(index_digest(&layout).unwrap(), a);
        assert!(!dir.path().join("a.work").exists());
        let blob = |d: &str| {
            layout
                .join("blobs/sha256")
                .join(d.strip_prefix("sha256:").unwrap())
        };
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(blob(&a)).unwrap()).unwrap();
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        assert_eq!(config["config"]["Cmd"][0], "/bin/cat");
        assert!(config.get("created").is_none());
        let layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
        let list = Command::new("tar")
            .arg("-tvf")
            .arg(&layer)
            .output()
            .unwrap();
        let list = String::from_utf8(list.stdout).unwrap();
        assert!(list.contains("./bin/cat -> busybox"), "{list}");
        assert!(list.contains("./marker"), "{list}");
    }
}
