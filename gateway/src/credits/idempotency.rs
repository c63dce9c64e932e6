//! Idempotency: the `Idempotency-Key` rules, the body's canonical hash, the
//! ids derived from a key, the answers remembered under it and the record
//! names and lifetimes the scripts use (docs/credits.md, "Idempotency").

use chrono::Utc;
use common::events::IdempotencyRecord;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::store::CreditStore;
use crate::error::{Error, Result};

/// Namespace for deterministic ids (starting grants, admin grants by key, settles).
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_9a54_3b2e_4d8a_9c1f_5e7a_2b3c_4d5e);

/// The `Idempotency-Key` header's bytes (the handler reads the header):
/// absent, or 1..=255 visible characters.
pub fn idempotency_key(header: Option<&[u8]>) -> Result<Option<String>> {
    let Some(v) = header else {
        return Ok(None);
    };
    let s = std::str::from_utf8(v)
        .map_err(|_| Error::validation("Idempotency-Key", "must be visible ASCII"))?;
    idempotency_key_value("Idempotency-Key", s).map(Some)
}

/// An idempotency key from any source (the header, the operator's
/// `--idempotency-key`): 1..=255 visible ASCII characters, 422 naming `field`.
pub fn idempotency_key_value(field: &str, s: &str) -> Result<String> {
    if !s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        return Err(Error::validation(field, "must be visible ASCII"));
    }
    if s.is_empty() || s.len() > 255 {
        return Err(Error::validation(field, "must be 1 to 255 characters"));
    }
    Ok(s.to_string())
}

/// JSON text with every object's keys sorted, so equal parsed bodies give
/// equal text whatever their key order or spacing.
pub fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// What "the same body" compares: SHA-256 of the canonical JSON, in hex.
pub fn body_hash(v: &Value) -> String {
    Sha256::digest(canonical_json(v).as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An admin grant's id: derived from user and idempotency key when there is
/// one (the grant route deduplicates in Postgres by it), random otherwise.
/// Consumes and holds never derive their ids from the key: a key reused
/// after its record expired would collide with the first movement in the
/// ledger and be answered 200 for free. They take a fresh UUIDv7, recorded in
/// the idempotency record while the request runs (docs/credits.md).
pub fn derived_id(kind: &str, user_id: &str, key: Option<&str>) -> Uuid {
    match key {
        Some(k) => Uuid::new_v5(&ID_NAMESPACE, format!("{kind}:{user_id}:{k}").as_bytes()),
        None => Uuid::new_v4(),
    }
}

/// A settle's transaction id: one per hold, so settling twice can never
/// write two ledger rows.
pub fn settle_id(hold_id: Uuid) -> Uuid {
    Uuid::new_v5(&ID_NAMESPACE, format!("settle:{hold_id}").as_bytes())
}

/// An answer remembered under an idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub enum Remembered {
    Ok(Value),
    /// A refused reservation; `limit` as in `Error::InsufficientCredits`.
    Insufficient {
        balance: i64,
        required: i64,
        limit: Option<&'static str>,
    },
}

/// The `limit` of a member's 402 as the scripts write it.
fn limit_named(name: &str) -> Option<&'static str> {
    match name {
        "pool" => Some("pool"),
        "member_cap" => Some("member_cap"),
        _ => None,
    }
}

impl Remembered {
    pub fn to_json(&self) -> String {
        match self {
            Self::Ok(body) => json!({"status": 200, "body": body}).to_string(),
            Self::Insufficient {
                balance,
                required,
                limit: None,
            } => json!({"status": 402, "balance": balance, "required": required}).to_string(),
            Self::Insufficient {
                balance,
                required,
                limit: Some(limit),
            } => json!({"status": 402, "balance": balance, "required": required, "limit": limit})
                .to_string(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(s).ok()?;
        match v.get("status")?.as_i64()? {
            200 => Some(Self::Ok(v.get("body")?.clone())),
            402 => Some(Self::Insufficient {
                balance: v.get("balance")?.as_i64()?,
                required: v.get("required")?.as_i64()?,
                limit: v.get("limit").and_then(Value::as_str).and_then(limit_named),
            }),
            _ => None,
        }
    }
}

/// How a hold ended, as remembered in `hold_end:ID`.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldEnd {
    /// Settled: the first settle's answer.
    Settled(Value),
    Released,
    Expired,
}

impl HoldEnd {
    pub fn parse(s: &str) -> Option<Self> {
        let mut v: Value = serde_json::from_str(s).ok()?;
        let obj = v.as_object_mut()?;
        match obj.remove("state")?.as_str()? {
            "settled" => Some(Self::Settled(v)),
            "released" => Some(Self::Released),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// What a request got: a fresh answer, or one remembered from its first run.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Fresh(Value),
    Replayed(Remembered),
}

/// An idempotency key of one request, with its route, body hash and record key.
#[derive(Debug, Clone)]
pub struct Idem {
    pub route: String,
    pub key: String,
    pub hash: String,
    pub(super) record: String,
}

impl Idem {
    pub fn new(store: &CreditStore, user_id: &str, route: &str, key: String, body: &Value) -> Self {
        Self {
            record: store.keys.idempotency(user_id, route, &key),
            route: route.to_string(),
            hash: body_hash(body),
            key,
        }
    }

    /// The durable form of this request's 200 answer, carried by its event.
    pub(super) fn durable(&self, store: &CreditStore, answer: &Value) -> IdempotencyRecord {
        let ttl = i64::try_from(store.limits.idempotency_ttl_secs).unwrap_or(i64::MAX);
        IdempotencyRecord {
            route: self.route.clone(),
            key: self.key.clone(),
            body_hash: self.hash.clone(),
            answer: answer.clone(),
            expires_at: Utc::now() + chrono::Duration::seconds(ttl.min(100 * 365 * 86_400)),
        }
    }
}

pub(super) fn ttl_ms(store: &CreditStore) -> u64 {
    store.limits.idempotency_ttl_secs * 1000
}

/// How long a remembered 402 lives (it moved no money).
pub(super) fn refused_ttl_ms(store: &CreditStore) -> u64 {
    store.limits.insufficient_ttl_secs * 1000
}

/// How long an in-progress marker lives: past the longest a request can
/// take, so a crashed gateway does not block its key for a day.
pub(super) fn running_ms(store: &CreditStore) -> u64 {
    store.limits.confirm_timeout_ms + 30_000
}

/// KEYS[5] and the hash argument of a keyed script. Without a key the
/// record name is still one of the user's keys (same slot), and unused.
pub(super) fn idem_args(
    store: &CreditStore,
    user_id: &str,
    idem: Option<&Idem>,
) -> (String, String) {
    match idem {
        Some(i) => (i.record.clone(), i.hash.clone()),
        None => (store.keys.idempotency(user_id, "none", "-"), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: Error) -> String {
        match e {
            Error::Validation { field, .. } => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn equal_parsed_bodies_hash_equal_whatever_the_key_order() {
        let a: Value = serde_json::from_str(
            r#"{"amount": 5, "metadata": {"b": 1, "a": [1, {"y": 2, "x": 1}]}}"#,
        )
        .unwrap();
        let b: Value =
            serde_json::from_str(r#"{"metadata":{"a":[1,{"x":1,"y":2}],"b":1},"amount":5}"#)
                .unwrap();
        assert_eq!(body_hash(&a), body_hash(&b));
        assert_eq!(
            canonical_json(&b),
            r#"{"amount":5,"metadata":{"a":[1,{"x":1,"y":2}],"b":1}}"#
        );
        let c = json!({"amount": 6, "metadata": {"b": 1, "a": [1, {"y": 2, "x": 1}]}});
        assert_ne!(body_hash(&a), body_hash(&c));
        assert_ne!(
            body_hash(&json!({"a": [1, 2]})),
            body_hash(&json!({"a": [2, 1]}))
        );
        assert_eq!(body_hash(&a).len(), 64);
    }

    #[test]
    fn keys_are_optional_and_bounded() {
        assert_eq!(idempotency_key(None).unwrap(), None);
        assert_eq!(
            idempotency_key(Some(b"k-1")).unwrap().as_deref(),
            Some("k-1")
        );
        assert!(idempotency_key(Some("k".repeat(255).as_bytes())).is_ok());
        assert_eq!(
            field_of(idempotency_key(Some("k".repeat(256).as_bytes())).unwrap_err()),
            "Idempotency-Key"
        );
        assert!(idempotency_key(Some(b"")).is_err());
        assert_eq!(
            field_of(idempotency_key(Some(&[b'k', 0xff])).unwrap_err()),
            "Idempotency-Key"
        );
    }

    #[test]
    fn keyed_ids_are_stable_per_user_and_key() {
        let a = derived_id("consume", "u1", Some("k"));
        assert_eq!(a, derived_id("consume", "u1", Some("k")));
        assert_ne!(a, derived_id("consume", "u2", Some("k")));
        assert_ne!(a, derived_id("hold", "u1", Some("k")));
        assert_ne!(
            derived_id("consume", "u1", None),
            derived_id("consume", "u1", None)
        );
        let h = Uuid::new_v4();
        assert_eq!(settle_id(h), settle_id(h));
    }

    #[test]
    fn remembered_answers_round_trip() {
        let ok =
            Remembered::Ok(json!({"transaction_id": "t", "balance": 9_007_199_254_740_990i64}));
        assert_eq!(Remembered::parse(&ok.to_json()), Some(ok));
        // The scripts write the 402 form themselves.
        assert_eq!(
            Remembered::parse(r#"{"status":402,"balance":3,"required":5}"#),
            Some(Remembered::Insufficient {
                balance: 3,
                required: 5,
                limit: None,
            })
        );
        let capped = r#"{"status":402,"balance":3,"required":5,"limit":"member_cap"}"#;
        let parsed = Remembered::parse(capped).unwrap();
        assert_eq!(
            parsed,
            Remembered::Insufficient {
                balance: 3,
                required: 5,
                limit: Some("member_cap"),
            }
        );
        assert_eq!(Remembered::parse(&parsed.to_json()), Some(parsed));
        assert_eq!(Remembered::parse("nope"), None);
        assert_eq!(
            HoldEnd::parse(
                r#"{"state":"settled","transaction_id":"t","amount":3,"released":2,"balance":7}"#
            ),
            Some(HoldEnd::Settled(
                json!({"transaction_id": "t", "amount": 3, "released": 2, "balance": 7})
            ))
        );
        assert_eq!(
            HoldEnd::parse(r#"{"state":"expired"}"#),
            Some(HoldEnd::Expired)
        );
        assert_eq!(
            HoldEnd::parse(r#"{"state":"released"}"#),
            Some(HoldEnd::Released)
        );
    }
}
