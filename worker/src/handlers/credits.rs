//! Credit events → the ledger, through `consume_credits_with_session()` in
//! *settle* mode (the gateway already granted them), and `credit_holds`.
//! Every path is idempotent by event id and works in any arrival order: a
//! settle or release that arrives before its hold's open creates the hold row
//! in its final state, and the late open then changes nothing.
//!
//! A keyed consume or hold open carries its idempotency record; it is stored
//! in `idempotency_records` in the same transaction as the ledger (or hold)
//! row, so a durable record exists exactly when its movement does
//! (docs/credits.md, "Idempotency").

use common::events::{CreditConsume, CreditContext, Envelope, Event, IdempotencyRecord};
use common::redis::keys::Keys;
use common::redis::scripts::{scripts, UserKeys};
use serde_json::Value;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::Effects;
use crate::ctx::Ctx;

/// One consume to settle: the event's id (audit `request_id`), the consume,
/// and its idempotency record when it had a key.
pub struct ConsumeRow<'a> {
    pub event_id: Uuid,
    pub consume: &'a CreditConsume,
    pub idempotency: Option<&'a IdempotencyRecord>,
    /// The publishing request's id when the consume does not carry its own.
    pub request_id: Option<&'a str>,
}

/// The consumes of a batch, whether they came one per message or grouped.
pub fn consumes<'a>(envs: &[&'a Envelope]) -> Vec<ConsumeRow<'a>> {
    let mut rows = Vec::new();
    for env in envs {
        match &env.event {
            Event::CreditConsume(c) => rows.push(ConsumeRow {
                event_id: env.id,
                consume: c,
                idempotency: None,
                request_id: env.request_id.as_deref(),
            }),
            Event::CreditConsumeBatch(b) => rows.extend(b.consumes.iter().map(|c| ConsumeRow {
                event_id: c.id,
                consume: &c.consume,
                idempotency: c.idempotency.as_ref(),
                request_id: env.request_id.as_deref(),
            })),
            _ => {}
        }
    }
    rows
}

pub async fn store(
    tx: &mut Transaction<'_, Postgres>,
    envs: &[&Envelope],
    effects: &mut Effects,
) -> Result<(), sqlx::Error> {
    let rows = consumes(envs);
    if !rows.is_empty() {
        effects.stored += settle_consumes(tx, &rows).await?;
        for r in &rows {
            let c = r.consume;
            let owner = account(&c.user_id, &c.context);
            effects.settled.push((owner.clone(), c.transaction_id));
            effects.credit_users.insert(owner);
        }
    }
    for env in envs {
        match &env.event {
            Event::HoldOpened(h) => {
                let n = sqlx::query(
                    // A deleted user's holds keep no free-form data, even ones still queued.
                    "insert into credit_holds (id, user_id, amount, status, session_id, model, provider, metadata, expires_at, created_at, org_id) \
                     select $1, $2, $3, 'open', $4, $5, $6, case when u.status = 'deleted' then null else $7::jsonb end, $8, $9, $10 \
                     from (select 1) one left join users u on u.id = $2 \
                     on conflict (id) do nothing",
                )
                .bind(h.hold_id)
                .bind(&h.user_id)
                .bind(h.amount)
                .bind(&h.context.session_id)
                .bind(&h.context.model)
                .bind(&h.context.provider)
                .bind(&h.context.metadata)
                .bind(h.expires_at)
                .bind(env.occurred_at)
                .bind(&h.context.org_id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                effects.stored += n as usize;
                if let Some(rec) = &h.idempotency {
                    store_records(tx, &[(h.user_id.as_str(), rec, h.hold_id)]).await?;
                }
                effects.credit_users.insert(account(&h.user_id, &h.context));
            }
            Event::HoldSettled(h) => {
                sqlx::query(
                    "insert into credit_holds (id, user_id, amount, status, settled_amount, transaction_id, expires_at, ended_at, org_id) \
                     values ($1, $2, $3, 'settled', $4, $5, now(), now(), $6) \
                     on conflict (id) do update set status = 'settled', settled_amount = excluded.settled_amount, \
                       transaction_id = excluded.transaction_id, ended_at = coalesce(credit_holds.ended_at, now())",
                )
                .bind(h.hold_id)
                .bind(&h.user_id)
                .bind(h.held)
                .bind(h.amount)
                .bind(h.transaction_id)
                .bind(&h.context.org_id)
                .execute(&mut **tx)
                .await?;
                if settle(
                    tx,
                    h.transaction_id,
                    &h.user_id,
                    h.amount,
                    &h.context,
                    env.request_id.as_deref(),
                    Some(h.hold_id),
                )
                .await?
                {
                    effects.stored += 1;
                }
                let owner = account(&h.user_id, &h.context);
                effects.settled.push((owner.clone(), h.transaction_id));
                effects.credit_users.insert(owner);
            }
            // A hold a gateway found expired on a pool names the pool's account,
            // not the member: only its row (once its open landed) is marked.
            Event::HoldReleased(h) if Keys::org_of_account(&h.user_id).is_some() => {
                sqlx::query(
                    "update credit_holds set status = 'expired', ended_at = coalesce(ended_at, now()) \
                     where id = $1 and status = 'open'",
                )
                .bind(h.hold_id)
                .execute(&mut **tx)
                .await?;
                effects.credit_users.insert(h.user_id.clone());
            }
            Event::HoldReleased(h) => {
                let status = if h.reason == "expired" {
                    "expired"
                } else {
                    "released"
                };
                sqlx::query(
                    "insert into credit_holds (id, user_id, amount, status, expires_at, ended_at, org_id) \
                     values ($1, $2, $3, $4, now(), now(), $5) \
                     on conflict (id) do update set \
                       status = case when credit_holds.status = 'open' then excluded.status else credit_holds.status end, \
                       ended_at = coalesce(credit_holds.ended_at, now())",
                )
                .bind(h.hold_id)
                .bind(&h.user_id)
                .bind(h.held.max(1))
                .bind(status)
                .bind(&h.org_id)
                .execute(&mut **tx)
                .await?;
                effects.credit_users.insert(match &h.org_id {
                    Some(org) => Keys::org_account(org),
                    None => h.user_id.clone(),
                });
            }
            _ => {}
        }
    }
    // Spend alerts crossed by these rows, in this transaction (docs/credits.md "Spend alerts").
    crate::alerts::crossing::record(tx, &effects.settled).await?;
    Ok(())
}

/// Settles a batch's consumes through `settle_consumes()` (migration 0004):
/// the users' rows locked in id order, then one statement that writes the
/// new ledger rows with their `balance_after` chain, moves each balance once
/// by the sum, and audits each consume, exactly once per transaction id.
/// Then the idempotency records of keyed consumes, in the same transaction.
/// Returns how many ledger rows are new. A consume of a user Postgres does
/// not know refuses the call (P0002): refused data, dead-lettered like a
/// single settle would be.
async fn settle_consumes(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[ConsumeRow<'_>],
) -> Result<usize, sqlx::Error> {
    let col = |f: fn(&CreditConsume) -> Option<String>| -> Vec<Option<String>> {
        rows.iter().map(|r| f(r.consume)).collect()
    };
    let ids: Vec<Uuid> = rows.iter().map(|r| r.consume.transaction_id).collect();
    let events: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
    let amounts: Vec<i64> = rows.iter().map(|r| r.consume.amount).collect();
    let prompt: Vec<Option<i64>> = rows
        .iter()
        .map(|r| r.consume.context.prompt_tokens)
        .collect();
    let completion: Vec<Option<i64>> = rows
        .iter()
        .map(|r| r.consume.context.completion_tokens)
        .collect();
    let n: i64 = sqlx::query_scalar(
        "select settle_consumes($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(&ids)
    .bind(&events)
    .bind(
        rows.iter()
            .map(|r| r.consume.user_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(&amounts)
    .bind(col(|c| c.context.session_id.clone()))
    .bind(col(|c| c.context.model.clone()))
    .bind(col(|c| c.context.provider.clone()))
    .bind(&prompt)
    .bind(&completion)
    .bind(col(|c| c.context.feature.clone()))
    .bind(col(|c| c.context.description.clone()))
    .bind(
        rows.iter()
            .map(|r| ledger_metadata(&r.consume.context, r.request_id).map(|m| m.to_string()))
            .collect::<Vec<_>>(),
    )
    .bind(col(|c| c.context.org_id.clone()))
    .fetch_one(&mut **tx)
    .await?;
    let receipts: Vec<(Uuid, &CreditContext)> = rows
        .iter()
        .map(|r| (r.consume.transaction_id, &r.consume.context))
        .collect();
    store_receipts(tx, &receipts).await?;
    let records: Vec<(&str, &IdempotencyRecord, Uuid)> = rows
        .iter()
        .filter_map(|r| {
            let c = r.consume;
            r.idempotency
                .map(|rec| (c.user_id.as_str(), rec, c.transaction_id))
        })
        .collect();
    store_records(tx, &records).await?;
    Ok(n as usize)
}

/// Writes each new ledger row's receipt (`price`, the entry and tokens it was
/// priced by) and `cached_tokens`, in the transaction that wrote the row
/// (docs/credits.md "Price book"). Only a row without a price gets one, so a
/// redelivered event changes nothing.
async fn store_receipts(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[(Uuid, &CreditContext)],
) -> Result<(), sqlx::Error> {
    let rows: Vec<&(Uuid, &CreditContext)> = rows
        .iter()
        .filter(|(_, c)| c.price.is_some() || c.cached_tokens.is_some())
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let prices: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.1.price.as_ref().map(|p| serde_json::json!(p).to_string()))
        .collect();
    let cached: Vec<Option<i64>> = rows.iter().map(|r| r.1.cached_tokens).collect();
    sqlx::query(
        "update credit_transactions t set price = r.price::jsonb, cached_tokens = r.cached \
         from unnest($1::uuid[], $2::text[], $3::int8[]) as r(id, price, cached) \
         where t.id = r.id and t.price is null and t.cached_tokens is null",
    )
    .bind(&ids)
    .bind(&prices)
    .bind(&cached)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Stores durable idempotency records (user, record, the movement's id), in
/// the transaction of their movements. A live record is never replaced (a
/// repeated or retried event changes nothing); an expired one that the
/// housekeeping has not deleted yet is, since its key was used again. Records
/// already expired, and those of deleted users, are not kept.
pub async fn store_records(
    tx: &mut Transaction<'_, Postgres>,
    records: &[(&str, &IdempotencyRecord, Uuid)],
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = records.iter().map(|r| r.0).collect();
    let routes: Vec<&str> = records.iter().map(|r| r.1.route.as_str()).collect();
    let keys: Vec<&str> = records.iter().map(|r| r.1.key.as_str()).collect();
    let hashes: Vec<&str> = records.iter().map(|r| r.1.body_hash.as_str()).collect();
    let answers: Vec<String> = records.iter().map(|r| r.1.answer.to_string()).collect();
    let ids: Vec<Uuid> = records.iter().map(|r| r.2).collect();
    let expires: Vec<chrono::DateTime<chrono::Utc>> =
        records.iter().map(|r| r.1.expires_at).collect();
    // One row per key even if a batch carries a request and its retry.
    sqlx::query(
        "insert into idempotency_records (user_id, route, key, body_hash, answer, transaction_id, expires_at) \
         select distinct on (r.user_id, r.route, r.key) \
                r.user_id, r.route, r.key, r.body_hash, r.answer::jsonb, r.id, r.expires_at \
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[], $7::timestamptz[]) \
              as r(user_id, route, key, body_hash, answer, id, expires_at) \
         join users u on u.id = r.user_id \
         where r.expires_at > now() and u.status <> 'deleted' \
         order by r.user_id, r.route, r.key, r.expires_at \
         on conflict (user_id, route, key) do update set \
           body_hash = excluded.body_hash, answer = excluded.answer, \
           transaction_id = excluded.transaction_id, created_at = now(), expires_at = excluded.expires_at \
         where idempotency_records.expires_at <= now()",
    )
    .bind(&users)
    .bind(&routes)
    .bind(&keys)
    .bind(&hashes)
    .bind(&answers)
    .bind(&ids)
    .bind(&expires)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A ledger row's metadata: the client's, with the id of the request that
/// moved the credits (SPEC §5) under `request_id` (the movement's own, else
/// its message's). A client's own `request_id` key is kept as it sent it, never
/// overwritten; metadata that is not an object is kept as it is.
pub fn ledger_metadata(c: &CreditContext, message_request_id: Option<&str>) -> Option<Value> {
    let Some(id) = c.request_id.as_deref().or(message_request_id) else {
        return c.metadata.clone();
    };
    match &c.metadata {
        None => Some(serde_json::json!({ "request_id": id })),
        Some(Value::Object(m)) if !m.contains_key("request_id") => {
            let mut m = m.clone();
            m.insert("request_id".into(), id.into());
            Some(Value::Object(m))
        }
        Some(other) => Some(other.clone()),
    }
}

/// Settles one granted amount; returns whether a new ledger row was written.
async fn settle(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    user_id: &str,
    amount: i64,
    c: &CreditContext,
    request_id: Option<&str>,
    hold_id: Option<Uuid>,
) -> Result<bool, sqlx::Error> {
    if amount == 0 {
        return Ok(false);
    }
    if let Some(org_id) = &c.org_id {
        // A member's settle draws from the pool (migration 0009).
        let applied: bool = sqlx::query_scalar(
            "select settle_member_charge($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(id)
        .bind(user_id)
        .bind(org_id)
        .bind(amount)
        .bind(&c.session_id)
        .bind(&c.model)
        .bind(&c.provider)
        .bind(c.prompt_tokens)
        .bind(c.completion_tokens)
        .bind(&c.feature)
        .bind(&c.description)
        .bind(ledger_metadata(c, request_id))
        .bind(hold_id)
        .fetch_one(&mut **tx)
        .await?;
        if applied {
            store_receipts(tx, &[(id, c)]).await?;
        }
        return Ok(applied);
    }
    // Deleted users' ledger rows keep no free-form data.
    let (applied,): (bool,) = sqlx::query_as(
        "select r.applied from users u, lateral consume_credits_with_session($1, $2, $3, 'settle', $4, $5, $6, $7, $8, $9, \
           case when u.status = 'deleted' then null else $10 end, \
           case when u.status = 'deleted' then null else $11::jsonb end, $12) r where u.id = $2",
    )
    .bind(id)
    .bind(user_id)
    .bind(amount)
    .bind(&c.session_id)
    .bind(&c.model)
    .bind(&c.provider)
    .bind(c.prompt_tokens)
    .bind(c.completion_tokens)
    .bind(&c.feature)
    .bind(&c.description)
    .bind(ledger_metadata(c, request_id))
    .bind(hold_id)
    .fetch_one(&mut **tx)
    .await?;
    if applied {
        store_receipts(tx, &[(id, c)]).await?;
    }
    Ok(applied)
}

/// The account a movement's Redis reservation lives on: the user's, or the
/// pool's (`org:ORG_ID`) for an organization member's.
fn account(user_id: &str, c: &CreditContext) -> String {
    match &c.org_id {
        Some(org) => Keys::org_account(org),
        None => user_id.to_string(),
    }
}

/// After commit: the settled reservations leave the account's pending set, and
/// the balance's `as_of` advances. On a pool, `drop_settled.lua` removes them,
/// so a member's amount counts as settled against their cap in the same step.
pub async fn after_commit(ctx: &Ctx, effects: &Effects) -> anyhow::Result<()> {
    if effects.settled.is_empty() && effects.credit_users.is_empty() {
        return Ok(());
    }
    let mut conn = ctx.redis.get().await?;
    let mut pools: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    let mut pipe = redis::pipe();
    for (owner, id) in &effects.settled {
        if Keys::org_of_account(owner).is_some() {
            pools
                .entry(owner.as_str())
                .or_default()
                .push(id.to_string());
        } else {
            pipe.hdel(ctx.keys.pending(owner), id.to_string()).ignore();
        }
    }
    for (owner, ids) in pools {
        let keys = UserKeys::new(&ctx.keys, owner);
        let mut inv = keys.invoke(&scripts().drop_settled, crate::jobs::ttl_ms(ctx));
        for id in &ids {
            inv.arg(id);
        }
        inv.invoke_async::<Vec<String>>(&mut *conn).await?;
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for user in &effects.credit_users {
        pipe.hset(ctx.keys.credits(user), "as_of", &now).ignore();
    }
    pipe.query_async::<()>(&mut *conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_ledger_metadata_gains_the_request_id_without_overwriting_the_clients() {
        let mut c = CreditContext::default();
        assert_eq!(ledger_metadata(&c, None), None);
        assert_eq!(
            ledger_metadata(&c, Some("m")),
            Some(json!({"request_id": "m"}))
        );
        c.request_id = Some("r".into());
        assert_eq!(
            ledger_metadata(&c, Some("m")),
            Some(json!({"request_id": "r"}))
        );
        c.metadata = Some(json!({"k": 1}));
        assert_eq!(
            ledger_metadata(&c, None),
            Some(json!({"k": 1, "request_id": "r"}))
        );
        c.metadata = Some(json!({"request_id": "clients"}));
        assert_eq!(
            ledger_metadata(&c, None),
            Some(json!({"request_id": "clients"}))
        );
    }
}
