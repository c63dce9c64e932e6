//! The SQL behind both routes and the cached analytics view (see the module
//! doc of [`crate::analytics`] for the generation rule).

use chrono::{DateTime, NaiveDate, Utc};
use common::redis::keys::Keys;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::shape::{
    shape_analytics, shape_stats, AnalyticsAnswer, AnalyticsInput, RollupRow, StatsAnswer,
    StatsUsageRow,
};
use super::{ts, DayWindow, StatsRequest, CACHE_TTL_SECS};
use crate::error::{Error, Result};
use crate::redis_link::RedisLink;

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
pub async fn stats(pg: &sqlx::PgPool, user_id: &str, req: StatsRequest) -> Result<StatsAnswer> {
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

/// What Redis keeps under `Keys::analytics`: the answer as its JSON, so a view
/// cached before a release reads back as long as the answer's members keep
/// their names and types (a view that does not read is recomputed).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CachedView {
    /// The analytics generation read before the view was computed.
    gen: Option<String>,
    body: AnalyticsAnswer,
}

/// Whether a cached view may be served: computed under the current
/// generation and for the current window (a view from yesterday is stale).
pub(super) fn usable(view: &CachedView, gen: &Option<String>, window: DayWindow) -> bool {
    view.gen == *gen && view.body.to == ts(window.to())
}

/// The analytics answer for the last `days` days: from the cache, or computed
/// from Postgres and cached. Redis down: computed, not cached.
pub async fn analytics(
    pg: &PgPool,
    redis: &RedisLink,
    keys: &Keys,
    user_id: &str,
    days: u32,
) -> Result<AnalyticsAnswer> {
    let now = Utc::now();
    let window = DayWindow::last_days(days, now);
    let key = keys.analytics(user_id, days);
    let gen_key = keys.analytics_gen(user_id);
    let mut conn = redis.connection().await.ok();
    // The generation is read before Postgres, so a commit after it shows up as
    // a newer generation and this view is never served once that happens.
    let mut gen: Option<String> = None;
    let mut cache_ok = false;
    if let Some(c) = conn.as_mut() {
        let got: redis::RedisResult<(Option<String>, Option<String>)> = redis::cmd("MGET")
            .arg(&key)
            .arg(&gen_key)
            .query_async(c)
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
    let input = load_analytics(pg, user_id, window).await?;
    let body = shape_analytics(user_id, window, &input, now);
    if let (Some(c), true) = (conn.as_mut(), cache_ok) {
        let view = serde_json::to_string(&CachedView {
            gen,
            body: body.clone(),
        })
        .map_err(|e| Error::Internal(e.into()))?;
        let stored: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&key)
            .arg(view)
            .arg("EX")
            .arg(CACHE_TTL_SECS)
            .query_async(c)
            .await;
        if let Err(e) = stored {
            tracing::debug!(error = %e, "analytics view not cached");
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    /// A view as the gateway cached it before the answer was a type (`json!`, members
    /// sorted by name) reads back, and writes back as the same JSON.
    #[test]
    fn a_view_cached_before_the_answer_was_typed_reads_back() {
        let old = r#"{"body":{"as_of":null,"by_feature":[{"events":1,"feature":"chat"}],"by_model":[{"completion_tokens":3,
            "model":"gpt-4o","prompt_tokens":20,"provider":"openai","requests":2}],"by_provider":[{"provider":"openai",
            "requests":2,"total_tokens":23}],"daily":[{"credits_consumed":4,"date":"2024-03-10","feature_events":1,
            "requests":2,"total_tokens":23}],"from":"2024-03-10T00:00:00Z","generated_at":"2024-03-10T10:00:00.000Z",
            "summary":{"totalCreditsUsed":4,"totalRequests":2,"totalTokens":23,"uniqueFeatures":1,"uniqueModels":1},
            "to":"2024-03-11T00:00:00Z","totals":{"completion_tokens":3,"credits_consumed":4,"feature_events":1,
            "prompt_tokens":20,"requests":2,"sessions":1,"total_tokens":23},"user_id":"u"},"gen":"3"}"#;
        let view: CachedView = serde_json::from_str(old).expect("an old view reads back");
        let w = DayWindow::last_days(1, at("2024-03-10T10:00:00Z"));
        assert!(usable(&view, &Some("3".into()), w));
        let again: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&view).unwrap()).unwrap();
        assert_eq!(
            again,
            serde_json::from_str::<serde_json::Value>(old).unwrap()
        );
        let with_as_of = old.replace(r#""as_of":null"#, r#""as_of":"2024-03-10T09:00:00.000Z""#);
        let view: CachedView = serde_json::from_str(&with_as_of).unwrap();
        assert_eq!(view.body.as_of.as_deref(), Some("2024-03-10T09:00:00.000Z"));
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
