//! RabbitMQ: the connection and the topology both binaries declare.

pub mod connect;
pub mod topology;

pub use connect::connect;
pub use topology::{Topology, QUEUES};
