//! Outage tests: they stop shared services (RabbitMQ, Postgres), so `.ci/run`
//! runs this binary on its own, one test at a time, after the main suite.
//! Each test prints what was accepted and what landed.

#[path = "api/helpers.rs"]
mod helpers;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helpers::*;
use serde_json::{json, Value};
use testkit::redis_server::OwnRedis;

/// Runs a shell command; used to stop and start the machine's services.
fn sh(cmd: &str) {
    let ok = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{cmd}");
}

/// Restarts a stopped service even if the test panics.
struct Restore(&'static str);
impl Drop for Restore {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg("-c").arg(self.0).status();
    }
}

const RABBIT_STOP: &str = "rabbitmqctl -q stop_app";
const RABBIT_START: &str = "rabbitmqctl -q start_app && rabbitmqctl -q await_startup";
const PG_STOP: &str =
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -1) main stop -m fast";
const PG_START: &str = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -1) main start && until pg_isready -h 127.0.0.1 -q; do sleep 0.2; done";

fn feature(name: &str) -> Value {
    json!({"event_id": uuid::Uuid::new_v4(), "kind": "feature", "feature": name})
}

async fn stored_features(app: &TestApp, user: &str) -> i64 {
    sqlx::query_scalar("select count(*) from feature_usage where user_id = $1")
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap_or(-1)
}

/// A sustained stream of usage/track requests from a few concurrent loops,
/// each with its own event id, kept up until stopped (or its bounds hit).
/// Records which ids were answered 202 and which 503.
struct Load {
    stop: tokio_util::sync::CancellationToken,
    stats: Arc<Mutex<Stats>>,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Stats {
    accepted: Vec<uuid::Uuid>,
    refused: Vec<uuid::Uuid>,
    /// Any other status: there must be none.
    other: Vec<u16>,
}

impl Load {
    fn start(app: &TestApp, token: &str, loops: usize) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let started = Instant::now();
        let loops = (0..loops)
            .map(|_| {
                let (client, url, token) = (
                    app.client.clone(),
                    app.url("/api/vscode/usage/track"),
                    token.to_string(),
                );
                let (stop, stats) = (stop.clone(), stats.clone());
                tokio::spawn(async move {
                    // Bounded whatever happens: at most 20 000 requests or 3 minutes.
                    for _ in 0..10_000 {
                        if stop.is_cancelled() || started.elapsed() > Duration::from_secs(180) {
                            return;
                        }
                        let id = uuid::Uuid::new_v4();
                        let body = json!({"event_id": id, "kind": "feature", "feature": "load"});
                        let status = client
                            .post(&url)
                            .bearer_auth(&token)
                            .json(&body)
                            .send()
                            .await
                            .map(|r| r.status().as_u16())
                            .unwrap_or(0);
                        {
                            let mut s = stats.lock().unwrap();
                            match status {
                                202 => s.accepted.push(id),
                                503 => s.refused.push(id),
                                other => s.other.push(other),
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Self { stop, stats, loops }
    }

    fn accepted(&self) -> usize {
        self.stats.lock().unwrap().accepted.len()
    }

    fn refused(&self) -> usize {
        self.stats.lock().unwrap().refused.len()
    }

    async fn finish(self) -> Stats {
        self.stop.cancel();
        for l in self.loops {
            l.await.unwrap();
        }
        Arc::try_unwrap(self.stats)
            .ok()
            .expect("loops ended")
            .into_inner()
            .unwrap()
    }
}

/// How many of `ids` are in `feature_usage`.
async fn stored_of(app: &TestApp, ids: &[uuid::Uuid]) -> i64 {
    sqlx::query_scalar("select count(*) from feature_usage where id = any($1)")
        .bind(ids)
        .fetch_one(&app.pg)
        .await
        .unwrap_or(-1)
}

/// Waits for `cond` on the load, failing the test after `within`.
async fn until(load: &Load, within: Duration, what: &str, cond: impl Fn(&Load) -> bool) {
    let deadline = Instant::now() + within;
    while !cond(load) {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn rabbitmq_down_writes_503_reads_answer_and_the_same_gateway_recovers() {
    let app = spawn_app_with(|v| {
        // The stream must meet the broker, not the rate limiter.
        v.insert(
            "APP__RATE_LIMIT__CLASSES__USAGE__LIMIT".into(),
            "1000000".into(),
        );
    })
    .await;
    app.start_worker().await;
    let (user, token) = new_user();
    assert_eq!(
        app.post("/api/vscode/usage/track", &token, &feature("warm"))
            .await
            .status(),
        202
    );
    let load = Load::start(&app, &token, 3);
    until(
        &load,
        Duration::from_secs(30),
        "accepted before the outage",
        |l| l.accepted() >= 100,
    )
    .await;
    let accepted_before = load.accepted();

    let _restore = Restore(RABBIT_START);
    sh(RABBIT_STOP);
    let started = Instant::now();
    let r = app
        .post("/api/vscode/usage/track", &token, &feature("during"))
        .await;
    assert_eq!(r.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "503 took {:?}",
        started.elapsed()
    );
    assert!(r.headers().contains_key("retry-after"));
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let r = app.get(&format!("/api/users/{user}/profile"), &token).await;
    assert_eq!(
        r.status(),
        200,
        "reads keep working while the broker is down"
    );
    // The stream meets the outage too.
    until(
        &load,
        Duration::from_secs(10),
        "503s during the outage",
        |l| l.refused() >= 20,
    )
    .await;
    let accepted_while_stopping = load.accepted() - accepted_before;

    sh(RABBIT_START);
    let back = Instant::now();
    let accepted_at_return = load.accepted();
    until(&load, Duration::from_secs(30), "gateway recovery", |l| {
        l.accepted() > accepted_at_return
    })
    .await;
    let recovered_after = back.elapsed();
    until(
        &load,
        Duration::from_secs(30),
        "accepted after the return",
        |l| l.accepted() >= accepted_at_return + 100,
    )
    .await;
    let stats = load.finish().await;
    assert!(stats.other.is_empty(), "only 202 or 503: {:?}", stats.other);

    // Every 202 is stored, exactly once (ids are row keys: no more than once).
    let accepted = stats.accepted.len() as i64;
    app.eventually(Duration::from_secs(60), || async {
        (stored_of(&app, &stats.accepted).await == accepted).then_some(())
    })
    .await;
    let stored = stored_of(&app, &stats.accepted).await;
    // A 503 promises nothing either way: a publish cut by the outage may
    // still have reached the broker (a resend with the same id stores once).
    let refused_landed = stored_of(&app, &stats.refused).await;
    println!(
        "gateway accepted again {recovered_after:?} after the broker's return; \
         stream: {} × 202 before the outage, {accepted_while_stopping} × 202 while it began, \
         {} × 503 (of which {refused_landed} landed anyway), {} × 202 after the return",
        accepted_before,
        stats.refused.len(),
        stats.accepted.len() - accepted_at_return,
    );
    println!("accepted = {accepted}, stored = {stored}");
    assert_eq!(stored, accepted);
}

#[tokio::test]
async fn postgres_down_known_users_are_served_first_seen_get_503_and_everything_lands_after() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    // Known to the gateway: provisioned, cached in Redis.
    assert_eq!(
        app.post("/api/vscode/usage/track", &token, &feature("warm"))
            .await
            .status(),
        202
    );
    let mut accepted = 1;
    let _restore = Restore(PG_START);
    sh(PG_STOP);
    for _ in 0..20 {
        let r = app
            .post("/api/vscode/usage/track", &token, &feature("while-down"))
            .await;
        assert_eq!(
            r.status(),
            202,
            "a known user's usage is accepted while Postgres is down"
        );
        accepted += 1;
    }
    let r = app
        .post(
            "/api/vscode/session/validate",
            &token,
            &json!({"extension_version": "1.0.0"}),
        )
        .await;
    assert_eq!(
        r.status(),
        200,
        "sessions of a known user answer while Postgres is down"
    );
    let (_, stranger) = new_user();
    let r = app
        .post("/api/vscode/usage/track", &stranger, &feature("x"))
        .await;
    assert_eq!(r.status(), 503, "a first-seen user needs Postgres");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["code"], "unavailable");
    sh(PG_START);
    app.eventually(Duration::from_secs(60), || async {
        (stored_features(&app, &user).await == accepted).then_some(())
    })
    .await;
    println!(
        "accepted = {accepted}, stored = {}",
        stored_features(&app, &user).await
    );
}

async fn consume(app: &TestApp, user: &str, token: &str, amount: i64) -> (u16, Value) {
    let r = app
        .post(
            &format!("/api/users/{user}/credits/consume"),
            token,
            &json!({"amount": amount}),
        )
        .await;
    let status = r.status().as_u16();
    let retry_after = r.headers().contains_key("retry-after");
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status == 503 {
        assert!(retry_after, "503 without Retry-After");
    }
    (status, body)
}

/// docs/api.md "Outages" (Redis down) and §9.2 (Redis loses its data), on a Redis that
/// really goes away and comes back empty: while it is down, usage is served
/// under `rate_limit.on_redis_error` (postgres) and credits and sessions
/// answer 503; once it is back, the gateway sees the loss, rebuilds balances
/// from the ledger (exactly what is left is spendable, never more) and the
/// limits count again from a fresh window.
#[tokio::test]
async fn redis_killed_and_restarted_empty_usage_goes_on_credits_rebuild_exactly_and_limits_resume()
{
    let mut redis = OwnRedis::start();
    let limit = 40u64;
    let app = spawn_app_with(|v| {
        v.insert("REDIS_URL".into(), redis.url());
        v.insert(
            "APP__RATE_LIMIT__CLASSES__USAGE__LIMIT".into(),
            limit.to_string(),
        );
        // A long window: no refill worth a request while the test runs, so
        // "exactly `limit` pass" is exact.
        v.insert(
            "APP__RATE_LIMIT__CLASSES__USAGE__WINDOW_SECS".into(),
            "3600".into(),
        );
        v.insert("APP__REDIS__TIMEOUT_MS".into(), "500".into());
        v.insert("APP__AMQP__CONFIRM_TIMEOUT_MS".into(), "2000".into());
        v.insert("APP__CREDITS__RECOVERY_GRACE_MS".into(), "500".into());
    })
    .await;
    app.start_worker().await;
    let (user, token) = new_user();
    let mut accepted: Vec<Value> = Vec::new();
    let track = |name: &'static str| {
        let event = feature(name);
        let (app, token) = (&app, &token);
        async move {
            let r = app.post("/api/vscode/usage/track", token, &event).await;
            (r, event["event_id"].clone())
        }
    };
    for _ in 0..5 {
        let (r, id) = track("before").await;
        assert_eq!(r.status(), 202);
        accepted.push(id);
    }
    assert_eq!(consume(&app, &user, &token, 30).await.0, 200);

    redis.kill();
    // Usage goes on under the postgres policy, and says so.
    for _ in 0..5 {
        let (r, id) = track("while-down").await;
        assert_eq!(r.status(), 202, "usage keeps working without Redis");
        assert_eq!(
            r.headers()
                .get("ratelimit-degraded")
                .and_then(|v| v.to_str().ok()),
            Some("postgres")
        );
        accepted.push(id);
    }
    let (s, body) = consume(&app, &user, &token, 1).await;
    assert_eq!(s, 503, "credit decisions need Redis: {body}");
    assert_eq!(body["code"], "unavailable");
    let r = app
        .post(
            "/api/vscode/session/validate",
            &token,
            &json!({"extension_version": "1.0.0"}),
        )
        .await;
    assert_eq!(r.status(), 503, "sessions need Redis");
    // Balance reads come from Postgres meanwhile.
    let balance = app
        .eventually(Duration::from_secs(30), || async {
            let r = app.get("/api/vscode/user/balance", &token).await;
            let b: Value = r.json().await.ok()?;
            (b["balance"] == 70).then_some(b)
        })
        .await;
    assert_eq!(balance["balance"], 70);

    redis.start_again();
    // The gateway finds Redis again, sees that its data is gone, and rebuilds
    // the balance from the ledger: exactly the 70 left, not a credit more.
    let restarted = Instant::now();
    let (s, body) = app
        .eventually(Duration::from_secs(60), || async {
            let (s, body) = consume(&app, &user, &token, 70).await;
            (s != 503).then_some((s, body))
        })
        .await;
    println!(
        "credit writes resumed {:?} after Redis came back",
        restarted.elapsed()
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["balance"], 0);
    assert_eq!(consume(&app, &user, &token, 1).await.0, 402);

    // Limits count again, from a fresh window (the old one was in Redis):
    // exactly `limit` pass, then 429, and no longer degraded.
    let mut passed = 0;
    let refused = loop {
        let (r, id) = track("after").await;
        assert!(r.headers().get("ratelimit-degraded").is_none());
        match r.status().as_u16() {
            202 => {
                passed += 1;
                accepted.push(id);
            }
            429 => break r,
            other => panic!("unexpected {other}"),
        }
        assert!(passed <= limit, "more than the limit passed");
    };
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(passed, limit);

    let n = accepted.len() as i64;
    app.eventually(Duration::from_secs(30), || async {
        (stored_features(&app, &user).await == n).then_some(())
    })
    .await;
    println!(
        "accepted = {n}, stored = {}; overspend = 0 (balance 100 − 30 − 70 = 0, then 402)",
        stored_features(&app, &user).await
    );
}

/// The ledger's consume rows of a user and its settled balance.
async fn books(app: &TestApp, user: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "select (select count(*) from credit_transactions t where t.user_id = u.id and t.kind = 'consume'), \
                (select coalesce(sum(amount), 0)::int8 from credit_transactions t where t.user_id = u.id), \
                u.credits_balance \
         from users u where u.id = $1",
    )
    .bind(user)
    .fetch_one(&app.pg)
    .await
    .unwrap_or((-1, -1, -1))
}

async fn api_balance(app: &TestApp, token: &str) -> i64 {
    let b: Value = app
        .get("/api/vscode/user/balance", token)
        .await
        .json()
        .await
        .unwrap();
    b["balance"].as_i64().unwrap()
}

/// docs/credits.md: consumes answered while Postgres is down for longer than the
/// stale-reservation window are held unacked by the worker; the reconciler
/// must not give those reservations back (the worker commits them once
/// Postgres returns), or the user could spend the same credits twice. After
/// Postgres is back, the worker is kept from committing (the user's row is
/// locked) while the reconciler runs, so the reconciler meets exactly the
/// reservations that are old, not in the ledger, and still held.
#[tokio::test]
async fn consumes_answered_while_postgres_is_down_past_the_stale_window_are_never_given_back() {
    let app = spawn_app_with(|v| {
        v.insert("APP__CREDITS__STALE_RESERVATION_SECS".into(), "1".into());
        v.insert("APP__AMQP__CONFIRM_TIMEOUT_MS".into(), "2000".into());
        v.insert("APP__WORKER__RECONCILE_INTERVAL_SECS".into(), "1".into());
    })
    .await;
    app.start_worker().await;
    let (user, token) = new_user();
    assert_eq!(consume(&app, &user, &token, 1).await.0, 200);
    app.eventually(Duration::from_secs(20), || async {
        (books(&app, &user).await.0 == 1).then_some(())
    })
    .await;

    let _restore = Restore(PG_START);
    sh(PG_STOP);
    let mut answered = 1;
    for _ in 0..10 {
        let (status, body) = consume(&app, &user, &token, 3).await;
        assert_eq!(
            status, 200,
            "a known user's consume is decided in Redis: {body}"
        );
        answered += 1;
    }
    // Past the stale window (confirm timeout 2 s + 1 s) several times over,
    // with every one of those events unacked in the worker's batch.
    tokio::time::sleep(Duration::from_secs(6)).await;
    sh(PG_START);

    // Hold the worker's commit back: its settle locks the user's row first.
    let mut lock = app
        .eventually(Duration::from_secs(20), || async {
            let mut tx = app.pg.begin().await.ok()?;
            sqlx::query("select id from users where id = $1 for update")
                .bind(&user)
                .execute(&mut *tx)
                .await
                .ok()?;
            Some(tx)
        })
        .await;
    let rows_while_held: i64 = sqlx::query_scalar(
        "select count(*) from credit_transactions where user_id = $1 and kind = 'consume'",
    )
    .bind(&user)
    .fetch_one(&mut *lock)
    .await
    .unwrap();
    let ctx = worker::startup::Ctx::new(app.settings.clone()).unwrap();
    let summary = tokio::time::timeout(
        Duration::from_secs(20),
        worker::reconcile::reconcile_all(&ctx),
    )
    .await
    .expect("the reconciler does not wait on the held row")
    .unwrap();
    let during = api_balance(&app, &token).await;
    println!(
        "while the worker held {} consumes: reconciler saw {} users, repaired {:?}; API balance {during}",
        answered - rows_while_held,
        summary.users,
        summary.repairs
    );
    assert_eq!(
        during,
        100 - 1 - 30,
        "no reservation held by the worker was given back"
    );
    lock.commit().await.unwrap();

    app.eventually(Duration::from_secs(60), || async {
        (books(&app, &user).await.0 == answered).then_some(())
    })
    .await;
    let after = worker::reconcile::reconcile_all(&ctx).await.unwrap();
    let (rows, ledger, balance) = books(&app, &user).await;
    let api = api_balance(&app, &token).await;
    println!("answered = {answered}, ledger rows = {rows}, ledger = {ledger}, users = {balance}, API = {api}");
    assert_eq!(rows, answered, "every answered consume is one ledger row");
    assert_eq!((ledger, balance, api), (69, 69, 69));
    assert!(
        after.repairs.is_empty(),
        "nothing to repair: {:?}",
        after.repairs
    );
}
