//! The audit trail (docs/api.md "Admin"): an admin or privacy change writes Postgres
//! directly, and its `audit_log` row commits in the same transaction, so there
//! is never a change without its row nor a row without its change.
//!
//! [`write`] is the general form (credit grants, exports); [`change_user`]
//! adds what a change of plan, status or limits needs: the user's row lock and
//! the refresh of the Redis user hash, so every gateway sees it within its
//! local cache's lifetime (`gateway.user_cache_ttl_ms`, ≤ 5 s).

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::future::BoxFuture;
use serde::{Serialize, Serializer};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::error::{Error, Result};
use crate::users::UserStore;
use crate::users::{self, UserRecord};

/// Who did what to whom, under which request; the details come from the write.
#[derive(Debug, Clone, Copy)]
pub struct Action<'a> {
    /// The caller's user id.
    pub actor: &'a str,
    /// Dotted name, e.g. `user.plan`, `user.rate_limit.set`, `credits.grant`.
    pub action: &'a str,
    /// The user (or other object) acted on.
    pub target: Option<&'a str>,
    pub request_id: &'a str,
}

/// Inserts one audit row on `conn` (call it inside the change's transaction).
pub async fn insert(conn: &mut PgConnection, a: Action<'_>, details: &Value) -> Result<()> {
    sqlx::query(
        "insert into audit_log (actor, action, target, request_id, details) \
         values ($1, $2, $3, $4, $5)",
    )
    .bind(a.actor)
    .bind(a.action)
    .bind(a.target)
    .bind(a.request_id)
    .bind(details)
    .execute(conn)
    .await?;
    Ok(())
}

/// Runs `write` and its audit row in one transaction. `write` returns its
/// result and the action's details (amount, reason, the previous value, ...).
pub async fn write<T, F>(pg: &PgPool, a: Action<'_>, write: F) -> Result<T>
where
    F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<(T, Value)>>,
{
    let mut tx = pg.begin().await?;
    let (out, details) = write(&mut tx).await?;
    insert(&mut tx, a, &details).await?;
    tx.commit().await?;
    Ok(out)
}

/// A change of one user's plan, status or limits, audited and propagated:
///
/// 1. lock the user's row (changes of one user serialize here),
/// 2. run `write` with the record as it was, then the audit row,
/// 3. reload the record inside the transaction and write the Redis user hash
///    while still holding the lock, so two changes reach Redis in commit order,
/// 4. commit, and drop this gateway's cached copy.
///
/// Redis down: the transaction rolls back and the answer is 503, rather than
/// a committed change that Redis (and so other gateways) would not show.
/// The target must exist (provision it first with `Directory::get_by_id`).
pub async fn change_user<T, F>(
    store: &UserStore,
    a: Action<'_>,
    user_id: &str,
    write: F,
) -> Result<(T, Arc<UserRecord>)>
where
    F: for<'c> FnOnce(&'c mut PgConnection, &'c UserRecord) -> BoxFuture<'c, Result<(T, Value)>>,
{
    let mut tx = store.pg.begin().await?;
    let locked: Option<(String,)> = sqlx::query_as("select id from users where id = $1 for update")
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
    if locked.is_none() {
        return Err(Error::NotFound(format!("no user {user_id}")));
    }
    let before = users::load_record(&mut tx, user_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no user {user_id}")))?;
    let (out, details) = write(&mut tx, &before).await?;
    insert(&mut tx, a, &details).await?;
    let after = users::load_record(&mut tx, user_id)
        .await?
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("user vanished inside its own lock")))?;
    users::write_redis(store, &after)
        .await
        .map_err(|e| Error::unavailable("redis", e))?;
    if let Err(e) = tx.commit().await {
        // Redis already shows a change that did not commit: drop the hash so
        // the next read goes back to Postgres.
        let key = store.keys.user_info(user_id);
        let _ = store
            .redis_link
            .run(|mut c| async move { redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await })
            .await;
        return Err(e.into());
    }
    store.directory.forget(user_id);
    Ok((out, Arc::new(after)))
}

/// `GET /api/admin/audit` (docs/api.md "Admin"): the trail, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditAnswer {
    /// At most `limit` rows, newest first.
    pub entries: Vec<AuditEntry>,
}

/// One row of the trail as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// When the change committed (RFC 3339, microseconds, UTC).
    #[serde(serialize_with = "rfc3339_micros")]
    pub at: DateTime<Utc>,
    /// Who made it: an admin's user id, `operator[:NAME]` or the user itself.
    pub actor: String,
    /// Dotted name, e.g. `user.plan`, `user.rate_limit.set`, `credits.grant`.
    pub action: String,
    /// The user (or other object) acted on, or null.
    #[schema(required = true)]
    pub target: Option<String>,
    /// The request's id (`x-request-id`), or null.
    #[schema(required = true)]
    pub request_id: Option<String>,
    /// What changed: the new and previous values, amounts, reasons (one object per action).
    #[schema(value_type = Object)]
    pub details: Value,
}

/// A time as `2024-05-01T08:00:00.000000Z`, the text the trail always had.
fn rfc3339_micros<S: Serializer>(t: &DateTime<Utc>, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// The newest `limit` rows, of one target when given.
pub async fn list(pg: &PgPool, target: Option<&str>, limit: i64) -> Result<Vec<AuditEntry>> {
    type Row = (
        DateTime<Utc>,
        String,
        String,
        Option<String>,
        Option<String>,
        Value,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "select at, actor, action, target, request_id, details from audit_log \
         where ($1::text is null or target = $1) order by at desc, id desc limit $2",
    )
    .bind(target)
    .bind(limit)
    .fetch_all(pg)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(at, actor, action, target, request_id, details)| AuditEntry {
                at,
                actor,
                action,
                target,
                request_id,
                details,
            },
        )
        .collect())
}

/// The request's id for the audit row (SPEC §5). The outermost layer
/// (`http::request_id`) has already put the decided id in the request's
/// `x-request-id`, so this is the id of the answer and the logs; the rule is
/// applied again for a request that did not pass that layer.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl RequestId {
    pub fn from_header(value: Option<&str>) -> Self {
        Self(common::request_id::accept(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_request_id_is_the_callers_when_sane_else_fresh() {
        assert_eq!(RequestId::from_header(Some("req-123")).0, "req-123");
        for bad in [
            None,
            Some(""),
            Some("has space"),
            Some("a/b"),
            Some(&*"x".repeat(129)),
        ] {
            let id = RequestId::from_header(bad).0;
            assert!(uuid::Uuid::parse_str(&id).is_ok(), "{bad:?} -> {id}");
        }
    }

    #[test]
    fn an_entry_has_the_spec_members_in_utc() {
        let at = DateTime::parse_from_rfc3339("2024-05-01T10:00:00+02:00")
            .unwrap()
            .to_utc();
        let entry = AuditEntry {
            at,
            actor: "admin_1".into(),
            action: "user.plan".into(),
            target: Some("u1".into()),
            request_id: None,
            details: json!({"plan": "pro"}),
        };
        let e = serde_json::to_value(AuditAnswer {
            entries: vec![entry],
        })
        .unwrap();
        assert_eq!(
            e,
            json!({"entries": [{"at": "2024-05-01T08:00:00.000000Z", "actor": "admin_1", "action": "user.plan",
                                "target": "u1", "request_id": null, "details": {"plan": "pro"}}]})
        );
    }
}
