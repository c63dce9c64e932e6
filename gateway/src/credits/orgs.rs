//! Organization pools (SPEC 5.11, docs/credits.md "Organizations"): whose
//! balance a user's credit request moves, and the Redis side of a pool.
//!
//! A member of an organization spends its pool, never their own balance. The
//! pool is an account like a user's, with the id `org:ORG_ID`
//! ([`Keys::org_account`]): its credits, pending and holds hashes live under
//! the hash tag `{org:ORG_ID}`, beside the member hash that holds each
//! member's cap and settled spend this period (`lua/member.lua`). A member's
//! request runs the usual credit script there with the member's id and the
//! period, which decides the pool and the cap in the same step; the member's
//! idempotency records live there too. The rate limit stays on the user's slot
//! and is decided first ([`decide_limit_apart`]).
//!
//! Which organization a user belongs to is the `org` field of the user's
//! credits hash (written by `init.lua` from Postgres and by each membership
//! change), read at most once per [`MEMBERSHIP_TTL`] per user and gateway; a
//! script on the pool that finds the user gone from the member hash answers
//! `NOT_MEMBER`, and the request runs on the user's own balance instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Utc};
use common::redis::keys::Keys;
use common::redis::scripts::{member_hold_json, scripts, Reply, Tag, UserKeys};
use uuid::Uuid;

use super::idempotency::{ttl_ms, Idem};
use super::reserve::{bad_reply, recovering};
use super::store::{copy_records, restore_records_as, CreditStore};
use crate::error::{Error, Result};
use crate::rate_limit::Deferred;

/// How long a gateway trusts what it read of a user's membership: well inside
/// the contract's 5 s for membership changes on every gateway.
pub const MEMBERSHIP_TTL: Duration = Duration::from_secs(2);

/// The most memberships one gateway remembers; past it the memory starts over.
const MEMBERSHIP_ENTRIES: usize = 100_000;

/// Whose balance a user's credit request moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Account {
    /// The user's own balance.
    Own,
    /// The pool of the organization the user is a member of.
    Member { org_id: String },
}

impl Account {
    /// The account id the credit scripts run on: the user's id or `org:ORG_ID`.
    pub fn owner(&self, user_id: &str) -> String {
        match self {
            Self::Own => user_id.to_string(),
            Self::Member { org_id } => Keys::org_account(org_id),
        }
    }

    pub fn org_id(&self) -> Option<&str> {
        match self {
            Self::Own => None,
            Self::Member { org_id } => Some(org_id),
        }
    }

    /// The member arguments of a credit script after `placeholders` empty
    /// rate-limit arguments (a member's rate limit is decided apart): the
    /// member and the period. Nothing for the user's own balance.
    pub fn args(&self, inv: &mut redis::ScriptInvocation<'_>, user_id: &str, placeholders: usize) {
        if matches!(self, Self::Own) {
            return;
        }
        for _ in 0..placeholders {
            inv.arg("");
        }
        inv.arg(user_id).arg(period(Utc::now()));
    }

    /// The request's idempotency record on this account: a member's lives
    /// under the pool's hash tag, named by route and member, so one script
    /// touches one slot and two members' keys never meet.
    pub fn idem(&self, store: &CreditStore, user_id: &str, idem: Option<Idem>) -> Option<Idem> {
        let mut idem = idem?;
        if let Self::Member { org_id } = self {
            idem.record = member_record(store, org_id, user_id, &idem.route, &idem.key);
        }
        Some(idem)
    }
}

/// The Redis name of a member's idempotency record on the pool.
pub(super) fn member_record(
    store: &CreditStore,
    org_id: &str,
    user_id: &str,
    route: &str,
    key: &str,
) -> String {
    store.keys.idempotency(
        &Keys::org_account(org_id),
        &format!("{route}@{user_id}"),
        key,
    )
}

/// The period a member's cap counts in: the calendar month, UTC (`YYYY-MM`).
pub fn period(at: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", at.year(), at.month())
}

/// The first instant of the period of `at`.
pub fn period_start(at: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::TimeZone;
    Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(at)
}

/// Work done at most once at a time per key on this gateway: a caller that
/// finds it running waits for that run to end instead of repeating it (the
/// first requests of a pool's members all finding it unloaded would
/// otherwise each read Postgres for it at once).
#[derive(Default)]
pub struct Once {
    running: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl Once {
    /// Runs `work` unless another caller runs it for `key`: then waits for
    /// that one to end and returns `None`.
    pub async fn run<T, F>(&self, key: &str, work: impl FnOnce() -> F) -> Option<T>
    where
        F: std::future::Future<Output = T>,
    {
        let lock = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running.entry(key.to_string()).or_default().clone()
        };
        match lock.clone().try_lock_owned() {
            Ok(guard) => {
                let out = work().await;
                let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                if running
                    .get(key)
                    .is_some_and(|l| std::sync::Arc::ptr_eq(l, &lock))
                {
                    running.remove(key);
                }
                drop(guard);
                Some(out)
            }
            Err(_) => {
                let _ = lock.lock().await;
                None
            }
        }
    }
}

/// What this gateway read of users' memberships, each for [`MEMBERSHIP_TTL`].
#[derive(Default)]
pub struct Memberships {
    seen: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl Memberships {
    fn get(&self, user_id: &str) -> Option<Option<String>> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get(user_id) {
            Some((org, at)) if at.elapsed() < MEMBERSHIP_TTL => Some(org.clone()),
            _ => None,
        }
    }

    fn put(&self, user_id: &str, org: Option<String>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MEMBERSHIP_ENTRIES {
            seen.clear();
        }
        seen.insert(user_id.to_string(), (org, Instant::now()));
    }

    /// Forgets what was read of `user_id` (a pool answered `NOT_MEMBER`, or
    /// this gateway changed the membership).
    pub fn forget(&self, user_id: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.remove(user_id);
    }
}

/// Whose balance `user_id`'s credit requests move now: the `org` field of the
/// user's credits hash, or Postgres when Redis does not hold the user (or
/// cannot be reached). Concurrent first requests of one user on this gateway
/// read it once ([`Once`]).
pub async fn account(store: &CreditStore, user_id: &str) -> Result<Account> {
    let mut known = store.memberships.get(user_id);
    if known.is_none() {
        let key = format!("membership:{user_id}");
        let read = store
            .once
            .run(&key, || read_membership(store, user_id))
            .await;
        known = match read {
            Some(org) => {
                let org = org?;
                store.memberships.put(user_id, org.clone());
                Some(org)
            }
            // Another request read it meanwhile (or failed to: then read here).
            None => store.memberships.get(user_id),
        };
    }
    let org = match known {
        Some(org) => org,
        None => {
            let org = read_membership(store, user_id).await?;
            store.memberships.put(user_id, org.clone());
            org
        }
    };
    Ok(match org {
        Some(org_id) => Account::Member { org_id },
        None => Account::Own,
    })
}

async fn read_membership(store: &CreditStore, user_id: &str) -> Result<Option<String>> {
    let from_redis = async {
        let mut conn = store.redis().await?;
        let (bal, org): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(store.keys.credits(user_id))
            .arg("bal")
            .arg("org")
            .query_async(&mut *conn)
            .await?;
        anyhow::Ok(bal.map(|_| org))
    }
    .await;
    match from_redis {
        Ok(Some(org)) => return Ok(org),
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "membership: Redis unavailable, reading Postgres"),
    }
    Ok(org_of_user(&store.pg, user_id).await?)
}

/// The organization `user_id` is a member of, from Postgres.
pub async fn org_of_user(pg: &sqlx::PgPool, user_id: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("select org_id from org_members where user_id = $1")
        .bind(user_id)
        .fetch_optional(pg)
        .await
}

/// A member's rate limit, decided on the user's slot before the script on the
/// pool runs (which then decides none): 429 when refused. `None` is what the
/// flow hands the pool's scripts.
pub async fn decide_limit_apart(
    store: &CreditStore,
    user_id: &str,
    limit: Option<&Deferred>,
) -> Result<()> {
    let Some(d) = limit else { return Ok(()) };
    let Some((key, l)) = d.pending() else {
        return Ok(());
    };
    let decision = crate::rate_limit::decide(
        &store.redis_link,
        &store.pg,
        store.limits.rate_policy,
        key,
        user_id,
        crate::rate_limit::CREDITS,
        l,
    )
    .await;
    let decision = d.set(decision);
    if decision.allowed {
        Ok(())
    } else {
        Err(Error::RateLimited {
            retry_after: decision.retry_after_secs.max(1),
        })
    }
}

/// The rate limit a script on `acct` decides: the user's own scripts decide
/// it themselves; a member's is decided apart first ([`decide_limit_apart`]).
pub async fn limit_for<'a>(
    store: &CreditStore,
    user_id: &str,
    acct: &Account,
    limit: Option<&'a Deferred>,
) -> Result<Option<&'a Deferred>> {
    match acct {
        Account::Own => Ok(limit),
        Account::Member { .. } => {
            decide_limit_apart(store, user_id, limit).await?;
            Ok(None)
        }
    }
}

/// Where `user_id`'s hold lives when it is not on `tried`: a hold opened
/// before the user joined an organization is on their own balance, one opened
/// as a member of an organization they left is on its pool (Postgres knows
/// which once its open has landed).
pub async fn hold_account(
    store: &CreditStore,
    user_id: &str,
    hold_id: Uuid,
    tried: &Account,
) -> Result<Option<Account>> {
    let row: Option<Option<String>> =
        sqlx::query_scalar("select org_id from credit_holds where id = $1 and user_id = $2")
            .bind(hold_id)
            .bind(user_id)
            .fetch_optional(&store.pg)
            .await?;
    let Some(org) = row else { return Ok(None) };
    let acct = match org {
        Some(org_id) => Account::Member { org_id },
        None => Account::Own,
    };
    Ok((acct != *tried).then_some(acct))
}

/// A member's balance from the settled truth: the pool (ledger minus open
/// holds) bounded by the cap's room this period, and the member's open holds.
pub async fn member_balance_from_postgres(
    store: &CreditStore,
    user_id: &str,
    org_id: &str,
) -> Result<super::store::Balance> {
    /// Pool, pool held, member held, cap, spent this period, newest ledger time.
    type Row = (i64, i64, i64, Option<i64>, i64, Option<DateTime<Utc>>);
    let row: Option<Row> = sqlx::query_as(
        "select o.credits_balance, \
                coalesce((select sum(amount) from credit_holds h where h.org_id = o.id and h.status = 'open'), 0)::int8, \
                coalesce((select sum(amount) from credit_holds h \
                          where h.org_id = o.id and h.user_id = $2 and h.status = 'open'), 0)::int8, \
                m.cap_amount, \
                coalesce((select -sum(t.amount) from credit_transactions t \
                          where t.org_id = o.id and t.user_id = $2 and t.kind = 'consume' and t.created_at >= $3), 0)::int8, \
                (select max(created_at) from credit_transactions t where t.org_id = o.id) \
         from orgs o left join org_members m on m.org_id = o.id and m.user_id = $2 where o.id = $1",
    )
    .bind(org_id)
    .bind(user_id)
    .bind(period_start(Utc::now()))
    .fetch_optional(&store.pg)
    .await?;
    let Some((pool, pool_held, mine, cap, spent, as_of)) = row else {
        return super::store::balance_from_postgres(store, user_id).await;
    };
    let spendable = pool - pool_held;
    let balance = match cap {
        Some(cap) => spendable.min((cap - spent - mine).max(0)),
        None => spendable,
    };
    Ok(super::store::Balance {
        balance,
        held: mine,
        as_of,
    })
}

/// Loads an organization's pool from Postgres into Redis (only if absent):
/// the pool's ledger balance, its open holds, the members with their caps and
/// what each has settled this period, then the members' durable idempotency
/// records under the pool. One snapshot for balance, holds and spend.
#[tracing::instrument(skip_all, fields(org_id))]
pub async fn load_org_into_redis(store: &CreditStore, org_id: &str) -> Result<()> {
    let account = Keys::org_account(org_id);
    let keys = UserKeys::new(&store.keys, &account);
    let now = Utc::now();
    let mut tx = store.pg.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    let head: Option<(i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "select o.credits_balance, \
                (select max(t.created_at) from credit_transactions t where t.org_id = o.id) \
         from orgs o where o.id = $1",
    )
    .bind(org_id)
    .fetch_optional(&mut *tx)
    .await?;
    let (ledger, as_of) = head.ok_or_else(|| Error::NotFound("no such organization".into()))?;
    let members: Vec<(String, Option<i64>, i64)> = sqlx::query_as(
        "select m.user_id, m.cap_amount, \
                coalesce((select -sum(t.amount) from credit_transactions t \
                          where t.org_id = m.org_id and t.user_id = m.user_id and t.kind = 'consume' \
                            and t.created_at >= $2), 0)::int8 \
         from org_members m where m.org_id = $1 order by m.user_id",
    )
    .bind(org_id)
    .bind(period_start(now))
    .fetch_all(&mut *tx)
    .await?;
    let holds: Vec<(Uuid, String, i64, DateTime<Utc>)> = sqlx::query_as(
        "select id, user_id, amount, expires_at from credit_holds \
         where org_id = $1 and status = 'open' order by id",
    )
    .bind(org_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    // The members' durable records first, while the pool's `bal` is absent
    // (as `load_into_redis` does for a user).
    let users: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
    restore_records_as(store, &keys, &users, |user, route, key| {
        member_record(store, org_id, user, route, key)
    })
    .await?;
    let mut inv = keys.invoke(&scripts().org_init, ttl_ms(store));
    inv.arg(ledger)
        .arg(
            as_of
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default(),
        )
        .arg(period(now))
        .arg(members.len());
    for (user, cap, spent) in &members {
        inv.arg(user).arg(cap.unwrap_or(0)).arg(*spent);
    }
    for (id, user, amount, expires) in &holds {
        inv.arg(id.to_string())
            .arg(member_hold_json(*amount, expires.timestamp_millis(), user));
    }
    let raw: Vec<String> = {
        let mut conn = store.redis().await?;
        inv.invoke_async(&mut *conn).await?
    };
    let reply = Reply::parse(raw).map_err(bad_reply)?;
    match reply.kind() {
        Tag::Lost => {
            store.recovery.enter(store).await;
            return Err(recovering());
        }
        Tag::Ok => metrics::counter!("credit_users_loaded_total").increment(1),
        _ => {}
    }
    Ok(())
}

/// A committed membership change, into Redis: the user's credits hash names
/// the organization (or no longer), and the pool's member hash holds the
/// member's cap (or no longer). Each only where Redis holds that account
/// (otherwise its next load reads Postgres). `joined`: the organization and
/// the cap (0: none); `left`: the organization the user left.
pub async fn apply_membership(
    store: &CreditStore,
    user_id: &str,
    joined: Option<(&str, i64)>,
    left: Option<&str>,
) -> Result<()> {
    let ttl = ttl_ms(store);
    let mut conn = store.redis().await?;
    if let Some(org) = left.filter(|o| Some(*o) != joined.map(|j| j.0)) {
        let keys = UserKeys::new(&store.keys, &Keys::org_account(org));
        let mut inv = keys.invoke(&scripts().member_set, ttl);
        inv.arg(user_id).arg("");
        check(inv.invoke_async::<Vec<String>>(&mut *conn).await?)?;
    }
    if let Some((org, cap)) = joined {
        let keys = UserKeys::new(&store.keys, &Keys::org_account(org));
        let mut inv = keys.invoke(&scripts().member_set, ttl);
        inv.arg(user_id).arg(cap);
        check(inv.invoke_async::<Vec<String>>(&mut *conn).await?)?;
    }
    let keys = UserKeys::new(&store.keys, user_id);
    let mut inv = keys.invoke(&scripts().user_org, ttl);
    inv.arg(joined.map(|j| j.0).unwrap_or(""));
    check(inv.invoke_async::<Vec<String>>(&mut *conn).await?)?;
    drop(conn);
    // The user's answered keyed requests follow them to the account they
    // spend from now, so a retry of one answered on the other replays
    // instead of charging again (one ledger row per answered charge).
    match joined {
        Some((org, _)) => {
            let pool = UserKeys::new(&store.keys, &Keys::org_account(org));
            copy_records(
                store,
                &pool,
                &[user_id],
                |u, route, key| member_record(store, org, u, route, key),
                &scripts().idem_adopt,
            )
            .await?;
        }
        None => {
            copy_records(
                store,
                &keys,
                &[user_id],
                |u, route, key| store.keys.idempotency(u, route, key),
                &scripts().idem_adopt,
            )
            .await?;
        }
    }
    store.memberships.forget(user_id);
    Ok(())
}

/// An admin's grant to an organization's pool, as `super::flows::grant` is
/// to a user: Postgres first (`grant_org_credits()`, once per grant id, with
/// its audit row `org.credits.grant`), then the pool's Redis balance once (by
/// the grant id) where Redis holds the pool. The answer's balance is the
/// pool's spendable balance.
pub async fn grant_pool(store: &CreditStore, g: super::GrantRequest) -> Result<super::Answer> {
    use super::answer::{to_json, GrantAnswer};
    use super::idempotency::{derived_id, Remembered};
    let org_id = &g.user_id;
    let id = derived_id("org_grant", org_id, g.key.as_deref());
    let mut tx = store.pg.begin().await?;
    let result: std::result::Result<(bool, i64), sqlx::Error> = sqlx::query_as(
        "select applied, balance from grant_org_credits($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(org_id)
    .bind(g.amount)
    .bind(&g.reason)
    .bind(serde_json::json!({"reason": g.reason, "actor": g.actor, "request_id": g.request_id}))
    .fetch_one(&mut *tx)
    .await;
    let (applied, _) = match result {
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("22003") => {
            return Err(Error::validation(
                "amount",
                format!("the balance would pass {}", common::settings::MAX_CREDITS),
            ))
        }
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("P0002") => {
            return Err(Error::NotFound("no such organization".into()))
        }
        other => other?,
    };
    if applied {
        sqlx::query(
            "insert into audit_log (actor, action, target, request_id, details) \
             values ($1, 'org.credits.grant', $2, $3, $4)",
        )
        .bind(&g.actor)
        .bind(org_id)
        .bind(&g.request_id)
        .bind(serde_json::json!({"amount": g.amount, "reason": g.reason, "transaction_id": id.to_string()}))
        .execute(&mut *tx)
        .await?;
    } else {
        let (kind, amount, reason): (String, i64, Option<String>) = sqlx::query_as(
            "select kind, amount, description from credit_transactions where id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if kind != "grant" || amount != g.amount || reason.as_deref() != Some(g.reason.as_str()) {
            return Err(Error::IdempotencyConflict(
                "this Idempotency-Key was used with another body".into(),
            ));
        }
    }
    tx.commit().await?;
    let spendable =
        super::grant::apply_in_redis(store, &Keys::org_account(org_id), id, g.amount).await?;
    let balance = match spendable {
        Some(b) => b,
        None => {
            let (ledger, held): (i64, i64) = sqlx::query_as(
                "select o.credits_balance, coalesce((select sum(amount) from credit_holds h                    where h.org_id = o.id and h.status = 'open'), 0)::int8 from orgs o where o.id = $1",
            )
            .bind(org_id)
            .fetch_one(&store.pg)
            .await?;
            ledger - held
        }
    };
    let body = to_json(&GrantAnswer {
        transaction_id: id.to_string(),
        balance,
    });
    Ok(if applied {
        super::Answer::Fresh(body)
    } else {
        super::Answer::Replayed(Remembered::Ok(body))
    })
}

fn check(raw: Vec<String>) -> Result<()> {
    match Reply::parse(raw).map_err(bad_reply)?.kind() {
        Tag::Lost => Err(recovering()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_period_is_the_utc_month() {
        let at = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        assert_eq!(period(at), "2026-12");
        assert_eq!(
            period_start(at),
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            period(Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()),
            "2027-01"
        );
    }

    #[test]
    fn a_members_account_is_the_pool() {
        let member = Account::Member {
            org_id: "acme".into(),
        };
        assert_eq!(member.owner("user_1"), "org:acme");
        assert_eq!(member.org_id(), Some("acme"));
        assert_eq!(Account::Own.owner("user_1"), "user_1");
        assert_eq!(Account::Own.org_id(), None);
    }

    #[tokio::test]
    async fn once_runs_one_of_concurrent_callers_and_the_others_wait_for_it() {
        let once = std::sync::Arc::new(Once::default());
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (once, runs) = (once.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                once.run("k", || async {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                })
                .await
                .is_some()
            }));
        }
        let mut ran = 0;
        for t in tasks {
            ran += usize::from(t.await.unwrap());
        }
        assert_eq!(
            (ran, runs.load(std::sync::atomic::Ordering::SeqCst)),
            (1, 1)
        );
        // Once ended, the next caller runs it again.
        assert_eq!(once.run("k", || async { 7 }).await, Some(7));
    }

    #[test]
    fn memberships_are_remembered_until_forgotten() {
        let m = Memberships::default();
        assert_eq!(m.get("u"), None);
        m.put("u", Some("acme".into()));
        assert_eq!(m.get("u"), Some(Some("acme".into())));
        m.put("v", None);
        assert_eq!(m.get("v"), Some(None));
        m.forget("u");
        assert_eq!(m.get("u"), None);
    }
}
