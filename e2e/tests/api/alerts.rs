//! SPEC §5.11 (alerts) against the real gateway, worker and services: one
//! alert per crossing, delivered to a real HTTP receiver started here, signed
//! per Standard Webhooks (recomputed here with the secret the PUT showed),
//! retried while the receiver fails, never again once it acknowledged; bad
//! configurations change nothing; production refuses internal targets.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::credits::{consume, ledger};
use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(20);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    answered: u16,
}

/// A webhook receiver on 127.0.0.1: records every request and answers 500
/// to the next `fail` ones, 200 after.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    fail: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let r = Receiver::default();
        let state = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let state = state.clone();
                async move {
                    let failing = state
                        .fail
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    let status = if failing {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    };
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    state.got.lock().unwrap().push(Received {
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp"),
                        signature: h("webhook-signature"),
                        body,
                        answered: status.as_u16(),
                    });
                    status
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, url)
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// The Standard Webhooks signature, computed here from the secret's bytes.
fn expected_signature(secret: &str, r: &Received) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", r.id, r.timestamp, r.body).as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// A gateway and worker that poll for deliveries every 100 ms and retry
/// after 200–400 ms.
async fn app() -> TestApp {
    let app = spawn_app_with(|v| {
        v.insert("APP__ALERTS__POLL_INTERVAL_MS".into(), "100".into());
        v.insert("APP__ALERTS__BACKOFF_BASE_MS".into(), "200".into());
        v.insert("APP__ALERTS__BACKOFF_MAX_MS".into(), "400".into());
        v.insert("APP__ALERTS__TIMEOUT_MS".into(), "2000".into());
    })
    .await;
    app.start_worker().await;
    app
}

async fn put_alerts(app: &TestApp, user: &str, token: &str, body: &Value) -> (u16, Value) {
    let r = app
        .put(&format!("/api/users/{user}/alerts"), token, body)
        .await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_json(app: &TestApp, path: &str, token: &str) -> Value {
    let r = app.get(path, token).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

/// Consumes and waits until the worker wrote its ledger row.
async fn consume_landed(app: &TestApp, user: &str, token: &str, amount: i64) {
    let rows = ledger(app, user).await.2;
    let (status, body, _) = consume(app, user, token, amount, None).await;
    assert_eq!(status, 200, "{body}");
    app.eventually(WAIT, || async {
        (ledger(app, user).await.2 > rows).then_some(())
    })
    .await;
}

async fn grant(app: &TestApp, user: &str, amount: i64) {
    let r = app
        .post(
            &format!("/api/admin/users/{user}/credits/grant"),
            &admin_token(),
            &json!({"amount": amount, "reason": "alerts test"}),
        )
        .await;
    assert_eq!(r.status(), 200);
}

async fn alert_rows(app: &TestApp, user: &str) -> i64 {
    sqlx::query_scalar("select count(*) from alerts where owner_id = $1")
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

#[tokio::test]
async fn one_signed_delivery_per_crossing_retried_while_the_receiver_fails_and_never_after_its_2xx()
{
    let app = app().await;
    let (receiver, url) = Receiver::start().await;
    let (user, token) = new_user();
    let (status, config) = put_alerts(
        &app,
        &user,
        &token,
        &json!({"thresholds": [{"kind": "balance_below", "value": 50}], "webhook_url": url}),
    )
    .await;
    assert_eq!(status, 200, "{config}");
    let secret = config["webhook_secret"]
        .as_str()
        .expect("the secret is shown once")
        .to_string();
    assert_eq!(config["webhook_url"], url.as_str());

    // The first two attempts fail; the third is acknowledged.
    receiver.fail.store(2, Ordering::SeqCst);
    consume_landed(&app, &user, &token, 60).await; // 100 → 40: crosses 50
    consume_landed(&app, &user, &token, 5).await; // 40 → 35: already below
    let got = app
        .eventually(WAIT, || async {
            let got = receiver.got();
            got.iter().any(|r| r.answered == 200).then_some(got)
        })
        .await;
    assert_eq!(
        got.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    let first_id = got[0].id.clone();
    assert!(
        got.iter().all(|r| r.id == first_id),
        "one webhook-id across retries: {got:?}"
    );
    for r in &got {
        assert_eq!(r.signature, expected_signature(&secret, r), "{r:?}");
        assert!((r.timestamp.parse::<i64>().unwrap() - chrono::Utc::now().timestamp()).abs() < 60);
    }
    let body: Value = serde_json::from_str(&got[2].body).unwrap();
    assert_eq!(body["type"], "credits.alert");
    assert_eq!(body["data"]["alert_id"], first_id.as_str());
    assert_eq!(body["data"]["kind"], "balance_below");
    assert_eq!(body["data"]["value"], 50);
    assert_eq!(body["data"]["balance"], 40);
    assert_eq!(body["data"]["user_id"], user.as_str());

    // Re-armed by a grant above the value, crossed again by a consume.
    grant(&app, &user, 100).await; // 35 → 135
    consume_landed(&app, &user, &token, 100).await; // 135 → 35: a second crossing
    let second = app
        .eventually(WAIT, || async {
            let got = receiver.got();
            (got.len() > 3 && got.iter().filter(|r| r.answered == 200).count() == 2).then_some(got)
        })
        .await;
    assert_ne!(second[3].id, first_id);
    assert_eq!(second[3].signature, expected_signature(&secret, &second[3]));

    // Acknowledged alerts are never sent again: watch the receiver for 3 s
    // (about 30 polls and several backoff periods).
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        assert_eq!(receiver.got().len(), 4, "a delivered alert was sent again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alert_rows(&app, &user).await, 2);

    let list = get_json(&app, "/api/vscode/user/alerts", &token).await;
    let alerts = list["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 2, "{list}");
    assert_eq!(alerts[0]["id"], second[3].id.as_str(), "newest first");
    assert_eq!(alerts[1]["id"], first_id.as_str());
    for a in alerts {
        assert_eq!(
            (
                a["kind"].as_str(),
                a["value"].as_i64(),
                a["delivered"].as_bool()
            ),
            (Some("balance_below"), Some(50), Some(true))
        );
        assert!(a["at"].as_str().unwrap().ends_with('Z'));
    }
}

#[tokio::test]
async fn alerts_without_a_webhook_are_listed_undelivered_and_spent_pct_fires_once_a_month() {
    let app = app().await;
    let (user, token) = new_user();
    let (status, config) = put_alerts(
        &app,
        &user,
        &token,
        &json!({"thresholds": [{"kind": "spent_pct", "value": 50}, {"kind": "spent_pct", "value": 90}]}),
    )
    .await;
    assert_eq!(status, 200, "{config}");
    assert!(config.get("webhook_secret").is_none());
    consume_landed(&app, &user, &token, 30).await; // 30 % of 100
    assert_eq!(alert_rows(&app, &user).await, 0);
    consume_landed(&app, &user, &token, 30).await; // 60 %: crosses 50
    consume_landed(&app, &user, &token, 10).await; // 70 %: still only 50
    assert_eq!(alert_rows(&app, &user).await, 1);
    let list = get_json(&app, "/api/vscode/user/alerts", &token).await;
    assert_eq!(list["alerts"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["alerts"][0]["kind"], "spent_pct");
    assert_eq!(list["alerts"][0]["value"], 50);
    assert_eq!(list["alerts"][0]["delivered"], false);
    // Another user sees none of them.
    let (_, other) = new_user();
    assert_eq!(
        get_json(&app, "/api/vscode/user/alerts", &other).await,
        json!({"alerts": []})
    );
}

#[tokio::test]
async fn bad_configurations_are_422_and_change_nothing() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let good = json!({"thresholds": [{"kind": "balance_below", "value": 10}], "webhook_url": "http://127.0.0.1:9/hook"});
    let (status, _) = put_alerts(&app, &user, &token, &good).await;
    assert_eq!(status, 200);
    let before = get_json(&app, &format!("/api/users/{user}/alerts"), &token).await;
    assert!(before.get("webhook_secret").is_none(), "{before}");
    let eleven: Vec<Value> = (1..=11)
        .map(|v| json!({"kind": "spent_pct", "value": v}))
        .collect();
    for bad in [
        json!({"thresholds": [{"kind": "balance_above", "value": 5}]}),
        json!({"thresholds": [{"kind": "spent_pct", "value": 0}]}),
        json!({"thresholds": [{"kind": "spent_pct", "value": 101}]}),
        json!({"thresholds": [{"kind": "balance_below", "value": 9007199254740992_i64}]}),
        json!({"thresholds": [{"kind": "balance_below", "value": 1.5}]}),
        json!({ "thresholds": eleven }),
        json!({"thresholds": [], "webhook_url": "http://127.0.0.1:9/ho\u{0}ok"}),
        json!({"thresholds": [], "webhook_url": "ftp://127.0.0.1/hook"}),
        json!({"thresholds": [], "webhook_url": "x".repeat(3000)}),
        json!({"thresholds": "none"}),
    ] {
        let (status, problem) = put_alerts(&app, &user, &token, &bad).await;
        assert_eq!(status, 422, "{bad}: {problem}");
        assert_eq!(problem["code"], "validation_failed", "{bad}");
    }
    assert_eq!(
        get_json(&app, &format!("/api/users/{user}/alerts"), &token).await,
        before
    );
    // Another user's alerts are out of reach; an admin reaches them.
    let (_, other) = new_user();
    assert_eq!(
        app.get(&format!("/api/users/{user}/alerts"), &other)
            .await
            .status(),
        403
    );
    assert_eq!(put_alerts(&app, &user, &other, &good).await.0, 403);
    assert_eq!(
        app.get(&format!("/api/users/{user}/alerts"), &admin_token())
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn the_secret_is_shown_for_a_new_url_or_a_rotation_and_export_and_erasure_cover_alerts() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let body = |rotate: bool| json!({"thresholds": [{"kind": "spent_pct", "value": 80}], "webhook_url": "http://127.0.0.1:9/a", "rotate_secret": rotate});
    let first = put_alerts(&app, &user, &token, &body(false)).await.1;
    let secret = first["webhook_secret"].as_str().unwrap().to_string();
    let again = put_alerts(&app, &user, &token, &body(false)).await.1;
    assert!(again.get("webhook_secret").is_none(), "{again}");
    let rotated = put_alerts(&app, &user, &token, &body(true)).await.1;
    let new = rotated["webhook_secret"].as_str().unwrap();
    assert_ne!(new, secret);
    // Each PUT is audited with its request id: the thresholds and what became of the webhook,
    // never its URL or secret.
    let audited: Vec<(String, Option<String>, Value)> = sqlx::query_as(
        "select actor, request_id, details from audit_log where action = 'alerts.set' and target = $1 order by id",
    )
    .bind(&user)
    .fetch_all(&app.pg)
    .await
    .unwrap();
    let shape: Vec<(&str, &Value, &Value)> = audited
        .iter()
        .map(|(actor, _, d)| (actor.as_str(), &d["webhook"], &d["new_secret"]))
        .collect();
    assert_eq!(
        shape,
        [
            (user.as_str(), &json!("set"), &json!(true)),
            (user.as_str(), &json!("kept"), &json!(false)),
            (user.as_str(), &json!("kept"), &json!(true)),
        ]
    );
    for (_, rid, details) in &audited {
        assert!(rid.as_deref().is_some_and(|r| !r.is_empty()));
        assert_eq!(
            details["thresholds"],
            json!([{"kind": "spent_pct", "value": 80}])
        );
        let text = details.to_string();
        assert!(
            !text.contains("127.0.0.1") && !text.contains(new) && !text.contains(&secret),
            "{text}"
        );
    }

    let export = get_json(&app, &format!("/api/users/{user}/export"), &token).await;
    let configs = export["alert_configs"].as_array().unwrap();
    assert_eq!(configs.len(), 1);
    assert_eq!(configs[0]["thresholds"][0]["kind"], "spent_pct");
    assert!(
        !export.to_string().contains(new),
        "the export never holds the secret"
    );
    assert!(export["alerts"].is_array());

    let r = app
        .client
        .delete(app.url(&format!("/api/users/{user}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let left: i64 = sqlx::query_scalar(
        "select (select count(*) from alert_configs where owner_id = $1) + (select count(*) from alert_thresholds where owner_id = $1)",
    )
    .bind(&user)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn production_refuses_plain_http_and_internal_webhook_addresses() {
    let app = spawn_app_with(|v| {
        v.insert("APP_ENV".into(), "production".into());
        v.insert("AUTH_DEV_TOKENS".into(), "false".into());
    })
    .await;
    let (user, token) = new_user();
    for url in [
        "http://hooks.example.com/a",
        "https://10.0.0.1/a",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/a",
        "https://127.0.0.1/a",
        "https://localhost/a",
    ] {
        let (status, problem) = put_alerts(
            &app,
            &user,
            &token,
            &json!({"thresholds": [], "webhook_url": url}),
        )
        .await;
        assert_eq!(status, 422, "{url}: {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains("webhook_url"),
            "{problem}"
        );
    }
    let stored: i64 = sqlx::query_scalar("select count(*) from alert_configs")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn an_organizations_alerts_watch_its_pool_and_name_it() {
    let app = app().await;
    let (receiver, url) = Receiver::start().await;
    let org = format!("org_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let admin = admin_token();
    let r = app
        .put(
            &format!("/api/admin/orgs/{org}"),
            &admin,
            &json!({"name": "Acme", "plan": "team"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .post(
            &format!("/api/admin/orgs/{org}/credits/grant"),
            &admin,
            &json!({"amount": 100, "reason": "pool"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (user, token) = new_user();
    let r = app
        .put(
            &format!("/api/orgs/{org}/members/{user}"),
            &admin,
            &json!({"role": "member"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    // A member may not set the organization's alerts; its admins (here an admin) may.
    let body = json!({"thresholds": [{"kind": "balance_below", "value": 50}], "webhook_url": url});
    let r = app
        .put(&format!("/api/orgs/{org}/alerts"), &token, &body)
        .await;
    assert_eq!(r.status(), 403);
    let r = app
        .put(&format!("/api/orgs/{org}/alerts"), &admin, &body)
        .await;
    assert_eq!(r.status(), 200);
    let config: Value = r.json().await.unwrap();
    let secret = config["webhook_secret"]
        .as_str()
        .expect("the secret")
        .to_string();

    consume_landed(&app, &user, &token, 60).await; // pool 100 → 40: crosses 50
    consume_landed(&app, &user, &token, 5).await; // 40 → 35: already below
    let got = app
        .eventually(WAIT, || async {
            let got = receiver.got();
            (!got.is_empty()).then_some(got)
        })
        .await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].signature, expected_signature(&secret, &got[0]));
    let sent: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(sent["data"]["org_id"], json!(org), "{sent}");
    assert_eq!(sent["data"]["balance"], 40, "{sent}");
    let recent = app
        .eventually(WAIT, || async {
            let v = get_json(&app, &format!("/api/orgs/{org}/alerts/recent"), &admin).await;
            (v["alerts"][0]["delivered"] == json!(true)).then_some(v)
        })
        .await;
    assert_eq!(recent["alerts"].as_array().unwrap().len(), 1, "{recent}");
    // The member's own alerts are the member's (none: their balance did not move).
    let mine = get_json(&app, "/api/vscode/user/alerts", &token).await;
    assert_eq!(mine["alerts"], json!([]), "{mine}");
    let cfg = get_json(&app, &format!("/api/orgs/{org}/alerts"), &admin).await;
    assert_eq!(cfg["thresholds"][0]["value"], 50, "{cfg}");
    assert!(
        cfg.get("webhook_secret").is_none_or(Value::is_null),
        "{cfg}"
    );
}
