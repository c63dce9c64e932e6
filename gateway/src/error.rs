//! The domain's one error type: what went wrong, in the domain's words.
//!
//! Nothing here knows HTTP. `http::error::ApiError` maps each case to its
//! status, code and problem document once (`impl From<Error> for ApiError`);
//! the operator commands map it to exit codes (`operator::exit_code`). The
//! cases a request can meet before the domain sees it (a missing token, bytes
//! that are not JSON, a body over the limit, a missed deadline) belong to the
//! HTTP layer and live only in `ApiError`.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value of the wrong shape or range. `field` is the path of the
    /// offending member (`events[3].model`), a query parameter or a header.
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this (another user's data, a non-admin).
    #[error("{0}")]
    Forbidden(String),
    #[error("this account is suspended")]
    AccountSuspended,
    #[error("this account has been deleted")]
    AccountDeleted,
    /// The balance cannot cover `required` (0 when the figure is not known yet).
    #[error("the balance cannot cover this amount")]
    InsufficientCredits { balance: i64, required: i64 },
    /// An idempotency key reused with another body, or still running.
    #[error("{0}")]
    IdempotencyConflict(String),
    #[error("this hold has expired or was released")]
    HoldExpired,
    /// The client is older than the minimum it must run.
    #[error("extension version {have} is below the minimum {need}")]
    UpgradeRequired { have: String, need: String },
    /// A dependency is down; retrying after `retry_after` seconds may work.
    #[error("{what} is unavailable")]
    Unavailable {
        what: &'static str,
        retry_after: u64,
        #[source]
        cause: Option<anyhow::Error>,
    },
    #[error("rate limit exceeded; retry after {retry_after} s")]
    RateLimited { retry_after: u64 },
    /// A bug. Never expected; its cause is logged, never shown.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A dependency outage with its cause (for the log) and the usual 5 s retry.
    pub fn unavailable(what: &'static str, cause: impl Into<anyhow::Error>) -> Self {
        Self::Unavailable {
            what,
            retry_after: 5,
            cause: Some(cause.into()),
        }
    }
}

/// A Postgres error is an outage when the connection or the server is at
/// fault (class 08 connection exception, class 57 operator intervention, a
/// pool timeout); anything else is a bug.
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::unavailable("postgres", e)
            }
            sqlx::Error::Database(ref db)
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57")) =>
            {
                Self::unavailable("postgres", e)
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Self::unavailable("redis", e)
    }
}

impl From<crate::redis_link::LinkError> for Error {
    fn from(e: crate::redis_link::LinkError) -> Self {
        Self::unavailable("redis", e)
    }
}

impl From<deadpool_redis::PoolError> for Error {
    fn from(e: deadpool_redis::PoolError) -> Self {
        Self::unavailable("redis", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_postgres_connection_is_an_outage_and_a_bad_query_a_bug() {
        assert!(matches!(
            Error::from(sqlx::Error::PoolTimedOut),
            Error::Unavailable {
                what: "postgres",
                ..
            }
        ));
        assert!(matches!(
            Error::from(sqlx::Error::RowNotFound),
            Error::Internal(_)
        ));
    }

    #[test]
    fn validation_names_the_field() {
        let e = Error::validation("events[2].model", "must be at most 128 characters");
        assert!(e.to_string().starts_with("events[2].model"));
    }
}
