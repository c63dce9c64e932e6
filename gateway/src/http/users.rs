//! Profiles, preferences and privacy (SPEC §5.4, §5.8).

use axum::Router;

use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let _ = state;
    Router::new()
}
