//! Profiles and preferences (docs/api.md "Profile"). A profile is served from
//! the profile cache in Redis, or read from Postgres on a miss, with the
//! balance always read live (`crate::profile::profile`); a preferences change
//! travels as an event and lands through the users worker, whose commit
//! invalidates the cached profile.
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use chrono::Utc;
use common::events::{Envelope, Event, UserPreferences};
use serde_json::Value;

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::ApiJson;
use super::guard::CurrentUser;
use super::target::{provision_other, Target};
use super::{guarded, Class};
use crate::profile::Profile;
use crate::state::AppState;
use crate::users::{PreferencesAnswer, PreferencesFit};

/// Largest preferences patch, measured as compact JSON (whitespace is free).
pub const MAX_PREFERENCES_BYTES: usize = 8 * 1024;

pub fn router(state: &AppState) -> Router<AppState> {
    let routes = Router::new()
        .route("/api/users/{id}/profile", get(profile))
        .route("/api/users/{id}/preferences", patch(update_preferences));
    guarded(state, Class::Profile, routes)
}

/// A user's profile
///
/// Served from a cache that every change of the user invalidates; the
/// credits are always read live (docs/architecture.md, "Profile cache").
#[utoipa::path(get, path = "/api/users/{id}/profile", tag = "profile",
    responses(
        (status = 200, description = "The profile", body = Profile),
        (status = 404, description = "No such user"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn profile(
    State(state): State<AppState>,
    caller: CurrentUser,
    Target(id): Target,
) -> Result<Json<Profile>> {
    provision_other(&state, &caller, &id).await?;
    let profile = crate::profile::profile(&state.user_store, &state.publisher, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such user"))?;
    Ok(Json(profile))
}

/// Merge preferences (object ≤ 8 KiB)
///
/// 202 once the broker confirmed the change; a worker merges it.
#[utoipa::path(patch, path = "/api/users/{id}/preferences", tag = "profile",
    request_body(content = Object, description = "A JSON object of at most 8 KiB (compact JSON), merged shallowly \
        into the stored preferences; the merged object stays within `users.max_preferences_bytes` (8 KiB by default)"),
    responses(
        (status = 202, description = "Queued", body = PreferencesAnswer),
        (status = 413, description = "The patch is over 8 KiB"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn update_preferences(
    State(state): State<AppState>,
    caller: CurrentUser,
    Target(id): Target,
    deadline: Deadline,
    ApiJson(patch): ApiJson<Value>,
) -> Result<Response> {
    provision_other(&state, &caller, &id).await?;
    check_preferences(&patch)?;
    let members = patch.as_object().cloned().unwrap_or_default();
    // Counted against the merged bound before anything is published (see
    // `users::admit_preferences` for the merge base and docs/reliability.md,
    // "Bounds").
    match crate::users::admit_preferences(&state.user_store, &id, &members).await? {
        PreferencesFit::Fits { .. } => {}
        PreferencesFit::TooLarge { size } => {
            return Err(ApiError::validation(
                "preferences",
                format!(
                    "the merged preferences would be {size} bytes, above the {} allowed",
                    state.settings.users.max_preferences_bytes
                ),
            ));
        }
    }
    if let Err(e) = deadline.commit() {
        crate::users::forget_preferences_size(&state.user_store, &id).await;
        return Err(e);
    }
    let envelope = Envelope::new(
        Event::UserPreferences(UserPreferences {
            user_id: id.clone(),
            patch,
        }),
        Some(id.clone()),
        Utc::now(),
    );
    if let Err(e) = state.publisher.publish(&envelope).await {
        // Counted but never landing: let the next patch seed from Postgres.
        crate::users::forget_preferences_size(&state.user_store, &id).await;
        return Err(ApiError::unavailable("rabbitmq", e));
    }
    let body = PreferencesAnswer {
        accepted: true,
        user_id: id,
        event_id: envelope.id,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// A preferences patch is a JSON object of at most 8 KiB.
pub fn check_preferences(patch: &Value) -> Result<()> {
    if !patch.is_object() {
        return Err(ApiError::validation(
            "body",
            "preferences must be a JSON object",
        ));
    }
    // Keys and strings as Postgres's jsonb stores them (docs/reliability.md).
    common::valid::check_json_object(patch)
        .map_err(|reason| ApiError::validation("preferences", reason))?;
    let size = serde_json::to_vec(patch)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if size > MAX_PREFERENCES_BYTES {
        return Err(ApiError::PayloadTooLarge(MAX_PREFERENCES_BYTES));
    }
    Ok(())
}

/// The operations of this module (docs/api.md "Profile").
#[derive(utoipa::OpenApi)]
#[openapi(paths(profile, update_preferences))]
pub(crate) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn preferences_must_be_an_object_of_at_most_8_kib() {
        assert!(check_preferences(&json!({"theme": "dark"})).is_ok());
        for bad in [json!([1]), json!("x"), json!(null), json!(3)] {
            assert!(matches!(
                check_preferences(&bad),
                Err(ApiError::Domain(crate::error::Error::Validation { .. }))
            ));
        }
        let big = json!({"k": "x".repeat(MAX_PREFERENCES_BYTES)});
        assert!(matches!(
            check_preferences(&big),
            Err(ApiError::PayloadTooLarge(_))
        ));
        let edge = json!({"k": "x".repeat(MAX_PREFERENCES_BYTES - 8)});
        assert_eq!(
            serde_json::to_vec(&edge).unwrap().len(),
            MAX_PREFERENCES_BYTES
        );
        assert!(check_preferences(&edge).is_ok());
    }

    /// The answer's schema as the document has it (components resolved).
    fn answer(doc: &Value, path: &str, method: &str, status: &str) -> Value {
        let op = &doc["paths"][path][method];
        let r = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} {status}: {op}"));
        doc["components"]["schemas"][r.trim_start_matches("#/components/schemas/")].clone()
    }

    fn names(v: &Value) -> Vec<String> {
        let mut n: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        n.sort();
        n
    }

    #[test]
    fn the_doc_lists_profile_and_preferences_with_tag_summary_and_answers() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        for (path, method, summary, errors) in [
            (
                "/api/users/{id}/profile",
                "get",
                "A user's profile",
                ["404", "503"],
            ),
            (
                "/api/users/{id}/preferences",
                "patch",
                "Merge preferences (object ≤ 8 KiB)",
                ["413", "503"],
            ),
        ] {
            let op = &doc["paths"][path][method];
            assert_eq!(op["tags"], json!(["profile"]), "{path}");
            assert_eq!(op["summary"], summary, "{path}");
            for e in errors {
                assert!(op["responses"][e].is_object(), "{path} {e}");
            }
        }
        let patch = &doc["paths"]["/api/users/{id}/preferences"]["patch"]["requestBody"];
        assert_eq!(
            patch["content"]["application/json"]["schema"]["type"],
            "object"
        );
        let profile = answer(&doc, "/api/users/{id}/profile", "get", "200");
        let members = [
            "created_at",
            "credits",
            "email",
            "last_active_at",
            "name",
            "plan",
            "preferences",
            "recentTransactions",
            "status",
            "subscription",
            "usage",
            "user",
            "user_id",
            "vscode",
        ];
        assert_eq!(names(&profile["properties"]), members);
        // Required: the members never null (the others are always present too).
        let mut required: Vec<&str> = profile["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        required.sort();
        assert_eq!(
            required,
            [
                "created_at",
                "credits",
                "plan",
                "preferences",
                "recentTransactions",
                "status",
                "usage",
                "user",
                "user_id",
                "vscode"
            ]
        );
        assert_eq!(
            profile["properties"]["email"]["type"],
            json!(["string", "null"])
        );
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            names(&schemas["ProfileCredits"]["properties"]),
            ["as_of", "balance", "held"]
        );
        assert_eq!(
            names(&schemas["ProfileVscode"]["properties"]),
            ["active_sessions", "last_extension_version", "last_seen_at"]
        );
        assert_eq!(
            names(&schemas["ProfileSubscription"]["properties"]).len(),
            7
        );
        let user = &schemas["OriginalUser"];
        assert_eq!(
            names(&user["properties"]),
            [
                "clerkId",
                "createdAt",
                "credits",
                "email",
                "extensionVersion",
                "firstName",
                "integrationPreferences",
                "lastApiRequest",
                "lastName",
                "lastVSCodeActivity",
                "planType",
                "totalApiRequests"
            ]
        );
        assert_eq!(
            user["properties"]["lastApiRequest"]["type"],
            json!(["string", "null"])
        );
        assert_eq!(
            names(&schemas["OriginalUsage"]["properties"]),
            [
                "avgCreditsPerDay",
                "totalCreditsUsed",
                "totalRequests",
                "totalTokens"
            ]
        );
        assert_eq!(
            schemas["OriginalUsage"]["properties"]["avgCreditsPerDay"]["type"],
            "number"
        );
        assert_eq!(
            names(&schemas["OriginalTransaction"]["properties"]),
            ["amount", "created_at", "description", "transaction_type"]
        );
        let accepted = answer(&doc, "/api/users/{id}/preferences", "patch", "202");
        assert_eq!(
            names(&accepted["properties"]),
            ["accepted", "event_id", "user_id"]
        );
    }

    #[test]
    fn a_profile_serializes_to_the_members_it_always_had_and_the_originals() {
        let t = chrono::DateTime::parse_from_rfc3339("2024-03-10T10:00:00.123456Z")
            .unwrap()
            .to_utc();
        let p = Profile {
            user_id: "u".into(),
            email: None,
            name: Some("Ada".into()),
            plan: "free".into(),
            status: "active".into(),
            created_at: t,
            last_active_at: None,
            credits: crate::profile::ProfileCredits::default(),
            subscription: None,
            preferences: json!({}),
            vscode: crate::profile::ProfileVscode {
                active_sessions: 0,
                last_extension_version: None,
                last_seen_at: None,
            },
            user: crate::profile::OriginalUser::default(),
            usage: crate::profile::OriginalUsage::default(),
            recent_transactions: vec![],
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"user_id": "u", "email": null, "name": "Ada", "plan": "free", "status": "active",
                "created_at": "2024-03-10T10:00:00.123456Z", "last_active_at": null,
                "credits": {"balance": 0, "held": 0, "as_of": null}, "subscription": null, "preferences": {},
                "vscode": {"active_sessions": 0, "last_extension_version": null, "last_seen_at": null},
                "user": serde_json::to_value(&p.user).unwrap(), "recentTransactions": [],
                "usage": {"totalCreditsUsed": 0, "totalTokens": 0, "totalRequests": 0, "avgCreditsPerDay": 0.0}})
        );
    }
}
