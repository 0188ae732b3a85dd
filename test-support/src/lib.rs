//! What the cairn test suites would otherwise write several times: a real
//! etcd on loopback ([`etcd`]), one-layer busybox OCI image layouts
//! ([`oci`]), a real OCI registry ([`registry`]), and running `host` and the stock `ostree` CLI ([`cmd`]).
//! A dev-dependency only; it depends on no cairn crate.

pub mod cmd;
pub mod etcd;
pub mod oci;
pub mod registry;

pub use cmd::{
    compose_tree_args, free_port, is_root, line_value, ostree_cli, output_text, require_root,
    try_ostree_cli, Host,
};
pub use etcd::{Etcd, EtcdOptions};
pub use oci::{busybox_layout, Applets, LayoutSpec};
pub use registry::{Registry, RegistryOptions};
