//! Read routes of the original backend's client (SPEC §5.10).

use axum::Router;

use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let _ = state;
    Router::new()
}
