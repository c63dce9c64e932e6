//! The HTTP surface: one module per resource, merged here, behind the guard
//! (authentication → user → status → rate limit) and the metrics layer.

pub mod admin;
pub mod alerts;
pub mod analytics;
pub mod api_keys;
pub mod compat;
pub mod cors;
pub mod credits;
pub mod dashboard;
pub mod deadline;
pub mod error;
pub mod extract;
pub mod guard;
pub mod openapi;
pub mod ops;
pub mod orgs;
pub mod pricing;
pub mod privacy;
pub mod reads;
pub mod request_id;
pub mod sessions;
pub mod target;
pub mod usage;
pub mod users;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;

use crate::state::AppState;
use extract::BodyLimit;

/// The endpoint classes: the one list, in `common::class`.
pub use common::class::Class;

/// Routes of one class, behind that class's guard.
pub fn guarded(state: &AppState, class: Class, routes: Router<AppState>) -> Router<AppState> {
    routes.route_layer(middleware::from_fn_with_state(
        state.clone(),
        move |s: State<AppState>, req: Request, next: Next| guard::guard(s, class, req, next),
    ))
}

pub fn router(state: AppState) -> Router {
    // Every series at 0 from the start (docs/api.md "Operations").
    crate::metrics::init(&route_series());
    let limit = state.settings.gateway.body_limit_bytes;
    let deadline = std::time::Duration::from_millis(state.settings.gateway.request_timeout_ms);
    let api = Router::new().merge(api_routes(&state));
    let cors = cors::Cors::new(
        common::settings::cors::parse(&state.settings.gateway.cors_origins)
            .expect("gateway.cors_origins is checked at start"),
    );
    let app = Router::new()
        .merge(ops::router())
        .merge(openapi::router(&state))
        .merge(dashboard::router())
        .merge(api)
        .fallback(|| async { error::ApiError::not_found("no such route") })
        // The error codes of docs/api.md have no 405: a known path with another
        // method is a route that does not exist.
        .method_not_allowed_fallback(|| async {
            error::ApiError::not_found("no such route for this method")
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
        }));
    // Outside everything else: a preflight is answered before the guard, and
    // every answer (a preflight's too) carries the request id.
    let app = if cors.is_empty() {
        app
    } else {
        app.layer(middleware::from_fn_with_state(cors, cors::gate))
    };
    app.layer(middleware::from_fn(request_id::layer))
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
        .merge(reads::router(state))
        .merge(api_keys::router(state))
        .merge(pricing::router(state))
        .merge(alerts::router(state))
        .merge(orgs::router(state))
}

/// Every route the router serves with the statuses its series start with:
/// the OpenAPI operations (the one list of routes) and the document itself.
pub fn route_series() -> Vec<crate::metrics::RouteSeries> {
    let mut routes: Vec<_> = openapi::operations()
        .into_iter()
        .map(|(method, path, op)| crate::metrics::RouteSeries {
            route: path,
            method: crate::metrics::method_label_of(method),
            statuses: statuses(op),
        })
        .collect();
    routes.push(crate::metrics::RouteSeries {
        route: "/openapi.json".into(),
        method: "GET",
        statuses: vec![200],
    });
    routes
}

/// The statuses a route's metrics start with: every status its OpenAPI entry
/// documents, 503 (a deadline or a dependency) and, with a body, 413.
fn statuses(op: &serde_json::Value) -> Vec<u16> {
    let mut s: Vec<u16> = op["responses"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(status, _)| status.parse().ok())
        .collect();
    s.push(503);
    if op.get("requestBody").is_some() {
        s.push(413);
    }
    s.sort_unstable();
    s.dedup();
    s
}

async fn track_metrics(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    // A fixed set: a client inventing methods cannot mint series.
    let method = crate::metrics::method_label(req.method().as_str());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_route_starts_its_series_with_its_errors() {
        let routes = route_series();
        let track = routes
            .iter()
            .find(|r| r.route == "/api/vscode/usage/track" && r.method == "POST")
            .expect("usage/track is a route");
        for status in [202, 401, 415, 429, 503] {
            assert!(track.statuses.contains(&status), "{status}");
        }
        assert!(routes.iter().any(|r| r.route == "/openapi.json"));
    }
}
