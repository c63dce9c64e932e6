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
    /// The handles the credit flows use (clones of the ones above).
    pub credits: CreditStore,
    /// The handles the session flow uses.
    pub sessions: SessionStore,
    /// The handles the user records and preferences use.
    pub user_store: UserStore,
    /// The handles a rate-limit decision uses.
    pub limiter: Limiter,
}

/// What a rate-limit decision uses: the shared Redis connection (GCRA in one
/// script), Postgres (the fallback counter) and what to do when Redis fails
/// (`rate_limit.on_redis_error`). Cheap to clone.
#[derive(Clone)]
pub struct Limiter {
    /// The multiplexed connection of [`Shared::redis_link`].
    pub redis_link: Arc<RedisLink>,
    pub pg: PgPool,
    pub policy: common::settings::RedisErrorPolicy,
}

/// What the user records use: Postgres (the truth), the shared Redis
/// connection (the `user:` hashes and the preferences size ledger), the key
/// names, this gateway's directory, the credit store (a provisioned user's credits are loaded at once)
/// and the two user settings. Cheap to clone.
#[derive(Clone)]
pub struct UserStore {
    pub pg: PgPool,
    /// The multiplexed connection of [`Shared::redis_link`].
    pub redis_link: Arc<RedisLink>,
    pub keys: Keys,
    /// This gateway's cached records ([`Shared::users`]): a change drops
    /// its user's copy.
    pub directory: Arc<Directory>,
    pub credits: CreditStore,
    /// `plans.free.starting_credits`: what a user seen for the first time is
    /// granted (every new user starts on the free plan).
    pub starting_credits: i64,
    /// `users.max_preferences_bytes`: the bound on a user's merged preferences.
    pub max_preferences_bytes: usize,
}

/// What the session flow uses: the shared Redis connection, the key names and
/// the two session settings. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    /// The multiplexed connection of [`Shared::redis_link`].
    pub redis_link: Arc<RedisLink>,
    pub keys: Keys,
    /// `sessions.ttl_secs`: how long an unused session lives.
    pub ttl_secs: u64,
    /// `sessions.max_per_user`: live sessions a user may have; the least
    /// recently used is evicted past it.
    pub max_per_user: usize,
}

impl SessionStore {
    /// The shared multiplexed Redis connection (503 when Redis is down).
    pub async fn redis(&self) -> crate::error::Result<LinkConn> {
        Ok(LinkConn(self.redis_link.connection().await?))
    }
}

/// What the credit flows use, and nothing more (issue 17: a credit store, not
/// the whole state): Postgres for the ledger, the shared Redis connection for
/// the scripts, the key names, the recovery flag and the settings the scripts
/// read. The flows take it beside the [`Publisher`]. Cheap to clone.
#[derive(Clone)]
pub struct CreditStore {
    pub pg: PgPool,
    /// The multiplexed connection of [`Shared::redis_link`].
    pub redis_link: Arc<RedisLink>,
    pub keys: Keys,
    /// Shared with [`Shared::recovery`]: a script that finds its sentinel gone
    /// turns every credit write to 503 at once.
    pub recovery: Arc<Recovery>,
    pub limits: CreditLimits,
}

/// The settings the credit flows read, copied once at start.
#[derive(Debug, Clone, Copy)]
pub struct CreditLimits {
    /// `credits.idempotency_ttl_secs`: how long a remembered 200 lives.
    pub idempotency_ttl_secs: u64,
    /// `credits.insufficient_ttl_secs`: how long a remembered 402 lives.
    pub insufficient_ttl_secs: u64,
    /// `credits.max_open_holds`: open holds a user may have at once.
    pub max_open_holds: usize,
    /// `amqp.confirm_timeout_ms`: the longest a publish may wait for its
    /// confirm (an in-progress marker outlives it).
    pub confirm_timeout_ms: u64,
}

impl CreditLimits {
    pub fn new(settings: &Settings) -> Self {
        Self {
            idempotency_ttl_secs: settings.credits.idempotency_ttl_secs,
            insufficient_ttl_secs: settings.credits.insufficient_ttl_secs,
            max_open_holds: settings.credits.max_open_holds,
            confirm_timeout_ms: settings.amqp.confirm_timeout_ms,
        }
    }
}

impl CreditStore {
    /// The shared multiplexed Redis connection (503 when Redis is down).
    pub async fn redis(&self) -> crate::error::Result<LinkConn> {
        Ok(LinkConn(self.redis_link.connection().await?))
    }
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
