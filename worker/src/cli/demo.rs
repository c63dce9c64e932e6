//! Demo data through the same path as real traffic: HTTP calls to a running
//! gateway with dev tokens (sessions, usage over several days, credit grants
//! and spends), so analytics and stats have something to show and benchmarks
//! start from a warm database.
//!
//! Usage events go through `usage/track`, which accepts `occurred_at` up to 30
//! days back; `--days` is therefore capped at 30.

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};

const MODELS: [(&str, &str); 6] = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-3-5-sonnet"),
    ("anthropic", "claude-3-haiku"),
    ("google", "gemini-1.5-pro"),
    ("mistral", "codestral"),
];
const FEATURES: [&str; 5] = [
    "chat",
    "inline_completion",
    "code_review",
    "explain",
    "refactor",
];

#[derive(Debug, Clone)]
pub struct DemoPlan {
    pub gateway: String,
    pub users: usize,
    pub days: u32,
    pub events_per_day: usize,
    pub user_prefix: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DemoReport {
    pub users: usize,
    pub events: usize,
    pub consumes: usize,
    pub grants: usize,
}

/// A tiny deterministic generator so runs are reproducible.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() as usize) % items.len()]
    }
}

pub async fn load(plan: &DemoPlan) -> anyhow::Result<DemoReport> {
    let days = plan.days.clamp(1, 30);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = plan.gateway.trim_end_matches('/');
    let admin = "Bearer dev:demo_admin:admin";
    let mut report = DemoReport::default();
    let mut rng = Lcg(42);
    for u in 0..plan.users {
        let user = format!("{}{u}", plan.user_prefix);
        let auth = format!("Bearer dev:{user}");
        let mut sessions = Vec::new();
        for s in 0..3 {
            let platform = ["linux", "darwin", "win32"][s % 3];
            let r: Value = call(&http, &format!("{base}/api/vscode/session/validate"), &auth, &json!({
                "extension_version": "1.8.0", "platform": platform, "machine_id": format!("machine-{user}-{s}")
            }))
            .await?;
            sessions.push(r["session_id"].as_str().unwrap_or_default().to_string());
        }
        call(
            &http,
            &format!("{base}/api/admin/users/{user}/credits/grant"),
            admin,
            &json!({"amount": 5000, "reason": "demo grant"}),
        )
        .await?;
        report.grants += 1;
        let now = Utc::now();
        let mut events = Vec::new();
        for d in 0..days {
            for _ in 0..plan.events_per_day {
                // Keep a minute's margin inside the 30-day acceptance window.
                let at = now - chrono::Duration::days(d as i64)
                    + chrono::Duration::minutes(-1 - (rng.next() % 600) as i64);
                let session = sessions[(rng.next() as usize) % sessions.len()].clone();
                let ev = if rng.next().is_multiple_of(3) {
                    json!({"kind": "feature", "feature": rng.pick(&FEATURES), "action": "invoke",
                           "duration_ms": rng.next() % 5000, "session_id": session, "occurred_at": at.to_rfc3339()})
                } else {
                    let (provider, model) = rng.pick(&MODELS);
                    json!({"kind": "model", "provider": provider, "model": model,
                           "prompt_tokens": 100 + rng.next() % 4000, "completion_tokens": 20 + rng.next() % 1000,
                           "latency_ms": 200 + rng.next() % 3000, "success": true,
                           "session_id": session, "occurred_at": at.to_rfc3339()})
                };
                events.push(ev);
            }
        }
        for chunk in events.chunks(500) {
            call(
                &http,
                &format!("{base}/api/vscode/usage/track"),
                &auth,
                &json!({"events": chunk}),
            )
            .await?;
            report.events += chunk.len();
        }
        for _ in 0..(days as usize).min(20) {
            let (provider, model) = rng.pick(&MODELS);
            call(&http, &format!("{base}/api/users/{user}/credits/consume"), &auth, &json!({
                "amount": 1 + rng.next() % 25, "model": model, "provider": provider, "session_id": sessions[0], "description": "demo spend"
            }))
            .await?;
            report.consumes += 1;
        }
        report.users += 1;
    }
    Ok(report)
}

async fn call(
    http: &reqwest::Client,
    url: &str,
    auth: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    for attempt in 0..20 {
        let r = http
            .post(url)
            .header("authorization", auth)
            .json(body)
            .send()
            .await?;
        let status = r.status();
        if status.is_success() {
            return Ok(r.json().await.unwrap_or(Value::Null));
        }
        // Rate limits and brief unavailability: wait as told and retry.
        if status == 429 || status == 503 {
            let wait = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .min(5);
            tokio::time::sleep(Duration::from_millis(200 + wait * 100 * attempt)).await;
            continue;
        }
        let text = r.text().await.unwrap_or_default();
        anyhow::bail!("{url}: {status}: {text}");
    }
    anyhow::bail!("{url}: still refused after retries")
}
