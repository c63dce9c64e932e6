//! Hold expiry (docs/api.md "Credits" (holds)), run by one worker at a time (advisory lock, see
//! `jobs`): holds still open in Postgres past `expires_at` plus a grace are
//! released in Redis (if Redis still holds them; the script decides once) and
//! marked `expired` in Postgres. Gateways release expired holds lazily first
//! and publish the event; this job covers users nobody calls and events that
//! were never published, so no credit is ever stuck.

use common::redis::keys::Keys;
use common::redis::scripts::{scripts, Tag, UserKeys};
use uuid::Uuid;

use super::{call, ttl_ms};
use crate::ctx::Ctx;

/// Expires holds still open in Postgres past `expires_at` plus the grace.
/// Returns how many were marked.
pub async fn expire_holds(ctx: &Ctx) -> anyhow::Result<usize> {
    let grace = ctx.settings.credits.hold_expiry_grace_secs as f64;
    let due: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
        "select id, user_id, org_id from credit_holds \
         where status = 'open' and expires_at < now() - make_interval(secs => $1) \
         order by expires_at limit 1000",
    )
    .bind(grace)
    .fetch_all(&ctx.pg)
    .await?;
    let mut marked = 0;
    for (hold_id, user_id, org_id) in due {
        // A member's hold is on the organization's pool (docs/credits.md "Organizations").
        let owner = org_id.as_deref().map(Keys::org_account);
        let keys = UserKeys::new(&ctx.keys, owner.as_deref().unwrap_or(&user_id));
        let mut inv = keys.invoke(&scripts().expire_hold, ttl_ms(ctx));
        inv.arg(hold_id.to_string());
        let r = call(ctx, inv).await?;
        match r.kind() {
            // Redis's clock is behind Postgres's: next run.
            Tag::NotDue => continue,
            Tag::Released => {
                metrics::counter!("credit_holds_expired_total", "by" => "worker")
                    .increment(r.expired.len() as u64);
                for h in &r.expired {
                    let Ok(id) = h.hold_id.parse::<Uuid>() else {
                        continue;
                    };
                    // On a pool, the other holds it released are other members':
                    // their rows are marked where they exist.
                    if owner.is_some() {
                        marked += sqlx::query(
                            "update credit_holds set status = 'expired', ended_at = now() \
                             where id = $1 and status = 'open'",
                        )
                        .bind(id)
                        .execute(&ctx.pg)
                        .await?
                        .rows_affected() as usize;
                        continue;
                    }
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
