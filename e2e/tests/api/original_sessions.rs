//! The original backend's clients (docs/compatibility.md): the `X-RateLimit-*` headers on every
//! `/api/` answer, the legacy track's `sessionToken` refused when unknown ("Invalid session"),
//! and one session identity across validate, track and consume. Original bodies, read through
//! HTTP, events driven through the real worker.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::helpers::*;

const TRACK: &str = "/api/vscode/usage/track";
const PROBE: &str = "/api/auth/user-info";
const TEN_SECS: Duration = Duration::from_secs(10);

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The original's three headers: the same limit and room as `RateLimit-*`, the reset an
/// RFC 3339 time in the future.
fn assert_original_headers(r: &reqwest::Response) {
    let what = format!("{} {}", r.status(), r.url().path());
    let limit =
        header(r, "x-ratelimit-limit").unwrap_or_else(|| panic!("{what}: no X-RateLimit-Limit"));
    assert_eq!(Some(limit), header(r, "ratelimit-limit"), "{what}");
    let remaining = header(r, "x-ratelimit-remaining")
        .unwrap_or_else(|| panic!("{what}: no X-RateLimit-Remaining"));
    assert_eq!(Some(remaining), header(r, "ratelimit-remaining"), "{what}");
    let reset =
        header(r, "x-ratelimit-reset").unwrap_or_else(|| panic!("{what}: no X-RateLimit-Reset"));
    let at = DateTime::parse_from_rfc3339(reset).unwrap_or_else(|e| panic!("{what}: {reset}: {e}"));
    assert!(
        at.with_timezone(&Utc) > Utc::now(),
        "{what}: {reset} is not in the future"
    );
}

fn legacy_track(token: Option<&str>) -> Value {
    let mut body = json!({"action": "completion", "modelId": "openai/gpt-4o", "tokensUsed": 12, "costInCredits": 1});
    if let Some(t) = token {
        body["sessionToken"] = json!(t);
    }
    body
}

async fn validate(app: &TestApp, token: &str, session_token: &str) -> Value {
    let body = json!({"sessionToken": session_token, "extensionVersion": "1.4.0"});
    let r = app.post("/api/vscode/session/validate", token, &body).await;
    assert_eq!(r.status(), 200);
    assert_original_headers(&r);
    r.json().await.unwrap()
}

async fn rows(app: &TestApp, sql: &str, user: &str) -> Vec<Option<String>> {
    sqlx::query_scalar(sql)
        .bind(user)
        .fetch_all(&app.pg)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_api_answer_carries_the_original_x_ratelimit_headers_incl_429_and_403() {
    let app = spawn_app_with(|v| {
        v.insert(
            "APP__RATE_LIMIT__CLASSES__PROFILE__LIMIT".into(),
            "2".into(),
        );
    })
    .await;
    let (user, token) = new_user();
    for path in [
        PROBE.to_string(),
        "/api/vscode/analytics".into(),
        format!("/api/users/{user}/usage/stats"),
    ] {
        let r = app.get(&path, &token).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_original_headers(&r);
    }
    validate(&app, &token, "tok-headers-1").await;
    let r = app.post(TRACK, &token, &legacy_track(None)).await;
    assert_eq!(r.status(), 202);
    assert_original_headers(&r);
    // Over the profile class's 2: a 429 with the original's headers, no room left.
    let r = app
        .eventually(TEN_SECS, || async {
            let r = app.get(PROBE, &token).await;
            (r.status() == 429).then_some(r)
        })
        .await;
    assert_original_headers(&r);
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("2"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    // A suspended account's 403.
    let (suspended, stoken) = new_user();
    sqlx::query("insert into users (id, status) values ($1, 'suspended')")
        .bind(&suspended)
        .execute(&app.pg)
        .await
        .unwrap();
    let r = app
        .get(&format!("/api/users/{suspended}/profile"), &stoken)
        .await;
    assert_eq!(r.status(), 403);
    assert_original_headers(&r);
    // A failed authentication's 401.
    let r = app.get(PROBE, "not-a-token").await;
    assert_eq!(r.status(), 401);
    assert_original_headers(&r);
}

#[tokio::test]
async fn an_unknown_session_token_is_401_invalid_session_stores_nothing_and_is_no_failed_auth() {
    let app = spawn_app_with(|v| {
        v.insert("APP__RATE_LIMIT__AUTH_FAILURES__LIMIT".into(), "2".into());
    })
    .await;
    app.start_worker().await;
    let (user, token) = new_user();
    for i in 0..4 {
        let r = app
            .post(TRACK, &token, &legacy_track(Some("tok-never-validated")))
            .await;
        assert_eq!(r.status(), 401, "try {i}");
        assert_original_headers(&r);
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["message"], "Invalid session", "{p}");
        assert_eq!(p["detail"], "Invalid session", "{p}");
        assert_eq!(p["code"], "unauthorized", "{p}");
        assert_eq!(p["error"], p["title"], "{p}");
    }
    // Another user's token is unknown to this one.
    let (_, other) = new_user();
    validate(&app, &other, "tok-of-another-user").await;
    let r = app
        .post(TRACK, &token, &legacy_track(Some("tok-of-another-user")))
        .await;
    assert_eq!(r.status(), 401);
    // The auth-failure budget (2) is untouched: two failing tokens are still 401, the third 429.
    for _ in 0..2 {
        assert_eq!(app.get(PROBE, "not-a-token").await.status(), 401);
    }
    assert_eq!(app.get(PROBE, "not-a-token").await.status(), 429);
    // A legacy track without a sessionToken is accepted (as before), and drains the queue:
    // once it is stored, nothing of the refused ones is.
    let r = app.post(TRACK, &token, &legacy_track(None)).await;
    assert_eq!(r.status(), 202);
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["success"], true);
    let id = uuid::Uuid::parse_str(a["event_ids"][0].as_str().unwrap()).unwrap();
    app.eventually(TEN_SECS, || async {
        let n: i64 = sqlx::query_scalar("select count(*) from model_usage where id = $1")
            .bind(id)
            .fetch_one(&app.pg)
            .await
            .unwrap();
        (n == 1).then_some(())
    })
    .await;
    let stored = rows(
        &app,
        "select session_id from model_usage where user_id = $1",
        &user,
    )
    .await;
    assert_eq!(stored, vec![None], "only the accepted track is stored");
}

#[tokio::test]
async fn with_the_session_store_unreachable_the_legacy_track_is_accepted() {
    let app = spawn_app_with(|v| {
        v.insert("REDIS_URL".into(), "redis://127.0.0.1:1".into());
        v.insert("APP__REDIS__TIMEOUT_MS".into(), "200".into());
    })
    .await;
    let (_, token) = new_user();
    for _ in 0..2 {
        let r = app
            .post(
                TRACK,
                &token,
                &legacy_track(Some("tok-while-redis-is-down")),
            )
            .await;
        assert_eq!(
            r.status(),
            202,
            "usage keeps working without the session store"
        );
        // The fallback's fixed window may be at its edge: the reset only has to parse here.
        let reset = header(&r, "x-ratelimit-reset").expect("X-RateLimit-Reset");
        assert!(DateTime::parse_from_rfc3339(reset).is_ok(), "{reset}");
        assert_eq!(
            header(&r, "x-ratelimit-limit"),
            header(&r, "ratelimit-limit")
        );
        let a: Value = r.json().await.unwrap();
        assert_eq!(a["success"], true);
        assert_eq!(a["accepted"], 1);
    }
}

#[tokio::test]
async fn validate_track_and_consume_of_one_extension_session_count_as_one_session() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let stok = "ext-session.7f3a9c";
    let v = validate(&app, &token, stok).await;
    let sess = v["session"]["id"].as_str().unwrap().to_string();
    assert!(sess.starts_with("sess_"), "{v}");
    // The original client's track and consume, both naming the client's token; a new-shape
    // event naming the token too, and a consume naming the issued id.
    assert_eq!(
        app.post(TRACK, &token, &legacy_track(Some(stok)))
            .await
            .status(),
        202
    );
    let event = json!({"kind": "model", "provider": "openai", "model": "gpt-4o", "prompt_tokens": 5,
                       "completion_tokens": 1, "session_id": stok});
    assert_eq!(app.post(TRACK, &token, &event).await.status(), 202);
    let consume = format!("/api/users/{user}/credits/consume");
    for reference in [stok, sess.as_str()] {
        let body = json!({"amount": 3, "description": "chat completion", "sessionId": reference,
                          "modelId": "openai/gpt-4o", "provider": "openai", "tokensUsed": 12});
        let r = app.post(&consume, &token, &body).await;
        assert_eq!(r.status(), 200);
        assert_original_headers(&r);
        assert_eq!(r.json::<Value>().await.unwrap()["success"], true);
    }
    let usage_sql = "select session_id from model_usage where user_id = $1";
    let ledger_sql =
        "select session_id from credit_transactions where user_id = $1 and kind = 'consume'";
    app.eventually(TEN_SECS, || async {
        let (u, l) = (
            rows(&app, usage_sql, &user).await,
            rows(&app, ledger_sql, &user).await,
        );
        (u.len() == 2 && l.len() == 2).then_some(())
    })
    .await;
    let want = vec![Some(sess.clone()); 2];
    assert_eq!(
        rows(&app, usage_sql, &user).await,
        want,
        "usage rows carry the issued id"
    );
    assert_eq!(
        rows(&app, ledger_sql, &user).await,
        want,
        "ledger rows carry the issued id"
    );
    let analytics = app
        .eventually(TEN_SECS, || async {
            let v: Value = app
                .get("/api/vscode/analytics", &token)
                .await
                .json()
                .await
                .ok()?;
            (v["totals"]["requests"] == 2).then_some(v)
        })
        .await;
    assert_eq!(analytics["totals"]["sessions"], 1, "{analytics}");
    let stats = app
        .eventually(TEN_SECS, || async {
            let path = format!("/api/users/{user}/usage/stats?group_by=session");
            let v: Value = app.get(&path, &token).await.json().await.ok()?;
            (v["totals"]["requests"] == 2 && v["totals"]["credits_consumed"] == 6).then_some(v)
        })
        .await;
    let rows = stats["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{stats}");
    assert_eq!(rows[0]["key"], sess.as_str());
    assert_eq!(
        (
            rows[0]["requests"].as_i64(),
            rows[0]["credits_consumed"].as_i64()
        ),
        (Some(2), Some(6))
    );
}

#[tokio::test]
async fn a_consume_naming_an_unknown_session_keeps_the_reference_as_sent() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let body = json!({"amount": 2, "description": "chat", "sessionId": "never-validated-1"});
    let r = app
        .post(&format!("/api/users/{user}/credits/consume"), &token, &body)
        .await;
    assert_eq!(r.status(), 200);
    let sql = "select session_id from credit_transactions where user_id = $1 and kind = 'consume'";
    let got = app
        .eventually(TEN_SECS, || async {
            let r = rows(&app, sql, &user).await;
            (!r.is_empty()).then_some(r)
        })
        .await;
    assert_eq!(got, vec![Some("never-validated-1".to_string())]);
}
