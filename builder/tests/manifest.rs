//! The manifest format: parsing, includes, validation and their error messages.
//! Unit tier: no root, no network.

use std::path::Path;

use cairn_builder::manifest::{Manifest, ManifestError};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

fn err(dir: &Path, text: &str) -> String {
    let p = write(dir, "m.toml", text);
    Manifest::load(&p).unwrap_err().to_string()
}

#[test]
fn the_shipped_manifest_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/container-host.toml");
    let m = Manifest::load(&path).unwrap();
    assert_eq!(m.ref_name(), "cairn/bookworm/x86_64/container-host");
    let pkgs = m.spec.packages.as_ref().unwrap();
    for needed in [
        "linux-image-amd64",
        "dracut",
        "ostree-boot",
        "systemd",
        "udev",
        "iproute2",
        "libostree-1-1",
    ] {
        assert!(
            pkgs.install.iter().any(|p| p == needed),
            "container-host.toml must install {needed}"
        );
    }
    assert_eq!(m.spec.self_install.as_deref(), Some("/usr/bin/host"));
    assert!(m
        .spec
        .kernel_args
        .iter()
        .any(|k| k == "systemd.unified_cgroup_hierarchy=1"));
}

#[test]
fn includes_concatenate_arrays_and_the_including_file_wins_scalars() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "files/a", "a");
    write(dir.path(), "files/b", "b");
    write(
        dir.path(),
        "base/base.toml",
        r#"ref = "base/ref"
version-prefix = "1"
kernel-args = ["console=ttyS0"]
[metadata]
kept = "base"
replaced = "base"
[packages]
suite = "bookworm"
install = ["systemd"]
[[files]]
src = "../files/a"
dst = "/etc/a"
"#,
    );
    let top = write(
        dir.path(),
        "top.toml",
        r#"include = ["base/base.toml"]
ref = "top/ref"
kernel-args = ["quiet"]
[metadata]
replaced = "top"
[packages]
install = ["iproute2"]
[[files]]
src = "files/b"
dst = "/usr/share/b"
"#,
    );
    let m = Manifest::load(&top).unwrap();
    assert_eq!(m.ref_name(), "top/ref");
    assert_eq!(m.spec.version_prefix.as_deref(), Some("1"));
    assert_eq!(m.spec.kernel_args, vec!["console=ttyS0", "quiet"]);
    assert_eq!(m.spec.metadata["kept"], "base");
    assert_eq!(m.spec.metadata["replaced"], "top");
    let pkgs = m.spec.packages.as_ref().unwrap();
    assert_eq!(pkgs.suite.as_deref(), Some("bookworm"));
    assert_eq!(pkgs.install, vec!["systemd", "iproute2"]);
    // Paths are relative to the file that names them.
    assert_eq!(m.spec.files[0].src, dir.path().join("base/../files/a"));
    assert_eq!(m.spec.files[1].src, dir.path().join("files/b"));
}

#[test]
fn unknown_keys_are_errors_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let e = err(
        dir.path(),
        "ref = \"a/b\"\nrootfs = \".\"\n\n[units]\nenabel = [\"x.service\"]\n",
    );
    assert!(e.contains("m.toml"), "{e}");
    assert!(e.contains("line 5"), "{e}");
    assert!(e.contains("enabel"), "{e}");
}

#[test]
fn an_unknown_key_in_an_included_file_names_that_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "inc.toml",
        "[packages]\nsuite = \"bookworm\"\nbogus = 1\n",
    );
    let e = err(dir.path(), "include = [\"inc.toml\"]\nref = \"a/b\"\n");
    assert!(
        e.contains("inc.toml") && e.contains("line 3") && e.contains("bogus"),
        "{e}"
    );
}

#[test]
fn malformed_toml_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let e = err(dir.path(), "ref = \"a/b\"\nrootfs = [\n");
    assert!(e.contains("m.toml") && e.contains("line"), "{e}");
}

#[test]
fn validation_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "f", "x");
    let cases = [
        ("rootfs = \".\"\n", "key `ref`: missing"),
        ("ref = \"/bad\"\nrootfs = \".\"\n", "key `ref`"),
        ("ref = \"a/b\"\n", "key `packages`"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[packages]\nsuite = \"bookworm\"\n", "not both"),
        ("ref = \"a/b\"\n[packages]\ninstall = [\"x\"]\n", "key `packages.suite`"),
        ("ref = \"a/b\"\nrootfs = \"missing-dir\"\n", "missing-dir does not exist"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[files]]\nsrc = \"f\"\ndst = \"/var/lib/x\"\n", "key `files[0].dst`"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[files]]\nsrc = \"f\"\ndst = \"etc/x\"\n", "absolute"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[files]]\nsrc = \"nope\"\ndst = \"/etc/x\"\n", "key `files[0].src`"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[files]]\nsrc = \"f\"\ndst = \"/etc/x\"\nmode = \"9z\"\n", "not an octal"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[units]\nenable = [\"nope\"]\n", "key `units.enable`"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[users]]\nname = \"Bad Name\"\n", "key `users[0].name`"),
        ("ref = \"a/b\"\nrootfs = \".\"\nkernel-args = [\"a b\"]\n", "key `kernel-args[0]`"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[postprocess]]\nname = \"x\"\n", "key `postprocess[0]`"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[postprocess]]\nscript = \"gone.sh\"\n", "postprocess[0].script"),
        ("ref = \"a/b\"\n[packages]\nsuite = \"bookworm\"\nvariant = \"huge\"\n", "packages.variant"),
        ("ref = \"a/b\"\n[packages]\nsuite = \"bookworm\"\nsources = [\"http://x\"]\n", "packages.sources[0]"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"Web\"\nimage = \"f\"\ndigest = \"sha256:00\"\n", "apps[0].name"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"nope\"\ndigest = \"sha256:00\"\n", "apps[0].image"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"f\"\ndigest = \"sha256:00\"\n", "apps[0].digest"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"f\"\ndigest = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nrestart = \"sometimes\"\n", "apps[0].restart"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"f\"\ndigest = \"sha256:00\"\nports = 1\n", "ports"),
    ];
    for (text, expected) in cases {
        let e = err(dir.path(), text);
        assert!(
            e.contains(expected),
            "for {text:?}: expected {expected:?} in {e:?}"
        );
    }
}

#[test]
fn include_cycles_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "include = [\"b.toml\"]\n");
    write(dir.path(), "b.toml", "include = [\"a.toml\"]\n");
    let e = Manifest::load(&dir.path().join("a.toml")).unwrap_err();
    assert!(matches!(e, ManifestError::IncludeCycle { .. }), "{e}");
}

#[test]
fn the_digest_follows_content_not_location() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [a.path(), b.path()] {
        write(d, "files/x", "same");
        write(
            d,
            "m.toml",
            "ref = \"a/b\"\nrootfs = \".\"\n[[files]]\nsrc = \"files/x\"\ndst = \"/etc/x\"\n",
        );
    }
    let da = Manifest::load(&a.path().join("m.toml"))
        .unwrap()
        .digest()
        .unwrap();
    let db = Manifest::load(&b.path().join("m.toml"))
        .unwrap()
        .digest()
        .unwrap();
    assert_eq!(da, db);
    write(b.path(), "files/x", "different");
    let db2 = Manifest::load(&b.path().join("m.toml"))
        .unwrap()
        .digest()
        .unwrap();
    assert_ne!(da, db2);
}
