//! Credit events → the ledger, through `consume_credits_with_session()` in
//! *settle* mode (the gateway already granted them), and `credit_holds`.
//! Every path is idempotent by event id and works in any arrival order: a
//! settle or release that arrives before its hold's open creates the hold row
//! in its final state, and the late open then changes nothing.

use common::events::{CreditContext, Envelope, Event};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::Effects;
use crate::startup::Ctx;

pub async fn store(
    tx: &mut Transaction<'_, Postgres>,
    envs: &[&Envelope],
    effects: &mut Effects,
) -> Result<(), sqlx::Error> {
    for env in envs {
        match &env.event {
            Event::CreditConsume(c) => {
                if settle(tx, c.transaction_id, &c.user_id, c.amount, &c.context, None).await? {
                    effects.stored += 1;
                    // The user's own state change, audited once (with the ledger row).
                    audit(
                        tx,
                        &c.user_id,
                        "credits.consume",
                        env.id,
                        serde_json::json!({
                            "amount": c.amount, "transaction_id": c.transaction_id,
                        }),
                    )
                    .await?;
                }
                effects.settled.push((c.user_id.clone(), c.transaction_id));
                effects.credit_users.insert(c.user_id.clone());
            }
            Event::HoldOpened(h) => {
                let n = sqlx::query(
                    // A deleted user's holds keep no free-form data, even ones still queued.
                    "insert into credit_holds (id, user_id, amount, status, session_id, model, provider, metadata, expires_at, created_at) \
                     select $1, $2, $3, 'open', $4, $5, $6, case when u.status = 'deleted' then null else $7::jsonb end, $8, $9 \
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
                .execute(&mut **tx)
                .await?
                .rows_affected();
                effects.stored += n as usize;
                effects.credit_users.insert(h.user_id.clone());
            }
            Event::HoldSettled(h) => {
                sqlx::query(
                    "insert into credit_holds (id, user_id, amount, status, settled_amount, transaction_id, expires_at, ended_at) \
                     values ($1, $2, $3, 'settled', $4, $5, now(), now()) \
                     on conflict (id) do update set status = 'settled', settled_amount = excluded.settled_amount, \
                       transaction_id = excluded.transaction_id, ended_at = coalesce(credit_holds.ended_at, now())",
                )
                .bind(h.hold_id)
                .bind(&h.user_id)
                .bind(h.held)
                .bind(h.amount)
                .bind(h.transaction_id)
                .execute(&mut **tx)
                .await?;
                if settle(
                    tx,
                    h.transaction_id,
                    &h.user_id,
                    h.amount,
                    &h.context,
                    Some(h.hold_id),
                )
                .await?
                {
                    effects.stored += 1;
                }
                effects.settled.push((h.user_id.clone(), h.transaction_id));
                effects.credit_users.insert(h.user_id.clone());
            }
            Event::HoldReleased(h) => {
                let status = if h.reason == "expired" {
                    "expired"
                } else {
                    "released"
                };
                sqlx::query(
                    "insert into credit_holds (id, user_id, amount, status, expires_at, ended_at) \
                     values ($1, $2, $3, $4, now(), now()) \
                     on conflict (id) do update set \
                       status = case when credit_holds.status = 'open' then excluded.status else credit_holds.status end, \
                       ended_at = coalesce(credit_holds.ended_at, now())",
                )
                .bind(h.hold_id)
                .bind(&h.user_id)
                .bind(h.held.max(1))
                .bind(status)
                .execute(&mut **tx)
                .await?;
                effects.credit_users.insert(h.user_id.clone());
            }
            _ => {}
        }
    }
    Ok(())
}

/// Settles one granted amount; returns whether a new ledger row was written.
async fn settle(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    user_id: &str,
    amount: i64,
    c: &CreditContext,
    hold_id: Option<Uuid>,
) -> Result<bool, sqlx::Error> {
    if amount == 0 {
        return Ok(false);
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
    .bind(&c.metadata)
    .bind(hold_id)
    .fetch_one(&mut **tx)
    .await?;
    Ok(applied)
}

/// After commit: the settled reservations leave the user's pending set, and
/// the balance's `as_of` advances.
pub async fn after_commit(ctx: &Ctx, effects: &Effects) -> anyhow::Result<()> {
    if effects.settled.is_empty() && effects.credit_users.is_empty() {
        return Ok(());
    }
    let mut conn = ctx.redis.get().await?;
    let mut pipe = redis::pipe();
    for (user, id) in &effects.settled {
        pipe.hdel(ctx.keys.pending(user), id.to_string()).ignore();
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for user in &effects.credit_users {
        pipe.hset(ctx.keys.credits(user), "as_of", &now).ignore();
    }
    pipe.query_async::<()>(&mut *conn).await?;
    Ok(())
}

/// An audit row for a user's own credit movement, written in the same
/// transaction as the ledger row (so exactly once per event).
async fn audit(
    tx: &mut Transaction<'_, Postgres>,
    user_id: &str,
    action: &str,
    event_id: Uuid,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into audit_log (actor, action, target, request_id, details) values ($1, $2, $1, $3, $4)",
    )
    .bind(user_id)
    .bind(action)
    .bind(event_id.to_string())
    .bind(details)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
