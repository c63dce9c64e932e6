//! The request id (SPEC §5), the outermost layer: decided once per request
//! ([`common::request_id::accept`]), written back into the request's own
//! `x-request-id` header (so every reader of it, the audit rows included,
//! sees the decided id), carried in a tracing span (every log line of the
//! request has `request_id`) and in the task-local that the publisher reads,
//! and put on every answer: errors, the guard's, a deadline's, preflights.
//! At debug level it also logs one `answered` line per request.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use common::request_id;
use tracing::Instrument;

const HEADER: HeaderName = HeaderName::from_static(request_id::HEADER);

/// The middleware.
pub async fn layer(mut req: Request, next: Next) -> Response {
    let caller = req.headers().get(&HEADER).and_then(|v| v.to_str().ok());
    let id = request_id::accept(caller);
    let value = header_value(&id);
    req.headers_mut().insert(HEADER, value.clone());
    // At error level, so the span is on whatever `RUST_LOG` keeps: a filter of
    // `warn` (the benchmark's) would drop an info span, and with it the id
    // from the warnings logged inside the request.
    let span = tracing::error_span!("request", request_id = %id);
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let answered = async move {
        let resp = next.run(req).await;
        // One line per request, at debug (`RUST_LOG=gateway=debug`): off in
        // production by default, where it would cost more than the request.
        tracing::debug!(
            method = %method,
            status = resp.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "answered"
        );
        resp
    };
    let mut resp = request_id::scope(id, answered.instrument(span)).await;
    resp.headers_mut().insert(HEADER, value);
    resp
}

/// An accepted id is always a header value (its characters are a subset).
fn header_value(id: &str) -> HeaderValue {
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_id_is_a_header_value() {
        for caller in [Some("a:b.c_d-e"), Some("bad id"), None] {
            let id = request_id::accept(caller);
            assert_eq!(header_value(&id).to_str().unwrap(), id);
        }
    }
}
