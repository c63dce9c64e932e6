//! Credit decisions (docs/api.md "Credits", §5.5b, §5.7): reserve in Redis with one script,
//! publish the event with a confirm, answer. The model, the invariants and
//! each failure are in `docs/credits.md`; the scripts in `common::redis::scripts`.
//!
//! # Layout
//! - [`amount`]: the bodies, `Credits<MIN>` and each field's rule.
//! - [`answer`]: the 200 answers, as types (the OpenAPI document derives their schemas).
//! - [`idempotency`]: the key, the body hash, derived ids, remembered answers.
//! - [`reserve`]: running a credit script in Redis and reading its replies.
//! - [`store`]: Postgres reads and loading a user into Redis.
//! - [`flows`]: consume, hold, settle, release (what handlers call).
//! - [`grant`]: the admin grant to a user.
//! - [`orgs`]: whose balance a request moves (a member's is the organization's pool).
//! - [`recovery`]: the recovery after Redis lost its credit data.
//!
//! The plain functions decide what a request means and are unit-tested beside
//! them; the async ones do the IO. Every public item is re-exported here, so
//! `crate::credits::X` paths stay as they were.

pub mod amount;
pub mod answer;
pub mod flows;
pub mod grant;
pub mod idempotency;
pub mod orgs;
pub mod pricing;
pub mod recovery;
pub mod reserve;
pub mod store;

pub use amount::{
    Amount, ConsumeBody, Count, Credits, Description, FeatureName, GrantBody, HoldBody, ModelName,
    ProviderName, Reason, SessionRef, SettleBody,
};
pub use answer::{ConsumeAnswer, GrantAnswer, HoldAnswer, SettleAnswer};
pub use flows::{consume, open_hold, publish_surely_failed, release_hold, settle_hold};
pub use grant::{grant, GrantRequest};
pub use idempotency::{
    body_hash, canonical_json, derived_id, idempotency_key, idempotency_key_value, settle_id,
    Answer, HoldEnd, Idem, Remembered, ID_NAMESPACE,
};
pub use store::{
    balance, balance_from_postgres, load_into_redis, Balance, CreditLimits, CreditStore,
};

/// Parses a request body into `T`, which must be a JSON object.
pub use crate::decode::parse_body;
