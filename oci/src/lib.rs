//! cairn-oci: OCI images into an OSTree repository, for the builder (images
//! baked into a host tree, `[[apps]]`) and the runtime (the node's image
//! store) alike.
//!
//! Every image is hostile until verified: blobs are checked against their
//! digests while they stream ([`source`]), layers are applied with every
//! write resolved inside the staging tree and never through a symlink
//! ([`layer`]), and sizes, counts and ratios are bounded before reading
//! ([`limits::ImportLimits`]). The result is one commit per image, its
//! manifest digest and config in the commit metadata ([`image`]).

pub mod image;
pub mod layer;
pub mod limits;
mod mounts;
pub mod registry;
pub mod source;
pub mod store;
