//! cairn-runtime: run application containers from immutable, content-addressed images.
