//! Privacy (docs/api.md "Privacy"): export everything stored about a user, and erase a
//! user's personal data. Both are rare and read their own writes, so they
//! work on Postgres directly (with their audit row in the same transaction)
//! and then on Redis. Class `profile`; a user reaches only their own id,
//! admins any.
//!
//! Erasure keeps `users.id` as the pseudonym and the ledger's amounts (the
//! balance must still equal the ledger's sum), and nulls the free-form data:
//! email, name, preferences, machine ids, usage/ledger/hold metadata and
//! ledger descriptions. Events still queued are stripped by the worker when
//! they land (it checks `users.status`).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgConnection;
use tokio::sync::mpsc;

use super::deadline::Deadline;
use super::error::{ApiError, Result};
use super::guard::CurrentUser;
use super::target::Target;
use super::{guarded, Class};
use crate::state::AppState;
use crate::users::Status;

pub fn router(state: &AppState) -> Router<AppState> {
    guarded(
        state,
        Class::Profile,
        Router::new()
            .route("/api/users/{id}/export", get(export))
            .route("/api/users/{id}", axum::routing::delete(erase)),
    )
}

/// The request's `x-request-id` when it is a sane token, else a new uuid.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn audit(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    target: &str,
    request_id: &str,
    details: Value,
) -> Result<()> {
    sqlx::query(
        "insert into audit_log (actor, action, target, request_id, details) values ($1, $2, $3, $4, $5)",
    )
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(request_id)
    .bind(details)
    .execute(conn)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------

/// Sections of the export after `user`, in order: (member, rows as JSON text).
/// Every table that holds rows of the user, oldest first. `usage_event_ids`
/// is left out: it holds only the ids of the exported usage rows.
const SECTIONS: [(&str, &str); 17] = [
    ("subscriptions", "select to_jsonb(t)::text from subscriptions t where user_id = $1 order by created_at, id"),
    ("credit_transactions", "select to_jsonb(t)::text from credit_transactions t where user_id = $1 order by created_at, id"),
    ("credit_holds", "select to_jsonb(t)::text from credit_holds t where user_id = $1 order by created_at, id"),
    // Idempotency records without their answers (the ledger and holds hold those).
    ("idempotency_records", "select (to_jsonb(t) - 'answer')::text from idempotency_records t where user_id = $1 order by created_at, route, key"),
    ("vscode_sessions", "select to_jsonb(t)::text from vscode_sessions t where user_id = $1 order by created_at, id"),
    ("api_rate_limits", "select to_jsonb(t)::text from api_rate_limits t where user_id = $1 order by class"),
    ("rate_limit_windows", "select to_jsonb(t)::text from rate_limit_windows t where user_id = $1 order by class, window_start"),
    ("audit_log", "select to_jsonb(t)::text from audit_log t where target = $1 order by at, id"),
    ("usage_daily", "select to_jsonb(t)::text from usage_daily t where user_id = $1 order by day, kind, provider, model, feature, session_id"),
    ("credit_daily", "select to_jsonb(t)::text from credit_daily t where user_id = $1 order by day, model, provider, feature, session_id"),
    ("model_usage", "select to_jsonb(t)::text from model_usage t where user_id = $1 order by occurred_at, id"),
    ("feature_usage", "select to_jsonb(t)::text from feature_usage t where user_id = $1 order by occurred_at, id"),
    // Spend alerts: the configuration without its signing secret, with its thresholds.
    ("alert_configs", concat!(
        "select ((to_jsonb(c) - 'webhook_secret') || jsonb_build_object('thresholds', coalesce((select jsonb_agg(",
        "jsonb_build_object('kind', t.kind, 'value', t.value, 'created_at', t.created_at) order by t.kind, t.value) ",
        "from alert_thresholds t where t.owner_kind = c.owner_kind and t.owner_id = c.owner_id), '[]'::jsonb)))::text ",
        "from alert_configs c where owner_kind = 'user' and owner_id = $1")),
    ("alerts", "select to_jsonb(a)::text from alerts a where owner_kind = 'user' and owner_id = $1 order by at, id"),
    // API keys as their metadata: never the key (not stored) nor its hash.
    ("api_keys", "select (to_jsonb(t) - 'key_hash')::text from api_keys t where user_id = $1 order by created_at, key_id"),
    // The organization the user is a member of, with the role and cap (docs/credits.md "Organizations").
    ("org_memberships", "select to_jsonb(t)::text from org_members t where user_id = $1 order by created_at"),
    ("credit_balance", "select jsonb_build_object('credits_balance', credits_balance)::text from users where id = $1"),
];

/// Rows are sent in chunks of about this many bytes.
const CHUNK_BYTES: usize = 64 * 1024;

/// Everything stored about a user
///
/// One JSON document (`ExportAnswer`), streamed, so a user with
/// millions of usage rows is exported whole without holding it in memory.
/// It is read in one repeatable-read snapshot. A failure after the first byte
/// cannot become a problem document: the connection is cut, and the
/// truncated JSON does not parse (see docs/analytics.md).
///
/// Bounded (docs/reliability.md, "Bounds"): every statement runs under
/// `users.export_timeout_ms`, and at most one export per user runs at a time
/// on all gateways. The second is 429 `rate_limited` with `Retry-After` (it
/// is the same request too often, not a conflict of state; docs/api.md has no
/// 409 code that fits). The lock is a session-level Postgres advisory lock
/// on a connection taken out of the pool for the export: it is released
/// when that connection closes, however the export ends (done, client gone,
/// error, panic), so it cannot outlive its export the way a Redis lock with
/// a guessed TTL could, and it needs no TTL long enough for a slow reader.
#[utoipa::path(get, path = "/api/users/{id}/export", tag = "profile",
    responses(
        (status = 200, description = "The export (`Content-Disposition: attachment`)", body = ExportAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn export(
    State(state): State<AppState>,
    caller: CurrentUser,
    headers: HeaderMap,
    deadline: Deadline,
    Target(id): Target,
) -> Result<Response> {
    let rid = request_id(&headers);
    let timeout_ms = state.settings.users.export_timeout_ms;
    // Out of the pool: closing it is what releases the lock.
    let mut conn = state.pg.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar(EXPORT_LOCK_SQL)
        .bind(&id)
        .fetch_one(&mut conn)
        .await?;
    if !locked {
        return Err(ApiError::rate_limited(timeout_ms.div_ceil(1000).max(1)));
    }
    let mut tx = sqlx::Connection::begin(&mut conn).await?;
    sqlx::query(&statement_timeout(timeout_ms))
        .execute(&mut *tx)
        .await?;
    let user: Option<String> =
        sqlx::query_scalar("select to_jsonb(u)::text from users u where id = $1")
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(user) = user else {
        return Err(ApiError::not_found("no such user"));
    };
    // The audit row is this read's one write; cut before it, the
    // transaction rolls back and nothing was recorded.
    deadline.commit()?;
    audit(&mut tx, caller.id(), "user.export", &id, &rid, json!({})).await?;
    tx.commit().await?;

    let (send, recv) = mpsc::channel::<std::io::Result<Bytes>>(8);
    let head = format!(
        "{{\"user_id\":{},\"exported_at\":{},\"user\":{}",
        json!(id),
        json!(Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        user
    );
    tokio::spawn(async move {
        let result = stream_export(&mut conn, timeout_ms, &id, head, &send).await;
        // Unlocked before the body ends, so the client's next export finds
        // the lock free; if this fails, closing the connection releases it.
        let _ = sqlx::query(EXPORT_UNLOCK_SQL)
            .bind(&id)
            .execute(&mut conn)
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, user_id = %id, "export cut short");
            let _ = send.send(Err(std::io::Error::other("export failed"))).await;
        }
        drop(send);
        let _ = sqlx::Connection::close(conn).await;
    });
    let mut recv = recv;
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| recv.poll_recv(cx)));
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"export.json\""),
    );
    Ok(resp)
}

/// Takes the user's export lock on this connection, or answers false. A
/// 64-bit hash of the id: two users sharing one would only wait for each
/// other's export.
pub const EXPORT_LOCK_SQL: &str =
    "select pg_try_advisory_lock(hashtextextended('export:' || $1, 0))";

const EXPORT_UNLOCK_SQL: &str = "select pg_advisory_unlock(hashtextextended('export:' || $1, 0))";

/// `SET LOCAL` takes no bind parameters; the value is a number.
fn statement_timeout(ms: u64) -> String {
    format!("set local statement_timeout = {ms}")
}

/// Writes the document's sections to `send`; stops when the client leaves.
async fn stream_export(
    conn: &mut PgConnection,
    timeout_ms: u64,
    id: &str,
    head: String,
    send: &mpsc::Sender<std::io::Result<Bytes>>,
) -> anyhow::Result<()> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&statement_timeout(timeout_ms))
        .execute(&mut *tx)
        .await?;
    let mut buf = head;
    for (name, sql) in SECTIONS {
        let single = name == "credit_balance";
        buf.push_str(&format!(",{}:", json!(name)));
        if !single {
            buf.push('[');
        }
        let mut rows = sqlx::query_scalar::<_, String>(sql)
            .bind(id)
            .fetch(&mut *tx);
        let mut first = true;
        while let Some(row) = rows.next().await {
            if !first {
                buf.push(',');
            }
            first = false;
            buf.push_str(&row?);
            if buf.len() >= CHUNK_BYTES {
                let chunk = Bytes::from(std::mem::take(&mut buf));
                if send.send(Ok(chunk)).await.is_err() {
                    return Ok(()); // the client left
                }
            }
        }
        if single && first {
            buf.push_str("null");
        }
        if !single {
            buf.push(']');
        }
    }
    buf.push('}');
    let _ = send.send(Ok(Bytes::from(buf))).await;
    tx.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Erasure
// ---------------------------------------------------------------------------

/// How many rows each step of an erasure changed (kept in the audit row).
#[derive(Debug, Default, serde::Serialize)]
struct Scrubbed {
    vscode_sessions: u64,
    model_usage: u64,
    feature_usage: u64,
    credit_transactions: u64,
    credit_holds: u64,
    idempotency_records: u64,
    alerts: u64,
    alert_configs: u64,
    api_keys: u64,
    org_memberships: u64,
}

/// Erase a user's personal data
///
/// 202 once Postgres holds no personal data of the
/// user, Redis marks the account deleted (so every gateway refuses it once
/// its local cache expires) and the user's Redis keys are swept; they are
/// swept once more after the other gateways' user caches have expired.
///
/// Never a 202 that leaves the account active in Redis (docs/reliability.md,
/// "Bounds"): the Redis status is written inside the Postgres transaction,
/// before its commit, so a Redis failure rolls the erasure back whole and
/// answers 503 `unavailable` with `Retry-After`; the client's retry is a
/// fresh erasure. Whatever fails after that point (the commit itself, the
/// first sweep) also answers 503, and the retry is safe: an account already
/// deleted may DELETE again (the guard lets exactly this route through), and
/// every step is idempotent (nulls stay null, `deleted_at` keeps the first
/// time).
#[utoipa::path(delete, path = "/api/users/{id}", tag = "profile",
    responses(
        (status = 202, description = "Erased", body = ErasureAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn erase(
    State(state): State<AppState>,
    caller: CurrentUser,
    headers: HeaderMap,
    deadline: Deadline,
    Target(id): Target,
) -> Result<Response> {
    let rid = request_id(&headers);
    deadline.commit()?;
    let deleted_at = erase_in_postgres(&state, caller.id(), &id, &rid).await?;
    // From here on this gateway answers 403 account_deleted; others within
    // their local cache's lifetime (gateway.user_cache_ttl_ms, ≤ 5 s).
    state.users.forget(&id);
    let later = state.clone();
    let uid = id.clone();
    let wait = Duration::from_millis(state.settings.gateway.user_cache_ttl_ms + 2_000)
        .min(Duration::from_secs(8));
    tokio::spawn(async move {
        // Requests that passed another gateway's guard before it saw the
        // deletion may still have written session or cache keys.
        tokio::time::sleep(wait).await;
        if let Err(e) = sweep_redis(&later, &uid).await {
            tracing::error!(error = %e, user_id = %uid, "second redis erasure sweep failed");
        }
    });
    sweep_redis(&state, &id)
        .await
        .map_err(|e| ApiError::unavailable("redis", e))?;
    state.users.forget(&id);
    let body = ErasureAnswer {
        user_id: id,
        status: Status::Deleted.as_str().to_string(),
        deleted_at: deleted_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        request_id: rid,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// One transaction: the user row, every table's free-form data, the audit
/// row, and (last, before the commit) the deleted status in Redis.
async fn erase_in_postgres(
    state: &AppState,
    actor: &str,
    id: &str,
    rid: &str,
) -> Result<DateTime<Utc>> {
    let mut tx = state.pg.begin().await?;
    // The row lock orders this against concurrent settles of the same user.
    let found: Option<String> =
        sqlx::query_scalar("select status from users where id = $1 for update")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if found.is_none() {
        return Err(ApiError::not_found("no such user"));
    }
    let deleted_at: DateTime<Utc> = sqlx::query_scalar(
        "update users set email = null, name = null, preferences = '{}'::jsonb, status = 'deleted', \
           deleted_at = coalesce(deleted_at, now()), updated_at = now() \
         where id = $1 returning deleted_at",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    let mut s = Scrubbed::default();
    let run = |sql: &'static str| sqlx::query(sql).bind(id);
    s.vscode_sessions = run(
        "update vscode_sessions set machine_id = null where user_id = $1 and machine_id is not null",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    s.model_usage =
        run("update model_usage set metadata = null where user_id = $1 and metadata is not null")
            .execute(&mut *tx)
            .await?
            .rows_affected();
    s.feature_usage =
        run("update feature_usage set metadata = null where user_id = $1 and metadata is not null")
            .execute(&mut *tx)
            .await?
            .rows_affected();
    // The one update the ledger's trigger allows.
    s.credit_transactions = run(
        "update credit_transactions set description = null, metadata = null \
         where user_id = $1 and (description is not null or metadata is not null)",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    s.credit_holds =
        run("update credit_holds set metadata = null where user_id = $1 and metadata is not null")
            .execute(&mut *tx)
            .await?
            .rows_affected();
    // Durable idempotency records go whole (a retry of a deleted account is
    // refused anyway); the worker stores none for a deleted user.
    s.idempotency_records = run("delete from idempotency_records where user_id = $1")
        .execute(&mut *tx)
        .await?
        .rows_affected();
    // Spend alerts go whole (their thresholds with the configuration); the
    // worker raises none for a deleted user.
    s.alerts = run("delete from alerts where owner_kind = 'user' and owner_id = $1")
        .execute(&mut *tx)
        .await?
        .rows_affected();
    s.alert_configs = run("delete from alert_configs where owner_kind = 'user' and owner_id = $1")
        .execute(&mut *tx)
        .await?
        .rows_affected();
    // API keys go whole (their names are the user's text); their Redis
    // records become tombstones before the commit.
    s.api_keys = state.api_keys.erase(&mut tx, id).await?;
    // The membership goes (the member's charges stay in the pool's ledger,
    // their free text nulled above); Redis follows before the commit.
    let left: Option<String> =
        sqlx::query_scalar("delete from org_members where user_id = $1 returning org_id")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(org) = &left {
        s.org_memberships = 1;
        crate::credits::orgs::apply_membership(&state.credits, id, None, Some(org)).await?;
    }
    let by = if actor == id { "self" } else { "admin" };
    audit(
        &mut tx,
        actor,
        "user.delete",
        id,
        rid,
        json!({"by": by, "scrubbed": s}),
    )
    .await?;
    // Under the row lock, as admin changes do, so Redis sees status changes
    // in commit order. A failure here drops `tx`: nothing was erased.
    let mut rec = crate::users::load_record(&mut tx, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such user"))?;
    rec.status = Status::Deleted;
    crate::users::write_redis(&state.user_store, &rec)
        .await
        .map_err(|e| ApiError::unavailable("redis", e))?;
    tx.commit().await?;
    metrics::counter!("users_deleted_total").increment(1);
    Ok(deleted_at)
}

/// Whether a key (the part after `PREFIX:{USER}:`) is kept on erasure: only
/// what credits need to finish settling what is in flight. They hold amounts
/// and ids, no personal data.
fn kept_on_erasure(rest: &str) -> bool {
    matches!(
        rest,
        "credits" | "pending" | "holds" | "grants_applied" | "user"
    ) || rest.starts_with("hold_end:")
}

/// Escapes glob characters for a `SCAN MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Deletes every key of the user except the credit keys and the user hash
/// (which says `deleted`): sessions, session tokens, cached analytics and
/// profile, idempotency answers, rate-limit state, the preferences size
/// ledger.
async fn sweep_redis(state: &AppState, id: &str) -> anyhow::Result<()> {
    let mut conn = state.redis().await?;
    let base = state.keys.user_info(id);
    let prefix = base.strip_suffix("user").unwrap_or(&base).to_string();
    let pattern = format!("{}*", glob_escape(&prefix));
    // Every master's keys on a cluster (the user's are all in one slot).
    let keys = common::redis::scan_match(&mut conn, &pattern).await?;
    let doomed: Vec<&String> = keys
        .iter()
        .filter(|k| !kept_on_erasure(k.strip_prefix(&prefix).unwrap_or(k)))
        .collect();
    for chunk in doomed.chunks(1000) {
        redis::cmd("DEL")
            .arg(chunk)
            .query_async::<()>(&mut *conn)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Answers (here, beside the one code that builds them: privacy has no domain
// module, and `crate::users` has no room left under the 800-line bound)
// ---------------------------------------------------------------------------

/// `DELETE /api/users/{id}`: the personal data is erased (202).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErasureAnswer {
    /// The erased user's id, kept as a pseudonym.
    pub user_id: String,
    /// Always `deleted`.
    pub status: String,
    /// When the account was first erased.
    #[schema(format = DateTime)]
    pub deleted_at: String,
    /// The request's `x-request-id` (or a new one), also in the audit row.
    pub request_id: String,
}

/// `GET /api/users/{id}/export`: one JSON document, streamed; a row of a
/// section is the table's row as Postgres's `to_jsonb` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExportAnswer {
    /// The exported user's id.
    pub user_id: String,
    /// When the export started.
    #[schema(format = DateTime)]
    pub exported_at: String,
    /// The `users` row.
    #[schema(value_type = Object)]
    pub user: serde_json::Value,
    /// `subscriptions` rows, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub subscriptions: Vec<serde_json::Value>,
    /// `credit_transactions` rows (the ledger), oldest first.
    #[schema(value_type = Vec<Object>)]
    pub credit_transactions: Vec<serde_json::Value>,
    /// `credit_holds` rows, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub credit_holds: Vec<serde_json::Value>,
    /// `idempotency_records` rows without their stored answers.
    #[schema(value_type = Vec<Object>)]
    pub idempotency_records: Vec<serde_json::Value>,
    /// `vscode_sessions` rows, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub vscode_sessions: Vec<serde_json::Value>,
    /// `api_rate_limits` rows (rate-limit overrides).
    #[schema(value_type = Vec<Object>)]
    pub api_rate_limits: Vec<serde_json::Value>,
    /// `rate_limit_windows` rows.
    #[schema(value_type = Vec<Object>)]
    pub rate_limit_windows: Vec<serde_json::Value>,
    /// `audit_log` rows about the user, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub audit_log: Vec<serde_json::Value>,
    /// `usage_daily` rows (the usage rollup).
    #[schema(value_type = Vec<Object>)]
    pub usage_daily: Vec<serde_json::Value>,
    /// `credit_daily` rows (the credits rollup).
    #[schema(value_type = Vec<Object>)]
    pub credit_daily: Vec<serde_json::Value>,
    /// `model_usage` rows, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub model_usage: Vec<serde_json::Value>,
    /// `feature_usage` rows, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub feature_usage: Vec<serde_json::Value>,
    /// The spend-alert configuration (without its secret), with its thresholds.
    #[schema(value_type = Vec<Object>)]
    pub alert_configs: Vec<serde_json::Value>,
    /// The spend alerts raised, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub alerts: Vec<serde_json::Value>,
    /// The API keys, revoked ones included, without their hashes.
    #[schema(value_type = Vec<Object>)]
    pub api_keys: Vec<serde_json::Value>,
    /// The user's organization membership (role, cap), if any.
    #[schema(value_type = Vec<Object>)]
    pub org_memberships: Vec<serde_json::Value>,
    /// The settled balance; null if the user row is gone.
    pub credit_balance: Option<ExportBalance>,
}

/// The `credit_balance` section of an export.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExportBalance {
    /// `users.credits_balance`: the ledger's sum.
    pub credits_balance: i64,
}

/// The operations of this module (docs/api.md "Privacy").
#[derive(utoipa::OpenApi)]
#[openapi(paths(export, erase))]
pub(crate) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erasure_keeps_only_the_credit_keys_and_the_user_hash() {
        for kept in [
            "credits",
            "pending",
            "holds",
            "grants_applied",
            "hold_end:abc",
            "user",
        ] {
            assert!(kept_on_erasure(kept), "{kept}");
        }
        for gone in [
            "session:sess_1",
            "stoken:tok",
            "analytics:30",
            "analytics_keys",
            "analytics_gen",
            "profile",
            "idem:consume:k",
            "rl:usage",
            "anything_new",
        ] {
            assert!(!kept_on_erasure(gone), "{gone}");
        }
    }

    #[test]
    fn scan_patterns_escape_glob_characters() {
        assert_eq!(glob_escape("vsc:{u_1}:"), "vsc:{u_1}:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn request_ids_come_from_the_header_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("req-123"));
        assert_eq!(request_id(&h), "req-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
        assert_eq!(request_id(&HeaderMap::new()).len(), 36);
    }

    fn names(v: &Value) -> Vec<String> {
        let mut n: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        n.sort();
        n
    }

    #[test]
    fn the_doc_lists_export_and_erasure_with_tag_summary_and_answers() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        for (path, method, status, summary, answer) in [
            (
                "/api/users/{id}/export",
                "get",
                "200",
                "Everything stored about a user",
                "ExportAnswer",
            ),
            (
                "/api/users/{id}",
                "delete",
                "202",
                "Erase a user's personal data",
                "ErasureAnswer",
            ),
        ] {
            let op = &doc["paths"][path][method];
            assert_eq!(op["tags"], json!(["profile"]), "{path}");
            assert_eq!(op["summary"], summary, "{path}");
            assert!(op["responses"]["503"].is_object(), "{path}");
            let ok = &op["responses"][status]["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(ok, &format!("#/components/schemas/{answer}"), "{path}");
        }
        assert_eq!(
            names(&schemas["ErasureAnswer"]["properties"]),
            ["deleted_at", "request_id", "status", "user_id"]
        );
        // The export's members are the streamed document's, in full.
        let mut want: Vec<String> = ["user_id", "exported_at", "user"]
            .into_iter()
            .chain(SECTIONS.iter().map(|(name, _)| *name))
            .map(String::from)
            .collect();
        want.sort();
        let export = &schemas["ExportAnswer"];
        assert_eq!(names(&export["properties"]), want);
        assert_eq!(export["properties"]["model_usage"]["type"], "array");
        assert_eq!(
            export["required"].as_array().unwrap().len(),
            want.len() - 1,
            "all but credit_balance"
        );
    }
}
