//! Analytics and usage stats (docs/api.md "Analytics", §5.6, §5.10): parse the query, call
//! [`crate::analytics`], answer. Both routes are of class `analytics`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;

use super::error::Result;
use super::extract::ApiQuery;
use super::guard::CurrentUser;
use super::target::Target;
use super::{guarded, Class};
use crate::analytics::{self, AnalyticsQuery, StatsQuery};
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    guarded(
        state,
        Class::Analytics,
        Router::new()
            .route("/api/vscode/analytics", get(vscode_analytics))
            .route("/api/users/{id}/usage/stats", get(usage_stats)),
    )
}

/// `GET /api/vscode/analytics?days=N` (or `?timeframe=1d|7d|30d`): the caller's own.
async fn vscode_analytics(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(q): ApiQuery<AnalyticsQuery>,
) -> Result<Json<Value>> {
    let days = q.days()?;
    Ok(Json(
        analytics::analytics(&state.pg, &state.redis_link, &state.keys, user.id(), days).await?,
    ))
}

/// `GET /api/users/:id/usage/stats?from=&to=&group_by=`.
async fn usage_stats(
    State(state): State<AppState>,
    Target(id): Target,
    ApiQuery(q): ApiQuery<StatsQuery>,
) -> Result<Json<Value>> {
    let req = q.parse(chrono::Utc::now())?;
    Ok(Json(analytics::stats(&state.pg, &id, req).await?))
}
