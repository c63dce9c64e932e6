//! Builds the application from settings and serves it until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::redis::keys::Keys;
use common::settings::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::credits::{CreditLimits, CreditStore};
use crate::publisher::Publisher;
use crate::rate_limit::Limiter;
use crate::redis_link::RedisLink;
use crate::sessions::SessionStore;
use crate::state::{AppState, Shared};
use crate::users::Directory;
use crate::users::UserStore;

pub struct Application {
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    publisher_stop: CancellationToken,
}

/// The state every handler shares, with lazy connections (nothing is dialled
/// here). The operator commands build one too, with a publisher that never
/// connects: they act through the same functions as the admin routes.
pub fn app_state(settings: Arc<Settings>, publisher: Publisher) -> anyhow::Result<AppState> {
    common::tls::init(&settings)?;
    let pg = common::db::pg_pool(&settings)?;
    let redis = common::redis::redis_pool(&settings)?;
    let redis_link = Arc::new(RedisLink::from_settings(&settings.redis)?);
    let keys = Keys::new(&settings.redis.key_prefix);
    let recovery = Arc::new(crate::credits::recovery::Recovery::new());
    let credits = CreditStore {
        pg: pg.clone(),
        redis_link: redis_link.clone(),
        keys: keys.clone(),
        recovery: recovery.clone(),
        limits: CreditLimits::new(&settings),
        memberships: Default::default(),
        once: Default::default(),
    };
    let sessions = SessionStore {
        redis_link: redis_link.clone(),
        keys: keys.clone(),
        ttl_secs: settings.sessions.ttl_secs,
        max_per_user: settings.sessions.max_per_user,
    };
    let directory = Arc::new(Directory::new(Duration::from_millis(
        settings.gateway.user_cache_ttl_ms,
    )));
    let user_store = UserStore {
        pg: pg.clone(),
        redis_link: redis_link.clone(),
        keys: keys.clone(),
        directory: directory.clone(),
        credits: credits.clone(),
        starting_credits: settings.starting_credits("free"),
        max_preferences_bytes: settings.users.max_preferences_bytes,
    };
    let limiter = Limiter {
        redis_link: redis_link.clone(),
        pg: pg.clone(),
        policy: settings.rate_limit.on_redis_error,
    };
    let pricing = Arc::new(crate::credits::pricing::PriceCache::new(
        pg.clone(),
        Duration::from_millis(settings.pricing.refresh_ms),
    ));
    let api_keys = crate::api_keys::ApiKeyStore::new(
        pg.clone(),
        redis_link.clone(),
        keys.clone(),
        &settings.api_keys,
    );
    Ok(AppState::new(Shared {
        keys,
        users: directory,
        metrics: crate::metrics::handle(),
        auth: Authenticator::new(&settings.auth),
        settings,
        pg,
        redis,
        redis_link,
        publisher,
        recovery,
        credits,
        sessions,
        user_store,
        limiter,
        api_keys,
        pricing,
    }))
}

impl Application {
    /// Connects lazily to the dependencies and binds the listener (port 0 in tests).
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        // The publisher outlives the HTTP server: requests still in flight at
        // shutdown get their confirms; it stops after the server has drained.
        let publisher_stop = CancellationToken::new();
        let publisher = Publisher::start(&settings, publisher_stop.clone());
        let state = app_state(settings.clone(), publisher)?;
        let a = state.auth.clone();
        tokio::spawn(async move { a.prefetch().await });
        // The periodic JWKS refresh (auth.jwks_refresh_secs); ends with the authenticator.
        tokio::spawn(state.auth.clone().run_refresh());
        // Before serving: an empty deployment gets its sentinels now, so its
        // first credit request is not mistaken for one after a data loss.
        match tokio::time::timeout(
            Duration::from_secs(10),
            crate::credits::recovery::prepare(&state.credits),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "credit sentinel check failed; the watcher retries")
            }
            Err(_) => tracing::warn!("credit sentinel check timed out; the watcher retries"),
        }
        let watch = crate::credits::recovery::WatchConfig {
            credits: state.credits.clone(),
            amqp_url: settings.amqp.url.clone(),
            credits_queue: state.publisher.topology().queue("credits"),
            grace_ms: settings.credits.recovery_grace_ms,
        };
        tokio::spawn(crate::credits::recovery::watch(
            watch,
            shutdown.child_token(),
        ));
        // The price book: loaded now and every `pricing.refresh_ms` (docs/credits.md "Price book").
        tokio::spawn(state.pricing.clone().run_refresh(shutdown.child_token()));
        // API key records: rebuilt now if Redis lacks them, then watched.
        match tokio::time::timeout(Duration::from_secs(10), state.api_keys.rebuild_if_lost()).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "api key record check failed; the watcher retries")
            }
            Err(_) => tracing::warn!("api key record check timed out; the watcher retries"),
        }
        tokio::spawn(state.api_keys.clone().watch(shutdown.child_token()));
        let listener = TcpListener::bind(&settings.gateway.listen).await?;
        Ok(Self {
            listener,
            state,
            shutdown,
            publisher_stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token fires, then stops accepting and lets
    /// in-flight requests (and their confirms) finish.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let app = crate::http::router(self.state.clone());
        let shutdown = self.shutdown.clone();
        tracing::info!(addr = %self.local_addr(), "gateway listening");
        let limits = crate::server::Limits::from_settings(&self.state.settings.gateway);
        crate::server::serve(self.listener, app, limits, async move {
            shutdown.cancelled().await
        })
        .await;
        self.publisher_stop.cancel();
        self.state.publisher.closed().await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}
