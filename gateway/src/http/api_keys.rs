//! Extension API keys (SPEC §5.11, docs/api.md "API keys"): create (the key
//! shown once), list, revoke. Class `profile`. Thin: parse, authorize, call
//! `crate::api_keys`.
//!
//! Who may manage: the user themself, signed in (a JWT or a dev token, never
//! an API key), and admins for anyone, as on every `/api/users/:id` route.

use std::collections::HashMap;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use common::valid::Label;
use serde::Deserialize;
use uuid::Uuid;

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::ApiJson;
use super::guard::{CurrentUser, KeyCaller};
use super::target::{provision_other, Target};
use super::{guarded, Class};
use crate::api_keys::{check_scopes, CreatedKey, KeyList, Scope, MAX_NAME_CHARS};
use crate::audit::{Action, RequestId};
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    guarded(
        state,
        Class::Profile,
        Router::new()
            .route("/api/users/{id}/api-keys", get(list_keys).post(create_key))
            .route("/api/users/{id}/api-keys/{key_id}", delete(revoke_key)),
    )
}

/// The caller, signed in rather than holding an API key (403 otherwise).
/// The guard already refuses keys here; this keeps the rule at the handler.
pub struct SignedIn(pub CurrentUser);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for SignedIn {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        if parts.extensions.get::<KeyCaller>().is_some() {
            return Err(ApiError::forbidden(
                "API keys cannot manage API keys; sign in instead",
            ));
        }
        Ok(Self(CurrentUser::from_request_parts(parts, state).await?))
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct CreateKeyBody {
    /// The caller's label for the key (e.g. the machine it is for).
    #[schema(value_type = String, min_length = 1, max_length = 64)]
    name: Label<MAX_NAME_CHARS>,
    /// What the key may do: at least one, none twice.
    #[schema(min_items = 1, max_items = 3)]
    scopes: Vec<Scope>,
}

/// Create an API key
///
/// The answer holds the key itself, this once: only its SHA-256 is stored.
/// A user has at most `api_keys.max_per_user` live keys (default 20); one more
/// is 422 naming `api_keys`. Not with an API key.
#[utoipa::path(post, path = "/api/users/{id}/api-keys", tag = "profile",
    request_body = CreateKeyBody,
    responses(
        (status = 201, description = "The key, shown once", body = CreatedKey),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn create_key(
    State(state): State<AppState>,
    SignedIn(caller): SignedIn,
    Target(id): Target,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiJson(body): ApiJson<CreateKeyBody>,
) -> Result<Response> {
    check_scopes(&body.scopes).map_err(|m| ApiError::validation("scopes", m))?;
    provision_other(&state, &caller, &id).await?;
    deadline.commit()?;
    let by = Action {
        actor: caller.id(),
        action: "api_key.create",
        target: Some(&id),
        request_id: &rid,
    };
    let created = state
        .api_keys
        .create(by, &id, body.name.as_str(), &body.scopes)
        .await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// List a user's API keys
///
/// The live keys, oldest first, without the keys themselves. Not with an API key.
#[utoipa::path(get, path = "/api/users/{id}/api-keys", tag = "profile",
    responses(
        (status = 200, description = "The live keys", body = KeyList),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn list_keys(
    State(state): State<AppState>,
    SignedIn(_caller): SignedIn,
    Target(id): Target,
) -> Result<Json<KeyList>> {
    Ok(Json(state.api_keys.list(&id).await?))
}

/// Revoke an API key
///
/// Refused on every gateway within 5 s (at once on this one). Revoking a
/// revoked key again is 204; an unknown key, or another user's, is 404.
/// Not with an API key.
#[utoipa::path(delete, path = "/api/users/{id}/api-keys/{key_id}", tag = "profile",
    responses(
        (status = 204, description = "Revoked"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn revoke_key(
    State(state): State<AppState>,
    SignedIn(caller): SignedIn,
    Target(id): Target,
    RequestId(rid): RequestId,
    deadline: Deadline,
    params: std::result::Result<Path<HashMap<String, String>>, PathRejection>,
) -> Result<StatusCode> {
    // A key id that no key can have is simply not found.
    let key_id = params
        .ok()
        .and_then(|Path(p)| p.get("key_id")?.parse::<Uuid>().ok())
        .ok_or_else(|| ApiError::not_found("no such API key"))?;
    deadline.commit()?;
    let by = Action {
        actor: caller.id(),
        action: "api_key.revoke",
        target: Some(&id),
        request_id: &rid,
    };
    state.api_keys.revoke(by, &id, key_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The operations of this module.
#[derive(utoipa::OpenApi)]
#[openapi(paths(create_key, list_keys, revoke_key))]
pub(crate) struct Doc;
