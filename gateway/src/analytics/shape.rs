//! Rollup rows shaped into the answers of both routes: plain functions over
//! rows already read, so every sum is tested without Postgres.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::original::{
    capped, Bucket, CreditHistoryEntry, FeatureUsageEntry, ModelStats, ModelUsageEntry, Period,
    ProviderStats, StatsExtras, TimelineEntry,
};
use super::{ts, ts_ms, DayWindow, GroupBy, StatsRequest};

/// One rollup aggregate of one of two grouping sets over the window: per
/// (day, kind) when `day` is set (provider, model and feature are then
/// empty), or per (kind, provider, model, feature) over the whole window when
/// it is not. Every event counts once in each set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupRow {
    pub day: Option<NaiveDate>,
    pub kind: String,
    pub provider: String,
    pub model: String,
    pub feature: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// Everything the analytics answer is made of.
#[derive(Debug, Clone, Default)]
pub struct AnalyticsInput {
    pub rows: Vec<RollupRow>,
    /// Credits consumed per day (from the ledger).
    pub credits: Vec<(NaiveDate, i64)>,
    /// Distinct non-empty session ids in the window.
    pub sessions: i64,
    /// Newest settled event behind the figures.
    pub as_of: Option<DateTime<Utc>>,
    /// The original's lists, newest first (docs/compatibility.md).
    pub model_usage: Vec<ModelUsageEntry>,
    pub feature_usage: Vec<FeatureUsageEntry>,
    pub credit_history: Vec<CreditHistoryEntry>,
}

#[derive(Default)]
pub(super) struct ModelSums {
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
}

#[derive(Default, Clone, Copy)]
pub(super) struct DaySums {
    requests: i64,
    total_tokens: i64,
    credits_consumed: i64,
    feature_events: i64,
}

/// The answer of `GET /api/vscode/analytics` (docs/api.md "Analytics"). Kept as JSON in
/// the Redis cache (`analytics::store`): a view that does not read as this type (one cached
/// before a member was added, say) is a miss and recomputed, never served short.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AnalyticsAnswer {
    /// The caller.
    pub user_id: String,
    /// Start of the window's first UTC day (RFC 3339, seconds).
    #[schema(format = DateTime)]
    pub from: String,
    /// Start of the day after the window's last (exclusive; RFC 3339, seconds).
    #[schema(format = DateTime)]
    pub to: String,
    /// When the figures were computed (RFC 3339, milliseconds).
    #[schema(format = DateTime)]
    pub generated_at: String,
    /// The newest settled event behind the figures (RFC 3339, milliseconds); null when none.
    #[schema(format = DateTime, required = true)]
    pub as_of: Option<String>,
    /// Sums over the window.
    pub totals: AnalyticsTotals,
    /// Model requests per provider and model, most requests first.
    pub by_model: Vec<ModelFigures>,
    /// Model requests per provider, most requests first.
    pub by_provider: Vec<ProviderFigures>,
    /// Feature events per feature, most events first.
    pub by_feature: Vec<FeatureFigures>,
    /// One entry per day of the window, oldest first, days without activity included.
    pub daily: Vec<DayFigures>,
    /// The totals under the original client's names (§5.10).
    pub summary: AnalyticsSummary,
    /// The window's model events, newest first, at most 100 (the original's; docs/compatibility.md).
    #[serde(rename = "modelUsage")]
    pub model_usage: Vec<ModelUsageEntry>,
    /// The window's features by their newest event, newest first, at most 100.
    #[serde(rename = "featureUsage")]
    pub feature_usage: Vec<FeatureUsageEntry>,
    /// The window's ledger rows, newest first, at most 100.
    #[serde(rename = "creditHistory")]
    pub credit_history: Vec<CreditHistoryEntry>,
}

/// `totals` of the analytics answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AnalyticsTotals {
    /// Model requests.
    pub requests: i64,
    /// Prompt tokens of the model requests.
    pub prompt_tokens: i64,
    /// Completion tokens of the model requests.
    pub completion_tokens: i64,
    /// Prompt and completion tokens.
    pub total_tokens: i64,
    /// Credits consumed (from the ledger).
    pub credits_consumed: i64,
    /// Feature events.
    pub feature_events: i64,
    /// Distinct sessions with activity.
    pub sessions: i64,
}

/// One entry of `by_model`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelFigures {
    /// The provider, as the events name it.
    pub provider: String,
    /// The model, as the events name it.
    pub model: String,
    /// Requests to this model.
    pub requests: i64,
    /// Their prompt tokens.
    pub prompt_tokens: i64,
    /// Their completion tokens.
    pub completion_tokens: i64,
}

/// One entry of `by_provider`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProviderFigures {
    /// The provider, as the events name it.
    pub provider: String,
    /// Requests to its models.
    pub requests: i64,
    /// Their prompt and completion tokens.
    pub total_tokens: i64,
}

/// One entry of `by_feature`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FeatureFigures {
    /// The feature, as the events name it.
    pub feature: String,
    /// Its events.
    pub events: i64,
}

/// One entry of `daily`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DayFigures {
    /// The UTC day (`YYYY-MM-DD`).
    #[schema(format = Date)]
    pub date: String,
    /// Model requests that day.
    pub requests: i64,
    /// Their prompt and completion tokens.
    pub total_tokens: i64,
    /// Credits consumed that day.
    pub credits_consumed: i64,
    /// Feature events that day.
    pub feature_events: i64,
}

/// `summary` of the analytics answer (original client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AnalyticsSummary {
    /// Model requests.
    #[serde(rename = "totalRequests")]
    pub total_requests: i64,
    /// Prompt and completion tokens.
    #[serde(rename = "totalTokens")]
    pub total_tokens: i64,
    /// Credits consumed.
    #[serde(rename = "totalCreditsUsed")]
    pub total_credits_used: i64,
    /// Distinct model names.
    #[serde(rename = "uniqueModels")]
    pub unique_models: i64,
    /// Distinct features.
    #[serde(rename = "uniqueFeatures")]
    pub unique_features: i64,
}

/// The docs/api.md "Analytics" body plus `summary` (§5.10) and `as_of` (§8).
///
/// Lists are ordered for stable answers: `by_model`/`by_provider` by requests
/// (most first), `by_feature` by events, ties by name; `daily` has one entry
/// per day of the window, oldest first, zero days included.
pub fn shape_analytics(
    user_id: &str,
    window: DayWindow,
    input: &AnalyticsInput,
    generated_at: DateTime<Utc>,
) -> AnalyticsAnswer {
    let mut by_model: BTreeMap<(&str, &str), ModelSums> = BTreeMap::new();
    let mut by_feature: BTreeMap<&str, i64> = BTreeMap::new();
    let mut daily: BTreeMap<NaiveDate, DaySums> =
        window.days().map(|d| (d, DaySums::default())).collect();
    for r in &input.rows {
        let model = r.kind == "model";
        match r.day {
            Some(d) => {
                let day = daily.entry(d).or_default();
                if model {
                    day.requests = day.requests.saturating_add(r.requests);
                    day.total_tokens = day
                        .total_tokens
                        .saturating_add(r.prompt_tokens.saturating_add(r.completion_tokens));
                } else {
                    day.feature_events = day.feature_events.saturating_add(r.requests);
                }
            }
            None if model => {
                let m = by_model.entry((&r.provider, &r.model)).or_default();
                m.requests = m.requests.saturating_add(r.requests);
                m.prompt_tokens = m.prompt_tokens.saturating_add(r.prompt_tokens);
                m.completion_tokens = m.completion_tokens.saturating_add(r.completion_tokens);
            }
            None => {
                let e = by_feature.entry(&r.feature).or_default();
                *e = e.saturating_add(r.requests);
            }
        }
    }
    for (d, c) in &input.credits {
        let day = daily.entry(*d).or_default();
        day.credits_consumed = day.credits_consumed.saturating_add(*c);
    }
    let mut by_provider: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for ((p, _), m) in &by_model {
        let e = by_provider.entry(p).or_default();
        e.0 = e.0.saturating_add(m.requests);
        e.1 =
            e.1.saturating_add(m.prompt_tokens.saturating_add(m.completion_tokens));
    }
    let requests: i64 = by_model
        .values()
        .map(|m| m.requests)
        .fold(0, i64::saturating_add);
    let prompt_tokens: i64 = by_model
        .values()
        .map(|m| m.prompt_tokens)
        .fold(0, i64::saturating_add);
    let completion_tokens: i64 = by_model
        .values()
        .map(|m| m.completion_tokens)
        .fold(0, i64::saturating_add);
    let total_tokens = prompt_tokens.saturating_add(completion_tokens);
    let credits_consumed: i64 = input
        .credits
        .iter()
        .map(|(_, c)| *c)
        .fold(0, i64::saturating_add);
    let feature_events: i64 = by_feature.values().copied().fold(0, i64::saturating_add);
    let unique_models = by_model
        .keys()
        .map(|(_, m)| *m)
        .collect::<BTreeSet<_>>()
        .len();

    let mut models: Vec<_> = by_model.into_iter().collect();
    models.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
    let mut providers: Vec<_> = by_provider.into_iter().collect();
    providers.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
    let mut features: Vec<_> = by_feature.into_iter().collect();
    features.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let unique_features = features.len();

    AnalyticsAnswer {
        user_id: user_id.to_string(),
        from: ts(window.from()),
        to: ts(window.to()),
        generated_at: ts_ms(generated_at),
        as_of: input.as_of.map(ts_ms),
        totals: AnalyticsTotals {
            requests,
            prompt_tokens,
            completion_tokens,
            total_tokens,
            credits_consumed,
            feature_events,
            sessions: input.sessions,
        },
        by_model: models
            .iter()
            .map(|((p, m), s)| ModelFigures {
                provider: p.to_string(),
                model: m.to_string(),
                requests: s.requests,
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
            })
            .collect(),
        by_provider: providers
            .iter()
            .map(|(p, (n, t))| ProviderFigures {
                provider: p.to_string(),
                requests: *n,
                total_tokens: *t,
            })
            .collect(),
        by_feature: features
            .iter()
            .map(|(f, n)| FeatureFigures {
                feature: f.to_string(),
                events: *n,
            })
            .collect(),
        daily: daily
            .iter()
            .map(|(d, s)| DayFigures {
                date: d.format("%Y-%m-%d").to_string(),
                requests: s.requests,
                total_tokens: s.total_tokens,
                credits_consumed: s.credits_consumed,
                feature_events: s.feature_events,
            })
            .collect(),
        summary: AnalyticsSummary {
            total_requests: requests,
            total_tokens,
            total_credits_used: credits_consumed,
            unique_models: unique_models as i64,
            unique_features: unique_features as i64,
        },
        model_usage: capped(input.model_usage.clone()),
        feature_usage: capped(input.feature_usage.clone()),
        credit_history: capped(input.credit_history.clone()),
    }
}

/// Usage figures of one stats key (from the rollup).
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct StatsUsageRow {
    pub key: Option<String>,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub feature_events: i64,
}

/// The figures of one stats row, and their sums (`totals`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct StatsFigures {
    /// Model requests.
    pub requests: i64,
    /// Prompt tokens of the model requests.
    pub prompt_tokens: i64,
    /// Completion tokens of the model requests.
    pub completion_tokens: i64,
    /// Credits consumed (from the ledger).
    pub credits_consumed: i64,
    /// Feature events.
    pub feature_events: i64,
    /// In `totals`, with `period` or `groupBy` only: the percent of model requests that did
    /// not report `success: false`, two decimals, 0 without requests (docs/compatibility.md).
    #[serde(rename = "successRate", skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
}

/// The answer of `GET /api/users/{id}/usage/stats` (docs/api.md "Usage statistics").
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StatsAnswer {
    /// The user the figures are of.
    pub user_id: String,
    /// Start of the window's first UTC day (RFC 3339, seconds).
    #[schema(format = DateTime)]
    pub from: String,
    /// Start of the day after the window's last (exclusive; RFC 3339, seconds).
    #[schema(format = DateTime)]
    pub to: String,
    /// What the rows are keyed by.
    pub group_by: GroupBy,
    /// One row per key with activity, ordered by key, the null key last.
    pub rows: Vec<StatsRow>,
    /// The sums of the rows (with `group_by=model`, also of what names no model).
    pub totals: StatsFigures,
    /// With `period` or `groupBy` only (docs/compatibility.md): `period` as given, or `7d`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    /// With `period` or `groupBy` only: `groupBy` as given, or `day`.
    #[serde(rename = "groupBy", skip_serializing_if = "Option::is_none")]
    pub bucket: Option<Bucket>,
    /// With `period` or `groupBy` only: model requests, tokens, credits and errors per
    /// bucket with activity, ascending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Vec<TimelineEntry>>,
    /// With `period` or `groupBy` only: per model, most requests first.
    #[serde(rename = "byModel", skip_serializing_if = "Option::is_none")]
    pub by_model: Option<Vec<ModelStats>>,
    /// With `period` or `groupBy` only: per provider, most requests first.
    #[serde(rename = "byProvider", skip_serializing_if = "Option::is_none")]
    pub by_provider: Option<Vec<ProviderStats>>,
}

/// One row of the stats answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct StatsRow {
    /// The day (`YYYY-MM-DD`), model, provider, feature or session id; null for what has
    /// none (events without a session, ...; never with `group_by=model`, whose rows are models).
    #[schema(required = true)]
    pub key: Option<String>,
    /// Model requests.
    pub requests: i64,
    /// Prompt tokens of the model requests.
    pub prompt_tokens: i64,
    /// Completion tokens of the model requests.
    pub completion_tokens: i64,
    /// Credits consumed (from the ledger).
    pub credits_consumed: i64,
    /// Feature events.
    pub feature_events: i64,
}

impl StatsRow {
    fn new(key: Option<&str>, f: &StatsFigures) -> Self {
        Self {
            key: key.map(str::to_string),
            requests: f.requests,
            prompt_tokens: f.prompt_tokens,
            completion_tokens: f.completion_tokens,
            credits_consumed: f.credits_consumed,
            feature_events: f.feature_events,
        }
    }
}

impl StatsFigures {
    fn add(&mut self, o: &StatsFigures) {
        self.requests = self.requests.saturating_add(o.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.credits_consumed = self.credits_consumed.saturating_add(o.credits_consumed);
        self.feature_events = self.feature_events.saturating_add(o.feature_events);
    }
}

/// The docs/api.md "Usage statistics" body. Rows merge the rollup's and the ledger's figures by
/// key; `key` is null for what has no such attribute (events without a session, ...), so rows
/// sum to the totals — except with `group_by=model`, whose rows are models only: what names
/// no model (feature events, ...) counts in the totals without a row (docs/compatibility.md).
/// Rows are ordered by key (null last); only keys with activity appear. `extras` are the
/// original's members, given with `period` or `groupBy`.
pub fn shape_stats(
    user_id: &str,
    req: StatsRequest,
    usage: &[StatsUsageRow],
    credits: &[(Option<String>, i64)],
    extras: Option<StatsExtras>,
) -> StatsAnswer {
    let mut rows: HashMap<Option<&str>, StatsFigures> = HashMap::new();
    for u in usage {
        rows.entry(u.key.as_deref())
            .or_default()
            .add(&StatsFigures {
                requests: u.requests,
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                credits_consumed: 0,
                feature_events: u.feature_events,
                success_rate: None,
            });
    }
    for (k, c) in credits {
        let row = rows.entry(k.as_deref()).or_default();
        row.credits_consumed = row.credits_consumed.saturating_add(*c);
    }
    let mut rows: Vec<(Option<&str>, StatsFigures)> = rows
        .into_iter()
        .filter(|(_, f)| *f != StatsFigures::default())
        .collect();
    rows.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    let mut totals = StatsFigures::default();
    for (_, f) in &rows {
        totals.add(f);
    }
    if req.group_by == GroupBy::Model {
        rows.retain(|(k, _)| k.is_some());
    }
    totals.success_rate = extras.as_ref().map(|e| e.success_rate);
    let original = req.original;
    let (timeline, by_model, by_provider) = match extras {
        Some(e) => (Some(e.timeline), Some(e.by_model), Some(e.by_provider)),
        None => (None, None, None),
    };
    StatsAnswer {
        user_id: user_id.to_string(),
        from: ts(req.window.from()),
        to: ts(req.window.to()),
        group_by: req.group_by,
        rows: rows.iter().map(|(k, f)| StatsRow::new(*k, f)).collect(),
        totals,
        period: original.map(|o| o.period),
        bucket: original.map(|o| o.bucket),
        timeline,
        by_model,
        by_provider,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use serde_json::{json, Value};

    fn value<T: Serialize>(t: T) -> Value {
        serde_json::to_value(t).unwrap()
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        day: &str,
        kind: &str,
        p: &str,
        m: &str,
        f: &str,
        n: i64,
        pt: i64,
        ct: i64,
    ) -> RollupRow {
        RollupRow {
            day: Some(d(day)),
            kind: kind.into(),
            provider: p.into(),
            model: m.into(),
            feature: f.into(),
            requests: n,
            prompt_tokens: pt,
            completion_tokens: ct,
        }
    }

    /// What the SQL's grouping sets make of rollup cells.
    fn grouping_sets(cells: Vec<RollupRow>) -> Vec<RollupRow> {
        let mut out: Vec<RollupRow> = Vec::new();
        for c in cells {
            let per_day = RollupRow {
                provider: String::new(),
                model: String::new(),
                feature: String::new(),
                ..c.clone()
            };
            let per_attr = RollupRow { day: None, ..c };
            for cell in [per_day, per_attr] {
                match out.iter_mut().find(|o| {
                    (&o.day, &o.kind, &o.provider, &o.model, &o.feature)
                        == (
                            &cell.day,
                            &cell.kind,
                            &cell.provider,
                            &cell.model,
                            &cell.feature,
                        )
                }) {
                    Some(o) => {
                        o.requests += cell.requests;
                        o.prompt_tokens += cell.prompt_tokens;
                        o.completion_tokens += cell.completion_tokens;
                    }
                    None => out.push(cell),
                }
            }
        }
        out
    }

    #[test]
    fn analytics_sum_models_providers_features_and_days() {
        let w = DayWindow {
            first: d("2024-03-08"),
            last: d("2024-03-10"),
        };
        let input = AnalyticsInput {
            rows: grouping_sets(vec![
                row("2024-03-08", "model", "openai", "gpt-4o", "", 2, 100, 10),
                row("2024-03-10", "model", "openai", "gpt-4o", "", 1, 50, 5),
                row("2024-03-10", "model", "openai", "gpt-4o-mini", "", 3, 30, 3),
                row("2024-03-10", "model", "anthropic", "claude", "", 1, 7, 1),
                row("2024-03-10", "feature", "", "", "chat", 4, 0, 0),
                row("2024-03-08", "feature", "", "", "edit", 1, 0, 0),
            ]),
            credits: vec![(d("2024-03-08"), 5), (d("2024-03-09"), 2)],
            sessions: 2,
            as_of: Some(at("2024-03-10T12:00:00Z")),
            ..AnalyticsInput::default()
        };
        let v = value(shape_analytics("u1", w, &input, at("2024-03-10T13:00:00Z")));
        assert_eq!(v["from"], "2024-03-08T00:00:00Z");
        assert_eq!(v["to"], "2024-03-11T00:00:00Z");
        assert_eq!(v["as_of"], "2024-03-10T12:00:00.000Z");
        assert_eq!(
            v["totals"],
            json!({"requests": 7, "prompt_tokens": 187, "completion_tokens": 19, "total_tokens": 206,
                   "credits_consumed": 7, "feature_events": 5, "sessions": 2})
        );
        assert_eq!(
            v["by_model"],
            json!([
                {"provider": "openai", "model": "gpt-4o", "requests": 3, "prompt_tokens": 150, "completion_tokens": 15},
                {"provider": "openai", "model": "gpt-4o-mini", "requests": 3, "prompt_tokens": 30, "completion_tokens": 3},
                {"provider": "anthropic", "model": "claude", "requests": 1, "prompt_tokens": 7, "completion_tokens": 1},
            ])
        );
        assert_eq!(
            v["by_provider"],
            json!([{"provider": "openai", "requests": 6, "total_tokens": 198},
                   {"provider": "anthropic", "requests": 1, "total_tokens": 8}])
        );
        assert_eq!(
            v["by_feature"],
            json!([{"feature": "chat", "events": 4}, {"feature": "edit", "events": 1}])
        );
        assert_eq!(
            v["daily"],
            json!([
                {"date": "2024-03-08", "requests": 2, "total_tokens": 110, "credits_consumed": 5, "feature_events": 1},
                {"date": "2024-03-09", "requests": 0, "total_tokens": 0, "credits_consumed": 2, "feature_events": 0},
                {"date": "2024-03-10", "requests": 5, "total_tokens": 96, "credits_consumed": 0, "feature_events": 4},
            ])
        );
        assert_eq!(
            v["summary"],
            json!({"totalRequests": 7, "totalTokens": 206, "totalCreditsUsed": 7,
                   "uniqueModels": 3, "uniqueFeatures": 2})
        );
    }

    #[test]
    fn an_empty_window_has_zero_days_and_no_as_of() {
        let w = DayWindow::last_days(7, at("2024-03-10T00:00:00Z"));
        let v = value(shape_analytics(
            "u",
            w,
            &AnalyticsInput::default(),
            at("2024-03-10T00:00:00Z"),
        ));
        assert_eq!(v["daily"].as_array().unwrap().len(), 7);
        assert_eq!(v["totals"]["requests"], 0);
        assert!(v["as_of"].is_null());
        assert_eq!(v["by_model"], json!([]));
        let members: Vec<&String> = v.as_object().unwrap().keys().collect();
        let want = [
            "as_of",
            "by_feature",
            "by_model",
            "by_provider",
            "creditHistory",
            "daily",
            "featureUsage",
            "from",
            "generated_at",
            "modelUsage",
            "summary",
            "to",
            "totals",
            "user_id",
        ];
        assert_eq!(members, want);
        assert_eq!(v["daily"][0].as_object().unwrap().len(), 5);
    }

    #[test]
    fn stats_rows_merge_usage_and_credits_by_key_and_sum_to_the_totals() {
        let req = StatsRequest {
            window: DayWindow {
                first: d("2024-03-01"),
                last: d("2024-03-02"),
            },
            group_by: GroupBy::Model,
            original: None,
        };
        let usage = vec![
            StatsUsageRow {
                key: Some("gpt-4o".into()),
                requests: 2,
                prompt_tokens: 20,
                completion_tokens: 4,
                feature_events: 0,
            },
            StatsUsageRow {
                key: None,
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                feature_events: 3,
            },
        ];
        let credits = vec![
            (Some("claude".into()), 9),
            (Some("gpt-4o".into()), 5),
            (None, 1),
        ];
        let v = value(shape_stats("u", req, &usage, &credits, None));
        assert_eq!(v["group_by"], "model");
        assert_eq!(v["from"], "2024-03-01T00:00:00Z");
        assert_eq!(v["to"], "2024-03-03T00:00:00Z");
        assert_eq!(
            v["rows"],
            json!([
                {"key": "claude", "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "credits_consumed": 9, "feature_events": 0},
                {"key": "gpt-4o", "requests": 2, "prompt_tokens": 20, "completion_tokens": 4, "credits_consumed": 5, "feature_events": 0},
            ]),
            "models only: what names none has no row"
        );
        assert_eq!(
            v["totals"],
            json!({"requests": 2, "prompt_tokens": 20, "completion_tokens": 4, "credits_consumed": 15, "feature_events": 3}),
            "but counts in the totals"
        );
        for absent in ["period", "groupBy", "timeline", "byModel", "byProvider"] {
            assert!(v.get(absent).is_none(), "{absent}");
        }
        // Other groupings keep their null key, and rows sum to the totals.
        let by_session = StatsRequest {
            group_by: GroupBy::Session,
            ..req
        };
        let v = value(shape_stats("u", by_session, &usage, &credits, None));
        assert_eq!(v["rows"].as_array().unwrap().len(), 3);
        assert!(v["rows"][2]["key"].is_null());
    }

    #[test]
    fn the_originals_members_are_added_with_period_or_group_by() {
        use super::super::original::{shape_extras, HourUsage, OriginalStats};
        let req = StatsRequest {
            window: DayWindow::last_days(7, at("2024-03-10T10:00:00Z")),
            group_by: GroupBy::Day,
            original: Some(OriginalStats {
                period: Period::SevenDays,
                bucket: Bucket::Hour,
            }),
        };
        let hour = chrono::NaiveDate::from_ymd_opt(2024, 3, 10)
            .unwrap()
            .and_hms_opt(9, 0, 0)
            .unwrap();
        let usage = [HourUsage {
            hour,
            model: "gpt-4o".into(),
            provider: "openai".into(),
            requests: 3,
            tokens: 30,
            errors: 1,
        }];
        let extras = shape_extras(Bucket::Hour, &usage, &[]);
        let v = value(shape_stats("u", req, &[], &[], Some(extras)));
        assert_eq!(v["period"], "7d");
        assert_eq!(v["groupBy"], "hour");
        assert_eq!(v["group_by"], "day");
        assert_eq!(v["totals"]["successRate"], 66.67);
        assert_eq!(
            v["timeline"],
            json!([{"period": "2024-03-10T09:00:00.000Z", "requests": 3, "tokens": 30, "credits": 0, "errors": 1}])
        );
        assert_eq!(v["byModel"][0]["modelId"], "gpt-4o");
        assert_eq!(v["byProvider"][0]["provider"], "openai");
    }
}
