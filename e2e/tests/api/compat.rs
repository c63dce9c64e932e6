//! The original backend's client and scripts (docs/compatibility.md): their request
//! members are understood and their response members are present.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

/// session_id, model, provider, prompt_tokens, description, amount of a ledger row.
type LedgerRow = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    i64,
);

#[tokio::test]
async fn consume_takes_the_original_members_and_answers_success_and_remaining_credits() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let body = json!({"amount": 4, "description": "completion", "sessionId": "sess_abc",
                      "modelId": "openai/gpt-4o", "provider": "openai", "tokensUsed": 321});
    let r = app
        .post(&format!("/api/users/{user}/credits/consume"), &token, &body)
        .await;
    assert_eq!(r.status(), 200);
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["success"], true);
    assert_eq!(a["remaining_credits"], 96);
    assert_eq!(a["balance"], 96);
    let id = uuid::Uuid::parse_str(a["transaction_id"].as_str().unwrap()).unwrap();
    let row: LedgerRow = app
        .eventually(Duration::from_secs(10), || async {
            sqlx::query_as("select session_id, model, provider, prompt_tokens, description, amount from credit_transactions where id = $1")
                .bind(id)
                .fetch_optional(&app.pg)
                .await
                .unwrap()
        })
        .await;
    assert_eq!(row.0.as_deref(), Some("sess_abc"));
    assert_eq!(row.1.as_deref(), Some("openai/gpt-4o"));
    assert_eq!(row.2.as_deref(), Some("openai"));
    assert_eq!(row.3, Some(321));
    assert_eq!(row.4.as_deref(), Some("completion"));
    assert_eq!(row.5, -4);
    // The user's own state changes land in the audit trail, once each.
    let audited: (i64, Value) = sqlx::query_as(
        "select count(*) over (), details from audit_log where target = $1 and action = 'credits.consume'",
    )
    .bind(&user)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(audited.0, 1);
    assert_eq!(audited.1["amount"], 4);
    let r = app
        .client
        .patch(app.url(&format!("/api/users/{user}/preferences")))
        .bearer_auth(&token)
        .json(&json!({"theme": "dark"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let details: Value = app
        .eventually(Duration::from_secs(10), || async {
            sqlx::query_scalar(
                "select details from audit_log where target = $1 and action = 'user.preferences'",
            )
            .bind(&user)
            .fetch_optional(&app.pg)
            .await
            .unwrap()
        })
        .await;
    assert_eq!(details, json!({"keys": ["theme"]}));
}

#[tokio::test]
async fn the_clients_read_routes_answer_their_members() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let b: Value = app
        .get("/api/vscode/user/balance", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["balance"], 100);
    assert_eq!(b["held"], 0);
    assert!(b.get("as_of").is_some());
    assert_eq!(b["plan"], "free");

    let s: Value = app
        .get("/api/vscode/user/subscription", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(s["plan"], "free");
    assert_eq!(s["status"], "active");
    assert!(s["subscription"].is_null());
    sqlx::query(
        "insert into subscriptions (id, user_id, plan, status) values ($1, $2, 'pro', 'active')",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(&user)
    .execute(&app.pg)
    .await
    .unwrap();
    let s: Value = app
        .get("/api/vscode/user/subscription", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(s["subscription"]["plan"], "pro");
    assert_eq!(s["subscription"]["status"], "active");

    let named = hs_token(
        &json!({"sub": user, "exp": now() + 3600, "email": "ada@example.com", "name": "Ada King Lovelace"}),
    );
    let u: Value = app
        .get("/api/auth/user-info", &named)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(u["user_id"], user.as_str());
    assert_eq!(u["email"], "ada@example.com");
    assert_eq!(u["firstName"], "Ada");
    assert_eq!(u["lastName"], "King Lovelace");
    assert_eq!(u["plan"], "free");
}

#[tokio::test]
async fn every_error_body_carries_the_originals_error_and_message() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let checks = [
        app.get("/api/vscode/user/balance", "garbage").await,
        app.post("/api/vscode/usage/track", &token, &json!({"kind": "nope"}))
            .await,
        app.post(
            &format!("/api/users/{user}/credits/consume"),
            &token,
            &json!({"amount": 1_000_000}),
        )
        .await,
        app.get("/api/users/someone_else/profile", &token).await,
    ];
    for r in checks {
        let status = r.status().as_u16();
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["status"], status);
        assert_eq!(p["error"], p["title"], "{p}");
        assert_eq!(p["message"], p["detail"], "{p}");
        assert!(p["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}
