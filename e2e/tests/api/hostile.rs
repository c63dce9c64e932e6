//! Issue 16 as a hostile user would try it, against the real gateway, worker,
//! Postgres, Redis and RabbitMQ: values the stores refuse are 422 at the door
//! (docs/reliability.md "A valid stored value"), and nothing one user sends costs another
//! user an event or a charge (docs/events.md, §9.1, §9.2).

use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};

use crate::helpers::*;

/// Every value class the stores refuse, in every free-text field, metadata
/// key and value, and count of a usage event.
fn hostile_tracks() -> Vec<Value> {
    let model = || {
        json!({"kind": "model", "provider": "openai", "model": "gpt-4o",
               "prompt_tokens": 1, "completion_tokens": 1})
    };
    let feature = || json!({"kind": "feature", "feature": "chat"});
    let mut out = Vec::new();
    for field in ["provider", "model", "session_id"] {
        for bad in ["a\u{0}b", "\u{1}", "x\u{7f}", "bell\u{7}", "nl\nx"] {
            let mut e = model();
            e[field] = json!(bad);
            out.push(e);
        }
    }
    for field in ["feature", "action"] {
        let mut e = feature();
        e[field] = json!("f\u{0}");
        out.push(e);
    }
    for meta in [
        json!({"k": "\u{0}"}),
        json!({"k\u{0}": "v"}),
        json!({"a": {"b": ["ok", "\u{0}"]}}),
        json!({"esc": "\u{1b}[31m"}),
    ] {
        let mut e = feature();
        e["metadata"] = meta;
        out.push(e);
    }
    for (field, n) in [
        ("prompt_tokens", json!(9_223_372_036_854_775_000i64)),
        ("completion_tokens", json!(1_000_000_001)),
        ("latency_ms", json!(i64::MAX)),
    ] {
        let mut e = model();
        e[field] = n;
        out.push(e);
    }
    let mut e = feature();
    e["duration_ms"] = json!(4_611_686_018_427_387_904i64);
    out.push(e);
    out.push(json!({"modelId": "m\u{0}", "tokensUsed": 5}));
    out.push(json!({"modelId": "m", "tokensUsed": 9_223_372_036_854_775_807i64}));
    // A batch with one bad event refuses the whole request.
    let mut bad = model();
    bad["model"] = json!("\u{0}");
    out.push(json!({"events": [model(), bad]}));
    out
}

fn hostile_consumes() -> Vec<Value> {
    let mut out = Vec::new();
    for field in [
        "description",
        "model",
        "modelId",
        "provider",
        "session_id",
        "sessionId",
        "feature",
    ] {
        for bad in ["a\u{0}b", "\u{2}"] {
            let mut b = json!({"amount": 40});
            b[field] = json!(bad);
            out.push(b);
        }
    }
    for meta in [json!({"k": "\u{0}"}), json!({"k\u{0}": 1})] {
        out.push(json!({"amount": 40, "metadata": meta}));
    }
    out.push(json!({"amount": 40, "prompt_tokens": 9_223_372_036_854_775_807i64}));
    out.push(json!({"amount": 40, "tokensUsed": 1_000_000_001}));
    out
}

fn hostile_holds() -> Vec<Value> {
    vec![
        json!({"amount": 5, "model": "m\u{0}"}),
        json!({"amount": 5, "provider": "\u{0}"}),
        json!({"amount": 5, "session_id": "s\u{0}"}),
        json!({"amount": 5, "metadata": {"k": "\u{0}"}}),
    ]
}

const HOSTILE_QUERIES: [&str; 6] = [
    "to=-262143-01-01",
    "from=-4713-11-24",
    "to=0001-01-01",
    "from=1969-12-31&to=1970-01-02",
    "to=10000-01-01",
    "from=0000-01-01T00:00:00Z",
];

struct Normal {
    id: String,
    token: String,
    accepted: Vec<String>,
    charged: Vec<String>,
}

#[tokio::test]
async fn normal_users_lose_nothing_while_a_hostile_user_sends_every_refused_value() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (hostile_id, hostile) = new_user();
    let mut normals: Vec<Normal> = (0..10)
        .map(|_| {
            let (id, token) = new_user();
            Normal {
                id,
                token,
                accepted: Vec::new(),
                charged: Vec::new(),
            }
        })
        .collect();

    // The hostile user: every refused value, in a loop, while the others work.
    let attacker = {
        let (client, base, token) = (app.client.clone(), app.url(""), hostile.clone());
        let hostile_id = hostile_id.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _round in 0..3 {
                for body in hostile_tracks() {
                    let r = client
                        .post(format!("{base}/api/vscode/usage/track"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    statuses.push(("track", body.to_string(), r.status().as_u16()));
                }
                for body in hostile_consumes() {
                    let r = client
                        .post(format!("{base}/api/users/{hostile_id}/credits/consume"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    statuses.push(("consume", body.to_string(), r.status().as_u16()));
                }
                for body in hostile_holds() {
                    let r = client
                        .post(format!("{base}/api/users/{hostile_id}/credits/holds"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    statuses.push(("hold", body.to_string(), r.status().as_u16()));
                }
                for q in HOSTILE_QUERIES {
                    let r = client
                        .get(format!("{base}/api/users/{hostile_id}/usage/stats?{q}"))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .unwrap();
                    statuses.push(("stats", q.to_string(), r.status().as_u16()));
                }
                let r = client
                    .patch(format!("{base}/api/users/{hostile_id}/preferences"))
                    .bearer_auth(&token)
                    .json(&json!({"theme\u{0}": "x", "k": "\u{0}"}))
                    .send()
                    .await
                    .unwrap();
                statuses.push(("preferences", String::new(), r.status().as_u16()));
            }
            statuses
        })
    };

    // Ten normal users track and consume concurrently.
    let mut tasks = Vec::new();
    for (n, user) in normals.iter().enumerate() {
        let (client, base) = (app.client.clone(), app.url(""));
        let (id, token) = (user.id.clone(), user.token.clone());
        tasks.push(tokio::spawn(async move {
            let (mut accepted, mut charged) = (Vec::new(), Vec::new());
            for i in 0..20 {
                let event_id = uuid::Uuid::new_v4().to_string();
                let event = if i % 2 == 0 {
                    json!({"event_id": event_id, "kind": "model", "provider": "openai",
                           "model": format!("gpt-{n}"), "prompt_tokens": 10, "completion_tokens": 5,
                           "metadata": {"file": "main.rs", "note": "tab\tand\nnewline"}})
                } else {
                    json!({"event_id": event_id, "kind": "feature", "feature": "chat"})
                };
                let r = client
                    .post(format!("{base}/api/vscode/usage/track"))
                    .bearer_auth(&token)
                    .json(&event)
                    .send()
                    .await
                    .unwrap();
                if r.status() == 202 {
                    accepted.push(event_id);
                }
                let r = client
                    .post(format!("{base}/api/users/{id}/credits/consume"))
                    .bearer_auth(&token)
                    .json(&json!({"amount": 1, "model": "gpt-4o", "description": format!("call {i}")}))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    let body: Value = r.json().await.unwrap();
                    charged.push(body["transaction_id"].as_str().unwrap().to_string());
                }
            }
            (accepted, charged)
        }));
    }
    for (user, task) in normals.iter_mut().zip(tasks) {
        let (accepted, charged) = task.await.unwrap();
        user.accepted = accepted;
        user.charged = charged;
    }
    let statuses = attacker.await.unwrap();

    // The hostile user got 422s only, and nothing of theirs was stored.
    for (what, body, status) in &statuses {
        assert_eq!(*status, 422, "{what} {body} answered {status}");
    }
    assert!(statuses.len() > 150, "{} hostile requests", statuses.len());

    // Every normal user's accepted event is stored exactly once, and every
    // answered charge is exactly one ledger row.
    for user in &normals {
        assert_eq!(user.accepted.len(), 20, "{} tracked", user.id);
        assert_eq!(user.charged.len(), 20, "{} charged", user.id);
        let ids: Vec<uuid::Uuid> = user.accepted.iter().map(|s| s.parse().unwrap()).collect();
        let tx: Vec<uuid::Uuid> = user.charged.iter().map(|s| s.parse().unwrap()).collect();
        let (pg, uid) = (app.pg.clone(), user.id.clone());
        app.eventually(Duration::from_secs(30), || {
            let (pg, ids, tx, uid) = (pg.clone(), ids.clone(), tx.clone(), uid.clone());
            async move {
                let stored: i64 = sqlx::query_scalar(
                    "select (select count(*) from model_usage where id = any($1)) \
                          + (select count(*) from feature_usage where id = any($1))",
                )
                .bind(&ids)
                .fetch_one(&pg)
                .await
                .unwrap();
                let rows: i64 = sqlx::query_scalar(
                    "select count(*) from credit_transactions \
                     where user_id = $1 and kind = 'consume' and id = any($2)",
                )
                .bind(&uid)
                .bind(&tx)
                .fetch_one(&pg)
                .await
                .unwrap();
                (stored == 20 && rows == 20).then_some(())
            }
        })
        .await;
        let (balance, ledger, consumes): (i64, i64, i64) = sqlx::query_as(
            "select u.credits_balance, \
                    (select sum(amount)::int8 from credit_transactions t where t.user_id = u.id), \
                    (select count(*) from credit_transactions t where t.user_id = u.id and kind = 'consume') \
             from users u where u.id = $1",
        )
        .bind(&user.id)
        .fetch_one(&app.pg)
        .await
        .unwrap();
        assert_eq!(
            consumes, 20,
            "{}: one ledger row per answered charge",
            user.id
        );
        assert_eq!((balance, ledger), (80, 80), "{}", user.id);
        let api: Value = app
            .get("/api/vscode/user/balance", &user.token)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(api["balance"], 80, "{}: {api}", user.id);
    }
    let hostile_rows = app
        .count(&format!(
            "select (select count(*) from model_usage where user_id = '{hostile_id}') \
                  + (select count(*) from feature_usage where user_id = '{hostile_id}') \
                  + (select count(*) from credit_transactions where user_id = '{hostile_id}' and kind <> 'grant')"
        ))
        .await;
    assert_eq!(hostile_rows, 0, "nothing of the hostile user's was stored");
    let api: Value = app
        .get("/api/vscode/user/balance", &hostile)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(api["balance"], 100, "the hostile user was charged nothing");
}

/// Arbitrary text: mostly text a store takes (any non-control scalar value,
/// non-BMP included, up to long lengths), else anything at all (NUL, other
/// controls, tab/CR/LF), so both outcomes are exercised in every run.
fn arb_text() -> impl Strategy<Value = String> {
    let clean = prop_oneof![
        3 => any::<char>().prop_filter("not a control", |c| !c.is_control()),
        1 => prop::sample::select(vec!['\u{200b}', '\u{feff}', '\u{fffd}', '\u{ffff}', '\u{10ffff}', '🚀', 'é', ' ']),
        4 => prop::char::range('a', 'z'),
    ];
    let wild = prop_oneof![
        2 => any::<char>(),
        2 => prop::sample::select(vec!['\0', '\t', '\n', '\r', '\u{1}', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}']),
        3 => prop::char::range('a', 'z'),
    ];
    let text = |ch: BoxedStrategy<char>| {
        prop_oneof![
            8 => prop::collection::vec(ch.clone(), 1..24),
            1 => prop::collection::vec(ch.clone(), 0..1),
            1 => prop::collection::vec(ch, 100..1200),
        ]
        .prop_map(|cs| cs.into_iter().collect::<String>())
    };
    prop_oneof![8 => text(clean.boxed()), 2 => text(wild.boxed())]
}

fn arb_count() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => (0i64..=2000).prop_map(|n| json!(n)),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => any::<u64>().prop_map(|n| json!(n)),
        1 => prop::sample::select(vec![
            json!(0), json!(1_000_000_000), json!(1_000_000_001), json!(9_007_199_254_740_993i64),
            json!(i64::MAX), json!(-1), json!(u64::MAX), json!(1.5),
        ]),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    model: String,
    description: String,
    meta_key: String,
    meta_value: String,
    tokens: Value,
}

fn arb_case() -> impl Strategy<Value = Case> {
    (arb_text(), arb_text(), arb_text(), arb_text(), arb_count()).prop_map(
        |(model, description, meta_key, meta_value, tokens)| Case {
            model,
            description,
            meta_key,
            meta_value,
            tokens,
        },
    )
}

/// Either 422 `validation_failed` naming a field, or the value is in
/// Postgres exactly as sent: nothing accepted is lost, nothing refused is stored.
#[tokio::test]
async fn arbitrary_strings_and_integers_are_either_refused_or_stored_exactly_as_sent() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let grant = app
        .post(
            &format!("/api/admin/users/{user}/credits/grant"),
            &admin_token(),
            &json!({"amount": 100_000, "reason": "property test"}),
        )
        .await;
    assert_eq!(grant.status(), 200);

    let mut runner = TestRunner::deterministic();
    let strategy = arb_case();
    let (mut events, mut charges) = (Vec::new(), Vec::new());
    let (mut refused_tracks, mut refused_consumes) = (0, 0);
    for _ in 0..160 {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        let event_id = uuid::Uuid::new_v4();
        let track = json!({"event_id": event_id, "kind": "model", "provider": "prop",
                           "model": case.model, "prompt_tokens": case.tokens, "completion_tokens": 1,
                           "metadata": {case.meta_key.clone(): case.meta_value}});
        let r = app.post("/api/vscode/usage/track", &token, &track).await;
        match r.status().as_u16() {
            202 => events.push((event_id, case.clone())),
            422 => {
                let p: Value = r.json().await.unwrap();
                assert_eq!(p["code"], "validation_failed", "{p}");
                assert!(
                    ["model", "prompt_tokens", "metadata"]
                        .iter()
                        .any(|f| p["detail"].as_str().unwrap_or("").contains(f)),
                    "the 422 names the field: {p}"
                );
                refused_tracks += 1;
            }
            s => panic!("track of {case:?} answered {s}"),
        }
        let consume = json!({"amount": 1, "model": case.model, "description": case.description,
                             "prompt_tokens": case.tokens, "metadata": {case.meta_key.clone(): case.meta_value}});
        let r = app
            .post(
                &format!("/api/users/{user}/credits/consume"),
                &token,
                &consume,
            )
            .await;
        match r.status().as_u16() {
            200 => {
                let body: Value = r.json().await.unwrap();
                let tx: uuid::Uuid = body["transaction_id"].as_str().unwrap().parse().unwrap();
                charges.push((tx, case));
            }
            422 => {
                let p: Value = r.json().await.unwrap();
                assert_eq!(p["code"], "validation_failed", "{p}");
                refused_consumes += 1;
            }
            s => panic!("consume of {case:?} answered {s}"),
        }
    }
    eprintln!(
        "property cases: {} tracks stored, {refused_tracks} refused; {} consumes charged, {refused_consumes} refused",
        events.len(),
        charges.len()
    );
    assert!(
        !events.is_empty() && refused_tracks > 0 && !charges.is_empty() && refused_consumes > 0,
        "the cases cover both outcomes: {} stored, {refused_tracks} refused; {} charged, {refused_consumes} refused",
        events.len(),
        charges.len()
    );

    // Everything accepted lands, as sent.
    let want_events = events.len() as i64;
    let want_charges = charges.len() as i64;
    let pg = app.pg.clone();
    let u = user.clone();
    app.eventually(Duration::from_secs(30), || {
        let (pg, u) = (pg.clone(), u.clone());
        async move {
            let m: i64 = sqlx::query_scalar("select count(*) from model_usage where user_id = $1")
                .bind(&u)
                .fetch_one(&pg)
                .await
                .unwrap();
            let c: i64 = sqlx::query_scalar(
                "select count(*) from credit_transactions where user_id = $1 and kind = 'consume'",
            )
            .bind(&u)
            .fetch_one(&pg)
            .await
            .unwrap();
            (m >= want_events && c >= want_charges).then_some(())
        }
    })
    .await;
    assert_eq!(
        app.count(&format!(
            "select count(*) from model_usage where user_id = '{user}'"
        ))
        .await,
        want_events,
        "no refused event was stored"
    );
    for (id, case) in &events {
        let (model, tokens, meta): (String, i64, Value) =
            sqlx::query_as("select model, prompt_tokens, metadata from model_usage where id = $1")
                .bind(id)
                .fetch_one(&app.pg)
                .await
                .unwrap();
        assert_eq!(model, case.model);
        assert_eq!(json!(tokens), case.tokens);
        assert_eq!(meta, json!({case.meta_key.clone(): case.meta_value}));
    }
    let mut seen = HashSet::new();
    for (tx, case) in &charges {
        let (amount, description, model): (i64, Option<String>, Option<String>) = sqlx::query_as(
            "select amount, description, model from credit_transactions where id = $1 and kind = 'consume'",
        )
        .bind(tx)
        .fetch_one(&app.pg)
        .await
        .unwrap();
        assert_eq!(amount, -1);
        assert_eq!(description.as_deref(), Some(case.description.as_str()));
        assert_eq!(model.as_deref(), Some(case.model.as_str()));
        assert!(seen.insert(*tx), "one ledger row per charge");
    }
    let (balance, ledger): (i64, i64) = sqlx::query_as(
        "select u.credits_balance, (select sum(amount)::int8 from credit_transactions t where t.user_id = u.id) \
         from users u where u.id = $1",
    )
    .bind(&user)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(balance, 100 + 100_000 - want_charges);
    assert_eq!(ledger, balance);
}
