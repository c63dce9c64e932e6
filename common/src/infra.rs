//! Connections to the three dependencies, built from `Settings`.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::settings::Settings;

/// A lazily connecting Postgres pool: processes start (and serve what they
/// can) while Postgres is down, and connect once it answers.
pub fn pg_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    let opts: PgConnectOptions = settings
        .database
        .url
        .parse()
        .map_err(|e| anyhow::anyhow!("DATABASE_URL: {e}"))?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_millis(settings.database.acquire_timeout_ms))
        .connect_lazy_with(opts))
}

/// A Redis pool; `redis://host/N` selects database N on every connection.
pub fn redis_pool(settings: &Settings) -> anyhow::Result<deadpool_redis::Pool> {
    let mut cfg = deadpool_redis::Config::from_url(settings.redis.url.clone());
    let timeout = Some(Duration::from_millis(settings.redis.timeout_ms));
    cfg.pool = Some(deadpool_redis::PoolConfig {
        max_size: settings.redis.pool_size,
        timeouts: deadpool_redis::Timeouts {
            wait: timeout,
            create: timeout,
            recycle: timeout,
        },
        ..Default::default()
    });
    cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))
}

/// The migrations, embedded in the binaries.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
