//! User events → `users` (preferences merged, activity times forward only).

use common::events::{Envelope, Event};
use sqlx::{Postgres, Transaction};

use super::Effects;
use crate::startup::Ctx;

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
            }
            _ => {}
        }
    }
    Ok(())
}

/// Drops the cached analytics and profile of each user so the next read
/// recomputes, and bumps each one's analytics generation: a gateway that read
/// Postgres before this commit but stores its view after this drop stores it
/// under the old generation, and readers ignore it (see gateway
/// `analytics::cached`). One script per user (its keys share the user's hash
/// slot), all users' scripts pipelined in one round trip.
pub async fn drop_cached_views(
    ctx: &Ctx,
    conn: &mut deadpool_redis::Connection,
    users: &[&str],
) -> anyhow::Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    let script = drop_views_script();
    let mut pipe = redis::pipe();
    for u in users {
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(3)
            .arg(ctx.keys.analytics_index(u))
            .arg(ctx.keys.profile(u))
            .arg(ctx.keys.analytics_gen(u))
            .ignore();
    }
    match pipe.query_async::<()>(&mut **conn).await {
        Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
            // Redis restarted (or flushed its scripts): load it and go again.
            script.prepare_invoke().load_async(&mut **conn).await?;
            pipe.query_async::<()>(&mut **conn).await?;
        }
        other => other?,
    }
    Ok(())
}

/// KEYS: the user's analytics index, cached profile, analytics generation.
fn drop_views_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        redis::Script::new(
            r"
local views = redis.call('SMEMBERS', KEYS[1])
for _, k in ipairs(views) do redis.call('DEL', k) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('INCR', KEYS[3])
-- Outlives any cached view (5 min); an expired counter reads as a fresh one.
redis.call('EXPIRE', KEYS[3], 86400)
return 0
",
        )
    })
}
