//! `/dashboard`: the usage dashboard, a static page whose script calls the API
//! with the token the user pastes (docs/api.md "Dashboard"). The files under
//! `gateway/assets/dashboard/` are embedded in the binary; nothing is rendered
//! on the server and nothing is behind the guard (the data calls carry the
//! token). Every answer carries a strict Content-Security-Policy: no inline
//! script or style, nothing from another origin.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::AppState;

/// The policy of the page and its assets.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
    img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const SCRIPT: &str = include_str!("../../assets/dashboard/app.js");
const CHART: &str = include_str!("../../assets/dashboard/chart.js");
const STYLE: &str = include_str!("../../assets/dashboard/app.css");

/// The page and its assets: (path, content type, body).
pub const ASSETS: [(&str, &str, &str); 4] = [
    ("/dashboard", "text/html; charset=utf-8", INDEX),
    (
        "/dashboard/app.js",
        "text/javascript; charset=utf-8",
        SCRIPT,
    ),
    (
        "/dashboard/chart.js",
        "text/javascript; charset=utf-8",
        CHART,
    ),
    ("/dashboard/app.css", "text/css; charset=utf-8", STYLE),
];

pub fn router() -> Router<AppState> {
    let mut r = Router::new();
    for (path, kind, body) in ASSETS {
        r = r.route(path, get(move || async move { asset(kind, body) }));
    }
    r
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_no_inline_script_or_style_and_no_other_origin() {
        for (path, _, body) in ASSETS {
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{path}"
            );
            assert!(
                !body.contains("innerHTML") && !body.contains("outerHTML"),
                "{path}"
            );
            assert!(
                !body.contains("insertAdjacentHTML") && !body.contains("document.write"),
                "{path}"
            );
            assert!(
                !body.contains("eval(") && !body.contains("new Function"),
                "{path}"
            );
        }
        let page = INDEX.to_ascii_lowercase();
        // Every <script> names a file of its own, no `style` attribute or element, no handler attribute.
        assert_eq!(
            page.matches("<script").count(),
            page.matches("<script src=").count()
        );
        assert!(!page.contains("<style") && !page.contains(" style="));
        assert!(
            !page.contains(" onclick=")
                && !page.contains(" onload=")
                && !page.contains(" onerror=")
        );
    }

    #[test]
    fn the_policy_allows_only_this_origin() {
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(CSP.contains(directive), "{directive}");
        }
        assert!(!CSP.contains("unsafe"));
    }
}
