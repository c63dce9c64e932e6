//! Usage events → `usage_event_ids` (the once-only guard), `model_usage` /
//! `feature_usage` (monthly partitions) and the `usage_daily` rollup, all in
//! the caller's transaction. Only events new to the guard touch the rollup,
//! whose cells [`rollup::cells`] computes.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use common::events::{UsageDetail, UsageEvent};
use serde_json::Value;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::Effects;

pub mod rollup;

pub async fn store(
    tx: &mut Transaction<'_, Postgres>,
    events: &[&UsageEvent],
    effects: &mut Effects,
) -> Result<(), sqlx::Error> {
    // The same id twice in one batch (a resend grouped with its original).
    let mut seen = HashSet::with_capacity(events.len());
    let events: Vec<&UsageEvent> = events
        .iter()
        .copied()
        .filter(|e| seen.insert(e.id))
        .collect();
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let users: Vec<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
    let fresh: HashSet<Uuid> = sqlx::query_scalar(
        "insert into usage_event_ids (id, user_id) select * from unnest($1::uuid[], $2::text[]) \
         on conflict (id) do nothing returning id",
    )
    .bind(&ids)
    .bind(&users)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    let fresh: Vec<&UsageEvent> = events
        .into_iter()
        .filter(|e| fresh.contains(&e.id))
        .collect();
    if fresh.is_empty() {
        return Ok(());
    }
    let mut m = ModelCols::default();
    let mut f = FeatureCols::default();
    for e in &fresh {
        effects.analytics_users.insert(e.user_id.clone());
        match &e.detail {
            UsageDetail::Model {
                provider,
                model,
                prompt_tokens,
                completion_tokens,
                latency_ms,
                success,
            } => {
                m.push(
                    e,
                    provider,
                    model,
                    *prompt_tokens,
                    *completion_tokens,
                    *latency_ms,
                    *success,
                );
            }
            UsageDetail::Feature {
                feature,
                action,
                duration_ms,
            } => {
                f.push(e, feature, action.as_deref(), *duration_ms);
            }
        }
    }
    if !m.id.is_empty() {
        // Personal data of a user deleted meanwhile is stripped as it lands.
        sqlx::query(
            "insert into model_usage (id, user_id, session_id, provider, model, prompt_tokens, \
             completion_tokens, latency_ms, success, metadata, occurred_at, received_at, credits) \
             select t.id, t.user_id, t.session_id, t.provider, t.model, t.pt, t.ct, t.lat, t.ok, \
                    case when u.status = 'deleted' then null else t.meta end, t.occ, t.rec, t.credits \
             from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], \
                         $7::int8[], $8::int8[], $9::bool[], $10::jsonb[], $11::timestamptz[], $12::timestamptz[], \
                         $13::int8[]) \
                  as t(id, user_id, session_id, provider, model, pt, ct, lat, ok, meta, occ, rec, credits) \
             left join users u on u.id = t.user_id \
             on conflict do nothing",
        )
        .bind(&m.id)
        .bind(&m.user_id)
        .bind(&m.session_id)
        .bind(&m.provider)
        .bind(&m.model)
        .bind(&m.pt)
        .bind(&m.ct)
        .bind(&m.lat)
        .bind(&m.ok)
        .bind(&m.meta)
        .bind(&m.occ)
        .bind(&m.rec)
        .bind(&m.credits)
        .execute(&mut **tx)
        .await?;
    }
    if !f.id.is_empty() {
        sqlx::query(
            "insert into feature_usage (id, user_id, session_id, feature, action, duration_ms, \
             metadata, occurred_at, received_at) \
             select t.id, t.user_id, t.session_id, t.feature, t.action, t.dur, \
                    case when u.status = 'deleted' then null else t.meta end, t.occ, t.rec \
             from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], \
                         $7::jsonb[], $8::timestamptz[], $9::timestamptz[]) \
                  as t(id, user_id, session_id, feature, action, dur, meta, occ, rec) \
             left join users u on u.id = t.user_id \
             on conflict do nothing",
        )
        .bind(&f.id)
        .bind(&f.user_id)
        .bind(&f.session_id)
        .bind(&f.feature)
        .bind(&f.action)
        .bind(&f.dur)
        .bind(&f.meta)
        .bind(&f.occ)
        .bind(&f.rec)
        .execute(&mut **tx)
        .await?;
    }
    // Sorted, so concurrent workers take row locks in one order (no deadlocks).
    let r = rollup::cells(&fresh);
    sqlx::query(
        "insert into usage_daily (user_id, day, kind, provider, model, feature, session_id, \
         requests, prompt_tokens, completion_tokens) \
         select * from unnest($1::text[], $2::date[], $3::text[], $4::text[], $5::text[], $6::text[], \
                              $7::text[], $8::int8[], $9::int8[], $10::int8[]) \
         on conflict (user_id, day, kind, provider, model, feature, session_id) do update set \
           requests = usage_daily.requests + excluded.requests, \
           prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, \
           completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens, \
           updated_at = now()",
    )
    .bind(&r.user)
    .bind(&r.day)
    .bind(&r.kind)
    .bind(&r.provider)
    .bind(&r.model)
    .bind(&r.feature)
    .bind(&r.session)
    .bind(&r.n)
    .bind(&r.pt)
    .bind(&r.ct)
    .execute(&mut **tx)
    .await?;
    // Activity: last_active_at only moves forward.
    let (au, at): (Vec<String>, Vec<DateTime<Utc>>) = {
        let mut latest: HashMap<&str, DateTime<Utc>> = HashMap::new();
        for e in &fresh {
            let t = latest.entry(e.user_id.as_str()).or_insert(e.occurred_at);
            *t = (*t).max(e.occurred_at);
        }
        let mut v: Vec<_> = latest
            .into_iter()
            .map(|(u, t)| (u.to_string(), t))
            .collect();
        v.sort();
        v.into_iter().unzip()
    };
    // Within a minute is exact enough for "last active", and skipping the
    // rows already that fresh spares a users-row write (and its lock) per user
    // per batch, which concurrent batches would otherwise queue on.
    sqlx::query(
        "update users u set last_active_at = t.at \
         from unnest($1::text[], $2::timestamptz[]) as t(user_id, at) \
         where u.id = t.user_id \
           and (u.last_active_at is null or u.last_active_at < t.at - interval '60 seconds')",
    )
    .bind(&au)
    .bind(&at)
    .execute(&mut **tx)
    .await?;
    effects.stored += fresh.len();
    Ok(())
}

#[derive(Default)]
struct ModelCols {
    id: Vec<Uuid>,
    user_id: Vec<String>,
    session_id: Vec<Option<String>>,
    provider: Vec<String>,
    model: Vec<String>,
    pt: Vec<i64>,
    ct: Vec<i64>,
    lat: Vec<Option<i64>>,
    ok: Vec<Option<bool>>,
    meta: Vec<Option<Value>>,
    occ: Vec<DateTime<Utc>>,
    rec: Vec<DateTime<Utc>>,
    /// What the event would cost by the gateway's price book (docs/credits.md "Price book").
    credits: Vec<Option<i64>>,
}

impl ModelCols {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        e: &UsageEvent,
        provider: &str,
        model: &str,
        pt: i64,
        ct: i64,
        lat: Option<i64>,
        ok: Option<bool>,
    ) {
        self.id.push(e.id);
        self.user_id.push(e.user_id.clone());
        self.session_id.push(e.session_id.clone());
        self.provider.push(provider.to_string());
        self.model.push(model.to_string());
        self.pt.push(pt);
        self.ct.push(ct);
        self.lat.push(lat);
        self.ok.push(ok);
        self.meta.push(e.metadata.clone());
        self.occ.push(e.occurred_at);
        self.rec.push(e.received_at);
        self.credits.push(e.credits);
    }
}

#[derive(Default)]
struct FeatureCols {
    id: Vec<Uuid>,
    user_id: Vec<String>,
    session_id: Vec<Option<String>>,
    feature: Vec<String>,
    action: Vec<Option<String>>,
    dur: Vec<Option<i64>>,
    meta: Vec<Option<Value>>,
    occ: Vec<DateTime<Utc>>,
    rec: Vec<DateTime<Utc>>,
}

impl FeatureCols {
    fn push(&mut self, e: &UsageEvent, feature: &str, action: Option<&str>, dur: Option<i64>) {
        self.id.push(e.id);
        self.user_id.push(e.user_id.clone());
        self.session_id.push(e.session_id.clone());
        self.feature.push(feature.to_string());
        self.action.push(action.map(str::to_string));
        self.dur.push(dur);
        self.meta.push(e.metadata.clone());
        self.occ.push(e.occurred_at);
        self.rec.push(e.received_at);
    }
}
