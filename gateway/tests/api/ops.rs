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
