//! Boots the real gateway (and, when a test asks, a real worker) against the
//! machine's Postgres, Redis and RabbitMQ, each test in its own database, Redis
//! key prefix and AMQP namespace ([`testkit`]); everything is removed when the
//! app drops.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::settings::Settings;
use gateway::startup::Application;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

// Not every binary that includes this file (`api`, `faults`) uses each of them.
#[allow(unused_imports)]
pub use testkit::{admin_token, create_db, db_url, hs_token, new_user, now, SECRET};

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub vars: HashMap<String, String>,
    pub pg: PgPool,
    pub redis: common::redis::Pool,
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
    // TEST_REDIS_CLUSTER_URLS: the gateway and worker use that cluster.
    v.extend(testkit::store_vars());
    v
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns a gateway; `tweak` may change the variables before settings load.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
    let db_name = create_db().await;
    let tag = testkit::new_tag();
    let mut vars = base_vars(&db_name, &tag);
    tweak(&mut vars);
    let mut app = spawn_gateway(vars, &db_name).await;
    app.owns_resources = true;
    app
}

/// A gateway whose broker is unreachable (its publisher never connects).
pub async fn spawn_app_without_broker() -> TestApp {
    let db_name = create_db().await;
    let tag = testkit::new_tag();
    let mut vars = base_vars(&db_name, &tag);
    vars.insert(
        "AMQP_URL".into(),
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
    );
    let mut app = start_gateway(vars, &db_name, false).await;
    app.owns_resources = true;
    app
}

/// Another gateway sharing this one's database, Redis prefix and namespace.
pub async fn spawn_twin(of: &TestApp) -> TestApp {
    spawn_gateway(of.vars.clone(), &of.db_name).await
}

/// A twin whose variables `tweak` may change (e.g. to point one dependency
/// at a [`BlackHole`]); it does not wait for the broker.
pub async fn spawn_twin_with(
    of: &TestApp,
    tweak: impl FnOnce(&mut HashMap<String, String>),
) -> TestApp {
    let mut vars = of.vars.clone();
    tweak(&mut vars);
    start_gateway(vars, &of.db_name, false).await
}

async fn spawn_gateway(vars: HashMap<String, String>, db_name: &str) -> TestApp {
    start_gateway(vars, db_name, true).await
}

async fn start_gateway(
    mut vars: HashMap<String, String>,
    db_name: &str,
    wait_for_broker: bool,
) -> TestApp {
    // A test that points REDIS_URL somewhere (a Redis of its own to kill or
    // flush, a black hole) means that Redis, not the cluster of the run.
    if vars.contains_key("REDIS_URL") {
        vars.remove("REDIS_CLUSTER_URLS");
    }
    let settings = Settings::load_from(Path::new("/nonexistent"), &vars).expect("settings");
    let shutdown = CancellationToken::new();
    let app = Application::build(settings.clone(), shutdown.clone())
        .await
        .expect("build");
    let addr = app.local_addr();
    let publisher = app.state().publisher.clone();
    tokio::spawn(app.run_until_stopped());
    if wait_for_broker {
        assert!(
            publisher.wait_connected(Duration::from_secs(10)).await,
            "broker connect"
        );
    }
    TestApp {
        addr,
        client: reqwest::Client::new(),
        pg: PgPool::connect(&db_url(db_name)).await.expect("pool"),
        redis: common::redis::redis_pool(&settings).expect("redis"),
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
        self.start_worker_with(settings).await;
    }

    /// Starts an in-process worker with settings of the caller's making
    /// (e.g. the gateway's, but with the broker reached directly).
    pub async fn start_worker_with(&self, settings: Settings) {
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
        testkit::block_on_cleanup(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            testkit::drop_db(&db).await;
            testkit::drop_namespace(&settings).await;
        });
    }
}

/// A gateway sharing `of`'s database and Redis but pointed at a closed AMQP port.
pub async fn spawn_dead_broker_twin(of: &TestApp) -> TestApp {
    let mut vars = of.vars.clone();
    vars.insert(
        "AMQP_URL".into(),
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
    );
    let settings = Settings::load_from(Path::new("/nonexistent"), &vars).expect("settings");
    let shutdown = CancellationToken::new();
    let app = Application::build(settings.clone(), shutdown.clone())
        .await
        .expect("build");
    let addr = app.local_addr();
    tokio::spawn(app.run_until_stopped());
    TestApp {
        addr,
        client: reqwest::Client::new(),
        pg: of.pg.clone(),
        redis: common::redis::redis_pool(&settings).expect("redis"),
        settings,
        vars,
        db_name: of.db_name.clone(),
        shutdown,
        worker_shutdown: CancellationToken::new(),
        owns_resources: false,
    }
}

/// A TCP address that accepts connections and never answers a byte: what a
/// dependency looks like when it hangs (a stuck process, a half-dead host).
/// Connections are held until the black hole drops.
pub struct BlackHole {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Self { addr, task }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP relay in front of a real service that can hold back the service's
/// replies: requests still reach it, its answers wait in the relay until
/// [`Relay::release_replies`]. A slow dependency, made on demand. It runs on
/// a thread of its own, so it keeps relaying while the test's runtime is
/// blocked (e.g. in `TestApp`'s cleanup, which reaches the broker through it).
pub struct Relay {
    pub addr: SocketAddr,
    hold: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Relay {
    pub async fn start(upstream: &str) -> Self {
        let hold = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
        let waiting = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (h, w, upstream) = (hold.clone(), waiting.clone(), upstream.to_string());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                tokio::select! {
                    _ = stopped => {}
                    _ = relay_loop(listener, upstream, h, w) => {}
                }
            });
        });
        let addr = tokio::task::spawn_blocking(move || addr_rx.recv().unwrap())
            .await
            .unwrap();
        Self {
            addr,
            hold,
            waiting,
            stop: Some(stop),
        }
    }

    pub fn hold_replies(&self) {
        self.hold.send_replace(true);
    }

    pub fn release_replies(&self) {
        self.hold.send_replace(false);
    }

    /// Replies of the service that arrived while held and wait in the relay.
    pub fn held_replies(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn relay_loop(
    listener: tokio::net::TcpListener,
    upstream: String,
    hold: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Dropping the set (when the relay stops) ends every connection.
    let mut conns = tokio::task::JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
            continue;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        conns.spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
            let _ = sw.shutdown().await;
        });
        let (mut rx, w) = (hold.subscribe(), waiting.clone());
        conns.spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if *rx.borrow_and_update() {
                    w.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.wait_for(|held| !*held).await;
                    w.fetch_sub(1, Ordering::SeqCst);
                }
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = cw.shutdown().await;
        });
    }
}
