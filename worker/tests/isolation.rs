//! One user's input never costs another user's data, or anyone's money
//! (docs/events.md, §9.2): grouped messages with unstorable or refused members land
//! the rest in the same pass and dead-letter only those members, each as a
//! message of its own; and the reconciler never gives back a reservation
//! whose event a worker still holds.
//!
//! Events are built as JSON, the way they arrive from the gateway, and
//! published straight to the exchange.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::events::Envelope;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::consumer::{Outcome, QueueConsumer};
use worker::ctx::Ctx;
use worker::dlq::{DeadLetter, Dlq, Selection};

struct Env {
    ctx: Ctx,
    stack: testkit::Stack,
}

async fn env() -> Env {
    let stack = testkit::Stack::new(&[
        ("APP__WORKER__BATCH_WAIT_MS", "300"),
        ("APP__WORKER__BATCH_IDLE_MS", "300"),
    ])
    .await;
    Env {
        ctx: Ctx::new(stack.settings.clone()).unwrap(),
        stack,
    }
}

impl Env {
    /// Publishes envelopes (as JSON values) with confirms, declaring the
    /// topology first.
    async fn publish(&self, envs: &[Value]) {
        let conn = common::amqp::connect::connect(&self.stack.settings.amqp.url)
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        self.ctx.topology.declare(&ch).await.unwrap();
        for e in envs {
            ch.basic_publish(
                &self.ctx.topology.exchange(),
                e["type"].as_str().unwrap(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(e).unwrap(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(e["id"].as_str().unwrap().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        let _ = conn.close(200, "done").await;
    }

    async fn add_user(&self, id: &str, balance: i64) {
        sqlx::query("insert into users (id, credits_balance) values ($1, 0)")
            .bind(id)
            .execute(&self.ctx.pg)
            .await
            .unwrap();
        sqlx::query("select * from grant_credits($1, $2, $3)")
            .bind(Uuid::new_v4())
            .bind(id)
            .bind(balance)
            .execute(&self.ctx.pg)
            .await
            .unwrap();
    }

    async fn balance(&self, user: &str) -> i64 {
        sqlx::query_scalar("select credits_balance from users where id = $1")
            .bind(user)
            .fetch_one(&self.ctx.pg)
            .await
            .unwrap()
    }

    async fn ids(&self, table: &str) -> Vec<Uuid> {
        sqlx::query_scalar(&format!("select id from {table} order by id"))
            .fetch_all(&self.ctx.pg)
            .await
            .unwrap()
    }

    /// The consume rows of a user: (amount, description, model, metadata).
    async fn consumes(
        &self,
        user: &str,
    ) -> Vec<(i64, Option<String>, Option<String>, Option<Value>)> {
        sqlx::query_as(
            "select amount, description, model, metadata from credit_transactions \
             where user_id = $1 and kind = 'consume' order by created_at",
        )
        .bind(user)
        .fetch_all(&self.ctx.pg)
        .await
        .unwrap()
    }

    /// Every dead letter, in full.
    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let dlq = Dlq::connect(&self.stack.settings).await.unwrap();
        let mut out = Vec::new();
        for d in dlq.list(100).await.unwrap() {
            out.push(dlq.show(&d.id).await.unwrap().expect("listed, so shown"));
        }
        dlq.close().await;
        out
    }
}

/// One `next_batch` + `process` step of a consumer of `queue`.
async fn step(c: &mut QueueConsumer) -> Outcome {
    let stop = CancellationToken::new();
    let batch = tokio::time::timeout(Duration::from_secs(10), c.next_batch(&stop))
        .await
        .expect("a batch")
        .expect("the stream is open");
    c.process(batch, &stop).await.unwrap()
}

fn envelope(kind: &str, data: Value) -> Value {
    let now = Utc::now();
    json!({
        "id": Uuid::new_v4(),
        "type": kind,
        "version": 1,
        "occurred_at": now,
        "received_at": now,
        "data": data,
    })
}

fn model_event(user: &str, model: &str) -> Value {
    json!({
        "id": Uuid::new_v4(),
        "user_id": user,
        "session_id": "s1",
        "occurred_at": Utc::now(),
        "received_at": Utc::now(),
        "kind": "model",
        "provider": "openai",
        "model": model,
        "prompt_tokens": 10,
        "completion_tokens": 5,
    })
}

fn feature_event(user: &str, metadata: Value) -> Value {
    json!({
        "id": Uuid::new_v4(),
        "user_id": user,
        "occurred_at": Utc::now(),
        "received_at": Utc::now(),
        "kind": "feature",
        "feature": "chat",
        "metadata": metadata,
    })
}

fn consume(user: &str, amount: i64, context: Value) -> Value {
    let mut c = json!({
        "id": Uuid::new_v4(),
        "occurred_at": Utc::now(),
        "transaction_id": Uuid::new_v4(),
        "user_id": user,
        "amount": amount,
    });
    c.as_object_mut()
        .unwrap()
        .extend(context.as_object().unwrap().clone());
    c
}

fn id_of(v: &Value) -> Uuid {
    v["id"].as_str().unwrap().parse().unwrap()
}

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

/// What a dead letter holds: its envelope, which must be a group of one.
fn single_member(d: &DeadLetter) -> Envelope {
    let env = Envelope::from_bytes(d.body.as_bytes()).expect("a dead letter is an envelope");
    assert_eq!(
        env.id.to_string(),
        d.id,
        "the message id is the member's id"
    );
    env
}

#[tokio::test]
async fn unstorable_members_are_dead_lettered_alone_and_every_consume_is_charged_without_them() {
    let env = env().await;
    for u in ["ann", "ben", "cid"] {
        env.add_user(u, 100).await;
    }
    let good_model = model_event("ann", "gpt-4o");
    let nul_model = model_event("ben", "gpt\u{0}4o");
    let good_feature = feature_event("ben", json!({"k": "fine\nline"}));
    let nul_metadata = feature_event("cid", json!({"k": "\u{0}"}));
    let usage = envelope(
        "usage.batch",
        json!({"events": [good_model, nul_model, good_feature, nul_metadata]}),
    );
    let consumes = envelope(
        "credit.consume_batch",
        json!({"consumes": [
            consume("ann", 10, json!({"model": "gpt-4o"})),
            consume("ben", 20, json!({"model": "gpt-4o", "description": "a\u{0}b"})),
            consume("cid", 30, json!({"model": "gpt-4o", "metadata": {"\u{0}k": 1}})),
        ]}),
    );
    env.publish(&[usage.clone(), consumes]).await;

    let mut u = QueueConsumer::connect(env.ctx.clone(), "usage", CancellationToken::new())
        .await
        .unwrap();
    let out = step(&mut u).await;
    assert_eq!(
        (out.delivered, out.stored, out.dead_lettered),
        (1, 2, 2),
        "{out:?}"
    );
    assert_eq!(env.ids("model_usage").await, vec![id_of(&good_model)]);
    assert_eq!(env.ids("feature_usage").await, vec![id_of(&good_feature)]);

    let mut c = QueueConsumer::connect(env.ctx.clone(), "credits", CancellationToken::new())
        .await
        .unwrap();
    let out = step(&mut c).await;
    assert_eq!(
        (out.delivered, out.stored, out.dead_lettered),
        (1, 3, 0),
        "{out:?}"
    );
    for (user, amount) in [("ann", 10), ("ben", 20), ("cid", 30)] {
        assert_eq!(env.balance(user).await, 100 - amount, "{user} is charged");
        assert_eq!(env.consumes(user).await.len(), 1, "{user}: one ledger row");
    }
    assert_eq!(
        env.consumes("ann").await[0],
        (-10, None, Some("gpt-4o".into()), None),
        "nothing dropped, nothing noted"
    );
    assert_eq!(
        env.consumes("ben").await[0],
        (
            -20,
            None,
            Some("gpt-4o".into()),
            Some(json!({"dropped_fields": ["description"]}))
        )
    );
    assert_eq!(
        env.consumes("cid").await[0],
        (
            -30,
            None,
            Some("gpt-4o".into()),
            Some(json!({"dropped_fields": ["metadata"]}))
        )
    );

    // Each bad event is a dead letter of its own, with its reason.
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let mut ids = Vec::new();
    for d in &dead {
        let member = single_member(d);
        let common::events::Event::UsageBatch(b) = &member.event else {
            panic!("a usage batch: {d:?}")
        };
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.events[0].id, member.id);
        assert_eq!(d.routing_key, "usage.batch");
        assert_eq!(d.queue, env.ctx.topology.queue("usage"));
        assert_eq!(d.from, Some(usage["id"].as_str().unwrap().to_string()));
        assert!(d.reason.starts_with("invalid:"), "{d:?}");
        ids.push(member.id);
    }
    assert_eq!(
        sorted(ids),
        sorted(vec![id_of(&nul_model), id_of(&nul_metadata)])
    );
    let reason_of = |id: Uuid| {
        dead.iter()
            .find(|d| d.id == id.to_string())
            .unwrap()
            .reason
            .clone()
    };
    assert!(reason_of(id_of(&nul_model)).contains("model"));
    assert!(reason_of(id_of(&nul_metadata)).contains("metadata"));
    // The operator's command lists them with their reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["dlq", "list"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &env.stack.settings.database.url)
        .env("JWT_SECRET", "x")
        .env("APP__AMQP__NAMESPACE", &env.stack.settings.amqp.namespace)
        .env(
            "APP__REDIS__KEY_PREFIX",
            &env.stack.settings.redis.key_prefix,
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("2 dead letter(s)"), "{text}");
    for id in [id_of(&nul_model), id_of(&nul_metadata)] {
        let line = text
            .lines()
            .find(|l| l.contains(&id.to_string()))
            .unwrap_or_else(|| panic!("{id} listed: {text}"));
        assert!(
            line.contains("usage.batch") && line.contains("invalid:"),
            "{line}"
        );
    }
}

#[tokio::test]
async fn a_member_postgres_refuses_is_dead_lettered_alone_and_replays_once_its_cause_is_fixed() {
    let env = env().await;
    for u in ["ann", "ben", "cid"] {
        env.add_user(u, 100).await;
    }
    // Passes every check, but no partition holds the year 2001.
    let mut ancient = model_event("ben", "gpt");
    ancient["occurred_at"] = json!("2001-01-01T00:00:00Z");
    let usage_a = envelope(
        "usage.batch",
        json!({"events": [model_event("ann", "gpt"), ancient, model_event("cid", "gpt")]}),
    );
    let usage_b = envelope(
        "usage.batch",
        json!({"events": [model_event("ann", "gpt")]}),
    );
    // A consume of a user Postgres does not know (yet), between two it knows.
    let ghost = consume("ghost", 5, json!({"description": "for the ghost"}));
    let consumes = envelope(
        "credit.consume_batch",
        json!({"consumes": [
            consume("ann", 10, json!({})),
            ghost.clone(),
            consume("ben", 7, json!({"description": "ok"})),
        ]}),
    );
    env.publish(&[usage_a, usage_b, consumes]).await;

    let mut u = QueueConsumer::connect(env.ctx.clone(), "usage", CancellationToken::new())
        .await
        .unwrap();
    let out = step(&mut u).await;
    assert_eq!(
        (out.delivered, out.stored, out.dead_lettered),
        (2, 3, 1),
        "both messages in one pass, only the refused event left out: {out:?}"
    );
    assert_eq!(env.ids("model_usage").await.len(), 3);

    let mut c = QueueConsumer::connect(env.ctx.clone(), "credits", CancellationToken::new())
        .await
        .unwrap();
    let out = step(&mut c).await;
    assert_eq!(
        (out.delivered, out.stored, out.dead_lettered),
        (1, 2, 1),
        "{out:?}"
    );
    assert_eq!(env.balance("ann").await, 90);
    assert_eq!(env.balance("ben").await, 93);
    assert_eq!(
        env.consumes("ben").await[0].1.as_deref(),
        Some("ok"),
        "a member that was not refused keeps its text"
    );

    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for d in &dead {
        assert!(d.reason.starts_with("refused by Postgres"), "{d:?}");
        single_member(d);
    }
    let ghost_id = id_of(&ghost).to_string();
    let g = dead
        .iter()
        .find(|d| d.id == ghost_id)
        .expect("the ghost's consume");
    assert_eq!(g.routing_key, "credit.consume_batch");
    assert_eq!(g.queue, env.ctx.topology.queue("credits"));
    // The dead letter is the consume as it was, not the retry without text.
    assert!(g.body.contains("for the ghost"), "{g:?}");

    // The cause fixed, the member replays and lands once, with its text.
    env.add_user("ghost", 50).await;
    let dlq = Dlq::connect(&env.stack.settings).await.unwrap();
    let done = dlq
        .replay(&Selection::Ids(vec![ghost_id.clone()]))
        .await
        .unwrap();
    dlq.close().await;
    assert_eq!(done.len(), 1);
    let out = step(&mut c).await;
    assert_eq!((out.stored, out.dead_lettered), (1, 0), "{out:?}");
    assert_eq!(env.balance("ghost").await, 45);
    assert_eq!(
        env.consumes("ghost").await[0].1.as_deref(),
        Some("for the ghost")
    );
    assert_eq!(
        env.dead_letters().await.len(),
        1,
        "only the 2001 event is left"
    );
}

/// Writes a credits consumer heartbeat through the consumers' own script
/// every 100 ms: `unacked` deliveries held, idle for a minute.
fn fake_consumer(ctx: &Ctx, unacked: Arc<AtomicI64>, stop: CancellationToken) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let key = ctx.keys.credit_consumers();
        while !stop.is_cancelled() {
            let mut conn = ctx.redis.get().await.unwrap();
            let _: i64 = common::redis::scripts::scripts()
                .heartbeat
                .key(&key)
                .arg("fake-consumer")
                .arg(unacked.load(Ordering::SeqCst))
                .arg(60_000)
                .arg("0")
                .invoke_async(&mut *conn)
                .await
                .unwrap();
            drop(conn);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[tokio::test]
async fn the_reconciler_keeps_a_stale_reservation_while_a_live_consumer_holds_deliveries() {
    let env = env().await;
    let ctx = &env.ctx;
    env.add_user("payer", 100).await;
    // The credits queue exists and is empty (the reconciler asks its depth).
    env.publish(&[]).await;
    // Redis: 5 reserved long ago for an event with no ledger row.
    let tx = Uuid::new_v4().to_string();
    let mut redis = ctx.redis.get().await.unwrap();
    let _: () = redis::pipe()
        .set(ctx.keys.slot_sentinel("payer"), "test")
        .ignore()
        .hset_multiple(ctx.keys.credits("payer"), &[("bal", "95"), ("held", "0")])
        .ignore()
        .hset(ctx.keys.pending("payer"), &tx, "5:1")
        .ignore()
        .query_async(&mut *redis)
        .await
        .unwrap();
    let pending = |mut c: common::redis::PoolConn| {
        let key = ctx.keys.pending("payer");
        async move {
            let n: i64 = redis::cmd("HLEN")
                .arg(key)
                .query_async(&mut *c)
                .await
                .unwrap();
            n
        }
    };

    // A worker holds its batch unacked (Postgres was down): the queue shows
    // nothing ready, but the event may be among what it holds.
    let unacked = Arc::new(AtomicI64::new(3));
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    fake_consumer(ctx, unacked.clone(), stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        worker::reconcile::reconcile_user(ctx, "payer")
            .await
            .unwrap(),
        None
    );
    assert_eq!(pending(ctx.redis.get().await.unwrap()).await, 1, "kept");

    // It has settled everything: the reservation is given back.
    unacked.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        worker::reconcile::reconcile_user(ctx, "payer")
            .await
            .unwrap(),
        None
    );
    assert_eq!(pending(ctx.redis.get().await.unwrap()).await, 0, "released");
    let bal: String = redis::cmd("HGET")
        .arg(ctx.keys.credits("payer"))
        .arg("bal")
        .query_async(&mut *redis)
        .await
        .unwrap();
    assert_eq!(bal, "100");
}
