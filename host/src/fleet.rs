//! `host fleet …`: reboot coordination for a fleet (FleetLock on etcd).

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{bail, Result};
use cairn_etcd::Etcd;
use cairn_updater::fleetlock::server::{self, Config, Store, DEFAULT_PREFIX};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum FleetCommand {
    /// Run a FleetLock server whose state lives in etcd.
    ///
    /// Nodes POST /v1/pre-reboot before rebooting into a new deployment and
    /// /v1/steady-state once healthy; each group has a number of reboot slots.
    Serve(ServeArgs),

    /// Show every group's slots and holders, and the live servers.
    Status(EtcdArgs),

    /// Free the slot a node holds (e.g. a node that never came back).
    Release {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// The node's group.
        #[arg(long)]
        group: String,
        /// The node id holding the slot.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// etcd client URL (repeat for several members).
    #[arg(
        long = "etcd",
        value_name = "URL",
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,

    /// Key prefix of the semaphores in etcd.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,

    /// Print JSON (status).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:3333")]
    pub listen: String,

    /// Reboot slots of a group not named with --group.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,

    /// Slots of one group, as NAME=N (repeatable).
    #[arg(long = "group", value_name = "NAME=N", value_parser = parse_group)]
    pub groups: Vec<(String, u32)>,

    /// Request handler threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
}

fn parse_group(s: &str) -> Result<(String, u32), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=N"))?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("{s:?}: N must be a whole number"))?;
    Ok((name.to_string(), n))
}

pub fn run(cmd: FleetCommand) -> Result<ExitCode> {
    match cmd {
        FleetCommand::Serve(args) => {
            if args.slots == 0 || args.groups.iter().any(|(_, n)| *n == 0) {
                bail!("a group needs at least one slot, or no node could ever reboot");
            }
            let config = Config {
                etcd: args.etcd.endpoints,
                listen: args.listen,
                default_slots: args.slots,
                groups: args.groups.into_iter().collect::<BTreeMap<_, _>>(),
                prefix: args.etcd.prefix,
            };
            let running = server::start(config, args.threads)?;
            eprintln!("FleetLock server listening on http://{}", running.addr);
            running.wait();
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Status(args) => {
            let store = Store::new(Etcd::new(&args.endpoints)?, &args.prefix);
            let groups = store.groups()?;
            let servers = store.servers()?;
            if args.json {
                let v = serde_json::json!({ "groups": groups, "servers": servers });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "servers: {}",
                if servers.is_empty() {
                    "none alive".into()
                } else {
                    servers.join(", ")
                }
            );
            for g in groups {
                println!(
                    "group {}: {}/{} slots held",
                    g.group,
                    g.holders.len(),
                    g.slots
                );
                for h in g.holders {
                    println!("  {} since {}", h.id, h.since);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Release { etcd, group, id } => {
            let store = Store::new(Etcd::new(&etcd.endpoints)?, &etcd.prefix);
            if store.release(&group, &id)? {
                println!("released {id}'s slot in group {group}");
                Ok(ExitCode::SUCCESS)
            } else {
                bail!("{id} holds no slot in group {group} (see `host fleet status`)");
            }
        }
    }
}
