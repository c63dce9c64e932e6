//! Redis: the pool, key names, cluster slots and the credit scripts.
//!
//! - `conn`: the client, connection and pool, single node or cluster;
//! - `keys`: every key name, each user's under the hash tag `{USER_ID}`;
//! - `slot`: CRC16 slots and a hash tag for each (the slot sentinels);
//! - `scripts`: the credit scripts (`lua/*.lua`), their key sets and replies.

pub mod conn;
pub mod keys;
pub mod scripts;
pub mod slot;

pub use conn::{scan_match, Client, Conn, Pool, PoolConn, PoolError};

use crate::settings::Settings;

/// The Redis pool of the settings: `redis.cluster_urls` set means a cluster
/// (and `redis.url` is unused), else the one node of `redis.url`, where
/// `redis://host/N` selects database N on every connection. `rediss://`
/// verifies the server against the system roots plus `tls.ca_file` and
/// presents the client identity (`common::tls`).
pub fn redis_pool(settings: &Settings) -> anyhow::Result<Pool> {
    let material = crate::tls::TlsMaterial::load(&settings.tls)?;
    conn::pool(&settings.redis, &material)
}
