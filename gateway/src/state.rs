//! What every handler shares (`AppState`), and the handles the domain takes
//! instead of all of it: `CreditStore`, `UserStore`, `SessionStore`,
//! `Limiter`. Each is a few clones of the shared pools and connection plus
//! the settings it reads, built once in `startup::app_state`.

use std::sync::Arc;

use common::redis::keys::Keys;
use common::settings::Settings;
use sqlx::PgPool;

use crate::auth::Authenticator;
use crate::credits::recovery::Recovery;
use crate::credits::CreditStore;
use crate::publisher::Publisher;
use crate::rate_limit::Limiter;
pub use crate::redis_link::LinkConn;
use crate::redis_link::RedisLink;
use crate::sessions::SessionStore;
use crate::users::Directory;
use crate::users::UserStore;

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
    pub redis: common::redis::Pool,
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
    /// The handles the credit flows use (clones of the ones above).
    pub credits: CreditStore,
    /// The handles the session flow uses.
    pub sessions: SessionStore,
    /// The handles the user records and preferences use.
    pub user_store: UserStore,
    /// The handles a rate-limit decision uses.
    pub limiter: Limiter,
    /// Extension API keys: their store and this gateway's short cache of them.
    pub api_keys: crate::api_keys::ApiKeyStore,
    /// The price book in memory, reloaded every `pricing.refresh_ms`.
    pub pricing: Arc<crate::credits::pricing::PriceCache>,
}

impl Shared {
    /// The shared multiplexed Redis connection (503 when Redis is down).
    /// Concurrent requests pipeline on it; a pooled connection would cost a
    /// `PING` per checkout and queue requests for the pool's few sockets.
    pub async fn redis(&self) -> crate::error::Result<LinkConn> {
        Ok(self.redis_link.link_conn().await?)
    }
}
