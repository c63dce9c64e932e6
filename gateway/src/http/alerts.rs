//! Spend alerts (SPEC §5.11; docs/credits.md "Spend alerts"), class
//! `profile`: the owner's thresholds and webhook, and the alerts raised for
//! the extension's status bar. The rules are in `crate::alerts`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use common::settings::AppEnv;

use super::deadline::Deadline;
use super::error::Result;
use super::extract::ApiJson;
use super::guard::CurrentUser;
use super::target::{provision_other, Target};
use super::{guarded, Class};
use crate::alerts::{AlertConfig, AlertList, AlertsBody, Owner};
use crate::audit::{Action, RequestId};
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let routes = Router::new()
        .route("/api/users/{id}/alerts", get(get_alerts).put(put_alerts))
        .route("/api/vscode/user/alerts", get(recent_alerts));
    guarded(state, Class::Profile, routes)
}

/// Set spend alerts
///
/// Replaces the thresholds (at most 10: `balance_below` 0..=2^53−1 credits,
/// `spent_pct` 1..=100 % of the month's allowance) and the webhook. The
/// answer carries `webhook_secret` when this PUT made one (a new URL, or
/// `rotate_secret`); it is never shown again.
#[utoipa::path(put, path = "/api/users/{id}/alerts", tag = "profile",
    request_body = AlertsBody,
    responses(
        (status = 200, description = "The configuration as stored", body = AlertConfig),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn put_alerts(
    State(state): State<AppState>,
    caller: CurrentUser,
    Target(id): Target,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiJson(body): ApiJson<AlertsBody>,
) -> Result<Json<AlertConfig>> {
    let production = state.settings.app_env == AppEnv::Production;
    let checked = crate::alerts::check(body, production)?;
    if let (true, Some(url)) = (production, &checked.webhook) {
        crate::alerts::check_resolution(url).await?;
    }
    provision_other(&state, &caller, &id).await?;
    deadline.commit()?;
    let by = Action {
        actor: caller.id(),
        action: "alerts.set",
        target: Some(&id),
        request_id: &rid,
    };
    Ok(Json(
        crate::alerts::put(&state.pg, by, Owner::user(&id), &checked).await?,
    ))
}

/// Read spend alerts
///
/// The thresholds and webhook URL, without the secret.
#[utoipa::path(get, path = "/api/users/{id}/alerts", tag = "profile",
    responses(
        (status = 200, description = "The configuration", body = AlertConfig),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn get_alerts(
    State(state): State<AppState>,
    caller: CurrentUser,
    Target(id): Target,
) -> Result<Json<AlertConfig>> {
    provision_other(&state, &caller, &id).await?;
    Ok(Json(crate::alerts::get(&state.pg, Owner::user(&id)).await?))
}

/// The caller's recent alerts
///
/// The last 30 days, newest first (at most 200), whether or not a webhook
/// took them: for the extension's status bar.
#[utoipa::path(get, path = "/api/vscode/user/alerts", tag = "profile",
    responses(
        (status = 200, description = "The alerts", body = AlertList),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn recent_alerts(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<AlertList>> {
    Ok(Json(
        crate::alerts::recent(&state.pg, Owner::user(user.id())).await?,
    ))
}

/// The operations of this module.
#[derive(utoipa::OpenApi)]
#[openapi(paths(put_alerts, get_alerts, recent_alerts))]
pub(crate) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_doc_lists_the_three_routes_with_their_answers() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        for (path, method) in [
            ("/api/users/{id}/alerts", "put"),
            ("/api/users/{id}/alerts", "get"),
            ("/api/vscode/user/alerts", "get"),
        ] {
            let op = &doc["paths"][path][method];
            assert_eq!(op["tags"][0], "profile", "{method} {path}");
            assert!(op["responses"]["200"].is_object(), "{method} {path}");
        }
        let put = &doc["paths"]["/api/users/{id}/alerts"]["put"];
        assert_ne!(put["requestBody"], Value::Null);
    }
}
