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

/// What handlers share, behind one `Arc`: a request clones the state several
/// times (extractors, middleware), and one reference count is cheaper than a
/// dozen plus a `String`.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
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

impl Shared {
    /// The shared multiplexed Redis connection (503 when Redis is down).
    /// Concurrent requests pipeline on it; a pooled connection would cost a
    /// `PING` per checkout and queue requests for the pool's few sockets.
    pub async fn redis(&self) -> crate::error::Result<LinkConn> {
        Ok(LinkConn(self.redis_link.connection().await?))
    }
}

/// A handle on the shared connection; `&mut *conn` is a `ConnectionLike`.
pub struct LinkConn(redis::aio::MultiplexedConnection);

impl std::ops::Deref for LinkConn {
    type Target = redis::aio::MultiplexedConnection;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for LinkConn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
