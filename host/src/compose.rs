//! `host compose …`: the CI side, over `cairn_builder`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_builder::compose::{compose_tree, ComposeOptions, Outcome};
use cairn_builder::keys::Signer;
use cairn_builder::manifest::Manifest;
use cairn_builder::progress::Progress;
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ComposeCommand {
    /// Compose a host tree from a TOML manifest and commit it to an OSTree repository.
    ///
    /// Prints the new commit's checksum and version. The ref moves only once the
    /// commit is complete; on any error the repository is left as it was.
    Tree(TreeArgs),

    /// Commit a directory that is already in the OSTree layout, as is.
    ///
    /// For trees prepared by other tools; `compose tree` lays a root out itself.
    Commit(CommitArgs),

    /// Promote a tested commit from one channel (ref) to another, without rebuilding.
    ///
    /// The new commit on --to has the same tree (content checksum) and metadata
    /// as COMMIT, its own version, and its parent on --to.
    Promote(PromoteArgs),

    /// Show the package and file differences between two commits.
    ///
    /// FROM and TO are refs, versions or commit checksums.
    Diff(DiffArgs),

    /// Print the SBOM of a commit: the SPDX 2.3 JSON document of its packages.
    ///
    /// REF is a ref, version or commit checksum. The document is read from the
    /// commit's tree (/usr/share/cairn/sbom.spdx.json); trees without installed
    /// Debian packages carry none.
    Sbom(SbomArgs),

    /// Print the lockfile a commit recorded: its exact inputs.
    ///
    /// Every package's name, version, architecture and .deb sha256, the
    /// manifest and composing `host` digests, SOURCE_DATE_EPOCH and the apt
    /// sources, as TOML. `compose tree --lock FILE` composes exactly it.
    Lock(LockArgs),

    /// Re-compose a commit from its recorded inputs and compare the trees.
    ///
    /// Composes MANIFEST with the commit's lock, SOURCE_DATE_EPOCH and
    /// version into a scratch repository (removed afterwards) and prints
    /// `identical <content checksum>` (exit 0) or the differing paths (exit 1).
    Verify(VerifyArgs),

    /// Write a bootable disk image of a composed commit.
    Image(crate::compose_image::ImageArgs),

    /// Prepare a repository for serving: a static delta from the previous
    /// commit of each ref to its head, then a fresh (optionally signed) summary.
    Publish(crate::node::PublishArgs),

    /// Make a release signing key pair for composes and the images that trust them.
    ///
    /// Prints the key's fingerprint and the public key file. Sign with
    /// `--gpg-homedir DIR` (or CAIRN_GPG_HOMEDIR=DIR); give nodes the public
    /// key with `host compose image --trust DIR/cairn-release.asc`.
    Keygen(KeygenArgs),
}

/// Where composes write by default: `build/` under the current directory
/// (the checkout, when run as the README says).
fn default_repo() -> PathBuf {
    PathBuf::from("build/repo")
}

#[derive(Debug, Args)]
pub struct TreeArgs {
    /// The manifest (TOML) describing the tree.
    pub manifest: PathBuf,

    /// OSTree repository to commit to; created as an `archive` repo if missing.
    #[arg(long, env = "CAIRN_REPO", default_value_os_t = default_repo())]
    pub repo: PathBuf,

    /// Cache of downloaded packages, apt indices and installed package stages.
    #[arg(long, env = "CAIRN_CACHE", default_value = "build/cache")]
    pub cache: PathBuf,

    /// Version for this commit instead of the automatic `<prefix>.<date>.<serial>`.
    #[arg(long)]
    pub version: Option<String>,

    /// Print the resolved manifest and package set; build nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Write no commit if the inputs (manifest, packages, files, scripts) equal
    /// those of the ref's current commit.
    #[arg(long)]
    pub unless_changed: bool,

    #[command(flatten)]
    pub signing: SigningArgs,

    /// Create a new repository in `bare-user` mode instead of `archive`.
    #[arg(long, hide = true)]
    pub bare_user: bool,

    /// Compose exactly the packages of this lockfile (`host compose lock REF -o FILE`)
    /// instead of resolving them; each .deb is checked against its sha256.
    #[arg(long, value_name = "FILE")]
    pub lock: Option<PathBuf>,

    /// With --lock: take the locked .debs from this directory instead of the
    /// cache and the mirror (for versions the mirror no longer has).
    #[arg(long, value_name = "DIR", requires = "lock")]
    pub debs: Option<PathBuf>,

    /// No progress output; only the result lines.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct LockArgs {
    /// The repository holding the commit.
    #[arg(long, env = "CAIRN_REPO", default_value_os_t = default_repo())]
    pub repo: PathBuf,

    /// The commit: ref, version or checksum.
    #[arg(value_name = "REF")]
    pub rev: String,

    /// Write the lockfile here instead of printing it.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The repository holding the commit.
    #[arg(long, env = "CAIRN_REPO", default_value_os_t = default_repo())]
    pub repo: PathBuf,

    /// Cache of downloaded packages, apt indices and installed package stages
    /// (the scratch repository is made here too).
    #[arg(long, env = "CAIRN_CACHE", default_value = "build/cache")]
    pub cache: PathBuf,

    /// The commit: ref, version or checksum.
    #[arg(value_name = "REF")]
    pub rev: String,

    /// The manifest the commit was composed from (its digest must match the recorded one).
    #[arg(long)]
    pub manifest: PathBuf,

    /// Take the locked .debs from this directory instead of the cache and the mirror.
    #[arg(long, value_name = "DIR")]
    pub debs: Option<PathBuf>,

    /// Install the packages again with mmdebstrap even when the stage cache
    /// has a stage for these inputs.
    #[arg(long)]
    pub rebuild_stage: bool,

    /// No progress output; only the result lines.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The prepared root directory.
    pub rootfs: PathBuf,

    /// OSTree repository to commit to; created as an `archive` repo if missing.
    #[arg(long, env = "CAIRN_REPO", default_value_os_t = default_repo())]
    pub repo: PathBuf,

    /// The branch to commit to.
    #[arg(long = "ref", value_name = "REF")]
    pub refname: String,

    /// Version metadata for the commit.
    #[arg(long)]
    pub version: Option<String>,

    /// Create a new repository in `bare-user` mode instead of `archive`.
    #[arg(long)]
    pub bare_user: bool,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The repository holding both refs.
    #[arg(long, env = "CAIRN_REPO", default_value_os_t = default_repo())]
    pub repo: PathBuf,

    /// The channel the commit was tested on.
    #[arg(long, value_name = "REF")]
    pub from: String,

    /// The channel to promote it to (created if missing).
    #[arg(long, value_name = "REF")]
    pub to: String,

    /// Checksum or version of the commit; default: the head of --from.
    pub commit: Option<String>,

    /// Version of the new commit instead of the automatic one.
    #[arg(long)]
    pub version: Option<String>,

    /// A JUnit XML result of the commit's tests (`host test boot --junit`,
    /// `host test upgrade --junit`, or any tool's; repeat for several):
    /// refused unless every test passed; the sha256 of each goes into the
    /// promoted commit (`cairn.tested-by`, space-separated in the order
    /// given).
    #[arg(long, value_name = "FILE")]
    pub tested_by: Vec<PathBuf>,

    #[command(flatten)]
    pub signing: SigningArgs,
}

/// Who signs what a compose writes (commits, the summary): one definition for
/// `tree`, `promote` and `publish`.
#[derive(Debug, Clone, Args)]
pub struct SigningArgs {
    /// Sign with this GPG key (id or fingerprint).
    #[arg(long, value_name = "KEYID", env = "CAIRN_GPG_KEY")]
    pub gpg_sign: Option<String>,

    /// GnuPG home directory holding the signing key; alone, it signs with the
    /// one secret key there (as `host compose keygen DIR` makes it).
    #[arg(long, value_name = "DIR", env = "CAIRN_GPG_HOMEDIR")]
    pub gpg_homedir: Option<PathBuf>,
}

impl SigningArgs {
    pub fn signer(self) -> Result<Option<Signer>> {
        Signer::resolve(self.gpg_sign, self.gpg_homedir)
    }
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// New or empty directory for the key pair (made mode 0700): the secret
    /// key stays there; the public key is exported to DIR/cairn-release.asc.
    pub dir: PathBuf,

    /// The key's user id.
    #[arg(long, default_value = "cairn release key")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The repository holding both commits.
    #[arg(long, env = "CAIRN_REPO", default_value_os_t = default_repo())]
    pub repo: PathBuf,

    /// Older commit: ref, version or checksum.
    pub from: String,

    /// Newer commit: ref, version or checksum.
    pub to: String,

    /// Print the difference as JSON.
    #[arg(long)]
    pub json: bool,

    /// List every changed file, not just the counts.
    #[arg(short = 'f', long)]
    pub files: bool,
}

#[derive(Debug, Args)]
pub struct SbomArgs {
    /// The repository holding the commit.
    #[arg(long, env = "CAIRN_REPO", default_value_os_t = default_repo())]
    pub repo: PathBuf,

    /// The commit: ref, version or checksum.
    #[arg(value_name = "REF")]
    pub rev: String,
}

pub fn run(cmd: ComposeCommand) -> Result<ExitCode> {
    match cmd {
        ComposeCommand::Tree(args) => tree(args),
        ComposeCommand::Diff(args) => diff(args),
        ComposeCommand::Sbom(args) => sbom(args),
        ComposeCommand::Lock(args) => lock(args),
        ComposeCommand::Verify(args) => verify(args),
        ComposeCommand::Commit(args) => commit(args),
        ComposeCommand::Promote(args) => promote(args),
        ComposeCommand::Image(args) => crate::compose_image::run(args),
        ComposeCommand::Publish(args) => crate::node::publish(args),
        ComposeCommand::Keygen(args) => keygen(args),
    }
}

fn tree(args: TreeArgs) -> Result<ExitCode> {
    let manifest = Manifest::load(&args.manifest)?;
    let mut opts = ComposeOptions::new(args.repo.clone(), args.cache.clone());
    opts.version = args.version;
    opts.dry_run = args.dry_run;
    opts.unless_changed = args.unless_changed;
    opts.signer = args.signing.signer()?;
    opts.progress = Progress::new(args.quiet);
    if args.bare_user {
        opts.repo_mode = ostree::RepoMode::BareUser;
    }
    opts.host_binary = Some(crate::exe::container_executable());
    if let Some(path) = &args.lock {
        opts.lock = Some(cairn_builder::lock::Lock::read(path)?);
    }
    opts.lock_debs = args.debs;
    match compose_tree(&manifest, &opts)? {
        Outcome::Committed {
            refname,
            checksum,
            version,
            content_checksum,
            packages,
        } => {
            println!("ref {refname}");
            println!("commit {checksum}");
            println!("version {version}");
            println!("content-checksum {content_checksum}");
            println!("packages {packages}");
        }
        Outcome::Unchanged {
            refname,
            checksum,
            version,
        } => {
            println!("no changes: {refname} is already at these inputs");
            println!("commit {checksum}");
            if let Some(v) = version {
                println!("version {v}");
            }
        }
        Outcome::DryRun {
            refname,
            manifest,
            packages,
            input_hash,
        } => {
            println!("# ref {refname}\n# input hash {input_hash}\n");
            print!("{manifest}");
            if !packages.is_empty() {
                println!("\n# {} packages", packages.len());
                for p in packages {
                    println!("# {p}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn lock(args: LockArgs) -> Result<ExitCode> {
    let repo = cairn_builder::repo::open(&args.repo)?;
    let commit = cairn_builder::repo::resolve_commit(&repo, &args.rev)?;
    let info = cairn_builder::repo::load_commit(&repo, &commit)?;
    let key = cairn_contracts::metadata::LOCK;
    let Some(text) = info.string(key) else {
        anyhow::bail!(
            "commit {commit} ({}) records no lockfile (`{key}`): it was composed before cairn recorded its inputs; \
             compose it again to get one",
            args.rev
        );
    };
    match &args.output {
        Some(path) => std::fs::write(path, &text)
            .map_err(|e| anyhow::anyhow!("writing the lockfile to {}: {e}", path.display()))?,
        None => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| anyhow::anyhow!("writing the lockfile to stdout: {e}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let manifest = Manifest::load(&args.manifest)?;
    let mut opts = ComposeOptions::new(args.repo, args.cache);
    opts.progress = Progress::new(args.quiet);
    opts.host_binary = Some(crate::exe::container_executable());
    opts.lock_debs = args.debs;
    opts.rebuild_stage = args.rebuild_stage;
    match cairn_builder::compose::verify(&manifest, &args.rev, opts)? {
        cairn_builder::compose::Verification::Identical { content_checksum } => {
            println!("identical {content_checksum}");
            Ok(ExitCode::SUCCESS)
        }
        cairn_builder::compose::Verification::Differs {
            original,
            recomposed,
            files,
        } => {
            println!("differs {original} {recomposed}");
            println!(
                "files: {} modified, {} removed, {} added",
                files.modified.len(),
                files.removed.len(),
                files.added.len()
            );
            for f in &files.modified {
                println!("  M {f}");
            }
            for f in &files.removed {
                println!("  D {f}");
            }
            for f in &files.added {
                println!("  A {f}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn commit(args: CommitArgs) -> Result<ExitCode> {
    let mut opts = ComposeOptions::new(args.repo, PathBuf::new());
    if args.bare_user {
        opts.repo_mode = ostree::RepoMode::BareUser;
    }
    let (checksum, content) = cairn_builder::compose::commit_prepared(
        &opts,
        cairn_builder::compose::PreparedCommit {
            root: &args.rootfs,
            refname: &args.refname,
            version: args.version.as_deref(),
            subject: None,
        },
    )?;
    println!("commit {checksum}");
    println!("content-checksum {content}");
    Ok(ExitCode::SUCCESS)
}

fn promote(args: PromoteArgs) -> Result<ExitCode> {
    let mut opts = ComposeOptions::new(args.repo, PathBuf::new());
    opts.version = args.version;
    opts.signer = args.signing.signer()?;
    let evidence = if args.tested_by.is_empty() {
        None
    } else {
        let each = args
            .tested_by
            .iter()
            .map(|p| test_evidence(p))
            .collect::<Result<Vec<_>>>()?;
        Some(cairn_builder::compose::TestEvidence {
            digest: each
                .iter()
                .map(|e| e.digest.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            summary: each
                .iter()
                .map(|e| e.summary.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        })
    };
    let p = cairn_builder::compose::promote(
        &opts,
        &args.from,
        &args.to,
        args.commit.as_deref(),
        evidence.as_ref(),
    )?;
    println!("ref {}", args.to);
    println!("commit {}", p.commit);
    println!("version {}", p.version);
    println!("content-checksum {}", p.content_checksum);
    println!("promoted-from {}", p.source);
    if let Some(e) = &evidence {
        println!("tested-by {} ({})", e.digest, e.summary);
    }
    Ok(ExitCode::SUCCESS)
}

/// The most of a JUnit result read.
const MAX_JUNIT_SIZE: u64 = 64 << 20;

/// A JUnit result's digest and count, or why it cannot gate a promotion.
fn test_evidence(path: &std::path::Path) -> Result<cairn_builder::compose::TestEvidence> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .with_context(|| format!("--tested-by: opening {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_JUNIT_SIZE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_JUNIT_SIZE {
        anyhow::bail!(
            "--tested-by {}: over {MAX_JUNIT_SIZE} bytes",
            path.display()
        );
    }
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("--tested-by {}: not UTF-8 text", path.display()))?;
    let v = cairn_testbed::report::junit_verdict(text)
        .with_context(|| format!("--tested-by {}", path.display()))?;
    if v.failed > 0 {
        anyhow::bail!(
            "--tested-by {}: {} of {} tests failed or erred: a commit is promoted only when every test passed",
            path.display(),
            v.failed,
            v.tests
        );
    }
    Ok(cairn_builder::compose::TestEvidence {
        digest: format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes))),
        summary: format!("{} tests passed", v.tests),
    })
}

fn keygen(args: KeygenArgs) -> Result<ExitCode> {
    let pair = cairn_builder::keys::generate(&args.dir, &args.name)?;
    println!("fingerprint {}", pair.fingerprint);
    println!("public-key {}", pair.public_key.display());
    Ok(ExitCode::SUCCESS)
}

fn diff(args: DiffArgs) -> Result<ExitCode> {
    let repo = cairn_builder::repo::open(&args.repo)?;
    let d = cairn_builder::diff::diff_commits(&repo, &args.from, &args.to)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    let v = |v: &Option<String>| v.clone().unwrap_or_else(|| "(no version)".into());
    println!("from {} {}", v(&d.from_version), d.from);
    println!("to   {} {}", v(&d.to_version), d.to);
    println!("packages: {}", d.packages.summary());
    print!("{}", d.packages);
    println!(
        "files: {} modified, {} removed, {} added",
        d.files.modified.len(),
        d.files.removed.len(),
        d.files.added.len()
    );
    if args.files {
        for f in &d.files.modified {
            println!("  M {f}");
        }
        for f in &d.files.removed {
            println!("  D {f}");
        }
        for f in &d.files.added {
            println!("  A {f}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn sbom(args: SbomArgs) -> Result<ExitCode> {
    let repo = cairn_builder::repo::open(&args.repo)?;
    let (_, bytes) = cairn_builder::sbom::read_from_commit(&repo, &args.rev)?;
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("writing the SBOM to stdout: {e}"))?;
    Ok(ExitCode::SUCCESS)
}
