//! The credit flows of docs/api.md "Credits", §5.5b and §5.7: consume, open, settle and
//! release a hold (reserve in Redis, publish with a confirm, answer, undo
//! what surely never left) and the admin grant (Postgres first, with its
//! audit row, then Redis).

use chrono::{DateTime, TimeZone, Utc};
use common::events::{
    BatchedConsume, CreditConsume, CreditContext, Envelope, Event, HoldOpened, HoldReleased,
    HoldSettled,
};
use common::redis::scripts::{scripts, ExpiredHold, Tag, UserKeys};
use serde_json::Value;
use uuid::Uuid;

use super::answer::{to_json, ConsumeAnswer, HoldAnswer, SettleAnswer};
use super::idempotency::{
    idem_args, refused_ttl_ms, running_ms, settle_id, ttl_ms, Answer, HoldEnd, Idem, Remembered,
};
use super::orgs::{self, Account};
use super::reserve::{bad_reply, expect_tag, remember, reserve_keyed, run, Keyed, Reuse};
use super::store::CreditStore;
use crate::error::{Error, Result};
use crate::publisher::{PublishError, Publisher};
use crate::rate_limit::Deferred;

/// Whether a failed publish surely did not reach the broker (so the Redis
/// change can be undone) or may have (so it stays, and the event settles it
/// or the reconciler releases it after the confirm timeout plus 30 s).
pub fn publish_surely_failed(e: &PublishError) -> bool {
    matches!(
        e,
        PublishError::NotConnected | PublishError::Nacked | PublishError::Returned
    )
}

pub(super) fn millis_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}

pub(super) fn publish_failed(e: PublishError) -> Error {
    Error::unavailable("rabbitmq", e)
}

pub(super) async fn publish(
    publisher: &Publisher,
    user_id: &str,
    event: Event,
) -> std::result::Result<(), PublishError> {
    let env = Envelope::new(event, Some(user_id.to_string()), Utc::now());
    publisher.publish(&env).await
}

/// Publishes the `HoldReleased` of holds a script found expired. In the
/// background: the answer does not wait, and if the publish fails the worker's
/// expiry job marks them in Postgres instead.
pub(super) fn publish_expired(publisher: &Publisher, user_id: &str, expired: &[ExpiredHold]) {
    if expired.is_empty() {
        return;
    }
    metrics::counter!("credit_holds_expired_total", "by" => "gateway")
        .increment(expired.len() as u64);
    let publisher = publisher.clone();
    let user = user_id.to_string();
    let expired = expired.to_vec();
    tokio::spawn(async move {
        for h in expired {
            let Ok(hold_id) = h.hold_id.parse::<Uuid>() else {
                continue;
            };
            // On a pool, `user` is its account id (`org:ORG_ID`): the worker
            // marks the hold by its id.
            let ev = Event::HoldReleased(HoldReleased {
                hold_id,
                user_id: user.clone(),
                held: h.amount,
                reason: "expired".into(),
                org_id: common::redis::keys::Keys::org_of_account(&user).map(str::to_string),
            });
            if let Err(e) = publish(&publisher, &user, ev).await {
                tracing::warn!(error = %e, %hold_id, "expired hold not published; the worker's expiry job marks it");
            }
        }
    });
}

/// The account a user's reservation runs on, and again on their own balance
/// when the pool answered that they are no longer a member (`None`).
macro_rules! on_account {
    ($store:expr, $user_id:expr, |$acct:ident| $run:expr) => {{
        let first = orgs::account($store, $user_id).await?;
        let member = first != Account::Own;
        let $acct = &first;
        match $run.await? {
            Some(answer) => Ok(answer),
            None if member => {
                $store.memberships.forget($user_id);
                let $acct = &Account::Own;
                $run.await?.ok_or_else(|| {
                    Error::Internal(anyhow::anyhow!("a user's own balance answered NOT_MEMBER"))
                })
            }
            None => Err(Error::Internal(anyhow::anyhow!(
                "a user's own balance answered NOT_MEMBER"
            ))),
        }
    }};
}

/// A member's refusal by the pool says so (`limit: pool`).
fn pool_limit(e: Error, acct: &Account) -> Error {
    match e {
        Error::InsufficientCredits {
            balance,
            required,
            limit: None,
        } if *acct != Account::Own => Error::InsufficientCredits {
            balance,
            required,
            limit: Some("pool"),
        },
        other => other,
    }
}

/// docs/api.md "Credits": reserve, publish with confirm, answer. A member of
/// an organization spends its pool ([`orgs`]).
#[tracing::instrument(skip_all, fields(user_id, amount))]
pub async fn consume(
    store: &CreditStore,
    publisher: &Publisher,
    limit: Option<&Deferred>,
    user_id: &str,
    amount: i64,
    context: CreditContext,
    idem: Option<Idem>,
) -> Result<Answer> {
    on_account!(store, user_id, |acct| consume_on(
        store,
        publisher,
        limit,
        user_id,
        acct,
        amount,
        context.clone(),
        idem.clone()
    ))
}

#[allow(clippy::too_many_arguments)]
async fn consume_on(
    store: &CreditStore,
    publisher: &Publisher,
    limit: Option<&Deferred>,
    user_id: &str,
    acct: &Account,
    amount: i64,
    mut context: CreditContext,
    idem: Option<Idem>,
) -> Result<Option<Answer>> {
    let limit = orgs::limit_for(store, user_id, acct, limit).await?;
    context.org_id = acct.org_id().map(str::to_string);
    let owner = acct.owner(user_id);
    let idem = acct.idem(store, user_id, idem);
    let fresh = Uuid::now_v7();
    let keys = UserKeys::new(&store.keys, &owner);
    let (record, hash) = idem_args(store, &owner, idem.as_ref());
    let (ttl, running, refused) = (ttl_ms(store), running_ms(store), refused_ttl_ms(store));
    // A consume whose recorded id is not pending any more (the worker drops a
    // pending entry only after its commit, which holds the durable record)
    // may reserve under that id again.
    let invocation = |reuse: Reuse| {
        let mut inv = keys.invoke(&scripts().consume, ttl);
        inv.key(&record)
            .arg(&hash)
            .arg(fresh.to_string())
            .arg(amount)
            .arg(running)
            .arg(ttl)
            .arg(refused)
            .arg(reuse.arg());
        acct.args(&mut inv, user_id, 3);
        inv
    };
    let reply = match reserve_keyed(
        store,
        publisher,
        (&owner, user_id),
        limit,
        idem.as_ref(),
        amount,
        true,
        invocation,
    )
    .await
    .map_err(|e| pool_limit(e, acct))?
    {
        Keyed::Answered(answer) => return Ok(Some(answer)),
        Keyed::Reply(reply) if reply.kind() == Tag::NotMember => return Ok(None),
        Keyed::Reply(reply) => reply,
    };
    expect_tag(&reply, Tag::Ok)?;
    let balance = reply.int(0).map_err(bad_reply)?;
    let created = reply.flag(2).map_err(bad_reply)?;
    let tx: Uuid = reply
        .str(3)
        .map_err(bad_reply)?
        .parse()
        .map_err(bad_reply)?;
    let reused = reply.flag(4).map_err(bad_reply)?;
    let description = context.description.as_deref();
    let body = to_json(&ConsumeAnswer::new(
        tx,
        user_id,
        amount,
        balance,
        description,
        context.price.clone(),
    ));
    let event = BatchedConsume {
        id: Uuid::new_v4(),
        occurred_at: Utc::now(),
        consume: CreditConsume {
            transaction_id: tx,
            user_id: user_id.to_string(),
            amount,
            context,
        },
        idempotency: idem.as_ref().map(|i| i.durable(store, &body)),
    };
    if let Err(e) = publisher.publish_consume(event).await {
        let surely = publish_surely_failed(&e);
        let give_back = created && surely;
        // Only a fresh id that surely never left may be forgotten; any other
        // stays recorded, so a retry can never charge under a second id.
        let forget = surely && !reused;
        let undo = async {
            let mut conn = store.redis().await?;
            let mut inv = keys.invoke(&scripts().consume_undo, ttl);
            inv.key(&record)
                .arg(&hash)
                .arg(tx.to_string())
                .arg(if give_back { "1" } else { "0" })
                .arg(if forget { "1" } else { "0" });
            inv.invoke_async::<Vec<String>>(&mut *conn).await?;
            anyhow::Ok(())
        };
        if let Err(u) = undo.await {
            // The reservation stays; the reconciler releases it after the
            // confirm timeout plus 30 s, since no event will settle it.
            tracing::warn!(error = %u, "reservation not given back after a failed publish");
        }
        metrics::counter!("credit_decisions_total", "op" => "consume", "outcome" => "unavailable")
            .increment(1);
        return Err(publish_failed(e));
    }
    if let Some(idem) = &idem {
        remember(
            store,
            idem,
            &Remembered::Ok(body.clone()),
            &tx.to_string(),
            ttl,
        );
    }
    metrics::counter!("credit_decisions_total", "op" => "consume", "outcome" => "ok").increment(1);
    Ok(Some(answered(body, reused)))
}

/// A retry under a recorded id answers for the first request (whose 200 may
/// already have been sent): it says so, and the ledger has one row for both.
pub(super) fn answered(body: Value, reused: bool) -> Answer {
    if reused {
        Answer::Replayed(Remembered::Ok(body))
    } else {
        Answer::Fresh(body)
    }
}

/// docs/api.md "Credits" (holds): hold an upper bound before the model call. A
/// member's hold is on the organization's pool and counts against their cap.
#[tracing::instrument(skip_all, fields(user_id, amount))]
#[allow(clippy::too_many_arguments)]
pub async fn open_hold(
    store: &CreditStore,
    publisher: &Publisher,
    limit: Option<&Deferred>,
    user_id: &str,
    amount: i64,
    ttl_secs: u64,
    context: CreditContext,
    idem: Option<Idem>,
) -> Result<Answer> {
    on_account!(store, user_id, |acct| open_hold_on(
        store,
        publisher,
        limit,
        user_id,
        acct,
        (amount, ttl_secs),
        context.clone(),
        idem.clone()
    ))
}

#[allow(clippy::too_many_arguments)]
async fn open_hold_on(
    store: &CreditStore,
    publisher: &Publisher,
    limit: Option<&Deferred>,
    user_id: &str,
    acct: &Account,
    (amount, ttl_secs): (i64, u64),
    mut context: CreditContext,
    idem: Option<Idem>,
) -> Result<Option<Answer>> {
    let limit = orgs::limit_for(store, user_id, acct, limit).await?;
    context.org_id = acct.org_id().map(str::to_string);
    let owner = acct.owner(user_id);
    let idem = acct.idem(store, user_id, idem);
    let fresh = Uuid::now_v7();
    let keys = UserKeys::new(&store.keys, &owner);
    let (record, hash) = idem_args(store, &owner, idem.as_ref());
    let (ttl, running, refused) = (ttl_ms(store), running_ms(store), refused_ttl_ms(store));
    let max_open = store.limits.max_open_holds;
    // A hold's recorded id is reused once; `hold_open` has no `UNPENDING`.
    let invocation = |reuse: Reuse| {
        let mut inv = keys.invoke(&scripts().hold_open, ttl);
        inv.key(&record)
            .arg(&hash)
            .arg(fresh.to_string())
            .arg(amount)
            .arg(ttl_secs * 1000)
            .arg(running)
            .arg(ttl)
            .arg(refused)
            .arg(reuse.arg())
            .arg(max_open);
        acct.args(&mut inv, user_id, 3);
        inv
    };
    let reply = match reserve_keyed(
        store,
        publisher,
        (&owner, user_id),
        limit,
        idem.as_ref(),
        amount,
        false,
        invocation,
    )
    .await
    .map_err(|e| pool_limit(e, acct))?
    {
        Keyed::Answered(answer) => return Ok(Some(answer)),
        Keyed::Reply(reply) if reply.kind() == Tag::NotMember => return Ok(None),
        Keyed::Reply(reply) => reply,
    };
    match reply.kind() {
        // A retry under a recorded hold id whose hold has ended meanwhile
        // (and whose open has not landed in Postgres yet).
        Tag::Ended => return Err(Error::HoldExpired),
        Tag::TooMany => {
            metrics::counter!("credit_decisions_total", "op" => "hold", "outcome" => "too_many")
                .increment(1);
            return Err(Error::validation(
                "holds",
                format!(
                    "at most {max_open} holds may be open at once; settle or release one first"
                ),
            ));
        }
        _ => expect_tag(&reply, Tag::Ok)?,
    }
    let balance = reply.int(0).map_err(bad_reply)?;
    let held = reply.int(1).map_err(bad_reply)?;
    let expires_at = millis_to_time(reply.int(2).map_err(bad_reply)?);
    let created = reply.flag(3).map_err(bad_reply)?;
    let hold_id: Uuid = reply
        .str(4)
        .map_err(bad_reply)?
        .parse()
        .map_err(bad_reply)?;
    let reused = reply.flag(5).map_err(bad_reply)?;
    let body = to_json(&HoldAnswer {
        hold_id: hold_id.to_string(),
        amount,
        balance,
        held,
        expires_at,
    });
    let event = Event::HoldOpened(HoldOpened {
        hold_id,
        user_id: user_id.to_string(),
        amount,
        expires_at,
        context,
        idempotency: idem.as_ref().map(|i| i.durable(store, &body)),
    });
    if let Err(e) = publish(publisher, user_id, event).await {
        let surely = publish_surely_failed(&e);
        let remove = created && surely;
        let forget = surely && !reused;
        let undo = async {
            let mut conn = store.redis().await?;
            let mut inv = keys.invoke(&scripts().hold_undo, ttl);
            inv.key(&record)
                .arg(&hash)
                .arg(hold_id.to_string())
                .arg(if remove { "1" } else { "0" })
                .arg(if forget { "1" } else { "0" });
            inv.invoke_async::<Vec<String>>(&mut *conn).await?;
            anyhow::Ok(())
        };
        if let Err(u) = undo.await {
            // The hold stays and expires by itself at `expires_at`.
            tracing::warn!(error = %u, "hold not removed after a failed publish");
        }
        return Err(publish_failed(e));
    }
    if let Some(idem) = &idem {
        remember(
            store,
            idem,
            &Remembered::Ok(body.clone()),
            &hold_id.to_string(),
            ttl,
        );
    }
    metrics::counter!("credit_decisions_total", "op" => "hold", "outcome" => "ok").increment(1);
    Ok(Some(answered(body, reused)))
}

/// The key of a settle's receipt (`price`, `capped`), beside the hold's remembered end: the
/// settle script remembers only the four members it always answered, so a priced settle adds
/// these after its publish and a replay merges them back (docs/credits.md "Price book").
fn receipt_key(store: &CreditStore, user_id: &str, hold_id: Uuid) -> String {
    format!("{}receipt:{hold_id}", store.keys.hold_end_prefix(user_id))
}

/// A remembered settle's answer with its receipt merged back, when one was kept.
async fn with_receipt(store: &CreditStore, user_id: &str, hold_id: Uuid, mut body: Value) -> Value {
    let key = receipt_key(store, user_id, hold_id);
    let got = async {
        let mut conn = store.redis().await?;
        let raw: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut *conn).await?;
        anyhow::Ok(raw)
    }
    .await;
    if let (Ok(Some(raw)), Some(obj)) = (got, body.as_object_mut()) {
        if let Ok(Value::Object(extra)) = serde_json::from_str::<Value>(&raw) {
            obj.extend(extra);
        }
    }
    body
}

/// docs/api.md "Credits" (holds): settle a hold; the rest returns to the balance. Settling again
/// answers the first settle; an expired or released hold is 409. A priced amount (`context.price`)
/// that passes the hold is capped at the held amount, and the answer says `"capped": true`.
#[tracing::instrument(skip_all, fields(user_id, %hold_id, amount))]
pub async fn settle_hold(
    store: &CreditStore,
    publisher: &Publisher,
    limit: Option<&Deferred>,
    user_id: &str,
    hold_id: Uuid,
    amount: i64,
    context: CreditContext,
) -> Result<Answer> {
    let acct = orgs::account(store, user_id).await?;
    let limit = orgs::limit_for(store, user_id, &acct, limit).await?;
    let first = settle_on(
        store,
        publisher,
        limit,
        user_id,
        &acct,
        hold_id,
        amount,
        context.clone(),
    )
    .await;
    match first {
        Err(Error::HoldExpired) => {
            match orgs::hold_account(store, user_id, hold_id, &acct).await? {
                Some(other) => {
                    settle_on(
                        store, publisher, None, user_id, &other, hold_id, amount, context,
                    )
                    .await
                }
                None => Err(Error::HoldExpired),
            }
        }
        other => other,
    }
}

/// [`settle_hold`] on one account (the hold lives where it was opened).
#[allow(clippy::too_many_arguments)]
async fn settle_on(
    store: &CreditStore,
    publisher: &Publisher,
    limit: Option<&Deferred>,
    user_id: &str,
    acct: &Account,
    hold_id: Uuid,
    amount: i64,
    mut context: CreditContext,
) -> Result<Answer> {
    context.org_id = acct.org_id().map(str::to_string);
    let owner = acct.owner(user_id);
    let tx = settle_id(hold_id);
    let keys = UserKeys::new(&store.keys, &owner);
    let ttl = ttl_ms(store);
    let priced = context.price.is_some();
    let (mut amount, mut capped) = (amount, false);
    let reply = loop {
        let reply = run(store, publisher, &owner, limit, || {
            let mut inv = keys.invoke(&scripts().hold_settle, ttl);
            inv.arg(hold_id.to_string()).arg(tx.to_string()).arg(amount);
            acct.args(&mut inv, user_id, 3);
            inv
        })
        .await?;
        // A priced amount past the hold: settle the held amount instead (once).
        if reply.kind() == Tag::TooMuch && priced && !capped {
            amount = reply.int(0).map_err(bad_reply)?;
            capped = true;
            continue;
        }
        break reply;
    };
    match reply.kind() {
        Tag::Ended => {
            return match HoldEnd::parse(reply.str(0).map_err(bad_reply)?) {
                Some(HoldEnd::Settled(body)) => Ok(Answer::Replayed(Remembered::Ok(
                    with_receipt(store, &owner, hold_id, body).await,
                ))),
                _ => Err(Error::HoldExpired),
            }
        }
        Tag::Gone => return Err(Error::HoldExpired),
        Tag::TooMuch => {
            let held = reply.int(0).map_err(bad_reply)?;
            return Err(Error::validation(
                "amount",
                format!("must be at most the held amount {held}"),
            ));
        }
        _ => expect_tag(&reply, Tag::Ok)?,
    }
    let balance = reply.int(0).map_err(bad_reply)?;
    let hold_amount = reply.int(2).map_err(bad_reply)?;
    let hold_raw = reply.str(3).map_err(bad_reply)?.to_string();
    let price = context.price.clone();
    let event = Event::HoldSettled(HoldSettled {
        hold_id,
        transaction_id: tx,
        user_id: user_id.to_string(),
        held: hold_amount,
        amount,
        context,
    });
    if let Err(e) = publish(publisher, user_id, event).await {
        if publish_surely_failed(&e) {
            let undo = async {
                let mut conn = store.redis().await?;
                let mut inv = keys.invoke(&scripts().hold_unsettle, ttl);
                inv.arg(hold_id.to_string())
                    .arg(tx.to_string())
                    .arg(amount)
                    .arg(&hold_raw);
                inv.invoke_async::<Vec<String>>(&mut *conn).await?;
                anyhow::Ok(())
            };
            if let Err(u) = undo.await {
                tracing::warn!(error = %u, "hold not restored after a failed publish");
            }
        }
        return Err(publish_failed(e));
    }
    metrics::counter!("credit_decisions_total", "op" => "settle", "outcome" => "ok").increment(1);
    let answer = SettleAnswer {
        transaction_id: tx.to_string(),
        amount,
        released: hold_amount - amount,
        balance,
        price,
        capped,
    };
    if answer.price.is_some() || capped {
        // Best effort, as long as the hold's end is remembered: a replay without it
        // answers the four members the settle script remembered.
        // The members exactly as the fresh answer has them.
        let mut receipt = to_json(&answer);
        if let Some(obj) = receipt.as_object_mut() {
            obj.retain(|k, _| k == "price" || k == "capped");
        }
        let receipt = receipt.to_string();
        let key = receipt_key(store, &owner, hold_id);
        let kept = async {
            let mut conn = store.redis().await?;
            redis::cmd("SET")
                .arg(&key)
                .arg(receipt)
                .arg("PX")
                .arg(ttl)
                .query_async::<()>(&mut *conn)
                .await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = kept {
            tracing::warn!(error = %e, "settle receipt not remembered; a replay answers without it");
        }
    }
    Ok(Answer::Fresh(to_json(&answer)))
}

/// docs/api.md "Credits" (holds): release a hold whole. Releasing an ended (released or expired)
/// hold again is fine; a settled one is 409.
#[tracing::instrument(skip_all, fields(user_id, %hold_id))]
pub async fn release_hold(
    store: &CreditStore,
    publisher: &Publisher,
    limit: Option<&Deferred>,
    user_id: &str,
    hold_id: Uuid,
) -> Result<()> {
    let acct = orgs::account(store, user_id).await?;
    let limit = orgs::limit_for(store, user_id, &acct, limit).await?;
    match release_on(store, publisher, limit, user_id, &acct, hold_id).await {
        Err(Error::HoldExpired) => {
            match orgs::hold_account(store, user_id, hold_id, &acct).await? {
                Some(other) => release_on(store, publisher, None, user_id, &other, hold_id).await,
                None => Err(Error::HoldExpired),
            }
        }
        other => other,
    }
}

/// [`release_hold`] on one account.
async fn release_on(
    store: &CreditStore,
    publisher: &Publisher,
    limit: Option<&Deferred>,
    user_id: &str,
    acct: &Account,
    hold_id: Uuid,
) -> Result<()> {
    let owner = acct.owner(user_id);
    let keys = UserKeys::new(&store.keys, &owner);
    let ttl = ttl_ms(store);
    let reply = run(store, publisher, &owner, limit, || {
        let mut inv = keys.invoke(&scripts().hold_release, ttl);
        inv.arg(hold_id.to_string());
        acct.args(&mut inv, user_id, 3);
        inv
    })
    .await?;
    match reply.kind() {
        Tag::Ended => {
            return match HoldEnd::parse(reply.str(0).map_err(bad_reply)?) {
                Some(HoldEnd::Released | HoldEnd::Expired) => Ok(()),
                _ => Err(Error::HoldExpired),
            }
        }
        Tag::Gone => return Err(Error::HoldExpired),
        _ => expect_tag(&reply, Tag::Ok)?,
    }
    let hold_amount = reply.int(2).map_err(bad_reply)?;
    let hold_raw = reply.str(3).map_err(bad_reply)?.to_string();
    let event = Event::HoldReleased(HoldReleased {
        hold_id,
        user_id: user_id.to_string(),
        held: hold_amount,
        reason: "released".into(),
        org_id: acct.org_id().map(str::to_string),
    });
    if let Err(e) = publish(publisher, user_id, event).await {
        if publish_surely_failed(&e) {
            let undo = async {
                let mut conn = store.redis().await?;
                let mut inv = keys.invoke(&scripts().hold_unrelease, ttl);
                inv.arg(hold_id.to_string()).arg(&hold_raw);
                inv.invoke_async::<Vec<String>>(&mut *conn).await?;
                anyhow::Ok(())
            };
            if let Err(u) = undo.await {
                tracing::warn!(error = %u, "hold not restored after a failed publish");
            }
        }
        return Err(publish_failed(e));
    }
    metrics::counter!("credit_decisions_total", "op" => "release", "outcome" => "ok").increment(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sure_publish_failures_are_undone() {
        assert!(publish_surely_failed(&PublishError::NotConnected));
        assert!(publish_surely_failed(&PublishError::Nacked));
        assert!(!publish_surely_failed(&PublishError::Timeout));
        assert!(!publish_surely_failed(&PublishError::Broker(
            "reset".into()
        )));
    }
}
