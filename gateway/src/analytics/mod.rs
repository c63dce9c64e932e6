//! Analytics and usage statistics (docs/api.md "Analytics", §5.6, §5.10, §8).
//!
//! Every figure comes from two rollups that stay small as usage grows:
//! `usage_daily` (one row per user, day, model/feature and session, written
//! by the worker in the same transaction as the raw rows) and `credit_daily`
//! (credits consumed per user, day, model, provider, feature and session,
//! kept by a trigger on the ledger in the ledger's own transaction): a year of
//! a heavy user is a few thousand rows either way. Only the original backend's
//! members (docs/compatibility.md) read the raw `model_usage`/`feature_usage`
//! partitions and the ledger, over the answer's window through their
//! (user_id, time) indexes: lists capped at 100, stats sums per UTC hour.
//!
//! Windows are whole UTC days. Window arithmetic, query parsing and the
//! shaping of rows into the answers are plain functions, unit-tested beside
//! them; the SQL and the Redis cache around them are thin.
//!
//! # Layout
//! - this file: the limits and [`DayWindow`];
//! - [`query`]: the query strings of both routes, parsed with named 422s;
//! - [`shape`]: rollup rows into the answers (their types, which the OpenAPI
//!   document derives its schemas from, docs/api.md);
//! - [`original`]: the original backend's extra members and their rules;
//! - [`store`]: the SQL and the cached view.
//!
//! Cache: the analytics answer for N days lives under `Keys::analytics(user,
//! N)` and records the user's analytics generation (`Keys::analytics_gen`)
//! read before Postgres. A worker bumps the generation after every commit
//! that touches the user, so a view of an older generation — computed before
//! the commit, whenever it was stored — is never served; it is recomputed on
//! the next read and the old one expires with its TTL.

pub mod original;
pub mod query;
pub mod shape;
pub mod store;

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, SecondsFormat, Utc};

pub use query::{AnalyticsQuery, GroupBy, StatsQuery, StatsRequest};
pub use shape::{
    shape_analytics, shape_stats, AnalyticsAnswer, AnalyticsInput, RollupRow, StatsAnswer,
    StatsFigures, StatsRow, StatsUsageRow,
};
pub use store::{analytics, load_analytics, stats};

/// `days` accepted by the analytics route.
pub const MAX_DAYS: u32 = 365;
pub const DEFAULT_DAYS: u32 = 30;
/// How long a view is kept; workers make it unservable sooner (a generation
/// bump) when its data changes.
pub const CACHE_TTL_SECS: u64 = 300;
/// Longest `to − from` of the stats route.
pub const MAX_STATS_SPAN_DAYS: i64 = 366;

/// A window of whole UTC days, `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayWindow {
    pub first: NaiveDate,
    pub last: NaiveDate,
}

impl DayWindow {
    /// The `days` UTC days ending with today (today included).
    pub fn last_days(days: u32, now: DateTime<Utc>) -> Self {
        let last = now.date_naive();
        let first = last - Duration::days(i64::from(days.max(1)) - 1);
        Self { first, last }
    }

    /// Start of the first day (inclusive).
    pub fn from(&self) -> DateTime<Utc> {
        self.first.and_time(NaiveTime::MIN).and_utc()
    }

    /// Start of the day after the last (exclusive).
    pub fn to(&self) -> DateTime<Utc> {
        (self.last.and_time(NaiveTime::MIN) + Duration::days(1)).and_utc()
    }

    pub fn days(&self) -> impl Iterator<Item = NaiveDate> {
        let last = self.last;
        self.first.iter_days().take_while(move |d| *d <= last)
    }
}

pub(super) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub(super) fn ts_ms(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
pub(crate) mod testing {
    use chrono::{DateTime, NaiveDate, Utc};

    pub fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    pub fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn a_window_of_n_days_ends_with_today_and_is_whole_utc_days() {
        let w = DayWindow::last_days(30, at("2024-03-10T15:04:05Z"));
        assert_eq!(w.first, d("2024-02-10"));
        assert_eq!(w.last, d("2024-03-10"));
        assert_eq!(ts(w.from()), "2024-02-10T00:00:00Z");
        assert_eq!(ts(w.to()), "2024-03-11T00:00:00Z");
        assert_eq!(w.days().count(), 30);
        let one = DayWindow::last_days(1, at("2024-12-31T23:59:59Z"));
        assert_eq!((one.first, one.last), (d("2024-12-31"), d("2024-12-31")));
        assert_eq!(ts(one.to()), "2025-01-01T00:00:00Z");
    }
}
