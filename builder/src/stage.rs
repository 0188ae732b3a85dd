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
    let mut key = Sha256::new();
    key.update(STAGE_FORMAT);
    for line in sources
        .iter()
        .map(|s| s.0.as_str())
        .chain([variant.as_str(), suite.as_str()])
    {
        key.update(line);
        key.update("\n");
    }
    for list in [&packages.install, &packages.exclude, &packages.path_exclude] {
        key.update(list.join(",") + "\n");
    }
    key.update(set.digest());
    let stage_key = hex::encode(key.finalize());
    step.finish(&format!("{} packages", set.0.len()));
    Ok(ResolvedPackages {
        sources,
        variant,
        suite,
        set,
        stage_key,
    })
}

/// A cached, installed package stage (never modified once published).
pub struct Stage {
    pub rootfs: PathBuf,
    pub installed: PackageSet,
}

/// Returns the installed stage for `resolved`, running mmdebstrap only when the cache lacks it.
pub fn ensure_stage(
    packages: &Packages,
    resolved: &ResolvedPackages,
    cache: &Path,
    progress: &Progress,
) -> Result<Stage> {
    let dir = cache.join("stages").join(&resolved.stage_key[..32]);
    let rootfs = dir.join("rootfs");
    let list = dir.join("packages.txt");
    if list.exists() && rootfs.is_dir() {
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
    std::fs::write(&sources, list)?;
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
    if !packages.install.is_empty() {
        cmd.arg(format!("--include={}", packages.install.join(",")));
    }
    for glob in &packages.path_exclude {
        cmd.arg(format!("--dpkgopt=path-exclude={glob}"));
    }
    // Downloaded .debs are kept across composes: a rebuild never fetches a package twice.
    cmd.arg("--skip=essential/unlink")
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ \"$1\"/etc/apt/preferences.d")
        .arg(format!("--setup-hook=cp {} \"$1\"/etc/apt/preferences.d/cairn-exclude", sh_quote(&prefs)))
        .arg(format!("--setup-hook=sync-in {} /var/cache/apt/archives/", sh_quote(&debs)))
        .arg(format!("--customize-hook=sync-out /var/cache/apt/archives {}", sh_quote(&debs)))
        .arg("--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb \"$1\"/etc/apt/preferences.d/cairn-exclude")
        .arg(&resolved.suite)
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
