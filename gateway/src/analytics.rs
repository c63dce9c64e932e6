//! Analytics and usage statistics (SPEC §5.3, §5.6, §5.10, §8).
//!
//! Every figure comes from two rollups that stay small as usage grows:
//! `usage_daily` (one row per user, day, model/feature and session, written
//! by the worker in the same transaction as the raw rows) and `credit_daily`
//! (credits consumed per user, day, model, provider, feature and session,
//! kept by a trigger on the ledger in the ledger's own transaction). Neither
//! the raw `model_usage`/`feature_usage` partitions nor the ledger's rows are
//! read here: a year of a heavy user is a few thousand rows either way.
//!
//! Windows are whole UTC days. Window arithmetic, query parsing and the
//! shaping of rows into the answers are plain functions, unit-tested below;
//! the SQL and the Redis cache around them are thin.
//!
//! Cache: the analytics answer for N days lives under `Keys::analytics(user,
//! N)` and records the user's analytics generation (`Keys::analytics_gen`)
//! read before Postgres. A worker bumps the generation after every commit
//! that touches the user, so a view of an older generation — computed before
//! the commit, whenever it was stored — is never served; it is recomputed on
//! the next read and the old one expires with its TTL.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::http::error::{ApiError, Result};
use crate::state::AppState;

/// `days` accepted by the analytics route.
pub const MAX_DAYS: u32 = 365;
pub const DEFAULT_DAYS: u32 = 30;
/// How long a view is kept; workers make it unservable sooner (a generation
/// bump) when its data changes.
pub const CACHE_TTL_SECS: u64 = 300;
/// Longest `to − from` of the stats route.
pub const MAX_STATS_SPAN_DAYS: i64 = 366;

// ---------------------------------------------------------------------------
// Windows
// ---------------------------------------------------------------------------

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

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn ts_ms(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------------------
// Query parsing
// ---------------------------------------------------------------------------

/// Raw query of `GET /api/vscode/analytics`: strings, so a bad value is a 422
/// that names its parameter rather than a generic deserialization error.
#[derive(Debug, Default, Deserialize)]
pub struct AnalyticsQuery {
    pub days: Option<String>,
    /// The original client's `1d|7d|30d` (SPEC §5.10).
    pub timeframe: Option<String>,
}

impl AnalyticsQuery {
    /// The number of days asked for; `days` wins when both are given.
    pub fn days(&self) -> Result<u32> {
        if let Some(d) = &self.days {
            return match d.trim().parse::<u32>() {
                Ok(n) if (1..=MAX_DAYS).contains(&n) => Ok(n),
                _ => Err(ApiError::validation(
                    "days",
                    format!("must be an integer from 1 to {MAX_DAYS}"),
                )),
            };
        }
        match self.timeframe.as_deref() {
            None => Ok(DEFAULT_DAYS),
            Some("1d") => Ok(1),
            Some("7d") => Ok(7),
            Some("30d") => Ok(30),
            Some(_) => Err(ApiError::validation(
                "timeframe",
                "must be one of 1d, 7d, 30d",
            )),
        }
    }
}

/// `group_by` of the stats route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    Model,
    Provider,
    Feature,
    Session,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "day" => Self::Day,
            "model" => Self::Model,
            "provider" => Self::Provider,
            "feature" => Self::Feature,
            "session" => Self::Session,
            _ => return None,
        })
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
    fn key_column(self) -> &'static str {
        match self {
            Self::Day => "to_char(day, 'YYYY-MM-DD')",
            Self::Model => "nullif(model, '')",
            Self::Provider => "nullif(provider, '')",
            Self::Feature => "nullif(feature, '')",
            Self::Session => "nullif(session_id, '')",
        }
    }
}

/// Raw query of `GET /api/users/:id/usage/stats`.
#[derive(Debug, Default, Deserialize)]
pub struct StatsQuery {
    pub from: Option<String>,
    pub to: Option<String>,
    pub group_by: Option<String>,
}

/// A parsed stats request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsRequest {
    pub window: DayWindow,
    pub group_by: GroupBy,
}

/// `from`/`to` as RFC 3339 or a plain date. A date `from` is the start of
/// that day; a date `to` includes that whole day.
fn parse_instant(field: &str, s: &str, is_to: bool) -> Result<DateTime<Utc>> {
    let s = s.trim();
    let in_range = |t: DateTime<Utc>| {
        common::valid::check_time(t).map_err(|reason| ApiError::validation(field, reason))
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return in_range(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        // Checked before any arithmetic: chrono panics past its own range.
        common::valid::check_date(d).map_err(|reason| ApiError::validation(field, reason))?;
        let d = if is_to { d.succ_opt() } else { Some(d) };
        if let Some(d) = d {
            return Ok(d.and_time(NaiveTime::MIN).and_utc());
        }
    }
    Err(ApiError::validation(
        field,
        "must be an RFC 3339 time or a YYYY-MM-DD date",
    ))
}

impl StatsQuery {
    /// Validates the query against `now`. The answer covers whole UTC days:
    /// every day that `[from, to)` touches (see docs/analytics.md).
    pub fn parse(&self, now: DateTime<Utc>) -> Result<StatsRequest> {
        let group_by = match self.group_by.as_deref() {
            None => GroupBy::Day,
            Some(g) => GroupBy::parse(g).ok_or_else(|| {
                ApiError::validation(
                    "group_by",
                    "must be one of day, model, provider, feature, session",
                )
            })?,
        };
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
            return Err(ApiError::validation("to", "must not be before `from`"));
        }
        if to - from > Duration::days(MAX_STATS_SPAN_DAYS) {
            return Err(ApiError::validation(
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
        })
    }
}

/// The day of the last instant of `[from, to)` (the day of `from` when empty).
fn last_day_of(from: DateTime<Utc>, to: DateTime<Utc>) -> NaiveDate {
    if to > from {
        (to - Duration::microseconds(1)).date_naive()
    } else {
        from.date_naive()
    }
}

// ---------------------------------------------------------------------------
// Shaping rows into answers
// ---------------------------------------------------------------------------

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
}

#[derive(Default)]
struct ModelSums {
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
}

#[derive(Default, Clone, Copy)]
struct DaySums {
    requests: i64,
    total_tokens: i64,
    credits_consumed: i64,
    feature_events: i64,
}

/// The SPEC §5.3 body plus `summary` (§5.10) and `as_of` (§8).
///
/// Lists are ordered for stable answers: `by_model`/`by_provider` by requests
/// (most first), `by_feature` by events, ties by name; `daily` has one entry
/// per day of the window, oldest first, zero days included.
pub fn shape_analytics(
    user_id: &str,
    window: DayWindow,
    input: &AnalyticsInput,
    generated_at: DateTime<Utc>,
) -> Value {
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

    json!({
        "user_id": user_id,
        "from": ts(window.from()),
        "to": ts(window.to()),
        "generated_at": ts_ms(generated_at),
        "as_of": input.as_of.map(ts_ms),
        "totals": {
            "requests": requests,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total_tokens,
            "credits_consumed": credits_consumed,
            "feature_events": feature_events,
            "sessions": input.sessions,
        },
        "by_model": models.iter().map(|((p, m), s)| json!({
            "provider": p, "model": m, "requests": s.requests,
            "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        })).collect::<Vec<_>>(),
        "by_provider": providers.iter().map(|(p, (n, t))| json!({
            "provider": p, "requests": n, "total_tokens": t,
        })).collect::<Vec<_>>(),
        "by_feature": features.iter().map(|(f, n)| json!({"feature": f, "events": n})).collect::<Vec<_>>(),
        "daily": daily.iter().map(|(d, s)| json!({
            "date": d.format("%Y-%m-%d").to_string(), "requests": s.requests,
            "total_tokens": s.total_tokens, "credits_consumed": s.credits_consumed,
            "feature_events": s.feature_events,
        })).collect::<Vec<_>>(),
        "summary": {
            "totalRequests": requests,
            "totalTokens": total_tokens,
            "totalCreditsUsed": credits_consumed,
            "uniqueModels": unique_models,
            "uniqueFeatures": unique_features,
        },
    })
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsFigures {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub credits_consumed: i64,
    pub feature_events: i64,
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

/// The SPEC §5.6 body. Rows merge the rollup's and the ledger's figures by
/// key; `key` is null for what has no such attribute (feature events when
/// grouping by model, events without a session, ...), so rows always sum to
/// the totals. Rows are ordered by key (null last); only keys with activity
/// appear.
pub fn shape_stats(
    user_id: &str,
    req: StatsRequest,
    usage: &[StatsUsageRow],
    credits: &[(Option<String>, i64)],
) -> Value {
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
    json!({
        "user_id": user_id,
        "from": ts(req.window.from()),
        "to": ts(req.window.to()),
        "group_by": req.group_by.as_str(),
        "rows": rows.iter().map(|(k, f)| {
            let mut v = serde_json::to_value(f).unwrap_or_default();
            v["key"] = json!(k);
            v
        }).collect::<Vec<_>>(),
        "totals": totals,
    })
}

// ---------------------------------------------------------------------------
// Postgres
// ---------------------------------------------------------------------------

/// Reads the analytics figures of `window` from the rollup and the ledger.
#[tracing::instrument(skip_all, fields(user_id, days))]
pub async fn load_analytics(
    pg: &sqlx::PgPool,
    user_id: &str,
    window: DayWindow,
) -> Result<AnalyticsInput> {
    // One statement over the user's rollup rows in the window (primary key
    // prefix user_id, day): per day and kind for `daily`, per model/feature
    // for the breakdowns, and one row for the whole window with the newest
    // write; distinct sessions by hashing (a sort of the ids costs more).
    type Row = (
        Option<NaiveDate>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        i64,
        i64,
        i64,
        Option<DateTime<Utc>>,
        i64,
    );
    let grouped: Vec<Row> = sqlx::query_as(
        "select day, kind, provider, model, feature, least(coalesce(sum(requests), 0), 9223372036854775807)::int8, \
                least(coalesce(sum(prompt_tokens), 0), 9223372036854775807)::int8, least(coalesce(sum(completion_tokens), 0), 9223372036854775807)::int8, \
                max(updated_at), \
                (select count(*) from (select session_id from usage_daily \
                   where user_id = $1 and day >= $2 and day <= $3 and session_id <> '' \
                   group by session_id) s)::int8 \
         from usage_daily where user_id = $1 and day >= $2 and day <= $3 \
         group by grouping sets ((day, kind), (kind, provider, model, feature), ())",
    )
    .bind(user_id)
    .bind(window.first)
    .bind(window.last)
    .fetch_all(pg)
    .await?;
    let mut rows = Vec::with_capacity(grouped.len());
    let (mut sessions, mut rollup_as_of) = (0, None);
    for (day, kind, provider, model, feature, n, pt, ct, at, s) in grouped {
        let Some(kind) = kind else {
            // The whole-window row.
            sessions = s;
            rollup_as_of = at;
            continue;
        };
        rows.push(RollupRow {
            day,
            kind,
            provider: provider.unwrap_or_default(),
            model: model.unwrap_or_default(),
            feature: feature.unwrap_or_default(),
            requests: n,
            prompt_tokens: pt,
            completion_tokens: ct,
        });
    }
    // The ledger's daily rollup (kept by a trigger on the ledger, 0002).
    let credits: Vec<(NaiveDate, i64, DateTime<Utc>)> = sqlx::query_as(
        "select day, least(sum(consumed), 9223372036854775807)::int8, max(updated_at) from credit_daily \
         where user_id = $1 and day >= $2 and day <= $3 group by day",
    )
    .bind(user_id)
    .bind(window.first)
    .bind(window.last)
    .fetch_all(pg)
    .await?;
    let ledger_as_of = credits.iter().map(|c| c.2).max();
    Ok(AnalyticsInput {
        rows,
        credits: credits.into_iter().map(|(d, c, _)| (d, c)).collect(),
        sessions,
        as_of: rollup_as_of.max(ledger_as_of),
    })
}

/// The stats answer, straight from Postgres (not cached: arbitrary windows).
#[tracing::instrument(skip_all, fields(user_id, group_by = req.group_by.as_str()))]
pub async fn stats(pg: &sqlx::PgPool, user_id: &str, req: StatsRequest) -> Result<Value> {
    let usage: Vec<StatsUsageRow> = sqlx::query_as(&format!(
        "select {key} as key, \
                least(coalesce(sum(requests) filter (where kind = 'model'), 0), 9223372036854775807)::int8 as requests, \
                least(coalesce(sum(prompt_tokens), 0), 9223372036854775807)::int8 as prompt_tokens, \
                least(coalesce(sum(completion_tokens), 0), 9223372036854775807)::int8 as completion_tokens, \
                least(coalesce(sum(requests) filter (where kind = 'feature'), 0), 9223372036854775807)::int8 as feature_events \
         from usage_daily where user_id = $1 and day >= $2 and day <= $3 group by 1",
        key = req.group_by.key_column()
    ))
    .bind(user_id)
    .bind(req.window.first)
    .bind(req.window.last)
    .fetch_all(pg)
    .await?;
    let credits: Vec<(Option<String>, i64)> = sqlx::query_as(&format!(
        "select {key}, least(sum(consumed), 9223372036854775807)::int8 from credit_daily \
         where user_id = $1 and day >= $2 and day <= $3 group by 1",
        key = req.group_by.key_column()
    ))
    .bind(user_id)
    .bind(req.window.first)
    .bind(req.window.last)
    .fetch_all(pg)
    .await?;
    Ok(shape_stats(user_id, req, &usage, &credits))
}

// ---------------------------------------------------------------------------
// The cached analytics view
// ---------------------------------------------------------------------------

/// What Redis keeps under `Keys::analytics`.
#[derive(Debug, Serialize, Deserialize)]
struct CachedView {
    /// The analytics generation read before the view was computed.
    gen: Option<String>,
    body: Value,
}

/// Whether a cached view may be served: computed under the current
/// generation and for the current window (a view from yesterday is stale).
fn usable(view: &CachedView, gen: &Option<String>, window: DayWindow) -> bool {
    view.gen == *gen && view.body["to"].as_str() == Some(ts(window.to()).as_str())
}

/// The analytics answer for the last `days` days: from the cache, or computed
/// from Postgres and cached. Redis down: computed, not cached.
pub async fn analytics(state: &AppState, user_id: &str, days: u32) -> Result<Value> {
    let now = Utc::now();
    let window = DayWindow::last_days(days, now);
    let key = state.keys.analytics(user_id, days);
    let gen_key = state.keys.analytics_gen(user_id);
    let mut conn = state.redis().await.ok();
    // The generation is read before Postgres, so a commit after it shows up as
    // a newer generation and this view is never served once that happens.
    let mut gen: Option<String> = None;
    let mut cache_ok = false;
    if let Some(c) = conn.as_mut() {
        let got: redis::RedisResult<(Option<String>, Option<String>)> = redis::cmd("MGET")
            .arg(&key)
            .arg(&gen_key)
            .query_async(&mut **c)
            .await;
        match got {
            Ok((cached, g)) => {
                cache_ok = true;
                if let Some(view) = cached.and_then(|c| serde_json::from_str::<CachedView>(&c).ok())
                {
                    if usable(&view, &g, window) {
                        metrics::counter!("analytics_cache_total", "result" => "hit").increment(1);
                        return Ok(view.body);
                    }
                }
                gen = g;
            }
            Err(e) => tracing::debug!(error = %e, "analytics cache unavailable"),
        }
    }
    metrics::counter!("analytics_cache_total", "result" => "miss").increment(1);
    let input = load_analytics(&state.pg, user_id, window).await?;
    let body = shape_analytics(user_id, window, &input, now);
    if let (Some(c), true) = (conn.as_mut(), cache_ok) {
        let view = serde_json::to_string(&CachedView {
            gen,
            body: body.clone(),
        })
        .map_err(|e| ApiError::Internal(e.into()))?;
        let stored: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&key)
            .arg(view)
            .arg("EX")
            .arg(CACHE_TTL_SECS)
            .query_async(&mut **c)
            .await;
        if let Err(e) = stored {
            tracing::debug!(error = %e, "analytics view not cached");
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

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
                Err(ApiError::Validation { field, .. }) => assert_eq!(field, "days"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        match q(None, Some("90d")).days() {
            Err(ApiError::Validation { field, .. }) => assert_eq!(field, "timeframe"),
            other => panic!("{other:?}"),
        }
    }

    fn stats_q(from: Option<&str>, to: Option<&str>, g: Option<&str>) -> StatsQuery {
        StatsQuery {
            from: from.map(Into::into),
            to: to.map(Into::into),
            group_by: g.map(Into::into),
        }
    }

    fn field_of(r: Result<StatsRequest>) -> String {
        match r {
            Err(ApiError::Validation { field, .. }) => field,
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
        };
        let v = shape_analytics("u1", w, &input, at("2024-03-10T13:00:00Z"));
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
        let v = shape_analytics(
            "u",
            w,
            &AnalyticsInput::default(),
            at("2024-03-10T00:00:00Z"),
        );
        assert_eq!(v["daily"].as_array().unwrap().len(), 7);
        assert_eq!(v["totals"]["requests"], 0);
        assert!(v["as_of"].is_null());
        assert_eq!(v["by_model"], json!([]));
    }

    #[test]
    fn stats_rows_merge_usage_and_credits_by_key_and_sum_to_the_totals() {
        let req = StatsRequest {
            window: DayWindow {
                first: d("2024-03-01"),
                last: d("2024-03-02"),
            },
            group_by: GroupBy::Model,
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
        let v = shape_stats("u", req, &usage, &credits);
        assert_eq!(v["group_by"], "model");
        assert_eq!(v["from"], "2024-03-01T00:00:00Z");
        assert_eq!(v["to"], "2024-03-03T00:00:00Z");
        assert_eq!(
            v["rows"],
            json!([
                {"key": "claude", "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "credits_consumed": 9, "feature_events": 0},
                {"key": "gpt-4o", "requests": 2, "prompt_tokens": 20, "completion_tokens": 4, "credits_consumed": 5, "feature_events": 0},
                {"key": null, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "credits_consumed": 1, "feature_events": 3},
            ])
        );
        assert_eq!(
            v["totals"],
            json!({"requests": 2, "prompt_tokens": 20, "completion_tokens": 4, "credits_consumed": 15, "feature_events": 3})
        );
    }

    #[test]
    fn a_cached_view_is_served_only_under_its_generation_and_window() {
        let w = DayWindow::last_days(30, at("2024-03-10T10:00:00Z"));
        let body = shape_analytics(
            "u",
            w,
            &AnalyticsInput::default(),
            at("2024-03-10T10:00:00Z"),
        );
        let view = CachedView {
            gen: Some("3".into()),
            body,
        };
        assert!(usable(&view, &Some("3".into()), w));
        assert!(
            !usable(&view, &Some("4".into()), w),
            "a drop happened since"
        );
        assert!(!usable(&view, &None, w));
        let tomorrow = DayWindow::last_days(30, at("2024-03-11T00:00:01Z"));
        assert!(
            !usable(&view, &Some("3".into()), tomorrow),
            "yesterday's window"
        );
    }
}
