//! The HTTP face of errors, mapped once to `application/problem+json`
//! (docs/api.md). Domain errors ([`crate::error::Error`]) arrive whole
//! (`ApiError::Domain`), each case mapped once below; the cases only HTTP can meet (no token, bytes that are not
//! JSON, a body over the limit, a missed deadline) are made here. 5xx causes
//! are logged here, once; the client sees only what it may.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::Error;

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// An error as HTTP answers it: what the domain decided ([`Error`], each
/// case once), or one of the cases only the HTTP layer meets.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// What the domain decided; its cases are mapped below, once.
    #[error(transparent)]
    Domain(#[from] Error),
    /// 401: no usable credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 400: the body is not JSON at all.
    #[error("{0}")]
    MalformedJson(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the body must be application/json")]
    UnsupportedMediaType,
    /// 503: the request did not reach its commit point within
    /// `gateway.request_timeout_ms` (see `http::deadline`). docs/api.md has no
    /// 504 and no `timeout` code: a deadline passes because something behind
    /// the gateway is slow, which is what 503 `unavailable` says. Nothing of
    /// the request was written, so a retry is safe.
    #[error("the request did not complete within {after_ms} ms; nothing was changed")]
    DeadlineExceeded { after_ms: u64 },
}

impl ApiError {
    /// 422 naming `field` (a body member's path, a query parameter or a header).
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::validation(field, message).into()
    }

    pub fn unavailable(what: &'static str, cause: impl Into<anyhow::Error>) -> Self {
        Error::unavailable(what, cause).into()
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Error::NotFound(message.into()).into()
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Error::Forbidden(message.into()).into()
    }

    pub fn rate_limited(retry_after: u64) -> Self {
        Error::RateLimited { retry_after }.into()
    }

    /// The domain's case, when this is one.
    pub fn domain(&self) -> Option<&Error> {
        match self {
            Self::Domain(e) => Some(e),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        let e = match self {
            Self::Domain(e) => e,
            Self::Unauthorized(_) => return StatusCode::UNAUTHORIZED,
            Self::MalformedJson(_) => return StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge(_) => return StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => return StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::DeadlineExceeded { .. } => return StatusCode::SERVICE_UNAVAILABLE,
        };
        match e {
            Error::Forbidden(_) | Error::AccountSuspended | Error::AccountDeleted => {
                StatusCode::FORBIDDEN
            }
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
            Error::IdempotencyConflict(_) | Error::HoldExpired => StatusCode::CONFLICT,
            Error::UpgradeRequired { .. } => StatusCode::UPGRADE_REQUIRED,
            Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }

    /// The error code of docs/api.md this case answers with.
    pub fn kind(&self) -> Code {
        let e = match self {
            Self::Domain(e) => e,
            Self::Unauthorized(_) => return Code::Unauthorized,
            Self::MalformedJson(_) => return Code::ValidationFailed,
            Self::PayloadTooLarge(_) => return Code::PayloadTooLarge,
            Self::UnsupportedMediaType => return Code::UnsupportedMediaType,
            Self::DeadlineExceeded { .. } => return Code::Unavailable,
        };
        match e {
            Error::Forbidden(_) => Code::Forbidden,
            Error::AccountSuspended => Code::AccountSuspended,
            Error::AccountDeleted => Code::AccountDeleted,
            Error::NotFound(_) => Code::NotFound,
            Error::Validation { .. } => Code::ValidationFailed,
            Error::RateLimited { .. } => Code::RateLimited,
            Error::InsufficientCredits { .. } => Code::InsufficientCredits,
            Error::IdempotencyConflict(_) => Code::IdempotencyConflict,
            Error::HoldExpired => Code::HoldExpired,
            Error::UpgradeRequired { .. } => Code::UpgradeRequired,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }

    fn title(&self) -> &'static str {
        let e = match self {
            Self::Domain(e) => e,
            Self::Unauthorized(_) => return "Unauthorized",
            Self::MalformedJson(_) => return "Malformed JSON",
            Self::PayloadTooLarge(_) => return "Payload too large",
            Self::UnsupportedMediaType => return "Unsupported media type",
            Self::DeadlineExceeded { .. } => return "Service unavailable",
        };
        match e {
            Error::Forbidden(_) => "Forbidden",
            Error::AccountSuspended => "Account suspended",
            Error::AccountDeleted => "Account deleted",
            Error::NotFound(_) => "Not found",
            Error::Validation { .. } => "Validation failed",
            Error::RateLimited { .. } => "Too many requests",
            Error::InsufficientCredits { .. } => "Insufficient credits",
            Error::IdempotencyConflict(_) => "Idempotency conflict",
            Error::HoldExpired => "Hold expired",
            Error::UpgradeRequired { .. } => "Upgrade required",
            Error::Unavailable { .. } => "Service unavailable",
            Error::Internal(_) => "Internal server error",
        }
    }

    /// The problem document, with the original backend's `error`/`message` twins.
    pub fn problem(&self) -> Problem {
        let detail = self.to_string();
        let code = self.kind();
        let mut p = Problem {
            r#type: format!("https://errors.vsc-backend.dev/{}", code.as_str()),
            title: self.title(),
            status: self.status().as_u16(),
            detail: detail.clone(),
            code,
            error: self.title(),
            message: detail,
            balance: None,
            required: None,
            limit: None,
            field: None,
            min_extension_version: None,
        };
        match self.domain() {
            Some(Error::InsufficientCredits {
                balance,
                required,
                limit,
            }) => {
                p.balance = Some(*balance);
                p.required = Some(*required);
                p.limit = *limit;
            }
            Some(Error::Validation { field, .. }) => p.field = Some(field.clone()),
            Some(Error::UpgradeRequired { need, .. }) => {
                p.min_extension_version = Some(need.clone())
            }
            _ => {}
        }
        p
    }

    /// [`Self::problem`] as JSON.
    pub fn body(&self) -> Value {
        serde_json::to_value(self.problem()).unwrap_or_default()
    }
}

/// The error codes of docs/api.md: `code` of every problem document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    Unauthorized,
    Forbidden,
    AccountSuspended,
    AccountDeleted,
    NotFound,
    ValidationFailed,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    InsufficientCredits,
    IdempotencyConflict,
    HoldExpired,
    UpgradeRequired,
    Unavailable,
    Internal,
}

impl Code {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::AccountSuspended => "account_suspended",
            Self::AccountDeleted => "account_deleted",
            Self::NotFound => "not_found",
            Self::ValidationFailed => "validation_failed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited => "rate_limited",
            Self::InsufficientCredits => "insufficient_credits",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::HoldExpired => "hold_expired",
            Self::UpgradeRequired => "upgrade_required",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// The `application/problem+json` body of every error (RFC 9457), with the
/// original backend's `error` and `message` beside `title` and `detail`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `https://errors.vsc-backend.dev/<code>`.
    #[serde(rename = "type")]
    pub r#type: String,
    pub title: &'static str,
    /// The HTTP status, repeated.
    pub status: u16,
    /// What went wrong; a validation error starts with the field's path.
    pub detail: String,
    pub code: Code,
    /// The original backend's name for `title`.
    pub error: &'static str,
    /// The original backend's name for `detail`.
    pub message: String,
    /// 402: the balance now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<i64>,
    /// 402: the amount asked for (0 when not known yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required: Option<i64>,
    /// 402 of an organization member: what refused it, `pool` or `member_cap`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub limit: Option<&'static str>,
    /// 422: the path of the offending member (`events[3].model`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// 426: the lowest extension version accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_extension_version: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match self.domain() {
            Some(Error::Internal(cause)) => tracing::error!(error = ?cause, "internal error"),
            Some(Error::Unavailable { what, cause, .. }) => {
                tracing::warn!(dependency = what, error = ?cause, "dependency unavailable")
            }
            _ => {}
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            Self::Domain(
                Error::RateLimited { retry_after } | Error::Unavailable { retry_after, .. },
            ) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            Self::DeadlineExceeded { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(DEADLINE_RETRY_AFTER));
            }
            Self::Unauthorized(why) => {
                headers.insert(header::WWW_AUTHENTICATE, www_authenticate(why));
            }
            _ => {}
        }
        let bytes = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut resp = (status, headers, bytes).into_response();
        // Lets middleware (metrics, rate-limit headers) see what was decided.
        resp.extensions_mut().insert(ErrorCode(self.code()));
        resp
    }
}

/// The `WWW-Authenticate` challenge of a 401 (RFC 6750 §3): `error="invalid_token"`
/// when a token was sent and refused; the bare challenge when there was no
/// token, and for the legacy "Invalid session" (the token was fine). Every
/// refusal the authentication makes is a refused token except
/// [`crate::auth::AuthError::Missing`], so a new kind of refusal is one too.
pub fn www_authenticate(why: &str) -> HeaderValue {
    let no_token = why == crate::auth::AuthError::Missing.to_string()
        || why == MISSING_CREDENTIALS
        || why == INVALID_SESSION;
    HeaderValue::from_static(if no_token {
        r#"Bearer realm="vsc-backend""#
    } else {
        r#"Bearer realm="vsc-backend", error="invalid_token""#
    })
}

/// The 401s that are not a refused token: no user on the request, and the
/// legacy usage body's unknown session (see `http::usage`).
const MISSING_CREDENTIALS: &str = "missing credentials";
const INVALID_SESSION: &str = "Invalid session";

/// `Retry-After` of a request cut at its deadline: as for a dependency outage.
const DEADLINE_RETRY_AFTER: u64 = 5;

/// Marker left on error responses for middleware.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Error::Internal(e).into()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Error::from(e).into()
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        Error::from(e).into()
    }
}

impl From<crate::redis_link::LinkError> for ApiError {
    fn from(e: crate::redis_link::LinkError) -> Self {
        Error::from(e).into()
    }
}

impl From<deadpool_redis::PoolError> for ApiError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        Error::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_has_the_spec_members_and_the_original_twins() {
        let e = ApiError::from(Error::InsufficientCredits {
            balance: 3,
            required: 5,
            limit: None,
        });
        let b = e.body();
        for k in [
            "type", "title", "status", "detail", "code", "error", "message",
        ] {
            assert!(b.get(k).is_some(), "{k}");
        }
        assert_eq!(b["status"], 402);
        assert_eq!(b["balance"], 3);
        assert_eq!(b["required"], 5);
        assert_eq!(b["error"], b["title"]);
        assert_eq!(b["message"], b["detail"]);
    }

    #[test]
    fn internal_errors_never_show_their_cause() {
        let e = ApiError::from(anyhow::anyhow!("syntax error at or near SELECT"));
        assert_eq!(e.body()["detail"], "internal error");
        let u = ApiError::unavailable("postgres", anyhow::anyhow!("connection refused 10.0.0.1"));
        assert_eq!(u.body()["detail"], "postgres is unavailable");
        assert_eq!(u.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_missed_deadline_is_a_503_unavailable_that_says_nothing_changed() {
        let e = ApiError::DeadlineExceeded { after_ms: 250 };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code(), "unavailable");
        let detail = e.body()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains("250 ms") && detail.contains("nothing was changed"));
        let resp = e.into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }

    #[test]
    fn validation_detail_names_the_field() {
        let e = ApiError::validation("events[2].model", "must be at most 128 characters");
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.body()["detail"]
            .as_str()
            .unwrap()
            .starts_with("events[2].model"));
    }

    #[test]
    fn a_401_challenges_for_a_bearer_token_and_says_when_the_sent_one_was_refused() {
        let challenge = |why: &str| {
            let resp = ApiError::Unauthorized(why.into()).into_response();
            resp.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .to_string()
        };
        let bare = r#"Bearer realm="vsc-backend""#;
        assert_eq!(
            challenge(&crate::auth::AuthError::Missing.to_string()),
            bare
        );
        assert_eq!(challenge("missing credentials"), bare);
        assert_eq!(challenge("Invalid session"), bare);
        for refused in [
            crate::auth::AuthError::Invalid("expired".into()).to_string(),
            crate::auth::AuthError::KeysUnavailable.to_string(),
        ] {
            assert_eq!(
                challenge(&refused),
                r#"Bearer realm="vsc-backend", error="invalid_token""#
            );
        }
        let other = ApiError::forbidden("no").into_response();
        assert!(other.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
