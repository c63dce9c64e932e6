//! The verified-token cache (SPEC §4, issue 19): a token verified once is not
//! verified again for the rest of its life on this gateway. Keyed by the
//! SHA-256 of the token (the token itself is never kept), an entry holds the
//! claims until the token's `exp` – never past it, the leeway is not granted
//! to cached answers – and leaves as soon as a JWKS change drops or replaces
//! the key (`kid`) that verified it.
//!
//! The hit path is one hash and one short `std::sync::Mutex` section on one of
//! [`SHARDS`] shards: no async lock, no allocation but the claims' clone. The
//! bound is exact: a full shard first drops its expired entries, then an
//! arbitrary eighth of itself.
//!
//! Only verified tokens are inserted (the [`super::Authenticator`] inserts
//! after [`super::Verifier`] accepted), and only those [`cache_until`] allows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use sha2::{Digest, Sha256};

/// Shards of the cache: enough that two cores rarely meet on one lock.
pub const SHARDS: usize = 16;

/// The cache key: SHA-256 of the whole token.
pub type TokenHash = [u8; 32];

pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// Until when (unix seconds, exclusive) a token verified at `now` may be
/// answered from the cache: its `exp`, when it is ahead and its `nbf` (if any)
/// has passed without leeway. `None`: not cached (a token accepted thanks to
/// the leeway, or with claims that are not plain numbers, is verified anew
/// each time).
pub fn cache_until(exp: Option<f64>, nbf: Option<f64>, now: u64) -> Option<u64> {
    let exp = exp.filter(|e| e.is_finite() && *e >= 0.0)?.floor() as u64;
    match nbf {
        None => {}
        Some(n) if n.is_finite() && n <= now as f64 => {}
        Some(_) => return None,
    }
    (exp > now).then_some(exp)
}

struct Entry<V> {
    value: V,
    /// Valid while `now < until`.
    until: u64,
    /// The JWKS key that verified it (`None`: `JWT_SECRET`).
    kid: Option<String>,
}

type Shard<V> = HashMap<TokenHash, Entry<V>>;

pub struct TokenCache<V> {
    shards: Vec<Mutex<Shard<V>>>,
    /// Capacity of each shard; they add up to the configured size exactly.
    caps: Vec<usize>,
    /// Bumped by every [`TokenCache::drop_kids`]: an insert that read its
    /// key before a drop (it carries the older generation) is not kept.
    generation: AtomicU64,
}

impl<V: Clone> TokenCache<V> {
    /// A cache of at most `capacity` tokens; 0 disables it.
    pub fn new(capacity: usize) -> Self {
        // Fewer shards than SHARDS for a tiny cache, so none has room for nothing.
        let n = capacity.clamp(1, SHARDS);
        let caps = (0..n)
            .map(|i| capacity / n + usize::from(i < capacity % n))
            .collect();
        Self {
            shards: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            caps,
            generation: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.caps[0] > 0
    }

    fn shard(&self, hash: &TokenHash) -> (MutexGuard<'_, Shard<V>>, usize) {
        let i = hash[0] as usize % self.shards.len();
        // A panic while holding a shard leaves a consistent map: keep using it.
        let guard = self.shards[i].lock().unwrap_or_else(|e| e.into_inner());
        (guard, self.caps[i])
    }

    /// The claims of a token verified before, while still valid at `now`.
    pub fn get(&self, hash: &TokenHash, now: u64) -> Option<V> {
        if !self.enabled() {
            return None;
        }
        let (mut shard, _) = self.shard(hash);
        match shard.get(hash) {
            Some(e) if now < e.until => Some(e.value.clone()),
            Some(_) => {
                shard.remove(hash);
                None
            }
            None => None,
        }
    }

    /// Read before fetching the key a token is verified with; handed back to
    /// [`TokenCache::insert`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Remembers a verified token until `until`, unless a key was dropped
    /// since `generation` was read (the key may be the one just dropped).
    pub fn insert(
        &self,
        hash: TokenHash,
        value: V,
        until: u64,
        kid: Option<String>,
        generation: u64,
        now: u64,
    ) {
        let (mut shard, cap) = self.shard(&hash);
        // Read under the shard lock: `drop_kids` bumps first, then sweeps
        // every shard under its lock, so an entry either sees the bump or is swept.
        if cap == 0 || self.generation.load(Ordering::SeqCst) != generation || until <= now {
            return;
        }
        if shard.len() >= cap && !shard.contains_key(&hash) {
            evict(&mut shard, cap, now);
        }
        shard.insert(hash, Entry { value, until, kid });
    }

    /// Forgets every token verified by one of `kids` (keys a JWKS refresh
    /// dropped or replaced).
    pub fn drop_kids(&self, kids: &[String]) {
        if kids.is_empty() {
            return;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, e| !e.kid.as_ref().is_some_and(|k| kids.contains(k)));
        }
    }

    /// Entries held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Makes room in a full shard: expired entries go first; if none had expired,
/// an arbitrary eighth goes, so the next inserts do not sweep again.
fn evict<V>(shard: &mut Shard<V>, cap: usize, now: u64) {
    shard.retain(|_, e| now < e.until);
    if shard.len() >= cap {
        let victims: Vec<TokenHash> = shard.keys().take((cap / 8).max(1)).copied().collect();
        for k in victims {
            shard.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn hash(i: u32) -> TokenHash {
        token_hash(&format!("token-{i}"))
    }

    fn put(c: &TokenCache<u32>, i: u32, until: u64, kid: Option<&str>) {
        c.insert(
            hash(i),
            i,
            until,
            kid.map(str::to_string),
            c.generation(),
            NOW,
        );
    }

    #[test]
    fn a_token_is_cached_until_its_exp_and_never_past_it() {
        assert_eq!(
            cache_until(Some((NOW + 60) as f64), None, NOW),
            Some(NOW + 60)
        );
        assert_eq!(
            cache_until(Some(NOW as f64 + 60.9), None, NOW),
            Some(NOW + 60)
        );
        // Accepted only thanks to the leeway: verified anew each time.
        assert_eq!(cache_until(Some(NOW as f64), None, NOW), None);
        assert_eq!(cache_until(Some((NOW - 30) as f64), None, NOW), None);
        assert_eq!(cache_until(None, None, NOW), None);
        assert_eq!(cache_until(Some(f64::NAN), None, NOW), None);
        let c = TokenCache::new(10);
        put(&c, 1, NOW + 60, None);
        assert_eq!(c.get(&hash(1), NOW), Some(1));
        assert_eq!(c.get(&hash(1), NOW + 59), Some(1));
        assert_eq!(c.get(&hash(1), NOW + 60), None, "not at exp");
        assert_eq!(c.get(&hash(1), NOW), None, "and the entry is gone");
        assert_eq!(c.get(&hash(2), NOW), None, "never inserted");
    }

    #[test]
    fn a_token_before_its_nbf_is_not_cached() {
        let exp = Some((NOW + 600) as f64);
        assert_eq!(
            cache_until(exp, Some((NOW + 1) as f64), NOW),
            None,
            "nbf ahead"
        );
        assert_eq!(cache_until(exp, Some(NOW as f64), NOW), Some(NOW + 600));
        assert_eq!(cache_until(exp, Some(f64::INFINITY), NOW), None);
        // An entry already past its `until` is not even inserted.
        let c = TokenCache::new(10);
        put(&c, 1, NOW, None);
        assert!(c.is_empty());
    }

    #[test]
    fn the_cache_never_holds_more_than_its_size() {
        for size in [1, 7, 16, 100] {
            let c = TokenCache::new(size);
            for i in 0..(size as u32 * 5) {
                put(&c, i, NOW + 60, None);
                assert!(c.len() <= size, "size {size}: {} entries", c.len());
            }
            // The latest insert is always kept.
            assert_eq!(
                c.get(&hash(size as u32 * 5 - 1), NOW),
                Some(size as u32 * 5 - 1)
            );
        }
    }

    #[test]
    fn a_full_shard_drops_its_expired_entries_first() {
        // Two entries per shard: a new token in a full shard replaces the expired one.
        let c = TokenCache::new(SHARDS * 2);
        let mut by_shard: HashMap<u8, Vec<u32>> = HashMap::new();
        for i in 0..10_000 {
            by_shard
                .entry(hash(i)[0] % SHARDS as u8)
                .or_default()
                .push(i);
        }
        let ids = &by_shard[&0][..3];
        put(&c, ids[0], NOW + 1, None);
        put(&c, ids[1], NOW + 600, None);
        // At NOW + 1 the first has expired; inserting a third sweeps it, not the live one.
        c.insert(
            hash(ids[2]),
            ids[2],
            NOW + 600,
            None,
            c.generation(),
            NOW + 1,
        );
        assert_eq!(c.get(&hash(ids[1]), NOW + 1), Some(ids[1]));
        assert_eq!(c.get(&hash(ids[2]), NOW + 1), Some(ids[2]));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn size_zero_disables_the_cache() {
        let c = TokenCache::new(0);
        assert!(!c.enabled());
        put(&c, 1, NOW + 60, None);
        assert_eq!(c.get(&hash(1), NOW), None);
        assert!(c.is_empty());
    }

    #[test]
    fn a_dropped_kid_takes_its_tokens_with_it_and_no_other() {
        let c = TokenCache::new(100);
        put(&c, 1, NOW + 60, Some("rsa-a"));
        put(&c, 2, NOW + 60, Some("rsa-b"));
        put(&c, 3, NOW + 60, None);
        c.drop_kids(&[]);
        assert_eq!(c.len(), 3, "no kid dropped: nothing forgotten");
        c.drop_kids(&["rsa-a".to_string()]);
        assert_eq!(c.get(&hash(1), NOW), None);
        assert_eq!(c.get(&hash(2), NOW), Some(2));
        assert_eq!(
            c.get(&hash(3), NOW),
            Some(3),
            "HS256 tokens have no kid to lose"
        );
    }

    #[test]
    fn a_token_verified_with_a_key_dropped_meanwhile_is_not_cached() {
        let c = TokenCache::new(100);
        // The verifying request read the generation (and its key) ...
        let before = c.generation();
        // ... then a refresh dropped that key ...
        c.drop_kids(&["rsa-a".to_string()]);
        // ... so its late insert is refused.
        c.insert(hash(1), 1, NOW + 60, Some("rsa-a".into()), before, NOW);
        assert_eq!(c.get(&hash(1), NOW), None);
        put(&c, 2, NOW + 60, Some("rsa-b"));
        assert_eq!(c.get(&hash(2), NOW), Some(2), "a fresh generation inserts");
    }
}
