//! CORS (SPEC §5) for the origins of `gateway.cors_origins`.
//!
//! Whether an origin is allowed is [`common::settings::cors::Origins::allows`],
//! a plain function. Only a request from an allowed origin goes through
//! tower-http's CORS layer, which answers its preflight (any `OPTIONS`) at
//! once, before the guard (a preflight carries no token), on every path, and
//! adds `Access-Control-Allow-Origin` (the origin itself), `Vary` and the
//! exposed headers to every other answer. A request from another origin, or
//! without one, passes by untouched: no CORS header at all, and its preflight
//! meets the router like any `OPTIONS` (404, no such route for this method),
//! which a browser treats as refused.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, Method};
use axum::middleware::Next;
use axum::response::Response;
use common::settings::cors::Origins;
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Headers a page may read from an answer.
pub const EXPOSED: [&str; 11] = [
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
    "x-request-id",
    "idempotent-replayed",
    "ratelimit-degraded",
];

/// Headers a page may send.
pub const ALLOWED: [&str; 4] = [
    "authorization",
    "content-type",
    "idempotency-key",
    "x-request-id",
];

/// Methods the API serves.
pub const METHODS: [Method; 6] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// How long a browser may cache a preflight's answer.
const MAX_AGE: Duration = Duration::from_secs(600);

/// The allowed origins and the layer that answers them.
#[derive(Clone)]
pub struct Cors {
    origins: Arc<Origins>,
    layer: CorsLayer,
}

impl Cors {
    pub fn new(origins: Origins) -> Self {
        let names = |list: &[&'static str]| {
            list.iter()
                .map(|h| HeaderName::from_static(h))
                .collect::<Vec<_>>()
        };
        let layer = CorsLayer::new()
            // The origin was decided by `allows` before the layer runs.
            .allow_origin(AllowOrigin::mirror_request())
            .allow_methods(METHODS.to_vec())
            .allow_headers(names(&ALLOWED))
            .expose_headers(names(&EXPOSED))
            .max_age(MAX_AGE);
        Self {
            origins: Arc::new(origins),
            layer,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// Whether a request with these headers gets CORS.
    pub fn applies(&self, headers: &axum::http::HeaderMap) -> bool {
        headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_some_and(|o| self.origins.allows(o))
    }
}

/// The middleware: CORS for an allowed origin, nothing for any other.
pub async fn gate(State(cors): State<Cors>, req: Request, next: Next) -> Response {
    if !cors.applies(req.headers()) {
        return next.run(req).await;
    }
    let result: Result<Response, Infallible> = cors.layer.layer(next).oneshot(req).await;
    match result {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    #[test]
    fn only_a_request_from_an_allowed_origin_gets_cors() {
        let origins = common::settings::cors::parse(&[
            "https://a.example".into(),
            "vscode-webview://*".into(),
        ])
        .unwrap();
        let cors = Cors::new(origins);
        let with = |o: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ORIGIN, HeaderValue::from_static(o));
            h
        };
        assert!(cors.applies(&with("https://a.example")));
        assert!(cors.applies(&with("vscode-webview://abc")));
        assert!(!cors.applies(&with("https://b.example")));
        assert!(!cors.applies(&HeaderMap::new()));
        assert!(!Cors::new(Origins::default()).applies(&with("https://a.example")));
    }
}
