//! Checks: executables a user gives (`--check FILE` or a directory of
//! them), with their settings in a header comment:
//!
//! ```sh
//! #!/bin/sh
//! # cairn-test: timeout = 5m
//! # cairn-test: reboot = true
//! # cairn-test: memory = 2G
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The header's marker; `key = value` follows it.
const MARKER: &str = "cairn-test:";
/// The most a check may be: it is copied into the machine whole.
const MAX_CHECK_SIZE: u64 = 16 << 20;
/// How much of a check is read for its header.
const HEADER_BYTES: usize = 8 << 10;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// One check to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Its name in results: the file name, unique among the checks.
    pub name: String,
    pub path: PathBuf,
    pub timeout: Duration,
    /// Whether it may ask for a reboot (`cairn-test-reboot MARK`).
    pub reboot: bool,
    /// Memory the machine needs for it, in MiB.
    pub memory_mib: Option<u64>,
}

/// The checks of `paths`: each file as it is, each directory's executable
/// files (not recursing, in name order). Anything else is an error naming
/// it, as is a check that is not executable or no check at all.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<Check>> {
    let mut files = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("check {}", p.display()))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .collect::<std::io::Result<Vec<_>>>()?
                .into_iter()
                .map(|e| e.path())
                .filter(|f| {
                    std::fs::metadata(f)
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                })
                .collect();
            if found.is_empty() {
                bail!("check directory {} holds no executable file", p.display());
            }
            found.sort();
            files.extend(found);
        } else if meta.is_file() {
            if meta.permissions().mode() & 0o111 == 0 {
                bail!(
                    "check {} is not executable: chmod +x it (a check is run as a program)",
                    p.display()
                );
            }
            files.push(p.clone());
        } else {
            bail!("check {} is neither a file nor a directory", p.display());
        }
    }
    if files.is_empty() {
        bail!("no checks given: pass --check FILE or --check DIR");
    }
    let mut checks: Vec<Check> = Vec::new();
    for f in files {
        let mut check = read(&f)?;
        if checks.iter().any(|c| c.name == check.name) {
            check.name = format!("{}-{}", checks.len() + 1, check.name);
        }
        checks.push(check);
    }
    Ok(checks)
}

fn read(path: &Path) -> Result<Check> {
    let size = std::fs::metadata(path)?.len();
    if size > MAX_CHECK_SIZE {
        bail!(
            "check {} is {size} bytes, over the limit of {MAX_CHECK_SIZE}",
            path.display()
        );
    }
    // Only the header is read here; the whole file goes to the machine.
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            use std::io::Read as _;
            f.take(HEADER_BYTES as u64).read_to_end(&mut head)
        })
        .with_context(|| format!("reading {}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("a check needs a file name")?;
    let mut check = Check {
        name,
        path: path.to_path_buf(),
        timeout: DEFAULT_TIMEOUT,
        reboot: false,
        memory_mib: None,
    };
    apply_header(&mut check, &String::from_utf8_lossy(&head))
        .with_context(|| format!("check {}", path.display()))?;
    Ok(check)
}

/// Reads `# cairn-test: key = value` lines (any comment leader: `#`, `//`, `--`).
fn apply_header(check: &mut Check, text: &str) -> Result<()> {
    for (i, line) in text.lines().enumerate() {
        let Some((_, setting)) = line.split_once(MARKER) else {
            continue;
        };
        let (key, value) = setting
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .with_context(|| format!("line {}: `{MARKER} KEY = VALUE` expected", i + 1))?;
        let at = || format!("line {}: {key}", i + 1);
        match key {
            "timeout" => {
                check.timeout = cairn_contracts::duration::parse(value).with_context(at)?;
                if check.timeout.is_zero() {
                    bail!("{}: must be more than 0", at());
                }
            }
            "reboot" => {
                check.reboot = match value {
                    "true" | "yes" => true,
                    "false" | "no" => false,
                    _ => bail!("{}: true or false, not {value:?}", at()),
                }
            }
            "memory" => {
                let bytes = cairn_contracts::size::parse(value).with_context(at)?;
                check.memory_mib = Some(bytes.div_ceil(1 << 20));
            }
            _ => bail!(
                "line {}: unknown setting {key:?} (known: timeout, reboot, memory)",
                i + 1
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn header_settings() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "c",
            "#!/bin/sh\n# cairn-test: timeout = 90s\n# cairn-test: reboot = true\n# cairn-test: memory = 1536M\necho\n",
            0o755,
        );
        let c = discover(std::slice::from_ref(&p)).unwrap().remove(0);
        assert_eq!(
            c,
            Check {
                name: "c".into(),
                path: p,
                timeout: Duration::from_secs(90),
                reboot: true,
                memory_mib: Some(1536),
            }
        );
        for (bad, says) in [
            ("# cairn-test: timeout = soon", "timeout"),
            ("# cairn-test: timeout = 0s", "more than 0"),
            ("# cairn-test: reboot = maybe", "true or false"),
            ("# cairn-test: colour = red", "unknown setting"),
            ("# cairn-test: timeout", "KEY = VALUE"),
        ] {
            let p = write(d.path(), "bad", &format!("#!/bin/sh\n{bad}\n"), 0o755);
            let e = format!("{:#}", discover(&[p]).unwrap_err());
            assert!(e.contains(says) && e.contains("line 2"), "{bad}: {e}");
        }
    }

    #[test]
    fn directories_give_their_executables_in_order() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "20-b", "#!/bin/sh\n", 0o755);
        write(d.path(), "10-a", "#!/bin/sh\n", 0o700);
        write(d.path(), "README", "not a check\n", 0o644);
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let names: Vec<String> = discover(&[d.path().to_path_buf()])
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["10-a", "20-b"]);
        // The same file twice gets a distinct name.
        let twice = discover(&[d.path().join("10-a"), d.path().join("10-a")]).unwrap();
        assert_eq!(twice[1].name, "2-10-a");
    }

    #[test]
    fn refusals_name_the_path() {
        let d = tempfile::tempdir().unwrap();
        let plain = write(d.path(), "plain", "#!/bin/sh\n", 0o644);
        let e = format!("{:#}", discover(&[plain]).unwrap_err());
        assert!(e.contains("not executable") && e.contains("plain"), "{e}");
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = format!("{:#}", discover(&[empty]).unwrap_err());
        assert!(e.contains("no executable"), "{e}");
        let e = format!("{:#}", discover(&[d.path().join("missing")]).unwrap_err());
        assert!(e.contains("missing"), "{e}");
        assert!(discover(&[]).is_err());
    }
}
