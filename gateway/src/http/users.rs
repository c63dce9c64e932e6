//! Profiles and preferences (docs/api.md "Profile"). A profile is read from Postgres (the
//! rare, read-your-own-writes path) plus the balance from Redis; a preferences
//! change travels as an event and lands through the users worker.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use common::events::{Envelope, Event, UserPreferences};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::ApiJson;
use super::guard::CurrentUser;
use super::target::{provision_other, Target};
use super::{guarded, Class};
use crate::state::AppState;
use crate::users::PreferencesFit;

/// Largest preferences patch, measured as compact JSON (whitespace is free).
pub const MAX_PREFERENCES_BYTES: usize = 8 * 1024;

pub fn router(state: &AppState) -> Router<AppState> {
    let routes = Router::new()
        .route("/api/users/{id}/profile", get(profile))
        .route("/api/users/{id}/preferences", patch(update_preferences));
    guarded(state, Class::Profile, routes)
}

/// `GET /api/users/:id/profile`.
async fn profile(
    State(state): State<AppState>,
    caller: CurrentUser,
    Target(id): Target,
) -> Result<Json<Profile>> {
    provision_other(&state, &caller, &id).await?;
    let profile = load_profile(&state, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such user".into()))?;
    Ok(Json(profile))
}

/// `PATCH /api/users/:id/preferences`: 202 once the broker confirmed the change.
async fn update_preferences(
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
    let body = json!({"accepted": true, "user_id": id, "event_id": envelope.id});
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

#[derive(Debug, Serialize)]
pub struct Profile {
    pub user_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub plan: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub last_active_at: Option<DateTime<Utc>>,
    pub credits: Credits,
    pub subscription: Option<Subscription>,
    pub preferences: Value,
    pub vscode: Vscode,
}

#[derive(Debug, Serialize)]
pub struct Credits {
    pub balance: i64,
    pub held: i64,
    pub as_of: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Subscription {
    pub id: Uuid,
    pub plan: String,
    pub status: String,
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
pub struct Vscode {
    pub active_sessions: i64,
    pub last_extension_version: Option<String>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct ProfileRow {
    id: String,
    email: Option<String>,
    name: Option<String>,
    plan: String,
    status: String,
    created_at: DateTime<Utc>,
    last_active_at: Option<DateTime<Utc>>,
    preferences: Value,
    active_sessions: i64,
    last_extension_version: Option<String>,
    last_seen_at: Option<DateTime<Utc>>,
}

/// Everything §5.4 shows about one user, or None when the id is unknown.
pub async fn load_profile(state: &AppState, user_id: &str) -> Result<Option<Profile>> {
    let row: Option<ProfileRow> = sqlx::query_as(
        "select u.id, u.email, u.name, u.plan, u.status, u.created_at, u.last_active_at, u.preferences, \
                (select count(*) from vscode_sessions s \
                  where s.user_id = u.id and s.expires_at > now()) as active_sessions, \
                (select s.extension_version from vscode_sessions s \
                  where s.user_id = u.id order by s.last_seen_at desc limit 1) as last_extension_version, \
                (select max(s.last_seen_at) from vscode_sessions s where s.user_id = u.id) as last_seen_at \
         from users u where u.id = $1",
    )
    .bind(user_id)
    .fetch_optional(&state.pg)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let subscription: Option<Subscription> = sqlx::query_as(
        "select id, plan, status, current_period_start, current_period_end, created_at, updated_at \
         from subscriptions where user_id = $1 order by created_at desc limit 1",
    )
    .bind(user_id)
    .fetch_optional(&state.pg)
    .await?;
    let balance = crate::credits::balance(&state.credits, &state.publisher, user_id).await?;
    Ok(Some(Profile {
        user_id: row.id,
        email: row.email,
        name: row.name,
        plan: row.plan,
        status: row.status,
        created_at: row.created_at,
        last_active_at: row.last_active_at,
        credits: Credits {
            balance: balance.balance,
            held: balance.held,
            as_of: balance.as_of,
        },
        subscription,
        preferences: row.preferences,
        vscode: Vscode {
            active_sessions: row.active_sessions,
            last_extension_version: row.last_extension_version,
            last_seen_at: row.last_seen_at,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_must_be_an_object_of_at_most_8_kib() {
        assert!(check_preferences(&json!({"theme": "dark"})).is_ok());
        for bad in [json!([1]), json!("x"), json!(null), json!(3)] {
            assert!(matches!(
                check_preferences(&bad),
                Err(ApiError::Validation { .. })
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
}
