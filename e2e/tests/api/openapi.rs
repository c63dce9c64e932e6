//! The OpenAPI document lists every route of docs/api.md, and every route it lists
//! is served (no documented route falls through to the router's 404).

use serde_json::Value;

use crate::helpers::*;

/// docs/api.md's routes, written down independently of the code.
const SPEC_ROUTES: &[(&str, &str)] = &[
    ("post", "/api/vscode/session/validate"),
    ("post", "/api/vscode/usage/track"),
    ("get", "/api/vscode/analytics"),
    ("get", "/api/users/{id}/profile"),
    ("patch", "/api/users/{id}/preferences"),
    ("post", "/api/users/{id}/credits/consume"),
    ("post", "/api/users/{id}/credits/holds"),
    ("post", "/api/users/{id}/credits/holds/{hold_id}/settle"),
    ("delete", "/api/users/{id}/credits/holds/{hold_id}"),
    ("get", "/api/users/{id}/usage/stats"),
    ("post", "/api/admin/users/{id}/credits/grant"),
    ("put", "/api/admin/users/{id}/plan"),
    ("put", "/api/admin/users/{id}/rate-limits"),
    ("delete", "/api/admin/users/{id}/rate-limits"),
    ("put", "/api/admin/users/{id}/status"),
    ("get", "/api/admin/audit"),
    ("get", "/api/users/{id}/export"),
    ("delete", "/api/users/{id}"),
    ("get", "/api/vscode/user/balance"),
    ("get", "/api/vscode/user/subscription"),
    ("get", "/api/auth/user-info"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

#[tokio::test]
async fn openapi_lists_every_spec_route_and_every_listed_route_is_served() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let _: utoipa::openapi::OpenApi =
        serde_json::from_value(doc.clone()).expect("a valid OpenAPI 3 document");
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in SPEC_ROUTES {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} missing from openapi.json"
        );
    }
    // Every documented operation answers something other than the router's
    // own "no such route" (an unauthenticated call gets 401, ops routes 200/503).
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let url = app.url(
                &path
                    .replace("{id}", "user_x")
                    .replace("{hold_id}", "00000000-0000-0000-0000-000000000000"),
            );
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = app.client.request(m, url).send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert!(
                !(status == 404
                    && body["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("no such route"))),
                "{method} {path} is documented but not routed"
            );
            if path.starts_with("/api/") {
                assert_eq!(status, 401, "{method} {path} without a token");
            }
        }
    }
}

/// Each operation's tag (`x-rate-limit-class`) is the class the router
/// guards it with: every class gets its own window, and every documented
/// `/api/` route answers with the `RateLimit-Policy` of its tag's window.
#[tokio::test]
async fn every_operation_is_rate_limited_by_the_class_its_document_names() {
    use common::class::Class;
    let window = |c: Class| 1000 + Class::ALL.iter().position(|x| *x == c).unwrap() as u64;
    let app = spawn_app_with(|v| {
        for c in Class::ALL {
            let name = c.as_str().to_uppercase();
            v.insert(
                format!("APP__RATE_LIMIT__CLASSES__{name}__LIMIT"),
                "100000".into(),
            );
            v.insert(
                format!("APP__RATE_LIMIT__CLASSES__{name}__WINDOW_SECS"),
                window(c).to_string(),
            );
        }
        // The per-event bound of usage/track: never the tighter one here.
        v.insert(
            "APP__RATE_LIMIT__USAGE_EVENTS__LIMIT".into(),
            "100000000".into(),
        );
        v.insert(
            "APP__RATE_LIMIT__USAGE_EVENTS__WINDOW_SECS".into(),
            window(Class::Usage).to_string(),
        );
    })
    .await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (user, token) = new_user();
    let admin = admin_token();
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api/") {
            continue;
        }
        for (method, op) in ops.as_object().unwrap() {
            let tag = op["x-rate-limit-class"].as_str().unwrap_or_default();
            let class =
                Class::parse(tag).unwrap_or_else(|| panic!("{method} {path}: class {tag:?}"));
            let url = app.url(
                &path
                    .replace("{id}", &user)
                    .replace("{hold_id}", "00000000-0000-0000-0000-000000000000"),
            );
            let bearer = if class == Class::Admin {
                &admin
            } else {
                &token
            };
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            // A body that parses but names nothing: any answer carries the headers.
            let r = app
                .client
                .request(m, url)
                .bearer_auth(bearer)
                .json(&serde_json::json!({}))
                .send()
                .await
                .unwrap();
            let policy = r
                .headers()
                .get("ratelimit-policy")
                .unwrap_or_else(|| panic!("{method} {path}: no RateLimit-Policy ({})", r.status()))
                .to_str()
                .unwrap()
                .to_string();
            assert!(
                policy.ends_with(&format!(";w={}", window(class))),
                "{method} {path}: documented as {tag}, limited as {policy}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} operations checked");
}
