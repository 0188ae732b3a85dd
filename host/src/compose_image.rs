//! `host compose image`: a bootable disk image of a composed commit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use cairn_builder::image::{self, ImageFormat, ImageOptions, Trust};
use clap::Args;

/// Write a BIOS-bootable disk image (GPT, GRUB, /boot, root) with the commit deployed.
///
/// The commit is deployed through libostree into stateroot `cairn`, with
/// origin `cairn:<REF>`; the node's repository gets a remote `cairn` pointing
/// at --remote-url, so `host upgrade` on the booted machine knows where to
/// look. GRUB (BIOS) boots the menu libostree's grub2 backend last had our
/// generator write, so later upgrades and rollbacks switch the boot entry by
/// themselves, with a boot counter that falls back to the previous
/// deployment. Needs root (loop devices and mounts). Prints `image`,
/// `commit` and `size` lines.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// OSTree repository holding the commit.
    #[arg(long, env = "CAIRN_REPO", default_value = "build/repo")]
    pub repo: PathBuf,

    /// Ref (branch) to deploy.
    #[arg(long = "ref", value_name = "REF")]
    pub ref_: String,

    /// Deploy this commit (full checksum) instead of the ref's head, e.g. an
    /// older version to test upgrades; the origin still follows --ref.
    #[arg(long, value_name = "CHECKSUM")]
    pub commit: Option<String>,

    /// Output format.
    #[arg(long, default_value = "qcow2", value_parser = ["qcow2", "raw"])]
    pub format: String,

    /// Virtual disk size (K, M, G, T suffixes; binary units).
    #[arg(long, default_value = "8G", value_parser = crate::containers::parse_size)]
    pub size: u64,

    /// Where the node pulls updates from (remote `cairn`); default: file:// of --repo.
    #[arg(long, value_name = "URL")]
    pub remote_url: Option<String>,

    /// Extra kernel argument, after the tree's own (repeatable).
    #[arg(long = "karg", value_name = "ARG")]
    pub kargs: Vec<String>,

    /// Armored public key whose signatures the node accepts (repeatable): its
    /// remote verifies every commit and the summary, and the deployed commit
    /// must verify too. Make a key with `host compose keygen DIR`.
    #[arg(long, value_name = "KEYFILE")]
    pub trust: Vec<PathBuf>,

    /// Write a node that installs updates without checking any signature
    /// (lab images only): `host status` on it warns on every call.
    #[arg(long, conflicts_with = "trust")]
    pub insecure_no_verify: bool,

    /// A node config to embed (docs/provisioning.md): the node applies it at
    /// its first boot unless fw_cfg, a config drive or a URL gives another.
    /// Checked first, as `host provision validate` does.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// No progress output on stderr.
    #[arg(short, long)]
    pub quiet: bool,

    /// Output file; written under a temporary name and renamed when complete.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

pub fn run(args: ImageArgs) -> Result<ExitCode> {
    let format: ImageFormat = args.format.parse().map_err(anyhow::Error::msg)?;
    let trust = match (args.trust, args.insecure_no_verify) {
        (_, true) => Trust::InsecureNoVerify,
        (keys, false) if !keys.is_empty() => Trust::Keys(keys),
        _ => bail!(
            "refusing to write a node that would install unsigned updates: give --trust KEYFILE, \
             the public key your composes are signed with (make a pair with `host compose keygen DIR`, \
             then sign with --gpg-homedir DIR and trust DIR/{}), or --insecure-no-verify for a lab image",
            cairn_builder::keys::PUBLIC_KEY_FILE
        ),
    };
    let node_config = match &args.config {
        Some(path) => Some(crate::provision::checked_file(path)?.into_bytes()),
        None => None,
    };
    let report = image::write_image(&ImageOptions {
        repo: args.repo,
        ref_: args.ref_,
        commit: args.commit,
        format,
        size: args.size,
        remote_url: args.remote_url,
        extra_kargs: args.kargs,
        trust,
        node_config,
        output: args.output,
        quiet: args.quiet,
    })?;
    println!("image {}", report.output.display());
    println!("commit {}", report.commit);
    if let Some(version) = &report.version {
        println!("version {version}");
    }
    println!("size {}", report.allocated_bytes);
    Ok(ExitCode::SUCCESS)
}
