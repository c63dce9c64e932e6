//! The process-wide Prometheus recorder (shared with the worker in tests), and
//! every series the gateway records, registered at start at 0 (docs/api.md "Operations").
//!
//! A series that appears only once something happened reads as "no data"
//! rather than 0 to an alert (`rate(x[5m]) > 0` never fires on a series
//! that does not exist yet). So [`init`] registers each name with every value
//! of its labels from fixed sets: the routes and methods the router serves
//! (from the OpenAPI operations, the one list of routes), the statuses each
//! route documents, the rate-limit classes, the event types. Label values
//! never come from the request: the method is one of [`METHODS`] or `other`,
//! the route is the matched pattern or `unmatched`.
//!
//! Registering uses `increment(0)`, never `absolute(0)`: a test process holds
//! several gateways and workers on one recorder, and a later start must not
//! reset what an earlier one counted.
//!
//! The routes come from the HTTP layer (`http::route_series`, built from the
//! OpenAPI operations), so this module knows series, not the router.

pub fn handle() -> metrics_exporter_prometheus::PrometheusHandle {
    common::telemetry::metrics_handle()
}

/// The HTTP methods a `method` label may name; anything else is `other`.
pub const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// The `method` label of a request: one of [`METHODS`], else `other`, so a
/// client inventing methods cannot mint series.
pub fn method_label(m: &str) -> &'static str {
    METHODS
        .into_iter()
        .find(|known| *known == m)
        .unwrap_or("other")
}

/// The `method` label of an operation's lowercase method (`"patch"`).
pub fn method_label_of(lowercase: &str) -> &'static str {
    METHODS
        .into_iter()
        .find(|m| m.eq_ignore_ascii_case(lowercase))
        .unwrap_or("other")
}

/// A route the router serves, with the statuses its series start with.
#[derive(Debug, Clone)]
pub struct RouteSeries {
    /// The matched pattern, as the `route` label reads it.
    pub route: String,
    /// One of [`METHODS`].
    pub method: &'static str,
    pub statuses: Vec<u16>,
}

/// Every series name the gateway records (the ops test checks each is in a
/// fresh gateway's `/metrics`).
pub const SERIES: [&str; 22] = [
    "http_requests_total",
    "http_request_duration_seconds",
    "http_request_deadline_total",
    "http_connection_cap_reached_total",
    "http_connections_open",
    "rate_limit_decisions_total",
    "credit_holds_expired_total",
    "credit_users_loaded_total",
    "credit_decisions_total",
    "credit_grants_total",
    "credit_recovery_active",
    "credit_recoveries_total",
    "users_deleted_total",
    "users_provisioned_total",
    "sessions_evicted_total",
    "publish_confirms_total",
    "publish_confirm_seconds",
    "publish_batch_events",
    "analytics_cache_total",
    // Histograms render as these three; the plain name is the family.
    "http_request_duration_seconds_bucket",
    "publish_confirm_seconds_count",
    "publish_batch_events_sum",
];

/// Describes and registers every series with its fixed label values. Safe
/// to call more than once (each gateway built in a test process calls it).
pub fn init(routes: &[RouteSeries]) {
    // The recorder first: series registered before it exists go nowhere.
    let _ = handle();
    describe();
    for RouteSeries {
        route,
        method,
        statuses: codes,
    } in routes
    {
        for code in codes {
            metrics::counter!("http_requests_total", "route" => route.clone(), "method" => *method, "status" => code.to_string())
                .increment(0);
        }
        let _ = metrics::histogram!("http_request_duration_seconds", "route" => route.clone(), "method" => *method);
        if route.starts_with("/api/") {
            for outcome in ["cut", "committed"] {
                metrics::counter!("http_request_deadline_total", "route" => route.clone(), "outcome" => outcome)
                    .increment(0);
            }
        }
    }
    for method in METHODS.into_iter().chain(["other"]) {
        metrics::counter!("http_requests_total", "route" => "unmatched", "method" => method, "status" => "404")
            .increment(0);
    }
    metrics::counter!("http_connection_cap_reached_total").increment(0);
    metrics::gauge!("http_connections_open").increment(0.0);

    let classes = common::class::NAMES
        .iter()
        .copied()
        .chain(["auth_failures", crate::rate_limit::USAGE_EVENTS]);
    for class in classes {
        for decision in ["allow", "deny"] {
            for degraded in ["no", "postgres", "allow", "deny"] {
                metrics::counter!("rate_limit_decisions_total", "class" => class, "decision" => decision, "degraded" => degraded)
                    .increment(0);
            }
        }
    }

    metrics::counter!("credit_holds_expired_total", "by" => "gateway").increment(0);
    metrics::counter!("credit_users_loaded_total").increment(0);
    for (op, outcome) in [
        ("consume", "ok"),
        ("consume", "unavailable"),
        ("reserve", "insufficient"),
        ("hold", "ok"),
        ("hold", "too_many"),
        ("settle", "ok"),
        ("release", "ok"),
    ] {
        metrics::counter!("credit_decisions_total", "op" => op, "outcome" => outcome).increment(0);
    }
    for replayed in ["true", "false"] {
        metrics::counter!("credit_grants_total", "replayed" => replayed).increment(0);
    }
    metrics::gauge!("credit_recovery_active").increment(0.0);
    metrics::counter!("credit_recoveries_total").increment(0);
    metrics::counter!("users_deleted_total").increment(0);
    metrics::counter!("users_provisioned_total").increment(0);
    metrics::counter!("sessions_evicted_total").increment(0);
    for outcome in ["ack", "fail"] {
        metrics::counter!("publish_confirms_total", "outcome" => outcome).increment(0);
    }
    let _ = metrics::histogram!("publish_confirm_seconds");
    for kind in ["usage.batch", "credit.consume_batch"] {
        let _ = metrics::histogram!("publish_batch_events", "type" => kind);
    }
    for result in ["hit", "miss"] {
        metrics::counter!("analytics_cache_total", "result" => result).increment(0);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "http_requests_total",
        "Answered requests by route pattern, method and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer, by route pattern and method"
    );
    describe_counter!(
        "http_request_deadline_total",
        "Requests cut at their deadline or committed past it"
    );
    describe_counter!(
        "http_connection_cap_reached_total",
        "Times the accept loop waited at gateway.max_connections"
    );
    describe_gauge!("http_connections_open", "Open client connections");
    describe_counter!(
        "rate_limit_decisions_total",
        "Rate-limit decisions by class, verdict and fallback policy"
    );
    describe_counter!(
        "credit_holds_expired_total",
        "Holds released by their expiry"
    );
    describe_counter!(
        "credit_users_loaded_total",
        "Users whose balance was loaded into Redis"
    );
    describe_counter!(
        "credit_decisions_total",
        "Credit decisions by operation and outcome"
    );
    describe_counter!("credit_grants_total", "Admin grants, fresh or replayed");
    describe_gauge!(
        "credit_recovery_active",
        "1 while a recovery after a Redis data loss runs"
    );
    describe_counter!(
        "credit_recoveries_total",
        "Recoveries after a Redis data loss"
    );
    describe_counter!("users_deleted_total", "Accounts erased");
    describe_counter!("users_provisioned_total", "Accounts provisioned");
    describe_counter!(
        "sessions_evicted_total",
        "Sessions evicted past sessions.max_per_user"
    );
    describe_counter!(
        "publish_confirms_total",
        "Publishes confirmed (ack) or not (fail)"
    );
    describe_histogram!(
        "publish_confirm_seconds",
        Unit::Seconds,
        "Time from publish to the broker's confirm"
    );
    describe_histogram!(
        "publish_batch_events",
        "Events per grouped message, by event type"
    );
    describe_counter!("analytics_cache_total", "Analytics cache hits and misses");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_fixed_set_are_other() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("OPTIONS"), "OPTIONS");
        assert_eq!(method_label("TRACE"), "other");
        assert_eq!(method_label("BREW"), "other");
        assert_eq!(method_label_of("patch"), "PATCH");
    }

    #[test]
    fn every_series_exists_after_init() {
        init(&[RouteSeries {
            route: "/api/vscode/usage/track".into(),
            method: "POST",
            statuses: vec![200, 429],
        }]);
        let text = handle().render();
        for name in SERIES {
            assert!(text.contains(name), "{name} missing");
        }
        assert!(text.contains(
            "http_requests_total{route=\"/api/vscode/usage/track\",method=\"POST\",status=\"429\"} 0"
        ));
    }
}
