//! Boots the real gateway (and, when a test asks, a real worker) against the
#![allow(dead_code)]
//! machine's Postgres, Redis and RabbitMQ, each test in its own database, Redis
//! key prefix and AMQP namespace; everything is removed when the app drops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::settings::Settings;
use gateway::startup::Application;
use serde_json::Value;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-of-adequate-length-0123456789";

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn db_url(name: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

/// Creates a fresh database with every migration applied.
pub async fn create_db() -> String {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&admin_url())
        .await
        .expect("admin connection");
    sqlx::query(&format!("create database \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("create database");
    let mut conn = sqlx::PgConnection::connect(&db_url(&name))
        .await
        .expect("test db");
    common::infra::MIGRATOR
        .run(&mut conn)
        .await
        .expect("migrations");
    name
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub vars: HashMap<String, String>,
    pub pg: PgPool,
    pub redis: deadpool_redis::Pool,
    pub db_name: String,
    pub shutdown: CancellationToken,
    pub worker_shutdown: CancellationToken,
    owns_resources: bool,
}

/// Base variables for a test: its own database, prefix and namespace.
pub fn base_vars(db_name: &str, tag: &str) -> HashMap<String, String> {
    let mut v = HashMap::new();
    v.insert("DATABASE_URL".into(), db_url(db_name));
    v.insert("JWT_SECRET".into(), SECRET.into());
    v.insert("AUTH_DEV_TOKENS".into(), "true".into());
    v.insert("GATEWAY_LISTEN".into(), "127.0.0.1:0".into());
    v.insert("WORKER_LISTEN".into(), "127.0.0.1:0".into());
    v.insert("APP__REDIS__KEY_PREFIX".into(), tag.into());
    v.insert("APP__AMQP__NAMESPACE".into(), tag.into());
    v.insert("APP__DATABASE__MAX_CONNECTIONS".into(), "5".into());
    v.insert("APP__REDIS__POOL_SIZE".into(), "8".into());
    v.insert("APP__WORKER__CLEANUP_INTERVAL_SECS".into(), "3600".into());
    v
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns a gateway; `tweak` may change the variables before settings load.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
    let db_name = create_db().await;
    let tag = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut vars = base_vars(&db_name, &tag);
    tweak(&mut vars);
    let mut app = spawn_gateway(vars, &db_name).await;
    app.owns_resources = true;
    app
}

/// Another gateway sharing this one's database, Redis prefix and namespace.
pub async fn spawn_twin(of: &TestApp) -> TestApp {
    spawn_gateway(of.vars.clone(), &of.db_name).await
}

async fn spawn_gateway(vars: HashMap<String, String>, db_name: &str) -> TestApp {
    let settings = Settings::load_from(Path::new("/nonexistent"), &vars).expect("settings");
    let shutdown = CancellationToken::new();
    let app = Application::build(settings.clone(), shutdown.clone())
        .await
        .expect("build");
    let addr = app.local_addr();
    let publisher = app.state().publisher.clone();
    tokio::spawn(app.run_until_stopped());
    assert!(
        publisher.wait_connected(Duration::from_secs(10)).await,
        "broker connect"
    );
    TestApp {
        addr,
        client: reqwest::Client::new(),
        pg: PgPool::connect(&db_url(db_name)).await.expect("pool"),
        redis: common::infra::redis_pool(&settings).expect("redis"),
        settings,
        vars,
        db_name: db_name.to_string(),
        shutdown,
        worker_shutdown: CancellationToken::new(),
        owns_resources: false,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Starts an in-process worker on all queues (stopped when the app drops).
    pub async fn start_worker(&self) {
        self.start_worker_on(&["usage", "credits", "sessions", "users"])
            .await;
    }

    pub async fn start_worker_on(&self, queues: &[&str]) {
        let mut settings = self.settings.clone();
        settings.worker.queues = queues.iter().map(|q| q.to_string()).collect();
        let w = worker::startup::Worker::build(settings, self.worker_shutdown.clone())
            .await
            .expect("worker");
        tokio::spawn(w.run_until_stopped());
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub async fn put(&self, path: &str, token: &str, body: &Value) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// Polls `f` until it returns Some, failing the test after `timeout`.
    pub async fn eventually<T, F, Fut>(&self, timeout: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not met within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pg)
            .await
            .expect(sql)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.worker_shutdown.cancel();
        if !self.owns_resources {
            return;
        }
        let db = self.db_name.clone();
        let settings = self.settings.clone();
        // Cleanup needs async IO; a thread with its own runtime works even while
        // the test's runtime is unwinding from a panic.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(cleanup(db, settings));
        })
        .join();
    }
}

async fn cleanup(db: String, settings: Settings) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(&format!("drop database if exists \"{db}\" with (force)"))
            .execute(&mut admin)
            .await;
    }
    if let Ok(conn) = common::topology::connect(&settings.amqp.url).await {
        if let Ok(ch) = conn.create_channel().await {
            let topo = common::topology::Topology::new(
                &settings.amqp.namespace,
                settings.amqp.delivery_limit,
            );
            let _ = topo.delete(&ch).await;
        }
        let _ = conn.close(200, "bye").await;
    }
    if let Ok(client) = redis::Client::open(settings.redis.url.as_str()) {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let pattern = format!("{}:*", settings.redis.key_prefix);
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
            }
        }
    }
}

/// An HS256 token signed with the test secret.
pub fn hs_token(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

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

pub fn admin_token() -> String {
    hs_token(&serde_json::json!({"sub": "admin_1", "exp": now() + 3600, "role": "admin"}))
}
