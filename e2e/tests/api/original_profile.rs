//! The original backend's members of the profile (`user`, `usage`,
//! `recentTransactions`) and of consume's 200 (`transaction`), with the
//! original's requests, the values checked against what the worker stored
//! (docs/compatibility.md).

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::redis::keys::Keys;
use redis::AsyncCommands;
use serde_json::{json, Value};

use crate::credits::{drained, post_keyed, read};
use crate::helpers::*;

const SECS: Duration = Duration::from_secs(1);

/// A user whose token carries a name and an email (as Clerk's do).
fn named_user(name: &str) -> (String, String) {
    let id = format!("user_{}", uuid::Uuid::new_v4().simple());
    let token = hs_token(
        &json!({"sub": id, "exp": now() + 3600, "email": format!("{id}@example.com"), "name": name}),
    );
    (id, token)
}

async fn profile(app: &TestApp, user: &str, token: &str) -> Value {
    let r = app.get(&format!("/api/users/{user}/profile"), token).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The original client's consume body.
fn consume_body(amount: i64, description: &str) -> Value {
    json!({"amount": amount, "description": description, "sessionId": "sess_orig_1",
           "modelId": "openai/gpt-4o", "provider": "openai", "tokensUsed": 100})
}

async fn consume(
    app: &TestApp,
    user: &str,
    token: &str,
    body: &Value,
    key: Option<&str>,
) -> (u16, Value, bool) {
    let path = format!("/api/users/{user}/credits/consume");
    read(post_keyed(app, &path, token, body, key).await).await
}

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap()
        .to_utc()
}

/// The user's ledger, newest first: (amount, description, kind, created_at).
async fn ledger_rows(
    app: &TestApp,
    user: &str,
) -> Vec<(i64, Option<String>, String, DateTime<Utc>)> {
    sqlx::query_as(
        "select amount, description, kind, created_at from credit_transactions \
         where user_id = $1 order by created_at desc, id desc",
    )
    .bind(user)
    .fetch_all(&app.pg)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_profile_carries_the_originals_user_usage_and_recent_transactions() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = named_user("Ada King Lovelace");
    let r = app
        .post(
            "/api/vscode/session/validate",
            &token,
            &json!({"sessionToken": "tok_profile_1", "extensionVersion": "1.4.2"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .patch(app.url(&format!("/api/users/{user}/preferences")))
        .bearer_auth(&token)
        .json(&json!({"theme": "dark"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for (amount, description) in [
        (2, "completion one"),
        (3, "completion two"),
        (4, "completion three"),
    ] {
        let (s, a, _) = consume(
            &app,
            &user,
            &token,
            &consume_body(amount, description),
            None,
        )
        .await;
        assert_eq!(s, 200, "{a}");
    }
    let track = json!({"sessionToken": "tok_profile_1", "action": "completion",
                       "modelId": "anthropic/claude-3-haiku", "tokensUsed": 321, "costInCredits": 2});
    for _ in 0..2 {
        let r = app.post("/api/vscode/usage/track", &token, &track).await;
        assert_eq!(r.status(), 202);
    }
    drained(&app, &user, 91).await;

    // Read until every worker commit shows (each one invalidates the cached profile).
    let p = app
        .eventually(20 * SECS, || async {
            let p = profile(&app, &user, &token).await;
            let done = p["user"]["totalApiRequests"] == 2
                && p["recentTransactions"].as_array().map(Vec::len) == Some(4)
                && p["user"]["integrationPreferences"]["theme"] == "dark"
                && p["user"]["extensionVersion"] == "1.4.2";
            done.then_some(p)
        })
        .await;
    let u = &p["user"];
    assert_eq!(u["clerkId"], user.as_str());
    assert_eq!(u["email"], format!("{user}@example.com"));
    assert_eq!(
        (u["firstName"].as_str(), u["lastName"].as_str()),
        (Some("Ada"), Some("King Lovelace"))
    );
    assert_eq!(u["planType"], "free");
    assert_eq!(u["planType"], p["plan"]);
    assert_eq!(u["credits"], 91);
    assert_eq!(u["credits"], p["credits"]["balance"]);
    assert_eq!(
        time(&u["lastVSCodeActivity"]),
        time(&p["vscode"]["last_seen_at"])
    );
    assert_eq!(time(&u["createdAt"]), time(&p["created_at"]));
    assert_eq!(u["integrationPreferences"], p["preferences"]);
    let newest: DateTime<Utc> =
        sqlx::query_scalar("select max(occurred_at) from model_usage where user_id = $1")
            .bind(&user)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(time(&u["lastApiRequest"]), newest);

    let usage = &p["usage"];
    assert_eq!(usage["totalCreditsUsed"], 9);
    assert_eq!(usage["totalTokens"], 642);
    assert_eq!(usage["totalRequests"], 2);
    assert_eq!(usage["avgCreditsPerDay"], 0.3);

    // The ledger, newest first: the three consumes, then the starting grant.
    let recent = p["recentTransactions"].as_array().unwrap();
    let rows = ledger_rows(&app, &user).await;
    assert_eq!(rows.len(), 4);
    for (t, (amount, description, kind, at)) in recent.iter().zip(&rows) {
        assert_eq!(t["amount"], *amount, "{t}");
        assert_eq!(t["description"].as_str(), description.as_deref(), "{t}");
        assert_eq!(t["transaction_type"], kind.as_str(), "{t}");
        assert_eq!(time(&t["created_at"]), *at, "{t}");
    }
    let mut consumed: Vec<(i64, &str)> = recent[..3]
        .iter()
        .map(|t| {
            (
                t["amount"].as_i64().unwrap(),
                t["description"].as_str().unwrap(),
            )
        })
        .collect();
    consumed.sort();
    assert_eq!(
        consumed,
        [
            (-4, "completion three"),
            (-3, "completion two"),
            (-2, "completion one")
        ]
    );
    assert_eq!(recent[3]["transaction_type"], "grant");
    assert_eq!(recent[3]["amount"], 100);

    // Cached now; the live balance still moves at once in both places.
    let (s, a, _) = consume(&app, &user, &token, &consume_body(1, "live"), None).await;
    assert_eq!(s, 200, "{a}");
    let p = profile(&app, &user, &token).await;
    assert_eq!(
        (
            p["user"]["credits"].as_i64(),
            p["credits"]["balance"].as_i64()
        ),
        (Some(90), Some(90))
    );
}

#[tokio::test]
async fn recent_transactions_are_the_ten_newest_and_an_admin_grant_shows_at_once() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    for i in 0..12 {
        let (s, a, _) = consume(
            &app,
            &user,
            &token,
            &json!({"amount": 1, "description": format!("c{i}")}),
            None,
        )
        .await;
        assert_eq!(s, 200, "{a}");
    }
    drained(&app, &user, 88).await;
    let p = app
        .eventually(20 * SECS, || async {
            let p = profile(&app, &user, &token).await;
            (p["usage"]["totalCreditsUsed"] == 12).then_some(p)
        })
        .await;
    let recent = p["recentTransactions"].as_array().unwrap();
    assert_eq!(recent.len(), 10);
    let rows = ledger_rows(&app, &user).await;
    assert_eq!(rows.len(), 13);
    for (t, (amount, description, kind, at)) in recent.iter().zip(&rows) {
        assert_eq!(t["amount"], *amount);
        assert_eq!(t["description"].as_str(), description.as_deref());
        assert_eq!(t["transaction_type"], kind.as_str());
        assert_eq!(time(&t["created_at"]), *at);
    }
    assert!(recent
        .iter()
        .all(|t| t["transaction_type"] == "consume" && t["amount"] == -1));
    let times: Vec<DateTime<Utc>> = recent.iter().map(|t| time(&t["created_at"])).collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    assert_eq!(p["usage"]["avgCreditsPerDay"], 0.4);
    assert_eq!(p["user"]["totalApiRequests"], 0);
    assert_eq!(p["user"]["lastApiRequest"], Value::Null);

    // The profile is cached now; a grant (written by the gateway, not a worker) drops it.
    let r = app
        .post(
            &format!("/api/admin/users/{user}/credits/grant"),
            &admin_token(),
            &json!({"amount": 25, "reason": "top-up"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let p = profile(&app, &user, &token).await;
    assert_eq!(p["recentTransactions"][0]["transaction_type"], "grant");
    assert_eq!(p["recentTransactions"][0]["amount"], 25);
    assert_eq!(p["recentTransactions"][0]["description"], "top-up");
    assert_eq!(p["recentTransactions"].as_array().unwrap().len(), 10);
    assert_eq!(p["user"]["credits"], 113);
}

#[tokio::test]
async fn consume_answers_its_ledger_transaction_and_a_replay_answers_the_same() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let body = consume_body(5, "chat completion");
    let before = Utc::now() - chrono::Duration::milliseconds(5);
    let (s, a, replayed) = consume(&app, &user, &token, &body, Some("orig-K1")).await;
    assert_eq!((s, replayed), (200, false), "{a}");
    let t = &a["transaction"];
    assert_eq!(t["id"], a["transaction_id"]);
    assert_eq!(t["amount"], -5);
    assert_eq!(t["description"], "chat completion");
    let at = time(&t["timestamp"]);
    assert!(at >= before && at <= Utc::now(), "{at}");
    let id = uuid::Uuid::parse_str(t["id"].as_str().unwrap()).unwrap();
    let row: (i64, Option<String>, String, DateTime<Utc>) = app
        .eventually(10 * SECS, || async {
            sqlx::query_as("select amount, description, kind, created_at from credit_transactions where id = $1")
                .bind(id)
                .fetch_optional(&app.pg)
                .await
                .unwrap()
        })
        .await;
    assert_eq!(
        (row.0, row.1.as_deref(), row.2.as_str()),
        (-5, Some("chat completion"), "consume")
    );
    // The ledger row is written when the worker settles the charge, just after it.
    assert!(
        row.3 >= at && row.3 - at < chrono::Duration::seconds(10),
        "{} vs {at}",
        row.3
    );

    // A replay answers the same transaction (and charges nothing).
    let (s, again, replayed) = consume(&app, &user, &token, &body, Some("orig-K1")).await;
    assert_eq!((s, replayed), (200, true), "{again}");
    assert_eq!(again, a);
    // So does the durable record, once Redis forgot the answer.
    let n: i64 = app
        .eventually(10 * SECS, || async {
            let n: i64 = sqlx::query_scalar(
                "select count(*) from idempotency_records where user_id = $1 and key = 'orig-K1'",
            )
            .bind(&user)
            .fetch_one(&app.pg)
            .await
            .unwrap();
            (n == 1).then_some(n)
        })
        .await;
    assert_eq!(n, 1);
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let record = keys.idempotency(&user, "consume", "orig-K1");
    let mut c = app.redis.get().await.unwrap();
    let hash: String = c.hget(&record, "h").await.unwrap();
    let _: () = c.del(&record).await.unwrap();
    let fields = [
        ("h", hash.as_str()),
        ("st", "run"),
        ("tx", t["id"].as_str().unwrap()),
        ("t", "0"),
    ];
    let _: () = c.hset_multiple(&record, &fields).await.unwrap();
    let (s, durable, replayed) = consume(&app, &user, &token, &body, Some("orig-K1")).await;
    assert_eq!((s, replayed), (200, true), "{durable}");
    assert_eq!(durable["transaction"], a["transaction"]);
    drained(&app, &user, 95).await;
    assert_eq!(
        ledger_rows(&app, &user).await.len(),
        2,
        "one consume row for all three answers"
    );
}

#[tokio::test]
async fn an_answer_remembered_before_the_transaction_member_replays_as_it_was() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let body = consume_body(3, "old answer");
    let (s, a, _) = consume(&app, &user, &token, &body, Some("orig-old")).await;
    assert_eq!(s, 200, "{a}");
    // Rewrite the remembered answer as the code before `transaction` stored it.
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let record = keys.idempotency(&user, "consume", "orig-old");
    let mut c = app.redis.get().await.unwrap();
    let stored: String = c.hget(&record, "ans").await.unwrap();
    let mut old: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(old["body"]["transaction"], a["transaction"]);
    old["body"].as_object_mut().unwrap().remove("transaction");
    let _: () = c.hset(&record, "ans", old.to_string()).await.unwrap();
    let (s, again, replayed) = consume(&app, &user, &token, &body, Some("orig-old")).await;
    assert_eq!((s, replayed), (200, true), "{again}");
    assert_eq!(again, old["body"]);
    assert!(again.get("transaction").is_none());
    assert_eq!(again["transaction_id"], a["transaction_id"]);
}
