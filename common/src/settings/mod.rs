//! The one typed configuration tree, loaded in layers:
//! built-in defaults → `config/default.toml` → `config/$APP_ENV.toml` →
//! `APP__SECTION__KEY` variables → the well-known names (`DATABASE_URL`, …),
//! which win over everything. Nothing else in the project reads the environment.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

pub mod cors;
pub mod tls;
mod validate;

/// Failure to produce a usable configuration. The message is one line naming
/// the offending key, because it is what an operator sees when start-up stops.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {key}: {reason}")]
pub struct SettingsError {
    pub key: String,
    pub reason: String,
}

impl SettingsError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppEnv {
    Development,
    Production,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub app_env: AppEnv,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub amqp: AmqpSettings,
    pub gateway: GatewaySettings,
    pub worker: WorkerSettings,
    pub auth: AuthSettings,
    pub rate_limit: RateLimitSettings,
    pub plans: BTreeMap<String, PlanSettings>,
    pub sessions: SessionSettings,
    pub credits: CreditSettings,
    pub users: UserSettings,
    pub api_keys: ApiKeySettings,
    #[serde(default)]
    pub pricing: PricingSettings,
    pub alerts: AlertSettings,
    #[serde(default)]
    pub tls: TlsSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: String,
    /// Pool size per process; Postgres connections are the scarce resource.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before it is 503.
    pub acquire_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    pub url: String,
    /// Redis Cluster nodes, comma-separated (`REDIS_CLUSTER_URLS`); when set,
    /// the binaries use a cluster client and `url` is unused.
    pub cluster_urls: String,
    pub pool_size: usize,
    /// Every key starts with this, so tests (and co-tenants) stay apart.
    /// It must not contain `{` or `}`: the first hash tag of a key is the user.
    pub key_prefix: String,
    /// Bound on one Redis round trip; past it the dependency counts as down.
    pub timeout_ms: u64,
}

impl RedisSettings {
    /// The cluster's node URLs (empty: a single node at `url`).
    pub fn cluster_nodes(&self) -> Vec<String> {
        self.cluster_urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect()
    }

    /// Whether a URL in use is plain-text TCP (`redis://`).
    pub fn plaintext(&self) -> bool {
        match self.cluster_nodes() {
            nodes if nodes.is_empty() => self.url.starts_with("redis://"),
            nodes => nodes.iter().any(|u| u.starts_with("redis://")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    pub url: String,
    /// Prefix of every exchange and queue name (tests use one of their own).
    pub namespace: String,
    /// The longest a request waits for a publisher confirm before it is 503.
    pub confirm_timeout_ms: u64,
    /// Quorum queues' `x-delivery-limit`: past it a message is dead-lettered.
    pub delivery_limit: u32,
    /// How long the gateway gathers concurrent usage events into one message.
    pub linger_us: u64,
    /// Most events carried in one grouped usage message.
    pub max_batch_events: usize,
    /// Grouped messages of one kind awaiting their confirm at once, per
    /// gateway; what arrives while all are in flight rides the next message.
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GatewaySettings {
    pub listen: String,
    /// Largest request body accepted (1 MiB; docs/reliability.md).
    pub body_limit_bytes: usize,
    /// Deadline of one request from its arrival to its commit point (the first
    /// write: a publish, a reservation, a transaction). Past it, a request that
    /// has not committed is cut and answered 503 `unavailable`; one that has
    /// committed runs on, bounded by its dependencies' own timeouts
    /// (`amqp.confirm_timeout_ms`, `redis.timeout_ms`), so an answer never
    /// denies what was accepted. The body upload counts against it.
    pub request_timeout_ms: u64,
    /// Time a connection has to send a whole request head (line and headers),
    /// counted from the moment hyper starts waiting for it, so it also closes
    /// idle keep-alive connections. A client that trickles its headers
    /// (slowloris) is cut off here, without an answer.
    pub header_read_timeout_ms: u64,
    /// Largest request head (request line plus headers) in bytes; past it the
    /// client gets hyper's `431` and the connection is closed.
    pub max_header_bytes: usize,
    /// Most header fields in one request; past it, `431` and close.
    pub max_headers: usize,
    /// Most connections served at once. At the cap the gateway stops
    /// accepting: new connections wait in the kernel's listen backlog until
    /// one closes (past the backlog, the kernel drops their SYNs).
    pub max_connections: usize,
    /// How long a gateway may keep a user's plan/status/overrides locally (≤ 5 s).
    pub user_cache_ttl_ms: u64,
    /// Browser origins allowed by CORS (SPEC §5): origins or `scheme://*`;
    /// in the environment comma-separated (`APP__GATEWAY__CORS_ORIGINS`).
    /// Empty: no CORS header at all. Rules in [`cors`].
    #[serde(default)]
    pub cors_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    pub listen: String,
    /// Queues this process consumes: any of usage, credits, sessions, users.
    pub queues: Vec<String>,
    pub prefetch: u16,
    /// Prefetch of the usage queue: its messages carry up to
    /// `amqp.max_batch_events` events each, so fewer are held (memory).
    pub usage_prefetch: u16,
    /// Consumers of the usage queue in one process (each its own channel and
    /// transaction), so Postgres works on one batch while the next is read.
    pub usage_consumers: usize,
    /// Messages per batch (one transaction), at most.
    pub batch_size: usize,
    /// Bytes of message bodies per batch, at most (a usage message may carry
    /// thousands of events; this bounds a transaction's size).
    pub batch_max_bytes: usize,
    /// How long a batch waits to fill before it is written anyway.
    pub batch_wait_ms: u64,
    /// A batch is written as soon as no delivery came for this long (so a
    /// quiet queue is not held for the whole `batch_wait_ms`).
    pub batch_idle_ms: u64,
    pub cleanup_interval_secs: u64,
    pub reconcile_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    pub jwt_secret: Option<String>,
    pub jwks_url: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub dev_tokens: bool,
    pub leeway_secs: u64,
    /// At most one re-fetch of the JWKS for an unknown `kid` per this many seconds.
    pub jwks_refetch_interval_secs: u64,
    /// The key set is re-fetched this often, so a key removed upstream stops
    /// being trusted (and the tokens it verified leave the token cache).
    pub jwks_refresh_secs: u64,
    /// Verified tokens kept in memory by hash until their `exp` (0: no cache).
    pub token_cache_size: usize,
    /// `JWT_AUTHORIZED_PARTIES` (comma-separated): when set, a token's `azp`,
    /// if it has one, must be one of these (Clerk's rule: an absent `azp` passes).
    #[serde(default, deserialize_with = "comma_list")]
    pub authorized_parties: Vec<String>,
}

/// A list given either as a list (files, `APP__` keys) or as one
/// comma-separated string (a well-known variable); blank entries are dropped.
fn comma_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(str::to_string).collect(),
        OneOrMany::Many(v) => v,
    };
    Ok(items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisErrorPolicy {
    Postgres,
    Allow,
    Deny,
}

impl RedisErrorPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct ClassLimit {
    pub limit: u64,
    pub window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitSettings {
    pub classes: HashMap<String, ClassLimit>,
    pub auth_failures: ClassLimit,
    pub on_redis_error: RedisErrorPolicy,
    /// The `usage` class limited per event besides per request (docs/rate-limits.md): a
    /// request of 500 events counts 500. Scaled by the plan multiplier.
    pub usage_events: ClassLimit,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PlanSettings {
    pub starting_credits: i64,
    pub rate_limit_multiplier: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SessionSettings {
    pub ttl_secs: u64,
    pub min_extension_version: Option<String>,
    /// Live sessions one user may have in Redis; validating one more evicts
    /// the least recently used (so no user grows Redis without bound).
    pub max_per_user: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UserSettings {
    /// Largest merged preferences object, in bytes of JSON (422 naming
    /// `preferences` past it).
    pub max_preferences_bytes: usize,
    /// Statement timeout of a privacy export (at most one runs per user).
    pub export_timeout_ms: u64,
}

/// Extension API keys (docs/api.md "API keys").
#[derive(Debug, Clone, Deserialize)]
pub struct ApiKeySettings {
    /// Live keys one user may have; one more is 422 naming `api_keys`.
    pub max_per_user: usize,
    /// How long a gateway trusts a key record it read (capped at 3000 ms in
    /// the gateway, so a revocation holds on every gateway within 5 s).
    pub cache_ttl_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CreditSettings {
    /// Default and maximum lifetime of a hold (docs/credits.md).
    pub hold_default_ttl_secs: u64,
    pub hold_max_ttl_secs: u64,
    /// How long idempotency answers and ended holds are remembered.
    pub idempotency_ttl_secs: u64,
    /// A reservation older than the confirm timeout plus this, with no ledger
    /// row and the credits queue drained, is released by the reconciler.
    pub stale_reservation_secs: u64,
    /// How often the worker looks for holds past their expiry in Postgres.
    pub expiry_interval_secs: u64,
    /// How long past `expires_at` the worker waits before it expires a hold
    /// itself (gateways release it lazily first, and publish the event).
    pub hold_expiry_grace_secs: u64,
    /// After a Redis data loss, how long past the confirm timeout a recovery
    /// waits before it trusts the queue depth (publishes still in flight).
    pub recovery_grace_ms: u64,
    /// Open holds one user may have; one more is 422 naming `holds`. Keeps
    /// every credit script cheap (they scan the user's holds for expiry).
    pub max_open_holds: usize,
    /// How long a remembered 402 answer is kept (a 200 is kept
    /// `idempotency_ttl_secs`): a refusal moved no money, so it need not
    /// occupy Redis for a day.
    pub insufficient_ttl_secs: u64,
}

/// The price book's cache in each gateway (docs/credits.md "Price book").
#[derive(Debug, Clone, Deserialize)]
pub struct PricingSettings {
    /// How often a gateway reloads the book from Postgres: a change applies
    /// on every gateway within this plus one query (the contract says 5 s).
    pub refresh_ms: u64,
}

impl Default for PricingSettings {
    fn default() -> Self {
        Self { refresh_ms: 1000 }
    }
}

/// Spend-alert webhooks (docs/credits.md "Spend alerts"): how the worker
/// delivers the alerts it recorded.
#[derive(Debug, Clone, Deserialize)]
pub struct AlertSettings {
    /// How often the worker looks for due deliveries.
    pub poll_interval_ms: u64,
    /// Timeout of one webhook request (connect to last byte).
    pub timeout_ms: u64,
    /// Attempts before a delivery is given up (marked failed, never sent again).
    pub max_attempts: u32,
    /// The delay after the first failed attempt; it doubles after each one.
    pub backoff_base_ms: u64,
    /// The longest delay between two attempts.
    pub backoff_max_ms: u64,
}

/// TLS material besides the system roots (docs/operations.md): a CA bundle
/// trusted for Redis, RabbitMQ and (unless `sslrootcert` is in the URL)
/// Postgres, and a client identity for servers that ask for one. PEM files;
/// checked at start (`common::tls`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TlsSettings {
    pub ca_file: Option<String>,
    pub client_cert_file: Option<String>,
    /// PKCS#8 (`BEGIN PRIVATE KEY`), as RabbitMQ's client needs.
    pub client_key_file: Option<String>,
}

/// Largest credit amount and balance: Redis scripts compute in doubles.
pub const MAX_CREDITS: i64 = (1 << 53) - 1;

/// The endpoint class names, from [`crate::class::Class`] (kept for callers
/// that iterate names; new code uses `Class::ALL`).
pub const RATE_LIMIT_CLASSES: [&str; 6] = crate::class::NAMES;

/// The built-in defaults, the bottom layer under every file and variable.
const DEFAULTS: &str = include_str!("defaults.toml");

/// The well-known variables, which win over every file and `APP__` key, and
/// the key each one sets.
pub const WELL_KNOWN: [(&str, &str); 13] = [
    ("DATABASE_URL", "database.url"),
    ("REDIS_URL", "redis.url"),
    ("REDIS_CLUSTER_URLS", "redis.cluster_urls"),
    ("AMQP_URL", "amqp.url"),
    ("GATEWAY_LISTEN", "gateway.listen"),
    ("WORKER_LISTEN", "worker.listen"),
    ("JWT_SECRET", "auth.jwt_secret"),
    ("JWKS_URL", "auth.jwks_url"),
    ("JWT_ISSUER", "auth.jwt_issuer"),
    ("JWT_AUDIENCE", "auth.jwt_audience"),
    ("APP_ENV", "app_env"),
    ("AUTH_DEV_TOKENS", "auth.dev_tokens"),
    ("JWT_AUTHORIZED_PARTIES", "auth.authorized_parties"),
];

impl Settings {
    /// Loads from the process environment and `./config`.
    pub fn load() -> Result<Self, SettingsError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::load_from(Path::new("config"), &vars)
    }

    /// Loads from an explicit config directory and variable map (tests use this
    /// instead of mutating the process environment).
    pub fn load_from(
        config_dir: &Path,
        vars: &HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let app_env = vars
            .get("APP_ENV")
            .or_else(|| vars.get("APP__APP_ENV"))
            .cloned()
            .unwrap_or_else(|| "development".into());
        if app_env != "development" && app_env != "production" {
            return Err(SettingsError::new(
                "APP_ENV",
                format!("must be development or production, got {app_env:?}"),
            ));
        }
        let file = |name: &str| -> PathBuf { config_dir.join(name) };
        let mut builder = Config::builder()
            .add_source(File::from_str(DEFAULTS, FileFormat::Toml))
            .add_source(File::from(file("default.toml")).required(false))
            .add_source(File::from(file(&format!("{app_env}.toml"))).required(false))
            .add_source(
                Environment::with_prefix("APP")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("worker.queues")
                    .with_list_parse_key("auth.authorized_parties")
                    .with_list_parse_key("gateway.cors_origins")
                    .try_parsing(true)
                    .source(Some(
                        vars.iter()
                            .filter(|(k, _)| k.starts_with("APP__"))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    )),
            );
        for (var, key) in WELL_KNOWN {
            if let Some(value) = vars.get(var) {
                builder = builder
                    .set_override(key, value.as_str())
                    .map_err(|e| SettingsError::new(var, e.to_string()))?;
            }
        }
        let raw = builder
            .build()
            .map_err(|e| SettingsError::new(error_key(&e), e.to_string()))?;
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| SettingsError::new(error_key(&e), e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The effective per-class limit for a plan, before per-user overrides.
    pub fn class_limit(&self, class: &str, plan: &str) -> Option<ClassLimit> {
        let base = self.rate_limit.classes.get(class)?;
        let mult = self
            .plans
            .get(plan)
            .map(|p| p.rate_limit_multiplier)
            .unwrap_or(1);
        Some(ClassLimit {
            limit: base.limit.saturating_mul(mult),
            window_secs: base.window_secs,
        })
    }

    pub fn starting_credits(&self, plan: &str) -> i64 {
        self.plans
            .get(plan)
            .map(|p| p.starting_credits)
            .unwrap_or(0)
    }
}

/// Pulls the key out of a `config` error so the one line names it.
fn error_key(e: &config::ConfigError) -> String {
    let text = e.to_string();
    // config's messages read like: invalid type: ... for key `rate_limit.classes.usage.limit`
    if let Some(start) = text.find('`') {
        if let Some(len) = text[start + 1..].find('`') {
            let key = &text[start + 1..start + 1 + len];
            for (var, k) in WELL_KNOWN {
                if k == key {
                    return format!("{var} ({key})");
                }
            }
            return key.to_string();
        }
    }
    "configuration".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.entry("JWT_SECRET".into())
            .or_insert_with(|| "s3cret".into());
        m
    }

    fn dir_with(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body) in files {
            std::fs::write(dir.join(name), body).unwrap();
        }
        dir
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = Settings::load_from(Path::new("/nonexistent"), &vars(&[])).unwrap();
        assert_eq!(
            s.database.url,
            "postgres://postgres@127.0.0.1:5432/postgres"
        );
        assert_eq!(s.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.gateway.listen, "0.0.0.0:8080");
        assert_eq!(s.worker.listen, "0.0.0.0:9090");
        assert_eq!(s.app_env, AppEnv::Development);
        assert!(!s.auth.dev_tokens);
        assert_eq!(s.auth.token_cache_size, 100_000);
        assert_eq!(s.auth.jwks_refresh_secs, 300);
        assert!(s.auth.authorized_parties.is_empty());
        assert_eq!(
            s.rate_limit.classes["usage"],
            ClassLimit {
                limit: 1200,
                window_secs: 60
            }
        );
        assert_eq!(s.rate_limit.classes["session"].limit, 60);
        assert_eq!(s.plans["free"].starting_credits, 100);
        assert_eq!(s.plans["enterprise"].rate_limit_multiplier, 20);
        assert_eq!(s.rate_limit.on_redis_error, RedisErrorPolicy::Postgres);
        assert_eq!(s.sessions.ttl_secs, 86400);
        assert_eq!(s.gateway.request_timeout_ms, 15000);
        assert_eq!(s.gateway.header_read_timeout_ms, 10000);
        assert_eq!(s.gateway.max_header_bytes, 16384);
        assert_eq!(s.gateway.max_headers, 100);
        assert_eq!(s.gateway.max_connections, 4096);
    }

    #[test]
    fn well_known_variables_and_app_keys_override_the_files() {
        let dir = dir_with(&[
            (
                "default.toml",
                "[database]\nurl = \"postgres://file@h/db\"\n[rate_limit.classes.usage]\nlimit = 7\nwindow_secs = 60\n",
            ),
            ("production.toml", "[redis]\nurl = \"redis://prodfile:6379\"\n"),
        ]);
        let env = vars(&[
            ("DATABASE_URL", "postgres://env@h/db"),
            ("APP__DATABASE__URL", "postgres://twin@h/db"),
            ("REDIS_URL", "redis://env:6379/3"),
            ("AMQP_URL", "amqp://u:p@h:5672/vh"),
            ("GATEWAY_LISTEN", "127.0.0.1:1"),
            ("WORKER_LISTEN", "127.0.0.1:2"),
            ("JWT_SECRET", "envsecret-envsecret-envsecret-envsecret"),
            ("JWKS_URL", "http://127.0.0.1:9/jwks"),
            (
                "JWT_AUTHORIZED_PARTIES",
                "https://app.example, vscode-webview://x,",
            ),
            ("JWT_ISSUER", "iss"),
            ("JWT_AUDIENCE", "aud"),
            ("APP_ENV", "production"),
            ("AUTH_DEV_TOKENS", "false"),
            ("APP__RATE_LIMIT__CLASSES__USAGE__LIMIT", "5"),
        ]);
        let s = Settings::load_from(&dir, &env).unwrap();
        assert_eq!(s.database.url, "postgres://env@h/db");
        assert_eq!(s.redis.url, "redis://env:6379/3");
        assert_eq!(s.amqp.url, "amqp://u:p@h:5672/vh");
        assert_eq!(s.gateway.listen, "127.0.0.1:1");
        assert_eq!(s.worker.listen, "127.0.0.1:2");
        assert_eq!(
            s.auth.jwt_secret.as_deref(),
            Some("envsecret-envsecret-envsecret-envsecret")
        );
        assert_eq!(
            s.auth.authorized_parties,
            ["https://app.example", "vscode-webview://x"]
        );
        assert_eq!(s.auth.jwks_url.as_deref(), Some("http://127.0.0.1:9/jwks"));
        assert_eq!(s.auth.jwt_issuer.as_deref(), Some("iss"));
        assert_eq!(s.auth.jwt_audience.as_deref(), Some("aud"));
        assert_eq!(s.app_env, AppEnv::Production);
        assert_eq!(s.rate_limit.classes["usage"].limit, 5);
    }

    #[test]
    fn the_environment_file_is_layered_over_default_toml() {
        let dir = dir_with(&[
            (
                "default.toml",
                "[redis]\nurl = \"redis://default:6379\"\npool_size = 3\n",
            ),
            (
                "production.toml",
                "[redis]\nurl = \"redis://prodfile:6379\"\n",
            ),
        ]);
        let prod = vars(&[
            ("APP_ENV", "production"),
            ("JWT_SECRET", "a-production-secret-of-32-bytes!"),
        ]);
        let s = Settings::load_from(&dir, &prod).unwrap();
        assert_eq!(s.redis.url, "redis://prodfile:6379");
        assert_eq!(s.redis.pool_size, 3);
        let twin = vars(&[("APP__REDIS__URL", "redis://twin:1")]);
        assert_eq!(
            Settings::load_from(&dir, &twin).unwrap().redis.url,
            "redis://twin:1"
        );
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("APP__RATE_LIMIT__CLASSES__USAGE__LIMIT", "lots")],
                "rate_limit.classes.usage.limit",
            ),
            (&[("AUTH_DEV_TOKENS", "maybe")], "AUTH_DEV_TOKENS"),
            (&[("APP_ENV", "staging")], "APP_ENV"),
            (&[("GATEWAY_LISTEN", "nowhere")], "GATEWAY_LISTEN"),
            (&[("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
            (
                &[("APP_ENV", "production"), ("AUTH_DEV_TOKENS", "true")],
                "AUTH_DEV_TOKENS",
            ),
            (
                &[
                    ("APP_ENV", "production"),
                    ("JWT_SECRET", "a-31-byte-secret-is-too-short.."),
                ],
                "JWT_SECRET",
            ),
            (
                &[
                    ("APP_ENV", "production"),
                    ("JWKS_URL", "http://clerk.example.com/.well-known/jwks.json"),
                ],
                "JWKS_URL",
            ),
            (
                &[("APP__AUTH__JWKS_REFRESH_SECS", "0")],
                "auth.jwks_refresh_secs",
            ),
            (
                &[("APP__RATE_LIMIT__ON_REDIS_ERROR", "pray")],
                "rate_limit.on_redis_error",
            ),
            (
                &[("APP__GATEWAY__MAX_CONNECTIONS", "0")],
                "gateway.max_connections",
            ),
            (
                &[("APP__GATEWAY__REQUEST_TIMEOUT_MS", "0")],
                "gateway.request_timeout_ms",
            ),
            (
                &[("APP__GATEWAY__MAX_HEADER_BYTES", "100")],
                "gateway.max_header_bytes",
            ),
            (&[("APP__AMQP__MAX_IN_FLIGHT", "0")], "amqp.max_in_flight"),
            (
                &[("APP__WORKER__BATCH_IDLE_MS", "0")],
                "worker.batch_idle_ms",
            ),
        ];
        for (env, key) in cases {
            let err = Settings::load_from(Path::new("/nonexistent"), &vars(env)).unwrap_err();
            let line = err.to_string();
            assert!(line.contains(key), "{line:?} should name {key}");
            assert!(!line.contains('\n'), "{line:?} should be one line");
        }
    }

    #[test]
    fn no_key_source_is_refused() {
        let env: HashMap<String, String> = HashMap::new();
        let err = Settings::load_from(Path::new("/nonexistent"), &env).unwrap_err();
        assert_eq!(err.key, "JWT_SECRET");
        let dev: HashMap<String, String> =
            [("AUTH_DEV_TOKENS".to_string(), "true".to_string())].into();
        assert!(Settings::load_from(Path::new("/nonexistent"), &dev).is_ok());
    }

    #[test]
    fn effective_class_limit_scales_by_plan() {
        let s = Settings::load_from(Path::new("/nonexistent"), &vars(&[])).unwrap();
        assert_eq!(s.class_limit("usage", "pro").unwrap().limit, 6000);
        assert_eq!(s.class_limit("session", "free").unwrap().limit, 60);
        assert!(s.class_limit("nope", "free").is_none());
    }
}
