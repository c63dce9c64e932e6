//! The checks types alone cannot make, run once at start: each refusal names
//! its key, because that one line is what an operator sees when start-up stops.

use super::{AppEnv, Settings, SettingsError, MAX_CREDITS, RATE_LIMIT_CLASSES};

impl Settings {
    /// Checks what types alone cannot: every rule here names its key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let auth = &self.auth;
        if self.app_env == AppEnv::Production && auth.dev_tokens {
            return Err(SettingsError::new(
                "AUTH_DEV_TOKENS",
                "dev tokens are refused when APP_ENV=production",
            ));
        }
        let secret = auth.jwt_secret.as_deref().filter(|s| !s.is_empty());
        let jwks = auth.jwks_url.as_deref().filter(|s| !s.is_empty());
        if secret.is_none() && jwks.is_none() && !auth.dev_tokens {
            return Err(SettingsError::new(
                "JWT_SECRET",
                "no key source for JWTs: set JWT_SECRET and/or JWKS_URL (or AUTH_DEV_TOKENS=true in development)",
            ));
        }
        if let Some(url) = jwks {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(SettingsError::new("JWKS_URL", "must be an http(s) URL"));
            }
        }
        if self.redis.key_prefix.contains(['{', '}']) {
            return Err(SettingsError::new(
                "redis.key_prefix",
                "must not contain { or }",
            ));
        }
        for (var, url, schemes) in [
            (
                "DATABASE_URL",
                &self.database.url,
                &["postgres://", "postgresql://"][..],
            ),
            (
                "REDIS_URL",
                &self.redis.url,
                &["redis://", "rediss://", "unix://"][..],
            ),
            ("AMQP_URL", &self.amqp.url, &["amqp://", "amqps://"][..]),
        ] {
            if !schemes.iter().any(|s| url.starts_with(s)) {
                return Err(SettingsError::new(
                    var,
                    format!("must start with one of {}", schemes.join(", ")),
                ));
            }
        }
        for (var, addr) in [
            ("GATEWAY_LISTEN", &self.gateway.listen),
            ("WORKER_LISTEN", &self.worker.listen),
        ] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(SettingsError::new(
                    var,
                    format!("not a socket address: {addr:?}"),
                ));
            }
        }
        for class in RATE_LIMIT_CLASSES {
            match self.rate_limit.classes.get(class) {
                Some(c) if c.limit >= 1 && c.window_secs >= 1 => {}
                _ => {
                    return Err(SettingsError::new(
                        format!("rate_limit.classes.{class}"),
                        "needs limit >= 1 and window_secs >= 1",
                    ))
                }
            }
        }
        if !self.plans.contains_key("free") {
            return Err(SettingsError::new("plans.free", "the free plan must exist"));
        }
        for (name, plan) in &self.plans {
            if !(0..=MAX_CREDITS).contains(&plan.starting_credits) {
                return Err(SettingsError::new(
                    format!("plans.{name}.starting_credits"),
                    "must be 0..=2^53-1",
                ));
            }
            if plan.rate_limit_multiplier == 0 {
                return Err(SettingsError::new(
                    format!("plans.{name}.rate_limit_multiplier"),
                    "must be >= 1",
                ));
            }
        }
        if let Some(v) = &self.sessions.min_extension_version {
            if semver::Version::parse(v).is_err() {
                return Err(SettingsError::new(
                    "sessions.min_extension_version",
                    "must be a semantic version",
                ));
            }
        }
        for q in &self.worker.queues {
            if !crate::amqp::topology::QUEUES.contains(&q.as_str()) {
                return Err(SettingsError::new(
                    "worker.queues",
                    format!("unknown queue {q:?}"),
                ));
            }
        }
        let g = &self.gateway;
        for (key, value, min) in [
            ("gateway.request_timeout_ms", g.request_timeout_ms, 1),
            (
                "gateway.header_read_timeout_ms",
                g.header_read_timeout_ms,
                1,
            ),
            ("gateway.max_header_bytes", g.max_header_bytes as u64, 1024),
            ("gateway.max_headers", g.max_headers as u64, 8),
            ("gateway.max_connections", g.max_connections as u64, 1),
            // Batching: a zero would stall the publisher or the worker.
            (
                "amqp.max_batch_events",
                self.amqp.max_batch_events as u64,
                1,
            ),
            ("amqp.max_in_flight", self.amqp.max_in_flight as u64, 1),
            ("worker.batch_size", self.worker.batch_size as u64, 1),
            ("worker.batch_wait_ms", self.worker.batch_wait_ms, 1),
            ("worker.batch_idle_ms", self.worker.batch_idle_ms, 1),
            // Per-user bounds: zero would refuse every hold / session / patch.
            (
                "credits.max_open_holds",
                self.credits.max_open_holds as u64,
                1,
            ),
            (
                "sessions.max_per_user",
                self.sessions.max_per_user as u64,
                1,
            ),
            (
                "users.max_preferences_bytes",
                self.users.max_preferences_bytes as u64,
                2,
            ),
            (
                "rate_limit.usage_events.limit",
                self.rate_limit.usage_events.limit,
                1,
            ),
            (
                "rate_limit.usage_events.window_secs",
                self.rate_limit.usage_events.window_secs,
                1,
            ),
        ] {
            if value < min {
                return Err(SettingsError::new(key, format!("must be at least {min}")));
            }
        }
        if self.amqp.delivery_limit < 20 {
            return Err(SettingsError::new(
                "amqp.delivery_limit",
                "must be at least 20",
            ));
        }
        Ok(())
    }
}
