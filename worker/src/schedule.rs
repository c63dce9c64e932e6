//! Jobs that must run once across all workers, each under a Postgres advisory
//! lock: session cleanup, partitions made ahead, expired idempotency records,
//! and the credit reconciler.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::startup::Ctx;

/// Advisory lock ids (arbitrary, fixed).
const LOCK_CLEANUP: i64 = 0x5653_4301;
const LOCK_PARTITIONS: i64 = 0x5653_4302;
const LOCK_HOLD_EXPIRY: i64 = 0x5653_4303;
const LOCK_RECONCILE: i64 = 0x5653_4304;
const LOCK_IDEMPOTENCY: i64 = 0x5653_4305;

pub async fn run(ctx: Ctx, shutdown: CancellationToken) {
    tokio::join!(
        housekeeping(ctx.clone(), shutdown.clone()),
        credit_jobs(ctx, shutdown)
    );
}

async fn housekeeping(ctx: Ctx, shutdown: CancellationToken) {
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

/// Runs `job` only if this process takes the advisory lock `lock`, held for
/// the whole job in a transaction of its own (a crash releases it). `None`
/// when another worker holds it.
pub async fn locked<T>(
    ctx: &Ctx,
    lock: i64,
    job: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Option<T>> {
    let mut tx = ctx.pg.begin().await?;
    let got: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
        .bind(lock)
        .fetch_one(&mut *tx)
        .await?;
    if !got {
        return Ok(None);
    }
    let result = job.await;
    tx.commit().await?;
    result.map(Some)
}

/// Hold expiry every `credits.expiry_interval_secs`, the reconciler every
/// `worker.reconcile_interval_secs` (SPEC §5.5b, §8).
async fn credit_jobs(ctx: Ctx, shutdown: CancellationToken) {
    let tick = Duration::from_secs(ctx.settings.credits.expiry_interval_secs.max(1));
    let reconcile_every = Duration::from_secs(ctx.settings.worker.reconcile_interval_secs.max(1));
    let mut next_reconcile = tokio::time::Instant::now() + reconcile_every;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        match locked(&ctx, LOCK_HOLD_EXPIRY, crate::reconcile::expire_holds(&ctx)).await {
            Ok(Some(n)) if n > 0 => tracing::info!(expired = n, "expired holds released"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "hold expiry failed"),
        }
        if tokio::time::Instant::now() >= next_reconcile {
            next_reconcile = tokio::time::Instant::now() + reconcile_every;
            match locked(&ctx, LOCK_RECONCILE, crate::reconcile::reconcile_all(&ctx)).await {
                Ok(Some(s)) => tracing::info!(
                    users = s.users,
                    repairs = s.repairs.len(),
                    "credits reconciled"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "reconciler failed"),
            }
        }
    }
}
