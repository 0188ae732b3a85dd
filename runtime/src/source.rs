//! Reading image blobs from what image tools write: an OCI image layout
//! directory, the same layout packed in a tar (`oci-archive`), or a
//! `docker save` tar. Every blob is checked against its digest as it is read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::Digest as _;

/// A `sha256:<hex>` digest, checked for shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sha256(pub String);

impl Sha256 {
    pub fn parse(s: &str) -> Result<Self> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| anyhow!("digest {s:?}: only sha256 digests are supported"))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            bail!("digest {s:?} is not sha256:<64 lowercase hex digits>");
        }
        Ok(Self(hex.to_string()))
    }
    pub fn hex(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// A reader that hashes everything passing through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    pub bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: sha2::Sha256::default(),
            bytes: 0,
        }
    }
    /// Read the rest (tar streams may stop before their padding) and return the digest.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((hex::encode(self.hasher.finalize()), self.bytes))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// Where blobs come from.
pub enum Source {
    /// An OCI layout directory.
    Dir(PathBuf),
    /// A tar file (oci-archive or docker save): entry name → (offset, size).
    Tar {
        path: PathBuf,
        entries: HashMap<String, (u64, u64)>,
    },
}

impl Source {
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "opening image {}: no such file or directory",
                path.display()
            )
        })?;
        if meta.is_dir() {
            if !path.join("index.json").exists() {
                bail!(
                    "{} is a directory but not an OCI image layout (no index.json)",
                    path.display()
                );
            }
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut entries = HashMap::new();
        for entry in archive.entries().with_context(|| {
            format!(
                "{} is neither a directory nor a tar archive",
                path.display()
            )
        })? {
            let entry = entry.with_context(|| format!("reading tar {}", path.display()))?;
            let name = entry
                .path()?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            if entry.header().entry_type().is_file() {
                entries.insert(name, (entry.raw_file_position(), entry.size()));
            }
        }
        if entries.is_empty() {
            bail!("{} is an empty or unreadable tar archive", path.display());
        }
        Ok(Source::Tar {
            path: path.to_path_buf(),
            entries,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(d) => d.join(name).exists(),
            Source::Tar { entries, .. } => entries.contains_key(name),
        }
    }

    /// Open a named file of the layout/archive (not digest checked).
    pub fn open_file(&self, name: &str) -> Result<Box<dyn Read>> {
        match self {
            Source::Dir(d) => {
                let p = d.join(name);
                Ok(Box::new(
                    File::open(&p).with_context(|| format!("opening {}", p.display()))?,
                ))
            }
            Source::Tar { path, entries } => {
                let (off, size) = *entries
                    .get(name)
                    .ok_or_else(|| anyhow!("{} has no entry {name}", path.display()))?;
                let mut f = File::open(path)?;
                f.seek(SeekFrom::Start(off))?;
                Ok(Box::new(f.take(size)))
            }
        }
    }

    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.open_file(name)?
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {name}"))?;
        Ok(buf)
    }

    /// Path of a blob inside an OCI layout.
    pub fn blob_name(digest: &Sha256) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    /// A small blob (manifest, config), read whole and verified.
    pub fn read_blob(&self, digest: &Sha256, size: Option<u64>) -> Result<Vec<u8>> {
        let name = Self::blob_name(digest);
        if !self.has(&name) {
            bail!("blob {digest} is missing from the image");
        }
        let data = self.read_file(&name)?;
        verify(digest, &data, size)?;
        Ok(data)
    }
}

pub fn verify(digest: &Sha256, data: &[u8], size: Option<u64>) -> Result<()> {
    let got = sha256_hex(data);
    if got != digest.hex() {
        bail!("digest mismatch: blob {digest} has content sha256:{got}; the image is corrupt or was tampered with");
    }
    if let Some(size) = size {
        if size != data.len() as u64 {
            bail!(
                "size mismatch: blob {digest} is {} bytes, descriptor says {size}",
                data.len()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_for_shape_and_content() {
        assert!(Sha256::parse("sha512:00").is_err());
        assert!(Sha256::parse("sha256:abc").is_err());
        let d = Sha256::parse(&format!("sha256:{}", sha256_hex(b"hello"))).unwrap();
        verify(&d, b"hello", Some(5)).unwrap();
        let err = verify(&d, b"hellO", None).unwrap_err().to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        assert!(verify(&d, b"hello", Some(4)).is_err());
        let mut r = HashingReader::new(&b"hello"[..]);
        let mut one = [0u8; 2];
        r.read_exact(&mut one).unwrap();
        assert_eq!(r.finish().unwrap(), (d.hex().to_string(), 5));
    }
}
