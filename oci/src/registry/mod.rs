//! Images from registries over the OCI distribution API: `host app pull`,
//! and the builder resolving `[[apps]] image = "REGISTRY/REPO:TAG"`.
//!
//! A pull resolves the reference to a manifest (picking the platform's from
//! an index), downloads its blobs into a private OCI layout — several at
//! once, each verified against its digest while it streams, resumed with a
//! range request when a connection drops — and imports that layout like any
//! other, with the same limits. The layout is removed whatever happens.

mod client;
mod config;
mod pull;
mod reference;

use std::time::Duration;

pub use client::{Client, ClientOptions};
pub use config::{default_auth_files, default_registries_conf, Credentials};
pub use pull::{pull_layout, resolve, PullOptions, Resolved};
pub use reference::{Platform, Reference};

/// What a pull reports while it works; the caller draws it (libraries do
/// not print). Every method has a do-nothing default.
pub trait PullProgress: Sync {
    /// The manifest is known: `blobs` to fetch, `bytes` together.
    fn resolved(&self, _manifest: &str, _blobs: usize, _bytes: u64) {}
    fn blob_started(&self, _digest: &str, _size: u64) {}
    /// `bytes` more of `digest` arrived.
    fn blob_advanced(&self, _digest: &str, _bytes: u64) {}
    fn blob_finished(&self, _digest: &str) {}
    /// An attempt at `what` failed with `error`; attempt `attempt` follows
    /// after `wait`.
    fn retrying(&self, _what: &str, _attempt: u32, _wait: Duration, _error: &anyhow::Error) {}
}

/// A [`PullProgress`] that reports nothing.
pub struct Quiet;
impl PullProgress for Quiet {}
