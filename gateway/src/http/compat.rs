//! Read routes of the original backend's client (SPEC §5.10).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::Result;
use super::guard::CurrentUser;
use super::{guarded, Class};
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let routes = Router::new().route("/api/vscode/user/balance", get(balance));
    guarded(state, Class::Profile, routes)
}

/// `GET /api/vscode/user/balance` → `{balance, held, as_of, plan}`.
async fn balance(State(state): State<AppState>, user: CurrentUser) -> Result<Json<Value>> {
    let b = crate::credits::balance(&state, user.id()).await?;
    Ok(Json(json!({
        "balance": b.balance,
        "held": b.held,
        "as_of": b.as_of.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        "plan": user.record.plan,
    })))
}
