//! cairn-builder: compose a versioned, content-addressed host tree from a TOML
//! manifest and commit it to an OSTree repository through libostree.

pub mod manifest;
