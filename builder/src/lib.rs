//! cairn-builder: compose a versioned, content-addressed host tree from a TOML
//! manifest and commit it to an OSTree repository through libostree.

pub mod apps;
pub mod apt;
pub mod compose;
pub mod confined;
pub mod diff;
pub mod image;
pub mod keys;
pub mod lock;
pub mod manifest;
pub mod progress;
pub mod publish;
pub mod repo;
pub mod sbom;
pub mod stage;
pub mod tree;
