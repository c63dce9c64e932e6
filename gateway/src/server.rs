//! The HTTP/1 accept loop: hyper with the limits a client must not be able to
//! exceed, and graceful shutdown the way `axum::serve` does it.
//!
//! `axum::serve` takes no configuration, and without a timer hyper's
//! header-read timeout never fires; so the gateway drives hyper itself:
//! - **connection cap** (`gateway.max_connections`): a semaphore permit per
//!   open connection, taken *before* `accept`. At the cap the loop stops
//!   accepting, so new connections wait in the kernel's listen backlog
//!   (their TCP handshake completes, their request waits) and are served in
//!   turn as connections close. Past the backlog the kernel drops SYNs and
//!   clients retry. Nothing is refused by the gateway itself.
//! - **header size and count** (`gateway.max_header_bytes`,
//!   `gateway.max_headers`): hyper answers `431 Request Header Fields Too
//!   Large` with an empty body and closes the connection. These never reach
//!   the router, so they cannot be problem+json.
//! - **slow clients** (`gateway.header_read_timeout_ms`): a connection that
//!   has not sent a whole request head in that time is closed without an
//!   answer; the timer also runs while a keep-alive connection sits idle, so
//!   idle connections do not hold a slot for ever. A slow *body* is the
//!   request deadline's business (`http::deadline`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use common::settings::GatewaySettings;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// What one connection may do, from `gateway.*`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

impl Limits {
    pub fn from_settings(g: &GatewaySettings) -> Self {
        Self {
            max_connections: g.max_connections,
            header_read_timeout: Duration::from_millis(g.header_read_timeout_ms),
            max_header_bytes: g.max_header_bytes,
            max_headers: g.max_headers,
        }
    }

    fn http1(&self) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_header_size(self.max_header_bytes)
            .max_headers(self.max_headers);
        b
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting,
/// lets every open connection finish its in-flight request (idle ones close
/// at once) and returns when the last one has.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // One signal for every connection task: start a graceful shutdown.
    let draining = CancellationToken::new();
    // Knows when the last connection task has ended.
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics::counter!("http_connection_cap_reached_total").increment(1);
                tracing::debug!(
                    cap = limits.max_connections,
                    "connection cap reached; new connections wait in the backlog"
                );
                tokio::select! {
                    p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    _ = &mut shutdown => break,
                }
            }
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Small request/response exchanges: no Nagle delay on the answer.
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let draining = draining.clone();
        tracker.spawn(async move {
            let _permit = permit;
            metrics::gauge!("http_connections_open").increment(1.0);
            serve_connection(stream, remote, app, limits, draining).await;
            metrics::gauge!("http_connections_open").decrement(1.0);
        });
    }
    drop(listener);
    tracker.close();
    draining.cancel();
    tracker.wait().await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    app: Router,
    limits: Limits,
    draining: CancellationToken,
) {
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        // What `into_make_service_with_connect_info` would give the router:
        // the guard limits failed authentication per client address.
        req.extensions_mut().insert(ConnectInfo(remote));
        app.clone().oneshot(req)
    });
    let conn = limits
        .http1()
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => log_end(r),
        _ = draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            log_end(conn.await);
        }
    }
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        // Header timeouts, oversized heads and clients that hang up are the
        // clients' doing; nothing to alarm anyone about.
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// As `axum::serve` does: per-connection errors are the client's; anything
/// else (e.g. out of file descriptors) backs off a second instead of spinning.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
