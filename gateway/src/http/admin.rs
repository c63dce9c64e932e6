//! Admin routes: plan, rate-limit overrides, status, audit (docs/api.md "Admin").
//!
//! Every change writes Postgres with its audit row in one transaction and
//! refreshes the Redis user hash (see [`crate::audit::change_user`]); other
//! gateways pick it up when their local copy expires, well within 5 s.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::{ApiJson, ApiQuery};
use super::guard::{effective_limit, CurrentUser};
use super::target::Target;
use super::{guarded, Class};
use crate::admin::{self, By, Unknown};
use crate::audit::{self, Action, RequestId};
use crate::error::Error;
use crate::state::AppState;
use crate::users::{Status, UserRecord};

/// Largest override an admin may set: a million requests per window keeps
/// the GCRA emission interval at ≥ 1 µs for any window ≥ 1 s.
pub const MAX_OVERRIDE_LIMIT: u64 = 1_000_000;
/// Longest override window: one day.
pub const MAX_OVERRIDE_WINDOW_SECS: u64 = 86_400;
/// Most audit rows one call returns.
pub const MAX_AUDIT_LIMIT: i64 = 1000;

pub fn router(state: &AppState) -> Router<AppState> {
    guarded(
        state,
        Class::Admin,
        Router::new()
            .route("/api/admin/users/{id}/plan", put(set_plan))
            .route(
                "/api/admin/users/{id}/rate-limits",
                put(set_rate_limit).delete(delete_rate_limit),
            )
            .route("/api/admin/users/{id}/status", put(set_status))
            .route("/api/admin/audit", get(list_audit)),
    )
}

/// The caller, when an admin; 403 `forbidden` otherwise. First among a
/// handler's arguments, so a non-admin learns nothing from input validation.
pub struct AdminUser(pub CurrentUser);

impl<S: Send + Sync> FromRequestParts<S> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        let user = CurrentUser::from_request_parts(parts, state).await?;
        user.require_admin()?;
        Ok(Self(user))
    }
}

/// What every change answers: the user's plan, status and effective limits.
fn view(state: &AppState, rec: &UserRecord) -> Value {
    let limits: Map<String, Value> = Class::ALL
        .into_iter()
        .map(|c| {
            let l = effective_limit(state, rec, c);
            let source = if rec.overrides.contains_key(c.as_str()) {
                "override"
            } else {
                "plan"
            };
            (
                c.as_str().to_string(),
                json!({"limit": l.limit, "window_secs": l.window_secs, "source": source}),
            )
        })
        .collect();
    json!({
        "user_id": rec.id,
        "plan": rec.plan,
        "status": rec.status.as_str(),
        "rate_limits": limits,
    })
}

/// The target is provisioned first when never seen (docs/api.md "Conventions").
async fn provision(state: &AppState, id: &str) -> Result<()> {
    admin::target(&state.user_store, id, Unknown::Provision).await?;
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct PlanBody {
    plan: String,
}

async fn set_plan(
    State(state): State<AppState>,
    AdminUser(caller): AdminUser,
    Target(id): Target,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiJson(body): ApiJson<PlanBody>,
) -> Result<Json<Value>> {
    let plan = admin::plan_name(&state.settings.plans, &body.plan)?;
    provision(&state, &id).await?;
    deadline.commit()?;
    let by = By {
        actor: caller.id(),
        request_id: &rid,
    };
    let change = admin::set_plan(&state.user_store, by, &id, &plan).await?;
    Ok(Json(view(&state, &change.record)))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct RateLimitBody {
    #[schema(schema_with = super::openapi::class_schema)]
    class: String,
    /// At most `MAX_OVERRIDE_LIMIT` (a test holds the two equal).
    #[schema(minimum = 1, maximum = 1000000)]
    limit: u64,
    /// At most `MAX_OVERRIDE_WINDOW_SECS`.
    #[schema(minimum = 1, maximum = 86400)]
    window_secs: u64,
}

fn parse_class(field: &str, class: &str) -> Result<Class> {
    Class::parse(class).ok_or_else(|| {
        let all: Vec<&str> = Class::ALL.iter().map(|c| c.as_str()).collect();
        ApiError::validation(field, format!("unknown class; one of {}", all.join(", ")))
    })
}

async fn set_rate_limit(
    State(state): State<AppState>,
    AdminUser(caller): AdminUser,
    Target(id): Target,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiJson(body): ApiJson<RateLimitBody>,
) -> Result<Json<Value>> {
    let class = parse_class("class", &body.class)?;
    if !(1..=MAX_OVERRIDE_LIMIT).contains(&body.limit) {
        return Err(ApiError::validation(
            "limit",
            format!("must be 1..={MAX_OVERRIDE_LIMIT}"),
        ));
    }
    if !(1..=MAX_OVERRIDE_WINDOW_SECS).contains(&body.window_secs) {
        return Err(ApiError::validation(
            "window_secs",
            format!("must be 1..={MAX_OVERRIDE_WINDOW_SECS}"),
        ));
    }
    provision(&state, &id).await?;
    deadline.commit()?;
    let action = Action {
        actor: caller.id(),
        action: "user.rate_limit.set",
        target: Some(&id),
        request_id: &rid,
    };
    let (limit, window) = (body.limit as i64, body.window_secs as i64);
    let ((), rec) = audit::change_user(&state.user_store, action, &id, |conn, before| {
        Box::pin(async move {
            sqlx::query(
                "insert into api_rate_limits (user_id, class, \"limit\", window_secs) \
                 values ($1, $2, $3, $4) on conflict (user_id, class) do update \
                 set \"limit\" = excluded.\"limit\", window_secs = excluded.window_secs, \
                 updated_at = now()",
            )
            .bind(&before.id)
            .bind(class.as_str())
            .bind(limit)
            .bind(window)
            .execute(&mut *conn)
            .await?;
            let previous = before.overrides.get(class.as_str());
            let details = json!({
                "class": class.as_str(),
                "limit": limit,
                "window_secs": window,
                "previous": previous.map(|p| json!({"limit": p.limit, "window_secs": p.window_secs})),
            });
            Ok(((), details))
        })
    })
    .await?;
    Ok(Json(view(&state, &rec)))
}

#[derive(Deserialize)]
struct ClassQuery {
    class: Option<String>,
}

async fn delete_rate_limit(
    State(state): State<AppState>,
    AdminUser(caller): AdminUser,
    Target(id): Target,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiQuery(q): ApiQuery<ClassQuery>,
) -> Result<Json<Value>> {
    let class = q
        .class
        .ok_or_else(|| ApiError::validation("class", "is required"))?;
    let class = parse_class("class", &class)?;
    provision(&state, &id).await?;
    deadline.commit()?;
    let action = Action {
        actor: caller.id(),
        action: "user.rate_limit.delete",
        target: Some(&id),
        request_id: &rid,
    };
    let ((), rec) = audit::change_user(&state.user_store, action, &id, |conn, before| {
        Box::pin(async move {
            // Nothing to remove: 404 rolls back, so no audit row either.
            let Some(previous) = before.overrides.get(class.as_str()) else {
                return Err(Error::NotFound(format!(
                    "no {} override for this user",
                    class.as_str()
                )));
            };
            sqlx::query("delete from api_rate_limits where user_id = $1 and class = $2")
                .bind(&before.id)
                .bind(class.as_str())
                .execute(&mut *conn)
                .await?;
            let details = json!({
                "class": class.as_str(),
                "previous": {"limit": previous.limit, "window_secs": previous.window_secs},
            });
            Ok(((), details))
        })
    })
    .await?;
    Ok(Json(view(&state, &rec)))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct StatusBody {
    #[schema(schema_with = super::openapi::settable_status_schema)]
    status: String,
}

async fn set_status(
    State(state): State<AppState>,
    AdminUser(caller): AdminUser,
    Target(id): Target,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiJson(body): ApiJson<StatusBody>,
) -> Result<Json<Value>> {
    let status = match Status::parse(&body.status) {
        Some(s @ (Status::Active | Status::Suspended)) => s,
        _ => {
            return Err(ApiError::validation(
                "status",
                "must be active or suspended",
            ))
        }
    };
    provision(&state, &id).await?;
    deadline.commit()?;
    let action = Action {
        actor: caller.id(),
        action: "user.status",
        target: Some(&id),
        request_id: &rid,
    };
    let ((), rec) = audit::change_user(&state.user_store, action, &id, |conn, before| {
        Box::pin(async move {
            // Erasure is final: a deleted account never comes back.
            if before.status == Status::Deleted {
                return Err(Error::validation("status", "the account is deleted"));
            }
            sqlx::query("update users set status = $2, updated_at = now() where id = $1")
                .bind(&before.id)
                .bind(status.as_str())
                .execute(&mut *conn)
                .await?;
            let details = json!({"status": status.as_str(), "previous": before.status.as_str()});
            Ok(((), details))
        })
    })
    .await?;
    Ok(Json(view(&state, &rec)))
}

#[derive(Deserialize)]
struct AuditQuery {
    user_id: Option<String>,
    limit: Option<String>,
}

/// `limit` of the audit query: default 50, 1..=1000.
fn audit_limit(raw: Option<&str>) -> Result<i64> {
    match raw {
        None => Ok(50),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_AUDIT_LIMIT).contains(n))
            .ok_or_else(|| ApiError::validation("limit", format!("must be 1..={MAX_AUDIT_LIMIT}"))),
    }
}

async fn list_audit(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Value>> {
    let limit = audit_limit(q.limit.as_deref())?;
    let target = q.user_id.filter(|u| !u.is_empty());
    if let Some(u) = &target {
        if !crate::auth::valid_user_id(u) {
            return Err(ApiError::validation(
                "user_id",
                "must be 1..=64 of [A-Za-z0-9_-]",
            ));
        }
    }
    let entries = audit::list(&state.pg, target.as_deref(), limit).await?;
    Ok(Json(json!({"entries": entries})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_limit_defaults_to_50_and_stays_within_1_to_1000() {
        assert_eq!(audit_limit(None).unwrap(), 50);
        assert_eq!(audit_limit(Some("1")).unwrap(), 1);
        assert_eq!(audit_limit(Some("1000")).unwrap(), 1000);
        for bad in ["0", "1001", "-1", "ten", ""] {
            match audit_limit(Some(bad)) {
                Err(ApiError::Validation { field, .. }) => assert_eq!(field, "limit"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn classes_parse_by_their_spec_names_only() {
        assert_eq!(parse_class("class", "usage").unwrap(), Class::Usage);
        assert!(parse_class("class", "Usage").is_err());
        assert!(parse_class("class", "auth_failures").is_err());
    }
}
