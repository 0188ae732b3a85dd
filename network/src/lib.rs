//! cairn-network: the fleet network. A node configured for one leases a
//! subnet of the fleet's container network in etcd ([`lease`]), gives its
//! bridge that subnet and routes to every other node's subnet without NAT
//! ([`links`]), following etcd with a watch ([`agent`]). Without a fleet
//! network a node keeps the single-node bridge and none of this runs.

pub mod agent;
pub mod dns;
pub mod lease;
pub mod links;
pub mod registry;
pub mod status;
