//! Operations routes: liveness, readiness naming each dependency, Prometheus.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let t = Duration::from_secs(2);
    let pg = tokio::time::timeout(t, sqlx::query("select 1").execute(&state.pg));
    let redis = tokio::time::timeout(t, async {
        let mut c = state.redis.get().await.map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut *c)
            .await
            .map_err(|e| e.to_string())
    });
    let (pg, redis) = tokio::join!(pg, redis);
    let pg_ok = matches!(pg, Ok(Ok(_)));
    let redis_ok = matches!(redis, Ok(Ok(_)));
    let amqp_ok = state.publisher.is_connected();
    let word = |ok: bool| if ok { "up" } else { "down" };
    let all = pg_ok && redis_ok && amqp_ok;
    let status = if all {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if all { "ready" } else { "unavailable" },
            "dependencies": {"postgres": word(pg_ok), "redis": word(redis_ok), "rabbitmq": word(amqp_ok)}
        })),
    )
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
