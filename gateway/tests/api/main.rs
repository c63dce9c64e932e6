//! The gateway's integration tests: one binary, one module per resource.

mod helpers;
mod ops;
mod rate_limits;
mod sessions;
mod signals;
mod usage;
