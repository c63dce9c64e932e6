//! A plain state machine of one user's credit state as the credit scripts keep
//! it in Redis (see [`crate::redis::scripts`] for the keys), with one method per
//! balance-moving script, each answering the reply its script answers and
//! changing the state as the script does. `common/tests/credit_model.rs` runs
//! seeded-random operations through both the real scripts on Redis and this
//! model and checks after every step that they agree (the way
//! `gateway/src/rate_limit.rs` has a twin of its GCRA Lua). Which script each
//! method mirrors (all in `crate::redis::scripts`' `lua/`):
//!
//! - [`Model::init`] mirrors `init.lua`, loading a user from the ledger and its open holds;
//! - [`Model::consume`] mirrors `consume.lua`;
//! - [`Model::consume_undo`] mirrors `consume_undo.lua`;
//! - [`Model::hold_open`] mirrors `hold_open.lua`;
//! - [`Model::hold_settle`] mirrors `hold_settle.lua`;
//! - [`Model::hold_release`] mirrors `hold_release.lua`;
//! - [`Model::grant_apply`] mirrors `grant_apply.lua`;
//! - [`Model::idem_finish`] mirrors `idem_finish.lua` (no prelude);
//! - [`Model::rate_limit`] mirrors `rate_limit.lua`, the GCRA step those four scripts take first
//!   when they decide the request's rate limit (checked by `common/tests/credit_rate_limit.rs`);
//! - [`Model::expire_due`] mirrors the prelude's `expire_due`, which `consume`,
//!   `hold_open`, `hold_settle` and `hold_release` run before they decide;
//! - private helpers mirror the keyed steps of `idem_steps.lua` (`idem_begin`, `idem_run`, `idem_done`,
//!   `idem_undo`), deciding with [`super::idem_decide`] and opening holds with
//!   [`super::hold_open_decide`], the plain twins of `idem_check` and `hold_limit`.
//!
//! Time is explicit: every method that reads the scripts' `now` (Redis's
//! `TIME`, ms) takes `now_ms`. Not modelled: `LOST` and `MISSING` (the model
//! is a loaded user whose slot kept its data), `as_of`, the scripts that
//! undo a hold's step after a failed publish (`hold_undo`, `hold_unsettle`,
//! `hold_unrelease`), the worker's and reconciler's scripts, and the TTLs of
//! idempotency records, `hold_end:` entries and the applied-grants set (the
//! model keeps them for ever; a test uses TTLs longer than its run). Amounts
//! are `i64`; the scripts compute in doubles, exact for every amount the API
//! admits (below 2^53, docs/credits.md).
//!
//! Its rule-by-rule unit tests are `credits::model_tests` (in `credits/mod.rs`,
//! beside the decisions they build on).

use std::collections::{BTreeMap, BTreeSet};

use super::{hold_open_decide, idem_decide, HoldOpenDecision, IdemDecision, IdemRecord};
use crate::redis::scripts::{hold_json, ExpiredHold, RateLimitReply, Reply, Tag};

/// An open hold (`holds` hash: id → `{"amount":N,"expires_at_ms":T}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub amount: i64,
    pub expires_at_ms: i64,
}

impl Hold {
    /// The JSON the scripts store it as.
    pub fn json(&self) -> String {
        hold_json(self.amount, self.expires_at_ms)
    }
}

/// A pending reservation (`pending` hash: transaction id → "amount:at").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub amount: i64,
    /// When it was reserved, ms on the scripts' clock.
    pub at_ms: i64,
}

/// An idempotency record (`idem:ROUTE:KEY` hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idem {
    /// `h`: the body hash.
    pub hash: String,
    pub state: IdemState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdemState {
    /// `st` = run: the id in use (`tx`) and its start (`t`, 0 once marked stale).
    Run { id: String, started_ms: i64 },
    /// `st` = done: the remembered answer (`ans`).
    Done { answer: String },
}

/// What a keyed reservation is told to do with a stale record's id (the
/// scripts' `reuse` argument, which the gateway passes as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// "0": a fresh id (a stale record answers `STALE` with its recorded id).
    Fresh,
    /// "1": reuse the recorded id while it is still pending.
    Recorded,
    /// "2": reserve under the recorded id again.
    Again,
}

impl Reuse {
    /// The argument as the scripts take it.
    pub fn arg(self) -> &'static str {
        match self {
            Self::Fresh => "0",
            Self::Recorded => "1",
            Self::Again => "2",
        }
    }
}

/// The idempotency part of a keyed request (`None` where the script gets an
/// empty body hash). The TTL arguments are not modelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyed<'a> {
    /// The record's key (`KEYS[5]`); any string naming it uniquely.
    pub key: &'a str,
    pub hash: &'a str,
    /// The in-progress window, ms.
    pub window_ms: i64,
    pub reuse: Reuse,
}

/// `bal held`, as the OK and INSUFFICIENT replies carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Funds {
    pub bal: i64,
    pub held: i64,
}

/// What a reservation (consume, hold open) answers besides the funds: whether
/// it `created` the reservation (false: a retry, nothing moved), the `id` used
/// (the recorded one when `reused`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    pub created: bool,
    pub id: String,
    pub reused: bool,
}

/// A script's reply with its numbers (the fields the script writes after the
/// tag and the expired holds, see [`Step::reply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `CONFLICT`: another body under this key.
    Conflict,
    /// `BUSY`: the first request under this key may still be running.
    Busy,
    /// `REPLAY answer`.
    Replay(String),
    /// `STALE id`: the recorded id of a request that never finished.
    Stale(String),
    /// `UNPENDING id`: a recorded id no longer pending (consume).
    Unpending(String),
    /// `INSUFFICIENT bal held`.
    Insufficient(Funds),
    /// `TOO_MANY max` (hold open).
    TooMany(u64),
    /// `ENDED [remembered]`: the hold has ended (hold open answers it without
    /// the remembered end).
    Ended(Option<String>),
    /// `GONE`: the hold is not open and no end is remembered.
    Gone,
    /// `TOO_MUCH hold_amount` (settle).
    TooMuch(i64),
    /// consume's `OK bal held created tx reused`.
    Consumed(Funds, Made),
    /// hold open's `OK bal held expires_at_ms created hold_id reused`.
    Opened(Funds, i64, Made),
    /// settle's and release's `OK bal held hold_amount hold_json` (the hold as it was).
    Closed(Funds, Hold),
    /// grant_apply's `OK bal held applied`.
    Applied(Funds, bool),
    /// init's and consume_undo's `OK bal held`.
    Balance(Funds),
}

/// One script call's reply: the holds it found due and released, then its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub expired: Vec<ExpiredHold>,
    pub outcome: Outcome,
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

impl Step {
    fn early(outcome: Outcome) -> Self {
        Self {
            expired: Vec::new(),
            outcome,
        }
    }

    pub fn tag(&self) -> Tag {
        match &self.outcome {
            Outcome::Conflict => Tag::Conflict,
            Outcome::Busy => Tag::Busy,
            Outcome::Replay(_) => Tag::Replay,
            Outcome::Stale(_) => Tag::Stale,
            Outcome::Unpending(_) => Tag::Unpending,
            Outcome::Insufficient(_) => Tag::Insufficient,
            Outcome::TooMany(_) => Tag::TooMany,
            Outcome::Ended(_) => Tag::Ended,
            Outcome::Gone => Tag::Gone,
            Outcome::TooMuch(_) => Tag::TooMuch,
            Outcome::Consumed(..)
            | Outcome::Opened(..)
            | Outcome::Closed(..)
            | Outcome::Applied(..)
            | Outcome::Balance(_) => Tag::Ok,
        }
    }

    /// The fields after the tag and the expired holds, as the script writes them.
    pub fn fields(&self) -> Vec<String> {
        let funds = |f: &Funds| vec![f.bal.to_string(), f.held.to_string()];
        let made = |m: &Made| [flag(m.created), m.id.clone(), flag(m.reused)];
        let mut out = match &self.outcome {
            Outcome::Insufficient(f)
            | Outcome::Balance(f)
            | Outcome::Consumed(f, _)
            | Outcome::Opened(f, ..) => funds(f),
            Outcome::Closed(f, _) | Outcome::Applied(f, _) => funds(f),
            _ => Vec::new(),
        };
        match &self.outcome {
            Outcome::Replay(v)
            | Outcome::Stale(v)
            | Outcome::Unpending(v)
            | Outcome::Ended(Some(v)) => out.push(v.clone()),
            Outcome::TooMany(max) => out.push(max.to_string()),
            Outcome::TooMuch(amount) => out.push(amount.to_string()),
            Outcome::Consumed(_, m) => out.extend(made(m)),
            Outcome::Opened(_, exp, m) => out.extend([exp.to_string()].into_iter().chain(made(m))),
            Outcome::Closed(_, h) => out.extend([h.amount.to_string(), h.json()]),
            Outcome::Applied(_, applied) => out.push(flag(*applied)),
            _ => {}
        }
        out
    }

    /// The reply as [`Reply::parse`] reads the script's (expired holds in the
    /// model's order, which is by hold id; Redis lists them in hash order).
    pub fn reply(&self) -> Reply {
        Reply {
            tag: self.tag().as_str().to_string(),
            expired: self.expired.clone(),
            fields: self.fields(),
            rate_limit: None,
        }
    }
}

/// One loaded user's credit state, as the scripts keep it. The fields are
/// public so a test can set up (or deliberately break) a state; the methods
/// keep `bal`/`held` consistent with `holds` the way the scripts do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// `credits.bal`: spendable now.
    pub bal: i64,
    /// `credits.held`: the sum of the open holds.
    pub held: i64,
    /// `credits.ver`: bumped by every save.
    pub ver: i64,
    pub pending: BTreeMap<String, Pending>,
    pub holds: BTreeMap<String, Hold>,
    /// `hold_end:ID`: the remembered end of each ended hold.
    pub ended: BTreeMap<String, String>,
    /// Idempotency records by their key.
    pub idem: BTreeMap<String, Idem>,
    /// `grants_applied`.
    pub grants: BTreeSet<String>,
    /// GCRA keys (`{USER}:rl:credits`) → their theoretical arrival time (µs).
    pub rate_limits: BTreeMap<String, i64>,
}

/// What `idem_begin` lets a keyed script go on with: the id to use and
/// whether it is the recorded one.
type Begin = Result<(String, bool), Outcome>;

impl Model {
    /// `init.lua` for a user Redis does not hold yet: `ledger` is the ledger's
    /// balance, `holds` the open holds from Postgres. Replies `OK bal held`.
    pub fn init(ledger: i64, holds: &[(String, Hold)]) -> (Self, Step) {
        let mut m = Self::default();
        for (id, h) in holds {
            m.held += h.amount;
            m.holds.insert(id.clone(), *h);
        }
        m.bal = ledger - m.held;
        m.save();
        let step = Step::early(Outcome::Balance(m.funds()));
        (m, step)
    }

    /// The step `consume`, `hold_open`, `hold_settle` and `hold_release` take
    /// first when they decide the request's rate limit (`rate_limit.lua`, the
    /// arithmetic of the gateway's `GCRA_LUA` at cost 1): the decision their
    /// reply opens with. A refusal (`allowed` false) changes nothing, and the
    /// script then answers `LIMITED` and stops; allowed, it moves the key's
    /// TAT and the script goes on as without a limit.
    pub fn rate_limit(
        &mut self,
        key: &str,
        limit: u64,
        window_secs: u64,
        now_us: i64,
    ) -> RateLimitReply {
        let window = window_secs as i64 * 1_000_000;
        let t = (window / limit.max(1) as i64).max(1);
        let tat = self
            .rate_limits
            .get(key)
            .copied()
            .unwrap_or(now_us)
            .max(now_us);
        let room = (now_us - tat + window).max(0) / t;
        let new_tat = tat + t;
        let allow_at = new_tat - window;
        let refused = |retry_us| RateLimitReply {
            allowed: false,
            remaining: room,
            reset_us: tat - now_us,
            retry_us,
        };
        if t > window {
            return refused(window);
        }
        if allow_at > now_us {
            return refused(allow_at - now_us);
        }
        self.rate_limits.insert(key.to_string(), new_tat);
        RateLimitReply {
            allowed: true,
            remaining: (now_us - allow_at) / t,
            reset_us: new_tat - now_us,
            retry_us: 0,
        }
    }

    /// `bal held` now.
    pub fn funds(&self) -> Funds {
        Funds {
            bal: self.bal,
            held: self.held,
        }
    }

    fn save(&mut self) {
        self.ver += 1;
    }

    /// The prelude's `expire_due`: every hold past its expiry at `now_ms`
    /// leaves, gives its amount back to `bal` and is remembered as expired.
    pub fn expire_due(&mut self, now_ms: i64) -> Vec<ExpiredHold> {
        let due: Vec<String> = self
            .holds
            .iter()
            .filter(|(_, h)| h.expires_at_ms <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        let mut expired = Vec::with_capacity(due.len());
        for id in due {
            let h = self.holds.remove(&id).expect("listed above");
            self.held -= h.amount;
            self.bal += h.amount;
            self.ended
                .insert(id.clone(), r#"{"state":"expired"}"#.to_string());
            expired.push(ExpiredHold {
                hold_id: id,
                amount: h.amount,
            });
        }
        if !expired.is_empty() {
            self.save();
        }
        expired
    }

    /// `idem_begin` (idem_steps.lua) over `idem_check` ([`idem_decide`]).
    fn idem_begin(&self, now_ms: i64, keyed: Option<&Keyed<'_>>, id: &str) -> Begin {
        let Some(k) = keyed else {
            return Ok((id.to_string(), false));
        };
        let rec = self.idem.get(k.key);
        let record = rec.map(|r| match &r.state {
            IdemState::Run { id, started_ms } => IdemRecord {
                hash: &r.hash,
                done: false,
                id: Some(id),
                started_ms: Some(*started_ms),
            },
            IdemState::Done { .. } => IdemRecord {
                hash: &r.hash,
                done: true,
                id: None,
                started_ms: None,
            },
        });
        let state = rec.map(|r| &r.state);
        match (idem_decide(record, k.hash, now_ms, k.window_ms), state) {
            (IdemDecision::Fresh, _) => Ok((id.to_string(), false)),
            (IdemDecision::Conflict, _) => Err(Outcome::Conflict),
            (IdemDecision::Busy, _) => Err(Outcome::Busy),
            (IdemDecision::Replay, Some(IdemState::Done { answer })) => {
                Err(Outcome::Replay(answer.clone()))
            }
            (IdemDecision::Stale, Some(IdemState::Run { id: recorded, .. }))
                if k.reuse == Reuse::Fresh =>
            {
                Err(Outcome::Stale(recorded.clone()))
            }
            (IdemDecision::Stale, Some(IdemState::Run { id: recorded, .. })) => {
                Ok((recorded.clone(), true))
            }
            (d, s) => unreachable!("{d:?} over {s:?}"),
        }
    }

    /// `idem_run`: the record is in progress under `id` since `now_ms`.
    fn idem_run(&mut self, now_ms: i64, keyed: Option<&Keyed<'_>>, id: &str) {
        if let Some(k) = keyed {
            let state = IdemState::Run {
                id: id.to_string(),
                started_ms: now_ms,
            };
            self.idem.insert(
                k.key.to_string(),
                Idem {
                    hash: k.hash.to_string(),
                    state,
                },
            );
        }
    }

    /// `idem_done` with the remembered 402 of a refused reservation.
    fn idem_refused(&mut self, keyed: Option<&Keyed<'_>>, amount: i64) {
        if let Some(k) = keyed {
            let answer = format!(
                r#"{{"status":402,"balance":{},"required":{amount}}}"#,
                self.bal
            );
            let state = IdemState::Done { answer };
            self.idem.insert(
                k.key.to_string(),
                Idem {
                    hash: k.hash.to_string(),
                    state,
                },
            );
        }
    }

    /// `consume.lua`: reserve `amount` under `tx` (the fresh id; a stale
    /// record's id instead when `keyed.reuse` says so).
    pub fn consume(
        &mut self,
        now_ms: i64,
        keyed: Option<&Keyed<'_>>,
        tx: &str,
        amount: i64,
    ) -> Step {
        let (id, reused) = match self.idem_begin(now_ms, keyed, tx) {
            Ok(v) => v,
            Err(early) => return Step::early(early),
        };
        let expired = self.expire_due(now_ms);
        let step = |outcome| Step { expired, outcome };
        if self.pending.contains_key(&id) {
            self.idem_run(now_ms, keyed, &id);
            return step(Outcome::Consumed(
                self.funds(),
                Made {
                    created: false,
                    id,
                    reused,
                },
            ));
        }
        if reused && keyed.map(|k| k.reuse) != Some(Reuse::Again) {
            return step(Outcome::Unpending(id));
        }
        if self.bal < amount {
            self.idem_refused(keyed, amount);
            return step(Outcome::Insufficient(self.funds()));
        }
        self.bal -= amount;
        self.pending.insert(
            id.clone(),
            Pending {
                amount,
                at_ms: now_ms,
            },
        );
        self.save();
        self.idem_run(now_ms, keyed, &id);
        step(Outcome::Consumed(
            self.funds(),
            Made {
                created: true,
                id,
                reused,
            },
        ))
    }

    /// `consume_undo.lua` after a failed publish: `give_back` returns the
    /// reservation if still pending, `forget` deletes the request's record
    /// (else it is marked stale, `t` = 0). `keyed` is the (key, body hash).
    /// Like the script, it answers `OK 0 0` when it does not give back (it
    /// never loads the balance then; the gateway ignores this reply).
    pub fn consume_undo(
        &mut self,
        keyed: Option<(&str, &str)>,
        tx: &str,
        give_back: bool,
        forget: bool,
    ) -> Step {
        if let Some((key, hash)) = keyed {
            self.idem_undo(key, hash, tx, forget);
        }
        if !give_back {
            return Step::early(Outcome::Balance(Funds { bal: 0, held: 0 }));
        }
        if let Some(p) = self.pending.remove(tx) {
            self.bal += p.amount;
            self.save();
        }
        Step::early(Outcome::Balance(self.funds()))
    }

    /// `idem_undo`: only over the request's own in-progress record.
    fn idem_undo(&mut self, key: &str, hash: &str, id: &str, forget: bool) {
        let Some(rec) = self.idem.get_mut(key) else {
            return;
        };
        let IdemState::Run {
            id: run,
            started_ms,
        } = &mut rec.state
        else {
            return;
        };
        if rec.hash != hash || run != id {
            return;
        }
        if forget {
            self.idem.remove(key);
        } else {
            *started_ms = 0;
        }
    }

    /// `idem_finish.lua`: store `answer` for the request's own in-progress
    /// record (or where there is none). Returns whether it was stored (1 | 0).
    pub fn idem_finish(&mut self, key: &str, hash: &str, answer: &str, id: &str) -> bool {
        let own = match self.idem.get(key) {
            None => true,
            Some(r) => {
                r.hash == hash && matches!(&r.state, IdemState::Run { id: run, .. } if run == id)
            }
        };
        if own {
            let state = IdemState::Done {
                answer: answer.to_string(),
            };
            self.idem.insert(
                key.to_string(),
                Idem {
                    hash: hash.to_string(),
                    state,
                },
            );
        }
        own
    }

    /// `hold_open.lua`: open a hold of `amount` under `hold_id` for
    /// `lifetime_ms`, at most `max_open` open per user.
    pub fn hold_open(
        &mut self,
        now_ms: i64,
        keyed: Option<&Keyed<'_>>,
        hold_id: &str,
        amount: i64,
        lifetime_ms: i64,
        max_open: u64,
    ) -> Step {
        let (id, reused) = match self.idem_begin(now_ms, keyed, hold_id) {
            Ok(v) => v,
            Err(early) => return Step::early(early),
        };
        let expired = self.expire_due(now_ms);
        let step = |outcome| Step { expired, outcome };
        if let Some(h) = self.holds.get(&id).copied() {
            self.idem_run(now_ms, keyed, &id);
            return step(Outcome::Opened(
                self.funds(),
                h.expires_at_ms,
                Made {
                    created: false,
                    id,
                    reused,
                },
            ));
        }
        if self.ended.contains_key(&id) {
            return step(Outcome::Ended(None));
        }
        match hold_open_decide(self.holds.len() as u64, max_open, self.bal, amount) {
            HoldOpenDecision::TooMany => return step(Outcome::TooMany(max_open)),
            HoldOpenDecision::Insufficient => {
                self.idem_refused(keyed, amount);
                return step(Outcome::Insufficient(self.funds()));
            }
            HoldOpenDecision::Open => {}
        }
        let expires_at_ms = now_ms + lifetime_ms;
        self.bal -= amount;
        self.held += amount;
        self.holds.insert(
            id.clone(),
            Hold {
                amount,
                expires_at_ms,
            },
        );
        self.save();
        self.idem_run(now_ms, keyed, &id);
        step(Outcome::Opened(
            self.funds(),
            expires_at_ms,
            Made {
                created: true,
                id,
                reused,
            },
        ))
    }

    /// The checks `hold_settle` and `hold_release` share: a remembered end
    /// (before and after expiring due holds), else the open hold.
    fn open_hold(&mut self, now_ms: i64, hold_id: &str) -> Result<(Vec<ExpiredHold>, Hold), Step> {
        if let Some(end) = self.ended.get(hold_id) {
            return Err(Step::early(Outcome::Ended(Some(end.clone()))));
        }
        let expired = self.expire_due(now_ms);
        if let Some(end) = self.ended.get(hold_id) {
            return Err(Step {
                expired,
                outcome: Outcome::Ended(Some(end.clone())),
            });
        }
        match self.holds.get(hold_id).copied() {
            Some(h) => Ok((expired, h)),
            None => Err(Step {
                expired,
                outcome: Outcome::Gone,
            }),
        }
    }

    /// `hold_settle.lua`: settle `amount` of the hold under `tx`; the rest
    /// returns to `bal`, the amount becomes pending (when above 0).
    pub fn hold_settle(&mut self, now_ms: i64, hold_id: &str, tx: &str, amount: i64) -> Step {
        let (expired, h) = match self.open_hold(now_ms, hold_id) {
            Ok(v) => v,
            Err(step) => return step,
        };
        if amount > h.amount {
            return Step {
                expired,
                outcome: Outcome::TooMuch(h.amount),
            };
        }
        self.holds.remove(hold_id);
        self.held -= h.amount;
        self.bal += h.amount - amount;
        if amount > 0 {
            self.pending.insert(
                tx.to_string(),
                Pending {
                    amount,
                    at_ms: now_ms,
                },
            );
        }
        self.save();
        let (released, bal) = (h.amount - amount, self.bal);
        let end = format!(
            r#"{{"state":"settled","transaction_id":"{tx}","amount":{amount},"released":{released},"balance":{bal}}}"#
        );
        self.ended.insert(hold_id.to_string(), end);
        Step {
            expired,
            outcome: Outcome::Closed(self.funds(), h),
        }
    }

    /// `hold_release.lua`: the whole hold returns to `bal`.
    pub fn hold_release(&mut self, now_ms: i64, hold_id: &str) -> Step {
        let (expired, h) = match self.open_hold(now_ms, hold_id) {
            Ok(v) => v,
            Err(step) => return step,
        };
        self.holds.remove(hold_id);
        self.held -= h.amount;
        self.bal += h.amount;
        self.save();
        self.ended
            .insert(hold_id.to_string(), r#"{"state":"released"}"#.to_string());
        Step {
            expired,
            outcome: Outcome::Closed(self.funds(), h),
        }
    }

    /// `grant_apply.lua`: add a committed grant once per grant id (no expiry
    /// of holds here).
    pub fn grant_apply(&mut self, grant_id: &str, amount: i64) -> Step {
        let applied = self.grants.insert(grant_id.to_string());
        if applied {
            self.bal += amount;
            self.save();
        }
        Step::early(Outcome::Applied(self.funds(), applied))
    }
}
