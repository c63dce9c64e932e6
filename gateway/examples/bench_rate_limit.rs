//! Cost of one rate-limit check against a real Redis (docs/benchmarks.md).
//!
//! Measures `rate_limit::decide` — the GCRA script over the gateway's
//! multiplexed [`RedisLink`] — one check at a time and from 32 concurrent
//! tasks, and the same script through a deadpool connection (`Pool::get`
//! pings before handing a connection out) for comparison.
//!
//! Usage: `bench_rate_limit [REDIS_URL] [CHECKS]`
//! (default `redis://127.0.0.1:6379` and 100000 checks per mode).

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::settings::{ClassLimit, RedisErrorPolicy};
use gateway::rate_limit::{decide, script};
use gateway::redis_link::RedisLink;

/// Large enough that nearly every check passes (the script's writing path).
const LIMIT: ClassLimit = ClassLimit {
    limit: 1_000_000,
    window_secs: 60,
};
const CONCURRENCY: usize = 32;

struct Run {
    name: &'static str,
    tasks: usize,
    checks: usize,
    wall: Duration,
    /// Per-check latencies in nanoseconds.
    lat: Vec<u64>,
}

impl Run {
    fn report(&mut self) {
        self.lat.sort_unstable();
        let pct = |p: f64| {
            self.lat[((self.lat.len() as f64 * p) as usize).min(self.lat.len() - 1)] as f64 / 1000.0
        };
        println!(
            "| {:<28} | {:>5} | {:>8} | {:>10.0} | {:>8.1} | {:>8.1} |",
            self.name,
            self.tasks,
            self.checks,
            self.checks as f64 / self.wall.as_secs_f64(),
            pct(0.50),
            pct(0.99),
        );
    }
}

/// Runs `tasks` tasks, each doing `per_task` checks of its own key.
async fn run<F, Fut>(name: &'static str, tasks: usize, per_task: usize, check: F) -> Run
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let check = Arc::new(check);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let check = check.clone();
        set.spawn(async move {
            let key = format!("bench:{{u{t}}}:rl:usage");
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t0 = Instant::now();
                assert!(check(key.clone()).await, "a check failed or was degraded");
                lat.push(t0.elapsed().as_nanos() as u64);
            }
            lat
        });
    }
    let mut lat = Vec::with_capacity(tasks * per_task);
    while let Some(part) = set.join_next().await {
        lat.extend(part.expect("task"));
    }
    Run {
        name,
        tasks,
        checks: tasks * per_task,
        wall: started.elapsed(),
        lat,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let checks: usize = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(100_000);
    let timeout = Duration::from_secs(2);

    let link = Arc::new(RedisLink::new(&url, timeout)?);
    // Never used: with Redis up no check falls back (a degraded one aborts).
    let pg = sqlx::PgPool::connect_lazy("postgres://postgres@127.0.0.1:1/none")?;
    let mut cfg = deadpool_redis::Config::from_url(url.clone());
    cfg.pool = Some(deadpool_redis::PoolConfig::new(CONCURRENCY));
    let pool = cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))?;

    let via_link = {
        let (link, pg) = (link.clone(), pg.clone());
        move |key: String| {
            let (link, pg) = (link.clone(), pg.clone());
            async move {
                let d = decide(
                    &link,
                    &pg,
                    RedisErrorPolicy::Deny,
                    &key,
                    "bench",
                    "usage",
                    LIMIT,
                )
                .await;
                d.degraded.is_none()
            }
        }
    };
    let via_pool = {
        let pool = pool.clone();
        move |key: String| {
            let pool = pool.clone();
            async move {
                let Ok(mut conn) = pool.get().await else {
                    return false;
                };
                script()
                    .key(&key)
                    .arg(LIMIT.limit)
                    .arg(LIMIT.window_secs)
                    .invoke_async::<Vec<i64>>(&mut *conn)
                    .await
                    .is_ok()
            }
        }
    };

    // Warm up: connect, load the script, fill the pool.
    run("warm-up", CONCURRENCY, 200, via_link.clone()).await;
    run("warm-up", CONCURRENCY, 200, via_pool.clone()).await;

    println!(
        "redis: {url}; {checks} checks per row; limit {}/{} s",
        LIMIT.limit, LIMIT.window_secs
    );
    println!();
    println!(
        "| path                         | tasks |   checks |   checks/s |  p50 µs |  p99 µs |"
    );
    println!(
        "|------------------------------|------:|---------:|-----------:|--------:|--------:|"
    );
    run("decide (RedisLink)", 1, checks, via_link.clone())
        .await
        .report();
    run(
        "decide (RedisLink)",
        CONCURRENCY,
        checks / CONCURRENCY,
        via_link,
    )
    .await
    .report();
    run("pool.get + script", 1, checks, via_pool.clone())
        .await
        .report();
    run(
        "pool.get + script",
        CONCURRENCY,
        checks / CONCURRENCY,
        via_pool,
    )
    .await
    .report();

    let mut conn = pool.get().await?;
    let keys: Vec<String> = (0..CONCURRENCY)
        .map(|t| format!("bench:{{u{t}}}:rl:usage"))
        .collect();
    redis::cmd("DEL")
        .arg(&keys)
        .query_async::<()>(&mut *conn)
        .await?;
    Ok(())
}
