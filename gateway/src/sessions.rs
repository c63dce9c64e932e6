//! VS Code sessions (docs/api.md "Sessions", §5.10): live in Redis with a sliding TTL, under
//! the user's hash tag so they never cross users; a worker persists them.
//!
//! Bounded per user (`sessions.max_per_user`, docs/reliability.md): beside the records a
//! sorted set holds the user's session ids scored by last use on Redis's
//! clock. Every write of a record goes through one script that also scores
//! the session, drops entries older than a TTL (their records expired on
//! their own) and, past the bound, deletes the least recently used sessions
//! with their token keys. One script, one slot: two gateways validating for
//! the same user at once cannot both stay under the bound by racing.

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use common::class::Class;
use common::settings::ClassLimit;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What Redis keeps per session (JSON under `session:{id}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub user_id: String,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub extension_version: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

/// The client's request, already validated.
#[derive(Debug, Clone)]
pub struct ValidateRequest {
    pub session_id: Option<String>,
    pub session_token: Option<String>,
    pub extension_version: String,
}

/// Whether `have` is below the configured minimum (both semver).
/// The longest extension version accepted: it is stored with every session.
pub const MAX_VERSION_LEN: usize = 64;

/// A client's `extension_version`: a semantic version of at most
/// [`MAX_VERSION_LEN`] characters, or 422 naming the field.
pub fn parse_version(raw: &str) -> Result<semver::Version> {
    if raw.len() > MAX_VERSION_LEN {
        return Err(Error::validation(
            "extension_version",
            format!("must be at most {MAX_VERSION_LEN} characters"),
        ));
    }
    semver::Version::parse(raw)
        .map_err(|_| Error::validation("extension_version", "must be a semantic version"))
}

pub fn below_minimum(have: &semver::Version, min: Option<&str>) -> Option<String> {
    let min = semver::Version::parse(min?).ok()?;
    (have < &min).then(|| min.to_string())
}

/// Permissions by plan, as the original client expects them.
pub fn permissions(plan: &str) -> Vec<&'static str> {
    let mut p = vec!["basic_models", "basic_features"];
    if matches!(plan, "pro" | "team" | "enterprise") {
        p.extend(["advanced_models", "priority_support"]);
    }
    if matches!(plan, "team" | "enterprise") {
        p.extend(["team_features", "analytics"]);
    }
    p
}

/// The answer of `POST /api/vscode/session/validate` (docs/api.md "Sessions"), with the
/// original client's members (`valid`, `session`, `permissions`, the camelCase ones; §5.10).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = SessionValidateAnswer)]
pub struct ValidateAnswer {
    /// The session's id (`sess_…` when the gateway made it).
    pub session_id: String,
    /// `created` when this request started the session, `active` when it found a live one.
    pub status: SessionStatus,
    /// When the session ends unless used again (RFC 3339, milliseconds, UTC).
    #[schema(format = DateTime)]
    pub expires_at: String,
    /// The caller.
    pub user: SessionUser,
    /// The caller's spendable credits.
    pub credits: SessionCredits,
    /// The caller's rate limit of each endpoint class (docs/rate-limits.md).
    pub rate_limits: ClassLimits,
    /// Always true (original client).
    pub valid: bool,
    /// The session again, under the original client's names.
    pub session: SessionRef,
    /// What the caller's plan allows (original client).
    pub permissions: Vec<String>,
}

/// Whether the validate call created the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    Created,
    Active,
}

/// `user` of the session answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionUser {
    /// The caller's user id (the token's subject).
    pub user_id: String,
    /// The caller's plan.
    pub plan: String,
    /// The user id again (original client).
    #[serde(rename = "clerkId")]
    pub clerk_id: String,
    /// The plan again (original client).
    #[serde(rename = "planType")]
    pub plan_type: String,
    /// The spendable balance (original client).
    pub credits: i64,
}

/// `credits` of the session answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionCredits {
    /// Spendable balance.
    pub balance: i64,
}

/// One class's limit: `limit` requests per `window_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SessionRateLimit {
    /// Requests allowed per window.
    pub limit: u64,
    /// The window, in seconds.
    pub window_secs: u64,
}

/// `rate_limits` of the session answer: one member per endpoint class (docs/rate-limits.md).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ClassLimits {
    /// The `session` class.
    pub session: SessionRateLimit,
    /// The `usage` class (per request; events have their own budget).
    pub usage: SessionRateLimit,
    /// The `analytics` class.
    pub analytics: SessionRateLimit,
    /// The `profile` class.
    pub profile: SessionRateLimit,
    /// The `credits` class.
    pub credits: SessionRateLimit,
    /// The `admin` class.
    pub admin: SessionRateLimit,
}

impl ClassLimits {
    /// Each class's limit as `limit_of` tells it.
    pub fn from_fn(mut limit_of: impl FnMut(Class) -> ClassLimit) -> Self {
        let mut of = |c: Class| {
            let l = limit_of(c);
            SessionRateLimit {
                limit: l.limit,
                window_secs: l.window_secs,
            }
        };
        Self {
            session: of(Class::Session),
            usage: of(Class::Usage),
            analytics: of(Class::Analytics),
            profile: of(Class::Profile),
            credits: of(Class::Credits),
            admin: of(Class::Admin),
        }
    }
}

/// `session` of the session answer (original client).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionRef {
    /// The session's id.
    pub id: String,
    /// When the session ends unless used again (RFC 3339, milliseconds, UTC).
    #[serde(rename = "expiresAt")]
    #[schema(format = DateTime)]
    pub expires_at: String,
}

impl ValidateAnswer {
    /// The answer for `rec` (`created` as [`validate`] returned it).
    pub fn new(
        rec: &SessionRecord,
        created: bool,
        plan: &str,
        balance: i64,
        rate_limits: ClassLimits,
    ) -> Self {
        let expires = rec.expires_at.to_rfc3339_opts(SecondsFormat::Millis, true);
        Self {
            session_id: rec.id.clone(),
            status: if created {
                SessionStatus::Created
            } else {
                SessionStatus::Active
            },
            expires_at: expires.clone(),
            user: SessionUser {
                user_id: rec.user_id.clone(),
                plan: plan.to_string(),
                clerk_id: rec.user_id.clone(),
                plan_type: plan.to_string(),
                credits: balance,
            },
            credits: SessionCredits { balance },
            rate_limits,
            valid: true,
            session: SessionRef {
                id: rec.id.clone(),
                expires_at: expires,
            },
            permissions: permissions(plan).into_iter().map(String::from).collect(),
        }
    }
}

pub fn new_session_id() -> String {
    format!("sess_{}", uuid::Uuid::new_v4().simple())
}

/// Finds the caller's live session (by id or by the client's token) and slides
/// it, or creates a new one. Returns the record and whether it was created.
pub async fn validate(
    sessions: &SessionStore,
    user_id: &str,
    req: &ValidateRequest,
) -> Result<(SessionRecord, bool)> {
    let ttl = sessions.ttl_secs;
    let now = Utc::now();
    let mut conn = sessions.redis().await?;
    let keys = &sessions.keys;

    // Which existing session does the request name?
    let mut existing_id = req.session_id.clone();
    let mut claimed_token = false;
    let mut candidate = new_session_id();
    if let Some(token) = &req.session_token {
        let tkey = keys.session_token(user_id, token);
        // The first call with a token binds it to a new session; later calls find it.
        let set: Option<String> = redis::cmd("SET")
            .arg(&tkey)
            .arg(&candidate)
            .arg("NX")
            .arg("EX")
            .arg(ttl)
            .query_async(&mut *conn)
            .await?;
        if set.is_some() {
            claimed_token = true;
            existing_id = None;
        } else {
            existing_id = conn.get(&tkey).await?;
        }
    }
    if let Some(id) = existing_id.as_deref() {
        let raw: Option<String> = conn.get(keys.session(user_id, id)).await?;
        if let Some(rec) = raw.and_then(|r| serde_json::from_str::<SessionRecord>(&r).ok()) {
            if rec.user_id == user_id && rec.expires_at > now {
                let rec = SessionRecord {
                    last_seen_at: now,
                    expires_at: now + Duration::seconds(ttl as i64),
                    extension_version: req.extension_version.clone(),
                    ..rec
                };
                store(sessions, &mut conn, &rec, ttl).await?;
                return Ok((rec, false));
            }
        }
        if req.session_token.is_some() && !claimed_token {
            // The token's session expired: bind the token to a fresh one.
            candidate = new_session_id();
        }
    }
    let rec = SessionRecord {
        id: candidate,
        user_id: user_id.to_string(),
        created_at: now,
        last_seen_at: now,
        expires_at: now + Duration::seconds(ttl as i64),
        extension_version: req.extension_version.clone(),
        session_token: req.session_token.clone(),
    };
    store(sessions, &mut conn, &rec, ttl).await?;
    Ok((rec, true))
}

/// What one session reference of a client names (docs/compatibility.md "One session identity").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    /// The session id that `session/validate` issued: the reference was the client's
    /// `sessionToken` bound to it, or that live session's id itself.
    Session(String),
    /// Neither a live token of the user nor a live session id of the user.
    Unknown,
}

/// Resolves a user's session references (a legacy `sessionToken`, a `session_id`, consume's
/// `sessionId`) to the session ids `session/validate` issued, in one Redis round trip: one
/// pipeline of a GET of the token → session key and an EXISTS of the session record per reference, all
/// under the user's hash tag. `None` when Redis is unreachable or answers an error: callers
/// then keep the references as sent, as usage keeps working (docs/compatibility.md).
///
/// With `trust_issued`, a reference shaped like an issued id ([`is_issued_id`]) names itself
/// without a lookup (whether it is still live changes nothing: an unknown one is kept as sent
/// anyway), so the clients that send the ids validate gave them cost no Redis round trip.
/// The original's track, where an unknown token is a 401, passes `false`.
pub async fn resolve(
    sessions: &SessionStore,
    user_id: &str,
    refs: &[&str],
    trust_issued: bool,
) -> Option<Vec<Named>> {
    let looked_up: Vec<&str> = refs
        .iter()
        .copied()
        .filter(|r| !(trust_issued && is_issued_id(r)))
        .collect();
    if looked_up.is_empty() {
        return Some(
            refs.iter()
                .map(|r| Named::Session((*r).to_string()))
                .collect(),
        );
    }
    let keys = &sessions.keys;
    let mut pipe = redis::pipe();
    for r in &looked_up {
        pipe.get(keys.session_token(user_id, r))
            .exists(keys.session(user_id, r));
    }
    let got: redis::RedisResult<Vec<redis::Value>> = match sessions.redis().await {
        Ok(mut conn) => pipe.query_async(&mut *conn).await,
        Err(e) => {
            tracing::warn!(error = %e, "session references kept as sent: Redis unreachable");
            return None;
        }
    };
    let got = match got {
        Ok(v) if v.len() == looked_up.len() * 2 => v,
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "session references kept as sent: Redis answered an error");
            return None;
        }
    };
    let mut found: std::collections::HashMap<&str, Named> = std::collections::HashMap::new();
    for (r, pair) in looked_up.iter().zip(got.chunks(2)) {
        let token: Option<String> = redis::from_redis_value(&pair[0]).ok().flatten();
        let live: bool = redis::from_redis_value(&pair[1]).unwrap_or(false);
        let named = match (token, live) {
            (Some(id), _) => Named::Session(id),
            (None, true) => Named::Session((*r).to_string()),
            (None, false) => Named::Unknown,
        };
        found.insert(r, named);
    }
    Some(
        refs.iter()
            .map(|r| {
                found
                    .get(r)
                    .cloned()
                    .unwrap_or_else(|| Named::Session((*r).to_string()))
            })
            .collect(),
    )
}

/// Whether `s` has the shape of a session id `session/validate` issues
/// ([`new_session_id`]: `sess_` and 32 lowercase hex digits).
pub fn is_issued_id(s: &str) -> bool {
    s.strip_prefix("sess_").is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// KEYS[1] = the session record, KEYS[2] = the user's sessions by last use,
/// KEYS[3] (optional) = the client's token key. ARGV = record JSON, ttl_secs,
/// session id, max_per_user, session key prefix, token key prefix. Returns
/// the ids evicted. The current session is never its own victim, even when
/// another shares its millisecond.
pub const STORE_LUA: &str = r#"
local ttl = tonumber(ARGV[2])
local id = ARGV[3]
local max = tonumber(ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
if KEYS[3] then redis.call('SET', KEYS[3], id, 'EX', ttl) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl * 1000)
redis.call('ZADD', KEYS[2], now, id)
redis.call('EXPIRE', KEYS[2], ttl)
local over = redis.call('ZCARD', KEYS[2]) - max
local evicted = {}
if over <= 0 then return evicted end
for _, victim in ipairs(redis.call('ZRANGE', KEYS[2], 0, over)) do
  if #evicted >= over then break end
  if victim ~= id then
    local skey = ARGV[5] .. victim
    local raw = redis.call('GET', skey)
    if raw then
      local ok, rec = pcall(cjson.decode, raw)
      if ok and type(rec) == 'table' and type(rec.session_token) == 'string' then
        local tkey = ARGV[6] .. rec.session_token
        if redis.call('GET', tkey) == victim then redis.call('DEL', tkey) end
      end
      redis.call('DEL', skey)
    end
    redis.call('ZREM', KEYS[2], victim)
    evicted[#evicted + 1] = victim
  end
end
return evicted
"#;

fn store_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(STORE_LUA))
}

/// Writes the record (and its token key), marks it the user's most recently
/// used session and evicts past `sessions.max_per_user`, in one script.
async fn store(
    sessions: &SessionStore,
    conn: &mut crate::redis_link::LinkConn,
    rec: &SessionRecord,
    ttl: u64,
) -> Result<()> {
    let json = serde_json::to_string(rec).map_err(|e| Error::Internal(e.into()))?;
    let keys = &sessions.keys;
    let mut inv = store_script().key(keys.session(&rec.user_id, &rec.id));
    inv.key(keys.sessions_by_use(&rec.user_id));
    if let Some(t) = &rec.session_token {
        inv.key(keys.session_token(&rec.user_id, t));
    }
    inv.arg(json)
        .arg(ttl)
        .arg(&rec.id)
        .arg(sessions.max_per_user.max(1))
        .arg(keys.session(&rec.user_id, ""))
        .arg(keys.session_token(&rec.user_id, ""));
    let evicted: Vec<String> = inv.invoke_async(&mut **conn).await?;
    if !evicted.is_empty() {
        metrics::counter!("sessions_evicted_total").increment(evicted.len() as u64);
        tracing::debug!(user_id = %rec.user_id, evicted = evicted.len(), "sessions past the per-user bound evicted");
    }
    Ok(())
}

/// What the session flow uses: the shared Redis connection, the key names and
/// the two session settings. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    /// The gateway's one multiplexed Redis connection.
    pub redis_link: std::sync::Arc<crate::redis_link::RedisLink>,
    pub keys: common::redis::keys::Keys,
    /// `sessions.ttl_secs`: how long an unused session lives.
    pub ttl_secs: u64,
    /// `sessions.max_per_user`: live sessions a user may have; the least
    /// recently used is evicted past it.
    pub max_per_user: usize,
}

impl SessionStore {
    /// The shared multiplexed Redis connection (503 when Redis is down).
    pub async fn redis(&self) -> crate::error::Result<crate::redis_link::LinkConn> {
        Ok(self.redis_link.link_conn().await?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_shape_validate_issues_is_an_issued_id() {
        assert!(is_issued_id(&new_session_id()));
        for other in [
            "sess_1",
            "tok_abcdefgh",
            "sess_ABCDEF0123456789abcdef0123456789",
            "",
        ] {
            assert!(!is_issued_id(other), "{other}");
        }
    }

    #[test]
    fn a_version_is_semantic_and_at_most_64_characters() {
        assert_eq!(
            parse_version("1.2.3-beta.1").unwrap().to_string(),
            "1.2.3-beta.1"
        );
        let field = |e: Error| match e {
            Error::Validation { field, message } => (field, message),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(parse_version("1.2").unwrap_err()).0,
            "extension_version"
        );
        let long = format!("1.0.0-{}", "a".repeat(MAX_VERSION_LEN - 5));
        assert_eq!(long.len(), MAX_VERSION_LEN + 1);
        assert!(
            semver::Version::parse(&long).is_ok(),
            "semver alone would take it"
        );
        assert!(field(parse_version(&long).unwrap_err())
            .1
            .contains("at most 64"));
        assert!(parse_version(&long[..MAX_VERSION_LEN]).is_ok());
    }

    use super::*;

    #[test]
    fn permissions_grow_with_the_plan() {
        assert_eq!(permissions("free"), vec!["basic_models", "basic_features"]);
        assert!(permissions("pro").contains(&"advanced_models"));
        assert!(!permissions("pro").contains(&"team_features"));
        assert!(permissions("enterprise").contains(&"analytics"));
    }

    #[test]
    fn the_answer_is_the_json_of_before() {
        let at = DateTime::parse_from_rfc3339("2024-03-10T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let rec = SessionRecord {
            id: "sess_1".into(),
            user_id: "u1".into(),
            created_at: at,
            last_seen_at: at,
            expires_at: at + Duration::seconds(90),
            extension_version: "1.2.3".into(),
            session_token: None,
        };
        let limits = ClassLimits::from_fn(|c| ClassLimit {
            limit: c.as_str().len() as u64,
            window_secs: 60,
        });
        let got = serde_json::to_value(ValidateAnswer::new(&rec, true, "pro", 7, limits)).unwrap();
        let mut rate_limits = serde_json::Map::new();
        for c in Class::ALL {
            let l = serde_json::json!({"limit": c.as_str().len(), "window_secs": 60});
            rate_limits.insert(c.as_str().into(), l);
        }
        let expires = "2024-03-10T12:01:30.000Z";
        assert_eq!(
            got,
            serde_json::json!({
                "session_id": "sess_1",
                "status": "created",
                "expires_at": expires,
                "user": {"user_id": "u1", "plan": "pro", "clerkId": "u1", "planType": "pro", "credits": 7},
                "credits": {"balance": 7},
                "rate_limits": rate_limits,
                "valid": true,
                "session": {"id": "sess_1", "expiresAt": expires},
                "permissions": permissions("pro"),
            })
        );
        let rec = ValidateAnswer::new(
            &rec,
            false,
            "free",
            0,
            ClassLimits::from_fn(|_| ClassLimit {
                limit: 1,
                window_secs: 1,
            }),
        );
        assert_eq!(serde_json::to_value(rec).unwrap()["status"], "active");
    }

    #[test]
    fn versions_below_the_minimum_are_named() {
        let v = semver::Version::parse("1.2.3").unwrap();
        assert_eq!(below_minimum(&v, Some("1.3.0")), Some("1.3.0".into()));
        assert_eq!(below_minimum(&v, Some("1.2.3")), None);
        assert_eq!(below_minimum(&v, None), None);
    }
}
