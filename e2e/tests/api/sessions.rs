//! session/validate: Redis-held sessions that slide, never cross users, and
//! are persisted by a worker.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

async fn validate(app: &TestApp, token: &str, body: Value) -> Value {
    let r = app.post("/api/vscode/session/validate", token, &body).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_validated_session_is_answered_from_redis_and_persisted_by_a_worker() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let a = validate(
        &app,
        &token,
        json!({"extension_version": "1.4.0", "platform": "linux", "machine_id": "m-1"}),
    )
    .await;
    assert_eq!(a["status"], "created");
    assert_eq!(a["user"]["user_id"], user.as_str());
    assert_eq!(a["user"]["plan"], "free");
    assert_eq!(a["credits"]["balance"], 100);
    assert_eq!(a["rate_limits"]["usage"]["limit"], 1200);
    assert_eq!(a["rate_limits"]["session"]["window_secs"], 60);
    let id = a["session_id"].as_str().unwrap().to_string();
    let row: (String, String, Option<String>) = app
        .eventually(Duration::from_secs(10), || async {
            sqlx::query_as(
                "select user_id, extension_version, machine_id from vscode_sessions where id = $1",
            )
            .bind(&id)
            .fetch_optional(&app.pg)
            .await
            .unwrap()
        })
        .await;
    assert_eq!(
        row,
        (user.clone(), "1.4.0".to_string(), Some("m-1".to_string()))
    );

    let first_expiry = a["expires_at"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = validate(
        &app,
        &token,
        json!({"session_id": id, "extension_version": "1.5.0"}),
    )
    .await;
    assert_eq!(b["status"], "active");
    assert_eq!(b["session_id"], id.as_str());
    assert!(
        b["expires_at"].as_str().unwrap() > first_expiry.as_str(),
        "expiry slides forward"
    );
    app.eventually(Duration::from_secs(10), || async {
        let v: Option<String> =
            sqlx::query_scalar("select extension_version from vscode_sessions where id = $1")
                .bind(&id)
                .fetch_optional(&app.pg)
                .await
                .unwrap();
        (v.as_deref() == Some("1.5.0")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sessions_never_cross_users() {
    let app = spawn_app().await;
    let (_, alice) = new_user();
    let (_, bob) = new_user();
    let a = validate(&app, &alice, json!({"extension_version": "1.0.0"})).await;
    let id = a["session_id"].as_str().unwrap();
    let b = validate(
        &app,
        &bob,
        json!({"session_id": id, "extension_version": "1.0.0"}),
    )
    .await;
    assert_eq!(b["status"], "created");
    assert_ne!(b["session_id"], a["session_id"]);
    let c = validate(
        &app,
        &alice,
        json!({"session_id": "sess_unknown", "extension_version": "1.0.0"}),
    )
    .await;
    assert_eq!(c["status"], "created");
}

#[tokio::test]
async fn the_original_clients_session_token_finds_its_session_and_is_never_shared() {
    let app = spawn_app().await;
    let (alice_id, alice) = new_user();
    let (_, bob) = new_user();
    let body = json!({"sessionToken": "vscode-tok.12345", "extensionVersion": "2.0.0"});
    let a1 = validate(&app, &alice, body.clone()).await;
    assert_eq!(a1["status"], "created");
    assert_eq!(a1["valid"], true);
    assert_eq!(a1["session"]["id"], a1["session_id"]);
    assert!(a1["session"]["expiresAt"].is_string());
    assert_eq!(a1["user"]["clerkId"], alice_id.as_str());
    assert_eq!(a1["user"]["planType"], "free");
    assert_eq!(a1["user"]["credits"], 100);
    assert_eq!(a1["permissions"], json!(["basic_models", "basic_features"]));
    let a2 = validate(&app, &alice, body.clone()).await;
    assert_eq!(a2["status"], "active");
    assert_eq!(a2["session_id"], a1["session_id"]);
    let b = validate(&app, &bob, body).await;
    assert_eq!(b["status"], "created");
    assert_ne!(b["session_id"], a1["session_id"]);
}

#[tokio::test]
async fn an_old_extension_gets_426_and_bad_versions_422() {
    let app = spawn_app_with(|v| {
        v.insert(
            "APP__SESSIONS__MIN_EXTENSION_VERSION".into(),
            "1.2.0".into(),
        );
    })
    .await;
    let (_, token) = new_user();
    let r = app
        .post(
            "/api/vscode/session/validate",
            &token,
            &json!({"extension_version": "1.1.9"}),
        )
        .await;
    assert_eq!(r.status(), 426);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["code"], "upgrade_required");
    let r = app
        .post(
            "/api/vscode/session/validate",
            &token,
            &json!({"extension_version": "one"}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let r = app
        .post("/api/vscode/session/validate", &token, &json!({}))
        .await;
    assert_eq!(r.status(), 422);
    let r = app
        .post(
            "/api/vscode/session/validate",
            &token,
            &json!({"extension_version": "1.2.0", "session_id": 5}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let r = app
        .post(
            "/api/vscode/session/validate",
            &token,
            &json!({"extension_version": "1.2.0"}),
        )
        .await;
    assert_eq!(r.status(), 200);
}

/// The user's session records in Redis.
async fn session_keys(app: &TestApp, user: &str) -> Vec<String> {
    let mut conn = app.redis.get().await.unwrap();
    let pattern = format!("{}:{{{user}}}:session:*", app.settings.redis.key_prefix);
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut *conn)
        .await
        .unwrap()
}

/// docs/reliability.md: `sessions.max_per_user`; one more evicts the least recently
/// used (by last validation, not by creation).
#[tokio::test]
async fn validating_one_session_past_the_bound_evicts_the_least_recently_used() {
    let app = spawn_app_with(|v| {
        v.insert("APP__SESSIONS__MAX_PER_USER".into(), "3".into());
    })
    .await;
    let (user, token) = new_user();
    let new = json!({"extension_version": "1.4.0"});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let s = validate(&app, &token, new.clone()).await;
        assert_eq!(s["status"], "created");
        ids.push(s["session_id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The oldest created is used again: the second is now the least recent.
    let again = |id: &str| json!({"session_id": id, "extension_version": "1.4.0"});
    assert_eq!(
        validate(&app, &token, again(&ids[0])).await["status"],
        "active"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fourth = validate(&app, &token, new.clone()).await;
    assert_eq!(fourth["status"], "created");
    assert_eq!(session_keys(&app, &user).await.len(), 3);
    tokio::time::sleep(Duration::from_millis(5)).await;

    // The evicted one is gone: validating it makes a new session (which in
    // turn evicts the third, now the least recently used).
    let evicted = validate(&app, &token, again(&ids[1])).await;
    assert_eq!(evicted["status"], "created");
    assert_ne!(evicted["session_id"], ids[1].as_str());
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        validate(&app, &token, again(&ids[0])).await["status"],
        "active"
    );
    let fourth_id = fourth["session_id"].as_str().unwrap();
    assert_eq!(
        validate(&app, &token, again(fourth_id)).await["status"],
        "active"
    );
    assert_eq!(
        validate(&app, &token, again(&ids[2])).await["status"],
        "created"
    );
    let keys = session_keys(&app, &user).await;
    assert_eq!(keys.len(), 3, "{keys:?}");

    // Another user's sessions are not counted against this one.
    let (other, other_token) = new_user();
    validate(&app, &other_token, new.clone()).await;
    assert_eq!(session_keys(&app, &other).await.len(), 1);
    assert_eq!(session_keys(&app, &user).await.len(), 3);
}

/// An evicted session's client token goes with it (no key of the user
/// outlives the bound), and the token then binds a fresh session.
#[tokio::test]
async fn an_evicted_sessions_token_goes_with_it() {
    let app = spawn_app_with(|v| {
        v.insert("APP__SESSIONS__MAX_PER_USER".into(), "1".into());
    })
    .await;
    let (user, token) = new_user();
    let a = validate(
        &app,
        &token,
        json!({"sessionToken": "tok-aaaaaaaa", "extensionVersion": "1.4.0"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    validate(
        &app,
        &token,
        json!({"sessionToken": "tok-bbbbbbbb", "extensionVersion": "1.4.0"}),
    )
    .await;
    let mut conn = app.redis.get().await.unwrap();
    let pattern = format!("{}:{{{user}}}:stoken:*", app.settings.redis.key_prefix);
    let tokens: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut *conn)
        .await
        .unwrap();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert!(tokens[0].ends_with("tok-bbbbbbbb"));
    let again = validate(
        &app,
        &token,
        json!({"sessionToken": "tok-aaaaaaaa", "extensionVersion": "1.4.0"}),
    )
    .await;
    assert_eq!(again["status"], "created");
    assert_ne!(again["session_id"], a["session_id"]);
}
