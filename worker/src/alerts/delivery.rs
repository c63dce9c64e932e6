//! Webhook delivery of recorded alerts (docs/credits.md "Spend alerts"), by
//! one worker at a time (advisory lock, see `jobs`), every
//! `alerts.poll_interval_ms`.
//!
//! Standard Webhooks: `webhook-id` is the alert's id (the same on every
//! attempt, so a receiver can drop a repeat), `webhook-timestamp` the
//! attempt's unix seconds, `webhook-signature` `v1,` + base64 of
//! HMAC-SHA256 over `{id}.{timestamp}.{body}` with the secret's bytes (the
//! base64 after `whsec_`). A 2xx acknowledges: `delivered_at` is set and the
//! alert is never sent again. Anything else (another status, a timeout, a
//! refused address) is retried after `backoff_base_ms · 2^(attempts−1)`,
//! capped at `backoff_max_ms`; after `max_attempts` the alert is marked
//! `failed_at` and left alone. Redirects are not followed (they could lead
//! anywhere). In production the host is resolved here, every address checked
//! (`common::webhooks`), and the request pinned to a checked address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use common::settings::{AlertSettings, AppEnv};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use uuid::Uuid;

use crate::ctx::Ctx;

/// Deliveries attempted per pass, and at once.
const BATCH: i64 = 100;
const PARALLEL: usize = 8;

/// `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")), or
/// `None` for a secret that is not `whsec_` + base64.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Option<String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_")?)
        .ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Some(format!("v1,{sig}"))
}

/// The delay before the attempt after `attempts` failed ones, or `None`
/// when they are used up.
pub fn next_delay(attempts: u32, s: &AlertSettings) -> Option<Duration> {
    if attempts >= s.max_attempts.max(1) {
        return None;
    }
    let exp = attempts.saturating_sub(1).min(40);
    let ms = s
        .backoff_base_ms
        .saturating_mul(1u64 << exp)
        .min(s.backoff_max_ms.max(1));
    Some(Duration::from_millis(ms))
}

/// One due alert with its owner's webhook.
#[derive(Debug, sqlx::FromRow)]
struct Due {
    id: Uuid,
    /// `user` or `org` (an organization's pool).
    owner_kind: String,
    owner_id: String,
    kind: String,
    value: i64,
    crossing: String,
    balance: i64,
    spent: Option<i64>,
    allowance: Option<i64>,
    transaction_id: Option<Uuid>,
    at: DateTime<Utc>,
    attempts: i32,
    webhook_url: String,
    webhook_secret: String,
}

/// The JSON body of an alert's webhook (the same on every attempt).
fn body(d: &Due) -> String {
    let mut data = json!({
        "alert_id": d.id,
        "kind": d.kind,
        "value": d.value,
        "balance": d.balance,
        "transaction_id": d.transaction_id,
    });
    // An organization's alert names the organization (its pool's balance).
    let owner = if d.owner_kind == "org" {
        "org_id"
    } else {
        "user_id"
    };
    data[owner] = json!(d.owner_id);
    if d.kind == "spent_pct" {
        data["period"] = json!(d.crossing);
        data["spent"] = json!(d.spent);
        data["allowance"] = json!(d.allowance);
    }
    json!({
        "type": "credits.alert",
        "timestamp": d.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": data,
    })
    .to_string()
}

/// One pass: attempts every due alert (at most [`BATCH`]); returns how many
/// were acknowledged.
pub async fn deliver_due(ctx: &Ctx) -> anyhow::Result<usize> {
    let due: Vec<Due> = sqlx::query_as(
        "select a.id, a.owner_kind, a.owner_id, a.kind, a.value, a.crossing, a.balance, a.spent, a.allowance, a.transaction_id, \
                a.at, a.attempts, c.webhook_url, c.webhook_secret \
         from alerts a \
         join alert_configs c on c.owner_kind = a.owner_kind and c.owner_id = a.owner_id \
         where a.next_attempt_at <= now() and a.delivered_at is null and a.failed_at is null \
           and c.webhook_url is not null and c.webhook_secret is not null \
         order by a.next_attempt_at limit $1",
    )
    .bind(BATCH)
    .fetch_all(&ctx.pg)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let production = ctx.settings.app_env == AppEnv::Production;
    let timeout = Duration::from_millis(ctx.settings.alerts.timeout_ms.max(1));
    let results: Vec<(Uuid, i32, Result<(), String>)> = futures_util::stream::iter(due)
        .map(|d| async move {
            let r = attempt(&d, production, timeout).await;
            (d.id, d.attempts, r)
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut delivered = 0;
    for (id, attempts, result) in results {
        let attempts = attempts.saturating_add(1);
        match result {
            Ok(()) => {
                delivered += 1;
                metrics::counter!("alert_webhooks_total", "outcome" => "delivered").increment(1);
                sqlx::query(
                    "update alerts set attempts = $2, delivered_at = now(), next_attempt_at = null, last_error = null \
                     where id = $1 and delivered_at is null",
                )
                .bind(id)
                .bind(attempts)
                .execute(&ctx.pg)
                .await?;
            }
            Err(e) => {
                let delay = next_delay(attempts.max(0) as u32, &ctx.settings.alerts);
                let outcome = if delay.is_some() { "retry" } else { "failed" };
                metrics::counter!("alert_webhooks_total", "outcome" => outcome).increment(1);
                tracing::info!(alert_id = %id, attempts, error = %e, outcome, "webhook delivery failed");
                let error: String = e.chars().filter(|c| !c.is_control()).take(500).collect();
                sqlx::query(
                    "update alerts set attempts = $2, last_error = $3, \
                       next_attempt_at = case when $4::bigint is null then null else now() + make_interval(secs => $4::bigint / 1000.0) end, \
                       failed_at = case when $4::bigint is null then now() end \
                     where id = $1 and delivered_at is null",
                )
                .bind(id)
                .bind(attempts)
                .bind(error)
                .bind(delay.map(|d| d.as_millis() as i64))
                .execute(&ctx.pg)
                .await?;
            }
        }
    }
    Ok(delivered)
}

/// One signed POST; `Ok` on a 2xx.
async fn attempt(d: &Due, production: bool, timeout: Duration) -> Result<(), String> {
    let url = common::webhooks::parse_url(&d.webhook_url, production)?;
    let (host, port) = common::webhooks::host_and_port(&url).ok_or("the URL names no host")?;
    let mut client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if production {
        let addr = resolve_checked(&host, port, timeout).await?;
        // Only the checked address is dialled, whatever DNS answers next.
        if host.parse::<IpAddr>().is_err() {
            client = client.resolve(&host, addr);
        }
    }
    let client = client.build().map_err(|e| format!("client: {e}"))?;
    let body = body(d);
    let id = d.id.to_string();
    let ts = Utc::now().timestamp();
    let signature =
        sign(&d.webhook_secret, &id, ts, &body).ok_or("the stored secret is malformed")?;
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", status.as_u16()))
    }
}

/// Resolves `host`, refuses the lot if any address is internal, and returns
/// the first.
async fn resolve_checked(host: &str, port: u16, timeout: Duration) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| "name resolution timed out".to_string())?
            .map_err(|e| format!("name resolution failed: {e}"))?
            .collect();
    let ips: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
    common::webhooks::check_addresses(&ips)?;
    Ok(addrs[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AlertSettings {
        AlertSettings {
            poll_interval_ms: 1000,
            timeout_ms: 5000,
            max_attempts: 5,
            backoff_base_ms: 1000,
            backoff_max_ms: 5000,
        }
    }

    #[test]
    fn the_delay_doubles_from_the_base_up_to_the_cap_and_ends_after_the_last_attempt() {
        let s = settings();
        let d = |n| next_delay(n, &s).map(|d| d.as_millis());
        assert_eq!(
            [d(1), d(2), d(3), d(4)],
            [Some(1000), Some(2000), Some(4000), Some(5000)]
        );
        assert_eq!(d(5), None);
        let big = AlertSettings {
            max_attempts: u32::MAX,
            ..s
        };
        assert_eq!(next_delay(1000, &big), Some(Duration::from_millis(5000)));
    }

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The example of the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(secret, id, 1614265330, body).as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert_eq!(sign("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", id, 1, body), None);
        assert_eq!(sign("whsec_!!!", id, 1, body), None);
    }

    #[test]
    fn the_body_carries_the_type_the_event_time_and_the_alert() {
        let mut d = Due {
            id: Uuid::from_u128(7),
            owner_kind: "user".into(),
            owner_id: "user_1".into(),
            kind: "spent_pct".into(),
            value: 80,
            crossing: "2026-12".into(),
            balance: 20,
            spent: Some(80),
            allowance: Some(100),
            transaction_id: None,
            at: "2026-12-03T12:00:00Z".parse().unwrap(),
            attempts: 0,
            webhook_url: String::new(),
            webhook_secret: String::new(),
        };
        let v: serde_json::Value = serde_json::from_str(&body(&d)).unwrap();
        assert_eq!(v["type"], "credits.alert");
        assert_eq!(v["timestamp"], "2026-12-03T12:00:00.000Z");
        assert_eq!(v["data"]["period"], "2026-12");
        assert_eq!(v["data"]["allowance"], 100);
        assert_eq!(v["data"]["user_id"], "user_1");
        d.owner_kind = "org".into();
        d.owner_id = "acme".into();
        let v: serde_json::Value = serde_json::from_str(&body(&d)).unwrap();
        assert_eq!(
            (&v["data"]["org_id"], v["data"].get("user_id")),
            (&serde_json::json!("acme"), None)
        );
    }
}
