//! Admin routes: plan, rate-limit overrides, status, audit (SPEC §5.7).

use axum::Router;

use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let _ = state;
    Router::new()
}
