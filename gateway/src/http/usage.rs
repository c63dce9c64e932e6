//! Usage tracking (docs/api.md "Usage", §5.10): validate the whole request, publish its
//! events (grouped with concurrent requests' events), answer 202 only once the
//! broker confirmed them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::ApiJson;
use super::guard::CurrentUser;
use super::{guarded, Class};
use crate::rate_limit;
use crate::state::AppState;
use crate::usage::{parse_track, Shape};

pub fn router(state: &AppState) -> Router<AppState> {
    guarded(
        state,
        Class::Usage,
        Router::new().route("/api/vscode/usage/track", post(track)),
    )
}

async fn track(
    State(state): State<AppState>,
    user: CurrentUser,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    let (shape, events) = parse_track(&body, user.id(), chrono::Utc::now())?;
    let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
    let n = events.len();
    // The per-event budget (docs/rate-limits.md), known only now that the body is parsed:
    // a valid request of n events costs n, before anything is published. The
    // decision rides on the response for the guard's RateLimit-* headers.
    let events_limit = rate_limit::usage_events_limit(&state.settings, &user.record.plan);
    let key = state.keys.rate_limit(user.id(), rate_limit::USAGE_EVENTS);
    let budget = rate_limit::check_n(
        &state.limiter,
        &key,
        user.id(),
        rate_limit::USAGE_EVENTS,
        events_limit,
        n as u64,
    )
    .await;
    if !budget.allowed {
        let mut resp = ApiError::RateLimited {
            retry_after: budget.retry_after_secs.max(1),
        }
        .into_response();
        resp.extensions_mut().insert(budget);
        return Ok(resp);
    }
    // From the publish on, the answer waits for the broker's confirm (bounded
    // by amqp.confirm_timeout_ms), never for the request deadline: a 503 for
    // confirmed events would make the client resend them.
    deadline.commit()?;
    state
        .publisher
        .publish_usage(events)
        .await
        .map_err(|e| ApiError::unavailable("rabbitmq", e))?;
    let mut answer = json!({"accepted": n, "event_ids": ids});
    if shape == Shape::Legacy {
        // The original client reads these; usage never moves credits.
        let balance = crate::credits::balance(&state.credits, &state.publisher, user.id())
            .await
            .ok();
        answer["success"] = json!(true);
        answer["remainingCredits"] = json!(balance.map(|b| b.balance));
    }
    let mut resp = (StatusCode::ACCEPTED, Json(answer)).into_response();
    resp.extensions_mut().insert(budget);
    Ok(resp)
}
