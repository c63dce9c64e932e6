//! The HTTP face of errors, mapped once to `application/problem+json`
//! (docs/api.md). Domain errors ([`crate::error::Error`]) arrive through
//! `From<Error>`; the cases only HTTP can meet (no token, bytes that are not
//! JSON, a body over the limit, a missed deadline) are made here. 5xx causes
//! are logged here, once; the client sees only what it may.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::error::Error;

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("this account is suspended")]
    AccountSuspended,
    #[error("this account has been deleted")]
    AccountDeleted,
    #[error("{0}")]
    NotFound(String),
    /// 400: the body is not JSON at all.
    #[error("{0}")]
    MalformedJson(String),
    /// 422: JSON of the wrong shape or values, or a bad query parameter.
    /// `field` is the path of the offending member (`events[3].model`).
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the body must be application/json")]
    UnsupportedMediaType,
    #[error("rate limit exceeded; retry after {retry_after} s")]
    RateLimited { retry_after: u64 },
    #[error("the balance cannot cover this amount")]
    InsufficientCredits { balance: i64, required: i64 },
    #[error("{0}")]
    IdempotencyConflict(String),
    #[error("this hold has expired or was released")]
    HoldExpired,
    #[error("extension version {have} is below the minimum {need}")]
    UpgradeRequired { have: String, need: String },
    /// 503: a dependency is down; the client should retry later.
    #[error("{what} is unavailable")]
    Unavailable {
        what: &'static str,
        retry_after: u64,
        #[source]
        cause: Option<anyhow::Error>,
    },
    /// 503: the request did not reach its commit point within
    /// `gateway.request_timeout_ms` (see `http::deadline`). docs/api.md has no
    /// 504 and no `timeout` code: a deadline passes because something behind
    /// the gateway is slow, which is what 503 `unavailable` says. Nothing of
    /// the request was written, so a retry is safe.
    #[error("the request did not complete within {after_ms} ms; nothing was changed")]
    DeadlineExceeded { after_ms: u64 },
    /// 500: a bug. Never expected.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn unavailable(what: &'static str, cause: impl Into<anyhow::Error>) -> Self {
        Self::Unavailable {
            what,
            retry_after: 5,
            cause: Some(cause.into()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::AccountSuspended | Self::AccountDeleted => {
                StatusCode::FORBIDDEN
            }
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
            Self::IdempotencyConflict(_) | Self::HoldExpired => StatusCode::CONFLICT,
            Self::UpgradeRequired { .. } => StatusCode::UPGRADE_REQUIRED,
            Self::Unavailable { .. } | Self::DeadlineExceeded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::AccountSuspended => "account_suspended",
            Self::AccountDeleted => "account_deleted",
            Self::NotFound(_) => "not_found",
            Self::MalformedJson(_) | Self::Validation { .. } => "validation_failed",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited { .. } => "rate_limited",
            Self::InsufficientCredits { .. } => "insufficient_credits",
            Self::IdempotencyConflict(_) => "idempotency_conflict",
            Self::HoldExpired => "hold_expired",
            Self::UpgradeRequired { .. } => "upgrade_required",
            Self::Unavailable { .. } | Self::DeadlineExceeded { .. } => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "Unauthorized",
            Self::Forbidden(_) => "Forbidden",
            Self::AccountSuspended => "Account suspended",
            Self::AccountDeleted => "Account deleted",
            Self::NotFound(_) => "Not found",
            Self::MalformedJson(_) => "Malformed JSON",
            Self::Validation { .. } => "Validation failed",
            Self::PayloadTooLarge(_) => "Payload too large",
            Self::UnsupportedMediaType => "Unsupported media type",
            Self::RateLimited { .. } => "Too many requests",
            Self::InsufficientCredits { .. } => "Insufficient credits",
            Self::IdempotencyConflict(_) => "Idempotency conflict",
            Self::HoldExpired => "Hold expired",
            Self::UpgradeRequired { .. } => "Upgrade required",
            Self::Unavailable { .. } | Self::DeadlineExceeded { .. } => "Service unavailable",
            Self::Internal(_) => "Internal server error",
        }
    }

    /// The problem document, with the original backend's `error`/`message` twins.
    pub fn body(&self) -> Value {
        let detail = self.to_string();
        let mut body = Map::new();
        body.insert(
            "type".into(),
            json!(format!("https://errors.vsc-backend.dev/{}", self.code())),
        );
        body.insert("title".into(), json!(self.title()));
        body.insert("status".into(), json!(self.status().as_u16()));
        body.insert("detail".into(), json!(detail));
        body.insert("code".into(), json!(self.code()));
        body.insert("error".into(), json!(self.title()));
        body.insert("message".into(), json!(detail));
        match self {
            Self::InsufficientCredits { balance, required } => {
                body.insert("balance".into(), json!(balance));
                body.insert("required".into(), json!(required));
            }
            Self::Validation { field, .. } => {
                body.insert("field".into(), json!(field));
            }
            Self::UpgradeRequired { need, .. } => {
                body.insert("min_extension_version".into(), json!(need));
            }
            _ => {}
        }
        Value::Object(body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Internal(cause) => tracing::error!(error = ?cause, "internal error"),
            Self::Unavailable { what, cause, .. } => {
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
            Self::RateLimited { retry_after } | Self::Unavailable { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            Self::DeadlineExceeded { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(DEADLINE_RETRY_AFTER));
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

/// `Retry-After` of a request cut at its deadline: as for a dependency outage.
const DEADLINE_RETRY_AFTER: u64 = 5;

/// Marker left on error responses for middleware.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// The one place a domain error gets its HTTP face: each case keeps its
/// message and maps to the `ApiError` case of the same name.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Validation { field, message } => Self::Validation { field, message },
            Error::NotFound(m) => Self::NotFound(m),
            Error::Forbidden(m) => Self::Forbidden(m),
            Error::AccountSuspended => Self::AccountSuspended,
            Error::AccountDeleted => Self::AccountDeleted,
            Error::InsufficientCredits { balance, required } => {
                Self::InsufficientCredits { balance, required }
            }
            Error::IdempotencyConflict(m) => Self::IdempotencyConflict(m),
            Error::HoldExpired => Self::HoldExpired,
            Error::UpgradeRequired { have, need } => Self::UpgradeRequired { have, need },
            Error::Unavailable {
                what,
                retry_after,
                cause,
            } => Self::Unavailable {
                what,
                retry_after,
                cause,
            },
            Error::RateLimited { retry_after } => Self::RateLimited { retry_after },
            Error::Internal(cause) => Self::Internal(cause),
        }
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
        let e = ApiError::InsufficientCredits {
            balance: 3,
            required: 5,
        };
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
        let e = ApiError::Internal(anyhow::anyhow!("syntax error at or near SELECT"));
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
}
