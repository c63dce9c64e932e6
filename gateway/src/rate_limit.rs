//! Rate limits (docs/rate-limits.md): GCRA per user and endpoint class, decided in one
//! Redis round trip on Redis's clock, so any number of gateways share it exactly.
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT). With
//! emission interval `T = window/limit` and tolerance `window - T`, a request at
//! `now` passes when `max(TAT, now) + T - window <= now`; it then moves TAT to
//! `max(TAT, now) + T`. That admits a burst of `limit` and `limit` per window
//! after it: at most `limit + ⌊t·limit/window⌋` in any span of t seconds.
//!
//! A request may cost more than one unit (`usage` is limited per event too,
//! docs/rate-limits.md: a request of 500 events costs 500). Cost `n` moves TAT by `n·T`
//! and passes when `max(TAT, now) + n·T - window <= now`, so the bounds above
//! hold in units. A cost above `limit` (`n·T > window`) can never pass: it is
//! refused with `Retry-After` of one window, rather than a time after which
//! it would still not pass. `remaining` is what unit-cost requests could
//! still take, `⌊(now - max(TAT, now) + window) / T⌋` after the decision, so
//! a refused large request still shows the room smaller ones have.

use common::settings::{ClassLimit, RedisErrorPolicy};

use crate::redis_link::RedisLink;

/// One decision, with what the `RateLimit-*` headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub window_secs: u64,
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Seconds until a request would pass (0 when allowed).
    pub retry_after_secs: u64,
    /// Set when a fallback policy decided (`postgres`, `allow`, `deny`).
    pub degraded: Option<&'static str>,
}

/// The GCRA step as a plain function over microseconds; the Lua script below
/// is the same arithmetic, and a test checks both agree.
/// Returns the decision and the new TAT (unchanged when refused).
pub fn gcra(tat_us: Option<i64>, now_us: i64, limit: ClassLimit) -> (Decision, i64) {
    gcra_n(tat_us, now_us, limit, 1)
}

/// [`gcra`] for a request that costs `cost` units (at least 1).
pub fn gcra_n(tat_us: Option<i64>, now_us: i64, limit: ClassLimit, cost: u64) -> (Decision, i64) {
    let limit_n = limit.limit.max(1) as i64;
    let window_us = (limit.window_secs.max(1) as i64) * 1_000_000;
    // At least 1 µs, so a limit above the window's microseconds cannot divide by 0.
    let t = (window_us / limit_n).max(1);
    let step = i64::try_from(cost.max(1))
        .unwrap_or(i64::MAX)
        .saturating_mul(t);
    let tat = tat_us.unwrap_or(now_us).max(now_us);
    let mk = |allowed: bool, room_us: i64, reset_us: i64, retry_us: i64| Decision {
        allowed,
        limit: limit.limit,
        window_secs: limit.window_secs,
        remaining: (room_us.max(0) / t) as u64,
        reset_secs: ceil_secs(reset_us),
        retry_after_secs: ceil_secs(retry_us),
        degraded: None,
    };
    if step > window_us {
        // Never passes; the stored TAT stays as it was (or absent).
        return (
            mk(false, now_us - tat + window_us, tat - now_us, window_us),
            tat_us.unwrap_or(now_us),
        );
    }
    let new_tat = tat + step;
    let allow_at = new_tat - window_us;
    if allow_at > now_us {
        (
            mk(
                false,
                now_us - tat + window_us,
                tat - now_us,
                allow_at - now_us,
            ),
            tat,
        )
    } else {
        (mk(true, now_us - allow_at, new_tat - now_us, 0), new_tat)
    }
}

fn ceil_secs(us: i64) -> u64 {
    if us <= 0 {
        0
    } else {
        ((us + 999_999) / 1_000_000) as u64
    }
}

/// KEYS[1] = GCRA key; ARGV = limit, window_secs[, cost[, now_us]]. Returns
/// {allowed, remaining, reset_us, retry_us}. Uses Redis's clock (`TIME`);
/// `now_us` exists only so a test can drive the script with a synthetic clock
/// and compare it with [`gcra_n`] — production never passes it. `cost`
/// defaults to 1.
pub const GCRA_LUA: &str = r#"
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2]) * 1000000
local t = math.floor(window / limit)
if t < 1 then t = 1 end
local cost = tonumber(ARGV[3] or '1')
if cost < 1 then cost = 1 end
local now
if ARGV[4] then
  now = tonumber(ARGV[4])
else
  local now_t = redis.call('TIME')
  now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local room = now - tat + window
if room < 0 then room = 0 end
local new_tat = tat + cost * t
local allow_at = new_tat - window
if cost * t > window then
  return {0, math.floor(room / t), tat - now, window}
end
if allow_at > now then
  return {0, math.floor(room / t), tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now - allow_at) / t), new_tat - now, 0}
"#;

/// Turns the script's reply into a decision.
pub fn decision_from_reply(reply: &[i64], limit: ClassLimit) -> Decision {
    let get = |i: usize| reply.get(i).copied().unwrap_or(0);
    Decision {
        allowed: get(0) == 1,
        limit: limit.limit,
        window_secs: limit.window_secs,
        remaining: get(1).max(0) as u64,
        reset_secs: ceil_secs(get(2)),
        retry_after_secs: ceil_secs(get(3)),
        degraded: None,
    }
}

/// Decides one request against Redis; when Redis fails, follows
/// `rate_limit.on_redis_error` and marks the decision degraded. Counts every
/// decision in `rate_limit_decisions_total{class, decision, degraded}`.
pub async fn check(
    limiter: &Limiter,
    key: &str,
    user_id: &str,
    class: &str,
    limit: ClassLimit,
) -> Decision {
    check_n(limiter, key, user_id, class, limit, 1).await
}

/// [`check`] for a request that costs `cost` units (the usage events budget).
pub async fn check_n(
    limiter: &Limiter,
    key: &str,
    user_id: &str,
    class: &str,
    limit: ClassLimit,
    cost: u64,
) -> Decision {
    let d = decide_n(
        &limiter.redis_link,
        &limiter.pg,
        limiter.policy,
        key,
        user_id,
        class,
        limit,
        cost,
    )
    .await;
    count(class, &d);
    d
}

/// The per-event budget of `usage/track` (docs/rate-limits.md): `rate_limit.usage_events`
/// scaled by the plan multiplier. A per-user override of the `usage` class
/// does not replace it: an override names a request limit, and this bound is
/// what keeps one user's events (and so the stores) bounded whatever the
/// request limit is.
pub fn usage_events_limit(settings: &common::settings::Settings, plan: &str) -> ClassLimit {
    let base = settings.rate_limit.usage_events;
    let mult = settings
        .plans
        .get(plan)
        .map(|p| p.rate_limit_multiplier)
        .unwrap_or(1);
    ClassLimit {
        limit: base.limit.saturating_mul(mult),
        window_secs: base.window_secs,
    }
}

/// The class name of the events budget in keys, metrics and the Postgres
/// fallback.
pub const USAGE_EVENTS: &str = "usage_events";

/// Of two decisions on one request, the one its `RateLimit-*` headers show:
/// a refusal over a pass, else the one with the smaller share of its limit
/// left (`remaining/limit`), so a client that paces itself by the headers
/// meets the limit that binds first. Ties keep `a`.
pub fn tighter(a: Decision, b: Decision) -> Decision {
    match (a.allowed, b.allowed) {
        (true, false) => return b,
        (false, true) => return a,
        _ => {}
    }
    // remaining_b / limit_b < remaining_a / limit_a, without division.
    let lhs = u128::from(b.remaining) * u128::from(a.limit.max(1));
    let rhs = u128::from(a.remaining) * u128::from(b.limit.max(1));
    if lhs < rhs {
        b
    } else {
        a
    }
}

/// [`check`] without the application state (and without the metric): what
/// the benchmark measures.
pub async fn decide(
    link: &RedisLink,
    pg: &sqlx::PgPool,
    policy: RedisErrorPolicy,
    key: &str,
    user_id: &str,
    class: &str,
    limit: ClassLimit,
) -> Decision {
    decide_n(link, pg, policy, key, user_id, class, limit, 1).await
}

/// [`decide`] for a request that costs `cost` units. The Postgres fallback
/// counts requests, not units (`check_rate_limit()` has no cost): coarser,
/// still a limit, only while Redis is unreachable.
#[allow(clippy::too_many_arguments)]
pub async fn decide_n(
    link: &RedisLink,
    pg: &sqlx::PgPool,
    policy: RedisErrorPolicy,
    key: &str,
    user_id: &str,
    class: &str,
    limit: ClassLimit,
    cost: u64,
) -> Decision {
    let outcome = link
        .run(|mut conn| async move {
            script()
                .key(key)
                .arg(limit.limit)
                .arg(limit.window_secs)
                .arg(cost.max(1))
                .invoke_async::<Vec<i64>>(&mut conn)
                .await
        })
        .await;
    match outcome {
        Ok(reply) => decision_from_reply(&reply, limit),
        Err(e) => {
            tracing::debug!(error = %e, class, "rate limit: Redis unavailable, using fallback");
            fallback(pg, policy, user_id, class, limit).await
        }
    }
}

/// A rate limit the guard leaves to the handler (the `credits` class, for the
/// caller's own balance): the credit script decides it as its first step, in
/// the same round trip and on the same slot as the reservation
/// (`common/src/redis/lua/rate_limit.lua`). The guard puts one on the
/// request; the flow takes [`Deferred::pending`] for the first script it
/// runs and records the script's decision; a request that ends before any
/// credit script ran is decided by the guard afterwards with [`check`], so
/// every request of the class is counted exactly once. Cheap to clone.
#[derive(Clone)]
pub struct Deferred(std::sync::Arc<DeferredInner>);

struct DeferredInner {
    class: &'static str,
    key: String,
    limit: ClassLimit,
    decided: std::sync::OnceLock<Decision>,
}

impl Deferred {
    pub fn new(class: &'static str, key: String, limit: ClassLimit) -> Self {
        Self(std::sync::Arc::new(DeferredInner {
            class,
            key,
            limit,
            decided: std::sync::OnceLock::new(),
        }))
    }

    /// Records a decision made elsewhere (usage/track's [`check_pair`]); the
    /// first one counts. Returns the decision that stands.
    pub fn set(&self, d: Decision) -> Decision {
        let mut fresh = false;
        let d = *self.0.decided.get_or_init(|| {
            fresh = true;
            d
        });
        if fresh {
            count(self.0.class, &d);
        }
        d
    }

    /// The GCRA key and limit a credit script should decide, until one has.
    pub fn pending(&self) -> Option<(&str, ClassLimit)> {
        self.0
            .decided
            .get()
            .is_none()
            .then_some((self.0.key.as_str(), self.0.limit))
    }

    /// Records the decision a credit script made (`reply` as [`GCRA_LUA`]
    /// answers); the first one counts. Returns the decision that stands.
    pub fn decide(&self, reply: &[i64]) -> Decision {
        self.set(decision_from_reply(reply, self.0.limit))
    }

    /// What a credit script decided, if one ran.
    pub fn decision(&self) -> Option<Decision> {
        self.0.decided.get().copied()
    }
}

/// The class whose limit the credit scripts decide.
pub const CREDITS: &str = "credits";

fn count(class: &str, d: &Decision) {
    let verdict = if d.allowed { "allow" } else { "deny" };
    metrics::counter!(
        "rate_limit_decisions_total",
        "class" => class.to_string(),
        "decision" => verdict,
        "degraded" => d.degraded.unwrap_or("no")
    )
    .increment(1);
}

/// usage/track's two limits in one round trip (docs/rate-limits.md): KEYS[1]
/// the class's GCRA key, KEYS[2] the events budget's; ARGV = class limit,
/// window, events limit, window, events cost. The class step runs first at
/// cost 1, as the guard's check would; only when it passes does the events
/// step run (so, as with two calls, a request refused by its events budget
/// still counts against the class). Returns the class reply of [`GCRA_LUA`]
/// and, when the class passed, the events reply after it.
pub const GCRA_PAIR_LUA: &str = r#"
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local function gcra(key, limit, window, cost)
  window = window * 1000000
  local t = math.floor(window / limit)
  if t < 1 then t = 1 end
  if cost < 1 then cost = 1 end
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local room = now - tat + window
  if room < 0 then room = 0 end
  local new_tat = tat + cost * t
  local allow_at = new_tat - window
  if cost * t > window then return {0, math.floor(room / t), tat - now, window} end
  if allow_at > now then return {0, math.floor(room / t), tat - now, allow_at - now} end
  redis.call('SET', key, string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  return {1, math.floor((now - allow_at) / t), new_tat - now, 0}
end
local a = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 1)
if a[1] == 0 then return a end
local b = gcra(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
return {a[1], a[2], a[3], a[4], b[1], b[2], b[3], b[4]}
"#;

/// One side of a [`check_pair`]: a GCRA key and its limit.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub key: &'a str,
    pub class: &'static str,
    pub limit: ClassLimit,
}

/// The decisions of a [`GCRA_PAIR_LUA`] reply: the class's, and the events
/// budget's when the class passed.
pub fn pair_from_reply(
    reply: &[i64],
    class: ClassLimit,
    events: ClassLimit,
) -> (Decision, Option<Decision>) {
    let a = decision_from_reply(reply, class);
    let b = (a.allowed && reply.len() >= 8).then(|| decision_from_reply(&reply[4..], events));
    (a, b)
}

/// usage/track's class limit and events budget decided in one Redis round
/// trip ([`GCRA_PAIR_LUA`]). When Redis fails, each is decided as [`check_n`]
/// would (its fallback policy). The events decision is `None` when the class
/// refused (it was not spent).
pub async fn check_pair(
    limiter: &Limiter,
    user_id: &str,
    class: Side<'_>,
    events: Side<'_>,
    cost: u64,
) -> (Decision, Option<Decision>) {
    let outcome = limiter
        .redis_link
        .run(|mut conn| async move {
            pair_script()
                .key(class.key)
                .key(events.key)
                .arg(class.limit.limit)
                .arg(class.limit.window_secs)
                .arg(events.limit.limit)
                .arg(events.limit.window_secs)
                .arg(cost.max(1))
                .invoke_async::<Vec<i64>>(&mut conn)
                .await
        })
        .await;
    let (a, b) = match outcome {
        Ok(reply) => pair_from_reply(&reply, class.limit, events.limit),
        Err(e) => {
            tracing::debug!(error = %e, "rate limit: Redis unavailable, using fallback");
            let p = (&limiter.pg, limiter.policy);
            let a = fallback(p.0, p.1, user_id, class.class, class.limit).await;
            let b = match a.allowed {
                true => Some(fallback(p.0, p.1, user_id, events.class, events.limit).await),
                false => None,
            };
            (a, b)
        }
    };
    if let Some(b) = &b {
        count(events.class, b);
    }
    (a, b)
}

fn pair_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(GCRA_PAIR_LUA))
}

/// The GCRA script; `redis::Script` sends EVALSHA and reloads it on NOSCRIPT.
pub fn script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(GCRA_LUA))
}

/// How long a refused client should wait when the fallback refused it: Redis
/// may be back any moment, so not a whole window.
const FALLBACK_RETRY_SECS: u64 = 5;

async fn fallback(
    pg: &sqlx::PgPool,
    policy: RedisErrorPolicy,
    user_id: &str,
    class: &str,
    limit: ClassLimit,
) -> Decision {
    let base = Decision {
        allowed: true,
        limit: limit.limit,
        window_secs: limit.window_secs,
        remaining: limit.limit,
        reset_secs: limit.window_secs,
        retry_after_secs: 0,
        degraded: Some(policy.as_str()),
    };
    match policy {
        RedisErrorPolicy::Allow => base,
        RedisErrorPolicy::Deny => Decision {
            allowed: false,
            remaining: 0,
            retry_after_secs: FALLBACK_RETRY_SECS.min(limit.window_secs),
            ..base
        },
        RedisErrorPolicy::Postgres => {
            // A fixed window shared by every gateway: coarser than GCRA (up to
            // 2×limit across a window edge) but still a limit.
            let row: Result<(bool, i64, i64), _> =
                sqlx::query_as("select * from check_rate_limit($1, $2, $3, $4)")
                    .bind(user_id)
                    .bind(class)
                    .bind(limit.limit.min(i64::MAX as u64) as i64)
                    .bind(limit.window_secs.min(i64::MAX as u64) as i64)
                    .fetch_one(pg)
                    .await;
            match row {
                Ok((allowed, remaining, reset)) => Decision {
                    allowed,
                    remaining: remaining.max(0) as u64,
                    reset_secs: reset.max(0) as u64,
                    retry_after_secs: if allowed { 0 } else { reset.max(1) as u64 },
                    ..base
                },
                Err(e) => {
                    // Both stores down: refuse rather than run unlimited.
                    tracing::warn!(error = %e, class, "rate limit: Postgres fallback failed too");
                    Decision {
                        allowed: false,
                        remaining: 0,
                        retry_after_secs: FALLBACK_RETRY_SECS,
                        ..base
                    }
                }
            }
        }
    }
}

/// What a rate-limit decision uses: the shared Redis connection (GCRA in one
/// script), Postgres (the fallback counter) and what to do when Redis fails
/// (`rate_limit.on_redis_error`). Cheap to clone.
#[derive(Clone)]
pub struct Limiter {
    /// The gateway's one multiplexed Redis connection.
    pub redis_link: std::sync::Arc<crate::redis_link::RedisLink>,
    pub pg: sqlx::PgPool,
    pub policy: common::settings::RedisErrorPolicy,
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: ClassLimit = ClassLimit {
        limit: 20,
        window_secs: 60,
    };

    #[test]
    fn a_fresh_key_allows_a_burst_of_limit_then_refuses() {
        let mut tat = None;
        let now = 1_000_000_000;
        for i in 0..20 {
            let (d, t) = gcra(tat, now, L);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 19 - i);
            tat = Some(t);
        }
        let (d, _) = gcra(tat, now, L);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, 3); // one emission interval: 60 s / 20
        assert_eq!(d.reset_secs, 60);
    }

    #[test]
    fn one_request_per_interval_refills() {
        let now = 0;
        let mut tat = None;
        for _ in 0..20 {
            tat = Some(gcra(tat, now, L).1);
        }
        let (d, _) = gcra(tat, now + 2_999_999, L);
        assert!(!d.allowed);
        let (d, t) = gcra(tat, now + 3_000_000, L);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        let (d, _) = gcra(Some(t), now + 3_000_000, L);
        assert!(!d.allowed);
    }

    #[test]
    fn no_span_admits_more_than_limit_plus_refill() {
        // Arrivals every 100 ms for 30 s: at most 20 + 30*20/60 = 30 pass.
        let mut tat = None;
        let mut passed = 0;
        for i in 0..300 {
            let (d, t) = gcra(tat, i * 100_000, L);
            if d.allowed {
                passed += 1;
                tat = Some(t);
            }
        }
        assert!(passed <= 20 + 30 * 20 / 60, "{passed}");
        assert!(passed >= 20 + 29 * 20 / 60);
    }

    #[test]
    fn a_limit_finer_than_a_microsecond_does_not_divide_by_zero() {
        let l = ClassLimit {
            limit: 5_000_000,
            window_secs: 1,
        };
        let (d, _) = gcra(None, 0, l);
        assert!(d.allowed);
    }

    #[test]
    fn a_refusal_says_when_to_retry_and_keeps_the_tat() {
        let l = ClassLimit {
            limit: 1,
            window_secs: 10,
        };
        let (d, tat) = gcra(None, 0, l);
        assert!(d.allowed);
        assert_eq!((d.remaining, d.reset_secs), (0, 10));
        let (d, tat2) = gcra(Some(tat), 4_000_000, l);
        assert!(!d.allowed);
        assert_eq!(tat2, tat);
        assert_eq!(d.retry_after_secs, 6);
    }

    #[test]
    fn a_cost_of_n_takes_n_units_of_the_burst() {
        let l = ClassLimit {
            limit: 6000,
            window_secs: 60,
        };
        let (d, tat) = gcra_n(None, 0, l, 500);
        assert!(d.allowed);
        assert_eq!(d.remaining, 5500);
        // Eleven more of 500 pass (6000 in all), the next is refused and
        // waits for 500 units to refill: 500 × 10 ms.
        let mut tat = Some(tat);
        for i in 0..11 {
            let (d, t) = gcra_n(tat, 0, l, 500);
            assert!(d.allowed, "batch {i}");
            tat = Some(t);
        }
        let (d, t) = gcra_n(tat, 0, l, 500);
        assert!(!d.allowed);
        assert_eq!((d.remaining, d.retry_after_secs), (0, 5));
        assert_eq!(Some(t), tat);
    }

    #[test]
    fn a_refused_large_request_still_shows_the_room_for_smaller_ones() {
        let (_, tat) = gcra_n(None, 0, L, 15);
        let (d, _) = gcra_n(Some(tat), 0, L, 10);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 5);
        assert!(gcra_n(Some(tat), 0, L, 5).0.allowed);
    }

    #[test]
    fn a_cost_above_the_limit_never_passes_and_says_one_window() {
        let (d, tat) = gcra_n(None, 0, L, 21);
        assert!(!d.allowed);
        assert_eq!((d.remaining, d.retry_after_secs), (20, 60));
        assert_eq!(tat, 0);
        assert!(!gcra_n(None, 0, L, u64::MAX).0.allowed);
        assert!(gcra_n(None, 0, L, 20).0.allowed);
    }

    #[test]
    fn the_tighter_decision_is_a_refusal_else_the_smaller_share_left() {
        let d = |allowed, limit, remaining| Decision {
            allowed,
            limit,
            window_secs: 60,
            remaining,
            reset_secs: 1,
            retry_after_secs: 0,
            degraded: None,
        };
        let requests = d(true, 1200, 1199);
        let events = d(true, 6000, 5500);
        assert_eq!(tighter(requests, events), events);
        assert_eq!(tighter(events, requests), events);
        let single = d(true, 6000, 5999);
        assert_eq!(tighter(requests, single), requests);
        let refused = d(false, 6000, 5999);
        assert_eq!(tighter(requests, refused), refused);
        assert_eq!(tighter(refused, requests), refused);
    }
}
