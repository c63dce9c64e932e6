//! The `usage_daily` rollup as a plain function: the events new to the
//! once-only guard, summed into cells of (user, day, kind, provider, model,
//! feature, session), which the statement in `usage::store` adds to the
//! table's cells (`on conflict … do update set requests = requests + …`).
//!
//! - The day is the event's `occurred_at` day in UTC, so a replayed event
//!   counts on the day it happened (docs/architecture.md).
//! - A model cell has an empty `feature`, a feature cell an empty `provider`
//!   and `model`; no session is the empty session (the key has no nulls).
//! - A model event adds 1 request and its tokens; a feature event 1 request.
//!   Counts are checked before a write (`sanitize`); sums saturate anyway, so
//!   no value ever panics a batch.
//! - Cells come out sorted by key: concurrent workers then take the rows'
//!   locks in one order and never deadlock on them.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use common::events::{UsageDetail, UsageEvent};

/// One cell's key: (user, day, kind, provider, model, feature, session).
pub type Key = (
    String,
    NaiveDate,
    &'static str,
    String,
    String,
    String,
    String,
);

/// The cells as the statement's arrays, in key order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cells {
    pub user: Vec<String>,
    pub day: Vec<NaiveDate>,
    pub kind: Vec<String>,
    pub provider: Vec<String>,
    pub model: Vec<String>,
    pub feature: Vec<String>,
    pub session: Vec<String>,
    /// Requests.
    pub n: Vec<i64>,
    /// Prompt tokens.
    pub pt: Vec<i64>,
    /// Completion tokens.
    pub ct: Vec<i64>,
}

/// Sums the events into their cells.
pub fn cells(events: &[&UsageEvent]) -> Cells {
    let mut sums: BTreeMap<Key, (i64, i64, i64)> = BTreeMap::new();
    for e in events {
        let day = e.occurred_at.date_naive();
        let session = e.session_id.clone().unwrap_or_default();
        let user = e.user_id.clone();
        match &e.detail {
            UsageDetail::Model {
                provider,
                model,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                let key = (
                    user,
                    day,
                    "model",
                    provider.clone(),
                    model.clone(),
                    String::new(),
                    session,
                );
                let cell = sums.entry(key).or_default();
                cell.0 = cell.0.saturating_add(1);
                cell.1 = cell.1.saturating_add(*prompt_tokens);
                cell.2 = cell.2.saturating_add(*completion_tokens);
            }
            UsageDetail::Feature { feature, .. } => {
                let key = (
                    user,
                    day,
                    "feature",
                    String::new(),
                    String::new(),
                    feature.clone(),
                    session,
                );
                let cell = sums.entry(key).or_default();
                cell.0 = cell.0.saturating_add(1);
            }
        }
    }
    let mut c = Cells::default();
    for ((user, day, kind, provider, model, feature, session), (n, pt, ct)) in sums {
        c.user.push(user);
        c.day.push(day);
        c.kind.push(kind.to_string());
        c.provider.push(provider);
        c.model.push(model);
        c.feature.push(feature);
        c.session.push(session);
        c.n.push(n);
        c.pt.push(pt);
        c.ct.push(ct);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::model_event;
    use chrono::{TimeZone, Utc};

    fn feature_event(user: &str, feature: &str) -> UsageEvent {
        UsageEvent {
            detail: UsageDetail::Feature {
                feature: feature.into(),
                action: Some("open".into()),
                duration_ms: Some(5),
            },
            ..model_event(user, "unused", None)
        }
    }

    fn tokens(e: &mut UsageEvent, p: i64, c: i64) {
        if let UsageDetail::Model {
            prompt_tokens,
            completion_tokens,
            ..
        } = &mut e.detail
        {
            (*prompt_tokens, *completion_tokens) = (p, c);
        }
    }

    #[test]
    fn events_of_one_cell_add_up_their_requests_and_tokens() {
        let mut a = model_event("u", "gpt", None);
        let mut b = model_event("u", "gpt", None);
        b.occurred_at = a.occurred_at;
        tokens(&mut a, 10, 5);
        tokens(&mut b, 7, 1);
        let c = cells(&[&a, &b]);
        assert_eq!((c.n, c.pt, c.ct), (vec![2], vec![17], vec![6]));
        assert_eq!(
            (
                c.kind[0].as_str(),
                c.provider[0].as_str(),
                c.feature[0].as_str()
            ),
            ("model", "openai", "")
        );
        assert_eq!(c.session, vec!["s1".to_string()]);
    }

    #[test]
    fn the_day_is_the_utc_day_the_event_occurred() {
        let mut late = model_event("u", "gpt", None);
        let mut early = model_event("u", "gpt", None);
        late.occurred_at = Utc.with_ymd_and_hms(2024, 3, 1, 23, 59, 59).unwrap();
        early.occurred_at = Utc.with_ymd_and_hms(2024, 3, 2, 0, 0, 0).unwrap();
        // Received today: replayed events still count on their own day.
        let c = cells(&[&early, &late]);
        let day = |d| NaiveDate::from_ymd_opt(2024, 3, d).unwrap();
        assert_eq!(c.day, vec![day(1), day(2)]);
        assert_eq!(c.n, vec![1, 1]);
    }

    #[test]
    fn sessions_models_users_and_kinds_are_cells_of_their_own() {
        let t = Utc::now();
        let mut evs = vec![
            model_event("b", "gpt", None),
            model_event("a", "gpt", None),
            model_event("a", "claude", None),
            feature_event("a", "chat"),
            feature_event("a", "chat"),
            model_event("a", "gpt", None),
        ];
        evs[5].session_id = None;
        for e in &mut evs {
            e.occurred_at = t;
        }
        let refs: Vec<&UsageEvent> = evs.iter().collect();
        let c = cells(&refs);
        // Sorted by key: user, day, kind ("feature" < "model"), provider, model, feature, session.
        assert_eq!(c.user, ["a", "a", "a", "a", "b"]);
        assert_eq!(c.kind, ["feature", "model", "model", "model", "model"]);
        assert_eq!(c.model, ["", "claude", "gpt", "gpt", "gpt"]);
        assert_eq!(c.session, ["s1", "s1", "", "s1", "s1"]);
        assert_eq!(c.n, [2, 1, 1, 1, 1]);
        // A feature cell carries no tokens and no provider.
        assert_eq!(
            (
                c.feature[0].as_str(),
                c.provider[0].as_str(),
                c.pt[0],
                c.ct[0]
            ),
            ("chat", "", 0, 0)
        );
    }

    #[test]
    fn sums_saturate_instead_of_panicking() {
        let mut a = model_event("u", "gpt", None);
        let mut b = model_event("u", "gpt", None);
        b.occurred_at = a.occurred_at;
        tokens(&mut a, i64::MAX, 1);
        tokens(&mut b, i64::MAX, 1);
        let c = cells(&[&a, &b]);
        assert_eq!((c.n[0], c.pt[0], c.ct[0]), (2, i64::MAX, 2));
    }

    #[test]
    fn no_events_no_cells() {
        assert_eq!(cells(&[]), Cells::default());
    }
}
