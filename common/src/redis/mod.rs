//! Redis: the pool, key names, cluster slots and the credit scripts.
//!
//! - `keys`: every key name, each user's under the hash tag `{USER_ID}`;
//! - `slot`: CRC16 slots and a hash tag for each (the slot sentinels);
//! - `scripts`: the credit scripts (`lua/*.lua`), their key sets and replies.

pub mod keys;
pub mod scripts;
pub mod slot;

use std::time::Duration;

use crate::settings::Settings;

/// A Redis pool; `redis://host/N` selects database N on every connection.
/// `rediss://` verifies the server against the system roots plus
/// `tls.ca_file` and presents the client identity (`common::tls`).
pub fn redis_pool(settings: &Settings) -> anyhow::Result<deadpool_redis::Pool> {
    let material = crate::tls::TlsMaterial::load(&settings.tls)?;
    let client = crate::tls::redis_client(&settings.redis.url, &material)
        .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?;
    let manager = deadpool_redis::Manager::new(client.get_connection_info().clone())
        .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?;
    let timeout = Some(Duration::from_millis(settings.redis.timeout_ms));
    let config = deadpool_redis::PoolConfig {
        max_size: settings.redis.pool_size,
        timeouts: deadpool_redis::Timeouts {
            wait: timeout,
            create: timeout,
            recycle: timeout,
        },
        ..Default::default()
    };
    deadpool_redis::Pool::builder(manager)
        .config(config)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))
}
