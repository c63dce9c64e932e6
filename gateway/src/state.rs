//! What every handler shares.

use std::sync::Arc;

use common::keys::Keys;
use common::settings::Settings;
use sqlx::PgPool;

use crate::auth::Authenticator;
use crate::credits::recovery::Recovery;
use crate::publisher::Publisher;
use crate::redis_link::RedisLink;
use crate::users::Directory;

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub pg: PgPool,
    pub redis: deadpool_redis::Pool,
    /// One multiplexed connection with a breaker, for the per-request hot
    /// path (rate limits, user lookups): no stall while Redis is down.
    pub redis_link: Arc<RedisLink>,
    pub keys: Keys,
    pub publisher: Publisher,
    pub auth: Arc<Authenticator>,
    pub users: Arc<Directory>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Whether Redis lost its credit data and a recovery is running.
    pub recovery: Arc<Recovery>,
}

impl AppState {
    /// A pooled Redis connection (503 when Redis is down).
    pub async fn redis(&self) -> crate::http::error::Result<deadpool_redis::Connection> {
        Ok(self.redis.get().await?)
    }
}
