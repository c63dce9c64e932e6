//! The price book (SPEC §5.11, docs/credits.md "Price book"): `GET /api/pricing` for any
//! signed-in user (class `profile`), `PUT /api/admin/pricing` for admins (class `admin`,
//! audited). Thin: the book, its cache and the arithmetic are in `crate::credits::pricing`.

use axum::extract::State;
use axum::routing::{get, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::admin::AdminUser;
use super::deadline::Deadline;
use super::error::Result;
use super::extract::ApiJson;
use super::guard::CurrentUser;
use super::{guarded, Class};
use crate::audit::RequestId;
use crate::credits::pricing::{PriceBody, PriceEntry};
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let read = Router::new().route("/api/pricing", get(list_pricing));
    let admin = Router::new().route("/api/admin/pricing", put(set_pricing));
    Router::new()
        .merge(guarded(state, Class::Profile, read))
        .merge(guarded(state, Class::Admin, admin))
}

/// `GET /api/pricing`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PriceBookAnswer {
    /// Every entry, by provider then model (`*`: the provider's default).
    pub entries: Vec<PriceEntry>,
    /// When this gateway loaded the book it answers from (RFC 3339 UTC).
    pub as_of: Option<DateTime<Utc>>,
}

/// The price book
#[utoipa::path(get, path = "/api/pricing", tag = "profile",
    responses(
        (status = 200, description = "The book this gateway prices by", body = PriceBookAnswer),
        (status = 503, description = "The book was never loaded (Postgres unavailable)"),
    ))]
pub(crate) async fn list_pricing(
    State(state): State<AppState>,
    _user: CurrentUser,
) -> Result<Json<PriceBookAnswer>> {
    if state.pricing.book().is_none() {
        // Not loaded yet (a gateway that started while Postgres was down).
        state.pricing.reload().await?;
    }
    let entries = state
        .pricing
        .book()
        .map(|b| b.entries())
        .unwrap_or_default();
    Ok(Json(PriceBookAnswer {
        entries,
        as_of: state.pricing.loaded_at(),
    }))
}

/// Set one price (admin)
///
/// Applies at once on this gateway and within `pricing.refresh_ms` on every other.
#[utoipa::path(put, path = "/api/admin/pricing", tag = "admin",
    request_body = PriceBody,
    responses(
        (status = 200, description = "The entry as stored", body = PriceEntry),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn set_pricing(
    State(state): State<AppState>,
    AdminUser(caller): AdminUser,
    RequestId(rid): RequestId,
    deadline: Deadline,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<PriceEntry>> {
    let body = crate::decode::parse_body::<PriceBody>(body)?;
    deadline.commit()?;
    let entry = crate::admin::set_price(&state.pg, caller.id(), &rid, body).await?;
    if let Err(e) = state.pricing.reload().await {
        // Committed: the refresh task picks it up on its next round.
        tracing::warn!(error = %e, "price book not reloaded after a change");
    }
    Ok(Json(entry))
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(list_pricing, set_pricing))]
pub(crate) struct Doc;
