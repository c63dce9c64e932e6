//! Read routes of the original backend's client (docs/compatibility.md), class `profile`:
//! `GET /api/vscode/user/balance`, `GET /api/vscode/user/subscription`,
//! `GET /api/auth/user-info`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::Result;
use super::guard::CurrentUser;
use super::{guarded, Class};
use crate::profile::split_name;
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let routes = Router::new()
        .route("/api/auth/user-info", get(user_info))
        .route("/api/vscode/user/balance", get(balance))
        .route("/api/vscode/user/subscription", get(subscription));
    guarded(state, Class::Profile, routes)
}

/// The caller's balance (original client)
///
/// `{balance, held, as_of, plan}`, the balance read as the credit routes read it.
#[utoipa::path(get, path = "/api/vscode/user/balance", tag = "profile",
    responses(
        (status = 200, description = "The balance", body = BalanceAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn balance(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<BalanceAnswer>> {
    let b = crate::credits::balance(&state.credits, &state.publisher, user.id()).await?;
    Ok(Json(BalanceAnswer {
        balance: b.balance,
        held: b.held,
        as_of: b
            .as_of
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        plan: user.record.plan.clone(),
    }))
}

/// The caller's plan and subscription (original client)
///
/// `{plan, status, subscription}`: the newest `subscriptions` row, or null
/// for users on a plan without one.
#[utoipa::path(get, path = "/api/vscode/user/subscription", tag = "profile",
    responses(
        (status = 200, description = "The plan and subscription", body = SubscriptionAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn subscription(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<SubscriptionAnswer>> {
    let row: Option<Value> = sqlx::query_scalar(
        "select jsonb_build_object('id', id::text, 'plan', plan, 'status', status, \
           'current_period_start', current_period_start, 'current_period_end', current_period_end, \
           'created_at', created_at) \
         from subscriptions where user_id = $1 order by created_at desc limit 1",
    )
    .bind(user.id())
    .fetch_optional(&state.pg)
    .await?;
    let subscription = row
        .map(serde_json::from_value::<CompatSubscription>)
        .transpose()
        .map_err(|e| crate::error::Error::Internal(e.into()))?;
    Ok(Json(SubscriptionAnswer {
        plan: user.record.plan.clone(),
        status: user.record.status.as_str().to_string(),
        subscription,
    }))
}

/// The caller's identity (original client)
///
/// `{"user_id", "email", "firstName", "lastName", "plan"}`. The token's
/// claims answer when they carry email and name; otherwise the stored
/// profile fills the gaps (this is not a hot route).
#[utoipa::path(get, path = "/api/auth/user-info", tag = "profile",
    responses(
        (status = 200, description = "The caller's identity", body = UserInfoAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn user_info(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<UserInfoAnswer>> {
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
    let (first_name, last_name) = split_name(name.as_deref());
    Ok(Json(UserInfoAnswer {
        user_id: user.id().to_string(),
        email,
        first_name,
        last_name,
        plan: user.record.plan.clone(),
    }))
}

// The answers live here, beside the one code that builds them (the domain's
// `crate::users` has no room left under the 800-line bound).

/// `GET /api/vscode/user/balance` (original client).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BalanceAnswer {
    /// Spendable credits (settled balance minus open holds).
    pub balance: i64,
    /// Credits reserved by open holds.
    pub held: i64,
    /// Time of the newest settled event behind the figure (milliseconds); null before any.
    #[schema(format = DateTime)]
    pub as_of: Option<String>,
    /// The caller's plan.
    pub plan: String,
}

/// `GET /api/vscode/user/subscription` (original client).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionAnswer {
    /// The caller's plan.
    pub plan: String,
    /// The caller's account status.
    pub status: String,
    /// The newest subscription row; null for users on a plan without one.
    pub subscription: Option<CompatSubscription>,
}

/// A `subscriptions` row as the original client reads it (times as Postgres's
/// JSON writes them).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompatSubscription {
    /// The subscription's id.
    pub id: String,
    /// Plan of the subscription.
    pub plan: String,
    /// Its status (e.g. `active`, `canceled`).
    pub status: String,
    /// Start of the current billing period; null when not known.
    #[schema(format = DateTime)]
    pub current_period_start: Option<String>,
    /// End of the current billing period; null when not known.
    #[schema(format = DateTime)]
    pub current_period_end: Option<String>,
    /// When the row was created.
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// `GET /api/auth/user-info` (original client): names split as it shows them.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserInfoAnswer {
    /// The caller's id.
    pub user_id: String,
    /// From the token, else as stored; null when neither has one.
    pub email: Option<String>,
    /// First word of the display name; null without a name.
    #[serde(rename = "firstName")]
    pub first_name: Option<String>,
    /// The rest of the display name; null when it is one word.
    #[serde(rename = "lastName")]
    pub last_name: Option<String>,
    /// The caller's plan.
    pub plan: String,
}

/// The operations of this module (docs/compatibility.md).
#[derive(utoipa::OpenApi)]
#[openapi(paths(balance, subscription, user_info))]
pub(crate) struct Doc;

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

    fn names(v: &Value) -> Vec<String> {
        let mut n: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        n.sort();
        n
    }

    #[test]
    fn the_doc_lists_the_original_clients_routes_with_tag_summary_and_answers() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        for (path, summary, answer, members) in [
            (
                "/api/vscode/user/balance",
                "The caller's balance (original client)",
                "BalanceAnswer",
                &["as_of", "balance", "held", "plan"][..],
            ),
            (
                "/api/vscode/user/subscription",
                "The caller's plan and subscription (original client)",
                "SubscriptionAnswer",
                &["plan", "status", "subscription"][..],
            ),
            (
                "/api/auth/user-info",
                "The caller's identity (original client)",
                "UserInfoAnswer",
                &["email", "firstName", "lastName", "plan", "user_id"][..],
            ),
        ] {
            let op = &doc["paths"][path]["get"];
            assert_eq!(op["tags"], serde_json::json!(["profile"]), "{path}");
            assert_eq!(op["summary"], summary, "{path}");
            assert!(op["responses"]["503"].is_object(), "{path}");
            let ok = &op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(ok, &format!("#/components/schemas/{answer}"), "{path}");
            assert_eq!(names(&schemas[answer]["properties"]), members, "{path}");
        }
        assert_eq!(
            names(&schemas["CompatSubscription"]["properties"]),
            [
                "created_at",
                "current_period_end",
                "current_period_start",
                "id",
                "plan",
                "status"
            ]
        );
    }

    #[test]
    fn the_answers_keep_the_original_clients_member_names() {
        let info = UserInfoAnswer {
            user_id: "u".into(),
            email: None,
            first_name: Some("Ada".into()),
            last_name: None,
            plan: "free".into(),
        };
        assert_eq!(
            serde_json::to_value(info).unwrap(),
            serde_json::json!({"user_id": "u", "email": null, "firstName": "Ada", "lastName": null, "plan": "free"})
        );
    }
}
