//! The HTTP surface: one module per resource, merged here, behind the guard
//! (authentication → user → status → rate limit) and the metrics layer.

pub mod admin;
pub mod analytics;
pub mod compat;
pub mod credits;
pub mod deadline;
pub mod error;
pub mod extract;
pub mod guard;
pub mod openapi;
pub mod ops;
pub mod privacy;
pub mod sessions;
pub mod usage;
pub mod users;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;

use crate::state::AppState;
use extract::BodyLimit;

/// Endpoint classes of SPEC §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Session,
    Usage,
    Analytics,
    Profile,
    Credits,
    Admin,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Self::Session,
        Self::Usage,
        Self::Analytics,
        Self::Profile,
        Self::Credits,
        Self::Admin,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Usage => "usage",
            Self::Analytics => "analytics",
            Self::Profile => "profile",
            Self::Credits => "credits",
            Self::Admin => "admin",
        }
    }
}

/// Routes of one class, behind that class's guard.
pub fn guarded(state: &AppState, class: Class, routes: Router<AppState>) -> Router<AppState> {
    routes.route_layer(middleware::from_fn_with_state(
        state.clone(),
        move |s: State<AppState>, req: Request, next: Next| guard::guard(s, class, req, next),
    ))
}

pub fn router(state: AppState) -> Router {
    // Every series at 0 from the start (SPEC §5.9).
    crate::metrics::init();
    let limit = state.settings.gateway.body_limit_bytes;
    let deadline = std::time::Duration::from_millis(state.settings.gateway.request_timeout_ms);
    let api = Router::new().merge(api_routes(&state));
    Router::new()
        .merge(ops::router())
        .merge(openapi::router())
        .merge(api)
        .fallback(|| async { error::ApiError::NotFound("no such route".into()) })
        // The error codes of SPEC §5 have no 405: a known path with another
        // method is a route that does not exist.
        .method_not_allowed_fallback(|| async {
            error::ApiError::NotFound("no such route for this method".into())
        })
        // Inside the metrics layer, so a request cut at its deadline is
        // counted with its 503.
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            deadline::enforce(deadline, req, next)
        }))
        .layer(middleware::from_fn(track_metrics))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(move |mut req: Request, next: Next| {
            req.extensions_mut().insert(BodyLimit(limit));
            next.run(req)
        }))
        .with_state(state)
}

/// Every `/api/` route. Each resource module wraps its routes in the guard of
/// their class with [`guarded`].
fn api_routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .merge(sessions::router(state))
        .merge(usage::router(state))
        .merge(analytics::router(state))
        .merge(users::router(state))
        .merge(credits::router(state))
        .merge(admin::router(state))
        .merge(compat::router(state))
        .merge(privacy::router(state))
}

async fn track_metrics(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    // A fixed set: a client inventing methods cannot mint series.
    let method = crate::metrics::method_label(req.method());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    resp
}
