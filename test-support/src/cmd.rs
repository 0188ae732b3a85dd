//! Running `host` and the stock `ostree` CLI, and the small checks every
//! test tier starts with.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A TCP port free on loopback right now (the OS picks it; a server started
/// next binds it, with a small chance another process took it meanwhile).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port on 127.0.0.1")
        .port()
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Privileged-tier tests call this first: without root they fail loudly
/// instead of passing without testing anything.
pub fn require_root(why: &str) {
    assert!(
        is_root(),
        "this test must run as root ({why}); run it through scripts/test"
    );
}

/// Exit status and both streams, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Stock `ostree --repo=REPO ARGS…` (tests cross-check our results with
/// it): its stdout as is, or an error with its stderr.
pub fn try_ostree_cli(repo: &Path, args: &[&str]) -> io::Result<String> {
    let out = Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args(args)
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("running the stock ostree CLI (Debian package ostree): {e}"),
            )
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ostree {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`try_ostree_cli`] that panics with ostree's stderr if it fails.
pub fn ostree_cli(repo: &Path, args: &[&str]) -> String {
    try_ostree_cli(repo, args).unwrap_or_else(|e| panic!("{e}"))
}

/// The value of the first `KEY value` line of `out` (how `host` prints
/// `commit <checksum>`, `ref <ref>` and the like), trimmed.
pub fn line_value(out: &str, key: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map(|v| v.trim().to_string())
}

/// Arguments of `host compose tree EXTRA… --repo REPO --cache CACHE
/// MANIFEST`, the call every compose in the tests makes.
pub fn compose_tree_args(
    repo: impl AsRef<OsStr>,
    cache: impl AsRef<OsStr>,
    manifest: impl AsRef<OsStr>,
    extra: &[&str],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["compose".into(), "tree".into()];
    args.extend(extra.iter().map(OsString::from));
    args.push("--repo".into());
    args.push(repo.as_ref().to_owned());
    args.push("--cache".into());
    args.push(cache.as_ref().to_owned());
    args.push(manifest.as_ref().to_owned());
    args
}

/// A `host` executable, run from `dir` if one is given.
#[derive(Clone, Debug)]
pub struct Host {
    path: PathBuf,
    dir: Option<PathBuf>,
}

impl Host {
    pub fn new(path: impl Into<PathBuf>) -> Host {
        Host {
            path: path.into(),
            dir: None,
        }
    }

    /// Runs it from `dir` (relative paths in its arguments resolve there).
    pub fn in_dir(mut self, dir: impl Into<PathBuf>) -> Host {
        self.dir = Some(dir.into());
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command of it, to add arguments, environment and streams to.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.path);
        if let Some(dir) = &self.dir {
            c.current_dir(dir);
        }
        c
    }

    /// Runs it with `args`, printing the command line; its stderr (progress)
    /// passes through and its stdout is returned, or an error with the
    /// stdout if it fails.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> io::Result<String> {
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        eprintln!("$ {} {}", self.path.display(), shown.join(" "));
        let mut child = self
            .command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("starting {}: {e}", self.path.display()))
            })?;
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut stdout)?;
        let status = child.wait()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "`host {}` failed ({status}); stdout:\n{stdout}",
                shown.join(" ")
            )));
        }
        Ok(stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_value_finds_the_first_keyed_line() {
        let out = "ref a/b\ncommit abc \ncommit def\n";
        assert_eq!(line_value(out, "commit").as_deref(), Some("abc"));
        assert_eq!(line_value(out, "ref").as_deref(), Some("a/b"));
        assert_eq!(line_value(out, "com"), None);
        assert_eq!(line_value("commits 3\n", "commit"), None);
    }

    #[test]
    fn compose_args_put_the_manifest_last() {
        let args = compose_tree_args("r", "c", "m.toml", &["--quiet"]);
        assert_eq!(
            args,
            ["compose", "tree", "--quiet", "--repo", "r", "--cache", "c", "m.toml"]
                .map(OsString::from)
        );
    }

    #[test]
    fn host_run_returns_stdout_and_fails_with_it() {
        let sh = Host::new("/bin/sh").in_dir("/");
        assert_eq!(sh.run(&["-c", "pwd"]).unwrap(), "/\n");
        let e = sh.run(&["-c", "echo out; exit 3"]).unwrap_err();
        assert!(e.to_string().contains("stdout:\nout"), "{e}");
    }

    // No test binds a port free_port() returned: between its close and the
    // bind, any other socket of the machine may be given that port (CI saw
    // EADDRINUSE), which is the race its doc comment names.
}
