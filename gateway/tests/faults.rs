//! Outage tests: they stop shared services (RabbitMQ, Postgres), so `.ci/run`
//! runs this binary on its own, one test at a time, after the main suite.
//! Each test prints what was accepted and what landed.

#[path = "api/helpers.rs"]
mod helpers;

use std::process::Command;
use std::time::{Duration, Instant};

use helpers::*;
use serde_json::{json, Value};

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

#[tokio::test]
async fn rabbitmq_down_writes_503_reads_answer_and_the_same_gateway_recovers() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let mut accepted = 0;
    for _ in 0..5 {
        assert_eq!(
            app.post("/api/vscode/usage/track", &token, &feature("before"))
                .await
                .status(),
            202
        );
        accepted += 1;
    }
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

    sh(RABBIT_START);
    let back = Instant::now();
    loop {
        let r = app
            .post("/api/vscode/usage/track", &token, &feature("after"))
            .await;
        if r.status() == 202 {
            accepted += 1;
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "gateway did not recover within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "gateway accepted again {:?} after the broker's return",
        back.elapsed()
    );
    app.eventually(Duration::from_secs(30), || async {
        (stored_features(&app, &user).await == accepted).then_some(())
    })
    .await;
    println!(
        "accepted = {accepted}, stored = {}",
        stored_features(&app, &user).await
    );
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
