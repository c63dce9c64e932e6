//! Read routes of the original backend's client (docs/compatibility.md), class `profile`:
//! `GET /api/vscode/user/balance`, `GET /api/vscode/user/subscription`,
//! `GET /api/auth/user-info`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::Result;
use super::guard::CurrentUser;
use super::{guarded, Class};
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let routes = Router::new()
        .route("/api/auth/user-info", get(user_info))
        .route("/api/vscode/user/balance", get(balance))
        .route("/api/vscode/user/subscription", get(subscription));
    guarded(state, Class::Profile, routes)
}

/// `GET /api/vscode/user/balance` → `{balance, held, as_of, plan}`.
async fn balance(State(state): State<AppState>, user: CurrentUser) -> Result<Json<Value>> {
    let b = crate::credits::balance(&state.credits, &state.publisher, user.id()).await?;
    Ok(Json(json!({
        "balance": b.balance,
        "held": b.held,
        "as_of": b.as_of.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        "plan": user.record.plan,
    })))
}

/// `GET /api/vscode/user/subscription` → `{plan, status, subscription}`: the
/// newest `subscriptions` row, or null for users on a plan without one.
async fn subscription(State(state): State<AppState>, user: CurrentUser) -> Result<Json<Value>> {
    let row: Option<Value> = sqlx::query_scalar(
        "select jsonb_build_object('id', id::text, 'plan', plan, 'status', status, \
           'current_period_start', current_period_start, 'current_period_end', current_period_end, \
           'created_at', created_at) \
         from subscriptions where user_id = $1 order by created_at desc limit 1",
    )
    .bind(user.id())
    .fetch_optional(&state.pg)
    .await?;
    Ok(Json(json!({
        "plan": user.record.plan,
        "status": user.record.status.as_str(),
        "subscription": row,
    })))
}

/// Splits a display name the way the original client shows it: the first
/// word is the first name, the rest (if any) the last name.
pub fn split_name(name: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else {
        return (None, None);
    };
    match name.split_once(char::is_whitespace) {
        Some((first, rest)) => {
            let rest = rest.trim();
            (
                Some(first.to_string()),
                (!rest.is_empty()).then(|| rest.to_string()),
            )
        }
        None => (Some(name.to_string()), None),
    }
}

/// `GET /api/auth/user-info`: `{"user_id", "email", "firstName", "lastName", "plan"}`.
/// The token's claims answer when they carry email and name; otherwise the
/// stored profile fills the gaps (this is not a hot route).
async fn user_info(State(state): State<AppState>, user: CurrentUser) -> Result<Json<Value>> {
    let (mut email, mut name) = (user.claims.email.clone(), user.claims.name.clone());
    if email.is_none() || name.is_none() {
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("select email, name from users where id = $1")
                .bind(user.id())
                .fetch_optional(&state.pg)
                .await?;
        if let Some((e, n)) = row {
            email = email.or(e);
            name = name.or(n);
        }
    }
    let (first, last) = split_name(name.as_deref());
    Ok(Json(json!({
        "user_id": user.id(),
        "email": email,
        "firstName": first,
        "lastName": last,
        "plan": user.record.plan,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_first_word_and_the_rest() {
        let s = |n: &str| split_name(Some(n));
        assert_eq!(
            s("Ada Lovelace"),
            (Some("Ada".into()), Some("Lovelace".into()))
        );
        assert_eq!(
            s("  Jean  Claude Van Damme "),
            (Some("Jean".into()), Some("Claude Van Damme".into()))
        );
        assert_eq!(s("Plato"), (Some("Plato".into()), None));
        assert_eq!(s("   "), (None, None));
        assert_eq!(split_name(None), (None, None));
    }
}
