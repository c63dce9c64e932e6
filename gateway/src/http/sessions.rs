//! Session validation (docs/api.md "Sessions", with the original client's members of §5.10).

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use chrono::{SecondsFormat, Utc};
use common::events::{Envelope, Event, SessionUpsert};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::ApiJson;
use super::guard::{effective_limit, CurrentUser};
use super::{guarded, Class};
use crate::sessions::{below_minimum, permissions, validate, ValidateRequest};
use crate::state::AppState;
use crate::usage::{valid_session_id, valid_session_token};

pub fn router(state: &AppState) -> Router<AppState> {
    guarded(
        state,
        Class::Session,
        Router::new().route("/api/vscode/session/validate", post(validate_session)),
    )
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = SessionValidateBody)]
pub(crate) struct Body {
    #[schema(schema_with = super::openapi::track::session_id)]
    session_id: Option<String>,
    #[serde(alias = "extensionVersion")]
    /// A semantic version; required (422 when absent), 426 below the configured minimum.
    extension_version: Option<String>,
    #[schema(value_type = Option<common::valid::Label<64>>)]
    vscode_version: Option<String>,
    #[schema(value_type = Option<common::valid::Label<64>>)]
    platform: Option<String>,
    #[schema(value_type = Option<common::valid::Label<128>>)]
    machine_id: Option<String>,
    #[serde(rename = "sessionToken")]
    #[schema(schema_with = super::openapi::track::session_token)]
    session_token: Option<String>,
}

fn short(field: &str, v: Option<String>, max: usize) -> Result<Option<String>> {
    match v {
        Some(s) => common::valid::check_text(&s, common::valid::TextRule::Label, max)
            .map(|()| Some(s))
            .map_err(|reason| ApiError::validation(field, reason)),
        None => Ok(None),
    }
}

async fn validate_session(
    State(state): State<AppState>,
    user: CurrentUser,
    deadline: Deadline,
    ApiJson(body): ApiJson<Body>,
) -> Result<Json<Value>> {
    let raw_version = body
        .extension_version
        .ok_or_else(|| ApiError::validation("extension_version", "is required"))?;
    let version = semver::Version::parse(&raw_version)
        .map_err(|_| ApiError::validation("extension_version", "must be a semantic version"))?;
    if let Some(need) = below_minimum(
        &version,
        state.settings.sessions.min_extension_version.as_deref(),
    ) {
        return Err(ApiError::UpgradeRequired {
            have: version.to_string(),
            need,
        });
    }
    if let Some(id) = &body.session_id {
        if !valid_session_id(id) {
            return Err(ApiError::validation(
                "session_id",
                "must be 1..=128 of [A-Za-z0-9_.:-]",
            ));
        }
    }
    if let Some(t) = &body.session_token {
        if !valid_session_token(t) {
            return Err(ApiError::validation(
                "sessionToken",
                "must be 8..=128 of [A-Za-z0-9_.-]",
            ));
        }
    }
    let vscode_version = short("vscode_version", body.vscode_version, 64)?;
    let platform = short("platform", body.platform, 64)?;
    let machine_id = short("machine_id", body.machine_id, 128)?;
    let req = ValidateRequest {
        session_id: body.session_id,
        session_token: body.session_token,
        extension_version: version.to_string(),
    };
    deadline.commit()?;
    let (rec, created) = validate(&state.sessions, user.id(), &req).await?;
    let event = Event::SessionUpsert(SessionUpsert {
        session_id: rec.id.clone(),
        user_id: user.id().to_string(),
        extension_version: rec.extension_version.clone(),
        vscode_version,
        platform,
        machine_id,
        session_token: rec.session_token.clone(),
        created_at: rec.created_at,
        last_seen_at: rec.last_seen_at,
        expires_at: rec.expires_at,
    });
    state
        .publisher
        .publish(&Envelope::new(
            event,
            Some(user.id().to_string()),
            Utc::now(),
        ))
        .await
        .map_err(|e| ApiError::unavailable("rabbitmq", e))?;
    let balance = crate::credits::balance(&state.credits, &state.publisher, user.id()).await?;
    let mut limits = Map::new();
    for c in Class::ALL {
        let l = effective_limit(&state, &user.record, c);
        limits.insert(
            c.as_str().into(),
            json!({"limit": l.limit, "window_secs": l.window_secs}),
        );
    }
    let plan = user.record.plan.clone();
    let expires = rec.expires_at.to_rfc3339_opts(SecondsFormat::Millis, true);
    Ok(Json(json!({
        "session_id": rec.id,
        "status": if created { "created" } else { "active" },
        "expires_at": expires,
        "user": {
            "user_id": user.id(),
            "plan": plan,
            "clerkId": user.id(),
            "planType": plan,
            "credits": balance.balance,
        },
        "credits": {"balance": balance.balance},
        "rate_limits": limits,
        "valid": true,
        "session": {"id": rec.id, "expiresAt": expires},
        "permissions": permissions(&plan),
    })))
}
