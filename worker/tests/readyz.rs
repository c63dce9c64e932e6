//! The worker's `GET /readyz` (deploy/kubernetes' readiness probe): 200 when
//! Postgres and RabbitMQ answer, 503 naming the one that does not. The worker
//! starts with either dependency down (lazy pool, consumers that retry), so
//! the 503 cases run a real worker pointed at a port nothing listens on.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// A port that nothing listens on (bound once, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a worker (all queues) with the stack's settings plus `extra`, asks its
/// `/readyz` once it listens, stops it, and returns the status and body.
async fn readyz_with(extra: &[(&str, &str)]) -> (u16, Value) {
    let mut vars = vec![("WORKER_LISTEN", "127.0.0.1:0")];
    vars.extend_from_slice(extra);
    let stack = testkit::Stack::new(&vars).await;
    let stop = CancellationToken::new();
    let worker = worker::startup::Worker::build(stack.settings.clone(), stop.clone())
        .await
        .expect("worker builds");
    let url = format!("http://{}/readyz", worker.local_addr());
    let running = tokio::spawn(worker.run_until_stopped());
    let client = reqwest::Client::new();
    // The listener is bound before build returns, so the first request is served;
    // the bound on it is the checks' own (2 s each) plus slack.
    let answer = tokio::time::timeout(Duration::from_secs(10), client.get(&url).send())
        .await
        .expect("/readyz answers within its checks' bound")
        .expect("/readyz request");
    let status = answer.status().as_u16();
    let body: Value = answer.json().await.expect("json body");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("worker stops")
        .expect("worker task")
        .expect("worker run");
    (status, body)
}

#[tokio::test]
async fn ready_when_postgres_and_rabbitmq_answer() {
    let (status, body) = readyz_with(&[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"status": "ready", "dependencies": {"postgres": "up", "rabbitmq": "up"}})
    );
}

#[tokio::test]
async fn unavailable_naming_rabbitmq_when_the_broker_does_not_answer() {
    let amqp = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    let (status, body) = readyz_with(&[("AMQP_URL", &amqp)]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        json!({"status": "unavailable", "dependencies": {"postgres": "up", "rabbitmq": "down"}})
    );
}

#[tokio::test]
async fn unavailable_naming_postgres_when_the_database_does_not_answer() {
    let db = format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port());
    let (status, body) = readyz_with(&[("DATABASE_URL", &db)]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        json!({"status": "unavailable", "dependencies": {"postgres": "down", "rabbitmq": "up"}})
    );
}
