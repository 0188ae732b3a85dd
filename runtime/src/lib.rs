//! cairn-runtime: run application containers from immutable, content-addressed images.
//!
//! Images are imported into an OSTree repository and checked out read-only
//! by the image store (`cairn_oci::store`); the runtime reads those
//! checkouts without libostree ([`image`], the layout in
//! `cairn_contracts::image`), so running and supervising a container never
//! loads it. Containers run from a read-only checkout of the image commit
//! ([`container`]), each described as an OCI runtime config ([`spec`]), with
//! their own network namespace on a host bridge ([`net`]), cgroup v2 limits
//! ([`cgroup`]) and a small supervising monitor process ([`monitor`]).

pub mod cgroup;
pub mod console;
pub mod container;
pub mod context;
pub mod engine;
pub mod idle;
pub mod logfile;
pub mod monitor;
pub mod mountfd;
mod mountplan;
pub mod net;
mod seccomp_bpf;
pub mod spec;
pub mod state;
pub mod userns;

// What an image is, and where a state root keeps its checkouts.
pub use cairn_contracts::image;
pub use context::{MonitorCommand, Runtime};
pub use engine::{NotCheckedOut, PsEntry, RunOptions, RunOutcome};
