//! SPEC §5.11 (pricing) against the real gateway, worker and services: amounts priced from
//! tokens match the book, each charge's answer and ledger row carry the same receipt, a
//! change applies on every gateway within 5 s and is audited, a priced settle is capped at its
//! hold, bad input changes nothing, usage events record their book cost.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::credits::{post_keyed, read};
use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(5);

async fn set_price(app: &TestApp, body: Value) -> (u16, Value) {
    let (status, body, _) = read(app.put("/api/admin/pricing", &admin_token(), &body).await).await;
    (status, body)
}

async fn price(app: &TestApp, provider: &str, model: &str, p: i64, c: i64, k: i64) {
    let body = json!({"provider": provider, "model": model, "prompt_per_mtok": p,
                      "completion_per_mtok": c, "cached_per_mtok": k});
    let (status, answer) = set_price(app, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["prompt_per_mtok"], p, "{answer}");
}

async fn consume(app: &TestApp, user: &str, token: &str, body: Value) -> (u16, Value, bool) {
    let path = format!("/api/users/{user}/credits/consume");
    read(app.post(&path, token, &body).await).await
}

/// The ledger row's `price` and amount, once the worker has written it.
async fn ledger_price(app: &TestApp, tx: &str) -> (Value, i64) {
    let id: Uuid = tx.parse().unwrap();
    app.eventually(Duration::from_secs(10), || async {
        sqlx::query_as::<_, (Option<Value>, i64)>(
            "select price, amount from credit_transactions where id = $1",
        )
        .bind(id)
        .fetch_optional(&app.pg)
        .await
        .unwrap()
        .map(|(p, a)| (p.unwrap_or(Value::Null), a))
    })
    .await
}

#[tokio::test]
async fn amounts_priced_from_tokens_match_the_book_and_the_answers_receipt_is_the_ledgers() {
    let app = spawn_app().await;
    app.start_worker().await;
    price(&app, "openai", "*", 1_000, 2_000, 0).await;
    price(&app, "openai", "gpt-4o", 5_000, 15_000, 500).await;
    let (user, token) = new_user();

    // The model's entry: 1000·5000 + 100·15000 + 2000·500 = 7.5e6 → ⌈7.5⌉ = 8.
    let (status, a, _) = consume(
        &app,
        &user,
        &token,
        json!({"provider": "openai", "model": "gpt-4o",
        "prompt_tokens": 1000, "completion_tokens": 100, "cached_tokens": 2000}),
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["amount"], 8);
    assert_eq!(a["balance"], 92);
    let receipt = json!({"provider": "openai", "model": "gpt-4o", "prompt_per_mtok": 5000,
        "completion_per_mtok": 15000, "cached_per_mtok": 500, "prompt_tokens": 1000,
        "completion_tokens": 100, "cached_tokens": 2000});
    assert_eq!(a["price"], receipt);

    // The provider's default, and at least one credit for a single token.
    let (status, b, _) = consume(
        &app,
        &user,
        &token,
        json!({"provider": "openai", "model": "gpt-3.5", "completion_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["amount"], 1);
    assert_eq!(b["price"]["model"], "*");
    assert_eq!(b["price"]["prompt_tokens"], 0);

    // An explicit amount is charged as sent, without a receipt.
    let (status, c, _) = consume(
        &app,
        &user,
        &token,
        json!({"amount": 3, "provider": "openai",
        "model": "gpt-4o", "prompt_tokens": 1_000_000}),
    )
    .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["amount"], 3);
    assert!(c.get("price").is_none(), "{c}");

    for (answer, amount) in [(&a, 8), (&b, 1), (&c, 3)] {
        let (row_price, row_amount) =
            ledger_price(&app, answer["transaction_id"].as_str().unwrap()).await;
        assert_eq!(row_amount, -amount);
        assert_eq!(
            row_price,
            answer.get("price").cloned().unwrap_or(Value::Null)
        );
    }
    let cached: Option<i64> =
        sqlx::query_scalar("select cached_tokens from credit_transactions where id = $1")
            .bind(
                a["transaction_id"]
                    .as_str()
                    .unwrap()
                    .parse::<Uuid>()
                    .unwrap(),
            )
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(cached, Some(2000));
    // The dashboard's ledger read shows the same receipt.
    let r = app
        .get(&format!("/api/users/{user}/credits/transactions"), &token)
        .await;
    let page: Value = r.json().await.unwrap();
    let row = page["transactions"]
        .as_array()
        .expect("a list of rows")
        .iter()
        .find(|t| t["id"] == a["transaction_id"])
        .cloned()
        .expect("the priced row");
    assert_eq!(row["price"], receipt, "{row}");
    // GET /api/pricing lists the book for any signed-in user.
    let r = app.get("/api/pricing", &token).await;
    assert_eq!(r.status(), 200);
    let book: Value = r.json().await.unwrap();
    let models: Vec<&str> = book["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["*", "gpt-4o"]);
}

#[tokio::test]
async fn a_price_change_applies_on_every_gateway_within_5_s_and_is_audited() {
    let app = spawn_app().await;
    let twin = spawn_twin(&app).await;
    let (user, token) = new_user();
    price(&app, "anthropic", "*", 1_000_000, 0, 0).await;
    let body = json!({"provider": "anthropic", "model": "claude", "prompt_tokens": 2});
    // The twin's book (a GET is free, a consume would spend the balance while polling).
    let twin_rate = || async {
        let book: Value = twin.get("/api/pricing", &token).await.json().await.unwrap();
        book["entries"][0]["prompt_per_mtok"].as_i64()
    };
    twin.eventually(WITHIN, || async {
        (twin_rate().await == Some(1_000_000)).then_some(())
    })
    .await;
    let (status, a, _) = consume(&twin, &user, &token, body.clone()).await;
    assert_eq!((status, a["amount"].clone()), (200, json!(2)), "{a}");
    // A change made on one gateway: at once there, within 5 s on the other.
    let started = tokio::time::Instant::now();
    price(&app, "anthropic", "*", 3_000_000, 0, 0).await;
    let (status, a, _) = consume(&app, &user, &token, body.clone()).await;
    assert_eq!((status, a["amount"].clone()), (200, json!(6)), "{a}");
    twin.eventually(WITHIN, || async {
        (twin_rate().await == Some(3_000_000)).then_some(())
    })
    .await;
    assert!(started.elapsed() < WITHIN);
    let (status, a, _) = consume(&twin, &user, &token, body.clone()).await;
    assert_eq!(
        (
            status,
            a["amount"].clone(),
            a["price"]["prompt_per_mtok"].clone()
        ),
        (200, json!(6), json!(3_000_000))
    );
    let audited = app
        .count("select count(*) from audit_log where action = 'pricing.set' and target = 'anthropic/*' \
                and actor = 'admin_1' and details->>'prompt_per_mtok' = '3000000' \
                and details->'previous'->>'prompt_per_mtok' = '1000000'")
        .await;
    assert_eq!(audited, 1);
    // Not an admin: 403, and nothing changes.
    let r = app
        .put(
            "/api/admin/pricing",
            &token,
            &json!({"provider": "anthropic", "model": "*",
        "prompt_per_mtok": 0, "completion_per_mtok": 0}),
        )
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        app.count("select prompt_per_mtok from price_book where provider = 'anthropic'")
            .await,
        3_000_000
    );
}

#[tokio::test]
async fn a_settle_priced_past_its_hold_is_capped_at_the_held_amount_and_replays_its_receipt() {
    let app = spawn_app().await;
    app.start_worker().await;
    price(&app, "openai", "*", 1_000_000, 0, 0).await;
    let (user, token) = new_user();
    let (status, hold, _) = read(
        app.post(
            &format!("/api/users/{user}/credits/holds"),
            &token,
            &json!({"amount": 5}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{hold}");
    let settle = format!(
        "/api/users/{user}/credits/holds/{}/settle",
        hold["hold_id"].as_str().unwrap()
    );
    let body = json!({"provider": "openai", "model": "gpt", "prompt_tokens": 8});
    let (status, s, _) = read(app.post(&settle, &token, &body).await).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        (
            s["amount"].clone(),
            s["released"].clone(),
            s["capped"].clone()
        ),
        (json!(5), json!(0), json!(true))
    );
    assert_eq!(s["price"]["prompt_tokens"], 8);
    assert_eq!(s["balance"], 95);
    // Settling again answers the first settle, receipt included.
    let (status, again, replayed) = read(app.post(&settle, &token, &body).await).await;
    assert_eq!((status, replayed), (200, true));
    assert_eq!(again, s);
    let (row_price, row_amount) = ledger_price(&app, s["transaction_id"].as_str().unwrap()).await;
    assert_eq!((row_price, row_amount), (s["price"].clone(), -5));
    // Within the hold: not capped, and the answer says nothing of a cap.
    let (_, hold, _) = read(
        app.post(
            &format!("/api/users/{user}/credits/holds"),
            &token,
            &json!({"amount": 5}),
        )
        .await,
    )
    .await;
    let settle = format!(
        "/api/users/{user}/credits/holds/{}/settle",
        hold["hold_id"].as_str().unwrap()
    );
    let (status, s, _) = read(
        app.post(
            &settle,
            &token,
            &json!({"provider": "openai", "model": "gpt", "prompt_tokens": 2}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        (s["amount"].clone(), s["released"].clone()),
        (json!(2), json!(3))
    );
    assert!(s.get("capped").is_none(), "{s}");
    app.eventually(Duration::from_secs(10), || async {
        let bal = app
            .count(&format!(
                "select credits_balance from users where id = '{user}'"
            ))
            .await;
        (bal == 93).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_idempotent_retry_of_a_priced_consume_replays_the_same_price_with_one_ledger_row() {
    let app = spawn_app().await;
    app.start_worker().await;
    price(&app, "openai", "*", 2_000_000, 0, 0).await;
    let (user, token) = new_user();
    let path = format!("/api/users/{user}/credits/consume");
    let body = json!({"provider": "openai", "model": "m", "prompt_tokens": 3});
    let (status, first, _) = read(post_keyed(&app, &path, &token, &body, Some("k-1")).await).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["amount"], 6);
    // The book changes between the two: the retry still answers the first price.
    price(&app, "openai", "*", 9_000_000, 0, 0).await;
    let (status, again, replayed) =
        read(post_keyed(&app, &path, &token, &body, Some("k-1")).await).await;
    assert_eq!((status, replayed), (200, true));
    assert_eq!(again, first);
    let tx = first["transaction_id"].as_str().unwrap();
    let (row_price, _) = ledger_price(&app, tx).await;
    assert_eq!(row_price, first["price"]);
    let rows = app
        .count(&format!("select count(*) from credit_transactions where user_id = '{user}' and kind = 'consume'"))
        .await;
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn bad_prices_and_tokens_are_refused_naming_the_field_and_charge_nothing() {
    let app = spawn_app().await;
    app.start_worker().await;
    price(&app, "openai", "*", 1_000, 1_000, 0).await;
    let good = json!({"provider": "openai", "model": "gpt", "prompt_per_mtok": 1, "completion_per_mtok": 1});
    for (member, bad) in [
        ("prompt_per_mtok", json!(-1)),
        ("completion_per_mtok", json!(1.5)),
        ("cached_per_mtok", json!(9_007_199_254_740_992i64)),
        ("model", json!("gpt\u{0}")),
        ("provider", json!("")),
    ] {
        let mut body = good.clone();
        body[member] = bad.clone();
        let (status, e) = set_price(&app, body).await;
        assert_eq!(status, 422, "{member}: {bad} → {e}");
        assert_eq!(e["code"], "validation_failed");
        assert!(e["detail"].as_str().unwrap().contains(member), "{e}");
    }
    assert_eq!(app.count("select count(*) from price_book").await, 1);
    assert_eq!(
        app.count("select count(*) from audit_log where action = 'pricing.set'")
            .await,
        1
    );

    let (user, token) = new_user();
    for (body, field) in [
        (
            json!({"provider": "openai", "model": "gpt", "prompt_tokens": 9_223_372_036_854_775_807i64}),
            "prompt_tokens",
        ),
        (
            json!({"provider": "openai", "model": "gpt", "cached_tokens": 9_223_372_036_854_775_808u64}),
            "cached_tokens",
        ),
        (
            json!({"provider": "mistral", "model": "large", "prompt_tokens": 5}),
            "provider",
        ),
        (
            json!({"provider": "openai", "model": "g\u{0}", "prompt_tokens": 5}),
            "model",
        ),
        (json!({"provider": "openai", "prompt_tokens": 5}), "model"),
        (
            json!({"provider": "openai", "model": "gpt", "prompt_tokens": 0}),
            "amount",
        ),
        (json!({"provider": "openai", "model": "gpt"}), "amount"),
        (
            json!({"amount": 1.0, "provider": "openai", "model": "gpt"}),
            "amount",
        ),
    ] {
        let (status, e, _) = consume(&app, &user, &token, body.clone()).await;
        assert_eq!(status, 422, "{body} → {e}");
        assert!(
            e["detail"].as_str().unwrap().contains(field),
            "{body} → {e}"
        );
    }
    if let Some(msg) = consume(
        &app,
        &user,
        &token,
        json!({"provider": "mistral", "model": "large", "prompt_tokens": 5}),
    )
    .await
    .1["detail"]
        .as_str()
    {
        assert!(msg.contains("mistral") && msg.contains("large"), "{msg}");
    }
    // Nothing was charged: the starting grant is the only ledger row.
    let bal = app
        .get("/api/vscode/user/balance", &token)
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(bal["balance"], 100);
    let (_, ok, _) = consume(&app, &user, &token, json!({"amount": 1})).await;
    ledger_price(&app, ok["transaction_id"].as_str().unwrap()).await;
    let rows = app
        .count(&format!(
            "select count(*) from credit_transactions where user_id = '{user}'"
        ))
        .await;
    assert_eq!(rows, 2);
}

#[tokio::test]
async fn usage_events_record_their_book_cost_and_keep_the_clients_own_figure_untrusted() {
    let app = spawn_app().await;
    app.start_worker().await;
    price(&app, "openai", "*", 1_000_000, 2_000_000, 0).await;
    let (user, token) = new_user();
    let r = app.post("/api/vscode/usage/track", &token, &json!({"events": [
        {"kind": "model", "provider": "openai", "model": "gpt", "prompt_tokens": 3, "completion_tokens": 2},
        {"kind": "model", "provider": "nobody", "model": "x", "prompt_tokens": 3, "completion_tokens": 2},
    ]})).await;
    assert_eq!(r.status(), 202);
    let ids: Value = r.json().await.unwrap();
    // The original client's shape, with its own cost: kept in metadata, not used.
    let r = app
        .post(
            "/api/vscode/usage/track",
            &token,
            &json!({"modelId": "openai/gpt-4o", "tokensUsed": 10, "costInCredits": 999}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let legacy: Value = r.json().await.unwrap();
    let credits_of = |id: &str| {
        let id: Uuid = id.parse().unwrap();
        let app = &app;
        async move {
            app.eventually(Duration::from_secs(10), || async {
                sqlx::query_as::<_, (Option<i64>, Option<Value>)>(
                    "select credits, metadata from model_usage where id = $1",
                )
                .bind(id)
                .fetch_optional(&app.pg)
                .await
                .unwrap()
            })
            .await
        }
    };
    let (credits, _) = credits_of(ids["event_ids"][0].as_str().unwrap()).await;
    assert_eq!(credits, Some(7));
    let (credits, _) = credits_of(ids["event_ids"][1].as_str().unwrap()).await;
    assert_eq!(credits, None);
    let (credits, meta) = credits_of(legacy["event_ids"][0].as_str().unwrap()).await;
    assert_eq!(credits, Some(10));
    assert_eq!(meta.unwrap()["cost_in_credits"], 999);
    // Usage moves no credits.
    let bal = app
        .get("/api/vscode/user/balance", &token)
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(bal["balance"], 100);
    let moved = format!(
        "select count(*) from credit_transactions where user_id = '{user}' and kind <> 'grant'"
    );
    assert_eq!(app.count(&moved).await, 0);
}
