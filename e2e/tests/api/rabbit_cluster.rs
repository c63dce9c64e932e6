//! One RabbitMQ node stopped under a sustained stream and started again (issue 20).
//!
//! A gateway and a worker on the three-node cluster of `scripts/clusters.sh`
//! (`AMQP_URL` lists the nodes; the test's own namespace of quorum queues,
//! as every test here). Twenty users send usage batches (fresh event ids, some
//! resent with the same ids) and keyed consumes; a few seconds in, the node
//! the gateway and worker are connected to is stopped, later started again;
//! then the same with the node they moved to (they go back to the first).
//! Then: every 202 is stored exactly once, every 200 consume is exactly one
//! ledger row, nothing else is stored or charged (what was answered 503 is
//! retried with the same ids and keys, so it counts once or not at all), and
//! requests succeed again with nothing restarted. `#[ignore]`d: run with
//! `CLUSTER_TESTS=1 cargo nextest run -p e2e --test api --run-ignored all rabbit_cluster:: --no-capture`
//! after `scripts/clusters.sh start rabbit-cluster`; when run, a missing
//! cluster fails it. With `RUST_LOG` set (e.g. `warn`) the gateway's and
//! worker's logs show why each 503 was answered.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

const USERS: usize = 20;
const EVENTS_PER_BATCH: usize = 3;
/// Successes the stream must reach in each phase (before the stop, with the
/// node down, after its start) before the test moves on.
const PHASE_SUCCESSES: usize = 60;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `scripts/clusters.sh ARGS...`; its stdout, or a panic with its output.
fn clusters(args: &[&str]) -> String {
    let out = std::process::Command::new("bash")
        .arg(root().join("scripts/clusters.sh"))
        .args(args)
        .output()
        .expect("scripts/clusters.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "scripts/clusters.sh {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The cluster's variables; panics, naming the fix, when it is not running.
fn cluster_env() -> HashMap<String, String> {
    assert_eq!(
        std::env::var("CLUSTER_TESTS").as_deref(),
        Ok("1"),
        "the cluster tests run with CLUSTER_TESTS=1 against scripts/clusters.sh start rabbit-cluster"
    );
    let env: HashMap<String, String> = clusters(&["env", "rabbit-cluster"])
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    for key in ["CLUSTER_AMQP_URL", "CLUSTER_RABBIT_NODES"] {
        assert!(
            env.contains_key(key),
            "CLUSTER_TESTS=1 but `scripts/clusters.sh env rabbit-cluster` has no {key}"
        );
    }
    let status = std::process::Command::new("bash")
        .arg(root().join("scripts/clusters.sh"))
        .args(["status", "rabbit-cluster"])
        .output()
        .expect("scripts/clusters.sh status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("c1:up c2:up c3:up"),
        "CLUSTER_TESTS=1 but the three RabbitMQ nodes are not up ({}): run scripts/clusters.sh start rabbit-cluster",
        status.lines().next().unwrap_or("")
    );
    env
}

/// `rabbitmqctl -n rabbit-cASK@localhost -q ARGS --formatter json` with the
/// cluster's own cookie (`scripts/clusters/rabbit.sh`): its rows.
fn rabbitmqctl(ask: usize, args: &[&str]) -> Vec<Value> {
    let dir = root().join("target/clusters/rabbit");
    let node = format!("rabbit-c{ask}@localhost");
    let out = std::process::Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
        .env("HOME", dir.join("home"))
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
        .args(["-n", &node, "-q"])
        .args(args)
        .args(["--formatter", "json"])
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("rabbitmqctl json")
}

/// Client connections per node number (1..3, from the AMQP port 568N they
/// came in on), asked of running node `ask`.
fn connections_per_node(ask: usize) -> HashMap<u64, usize> {
    let mut per = HashMap::new();
    for row in rabbitmqctl(ask, &["list_connections", "port"]) {
        let port = row["port"].as_u64().expect("a port");
        // The cluster's TLS listeners (scripts/clusters.sh rabbit-tls) serve the step's other
        // tests; a connection of theirs may still be closing: not this test's.
        if (5691..=5693).contains(&port) {
            continue;
        }
        assert!(
            (5681..=5683).contains(&port),
            "a connection on port {port}, not of the cluster"
        );
        *per.entry(port - 5680).or_insert(0) += 1;
    }
    per
}

/// The leader node of each of the namespace's queues.
fn leaders(ask: usize, namespace: &str) -> Vec<String> {
    let mut out: Vec<String> = rabbitmqctl(ask, &["list_queues", "name", "leader"])
        .into_iter()
        .filter(|q| {
            q["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&format!("{namespace}.")))
        })
        .map(|q| {
            format!(
                "{}@{}",
                q["name"].as_str().unwrap_or("?"),
                q["leader"].as_str().unwrap_or("?")
            )
        })
        .collect();
    out.sort();
    out
}

/// `clusters.sh ARGS` off the runtime (it blocks for seconds); its duration.
async fn timed_clusters(args: [&'static str; 2]) -> Duration {
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let out = clusters(&args);
        println!(
            "rabbit_cluster: {} -> {}",
            args.join(" "),
            out.trim().replace('\n', "; ")
        );
        t.elapsed()
    })
    .await
    .unwrap()
}

/// Starts node `n` again if the test ends (fails) while it is stopped, so the
/// next run finds three nodes.
struct Restart {
    node: Option<&'static str>,
}

impl Drop for Restart {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            let _ = std::process::Command::new("bash")
                .arg(root().join("scripts/clusters.sh"))
                .args(["start-rabbit-node", n])
                .output();
        }
    }
}

fn model_events(n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            json!({"event_id": Uuid::new_v4(), "kind": "model", "provider": "openai", "model": "gpt-4o",
                   "prompt_tokens": 3, "completion_tokens": 2})
        })
        .collect()
}

fn event_ids(batch: &[Value]) -> Vec<Uuid> {
    batch
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// What one user's requests were answered.
#[derive(Default)]
struct Tally {
    accepted: HashSet<Uuid>,
    tracks_202: usize,
    resent_202: usize,
    consumes_200: HashMap<String, Uuid>,
    /// Answered 503: retried after the stream with the same ids / key.
    tracks_503: Vec<Vec<Value>>,
    consumes_503: Vec<String>,
    /// Anything else (another status, a transport error): the test fails.
    unexpected: Vec<String>,
}

/// The stream's shared view: successes so far and whether to go on.
#[derive(Default)]
struct Flow {
    ok: AtomicUsize,
    failed_503: AtomicUsize,
    /// When each 503 was answered.
    failed_at: std::sync::Mutex<Vec<Instant>>,
    /// How many 503s said what (`detail`), per route.
    failed_why: std::sync::Mutex<HashMap<String, usize>>,
    stop: AtomicBool,
}

impl Flow {
    fn unavailable(&self, why: String) {
        *self.failed_why.lock().unwrap().entry(why).or_insert(0) += 1;
        self.failed_503.fetch_add(1, Ordering::Relaxed);
        self.failed_at.lock().unwrap().push(Instant::now());
    }

    /// The first and last 503 at or after `since`, in seconds after it.
    fn window(&self, since: Instant) -> Option<(f64, f64)> {
        let at = self.failed_at.lock().unwrap();
        let secs: Vec<f64> = at
            .iter()
            .filter(|t| **t >= since)
            .map(|t| (*t - since).as_secs_f64())
            .collect();
        Some((*secs.first()?, *secs.last()?))
    }
}

struct User {
    id: String,
    token: String,
}

enum Answer {
    Ok(Option<Uuid>),
    /// 503, with the route and the answer's `detail`.
    Unavailable(String),
    Other(String),
}

async fn why(route: &str, r: reqwest::Response) -> String {
    let body: Value = r.json().await.unwrap_or(Value::Null);
    format!("{route}: {}", body["detail"].as_str().unwrap_or("?"))
}

async fn track(app: &TestApp, user: &User, batch: &[Value]) -> Answer {
    let r = app
        .client
        .post(app.url("/api/vscode/usage/track"))
        .bearer_auth(&user.token)
        .json(&json!({ "events": batch }))
        .send()
        .await;
    match r {
        Ok(r) if r.status() == 202 => Answer::Ok(None),
        Ok(r) if r.status() == 503 => Answer::Unavailable(why("track", r).await),
        Ok(r) => Answer::Other(format!(
            "track {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        )),
        Err(e) => Answer::Other(format!("track: {e}")),
    }
}

async fn consume(app: &TestApp, user: &User, key: &str) -> Answer {
    let r = app
        .client
        .post(app.url(&format!("/api/users/{}/credits/consume", user.id)))
        .bearer_auth(&user.token)
        .header("Idempotency-Key", key)
        .json(&json!({"amount": 1}))
        .send()
        .await;
    match r {
        Ok(r) if r.status() == 200 => {
            let body: Value = r.json().await.unwrap_or(Value::Null);
            match body["transaction_id"].as_str().and_then(|t| t.parse().ok()) {
                Some(tx) => Answer::Ok(Some(tx)),
                None => Answer::Other(format!("consume 200 without a transaction id: {body}")),
            }
        }
        Ok(r) if r.status() == 503 => Answer::Unavailable(why("consume", r).await),
        Ok(r) => Answer::Other(format!(
            "consume {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        )),
        Err(e) => Answer::Other(format!("consume: {e}")),
    }
}

/// One user's stream until `flow.stop`: a batch of fresh events each round
/// (every fourth round the previous batch again, same ids), a keyed consume
/// every second round.
async fn stream(app: Arc<TestApp>, user: User, flow: Arc<Flow>) -> (User, Tally) {
    let mut t = Tally::default();
    let mut last: Option<Vec<Value>> = None;
    let mut round = 0usize;
    while !flow.stop.load(Ordering::Relaxed) {
        round += 1;
        let (batch, resend) = match (&last, round.is_multiple_of(4)) {
            (Some(prev), true) => (prev.clone(), true),
            _ => (model_events(EVENTS_PER_BATCH), false),
        };
        match track(&app, &user, &batch).await {
            Answer::Ok(_) => {
                t.accepted.extend(event_ids(&batch));
                t.tracks_202 += 1;
                t.resent_202 += usize::from(resend);
                flow.ok.fetch_add(1, Ordering::Relaxed);
                last = Some(batch);
            }
            Answer::Unavailable(why) => {
                flow.unavailable(why);
                t.tracks_503.push(batch);
            }
            Answer::Other(e) => t.unexpected.push(e),
        }
        if round.is_multiple_of(2) {
            let key = Uuid::new_v4().to_string();
            match consume(&app, &user, &key).await {
                Answer::Ok(tx) => {
                    t.consumes_200.insert(key, tx.expect("a transaction id"));
                    flow.ok.fetch_add(1, Ordering::Relaxed);
                }
                Answer::Unavailable(why) => {
                    flow.unavailable(why);
                    t.consumes_503.push(key);
                }
                Answer::Other(e) => t.unexpected.push(e),
            }
        }
        // A steady stream, not a flood: the machine is shared.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (user, t)
}

/// Retries each 503 of `t` with the same ids / key until it is answered
/// 202 / 200 (at most 30 s each); adds what it accepted to `t`.
async fn retry_503s(app: &TestApp, user: &User, t: &mut Tally) {
    for batch in &t.tracks_503 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match track(app, user, batch).await {
                Answer::Ok(_) => break,
                Answer::Unavailable(_) if Instant::now() < deadline => {}
                Answer::Unavailable(_) => {
                    panic!("a track still answered 503 30 s after the stream")
                }
                Answer::Other(e) => panic!("retried track: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        t.accepted.extend(event_ids(batch));
    }
    for key in &t.consumes_503 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let tx = loop {
            match consume(app, user, key).await {
                Answer::Ok(tx) => break tx.expect("a transaction id"),
                Answer::Unavailable(_) if Instant::now() < deadline => {}
                Answer::Unavailable(_) => {
                    panic!("a consume still answered 503 30 s after the stream")
                }
                Answer::Other(e) => panic!("retried consume: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        t.consumes_200.insert(key.clone(), tx);
    }
}

/// Waits until the stream has `more` successes past `from`; fails after `timeout`.
async fn successes(app: &TestApp, flow: &Flow, more: usize, timeout: Duration) -> usize {
    let from = flow.ok.load(Ordering::Relaxed);
    app.eventually(timeout, || async {
        let now = flow.ok.load(Ordering::Relaxed);
        (now >= from + more).then_some(now)
    })
    .await
}

async fn ids(app: &TestApp, sql: &str) -> Vec<Uuid> {
    sqlx::query_scalar::<_, Uuid>(sql)
        .fetch_all(&app.pg)
        .await
        .expect(sql)
}

/// One round under the running stream: `PHASE_SUCCESSES` more successes,
/// stop the node holding the clients' connections, as many successes with it
/// down (through the others, and none of them on it), start it, as many again.
/// The node's number and the 503s answered until the stop returned, while down, and after the start returned.
async fn fail_over(app: &TestApp, flow: &Flow, started: Instant) -> (&'static str, [usize; 3]) {
    let failed = || flow.failed_503.load(Ordering::Relaxed);
    let before = failed();
    successes(app, flow, PHASE_SUCCESSES, Duration::from_secs(60)).await;
    let per_node = connections_per_node(2);
    let (busiest, conns) = per_node
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(node, n)| (*node, *n))
        .expect("client connections on the cluster");
    let n: &'static str = ["1", "2", "3"][busiest as usize - 1];
    let other = if busiest == 1 { 2 } else { 1 };
    let namespace = &app.settings.amqp.namespace;
    println!(
        "rabbit_cluster: at {:.1}s connections per node {per_node:?}, queue leaders {:?}; stopping rabbit-c{n}@localhost ({conns})",
        started.elapsed().as_secs_f64(),
        leaders(other as usize, namespace)
    );
    let mut restart = Restart { node: Some(n) };
    let stop_began = Instant::now();
    let took = timed_clusters(["stop-rabbit-node", n]).await;
    let stopping = failed() - before;
    println!(
        "rabbit_cluster: node {n} stopped in {:.1}s",
        took.as_secs_f64()
    );

    // With the node down, the stream goes on through the other two.
    successes(app, flow, PHASE_SUCCESSES, Duration::from_secs(60)).await;
    let moved = connections_per_node(other as usize);
    assert!(
        !moved.contains_key(&busiest),
        "no connection left on the stopped node: {moved:?}"
    );
    println!(
        "rabbit_cluster: serving with node {n} down, connections {moved:?}, leaders {:?}",
        leaders(other as usize, namespace)
    );
    let took = timed_clusters(["start-rabbit-node", n]).await;
    restart.node = None;
    let down = failed() - before - stopping;
    println!(
        "rabbit_cluster: node {n} started in {:.1}s",
        took.as_secs_f64()
    );
    // Back: new requests succeed, nothing restarted.
    successes(app, flow, PHASE_SUCCESSES, Duration::from_secs(60)).await;
    let back = failed() - before - stopping - down;
    match flow.window(stop_began) {
        Some((a, b)) => {
            println!("rabbit_cluster: node {n}: 503s from {a:.1}s to {b:.1}s after its stop began")
        }
        None => println!("rabbit_cluster: node {n}: no 503 after its stop began"),
    }
    (n, [stopping, down, back])
}

#[tokio::test]
#[ignore = "needs the RabbitMQ cluster: CLUSTER_TESTS=1 after scripts/clusters.sh start rabbit-cluster"]
async fn a_node_stopped_under_a_stream_loses_and_doubles_nothing() {
    let env = cluster_env();
    if std::env::var_os("RUST_LOG").is_some() {
        // The gateway's and worker's logs (why a 503, reconnects), when asked for.
        common::telemetry::init(common::settings::AppEnv::Development);
    }
    let url = env["CLUSTER_AMQP_URL"].clone();
    let app = spawn_app_with(|v| {
        v.insert("AMQP_URL".into(), url);
    })
    .await;
    app.start_worker().await;
    let app = Arc::new(app);
    let flow = Arc::new(Flow::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..USERS {
        let (id, token) = new_user();
        // Enough for every consume of the stream (Postgres only, no broker).
        let r = app
            .post(
                &format!("/api/admin/users/{id}/credits/grant"),
                &admin_token(),
                &json!({"amount": 100_000, "reason": "stream"}),
            )
            .await;
        assert_eq!(r.status(), 200, "grant");
        tasks.spawn(stream(app.clone(), User { id, token }, flow.clone()));
    }

    // Twice: the node the clients are on stopped and started again; the
    // second time they are on a survivor of the first (and go back to the
    // node that returned, the first of the list).
    let mut rounds = Vec::new();
    for _ in 0..2 {
        rounds.push(fail_over(&app, &flow, started).await);
    }
    flow.stop.store(true, Ordering::Relaxed);
    let streamed = started.elapsed();

    let mut all = Tally::default();
    let mut users = Vec::new();
    let (mut tracks_503, mut consumes_503) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (user, mut t) = joined.expect("stream task");
        assert!(
            t.unexpected.is_empty(),
            "answers other than 202/200/503: {:?}",
            t.unexpected
        );
        (tracks_503, consumes_503) = (
            tracks_503 + t.tracks_503.len(),
            consumes_503 + t.consumes_503.len(),
        );
        // What was answered 503 is retried with the same ids and keys, as a client would.
        retry_503s(&app, &user, &mut t).await;
        all.accepted.extend(t.accepted);
        all.tracks_202 += t.tracks_202;
        all.resent_202 += t.resent_202;
        all.consumes_200.extend(t.consumes_200);
        users.push(user);
    }

    // Drained: stored = accepted, each once; ledger = answered consumes, each once.
    let accepted = all.accepted.clone();
    let (stored, duplicates) = app
        .eventually(Duration::from_secs(60), || async {
            let rows = ids(&app, "select id from model_usage").await;
            let set: HashSet<Uuid> = rows.iter().copied().collect();
            let duplicates = rows.len() - set.len();
            accepted.is_subset(&set).then_some((set, duplicates))
        })
        .await;
    assert_eq!(stored, accepted, "stored ids = accepted ids");
    assert_eq!(duplicates, 0, "no event stored twice");
    let charged: HashSet<Uuid> = all.consumes_200.values().copied().collect();
    assert_eq!(
        charged.len(),
        all.consumes_200.len(),
        "one transaction per key"
    );
    let sql = "select id from credit_transactions where kind = 'consume'";
    let ledger = app
        .eventually(Duration::from_secs(60), || async {
            let rows = ids(&app, sql).await;
            let set: HashSet<Uuid> = rows.iter().copied().collect();
            charged.is_subset(&set).then_some(rows)
        })
        .await;
    let ledger_set: HashSet<Uuid> = ledger.iter().copied().collect();
    assert_eq!(ledger.len(), ledger_set.len(), "no consume charged twice");
    assert_eq!(ledger_set, charged, "ledger rows = answered consumes");
    let drift: i64 = app
        .count("select count(*) from users u where u.credits_balance <> (select coalesce(sum(amount), 0) from credit_transactions t where t.user_id = u.id)")
        .await;
    assert_eq!(drift, 0, "users' balances = their ledgers");
    // And = what the gateway answers, once reservations of 503s are settled or released.
    for user in &users {
        let sql = format!("select credits_balance from users where id = '{}'", user.id);
        let settled = app.count(&sql).await;
        app.eventually(Duration::from_secs(90), || async {
            let r = app.get("/api/vscode/user/balance", &user.token).await;
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (body["balance"].as_i64() == Some(settled)).then_some(())
        })
        .await;
    }
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "ready again: {}",
        r.text().await.unwrap_or_default()
    );

    let phases: Vec<String> = rounds
        .iter()
        .map(|(n, [stopping, down, back])| {
            format!(
                "node {n}: {stopping} until its stop returned, {down} while down, {back} after its start"
            )
        })
        .collect();
    println!(
        "rabbit_cluster: accepted {} = stored {}, duplicates {duplicates}, 503s {} ({tracks_503} tracks, {consumes_503} consumes; {})",
        accepted.len(),
        stored.len(),
        tracks_503 + consumes_503,
        phases.join("; ")
    );
    println!(
        "rabbit_cluster: 503s by answer {:?}",
        flow.failed_why.lock().unwrap()
    );
    println!(
        "rabbit_cluster: {} tracks answered 202 ({} of them resends of accepted ids), consumes answered 200 {} = ledger rows {}; \
         stream {:.1}s, nodes {:?} stopped and started under it, nothing restarted",
        all.tracks_202,
        all.resent_202,
        charged.len(),
        ledger.len(),
        streamed.as_secs_f64(),
        rounds.iter().map(|(n, _)| *n).collect::<Vec<_>>()
    );
}
