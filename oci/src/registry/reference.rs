//! Image references as registries know them:
//! `REGISTRY[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST]`.
//!
//! The registry is always named: an unqualified `busybox` is refused rather
//! than resolved through a search list, so a reference means the same on
//! every node whatever its configuration says.

use std::fmt;

use anyhow::{bail, Result};

use crate::source::Sha256;

/// Longest repository path the distribution spec lets registries refuse beyond.
const MAX_REPOSITORY_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host` or `host:port`, lowercase.
    pub registry: String,
    /// `a/b/c`: lowercase components.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Sha256>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self> {
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(Sha256::parse(d)?)),
            None => (s, None),
        };
        // A tag follows the last ':' unless a '/' does (then it was a port).
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t)),
            _ => (name, None),
        };
        let Some((registry, repository)) = name.split_once('/') else {
            bail!(
                "image reference {s:?} names no registry: write REGISTRY/REPOSITORY[:TAG], \
                 e.g. registry.example.org/{name}:latest"
            );
        };
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            bail!(
                "image reference {s:?}: {registry:?} is not a registry host (it needs a '.' \
                 or a port, or to be localhost); write REGISTRY/{name}"
            );
        }
        check_registry(registry).map_err(|e| anyhow::anyhow!("image reference {s:?}: {e}"))?;
        check_repository(repository).map_err(|e| anyhow::anyhow!("image reference {s:?}: {e}"))?;
        if let Some(t) = tag {
            check_tag(t).map_err(|e| anyhow::anyhow!("image reference {s:?}: {e}"))?;
        }
        Ok(Self {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// What the manifest endpoint is asked for: the digest when there is
    /// one (it wins over a tag), else the tag, else `latest`.
    pub fn target(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same image pinned to `digest` (the tag kept for the reader).
    pub fn pinned(&self, digest: &Sha256) -> Self {
        Self {
            digest: Some(digest.clone()),
            ..self.clone()
        }
    }

    /// The last component of the repository: the name the store keeps a
    /// pulled image under unless told otherwise (as `host app import`
    /// names an image from its `ref.name` annotation).
    pub fn short_name(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn check_registry(r: &str) -> Result<()> {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && !host.starts_with(['.', '-'])
        && !host.ends_with(['.', '-']);
    if !host_ok {
        bail!("registry host {host:?}: use lowercase letters, digits, '.' and '-'");
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            bail!("registry port {p:?} is not a port number");
        }
    }
    Ok(())
}

fn check_repository(repo: &str) -> Result<()> {
    if repo.is_empty() || repo.len() > MAX_REPOSITORY_LEN {
        bail!("repository {repo:?}: 1 to {MAX_REPOSITORY_LEN} characters");
    }
    for c in repo.split('/') {
        let ok = !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.as_bytes()[0].is_ascii_alphanumeric()
            && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric();
        if !ok {
            bail!(
                "repository {repo:?}: each component is lowercase letters and digits, \
                 joined by '.', '_' or '-'"
            );
        }
    }
    Ok(())
}

fn check_tag(t: &str) -> Result<()> {
    let ok = !t.is_empty()
        && t.len() <= MAX_TAG_LEN
        && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        bail!("tag {t:?}: up to {MAX_TAG_LEN} letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// An OS and architecture an image index lists manifests for:
/// `linux/amd64`, `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// This machine's: `linux/<its OCI architecture name>`.
    pub fn host() -> Self {
        Self {
            os: "linux".into(),
            architecture: crate::image::host_arch().into(),
            variant: None,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        let word = |w: &str| {
            !w.is_empty()
                && w.len() <= 32
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| word(p)) {
            bail!("platform {s:?}: write OS/ARCH or OS/ARCH/VARIANT, e.g. linux/arm64");
        }
        Ok(Self {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_their_registry_and_keep_tag_and_digest() {
        let r = Reference::parse("127.0.0.1:5000/cairn/busybox:1.36").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "cairn/busybox");
        assert_eq!(r.tag.as_deref(), Some("1.36"));
        assert_eq!(r.target(), "1.36");
        assert_eq!(r.short_name(), "busybox");
        assert_eq!(r.to_string(), "127.0.0.1:5000/cairn/busybox:1.36");

        let r = Reference::parse("localhost:5000/web").unwrap();
        assert_eq!((r.tag.as_deref(), r.target().as_str()), (None, "latest"));

        let d = format!("sha256:{}", "ab".repeat(32));
        let r = Reference::parse(&format!("registry.example.org/a/b:v1@{d}")).unwrap();
        assert_eq!(r.target(), d, "a digest wins over the tag");
        assert_eq!(r.to_string(), format!("registry.example.org/a/b:v1@{d}"));
    }

    #[test]
    fn unqualified_and_malformed_references_are_refused() {
        for bad in [
            "busybox",
            "busybox:1",
            "library/busybox",
            "Registry.example.org/x",
            "registry.example.org/X",
            "registry.example.org/",
            "registry.example.org//x",
            "registry.example.org/x/../y",
            "registry.example.org/x:",
            "registry.example.org/x:t@sha256:12",
            "registry.example.org:0/x",
            "registry.example.org:99999/x",
            "registry.example.org/x:-t",
            "reg.example.org/x:a/b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad} was accepted");
        }
        let err = Reference::parse("busybox").unwrap_err().to_string();
        assert!(err.contains("names no registry"), "{err}");
    }

    #[test]
    fn platforms_parse_as_os_arch_variant() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "arm64"));
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        for bad in [
            "linux",
            "linux/",
            "linux/amd64/v1/x",
            "Linux/amd64",
            "linux/a md64",
        ] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }
}
