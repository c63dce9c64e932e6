//! "May the caller act on user `:id`": the one answer for every
//! `/api/users/:id/...` and `/api/admin/users/:id/...` route
//! (docs/architecture.md, "The target user").
//!
//! Shape first, then ownership: an id that no user can have (not 1..=64 of
//! `[A-Za-z0-9_-]`, or a path that does not decode) is 404 `not_found`, before
//! the ownership check, so the answer says nothing about other accounts;
//! another user's id is 403 `forbidden`; an admin reaches any user.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

use super::error::ApiError;
use super::guard::CurrentUser;
use crate::state::AppState;

/// The user a route's `:id` names, once the caller may act on it. Take it
/// after [`super::admin::AdminUser`] on admin routes, so a non-admin is
/// refused before anything about the id is said.
#[derive(Debug, Clone)]
pub struct Target(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let caller = CurrentUser::from_request_parts(parts, state).await?;
        let id = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .ok()
            .and_then(|Path(mut params)| params.remove("id"));
        decide(caller.id(), caller.is_admin(), id.as_deref()).map(Target)
    }
}

/// The rule itself: shape, then ownership.
pub fn decide(caller: &str, is_admin: bool, id: Option<&str>) -> Result<String, ApiError> {
    let Some(id) = id.filter(|id| crate::auth::valid_user_id(id)) else {
        return Err(ApiError::not_found("no such user"));
    };
    if is_admin || id == caller {
        Ok(id.to_string())
    } else {
        Err(ApiError::forbidden("you may only access your own account"))
    }
}

/// An admin naming an id never seen provisions it first (docs/api.md "Conventions"), as the
/// caller's own id was provisioned by the guard.
pub async fn provision_other(
    state: &AppState,
    caller: &CurrentUser,
    id: &str,
) -> Result<(), ApiError> {
    if id != caller.id() {
        state.users.get_by_id(&state.user_store, id, None).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Result<String, ApiError>) -> u16 {
        r.map_or_else(|e| e.status().as_u16(), |_| 200)
    }

    #[test]
    fn a_malformed_id_is_404_for_everyone_before_ownership() {
        for bad in [
            None,
            Some(""),
            Some("a b"),
            Some("a:b"),
            Some(&*"u".repeat(65)),
        ] {
            assert_eq!(status(decide("user_1", false, bad)), 404, "{bad:?}");
            assert_eq!(status(decide("user_1", true, bad)), 404, "{bad:?}");
        }
    }

    #[test]
    fn a_user_reaches_only_their_own_id_and_an_admin_anyone() {
        assert_eq!(decide("user_1", false, Some("user_1")).unwrap(), "user_1");
        assert_eq!(status(decide("user_1", false, Some("user_2"))), 403);
        assert_eq!(decide("admin_1", true, Some("user_2")).unwrap(), "user_2");
    }
}
