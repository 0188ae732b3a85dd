//! Names every node shares, whoever writes them (the image writer) or reads
//! them (the updater).

/// The stateroot (libostree's osname) of every cairn node.
pub const STATEROOT: &str = "cairn";
/// The remote in the node's repository that updates come from; a
/// deployment's origin is `REMOTE:REF`.
pub const REMOTE: &str = "cairn";
