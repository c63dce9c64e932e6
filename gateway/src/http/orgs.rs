//! Organizations (SPEC 5.11, docs/api.md "Organizations"): admins create them
//! and grant to their pools; the organization's admins (and admins) manage
//! members and caps and read the pool. Thin: parse, authorize, call
//! `crate::orgs` and `crate::credits::orgs`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::Value;

use super::admin::AdminUser;
use super::credits::{idempotency_header, respond, IdempotencyHeader};
use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::extract::{ApiJson, ApiQuery};
use super::guard::CurrentUser;
use super::{guarded, Class};
use crate::admin::{self, Unknown};
use crate::alerts::{AlertConfig, AlertList, AlertsBody, Owner};
use crate::analytics::AnalyticsQuery;
use crate::audit::{Action, RequestId};
use crate::credits::{self, GrantAnswer, GrantBody, GrantRequest};
use crate::orgs::{
    authorize, put_member, put_org, read_pool, remove_member, MemberBody, MembershipAnswer,
    OrgAnswer, OrgBody, PoolAnalytics, PoolAnswer,
};
use crate::state::AppState;
use common::settings::AppEnv;

pub fn router(state: &AppState) -> Router<AppState> {
    let admin_routes = Router::new()
        .route("/api/admin/orgs/{org_id}", put(create_org))
        .route("/api/admin/orgs/{org_id}/credits/grant", post(grant_pool));
    let org_routes = Router::new()
        .route("/api/orgs/{org_id}", get(read_org))
        .route(
            "/api/orgs/{org_id}/members/{user_id}",
            put(set_member).delete(delete_member),
        )
        .route(
            "/api/orgs/{org_id}/alerts",
            get(get_org_alerts).put(put_org_alerts),
        )
        .route("/api/orgs/{org_id}/alerts/recent", get(recent_org_alerts))
        .route("/api/orgs/{org_id}/analytics", get(org_analytics));
    Router::new()
        .merge(guarded(state, Class::Admin, admin_routes))
        .merge(guarded(state, Class::Profile, org_routes))
}

/// An organization id as a path names it: 1..=64 of `[A-Za-z0-9_-]`, like a
/// user id (so `org:ORG_ID` is never a user's id); any other is not found.
fn org_id(raw: &str) -> Result<&str> {
    if crate::auth::valid_user_id(raw) {
        Ok(raw)
    } else {
        Err(ApiError::not_found("no such organization"))
    }
}

fn user_id(raw: &str) -> Result<&str> {
    if crate::auth::valid_user_id(raw) {
        Ok(raw)
    } else {
        Err(ApiError::not_found("no such user"))
    }
}

/// Create or update an organization (admin)
///
/// Creates the organization, or gives an existing one the name and plan (`created` says
/// which). Audited (`org.put`).
#[utoipa::path(put, path = "/api/admin/orgs/{org_id}", tag = "admin",
    request_body = OrgBody,
    responses(
        (status = 200, description = "Created or updated", body = OrgAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn create_org(
    State(state): State<AppState>,
    AdminUser(caller): AdminUser,
    Path(raw): Path<String>,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiJson(body): ApiJson<OrgBody>,
) -> Result<Response> {
    let id = org_id(&raw)?;
    deadline.commit()?;
    let by = Action {
        actor: caller.id(),
        action: "org.put",
        target: Some(id),
        request_id: &rid,
    };
    Ok(Json(put_org(&state.credits, by, id, &body).await?).into_response())
}

/// Grant credits to an organization's pool (admin)
///
/// A ledger row with the organization and no user; audited (`org.credits.grant`).
#[utoipa::path(post, path = "/api/admin/orgs/{org_id}/credits/grant", tag = "admin",
    request_body = GrantBody,
    params(IdempotencyHeader),
    responses(
        (status = 200, description = "Granted (`Idempotent-Replayed: true` on a replay)", body = GrantAnswer),
        (status = 409, description = "Idempotency conflict"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn grant_pool(
    State(state): State<AppState>,
    AdminUser(caller): AdminUser,
    Path(raw): Path<String>,
    RequestId(request_id): RequestId,
    headers: HeaderMap,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response> {
    let id = org_id(&raw)?.to_string();
    let key = credits::idempotency_key(idempotency_header(&headers))?;
    let (amount, reason) = credits::parse_body::<GrantBody>(body)?.validate()?;
    deadline.commit()?;
    let answer = credits::orgs::grant_pool(
        &state.credits,
        GrantRequest {
            actor: caller.id().to_string(),
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

/// Read an organization's pool
///
/// The pool's balance and holds, and each member's role, cap, and spend this period.
/// For the organization's admins and admins.
#[utoipa::path(get, path = "/api/orgs/{org_id}", tag = "profile",
    responses(
        (status = 200, description = "The pool", body = PoolAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn read_org(
    State(state): State<AppState>,
    caller: CurrentUser,
    Path(raw): Path<String>,
) -> Result<Json<PoolAnswer>> {
    let id = org_id(&raw)?;
    authorize(&state.credits, id, caller.id(), caller.is_admin()).await?;
    Ok(Json(read_pool(&state.credits, id).await?))
}

/// Add a member, or change their role and cap
///
/// A user belongs to at most one organization (another's member is 422 naming `user_id`). An
/// organization's admin adds users who exist (an unknown one is 404); an admin may add any.
/// Applies on every gateway within 5 s. Audited (`org.member.set`). For the organization's
/// admins and admins.
#[utoipa::path(put, path = "/api/orgs/{org_id}/members/{user_id}", tag = "profile",
    request_body = MemberBody,
    responses(
        (status = 200, description = "The membership", body = MembershipAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn set_member(
    State(state): State<AppState>,
    caller: CurrentUser,
    Path((raw_org, raw_user)): Path<(String, String)>,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiJson(body): ApiJson<MemberBody>,
) -> Result<Json<MembershipAnswer>> {
    let (org, user) = (org_id(&raw_org)?, user_id(&raw_user)?);
    authorize(&state.credits, org, caller.id(), caller.is_admin()).await?;
    // Only admins create an account that was never seen; an organization's
    // admin adds users who exist (404 otherwise).
    let unknown = if caller.is_admin() {
        Unknown::Provision
    } else {
        Unknown::Refuse
    };
    admin::target(&state.user_store, user, unknown).await?;
    deadline.commit()?;
    let by = Action {
        actor: caller.id(),
        action: "org.member.set",
        target: Some(user),
        request_id: &rid,
    };
    Ok(Json(
        put_member(&state.credits, by, org, user, &body).await?,
    ))
}

/// Remove a member
///
/// From then on they spend their own balance; their open holds on the pool stay theirs to
/// settle or release. Audited (`org.member.remove`). For the organization's admins and admins.
#[utoipa::path(delete, path = "/api/orgs/{org_id}/members/{user_id}", tag = "profile",
    responses(
        (status = 204, description = "Removed"),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn delete_member(
    State(state): State<AppState>,
    caller: CurrentUser,
    Path((raw_org, raw_user)): Path<(String, String)>,
    RequestId(rid): RequestId,
    deadline: Deadline,
) -> Result<StatusCode> {
    let (org, user) = (org_id(&raw_org)?, user_id(&raw_user)?);
    authorize(&state.credits, org, caller.id(), caller.is_admin()).await?;
    deadline.commit()?;
    let by = Action {
        actor: caller.id(),
        action: "org.member.remove",
        target: Some(user),
        request_id: &rid,
    };
    remove_member(&state.credits, by, org, user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set an organization's spend alerts
///
/// As a user's (`PUT /api/users/{id}/alerts`), on the pool: `balance_below` its balance,
/// `spent_pct` of its month's allowance. For the organization's admins and admins.
/// Audited (`alerts.set`).
#[utoipa::path(put, path = "/api/orgs/{org_id}/alerts", tag = "profile",
    request_body = AlertsBody,
    responses(
        (status = 200, description = "The configuration as stored", body = AlertConfig),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn put_org_alerts(
    State(state): State<AppState>,
    caller: CurrentUser,
    Path(raw): Path<String>,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiJson(body): ApiJson<AlertsBody>,
) -> Result<Json<AlertConfig>> {
    let id = org_id(&raw)?;
    authorize(&state.credits, id, caller.id(), caller.is_admin()).await?;
    let production = state.settings.app_env == AppEnv::Production;
    let checked = crate::alerts::check(body, production)?;
    if let (true, Some(url)) = (production, &checked.webhook) {
        crate::alerts::check_resolution(url).await?;
    }
    deadline.commit()?;
    let by = Action {
        actor: caller.id(),
        action: "alerts.set",
        target: Some(id),
        request_id: &rid,
    };
    Ok(Json(
        crate::alerts::put(&state.pg, by, Owner::org(id), &checked).await?,
    ))
}

/// Read an organization's spend alerts
///
/// The thresholds and webhook URL, without the secret.
#[utoipa::path(get, path = "/api/orgs/{org_id}/alerts", tag = "profile",
    responses(
        (status = 200, description = "The configuration", body = AlertConfig),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn get_org_alerts(
    State(state): State<AppState>,
    caller: CurrentUser,
    Path(raw): Path<String>,
) -> Result<Json<AlertConfig>> {
    let id = org_id(&raw)?;
    authorize(&state.credits, id, caller.id(), caller.is_admin()).await?;
    Ok(Json(crate::alerts::get(&state.pg, Owner::org(id)).await?))
}

/// An organization's recent alerts
///
/// The last 30 days, newest first (at most 200), whether or not a webhook took them.
#[utoipa::path(get, path = "/api/orgs/{org_id}/alerts/recent", tag = "profile",
    responses(
        (status = 200, description = "The alerts", body = AlertList),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn recent_org_alerts(
    State(state): State<AppState>,
    caller: CurrentUser,
    Path(raw): Path<String>,
) -> Result<Json<AlertList>> {
    let id = org_id(&raw)?;
    authorize(&state.credits, id, caller.id(), caller.is_admin()).await?;
    Ok(Json(
        crate::alerts::recent(&state.pg, Owner::org(id)).await?,
    ))
}

/// An organization's analytics
///
/// What the pool paid for over the last `days` days (today included, UTC): by member, by day
/// and by model, from the ledger, with what was granted to it. For the organization's admins
/// and admins.
#[utoipa::path(get, path = "/api/orgs/{org_id}/analytics", tag = "profile",
    params(AnalyticsQuery),
    responses(
        (status = 200, description = "The pool's figures over the window", body = PoolAnalytics),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn org_analytics(
    State(state): State<AppState>,
    caller: CurrentUser,
    Path(raw): Path<String>,
    ApiQuery(q): ApiQuery<AnalyticsQuery>,
) -> Result<Json<PoolAnalytics>> {
    let id = org_id(&raw)?;
    let days = q.days()?;
    authorize(&state.credits, id, caller.id(), caller.is_admin()).await?;
    Ok(Json(
        crate::orgs::pool_analytics(&state.credits, id, days).await?,
    ))
}

/// The operations of this module.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    create_org,
    grant_pool,
    read_org,
    set_member,
    delete_member,
    put_org_alerts,
    get_org_alerts,
    recent_org_alerts,
    org_analytics
))]
pub(crate) struct Doc;
