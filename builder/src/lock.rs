//! The lockfile: the exact inputs of one commit. Every compose records it
//! (TOML text under the commit metadata key
//! [`LOCK`](cairn_contracts::metadata::LOCK)); `host compose lock REF` prints
//! it, `host compose tree --lock FILE` composes exactly its packages and
//! `host compose verify REF` re-composes from it.
//!
//! A lockfile may come from anywhere (a CI artifact, a colleague), so it is
//! parsed as hostile input: size bounded before it is read, unknown keys
//! refused, every name, version, architecture and checksum checked against
//! Debian's grammar (they become file names and apt arguments), no package
//! listed twice.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::apt::PackageSet;

/// The only format this build reads and writes.
pub const FORMAT: u32 = 1;
/// A lockfile larger than this is refused before it is read (a real one
/// lists a few hundred packages in well under 100 KiB).
pub const MAX_LOCK_BYTES: u64 = 4 << 20;
/// More packages than this is not a tree cairn composes.
pub const MAX_PACKAGES: usize = 20_000;
const MAX_SOURCES: usize = 64;
const MAX_SOURCE_CHARS: usize = 1024;

/// What a commit was composed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Lock {
    /// Always [`FORMAT`].
    pub format: u32,
    /// The commit time and the `SOURCE_DATE_EPOCH` scripts saw.
    pub source_date_epoch: i64,
    /// SHA-256 of the merged manifest (`cairn.manifest-digest`).
    pub manifest_digest: String,
    /// SHA-256 of the executable that ran the compose.
    pub host_digest: String,
    /// The one-line apt sources the packages came from (empty for a rootfs base).
    #[serde(default)]
    pub sources: Vec<String>,
    /// Every installed package, sorted by name (empty for a rootfs base).
    #[serde(default, rename = "package")]
    pub packages: Vec<LockedPackage>,
    /// The digest each app baked from a registry tag resolved to (apps from
    /// files and digest references pin themselves in the manifest).
    #[serde(default, rename = "app", skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<LockedApp>,
}

/// One registry app of the lock: `[[app]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedApp {
    /// The app's `name` in the manifest.
    pub name: String,
    /// Its `image` reference as the manifest writes it.
    pub image: String,
    /// `sha256:…` the reference resolved to (an index's, for a
    /// multi-platform image).
    pub digest: String,
}

/// More registry apps than this is not a tree cairn composes.
const MAX_APPS: usize = 256;

/// One package of the lock.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// SHA-256 of the `.deb`, 64 lowercase hex digits.
    pub sha256: String,
}

impl LockedPackage {
    /// The file name apt gives the `.deb` (`name_version_arch.deb`, `:` as `%3a`).
    pub fn file_name(&self) -> String {
        crate::sbom::archive_file_name(&self.name, &self.version, &self.architecture)
    }
}

/// SHA-256 of the executable running now: the `host` that composes
/// (`host-full` when `host` handed the command over).
pub fn composer_digest() -> Result<String> {
    // /proc/self/exe opens the running file itself, even after a rebuild
    // replaced the path it was started from.
    let exe = std::path::Path::new("/proc/self/exe");
    crate::manifest::file_sha256(exe).context("reading the running executable (/proc/self/exe)")
}

/// A lockfile that does not parse or check, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

fn invalid(origin: &str, message: impl Into<String>) -> LockError {
    LockError::Invalid {
        origin: origin.to_string(),
        message: message.into(),
    }
}

pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Lock {
    /// Parses and checks lockfile text; `origin` names it in errors (a path,
    /// or `commit X`).
    pub fn parse(text: &str, origin: &str) -> Result<Lock, LockError> {
        if text.len() as u64 > MAX_LOCK_BYTES {
            return Err(invalid(
                origin,
                format!("larger than {MAX_LOCK_BYTES} bytes; not a cairn lockfile"),
            ));
        }
        let lock: Lock = toml::from_str(text)
            .map_err(|e| invalid(origin, format!("not a valid lockfile: {e}")))?;
        lock.check(origin)?;
        Ok(lock)
    }

    /// Reads a lockfile: a regular file (not through a final symlink), at
    /// most [`MAX_LOCK_BYTES`], checked before it is read whole.
    pub fn read(path: &Path) -> Result<Lock> {
        use std::os::unix::fs::OpenOptionsExt;
        let origin = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .with_context(|| {
                format!("opening lockfile {origin} (a symlink is refused: give the file itself)")
            })?;
        let md = file.metadata()?;
        if !md.is_file() {
            bail!("lockfile {origin} is not a regular file");
        }
        if md.len() > MAX_LOCK_BYTES {
            bail!("lockfile {origin} is {} bytes, over the {MAX_LOCK_BYTES}-byte limit; not a cairn lockfile", md.len());
        }
        let mut buf = Vec::new();
        file.take(MAX_LOCK_BYTES + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading lockfile {origin}"))?;
        let text = String::from_utf8(buf)
            .map_err(|_| anyhow::anyhow!("lockfile {origin} is not UTF-8 text"))?;
        Ok(Lock::parse(&text, &origin)?)
    }

    /// The lockfile text (TOML), as the commit records it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a lock always serializes")
    }

    /// `name → version` of the locked packages.
    pub fn package_set(&self) -> PackageSet {
        PackageSet(
            self.packages
                .iter()
                .map(|p| (p.name.clone(), p.version.clone()))
                .collect(),
        )
    }

    fn check(&self, origin: &str) -> Result<(), LockError> {
        if self.format != FORMAT {
            return Err(invalid(
                origin,
                format!(
                    "key `format`: {} is not a format this build reads (only {FORMAT}); use the cairn release that wrote it",
                    self.format
                ),
            ));
        }
        if self.source_date_epoch < 0 {
            return Err(invalid(origin, "key `source-date-epoch`: negative"));
        }
        for (key, v) in [
            ("manifest-digest", &self.manifest_digest),
            ("host-digest", &self.host_digest),
        ] {
            if !is_sha256(v) {
                return Err(invalid(
                    origin,
                    format!("key `{key}`: {v:?} is not a SHA-256 (64 lowercase hex digits)"),
                ));
            }
        }
        if self.sources.len() > MAX_SOURCES {
            return Err(invalid(
                origin,
                format!("key `sources`: more than {MAX_SOURCES} entries"),
            ));
        }
        for (i, s) in self.sources.iter().enumerate() {
            let ok = s.len() <= MAX_SOURCE_CHARS
                && s.starts_with("deb ")
                && !s.chars().any(|c| c.is_control());
            if !ok {
                return Err(invalid(
                    origin,
                    format!("key `sources[{i}]`: {s:?} is not a one-line apt source (`deb [options] URI SUITE COMPONENT…`, no control characters)"),
                ));
            }
        }
        if self.packages.len() > MAX_PACKAGES {
            return Err(invalid(
                origin,
                format!("more than {MAX_PACKAGES} [[package]] entries"),
            ));
        }
        if self.apps.len() > MAX_APPS {
            return Err(invalid(
                origin,
                format!("more than {MAX_APPS} [[app]] entries"),
            ));
        }
        let mut apps = BTreeSet::new();
        for (i, a) in self.apps.iter().enumerate() {
            let at =
                |key: &str, why: String| invalid(origin, format!("key `app[{i}].{key}`: {why}"));
            let name_ok = !a.name.is_empty()
                && a.name.len() <= 63
                && a.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
            if !name_ok {
                return Err(at(
                    "name",
                    format!(
                        "{:?} is not an app name",
                        a.name.chars().take(64).collect::<String>()
                    ),
                ));
            }
            if !apps.insert(a.name.clone()) {
                return Err(at("name", format!("{:?} listed twice", a.name)));
            }
            let image = a
                .image
                .strip_prefix(crate::manifest::REGISTRY_PREFIX)
                .unwrap_or(&a.image);
            if let Err(e) = cairn_oci::registry::Reference::parse(image) {
                return Err(at("image", format!("{e:#}")));
            }
            if let Err(e) = cairn_oci::source::Sha256::parse(&a.digest) {
                return Err(at("digest", format!("{e:#}")));
            }
        }
        let mut seen = BTreeSet::new();
        for (i, p) in self.packages.iter().enumerate() {
            let at = |key: &str, why: &str| {
                invalid(
                    origin,
                    format!(
                        "key `package[{i}].{key}` (package {:?}): {why}",
                        p.name.chars().take(64).collect::<String>()
                    ),
                )
            };
            if !crate::sbom::name_ok(&p.name) {
                return Err(at("name", "not a Debian package name (lowercase letters, digits, `+-.`, starting with a letter or digit)"));
            }
            if !crate::sbom::version_ok(&p.version) {
                return Err(at(
                    "version",
                    "not a Debian version (letters, digits, `.+~:-`, starting with a digit)",
                ));
            }
            if !crate::sbom::arch_ok(&p.architecture) {
                return Err(at(
                    "architecture",
                    "not a Debian architecture (letters, digits, `-`)",
                ));
            }
            if !is_sha256(&p.sha256) {
                return Err(at("sha256", "not a SHA-256 (64 lowercase hex digits)"));
            }
            if !seen.insert(p.name.clone()) {
                return Err(at("name", "listed twice; a lock has one entry per package"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn sample() -> Lock {
        Lock {
            format: 1,
            source_date_epoch: 1_795_000_000,
            manifest_digest: SHA.into(),
            host_digest: SHA.into(),
            sources: vec![
                "deb [signed-by=/k.gpg] http://deb.debian.org/debian bookworm main".into(),
            ],
            packages: vec![
                LockedPackage {
                    name: "libc6".into(),
                    version: "2.36-9+deb12u14".into(),
                    architecture: "amd64".into(),
                    sha256: SHA.into(),
                },
                LockedPackage {
                    name: "perl-base".into(),
                    version: "1:5.36.0-7".into(),
                    architecture: "amd64".into(),
                    sha256: SHA.into(),
                },
            ],
            apps: vec![LockedApp {
                name: "web".into(),
                image: "registry.example.org/team/web:1".into(),
                digest: format!("sha256:{SHA}"),
            }],
        }
    }

    fn err(text: &str) -> String {
        Lock::parse(text, "lock.toml").unwrap_err().to_string()
    }

    #[test]
    fn round_trips_through_toml() {
        let lock = sample();
        let text = lock.to_toml();
        assert!(text.starts_with("format = 1\n"), "{text}");
        assert!(text.contains("[[package]]\nname = \"libc6\""), "{text}");
        assert_eq!(Lock::parse(&text, "x").unwrap(), lock);
        assert_eq!(
            lock.package_set().to_lines(),
            vec!["libc6=2.36-9+deb12u14", "perl-base=1:5.36.0-7"]
        );
        assert_eq!(
            lock.packages[1].file_name(),
            "perl-base_1%3a5.36.0-7_amd64.deb"
        );
    }

    #[test]
    fn registry_apps_are_checked() {
        let text = sample().to_toml();
        assert!(
            text.contains("[[app]]\nname = \"web\"\nimage = \"registry.example.org/team/web:1\""),
            "{text}"
        );
        for (field, bad, key) in [
            ("name", "Web", "app[0].name"),
            ("image", "web:1", "app[0].image"),
            ("image", "registry.example.org/../x", "app[0].image"),
            ("digest", "sha256:00", "app[0].digest"),
            ("digest", "md5:00", "app[0].digest"),
        ] {
            let mut lock = sample();
            match field {
                "name" => lock.apps[0].name = bad.into(),
                "image" => lock.apps[0].image = bad.into(),
                _ => lock.apps[0].digest = bad.into(),
            }
            let e = err(&lock.to_toml());
            assert!(e.contains(key), "{bad}: {e}");
        }
        let mut lock = sample();
        lock.apps.push(lock.apps[0].clone());
        assert!(err(&lock.to_toml()).contains("listed twice"));
        // Locks written before registry apps have none.
        let mut lock = sample();
        lock.apps.clear();
        assert!(!lock.to_toml().contains("[[app]]"));
        assert_eq!(Lock::parse(&lock.to_toml(), "x").unwrap(), lock);
    }

    #[test]
    fn an_empty_package_list_is_fine() {
        let mut lock = sample();
        lock.packages.clear();
        lock.sources.clear();
        let text = lock.to_toml();
        assert_eq!(Lock::parse(&text, "x").unwrap(), lock);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let text = sample()
            .to_toml()
            .replace("format = 1\n", "format = 1\nextra = 2\n");
        let e = err(&text);
        assert!(
            e.contains("lock.toml") && e.contains("extra") && e.contains("line 2"),
            "{e}"
        );
        let text = sample().to_toml().replace(
            "architecture = \"amd64\"",
            "architecture = \"amd64\"\nurl = \"x\"",
        );
        let e = err(&text);
        assert!(e.contains("url"), "{e}");
    }

    #[test]
    fn missing_keys_and_wrong_format_are_refused() {
        let e = err("format = 1\n");
        assert!(e.contains("source-date-epoch"), "{e}");
        let text = sample().to_toml().replace("format = 1", "format = 2");
        assert!(err(&text).contains("`format`"));
        let text = sample()
            .to_toml()
            .replace("source-date-epoch = 1795000000", "source-date-epoch = -1");
        assert!(err(&text).contains("source-date-epoch"));
        assert!(err("not toml at all [").contains("not a valid lockfile"));
    }

    #[test]
    fn bad_checksums_are_refused() {
        for bad in [
            &SHA[..63],
            &SHA.to_uppercase(),
            "zz23456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "",
        ] {
            let mut lock = sample();
            lock.packages[1].sha256 = bad.to_string();
            let e = err(&lock.to_toml());
            assert!(
                e.contains("package[1].sha256") && e.contains("perl-base"),
                "{e}"
            );
            let mut lock = sample();
            lock.manifest_digest = bad.to_string();
            assert!(err(&lock.to_toml()).contains("manifest-digest"));
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let mut lock = sample();
        let mut dup = lock.packages[0].clone();
        dup.version = "2.37".into();
        lock.packages.push(dup);
        let e = err(&lock.to_toml());
        assert!(e.contains("package[2].name") && e.contains("twice"), "{e}");
    }

    #[test]
    fn path_like_and_hostile_names_are_refused() {
        for (key, bad) in [
            ("name", "../../etc/passwd"),
            ("name", "a/b"),
            ("name", "Libc6"),
            ("name", ".hidden"),
            ("name", "x"),
            ("name", "lib c"),
            ("version", "1.0/../x"),
            ("version", "1.0 2"),
            ("version", "1.0_2"),
            ("version", ""),
            ("architecture", "amd64/.."),
            ("architecture", "amd_64"),
        ] {
            let mut lock = sample();
            match key {
                "name" => lock.packages[0].name = bad.into(),
                "version" => lock.packages[0].version = bad.into(),
                _ => lock.packages[0].architecture = bad.into(),
            }
            let e = err(&lock.to_toml());
            assert!(e.contains(&format!("package[0].{key}")), "{bad}: {e}");
        }
    }

    #[test]
    fn hostile_sources_are_refused() {
        for bad in ["deb http://x bookworm main\nevil", "rm -rf /", "deb\u{7f}x"] {
            let mut lock = sample();
            lock.sources[0] = bad.into();
            assert!(err(&lock.to_toml()).contains("sources[0]"), "{bad}");
        }
    }

    #[test]
    fn oversize_is_refused_before_parsing() {
        let text = format!("format = 1\n#{}\n", "x".repeat(MAX_LOCK_BYTES as usize));
        assert!(err(&text).contains("larger than"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        std::fs::write(&path, &text).unwrap();
        let e = Lock::read(&path).unwrap_err().to_string();
        assert!(e.contains("over the"), "{e}");
    }

    #[test]
    fn read_refuses_symlinks_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("lock.toml");
        std::fs::write(&real, sample().to_toml()).unwrap();
        assert_eq!(Lock::read(&real).unwrap(), sample());
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(Lock::read(&link).is_err());
        assert!(Lock::read(dir.path()).is_err());
    }
}
