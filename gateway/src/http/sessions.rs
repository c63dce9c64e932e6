//! Session validation (docs/api.md "Sessions", with the original client's members of §5.10).

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use common::events::{Envelope, Event, SessionUpsert};
use serde::Deserialize;

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::ApiJson;
use super::guard::{effective_limit, CurrentUser};
use super::{guarded, Class};
use crate::sessions::{below_minimum, validate, ClassLimits, ValidateAnswer, ValidateRequest};
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
    /// At most `sessions::MAX_VERSION_LEN` characters (the pattern is semver.org's grammar).
    #[schema(schema_with = semver_schema)]
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

/// semver.org's grammar of a version (what `semver::Version::parse` reads).
const SEMVER_PATTERN: &str = concat!(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)",
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?",
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$",
);

/// `extension_version`: a string of format `semver`, no length bound (`semver` decides).
fn semver_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{SchemaFormat, Type};
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::Custom("semver".into())))
        .pattern(Some(SEMVER_PATTERN))
        .max_length(Some(crate::sessions::MAX_VERSION_LEN))
        .description(Some(
            "A semantic version; required (422 when absent), 426 below the configured minimum.",
        ))
        .build()
}

fn short(field: &str, v: Option<String>, max: usize) -> Result<Option<String>> {
    match v {
        Some(s) => common::valid::check_text(&s, common::valid::TextRule::Label, max)
            .map(|()| Some(s))
            .map_err(|reason| ApiError::validation(field, reason)),
        None => Ok(None),
    }
}

/// Validate or create a VS Code session
#[utoipa::path(post, path = "/api/vscode/session/validate", tag = "session",
    request_body = Body,
    responses(
        (status = 200, description = "The session, found or created", body = ValidateAnswer),
        (status = 426, description = "Extension upgrade required"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn validate_session(
    State(state): State<AppState>,
    user: CurrentUser,
    deadline: Deadline,
    ApiJson(body): ApiJson<Body>,
) -> Result<Json<ValidateAnswer>> {
    let raw_version = body
        .extension_version
        .ok_or_else(|| ApiError::validation("extension_version", "is required"))?;
    let version = crate::sessions::parse_version(&raw_version)?;
    if let Some(need) = below_minimum(
        &version,
        state.settings.sessions.min_extension_version.as_deref(),
    ) {
        return Err(ApiError::from(crate::error::Error::UpgradeRequired {
            have: version.to_string(),
            need,
        }));
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
    let limits = ClassLimits::from_fn(|c| effective_limit(&state, &user.record, c));
    Ok(Json(ValidateAnswer::new(
        &rec,
        created,
        &user.record.plan,
        balance.balance,
        limits,
    )))
}

/// The operations of this module (docs/api.md "Sessions").
#[derive(utoipa::OpenApi)]
#[openapi(paths(validate_session))]
pub(crate) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use utoipa::OpenApi;

    #[test]
    fn the_doc_lists_validate_with_its_answer() {
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        let op = &doc["paths"]["/api/vscode/session/validate"]["post"];
        assert_eq!(op["tags"], json!(["session"]));
        assert_eq!(op["summary"], "Validate or create a VS Code session");
        let statuses: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
        assert_eq!(statuses, ["200", "426", "503"]);
        let schemas = &doc["components"]["schemas"];
        let answer = &schemas["SessionValidateAnswer"];
        let props: Vec<&String> = answer["properties"].as_object().unwrap().keys().collect();
        let want = [
            "credits",
            "expires_at",
            "permissions",
            "rate_limits",
            "session",
            "session_id",
            "status",
            "user",
            "valid",
        ];
        assert_eq!(props, want);
        assert_eq!(answer["required"].as_array().unwrap().len(), want.len());
        assert_eq!(
            schemas["SessionStatus"]["enum"],
            json!(["created", "active"])
        );
        let limits: Vec<&str> = schemas["ClassLimits"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(limits, common::class::NAMES);
        let user = &schemas["SessionUser"]["properties"];
        for m in ["user_id", "plan", "clerkId", "planType", "credits"] {
            assert!(user.get(m).is_some(), "user.{m}");
        }
        assert_eq!(
            schemas["SessionRef"]["properties"]["expiresAt"]["format"],
            "date-time"
        );
    }
}
