//! Idempotency keys at any time (docs/api.md "Credits", docs/credits.md "Idempotency"):
//! every fresh 200 is exactly one ledger row and every replay none — after a
//! record's TTL, after a Redis data loss, after the answer's write failed —
//! plus the per-user bound on open holds, and the Lua decisions agreeing
//! with their plain Rust twins on real Redis.

use std::time::Duration;

use common::credits::{hold_open_decide, idem_decide, HoldOpenDecision, IdemDecision, IdemRecord};
use common::redis::keys::Keys;
use common::redis::scripts::{hold_limit_twin, idem_check_twin};
use redis::AsyncCommands;
use serde_json::{json, Value};

use crate::credits::{
    api_balance, consume, drained, hold, ledger, post_keyed, read, release, settle,
};
use crate::helpers::*;

const SECS: Duration = Duration::from_secs(1);

/// Consume rows of the user's ledger.
async fn consume_rows(app: &TestApp, user: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from credit_transactions where user_id = $1 and kind = 'consume'",
    )
    .bind(user)
    .fetch_one(&app.pg)
    .await
    .unwrap()
}

/// Waits until the durable record of (route, key) has landed in Postgres.
async fn record_landed(app: &TestApp, user: &str, route: &str, key: &str) {
    app.eventually(20 * SECS, || async {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from idempotency_records where user_id = $1 and route = $2 and key = $3",
        )
        .bind(user)
        .bind(route)
        .bind(key)
        .fetch_one(&app.pg)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
}

async fn hold_keyed(
    app: &TestApp,
    user: &str,
    token: &str,
    body: Value,
    key: &str,
) -> (u16, Value, bool) {
    let path = format!("/api/users/{user}/credits/holds");
    read(post_keyed(app, &path, token, &body, Some(key)).await).await
}

/// A Redis data loss of this test's keys only (the shared Redis serves other
/// tests): every key under the prefix, the slot sentinels included.
pub(crate) async fn lose_redis_data(app: &TestApp) {
    let mut c = app.redis.get().await.unwrap();
    let pattern = format!("{}:*", app.settings.redis.key_prefix);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut *c)
        .await
        .unwrap();
    assert!(keys.len() >= 16384, "the slot sentinels are there to lose");
    for chunk in keys.chunks(1000) {
        let _: () = c.del(chunk).await.unwrap();
    }
}

fn short_ttl(v: &mut std::collections::HashMap<String, String>) {
    v.insert("APP__CREDITS__IDEMPOTENCY_TTL_SECS".into(), "2".into());
}

pub(crate) fn fast_recovery(v: &mut std::collections::HashMap<String, String>) {
    v.insert("APP__AMQP__CONFIRM_TIMEOUT_MS".into(), "2000".into());
    v.insert("APP__CREDITS__RECOVERY_GRACE_MS".into(), "500".into());
}

#[tokio::test]
async fn a_key_reused_after_its_record_expired_is_a_new_charge_never_a_free_one() {
    let app = spawn_app_with(short_ttl).await;
    app.start_worker().await;
    let (user, token) = new_user();
    let (s, first, replayed) = consume(&app, &user, &token, 50, Some("K")).await;
    assert_eq!((s, replayed), (200, false), "{first}");
    drained(&app, &user, 50).await;
    tokio::time::sleep(3 * SECS).await;

    // Past the TTL the key is new again: any body, a new charge.
    let (s, second, replayed) = consume(&app, &user, &token, 30, Some("K")).await;
    assert_eq!((s, replayed), (200, false), "{second}");
    assert_ne!(second["transaction_id"], first["transaction_id"]);
    assert_eq!(second["balance"], 20);
    drained(&app, &user, 20).await;
    assert_eq!(consume_rows(&app, &user).await, 2, "one row per fresh 200");
    assert_eq!(ledger(&app, &user).await, (20, 20, 3));
    assert_eq!(api_balance(&app, &token).await["balance"], 20);
    // And within the new record's TTL it replays, charging nothing.
    let (s, again, replayed) = consume(&app, &user, &token, 30, Some("K")).await;
    assert_eq!((s, replayed), (200, true));
    assert_eq!(again, second);
    tokio::time::sleep(SECS / 2).await;
    assert_eq!(ledger(&app, &user).await, (20, 20, 3));
}

#[tokio::test]
async fn a_hold_key_reused_after_expiry_opens_a_new_hold_that_settles_and_charges_once() {
    let app = spawn_app_with(short_ttl).await;
    app.start_worker().await;
    let (user, token) = new_user();
    let (s, h1, _) = hold_keyed(&app, &user, &token, json!({"amount": 40}), "H").await;
    assert_eq!(s, 200, "{h1}");
    let (s, st1, _) = settle(&app, &user, &token, &h1["hold_id"], 30).await;
    assert_eq!(s, 200, "{st1}");
    drained(&app, &user, 70).await;
    tokio::time::sleep(3 * SECS).await;

    let (s, h2, replayed) = hold_keyed(&app, &user, &token, json!({"amount": 20}), "H").await;
    assert_eq!((s, replayed), (200, false), "{h2}");
    assert_ne!(h2["hold_id"], h1["hold_id"]);
    let (s, st2, replayed) = settle(&app, &user, &token, &h2["hold_id"], 20).await;
    assert_eq!((s, replayed), (200, false), "{st2}");
    assert_ne!(st2["transaction_id"], st1["transaction_id"]);
    drained(&app, &user, 50).await;
    assert_eq!(consume_rows(&app, &user).await, 2);
    assert_eq!(ledger(&app, &user).await, (50, 50, 3));
    let b = api_balance(&app, &token).await;
    assert_eq!(
        (b["balance"].as_i64(), b["held"].as_i64()),
        (Some(50), Some(0))
    );
}

#[tokio::test]
async fn a_retry_after_redis_lost_its_data_replays_and_charges_once() {
    let app = spawn_app_with(fast_recovery).await;
    app.start_worker().await;
    let (user, token) = new_user();
    let (s, first, _) = consume(&app, &user, &token, 50, Some("K")).await;
    assert_eq!(s, 200, "{first}");
    let (s, h1, _) = hold_keyed(&app, &user, &token, json!({"amount": 20}), "H").await;
    assert_eq!(s, 200, "{h1}");
    drained(&app, &user, 50).await;
    record_landed(&app, &user, "holds", "H").await;

    lose_redis_data(&app).await;
    let lost_at = std::time::Instant::now();
    let (s, again, replayed) = app
        .eventually(30 * SECS, || async {
            let r = consume(&app, &user, &token, 50, Some("K")).await;
            (r.0 != 503).then_some(r)
        })
        .await;
    eprintln!(
        "credit writes resumed {:?} after the loss",
        lost_at.elapsed()
    );
    assert_eq!((s, replayed), (200, true), "{again}");
    assert_eq!(again["transaction_id"], first["transaction_id"]);
    let (s, h_again, replayed) = hold_keyed(&app, &user, &token, json!({"amount": 20}), "H").await;
    assert_eq!((s, replayed), (200, true), "{h_again}");
    assert_eq!(h_again["hold_id"], h1["hold_id"]);
    // The rebuilt balance is the ledger minus the open hold, once.
    let b = api_balance(&app, &token).await;
    assert_eq!(
        (b["balance"].as_i64(), b["held"].as_i64()),
        (Some(30), Some(20))
    );
    let (s, st, _) = settle(&app, &user, &token, &h1["hold_id"], 15).await;
    assert_eq!(s, 200, "{st}");
    drained(&app, &user, 35).await;
    assert_eq!(
        consume_rows(&app, &user).await,
        2,
        "the consume once, the settle once"
    );
    assert_eq!(ledger(&app, &user).await, (35, 35, 3));
    let b = api_balance(&app, &token).await;
    assert_eq!(
        (b["balance"].as_i64(), b["held"].as_i64()),
        (Some(35), Some(0))
    );
}

#[tokio::test]
async fn a_retry_whose_first_answer_was_never_stored_charges_once_under_the_first_id() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let keys = Keys::new(&app.settings.redis.key_prefix);
    // K1's event lands; K2's waits in the queue (its worker is stopped).
    app.start_worker_on(&["credits"]).await;
    let (s, first1, _) = consume(&app, &user, &token, 10, Some("K1")).await;
    assert_eq!(s, 200);
    record_landed(&app, &user, "consume", "K1").await;
    app.worker_shutdown.cancel();
    tokio::time::sleep(SECS).await;
    let (s, first2, _) = consume(&app, &user, &token, 20, Some("K2")).await;
    assert_eq!(s, 200);
    // Both answers' writes "failed": the records stay in progress with their
    // id, and the in-progress window has passed (t = 0).
    let mut c = app.redis.get().await.unwrap();
    for (key, first) in [("K1", &first1), ("K2", &first2)] {
        let record = keys.idempotency(&user, "consume", key);
        let hash: String = c.hget(&record, "h").await.unwrap();
        let _: () = c.del(&record).await.unwrap();
        let _: () = c
            .hset_multiple(
                &record,
                &[
                    ("h", hash.as_str()),
                    ("st", "run"),
                    ("tx", first["transaction_id"].as_str().unwrap()),
                    ("t", "0"),
                ],
            )
            .await
            .unwrap();
    }

    // K1: the durable record answers, as first sent.
    let (s, again1, replayed) = consume(&app, &user, &token, 10, Some("K1")).await;
    assert_eq!((s, replayed), (200, true), "{again1}");
    assert_eq!(again1, first1);
    // K2: not in Postgres yet, so it is retried under its first id (still
    // reserved: nothing moves), never a new one.
    let (s, again2, replayed) = consume(&app, &user, &token, 20, Some("K2")).await;
    assert_eq!((s, replayed), (200, true), "{again2}");
    assert_eq!(again2["transaction_id"], first2["transaction_id"]);
    assert_eq!(again2["balance"], 70);
    // And now it is remembered.
    let (s, _, replayed) = consume(&app, &user, &token, 20, Some("K2")).await;
    assert_eq!((s, replayed), (200, true));

    // Both K2 events land: one ledger row.
    let twin = spawn_twin(&app).await;
    twin.start_worker_on(&["credits"]).await;
    drained(&app, &user, 70).await;
    tokio::time::sleep(SECS / 2).await;
    assert_eq!(
        consume_rows(&app, &user).await,
        2,
        "one row per first 200, none per retry"
    );
    assert_eq!(ledger(&app, &user).await, (70, 70, 3));
    assert_eq!(api_balance(&app, &token).await["balance"], 70);
    let ctx = worker::startup::Ctx::new(app.settings.clone()).unwrap();
    assert_eq!(
        worker::reconcile::reconcile_user(&ctx, &user)
            .await
            .unwrap(),
        None,
        "nothing drifted"
    );
}

#[tokio::test]
async fn one_hold_more_than_max_open_holds_is_422_naming_holds() {
    let app = spawn_app_with(|v| {
        v.insert("APP__CREDITS__MAX_OPEN_HOLDS".into(), "3".into());
    })
    .await;
    app.start_worker().await;
    let (user, token) = new_user();
    // Concurrently: exactly three open.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (client, url, token) = (
            app.client.clone(),
            app.url(&format!("/api/users/{user}/credits/holds")),
            token.clone(),
        );
        tasks.push(tokio::spawn(async move {
            read(
                client
                    .post(url)
                    .bearer_auth(token)
                    .json(&json!({"amount": 5}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        let (s, body, _) = t.await.unwrap();
        match s {
            200 => open.push(body["hold_id"].clone()),
            422 => {
                assert_eq!(body["code"], "validation_failed");
                assert_eq!(body["field"], "holds", "{body}");
                assert!(body["detail"].as_str().unwrap().contains("holds"), "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(open.len(), 3);
    let (s, body, _) = hold(&app, &user, &token, json!({"amount": 1})).await;
    assert_eq!((s, body["field"].as_str()), (422, Some("holds")));
    let b = api_balance(&app, &token).await;
    assert_eq!(
        (b["balance"].as_i64(), b["held"].as_i64()),
        (Some(85), Some(15))
    );
    // One ends: another may open.
    assert_eq!(release(&app, &user, &token, &open[0]).await, 204);
    let (s, body, _) = hold(&app, &user, &token, json!({"amount": 1})).await;
    assert_eq!(s, 200, "{body}");
    let (s, _, _) = hold(&app, &user, &token, json!({"amount": 1})).await;
    assert_eq!(s, 422);
}

/// `idem_check` (Lua, real Redis) and `idem_decide` (Rust) agree on every
/// record shape around the window's edges.
#[tokio::test]
async fn the_idempotency_check_in_lua_agrees_with_idem_decide() {
    let client = redis::Client::open(
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    )
    .unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let script = idem_check_twin();
    let key = format!("idemtest:{{{}}}:rec", uuid::Uuid::new_v4().simple());
    let window = 35_000i64;
    let mut checked = 0;
    for hash in ["h", "other"] {
        for done in [false, true] {
            for id in [None, Some("tx-1")] {
                for started in [None, Some(0i64), Some(1_000_000)] {
                    for now in [
                        1_000_000,
                        1_000_000 + window - 1,
                        1_000_000 + window,
                        5_000_000,
                    ] {
                        let _: () = c.del(&key).await.unwrap();
                        let mut fields = vec![("h", hash.to_string())];
                        fields.push(("st", if done { "done" } else { "run" }.into()));
                        if done {
                            fields.push(("ans", "{\"status\":200}".into()));
                        }
                        if let Some(id) = id {
                            fields.push(("tx", id.into()));
                        }
                        if let Some(t) = started {
                            fields.push(("t", t.to_string()));
                        }
                        let _: () = c.hset_multiple(&key, &fields).await.unwrap();
                        let got: Vec<String> = script
                            .key(&key)
                            .arg("h")
                            .arg(window)
                            .arg(now)
                            .invoke_async(&mut c)
                            .await
                            .unwrap();
                        let want = idem_decide(
                            Some(IdemRecord {
                                hash,
                                done,
                                id,
                                started_ms: started,
                            }),
                            "h",
                            now,
                            window,
                        );
                        let tag = match want {
                            IdemDecision::Fresh => "FRESH",
                            IdemDecision::Conflict => "CONFLICT",
                            IdemDecision::Replay => "REPLAY",
                            IdemDecision::Busy => "BUSY",
                            IdemDecision::Stale => "STALE",
                        };
                        assert_eq!(got[0], tag, "{fields:?} at {now}");
                        if want == IdemDecision::Stale {
                            assert_eq!(got[1], "tx-1");
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    let _: () = c.del(&key).await.unwrap();
    let got: Vec<String> = script
        .key(&key)
        .arg("h")
        .arg(window)
        .arg(0)
        .invoke_async(&mut c)
        .await
        .unwrap();
    assert_eq!(got[0], "FRESH");
    assert_eq!(idem_decide(None, "h", 0, window), IdemDecision::Fresh);
    assert_eq!(checked, 96);

    let limit = hold_limit_twin();
    for open in [0u64, 2, 3, 4] {
        for (bal, amount) in [(0i64, 1i64), (5, 5), (4, 5), (100, 1)] {
            let got: String = limit
                .arg(open)
                .arg(3)
                .arg(bal)
                .arg(amount)
                .invoke_async(&mut c)
                .await
                .unwrap();
            let want = match hold_open_decide(open, 3, bal, amount) {
                HoldOpenDecision::TooMany => "TOO_MANY",
                HoldOpenDecision::Insufficient => "INSUFFICIENT",
                HoldOpenDecision::Open => "OPEN",
            };
            assert_eq!(got, want, "open {open}, bal {bal}, amount {amount}");
        }
    }
}

/// A credit class limit of `n` per minute.
fn credits_limit(n: u32) -> impl FnOnce(&mut std::collections::HashMap<String, String>) {
    move |v| {
        v.insert(
            "APP__RATE_LIMIT__CLASSES__CREDITS__LIMIT".into(),
            n.to_string(),
        );
        v.insert(
            "APP__RATE_LIMIT__CLASSES__CREDITS__WINDOW_SECS".into(),
            "60".into(),
        );
    }
}

/// The rate limit decided inside the credit script (one round trip): every
/// request of the class counts once, a bad body and a hold's steps included,
/// and a consume it refuses reserves nothing and records no key.
#[tokio::test]
async fn a_consume_refused_by_the_limit_in_its_script_reserves_nothing_and_records_no_key() {
    let app = spawn_app_with(credits_limit(5)).await;
    let (user, token) = new_user();
    let path = format!("/api/users/{user}/credits/consume");
    let remaining = |r: &reqwest::Response| {
        r.headers()["ratelimit-remaining"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    // 1: a 422 ends before any script and is counted by the guard.
    let r = post_keyed(&app, &path, &token, &json!({"amount": 0}), Some("bad")).await;
    assert_eq!((r.status().as_u16(), remaining(&r)), (422, 4));
    // 2: a keyed consume, 3: its retry (a replay counts too).
    let r = post_keyed(&app, &path, &token, &json!({"amount": 10}), Some("k1")).await;
    assert_eq!((r.status().as_u16(), remaining(&r)), (200, 3));
    let r = post_keyed(&app, &path, &token, &json!({"amount": 10}), Some("k1")).await;
    assert_eq!(remaining(&r), 2);
    assert!(read(r).await.2, "the retry after the answer replays it");
    // 4, 5: a hold opened and settled.
    let (s, h, _) = hold(&app, &user, &token, json!({"amount": 20})).await;
    assert_eq!(s, 200, "{h}");
    let (s, _, _) = settle(&app, &user, &token, &h["hold_id"], 5).await;
    assert_eq!(s, 200);
    let before = api_balance_raw(&app, &user).await;
    // 6: refused inside the consume script.
    let r = post_keyed(&app, &path, &token, &json!({"amount": 7}), Some("k2")).await;
    assert_eq!((r.status().as_u16(), remaining(&r)), (429, 0));
    assert!(r.headers().contains_key("retry-after"));
    let (_, body, _) = read(r).await;
    assert_eq!(body["code"], "rate_limited");
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let mut c = app.redis.get().await.unwrap();
    let exists: bool = c
        .exists(keys.idempotency(&user, "consume", "k2"))
        .await
        .unwrap();
    assert!(!exists, "no idempotency record for a refused request");
    assert_eq!(
        api_balance_raw(&app, &user).await,
        before,
        "nothing reserved"
    );
    // A bad body over the limit is a 429 as it was when the guard ran first.
    let r = post_keyed(&app, &path, &token, &json!({"amount": 0}), None).await;
    assert_eq!(r.status().as_u16(), 429);
}

/// The user's spendable balance and pending count, straight from Redis.
async fn api_balance_raw(app: &TestApp, user: &str) -> (Option<String>, usize) {
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let mut c = app.redis.get().await.unwrap();
    let bal: Option<String> = c.hget(keys.credits(user), "bal").await.unwrap();
    let pending: usize = c.hlen(keys.pending(user)).await.unwrap();
    (bal, pending)
}

/// Redis's own time per keyed consume (`INFO commandstats`, all EVALSHA),
/// the three calls of before (the guard's GCRA, `consume`, `idem_finish`)
/// against the merged `consume` and the batched finish (batches of 1, 8 and
/// 32). Needs a Redis of its own (`SCRIPT_MEASURE_REDIS`, e.g.
/// redis://127.0.0.1:6391): it resets the server's statistics.
#[tokio::test]
#[ignore]
async fn redis_time_per_consume_before_and_after_the_merge() {
    use common::redis::scripts::{scripts, UserKeys};
    let url = std::env::var("SCRIPT_MEASURE_REDIS").expect("SCRIPT_MEASURE_REDIS");
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    const N: usize = 4000;
    async fn usec(c: &mut redis::aio::MultiplexedConnection) -> f64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(c)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:"))
            .filter_map(|l| {
                l.split("usec=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .sum()
    }
    for (label, merged, batch) in [
        ("before", false, 1),
        ("after, batch 1", true, 1),
        ("after, batch 8", true, 8),
        ("after, batch 32", true, 32),
    ] {
        let keys = Keys::new(&format!("measure{}", uuid::Uuid::new_v4().simple()));
        let users: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
        for u in &users {
            let uk = UserKeys::new(&keys, u);
            let _: () = c.set(&uk.sentinel, "1").await.unwrap();
            let _: Vec<String> = uk
                .invoke(&scripts().init, 60_000)
                .arg(1_000_000_000)
                .arg("")
                .arg("")
                .invoke_async(&mut c)
                .await
                .unwrap();
        }
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut c)
            .await
            .unwrap();
        let mut finishes = Vec::new();
        for i in 0..N {
            let u = &users[i % users.len()];
            let uk = UserKeys::new(&keys, u);
            let rl = keys.rate_limit(u, "credits");
            let record = keys.idempotency(u, "consume", &format!("k{i}"));
            let tx = uuid::Uuid::now_v7().to_string();
            if !merged {
                let _: Vec<i64> = gateway::rate_limit::script()
                    .key(&rl)
                    .arg(1_000_000)
                    .arg(60)
                    .arg(1)
                    .invoke_async(&mut c)
                    .await
                    .unwrap();
            }
            let mut inv = uk.invoke(&scripts().consume, 86_400_000);
            inv.key(&record)
                .arg("h")
                .arg(&tx)
                .arg(1)
                .arg(35_000)
                .arg(86_400_000)
                .arg(600_000)
                .arg("0");
            if merged {
                inv.key(&rl).arg(1_000_000).arg(60);
            }
            let _: Vec<String> = inv.invoke_async(&mut c).await.unwrap();
            let answer =
                format!(r#"{{"status":200,"body":{{"transaction_id":"{tx}","balance":1}}}}"#);
            finishes.push((record, answer, tx));
            if finishes.len() == batch {
                let script = if merged {
                    &scripts().idem_finish_many
                } else {
                    &scripts().idem_finish
                };
                let mut inv = script.prepare_invoke();
                for (record, answer, tx) in finishes.drain(..) {
                    inv.key(record).arg("h").arg(answer).arg(86_400_000).arg(tx);
                }
                let _: i64 = inv.invoke_async(&mut c).await.unwrap();
            }
        }
        println!(
            "{label}: {:.1} µs of Redis per consume",
            usec(&mut c).await / N as f64
        );
    }
}
