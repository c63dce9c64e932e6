//! usage/track limited per event as well as per request (docs/rate-limits.md
//! "Usage events"): a request of N events costs N of the events budget,
//! scaled by plan and not replaced by a per-user class override.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;
use crate::rate_limits::{admin_put, header, header_u64, PROBE};

fn features(n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|_| json!({"kind": "feature", "feature": "completion"}))
        .collect();
    json!({ "events": events })
}

/// docs/rate-limits.md: usage is limited per event too. A request of N events counts N
/// against `rate_limit.usage_events`; over it, 429 with Retry-After and
/// nothing published; the RateLimit-* headers show the tighter limit.
#[tokio::test]
async fn usage_track_counts_each_event_against_the_events_budget() {
    let app = spawn_app_with(|v| {
        v.insert("APP__RATE_LIMIT__USAGE_EVENTS__LIMIT".into(), "10".into());
        // No refill worth an event while the test runs.
        v.insert(
            "APP__RATE_LIMIT__USAGE_EVENTS__WINDOW_SECS".into(),
            "3600".into(),
        );
    })
    .await;
    let (user, token) = new_user();
    const TRACK: &str = "/api/vscode/usage/track";
    let r = app.post(TRACK, &token, &features(6)).await;
    assert_eq!(r.status(), 202);
    // 4 of 10 events left is tighter than 1199 of 1200 requests.
    assert_eq!(header_u64(&r, "ratelimit-limit"), Some(10));
    assert_eq!(header_u64(&r, "ratelimit-remaining"), Some(4));
    assert_eq!(header(&r, "ratelimit-policy"), Some("10;w=3600"));

    let r = app.post(TRACK, &token, &features(5)).await;
    assert_eq!(r.status(), 429);
    let retry = header_u64(&r, "retry-after").expect("Retry-After");
    assert!((1..=3600).contains(&retry), "{retry}");
    assert_eq!(header_u64(&r, "ratelimit-limit"), Some(10));
    assert_eq!(header_u64(&r, "ratelimit-remaining"), Some(4));
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited");

    // What still fits passes; then even one event is refused.
    let r = app.post(TRACK, &token, &features(4)).await;
    assert_eq!(r.status(), 202);
    assert_eq!(header_u64(&r, "ratelimit-remaining"), Some(0));
    let r = app.post(TRACK, &token, &features(1)).await;
    assert_eq!(r.status(), 429);
    // A request refused for its body is not counted.
    let r = app
        .post(TRACK, &token, &json!({"events": [{"kind": "nope"}]}))
        .await;
    assert_eq!(r.status(), 422);

    // Only the accepted 10 events were published.
    app.start_worker_on(&["usage"]).await;
    app.eventually(Duration::from_secs(10), || async {
        let n: i64 = sqlx::query_scalar("select count(*) from feature_usage where user_id = $1")
            .bind(&user)
            .fetch_one(&app.pg)
            .await
            .unwrap();
        (n == 10).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n: i64 = sqlx::query_scalar("select count(*) from feature_usage where user_id = $1")
        .bind(&user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(n, 10);

    // Other routes show their own class limit only.
    let r = app.get(PROBE, &token).await;
    assert_eq!(header_u64(&r, "ratelimit-limit"), Some(300));
}

/// The events budget is scaled by the plan multiplier, and a per-user
/// override of the `usage` class (a request limit) does not replace it.
#[tokio::test]
async fn the_events_budget_scales_with_the_plan_and_ignores_a_usage_override() {
    let app = spawn_app_with(|v| {
        v.insert("APP__RATE_LIMIT__USAGE_EVENTS__LIMIT".into(), "4".into());
        v.insert(
            "APP__RATE_LIMIT__USAGE_EVENTS__WINDOW_SECS".into(),
            "3600".into(),
        );
    })
    .await;
    let (id, token) = new_user();
    let r = admin_put(
        &app,
        &format!("/api/admin/users/{id}/plan"),
        &json!({"plan": "pro"}),
        "plan-events",
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = admin_put(
        &app,
        &format!("/api/admin/users/{id}/rate-limits"),
        &json!({"class": "usage", "limit": 100000, "window_secs": 60}),
        "override-events",
    )
    .await;
    assert_eq!(r.status(), 200);
    // pro: ×5 → 20 events.
    let r = app
        .post("/api/vscode/usage/track", &token, &features(15))
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(header_u64(&r, "ratelimit-limit"), Some(20));
    assert_eq!(header_u64(&r, "ratelimit-remaining"), Some(5));
    let r = app
        .post("/api/vscode/usage/track", &token, &features(6))
        .await;
    assert_eq!(r.status(), 429);
}
