//! Reading image blobs from what image tools write: an OCI image layout
//! directory, the same layout packed in a tar (`oci-archive`), or a
//! `docker save` tar. Every blob is checked against its digest as it is read.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::Digest as _;

use crate::layer::{at, TarGuard};
use crate::limits::ImportLimits;

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
    /// An OCI layout directory, held open: every file of it is opened
    /// beneath this fd with no symlink followed (see [`Source::open_file`]).
    Dir { path: PathBuf, fd: OwnedFd },
    /// A tar file (oci-archive or docker save): entry name → (offset, size).
    Tar {
        path: PathBuf,
        entries: HashMap<String, (u64, u64)>,
    },
}

impl Source {
    /// [`Source::open_limited`] with the default [`ImportLimits`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_limited(path, &ImportLimits::default())
    }

    pub fn open_limited(path: &Path, limits: &ImportLimits) -> Result<Self> {
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "opening image {}: no such file or directory",
                path.display()
            )
        })?;
        if meta.is_dir() {
            let fd = at::openat2(
                cwd(),
                path.as_os_str(),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
                0,
            )
            .with_context(|| format!("opening {}", path.display()))?;
            let src = Source::Dir {
                path: path.to_path_buf(),
                fd,
            };
            if !src.has("index.json") {
                bail!(
                    "{} is a directory but not an OCI image layout (no index.json)",
                    path.display()
                );
            }
            return Ok(src);
        }
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut archive = tar::Archive::new(TarGuard::new(
            BufReader::new(file),
            limits.max_tar_header_size,
        ));
        let mut entries = HashMap::new();
        let mut count = 0usize;
        for entry in archive.entries().with_context(|| {
            format!(
                "{} is neither a directory nor a tar archive",
                path.display()
            )
        })? {
            let entry = entry.with_context(|| format!("reading tar {}", path.display()))?;
            count += 1;
            if count > limits.max_archive_entries {
                bail!(
                    "{} has more than {} entries (ImportLimits::max_archive_entries, `host app import --max-archive-entries`): not an image archive",
                    path.display(),
                    limits.max_archive_entries
                );
            }
            let name = entry
                .path()?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            // No name a blob is looked up by is longer: do not keep them.
            if entry.header().entry_type().is_file() && name.len() <= limits.max_path_len {
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

    fn display(&self) -> &Path {
        match self {
            Source::Dir { path, .. } | Source::Tar { path, .. } => path,
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            // Anything but "no such file" counts as there: opening it then
            // says what is wrong with it (a symlink, outside the layout).
            Source::Dir { fd, .. } => !matches!(
                at::openat2(
                    fd.as_fd(),
                    OsStr::new(name),
                    libc::O_PATH | libc::O_NOFOLLOW,
                    0,
                    at::STRICT,
                ),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT)
            ),
            Source::Tar { entries, .. } => entries.contains_key(name),
        }
    }

    /// Open a named file of the layout/archive (not digest checked), and
    /// its size. In a layout directory the name is resolved beneath it with
    /// no symlink anywhere (`..`, absolute names and symlinks are refused)
    /// and must be a regular file: not a device, fifo or socket.
    pub fn open_file_sized(&self, name: &str) -> Result<(Box<dyn Read>, u64)> {
        match self {
            Source::Dir { path, fd } => {
                let shown = path.join(name);
                let f = at::openat2(
                    fd.as_fd(),
                    OsStr::new(name),
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                    0,
                    at::STRICT,
                )
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) => anyhow!(
                        "{} is (or goes through) a symbolic link: refused, an image layout holds plain files",
                        shown.display()
                    ),
                    Some(libc::EXDEV) => anyhow!(
                        "{} is outside the image layout: refused",
                        shown.display()
                    ),
                    _ => anyhow::Error::new(e).context(format!("opening {}", shown.display())),
                })?;
                let st = at::fstat(f.as_fd())?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    bail!("{} is not a regular file: refused", shown.display());
                }
                Ok((Box::new(File::from(f)), st.st_size as u64))
            }
            Source::Tar { path, entries } => {
                let (off, size) = *entries
                    .get(name)
                    .ok_or_else(|| anyhow!("{} has no entry {name}", path.display()))?;
                let mut f = File::open(path)?;
                f.seek(SeekFrom::Start(off))?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }

    /// [`Source::open_file_sized`] without the size.
    pub fn open_file(&self, name: &str) -> Result<Box<dyn Read>> {
        Ok(self.open_file_sized(name)?.0)
    }

    /// [`Source::read_file_limited`] at the default metadata limit.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        self.read_file_limited(name, ImportLimits::default().max_metadata_size)
    }

    /// A small named file, read whole: refused when over `limit` bytes,
    /// before it is read (and never more than `limit + 1` bytes read).
    pub fn read_file_limited(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let (f, size) = self.open_file_sized(name)?;
        if size > limit {
            bail!(
                "{name} in {} is {size} bytes, over the limit of {limit} (ImportLimits::max_metadata_size, `host app import --max-metadata-size`)",
                self.display().display()
            );
        }
        let mut buf = Vec::new();
        f.take(limit + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {name}"))?;
        if buf.len() as u64 > limit {
            bail!(
                "{name} in {} is over the limit of {limit} bytes (ImportLimits::max_metadata_size, `host app import --max-metadata-size`)",
                self.display().display()
            );
        }
        Ok(buf)
    }

    /// Path of a blob inside an OCI layout.
    pub fn blob_name(digest: &Sha256) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    /// [`Source::read_blob_limited`] at the default metadata limit.
    pub fn read_blob(&self, digest: &Sha256, size: Option<u64>) -> Result<Vec<u8>> {
        self.read_blob_limited(digest, size, ImportLimits::default().max_metadata_size)
    }

    /// A small blob (manifest, index, config), read and verified: its
    /// descriptor's size is checked against `limit` before anything is
    /// read, and at most `size + 1` (or `limit + 1`) bytes are read.
    pub fn read_blob_limited(
        &self,
        digest: &Sha256,
        size: Option<u64>,
        limit: u64,
    ) -> Result<Vec<u8>> {
        if let Some(size) = size.filter(|s| *s > limit) {
            bail!(
                "blob {digest}: its descriptor says {size} bytes, over the limit of {limit} for manifests, indexes and configs (ImportLimits::max_metadata_size, `host app import --max-metadata-size`)"
            );
        }
        let name = Self::blob_name(digest);
        if !self.has(&name) {
            bail!("blob {digest} is missing from the image");
        }
        let f = self.open_file(&name)?;
        let mut data = Vec::new();
        f.take(size.unwrap_or(limit) + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("reading blob {digest}"))?;
        if size.is_none() && data.len() as u64 > limit {
            bail!("blob {digest} is over the limit of {limit} bytes (ImportLimits::max_metadata_size, `host app import --max-metadata-size`)");
        }
        verify(digest, &data, size)?;
        Ok(data)
    }
}

fn cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a valid dirfd for the *at calls.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

/// A member path named by a docker save `manifest.json`: relative, no `..`,
/// no empty component. Returned without a leading `./`.
pub fn archive_member(p: &str) -> Result<&str> {
    let p = p.trim_start_matches("./");
    if p.is_empty()
        || p.starts_with('/')
        || p.split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'))
    {
        bail!("manifest.json names {p:?}: not a plain path inside the archive (refused)");
    }
    Ok(p)
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
