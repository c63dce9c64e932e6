//! The credit jobs of SPEC §5.5b and §8, each run by one worker at a time
//! (advisory lock, see `schedule`):
//!
//! - **Hold expiry**: holds still open in Postgres past `expires_at` plus a
//!   grace are released in Redis (if Redis still holds them; the script decides
//!   once) and marked `expired` in Postgres. Gateways release expired holds
//!   lazily first and publish the event; this job covers users nobody calls and
//!   events that were never published, so no credit is ever stuck.
//! - **Reconciler**: for every user whose credits Redis holds, pending entries
//!   already in the ledger leave `pending` (the worker's HDEL was lost);
//!   entries older than the confirm timeout plus `stale_reservation_secs` with
//!   no ledger row are given back once no credit event can still be on its
//!   way (their event never reached the broker: a gateway died, or a publish
//!   timed out without reaching it): the queue has no ready message and no
//!   live credits consumer holds one (see [`release_verdict`]); then, with nothing pending and Redis's `held` equal
//!   to Postgres's open holds, `bal` must be `ledger − held`, and is repaired
//!   when it is not (counted in `credit_reconcile_repairs_total`). The repair is
//!   conditional on nothing having moved since the snapshot (`ver`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::credits::{parse_pending, scripts, Heartbeat, Reply, UserKeys};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use uuid::Uuid;

use crate::startup::Ctx;

/// A balance the reconciler corrected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub user_id: String,
    /// Redis's `bal` before.
    pub from: i64,
    /// `ledger − held`, what it is now.
    pub to: i64,
}

/// What one reconciler pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub users: usize,
    pub repairs: Vec<Repair>,
}

/// The reconciler's view of one user's Redis state.
#[derive(Debug, Clone)]
struct Snapshot {
    bal: i64,
    held: i64,
    ver: String,
    now_ms: i64,
    /// (transaction id, amount, reserved_at_ms)
    pending: Vec<(String, i64, i64)>,
}

fn ttl_ms(ctx: &Ctx) -> u64 {
    ctx.settings.credits.idempotency_ttl_secs * 1000
}

async fn call(ctx: &Ctx, inv: redis::ScriptInvocation<'_>) -> anyhow::Result<Reply> {
    let mut conn = ctx.redis.get().await?;
    let raw: Vec<String> = inv.invoke_async(&mut *conn).await?;
    Ok(Reply::parse(raw)?)
}

async fn snapshot(ctx: &Ctx, keys: &UserKeys) -> anyhow::Result<Option<Snapshot>> {
    let r = call(ctx, keys.invoke(&scripts().snapshot, ttl_ms(ctx))).await?;
    if r.tag != "OK" {
        return Ok(None);
    }
    let mut pending = Vec::new();
    for pair in r.fields.get(4..).unwrap_or_default().chunks(2) {
        if let [id, v] = pair {
            // An unreadable entry counts as 1 credit reserved at 0: it is stale
            // and has no ledger row, so it is released.
            let (amount, at) = parse_pending(v).unwrap_or((0, 0));
            pending.push((id.clone(), amount, at));
        }
    }
    Ok(Some(Snapshot {
        bal: r.int(0)?,
        held: r.int(1)?,
        ver: r.str(2)?.to_string(),
        now_ms: r.int(3)?,
        pending,
    }))
}

/// Which of these transaction ids the ledger holds.
async fn in_ledger(ctx: &Ctx, ids: &[String]) -> anyhow::Result<HashSet<String>> {
    let uuids: Vec<Uuid> = ids.iter().filter_map(|i| i.parse().ok()).collect();
    let found: Vec<Uuid> =
        sqlx::query_scalar("select id from credit_transactions where id = any($1)")
            .bind(&uuids)
            .fetch_all(&ctx.pg)
            .await?;
    Ok(found.into_iter().map(|u| u.to_string()).collect())
}

/// Ready messages in the credits queue (passive declare on a short-lived
/// connection: the reconciler needs it rarely).
pub async fn credits_queue_ready(ctx: &Ctx) -> anyhow::Result<u32> {
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        common::topology::connect(&ctx.settings.amqp.url),
    )
    .await??;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            &ctx.topology.queue("credits"),
            // Passive: only asks; never creates or changes the queue.
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = conn.close(200, "done").await;
    Ok(q?.message_count())
}

/// A credits consumer's heartbeat older than this belongs to a dead process,
/// whose unacked deliveries the broker has returned to the queue (the bound
/// of the gateway's recovery after a Redis loss, docs/credits.md).
pub const DEAD_AFTER_MS: i64 = 5_000;
/// Upper bound on a delivery's way from the broker to its consumer.
pub const IN_TRANSIT_MS: i64 = 1_000;
/// How long one release waits for the consumers' heartbeats to pass
/// `t_q + IN_TRANSIT_MS` before it leaves the reservations to the next pass.
const RELEASE_WAIT: Duration = Duration::from_secs(3);

/// Whether stale reservations may be given back, after the credits queue
/// was seen with no ready message at `t_q` (Redis's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// No event can still be on its way: give them back.
    Allowed,
    /// Not known yet: a live consumer's last beat is too close to `t_q`.
    Wait,
    /// A consumer holds deliveries, or took or settled one after `t_q`:
    /// leave the reservations to a later pass.
    Held,
}

/// The decision of SPEC §9.2 ("never while its event is still held unacked
/// by a worker"), as a plain function over the consumers' heartbeats
/// ("unacked:idle_since_ms:beat_ms", Redis's clock). With no ready message at
/// `t_q`, every event that left the queue before is in some consumer's hands
/// by `t_q + IN_TRANSIT_MS`. So the release waits until every live consumer
/// (a beat newer than [`DEAD_AFTER_MS`]) has beaten past that time and
/// reports no unacked delivery and nothing taken or settled since `t_q`.
/// During a Postgres outage a worker keeps its batch unacked, so the queue
/// shows nothing ready while the events are alive: its beat says so. A dead
/// consumer's beat is ignored (the broker returned its deliveries to the
/// queue), and so is an unreadable one (no consumer writes one). The same
/// rule as the gateway's recovery (`consumers_settled_since`).
///
/// A beat from before `t_q + IN_TRANSIT_MS` decides nothing, whatever it says
/// (a consumer beats every 250 ms, so its last beat may predate an ack it has
/// since sent): the release waits for a newer one.
pub fn release_verdict(t_q: i64, now: i64, beats: &HashMap<String, String>) -> Release {
    let mut verdict = Release::Allowed;
    for hb in beats.values().filter_map(|v| Heartbeat::parse(v)) {
        if hb.beat_ms < now - DEAD_AFTER_MS {
            continue;
        }
        if hb.beat_ms < t_q + IN_TRANSIT_MS {
            verdict = Release::Wait;
        } else if hb.unacked > 0 || hb.idle_since_ms > t_q {
            return Release::Held;
        }
    }
    verdict
}

/// Redis's clock (ms) and the credits consumers' heartbeats.
async fn consumer_beats(ctx: &Ctx) -> anyhow::Result<(i64, HashMap<String, String>)> {
    let mut conn = ctx.redis.get().await?;
    let ((secs, micros), beats): ((i64, i64), HashMap<String, String>) = redis::pipe()
        .cmd("TIME")
        .hgetall(ctx.keys.credit_consumers())
        .query_async(&mut *conn)
        .await?;
    Ok((secs * 1000 + micros / 1000, beats))
}

/// Whether stale reservations may be given back now: the credits queue has
/// no ready message, and then [`release_verdict`] allows it (waiting up to
/// [`RELEASE_WAIT`] for the heartbeats).
pub async fn release_allowed(ctx: &Ctx) -> anyhow::Result<bool> {
    if credits_queue_ready(ctx).await? > 0 {
        return Ok(false);
    }
    // Read after the queue answered: t_q is no earlier than the check.
    let (t_q, _) = consumer_beats(ctx).await?;
    let until = tokio::time::Instant::now() + RELEASE_WAIT;
    loop {
        let (now, beats) = consumer_beats(ctx).await?;
        match release_verdict(t_q, now, &beats) {
            Release::Allowed => return Ok(true),
            Release::Held => {
                tracing::info!("stale reservations kept: a credits consumer holds deliveries");
                return Ok(false);
            }
            Release::Wait if tokio::time::Instant::now() >= until => return Ok(false),
            Release::Wait => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Compares one user's Redis balance with the ledger and repairs drift.
#[tracing::instrument(skip(ctx))]
pub async fn reconcile_user(ctx: &Ctx, user_id: &str) -> anyhow::Result<Option<Repair>> {
    let keys = UserKeys::new(&ctx.keys, user_id);
    let ttl = ttl_ms(ctx);
    let Some(mut snap) = snapshot(ctx, &keys).await? else {
        return Ok(None);
    };
    if !snap.pending.is_empty() {
        let ids: Vec<String> = snap.pending.iter().map(|p| p.0.clone()).collect();
        let settled = in_ledger(ctx, &ids).await?;
        if !settled.is_empty() {
            let mut inv = keys.invoke(&scripts().drop_settled, ttl);
            for id in &settled {
                inv.arg(id);
            }
            let r = call(ctx, inv).await?;
            tracing::info!(
                dropped = r.int(0).unwrap_or(0),
                "settled reservations left pending"
            );
        }
        let max_age = (ctx.settings.amqp.confirm_timeout_ms
            + ctx.settings.credits.stale_reservation_secs * 1000) as i64;
        let stale: Vec<String> = snap
            .pending
            .iter()
            .filter(|(id, _, at)| !settled.contains(id) && *at <= snap.now_ms - max_age)
            .map(|p| p.0.clone())
            .collect();
        // Only with the queue drained and no consumer holding a delivery: an
        // event waiting in it (workers down or behind) or held unacked by a
        // worker (Postgres was down) must settle its reservation, not find it
        // released.
        if !stale.is_empty() && release_allowed(ctx).await? {
            // Look again right before: a worker may have settled one meanwhile.
            let late = in_ledger(ctx, &stale).await?;
            let mut inv = keys.invoke(&scripts().release_stale, ttl);
            inv.arg(max_age);
            for id in stale.iter().filter(|id| !late.contains(*id)) {
                inv.arg(id);
            }
            let r = call(ctx, inv).await?;
            let n = r.int(0).unwrap_or(0);
            if n > 0 {
                metrics::counter!("credit_reservations_released_total").increment(n as u64);
                tracing::warn!(
                    released = n,
                    "stale reservations without an event given back"
                );
            }
        }
        match snapshot(ctx, &keys).await? {
            Some(s) if s.pending.is_empty() => snap = s,
            _ => return Ok(None),
        }
    }
    let row: Option<(i64, i64, Vec<Uuid>)> = sqlx::query_as(
        "select u.credits_balance, \
                coalesce((select sum(amount) from credit_holds h where h.user_id = u.id and h.status = 'open'), 0)::bigint, \
                array(select t.id from credit_transactions t where t.user_id = u.id and t.kind = 'grant' \
                      and t.created_at > now() - make_interval(secs => $2) order by t.created_at desc limit 1000) \
         from users u where u.id = $1",
    )
    .bind(user_id)
    .bind((ttl / 1000 + 3600) as f64)
    .fetch_optional(&ctx.pg)
    .await?;
    let Some((ledger, open_held, grants)) = row else {
        return Ok(None);
    };
    // Holds still travelling (opened or ended in Redis, not yet in Postgres):
    // the figures are not comparable yet.
    if open_held != snap.held {
        return Ok(None);
    }
    let expected = ledger - snap.held;
    if expected == snap.bal {
        return Ok(None);
    }
    let mut inv = keys.invoke(&scripts().repair, ttl);
    inv.key(ctx.keys.grants_applied(user_id))
        .arg(&snap.ver)
        .arg(snap.held)
        .arg(expected)
        .arg(ttl + 3_600_000);
    for g in &grants {
        inv.arg(g.to_string());
    }
    let r = call(ctx, inv).await?;
    if r.tag != "REPAIRED" {
        return Ok(None);
    }
    let repair = Repair {
        user_id: user_id.to_string(),
        from: r.int(0)?,
        to: expected,
    };
    metrics::counter!("credit_reconcile_repairs_total").increment(1);
    tracing::warn!(
        from = repair.from,
        to = repair.to,
        "credit balance repaired from the ledger"
    );
    Ok(Some(repair))
}

/// Reconciles every user whose credits Redis holds (SCAN of the key prefix;
/// on Redis Cluster this would run per node).
pub async fn reconcile_all(ctx: &Ctx) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let pattern = ctx.keys.credits_pattern();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = {
            let mut conn = ctx.redis.get().await?;
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut *conn)
                .await?
        };
        for key in &keys {
            let Some(user) = ctx.keys.user_of_credits_key(key) else {
                continue;
            };
            summary.users += 1;
            match reconcile_user(ctx, user).await {
                Ok(Some(r)) => summary.repairs.push(r),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, user_id = user, "reconcile failed for one user")
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(summary)
}

/// Expires holds still open in Postgres past `expires_at` plus the grace.
/// Returns how many were marked.
pub async fn expire_holds(ctx: &Ctx) -> anyhow::Result<usize> {
    let grace = ctx.settings.credits.hold_expiry_grace_secs as f64;
    let due: Vec<(Uuid, String)> = sqlx::query_as(
        "select id, user_id from credit_holds \
         where status = 'open' and expires_at < now() - make_interval(secs => $1) \
         order by expires_at limit 1000",
    )
    .bind(grace)
    .fetch_all(&ctx.pg)
    .await?;
    let mut marked = 0;
    for (hold_id, user_id) in due {
        let keys = UserKeys::new(&ctx.keys, &user_id);
        let mut inv = keys.invoke(&scripts().expire_hold, ttl_ms(ctx));
        inv.arg(hold_id.to_string());
        let r = call(ctx, inv).await?;
        match r.tag.as_str() {
            // Redis's clock is behind Postgres's: next run.
            "NOT_DUE" => continue,
            "RELEASED" => {
                metrics::counter!("credit_holds_expired_total", "by" => "worker")
                    .increment(r.expired.len() as u64);
                for h in &r.expired {
                    let Ok(id) = h.hold_id.parse::<Uuid>() else {
                        continue;
                    };
                    // Upsert: a hold of this user whose open event has not landed
                    // yet gets its row in its final state (the late open is a no-op).
                    marked += sqlx::query(
                        "insert into credit_holds (id, user_id, amount, status, expires_at, ended_at) \
                         values ($1, $2, $3, 'expired', now(), now()) \
                         on conflict (id) do update set \
                           status = case when credit_holds.status = 'open' then 'expired' else credit_holds.status end, \
                           ended_at = coalesce(credit_holds.ended_at, now())",
                    )
                    .bind(id)
                    .bind(&user_id)
                    .bind(h.amount.max(1))
                    .execute(&ctx.pg)
                    .await?
                    .rows_affected() as usize;
                }
            }
            // Not in Redis (already ended there, or the user is not loaded, or
            // a recovery runs and will load from Postgres): Postgres only.
            _ => {
                marked += sqlx::query(
                    "update credit_holds set status = 'expired', ended_at = now() \
                     where id = $1 and status = 'open'",
                )
                .bind(hold_id)
                .execute(&ctx.pg)
                .await?
                .rows_affected() as usize;
            }
        }
    }
    Ok(marked)
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
    fn no_consumers_allows_the_release() {
        assert_eq!(
            release_verdict(10_000, 10_000, &beats(&[])),
            Release::Allowed
        );
    }

    #[test]
    fn a_live_consumer_holding_deliveries_keeps_the_reservations() {
        let t_q = 100_000;
        // Held unacked (Postgres down): the queue shows nothing ready.
        assert_eq!(
            release_verdict(t_q, 101_500, &beats(&["3:50000:101400"])),
            Release::Held
        );
        // One busy consumer among idle ones is enough.
        assert_eq!(
            release_verdict(t_q, 101_500, &beats(&["0:50000:101400", "1:99000:101450"])),
            Release::Held
        );
        // Idle since before t_q, beaten past the transit bound: allowed.
        assert_eq!(
            release_verdict(t_q, 101_500, &beats(&["0:50000:101400"])),
            Release::Allowed
        );
    }

    #[test]
    fn a_beat_too_close_to_the_queue_check_is_waited_for() {
        let t_q = 100_000;
        assert_eq!(
            release_verdict(t_q, 100_500, &beats(&["0:50000:100400"])),
            Release::Wait
        );
        // Busy in a beat from before the bound: it may have acked since.
        assert_eq!(
            release_verdict(t_q, 100_500, &beats(&["2:99000:100400"])),
            Release::Wait
        );
        // It took or settled something after t_q: a delivery from before may
        // have been in its buffer.
        assert_eq!(
            release_verdict(t_q, 101_500, &beats(&["0:100200:101400"])),
            Release::Held
        );
    }

    #[test]
    fn dead_consumers_and_garbage_are_ignored() {
        let t_q = 100_000;
        assert_eq!(
            release_verdict(
                t_q,
                110_000,
                &beats(&["7:50000:104000", "junk", "0:50000:109900"])
            ),
            Release::Allowed
        );
        // Exactly at the bound it still counts as live.
        assert_eq!(
            release_verdict(t_q, 110_000, &beats(&["7:50000:105000"])),
            Release::Held
        );
    }
}
