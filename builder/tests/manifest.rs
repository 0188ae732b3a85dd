//! The manifest format: parsing, includes, validation and their error messages.
//! Unit tier: no root, no network.

use std::path::Path;

use cairn_builder::manifest::{Base, Manifest, ManifestError};

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
    assert_eq!(m.refname, "cairn/bookworm/x86_64/container-host");
    let Base::Packages(pkgs) = &m.base else {
        panic!("container-host.toml is built from packages")
    };
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
    assert_eq!(m.self_install.as_deref(), Some("/usr/bin/host"));
    assert!(m
        .kernel_args
        .iter()
        .any(|k| k == "systemd.unified_cgroup_hierarchy=1"));
}

#[test]
fn includes_concatenate_arrays_and_the_including_file_wins_scalars() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base/files/a", "a");
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
src = "files/a"
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
    assert_eq!(m.refname, "top/ref");
    assert_eq!(m.version_prefix.as_deref(), Some("1"));
    assert_eq!(m.kernel_args, vec!["console=ttyS0", "quiet"]);
    assert_eq!(m.metadata["kept"], "base");
    assert_eq!(m.metadata["replaced"], "top");
    let Base::Packages(pkgs) = &m.base else {
        panic!("a packages base")
    };
    assert_eq!(pkgs.suite.as_deref(), Some("bookworm"));
    assert_eq!(pkgs.install, vec!["systemd", "iproute2"]);
    // Paths are relative to the file that names them.
    assert_eq!(m.files[0].src, dir.path().join("base/files/a"));
    assert_eq!(m.files[1].src, dir.path().join("files/b"));
    // Each source is read at load; its digest is of those bytes.
    assert_eq!(m.files[0].content, b"a");
    assert_eq!(
        m.files[1].sha256,
        "3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d"
    );
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
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"f\"\ndigest = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nhealth-interval = \"5 parsecs\"\n", "apps[0].health-interval"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"f\"\ndigest = \"sha256:00\"\nports = 1\n", "ports"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"docker://web:1\"\n", "names no registry"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"f\"\n", "apps[0].digest"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"reg.example.org/web:1\"\ndigest = \"sha256:00\"\n", "apps[0].digest"),
        ("ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"reg.example.org/web@sha256:1111111111111111111111111111111111111111111111111111111111111111\"\ndigest = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n", "disagrees"),
    ];
    for (text, expected) in cases {
        let e = err(dir.path(), text);
        assert!(
            e.contains(expected),
            "for {text:?}: expected {expected:?} in {e:?}"
        );
    }
}

/// `[[apps]] image` is a registry reference where no file of that name is
/// next to the manifest (or with `docker://`); a file otherwise.
#[test]
fn app_images_are_files_or_registry_references() {
    let dir = tempfile::tempdir().unwrap();
    let load = |image: &str| {
        write(
            dir.path(),
            "m.toml",
            &format!(
                "ref = \"a/b\"\nrootfs = \".\"\n[[apps]]\nname = \"web\"\nimage = \"{image}\"\n"
            ),
        );
        Manifest::load(&dir.path().join("m.toml"))
    };
    let m = load("reg.example.org:5000/team/web:1").unwrap();
    let r = m.apps[0].registry.as_ref().unwrap();
    assert_eq!(
        (r.registry.as_str(), r.repository.as_str()),
        ("reg.example.org:5000", "team/web")
    );
    let m = load("docker://localhost/web").unwrap();
    assert_eq!(m.apps[0].registry.as_ref().unwrap().registry, "localhost");
    // A directory of that name next to the manifest is a layout, which
    // then needs its digest.
    std::fs::create_dir_all(dir.path().join("reg.example.org/web")).unwrap();
    let e = load("reg.example.org/web").unwrap_err().to_string();
    assert!(e.contains("apps[0].digest"), "{e}");
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
        .to_string();
    let db = Manifest::load(&b.path().join("m.toml"))
        .unwrap()
        .digest()
        .to_string();
    assert_eq!(da, db);
    write(b.path(), "files/x", "different");
    let db2 = Manifest::load(&b.path().join("m.toml"))
        .unwrap()
        .digest()
        .to_string();
    assert_ne!(da, db2);
}

fn base(extra: &str) -> String {
    format!("ref = \"a/b\"\nrootfs = \".\"\n{extra}")
}

/// `files[N].src` is a regular file inside the manifest's directory, reached
/// without symlinks: a link to a build-machine secret, a `..` out of the
/// directory, a link inside the directory chain, a fifo or a directory are
/// refused when the manifest is loaded, with the key, the file and the line.
#[test]
fn file_sources_stay_inside_the_manifest_directory() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("m");
    write(top.path(), "secret", "build machine secret");
    write(&dir, "files/ok", "ok");
    std::os::unix::fs::symlink(top.path().join("secret"), dir.join("files/abs")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.join("files/shadow")).unwrap();
    std::os::unix::fs::symlink("../../secret", dir.join("files/rel")).unwrap();
    std::os::unix::fs::symlink("files", dir.join("linkdir")).unwrap();
    nix::unistd::mkfifo(&dir.join("files/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let src = |s: &str| {
        base(&format!(
            "\n[[files]]\nsrc = \"files/ok\"\ndst = \"/etc/ok\"\n\n[[files]]\nsrc = \"{s}\"\ndst = \"/etc/x\"\n"
        ))
    };
    for (bad, why) in [
        ("files/abs", "symlink"),
        ("files/shadow", "symlink"),
        ("files/rel", "symlink"),
        ("linkdir/ok", "symlink"),
        ("../secret", "outside"),
        ("files/../../secret", "outside"),
        ("files/fifo", "not a regular file"),
        ("files", "directory"),
        ("/etc/hostname", "not inside the manifest's directory"),
    ] {
        let e = err(&dir, &src(bad));
        assert!(
            e.contains("key `files[1].src`") && e.contains("m.toml line 9") && e.contains(why),
            "{bad}: {e}"
        );
        assert!(
            e.contains("follow-symlinks"),
            "{bad}: the error says what to do: {e}"
        );
    }
    // Explicitly allowed: symlinks are followed, but only to a regular file.
    let allowed = |s: &str| format!("{}follow-symlinks = true\n", src(s));
    for ok in ["files/abs", "files/rel", "linkdir/ok", "../secret"] {
        let p = write(&dir, "m.toml", &allowed(ok));
        let m = Manifest::load(&p).unwrap();
        let expected = if ok == "linkdir/ok" {
            "ok"
        } else {
            "build machine secret"
        };
        assert_eq!(m.files[1].content, expected.as_bytes(), "{ok}");
    }
    let e = err(&dir, &allowed("files/fifo"));
    assert!(
        e.contains("files[1].src") && e.contains("not a regular file"),
        "{e}"
    );
    // follow-symlinks is part of the manifest's meaning only when set.
    let p = write(&dir, "m.toml", &src("files/ok"));
    assert!(!Manifest::load(&p)
        .unwrap()
        .to_toml()
        .contains("follow-symlinks"));
}

/// An included manifest's sources are confined to its own directory, and
/// the error names that file.
#[test]
fn included_sources_are_checked_in_their_own_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", "s");
    write(
        dir.path(),
        "inc/inc.toml",
        "# comment\n[[files]]\nsrc = \"../secret\"\ndst = \"/etc/s\"\n",
    );
    let e = err(dir.path(), &base("include = [\"inc/inc.toml\"]\n"));
    assert!(
        e.contains("inc.toml line 3") && e.contains("files[0].src"),
        "{e}"
    );
}

#[test]
fn postprocess_scripts_stay_inside_the_manifest_directory() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("m");
    write(top.path(), "outside.sh", "echo hi\n");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(top.path().join("outside.sh"), dir.join("link.sh")).unwrap();
    for s in ["link.sh", "../outside.sh"] {
        let e = err(&dir, &base(&format!("[[postprocess]]\nscript = \"{s}\"\n")));
        assert!(
            e.contains("postprocess[0].script") && e.contains("line 4"),
            "{s}: {e}"
        );
    }
}

/// Everything that becomes commit metadata, a version or a ref is checked
/// at load, naming the key: no NUL anywhere, no whitespace or control
/// characters in versions and refs, reserved metadata keys refused.
#[test]
fn metadata_versions_and_refs_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "f", "x");
    let cases = [
        (
            base("version-prefix = \"1 beta\"\n"),
            "key `version-prefix`",
        ),
        (base("version-prefix = \"1\\n2\"\n"), "key `version-prefix`"),
        (base("version-prefix = \"\"\n"), "key `version-prefix`"),
        (base("version-prefix = \"-1\"\n"), "key `version-prefix`"),
        (
            base("[metadata]\nk = \"a\\u0000b\"\n"),
            "key `metadata.\"k\"`",
        ),
        (base("[metadata]\n\"k\\u0000x\" = \"v\"\n"), "NUL"),
        (
            base("[metadata]\nversion = \"9\"\n"),
            "key `metadata.\"version\"`",
        ),
        (
            base("[metadata]\n\"cairn.packages\" = \"x\"\n"),
            "written by the compose",
        ),
        (
            base("[metadata]\n\"ostree.bootable\" = \"x\"\n"),
            "written by the compose",
        ),
        (
            base("[metadata]\n\"a key\" = \"x\"\n"),
            "key `metadata.\"a key\"`",
        ),
        (base("[metadata]\nk = \"bell\\u0007\"\n"), "control"),
        (
            base("[[files]]\nsrc = \"f\"\ndst = \"/etc/x\\u0000y\"\n"),
            "key `files[0].dst`: contains a NUL",
        ),
        (
            base("kernel-args = [\"quiet\\u0000\"]\n"),
            "key `kernel-args[0]`",
        ),
        (
            base("[[users]]\nname = \"app\\u0000\"\n"),
            "key `users[0].name`",
        ),
        (
            "ref = \"a/b\\u0000c\"\nrootfs = \".\"\n".to_string(),
            "key `ref`",
        ),
        ("ref = \"a/./b\"\nrootfs = \".\"\n".to_string(), "key `ref`"),
        ("ref = \"-a/b\"\nrootfs = \".\"\n".to_string(), "key `ref`"),
        ("ref = \"a/.b\"\nrootfs = \".\"\n".to_string(), "key `ref`"),
        ("ref = \"a b\"\nrootfs = \".\"\n".to_string(), "key `ref`"),
    ];
    for (text, expected) in cases {
        let e = err(dir.path(), &text);
        assert!(
            e.contains(expected),
            "for {text:?}: expected {expected:?} in {e:?}"
        );
    }
    // Still fine.
    let p = write(
        dir.path(),
        "m.toml",
        &base("version-prefix = \"1.2~rc1+x_y-z\"\n[metadata]\n\"cairn.variant\" = \"x\"\nnote = \"two\\nlines\"\n"),
    );
    Manifest::load(&p).unwrap();
}

/// Beyond the listed cases: values that end up in generated files
/// (sysusers.d, unit files, kargs) cannot break out of their line or quote,
/// and file destinations cannot name a whole directory or /usr/etc.
#[test]
fn values_written_into_generated_files_cannot_break_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "f", "x");
    // A rootfs that is a symlink to / used to be copied as the symlink,
    // making the build machine's root the tree.
    std::os::unix::fs::symlink("/", dir.path().join("slash")).unwrap();
    let digest = format!("sha256:{}", "0".repeat(64));
    let cases = [
        (base("[[users]]\nname = \"app\"\ngecos = \"x\\\" \\nu evil 0\"\n"), "key `users[0].gecos`"),
        (base("[[users]]\nname = \"app\"\ngroups = [\"wheel\\nu evil 0\"]\n"), "key `users[0].groups[0]`"),
        (base("[[users]]\nname = \"app\"\nhome = \"home dir\"\n"), "key `users[0].home`"),
        (base("[[users]]\nname = \"app\"\nshell = \"/bin/sh -c x\"\n"), "key `users[0].shell`"),
        (base("kernel-args = [\"a\\u0007\"]\n"), "key `kernel-args[0]`"),
        (base("[units]\nenable = [\"a b.service\"]\n"), "key `units.enable`"),
        (base("[units]\nmask = [\"..service\"]\n"), "key `units.mask`"),
        (base(&format!("[[apps]]\nname = \"web\"\nimage = \"f\"\ndigest = \"{digest}\"\nenv = [\"A=1\\nExecStartPre=/bin/evil\"]\n")), "key `apps[0].env`"),
        (base(&format!("[[apps]]\nname = \"web\"\nimage = \"f\"\ndigest = \"{digest}\"\ncommand = [\"x\\ny\"]\n")), "key `apps[0].command`"),
        (base("[[files]]\nsrc = \"f\"\ndst = \"/etc\"\n"), "key `files[0].dst`"),
        ("ref = \"a/b\"\nrootfs = \"slash\"\n".to_string(), "key `rootfs`: "),
        (base("[[files]]\nsrc = \"f\"\ndst = \"/usr/etc/x\"\n"), "key `files[0].dst`"),
        (base("[[files]]\nsrc = \"f\"\ndst = \"/etc/../root/x\"\n"), "key `files[0].dst`"),
        ("ref = \"a/b\"\n[packages]\nsuite = \"bookworm\"\ninstall = [\"a,b\"]\n".to_string(), "packages.install"),
        ("ref = \"a/b\"\n[packages]\nsuite = \"bookworm\"\nsources = [\"deb http://x bookworm main\\ndeb http://y z main\"]\n".to_string(), "packages.sources[0]"),
    ];
    for (text, expected) in cases {
        let e = err(dir.path(), &text);
        assert!(
            e.contains(expected),
            "for {text:?}: expected {expected:?} in {e:?}"
        );
    }
}

/// `--version`, `--ref` and `--to` given on the command line are checked
/// like the manifest's, before anything is written.
#[test]
fn command_line_versions_and_refs_are_validated() {
    use cairn_builder::compose::{
        commit_prepared, compose_tree, promote, ComposeOptions, PreparedCommit,
    };
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.toml", &base(""));
    let m = Manifest::load(&p).unwrap();
    let mut opts = ComposeOptions::new(dir.path().join("repo"), dir.path().join("cache"));
    for bad in ["1 2", "1\n2", "", "x\u{0}y", "-1"] {
        opts.version = Some(bad.to_string());
        let e = compose_tree(&m, &opts).unwrap_err().to_string();
        assert!(e.contains("--version"), "{bad:?}: {e}");
        let e = promote(&opts, "a/b", "c/d", None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--version"), "{bad:?}: {e}");
        let e = commit_prepared(
            &opts,
            PreparedCommit {
                root: dir.path(),
                refname: "a/b",
                version: Some(bad),
                subject: None,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--version"), "{bad:?}: {e}");
    }
    opts.version = None;
    for bad in ["a b", "a/../b", "-x", "a\u{0}b", "a//b"] {
        let e = commit_prepared(
            &opts,
            PreparedCommit {
                root: dir.path(),
                refname: bad,
                version: None,
                subject: None,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--ref"), "{bad:?}: {e}");
        let e = promote(&opts, "a/b", bad, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--to"), "{bad:?}: {e}");
    }
    assert!(!dir.path().join("repo").exists() && !dir.path().join("cache").exists());
}

/// A source's setuid/setgid/sticky bits ship only when `mode` asks for them;
/// `dst` through a symlink of the tree lands inside the tree.
#[test]
fn files_drop_setuid_unless_the_mode_says_so() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tool = write(dir.path(), "tool", "#!/bin/sh\n");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let p = write(
        dir.path(),
        "m.toml",
        &base("[[files]]\nsrc = \"tool\"\ndst = \"/usr/bin/a\"\n\n[[files]]\nsrc = \"tool\"\ndst = \"/usr/bin/b\"\nmode = \"4750\"\n\n[[files]]\nsrc = \"tool\"\ndst = \"/etc/link/c\"\n"),
    );
    let m = Manifest::load(&p).unwrap();
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tree.path().join("etc")).unwrap();
    std::fs::create_dir_all(tree.path().join("usr/lib")).unwrap();
    std::os::unix::fs::symlink("/usr/lib", tree.path().join("etc/link")).unwrap();
    let root = cairn_builder::confined::Root::open(tree.path()).unwrap();
    cairn_builder::tree::add_files(&root, &m.files).unwrap();
    let mode = |p: &str| {
        std::fs::symlink_metadata(tree.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/bin/a"), 0o755);
    assert_eq!(mode("usr/bin/b"), 0o4750);
    assert_eq!(mode("usr/lib/c"), 0o755, "resolved inside the tree");
}

/// Loading reads every source once: the digest is of those bytes and the
/// copy into the tree writes them, whatever happens to the file afterwards.
#[test]
fn sources_are_read_once_at_load() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "files/x", "loaded");
    let script = write(dir.path(), "post.sh", "echo loaded\n");
    let p = write(
        dir.path(),
        "m.toml",
        &base("[[files]]\nsrc = \"files/x\"\ndst = \"/etc/x\"\n\n[[postprocess]]\nscript = \"post.sh\"\n"),
    );
    let m = Manifest::load(&p).unwrap();
    assert!(matches!(&m.base, Base::Rootfs(r) if r == dir.path()));
    assert_eq!(
        m.files[0].sha256,
        hex::encode(sha2::Sha256::digest(b"loaded"))
    );
    assert_eq!(m.postprocess[0].body, "echo loaded\n");
    assert_eq!(m.postprocess[0].name, script.display().to_string());

    write(dir.path(), "files/x", "changed");
    write(dir.path(), "post.sh", "echo changed\n");
    assert_ne!(Manifest::load(&p).unwrap().digest(), m.digest());
    let tree = tempfile::tempdir().unwrap();
    let root = cairn_builder::confined::Root::open(tree.path()).unwrap();
    cairn_builder::tree::add_files(&root, &m.files).unwrap();
    assert_eq!(
        std::fs::read_to_string(tree.path().join("etc/x")).unwrap(),
        "loaded"
    );
}

/// `[trust] keys`: armored public keys beside the manifest, parsed by gpg at
/// load (one key per file), named by fingerprint; their content is in the
/// digest; a secret key, garbage, a symlink out and a second key per file
/// are refused with the key's name.
#[test]
fn trusted_keys_are_read_checked_and_digested() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let pair = cairn_builder::keys::generate(&top.path().join("gpg-a"), "a").unwrap();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::copy(&pair.public_key, dir.join("keys/a.asc")).unwrap();
    let p = write(
        &dir,
        "m.toml",
        &base("\n[trust]\nkeys = [\"keys/a.asc\"]\n"),
    );
    let m = Manifest::load(&p).unwrap();
    assert_eq!(m.trusted_keys.len(), 1);
    assert_eq!(
        m.trusted_keys[0].fingerprints,
        vec![pair.fingerprint.clone()]
    );
    let plain = write(&dir, "plain.toml", &base(""));
    assert!(Manifest::load(&plain).unwrap().trusted_keys.is_empty());
    assert_ne!(
        Manifest::load(&plain).unwrap().digest(),
        m.digest(),
        "the keys are part of the manifest's meaning"
    );

    let bad = |content: &[u8]| {
        std::fs::write(dir.join("keys/bad.asc"), content).unwrap();
        err(&dir, &base("\n[trust]\nkeys = [\"keys/bad.asc\"]\n"))
    };
    let e = bad(b"-----BEGIN PGP PRIVATE KEY BLOCK-----\nx\n");
    assert!(e.contains("trust.keys[0]") && e.contains("SECRET"), "{e}");
    let e = bad(b"\x99\x01garbage");
    assert!(e.contains("not an armored public key"), "{e}");
    let e = bad(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot base64 !!\n-----END PGP PUBLIC KEY BLOCK-----\n");
    assert!(e.contains("trust.keys[0]"), "{e}");
    // Two keys in one file.
    let other = cairn_builder::keys::generate(&top.path().join("gpg-b"), "b").unwrap();
    let mut both = std::fs::read(&pair.public_key).unwrap();
    both.extend(std::fs::read(&other.public_key).unwrap());
    let e = bad(&both);
    assert!(e.contains("one key per file"), "{e}");
    // A symlink out of the manifest's directory.
    std::os::unix::fs::symlink(&pair.public_key, dir.join("keys/link.asc")).unwrap();
    let e = err(&dir, &base("\n[trust]\nkeys = [\"keys/link.asc\"]\n"));
    assert!(e.contains("trust.keys[0]") && e.contains("symlink"), "{e}");
    // The directory is owned by [trust].
    let e = err(
        &dir,
        &base("\n[[files]]\nsrc = \"keys/a.asc\"\ndst = \"/usr/share/cairn/trusted-keys/x.asc\"\n"),
    );
    assert!(e.contains("[trust] keys"), "{e}");
}
