//! The credit scripts and the shapes they store and answer, shared by
//! gateways (decisions) and workers (settlement follow-ups, hold expiry,
//! reconciler, recovery heartbeats). The Lua lives in `lua/*.lua`, each file
//! opening with its KEYS, ARGV and replies; the decisions inside it have plain
//! Rust twins in [`crate::credits`].
//!
//! Per user, all under the hash tag `{USER_ID}` (one cluster slot):
//!
//! ```text
//! credits   hash  bal (spendable now), held (open holds), ver (bumped by every
//!                 change of bal/held/pending), as_of (newest settled event)
//! pending   hash  transaction id → "amount:reserved_at_ms", reserved by a
//!                 gateway and not yet settled into the ledger by a worker
//! holds     hash  hold id → {"amount":N,"expires_at_ms":T}
//! hold_end:ID     the remembered end of a hold (settled answer / released /
//!                 expired), kept `credits.idempotency_ttl_secs`
//! idem:ROUTE:KEY  hash h (body hash), st (run|done), ans (the answer when
//!                 done), tx and t (the id in use and its start when run)
//! grants_applied  set of admin grant ids already added to bal
//! ```
//!
//! Invariant, for a user whose `credits` hash holds `bal`:
//! `bal = users.credits_balance − Σ pending (not yet in the ledger) − held`.
//!
//! Every script starts from the same prelude (`lua/prelude.lua`): KEYS[1] is the
//! data-loss sentinel of the user's slot, KEYS[2..4] the credits, pending and
//! holds hashes; ARGV[1] is the `hold_end:` prefix and ARGV[2] how long an
//! ended hold is remembered (ms). A missing sentinel means Redis lost its data:
//! the script answers `LOST` and changes nothing. Scripts compute in doubles,
//! which is exact because every amount and balance stays below 2^53; numbers
//! are formatted with `%d` before Redis or the caller sees them (Lua's own
//! `tostring` would round past 14 digits).
//!
//! Every reply is a flat array of strings: `[TAG, N, (hold id, amount) × N,
//! fields...]`, where the N pairs are holds that this call found past their
//! expiry and released (the gateway publishes their `HoldReleased`);
//! [`Reply::parse`] splits it and [`Reply::kind`] names the tag as a [`Tag`].

use std::sync::OnceLock;

/// A credit script's text: the shared prelude and decision snippets, then the
/// body. Whitespace between the parts is insignificant to Lua.
macro_rules! with_prelude {
    ($body:literal) => {
        concat!(
            include_str!("lua/prelude.lua"),
            include_str!("lua/rate_limit.lua"),
            include_str!("lua/idem_check.lua"),
            include_str!("lua/hold_limit.lua"),
            include_str!("lua/idem_steps.lua"),
            include_str!("lua/member.lua"),
            include_str!(concat!("lua/", $body)),
        )
    };
}

/// `idem_check` on its own (it reads `now`, which the prelude defines).
const IDEM_CHECK: &str = include_str!("lua/idem_check.lua");
/// `hold_limit` on its own.
const HOLD_LIMIT: &str = include_str!("lua/hold_limit.lua");

/// The scripts, compiled once. `redis::Script` sends EVALSHA and loads the
/// script on NOSCRIPT by itself (e.g. after a Redis restart). Each field names
/// its file in `lua/`, whose opening comment lists KEYS, ARGV and replies.
pub struct Scripts {
    /// `consume.lua`: reserve credits for one consume (keyed or not).
    /// LOST | CONFLICT | BUSY | REPLAY | STALE | UNPENDING | MISSING | INSUFFICIENT | OK.
    pub consume: ::redis::Script,
    /// `consume_undo.lua`: after a failed publish of a consume. LOST | OK.
    pub consume_undo: ::redis::Script,
    /// `idem_finish.lua` (no prelude): store a request's final answer; 1 or 0.
    pub idem_finish: ::redis::Script,
    /// `idem_finish_many.lua` (no prelude): `idem_finish` for many records in
    /// one call (the gateway's finish batcher); how many were stored.
    pub idem_finish_many: ::redis::Script,
    /// `idem_restore.lua`: durable idempotency records back into Redis while
    /// the user is loaded. LOST | EXISTS | OK.
    pub idem_restore: ::redis::Script,
    /// `hold_open.lua`: open a hold. LOST | CONFLICT | BUSY | REPLAY | STALE |
    /// MISSING | ENDED | TOO_MANY | INSUFFICIENT | OK.
    pub hold_open: ::redis::Script,
    /// `hold_undo.lua`: after a failed publish of a hold open. LOST | OK.
    pub hold_undo: ::redis::Script,
    /// `hold_settle.lua`: settle a hold. LOST | ENDED | MISSING | GONE | TOO_MUCH | OK.
    pub hold_settle: ::redis::Script,
    /// `hold_unsettle.lua`: undo a settle whose event never left. LOST | OK.
    pub hold_unsettle: ::redis::Script,
    /// `hold_release.lua`: release a hold whole. LOST | ENDED | MISSING | GONE | OK.
    pub hold_release: ::redis::Script,
    /// `hold_unrelease.lua`: undo a release whose event never left. LOST | OK.
    pub hold_unrelease: ::redis::Script,
    /// `read.lua`: the balance, after expiring due holds. LOST | MISSING | OK.
    pub read: ::redis::Script,
    /// `init.lua`: load a user from Postgres. LOST | EXISTS | OK.
    pub init: ::redis::Script,
    /// `org_init.lua`: load an organization's account and member hash from Postgres.
    /// LOST | EXISTS | OK.
    pub org_init: ::redis::Script,
    /// `member_set.lua`: a committed membership change on the organization's
    /// account. LOST | MISSING | OK.
    pub member_set: ::redis::Script,
    /// `user_org.lua`: a committed membership change on the user's account.
    /// LOST | MISSING | OK.
    pub user_org: ::redis::Script,
    /// `idem_adopt.lua`: a user's durable idempotency records onto the account
    /// they spend from after a membership change. LOST | OK.
    pub idem_adopt: ::redis::Script,
    /// `grant_apply.lua`: add a committed admin grant once. LOST | MISSING | OK.
    pub grant_apply: ::redis::Script,
    /// `snapshot.lua`: the reconciler's view. LOST | MISSING | OK.
    pub snapshot: ::redis::Script,
    /// `drop_settled.lua`: forget pending entries already in the ledger. LOST | OK.
    pub drop_settled: ::redis::Script,
    /// `release_stale.lua`: give back reservations whose event never left. LOST | OK.
    pub release_stale: ::redis::Script,
    /// `repair.lua`: set bal to the ledger's figure if nothing moved.
    /// LOST | CHANGED | SAME | REPAIRED.
    pub repair: ::redis::Script,
    /// `expire_hold.lua`: the worker's expiry of one hold.
    /// LOST | MISSING | ABSENT | NOT_DUE | RELEASED.
    pub expire_hold: ::redis::Script,
    /// `heartbeat.lua` (no prelude): a credits-queue consumer's heartbeat.
    pub heartbeat: ::redis::Script,
    /// `recovery_enter.lua` (no prelude): start a recovery once.
    pub recovery_enter: ::redis::Script,
    /// `recovery_claim.lua` (no prelude): claim a recovery's completion.
    pub recovery_claim: ::redis::Script,
}

pub fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        use ::redis::Script;
        Scripts {
            consume: Script::new(with_prelude!("consume.lua")),
            consume_undo: Script::new(with_prelude!("consume_undo.lua")),
            idem_finish: Script::new(include_str!("lua/idem_finish.lua")),
            idem_finish_many: Script::new(include_str!("lua/idem_finish_many.lua")),
            idem_restore: Script::new(with_prelude!("idem_restore.lua")),
            hold_open: Script::new(with_prelude!("hold_open.lua")),
            hold_undo: Script::new(with_prelude!("hold_undo.lua")),
            hold_settle: Script::new(with_prelude!("hold_settle.lua")),
            hold_unsettle: Script::new(with_prelude!("hold_unsettle.lua")),
            hold_release: Script::new(with_prelude!("hold_release.lua")),
            hold_unrelease: Script::new(with_prelude!("hold_unrelease.lua")),
            read: Script::new(with_prelude!("read.lua")),
            init: Script::new(with_prelude!("init.lua")),
            org_init: Script::new(with_prelude!("org_init.lua")),
            member_set: Script::new(with_prelude!("member_set.lua")),
            user_org: Script::new(with_prelude!("user_org.lua")),
            idem_adopt: Script::new(with_prelude!("idem_adopt.lua")),
            grant_apply: Script::new(with_prelude!("grant_apply.lua")),
            snapshot: Script::new(with_prelude!("snapshot.lua")),
            drop_settled: Script::new(with_prelude!("drop_settled.lua")),
            release_stale: Script::new(with_prelude!("release_stale.lua")),
            repair: Script::new(with_prelude!("repair.lua")),
            expire_hold: Script::new(with_prelude!("expire_hold.lua")),
            heartbeat: Script::new(include_str!("lua/heartbeat.lua")),
            recovery_enter: Script::new(include_str!("lua/recovery_enter.lua")),
            recovery_claim: Script::new(include_str!("lua/recovery_claim.lua")),
        }
    })
}

/// The key names one user's credit scripts take, in prelude order.
#[derive(Debug, Clone)]
pub struct UserKeys {
    pub sentinel: String,
    pub credits: String,
    pub pending: String,
    pub holds: String,
    pub hold_end_prefix: String,
}

impl UserKeys {
    pub fn new(keys: &crate::redis::keys::Keys, user_id: &str) -> Self {
        Self {
            sentinel: keys.slot_sentinel(user_id),
            credits: keys.credits(user_id),
            pending: keys.pending(user_id),
            holds: keys.holds(user_id),
            hold_end_prefix: keys.hold_end_prefix(user_id),
        }
    }

    /// An invocation of a prelude script with KEYS[1..4] and ARGV[1..2] set;
    /// the caller adds KEYS[5] and ARGV[3..].
    pub fn invoke<'a>(
        &self,
        script: &'a ::redis::Script,
        end_ttl_ms: u64,
    ) -> ::redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(&self.sentinel)
            .key(&self.credits)
            .key(&self.pending)
            .key(&self.holds)
            .arg(&self.hold_end_prefix)
            .arg(end_ttl_ms);
        inv
    }
}

/// A hold that a script found past its expiry and released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredHold {
    pub hold_id: String,
    pub amount: i64,
}

/// The rate-limit decision a credit script made as its first step
/// (`lua/rate_limit.lua`): the reply of `GCRA_LUA` in the gateway's
/// `rate_limit.rs`, which turns it into its `Decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitReply {
    pub allowed: bool,
    pub remaining: i64,
    pub reset_us: i64,
    pub retry_us: i64,
}

impl RateLimitReply {
    /// The four numbers as `GCRA_LUA` answers them: allowed (1|0), remaining, reset_us, retry_us.
    pub fn as_gcra(&self) -> [i64; 4] {
        [
            i64::from(self.allowed),
            self.remaining,
            self.reset_us,
            self.retry_us,
        ]
    }
}

/// A script's reply: its tag, the holds it expired, and its own fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub tag: String,
    pub expired: Vec<ExpiredHold>,
    pub fields: Vec<String>,
    /// Present when the script decided the request's rate limit (its reply
    /// opened with `RL`, allowed, remaining, reset_us, retry_us).
    pub rate_limit: Option<RateLimitReply>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed credit script reply: {0}")]
pub struct ReplyError(pub String);

impl Reply {
    pub fn parse(raw: Vec<String>) -> Result<Self, ReplyError> {
        let mut it = raw.into_iter().peekable();
        let rate_limit = if it.peek().map(String::as_str) == Some("RL") {
            it.next();
            let mut num = || -> Result<i64, ReplyError> {
                let v = it.next().ok_or_else(|| ReplyError("RL: short".into()))?;
                v.parse()
                    .map_err(|_| ReplyError(format!("RL: not an integer: {v:?}")))
            };
            Some(RateLimitReply {
                allowed: num()? == 1,
                remaining: num()?,
                reset_us: num()?,
                retry_us: num()?,
            })
        } else {
            None
        };
        let tag = it.next().ok_or_else(|| ReplyError("empty".into()))?;
        let n: usize = it
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ReplyError(format!("{tag}: no expired count")))?;
        let mut expired = Vec::with_capacity(n);
        for _ in 0..n {
            let (Some(hold_id), Some(amount)) = (it.next(), it.next()) else {
                return Err(ReplyError(format!("{tag}: short expired list")));
            };
            let amount = amount
                .parse()
                .map_err(|_| ReplyError(format!("{tag}: expired amount {amount:?}")))?;
            expired.push(ExpiredHold { hold_id, amount });
        }
        Ok(Self {
            tag,
            expired,
            fields: it.collect(),
            rate_limit,
        })
    }

    /// The tag, parsed (a tag no script writes is [`Tag::Unknown`]).
    pub fn kind(&self) -> Tag {
        Tag::parse(&self.tag)
    }

    /// Field `i` as a string.
    pub fn str(&self, i: usize) -> Result<&str, ReplyError> {
        self.fields
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| ReplyError(format!("{}: no field {i}", self.tag)))
    }

    /// Field `i` as an integer.
    pub fn int(&self, i: usize) -> Result<i64, ReplyError> {
        let s = self.str(i)?;
        s.parse()
            .map_err(|_| ReplyError(format!("{}: field {i} is not an integer: {s:?}", self.tag)))
    }

    /// Field `i` as a flag ("1" / "0").
    pub fn flag(&self, i: usize) -> Result<bool, ReplyError> {
        Ok(self.int(i)? == 1)
    }
}

/// The JSON a hold is stored as in the `holds` hash (the scripts build the
/// same shape with `string.format`).
pub fn hold_json(amount: i64, expires_at_ms: i64) -> String {
    format!(r#"{{"amount":{amount},"expires_at_ms":{expires_at_ms}}}"#)
}

/// A pending value "amount:reserved_at_ms", or "amount:USER:reserved_at_ms" for an organization
/// member's reservation (`lua/member.lua`): the amount and the time.
pub fn parse_pending(value: &str) -> Option<(i64, i64)> {
    let (a, rest) = value.split_once(':')?;
    let t = rest.rsplit(':').next()?;
    Some((a.parse().ok()?, t.parse().ok()?))
}

/// A hold's JSON on an organization's account: the member's id in `m` (`lua/member.lua`).
pub fn member_hold_json(amount: i64, expires_at_ms: i64, member: &str) -> String {
    format!(r#"{{"amount":{amount},"expires_at_ms":{expires_at_ms},"m":"{member}"}}"#)
}

/// A script's reply tag, parsed once (the tags each script answers are listed
/// on its [`Scripts`] field and in its `lua/` file).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Tag {
    /// The slot's data-loss sentinel is gone: Redis lost its data.
    Lost,
    /// The user's `credits` hash is absent: load them from Postgres first.
    Missing,
    Ok,
    /// Another body under this idempotency key.
    Conflict,
    /// The first request under this key may still be running.
    Busy,
    /// The first request's answer is remembered (field 0).
    Replay,
    /// The first request never finished (field 0: its recorded id).
    Stale,
    /// A recorded id is no longer pending (field 0: the id).
    Unpending,
    /// The balance cannot cover it (fields: bal, held).
    Insufficient,
    /// The hold has ended (field 0, when present: its remembered end).
    Ended,
    /// The hold is not open (and no end is remembered).
    Gone,
    /// More than the hold holds (field 0: the hold's amount).
    TooMuch,
    /// The user has the most open holds allowed (field 0: the limit).
    TooMany,
    /// The user is already loaded.
    Exists,
    /// Something moved since the reconciler's snapshot.
    Changed,
    /// The balance already is the ledger's figure.
    Same,
    /// The balance was set to the ledger's figure (field 0: the old one).
    Repaired,
    /// No such hold in Redis.
    Absent,
    /// The hold is not past its expiry yet.
    NotDue,
    /// The hold (and every other due one) was released.
    Released,
    /// Refused by the rate limit the script decided first (see [`Reply::rate_limit`]).
    Limited,
    /// The user is not a member of the organization whose account the script ran on.
    NotMember,
    /// An organization member's cap cannot cover it (fields: what the member may spend, held).
    Cap,
    /// A tag this build does not know (a newer script, or a bug).
    Unknown(String),
}

impl Tag {
    /// Every known tag (not [`Tag::Unknown`]).
    pub const KNOWN: [Tag; 23] = [
        Tag::Lost,
        Tag::Missing,
        Tag::Ok,
        Tag::Conflict,
        Tag::Busy,
        Tag::Replay,
        Tag::Stale,
        Tag::Unpending,
        Tag::Insufficient,
        Tag::Ended,
        Tag::Gone,
        Tag::TooMuch,
        Tag::TooMany,
        Tag::Exists,
        Tag::Changed,
        Tag::Same,
        Tag::Repaired,
        Tag::Absent,
        Tag::NotDue,
        Tag::Released,
        Tag::Limited,
        Tag::NotMember,
        Tag::Cap,
    ];

    pub fn parse(tag: &str) -> Self {
        match tag {
            "LOST" => Self::Lost,
            "MISSING" => Self::Missing,
            "OK" => Self::Ok,
            "CONFLICT" => Self::Conflict,
            "BUSY" => Self::Busy,
            "REPLAY" => Self::Replay,
            "STALE" => Self::Stale,
            "UNPENDING" => Self::Unpending,
            "INSUFFICIENT" => Self::Insufficient,
            "ENDED" => Self::Ended,
            "GONE" => Self::Gone,
            "TOO_MUCH" => Self::TooMuch,
            "TOO_MANY" => Self::TooMany,
            "EXISTS" => Self::Exists,
            "CHANGED" => Self::Changed,
            "SAME" => Self::Same,
            "REPAIRED" => Self::Repaired,
            "ABSENT" => Self::Absent,
            "NOT_DUE" => Self::NotDue,
            "RELEASED" => Self::Released,
            "LIMITED" => Self::Limited,
            "NOT_MEMBER" => Self::NotMember,
            "CAP" => Self::Cap,
            other => Self::Unknown(other.to_string()),
        }
    }

    /// The tag as the scripts write it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Lost => "LOST",
            Self::Missing => "MISSING",
            Self::Ok => "OK",
            Self::Conflict => "CONFLICT",
            Self::Busy => "BUSY",
            Self::Replay => "REPLAY",
            Self::Stale => "STALE",
            Self::Unpending => "UNPENDING",
            Self::Insufficient => "INSUFFICIENT",
            Self::Ended => "ENDED",
            Self::Gone => "GONE",
            Self::TooMuch => "TOO_MUCH",
            Self::TooMany => "TOO_MANY",
            Self::Exists => "EXISTS",
            Self::Changed => "CHANGED",
            Self::Same => "SAME",
            Self::Repaired => "REPAIRED",
            Self::Absent => "ABSENT",
            Self::NotDue => "NOT_DUE",
            Self::Released => "RELEASED",
            Self::Limited => "LIMITED",
            Self::NotMember => "NOT_MEMBER",
            Self::Cap => "CAP",
            Self::Unknown(tag) => tag,
        }
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `idem_check` alone, for the agreement test with
/// [`crate::credits::idem_decide`]: KEYS[1]
/// the record; ARGV[1] body hash, ARGV[2] window ms, ARGV[3] now ms. Replies
/// `[decision, id or answer or '']`.
pub fn idem_check_twin() -> ::redis::Script {
    ::redis::Script::new(&format!(
        "local now = tonumber(ARGV[3])\n{IDEM_CHECK}\n\
         local d, v = idem_check(KEYS[1], ARGV[1], ARGV[2])\nreturn {{d, v or ''}}"
    ))
}

/// `hold_limit` alone, for the agreement test with
/// [`crate::credits::hold_open_decide`]:
/// ARGV open, max, bal, amount. Replies the decision.
pub fn hold_limit_twin() -> ::redis::Script {
    ::redis::Script::new(&format!(
        "{HOLD_LIMIT}\nreturn hold_limit(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))"
    ))
}

/// A consumer heartbeat "unacked:idle_since_ms:beat_ms".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub unacked: i64,
    pub idle_since_ms: i64,
    pub beat_ms: i64,
}

impl Heartbeat {
    pub fn parse(value: &str) -> Option<Self> {
        let mut it = value.split(':').map(|p| p.parse::<i64>().ok());
        let hb = Self {
            unacked: it.next()??,
            idle_since_ms: it.next()??,
            beat_ms: it.next()??,
        };
        it.next().is_none().then_some(hb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_split_into_tag_expired_holds_and_fields() {
        let raw = ["OK", "2", "h1", "5", "h2", "7", "90", "0", "1"]
            .map(String::from)
            .to_vec();
        let r = Reply::parse(raw).unwrap();
        assert_eq!(r.tag, "OK");
        assert_eq!(
            r.expired,
            vec![
                ExpiredHold {
                    hold_id: "h1".into(),
                    amount: 5
                },
                ExpiredHold {
                    hold_id: "h2".into(),
                    amount: 7
                },
            ]
        );
        assert_eq!(r.int(0).unwrap(), 90);
        assert!(r.flag(2).unwrap());
        assert!(r.int(3).is_err());
        let r = Reply::parse(vec!["LOST".into(), "0".into()]).unwrap();
        assert_eq!((r.tag.as_str(), r.fields.len()), ("LOST", 0));
        assert_eq!(r.rate_limit, None);
        let raw = ["RL", "1", "19", "3000000", "0", "OK", "0", "90"]
            .map(String::from)
            .to_vec();
        let r = Reply::parse(raw).unwrap();
        assert_eq!((r.kind(), r.int(0).unwrap()), (Tag::Ok, 90));
        assert_eq!(
            r.rate_limit.map(|l| l.as_gcra()),
            Some([1, 19, 3_000_000, 0])
        );
        let raw = ["RL", "0", "0", "60000000", "3000000", "LIMITED", "0"];
        let r = Reply::parse(raw.map(String::from).to_vec()).unwrap();
        assert_eq!(r.kind(), Tag::Limited);
        assert!(!r.rate_limit.unwrap().allowed);
        assert!(Reply::parse(["RL", "1", "2"].map(String::from).to_vec()).is_err());
    }

    #[test]
    fn broken_replies_are_errors_not_panics() {
        assert!(Reply::parse(vec![]).is_err());
        assert!(Reply::parse(vec!["OK".into()]).is_err());
        assert!(Reply::parse(vec!["OK".into(), "1".into(), "h".into()]).is_err());
        assert!(Reply::parse(vec!["OK".into(), "1".into(), "h".into(), "x".into()]).is_err());
    }

    #[test]
    fn every_known_tag_reads_back_as_itself_and_others_are_unknown() {
        for tag in Tag::KNOWN {
            assert_eq!(Tag::parse(tag.as_str()), tag);
        }
        assert_eq!(Tag::parse("TOO_MUCH"), Tag::TooMuch);
        assert_eq!(Tag::parse("NOT_DUE"), Tag::NotDue);
        assert_eq!(Tag::parse("ok"), Tag::Unknown("ok".into()));
        assert_eq!(Tag::parse("FRESH").as_str(), "FRESH");
        let r = Reply::parse(vec![
            "INSUFFICIENT".into(),
            "0".into(),
            "3".into(),
            "0".into(),
        ])
        .unwrap();
        assert_eq!(r.kind(), Tag::Insufficient);
        assert_eq!(r.tag, "INSUFFICIENT");
    }

    #[test]
    fn every_tag_a_script_replies_is_known() {
        // Each `reply('TAG'` in the Lua, so a new tag cannot land without its variant.
        let sources = [
            with_prelude!("consume.lua"),
            with_prelude!("consume_undo.lua"),
            with_prelude!("idem_restore.lua"),
            with_prelude!("hold_open.lua"),
            with_prelude!("hold_undo.lua"),
            with_prelude!("hold_settle.lua"),
            with_prelude!("hold_unsettle.lua"),
            with_prelude!("hold_release.lua"),
            with_prelude!("hold_unrelease.lua"),
            with_prelude!("read.lua"),
            with_prelude!("init.lua"),
            with_prelude!("grant_apply.lua"),
            with_prelude!("snapshot.lua"),
            with_prelude!("drop_settled.lua"),
            with_prelude!("release_stale.lua"),
            with_prelude!("repair.lua"),
            with_prelude!("expire_hold.lua"),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for src in sources {
            for part in src.split("reply('").skip(1) {
                let tag = &part[..part.find('\'').unwrap()];
                assert!(
                    !matches!(Tag::parse(tag), Tag::Unknown(_)),
                    "unknown tag {tag}"
                );
                seen.insert(tag.to_string());
            }
        }
        // `reply(d)` in idem_steps forwards CONFLICT and BUSY from idem_check.
        seen.extend(["CONFLICT".to_string(), "BUSY".to_string()]);
        let known: std::collections::BTreeSet<String> =
            Tag::KNOWN.iter().map(|t| t.as_str().to_string()).collect();
        assert_eq!(seen, known, "every variant is a tag some script replies");
    }

    #[test]
    fn largest_amounts_survive_the_text_forms() {
        let max = crate::settings::MAX_CREDITS;
        assert_eq!(
            hold_json(max, 1_700_000_000_000),
            r#"{"amount":9007199254740991,"expires_at_ms":1700000000000}"#
        );
        assert_eq!(parse_pending(&format!("{max}:17")), Some((max, 17)));
        assert_eq!(parse_pending("5"), None);
        assert_eq!(parse_pending("5:user_1:17"), Some((5, 17)));
        assert_eq!(
            Heartbeat::parse("0:100:200"),
            Some(Heartbeat {
                unacked: 0,
                idle_since_ms: 100,
                beat_ms: 200
            })
        );
        assert_eq!(Heartbeat::parse("0:100"), None);
        assert_eq!(Heartbeat::parse("0:100:2:3"), None);
    }
}
