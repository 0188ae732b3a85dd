//! The treefile: a TOML manifest describing one host tree.
//!
//! Adding a key? 1. add it to `ManifestFile` (all fields optional or
//! defaulted, `deny_unknown_fields` stays on), 2. give it a merge rule in
//! `ManifestFile::merge_included`, 3. check it and carry it into
//! [`Manifest`] in `Merged::resolve`, 4. document it in `docs/manifest.md`,
//! 5. cover it in `tests/manifest.rs`.
//!
//! Each file is parsed and checked on its own first, so an unknown key is
//! reported with the file and line it is on; then `include`d files are merged
//! under the including one: arrays concatenate (included first), tables merge
//! key by key, and scalars of the including file win. Loading ends in
//! [`Manifest`], the resolved model: the base is one of two kinds, and
//! every file the manifest copies or runs has been read, once.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use cairn_contracts::trust::{MAX_PUBLIC_KEY_BYTES, TRUSTED_KEYS_DIR};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What went wrong reading a manifest. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("manifest {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("manifest {path} line {line}: key `{key}`: {message}")]
    InvalidAt {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("manifest {path}: include cycle through {again}")]
    IncludeCycle { path: PathBuf, again: PathBuf },
}

type Result<T> = std::result::Result<T, ManifestError>;

/// One manifest file as written (before includes are merged).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ManifestFile {
    /// Other manifests to merge under this one, relative to this file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<PathBuf>,
    /// The OSTree branch the commit lands on.
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub ref_: Option<String>,
    /// Automatic versions are `<prefix>.<YYYYMMDD>.<serial>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_prefix: Option<String>,
    /// Extra string metadata written into every commit.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Debian packages installed with mmdebstrap into a fresh root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packages: Option<Packages>,
    /// A prepared root file system (directory or tar archive) instead of packages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// Copy the running `host` executable into the tree at this path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_install: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    /// Paths removed from the tree after packages and files are in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_files: Vec<String>,
    #[serde(default, skip_serializing_if = "Units::is_empty")]
    pub units: Units,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
    /// Kernel command line arguments every deployment of this tree boots with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
    /// Scripts run inside the tree, without network, after everything else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub postprocess: Vec<Script>,
    /// Application containers baked into the tree, started at boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<App>,
    /// The public keys the tree trusts for its own updates.
    #[serde(default, skip_serializing_if = "Trust::is_empty")]
    pub trust: Trust,
}

/// `[trust]`: the release public keys shipped in the tree (under
/// `cairn_contracts::trust::TRUSTED_KEYS_DIR`); a node verifies the updates
/// of a deployment with the keys that deployment ships.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Trust {
    /// Armored public key files, relative to the manifest that names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<PathBuf>,
    /// The directory of the manifest each key was named in (same order).
    #[serde(skip)]
    key_dirs: Vec<PathBuf>,
}

impl Trust {
    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// An application container baked into the host tree: its image ships in the
/// tree (pinned by digest), so host and app update and roll back together.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct App {
    /// Container name (also the unit: `cairn-app-<name>.service`).
    pub name: String,
    /// OCI image layout directory or oci-archive tar, relative to the
    /// manifest; or a registry reference `REGISTRY/REPO[:TAG][@sha256:…]`
    /// when no such file exists (`docker://` in front: always a reference).
    pub image: PathBuf,
    /// The image's manifest digest, `sha256:…`: the compose fails on any
    /// other image. Required for a layout or archive; for a registry
    /// reference without one, the compose resolves the tag and records the
    /// digest it baked (commit metadata and lockfile).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// `image` as a registry reference, when it is one (decided where the
    /// manifest is read, relative to its directory).
    #[serde(skip)]
    pub registry: Option<cairn_oci::registry::Reference>,
    /// Command instead of the image's Cmd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// `KEY=VALUE` environment entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<String>,
    /// Fixed address on the container bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<String>,
    /// Services it is an instance of while healthy: `NAME` or
    /// `NAME:PORT`, as `host app run --service` (docs/network.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// `no`, `on-failure` or `always` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Packages {
    /// Debian suite, e.g. `bookworm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    /// Archive components; default `["main"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<String>,
    /// One-line apt sources (`deb [opts] URI SUITE COMPONENTS`). Empty: the
    /// build machine's own configured sources for `suite` and its
    /// `-updates`/`-security` companions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// mmdebstrap variant; default `minbase`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub install: Vec<String>,
    /// Packages apt must never install (pinned to priority -1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// dpkg `path-exclude` globs: files packages ship that never land in the tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_exclude: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileEntry {
    /// Source path, relative to the manifest that names it.
    pub src: PathBuf,
    /// Absolute destination in the tree, under /usr or /etc.
    pub dst: String,
    /// Octal permission bits (e.g. `0o644` or `"0644"`); default: the
    /// source's permission bits (without setuid, setgid and sticky).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Follow symlinks in `src` (also out of the manifest's directory).
    /// Off: `src` must be a regular file beneath the manifest's directory,
    /// reached without any symlink.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow_symlinks: bool,
    /// Where the entry was written (not part of the manifest's meaning).
    #[serde(skip)]
    pub origin: Origin,
}

/// The manifest file, directory, array index and line an entry comes from,
/// so errors point at it after includes are merged.
#[derive(Debug, Clone, Default, PartialEq)]
struct Origin {
    pub file: PathBuf,
    pub dir: PathBuf,
    pub index: usize,
    pub line: Option<usize>,
}

/// File mode written either as a TOML integer (`0o755`) or an octal string (`"0755"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mode(pub u32);

impl Mode {
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an octal mode such as 0o644 or \"0644\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Mode, E> {
                u32::try_from(v)
                    .map(Mode)
                    .map_err(|_| E::custom(format!("mode {v} is not a permission mode")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Mode, E> {
                u32::from_str_radix(v.trim_start_matches("0o"), 8)
                    .map(Mode)
                    .map_err(|_| E::custom(format!("mode {v:?} is not an octal number")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Units {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enable: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disable: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<String>,
}

impl Units {
    fn is_empty(&self) -> bool {
        self.enable.is_empty() && self.disable.is_empty() && self.mask.is_empty()
    }
}

/// A system user, written to sysusers.d (created at boot by systemd-sysusers).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct User {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gecos: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Supplementary groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Group {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// A postprocess script: a file (`script`) or inline text (`inline`, with a `name`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Script {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the entry was written (not part of the manifest's meaning).
    #[serde(skip)]
    pub origin: Origin,
}

impl Script {
    /// The name errors and logs use for this script.
    fn display_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match &self.script {
            Some(p) => p.display().to_string(),
            None => "inline script".into(),
        }
    }
}

/// A loaded manifest: merged, validated and resolved. All paths are
/// absolute, the base is one of its two kinds, and every file the manifest
/// copies or runs was opened once and read into memory: the digest hashed
/// into the compose's inputs and the bytes written into the tree are the same.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The OSTree branch the commit lands on.
    pub refname: String,
    pub version_prefix: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub base: Base,
    pub self_install: Option<String>,
    /// One per `[[files]]` entry, in order.
    pub files: Vec<SourceFile>,
    pub remove_files: Vec<String>,
    pub units: Units,
    pub users: Vec<User>,
    pub groups: Vec<Group>,
    pub kernel_args: Vec<String>,
    /// One per `[[postprocess]]` entry, in order.
    pub postprocess: Vec<PostprocessScript>,
    pub apps: Vec<App>,
    /// `[trust] keys`, read and parsed: one public key each.
    pub trusted_keys: Vec<crate::keys::PublicKey>,
    /// See [`Manifest::digest`].
    digest: String,
    /// See [`Manifest::to_toml`].
    toml: String,
}

/// What the tree starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    /// Debian packages installed with mmdebstrap (`suite` is set).
    Packages(Packages),
    /// A prepared root: a directory or a tar archive, not a symlink.
    Rootfs(PathBuf),
}

/// A `[[files]]` entry with its source read.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Where the content was read from (for messages).
    pub src: PathBuf,
    pub dst: String,
    /// The entry's `mode`, if it gives one.
    pub mode: Option<Mode>,
    /// The source's mode bits when it was opened.
    pub src_mode: u32,
    /// The source's content, read once when the manifest was loaded.
    pub content: Vec<u8>,
    /// SHA-256 (hex) of `content`.
    pub sha256: String,
}

/// A `[[postprocess]]` entry with its text.
#[derive(Debug, Clone, PartialEq)]
pub struct PostprocessScript {
    /// The name errors and logs use: `name`, else the script's path, else
    /// "inline script".
    pub name: String,
    /// The `inline` text, or the `script` file's content read once at load.
    pub body: String,
}

/// The most a manifest's `[[files]]` source or postprocess script may hold:
/// each is kept in memory from load to copy.
const MAX_SOURCE_BYTES: u64 = 256 << 20;

impl Manifest {
    /// Load a manifest and everything it includes: merge, validate, and read
    /// every file it copies or runs (once).
    pub fn load(path: &Path) -> Result<Manifest> {
        let path = std::path::absolute(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut stack = Vec::new();
        let spec = load_merged(&path, &mut stack)?;
        Merged { path, spec }.resolve()
    }

    /// SHA-256 over the manifest's meaning: the merged keys with every source
    /// file and script replaced by its content digest (the base's location
    /// and the apps' image paths left out), so moving a checkout changes nothing.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The merged manifest as TOML (what `--dry-run` prints).
    pub fn to_toml(&self) -> String {
        self.toml.clone()
    }
}

/// The merged manifest as written, before it is checked and resolved.
struct Merged {
    path: PathBuf,
    spec: ManifestFile,
}

impl Merged {
    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            path: self.path.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// An error about an entry, in the file (and at the line) that wrote it.
    fn invalid_at(&self, origin: &Origin, key: String, message: String) -> ManifestError {
        let path = if origin.file.as_os_str().is_empty() {
            self.path.clone()
        } else {
            origin.file.clone()
        };
        match origin.line {
            Some(line) => ManifestError::InvalidAt {
                path,
                line,
                key,
                message,
            },
            None => ManifestError::Invalid { path, key, message },
        }
    }

    /// Checks every key and reads the sources: the typed [`Manifest`], or an
    /// error naming the file, the key and (for sources) the line.
    fn resolve(self) -> Result<Manifest> {
        let s = &self.spec;
        // Every string (keys and values, paths included): libostree and C
        // tools would cut a string at a NUL without a word.
        let value = serde_json::to_value(s).map_err(|e| {
            self.invalid(
                "include",
                format!("a path of this manifest is not UTF-8 ({e}); move the checkout"),
            )
        })?;
        if let Some(key) = find_nul(&value, String::new()) {
            return Err(self.invalid(key, "contains a NUL character (\\u0000); remove it"));
        }
        let Some(r) = s.ref_.as_deref() else {
            return Err(self.invalid("ref", "missing: every manifest needs the branch to commit to, e.g. ref = \"cairn/bookworm/x86_64/container-host\""));
        };
        check_ref(r).map_err(|m| self.invalid("ref", m))?;
        let refname = r.to_string();
        if let Some(p) = &s.version_prefix {
            check_version(p).map_err(|m| self.invalid("version-prefix", m))?;
        }
        for (k, v) in &s.metadata {
            let key = format!("metadata.{k:?}");
            if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(self.invalid(
                    key,
                    "a metadata key is a non-empty word without spaces or control characters",
                ));
            }
            if cairn_contracts::metadata::is_reserved(k) {
                return Err(self.invalid(
                    key,
                    "is written by the compose itself (or libostree); pick another key, e.g. under `cairn.` or your own prefix",
                ));
            }
            if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
                return Err(self.invalid(key, "contains control characters"));
            }
        }
        let base = match (&s.packages, &s.rootfs) {
            (None, None) => {
                return Err(self.invalid(
                    "packages",
                    "the tree needs a base: a [packages] table or a `rootfs` directory/tarball",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(self.invalid("rootfs", "give either [packages] or `rootfs`, not both"))
            }
            (Some(p), None) => Base::Packages(p.clone()),
            (None, Some(r)) => Base::Rootfs(r.clone()),
        };
        if let Some(p) = &s.packages {
            if p.suite.is_none() {
                return Err(self.invalid("packages.suite", "missing, e.g. suite = \"bookworm\""));
            }
            for (i, line) in p.sources.iter().enumerate() {
                if !line.trim_start().starts_with("deb ") || line.chars().any(char::is_control) {
                    return Err(self.invalid(
                        format!("packages.sources[{i}]"),
                        format!("{line:?} is not a one-line apt source (`deb [options] URI SUITE COMPONENT...`)"),
                    ));
                }
            }
            if let Some(v) = &p.variant {
                const VARIANTS: &[&str] = &[
                    "minbase",
                    "essential",
                    "apt",
                    "required",
                    "important",
                    "standard",
                ];
                if !VARIANTS.contains(&v.as_str()) {
                    return Err(self.invalid(
                        "packages.variant",
                        format!("{v:?} is not one of {}", VARIANTS.join(", ")),
                    ));
                }
            }
            for name in p.install.iter().chain(&p.exclude) {
                if name.is_empty()
                    || name.contains(char::is_whitespace)
                    || name.contains(char::is_control)
                    || name.contains(',')
                    || name.starts_with('-')
                {
                    return Err(self.invalid(
                        "packages.install",
                        format!("{name:?} is not a package name"),
                    ));
                }
            }
        }
        if let Some(root) = &s.rootfs {
            match root.symlink_metadata() {
                Err(_) => {
                    return Err(self.invalid("rootfs", format!("{} does not exist", root.display())))
                }
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.invalid(
                        "rootfs",
                        format!(
                            "{} is a symlink; name the directory or archive itself",
                            root.display()
                        ),
                    ))
                }
                Ok(m) if !m.is_dir() && !m.is_file() => {
                    return Err(self.invalid(
                        "rootfs",
                        format!("{} is neither a directory nor an archive", root.display()),
                    ))
                }
                Ok(_) => {}
            }
        }
        if let Some(dst) = &s.self_install {
            check_tree_path(dst, true).map_err(|m| self.invalid("self-install", m))?;
        }
        let mut files = Vec::new();
        for (i, f) in s.files.iter().enumerate() {
            check_tree_path(&f.dst, true)
                .map_err(|m| self.invalid(format!("files[{i}].dst"), m))?;
            if Path::new(&f.dst).starts_with("/usr/etc") {
                return Err(self.invalid(
                    format!("files[{i}].dst"),
                    format!(
                        "{:?}: write /etc/…; the compose moves /etc to /usr/etc itself",
                        f.dst
                    ),
                ));
            }
            if Path::new(&f.dst).starts_with(Path::new("/").join(TRUSTED_KEYS_DIR)) {
                return Err(self.invalid(
                    format!("files[{i}].dst"),
                    format!(
                        "{:?}: the tree's trusted keys are shipped with `[trust] keys = [\"KEYFILE.asc\"]`",
                        f.dst
                    ),
                ));
            }
            let key = || format!("files[{}].src", f.origin.index);
            let src = crate::confined::open_source(&f.origin.dir, &f.src, f.follow_symlinks)
                .map_err(|e| {
                    self.invalid_at(
                        &f.origin,
                        key(),
                        format!(
                            "{e}; `src` must be a regular file inside the directory of the manifest that names it, \
                             reached without symlinks (set `follow-symlinks = true` on the entry to follow them)"
                        ),
                    )
                })?;
            // Read once, here: the digest and the copy into the tree both
            // come from these bytes.
            let content = read_bounded(src.file).map_err(|e| {
                self.invalid_at(
                    &f.origin,
                    key(),
                    format!("reading {}: {e}", f.src.display()),
                )
            })?;
            files.push(SourceFile {
                src: f.src.clone(),
                dst: f.dst.clone(),
                mode: f.mode,
                src_mode: std::os::unix::fs::MetadataExt::mode(&src.metadata),
                sha256: hex::encode(Sha256::digest(&content)),
                content,
            });
            if let Some(m) = f.mode {
                if m.bits() > 0o7777 {
                    return Err(self.invalid(
                        format!("files[{i}].mode"),
                        format!("{:o} is not a permission mode", m.bits()),
                    ));
                }
            }
        }
        for (i, p) in s.remove_files.iter().enumerate() {
            check_tree_path(p, false).map_err(|m| self.invalid(format!("remove-files[{i}]"), m))?;
        }
        let unit_lists = [
            ("units.enable", &s.units.enable),
            ("units.disable", &s.units.disable),
            ("units.mask", &s.units.mask),
        ];
        for (key, list) in unit_lists {
            for unit in list {
                const KINDS: &[&str] = &[
                    ".service",
                    ".socket",
                    ".timer",
                    ".target",
                    ".path",
                    ".mount",
                    ".slice",
                    ".automount",
                    ".swap",
                    ".netdev",
                    ".network",
                ];
                if check_unit_name(unit).is_err() || !KINDS.iter().any(|k| unit.ends_with(k)) {
                    return Err(self.invalid(key, format!("{unit:?} is not a systemd unit name")));
                }
            }
        }
        for (i, u) in s.users.iter().enumerate() {
            let key = |k: &str| format!("users[{i}].{k}");
            check_account_name(&u.name).map_err(|m| self.invalid(key("name"), m))?;
            for (j, g) in u.groups.iter().enumerate() {
                check_account_name(g)
                    .map_err(|m| self.invalid(format!("users[{i}].groups[{j}]"), m))?;
            }
            if let Some(g) = &u.gecos {
                if g.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
                    return Err(self.invalid(
                        key("gecos"),
                        format!("{g:?}: no quotes, backslashes or control characters"),
                    ));
                }
            }
            for (k, v) in [("home", &u.home), ("shell", &u.shell)] {
                if let Some(v) = v {
                    if !v.starts_with('/')
                        || v.chars()
                            .any(|c| c.is_whitespace() || c.is_control() || "\"'\\".contains(c))
                    {
                        return Err(self.invalid(
                            key(k),
                            format!("{v:?}: an absolute path without spaces, quotes or control characters"),
                        ));
                    }
                }
            }
        }
        for (i, g) in s.groups.iter().enumerate() {
            check_account_name(&g.name)
                .map_err(|m| self.invalid(format!("groups[{i}].name"), m))?;
        }
        for (i, k) in s.kernel_args.iter().enumerate() {
            if k.is_empty() || k.contains(char::is_whitespace) || k.contains(char::is_control) {
                return Err(self.invalid(
                    format!("kernel-args[{i}]"),
                    format!("{k:?}: one argument per entry, without spaces or control characters"),
                ));
            }
        }
        let mut app_names = std::collections::BTreeSet::new();
        for (i, app) in s.apps.iter().enumerate() {
            let key = |k: &str| format!("apps[{i}].{k}");
            let name_ok = !app.name.is_empty()
                && app.name.len() <= 63
                && app.name.as_bytes()[0].is_ascii_alphanumeric()
                && app
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
            if !name_ok {
                return Err(self.invalid(
                    key("name"),
                    format!(
                        "{:?}: 1 to 63 lowercase letters, digits, '_', '.' or '-'",
                        app.name
                    ),
                ));
            }
            if !app_names.insert(app.name.clone()) {
                return Err(self.invalid(key("name"), format!("{:?} is baked twice", app.name)));
            }
            let text = app.image.to_string_lossy();
            if let Some(reference) = text.strip_prefix(REGISTRY_PREFIX) {
                // Marked a reference but not one: say why.
                if let Err(e) = cairn_oci::registry::Reference::parse(reference) {
                    return Err(self.invalid(key("image"), format!("{e:#}")));
                }
            }
            let pinned_by_reference = app.registry.as_ref().and_then(|r| r.digest.as_ref());
            if app.registry.is_none() && !app.image.exists() {
                return Err(self.invalid(
                    key("image"),
                    format!(
                        "{} does not exist (nor is {text:?} a registry reference)",
                        app.image.display()
                    ),
                ));
            }
            let hex = app.digest.strip_prefix("sha256:").unwrap_or_default();
            let digest_ok = hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
            let optional = app.registry.is_some() && app.digest.is_empty();
            if !digest_ok && !optional {
                return Err(self.invalid(
                    key("digest"),
                    format!("{:?} is not a sha256:<64 hex> manifest digest", app.digest),
                ));
            }
            if let Some(d) = pinned_by_reference.filter(|_| !app.digest.is_empty()) {
                if d.to_string() != app.digest {
                    return Err(self.invalid(
                        key("digest"),
                        format!("{} disagrees with the image reference's @{d}", app.digest),
                    ));
                }
            }
            if let Some(r) = &app.restart {
                if !["no", "on-failure", "always"].contains(&r.as_str()) {
                    return Err(self.invalid(
                        key("restart"),
                        format!("{r:?} is not one of no, on-failure, always"),
                    ));
                }
            }
            let strings = app
                .command
                .iter()
                .map(|c| ("command", c))
                .chain(app.env.iter().map(|e| ("env", e)))
                .chain(
                    [
                        ("memory", &app.memory),
                        ("cpus", &app.cpus),
                        ("pids", &app.pids),
                        ("health-cmd", &app.health_cmd),
                        ("health-interval", &app.health_interval),
                    ]
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v.as_ref()?))),
                );
            for (k, v) in strings {
                // They become lines of the app's unit file.
                if v.contains(char::is_control) {
                    return Err(self.invalid(
                        key(k),
                        format!("{v:?} contains control characters (a newline would end the unit's line)"),
                    ));
                }
            }
            if let Some(d) = &app.health_interval {
                // The node reads it with the same grammar (cairn-contracts).
                if let Err(e) = cairn_contracts::duration::parse(d) {
                    return Err(self.invalid(key("health-interval"), format!("{e:#}")));
                }
            }
            for e in &app.env {
                if !e.contains('=') || e.starts_with('=') {
                    return Err(self.invalid(key("env"), format!("{e:?} is not KEY=VALUE")));
                }
            }
            // The grammar of `host app run --service` (cairn-contracts).
            for sv in &app.services {
                if let Err(e) = sv.parse::<cairn_contracts::services::ServicePort>() {
                    return Err(self.invalid(key("services"), format!("{e:#}")));
                }
            }
        }
        let mut scripts = Vec::new();
        for (i, sc) in s.postprocess.iter().enumerate() {
            let key = format!("postprocess[{i}]");
            let name = sc.display_name();
            scripts.push(match (&sc.script, &sc.inline) {
                (Some(p), None) => {
                    let key = || format!("postprocess[{}].script", sc.origin.index);
                    let src = crate::confined::open_source(&sc.origin.dir, p, false).map_err(|e| {
                        self.invalid_at(
                            &sc.origin,
                            key(),
                            format!(
                                "{e}; a script must be a regular file inside the directory of the manifest that names it, reached without symlinks"
                            ),
                        )
                    })?;
                    let body = read_bounded(src.file)
                        .and_then(|bytes| {
                            String::from_utf8(bytes).map_err(|_| {
                                std::io::Error::new(
                                    std::io::ErrorKind::InvalidData,
                                    "not UTF-8 text; save the script as UTF-8",
                                )
                            })
                        })
                        .map_err(|e| {
                            self.invalid_at(&sc.origin, key(), format!("reading {}: {e}", p.display()))
                        })?;
                    PostprocessScript { name, body }
                }
                (None, Some(text)) => PostprocessScript {
                    name,
                    body: text.clone(),
                },
                _ => {
                    return Err(self.invalid(
                        key,
                        "give exactly one of `script` (a file) or `inline` (text)",
                    ))
                }
            });
        }
        let mut trusted_keys: Vec<crate::keys::PublicKey> = Vec::new();
        for (i, (p, dir)) in s.trust.keys.iter().zip(&s.trust.key_dirs).enumerate() {
            let key = format!("trust.keys[{i}]");
            let src = crate::confined::open_source(dir, p, false).map_err(|e| {
                self.invalid(
                    key.clone(),
                    format!(
                        "{e}; a key must be a regular file inside the directory of the manifest that names it, reached without symlinks"
                    ),
                )
            })?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(src.file, MAX_PUBLIC_KEY_BYTES + 1),
                &mut bytes,
            )
            .map_err(|e| self.invalid(key.clone(), format!("reading {}: {e}", p.display())))?;
            let parsed = crate::keys::PublicKey::parse(p, bytes)
                .map_err(|e| self.invalid(key.clone(), format!("{e:#}")))?;
            let [fingerprint] = parsed.fingerprints.as_slice() else {
                return Err(self.invalid(
                    key,
                    format!(
                        "{} holds {} keys ({}): give one key per file",
                        p.display(),
                        parsed.fingerprints.len(),
                        parsed.fingerprints.join(", ")
                    ),
                ));
            };
            if trusted_keys
                .iter()
                .any(|k| k.fingerprints[0] == *fingerprint)
            {
                return Err(self.invalid(key, format!("key {fingerprint} is named twice")));
            }
            trusted_keys.push(parsed);
        }
        let digest = digest(s, &files, &scripts, &trusted_keys);
        let toml = toml::to_string_pretty(s).unwrap_or_else(|e| format!("# unprintable: {e}\n"));
        let s = self.spec;
        Ok(Manifest {
            path: self.path,
            refname,
            version_prefix: s.version_prefix,
            metadata: s.metadata,
            base,
            self_install: s.self_install,
            files,
            remove_files: s.remove_files,
            units: s.units,
            users: s.users,
            groups: s.groups,
            kernel_args: s.kernel_args,
            postprocess: scripts,
            apps: s.apps,
            trusted_keys,
            digest,
            toml,
        })
    }
}

/// [`Manifest::digest`]: the merged manifest as JSON, with each `src` and
/// `script` path replaced by `sha256:<hex>` of the bytes read at load (a
/// script without `name` named by its file name), apps' `image` by their
/// pinned digest and `rootfs` by the word `rootfs` (the base's content is
/// hashed separately, see compose).
fn digest(
    spec: &ManifestFile,
    files: &[SourceFile],
    scripts: &[PostprocessScript],
    keys: &[crate::keys::PublicKey],
) -> String {
    let mut canon = spec.clone();
    canon.include.clear();
    for (p, key) in canon.trust.keys.iter_mut().zip(keys) {
        *p = PathBuf::from(format!(
            "sha256:{}",
            hex::encode(Sha256::digest(&key.armored))
        ));
    }
    for (f, src) in canon.files.iter_mut().zip(files) {
        f.src = PathBuf::from(format!("sha256:{}", src.sha256));
    }
    for (sc, resolved) in canon.postprocess.iter_mut().zip(scripts) {
        if let Some(p) = &sc.script {
            let digest = hex::encode(Sha256::digest(resolved.body.as_bytes()));
            if sc.name.is_none() {
                sc.name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            }
            sc.script = Some(PathBuf::from(format!("sha256:{digest}")));
        }
    }
    for app in &mut canon.apps {
        // A file image is pinned (and verified at compose) by its digest; a
        // registry image means its reference (a tag's digest is in the lock).
        if app.registry.is_none() {
            app.image = PathBuf::from(app.digest.clone());
        }
    }
    if canon.rootfs.is_some() {
        // The base's content is hashed separately (see compose); its location is not meaning.
        canon.rootfs = Some(PathBuf::from("rootfs"));
    }
    let json = serde_json::to_vec(&canon).expect("manifest serializes");
    hex::encode(Sha256::digest(json))
}

/// Reads an opened source whole, refusing more than [`MAX_SOURCE_BYTES`].
fn read_bounded(file: std::fs::File) -> std::io::Result<Vec<u8>> {
    let mut content = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_SOURCE_BYTES + 1),
        &mut content,
    )?;
    if content.len() as u64 > MAX_SOURCE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB; ship it in a package or the rootfs instead",
                MAX_SOURCE_BYTES >> 20
            ),
        ));
    }
    Ok(content)
}
pub(crate) fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The key (`files[2].dst`, `metadata."k"`) of the first string holding a NUL.
fn find_nul(v: &serde_json::Value, key: String) -> Option<String> {
    match v {
        serde_json::Value::String(s) => s.contains('\0').then_some(key),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_nul(v, format!("{key}[{i}]"))),
        serde_json::Value::Object(o) => o.iter().find_map(|(k, v)| {
            let sub = if key.is_empty() {
                k.clone()
            } else if key == "metadata" {
                format!("{key}.{k:?}")
            } else {
                format!("{key}.{k}")
            };
            if k.contains('\0') {
                Some(sub)
            } else {
                find_nul(v, sub)
            }
        }),
        _ => None,
    }
}

/// An OSTree ref as cairn accepts it: parts of ASCII letters, digits, `-`,
/// `_` and `.` separated by single `/`; no part empty, `.`, `..` or starting
/// with `-` or `.` (libostree's grammar, minus what reads as an option or a
/// path trick).
pub fn check_ref(r: &str) -> std::result::Result<(), String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['-', '.'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if r.len() > 255 || !r.split('/').all(part_ok) {
        return Err(format!(
            "{r:?} is not a valid OSTree ref: parts of letters, digits, '-', '_', '.' separated by '/', \
             none empty or starting with '-' or '.'"
        ));
    }
    Ok(())
}

/// A version (or version prefix): 1 to 128 ASCII letters, digits and
/// `.` `_` `+` `~` `-`, starting with a letter or digit. No spaces or control
/// characters: versions are matched and printed word by word.
pub fn check_version(v: &str) -> std::result::Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+~-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a valid version: 1 to 128 letters, digits, '.', '_', '+', '~' or '-', starting with a letter or digit"
        ))
    }
}

/// A systemd unit name (as in a manifest or a tree's `[Install]` section):
/// one file name, no path.
pub fn check_unit_name(unit: &str) -> std::result::Result<(), String> {
    let ok = !unit.is_empty()
        && unit.len() <= 255
        && !unit.starts_with('.')
        && unit
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":_.\\@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("{unit:?} is not a systemd unit name"))
    }
}

/// Destinations must be absolute, normalized, and (for added files) under /usr or /etc:
/// everything else is either per-machine state (/var) or generated at boot.
fn check_tree_path(p: &str, only_usr_etc: bool) -> std::result::Result<(), String> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(format!("{p:?} must be an absolute path"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("{p:?} must not contain `.` or `..`"));
    }
    if path == Path::new("/") {
        return Err("refusing to touch the whole tree `/`".into());
    }
    if only_usr_etc && (path == Path::new("/usr") || path == Path::new("/etc")) {
        return Err(format!(
            "{p:?} is a directory of the tree; name a file below it"
        ));
    }
    if only_usr_etc && !(path.starts_with("/usr") || path.starts_with("/etc")) {
        return Err(format!(
            "{p:?} is outside /usr and /etc: only those are part of the immutable tree (use tmpfiles.d for /var)"
        ));
    }
    Ok(())
}

fn check_account_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 31
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid user or group name"))
    }
}

fn parse_file(text: &str, path: &Path) -> Result<ManifestFile> {
    let mut spec: ManifestFile = toml::from_str(text).map_err(|e| ManifestError::Parse {
        path: path.to_owned(),
        // toml's message already carries the line, a caret and the key.
        message: e.to_string().trim_end().to_string(),
    })?;
    // The same text again, for the lines of the paths errors may point at.
    #[derive(Deserialize)]
    struct PathSpan {
        #[serde(alias = "script")]
        src: Option<toml::Spanned<toml::Value>>,
    }
    #[derive(Deserialize)]
    struct Spans {
        #[serde(default)]
        files: Vec<PathSpan>,
        #[serde(default)]
        postprocess: Vec<PathSpan>,
    }
    let spans: Option<Spans> = toml::from_str(text).ok();
    let line_of = |list: Option<&Vec<PathSpan>>, i: usize| {
        let start = list?.get(i)?.src.as_ref()?.span().start;
        Some(text.get(..start)?.matches('\n').count() + 1)
    };
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    for (i, f) in spec.files.iter_mut().enumerate() {
        f.origin = Origin {
            file: path.to_owned(),
            dir: dir.clone(),
            index: i,
            line: line_of(spans.as_ref().map(|s| &s.files), i),
        };
    }
    spec.trust.key_dirs = vec![dir.clone(); spec.trust.keys.len()];
    for (i, sc) in spec.postprocess.iter_mut().enumerate() {
        sc.origin = Origin {
            file: path.to_owned(),
            dir: dir.clone(),
            index: i,
            line: line_of(spans.as_ref().map(|s| &s.postprocess), i),
        };
    }
    Ok(spec)
}

fn load_merged(path: &Path, stack: &mut Vec<PathBuf>) -> Result<ManifestFile> {
    let canonical = path.canonicalize().map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    if stack.contains(&canonical) {
        return Err(ManifestError::IncludeCycle {
            path: stack.last().cloned().unwrap_or_default(),
            again: canonical,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut spec = parse_file(&text, path)?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    absolutize(&mut spec, dir);
    stack.push(canonical);
    let includes = std::mem::take(&mut spec.include);
    let mut merged = ManifestFile::default();
    for inc in &includes {
        let included = load_merged(inc, stack)?;
        merged = merged.merge_included(included);
    }
    stack.pop();
    Ok(merged.merge_included(spec))
}

/// `[[apps]] image` values with this prefix are registry references
/// whatever files exist (skopeo's transport name).
pub const REGISTRY_PREFIX: &str = "docker://";

/// An app's `image` as a registry reference: marked with
/// [`REGISTRY_PREFIX`], or parsing as one where no file of that name is
/// next to the manifest.
fn registry_reference(image: &Path, dir: &Path) -> Option<cairn_oci::registry::Reference> {
    let text = image.to_str()?;
    if let Some(marked) = text.strip_prefix(REGISTRY_PREFIX) {
        return cairn_oci::registry::Reference::parse(marked).ok();
    }
    if image.is_absolute() || dir.join(image).symlink_metadata().is_ok() {
        return None;
    }
    cairn_oci::registry::Reference::parse(text).ok()
}

fn absolutize(spec: &mut ManifestFile, dir: &Path) {
    let abs = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = dir.join(&*p);
        }
    };
    spec.include.iter_mut().for_each(abs);
    spec.files.iter_mut().for_each(|f| abs(&mut f.src));
    for app in &mut spec.apps {
        let marked = app.image.to_string_lossy().starts_with(REGISTRY_PREFIX);
        match registry_reference(&app.image, dir) {
            Some(r) => app.registry = Some(r),
            // (A marked reference that does not parse is reported as such.)
            None if marked => {}
            None => abs(&mut app.image),
        }
    }
    spec.trust.keys.iter_mut().for_each(abs);
    spec.postprocess
        .iter_mut()
        .filter_map(|s| s.script.as_mut())
        .for_each(abs);
    if let Some(r) = spec.rootfs.as_mut() {
        abs(r)
    }
}

impl ManifestFile {
    /// `self` is what was merged so far (included files); `top` is the
    /// including file, whose scalars win and whose arrays come last.
    fn merge_included(self, top: ManifestFile) -> ManifestFile {
        fn cat<T>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
            a.extend(b);
            a
        }
        let mut metadata = self.metadata;
        metadata.extend(top.metadata);
        let packages = match (self.packages, top.packages) {
            (None, p) | (p, None) => p,
            (Some(a), Some(b)) => Some(Packages {
                suite: b.suite.or(a.suite),
                components: cat(a.components, b.components),
                sources: cat(a.sources, b.sources),
                variant: b.variant.or(a.variant),
                install: cat(a.install, b.install),
                exclude: cat(a.exclude, b.exclude),
                path_exclude: cat(a.path_exclude, b.path_exclude),
            }),
        };
        ManifestFile {
            include: Vec::new(),
            ref_: top.ref_.or(self.ref_),
            version_prefix: top.version_prefix.or(self.version_prefix),
            metadata,
            packages,
            rootfs: top.rootfs.or(self.rootfs),
            self_install: top.self_install.or(self.self_install),
            files: cat(self.files, top.files),
            remove_files: cat(self.remove_files, top.remove_files),
            units: Units {
                enable: cat(self.units.enable, top.units.enable),
                disable: cat(self.units.disable, top.units.disable),
                mask: cat(self.units.mask, top.units.mask),
            },
            users: cat(self.users, top.users),
            groups: cat(self.groups, top.groups),
            kernel_args: cat(self.kernel_args, top.kernel_args),
            postprocess: cat(self.postprocess, top.postprocess),
            apps: cat(self.apps, top.apps),
            trust: Trust {
                keys: cat(self.trust.keys, top.trust.keys),
                key_dirs: cat(self.trust.key_dirs, top.trust.key_dirs),
            },
        }
    }
}
