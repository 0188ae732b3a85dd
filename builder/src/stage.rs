//! The base of a tree: Debian packages installed by mmdebstrap (cached per
//! resolved package set), or a prepared root directory or tarball.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::apt::{self, AptState, PackageSet, SourceLine};
use crate::manifest::Packages;
use crate::progress::Progress;

/// Bump when the way a stage is produced changes, so old cache entries are not reused.
const STAGE_FORMAT: &str = "cairn-stage-v1";

/// What the package step resolved to, before anything is installed.
#[derive(Debug, Clone)]
pub struct ResolvedPackages {
    pub sources: Vec<SourceLine>,
    pub variant: String,
    pub suite: String,
    pub set: PackageSet,
    /// Cache key of the installed stage: everything that changes what mmdebstrap produces.
    pub stage_key: String,
    /// With `--lock`: the locked `.deb`s, verified, as a flat apt
    /// repository mmdebstrap installs from (removed when dropped).
    pub locked: Option<std::rc::Rc<LockedDebs>>,
}

pub fn resolve(packages: &Packages, cache: &Path, progress: &Progress) -> Result<ResolvedPackages> {
    let step = progress.step("resolving packages");
    let sources = apt::sources_for(packages, Path::new("/etc/apt"))?;
    let state = AptState::new(cache, &sources, &packages.exclude)?;
    step.message("apt-get update");
    state.update()?;
    let variant = packages.variant.clone().unwrap_or_else(|| "minbase".into());
    step.message("apt-get install --simulate");
    let set = state.resolve(&variant, &packages.install)?;
    let suite = packages.suite.clone().unwrap_or_default();
    let stage_key = stage_key(packages, &sources, &variant, &suite, &set);
    step.finish(&format!("{} packages", set.0.len()));
    Ok(ResolvedPackages {
        sources,
        variant,
        suite,
        set,
        stage_key,
        locked: None,
    })
}

fn stage_key(
    packages: &Packages,
    sources: &[SourceLine],
    variant: &str,
    suite: &str,
    set: &PackageSet,
) -> String {
    let mut key = Sha256::new();
    key.update(STAGE_FORMAT);
    for line in sources.iter().map(|s| s.0.as_str()).chain([variant, suite]) {
        key.update(line);
        key.update("\n");
    }
    for list in [&packages.install, &packages.exclude, &packages.path_exclude] {
        key.update(list.join(",") + "\n");
    }
    key.update(set.digest());
    hex::encode(key.finalize())
}

/// The `.deb`s of a lock, each checked against its SHA-256, in a flat apt
/// repository (`repo/`, with `Packages` and `Release`) inside a temporary
/// directory of the cache.
#[derive(Debug)]
pub struct LockedDebs {
    dir: tempfile::TempDir,
}

impl LockedDebs {
    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// The `.deb`s, apart from the indices (mmdebstrap seeds apt's archives from it).
    pub fn pool(&self) -> PathBuf {
        self.repo().join("pool")
    }

    /// The apt source of the flat repository (the files are verified, so
    /// apt needs no signature: `trusted=yes`).
    pub fn source_line(&self) -> SourceLine {
        SourceLine(format!(
            "deb [trusted=yes] file:{} ./",
            self.repo().display()
        ))
    }
}

/// The package step of `compose tree --lock`: instead of resolving against
/// the mirror, take exactly the lock's packages (`.deb`s from `debs`, or
/// from the cache, fetched from the lock's sources when missing), verify
/// each against the lock's SHA-256, and check that the manifest's packages
/// resolve to exactly the locked set when only those are available.
pub fn resolve_locked(
    packages: &Packages,
    lock: &crate::lock::Lock,
    debs: Option<&Path>,
    cache: &Path,
    progress: &Progress,
) -> Result<ResolvedPackages> {
    let step = progress.step("taking packages from the lock");
    if lock.packages.is_empty() {
        bail!(
            "the lock lists no package, but the manifest installs packages ([packages]): \
             it is the lock of a rootfs-based tree; compose without --lock, or use the lock of a commit of this manifest"
        );
    }
    let sources: Vec<SourceLine> = lock.sources.iter().map(|s| SourceLine(s.clone())).collect();
    // Left by a killed compose; only ever used under the cache lock.
    let parent = cache.join("locked");
    if let Ok(rd) = std::fs::read_dir(&parent) {
        for e in rd.flatten() {
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("removing leftover {}", e.path().display()))?;
        }
    }
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let locked = LockedDebs {
        dir: tempfile::Builder::new()
            .prefix("lock-")
            .tempdir_in(&parent)
            .with_context(|| format!("creating a directory in {}", parent.display()))?,
    };
    if locked
        .repo()
        .display()
        .to_string()
        .contains(char::is_whitespace)
    {
        bail!(
            "the cache path {} contains whitespace, which an apt source line cannot carry; use another --cache",
            cache.display()
        );
    }
    let repo = locked.repo();
    std::fs::create_dir_all(locked.pool())?;
    let cache_debs = debs_dir(cache);
    if debs.is_none() {
        let missing: Vec<&crate::lock::LockedPackage> = lock
            .packages
            .iter()
            .filter(|p| cache_debs.join(p.file_name()).symlink_metadata().is_err())
            .collect();
        if !missing.is_empty() {
            step.message(&format!(
                "fetching {} locked packages missing from the cache",
                missing.len()
            ));
            fetch_locked(&sources, &packages.exclude, &missing, cache)?;
        }
    }
    step.message("verifying the locked packages");
    for p in &lock.packages {
        let from = debs.unwrap_or(&cache_debs).join(p.file_name());
        copy_verified(&from, &locked.pool().join(p.file_name()), p, debs)?;
    }
    let suite = packages.suite.clone().unwrap_or_default();
    write_flat_index(&repo, &suite)?;
    step.message("resolving the manifest against the locked packages");
    let state = AptState::create(
        locked.dir.path().join("apt"),
        std::slice::from_ref(&locked.source_line()),
        &packages.exclude,
    )?;
    state.update()?;
    let variant = packages.variant.clone().unwrap_or_else(|| "minbase".into());
    let set = state.resolve(&variant, &packages.install).context(
        "the manifest's packages do not resolve with only the lock's packages available: \
         it needs a package (or version) the lock does not list, so the lock belongs to another package set; \
         compose without --lock, or use the lock of a commit of this manifest",
    )?;
    let want = lock.package_set();
    if set != want {
        let unused: Vec<String> = want
            .to_lines()
            .into_iter()
            .filter(|l| !set.to_lines().contains(l))
            .collect();
        bail!(
            "the lock lists packages the manifest does not install: {}; \
             the lock belongs to another package set: use the lock of a commit of this manifest",
            unused.join(", ")
        );
    }
    // The same key as a compose from the mirror that resolved to this set
    // from these sources: the stage is the same.
    let stage_key = stage_key(packages, &sources, &variant, &suite, &want);
    step.finish(&format!("{} packages, all verified", want.0.len()));
    Ok(ResolvedPackages {
        sources,
        variant,
        suite,
        set: want,
        stage_key,
        locked: Some(std::rc::Rc::new(locked)),
    })
}

/// Downloads the locked versions the cache lacks from the lock's sources
/// into `CACHE/debs`, each verified before it lands there.
fn fetch_locked(
    sources: &[SourceLine],
    exclude: &[String],
    missing: &[&crate::lock::LockedPackage],
    cache: &Path,
) -> Result<()> {
    if sources.is_empty() {
        bail!(
            "the lock records no apt sources, and the cache lacks {}: pass the locked .debs with --debs DIR",
            missing[0].file_name()
        );
    }
    // apt-get download runs in the download directory: the state's paths
    // must not be relative to where the compose started.
    let cache = &cache
        .canonicalize()
        .with_context(|| format!("resolving {}", cache.display()))?;
    let state = AptState::new(cache, sources, exclude)?;
    state.update()?;
    let partial = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(cache)
        .context("creating a download directory in the cache")?;
    let out = state
        .command()
        .current_dir(partial.path())
        .args(["-q", "download"])
        .args(missing.iter().map(|p| format!("{}={}", p.name, p.version)))
        .output()
        .context("running apt-get download")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let gone: Vec<String> = missing
        .iter()
        .filter(|p| !partial.path().join(p.file_name()).exists())
        .filter(|p| {
            !out.status.success()
                && (stderr.contains(&format!("'{}'", p.name)) || stderr.is_empty())
        })
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    if !out.status.success() {
        let which = if gone.is_empty() {
            missing
                .iter()
                .map(|p| format!("{}={}", p.name, p.version))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            gone.join(", ")
        };
        bail!(
            "the mirror no longer has the locked {which}: apt-get download said:\n{}\n\
             pass the locked .debs with `--debs DIR` (e.g. a copy of the composing machine's CACHE/debs); \
             each is checked against the lock's sha256",
            apt::tail(&stderr, 10)
        );
    }
    let debs = debs_dir(cache);
    std::fs::create_dir_all(&debs)?;
    for p in missing {
        let got = partial.path().join(p.file_name());
        let sha = crate::manifest::file_sha256(&got).with_context(|| {
            format!(
                "apt-get download gave no {} for {}={}",
                got.display(),
                p.name,
                p.version
            )
        })?;
        if sha != p.sha256 {
            bail!(
                "the mirror's {}={} ({}) has SHA-256 {sha}, the lock records {}: the mirror serves different bytes \
                 under that version; nothing was installed. Pass the locked .debs with --debs DIR",
                p.name,
                p.version,
                p.architecture,
                p.sha256
            );
        }
        std::fs::rename(&got, debs.join(p.file_name()))
            .with_context(|| format!("moving {} into {}", got.display(), debs.display()))?;
    }
    Ok(())
}

/// Copies one `.deb` into the flat repository, hashing what it copies;
/// a symlink, a non-regular file or other bytes than the lock's are refused.
fn copy_verified(
    from: &Path,
    to: &Path,
    p: &crate::lock::LockedPackage,
    debs: Option<&Path>,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let what = format!("{}={} ({})", p.name, p.version, p.architecture);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => bail!(
            "{} is a symlink; refused: put the locked .deb of {what} itself there",
            from.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match debs {
            Some(dir) => bail!(
                "{} has no {} for the locked {what}: add that .deb to the directory",
                dir.display(),
                p.file_name()
            ),
            None => bail!("{} is missing for the locked {what}", from.display()),
        },
        Err(e) => return Err(e).with_context(|| format!("opening {}", from.display())),
    };
    if !file.metadata()?.is_file() {
        bail!(
            "{} is not a regular file; refused: put the locked .deb of {what} there",
            from.display()
        );
    }
    let mut out =
        std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let mut h = Sha256::new();
    let mut reader = std::io::BufReader::new(file);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut reader, &mut buf)
            .with_context(|| format!("reading {}", from.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        std::io::Write::write_all(&mut out, &buf[..n])
            .with_context(|| format!("writing {}", to.display()))?;
    }
    let got = hex::encode(h.finalize());
    if got != p.sha256 {
        bail!(
            "{} has SHA-256 {got}, but the lock records {} for {what}: it is not the locked package, \
             and nothing was installed. {}",
            from.display(),
            p.sha256,
            if debs.is_some() {
                "Put the locked .deb in the --debs directory"
            } else {
                "Remove the file from the cache (it is fetched again) or pass the locked .debs with --debs DIR"
            }
        );
    }
    Ok(())
}

/// `Packages` (dpkg-scanpackages) and a `Release` listing it, so apt reads
/// the flat repository without guessing at compressed indices. The
/// `Suite`/`Codename` are the manifest's: mmdebstrap picks the essential
/// and required packages of that suite (`?archive(^SUITE$)`).
fn write_flat_index(repo: &Path, suite: &str) -> Result<()> {
    let out = Command::new("dpkg-scanpackages")
        .args(["--multiversion", "pool", "/dev/null"])
        .current_dir(repo)
        .stderr(Stdio::piped())
        .output()
        .context("running dpkg-scanpackages (package dpkg-dev; run scripts/setup)")?;
    if !out.status.success() {
        bail!(
            "dpkg-scanpackages in {} failed ({}): {}",
            repo.display(),
            out.status,
            apt::tail(&String::from_utf8_lossy(&out.stderr), 10)
        );
    }
    std::fs::write(repo.join("Packages"), &out.stdout)?;
    let release = format!(
        "Origin: cairn-lock\nLabel: cairn-lock\nSuite: {suite}\nCodename: {suite}\n\
         Date: Thu, 01 Jan 1970 00:00:00 UTC\nSHA256:\n {} {} Packages\n",
        hex::encode(Sha256::digest(&out.stdout)),
        out.stdout.len()
    );
    std::fs::write(repo.join("Release"), release)?;
    Ok(())
}

/// A cached, installed package stage (never modified once published).
pub struct Stage {
    pub rootfs: PathBuf,
    pub installed: PackageSet,
    /// A stage built from a lock is not published to the cache: it is
    /// removed (with this directory) when the stage is dropped.
    _scratch: Option<tempfile::TempDir>,
}

/// Returns the installed stage for `resolved`, running mmdebstrap only when the cache lacks it.
pub fn ensure_stage(
    packages: &Packages,
    resolved: &ResolvedPackages,
    cache: &Path,
    rebuild: bool,
    progress: &Progress,
) -> Result<Stage> {
    let dir = cache.join("stages").join(&resolved.stage_key[..32]);
    let rootfs = dir.join("rootfs");
    let list = dir.join("packages.txt");
    if !rebuild && list.exists() && rootfs.is_dir() {
        progress.note(&format!("    package stage cached: {}", dir.display()));
        return load_stage(rootfs, &list);
    }
    let tmp = cache
        .join("stages")
        .join(format!(".building-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = run_mmdebstrap(packages, resolved, cache, &tmp.join("rootfs"), progress);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if resolved.locked.is_some() {
        // Built from the lock's flat repository: used for this compose only,
        // so a difference to a stage from the mirror never reaches the cache.
        // Kept in CACHE/work, which the next compose sweeps if this one is
        // killed before it removes it.
        let work = cache.join("work");
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let scratch = tempfile::Builder::new()
            .prefix(".locked-")
            .tempdir_in(&work)
            .with_context(|| format!("creating a scratch stage in {}", work.display()))?;
        let kept = scratch.path().join("stage");
        std::fs::rename(&tmp, &kept)
            .with_context(|| format!("moving {} to {}", tmp.display(), kept.display()))?;
        let installed = apt::installed_packages(&kept.join("rootfs/var/lib/dpkg"))?;
        return Ok(Stage {
            rootfs: kept.join("rootfs"),
            installed,
            _scratch: Some(scratch),
        });
    }
    let installed = apt::installed_packages(&tmp.join("rootfs/var/lib/dpkg"))?;
    std::fs::write(
        tmp.join("packages.txt"),
        installed.to_lines().join("\n") + "\n",
    )?;
    // Publish atomically: a stage directory exists only once complete.
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("publishing {}", dir.display()))?;
    load_stage(rootfs, &list)
}

fn load_stage(rootfs: PathBuf, list: &Path) -> Result<Stage> {
    let text =
        std::fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    Ok(Stage {
        rootfs,
        installed: PackageSet::from_lines(&lines),
        _scratch: None,
    })
}

/// Every `.deb` a compose fetched, as apt stored it (`name_version_arch.deb`),
/// kept for later composes and the SBOM's checksums.
pub fn debs_dir(cache: &Path) -> PathBuf {
    cache.join("debs")
}

fn run_mmdebstrap(
    packages: &Packages,
    resolved: &ResolvedPackages,
    cache: &Path,
    target: &Path,
    progress: &Progress,
) -> Result<()> {
    let debs = debs_dir(cache);
    std::fs::create_dir_all(&debs)?;
    let work = target.parent().expect("target has a parent");
    let sources = work.join("sources.list");
    let list: String = resolved
        .sources
        .iter()
        .map(|s| format!("{}\n", s.0))
        .collect();
    // With a lock, apt sees only the flat repository of verified .debs (and
    // finds them already in its archives); the tree gets the lock's sources,
    // as a compose from the mirror writes them.
    let (sync_in, restore) = match &resolved.locked {
        Some(locked) => {
            std::fs::write(&sources, format!("{}\n", locked.source_line().0))?;
            let restore = work.join("sources.restore");
            std::fs::write(&restore, &list)?;
            (locked.pool(), Some(restore))
        }
        None => {
            std::fs::write(&sources, list)?;
            (debs.clone(), None)
        }
    };
    let prefs = work.join("cairn-exclude.pref");
    let mut pref_text = String::new();
    for p in &packages.exclude {
        pref_text.push_str(&format!(
            "Package: {p}\nPin: release *\nPin-Priority: -1\n\n"
        ));
    }
    std::fs::write(&prefs, pref_text)?;

    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--mode=root", "--format=directory"])
        .arg(format!("--variant={}", resolved.variant))
        .arg("--aptopt=Acquire::Languages \"none\"")
        .arg("--aptopt=APT::Install-Recommends \"false\"");
    // With a lock, every locked package is named: the flat repository's
    // priorities are the .debs' own, not the archive's overrides (apt is
    // `important` in its control file, `required` in the archive), so
    // mmdebstrap's `?priority(required)` alone would miss some.
    let mut include = packages.install.clone();
    if resolved.locked.is_some() {
        for name in resolved.set.0.keys() {
            if !include.contains(name) {
                include.push(name.clone());
            }
        }
    }
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    for glob in &packages.path_exclude {
        cmd.arg(format!("--dpkgopt=path-exclude={glob}"));
    }
    // Downloaded .debs are kept across composes: a rebuild never fetches a package twice.
    cmd.arg("--skip=essential/unlink")
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ \"$1\"/etc/apt/preferences.d")
        .arg(format!("--setup-hook=cp {} \"$1\"/etc/apt/preferences.d/cairn-exclude", sh_quote(&prefs)))
        .arg(format!("--setup-hook=sync-in {} /var/cache/apt/archives/", sh_quote(&sync_in)))
        .arg(format!("--customize-hook=sync-out /var/cache/apt/archives {}", sh_quote(&debs)))
        .arg("--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb \"$1\"/etc/apt/preferences.d/cairn-exclude")
        ;
    if let Some(restore) = &restore {
        cmd.arg(format!(
            "--customize-hook=for f in \"$1\"/etc/apt/sources.list.d/0000*.list; do cp {} \"$f\"; done",
            sh_quote(restore)
        ));
    }
    cmd.arg(&resolved.suite)
        .arg(target)
        .arg(&sources)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let step = progress.step("installing packages (mmdebstrap)");
    let mut child = cmd
        .spawn()
        .context("starting mmdebstrap (is it installed? run scripts/setup)")?;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        if line.starts_with("I: ") {
            step.message(line.trim_start_matches("I: "));
        }
        lines.push(line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "mmdebstrap failed ({status}) installing into {}:\n{}",
            target.display(),
            apt::tail(&lines.join("\n"), 25)
        );
    }
    step.finish("");
    Ok(())
}

pub(crate) fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Copies a tree preserving ownership, modes, xattrs and hard links.
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!(
            "copying {} to {} failed ({status})",
            from.display(),
            to.display()
        );
    }
    Ok(())
}

/// Unpacks a base root from a directory or a (compressed) tar archive into `to`.
pub fn unpack_rootfs(base: &Path, to: &Path) -> Result<()> {
    if base.is_dir() {
        return copy_tree(base, to);
    }
    std::fs::create_dir_all(to)?;
    let status = Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(base)
        .arg("-C")
        .arg(to)
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!(
            "unpacking rootfs {} failed ({status}): is it a tar archive?",
            base.display()
        );
    }
    Ok(())
}

/// Content digest of a base root: a tarball's bytes, or a directory's names,
/// modes, owners, link targets and contents in a fixed order.
pub fn rootfs_digest(base: &Path) -> Result<String> {
    if !base.is_dir() {
        return crate::manifest::file_sha256(base)
            .with_context(|| format!("reading {}", base.display()));
    }
    let mut h = Sha256::new();
    for entry in walkdir::WalkDir::new(base).sort_by_file_name() {
        let entry = entry.with_context(|| format!("walking {}", base.display()))?;
        let rel = entry.path().strip_prefix(base).unwrap_or(entry.path());
        let md = entry.path().symlink_metadata()?;
        h.update(format!(
            "{}\0{:o}\0{}\0{}\0",
            rel.display(),
            md.mode(),
            md.uid(),
            md.gid()
        ));
        if md.file_type().is_symlink() {
            h.update(
                std::fs::read_link(entry.path())?
                    .as_os_str()
                    .as_encoded_bytes(),
            );
        } else if md.is_file() {
            let mut f = std::fs::File::open(entry.path())?;
            std::io::copy(&mut f, &mut h)?;
        }
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}
