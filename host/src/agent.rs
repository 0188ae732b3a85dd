//! `host agent`: the automatic update agent (a long-running service on a node).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use cairn_updater::agent::{self, AgentConfig, STATE_FILE};
use cairn_updater::SysrootTarget;
use clap::Args;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Do one round (check, stage, maybe reboot) and exit instead of looping.
    #[arg(long)]
    pub once: bool,

    /// Act on the sysroot at DIR instead of the running system (never reboots).
    #[arg(long, value_name = "DIR")]
    pub sysroot: Option<PathBuf>,

    /// Root under which /usr/lib/cairn/agent.toml, /etc/cairn/agent.toml and
    /// /etc/cairn/agent.d/*.toml are read.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub config_root: PathBuf,

    /// Where the agent keeps its state (shown by `host status`).
    #[arg(long, value_name = "FILE", default_value = STATE_FILE)]
    pub state_file: PathBuf,

    /// The health state written by `host health check` (the commits that
    /// failed their checks are never staged again).
    #[arg(long, value_name = "FILE", default_value = cairn_updater::health::STATE_FILE)]
    pub health_state: PathBuf,

    /// Print the effective configuration and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(args: AgentArgs) -> Result<ExitCode> {
    let config = AgentConfig::load(&args.config_root)?;
    if args.print_config {
        println!("{config:#?}");
        return Ok(ExitCode::SUCCESS);
    }
    agent::run(
        config,
        SysrootTarget::from_option(args.sysroot),
        args.state_file,
        args.health_state,
        args.once,
    )?;
    Ok(ExitCode::SUCCESS)
}
