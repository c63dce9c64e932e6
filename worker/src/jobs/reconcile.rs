//! The credit reconciler of docs/architecture.md, run by one worker at a time (advisory
//! lock, see `jobs`): for every user whose credits Redis holds, pending entries
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

use common::consumers::{consumers_settled, EarlyBusy, Settled};
use common::redis::scripts::{parse_pending, scripts, Tag, UserKeys};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use uuid::Uuid;

use super::{call, ttl_ms};
use crate::ctx::Ctx;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Redis's balance (`bal`).
    pub bal: i64,
    /// Credits in open holds (`held`).
    pub held: i64,
    /// The version a repair is conditional on (nothing moved since).
    pub ver: String,
    /// Redis's clock at the snapshot.
    pub now_ms: i64,
    /// (transaction id, amount, reserved_at_ms)
    pub pending: Vec<(String, i64, i64)>,
}

/// What to do with a user's pending reservations, given which of them the
/// ledger already holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Settled in the ledger: they leave `pending` (the worker's HDEL was lost).
    pub drop: Vec<String>,
    /// Older than `max_age_ms` with no ledger row: given back if
    /// [`release_allowed`] says no event can still be on its way, and the
    /// ledger still has no row for them right before ([`to_release`]).
    pub stale: Vec<String>,
}

/// The pending part of the plan. `max_age_ms` is the confirm timeout plus
/// `credits.stale_reservation_secs`: a reservation that old whose event never
/// reached the ledger had its event lost before the broker took it.
pub fn plan(snap: &Snapshot, in_ledger: &HashSet<String>, max_age_ms: i64) -> Plan {
    let mut plan = Plan::default();
    for (id, _, at) in &snap.pending {
        if in_ledger.contains(id) {
            plan.drop.push(id.clone());
        } else if *at <= snap.now_ms - max_age_ms {
            plan.stale.push(id.clone());
        }
    }
    plan
}

/// The stale reservations to give back once the release is allowed: those
/// the ledger still does not hold (`late`: looked up again right before, a
/// worker may have settled one meanwhile).
pub fn to_release<'a>(stale: &'a [String], late: &HashSet<String>) -> Vec<&'a str> {
    stale
        .iter()
        .filter(|id| !late.contains(*id))
        .map(String::as_str)
        .collect()
}

/// The balance Redis should hold, when it holds another: with nothing
/// pending, `bal` must be `ledger − held`. `None` when it already is, or when
/// Redis's `held` differs from Postgres's open holds (holds still travelling:
/// the figures are not comparable yet).
pub fn repair_to(snap: &Snapshot, ledger: i64, open_held: i64) -> Option<i64> {
    if !snap.pending.is_empty() || open_held != snap.held {
        return None;
    }
    let expected = ledger - snap.held;
    (expected != snap.bal).then_some(expected)
}

async fn snapshot(ctx: &Ctx, keys: &UserKeys) -> anyhow::Result<Option<Snapshot>> {
    let r = call(ctx, keys.invoke(&scripts().snapshot, ttl_ms(ctx))).await?;
    if r.kind() != Tag::Ok {
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
        common::amqp::connect::connect(&ctx.settings.amqp.url),
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

pub use common::consumers::{DEAD_AFTER_MS, IN_TRANSIT_MS};
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

/// The decision of docs/credits.md ("never while its event is still held unacked
/// by a worker"): the one rule of [`common::consumers::consumers_settled`] with `t_q`
/// as its time. During a Postgres outage a worker keeps its batch unacked, so the
/// queue shows nothing ready while the events are alive: its beat says so.
///
/// A busy beat from before `t_q + IN_TRANSIT_MS` decides nothing (a consumer beats
/// every 250 ms, so its last beat may predate an ack it has since sent): the release
/// waits for a newer one ([`EarlyBusy::Wait`]; the gateway's recovery instead starts
/// over, `consumers_settled_since`).
pub fn release_verdict(t_q: i64, now: i64, beats: &HashMap<String, String>) -> Release {
    match consumers_settled(t_q, now, beats, EarlyBusy::Wait) {
        Settled::Yes => Release::Allowed,
        Settled::Wait => Release::Wait,
        Settled::No => Release::Held,
    }
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
        let max_age = (ctx.settings.amqp.confirm_timeout_ms
            + ctx.settings.credits.stale_reservation_secs * 1000) as i64;
        let plan = plan(&snap, &settled, max_age);
        if !plan.drop.is_empty() {
            let mut inv = keys.invoke(&scripts().drop_settled, ttl);
            for id in &plan.drop {
                inv.arg(id);
            }
            let r = call(ctx, inv).await?;
            tracing::info!(
                dropped = r.int(0).unwrap_or(0),
                "settled reservations left pending"
            );
        }
        // Only with the queue drained and no consumer holding a delivery: an
        // event waiting in it (workers down or behind) or held unacked by a
        // worker (Postgres was down) must settle its reservation, not find it
        // released.
        if !plan.stale.is_empty() && release_allowed(ctx).await? {
            let late = in_ledger(ctx, &plan.stale).await?;
            let mut inv = keys.invoke(&scripts().release_stale, ttl);
            inv.arg(max_age);
            for id in to_release(&plan.stale, &late) {
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
    // A user's own balance is the ledger rows without an organization; an
    // organization's pool (`org:ORG_ID`) those with it (docs/credits.md "Organizations").
    let org = common::redis::keys::Keys::org_of_account(user_id);
    let sql = if org.is_some() {
        "select o.credits_balance, \
                coalesce((select sum(amount) from credit_holds h where h.org_id = o.id and h.status = 'open'), 0)::bigint, \
                array(select t.id from credit_transactions t where t.org_id = o.id and t.kind = 'grant' \
                      and t.created_at > now() - make_interval(secs => $2) order by t.created_at desc limit 1000) \
         from orgs o where o.id = $1"
    } else {
        "select u.credits_balance, \
                coalesce((select sum(amount) from credit_holds h where h.user_id = u.id and h.org_id is null and h.status = 'open'), 0)::bigint, \
                array(select t.id from credit_transactions t where t.user_id = u.id and t.org_id is null and t.kind = 'grant' \
                      and t.created_at > now() - make_interval(secs => $2) order by t.created_at desc limit 1000) \
         from users u where u.id = $1"
    };
    let row: Option<(i64, i64, Vec<Uuid>)> = sqlx::query_as(sql)
        .bind(org.unwrap_or(user_id))
        .bind((ttl / 1000 + 3600) as f64)
        .fetch_optional(&ctx.pg)
        .await?;
    let Some((ledger, open_held, grants)) = row else {
        return Ok(None);
    };
    let Some(expected) = repair_to(&snap, ledger, open_held) else {
        return Ok(None);
    };
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
    if r.kind() != Tag::Repaired {
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

/// Reconciles every user whose credits Redis holds (SCAN of the key prefix,
/// on Redis Cluster of every master).
pub async fn reconcile_all(ctx: &Ctx) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let pattern = ctx.keys.credits_pattern();
    let keys = {
        let mut conn = ctx.redis.get().await?;
        common::redis::scan_match(&mut conn, &pattern).await?
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
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(bal: i64, held: i64, pending: &[(&str, i64)]) -> Snapshot {
        Snapshot {
            bal,
            held,
            ver: "7".into(),
            now_ms: 1_000_000,
            pending: pending
                .iter()
                .map(|(id, at)| (id.to_string(), 1, *at))
                .collect(),
        }
    }

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn settled_reservations_are_dropped_and_old_unsettled_ones_are_stale() {
        let max_age = 35_000;
        let s = snap(
            100,
            0,
            &[
                ("settled-old", 0),
                ("old", 1_000_000 - max_age),
                ("young", 999_000),
                ("settled", 999_999),
            ],
        );
        let p = plan(&s, &set(&["settled-old", "settled"]), max_age);
        assert_eq!(p.drop, ["settled-old", "settled"]);
        // Exactly max_age old is stale; younger waits for its event.
        assert_eq!(p.stale, ["old"]);
        assert_eq!(plan(&snap(1, 0, &[]), &set(&[]), max_age), Plan::default());
    }

    #[test]
    fn a_reservation_settled_meanwhile_is_not_released() {
        let stale = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(to_release(&stale, &set(&["b"])), ["a", "c"]);
        assert!(to_release(&stale, &set(&["a", "b", "c"])).is_empty());
    }

    #[test]
    fn the_balance_is_repaired_to_ledger_minus_held_only_when_comparable() {
        // Drift: Redis says 90, ledger 120 with 20 held → 100.
        assert_eq!(repair_to(&snap(90, 20, &[]), 120, 20), Some(100));
        // In agreement: nothing to do.
        assert_eq!(repair_to(&snap(100, 20, &[]), 120, 20), None);
        // Holds still travelling: not comparable.
        assert_eq!(repair_to(&snap(90, 20, &[]), 120, 30), None);
        // Something still pending: not comparable either.
        assert_eq!(repair_to(&snap(90, 20, &[("x", 0)]), 120, 20), None);
        // A negative balance is a balance like any other.
        assert_eq!(repair_to(&snap(0, 0, &[]), -5, 0), Some(-5));
    }

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
