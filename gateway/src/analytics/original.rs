//! The original backend's extra members of both answers (docs/compatibility.md, "Analytics and
//! usage stats of the original backend"): their types and the plain rules behind them, with
//! no IO — bucket keys, sums per bucket, model and provider, the success rate, the cap on lists.

use std::collections::BTreeMap;

use chrono::{Datelike, Duration, NaiveDateTime};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest list of `modelUsage`, `featureUsage` and `creditHistory`.
pub const LIST_CAP: usize = 100;

/// The cap as SQL's `limit`.
pub(super) const LIST_CAP_SQL: i64 = LIST_CAP as i64;

/// Keeps the first [`LIST_CAP`] entries of a list already ordered newest first.
pub fn capped<T>(mut list: Vec<T>) -> Vec<T> {
    list.truncate(LIST_CAP);
    list
}

/// One entry of `modelUsage`: a model event, as the original listed them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelUsageEntry {
    /// The model, as the event names it.
    pub model_id: String,
    /// Its provider.
    pub provider: String,
    /// Prompt and completion tokens.
    pub tokens_used: i64,
    /// The credits the client reported for it (`costInCredits` of the original's track;
    /// 0 when none). Informational: the ledger is what moved credits.
    pub credits_consumed: f64,
    /// When it happened (RFC 3339, milliseconds).
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// One entry of `featureUsage`: one feature over the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FeatureUsageEntry {
    /// The feature, as the events name it.
    pub feature_name: String,
    /// Its events in the window.
    pub usage_count: i64,
    /// Its newest event (RFC 3339, milliseconds).
    #[schema(format = DateTime)]
    pub last_used_at: String,
}

/// One entry of `creditHistory`: one ledger row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreditHistoryEntry {
    /// Signed credits (negative for a consume).
    pub amount: i64,
    /// The row's description; null when none (or erased).
    #[schema(required = true)]
    pub description: Option<String>,
    /// `grant`, `consume`, `refund` or `adjustment`.
    pub transaction_type: String,
    /// When it was written (RFC 3339, milliseconds).
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// The original's `period` of the stats route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum Period {
    #[serde(rename = "1d")]
    OneDay,
    #[serde(rename = "7d")]
    SevenDays,
    #[serde(rename = "30d")]
    ThirtyDays,
}

impl Period {
    pub const ALL: [Period; 3] = [Self::OneDay, Self::SevenDays, Self::ThirtyDays];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OneDay => "1d",
            Self::SevenDays => "7d",
            Self::ThirtyDays => "30d",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn days(self) -> u32 {
        match self {
            Self::OneDay => 1,
            Self::SevenDays => 7,
            Self::ThirtyDays => 30,
        }
    }
}

/// The original's `groupBy` of the stats route: the timeline's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    Hour,
    Day,
    Week,
}

impl Bucket {
    pub const ALL: [Bucket; 3] = [Self::Hour, Self::Day, Self::Week];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// The timeline key of a UTC time: hour `YYYY-MM-DDTHH:00:00.000Z`, day `YYYY-MM-DD`,
    /// week the date of the Sunday that starts its week. Keys sort as their times do.
    pub fn key(self, t: NaiveDateTime) -> String {
        match self {
            Self::Hour => t.format("%Y-%m-%dT%H:00:00.000Z").to_string(),
            Self::Day => t.format("%Y-%m-%d").to_string(),
            Self::Week => {
                let d = t.date();
                let sunday = d - Duration::days(i64::from(d.weekday().num_days_from_sunday()));
                sunday.format("%Y-%m-%d").to_string()
            }
        }
    }
}

/// The parsed extras of a stats request (present when `period` or `groupBy` is given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalStats {
    pub period: Period,
    pub bucket: Bucket,
}

/// The figures of a timeline bucket, a model or a provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub requests: i64,
    pub tokens: i64,
    pub credits: i64,
    pub errors: i64,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.requests = self.requests.saturating_add(o.requests);
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.credits = self.credits.saturating_add(o.credits);
        self.errors = self.errors.saturating_add(o.errors);
    }
}

/// One entry of `timeline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct TimelineEntry {
    /// The bucket's key (see `groupBy`).
    pub period: String,
    /// Model requests.
    pub requests: i64,
    /// Their prompt and completion tokens.
    pub tokens: i64,
    /// Credits consumed (from the ledger).
    pub credits: i64,
    /// Model requests that reported `success: false`.
    pub errors: i64,
}

/// One entry of `byModel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ModelStats {
    /// The model, as the events name it.
    #[serde(rename = "modelId")]
    pub model_id: String,
    /// Model requests.
    pub requests: i64,
    /// Their prompt and completion tokens.
    pub tokens: i64,
    /// Credits consumed (from the ledger rows naming this model).
    pub credits: i64,
    /// Model requests that reported `success: false`.
    pub errors: i64,
}

/// One entry of `byProvider`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ProviderStats {
    /// The provider, as the events name it.
    pub provider: String,
    /// Model requests.
    pub requests: i64,
    /// Their prompt and completion tokens.
    pub tokens: i64,
    /// Credits consumed (from the ledger rows naming this provider).
    pub credits: i64,
    /// Model requests that reported `success: false`.
    pub errors: i64,
}

/// Model usage of one UTC hour, model and provider (from `model_usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourUsage {
    pub hour: NaiveDateTime,
    pub model: String,
    pub provider: String,
    pub requests: i64,
    pub tokens: i64,
    pub errors: i64,
}

/// Credits consumed in one UTC hour per model and provider (from the ledger; '' = none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourCredits {
    pub hour: NaiveDateTime,
    pub model: String,
    pub provider: String,
    pub credits: i64,
}

/// The original's extra stats members.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsExtras {
    pub timeline: Vec<TimelineEntry>,
    pub by_model: Vec<ModelStats>,
    pub by_provider: Vec<ProviderStats>,
    pub success_rate: f64,
}

/// The success rate in percent, rounded to two decimals: the share of model requests that
/// did not report `success: false`; 0 when there were none.
pub fn success_rate(requests: i64, errors: i64) -> f64 {
    if requests <= 0 {
        return 0.0;
    }
    let ok = (requests - errors.clamp(0, requests)) as f64;
    (ok * 10_000.0 / requests as f64).round() / 100.0
}

/// Sorted by requests (most first), ties by name; the empty name ("none") left out.
fn ranked(map: BTreeMap<&str, Figures>) -> Vec<(String, Figures)> {
    let mut list: Vec<(String, Figures)> = map
        .into_iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, f)| (k.to_string(), f))
        .collect();
    list.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
    list
}

/// Hourly usage and credits folded into `timeline` (buckets with activity, ascending),
/// `byModel`, `byProvider` and the success rate over all model requests.
pub fn shape_extras(bucket: Bucket, usage: &[HourUsage], credits: &[HourCredits]) -> StatsExtras {
    let mut timeline: BTreeMap<String, Figures> = BTreeMap::new();
    let mut models: BTreeMap<&str, Figures> = BTreeMap::new();
    let mut providers: BTreeMap<&str, Figures> = BTreeMap::new();
    let mut all = Figures::default();
    for u in usage {
        let f = Figures {
            requests: u.requests,
            tokens: u.tokens,
            credits: 0,
            errors: u.errors,
        };
        timeline.entry(bucket.key(u.hour)).or_default().add(&f);
        models.entry(&u.model).or_default().add(&f);
        providers.entry(&u.provider).or_default().add(&f);
        all.add(&f);
    }
    for c in credits {
        let f = Figures {
            credits: c.credits,
            ..Figures::default()
        };
        timeline.entry(bucket.key(c.hour)).or_default().add(&f);
        models.entry(&c.model).or_default().add(&f);
        providers.entry(&c.provider).or_default().add(&f);
    }
    StatsExtras {
        timeline: timeline
            .into_iter()
            .filter(|(_, f)| *f != Figures::default())
            .map(|(period, f)| TimelineEntry {
                period,
                requests: f.requests,
                tokens: f.tokens,
                credits: f.credits,
                errors: f.errors,
            })
            .collect(),
        by_model: ranked(models)
            .into_iter()
            .map(|(model_id, f)| ModelStats {
                model_id,
                requests: f.requests,
                tokens: f.tokens,
                credits: f.credits,
                errors: f.errors,
            })
            .collect(),
        by_provider: ranked(providers)
            .into_iter()
            .map(|(provider, f)| ProviderStats {
                provider,
                requests: f.requests,
                tokens: f.tokens,
                credits: f.credits,
                errors: f.errors,
            })
            .collect(),
        success_rate: success_rate(all.requests, all.errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn t(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    #[test]
    fn bucket_keys_are_the_originals_for_hour_day_and_week() {
        let x = t("2024-03-13 17:42:09"); // a Wednesday
        assert_eq!(Bucket::Hour.key(x), "2024-03-13T17:00:00.000Z");
        assert_eq!(Bucket::Day.key(x), "2024-03-13");
        assert_eq!(Bucket::Week.key(x), "2024-03-10");
        // A Sunday is its own week's key; a Saturday belongs to the Sunday before.
        assert_eq!(Bucket::Week.key(t("2024-03-10 00:00:00")), "2024-03-10");
        assert_eq!(Bucket::Week.key(t("2024-03-16 23:59:59")), "2024-03-10");
        assert_eq!(Bucket::Week.key(t("2024-03-17 00:00:00")), "2024-03-17");
        // Across a month and a year.
        assert_eq!(Bucket::Week.key(t("2025-01-02 08:00:00")), "2024-12-29");
        assert_eq!(
            Bucket::Hour.key(t("2024-12-31 23:59:59")),
            "2024-12-31T23:00:00.000Z"
        );
        assert_eq!(Bucket::parse("week"), Some(Bucket::Week));
        assert_eq!(Bucket::parse("month"), None);
        assert_eq!(Period::parse("30d").map(Period::days), Some(30));
        assert_eq!(Period::parse("90d"), None);
        assert_eq!(serde_json::to_value(Period::OneDay).unwrap(), "1d");
        assert_eq!(serde_json::to_value(Bucket::Hour).unwrap(), "hour");
    }

    #[test]
    fn the_success_rate_is_a_percent_with_two_decimals_and_0_without_requests() {
        assert_eq!(success_rate(0, 0), 0.0);
        assert_eq!(success_rate(4, 0), 100.0);
        assert_eq!(success_rate(4, 1), 75.0);
        assert_eq!(success_rate(3, 1), 66.67);
        assert_eq!(success_rate(3, 2), 33.33);
        assert_eq!(success_rate(7, 7), 0.0);
        assert_eq!(success_rate(2, 5), 0.0, "errors never exceed requests");
        assert_eq!(success_rate(i64::MAX, 1), 100.0);
    }

    #[test]
    fn lists_are_capped_at_100() {
        assert_eq!(capped((0..250).collect::<Vec<_>>()).len(), 100);
        assert_eq!(capped((0..250).collect::<Vec<_>>())[99], 99);
        assert_eq!(capped(vec![1, 2]), vec![1, 2]);
        assert_eq!(LIST_CAP_SQL, 100);
    }

    fn usage(h: &str, m: &str, p: &str, n: i64, tok: i64, err: i64) -> HourUsage {
        HourUsage {
            hour: t(h),
            model: m.into(),
            provider: p.into(),
            requests: n,
            tokens: tok,
            errors: err,
        }
    }

    fn credits(h: &str, m: &str, p: &str, c: i64) -> HourCredits {
        HourCredits {
            hour: t(h),
            model: m.into(),
            provider: p.into(),
            credits: c,
        }
    }

    #[test]
    fn extras_sum_per_bucket_model_and_provider_and_leave_out_the_unnamed() {
        let u = vec![
            usage("2024-03-09 10:00:00", "gpt-4o", "openai", 2, 30, 1),
            usage("2024-03-10 10:00:00", "gpt-4o", "openai", 1, 10, 0),
            usage("2024-03-10 11:00:00", "claude", "anthropic", 4, 40, 0),
        ];
        let c = vec![
            credits("2024-03-10 10:00:00", "gpt-4o", "openai", 5),
            credits("2024-03-10 12:00:00", "", "", 2),
        ];
        let day = shape_extras(Bucket::Day, &u, &c);
        assert_eq!(
            v(&day.timeline),
            json!([
                {"period": "2024-03-09", "requests": 2, "tokens": 30, "credits": 0, "errors": 1},
                {"period": "2024-03-10", "requests": 5, "tokens": 50, "credits": 7, "errors": 0},
            ])
        );
        assert_eq!(
            v(&day.by_model),
            json!([
                {"modelId": "claude", "requests": 4, "tokens": 40, "credits": 0, "errors": 0},
                {"modelId": "gpt-4o", "requests": 3, "tokens": 40, "credits": 5, "errors": 1},
            ])
        );
        assert_eq!(
            v(&day.by_provider),
            json!([
                {"provider": "anthropic", "requests": 4, "tokens": 40, "credits": 0, "errors": 0},
                {"provider": "openai", "requests": 3, "tokens": 40, "credits": 5, "errors": 1},
            ])
        );
        assert_eq!(day.success_rate, 85.71);
        let hour = shape_extras(Bucket::Hour, &u, &c);
        let keys: Vec<&str> = hour.timeline.iter().map(|e| e.period.as_str()).collect();
        assert_eq!(
            keys,
            [
                "2024-03-09T10:00:00.000Z",
                "2024-03-10T10:00:00.000Z",
                "2024-03-10T11:00:00.000Z",
                "2024-03-10T12:00:00.000Z"
            ]
        );
        let week = shape_extras(Bucket::Week, &u, &c);
        let keys: Vec<&str> = week.timeline.iter().map(|e| e.period.as_str()).collect();
        assert_eq!(keys, ["2024-03-03", "2024-03-10"]);
        let empty = shape_extras(Bucket::Day, &[], &[]);
        assert!(empty.timeline.is_empty() && empty.by_model.is_empty());
        assert_eq!(empty.success_rate, 0.0);
    }

    fn v<T: Serialize>(x: &T) -> Value {
        serde_json::to_value(x).unwrap()
    }
}
