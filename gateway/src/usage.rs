//! Parsing and validating a `usage/track` body (docs/api.md "Usage", §5.10) into events.
//! Plain functions: every rule here is unit-tested without IO. Any invalid
//! event refuses the whole request, naming `events[i].field`.

use chrono::{DateTime, Duration, Utc};
use common::events::{UsageDetail, UsageEvent};
use common::valid::{self, len, TextRule};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::Error;

pub const MAX_EVENTS: usize = 500;
pub use common::valid::MAX_METADATA_BYTES;

/// Which shape the body had; the legacy one gets extra answer members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Single,
    Batch,
    /// The original backend's `{"sessionToken","action","modelId","tokensUsed","costInCredits"}`.
    Legacy,
}

/// The 202 answer of `POST /api/vscode/usage/track` (docs/api.md "Usage").
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct TrackAnswer {
    /// Events accepted: all of the request's (one bad event refuses them all).
    pub accepted: i64,
    /// The events' ids in the request's order (made, UUIDv7, where absent).
    pub event_ids: Vec<Uuid>,
    /// Always true; only in answers to the original client's shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = bool)]
    pub success: Option<bool>,
    /// The caller's balance (usage never moves credits), null when unreadable; only in
    /// answers to the original client's shape.
    #[serde(rename = "remainingCredits", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<i64>)]
    pub remaining_credits: Option<Option<i64>>,
}

impl TrackAnswer {
    /// The answer for `events`, accepted; the original client's members with `legacy`:
    /// `Some(balance)` (the balance itself `None` when it could not be read).
    pub fn new(events: &[UsageEvent], legacy: Option<Option<i64>>) -> Self {
        Self {
            accepted: events.len() as i64,
            event_ids: events.iter().map(|e| e.id).collect(),
            success: legacy.map(|_| true),
            remaining_credits: legacy,
        }
    }
}

/// Turns a body into validated events stamped with `now` as `received_at`.
pub fn parse_track(
    body: &Value,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<(Shape, Vec<UsageEvent>), Error> {
    let obj = body.as_object().ok_or_else(|| {
        Error::validation("body", "must be an event object or {\"events\": [...]}")
    })?;
    if let Some(events) = obj.get("events") {
        let list = events
            .as_array()
            .ok_or_else(|| Error::validation("events", "must be an array"))?;
        if list.is_empty() || list.len() > MAX_EVENTS {
            return Err(Error::validation(
                "events",
                format!("must hold 1..={MAX_EVENTS} events"),
            ));
        }
        let parsed = list
            .iter()
            .enumerate()
            .map(|(i, e)| parse_event(e, &format!("events[{i}]."), user_id, now))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((Shape::Batch, parsed));
    }
    if obj.contains_key("modelId") && !obj.contains_key("kind") {
        return Ok((Shape::Legacy, vec![parse_legacy(obj, user_id, now)?]));
    }
    Ok((Shape::Single, vec![parse_event(body, "", user_id, now)?]))
}

fn parse_event(
    v: &Value,
    at: &str,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<UsageEvent, Error> {
    let f = |name: &str| format!("{at}{name}");
    let obj = v.as_object().ok_or_else(|| {
        let name = if at.is_empty() {
            "body"
        } else {
            at.trim_end_matches('.')
        };
        Error::validation(name, "must be an object")
    })?;
    // Ids we make are UUIDv7 (time-ordered): the workers' unique indexes on
    // event ids then grow at their right edge instead of at random pages.
    let id = match obj.get("event_id") {
        None | Some(Value::Null) => Uuid::now_v7(),
        Some(Value::String(s)) => {
            Uuid::parse_str(s).map_err(|_| Error::validation(f("event_id"), "must be a UUID"))?
        }
        Some(_) => return Err(Error::validation(f("event_id"), "must be a UUID string")),
    };
    let session_id = opt_str(obj, "session_id", len::SESSION_ID, &f)?;
    if let Some(s) = &session_id {
        if !valid_session_id(s) {
            return Err(Error::validation(
                f("session_id"),
                "must be 1..=128 of [A-Za-z0-9_.:-]",
            ));
        }
    }
    let occurred_at = match obj.get("occurred_at") {
        None | Some(Value::Null) => now,
        Some(Value::String(s)) => {
            let t = DateTime::parse_from_rfc3339(s)
                .map_err(|_| Error::validation(f("occurred_at"), "must be an RFC 3339 time"))?
                .with_timezone(&Utc);
            if t > now + Duration::minutes(5) {
                return Err(Error::validation(
                    f("occurred_at"),
                    "is more than 5 minutes in the future",
                ));
            }
            if t < now - Duration::days(30) {
                return Err(Error::validation(
                    f("occurred_at"),
                    "is more than 30 days in the past",
                ));
            }
            t
        }
        Some(_) => {
            return Err(Error::validation(
                f("occurred_at"),
                "must be an RFC 3339 time string",
            ))
        }
    };
    let metadata = parse_metadata(obj.get("metadata"), &f("metadata"))?;
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        _ => {
            return Err(Error::validation(
                f("kind"),
                "must be \"model\" or \"feature\"",
            ))
        }
    };
    let detail = match kind {
        "model" => UsageDetail::Model {
            provider: req_str(obj, "provider", len::PROVIDER, &f)?,
            model: req_str(obj, "model", len::MODEL, &f)?,
            prompt_tokens: req_count(obj, "prompt_tokens", &f)?,
            completion_tokens: req_count(obj, "completion_tokens", &f)?,
            latency_ms: opt_count(obj, "latency_ms", &f)?,
            success: match obj.get("success") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => return Err(Error::validation(f("success"), "must be a boolean")),
            },
        },
        "feature" => UsageDetail::Feature {
            feature: req_str(obj, "feature", len::FEATURE, &f)?,
            action: opt_str(obj, "action", len::ACTION, &f)?,
            duration_ms: opt_count(obj, "duration_ms", &f)?,
        },
        _ => {
            return Err(Error::validation(
                f("kind"),
                "must be \"model\" or \"feature\"",
            ))
        }
    };
    Ok(UsageEvent {
        id,
        user_id: user_id.to_string(),
        session_id,
        occurred_at,
        received_at: now,
        metadata,
        detail,
        // Priced by `price_events` from the gateway's book, never by the client.
        credits: None,
    })
}

/// The original client's shape: one model event, provider from `modelId`.
fn parse_legacy(
    obj: &Map<String, Value>,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<UsageEvent, Error> {
    let f = |name: &str| name.to_string();
    let model = req_str(obj, "modelId", len::MODEL, &f)?;
    let provider = provider_of(&model);
    let tokens = opt_count(obj, "tokensUsed", &f)?.unwrap_or(0);
    let action = opt_str(obj, "action", len::ACTION, &f)?;
    let cost = match obj.get("costInCredits") {
        None | Some(Value::Null) => Value::Null,
        // Kept in metadata only (never trusted): any finite non-negative number.
        Some(v @ Value::Number(n)) if n.as_f64().is_some_and(|x| x >= 0.0 && x.is_finite()) => {
            v.clone()
        }
        Some(_) => return Err(Error::validation("costInCredits", "must be a number ≥ 0")),
    };
    let session_id = opt_str(obj, "sessionToken", len::SESSION_ID, &f)?;
    if let Some(s) = &session_id {
        if !valid_session_token(s) {
            return Err(Error::validation(
                "sessionToken",
                "must be 8..=128 of [A-Za-z0-9_.-]",
            ));
        }
    }
    let mut meta = Map::new();
    meta.insert(
        "action".into(),
        action.map(Value::String).unwrap_or(Value::Null),
    );
    meta.insert("cost_in_credits".into(), cost);
    Ok(UsageEvent {
        id: Uuid::now_v7(),
        user_id: user_id.to_string(),
        session_id,
        occurred_at: now,
        received_at: now,
        metadata: Some(Value::Object(meta)),
        detail: UsageDetail::Model {
            provider,
            model,
            prompt_tokens: tokens,
            completion_tokens: 0,
            latency_ms: None,
            success: None,
        },
        credits: None,
    })
}

/// Prices each model event by the book (docs/credits.md "Price book"): the
/// credits it would cost, in memory only (a map lookup per event, no IO). A
/// provider without a price, or a book not loaded yet, leaves it unpriced.
pub fn price_events(events: &mut [UsageEvent], book: Option<&crate::credits::pricing::Book>) {
    let Some(book) = book else { return };
    for e in events {
        if let UsageDetail::Model {
            provider,
            model,
            prompt_tokens,
            completion_tokens,
            ..
        } = &e.detail
        {
            let tokens = crate::credits::pricing::Tokens {
                prompt: *prompt_tokens,
                completion: *completion_tokens,
                cached: 0,
            };
            e.credits = book.quote(provider, model, tokens).ok().map(|p| p.amount);
        }
    }
}

/// `openai/gpt-4o` → `openai`; no slash → `openrouter` (docs/compatibility.md).
pub fn provider_of(model_id: &str) -> String {
    match model_id.split_once('/') {
        Some((p, _)) if !p.is_empty() => p.chars().take(64).collect(),
        _ => "openrouter".into(),
    }
}

pub fn valid_session_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The original client's own session key: 8..=128 of `[A-Za-z0-9_.-]`.
pub fn valid_session_token(s: &str) -> bool {
    (8..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn parse_metadata(v: Option<&Value>, field: &str) -> Result<Option<Value>, Error> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(m) => match valid::check_metadata(m) {
            Ok(()) => Ok(Some(m.clone())),
            Err(reason) => Err(Error::validation(field, reason)),
        },
    }
}

fn req_str(
    obj: &Map<String, Value>,
    name: &str,
    max: usize,
    f: &dyn Fn(&str) -> String,
) -> Result<String, Error> {
    match opt_str(obj, name, max, f)? {
        Some(s) => Ok(s),
        None => Err(Error::validation(f(name), "is required")),
    }
}

fn opt_str(
    obj: &Map<String, Value>,
    name: &str,
    max: usize,
    f: &dyn Fn(&str) -> String,
) -> Result<Option<String>, Error> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match valid::check_text(s, TextRule::Label, max) {
            Ok(()) => Ok(Some(s.clone())),
            Err(reason) => Err(Error::validation(f(name), reason)),
        },
        Some(_) => Err(Error::validation(f(name), "must be a string")),
    }
}

fn req_count(
    obj: &Map<String, Value>,
    name: &str,
    f: &dyn Fn(&str) -> String,
) -> Result<i64, Error> {
    opt_count(obj, name, f)?.ok_or_else(|| Error::validation(f(name), "is required"))
}

/// A count: a JSON integer `0..=valid::MAX_COUNT` (no floats, no strings).
fn opt_count(
    obj: &Map<String, Value>,
    name: &str,
    f: &dyn Fn(&str) -> String,
) -> Result<Option<i64>, Error> {
    let refuse = || {
        Error::validation(
            f(name),
            format!("must be an integer from 0 to {}", valid::MAX_COUNT),
        )
    };
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => valid::check_count(i).map(Some).map_err(|_| refuse()),
            None => Err(refuse()),
        },
        Some(_) => Err(refuse()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn field_of(r: Result<(Shape, Vec<UsageEvent>), Error>) -> String {
        match r {
            Err(Error::Validation { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn model() -> Value {
        json!({"kind": "model", "provider": "openai", "model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5})
    }

    #[test]
    fn the_track_answer_is_the_json_of_before() {
        let (_, events) = parse_track(&json!({"events": [model(), model()]}), "u", now()).unwrap();
        let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
        let v = serde_json::to_value(TrackAnswer::new(&events, None)).unwrap();
        assert_eq!(v, json!({"accepted": 2, "event_ids": ids}));
        let v = serde_json::to_value(TrackAnswer::new(&events[..1], Some(Some(5)))).unwrap();
        assert_eq!(
            v,
            json!({"accepted": 1, "event_ids": [ids[0]], "success": true, "remainingCredits": 5})
        );
        let v = serde_json::to_value(TrackAnswer::new(&events[..1], Some(None))).unwrap();
        assert_eq!(
            v,
            json!({"accepted": 1, "event_ids": [ids[0]], "success": true, "remainingCredits": null})
        );
    }

    #[test]
    fn a_single_model_event_parses_with_defaults() {
        let (shape, ev) = parse_track(&model(), "u", now()).unwrap();
        assert_eq!(shape, Shape::Single);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].occurred_at, now());
        assert_eq!(ev[0].user_id, "u");
    }

    #[test]
    fn a_batch_names_the_index_of_the_bad_event() {
        let mut bad = model();
        bad["prompt_tokens"] = json!(-1);
        let body = json!({"events": [model(), model(), bad]});
        assert_eq!(
            field_of(parse_track(&body, "u", now())),
            "events[2].prompt_tokens"
        );
    }

    #[test]
    fn every_rule_of_the_spec_refuses() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"kind": "nope"}), "kind"),
            (
                json!({"kind": "model", "provider": "p".repeat(65), "model": "m", "prompt_tokens": 1, "completion_tokens": 1}),
                "provider",
            ),
            (
                json!({"kind": "model", "provider": "p", "model": "m".repeat(129), "prompt_tokens": 1, "completion_tokens": 1}),
                "model",
            ),
            (
                json!({"kind": "model", "provider": "p", "model": "m", "prompt_tokens": 1.5, "completion_tokens": 1}),
                "prompt_tokens",
            ),
            (
                json!({"kind": "model", "provider": "p", "model": "m", "prompt_tokens": "1", "completion_tokens": 1}),
                "prompt_tokens",
            ),
            (
                json!({"kind": "model", "provider": "p", "model": "m", "prompt_tokens": 1}),
                "completion_tokens",
            ),
            (
                json!({"kind": "model", "provider": "p", "model": "m", "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": -3}),
                "latency_ms",
            ),
            (
                json!({"kind": "model", "provider": "p", "model": "m", "prompt_tokens": 1, "completion_tokens": 1, "success": "yes"}),
                "success",
            ),
            (json!({"kind": "feature"}), "feature"),
            (
                json!({"kind": "feature", "feature": "f".repeat(65)}),
                "feature",
            ),
            (
                json!({"kind": "feature", "feature": "chat", "action": "a".repeat(65)}),
                "action",
            ),
            (
                json!({"kind": "feature", "feature": "chat", "duration_ms": 18446744073709551615u64}),
                "duration_ms",
            ),
            (
                json!({"kind": "feature", "feature": "chat", "event_id": "not-a-uuid"}),
                "event_id",
            ),
            (
                json!({"kind": "feature", "feature": "chat", "occurred_at": "2026-11-25T12:06:00Z"}),
                "occurred_at",
            ),
            (
                json!({"kind": "feature", "feature": "chat", "occurred_at": "2026-10-25T11:59:00Z"}),
                "occurred_at",
            ),
            (
                json!({"kind": "feature", "feature": "chat", "occurred_at": "yesterday"}),
                "occurred_at",
            ),
            (
                json!({"kind": "feature", "feature": "chat", "metadata": [1]}),
                "metadata",
            ),
            (
                json!({"kind": "feature", "feature": "chat", "metadata": {"x": "y".repeat(4100)}}),
                "metadata",
            ),
            (
                json!({"kind": "feature", "feature": "chat", "session_id": "a b"}),
                "session_id",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(parse_track(&body, "u", now())), field, "{body}");
        }
        assert_eq!(
            field_of(parse_track(&json!({"events": []}), "u", now())),
            "events"
        );
        let many: Vec<Value> = (0..501).map(|_| model()).collect();
        assert_eq!(
            field_of(parse_track(&json!({"events": many}), "u", now())),
            "events"
        );
        assert_eq!(field_of(parse_track(&json!([1]), "u", now())), "body");
    }

    #[test]
    fn values_the_stores_refuse_are_refused_here_naming_the_field() {
        let m = |k: &str, v: Value| {
            let mut e = model();
            e[k] = v;
            e
        };
        let feat = |k: &str, v: Value| {
            let mut e = json!({"kind": "feature", "feature": "chat"});
            e[k] = v;
            e
        };
        let cases: Vec<(Value, &str)> = vec![
            (m("model", json!("gpt\u{0}")), "model"),
            (m("provider", json!("a\u{1}b")), "provider"),
            (m("model", json!("line\nbreak")), "model"),
            (feat("feature", json!("\u{0}")), "feature"),
            (feat("action", json!("x\u{7f}")), "action"),
            (feat("metadata", json!({"k": "\u{0}"})), "metadata"),
            (feat("metadata", json!({"k\u{0}": 1})), "metadata"),
            (feat("metadata", json!({"a": {"b": ["\u{2}"]}})), "metadata"),
            (m("prompt_tokens", json!(1_000_000_001)), "prompt_tokens"),
            (m("completion_tokens", json!(i64::MAX)), "completion_tokens"),
            (
                m("latency_ms", json!(9_223_372_036_854_775_000i64)),
                "latency_ms",
            ),
            (feat("duration_ms", json!(1e12)), "duration_ms"),
            (feat("session_id", json!("s\u{0}")), "session_id"),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(parse_track(&body, "u", now())), field, "{body}");
        }
        let legacy = json!({"modelId": "m\u{0}", "tokensUsed": 1});
        assert_eq!(field_of(parse_track(&legacy, "u", now())), "modelId");
        let legacy = json!({"modelId": "m", "tokensUsed": 1_000_000_001});
        assert_eq!(field_of(parse_track(&legacy, "u", now())), "tokensUsed");
        // The bounds themselves are accepted; tab/CR/LF are fine in metadata strings.
        let ok = m("prompt_tokens", json!(valid::MAX_COUNT));
        assert!(parse_track(&ok, "u", now()).is_ok());
        let ok = feat("metadata", json!({"note": "a\tb\r\nc", "emoji": "🚀"}));
        assert!(parse_track(&ok, "u", now()).is_ok());
    }

    #[test]
    fn times_within_the_window_are_kept_as_sent() {
        let body = json!({"kind": "feature", "feature": "chat", "occurred_at": "2026-11-01T08:00:00+02:00"});
        let (_, ev) = parse_track(&body, "u", now()).unwrap();
        assert_eq!(
            ev[0].occurred_at,
            "2026-11-01T06:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }

    #[test]
    fn model_events_are_priced_by_the_book_and_never_by_the_clients_cost() {
        use crate::credits::pricing::{Book, PriceEntry};
        let book = Book::new([PriceEntry {
            provider: "openai".into(),
            model: "*".into(),
            prompt_per_mtok: 1_000_000,
            completion_per_mtok: 2_000_000,
            cached_per_mtok: 0,
            updated_at: now(),
        }]);
        let body = json!({"events": [
            {"kind": "model", "provider": "openai", "model": "gpt", "prompt_tokens": 3, "completion_tokens": 2},
            {"kind": "model", "provider": "nobody", "model": "x", "prompt_tokens": 3, "completion_tokens": 2},
            {"kind": "feature", "feature": "chat"}]});
        let (_, mut events) = parse_track(&body, "u1", now()).unwrap();
        price_events(&mut events, Some(&book));
        let credits: Vec<Option<i64>> = events.iter().map(|e| e.credits).collect();
        assert_eq!(credits, [Some(7), None, None]);
        let legacy = json!({"modelId": "openai/gpt-4o", "tokensUsed": 4, "costInCredits": 999});
        let (_, mut events) = parse_track(&legacy, "u1", now()).unwrap();
        price_events(&mut events, Some(&book));
        assert_eq!(events[0].credits, Some(4));
        // A book not loaded yet leaves events unpriced.
        let (_, mut events) = parse_track(&legacy, "u1", now()).unwrap();
        price_events(&mut events, None);
        assert_eq!(events[0].credits, None);
    }

    #[test]
    fn the_original_clients_body_maps_onto_a_model_event() {
        let body = json!({"sessionToken": "tok_12345678", "action": "complete", "modelId": "anthropic/claude-3", "tokensUsed": 42, "costInCredits": 3});
        let (shape, ev) = parse_track(&body, "u", now()).unwrap();
        assert_eq!(shape, Shape::Legacy);
        match &ev[0].detail {
            UsageDetail::Model {
                provider,
                model,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                assert_eq!(provider, "anthropic");
                assert_eq!(model, "anthropic/claude-3");
                assert_eq!(*prompt_tokens, 42);
                assert_eq!(*completion_tokens, 0);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ev[0].metadata,
            Some(json!({"action": "complete", "cost_in_credits": 3}))
        );
        let (_, ev) = parse_track(&json!({"modelId": "gpt-4"}), "u", now()).unwrap();
        assert!(
            matches!(&ev[0].detail, UsageDetail::Model { provider, prompt_tokens: 0, .. } if provider == "openrouter")
        );
    }
}
