//! The user directory: plan, status and rate-limit overrides of a user, read
//! from a short local cache (≤ 5 s stale, docs/scaling.md), then Redis, then Postgres,
//! where an unknown `sub` is provisioned on the spot with its plan's credits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::class::Class;
use common::settings::ClassLimit;
use redis::AsyncCommands;
use serde::Serialize;
use uuid::Uuid;

use crate::auth::Claims;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Suspended,
    Deleted,
}

impl Status {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            "deleted" => Some(Self::Deleted),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Deleted => "deleted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UserRecord {
    pub id: String,
    pub plan: String,
    pub status: Status,
    /// Per-class overrides from `api_rate_limits`; they replace the plan's limit.
    pub overrides: HashMap<Class, ClassLimit>,
}

/// This gateway's short-lived copies of user records (≤ `gateway.user_cache_ttl_ms`).
pub struct Directory {
    ttl: Duration,
    local: Mutex<HashMap<String, (Instant, Arc<UserRecord>)>>,
}

impl Directory {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            local: Mutex::new(HashMap::new()),
        }
    }

    /// Drops a user from this gateway's cache (after an admin change here).
    /// Other gateways see the change when their entry expires (`ttl` ≤ 5 s).
    pub fn forget(&self, user_id: &str) {
        self.local.lock().expect("lock").remove(user_id);
    }

    fn cached(&self, user_id: &str) -> Option<Arc<UserRecord>> {
        let map = self.local.lock().expect("lock");
        map.get(user_id)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, r)| r.clone())
    }

    fn remember(&self, rec: Arc<UserRecord>) {
        let mut map = self.local.lock().expect("lock");
        if map.len() > 200_000 {
            map.retain(|_, (at, _)| at.elapsed() < self.ttl);
        }
        map.insert(rec.id.clone(), (Instant::now(), rec));
    }

    /// The caller's record, provisioning the user on first sight.
    pub async fn get(&self, store: &UserStore, claims: &Claims) -> Result<Arc<UserRecord>> {
        self.get_by_id(store, &claims.sub, Some(claims)).await
    }

    pub async fn get_by_id(
        &self,
        store: &UserStore,
        user_id: &str,
        claims: Option<&Claims>,
    ) -> Result<Arc<UserRecord>> {
        if let Some(r) = self.cached(user_id) {
            return Ok(r);
        }
        let rec = match read_redis(store, user_id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                let r = load_or_provision(store, user_id, claims).await?;
                // Best effort: a Redis failure here only costs a later re-read.
                let _ = fill_redis(store, &r).await;
                // The credits are loaded too, so a user the gateway knows is
                // served without Postgres from now on (docs/api.md "Outages").
                let _ = crate::credits::load_into_redis(&store.credits, user_id).await;
                r
            }
            Err(e) => {
                // Redis down: Postgres is the truth for plan and status.
                tracing::debug!(error = %e, "user cache unavailable; reading Postgres");
                load_or_provision(store, user_id, claims).await?
            }
        };
        let rec = Arc::new(rec);
        self.remember(rec.clone());
        Ok(rec)
    }
}

async fn read_redis(store: &UserStore, user_id: &str) -> anyhow::Result<Option<UserRecord>> {
    let key = store.keys.user_info(user_id);
    let map: HashMap<String, String> = store
        .redis_link
        .run(|mut c| async move { c.hgetall(key).await })
        .await?;
    Ok(record_from_hash(user_id, &map))
}

/// Parses the Redis user hash (`plan`, `status`, `rl:CLASS` = "limit/window").
pub fn record_from_hash(user_id: &str, map: &HashMap<String, String>) -> Option<UserRecord> {
    let plan = map.get("plan")?.clone();
    let status = Status::parse(map.get("status")?)?;
    let overrides = map
        .iter()
        .filter_map(|(k, v)| {
            // A field of a class no longer known is ignored.
            let class = Class::parse(k.strip_prefix("rl:")?)?;
            let (l, w) = v.split_once('/')?;
            Some((
                class,
                ClassLimit {
                    limit: l.parse().ok()?,
                    window_secs: w.parse().ok()?,
                },
            ))
        })
        .collect();
    Some(UserRecord {
        id: user_id.to_string(),
        plan,
        status,
        overrides,
    })
}

/// Writes the directory's fields of the user hash: `plan`, `status`, and
/// exactly the current `rl:CLASS` overrides (stale ones are removed; fields
/// that others keep in the hash stay). Admin changes call this while they
/// hold the user's row lock, so two changes reach Redis in commit order.
/// It also drops the cached profile and bumps the user's cache generation
/// (as a worker commit does, 1 day TTL), so no profile read before the
/// change is served after it (see [`profile`]).
pub async fn write_redis(store: &UserStore, rec: &UserRecord) -> anyhow::Result<()> {
    static WRITE: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = WRITE.get_or_init(|| {
        redis::Script::new(
            "for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do \
               if string.sub(k, 1, 3) == 'rl:' then redis.call('HDEL', KEYS[1], k) end \
             end \
             redis.call('HSET', KEYS[1], unpack(ARGV)) \
             redis.call('DEL', KEYS[2]) redis.call('INCR', KEYS[3]) redis.call('EXPIRE', KEYS[3], 86400) \
             return 1",
        )
    });
    set_fields(store, script, rec).await
}

/// Fills the hash after a cache miss, unless a record appeared meanwhile: a
/// miss read Postgres earlier, and must not overwrite what an admin change
/// wrote after that read.
async fn fill_redis(store: &UserStore, rec: &UserRecord) -> anyhow::Result<()> {
    static FILL: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = FILL.get_or_init(|| {
        redis::Script::new(
            "if redis.call('HEXISTS', KEYS[1], 'plan') == 1 then return 0 end \
             redis.call('HSET', KEYS[1], unpack(ARGV)) return 1",
        )
    });
    set_fields(store, script, rec).await
}

fn hash_fields(rec: &UserRecord) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = vec![
        ("plan".into(), rec.plan.clone()),
        ("status".into(), rec.status.as_str().into()),
    ];
    for (class, l) in &rec.overrides {
        fields.push((
            format!("rl:{class}"),
            format!("{}/{}", l.limit, l.window_secs),
        ));
    }
    fields
}

async fn set_fields(
    store: &UserStore,
    script: &redis::Script,
    rec: &UserRecord,
) -> anyhow::Result<()> {
    // KEYS[2] and KEYS[3] (same hash tag) are used by `write_redis` only.
    let keys = [
        store.keys.user_info(&rec.id),
        store.keys.profile(&rec.id),
        store.keys.analytics_gen(&rec.id),
    ];
    let fields = hash_fields(rec);
    store
        .redis_link
        .run(|mut c| async move {
            let mut inv = script.key(&keys[..]);
            for (k, v) in &fields {
                inv.arg(k).arg(v);
            }
            inv.invoke_async::<i64>(&mut c).await
        })
        .await?;
    Ok(())
}

/// Reads the user from Postgres, creating it (free plan, starting credits as a
/// `grant` ledger row) when the id was never seen.
pub async fn load_or_provision(
    store: &UserStore,
    user_id: &str,
    claims: Option<&Claims>,
) -> Result<UserRecord> {
    if let Some(rec) = find(store, user_id).await? {
        return Ok(rec);
    }
    let plan = "free";
    let starting = store.starting_credits;
    let mut tx = store.pg.begin().await?;
    let inserted = sqlx::query(
        "insert into users (id, email, name, plan, status, credits_balance) \
         values ($1, $2, $3, $4, 'active', 0) on conflict (id) do nothing",
    )
    .bind(user_id)
    .bind(claims.and_then(|c| c.email.clone()))
    .bind(claims.and_then(|c| c.name.clone()))
    .bind(plan)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 && starting > 0 {
        sqlx::query("select * from grant_credits($1, $2, $3, 'starting credits', null, 'grant')")
            .bind(starting_grant_id(user_id))
            .bind(user_id)
            .bind(starting)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if inserted == 1 {
        metrics::counter!("users_provisioned_total").increment(1);
    }
    find(store, user_id)
        .await?
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("user vanished after provisioning")))
}

pub fn starting_grant_id(user_id: &str) -> Uuid {
    Uuid::new_v5(
        &crate::credits::ID_NAMESPACE,
        format!("starting:{user_id}").as_bytes(),
    )
}

/// The user as Postgres has it, or `None` for an id never seen (nothing is
/// provisioned: the operator commands refuse unknown ids with this).
pub async fn find(store: &UserStore, user_id: &str) -> Result<Option<UserRecord>> {
    let mut conn = store.pg.acquire().await?;
    load_record(&mut conn, user_id).await
}

/// Reads plan, status and overrides; inside a transaction it sees that
/// transaction's own writes.
pub async fn load_record(
    conn: &mut sqlx::PgConnection,
    user_id: &str,
) -> Result<Option<UserRecord>> {
    let row: Option<(String, String)> =
        sqlx::query_as("select plan, status from users where id = $1")
            .bind(user_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((plan, status)) = row else {
        return Ok(None);
    };
    let overrides: Vec<(String, i64, i64)> = sqlx::query_as(
        "select class, \"limit\", window_secs from api_rate_limits where user_id = $1",
    )
    .bind(user_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(UserRecord {
        id: user_id.to_string(),
        plan,
        status: Status::parse(&status).unwrap_or(Status::Active),
        overrides: overrides
            .into_iter()
            .filter_map(|(c, l, w)| {
                Some((
                    Class::parse(&c)?,
                    ClassLimit {
                        limit: l.max(1) as u64,
                        window_secs: w.max(1) as u64,
                    },
                ))
            })
            .collect(),
    }))
}

// ---------------------------------------------------------------------------
// Preferences bound
// ---------------------------------------------------------------------------

/// Whether a preferences patch may be published (docs/reliability.md: the merged object
/// is at most `users.max_preferences_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferencesFit {
    /// Counted in; `size` is the merged object's compact-JSON size.
    Fits { size: u64 },
    /// Refused, nothing counted; `size` is what the merge would have been.
    TooLarge { size: u64 },
}

/// How long the size ledger outlives a user's last patch. It only needs to
/// outlive the queue (a patch admitted here and not yet in Postgres); past it
/// the ledger is seeded from Postgres again.
const PREFERENCES_SIZE_TTL_SECS: u64 = 7 * 86_400;

/// What one top-level member adds to the compact JSON of its object:
/// `"name":value` plus its separator (`,` or the closing brace). An object
/// of members of these sizes is `max(2, 1 + Σ)` bytes long (`{}` is 2).
pub fn member_size(name: &str, value: &serde_json::Value) -> u64 {
    let name_len = serde_json::to_string(name).map(|s| s.len()).unwrap_or(0);
    let value_len = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(0);
    (name_len + 1 + value_len + 1) as u64
}

/// The merged size of `base || patch` (a shallow merge, as the worker's
/// `preferences || patch` is), from member sizes alone: what the script
/// below computes in Redis.
pub fn merged_size(base: &HashMap<String, u64>, patch: &[(String, u64)]) -> u64 {
    let mut sum: u64 = base.values().sum();
    for (name, size) in patch {
        sum = sum - base.get(name).copied().unwrap_or(0) + size;
    }
    (1 + sum).max(2)
}

/// KEYS[1] = the size ledger. ARGV = max_bytes, ttl_secs, m, then m seed
/// pairs (name, size) — `m = -1` when the caller has no seed — then the
/// patch's pairs. Returns {1, size} (counted in), {0, size} (too large,
/// nothing changed) or {-1, 0} (no ledger and no seed: read Postgres, call
/// again with one). A seed is used only if the ledger is still missing, so
/// two gateways seeding at once agree.
const PREFERENCES_LUA: &str = r#"
local max = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local m = tonumber(ARGV[3])
local start = 4
if m > 0 then start = 4 + 2 * m end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if m < 0 then return {-1, 0} end
  local sum = 0
  for i = 4, start - 1, 2 do
    redis.call('HSET', KEYS[1], 'k:' .. ARGV[i], ARGV[i + 1])
    sum = sum + tonumber(ARGV[i + 1])
  end
  redis.call('HSET', KEYS[1], 'sum', sum)
  redis.call('EXPIRE', KEYS[1], ttl)
end
local sum = tonumber(redis.call('HGET', KEYS[1], 'sum') or '0')
for i = start, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', KEYS[1], 'k:' .. ARGV[i]) or '0')
  sum = sum - old + tonumber(ARGV[i + 1])
end
local size = 1 + sum
if size < 2 then size = 2 end
if size > max then return {0, size} end
for i = start, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'k:' .. ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'sum', sum)
redis.call('EXPIRE', KEYS[1], ttl)
return {1, size}
"#;

/// Decides whether `patch` merged into the user's preferences stays within
/// `users.max_preferences_bytes`, and if so counts it in, atomically.
///
/// The merge base is what the gateway knows, not what Postgres has: a size
/// ledger in Redis under the user's hash tag, updated by every admitted
/// patch. Postgres lags the queue (a patch is stored when a worker lands it),
/// so a base read from it would let a burst of patches, each fitting alone,
/// merge past the bound; the ledger counts them the moment they are
/// admitted, on any gateway. Postgres is read only to seed a missing ledger
/// (a user's first patch, after `PREFERENCES_SIZE_TTL_SECS` idle, or after a
/// Redis loss); a seed then misses only patches still queued at that moment.
pub async fn admit_preferences(
    store: &UserStore,
    user_id: &str,
    patch: &serde_json::Map<String, serde_json::Value>,
) -> Result<PreferencesFit> {
    let pairs: Vec<(String, u64)> = patch
        .iter()
        .map(|(k, v)| (k.clone(), member_size(k, v)))
        .collect();
    let mut seed: Option<Vec<(String, u64)>> = None;
    loop {
        let reply = run_preferences_script(store, user_id, &pairs, seed.as_deref()).await?;
        match (reply.first().copied(), reply.get(1).copied()) {
            (Some(1), Some(size)) => return Ok(PreferencesFit::Fits { size: size as u64 }),
            (Some(0), Some(size)) => return Ok(PreferencesFit::TooLarge { size: size as u64 }),
            (Some(-1), _) if seed.is_none() => {
                seed = Some(stored_preference_sizes(store, user_id).await?);
            }
            _ => {
                return Err(Error::Internal(anyhow::anyhow!(
                    "preferences script replied {reply:?}"
                )))
            }
        }
    }
}

/// Forgets the size ledger (after a publish failed: the patch it counted
/// never lands), so the next patch seeds it from Postgres again.
pub async fn forget_preferences_size(store: &UserStore, user_id: &str) {
    let key = store.keys.preferences_size(user_id);
    let done = store
        .redis_link
        .run(|mut c| async move { c.del::<_, ()>(key).await })
        .await;
    if let Err(e) = done {
        tracing::warn!(error = %e, user_id, "could not forget the preferences size ledger");
    }
}

async fn run_preferences_script(
    store: &UserStore,
    user_id: &str,
    pairs: &[(String, u64)],
    seed: Option<&[(String, u64)]>,
) -> Result<Vec<i64>> {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = SCRIPT.get_or_init(|| redis::Script::new(PREFERENCES_LUA));
    let key = store.keys.preferences_size(user_id);
    let max = store.max_preferences_bytes;
    let reply = store
        .redis_link
        .run(|mut c| async move {
            let mut inv = script.key(&key);
            inv.arg(max)
                .arg(PREFERENCES_SIZE_TTL_SECS)
                .arg(seed.map_or(-1, |s| s.len() as i64));
            for (k, v) in seed.unwrap_or_default().iter().chain(pairs) {
                inv.arg(k).arg(v);
            }
            inv.invoke_async::<Vec<i64>>(&mut c).await
        })
        .await?;
    Ok(reply)
}

/// The member sizes of the preferences Postgres holds (none for a user
/// never seen, which the guard has provisioned by now anyway).
async fn stored_preference_sizes(store: &UserStore, user_id: &str) -> Result<Vec<(String, u64)>> {
    let stored: Option<serde_json::Value> =
        sqlx::query_scalar("select preferences from users where id = $1")
            .bind(user_id)
            .fetch_optional(&store.pg)
            .await?;
    Ok(stored
        .as_ref()
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), member_size(k, v)))
                .collect()
        })
        .unwrap_or_default())
}

/// `PATCH /api/users/{id}/preferences`: the patch is queued (202).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PreferencesAnswer {
    /// Always true: the broker confirmed the change.
    pub accepted: bool,
    /// Whose preferences change.
    pub user_id: String,
    /// The event carrying the patch; a worker merges it into the stored preferences.
    pub event_id: Uuid,
}

/// What the user records use: Postgres (the truth), the shared Redis
/// connection (the `user:` hashes and the preferences size ledger), the key
/// names, this gateway's directory, the credit store (a provisioned user's credits are loaded at once)
/// and the two user settings. Cheap to clone.
#[derive(Clone)]
pub struct UserStore {
    pub pg: sqlx::PgPool,
    /// The gateway's one multiplexed Redis connection.
    pub redis_link: std::sync::Arc<crate::redis_link::RedisLink>,
    pub keys: common::redis::keys::Keys,
    /// This gateway's cached records (`Shared::users`): a change drops
    /// its user's copy.
    pub directory: std::sync::Arc<Directory>,
    pub credits: crate::credits::CreditStore,
    /// `plans.free.starting_credits`: what a user seen for the first time is
    /// granted (every new user starts on the free plan).
    pub starting_credits: i64,
    /// `users.max_preferences_bytes`: the bound on a user's merged preferences.
    pub max_preferences_bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sizes(v: &serde_json::Value) -> HashMap<String, u64> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), member_size(k, v)))
            .collect()
    }

    #[test]
    fn merged_size_is_the_compact_json_length_of_the_shallow_merge() {
        let cases = [
            (json!({}), json!({})),
            (json!({}), json!({"theme": "dark"})),
            (json!({"theme": "light", "n": 1}), json!({"theme": "dark"})),
            (
                json!({"a": [1, 2, {"b": null}]}),
                json!({"c": "é\"\\", "a": true}),
            ),
        ];
        for (base, patch) in cases {
            let mut merged = base.as_object().unwrap().clone();
            for (k, v) in patch.as_object().unwrap() {
                merged.insert(k.clone(), v.clone());
            }
            let want = serde_json::to_vec(&merged).unwrap().len() as u64;
            let pairs: Vec<(String, u64)> = sizes(&patch).into_iter().collect();
            assert_eq!(
                merged_size(&sizes(&base), &pairs),
                want,
                "{base} || {patch}"
            );
        }
    }
}
