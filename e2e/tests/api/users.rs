//! Profiles and preferences (docs/api.md "Profile").

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::auth::assert_problem;
use crate::helpers::*;

async fn patch_preferences(
    app: &TestApp,
    id: &str,
    token: &str,
    body: &Value,
) -> reqwest::Response {
    app.client
        .patch(app.url(&format!("/api/users/{id}/preferences")))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("request")
}

fn rfc3339(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("{v} is not a string"));
    DateTime::parse_from_rfc3339(s)
        .expect(s)
        .with_timezone(&Utc)
}

#[tokio::test]
async fn a_fresh_profile_has_every_member_of_the_spec() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    let r = app.get(&format!("/api/users/{id}/profile"), &token).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("ratelimit-limit"));
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["user_id"], id.as_str());
    assert_eq!(p["email"], format!("{id}@example.com"));
    assert!(p["name"].is_null());
    assert_eq!(p["plan"], "free");
    assert_eq!(p["status"], "active");
    rfc3339(&p["created_at"]);
    assert!(p.as_object().unwrap().contains_key("last_active_at"));
    assert_eq!(p["credits"]["balance"], 100);
    assert_eq!(p["credits"]["held"], 0);
    assert!(p["credits"].as_object().unwrap().contains_key("as_of"));
    assert!(p["subscription"].is_null());
    assert_eq!(p["preferences"], json!({}));
    assert_eq!(
        p["vscode"],
        json!({"active_sessions": 0, "last_extension_version": null, "last_seen_at": null})
    );
}

#[tokio::test]
async fn the_profile_shows_the_latest_subscription_and_the_live_sessions() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    // Provisions the user without reading (and so caching) the profile: the
    // rows below are written behind the worker's back, which the profile
    // cache does not see until the worker commits something for this user.
    assert_eq!(
        app.get("/api/vscode/user/balance", &token).await.status(),
        200
    );
    sqlx::query(
        "insert into subscriptions (id, user_id, plan, status, created_at) values \
         (gen_random_uuid(), $1, 'pro', 'canceled', now() - interval '40 days'), \
         (gen_random_uuid(), $1, 'team', 'active', now() - interval '1 day')",
    )
    .bind(&id)
    .execute(&app.pg)
    .await
    .unwrap();
    sqlx::query(
        "insert into vscode_sessions (id, user_id, extension_version, last_seen_at, expires_at) values \
         ($2, $1, '1.2.0', now() - interval '2 days', now() - interval '1 day'), \
         ($3, $1, '1.4.0', now() - interval '1 minute', now() + interval '1 day'), \
         ($4, $1, '1.3.0', now() - interval '1 hour', now() + interval '1 day')",
    )
    .bind(&id)
    .bind(format!("s1_{id}"))
    .bind(format!("s2_{id}"))
    .bind(format!("s3_{id}"))
    .execute(&app.pg)
    .await
    .unwrap();
    sqlx::query(
        "update users set name = 'Ada', preferences = '{\"theme\": \"dark\"}' where id = $1",
    )
    .bind(&id)
    .execute(&app.pg)
    .await
    .unwrap();

    let p: Value = app
        .get(&format!("/api/users/{id}/profile"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(p["name"], "Ada");
    assert_eq!(p["preferences"], json!({"theme": "dark"}));
    assert_eq!(p["subscription"]["plan"], "team");
    assert_eq!(p["subscription"]["status"], "active");
    rfc3339(&p["subscription"]["created_at"]);
    assert_eq!(p["vscode"]["active_sessions"], 2);
    assert_eq!(p["vscode"]["last_extension_version"], "1.4.0");
    let seen = rfc3339(&p["vscode"]["last_seen_at"]);
    assert!((Utc::now() - seen).num_seconds().abs() < 120, "{seen}");
}

#[tokio::test]
async fn a_malformed_user_id_in_the_path_is_404_even_for_an_admin() {
    let app = spawn_app().await;
    let (_, token) = new_user();
    let long = "a".repeat(65);
    for id in ["a%20b", "%C3%BCser", long.as_str(), "a.b", "%FF"] {
        for t in [token.as_str(), &admin_token()] {
            let r = app.get(&format!("/api/users/{id}/profile"), t).await;
            assert_problem(r, 404, "not_found").await;
            let r = patch_preferences(&app, id, t, &json!({"theme": "dark"})).await;
            assert_problem(r, 404, "not_found").await;
        }
    }
    assert_eq!(
        app.count("select count(*) from users where id <> 'admin_1'")
            .await,
        1
    );
}

/// Polls the profile until the worker has stored exactly these preferences.
async fn preferences_become(app: &TestApp, id: &str, token: &str, want: Value) {
    let path = format!("/api/users/{id}/profile");
    let (path, want) = (&path, &want);
    app.eventually(Duration::from_secs(10), || async move {
        let p: Value = app.get(path, token).await.json().await.ok()?;
        (p["preferences"] == *want).then_some(())
    })
    .await
}

#[tokio::test]
async fn patching_preferences_answers_202_and_a_worker_merges_them() {
    let app = spawn_app().await;
    app.start_worker_on(&["users"]).await;
    let (id, token) = new_user();
    let r = patch_preferences(
        &app,
        &id,
        &token,
        &json!({"theme": "dark", "font_size": 12}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["accepted"], true);
    assert!(uuid::Uuid::parse_str(body["event_id"].as_str().unwrap()).is_ok());
    preferences_become(&app, &id, &token, json!({"theme": "dark", "font_size": 12})).await;

    let r = patch_preferences(
        &app,
        &id,
        &token,
        &json!({"font_size": 14, "telemetry": false}),
    )
    .await;
    assert_eq!(r.status(), 202);
    preferences_become(
        &app,
        &id,
        &token,
        json!({"theme": "dark", "font_size": 14, "telemetry": false}),
    )
    .await;

    // An admin may change anyone's preferences.
    let r = patch_preferences(&app, &id, &admin_token(), &json!({"theme": "light"})).await;
    assert_eq!(r.status(), 202);
    preferences_become(
        &app,
        &id,
        &token,
        json!({"theme": "light", "font_size": 14, "telemetry": false}),
    )
    .await;
}

#[tokio::test]
async fn preferences_must_be_a_json_object_of_at_most_8_kib() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    for body in [json!([1, 2]), json!("dark"), json!(null), json!(3)] {
        let r = patch_preferences(&app, &id, &token, &body).await;
        assert_problem(r, 422, "validation_failed").await;
    }
    let big = json!({"blob": "x".repeat(9 * 1024)});
    assert_problem(
        patch_preferences(&app, &id, &token, &big).await,
        413,
        "payload_too_large",
    )
    .await;
    let fits = json!({"blob": "x".repeat(8 * 1024 - 16)});
    assert_eq!(
        patch_preferences(&app, &id, &token, &fits).await.status(),
        202
    );

    let url = app.url(&format!("/api/users/{id}/preferences"));
    let r = app
        .client
        .patch(&url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "validation_failed").await;
    let r = app
        .client
        .patch(&url)
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(r, 415, "unsupported_media_type").await;
}

/// docs/reliability.md: the merged preferences are at most `users.max_preferences_bytes`
/// (compact JSON). A patch whose merge would pass it is 422 naming
/// `preferences` and is not published; replacing a member counts only the
/// difference; the gateway's ledger of sizes is seeded from Postgres when
/// it is missing.
#[tokio::test]
async fn a_patch_whose_merge_would_exceed_the_bound_is_422_and_not_published() {
    let app = spawn_app_with(|v| {
        v.insert("APP__USERS__MAX_PREFERENCES_BYTES".into(), "200".into());
    })
    .await;
    app.start_worker_on(&["users"]).await;
    let (id, token) = new_user();
    // {"a":"x…"}: 108 bytes.
    let a100 = json!({"a": "x".repeat(100)});
    assert_eq!(
        patch_preferences(&app, &id, &token, &a100).await.status(),
        202
    );
    // Adding b would make 215.
    let b100 = json!({"b": "y".repeat(100)});
    let problem = assert_problem(
        patch_preferences(&app, &id, &token, &b100).await,
        422,
        "validation_failed",
    )
    .await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .starts_with("preferences"),
        "{problem}"
    );
    // Replacing a counts the new value only: 158, then c: 164.
    let a150 = "z".repeat(150);
    let r = patch_preferences(&app, &id, &token, &json!({"a": a150})).await;
    assert_eq!(r.status(), 202);
    let r = patch_preferences(&app, &id, &token, &json!({"c": 1})).await;
    assert_eq!(r.status(), 202);
    preferences_become(&app, &id, &token, json!({"a": a150, "c": 1})).await;

    // Without the ledger (a Redis loss, or long idle) the base is Postgres.
    {
        let mut conn = app.redis.get().await.unwrap();
        let key = format!("{}:{{{id}}}:prefs_size", app.settings.redis.key_prefix);
        let n: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut *conn)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    // d of 30 would make 201; of 29, exactly 200.
    let r = patch_preferences(&app, &id, &token, &json!({"d": "w".repeat(30)})).await;
    assert_problem(r, 422, "validation_failed").await;
    let d29 = "w".repeat(29);
    let r = patch_preferences(&app, &id, &token, &json!({"d": d29})).await;
    assert_eq!(r.status(), 202);
    let want = json!({"a": a150, "c": 1, "d": d29});
    assert_eq!(serde_json::to_vec(&want).unwrap().len(), 200);
    preferences_become(&app, &id, &token, want).await;
}
