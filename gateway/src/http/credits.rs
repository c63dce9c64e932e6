//! Credits: consume, holds, admin grant (docs/api.md "Credits", §5.5b, §5.7). Thin: parse,
//! authorize, call `crate::credits`, map the answer.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Extension, Json, Router};
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
    self, Answer, ConsumeAnswer, ConsumeBody, GrantAnswer, GrantBody, GrantRequest, HoldAnswer,
    HoldBody, Idem, Remembered, SettleAnswer, SettleBody,
};
use crate::rate_limit::Deferred;
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
    raw.parse().map_err(|_| ApiError::not_found("no such hold"))
}

/// One session identity (docs/compatibility.md): `sessionId`/`session_id` becomes the session
/// id `session/validate` issued to the account (`user_id`, whose ledger the row is in) when it
/// names that account's `sessionToken` or live session; any other reference, and every one while
/// Redis is unreachable, is kept as sent (a consume never fails for its session reference).
async fn one_session_identity(
    state: &AppState,
    user_id: &str,
    context: &mut common::events::CreditContext,
) {
    let Some(reference) = context.session_id.as_deref() else {
        return;
    };
    let named = crate::sessions::resolve(&state.sessions, user_id, &[reference], true).await;
    if let Some(Some(crate::sessions::Named::Session(id))) = named.map(|mut v| v.pop()) {
        context.session_id = Some(id);
    }
}

/// A fresh answer is 200; a remembered one says so in `Idempotent-Replayed`.
pub(super) fn respond(answer: Answer) -> Response {
    let (mut resp, replayed) = match answer {
        Answer::Fresh(body) => ((StatusCode::OK, Json(body)).into_response(), false),
        Answer::Replayed(Remembered::Ok(body)) => {
            ((StatusCode::OK, Json(body)).into_response(), true)
        }
        Answer::Replayed(Remembered::Insufficient {
            balance,
            required,
            limit,
        }) => (
            ApiError::from(crate::error::Error::InsufficientCredits {
                balance,
                required,
                limit,
            })
            .into_response(),
            true,
        ),
    };
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

/// Consume credits (idempotent with Idempotency-Key)
#[utoipa::path(post, path = "/api/users/{id}/credits/consume", tag = "credits",
    request_body = ConsumeBody,
    params(IdempotencyHeader),
    responses(
        (status = 200, description = "Consumed (`Idempotent-Replayed: true` on a replay)", body = ConsumeAnswer),
        (status = 402, description = "Insufficient credits"),
        (status = 409, description = "Idempotency conflict"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn consume(
    State(state): State<AppState>,
    user: CurrentUser,
    limit: Option<Extension<Deferred>>,
    Target(id): Target,
    headers: HeaderMap,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    provision_other(&state, &user, &id).await?;
    let key = credits::idempotency_key(idempotency_header(&headers))?;
    let book = state.pricing.book();
    let (amount, mut context) =
        credits::parse_body::<ConsumeBody>(body.clone())?.validate(book.as_deref())?;
    one_session_identity(&state, &id, &mut context).await;
    let idem = key.map(|k| Idem::new(&state.credits, &id, "consume", k, &body));
    deadline.commit()?;
    Ok(respond(
        credits::consume(
            &state.credits,
            &state.publisher,
            limit.as_ref().map(|l| &l.0),
            &id,
            amount,
            context,
            idem,
        )
        .await?,
    ))
}

/// Hold credits before a model call
#[utoipa::path(post, path = "/api/users/{id}/credits/holds", tag = "credits",
    request_body = HoldBody,
    params(IdempotencyHeader),
    responses(
        (status = 200, description = "Held (`Idempotent-Replayed: true` on a replay)", body = HoldAnswer),
        (status = 402, description = "Insufficient credits"),
        (status = 409, description = "Idempotency conflict, or the hold of a retry has ended"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn open_hold(
    State(state): State<AppState>,
    user: CurrentUser,
    limit: Option<Extension<Deferred>>,
    Target(id): Target,
    headers: HeaderMap,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    provision_other(&state, &user, &id).await?;
    let key = credits::idempotency_key(idempotency_header(&headers))?;
    let c = &state.settings.credits;
    let (amount, ttl, mut context) = credits::parse_body::<HoldBody>(body.clone())?
        .validate(c.hold_default_ttl_secs, c.hold_max_ttl_secs)?;
    one_session_identity(&state, &id, &mut context).await;
    let idem = key.map(|k| Idem::new(&state.credits, &id, "holds", k, &body));
    deadline.commit()?;
    Ok(respond(
        credits::open_hold(
            &state.credits,
            &state.publisher,
            limit.as_ref().map(|l| &l.0),
            &id,
            amount,
            ttl,
            context,
            idem,
        )
        .await?,
    ))
}

/// Settle a hold with the real amount
#[utoipa::path(post, path = "/api/users/{id}/credits/holds/{hold_id}/settle", tag = "credits",
    request_body = SettleBody,
    responses(
        (status = 200, description = "Settled (`Idempotent-Replayed: true` when settled before)", body = SettleAnswer),
        (status = 404, description = "No such hold"),
        (status = 409, description = "The hold expired or was released"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn settle_hold(
    State(state): State<AppState>,
    user: CurrentUser,
    limit: Option<Extension<Deferred>>,
    Target(id): Target,
    Path((_, hold)): Path<(String, String)>,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    provision_other(&state, &user, &id).await?;
    let hold = hold_id(&hold)?;
    let book = state.pricing.book();
    let (amount, context) = credits::parse_body::<SettleBody>(body)?.validate(book.as_deref())?;
    deadline.commit()?;
    Ok(respond(
        credits::settle_hold(
            &state.credits,
            &state.publisher,
            limit.as_ref().map(|l| &l.0),
            &id,
            hold,
            amount,
            context,
        )
        .await?,
    ))
}

/// Release a hold whole
#[utoipa::path(delete, path = "/api/users/{id}/credits/holds/{hold_id}", tag = "credits",
    responses(
        (status = 204, description = "Released (or ended before)"),
        (status = 404, description = "No such hold"),
        (status = 409, description = "The hold was settled"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn release_hold(
    State(state): State<AppState>,
    user: CurrentUser,
    limit: Option<Extension<Deferred>>,
    Target(id): Target,
    Path((_, hold)): Path<(String, String)>,
    deadline: Deadline,
) -> Result<StatusCode> {
    provision_other(&state, &user, &id).await?;
    let hold = hold_id(&hold)?;
    deadline.commit()?;
    credits::release_hold(
        &state.credits,
        &state.publisher,
        limit.as_ref().map(|l| &l.0),
        &id,
        hold,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Grant credits (admin)
#[utoipa::path(post, path = "/api/admin/users/{id}/credits/grant", tag = "admin",
    request_body = GrantBody,
    params(IdempotencyHeader),
    responses(
        (status = 200, description = "Granted (`Idempotent-Replayed: true` on a replay)", body = GrantAnswer),
        (status = 409, description = "Idempotency conflict"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn grant(
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
pub(super) fn idempotency_header(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get("idempotency-key").map(HeaderValue::as_bytes)
}

/// The `Idempotency-Key` header of the credit POSTs and the grant (docs/api.md "Credits"),
/// for the document only: the handlers read its raw bytes ([`idempotency_header`]), so that a
/// key that is not visible ASCII is a 422 naming it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub(crate) struct IdempotencyHeader {
    /// The same key and body again answer the first answer (1..=255 visible ASCII characters).
    #[param(rename = "Idempotency-Key", max_length = 255, nullable = false)]
    idempotency_key: Option<String>,
}

/// The credit operations of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(consume, open_hold, settle_hold, release_hold, grant))]
pub(crate) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use utoipa::OpenApi;

    /// The member names of the schema `$ref` points to.
    fn properties(doc: &Value, schema: &Value) -> Vec<String> {
        let name = schema["$ref"]
            .as_str()
            .expect("a $ref")
            .rsplit('/')
            .next()
            .unwrap();
        let mut names: Vec<String> = doc["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name} has properties"))
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_doc_lists_every_credit_operation_with_its_answer() {
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        let ops: [(&str, &str, &str, &str, &[&str]); 5] = [
            (
                "post",
                "/api/users/{id}/credits/consume",
                "credits",
                "Consume credits (idempotent with Idempotency-Key)",
                &[
                    "amount",
                    "balance",
                    "price",
                    "remaining_credits",
                    "success",
                    "transaction",
                    "transaction_id",
                    "user_id",
                ],
            ),
            (
                "post",
                "/api/users/{id}/credits/holds",
                "credits",
                "Hold credits before a model call",
                &["amount", "balance", "expires_at", "held", "hold_id"],
            ),
            (
                "post",
                "/api/users/{id}/credits/holds/{hold_id}/settle",
                "credits",
                "Settle a hold with the real amount",
                &[
                    "amount",
                    "balance",
                    "capped",
                    "price",
                    "released",
                    "transaction_id",
                ],
            ),
            (
                "delete",
                "/api/users/{id}/credits/holds/{hold_id}",
                "credits",
                "Release a hold whole",
                &[],
            ),
            (
                "post",
                "/api/admin/users/{id}/credits/grant",
                "admin",
                "Grant credits (admin)",
                &["balance", "transaction_id"],
            ),
        ];
        assert_eq!(doc["paths"].as_object().unwrap().len(), 5);
        for (method, path, tag, summary, members) in ops {
            let op = &doc["paths"][path][method];
            assert_eq!(op["tags"], json!([tag]), "{method} {path}");
            assert_eq!(op["summary"], summary, "{method} {path}");
            if members.is_empty() {
                assert!(op["responses"]["204"].is_object(), "{path}");
                assert!(op["responses"]["204"].get("content").is_none(), "{path}");
                continue;
            }
            let schema = &op["responses"]["200"]["content"]["application/json"]["schema"];
            assert_eq!(properties(&doc, schema), *members, "{method} {path}");
            // Every member is always present, but consume's `transaction` (an
            // answer remembered before it existed replays without it) and the
            // receipt members of a priced charge (`price`, settle's `capped`).
            let name = schema["$ref"].as_str().unwrap().rsplit('/').next().unwrap();
            let required = doc["components"]["schemas"][name]["required"]
                .as_array()
                .unwrap();
            let optional = match name {
                "ConsumeAnswer" => 2,
                "SettleAnswer" => 2,
                _ => 0,
            };
            assert_eq!(required.len() + optional, members.len(), "{name}");
            // Only the POSTs that take a key declare it; path parameters are left to `http::openapi`.
            let header = json!([{"name": "Idempotency-Key", "in": "header", "required": false,
                "description": "The same key and body again answer the first answer (1..=255 visible ASCII characters).",
                "schema": {"type": "string", "maxLength": 255}}]);
            if path.ends_with("/settle") {
                assert!(op.get("parameters").is_none(), "{path}");
            } else {
                assert_eq!(op["parameters"], header, "{path}");
            }
        }
        let hold = &doc["components"]["schemas"]["HoldAnswer"]["properties"]["expires_at"];
        assert_eq!(hold["format"], "date-time");
    }
}
