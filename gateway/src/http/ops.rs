//! Operations routes (docs/api.md "Operations"): liveness, readiness naming each dependency,
//! Prometheus. Their answers are built here: there is no domain module behind them.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The answer of `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    pub status: HealthStatus,
}

/// `status` of [`Health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
}

/// The answer of `GET /readyz`, with 200 and with 503 alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` when every dependency is up (200), else `unavailable` (503).
    pub status: ReadyStatus,
    /// Each dependency's state.
    pub dependencies: Dependencies,
}

/// `status` of [`Readiness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadyStatus {
    Ready,
    Unavailable,
}

/// The dependencies `readyz` checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Dependencies {
    /// `select 1` answered within 2 seconds.
    pub postgres: DependencyState,
    /// `PING` answered within 2 seconds.
    pub redis: DependencyState,
    /// The publisher's connection to the broker is open.
    pub rabbitmq: DependencyState,
}

/// Whether a dependency answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DependencyState {
    Up,
    Down,
}

impl DependencyState {
    fn of(ok: bool) -> Self {
        if ok {
            Self::Up
        } else {
            Self::Down
        }
    }
}

impl Readiness {
    /// The answer and its status for the three checks.
    pub fn of(postgres: bool, redis: bool, rabbitmq: bool) -> (StatusCode, Self) {
        let all = postgres && redis && rabbitmq;
        let (status, word) = if all {
            (StatusCode::OK, ReadyStatus::Ready)
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, ReadyStatus::Unavailable)
        };
        let dependencies = Dependencies {
            postgres: DependencyState::of(postgres),
            redis: DependencyState::of(redis),
            rabbitmq: DependencyState::of(rabbitmq),
        };
        (
            status,
            Self {
                status: word,
                dependencies,
            },
        )
    }
}

/// Liveness
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "The process answers", body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health {
        status: HealthStatus::Ok,
    })
}

/// Readiness: Postgres, Redis and RabbitMQ
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "Every dependency is up", body = Readiness),
        (status = 503, description = "A dependency is down (named in the answer)", body = Readiness),
    ))]
pub(crate) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let t = Duration::from_secs(2);
    let pg = tokio::time::timeout(t, sqlx::query("select 1").execute(&state.pg));
    let redis = tokio::time::timeout(t, async {
        let mut c = state.redis.get().await.map_err(|e| e.to_string())?;
        c.ping().await.map_err(|e| e.to_string())
    });
    let (pg, redis) = tokio::join!(pg, redis);
    let pg_ok = matches!(pg, Ok(Ok(_)));
    let redis_ok = matches!(redis, Ok(Ok(_)));
    let amqp_ok = state.publisher.is_connected();
    let (status, answer) = Readiness::of(pg_ok, redis_ok, amqp_ok);
    (status, Json(answer))
}

/// Prometheus metrics
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "The Prometheus text format (0.0.4)", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// The operations of this module.
#[derive(utoipa::OpenApi)]
#[openapi(paths(healthz, readyz, metrics))]
pub(crate) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use utoipa::OpenApi;

    #[test]
    fn the_answers_are_the_json_of_before() {
        let health = serde_json::to_value(Health {
            status: HealthStatus::Ok,
        });
        assert_eq!(health.unwrap(), json!({"status": "ok"}));
        let (status, ready) = Readiness::of(true, true, true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::to_value(ready).unwrap(),
            json!({"status": "ready", "dependencies": {"postgres": "up", "redis": "up", "rabbitmq": "up"}})
        );
        let (status, ready) = Readiness::of(true, false, true);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            serde_json::to_value(ready).unwrap(),
            json!({"status": "unavailable", "dependencies": {"postgres": "up", "redis": "down", "rabbitmq": "up"}})
        );
    }

    #[test]
    fn the_doc_lists_the_three_ops_routes() {
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        let op = |path: &str| doc["paths"][path]["get"].clone();
        for (path, summary) in [
            ("/healthz", "Liveness"),
            ("/readyz", "Readiness: Postgres, Redis and RabbitMQ"),
            ("/metrics", "Prometheus metrics"),
        ] {
            assert_eq!(op(path)["tags"], json!(["ops"]), "{path}");
            assert_eq!(op(path)["summary"], summary, "{path}");
        }
        let schema_of = |path: &str, status: &str, ty: &str| -> Value {
            op(path)["responses"][status]["content"][ty]["schema"].clone()
        };
        let health = json!({"$ref": "#/components/schemas/Health"});
        assert_eq!(schema_of("/healthz", "200", "application/json"), health);
        let ready = json!({"$ref": "#/components/schemas/Readiness"});
        assert_eq!(schema_of("/readyz", "200", "application/json"), ready);
        assert_eq!(schema_of("/readyz", "503", "application/json"), ready);
        assert_eq!(schema_of("/metrics", "200", "text/plain")["type"], "string");
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["Readiness"]["required"],
            json!(["status", "dependencies"])
        );
        assert_eq!(
            schemas["ReadyStatus"]["enum"],
            json!(["ready", "unavailable"])
        );
        assert_eq!(
            schemas["Dependencies"]["required"],
            json!(["postgres", "redis", "rabbitmq"])
        );
        assert_eq!(schemas["DependencyState"]["enum"], json!(["up", "down"]));
        assert_eq!(schemas["HealthStatus"]["enum"], json!(["ok"]));
    }
}
