//! Spend-alert configuration and the alerts a user was raised (SPEC §5.11;
//! docs/credits.md "Spend alerts"). The worker decides crossings and delivers
//! webhooks; this module stores what the owner asks for and reads back what
//! was raised. A rare settings route: it writes Postgres directly and reads
//! its own writes.
//!
//! The signing secret (`whsec_` + base64 of 32 bytes, Standard Webhooks) is
//! made when a PUT sets a webhook URL the owner did not have, or when it asks
//! for `rotate_secret`; it is answered by that PUT only. A PUT that keeps the
//! URL keeps the secret (and does not show it). Removing the webhook drops
//! the secret and stops deliveries still pending.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Most thresholds one owner may have.
pub const MAX_THRESHOLDS: usize = 10;
/// Most alerts the status-bar route lists.
pub const MAX_LISTED: i64 = 200;
/// How long the gateway waits for a production webhook host to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// What an alert watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdKind {
    /// The balance went below `value` credits (0..=2^53−1).
    BalanceBelow,
    /// `value` % (1..=100) of the month's allowance (the balance at its start
    /// plus what was granted in it) was spent.
    SpentPct,
}

impl ThresholdKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BalanceBelow => "balance_below",
            Self::SpentPct => "spent_pct",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "balance_below" => Some(Self::BalanceBelow),
            "spent_pct" => Some(Self::SpentPct),
            _ => None,
        }
    }

    /// The values this kind takes.
    fn range(self) -> (i64, i64) {
        match self {
            Self::BalanceBelow => (0, common::settings::MAX_CREDITS),
            Self::SpentPct => (1, 100),
        }
    }
}

/// One threshold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Threshold {
    pub kind: ThresholdKind,
    /// balance_below: credits, 0..=2^53−1; spent_pct: percent, 1..=100.
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub value: i64,
}

/// `PUT /api/users/:id/alerts`: the whole configuration (it replaces the old one).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct AlertsBody {
    /// At most 10, no two alike.
    #[schema(max_items = 10)]
    pub thresholds: Vec<Threshold>,
    /// Where alerts are POSTed; absent or null: no webhook. In production
    /// `https://` and a public address only.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub webhook_url: Option<String>,
    /// Make a new signing secret for the same URL.
    #[serde(default)]
    pub rotate_secret: bool,
}

/// A configuration as stored (the secret only in the answer of the PUT that made it).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AlertConfig {
    pub thresholds: Vec<Threshold>,
    pub webhook_url: Option<String>,
    /// `whsec_` + base64: the HMAC-SHA256 key of `webhook-signature`. Shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// Null before the first PUT.
    #[schema(format = DateTime)]
    pub updated_at: Option<String>,
}

/// One raised alert.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AlertItem {
    pub id: String,
    pub kind: ThresholdKind,
    pub value: i64,
    /// When it was raised.
    #[schema(format = DateTime)]
    pub at: String,
    /// Whether the webhook acknowledged it.
    pub delivered: bool,
}

/// `GET /api/vscode/user/alerts`: the last 30 days, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AlertList {
    pub alerts: Vec<AlertItem>,
}

/// A body that passed every check: thresholds in a stable order, the URL parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub thresholds: Vec<Threshold>,
    pub webhook: Option<reqwest::Url>,
    pub rotate_secret: bool,
}

/// The checks that need no IO (for `production`: `https://`, no internal
/// address literal). Every refusal names its member.
pub fn check(body: AlertsBody, production: bool) -> Result<Checked> {
    if body.thresholds.len() > MAX_THRESHOLDS {
        return Err(Error::validation(
            "thresholds",
            format!("at most {MAX_THRESHOLDS} thresholds"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, t) in body.thresholds.iter().enumerate() {
        let (lo, hi) = t.kind.range();
        if !(lo..=hi).contains(&t.value) {
            return Err(Error::validation(
                format!("thresholds[{i}].value"),
                format!("{} takes {lo}..={hi}", t.kind.as_str()),
            ));
        }
        if !seen.insert((t.kind, t.value)) {
            return Err(Error::validation(
                format!("thresholds[{i}]"),
                "the same threshold twice",
            ));
        }
    }
    let webhook = body
        .webhook_url
        .as_deref()
        .map(|u| common::webhooks::parse_url(u, production))
        .transpose()
        .map_err(|reason| Error::validation("webhook_url", reason))?;
    if body.rotate_secret && webhook.is_none() {
        return Err(Error::validation("rotate_secret", "needs a webhook_url"));
    }
    let mut thresholds = body.thresholds;
    thresholds.sort_by_key(|t| (t.kind.as_str(), t.value));
    Ok(Checked {
        thresholds,
        webhook,
        rotate_secret: body.rotate_secret,
    })
}

/// In production, every address the host resolves to must be public (the
/// worker checks again before each delivery).
pub async fn check_resolution(url: &reqwest::Url) -> Result<()> {
    let refuse = |reason: String| Error::validation("webhook_url", reason);
    let (host, port) =
        common::webhooks::host_and_port(url).ok_or_else(|| refuse("must name a host".into()))?;
    let addrs = tokio::time::timeout(
        RESOLVE_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    .map_err(|_| refuse("the host did not resolve in time".into()))?
    .map_err(|_| refuse("the host does not resolve".into()))?;
    let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
    common::webhooks::check_addresses(&ips).map_err(refuse)
}

/// What happens to the signing secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretPlan {
    /// No webhook: no secret.
    Drop,
    /// The same URL: the stored secret stays (not shown).
    Keep,
    /// A new URL, or a rotation: a new secret, shown once.
    New,
}

pub fn secret_plan(old_url: Option<&str>, new_url: Option<&str>, rotate: bool) -> SecretPlan {
    match (old_url, new_url) {
        (_, None) => SecretPlan::Drop,
        (Some(old), Some(new)) if old == new && !rotate => SecretPlan::Keep,
        _ => SecretPlan::New,
    }
}

/// `whsec_` + base64 of 32 bytes from the OS generator (two v4 UUIDs: 244
/// random bits).
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Whose alerts: a user's, or an organization's pool (SPEC 5.11, "also per organization").
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    /// `user` or `org`, as `alert_configs.owner_kind`.
    pub kind: &'static str,
    pub id: &'a str,
}

impl<'a> Owner<'a> {
    pub fn user(id: &'a str) -> Self {
        Self { kind: "user", id }
    }

    pub fn org(id: &'a str) -> Self {
        Self { kind: "org", id }
    }
}

/// Stores `checked` as the owner's whole configuration, in one transaction:
/// thresholds that stay keep their rows (and so their once-per-period keys),
/// the others go.
/// Audited (`alerts.set`, with the request id): the thresholds and what
/// happened to the webhook, never its URL or secret.
pub async fn put(
    pg: &PgPool,
    by: crate::audit::Action<'_>,
    owner: Owner<'_>,
    checked: &Checked,
) -> Result<AlertConfig> {
    let user = owner.id;
    let mut tx = pg.begin().await?;
    let old: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "select webhook_url, webhook_secret from alert_configs \
         where owner_kind = $2 and owner_id = $1 for update",
    )
    .bind(user)
    .bind(owner.kind)
    .fetch_optional(&mut *tx)
    .await?;
    let (old_url, old_secret) = old.unwrap_or_default();
    let new_url = checked.webhook.as_ref().map(|u| u.as_str().to_string());
    let plan = secret_plan(
        old_url.as_deref(),
        new_url.as_deref(),
        checked.rotate_secret,
    );
    let secret = match plan {
        SecretPlan::Drop => None,
        SecretPlan::Keep => old_secret,
        SecretPlan::New => Some(new_secret()),
    };
    let updated: DateTime<Utc> = sqlx::query_scalar(
        "insert into alert_configs (owner_kind, owner_id, webhook_url, webhook_secret) values ($4, $1, $2, $3) \
         on conflict (owner_kind, owner_id) do update set webhook_url = excluded.webhook_url, \
           webhook_secret = excluded.webhook_secret, updated_at = now() \
         returning updated_at",
    )
    .bind(user)
    .bind(&new_url)
    .bind(&secret)
    .bind(owner.kind)
    .fetch_one(&mut *tx)
    .await?;
    let kinds: Vec<&str> = checked.thresholds.iter().map(|t| t.kind.as_str()).collect();
    let values: Vec<i64> = checked.thresholds.iter().map(|t| t.value).collect();
    sqlx::query(
        "delete from alert_thresholds t where owner_kind = $4 and owner_id = $1 \
           and not exists (select 1 from unnest($2::text[], $3::bigint[]) n(kind, value) \
                           where n.kind = t.kind and n.value = t.value)",
    )
    .bind(user)
    .bind(&kinds)
    .bind(&values)
    .bind(owner.kind)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into alert_thresholds (owner_kind, owner_id, kind, value) \
         select $4, $1, kind, value from unnest($2::text[], $3::bigint[]) n(kind, value) \
         on conflict do nothing",
    )
    .bind(user)
    .bind(&kinds)
    .bind(&values)
    .bind(owner.kind)
    .execute(&mut *tx)
    .await?;
    let webhook = match (old_url.as_deref(), new_url.as_deref()) {
        (None, None) => "none",
        (None, Some(_)) => "set",
        (Some(_), None) => "removed",
        (Some(a), Some(b)) if a == b => "kept",
        (Some(_), Some(_)) => "changed",
    };
    let details = serde_json::json!({
        "thresholds": checked.thresholds,
        "webhook": webhook,
        "new_secret": plan == SecretPlan::New,
    });
    crate::audit::insert(&mut tx, by, &details).await?;
    if plan == SecretPlan::Drop {
        // Nothing left to send them to.
        sqlx::query(
            "update alerts set next_attempt_at = null where owner_kind = $2 and owner_id = $1 \
               and next_attempt_at is not null and delivered_at is null and failed_at is null",
        )
        .bind(user)
        .bind(owner.kind)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(AlertConfig {
        thresholds: checked.thresholds.clone(),
        webhook_url: new_url,
        webhook_secret: if plan == SecretPlan::New {
            secret
        } else {
            None
        },
        updated_at: Some(rfc3339(updated)),
    })
}

/// The owner's configuration without the secret (empty before the first PUT).
pub async fn get(pg: &PgPool, owner: Owner<'_>) -> Result<AlertConfig> {
    let config: Option<(Option<String>, DateTime<Utc>)> = sqlx::query_as(
        "select webhook_url, updated_at from alert_configs where owner_kind = $2 and owner_id = $1",
    )
    .bind(owner.id)
    .bind(owner.kind)
    .fetch_optional(pg)
    .await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select kind, value from alert_thresholds where owner_kind = $2 and owner_id = $1 order by kind, value",
    )
    .bind(owner.id)
    .bind(owner.kind)
    .fetch_all(pg)
    .await?;
    let thresholds = rows
        .into_iter()
        .filter_map(|(k, value)| ThresholdKind::parse(&k).map(|kind| Threshold { kind, value }))
        .collect();
    let (webhook_url, updated_at) = match config {
        Some((url, at)) => (url, Some(rfc3339(at))),
        None => (None, None),
    };
    Ok(AlertConfig {
        thresholds,
        webhook_url,
        webhook_secret: None,
        updated_at,
    })
}

/// The owner's alerts of the last 30 days, newest first (at most [`MAX_LISTED`]).
pub async fn recent(pg: &PgPool, owner: Owner<'_>) -> Result<AlertList> {
    let rows: Vec<(Uuid, String, i64, DateTime<Utc>, bool)> = sqlx::query_as(
        "select id, kind, value, at, delivered_at is not null from alerts \
         where owner_kind = $3 and owner_id = $1 and at > now() - interval '30 days' \
         order by at desc, id desc limit $2",
    )
    .bind(owner.id)
    .bind(MAX_LISTED)
    .bind(owner.kind)
    .fetch_all(pg)
    .await?;
    let alerts = rows
        .into_iter()
        .filter_map(|(id, k, value, at, delivered)| {
            ThresholdKind::parse(&k).map(|kind| AlertItem {
                id: id.to_string(),
                kind,
                value,
                at: rfc3339(at),
                delivered,
            })
        })
        .collect();
    Ok(AlertList { alerts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: serde_json::Value) -> Result<AlertsBody> {
        crate::decode::parse_body(v)
    }

    fn field(r: Result<Checked>) -> String {
        match r {
            Err(Error::Validation { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn checked(v: serde_json::Value, production: bool) -> Result<Checked> {
        check(body(v)?, production)
    }

    #[test]
    fn thresholds_are_bounded_in_number_and_value() {
        let ok = checked(
            json!({"thresholds": [{"kind": "spent_pct", "value": 100}, {"kind": "balance_below", "value": 0},
                                  {"kind": "balance_below", "value": 9007199254740991_i64}]}),
            false,
        )
        .unwrap();
        assert_eq!(
            ok.thresholds[0],
            Threshold {
                kind: ThresholdKind::BalanceBelow,
                value: 0
            }
        );
        assert!(ok.webhook.is_none());
        for (v, f) in [
            (
                json!({"thresholds": [{"kind": "spent_pct", "value": 0}]}),
                "thresholds[0].value",
            ),
            (
                json!({"thresholds": [{"kind": "spent_pct", "value": 101}]}),
                "thresholds[0].value",
            ),
            (
                json!({"thresholds": [{"kind": "balance_below", "value": -1}]}),
                "thresholds[0].value",
            ),
            (
                json!({"thresholds": [{"kind": "balance_below", "value": 9007199254740992_i64}]}),
                "thresholds[0].value",
            ),
            (
                json!({"thresholds": [{"kind": "spent_pct", "value": 5}, {"kind": "spent_pct", "value": 5}]}),
                "thresholds[1]",
            ),
            (
                json!({"thresholds": [], "rotate_secret": true}),
                "rotate_secret",
            ),
            (
                json!({"thresholds": [], "webhook_url": "ftp://example.com/"}),
                "webhook_url",
            ),
            (
                json!({"thresholds": [], "webhook_url": "http://exa\u{0}mple.com/"}),
                "webhook_url",
            ),
        ] {
            assert_eq!(field(checked(v.clone(), false)), f, "{v}");
        }
        let eleven: Vec<_> = (1..=11)
            .map(|v| json!({"kind": "spent_pct", "value": v}))
            .collect();
        assert_eq!(
            field(checked(json!({ "thresholds": eleven }), false)),
            "thresholds"
        );
    }

    #[test]
    fn kinds_and_values_of_the_wrong_type_are_refused_naming_the_member() {
        for (v, f) in [
            (
                json!({"thresholds": [{"kind": "balance", "value": 5}]}),
                "thresholds[0].kind",
            ),
            (
                json!({"thresholds": [{"kind": "spent_pct", "value": 1.5}]}),
                "thresholds[0].value",
            ),
            (
                json!({"thresholds": [{"kind": "spent_pct", "value": 1e30}]}),
                "thresholds[0].value",
            ),
            (
                json!({"thresholds": [{"kind": "spent_pct"}]}),
                "thresholds[0].value",
            ),
            (json!({}), "thresholds"),
        ] {
            match body(v.clone()) {
                Err(Error::Validation { field, .. }) => assert_eq!(field, f, "{v}"),
                other => panic!("{v}: {other:?}"),
            }
        }
    }

    #[test]
    fn production_requires_https_and_refuses_internal_address_literals() {
        let url = |u: &str| json!({"thresholds": [], "webhook_url": u});
        assert!(checked(url("https://hooks.example.com/a"), true).is_ok());
        assert!(checked(url("http://127.0.0.1:9/a"), false).is_ok());
        for bad in [
            "http://hooks.example.com/a",
            "https://10.0.0.1/a",
            "https://169.254.169.254/",
            "https://[::1]/a",
        ] {
            assert_eq!(field(checked(url(bad), true)), "webhook_url", "{bad}");
        }
    }

    #[test]
    fn a_new_url_or_a_rotation_makes_a_secret_and_the_same_url_keeps_it() {
        use SecretPlan::*;
        assert_eq!(secret_plan(None, Some("https://a/"), false), New);
        assert_eq!(
            secret_plan(Some("https://a/"), Some("https://b/"), false),
            New
        );
        assert_eq!(
            secret_plan(Some("https://a/"), Some("https://a/"), false),
            Keep
        );
        assert_eq!(
            secret_plan(Some("https://a/"), Some("https://a/"), true),
            New
        );
        assert_eq!(secret_plan(Some("https://a/"), None, false), Drop);
    }

    #[test]
    fn secrets_are_whsec_and_base64_of_32_bytes_and_differ() {
        let a = new_secret();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.strip_prefix("whsec_").unwrap())
            .unwrap();
        assert_eq!(raw.len(), 32);
        assert_ne!(a, new_secret());
    }
}
