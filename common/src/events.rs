//! The event envelope and the event types that travel from gateways to workers
//! (docs/events.md). One envelope per broker message; usage events of concurrent
//! requests travel grouped in one `usage.batch` message, each with its own id,
//! and so do their credit consumes (`credit.consume_batch`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub const ENVELOPE_VERSION: u32 = 1;

/// What every broker message carries. `message_id` on the AMQP properties is `id`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    pub id: Uuid,
    #[serde(flatten)]
    pub event: Event,
    pub version: u32,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The `X-Request-Id` of the request that published it (SPEC §5); none
    /// for a grouped message (each consume carries its own, in its context)
    /// and for what no request caused (expiries, reconciliation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Typed payloads; `type` names the variant and is also the routing key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", content = "data")]
pub enum Event {
    #[serde(rename = "usage.batch")]
    UsageBatch(UsageBatch),
    #[serde(rename = "session.upsert")]
    SessionUpsert(SessionUpsert),
    #[serde(rename = "credit.consume")]
    CreditConsume(CreditConsume),
    #[serde(rename = "credit.consume_batch")]
    CreditConsumeBatch(CreditConsumeBatch),
    #[serde(rename = "credit.hold_opened")]
    HoldOpened(HoldOpened),
    #[serde(rename = "credit.hold_settled")]
    HoldSettled(HoldSettled),
    #[serde(rename = "credit.hold_released")]
    HoldReleased(HoldReleased),
    #[serde(rename = "user.preferences")]
    UserPreferences(UserPreferences),
    #[serde(rename = "user.activity")]
    UserActivity(UserActivity),
}

impl Event {
    /// Routing key on the topic exchange; also the envelope's `type`.
    pub fn routing_key(&self) -> &'static str {
        match self {
            Event::UsageBatch(_) => "usage.batch",
            Event::SessionUpsert(_) => "session.upsert",
            Event::CreditConsume(_) => "credit.consume",
            Event::CreditConsumeBatch(_) => "credit.consume_batch",
            Event::HoldOpened(_) => "credit.hold_opened",
            Event::HoldSettled(_) => "credit.hold_settled",
            Event::HoldReleased(_) => "credit.hold_released",
            Event::UserPreferences(_) => "user.preferences",
            Event::UserActivity(_) => "user.activity",
        }
    }
}

impl Envelope {
    pub fn new(event: Event, user_id: Option<String>, occurred_at: DateTime<Utc>) -> Self {
        Self {
            id: Uuid::new_v4(),
            event,
            version: ENVELOPE_VERSION,
            occurred_at,
            received_at: Utc::now(),
            user_id,
            request_id: None,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }

    /// Decodes a message body; an error means the message is poison.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let env: Envelope = serde_json::from_slice(bytes).map_err(DecodeError::Json)?;
        if env.version != ENVELOPE_VERSION {
            return Err(DecodeError::Version(env.version));
        }
        Ok(env)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable envelope: {0}")]
    Json(serde_json::Error),
    #[error("unsupported envelope version {0}")]
    Version(u32),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageBatch {
    pub events: Vec<UsageEvent>,
}

/// One tracked usage event, already validated by the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageEvent {
    pub id: Uuid,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(flatten)]
    pub detail: UsageDetail,
    /// What a model event would cost by the price book, priced by the gateway
    /// when it accepted it (docs/credits.md "Price book"); none for a feature
    /// event or a provider without a price. Never the client's own figure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum UsageDetail {
    Model {
        provider: String,
        model: String,
        prompt_tokens: i64,
        completion_tokens: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency_ms: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        success: Option<bool>,
    },
    Feature {
        feature: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        action: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<i64>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionUpsert {
    pub session_id: String,
    pub user_id: String,
    pub extension_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vscode_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Details of what a credit movement paid for; all optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CreditContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<i64>,
    /// The price book entry and token counts the amount was computed from (the
    /// receipt); none for an explicit amount. Stored in the ledger row's `price`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// The `X-Request-Id` of the request that moved the credits: set by the
    /// gateway's publisher, kept by the worker in the ledger row's metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The organization whose pool pays, when the user spends as its member
    /// (docs/credits.md "Organizations"): the ledger row carries it, and the
    /// pool's balance moves instead of the user's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
}

/// A charge's receipt (docs/credits.md "Price book"): the entry it was priced
/// by (`model` is `*` when the provider's default matched) and the tokens.
/// Amount = ⌈(prompt·p + completion·c + cached·k) / 10^6⌉, at least 1 when any
/// token was counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Price {
    pub provider: String,
    pub model: String,
    pub prompt_per_mtok: i64,
    pub completion_per_mtok: i64,
    pub cached_per_mtok: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
}

/// A consume the gateway already granted (reserved in Redis); the worker settles
/// it into the ledger. `transaction_id` is the ledger row's id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreditConsume {
    pub transaction_id: Uuid,
    pub user_id: String,
    pub amount: i64,
    #[serde(flatten)]
    pub context: CreditContext,
}

/// A keyed request's 200 answer, made durable by the worker in the same
/// transaction as the movement it answers for, and restored into Redis when
/// the gateway loads the user (so a retry after a Redis loss replays).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdempotencyRecord {
    /// `consume` or `holds`: keys are scoped per user and route.
    pub route: String,
    pub key: String,
    /// SHA-256 of the canonical body ("the same body").
    pub body_hash: String,
    /// The 200 body as answered.
    pub answer: Value,
    /// When the record stops replaying (the gateway's answer TTL).
    pub expires_at: DateTime<Utc>,
}

/// Consumes of concurrent requests (any users), grouped into one message as
/// usage events are; each keeps the id and time it would have had as a
/// message of its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreditConsumeBatch {
    pub consumes: Vec<BatchedConsume>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchedConsume {
    /// The event's own id (the audit row's `request_id`).
    pub id: Uuid,
    pub occurred_at: DateTime<Utc>,
    #[serde(flatten)]
    pub consume: CreditConsume,
    /// The request's idempotency record, when it had a key: the worker keeps
    /// it beside the ledger row (docs/credits.md, "Idempotency").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<IdempotencyRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HoldOpened {
    pub hold_id: Uuid,
    pub user_id: String,
    pub amount: i64,
    pub expires_at: DateTime<Utc>,
    #[serde(flatten)]
    pub context: CreditContext,
    /// The open's idempotency record, when it had a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<IdempotencyRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HoldSettled {
    pub hold_id: Uuid,
    pub transaction_id: Uuid,
    pub user_id: String,
    /// The hold's full amount (lets the worker create the hold row if the
    /// settle arrives before the open).
    pub held: i64,
    pub amount: i64,
    #[serde(flatten)]
    pub context: CreditContext,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HoldReleased {
    pub hold_id: Uuid,
    pub user_id: String,
    pub held: i64,
    /// `released` (DELETE) or `expired` (nobody settled it in time).
    pub reason: String,
    /// The organization whose pool held it (docs/credits.md "Organizations").
    /// A hold a gateway found expired on a pool names the pool's account
    /// (`org:ORG_ID`) as `user_id`, not knowing the member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserPreferences {
    pub user_id: String,
    /// Merged into the stored preferences (a JSON object).
    pub patch: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserActivity {
    pub user_id: String,
    pub at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_with_type_and_data_members() {
        let env = Envelope::new(
            Event::UsageBatch(UsageBatch {
                events: vec![UsageEvent {
                    id: Uuid::new_v4(),
                    user_id: "user_1".into(),
                    session_id: None,
                    occurred_at: Utc::now(),
                    received_at: Utc::now(),
                    metadata: None,
                    detail: UsageDetail::Feature {
                        feature: "chat".into(),
                        action: None,
                        duration_ms: Some(3),
                    },
                    credits: None,
                }],
            }),
            None,
            Utc::now(),
        );
        let bytes = env.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], "usage.batch");
        assert_eq!(v["version"], 1);
        assert_eq!(v["data"]["events"][0]["kind"], "feature");
        assert_eq!(Envelope::from_bytes(&bytes).unwrap(), env);
    }

    #[test]
    fn consumes_and_holds_without_an_idempotency_record_still_decode() {
        let old = br#"{"id":"7f1c1f3a-0000-4000-8000-000000000001","type":"credit.hold_opened","version":1,
            "occurred_at":"2024-01-01T00:00:00Z","received_at":"2024-01-01T00:00:00Z",
            "data":{"hold_id":"7f1c1f3a-0000-4000-8000-000000000002","user_id":"u","amount":5,
                    "expires_at":"2024-01-01T00:05:00Z"}}"#;
        let env = Envelope::from_bytes(old).unwrap();
        let Event::HoldOpened(h) = &env.event else {
            panic!("{env:?}")
        };
        assert_eq!(h.idempotency, None);
        let v: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        assert!(v["data"].get("idempotency").is_none(), "absent, not null");
        let batch: CreditConsumeBatch = serde_json::from_value(serde_json::json!({"consumes": [{
            "id": "7f1c1f3a-0000-4000-8000-000000000003", "occurred_at": "2024-01-01T00:00:00Z",
            "transaction_id": "7f1c1f3a-0000-4000-8000-000000000004", "user_id": "u", "amount": 2}]}))
        .unwrap();
        assert_eq!(batch.consumes[0].idempotency, None);
    }

    #[test]
    fn a_receipt_travels_with_its_charge_and_messages_without_one_still_decode() {
        let old: CreditConsume = serde_json::from_value(serde_json::json!({
            "transaction_id": "7f1c1f3a-0000-4000-8000-000000000004", "user_id": "u", "amount": 2}))
        .unwrap();
        assert_eq!(
            (old.context.price.as_ref(), old.context.cached_tokens),
            (None, None)
        );
        let v = serde_json::to_value(&old).unwrap();
        assert!(
            v.get("price").is_none() && v.get("cached_tokens").is_none(),
            "absent, not null: {v}"
        );
        let mut priced = old.clone();
        priced.context.price = Some(Price {
            provider: "openai".into(),
            model: "*".into(),
            prompt_per_mtok: 3,
            prompt_tokens: 7,
            ..Default::default()
        });
        let v = serde_json::to_value(&priced).unwrap();
        assert_eq!(v["price"]["model"], "*");
        assert_eq!(serde_json::from_value::<CreditConsume>(v).unwrap(), priced);
        let ev: UsageEvent = serde_json::from_value(serde_json::json!({
            "id": "7f1c1f3a-0000-4000-8000-000000000005", "user_id": "u",
            "occurred_at": "2024-01-01T00:00:00Z", "received_at": "2024-01-01T00:00:00Z",
            "kind": "feature", "feature": "chat"}))
        .unwrap();
        assert_eq!(ev.credits, None);
    }

    #[test]
    fn garbage_and_unknown_versions_are_poison() {
        assert!(Envelope::from_bytes(b"not json").is_err());
        assert!(Envelope::from_bytes(br#"{"id":"x","type":"nope"}"#).is_err());
        let mut v: Value = serde_json::from_slice(
            &Envelope::new(
                Event::UserActivity(UserActivity {
                    user_id: "u".into(),
                    at: Utc::now(),
                }),
                Some("u".into()),
                Utc::now(),
            )
            .to_bytes(),
        )
        .unwrap();
        v["version"] = 2.into();
        assert!(matches!(
            Envelope::from_bytes(&serde_json::to_vec(&v).unwrap()),
            Err(DecodeError::Version(2))
        ));
    }

    #[test]
    fn the_request_id_travels_when_set_and_old_messages_without_it_still_decode() {
        let mut env = Envelope::new(
            Event::UserActivity(UserActivity {
                user_id: "u".into(),
                at: Utc::now(),
            }),
            Some("u".into()),
            Utc::now(),
        );
        let v: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        assert!(v.get("request_id").is_none(), "absent, not null");
        env.request_id = Some("req-1".into());
        let v: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(Envelope::from_bytes(&env.to_bytes()).unwrap(), env);
        let old = br#"{"id":"7f1c1f3a-0000-4000-8000-000000000001","type":"credit.consume_batch","version":1,
            "occurred_at":"2024-01-01T00:00:00Z","received_at":"2024-01-01T00:00:00Z",
            "data":{"consumes":[{"id":"7f1c1f3a-0000-4000-8000-000000000003","occurred_at":"2024-01-01T00:00:00Z",
                    "transaction_id":"7f1c1f3a-0000-4000-8000-000000000004","user_id":"u","amount":2}]}}"#;
        let env = Envelope::from_bytes(old).unwrap();
        assert_eq!(env.request_id, None);
        let Event::CreditConsumeBatch(b) = &env.event else {
            panic!("{env:?}")
        };
        assert_eq!(b.consumes[0].consume.context.request_id, None);
        let mut c = b.consumes[0].clone();
        c.consume.context.request_id = Some("req-2".into());
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["request_id"], "req-2", "flattened into the consume: {v}");
    }
}
