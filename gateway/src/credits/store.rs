//! The Postgres side of credits: the settled balance, loading a user's
//! ledger, open holds and durable idempotency records into Redis, and the
//! durable answer of a keyed request whose Redis record went stale.

use chrono::{DateTime, Utc};
use common::redis::scripts::{hold_json, scripts, Reply, Tag, UserKeys};
use serde_json::Value;
use uuid::Uuid;

use super::flows::publish_expired;
use super::idempotency::{ttl_ms, Answer, Idem, Remembered};
use super::reserve::{bad_reply, recovering, remember};
use crate::error::{Error, Result};
use crate::publisher::Publisher;

/// What a user can spend now, and what is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub balance: i64,
    pub held: i64,
    /// Time of the newest settled event behind the figure.
    pub as_of: Option<DateTime<Utc>>,
}

/// Loads a user's credits from Postgres into Redis (only if absent): the
/// ledger balance, the open holds, and the newest ledger time. One statement,
/// so balance and holds are one snapshot.
/// An organization's pool (`org:ORG_ID`) loads as `super::orgs::load_org_into_redis` does.
#[tracing::instrument(skip_all, fields(user_id))]
pub async fn load_into_redis(store: &CreditStore, user_id: &str) -> Result<()> {
    if let Some(org_id) = common::redis::keys::Keys::org_of_account(user_id) {
        return super::orgs::load_org_into_redis(store, org_id).await;
    }
    type Row = (
        i64,
        Option<DateTime<Utc>>,
        Vec<Uuid>,
        Vec<i64>,
        Vec<DateTime<Utc>>,
        Option<String>,
    );
    let keys = UserKeys::new(&store.keys, user_id);
    // The durable idempotency records first, while `bal` is absent: a keyed
    // script that runs meanwhile finds `bal` missing and loads too, so none
    // can decide before the user's records are back (after a Redis loss,
    // the recovery waited for every earlier event, so Postgres has them all).
    // Before the ledger is read, so the snapshot INIT writes is no older
    // than necessary (a grant's own Redis step may be waiting for it).
    restore_records(store, &keys, user_id).await?;
    let row: Option<Row> = sqlx::query_as(
        "select u.credits_balance, \
                (select max(t.created_at) from credit_transactions t where t.user_id = u.id and t.org_id is null), \
                coalesce(h.ids, '{}'), coalesce(h.amounts, '{}'), coalesce(h.expires, '{}'), \
                (select m.org_id from org_members m where m.user_id = u.id) \
         from users u \
         left join lateral ( \
             select array_agg(id order by id) ids, array_agg(amount order by id) amounts, \
                    array_agg(expires_at order by id) expires \
             from credit_holds where user_id = u.id and org_id is null and status = 'open') h on true \
         where u.id = $1",
    )
    .bind(user_id)
    .fetch_optional(&store.pg)
    .await?;
    let (ledger, as_of, ids, amounts, expires, org) =
        row.ok_or_else(|| Error::NotFound("no such user".into()))?;
    let mut inv = keys.invoke(&scripts().init, ttl_ms(store));
    inv.arg(ledger)
        .arg(
            as_of
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default(),
        )
        .arg(org.unwrap_or_default());
    for ((id, amount), exp) in ids.iter().zip(&amounts).zip(&expires) {
        inv.arg(id.to_string())
            .arg(hold_json(*amount, exp.timestamp_millis()));
    }
    let raw: Vec<String> = {
        let mut conn = store.redis().await?;
        inv.invoke_async(&mut *conn).await?
    };
    let reply = Reply::parse(raw).map_err(bad_reply)?;
    if reply.kind() == Tag::Lost {
        store.recovery.enter(store).await;
        return Err(recovering());
    }
    metrics::counter!("credit_users_loaded_total").increment(u64::from(reply.kind() == Tag::Ok));
    Ok(())
}

/// Restores a user's unexpired durable idempotency records into Redis as
/// `done`, in chunks, only while Redis does not hold the user's balance.
pub(super) async fn restore_records(
    store: &CreditStore,
    keys: &UserKeys,
    user_id: &str,
) -> Result<()> {
    restore_records_as(store, keys, &[user_id], |user, route, key| {
        store.keys.idempotency(user, route, key)
    })
    .await
}

/// [`restore_records`] for the records of `users` onto the account of `keys`,
/// each under the Redis name `name(user, route, key)` (an organization's pool
/// holds its members' records, `super::orgs`).
pub(super) async fn restore_records_as(
    store: &CreditStore,
    keys: &UserKeys,
    users: &[&str],
    name: impl Fn(&str, &str, &str) -> String,
) -> Result<()> {
    copy_records(store, keys, users, name, &scripts().idem_restore).await
}

/// [`restore_records_as`] with `script`: `idem_restore` (only while the
/// account is being loaded) or `idem_adopt` (onto a loaded account, each key
/// only where Redis holds none).
pub(super) async fn copy_records(
    store: &CreditStore,
    keys: &UserKeys,
    users: &[&str],
    name: impl Fn(&str, &str, &str) -> String,
    script: &redis::Script,
) -> Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    let rows: Vec<(String, String, String, String, Value, DateTime<Utc>)> = sqlx::query_as(
        "select user_id, route, key, body_hash, answer, expires_at from idempotency_records \
         where user_id = any($1) and expires_at > now() order by created_at",
    )
    .bind(users)
    .fetch_all(&store.pg)
    .await?;
    for chunk in rows.chunks(200) {
        let mut inv = keys.invoke(script, ttl_ms(store));
        for (user, route, key, hash, answer, expires_at) in chunk {
            inv.key(name(user, route, key))
                .arg(hash)
                .arg(Remembered::Ok(answer.clone()).to_json())
                .arg(expires_at.timestamp_millis());
        }
        let raw: Vec<String> = {
            let mut conn = store.redis().await?;
            inv.invoke_async(&mut *conn).await?
        };
        match Reply::parse(raw).map_err(bad_reply)?.kind() {
            Tag::Lost => {
                store.recovery.enter(store).await;
                return Err(recovering());
            }
            // Loaded by someone else meanwhile, with these records.
            Tag::Exists => return Ok(()),
            _ => {}
        }
    }
    Ok(())
}

/// The durable answer of a keyed request whose Redis record is stale (it
/// started long ago and never stored its answer): present when its event
/// has landed. It is stored in Redis for the next retry. A Postgres error
/// is `None`: the caller retries under the recorded id, which the ledger
/// deduplicates.
pub(super) async fn durable_replay(
    store: &CreditStore,
    user_id: &str,
    idem: &Idem,
    recorded_id: &str,
) -> Result<Option<Answer>> {
    // A Postgres error is a 503, never a guess: retrying under the recorded
    // id without knowing whether it landed could re-reserve a settled charge.
    let found: Option<Value> = sqlx::query_scalar(
        "select answer from idempotency_records \
         where user_id = $1 and route = $2 and key = $3 and body_hash = $4 and expires_at > now()",
    )
    .bind(user_id)
    .bind(&idem.route)
    .bind(&idem.key)
    .bind(&idem.hash)
    .fetch_optional(&store.pg)
    .await?;
    Ok(match found {
        Some(body) => {
            let answer = Remembered::Ok(body);
            remember(store, idem, &answer, recorded_id, ttl_ms(store));
            Some(Answer::Replayed(answer))
        }
        None => None,
    })
}

/// Reads a user's balance: from Redis when it holds the user (releasing
/// expired holds on the way), else from Postgres (ledger minus open holds),
/// and always from Postgres while a recovery runs.
///
/// A member of an organization reads what they may spend now: the pool's
/// balance bounded by their cap's room, and what they hold (docs/credits.md
/// "Organizations"); from Postgres while Redis cannot answer.
pub async fn balance(store: &CreditStore, publisher: &Publisher, user_id: &str) -> Result<Balance> {
    let mut acct = super::orgs::account(store, user_id).await?;
    for attempt in 0..3 {
        if store.recovery.is_active() {
            break;
        }
        let owner = acct.owner(user_id);
        let keys = UserKeys::new(&store.keys, &owner);
        let outcome = async {
            let mut conn = store.redis().await?;
            let mut inv = keys.invoke(&scripts().read, ttl_ms(store));
            acct.args(&mut inv, user_id, 0);
            let raw: Vec<String> = inv.invoke_async(&mut *conn).await?;
            anyhow::Ok(Reply::parse(raw)?)
        }
        .await;
        match outcome {
            Ok(reply) if reply.kind() == Tag::NotMember => {
                store.memberships.forget(user_id);
                acct = super::orgs::Account::Own;
                continue;
            }
            Ok(reply) if reply.kind() == Tag::Ok => {
                publish_expired(publisher, &owner, &reply.expired);
                return Ok(Balance {
                    balance: reply.int(0).map_err(bad_reply)?,
                    held: reply.int(1).map_err(bad_reply)?,
                    as_of: DateTime::parse_from_rfc3339(reply.str(2).unwrap_or(""))
                        .ok()
                        .map(|t| t.with_timezone(&Utc)),
                });
            }
            Ok(reply) if reply.kind() == Tag::Lost => store.recovery.enter(store).await,
            // Not loaded yet: load it once (so later reads need no Postgres).
            Ok(reply) if reply.kind() == Tag::Missing && attempt < 2 => {
                if load_into_redis(store, &owner).await.is_ok() {
                    continue;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "balance: Redis unavailable, reading Postgres"),
        }
        break;
    }
    match acct.org_id() {
        Some(org_id) => super::orgs::member_balance_from_postgres(store, user_id, org_id).await,
        None => balance_from_postgres(store, user_id).await,
    }
}

/// The settled truth: `users.credits_balance` minus open holds.
pub async fn balance_from_postgres(store: &CreditStore, user_id: &str) -> Result<Balance> {
    let row: Option<(i64, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "select u.credits_balance, \
                coalesce((select sum(amount) from credit_holds h where h.user_id = u.id and h.org_id is null and h.status = 'open'), 0)::bigint, \
                (select max(created_at) from credit_transactions t where t.user_id = u.id and t.org_id is null) \
         from users u where u.id = $1",
    )
    .bind(user_id)
    .fetch_optional(&store.pg)
    .await?;
    let (settled, held, as_of) = row.unwrap_or((0, 0, None));
    Ok(Balance {
        balance: settled - held,
        held,
        as_of,
    })
}

/// What the credit flows use, and nothing more (issue 17: a credit store, not
/// the whole state): Postgres for the ledger, the shared Redis connection for
/// the scripts, the key names, the recovery flag and the settings the scripts
/// read. The flows take it beside the publisher. Cheap to clone.
#[derive(Clone)]
pub struct CreditStore {
    pub pg: sqlx::PgPool,
    /// The gateway's one multiplexed Redis connection.
    pub redis_link: std::sync::Arc<crate::redis_link::RedisLink>,
    pub keys: common::redis::keys::Keys,
    /// Shared with `Shared::recovery`: a script that finds its sentinel gone
    /// turns every credit write to 503 at once.
    pub recovery: std::sync::Arc<super::recovery::Recovery>,
    pub limits: CreditLimits,
    /// What this gateway read of users' memberships (`super::orgs`).
    pub memberships: std::sync::Arc<super::orgs::Memberships>,
    /// Loads into Redis and membership reads running on this gateway, one per account.
    pub once: std::sync::Arc<super::orgs::Once>,
}

/// The settings the credit flows read, copied once at start.
#[derive(Debug, Clone, Copy)]
pub struct CreditLimits {
    /// `credits.idempotency_ttl_secs`: how long a remembered 200 lives.
    pub idempotency_ttl_secs: u64,
    /// `credits.insufficient_ttl_secs`: how long a remembered 402 lives.
    pub insufficient_ttl_secs: u64,
    /// `credits.max_open_holds`: open holds a user may have at once.
    pub max_open_holds: usize,
    /// `amqp.confirm_timeout_ms`: the longest a publish may wait for its
    /// confirm (an in-progress marker outlives it).
    pub confirm_timeout_ms: u64,
    /// `rate_limit.on_redis_error`: for a member's rate limit, decided apart.
    pub rate_policy: common::settings::RedisErrorPolicy,
}

impl CreditLimits {
    pub fn new(settings: &common::settings::Settings) -> Self {
        Self {
            idempotency_ttl_secs: settings.credits.idempotency_ttl_secs,
            insufficient_ttl_secs: settings.credits.insufficient_ttl_secs,
            max_open_holds: settings.credits.max_open_holds,
            confirm_timeout_ms: settings.amqp.confirm_timeout_ms,
            rate_policy: settings.rate_limit.on_redis_error,
        }
    }
}

impl CreditStore {
    /// The shared multiplexed Redis connection (503 when Redis is down).
    pub async fn redis(&self) -> crate::error::Result<crate::redis_link::LinkConn> {
        Ok(self.redis_link.link_conn().await?)
    }
}
