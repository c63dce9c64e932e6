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
    /// For an organization member, `limit` names what refused it: `pool` or
    /// `member_cap` (SPEC 5.11); `balance` is then what the member may spend.
    #[error("the balance cannot cover this amount")]
    InsufficientCredits {
        balance: i64,
        required: i64,
        limit: Option<&'static str>,
    },
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

/// A Postgres error is an outage when `common::db::is_transient` says so
/// (the one rule, which the worker retries by): the connection or the pool,
/// SQLSTATE classes 08, 53 and 57, a serialization failure or a deadlock.
/// Anything else is a bug.
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if common::db::is_transient(&e) {
            Self::unavailable("postgres", e)
        } else {
            Self::Internal(e.into())
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

    /// A database error with only a SQLSTATE, as Postgres would send it.
    #[derive(Debug)]
    struct Code(&'static str);

    impl std::fmt::Display for Code {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "sqlstate {}", self.0)
        }
    }

    impl std::error::Error for Code {}

    impl sqlx::error::DatabaseError for Code {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(std::borrow::Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn a_deadlock_a_serialization_failure_or_too_many_connections_is_an_outage_as_the_worker_says()
    {
        for code in ["40P01", "40001", "53300", "57P01", "08006"] {
            let e = Error::from(sqlx::Error::Database(Box::new(Code(code))));
            assert!(
                matches!(
                    e,
                    Error::Unavailable {
                        what: "postgres",
                        retry_after: 5,
                        ..
                    }
                ),
                "{code}: {e:?}"
            );
        }
        for code in ["23505", "22003", "42P01"] {
            let e = Error::from(sqlx::Error::Database(Box::new(Code(code))));
            assert!(matches!(e, Error::Internal(_)), "{code}: {e:?}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let e = Error::validation("events[2].model", "must be at most 128 characters");
        assert!(e.to_string().starts_with("events[2].model"));
    }
}
