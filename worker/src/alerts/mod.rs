//! Spend alerts (SPEC §5.11; docs/credits.md "Spend alerts"): [`crossing`]
//! decides, in the credit handler's transaction, which thresholds a batch's
//! ledger rows crossed and records each crossing once (the alert row is the
//! event: a transactional outbox); [`delivery`] sends them to the owner's
//! webhook, signed, retried with backoff until acknowledged.

pub mod crossing;
pub mod delivery;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ctx::Ctx;
use crate::jobs::{locked, LOCK_WEBHOOKS};

/// The delivery job: one pass every `alerts.poll_interval_ms`, by one worker
/// at a time.
pub async fn run(ctx: Ctx, shutdown: CancellationToken) {
    init_metrics();
    let tick = Duration::from_millis(ctx.settings.alerts.poll_interval_ms.max(50));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        match locked(&ctx, LOCK_WEBHOOKS, delivery::deliver_due(&ctx)).await {
            Ok(Some(n)) if n > 0 => tracing::info!(delivered = n, "alert webhooks delivered"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "alert delivery failed"),
        }
    }
}

/// Every series of this module at 0 from the start (SPEC §5.9), with its help text.
fn init_metrics() {
    metrics::describe_counter!(
        "alerts_raised_total",
        "Spend alerts recorded (one per threshold crossing)"
    );
    metrics::describe_counter!(
        "alert_webhooks_total",
        "Alert webhook attempts by outcome: delivered (2xx), retry, failed (attempts used up)"
    );
    metrics::counter!("alerts_raised_total").increment(0);
    for outcome in ["delivered", "retry", "failed"] {
        metrics::counter!("alert_webhooks_total", "outcome" => outcome).increment(0);
    }
}
