//! The price book (SPEC §5.11, docs/credits.md "Price book"): credits per
//! million prompt, completion and cached tokens per provider and model, the
//! model `*` standing for the provider's default.
//!
//! The book lives in Postgres (`price_book`); every gateway keeps the whole of
//! it in memory ([`PriceCache`]) and reloads it every `pricing.refresh_ms`
//! (1 s by default), so an admin's change applies on every gateway within
//! that interval plus one query (well inside the 5 s of the contract), and
//! at once on the gateway that made it. A reload that fails (Postgres down)
//! keeps the book it has. Nothing of it is in Redis, so the Redis-loss
//! rebuild has nothing to rebuild here.
//!
//! The arithmetic is [`amount`]: ⌈(prompt·p + completion·c + cached·k) / 10^6⌉,
//! computed in `u128` (no product of two `i64` overflows it), at least 1 when
//! any token is counted, refused past 2^53−1. [`decide`] says what a consume
//! or settle charges: an explicit amount as sent, else the book's quote.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use common::events::Price;
use common::settings::MAX_CREDITS;
use serde::{Deserialize, Serialize, Serializer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::credits::{Count, ModelName, ProviderName};
use crate::error::{Error, Result};

/// The model name of a provider's default entry.
pub const DEFAULT_MODEL: &str = "*";

/// Token counts of one charge or usage event (each ≥ 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: i64,
    pub completion: i64,
    pub cached: i64,
}

/// One entry of the book, as `GET /api/pricing` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PriceEntry {
    pub provider: String,
    /// The model, or `*` for the provider's default.
    pub model: String,
    /// Credits per million prompt tokens.
    pub prompt_per_mtok: i64,
    /// Credits per million completion tokens.
    pub completion_per_mtok: i64,
    /// Credits per million cached (prompt-cache) tokens.
    pub cached_per_mtok: i64,
    /// When an admin last set it (RFC 3339, milliseconds, UTC).
    #[serde(serialize_with = "rfc3339_millis")]
    pub updated_at: DateTime<Utc>,
}

/// What the book says a charge costs, and the receipt that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub amount: i64,
    pub price: Price,
}

/// ⌈(prompt·p + completion·c + cached·k) / 10^6⌉, at least 1 when any token
/// is counted; `None` when a count or rate is negative or the result passes
/// 2^53−1.
pub fn amount(e: &PriceEntry, t: Tokens) -> Option<i64> {
    let term = |tokens: i64, rate: i64| -> Option<u128> {
        Some(u128::try_from(tokens).ok()? * u128::try_from(rate).ok()?)
    };
    // Each term < 2^126, so the sum of three fits in u128.
    let total = term(t.prompt, e.prompt_per_mtok)?
        + term(t.completion, e.completion_per_mtok)?
        + term(t.cached, e.cached_per_mtok)?;
    let mut credits = total.div_ceil(1_000_000);
    if t.prompt > 0 || t.completion > 0 || t.cached > 0 {
        credits = credits.max(1);
    }
    i64::try_from(credits).ok().filter(|c| *c <= MAX_CREDITS)
}

/// The whole book, as one gateway holds it (immutable: a reload swaps it).
#[derive(Debug, Clone, Default)]
pub struct Book {
    entries: HashMap<(String, String), PriceEntry>,
}

impl Book {
    pub fn new(entries: impl IntoIterator<Item = PriceEntry>) -> Self {
        Self {
            entries: entries
                .into_iter()
                .map(|e| ((e.provider.clone(), e.model.clone()), e))
                .collect(),
        }
    }

    /// The model's entry, else the provider's default.
    pub fn lookup(&self, provider: &str, model: &str) -> Option<&PriceEntry> {
        let key = |m: &str| (provider.to_string(), m.to_string());
        self.entries
            .get(&key(model))
            .or_else(|| self.entries.get(&key(DEFAULT_MODEL)))
    }

    /// What `tokens` of `provider`/`model` cost, or 422: no entry (naming the
    /// provider and model), or an amount past 2^53−1.
    pub fn quote(&self, provider: &str, model: &str, tokens: Tokens) -> Result<Quote> {
        let e = self.lookup(provider, model).ok_or_else(|| {
            Error::validation(
                "provider",
                format!("no price for model {model:?} of provider {provider:?}, and no default ({provider:?}, \"*\")"),
            )
        })?;
        let amount = amount(e, tokens).ok_or_else(|| {
            Error::validation(
                "amount",
                format!("the tokens' price passes {MAX_CREDITS} credits"),
            )
        })?;
        Ok(Quote {
            amount,
            price: Price {
                provider: e.provider.clone(),
                model: e.model.clone(),
                prompt_per_mtok: e.prompt_per_mtok,
                completion_per_mtok: e.completion_per_mtok,
                cached_per_mtok: e.cached_per_mtok,
                prompt_tokens: tokens.prompt,
                completion_tokens: tokens.completion,
                cached_tokens: tokens.cached,
            },
        })
    }

    /// Every entry, by provider then model.
    pub fn entries(&self) -> Vec<PriceEntry> {
        let mut all: Vec<PriceEntry> = self.entries.values().cloned().collect();
        all.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
        all
    }
}

/// What a consume or settle names besides its amount, for [`decide`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
}

/// What a consume or settle charges (before a settle's cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub amount: i64,
    /// The receipt; none for an explicit amount.
    pub price: Option<Price>,
}

/// An explicit amount is charged as sent (the book is not consulted); without
/// one, token counts are priced by the book (`book` none: not loaded yet, 503);
/// with neither, 422 naming `amount`. Pricing needs `provider` and `model`.
pub fn decide(explicit: Option<i64>, r: Request<'_>, book: Option<&Book>) -> Result<Charge> {
    if let Some(amount) = explicit {
        return Ok(Charge {
            amount,
            price: None,
        });
    }
    if r.prompt_tokens.is_none() && r.completion_tokens.is_none() && r.cached_tokens.is_none() {
        return Err(Error::validation(
            "amount",
            "required unless prompt_tokens, completion_tokens or cached_tokens are sent with provider and model",
        ));
    }
    let provider = r
        .provider
        .ok_or_else(|| Error::validation("provider", "required to price tokens"))?;
    let model = r
        .model
        .ok_or_else(|| Error::validation("model", "required to price tokens"))?;
    let book = book.ok_or(Error::Unavailable {
        what: "postgres",
        retry_after: 5,
        cause: None,
    })?;
    let tokens = Tokens {
        prompt: r.prompt_tokens.unwrap_or(0),
        completion: r.completion_tokens.unwrap_or(0),
        cached: r.cached_tokens.unwrap_or(0),
    };
    let q = book.quote(provider, model, tokens)?;
    Ok(Charge {
        amount: q.amount,
        price: Some(q.price),
    })
}

/// The book in this gateway's memory, and how it reloads.
pub struct PriceCache {
    pg: PgPool,
    /// None until the first load succeeded.
    current: RwLock<Option<(Arc<Book>, DateTime<Utc>)>>,
    refresh: Duration,
}

impl PriceCache {
    pub fn new(pg: PgPool, refresh: Duration) -> Self {
        Self {
            pg,
            current: RwLock::new(None),
            // A zero interval would spin (and panics `tokio::time::interval`).
            refresh: refresh.max(Duration::from_millis(100)),
        }
    }

    /// The book as last loaded (none before the first load): no IO.
    pub fn book(&self) -> Option<Arc<Book>> {
        self.current
            .read()
            .expect("price cache lock")
            .as_ref()
            .map(|c| c.0.clone())
    }

    /// When the book in memory was loaded.
    pub fn loaded_at(&self) -> Option<DateTime<Utc>> {
        self.current
            .read()
            .expect("price cache lock")
            .as_ref()
            .map(|c| c.1)
    }

    /// Reads the whole table (a few rows per provider) and swaps it in.
    #[tracing::instrument(skip_all)]
    pub async fn reload(&self) -> Result<()> {
        let rows: Vec<(String, String, i64, i64, i64, DateTime<Utc>)> = sqlx::query_as(
            "select provider, model, prompt_per_mtok, completion_per_mtok, cached_per_mtok, updated_at from price_book",
        )
        .fetch_all(&self.pg)
        .await?;
        let book = Book::new(rows.into_iter().map(|r| PriceEntry {
            provider: r.0,
            model: r.1,
            prompt_per_mtok: r.2,
            completion_per_mtok: r.3,
            cached_per_mtok: r.4,
            updated_at: r.5,
        }));
        *self.current.write().expect("price cache lock") = Some((Arc::new(book), Utc::now()));
        Ok(())
    }

    /// Reloads every `refresh` until `stop`; a failed reload keeps the book.
    pub async fn run_refresh(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.reload().await {
                metrics::counter!("price_book_reload_failures_total").increment(1);
                tracing::warn!(error = %e, "price book not reloaded; keeping the one in memory");
            }
        }
    }
}

/// `PUT /api/admin/pricing`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceBody {
    pub provider: ProviderName,
    /// The model, or `*` for the provider's default.
    pub model: ModelName,
    pub prompt_per_mtok: Count,
    pub completion_per_mtok: Count,
    /// 0 when absent.
    #[serde(default)]
    pub cached_per_mtok: Option<Count>,
}

impl PriceBody {
    pub(crate) fn field_empty(s: &str, field: &str) -> Result<()> {
        if s.trim().is_empty() {
            return Err(Error::validation(field, "must not be empty"));
        }
        Ok(())
    }
}

fn rfc3339_millis<S: Serializer>(t: &DateTime<Utc>, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(provider: &str, model: &str, p: i64, c: i64, k: i64) -> PriceEntry {
        PriceEntry {
            provider: provider.into(),
            model: model.into(),
            prompt_per_mtok: p,
            completion_per_mtok: c,
            cached_per_mtok: k,
            updated_at: Utc::now(),
        }
    }

    fn t(prompt: i64, completion: i64, cached: i64) -> Tokens {
        Tokens {
            prompt,
            completion,
            cached,
        }
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::Validation { field, .. } => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn amounts_round_up_to_whole_credits() {
        let e = entry("openai", "gpt", 3_000, 15_000, 1_500);
        // 1000·3000 + 200·15000 + 0 = 6e6 → exactly 6.
        assert_eq!(amount(&e, t(1000, 200, 0)), Some(6));
        // One more prompt token: 6_003_000 / 1e6 → 7.
        assert_eq!(amount(&e, t(1001, 200, 0)), Some(7));
        // 400 cached tokens: 600_000 → 1.
        assert_eq!(amount(&e, t(0, 0, 400)), Some(1));
        assert_eq!(amount(&e, t(1_000_000, 0, 0)), Some(3_000));
    }

    #[test]
    fn any_token_costs_at_least_one_credit_and_no_tokens_cost_nothing() {
        let cheap = entry("p", "m", 1, 1, 1);
        assert_eq!(amount(&cheap, t(1, 0, 0)), Some(1));
        let free = entry("p", "m", 0, 0, 0);
        assert_eq!(amount(&free, t(5, 5, 5)), Some(1));
        assert_eq!(amount(&cheap, t(0, 0, 0)), Some(0));
    }

    #[test]
    fn overflow_and_negative_figures_are_refused() {
        let max = entry("p", "m", MAX_CREDITS, MAX_CREDITS, MAX_CREDITS);
        assert_eq!(amount(&max, t(i64::MAX, i64::MAX, i64::MAX)), None);
        // 10^6 tokens at 2^53−1 per million: exactly the bound.
        assert_eq!(amount(&max, t(1_000_000, 0, 0)), Some(MAX_CREDITS));
        assert_eq!(amount(&max, t(1_000_001, 0, 0)), None);
        assert_eq!(amount(&max, t(-1, 0, 0)), None);
        let neg = entry("p", "m", -1, 0, 0);
        assert_eq!(amount(&neg, t(1, 0, 0)), None);
        let e = Book::new([max])
            .quote("p", "m", t(i64::MAX, 0, 0))
            .unwrap_err();
        assert_eq!(field_of(e), "amount");
    }

    #[test]
    fn the_models_entry_wins_and_the_providers_default_covers_the_rest() {
        let book = Book::new([
            entry("openai", "*", 1_000_000, 2_000_000, 0),
            entry("openai", "gpt-4o", 5_000_000, 0, 0),
        ]);
        let q = book.quote("openai", "gpt-4o", t(1, 1, 0)).unwrap();
        assert_eq!((q.amount, q.price.model.as_str()), (5, "gpt-4o"));
        let q = book.quote("openai", "other", t(1, 1, 0)).unwrap();
        assert_eq!((q.amount, q.price.model.as_str()), (3, "*"));
        assert_eq!(q.price.prompt_tokens, 1);
        assert_eq!(q.price.completion_per_mtok, 2_000_000);
        let e = book.quote("anthropic", "claude", t(1, 0, 0)).unwrap_err();
        match e {
            Error::Validation { field, message } => {
                assert_eq!(field, "provider");
                assert!(
                    message.contains("anthropic") && message.contains("claude"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            book.entries()
                .iter()
                .map(|e| e.model.as_str())
                .collect::<Vec<_>>(),
            ["*", "gpt-4o"]
        );
    }

    #[test]
    fn an_explicit_amount_ignores_the_book_and_tokens_need_provider_and_model() {
        let book = Book::new([entry("p", "*", 1_000_000, 0, 0)]);
        let r = Request {
            provider: Some("p"),
            model: Some("m"),
            prompt_tokens: Some(4),
            ..Default::default()
        };
        assert_eq!(
            decide(Some(9), r, None).unwrap(),
            Charge {
                amount: 9,
                price: None
            }
        );
        let c = decide(None, r, Some(&book)).unwrap();
        assert_eq!(c.amount, 4);
        assert_eq!(c.price.unwrap().model, "*");
        assert!(matches!(
            decide(None, r, None),
            Err(Error::Unavailable { .. })
        ));
        let none = Request {
            provider: Some("p"),
            model: Some("m"),
            ..Default::default()
        };
        assert_eq!(
            field_of(decide(None, none, Some(&book)).unwrap_err()),
            "amount"
        );
        let no_model = Request { model: None, ..r };
        assert_eq!(
            field_of(decide(None, no_model, Some(&book)).unwrap_err()),
            "model"
        );
        let no_provider = Request {
            provider: None,
            ..r
        };
        assert_eq!(
            field_of(decide(None, no_provider, Some(&book)).unwrap_err()),
            "provider"
        );
        let zero = Request {
            prompt_tokens: Some(0),
            ..r
        };
        assert_eq!(decide(None, zero, Some(&book)).unwrap().amount, 0);
    }

    #[test]
    fn a_price_body_refuses_floats_negatives_and_control_characters() {
        use serde_json::json;
        let parse = |v: serde_json::Value| crate::decode::parse_body::<PriceBody>(v);
        let ok = parse(
            json!({"provider": "openai", "model": "*", "prompt_per_mtok": 0, "completion_per_mtok": 5}),
        );
        assert!(ok.unwrap().cached_per_mtok.is_none());
        for (member, bad) in [
            ("prompt_per_mtok", json!(-1)),
            ("prompt_per_mtok", json!(1.5)),
            ("completion_per_mtok", json!(MAX_CREDITS + 1)),
            ("cached_per_mtok", json!("3")),
            ("model", json!("m\u{0}")),
            ("provider", json!("p".repeat(65))),
        ] {
            let mut body = json!({"provider": "openai", "model": "gpt", "prompt_per_mtok": 1, "completion_per_mtok": 2});
            body[member] = bad.clone();
            assert_eq!(field_of(parse(body).unwrap_err()), member, "{bad}");
        }
    }
}
