//! Which thresholds a batch's ledger rows crossed (docs/credits.md "Spend
//! alerts"), decided in the transaction that wrote the rows, so an alert
//! exists exactly when the movement that raised it does (the alert row is a
//! transactional outbox; the delivery job sends it).
//!
//! - `balance_below V`: a ledger row crosses it when the balance before it
//!   was at least V and after it is below V. Rows of one user are written
//!   under the user's row lock, each with its `balance_after`, so every row's
//!   "before" is the previous row's "after": the threshold re-arms by itself
//!   once the balance is at V or more again (a grant), and the next row that
//!   takes it below raises a second alert. Keyed by the crossing row's id.
//! - `spent_pct P`: the period is the calendar month (UTC); its allowance is
//!   the balance at the month's start plus what was granted in it, which is
//!   the balance now plus what was spent in it (every movement is one or the
//!   other). It fires when a batch's consume leaves spent ≥ P % of the
//!   allowance, once per period (keyed by `YYYY-MM`); an owner whose
//!   allowance is 0 or less has no percentage to cross.
//!
//! A replayed batch writes no new rows and its alerts collide on their key:
//! nothing is raised twice. Crossings older than the threshold are ignored.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// A threshold kind (the `kind` of the API and the tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    BalanceBelow,
    SpentPct,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::BalanceBelow => "balance_below",
            Kind::SpentPct => "spent_pct",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "balance_below" => Some(Kind::BalanceBelow),
            "spent_pct" => Some(Kind::SpentPct),
            _ => None,
        }
    }
}

/// One configured threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    pub kind: Kind,
    pub value: i64,
    /// When it was set: older crossings raise nothing.
    pub since: DateTime<Utc>,
}

/// One ledger row of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub transaction_id: Uuid,
    /// Signed: negative for a consume.
    pub amount: i64,
    pub balance_after: i64,
    pub at: DateTime<Utc>,
}

/// The owner's month so far, read after the batch's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    /// `YYYY-MM`.
    pub key: String,
    pub start: DateTime<Utc>,
    /// What was consumed in the period (≥ 0).
    pub spent: i64,
    /// The balance now.
    pub balance: i64,
}

/// A crossing to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub kind: Kind,
    pub value: i64,
    /// The once-only key: the row's id or the period.
    pub crossing: String,
    pub balance: i64,
    pub spent: Option<i64>,
    pub allowance: Option<i64>,
    pub transaction_id: Option<Uuid>,
}

/// The calendar month (UTC) of `now`: its key and start.
pub fn period_of(now: DateTime<Utc>) -> (String, DateTime<Utc>) {
    let start = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now);
    (format!("{:04}-{:02}", now.year(), now.month()), start)
}

/// The decision, without IO: the crossings of one owner's `moves` (in any
/// order) against its `thresholds`, with its `period` when it has
/// `spent_pct` thresholds.
pub fn crossings(
    thresholds: &[Threshold],
    moves: &[Move],
    period: Option<&Period>,
) -> Vec<Crossing> {
    let mut out = Vec::new();
    for t in thresholds {
        match t.kind {
            Kind::BalanceBelow => {
                for m in moves {
                    let before = m.balance_after as i128 - m.amount as i128;
                    if m.amount < 0
                        && m.at >= t.since
                        && before >= t.value as i128
                        && m.balance_after < t.value
                    {
                        out.push(Crossing {
                            kind: t.kind,
                            value: t.value,
                            crossing: m.transaction_id.to_string(),
                            balance: m.balance_after,
                            spent: None,
                            allowance: None,
                            transaction_id: Some(m.transaction_id),
                        });
                    }
                }
            }
            Kind::SpentPct => {
                let Some(p) = period else { continue };
                // The newest consume of the period that came after the threshold was set.
                let Some(last) = moves
                    .iter()
                    .filter(|m| m.amount < 0 && m.at >= p.start && m.at >= t.since)
                    .max_by_key(|m| m.at)
                else {
                    continue;
                };
                let allowance = p.balance as i128 + p.spent as i128;
                if allowance > 0 && p.spent as i128 * 100 >= t.value as i128 * allowance {
                    out.push(Crossing {
                        kind: t.kind,
                        value: t.value,
                        crossing: p.key.clone(),
                        balance: p.balance,
                        spent: Some(p.spent),
                        allowance: Some(allowance.min(i64::MAX as i128) as i64),
                        transaction_id: Some(last.transaction_id),
                    });
                }
            }
        }
    }
    out
}

/// An owner of alerts as the credit handler names the account of a settled
/// row: a user id, or an organization's pool `org:ORG_ID` (kind `org`).
fn owner_of(account: &str) -> (&'static str, &str) {
    match account.strip_prefix("org:") {
        Some(org) => ("org", org),
        None => ("user", account),
    }
}

/// Records the crossings of a batch's settled ledger rows, `settled` being
/// (account, transaction id) as the credit handler collected them: a user's
/// own rows count for the user's thresholds, a member's charges on a pool for
/// the organization's (its balance is the pool's). In the batch's
/// transaction, after its rows are written (the users' and organizations'
/// rows are locked by then). One indexed read of the owners' thresholds;
/// owners without any cost nothing more.
pub async fn record(
    tx: &mut Transaction<'_, Postgres>,
    settled: &[(String, Uuid)],
) -> Result<u64, sqlx::Error> {
    if settled.is_empty() {
        return Ok(0);
    }
    let owners: HashSet<(&str, &str)> = settled.iter().map(|(a, _)| owner_of(a)).collect();
    let (kinds, ids): (Vec<&str>, Vec<&str>) = owners.into_iter().unzip();
    let rows: Vec<(String, String, String, i64, DateTime<Utc>)> = sqlx::query_as(
        "select t.owner_kind, t.owner_id, t.kind, t.value, t.created_at from alert_thresholds t \
         join unnest($1::text[], $2::text[]) o(kind, id) on t.owner_kind = o.kind and t.owner_id = o.id",
    )
    .bind(&kinds)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut thresholds: HashMap<(String, String), Vec<Threshold>> = HashMap::new();
    for (owner_kind, owner, kind, value, since) in rows {
        if let Some(kind) = Kind::parse(&kind) {
            thresholds
                .entry((owner_kind, owner))
                .or_default()
                .push(Threshold { kind, value, since });
        }
    }
    let key = |account: &str| {
        let (k, id) = owner_of(account);
        (k.to_string(), id.to_string())
    };
    let of_tx: HashMap<Uuid, (String, String)> = settled
        .iter()
        .map(|(a, id)| (*id, key(a)))
        .filter(|(_, o)| thresholds.contains_key(o))
        .collect();
    let tx_ids: Vec<Uuid> = of_tx.keys().copied().collect();
    let ledger: Vec<(Uuid, i64, i64, DateTime<Utc>)> = sqlx::query_as(
        "select id, amount, balance_after, created_at from credit_transactions where id = any($1)",
    )
    .bind(&tx_ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut moves: HashMap<(String, String), Vec<Move>> = HashMap::new();
    for (transaction_id, amount, balance_after, at) in ledger {
        let Some(owner) = of_tx.get(&transaction_id) else {
            continue;
        };
        moves.entry(owner.clone()).or_default().push(Move {
            transaction_id,
            amount,
            balance_after,
            at,
        });
    }
    let (period_key, start) = period_of(Utc::now());
    let mut periods: HashMap<(String, String), Period> = HashMap::new();
    for (owner_kind, sql) in [
        (
            "user",
            "select u.id, u.credits_balance, \
               coalesce((select -sum(t.amount) from credit_transactions t \
                         where t.user_id = u.id and t.org_id is null and t.created_at >= $2 and t.amount < 0), 0)::bigint \
             from users u where u.id = any($1)",
        ),
        (
            "org",
            "select o.id, o.credits_balance, \
               coalesce((select -sum(t.amount) from credit_transactions t \
                         where t.org_id = o.id and t.created_at >= $2 and t.amount < 0), 0)::bigint \
             from orgs o where o.id = any($1)",
        ),
    ] {
        let pct: Vec<&str> = thresholds
            .iter()
            .filter(|((k, o), ts)| {
                k == owner_kind
                    && moves.contains_key(&(k.clone(), o.clone()))
                    && ts.iter().any(|t| t.kind == Kind::SpentPct)
            })
            .map(|((_, o), _)| o.as_str())
            .collect();
        if pct.is_empty() {
            continue;
        }
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(sql)
            .bind(&pct)
            .bind(start)
            .fetch_all(&mut **tx)
            .await?;
        for (owner, balance, spent) in rows {
            periods.insert(
                (owner_kind.to_string(), owner),
                Period {
                    key: period_key.clone(),
                    start,
                    spent,
                    balance,
                },
            );
        }
    }
    let mut found: Vec<((String, String), Crossing)> = Vec::new();
    for (owner, ts) in &thresholds {
        let Some(ms) = moves.get(owner) else { continue };
        for c in crossings(ts, ms, periods.get(owner)) {
            found.push((owner.clone(), c));
        }
    }
    insert(tx, &found).await
}

/// Inserts the crossings (once each, by their key); an owner with a webhook
/// gets them due now. Deleted users raise nothing.
async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    found: &[((String, String), Crossing)],
) -> Result<u64, sqlx::Error> {
    if found.is_empty() {
        return Ok(0);
    }
    let owner_kinds: Vec<&str> = found.iter().map(|((k, _), _)| k.as_str()).collect();
    let owners: Vec<&str> = found.iter().map(|((_, o), _)| o.as_str()).collect();
    let kinds: Vec<&str> = found.iter().map(|(_, c)| c.kind.as_str()).collect();
    let values: Vec<i64> = found.iter().map(|(_, c)| c.value).collect();
    let keys: Vec<&str> = found.iter().map(|(_, c)| c.crossing.as_str()).collect();
    let balances: Vec<i64> = found.iter().map(|(_, c)| c.balance).collect();
    let spent: Vec<Option<i64>> = found.iter().map(|(_, c)| c.spent).collect();
    let allowance: Vec<Option<i64>> = found.iter().map(|(_, c)| c.allowance).collect();
    let txids: Vec<Option<Uuid>> = found.iter().map(|(_, c)| c.transaction_id).collect();
    let n = sqlx::query(
        "insert into alerts (owner_kind, owner_id, kind, value, crossing, balance, spent, allowance, transaction_id, \
                             next_attempt_at) \
         select r.owner_kind, r.owner, r.kind, r.value, r.crossing, r.balance, r.spent, r.allowance, r.txid, \
                case when c.webhook_url is not null then now() end \
         from unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::uuid[], \
                     $9::text[]) \
              as r(owner, kind, value, crossing, balance, spent, allowance, txid, owner_kind) \
         left join users u on r.owner_kind = 'user' and u.id = r.owner \
         left join alert_configs c on c.owner_kind = r.owner_kind and c.owner_id = r.owner \
         where r.owner_kind = 'org' or u.status <> 'deleted' \
         on conflict (owner_kind, owner_id, kind, value, crossing) do nothing",
    )
    .bind(&owners)
    .bind(&kinds)
    .bind(&values)
    .bind(&keys)
    .bind(&balances)
    .bind(&spent)
    .bind(&allowance)
    .bind(&txids)
    .bind(&owner_kinds)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if n > 0 {
        metrics::counter!("alerts_raised_total").increment(n);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 3, 12, 0, 0).unwrap()
    }

    fn below(value: i64) -> Threshold {
        Threshold {
            kind: Kind::BalanceBelow,
            value,
            since: t0(),
        }
    }

    fn mv(n: u128, amount: i64, balance_after: i64) -> Move {
        Move {
            transaction_id: Uuid::from_u128(n),
            amount,
            balance_after,
            at: t0() + chrono::Duration::seconds(n as i64),
        }
    }

    #[test]
    fn a_consume_that_takes_the_balance_below_the_value_crosses_once() {
        // 100 → 60 → 40 → 30 with a threshold of 50: only the row 60 → 40.
        let moves = [mv(1, -40, 60), mv(2, -20, 40), mv(3, -10, 30)];
        let c = crossings(&[below(50)], &moves, None);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].crossing, Uuid::from_u128(2).to_string());
        assert_eq!(c[0].balance, 40);
        // Landing exactly on the value is not below it; leaving it is.
        assert!(crossings(&[below(50)], &[mv(1, -10, 50)], None).is_empty());
        assert_eq!(crossings(&[below(50)], &[mv(1, -1, 49)], None).len(), 1);
    }

    #[test]
    fn a_grant_above_the_value_re_arms_it_and_the_next_crossing_raises_again() {
        // 40 (below), a grant to 140, then 140 → 30: a second crossing; 30 → 20 none.
        let moves = [mv(1, 100, 140), mv(2, -110, 30), mv(3, -10, 20)];
        let c = crossings(&[below(50)], &moves, None);
        assert_eq!(
            c.iter().map(|c| c.crossing.clone()).collect::<Vec<_>>(),
            [Uuid::from_u128(2).to_string()]
        );
        // Grants never cross downwards.
        assert!(crossings(&[below(50)], &[mv(1, 100, 30)], None).is_empty());
    }

    #[test]
    fn crossings_before_the_threshold_was_set_raise_nothing() {
        let mut old = mv(1, -40, 10);
        old.at = t0() - chrono::Duration::seconds(1);
        assert!(crossings(&[below(50)], &[old], None).is_empty());
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let top = (1i64 << 53) - 1;
        // From the largest balance to 0 in one consume; sums past i64 stay exact.
        assert_eq!(crossings(&[below(1)], &[mv(1, -top, 0)], None).len(), 1);
        assert!(crossings(&[below(top)], &[mv(1, i64::MIN + 1, i64::MAX)], None).is_empty());
        let p = Period {
            key: "2026-12".into(),
            start: t0(),
            spent: top,
            balance: top,
        };
        let pct = Threshold {
            kind: Kind::SpentPct,
            value: 50,
            since: t0(),
        };
        assert_eq!(crossings(&[pct], &[mv(1, -1, top)], Some(&p)).len(), 1);
    }

    fn pct(value: i64) -> Threshold {
        Threshold {
            kind: Kind::SpentPct,
            value,
            since: t0(),
        }
    }

    fn period(spent: i64, balance: i64) -> Period {
        Period {
            key: "2026-12".into(),
            start: t0() - chrono::Duration::days(2),
            spent,
            balance,
        }
    }

    #[test]
    fn spent_pct_fires_at_the_percentage_of_balance_plus_spent_once_per_period() {
        // Allowance 100 (20 left, 80 spent): 80 % reached, 81 % not.
        let c = crossings(&[pct(80), pct(81)], &[mv(1, -5, 20)], Some(&period(80, 20)));
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].value, c[0].crossing.as_str()), (80, "2026-12"));
        assert_eq!((c[0].spent, c[0].allowance), (Some(80), Some(100)));
        // No consume in the batch, or no allowance: nothing.
        assert!(crossings(&[pct(80)], &[mv(1, 50, 20)], Some(&period(80, 20))).is_empty());
        assert!(crossings(&[pct(1)], &[mv(1, -5, -5)], Some(&period(5, -10))).is_empty());
        assert!(crossings(&[pct(80)], &[mv(1, -5, 20)], None).is_empty());
    }

    #[test]
    fn the_period_is_the_calendar_month_in_utc() {
        let (key, start) = period_of(Utc.with_ymd_and_hms(2026, 2, 28, 23, 59, 59).unwrap());
        assert_eq!(key, "2026-02");
        assert_eq!(start, Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap());
        assert_eq!(
            period_of(Utc.with_ymd_and_hms(2026, 12, 31, 0, 0, 0).unwrap()).0,
            "2026-12"
        );
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in [Kind::BalanceBelow, Kind::SpentPct] {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("balance"), None);
    }
}
