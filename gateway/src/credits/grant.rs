//! The admin grant to a user (docs/api.md "Admin"): Postgres first, with its
//! audit row, then Redis once by the grant id.

use common::redis::scripts::{scripts, Reply, Tag, UserKeys};
use common::settings::MAX_CREDITS;
use serde_json::json;

use super::answer::{to_json, GrantAnswer};
use super::idempotency::{derived_id, ttl_ms, Answer, Remembered};
use super::reserve::bad_reply;
use super::store::{balance, CreditStore};
use crate::error::{Error, Result};
use crate::publisher::Publisher;

/// Who asked for a grant, for the audit row.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub actor: String,
    pub user_id: String,
    pub amount: i64,
    pub reason: String,
    pub key: Option<String>,
    pub request_id: String,
}

/// docs/api.md "Admin": the grant is written to Postgres with its audit row in one
/// transaction (once per grant id), then added to the Redis balance once (by
/// the grant id) if Redis holds the user; otherwise Redis loads it later.
#[tracing::instrument(skip_all, fields(user_id = %g.user_id, amount = g.amount))]
pub async fn grant(store: &CreditStore, publisher: &Publisher, g: GrantRequest) -> Result<Answer> {
    let id = derived_id("grant", &g.user_id, g.key.as_deref());
    let mut tx = store.pg.begin().await?;
    let result: std::result::Result<(bool, i64), sqlx::Error> =
        sqlx::query_as("select applied, balance from grant_credits($1, $2, $3, $4, $5, 'grant')")
            .bind(id)
            .bind(&g.user_id)
            .bind(g.amount)
            .bind(&g.reason)
            .bind(json!({"reason": g.reason, "actor": g.actor, "request_id": g.request_id}))
            .fetch_one(&mut *tx)
            .await;
    let (applied, _) = match result {
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("22003") => {
            return Err(Error::validation(
                "amount",
                format!("the balance would pass {MAX_CREDITS}"),
            ))
        }
        other => other?,
    };
    let recent = if applied {
        sqlx::query(
            "insert into audit_log (actor, action, target, request_id, details) \
             values ($1, 'credits.grant', $2, $3, $4)",
        )
        .bind(&g.actor)
        .bind(&g.user_id)
        .bind(&g.request_id)
        .bind(json!({"amount": g.amount, "reason": g.reason, "transaction_id": id.to_string()}))
        .execute(&mut *tx)
        .await?;
        true
    } else {
        // The same key again: the same body replays, another is a conflict.
        let (kind, amount, reason, recent): (String, i64, Option<String>, bool) = sqlx::query_as(
            "select kind, amount, description, created_at > now() - make_interval(secs => $2) \
             from credit_transactions where id = $1",
        )
        .bind(id)
        .bind(store.limits.idempotency_ttl_secs as f64)
        .fetch_one(&mut *tx)
        .await?;
        if kind != "grant" || amount != g.amount || reason.as_deref() != Some(g.reason.as_str()) {
            return Err(Error::IdempotencyConflict(
                "this Idempotency-Key was used with another body".into(),
            ));
        }
        recent
    };
    tx.commit().await?;
    if applied {
        // The ledger shows in the profile and analytics (the workers do this after their commits).
        crate::redis_link::drop_cached_views(&store.redis_link, &store.keys, &g.user_id).await;
    }
    // A replay applies too, in case the first attempt died before this step;
    // the applied-set makes it once. Past the idempotency window the set is
    // gone, so an old replay leaves Redis alone (the reconciler covers it).
    let spendable = if recent {
        apply_in_redis(store, &g.user_id, id, g.amount).await?
    } else {
        None
    };
    let balance = match spendable {
        Some(b) => b,
        None => balance(store, publisher, &g.user_id).await?.balance,
    };
    metrics::counter!("credit_grants_total", "replayed" => (!applied).to_string()).increment(1);
    let body = to_json(&GrantAnswer {
        transaction_id: id.to_string(),
        balance,
    });
    Ok(if applied {
        Answer::Fresh(body)
    } else {
        Answer::Replayed(Remembered::Ok(body))
    })
}

/// Adds a committed grant to `account`'s Redis balance once (by the grant id,
/// `grant_apply.lua`), where Redis holds the account: the spendable balance
/// after it, or `None` (not loaded: its next load reads the ledger, grant
/// included; Redis unreachable: the reconciler compares it with the ledger
/// once nothing is pending; a recovery runs).
pub(super) async fn apply_in_redis(
    store: &CreditStore,
    account: &str,
    id: uuid::Uuid,
    amount: i64,
) -> Result<Option<i64>> {
    if store.recovery.is_active() {
        return Ok(None);
    }
    let keys = UserKeys::new(&store.keys, account);
    let applied_key = store.keys.grants_applied(account);
    let ttl = ttl_ms(store);
    let outcome = async {
        let mut conn = store.redis().await?;
        let mut inv = keys.invoke(&scripts().grant_apply, ttl);
        inv.key(&applied_key)
            .arg(id.to_string())
            .arg(amount)
            .arg(ttl + 3_600_000);
        let raw: Vec<String> = inv.invoke_async(&mut *conn).await?;
        anyhow::Ok(Reply::parse(raw)?)
    }
    .await;
    match outcome {
        Ok(r) if r.kind() == Tag::Ok => Ok(Some(r.int(0).map_err(bad_reply)?)),
        Ok(r) if r.kind() == Tag::Lost => {
            store.recovery.enter(store).await;
            Ok(None)
        }
        Ok(_) => Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, account, "grant committed but not added to Redis yet");
            Ok(None)
        }
    }
}
