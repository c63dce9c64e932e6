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
#[tracing::instrument(skip_all, fields(user_id))]
pub async fn load_into_redis(store: &CreditStore, user_id: &str) -> Result<()> {
    type Row = (
        i64,
        Option<DateTime<Utc>>,
        Vec<Uuid>,
        Vec<i64>,
        Vec<DateTime<Utc>>,
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
                (select max(t.created_at) from credit_transactions t where t.user_id = u.id), \
                coalesce(h.ids, '{}'), coalesce(h.amounts, '{}'), coalesce(h.expires, '{}') \
         from users u \
         left join lateral ( \
             select array_agg(id order by id) ids, array_agg(amount order by id) amounts, \
                    array_agg(expires_at order by id) expires \
             from credit_holds where user_id = u.id and status = 'open') h on true \
         where u.id = $1",
    )
    .bind(user_id)
    .fetch_optional(&store.pg)
    .await?;
    let (ledger, as_of, ids, amounts, expires) =
        row.ok_or_else(|| Error::NotFound("no such user".into()))?;
    let mut inv = keys.invoke(&scripts().init, ttl_ms(store));
    inv.arg(ledger).arg(
        as_of
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default(),
    );
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
    let rows: Vec<(String, String, String, Value, DateTime<Utc>)> = sqlx::query_as(
        "select route, key, body_hash, answer, expires_at from idempotency_records \
         where user_id = $1 and expires_at > now() order by created_at",
    )
    .bind(user_id)
    .fetch_all(&store.pg)
    .await?;
    for chunk in rows.chunks(200) {
        let mut inv = keys.invoke(&scripts().idem_restore, ttl_ms(store));
        for (route, key, hash, answer, expires_at) in chunk {
            inv.key(store.keys.idempotency(user_id, route, key))
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
pub async fn balance(store: &CreditStore, publisher: &Publisher, user_id: &str) -> Result<Balance> {
    for attempt in 0..2 {
        if store.recovery.is_active() {
            break;
        }
        let keys = UserKeys::new(&store.keys, user_id);
        let outcome = async {
            let mut conn = store.redis().await?;
            let raw: Vec<String> = keys
                .invoke(&scripts().read, ttl_ms(store))
                .invoke_async(&mut *conn)
                .await?;
            anyhow::Ok(Reply::parse(raw)?)
        }
        .await;
        match outcome {
            Ok(reply) if reply.kind() == Tag::Ok => {
                publish_expired(publisher, user_id, &reply.expired);
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
            Ok(reply) if reply.kind() == Tag::Missing && attempt == 0 => {
                if load_into_redis(store, user_id).await.is_ok() {
                    continue;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "balance: Redis unavailable, reading Postgres"),
        }
        break;
    }
    balance_from_postgres(store, user_id).await
}

/// The settled truth: `users.credits_balance` minus open holds.
pub async fn balance_from_postgres(store: &CreditStore, user_id: &str) -> Result<Balance> {
    let row: Option<(i64, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "select u.credits_balance, \
                coalesce((select sum(amount) from credit_holds h where h.user_id = u.id and h.status = 'open'), 0)::bigint, \
                (select max(created_at) from credit_transactions t where t.user_id = u.id) \
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
}

impl CreditLimits {
    pub fn new(settings: &common::settings::Settings) -> Self {
        Self {
            idempotency_ttl_secs: settings.credits.idempotency_ttl_secs,
            insufficient_ttl_secs: settings.credits.insufficient_ttl_secs,
            max_open_holds: settings.credits.max_open_holds,
            confirm_timeout_ms: settings.amqp.confirm_timeout_ms,
        }
    }
}

impl CreditStore {
    /// The shared multiplexed Redis connection (503 when Redis is down).
    pub async fn redis(&self) -> crate::error::Result<crate::redis_link::LinkConn> {
        Ok(self.redis_link.link_conn().await?)
    }
}
