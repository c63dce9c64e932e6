//! Operator commands of the `worker` binary, apart from `run` and `migrate`.

pub mod demo;
pub mod dlq;
pub mod reconcile;
