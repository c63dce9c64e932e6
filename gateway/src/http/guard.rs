//! The guard in front of every `/api/` route: authenticate the token, load (or
//! provision) the user, refuse suspended/deleted accounts, apply the class's
//! rate limit, and put `RateLimit-*` headers on whatever is answered.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use common::settings::ClassLimit;

use super::error::ApiError;
use super::Class;
use crate::auth::{AuthError, Claims};
use crate::rate_limit::{self, Decision};
use crate::state::AppState;
use crate::users::{Status, UserRecord};

/// The authenticated caller, put on the request by the guard.
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub claims: Claims,
    pub record: Arc<UserRecord>,
}

impl CurrentUser {
    pub fn id(&self) -> &str {
        &self.claims.sub
    }

    pub fn is_admin(&self) -> bool {
        self.claims.admin
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("admin role required"))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<CurrentUser>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("missing credentials".into()))
    }
}

/// The effective limit: the per-user override, else class × plan multiplier.
pub fn effective_limit(state: &AppState, rec: &UserRecord, class: Class) -> ClassLimit {
    rec.overrides
        .get(&class)
        .copied()
        .or_else(|| state.settings.class_limit(class.as_str(), &rec.plan))
        .unwrap_or(ClassLimit {
            limit: 60,
            window_secs: 60,
        })
}

/// Routes a suspended user may still use: settling and releasing holds.
fn allowed_while_suspended(method: &Method, path: &str) -> bool {
    path.contains("/credits/holds/")
        && ((method == Method::POST && path.ends_with("/settle")) || method == Method::DELETE)
}

/// Whether the class's limit is left to the credit script: the `credits`
/// class on the caller's own `/api/users/ID/credits/...` (an admin acting on
/// another user's balance runs on that user's slot, not the caller's).
fn defers(class: Class, path: &str, caller: &str) -> bool {
    // usage/track decides its class limit with its events budget, in one
    // round trip once the body is parsed (`rate_limit::check_pair`).
    if class == Class::Usage {
        return path == "/api/vscode/usage/track";
    }
    class == Class::Credits
        && path
            .strip_prefix("/api/users/")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(id, rest)| id == caller && rest.starts_with("credits/"))
}

/// The one route a deleted account may still use: `DELETE /api/users/:id` of
/// itself, so an erasure answered 503 half-way can be retried to the end.
fn erasing_again(method: &Method, path: &str, user_id: &str) -> bool {
    method == Method::DELETE
        && path
            .strip_prefix("/api/users/")
            .is_some_and(|rest| rest == user_id)
}

pub async fn guard(
    State(state): State<AppState>,
    class: Class,
    mut req: Request,
    next: Next,
) -> Response {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let (claims, api_key) = match authenticate(&state, header).await {
        Ok(c) => c,
        Err(Refusal::Auth(AuthError::KeysUnavailable)) => {
            return ApiError::from(crate::error::Error::Unavailable {
                what: "jwks",
                retry_after: 5,
                cause: None,
            })
            .into_response()
        }
        Err(Refusal::Down(e)) => return ApiError::from(e).into_response(),
        Err(Refusal::Auth(e)) => {
            let addr = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_else(|| "unknown".into());
            return auth_failure(&state, &addr, e).await;
        }
    };
    let record = match state.users.get(&state.user_store, &claims).await {
        Ok(r) => r,
        Err(e) => return ApiError::from(e).into_response(),
    };
    // The limit is decided before the status so that a 403 carries the
    // RateLimit-* headers too (docs/rate-limits.md: every /api/ answer).
    let limit = effective_limit(&state, &record, class);
    let key = state.keys.rate_limit(&claims.sub, class.as_str());
    let status_refused = match record.status {
        Status::Active => None,
        Status::Suspended if allowed_while_suspended(req.method(), req.uri().path()) => None,
        Status::Suspended => Some(crate::error::Error::AccountSuspended.into()),
        // A retried erasure completes (see `privacy::erase`).
        Status::Deleted if erasing_again(req.method(), req.uri().path(), &claims.sub) => None,
        Status::Deleted => Some(crate::error::Error::AccountDeleted.into()),
    };
    // A key's scopes decide what it may reach (docs/api.md "API keys").
    let status_refused = status_refused.or_else(|| {
        let grant = api_key.as_ref()?;
        let why = crate::api_keys::refusal(&grant.scopes, class, req.method(), req.uri().path())?;
        Some(ApiError::forbidden(why))
    });
    if let Some(grant) = api_key {
        req.extensions_mut().insert(KeyCaller(grant.key_id));
    }
    // The caller's own credit writes leave the limit to the credit script
    // (same slot, one round trip), usage/track to its events budget's check;
    // the guard decides it afterwards only when
    // the request ended before any script ran (a 422, a 404 hold, ...), and
    // such a request wrote nothing, so a refusal then answers as it would
    // have first.
    if status_refused.is_none() && defers(class, req.uri().path(), &claims.sub) {
        let deferred = rate_limit::Deferred::new(class.as_str(), key.clone(), limit);
        req.extensions_mut().insert(deferred.clone());
        req.extensions_mut().insert(CurrentUser {
            claims: claims.clone(),
            record,
        });
        let resp = next.run(req).await;
        let (decision, resp) = match deferred.decision() {
            Some(d) => (d, resp),
            None => {
                let d = rate_limit::check(&state.limiter, &key, &claims.sub, class.as_str(), limit)
                    .await;
                let resp = if d.allowed {
                    resp
                } else {
                    ApiError::rate_limited(d.retry_after_secs.max(1)).into_response()
                };
                (d, resp)
            }
        };
        let mut resp = resp;
        let shown = match resp.extensions_mut().remove::<Decision>() {
            Some(inner) => rate_limit::tighter(decision, inner),
            None => decision,
        };
        put_headers(resp.headers_mut(), &shown);
        return resp;
    }
    let decision =
        rate_limit::check(&state.limiter, &key, &claims.sub, class.as_str(), limit).await;
    let refused = status_refused.or_else(|| {
        (!decision.allowed).then(|| ApiError::rate_limited(decision.retry_after_secs.max(1)))
    });
    if let Some(e) = refused {
        let mut resp = e.into_response();
        put_headers(resp.headers_mut(), &decision);
        return resp;
    }
    req.extensions_mut().insert(CurrentUser { claims, record });
    let mut resp = next.run(req).await;
    // A handler that decided a second limit of its own (usage/track's events
    // budget) leaves that decision on the response; the headers show the
    // tighter of the two (docs/rate-limits.md).
    let shown = match resp.extensions_mut().remove::<Decision>() {
        Some(inner) => rate_limit::tighter(decision, inner),
        None => decision,
    };
    put_headers(resp.headers_mut(), &shown);
    resp
}

/// The request came with an API key (this one), not a login: key management
/// refuses it whatever the guard decided.
#[derive(Debug, Clone, Copy)]
pub struct KeyCaller(pub uuid::Uuid);

/// Why a request was not authenticated.
enum Refusal {
    Auth(AuthError),
    /// The key store could not answer (503).
    Down(crate::error::Error),
}

/// The caller of an `Authorization` header: an API key's user (never an
/// admin) with the key's grant, or a token's claims.
async fn authenticate(
    state: &AppState,
    header: Option<&str>,
) -> Result<(Claims, Option<crate::api_keys::Grant>), Refusal> {
    let token = crate::auth::bearer_token(header).ok();
    let Some(key) = token.filter(|t| crate::api_keys::is_api_key(t)) else {
        let claims = state
            .auth
            .verify_header(header)
            .await
            .map_err(Refusal::Auth)?;
        return Ok((claims, None));
    };
    match state.api_keys.verify(key).await {
        Ok(grant) => {
            let claims = Claims {
                sub: grant.user_id.clone(),
                email: None,
                name: None,
                admin: false,
            };
            Ok((claims, Some(grant)))
        }
        Err(crate::api_keys::Refused::Unavailable(e)) => Err(Refusal::Down(e)),
        Err(e) => Err(Refusal::Auth(AuthError::Invalid(e.to_string()))),
    }
}

/// Failed authentication is limited per client address; over the limit the
/// failure is a 429 instead of a 401. Valid tokens never reach this. When
/// Redis is down, a Postgres decision counts; `allow` and `deny` leave the
/// answer a 401 (a failing token is refused either way, and a client that
/// sees 401 re-authenticates instead of retrying).
async fn auth_failure(state: &AppState, addr: &str, e: AuthError) -> Response {
    let limit = state.settings.rate_limit.auth_failures;
    let key = state.keys.auth_failures(addr);
    let d = rate_limit::check(&state.limiter, &key, addr, "auth_failures", limit).await;
    let counts = matches!(d.degraded, None | Some("postgres"));
    let mut resp = if !d.allowed && counts {
        ApiError::rate_limited(d.retry_after_secs.max(1)).into_response()
    } else {
        ApiError::Unauthorized(e.to_string()).into_response()
    };
    put_headers(resp.headers_mut(), &d);
    resp
}

/// The `RateLimit-*` headers of a decision (and `RateLimit-Degraded` when a
/// fallback policy made it), with the original backend's `X-RateLimit-*` beside them
/// (docs/compatibility.md). `Retry-After` comes with the 429 itself.
pub fn put_headers(h: &mut HeaderMap, d: &Decision) {
    h.insert("ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
    h.insert("ratelimit-reset", HeaderValue::from(d.reset_secs));
    h.insert("x-ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(d.remaining));
    if let Ok(v) = HeaderValue::from_str(&reset_at(chrono::Utc::now(), d.reset_secs)) {
        h.insert("x-ratelimit-reset", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{};w={}", d.limit, d.window_secs)) {
        h.insert("ratelimit-policy", v);
    }
    if let Some(policy) = d.degraded {
        h.insert("ratelimit-degraded", HeaderValue::from_static(policy));
    }
}

/// `X-RateLimit-Reset`: when the bucket is full again, as an RFC 3339 time (milliseconds,
/// UTC), as the original backend sent it (docs/compatibility.md).
fn reset_at(now: chrono::DateTime<chrono::Utc>, reset_secs: u64) -> String {
    // At most ~136 years ahead, so the year keeps the four digits RFC 3339 has.
    let secs = reset_secs.min(u64::from(u32::MAX)) as i64;
    (now + chrono::Duration::seconds(secs)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_reset_is_an_rfc3339_time_that_far_ahead() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-02T05:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(reset_at(now, 0), "2026-12-02T05:00:00.000Z");
        assert_eq!(reset_at(now, 61), "2026-12-02T05:01:01.000Z");
        assert!(chrono::DateTime::parse_from_rfc3339(&reset_at(now, u64::MAX)).is_ok());
    }

    #[test]
    fn every_decision_carries_both_sets_of_headers() {
        let d = Decision {
            allowed: false,
            limit: 10,
            window_secs: 60,
            remaining: 0,
            reset_secs: 6,
            retry_after_secs: 6,
            degraded: None,
        };
        let mut h = HeaderMap::new();
        put_headers(&mut h, &d);
        assert_eq!(h["x-ratelimit-limit"], "10");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["ratelimit-reset"], "6");
        let at = h["x-ratelimit-reset"].to_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(at).unwrap() > chrono::Utc::now());
    }

    #[test]
    fn only_settle_and_release_pass_while_suspended() {
        let p = "/api/users/u/credits/holds/h/settle";
        assert!(allowed_while_suspended(&Method::POST, p));
        assert!(allowed_while_suspended(
            &Method::DELETE,
            "/api/users/u/credits/holds/h"
        ));
        assert!(!allowed_while_suspended(
            &Method::POST,
            "/api/users/u/credits/holds"
        ));
        assert!(!allowed_while_suspended(
            &Method::POST,
            "/api/users/u/credits/consume"
        ));
    }

    #[test]
    fn only_the_callers_own_credit_routes_leave_the_limit_to_the_script() {
        let own = "/api/users/u_1/credits/consume";
        assert!(defers(Class::Credits, own, "u_1"));
        assert!(defers(
            Class::Credits,
            "/api/users/u_1/credits/holds/h/settle",
            "u_1"
        ));
        assert!(!defers(Class::Credits, own, "u_2"));
        assert!(!defers(Class::Usage, own, "u_1"));
        assert!(defers(Class::Usage, "/api/vscode/usage/track", "u_1"));
        assert!(!defers(Class::Usage, "/api/usage/track", "u_1"));
        assert!(!defers(Class::Credits, "/api/users/u_1/usage/track", "u_1"));
        assert!(!defers(
            Class::Credits,
            "/api/admin/users/u_1/credits/grant",
            "u_1"
        ));
    }

    #[test]
    fn a_deleted_account_may_only_delete_itself_again() {
        assert!(erasing_again(&Method::DELETE, "/api/users/u_1", "u_1"));
        assert!(!erasing_again(&Method::DELETE, "/api/users/u_2", "u_1"));
        assert!(!erasing_again(&Method::GET, "/api/users/u_1", "u_1"));
        assert!(!erasing_again(
            &Method::DELETE,
            "/api/users/u_1/credits/holds/h",
            "u_1"
        ));
    }
}
