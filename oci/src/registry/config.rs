//! What a pull reads from the node's container configuration, in the files
//! podman and skopeo use: credentials from a containers-auth.json file and
//! per-registry `insecure` settings from registries.conf.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde::Deserialize;

use super::reference::Reference;

/// Bound on either file: both are a few entries long.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never a secret in a log line or an error.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ****)", self.username)
    }
}

impl Credentials {
    /// The `Authorization: Basic` value.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

fn read_bounded(path: &Path) -> Result<Option<String>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut text = String::new();
    f.take(MAX_CONFIG_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {} (it must be UTF-8 text)", path.display()))?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        bail!(
            "{} is over {MAX_CONFIG_FILE} bytes: refused",
            path.display()
        );
    }
    Ok(Some(text))
}

/// Where podman looks for credentials, in its order: `$REGISTRY_AUTH_FILE`,
/// then `$XDG_RUNTIME_DIR/containers/auth.json` (`/run/containers/UID/` when
/// unset), then `~/.config/containers/auth.json` and `~/.docker/config.json`.
pub fn default_auth_files() -> Vec<PathBuf> {
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|f| !f.is_empty()) {
        return vec![PathBuf::from(f)];
    }
    let mut files = vec![
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d).join("containers/auth.json"),
            None => PathBuf::from(format!(
                "/run/containers/{}/auth.json",
                nix::unistd::geteuid()
            )),
        },
    ];
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let home = PathBuf::from(home);
        files.push(home.join(".config/containers/auth.json"));
        files.push(home.join(".docker/config.json"));
    }
    files
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
}

/// The credentials for `reference` in the first of `files` that exists: the
/// entry for the longest matching `registry[/repository-prefix]` key
/// (podman's per-repository entries), keys written with a scheme or a
/// `/v1/` suffix (docker's) included. `explicit` files must exist.
pub fn credentials(
    files: &[PathBuf],
    explicit: bool,
    reference: &Reference,
) -> Result<Option<Credentials>> {
    for file in files {
        let Some(text) = read_bounded(file)? else {
            if explicit {
                bail!(
                    "credentials file {} does not exist (--authfile)",
                    file.display()
                );
            }
            continue;
        };
        let parsed: AuthFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a containers-auth.json file", file.display()))?;
        let wanted = format!("{}/{}", reference.registry, reference.repository);
        let best = parsed
            .auths
            .iter()
            .filter_map(|(key, entry)| {
                let k = key
                    .trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .trim_end_matches("/v1")
                    .trim_end_matches("/v2");
                let matches = wanted == k
                    || (wanted.starts_with(k) && wanted.as_bytes().get(k.len()) == Some(&b'/'));
                matches.then_some((k.len(), key, entry))
            })
            .max_by_key(|(len, _, _)| *len);
        let Some((_, key, entry)) = best else {
            return Ok(None);
        };
        let Some(auth) = &entry.auth else {
            return Ok(None);
        };
        let bad = || {
            anyhow!(
                "{}: the entry for {key:?} is not base64 of USER:PASSWORD",
                file.display()
            )
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let (username, password) = raw.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials {
            username: username.into(),
            password: password.into(),
        }));
    }
    Ok(None)
}

/// `$CONTAINERS_REGISTRIES_CONF`, else `/etc/containers/registries.conf`.
pub fn default_registries_conf() -> PathBuf {
    std::env::var_os("CONTAINERS_REGISTRIES_CONF")
        .filter(|f| !f.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/containers/registries.conf"))
}

#[derive(Deserialize, Default)]
struct RegistriesConf {
    /// Version 2: `[[registry]] location = "…" insecure = true`.
    #[serde(default)]
    registry: Vec<RegistryEntry>,
    /// Version 1: `[registries.insecure] registries = ["…"]`.
    #[serde(default)]
    registries: Option<V1Registries>,
}

#[derive(Deserialize)]
struct RegistryEntry {
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    insecure: Option<bool>,
}

#[derive(Deserialize)]
struct V1Registries {
    #[serde(default)]
    insecure: Option<V1List>,
}

#[derive(Deserialize)]
struct V1List {
    #[serde(default)]
    registries: Vec<String>,
}

/// Whether registries.conf marks the registry of `reference` insecure
/// (plain HTTP allowed, certificates not verified). A missing file marks
/// nothing; a file that does not parse is an error, not "secure by luck".
pub fn insecure_in(conf: &Path, reference: &Reference) -> Result<bool> {
    let Some(text) = read_bounded(conf)? else {
        return Ok(false);
    };
    let parsed: RegistriesConf =
        toml::from_str(&text).with_context(|| format!("parsing {}", conf.display()))?;
    let wanted = format!("{}/{}", reference.registry, reference.repository);
    let best = parsed
        .registry
        .iter()
        .filter_map(|r| {
            let key = r.prefix.as_deref().or(r.location.as_deref())?;
            let key = key.trim_end_matches('/');
            let matches = wanted == key
                || (wanted.starts_with(key) && wanted.as_bytes().get(key.len()) == Some(&b'/'));
            matches.then_some((key.len(), r.insecure.unwrap_or(false)))
        })
        .max_by_key(|(len, _)| *len);
    if let Some((_, insecure)) = best {
        return Ok(insecure);
    }
    Ok(parsed
        .registries
        .and_then(|r| r.insecure)
        .is_some_and(|l| l.registries.contains(&reference.registry)))
}

/// A `WWW-Authenticate` challenge a registry answered 401 with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parse `Basic realm="…"` or `Bearer realm="…",service="…",scope="…"`.
pub fn parse_challenge(header: &str) -> Result<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = std::collections::BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .ok_or_else(|| anyhow!("WWW-Authenticate {header:?}: malformed parameters"))?;
        let key = key.trim().to_ascii_lowercase();
        let (value, after) = if let Some(q) = after.strip_prefix('"') {
            let end = q
                .find('"')
                .ok_or_else(|| anyhow!("WWW-Authenticate {header:?}: unterminated quote"))?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        params.insert(key, value.to_string());
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Ok(Challenge::Basic),
        "bearer" => Ok(Challenge::Bearer {
            realm: params
                .remove("realm")
                .ok_or_else(|| anyhow!("WWW-Authenticate {header:?}: Bearer without a realm"))?,
            service: params.remove("service"),
            scope: params.remove("scope"),
        }),
        other => {
            bail!("the registry asks for {other:?} authentication, which cairn does not speak")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn credentials_come_from_the_longest_matching_entry() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &file,
            serde_json::json!({"auths": {
                "reg.example.org:5000": {"auth": b64("all:one")},
                "reg.example.org:5000/team": {"auth": b64("team:two:with:colons")},
                "https://other.example.org/v1/": {"auth": b64("docker:three")},
            }})
            .to_string(),
        )
        .unwrap();
        let files = vec![file.clone()];
        let got = |r: &str| credentials(&files, true, &reference(r)).unwrap();
        assert_eq!(got("reg.example.org:5000/x").unwrap().username, "all");
        let team = got("reg.example.org:5000/team/app:1").unwrap();
        assert_eq!(
            (team.username.as_str(), team.password.as_str()),
            ("team", "two:with:colons")
        );
        assert_eq!(
            got("reg.example.org:5000/teamx/app").unwrap().username,
            "all"
        );
        assert_eq!(got("other.example.org/x").unwrap().username, "docker");
        assert!(
            got("reg.example.org/x").is_none(),
            "another port is another registry"
        );
        assert!(
            !format!("{team:?}").contains("two"),
            "Debug shows no password"
        );

        let missing = vec![dir.path().join("nope.json")];
        assert!(credentials(&missing, true, &reference("a.b/c")).is_err());
        assert!(credentials(&missing, false, &reference("a.b/c"))
            .unwrap()
            .is_none());
        std::fs::write(&file, r#"{"auths": {"a.b": {"auth": "!!"}}}"#).unwrap();
        let err = credentials(&files, true, &reference("a.b/c")).unwrap_err();
        assert!(err.to_string().contains("not base64"), "{err}");
    }

    #[test]
    fn registries_conf_marks_registries_insecure() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("registries.conf");
        assert!(
            !insecure_in(&conf, &reference("a.b/c")).unwrap(),
            "no file, nothing insecure"
        );
        std::fs::write(
            &conf,
            "unqualified-search-registries = [\"x.y\"]\n\
             [[registry]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n\
             [[registry]]\nprefix = \"127.0.0.1:5000/secure\"\nlocation = \"127.0.0.1:5000/secure\"\n",
        )
        .unwrap();
        assert!(insecure_in(&conf, &reference("127.0.0.1:5000/app")).unwrap());
        assert!(!insecure_in(&conf, &reference("127.0.0.1:5000/secure/app")).unwrap());
        assert!(!insecure_in(&conf, &reference("127.0.0.1:5001/app")).unwrap());
        std::fs::write(
            &conf,
            "[registries.insecure]\nregistries = [\"reg.local:5000\"]\n",
        )
        .unwrap();
        assert!(insecure_in(&conf, &reference("reg.local:5000/app")).unwrap());
        std::fs::write(&conf, "[[registry]\n").unwrap();
        assert!(insecure_in(&conf, &reference("reg.local:5000/app")).is_err());
    }

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(r#"Basic realm="basic-realm""#).unwrap(),
            Challenge::Basic
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example.org/token",service="registry.example.org",scope="repository:a/b:pull""#
            )
            .unwrap(),
            Challenge::Bearer {
                realm: "https://auth.example.org/token".into(),
                service: Some("registry.example.org".into()),
                scope: Some("repository:a/b:pull".into()),
            }
        );
        assert!(parse_challenge("Bearer service=\"x\"").is_err());
        assert!(parse_challenge("Negotiate abc").is_err());
        assert!(parse_challenge("Bearer realm=\"x").is_err());
    }
}
