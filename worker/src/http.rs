//! The worker's own `/healthz` and `/metrics` on `WORKER_LISTEN`.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

pub fn metrics_handle() -> PrometheusHandle {
    common::telemetry::metrics_handle()
}

pub fn router(handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        h.render(),
                    )
                        .into_response()
                }
            }),
        )
}
