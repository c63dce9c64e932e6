//! Placeholder for SPEC §5.11 (pricing): routes registered in `http::router` and the OpenAPI list.

use axum::Router;

use crate::state::AppState;

pub fn router(_state: &AppState) -> Router<AppState> {
    Router::new()
}

#[derive(utoipa::OpenApi)]
#[openapi()]
pub(crate) struct Doc;
