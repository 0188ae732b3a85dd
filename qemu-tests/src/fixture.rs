//! The disk image the boot tests run: composed from the test manifest with
//! the workspace's own `host` binary, exactly as a user would build one.
//!
//! Everything lands under `<workspace>/build/` (git-ignored): the test
//! repository in `build/qemu-tests/repo`, the shared compose cache in
//! `build/cache` (so the package stage is shared with `scripts/compose`), and
//! images in `build/qemu-tests/images/`, named after the commit and the
//! `host` binary that wrote them, so an unchanged tree and writer reuse the
//! image of an earlier run.
//!
//! `CAIRN_TEST_REPO` (and optionally `CAIRN_TEST_REF`) point the tests at an
//! existing repository instead of composing, e.g. to boot-test a repository
//! that CI produced.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_test_support::{compose_tree_args, try_ostree_cli, Host};
use sha2::{Digest, Sha256};

/// The manifest the test image is composed from.
pub const TEST_MANIFEST: &str = "qemu-tests/manifests/test-host.toml";

/// Kernel argument the test image gets through `host compose image --karg`.
pub const TEST_KARG: &str = "cairn.test-image=1";

/// A composed commit and a disk image of it.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub image: PathBuf,
    pub repo: PathBuf,
    pub ref_: String,
    pub commit: String,
    pub version: Option<String>,
    /// `cairn.kernel` metadata of the commit.
    pub kernel: String,
    /// How long composing and writing the image took in this process (zero
    /// for cached parts).
    pub compose_time: Duration,
    pub image_time: Duration,
}

/// The checkout this crate belongs to.
pub fn workspace() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent()
        .expect("qemu-tests sits in the workspace")
        .to_owned()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace)
/// or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace().join(dir),
        None => workspace().join("target"),
    }
}

/// The `host` executable built from this workspace (`cargo build -p host`;
/// `host-full` next to it serves all but the container commands).
pub fn host_binary() -> Result<PathBuf> {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let bin = target_dir().join(profile).join("host");
    if !bin.is_file() {
        bail!(
            "{} does not exist: build it first with `cargo build -p host` \
             (scripts/test builds the whole workspace before the QEMU tests)",
            bin.display()
        );
    }
    Ok(bin)
}

/// `<workspace>/build/<sub>`.
pub fn build_dir(sub: &str) -> PathBuf {
    workspace().join("build").join(sub)
}

/// The test image, built once per test process; panics with the reason if it
/// cannot be built (a boot test without an image must fail, loudly).
pub fn test_image() -> &'static TestImage {
    static IMAGE: OnceLock<std::result::Result<TestImage, String>> = OnceLock::new();
    match IMAGE.get_or_init(|| build_test_image().map_err(|e| format!("{e:#}"))) {
        Ok(image) => image,
        Err(e) => panic!("building the test image failed: {e}"),
    }
}

fn require_root() -> Result<()> {
    if !cairn_test_support::is_root() {
        bail!("the QEMU boot tests compose trees and write disk images, which needs root; run them as root (scripts/test does)");
    }
    Ok(())
}

fn build_test_image() -> Result<TestImage> {
    require_root()?;
    let ws = workspace();
    // scripts/test runs tests that boot this image in two lanes at once:
    // whichever comes first composes and writes it, the other waits, then
    // finds it.
    let images = build_dir("qemu-tests/images");
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let _lock = DirLock::take(&images, libc::LOCK_EX)?;

    let started = Instant::now();
    let (repo, ref_, commit, compose_time) = match std::env::var_os("CAIRN_TEST_REPO") {
        Some(repo) => {
            let repo = ws.join(repo);
            let ref_ = std::env::var("CAIRN_TEST_REF")
                .unwrap_or_else(|_| "cairn/bookworm/x86_64/container-host".into());
            let commit = ostree_cli(&repo, &["rev-parse", &ref_])?;
            (repo, ref_, commit, Duration::ZERO)
        }
        None => {
            let repo = build_dir("qemu-tests/repo");
            let (ref_, commit) = compose_unless_changed(&repo, &ws.join(TEST_MANIFEST))?;
            (repo, ref_, commit, started.elapsed())
        }
    };
    let kernel = metadata_string(&repo, &commit, "cairn.kernel")?
        .with_context(|| format!("commit {commit} has no cairn.kernel metadata"))?;
    let version = metadata_string(&repo, &commit, "version")?;

    let (image, image_time) = write_image_unless_present(&images, &repo, &ref_, &commit)?;
    eprintln!(
        "qemu-tests: test image of {commit}: compose {:.0} s, image {:.0} s (0: reused)",
        compose_time.as_secs_f64(),
        image_time.as_secs_f64()
    );
    Ok(TestImage {
        image,
        repo,
        ref_,
        commit,
        version,
        kernel,
        compose_time,
        image_time,
    })
}

/// A qcow2 disk image of `commit` (of `ref_` in `repo`) in `images`, named
/// after the commit and the `host` binary that writes it, so an unchanged
/// pair is written once: `host compose image` unless the file is there.
/// Returns the image and the time spent writing it (zero when reused).
pub fn write_image_unless_present(
    images: &Path,
    repo: &Path,
    ref_: &str,
    commit: &str,
) -> Result<(PathBuf, Duration)> {
    let host = host_binary()?;
    std::fs::create_dir_all(images).with_context(|| format!("creating {}", images.display()))?;
    let image = images.join(format!("{}.qcow2", image_key(commit, &host)?));
    if image.is_file() {
        eprintln!("qemu-tests: reusing {}", image.display());
        return Ok((image, Duration::ZERO));
    }
    // Older images are of other commits or writers. Keep those of the last
    // hour: a concurrent test process may be about to boot one.
    for entry in std::fs::read_dir(images)?.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let started = Instant::now();
    let out = run_host(
        &host,
        &[
            "compose".as_ref(),
            "image".as_ref(),
            "--repo".as_ref(),
            repo.as_os_str(),
            "--ref".as_ref(),
            ref_.as_ref(),
            // The commit composed, even if another test process has moved
            // the ref since.
            "--commit".as_ref(),
            commit.as_ref(),
            "--format".as_ref(),
            "qcow2".as_ref(),
            "--karg".as_ref(),
            TEST_KARG.as_ref(),
            // The tests point the node at their own unsigned HTTP
            // repositories; signed updates are proven in host/tests.
            "--insecure-no-verify".as_ref(),
            "-o".as_ref(),
            image.as_os_str(),
        ],
    )?;
    let written =
        line_value(&out, "commit").context("`host compose image` printed no commit line")?;
    if written != commit {
        bail!("`host compose image` deployed {written}, expected {commit}");
    }
    Ok((image, started.elapsed()))
}

/// `host compose tree --unless-changed` of `manifest` into `repo` with the
/// shared compose cache; returns (ref, commit), the ref's current commit
/// when the inputs did not change.
pub fn compose_unless_changed(repo: &Path, manifest: &Path) -> Result<(String, String)> {
    let out = run_host(
        &host_binary()?,
        &compose_tree_args(repo, build_dir("cache"), manifest, &["--unless-changed"]),
    )?;
    let commit =
        line_value(&out, "commit").context("`host compose tree` printed no commit line")?;
    let ref_ = match line_value(&out, "ref") {
        Some(r) => r,
        // Unchanged inputs: "no changes: <ref> is already at these inputs".
        None => out
            .lines()
            .find_map(|l| l.strip_prefix("no changes: "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
            .context("`host compose tree` printed neither a ref line nor `no changes: <ref>`")?,
    };
    Ok((ref_, commit))
}

/// An archive repository at `repo` whose `ref_` starts at `commit` of
/// `source` (objects hardlinked, nothing copied): where a test composes the
/// updates of an image, so the updates' parent is the image's commit and
/// `host compose publish` writes static deltas from it.
pub fn start_update_repo(repo: &Path, source: &Path, ref_: &str, commit: &str) -> Result<()> {
    ostree_cli(repo, &["init", "--mode=archive"])?;
    // Served over loopback to guests: CPU matters, size does not. Level 1
    // makes the updates' commits about a quarter faster (libostree
    // compresses every object of a tree before it knows it has it).
    ostree_cli(repo, &["config", "set", "archive.zlib-level", "1"])?;
    ostree_cli(repo, &["pull-local", &source.to_string_lossy(), commit])?;
    ostree_cli(repo, &["refs", &format!("--create={ref_}"), commit])?;
    Ok(())
}

/// `host compose tree` of `manifest` into `repo`, with the shared compose
/// cache; returns the new commit.
pub fn compose_into(repo: &Path, manifest: &Path) -> Result<String> {
    let out = run_host(
        &host_binary()?,
        &compose_tree_args(repo, build_dir("cache"), manifest, &[]),
    )?;
    line_value(&out, "commit").context("`host compose tree` printed no commit line")
}

/// Run the host binary from the workspace; its stderr (progress) passes
/// through, its stdout is returned. Every QEMU test runs `host` through this.
pub fn run_host<S: AsRef<std::ffi::OsStr>>(host: &Path, args: &[S]) -> Result<String> {
    Ok(Host::new(host).in_dir(workspace()).run(args)?)
}

/// An flock on `<dir>.lock`: exclusive while a process composes into `dir`,
/// shared while processes serve from it (`how`: `libc::LOCK_EX`, `LOCK_SH`,
/// optionally `| LOCK_NB`); released when dropped.
pub struct DirLock(std::fs::File);

impl DirLock {
    pub fn take(dir: &Path, how: libc::c_int) -> Result<DirLock> {
        let path = dir.with_extension("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let lock = DirLock(file);
        lock.set(how)
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(lock)
    }

    pub fn set(&self, how: libc::c_int) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(self.0.as_raw_fd(), how) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A directory served on 127.0.0.1 (the guest's 10.0.2.2): the users'
/// runner's server, so both serve repositories alike.
pub use cairn_testbed::http::HttpServer;

/// The value of a `key value` line.
pub use cairn_test_support::line_value;

/// The stock ostree CLI, allowed in tests to cross-check what our code did.
pub fn ostree_cli(repo: &Path, args: &[&str]) -> Result<String> {
    Ok(try_ostree_cli(repo, args)?.trim().to_string())
}

/// A string metadata key of a commit, None if absent.
fn metadata_string(repo: &Path, commit: &str, key: &str) -> Result<Option<String>> {
    let out = Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args(["show", &format!("--print-metadata-key={key}"), commit])
        .output()
        .context("running the ostree CLI (Debian package ostree)")?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(Some(text.trim().trim_matches('\'').to_string()))
}

/// Name of an image: the commit, the writer (host binary) and its arguments.
fn image_key(commit: &str, host: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(commit.as_bytes());
    hasher.update(TEST_KARG.as_bytes());
    // The writer is `host-full`, and the image holds every executable.
    for exe in cairn_contracts::names::executables(host) {
        let mut file =
            std::fs::File::open(&exe).with_context(|| format!("reading {}", exe.display()))?;
        std::io::copy(&mut file, &mut hasher)?;
    }
    Ok(hex::encode(&hasher.finalize()[..12]))
}

/// Write an executable check for `host test` (mode 0755) as `dir/name`.
pub fn write_check(dir: &Path, name: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("making {} executable: {e}", p.display()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn http_server_serves_the_directory_and_logs_requests() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("qemu-tests-http.{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config"), "[core]\n").unwrap();
        let log = dir.join("http.log");
        let server = HttpServer::start(&dir, Some(&log)).unwrap();
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        conn.write_all(b"GET /config HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        drop(server);
        let logged = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
        assert!(reply.ends_with("[core]\n"), "{reply}");
        assert!(logged.contains("\"GET /config HTTP/1.0\" 200"), "{logged}");
    }

    #[test]
    fn workspace_holds_the_test_manifest() {
        assert!(workspace().join(TEST_MANIFEST).is_file());
    }
}
