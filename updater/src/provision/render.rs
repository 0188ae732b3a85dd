//! A checked node config turned into what the node writes: files, links,
//! directories and accounts, as plain values. Nothing here touches a disk,
//! so every rendering is unit-tested; applying the plan is the caller's.

use std::fmt::Write as _;

use anyhow::{bail, Result};
use base64::Engine as _;

use cairn_contracts::network::NETWORK_CONFIG;
use cairn_contracts::units::{app_unit_name, app_unit_text, AppRun, AppUnit};

use super::config::{parse_mode, Interface, NodeConfig};

/// Provisioned interfaces sort before the tree's own `10-uplink.network`,
/// so networkd matches them first.
pub const NETWORK_DIR: &str = "/etc/systemd/network";
pub const SYSCTL_FILE: &str = "/etc/sysctl.d/90-cairn-provision.conf";
/// After the shipped /usr/lib/cairn/agent.toml and /etc/cairn/agent.toml, so its keys win.
pub const AGENT_DROPIN: &str = "/etc/cairn/agent.d/50-provision.toml";
pub const HEALTH_DIR: &str = "/etc/cairn/health.d";
pub const UNIT_DIR: &str = "/etc/systemd/system";
/// Home directories: /home and /root are links into /var in every tree.
pub const HOME_DIR: &str = "/var/home";
pub const ROOT_HOME: &str = "/var/roothome";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
        owner: String,
        group: String,
    },
    File {
        path: String,
        mode: u32,
        owner: String,
        group: String,
        content: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Symlink { path, .. } => {
                path
            }
        }
    }
}

/// An account to create (or, for root, to update).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub groups: Vec<String>,
    pub password_hash: Option<String>,
    pub home: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Accounts first: files may be owned by them.
    pub accounts: Vec<Account>,
    /// In order: a directory comes before what is in it.
    pub entries: Vec<Entry>,
    pub kernel_args: Vec<String>,
    /// `REMOTE:REF` the node follows from now on.
    pub follow: Option<String>,
    /// The URL that remote fetches from from now on.
    pub remote_url: Option<String>,
    /// Units to enable, by name (their files are in `entries`).
    pub units: Vec<String>,
}

fn root_file(path: impl Into<String>, mode: u32, content: impl Into<Vec<u8>>) -> Entry {
    Entry::File {
        path: path.into(),
        mode,
        owner: "root".into(),
        group: "root".into(),
        content: content.into(),
    }
}

/// A config section written back as the TOML file its reader takes.
fn toml_file(path: &str, section: &impl serde::Serialize) -> Result<Entry> {
    let body = toml::to_string(section)?;
    Ok(root_file(
        path,
        0o644,
        format!("# Written by cairn provisioning from the node config.\n{body}"),
    ))
}

pub fn render(c: &NodeConfig) -> Result<Plan> {
    let mut plan = Plan {
        kernel_args: c.kernel_args.clone(),
        follow: c.update.as_ref().map(|u| u.ref_.clone()),
        remote_url: c.update.as_ref().and_then(|u| u.url.clone()),
        ..Plan::default()
    };
    let e = &mut plan.entries;
    if let Some(h) = &c.hostname {
        e.push(root_file("/etc/hostname", 0o644, format!("{h}\n")));
    }
    if let Some(tz) = &c.timezone {
        e.push(Entry::Symlink {
            path: "/etc/localtime".into(),
            target: format!("../usr/share/zoneinfo/{tz}"),
        });
        e.push(root_file("/etc/timezone", 0o644, format!("{tz}\n")));
    }
    for u in &c.users {
        let home = if u.name == "root" {
            ROOT_HOME.to_string()
        } else {
            format!("{HOME_DIR}/{}", u.name)
        };
        plan.accounts.push(Account {
            name: u.name.clone(),
            groups: u.groups.clone(),
            password_hash: u.password_hash.clone(),
            home: home.clone(),
        });
        if u.name != "root" {
            e.push(Entry::Dir {
                path: home.clone(),
                mode: 0o700,
                owner: u.name.clone(),
                group: u.name.clone(),
            });
        }
        if !u.ssh_authorized_keys.is_empty() {
            let group = u.name.clone();
            e.push(Entry::Dir {
                path: format!("{home}/.ssh"),
                mode: 0o700,
                owner: u.name.clone(),
                group: group.clone(),
            });
            let mut keys = String::from("# Written by cairn provisioning from the node config.\n");
            for k in &u.ssh_authorized_keys {
                keys.push_str(k.trim());
                keys.push('\n');
            }
            e.push(Entry::File {
                path: format!("{home}/.ssh/authorized_keys"),
                mode: 0o600,
                owner: u.name.clone(),
                group,
                content: keys.into_bytes(),
            });
        }
    }
    for (i, iface) in c.network.interfaces.iter().enumerate() {
        e.push(root_file(
            format!("{NETWORK_DIR}/05-cairn-provision-{i}.network"),
            0o644,
            network_file(iface),
        ));
    }
    if !c.sysctl.is_empty() {
        let mut t = String::from("# Written by cairn provisioning from the node config.\n");
        for (k, v) in &c.sysctl {
            let _ = writeln!(t, "{k} = {v}");
        }
        e.push(root_file(SYSCTL_FILE, 0o644, t));
    }
    if let Some(agent) = &c.agent {
        e.push(toml_file(AGENT_DROPIN, agent)?);
    }
    if let Some(fleet) = &c.fleet {
        e.push(toml_file(NETWORK_CONFIG, fleet)?);
    }
    for h in &c.health {
        let kind = match h.kind {
            crate::health::Kind::Required => "required",
            crate::health::Kind::Wanted => "wanted",
        };
        e.push(root_file(
            format!("{HEALTH_DIR}/{kind}/{}", h.name),
            0o755,
            h.script.clone(),
        ));
    }
    for a in &c.apps {
        let unit = app_unit_name(&a.name);
        let text = app_unit_text(&AppUnit {
            name: &a.name,
            generated_by: &format!(
                "cairn provisioning from the node config's [[apps]] entry {:?}",
                a.name
            ),
            description: format!("cairn app {} (image {})", a.name, a.image),
            prepare: None,
            run_args: app_run(a).args(),
            after_start: None,
            after_boot: true,
        });
        e.push(root_file(format!("{UNIT_DIR}/{unit}"), 0o644, text));
        // Enabled as `systemctl enable` would, so it also works in a root that is not running.
        e.push(Entry::Symlink {
            path: format!("{UNIT_DIR}/multi-user.target.wants/{unit}"),
            target: format!("../{unit}"),
        });
        plan.units.push(unit);
    }
    for f in &c.files {
        let content = match (&f.content, &f.content_base64) {
            (Some(t), _) => t.clone().into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD.decode(b.trim())?,
            (None, None) => Vec::new(),
        };
        let owner = f.owner.clone().unwrap_or_else(|| "root".into());
        e.push(Entry::File {
            path: f.path.clone(),
            mode: f
                .mode
                .as_deref()
                .map(parse_mode)
                .transpose()?
                .unwrap_or(0o644),
            group: f.group.clone().unwrap_or_else(|| owner.clone()),
            owner,
            content,
        });
    }
    // A user's file must not silently replace what another key renders.
    let mut seen = std::collections::BTreeSet::new();
    for entry in &plan.entries {
        if !seen.insert(entry.path()) {
            bail!(
                "node config: {} is written twice (a [[files]] entry and another key both set it); drop one",
                entry.path()
            );
        }
    }
    Ok(plan)
}

/// The options of a provisioned app as `host app run` takes them.
pub fn app_run(a: &super::config::App) -> AppRun<'_> {
    AppRun {
        name: &a.name,
        restart: a.restart.as_deref(),
        memory: a.memory.as_deref(),
        cpus: a.cpus.as_deref(),
        pids: a.pids.as_deref(),
        ip: a.ip,
        health_cmd: a.health_cmd.as_deref(),
        health_interval: a.health_interval.as_deref(),
        services: &a.services,
        env: &a.env,
        image: a.image.clone(),
        command: &a.command,
    }
}

fn network_file(iface: &Interface) -> String {
    let mut t = String::from("# Written by cairn provisioning from the node config.\n[Match]\n");
    match (&iface.name, &iface.mac) {
        (Some(n), _) => {
            let _ = writeln!(t, "Name={n}");
        }
        (None, Some(m)) => {
            let _ = writeln!(t, "MACAddress={}", m.to_ascii_lowercase());
        }
        (None, None) => {}
    }
    t.push_str("\n[Network]\n");
    let dhcp = iface.dhcp.unwrap_or(iface.addresses.is_empty());
    let _ = writeln!(t, "DHCP={}", if dhcp { "yes" } else { "no" });
    for a in &iface.addresses {
        let _ = writeln!(t, "Address={a}");
    }
    if let Some(g) = &iface.gateway {
        let _ = writeln!(t, "Gateway={g}");
    }
    for d in &iface.dns {
        let _ = writeln!(t, "DNS={d}");
    }
    for r in &iface.routes {
        let _ = write!(
            t,
            "\n[Route]\nDestination={}\nGateway={}\n",
            r.destination, r.gateway
        );
        if let Some(m) = r.metric {
            let _ = writeln!(t, "Metric={m}");
        }
    }
    t
}
