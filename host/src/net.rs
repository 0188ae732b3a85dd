//! `host net …`: the fleet network (see docs/network.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_contracts::network::{
    read_node_network, FleetNetwork, DEFAULT_BRIDGE, NETWORKD_RUNTIME_DIR, NETWORK_CONFIG,
    NETWORK_STATE_DIR, NODE_NETWORK,
};
use cairn_contracts::services::{
    parse_etcd_key, parse_instance, ETCD_SERVICES_PREFIX, REGISTRATION_DIR,
};
use cairn_network::agent::{self, Paths, Progress};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum NetCommand {
    /// Join the fleet network and keep this node's subnet and routes
    /// (cairn-net.service runs it when /etc/cairn/network.toml exists).
    Agent(AgentArgs),

    /// This node's subnet and mode, its peers, cairn's routes, etcd's health.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The agent's published state.
        #[arg(long, value_name = "FILE", env = crate::containers::ENV_NODE_NETWORK, default_value = NODE_NETWORK)]
        node_network: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The fleet network's config.
    #[arg(long, value_name = "FILE", default_value = NETWORK_CONFIG)]
    config: PathBuf,
    /// The bridge containers attach to.
    #[arg(long, default_value = DEFAULT_BRIDGE)]
    bridge: String,
    /// Where the agent publishes what it leased (read by `host app`).
    #[arg(long, value_name = "FILE", env = crate::containers::ENV_NODE_NETWORK, default_value = NODE_NETWORK)]
    node_network: PathBuf,
    /// Where the agent remembers its subnet across reboots.
    #[arg(long, value_name = "DIR", default_value = NETWORK_STATE_DIR)]
    state_dir: PathBuf,
    /// networkd's runtime directory, where the bridge's file is shadowed
    /// with the leased address.
    #[arg(long, value_name = "DIR", default_value = NETWORKD_RUNTIME_DIR)]
    networkd_dir: PathBuf,
    /// The node has no networkd to tell (a test, a container).
    #[arg(long)]
    no_networkd: bool,
    /// The node's identity in the fleet.
    #[arg(long, value_name = "FILE", default_value = "/etc/machine-id")]
    machine_id: PathBuf,
    /// Where container monitors publish serving instances.
    #[arg(long, value_name = "DIR", env = crate::containers::ENV_REGISTRATION_DIR, default_value = REGISTRATION_DIR)]
    registration_dir: PathBuf,
    /// The DNS responder's port on the bridge address.
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ServiceCommand {
    /// Every service in the fleet, its instances, their nodes and addresses
    /// (only running, healthy instances are registered).
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// etcd client URL (repeatable) [default: the fleet network's].
        #[arg(long = "etcd", value_name = "URL")]
        endpoints: Vec<String>,
        /// The agent's published state (names etcd when --etcd does not).
        #[arg(long, value_name = "FILE", env = crate::containers::ENV_NODE_NETWORK, default_value = NODE_NETWORK)]
        node_network: PathBuf,
    },
}

pub fn run_service(cmd: ServiceCommand) -> Result<ExitCode> {
    let ServiceCommand::Ls {
        json,
        mut endpoints,
        node_network,
    } = cmd;
    if endpoints.is_empty() {
        endpoints = read_node_network(&node_network)?
            .map(|n| n.etcd_endpoints)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "this node is in no fleet network ({} does not exist): name etcd with --etcd URL",
                    node_network.display()
                )
            })?;
    }
    let etcd = cairn_etcd::Etcd::new(&endpoints)?;
    let snap = etcd.snapshot(ETCD_SERVICES_PREFIX)?;
    let mut rows = Vec::new();
    for kv in snap.kvs {
        let Some((service, _, _)) = parse_etcd_key(&kv.key) else {
            continue;
        };
        let Ok(i) = parse_instance(&kv.value) else {
            continue;
        };
        let port = i
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.port);
        rows.push(serde_json::json!({
            "service": service,
            "container": i.container,
            "node": i.node,
            "address": i.address.to_string(),
            "port": port,
            "health": "healthy",
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<20} {:<20} {:<16} {:<6}",
        "SERVICE", "CONTAINER", "NODE", "ADDRESS", "PORT"
    );
    for r in &rows {
        let port = r["port"]
            .as_u64()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<20} {:<20} {:<16} {:<6}",
            r["service"].as_str().unwrap_or_default(),
            r["container"].as_str().unwrap_or_default(),
            r["node"].as_str().unwrap_or_default(),
            r["address"].as_str().unwrap_or_default(),
            port
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: NetCommand) -> Result<ExitCode> {
    match cmd {
        NetCommand::Agent(a) => {
            let text = std::fs::read_to_string(&a.config).with_context(|| {
                format!(
                    "reading {}: this node has no fleet network config (see docs/network.md)",
                    a.config.display()
                )
            })?;
            let cfg =
                FleetNetwork::parse(&text).with_context(|| format!("{}", a.config.display()))?;
            let paths = Paths {
                node_network: a.node_network,
                state_dir: a.state_dir,
                networkd_dir: (!a.no_networkd).then_some(a.networkd_dir),
                machine_id: a.machine_id,
                registration_dir: a.registration_dir,
                dns_port: a.dns_port,
            };
            agent::run(&cfg, &a.bridge, &paths, |p| match p {
                Progress::Joined { subnet, reclaimed } => println!(
                    "joined the fleet network: subnet {subnet}{}",
                    if reclaimed { " (held before)" } else { "" }
                ),
                Progress::Routed { peers } => println!("routes: {peers} peer subnet(s)"),
                Progress::Registered { keys } => println!("registered: {keys} service instance(s)"),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        NetCommand::Status { json, node_network } => {
            let st = cairn_network::status::status(&node_network)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(ExitCode::SUCCESS);
            }
            let Some(node) = &st.node else {
                println!("Fleet network: none (single-node bridge; see docs/network.md)");
                return Ok(ExitCode::SUCCESS);
            };
            println!("Fleet network: {} (mode {})", node.cidr, node.mode);
            println!(
                "  Subnet: {} on {} (gateway {})",
                node.subnet, node.bridge, node.gateway
            );
            println!(
                "  Underlay: {} on {}, MTU {}",
                node.underlay, node.underlay_interface, node.mtu
            );
            println!("  etcd: {} ({})", st.etcd, node.etcd_endpoints.join(", "));
            println!("Peers: {}", st.peers.len());
            for p in &st.peers {
                println!(
                    "  {} {} via {}{}",
                    p.subnet,
                    p.hostname,
                    p.underlay,
                    if p.routed { "" } else { " (no route)" }
                );
            }
            println!("Routes: {}", st.routes.len());
            for r in &st.routes {
                match r.gateway {
                    Some(g) => println!("  {} via {} dev {}", r.destination, g, r.device),
                    None => println!("  {} dev {}", r.destination, r.device),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
