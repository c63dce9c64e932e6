//! Shared building blocks of gateway and worker: settings, event envelope and
//! types, AMQP topology, Redis key names, connections, telemetry, shutdown.

pub mod credits;
pub mod events;
pub mod infra;
pub mod keys;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
pub mod valid;

pub use settings::Settings;
