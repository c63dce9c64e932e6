//! Test support shared by every crate's tests, against the machine's real
//! Postgres, Redis and RabbitMQ: a fresh database per test (with or without
//! the migrations), an own Redis key prefix and AMQP namespace, everything
//! removed on drop, even while the test unwinds from a failed assertion; the
//! HS256 tokens the gateway accepts in tests; and a `redis-server` of a test's
//! own to kill and restart ([`redis_server::OwnRedis`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;

use common::settings::Settings;
use serde_json::Value;
use sqlx::{Connection, PgPool};

pub mod redis_server;

/// The HS256 secret test gateways verify tokens with.
pub const SECRET: &str = "test-secret-of-adequate-length-0123456789";

/// The maintenance database tests create and drop theirs through
/// (`TEST_DATABASE_ADMIN_URL`, else the local `postgres`).
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The URL of database `name` on the admin URL's server, with the admin URL's
/// parameters (e.g. `?sslmode=verify-full&sslrootcert=…` for a TLS server).
pub fn db_url(name: &str) -> String {
    let admin = admin_url();
    let (head, query) = match admin.split_once('?') {
        Some((head, query)) => (head, format!("?{query}")),
        None => (admin.as_str(), String::new()),
    };
    let base = head.rsplit_once('/').map(|(b, _)| b).unwrap_or(head);
    format!("{base}/{name}{query}")
}

/// A fresh tag for a test's Redis key prefix and AMQP namespace.
pub fn new_tag() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Creates an empty database `<prefix>_<uuid>` and returns its name. The
/// caller drops it ([`drop_db`]); [`TestDb`] does so itself.
pub async fn create_empty_db(prefix: &str) -> String {
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&admin_url())
        .await
        .expect("admin connection");
    sqlx::query(&format!("create database \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("create database");
    name
}

/// Creates a fresh `t_<uuid>` database with every migration applied and
/// returns its name. The caller drops it ([`drop_db`]).
pub async fn create_db() -> String {
    let name = create_empty_db("t").await;
    migrate(&db_url(&name)).await;
    name
}

async fn migrate(url: &str) {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("test db");
    common::db::MIGRATOR
        .run(&mut conn)
        .await
        .expect("migrations");
}

/// Drops database `name` WITH (FORCE); errors are ignored.
pub async fn drop_db(name: &str) {
    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(&format!("drop database if exists \"{name}\" with (force)"))
            .execute(&mut admin)
            .await;
    }
}

/// Removes the AMQP namespace's queues and exchanges and the Redis key
/// prefix's keys of `settings`; errors are ignored.
pub async fn drop_namespace(settings: &Settings) {
    if let Ok(conn) = common::amqp::connect::connect(&settings.amqp.url).await {
        if let Ok(ch) = conn.create_channel().await {
            let topo = common::amqp::topology::Topology::new(
                &settings.amqp.namespace,
                settings.amqp.delivery_limit,
            );
            let _ = topo.delete(&ch).await;
        }
        let _ = conn.close(200, "bye").await;
    }
    let material = common::tls::TlsMaterial::load(&settings.tls).unwrap_or_default();
    drop_redis_keys(&settings.redis, &material, &settings.redis.key_prefix).await;
}

/// The store variables a test passes on from its environment, so the same
/// suites run against other stores than the machine's (CI's TLS and cluster
/// steps): `TEST_REDIS_CLUSTER_URLS` becomes `REDIS_CLUSTER_URLS` (a Redis
/// Cluster, each test still apart by its key prefix), `TEST_AMQP_URL`
/// becomes `AMQP_URL` (e.g. three `amqps://` nodes), and `APP__TLS__*` (the
/// CA file and client identity of TLS stores) pass as they are. The database
/// server is `TEST_DATABASE_ADMIN_URL`'s ([`admin_url`]).
pub fn store_vars() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let renamed = [
        ("TEST_REDIS_CLUSTER_URLS", "REDIS_CLUSTER_URLS"),
        ("TEST_AMQP_URL", "AMQP_URL"),
        ("APP__TLS__CA_FILE", "APP__TLS__CA_FILE"),
        ("APP__TLS__CLIENT_CERT_FILE", "APP__TLS__CLIENT_CERT_FILE"),
        ("APP__TLS__CLIENT_KEY_FILE", "APP__TLS__CLIENT_KEY_FILE"),
    ];
    for (from, to) in renamed {
        if let Ok(value) = std::env::var(from) {
            if !value.trim().is_empty() {
                out.push((to.to_string(), value));
            }
        }
    }
    out
}

/// Whether the tests run against a Redis Cluster (`TEST_REDIS_CLUSTER_URLS`).
pub fn on_redis_cluster() -> bool {
    store_vars().iter().any(|(k, _)| k == "REDIS_CLUSTER_URLS")
}

/// Deletes every key under `prefix:` (SCAN, so Redis is never blocked; on
/// a cluster, of every master).
pub async fn drop_redis_keys(
    redis: &common::settings::RedisSettings,
    material: &common::tls::TlsMaterial,
    prefix: &str,
) {
    let Ok(client) = common::redis::Client::from_settings(redis, material) else {
        return;
    };
    let Ok(mut c) = client.connect(std::time::Duration::from_secs(5)).await else {
        return;
    };
    let pattern = format!("{prefix}:*");
    let Ok(keys) = common::redis::scan_match(&mut c, &pattern).await else {
        return;
    };
    for chunk in keys.chunks(1000) {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(&mut c).await;
    }
}

/// Runs a cleanup future to completion from a `Drop`: cleanup needs async IO,
/// and a thread with its own runtime works even while the test's runtime is
/// unwinding from a panic (or is a current-thread runtime blocked in drop).
pub fn block_on_cleanup<F>(cleanup: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(cleanup);
    })
    .join();
}

/// Owns one `<prefix>_<uuid>` database; drops it on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// An empty database: no schema at all.
    pub async fn empty() -> Self {
        Self::empty_named("t").await
    }

    /// An empty database named `<prefix>_<uuid>`.
    pub async fn empty_named(prefix: &str) -> Self {
        let name = create_empty_db(prefix).await;
        let url = db_url(&name);
        Self { name, url }
    }

    /// A database with every migration applied.
    pub async fn migrated() -> Self {
        let db = Self::empty().await;
        migrate(&db.url).await;
        db
    }

    pub async fn pool(&self, max_connections: u32) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url)
            .await
            .expect("pool")
    }

    pub async fn connect(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connection")
    }

    /// Settings pointing at this database (and nothing else the test needs).
    pub fn settings(&self) -> Settings {
        let vars: HashMap<String, String> = [
            ("DATABASE_URL".to_string(), self.url.clone()),
            (
                "JWT_SECRET".to_string(),
                "unused-in-these-tests".to_string(),
            ),
        ]
        .into();
        Settings::load_from(Path::new("/nonexistent"), &vars).expect("settings")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        block_on_cleanup(async move { drop_db(&name).await });
    }
}

/// A database plus an own Redis key prefix and AMQP namespace; the database
/// (via [`TestDb`]), the namespace's queues and exchanges and the prefix's
/// Redis keys are removed on drop.
pub struct Stack {
    pub vars: HashMap<String, String>,
    pub settings: Settings,
    // Declared last: dropped after the namespace cleanup below ran.
    pub db: TestDb,
}

impl Stack {
    /// A migrated database; `extra` variables are layered over the stack's own.
    pub async fn new(extra: &[(&str, &str)]) -> Self {
        Self::on(TestDb::migrated().await, extra)
    }

    /// The same with an empty database named `<db_prefix>_<uuid>`, for a
    /// test whose subject migrates it.
    pub async fn unmigrated(db_prefix: &str, extra: &[(&str, &str)]) -> Self {
        Self::on(TestDb::empty_named(db_prefix).await, extra)
    }

    fn on(db: TestDb, extra: &[(&str, &str)]) -> Self {
        let tag = new_tag();
        let mut vars: HashMap<String, String> = [
            ("DATABASE_URL", db.url.as_str()),
            ("JWT_SECRET", "unused-in-these-tests"),
            ("APP__REDIS__KEY_PREFIX", tag.as_str()),
            ("APP__AMQP__NAMESPACE", tag.as_str()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        let settings = Settings::load_from(Path::new("/nonexistent"), &vars).expect("settings");
        Self { vars, settings, db }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let s = self.settings.clone();
        block_on_cleanup(async move { drop_namespace(&s).await });
    }
}

/// An HS256 token signed with [`SECRET`].
pub fn hs_token(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Now, in seconds since the epoch (for `exp`, `iat`, `nbf`).
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A fresh user id and a valid HS256 token for it.
pub fn new_user() -> (String, String) {
    let id = format!("user_{}", uuid::Uuid::new_v4().simple());
    let token = hs_token(
        &serde_json::json!({"sub": id, "exp": now() + 3600, "email": format!("{id}@example.com")}),
    );
    (id, token)
}

/// A valid HS256 token with the admin role.
pub fn admin_token() -> String {
    hs_token(&serde_json::json!({"sub": "admin_1", "exp": now() + 3600, "role": "admin"}))
}
