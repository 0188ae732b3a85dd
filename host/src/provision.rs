//! `host provision …`: the node config a node applies at its first boot.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use cairn_updater::provision::apply::{self, Found, ProvisionResult, ProvisionState};
use cairn_updater::provision::config::MAX_CONFIG_BYTES;
use cairn_updater::provision::{render, NodeConfig, Plan};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ProvisionCommand {
    /// Check a node config offline (for CI): its keys, values, and the
    /// options of its apps as `host app run` reads them. Prints what a
    /// node would write.
    Validate {
        /// The node config (TOML, docs/provisioning.md).
        file: PathBuf,
    },
    /// Show what provisioning applied on this node, and from where.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Read the node whose root is DIR (a mounted disk, say).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// Find the node config and apply it, once: what the first boot's
    /// cairn-provision.service runs. Later runs see the stamp and do nothing.
    Apply {
        /// Apply to the tree at DIR instead of the running system (no
        /// hostname, units or kernel arguments are touched then).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Read this file instead of looking through the sources.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

pub fn run(cmd: ProvisionCommand) -> Result<ExitCode> {
    match cmd {
        ProvisionCommand::Validate { file } => {
            let found = Found {
                source: file.display().to_string(),
                text: apply::read_bounded(&file, MAX_CONFIG_BYTES)?,
            };
            let (_, plan) = check(&found)?;
            println!("{}: valid", file.display());
            print_plan(&plan);
            Ok(ExitCode::SUCCESS)
        }
        ProvisionCommand::Show { json, root } => {
            let state = ProvisionState::load(&root.join("var"));
            if json {
                println!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                match state {
                    None => println!("not provisioned yet (no {})", apply::STATE_FILE),
                    Some(s) => print!("{}", render_state(&s)),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ProvisionCommand::Apply { root, config } => apply_once(&root, config.as_deref()),
    }
}

/// Reads and checks a node config file; returns its text.
pub fn checked_file(path: &Path) -> Result<String> {
    let found = Found {
        source: path.display().to_string(),
        text: apply::read_bounded(path, MAX_CONFIG_BYTES)?,
    };
    check(&found)?;
    Ok(found.text)
}

/// Parses, renders and checks the apps of a config.
fn check(found: &Found) -> Result<(NodeConfig, Plan)> {
    let config = apply::parse(found)?;
    let plan = render(&config)?;
    for (i, app) in config.apps.iter().enumerate() {
        let args = cairn_updater::provision::render::app_run(app).args();
        crate::containers::check_run_args(&args)
            .with_context(|| format!("node config {}: apps[{i}] ({})", found.source, app.name))?;
    }
    Ok((config, plan))
}

fn print_plan(plan: &Plan) {
    for a in &plan.accounts {
        println!("  account {}", a.name);
    }
    for e in &plan.entries {
        println!("  write {}", e.path());
    }
    for u in &plan.units {
        println!("  start {u}");
    }
    if let Some(r) = &plan.follow {
        println!("  follow {r} (its next update comes from there)");
    }
    if let Some(u) = &plan.remote_url {
        println!("  fetch updates from {u}");
    }
    if !plan.kernel_args.is_empty() {
        println!(
            "  kernel arguments {} (a new deployment, then a reboot)",
            plan.kernel_args.join(" ")
        );
    }
}

pub fn render_state(s: &ProvisionState) -> String {
    let result = match s.result {
        ProvisionResult::Applied => "applied",
        ProvisionResult::Failed => "FAILED",
        ProvisionResult::NoConfig => "no config found",
    };
    let mut t = format!("Provisioning: {result} at {}", s.at);
    if let Some(src) = &s.source {
        t.push_str(&format!(" from {src}"));
    }
    t.push('\n');
    if let Some(e) = &s.error {
        t.push_str(&format!("  error: {e}\n"));
    }
    if let Some(d) = &s.config_sha256 {
        t.push_str(&format!("  config sha256: {d}\n"));
    }
    if !s.accounts.is_empty() {
        t.push_str(&format!("  accounts: {}\n", s.accounts.join(", ")));
    }
    if !s.files.is_empty() {
        t.push_str("  files:\n");
        for f in &s.files {
            t.push_str(&format!("    {f}\n"));
        }
    }
    if !s.units.is_empty() {
        t.push_str(&format!("  apps: {}\n", s.units.join(", ")));
    }
    if let Some(r) = &s.follows {
        t.push_str(&format!("  follows: {r}\n"));
    }
    if let Some(u) = &s.remote_url {
        t.push_str(&format!("  updates from: {u}\n"));
    }
    if !s.kernel_args.is_empty() {
        t.push_str(&format!(
            "  kernel arguments: {}\n",
            s.kernel_args.join(" ")
        ));
    }
    t
}

fn apply_once(root: &Path, config: Option<&Path>) -> Result<ExitCode> {
    if let Some(done) = ProvisionState::load(&root.join("var")) {
        if done.result != ProvisionResult::Failed {
            println!("already provisioned: {}", render_state(&done).trim_end());
            return Ok(ExitCode::SUCCESS);
        }
    }
    let live = root == Path::new("/");
    let found = match config {
        Some(f) => apply::read_bounded(f, MAX_CONFIG_BYTES).map(|text| {
            Some(Found {
                source: f.display().to_string(),
                text,
            })
        }),
        None => apply::find_config(root),
    };
    let mut source = None;
    let outcome = found.and_then(|found| match found {
        None => Ok(None),
        Some(found) => {
            source = Some(found.source.clone());
            let (_, plan) = check(&found)?;
            let mut state = apply::apply(root, &plan, &found)?;
            if live {
                activate(&plan, &mut state)?;
            }
            Ok(Some((state, plan)))
        }
    });
    match outcome {
        Ok(None) => {
            ProvisionState::no_config().save(root)?;
            println!("provisioning: no node config in any source; nothing to apply");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Some((state, plan))) => {
            state.save(root)?;
            print!("{}", render_state(&state));
            if live && !plan.kernel_args.is_empty() {
                println!("rebooting into the deployment with the new kernel arguments");
                Command::new("systemctl").arg("reboot").status()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            // Recorded for `host status`, and tried again at the next boot.
            let msg = format!("{err:#}");
            ProvisionState::failed(source, msg.clone()).save(root)?;
            bail!("provisioning failed: {msg}\nThe node stays as it booted; fix the config and reboot (or run `host provision apply`).")
        }
    }
}

/// What a booted system needs beyond the files: the hostname, sysctls,
/// networkd and the app units take effect now; kernel arguments go into a
/// new deployment.
fn activate(plan: &Plan, state: &mut ProvisionState) -> Result<()> {
    let writes = |p: &str| plan.entries.iter().any(|e| e.path().starts_with(p));
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        if writes("/etc/hostname") {
            // What sethostname(2) sets; systemd read /etc/hostname before this ran.
            std::fs::write("/proc/sys/kernel/hostname", h.trim())
                .context("setting the hostname")?;
        }
    }
    if writes(cairn_updater::provision::render::SYSCTL_FILE) {
        checked(
            Command::new("sysctl")
                .arg("-p")
                .arg(cairn_updater::provision::render::SYSCTL_FILE),
        )?;
    }
    if writes(cairn_updater::provision::render::NETWORK_DIR) {
        // networkd may already run (a URL source needs the network): reload.
        let _ = Command::new("networkctl").arg("reload").status();
    }
    if !plan.units.is_empty() {
        checked(Command::new("systemctl").arg("daemon-reload"))?;
        checked(
            Command::new("systemctl")
                .args(["start", "--no-block"])
                .args(&plan.units),
        )?;
    }
    let target = cairn_updater::SysrootTarget::from_option(None);
    if let Some(refspec) = &plan.follow {
        // The URL first: following a ref only rewrites the origin, but a
        // remote pointed at the wrong server must not stay half-changed.
        if let (Some(url), Some((remote, _))) = (&plan.remote_url, refspec.split_once(':')) {
            cairn_updater::set_remote_url(&target, remote, url)
                .with_context(|| format!("pointing remote {remote} at {url}"))?;
            state.remote_url = Some(url.clone());
        }
        let mut step = crate::node::show_step(false);
        cairn_updater::follow(&target, refspec, &mut step)
            .with_context(|| format!("following {refspec}"))?;
        state.follows = Some(refspec.clone());
    }
    if !plan.kernel_args.is_empty() {
        let edit = cairn_updater::KargsEdit {
            append: plan.kernel_args.clone(),
            ..Default::default()
        };
        let mut step = crate::node::show_step(false);
        cairn_updater::kargs(&target, &edit, &mut step).context("adding the kernel arguments")?;
        state.kernel_args = plan.kernel_args.clone();
    }
    Ok(())
}

fn checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
