//! When a batch closes: the first delivery opens it, then whatever follows
//! joins it until one of four limits is met.
//!
//! - `worker.batch_size` deliveries, or `worker.batch_max_bytes` of bodies:
//!   closed at once (one transaction must stay bounded).
//! - `worker.batch_wait_ms` since the first delivery: a busy queue gathers up
//!   to the whole wait into one transaction (Postgres pays per commit).
//! - `worker.batch_idle_ms` with nothing new: a quiet queue is written after
//!   the idle gap, so its lag stays low.
//!
//! The timer is `min(opened + wait, last + idle)`, re-armed after every
//! delivery. A delivery already waiting when the timer is due still joins:
//! the stream is asked before the timer, as `tokio::time::timeout_at` does.
//! [`next`] is the decision over counts and instants; [`gather`] runs it
//! over any stream (the broker's consumer, or a channel in the tests).

use std::time::Duration;

use common::settings::WorkerSettings;
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;

/// The four limits of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// At most this many deliveries.
    pub size: usize,
    /// Closed once the bodies reach this many bytes.
    pub max_bytes: usize,
    /// The longest a batch stays open, from its first delivery.
    pub wait: Duration,
    /// The longest gap between two deliveries of one batch.
    pub idle: Duration,
}

impl Limits {
    pub fn from_settings(w: &WorkerSettings) -> Self {
        Self {
            size: w.batch_size,
            max_bytes: w.batch_max_bytes,
            wait: Duration::from_millis(w.batch_wait_ms),
            idle: Duration::from_millis(w.batch_idle_ms),
        }
    }
}

/// Why a batch closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    Size,
    Bytes,
    /// `wait` since the first delivery passed.
    Wait,
    /// Nothing came for `idle`.
    Idle,
    /// The stream ended or failed (the broker is gone).
    Ended,
}

/// What to do after a delivery joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Close(Close),
    /// Take another delivery if one comes by then.
    WaitUntil(Instant),
}

/// The decision: `count` deliveries of `bytes` in total, the batch opened at
/// `opened`, the last delivery taken at `last`.
pub fn next(limits: &Limits, count: usize, bytes: usize, opened: Instant, last: Instant) -> Next {
    if count >= limits.size {
        return Next::Close(Close::Size);
    }
    if bytes >= limits.max_bytes {
        return Next::Close(Close::Bytes);
    }
    Next::WaitUntil((opened + limits.wait).min(last + limits.idle))
}

/// Which limit a timer that fired with nothing new stands for.
pub fn timed_out(limits: &Limits, opened: Instant, last: Instant) -> Close {
    if opened + limits.wait <= last + limits.idle {
        Close::Wait
    } else {
        Close::Idle
    }
}

/// Gathers a batch that opens with `first` from `rest`, by [`next`];
/// `bytes` is the size a delivery counts for.
pub async fn gather<S, T, E>(
    first: T,
    rest: &mut S,
    limits: &Limits,
    bytes: impl Fn(&T) -> usize,
) -> (Vec<T>, Close)
where
    S: Stream<Item = Result<T, E>> + Unpin,
{
    let opened = Instant::now();
    let mut last = opened;
    let mut total = bytes(&first);
    let mut batch = vec![first];
    loop {
        let until = match next(limits, batch.len(), total, opened, last) {
            Next::Close(c) => return (batch, c),
            Next::WaitUntil(t) => t,
        };
        match tokio::time::timeout_at(until, rest.next()).await {
            Ok(Some(Ok(d))) => {
                total += bytes(&d);
                batch.push(d);
                last = Instant::now();
            }
            Ok(_) => return (batch, Close::Ended),
            Err(_) => return (batch, timed_out(limits, opened, last)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        Limits {
            size: 3,
            max_bytes: 100,
            wait: 100 * MS,
            idle: 20 * MS,
        }
    }

    #[test]
    fn a_batch_closes_at_its_size_or_its_bytes() {
        let t = Instant::now();
        assert_eq!(next(&limits(), 3, 10, t, t), Next::Close(Close::Size));
        assert_eq!(next(&limits(), 1, 100, t, t), Next::Close(Close::Bytes));
        // Size wins when both are reached.
        assert_eq!(next(&limits(), 5, 500, t, t), Next::Close(Close::Size));
    }

    #[test]
    fn the_timer_is_the_idle_gap_until_the_wait_is_nearer() {
        let t = Instant::now();
        let l = limits();
        assert_eq!(next(&l, 1, 1, t, t), Next::WaitUntil(t + 20 * MS));
        assert_eq!(next(&l, 2, 2, t, t + 50 * MS), Next::WaitUntil(t + 70 * MS));
        assert_eq!(
            next(&l, 2, 2, t, t + 90 * MS),
            Next::WaitUntil(t + 100 * MS)
        );
        // Past the wait the timer is already due (only a waiting delivery joins).
        assert_eq!(
            next(&l, 2, 2, t, t + 150 * MS),
            Next::WaitUntil(t + 100 * MS)
        );
        assert_eq!(timed_out(&l, t, t + 10 * MS), Close::Idle);
        assert_eq!(timed_out(&l, t, t + 80 * MS), Close::Wait);
        assert_eq!(timed_out(&l, t, t + 150 * MS), Close::Wait);
    }

    /// Sends `n` deliveries of `size` bytes, `every` apart.
    fn feed(n: usize, size: usize, every: Duration) -> mpsc::Receiver<Result<usize, ()>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            for _ in 0..n {
                tokio::time::sleep(every).await;
                if tx.send(Ok(size)).await.is_err() {
                    return;
                }
            }
            // Keep the stream open: it ends only when the test drops it.
            tx.closed().await;
        });
        rx
    }

    async fn run(mut rx: mpsc::Receiver<Result<usize, ()>>, l: Limits) -> (usize, Close, Duration) {
        let mut stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let start = Instant::now();
        let (batch, close) = gather(1usize, &mut stream, &l, |b| *b).await;
        (batch.len(), close, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_queue_is_written_after_the_idle_gap() {
        let l = Limits {
            size: 1000,
            ..limits()
        };
        // Two more 5 ms apart, then nothing: closed 20 ms after the last.
        let (n, close, took) = run(feed(2, 1, 5 * MS), l).await;
        assert_eq!((n, close), (3, Close::Idle));
        assert_eq!(took, 30 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_queue_is_gathered_for_the_whole_wait() {
        let l = Limits {
            size: 1000,
            ..limits()
        };
        // One every 15 ms, never idle for 20 ms: closed at 100 ms.
        let (n, close, took) = run(feed(50, 1, 15 * MS), l).await;
        assert_eq!((n, close, took), (7, Close::Wait, 100 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_closes_without_waiting() {
        let (n, close, took) = run(feed(10, 1, MS), limits()).await;
        assert_eq!((n, close, took), (3, Close::Size, 2 * MS));
        let l = Limits {
            size: 1000,
            ..limits()
        };
        let (n, close, _) = run(feed(10, 40, MS), l).await;
        assert_eq!((n, close), (4, Close::Bytes));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_ends_closes_the_batch() {
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let (n, close, took) = run(rx, limits()).await;
        assert_eq!((n, close, took), (1, Close::Ended, Duration::ZERO));
    }
}
