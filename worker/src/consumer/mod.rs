//! One consumer per queue: decode → handle (one Postgres transaction per
//! batch) → ack (multiple) after commit.
//!
//! - Prefetch in the thousands and batches of up to `worker.batch_size`, so
//!   Postgres sees a few large statements instead of many small ones.
//! - Postgres unavailable: the batch stays unacked and is retried with backoff
//!   until Postgres answers (never dead-lettered for that).
//! - A message that cannot be decoded is rejected without requeue and so
//!   dead-lettered; the rest of its batch lands.
//! - One member never fails a group (docs/events.md): every message is checked and
//!   cleaned first (`handlers::sanitize`): a usage event that cannot be stored
//!   leaves its group, and a consume or settle is charged without the fields
//!   that cannot be stored. If Postgres still refuses the batch, it is
//!   bisected down to the refused message, a refused group down to its
//!   refused member (a money event is retried once without its free text),
//!   and only that one is dead-lettered, as a message of its own with the
//!   reason (published with confirms to the dead-letter exchange before the
//!   original is acked); everything else commits in the same `process` call.
//! - The broker gone: unacked deliveries return to the queue; we reconnect.
//! - The credits consumer reports what it holds in a heartbeat (see [`Probe`]),
//!   which a recovery after a Redis data loss reads (docs/credits.md).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::events::Envelope;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ctx::Ctx;
use crate::handlers::sanitize;
use crate::handlers::{self, Effects};

pub mod batch;
pub mod disposition;

use disposition::{push_halves, Disposition};

/// Headers of a dead letter this consumer published itself (no `x-death`):
/// why, from which queue, and the id of the message it was a member of.
pub const DEAD_REASON_HEADER: &str = "x-dead-reason";
pub const DEAD_QUEUE_HEADER: &str = "x-dead-queue";
pub const DEAD_FROM_HEADER: &str = "x-dead-from";

/// What one step of a consumer did (tests drive the worker step by step).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub delivered: usize,
    pub stored: usize,
    pub dead_lettered: usize,
}

pub struct QueueConsumer {
    ctx: Ctx,
    queue: String,
    /// Keeps the connection alive as long as the consumer.
    _conn: lapin::Connection,
    channel: Channel,
    /// Publishes refused members to the dead-letter exchange, with confirms
    /// (a channel of its own: confirm mode is per channel).
    dead: Channel,
    consumer: Consumer,
    /// What this consumer holds; only the credits queue reports it.
    probe: Option<Arc<Probe>>,
    /// Stops the probe's heartbeat (and removes it) when the consumer drops.
    _beat: Option<tokio_util::sync::DropGuard>,
}

/// Deliveries a consumer has taken and not yet settled (acked or rejected),
/// and since when that count last changed. A heartbeat task copies it into
/// Redis every `BEAT`, on Redis's clock: "unacked:idle_since_ms:beat_ms".
#[derive(Debug)]
pub struct Probe {
    state: Mutex<(usize, Instant)>,
}

const BEAT: Duration = Duration::from_millis(250);

impl Probe {
    fn new() -> Self {
        Self {
            state: Mutex::new((0, Instant::now())),
        }
    }

    fn set(&self, unacked: usize) {
        *self.state.lock().expect("probe lock") = (unacked, Instant::now());
    }

    fn read(&self) -> (usize, u64) {
        let (n, at) = *self.state.lock().expect("probe lock");
        (n, at.elapsed().as_millis() as u64)
    }
}

/// How long a credits consumer goes on without a heartbeat reaching Redis
/// before it fences itself: it stops and closes its channel, so the broker
/// takes back what it holds. Below the reconciler's and the recovery's
/// `DEAD_AFTER_MS` (5 s), past which they treat a silent consumer as dead
/// and its deliveries as returned to the queue: by then they are.
const FENCE_AFTER: Duration = Duration::from_millis(2500);

/// One heartbeat; `Err` when it did not reach Redis.
async fn beat_once(
    ctx: &Ctx,
    key: &str,
    tag: &str,
    probe: &Probe,
    remove: bool,
) -> anyhow::Result<()> {
    let (unacked, idle_ms) = probe.read();
    let mut conn = ctx.redis.get().await?;
    let _: i64 = common::redis::scripts::scripts()
        .heartbeat
        .key(key)
        .arg(tag)
        .arg(unacked)
        .arg(idle_ms)
        .arg(if remove { "1" } else { "0" })
        .invoke_async(&mut *conn)
        .await?;
    Ok(())
}

async fn heartbeat(
    ctx: Ctx,
    tag: String,
    probe: Arc<Probe>,
    stop: CancellationToken,
    fence: CancellationToken,
) {
    let key = ctx.keys.credit_consumers();
    let mut last_ok = Instant::now();
    loop {
        let remove = stop.is_cancelled();
        match beat_once(&ctx, &key, &tag, &probe, remove).await {
            Ok(()) => last_ok = Instant::now(),
            Err(e) => {
                tracing::debug!(error = %e, "credits consumer heartbeat failed");
                if last_ok.elapsed() >= FENCE_AFTER && !fence.is_cancelled() {
                    tracing::warn!("credits consumer fenced: its heartbeat has not reached Redis for {FENCE_AFTER:?}");
                    metrics::counter!("worker_consumer_fenced_total").increment(1);
                    fence.cancel();
                }
            }
        }
        if remove {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
}

impl QueueConsumer {
    /// Connects, declares the topology and starts consuming `short` (e.g. "usage").
    /// `fence` is cancelled when a credits consumer must stop (see
    /// [`FENCE_AFTER`]); pass a child of the shutdown token.
    pub async fn connect(ctx: Ctx, short: &str, fence: CancellationToken) -> anyhow::Result<Self> {
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            common::amqp::connect::connect(&ctx.settings.amqp.url),
        )
        .await??;
        let channel = conn.create_channel().await?;
        ctx.topology.declare(&channel).await?;
        let dead = conn.create_channel().await?;
        dead.confirm_select(ConfirmSelectOptions::default()).await?;
        // Prefetch bounds unacked messages per consumer: large enough to fill a
        // batch, small enough that a crash redelivers a bounded amount.
        let prefetch = if short == "usage" {
            ctx.settings.worker.usage_prefetch
        } else {
            ctx.settings.worker.prefetch
        };
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let queue = ctx.topology.queue(short);
        let tag = format!("worker-{}-{}", std::process::id(), uuid::Uuid::new_v4());
        let probe = (short == "credits").then(|| Arc::new(Probe::new()));
        if let Some(p) = &probe {
            // Seen before it takes anything: a credits consumer that Redis
            // does not know of would hold events nobody accounts for.
            beat_once(&ctx, &ctx.keys.credit_consumers(), &tag, p, false).await?;
        }
        let consumer = channel
            .basic_consume(
                &queue,
                &tag,
                // Manual acks: a message is settled only after its commit.
                BasicConsumeOptions {
                    no_ack: false,
                    exclusive: false,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let beat = probe.as_ref().map(|p| {
            let stop = CancellationToken::new();
            tokio::spawn(heartbeat(ctx.clone(), tag, p.clone(), stop.clone(), fence));
            stop.drop_guard()
        });
        Ok(Self {
            ctx,
            queue,
            _conn: conn,
            channel,
            dead,
            consumer,
            probe,
            _beat: beat,
        })
    }

    fn probe_set(&self, unacked: usize) {
        if let Some(p) = &self.probe {
            p.set(unacked);
        }
    }

    /// Waits for the next batch: the first delivery, then whatever follows
    /// until the batch closes (see [`batch`]: size, bytes, wait, idle gap).
    /// `None` when the stream ended (broker gone) or shutdown was requested
    /// before anything arrived.
    pub async fn next_batch(&mut self, shutdown: &CancellationToken) -> Option<Vec<Delivery>> {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return None,
            d = self.consumer.next() => d?.ok()?,
        };
        self.probe_set(1);
        let limits = batch::Limits::from_settings(&self.ctx.settings.worker);
        let (batch, _) = batch::gather(first, &mut self.consumer, &limits, |d| d.data.len()).await;
        self.probe_set(batch.len());
        Some(batch)
    }

    /// Handles one batch to the end: checks and cleans it, stores it
    /// (retrying while Postgres is down, isolating what Postgres refuses),
    /// dead-letters what cannot be stored, then acks.
    pub async fn process(
        &self,
        batch: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Outcome> {
        let mut outcome = Outcome {
            delivered: batch.len(),
            ..Default::default()
        };
        let mut units: Vec<Unit> = Vec::with_capacity(batch.len());
        let mut dead: Vec<Dead> = Vec::new();
        let mut settled: HashSet<u64> = HashSet::new();
        for d in &batch {
            match Envelope::from_bytes(&d.data) {
                Ok(env) => {
                    let from = env.id;
                    let prepared = sanitize::prepare(env);
                    for r in prepared.refused {
                        tracing::warn!(queue = %self.queue, id = %r.env.id, from = %from, reason = %r.reason, "member cannot be stored; dead-lettered alone");
                        dead.push(Dead {
                            env: r.env,
                            reason: r.reason,
                            from,
                        });
                    }
                    if let Some(env) = prepared.clean {
                        units.push(Unit {
                            env,
                            unstripped: None,
                            from,
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "poison message dead-lettered");
                    self.reject(d.delivery_tag).await?;
                    settled.insert(d.delivery_tag);
                    outcome.dead_lettered += 1;
                }
            }
        }
        let effects = self.land(units, &mut dead, shutdown).await?;
        // Before the ack: a dead letter lost in a crash is published again
        // when the original is redelivered.
        for d in &dead {
            self.dead_letter(d).await?;
        }
        outcome.dead_lettered += dead.len();
        outcome.stored = effects.stored;
        // Ack up to the last delivery not already rejected: acking a settled tag
        // is a channel error.
        let last_tag = batch
            .iter()
            .map(|d| d.delivery_tag)
            .filter(|t| !settled.contains(t))
            .max()
            .unwrap_or(0);
        if last_tag > 0 {
            // Multiple: one ack settles the whole batch (rejected ones are already settled).
            self.channel
                .basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await?;
        }
        metrics::histogram!("worker_batch_messages", "queue" => self.queue.clone())
            .record(outcome.delivered as f64);
        metrics::counter!("worker_events_stored_total", "queue" => self.queue.clone())
            .increment(outcome.stored as u64);
        handlers::after_commit(&self.ctx, effects).await;
        // Idle only once the follow-ups are done: until then the next
        // deliveries wait in lapin's buffer, unseen by the queue's count.
        self.probe_set(0);
        Ok(outcome)
    }

    /// Stores the units, all in one transaction when Postgres takes them.
    /// When it refuses, the set is bisected (each half its own transaction)
    /// down to the refused unit, whose next step [`disposition::disposition`]
    /// decides: its members, a retry without free text, or a dead letter
    /// (pushed to `dead`). Returns the effects of every commit.
    async fn land(
        &self,
        units: Vec<Unit>,
        dead: &mut Vec<Dead>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Effects> {
        let mut effects = Effects::default();
        // A stack of groups, each tried in one transaction; the first half of
        // a split is pushed last, so groups commit in arrival order.
        let mut todo: Vec<Vec<Unit>> = vec![units];
        while let Some(group) = todo.pop() {
            if group.is_empty() {
                continue;
            }
            let envs: Vec<&Envelope> = group.iter().map(|u| &u.env).collect();
            let err = match self.store(&envs, shutdown).await? {
                Ok(e) => {
                    effects.merge(e);
                    continue;
                }
                Err(err) => err,
            };
            if group.len() > 1 {
                tracing::info!(queue = %self.queue, error = %err, units = group.len(), "Postgres refused part of a batch; bisecting");
                push_halves(&mut todo, group);
                continue;
            }
            let unit = group.into_iter().next().expect("a group of one");
            match disposition::disposition(&unit.env, unit.unstripped.is_some()) {
                Disposition::Split(members) => {
                    tracing::info!(queue = %self.queue, error = %err, id = %unit.env.id, members = members.len(), "Postgres refused a group; storing its members alone");
                    let from = unit.from;
                    push_halves(
                        &mut todo,
                        members
                            .into_iter()
                            .map(|env| Unit {
                                env,
                                unstripped: None,
                                from,
                            })
                            .collect(),
                    );
                }
                Disposition::Retry(stripped) => {
                    tracing::warn!(queue = %self.queue, error = %err, id = %unit.env.id, "Postgres refused a money event; charging it without its free text");
                    todo.push(vec![Unit {
                        env: *stripped,
                        unstripped: Some(unit.env),
                        from: unit.from,
                    }]);
                }
                Disposition::DeadLetter => {
                    let env = unit.unstripped.unwrap_or(unit.env);
                    tracing::warn!(queue = %self.queue, error = %err, id = %env.id, from = %unit.from, "refused by Postgres; dead-lettered alone");
                    dead.push(Dead {
                        env,
                        reason: format!("refused by Postgres: {err}"),
                        from: unit.from,
                    });
                }
            }
        }
        Ok(effects)
    }

    /// Publishes one dead letter (persistent, confirmed) to the dead-letter
    /// exchange, with its reason in the headers; `worker dlq` lists and
    /// replays it like any other.
    async fn dead_letter(&self, d: &Dead) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        for (k, v) in [
            (DEAD_REASON_HEADER, d.reason.clone()),
            (DEAD_QUEUE_HEADER, self.queue.clone()),
            (DEAD_FROM_HEADER, d.from.to_string()),
        ] {
            headers.insert(ShortString::from(k), AMQPValue::LongString(v.into()));
        }
        let props = BasicProperties::default()
            // Persistent: a dead letter outlives a broker restart.
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(d.env.id.to_string()))
            .with_headers(headers);
        let wait = Duration::from_millis(self.ctx.settings.amqp.confirm_timeout_ms);
        let confirm = tokio::time::timeout(wait, async {
            self.dead
                .basic_publish(
                    &self.ctx.topology.dead_letter_exchange(),
                    d.env.event.routing_key(),
                    // Mandatory: an unroutable dead letter comes back instead of vanishing.
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &d.env.to_bytes(),
                    props,
                )
                .await?
                .await
        })
        .await
        .map_err(|_| anyhow::anyhow!("no confirm for dead letter {}", d.env.id))??;
        match confirm {
            Confirmation::Ack(None) => {
                metrics::counter!("worker_dead_letters_total", "queue" => self.queue.clone())
                    .increment(1);
                Ok(())
            }
            other => anyhow::bail!(
                "the broker did not take dead letter {}: {other:?}",
                d.env.id
            ),
        }
    }

    /// One transaction for the given envelopes. Outer error: shutdown while
    /// Postgres was down (the batch stays unacked). Inner error: refused data.
    async fn store(
        &self,
        envs: &[&Envelope],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Result<Effects, sqlx::Error>> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match handlers::apply(&self.ctx, envs).await {
                Ok(effects) => return Ok(Ok(effects)),
                Err(e) if common::db::is_transient(&e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "Postgres unavailable; batch held, retrying");
                    metrics::counter!("worker_db_retries_total").increment(1);
                    tokio::select! {
                        _ = shutdown.cancelled() => anyhow::bail!("shutdown while Postgres is unavailable"),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = disposition::backoff(backoff);
                }
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    async fn reject(&self, tag: u64) -> anyhow::Result<()> {
        self.channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: false,
                },
            )
            .await?;
        Ok(())
    }
}

/// Something to store, as one message or as one member of a message.
struct Unit {
    /// What is stored (cleaned by `sanitize`).
    env: Envelope,
    /// Before the retry without free text: what a dead letter carries then.
    unstripped: Option<Envelope>,
    /// The id of the broker message it came in.
    from: Uuid,
}

/// A message or member that will not be stored, and why.
struct Dead {
    env: Envelope,
    reason: String,
    from: Uuid,
}

/// Consumes one queue until shutdown, reconnecting whenever the broker goes away.
pub async fn run(ctx: Ctx, short: String, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        // Cancelled by shutdown, or by the consumer's own fence.
        let stop = shutdown.child_token();
        let mut consumer = match QueueConsumer::connect(ctx.clone(), &short, stop.clone()).await {
            Ok(c) => {
                tracing::info!(queue = %short, "consuming");
                backoff = Duration::from_millis(200);
                c
            }
            Err(e) => {
                tracing::warn!(queue = %short, error = %e, "broker connect failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = disposition::backoff(backoff);
                continue;
            }
        };
        loop {
            let Some(batch) = consumer.next_batch(&stop).await else {
                break;
            };
            // A batch in hand is finished even when shutdown arrives meanwhile
            // (only a Postgres outage makes it give the batch back).
            if let Err(e) = consumer.process(batch, &stop).await {
                tracing::warn!(queue = %short, error = %e, "batch not acknowledged; it will be redelivered");
                break;
            }
        }
        // Closed, not just dropped: the broker returns what this connection
        // still holds to the queue at once, instead of when the socket dies.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = consumer.channel.close(200, "done").await;
            let _ = consumer.dead.close(200, "done").await;
            let _ = consumer._conn.close(200, "done").await;
        })
        .await;
        drop(consumer);
        if shutdown.is_cancelled() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
