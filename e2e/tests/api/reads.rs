//! The dashboard's reads (SPEC §5.10b): the ledger page by page, the open holds,
//! the caller's limits read without spending (agreeing with the `RateLimit-*`
//! headers), and the admin's user search; another user's data is 403, bad
//! parameters 422 naming them.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(10);

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn grant(app: &TestApp, user: &str, amount: i64) {
    let path = format!("/api/admin/users/{user}/credits/grant");
    let body = json!({"amount": amount, "reason": "reads test"});
    let (status, body) = json_of(app.post(&path, &admin_token(), &body).await).await;
    assert_eq!(status, 200, "{body}");
}

/// Waits until the ledger holds `rows` rows of `user`.
async fn ledger_rows(app: &TestApp, user: &str, rows: i64) {
    let sql = format!("select count(*) from credit_transactions where user_id = '{user}'");
    app.eventually(WAIT, || async {
        (app.count(&sql).await == rows).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_ledger_pages_newest_first_by_transaction_id_to_its_end() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (id, token) = new_user();
    // Provisioning grants the plan's starting credits (100 on `free`): one row first.
    grant(&app, &id, 1000).await;
    ledger_rows(&app, &id, 2).await;
    for amount in 1..=5 {
        let path = format!("/api/users/{id}/credits/consume");
        let body = json!({"amount": amount, "model": "gpt-x", "provider": "openai",
            "prompt_tokens": 10 * amount, "completion_tokens": amount, "description": format!("call {amount}")});
        let (status, body) = json_of(app.post(&path, &token, &body).await).await;
        assert_eq!(status, 200, "{body}");
    }
    ledger_rows(&app, &id, 7).await;

    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = before
            .as_ref()
            .map(|b| format!("&before={b}"))
            .unwrap_or_default();
        let path = format!("/api/users/{id}/credits/transactions?limit=2{q}");
        let (status, page) = json_of(app.get(&path, &token).await).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["user_id"], id);
        let rows = page["transactions"].as_array().unwrap().clone();
        assert!(rows.len() <= 2 && !rows.is_empty(), "{page}");
        seen.extend(rows);
        pages += 1;
        match page["next_before"].as_str() {
            Some(next) => before = Some(next.to_string()),
            None => break,
        }
        assert!(pages < 10, "the pages never end");
    }
    assert_eq!((pages, seen.len()), (4, 7));
    let ids: HashSet<&str> = seen.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 7, "no row twice");
    let times: Vec<&str> = seen
        .iter()
        .map(|t| t["created_at"].as_str().unwrap())
        .collect();
    let parsed: Vec<chrono::DateTime<chrono::Utc>> =
        times.iter().map(|t| t.parse().unwrap()).collect();
    assert!(
        parsed.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    for (row, amount) in [(&seen[5], 1000), (&seen[6], 100)] {
        assert_eq!(
            (row["kind"].as_str(), row["amount"].as_i64()),
            (Some("grant"), Some(amount))
        );
    }
    let mut amounts: Vec<i64> = seen[..5]
        .iter()
        .map(|t| t["amount"].as_i64().unwrap())
        .collect();
    amounts.sort_unstable();
    assert_eq!(amounts, [-5, -4, -3, -2, -1]);
    let three = seen.iter().find(|t| t["amount"] == -3).unwrap();
    assert_eq!(three["kind"], "consume");
    assert_eq!(
        (three["model"].as_str(), three["provider"].as_str()),
        (Some("gpt-x"), Some("openai"))
    );
    assert_eq!(
        (
            three["prompt_tokens"].as_i64(),
            three["completion_tokens"].as_i64()
        ),
        (Some(30), Some(3))
    );
    assert_eq!(three["description"], "call 3");
    assert!(three["price"].is_null());
    let lowest = seen
        .iter()
        .map(|t| t["balance_after"].as_i64().unwrap())
        .min();
    assert_eq!(lowest, Some(100), "the starting credits");
    let newest = seen[..5]
        .iter()
        .map(|t| t["balance_after"].as_i64().unwrap())
        .min();
    assert_eq!(newest, Some(1085));
}

#[tokio::test]
async fn bad_parameters_are_422_naming_them() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    let (other, other_token) = new_user();
    assert_eq!(
        app.get(&format!("/api/users/{other}/profile"), &other_token)
            .await
            .status(),
        200
    );
    let ledger = format!("/api/users/{id}/credits/transactions");
    let unknown = uuid::Uuid::new_v4();
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=ten", "limit"),
        ("before=2024-01-01", "before"),
        (&*format!("before={unknown}"), "before"),
    ] {
        let (status, body) = json_of(app.get(&format!("{ledger}?{query}"), &token).await).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    let (status, _) = json_of(app.get(&format!("{ledger}?limit=200"), &token).await).await;
    assert_eq!(status, 200);
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("query=a%00b", "query"),
    ] {
        let (status, body) = json_of(
            app.get(&format!("/api/admin/users?{query}"), &admin_token())
                .await,
        )
        .await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
}

#[tokio::test]
async fn another_users_reads_are_403_and_an_admin_reaches_anyone() {
    let app = spawn_app().await;
    let (alice, alice_token) = new_user();
    let (bob, bob_token) = new_user();
    assert_eq!(
        app.get(&format!("/api/users/{bob}/profile"), &bob_token)
            .await
            .status(),
        200
    );
    for path in [
        format!("/api/users/{bob}/credits/transactions"),
        format!("/api/users/{bob}/credits/holds"),
    ] {
        assert_eq!(app.get(&path, &alice_token).await.status(), 403, "{path}");
        assert_eq!(app.get(&path, &bob_token).await.status(), 200, "{path}");
        assert_eq!(app.get(&path, &admin_token()).await.status(), 200, "{path}");
    }
    let (status, _) = json_of(app.get("/api/admin/users", &alice_token).await).await;
    assert_eq!(status, 403);
    let (status, limits) = json_of(app.get("/api/vscode/user/limits", &alice_token).await).await;
    assert_eq!(status, 200);
    assert_eq!(
        limits["user_id"], alice,
        "the limits are always the caller's own"
    );
    let (_, limits) = json_of(app.get("/api/vscode/user/limits", &admin_token()).await).await;
    assert_eq!(
        (limits["user_id"].as_str(), limits["admin"].as_bool()),
        (Some("admin_1"), Some(true))
    );
}

#[tokio::test]
async fn open_holds_are_listed_until_released() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (id, token) = new_user();
    grant(&app, &id, 100).await;
    ledger_rows(&app, &id, 2).await;
    let open = format!("/api/users/{id}/credits/holds");
    let body = json!({"amount": 30, "ttl_secs": 600, "model": "m1", "provider": "p1"});
    let (status, hold) = json_of(app.post(&open, &token, &body).await).await;
    assert_eq!(status, 200, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap().to_string();
    let (status, list) = json_of(app.get(&open, &token).await).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["held"], 30);
    let holds = list["holds"].as_array().unwrap();
    assert_eq!(holds.len(), 1, "{list}");
    assert_eq!(
        (holds[0]["hold_id"].as_str(), holds[0]["amount"].as_i64()),
        (Some(&*hold_id), Some(30))
    );
    assert_eq!(holds[0]["expires_at"], hold["expires_at"]);
    // The worker stores the hold's row; its model shows once it has.
    app.eventually(WAIT, || async {
        let (_, l) = json_of(app.get(&open, &token).await).await;
        (l["holds"][0]["model"] == "m1").then_some(())
    })
    .await;
    let release = app
        .client
        .delete(app.url(&format!("{open}/{hold_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(release.status(), 204);
    let (_, list) = json_of(app.get(&open, &token).await).await;
    assert_eq!(
        (
            list["held"].as_i64(),
            list["holds"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );
}

#[tokio::test]
async fn the_admin_search_matches_id_prefixes_and_emails_and_escapes_wildcards() {
    let app = spawn_app().await;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let make = |id: String, email: String| {
        let token = hs_token(&json!({"sub": id, "exp": now() + 3600, "email": email}));
        (id, token)
    };
    let users = [
        make(format!("s{tag}_one"), format!("one.{tag}@example.com")),
        make(format!("s{tag}_two"), format!("Two.{tag}@Example.org")),
        make(format!("s{tag}Xthree"), format!("three{tag}@example.net")),
    ];
    for (id, token) in &users {
        assert_eq!(
            app.get(&format!("/api/users/{id}/profile"), token)
                .await
                .status(),
            200
        );
    }
    let search = |q: String| {
        let app = &app;
        async move {
            let path = format!("/api/admin/users?query={}", urlencode(&q));
            let (status, body) = json_of(app.get(&path, &admin_token()).await).await;
            assert_eq!(status, 200, "{q}: {body}");
            body["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["user_id"].as_str().unwrap().to_string())
                .collect::<std::collections::BTreeSet<_>>()
        }
    };
    let ids = |idx: &[usize]| {
        idx.iter()
            .map(|&i| users[i].0.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    // `_` is a character here, not LIKE's "any one": the X user does not match.
    assert_eq!(search(format!("s{tag}_")).await, ids(&[0, 1]));
    assert_eq!(search(format!("s{tag}")).await, ids(&[0, 1, 2]));
    assert_eq!(
        search(format!("two.{tag}@example")).await,
        ids(&[1]),
        "emails match case-insensitively"
    );
    assert_eq!(search(format!("{tag}@example.n")).await, ids(&[2]));
    assert!(search("%".into()).await.is_empty());
    assert!(search(format!("s{tag}%")).await.is_empty());
    let path = format!("/api/admin/users?query=s{tag}&limit=1");
    let (_, body) = json_of(app.get(&path, &admin_token()).await).await;
    let found = &body["users"][0];
    assert!(users.iter().any(|u| found["user_id"] == u.0), "{body}");
    let found = &app
        .get(
            &format!("/api/admin/users?query={}", users[0].0),
            &admin_token(),
        )
        .await
        .json::<Value>()
        .await
        .unwrap()["users"][0];
    assert_eq!(found["user_id"], users[0].0);
    assert_eq!(found["email"], format!("one.{tag}@example.com"));
    assert_eq!(
        (found["plan"].as_str(), found["status"].as_str()),
        (Some("free"), Some("active"))
    );
    assert_eq!(body["users"].as_array().unwrap().len(), 1);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn header(r: &reqwest::Response, name: &str) -> u64 {
    r.headers()[name].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_limits_agree_with_the_ratelimit_headers_and_spend_nothing_else() {
    let app = spawn_app_with(|v| {
        v.insert(
            "APP__RATE_LIMIT__CLASSES__PROFILE__LIMIT".into(),
            "50".into(),
        );
        v.insert(
            "APP__RATE_LIMIT__CLASSES__ANALYTICS__LIMIT".into(),
            "40".into(),
        );
    })
    .await;
    let (id, token) = new_user();
    let mut analytics_left = 0;
    for _ in 0..3 {
        let r = app.get("/api/vscode/analytics?days=1", &token).await;
        assert_eq!(r.status(), 200);
        analytics_left = header(&r, "ratelimit-remaining");
    }
    for _ in 0..4 {
        assert_eq!(
            app.get(&format!("/api/users/{id}/profile"), &token)
                .await
                .status(),
            200
        );
    }
    let r = app.get("/api/vscode/user/limits", &token).await;
    assert_eq!(r.status(), 200);
    let (limit, left, reset) = (
        header(&r, "ratelimit-limit"),
        header(&r, "ratelimit-remaining"),
        header(&r, "ratelimit-reset"),
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["user_id"].as_str(), body["plan"].as_str()),
        (Some(&*id), Some("free"))
    );
    let profile = &body["limits"]["profile"];
    // The limits request itself is the fifth profile unit: what its headers say.
    assert_eq!(
        (profile["limit"].as_u64(), profile["remaining"].as_u64()),
        (Some(limit), Some(left))
    );
    assert_eq!((limit, left), (50, 45));
    assert_eq!(profile["reset_secs"].as_u64(), Some(reset));
    assert_eq!(profile["source"], "plan");
    let analytics = &body["limits"]["analytics"];
    assert_eq!(
        (analytics["limit"].as_u64(), analytics["remaining"].as_u64()),
        (Some(40), Some(analytics_left))
    );
    assert_eq!(analytics_left, 37);
    // An untouched class is full; the events budget is listed beside the classes.
    assert_eq!(
        body["limits"]["credits"]["remaining"],
        body["limits"]["credits"]["limit"]
    );
    assert_eq!(body["limits"]["credits"]["reset_secs"], 0);
    assert!(body["limits"]["usage_events"]["limit"].as_u64().unwrap() > 0);
    assert_eq!(body["overrides"], json!({}));
    assert_eq!(body["admin"], false);

    // An override shows as the source, and in `overrides`.
    let path = format!("/api/admin/users/{id}/rate-limits");
    let r = app
        .put(
            &path,
            &admin_token(),
            &json!({"class": "usage", "limit": 7, "window_secs": 30}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body = app
        .eventually(WAIT, || async {
            let b: Value = app
                .get("/api/vscode/user/limits", &token)
                .await
                .json()
                .await
                .unwrap();
            (b["limits"]["usage"]["source"] == "override").then_some(b)
        })
        .await;
    assert_eq!(body["limits"]["usage"]["limit"], 7);
    assert_eq!(body["limits"]["usage"]["remaining"], 7);
    assert_eq!(
        body["overrides"],
        json!({"usage": {"limit": 7, "window_secs": 30}})
    );
}
