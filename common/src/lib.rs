//! # Layout
//!
//! Shared building blocks of gateway and worker, one module per job:
//!
//! - `amqp`: the connection (`connect`) and the topology both sides declare (`topology`).
//! - `class`: the endpoint classes, the one list of them.
//! - `consumers`: the one "consumers settled" rule over the credits consumers' heartbeats.
//! - `credits`: the credit decisions as plain functions, twins of their Lua, and a model of one user's credit state (`model`).
//! - `db`: the Postgres pool, the embedded migrations, `is_transient`.
//! - `events`: the event envelope and its versioned, tagged payloads.
//! - `redis`: the pool, key names (`keys`), cluster slots (`slot`), the credit scripts (`scripts`, `lua/*.lua`).
//! - `request_id`: the request id's rule and the task-local that carries it through a request.
//! - `settings`: the one typed configuration tree, its defaults and validation.
//! - `shutdown`: the one shutdown token and the signals that cancel it.
//! - `telemetry`: logs and the Prometheus recorder.
//! - `tls`: the TLS material of `tls.*` for the three stores, the plain-text warnings.
//! - `valid`: field rules shared by bodies and events.
//! - `webhooks`: where a webhook may point (the SSRF rule of the gateway and the worker).

pub mod amqp;
pub mod class;
pub mod consumers;
pub mod credits;
pub mod db;
pub mod events;
pub mod redis;
pub mod request_id;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod valid;
pub mod webhooks;

pub use settings::Settings;
