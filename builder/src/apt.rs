//! Apt sources and package resolution.
//!
//! Resolution runs apt in simulation against a private apt state directory in
//! the cache (never the build machine's own dpkg database): it downloads the
//! package indices (cheap, and unchanged indices are not fetched again) and
//! prints the exact name=version set mmdebstrap will install. That set keys the
//! package-stage cache and feeds the input hash, so `--unless-changed` needs no
//! package download and no install.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::manifest::Packages;

/// One apt source in one-line form: `deb [options] URI SUITE COMPONENT...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLine(pub String);

/// The sources a compose uses: the manifest's own, or the build machine's
/// configured sources for the manifest's suite and its `-updates`/`-security`
/// companions (third-party sources for other suites are left out).
pub fn sources_for(packages: &Packages, etc_apt: &Path) -> Result<Vec<SourceLine>> {
    if !packages.sources.is_empty() {
        return Ok(packages
            .sources
            .iter()
            .map(|s| SourceLine(s.trim().to_string()))
            .collect());
    }
    let suite = packages.suite.as_deref().unwrap_or("bookworm");
    let components = components_of(packages);
    let configured = machine_sources(etc_apt)?;
    let mut out = Vec::new();
    for src in configured {
        if !src.types.iter().any(|t| t == "deb") {
            continue;
        }
        for s in &src.suites {
            let family = s == suite
                || s.strip_prefix(suite)
                    .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('/'));
            if !family {
                continue;
            }
            let comps: Vec<&str> = components
                .iter()
                .map(String::as_str)
                .filter(|c| src.components.iter().any(|sc| sc == c))
                .collect();
            if comps.is_empty() {
                continue;
            }
            for uri in &src.uris {
                let opts = match &src.signed_by {
                    Some(k) => format!("[signed-by={k}] "),
                    None => String::new(),
                };
                out.push(SourceLine(format!(
                    "deb {opts}{uri} {s} {}",
                    comps.join(" ")
                )));
            }
        }
    }
    if out.is_empty() {
        bail!(
            "no apt source configured on this machine (in {}) serves suite {suite:?} with components {:?}; \
             list the sources in the manifest under [packages] sources = [\"deb URI {suite} main\"]",
            etc_apt.display(),
            components
        );
    }
    Ok(out)
}

pub fn components_of(packages: &Packages) -> Vec<String> {
    if packages.components.is_empty() {
        vec!["main".into()]
    } else {
        packages.components.clone()
    }
}

#[derive(Debug, Default, Clone)]
struct ConfiguredSource {
    types: Vec<String>,
    uris: Vec<String>,
    suites: Vec<String>,
    components: Vec<String>,
    signed_by: Option<String>,
}

/// Reads `sources.list`, `sources.list.d/*.list` and deb822 `*.sources` under `etc_apt`.
fn machine_sources(etc_apt: &Path) -> Result<Vec<ConfiguredSource>> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(rd) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut extra: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        extra.sort();
        files.extend(extra);
    }
    let mut out = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if name.ends_with(".sources") {
            out.extend(parse_deb822(&text));
        } else if name.ends_with(".list") {
            out.extend(text.lines().filter_map(parse_one_line));
        }
    }
    Ok(out)
}

fn parse_one_line(line: &str) -> Option<ConfiguredSource> {
    let line = line.split('#').next()?.trim();
    let mut rest = line.strip_prefix("deb")?;
    if !rest.starts_with(char::is_whitespace) {
        return None; // deb-src
    }
    rest = rest.trim_start();
    let mut signed_by = None;
    if let Some(after) = rest.strip_prefix('[') {
        let (opts, tail) = after.split_once(']')?;
        for opt in opts.split_whitespace() {
            if let Some(v) = opt.strip_prefix("signed-by=") {
                signed_by = Some(v.to_string());
            }
        }
        rest = tail.trim_start();
    }
    let mut words = rest.split_whitespace();
    let uri = words.next()?.to_string();
    let suite = words.next()?.to_string();
    Some(ConfiguredSource {
        types: vec!["deb".into()],
        uris: vec![uri],
        suites: vec![suite],
        components: words.map(String::from).collect(),
        signed_by,
    })
}

fn parse_deb822(text: &str) -> Vec<ConfiguredSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut last: Option<String> = None;
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(k) = &last {
                    let v = fields.entry(k.clone()).or_default();
                    v.push('\n');
                    v.push_str(line.trim());
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                fields.insert(k.clone(), v.trim().to_string());
                last = Some(k);
            }
        }
        if fields
            .get("enabled")
            .is_some_and(|v| v.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        let words = |k: &str| -> Vec<String> {
            fields
                .get(k)
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default()
        };
        let src = ConfiguredSource {
            types: words("types"),
            uris: words("uris"),
            suites: words("suites"),
            components: words("components"),
            // Inline keys (a PGP block) cannot be passed on one line; apt then
            // falls back to the trusted keyrings.
            signed_by: fields
                .get("signed-by")
                .filter(|v| !v.contains('\n'))
                .cloned(),
        };
        if !src.uris.is_empty() && !src.suites.is_empty() {
            out.push(src);
        }
    }
    out
}

/// The exact package set a compose installs, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageSet(pub BTreeMap<String, String>);

impl PackageSet {
    /// `name=version` lines, the form stored in commit metadata.
    pub fn to_lines(&self) -> Vec<String> {
        self.0.iter().map(|(n, v)| format!("{n}={v}")).collect()
    }

    pub fn from_lines<S: AsRef<str>>(lines: &[S]) -> PackageSet {
        PackageSet(
            lines
                .iter()
                .filter_map(|l| l.as_ref().split_once('='))
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for l in self.to_lines() {
            h.update(l.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }
}

/// apt patterns for what an mmdebstrap variant installs besides `--include`.
pub fn variant_patterns(variant: &str) -> Vec<&'static str> {
    match variant {
        "essential" => vec!["?essential"],
        "apt" => vec!["?essential", "apt"],
        "important" => vec![
            "?essential",
            "?priority(required)",
            "?priority(important)",
            "apt",
        ],
        "standard" => vec![
            "?essential",
            "?priority(required)",
            "?priority(important)",
            "?priority(standard)",
            "apt",
        ],
        // minbase and required are the same set in mmdebstrap.
        _ => vec!["?essential", "?priority(required)", "apt"],
    }
}

/// A private apt state directory, keyed by the source lines.
pub struct AptState {
    pub dir: PathBuf,
}

impl AptState {
    /// The state directory of `sources` in `cache` (whether or not it exists yet).
    pub fn dir_for(cache: &Path, sources: &[SourceLine]) -> PathBuf {
        let mut key = Sha256::new();
        for s in sources {
            key.update(s.0.as_bytes());
            key.update(b"\n");
        }
        cache.join("apt").join(&hex::encode(key.finalize())[..16])
    }

    /// The downloaded package indices (`*_Packages`) of this state.
    pub fn lists_dir(&self) -> PathBuf {
        self.dir.join("var/lib/apt/lists")
    }

    pub fn new(cache: &Path, sources: &[SourceLine], exclude: &[String]) -> Result<AptState> {
        AptState::create(AptState::dir_for(cache, sources), sources, exclude)
    }

    /// A state directory at `dir` (e.g. a temporary one) for `sources`.
    pub fn create(dir: PathBuf, sources: &[SourceLine], exclude: &[String]) -> Result<AptState> {
        for sub in [
            "etc/apt/sources.list.d",
            "etc/apt/preferences.d",
            "etc/apt/apt.conf.d",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "var/lib/dpkg",
        ] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let mut list = String::new();
        for s in sources {
            writeln!(list, "{}", s.0).ok();
        }
        std::fs::write(dir.join("etc/apt/sources.list"), list)?;
        std::fs::write(
            dir.join("etc/apt/preferences.d/cairn-exclude"),
            exclude_preferences(exclude),
        )?;
        std::fs::write(dir.join("var/lib/dpkg/status"), "")?;
        Ok(AptState { dir })
    }

    pub(crate) fn command(&self) -> Command {
        let d = self.dir.display();
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C.UTF-8");
        for opt in [
            format!("Dir={d}"),
            format!("Dir::State::status={d}/var/lib/dpkg/status"),
            // Keys stay the build machine's: they are what its sources are signed with.
            "Dir::Etc::TrustedParts=/etc/apt/trusted.gpg.d".into(),
            "Dir::Etc::Trusted=/etc/apt/trusted.gpg".into(),
            "Debug::NoLocking=1".into(),
            format!("APT::Architecture={}", native_arch()),
            "APT::Install-Recommends=false".into(),
            "Acquire::Languages=none".into(),
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd
    }

    /// Refresh the package indices (a no-op download when they are current).
    pub fn update(&self) -> Result<()> {
        let out = self
            .command()
            .args(["-q", "update"])
            .output()
            .context("running apt-get update")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success()
            || stderr
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W: Failed"))
        {
            bail!(
                "apt-get update for the compose's sources failed ({}):\n{}\ncheck the sources in {}",
                out.status,
                tail(&stderr, 15),
                self.dir.join("etc/apt/sources.list").display()
            );
        }
        Ok(())
    }

    /// The full set apt would install into an empty root for `variant` + `install`.
    pub fn resolve(&self, variant: &str, install: &[String]) -> Result<PackageSet> {
        let mut cmd = self.command();
        cmd.args(["-q", "-s", "install"]);
        cmd.args(variant_patterns(variant));
        cmd.args(install);
        let out = cmd.output().context("running apt-get install --simulate")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let hint = if stderr.contains("Unable to locate package") {
                "a package named in [packages] install does not exist in the configured sources"
            } else {
                "the package set cannot be installed together"
            };
            bail!(
                "resolving packages failed: {hint}:\n{}",
                tail(&format!("{stdout}{stderr}"), 20)
            );
        }
        Ok(parse_simulation(&stdout))
    }
}

fn exclude_preferences(exclude: &[String]) -> String {
    let mut s = String::new();
    for p in exclude {
        writeln!(s, "Package: {p}\nPin: release *\nPin-Priority: -1\n").ok();
    }
    s
}

/// Parses `Inst name (version suite [arch])` lines of an apt simulation.
pub fn parse_simulation(stdout: &str) -> PackageSet {
    let mut set = BTreeMap::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("Inst ") else {
            continue;
        };
        let mut parts = rest.splitn(2, ' ');
        let (Some(name), Some(tail)) = (parts.next(), parts.next()) else {
            continue;
        };
        // An upgrade shows the installed version first: `Inst name [old] (new …)`.
        let tail = match tail.strip_prefix('[') {
            Some(rest) => rest.split_once(']').map_or("", |(_, t)| t),
            None => tail,
        };
        let version = tail
            .trim_start()
            .strip_prefix('(')
            .and_then(|v| v.split_whitespace().next());
        if let Some(v) = version {
            let name = name.split(':').next().unwrap_or(name);
            set.insert(name.to_string(), v.to_string());
        }
    }
    PackageSet(set)
}

/// The packages installed in a root, from its dpkg database.
pub fn installed_packages(admindir: &Path) -> Result<PackageSet> {
    let out = Command::new("dpkg-query")
        .arg(format!("--admindir={}", admindir.display()))
        .args(["-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\n"])
        .output()
        .context("running dpkg-query")?;
    if !out.status.success() {
        bail!(
            "dpkg-query on {} failed: {}",
            admindir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut set = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split('\t');
        if let (Some(status), Some(name), Some(ver)) = (f.next(), f.next(), f.next()) {
            if status.starts_with("ii") {
                set.insert(name.to_string(), ver.to_string());
            }
        }
    }
    Ok(PackageSet(set))
}

pub fn native_arch() -> String {
    Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "amd64".into())
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_lines_parse_into_name_version() {
        let out = "Reading package lists...\n\
                   Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])\n\
                   Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []\n\
                   Inst libgcc-s1:amd64 [1.0] (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])\n\
                   Conf libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64])\n";
        let set = parse_simulation(out);
        assert_eq!(
            set.to_lines(),
            vec![
                "gcc-12-base=12.2.0-14+deb12u1",
                "libc6=2.36-9+deb12u14",
                "libgcc-s1=12.2.0-14+deb12u1"
            ]
        );
    }

    #[test]
    fn machine_sources_pick_the_suite_family_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sources.list.d")).unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main contrib\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
             Types: deb\nURIs: http://off.invalid/\nSuites: bookworm\nComponents: main\nEnabled: no\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/vendor.list"),
            "deb [signed-by=/k.gpg] https://vendor.invalid/apt vendor-bookworm main\n# deb http://x bookworm main\n",
        )
        .unwrap();
        let pkgs = Packages {
            suite: Some("bookworm".into()),
            ..Default::default()
        };
        let lines: Vec<String> = sources_for(&pkgs, dir.path())
            .unwrap()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(
            lines,
            vec![
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.invalid/debian bookworm main",
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.invalid/debian bookworm-updates main",
                "deb http://mirror.invalid/debian-security bookworm-security main",
            ]
        );
        let other = Packages {
            suite: Some("trixie".into()),
            ..Default::default()
        };
        let err = sources_for(&other, dir.path()).unwrap_err().to_string();
        assert!(err.contains("trixie"), "{err}");
    }

    #[test]
    fn exclusions_become_negative_pins() {
        let p = exclude_preferences(&["foo".into()]);
        assert_eq!(p, "Package: foo\nPin: release *\nPin-Priority: -1\n\n");
    }
}
