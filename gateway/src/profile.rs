//! The profile (docs/api.md "Profile") and its cache (docs/architecture.md,
//! "Profile cache"), with the original backend's members (docs/compatibility.md,
//! "`GET /api/users/:id/profile`"): `user`, `usage` (the last 30 UTC days) and
//! `recentTransactions` (the 10 newest ledger rows). They are read with the
//! rest of the profile on a cache miss ([`profile`]) and cached
//! with it: the workers bump the user's cache generation after every commit
//! that touches the user (usage events, sessions, ledger rows), and so does an
//! admin grant here (`redis_link::drop_cached_views`). `user.credits` is never served
//! from the cache: it is the live balance, filled on every call as `credits` is.
//!
//! Where the figures come from: the rollups the analytics read
//! (`usage_daily`, `credit_daily`, see `crate::analytics`), so `usage` agrees
//! with `GET /api/vscode/analytics?timeframe=30d`'s `summary`; the newest
//! event's time from the raw `model_usage` / `feature_usage` rows (their
//! `(user_id, occurred_at)` index); the ledger for `recentTransactions`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::analytics::DayWindow;
use crate::error::Error;
use crate::error::Result;
use crate::users::UserStore;
use redis::AsyncCommands;
use uuid::Uuid;

/// The days `usage` covers (today included, UTC).
pub const USAGE_DAYS: u32 = 30;

/// How many ledger rows `recentTransactions` shows.
pub const RECENT_TRANSACTIONS: i64 = 10;

/// The profile's `user` member, as the original backend named it.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OriginalUser {
    /// The user id (the token's `sub`; the original's Clerk id).
    pub clerk_id: String,
    /// = `email`.
    pub email: Option<String>,
    /// The stored name up to its first space; null without a name.
    pub first_name: Option<String>,
    /// The stored name after its first space; null when it has none.
    pub last_name: Option<String>,
    /// = `plan`.
    pub plan_type: String,
    /// The live balance (= `credits.balance`, never from the profile cache).
    pub credits: i64,
    /// When a VS Code session was last seen (= `vscode.last_seen_at`); null without sessions.
    #[serde(rename = "lastVSCodeActivity")]
    pub last_vscode_activity: Option<DateTime<Utc>>,
    /// Extension version of the most recently seen session (= `vscode.last_extension_version`).
    pub extension_version: Option<String>,
    /// Every usage event stored for the user (model and feature events, all time).
    pub total_api_requests: i64,
    /// `occurred_at` of the newest stored usage event; null before any.
    pub last_api_request: Option<DateTime<Utc>>,
    /// = `created_at`.
    pub created_at: DateTime<Utc>,
    /// = `preferences` (a JSON object).
    #[schema(value_type = Object)]
    pub integration_preferences: serde_json::Value,
}

/// The profile's `usage` member: the last [`USAGE_DAYS`] UTC days, today included.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OriginalUsage {
    /// Credits consumed (the ledger's consumes).
    pub total_credits_used: i64,
    /// Prompt and completion tokens of the model events.
    pub total_tokens: i64,
    /// Model events (requests).
    pub total_requests: i64,
    /// `totalCreditsUsed` / 30, rounded to two decimals.
    pub avg_credits_per_day: f64,
}

/// One entry of `recentTransactions`: a ledger row (snake_case, as the original sent it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct OriginalTransaction {
    /// The row's signed amount (a consume is negative, a grant positive).
    pub amount: i64,
    /// Its description; null when none was given or the user was erased.
    pub description: Option<String>,
    /// The ledger kind: `grant`, `consume`, `refund` or `adjustment`.
    pub transaction_type: String,
    /// When the row was written.
    pub created_at: DateTime<Utc>,
}

/// The sums behind `user` and `usage`.
#[derive(Debug, Default, sqlx::FromRow)]
struct Figures {
    total_api_requests: i64,
    last_api_request: Option<DateTime<Utc>>,
    credits_used: i64,
    tokens: i64,
    requests: i64,
}

/// Splits a display name the way the original client shows it: the first
/// word is the first name, the rest (if any) the last name.
pub fn split_name(name: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else {
        return (None, None);
    };
    match name.split_once(char::is_whitespace) {
        Some((first, rest)) => {
            let rest = rest.trim();
            (
                Some(first.to_string()),
                (!rest.is_empty()).then(|| rest.to_string()),
            )
        }
        None => (Some(name.to_string()), None),
    }
}

/// `totalCreditsUsed` spread over the window's days, two decimals.
pub fn avg_per_day(total: i64, days: u32) -> f64 {
    let avg = total as f64 / f64::from(days.max(1));
    (avg * 100.0).round() / 100.0
}

/// The `user` member from the profile's own members and the usage figures;
/// `credits` is left to the caller (the live balance).
fn original_user(
    p: &Profile,
    total_api_requests: i64,
    last_api_request: Option<DateTime<Utc>>,
) -> OriginalUser {
    let (first_name, last_name) = split_name(p.name.as_deref());
    OriginalUser {
        clerk_id: p.user_id.clone(),
        email: p.email.clone(),
        first_name,
        last_name,
        plan_type: p.plan.clone(),
        credits: p.credits.balance,
        last_vscode_activity: p.vscode.last_seen_at,
        extension_version: p.vscode.last_extension_version.clone(),
        total_api_requests,
        last_api_request,
        created_at: p.created_at,
        integration_preferences: p.preferences.clone(),
    }
}

/// Fills `user`, `usage` and `recentTransactions` of a profile read from
/// Postgres (`now` picks the window).
pub(crate) async fn fill(pg: &sqlx::PgPool, p: &mut Profile, now: DateTime<Utc>) -> Result<()> {
    let window = DayWindow::last_days(USAGE_DAYS, now);
    let figures = sqlx::query_as::<_, Figures>(
        "select \
           (select least(coalesce(sum(requests), 0), 9223372036854775807)::int8 from usage_daily \
             where user_id = $1) as total_api_requests, \
           greatest((select max(occurred_at) from model_usage where user_id = $1), \
                    (select max(occurred_at) from feature_usage where user_id = $1)) as last_api_request, \
           (select least(coalesce(sum(consumed), 0), 9223372036854775807)::int8 from credit_daily \
             where user_id = $1 and day >= $2 and day <= $3) as credits_used, \
           (select least(coalesce(sum(prompt_tokens::numeric + completion_tokens), 0), 9223372036854775807)::int8 from usage_daily \
             where user_id = $1 and kind = 'model' and day >= $2 and day <= $3) as tokens, \
           (select least(coalesce(sum(requests), 0), 9223372036854775807)::int8 from usage_daily \
             where user_id = $1 and kind = 'model' and day >= $2 and day <= $3) as requests",
    )
    .bind(&p.user_id)
    .bind(window.first)
    .bind(window.last)
    .fetch_one(pg);
    let recent = sqlx::query_as::<_, OriginalTransaction>(
        "select amount, description, kind as transaction_type, created_at from credit_transactions \
         where user_id = $1 order by created_at desc, id desc limit $2",
    )
    .bind(&p.user_id)
    .bind(RECENT_TRANSACTIONS)
    .fetch_all(pg);
    let (figures, recent) = tokio::try_join!(figures, recent)?;
    p.user = original_user(p, figures.total_api_requests, figures.last_api_request);
    p.usage = OriginalUsage {
        total_credits_used: figures.credits_used,
        total_tokens: figures.tokens,
        total_requests: figures.requests,
        avg_credits_per_day: avg_per_day(figures.credits_used, USAGE_DAYS),
    };
    p.recent_transactions = recent;
    Ok(())
}

// ---------------------------------------------------------------------------
// Profile (docs/api.md "Profile") and its cache (docs/architecture.md)
// ---------------------------------------------------------------------------

/// How long a cached profile is kept. A worker commit that touches the user
/// and every admin change drop it sooner (a generation bump, see
/// [`profile`]); the TTL bounds only what nothing invalidates: a session
/// that expires by time (`vscode.active_sessions`) and rows written to
/// Postgres behind the services' backs.
pub const PROFILE_CACHE_TTL_SECS: u64 = 60;

/// `GET /api/users/{id}/profile`: everything docs/api.md "Profile" shows about a user.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Profile {
    /// The user's id (the token's `sub`).
    pub user_id: String,
    /// Email from the token at provisioning; null when unknown or erased.
    pub email: Option<String>,
    /// Display name; null when unknown or erased.
    pub name: Option<String>,
    /// Plan name (`plans.PLAN` in the settings).
    pub plan: String,
    /// `active`, `suspended` or `deleted`.
    pub status: String,
    /// When the user was first seen.
    pub created_at: DateTime<Utc>,
    /// Newest activity the workers have stored; null before any.
    pub last_active_at: Option<DateTime<Utc>>,
    /// The balance, read live (never from the profile cache).
    #[sqlx(skip)]
    pub credits: ProfileCredits,
    /// The newest subscription row; null for users without one.
    #[sqlx(skip)]
    pub subscription: Option<ProfileSubscription>,
    /// The user's preferences: a free-form JSON object (`{}` when none).
    #[schema(value_type = Object)]
    pub preferences: serde_json::Value,
    /// The user's VS Code sessions.
    #[sqlx(flatten)]
    pub vscode: ProfileVscode,
    /// The original backend's view of the user (docs/compatibility.md); its `credits` is live.
    #[sqlx(skip)]
    pub user: OriginalUser,
    /// The original backend's usage figures over the last 30 UTC days.
    #[sqlx(skip)]
    pub usage: OriginalUsage,
    /// The 10 newest ledger rows, newest first (the original's names).
    #[sqlx(skip)]
    #[serde(rename = "recentTransactions")]
    pub recent_transactions: Vec<OriginalTransaction>,
}

/// The balance part of a profile.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProfileCredits {
    /// Spendable credits (settled balance minus open holds).
    pub balance: i64,
    /// Credits reserved by open holds.
    pub held: i64,
    /// Time of the newest settled event behind the figure; null before any.
    pub as_of: Option<DateTime<Utc>>,
}

/// A `subscriptions` row as the profile shows it.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ProfileSubscription {
    /// The subscription's id.
    pub id: Uuid,
    /// Plan of the subscription.
    pub plan: String,
    /// Its status (e.g. `active`, `canceled`).
    pub status: String,
    /// Start of the current billing period; null when not known.
    pub current_period_start: Option<DateTime<Utc>>,
    /// End of the current billing period; null when not known.
    pub current_period_end: Option<DateTime<Utc>>,
    /// When the row was created.
    pub created_at: DateTime<Utc>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
}

/// The VS Code part of a profile.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ProfileVscode {
    /// Sessions not yet expired.
    pub active_sessions: i64,
    /// Extension version of the most recently seen session; null without sessions.
    pub last_extension_version: Option<String>,
    /// When a session was last seen; null without sessions.
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// What Redis keeps under `Keys::profile`: the profile (its credits are
/// never served from here) and the user's cache generation
/// (`Keys::analytics_gen`) read before Postgres was.
#[derive(Deserialize)]
struct CachedProfile {
    gen: Option<String>,
    profile: Profile,
}

#[derive(Serialize)]
struct CachedProfileRef<'a> {
    gen: &'a Option<String>,
    profile: &'a Profile,
}

/// The profile of `user_id`, or None when the id is unknown.
///
/// Cached (docs/architecture.md, "Profile cache"): one `MGET` reads the
/// cached profile and the user's generation; a profile cached under another
/// generation is not served. A miss reads Postgres and caches the answer for
/// [`PROFILE_CACHE_TTL_SECS`] under the generation read before. The
/// generation moves on every change of what a profile shows: the workers bump
/// it after each commit touching the user (preferences, sessions, activity,
/// ledger), and [`write_redis`] bumps it for every admin change and erasure,
/// under the user's row lock, before their commit; the Postgres read takes
/// `for key share` on the user row, so it waits for such a commit and never
/// reads what came before it under the new generation. The credits (and
/// `user.credits`) are never cached: read live from the credit store on
/// every call. The original's members (`crate::profile`) are cached with the rest;
/// a profile cached without them does not parse, so it is read again (a miss). Redis down: read
/// from Postgres, not cached.
pub async fn profile(
    store: &UserStore,
    publisher: &crate::publisher::Publisher,
    user_id: &str,
) -> Result<Option<Profile>> {
    let key = store.keys.profile(user_id);
    let (k, gen_key) = (key.clone(), store.keys.analytics_gen(user_id));
    let cached = store
        .redis_link
        .run(|mut c| async move {
            redis::cmd("MGET")
                .arg(k)
                .arg(gen_key)
                .query_async::<(Option<String>, Option<String>)>(&mut c)
                .await
        })
        .await;
    let (mut found, gen) = match cached {
        Ok((raw, gen)) => {
            let view = raw.and_then(|r| serde_json::from_str::<CachedProfile>(&r).ok());
            (view.filter(|v| v.gen == gen).map(|v| v.profile), Some(gen))
        }
        Err(e) => {
            tracing::debug!(error = %e, "profile cache unavailable; reading Postgres");
            (None, None)
        }
    };
    let hit = found.is_some();
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!("profile_cache_total", "result" => result).increment(1);
    if !hit {
        found = load_profile(&store.pg, user_id).await?;
    }
    let Some(mut profile) = found else {
        return Ok(None);
    };
    let b = crate::credits::balance(&store.credits, publisher, user_id).await?;
    profile.credits = ProfileCredits {
        balance: b.balance,
        held: b.held,
        as_of: b.as_of,
    };
    profile.user.credits = b.balance;
    if let (false, Some(gen)) = (hit, gen) {
        // Best effort: a profile not cached is read from Postgres next time.
        let view = serde_json::to_string(&CachedProfileRef {
            gen: &gen,
            profile: &profile,
        })
        .map_err(|e| Error::Internal(e.into()))?;
        let stored = store
            .redis_link
            .run(|mut c| async move {
                c.set_ex::<_, _, ()>(key, view, PROFILE_CACHE_TTL_SECS)
                    .await
            })
            .await;
        if let Err(e) = stored {
            tracing::debug!(error = %e, user_id, "profile not cached");
        }
    }
    Ok(Some(profile))
}

/// The profile as Postgres has it (its credits zero: [`profile`] fills them
/// live), or None for an unknown id. `for key share` waits for an admin
/// change or erasure holding the row lock to commit (see [`profile`]); it
/// does not wait for the workers' updates.
async fn load_profile(pg: &sqlx::PgPool, user_id: &str) -> Result<Option<Profile>> {
    let found: Option<Profile> = sqlx::query_as(
        "select u.id as user_id, u.email, u.name, u.plan, u.status, u.created_at, u.last_active_at, u.preferences, \
                (select count(*) from vscode_sessions s \
                  where s.user_id = u.id and s.expires_at > now()) as active_sessions, \
                (select s.extension_version from vscode_sessions s \
                  where s.user_id = u.id order by s.last_seen_at desc limit 1) as last_extension_version, \
                (select max(s.last_seen_at) from vscode_sessions s where s.user_id = u.id) as last_seen_at \
         from users u where u.id = $1 for key share of u",
    )
    .bind(user_id)
    .fetch_optional(pg)
    .await?;
    let Some(mut profile) = found else {
        return Ok(None);
    };
    profile.subscription = sqlx::query_as(
        "select id, plan, status, current_period_start, current_period_end, created_at, updated_at \
         from subscriptions where user_id = $1 order by created_at desc limit 1",
    )
    .bind(user_id)
    .fetch_optional(pg)
    .await?;
    fill(pg, &mut profile, Utc::now()).await?;
    Ok(Some(profile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_average_is_per_day_of_the_window_with_two_decimals() {
        assert_eq!(avg_per_day(0, USAGE_DAYS), 0.0);
        assert_eq!(avg_per_day(30, USAGE_DAYS), 1.0);
        assert_eq!(avg_per_day(10, USAGE_DAYS), 0.33);
        assert_eq!(avg_per_day(20, USAGE_DAYS), 0.67);
        assert_eq!(avg_per_day(7, 0), 7.0);
    }

    #[test]
    fn the_original_members_keep_the_original_names() {
        let t = chrono::DateTime::parse_from_rfc3339("2024-03-10T10:00:00Z")
            .unwrap()
            .to_utc();
        let user = OriginalUser {
            clerk_id: "u".into(),
            email: Some("a@b.c".into()),
            first_name: Some("Ada".into()),
            last_name: Some("King Lovelace".into()),
            plan_type: "pro".into(),
            credits: 7,
            last_vscode_activity: Some(t),
            extension_version: Some("1.2.3".into()),
            total_api_requests: 4,
            last_api_request: None,
            created_at: t,
            integration_preferences: json!({"theme": "dark"}),
        };
        assert_eq!(
            serde_json::to_value(&user).unwrap(),
            json!({"clerkId": "u", "email": "a@b.c", "firstName": "Ada", "lastName": "King Lovelace",
                "planType": "pro", "credits": 7, "lastVSCodeActivity": "2024-03-10T10:00:00Z",
                "extensionVersion": "1.2.3", "totalApiRequests": 4, "lastApiRequest": null,
                "createdAt": "2024-03-10T10:00:00Z", "integrationPreferences": {"theme": "dark"}})
        );
        let usage = OriginalUsage {
            total_credits_used: 10,
            total_tokens: 20,
            total_requests: 3,
            avg_credits_per_day: 0.33,
        };
        assert_eq!(
            serde_json::to_value(&usage).unwrap(),
            json!({"totalCreditsUsed": 10, "totalTokens": 20, "totalRequests": 3, "avgCreditsPerDay": 0.33})
        );
        let tx = OriginalTransaction {
            amount: -4,
            description: None,
            transaction_type: "consume".into(),
            created_at: t,
        };
        assert_eq!(
            serde_json::to_value(&tx).unwrap(),
            json!({"amount": -4, "description": null, "transaction_type": "consume",
                "created_at": "2024-03-10T10:00:00Z"})
        );
    }
}
