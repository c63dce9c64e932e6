use crate::helpers::*;

#[tokio::test]
async fn healthz_answers_and_readyz_names_every_dependency() {
    let app = spawn_app().await;
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["dependencies"]["postgres"], "up");
    assert_eq!(body["dependencies"]["redis"], "up");
    assert_eq!(body["dependencies"]["rabbitmq"], "up");
}

#[tokio::test]
async fn readyz_is_503_and_names_postgres_when_it_is_unreachable() {
    let app = spawn_app_with(|v| {
        v.insert(
            "DATABASE_URL".into(),
            "postgres://postgres@127.0.0.1:1/nope".into(),
        );
        v.insert("APP__DATABASE__ACQUIRE_TIMEOUT_MS".into(), "300".into());
    })
    .await;
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["dependencies"]["postgres"], "down");
    assert_eq!(body["dependencies"]["redis"], "up");
}

#[tokio::test]
async fn unknown_routes_are_404_problem_json() {
    let app = spawn_app().await;
    let r = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

/// docs/api.md "Operations": every series exists from start (at 0), with label values
/// from fixed sets.
#[tokio::test]
async fn a_fresh_gateways_metrics_name_every_series() {
    let app = spawn_app().await;
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    for name in gateway::metrics::SERIES {
        assert!(text.contains(name), "{name} missing");
    }
    for line in [
        r#"http_requests_total{route="/api/vscode/usage/track",method="POST",status="429"}"#,
        r#"rate_limit_decisions_total{class="usage_events",decision="deny",degraded="no"}"#,
        r#"publish_confirms_total{outcome="fail"}"#,
    ] {
        assert!(text.contains(line), "{line} missing");
    }
}

/// The method label is one of a fixed set; an invented method is `other`.
#[tokio::test]
async fn an_invented_http_method_is_counted_as_other() {
    let app = spawn_app().await;
    let method = reqwest::Method::from_bytes(b"BREWCOFFEE").unwrap();
    let r = app
        .client
        .request(method, app.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("BREWCOFFEE"));
    assert!(text.contains(r#"method="other""#));
}
