//! The worker's own check before a write (docs/reliability.md "A valid stored value",
//! §7): what one user sent never fails a message that holds other users' data,
//! and money never depends on metadata. Pure: no IO, so every rule is
//! unit-tested here.
//!
//! - **Usage events** that break the rules of [`common::valid`] are not stored:
//!   [`prepare`] takes them out of their group, each to be dead-lettered alone
//!   (its own `usage.batch` of one event, with the reason); the rest is stored.
//! - **Consumes, hold opens and settles** are always charged: the labels,
//!   free text, metadata or counts of their context that cannot be stored are
//!   dropped and the drop is noted in the metadata the row keeps
//!   (`{"dropped_fields": ["description", ...]}`, merged into the original
//!   metadata when that one could be kept). The amount is never touched.
//! - **Postgres refusing anyway** (a message stored alone still fails):
//!   `consumer::disposition` says what to try next, with [`strip_context`]
//!   for the retry of a money event without its free text.

use common::events::{CreditContext, Envelope, Event, UsageBatch, UsageDetail, UsageEvent};
use common::valid::{self, TextRule};
use serde_json::{Map, Value};

/// The metadata key that lists the fields a write dropped.
pub const DROPPED_FIELDS: &str = "dropped_fields";

/// A member that will not be stored: its own message, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub env: Envelope,
    pub reason: String,
}

/// A message made ready for storing.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// What to store (`None` when no member is left).
    pub clean: Option<Envelope>,
    /// Members taken out, each to be dead-lettered alone.
    pub refused: Vec<Refused>,
}

/// Checks and cleans one decoded message (see the module docs).
pub fn prepare(mut env: Envelope) -> Prepared {
    let mut refused = Vec::new();
    match &mut env.event {
        Event::UsageBatch(b) => {
            let events = std::mem::take(&mut b.events);
            for e in events {
                match check_usage(&e) {
                    Ok(()) => b.events.push(e),
                    Err(reason) => refused.push(Refused {
                        env: usage_member(&env.received_at, e),
                        reason: format!("invalid: {reason}"),
                    }),
                }
            }
            if b.events.is_empty() {
                return Prepared {
                    clean: None,
                    refused,
                };
            }
        }
        Event::CreditConsume(c) => {
            clean_context(&mut c.context);
        }
        Event::CreditConsumeBatch(b) => {
            for c in &mut b.consumes {
                clean_context(&mut c.consume.context);
            }
        }
        Event::HoldOpened(h) => {
            clean_context(&mut h.context);
        }
        Event::HoldSettled(h) => {
            clean_context(&mut h.context);
        }
        Event::SessionUpsert(_)
        | Event::HoldReleased(_)
        | Event::UserPreferences(_)
        | Event::UserActivity(_) => {}
    }
    Prepared {
        clean: Some(env),
        refused,
    }
}

/// Why a usage event cannot be stored, naming the field.
pub fn check_usage(e: &UsageEvent) -> Result<(), String> {
    let label = |field: &str, v: &str| match text_fault(v, TextRule::Label) {
        Some(r) => Err(format!("{field} {r}")),
        None => Ok(()),
    };
    let count = |field: &str, v: i64| {
        valid::check_count(v)
            .map(|_| ())
            .map_err(|r| format!("{field} {r}"))
    };
    label("user_id", &e.user_id)?;
    if let Some(s) = &e.session_id {
        label("session_id", s)?;
    }
    match &e.detail {
        UsageDetail::Model {
            provider,
            model,
            prompt_tokens,
            completion_tokens,
            latency_ms,
            success: _,
        } => {
            label("provider", provider)?;
            label("model", model)?;
            count("prompt_tokens", *prompt_tokens)?;
            count("completion_tokens", *completion_tokens)?;
            if let Some(l) = latency_ms {
                count("latency_ms", *l)?;
            }
        }
        UsageDetail::Feature {
            feature,
            action,
            duration_ms,
        } => {
            label("feature", feature)?;
            if let Some(a) = action {
                label("action", a)?;
            }
            if let Some(d) = duration_ms {
                count("duration_ms", *d)?;
            }
        }
    }
    if let Some(m) = &e.metadata {
        valid::check_metadata(m).map_err(|r| format!("metadata {r}"))?;
    }
    Ok(())
}

/// What is wrong with a text that could not be stored, if anything.
fn text_fault(s: &str, rule: TextRule) -> Option<&'static str> {
    if valid::storable_text(s, rule) {
        None
    } else if s.contains('\0') {
        Some("must not contain U+0000")
    } else if rule == TextRule::Free {
        Some("must not contain control characters other than tab, CR and LF")
    } else {
        Some("must not contain control characters")
    }
}

/// Drops what cannot be stored from a credit context and notes the drop in
/// its metadata; returns the names dropped (in field order).
pub fn clean_context(c: &mut CreditContext) -> Vec<&'static str> {
    let mut dropped = Vec::new();
    let mut text = |name: &'static str, v: &mut Option<String>, rule: TextRule| {
        if v.as_deref().is_some_and(|s| !valid::storable_text(s, rule)) {
            *v = None;
            dropped.push(name);
        }
    };
    text("session_id", &mut c.session_id, TextRule::Label);
    text("model", &mut c.model, TextRule::Label);
    text("provider", &mut c.provider, TextRule::Label);
    text("feature", &mut c.feature, TextRule::Label);
    text("description", &mut c.description, TextRule::Free);
    let mut count = |name: &'static str, v: &mut Option<i64>| {
        if v.is_some_and(|n| valid::check_count(n).is_err()) {
            *v = None;
            dropped.push(name);
        }
    };
    count("prompt_tokens", &mut c.prompt_tokens);
    count("completion_tokens", &mut c.completion_tokens);
    if c.metadata
        .as_ref()
        .is_some_and(|m| !valid::storable_metadata(m))
    {
        c.metadata = None;
        dropped.push("metadata");
    }
    note_dropped(c, &dropped);
    dropped
}

/// Drops every label, free text and the metadata of a credit context (what
/// remains is amount and counts, which Postgres always takes), noting the
/// drop; `None` when there was nothing left to drop.
pub fn strip_context(c: &mut CreditContext) -> Option<Vec<&'static str>> {
    // Metadata that is only our own note of an earlier drop is not the user's.
    let only_note = c
        .metadata
        .as_ref()
        .and_then(Value::as_object)
        .is_some_and(|m| m.len() == 1 && m.contains_key(DROPPED_FIELDS));
    let texts = [
        &c.session_id,
        &c.model,
        &c.provider,
        &c.feature,
        &c.description,
    ];
    if texts.iter().all(|t| t.is_none()) && (c.metadata.is_none() || only_note) {
        return None;
    }
    let mut dropped = Vec::new();
    for (name, v) in [
        ("session_id", &mut c.session_id),
        ("model", &mut c.model),
        ("provider", &mut c.provider),
        ("feature", &mut c.feature),
        ("description", &mut c.description),
    ] {
        if v.take().is_some() {
            dropped.push(name);
        }
    }
    let earlier = dropped_in(c.metadata.as_ref());
    if c.metadata.take().is_some() && !only_note {
        dropped.push("metadata");
    }
    let mut all: Vec<String> = earlier;
    for d in &dropped {
        if !all.iter().any(|a| a == d) {
            all.push(d.to_string());
        }
    }
    c.metadata = Some(note(Map::new(), all));
    Some(dropped)
}

/// The names an earlier drop noted in this metadata.
fn dropped_in(m: Option<&Value>) -> Vec<String> {
    m.and_then(|m| m.get(DROPPED_FIELDS))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter(|s| valid::storable_text(s, TextRule::Label))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn note(mut map: Map<String, Value>, names: Vec<String>) -> Value {
    map.insert(
        DROPPED_FIELDS.to_string(),
        Value::Array(names.into_iter().map(Value::String).collect()),
    );
    Value::Object(map)
}

/// Merges the names into the context's metadata (kept metadata stays, an
/// earlier note is extended). If the merge would make the metadata too large
/// to store, only the note is kept and `metadata` is noted as dropped too.
fn note_dropped(c: &mut CreditContext, dropped: &[&'static str]) {
    if dropped.is_empty() {
        return;
    }
    let mut names = dropped_in(c.metadata.as_ref());
    for d in dropped {
        if !names.iter().any(|n| n == d) {
            names.push(d.to_string());
        }
    }
    let base = match c.metadata.take() {
        Some(Value::Object(m)) => m,
        // Kept metadata is always an object (checked above); anything else
        // would not have been storable.
        _ => Map::new(),
    };
    let merged = note(base, names.clone());
    c.metadata = Some(if valid::storable_metadata(&merged) {
        merged
    } else {
        if !names.iter().any(|n| n == "metadata") {
            names.push("metadata".into());
        }
        note(Map::new(), names)
    });
}

/// A usage event as a message of its own (id and times of the event).
pub(crate) fn usage_member(received_at: &chrono::DateTime<chrono::Utc>, e: UsageEvent) -> Envelope {
    let (id, user, at) = (e.id, e.user_id.clone(), e.occurred_at);
    let mut env = Envelope::new(
        Event::UsageBatch(UsageBatch { events: vec![e] }),
        Some(user),
        at,
    );
    env.id = id;
    env.received_at = *received_at;
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{consume, consumes, model_event, usage};
    use chrono::Utc;
    use common::events::HoldSettled;
    use serde_json::json;
    use uuid::Uuid;

    #[test]
    fn a_usage_event_with_a_nul_or_bad_metadata_leaves_its_group_alone() {
        let good = model_event("a", "gpt", Some(json!({"k": "v"})));
        let nul = model_event("b", "g\0pt", None);
        let meta = model_event("c", "gpt", Some(json!({"k": "\u{0}"})));
        let env = usage(vec![good.clone(), nul.clone(), meta.clone()]);
        let p = prepare(env.clone());
        let clean = p.clean.expect("the good event stays");
        assert_eq!(clean.id, env.id);
        let Event::UsageBatch(b) = &clean.event else {
            panic!("a usage batch")
        };
        assert_eq!(b.events, vec![good]);
        assert_eq!(p.refused.len(), 2);
        for (r, e) in p.refused.iter().zip([&nul, &meta]) {
            assert_eq!(r.env.id, e.id, "the member keeps its own id");
            assert_eq!(r.env.user_id.as_deref(), Some(e.user_id.as_str()));
            assert_eq!(
                r.env.event,
                Event::UsageBatch(UsageBatch {
                    events: vec![e.clone()]
                })
            );
        }
        assert!(
            p.refused[0].reason.contains("model"),
            "{}",
            p.refused[0].reason
        );
        assert!(p.refused[0].reason.contains("U+0000"));
        assert!(
            p.refused[1].reason.contains("metadata"),
            "{}",
            p.refused[1].reason
        );
    }

    #[test]
    fn a_usage_batch_of_only_bad_events_stores_nothing() {
        let p = prepare(usage(vec![model_event("a", "x\u{1b}", None)]));
        assert_eq!(p.clean, None);
        assert_eq!(p.refused.len(), 1);
    }

    #[test]
    fn usage_counts_and_labels_are_checked_by_the_shared_rules() {
        let mut e = model_event("a", "gpt", None);
        assert_eq!(check_usage(&e), Ok(()));
        if let UsageDetail::Model { prompt_tokens, .. } = &mut e.detail {
            *prompt_tokens = valid::MAX_COUNT + 1;
        }
        assert!(check_usage(&e).unwrap_err().starts_with("prompt_tokens"));
        let mut e = model_event("a", "gpt", None);
        if let UsageDetail::Model { latency_ms, .. } = &mut e.detail {
            *latency_ms = Some(-1);
        }
        assert!(check_usage(&e).unwrap_err().starts_with("latency_ms"));
        let mut e = model_event("a", "gpt", None);
        e.session_id = Some("s\ttab".into());
        assert!(check_usage(&e).unwrap_err().starts_with("session_id"));
        let f = UsageEvent {
            detail: UsageDetail::Feature {
                feature: "chat".into(),
                action: Some("a\0".into()),
                duration_ms: Some(1),
            },
            ..model_event("a", "gpt", None)
        };
        assert!(check_usage(&f).unwrap_err().starts_with("action"));
        // Free text in metadata may hold newlines.
        let ok = model_event("a", "gpt", Some(json!({"note": "line 1\nline 2"})));
        assert_eq!(check_usage(&ok), Ok(()));
    }

    #[test]
    fn a_consume_keeps_its_amount_and_notes_what_it_dropped() {
        let mut c = CreditContext {
            model: Some("gpt".into()),
            description: Some("a\0b".into()),
            prompt_tokens: Some(-3),
            completion_tokens: Some(4),
            metadata: Some(json!({"k": "v"})),
            ..Default::default()
        };
        assert_eq!(clean_context(&mut c), vec!["description", "prompt_tokens"]);
        assert_eq!(c.model.as_deref(), Some("gpt"));
        assert_eq!((c.prompt_tokens, c.completion_tokens), (None, Some(4)));
        assert_eq!(
            c.metadata,
            Some(json!({"k": "v", "dropped_fields": ["description", "prompt_tokens"]}))
        );
        // Bad metadata is replaced by the note alone.
        let mut c = CreditContext {
            metadata: Some(json!({"k\u{0}": 1})),
            ..Default::default()
        };
        assert_eq!(clean_context(&mut c), vec!["metadata"]);
        assert_eq!(c.metadata, Some(json!({"dropped_fields": ["metadata"]})));
        // Nothing wrong: nothing changes.
        let mut c = CreditContext {
            description: Some("tab\tand\r\nnewline".into()),
            metadata: Some(json!({"k": "v"})),
            ..Default::default()
        };
        let before = c.clone();
        assert!(clean_context(&mut c).is_empty());
        assert_eq!(c, before);
    }

    #[test]
    fn a_note_that_would_overflow_the_metadata_replaces_it() {
        let big = "x".repeat(valid::MAX_METADATA_BYTES - 20);
        let mut c = CreditContext {
            model: Some("m\0".into()),
            metadata: Some(json!({ "k": big })),
            ..Default::default()
        };
        assert!(valid::storable_metadata(c.metadata.as_ref().unwrap()));
        clean_context(&mut c);
        assert_eq!(
            c.metadata,
            Some(json!({"dropped_fields": ["model", "metadata"]}))
        );
    }

    #[test]
    fn every_money_event_is_cleaned_before_it_is_stored() {
        let bad = CreditContext {
            provider: Some("p\u{7f}".into()),
            ..Default::default()
        };
        let env = consumes(vec![
            consume("a", bad.clone()),
            consume("b", CreditContext::default()),
        ]);
        let Some(Envelope {
            event: Event::CreditConsumeBatch(b),
            ..
        }) = prepare(env).clean
        else {
            panic!("kept")
        };
        assert_eq!(b.consumes[0].consume.amount, 7);
        assert_eq!(b.consumes[0].consume.context.provider, None);
        assert_eq!(
            b.consumes[0].consume.context.metadata,
            Some(json!({"dropped_fields": ["provider"]}))
        );
        assert_eq!(b.consumes[1].consume.context, CreditContext::default());
        let settle: HoldSettled = serde_json::from_value(json!({
            "hold_id": Uuid::new_v4(),
            "transaction_id": Uuid::new_v4(),
            "user_id": "a",
            "held": 10,
            "amount": 4,
            "provider": bad.provider,
        }))
        .unwrap();
        let settle = Envelope::new(Event::HoldSettled(settle), None, Utc::now());
        let p = prepare(settle);
        assert!(p.refused.is_empty());
        let Some(Envelope {
            event: Event::HoldSettled(h),
            ..
        }) = p.clean
        else {
            panic!("kept")
        };
        assert_eq!((h.amount, h.context.provider), (4, None));
    }

    #[test]
    fn stripping_only_our_own_note_changes_nothing() {
        let mut c = CreditContext {
            metadata: Some(json!({"dropped_fields": ["description"]})),
            ..Default::default()
        };
        assert_eq!(strip_context(&mut c), None);
        let mut c = CreditContext {
            feature: Some("f".into()),
            metadata: Some(json!({"dropped_fields": ["description"]})),
            ..Default::default()
        };
        assert_eq!(strip_context(&mut c), Some(vec!["feature"]));
        assert_eq!(
            c.metadata,
            Some(json!({"dropped_fields": ["description", "feature"]}))
        );
    }
}
