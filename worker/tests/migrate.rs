//! `worker migrate` (README.md "Configuration", §3): idempotent on a fresh database, and the
//! schema carries every table, column and function the spec names.

use std::time::Duration;

use testkit::TestDb;

/// Columns that outside tools read (docs/reliability.md), with the type where it names one.
const COLUMNS: &[(&str, &str, Option<&str>)] = &[
    ("users", "id", Some("text")),
    ("users", "email", None),
    ("users", "plan", None),
    ("users", "status", None),
    ("users", "credits_balance", Some("bigint")),
    ("subscriptions", "user_id", None),
    ("credit_transactions", "user_id", None),
    ("vscode_sessions", "user_id", None),
    ("model_usage", "user_id", None),
    ("feature_usage", "user_id", None),
    ("api_rate_limits", "user_id", None),
    ("audit_log", "user_id", None),
    ("credit_transactions", "id", Some("uuid")),
    ("credit_transactions", "amount", Some("bigint")),
    ("credit_transactions", "balance_after", Some("bigint")),
    ("credit_transactions", "kind", None),
    ("model_usage", "id", Some("uuid")),
    ("model_usage", "provider", None),
    ("model_usage", "model", None),
    ("model_usage", "prompt_tokens", None),
    ("model_usage", "completion_tokens", None),
    ("model_usage", "metadata", None),
    ("feature_usage", "id", Some("uuid")),
    ("feature_usage", "feature", None),
    ("feature_usage", "metadata", None),
    ("vscode_sessions", "id", None),
    ("vscode_sessions", "extension_version", None),
    ("vscode_sessions", "expires_at", None),
    ("vscode_sessions", "machine_id", None),
];

const TABLES: [&str; 8] = [
    "users",
    "subscriptions",
    "credit_transactions",
    "vscode_sessions",
    "model_usage",
    "feature_usage",
    "api_rate_limits",
    "audit_log",
];

const FUNCTIONS: [&str; 3] = [
    "consume_credits_with_session",
    "check_rate_limit",
    "cleanup_expired_sessions",
];

async fn assert_full_schema(db: &TestDb) {
    let pool = db.pool(2).await;
    for table in TABLES {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from information_schema.tables \
             where table_schema = 'public' and table_name = $1",
        )
        .bind(table)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(n, 1, "table {table}");
    }
    for (table, column, ty) in COLUMNS {
        let found: Option<String> = sqlx::query_scalar(
            "select data_type from information_schema.columns \
             where table_schema = 'public' and table_name = $1 and column_name = $2",
        )
        .bind(table)
        .bind(column)
        .fetch_optional(&pool)
        .await
        .unwrap();
        let found = found.unwrap_or_else(|| panic!("{table}.{column} is missing"));
        if let Some(ty) = ty {
            assert_eq!(&found, ty, "type of {table}.{column}");
        }
    }
    for function in FUNCTIONS {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace \
             where n.nspname = 'public' and p.proname = $1",
        )
        .bind(function)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(n, 1, "function {function}");
    }
    pool.close().await;
}

#[tokio::test]
async fn migrating_a_fresh_database_twice_succeeds_and_builds_every_table_column_and_function() {
    let db = TestDb::empty().await;
    let settings = db.settings();
    worker::migrate(&settings).await.expect("first migrate");
    worker::migrate(&settings)
        .await
        .expect("second migrate is a no-op");
    assert_full_schema(&db).await;
}

#[tokio::test]
async fn the_worker_binary_migrates_and_exits_zero_every_time() {
    let db = TestDb::empty().await;
    for run in 1..=2 {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"))
            .arg("migrate")
            .env_clear()
            .env("DATABASE_URL", &db.url)
            .env("JWT_SECRET", "unused")
            .current_dir(std::env::temp_dir())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("worker migrate should exit")
            .expect("run the worker binary");
        assert!(
            out.status.success(),
            "run {run}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_full_schema(&db).await;
}
