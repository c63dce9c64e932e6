//! The query strings of `GET /api/vscode/analytics` and `GET /api/usage/stats`,
//! parsed into windows and groupings; a bad value is a 422 naming its parameter.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::openapi::{Object, ObjectBuilder, Type};

use super::original::{Bucket, OriginalStats, Period};
use super::{DayWindow, DEFAULT_DAYS, MAX_DAYS, MAX_STATS_SPAN_DAYS};
use crate::error::{Error, Result};

/// Raw query of `GET /api/vscode/analytics`: strings, so a bad value is a 422
/// that names its parameter rather than a generic deserialization error. The
/// document states the values [`AnalyticsQuery::days`] accepts.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AnalyticsQuery {
    /// Days of the window, today included; wins over `timeframe`.
    #[param(schema_with = days_schema)]
    pub days: Option<String>,
    /// The original client's `1d|7d|30d` (docs/compatibility.md).
    #[param(schema_with = timeframe_schema)]
    pub timeframe: Option<String>,
}

/// `timeframe` values and their days.
pub const TIMEFRAMES: [(&str, u32); 3] = [("1d", 1), ("7d", 7), ("30d", 30)];

fn days_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .maximum(Some(MAX_DAYS))
        .default(Some(DEFAULT_DAYS.into()))
        .build()
}

fn timeframe_schema() -> Object {
    let names = TIMEFRAMES.map(|(name, _)| name);
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(names))
        .build()
}

impl AnalyticsQuery {
    /// The number of days asked for; `days` wins when both are given.
    pub fn days(&self) -> Result<u32> {
        if let Some(d) = &self.days {
            return match d.trim().parse::<u32>() {
                Ok(n) if (1..=MAX_DAYS).contains(&n) => Ok(n),
                _ => Err(Error::validation(
                    "days",
                    format!("must be an integer from 1 to {MAX_DAYS}"),
                )),
            };
        }
        match self.timeframe.as_deref() {
            None => Ok(DEFAULT_DAYS),
            Some(t) => TIMEFRAMES
                .iter()
                .find(|(name, _)| *name == t)
                .map(|(_, days)| *days)
                .ok_or_else(|| Error::validation("timeframe", "must be one of 1d, 7d, 30d")),
        }
    }
}

/// `group_by` of the stats route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Day,
    Model,
    Provider,
    Feature,
    Session,
}

impl GroupBy {
    pub const ALL: [GroupBy; 5] = [
        Self::Day,
        Self::Model,
        Self::Provider,
        Self::Feature,
        Self::Session,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Model => "model",
            Self::Provider => "provider",
            Self::Feature => "feature",
            Self::Session => "session",
        }
    }

    /// The key column in both rollups ('' means "none" there).
    pub(super) fn key_column(self) -> &'static str {
        match self {
            Self::Day => "to_char(day, 'YYYY-MM-DD')",
            Self::Model => "nullif(model, '')",
            Self::Provider => "nullif(provider, '')",
            Self::Feature => "nullif(feature, '')",
            Self::Session => "nullif(session_id, '')",
        }
    }
}

/// Raw query of `GET /api/users/:id/usage/stats` (strings, parsed by [`StatsQuery::parse`]).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// An RFC 3339 time or a `YYYY-MM-DD` date (that day's start); default: 30 days before `to`.
    #[param(schema_with = instant_schema)]
    pub from: Option<String>,
    /// An RFC 3339 time or a `YYYY-MM-DD` date (that whole day included); default: now.
    #[param(schema_with = instant_schema)]
    pub to: Option<String>,
    /// What the rows are keyed by; default `day`.
    #[param(schema_with = group_by_schema)]
    pub group_by: Option<String>,
    /// The original's `1d|7d|30d` (default `7d`): the last N UTC days, today included, unless
    /// `from` or `to` is given (they win). Adds the original's members (docs/compatibility.md).
    #[param(schema_with = period_schema)]
    pub period: Option<String>,
    /// The original's timeline bucket, `hour|day|week` (default `day`); not `group_by`.
    /// Adds the original's members (docs/compatibility.md).
    #[serde(rename = "groupBy")]
    #[param(schema_with = bucket_schema)]
    pub bucket: Option<String>,
}

fn period_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(Period::ALL.map(Period::as_str)))
        .default(Some(Period::SevenDays.as_str().into()))
        .build()
}

fn bucket_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(Bucket::ALL.map(Bucket::as_str)))
        .default(Some(Bucket::Day.as_str().into()))
        .build()
}

/// `from`/`to`: a time or a date, so no `format` (either would refuse the other).
fn instant_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .build()
}

fn group_by_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(GroupBy::ALL.map(GroupBy::as_str)))
        .default(Some(GroupBy::Day.as_str().into()))
        .build()
}

/// A parsed stats request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsRequest {
    pub window: DayWindow,
    pub group_by: GroupBy,
    /// `period`/`groupBy` as parsed (defaults filled in), when either was given.
    pub original: Option<OriginalStats>,
}

/// `from`/`to` as RFC 3339 or a plain date. A date `from` is the start of
/// that day; a date `to` includes that whole day.
pub(super) fn parse_instant(field: &str, s: &str, is_to: bool) -> Result<DateTime<Utc>> {
    let s = s.trim();
    let in_range = |t: DateTime<Utc>| {
        common::valid::check_time(t).map_err(|reason| Error::validation(field, reason))
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return in_range(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        // Checked before any arithmetic: chrono panics past its own range.
        common::valid::check_date(d).map_err(|reason| Error::validation(field, reason))?;
        let d = if is_to { d.succ_opt() } else { Some(d) };
        if let Some(d) = d {
            return Ok(d.and_time(NaiveTime::MIN).and_utc());
        }
    }
    Err(Error::validation(
        field,
        "must be an RFC 3339 time or a YYYY-MM-DD date",
    ))
}

impl StatsQuery {
    /// The original's `period`/`groupBy`, when either is given (docs/compatibility.md).
    fn original(&self) -> Result<Option<OriginalStats>> {
        if self.period.is_none() && self.bucket.is_none() {
            return Ok(None);
        }
        let period = match self.period.as_deref() {
            None => Period::SevenDays,
            Some(p) => Period::parse(p)
                .ok_or_else(|| Error::validation("period", "must be one of 1d, 7d, 30d"))?,
        };
        let bucket = match self.bucket.as_deref() {
            None => Bucket::Day,
            Some(b) => Bucket::parse(b)
                .ok_or_else(|| Error::validation("groupBy", "must be one of hour, day, week"))?,
        };
        Ok(Some(OriginalStats { period, bucket }))
    }

    /// Validates the query against `now`. The answer covers whole UTC days:
    /// every day that `[from, to)` touches (see docs/analytics.md). With `period` and
    /// neither `from` nor `to`, the window is the period's last days, today included.
    pub fn parse(&self, now: DateTime<Utc>) -> Result<StatsRequest> {
        let original = self.original()?;
        if let (Some(o), None, None) = (original, &self.from, &self.to) {
            return Ok(StatsRequest {
                window: DayWindow::last_days(o.period.days(), now),
                group_by: self.group_by()?,
                original,
            });
        }
        let mut req = self.parse_window(now)?;
        req.original = original;
        Ok(req)
    }

    fn group_by(&self) -> Result<GroupBy> {
        match self.group_by.as_deref() {
            None => Ok(GroupBy::Day),
            Some(g) => GroupBy::parse(g).ok_or_else(|| {
                Error::validation(
                    "group_by",
                    "must be one of day, model, provider, feature, session",
                )
            }),
        }
    }

    fn parse_window(&self, now: DateTime<Utc>) -> Result<StatsRequest> {
        let group_by = self.group_by()?;
        let to = match &self.to {
            Some(s) => parse_instant("to", s, true)?,
            None => now,
        };
        let from = match &self.from {
            Some(s) => parse_instant("from", s, false)?,
            // The last 30 days: the same window as the analytics default.
            None => {
                let last = last_day_of(to - Duration::microseconds(1), to);
                (last - Duration::days(i64::from(DEFAULT_DAYS) - 1))
                    .and_time(NaiveTime::MIN)
                    .and_utc()
            }
        };
        if to < from {
            return Err(Error::validation("to", "must not be before `from`"));
        }
        if to - from > Duration::days(MAX_STATS_SPAN_DAYS) {
            return Err(Error::validation(
                "to",
                format!("the span from `from` to `to` must be at most {MAX_STATS_SPAN_DAYS} days"),
            ));
        }
        Ok(StatsRequest {
            window: DayWindow {
                first: from.date_naive(),
                last: last_day_of(from, to),
            },
            group_by,
            original: None,
        })
    }
}

/// The day of the last instant of `[from, to)` (the day of `from` when empty).
pub(super) fn last_day_of(from: DateTime<Utc>, to: DateTime<Utc>) -> NaiveDate {
    if to > from {
        (to - Duration::microseconds(1)).date_naive()
    } else {
        from.date_naive()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn days_and_timeframe_parse_and_bad_values_name_their_parameter() {
        let q = |days: Option<&str>, tf: Option<&str>| AnalyticsQuery {
            days: days.map(Into::into),
            timeframe: tf.map(Into::into),
        };
        assert_eq!(q(None, None).days().unwrap(), 30);
        assert_eq!(q(Some("365"), None).days().unwrap(), 365);
        assert_eq!(q(None, Some("7d")).days().unwrap(), 7);
        assert_eq!(q(None, Some("1d")).days().unwrap(), 1);
        assert_eq!(q(Some("2"), Some("30d")).days().unwrap(), 2);
        for bad in ["0", "366", "-1", "abc", "", "1.5"] {
            match q(Some(bad), None).days() {
                Err(Error::Validation { field, .. }) => assert_eq!(field, "days"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        match q(None, Some("90d")).days() {
            Err(Error::Validation { field, .. }) => assert_eq!(field, "timeframe"),
            other => panic!("{other:?}"),
        }
    }

    fn stats_q(from: Option<&str>, to: Option<&str>, g: Option<&str>) -> StatsQuery {
        StatsQuery {
            from: from.map(Into::into),
            to: to.map(Into::into),
            group_by: g.map(Into::into),
            ..StatsQuery::default()
        }
    }

    fn field_of(r: Result<StatsRequest>) -> String {
        match r {
            Err(Error::Validation { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stats_windows_default_to_the_last_30_days_and_widen_to_whole_days() {
        let now = at("2024-03-10T15:00:00Z");
        let r = stats_q(None, None, None).parse(now).unwrap();
        assert_eq!(r.group_by, GroupBy::Day);
        assert_eq!(r.window, DayWindow::last_days(30, now));
        let r = stats_q(Some("2024-03-01"), Some("2024-03-05"), Some("model"))
            .parse(now)
            .unwrap();
        assert_eq!(r.group_by, GroupBy::Model);
        assert_eq!(
            (r.window.first, r.window.last),
            (d("2024-03-01"), d("2024-03-05"))
        );
        let r = stats_q(
            Some("2024-03-01T10:00:00Z"),
            Some("2024-03-03T00:00:00Z"),
            None,
        )
        .parse(now)
        .unwrap();
        assert_eq!(
            (r.window.first, r.window.last),
            (d("2024-03-01"), d("2024-03-02"))
        );
        let r = stats_q(
            Some("2024-03-01T10:00:00+02:00"),
            Some("2024-03-01T10:00:00+02:00"),
            None,
        )
        .parse(now)
        .unwrap();
        assert_eq!(
            (r.window.first, r.window.last),
            (d("2024-03-01"), d("2024-03-01"))
        );
        let r = stats_q(None, Some("2024-01-31"), None).parse(now).unwrap();
        assert_eq!(
            (r.window.first, r.window.last),
            (d("2024-01-02"), d("2024-01-31"))
        );
        // A whole leap year is 366 days: allowed; a day more is not.
        assert!(stats_q(Some("2024-01-01"), Some("2024-12-31"), None)
            .parse(now)
            .is_ok());
        assert_eq!(
            field_of(stats_q(Some("2024-01-01"), Some("2025-01-01"), None).parse(now)),
            "to"
        );
    }

    #[test]
    fn bad_stats_parameters_are_named() {
        let now = at("2024-03-10T15:00:00Z");
        assert_eq!(
            field_of(stats_q(None, None, Some("week")).parse(now)),
            "group_by"
        );
        assert_eq!(
            field_of(stats_q(Some("yesterday"), None, None).parse(now)),
            "from"
        );
        assert_eq!(
            field_of(stats_q(None, Some("2024-13-01"), None).parse(now)),
            "to"
        );
        assert_eq!(
            field_of(stats_q(Some("2024-03-05"), Some("2024-03-01"), None).parse(now)),
            "to"
        );
        assert_eq!(
            field_of(stats_q(None, Some("+262143-12-31"), None).parse(now)),
            "to"
        );
        let q = |p: Option<&str>, b: Option<&str>| StatsQuery {
            period: p.map(Into::into),
            bucket: b.map(Into::into),
            ..StatsQuery::default()
        };
        assert_eq!(field_of(q(Some("90d"), None).parse(now)), "period");
        assert_eq!(field_of(q(Some("7d"), Some("month")).parse(now)), "groupBy");
        assert_eq!(field_of(q(None, Some("model")).parse(now)), "groupBy");
    }

    #[test]
    fn period_and_group_by_of_the_original_default_to_7d_by_day_and_yield_to_from_and_to() {
        let now = at("2024-03-10T15:00:00Z");
        let q = |p: Option<&str>, b: Option<&str>, from: Option<&str>| StatsQuery {
            period: p.map(Into::into),
            bucket: b.map(Into::into),
            from: from.map(Into::into),
            ..StatsQuery::default()
        };
        assert_eq!(q(None, None, None).parse(now).unwrap().original, None);
        let r = q(None, Some("hour"), None).parse(now).unwrap();
        let want = OriginalStats {
            period: Period::SevenDays,
            bucket: Bucket::Hour,
        };
        assert_eq!(r.original, Some(want));
        assert_eq!(r.window, DayWindow::last_days(7, now));
        assert_eq!(r.group_by, GroupBy::Day);
        let r = q(Some("1d"), None, None).parse(now).unwrap();
        assert_eq!(r.original.map(|o| o.bucket), Some(Bucket::Day));
        assert_eq!(
            (r.window.first, r.window.last),
            (d("2024-03-10"), d("2024-03-10"))
        );
        let r = q(Some("30d"), Some("week"), None).parse(now).unwrap();
        assert_eq!(r.window, DayWindow::last_days(30, now));
        // `from` wins over `period` (which is still echoed).
        let r = q(Some("1d"), None, Some("2024-03-01")).parse(now).unwrap();
        assert_eq!(
            (r.window.first, r.window.last),
            (d("2024-03-01"), d("2024-03-10"))
        );
        assert_eq!(r.original.map(|o| o.period), Some(Period::OneDay));
    }
}
