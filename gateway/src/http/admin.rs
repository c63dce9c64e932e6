//! Admin routes: plan, rate-limit overrides, status, audit (docs/api.md "Admin").
//!
//! Every change writes Postgres with its audit row in one transaction and
//! refreshes the Redis user hash (see [`crate::audit::change_user`]); other
//! gateways pick it up when their local copy expires, well within 5 s.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::{ApiJson, ApiQuery};
use super::guard::{effective_limit, CurrentUser};
use super::target::Target;
use super::{guarded, Class};
use crate::admin::{self, By, Unknown, UserAnswer};
use crate::audit::{self, Action, AuditAnswer, RequestId};
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
fn view(state: &AppState, rec: &UserRecord) -> Json<Value> {
    answer(&UserAnswer::new(rec, |c| effective_limit(state, rec, c)))
}

/// An answer as JSON text: through `Value`, so its members keep the order they always had.
fn answer(a: &impl Serialize) -> Json<Value> {
    Json(serde_json::to_value(a).expect("an admin answer serializes"))
}

/// The target is provisioned first when never seen (docs/api.md "Conventions").
async fn provision(state: &AppState, id: &str) -> Result<()> {
    admin::target(&state.user_store, id, Unknown::Provision).await?;
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct PlanBody {
    /// One of the configured plans (`plans.NAME`: by default free, pro, team, enterprise).
    #[schema(min_length = 1, max_length = 64)]
    plan: String,
}

/// Change a user's plan (admin)
#[utoipa::path(put, path = "/api/admin/users/{id}/plan", tag = "admin",
    request_body = PlanBody,
    responses(
        (status = 200, description = "The user after the change", body = UserAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn set_plan(
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
    Ok(view(&state, &change.record))
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

/// Set a per-user rate-limit override (admin)
#[utoipa::path(put, path = "/api/admin/users/{id}/rate-limits", tag = "admin",
    request_body = RateLimitBody,
    responses(
        (status = 200, description = "The user after the change", body = UserAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn set_rate_limit(
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
            let previous = before.overrides.get(&class);
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
    Ok(view(&state, &rec))
}

/// The query of `DELETE /api/admin/users/{id}/rate-limits`. `class` is read
/// as an optional string so that a missing or unknown one is a 422 naming it.
#[derive(Deserialize)]
pub(crate) struct ClassQuery {
    class: Option<String>,
}

/// By hand: the derive cannot state both `schema_with` and `required`.
impl utoipa::IntoParams for ClassQuery {
    fn into_params(
        _: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        vec![ParameterBuilder::new()
            .name("class")
            .parameter_in(ParameterIn::Query)
            .required(utoipa::openapi::Required::True)
            .description(Some("The class whose override to remove"))
            .schema(Some(super::openapi::class_schema()))
            .build()]
    }
}

/// Remove a per-user rate-limit override (admin)
#[utoipa::path(delete, path = "/api/admin/users/{id}/rate-limits", tag = "admin",
    params(ClassQuery),
    responses(
        (status = 200, description = "The user after the change", body = UserAnswer),
        (status = 404, description = "No such user, or no override of this class"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn delete_rate_limit(
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
            let Some(previous) = before.overrides.get(&class) else {
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
    Ok(view(&state, &rec))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct StatusBody {
    #[schema(schema_with = super::openapi::settable_status_schema)]
    status: String,
}

/// Suspend or reactivate a user (admin)
#[utoipa::path(put, path = "/api/admin/users/{id}/status", tag = "admin",
    request_body = StatusBody,
    responses(
        (status = 200, description = "The user after the change", body = UserAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn set_status(
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
    Ok(view(&state, &rec))
}

/// The query of `GET /api/admin/audit`. `limit` is read as a string so that a
/// bad one is a 422 naming it ([`audit_limit`]).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditQuery {
    /// Only entries about this user (empty: every entry).
    #[param(max_length = 64, pattern = "^[A-Za-z0-9_-]*$")]
    user_id: Option<String>,
    /// How many entries, newest first.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000, default = 50)]
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

/// The audit trail, newest first (admin)
#[utoipa::path(get, path = "/api/admin/audit", tag = "admin",
    params(AuditQuery),
    responses(
        (status = 200, description = "The newest entries", body = AuditAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn list_audit(
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
    Ok(answer(&AuditAnswer { entries }))
}

/// The admin operations of the OpenAPI document (the grant is in `http::credits`).
#[derive(utoipa::OpenApi)]
#[openapi(paths(set_plan, set_rate_limit, delete_rate_limit, set_status, list_audit))]
pub(crate) struct Doc;

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
                Err(ApiError::Domain(crate::error::Error::Validation { field, .. })) => {
                    assert_eq!(field, "limit")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

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
    fn the_doc_lists_every_admin_operation_with_its_answer() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        let user: &[&str] = &["plan", "rate_limits", "status", "user_id"];
        let ops: [(&str, &str, &str, &[&str]); 5] = [
            (
                "put",
                "/api/admin/users/{id}/plan",
                "Change a user's plan (admin)",
                user,
            ),
            (
                "put",
                "/api/admin/users/{id}/rate-limits",
                "Set a per-user rate-limit override (admin)",
                user,
            ),
            (
                "delete",
                "/api/admin/users/{id}/rate-limits",
                "Remove a per-user rate-limit override (admin)",
                user,
            ),
            (
                "put",
                "/api/admin/users/{id}/status",
                "Suspend or reactivate a user (admin)",
                user,
            ),
            (
                "get",
                "/api/admin/audit",
                "The audit trail, newest first (admin)",
                &["entries"],
            ),
        ];
        assert_eq!(doc["paths"].as_object().unwrap().len(), 4);
        for (method, path, summary, members) in ops {
            let op = &doc["paths"][path][method];
            assert_eq!(op["tags"], json!(["admin"]), "{method} {path}");
            assert_eq!(op["summary"], summary, "{method} {path}");
            let schema = &op["responses"]["200"]["content"]["application/json"]["schema"];
            assert_eq!(properties(&doc, schema), *members, "{method} {path}");
        }
        let schemas = &doc["components"]["schemas"];
        let entry = json!({"$ref": "#/components/schemas/AuditEntry"});
        let fields = ["action", "actor", "at", "details", "request_id", "target"];
        assert_eq!(properties(&doc, &entry), fields);
        // Every member is always there, `target` and `request_id` maybe null.
        assert_eq!(
            schemas["AuditEntry"]["required"].as_array().unwrap().len(),
            6
        );
        assert_eq!(
            properties(
                &doc,
                &json!({"$ref": "#/components/schemas/EffectiveLimit"})
            ),
            ["limit", "source", "window_secs"]
        );
        assert_eq!(schemas["LimitSource"]["enum"], json!(["override", "plan"]));

        let audit = &doc["paths"]["/api/admin/audit"]["get"]["parameters"];
        assert_eq!(audit[0]["name"], "user_id");
        assert_eq!(audit[1]["name"], "limit");
        assert_eq!(audit[1]["in"], "query");
        assert_eq!(audit[1]["required"], false);
        let limit = &audit[1]["schema"];
        assert_eq!(
            (&limit["type"], &limit["default"]),
            (&json!("integer"), &json!(50))
        );
        assert_eq!(
            (&limit["minimum"], &limit["maximum"]),
            (&json!(1), &json!(MAX_AUDIT_LIMIT))
        );
        let delete = &doc["paths"]["/api/admin/users/{id}/rate-limits"]["delete"]["parameters"];
        let names: Vec<&str> = Class::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(delete.as_array().unwrap().len(), 1);
        assert_eq!(
            (&delete[0]["name"], &delete[0]["in"]),
            (&json!("class"), &json!("query"))
        );
        assert_eq!(delete[0]["required"], true);
        assert_eq!(delete[0]["schema"]["enum"], json!(names));
        for (method, path, ..) in ops {
            if method != "get" && method != "delete" {
                assert!(
                    doc["paths"][path][method].get("parameters").is_none(),
                    "{path}"
                );
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
