//! Rate limits (SPEC §6): GCRA per user and endpoint class, decided in one
//! Redis round trip on Redis's clock, so any number of gateways share it exactly.
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT). With
//! emission interval `T = window/limit` and tolerance `window - T`, a request at
//! `now` passes when `max(TAT, now) + T - window <= now`; it then moves TAT to
//! `max(TAT, now) + T`. That admits a burst of `limit` and `limit` per window
//! after it: at most `limit + ⌊t·limit/window⌋` in any span of t seconds.

use common::settings::ClassLimit;

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
    let limit_n = limit.limit.max(1) as i64;
    let window_us = (limit.window_secs.max(1) as i64) * 1_000_000;
    let t = window_us / limit_n;
    let tat = tat_us.unwrap_or(now_us).max(now_us);
    let new_tat = tat + t;
    let allow_at = new_tat - window_us;
    let mk = |allowed: bool, remaining: i64, reset_us: i64, retry_us: i64| Decision {
        allowed,
        limit: limit.limit,
        window_secs: limit.window_secs,
        remaining: remaining.max(0) as u64,
        reset_secs: ceil_secs(reset_us),
        retry_after_secs: ceil_secs(retry_us),
        degraded: None,
    };
    if allow_at > now_us {
        (mk(false, 0, tat - now_us, allow_at - now_us), tat)
    } else {
        let remaining = (now_us - allow_at) / t;
        (mk(true, remaining, new_tat - now_us, 0), new_tat)
    }
}

fn ceil_secs(us: i64) -> u64 {
    if us <= 0 {
        0
    } else {
        ((us + 999_999) / 1_000_000) as u64
    }
}

/// KEYS[1] = GCRA key; ARGV = limit, window_secs. Returns
/// {allowed, remaining, reset_us, retry_us}. Uses Redis's clock (`TIME`).
pub const GCRA_LUA: &str = r#"
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2]) * 1000000
local t = math.floor(window / limit)
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + t
local allow_at = new_tat - window
if allow_at > now then
  return {0, 0, tat - now, allow_at - now}
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

/// Decides one request in Redis; when Redis fails, follows
/// `rate_limit.on_redis_error` and marks the decision degraded.
pub async fn check(
    state: &crate::state::AppState,
    key: &str,
    user_id: &str,
    class: &str,
    limit: ClassLimit,
) -> Decision {
    let outcome = async {
        let mut conn = state.redis.get().await?;
        let reply: Vec<i64> = script()
            .key(key)
            .arg(limit.limit)
            .arg(limit.window_secs)
            .invoke_async(&mut *conn)
            .await?;
        anyhow::Ok(reply)
    }
    .await;
    let decision = match outcome {
        Ok(reply) => decision_from_reply(&reply, limit),
        Err(e) => {
            tracing::warn!(error = %e, class, "rate limit: Redis unavailable, using fallback");
            fallback(state, user_id, class, limit).await
        }
    };
    let verdict = if decision.allowed { "allow" } else { "deny" };
    metrics::counter!(
        "rate_limit_decisions_total",
        "class" => class.to_string(),
        "decision" => verdict,
        "degraded" => decision.degraded.unwrap_or("no")
    )
    .increment(1);
    decision
}

fn script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    // redis::Script calls EVALSHA and reloads the script on NOSCRIPT by itself.
    SCRIPT.get_or_init(|| redis::Script::new(GCRA_LUA))
}

async fn fallback(
    state: &crate::state::AppState,
    user_id: &str,
    class: &str,
    limit: ClassLimit,
) -> Decision {
    use common::settings::RedisErrorPolicy;
    let policy = state.settings.rate_limit.on_redis_error;
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
            retry_after_secs: limit.window_secs.min(60),
            ..base
        },
        RedisErrorPolicy::Postgres => {
            let row: Result<(bool, i64, i64), _> =
                sqlx::query_as("select * from check_rate_limit($1, $2, $3, $4)")
                    .bind(user_id)
                    .bind(class)
                    .bind(limit.limit as i64)
                    .bind(limit.window_secs as i64)
                    .fetch_one(&state.pg)
                    .await;
            match row {
                Ok((allowed, remaining, reset)) => Decision {
                    allowed,
                    remaining: remaining.max(0) as u64,
                    reset_secs: reset.max(0) as u64,
                    retry_after_secs: if allowed { 0 } else { reset.max(1) as u64 },
                    ..base
                },
                // Both stores down: refuse rather than run unlimited.
                Err(_) => Decision {
                    allowed: false,
                    remaining: 0,
                    retry_after_secs: 5,
                    ..base
                },
            }
        }
    }
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
}
