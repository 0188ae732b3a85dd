//! Images made by the usual tools (buildah, skopeo, umoci), shared by the
//! tests that import them (`hostile_images.rs`) and run them
//! (`privileged.rs`); each includes this file as a module.
//!
//! Every image has the same tree ([`populate`]): the host's static busybox,
//! a user `app` (1000:1000) whose home is 1000:1000 mode 0750, a copy of
//! busybox with a file capability, and `etc/gone`, which a second layer
//! deletes (a whiteout). Missing tools fail loudly, never skip: scripts/setup
//! installs them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The image's user, its id and group id.
pub const APP_UID: u32 = 1000;
/// The mode of that user's home, `/home/app`.
pub const HOME_MODE: u32 = 0o750;

/// The programs the images are made with.
const TOOLS: &[&str] = &["buildah", "skopeo", "umoci", "setcap"];

/// Fail, naming them all, when any of [`TOOLS`] is not on PATH.
pub fn require_tools() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = |tool: &str| {
        std::env::split_paths(&path).any(|d| {
            std::fs::metadata(d.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    };
    let missing: Vec<_> = TOOLS.iter().filter(|t| !found(t)).collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?} on PATH: the tool-made image tests need buildah, skopeo, umoci and setcap (libcap2-bin); scripts/setup installs them"
    );
}

/// Run `cmd`; its trimmed stdout. Panics, with its output, when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {:?}: {e} (install it: buildah, skopeo, umoci and libcap2-bin are in scripts/setup's package list)",
            cmd.get_program()
        )
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Fill a root file system: busybox, a user with a home owned by 1000, a
/// group, a binary with a file capability, a file to delete later.
pub fn populate(root: &Path) {
    for d in ["bin", "etc", "home/app"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    std::fs::copy("/bin/busybox", root.join("bin/pinger")).unwrap();
    run(Command::new("setcap")
        .arg("cap_net_bind_service=+ep")
        .arg(root.join("bin/pinger")));
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    std::fs::write(root.join("etc/gone"), "deleted by the second layer\n").unwrap();
    std::os::unix::fs::chown(root.join("home/app"), Some(APP_UID), Some(APP_UID)).unwrap();
    std::fs::set_permissions(
        root.join("home/app"),
        std::fs::Permissions::from_mode(HOME_MODE),
    )
    .unwrap();
}

/// What buildah and skopeo wrote, in the work directory given to
/// [`buildah_and_skopeo`]. `toolimg:v1` is one layer ([`populate`], `User`
/// `app`, `Cmd` `/bin/sh`); `toolimg:v2` adds a layer deleting `etc/gone`.
pub struct BuildahImages {
    /// An OCI layout with two tags: `v2` by `buildah push`, `v1` by
    /// `skopeo copy`.
    pub oci: PathBuf,
    /// `v2` as an oci-archive, by `skopeo copy`.
    pub oci_archive: PathBuf,
    /// `v2` as a docker-archive (`localhost/toolimg:v2`), by `buildah push`.
    pub docker_archive: PathBuf,
}

/// buildah (from scratch, vfs storage under `w` so the host's storage is
/// untouched) makes the two images; buildah push and skopeo copy write them
/// out. The buildah storage is removed before returning, pass or fail.
pub fn buildah_and_skopeo(w: &Path) -> BuildahImages {
    require_tools();
    let storage = format!(
        "vfs@{}+{}",
        w.join("root").display(),
        w.join("run").display()
    );
    let buildah = || {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(w.join("root"))
            .arg("--runroot")
            .arg(w.join("run"));
        c.arg("--storage-driver").arg("vfs");
        c
    };
    // Unmount and remove whatever buildah made, pass or fail.
    struct Cleanup<F: Fn() -> Command>(F);
    impl<F: Fn() -> Command> Drop for Cleanup<F> {
        fn drop(&mut self) {
            let _ = (self.0)().args(["rm", "--all"]).output();
            let _ = (self.0)().args(["rmi", "--all", "--force"]).output();
        }
    }
    let _cleanup = Cleanup(buildah);

    let c1 = run(buildah().args(["from", "scratch"]));
    let m1 = PathBuf::from(run(buildah().args(["mount", &c1])));
    populate(&m1);
    run(buildah().args(["umount", &c1]));
    run(buildah().args(["config", "--cmd", "/bin/sh", "--user", "app", &c1]));
    run(buildah().args(["commit", "-q", &c1, "toolimg:v1"]));
    let c2 = run(buildah().args(["from", "toolimg:v1"]));
    let m2 = PathBuf::from(run(buildah().args(["mount", &c2])));
    std::fs::remove_file(m2.join("etc/gone")).unwrap();
    run(buildah().args(["umount", &c2]));
    run(buildah().args(["commit", "-q", &c2, "toolimg:v2"]));

    let oci = w.join("oci");
    run(buildah()
        .arg("push")
        .arg("-q")
        .arg("toolimg:v2")
        .arg(format!("oci:{}:v2", oci.display())));
    run(Command::new("skopeo")
        .arg("copy")
        .arg("-q")
        .arg(format!(
            "containers-storage:[{storage}]localhost/toolimg:v1"
        ))
        .arg(format!("oci:{}:v1", oci.display())));
    let oci_archive = w.join("img.oci.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg("-q")
        .arg(format!(
            "containers-storage:[{storage}]localhost/toolimg:v2"
        ))
        .arg(format!("oci-archive:{}:v2", oci_archive.display())));
    let docker_archive = w.join("img.docker.tar");
    run(buildah()
        .arg("push")
        .arg("-q")
        .arg("toolimg:v2")
        .arg(format!(
            "docker-archive:{}:localhost/toolimg:v2",
            docker_archive.display()
        )));
    BuildahImages {
        oci,
        oci_archive,
        docker_archive,
    }
}

/// umoci builds a two-layer OCI layout from unpacked bundles, under `w`:
/// [`populate`], then a layer deleting `etc/gone`; `Cmd` `/bin/sh` and no
/// `User` (root). Returns the layout; its one tag is `app`.
pub fn umoci(w: &Path) -> PathBuf {
    require_tools();
    let layout = w.join("layout");
    let image_ref = format!("{}:app", layout.display());
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    run(Command::new("umoci")
        .arg("new")
        .arg("--image")
        .arg(&image_ref));
    let b1 = w.join("b1");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(&image_ref)
        .arg(&b1));
    populate(&b1.join("rootfs"));
    run(Command::new("umoci")
        .arg("repack")
        .arg("--image")
        .arg(&image_ref)
        .arg(&b1));
    let b2 = w.join("b2");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(&image_ref)
        .arg(&b2));
    std::fs::remove_file(b2.join("rootfs/etc/gone")).unwrap();
    run(Command::new("umoci")
        .arg("repack")
        .arg("--image")
        .arg(&image_ref)
        .arg(&b2));
    run(Command::new("umoci")
        .args(["config", "--config.cmd", "/bin/sh", "--image"])
        .arg(&image_ref));
    layout
}
