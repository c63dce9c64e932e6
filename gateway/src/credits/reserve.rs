//! The Redis side of a credit decision: running a script for one user
//! (loading the user first when Redis does not hold it, entering a recovery
//! when the slot lost its data), reading the replies every keyed script
//! shares, and storing a final answer under its key.

use common::redis::scripts::{Reply, Tag};

use super::flows::publish_expired;
use super::idempotency::{Answer, Idem, Remembered};
use super::store::CreditStore;
use super::store::{durable_replay, load_into_redis};
use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::rate_limit::Deferred;
use crate::redis_link::Finish;

pub(super) fn bad_reply(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Internal(anyhow::Error::new(e))
}

pub(super) fn recovering() -> Error {
    Error::Unavailable {
        what: "credits",
        retry_after: 5,
        cause: None,
    }
}

/// Runs a credit script for one account (a user's, or an organization's pool
/// `org:ORG_ID`). `MISSING` (Redis does not hold the account yet) loads it
/// from Postgres and runs it again; `LOST` (the
/// slot's sentinel is gone) starts a recovery and answers 503. With `limit`
/// (the request's rate limit left to this script, see [`Deferred`]) the
/// first run decides it first: `LIMITED` answers 429 and changed nothing.
pub(super) async fn run(
    store: &CreditStore,
    publisher: &Publisher,
    user_id: &str,
    limit: Option<&Deferred>,
    invocation: impl Fn() -> redis::ScriptInvocation<'static>,
) -> Result<Reply> {
    for _ in 0..3 {
        let raw: Vec<String> = {
            let mut inv = invocation();
            if let Some((key, l)) = limit.and_then(Deferred::pending) {
                inv.key(key).arg(l.limit).arg(l.window_secs);
            }
            let mut conn = store.redis().await?;
            inv.invoke_async(&mut *conn).await?
        };
        let reply = Reply::parse(raw).map_err(bad_reply)?;
        if let (Some(d), Some(rl)) = (limit, reply.rate_limit) {
            let decision = d.decide(&rl.as_gcra());
            if reply.kind() == Tag::Limited {
                return Err(Error::RateLimited {
                    retry_after: decision.retry_after_secs.max(1),
                });
            }
        }
        publish_expired(publisher, user_id, &reply.expired);
        match reply.kind() {
            Tag::Lost => {
                store.recovery.enter(store).await;
                return Err(recovering());
            }
            // One load per account at a time on this gateway: the others wait for it.
            Tag::Missing => {
                let key = format!("load:{user_id}");
                if let Some(loaded) = store
                    .once
                    .run(&key, || load_into_redis(store, user_id))
                    .await
                {
                    loaded?;
                }
            }
            _ => return Ok(reply),
        }
    }
    Err(Error::Internal(anyhow::anyhow!(
        "credits of {user_id} could not be loaded into Redis"
    )))
}

/// What a keyed reservation script (`consume`, `hold_open`) is told to do with
/// the id recorded under the request's key: its `reuse` argument ("2": reserve
/// under the recorded id again, once Postgres said it was never settled).
pub(super) use common::credits::model::Reuse;

/// How a keyed reservation ended before its publish.
pub(super) enum Keyed {
    /// The script reserved (or refused with a reply of its own, e.g. `TOO_MANY`).
    Reply(Reply),
    /// The request is answered already: a remembered or durable answer.
    Answered(Answer),
}

/// Runs a keyed reservation script until it reserves or the key answers
/// (docs/credits.md, "Idempotency"). `STALE` (a record whose request started
/// past the in-progress window and never finished) replays the durable record
/// when Postgres has it, else runs again reusing the recorded id; with
/// `again`, `UNPENDING` (that id is not pending any more: settled after the
/// first look, or given back because its event is gone) does the same and
/// then reserves under the id again. `CONFLICT`, `BUSY`, `REPLAY` and
/// `INSUFFICIENT` (of `amount`) become their answers, see [`keyed_early`].
/// The script runs on `owner`'s account; durable records are `user_id`'s.
#[allow(clippy::too_many_arguments)]
pub(super) async fn reserve_keyed(
    store: &CreditStore,
    publisher: &Publisher,
    (owner, user_id): (&str, &str),
    limit: Option<&Deferred>,
    idem: Option<&Idem>,
    amount: i64,
    again: bool,
    invocation: impl Fn(Reuse) -> redis::ScriptInvocation<'static>,
) -> Result<Keyed> {
    let mut reuse = Reuse::Fresh;
    let mut waited = false;
    let reply = loop {
        let reply = run(store, publisher, owner, limit, || invocation(reuse)).await?;
        // A member's pool that no longer lists them: the caller runs on their own balance.
        if reply.kind() == Tag::NotMember {
            return Ok(Keyed::Reply(reply));
        }
        // Still running because this gateway's batcher has not written the
        // first request's answer yet: wait for that write, then look again.
        if let (Tag::Busy, Some(i), false) = (reply.kind(), idem, waited) {
            waited = true;
            if store.redis_link.finish_landed(&i.record).await {
                continue;
            }
        }
        let Some((i, next)) = idem.zip(retry_with(&reply.kind(), reuse, again)) else {
            break reply;
        };
        let recorded = reply.str(0).map_err(bad_reply)?;
        if let Some(answer) = durable_replay(store, user_id, i, recorded).await? {
            return Ok(Keyed::Answered(answer));
        }
        reuse = next;
    };
    match keyed_early(&reply).map_err(|e| with_required(e, amount))? {
        Some(answer) => Ok(Keyed::Answered(answer)),
        None => Ok(Keyed::Reply(reply)),
    }
}

/// The `reuse` of the next run of a keyed reservation after `tag`, or none
/// when `tag` is the reply to act on (see [`reserve_keyed`]).
fn retry_with(tag: &Tag, reuse: Reuse, again: bool) -> Option<Reuse> {
    match (tag, reuse) {
        (Tag::Stale, Reuse::Fresh) => Some(Reuse::Recorded),
        (Tag::Unpending, Reuse::Recorded) if again => Some(Reuse::Again),
        _ => None,
    }
}

/// Stores a final 200 answer under the request's key: handed to the
/// gateway's finish batcher (`RedisLink::finish`), which writes it off the
/// request's path. Best effort: when the write fails, the record stays in
/// progress with its id; a retry past the in-progress window replays the
/// durable record the event carried, or re-publishes under the same id,
/// which the ledger deduplicates.
pub(super) fn remember(store: &CreditStore, idem: &Idem, answer: &Remembered, id: &str, ttl: u64) {
    store.redis_link.finish(Finish {
        record: idem.record.clone(),
        hash: idem.hash.clone(),
        answer: answer.to_json(),
        ttl_ms: ttl,
        id: id.to_string(),
    });
}

/// Turns the early replies every keyed script shares into an answer.
pub(super) fn keyed_early(reply: &Reply) -> Result<Option<Answer>> {
    match reply.kind() {
        Tag::Conflict => Err(Error::IdempotencyConflict(
            "this Idempotency-Key was used with another body".into(),
        )),
        Tag::Busy => Err(Error::IdempotencyConflict(
            "a request with this Idempotency-Key is still running".into(),
        )),
        Tag::Replay => {
            let stored = reply.str(0).map_err(bad_reply)?;
            let r = Remembered::parse(stored)
                .ok_or_else(|| Error::Internal(anyhow::anyhow!("unreadable remembered answer")))?;
            Ok(Some(Answer::Replayed(r)))
        }
        Tag::Insufficient => Err(Error::InsufficientCredits {
            balance: reply.int(0).map_err(bad_reply)?,
            required: 0,
            limit: None,
        }),
        Tag::Cap => Err(Error::InsufficientCredits {
            balance: reply.int(0).map_err(bad_reply)?,
            required: 0,
            limit: Some("member_cap"),
        }),
        _ => Ok(None),
    }
}

/// A fresh 402 carries the amount asked for (the script knows only the balance).
pub(super) fn with_required(e: Error, amount: i64) -> Error {
    match e {
        Error::InsufficientCredits { balance, limit, .. } => {
            metrics::counter!("credit_decisions_total", "op" => "reserve", "outcome" => "insufficient").increment(1);
            Error::InsufficientCredits {
                balance,
                required: amount,
                limit,
            }
        }
        other => other,
    }
}

pub(super) fn expect_tag(reply: &Reply, tag: Tag) -> Result<()> {
    if reply.kind() == tag {
        Ok(())
    } else {
        Err(Error::Internal(anyhow::anyhow!(
            "unexpected credit script reply {:?}",
            reply.tag
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_record_is_reused_once_and_an_unpending_one_reserved_again_where_allowed() {
        use Reuse::*;
        assert_eq!(retry_with(&Tag::Stale, Fresh, false), Some(Recorded));
        assert_eq!(retry_with(&Tag::Stale, Fresh, true), Some(Recorded));
        assert_eq!(retry_with(&Tag::Stale, Recorded, true), None);
        assert_eq!(retry_with(&Tag::Unpending, Recorded, true), Some(Again));
        assert_eq!(retry_with(&Tag::Unpending, Recorded, false), None);
        assert_eq!(retry_with(&Tag::Unpending, Fresh, true), None);
        assert_eq!(retry_with(&Tag::Unpending, Again, true), None);
        for tag in [Tag::Ok, Tag::Busy, Tag::Conflict, Tag::Replay] {
            assert_eq!(retry_with(&tag, Fresh, true), None);
        }
        assert_eq!([Fresh, Recorded, Again].map(Reuse::arg), ["0", "1", "2"]);
    }

    #[test]
    fn early_replies_become_answers() {
        let r = |v: &[&str]| Reply::parse(v.iter().map(|s| s.to_string()).collect()).unwrap();
        assert!(matches!(
            keyed_early(&r(&["CONFLICT", "0"])),
            Err(Error::IdempotencyConflict(_))
        ));
        assert!(matches!(
            keyed_early(&r(&["BUSY", "0"])),
            Err(Error::IdempotencyConflict(_))
        ));
        assert!(matches!(
            with_required(
                keyed_early(&r(&["INSUFFICIENT", "0", "4", "0"])).unwrap_err(),
                7
            ),
            Error::InsufficientCredits {
                balance: 4,
                required: 7,
                limit: None,
            }
        ));
        assert!(matches!(
            with_required(keyed_early(&r(&["CAP", "0", "2", "0"])).unwrap_err(), 7),
            Error::InsufficientCredits {
                balance: 2,
                required: 7,
                limit: Some("member_cap"),
            }
        ));
        assert_eq!(
            keyed_early(&r(&[
                "REPLAY",
                "0",
                r#"{"status":402,"balance":1,"required":2}"#
            ]))
            .unwrap(),
            Some(Answer::Replayed(Remembered::Insufficient {
                balance: 1,
                required: 2,
                limit: None,
            }))
        );
        assert_eq!(keyed_early(&r(&["OK", "0", "1", "0", "1"])).unwrap(), None);
    }
}
