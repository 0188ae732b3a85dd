//! The command tree. Help text, man pages and shell completions are all
//! generated from these definitions, so they cannot drift apart.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use crate::app;
use crate::node;
use crate::{agent, compose, fleet, health, net, provision, test};

/// cairn: an immutable container host, composed from a manifest, updated atomically.
#[derive(Debug, Parser)]
#[command(name = "host", version, max_term_width = 100)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug), given before the
    /// command: `host -v upgrade`; RUST_LOG overrides it. (After a command,
    /// `-v` is that command's own: `host status -v`, `host app run -v SRC:DST`.)
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Subcommands are built only when invoked: building the whole tree took
// most of a short `host app run` in a VM (see docs/runtime.md).
#[command(defer = true)]
pub enum Command {
    /// Build host trees and disk images (the CI side).
    #[command(subcommand)]
    Compose(compose::ComposeCommand),

    #[command(flatten)]
    Node(node::NodeCommand),

    /// Immutable application containers: import OCI images, run, supervise.
    App(app::AppCommand),

    /// Automatic updates: check, stage and apply on a schedule, with update
    /// windows and FleetLock reboot coordination.
    Agent(agent::AgentArgs),

    /// Health checks that gate a new deployment (rollback on failure).
    #[command(subcommand)]
    Health(health::HealthCommand),

    /// First-boot provisioning: a node config gives each node its hostname,
    /// users and SSH keys, network, agent and fleet settings, checks and apps.
    #[command(subcommand)]
    Provision(provision::ProvisionCommand),

    /// Reboot coordination for fleets (FleetLock on etcd).
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),

    /// The fleet network: a subnet per node, routes to every other node's
    /// containers, no NAT.
    #[command(subcommand)]
    Net(net::NetCommand),

    /// Services registered by containers fleet-wide (`--service`).
    #[command(subcommand)]
    Service(net::ServiceCommand),

    /// Boot tests: boot an image in QEMU and run checks in it.
    #[command(subcommand)]
    Test(test::TestCommand),

    /// Print a shell completion script to stdout.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },

    /// Write man pages for `host` and every subcommand into a directory.
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(short, long, default_value = ".")]
        out: PathBuf,
    },
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Compose(cmd) => compose::run(cmd),
        Command::Node(cmd) => node::run(cmd),
        Command::App(cmd) => app::run(cmd),
        Command::Fleet(cmd) => fleet::run(cmd),
        Command::Net(cmd) => net::run(cmd),
        Command::Service(cmd) => net::run_service(cmd),
        Command::Agent(args) => agent::run(args),
        Command::Health(cmd) => health::run(cmd),
        Command::Provision(cmd) => provision::run(cmd),
        Command::Test(cmd) => test::run(cmd),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "host", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => {
            write_man_pages(&out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One page per command, named the way `man host-compose-tree` finds it.
fn write_man_pages(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write_page(dir, &cmd, "host")
}

fn write_page(dir: &std::path::Path, cmd: &clap::Command, name: &str) -> Result<()> {
    let page = dir.join(format!("{name}.1"));
    let man = clap_mangen::Man::new(cmd.clone().name(name.to_string()));
    let mut buf = Vec::new();
    man.render(&mut buf)?;
    let mut file =
        std::fs::File::create(&page).with_context(|| format!("writing {}", page.display()))?;
    file.write_all(&buf)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_page(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every visible command path, e.g. "host compose tree".
    fn command_paths(cmd: &clap::Command, prefix: &str, out: &mut Vec<String>) {
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            let path = format!("{prefix} {}", sub.get_name());
            out.push(path.clone());
            command_paths(sub, &path, out);
        }
    }

    #[test]
    fn man_pages_cover_every_command() {
        let dir = tempfile::tempdir().unwrap();
        write_man_pages(dir.path()).unwrap();
        let mut paths = Vec::new();
        command_paths(&Cli::command(), "host", &mut paths);
        for path in paths {
            let page = dir.path().join(format!("{}.1", path.replace(' ', "-")));
            let text = std::fs::read_to_string(&page)
                .unwrap_or_else(|_| panic!("no man page {}", page.display()));
            assert!(text.contains(".TH"), "{} is not a man page", page.display());
        }
    }

    #[test]
    fn completions_know_every_top_level_command() {
        let mut buf = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "host",
            &mut buf,
        );
        let script = String::from_utf8(buf).unwrap();
        for sub in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            assert!(
                script.contains(sub.get_name()),
                "bash completion lacks {}",
                sub.get_name()
            );
        }
    }

    /// docs/cli.md documents every command: adding one without documenting it fails here.
    #[test]
    fn docs_cli_md_mentions_every_command() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md"))
            .unwrap();
        let mut paths = Vec::new();
        command_paths(&Cli::command(), "host", &mut paths);
        let missing: Vec<&String> = paths
            .iter()
            .filter(|p| !doc.contains(&format!("`{p}")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/cli.md does not document: {missing:?}"
        );
    }
}
