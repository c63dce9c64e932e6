//! Redis key names. Every key of one user carries the hash tag `{USER_ID}` so
//! each script touches one cluster slot (docs/scaling.md); a few global keys don't.

/// Builds keys under one prefix (tests give each app its own prefix).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn user(&self, user_id: &str, what: &str) -> String {
        format!("{}:{{{user_id}}}:{what}", self.prefix)
    }

    /// The account id of an organization's pool: its keys are built like a
    /// user's under the hash tag `{org:ORG_ID}` (user ids never hold a `:`),
    /// so the credit scripts run on it unchanged (docs/credits.md "Organizations").
    pub fn org_account(org_id: &str) -> String {
        format!("org:{org_id}")
    }

    /// The organization of an account id built by [`Keys::org_account`].
    pub fn org_of_account(account: &str) -> Option<&str> {
        account.strip_prefix("org:")
    }

    /// Hash beside an organization's `credits`: `m:USER` cap per member, `s:USER`
    /// settled this `period` (`lua/member.lua`).
    pub fn org_members(&self, org_id: &str) -> String {
        self.user(&Self::org_account(org_id), "members")
    }

    /// Hash: plan, status, overrides (`rl:CLASS` = "limit/window"), profile cache.
    pub fn user_info(&self, user_id: &str) -> String {
        self.user(user_id, "user")
    }

    /// Hash: `bal` (spendable now), `held` (open holds), `as_of`.
    pub fn credits(&self, user_id: &str) -> String {
        self.user(user_id, "credits")
    }

    /// Hash: event id → amount reserved by a gateway, not yet settled by a worker.
    pub fn pending(&self, user_id: &str) -> String {
        self.user(user_id, "pending")
    }

    /// Hash: hold id → JSON of the open hold.
    pub fn holds(&self, user_id: &str) -> String {
        self.user(user_id, "holds")
    }

    /// Remembered answer of an ended hold (settled/released), kept 24 h.
    pub fn hold_end(&self, user_id: &str, hold_id: &str) -> String {
        format!("{}{hold_id}", self.hold_end_prefix(user_id))
    }

    /// What credit scripts append a hold id to, to name its `hold_end` key
    /// (same slot as the user's other keys).
    pub fn hold_end_prefix(&self, user_id: &str) -> String {
        self.user(user_id, "hold_end:")
    }

    /// Set of admin grant ids already added to the Redis balance, so a grant
    /// reaches Redis once even when the reconciler absorbed it first.
    pub fn grants_applied(&self, user_id: &str) -> String {
        self.user(user_id, "grants_applied")
    }

    /// The data-loss sentinel of the user's cluster slot: a key written only
    /// at start-up (or when a recovery completes) whose hash tag falls in the
    /// same slot as `{USER_ID}`, so every credit script can check it atomically
    /// and still touch a single slot (see `crate::redis::slot::slot_tag`).
    pub fn slot_sentinel(&self, user_id: &str) -> String {
        self.slot_sentinel_for(crate::redis::slot::slot_of(user_id))
    }

    /// The sentinel of one cluster slot (0..16384).
    pub fn slot_sentinel_for(&self, slot: u16) -> String {
        format!(
            "{}:sentinel:{{{}}}",
            self.prefix,
            crate::redis::slot::slot_tag(slot)
        )
    }

    /// Idempotency record for one key of one route.
    pub fn idempotency(&self, user_id: &str, route: &str, key: &str) -> String {
        self.user(user_id, &format!("idem:{route}:{key}"))
    }

    /// GCRA state (theoretical arrival time) for one class.
    pub fn rate_limit(&self, user_id: &str, class: &str) -> String {
        self.user(user_id, &format!("rl:{class}"))
    }

    /// Session record, keyed by session id.
    pub fn session(&self, user_id: &str, session_id: &str) -> String {
        self.user(user_id, &format!("session:{session_id}"))
    }

    /// The client's own session token → session id.
    pub fn session_token(&self, user_id: &str, token: &str) -> String {
        self.user(user_id, &format!("stoken:{token}"))
    }

    /// Sorted set: the user's live session ids, scored by last use (ms on
    /// Redis's clock), so validating one more than `sessions.max_per_user`
    /// evicts the least recently used in the same script.
    pub fn sessions_by_use(&self, user_id: &str) -> String {
        self.user(user_id, "sessions")
    }

    /// Hash: what the gateway knows of the user's stored preferences, as the
    /// compact-JSON size of each top-level member (`k:NAME`) and their sum
    /// (`sum`), so a patch's merged size is decided without Postgres.
    pub fn preferences_size(&self, user_id: &str) -> String {
        self.user(user_id, "prefs_size")
    }

    /// Lock held while one export of the user runs (`SET NX PX`).
    pub fn export_lock(&self, user_id: &str) -> String {
        self.user(user_id, "export_lock")
    }

    /// Cached analytics answer for N days.
    pub fn analytics(&self, user_id: &str, days: u32) -> String {
        self.user(user_id, &format!("analytics:{days}"))
    }

    /// Cached profile answer.
    pub fn profile(&self, user_id: &str) -> String {
        self.user(user_id, "profile")
    }

    /// Counter bumped by workers after every commit that touches the user; a
    /// cached analytics view remembers the value it was computed under and is
    /// served only while that is still the value.
    pub fn analytics_gen(&self, user_id: &str) -> String {
        self.user(user_id, "analytics_gen")
    }

    /// Failed authentications per client address (not a user key).
    pub fn auth_failures(&self, addr: &str) -> String {
        format!("{}:authfail:{{{addr}}}", self.prefix)
    }

    /// An API key's record, by the hex SHA-256 of the key (docs/api.md "API
    /// keys"). The hash tag is the key's bucket (`ak:` + the hash's first two
    /// hex digits), which its bucket's [`Keys::api_keys_loaded`] shares, so one
    /// `MGET` reads both atomically on one cluster slot.
    pub fn api_key(&self, hash_hex: &str) -> String {
        format!(
            "{}:{{ak:{}}}:apikey:{hash_hex}",
            self.prefix,
            bucket_of(hash_hex)
        )
    }

    /// `SET NX EX 60` marker: the key's `last_used_at` was written this minute.
    pub fn api_key_used(&self, hash_hex: &str) -> String {
        format!(
            "{}:{{ak:{}}}:apikey_used:{hash_hex}",
            self.prefix,
            bucket_of(hash_hex)
        )
    }

    /// Present while every live key record of `bucket` (two hex digits) is in
    /// Redis: a record missing beside it is an unknown key, without Postgres.
    pub fn api_keys_loaded(&self, bucket: &str) -> String {
        format!("{}:{{ak:{bucket}}}:apikeys_loaded", self.prefix)
    }

    /// Written last by a rebuild of the key records: its absence starts one.
    pub fn api_keys_loaded_all(&self) -> String {
        format!("{}:apikeys_loaded", self.prefix)
    }

    /// Written only at start-up; its absence means Redis lost its data.
    pub fn sentinel(&self) -> String {
        format!("{}:sentinel", self.prefix)
    }

    /// State of a recovery after a data loss (see docs/credits.md).
    pub fn recovery(&self) -> String {
        format!("{}:recovery", self.prefix)
    }

    /// Hash: credits-queue consumer tag → "unacked:idle_since_ms:beat_ms",
    /// the heartbeats a recovery reads to know the queue is settled.
    pub fn credit_consumers(&self) -> String {
        format!("{}:credit_consumers", self.prefix)
    }

    /// SCAN pattern matching every user's `credits` hash (the reconciler).
    pub fn credits_pattern(&self) -> String {
        format!("{}:{{*}}:credits", self.prefix)
    }

    /// The user id inside a key built by [`Keys::credits`], if it is one.
    pub fn user_of_credits_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)?
            .strip_prefix(":{")?
            .strip_suffix("}:credits")
    }
}

/// The bucket of an API key hash: its first two hex digits (256 buckets).
fn bucket_of(hash_hex: &str) -> &str {
    hash_hex.get(..2).unwrap_or("00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_key_record_shares_the_slot_of_its_buckets_marker() {
        let k = Keys::new("vsc");
        let h = "3fa0".repeat(16);
        assert_eq!(k.api_key(&h), format!("vsc:{{ak:3f}}:apikey:{h}"));
        assert!(k.api_keys_loaded("3f").starts_with("vsc:{ak:3f}:"));
        assert!(k.api_key_used(&h).starts_with("vsc:{ak:3f}:"));
    }

    #[test]
    fn user_keys_carry_the_user_as_hash_tag() {
        let k = Keys::new("vsc");
        assert_eq!(k.credits("user_1"), "vsc:{user_1}:credits");
        assert_eq!(k.rate_limit("u", "usage"), "vsc:{u}:rl:usage");
        assert_eq!(
            k.idempotency("u", "consume", "abc"),
            "vsc:{u}:idem:consume:abc"
        );
        assert_eq!(k.hold_end("u", "h1"), "vsc:{u}:hold_end:h1");
        assert_eq!(k.user_of_credits_key(&k.credits("user_1")), Some("user_1"));
        assert_eq!(k.user_of_credits_key("vsc:{u}:pending"), None);
        let org = Keys::org_account("acme");
        assert_eq!(k.credits(&org), "vsc:{org:acme}:credits");
        assert_eq!(k.org_members("acme"), "vsc:{org:acme}:members");
        assert_eq!(
            Keys::org_of_account(k.user_of_credits_key(&k.credits(&org)).unwrap()),
            Some("acme")
        );
    }

    #[test]
    fn a_slot_sentinel_shares_the_slot_of_its_user() {
        let k = Keys::new("vsc");
        for user in ["user_1", "user_2abc", "x", "user_2NzvQ3x"] {
            let key = k.slot_sentinel(user);
            let tag = key.split('{').nth(1).unwrap().trim_end_matches('}');
            assert_eq!(
                crate::redis::slot::slot_of(tag),
                crate::redis::slot::slot_of(user)
            );
        }
    }
}
