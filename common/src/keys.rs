//! Redis key names. Every key of one user carries the hash tag `{USER_ID}` so
//! each script touches one cluster slot (SPEC §7b); a few global keys don't.

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
        self.user(user_id, &format!("hold_end:{hold_id}"))
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

    /// The client's own session token (SPEC §5.10) → session id.
    pub fn session_token(&self, user_id: &str, token: &str) -> String {
        self.user(user_id, &format!("stoken:{token}"))
    }

    /// Cached analytics answer for N days.
    pub fn analytics(&self, user_id: &str, days: u32) -> String {
        self.user(user_id, &format!("analytics:{days}"))
    }

    /// Cached profile answer.
    pub fn profile(&self, user_id: &str) -> String {
        self.user(user_id, "profile")
    }

    /// Set of the user's cached analytics keys, so a worker can drop them all.
    pub fn analytics_index(&self, user_id: &str) -> String {
        self.user(user_id, "analytics_keys")
    }

    /// Failed authentications per client address (not a user key).
    pub fn auth_failures(&self, addr: &str) -> String {
        format!("{}:authfail:{{{addr}}}", self.prefix)
    }

    /// Written only at start-up; its absence means Redis lost its data.
    pub fn sentinel(&self) -> String {
        format!("{}:sentinel", self.prefix)
    }

    /// State of a recovery after a data loss (see docs/credits.md).
    pub fn recovery(&self) -> String {
        format!("{}:recovery", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_carry_the_user_as_hash_tag() {
        let k = Keys::new("vsc");
        assert_eq!(k.credits("user_1"), "vsc:{user_1}:credits");
        assert_eq!(k.rate_limit("u", "usage"), "vsc:{u}:rl:usage");
        assert_eq!(
            k.idempotency("u", "consume", "abc"),
            "vsc:{u}:idem:consume:abc"
        );
    }
}
