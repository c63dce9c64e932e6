//! The worker: consumes events from RabbitMQ, writes them to Postgres in
//! batches, acks only after commit, and refreshes Redis caches.

pub mod consumer;
pub mod demo;
pub mod dlq;
pub mod handlers;
pub mod http;
pub mod metrics;
pub mod reconcile;
pub mod schedule;
pub mod startup;

use common::settings::Settings;

/// Applies the embedded migrations; safe to run any number of times.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&settings.database.url).await?;
    common::infra::MIGRATOR.run(&mut conn).await?;
    conn.close().await?;
    tracing::info!("migrations applied");
    Ok(())
}

/// Whether a database error means "Postgres is unavailable, retry later"
/// (never a reason to dead-letter) rather than "this data is refused".
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // connection exceptions, operator intervention (shutdown), resources,
            // serialization/deadlock: all worth retrying.
            c.starts_with("08")
                || c.starts_with("57")
                || c.starts_with("53")
                || c == "40001"
                || c == "40P01"
        }),
        _ => false,
    }
}
