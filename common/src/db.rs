//! Postgres: the pool, the embedded migrations, and the one answer to "is
//! this database error worth retrying" that both binaries use.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::settings::Settings;

/// The connect options of `DATABASE_URL` plus `tls.*`: the URL's own
/// `sslmode`/`sslrootcert`/`sslcert`/`sslkey` are read by sqlx;
/// `tls.ca_file` is trusted besides the system roots unless the URL names
/// its own `sslrootcert`, and the client identity is presented unless the
/// URL names its own. Every Postgres connection of the binaries uses these.
pub fn pg_options(settings: &Settings) -> anyhow::Result<PgConnectOptions> {
    let url = &settings.database.url;
    let mut opts: PgConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("DATABASE_URL: {e}"))?;
    let tls = &settings.tls;
    let set = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let has =
        |param: &str| url.contains(&format!("?{param}=")) || url.contains(&format!("&{param}="));
    if let Some(ca) = set(&tls.ca_file).filter(|_| !has("sslrootcert")) {
        opts = opts.ssl_root_cert(ca);
    }
    if let (Some(cert), Some(key)) = (set(&tls.client_cert_file), set(&tls.client_key_file)) {
        if !has("sslcert") && !has("sslkey") {
            opts = opts.ssl_client_cert(cert).ssl_client_key(key);
        }
    }
    Ok(opts)
}

/// A lazily connecting Postgres pool: processes start (and serve what they
/// can) while Postgres is down, and connect once it answers.
pub fn pg_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_millis(settings.database.acquire_timeout_ms))
        .connect_lazy_with(pg_options(settings)?))
}

/// The migrations, embedded in the binaries.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Whether a database error means "Postgres is unavailable or busy, try
/// again" rather than "this statement or its data is refused". The worker
/// retries these (never dead-letters them); the gateway answers them 503
/// `unavailable` instead of 500. Transient:
///
/// - the connection itself: IO, TLS, protocol desync, a crashed connection
///   worker, a pool that timed out or is closing;
/// - SQLSTATE class `08` (connection exception), class `53` (insufficient
///   resources: `53300` too_many_connections, out of memory, disk full),
///   class `57` (operator intervention: `57P01` admin_shutdown, `57P02`
///   crash_shutdown, `57P03` cannot_connect_now, `57014` a cancelled or
///   timed-out statement);
/// - `40001` serialization_failure and `40P01` deadlock_detected: the same
///   transaction succeeds when run again.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| is_transient_code(&c)),
        _ => false,
    }
}

/// [`is_transient`] for a bare SQLSTATE.
pub fn is_transient_code(sqlstate: &str) -> bool {
    ["08", "53", "57"]
        .iter()
        .any(|class| sqlstate.starts_with(class))
        || sqlstate == "40001"
        || sqlstate == "40P01"
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

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
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
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

    fn db(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Code(code)))
    }

    #[test]
    fn a_lost_or_exhausted_connection_is_transient() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(is_transient(&sqlx::Error::Io(io)));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::PoolClosed));
        assert!(is_transient(&sqlx::Error::WorkerCrashed));
        assert!(is_transient(&sqlx::Error::Protocol("out of sync".into())));
    }

    #[test]
    fn deadlocks_serialization_failures_and_shutdowns_are_transient() {
        for code in [
            "40P01", // deadlock_detected
            "40001", // serialization_failure
            "53300", // too_many_connections
            "53200", // out_of_memory
            "57P01", // admin_shutdown
            "57P02", // crash_shutdown
            "57P03", // cannot_connect_now
            "57014", // query_canceled (statement timeout)
            "08006", // connection_failure
            "08001", // sqlclient_unable_to_establish_sqlconnection
        ] {
            assert!(is_transient(&db(code)), "{code} should be transient");
        }
    }

    #[test]
    fn refused_data_and_programming_errors_are_not_transient() {
        for code in [
            "23505", // unique_violation
            "23503", // foreign_key_violation
            "23514", // check_violation
            "22P02", // invalid_text_representation
            "22003", // numeric_value_out_of_range
            "42P01", // undefined_table
            "40002", // transaction_integrity_constraint_violation
            "P0001", // raise_exception
        ] {
            assert!(!is_transient(&db(code)), "{code} should not be transient");
        }
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::ColumnNotFound("x".into())));
        assert!(!is_transient(&sqlx::Error::Configuration("bad url".into())));
    }
}
