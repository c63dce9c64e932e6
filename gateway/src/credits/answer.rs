//! The 200 answers of the credit routes (docs/api.md "Credits", "Admin"), as types: the flows
//! build the JSON by serializing them, and the OpenAPI document derives their schemas.
//!
//! An idempotent replay returns the JSON remembered from the first request (see
//! [`super::idempotency::Remembered`]), so these types must keep serializing to exactly the
//! members and values the first request answered.

use chrono::{DateTime, SecondsFormat, Utc};
use common::events::Price;
use serde::{Serialize, Serializer};
use serde_json::Value;
use uuid::Uuid;

/// `POST /api/users/{id}/credits/consume`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConsumeAnswer {
    /// The ledger transaction of this consume (a UUID).
    pub transaction_id: String,
    /// The user charged.
    pub user_id: String,
    /// Credits consumed.
    pub amount: i64,
    /// Spendable balance after the consume.
    pub balance: i64,
    /// Always true (original client).
    pub success: bool,
    /// The balance again, under the original client's name.
    pub remaining_credits: i64,
    /// The ledger row of this consume, as the original backend described it. Always sent;
    /// absent only on a replay of an answer remembered before this member existed.
    #[schema(required = false)]
    pub transaction: ConsumeTransaction,
    /// The receipt when the amount was priced by the book from token counts
    /// (docs/credits.md "Price book"); absent for an explicit amount.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false, value_type = Option<PriceReceipt>)]
    pub price: Option<Price>,
}

/// A charge's `price` (docs/credits.md "Price book"): the entry matched
/// (`model` `*` for the provider's default), its rates per million tokens,
/// and the counts priced. Only for the document; the value is `common::events::Price`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PriceReceipt {
    provider: String,
    model: String,
    prompt_per_mtok: i64,
    completion_per_mtok: i64,
    cached_per_mtok: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cached_tokens: i64,
}

/// `transaction` of a consume's answer (docs/compatibility.md). A remembered
/// answer stored before this member existed replays without it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConsumeTransaction {
    /// = `transaction_id`: the ledger row's id.
    pub id: String,
    /// The ledger row's amount: the credits consumed, negative.
    pub amount: i64,
    /// The consume's `description`; null when it had none.
    pub description: Option<String>,
    /// When the gateway granted the charge (RFC 3339, milliseconds, UTC): the time in the
    /// transaction id (a UUIDv7), so a retry under the same id answers the same time.
    #[serde(serialize_with = "rfc3339_millis")]
    pub timestamp: DateTime<Utc>,
}

impl ConsumeAnswer {
    pub fn new(
        transaction_id: Uuid,
        user_id: &str,
        amount: i64,
        balance: i64,
        description: Option<&str>,
        price: Option<Price>,
    ) -> Self {
        Self {
            transaction_id: transaction_id.to_string(),
            user_id: user_id.to_string(),
            amount,
            balance,
            success: true,
            remaining_credits: balance,
            transaction: ConsumeTransaction {
                id: transaction_id.to_string(),
                amount: -amount,
                description: description.map(str::to_string),
                timestamp: id_time(transaction_id).unwrap_or_else(Utc::now),
            },
            price,
        }
    }
}

/// The time a UUIDv7 was minted (milliseconds); None for other versions.
pub fn id_time(id: Uuid) -> Option<DateTime<Utc>> {
    if id.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
}

/// `POST /api/users/{id}/credits/holds`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HoldAnswer {
    /// The hold's id (a UUID), for settle and release.
    pub hold_id: String,
    /// Credits held.
    pub amount: i64,
    /// Spendable balance after the hold.
    pub balance: i64,
    /// Credits held by all the user's open holds, this one included.
    pub held: i64,
    /// When the hold is released by itself if not settled (RFC 3339, milliseconds, UTC).
    #[serde(serialize_with = "rfc3339_millis")]
    pub expires_at: DateTime<Utc>,
}

/// `POST /api/users/{id}/credits/holds/{hold_id}/settle`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SettleAnswer {
    /// The ledger transaction of the settle (a UUID, one per hold).
    pub transaction_id: String,
    /// Credits charged.
    pub amount: i64,
    /// Credits of the hold returned to the balance.
    pub released: i64,
    /// Spendable balance after the settle.
    pub balance: i64,
    /// The receipt when the amount was priced by the book; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false, value_type = Option<PriceReceipt>)]
    pub price: Option<Price>,
    /// True when the priced amount passed the hold and was capped at it; absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    pub capped: bool,
}

/// `POST /api/admin/users/{id}/credits/grant`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct GrantAnswer {
    /// The ledger transaction of the grant (a UUID).
    pub transaction_id: String,
    /// Spendable balance after the grant.
    pub balance: i64,
}

/// The answer as the JSON the routes send and idempotency remembers.
pub(super) fn to_json(answer: &impl Serialize) -> Value {
    serde_json::to_value(answer).expect("a credit answer serializes")
}

/// A time as `2024-05-01T08:00:00.000Z`, the text the answers always had.
fn rfc3339_millis<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn answers_serialize_to_the_json_the_routes_always_sent() {
        let tx = Uuid::from_u128(7);
        let at = Utc.timestamp_millis_opt(1_714_550_400_000).unwrap();
        let v7 = Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            1_714_550_400,
            123_000_000,
        ));
        assert_eq!(
            to_json(&ConsumeAnswer::new(v7, "u1", 5, 95, Some("chat"), None)),
            json!({"transaction_id": v7.to_string(), "user_id": "u1", "amount": 5, "balance": 95,
                   "success": true, "remaining_credits": 95,
                   "transaction": {"id": v7.to_string(), "amount": -5, "description": "chat",
                                   "timestamp": "2024-05-01T08:00:00.123Z"}})
        );
        let schema =
            serde_json::to_value(<ConsumeAnswer as utoipa::PartialSchema>::schema()).unwrap();
        let required = schema["required"].as_array().unwrap();
        assert!(
            !required.contains(&json!("transaction")) && required.contains(&json!("balance")),
            "{schema}"
        );
        let plain = to_json(&ConsumeAnswer::new(tx, "u1", 5, 95, None, None));
        assert_eq!(plain["transaction"]["description"], Value::Null);
        assert!(plain["transaction"]["timestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        let hold = HoldAnswer {
            hold_id: tx.to_string(),
            amount: 3,
            balance: 7,
            held: 4,
            expires_at: at,
        };
        assert_eq!(
            to_json(&hold),
            json!({"hold_id": tx.to_string(), "amount": 3, "balance": 7, "held": 4,
                   "expires_at": "2024-05-01T08:00:00.000Z"})
        );
        let settle = SettleAnswer {
            transaction_id: "t".into(),
            amount: 3,
            released: 2,
            balance: 7,
            price: None,
            capped: false,
        };
        assert_eq!(
            to_json(&settle),
            json!({"transaction_id": "t", "amount": 3, "released": 2, "balance": 7})
        );
        let grant = GrantAnswer {
            transaction_id: "t".into(),
            balance: 9,
        };
        assert_eq!(
            to_json(&grant),
            json!({"transaction_id": "t", "balance": 9})
        );
    }
}
