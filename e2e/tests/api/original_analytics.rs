//! The original backend's analytics and usage/stats members (docs/compatibility.md): its
//! requests, events through the real worker, its members read back with their values.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, DurationRound, NaiveDate, Utc};
use serde_json::{json, Value};

use crate::helpers::*;

const TRACK: &str = "/api/vscode/usage/track";

/// A time `secs` seconds ago, whole seconds (so its millisecond form is exact).
fn ago(secs: i64) -> DateTime<Utc> {
    (Utc::now() - chrono::Duration::seconds(secs))
        .duration_trunc(chrono::Duration::seconds(1))
        .unwrap()
}

fn ms(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn model(provider: &str, model: &str, pt: i64, ct: i64, at: DateTime<Utc>, success: bool) -> Value {
    json!({"event_id": uuid::Uuid::new_v4(), "kind": "model", "provider": provider, "model": model,
           "prompt_tokens": pt, "completion_tokens": ct, "occurred_at": at.to_rfc3339(), "success": success})
}

fn feature(name: &str, at: DateTime<Utc>) -> Value {
    json!({"event_id": uuid::Uuid::new_v4(), "kind": "feature", "feature": name, "action": "run",
           "occurred_at": at.to_rfc3339()})
}

async fn get_json(app: &TestApp, path: &str, token: &str) -> Value {
    let r = app.get(path, token).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

async fn consume(app: &TestApp, user: &str, token: &str, amount: i64, model: &str, provider: &str) {
    let body = json!({"amount": amount, "description": "completion", "sessionId": "sess_orig_1",
                      "modelId": model, "provider": provider, "tokensUsed": 10});
    let r = app
        .post(&format!("/api/users/{user}/credits/consume"), token, &body)
        .await;
    assert_eq!(r.status(), 200);
}

fn keys(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e.as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

#[tokio::test]
async fn analytics_adds_the_originals_model_feature_and_credit_lists_newest_first_over_its_window()
{
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    // Provisions the user and caches a view, which the worker's commits must make unservable.
    let empty = get_json(&app, "/api/vscode/analytics?timeframe=7d", &token).await;
    assert_eq!(empty["modelUsage"], json!([]));
    assert_eq!(empty["featureUsage"], json!([]));

    let (m_old, f_chat1, f_chat2, f_explain, f_old) = (
        ago(3600),
        ago(600),
        ago(3 * 3600),
        ago(2 * 3600),
        ago(10 * 86400),
    );
    let batch = json!({"events": [
        model("anthropic", "claude-3-5-sonnet", 50, 5, m_old, true),
        model("openai", "gpt-4o", 7, 1, ago(12 * 86400), true),
        feature("chat", f_chat1),
        feature("chat", f_chat2),
        feature("explain", f_explain),
        feature("old", f_old),
    ]});
    assert_eq!(app.post(TRACK, &token, &batch).await.status(), 202);
    // The original client's track, with its reported cost.
    let legacy = json!({"modelId": "openai/gpt-4o", "tokensUsed": 120, "costInCredits": 2.5, "action": "completion"});
    assert_eq!(app.post(TRACK, &token, &legacy).await.status(), 202);
    consume(&app, &user, &token, 4, "openai/gpt-4o", "openai").await;

    let v = app
        .eventually(Duration::from_secs(15), || async {
            let v = get_json(&app, "/api/vscode/analytics?timeframe=7d", &token).await;
            let done = v["modelUsage"].as_array().unwrap().len() == 2
                && v["featureUsage"].as_array().unwrap().len() == 2
                && v["creditHistory"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["transaction_type"] == "consume");
            done.then_some(v)
        })
        .await;
    let mu = &v["modelUsage"];
    assert_eq!(
        keys(mu)[0],
        "created_at,credits_consumed,model_id,provider,tokens_used"
    );
    // Newest first: the legacy track (received now), then the event an hour ago.
    assert_eq!(mu[0]["model_id"], "openai/gpt-4o");
    assert_eq!(mu[0]["provider"], "openai");
    assert_eq!(mu[0]["tokens_used"], 120);
    assert_eq!(mu[0]["credits_consumed"], 2.5);
    let legacy_at = DateTime::parse_from_rfc3339(mu[0]["created_at"].as_str().unwrap()).unwrap();
    assert!((Utc::now() - legacy_at.with_timezone(&Utc)).num_seconds() < 60);
    assert_eq!(
        mu[1],
        json!({"model_id": "claude-3-5-sonnet", "provider": "anthropic", "tokens_used": 55,
               "credits_consumed": 0.0, "created_at": ms(m_old)})
    );
    // Per feature, by its newest event; the event 10 days ago is outside the 7 days.
    assert_eq!(
        v["featureUsage"],
        json!([
            {"feature_name": "chat", "usage_count": 2, "last_used_at": ms(f_chat1)},
            {"feature_name": "explain", "usage_count": 1, "last_used_at": ms(f_explain)},
        ])
    );
    let ch = v["creditHistory"].as_array().unwrap();
    assert_eq!(
        keys(&v["creditHistory"])[0],
        "amount,created_at,description,transaction_type"
    );
    assert_eq!(
        (
            &ch[0]["amount"],
            &ch[0]["description"],
            &ch[0]["transaction_type"]
        ),
        (&json!(-4), &json!("completion"), &json!("consume"))
    );
    let ledger: Vec<(i64, String)> =
        sqlx::query_as("select amount, kind from credit_transactions where user_id = $1 order by created_at desc, id desc")
            .bind(&user)
            .fetch_all(&app.pg)
            .await
            .unwrap();
    let got: Vec<(i64, String)> = ch
        .iter()
        .map(|e| {
            (
                e["amount"].as_i64().unwrap(),
                e["transaction_type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, ledger, "every ledger row of the window, newest first");
    let times: Vec<&str> = ch
        .iter()
        .map(|e| e["created_at"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    // The members beside today's, which keep their figures.
    assert_eq!(v["totals"]["requests"], 2);
    assert_eq!(v["summary"]["totalRequests"], 2);

    // A 30-day window reaches the older events, still newest first.
    let month = get_json(&app, "/api/vscode/analytics?days=30", &token).await;
    let models: Vec<&str> = month["modelUsage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["model_id"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["openai/gpt-4o", "claude-3-5-sonnet", "gpt-4o"]);
    let features: Vec<&str> = month["featureUsage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["feature_name"].as_str().unwrap())
        .collect();
    assert_eq!(features, ["chat", "explain", "old"]);
}

/// The week key: the date of the Sunday starting the week.
fn sunday(d: NaiveDate) -> String {
    (d - chrono::Duration::days(i64::from(d.weekday().num_days_from_sunday())))
        .format("%Y-%m-%d")
        .to_string()
}

#[tokio::test]
async fn usage_stats_with_period_or_group_by_adds_the_timeline_by_model_by_provider_and_success_rate(
) {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let stats = format!("/api/users/{user}/usage/stats");
    let (t1, t2, t3, t_old) = (
        ago(300),
        ago(3 * 3600),
        ago(2 * 86400 + 600),
        ago(12 * 86400),
    );
    let batch = json!({"events": [
        model("openai", "gpt-4o", 100, 20, t1, true),
        model("openai", "gpt-4o", 10, 0, t2, false),
        model("anthropic", "claude-3-5-sonnet", 50, 5, t3, true),
        model("anthropic", "claude-3-5-sonnet", 1, 1, t_old, true),
        feature("chat", ago(3600)),
    ]});
    assert_eq!(app.post(TRACK, &token, &batch).await.status(), 202);
    consume(&app, &user, &token, 4, "gpt-4o", "openai").await;
    app.eventually(Duration::from_secs(15), || async {
        let v = get_json(&app, &format!("{stats}?period=30d"), &token).await;
        (v["totals"]["requests"] == 4
            && v["totals"]["feature_events"] == 1
            && v["totals"]["credits_consumed"] == 4)
            .then_some(())
    })
    .await;
    let consumed_at: DateTime<Utc> = sqlx::query_scalar(
        "select created_at from credit_transactions where user_id = $1 and kind = 'consume'",
    )
    .bind(&user)
    .fetch_one(&app.pg)
    .await
    .unwrap();

    // The expected timeline of the 7 days: [requests, tokens, credits, errors] per key.
    let expect = |key: &dyn Fn(DateTime<Utc>) -> String| {
        let mut m: BTreeMap<String, [i64; 4]> = BTreeMap::new();
        for (t, n, tok, err) in [(t1, 1, 120, 0), (t2, 1, 10, 1), (t3, 1, 55, 0)] {
            let e = m.entry(key(t)).or_default();
            e[0] += n;
            e[1] += tok;
            e[3] += err;
        }
        m.entry(key(consumed_at)).or_default()[2] += 4;
        json!(m
            .into_iter()
            .map(|(k, [r, tok, c, e])| json!({"period": k, "requests": r, "tokens": tok, "credits": c, "errors": e}))
            .collect::<Vec<_>>())
    };

    let v = get_json(&app, &format!("{stats}?period=7d&groupBy=hour"), &token).await;
    assert_eq!(
        (&v["period"], &v["groupBy"], &v["group_by"]),
        (&json!("7d"), &json!("hour"), &json!("day"))
    );
    assert_eq!(
        v["timeline"],
        expect(&|t| t.format("%Y-%m-%dT%H:00:00.000Z").to_string())
    );
    let hours: Vec<&str> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["period"].as_str().unwrap())
        .collect();
    assert!(
        hours
            .iter()
            .all(|k| k.len() == 24 && k.ends_with(":00:00.000Z")),
        "{hours:?}"
    );
    assert!(
        hours.windows(2).all(|w| w[0] < w[1]),
        "ascending: {hours:?}"
    );
    assert_eq!(
        v["byModel"],
        json!([
            {"modelId": "gpt-4o", "requests": 2, "tokens": 130, "credits": 4, "errors": 1},
            {"modelId": "claude-3-5-sonnet", "requests": 1, "tokens": 55, "credits": 0, "errors": 0},
        ])
    );
    assert_eq!(
        v["byProvider"],
        json!([
            {"provider": "openai", "requests": 2, "tokens": 130, "credits": 4, "errors": 1},
            {"provider": "anthropic", "requests": 1, "tokens": 55, "credits": 0, "errors": 0},
        ])
    );
    assert_eq!(v["totals"]["successRate"], 66.67);
    assert_eq!(
        v["totals"]["requests"], 3,
        "today's totals, over the period's window"
    );
    assert!(!v["rows"].as_array().unwrap().is_empty());

    // groupBy alone: the period defaults to 7d; day keys.
    let v = get_json(&app, &format!("{stats}?groupBy=day"), &token).await;
    assert_eq!((&v["period"], &v["groupBy"]), (&json!("7d"), &json!("day")));
    assert_eq!(v["timeline"], expect(&|t| t.format("%Y-%m-%d").to_string()));
    // period alone: the bucket defaults to day; 30 days reach the old event.
    let v = get_json(&app, &format!("{stats}?period=30d&groupBy=week"), &token).await;
    assert_eq!(
        (&v["period"], &v["groupBy"]),
        (&json!("30d"), &json!("week"))
    );
    let weeks: Vec<&str> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["period"].as_str().unwrap())
        .collect();
    for w in &weeks {
        let d = NaiveDate::parse_from_str(w, "%Y-%m-%d").unwrap();
        assert_eq!(d.weekday(), chrono::Weekday::Sun, "{w}");
    }
    assert!(
        weeks.windows(2).all(|w| w[0] < w[1]),
        "ascending: {weeks:?}"
    );
    assert!(weeks.contains(&sunday(t_old.date_naive()).as_str()));
    let requests: i64 = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(requests, 4);
    assert_eq!(v["totals"]["successRate"], 75.0);
    let v = get_json(&app, &format!("{stats}?period=1d"), &token).await;
    assert_eq!((&v["period"], &v["groupBy"]), (&json!("1d"), &json!("day")));

    // Neither: today's answer, without the original's members.
    let v = get_json(&app, &stats, &token).await;
    for absent in ["period", "groupBy", "timeline", "byModel", "byProvider"] {
        assert!(v.get(absent).is_none(), "{absent}: {v}");
    }
    assert!(v["totals"].get("successRate").is_none());

    // `from` wins over `period` (still echoed).
    let from = (Utc::now() - chrono::Duration::days(20)).date_naive();
    let v = get_json(&app, &format!("{stats}?period=1d&from={from}"), &token).await;
    assert_eq!(v["from"], format!("{from}T00:00:00Z"));
    assert_eq!(v["period"], "1d");
    assert_eq!(v["totals"]["requests"], 4);

    // Bad values are 422s naming their parameter.
    for (q, field) in [
        ("period=90d", "period"),
        ("groupBy=month", "groupBy"),
        ("period=7d&groupBy=model", "groupBy"),
    ] {
        let r = app.get(&format!("{stats}?{q}"), &token).await;
        assert_eq!(r.status(), 422, "{q}");
        let p: Value = r.json().await.unwrap();
        assert!(p["detail"].as_str().unwrap().contains(field), "{q}: {p}");
    }
}

#[tokio::test]
async fn stats_grouped_by_model_have_model_rows_only_while_the_totals_count_the_feature_events() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let batch = json!({"events": [
        model("openai", "gpt-4o", 10, 2, ago(60), true),
        feature("chat", ago(120)),
        feature("chat", ago(180)),
    ]});
    assert_eq!(app.post(TRACK, &token, &batch).await.status(), 202);
    consume(&app, &user, &token, 3, "gpt-4o", "openai").await;
    let path = format!("/api/users/{user}/usage/stats?group_by=model");
    let v = app
        .eventually(Duration::from_secs(15), || async {
            let v = get_json(&app, &path, &token).await;
            (v["totals"]["feature_events"] == 2 && v["totals"]["credits_consumed"] == 3)
                .then_some(v)
        })
        .await;
    assert_eq!(v["group_by"], "model");
    assert_eq!(
        v["rows"],
        json!([{"key": "gpt-4o", "requests": 1, "prompt_tokens": 10, "completion_tokens": 2,
                "credits_consumed": 3, "feature_events": 0}])
    );
    assert_eq!(
        v["totals"],
        json!({"requests": 1, "prompt_tokens": 10, "completion_tokens": 2, "credits_consumed": 3, "feature_events": 2})
    );
    // Other groupings keep the null key for what has none.
    let v = get_json(
        &app,
        &format!("/api/users/{user}/usage/stats?group_by=provider"),
        &token,
    )
    .await;
    assert!(v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["key"].is_null()));
}
