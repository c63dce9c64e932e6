//! The web's conventions (SPEC §5): CORS for the configured origins, the
//! request id in every answer, its log lines, its audit row and its ledger
//! metadata, and `WWW-Authenticate` on a 401.

use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

const ORIGINS: &str = "https://a.example,vscode-webview://*";

async fn spawn_with_origins() -> TestApp {
    spawn_app_with(|v| {
        v.insert("APP__GATEWAY__CORS_ORIGINS".into(), ORIGINS.into());
        v.insert("APP__GATEWAY__BODY_LIMIT_BYTES".into(), "2048".into());
        v.insert("APP__RATE_LIMIT__AUTH_FAILURES__LIMIT".into(), "2".into());
    })
    .await
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no {name} in {h:?}"))
}

/// The comma-separated members of a header, lower-cased.
fn members(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|m| m.trim().to_ascii_lowercase())
        .collect()
}

fn cors_headers(h: &HeaderMap) -> Vec<String> {
    h.keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("access-control-") || k == "vary")
        .collect()
}

async fn preflight(app: &TestApp, path: &str, origin: &str) -> reqwest::Response {
    app.client
        .request(Method::OPTIONS, app.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "authorization, x-request-id",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_preflight_from_a_configured_origin_is_answered_and_from_another_refused() {
    let app = spawn_with_origins().await;
    for origin in ["https://a.example", "vscode-webview://0a1b2c3d"] {
        let r = preflight(&app, "/api/vscode/analytics", origin).await;
        assert!(
            matches!(r.status().as_u16(), 200 | 204),
            "{origin}: {}",
            r.status()
        );
        let h = r.headers();
        assert_eq!(header(h, "access-control-allow-origin"), origin);
        assert!(members(h, "vary").contains(&"origin".into()), "{h:?}");
        let methods = members(h, "access-control-allow-methods");
        for m in ["get", "post", "put", "patch", "delete"] {
            assert!(methods.contains(&m.into()), "{methods:?}");
        }
        let allowed = members(h, "access-control-allow-headers");
        for a in [
            "authorization",
            "content-type",
            "idempotency-key",
            "x-request-id",
        ] {
            assert!(allowed.contains(&a.into()), "{allowed:?}");
        }
        assert!(h.contains_key("x-request-id"));
    }
    // A preflight on a route of another class, also before any token.
    let r = preflight(&app, "/api/users/u1/credits/consume", "https://a.example").await;
    assert!(r.status().is_success(), "{}", r.status());
    for origin in [
        "https://b.example",
        "https://a.example.evil",
        "http://a.example",
        "null",
    ] {
        let r = preflight(&app, "/api/vscode/analytics", origin).await;
        assert!(!r.status().is_success(), "{origin}: {}", r.status());
        assert_eq!(cors_headers(r.headers()), Vec::<String>::new(), "{origin}");
    }
}

#[tokio::test]
async fn an_answer_to_a_configured_origin_carries_the_cors_headers_and_to_another_none() {
    let app = spawn_with_origins().await;
    let (_, token) = new_user();
    let get = |origin: &'static str, token: Option<String>| {
        let mut rb = app
            .client
            .get(app.url("/api/vscode/user/balance"))
            .header("origin", origin);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };
    let r = get("https://a.example", Some(token.clone())).await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(
        header(h, "access-control-allow-origin"),
        "https://a.example"
    );
    assert!(members(h, "vary").contains(&"origin".into()));
    let exposed = members(h, "access-control-expose-headers");
    for e in [
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
        "x-request-id",
        "idempotent-replayed",
    ] {
        assert!(exposed.contains(&e.into()), "{e} not in {exposed:?}");
    }
    // An error is readable by the page too.
    let r = get("vscode-webview://abc", None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        header(r.headers(), "access-control-allow-origin"),
        "vscode-webview://abc"
    );
    // Another origin: served as without CORS, with no CORS header at all.
    let r = get("https://b.example", Some(token)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cors_headers(r.headers()), Vec::<String>::new());
}

#[tokio::test]
async fn every_answer_carries_the_callers_well_formed_request_id_or_a_new_one() {
    let app = spawn_with_origins().await;
    let (_, token) = new_user();
    let send = |rb: reqwest::RequestBuilder, id: Option<&str>| {
        let rb = match id {
            Some(id) => rb.header("x-request-id", id),
            None => rb,
        };
        async move {
            let r = rb.send().await.unwrap();
            let id = header(r.headers(), "x-request-id").to_string();
            (r.status().as_u16(), id)
        }
    };
    let balance = || app.client.get(app.url("/api/vscode/user/balance"));
    let good = "Web.req_1:a-B";
    assert_eq!(
        send(balance().bearer_auth(&token), Some(good)).await,
        (200, good.into())
    );
    assert_eq!(send(balance(), Some(good)).await, (401, good.into()));
    assert_eq!(
        send(app.client.get(app.url("/api/nope")), Some(good)).await,
        (404, good.into())
    );
    let big = json!({"kind": "feature", "feature": "x".repeat(4096)});
    let track = app
        .client
        .post(app.url("/api/vscode/usage/track"))
        .bearer_auth(&token)
        .json(&big);
    assert_eq!(send(track, Some(good)).await, (413, good.into()));
    // The guard's own 429 (failed authentication over its limit).
    let mut last = (0, String::new());
    for _ in 0..3 {
        last = send(balance().bearer_auth("not-a-token"), Some(good)).await;
    }
    assert_eq!(last, (429, good.into()));
    // A preflight's answer has one too.
    let r = preflight(&app, "/api/vscode/analytics", "https://a.example").await;
    assert_eq!(header(r.headers(), "x-request-id").len(), 32);

    let long = "x".repeat(129);
    let mut fresh = Vec::new();
    for bad in [
        Some(long.as_str()),
        Some("has space"),
        Some("a/b"),
        Some(""),
        None,
    ] {
        let (status, id) = send(balance().bearer_auth(&token), bad).await;
        assert_eq!(status, 200);
        assert_ne!(Some(id.as_str()), bad);
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        fresh.push(id);
    }
    fresh.sort();
    fresh.dedup();
    assert_eq!(fresh.len(), 5, "a new id per request");
}

#[tokio::test]
async fn a_401_challenges_for_a_bearer_token_and_says_when_the_sent_one_was_refused() {
    let app = spawn_app().await;
    let url = app.url("/api/vscode/user/balance");
    let r = app.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let none = header(r.headers(), "www-authenticate");
    assert!(none.starts_with("Bearer "), "{none}");
    assert!(!none.contains("error="), "{none}");
    let r = app
        .client
        .get(&url)
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let refused = header(r.headers(), "www-authenticate");
    assert!(
        refused.starts_with("Bearer ") && refused.contains(r#"error="invalid_token""#),
        "{refused}"
    );
}

#[tokio::test]
async fn a_requests_id_is_in_its_audit_row_and_its_consumes_ledger_metadata() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let grant = |id: &'static str| {
        app.client
            .post(app.url(&format!("/api/admin/users/{user}/credits/grant")))
            .bearer_auth(testkit::admin_token())
            .header("x-request-id", id)
            .json(&json!({"amount": 50, "reason": "web"}))
            .send()
    };
    let r = grant("web-grant-1").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = grant("bad id").await.unwrap();
    assert_eq!(r.status(), 200);
    let answered = header(r.headers(), "x-request-id").to_string();
    let ids: Vec<Option<String>> =
        sqlx::query_scalar("select request_id from audit_log where target = $1 and action = 'credits.grant' order by id")
            .bind(&user)
            .fetch_all(&app.pg)
            .await
            .unwrap();
    assert_eq!(
        ids,
        [Some("web-grant-1".to_string()), Some(answered)],
        "the answer's id, also when replaced"
    );

    let consume = |id: &'static str, metadata: Value| {
        app.client
            .post(app.url(&format!("/api/users/{user}/credits/consume")))
            .bearer_auth(&token)
            .header("x-request-id", id)
            .json(&json!({"amount": 1, "metadata": metadata}))
            .send()
    };
    let mut txs = Vec::new();
    for (id, metadata) in [
        ("web-consume-1", json!({"k": "v"})),
        ("web-consume-2", json!({"request_id": "clients-own"})),
    ] {
        let r = consume(id, metadata).await.unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        txs.push(
            body["transaction_id"]
                .as_str()
                .unwrap()
                .parse::<uuid::Uuid>()
                .unwrap(),
        );
    }
    let metadata = |tx: uuid::Uuid| {
        let pg = app.pg.clone();
        async move {
            sqlx::query_scalar::<_, Option<Value>>(
                "select metadata from credit_transactions where id = $1",
            )
            .bind(tx)
            .fetch_optional(&pg)
            .await
            .unwrap()
            .flatten()
        }
    };
    let first = app
        .eventually(Duration::from_secs(10), || metadata(txs[0]))
        .await;
    assert_eq!(first, json!({"k": "v", "request_id": "web-consume-1"}));
    let second = app
        .eventually(Duration::from_secs(10), || metadata(txs[1]))
        .await;
    assert_eq!(
        second,
        json!({"request_id": "clients-own"}),
        "a client's own key is kept"
    );
}

/// The gateway binary with JSON logs; its stdout lines land in the vector.
struct Logged {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    base: String,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn logged_gateway(app: &TestApp) -> Logged {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-gateway"))
        .env_clear()
        .envs(&app.vars)
        .env("APP_ENV", "production")
        .env("AUTH_DEV_TOKENS", "false")
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn,gateway=debug,sqlx::query=debug")
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let logged = Logged {
        child,
        lines,
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = app
            .client
            .get(format!("{}/readyz", logged.base))
            .send()
            .await
        {
            if r.status() == 200 {
                return logged;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway binary never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON lines whose span (or an enclosing one) has `request_id == id`.
fn lines_of(lines: &[String], id: &str) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["spans"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(std::iter::once(&v["span"]))
                .any(|s| s["request_id"] == id)
        })
        .collect()
}

#[tokio::test]
async fn every_log_line_of_a_request_carries_its_id() {
    let app = spawn_app().await;
    let gw = logged_gateway(&app).await;
    let (_, token) = new_user();
    let ask = |id: &'static str| {
        app.client
            .get(format!("{}/api/vscode/user/balance", gw.base))
            .bearer_auth(&token)
            .header("x-request-id", id)
            .send()
    };
    // The first request of a new user reads Postgres (sqlx logs each query).
    assert_eq!(ask("web-log-1").await.unwrap().status(), 200);
    assert_eq!(ask("web-log-2").await.unwrap().status(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (first, second) = loop {
        let lines = gw.lines.lock().unwrap().clone();
        let (first, second) = (lines_of(&lines, "web-log-1"), lines_of(&lines, "web-log-2"));
        let done = |ls: &[Value]| ls.iter().any(|l| l["message"] == "answered");
        if done(&first) && done(&second) {
            break (first, second);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `answered` lines in {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        first
            .iter()
            .any(|l| l["target"].as_str().is_some_and(|t| t.starts_with("sqlx"))),
        "the handler's own lines (its queries) carry the id: {first:#?}"
    );
    let answered = first.iter().find(|l| l["message"] == "answered").unwrap();
    assert_eq!(answered["status"], 200);
    assert_eq!(answered["level"], "DEBUG");
    // No line is counted for both requests.
    for l in &second {
        assert!(!first.contains(l), "{l}");
    }
}
