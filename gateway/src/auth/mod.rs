//! Token verification (docs/api.md "Conventions"). The key decides the algorithm, never the
//! token: a token with a `kid` is checked only against that JWKS key with the
//! algorithm the key implies; a token without one only against `JWT_SECRET`
//! with HS256. Dev tokens (`dev:USER[:admin]`) only when enabled.
//!
//! The checks themselves ([`Verifier`]) are pure given a [`KeySet`]: the
//! [`Authenticator`] only adds the JWKS fetch and its cache around them, so the
//! JWT attack matrix runs as unit tests (`tests.rs`) without any service.
//!
//! A verified token is remembered by its hash until its `exp` ([`cache`]), so
//! an RS256 token costs one signature check per gateway and lifetime. The key
//! set is re-fetched every `auth.jwks_refresh_secs` ([`Authenticator::run_refresh`]):
//! a key gone (or changed) upstream stops being trusted and takes its cached
//! tokens with it; a failed refresh keeps the set in hand.
//!
//! `azp` (`JWT_AUTHORIZED_PARTIES`): a token that carries one must carry a
//! listed one; a token without `azp` passes. This is the rule of Clerk's own
//! backend SDK (`azp` is checked only when present): Clerk's session tokens
//! carry it for browser sessions, while tokens minted otherwise may not.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use common::settings::AuthSettings;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

pub mod cache;

use cache::TokenCache;

/// Who the token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub admin: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The JWKS endpoint could not be reached and no cached key fits.
    #[error("key set unavailable")]
    KeysUnavailable,
}

/// A user id as Clerk issues them: 1..=64 of `[A-Za-z0-9_-]`.
pub fn valid_user_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Deserialize)]
struct RawClaims {
    sub: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    role: Option<serde_json::Value>,
    /// Read for the cache only (jsonwebtoken has checked them).
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    nbf: Option<serde_json::Value>,
    #[serde(default)]
    azp: Option<serde_json::Value>,
}

/// What an accepted token yields: its claims, and its `exp`/`nbf` as numbers
/// (when they are), which decide how long it may be cached.
struct Verified {
    claims: Claims,
    exp: Option<f64>,
    nbf: Option<f64>,
}

/// A JWKS whose keys are parsed one by one.
#[derive(Deserialize)]
struct RawJwkSet {
    keys: Vec<serde_json::Value>,
}

/// A key a token can be checked against, with the one algorithm it implies.
pub type Key = (DecodingKey, Algorithm);

/// The usable keys of a JWKS by `kid`: signature keys of a known asymmetric
/// type, each with the algorithm [`algorithm_of`] gives it.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, Key>,
    /// Each usable key's JWK as served, to tell a changed key from a kept one.
    raw: HashMap<String, serde_json::Value>,
}

impl KeySet {
    /// The keys of a JWKS's `keys` member. One key of a form we do not know
    /// (an encryption key, a new key type, a symmetric key) must not cost us
    /// the others: it is left out.
    pub fn from_values(keys: Vec<serde_json::Value>) -> Self {
        let mut set = Self::default();
        for value in keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value.clone()) else {
                continue;
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let (Some(kid), Some(alg)) = (jwk.common.key_id.clone(), algorithm_of(&jwk)) else {
                continue;
            };
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            set.keys.insert(kid.clone(), (key, alg));
            set.raw.insert(kid, value);
        }
        set
    }

    /// The kids of this set that `next` no longer trusts the same way: gone,
    /// or served with other key material (tokens they verified must go).
    pub fn dropped_in(&self, next: &KeySet) -> Vec<String> {
        let mut kids: Vec<String> = self
            .raw
            .iter()
            .filter(|(kid, jwk)| next.raw.get(*kid) != Some(*jwk))
            .map(|(kid, _)| kid.clone())
            .collect();
        kids.sort();
        kids
    }

    /// A JWKS document (`{"keys": [...]}`).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        Ok(Self::from_values(
            serde_json::from_str::<RawJwkSet>(text)?.keys,
        ))
    }

    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The token of an `Authorization` header value: `Bearer <token>` (or
/// `bearer`), trimmed; anything else is [`AuthError::Missing`].
pub fn bearer_token(header: Option<&str>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    Ok(header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(AuthError::Missing)?
        .trim())
}

fn unknown_kid() -> AuthError {
    AuthError::Invalid("unknown kid".into())
}

/// The `kid` a JWT's header names, if it is one (not a dev token) and names one.
fn named_kid(token: &str) -> Option<String> {
    if token.starts_with("dev:") {
        return None;
    }
    jsonwebtoken::decode_header(token).ok()?.kid
}

/// Every check of docs/api.md "Conventions" on a token, given the key its `kid`
/// names: no I/O, no clock but the system's.
pub struct Verifier {
    settings: AuthSettings,
    hs_key: Option<DecodingKey>,
}

impl Verifier {
    pub fn new(settings: &AuthSettings) -> Self {
        let hs_key = settings
            .jwt_secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| DecodingKey::from_secret(s.as_bytes()));
        Self {
            settings: settings.clone(),
            hs_key,
        }
    }

    /// Verifies `token` against the keys in hand: a `kid` that `keys` lacks is
    /// refused (the [`Authenticator`] would re-fetch the key set first).
    pub fn verify(&self, token: &str, keys: &KeySet) -> Result<Claims, AuthError> {
        self.verify_with(token, |kid| keys.get(kid).cloned().ok_or_else(unknown_kid))
            .map(|v| v.claims)
    }

    /// Verifies `token` with the keys `jwks_key` gives for its `kid` (a token
    /// without one is checked against `JWT_SECRET`, a dev token needs none).
    fn verify_with(
        &self,
        token: &str,
        jwks_key: impl FnOnce(&str) -> Result<Key, AuthError>,
    ) -> Result<Verified, AuthError> {
        if let Some(rest) = token.strip_prefix("dev:") {
            let claims = self.verify_dev(rest)?;
            return Ok(Verified {
                claims,
                exp: None,
                nbf: None,
            });
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed header: {e}")))?;
        let (key, alg) = match header.kid {
            Some(kid) => jwks_key(&kid)?,
            None => (
                self.hs_key
                    .clone()
                    .ok_or_else(|| AuthError::Invalid("token without kid and no secret".into()))?,
                Algorithm::HS256,
            ),
        };
        // The token's own `alg` must equal the key's; jsonwebtoken also checks this.
        if header.alg != alg {
            return Err(AuthError::Invalid(
                "algorithm does not match the key".into(),
            ));
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.settings.leeway_secs;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        // jsonwebtoken checks `iss`/`aud` only when the token carries them, so a
        // configured issuer or audience must also be a required claim: a token
        // without one (or with one of the wrong type) is refused, not waved through.
        let mut required = vec!["exp", "sub"];
        match &self.settings.jwt_issuer {
            Some(iss) if !iss.is_empty() => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            _ => {}
        }
        match &self.settings.jwt_audience {
            Some(aud) if !aud.is_empty() => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            _ => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<RawClaims>(token, &key, &validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let c = data.claims;
        if !valid_user_id(&c.sub) {
            return Err(AuthError::Invalid("malformed sub".into()));
        }
        if !authorized_party(&self.settings.authorized_parties, c.azp.as_ref()) {
            return Err(AuthError::Invalid("azp is not an authorized party".into()));
        }
        Ok(Verified {
            exp: c.exp.as_ref().and_then(serde_json::Value::as_f64),
            nbf: c.nbf.as_ref().and_then(serde_json::Value::as_f64),
            claims: Claims {
                sub: c.sub,
                email: c.email.filter(|e| e.len() <= 320),
                name: c.name.filter(|n| n.len() <= 256),
                admin: matches!(c.role, Some(serde_json::Value::String(ref r)) if r == "admin"),
            },
        })
    }

    fn verify_dev(&self, rest: &str) -> Result<Claims, AuthError> {
        if !self.settings.dev_tokens {
            return Err(AuthError::Invalid("dev tokens are disabled".into()));
        }
        let (sub, admin) = match rest.rsplit_once(':') {
            Some((sub, "admin")) => (sub, true),
            Some(_) => return Err(AuthError::Invalid("malformed dev token".into())),
            None => (rest, false),
        };
        if !valid_user_id(sub) {
            return Err(AuthError::Invalid("malformed sub".into()));
        }
        Ok(Claims {
            sub: sub.to_string(),
            email: None,
            name: None,
            admin,
        })
    }
}

/// Whether a token's `azp` passes `JWT_AUTHORIZED_PARTIES` (`allowed`):
/// no list, or no `azp`, passes; a present `azp` must be a listed string.
pub fn authorized_party(allowed: &[String], azp: Option<&serde_json::Value>) -> bool {
    match azp {
        _ if allowed.is_empty() => true,
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::String(p)) => allowed.iter().any(|a| a == p),
        Some(_) => false,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why the key set is fetched: the rules differ (see [`Authenticator::refresh`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fetch {
    /// At start or first use; free of the re-fetch interval.
    First,
    /// A token named a kid not in hand: at most once per interval.
    UnknownKid,
    /// The periodic refresh: always.
    Timer,
}

struct JwksCache {
    keys: KeySet,
    /// When the last re-fetch for an unknown `kid` ran (the first fetch does not count).
    last_refetch: Option<Instant>,
    fetched_once: bool,
    /// When a fetch last failed: until one succeeds, an unreachable JWKS is
    /// asked at most once per [`FAILED_FETCH_BACKOFF`], not once per request.
    last_failure: Option<Instant>,
}

/// How long kid tokens answer 503 at once after a failed first fetch.
const FAILED_FETCH_BACKOFF: Duration = Duration::from_secs(1);

pub struct Authenticator {
    settings: AuthSettings,
    verifier: Verifier,
    http: reqwest::Client,
    jwks: RwLock<JwksCache>,
    /// Serializes fetches so a burst of unknown kids makes one request.
    fetch_lock: Mutex<()>,
    tokens: TokenCache<Claims>,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> Arc<Self> {
        Arc::new(Self {
            settings: settings.clone(),
            verifier: Verifier::new(settings),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
            jwks: RwLock::new(JwksCache {
                keys: KeySet::default(),
                last_refetch: None,
                fetched_once: false,
                last_failure: None,
            }),
            fetch_lock: Mutex::new(()),
            tokens: TokenCache::new(settings.token_cache_size),
        })
    }

    /// Fetches the key set once at start (failure is not fatal: first use retries).
    pub async fn prefetch(&self) {
        if self.settings.jwks_url.is_some() {
            let _ = self.refresh(Fetch::First).await;
        }
    }

    /// Re-fetches the key set every `auth.jwks_refresh_secs` for as long as
    /// the authenticator lives (the task holds it weakly): a key removed
    /// upstream stops being trusted. Returns at once without a `JWKS_URL`.
    pub async fn run_refresh(self: Arc<Self>) {
        if self.settings.jwks_url.is_none() {
            return;
        }
        let period = Duration::from_secs(self.settings.jwks_refresh_secs.max(1));
        let this: Weak<Self> = Arc::downgrade(&self);
        drop(self);
        loop {
            tokio::time::sleep(period).await;
            let Some(auth) = this.upgrade() else { return };
            // A failure is logged by `refresh` and keeps the set in hand.
            let _ = auth.refresh(Fetch::Timer).await;
        }
    }

    /// Verifies an `Authorization` header value.
    pub async fn verify_header(&self, header: Option<&str>) -> Result<Claims, AuthError> {
        self.verify(bearer_token(header)?).await
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        // A token verified before answers from the cache (dev tokens are not
        // cached: they cost nothing to check).
        let hash =
            (self.tokens.enabled() && !token.starts_with("dev:")).then(|| cache::token_hash(token));
        let now = unix_now();
        if let Some(claims) = hash.as_ref().and_then(|h| self.tokens.get(h, now)) {
            return Ok(claims);
        }
        // Read before the key: a key dropped after this point cannot leave
        // this token in the cache.
        let generation = self.tokens.generation();
        // The key the token names is looked up first (it may need a fetch);
        // the checks then run on it without I/O.
        let kid = named_kid(token);
        let key = match &kid {
            Some(kid) => Some(self.key_for(kid).await?),
            None => None,
        };
        let verified = self
            .verifier
            .verify_with(token, |_| key.ok_or_else(unknown_kid))?;
        if let Some(hash) = hash {
            if let Some(until) = cache::cache_until(verified.exp, verified.nbf, now) {
                self.tokens
                    .insert(hash, verified.claims.clone(), until, kid, generation, now);
            }
        }
        Ok(verified.claims)
    }

    /// Tokens in the verified-token cache (for tests and metrics).
    pub fn cached_tokens(&self) -> usize {
        self.tokens.len()
    }

    async fn key_for(&self, kid: &str) -> Result<Key, AuthError> {
        if self.settings.jwks_url.is_none() {
            return Err(AuthError::Invalid(
                "token has a kid but no JWKS is configured".into(),
            ));
        }
        if let Some(k) = self.jwks.read().await.keys.get(kid) {
            return Ok(k.clone());
        }
        let fetched = {
            let cache = self.jwks.read().await;
            cache.fetched_once
        };
        // The first fetch (at start or first use) is free; re-fetches for an
        // unknown kid happen at most once per interval.
        let why = if fetched {
            Fetch::UnknownKid
        } else {
            Fetch::First
        };
        self.refresh(why).await?;
        self.jwks
            .read()
            .await
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(unknown_kid)
    }

    async fn refresh(&self, why: Fetch) -> Result<(), AuthError> {
        let _guard = self.fetch_lock.lock().await;
        let is_refetch = why == Fetch::UnknownKid;
        if why != Fetch::Timer {
            let cache = self.jwks.read().await;
            let interval = Duration::from_secs(self.settings.jwks_refetch_interval_secs);
            if is_refetch && cache.fetched_once {
                if let Some(at) = cache.last_refetch {
                    if at.elapsed() < interval {
                        return Ok(());
                    }
                }
            }
            if !is_refetch && cache.fetched_once {
                return Ok(());
            }
            if !cache.fetched_once
                && cache
                    .last_failure
                    .is_some_and(|at| at.elapsed() < FAILED_FETCH_BACKOFF)
            {
                return Err(AuthError::KeysUnavailable);
            }
        }
        let url = self.settings.jwks_url.as_deref().unwrap_or_default();
        let result = async {
            let resp = self.http.get(url).send().await?.error_for_status()?;
            resp.json::<RawJwkSet>().await
        }
        .await;
        let mut cache = self.jwks.write().await;
        if cache.fetched_once && why != Fetch::Timer {
            cache.last_refetch = Some(Instant::now());
        }
        match result {
            Ok(set) => {
                cache.fetched_once = true;
                cache.last_failure = None;
                let next = KeySet::from_values(set.keys);
                let dropped = cache.keys.dropped_in(&next);
                cache.keys = next;
                drop(cache);
                // After the swap: a request that reads the generation from
                // now on also reads the new set.
                if !dropped.is_empty() {
                    tracing::info!(kids = ?dropped, "JWKS keys dropped upstream; their cached tokens are forgotten");
                    self.tokens.drop_kids(&dropped);
                }
                Ok(())
            }
            Err(e) => {
                cache.last_failure = Some(Instant::now());
                if cache.fetched_once {
                    tracing::warn!(error = %e, ?why, "JWKS refresh failed; keeping the key set in hand");
                } else {
                    tracing::warn!(error = %e, "JWKS fetch failed");
                }
                Err(AuthError::KeysUnavailable)
            }
        }
    }
}

/// The algorithm a JWK implies: its `alg` when it names an asymmetric one that
/// fits the key type, else the key type's own (RSA → RS256, P-256 → ES256,
/// Ed25519 → EdDSA). Symmetric keys in a JWKS are never accepted.
pub fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    let from_alg = jwk.common.key_algorithm.and_then(|a| match a {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::RS384 => Some(Algorithm::RS384),
        KeyAlgorithm::RS512 => Some(Algorithm::RS512),
        KeyAlgorithm::PS256 => Some(Algorithm::PS256),
        KeyAlgorithm::PS384 => Some(Algorithm::PS384),
        KeyAlgorithm::PS512 => Some(Algorithm::PS512),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::ES384 => Some(Algorithm::ES384),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    });
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => {
            if let Some(a) = from_alg {
                return matches!(
                    a,
                    Algorithm::RS256
                        | Algorithm::RS384
                        | Algorithm::RS512
                        | Algorithm::PS256
                        | Algorithm::PS384
                        | Algorithm::PS512
                )
                .then_some(a);
            }
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => Algorithm::EdDSA,
            _ => return None,
        },
        AlgorithmParameters::OctetKey(_) => return None,
    };
    match from_alg {
        Some(a) if a != by_type => None,
        _ => Some(by_type),
    }
}

#[cfg(test)]
mod cache_tests;
#[cfg(test)]
mod tests;
