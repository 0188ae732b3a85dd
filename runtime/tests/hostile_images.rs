//! Privileged tests of image import against hostile images, and against
//! images made by the usual tools (buildah, skopeo, umoci; made by
//! `support/tool_images.rs`, which privileged.rs shares to run them).
//!
//! Marked `#[ignore = "privileged: …"]` like the tests of privileged.rs: run
//! with `cargo test -- --ignored` (scripts/test, as root). Run without root
//! they fail loudly, never skip. Every test makes its images itself, in
//! temporary directories, uses a temporary state root and removes it all.

#[path = "support/store.rs"]
mod store;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use store::StoreExt;

use cairn_oci::image::{self, ImportLimits, ImportOptions};
use cairn_runtime::net::NetworkConfig;
use cairn_runtime::Runtime;
use sha2::Digest as _;

#[path = "support/tool_images.rs"]
mod tool_images;
use tool_images::{run, BuildahImages, APP_UID, HOME_MODE};

fn require_root() {
    cairn_test_support::require_root("ownership, setuid bits, file capabilities");
}

/// A runtime over a fresh temporary state root.
struct Env {
    rt: Runtime,
    root: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        require_root();
        let root = tempfile::tempdir().unwrap();
        let rt = Runtime::new(
            root.path(),
            NetworkConfig::parse("cthostile0", "10.213.0.1/24").unwrap(),
        );
        Env { rt, root }
    }

    /// The import failed: nothing committed, no staging left in repo/tmp.
    fn import_fails(&self, path: &Path, opts: &ImportOptions) -> String {
        let err = format!("{:#}", self.rt.import_with(path, opts).unwrap_err());
        assert!(
            self.rt.images().unwrap().is_empty(),
            "nothing committed: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(self.rt.paths.repo().join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with("cairn-import-"))
            .collect();
        assert!(left.is_empty(), "staging left behind: {left:?} ({err})");
        err
    }

    /// The checkout of an imported image.
    fn checkout(&self, info: &image::ImageInfo) -> PathBuf {
        cairn_oci::store::ensure_checkout(
            &self.rt.repo().unwrap(),
            &info.commit,
            &self.rt.paths.checkouts(),
        )
        .unwrap()
    }
}

fn sha256(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn put(layout: &Path, data: &[u8]) -> serde_json::Value {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let h = sha256(data);
    std::fs::write(layout.join("blobs/sha256").join(&h), data).unwrap();
    serde_json::json!({ "digest": format!("sha256:{h}"), "size": data.len() })
}

/// An OCI layout of one image whose layers are given as (uncompressed tar
/// for the diff_id, blob as stored).
fn layout_of(layout: &Path, layers: &[(Vec<u8>, Vec<u8>)]) {
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids":
            layers.iter().map(|(t, _)| format!("sha256:{}", sha256(t))).collect::<Vec<_>>() }
    });
    let mut cfg = put(layout, config.to_string().as_bytes());
    cfg["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let ls: Vec<_> = layers
        .iter()
        .map(|(_, b)| {
            let mut d = put(layout, b);
            d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
            d
        })
        .collect();
    let m = serde_json::json!({ "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cfg, "layers": ls });
    let mut d = put(layout, m.to_string().as_bytes());
    d["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [d] });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

fn gzip(d: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(d).unwrap();
    gz.finish().unwrap()
}

/// A plain (uncompressed) layer: its tar is its blob.
fn plain(t: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    (t.clone(), t)
}

fn hdr(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(0);
    h
}

fn named() -> ImportOptions {
    ImportOptions {
        name: Some("hostile:1".into()),
        ..Default::default()
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

// ---------------------------------------------------------------- hostile images

/// A setuid, world-writable directory later replaced by a symlink to a host
/// file, and a directory whose parent is later swapped for a symlink to a
/// host directory: the deferred modes must not reach the host.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn deferred_modes_never_reach_host_files() {
    let env = Env::new();
    let host = tempfile::tempdir().unwrap();
    let host_file = host.path().join("shadow-like");
    std::fs::write(&host_file, "root only").unwrap();
    std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let host_dir = host.path().join("q");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o700)).unwrap();

    let mut b = tar::Builder::new(Vec::new());
    b.append_data(
        &mut hdr(tar::EntryType::Directory, 0o4777, 0),
        "v/",
        std::io::empty(),
    )
    .unwrap();
    b.append_link(&mut hdr(tar::EntryType::Symlink, 0o777, 0), "v", &host_file)
        .unwrap();
    b.append_data(
        &mut hdr(tar::EntryType::Directory, 0o755, 0),
        "p/",
        std::io::empty(),
    )
    .unwrap();
    b.append_data(
        &mut hdr(tar::EntryType::Directory, 0o6777, 1000),
        "p/q/",
        std::io::empty(),
    )
    .unwrap();
    b.append_link(
        &mut hdr(tar::EntryType::Symlink, 0o777, 0),
        "p",
        host.path(),
    )
    .unwrap();
    let l1 = b.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    layout_of(dir.path(), &[(l1.clone(), gzip(&l1))]);
    let info = env.rt.import_with(dir.path(), &named()).unwrap();
    assert_eq!(mode(&host_file), 0o600, "host file chmodded");
    assert_eq!(mode(&host_dir), 0o700, "host directory chmodded");
    assert_eq!(std::fs::metadata(&host_dir).unwrap().uid(), 0);
    let co = env.checkout(&info);
    assert!(std::fs::symlink_metadata(co.join("v"))
        .unwrap()
        .file_type()
        .is_symlink());
}

/// Whiteouts of `.`/`..` and friends, owners out of range, links and paths
/// over the limits: each refused with the entry and the layer named, and
/// nothing left in the store.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn hostile_entries_are_refused_and_leave_nothing() {
    let env = Env::new();
    let cases: Vec<(&str, Vec<u8>, &str)> = {
        let mut v = Vec::new();
        for name in [".wh..", ".wh...", "etc/.wh..", ".wh.", ".wh.x/y"] {
            let mut b = tar::Builder::new(Vec::new());
            b.append_data(
                &mut hdr(tar::EntryType::Directory, 0o755, 0),
                "etc/",
                std::io::empty(),
            )
            .unwrap();
            b.append_data(
                &mut hdr(tar::EntryType::Regular, 0o644, 0),
                name,
                std::io::empty(),
            )
            .unwrap();
            v.push((name, b.into_inner().unwrap(), name));
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut h = hdr(tar::EntryType::Regular, 0o4755, 1 << 32);
        h.set_size(2);
        b.append_data(&mut h, "bin/su", &b"#!"[..]).unwrap();
        v.push(("uid 2^32", b.into_inner().unwrap(), "out of range"));
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/f", "d/".repeat(300));
        b.append_data(
            &mut hdr(tar::EntryType::Regular, 0o644, 0),
            &long,
            std::io::empty(),
        )
        .unwrap();
        v.push(("deep path", b.into_inner().unwrap(), "max_path_depth"));
        v
    };
    for (what, layer, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        layout_of(dir.path(), &[plain(layer)]);
        let err = env.import_fails(dir.path(), &named());
        assert!(
            err.contains(needle) && err.contains("layer 1 of 1"),
            "{what}: {err}"
        );
    }
}

/// Decompression bombs, gzip and zstd, at the default limits: refused
/// after a few MiB, not after filling the disk, and nothing left behind.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn decompression_bombs_are_refused_at_the_default_limits() {
    let env = Env::new();
    // 1 GiB of zeros in a tar entry, as 64 gzip members (or zstd frames) of 16 MiB.
    let chunk = vec![0u8; 16 << 20];
    let mut header = hdr(tar::EntryType::Regular, 0o644, 0);
    header.set_path("zeros").unwrap();
    header.set_size(1 << 30);
    header.set_cksum();
    let mut first = header.as_bytes().to_vec();
    first.extend_from_slice(&chunk[..chunk.len() - 512]);
    let (g1, gz) = (gzip(&first), gzip(&chunk));
    let (z1, zs) = (
        zstd::encode_all(&first[..], 1).unwrap(),
        zstd::encode_all(&chunk[..], 1).unwrap(),
    );
    for (what, head, rest) in [("gzip", g1, gz), ("zstd", z1, zs)] {
        let mut blob = head;
        for _ in 1..64 {
            blob.extend_from_slice(&rest);
        }
        let dir = tempfile::tempdir().unwrap();
        // The diff_id cannot be right: the limit must trip before it matters.
        layout_of(dir.path(), &[(b"unknown".to_vec(), blob)]);
        let t = std::time::Instant::now();
        let err = env.import_fails(dir.path(), &named());
        assert!(err.contains("max_ratio"), "{what}: {err}");
        assert!(
            t.elapsed().as_secs() < 20,
            "{what}: refused only after {:?}",
            t.elapsed()
        );
    }
    // And the size limit, with the ratio out of the way.
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = hdr(tar::EntryType::Regular, 0o644, 0);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, "big", &data[..]).unwrap();
    layout_of(dir.path(), &[plain(b.into_inner().unwrap())]);
    let opts = ImportOptions {
        limits: ImportLimits {
            max_image_size: 1 << 20,
            ..Default::default()
        },
        ..named()
    };
    let err = env.import_fails(dir.path(), &opts);
    assert!(
        err.contains("max_image_size") && err.contains("--max-image-size"),
        "{err}"
    );
}

/// The state root, the repository, its tmp and the checkouts are 0700 (made
/// so, or tightened), so an image's setuid-root files cannot be run by
/// local users; the setuid bit itself is kept for the container.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn the_store_is_private_and_setuid_files_unreachable() {
    let env = Env::new();
    std::fs::set_permissions(env.root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = hdr(tar::EntryType::Regular, 0o4755, 0);
    h.set_size(4);
    b.append_data(&mut h, "bin/suid", &b"\x7fELF"[..]).unwrap();
    let l = b.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    layout_of(dir.path(), &[(l.clone(), gzip(&l))]);
    let info = env.rt.import_with(dir.path(), &named()).unwrap();
    let co = env.checkout(&info);
    assert_eq!(
        mode(&co.join("bin/suid")),
        0o4755,
        "setuid kept inside the image"
    );
    for p in [
        env.root.path().to_path_buf(),
        env.rt.paths.repo(),
        env.rt.paths.repo().join("tmp"),
        env.rt.paths.checkouts(),
    ] {
        assert_eq!(mode(&p), 0o700, "{}", p.display());
    }
    // An older, world-readable store is tightened on the next open.
    for p in [env.root.path().to_path_buf(), env.rt.paths.repo()] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    env.rt.images().unwrap();
    env.rt.repo().unwrap();
    assert_eq!(mode(env.root.path()), 0o700);
    assert_eq!(mode(&env.rt.paths.repo()), 0o700);
}

/// A store in the host's repository (a node's, `Store::with_host_repo`):
/// images lose their setuid/setgid bits and file capabilities (the
/// repository's objects are readable by every local user), checkouts are
/// hardlinks to those objects, the repository's own modes stay libostree's,
/// the images of the state root's older private repository move in (their
/// containers' checkouts stay), and removing an image leaves its objects to
/// the host's cleanup.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn a_store_in_the_host_repository_holds_no_privileged_files() {
    let env = Env::new();
    let cap = expected_cap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = hdr(tar::EntryType::Regular, 0o6755, 0);
    h.set_size(4);
    b.append_data(&mut h, "bin/suid", &b"\x7fELF"[..]).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])])
        .unwrap();
    let mut h = hdr(tar::EntryType::Regular, 0o755, 0);
    h.set_size(4);
    b.append_data(&mut h, "bin/pinger", &b"\x7fELF"[..])
        .unwrap();
    let l = b.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    layout_of(dir.path(), &[(l.clone(), gzip(&l))]);

    // Before: the root's own repository, privileges kept (0700 all round).
    let private = cairn_oci::store::Store::new(env.root.path());
    let old = private.import_with(dir.path(), &named()).unwrap();
    let (_, old_tree) = private.checkout(&old.reference()).unwrap();
    assert_eq!(mode(&old_tree.join("bin/suid")), 0o6755);

    let host = tempfile::tempdir().unwrap();
    let host_repo = host.path().join("repo");
    ostree::Repo::create_at(
        libc::AT_FDCWD,
        host_repo.to_str().unwrap(),
        ostree::RepoMode::Bare,
        None,
        ostree::gio::Cancellable::NONE,
    )
    .unwrap();
    for p in [host_repo.clone(), host_repo.join("tmp")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let shared = cairn_oci::store::Store::new(env.root.path()).with_host_repo(&host_repo);
    let images = shared.images().unwrap();
    assert_eq!(images.len(), 1, "{images:?}");
    let moved = &images[0];
    assert_eq!(
        (&moved.reference(), &moved.manifest_digest),
        (&old.reference(), &old.manifest_digest)
    );
    assert_ne!(moved.commit, old.commit, "stripped, so another tree");
    assert!(
        !env.root.path().join("repo").exists(),
        "the private repository is gone once its images moved"
    );
    assert!(old_tree.join("bin/suid").exists(), "old checkouts stay");
    for p in [host_repo.clone(), host_repo.join("tmp")] {
        assert_eq!(mode(&p), 0o755, "{} keeps its mode", p.display());
    }
    assert_eq!(
        mode(&host_repo.join("objects")),
        0o700,
        "objects keep their image owners: root's alone"
    );

    let (_, tree) = shared.checkout(&moved.reference()).unwrap();
    let check = |tree: &Path, what: &str| {
        assert_eq!(
            mode(&tree.join("bin/suid")),
            0o755,
            "{what}: setuid/setgid cleared"
        );
        for f in ["bin/suid", "bin/pinger"] {
            assert_eq!(
                xattr(&tree.join(f), "security.capability"),
                None,
                "{what}: no file capability on {f}"
            );
        }
        assert!(
            std::fs::metadata(tree.join("bin/suid")).unwrap().nlink() >= 2,
            "{what}: the checkout hardlinks the repository's object"
        );
    };
    check(&tree, "moved in");

    // A new import goes straight in, stripped.
    let again = shared
        .import_with(
            dir.path(),
            &ImportOptions {
                name: Some("hostile:2".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let (_, tree2) = shared.checkout(&again.reference()).unwrap();
    check(&tree2, "imported");
    let ino = |t: &Path| std::fs::metadata(t.join("bin/suid")).unwrap().ino();
    assert_eq!(ino(&tree), ino(&tree2), "one file, stored once");

    // Removing leaves the objects to the host's cleanup.
    let objects = || {
        walkdir::WalkDir::new(host_repo.join("objects"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .count()
    };
    let before = objects();
    shared.rmi("hostile:1", &[]).unwrap();
    shared.rmi("hostile:2", &[]).unwrap();
    let pruned = shared.prune(&[]).unwrap();
    assert!(pruned.objects_left_to_host, "{pruned:?}");
    assert_eq!(objects(), before, "no object deleted by the image store");
    assert!(!tree.exists() && !old_tree.exists(), "{pruned:?}");
}

// ---------------------------------------------------------------- real tools

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c_path = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let c_name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a live buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

/// What every tool-made image must look like once imported.
fn check_tree(co: &Path, cap: &[u8], what: &str) {
    assert!(co.join("bin/busybox").is_file(), "{what}: busybox");
    let home = std::fs::metadata(co.join("home/app")).unwrap();
    assert_eq!(
        (home.uid(), home.gid()),
        (APP_UID, APP_UID),
        "{what}: home owner"
    );
    assert_eq!(
        home.permissions().mode() & 0o7777,
        HOME_MODE,
        "{what}: home mode"
    );
    assert_eq!(
        xattr(&co.join("bin/pinger"), "security.capability").as_deref(),
        Some(cap),
        "{what}: file capability"
    );
    assert!(
        std::fs::read_to_string(co.join("etc/passwd"))
            .unwrap()
            .contains("app:x:1000"),
        "{what}"
    );
    assert!(!co.join("etc/gone").exists(), "{what}: whiteout applied");
    assert!(
        std::fs::read_dir(co.join("etc"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".wh.")),
        "{what}: no whiteout file left"
    );
}

/// The capability xattr `setcap cap_net_bind_service=+ep` writes here.
fn expected_cap() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("f");
    std::fs::write(&f, "x").unwrap();
    run(Command::new("setcap")
        .arg("cap_net_bind_service=+ep")
        .arg(&f));
    xattr(&f, "security.capability").expect("setcap wrote security.capability")
}

/// buildah makes a one- and a two-layer image; buildah push and skopeo copy
/// write them as an OCI layout (two tags), an oci-archive and a
/// docker-archive (see `tool_images::buildah_and_skopeo`); each is imported
/// and checked. privileged.rs runs them.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn images_made_by_buildah_and_skopeo() {
    let env = Env::new();
    let cap = expected_cap();
    let work = tempfile::tempdir().unwrap();
    let BuildahImages {
        oci,
        oci_archive,
        docker_archive,
    } = tool_images::buildah_and_skopeo(work.path());

    // Two tags in one layout: no tag is an error listing them.
    let err = env.import_fails(
        &oci,
        &ImportOptions {
            name: Some("toolimg:v2".into()),
            ..Default::default()
        },
    );
    assert!(err.contains("v1, v2") && err.contains("PATH:TAG"), "{err}");
    let with_tag = PathBuf::from(format!("{}:v2", oci.display()));
    let info = env
        .rt
        .import_with(
            &with_tag,
            &ImportOptions {
                name: Some("toolimg:v2".into()),
                ..Default::default()
            },
        )
        .unwrap();
    check_tree(&env.checkout(&info), &cap, "buildah push oci:DIR:v2");
    assert_eq!(info.config.user.as_deref(), Some("app"));
    let v1 = env
        .rt
        .import_with(
            &oci,
            &ImportOptions {
                name: Some("toolimg:v1".into()),
                tag: Some("v1".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        env.checkout(&v1).join("etc/gone").exists(),
        "v1 is the one-layer image"
    );
    let info = env
        .rt
        .import_with(
            &oci_archive,
            &ImportOptions {
                name: Some("toolimg:arch".into()),
                ..Default::default()
            },
        )
        .unwrap();
    check_tree(&env.checkout(&info), &cap, "skopeo copy oci-archive:");
    let info = env.rt.import(&docker_archive, None).unwrap();
    assert_eq!(info.reference(), "toolimg:v2", "name from RepoTags");
    check_tree(&env.checkout(&info), &cap, "buildah push docker-archive:");
}

/// umoci builds a two-layer OCI layout from unpacked bundles (see
/// `tool_images::umoci`). privileged.rs runs it.
#[test]
#[ignore = "privileged: needs root; run by scripts/test"]
fn images_made_by_umoci() {
    let env = Env::new();
    let cap = expected_cap();
    let work = tempfile::tempdir().unwrap();
    let layout = tool_images::umoci(work.path());
    let info = env
        .rt
        .import_with(
            &layout,
            &ImportOptions {
                name: Some("umoci:app".into()),
                ..Default::default()
            },
        )
        .unwrap();
    check_tree(&env.checkout(&info), &cap, "umoci");
    assert_eq!(info.config.cmd, vec!["/bin/sh".to_string()]);
}
