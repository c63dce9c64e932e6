//! The worker driven step by step against the real broker and database:
//! crash between commit and ack, poison messages, refused data.

use std::time::Duration;

use chrono::Utc;
use common::events::{
    BatchedConsume, CreditConsume, CreditConsumeBatch, CreditContext, Envelope, Event, UsageBatch,
    UsageDetail, UsageEvent,
};
use common::settings::Settings;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use worker::consumer::QueueConsumer;
use worker::ctx::Ctx;

struct Env {
    ctx: Ctx,
    settings: Settings,
    _stack: testkit::Stack,
}

async fn env() -> Env {
    let stack = testkit::Stack::new(&[
        ("APP__WORKER__BATCH_WAIT_MS", "200"),
        ("APP__WORKER__BATCH_IDLE_MS", "200"),
    ])
    .await;
    let settings = stack.settings.clone();
    Env {
        ctx: Ctx::new(settings.clone()).unwrap(),
        settings,
        _stack: stack,
    }
}

impl Env {
    async fn publish_raw(&self, routing_key: &str, bodies: &[Vec<u8>]) {
        let conn = common::amqp::connect::connect(&self.settings.amqp.url)
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        self.ctx.topology.declare(&ch).await.unwrap();
        for b in bodies {
            ch.basic_publish(
                &self.ctx.topology.exchange(),
                routing_key,
                BasicPublishOptions::default(),
                b,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        let _ = conn.close(200, "done").await;
    }

    async fn publish(&self, envs: &[Envelope]) {
        for e in envs {
            self.publish_raw(e.event.routing_key(), &[e.to_bytes()])
                .await;
        }
    }

    async fn add_user(&self, id: &str, balance: i64) {
        sqlx::query("insert into users (id, credits_balance) values ($1, 0)")
            .bind(id)
            .execute(&self.ctx.pg)
            .await
            .unwrap();
        if balance > 0 {
            sqlx::query("select * from grant_credits($1, $2, $3)")
                .bind(uuid::Uuid::new_v4())
                .bind(id)
                .bind(balance)
                .execute(&self.ctx.pg)
                .await
                .unwrap();
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.ctx.pg)
            .await
            .unwrap()
    }

    async fn queue_depth(&self, queue: &str) -> u32 {
        let conn = common::amqp::connect::connect(&self.settings.amqp.url)
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = conn.close(200, "done").await;
        q.message_count()
    }
}

fn usage_batch(user: &str, n: usize) -> Envelope {
    let now = Utc::now();
    let events = (0..n)
        .map(|i| UsageEvent {
            id: uuid::Uuid::new_v4(),
            user_id: user.into(),
            session_id: Some("s1".into()),
            occurred_at: now,
            received_at: now,
            metadata: None,
            detail: UsageDetail::Model {
                provider: "openai".into(),
                model: "gpt".into(),
                prompt_tokens: i as i64,
                completion_tokens: 1,
                latency_ms: None,
                success: Some(true),
            },
            credits: None,
        })
        .collect();
    Envelope::new(Event::UsageBatch(UsageBatch { events }), None, now)
}

#[tokio::test]
async fn a_worker_killed_between_commit_and_ack_loses_nothing_and_duplicates_nothing() {
    let env = env().await;
    env.add_user("u1", 0).await;
    let msgs: Vec<Envelope> = (0..10).map(|_| usage_batch("u1", 25)).collect();
    env.publish(&msgs).await;
    let stop = CancellationToken::new();

    // First worker: takes a batch, commits it, and "dies" before acking.
    let mut first = QueueConsumer::connect(env.ctx.clone(), "usage", CancellationToken::new())
        .await
        .unwrap();
    let batch = first.next_batch(&stop).await.unwrap();
    let decoded: Vec<Envelope> = batch
        .iter()
        .map(|d| Envelope::from_bytes(&d.data).unwrap())
        .collect();
    let refs: Vec<&Envelope> = decoded.iter().collect();
    worker::handlers::apply(&env.ctx, &refs).await.unwrap();
    let committed = env.count("select count(*) from model_usage").await;
    assert!(committed > 0);
    drop(batch);
    drop(first); // connection closed without ack: the broker redelivers

    // Second worker: everything is redelivered; the committed part is not doubled.
    let mut second = QueueConsumer::connect(env.ctx.clone(), "usage", CancellationToken::new())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while env.count("select count(*) from usage_event_ids").await < 250 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all events landed"
        );
        if let Ok(Some(batch)) =
            tokio::time::timeout(Duration::from_secs(2), second.next_batch(&stop)).await
        {
            second.process(batch, &stop).await.unwrap();
        }
    }
    assert_eq!(env.count("select count(*) from model_usage").await, 250);
    assert_eq!(
        env.count("select coalesce(sum(requests), 0)::int8 from usage_daily")
            .await,
        250
    );
    let expected_tokens: i64 = 10 * (0..25).sum::<i64>();
    assert_eq!(
        env.count("select coalesce(sum(prompt_tokens), 0)::int8 from usage_daily")
            .await,
        expected_tokens
    );
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_the_events_behind_it_are_stored() {
    let env = env().await;
    env.add_user("u2", 0).await;
    let good = usage_batch("u2", 5);
    env.publish_raw(
        "usage.batch",
        &[
            b"{ this is not an envelope".to_vec(),
            br#"{"id":"x"}"#.to_vec(),
        ],
    )
    .await;
    env.publish(&[good.clone(), usage_batch("u2", 5)]).await;
    let stop = CancellationToken::new();
    let mut c = QueueConsumer::connect(env.ctx.clone(), "usage", CancellationToken::new())
        .await
        .unwrap();
    let mut dead = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while env.count("select count(*) from model_usage").await < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "good events did not land"
        );
        if let Ok(Some(batch)) =
            tokio::time::timeout(Duration::from_secs(2), c.next_batch(&stop)).await
        {
            dead += c.process(batch, &stop).await.unwrap().dead_lettered;
        }
    }
    assert_eq!(dead, 2);
    let dlq = env.ctx.topology.dead_letter_queue();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while env.queue_depth(&dlq).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead letters missing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.queue_depth(&dlq).await, 2);
    assert_eq!(env.queue_depth(&env.ctx.topology.queue("usage")).await, 0);
}

#[tokio::test]
async fn a_credit_event_postgres_refuses_is_dead_lettered_alone_and_the_rest_settle() {
    let env = env().await;
    env.add_user("payer", 100).await;
    let consume = |user: &str, amount: i64| {
        Envelope::new(
            Event::CreditConsume(CreditConsume {
                transaction_id: uuid::Uuid::new_v4(),
                user_id: user.into(),
                amount,
                context: CreditContext::default(),
            }),
            Some(user.into()),
            Utc::now(),
        )
    };
    // An event for a user Postgres has never seen cannot be settled.
    env.publish(&[
        consume("payer", 10),
        consume("ghost", 5),
        consume("payer", 20),
    ])
    .await;
    let stop = CancellationToken::new();
    let mut c = QueueConsumer::connect(env.ctx.clone(), "credits", CancellationToken::new())
        .await
        .unwrap();
    let mut dead = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while env
        .count("select count(*) from credit_transactions where kind = 'consume'")
        .await
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "settlements missing"
        );
        if let Ok(Some(batch)) =
            tokio::time::timeout(Duration::from_secs(2), c.next_batch(&stop)).await
        {
            dead += c.process(batch, &stop).await.unwrap().dead_lettered;
        }
    }
    assert_eq!(dead, 1);
    assert_eq!(
        env.count("select credits_balance from users where id = 'payer'")
            .await,
        70
    );
    assert_eq!(
        env.count("select sum(amount)::int8 from credit_transactions where user_id = 'payer'")
            .await,
        70
    );
}

/// Consumes of concurrent requests arrive grouped (`credit.consume_batch`):
/// each settles exactly once, in the order given, with an unbroken
/// `balance_after` chain per user, one audit row each, and a redelivered or
/// repeated transaction id changes nothing.
#[tokio::test]
async fn grouped_consumes_settle_once_each_with_an_unbroken_balance_chain() {
    let env = env().await;
    env.add_user("alice", 1_000).await;
    env.add_user("bob", 500).await;
    let item = |user: &str, amount: i64, tx: uuid::Uuid| BatchedConsume {
        id: uuid::Uuid::new_v4(),
        occurred_at: Utc::now(),
        consume: CreditConsume {
            transaction_id: tx,
            user_id: user.into(),
            amount,
            context: CreditContext {
                model: Some("m".into()),
                metadata: Some(serde_json::json!({"n": amount})),
                ..Default::default()
            },
        },
        idempotency: None,
    };
    let repeated = uuid::Uuid::new_v4();
    let batch = |items: Vec<BatchedConsume>| {
        Envelope::new(
            Event::CreditConsumeBatch(CreditConsumeBatch { consumes: items }),
            None,
            Utc::now(),
        )
    };
    let first = batch(vec![
        item("alice", 10, uuid::Uuid::new_v4()),
        item("bob", 7, uuid::Uuid::new_v4()),
        item("alice", 20, repeated),
        item("alice", 20, repeated),
        item("bob", 3, uuid::Uuid::new_v4()),
        item("alice", 30, uuid::Uuid::new_v4()),
    ]);
    // The same message twice (a redelivery) and the repeated id once more.
    let again = first.clone();
    let later = batch(vec![
        item("alice", 20, repeated),
        item("bob", 90, uuid::Uuid::new_v4()),
    ]);
    env.publish(&[first, again, later]).await;
    let stop = CancellationToken::new();
    let mut c = QueueConsumer::connect(env.ctx.clone(), "credits", CancellationToken::new())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut delivered = 0;
    while delivered < 3 {
        assert!(tokio::time::Instant::now() < deadline, "batches missing");
        if let Ok(Some(b)) = tokio::time::timeout(Duration::from_secs(2), c.next_batch(&stop)).await
        {
            let out = c.process(b, &stop).await.unwrap();
            assert_eq!(out.dead_lettered, 0);
            delivered += out.delivered;
        }
    }
    let consumes = "select count(*) from credit_transactions where kind = 'consume'";
    assert_eq!(env.count(consumes).await, 6);
    assert_eq!(
        env.count("select count(*) from audit_log where action = 'credits.consume'")
            .await,
        6
    );
    for (user, balance) in [("alice", 940), ("bob", 400)] {
        let q = format!("select credits_balance from users where id = '{user}'");
        assert_eq!(env.count(&q).await, balance, "{user}'s balance");
        let q =
            format!("select sum(amount)::int8 from credit_transactions where user_id = '{user}'");
        assert_eq!(env.count(&q).await, balance, "{user}'s ledger");
        // Each row's balance_after is the previous one minus its amount, in
        // created_at order, ending at the balance.
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "select amount, balance_after from credit_transactions where user_id = $1 order by created_at",
        )
        .bind(user)
        .fetch_all(&env.ctx.pg)
        .await
        .unwrap();
        let mut running = 0;
        for (amount, after) in &rows {
            running += amount;
            assert_eq!(*after, running, "{user}'s chain: {rows:?}");
        }
        assert_eq!(running, balance);
    }
    let alice: Vec<i64> = sqlx::query_scalar(
        "select -amount from credit_transactions where user_id = 'alice' and kind = 'consume' order by created_at",
    )
    .fetch_all(&env.ctx.pg)
    .await
    .unwrap();
    assert_eq!(alice, vec![10, 20, 30], "settled in the order given");
    // The daily rollup (a statement trigger on the ledger) saw every row.
    assert_eq!(
        env.count("select sum(consumed)::int8 from credit_daily where user_id = 'alice'")
            .await,
        60
    );
    assert_eq!(
        env.count("select sum(consumed)::int8 from credit_daily where user_id = 'bob'")
            .await,
        100
    );
}

fn worker_cli(env: &Env, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &env.settings.database.url)
        .env("JWT_SECRET", "x")
        .env("APP__AMQP__NAMESPACE", &env.settings.amqp.namespace)
        .env("APP__REDIS__KEY_PREFIX", &env.settings.redis.key_prefix)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn a_poison_message_replayed_after_its_cause_is_fixed_lands_once_and_purge_removes_only_what_it_names(
) {
    let env = env().await;
    let tx = uuid::Uuid::new_v4();
    let late = Envelope::new(
        Event::CreditConsume(CreditConsume {
            transaction_id: tx,
            user_id: "late_user".into(),
            amount: 5,
            context: CreditContext::default(),
        }),
        Some("late_user".into()),
        Utc::now(),
    );
    // Dead-lettered: its user does not exist yet. Plus one undecodable message.
    env.publish(std::slice::from_ref(&late)).await;
    env.publish_raw("credit.consume", &[b"garbage".to_vec()])
        .await;
    let stop = CancellationToken::new();
    let mut c = QueueConsumer::connect(env.ctx.clone(), "credits", CancellationToken::new())
        .await
        .unwrap();
    let mut dead = 0;
    while dead < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(10), c.next_batch(&stop))
            .await
            .unwrap()
            .unwrap();
        dead += c.process(batch, &stop).await.unwrap().dead_lettered;
    }
    let dlq = env.ctx.topology.dead_letter_queue();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while env.queue_depth(&dlq).await < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (ok, out) = worker_cli(&env, &["dlq", "list"]);
    assert!(ok, "{out}");
    assert!(out.contains(&late.id.to_string()), "{out}");
    assert!(out.contains("credit.consume"), "{out}");
    assert!(out.contains("2 dead letter(s)"), "{out}");
    assert_eq!(env.queue_depth(&dlq).await, 2, "list removes nothing");
    let (ok, out) = worker_cli(&env, &["dlq", "show", &late.id.to_string()]);
    assert!(ok, "{out}");
    assert!(out.contains("late_user"), "{out}");

    // Fix the cause, replay that one message: it lands exactly once.
    env.add_user("late_user", 50).await;
    let (ok, out) = worker_cli(&env, &["dlq", "replay", "--id", &late.id.to_string()]);
    assert!(ok, "{out}");
    assert!(out.contains("1 replayed"), "{out}");
    let (ok, out) = worker_cli(&env, &["dlq", "replay", "--id", &late.id.to_string()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("0 replayed"),
        "a second replay finds nothing: {out}"
    );
    let batch = tokio::time::timeout(Duration::from_secs(10), c.next_batch(&stop))
        .await
        .unwrap()
        .unwrap();
    c.process(batch, &stop).await.unwrap();
    assert_eq!(
        env.count(&format!(
            "select count(*) from credit_transactions where id = '{tx}'"
        ))
        .await,
        1
    );
    assert_eq!(
        env.count("select credits_balance from users where id = 'late_user'")
            .await,
        45
    );
    assert_eq!(env.queue_depth(&dlq).await, 1, "the garbage is still there");

    // Purge of an id that is not there removes nothing; --all removes the rest.
    let (ok, out) = worker_cli(
        &env,
        &[
            "dlq",
            "purge",
            "--id",
            "00000000-0000-0000-0000-000000000000",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("0 purged"), "{out}");
    assert_eq!(env.queue_depth(&dlq).await, 1);
    let (ok, out) = worker_cli(&env, &["dlq", "purge", "--all"]);
    assert!(ok, "{out}");
    assert!(out.contains("1 purged"), "{out}");
    assert_eq!(env.queue_depth(&dlq).await, 0);
}

/// A settled consume moves `credits_consumed` (kept in `credit_daily` by the
/// ledger's trigger), so the commit bumps the user's analytics generation
/// (their cached views stop being served) and drops their cached profile; a
/// deleted user's credit events land without
/// free-form data.
#[tokio::test]
async fn credit_commits_drop_cached_analytics_and_deleted_users_credit_events_land_stripped() {
    let env = env().await;
    let ctx = &env.ctx;
    sqlx::query("insert into users (id, status) values ('payer', 'active'), ('gone', 'deleted')")
        .execute(&ctx.pg)
        .await
        .unwrap();
    let mut redis = ctx.redis.get().await.unwrap();
    let view = ctx.keys.analytics("payer", 30);
    let profile = ctx.keys.profile("payer");
    let _: () = redis::pipe()
        .set(&view, "{}")
        .ignore()
        .set(&profile, "{}")
        .ignore()
        .query_async(&mut *redis)
        .await
        .unwrap();
    let context = CreditContext {
        model: Some("gpt-4o".into()),
        description: Some("private words".into()),
        metadata: Some(serde_json::json!({"note": "private"})),
        ..Default::default()
    };
    let consume = |user: &str, amount: i64| {
        Envelope::new(
            Event::CreditConsume(CreditConsume {
                transaction_id: uuid::Uuid::new_v4(),
                user_id: user.into(),
                amount,
                context: context.clone(),
            }),
            Some(user.into()),
            Utc::now(),
        )
    };
    let hold = Envelope::new(
        Event::HoldOpened(common::events::HoldOpened {
            hold_id: uuid::Uuid::new_v4(),
            user_id: "gone".into(),
            amount: 3,
            expires_at: Utc::now() + chrono::Duration::minutes(5),
            context: context.clone(),
            idempotency: None,
        }),
        Some("gone".into()),
        Utc::now(),
    );
    let batch = [
        consume("payer", 4),
        consume("payer", 5),
        consume("gone", 2),
        hold,
    ];
    let effects = worker::handlers::apply(ctx, &batch.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    worker::handlers::after_commit(ctx, effects).await;

    let (cached, gen): (Option<String>, Option<String>) = redis::cmd("MGET")
        .arg(&profile)
        .arg(ctx.keys.analytics_gen("payer"))
        .query_async(&mut *redis)
        .await
        .unwrap();
    assert_eq!(cached, None, "the cached profile is dropped");
    // The cached analytics view was stored without a generation; it stays
    // until its TTL but no longer matches, so the gateway never serves it.
    assert_eq!(
        gen.as_deref(),
        Some("1"),
        "the analytics generation is bumped"
    );
    assert_eq!(
        env.count("select consumed from credit_daily where user_id = 'payer' and model = 'gpt-4o'")
            .await,
        9
    );
    assert_eq!(
        env.count(
            "select count(*) from credit_transactions where user_id = 'gone' \
             and description is null and metadata is null"
        )
        .await,
        1
    );
    assert_eq!(
        env.count("select count(*) from credit_holds where user_id = 'gone' and metadata is null")
            .await,
        1
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", ctx.keys.prefix()))
        .query_async(&mut *redis)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut *redis)
        .await
        .unwrap();
}
