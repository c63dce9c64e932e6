//! The I/O of API keys (see the parent module for the rules): Postgres is the
//! truth, Redis holds one record per key hash for verification, and each
//! gateway keeps what it read for at most `api_keys.cache_ttl_ms`.
//!
//! Writes reach Redis inside their Postgres transaction, before the commit,
//! so a Redis failure rolls them back (503) rather than leaving a key that
//! Postgres revoked alive in Redis; after the commit the record is written
//! once more, which heals a Redis loss that fell between the two.
//!
//! Rebuilds ([`ApiKeyStore::rebuild`], from the watcher) write records with
//! `SET NX`, and revocations write a tombstone (not a delete), so a rebuild
//! that read a key as live just before its revocation committed cannot bring
//! it back: either its `SET NX` finds the tombstone, or the tombstone comes
//! after and replaces it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use common::redis::keys::Keys;
use common::settings::ApiKeySettings;
use futures_util::TryStreamExt;
use serde::{Serialize, Serializer};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{decide, encode_record, generate, hex, well_formed, Found, Grant, Scope};
use crate::audit::{self, Action};
use crate::error::{Error, Result};
use crate::redis_link::RedisLink;

/// A tombstone outlives any rebuild that could race its revocation by far;
/// after it, the key is simply unknown.
const TOMBSTONE_SECS: u64 = 86_400;
/// `last_used_at` resolution: written at most once per this per key.
const LAST_USED_SECS: u64 = 60;
/// The longest a gateway may trust a record it read (revocation within 5 s).
const MAX_CACHE_TTL_MS: u64 = 3_000;
/// Entries of the in-process cache; past it, expired ones go first, and
/// unknown keys are no longer remembered (a spray cannot grow it).
const CACHE_ENTRIES: usize = 10_000;
/// How often the watcher looks for lost records.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// Rows a rebuild writes per pipeline.
const REBUILD_CHUNK: usize = 1_000;

/// Why a key is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("malformed API key")]
    Malformed,
    #[error("unknown or revoked API key")]
    Unknown,
    /// Redis and Postgres could not say (503).
    #[error(transparent)]
    Unavailable(Error),
}

/// When a key was read, and what it was.
type Seen = (Instant, Option<Grant>);

/// What this gateway read lately, by key hash: a grant, or `None` for a key
/// that is unknown or revoked.
struct Cache {
    ttl: Duration,
    map: Mutex<HashMap<[u8; 32], Seen>>,
}

impl Cache {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, hash: &[u8; 32], now: Instant) -> Option<Option<Grant>> {
        let map = self.map.lock().expect("cache lock");
        let (at, grant) = map.get(hash)?;
        (now.duration_since(*at) < self.ttl).then(|| grant.clone())
    }

    fn put(&self, hash: [u8; 32], grant: Option<Grant>, now: Instant) {
        let mut map = self.map.lock().expect("cache lock");
        if map.len() >= CACHE_ENTRIES {
            map.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
            if map.len() >= CACHE_ENTRIES {
                if grant.is_none() {
                    return;
                }
                map.clear();
            }
        }
        map.insert(hash, (now, grant));
    }

    fn forget(&self, hash: &[u8; 32]) {
        self.map.lock().expect("cache lock").remove(hash);
    }
}

/// The handles API keys need, built once in `startup::app_state`.
#[derive(Clone)]
pub struct ApiKeyStore {
    pg: PgPool,
    redis_link: Arc<RedisLink>,
    keys: Keys,
    max_per_user: usize,
    cache: Arc<Cache>,
    /// Set when a lookup found a bucket without its marker: the watcher
    /// rebuilds (a partial loss, e.g. one cluster node, keeps the global one).
    rebuild_wanted: Arc<AtomicBool>,
}

/// `POST /api/users/{id}/api-keys`: the key, shown this once (201).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    pub key_id: Uuid,
    /// The key itself (`vsk_` + 43 characters). Never shown again: only its hash is stored.
    pub key: String,
    /// The key's first characters, as lists show them.
    pub prefix: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    #[serde(serialize_with = "rfc3339_millis")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
}

/// One live key in a list (never the key itself).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    pub key_id: Uuid,
    /// The key's first characters (`vsk_` + 8).
    pub prefix: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    #[serde(serialize_with = "rfc3339_millis")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// When the key was last used, to the minute (written at most once a
    /// minute per key); null if never.
    #[serde(serialize_with = "rfc3339_millis_opt")]
    #[schema(value_type = Option<String>, format = DateTime, required = true)]
    pub last_used_at: Option<DateTime<Utc>>,
}

/// `GET /api/users/{id}/api-keys`: the live keys, oldest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyList {
    pub api_keys: Vec<KeyView>,
}

fn rfc3339_millis<S: Serializer>(t: &DateTime<Utc>, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn rfc3339_millis_opt<S: Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339_millis(t, s),
        None => s.serialize_none(),
    }
}

/// The scopes of a row (the table's check allows only known names).
fn scopes_of(names: &[String]) -> Vec<Scope> {
    names.iter().filter_map(|n| Scope::parse(n)).collect()
}

fn scope_names(scopes: &[Scope]) -> Vec<&'static str> {
    scopes.iter().map(|s| s.as_str()).collect()
}

type KeyRow = (
    Uuid,
    String,
    String,
    Vec<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

impl ApiKeyStore {
    pub fn new(
        pg: PgPool,
        redis_link: Arc<RedisLink>,
        keys: Keys,
        settings: &ApiKeySettings,
    ) -> Self {
        let ttl = Duration::from_millis(settings.cache_ttl_ms.min(MAX_CACHE_TTL_MS));
        Self {
            pg,
            redis_link,
            keys,
            max_per_user: settings.max_per_user,
            cache: Arc::new(Cache::new(ttl)),
            rebuild_wanted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The grant of a presented key (docs/api.md "API keys"): from this
    /// gateway's cache, else one `MGET` in Redis, else (records lost, or
    /// Redis down) Postgres.
    pub async fn verify(&self, token: &str) -> std::result::Result<Grant, Refused> {
        if !well_formed(token) {
            return Err(Refused::Malformed);
        }
        let hash = super::hash(token);
        if let Some(hit) = self.cache.get(&hash, Instant::now()) {
            return hit.ok_or(Refused::Unknown);
        }
        let hash_hex = hex(&hash);
        let grant = match self.read_redis(&hash_hex).await {
            Ok((record, loaded)) => match decide(record.as_deref(), loaded) {
                Found::Grant(g) => Some(g),
                Found::Revoked | Found::Unknown => None,
                Found::AskPostgres => {
                    self.rebuild_wanted.store(true, Ordering::Relaxed);
                    self.read_postgres(&hash, &hash_hex, true).await?
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "api key records unreachable; asking Postgres");
                self.read_postgres(&hash, &hash_hex, false).await?
            }
        };
        self.cache.put(hash, grant.clone(), Instant::now());
        let grant = grant.ok_or(Refused::Unknown)?;
        self.touch(&hash_hex, grant.key_id);
        Ok(grant)
    }

    /// The record and its bucket's marker, in one command on one slot.
    async fn read_redis(&self, hash_hex: &str) -> anyhow::Result<(Option<String>, bool)> {
        let record = self.keys.api_key(hash_hex);
        let marker = self.keys.api_keys_loaded(&hash_hex[..2]);
        let (record, marker): (Option<String>, Option<String>) = self
            .redis_link
            .run(|mut c| async move {
                redis::cmd("MGET")
                    .arg(record)
                    .arg(marker)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok((record, marker.is_some()))
    }

    /// The key's row; with `write_back`, its record goes back to Redis
    /// (`SET NX`: never over a newer tombstone).
    async fn read_postgres(
        &self,
        hash: &[u8; 32],
        hash_hex: &str,
        write_back: bool,
    ) -> std::result::Result<Option<Grant>, Refused> {
        let row: Option<(Uuid, String, Vec<String>, bool)> = sqlx::query_as(
            "select key_id, user_id, scopes, revoked_at is not null from api_keys where key_hash = $1",
        )
        .bind(&hash[..])
        .fetch_optional(&self.pg)
        .await
        .map_err(|e| Refused::Unavailable(e.into()))?;
        let Some((key_id, user_id, scopes, revoked)) = row else {
            return Ok(None);
        };
        let grant = (!revoked).then(|| Grant {
            user_id,
            key_id,
            scopes: scopes_of(&scopes),
        });
        if write_back {
            let (key, value) = (self.keys.api_key(hash_hex), encode_record(grant.as_ref()));
            let ttl = if grant.is_some() {
                None
            } else {
                Some(TOMBSTONE_SECS)
            };
            let _ = self
                .redis_link
                .run(|mut c| async move {
                    set_cmd(&key, &value, true, ttl)
                        .query_async::<Option<String>>(&mut c)
                        .await
                })
                .await;
        }
        Ok(grant)
    }

    /// Records the use off the request path: the first use in a minute
    /// (across all gateways, by `SET NX EX`) updates `last_used_at`.
    fn touch(&self, hash_hex: &str, key_id: Uuid) {
        let (link, pg) = (self.redis_link.clone(), self.pg.clone());
        let key = self.keys.api_key_used(hash_hex);
        tokio::spawn(async move {
            let first = link
                .run(|mut c| async move {
                    set_cmd(&key, "1", true, Some(LAST_USED_SECS))
                        .query_async::<Option<String>>(&mut c)
                        .await
                })
                .await;
            if let Ok(Some(_)) = first {
                let done =
                    sqlx::query("update api_keys set last_used_at = now() where key_id = $1")
                        .bind(key_id)
                        .execute(&pg)
                        .await;
                if let Err(e) = done {
                    tracing::debug!(error = %e, "api key last_used_at not written");
                }
            }
        });
    }

    /// A new key of `user_id` (who must exist): the row and its audit row in
    /// one transaction, under the user's row lock (so the cap holds under
    /// concurrent creations), and its Redis record before the commit.
    pub async fn create(
        &self,
        by: Action<'_>,
        user_id: &str,
        name: &str,
        scopes: &[Scope],
    ) -> Result<CreatedKey> {
        let mut tx = self.pg.begin().await?;
        let found: Option<String> =
            sqlx::query_scalar("select id from users where id = $1 for update")
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
        if found.is_none() {
            return Err(Error::NotFound("no such user".into()));
        }
        let live: i64 = sqlx::query_scalar(
            "select count(*) from api_keys where user_id = $1 and revoked_at is null",
        )
        .bind(user_id)
        .fetch_one(&mut *tx)
        .await?;
        if live >= self.max_per_user as i64 {
            return Err(Error::validation(
                "api_keys",
                format!(
                    "at most {} live keys per user; revoke one first",
                    self.max_per_user
                ),
            ));
        }
        let new = generate();
        let key_id = Uuid::new_v4();
        let created_at: DateTime<Utc> = sqlx::query_scalar(
            "insert into api_keys (key_id, user_id, name, prefix, key_hash, scopes) \
             values ($1, $2, $3, $4, $5, $6) returning created_at",
        )
        .bind(key_id)
        .bind(user_id)
        .bind(name)
        .bind(&new.prefix)
        .bind(&new.hash[..])
        .bind(scope_names(scopes))
        .fetch_one(&mut *tx)
        .await?;
        // The name stays out of the audit row: it is the user's text, and
        // the trail outlives an erasure.
        let details =
            json!({"key_id": key_id, "prefix": new.prefix, "scopes": scope_names(scopes)});
        audit::insert(&mut tx, by, &details).await?;
        let grant = Grant {
            user_id: user_id.to_string(),
            key_id,
            scopes: scopes.to_vec(),
        };
        let (key, value) = (
            self.keys.api_key(&hex(&new.hash)),
            encode_record(Some(&grant)),
        );
        self.set(&key, &value, false, None).await?;
        if let Err(e) = tx.commit().await {
            // Nobody holds this key: its record only has to go.
            let _ =
                self.redis_link
                    .run(|mut c| async move {
                        redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
                    })
                    .await;
            return Err(e.into());
        }
        let _ = self.set(&key, &value, true, None).await;
        Ok(CreatedKey {
            key_id,
            key: new.key,
            prefix: new.prefix,
            name: name.to_string(),
            scopes: scopes.to_vec(),
            created_at,
        })
    }

    /// The user's live keys, oldest first.
    pub async fn list(&self, user_id: &str) -> Result<KeyList> {
        let rows: Vec<KeyRow> = sqlx::query_as(
            "select key_id, prefix, name, scopes, created_at, last_used_at from api_keys \
             where user_id = $1 and revoked_at is null order by created_at, key_id",
        )
        .bind(user_id)
        .fetch_all(&self.pg)
        .await?;
        let api_keys = rows
            .into_iter()
            .map(
                |(key_id, prefix, name, scopes, created_at, last_used_at)| KeyView {
                    key_id,
                    prefix,
                    name,
                    scopes: scopes_of(&scopes),
                    created_at,
                    last_used_at,
                },
            )
            .collect();
        Ok(KeyList { api_keys })
    }

    /// Revokes a key of `user_id` (404 for an unknown key or another
    /// user's). Revoking a revoked key again changes nothing and succeeds.
    pub async fn revoke(&self, by: Action<'_>, user_id: &str, key_id: Uuid) -> Result<()> {
        let mut tx = self.pg.begin().await?;
        let row: Option<(Vec<u8>, bool)> = sqlx::query_as(
            "select key_hash, revoked_at is not null from api_keys where key_id = $1 and user_id = $2 for update",
        )
        .bind(key_id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((hash, already)) = row else {
            return Err(Error::NotFound("no such API key".into()));
        };
        let key = self.keys.api_key(&hex(&hash));
        let tombstone = encode_record(None);
        if !already {
            sqlx::query("update api_keys set revoked_at = now() where key_id = $1")
                .bind(key_id)
                .execute(&mut *tx)
                .await?;
            audit::insert(&mut tx, by, &json!({"key_id": key_id})).await?;
        }
        self.set(&key, &tombstone, false, Some(TOMBSTONE_SECS))
            .await?;
        tx.commit().await?;
        if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
            self.cache.forget(&hash);
        }
        let _ = self
            .set(&key, &tombstone, false, Some(TOMBSTONE_SECS))
            .await;
        Ok(())
    }

    /// Erasure (`DELETE /api/users/{id}`), inside its transaction: the
    /// user's keys are deleted and their records become tombstones (which
    /// name no user) before the commit. Returns how many keys went.
    pub async fn erase(&self, conn: &mut PgConnection, user_id: &str) -> Result<u64> {
        let hashes: Vec<Vec<u8>> =
            sqlx::query_scalar("delete from api_keys where user_id = $1 returning key_hash")
                .bind(user_id)
                .fetch_all(&mut *conn)
                .await?;
        if hashes.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for h in &hashes {
            pipe.add_command(set_cmd(
                &self.keys.api_key(&hex(h)),
                &encode_record(None),
                false,
                Some(TOMBSTONE_SECS),
            ))
            .ignore();
        }
        self.redis_link
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
            .map_err(|e| Error::unavailable("redis", e))?;
        for h in &hashes {
            if let Ok(h) = <[u8; 32]>::try_from(h.as_slice()) {
                self.cache.forget(&h);
            }
        }
        Ok(hashes.len() as u64)
    }

    /// Writes every live key's record (`SET NX`), then every bucket's
    /// marker, then the global marker (last, so the watcher sees a finished
    /// rebuild). Returns how many live keys there are.
    pub async fn rebuild(&self) -> anyhow::Result<usize> {
        let mut rows = sqlx::query_as::<_, (Vec<u8>, Uuid, String, Vec<String>)>(
            "select key_hash, key_id, user_id, scopes from api_keys where revoked_at is null",
        )
        .fetch(&self.pg);
        let mut chunk = Vec::with_capacity(REBUILD_CHUNK);
        let mut n = 0;
        loop {
            let row = rows.try_next().await?;
            let end = row.is_none();
            if let Some((hash, key_id, user_id, scopes)) = row {
                let grant = Grant {
                    user_id,
                    key_id,
                    scopes: scopes_of(&scopes),
                };
                chunk.push(set_cmd(
                    &self.keys.api_key(&hex(&hash)),
                    &encode_record(Some(&grant)),
                    true,
                    None,
                ));
            }
            if chunk.len() >= REBUILD_CHUNK || (end && !chunk.is_empty()) {
                n += chunk.len();
                let mut pipe = redis::pipe();
                for cmd in chunk.drain(..) {
                    pipe.add_command(cmd).ignore();
                }
                self.redis_link
                    .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                    .await?;
            }
            if end {
                break;
            }
        }
        let mut pipe = redis::pipe();
        for bucket in 0..=255u8 {
            pipe.add_command(set_cmd(
                &self.keys.api_keys_loaded(&hex(&[bucket])),
                "1",
                false,
                None,
            ))
            .ignore();
        }
        self.redis_link
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await?;
        let all = self.keys.api_keys_loaded_all();
        self.redis_link
            .run(|mut c| async move {
                set_cmd(&all, "1", false, None)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        Ok(n)
    }

    /// Rebuilds when the global marker is gone or a lookup found a bucket
    /// without its own.
    pub async fn rebuild_if_lost(&self) -> anyhow::Result<()> {
        let all = self.keys.api_keys_loaded_all();
        let present: bool = self
            .redis_link
            .run(|mut c| async move { redis::cmd("EXISTS").arg(all).query_async(&mut c).await })
            .await?;
        if !present || self.rebuild_wanted.swap(false, Ordering::Relaxed) {
            match self.rebuild().await {
                Ok(n) => tracing::info!(keys = n, "api key records rebuilt from Postgres"),
                Err(e) => {
                    self.rebuild_wanted.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Watches for lost records until shutdown (every [`WATCH_EVERY`]).
    pub async fn watch(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
            if let Err(e) = self.rebuild_if_lost().await {
                tracing::debug!(error = %e, "api key record check failed; retrying");
            }
        }
    }

    /// `SET` on the shared connection; a failure is 503.
    async fn set(&self, key: &str, value: &str, nx: bool, ttl: Option<u64>) -> Result<()> {
        let cmd = set_cmd(key, value, nx, ttl);
        self.redis_link
            .run(|mut c| async move { cmd.query_async::<Option<String>>(&mut c).await })
            .await
            .map_err(|e| Error::unavailable("redis", e))?;
        Ok(())
    }
}

fn set_cmd(key: &str, value: &str, nx: bool, ttl: Option<u64>) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value);
    if nx {
        cmd.arg("NX");
    }
    if let Some(secs) = ttl {
        cmd.arg("EX").arg(secs);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(n: u128) -> Grant {
        Grant {
            user_id: "u1".into(),
            key_id: Uuid::from_u128(n),
            scopes: vec![Scope::Read],
        }
    }

    #[test]
    fn the_cache_forgets_after_its_ttl_and_on_revocation() {
        let cache = Cache::new(Duration::from_millis(100));
        let t0 = Instant::now();
        cache.put([1; 32], Some(grant(1)), t0);
        cache.put([2; 32], None, t0);
        assert_eq!(cache.get(&[1; 32], t0), Some(Some(grant(1))));
        assert_eq!(cache.get(&[2; 32], t0), Some(None));
        assert_eq!(cache.get(&[1; 32], t0 + Duration::from_millis(100)), None);
        cache.forget(&[1; 32]);
        assert_eq!(cache.get(&[1; 32], t0), None);
    }

    #[test]
    fn a_full_cache_stops_remembering_unknown_keys_but_keeps_real_ones() {
        let cache = Cache::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..CACHE_ENTRIES as u32 {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_be_bytes());
            h[31] = 1;
            cache.put(h, None, t0);
        }
        cache.put([9; 32], None, t0);
        assert_eq!(cache.get(&[9; 32], t0), None, "a spray does not grow it");
        cache.put([7; 32], Some(grant(7)), t0);
        assert_eq!(cache.get(&[7; 32], t0), Some(Some(grant(7))));
        assert!(cache.map.lock().unwrap().len() <= CACHE_ENTRIES);
    }

    #[test]
    fn set_commands_spell_nx_and_expiry() {
        let packed =
            String::from_utf8(set_cmd("k", "v", true, Some(60)).get_packed_command()).unwrap();
        assert!(packed.contains("NX") && packed.contains("EX") && packed.contains("60"));
        let plain = String::from_utf8(set_cmd("k", "v", false, None).get_packed_command()).unwrap();
        assert!(!plain.contains("NX") && !plain.contains("EX"));
    }
}
