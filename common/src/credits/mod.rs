//! The credit decisions as plain functions, each the twin of a Lua snippet
//! in `redis/lua/` (an agreement test in e2e/tests runs both on real
//! Redis, the way GCRA's does): the idempotency check and whether one more
//! hold may open. The scripts themselves are in [`crate::redis::scripts`].
//!
//! [`model`] is the twin of the balance-moving scripts as a whole: one user's
//! credit state (balance, held, pending, open holds, ended holds, idempotency
//! records, applied grants) with one method per script (consume, hold open,
//! settle, release, grant, undo of a consume, idem finish), built on the two
//! decisions here; `common/tests/credit_model.rs` checks it against the real
//! scripts on Redis step by step.

pub mod model;

/// An idempotency record as the scripts store it (the fields `idem_check`
/// reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdemRecord<'a> {
    /// `h`: the body hash.
    pub hash: &'a str,
    /// `st` is `done` (an answer is remembered) rather than `run`.
    pub done: bool,
    /// `tx`: the id the running request uses (absent in records written
    /// before ids were recorded).
    pub id: Option<&'a str>,
    /// `t`: when the running request started, Redis ms.
    pub started_ms: Option<i64>,
}

/// What a keyed request does with the record under its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdemDecision {
    /// No record: a new movement under a new id.
    Fresh,
    /// Another body under this key: 409.
    Conflict,
    /// The first request's answer is remembered: replay it, charge nothing.
    Replay,
    /// The first request may still be running: 409.
    Busy,
    /// The first request started longer ago than the in-progress window and
    /// never stored its answer (it crashed, its answer's write failed, or its
    /// publish was ambiguous): look for its durable record, else retry it
    /// under its recorded id, never a new one.
    Stale,
}

/// The decision `idem_check` makes in Lua (`redis/lua/idem_check.lua`), as a plain
/// function. `window_ms` is the in-progress window (confirm timeout + 30 s).
/// A running record without an id or start (an older gateway's marker,
/// which expires by itself within the window) is `Busy`.
pub fn idem_decide(
    record: Option<IdemRecord<'_>>,
    hash: &str,
    now_ms: i64,
    window_ms: i64,
) -> IdemDecision {
    let Some(r) = record else {
        return IdemDecision::Fresh;
    };
    if r.hash != hash {
        return IdemDecision::Conflict;
    }
    if r.done {
        return IdemDecision::Replay;
    }
    match (r.id, r.started_ms) {
        (Some(_), Some(t)) if now_ms - t >= window_ms => IdemDecision::Stale,
        _ => IdemDecision::Busy,
    }
}

/// Whether a hold may open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOpenDecision {
    /// The user already has `credits.max_open_holds` open: 422 naming `holds`.
    TooMany,
    /// The balance cannot cover it: 402.
    Insufficient,
    Open,
}

/// The decision `hold_limit` makes in Lua (`redis/lua/hold_limit.lua`), over the holds
/// still open once the expired ones have left. The limit comes first: a
/// refused hold is never remembered as a 402.
pub fn hold_open_decide(open: u64, max_open: u64, bal: i64, amount: i64) -> HoldOpenDecision {
    if open >= max_open {
        HoldOpenDecision::TooMany
    } else if bal < amount {
        HoldOpenDecision::Insufficient
    } else {
        HoldOpenDecision::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyed_request_is_fresh_conflicting_replayed_busy_or_stale() {
        let rec = |hash, done, id, started_ms| {
            Some(IdemRecord {
                hash,
                done,
                id,
                started_ms,
            })
        };
        let w = 35_000;
        assert_eq!(idem_decide(None, "h", 0, w), IdemDecision::Fresh);
        assert_eq!(
            idem_decide(rec("other", true, None, None), "h", 0, w),
            IdemDecision::Conflict
        );
        assert_eq!(
            idem_decide(rec("other", false, Some("t"), Some(0)), "h", 99_999, w),
            IdemDecision::Conflict,
            "another body is a conflict even once the first is stale"
        );
        assert_eq!(
            idem_decide(rec("h", true, Some("t"), Some(0)), "h", 0, w),
            IdemDecision::Replay
        );
        let run = rec("h", false, Some("t"), Some(1_000));
        assert_eq!(idem_decide(run, "h", 1_000, w), IdemDecision::Busy);
        assert_eq!(idem_decide(run, "h", 1_000 + w - 1, w), IdemDecision::Busy);
        assert_eq!(idem_decide(run, "h", 1_000 + w, w), IdemDecision::Stale);
        // Marked stale at once after an ambiguous publish (t = 0).
        assert_eq!(
            idem_decide(rec("h", false, Some("t"), Some(0)), "h", w, w),
            IdemDecision::Stale
        );
        // An older gateway's marker: no id to reuse, so it stays busy until
        // its own short TTL ends it.
        assert_eq!(
            idem_decide(rec("h", false, None, None), "h", 10 * w, w),
            IdemDecision::Busy
        );
        assert_eq!(
            idem_decide(rec("h", false, Some("t"), None), "h", 10 * w, w),
            IdemDecision::Busy
        );
    }

    #[test]
    fn the_hold_limit_comes_before_the_balance() {
        assert_eq!(hold_open_decide(0, 3, 10, 5), HoldOpenDecision::Open);
        assert_eq!(hold_open_decide(2, 3, 5, 5), HoldOpenDecision::Open);
        assert_eq!(hold_open_decide(3, 3, 100, 5), HoldOpenDecision::TooMany);
        assert_eq!(hold_open_decide(3, 3, 0, 5), HoldOpenDecision::TooMany);
        assert_eq!(hold_open_decide(2, 3, 4, 5), HoldOpenDecision::Insufficient);
        assert_eq!(hold_open_decide(0, 0, 10, 1), HoldOpenDecision::TooMany);
    }
}

/// The model's rules, one test each (here beside the decisions it builds on,
/// so model.rs stays within the file-size limit).
#[cfg(test)]
mod model_tests {
    use super::model::*;
    use crate::redis::scripts::{hold_json, ExpiredHold, Tag};

    const NOW: i64 = 1_000_000;
    const HOUR: i64 = 3_600_000;

    fn user(bal: i64) -> Model {
        Model::init(bal, &[]).0
    }

    fn keyed<'a>(key: &'a str, hash: &'a str, reuse: Reuse) -> Keyed<'a> {
        Keyed {
            key,
            hash,
            window_ms: HOUR,
            reuse,
        }
    }

    fn fields(step: &Step) -> Vec<String> {
        step.reply().fields
    }

    fn made(created: bool, id: &str, reused: bool) -> Made {
        Made {
            created,
            id: id.into(),
            reused,
        }
    }

    const EXPIRED: &str = r#"{"state":"expired"}"#;

    #[test]
    fn init_counts_the_open_holds_out_of_the_ledger() {
        let holds = [(
            "h1".to_string(),
            Hold {
                amount: 30,
                expires_at_ms: NOW + HOUR,
            },
        )];
        let (m, step) = Model::init(100, &holds);
        assert_eq!((m.bal, m.held, m.ver), (70, 30, 1));
        assert_eq!(
            (step.tag(), fields(&step)),
            (Tag::Ok, vec!["70".to_string(), "30".into()])
        );
    }

    #[test]
    fn a_consume_reserves_and_insufficient_leaves_everything_unchanged() {
        let mut m = user(10);
        assert_eq!(
            fields(&m.consume(NOW, None, "t1", 4)),
            ["6", "0", "1", "t1", "0"]
        );
        assert_eq!(
            m.pending["t1"],
            Pending {
                amount: 4,
                at_ms: NOW
            }
        );
        let before = m.clone();
        let step = m.consume(NOW, None, "t2", 7);
        assert_eq!(
            step.outcome,
            Outcome::Insufficient(Funds { bal: 6, held: 0 })
        );
        assert_eq!(m, before, "a refused consume moves nothing");
        // Keyed, the refusal is remembered as the 402 answer and replayed.
        let k = keyed("c", "h", Reuse::Fresh);
        assert_eq!(m.consume(NOW, Some(&k), "t2", 7).tag(), Tag::Insufficient);
        let replay = m.consume(NOW, Some(&k), "t3", 1);
        assert_eq!(
            replay.outcome,
            Outcome::Replay(r#"{"status":402,"balance":6,"required":7}"#.into())
        );
        assert_eq!((m.bal, m.pending.len(), m.ver), (6, 1, 2));
    }

    #[test]
    fn a_retry_of_a_reserved_transaction_moves_nothing() {
        let mut m = user(10);
        m.consume(NOW, None, "t1", 4);
        let before = m.clone();
        let step = m.consume(NOW + 5, None, "t1", 9);
        assert_eq!(
            step.outcome,
            Outcome::Consumed(Funds { bal: 6, held: 0 }, made(false, "t1", false))
        );
        assert_eq!(m, before);
    }

    #[test]
    fn keyed_requests_conflict_busy_replay_and_reuse_a_stale_id() {
        let mut m = user(10);
        let k = keyed("c", "h", Reuse::Recorded);
        assert!(matches!(
            m.consume(NOW, Some(&k), "t1", 2).outcome,
            Outcome::Consumed(_, Made { created: true, .. })
        ));
        assert_eq!(
            m.consume(NOW, Some(&keyed("c", "other", Reuse::Fresh)), "t2", 2)
                .outcome,
            Outcome::Conflict
        );
        assert_eq!(m.consume(NOW + 1, Some(&k), "t2", 2).outcome, Outcome::Busy);
        // Past the window: the recorded id, still pending, is reused; nothing moves.
        let late = NOW + HOUR;
        let step = m.consume(late, Some(&k), "t2", 2);
        assert_eq!(
            step.outcome,
            Outcome::Consumed(Funds { bal: 8, held: 0 }, made(false, "t1", true))
        );
        let stale = keyed("c", "h", Reuse::Fresh);
        assert_eq!(
            m.consume(late + HOUR, Some(&stale), "t3", 2).outcome,
            Outcome::Stale("t1".into())
        );
        // No longer pending: UNPENDING, unless told to reserve it again.
        m.pending.remove("t1");
        assert_eq!(
            m.consume(late + HOUR, Some(&k), "t3", 2).outcome,
            Outcome::Unpending("t1".into())
        );
        let again = keyed("c", "h", Reuse::Again);
        let step = m.consume(late + HOUR, Some(&again), "t3", 2);
        assert_eq!(
            step.outcome,
            Outcome::Consumed(Funds { bal: 6, held: 0 }, made(true, "t1", true))
        );
        // The answer stored, it replays; another request's finish is refused.
        assert!(!m.idem_finish("c", "h", "{}", "t9"));
        assert!(m.idem_finish("c", "h", r#"{"ok":1}"#, "t1"));
        assert_eq!(
            m.consume(late, Some(&k), "t4", 2).outcome,
            Outcome::Replay(r#"{"ok":1}"#.into())
        );
    }

    #[test]
    fn an_undo_gives_a_pending_reservation_back_once_and_marks_or_forgets_the_record() {
        let mut m = user(10);
        let k = keyed("c", "h", Reuse::Recorded);
        m.consume(NOW + HOUR, Some(&k), "t1", 4);
        assert_eq!(
            fields(&m.consume_undo(Some(("c", "h")), "t1", false, false)),
            ["0", "0"]
        );
        assert_eq!(
            m.idem["c"].state,
            IdemState::Run {
                id: "t1".into(),
                started_ms: 0
            }
        );
        // Marked stale, the next retry reuses the id at once.
        let step = m.consume(NOW + HOUR, Some(&k), "t2", 4);
        assert_eq!(
            step.outcome,
            Outcome::Consumed(Funds { bal: 6, held: 0 }, made(false, "t1", true))
        );
        assert_eq!(
            fields(&m.consume_undo(Some(("c", "h")), "t1", true, true)),
            ["10", "0"]
        );
        assert!(m.idem.is_empty() && m.pending.is_empty());
        let ver = m.ver;
        assert_eq!(
            fields(&m.consume_undo(None, "t1", true, false)),
            ["10", "0"]
        );
        assert_eq!(m.ver, ver, "nothing left to give back");
    }

    #[test]
    fn settle_releases_the_difference_and_pends_the_amount() {
        let mut m = user(100);
        m.hold_open(NOW, None, "h1", 40, HOUR, 3);
        assert_eq!((m.bal, m.held), (60, 40));
        assert_eq!(
            m.hold_settle(NOW, "h1", "t1", 41).outcome,
            Outcome::TooMuch(40)
        );
        let step = m.hold_settle(NOW, "h1", "t1", 25);
        assert_eq!(fields(&step), ["75", "0", "40", &hold_json(40, NOW + HOUR)]);
        assert_eq!(m.pending["t1"].amount, 25);
        let end =
            r#"{"state":"settled","transaction_id":"t1","amount":25,"released":15,"balance":75}"#;
        assert_eq!(
            m.hold_settle(NOW, "h1", "t2", 1).outcome,
            Outcome::Ended(Some(end.into()))
        );
        assert_eq!(
            m.hold_release(NOW, "h1").outcome,
            Outcome::Ended(Some(end.into()))
        );
        assert_eq!(
            m.hold_open(NOW, None, "h1", 1, HOUR, 3).outcome,
            Outcome::Ended(None)
        );
        // Settling 0 pends nothing.
        m.hold_open(NOW, None, "h2", 5, HOUR, 3);
        m.hold_settle(NOW, "h2", "t2", 0);
        assert!(!m.pending.contains_key("t2"));
        assert_eq!((m.bal, m.held), (75, 0));
    }

    #[test]
    fn release_gives_the_whole_hold_back() {
        let mut m = user(100);
        m.hold_open(NOW, None, "h1", 40, HOUR, 3);
        let step = m.hold_release(NOW, "h1");
        assert_eq!(
            fields(&step),
            ["100", "0", "40", &hold_json(40, NOW + HOUR)]
        );
        assert_eq!(m.ended["h1"], r#"{"state":"released"}"#);
        assert_eq!(m.hold_release(NOW, "nope").outcome, Outcome::Gone);
    }

    #[test]
    fn a_due_hold_expires_before_a_decision() {
        let mut m = user(10);
        m.hold_open(NOW, None, "h1", 10, 50, 3);
        assert_eq!(m.consume(NOW + 49, None, "t1", 1).tag(), Tag::Insufficient);
        let step = m.consume(NOW + 50, None, "t1", 10);
        assert_eq!(
            step.expired,
            [ExpiredHold {
                hold_id: "h1".into(),
                amount: 10
            }]
        );
        assert_eq!(fields(&step), ["0", "0", "1", "t1", "0"]);
        assert_eq!(m.ended["h1"], EXPIRED);
        assert_eq!(
            m.hold_release(NOW + 51, "h1").outcome,
            Outcome::Ended(Some(EXPIRED.into()))
        );
        // A hold due when its settle runs is found ended, its amount back.
        m.grant_apply("g1", 5);
        m.hold_open(NOW, None, "h2", 5, 10, 3);
        let step = m.hold_settle(NOW + 10, "h2", "t2", 5);
        assert_eq!(
            (step.expired.len(), step.outcome),
            (1, Outcome::Ended(Some(EXPIRED.into())))
        );
        assert_eq!((m.bal, m.held), (5, 0));
    }

    #[test]
    fn the_most_open_holds_come_before_the_balance_and_are_not_remembered() {
        let mut m = user(10);
        m.hold_open(NOW, None, "h1", 1, HOUR, 2);
        m.hold_open(NOW, None, "h2", 1, HOUR, 2);
        let before = m.clone();
        assert_eq!(
            fields(&m.hold_open(
                NOW,
                Some(&keyed("o", "h", Reuse::Fresh)),
                "h3",
                100,
                HOUR,
                2
            )),
            ["2"]
        );
        assert_eq!(m, before);
        // A retry of an open hold answers it again, even at the limit.
        let step = m.hold_open(NOW, None, "h1", 7, HOUR, 2);
        assert_eq!(
            fields(&step),
            ["8", "2", &(NOW + HOUR).to_string(), "0", "h1", "0"]
        );
        // Once one expired, there is room.
        m.holds.get_mut("h2").unwrap().expires_at_ms = NOW;
        let step = m.hold_open(NOW, None, "h3", 3, HOUR, 2);
        assert_eq!(
            step.outcome,
            Outcome::Opened(
                Funds { bal: 6, held: 4 },
                NOW + HOUR,
                made(true, "h3", false)
            )
        );
    }

    #[test]
    fn a_grant_applies_once() {
        let mut m = user(10);
        assert_eq!(fields(&m.grant_apply("g", 5)), ["15", "0", "1"]);
        assert_eq!(fields(&m.grant_apply("g", 5)), ["15", "0", "0"]);
        assert_eq!(m.ver, 2);
    }
}
