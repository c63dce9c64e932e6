//! `loadgen`: the load generator behind `scripts/bench.sh` (docs/benchmarks.md).
//!
//! - `loadgen hello`: a bare axum "hello", the ceiling every gateway figure is
//!   compared with (same axum, same runtime, same machine, same run).
//! - `loadgen setup`: provisions the benchmark users and grants them credits
//!   through the admin route.
//! - `loadgen run`: drives one scenario over many users' tokens. Without
//!   `--rate` it is a closed loop (each connection sends its next request when
//!   the previous one is answered: the maximum rate). With `--rate` it is an
//!   open loop: request *i* is due at `start + i / rate` whatever happened
//!   before, and its latency is counted from that due time, so a stall shows
//!   up in the percentiles instead of silently slowing the sender
//!   (coordinated omission corrected, as wrk2 does). One JSON line out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::json;

#[derive(Parser)]
#[command(name = "loadgen", about = "Load generator for scripts/bench.sh")]
struct Cli {
    /// Runtime worker threads of this process (the load generator shares the
    /// machine with what it measures).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a bare axum `GET /hello` (the ceiling).
    Hello {
        #[arg(long, default_value = "127.0.0.1:18999")]
        listen: String,
    },
    /// Provision the users and grant each `--grant` credits (admin route).
    Setup {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1_000_000_000)]
        grant: i64,
    },
    /// Drive one scenario and print one JSON line of figures.
    Run {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_enum)]
        scenario: Scenario,
        /// Open connections (each carries one request at a time).
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Requests per second (open loop); absent: closed loop, as fast as it goes.
        #[arg(long)]
        rate: Option<f64>,
        /// Model name written into tracked events (to find a phase's rows in Postgres).
        #[arg(long, default_value = "bench-model")]
        model: String,
        /// Stop after this many requests (default: only the clock stops it).
        #[arg(long)]
        requests: Option<u64>,
    },
}

#[derive(Args, Clone)]
struct Target {
    #[arg(long, default_value = "http://127.0.0.1:18080")]
    url: String,
    #[arg(long, default_value_t = 1000)]
    users: usize,
    #[arg(long, default_value = "bench_user_")]
    user_prefix: String,
    /// HS256 secret the tokens are signed with (the gateway's JWT_SECRET).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    secret: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Scenario {
    /// `GET /hello` of `loadgen hello`.
    Hello,
    /// `POST /api/vscode/usage/track`, one event per request.
    Track1,
    /// `POST /api/vscode/usage/track`, 100 events per request.
    Track100,
    /// `POST /api/users/:id/credits/consume` of 1 credit, a fresh Idempotency-Key each.
    Consume,
    /// `GET /api/vscode/analytics?days=30` (served from the cache once warm).
    Analytics,
}

impl Scenario {
    fn events_per_request(self) -> u64 {
        match self {
            Self::Track1 => 1,
            Self::Track100 => 100,
            _ => 0,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Hello { listen } => hello(&listen).await,
            Cmd::Setup { target, grant } => setup(&target, grant).await,
            Cmd::Run {
                target,
                scenario,
                connections,
                seconds,
                rate,
                model,
                requests,
            } => {
                let plan = Plan::new(&target, scenario, &model)?;
                let report = run(
                    Arc::new(plan),
                    connections,
                    Duration::from_secs_f64(seconds),
                    rate,
                    requests.unwrap_or(u64::MAX),
                )
                .await?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
        }
    })
}

async fn hello(listen: &str) -> anyhow::Result<()> {
    let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

fn token(secret: &str, sub: &str, admin: bool) -> anyhow::Result<String> {
    let exp = chrono::Utc::now().timestamp() + 4 * 3600;
    let mut claims = json!({ "sub": sub, "exp": exp, "email": format!("{sub}@bench.test") });
    if admin {
        claims["role"] = json!("admin");
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Everything a request needs, computed before the clock starts.
struct Plan {
    scenario: Scenario,
    authority: String,
    addr: String,
    /// Per user: (`Bearer …` header value, path).
    users: Vec<(String, String)>,
    bodies: Vec<Bytes>,
}

impl Plan {
    fn new(target: &Target, scenario: Scenario, model: &str) -> anyhow::Result<Self> {
        let authority = target
            .url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let users = (0..target.users)
            .map(|i| {
                let sub = format!("{}{i}", target.user_prefix);
                let path = match scenario {
                    Scenario::Hello => "/hello".to_owned(),
                    Scenario::Track1 | Scenario::Track100 => "/api/vscode/usage/track".to_owned(),
                    Scenario::Consume => format!("/api/users/{sub}/credits/consume"),
                    Scenario::Analytics => "/api/vscode/analytics?days=30".to_owned(),
                };
                Ok((
                    format!("Bearer {}", token(&target.secret, &sub, false)?),
                    path,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let bodies = (0..16)
            .map(|v| match scenario {
                Scenario::Track1 => Bytes::from(event(v, v, model).to_string()),
                Scenario::Track100 => {
                    let events: Vec<_> = (0..100).map(|k| event(v, k, model)).collect();
                    Bytes::from(json!({ "events": events }).to_string())
                }
                Scenario::Consume => Bytes::from(
                    json!({"amount": 1, "provider": "openai", "model": model,
                           "prompt_tokens": 100 + v, "completion_tokens": 20})
                    .to_string(),
                ),
                Scenario::Hello | Scenario::Analytics => Bytes::new(),
            })
            .collect();
        Ok(Self {
            scenario,
            addr: authority.clone(),
            authority,
            users,
            bodies,
        })
    }

    fn request(&self, i: u64) -> Request<Full<Bytes>> {
        let (auth, path) = &self.users[(i % self.users.len() as u64) as usize];
        let body = self.bodies[(i % self.bodies.len() as u64) as usize].clone();
        let method = match self.scenario {
            Scenario::Hello | Scenario::Analytics => Method::GET,
            _ => Method::POST,
        };
        let mut b = Request::builder()
            .method(method)
            .uri(path.as_str())
            .header("host", self.authority.as_str());
        if self.scenario != Scenario::Hello {
            b = b.header("authorization", auth.as_str());
        }
        if !body.is_empty() {
            b = b.header("content-type", "application/json");
        }
        if self.scenario == Scenario::Consume {
            b = b.header("idempotency-key", uuid::Uuid::new_v4().to_string());
        }
        b.body(Full::new(body)).expect("valid request")
    }
}

/// Body variant `v`, event `k` of it: one session and one provider per
/// request (as one editor sends them), two models of that provider, one event
/// in five a feature event.
fn event(v: usize, k: usize, model: &str) -> serde_json::Value {
    const PROVIDERS: [&str; 3] = ["openai", "anthropic", "google"];
    const FEATURES: [&str; 2] = ["completion", "chat"];
    let session = format!("bench-s{v}");
    if k % 5 == 4 {
        json!({"kind": "feature", "feature": FEATURES[k % 2], "action": "accept",
               "duration_ms": 40 + k % 300, "session_id": session})
    } else {
        json!({"kind": "model", "provider": PROVIDERS[v % 3], "model": format!("{model}-{}", k % 2),
               "prompt_tokens": 200 + (v * 31 + k) % 1000, "completion_tokens": 30 + k % 200,
               "latency_ms": 300 + k % 900, "success": true, "session_id": session})
    }
}

async fn connect(addr: &str) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: Some(Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")),
            ..Self::default()
        }
    }

    fn merge(&mut self, other: Tally) {
        if let (Some(a), Some(b)) = (self.hist.as_mut(), other.hist.as_ref()) {
            a.add(b).expect("same bounds");
        }
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.errors += other.errors;
    }
}

async fn send(
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    plan: &Plan,
    i: u64,
) -> anyhow::Result<u16> {
    if sender.as_mut().is_none_or(|s| s.is_closed()) {
        *sender = Some(connect(&plan.addr).await?);
    }
    let s = sender.as_mut().expect("connected");
    s.ready().await?;
    let resp = s.send_request(plan.request(i)).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

async fn run(
    plan: Arc<Plan>,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
    max_requests: u64,
) -> anyhow::Result<serde_json::Value> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let plan = plan.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut sender = None;
            tokio::time::sleep_until(start.into()).await;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let due = match rate {
                    Some(r) => start + Duration::from_secs_f64(i as f64 / r),
                    None => Instant::now(),
                };
                if due >= end || i >= max_requests {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                match send(&mut sender, &plan, i).await {
                    Ok(status) => {
                        let us = due.elapsed().as_micros().max(1) as u64;
                        tally.hist.as_mut().expect("hist").saturating_record(us);
                        *tally.statuses.entry(status).or_default() += 1;
                    }
                    Err(_) => {
                        tally.errors += 1;
                        sender = None;
                    }
                }
            }
            tally
        }));
    }
    let mut all = Tally::new();
    for t in tasks {
        all.merge(t.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let hist = all.hist.take().expect("hist");
    let requests = hist.len();
    let ok: u64 = all
        .statuses
        .iter()
        .filter(|(s, _)| (200..300).contains(*s))
        .map(|(_, n)| n)
        .sum();
    let events = ok * plan.scenario.events_per_request();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "scenario": format!("{:?}", plan.scenario).to_lowercase(),
        "mode": if rate.is_some() { "open" } else { "closed" },
        "target_rate": rate,
        "connections": connections,
        "seconds": elapsed,
        "requests": requests,
        "ok": ok,
        "statuses": all.statuses,
        "errors": all.errors,
        "req_per_s": (requests as f64 / elapsed).round(),
        "events_accepted": events,
        "events_per_s": (events as f64 / elapsed).round(),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": hist.max() as f64 / 1000.0,
    }))
}

async fn setup(target: &Target, grant: i64) -> anyhow::Result<()> {
    let admin = format!(
        "Bearer {}",
        token(
            &target.secret,
            &format!("{}admin", target.user_prefix),
            true
        )?
    );
    let addr = target
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (admin, addr, next, failed, target) = (
            admin.clone(),
            addr.clone(),
            next.clone(),
            failed.clone(),
            target.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= target.users {
                    return anyhow::Ok(());
                }
                let sub = format!("{}{i}", target.user_prefix);
                let body = json!({"amount": grant, "reason": "benchmark"}).to_string();
                let req = Request::builder()
                    .method(Method::POST)
                    .uri(format!("/api/admin/users/{sub}/credits/grant"))
                    .header("host", addr.as_str())
                    .header("authorization", admin.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                if !status.is_success() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "setup: grant to {sub}: {status} {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let failed = failed.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} grants failed");
    println!("setup: {} users granted {grant} credits", target.users);
    Ok(())
}
