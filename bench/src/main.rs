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
//!
//! Tokens: `--tokens hs256` signs with `JWT_SECRET` (no `kid`); `--tokens
//! rs256` signs with the RSA key of `--rsa-key` under `--kid`, the way a Clerk
//! session token reaches the gateway (verified through the JWKS that
//! `scripts/bench.sh` serves). Either is valid for an hour from its minting.

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
    /// Mint the users' tokens into `--token-file` (once a run: RSA signing is slow).
    Mint {
        #[command(flatten)]
        target: Target,
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
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, default_value = "")]
    secret: String,
    /// How the tokens are signed.
    #[arg(long, value_enum, default_value = "hs256")]
    tokens: Tokens,
    /// RSA private key (PEM) that signs `--tokens rs256`; its public half is in the gateway's JWKS.
    #[arg(long, env = "BENCH_RSA_KEY")]
    rsa_key: Option<std::path::PathBuf>,
    /// Users' tokens, one a line: read from this file when it holds one per
    /// user, else minted and written there (RSA signing is slow: mint once a run).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// The `kid` of that key in the JWKS.
    #[arg(long, env = "BENCH_RSA_KID", default_value = "bench-rs256")]
    kid: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Tokens {
    /// HS256 with `JWT_SECRET`, no `kid`.
    Hs256,
    /// RS256 with `--rsa-key`, `kid` = `--kid` (a Clerk session token's form).
    Rs256,
}

/// Signs the benchmark's tokens: the key is parsed once, every token is valid
/// for an hour from its minting.
struct Minter {
    header: jsonwebtoken::Header,
    key: jsonwebtoken::EncodingKey,
}

impl Minter {
    fn new(target: &Target) -> anyhow::Result<Self> {
        match target.tokens {
            Tokens::Hs256 => {
                anyhow::ensure!(!target.secret.is_empty(), "--tokens hs256 needs JWT_SECRET");
                Ok(Self {
                    header: jsonwebtoken::Header::default(),
                    key: jsonwebtoken::EncodingKey::from_secret(target.secret.as_bytes()),
                })
            }
            Tokens::Rs256 => {
                let path = target
                    .rsa_key
                    .as_ref()
                    .context("--tokens rs256 needs --rsa-key")?;
                let pem =
                    std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
                header.kid = Some(target.kid.clone());
                Ok(Self {
                    header,
                    key: jsonwebtoken::EncodingKey::from_rsa_pem(&pem)?,
                })
            }
        }
    }

    fn token(&self, sub: &str, admin: bool) -> anyhow::Result<String> {
        Ok(jsonwebtoken::encode(
            &self.header,
            &claims(sub, admin, chrono::Utc::now().timestamp()),
            &self.key,
        )?)
    }
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
            Cmd::Mint { target } => {
                anyhow::ensure!(target.token_file.is_some(), "mint needs --token-file");
                let n = user_tokens(&target)?.len();
                println!("mint: {n} {:?} tokens", target.tokens);
                Ok(())
            }
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

/// A benchmark user's claims at `now` (Unix seconds): valid for an hour.
fn claims(sub: &str, admin: bool, now: i64) -> serde_json::Value {
    let mut claims =
        json!({ "sub": sub, "iat": now, "exp": now + 3600, "email": format!("{sub}@bench.test") });
    if admin {
        claims["role"] = json!("admin");
    }
    claims
}

/// The users' tokens in user order, from `--token-file` when it holds one
/// per user (minted by an earlier run), else minted (and written there).
fn user_tokens(target: &Target) -> anyhow::Result<Vec<String>> {
    if let Some(path) = &target.token_file {
        if let Ok(text) = std::fs::read_to_string(path) {
            let tokens: Vec<String> = text.lines().map(str::to_owned).collect();
            if tokens.len() == target.users {
                return Ok(tokens);
            }
        }
    }
    let minter = Minter::new(target)?;
    let tokens = (0..target.users)
        .map(|i| minter.token(&format!("{}{i}", target.user_prefix), false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(path) = &target.token_file {
        std::fs::write(path, tokens.join("\n") + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(tokens)
}

/// Everything a request needs, computed before the clock starts.
struct Plan {
    scenario: Scenario,
    tokens: Tokens,
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
        let tokens = if scenario == Scenario::Hello {
            vec![String::new(); target.users]
        } else {
            user_tokens(target)?
        };
        let users = tokens
            .into_iter()
            .enumerate()
            .map(|(i, token)| {
                let sub = format!("{}{i}", target.user_prefix);
                let path = match scenario {
                    Scenario::Hello => "/hello".to_owned(),
                    Scenario::Track1 | Scenario::Track100 => "/api/vscode/usage/track".to_owned(),
                    Scenario::Consume => format!("/api/users/{sub}/credits/consume"),
                    Scenario::Analytics => "/api/vscode/analytics?days=30".to_owned(),
                };
                (format!("Bearer {token}"), path)
            })
            .collect();
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
            tokens: target.tokens,
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
        "tokens": format!("{:?}", plan.tokens).to_lowercase(),
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
    let minter = Minter::new(target)?;
    let admin = format!(
        "Bearer {}",
        minter.token(&format!("{}admin", target.user_prefix), true)?
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

#[cfg(test)]
mod tests {
    use super::*;

    fn target(tokens: Tokens) -> Target {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/tests/fixtures");
        Target {
            url: "http://127.0.0.1:1".into(),
            users: 1,
            user_prefix: "u_".into(),
            secret: "s".repeat(32),
            tokens,
            rsa_key: Some(format!("{fixtures}/rsa_a.pem").into()),
            token_file: None,
            kid: "rsa-a".into(),
        }
    }

    #[test]
    fn claims_last_an_hour_and_only_the_admin_has_the_role() {
        let c = claims("u_1", false, 1_000);
        assert_eq!(
            (c["sub"].as_str(), c["exp"].as_i64()),
            (Some("u_1"), Some(4_600))
        );
        assert!(c.get("role").is_none());
        assert_eq!(claims("u_1", true, 0)["role"], "admin");
    }

    #[test]
    fn rs256_tokens_carry_the_kid_and_verify_with_the_public_key() {
        let t = target(Tokens::Rs256);
        let token = Minter::new(&t).unwrap().token("u_1", false).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(
            (header.alg, header.kid.as_deref()),
            (jsonwebtoken::Algorithm::RS256, Some("rsa-a"))
        );
        let pem = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../e2e/tests/fixtures/rsa_a.pub.pem"
        ))
        .unwrap();
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(&pem).unwrap();
        let v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
        assert_eq!(data.claims["sub"], "u_1");
    }

    #[test]
    fn a_token_file_is_written_once_and_then_read() {
        let path = std::env::temp_dir().join(format!("loadgen-tokens-{}", uuid::Uuid::new_v4()));
        let mut t = target(Tokens::Hs256);
        t.users = 3;
        t.token_file = Some(path.clone());
        let minted = user_tokens(&t).unwrap();
        assert_eq!(minted.len(), 3);
        t.secret = "another secret that would sign differently".into();
        assert_eq!(
            user_tokens(&t).unwrap(),
            minted,
            "read back, not minted again"
        );
        t.users = 4;
        assert_ne!(
            user_tokens(&t).unwrap()[..3],
            minted[..],
            "a file of another size is replaced"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn hs256_tokens_have_no_kid_and_need_the_secret() {
        let token = Minter::new(&target(Tokens::Hs256))
            .unwrap()
            .token("u_1", false)
            .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(
            (header.alg, header.kid),
            (jsonwebtoken::Algorithm::HS256, None)
        );
        let mut t = target(Tokens::Hs256);
        t.secret.clear();
        assert!(Minter::new(&t).is_err());
    }
}
