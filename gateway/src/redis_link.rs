//! The hot path's Redis link: one multiplexed connection (requests of every
//! task are pipelined on it), a bound on every round trip, and a breaker so
//! that, while Redis is down, requests take their fallback at once instead of
//! each waiting out `redis.timeout_ms`.
//!
//! Why not the deadpool pool: `Pool::get` recycles a connection with a
//! `PING` round trip before handing it out, which doubles the cost of a rate
//! limit check (see docs/benchmarks.md), and a pool has no memory of Redis
//! being down, so every request pays the connect timeout again.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::{Client, Conn};
use redis::RedisError;

/// While Redis is marked down, one request per this interval probes it
/// (reconnects); every other request takes its fallback without waiting.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Marked down recently; no round trip was attempted.
    #[error("redis is marked down; next probe within {PROBE_INTERVAL:?}")]
    Down,
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Redis(#[from] RedisError),
}

pub struct RedisLink {
    /// A node or a cluster (`common::redis::conn`). On a cluster a failed
    /// command concerns its slot's node only: it never trips the breaker (the
    /// cluster connection reconnects per node), so the users of healthy slots
    /// are served while one master is away.
    client: Client,
    /// Bound on connecting and on each round trip (`redis.timeout_ms`).
    timeout: Duration,
    /// The shared connection and its generation; `None` until the first use
    /// and after a failure.
    current: Mutex<Option<(u64, Conn)>>,
    /// Numbers connections, so a late failure on an old one leaves its
    /// replacement alone.
    generation: AtomicU64,
    /// Serializes connecting so a burst of first requests opens one socket.
    connecting: tokio::sync::Mutex<()>,
    breaker: Breaker,
    /// The idempotency finish batcher, started by the first finish.
    finisher: std::sync::OnceLock<Finisher>,
}

impl RedisLink {
    /// Checks the URL only; the first use connects (`redis://host/N` selects db N).
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self::with_client(
            Client::single(url, common::tls::material())?,
            timeout,
        ))
    }

    /// The link of the settings: a cluster when `redis.cluster_urls` is set.
    pub fn from_settings(redis: &common::settings::RedisSettings) -> anyhow::Result<Self> {
        let client = Client::from_settings(redis, common::tls::material())?;
        Ok(Self::with_client(
            client,
            Duration::from_millis(redis.timeout_ms),
        ))
    }

    pub fn with_client(client: Client, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            breaker: Breaker::new(),
            finisher: std::sync::OnceLock::new(),
        }
    }

    /// True while Redis is marked down (for readiness and logs).
    pub fn is_down(&self) -> bool {
        self.breaker.is_down()
    }

    /// Runs `op` on the shared connection within the timeout. A failure of
    /// the link itself (refused, dropped, timed out) drops the connection and
    /// marks Redis down; a Redis reply error (a script bug) does not.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, LinkError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (generation, conn) = self.conn().await?;
        match tokio::time::timeout(self.timeout, op(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if is_link_failure(&e) && !self.client.is_cluster() {
                    self.fail(generation);
                }
                Err(e.into())
            }
            Err(_) => {
                if !self.client.is_cluster() {
                    self.fail(generation);
                }
                Err(LinkError::Timeout(self.timeout))
            }
        }
    }

    /// The shared connection itself, for multi-step work (credit scripts,
    /// caches). Each command on it is bounded by the response timeout; a
    /// broken link is noticed (and replaced) by the next [`RedisLink::run`],
    /// which every `/api/` request makes for its rate limit.
    pub async fn connection(&self) -> Result<Conn, LinkError> {
        self.conn().await.map(|(_, c)| c)
    }

    async fn conn(&self) -> Result<(u64, Conn), LinkError> {
        if let Some(c) = self.current.lock().expect("lock").clone() {
            return Ok(c);
        }
        // Healthy (or never tried): wait for whoever is connecting. Marked
        // down: only the one request that wins the probe slot tries.
        let _guard = match self.breaker.admit(self.breaker.now_ms()) {
            Admit::Pass => {
                let g = self.connecting.lock().await;
                // The connect we waited for failed: don't queue up another.
                if self.breaker.is_down() {
                    return Err(LinkError::Down);
                }
                g
            }
            Admit::Probe => match self.connecting.try_lock() {
                Ok(g) => g,
                Err(_) => return Err(LinkError::Down),
            },
            Admit::Refuse => return Err(LinkError::Down),
        };
        if let Some(c) = self.current.lock().expect("lock").clone() {
            return Ok(c);
        }
        let connect = self.client.connect(self.timeout);
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(c)) => {
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                *self.current.lock().expect("lock") = Some((generation, c.clone()));
                if self.breaker.recover() {
                    tracing::info!("redis reachable again");
                }
                Ok((generation, c))
            }
            Ok(Err(e)) => {
                self.breaker.trip(self.breaker.now_ms());
                Err(e.into())
            }
            Err(_) => {
                self.breaker.trip(self.breaker.now_ms());
                Err(LinkError::Timeout(self.timeout))
            }
        }
    }

    fn fail(&self, generation: u64) {
        {
            let mut current = self.current.lock().expect("lock");
            match &*current {
                Some((g, _)) if *g == generation => *current = None,
                // Already replaced: that connection's failure is old news.
                _ => return,
            }
        }
        if self.breaker.trip(self.breaker.now_ms()) {
            tracing::warn!("redis unreachable; using fallbacks, probing every {PROBE_INTERVAL:?}");
        }
    }
}

/// One idempotency finish: store a request's final answer under its key
/// (`idem_finish.lua`), once its event is confirmed.
#[derive(Debug, Clone)]
pub struct Finish {
    pub record: String,
    pub hash: String,
    pub answer: String,
    pub ttl_ms: u64,
    pub id: String,
}

/// The most finishes one batch writes.
const FINISH_BATCH: usize = 256;

/// The finish batcher (docs/credits.md, "Idempotency"): one task per gateway
/// takes every finish handed to it and writes what has gathered in one
/// `idem_finish_many` call, at once when idle (so a lone request's finish
/// lands as soon as it did before) and in batches under load, off the
/// request's path. A request hands its finish over before it answers; a
/// retry on this gateway that meets its key still running while that finish
/// is queued waits for it ([`RedisLink::finish_landed`]) instead of a 409.
/// A failed write is logged and leaves each record in progress, which the
/// `STALE` path resolves from Postgres.
struct Finisher {
    tx: tokio::sync::mpsc::UnboundedSender<(u64, Finish)>,
    shared: Arc<FinishShared>,
}

struct FinishShared {
    next: AtomicU64,
    /// Record → the sequence number of its queued finish.
    queued: Mutex<std::collections::HashMap<String, u64>>,
    /// The highest sequence number written (or given up on).
    done: tokio::sync::watch::Sender<u64>,
}

impl RedisLink {
    /// Hands a finish to the batcher (never waits for Redis).
    pub fn finish(self: &Arc<Self>, f: Finish) {
        let finisher = self.finisher.get_or_init(|| self.start_finisher());
        let seq = finisher.shared.next.fetch_add(1, Ordering::Relaxed) + 1;
        finisher
            .shared
            .queued
            .lock()
            .expect("lock")
            .insert(f.record.clone(), seq);
        if finisher.tx.send((seq, f)).is_err() {
            tracing::warn!("idempotent answer not stored: the finish batcher has stopped");
        }
    }

    /// Whether a finish of `record` was queued here and not yet written; if
    /// so, waits (at most the Redis timeout) until its batch was written or
    /// given up on.
    pub async fn finish_landed(&self, record: &str) -> bool {
        let Some(finisher) = self.finisher.get() else {
            return false;
        };
        let Some(seq) = finisher
            .shared
            .queued
            .lock()
            .expect("lock")
            .get(record)
            .copied()
        else {
            return false;
        };
        let mut done = finisher.shared.done.subscribe();
        let wait = done.wait_for(|d| *d >= seq);
        let _ = tokio::time::timeout(self.timeout * 2, wait).await;
        true
    }

    fn start_finisher(self: &Arc<Self>) -> Finisher {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Finish)>();
        let shared = Arc::new(FinishShared {
            next: AtomicU64::new(0),
            queued: Mutex::new(std::collections::HashMap::new()),
            done: tokio::sync::watch::channel(0).0,
        });
        let link = Arc::downgrade(self);
        let task_shared = shared.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < FINISH_BATCH {
                    match rx.try_recv() {
                        Ok(f) => batch.push(f),
                        Err(_) => break,
                    }
                }
                let Some(link) = link.upgrade() else { break };
                if let Err(e) = write_finishes(&link, &batch).await {
                    if batch.len() == 1 {
                        tracing::warn!(error = %e, "idempotent answer not stored");
                    } else {
                        // One user's record (a key of another type, say) must not
                        // cost the others theirs: each is written alone.
                        tracing::warn!(error = %e, n = batch.len(), "finish batch refused; writing each alone");
                        for one in batch.chunks(1) {
                            if let Err(e) = write_finishes(&link, one).await {
                                tracing::warn!(error = %e, record = %one[0].1.record, "idempotent answer not stored");
                            }
                        }
                    }
                }
                drop(link);
                let last = batch.last().map(|(seq, _)| *seq).unwrap_or(0);
                {
                    let mut queued = task_shared.queued.lock().expect("lock");
                    for (seq, f) in &batch {
                        if queued.get(&f.record) == Some(seq) {
                            queued.remove(&f.record);
                        }
                    }
                }
                task_shared.done.send_replace(last);
            }
        });
        Finisher { tx, shared }
    }
}

/// The `idem_finish_many` calls of a batch: one on a single node; on Redis
/// Cluster one per slot (its keys span users), all of them tried, the first
/// error returned.
async fn write_finishes(link: &RedisLink, batch: &[(u64, Finish)]) -> Result<(), LinkError> {
    link.run(|mut conn| async move {
        let mut failed = None;
        for group in conn.by_slot(batch, |(_, f)| f.record.as_str()) {
            let mut inv = common::redis::scripts::scripts()
                .idem_finish_many
                .prepare_invoke();
            for (_, f) in group {
                inv.key(&f.record)
                    .arg(&f.hash)
                    .arg(&f.answer)
                    .arg(f.ttl_ms)
                    .arg(&f.id);
            }
            if let Err(e) = inv.invoke_async::<i64>(&mut conn).await {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    })
    .await
}

fn is_link_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Not marked down: go ahead.
    Pass,
    /// Marked down and this caller won the probe for this interval.
    Probe,
    /// Marked down; someone probed recently.
    Refuse,
}

/// When Redis may be tried next, as milliseconds since `epoch` (0 = up).
struct Breaker {
    epoch: Instant,
    next_probe_ms: AtomicU64,
}

impl Breaker {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            next_probe_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that a real instant is never the "up" sentinel 0.
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn is_down(&self) -> bool {
        self.next_probe_ms.load(Ordering::Acquire) != 0
    }

    fn admit(&self, now_ms: u64) -> Admit {
        let next = self.next_probe_ms.load(Ordering::Acquire);
        if next == 0 {
            return Admit::Pass;
        }
        if now_ms < next {
            return Admit::Refuse;
        }
        // Claim this interval's probe; losers of the race are refused.
        let claimed = now_ms + PROBE_INTERVAL.as_millis() as u64;
        match self.next_probe_ms.compare_exchange(
            next,
            claimed,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Admit::Probe,
            Err(_) => Admit::Refuse,
        }
    }

    /// Marks Redis down; true when it was up before (worth one log line).
    fn trip(&self, now_ms: u64) -> bool {
        let next = now_ms + PROBE_INTERVAL.as_millis() as u64;
        self.next_probe_ms.swap(next, Ordering::AcqRel) == 0
    }

    /// Marks Redis up; true when it was down before.
    fn recover(&self) -> bool {
        self.next_probe_ms.swap(0, Ordering::AcqRel) != 0
    }
}

/// A handle on the shared connection; `&mut *conn` is a `ConnectionLike`.
pub struct LinkConn(Conn);

impl RedisLink {
    /// The shared multiplexed connection as a [`LinkConn`] (503 when Redis is down).
    pub async fn link_conn(&self) -> Result<LinkConn, LinkError> {
        Ok(LinkConn(self.connection().await?))
    }
}

impl std::ops::Deref for LinkConn {
    type Target = Conn;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for LinkConn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Makes the user's cached profile and analytics unservable after a ledger
/// change committed by the gateway itself (an admin grant), as a worker does
/// after its commits: bumps the cache generation (1 day TTL) and drops the
/// profile. Best effort: what stays cached expires with its TTL.
pub async fn drop_cached_views(
    redis_link: &RedisLink,
    keys: &common::redis::keys::Keys,
    user_id: &str,
) {
    let (gen, profile) = (keys.analytics_gen(user_id), keys.profile(user_id));
    let done = redis_link
        .run(|mut c| async move {
            redis::pipe()
                .atomic()
                .incr(&gen, 1)
                .ignore()
                .expire(&gen, 86_400)
                .ignore()
                .del(&profile)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await;
    if let Err(e) = done {
        tracing::warn!(error = %e, user_id, "cached profile not dropped; it expires with its TTL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tripped_breaker_admits_one_probe_per_interval() {
        let b = Breaker::new();
        assert_eq!(b.admit(10), Admit::Pass);
        assert!(b.trip(10));
        assert!(!b.trip(10), "already down");
        assert_eq!(b.admit(500), Admit::Refuse);
        assert_eq!(b.admit(1010), Admit::Probe);
        assert_eq!(b.admit(1011), Admit::Refuse, "one probe per interval");
        assert_eq!(b.admit(2010), Admit::Probe);
        assert!(b.recover());
        assert_eq!(b.admit(2011), Admit::Pass);
        assert!(!b.is_down());
    }

    /// Against the machine's Redis (keys under a prefix of its own, removed after).
    #[tokio::test]
    async fn one_users_refused_record_does_not_cost_the_others_in_its_finish_batch() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let link = Arc::new(RedisLink::new(&url, Duration::from_secs(2)).unwrap());
        // KEYS below reads one node: this test runs on the single node only.
        let p = format!("finish_{}", uuid::Uuid::new_v4().simple());
        let key = |u: &str| format!("{p}:{{{u}}}:idem:consume:k");
        let mut c = link.connection().await.unwrap();
        // u1's record is a string, not a hash: its HMGET is WRONGTYPE.
        redis::cmd("SET")
            .arg(key("u1"))
            .arg("x")
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        let batch: Vec<(u64, Finish)> = ["u0", "u1", "u2"]
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let f = Finish {
                    record: key(u),
                    hash: "h".into(),
                    answer: format!("{{\"user\":\"{u}\"}}"),
                    ttl_ms: 60_000,
                    id: "tx".into(),
                };
                (i as u64 + 1, f)
            })
            .collect();
        assert!(
            write_finishes(&link, &batch).await.is_err(),
            "the batch is refused whole"
        );
        for f in batch.iter().map(|(_, f)| f) {
            link.finish(f.clone());
        }
        assert!(link.finish_landed(&key("u2")).await);
        for u in ["u0", "u2"] {
            let st: Option<String> = redis::cmd("HGET")
                .arg(key(u))
                .arg("st")
                .query_async(&mut c)
                .await
                .unwrap();
            assert_eq!(st.as_deref(), Some("done"), "{u}'s answer stored");
        }
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{p}:*"))
            .query_async(&mut c)
            .await
            .unwrap();
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_redis_costs_one_attempt_per_interval() {
        let link = RedisLink::new("redis://127.0.0.1:1", Duration::from_millis(200)).unwrap();
        let first =
            link.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await });
        assert!(matches!(
            first.await,
            Err(LinkError::Redis(_) | LinkError::Timeout(_))
        ));
        assert!(link.is_down());
        let started = Instant::now();
        for _ in 0..100 {
            let r = link
                .run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await });
            assert!(matches!(r.await, Err(LinkError::Down)));
        }
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
