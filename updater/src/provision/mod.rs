//! First-boot provisioning: a node config (TOML, [`config`]) tells a node
//! its hostname, users and keys, network, agent and fleet settings, health
//! checks and apps; [`render`] turns it into a plan of plain values.
//! docs/provisioning.md describes the format.

pub mod apply;
pub mod config;
pub mod render;

pub use config::NodeConfig;
pub use render::{render, Plan};

#[cfg(test)]
mod tests;
