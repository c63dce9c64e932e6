//! Credits: consume, holds, admin grant (docs/api.md "Credits", §5.5b, §5.7). Thin: parse,
//! authorize, call `crate::credits`, map the answer.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde_json::Value;
use uuid::Uuid;

use super::admin::AdminUser;
use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::ApiJson;
use super::guard::CurrentUser;
use super::target::{provision_other, Target};
use super::{guarded, Class};
use crate::admin::{self, Unknown};
use crate::audit::RequestId;
use crate::credits::{
    self, Answer, ConsumeBody, GrantBody, GrantRequest, HoldBody, Idem, Remembered, SettleBody,
};
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let user_routes = Router::new()
        .route("/api/users/{id}/credits/consume", post(consume))
        .route("/api/users/{id}/credits/holds", post(open_hold))
        .route(
            "/api/users/{id}/credits/holds/{hold_id}/settle",
            post(settle_hold),
        )
        .route(
            "/api/users/{id}/credits/holds/{hold_id}",
            delete(release_hold),
        );
    let admin_routes = Router::new().route("/api/admin/users/{id}/credits/grant", post(grant));
    Router::new()
        .merge(guarded(state, Class::Credits, user_routes))
        .merge(guarded(state, Class::Admin, admin_routes))
}

fn hold_id(raw: &str) -> Result<Uuid> {
    raw.parse()
        .map_err(|_| ApiError::NotFound("no such hold".into()))
}

/// A fresh answer is 200; a remembered one says so in `Idempotent-Replayed`.
fn respond(answer: Answer) -> Response {
    let (mut resp, replayed) = match answer {
        Answer::Fresh(body) => ((StatusCode::OK, Json(body)).into_response(), false),
        Answer::Replayed(Remembered::Ok(body)) => {
            ((StatusCode::OK, Json(body)).into_response(), true)
        }
        Answer::Replayed(Remembered::Insufficient { balance, required }) => (
            ApiError::InsufficientCredits { balance, required }.into_response(),
            true,
        ),
    };
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

async fn consume(
    State(state): State<AppState>,
    user: CurrentUser,
    Target(id): Target,
    headers: HeaderMap,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    provision_other(&state, &user, &id).await?;
    let key = credits::idempotency_key(idempotency_header(&headers))?;
    let (amount, context) = credits::parse_body::<ConsumeBody>(body.clone())?.validate()?;
    let idem = key.map(|k| Idem::new(&state.credits, &id, "consume", k, &body));
    deadline.commit()?;
    Ok(respond(
        credits::consume(&state.credits, &state.publisher, &id, amount, context, idem).await?,
    ))
}

async fn open_hold(
    State(state): State<AppState>,
    user: CurrentUser,
    Target(id): Target,
    headers: HeaderMap,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    provision_other(&state, &user, &id).await?;
    let key = credits::idempotency_key(idempotency_header(&headers))?;
    let c = &state.settings.credits;
    let (amount, ttl, context) = credits::parse_body::<HoldBody>(body.clone())?
        .validate(c.hold_default_ttl_secs, c.hold_max_ttl_secs)?;
    let idem = key.map(|k| Idem::new(&state.credits, &id, "holds", k, &body));
    deadline.commit()?;
    Ok(respond(
        credits::open_hold(
            &state.credits,
            &state.publisher,
            &id,
            amount,
            ttl,
            context,
            idem,
        )
        .await?,
    ))
}

async fn settle_hold(
    State(state): State<AppState>,
    user: CurrentUser,
    Target(id): Target,
    Path((_, hold)): Path<(String, String)>,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    provision_other(&state, &user, &id).await?;
    let hold = hold_id(&hold)?;
    let (amount, context) = credits::parse_body::<SettleBody>(body)?.validate()?;
    deadline.commit()?;
    Ok(respond(
        credits::settle_hold(&state.credits, &state.publisher, &id, hold, amount, context).await?,
    ))
}

async fn release_hold(
    State(state): State<AppState>,
    user: CurrentUser,
    Target(id): Target,
    Path((_, hold)): Path<(String, String)>,
    deadline: Deadline,
) -> Result<StatusCode> {
    provision_other(&state, &user, &id).await?;
    let hold = hold_id(&hold)?;
    deadline.commit()?;
    credits::release_hold(&state.credits, &state.publisher, &id, hold).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn grant(
    State(state): State<AppState>,
    AdminUser(user): AdminUser,
    Target(id): Target,
    RequestId(request_id): RequestId,
    headers: HeaderMap,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    let key = credits::idempotency_key(idempotency_header(&headers))?;
    let (amount, reason) = credits::parse_body::<GrantBody>(body)?.validate()?;
    admin::target(&state.user_store, &id, Unknown::Provision).await?;
    deadline.commit()?;
    let answer = credits::grant(
        &state.credits,
        &state.publisher,
        GrantRequest {
            actor: user.id().to_string(),
            user_id: id,
            amount,
            reason,
            key,
            request_id,
        },
    )
    .await?;
    Ok(respond(answer))
}

/// The raw `Idempotency-Key` header, for [`credits::idempotency_key`] to judge.
fn idempotency_header(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get("idempotency-key").map(HeaderValue::as_bytes)
}
