//! Extension API keys (SPEC §5.11, docs/api.md "API keys"): long-lived
//! credentials a user makes for the extension, each limited to scopes.
//!
//! - **The key**: `vsk_` + 32 random bytes in base64url (47 characters),
//!   shown once. Lists show its first [`SHOWN_CHARS`] characters.
//! - **Stored as its SHA-256 only**, in Postgres (`api_keys.key_hash`) and as
//!   the name of its Redis record. A plain hash is right here, unlike for
//!   passwords: 256 random bits cannot be guessed, so nothing is gained by a
//!   slow or salted hash, and an unsalted one is found by equality.
//! - **Scopes → routes** ([`required_scope`]): usage and session routes need
//!   `usage:write`; credit writes `credits:write`; the GET reads `read`.
//!   Admin routes, key management, export and every other write never accept
//!   a key. A key acts as its user, never as an admin.
//! - **Verified from Redis** ([`store::ApiKeyStore::verify`]): one `MGET` of
//!   the key's record and its bucket's `loaded` marker. A record says who and
//!   what; a tombstone says revoked; no record beside a marker is an unknown
//!   key, answered 401 without Postgres (so guessing keys costs no database
//!   work). No marker means Redis lost the records (or never had them): that
//!   key is read from Postgres and written back, and the store's watcher
//!   rebuilds every record. A gateway trusts what it read for at most
//!   `api_keys.cache_ttl_ms` (≤ 3 s), so a revocation holds everywhere within 5 s.
//!
//! The decisions here are plain functions; `store` does the I/O.

use axum::http::Method;
use base64::Engine;
use common::class::Class;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub mod store;

pub use store::{ApiKeyStore, CreatedKey, KeyList, KeyView, Refused};

/// What every key starts with, so a key is recognizable (in a leak scan, in
/// the `Authorization` header) and never mistaken for a JWT or a dev token.
pub const KEY_PREFIX: &str = "vsk_";
/// Random bytes in a key.
pub const SECRET_BYTES: usize = 32;
/// `SECRET_BYTES` in base64url without padding.
const SECRET_CHARS: usize = SECRET_BYTES.div_ceil(3) * 4 - (3 - SECRET_BYTES % 3) % 3;
/// Characters of a whole key.
pub const KEY_CHARS: usize = KEY_PREFIX.len() + SECRET_CHARS;
/// Characters of a key that lists show (`vsk_` + 8).
pub const SHOWN_CHARS: usize = KEY_PREFIX.len() + 8;
/// Longest key name.
pub const MAX_NAME_CHARS: usize = 64;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Scope {
    /// Usage events and session validation.
    #[serde(rename = "usage:write")]
    UsageWrite,
    /// Consumes and holds (open, settle, release).
    #[serde(rename = "credits:write")]
    CreditsWrite,
    /// The GET reads: profile, analytics, stats, ledger, holds, limits, balance.
    #[serde(rename = "read")]
    Read,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Self::UsageWrite, Self::CreditsWrite, Self::Read];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UsageWrite => "usage:write",
            Self::CreditsWrite => "credits:write",
            Self::Read => "read",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// The scopes of a new key: at least one, none twice (422 naming `scopes`).
/// Unknown names never get here: deserializing [`Scope`] refuses them.
pub fn check_scopes(scopes: &[Scope]) -> Result<(), String> {
    if scopes.is_empty() {
        return Err("must name at least one scope".into());
    }
    for (i, s) in scopes.iter().enumerate() {
        if scopes[..i].contains(s) {
            return Err(format!("names {} twice", s.as_str()));
        }
    }
    Ok(())
}

/// The scope a request needs when it comes with a key, or `None` when no
/// key may make it (docs/api.md "API keys"). Decided by the route's class and
/// method, so a route added later is refused to keys unless it is a GET read
/// or of a class keys are for.
pub fn required_scope(class: Class, method: &Method, path: &str) -> Option<Scope> {
    let own = path
        .strip_prefix("/api/users/")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, rest)| rest);
    // Managing keys takes the user's own login; the export is everything.
    if own
        .is_some_and(|rest| rest == "api-keys" || rest.starts_with("api-keys/") || rest == "export")
    {
        return None;
    }
    let read = method == Method::GET || method == Method::HEAD;
    match class {
        Class::Usage | Class::Session => Some(Scope::UsageWrite),
        Class::Credits if read => Some(Scope::Read),
        Class::Credits => Some(Scope::CreditsWrite),
        Class::Profile | Class::Analytics if read => Some(Scope::Read),
        Class::Profile | Class::Analytics | Class::Admin => None,
    }
}

/// Why a key's request is refused (403), or `None` when its scopes allow it.
pub fn refusal(scopes: &[Scope], class: Class, method: &Method, path: &str) -> Option<String> {
    match required_scope(class, method, path) {
        None => Some("API keys cannot be used on this route; sign in instead".into()),
        Some(s) if scopes.contains(&s) => None,
        Some(s) => Some(format!("this API key lacks the {} scope", s.as_str())),
    }
}

/// A key as made: the text shown once, its hash, the part lists show.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key: String,
    pub hash: [u8; 32],
    pub prefix: String,
}

/// A new key from the operating system's random source.
pub fn generate() -> NewKey {
    from_secret(&random_secret())
}

/// 32 bytes from the operating system's CSPRNG: `Uuid::new_v4` draws 122
/// random bits from `getrandom` per id (the gateway has no `rand` of its own),
/// so SHA-256 over three of them (366 bits) gives 32 bytes that carry the
/// full 256 bits of entropy.
fn random_secret() -> [u8; SECRET_BYTES] {
    let mut h = Sha256::new();
    for _ in 0..3 {
        h.update(Uuid::new_v4().as_bytes());
    }
    h.finalize().into()
}

fn from_secret(secret: &[u8; SECRET_BYTES]) -> NewKey {
    let key = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    NewKey {
        hash: hash(&key),
        prefix: key[..SHOWN_CHARS].to_string(),
        key,
    }
}

/// The SHA-256 of a key's text: what is stored and looked up.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Lower-case hex of a hash (the Redis record's name).
pub fn hex(hash: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(hash.len() * 2);
    for b in hash {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Whether a bearer token is meant as an API key (the guard then never
/// tries it as a JWT).
pub fn is_api_key(token: &str) -> bool {
    token.starts_with(KEY_PREFIX)
}

/// Whether a token has a key's shape: checked before any lookup, so a
/// malformed one costs nothing.
pub fn well_formed(token: &str) -> bool {
    token.len() == KEY_CHARS
        && token.strip_prefix(KEY_PREFIX).is_some_and(|s| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// What a key lets its request do, from its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub user_id: String,
    pub key_id: Uuid,
    pub scopes: Vec<Scope>,
}

/// A Redis record: a live key's grant, or a tombstone.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    grant: Option<Grant>,
    revoked: bool,
}

/// The record of a live key (`None`: the tombstone of a revoked one).
pub fn encode_record(grant: Option<&Grant>) -> String {
    serde_json::to_string(&Record {
        grant: grant.cloned(),
        revoked: grant.is_none(),
    })
    .expect("a record serializes")
}

/// What a lookup found in Redis, and so what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Grant(Grant),
    /// A tombstone: revoked (401).
    Revoked,
    /// No record while the bucket's records are loaded: no such key (401).
    Unknown,
    /// No record and no marker (or an unreadable record): Postgres decides.
    AskPostgres,
}

/// The rule of the module docs on what one `MGET` answered.
pub fn decide(record: Option<&str>, loaded: bool) -> Found {
    match record.map(serde_json::from_str::<Record>) {
        Some(Ok(Record { revoked: true, .. })) => Found::Revoked,
        Some(Ok(Record {
            grant: Some(g),
            revoked: false,
        })) => Found::Grant(g),
        Some(_) => Found::AskPostgres,
        None if loaded => Found::Unknown,
        None => Found::AskPostgres,
    }
}

#[cfg(test)]
mod tests;
