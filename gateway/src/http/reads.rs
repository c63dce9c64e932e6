//! The dashboard's reads (SPEC §5.10b, docs/api.md "Reads for the dashboard"): the ledger,
//! the open holds, the caller's rate limits, the admin's user search. Thin: parse,
//! authorize, call `crate::reads`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::admin::AdminUser;
use super::error::Result;
use super::extract::ApiQuery;
use super::guard::{effective_limit, CurrentUser};
use super::target::{provision_other, Target};
use super::{guarded, Class};
use crate::reads::{
    self, HoldsAnswer, LimitsAnswer, SearchAnswer, TransactionsPage, DEFAULT_PAGE, DEFAULT_SEARCH,
    MAX_PAGE, MAX_SEARCH,
};
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let user_routes = Router::new()
        .route("/api/users/{id}/credits/transactions", get(transactions))
        .route("/api/users/{id}/credits/holds", get(holds))
        .route("/api/vscode/user/limits", get(limits));
    let admin_routes = Router::new().route("/api/admin/users", get(search_users));
    Router::new()
        .merge(guarded(state, Class::Profile, user_routes))
        .merge(guarded(state, Class::Admin, admin_routes))
}

/// The query of the ledger. Read as strings so a bad one is a 422 naming it.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TransactionsQuery {
    /// Rows per page, newest first.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 200, default = 50)]
    limit: Option<String>,
    /// The `next_before` of the previous page: only rows older than that transaction.
    #[param(value_type = Option<String>, format = Uuid)]
    before: Option<String>,
}

/// A user's ledger, newest first
///
/// Keyset pagination: pass the answer's `next_before` (a transaction id) as
/// `before` for the next, older page; `null` when there is none.
#[utoipa::path(get, path = "/api/users/{id}/credits/transactions", tag = "profile",
    params(TransactionsQuery),
    responses(
        (status = 200, description = "One page of the ledger", body = TransactionsPage),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn transactions(
    State(state): State<AppState>,
    caller: CurrentUser,
    Target(id): Target,
    ApiQuery(q): ApiQuery<TransactionsQuery>,
) -> Result<Json<TransactionsPage>> {
    let limit = reads::page_limit(q.limit.as_deref(), DEFAULT_PAGE, MAX_PAGE)?;
    let before = reads::cursor(q.before.as_deref())?;
    provision_other(&state, &caller, &id).await?;
    Ok(Json(
        reads::transactions(&state.pg, &id, limit, before).await?,
    ))
}

/// A user's open holds
#[utoipa::path(get, path = "/api/users/{id}/credits/holds", tag = "profile",
    responses(
        (status = 200, description = "The open holds, soonest to expire first", body = HoldsAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn holds(
    State(state): State<AppState>,
    caller: CurrentUser,
    Target(id): Target,
) -> Result<Json<HoldsAnswer>> {
    provision_other(&state, &caller, &id).await?;
    let mut conn = state.redis().await?;
    Ok(Json(
        reads::holds(&state.pg, &mut conn, &state.keys, &id).await?,
    ))
}

/// The caller's rate limits now
///
/// Each class's effective limit with what is left and when it is full again,
/// read from the stored GCRA state without spending it (this request's own
/// `profile` unit included), the plan, any override, and whether the caller is an admin.
#[utoipa::path(get, path = "/api/vscode/user/limits", tag = "profile",
    responses(
        (status = 200, description = "The limits in force", body = LimitsAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn limits(
    State(state): State<AppState>,
    caller: CurrentUser,
) -> Result<Json<LimitsAnswer>> {
    let rec = &caller.record;
    let mut classes: Vec<_> = Class::ALL
        .into_iter()
        .map(|c| {
            let l = effective_limit(&state, rec, c);
            (c.as_str().to_string(), l, rec.overrides.contains_key(&c))
        })
        .collect();
    let events = crate::rate_limit::usage_events_limit(&state.settings, &rec.plan);
    classes.push((crate::rate_limit::USAGE_EVENTS.to_string(), events, false));
    let mut conn = state.redis().await?;
    Ok(Json(
        reads::limits(&mut conn, &state.keys, rec, caller.is_admin(), &classes).await?,
    ))
}

/// The query of the user search.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SearchQuery {
    /// An id prefix or part of an email (case-insensitive); empty lists users by id.
    #[param(max_length = 254)]
    query: Option<String>,
    /// How many users, by id.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100, default = 20)]
    limit: Option<String>,
}

/// Search users by id prefix or email (admin)
#[utoipa::path(get, path = "/api/admin/users", tag = "admin",
    params(SearchQuery),
    responses(
        (status = 200, description = "The users found, by id", body = SearchAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn search_users(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(q): ApiQuery<SearchQuery>,
) -> Result<Json<SearchAnswer>> {
    let limit = reads::page_limit(q.limit.as_deref(), DEFAULT_SEARCH, MAX_SEARCH)?;
    let query = reads::search_query(q.query.as_deref())?;
    Ok(Json(reads::search_users(&state.pg, &query, limit).await?))
}

/// The dashboard's reads in the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(transactions, holds, limits, search_users))]
pub(crate) struct Doc;
