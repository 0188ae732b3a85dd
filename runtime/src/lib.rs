//! cairn-runtime: run application containers from immutable, content-addressed images.
//!
//! Images are imported from OCI layouts/archives into an OSTree repository
//! (by `cairn-oci`) and checked out read-only ([`image`]); containers run from a read-only checkout of the image commit
//! ([`container`]), each described as an OCI runtime config ([`spec`]), with
//! their own network namespace on a host bridge ([`net`]), cgroup v2 limits
//! ([`cgroup`]) and a small supervising monitor process ([`monitor`]).

pub mod cgroup;
pub mod container;
pub mod context;
pub mod engine;
pub mod image;
pub mod monitor;
pub mod mountfd;
mod mountplan;
pub mod net;
pub mod spec;
pub mod state;
pub mod userns;

// The OCI side lives in `cairn-oci`, shared with the builder.
pub use cairn_oci::{layer, source};
pub use context::{MonitorCommand, Runtime};
pub use engine::{Pruned, PsEntry, RunOptions, RunOutcome};
