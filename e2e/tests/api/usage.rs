//! usage/track end to end: HTTP → RabbitMQ → worker → Postgres.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

fn model_event(model: &str, pt: i64) -> Value {
    json!({"event_id": uuid::Uuid::new_v4(), "kind": "model", "provider": "openai", "model": model,
           "prompt_tokens": pt, "completion_tokens": 2, "metadata": {"file": "a.rs"}})
}

fn feature_event(feature: &str) -> Value {
    json!({"event_id": uuid::Uuid::new_v4(), "kind": "feature", "feature": feature, "action": "open"})
}

async fn stored(app: &TestApp, user: &str) -> (i64, i64) {
    let m = sqlx::query_scalar::<_, i64>("select count(*) from model_usage where user_id = $1")
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    let f = sqlx::query_scalar::<_, i64>("select count(*) from feature_usage where user_id = $1")
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    (m, f)
}

#[tokio::test]
async fn a_batch_posted_over_http_is_stored_exactly_once_even_when_resent() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let events: Vec<Value> = (0..30)
        .map(|i| {
            if i % 3 == 0 {
                feature_event("chat")
            } else {
                model_event("gpt-4o", i)
            }
        })
        .collect();
    let body = json!({"events": events});
    let r = app.post("/api/vscode/usage/track", &token, &body).await;
    assert_eq!(r.status(), 202);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["accepted"], 30);
    let ids: Vec<String> = answer["event_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let sent: Vec<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, sent, "client event ids are kept");
    app.eventually(Duration::from_secs(10), || async {
        (stored(&app, &user).await == (20, 10)).then_some(())
    })
    .await;

    // The same batch again, and once more concurrently with itself.
    let (a, b) = tokio::join!(
        app.post("/api/vscode/usage/track", &token, &body),
        app.post("/api/vscode/usage/track", &token, &body)
    );
    assert_eq!(a.status(), 202);
    assert_eq!(b.status(), 202);
    // A marker event sent after the resends: once it is stored, the resends were handled.
    let marker = feature_event("marker");
    let r = app.post("/api/vscode/usage/track", &token, &marker).await;
    assert_eq!(r.status(), 202);
    app.eventually(Duration::from_secs(10), || async {
        (stored(&app, &user).await.1 == 11).then_some(())
    })
    .await;
    assert_eq!(stored(&app, &user).await, (20, 11));
    let guard: i64 = sqlx::query_scalar("select count(*) from usage_event_ids where user_id = $1")
        .bind(&user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(guard, 31);
    let rollup: (i64, i64) = sqlx::query_as(
        "select coalesce(sum(requests) filter (where kind = 'model'), 0)::int8, coalesce(sum(requests) filter (where kind = 'feature'), 0)::int8 from usage_daily where user_id = $1",
    )
    .bind(&user)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(rollup, (20, 11), "the rollup counts each event once");
}

#[tokio::test]
async fn an_invalid_event_refuses_the_whole_request_and_stores_nothing() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let far_future = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    let long_ago = (chrono::Utc::now() - chrono::Duration::days(31)).to_rfc3339();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"kind": "model", "provider": "openai", "model": "m", "prompt_tokens": -1, "completion_tokens": 0}),
            "prompt_tokens",
        ),
        (
            json!({"kind": "model", "provider": "x".repeat(65), "model": "m", "prompt_tokens": 1, "completion_tokens": 0}),
            "provider",
        ),
        (
            json!({"kind": "model", "provider": "p", "model": "x".repeat(129), "prompt_tokens": 1, "completion_tokens": 0}),
            "model",
        ),
        (
            json!({"kind": "model", "provider": "p", "model": "m", "prompt_tokens": 1}),
            "completion_tokens",
        ),
        (
            json!({"kind": "feature", "feature": "x".repeat(65)}),
            "feature",
        ),
        (
            json!({"kind": "feature", "feature": "f", "duration_ms": 1.5}),
            "duration_ms",
        ),
        (
            json!({"kind": "feature", "feature": "f", "occurred_at": far_future}),
            "occurred_at",
        ),
        (
            json!({"kind": "feature", "feature": "f", "occurred_at": long_ago}),
            "occurred_at",
        ),
        (
            json!({"kind": "feature", "feature": "f", "metadata": {"x": "y".repeat(5000)}}),
            "metadata",
        ),
        (
            json!({"kind": "feature", "feature": "f", "event_id": "nope"}),
            "event_id",
        ),
        (json!({"kind": "other"}), "kind"),
    ];
    for (bad, field) in cases {
        let body = json!({"events": [feature_event("ok"), feature_event("ok"), bad]});
        let r = app.post("/api/vscode/usage/track", &token, &body).await;
        assert_eq!(r.status(), 422, "{field}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["code"], "validation_failed");
        let detail = p["detail"].as_str().unwrap();
        assert!(detail.contains(&format!("events[2].{field}")), "{detail}");
    }
    let too_many: Vec<Value> = (0..501).map(|_| feature_event("x")).collect();
    let r = app
        .post(
            "/api/vscode/usage/track",
            &token,
            &json!({"events": too_many}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let r = app
        .client
        .post(app.url("/api/vscode/usage/track"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .client
        .post(app.url("/api/vscode/usage/track"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = app
        .client
        .post(app.url("/api/vscode/usage/track"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Then a valid marker: once it lands, nothing else did.
    let marker = feature_event("marker");
    assert_eq!(
        app.post("/api/vscode/usage/track", &token, &marker)
            .await
            .status(),
        202
    );
    app.eventually(Duration::from_secs(10), || async {
        (stored(&app, &user).await.1 == 1).then_some(())
    })
    .await;
    assert_eq!(stored(&app, &user).await, (0, 1));
}

#[tokio::test]
async fn the_original_clients_usage_body_lands_as_a_model_usage_row() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    // The original client validates its session token before it tracks with it.
    let v = app
        .post(
            "/api/vscode/session/validate",
            &token,
            &json!({"sessionToken": "tok_abcdefgh", "extensionVersion": "1.0.0"}),
        )
        .await;
    assert_eq!(v.status(), 200);
    let session: Value = v.json().await.unwrap();
    let body = json!({"sessionToken": "tok_abcdefgh", "action": "completion", "modelId": "anthropic/claude-3-haiku", "tokensUsed": 321, "costInCredits": 2});
    let r = app.post("/api/vscode/usage/track", &token, &body).await;
    assert_eq!(r.status(), 202);
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["success"], true);
    assert_eq!(a["remainingCredits"], 100);
    let id = uuid::Uuid::parse_str(a["event_ids"][0].as_str().unwrap()).unwrap();
    let row: (String, String, i64, i64, Value, Option<String>) = app
        .eventually(Duration::from_secs(10), || async {
            sqlx::query_as("select provider, model, prompt_tokens, completion_tokens, metadata, session_id from model_usage where id = $1")
                .bind(id)
                .fetch_optional(&app.pg)
                .await
                .unwrap()
        })
        .await;
    assert_eq!(row.0, "anthropic");
    assert_eq!(row.1, "anthropic/claude-3-haiku");
    assert_eq!((row.2, row.3), (321, 0));
    assert_eq!(row.4, json!({"action": "completion", "cost_in_credits": 2}));
    assert_eq!(
        row.5.as_deref(),
        session["session_id"].as_str(),
        "the token resolves to the session it names"
    );
    let balance: i64 = sqlx::query_scalar("select credits_balance from users where id = $1")
        .bind(&user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(balance, 100, "usage never moves credits");
}

#[tokio::test]
async fn usage_answers_503_when_the_broker_is_unreachable() {
    let app = spawn_app().await;
    let dead = spawn_dead_broker_twin(&app).await;
    let (_, token) = new_user();
    let r = dead
        .post("/api/vscode/usage/track", &token, &feature_event("chat"))
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["code"], "unavailable");
    let r = dead.client.get(dead.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["dependencies"]["rabbitmq"], "down");
}
