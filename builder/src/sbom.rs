//! The SBOM a composed tree carries: an SPDX 2.3 JSON document listing every
//! installed Debian package, written into the tree at
//! [`SBOM_PATH`](cairn_contracts::metadata::SBOM_PATH) and read back from a
//! commit by `host compose sbom`.
//!
//! The document is part of the tree, so it is as reproducible as the tree:
//! `created` is the compose time (`SOURCE_DATE_EPOCH`), packages are sorted,
//! SPDXIDs come from names, and the namespace is the SHA-256 of the rest of
//! the document. Nothing in it names the ref or the version: a promoted
//! commit carries the very same tree.
//!
//! The staged tree is not trusted: the dpkg status file and the copyright
//! files are opened inside it (`openat2` with `RESOLVE_IN_ROOT`, so a
//! symlink cannot lead to the build machine's files), only when they are
//! regular files, with bounded reads, and invalid UTF-8 is tolerated.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use cairn_contracts::metadata::SBOM_PATH;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::confined::Root;

/// A copyright file larger than this is not parsed (license NOASSERTION).
pub const MAX_COPYRIGHT_BYTES: u64 = 1 << 20;
/// The dpkg status file of the tree is read up to this size (a real one is
/// a few MiB for thousands of packages).
pub const MAX_STATUS_BYTES: u64 = 64 << 20;
/// An SBOM larger than this is neither written nor read back.
pub const MAX_SBOM_BYTES: u64 = 32 << 20;
/// A package's license expression longer than this is NOASSERTION: it keeps
/// one package's copyright file from bloating the document.
const MAX_LICENSE_CHARS: usize = 4096;
/// Document namespaces: a URI that is never dereferenced (`.invalid`),
/// unique by the digest appended to it.
const NAMESPACE_BASE: &str = "https://cairn.invalid/spdx/";

/// One installed package as the SBOM lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct DebPackage {
    pub name: String,
    pub arch: String,
    pub version: String,
    /// The `Maintainer` field, the package's supplier.
    pub maintainer: Option<String>,
    /// SPDX license expression from a machine-readable copyright file;
    /// `None` is NOASSERTION.
    pub license: Option<String>,
    /// SHA-256 of the `.deb`, when the compose fetched it.
    pub sha256: Option<String>,
}

/// Where the checksums of the `.deb`s come from: the compose's download
/// cache, then the package indices apt verified them against. Both are
/// empty for a rootfs base.
#[derive(Debug, Clone, Default)]
pub struct ChecksumSources {
    /// `CACHE/debs`: the `.deb`s as apt fetched them.
    pub debs: Option<PathBuf>,
    /// The private apt state's `var/lib/apt/lists` (`*_Packages` indices,
    /// plain or compressed).
    pub lists: Option<PathBuf>,
}

/// Reads the packages of the tree and writes the SBOM into it. Returns the
/// number of packages; a tree with none gets no SBOM (and a file at the
/// SBOM's path that a rootfs base brought along is removed, so no commit
/// carries a document cairn did not write).
pub fn write_into(root: &Root, created: i64, sources: &ChecksumSources) -> Result<usize> {
    let packages = collect(root, sources)?;
    if packages.is_empty() {
        match root.at(SBOM_PATH, false) {
            Ok(at) if at.lstat()?.is_some() => {
                tracing::warn!("/{SBOM_PATH}: the tree lists no installed package, so this file is not cairn's SBOM; removing it");
                at.remove()
                    .with_context(|| format!("removing /{SBOM_PATH} from the tree"))?;
            }
            _ => {}
        }
        return Ok(0);
    }
    let bytes = render(&packages, created)?;
    if bytes.len() as u64 > MAX_SBOM_BYTES {
        bail!(
            "the SBOM of {} packages is {} bytes, over the {MAX_SBOM_BYTES}-byte limit `host compose sbom` reads; \
             this is a bug in cairn, please report it",
            packages.len(),
            bytes.len()
        );
    }
    root.write(SBOM_PATH, &bytes, 0o644)
        .with_context(|| format!("writing the SBOM to /{SBOM_PATH} in the tree"))?;
    Ok(packages.len())
}

/// The installed packages of the tree (before the OSTree layout, so the
/// dpkg database is at `/var/lib/dpkg`) with licenses and checksums.
pub fn collect(root: &Root, sources: &ChecksumSources) -> Result<Vec<DebPackage>> {
    const STATUS: &str = "var/lib/dpkg/status";
    let status = match read_bounded(root, STATUS, MAX_STATUS_BYTES) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => bail!(
            "/{STATUS} in the tree is larger than {MAX_STATUS_BYTES} bytes; \
             the SBOM is not written from it: check what the packages or postprocess scripts put there"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("reading /{STATUS} in the tree for the SBOM"))
        }
    };
    let mut packages = parse_status(&String::from_utf8_lossy(&status));
    for p in &mut packages {
        p.license = license_of(root, &p.name);
    }
    fill_checksums(&mut packages, sources)?;
    Ok(packages)
}

/// The installed packages of a tree with the SHA-256 of their `.deb`s, no
/// licenses: what the lockfile records (from the package stage).
pub fn installed_with_checksums(root: &Root, sources: &ChecksumSources) -> Result<Vec<DebPackage>> {
    const STATUS: &str = "var/lib/dpkg/status";
    let status = match read_bounded(root, STATUS, MAX_STATUS_BYTES) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => bail!("/{STATUS} of the package stage is larger than {MAX_STATUS_BYTES} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading /{STATUS} of the package stage")),
    };
    let mut packages = parse_status(&String::from_utf8_lossy(&status));
    fill_checksums(&mut packages, sources)?;
    Ok(packages)
}

/// The `.deb` checksums: from `CACHE/debs`, then from the apt indices.
fn fill_checksums(packages: &mut [DebPackage], sources: &ChecksumSources) -> Result<()> {
    if let Some(debs) = &sources.debs {
        for p in packages.iter_mut() {
            p.sha256 = deb_sha256(debs, p)?;
        }
    }
    if let Some(lists) = &sources.lists {
        let wanted: HashSet<(String, String, String)> = packages
            .iter()
            .filter(|p| p.sha256.is_none())
            .map(|p| (p.name.clone(), p.version.clone(), p.arch.clone()))
            .collect();
        if !wanted.is_empty() {
            let found = index_sha256(lists, &wanted)?;
            for p in packages.iter_mut().filter(|p| p.sha256.is_none()) {
                p.sha256 = found
                    .get(&(p.name.clone(), p.version.clone(), p.arch.clone()))
                    .cloned();
            }
        }
    }
    Ok(())
}

/// A regular file of the tree, at most `max` bytes (`Ok(None)` if larger).
fn read_bounded(root: &Root, path: &str, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let file = root.open_regular(path)?;
    if file.metadata()?.len() > max {
        return Ok(None);
    }
    let mut buf = Vec::new();
    file.take(max + 1).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= max).then_some(buf))
}

/// Debian's package name grammar: the only names used to build a path.
pub(crate) fn name_ok(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

pub(crate) fn version_ok(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 256
        && v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c))
}

pub(crate) fn arch_ok(a: &str) -> bool {
    !a.is_empty() && a.len() <= 64 && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The license of `name` from `/usr/share/doc/NAME/copyright`, if that is a
/// machine-readable (DEP-5) file no larger than [`MAX_COPYRIGHT_BYTES`].
fn license_of(root: &Root, name: &str) -> Option<String> {
    if !name_ok(name) {
        return None;
    }
    let path = format!("usr/share/doc/{name}/copyright");
    match read_bounded(root, &path, MAX_COPYRIGHT_BYTES) {
        Ok(Some(bytes)) => dep5_license(&String::from_utf8_lossy(&bytes)),
        Ok(None) => {
            tracing::info!("/{path} is larger than {MAX_COPYRIGHT_BYTES} bytes; its license is NOASSERTION in the SBOM");
            None
        }
        Err(_) => None,
    }
}

/// `name_version_arch.deb` as apt stores it in its archives (and so in
/// `CACHE/debs`): `_`, `:`, `%` and unprintable bytes as `%xx` (apt's QuoteString).
pub(crate) fn archive_file_name(name: &str, version: &str, arch: &str) -> String {
    fn quote(s: &str) -> String {
        let mut out = String::new();
        for b in s.bytes() {
            if b"_:%".contains(&b) || b <= 0x20 || b >= 0x7f {
                out.push_str(&format!("%{b:02x}"));
            } else {
                out.push(b as char);
            }
        }
        out
    }
    format!("{}_{}_{}.deb", quote(name), quote(version), quote(arch))
}

/// SHA-256 of the package's `.deb` in the download cache, if it is there.
fn deb_sha256(debs: &Path, p: &DebPackage) -> Result<Option<String>> {
    if !(name_ok(&p.name) && version_ok(&p.version) && arch_ok(&p.arch)) {
        return Ok(None);
    }
    let path = debs.join(archive_file_name(&p.name, &p.version, &p.arch));
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut h = Sha256::new();
    std::io::copy(&mut std::io::BufReader::new(file), &mut h)
        .with_context(|| format!("reading {} for the SBOM", path.display()))?;
    Ok(Some(hex::encode(h.finalize())))
}

type PackageKey = (String, String, String);

/// Where apt's `cat-file` lives: it reads an index in whatever compression
/// apt stored it (`Acquire::GzipIndexes`, lz4 by default then).
const APT_HELPER: &str = "/usr/lib/apt/apt-helper";

/// SHA-256 of the wanted (name, version, arch) from the `*_Packages`
/// indices in `lists` (read in name order; the first wins). Compressed ones
/// are read through `apt-helper cat-file`.
fn index_sha256(lists: &Path, wanted: &HashSet<PackageKey>) -> Result<HashMap<PackageKey, String>> {
    let mut found = HashMap::new();
    let Ok(rd) = std::fs::read_dir(lists) else {
        return Ok(found);
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.ends_with("_Packages")
                    || n.rsplit_once('.')
                        .is_some_and(|(stem, _)| stem.ends_with("_Packages"))
            })
        })
        .collect();
    files.sort();
    for f in files {
        let plain = f.to_string_lossy().ends_with("_Packages");
        if plain {
            let file = std::fs::File::open(&f)
                .with_context(|| format!("opening the package index {}", f.display()))?;
            index_entries(std::io::BufReader::new(file), wanted, &mut found)
                .with_context(|| format!("reading the package index {}", f.display()))?;
            continue;
        }
        let mut child = std::process::Command::new(APT_HELPER)
            .arg("cat-file")
            .arg(&f)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "running {APT_HELPER} cat-file {} (is apt installed?)",
                    f.display()
                )
            })?;
        let stdout = child.stdout.take().expect("piped");
        let read = index_entries(std::io::BufReader::new(stdout), wanted, &mut found);
        let status = child.wait()?;
        read.with_context(|| format!("reading the package index {}", f.display()))?;
        if !status.success() {
            bail!(
                "{APT_HELPER} cat-file {} failed ({status}): the index is damaged; \
                 remove it and compose again (apt fetches it anew)",
                f.display()
            );
        }
    }
    Ok(found)
}

/// The wanted entries of one `Packages` index.
fn index_entries(
    input: impl BufRead,
    wanted: &HashSet<PackageKey>,
    found: &mut HashMap<PackageKey, String>,
) -> std::io::Result<()> {
    let mut fields: HashMap<String, String> = HashMap::new();
    let mut take = |fields: &mut HashMap<String, String>| {
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        let key = (get("package"), get("version"), get("architecture"));
        let sha = get("sha256");
        if sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()) && wanted.contains(&key) {
            found.entry(key).or_insert(sha.to_ascii_lowercase());
        }
        fields.clear();
    };
    for line in input.split(b'\n') {
        let line = line?;
        let line = String::from_utf8_lossy(&line);
        if line.trim().is_empty() {
            take(&mut fields);
        } else if let Some((k, v)) = line.split_once(':') {
            let k = k.to_ascii_lowercase();
            if matches!(
                k.as_str(),
                "package" | "version" | "architecture" | "sha256"
            ) {
                fields.insert(k, v.trim().to_string());
            }
        }
    }
    take(&mut fields);
    Ok(())
}

/// deb822 paragraphs: field names lowercased, continuation lines joined
/// with `\n`, `#` comment lines skipped, lines that are neither ignored.
fn paragraphs(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut cur: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            last = None;
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = last.as_ref().and_then(|k| cur.get_mut(k)) {
                v.push('\n');
                v.push_str(line.trim());
            }
            continue;
        }
        match line.split_once(':') {
            Some((k, v))
                if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') =>
            {
                let k = k.to_ascii_lowercase();
                cur.entry(k.clone()).or_insert_with(|| v.trim().to_string());
                last = Some(k);
            }
            _ => last = None,
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The installed packages of a dpkg status file (status `installed`, of
/// whatever selection), sorted by name, architecture and version; a
/// (name, architecture) listed twice counts once.
pub fn parse_status(text: &str) -> Vec<DebPackage> {
    let mut out: BTreeMap<(String, String), DebPackage> = BTreeMap::new();
    for p in paragraphs(text) {
        let installed = p
            .get("status")
            .is_some_and(|s| s.split_whitespace().nth(2) == Some("installed"));
        let (Some(name), Some(version)) = (p.get("package"), p.get("version")) else {
            continue;
        };
        if !installed || name.is_empty() {
            continue;
        }
        let arch = p.get("architecture").cloned().unwrap_or_default();
        out.entry((name.clone(), arch.clone()))
            .or_insert_with(|| DebPackage {
                name: name.clone(),
                arch,
                version: version.clone(),
                maintainer: p.get("maintainer").cloned(),
                ..Default::default()
            });
    }
    out.into_values().collect()
}

/// The license of a machine-readable copyright file (DEP-5: a header
/// paragraph with `Format:`) as an SPDX expression: the `License:` of the
/// header and of every `Files:` paragraph, deduplicated, joined with AND
/// (the package holds files under each). `None` for any other file.
pub fn dep5_license(text: &str) -> Option<String> {
    let paras = paragraphs(text);
    let header = paras.first()?;
    if !header.get("format").is_some_and(|f| !f.trim().is_empty()) {
        return None;
    }
    let mut exprs = BTreeSet::new();
    for (i, p) in paras.iter().enumerate() {
        if i > 0 && !p.contains_key("files") {
            continue; // a stand-alone License paragraph: the text of a name used above
        }
        let Some(first) = p.get("license").and_then(|l| l.lines().next()) else {
            continue;
        };
        if let Some(e) = dep5_expression(first) {
            exprs.insert(e);
        }
    }
    let compound = exprs.len() > 1;
    let joined = exprs
        .into_iter()
        .map(|e| {
            if compound && e.contains(' ') {
                format!("({e})")
            } else {
                e
            }
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    (!joined.is_empty() && joined.len() <= MAX_LICENSE_CHARS).then_some(joined)
}

/// One DEP-5 license line (`GPL-2+ or Artistic, and BSD-3-clause`) as an
/// SPDX expression. Commas group (DEP-5's rule); within a group `and`/`or`
/// become AND/OR with SPDX's precedence; `with … exception` terms have no
/// SPDX exception id in general and become one LicenseRef.
fn dep5_expression(line: &str) -> Option<String> {
    let mut groups: Vec<(Option<&str>, String, bool)> = Vec::new();
    for (i, seg) in line.split(',').enumerate() {
        let mut words: Vec<&str> = seg.split_whitespace().collect();
        let mut conn = None;
        if i > 0 {
            match words.first().map(|w| w.to_ascii_lowercase()) {
                Some(w) if w == "and" || w == "or" => {
                    conn = Some(if w == "and" { "AND" } else { "OR" });
                    words.remove(0);
                }
                _ => conn = Some("AND"),
            }
        }
        // Terms between operators; words that follow each other without one
        // are one name (`public domain`), `with` and its words join the term.
        let mut parts: Vec<String> = Vec::new();
        let mut term: Vec<&str> = Vec::new();
        let mut op: Option<&str> = None;
        fn flush(term: &mut Vec<&str>, op: Option<&str>, parts: &mut Vec<String>) {
            if term.is_empty() {
                return;
            }
            if !parts.is_empty() {
                parts.push(op.unwrap_or("AND").to_string());
            }
            parts.push(map_license(term));
            term.clear();
        }
        for w in words {
            match w.to_ascii_lowercase().as_str() {
                "and" | "or" if !term.is_empty() => {
                    flush(&mut term, op, &mut parts);
                    op = Some(if w.eq_ignore_ascii_case("and") {
                        "AND"
                    } else {
                        "OR"
                    });
                }
                "and" | "or" if term.is_empty() => {}
                _ => term.push(if w.eq_ignore_ascii_case("with") {
                    "with"
                } else {
                    w
                }),
            }
        }
        flush(&mut term, op, &mut parts);
        if parts.is_empty() {
            continue;
        }
        let compound = parts.len() > 1;
        groups.push((conn, parts.join(" "), compound));
    }
    let many = groups.len() > 1;
    let mut out = String::new();
    for (i, (conn, expr, compound)) in groups.into_iter().enumerate() {
        if i > 0 {
            out.push_str(&format!(" {} ", conn.unwrap_or("AND")));
        }
        if many && compound {
            out.push_str(&format!("({expr})"));
        } else {
            out.push_str(&expr);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// DEP-5 short names (lowercase, without `+`) that are SPDX ids under
/// another spelling or as is. GNU licenses are handled by [`gnu_license`].
const KNOWN: &[(&str, &str)] = &[
    ("0bsd", "0BSD"),
    ("apache-1.0", "Apache-1.0"),
    ("apache-1.1", "Apache-1.1"),
    ("apache-2", "Apache-2.0"),
    ("apache-2.0", "Apache-2.0"),
    // Debian's common-licenses/Artistic is Perl's.
    ("artistic", "Artistic-1.0-Perl"),
    ("artistic-1.0", "Artistic-1.0"),
    ("artistic-2.0", "Artistic-2.0"),
    ("boost-1.0", "BSL-1.0"),
    ("bsd-2-clause", "BSD-2-Clause"),
    ("bsd-3-clause", "BSD-3-Clause"),
    ("bsd-4-clause", "BSD-4-Clause"),
    ("bsl-1.0", "BSL-1.0"),
    ("bzip2-1.0.6", "bzip2-1.0.6"),
    ("cc-by-3.0", "CC-BY-3.0"),
    ("cc-by-4.0", "CC-BY-4.0"),
    ("cc-by-sa-3.0", "CC-BY-SA-3.0"),
    ("cc-by-sa-4.0", "CC-BY-SA-4.0"),
    ("cc0", "CC0-1.0"),
    ("cc0-1.0", "CC0-1.0"),
    ("cddl-1.0", "CDDL-1.0"),
    ("curl", "curl"),
    ("epl-1.0", "EPL-1.0"),
    ("epl-2.0", "EPL-2.0"),
    ("expat", "MIT"),
    ("ftl", "FTL"),
    ("ijg", "IJG"),
    ("isc", "ISC"),
    ("libpng", "Libpng"),
    ("libpng-2.0", "libpng-2.0"),
    ("lppl-1.3c", "LPPL-1.3c"),
    ("mit", "MIT"),
    ("mpl-1.0", "MPL-1.0"),
    ("mpl-1.1", "MPL-1.1"),
    ("mpl-2.0", "MPL-2.0"),
    ("ncsa", "NCSA"),
    ("ofl-1.1", "OFL-1.1"),
    ("openssl", "OpenSSL"),
    ("perl", "(Artistic-1.0-Perl OR GPL-1.0-or-later)"),
    ("psf-2.0", "PSF-2.0"),
    ("python-2.0", "Python-2.0"),
    ("sleepycat", "Sleepycat"),
    ("unicode-dfs-2016", "Unicode-DFS-2016"),
    ("unlicense", "Unlicense"),
    ("w3c", "W3C"),
    ("wtfpl", "WTFPL"),
    ("x11", "X11"),
    ("zlib", "Zlib"),
    ("zpl-2.1", "ZPL-2.1"),
];

/// One term (the words of one license name, maybe with `with …`) as an
/// SPDX license id, or a LicenseRef for names SPDX has no id for.
fn map_license(words: &[&str]) -> String {
    if words.len() == 1 {
        let term = words[0];
        let (base, plus) = match term.strip_suffix('+') {
            Some(b) => (b, true),
            None => (term, false),
        };
        let lower = base.to_ascii_lowercase();
        if let Some(id) = gnu_license(&lower, plus) {
            return id;
        }
        if let Some((_, id)) = KNOWN.iter().find(|(k, _)| *k == lower) {
            // `+` is SPDX's "or later" too, but not after a compound.
            return if plus && !id.starts_with('(') {
                format!("{id}+")
            } else {
                (*id).to_string()
            };
        }
    }
    license_ref(&words.join("-"))
}

/// GPL, LGPL, AGPL and GFDL (also `GFDL-NIV`, and names already in SPDX's
/// `-only`/`-or-later` form) with a version SPDX knows.
fn gnu_license(lower: &str, plus: bool) -> Option<String> {
    let (lower, plus) = match lower.strip_suffix("-or-later") {
        Some(rest) => (rest, true),
        None => (lower.strip_suffix("-only").unwrap_or(lower), plus),
    };
    let (family, version) = lower.rsplit_once('-')?;
    let version = if version.contains('.') {
        version.to_string()
    } else {
        format!("{version}.0")
    };
    let (id, versions, niv): (&str, &[&str], bool) = match family {
        "gpl" => ("GPL", &["1.0", "2.0", "3.0"], false),
        "lgpl" => ("LGPL", &["2.0", "2.1", "3.0"], false),
        "agpl" => ("AGPL", &["1.0", "3.0"], false),
        "gfdl" => ("GFDL", &["1.1", "1.2", "1.3"], false),
        "gfdl-niv" => ("GFDL", &["1.1", "1.2", "1.3"], true),
        _ => return None,
    };
    if !versions.contains(&version.as_str()) {
        return None;
    }
    let niv = if niv { "-no-invariants" } else { "" };
    let range = if plus { "or-later" } else { "only" };
    Some(format!("{id}-{version}{niv}-{range}"))
}

/// `LicenseRef-NAME`: SPDX allows letters, digits, `.` and `-` in it.
fn license_ref(name: &str) -> String {
    let mut id = String::from("LicenseRef-");
    for c in name.chars().take(64) {
        match c {
            c if c.is_ascii_alphanumeric() || c == '.' || c == '-' => id.push(c),
            '+' => id.push_str("-plus"),
            _ => id.push('-'),
        }
    }
    id
}

/// `Name <email>` as an SPDX supplier; teams are organizations.
fn supplier(maintainer: &str) -> Option<String> {
    let clean: String = maintainer
        .chars()
        .filter(|c| !c.is_control())
        .take(256)
        .collect();
    let (name, email) = match clean.split_once('<') {
        Some((n, rest)) => (n.trim(), rest.split('>').next().map(str::trim)),
        None => (clean.trim(), None),
    };
    if name.is_empty() {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    let kind = if ["maintainers", "team", "group", "project", "developers"]
        .iter()
        .any(|w| lower.contains(w))
    {
        "Organization"
    } else {
        "Person"
    };
    Some(match email.filter(|e| !e.is_empty()) {
        Some(e) => format!("{kind}: {name} ({e})"),
        None => format!("{kind}: {name}"),
    })
}

/// Percent-encoding for a purl component: everything but unreserved characters.
fn purl_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn purl(p: &DebPackage) -> String {
    let mut s = format!(
        "pkg:deb/debian/{}@{}",
        purl_encode(&p.name),
        purl_encode(&p.version)
    );
    if !p.arch.is_empty() {
        s.push_str(&format!("?arch={}", purl_encode(&p.arch)));
    }
    s
}

/// `SPDXRef-Package-deb-NAME-ARCH`, made of the characters SPDX allows;
/// unique within the document (a suffix in package order otherwise).
fn spdx_id(p: &DebPackage, taken: &mut HashSet<String>) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .take(128)
            .map(|c| match c {
                c if c.is_ascii_alphanumeric() || c == '.' || c == '-' => c.to_string(),
                '+' => "plus".to_string(),
                _ => "-".to_string(),
            })
            .collect()
    };
    let base = format!("SPDXRef-Package-deb-{}-{}", clean(&p.name), clean(&p.arch));
    let mut id = base.clone();
    let mut n = 2;
    while !taken.insert(id.clone()) {
        id = format!("{base}-{n}");
        n += 1;
    }
    id
}

/// The SPDX 2.3 document of `packages` (in any order) at time `created`
/// (seconds since the epoch).
pub fn document(packages: &[DebPackage], created: i64) -> Value {
    let mut sorted = packages.to_vec();
    sorted.sort();
    let created = chrono::DateTime::from_timestamp(created, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let mut taken = HashSet::new();
    let mut refs = BTreeSet::new();
    let mut out_packages = Vec::new();
    let mut relationships = Vec::new();
    for p in &sorted {
        let id = spdx_id(p, &mut taken);
        let license = p.license.clone().unwrap_or_else(|| "NOASSERTION".into());
        for word in license.split([' ', '(', ')']) {
            if word.starts_with("LicenseRef-") {
                refs.insert(word.to_string());
            }
        }
        let mut o = Map::new();
        o.insert("SPDXID".into(), json!(id));
        o.insert("name".into(), json!(p.name));
        o.insert("versionInfo".into(), json!(p.version));
        if let Some(s) = p.maintainer.as_deref().and_then(supplier) {
            o.insert("supplier".into(), json!(s));
        }
        o.insert("downloadLocation".into(), json!("NOASSERTION"));
        // Package-level facts only: no file list, so no verification code.
        o.insert("filesAnalyzed".into(), json!(false));
        // Declared is what the copyright file says; concluding is a review
        // cairn does not do.
        o.insert("licenseConcluded".into(), json!("NOASSERTION"));
        o.insert("licenseDeclared".into(), json!(license));
        o.insert("copyrightText".into(), json!("NOASSERTION"));
        match &p.sha256 {
            Some(sha) => {
                o.insert(
                    "checksums".into(),
                    json!([{"algorithm": "SHA256", "checksumValue": sha}]),
                );
            }
            None => {
                o.insert(
                    "comment".into(),
                    json!("no checksum: the compose did not fetch this package's .deb (a rootfs base, or installed by a postprocess script)"),
                );
            }
        }
        o.insert(
            "externalRefs".into(),
            json!([{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl(p),
            }]),
        );
        out_packages.push(Value::Object(o));
        relationships.push(json!({
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": id,
        }));
    }
    let mut doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": "cairn host tree",
        "documentNamespace": "",
        "creationInfo": {
            "created": created,
            "creators": [format!("Tool: cairn-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": out_packages,
        "relationships": relationships,
    });
    if !refs.is_empty() {
        let infos: Vec<Value> = refs
            .into_iter()
            .map(|id| {
                let name = id.trim_start_matches("LicenseRef-").to_string();
                json!({
                    "licenseId": id,
                    "name": name,
                    "extractedText": format!("The license named {name} in Debian machine-readable copyright files; its text is in /usr/share/doc/PACKAGE/copyright of each package that declares it."),
                })
            })
            .collect();
        doc["hasExtractedLicensingInfos"] = Value::Array(infos);
    }
    // Derived from everything else in the document: the same packages at the
    // same time give the same namespace, anything else another.
    let digest = Sha256::digest(serde_json::to_vec(&doc).expect("a JSON value serializes"));
    doc["documentNamespace"] = json!(format!("{NAMESPACE_BASE}{}", hex::encode(digest)));
    doc
}

/// The document's bytes as written into the tree: pretty JSON and a newline.
pub fn render(packages: &[DebPackage], created: i64) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(&document(packages, created))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The SBOM of a commit (`rev`: a ref, a version or a checksum, as
/// `compose diff` resolves them), read from its tree through libostree.
/// Returns the commit checksum and the document's bytes.
pub fn read_from_commit(repo: &ostree::Repo, rev: &str) -> Result<(String, Vec<u8>)> {
    use gio::prelude::*;
    use ostree::gio;
    let checksum = crate::repo::resolve_commit(repo, rev)?;
    let (root, _) = repo
        .read_commit(&checksum, gio::Cancellable::NONE)
        .with_context(|| format!("reading the tree of commit {checksum} (is it fully pulled?)"))?;
    let file = root.resolve_relative_path(SBOM_PATH);
    let info = match file.query_info(
        "standard::type,standard::size",
        gio::FileQueryInfoFlags::NOFOLLOW_SYMLINKS,
        gio::Cancellable::NONE,
    ) {
        Ok(info) => info,
        Err(e) if e.matches(gio::IOErrorEnum::NotFound) => bail!(
            "commit {checksum} ({rev}) has no SBOM at /{SBOM_PATH}: its tree lists no installed \
             Debian package (a rootfs base without a dpkg database), or it was composed before \
             cairn wrote SBOMs; compose it again to get one"
        ),
        Err(e) => {
            return Err(anyhow!(e)).with_context(|| {
                format!("looking up /{SBOM_PATH} in commit {checksum} (is it fully pulled?)")
            })
        }
    };
    if info.file_type() != gio::FileType::Regular {
        bail!("/{SBOM_PATH} in commit {checksum} is not a regular file, so it is not an SBOM cairn wrote");
    }
    if u64::try_from(info.size()).unwrap_or(u64::MAX) > MAX_SBOM_BYTES {
        bail!(
            "/{SBOM_PATH} in commit {checksum} is {} bytes, over the {MAX_SBOM_BYTES}-byte limit; \
             read it with `ostree cat` if you trust it",
            info.size()
        );
    }
    // The content object itself: a repo file's `read()` is not the
    // GFileInputStream the gio binding expects.
    let object = file
        .downcast_ref::<ostree::RepoFile>()
        .map(|f| f.checksum().to_string())
        .ok_or_else(|| anyhow!("libostree returned a non-repo file for /{SBOM_PATH}"))?;
    let (stream, _, _) = repo
        .load_file(&object, gio::Cancellable::NONE)
        .with_context(|| format!("opening /{SBOM_PATH} in commit {checksum} (object {object})"))?;
    let stream = stream.ok_or_else(|| {
        anyhow!("/{SBOM_PATH} in commit {checksum} has no content (object {object})")
    })?;
    let mut bytes = Vec::new();
    stream
        .into_read()
        .take(MAX_SBOM_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading /{SBOM_PATH} in commit {checksum}"))?;
    if bytes.len() as u64 > MAX_SBOM_BYTES {
        bail!("/{SBOM_PATH} in commit {checksum} is over the {MAX_SBOM_BYTES}-byte limit");
    }
    Ok((checksum, bytes))
}

#[cfg(test)]
mod tests;
