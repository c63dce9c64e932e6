//! The gateway's integration tests: one binary, one module per resource.

mod auth;
mod helpers;
mod ops;
mod startup;
mod users;
