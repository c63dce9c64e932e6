//! Session events → `vscode_sessions`. Upserts keep the newest view whatever
//! the arrival order: times only move forward, fields follow the latest sighting.

use std::collections::HashMap;

use common::events::SessionUpsert;
use sqlx::{Postgres, Transaction};

use super::Effects;

pub async fn store(
    tx: &mut Transaction<'_, Postgres>,
    events: &[&SessionUpsert],
    effects: &mut Effects,
) -> Result<(), sqlx::Error> {
    // One row per session id per statement (ON CONFLICT cannot touch a row twice).
    let mut latest: HashMap<&str, &SessionUpsert> = HashMap::new();
    for s in events {
        latest
            .entry(s.session_id.as_str())
            .and_modify(|cur| {
                if s.last_seen_at > cur.last_seen_at {
                    *cur = s;
                }
            })
            .or_insert(s);
    }
    let mut rows: Vec<&SessionUpsert> = latest.into_values().collect();
    rows.sort_by(|a, b| a.session_id.cmp(&b.session_id));
    let col =
        |f: fn(&SessionUpsert) -> Option<String>| rows.iter().map(|s| f(s)).collect::<Vec<_>>();
    let ids: Vec<String> = rows.iter().map(|s| s.session_id.clone()).collect();
    let users: Vec<String> = rows.iter().map(|s| s.user_id.clone()).collect();
    let versions: Vec<String> = rows.iter().map(|s| s.extension_version.clone()).collect();
    let created: Vec<_> = rows.iter().map(|s| s.created_at).collect();
    let seen: Vec<_> = rows.iter().map(|s| s.last_seen_at).collect();
    let expires: Vec<_> = rows.iter().map(|s| s.expires_at).collect();
    sqlx::query(
        "insert into vscode_sessions as s (id, user_id, session_token, extension_version, vscode_version, \
           platform, machine_id, created_at, last_seen_at, expires_at) \
         select t.id, t.user_id, t.token, t.ver, t.vsc, t.platform, \
                case when u.status = 'deleted' then null else t.machine end, t.created, t.seen, t.expires \
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
                     $8::timestamptz[], $9::timestamptz[], $10::timestamptz[]) \
              as t(id, user_id, token, ver, vsc, platform, machine, created, seen, expires) \
         join users u on u.id = t.user_id \
         on conflict (id) do update set \
           extension_version = case when excluded.last_seen_at >= s.last_seen_at then excluded.extension_version else s.extension_version end, \
           vscode_version = case when excluded.last_seen_at >= s.last_seen_at then coalesce(excluded.vscode_version, s.vscode_version) else s.vscode_version end, \
           platform = case when excluded.last_seen_at >= s.last_seen_at then coalesce(excluded.platform, s.platform) else s.platform end, \
           machine_id = case when excluded.last_seen_at >= s.last_seen_at then coalesce(excluded.machine_id, s.machine_id) else s.machine_id end, \
           created_at = least(s.created_at, excluded.created_at), \
           last_seen_at = greatest(s.last_seen_at, excluded.last_seen_at), \
           expires_at = greatest(s.expires_at, excluded.expires_at) \
         where s.user_id = excluded.user_id",
    )
    .bind(&ids)
    .bind(&users)
    .bind(col(|s| s.session_token.clone()))
    .bind(&versions)
    .bind(col(|s| s.vscode_version.clone()))
    .bind(col(|s| s.platform.clone()))
    .bind(col(|s| s.machine_id.clone()))
    .bind(&created)
    .bind(&seen)
    .bind(&expires)
    .execute(&mut **tx)
    .await?;
    // Activity: last_active_at only moves forward.
    sqlx::query(
        "update users u set last_active_at = greatest(u.last_active_at, t.seen) \
         from (select user_id, max(seen) as seen from unnest($1::text[], $2::timestamptz[]) as x(user_id, seen) group by user_id) t \
         where u.id = t.user_id",
    )
    .bind(&users)
    .bind(&seen)
    .execute(&mut **tx)
    .await?;
    effects.stored += rows.len();
    effects.profile_users.extend(users);
    Ok(())
}
