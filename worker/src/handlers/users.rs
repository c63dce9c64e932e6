//! User events → `users` (preferences merged, activity times forward only).

use common::events::{Envelope, Event};
use sqlx::{Postgres, Transaction};

use super::Effects;
use crate::ctx::Ctx;

pub async fn store(
    tx: &mut Transaction<'_, Postgres>,
    envs: &[&Envelope],
    effects: &mut Effects,
) -> Result<(), sqlx::Error> {
    for env in envs {
        match &env.event {
            Event::UserPreferences(p) => {
                // A deleted account keeps no preferences, even ones still queued.
                sqlx::query(
                    "update users set preferences = preferences || $2::jsonb, updated_at = now() \
                     where id = $1 and status <> 'deleted' and jsonb_typeof($2::jsonb) = 'object'",
                )
                .bind(&p.user_id)
                .bind(&p.patch)
                .execute(&mut **tx)
                .await?;
                // Audited once per event; only the keys, since values may be
                // personal data that an erasure must not leave behind.
                let keys: Vec<&String> = p
                    .patch
                    .as_object()
                    .map(|o| o.keys().collect())
                    .unwrap_or_default();
                sqlx::query(
                    "insert into audit_log (actor, action, target, request_id, details) \
                     select $1, 'user.preferences', $1, $2, $3 \
                     where not exists (select 1 from audit_log where target = $1 and request_id = $2)",
                )
                .bind(&p.user_id)
                .bind(env.id.to_string())
                .bind(serde_json::json!({"keys": keys}))
                .execute(&mut **tx)
                .await?;
                effects.stored += 1;
                effects.profile_users.insert(p.user_id.clone());
            }
            Event::UserActivity(a) => {
                sqlx::query(
                    "update users set last_active_at = greatest(last_active_at, $2) where id = $1",
                )
                .bind(&a.user_id)
                .bind(a.at)
                .execute(&mut **tx)
                .await?;
                effects.stored += 1;
                // `last_active_at` is part of the cached profile.
                effects.profile_users.insert(a.user_id.clone());
            }
            _ => {}
        }
    }
    Ok(())
}

/// Makes each user's cached analytics and profile unservable: bumps the
/// user's cache generation (`Keys::analytics_gen`; a cached analytics view or
/// profile records the generation it was computed under, and the gateway
/// serves only one of the current generation), so a gateway that read
/// Postgres before this commit but stores its copy after it stores it under
/// the old generation, and readers ignore it. The profile is also deleted
/// (it is one key per user); the old analytics views are not: they are never
/// served again and expire with their TTL (5 min). See docs/architecture.md,
/// "Profile cache". Plain commands, every user's pipelined in one
/// round trip: a script per user cost Redis ≈ 22 µs each, these ≈ 5 µs.
pub async fn drop_cached_views(
    ctx: &Ctx,
    conn: &mut common::redis::PoolConn,
    users: &[&str],
) -> anyhow::Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for u in users {
        let gen = ctx.keys.analytics_gen(u);
        pipe.incr(&gen, 1)
            .ignore()
            // Outlives any cached view (5 min); an expired counter reads as a
            // fresh one, and no view of that age is left to be served.
            .expire(&gen, 86_400)
            .ignore()
            .del(ctx.keys.profile(u))
            .ignore();
    }
    pipe.query_async::<()>(&mut **conn).await?;
    Ok(())
}
