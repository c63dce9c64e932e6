//! Request deadlines (`gateway.request_timeout_ms`).
//!
//! Every request gets a deadline when it arrives. Until its *commit point*
//! (the first write: a publish, a credit reservation, a Postgres transaction
//! that others can see) a request only reads, so cutting it changes nothing:
//! past the deadline it is dropped and answered 503 `unavailable`. A handler
//! about to write calls [`Deadline::commit`]; from then on the deadline no
//! longer cuts it, because an answer of "unavailable" for an event the broker
//! has confirmed, or for a reservation already made, would deny an acceptance
//! that happened (docs/api.md "Usage": a 202 only after the confirm; and never a 503
//! that hides a write). A committed request is bounded instead by what it
//! waits on: the publisher's confirm wait (`amqp.confirm_timeout_ms`) and
//! each Redis round trip (`redis.timeout_ms`).
//!
//! Commit and expiry race; one atomic decides which came first, so exactly
//! one of them wins (see [`State`]).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Where a request stands against its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Reading only: the deadline may still cut it.
    Open = 0,
    /// Past its commit point: it runs to its end.
    Committed = 1,
    /// The deadline won: the request is dropped and answered 503.
    Expired = 2,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Open,
            1 => Self::Committed,
            _ => Self::Expired,
        }
    }
}

/// One request's deadline. Cheap to clone; clones share the state.
#[derive(Debug, Clone)]
pub struct Deadline {
    state: Arc<AtomicU8>,
    after: Duration,
}

impl Deadline {
    pub fn new(after: Duration) -> Self {
        Self {
            state: Arc::new(AtomicU8::new(State::Open as u8)),
            after,
        }
    }

    pub fn after(&self) -> Duration {
        self.after
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Marks the commit point: call it right before the first write. Errs
    /// when the deadline has already passed (then nothing may be written).
    /// Calling it again is harmless.
    pub fn commit(&self) -> Result<(), ApiError> {
        match self.transition(State::Committed) {
            State::Open | State::Committed => Ok(()),
            State::Expired => Err(self.exceeded()),
        }
    }

    /// The deadline's side of the race: true when it cut the request, false
    /// when the request had committed first (and must be let finish).
    pub fn expire(&self) -> bool {
        match self.transition(State::Expired) {
            State::Open | State::Expired => true,
            State::Committed => false,
        }
    }

    /// Moves Open → `to`; returns the state found (Open when the move won).
    fn transition(&self, to: State) -> State {
        match self.state.compare_exchange(
            State::Open as u8,
            to as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => State::Open,
            Err(found) => State::from_u8(found),
        }
    }

    pub fn exceeded(&self) -> ApiError {
        ApiError::DeadlineExceeded {
            after_ms: self.after.as_millis() as u64,
        }
    }
}

/// Handlers that write take the request's deadline as an argument. Outside
/// the middleware (a router built without it) the deadline never expires.
impl<S: Send + Sync> FromRequestParts<S> for Deadline {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Deadline>()
            .cloned()
            .unwrap_or_else(|| Deadline::new(Duration::MAX)))
    }
}

/// The middleware: races the rest of the stack (guard, body, handler) against
/// the deadline. At the deadline an open request is dropped and answered;
/// a committed one is awaited.
pub async fn enforce(after: Duration, mut req: Request, next: Next) -> Response {
    let deadline = Deadline::new(after);
    req.extensions_mut().insert(deadline.clone());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let run = next.run(req);
    tokio::pin!(run);
    tokio::select! {
        biased;
        resp = &mut run => resp,
        _ = tokio::time::sleep(after) => {
            if deadline.expire() {
                metrics::counter!("http_request_deadline_total", "route" => route.clone(), "outcome" => "cut")
                    .increment(1);
                tracing::warn!(route = %route, after_ms = after.as_millis() as u64, "request cut at its deadline");
                deadline.exceeded().into_response()
            } else {
                metrics::counter!("http_request_deadline_total", "route" => route, "outcome" => "committed")
                    .increment(1);
                run.await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_before_the_deadline_wins_and_the_deadline_lets_it_finish() {
        let d = Deadline::new(Duration::from_millis(10));
        assert!(d.commit().is_ok());
        assert!(!d.expire(), "a committed request is never cut");
        assert_eq!(d.state(), State::Committed);
        assert!(d.commit().is_ok(), "committing twice is harmless");
    }

    #[test]
    fn after_the_deadline_nothing_may_commit() {
        let d = Deadline::new(Duration::from_millis(10));
        assert!(d.expire());
        let e = d.commit().unwrap_err();
        assert_eq!(e.code(), "unavailable");
        assert_eq!(e.status().as_u16(), 503);
        assert_eq!(d.state(), State::Expired);
        assert!(d.expire());
    }

    #[test]
    fn clones_share_one_outcome() {
        let d = Deadline::new(Duration::from_secs(1));
        let handler_side = d.clone();
        handler_side.commit().unwrap();
        assert!(!d.expire());
    }

    #[test]
    fn of_two_racing_sides_exactly_one_wins() {
        for _ in 0..200 {
            let d = Deadline::new(Duration::from_millis(1));
            let (a, b) = (d.clone(), d.clone());
            let t1 = std::thread::spawn(move || a.commit().is_ok());
            let t2 = std::thread::spawn(move || b.expire());
            let (committed, cut) = (t1.join().unwrap(), t2.join().unwrap());
            assert!(committed != cut, "committed={committed} cut={cut}");
        }
    }
}
