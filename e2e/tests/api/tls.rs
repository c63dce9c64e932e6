//! TLS to the three stores and several AMQP nodes (issue 20).
//!
//! - A multi-node `AMQP_URL` whose first node is a closed port: gateway and
//!   worker connect to the next one (normal suite).
//! - Against the TLS stores of `scripts/clusters.sh` (Postgres ssl on 5442,
//!   Redis TLS, a RabbitMQ TLS listener): the stack end to end over TLS, and
//!   a server whose certificate does not match refused. `#[ignore]`d: run
//!   them with `CLUSTER_TESTS=1 cargo nextest run -p e2e --run-ignored only tls::`
//!   after `scripts/clusters.sh start`; when run, missing stores fail them.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::settings::Settings;
use serde_json::{json, Value};
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

async fn stored_events(app: &TestApp, user: &str) -> i64 {
    sqlx::query_scalar::<_, i64>("select count(*) from model_usage where user_id = $1")
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

fn model_event() -> Value {
    json!({"event_id": uuid::Uuid::new_v4(), "kind": "model", "provider": "openai", "model": "gpt-4o",
           "prompt_tokens": 3, "completion_tokens": 2})
}

#[tokio::test]
async fn a_node_list_whose_first_node_is_closed_is_served_by_the_next() {
    let app = spawn_app_with(|v| {
        let real = v
            .get("AMQP_URL")
            .cloned()
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        v.insert(
            "AMQP_URL".into(),
            format!("amqp://guest:guest@127.0.0.1:1/%2f, {real}"),
        );
    })
    .await;
    app.start_worker().await;
    let (user, token) = new_user();
    let r = app
        .post(
            "/api/vscode/usage/track",
            &token,
            &json!({"events": [model_event(), model_event()]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let n = app
        .eventually(Duration::from_secs(15), || async {
            let n = stored_events(&app, &user).await;
            (n == 2).then_some(n)
        })
        .await;
    assert_eq!(n, 2);
    let direct = common::amqp::connect::connect(&app.settings.amqp.url)
        .await
        .expect("the second node answers");
    assert!(direct.status().connected());
}

/// The variables `scripts/clusters.sh env` prints. Panics, naming the fix,
/// when the TLS stores are not there: these tests run only when asked for.
fn cluster_env() -> HashMap<String, String> {
    assert_eq!(
        std::env::var("CLUSTER_TESTS").as_deref(),
        Ok("1"),
        "the TLS tests run with CLUSTER_TESTS=1 against scripts/clusters.sh start"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/clusters.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("env")
        .output()
        .expect("scripts/clusters.sh env");
    let text = String::from_utf8_lossy(&out.stdout);
    let env: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    for key in [
        "CLUSTER_TLS_DATABASE_URL",
        "CLUSTER_TLS_REDIS_URL",
        "CLUSTER_AMQPS_URL",
        "APP__TLS__CA_FILE",
    ] {
        assert!(
            env.contains_key(key),
            "CLUSTER_TESTS=1 but `scripts/clusters.sh env` has no {key}: start the TLS stores"
        );
    }
    for key in [
        "CLUSTER_TLS_DATABASE_URL",
        "CLUSTER_TLS_REDIS_URL",
        "CLUSTER_AMQPS_URL",
    ] {
        for node in env[key].split(',') {
            let addr = host_port(node);
            assert!(
                answers(&addr),
                "CLUSTER_TESTS=1 but {addr} ({key}) does not answer: run scripts/clusters.sh start"
            );
        }
    }
    env
}

/// `host:port` of a store URL.
fn host_port(url: &str) -> String {
    let rest = url.trim().split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    rest.split(['/', '?']).next().unwrap_or(rest).to_string()
}

fn answers(host_port: &str) -> bool {
    use std::net::ToSocketAddrs;
    let addrs = host_port
        .to_socket_addrs()
        .map(|a| a.collect::<Vec<_>>())
        .unwrap_or_default();
    addrs
        .iter()
        .any(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok())
}

/// A fresh, migrated database on the TLS Postgres; its URL (same TLS options).
async fn tls_database(base_url: &str) -> String {
    let opts: sqlx::postgres::PgConnectOptions =
        base_url.parse().expect("CLUSTER_TLS_DATABASE_URL");
    let mut admin = opts
        .connect()
        .await
        .expect("CLUSTER_TESTS=1 but the TLS Postgres does not answer");
    let name = format!("tls_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("create database {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    admin.close().await.ok();
    let (head, query) = base_url.split_once('?').unwrap_or((base_url, ""));
    let server = head.rsplit_once('/').map(|(s, _)| s).unwrap_or(head);
    let url = format!("{server}/{name}?{query}");
    let mut conn = sqlx::PgConnection::connect(&url)
        .await
        .expect("the new database over TLS");
    common::db::MIGRATOR
        .run(&mut conn)
        .await
        .expect("migrations");
    url
}

/// The variables of a gateway and worker on the TLS stores.
fn tls_vars(env: &HashMap<String, String>, database_url: &str) -> HashMap<String, String> {
    let tag = testkit::new_tag();
    let mut v = base_vars("unused", &tag);
    v.insert("DATABASE_URL".into(), database_url.to_string());
    v.insert("REDIS_URL".into(), env["CLUSTER_TLS_REDIS_URL"].clone());
    v.insert("AMQP_URL".into(), env["CLUSTER_AMQPS_URL"].clone());
    for key in [
        "APP__TLS__CA_FILE",
        "APP__TLS__CLIENT_CERT_FILE",
        "APP__TLS__CLIENT_KEY_FILE",
    ] {
        if let Some(value) = env.get(key) {
            v.insert(key.into(), value.clone());
        }
    }
    v
}

struct Stack {
    base: String,
    client: reqwest::Client,
    pg: sqlx::PgPool,
    shutdown: CancellationToken,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An in-process gateway (and, when asked, worker) on `vars`.
async fn start(vars: &HashMap<String, String>, with_worker: bool) -> Stack {
    let settings = Settings::load_from(Path::new("/nonexistent"), vars).expect("settings");
    let shutdown = CancellationToken::new();
    let app = gateway::startup::Application::build(settings.clone(), shutdown.clone())
        .await
        .expect("gateway");
    let base = format!("http://{}", app.local_addr());
    tokio::spawn(app.run_until_stopped());
    if with_worker {
        let w = worker::startup::Worker::build(settings.clone(), shutdown.clone())
            .await
            .expect("worker");
        tokio::spawn(w.run_until_stopped());
    }
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy_with(common::db::pg_options(&settings).unwrap());
    Stack {
        base,
        client: reqwest::Client::new(),
        pg,
        shutdown,
    }
}

impl Stack {
    async fn readyz(&self) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// Polls until `f` answers, at most `timeout`.
    async fn until<T, F, Fut>(&self, timeout: Duration, what: &str, mut f: F) -> T
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
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn count(&self, sql: &str, user: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(user)
            .fetch_one(&self.pg)
            .await
            .unwrap_or(-1)
    }
}

#[tokio::test]
#[ignore = "needs the TLS stores: CLUSTER_TESTS=1 after scripts/clusters.sh start"]
async fn the_stack_runs_end_to_end_over_tls_to_all_three_stores() {
    let env = cluster_env();
    let database_url = tls_database(&env["CLUSTER_TLS_DATABASE_URL"]).await;
    let stack = start(&tls_vars(&env, &database_url), true).await;
    let (status, body) = stack
        .until(Duration::from_secs(15), "/readyz over TLS", || async {
            let (status, body) = stack.readyz().await;
            (status == 200).then_some((status, body))
        })
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["dependencies"],
        json!({"postgres": "up", "redis": "up", "rabbitmq": "up"})
    );

    let (user, token) = new_user();
    let r = stack
        .client
        .post(format!("{}/api/vscode/usage/track", stack.base))
        .bearer_auth(&token)
        .json(&json!({"events": [model_event(), model_event(), model_event()]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let sql = "select count(*) from model_usage where user_id = $1";
    stack
        .until(Duration::from_secs(20), "3 events stored", || async {
            (stack.count(sql, &user).await == 3).then_some(())
        })
        .await;

    let r = stack
        .client
        .post(format!("{}/api/users/{user}/credits/consume", stack.base))
        .bearer_auth(&token)
        .json(&json!({"amount": 7}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let answer: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let sql = "select count(*) from credit_transactions where user_id = $1 and kind = 'consume'";
    stack
        .until(
            Duration::from_secs(20),
            "the consume in the ledger",
            || async { (stack.count(sql, &user).await == 1).then_some(()) },
        )
        .await;
    println!(
        "tls e2e: 3 events stored, 1 consume in the ledger, over TLS to postgres, redis, rabbitmq"
    );
}

#[tokio::test]
#[ignore = "needs the TLS stores: CLUSTER_TESTS=1 after scripts/clusters.sh start"]
async fn a_server_whose_certificate_does_not_match_is_refused() {
    let env = cluster_env();
    let wrong = env
        .get("CLUSTER_TLS_WRONG_CA_FILE")
        .expect("CLUSTER_TESTS=1 but `scripts/clusters.sh env` has no CLUSTER_TLS_WRONG_CA_FILE")
        .clone();
    let good_url = &env["CLUSTER_TLS_DATABASE_URL"];
    // Trusting another CA only: every store's certificate fails verification.
    let mut vars = tls_vars(&env, good_url);
    vars.insert("APP__TLS__CA_FILE".into(), wrong.clone());
    let ca = &env["APP__TLS__CA_FILE"];
    vars.insert("DATABASE_URL".into(), good_url.replace(ca.as_str(), &wrong));
    let settings = Settings::load_from(Path::new("/nonexistent"), &vars).expect("settings");

    let pg = sqlx::PgConnection::connect_with(&common::db::pg_options(&settings).unwrap()).await;
    let Err(err) = pg else {
        panic!("Postgres with another CA's root refused")
    };
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "a certificate error, not {err:?}"
    );

    let material = common::tls::TlsMaterial::load(&settings.tls).unwrap();
    let client = common::tls::redis_client(&settings.redis.url, &material).unwrap();
    let Err(err) = client.get_multiplexed_async_connection().await else {
        panic!("Redis with another CA refused")
    };
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "a certificate error, not {err:?}"
    );

    // The right CA, but a certificate for another host.
    if let Some(url) = env.get("CLUSTER_TLS_REDIS_WRONG_HOST_URL") {
        assert!(
            answers(&host_port(url)),
            "CLUSTER_TESTS=1 but {url} does not answer: run scripts/clusters.sh start"
        );
        let right = common::tls::TlsMaterial::load(
            &Settings::load_from(Path::new("/x"), &tls_vars(&env, good_url))
                .unwrap()
                .tls,
        )
        .unwrap();
        let client = common::tls::redis_client(url, &right).unwrap();
        let Err(err) = client.get_multiplexed_async_connection().await else {
            panic!("a certificate for another host refused")
        };
        assert!(
            format!("{err:?}").to_lowercase().contains("certificate"),
            "a certificate error, not {err:?}"
        );
    }

    // The stack itself: up, but each store reported down.
    let stack = start(&vars, false).await;
    let (status, body) = stack.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["dependencies"],
        json!({"postgres": "down", "redis": "down", "rabbitmq": "down"})
    );
    common::tls::init(&settings).unwrap();
    let Err(err) = common::amqp::connect::connect(&settings.amqp.url).await else {
        panic!("RabbitMQ with another CA refused")
    };
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "a certificate error, not {err}"
    );
    println!("refused: amqp {err}");
}

/// POSTs `body` with the caller's token (and an `Idempotency-Key` when given).
async fn post(
    stack: &Stack,
    path: &str,
    token: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = stack
        .client
        .post(format!("{}{path}", stack.base))
        .bearer_auth(token)
        .json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

/// The cluster and TLS together (issue 20): gateway and worker on the TLS Postgres, a TLS-only
/// Redis Cluster (`rediss://` nodes, client certificates) and the three AMQPS nodes. Users spread
/// over the masters validate a session, track, consume with a key (replayed), hold and settle;
/// every figure is checked against the ledger.
#[tokio::test]
#[ignore = "needs the TLS stores: CLUSTER_TESTS=1 after scripts/clusters.sh start"]
async fn the_stack_runs_over_tls_on_a_redis_cluster_and_three_amqps_nodes() {
    let env = cluster_env();
    let urls = env
        .get("CLUSTER_TLS_REDIS_CLUSTER_URLS")
        .expect("CLUSTER_TESTS=1 but no CLUSTER_TLS_REDIS_CLUSTER_URLS: scripts/clusters.sh start redis-cluster-tls")
        .clone();
    for node in urls.split(',') {
        let addr = host_port(node);
        assert!(
            answers(&addr),
            "the TLS Redis Cluster node {addr} does not answer"
        );
    }
    assert_eq!(env["CLUSTER_AMQPS_URL"].split(',').count(), 3);
    let database_url = tls_database(&env["CLUSTER_TLS_DATABASE_URL"]).await;
    let mut vars = tls_vars(&env, &database_url);
    vars.insert("REDIS_CLUSTER_URLS".into(), urls);
    let stack = start(&vars, true).await;
    let (status, body) = stack
        .until(
            Duration::from_secs(20),
            "/readyz over TLS on the cluster",
            || async {
                let (status, body) = stack.readyz().await;
                (status == 200).then_some((status, body))
            },
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // At least six users, and enough that every master's third of the slots holds one.
    let third = |u: &str| common::redis::slot::key_slot(u.as_bytes()) / 5462;
    let mut users: Vec<(String, String)> = Vec::new();
    let mut slots = std::collections::BTreeSet::new();
    while users.len() < 6 || slots.len() < 3 {
        let (u, t) = new_user();
        slots.insert(third(&u));
        users.push((u, t));
    }
    for (user, token) in &users {
        let (s, _, v) = post(
            &stack,
            "/api/vscode/session/validate",
            token,
            None,
            &json!({"extension_version": "1.4.0", "platform": "linux", "machine_id": "m-1"}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let start_balance = v["credits"]["balance"].as_i64().unwrap();
        let events = json!({"events": [model_event(), model_event()]});
        let (s, headers, v) = post(&stack, "/api/vscode/usage/track", token, None, &events).await;
        assert_eq!(s, 202, "{v}");
        assert!(headers.contains_key("x-ratelimit-remaining"), "{headers:?}");
        let path = format!("/api/users/{user}/credits/consume");
        let key = uuid::Uuid::new_v4().to_string();
        let (s, _, first) = post(&stack, &path, token, Some(&key), &json!({"amount": 7})).await;
        assert_eq!(s, 200, "{first}");
        let (s, _, again) = post(&stack, &path, token, Some(&key), &json!({"amount": 7})).await;
        assert_eq!(
            (s, &again["transaction_id"]),
            (200, &first["transaction_id"])
        );
        let path = format!("/api/users/{user}/credits/holds");
        let (s, _, hold) = post(&stack, &path, token, None, &json!({"amount": 20})).await;
        assert_eq!(s, 200, "{hold}");
        let settle = format!("{path}/{}/settle", hold["hold_id"].as_str().unwrap());
        let (s, _, settled) = post(&stack, &settle, token, None, &json!({"amount": 12})).await;
        assert_eq!(s, 200, "{settled}");
        assert_eq!(settled["balance"], start_balance - 19, "{settled}");

        let sql = "select count(*) from model_usage where user_id = $1";
        stack
            .until(Duration::from_secs(20), "2 events stored", || async {
                (stack.count(sql, user).await == 2).then_some(())
            })
            .await;
        let sql =
            "select count(*) from credit_transactions where user_id = $1 and kind = 'consume'";
        stack
            .until(
                Duration::from_secs(20),
                "2 consumes in the ledger",
                || async { (stack.count(sql, user).await == 2).then_some(()) },
            )
            .await;
        let ledger: i64 = sqlx::query_scalar(
            "select coalesce(sum(amount), 0)::int8 from credit_transactions where user_id = $1",
        )
        .bind(user)
        .fetch_one(&stack.pg)
        .await
        .unwrap();
        assert_eq!(ledger, start_balance - 19);
    }
    println!(
        "tls + redis cluster: {} users on {} of 3 masters' slot ranges: session, 2 events, a keyed consume replayed, \
         a hold settled, each = its ledger; over TLS to postgres, a TLS redis cluster and 3 amqps nodes",
        users.len(),
        slots.len()
    );
}
