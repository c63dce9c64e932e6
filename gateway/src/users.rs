//! The user directory: plan, status and rate-limit overrides of a user, read
//! from a short local cache (≤ 5 s stale, SPEC §7b), then Redis, then Postgres,
//! where an unknown `sub` is provisioned on the spot with its plan's credits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::settings::ClassLimit;
use redis::AsyncCommands;
use uuid::Uuid;

use crate::auth::Claims;
use crate::http::error::{ApiError, Result};
use crate::state::AppState;

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
    pub overrides: HashMap<String, ClassLimit>,
}

/// Namespace for deterministic ids (starting grants, idempotent retries).
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_9a54_3b2e_4d8a_9c1f_5e7a_2b3c_4d5e);

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
    pub async fn get(&self, state: &AppState, claims: &Claims) -> Result<Arc<UserRecord>> {
        self.get_by_id(state, &claims.sub, Some(claims)).await
    }

    pub async fn get_by_id(
        &self,
        state: &AppState,
        user_id: &str,
        claims: Option<&Claims>,
    ) -> Result<Arc<UserRecord>> {
        if let Some(r) = self.cached(user_id) {
            return Ok(r);
        }
        let rec = match read_redis(state, user_id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                let r = load_or_provision(state, user_id, claims).await?;
                // Best effort: a Redis failure here only costs a later re-read.
                let _ = fill_redis(state, &r).await;
                // The credits are loaded too, so a user the gateway knows is
                // served without Postgres from now on (SPEC §9.5).
                let _ = crate::credits::load_into_redis(state, user_id).await;
                r
            }
            Err(e) => {
                // Redis down: Postgres is the truth for plan and status.
                tracing::debug!(error = %e, "user cache unavailable; reading Postgres");
                load_or_provision(state, user_id, claims).await?
            }
        };
        let rec = Arc::new(rec);
        self.remember(rec.clone());
        Ok(rec)
    }
}

async fn read_redis(state: &AppState, user_id: &str) -> anyhow::Result<Option<UserRecord>> {
    let key = state.keys.user_info(user_id);
    let map: HashMap<String, String> = state
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
            let class = k.strip_prefix("rl:")?;
            let (l, w) = v.split_once('/')?;
            Some((
                class.to_string(),
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
pub async fn write_redis(state: &AppState, rec: &UserRecord) -> anyhow::Result<()> {
    static WRITE: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = WRITE.get_or_init(|| {
        redis::Script::new(
            "for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do \
               if string.sub(k, 1, 3) == 'rl:' then redis.call('HDEL', KEYS[1], k) end \
             end \
             redis.call('HSET', KEYS[1], unpack(ARGV)) return 1",
        )
    });
    set_fields(state, script, rec).await
}

/// Fills the hash after a cache miss, unless a record appeared meanwhile: a
/// miss read Postgres earlier, and must not overwrite what an admin change
/// wrote after that read.
async fn fill_redis(state: &AppState, rec: &UserRecord) -> anyhow::Result<()> {
    static FILL: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = FILL.get_or_init(|| {
        redis::Script::new(
            "if redis.call('HEXISTS', KEYS[1], 'plan') == 1 then return 0 end \
             redis.call('HSET', KEYS[1], unpack(ARGV)) return 1",
        )
    });
    set_fields(state, script, rec).await
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
    state: &AppState,
    script: &redis::Script,
    rec: &UserRecord,
) -> anyhow::Result<()> {
    let key = state.keys.user_info(&rec.id);
    let fields = hash_fields(rec);
    state
        .redis_link
        .run(|mut c| async move {
            let mut inv = script.key(&key);
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
    state: &AppState,
    user_id: &str,
    claims: Option<&Claims>,
) -> Result<UserRecord> {
    if let Some(rec) = find(state, user_id).await? {
        return Ok(rec);
    }
    let plan = "free";
    let starting = state.settings.starting_credits(plan);
    let mut tx = state.pg.begin().await?;
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
    find(state, user_id)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("user vanished after provisioning")))
}

pub fn starting_grant_id(user_id: &str) -> Uuid {
    Uuid::new_v5(&ID_NAMESPACE, format!("starting:{user_id}").as_bytes())
}

/// The user as Postgres has it, or `None` for an id never seen (nothing is
/// provisioned: the operator commands refuse unknown ids with this).
pub async fn find(state: &AppState, user_id: &str) -> Result<Option<UserRecord>> {
    let mut conn = state.pg.acquire().await?;
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
            .map(|(c, l, w)| {
                (
                    c,
                    ClassLimit {
                        limit: l.max(1) as u64,
                        window_secs: w.max(1) as u64,
                    },
                )
            })
            .collect(),
    }))
}
