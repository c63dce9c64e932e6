//! Analytics and usage stats end to end: events over HTTP → worker → rollup,
//! ledger rows seeded in Postgres, every figure of every answer checked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Value};

use crate::helpers::*;

const TRACK: &str = "/api/vscode/usage/track";

/// One model event `k` days (and a minute) ago.
#[allow(clippy::too_many_arguments)]
fn model(
    now: DateTime<Utc>,
    k: i64,
    provider: &str,
    model: &str,
    pt: i64,
    ct: i64,
    session: Option<&str>,
) -> Value {
    let mut e = json!({"event_id": uuid::Uuid::new_v4(), "kind": "model", "provider": provider,
        "model": model, "prompt_tokens": pt, "completion_tokens": ct,
        "occurred_at": at(now, k).to_rfc3339(), "metadata": {"file": "main.rs"}});
    if let Some(s) = session {
        e["session_id"] = json!(s);
    }
    e
}

fn feature(now: DateTime<Utc>, k: i64, feature: &str, session: Option<&str>) -> Value {
    let mut e = json!({"event_id": uuid::Uuid::new_v4(), "kind": "feature", "feature": feature,
        "action": "run", "occurred_at": at(now, k).to_rfc3339()});
    if let Some(s) = session {
        e["session_id"] = json!(s);
    }
    e
}

fn at(now: DateTime<Utc>, k: i64) -> DateTime<Utc> {
    now - chrono::Duration::days(k) - chrono::Duration::seconds(60)
}

fn date(t: DateTime<Utc>) -> String {
    t.date_naive().format("%Y-%m-%d").to_string()
}

/// Settles a consume through the SQL function the worker uses; returns its time.
#[allow(clippy::too_many_arguments)]
async fn settle(
    app: &TestApp,
    user: &str,
    amount: i64,
    session: Option<&str>,
    model: Option<&str>,
    provider: Option<&str>,
    feature: Option<&str>,
) -> DateTime<Utc> {
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "select * from consume_credits_with_session($1, $2, $3, 'settle', $4, $5, $6, 1, 1, $7, 'seeded', '{\"k\": 1}')",
    )
    .bind(id)
    .bind(user)
    .bind(amount)
    .bind(session)
    .bind(model)
    .bind(provider)
    .bind(feature)
    .execute(&app.pg)
    .await
    .unwrap();
    sqlx::query_scalar("select created_at from credit_transactions where id = $1")
        .bind(id)
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

/// A consume row dated in the past (the ledger's function always stamps
/// now()), keeping `users.credits_balance` equal to the ledger's sum.
async fn backdated_consume(
    app: &TestApp,
    user: &str,
    amount: i64,
    days_ago: i64,
    model: &str,
) -> DateTime<Utc> {
    let mut tx = app.pg.begin().await.unwrap();
    let bal: i64 = sqlx::query_scalar("select credits_balance from users where id = $1 for update")
        .bind(user)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let when: DateTime<Utc> = sqlx::query_scalar(
        "insert into credit_transactions (id, user_id, kind, amount, balance_after, model, provider, created_at) \
         values ($1, $2, 'consume', $3, $4, $5, 'openai', now() - make_interval(days => $6)) returning created_at",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(user)
    .bind(-amount)
    .bind(bal - amount)
    .bind(model)
    .bind(days_ago as i32)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query("update users set credits_balance = $2 where id = $1")
        .bind(user)
        .bind(bal - amount)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    when
}

async fn get_json(app: &TestApp, path: &str, token: &str) -> Value {
    let r = app.get(path, token).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

/// Per-day expectations: (requests, total_tokens, credits_consumed, feature_events).
#[derive(Default)]
struct Days(BTreeMap<String, [i64; 4]>);

impl Days {
    fn add(&mut self, day: String, i: usize, n: i64) {
        self.0.entry(day).or_default()[i] += n;
    }

    /// The expected `daily` of a `days`-day window ending today.
    fn daily(&self, today: NaiveDate, days: i64) -> Value {
        let list: Vec<Value> = (0..days)
            .rev()
            .map(|k| {
                let d = (today - chrono::Duration::days(k)).format("%Y-%m-%d").to_string();
                let [r, t, c, f] = self.0.get(&d).copied().unwrap_or_default();
                json!({"date": d, "requests": r, "total_tokens": t, "credits_consumed": c, "feature_events": f})
            })
            .collect();
        json!(list)
    }

    /// The expected stats rows grouped by day (only days with activity).
    fn stats_rows(&self) -> Value {
        json!(self
            .0
            .iter()
            .map(|(d, [r, _, c, f])| (d, r, c, f))
            .collect::<Vec<_>>())
    }
}

#[tokio::test]
async fn analytics_and_stats_count_every_event_once_by_model_provider_feature_session_and_day() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    // Provisions the user and caches an empty view, which the worker must drop.
    let empty = get_json(&app, "/api/vscode/analytics", &token).await;
    assert_eq!(empty["totals"]["requests"], 0);
    assert!(empty["as_of"].is_null());

    let now = Utc::now();
    let events = vec![
        model(now, 0, "openai", "gpt-4o", 100, 20, Some("sess_a")),
        model(now, 0, "openai", "gpt-4o", 50, 10, Some("sess_a")),
        model(now, 1, "openai", "gpt-4o-mini", 30, 5, Some("sess_b")),
        model(
            now,
            3,
            "anthropic",
            "claude-3-5-sonnet",
            200,
            40,
            Some("sess_b"),
        ),
        model(now, 10, "anthropic", "claude-3-5-sonnet", 10, 1, None),
        feature(now, 0, "chat", Some("sess_a")),
        feature(now, 0, "chat", Some("sess_a")),
        feature(now, 0, "chat", Some("sess_a")),
        feature(now, 1, "edit", Some("sess_c")),
        feature(now, 3, "explain", None),
    ];
    let batch = json!({"events": events});
    let r = app.post(TRACK, &token, &batch).await;
    assert_eq!(r.status(), 202);
    // The original client's shape: provider from the model id, tokens as prompt tokens.
    let r = app
        .post(
            TRACK,
            &token,
            &json!({"modelId": "mistral/mixtral-8x7b", "tokensUsed": 77, "action": "complete"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let legacy_day = date(Utc::now());

    // Ledger: two settles today, one 2 days ago, one outside the 30-day window.
    let l1 = settle(
        &app,
        &user,
        7,
        Some("sess_a"),
        Some("gpt-4o"),
        Some("openai"),
        Some("chat"),
    )
    .await;
    let l2 = settle(
        &app,
        &user,
        3,
        Some("sess_b"),
        Some("claude-3-5-sonnet"),
        Some("anthropic"),
        None,
    )
    .await;
    let l3 = backdated_consume(&app, &user, 5, 2, "gpt-4o").await;
    let l4 = backdated_consume(&app, &user, 11, 40, "gpt-4o").await;

    let mut days = Days::default();
    for (k, n, t) in [(0, 2, 180), (1, 1, 35), (3, 1, 240), (10, 1, 11)] {
        days.add(date(at(now, k)), 0, n);
        days.add(date(at(now, k)), 1, t);
    }
    days.add(legacy_day.clone(), 0, 1);
    days.add(legacy_day, 1, 77);
    days.add(date(at(now, 0)), 3, 3);
    days.add(date(at(now, 1)), 3, 1);
    days.add(date(at(now, 3)), 3, 1);
    days.add(date(l1), 2, 7);
    days.add(date(l2), 2, 3);
    days.add(date(l3), 2, 5);

    let expected_totals = json!({"requests": 6, "prompt_tokens": 467, "completion_tokens": 76,
        "total_tokens": 543, "credits_consumed": 15, "feature_events": 5, "sessions": 3});
    let v = app
        .eventually(Duration::from_secs(10), || async {
            let v = get_json(&app, "/api/vscode/analytics?days=30", &token).await;
            (v["totals"] == expected_totals).then_some(v)
        })
        .await;
    let check = |v: &Value| {
        assert_eq!(v["user_id"], user);
        assert_eq!(v["totals"], expected_totals);
        assert_eq!(
            v["by_model"],
            json!([
                {"provider": "anthropic", "model": "claude-3-5-sonnet", "requests": 2, "prompt_tokens": 210, "completion_tokens": 41},
                {"provider": "openai", "model": "gpt-4o", "requests": 2, "prompt_tokens": 150, "completion_tokens": 30},
                {"provider": "mistral", "model": "mistral/mixtral-8x7b", "requests": 1, "prompt_tokens": 77, "completion_tokens": 0},
                {"provider": "openai", "model": "gpt-4o-mini", "requests": 1, "prompt_tokens": 30, "completion_tokens": 5},
            ])
        );
        assert_eq!(
            v["by_provider"],
            json!([
                {"provider": "openai", "requests": 3, "total_tokens": 215},
                {"provider": "anthropic", "requests": 2, "total_tokens": 251},
                {"provider": "mistral", "requests": 1, "total_tokens": 77},
            ])
        );
        assert_eq!(
            v["by_feature"],
            json!([{"feature": "chat", "events": 3}, {"feature": "edit", "events": 1}, {"feature": "explain", "events": 1}])
        );
        assert_eq!(v["daily"], days.daily(Utc::now().date_naive(), 30));
        assert_eq!(
            v["summary"],
            json!({"totalRequests": 6, "totalTokens": 543, "totalCreditsUsed": 15, "uniqueModels": 4, "uniqueFeatures": 3})
        );
        let today = Utc::now().date_naive();
        assert_eq!(
            v["to"],
            format!("{}T00:00:00Z", today + chrono::Duration::days(1))
        );
        assert_eq!(
            v["from"],
            format!("{}T00:00:00Z", today - chrono::Duration::days(29))
        );
        let as_of = DateTime::parse_from_rfc3339(v["as_of"].as_str().unwrap()).unwrap();
        // Millisecond precision in the answer.
        let newest = l2 - chrono::Duration::milliseconds(1);
        assert!(
            as_of > newest && as_of <= Utc::now(),
            "as_of {as_of} is the newest settled event ({l2})"
        );
    };
    check(&v);
    // The original client's timeframe gives the same 30 days.
    let legacy = get_json(&app, "/api/vscode/analytics?timeframe=30d", &token).await;
    check(&legacy);
    // A 7-day window leaves out the event 10 days ago.
    let week = get_json(&app, "/api/vscode/analytics?timeframe=7d", &token).await;
    assert_eq!(week["totals"]["requests"], 5);
    assert_eq!(week["totals"]["prompt_tokens"], 457);
    assert_eq!(week["daily"], days.daily(Utc::now().date_naive(), 7));

    let stats = |group: &'static str| {
        let (app, token, user) = (&app, &token, &user);
        async move {
            let v = get_json(
                app,
                &format!("/api/users/{user}/usage/stats?group_by={group}"),
                token,
            )
            .await;
            assert_eq!(v["group_by"], group);
            assert_eq!(
                v["totals"],
                json!({"requests": 6, "prompt_tokens": 467, "completion_tokens": 76, "credits_consumed": 15, "feature_events": 5}),
                "{group}"
            );
            v["rows"].clone()
        }
    };
    let row = |k: Value, r: i64, pt: i64, ct: i64, c: i64, f: i64| json!({"key": k, "requests": r, "prompt_tokens": pt, "completion_tokens": ct, "credits_consumed": c, "feature_events": f});
    let check_stats = || async {
        assert_eq!(
            stats("model").await,
            json!([
                row(json!("claude-3-5-sonnet"), 2, 210, 41, 3, 0),
                row(json!("gpt-4o"), 2, 150, 30, 12, 0),
                row(json!("gpt-4o-mini"), 1, 30, 5, 0, 0),
                row(json!("mistral/mixtral-8x7b"), 1, 77, 0, 0, 0),
            ]),
            "models only: the feature events count in totals, without a row"
        );
        assert_eq!(
            stats("provider").await,
            json!([
                row(json!("anthropic"), 2, 210, 41, 3, 0),
                row(json!("mistral"), 1, 77, 0, 0, 0),
                row(json!("openai"), 3, 180, 35, 12, 0),
                row(Value::Null, 0, 0, 0, 0, 5),
            ])
        );
        assert_eq!(
            stats("feature").await,
            json!([
                row(json!("chat"), 0, 0, 0, 7, 3),
                row(json!("edit"), 0, 0, 0, 0, 1),
                row(json!("explain"), 0, 0, 0, 0, 1),
                row(Value::Null, 6, 467, 76, 8, 0),
            ])
        );
        assert_eq!(
            stats("session").await,
            json!([
                row(json!("sess_a"), 2, 150, 30, 7, 3),
                row(json!("sess_b"), 2, 230, 45, 3, 0),
                row(json!("sess_c"), 0, 0, 0, 0, 1),
                row(Value::Null, 2, 87, 1, 5, 1),
            ])
        );
        let by_day = stats("day").await;
        let got: Vec<(String, i64, i64, i64)> = by_day
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["key"].as_str().unwrap().to_string(),
                    r["requests"].as_i64().unwrap(),
                    r["credits_consumed"].as_i64().unwrap(),
                    r["feature_events"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(json!(got), days.stats_rows());
        // Per-day tokens in the stats rows, which `daily` only shows as totals.
        let tokens: i64 = by_day
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["prompt_tokens"].as_i64().unwrap())
            .sum();
        assert_eq!(tokens, 467);
    };
    check_stats().await;

    // A wider window reaches the consume 40 days ago; the default does not.
    let from = (Utc::now() - chrono::Duration::days(60)).date_naive();
    let wide = get_json(
        &app,
        &format!("/api/users/{user}/usage/stats?group_by=day&from={from}"),
        &token,
    )
    .await;
    assert_eq!(wide["totals"]["credits_consumed"], 26);
    assert_eq!(wide["from"], format!("{from}T00:00:00Z"));
    let old = wide["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == date(l4))
        .expect("the day 40 days ago");
    assert_eq!(old["credits_consumed"], 11);

    // Resending the same batch changes nothing; a marker sent after it tells
    // when the resend has been through the worker.
    let r = app.post(TRACK, &token, &batch).await;
    assert_eq!(r.status(), 202);
    let r = app
        .post(TRACK, &token, &feature(Utc::now(), 0, "marker", None))
        .await;
    assert_eq!(r.status(), 202);
    let v2 = app
        .eventually(Duration::from_secs(10), || async {
            let v = get_json(&app, "/api/vscode/analytics", &token).await;
            (v["totals"]["feature_events"] == 6).then_some(v)
        })
        .await;
    assert_eq!(
        v2["totals"],
        json!({"requests": 6, "prompt_tokens": 467, "completion_tokens": 76,
            "total_tokens": 543, "credits_consumed": 15, "feature_events": 6, "sessions": 3})
    );
    assert_eq!(v2["by_model"], v["by_model"]);
    assert_eq!(v2["by_provider"], v["by_provider"]);
    assert_eq!(
        v2["by_feature"],
        json!([{"feature": "chat", "events": 3}, {"feature": "edit", "events": 1},
               {"feature": "explain", "events": 1}, {"feature": "marker", "events": 1}])
    );
    assert_eq!(v2["summary"]["uniqueFeatures"], 4);
    assert_eq!(v2["summary"]["totalRequests"], 6);
    let marker_stats = get_json(
        &app,
        &format!("/api/users/{user}/usage/stats?group_by=feature"),
        &token,
    )
    .await;
    assert_eq!(marker_stats["totals"]["requests"], 6);
    assert_eq!(marker_stats["totals"]["feature_events"], 6);
    assert_eq!(marker_stats["totals"]["prompt_tokens"], 467);
}

#[tokio::test]
async fn an_accepted_event_shows_in_analytics_within_two_seconds() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (_user, token) = new_user();
    for round in 1..=5i64 {
        // A cached view is in place (served twice with the same generated_at).
        let a = get_json(&app, "/api/vscode/analytics", &token).await;
        let b = get_json(&app, "/api/vscode/analytics", &token).await;
        assert_eq!(
            a["generated_at"], b["generated_at"],
            "served from the cache"
        );
        assert_eq!(a["totals"]["requests"], round - 1);

        let e = json!({"kind": "model", "provider": "openai", "model": "gpt-4o",
                       "prompt_tokens": 10, "completion_tokens": 1});
        let r = app.post(TRACK, &token, &e).await;
        assert_eq!(r.status(), 202);
        let accepted = Instant::now();
        let deadline = accepted + Duration::from_secs(2);
        loop {
            let v = get_json(&app, "/api/vscode/analytics", &token).await;
            if v["totals"]["requests"] == round {
                let as_of = DateTime::parse_from_rfc3339(v["as_of"].as_str().unwrap()).unwrap();
                assert!(as_of <= Utc::now());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the event did not show within 2 s of its 202"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("round {round}: visible after {:?}", accepted.elapsed());
    }
}

#[tokio::test]
async fn analytics_parameters_are_validated_and_stats_reach_only_their_owner() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let (other, other_token) = new_user();
    let problem = |path: String, status: u16, field: &'static str| {
        let app = &app;
        let token = token.clone();
        async move {
            let r = app.get(&path, &token).await;
            assert_eq!(r.status(), status, "{path}");
            assert_eq!(r.headers()["content-type"], "application/problem+json");
            let p: Value = r.json().await.unwrap();
            assert!(p["detail"].as_str().unwrap().contains(field), "{path}: {p}");
        }
    };
    for bad in ["0", "366", "-3", "abc", "7.5", ""] {
        problem(format!("/api/vscode/analytics?days={bad}"), 422, "days").await;
    }
    problem(
        "/api/vscode/analytics?timeframe=90d".into(),
        422,
        "timeframe",
    )
    .await;
    let v = get_json(&app, "/api/vscode/analytics?days=365", &token).await;
    assert_eq!(v["daily"].as_array().unwrap().len(), 365);
    let v = get_json(&app, "/api/vscode/analytics?timeframe=1d", &token).await;
    assert_eq!(v["daily"].as_array().unwrap().len(), 1);
    for member in [
        "user_id",
        "from",
        "to",
        "generated_at",
        "totals",
        "by_model",
        "by_provider",
        "by_feature",
        "daily",
        "summary",
        "as_of",
    ] {
        assert!(v.get(member).is_some(), "{member}");
    }

    let stats = format!("/api/users/{user}/usage/stats");
    problem(format!("{stats}?group_by=week"), 422, "group_by").await;
    problem(format!("{stats}?from=yesterday"), 422, "from").await;
    problem(format!("{stats}?to=2024-02-30"), 422, "to").await;
    problem(format!("{stats}?from=2024-03-05&to=2024-03-01"), 422, "to").await;
    problem(format!("{stats}?from=2023-01-01&to=2024-01-03"), 422, "366").await;
    problem(
        format!("/api/users/{other}/usage/stats"),
        403,
        "your own account",
    )
    .await;
    problem(
        "/api/users/not%20an%20id/usage/stats".into(),
        404,
        "no such user",
    )
    .await;

    let v = get_json(
        &app,
        &format!("{stats}?from=2024-01-01&to=2024-12-31T23:59:59Z&group_by=session"),
        &token,
    )
    .await;
    assert_eq!(v["from"], "2024-01-01T00:00:00Z");
    assert_eq!(v["to"], "2025-01-01T00:00:00Z");
    assert_eq!(v["rows"], json!([]));
    // Admins reach anyone; the owner reaches their own.
    let v = get_json(
        &app,
        &format!("/api/users/{other}/usage/stats"),
        &admin_token(),
    )
    .await;
    assert_eq!(v["user_id"], other);
    get_json(
        &app,
        &format!("/api/users/{other}/usage/stats"),
        &other_token,
    )
    .await;
}
