//! Usage tracking (docs/api.md "Usage", §5.10): validate the whole request, publish its
//! events (grouped with concurrent requests' events), answer 202 only once the
//! broker confirmed them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use common::events::UsageEvent;
use serde_json::Value;
use std::collections::HashMap;

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::ApiJson;
use super::guard::CurrentUser;
use super::{guarded, Class};
use crate::rate_limit;
use crate::sessions::{self, Named};
use crate::state::AppState;
use crate::usage::{parse_track, Shape, TrackAnswer};

pub fn router(state: &AppState) -> Router<AppState> {
    guarded(
        state,
        Class::Usage,
        Router::new().route("/api/vscode/usage/track", post(track)),
    )
}

/// Track one usage event or a batch (1..=500)
#[utoipa::path(post, path = "/api/vscode/usage/track", tag = "usage",
    request_body = super::openapi::track::TrackBody,
    responses(
        (status = 202, description = "Accepted: the broker confirmed every event", body = TrackAnswer),
        (status = 401, description = "Unauthenticated, or a legacy track's `sessionToken` is unknown (`Invalid session`)"),
        (status = 413, description = "Payload too large"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn track(
    State(state): State<AppState>,
    user: CurrentUser,
    limit: Option<Extension<rate_limit::Deferred>>,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    let (shape, mut events) = parse_track(&body, user.id(), chrono::Utc::now())?;
    one_session_identity(&state, user.id(), shape, &mut events).await?;
    crate::usage::price_events(&mut events, state.pricing.book().as_deref());
    let n = events.len();
    // The per-event budget (docs/rate-limits.md), known only now that the body is parsed:
    // a valid request of n events costs n, before anything is published. The
    // decision rides on the response for the guard's RateLimit-* headers.
    let events_limit = rate_limit::usage_events_limit(&state.settings, &user.record.plan);
    let key = state.keys.rate_limit(user.id(), rate_limit::USAGE_EVENTS);
    let budget = match limit.as_deref().and_then(|d| Some((d, d.pending()?))) {
        // The guard left the class limit to this request: both in one round trip.
        Some((deferred, (class_key, class_limit))) => {
            let class = rate_limit::Side {
                key: class_key,
                class: Class::Usage.as_str(),
                limit: class_limit,
            };
            let events = rate_limit::Side {
                key: &key,
                class: rate_limit::USAGE_EVENTS,
                limit: events_limit,
            };
            let (a, b) =
                rate_limit::check_pair(&state.limiter, user.id(), class, events, n as u64).await;
            let a = deferred.set(a);
            match b {
                Some(b) => b,
                None => return Err(ApiError::rate_limited(a.retry_after_secs.max(1))),
            }
        }
        None => {
            rate_limit::check_n(
                &state.limiter,
                &key,
                user.id(),
                rate_limit::USAGE_EVENTS,
                events_limit,
                n as u64,
            )
            .await
        }
    };
    if !budget.allowed {
        let mut resp = ApiError::rate_limited(budget.retry_after_secs.max(1)).into_response();
        resp.extensions_mut().insert(budget);
        return Ok(resp);
    }
    // From the publish on, the answer waits for the broker's confirm (bounded
    // by amqp.confirm_timeout_ms), never for the request deadline: a 503 for
    // confirmed events would make the client resend them.
    deadline.commit()?;
    // The answer is made before the events move to the publisher.
    let mut answer = TrackAnswer::new(&events, None);
    state
        .publisher
        .publish_usage(events)
        .await
        .map_err(|e| ApiError::unavailable("rabbitmq", e))?;
    if shape == Shape::Legacy {
        // The original client reads these; usage never moves credits.
        let balance = crate::credits::balance(&state.credits, &state.publisher, user.id())
            .await
            .ok();
        answer.success = Some(true);
        answer.remaining_credits = Some(balance.map(|b| b.balance));
    }
    let mut resp = (StatusCode::ACCEPTED, Json(answer)).into_response();
    resp.extensions_mut().insert(budget);
    Ok(resp)
}

/// One session identity (docs/compatibility.md): each event's session reference (the legacy
/// `sessionToken`, a `session_id`) becomes the session id `session/validate` issued, resolved
/// in one Redis round trip. A legacy track naming a token unknown for the caller is 401
/// "Invalid session" (nothing published; not a failed authentication: the token was valid).
/// Any other unknown reference is kept as sent, and so is every one while Redis is unreachable.
async fn one_session_identity(
    state: &AppState,
    user_id: &str,
    shape: Shape,
    events: &mut [UsageEvent],
) -> Result<()> {
    let mut refs: Vec<String> = events.iter().filter_map(|e| e.session_id.clone()).collect();
    refs.sort_unstable();
    refs.dedup();
    if refs.is_empty() {
        return Ok(());
    }
    let borrowed: Vec<&str> = refs.iter().map(String::as_str).collect();
    let Some(named) =
        sessions::resolve(&state.sessions, user_id, &borrowed, shape != Shape::Legacy).await
    else {
        return Ok(());
    };
    let by_ref: HashMap<String, Named> = refs.into_iter().zip(named).collect();
    for e in events.iter_mut() {
        let Some(s) = e.session_id.as_mut() else {
            continue;
        };
        match by_ref.get(s.as_str()) {
            Some(Named::Session(id)) => *s = id.clone(),
            Some(Named::Unknown) if shape == Shape::Legacy => {
                return Err(ApiError::Unauthorized("Invalid session".into()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The operations of this module (docs/api.md "Usage").
#[derive(utoipa::OpenApi)]
#[openapi(paths(track))]
pub(crate) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use utoipa::OpenApi;

    #[test]
    fn the_doc_lists_track_with_its_answer() {
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        let op = &doc["paths"]["/api/vscode/usage/track"]["post"];
        assert_eq!(op["tags"], json!(["usage"]));
        assert_eq!(op["summary"], "Track one usage event or a batch (1..=500)");
        let statuses: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
        assert_eq!(statuses, ["202", "401", "413", "503"]);
        let body = &op["requestBody"]["content"]["application/json"]["schema"]["$ref"];
        assert_eq!(body, "#/components/schemas/TrackBody");
        let answer = &doc["components"]["schemas"]["TrackAnswer"];
        let props: Vec<&String> = answer["properties"].as_object().unwrap().keys().collect();
        assert_eq!(
            props,
            ["accepted", "event_ids", "remainingCredits", "success"]
        );
        assert_eq!(answer["required"], json!(["accepted", "event_ids"]));
        assert_eq!(answer["properties"]["event_ids"]["items"]["format"], "uuid");
        let credits = &answer["properties"]["remainingCredits"]["type"];
        assert_eq!(credits, &json!(["integer", "null"]));
        assert_eq!(
            answer["properties"]["success"]["type"], "boolean",
            "never null"
        );
    }
}
