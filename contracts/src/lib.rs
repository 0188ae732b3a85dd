//! cairn-contracts: what the builder, the updater, the runtime and `host`
//! share, defined once — the bottom of the crate graph, depending on none
//! of them. Every state file is written the same way ([`durable`]) and
//! every duration, whether a flag or a config key, has one grammar
//! ([`duration`]).

pub mod durable;
pub mod duration;
pub mod grub;
pub mod image;
pub mod metadata;
pub mod names;
pub mod network;
pub mod packages;
pub mod procfs;
pub mod rootpath;
pub mod services;
pub mod size;
pub mod trust;
pub mod units;
