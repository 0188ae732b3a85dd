//! The `host` executable loads libostree, gio, gobject and glib on first use
//! (src/lazy_libs.rs): no DT_NEEDED entry for them, they appear only when a
//! command calls into them, and those commands still work.

mod common;

use std::path::Path;

use common::{host, text};
use object::read::elf::{Dyn as _, ElfFile64};

/// The DT_NEEDED entries of an ELF executable.
fn needed(path: &Path) -> Vec<String> {
    let data = std::fs::read(path).unwrap();
    let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    let (dyns, link) = sections
        .dynamic(endian, &*data)
        .unwrap()
        .expect("a dynamically linked executable");
    let strings = sections.strings(endian, &*data, link).unwrap();
    dyns.iter()
        .filter(|d| d.tag32(endian) == Some(object::elf::DT_NEEDED))
        .map(|d| String::from_utf8(d.string(endian, strings).unwrap().to_vec()).unwrap())
        .collect()
}

const LAZY: [&str; 4] = [
    "libostree-1.so.1",
    "libgio-2.0.so.0",
    "libgobject-2.0.so.0",
    "libglib-2.0.so.0",
];

#[test]
fn host_has_no_dt_needed_on_the_lazy_libraries() {
    let libs = needed(Path::new(env!("CARGO_BIN_EXE_host")));
    // The parse is real: what the binary does need is there.
    assert!(libs.iter().any(|l| l == "libc.so.6"), "{libs:?}");
    for lazy in LAZY {
        assert!(
            !libs.iter().any(|l| l == lazy),
            "host links {lazy} directly again: {libs:?}"
        );
    }
}

/// The objects the dynamic loader mapped while running `host ARGS`, from
/// glibc's LD_DEBUG=files trace.
fn loaded_objects(args: &[&str]) -> (std::process::Output, String) {
    let out = host().args(args).env("LD_DEBUG", "files").output().unwrap();
    let trace = String::from_utf8_lossy(&out.stderr).into_owned();
    // The trace works at all: the libraries linked directly are in it.
    assert!(trace.contains("file=libc.so.6"), "{}", text(&out));
    (out, trace)
}

#[test]
fn the_libraries_are_loaded_only_by_commands_that_use_them() {
    let (out, trace) = loaded_objects(&["app", "--help"]);
    assert!(out.status.success(), "{}", text(&out));
    for lazy in LAZY {
        assert!(
            !trace.contains(lazy),
            "{lazy} loaded by app --help:\n{trace}"
        );
    }

    // `app verify` opens (here: creates) the image repository through
    // libostree, then looks the image up in it.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap();
    let (out, trace) = loaded_objects(&["app", "verify", "--root", root_s, "nosuch:1"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        trace.contains("file=libostree-1.so.1 [0];  dynamically loaded by"),
        "{trace}"
    );
    assert!(trace.contains("file=libglib-2.0.so.0"), "{trace}");
    assert!(
        trace.contains("error: no image nosuch:1 in the store"),
        "{}",
        text(&out)
    );
    // libostree made a real repository (stock ostree reads it back).
    assert!(root.join("repo/config").is_file());
    let refs = common::ostree_cli(&root.join("repo"), &["refs"]);
    assert_eq!(refs.trim(), "");
}

/// A one-layer OCI image layout of the host's static busybox with
/// `/marker` holding `marker`.
fn busybox_layout(dir: &Path, marker: &str) {
    use sha2::Digest as _;
    let stage = dir.join("stage");
    std::fs::create_dir_all(stage.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .expect("busybox-static is installed (scripts/setup)");
    for applet in ["sh", "cat", "true"] {
        std::os::unix::fs::symlink("busybox", stage.join("bin").join(applet)).unwrap();
    }
    std::fs::write(stage.join("marker"), marker).unwrap();
    let layer = dir.join("layer.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(&stage)
        .arg("-cf")
        .arg(&layer)
        .args(["bin", "marker"])
        .status()
        .unwrap();
    assert!(st.success());
    let layout = dir.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let h = hex::encode(sha2::Sha256::digest(data));
        std::fs::write(blobs.join(&h), data).unwrap();
        (format!("sha256:{h}"), data.len())
    };
    let (layer_digest, layer_size) = put(&std::fs::read(&layer).unwrap());
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/bin/cat", "/marker"] },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": layer_digest, "size": layer_size }],
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest, "size": manifest_size }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn app_run_of_a_checked_out_image_loads_none_of_them() {
    common::require_root("runs containers");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap().to_string();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    busybox_layout(&a, "image A");
    busybox_layout(&b, "image B");
    let app = |args: &[&str]| -> (String, bool) {
        let mut all = vec!["app", "--root", &root_s];
        all.extend_from_slice(args);
        let (out, trace) = loaded_objects(&all);
        assert!(out.status.success(), "{}", text(&out));
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            LAZY.iter().any(|l| trace.contains(&format!("file={l}"))),
        )
    };
    let run = ["run", "--rm", "--network", "none", "bb:1"];

    // Import needs libostree, and so does the first run (the checkout).
    let (_, loaded) = app(&["import", a.join("oci").to_str().unwrap(), "--name", "bb:1"]);
    assert!(loaded, "import must load libostree");
    let (out, loaded) = app(&run);
    assert_eq!((out.as_str(), loaded), ("image A", true));
    // From now on the checkout and its record are enough.
    let (out, loaded) = app(&run);
    assert_eq!((out.as_str(), loaded), ("image A", false));

    // The ref moves to another image: never the stale checkout.
    let (_, loaded) = app(&["import", b.join("oci").to_str().unwrap(), "--name", "bb:1"]);
    assert!(loaded);
    let (out, loaded) = app(&run);
    assert_eq!((out.as_str(), loaded), ("image B", true));
    let (out, loaded) = app(&run);
    assert_eq!((out.as_str(), loaded), ("image B", false));

    // A digest reference goes through the repository.
    let images: serde_json::Value = serde_json::from_str(&app(&["images", "--json"]).0).unwrap();
    let img = &images.as_array().unwrap()[0];
    let commit = img["commit"].as_str().unwrap().to_string();
    let by_digest = format!("bb@{}", img["manifest_digest"].as_str().unwrap());
    let (out, loaded) = app(&["run", "--rm", "--network", "none", &by_digest]);
    assert_eq!((out.as_str(), loaded), ("image B", true));

    // rmi takes the checkout and its record along.
    let record = root.join("checkouts").join(format!("{commit}.json"));
    assert!(record.is_file() && root.join("checkouts").join(&commit).is_dir());
    app(&["rmi", "bb:1"]);
    assert!(!record.exists() && !root.join("checkouts").join(&commit).exists());
}
