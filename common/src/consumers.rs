//! The one "consumers settled" rule (docs/credits.md, "Recovery" step 3 and the
//! reconciler's "never while its event is still held unacked by a worker"): from the
//! credits consumers' heartbeats, has every live consumer settled what it took before
//! a time `t`, and is any consumer alive to say so?
//!
//! Consumers write `unacked:idle_since_ms:beat_ms` (Redis's clock) every 250 ms into
//! `Keys::credit_consumers` ([`Heartbeat`]). With the credits queue seen with no
//! ready message at `t`, every event that left the queue before `t` is in some
//! consumer's hands by `t + IN_TRANSIT_MS`. So the answer is yes once every live
//! consumer (a beat newer than [`DEAD_AFTER_MS`]) has beaten past that bound and
//! reports no unacked delivery and nothing taken or settled since `t`. A dead
//! consumer's beat is ignored (the broker returned its deliveries to the queue),
//! and so is an unreadable one (no consumer writes one); no live consumer at all is
//! a yes. Callers: the gateway's recovery after a Redis loss
//! (`gateway::credits::recovery::consumers_settled_since`) and the worker's release
//! of stale reservations (`worker::jobs::reconcile::release_verdict`).

use std::collections::HashMap;

use crate::redis::scripts::Heartbeat;

/// A consumer heartbeat older than this belongs to a dead process, whose unacked
/// deliveries the broker has returned to the queue.
pub const DEAD_AFTER_MS: i64 = 5_000;
/// Upper bound on a delivery's way from the broker to its consumer.
pub const IN_TRANSIT_MS: i64 = 1_000;

/// The answer of [`consumers_settled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Every live consumer has settled everything it took before `t` (or none is alive).
    Yes,
    /// Not known yet: a live consumer's last beat is too close to `t`; look again.
    Wait,
    /// A live consumer holds deliveries, or took or settled one after `t`.
    No,
}

/// What a busy beat from before `t + IN_TRANSIT_MS` means: the one point on which
/// the two callers differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyBusy {
    /// Nothing yet: the consumer beats every 250 ms, so its last beat may predate
    /// an ack it has since sent; wait for a newer one (the reconciler, which then
    /// releases within the same pass).
    Wait,
    /// Already a "no" (the recovery, which restarts its observation from a new `t`).
    No,
}

/// The rule of the module docs over the heartbeats `beats` (any field names, values
/// as consumers write them), at Redis time `now`.
pub fn consumers_settled(
    t: i64,
    now: i64,
    beats: &HashMap<String, String>,
    early_busy: EarlyBusy,
) -> Settled {
    let mut verdict = Settled::Yes;
    for hb in beats.values().filter_map(|v| Heartbeat::parse(v)) {
        if hb.beat_ms < now - DEAD_AFTER_MS {
            continue;
        }
        let busy = hb.unacked > 0 || hb.idle_since_ms > t;
        let early = hb.beat_ms < t + IN_TRANSIT_MS;
        if busy && (!early || early_busy == EarlyBusy::No) {
            return Settled::No;
        }
        if early {
            verdict = Settled::Wait;
        }
    }
    verdict
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

    const BOTH: [EarlyBusy; 2] = [EarlyBusy::Wait, EarlyBusy::No];

    #[test]
    fn no_live_consumer_is_a_yes() {
        for e in BOTH {
            assert_eq!(
                consumers_settled(10_000, 10_000, &beats(&[]), e),
                Settled::Yes
            );
            // Only dead or unreadable beats: nobody alive either.
            let b = beats(&["3:50000:1000", "junk", "1:2:3:4", ""]);
            assert_eq!(consumers_settled(10_000, 10_000, &b, e), Settled::Yes);
        }
    }

    #[test]
    fn an_idle_consumer_settles_once_its_beat_passes_the_transit_bound() {
        let t = 100_000;
        for e in BOTH {
            // Idle since before t, beaten past t + IN_TRANSIT_MS.
            assert_eq!(
                consumers_settled(t, 101_500, &beats(&["0:50000:101400"]), e),
                Settled::Yes
            );
            // Exactly at the bound counts as past it.
            assert_eq!(
                consumers_settled(t, 101_500, &beats(&["0:50000:101000"]), e),
                Settled::Yes
            );
            // Idle, but its last beat is from before the bound: wait for a newer one.
            assert_eq!(
                consumers_settled(t, 100_500, &beats(&["0:50000:100999"]), e),
                Settled::Wait
            );
            // Idle since exactly t: nothing taken after it.
            assert_eq!(
                consumers_settled(t, 101_500, &beats(&["0:100000:101400"]), e),
                Settled::Yes
            );
        }
    }

    #[test]
    fn a_busy_consumer_past_the_bound_is_a_no() {
        let t = 100_000;
        for e in BOTH {
            // Holding deliveries (a worker keeps its batch unacked while Postgres is down).
            assert_eq!(
                consumers_settled(t, 101_500, &beats(&["3:50000:101400"]), e),
                Settled::No
            );
            // Took or settled something after t: a delivery from before may have been in its buffer.
            assert_eq!(
                consumers_settled(t, 101_500, &beats(&["0:100001:101400"]), e),
                Settled::No
            );
            // One busy consumer among idle and waiting ones is enough, whatever the order.
            let b = beats(&["0:50000:100400", "0:50000:101400", "1:99000:101450"]);
            assert_eq!(consumers_settled(t, 101_500, &b, e), Settled::No);
        }
    }

    #[test]
    fn a_busy_beat_from_before_the_bound_waits_or_says_no_as_the_caller_asks() {
        let t = 100_000;
        for busy in ["2:99000:100400", "0:100200:100400"] {
            let b = beats(&[busy]);
            assert_eq!(
                consumers_settled(t, 100_500, &b, EarlyBusy::Wait),
                Settled::Wait,
                "{busy}"
            );
            assert_eq!(
                consumers_settled(t, 100_500, &b, EarlyBusy::No),
                Settled::No,
                "{busy}"
            );
        }
    }

    #[test]
    fn a_beat_exactly_dead_after_old_still_counts_as_live() {
        let t = 100_000;
        for e in BOTH {
            assert_eq!(
                consumers_settled(t, 110_000, &beats(&["7:50000:105000"]), e),
                Settled::No
            );
            assert_eq!(
                consumers_settled(t, 110_000, &beats(&["7:50000:104999"]), e),
                Settled::Yes
            );
        }
    }
}
