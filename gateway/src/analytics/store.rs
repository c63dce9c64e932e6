//! The SQL behind both routes and the cached analytics view (see the module
//! doc of [`crate::analytics`] for the generation rule).

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use common::redis::keys::Keys;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::original::{
    shape_extras, CreditHistoryEntry, FeatureUsageEntry, HourCredits, HourUsage, ModelUsageEntry,
    StatsExtras, LIST_CAP_SQL,
};
use super::shape::{
    shape_analytics, shape_stats, AnalyticsAnswer, AnalyticsInput, RollupRow, StatsAnswer,
    StatsUsageRow,
};
use super::{ts, ts_ms, DayWindow, StatsRequest, CACHE_TTL_SECS};
use crate::error::{Error, Result};
use crate::redis_link::RedisLink;

/// Reads the analytics figures of `window` from the rollup and the ledger.
#[tracing::instrument(skip_all, fields(user_id, days))]
pub async fn load_analytics(
    pg: &sqlx::PgPool,
    user_id: &str,
    window: DayWindow,
) -> Result<AnalyticsInput> {
    // Every read of the view in one snapshot: separate statements on the pool
    // each see their own, so a worker commit between the rollup and the lists
    // gave a view whose totals disagreed with its lists (a CI failure).
    let mut tx = pg
        .begin_with("begin isolation level repeatable read read only")
        .await?;
    let db: &mut sqlx::PgConnection = &mut tx;
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
    .fetch_all(&mut *db)
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
    .fetch_all(&mut *db)
    .await?;
    let ledger_as_of = credits.iter().map(|c| c.2).max();
    let (model_usage, feature_usage, credit_history) = original_lists(db, user_id, window).await?;
    tx.commit().await?;
    Ok(AnalyticsInput {
        rows,
        credits: credits.into_iter().map(|(d, c, _)| (d, c)).collect(),
        sessions,
        as_of: rollup_as_of.max(ledger_as_of),
        model_usage,
        feature_usage,
        credit_history,
    })
}

/// The original's `modelUsage`, `featureUsage` and `creditHistory` of the window, newest
/// first, at most 100 each (docs/compatibility.md). Each reads an index on (user_id, time).
async fn original_lists(
    db: &mut sqlx::PgConnection,
    user_id: &str,
    window: DayWindow,
) -> Result<(
    Vec<ModelUsageEntry>,
    Vec<FeatureUsageEntry>,
    Vec<CreditHistoryEntry>,
)> {
    let (from, to) = (window.from(), window.to());
    // `credits_consumed`: what the original's client reported (`costInCredits`, kept in
    // metadata by the legacy track); a non-number there counts as none.
    let models: Vec<(String, String, i64, f64, DateTime<Utc>)> = sqlx::query_as(
        "select model, provider, least(prompt_tokens::numeric + completion_tokens, 9223372036854775807)::int8, \
                case when jsonb_typeof(metadata -> 'cost_in_credits') = 'number' \
                     then (metadata ->> 'cost_in_credits')::float8 else 0 end, occurred_at \
         from model_usage where user_id = $1 and occurred_at >= $2 and occurred_at < $3 \
         order by occurred_at desc, id desc limit $4",
    )
    .bind(user_id)
    .bind(from)
    .bind(to)
    .bind(LIST_CAP_SQL)
    .fetch_all(&mut *db)
    .await?;
    let features: Vec<(String, i64, DateTime<Utc>)> = sqlx::query_as(
        "select feature, count(*)::int8, max(occurred_at) from feature_usage \
         where user_id = $1 and occurred_at >= $2 and occurred_at < $3 \
         group by feature order by 3 desc, 1 limit $4",
    )
    .bind(user_id)
    .bind(from)
    .bind(to)
    .bind(LIST_CAP_SQL)
    .fetch_all(&mut *db)
    .await?;
    let ledger: Vec<(i64, Option<String>, String, DateTime<Utc>)> = sqlx::query_as(
        "select amount, description, kind, created_at from credit_transactions \
         where user_id = $1 and created_at >= $2 and created_at < $3 \
         order by created_at desc, id desc limit $4",
    )
    .bind(user_id)
    .bind(from)
    .bind(to)
    .bind(LIST_CAP_SQL)
    .fetch_all(&mut *db)
    .await?;
    Ok((
        models
            .into_iter()
            .map(
                |(model_id, provider, tokens_used, credits_consumed, at)| ModelUsageEntry {
                    model_id,
                    provider,
                    tokens_used,
                    credits_consumed,
                    created_at: ts_ms(at),
                },
            )
            .collect(),
        features
            .into_iter()
            .map(|(feature_name, usage_count, at)| FeatureUsageEntry {
                feature_name,
                usage_count,
                last_used_at: ts_ms(at),
            })
            .collect(),
        ledger
            .into_iter()
            .map(|(amount, description, kind, at)| CreditHistoryEntry {
                amount,
                description,
                transaction_type: kind,
                created_at: ts_ms(at),
            })
            .collect(),
    ))
}

/// The original's stats members (docs/compatibility.md): model usage and consumed credits
/// per UTC hour, model and provider over the window, folded by [`shape_extras`].
async fn stats_extras(
    pg: &PgPool,
    user_id: &str,
    req: StatsRequest,
) -> Result<Option<StatsExtras>> {
    let Some(original) = req.original else {
        return Ok(None);
    };
    let (from, to) = (req.window.from(), req.window.to());
    let usage: Vec<(NaiveDateTime, String, String, i64, i64, i64)> = sqlx::query_as(
        "select date_trunc('hour', occurred_at at time zone 'UTC'), model, provider, count(*)::int8, \
                least(coalesce(sum(prompt_tokens::numeric + completion_tokens), 0), 9223372036854775807)::int8, \
                count(*) filter (where success = false)::int8 \
         from model_usage where user_id = $1 and occurred_at >= $2 and occurred_at < $3 group by 1, 2, 3",
    )
    .bind(user_id)
    .bind(from)
    .bind(to)
    .fetch_all(pg)
    .await?;
    let credits: Vec<(NaiveDateTime, String, String, i64)> = sqlx::query_as(
        "select date_trunc('hour', created_at at time zone 'UTC'), coalesce(model, ''), coalesce(provider, ''), \
                least(-sum(amount), 9223372036854775807)::int8 \
         from credit_transactions where user_id = $1 and kind = 'consume' and created_at >= $2 and created_at < $3 \
         group by 1, 2, 3",
    )
    .bind(user_id)
    .bind(from)
    .bind(to)
    .fetch_all(pg)
    .await?;
    let usage: Vec<HourUsage> = usage
        .into_iter()
        .map(
            |(hour, model, provider, requests, tokens, errors)| HourUsage {
                hour,
                model,
                provider,
                requests,
                tokens,
                errors,
            },
        )
        .collect();
    let credits: Vec<HourCredits> = credits
        .into_iter()
        .map(|(hour, model, provider, credits)| HourCredits {
            hour,
            model,
            provider,
            credits,
        })
        .collect();
    Ok(Some(shape_extras(original.bucket, &usage, &credits)))
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
    let extras = stats_extras(pg, user_id, req).await?;
    Ok(shape_stats(user_id, req, &usage, &credits, extras))
}

/// What Redis keeps under `Keys::analytics`: the answer as its JSON, so a view
/// cached before a release reads back as long as the answer's members keep
/// their names and types. A view that does not read (one cached before the
/// original's lists were added, docs/compatibility.md) is a miss, recomputed.
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

    /// A view cached before the original's lists were added does not read, so it is a miss
    /// (recomputed, never served without them); a view with them reads back as written.
    #[test]
    fn a_view_cached_without_the_originals_lists_is_a_miss_and_a_new_one_reads_back() {
        let old = r#"{"body":{"as_of":null,"by_feature":[{"events":1,"feature":"chat"}],"by_model":[{"completion_tokens":3,
            "model":"gpt-4o","prompt_tokens":20,"provider":"openai","requests":2}],"by_provider":[{"provider":"openai",
            "requests":2,"total_tokens":23}],"daily":[{"credits_consumed":4,"date":"2024-03-10","feature_events":1,
            "requests":2,"total_tokens":23}],"from":"2024-03-10T00:00:00Z","generated_at":"2024-03-10T10:00:00.000Z",
            "summary":{"totalCreditsUsed":4,"totalRequests":2,"totalTokens":23,"uniqueFeatures":1,"uniqueModels":1},
            "to":"2024-03-11T00:00:00Z","totals":{"completion_tokens":3,"credits_consumed":4,"feature_events":1,
            "prompt_tokens":20,"requests":2,"sessions":1,"total_tokens":23},"user_id":"u"},"gen":"3"}"#;
        assert!(serde_json::from_str::<CachedView>(old).is_err());
        let new = old.replace(
            r#""user_id":"u"}"#,
            r#""user_id":"u","modelUsage":[{"model_id":"gpt-4o","provider":"openai","tokens_used":23,
            "credits_consumed":1.5,"created_at":"2024-03-10T09:00:00.000Z"}],"featureUsage":[{"feature_name":"chat",
            "usage_count":1,"last_used_at":"2024-03-10T09:30:00.000Z"}],"creditHistory":[{"amount":-4,
            "description":null,"transaction_type":"consume","created_at":"2024-03-10T09:00:00.000Z"}]}"#,
        );
        let view: CachedView = serde_json::from_str(&new).expect("a new view reads back");
        let w = DayWindow::last_days(1, at("2024-03-10T10:00:00Z"));
        assert!(usable(&view, &Some("3".into()), w));
        let again: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&view).unwrap()).unwrap();
        assert_eq!(
            again,
            serde_json::from_str::<serde_json::Value>(&new).unwrap()
        );
        assert_eq!(view.body.model_usage[0].credits_consumed, 1.5);
        assert_eq!(view.body.credit_history[0].description, None);
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
