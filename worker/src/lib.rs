//! The worker: consumes events from RabbitMQ, writes them to Postgres in
//! batches, acks only after commit, and refreshes Redis caches.
//!
//! # Layout
//! - `main.rs`: the binary; parses the command line and wires.
//! - [`ctx`]: the handles every consumer, job and command shares (`Ctx`).
//! - [`startup`]: builds the worker from settings and runs it until shutdown.
//! - [`consumer`]: one consumer per queue; [`consumer::batch`] decides when a batch closes,
//!   [`consumer::disposition`] what happens to what Postgres refuses.
//! - [`handlers`]: one file per kind of event, writing a batch in one transaction;
//!   `sanitize` cleans events before a write, `usage::rollup` builds the `usage_daily` cells.
//! - [`jobs`]: the jobs that run once across workers: `reconcile`, `hold_expiry`, `housekeeping`.
//! - [`alerts`]: spend alerts: crossings recorded with the ledger rows, webhook delivery (a job).
//! - [`cli`]: operator commands: `dlq`, `reconcile`, `demo`.
//! - [`http`]: `/healthz`, `/readyz` and `/metrics`; [`metrics`]: every series, registered at start.

pub mod alerts;
pub mod cli;
pub mod consumer;
pub mod ctx;
#[cfg(test)]
mod fixtures;
pub mod handlers;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod startup;

/// Paths that tests (the gateway's among them) name.
pub use cli::{demo, dlq};
pub use jobs::reconcile;

use common::settings::Settings;

/// Applies the embedded migrations; safe to run any number of times.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(&common::db::pg_options(settings)?).await?;
    common::db::MIGRATOR.run(&mut conn).await?;
    conn.close().await?;
    tracing::info!("migrations applied");
    Ok(())
}
