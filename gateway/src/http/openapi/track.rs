//! The `usage/track` body as documentation types: the parser
//! (`crate::usage::parse_track`) reads a `serde_json::Value` by hand, so these
//! structs exist only to give the OpenAPI document its fields and limits. The
//! tests below hold every documented limit to the parser's constant.
#![allow(dead_code)]

use chrono::{DateTime, Utc};
use common::valid::{len, Label, Metadata, TokenCount};
use utoipa::ToSchema;
use uuid::Uuid;

/// `POST /api/vscode/usage/track`: one event, a batch, or the original
/// client's shape (told apart by `events`, then by `modelId` without `kind`).
#[derive(serde::Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TrackBody {
    Batch(Batch),
    Event(Event),
    Legacy(Legacy),
}

/// `{"events": [...]}`: 1..=`MAX_EVENTS` events; one bad event refuses all.
#[derive(serde::Deserialize, ToSchema)]
pub struct Batch {
    #[schema(min_items = 1, max_items = 500)]
    pub events: Vec<Event>,
}

#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Model,
    Feature,
}

/// One event; `model` events need provider, model and both token counts,
/// `feature` events need feature.
#[derive(serde::Deserialize, ToSchema)]
pub struct Event {
    /// Made (UUIDv7) when absent.
    pub event_id: Option<Uuid>,
    pub kind: Kind,
    /// 1..=128 of `[A-Za-z0-9_.:-]` (`crate::usage::valid_session_id`). A caller's `sessionToken`
    /// is stored as the session id it names (docs/compatibility.md "One session identity").
    #[schema(schema_with = session_id)]
    pub session_id: Option<String>,
    /// At most 5 minutes ahead and 30 days behind the gateway's clock.
    pub occurred_at: Option<DateTime<Utc>>,
    pub metadata: Option<Metadata>,
    pub provider: Option<Label<{ len::PROVIDER }>>,
    pub model: Option<Label<{ len::MODEL }>>,
    pub prompt_tokens: Option<TokenCount>,
    pub completion_tokens: Option<TokenCount>,
    pub latency_ms: Option<TokenCount>,
    pub success: Option<bool>,
    pub feature: Option<Label<{ len::FEATURE }>>,
    pub action: Option<Label<{ len::ACTION }>>,
    pub duration_ms: Option<TokenCount>,
}

/// The original client's `{"sessionToken","action","modelId","tokensUsed","costInCredits"}`.
#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Legacy {
    /// 8..=128 of `[A-Za-z0-9_.-]` (`crate::usage::valid_session_token`). A token that
    /// `session/validate` never bound to the caller is 401 "Invalid session" (docs/compatibility.md).
    #[schema(schema_with = session_token)]
    pub session_token: Option<String>,
    pub action: Option<Label<{ len::ACTION }>>,
    pub model_id: Label<{ len::MODEL }>,
    pub tokens_used: Option<TokenCount>,
    /// Kept in metadata only, never trusted.
    #[schema(minimum = 0)]
    pub cost_in_credits: Option<f64>,
}

/// A session id as `crate::usage::valid_session_id` accepts it (here and in
/// `session/validate`).
pub fn session_id() -> utoipa::openapi::Object {
    session_string(1, "^[A-Za-z0-9_.:-]*$")
}

/// The original client's session key as `crate::usage::valid_session_token`
/// accepts it.
pub fn session_token() -> utoipa::openapi::Object {
    session_string(8, "^[A-Za-z0-9_.-]*$")
}

fn session_string(min: usize, pattern: &str) -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .min_length(Some(min))
        .max_length(Some(len::SESSION_ID))
        .pattern(Some(pattern))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use utoipa::PartialSchema;

    fn schema<T: PartialSchema>() -> Value {
        serde_json::to_value(T::schema()).unwrap()
    }

    #[test]
    fn the_documented_limits_are_the_parsers() {
        let batch = schema::<Batch>();
        assert_eq!(
            batch["properties"]["events"]["maxItems"],
            json!(crate::usage::MAX_EVENTS)
        );
        assert_eq!(batch["properties"]["events"]["minItems"], json!(1));
        let event = schema::<Event>();
        let session = &event["properties"]["session_id"];
        assert_eq!(session["maxLength"], json!(len::SESSION_ID));
        assert!(crate::usage::valid_session_id(&"a".repeat(128)));
        assert!(!crate::usage::valid_session_id(&"a".repeat(129)));
        assert!(!crate::usage::valid_session_id("a b"));
        let legacy = schema::<Legacy>();
        let token = &legacy["properties"]["sessionToken"];
        assert_eq!(
            (token["minLength"].clone(), token["maxLength"].clone()),
            (json!(8), json!(128))
        );
        assert!(crate::usage::valid_session_token(&"a".repeat(8)));
        assert!(!crate::usage::valid_session_token(&"a".repeat(7)));
        assert!(!crate::usage::valid_session_token(&"a".repeat(129)));
        assert_eq!(legacy["required"], json!(["modelId"]));
    }
}
