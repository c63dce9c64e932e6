//! Housekeeping every `worker.cleanup_interval_secs`, each step under its
//! own advisory lock: monthly usage partitions made ahead, expired sessions
//! and expired durable idempotency records deleted.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{LOCK_CLEANUP, LOCK_IDEMPOTENCY, LOCK_PARTITIONS};
use crate::ctx::Ctx;

pub async fn run(ctx: Ctx, shutdown: CancellationToken) {
    let every = Duration::from_secs(ctx.settings.worker.cleanup_interval_secs.max(1));
    loop {
        if let Err(e) = ensure_partitions(&ctx).await {
            tracing::warn!(error = %e, "partition job failed");
        }
        match cleanup_sessions(&ctx).await {
            Ok(Some(n)) if n > 0 => tracing::info!(removed = n, "expired sessions removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "session cleanup failed"),
        }
        match cleanup_idempotency_records(&ctx).await {
            Ok(Some(n)) if n > 0 => {
                tracing::info!(removed = n, "expired idempotency records removed")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "idempotency record cleanup failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Runs `f` only if this process takes the advisory lock (transaction-scoped,
/// so a crash releases it). `None` when another worker holds it.
async fn with_lock<T>(ctx: &Ctx, lock: i64, sql: &str) -> Result<Option<T>, sqlx::Error>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let mut tx = ctx.pg.begin().await?;
    let got: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
        .bind(lock)
        .fetch_one(&mut *tx)
        .await?;
    if !got {
        return Ok(None);
    }
    let v: T = sqlx::query_scalar(sql).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(Some(v))
}

/// Deletes expired sessions via `cleanup_expired_sessions()`.
pub async fn cleanup_sessions(ctx: &Ctx) -> Result<Option<i32>, sqlx::Error> {
    with_lock(ctx, LOCK_CLEANUP, "select cleanup_expired_sessions()").await
}

/// Deletes durable idempotency records past their expiry (docs/credits.md);
/// a bounded batch per run, so one run never holds a long lock.
pub async fn cleanup_idempotency_records(ctx: &Ctx) -> Result<Option<i64>, sqlx::Error> {
    with_lock(
        ctx,
        LOCK_IDEMPOTENCY,
        "with gone as (delete from idempotency_records where ctid in \
           (select ctid from idempotency_records where expires_at <= now() limit 10000) returning 1) \
         select count(*) from gone",
    )
    .await
}

/// Keeps monthly usage partitions three months ahead.
pub async fn ensure_partitions(ctx: &Ctx) -> Result<Option<i32>, sqlx::Error> {
    with_lock(
        ctx,
        LOCK_PARTITIONS,
        "select ensure_usage_partitions((now() - interval '2 months')::date, (now() + interval '3 months')::date)",
    )
    .await
}
