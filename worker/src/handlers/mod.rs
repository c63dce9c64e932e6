//! Event handlers. `apply` writes a whole batch in one transaction; every
//! handler is idempotent (event ids are unique keys) and order-independent, so
//! redelivery and reordering give the same end state.

pub mod credits;
pub mod sanitize;
pub mod sessions;
pub mod usage;
pub mod users;

use std::collections::HashSet;

use chrono::Utc;
use common::events::{Envelope, Event};

use crate::ctx::Ctx;

/// What a committed batch changed, for the Redis follow-ups after commit.
#[derive(Debug, Default)]
pub struct Effects {
    /// Events newly stored (redeliveries count 0).
    pub stored: usize,
    /// Users whose analytics changed.
    pub analytics_users: HashSet<String>,
    /// Users whose cached profile changed.
    pub profile_users: HashSet<String>,
    /// Reservations now settled in the ledger: (user, transaction id).
    pub settled: Vec<(String, uuid::Uuid)>,
    /// Users whose ledger moved (their balance `as_of` advances).
    pub credit_users: HashSet<String>,
    /// Seconds from the gateway's receipt to this commit, per stored event.
    pub lags: Vec<f64>,
}

impl Effects {
    /// Adds what another committed transaction of the same batch changed.
    pub fn merge(&mut self, other: Effects) {
        self.stored += other.stored;
        self.analytics_users.extend(other.analytics_users);
        self.profile_users.extend(other.profile_users);
        self.settled.extend(other.settled);
        self.credit_users.extend(other.credit_users);
        self.lags.extend(other.lags);
    }
}

/// Writes the envelopes in one transaction. Call it with envelopes that went
/// through [`sanitize::prepare`]: it stores what it is given.
pub async fn apply(ctx: &Ctx, envs: &[&Envelope]) -> Result<Effects, sqlx::Error> {
    let mut usage = Vec::new();
    let mut sessions = Vec::new();
    let mut credit = Vec::new();
    let mut user = Vec::new();
    for env in envs {
        match &env.event {
            Event::UsageBatch(b) => usage.extend(b.events.iter()),
            Event::SessionUpsert(s) => sessions.push(s),
            Event::CreditConsume(_)
            | Event::CreditConsumeBatch(_)
            | Event::HoldOpened(_)
            | Event::HoldSettled(_)
            | Event::HoldReleased(_) => credit.push(*env),
            Event::UserPreferences(_) | Event::UserActivity(_) => user.push(*env),
        }
    }
    let mut effects = Effects::default();
    let mut tx = ctx.pg.begin().await?;
    if !usage.is_empty() {
        usage::store(&mut tx, &usage, &mut effects).await?;
    }
    if !sessions.is_empty() {
        sessions::store(&mut tx, &sessions, &mut effects).await?;
    }
    if !credit.is_empty() {
        credits::store(&mut tx, &credit, &mut effects).await?;
    }
    if !user.is_empty() {
        users::store(&mut tx, &user, &mut effects).await?;
    }
    tx.commit().await?;
    let now = Utc::now();
    for e in &usage {
        effects
            .lags
            .push((now - e.received_at).num_microseconds().unwrap_or(0) as f64 / 1e6);
    }
    Ok(effects)
}

/// Redis follow-ups after a commit. Best effort: Redis is a cache here, and
/// the reconciler repairs what a failure leaves behind.
pub async fn after_commit(ctx: &Ctx, effects: Effects) {
    let lag = metrics::histogram!("publish_to_postgres_lag_seconds");
    for l in &effects.lags {
        lag.record(*l);
    }
    if let Err(e) = credits::after_commit(ctx, &effects).await {
        tracing::warn!(error = %e, "credit follow-up failed; the reconciler will repair");
    }
    if let Err(e) = invalidate_caches(ctx, &effects).await {
        tracing::warn!(error = %e, "cache invalidation failed");
    }
}

async fn invalidate_caches(ctx: &Ctx, effects: &Effects) -> anyhow::Result<()> {
    // A ledger move changes analytics too (credits_consumed).
    let users: HashSet<&str> = effects
        .analytics_users
        .iter()
        .chain(effects.profile_users.iter())
        .chain(effects.credit_users.iter())
        .map(String::as_str)
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = users.into_iter().collect();
    let mut conn = ctx.redis.get().await?;
    crate::handlers::users::drop_cached_views(ctx, &mut conn, &users).await
}
