//! Credits: consume, holds, admin grant (SPEC §5.5, §5.5b, §5.7).

use axum::Router;

use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    let _ = state;
    Router::new()
}
