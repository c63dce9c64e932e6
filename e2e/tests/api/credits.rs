//! Credits against the real services (docs/api.md "Credits", §5.5b, §5.7, §9.2): the
//! balance never overspends, retries charge once, holds end exactly once,
//! bad input changes nothing, and a Redis data loss is recovered from.

use std::time::Duration;

use common::redis::keys::Keys;
use redis::AsyncCommands;
use serde_json::{json, Value};

use crate::helpers::*;

const SECS: Duration = Duration::from_secs(1);

pub(crate) async fn post_keyed(
    app: &TestApp,
    path: &str,
    token: &str,
    body: &Value,
    key: Option<&str>,
) -> reqwest::Response {
    let mut req = app.client.post(app.url(path)).bearer_auth(token).json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    req.send().await.expect("request")
}

/// Status, body, and whether the answer was a replay.
pub(crate) async fn read(r: reqwest::Response) -> (u16, Value, bool) {
    let status = r.status().as_u16();
    let replayed = r
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body, replayed)
}

pub(crate) async fn consume(
    app: &TestApp,
    user: &str,
    token: &str,
    amount: i64,
    key: Option<&str>,
) -> (u16, Value, bool) {
    let path = format!("/api/users/{user}/credits/consume");
    read(post_keyed(app, &path, token, &json!({"amount": amount}), key).await).await
}

async fn grant(app: &TestApp, user: &str, amount: i64) -> Value {
    let path = format!("/api/admin/users/{user}/credits/grant");
    let (status, body, _) = read(
        app.post(
            &path,
            &admin_token(),
            &json!({"amount": amount, "reason": "test top-up"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

pub(crate) async fn api_balance(app: &TestApp, token: &str) -> Value {
    let r = app.get("/api/vscode/user/balance", token).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// `users.credits_balance`, the ledger's sum, and its row count.
pub(crate) async fn ledger(app: &TestApp, user: &str) -> (i64, i64, i64) {
    let bal: i64 = sqlx::query_scalar("select credits_balance from users where id = $1")
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    let (sum, rows): (i64, i64) = sqlx::query_as(
        "select coalesce(sum(amount), 0)::bigint, count(*) from credit_transactions where user_id = $1",
    )
    .bind(user)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    (bal, sum, rows)
}

pub(crate) async fn pending_len(app: &TestApp, user: &str) -> usize {
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let mut c = app.redis.get().await.unwrap();
    c.hlen(keys.pending(user)).await.unwrap()
}

/// Waits until the worker has settled everything: nothing pending in Redis
/// and the ledger at `expected`.
pub(crate) async fn drained(app: &TestApp, user: &str, expected: i64) {
    app.eventually(20 * SECS, || async {
        let (bal, sum, _) = ledger(app, user).await;
        (bal == expected && sum == expected && pending_len(app, user).await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn concurrent_consumes_through_two_gateways_never_overspend_and_settle_to_the_ledger() {
    let app = spawn_app().await;
    let twin = spawn_twin(&app).await;
    app.start_worker().await;
    let (user, token) = new_user();
    // Provisioned with 100 by the grant route itself, then topped up to 1000.
    assert_eq!(grant(&app, &user, 900).await["balance"], 1000);

    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let gw = if i % 2 == 0 { app.addr } else { twin.addr };
        let (client, user, token) = (app.client.clone(), user.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("http://{gw}/api/users/{user}/credits/consume"))
                .bearer_auth(token)
                .json(&json!({"amount": 7}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                assert!(body["balance"].as_i64().unwrap() >= 0, "{body}");
                assert_eq!(body["success"], true);
                assert_eq!(body["remaining_credits"], body["balance"]);
            }
            402 => {
                refused += 1;
                assert_eq!(body["code"], "insufficient_credits");
                assert_eq!(body["required"], 7);
                assert!(body["balance"].as_i64().unwrap() < 7, "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    eprintln!(
        "300 concurrent consumes through two gateways answered in {:?}",
        started.elapsed()
    );
    assert_eq!(
        ok,
        1000 / 7,
        "every credit that could be spent was, and no more"
    );
    assert_eq!(refused, 300 - 1000 / 7);
    let left = 1000 - 7 * (1000 / 7);
    drained(&app, &user, left).await;
    eprintln!(
        "... and settled into the ledger after {:?}",
        started.elapsed()
    );
    let (_, _, rows) = ledger(&app, &user).await;
    assert_eq!(
        rows,
        2 + 1000 / 7,
        "starting grant, top-up, one row per answered consume"
    );
    for gw in [&app, &twin] {
        let b = api_balance(gw, &token).await;
        assert_eq!(b["balance"], left, "{b}");
        assert_eq!(b["held"], 0);
        assert!(b["as_of"].is_string(), "{b}");
        assert_eq!(b["plan"], "free");
    }
}

#[tokio::test]
async fn a_retried_idempotency_key_replays_the_first_answer_and_charges_once() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();

    let (s1, first, r1) = consume(&app, &user, &token, 10, Some("k1")).await;
    assert_eq!((s1, r1), (200, false), "{first}");
    let (s2, again, r2) = consume(&app, &user, &token, 10, Some("k1")).await;
    assert_eq!((s2, r2), (200, true));
    assert_eq!(again, first);
    // Same key, another body.
    let (s3, body, _) = consume(&app, &user, &token, 11, Some("k1")).await;
    assert_eq!(s3, 409);
    assert_eq!(body["code"], "idempotency_conflict");
    // Equal parsed JSON is the same body, whatever the spacing and key order.
    let path = format!("/api/users/{user}/credits/consume");
    let r = app
        .client
        .post(app.url(&path))
        .bearer_auth(&token)
        .header("Idempotency-Key", "k1")
        .header("content-type", "application/json")
        .body("{ \"amount\" : 10 }")
        .send()
        .await
        .unwrap();
    assert!(read(r).await.2, "a replay");

    // Twenty at once with one key: one charge; the rest replay or are told it runs.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, url, token) = (app.client.clone(), app.url(&path), token.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "k2")
                .json(&json!({"amount": 5}))
                .send()
                .await
                .unwrap();
            read(r).await
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, _, false) => fresh += 1,
            (200, _, true) => {}
            (409, body, _) => assert_eq!(body["code"], "idempotency_conflict"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(api_balance(&app, &token).await["balance"], 85);

    // A 402 is remembered too, even once the balance could cover it.
    let (s, body, replayed) = consume(&app, &user, &token, 1000, Some("k3")).await;
    assert_eq!((s, replayed), (402, false));
    assert_eq!(
        (body["balance"].as_i64(), body["required"].as_i64()),
        (Some(85), Some(1000))
    );
    drained(&app, &user, 85).await;

    // Redis forgets k1 alone (an operator's DEL; a whole loss is detected and
    // the records come back from Postgres, see idempotency.rs): the key is
    // new again, so this is a new charge under a new id, and never a free one.
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let mut c = app.redis.get().await.unwrap();
    let _: () = c
        .del(keys.idempotency(&user, "consume", "k1"))
        .await
        .unwrap();
    let (s, body, replayed) = consume(&app, &user, &token, 10, Some("k1")).await;
    assert_eq!((s, replayed), (200, false));
    assert_ne!(body["transaction_id"], first["transaction_id"]);
    drained(&app, &user, 75).await;
    let (_, _, rows) = ledger(&app, &user).await;
    assert_eq!(
        rows, 4,
        "starting grant, k1 twice (two fresh 200s), k2 once"
    );
    let ctx = worker::startup::Ctx::new(app.settings.clone()).unwrap();
    assert_eq!(api_balance(&app, &token).await["balance"], 75);
    assert_eq!(
        worker::reconcile::reconcile_user(&ctx, &user)
            .await
            .unwrap(),
        None,
        "nothing drifted"
    );

    let (s, body, _) = consume(&app, &user, &token, 1, Some(&"k".repeat(256))).await;
    assert_eq!(s, 422);
    assert!(
        body["detail"].as_str().unwrap().contains("Idempotency-Key"),
        "{body}"
    );
}

#[tokio::test]
async fn after_redis_loses_its_data_balances_rebuild_from_the_ledger_once_the_queue_has_settled() {
    // FLUSHDB wipes a whole database: this test has one of its own (a single
    // node even in a cluster run: REDIS_URL set wins there, see helpers.rs).
    let app = spawn_app_with(|v| {
        v.insert("REDIS_URL".into(), "redis://127.0.0.1:6379/13".into());
        v.insert("APP__AMQP__CONFIRM_TIMEOUT_MS".into(), "2000".into());
        v.insert("APP__CREDITS__RECOVERY_GRACE_MS".into(), "500".into());
    })
    .await;
    let (user, token) = new_user();
    // No worker yet: both events wait unsettled in the queue.
    assert_eq!(consume(&app, &user, &token, 30, None).await.0, 200);
    assert_eq!(consume(&app, &user, &token, 20, None).await.0, 200);

    let mut c = app.redis.get().await.unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut *c).await.unwrap();

    let r = app
        .post(
            &format!("/api/users/{user}/credits/consume"),
            &token,
            &json!({"amount": 1}),
        )
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(read(r).await.1["code"], "unavailable");
    // Reads keep answering, from Postgres.
    assert_eq!(api_balance(&app, &token).await["balance"], 100);
    // Past the confirm window the queue still holds events from before the
    // loss, so Redis must not rebuild yet: 100 would let the user overspend.
    tokio::time::sleep(4 * SECS).await;
    assert_eq!(consume(&app, &user, &token, 1, None).await.0, 503);

    app.start_worker().await;
    let worker_started = std::time::Instant::now();
    let spent = app
        .eventually(30 * SECS, || async {
            let (s, body, _) = consume(&app, &user, &token, 50, None).await;
            (s != 503).then_some((s, body))
        })
        .await;
    eprintln!(
        "credit writes resumed {:?} after the worker started",
        worker_started.elapsed()
    );
    assert_eq!(
        spent.0, 200,
        "exactly what is left can be spent: {}",
        spent.1
    );
    assert_eq!(spent.1["balance"], 0);
    let (s, body, _) = consume(&app, &user, &token, 1, None).await;
    assert_eq!(s, 402, "{body}");
    assert_eq!(body["balance"], 0);
    drained(&app, &user, 0).await;
    assert_eq!(api_balance(&app, &token).await["balance"], 0);
}

pub(crate) async fn hold(
    app: &TestApp,
    user: &str,
    token: &str,
    body: Value,
) -> (u16, Value, bool) {
    read(
        app.post(&format!("/api/users/{user}/credits/holds"), token, &body)
            .await,
    )
    .await
}

pub(crate) async fn settle(
    app: &TestApp,
    user: &str,
    token: &str,
    hold_id: &Value,
    amount: i64,
) -> (u16, Value, bool) {
    let path = format!(
        "/api/users/{user}/credits/holds/{}/settle",
        hold_id.as_str().unwrap()
    );
    read(
        app.post(&path, token, &json!({"amount": amount, "model": "m"}))
            .await,
    )
    .await
}

pub(crate) async fn release(app: &TestApp, user: &str, token: &str, hold_id: &Value) -> u16 {
    let path = format!(
        "/api/users/{user}/credits/holds/{}",
        hold_id.as_str().unwrap()
    );
    app.client
        .delete(app.url(&path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_hold_settles_once_returns_its_rest_and_cannot_settle_after_release() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();

    let (s, h1, _) = hold(&app, &user, &token, json!({"amount": 40, "model": "m"})).await;
    assert_eq!(s, 200, "{h1}");
    assert_eq!(
        (h1["amount"].as_i64(), h1["balance"].as_i64()),
        (Some(40), Some(60))
    );
    assert!(h1["expires_at"].is_string());
    let b = api_balance(&app, &token).await;
    assert_eq!(
        (b["balance"].as_i64(), b["held"].as_i64()),
        (Some(60), Some(40))
    );

    let (s, settled, replayed) = settle(&app, &user, &token, &h1["hold_id"], 25).await;
    assert_eq!((s, replayed), (200, false), "{settled}");
    assert_eq!(settled["amount"], 25);
    assert_eq!(settled["released"], 15);
    assert_eq!(settled["balance"], 75);
    // Settling again answers the first settle, whatever the amount.
    let (s, again, replayed) = settle(&app, &user, &token, &h1["hold_id"], 30).await;
    assert_eq!((s, replayed), (200, true));
    assert_eq!(again, settled);

    let (_, h2, _) = hold(&app, &user, &token, json!({"amount": 20})).await;
    assert_eq!(h2["balance"], 55);
    assert_eq!(release(&app, &user, &token, &h2["hold_id"]).await, 204);
    assert_eq!(api_balance(&app, &token).await["balance"], 75);
    let (s, body, _) = settle(&app, &user, &token, &h2["hold_id"], 5).await;
    assert_eq!(s, 409);
    assert_eq!(body["code"], "hold_expired");
    assert_eq!(
        release(&app, &user, &token, &h2["hold_id"]).await,
        204,
        "releasing is idempotent"
    );
    assert_eq!(
        release(&app, &user, &token, &h1["hold_id"]).await,
        409,
        "a settled hold"
    );

    let (_, h3, _) = hold(&app, &user, &token, json!({"amount": 10})).await;
    let (s, body, _) = settle(&app, &user, &token, &h3["hold_id"], 11).await;
    assert_eq!(s, 422);
    assert_eq!(body["field"], "amount");
    assert_eq!(release(&app, &user, &token, &h3["hold_id"]).await, 204);
    let (s, _, _) = hold(&app, &user, &token, json!({"amount": 76})).await;
    assert_eq!(s, 402);
    let (s, body, _) = hold(&app, &user, &token, json!({"amount": 1, "ttl_secs": 3601})).await;
    assert_eq!((s, body["field"].as_str()), (422, Some("ttl_secs")));

    drained(&app, &user, 75).await;
    let consumes: Vec<(i64, Option<uuid::Uuid>)> = sqlx::query_as(
        "select amount, hold_id from credit_transactions where user_id = $1 and kind = 'consume'",
    )
    .bind(&user)
    .fetch_all(&app.pg)
    .await
    .unwrap();
    let h1_id: uuid::Uuid = h1["hold_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        consumes,
        vec![(-25, Some(h1_id))],
        "exactly one ledger row for the settle"
    );
    // The hold events land too: every hold ended, none left open.
    app.eventually(10 * SECS, || async {
        let (ended, open): (i64, i64) = sqlx::query_as(
            "select count(*) filter (where status in ('settled', 'released')), \
                    count(*) filter (where status = 'open') \
             from credit_holds where user_id = $1",
        )
        .bind(&user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
        (ended == 3 && open == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_expired_hold_returns_in_full_without_any_call() {
    let app = spawn_app_with(|v| {
        v.insert("APP__CREDITS__EXPIRY_INTERVAL_SECS".into(), "1".into());
        v.insert("APP__CREDITS__HOLD_EXPIRY_GRACE_SECS".into(), "0".into());
    })
    .await;
    app.start_worker().await;
    let (user, token) = new_user();
    let (s, h, _) = hold(&app, &user, &token, json!({"amount": 30, "ttl_secs": 1})).await;
    assert_eq!(s, 200);
    assert_eq!(h["balance"], 70);

    // Nobody calls the API: the worker's expiry job releases it in Redis and
    // marks it in Postgres.
    let keys = Keys::new(&app.settings.redis.key_prefix);
    app.eventually(20 * SECS, || async {
        let status: Option<String> =
            sqlx::query_scalar("select status from credit_holds where user_id = $1")
                .bind(&user)
                .fetch_optional(&app.pg)
                .await
                .unwrap();
        let mut c = app.redis.get().await.unwrap();
        let (bal, held): (Option<i64>, Option<i64>) =
            c.hget(keys.credits(&user), &["bal", "held"]).await.unwrap();
        (status.as_deref() == Some("expired") && bal == Some(100) && held == Some(0)).then_some(())
    })
    .await;
    let b = api_balance(&app, &token).await;
    assert_eq!(
        (b["balance"].as_i64(), b["held"].as_i64()),
        (Some(100), Some(0))
    );
    let (s, body, _) = settle(&app, &user, &token, &h["hold_id"], 1).await;
    assert_eq!((s, body["code"].as_str()), (409, Some("hold_expired")));
    assert_eq!(ledger(&app, &user).await, (100, 100, 1));
}

#[tokio::test]
async fn invalid_amounts_are_422_and_change_nothing() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let path = format!("/api/users/{user}/credits/consume");
    for raw in [
        r#"{"amount": 0}"#,
        r#"{"amount": -1}"#,
        r#"{"amount": 1.5}"#,
        r#"{"amount": "5"}"#,
        r#"{"amount": 9223372036854775808}"#,
        r#"{"amount": 9007199254740992}"#,
        r#"{"amount": null}"#,
        r#"{}"#,
        r#"[{"amount": 5}]"#,
    ] {
        let r = app
            .client
            .post(app.url(&path))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{raw}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "validation_failed");
        let field = if raw.starts_with('[') {
            "body"
        } else {
            "amount"
        };
        assert_eq!(body["field"], field, "{raw}: {body}");
        assert!(
            body["detail"].as_str().unwrap().starts_with(field),
            "{body}"
        );
    }
    let r = app
        .client
        .post(app.url(&path))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{amount: 5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b = api_balance(&app, &token).await;
    assert_eq!(
        (b["balance"].as_i64(), b["held"].as_i64()),
        (Some(100), Some(0))
    );
    assert_eq!(pending_len(&app, &user).await, 0);
    assert_eq!(ledger(&app, &user).await, (100, 100, 1));
}

#[tokio::test]
async fn another_users_credits_are_403() {
    let app = spawn_app().await;
    let (alice, alice_token) = new_user();
    let (bob, _) = new_user();
    let hold_path = format!(
        "/api/users/{bob}/credits/holds/{}/settle",
        uuid::Uuid::new_v4()
    );
    for path in [
        format!("/api/users/{bob}/credits/consume"),
        format!("/api/users/{bob}/credits/holds"),
        hold_path,
    ] {
        let r = app.post(&path, &alice_token, &json!({"amount": 1})).await;
        assert_eq!(r.status(), 403, "{path}");
        assert_eq!(read(r).await.1["code"], "forbidden");
    }
    let r = app
        .post(
            &format!("/api/admin/users/{alice}/credits/grant"),
            &alice_token,
            &json!({"amount": 5, "reason": "x"}),
        )
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(api_balance(&app, &alice_token).await["balance"], 100);
    let bob_rows = app
        .count(&format!("select count(*) from users where id = '{bob}'"))
        .await;
    assert_eq!(bob_rows, 0, "a refused request provisions nobody");
}

#[tokio::test]
async fn an_admin_grant_is_audited_spendable_at_once_and_idempotent() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    // Loaded into Redis first, so the grant must reach the cached balance.
    assert_eq!(consume(&app, &user, &token, 10, None).await.0, 200);
    let path = format!("/api/admin/users/{user}/credits/grant");
    let body = json!({"amount": 500, "reason": "support ticket 42"});
    let r = app
        .client
        .post(app.url(&path))
        .bearer_auth(admin_token())
        .header("Idempotency-Key", "g1")
        .header("x-request-id", "req-abc")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (s, first, replayed) = read(r).await;
    assert_eq!((s, replayed), (200, false), "{first}");
    assert_eq!(first["balance"], 590);
    assert_eq!(
        consume(&app, &user, &token, 590, None).await.0,
        200,
        "spendable at once"
    );

    let (s, again, replayed) =
        read(post_keyed(&app, &path, &admin_token(), &body, Some("g1")).await).await;
    assert_eq!((s, replayed), (200, true));
    assert_eq!(again["transaction_id"], first["transaction_id"]);
    let other = json!({"amount": 501, "reason": "support ticket 42"});
    assert_eq!(
        read(post_keyed(&app, &path, &admin_token(), &other, Some("g1")).await)
            .await
            .0,
        409
    );
    let (s, body, _) = read(
        app.post(
            &path,
            &admin_token(),
            &json!({"amount": common::settings::MAX_CREDITS, "reason": "x"}),
        )
        .await,
    )
    .await;
    assert_eq!((s, body["field"].as_str()), (422, Some("amount")));

    let (actor, action, target, request_id, details): (String, String, String, String, Value) = sqlx::query_as(
        "select actor, action, target, request_id, details from audit_log where action = 'credits.grant'",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(
        (
            actor.as_str(),
            action.as_str(),
            target.as_str(),
            request_id.as_str()
        ),
        ("admin_1", "credits.grant", user.as_str(), "req-abc")
    );
    assert_eq!(details["amount"], 500);
    assert_eq!(details["reason"], "support ticket 42");
    let grants = app
        .count(&format!(
            "select count(*) from credit_transactions where user_id = '{user}' and kind = 'grant'"
        ))
        .await;
    assert_eq!(grants, 2, "starting credits and one grant");
}

#[tokio::test]
async fn a_consume_whose_event_cannot_be_published_is_503_and_charges_nothing() {
    let app = spawn_app_without_broker().await;
    let (user, token) = new_user();
    let r = app
        .post(
            &format!("/api/users/{user}/credits/consume"),
            &token,
            &json!({"amount": 10}),
        )
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(read(r).await.1["code"], "unavailable");
    let (s, _, _) = hold(&app, &user, &token, json!({"amount": 10})).await;
    assert_eq!(s, 503);
    let b = api_balance(&app, &token).await;
    assert_eq!(
        (b["balance"].as_i64(), b["held"].as_i64()),
        (Some(100), Some(0))
    );
    assert_eq!(pending_len(&app, &user).await, 0);
    // The key is free again: a retry is not told the first one still runs.
    let (s, _, _) = consume(&app, &user, &token, 10, Some("k")).await;
    assert_eq!(s, 503);
    let (s, _, _) = consume(&app, &user, &token, 10, Some("k")).await;
    assert_eq!(s, 503);
}
