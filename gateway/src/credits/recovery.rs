//! Detecting and recovering from a Redis data loss (docs/credits.md).
//!
//! Sentinels: one key per cluster slot (`Keys::slot_sentinel_for`) plus one
//! global key (`Keys::sentinel`), written only when a gateway starts against
//! an empty deployment or when a recovery completes. Every credit script
//! checks its slot's sentinel atomically; a missing one means the data the
//! script would act on may be gone, so it changes nothing and answers `LOST`.
//!
//! Recovery: the first gateway to notice (a `LOST` reply, or this watcher
//! seeing the global sentinel gone) records the start, on Redis's clock, in
//! `Keys::recovery`. Until it completes, credit writes answer 503 and balance
//! reads come from Postgres. It completes when no credit event from before
//! the loss can still be unsettled:
//!
//! 1. The confirm window has passed (`amqp.confirm_timeout_ms` +
//!    `credits.recovery_grace_ms` after the start): every publish that a
//!    gateway began before the loss has been confirmed or has failed. No new
//!    credit event is published meanwhile (every credit script answers `LOST`).
//! 2. At some time `t_a` past that window, the credits queue has no ready
//!    message (passive `queue.declare`), so every remaining event is in the
//!    hands of a consumer.
//! 3. Every live credits consumer (heartbeat newer than `DEAD_AFTER_MS`)
//!    reports, at least `IN_TRANSIT_MS` after `t_a`, that it holds no unacked
//!    delivery and has neither taken nor settled one since before `t_a`. A
//!    delivery sent before `t_a` reaches its consumer within `IN_TRANSIT_MS`,
//!    so each consumer has committed everything it was given.
//! 4. The queue is still empty (a consumer that died meanwhile returned its
//!    deliveries to it).
//!
//! Then the ledger holds every pre-loss event, so Redis can load each user
//! from Postgres again: the sentinels are re-written and the recovery key
//! removed. Nothing has to be deleted: no script wrote credit state while the
//! sentinels were missing. Idempotency records come back the same way: the
//! worker stored each keyed 200 in `idempotency_records` with its ledger row,
//! and loading a user restores the unexpired ones before its balance, so a
//! retry after the loss replays (`crate::credits::load_into_redis`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::consumers::{consumers_settled, EarlyBusy, Settled};
use common::redis::keys::Keys;
use common::redis::scripts::scripts;
use common::redis::slot::SLOTS;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use super::store::CreditStore;

pub use common::consumers::{DEAD_AFTER_MS, IN_TRANSIT_MS};

/// This gateway's view: whether credit writes must answer 503.
#[derive(Debug, Default)]
pub struct Recovery {
    active: AtomicBool,
}

impl Recovery {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn set(&self, active: bool) {
        if self.active.swap(active, Ordering::Relaxed) != active {
            metrics::gauge!("credit_recovery_active").set(if active { 1.0 } else { 0.0 });
            if active {
                tracing::warn!("Redis lost its credit data: credit writes answer 503 until the recovery completes");
            } else {
                tracing::info!("credit state recovered: credit writes resume");
            }
        }
    }

    /// Starts (or joins) a recovery: a credit script found its sentinel gone.
    pub async fn enter(&self, store: &CreditStore) {
        self.set(true);
        if let Err(e) = start(store).await {
            tracing::warn!(error = %e, "recovery start not recorded; the watcher retries");
        }
    }
}

/// Records the recovery's start on Redis's clock (once); returns it.
async fn start(store: &CreditStore) -> anyhow::Result<String> {
    let mut conn = store.redis().await?;
    let v: String = scripts()
        .recovery_enter
        .key(store.keys.recovery())
        .invoke_async(&mut *conn)
        .await?;
    Ok(v)
}

/// At start-up (and whenever the watcher finds no sentinel and no recovery):
/// an absent sentinel on an empty deployment (no user in Postgres, so nothing
/// was ever reserved; a reservation needs the sentinel) is simply written; an
/// absent sentinel anywhere else means Redis lost its data: a recovery starts.
pub async fn prepare(store: &CreditStore) -> anyhow::Result<()> {
    let mut conn = store.redis().await?;
    let (global, recovering): (bool, Option<String>) = redis::pipe()
        .exists(store.keys.sentinel())
        .get(store.keys.recovery())
        .query_async(&mut *conn)
        .await?;
    if recovering.is_some() {
        store.recovery.set(true);
        return Ok(());
    }
    if global {
        return Ok(());
    }
    // Postgres unreachable: assume data existed (the safe side).
    let fresh: bool = sqlx::query_scalar("select not exists (select 1 from users)")
        .fetch_one(&store.pg)
        .await
        .unwrap_or(false);
    if fresh {
        write_sentinels(&mut conn, &store.keys, true).await?;
        tracing::info!("empty deployment: credit sentinels written");
    } else {
        store.recovery.enter(store).await;
    }
    Ok(())
}

/// Writes every slot's sentinel, then the global one (last, so the watcher
/// sees a finished write).
async fn write_sentinels(
    conn: &mut crate::redis_link::LinkConn,
    keys: &Keys,
    only_if_absent: bool,
) -> anyhow::Result<()> {
    let epoch = uuid::Uuid::new_v4().to_string();
    let mut pipe = redis::pipe();
    for slot in 0..SLOTS {
        let mut cmd = redis::cmd("SET");
        cmd.arg(keys.slot_sentinel_for(slot)).arg(&epoch);
        if only_if_absent {
            cmd.arg("NX");
        }
        pipe.add_command(cmd).ignore();
    }
    pipe.query_async::<()>(&mut **conn).await?;
    let mut cmd = redis::cmd("SET");
    cmd.arg(keys.sentinel()).arg(&epoch);
    if only_if_absent {
        cmd.arg("NX");
    }
    cmd.query_async::<Option<String>>(&mut **conn).await?;
    Ok(())
}

/// Where the queue-and-consumers check stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every live consumer has been idle since before `t_a`, long enough.
    Settled,
    /// Not yet known; look again.
    Wait,
    /// A consumer worked after `t_a`: observe the queue empty again.
    Restart,
}

/// Step 3 of the module docs: the one rule of
/// [`common::consumers::consumers_settled`] with `t_a` as its time. A busy beat,
/// even one from before `t_a + IN_TRANSIT_MS`, starts the observation over
/// ([`EarlyBusy::No`]; the reconciler instead waits for a newer beat).
pub fn consumers_settled_since(t_a: i64, now: i64, beats: &HashMap<String, String>) -> Verdict {
    match consumers_settled(t_a, now, beats, EarlyBusy::No) {
        Settled::Yes => Verdict::Settled,
        Settled::Wait => Verdict::Wait,
        Settled::No => Verdict::Restart,
    }
}

/// The recovery's start from the recovery key's value.
pub fn parse_started(v: &str) -> Option<i64> {
    v.strip_prefix("completing:").unwrap_or(v).parse().ok()
}

/// What the watcher needs beside the credit store: where the credits queue is
/// (its depth says whether events from before a loss are still unsettled)
/// and how long publishes may still be in flight.
#[derive(Clone)]
pub struct WatchConfig {
    pub credits: CreditStore,
    pub amqp_url: String,
    pub credits_queue: String,
    /// `credits.recovery_grace_ms`, added to the confirm timeout.
    pub grace_ms: u64,
}

/// Watches the sentinel and drives recoveries to completion, until shutdown.
pub async fn watch(state: WatchConfig, shutdown: CancellationToken) {
    let mut w = Watcher::default();
    loop {
        let every = if state.credits.recovery.is_active() {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = w.step(&state).await {
            tracing::debug!(error = %e, "credit recovery check failed; retrying");
            w.amqp = None;
        }
    }
}

#[derive(Default)]
struct Watcher {
    /// When the credits queue was first seen empty past the confirm window.
    t_a: Option<i64>,
    /// A connection for passive queue declares, kept while recovering.
    amqp: Option<(lapin::Connection, lapin::Channel)>,
}

impl Watcher {
    async fn step(&mut self, state: &WatchConfig) -> anyhow::Result<()> {
        let store = &state.credits;
        let mut conn = store.redis().await?;
        let (global, recovering): (bool, Option<String>) = redis::pipe()
            .exists(store.keys.sentinel())
            .get(store.keys.recovery())
            .query_async(&mut *conn)
            .await?;
        if global && recovering.is_none() {
            store.recovery.set(false);
            self.t_a = None;
            self.amqp = None;
            return Ok(());
        }
        let Some(value) = recovering else {
            // No sentinel and no recovery: a start-up that did not finish
            // its check, or a loss. `prepare` tells them apart.
            return prepare(store).await;
        };
        store.recovery.set(true);
        let started = parse_started(&value)
            .ok_or_else(|| anyhow::anyhow!("unreadable recovery key {value:?}"))?;
        let now = redis_now(&mut conn).await?;
        let window = (store.limits.confirm_timeout_ms + state.grace_ms) as i64;
        if now < started + window {
            self.t_a = None;
            return Ok(());
        }
        if self.queue_ready(state).await? > 0 {
            self.t_a = None;
            return Ok(());
        }
        let Some(t_a) = self.t_a else {
            self.t_a = Some(now);
            return Ok(());
        };
        let beats: HashMap<String, String> = conn.hgetall(store.keys.credit_consumers()).await?;
        match consumers_settled_since(t_a, now, &beats) {
            Verdict::Wait => return Ok(()),
            Verdict::Restart => {
                self.t_a = None;
                return Ok(());
            }
            Verdict::Settled => {}
        }
        let claimed: i64 = scripts()
            .recovery_claim
            .key(store.keys.recovery())
            .arg(started.to_string())
            .invoke_async(&mut *conn)
            .await?;
        if claimed == 1 {
            write_sentinels(&mut conn, &store.keys, false).await?;
            let _: () = conn.del(store.keys.recovery()).await?;
            metrics::counter!("credit_recoveries_total").increment(1);
            tracing::info!(
                waited_ms = now - started,
                "credit recovery complete: balances load from the ledger again"
            );
        }
        store.recovery.set(false);
        self.t_a = None;
        self.amqp = None;
        Ok(())
    }

    /// Ready messages in the credits queue.
    async fn queue_ready(&mut self, state: &WatchConfig) -> anyhow::Result<u32> {
        if self
            .amqp
            .as_ref()
            .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
        {
            let conn = tokio::time::timeout(
                Duration::from_secs(5),
                common::amqp::connect(&state.amqp_url),
            )
            .await??;
            let ch = conn.create_channel().await?;
            self.amqp = Some((conn, ch));
        }
        let (_, ch) = self.amqp.as_ref().expect("connected above");
        let q = ch
            .queue_declare(
                &state.credits_queue,
                // Passive: only asks; never creates or changes the queue.
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count())
    }
}

/// Redis's clock in milliseconds (the clock the scripts and heartbeats use).
async fn redis_now(conn: &mut crate::redis_link::LinkConn) -> anyhow::Result<i64> {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut **conn).await?;
    Ok(secs * 1000 + micros / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beats(v: &[&str]) -> HashMap<String, String> {
        v.iter()
            .enumerate()
            .map(|(i, b)| (format!("c{i}"), b.to_string()))
            .collect()
    }

    #[test]
    fn no_consumers_means_settled() {
        assert_eq!(
            consumers_settled_since(1000, 5000, &beats(&[])),
            Verdict::Settled
        );
    }

    #[test]
    fn consumers_must_stay_idle_from_before_t_a_until_past_the_transit_bound() {
        let t_a = 10_000;
        // Idle since before t_a, but the last beat is too soon after it.
        assert_eq!(
            consumers_settled_since(t_a, 10_500, &beats(&["0:9000:10400"])),
            Verdict::Wait
        );
        assert_eq!(
            consumers_settled_since(t_a, 11_100, &beats(&["0:9000:11050"])),
            Verdict::Settled
        );
        // Busy, or it settled something after t_a: start over.
        assert_eq!(
            consumers_settled_since(t_a, 11_100, &beats(&["3:9000:11050"])),
            Verdict::Restart
        );
        assert_eq!(
            consumers_settled_since(t_a, 11_100, &beats(&["0:10200:11050"])),
            Verdict::Restart
        );
        // A dead consumer's last beat is ignored; garbage too.
        assert_eq!(
            consumers_settled_since(
                t_a,
                20_000,
                &beats(&["5:9000:12000", "0:9000:19900", "junk"])
            ),
            Verdict::Settled
        );
    }

    #[test]
    fn the_start_reads_through_a_claim() {
        assert_eq!(parse_started("1700000000000"), Some(1_700_000_000_000));
        assert_eq!(parse_started("completing:17"), Some(17));
        assert_eq!(parse_started("x"), None);
    }
}
