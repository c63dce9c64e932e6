//! The gateway's integration tests: one binary, one module per resource.

mod credits;
mod helpers;
mod ops;
