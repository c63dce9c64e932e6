//! The credit decisions as plain functions, each the twin of a Lua snippet
//! in `redis/lua/` (an agreement test in e2e/tests runs both on real
//! Redis, the way GCRA's does): the idempotency check and whether one more
//! hold may open. The scripts themselves are in [`crate::redis::scripts`].

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
