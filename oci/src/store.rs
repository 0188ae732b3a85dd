//! A node's image store: the repository of imported images and the
//! read-only checkouts containers run from, under one state root (layout in
//! [`cairn_contracts::image`]). The container runtime reads checkouts
//! without libostree; everything that needs the repository — import, list,
//! verify, check out, remove, prune — is here.
//!
//! On a booted node the repository is the host's own, so an image's files
//! are stored once, next to the host's and the baked apps'. Objects there
//! are shared, so images lose their setuid/setgid bits, file capabilities
//! and group/other write bits on the way in (containers run with
//! no_new_privs from a read-only root: those grant nothing there), the
//! objects directory is root's alone (image files keep their owners), and
//! unreferenced objects are left to the host's cleanup, which knows the
//! deployments too.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cairn_contracts::image::{
    baked_images, checkouts_dir, own_repo_dir, remove_checkout, repo_dir, resolve_baked,
    resolve_checked_out, uses_host_repo, write_checkout_record, ImageInfo, InUse, BAKED_APPS_DIR,
};
use gio::prelude::*;

use crate::image::{self, ImportOptions};
use crate::registry::{self, Client, ClientOptions, PullOptions, PullProgress, Reference};

/// What [`Store::pull`] did.
#[derive(Debug)]
pub struct Pulled {
    pub image: ImageInfo,
    /// The digest the reference resolved to (an index's for a
    /// multi-platform image): what to pin.
    pub resolved_digest: String,
    /// Bytes downloaded (0 when the store already had the image).
    pub fetched: u64,
    pub up_to_date: bool,
}

/// What [`Store::prune`] removed.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Checkouts removed: commit checksums, or `.tmp-…` leftovers.
    pub checkouts: Vec<String>,
    pub objects: u64,
    pub bytes: u64,
    /// The repository is the host's: its unreferenced objects are for the
    /// host's cleanup (`host cleanup`) to remove, not counted here.
    pub objects_left_to_host: bool,
}

/// The image store of a state root, and the apps baked into the host tree.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    repo: PathBuf,
    /// The repository is the host's (see the module docs).
    shared: bool,
    baked_apps: PathBuf,
}

impl Store {
    /// The store of state root `root`; its repository is
    /// [`repo_dir`]`(root)`: the host's for a node's default root.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self {
            repo: repo_dir(&root),
            shared: uses_host_repo(&root),
            root,
            baked_apps: BAKED_APPS_DIR.into(),
        }
    }

    /// Keep images in the host repository at `repo` (what [`Store::new`]
    /// does for a node's default state root).
    pub fn with_host_repo(mut self, repo: impl Into<PathBuf>) -> Self {
        self.repo = repo.into();
        self.shared = true;
        self
    }

    /// Whether the images live in the host's repository.
    pub fn uses_host_repo(&self) -> bool {
        self.shared
    }

    /// Baked apps from `dir` instead of the booted tree's.
    pub fn with_baked_apps(mut self, dir: impl Into<PathBuf>) -> Self {
        self.baked_apps = dir.into();
        self
    }

    /// The apps the host tree carries (`cairn-app-NAME:baked`): part of the
    /// host commit, never imported, never removed but by a host update.
    pub fn baked(&self) -> Vec<ImageInfo> {
        baked_images(&self.baked_apps)
    }

    fn has_repo(&self) -> bool {
        self.repo.join("config").exists()
    }

    /// The image repository. A private one is created on first use, and the
    /// state root holding it is kept 0700 (it holds images' setuid files,
    /// see [`image::private_dir`]). The host's is opened as it is, after
    /// moving in the images of the root's private repository, if any.
    pub fn repo(&self) -> Result<ostree::Repo> {
        image::private_dir(&self.root)?;
        if !self.shared {
            return image::open_repo(&self.repo);
        }
        let repo = image::open_host_repo(&self.repo)?;
        cairn_contracts::image::protect_host_repo_objects(&self.repo)?;
        self.move_in_own_repo(&repo)?;
        Ok(repo)
    }

    /// The images of a node whose store had a repository of its own (from
    /// before images moved into the host's) are copied into the host's,
    /// privileges cleared, unless the host's has that name already; then
    /// the old repository goes. Containers keep running from their
    /// checkouts, which stay until nothing uses them (`prune`).
    fn move_in_own_repo(&self, host: &ostree::Repo) -> Result<()> {
        let own = own_repo_dir(&self.root);
        if own == self.repo || !own.join("config").is_file() {
            return Ok(());
        }
        let old = image::open_repo(&own)?;
        let have: HashSet<String> = image::list(host)?
            .into_iter()
            .map(|i| i.ostree_ref)
            .collect();
        for info in image::list(&old)? {
            if have.contains(&info.ostree_ref) {
                continue;
            }
            let commit = image::copy_image(&old, host, &info, true).with_context(|| {
                format!(
                    "moving image {} from {} into the host repository {}",
                    info.reference(),
                    own.display(),
                    self.repo.display()
                )
            })?;
            tracing::info!(
                "image {} moved into {} as commit {commit}",
                info.reference(),
                self.repo.display()
            );
        }
        drop(old);
        std::fs::remove_dir_all(&own).with_context(|| format!("removing {}", own.display()))
    }

    pub fn import(&self, path: &Path, name: Option<&str>) -> Result<ImageInfo> {
        self.import_with(
            path,
            &ImportOptions {
                name: name.map(str::to_string),
                ..Default::default()
            },
        )
    }

    /// [`Store::import`] with a tag and limits.
    pub fn import_with(&self, path: &Path, opts: &ImportOptions) -> Result<ImageInfo> {
        image::import_into(&self.repo()?, path, opts, self.shared)
    }

    /// Pull `reference` from its registry and store it as `name` (default:
    /// the repository's last component and the reference's tag, or
    /// `sha256-<hex>` for a reference by digest alone). Nothing is written
    /// to the store unless every blob matched its digest; the download's
    /// layout is removed whatever happens.
    pub fn pull(
        &self,
        reference: &Reference,
        name: Option<&str>,
        client: &ClientOptions,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<Pulled> {
        let name = match name {
            Some(n) => n.to_string(),
            None => default_name(reference),
        };
        // A bad name fails before anything is downloaded.
        let wanted = cairn_contracts::image::ImageName::parse(&name)?;
        let client = Client::connect(reference, client, progress)?;
        let resolved = registry::resolve(&client, reference, opts, progress)?;
        let repo = self.repo()?;
        let manifest_digest = resolved.manifest_digest.to_string();
        if let Some(have) = image::list(&repo)?
            .into_iter()
            .find(|i| i.name == wanted.name && i.tag == wanted.tag)
            .filter(|i| i.manifest_digest == manifest_digest)
        {
            return Ok(Pulled {
                image: have,
                resolved_digest: resolved.digest.to_string(),
                fetched: 0,
                up_to_date: true,
            });
        }
        let staging = image::staging_dir(&repo)?;
        let layout = staging.path().join("layout");
        let fetched = registry::pull_layout(&client, &resolved, &layout, opts, progress)?;
        let image = image::import_into(
            &repo,
            &layout,
            &ImportOptions {
                name: Some(name),
                tag: None,
                limits: opts.limits.clone(),
            },
            self.shared,
        )
        .with_context(|| format!("importing {reference}"))?;
        Ok(Pulled {
            image,
            resolved_digest: resolved.digest.to_string(),
            fetched,
            up_to_date: false,
        })
    }

    fn refuse_baked(&self, reference: &str, why: &str) -> Result<()> {
        if let Some((info, _)) = resolve_baked(&self.baked_apps, reference) {
            bail!(
                "{} is baked into the host tree, not in the image store: {why}",
                info.reference()
            );
        }
        Ok(())
    }

    pub fn images(&self) -> Result<Vec<ImageInfo>> {
        if !self.has_repo() {
            return Ok(vec![]);
        }
        image::list(&self.repo()?)
    }

    pub fn verify(&self, reference: &str) -> Result<(ImageInfo, usize)> {
        self.refuse_baked(
            reference,
            "its files are the host commit's: `ostree fsck` verifies them",
        )?;
        image::verify(&self.repo()?, reference)
    }

    /// The image and its checkout, made (and recorded for the runtime) if
    /// missing. An image already checked out is found without libostree.
    pub fn checkout(&self, reference: &str) -> Result<(ImageInfo, PathBuf)> {
        if let Some(found) = resolve_baked(&self.baked_apps, reference) {
            return Ok(found);
        }
        let checkouts = checkouts_dir(&self.root);
        if let Some(found) = resolve_checked_out(&self.repo, &checkouts, reference) {
            return Ok(found);
        }
        let repo = self.repo()?;
        let img = image::resolve(&repo, reference)?;
        let checkout = ensure_checkout(&repo, &img.commit, &checkouts)?;
        write_checkout_record(&checkouts, &img)?;
        Ok((img, checkout))
    }

    /// Remove an image; refused while a container uses it.
    pub fn rmi(&self, reference: &str, in_use: &[InUse]) -> Result<ImageInfo> {
        self.refuse_baked(reference, "a host update that drops the app removes it")?;
        let repo = self.repo()?;
        let info = image::resolve(&repo, reference)?;
        if let Some(u) = in_use.iter().find(|u| u.commit == info.commit) {
            bail!(
                "image {} is used by container {}: remove the container first (host app rm)",
                info.reference(),
                u.container
            );
        }
        let removed = image::remove(&repo, &info.reference())?;
        if !self.shared {
            image::prune_objects(&repo)?;
        }
        let still_used = image::list(&repo)?
            .iter()
            .any(|i| i.commit == removed.commit);
        if !still_used {
            remove_checkout(&checkouts_dir(&self.root), &removed.commit)?;
        }
        Ok(removed)
    }

    /// Remove what neither an image tag nor a container uses any more:
    /// checkouts (and their records) of commits a re-import moved a tag away
    /// from, as a baked app's does after every host upgrade or rollback,
    /// leftovers of interrupted checkouts, and the repository objects no tag
    /// reaches. Returns the commits whose checkouts went, and how many
    /// objects and bytes the repository freed.
    pub fn prune(&self, in_use: &[InUse]) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        if !self.has_repo() {
            return Ok(pruned);
        }
        let repo = self.repo()?;
        let mut keep: HashSet<String> = image::list(&repo)?.into_iter().map(|i| i.commit).collect();
        keep.extend(in_use.iter().map(|u| u.commit.clone()));
        let checkouts = checkouts_dir(&self.root);
        let entries = match std::fs::read_dir(&checkouts) {
            Ok(rd) => rd.collect::<std::io::Result<Vec<_>>>()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", checkouts.display())),
        };
        let mut unused = BTreeSet::new();
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(".tmp-") {
                // .tmp-COMMIT-PID: an interrupted checkout, if PID is gone.
                if rest
                    .rsplit_once('-')
                    .is_some_and(|(_, pid)| !Path::new("/proc").join(pid).exists())
                {
                    let path = e.path();
                    std::fs::remove_dir_all(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                    pruned.checkouts.push(name);
                }
                continue;
            }
            // COMMIT (the checkout) or COMMIT.json (its record).
            let commit = name.strip_suffix(".json").unwrap_or(&name);
            if commit.len() == 64
                && commit.bytes().all(|b| b.is_ascii_hexdigit())
                && !keep.contains(commit)
            {
                unused.insert(commit.to_string());
            }
        }
        for commit in unused {
            if remove_checkout(&checkouts, &commit)? {
                pruned.checkouts.push(commit);
            }
        }
        if self.shared {
            pruned.objects_left_to_host = true;
        } else {
            (pruned.objects, pruned.bytes) = image::prune_objects(&repo)?;
        }
        Ok(pruned)
    }
}

/// The store name of a pulled image unless one is given.
fn default_name(reference: &Reference) -> String {
    let tag = match (&reference.tag, &reference.digest) {
        (Some(t), _) => t.clone(),
        (None, Some(d)) => format!("sha256-{}", d.hex()),
        (None, None) => "latest".into(),
    };
    format!("{}:{tag}", reference.short_name())
}

/// A read-only tree of `commit`, shared by every container of that commit:
/// `<dir>/<commit>`, made once (hardlinks into the repository when it can).
pub fn ensure_checkout(repo: &ostree::Repo, commit: &str, dir: &Path) -> Result<PathBuf> {
    // 0700: checkouts share the repository's inodes, setuid files included.
    image::private_dir(dir)?;
    let dest = dir.join(commit);
    if dest.exists() {
        return Ok(dest);
    }
    // Hardlinks only work within one mount: write through the repository's
    // mount when `dir` is the same directory seen through another (on a
    // node, /var is a bind mount of the sysroot that holds /ostree/repo).
    let repo_dir = repo
        .path()
        .path()
        .context("image repository has no local path")?;
    let writable = crate::mounts::alias_in_mount_of(dir, &repo_dir);
    let dir = writable.as_deref().unwrap_or(dir);
    let tmp = dir.join(format!(".tmp-{commit}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Err(e) = repo.checkout_at(
        Some(&image::checkout_options(repo)),
        libc::AT_FDCWD,
        &tmp,
        commit,
        gio::Cancellable::NONE,
    ) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("checking out {commit} into {}", tmp.display()));
    }
    let final_path = dir.join(commit);
    match std::fs::rename(&tmp, &final_path) {
        Ok(()) => Ok(dest),
        // Another process won the race: theirs is as good as ours.
        Err(_) if dest.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dest)
        }
        Err(e) => Err(e).with_context(|| format!("renaming checkout to {}", dest.display())),
    }
}
