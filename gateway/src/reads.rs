//! The dashboard's reads (SPEC §5.10b, docs/api.md "Reads for the dashboard"):
//! the ledger page by page, the open holds, the rate limits in force and the
//! admin's user search. Plain functions over the stores; the decisions (the
//! query bounds, the read-only GCRA view, the LIKE pattern) are pure functions
//! with unit tests.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use common::class::Class;
use common::settings::ClassLimit;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::admin::LimitSource;
use crate::error::{Error, Result};

/// Ledger rows one page holds by default, and at most.
pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 200;
/// Users one search answers by default, and at most.
pub const DEFAULT_SEARCH: i64 = 20;
pub const MAX_SEARCH: i64 = 100;
/// Longest search text (an email is at most 254 characters).
pub const MAX_QUERY_CHARS: usize = 254;

/// `limit` of a list: `default` when absent, else an integer in `1..=max`
/// (422 naming `limit` otherwise).
pub fn page_limit(raw: Option<&str>, default: i64, max: i64) -> Result<i64> {
    match raw {
        None => Ok(default),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| Error::validation("limit", format!("must be an integer 1..={max}"))),
    }
}

/// `before` of the ledger: the `id` of a transaction (the previous page's
/// `next_before`); absent or empty is the first page.
pub fn cursor(raw: Option<&str>) -> Result<Option<Uuid>> {
    match raw.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse::<Uuid>()
            .map(Some)
            .map_err(|_| Error::validation("before", "must be a transaction id (a UUID)")),
    }
}

/// One ledger row as the dashboard shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Transaction {
    /// The transaction id (also the `before` of the next page).
    pub id: Uuid,
    /// `grant`, `consume`, `refund` or `adjustment`.
    pub kind: String,
    /// Signed: negative for a consume.
    pub amount: i64,
    /// The settled balance after this row.
    pub balance_after: i64,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub feature: Option<String>,
    pub session_id: Option<String>,
    /// The hold a settle charged, if any.
    pub hold_id: Option<Uuid>,
    /// The receipt of a charge priced by the book (docs/credits.md "Price book"); `null` for an explicit amount.
    #[schema(value_type = Option<Object>)]
    pub price: Option<serde_json::Value>,
    /// The client's free text (null after an erasure).
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// `GET /api/users/:id/credits/transactions`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TransactionsPage {
    pub user_id: String,
    /// Newest first.
    pub transactions: Vec<Transaction>,
    /// Pass as `before` for the next (older) page; `null` on the last page.
    pub next_before: Option<Uuid>,
}

/// A page of the ledger, newest first (`created_at`, then `id`, descending),
/// strictly older than the row `before` names. 422 `before` when that row is
/// not this user's.
pub async fn transactions(
    pg: &PgPool,
    user_id: &str,
    limit: i64,
    before: Option<Uuid>,
) -> Result<TransactionsPage> {
    let anchor: Option<(DateTime<Utc>, Uuid)> = match before {
        None => None,
        Some(id) => Some(
            sqlx::query_as(
                "select created_at, id from credit_transactions where id = $1 and user_id = $2",
            )
            .bind(id)
            .bind(user_id)
            .fetch_optional(pg)
            .await?
            .ok_or_else(|| Error::validation("before", "no such transaction of this user"))?,
        ),
    };
    // One more than asked tells whether an older page exists.
    let mut rows: Vec<Transaction> = sqlx::query_as(
        "select id, kind, amount, balance_after, model, provider, prompt_tokens, completion_tokens, \
                feature, session_id, hold_id, price, description, created_at \
         from credit_transactions \
         where user_id = $1 and ($2::timestamptz is null or (created_at, id) < ($2, $3)) \
         order by created_at desc, id desc limit $4",
    )
    .bind(user_id)
    .bind(anchor.map(|a| a.0))
    .bind(anchor.map(|a| a.1))
    .bind(limit + 1)
    .fetch_all(pg)
    .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_before = more.then(|| rows.last().map(|r| r.id)).flatten();
    Ok(TransactionsPage {
        user_id: user_id.to_string(),
        transactions: rows,
        next_before,
    })
}

/// One open hold.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OpenHold {
    pub hold_id: Uuid,
    pub amount: i64,
    pub expires_at: DateTime<Utc>,
    /// From the hold's Postgres row, once the worker stored it.
    pub created_at: Option<DateTime<Utc>>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub session_id: Option<String>,
}

/// `GET /api/users/:id/credits/holds`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HoldsAnswer {
    pub user_id: String,
    /// Soonest to expire first.
    pub holds: Vec<OpenHold>,
    /// Σ of their amounts.
    pub held: i64,
}

/// The holds of a user's Redis hash (hold id → `{"amount", "expires_at_ms"}`)
/// still open at `now_ms`, soonest to expire first; entries that do not parse
/// are skipped (the credit scripts write every one).
pub fn open_holds(raw: &[(String, String)], now_ms: i64) -> Vec<(Uuid, i64, i64)> {
    #[derive(serde::Deserialize)]
    struct Entry {
        amount: i64,
        expires_at_ms: i64,
    }
    let mut out: Vec<(Uuid, i64, i64)> = raw
        .iter()
        .filter_map(|(id, json)| {
            let e: Entry = serde_json::from_str(json).ok()?;
            (e.expires_at_ms > now_ms).then_some((id.parse().ok()?, e.amount, e.expires_at_ms))
        })
        .collect();
    out.sort_by_key(|&(id, _, exp)| (exp, id));
    out
}

/// The open holds: from Redis, where they live (an expired entry the next
/// credit script will drop is not shown), with what the Postgres row adds.
/// A user whose balance is not loaded in Redis has no hold there; the
/// Postgres rows still open are the answer then.
pub async fn holds(
    pg: &PgPool,
    conn: &mut common::redis::Conn,
    keys: &common::redis::keys::Keys,
    user_id: &str,
) -> Result<HoldsAnswer> {
    let (loaded, raw, (secs, micros)): (bool, Vec<(String, String)>, (i64, i64)) = redis::pipe()
        .exists(keys.credits(user_id))
        .hgetall(keys.holds(user_id))
        .cmd("TIME")
        .query_async(conn)
        .await?;
    let now_ms = secs * 1000 + micros / 1000;
    type Row = (
        Uuid,
        i64,
        DateTime<Utc>,
        DateTime<Utc>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let mut holds: Vec<OpenHold> = if loaded {
        let open = open_holds(&raw, now_ms);
        let ids: Vec<Uuid> = open.iter().map(|h| h.0).collect();
        let rows: Vec<Row> = sqlx::query_as(
            "select id, amount, expires_at, created_at, model, provider, session_id \
             from credit_holds where user_id = $1 and id = any($2)",
        )
        .bind(user_id)
        .bind(&ids)
        .fetch_all(pg)
        .await?;
        let by_id: BTreeMap<Uuid, Row> = rows.into_iter().map(|r| (r.0, r)).collect();
        open.into_iter()
            .map(|(id, amount, exp)| {
                let row = by_id.get(&id);
                OpenHold {
                    hold_id: id,
                    amount,
                    expires_at: Utc
                        .timestamp_millis_opt(exp)
                        .single()
                        .unwrap_or_else(Utc::now),
                    created_at: row.map(|r| r.3),
                    model: row.and_then(|r| r.4.clone()),
                    provider: row.and_then(|r| r.5.clone()),
                    session_id: row.and_then(|r| r.6.clone()),
                }
            })
            .collect()
    } else {
        let rows: Vec<Row> = sqlx::query_as(
            "select id, amount, expires_at, created_at, model, provider, session_id from credit_holds \
             where user_id = $1 and status = 'open' and expires_at > now() order by expires_at, id",
        )
        .bind(user_id)
        .fetch_all(pg)
        .await?;
        rows.into_iter()
            .map(|r| OpenHold {
                hold_id: r.0,
                amount: r.1,
                expires_at: r.2,
                created_at: Some(r.3),
                model: r.4,
                provider: r.5,
                session_id: r.6,
            })
            .collect()
    };
    holds.sort_by_key(|h| (h.expires_at, h.hold_id));
    let held = holds.iter().map(|h| h.amount).sum();
    Ok(HoldsAnswer {
        user_id: user_id.to_string(),
        holds,
        held,
    })
}

/// Where a class stands now, read from its stored TAT without spending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LimitState {
    /// Requests allowed per window (the burst).
    pub limit: u64,
    pub window_secs: u64,
    /// Unit-cost requests that would pass now.
    pub remaining: u64,
    /// Seconds until the bucket is full again (0: full).
    pub reset_secs: u64,
    /// The user's override, or the plan's limit.
    pub source: LimitSource,
}

/// The GCRA state of [`crate::rate_limit::gcra_n`] read without a request:
/// `(remaining, reset_secs)` at `now_us` for a stored TAT. The same
/// arithmetic as a decision's figures, so right after a request it shows
/// what that request's `RateLimit-Remaining` and `RateLimit-Reset` said.
pub fn peek(tat_us: Option<i64>, now_us: i64, limit: ClassLimit) -> (u64, u64) {
    let limit_n = limit.limit.max(1) as i64;
    let window_us = (limit.window_secs.max(1) as i64) * 1_000_000;
    let t = (window_us / limit_n).max(1);
    let tat = tat_us.unwrap_or(now_us).max(now_us);
    let room = (now_us - tat + window_us).max(0);
    let reset_us = tat - now_us;
    let reset = if reset_us <= 0 {
        0
    } else {
        ((reset_us + 999_999) / 1_000_000) as u64
    };
    (((room / t) as u64).min(limit.limit), reset)
}

/// `GET /api/vscode/user/limits`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LimitsAnswer {
    pub user_id: String,
    pub plan: String,
    /// Whether the caller has the admin role (the dashboard shows the admin controls then).
    pub admin: bool,
    /// Every endpoint class by name, and `usage_events` (the per-event budget
    /// of `usage/track`, scaled by the plan; never overridden).
    pub limits: BTreeMap<String, LimitState>,
    /// The per-user overrides in force, by class name (empty: none).
    pub overrides: BTreeMap<String, Override>,
}

/// A per-user override (`PUT /api/admin/users/{id}/rate-limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Override {
    pub limit: u64,
    pub window_secs: u64,
}

/// The limits of `classes` (name, effective limit, whether overridden) with
/// the TATs stored for them (`tats[i]` for `classes[i]`) at `now_us`.
pub fn limits_at(
    classes: &[(String, ClassLimit, bool)],
    tats: &[Option<i64>],
    now_us: i64,
) -> BTreeMap<String, LimitState> {
    classes
        .iter()
        .zip(tats.iter().chain(std::iter::repeat(&None)))
        .map(|((name, l, overridden), tat)| {
            let (remaining, reset_secs) = peek(*tat, now_us, *l);
            let source = if *overridden {
                LimitSource::Override
            } else {
                LimitSource::Plan
            };
            let state = LimitState {
                limit: l.limit,
                window_secs: l.window_secs,
                remaining,
                reset_secs,
                source,
            };
            (name.clone(), state)
        })
        .collect()
}

/// Reads every class's TAT and Redis's clock in one round trip (the keys
/// share the user's slot) and computes where each stands; nothing is spent.
pub async fn limits(
    conn: &mut common::redis::Conn,
    keys: &common::redis::keys::Keys,
    rec: &crate::users::UserRecord,
    admin: bool,
    classes: &[(String, ClassLimit, bool)],
) -> Result<LimitsAnswer> {
    let names: Vec<String> = classes
        .iter()
        .map(|c| keys.rate_limit(&rec.id, &c.0))
        .collect();
    let (tats, (secs, micros)): (Vec<Option<String>>, (i64, i64)) = redis::pipe()
        .mget(&names)
        .cmd("TIME")
        .query_async(conn)
        .await?;
    let tats: Vec<Option<i64>> = tats
        .iter()
        .map(|t| t.as_deref().and_then(|s| s.parse().ok()))
        .collect();
    let overrides = Class::ALL
        .into_iter()
        .filter_map(|c| {
            let l = rec.overrides.get(&c)?;
            let o = Override {
                limit: l.limit,
                window_secs: l.window_secs,
            };
            Some((c.as_str().to_string(), o))
        })
        .collect();
    Ok(LimitsAnswer {
        user_id: rec.id.clone(),
        plan: rec.plan.clone(),
        admin,
        limits: limits_at(classes, &tats, secs * 1_000_000 + micros),
        overrides,
    })
}

/// One user a search found.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct FoundUser {
    pub user_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub plan: String,
    pub status: String,
    /// The settled ledger balance (`users.credits_balance`).
    pub credits_balance: i64,
    pub created_at: DateTime<Utc>,
    pub last_active_at: Option<DateTime<Utc>>,
}

/// `GET /api/admin/users`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SearchAnswer {
    /// By id.
    pub users: Vec<FoundUser>,
}

/// `query` with LIKE's wildcards (`%`, `_`) and its escape (`\`) escaped, so
/// it matches only itself.
pub fn like_escape(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for ch in query.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// The search text: at most [`MAX_QUERY_CHARS`], no control characters
/// (422 naming `query`); absent or empty lists the first users by id.
pub fn search_query(raw: Option<&str>) -> Result<String> {
    let q = raw.unwrap_or("").trim();
    if q.chars().count() > MAX_QUERY_CHARS || q.chars().any(char::is_control) {
        return Err(Error::validation(
            "query",
            format!("at most {MAX_QUERY_CHARS} characters, no control characters"),
        ));
    }
    Ok(q.to_string())
}

/// Users whose id starts with `query` or whose email contains it (case
/// insensitively), by id.
pub async fn search_users(pg: &PgPool, query: &str, limit: i64) -> Result<SearchAnswer> {
    let pattern = like_escape(query);
    let users = sqlx::query_as(
        "select id as user_id, email, name, plan, status, credits_balance, created_at, last_active_at \
         from users where id like $1 || '%' escape '\\' or email ilike '%' || $1 || '%' escape '\\' \
         order by id limit $2",
    )
    .bind(pattern)
    .bind(limit)
    .fetch_all(pg)
    .await?;
    Ok(SearchAnswer { users })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::gcra_n;

    const L: ClassLimit = ClassLimit {
        limit: 20,
        window_secs: 60,
    };

    fn field(e: Error) -> String {
        match e {
            Error::Validation { field, .. } => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_page_limit_defaults_and_stays_within_its_bounds() {
        assert_eq!(page_limit(None, 50, 200).unwrap(), 50);
        assert_eq!(page_limit(Some("1"), 50, 200).unwrap(), 1);
        assert_eq!(page_limit(Some("200"), 50, 200).unwrap(), 200);
        for bad in ["0", "201", "-1", "ten", "", "1.5"] {
            assert_eq!(
                field(page_limit(Some(bad), 50, 200).unwrap_err()),
                "limit",
                "{bad}"
            );
        }
    }

    #[test]
    fn the_cursor_is_a_transaction_id_or_nothing() {
        assert_eq!(cursor(None).unwrap(), None);
        assert_eq!(cursor(Some("")).unwrap(), None);
        let id = Uuid::new_v4();
        assert_eq!(cursor(Some(&id.to_string())).unwrap(), Some(id));
        assert_eq!(field(cursor(Some("2024-01-01")).unwrap_err()), "before");
    }

    #[test]
    fn like_wildcards_match_only_themselves() {
        assert_eq!(like_escape("ab"), "ab");
        assert_eq!(like_escape("a%b_c\\"), "a\\%b\\_c\\\\");
        assert_eq!(like_escape("%"), "\\%");
    }

    #[test]
    fn a_search_text_is_bounded_and_printable() {
        assert_eq!(search_query(None).unwrap(), "");
        assert_eq!(search_query(Some("  bob ")).unwrap(), "bob");
        assert_eq!(field(search_query(Some("a\u{0}b")).unwrap_err()), "query");
        let long = "x".repeat(MAX_QUERY_CHARS + 1);
        assert_eq!(field(search_query(Some(&long)).unwrap_err()), "query");
    }

    #[test]
    fn only_unexpired_parsable_holds_are_open_soonest_first() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let raw = vec![
            (
                a.to_string(),
                r#"{"amount":5,"expires_at_ms":3000}"#.to_string(),
            ),
            (
                b.to_string(),
                r#"{"amount":7,"expires_at_ms":2000}"#.to_string(),
            ),
            (
                Uuid::new_v4().to_string(),
                r#"{"amount":9,"expires_at_ms":1000}"#.to_string(),
            ),
            (
                "not-a-uuid".to_string(),
                r#"{"amount":1,"expires_at_ms":9000}"#.to_string(),
            ),
            (Uuid::new_v4().to_string(), "garbage".to_string()),
        ];
        assert_eq!(open_holds(&raw, 1000), vec![(b, 7, 2000), (a, 5, 3000)]);
        assert!(open_holds(&raw, 3000).is_empty());
    }

    #[test]
    fn an_untouched_class_is_full() {
        assert_eq!(peek(None, 5_000_000, L), (20, 0));
        // A TAT in the past is the same as none.
        assert_eq!(peek(Some(1), 5_000_000, L), (20, 0));
    }

    #[test]
    fn a_peek_after_each_request_says_what_the_decision_said() {
        let mut tat = None;
        for i in 0..25 {
            let now = i * 700_000;
            let (d, t) = gcra_n(tat, now, L, 1);
            if d.allowed {
                tat = Some(t);
            }
            assert_eq!(
                peek(tat, now, L),
                (d.remaining, d.reset_secs),
                "request {i}"
            );
        }
    }

    #[test]
    fn a_peek_spends_nothing_and_refills_with_time() {
        let (_, t) = gcra_n(None, 0, L, 20);
        assert_eq!(peek(Some(t), 0, L), (0, 60));
        assert_eq!(peek(Some(t), 0, L), (0, 60));
        // One emission interval (3 s) later, one request's room.
        assert_eq!(peek(Some(t), 3_000_000, L), (1, 57));
        assert_eq!(peek(Some(t), 60_000_000, L), (20, 0));
    }

    #[test]
    fn limits_name_their_source_and_take_each_classes_tat() {
        let classes = vec![
            ("profile".to_string(), L, false),
            (
                "usage".to_string(),
                ClassLimit {
                    limit: 5,
                    window_secs: 10,
                },
                true,
            ),
        ];
        let (_, t) = gcra_n(None, 0, L, 4);
        let got = limits_at(&classes, &[Some(t)], 0);
        assert_eq!(got["profile"].remaining, 16);
        assert_eq!(got["profile"].source, LimitSource::Plan);
        assert_eq!(got["usage"].remaining, 5);
        assert_eq!(got["usage"].source, LimitSource::Override);
    }
}
