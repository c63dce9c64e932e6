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
