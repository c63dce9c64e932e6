//! Jobs that must run once across all workers, each under a Postgres advisory
//! lock, and their cadence: housekeeping (session cleanup, partitions made
//! ahead, expired idempotency records), hold expiry and the credit reconciler.

pub mod hold_expiry;
pub mod housekeeping;
pub mod reconcile;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use common::redis::scripts::Reply;

use crate::ctx::Ctx;

/// Advisory lock ids (arbitrary, fixed).
pub(crate) const LOCK_CLEANUP: i64 = 0x5653_4301;
pub(crate) const LOCK_PARTITIONS: i64 = 0x5653_4302;
pub(crate) const LOCK_HOLD_EXPIRY: i64 = 0x5653_4303;
pub(crate) const LOCK_RECONCILE: i64 = 0x5653_4304;
pub(crate) const LOCK_IDEMPOTENCY: i64 = 0x5653_4305;
pub(crate) const LOCK_WEBHOOKS: i64 = 0x5653_4341;

pub async fn run(ctx: Ctx, shutdown: CancellationToken) {
    tokio::join!(
        housekeeping::run(ctx.clone(), shutdown.clone()),
        credit_jobs(ctx, shutdown)
    );
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
/// `worker.reconcile_interval_secs` (docs/api.md "Credits" (holds), §8).
async fn credit_jobs(ctx: Ctx, shutdown: CancellationToken) {
    let tick = Duration::from_secs(ctx.settings.credits.expiry_interval_secs.max(1));
    let reconcile_every = Duration::from_secs(ctx.settings.worker.reconcile_interval_secs.max(1));
    let mut next_reconcile = tokio::time::Instant::now() + reconcile_every;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        match locked(&ctx, LOCK_HOLD_EXPIRY, hold_expiry::expire_holds(&ctx)).await {
            Ok(Some(n)) if n > 0 => tracing::info!(expired = n, "expired holds released"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "hold expiry failed"),
        }
        if tokio::time::Instant::now() >= next_reconcile {
            next_reconcile = tokio::time::Instant::now() + reconcile_every;
            match locked(&ctx, LOCK_RECONCILE, reconcile::reconcile_all(&ctx)).await {
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

pub(crate) fn ttl_ms(ctx: &Ctx) -> u64 {
    ctx.settings.credits.idempotency_ttl_secs * 1000
}

pub(crate) async fn call(ctx: &Ctx, inv: redis::ScriptInvocation<'_>) -> anyhow::Result<Reply> {
    let mut conn = ctx.redis.get().await?;
    let raw: Vec<String> = inv.invoke_async(&mut *conn).await?;
    Ok(Reply::parse(raw)?)
}
