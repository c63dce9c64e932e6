//! Organizations (SPEC 5.11, docs/api.md "Organizations"): create one, manage
//! its members and their caps, read its pool. The money itself (a member's
//! spend, a grant to the pool) is in `crate::credits::orgs`.
//!
//! Every change is one Postgres transaction with its audit row; a membership
//! change writes Redis before the commit (as `audit::change_user` does), so a
//! change Redis did not take rolls back and answers 503, and every gateway
//! sees it within [`crate::credits::orgs::MEMBERSHIP_TTL`].

use chrono::{DateTime, Utc};
use common::valid::Label;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;

use crate::audit::{self, Action};
use crate::credits::orgs::{apply_membership, period, period_start};
use crate::credits::{Amount, CreditStore};
use crate::error::{Error, Result};

/// An organization's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrgPlan {
    Team,
    Enterprise,
}

impl OrgPlan {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Team => "team",
            Self::Enterprise => "enterprise",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "enterprise" {
            Self::Enterprise
        } else {
            Self::Team
        }
    }
}

/// A member's role in their organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "admin" {
            Self::Admin
        } else {
            Self::Member
        }
    }
}

/// The period a cap counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CapPeriod {
    /// The calendar month, UTC.
    Month,
}

/// `PUT /api/admin/orgs/:org_id`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrgBody {
    #[schema(value_type = String, min_length = 1, max_length = 128)]
    pub name: Label<128>,
    pub plan: OrgPlan,
}

/// A member's cap: at most `amount` credits of the pool per `period`.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Cap {
    pub amount: Amount,
    pub period: CapPeriod,
}

/// `PUT /api/orgs/:org_id/members/:user_id`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    pub role: Role,
    /// No cap: the member may spend the whole pool.
    #[serde(default)]
    pub cap: Option<Cap>,
}

/// An organization, as its changes answer it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrgAnswer {
    pub org_id: String,
    pub name: String,
    pub plan: OrgPlan,
    pub created_at: DateTime<Utc>,
    /// Whether this request created it (else it was there and took the name and plan).
    pub created: bool,
}

/// A cap as read back.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CapAnswer {
    pub amount: i64,
    pub period: CapPeriod,
}

/// One member of a pool, this period.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MemberAnswer {
    pub user_id: String,
    pub role: Role,
    pub cap: Option<CapAnswer>,
    /// Credits of the pool the member spent this period (settled charges).
    pub spent: i64,
    /// Credits the member holds now (open holds).
    pub held: i64,
}

/// `GET /api/orgs/:org_id`: the pool and its members' spend this period.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PoolAnswer {
    pub org_id: String,
    pub name: String,
    pub plan: OrgPlan,
    /// What the pool can spend now: the ledger's figure minus what is held.
    pub balance: i64,
    /// Credits held by open holds of members.
    pub held: i64,
    /// The period `spent` counts in (`YYYY-MM`, UTC).
    pub period: String,
    pub members: Vec<MemberAnswer>,
}

/// A member as `PUT …/members/:user_id` answers it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MembershipAnswer {
    pub org_id: String,
    pub user_id: String,
    pub role: Role,
    pub cap: Option<CapAnswer>,
}

/// Creates or renames an organization (admins).
pub async fn put_org(
    store: &CreditStore,
    by: Action<'_>,
    org_id: &str,
    body: &OrgBody,
) -> Result<OrgAnswer> {
    let mut tx = store.pg.begin().await?;
    let row: (String, String, DateTime<Utc>, bool) = sqlx::query_as(
        "insert into orgs (id, name, plan) values ($1, $2, $3) \
         on conflict (id) do update set name = excluded.name, plan = excluded.plan, updated_at = now() \
         returning name, plan, created_at, (xmax = 0)",
    )
    .bind(org_id)
    .bind(body.name.as_str())
    .bind(body.plan.as_str())
    .fetch_one(&mut *tx)
    .await?;
    let created = row.3;
    audit::insert(
        &mut tx,
        by,
        &json!({"org_id": org_id, "name": row.0, "plan": row.1, "created": created}),
    )
    .await?;
    tx.commit().await?;
    Ok(OrgAnswer {
        org_id: org_id.to_string(),
        name: row.0,
        plan: OrgPlan::parse(&row.1),
        created_at: row.2,
        created,
    })
}

/// May `caller` manage `org_id`'s members and read its pool: an admin, or an
/// admin of that organization. 404 when it does not exist, 403 otherwise.
pub async fn authorize(
    store: &CreditStore,
    org_id: &str,
    caller: &str,
    is_admin: bool,
) -> Result<()> {
    let row: Option<(bool,)> = sqlx::query_as(
        "select exists (select 1 from org_members m \
                        where m.org_id = o.id and m.user_id = $2 and m.role = 'admin') \
         from orgs o where o.id = $1",
    )
    .bind(org_id)
    .bind(caller)
    .fetch_optional(&store.pg)
    .await?;
    match row {
        None => Err(Error::NotFound("no such organization".into())),
        Some(_) if is_admin => Ok(()),
        Some((true,)) => Ok(()),
        Some((false,)) => Err(Error::Forbidden(
            "only the organization's admins and admins manage it".into(),
        )),
    }
}

/// Locks the organization's row (its membership changes serialize here).
async fn lock_org(conn: &mut PgConnection, org_id: &str) -> Result<()> {
    let found: Option<String> = sqlx::query_scalar("select id from orgs where id = $1 for update")
        .bind(org_id)
        .fetch_optional(&mut *conn)
        .await?;
    found
        .map(|_| ())
        .ok_or_else(|| Error::NotFound("no such organization".into()))
}

/// Adds a member or changes their role and cap. The user must exist (the
/// caller provisions them); a member of another organization is 422 naming
/// `user_id`. Redis is written before the commit.
pub async fn put_member(
    store: &CreditStore,
    by: Action<'_>,
    org_id: &str,
    user_id: &str,
    body: &MemberBody,
) -> Result<MembershipAnswer> {
    let mut tx = store.pg.begin().await?;
    lock_org(&mut tx, org_id).await?;
    let known: Option<String> = sqlx::query_scalar("select id from users where id = $1 for update")
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
    known.ok_or_else(|| Error::NotFound("no such user".into()))?;
    let elsewhere: Option<String> =
        sqlx::query_scalar("select org_id from org_members where user_id = $1 and org_id <> $2")
            .bind(user_id)
            .bind(org_id)
            .fetch_optional(&mut *tx)
            .await?;
    if elsewhere.is_some() {
        return Err(Error::validation(
            "user_id",
            "is a member of another organization; a user belongs to at most one",
        ));
    }
    let cap = body.cap.map(|c| c.amount.get());
    sqlx::query(
        "insert into org_members (org_id, user_id, role, cap_amount, cap_period) \
         values ($1, $2, $3, $4, case when $4::int8 is null then null else 'month' end) \
         on conflict (org_id, user_id) do update set role = excluded.role, \
           cap_amount = excluded.cap_amount, cap_period = excluded.cap_period, updated_at = now()",
    )
    .bind(org_id)
    .bind(user_id)
    .bind(body.role.as_str())
    .bind(cap)
    .execute(&mut *tx)
    .await?;
    audit::insert(
        &mut tx,
        by,
        &json!({"org_id": org_id, "user_id": user_id, "role": body.role.as_str(), "cap": cap}),
    )
    .await?;
    apply_membership(store, user_id, Some((org_id, cap.unwrap_or(0))), None).await?;
    tx.commit().await?;
    Ok(MembershipAnswer {
        org_id: org_id.to_string(),
        user_id: user_id.to_string(),
        role: body.role,
        cap: body.cap.map(|c| CapAnswer {
            amount: c.amount.get(),
            period: c.period,
        }),
    })
}

/// Removes a member (404 when not one). Their open holds on the pool stay
/// theirs to settle or release; from now on they spend their own balance.
pub async fn remove_member(
    store: &CreditStore,
    by: Action<'_>,
    org_id: &str,
    user_id: &str,
) -> Result<()> {
    let mut tx = store.pg.begin().await?;
    lock_org(&mut tx, org_id).await?;
    let removed = sqlx::query("delete from org_members where org_id = $1 and user_id = $2")
        .bind(org_id)
        .bind(user_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if removed == 0 {
        return Err(Error::NotFound("no such member".into()));
    }
    audit::insert(&mut tx, by, &json!({"org_id": org_id, "user_id": user_id})).await?;
    apply_membership(store, user_id, None, Some(org_id)).await?;
    tx.commit().await?;
    Ok(())
}

/// The pool and its members' spend this period, from the settled truth
/// (Postgres: the ledger and the open holds), so its figures add up with
/// the ledger's.
pub async fn read_pool(store: &CreditStore, org_id: &str) -> Result<PoolAnswer> {
    let now = Utc::now();
    let head: Option<(String, String, i64, i64)> = sqlx::query_as(
        "select o.name, o.plan, o.credits_balance, \
                coalesce((select sum(amount) from credit_holds h where h.org_id = o.id and h.status = 'open'), 0)::int8 \
         from orgs o where o.id = $1",
    )
    .bind(org_id)
    .fetch_optional(&store.pg)
    .await?;
    let (name, plan, ledger, held) =
        head.ok_or_else(|| Error::NotFound("no such organization".into()))?;
    let rows: Vec<(String, String, Option<i64>, i64, i64)> = sqlx::query_as(
        "select m.user_id, m.role, m.cap_amount, \
                coalesce((select -sum(t.amount) from credit_transactions t \
                          where t.org_id = m.org_id and t.user_id = m.user_id and t.kind = 'consume' \
                            and t.created_at >= $2), 0)::int8, \
                coalesce((select sum(h.amount) from credit_holds h \
                          where h.org_id = m.org_id and h.user_id = m.user_id and h.status = 'open'), 0)::int8 \
         from org_members m where m.org_id = $1 order by m.user_id",
    )
    .bind(org_id)
    .bind(period_start(now))
    .fetch_all(&store.pg)
    .await?;
    Ok(PoolAnswer {
        org_id: org_id.to_string(),
        name,
        plan: OrgPlan::parse(&plan),
        balance: ledger - held,
        held,
        period: period(now),
        members: rows
            .into_iter()
            .map(|(user_id, role, cap, spent, held)| MemberAnswer {
                user_id,
                role: Role::parse(&role),
                cap: cap.map(|amount| CapAnswer {
                    amount,
                    period: CapPeriod::Month,
                }),
                spent,
                held,
            })
            .collect(),
    })
}

/// One member's charges on the pool over an analytics window.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MemberSpend {
    pub user_id: String,
    pub credits: i64,
    pub charges: i64,
}

/// One day's charges on the pool (UTC).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DaySpend {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub credits: i64,
    pub charges: i64,
}

/// One model's charges on the pool (`model` and `provider` null for charges without them).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelSpend {
    pub model: Option<String>,
    pub provider: Option<String>,
    pub credits: i64,
    pub charges: i64,
}

/// `GET /api/orgs/:org_id/analytics?days=N`: what the pool paid for over the
/// window, by member, day and model, from the ledger.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PoolAnalytics {
    pub org_id: String,
    pub days: u32,
    /// Credits the members spent from the pool in the window.
    pub credits: i64,
    pub charges: i64,
    /// Credits granted to the pool in the window.
    pub granted: i64,
    pub by_member: Vec<MemberSpend>,
    pub by_day: Vec<DaySpend>,
    pub by_model: Vec<ModelSpend>,
}

/// The pool's analytics over the last `days` days (today included, UTC), in
/// one repeatable-read snapshot so the parts add up.
pub async fn pool_analytics(store: &CreditStore, org_id: &str, days: u32) -> Result<PoolAnalytics> {
    let today = Utc::now().date_naive();
    let first = today - chrono::Days::new(u64::from(days.max(1)) - 1);
    let since = first.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    let mut tx = store.pg.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    let rows = "from credit_transactions t where t.org_id = $1 and t.created_at >= $2";
    let members: Vec<(Option<String>, i64, i64)> = sqlx::query_as(&format!(
        "select t.user_id, (-sum(t.amount))::int8, count(*) {rows} and t.kind = 'consume' \
         group by t.user_id order by 2 desc, 1"
    ))
    .bind(org_id)
    .bind(since)
    .fetch_all(&mut *tx)
    .await?;
    let by_day: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "select to_char((t.created_at at time zone 'UTC')::date, 'YYYY-MM-DD'), (-sum(t.amount))::int8, count(*) \
         {rows} and t.kind = 'consume' group by 1 order by 1"
    ))
    .bind(org_id)
    .bind(since)
    .fetch_all(&mut *tx)
    .await?;
    let by_model: Vec<(Option<String>, Option<String>, i64, i64)> = sqlx::query_as(&format!(
        "select t.model, t.provider, (-sum(t.amount))::int8, count(*) {rows} and t.kind = 'consume' \
         group by 1, 2 order by 3 desc, 1, 2"
    ))
    .bind(org_id)
    .bind(since)
    .fetch_all(&mut *tx)
    .await?;
    let granted: i64 = sqlx::query_scalar(&format!(
        "select coalesce(sum(t.amount), 0)::int8 {rows} and t.kind = 'grant'"
    ))
    .bind(org_id)
    .bind(since)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let by_member: Vec<MemberSpend> = members
        .into_iter()
        .map(|(user, credits, charges)| MemberSpend {
            user_id: user.unwrap_or_default(),
            credits,
            charges,
        })
        .collect();
    Ok(PoolAnalytics {
        org_id: org_id.to_string(),
        days,
        credits: by_member.iter().map(|m| m.credits).sum(),
        charges: by_member.iter().map(|m| m.charges).sum(),
        granted,
        by_member,
        by_day: by_day
            .into_iter()
            .map(|(date, credits, charges)| DaySpend {
                date,
                credits,
                charges,
            })
            .collect(),
        by_model: by_model
            .into_iter()
            .map(|(model, provider, credits, charges)| ModelSpend {
                model,
                provider,
                credits,
                charges,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_take_only_the_named_members() {
        let b: MemberBody = serde_json::from_value(
            json!({"role": "admin", "cap": {"amount": 500, "period": "month"}}),
        )
        .unwrap();
        assert_eq!(b.role, Role::Admin);
        assert_eq!(b.cap.unwrap().amount.get(), 500);
        let b: MemberBody = serde_json::from_value(json!({"role": "member"})).unwrap();
        assert!(b.cap.is_none());
        for bad in [
            json!({"role": "owner"}),
            json!({"role": "member", "cap": {"amount": 0, "period": "month"}}),
            json!({"role": "member", "cap": {"amount": 5, "period": "week"}}),
            json!({"role": "member", "extra": 1}),
        ] {
            assert!(
                serde_json::from_value::<MemberBody>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let o: OrgBody = serde_json::from_value(json!({"name": "Acme", "plan": "team"})).unwrap();
        assert_eq!(o.plan, OrgPlan::Team);
        assert!(
            serde_json::from_value::<OrgBody>(json!({"name": "Acme", "plan": "free"})).is_err()
        );
    }

    #[test]
    fn plans_and_roles_read_back_as_written() {
        for p in [OrgPlan::Team, OrgPlan::Enterprise] {
            assert_eq!(OrgPlan::parse(p.as_str()), p);
        }
        for r in [Role::Member, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()), r);
        }
    }
}
