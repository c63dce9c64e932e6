//! Credit decisions in Redis (SPEC §5.5, §5.5b). Per user, one hash holds
//! `bal` (spendable now = settled ledger − unsettled reservations − open holds),
//! `held` (open holds) and `as_of`; `pending` maps reservation ids to amounts
//! until a worker settles them into the ledger.

use chrono::{DateTime, Utc};
use redis::AsyncCommands;

use crate::http::error::Result;
use crate::state::AppState;

/// What a user can spend now, and what is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub balance: i64,
    pub held: i64,
    /// Time of the newest settled event behind the figure.
    pub as_of: Option<DateTime<Utc>>,
}

/// Reads a user's balance: Redis when it holds the user, else Postgres
/// (ledger minus open holds).
pub async fn balance(state: &AppState, user_id: &str) -> Result<Balance> {
    if let Ok(mut conn) = state.redis.get().await {
        let (bal, held, as_of): (Option<i64>, Option<i64>, Option<String>) = conn
            .hget(state.keys.credits(user_id), &["bal", "held", "as_of"])
            .await?;
        if let Some(bal) = bal {
            return Ok(Balance {
                balance: bal,
                held: held.unwrap_or(0),
                as_of: as_of
                    .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                    .map(|t| t.with_timezone(&Utc)),
            });
        }
    }
    balance_from_postgres(state, user_id).await
}

/// The settled truth: `users.credits_balance` minus open holds.
pub async fn balance_from_postgres(state: &AppState, user_id: &str) -> Result<Balance> {
    let row: Option<(i64, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "select u.credits_balance, \
                coalesce((select sum(amount) from credit_holds h where h.user_id = u.id and h.status = 'open'), 0)::bigint, \
                (select max(created_at) from credit_transactions t where t.user_id = u.id) \
         from users u where u.id = $1",
    )
    .bind(user_id)
    .fetch_optional(&state.pg)
    .await?;
    let (settled, held, as_of) = row.unwrap_or((0, 0, None));
    Ok(Balance {
        balance: settled - held,
        held,
        as_of,
    })
}
