//! The real `worker` binary under signals: SIGTERM finishes the batch, acks and
//! exits 0; `kill -9` mid-stream loses nothing and doubles nothing.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use common::events::{Envelope, Event, UsageBatch, UsageDetail, UsageEvent};
use common::settings::Settings;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;

struct Env {
    vars: HashMap<String, String>,
    settings: Settings,
    pg: sqlx::PgPool,
    _stack: testkit::Stack,
}

async fn env() -> Env {
    let stack = testkit::Stack::new(&[
        ("WORKER_LISTEN", "127.0.0.1:0"),
        ("APP__WORKER__BATCH_SIZE", "50"),
        ("APP__WORKER__PREFETCH", "100"),
        ("RUST_LOG", "warn"),
    ])
    .await;
    let pg = stack.db.pool(5).await;
    sqlx::query("insert into users (id) values ('u')")
        .execute(&pg)
        .await
        .unwrap();
    Env {
        vars: stack.vars.clone(),
        settings: stack.settings.clone(),
        pg,
        _stack: stack,
    }
}

impl Env {
    fn spawn_worker(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .arg("run")
            .arg("--queues")
            .arg("usage")
            .env_clear()
            .envs(&self.vars)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("worker binary")
    }

    /// Publishes `messages` usage batches of `per` events each; returns the event count.
    async fn publish(&self, messages: usize, per: usize) -> i64 {
        let conn = common::amqp::connect::connect(&self.settings.amqp.url)
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let topo = common::amqp::topology::Topology::new(&self.settings.amqp.namespace, 20);
        topo.declare(&ch).await.unwrap();
        let mut confirms = Vec::new();
        for _ in 0..messages {
            let now = Utc::now();
            let events = (0..per)
                .map(|_| UsageEvent {
                    id: uuid::Uuid::new_v4(),
                    user_id: "u".into(),
                    session_id: None,
                    occurred_at: now,
                    received_at: now,
                    metadata: None,
                    detail: UsageDetail::Feature {
                        feature: "chat".into(),
                        action: None,
                        duration_ms: None,
                    },
                    credits: None,
                })
                .collect();
            let env = Envelope::new(Event::UsageBatch(UsageBatch { events }), None, now);
            confirms.push(
                ch.basic_publish(
                    &topo.exchange(),
                    "usage.batch",
                    BasicPublishOptions::default(),
                    &env.to_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            c.await.unwrap();
        }
        let _ = conn.close(200, "done").await;
        (messages * per) as i64
    }

    async fn stored(&self) -> i64 {
        sqlx::query_scalar("select count(*) from feature_usage")
            .fetch_one(&self.pg)
            .await
            .unwrap()
    }

    async fn wait_for(&self, at_least: i64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.stored().await < at_least {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {at_least} stored",
                self.stored().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(sig)
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

async fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_finishes_the_batch_acks_and_exits_zero_and_nothing_is_lost() {
    let env = env().await;
    let total = env.publish(400, 10).await;
    let child = env.spawn_worker();
    env.wait_for(200, Duration::from_secs(30)).await;
    signal(&child, "-TERM");
    let status = wait_exit(child).await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    let after_stop = env.stored().await;
    // A second worker drains the rest; every event exactly once.
    let child = env.spawn_worker();
    env.wait_for(total, Duration::from_secs(60)).await;
    signal(&child, "-TERM");
    assert_eq!(wait_exit(child).await.code(), Some(0));
    let stored = env.stored().await;
    println!("accepted = {total}, stored after first SIGTERM = {after_stop}, stored = {stored}");
    assert_eq!(stored, total);
    let distinct: i64 = sqlx::query_scalar("select count(distinct id) from feature_usage")
        .fetch_one(&env.pg)
        .await
        .unwrap();
    assert_eq!(distinct, total);
}

#[tokio::test]
async fn a_worker_killed_with_sigkill_mid_stream_loses_nothing_and_doubles_nothing() {
    let env = env().await;
    let total = env.publish(400, 10).await;
    let child = env.spawn_worker();
    env.wait_for(500, Duration::from_secs(30)).await;
    signal(&child, "-KILL");
    let _ = wait_exit(child).await;
    let at_kill = env.stored().await;
    let child = env.spawn_worker();
    env.wait_for(total, Duration::from_secs(60)).await;
    signal(&child, "-TERM");
    assert_eq!(wait_exit(child).await.code(), Some(0));
    let stored = env.stored().await;
    println!("accepted = {total}, stored at kill = {at_kill}, stored = {stored}");
    assert_eq!(stored, total);
    let guard: i64 = sqlx::query_scalar("select count(*) from usage_event_ids")
        .fetch_one(&env.pg)
        .await
        .unwrap();
    assert_eq!(guard, total);
    let rollup: i64 =
        sqlx::query_scalar("select coalesce(sum(requests), 0)::int8 from usage_daily")
            .fetch_one(&env.pg)
            .await
            .unwrap();
    assert_eq!(rollup, total, "the rollup counts each event once");
}

/// `GET path` on a local port with a plain HTTP/1.1 request; the body, or
/// None while nothing answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// docs/api.md "Operations": every series exists from start, so a fresh worker that has
/// consumed nothing already names each one (at 0) on its `/metrics`.
#[tokio::test]
async fn a_fresh_workers_metrics_name_every_series_at_zero() {
    let env = env().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("run")
        .arg("--queues")
        .arg("usage")
        .env_clear()
        .envs(&env.vars)
        .env("WORKER_LISTEN", format!("127.0.0.1:{port}"))
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("worker binary");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Some(t) = http_get(port, "/metrics") {
            break t;
        }
        assert!(tokio::time::Instant::now() < deadline, "no /metrics");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    signal(&child, "-TERM");
    let _ = child.wait();
    for name in worker::metrics::SERIES {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    let queue = format!("{}.usage", env.settings.amqp.namespace);
    assert!(
        text.contains(&format!(
            "worker_events_stored_total{{queue=\"{queue}\"}} 0"
        )),
        "{text}"
    );
}
