//! The worker's own `/healthz`, `/readyz` and `/metrics` on `WORKER_LISTEN`.
//!
//! `/readyz` answers 200 when Postgres answers `select 1` and the broker
//! takes an AMQP connection, each within 2 seconds; 503 otherwise. The body
//! names each dependency either way, in the shape of the gateway's:
//! `{"status":"ready"|"unavailable","dependencies":{"postgres":"up"|"down","rabbitmq":…}}`.
//! Kubernetes' readiness probe and rollouts read it (deploy/kubernetes).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::Mutex;

/// Bound on each dependency check, as the gateway's `/readyz`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub fn metrics_handle() -> PrometheusHandle {
    common::telemetry::metrics_handle()
}

/// What `/readyz` checks: the worker's Postgres pool, and the broker through
/// one connection of its own, opened on the first probe and kept while it
/// stays open (so probes do not open a connection each).
pub struct Readiness {
    pg: PgPool,
    amqp_url: String,
    amqp: Mutex<Option<lapin::Connection>>,
}

impl Readiness {
    pub fn new(pg: PgPool, amqp_url: &str) -> Self {
        Self {
            pg,
            amqp_url: amqp_url.to_string(),
            amqp: Mutex::new(None),
        }
    }

    async fn postgres_up(&self) -> bool {
        let probe = sqlx::query("select 1").execute(&self.pg);
        matches!(tokio::time::timeout(CHECK_TIMEOUT, probe).await, Ok(Ok(_)))
    }

    async fn rabbitmq_up(&self) -> bool {
        let mut held = self.amqp.lock().await;
        if held.as_ref().is_some_and(|c| c.status().connected()) {
            return true;
        }
        *held = None;
        let connect = common::amqp::connect::connect(&self.amqp_url);
        match tokio::time::timeout(CHECK_TIMEOUT, connect).await {
            Ok(Ok(conn)) => {
                *held = Some(conn);
                true
            }
            _ => false,
        }
    }
}

/// The status and body of `/readyz` for the two checks.
pub fn readiness_answer(postgres: bool, rabbitmq: bool) -> (StatusCode, Value) {
    let state = |up: bool| if up { "up" } else { "down" };
    let (status, word) = if postgres && rabbitmq {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    let body = json!({
        "status": word,
        "dependencies": {"postgres": state(postgres), "rabbitmq": state(rabbitmq)},
    });
    (status, body)
}

pub fn router(handle: PrometheusHandle, ready: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/readyz",
            get(move || {
                let r = ready.clone();
                async move {
                    let (pg, amqp) = tokio::join!(r.postgres_up(), r.rabbitmq_up());
                    let (status, body) = readiness_answer(pg, amqp);
                    (status, Json(body))
                }
            }),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_both_are_up_and_each_is_named() {
        let (status, body) = readiness_answer(true, true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"status": "ready", "dependencies": {"postgres": "up", "rabbitmq": "up"}})
        );
        for (pg, amqp) in [(false, true), (true, false), (false, false)] {
            let (status, body) = readiness_answer(pg, amqp);
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body["status"], "unavailable");
            assert_eq!(
                body["dependencies"]["postgres"],
                if pg { "up" } else { "down" }
            );
            assert_eq!(
                body["dependencies"]["rabbitmq"],
                if amqp { "up" } else { "down" }
            );
        }
    }
}
