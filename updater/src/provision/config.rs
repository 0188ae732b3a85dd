//! The node config: one TOML document that tells a node who it is at first
//! boot (docs/provisioning.md). Parsing refuses unknown keys with their line;
//! [`NodeConfig::parse`] then checks every value, naming the key it came
//! from, so a config that parses is one the node can apply.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use cairn_contracts::network::FleetNetwork;

use crate::agent::config::Fragment as AgentFragment;
use crate::health::Kind as HealthKind;

/// The only format this build reads; a later one is refused, never guessed at.
pub const FORMAT_VERSION: u32 = 1;
/// A config is read whole, from sources an attacker may control: bounded first.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// One `[[files]]` entry's decoded content.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// One health check script.
pub const MAX_SCRIPT_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[schemars(
    title = "cairn node config",
    description = "What a cairn node is told at first boot: docs/provisioning.md"
)]
pub struct NodeConfig {
    /// The format of this document: 1.
    pub version: u32,
    /// The node's hostname (one DNS label, or several joined by dots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// An IANA time zone, e.g. `Europe/Berlin` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Users to create; `name = "root"` sets root's keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Network settings; interfaces not named here keep DHCP.
    #[serde(default, skip_serializing_if = "Network::is_empty")]
    pub network: Network,
    /// Kernel parameters (`sysctl.d`), e.g. `"net.core.somaxconn" = 1024`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctl: BTreeMap<String, SysctlValue>,
    /// Extra files under /etc or /var.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<File>,
    /// What the node updates from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<Update>,
    /// The update agent's settings: the keys of /etc/cairn/agent.toml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentFragment>,
    /// The fleet network this node joins: the keys of /etc/cairn/network.toml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetNetwork>,
    /// Health checks that gate updates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<HealthCheck>,
    /// Containers to run at every boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<App>,
    /// Kernel arguments to add, once, as a new deployment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct User {
    pub name: String,
    /// Supplementary groups; each must exist in the tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// OpenSSH public keys, one per entry (`ssh-ed25519 AAAA… comment`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// A crypt(3) hash (`$y$…`, `$6$…`); none by default: no password login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Network {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
}

impl Network {
    fn is_empty(&self) -> bool {
        self.interfaces.is_empty()
    }
}

/// One interface, matched by `name` or by `mac` (exactly one of them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Interface {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `52:54:00:12:34:56`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// DHCP on this interface; default: only when it has no `addresses`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<bool>,
    /// Static addresses with their prefix, `192.0.2.10/24`, `2001:db8::10/64`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The default route's gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Route {
    /// `10.0.0.0/8`
    pub destination: String,
    pub gateway: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SysctlValue {
    Integer(i64),
    Text(String),
}

impl std::fmt::Display for SysctlValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SysctlValue::Integer(i) => write!(f, "{i}"),
            SysctlValue::Text(s) => f.write_str(s),
        }
    }
}

/// A file the node writes once: `content` or `content-base64`, not both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct File {
    /// An absolute path under /etc or /var.
    pub path: String,
    /// Octal permission bits, default `"0644"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// User name, default root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Group name, default the owner's name (root for root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Update {
    /// `REMOTE:REF` the node follows from now on (a channel, say,
    /// `cairn:cairn/bookworm/x86_64/green`): its next upgrade, or the
    /// agent's next check, moves it to that ref's head.
    #[serde(rename = "ref")]
    pub ref_: String,
    /// Where that remote fetches from, replacing the URL the image was
    /// written with (its signature checks and keys stay as they are):
    /// `https://…`, or `http://…` for a repository on a trusted network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HealthCheck {
    /// The check's file name under /etc/cairn/health.d/<kind>/.
    pub name: String,
    /// `required` (a failure on a new deployment's first boot rolls back) or `wanted`.
    pub kind: HealthKind,
    /// The script, starting with `#!`.
    pub script: String,
}

/// A container started at every boot, `host app run --detach` with these options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct App {
    /// Container name (and unit `cairn-app-<name>.service`).
    pub name: String,
    /// An image in the node's store: `name:tag` or `name@sha256:…`.
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// `KEY=VALUE`
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<String>,
    /// Services it is an instance of while healthy: `NAME` or
    /// `NAME:PORT`, as `host app run --service` (docs/network.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// `no`, `on-failure` or `always` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
}

impl NodeConfig {
    /// Parses and checks `text`; `origin` (a path, "fw_cfg", a URL) names
    /// it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<NodeConfig> {
        let config: NodeConfig = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("node config {origin}: {}", e.to_string().trim_end()))?;
        config
            .check()
            .with_context(|| format!("node config {origin}"))?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        if self.version != FORMAT_VERSION {
            bail!(
                "version: {} is not a format this build reads (it reads version = {FORMAT_VERSION})",
                self.version
            );
        }
        if let Some(h) = &self.hostname {
            check_hostname(h).context("hostname")?;
        }
        if let Some(tz) = &self.timezone {
            check_timezone(tz).context("timezone")?;
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let key = format!("users[{i}]");
            check_account_name(&u.name).with_context(|| format!("{key}.name"))?;
            if !names.insert(u.name.as_str()) {
                bail!("{key}.name: user {:?} is listed twice", u.name);
            }
            for (j, g) in u.groups.iter().enumerate() {
                check_account_name(g).with_context(|| format!("{key}.groups[{j}]"))?;
            }
            for (j, k) in u.ssh_authorized_keys.iter().enumerate() {
                check_ssh_key(k).with_context(|| format!("{key}.ssh-authorized-keys[{j}]"))?;
            }
            if let Some(h) = &u.password_hash {
                check_password_hash(h).with_context(|| format!("{key}.password-hash"))?;
            }
        }
        let mut matched = std::collections::BTreeSet::new();
        for (i, iface) in self.network.interfaces.iter().enumerate() {
            let key = format!("network.interfaces[{i}]");
            let by = match (&iface.name, &iface.mac) {
                (Some(n), None) => {
                    check_ifname(n).with_context(|| format!("{key}.name"))?;
                    format!("name {n}")
                }
                (None, Some(m)) => {
                    check_mac(m).with_context(|| format!("{key}.mac"))?;
                    format!("mac {}", m.to_ascii_lowercase())
                }
                _ => bail!("{key}: give exactly one of `name` and `mac`"),
            };
            if !matched.insert(by.clone()) {
                bail!("{key}: {by} is configured twice");
            }
            for (j, a) in iface.addresses.iter().enumerate() {
                check_prefix(a, true).with_context(|| format!("{key}.addresses[{j}]"))?;
            }
            if let Some(g) = &iface.gateway {
                check_ip(g).with_context(|| format!("{key}.gateway"))?;
            }
            for (j, r) in iface.routes.iter().enumerate() {
                check_prefix(&r.destination, false)
                    .with_context(|| format!("{key}.routes[{j}].destination"))?;
                check_ip(&r.gateway).with_context(|| format!("{key}.routes[{j}].gateway"))?;
            }
            for (j, d) in iface.dns.iter().enumerate() {
                check_ip(d).with_context(|| format!("{key}.dns[{j}]"))?;
            }
            if iface.dhcp == Some(false) && iface.addresses.is_empty() {
                bail!(
                    "{key}: dhcp = false and no addresses: the interface would stay unconfigured"
                );
            }
        }
        for (k, v) in &self.sysctl {
            check_sysctl(k, v).with_context(|| format!("sysctl.{k:?}"))?;
        }
        let mut paths = std::collections::BTreeSet::new();
        for (i, f) in self.files.iter().enumerate() {
            let key = format!("files[{i}]");
            check_file(f).with_context(|| format!("{key} ({})", f.path))?;
            if !paths.insert(f.path.as_str()) {
                bail!("{key}.path: {} is listed twice", f.path);
            }
        }
        if let Some(update) = &self.update {
            check_refspec(&update.ref_).context("update.ref")?;
            if let Some(url) = &update.url {
                check_remote_url(url).context("update.url")?;
            }
        }
        if let Some(agent) = &self.agent {
            // The agent's own reader checks it; the node's machine id is
            // not known yet, so a stand-in fills a missing fleet-lock id.
            crate::agent::config::check_fragment(agent, "node-id").context("agent")?;
        }
        if let Some(fleet) = &self.fleet {
            // The network agent's own checks, naming the key at fault.
            fleet.validate().context("fleet")?;
        }
        let mut checks = std::collections::BTreeSet::new();
        for (i, h) in self.health.iter().enumerate() {
            let key = format!("health[{i}]");
            check_file_name(&h.name).with_context(|| format!("{key}.name"))?;
            if !checks.insert(h.name.as_str()) {
                bail!("{key}.name: check {:?} is listed twice", h.name);
            }
            if h.script.len() > MAX_SCRIPT_BYTES {
                bail!("{key}.script: over {MAX_SCRIPT_BYTES} bytes");
            }
            if !h.script.starts_with("#!") {
                bail!("{key}.script: must start with an interpreter line, e.g. #!/bin/sh");
            }
        }
        let mut apps = std::collections::BTreeSet::new();
        for (i, a) in self.apps.iter().enumerate() {
            if !apps.insert(a.name.as_str()) {
                bail!("apps[{i}].name: app {:?} is listed twice", a.name);
            }
            if a.image.is_empty() || a.image.starts_with('-') {
                bail!("apps[{i}].image: {:?} is not an image name", a.image);
            }
        }
        for (i, k) in self.kernel_args.iter().enumerate() {
            check_karg(k).with_context(|| format!("kernel-args[{i}]"))?;
        }
        Ok(())
    }
}

/// RFC 1123 labels, at most 253 bytes in all.
fn check_hostname(h: &str) -> Result<()> {
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if h.is_empty() || h.len() > 253 || !h.split('.').all(ok_label) {
        bail!(
            "{h:?} is not a hostname: letters, digits and '-' in dot-separated labels of 1 to 63"
        );
    }
    Ok(())
}

/// An IANA name: `Area/Location` words, never a path out of zoneinfo.
fn check_timezone(tz: &str) -> Result<()> {
    let ok = !tz.is_empty()
        && tz.len() <= 64
        && tz.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_+-".contains(&b))
        });
    if !ok {
        bail!("{tz:?} is not an IANA time zone name (e.g. UTC, Europe/Berlin)");
    }
    Ok(())
}

/// A POSIX-portable account name, as Debian's adduser takes by default.
fn check_account_name(n: &str) -> Result<()> {
    let b = n.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
    if !ok {
        bail!("{n:?} is not an account name: lowercase letters, digits, '_' and '-', starting with a letter or '_', at most 32");
    }
    Ok(())
}

const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// `TYPE BASE64 [COMMENT]` on one line, the blob naming the same type.
/// Options (`command=…`, `from=…`) are refused: a config hands out logins,
/// never forced commands one cannot see at a glance.
fn check_ssh_key(k: &str) -> Result<()> {
    if k.contains(['\n', '\r', '\0']) {
        bail!("one key per entry, on one line");
    }
    let mut parts = k.split_ascii_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        bail!("not an OpenSSH public key: write it as `ssh-ed25519 AAAA… comment`");
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        bail!(
            "key type {kind:?} is not one of {} (options before the type are not taken)",
            SSH_KEY_TYPES.join(", ")
        );
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| anyhow::anyhow!("the key's base64 does not decode"))?;
    let named = bytes
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|len| bytes.get(4..4 + len));
    if named != Some(kind.as_bytes()) {
        bail!("the key's data is not a {kind} key");
    }
    Ok(())
}

/// A crypt(3) hash of a scheme Debian 12's libcrypt verifies; never a
/// clear-text password.
fn check_password_hash(h: &str) -> Result<()> {
    let scheme_ok = ["$y$", "$gy$", "$7$", "$2b$", "$6$", "$5$"]
        .iter()
        .any(|p| h.starts_with(p));
    if !scheme_ok || h.len() > 512 || h.contains([':', '\n', '\r', '\0', ' ']) {
        bail!("not a crypt(3) hash: make one with `mkpasswd -m yescrypt` (a clear-text password is never taken)");
    }
    Ok(())
}

fn check_ifname(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 15
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !ok {
        bail!("{n:?} is not an interface name (1 to 15 visible characters, no '/' or ':')");
    }
    Ok(())
}

fn check_mac(m: &str) -> Result<()> {
    let parts: Vec<&str> = m.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        bail!("{m:?} is not a MAC address like 52:54:00:12:34:56");
    }
    Ok(())
}

fn check_ip(s: &str) -> Result<IpAddr> {
    s.parse::<IpAddr>()
        .map_err(|_| anyhow::anyhow!("{s:?} is not an IP address"))
}

/// `ADDRESS/PREFIX`; a host address when `host`, else a network (host bits zero).
fn check_prefix(s: &str, host: bool) -> Result<()> {
    let Some((addr, len)) = s.split_once('/') else {
        bail!("{s:?} has no prefix length: write it as 192.0.2.10/24");
    };
    let ip = check_ip(addr)?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u32 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| anyhow::anyhow!("{s:?}: the prefix length must be 0 to {max}"))?;
    if !host {
        let bits = match ip {
            IpAddr::V4(v) => u128::from(u32::from(v)) << 96,
            IpAddr::V6(v) => u128::from(v),
        };
        let host_bits = if len == 0 { bits } else { bits << len };
        if host_bits != 0 {
            bail!("{s:?} has host bits set: a route's destination is a network");
        }
    }
    Ok(())
}

/// `a.b.c` words; the value on one line.
fn check_sysctl(k: &str, v: &SysctlValue) -> Result<()> {
    let key_ok = !k.is_empty()
        && k.len() <= 256
        && !k.starts_with(['.', '/'])
        && !k.contains("..")
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/*".contains(&b));
    if !key_ok {
        bail!("not a sysctl key (letters, digits, '.', '_', '-', '/')");
    }
    if let SysctlValue::Text(t) = v {
        if t.is_empty() || t.len() > 4096 || t.contains(['\n', '\r', '\0']) {
            bail!("the value must be one non-empty line");
        }
    }
    Ok(())
}

/// Where provisioning may write a user's file.
const FILE_ROOTS: &[&str] = &["/etc/", "/var/"];
/// Files other keys own: the account files (`[[users]]`) and provisioning's
/// own state, which a `[[files]]` entry would silently undo.
const RESERVED: &[&str] = &[
    "/etc/passwd",
    "/etc/shadow",
    "/etc/group",
    "/etc/gshadow",
    "/var/lib/cairn/provision/",
];

fn check_file(f: &File) -> Result<()> {
    check_node_path(&f.path)?;
    if let Some(r) = RESERVED
        .iter()
        .find(|r| f.path == **r || (r.ends_with('/') && f.path.starts_with(**r)))
    {
        bail!("{r} is written by provisioning itself (accounts come from [[users]])");
    }
    if let Some(m) = &f.mode {
        parse_mode(m)?;
    }
    if let Some(o) = &f.owner {
        check_account_name(o).context("owner")?;
    }
    if let Some(g) = &f.group {
        check_account_name(g).context("group")?;
    }
    match (&f.content, &f.content_base64) {
        (Some(c), None) if c.len() > MAX_FILE_BYTES => {
            bail!("content: over {MAX_FILE_BYTES} bytes")
        }
        (None, Some(b)) => {
            // Bounded before decoding: base64 is 4 bytes per 3.
            if b.len() > MAX_FILE_BYTES / 3 * 4 + 4 {
                bail!("content-base64: over {MAX_FILE_BYTES} bytes decoded");
            }
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| anyhow::anyhow!("content-base64 does not decode: {e}"))?;
        }
        (Some(_), Some(_)) => bail!("give `content` or `content-base64`, not both"),
        (None, None) => bail!("give `content` or `content-base64` (empty content is \"\")"),
        (Some(_), None) => {}
    }
    Ok(())
}

/// An absolute, normalized path under /etc or /var: no `.`, `..`, empty
/// components or control characters, so it names one place in any root.
pub fn check_node_path(p: &str) -> Result<()> {
    if !FILE_ROOTS.iter().any(|r| p.starts_with(r)) {
        bail!("{p:?}: files go under /etc or /var (the rest of the tree is read-only)");
    }
    if p.len() > 1024
        || p.ends_with('/')
        || p.bytes().any(|b| b.is_ascii_control())
        || p[1..]
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("{p:?} is not a plain absolute path (no '.', '..', '//', trailing '/' or control characters)");
    }
    Ok(())
}

/// `"0644"`-style octal permission bits (no file type, at most 07777).
pub fn parse_mode(m: &str) -> Result<u32> {
    u32::from_str_radix(m, 8)
        .ok()
        .filter(|v| *v <= 0o7777 && !m.is_empty() && m.len() <= 5)
        .ok_or_else(|| anyhow::anyhow!("mode {m:?} is not octal permission bits like \"0644\""))
}

fn check_file_name(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        bail!("{n:?}: letters, digits, '.', '_' and '-', not starting with '.'");
    }
    Ok(())
}

/// `REMOTE:REF`, both plain OSTree names.
fn check_refspec(r: &str) -> Result<()> {
    let ok_part = |p: &str, slash: bool| {
        !p.is_empty()
            && !p.starts_with(['.', '-', '/'])
            && !p.ends_with('/')
            && !p.contains("..")
            && !p.contains("//")
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || (slash && b == b'/'))
    };
    match r.split_once(':') {
        Some((remote, ref_)) if ok_part(remote, false) && ok_part(ref_, true) => Ok(()),
        _ => bail!("{r:?} is not REMOTE:REF, e.g. cairn:cairn/bookworm/x86_64/container-host"),
    }
}

/// A remote's URL: http(s), at most 2 KiB, without spaces, control
/// characters or anything that would end a line of the repository's config.
fn check_remote_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !rest.starts_with('/')
                && url.len() <= 2048
                && !url.contains(|c: char| c.is_whitespace() || c.is_control()) =>
        {
            Ok(())
        }
        _ => bail!(
            "{url:?} is not an http:// or https:// URL of a repository, e.g. https://updates.example.net/cairn/repo"
        ),
    }
}

/// One kernel argument: `key` or `key=value`, no spaces, quotes or control characters.
fn check_karg(k: &str) -> Result<()> {
    let ok = !k.is_empty()
        && k.len() <= 1024
        && !k.starts_with('=')
        && k.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\'');
    if !ok {
        bail!("{k:?} is not one kernel argument (key or key=value, no spaces or quotes)");
    }
    Ok(())
}

/// The JSON Schema of the format, as published in docs/provisioning.schema.json.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(NodeConfig);
    serde_json::to_string_pretty(&schema).expect("a schema serializes") + "\n"
}
