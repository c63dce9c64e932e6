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
        if self.app_env == AppEnv::Production {
            production_auth(secret, jwks)?;
        }
        if auth.jwks_refresh_secs == 0 {
            return Err(SettingsError::new(
                "auth.jwks_refresh_secs",
                "must be at least 1",
            ));
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
        for url in self.redis.cluster_nodes() {
            if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                return Err(SettingsError::new(
                    "REDIS_CLUSTER_URLS",
                    format!("{url:?} must start with one of redis://, rediss://"),
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
        super::cors::parse(&g.cors_origins)
            .map_err(|reason| SettingsError::new("gateway.cors_origins", reason))?;
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
        section_bounds(&self.api_keys, &self.pricing, &self.alerts)?;
        // TLS: the files exist and parse; each AMQP node URL is valid.
        super::tls::TlsMaterial::load(&self.tls)?;
        crate::amqp::connect::node_urls(&self.amqp.url)
            .map_err(|reason| SettingsError::new("AMQP_URL", reason))?;
        Ok(())
    }
}

/// The bounds of the API-key, price-book and alert settings (SPEC §5.11): a
/// zero would refuse every key or stall a loop, and the 5 s the contract gives
/// a revocation or a price change must hold whatever is configured.
fn section_bounds(
    keys: &super::ApiKeySettings,
    pricing: &super::PricingSettings,
    alerts: &super::AlertSettings,
) -> Result<(), SettingsError> {
    for (key, value, min, max) in [
        ("api_keys.max_per_user", keys.max_per_user as u64, 1, 10_000),
        ("api_keys.cache_ttl_ms", keys.cache_ttl_ms, 0, 3_000),
        ("pricing.refresh_ms", pricing.refresh_ms, 100, 4_000),
        (
            "alerts.poll_interval_ms",
            alerts.poll_interval_ms,
            10,
            3_600_000,
        ),
        ("alerts.timeout_ms", alerts.timeout_ms, 100, 60_000),
        (
            "alerts.max_attempts",
            u64::from(alerts.max_attempts),
            1,
            100,
        ),
        (
            "alerts.backoff_base_ms",
            alerts.backoff_base_ms,
            1,
            86_400_000,
        ),
        (
            "alerts.backoff_max_ms",
            alerts.backoff_max_ms,
            alerts.backoff_base_ms,
            7 * 86_400_000,
        ),
    ] {
        if !(min..=max).contains(&value) {
            return Err(SettingsError::new(key, format!("must be {min}..={max}")));
        }
    }
    Ok(())
}

/// The shortest `JWT_SECRET` production accepts: 256 bits, HS256's own size.
pub const MIN_PRODUCTION_SECRET_BYTES: usize = 32;

/// Production's key-source rules: the key set comes over TLS (a plain
/// `http://` URL is accepted only on the loopback interface, a JWKS sidecar or
/// the benchmark's local server, where nothing on the network can alter it),
/// and an HS256 secret is not guessable by its length alone.
fn production_auth(secret: Option<&str>, jwks: Option<&str>) -> Result<(), SettingsError> {
    if let Some(url) = jwks {
        if let Some(rest) = url.strip_prefix("http://") {
            if !is_loopback_authority(rest) {
                return Err(SettingsError::new(
                    "JWKS_URL",
                    "must be https:// when APP_ENV=production (http:// only on the loopback interface)",
                ));
            }
        }
    }
    if let Some(s) = secret {
        if s.len() < MIN_PRODUCTION_SECRET_BYTES {
            return Err(SettingsError::new(
                "JWT_SECRET",
                format!(
                    "must be at least {MIN_PRODUCTION_SECRET_BYTES} bytes when APP_ENV=production"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether the host of `rest` (a URL after its `scheme://`) is a loopback
/// address: `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_authority(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, _)) => h,
            None => return false,
        },
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_count_as_loopback() {
        for ok in [
            "127.0.0.1:8080/jwks.json",
            "127.1.2.3/jwks",
            "localhost:1/x",
            "LOCALHOST",
            "[::1]:9/jwks",
        ] {
            assert!(is_loopback_authority(ok), "{ok}");
        }
        for bad in [
            "clerk.example.com/jwks",
            "127.0.0.1.evil.example/jwks",
            "localhost.evil.example:80/",
            "user@127.0.0.1/jwks",
            "10.0.0.1/jwks",
            "[::2]/jwks",
            "[::1/jwks",
        ] {
            assert!(!is_loopback_authority(bad), "{bad}");
        }
    }

    #[test]
    fn key_price_and_alert_settings_are_bounded_and_name_their_key() {
        use crate::settings::{AlertSettings, ApiKeySettings, PricingSettings};
        let keys = ApiKeySettings {
            max_per_user: 20,
            cache_ttl_ms: 2000,
        };
        let pricing = PricingSettings::default();
        let alerts = AlertSettings {
            poll_interval_ms: 1000,
            timeout_ms: 5000,
            max_attempts: 12,
            backoff_base_ms: 5000,
            backoff_max_ms: 3_600_000,
        };
        assert!(section_bounds(&keys, &pricing, &alerts).is_ok());
        let key = |k: &ApiKeySettings, p: &PricingSettings, a: &AlertSettings| {
            section_bounds(k, p, a).unwrap_err().key
        };
        let no_keys = ApiKeySettings {
            max_per_user: 0,
            ..keys.clone()
        };
        assert_eq!(key(&no_keys, &pricing, &alerts), "api_keys.max_per_user");
        let slow_revoke = ApiKeySettings {
            cache_ttl_ms: 5000,
            ..keys.clone()
        };
        assert_eq!(
            key(&slow_revoke, &pricing, &alerts),
            "api_keys.cache_ttl_ms"
        );
        let slow_book = PricingSettings { refresh_ms: 5000 };
        assert_eq!(key(&keys, &slow_book, &alerts), "pricing.refresh_ms");
        let never = AlertSettings {
            max_attempts: 0,
            ..alerts.clone()
        };
        assert_eq!(key(&keys, &pricing, &never), "alerts.max_attempts");
        let upside_down = AlertSettings {
            backoff_max_ms: 1000,
            ..alerts.clone()
        };
        assert_eq!(key(&keys, &pricing, &upside_down), "alerts.backoff_max_ms");
    }

    #[test]
    fn production_refuses_a_plain_http_jwks_and_a_short_secret() {
        let long = "x".repeat(MIN_PRODUCTION_SECRET_BYTES);
        let short = "x".repeat(MIN_PRODUCTION_SECRET_BYTES - 1);
        let err = |s, j| production_auth(s, j).unwrap_err().key;
        assert_eq!(err(None, Some("http://clerk.example.com/jwks")), "JWKS_URL");
        assert_eq!(err(Some(short.as_str()), None), "JWT_SECRET");
        assert!(production_auth(Some(&long), Some("https://clerk.example.com/jwks")).is_ok());
        assert!(production_auth(None, Some("http://127.0.0.1:9/jwks")).is_ok());
    }
}
