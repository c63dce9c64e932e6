//! The gateway's integration tests: one binary, one module per resource.

mod access;
mod analytics;
mod auth;
mod compat;
mod credits;
mod demo;
mod fuzz;
mod helpers;
mod hostile;
mod idempotency;
mod limits;
mod openapi;
mod operator;
mod ops;
mod privacy;
mod profile_cache;
mod rate_limits;
mod reconcile;
mod sessions;
mod signals;
mod startup;
mod usage;
mod usage_events;
mod users;
