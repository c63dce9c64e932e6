//! Credit decisions (SPEC §5.5, §5.5b, §5.7): reserve in Redis with one script,
//! publish the event with a confirm, answer. The model, the invariants and
//! each failure are in `docs/credits.md`; the scripts in `common::credits`.
//!
//! The plain functions at the top decide what a request means (amount rules,
//! idempotency key, the body's canonical hash, derived ids, remembered
//! answers) and are unit-tested here; the async functions below them do the
//! IO and are what the HTTP handlers call.

pub mod recovery;

use std::fmt;

use axum::http::HeaderMap;
use chrono::{DateTime, TimeZone, Utc};
use common::credits::{hold_json, scripts, ExpiredHold, Reply, UserKeys};
use common::events::{
    BatchedConsume, CreditConsume, CreditContext, Envelope, Event, HoldOpened, HoldReleased,
    HoldSettled, IdempotencyRecord,
};
use common::settings::MAX_CREDITS;
use common::valid::{len, FreeText, Label, Metadata, TokenCount};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::http::error::{ApiError, Result};
use crate::publisher::PublishError;
use crate::state::AppState;
use crate::users::ID_NAMESPACE;

// ───────────────────────────── decisions ─────────────────────────────

/// A credit figure from a request: a JSON integer from `MIN` to 2^53−1.
/// Floats (even `1.0`), strings, and anything out of range are refused, so
/// the field's error names it (422 `validation_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits<const MIN: i64>(i64);

/// An amount to consume, hold or grant: 1..=2^53−1.
pub type Amount = Credits<1>;
/// A settled amount or a token count: 0..=2^53−1.
pub type Count = Credits<0>;

impl<const MIN: i64> Credits<MIN> {
    pub fn new(v: i64) -> Option<Self> {
        (MIN..=MAX_CREDITS).contains(&v).then_some(Self(v))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl<'de, const MIN: i64> Deserialize<'de> for Credits<MIN> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<const MIN: i64>;
        impl<const MIN: i64> Visitor<'_> for V<MIN> {
            type Value = Credits<MIN>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an integer from {MIN} to {MAX_CREDITS}")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                Credits::new(v).ok_or_else(|| {
                    E::custom(format!("must be an integer from {MIN} to {MAX_CREDITS}"))
                })
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                i64::try_from(v).ok().and_then(Credits::new).ok_or_else(|| {
                    E::custom(format!("must be an integer from {MIN} to {MAX_CREDITS}"))
                })
            }
        }
        d.deserialize_i64(V::<MIN>)
    }
}

// Every text, count and metadata field carries its rule on its type
// (`common::valid`, SPEC §3 "a valid stored value"): deserializing refuses a
// value the ledger could not store, with a 422 naming the field.

/// A model or provider name, a feature, a session id, as stored in the ledger.
pub type ModelName = Label<{ len::MODEL }>;
pub type ProviderName = Label<{ len::PROVIDER }>;
pub type FeatureName = Label<{ len::FEATURE }>;
pub type SessionRef = Label<{ len::SESSION_ID }>;
pub type Description = FreeText<{ len::DESCRIPTION }>;
pub type Reason = FreeText<{ len::REASON }>;

/// `POST /api/users/:id/credits/consume`, with the original client's names.
#[derive(Debug, Deserialize)]
pub struct ConsumeBody {
    pub amount: Amount,
    #[serde(default, alias = "sessionId")]
    pub session_id: Option<SessionRef>,
    #[serde(default, alias = "modelId")]
    pub model: Option<ModelName>,
    #[serde(default)]
    pub provider: Option<ProviderName>,
    #[serde(default, alias = "tokensUsed")]
    pub prompt_tokens: Option<TokenCount>,
    #[serde(default)]
    pub completion_tokens: Option<TokenCount>,
    #[serde(default)]
    pub feature: Option<FeatureName>,
    #[serde(default)]
    pub description: Option<Description>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
}

/// `POST /api/users/:id/credits/holds`.
#[derive(Debug, Deserialize)]
pub struct HoldBody {
    pub amount: Amount,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default, alias = "sessionId")]
    pub session_id: Option<SessionRef>,
    #[serde(default, alias = "modelId")]
    pub model: Option<ModelName>,
    #[serde(default)]
    pub provider: Option<ProviderName>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
}

/// `POST /api/users/:id/credits/holds/:hold_id/settle`.
#[derive(Debug, Deserialize)]
pub struct SettleBody {
    pub amount: Count,
    #[serde(default, alias = "modelId")]
    pub model: Option<ModelName>,
    #[serde(default)]
    pub provider: Option<ProviderName>,
    #[serde(default, alias = "tokensUsed")]
    pub prompt_tokens: Option<TokenCount>,
    #[serde(default)]
    pub completion_tokens: Option<TokenCount>,
}

/// `POST /api/admin/users/:id/credits/grant`.
#[derive(Debug, Deserialize)]
pub struct GrantBody {
    pub amount: Amount,
    pub reason: Reason,
}

fn text<const N: usize>(v: Option<Label<N>>) -> Option<String> {
    v.map(Label::into_inner)
}

fn count(v: Option<TokenCount>) -> Option<i64> {
    v.map(TokenCount::get)
}

impl ConsumeBody {
    /// The amount and what it paid for (every field already checked by its type).
    pub fn validate(self) -> Result<(i64, CreditContext)> {
        Ok((
            self.amount.get(),
            CreditContext {
                session_id: text(self.session_id),
                model: text(self.model),
                provider: text(self.provider),
                prompt_tokens: count(self.prompt_tokens),
                completion_tokens: count(self.completion_tokens),
                feature: text(self.feature),
                description: self.description.map(FreeText::into_inner),
                metadata: self.metadata.map(Metadata::into_inner),
            },
        ))
    }
}

impl HoldBody {
    /// Amount, lifetime (seconds) and context, or 422 naming the field.
    pub fn validate(self, default_ttl: u64, max_ttl: u64) -> Result<(i64, u64, CreditContext)> {
        let ttl = self.ttl_secs.unwrap_or(default_ttl);
        if !(1..=max_ttl).contains(&ttl) {
            return Err(ApiError::validation(
                "ttl_secs",
                format!("must be an integer from 1 to {max_ttl}"),
            ));
        }
        Ok((
            self.amount.get(),
            ttl,
            CreditContext {
                session_id: text(self.session_id),
                model: text(self.model),
                provider: text(self.provider),
                metadata: self.metadata.map(Metadata::into_inner),
                ..Default::default()
            },
        ))
    }
}

impl SettleBody {
    pub fn validate(self) -> Result<(i64, CreditContext)> {
        Ok((
            self.amount.get(),
            CreditContext {
                model: text(self.model),
                provider: text(self.provider),
                prompt_tokens: count(self.prompt_tokens),
                completion_tokens: count(self.completion_tokens),
                ..Default::default()
            },
        ))
    }
}

impl GrantBody {
    pub fn validate(self) -> Result<(i64, String)> {
        let reason = self.reason.as_str().trim().to_string();
        if reason.is_empty() {
            return Err(ApiError::validation(
                "reason",
                format!("must be 1 to {} characters", len::REASON),
            ));
        }
        Ok((self.amount.get(), reason))
    }
}

/// Parses a request body into `T`, which must be a JSON object (serde would
/// also read a struct from an array, by position).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: Value) -> Result<T> {
    if !body.is_object() {
        return Err(ApiError::validation("body", "must be a JSON object"));
    }
    crate::http::extract::from_value(body)
}

/// The `Idempotency-Key` header: absent, or 1..=255 visible characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::validation("Idempotency-Key", "must be visible ASCII"))?;
    idempotency_key_value("Idempotency-Key", s).map(Some)
}

/// An idempotency key from any source (the header, the operator's
/// `--idempotency-key`): 1..=255 visible ASCII characters, 422 naming `field`.
pub fn idempotency_key_value(field: &str, s: &str) -> Result<String> {
    if !s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        return Err(ApiError::validation(field, "must be visible ASCII"));
    }
    if s.is_empty() || s.len() > 255 {
        return Err(ApiError::validation(field, "must be 1 to 255 characters"));
    }
    Ok(s.to_string())
}

/// JSON text with every object's keys sorted, so equal parsed bodies give
/// equal text whatever their key order or spacing.
pub fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// What "the same body" compares: SHA-256 of the canonical JSON, in hex.
pub fn body_hash(v: &Value) -> String {
    Sha256::digest(canonical_json(v).as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An admin grant's id: derived from user and idempotency key when there is
/// one (the grant route deduplicates in Postgres by it), random otherwise.
/// Consumes and holds never derive their ids from the key: a key reused
/// after its record expired would collide with the first movement in the
/// ledger and be answered 200 for free. They take a fresh UUIDv7, recorded in
/// the idempotency record while the request runs (docs/credits.md).
pub fn derived_id(kind: &str, user_id: &str, key: Option<&str>) -> Uuid {
    match key {
        Some(k) => Uuid::new_v5(&ID_NAMESPACE, format!("{kind}:{user_id}:{k}").as_bytes()),
        None => Uuid::new_v4(),
    }
}

/// A settle's transaction id: one per hold, so settling twice can never
/// write two ledger rows.
pub fn settle_id(hold_id: Uuid) -> Uuid {
    Uuid::new_v5(&ID_NAMESPACE, format!("settle:{hold_id}").as_bytes())
}

/// An answer remembered under an idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub enum Remembered {
    Ok(Value),
    Insufficient { balance: i64, required: i64 },
}

impl Remembered {
    pub fn to_json(&self) -> String {
        match self {
            Self::Ok(body) => json!({"status": 200, "body": body}).to_string(),
            Self::Insufficient { balance, required } => {
                json!({"status": 402, "balance": balance, "required": required}).to_string()
            }
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(s).ok()?;
        match v.get("status")?.as_i64()? {
            200 => Some(Self::Ok(v.get("body")?.clone())),
            402 => Some(Self::Insufficient {
                balance: v.get("balance")?.as_i64()?,
                required: v.get("required")?.as_i64()?,
            }),
            _ => None,
        }
    }
}

/// How a hold ended, as remembered in `hold_end:ID`.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldEnd {
    /// Settled: the first settle's answer.
    Settled(Value),
    Released,
    Expired,
}

impl HoldEnd {
    pub fn parse(s: &str) -> Option<Self> {
        let mut v: Value = serde_json::from_str(s).ok()?;
        let obj = v.as_object_mut()?;
        match obj.remove("state")?.as_str()? {
            "settled" => Some(Self::Settled(v)),
            "released" => Some(Self::Released),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// What a request got: a fresh answer, or one remembered from its first run.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Fresh(Value),
    Replayed(Remembered),
}

/// Whether a failed publish surely did not reach the broker (so the Redis
/// change can be undone) or may have (so it stays, and the event settles it
/// or the reconciler releases it after the confirm timeout plus 30 s).
pub fn publish_surely_failed(e: &PublishError) -> bool {
    matches!(
        e,
        PublishError::NotConnected | PublishError::Nacked | PublishError::Returned
    )
}

fn millis_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}

fn bad_reply(e: impl std::error::Error + Send + Sync + 'static) -> ApiError {
    ApiError::Internal(anyhow::Error::new(e))
}

// ──────────────────────────────── IO ────────────────────────────────

/// What a user can spend now, and what is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub balance: i64,
    pub held: i64,
    /// Time of the newest settled event behind the figure.
    pub as_of: Option<DateTime<Utc>>,
}

/// An idempotency key of one request, with its route, body hash and record key.
#[derive(Debug, Clone)]
pub struct Idem {
    pub route: String,
    pub key: String,
    pub hash: String,
    record: String,
}

impl Idem {
    pub fn new(state: &AppState, user_id: &str, route: &str, key: String, body: &Value) -> Self {
        Self {
            record: state.keys.idempotency(user_id, route, &key),
            route: route.to_string(),
            hash: body_hash(body),
            key,
        }
    }

    /// The durable form of this request's 200 answer, carried by its event.
    fn durable(&self, state: &AppState, answer: &Value) -> IdempotencyRecord {
        let ttl = i64::try_from(state.settings.credits.idempotency_ttl_secs).unwrap_or(i64::MAX);
        IdempotencyRecord {
            route: self.route.clone(),
            key: self.key.clone(),
            body_hash: self.hash.clone(),
            answer: answer.clone(),
            expires_at: Utc::now() + chrono::Duration::seconds(ttl.min(100 * 365 * 86_400)),
        }
    }
}

fn ttl_ms(state: &AppState) -> u64 {
    state.settings.credits.idempotency_ttl_secs * 1000
}

/// How long a remembered 402 lives (it moved no money).
fn refused_ttl_ms(state: &AppState) -> u64 {
    state.settings.credits.insufficient_ttl_secs * 1000
}

/// How long an in-progress marker lives: past the longest a request can
/// take, so a crashed gateway does not block its key for a day.
fn running_ms(state: &AppState) -> u64 {
    state.settings.amqp.confirm_timeout_ms + 30_000
}

fn recovering() -> ApiError {
    ApiError::Unavailable {
        what: "credits",
        retry_after: 5,
        cause: None,
    }
}

fn publish_failed(e: PublishError) -> ApiError {
    ApiError::unavailable("rabbitmq", e)
}

async fn publish(
    state: &AppState,
    user_id: &str,
    event: Event,
) -> std::result::Result<(), PublishError> {
    let env = Envelope::new(event, Some(user_id.to_string()), Utc::now());
    state.publisher.publish(&env).await
}

/// Publishes the `HoldReleased` of holds a script found expired. In the
/// background: the answer does not wait, and if the publish fails the worker's
/// expiry job marks them in Postgres instead.
fn publish_expired(state: &AppState, user_id: &str, expired: &[ExpiredHold]) {
    if expired.is_empty() {
        return;
    }
    metrics::counter!("credit_holds_expired_total", "by" => "gateway")
        .increment(expired.len() as u64);
    let state = state.clone();
    let user = user_id.to_string();
    let expired = expired.to_vec();
    tokio::spawn(async move {
        for h in expired {
            let Ok(hold_id) = h.hold_id.parse::<Uuid>() else {
                continue;
            };
            let ev = Event::HoldReleased(HoldReleased {
                hold_id,
                user_id: user.clone(),
                held: h.amount,
                reason: "expired".into(),
            });
            if let Err(e) = publish(&state, &user, ev).await {
                tracing::warn!(error = %e, %hold_id, "expired hold not published; the worker's expiry job marks it");
            }
        }
    });
}

/// Runs a credit script for one user. `MISSING` (Redis does not hold the
/// user yet) loads the user from Postgres and runs it again; `LOST` (the
/// slot's sentinel is gone) starts a recovery and answers 503.
async fn run(
    state: &AppState,
    user_id: &str,
    invocation: impl Fn() -> redis::ScriptInvocation<'static>,
) -> Result<Reply> {
    for _ in 0..3 {
        let raw: Vec<String> = {
            let mut conn = state.redis().await?;
            invocation().invoke_async(&mut *conn).await?
        };
        let reply = Reply::parse(raw).map_err(bad_reply)?;
        publish_expired(state, user_id, &reply.expired);
        match reply.tag.as_str() {
            "LOST" => {
                state.recovery.enter(state).await;
                return Err(recovering());
            }
            "MISSING" => load_into_redis(state, user_id).await?,
            _ => return Ok(reply),
        }
    }
    Err(ApiError::Internal(anyhow::anyhow!(
        "credits of {user_id} could not be loaded into Redis"
    )))
}

/// Loads a user's credits from Postgres into Redis (only if absent): the
/// ledger balance, the open holds, and the newest ledger time. One statement,
/// so balance and holds are one snapshot.
#[tracing::instrument(skip_all, fields(user_id))]
pub async fn load_into_redis(state: &AppState, user_id: &str) -> Result<()> {
    type Row = (
        i64,
        Option<DateTime<Utc>>,
        Vec<Uuid>,
        Vec<i64>,
        Vec<DateTime<Utc>>,
    );
    let keys = UserKeys::new(&state.keys, user_id);
    // The durable idempotency records first, while `bal` is absent: a keyed
    // script that runs meanwhile finds `bal` missing and loads too, so none
    // can decide before the user's records are back (after a Redis loss,
    // the recovery waited for every earlier event, so Postgres has them all).
    // Before the ledger is read, so the snapshot INIT writes is no older
    // than necessary (a grant's own Redis step may be waiting for it).
    restore_records(state, &keys, user_id).await?;
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
    .fetch_optional(&state.pg)
    .await?;
    let (ledger, as_of, ids, amounts, expires) =
        row.ok_or_else(|| ApiError::NotFound("no such user".into()))?;
    let mut inv = keys.invoke(&scripts().init, ttl_ms(state));
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
        let mut conn = state.redis().await?;
        inv.invoke_async(&mut *conn).await?
    };
    let reply = Reply::parse(raw).map_err(bad_reply)?;
    if reply.tag == "LOST" {
        state.recovery.enter(state).await;
        return Err(recovering());
    }
    metrics::counter!("credit_users_loaded_total").increment(u64::from(reply.tag == "OK"));
    Ok(())
}

/// Restores a user's unexpired durable idempotency records into Redis as
/// `done`, in chunks, only while Redis does not hold the user's balance.
async fn restore_records(state: &AppState, keys: &UserKeys, user_id: &str) -> Result<()> {
    let rows: Vec<(String, String, String, Value, DateTime<Utc>)> = sqlx::query_as(
        "select route, key, body_hash, answer, expires_at from idempotency_records \
         where user_id = $1 and expires_at > now() order by created_at",
    )
    .bind(user_id)
    .fetch_all(&state.pg)
    .await?;
    for chunk in rows.chunks(200) {
        let mut inv = keys.invoke(&scripts().idem_restore, ttl_ms(state));
        for (route, key, hash, answer, expires_at) in chunk {
            inv.key(state.keys.idempotency(user_id, route, key))
                .arg(hash)
                .arg(Remembered::Ok(answer.clone()).to_json())
                .arg(expires_at.timestamp_millis());
        }
        let raw: Vec<String> = {
            let mut conn = state.redis().await?;
            inv.invoke_async(&mut *conn).await?
        };
        match Reply::parse(raw).map_err(bad_reply)?.tag.as_str() {
            "LOST" => {
                state.recovery.enter(state).await;
                return Err(recovering());
            }
            // Loaded by someone else meanwhile, with these records.
            "EXISTS" => return Ok(()),
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
async fn durable_replay(
    state: &AppState,
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
    .fetch_optional(&state.pg)
    .await?;
    Ok(match found {
        Some(body) => {
            let answer = Remembered::Ok(body);
            remember(state, idem, &answer, recorded_id, ttl_ms(state)).await;
            Some(Answer::Replayed(answer))
        }
        None => None,
    })
}

/// Reads a user's balance: from Redis when it holds the user (releasing
/// expired holds on the way), else from Postgres (ledger minus open holds),
/// and always from Postgres while a recovery runs.
pub async fn balance(state: &AppState, user_id: &str) -> Result<Balance> {
    for attempt in 0..2 {
        if state.recovery.is_active() {
            break;
        }
        let keys = UserKeys::new(&state.keys, user_id);
        let outcome = async {
            let mut conn = state.redis().await?;
            let raw: Vec<String> = keys
                .invoke(&scripts().read, ttl_ms(state))
                .invoke_async(&mut *conn)
                .await?;
            anyhow::Ok(Reply::parse(raw)?)
        }
        .await;
        match outcome {
            Ok(reply) if reply.tag == "OK" => {
                publish_expired(state, user_id, &reply.expired);
                return Ok(Balance {
                    balance: reply.int(0).map_err(bad_reply)?,
                    held: reply.int(1).map_err(bad_reply)?,
                    as_of: DateTime::parse_from_rfc3339(reply.str(2).unwrap_or(""))
                        .ok()
                        .map(|t| t.with_timezone(&Utc)),
                });
            }
            Ok(reply) if reply.tag == "LOST" => state.recovery.enter(state).await,
            // Not loaded yet: load it once (so later reads need no Postgres).
            Ok(reply) if reply.tag == "MISSING" && attempt == 0 => {
                if load_into_redis(state, user_id).await.is_ok() {
                    continue;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "balance: Redis unavailable, reading Postgres"),
        }
        break;
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

/// Stores a final 200 answer under the request's key. Best effort: when it
/// fails, the record stays in progress with its id; a retry past the
/// in-progress window replays the durable record the event carried, or
/// re-publishes under the same id, which the ledger deduplicates.
async fn remember(state: &AppState, idem: &Idem, answer: &Remembered, id: &str, ttl: u64) {
    let result = async {
        let mut conn = state.redis().await?;
        scripts()
            .idem_finish
            .key(&idem.record)
            .arg(&idem.hash)
            .arg(answer.to_json())
            .arg(ttl)
            .arg(id)
            .invoke_async::<i64>(&mut *conn)
            .await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "idempotent answer not stored");
    }
}

/// Turns the early replies every keyed script shares into an answer.
fn keyed_early(reply: &Reply) -> Result<Option<Answer>> {
    match reply.tag.as_str() {
        "CONFLICT" => Err(ApiError::IdempotencyConflict(
            "this Idempotency-Key was used with another body".into(),
        )),
        "BUSY" => Err(ApiError::IdempotencyConflict(
            "a request with this Idempotency-Key is still running".into(),
        )),
        "REPLAY" => {
            let stored = reply.str(0).map_err(bad_reply)?;
            let r = Remembered::parse(stored).ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("unreadable remembered answer"))
            })?;
            Ok(Some(Answer::Replayed(r)))
        }
        "INSUFFICIENT" => Err(ApiError::InsufficientCredits {
            balance: reply.int(0).map_err(bad_reply)?,
            required: 0,
        }),
        _ => Ok(None),
    }
}

/// SPEC §5.5: reserve, publish with confirm, answer.
#[tracing::instrument(skip_all, fields(user_id, amount))]
pub async fn consume(
    state: &AppState,
    user_id: &str,
    amount: i64,
    context: CreditContext,
    idem: Option<Idem>,
) -> Result<Answer> {
    let fresh = Uuid::now_v7();
    let keys = UserKeys::new(&state.keys, user_id);
    let (record, hash) = idem_args(state, user_id, idem.as_ref());
    let (ttl, running, refused) = (ttl_ms(state), running_ms(state), refused_ttl_ms(state));
    // "0" fresh; "1" reuse a stale record's id while it is pending; "2"
    // reserve it again (Postgres said it was never settled).
    let mut reuse = "0";
    let reply = loop {
        let reply = run(state, user_id, || {
            let mut inv = keys.invoke(&scripts().consume, ttl);
            inv.key(&record)
                .arg(&hash)
                .arg(fresh.to_string())
                .arg(amount)
                .arg(running)
                .arg(ttl)
                .arg(refused)
                .arg(reuse);
            inv
        })
        .await?;
        match (reply.tag.as_str(), &idem, reuse) {
            ("STALE", Some(i), "0") => {
                let recorded = reply.str(0).map_err(bad_reply)?;
                if let Some(answer) = durable_replay(state, user_id, i, recorded).await? {
                    return Ok(answer);
                }
                reuse = "1";
            }
            // Not pending any more: settled after our first look (the worker
            // drops a pending entry only after its commit, which holds the
            // durable record) or given back because its event is gone.
            ("UNPENDING", Some(i), "1") => {
                let recorded = reply.str(0).map_err(bad_reply)?;
                if let Some(answer) = durable_replay(state, user_id, i, recorded).await? {
                    return Ok(answer);
                }
                reuse = "2";
            }
            _ => break reply,
        }
    };
    if let Some(answer) = keyed_early(&reply).map_err(|e| with_required(e, amount))? {
        return Ok(answer);
    }
    expect_tag(&reply, "OK")?;
    let balance = reply.int(0).map_err(bad_reply)?;
    let created = reply.flag(2).map_err(bad_reply)?;
    let tx: Uuid = reply
        .str(3)
        .map_err(bad_reply)?
        .parse()
        .map_err(bad_reply)?;
    let reused = reply.flag(4).map_err(bad_reply)?;
    let body = json!({
        "transaction_id": tx.to_string(),
        "user_id": user_id,
        "amount": amount,
        "balance": balance,
        "success": true,
        "remaining_credits": balance,
    });
    let event = BatchedConsume {
        id: Uuid::new_v4(),
        occurred_at: Utc::now(),
        consume: CreditConsume {
            transaction_id: tx,
            user_id: user_id.to_string(),
            amount,
            context,
        },
        idempotency: idem.as_ref().map(|i| i.durable(state, &body)),
    };
    if let Err(e) = state.publisher.publish_consume(event).await {
        let surely = publish_surely_failed(&e);
        let give_back = created && surely;
        // Only a fresh id that surely never left may be forgotten; any other
        // stays recorded, so a retry can never charge under a second id.
        let forget = surely && !reused;
        let undo = async {
            let mut conn = state.redis().await?;
            let mut inv = keys.invoke(&scripts().consume_undo, ttl);
            inv.key(&record)
                .arg(&hash)
                .arg(tx.to_string())
                .arg(if give_back { "1" } else { "0" })
                .arg(if forget { "1" } else { "0" });
            inv.invoke_async::<Vec<String>>(&mut *conn).await?;
            anyhow::Ok(())
        };
        if let Err(u) = undo.await {
            // The reservation stays; the reconciler releases it after the
            // confirm timeout plus 30 s, since no event will settle it.
            tracing::warn!(error = %u, "reservation not given back after a failed publish");
        }
        metrics::counter!("credit_decisions_total", "op" => "consume", "outcome" => "unavailable")
            .increment(1);
        return Err(publish_failed(e));
    }
    if let Some(idem) = &idem {
        remember(
            state,
            idem,
            &Remembered::Ok(body.clone()),
            &tx.to_string(),
            ttl,
        )
        .await;
    }
    metrics::counter!("credit_decisions_total", "op" => "consume", "outcome" => "ok").increment(1);
    Ok(answered(body, reused))
}

/// A retry under a recorded id answers for the first request (whose 200 may
/// already have been sent): it says so, and the ledger has one row for both.
fn answered(body: Value, reused: bool) -> Answer {
    if reused {
        Answer::Replayed(Remembered::Ok(body))
    } else {
        Answer::Fresh(body)
    }
}

/// KEYS[5] and the hash argument of a keyed script. Without a key the
/// record name is still one of the user's keys (same slot), and unused.
fn idem_args(state: &AppState, user_id: &str, idem: Option<&Idem>) -> (String, String) {
    match idem {
        Some(i) => (i.record.clone(), i.hash.clone()),
        None => (state.keys.idempotency(user_id, "none", "-"), String::new()),
    }
}

/// A fresh 402 carries the amount asked for (the script knows only the balance).
fn with_required(e: ApiError, amount: i64) -> ApiError {
    match e {
        ApiError::InsufficientCredits { balance, .. } => {
            metrics::counter!("credit_decisions_total", "op" => "reserve", "outcome" => "insufficient").increment(1);
            ApiError::InsufficientCredits {
                balance,
                required: amount,
            }
        }
        other => other,
    }
}

fn expect_tag(reply: &Reply, tag: &str) -> Result<()> {
    if reply.tag == tag {
        Ok(())
    } else {
        Err(ApiError::Internal(anyhow::anyhow!(
            "unexpected credit script reply {:?}",
            reply.tag
        )))
    }
}

/// SPEC §5.5b: hold an upper bound before the model call.
#[tracing::instrument(skip_all, fields(user_id, amount))]
pub async fn open_hold(
    state: &AppState,
    user_id: &str,
    amount: i64,
    ttl_secs: u64,
    context: CreditContext,
    idem: Option<Idem>,
) -> Result<Answer> {
    let fresh = Uuid::now_v7();
    let keys = UserKeys::new(&state.keys, user_id);
    let (record, hash) = idem_args(state, user_id, idem.as_ref());
    let (ttl, running, refused) = (ttl_ms(state), running_ms(state), refused_ttl_ms(state));
    let max_open = state.settings.credits.max_open_holds;
    let mut reuse = false;
    let reply = loop {
        let reply = run(state, user_id, || {
            let mut inv = keys.invoke(&scripts().hold_open, ttl);
            inv.key(&record)
                .arg(&hash)
                .arg(fresh.to_string())
                .arg(amount)
                .arg(ttl_secs * 1000)
                .arg(running)
                .arg(ttl)
                .arg(refused)
                .arg(if reuse { "1" } else { "0" })
                .arg(max_open);
            inv
        })
        .await?;
        match (reply.tag.as_str(), &idem) {
            ("STALE", Some(i)) if !reuse => {
                let recorded = reply.str(0).map_err(bad_reply)?;
                if let Some(answer) = durable_replay(state, user_id, i, recorded).await? {
                    return Ok(answer);
                }
                reuse = true;
            }
            _ => break reply,
        }
    };
    if let Some(answer) = keyed_early(&reply).map_err(|e| with_required(e, amount))? {
        return Ok(answer);
    }
    match reply.tag.as_str() {
        // A retry under a recorded hold id whose hold has ended meanwhile
        // (and whose open has not landed in Postgres yet).
        "ENDED" => return Err(ApiError::HoldExpired),
        "TOO_MANY" => {
            metrics::counter!("credit_decisions_total", "op" => "hold", "outcome" => "too_many")
                .increment(1);
            return Err(ApiError::validation(
                "holds",
                format!(
                    "at most {max_open} holds may be open at once; settle or release one first"
                ),
            ));
        }
        _ => expect_tag(&reply, "OK")?,
    }
    let balance = reply.int(0).map_err(bad_reply)?;
    let held = reply.int(1).map_err(bad_reply)?;
    let expires_at = millis_to_time(reply.int(2).map_err(bad_reply)?);
    let created = reply.flag(3).map_err(bad_reply)?;
    let hold_id: Uuid = reply
        .str(4)
        .map_err(bad_reply)?
        .parse()
        .map_err(bad_reply)?;
    let reused = reply.flag(5).map_err(bad_reply)?;
    let body = json!({
        "hold_id": hold_id.to_string(),
        "amount": amount,
        "balance": balance,
        "held": held,
        "expires_at": expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let event = Event::HoldOpened(HoldOpened {
        hold_id,
        user_id: user_id.to_string(),
        amount,
        expires_at,
        context,
        idempotency: idem.as_ref().map(|i| i.durable(state, &body)),
    });
    if let Err(e) = publish(state, user_id, event).await {
        let surely = publish_surely_failed(&e);
        let remove = created && surely;
        let forget = surely && !reused;
        let undo = async {
            let mut conn = state.redis().await?;
            let mut inv = keys.invoke(&scripts().hold_undo, ttl);
            inv.key(&record)
                .arg(&hash)
                .arg(hold_id.to_string())
                .arg(if remove { "1" } else { "0" })
                .arg(if forget { "1" } else { "0" });
            inv.invoke_async::<Vec<String>>(&mut *conn).await?;
            anyhow::Ok(())
        };
        if let Err(u) = undo.await {
            // The hold stays and expires by itself at `expires_at`.
            tracing::warn!(error = %u, "hold not removed after a failed publish");
        }
        return Err(publish_failed(e));
    }
    if let Some(idem) = &idem {
        remember(
            state,
            idem,
            &Remembered::Ok(body.clone()),
            &hold_id.to_string(),
            ttl,
        )
        .await;
    }
    metrics::counter!("credit_decisions_total", "op" => "hold", "outcome" => "ok").increment(1);
    Ok(answered(body, reused))
}

/// SPEC §5.5b: settle a hold; the rest returns to the balance. Settling again
/// answers the first settle; an expired or released hold is 409.
#[tracing::instrument(skip_all, fields(user_id, %hold_id, amount))]
pub async fn settle_hold(
    state: &AppState,
    user_id: &str,
    hold_id: Uuid,
    amount: i64,
    context: CreditContext,
) -> Result<Answer> {
    let tx = settle_id(hold_id);
    let keys = UserKeys::new(&state.keys, user_id);
    let ttl = ttl_ms(state);
    let reply = run(state, user_id, || {
        let mut inv = keys.invoke(&scripts().hold_settle, ttl);
        inv.arg(hold_id.to_string()).arg(tx.to_string()).arg(amount);
        inv
    })
    .await?;
    match reply.tag.as_str() {
        "ENDED" => {
            return match HoldEnd::parse(reply.str(0).map_err(bad_reply)?) {
                Some(HoldEnd::Settled(body)) => Ok(Answer::Replayed(Remembered::Ok(body))),
                _ => Err(ApiError::HoldExpired),
            }
        }
        "GONE" => return Err(ApiError::HoldExpired),
        "TOO_MUCH" => {
            let held = reply.int(0).map_err(bad_reply)?;
            return Err(ApiError::validation(
                "amount",
                format!("must be at most the held amount {held}"),
            ));
        }
        _ => expect_tag(&reply, "OK")?,
    }
    let balance = reply.int(0).map_err(bad_reply)?;
    let hold_amount = reply.int(2).map_err(bad_reply)?;
    let hold_raw = reply.str(3).map_err(bad_reply)?.to_string();
    let event = Event::HoldSettled(HoldSettled {
        hold_id,
        transaction_id: tx,
        user_id: user_id.to_string(),
        held: hold_amount,
        amount,
        context,
    });
    if let Err(e) = publish(state, user_id, event).await {
        if publish_surely_failed(&e) {
            let undo = async {
                let mut conn = state.redis().await?;
                let mut inv = keys.invoke(&scripts().hold_unsettle, ttl);
                inv.arg(hold_id.to_string())
                    .arg(tx.to_string())
                    .arg(amount)
                    .arg(&hold_raw);
                inv.invoke_async::<Vec<String>>(&mut *conn).await?;
                anyhow::Ok(())
            };
            if let Err(u) = undo.await {
                tracing::warn!(error = %u, "hold not restored after a failed publish");
            }
        }
        return Err(publish_failed(e));
    }
    metrics::counter!("credit_decisions_total", "op" => "settle", "outcome" => "ok").increment(1);
    Ok(Answer::Fresh(json!({
        "transaction_id": tx.to_string(),
        "amount": amount,
        "released": hold_amount - amount,
        "balance": balance,
    })))
}

/// SPEC §5.5b: release a hold whole. Releasing an ended (released or expired)
/// hold again is fine; a settled one is 409.
#[tracing::instrument(skip_all, fields(user_id, %hold_id))]
pub async fn release_hold(state: &AppState, user_id: &str, hold_id: Uuid) -> Result<()> {
    let keys = UserKeys::new(&state.keys, user_id);
    let ttl = ttl_ms(state);
    let reply = run(state, user_id, || {
        let mut inv = keys.invoke(&scripts().hold_release, ttl);
        inv.arg(hold_id.to_string());
        inv
    })
    .await?;
    match reply.tag.as_str() {
        "ENDED" => {
            return match HoldEnd::parse(reply.str(0).map_err(bad_reply)?) {
                Some(HoldEnd::Released | HoldEnd::Expired) => Ok(()),
                _ => Err(ApiError::HoldExpired),
            }
        }
        "GONE" => return Err(ApiError::HoldExpired),
        _ => expect_tag(&reply, "OK")?,
    }
    let hold_amount = reply.int(2).map_err(bad_reply)?;
    let hold_raw = reply.str(3).map_err(bad_reply)?.to_string();
    let event = Event::HoldReleased(HoldReleased {
        hold_id,
        user_id: user_id.to_string(),
        held: hold_amount,
        reason: "released".into(),
    });
    if let Err(e) = publish(state, user_id, event).await {
        if publish_surely_failed(&e) {
            let undo = async {
                let mut conn = state.redis().await?;
                let mut inv = keys.invoke(&scripts().hold_unrelease, ttl);
                inv.arg(hold_id.to_string()).arg(&hold_raw);
                inv.invoke_async::<Vec<String>>(&mut *conn).await?;
                anyhow::Ok(())
            };
            if let Err(u) = undo.await {
                tracing::warn!(error = %u, "hold not restored after a failed publish");
            }
        }
        return Err(publish_failed(e));
    }
    metrics::counter!("credit_decisions_total", "op" => "release", "outcome" => "ok").increment(1);
    Ok(())
}

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

/// SPEC §5.7: the grant is written to Postgres with its audit row in one
/// transaction (once per grant id), then added to the Redis balance once (by
/// the grant id) if Redis holds the user; otherwise Redis loads it later.
#[tracing::instrument(skip_all, fields(user_id = %g.user_id, amount = g.amount))]
pub async fn grant(state: &AppState, g: GrantRequest) -> Result<Answer> {
    let id = derived_id("grant", &g.user_id, g.key.as_deref());
    let mut tx = state.pg.begin().await?;
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
            return Err(ApiError::validation(
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
        .bind(state.settings.credits.idempotency_ttl_secs as f64)
        .fetch_one(&mut *tx)
        .await?;
        if kind != "grant" || amount != g.amount || reason.as_deref() != Some(g.reason.as_str()) {
            return Err(ApiError::IdempotencyConflict(
                "this Idempotency-Key was used with another body".into(),
            ));
        }
        recent
    };
    tx.commit().await?;
    // A replay applies too, in case the first attempt died before this step;
    // the applied-set makes it once. Past the idempotency window the set is
    // gone, so an old replay leaves Redis alone (the reconciler covers it).
    let mut spendable = None;
    if recent && !state.recovery.is_active() {
        let keys = UserKeys::new(&state.keys, &g.user_id);
        let applied_key = state.keys.grants_applied(&g.user_id);
        let ttl = ttl_ms(state);
        let outcome = async {
            let mut conn = state.redis().await?;
            let mut inv = keys.invoke(&scripts().grant_apply, ttl);
            inv.key(&applied_key)
                .arg(id.to_string())
                .arg(g.amount)
                .arg(ttl + 3_600_000);
            let raw: Vec<String> = inv.invoke_async(&mut *conn).await?;
            anyhow::Ok(Reply::parse(raw)?)
        }
        .await;
        match outcome {
            Ok(r) if r.tag == "OK" => spendable = Some(r.int(0).map_err(bad_reply)?),
            Ok(r) if r.tag == "LOST" => state.recovery.enter(state).await,
            Ok(_) => {}
            // Redis will not hold a stale figure: the reconciler compares it
            // with the ledger once nothing is pending.
            Err(e) => tracing::warn!(error = %e, "grant committed but not added to Redis yet"),
        }
    }
    let balance = match spendable {
        Some(b) => b,
        None => balance(state, &g.user_id).await?.balance,
    };
    metrics::counter!("credit_grants_total", "replayed" => (!applied).to_string()).increment(1);
    let body = json!({"transaction_id": id.to_string(), "balance": balance});
    Ok(if applied {
        Answer::Fresh(body)
    } else {
        Answer::Replayed(Remembered::Ok(body))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consume(v: Value) -> Result<(i64, CreditContext)> {
        parse_body::<ConsumeBody>(v)?.validate()
    }

    fn from_value<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
        parse_body(v)
    }

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::Validation { field, .. } => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn amounts_are_integers_from_one_to_two_pow_53_minus_one() {
        assert_eq!(consume(json!({"amount": 1})).unwrap().0, 1);
        assert_eq!(
            consume(json!({"amount": MAX_CREDITS})).unwrap().0,
            MAX_CREDITS
        );
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!(1.0),
            json!("5"),
            json!(null),
            json!(true),
            json!(MAX_CREDITS + 1),
            json!(9_223_372_036_854_775_808u64),
            json!(1e30),
        ] {
            let e = consume(json!({"amount": bad.clone()})).unwrap_err();
            assert_eq!(field_of(e), "amount", "{bad}");
        }
        assert_eq!(field_of(consume(json!({})).unwrap_err()), "amount");
        assert_eq!(field_of(consume(json!([1])).unwrap_err()), "body");
    }

    #[test]
    fn the_original_clients_names_are_accepted() {
        let (amount, ctx) = consume(json!({
            "amount": 3, "description": "chat", "sessionId": "s1",
            "modelId": "openai/gpt-4o", "provider": "openai", "tokensUsed": 120
        }))
        .unwrap();
        assert_eq!(amount, 3);
        assert_eq!(ctx.session_id.as_deref(), Some("s1"));
        assert_eq!(ctx.model.as_deref(), Some("openai/gpt-4o"));
        assert_eq!(ctx.prompt_tokens, Some(120));
        assert_eq!(ctx.description.as_deref(), Some("chat"));
    }

    #[test]
    fn bad_details_name_their_field() {
        assert_eq!(
            field_of(consume(json!({"amount": 1, "model": "m".repeat(129)})).unwrap_err()),
            "model"
        );
        assert_eq!(
            field_of(consume(json!({"amount": 1, "metadata": [1]})).unwrap_err()),
            "metadata"
        );
        assert_eq!(
            field_of(consume(json!({"amount": 1, "prompt_tokens": -1})).unwrap_err()),
            "prompt_tokens"
        );
        let hold = |v| from_value::<HoldBody>(v).unwrap().validate(300, 3600);
        assert_eq!(hold(json!({"amount": 1})).unwrap().1, 300);
        assert_eq!(
            field_of(hold(json!({"amount": 1, "ttl_secs": 0})).unwrap_err()),
            "ttl_secs"
        );
        assert_eq!(
            field_of(hold(json!({"amount": 1, "ttl_secs": 3601})).unwrap_err()),
            "ttl_secs"
        );
        let settle = from_value::<SettleBody>(json!({"amount": 0}))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(settle.0, 0);
        let grant = |v| from_value::<GrantBody>(v).and_then(GrantBody::validate);
        assert_eq!(
            field_of(grant(json!({"amount": 5, "reason": " "})).unwrap_err()),
            "reason"
        );
        assert_eq!(field_of(grant(json!({"amount": 5})).unwrap_err()), "reason");
    }

    #[test]
    fn values_the_ledger_refuses_are_refused_in_every_credit_body() {
        for (member, value) in [
            ("description", json!("a\u{0}b")),
            ("description", json!("bell\u{7}")),
            ("model", json!("m\u{0}")),
            ("modelId", json!("m\nx")),
            ("provider", json!("\u{0}")),
            ("session_id", json!("s\u{0}")),
            ("sessionId", json!("s\u{1b}")),
            ("feature", json!("f\u{0}")),
            ("metadata", json!({"k": "\u{0}"})),
            ("metadata", json!({"k\u{0}": 1})),
            ("prompt_tokens", json!(1_000_000_001)),
            ("tokensUsed", json!(i64::MAX)),
            ("completion_tokens", json!(9_223_372_036_854_775_807i64)),
        ] {
            let mut body = json!({"amount": 1});
            body[member] = value.clone();
            let e = consume(body).unwrap_err();
            let named = field_of(e);
            // Aliases are reported under the name the client sent.
            assert_eq!(named, member, "{member}: {value}");
        }
        let free = consume(json!({"amount": 1, "description": "two\r\nlines\tok"})).unwrap();
        assert_eq!(free.1.description.as_deref(), Some("two\r\nlines\tok"));
        for (member, value) in [
            ("model", json!("m\u{0}")),
            ("metadata", json!({"x": ["\u{0}"]})),
        ] {
            let mut body = json!({"amount": 1});
            body[member] = value;
            let e = from_value::<HoldBody>(body).unwrap_err();
            assert_eq!(field_of(e), member);
        }
        for (member, value) in [
            ("provider", json!("p\u{0}")),
            ("completion_tokens", json!(1_000_000_001)),
        ] {
            let mut body = json!({"amount": 1});
            body[member] = value;
            let e = from_value::<SettleBody>(body).unwrap_err();
            assert_eq!(field_of(e), member);
        }
        let e = from_value::<GrantBody>(json!({"amount": 1, "reason": "r\u{0}"})).unwrap_err();
        assert_eq!(field_of(e), "reason");
    }

    #[test]
    fn equal_parsed_bodies_hash_equal_whatever_the_key_order() {
        let a: Value = serde_json::from_str(
            r#"{"amount": 5, "metadata": {"b": 1, "a": [1, {"y": 2, "x": 1}]}}"#,
        )
        .unwrap();
        let b: Value =
            serde_json::from_str(r#"{"metadata":{"a":[1,{"x":1,"y":2}],"b":1},"amount":5}"#)
                .unwrap();
        assert_eq!(body_hash(&a), body_hash(&b));
        assert_eq!(
            canonical_json(&b),
            r#"{"amount":5,"metadata":{"a":[1,{"x":1,"y":2}],"b":1}}"#
        );
        let c = json!({"amount": 6, "metadata": {"b": 1, "a": [1, {"y": 2, "x": 1}]}});
        assert_ne!(body_hash(&a), body_hash(&c));
        assert_ne!(
            body_hash(&json!({"a": [1, 2]})),
            body_hash(&json!({"a": [2, 1]}))
        );
        assert_eq!(body_hash(&a).len(), 64);
    }

    #[test]
    fn keys_are_optional_and_bounded() {
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(&h).unwrap(), None);
        h.insert("idempotency-key", "k-1".parse().unwrap());
        assert_eq!(idempotency_key(&h).unwrap().as_deref(), Some("k-1"));
        h.insert("idempotency-key", "k".repeat(255).parse().unwrap());
        assert!(idempotency_key(&h).is_ok());
        h.insert("idempotency-key", "k".repeat(256).parse().unwrap());
        assert_eq!(
            field_of(idempotency_key(&h).unwrap_err()),
            "Idempotency-Key"
        );
        h.insert("idempotency-key", "".parse().unwrap());
        assert!(idempotency_key(&h).is_err());
    }

    #[test]
    fn keyed_ids_are_stable_per_user_and_key() {
        let a = derived_id("consume", "u1", Some("k"));
        assert_eq!(a, derived_id("consume", "u1", Some("k")));
        assert_ne!(a, derived_id("consume", "u2", Some("k")));
        assert_ne!(a, derived_id("hold", "u1", Some("k")));
        assert_ne!(
            derived_id("consume", "u1", None),
            derived_id("consume", "u1", None)
        );
        let h = Uuid::new_v4();
        assert_eq!(settle_id(h), settle_id(h));
    }

    #[test]
    fn remembered_answers_round_trip() {
        let ok =
            Remembered::Ok(json!({"transaction_id": "t", "balance": 9_007_199_254_740_990i64}));
        assert_eq!(Remembered::parse(&ok.to_json()), Some(ok));
        // The scripts write the 402 form themselves.
        assert_eq!(
            Remembered::parse(r#"{"status":402,"balance":3,"required":5}"#),
            Some(Remembered::Insufficient {
                balance: 3,
                required: 5
            })
        );
        assert_eq!(Remembered::parse("nope"), None);
        assert_eq!(
            HoldEnd::parse(
                r#"{"state":"settled","transaction_id":"t","amount":3,"released":2,"balance":7}"#
            ),
            Some(HoldEnd::Settled(
                json!({"transaction_id": "t", "amount": 3, "released": 2, "balance": 7})
            ))
        );
        assert_eq!(
            HoldEnd::parse(r#"{"state":"expired"}"#),
            Some(HoldEnd::Expired)
        );
        assert_eq!(
            HoldEnd::parse(r#"{"state":"released"}"#),
            Some(HoldEnd::Released)
        );
    }

    #[test]
    fn early_replies_become_answers() {
        let r = |v: &[&str]| Reply::parse(v.iter().map(|s| s.to_string()).collect()).unwrap();
        assert!(matches!(
            keyed_early(&r(&["CONFLICT", "0"])),
            Err(ApiError::IdempotencyConflict(_))
        ));
        assert!(matches!(
            keyed_early(&r(&["BUSY", "0"])),
            Err(ApiError::IdempotencyConflict(_))
        ));
        assert!(matches!(
            with_required(
                keyed_early(&r(&["INSUFFICIENT", "0", "4", "0"])).unwrap_err(),
                7
            ),
            ApiError::InsufficientCredits {
                balance: 4,
                required: 7
            }
        ));
        assert_eq!(
            keyed_early(&r(&[
                "REPLAY",
                "0",
                r#"{"status":402,"balance":1,"required":2}"#
            ]))
            .unwrap(),
            Some(Answer::Replayed(Remembered::Insufficient {
                balance: 1,
                required: 2
            }))
        );
        assert_eq!(keyed_early(&r(&["OK", "0", "1", "0", "1"])).unwrap(), None);
    }

    #[test]
    fn only_sure_publish_failures_are_undone() {
        assert!(publish_surely_failed(&PublishError::NotConnected));
        assert!(publish_surely_failed(&PublishError::Nacked));
        assert!(!publish_surely_failed(&PublishError::Timeout));
        assert!(!publish_surely_failed(&PublishError::Broker(
            "reset".into()
        )));
    }
}
