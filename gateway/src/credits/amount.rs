//! The credit bodies and their rules: `Credits<MIN>` (a typed range that
//! refuses `1.0` and strings with a field-named 422), the text and count
//! fields typed by their ledger limits, and what each body means once valid.

use std::fmt;

use common::events::CreditContext;
use common::settings::MAX_CREDITS;
use common::valid::{len, FreeText, Label, Metadata, TokenCount};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::credits::pricing::{self, Book};
use crate::error::{Error, Result};

/// A credit figure from a request: a JSON integer from `MIN` to 2^53−1.
/// Floats (even `1.0`), strings, and anything out of range are refused, so
/// the field's error names it (422 `validation_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits<const MIN: i64>(i64);

/// An amount to consume, hold or grant: 1..=2^53−1.
pub type Amount = Credits<1>;
/// A settled amount or a token count: 0..=2^53−1.
pub type Count = Credits<0>;

impl<const MIN: i64> Credits<MIN> {
    pub fn new(v: i64) -> Option<Self> {
        (MIN..=MAX_CREDITS).contains(&v).then_some(Self(v))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl<'de, const MIN: i64> Deserialize<'de> for Credits<MIN> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<const MIN: i64>;
        impl<const MIN: i64> Visitor<'_> for V<MIN> {
            type Value = Credits<MIN>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an integer from {MIN} to {MAX_CREDITS}")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                Credits::new(v).ok_or_else(|| {
                    E::custom(format!("must be an integer from {MIN} to {MAX_CREDITS}"))
                })
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                i64::try_from(v).ok().and_then(Credits::new).ok_or_else(|| {
                    E::custom(format!("must be an integer from {MIN} to {MAX_CREDITS}"))
                })
            }
        }
        d.deserialize_i64(V::<MIN>)
    }
}

/// The schema of the same range, so the OpenAPI document states it.
impl<const MIN: i64> utoipa::PartialSchema for Credits<MIN> {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(MIN))
            .maximum(Some(MAX_CREDITS))
            .into()
    }
}
impl<const MIN: i64> utoipa::ToSchema for Credits<MIN> {
    fn name() -> std::borrow::Cow<'static, str> {
        format!("Credits{MIN}").into()
    }
}

// Every text, count and metadata field carries its rule on its type
// (`common::valid`, docs/reliability.md "A valid stored value"): deserializing refuses a
// value the ledger could not store, with a 422 naming the field.

/// A model or provider name, a feature, a session id, as stored in the ledger.
pub type ModelName = Label<{ len::MODEL }>;
pub type ProviderName = Label<{ len::PROVIDER }>;
pub type FeatureName = Label<{ len::FEATURE }>;
pub type SessionRef = Label<{ len::SESSION_ID }>;
pub type Description = FreeText<{ len::DESCRIPTION }>;
pub type Reason = FreeText<{ len::REASON }>;

/// `POST /api/users/:id/credits/consume`, with the original client's names.
/// Without `amount`, the token counts are priced by the book (`provider` and
/// `model` required; docs/credits.md "Price book").
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ConsumeBody {
    #[serde(default)]
    pub amount: Option<Amount>,
    #[serde(default, alias = "sessionId")]
    pub session_id: Option<SessionRef>,
    #[serde(default, alias = "modelId")]
    pub model: Option<ModelName>,
    #[serde(default)]
    pub provider: Option<ProviderName>,
    #[serde(default, alias = "tokensUsed")]
    pub prompt_tokens: Option<TokenCount>,
    #[serde(default)]
    pub completion_tokens: Option<TokenCount>,
    #[serde(default)]
    pub cached_tokens: Option<TokenCount>,
    #[serde(default)]
    pub feature: Option<FeatureName>,
    #[serde(default)]
    pub description: Option<Description>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
}

/// `POST /api/users/:id/credits/holds`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct HoldBody {
    pub amount: Amount,
    #[serde(default)]
    /// The upper bound is a setting (`credits.hold_max_ttl_secs`), so only the lower one is stated.
    #[schema(minimum = 1)]
    pub ttl_secs: Option<u64>,
    #[serde(default, alias = "sessionId")]
    pub session_id: Option<SessionRef>,
    #[serde(default, alias = "modelId")]
    pub model: Option<ModelName>,
    #[serde(default)]
    pub provider: Option<ProviderName>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
}

/// `POST /api/users/:id/credits/holds/:hold_id/settle`. Without `amount`, the
/// token counts are priced by the book and capped at the held amount.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SettleBody {
    #[serde(default)]
    pub amount: Option<Count>,
    #[serde(default, alias = "modelId")]
    pub model: Option<ModelName>,
    #[serde(default)]
    pub provider: Option<ProviderName>,
    #[serde(default, alias = "tokensUsed")]
    pub prompt_tokens: Option<TokenCount>,
    #[serde(default)]
    pub completion_tokens: Option<TokenCount>,
    #[serde(default)]
    pub cached_tokens: Option<TokenCount>,
}

/// `POST /api/admin/users/:id/credits/grant`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct GrantBody {
    pub amount: Amount,
    pub reason: Reason,
}

fn text<const N: usize>(v: Option<Label<N>>) -> Option<String> {
    v.map(Label::into_inner)
}

fn count(v: Option<TokenCount>) -> Option<i64> {
    v.map(TokenCount::get)
}

/// The book's request of a body's provider, model and token counts.
fn priced<'a>(
    provider: &'a Option<ProviderName>,
    model: &'a Option<ModelName>,
    tokens: [Option<TokenCount>; 3],
) -> pricing::Request<'a> {
    pricing::Request {
        provider: provider.as_ref().map(Label::as_str),
        model: model.as_ref().map(Label::as_str),
        prompt_tokens: count(tokens[0]),
        completion_tokens: count(tokens[1]),
        cached_tokens: count(tokens[2]),
    }
}

impl ConsumeBody {
    /// The amount (sent, or priced by `book`), and what it paid for (every
    /// field already checked by its type). Priced tokens that cost nothing
    /// (all counts 0) are 422: a consume moves at least one credit.
    pub fn validate(self, book: Option<&Book>) -> Result<(i64, CreditContext)> {
        let tokens = [
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
        ];
        let request = priced(&self.provider, &self.model, tokens);
        let charge = pricing::decide(self.amount.map(Amount::get), request, book)?;
        if charge.amount == 0 {
            return Err(Error::validation(
                "amount",
                "the tokens sent cost nothing (all counts 0); send an amount or a count above 0",
            ));
        }
        Ok((
            charge.amount,
            CreditContext {
                session_id: text(self.session_id),
                model: text(self.model),
                provider: text(self.provider),
                prompt_tokens: count(self.prompt_tokens),
                completion_tokens: count(self.completion_tokens),
                cached_tokens: count(self.cached_tokens),
                price: charge.price,
                feature: text(self.feature),
                description: self.description.map(FreeText::into_inner),
                metadata: self.metadata.map(Metadata::into_inner),
                // Set by the publisher from the request's scope.
                request_id: None,
                // Set by the credit flow when the user spends an organization's pool.
                org_id: None,
            },
        ))
    }
}

impl HoldBody {
    /// Amount, lifetime (seconds) and context, or 422 naming the field.
    pub fn validate(self, default_ttl: u64, max_ttl: u64) -> Result<(i64, u64, CreditContext)> {
        let ttl = self.ttl_secs.unwrap_or(default_ttl);
        if !(1..=max_ttl).contains(&ttl) {
            return Err(Error::validation(
                "ttl_secs",
                format!("must be an integer from 1 to {max_ttl}"),
            ));
        }
        Ok((
            self.amount.get(),
            ttl,
            CreditContext {
                session_id: text(self.session_id),
                model: text(self.model),
                provider: text(self.provider),
                metadata: self.metadata.map(Metadata::into_inner),
                ..Default::default()
            },
        ))
    }
}

impl SettleBody {
    /// The amount (sent, or priced by `book`: the flow caps it at the hold)
    /// and what it paid for.
    pub fn validate(self, book: Option<&Book>) -> Result<(i64, CreditContext)> {
        let tokens = [
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
        ];
        let request = priced(&self.provider, &self.model, tokens);
        let charge = pricing::decide(self.amount.map(Count::get), request, book)?;
        Ok((
            charge.amount,
            CreditContext {
                model: text(self.model),
                provider: text(self.provider),
                prompt_tokens: count(self.prompt_tokens),
                completion_tokens: count(self.completion_tokens),
                cached_tokens: count(self.cached_tokens),
                price: charge.price,
                ..Default::default()
            },
        ))
    }
}

impl GrantBody {
    pub fn validate(self) -> Result<(i64, String)> {
        let reason = self.reason.as_str().trim().to_string();
        if reason.is_empty() {
            return Err(Error::validation(
                "reason",
                format!("must be 1 to {} characters", len::REASON),
            ));
        }
        Ok((self.amount.get(), reason))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::decode::parse_body;

    fn consume(v: Value) -> Result<(i64, CreditContext)> {
        parse_body::<ConsumeBody>(v)?.validate(None)
    }

    fn from_value<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
        parse_body(v)
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::Validation { field, .. } => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn amounts_are_integers_from_one_to_two_pow_53_minus_one() {
        assert_eq!(consume(json!({"amount": 1})).unwrap().0, 1);
        assert_eq!(
            consume(json!({"amount": MAX_CREDITS})).unwrap().0,
            MAX_CREDITS
        );
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!(1.0),
            json!("5"),
            json!(null),
            json!(true),
            json!(MAX_CREDITS + 1),
            json!(9_223_372_036_854_775_808u64),
            json!(1e30),
        ] {
            let e = consume(json!({"amount": bad.clone()})).unwrap_err();
            assert_eq!(field_of(e), "amount", "{bad}");
        }
        assert_eq!(field_of(consume(json!({})).unwrap_err()), "amount");
        assert_eq!(field_of(consume(json!([1])).unwrap_err()), "body");
    }

    #[test]
    fn the_original_clients_names_are_accepted() {
        let (amount, ctx) = consume(json!({
            "amount": 3, "description": "chat", "sessionId": "s1",
            "modelId": "openai/gpt-4o", "provider": "openai", "tokensUsed": 120
        }))
        .unwrap();
        assert_eq!(amount, 3);
        assert_eq!(ctx.session_id.as_deref(), Some("s1"));
        assert_eq!(ctx.model.as_deref(), Some("openai/gpt-4o"));
        assert_eq!(ctx.prompt_tokens, Some(120));
        assert_eq!(ctx.description.as_deref(), Some("chat"));
    }

    #[test]
    fn bad_details_name_their_field() {
        assert_eq!(
            field_of(consume(json!({"amount": 1, "model": "m".repeat(129)})).unwrap_err()),
            "model"
        );
        assert_eq!(
            field_of(consume(json!({"amount": 1, "metadata": [1]})).unwrap_err()),
            "metadata"
        );
        assert_eq!(
            field_of(consume(json!({"amount": 1, "prompt_tokens": -1})).unwrap_err()),
            "prompt_tokens"
        );
        let hold = |v| from_value::<HoldBody>(v).unwrap().validate(300, 3600);
        assert_eq!(hold(json!({"amount": 1})).unwrap().1, 300);
        assert_eq!(
            field_of(hold(json!({"amount": 1, "ttl_secs": 0})).unwrap_err()),
            "ttl_secs"
        );
        assert_eq!(
            field_of(hold(json!({"amount": 1, "ttl_secs": 3601})).unwrap_err()),
            "ttl_secs"
        );
        let settle = from_value::<SettleBody>(json!({"amount": 0}))
            .unwrap()
            .validate(None)
            .unwrap();
        assert_eq!(settle.0, 0);
        let grant = |v| from_value::<GrantBody>(v).and_then(GrantBody::validate);
        assert_eq!(
            field_of(grant(json!({"amount": 5, "reason": " "})).unwrap_err()),
            "reason"
        );
        assert_eq!(field_of(grant(json!({"amount": 5})).unwrap_err()), "reason");
    }

    #[test]
    fn values_the_ledger_refuses_are_refused_in_every_credit_body() {
        for (member, value) in [
            ("description", json!("a\u{0}b")),
            ("description", json!("bell\u{7}")),
            ("model", json!("m\u{0}")),
            ("modelId", json!("m\nx")),
            ("provider", json!("\u{0}")),
            ("session_id", json!("s\u{0}")),
            ("sessionId", json!("s\u{1b}")),
            ("feature", json!("f\u{0}")),
            ("metadata", json!({"k": "\u{0}"})),
            ("metadata", json!({"k\u{0}": 1})),
            ("prompt_tokens", json!(1_000_000_001)),
            ("tokensUsed", json!(i64::MAX)),
            ("completion_tokens", json!(9_223_372_036_854_775_807i64)),
        ] {
            let mut body = json!({"amount": 1});
            body[member] = value.clone();
            let e = consume(body).unwrap_err();
            let named = field_of(e);
            // Aliases are reported under the name the client sent.
            assert_eq!(named, member, "{member}: {value}");
        }
        let free = consume(json!({"amount": 1, "description": "two\r\nlines\tok"})).unwrap();
        assert_eq!(free.1.description.as_deref(), Some("two\r\nlines\tok"));
        for (member, value) in [
            ("model", json!("m\u{0}")),
            ("metadata", json!({"x": ["\u{0}"]})),
        ] {
            let mut body = json!({"amount": 1});
            body[member] = value;
            let e = from_value::<HoldBody>(body).unwrap_err();
            assert_eq!(field_of(e), member);
        }
        for (member, value) in [
            ("provider", json!("p\u{0}")),
            ("completion_tokens", json!(1_000_000_001)),
        ] {
            let mut body = json!({"amount": 1});
            body[member] = value;
            let e = from_value::<SettleBody>(body).unwrap_err();
            assert_eq!(field_of(e), member);
        }
        let e = from_value::<GrantBody>(json!({"amount": 1, "reason": "r\u{0}"})).unwrap_err();
        assert_eq!(field_of(e), "reason");
    }
}
