//! Session validation (SPEC §5.1).

use axum::Router;

use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let _ = state;
    Router::new()
}
