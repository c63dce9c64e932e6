//! The credit state in Redis, shared by gateways (decisions) and workers
//! (settlement follow-ups, hold expiry, reconciler, recovery heartbeats).
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
//! Every script starts from the same prelude (`PRELUDE`): KEYS[1] is the
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
//! expiry and released (the gateway publishes their `HoldReleased`).

use std::sync::OnceLock;

/// Number of Redis Cluster hash slots.
pub const SLOTS: u16 = 16384;

/// CRC16/XMODEM, the hash Redis Cluster places keys with (table-driven: the
/// slot-tag table below hashes some 170 000 candidates at start-up).
pub fn crc16(bytes: &[u8]) -> u16 {
    const TABLE: [u16; 256] = {
        let mut t = [0u16; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = (i as u16) << 8;
            let mut b = 0;
            while b < 8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
                b += 1;
            }
            t[i] = crc;
            i += 1;
        }
        t
    };
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

/// The cluster slot of a hash tag (e.g. a user id).
pub fn slot_of(tag: &str) -> u16 {
    crc16(tag.as_bytes()) % SLOTS
}

/// A short hash tag that lands in `slot`: the slot sentinels are named with
/// these, so a user's scripts can read their slot's sentinel atomically.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; SLOTS as usize];
        let mut missing = SLOTS as usize;
        let mut n: u32 = 0;
        let mut buf = [0u8; 9];
        // About 170 000 tries cover all 16384 slots (coupon collector). The
        // candidate "s" + hex(n) is built in place: no allocation per try.
        while missing > 0 {
            buf[0] = b's';
            let mut len = 1;
            for shift in (0..8).rev() {
                let d = ((n >> (shift * 4)) & 0xf) as u8;
                if d != 0 || len > 1 || shift == 0 {
                    buf[len] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
                    len += 1;
                }
            }
            let slot = &mut tags[usize::from(crc16(&buf[..len]) % SLOTS)];
            if slot.is_none() {
                *slot = Some(String::from_utf8_lossy(&buf[..len]).into_owned());
                missing -= 1;
            }
            n += 1;
        }
        tags.into_iter()
            .map(|t| t.expect("every slot found"))
            .collect()
    });
    &tags[usize::from(slot % SLOTS)]
}

/// Loaded by every credit script; see the module docs for the conventions.
const PRELUDE: &str = r#"
local SENT, CRED, PEND, HOLDS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local END_PREFIX, END_TTL = ARGV[1], ARGV[2]
local function s(x) return string.format('%d', x) end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local bal, held = 0, 0
local expired = {}
local function reply(tag, ...)
  local r = {tag, s(#expired / 2)}
  for i = 1, #expired do r[#r + 1] = expired[i] end
  for i = 1, select('#', ...) do r[#r + 1] = tostring((select(i, ...))) end
  return r
end
local function lost() return redis.call('EXISTS', SENT) == 0 end
local function load()
  local v = redis.call('HMGET', CRED, 'bal', 'held')
  if not v[1] then return false end
  bal = tonumber(v[1])
  held = tonumber(v[2] or '0')
  return true
end
local function save()
  redis.call('HSET', CRED, 'bal', s(bal), 'held', s(held))
  redis.call('HINCRBY', CRED, 'ver', 1)
end
local function pending_amount(v) return tonumber(string.match(v, '^(%d+)')) end
-- Holds past their expiry release themselves here, once: whoever removes a
-- hold from the hash is the one that gives its amount back.
local function expire_due()
  if redis.call('HLEN', HOLDS) == 0 then return end
  local all = redis.call('HGETALL', HOLDS)
  local n = 0
  for i = 1, #all, 2 do
    local h = cjson.decode(all[i + 1])
    if h.expires_at_ms <= now then
      redis.call('HDEL', HOLDS, all[i])
      held = held - h.amount
      bal = bal + h.amount
      redis.call('SET', END_PREFIX .. all[i], '{"state":"expired"}', 'PX', END_TTL)
      expired[#expired + 1] = all[i]
      expired[#expired + 1] = s(h.amount)
      n = n + 1
    end
  end
  if n > 0 then save() end
end
"#;

/// The idempotency decision, the Lua twin of [`idem_decide`] (an agreement
/// test runs both): FRESH | CONFLICT | REPLAY ans | BUSY | STALE id. Needs
/// `now` (ms); a record is a hash `h`, `st` (run|done), `ans` (when done),
/// `tx` and `t` (the id in use and its start, when run).
const IDEM_CHECK: &str = r#"
local function idem_check(key, hash, window)
  local rec = redis.call('HMGET', key, 'h', 'st', 'ans', 'tx', 't')
  if not rec[1] then return 'FRESH' end
  if rec[1] ~= hash then return 'CONFLICT' end
  if rec[2] == 'done' then return 'REPLAY', rec[3] end
  local t = tonumber(rec[5] or '')
  if (not t) or (not rec[4]) or now - t < tonumber(window) then return 'BUSY' end
  return 'STALE', rec[4]
end
"#;

/// Whether one more hold may open, the Lua twin of [`hold_open_decide`]:
/// TOO_MANY | INSUFFICIENT | OPEN.
const HOLD_LIMIT: &str = r#"
local function hold_limit(open, max, bal, amount)
  if open >= max then return 'TOO_MANY' end
  if bal < amount then return 'INSUFFICIENT' end
  return 'OPEN'
end
"#;

/// The keyed-request steps every keyed script shares (after `IDEM_CHECK`).
const IDEM_STEPS: &str = r#"
-- Returns (early reply or nil, the id to use, whether it is a recorded one).
-- A STALE record (its request started longer ago than the in-progress
-- window and never finished) is answered STALE unless `may_reuse` is '1':
-- the gateway first looks for the durable record in Postgres.
local function idem_begin(key, hash, window, id, may_reuse)
  if hash == '' then return nil, id, false end
  local d, v = idem_check(key, hash, window)
  if d == 'CONFLICT' or d == 'BUSY' then return reply(d), id, false end
  if d == 'REPLAY' then return reply('REPLAY', v), id, false end
  if d == 'STALE' then
    if may_reuse ~= '1' and may_reuse ~= '2' then return reply('STALE', v), id, false end
    return nil, v, true
  end
  return nil, id, false
end
-- In progress: the id in use and the start, kept as long as the answer
-- would be, so a retry never gets a new id while the first may still land.
local function idem_run(key, hash, id, ttl)
  redis.call('DEL', key)
  redis.call('HSET', key, 'h', hash, 'st', 'run', 'tx', id, 't', s(now))
  redis.call('PEXPIRE', key, ttl)
end
local function idem_done(key, hash, ans, ttl)
  redis.call('DEL', key)
  redis.call('HSET', key, 'h', hash, 'st', 'done', 'ans', ans)
  redis.call('PEXPIRE', key, ttl)
end
-- After a failed publish: `forget` '1' (the id surely never reached the
-- broker and was fresh) deletes the record; otherwise it stays with its id,
-- marked stale so the next retry reuses the id at once.
local function idem_undo(key, hash, id, forget)
  local rec = redis.call('HMGET', key, 'h', 'st', 'tx')
  if rec[1] ~= hash or rec[2] ~= 'run' or rec[3] ~= id then return end
  if forget == '1' then redis.call('DEL', key) else redis.call('HSET', key, 't', '0') end
end
"#;

/// Consume: KEYS[5] idempotency record; ARGV[3] body hash ('' without a key),
/// ARGV[4] a fresh transaction id, ARGV[5] amount, ARGV[6] in-progress window
/// ms, ARGV[7] answer TTL ms, ARGV[8] TTL of a remembered 402 ms, ARGV[9] '1'
/// to reuse the id of a stale record while it is still pending ('2': and
/// reserve it again when it is not).
/// Replies LOST | CONFLICT | BUSY | REPLAY answer | STALE id | UNPENDING id |
/// MISSING | INSUFFICIENT bal held | OK bal held created(1|0) tx reused(1|0).
/// `created` 0: this transaction id is already reserved (a retry), nothing
/// moved; `tx` is the id used (the recorded one when `reused`).
const CONSUME: &str = r#"
if lost() then return reply('LOST') end
local IDEM, HASH = KEYS[5], ARGV[3]
local early, tx, reused = idem_begin(IDEM, HASH, ARGV[6], ARGV[4], ARGV[9])
if early then return early end
if not load() then return reply('MISSING') end
expire_due()
local amount = tonumber(ARGV[5])
local flag = reused and '1' or '0'
if redis.call('HEXISTS', PEND, tx) == 1 then
  if HASH ~= '' then idem_run(IDEM, HASH, tx, ARGV[7]) end
  return reply('OK', s(bal), s(held), '0', tx, flag)
end
-- A recorded id no longer pending was either settled (the worker removes it
-- only after its commit) or given back (its event is gone): the gateway
-- tells which from Postgres before it may reserve again ('2').
if reused and ARGV[9] ~= '2' then return reply('UNPENDING', tx) end
if bal < amount then
  if HASH ~= '' then
    idem_done(IDEM, HASH, string.format('{"status":402,"balance":%d,"required":%d}', bal, amount), ARGV[8])
  end
  return reply('INSUFFICIENT', s(bal), s(held))
end
bal = bal - amount
redis.call('HSET', PEND, tx, s(amount) .. ':' .. s(now))
save()
if HASH ~= '' then idem_run(IDEM, HASH, tx, ARGV[7]) end
return reply('OK', s(bal), s(held), '1', tx, flag)
"#;

/// After a failed publish of a consume: KEYS[5] idempotency record; ARGV[3]
/// body hash, ARGV[4] transaction id, ARGV[5] '1' to give the reservation
/// back (only if still pending: the event surely never reached the broker),
/// ARGV[6] '1' to delete the record (see `idem_undo`). Replies LOST | OK bal held.
const CONSUME_UNDO: &str = r#"
if lost() then return reply('LOST') end
if ARGV[3] ~= '' then idem_undo(KEYS[5], ARGV[3], ARGV[4], ARGV[6]) end
if ARGV[5] == '1' and load() then
  local p = redis.call('HGET', PEND, ARGV[4])
  if p then
    bal = bal + pending_amount(p)
    redis.call('HDEL', PEND, ARGV[4])
    save()
  end
end
return reply('OK', s(bal), s(held))
"#;

/// Stores the final answer of a request under its idempotency key (no
/// prelude): KEYS[1] record; ARGV[1] body hash, ARGV[2] answer, ARGV[3] TTL
/// ms, ARGV[4] the id the answer is for. Only over the request's own
/// in-progress record (or none).
const IDEM_FINISH: &str = r#"
local rec = redis.call('HMGET', KEYS[1], 'h', 'st', 'tx')
if (not rec[1]) or (rec[1] == ARGV[1] and rec[2] == 'run' and rec[3] == ARGV[4]) then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'h', ARGV[1], 'st', 'done', 'ans', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"#;

/// Restores durable idempotency records (Postgres) as `done`, while the user
/// is being loaded (only if `bal` is still absent, so no record of a request
/// answered since is overwritten): KEYS[5..] record keys; ARGV[3..] per key
/// body hash, answer, expiry (epoch ms). Replies LOST | EXISTS | OK restored.
const IDEM_RESTORE: &str = r#"
if lost() then return reply('LOST') end
if redis.call('HEXISTS', CRED, 'bal') == 1 then return reply('EXISTS') end
local n = 0
for i = 5, #KEYS do
  local j = 3 + (i - 5) * 3
  if redis.call('EXISTS', KEYS[i]) == 0 and tonumber(ARGV[j + 2]) > now then
    redis.call('HSET', KEYS[i], 'h', ARGV[j], 'st', 'done', 'ans', ARGV[j + 1])
    redis.call('PEXPIREAT', KEYS[i], ARGV[j + 2])
    n = n + 1
  end
end
return reply('OK', s(n))
"#;

/// Opens a hold: KEYS[5] idempotency record; ARGV[3] body hash, ARGV[4] a
/// fresh hold id, ARGV[5] amount, ARGV[6] lifetime ms, ARGV[7] in-progress
/// window ms, ARGV[8] answer TTL ms, ARGV[9] 402 TTL ms, ARGV[10] '1' to
/// reuse the id of a stale record, ARGV[11] most open holds per user.
/// Replies LOST | CONFLICT | BUSY | REPLAY answer | STALE id | MISSING |
/// ENDED | TOO_MANY max | INSUFFICIENT bal held |
/// OK bal held expires_at_ms created(1|0) hold_id reused(1|0).
/// Expired holds leave first, so the limit counts open ones only, and every
/// script's scan of a user's holds stays bounded by it.
const HOLD_OPEN: &str = r#"
if lost() then return reply('LOST') end
local IDEM, HASH = KEYS[5], ARGV[3]
local early, id, reused = idem_begin(IDEM, HASH, ARGV[7], ARGV[4], ARGV[10])
if early then return early end
if not load() then return reply('MISSING') end
expire_due()
local amount = tonumber(ARGV[5])
local flag = reused and '1' or '0'
local raw = redis.call('HGET', HOLDS, id)
if raw then
  if HASH ~= '' then idem_run(IDEM, HASH, id, ARGV[8]) end
  return reply('OK', s(bal), s(held), s(cjson.decode(raw).expires_at_ms), '0', id, flag)
end
if redis.call('EXISTS', END_PREFIX .. id) == 1 then return reply('ENDED') end
local d = hold_limit(redis.call('HLEN', HOLDS), tonumber(ARGV[11]), bal, amount)
if d == 'TOO_MANY' then return reply('TOO_MANY', ARGV[11]) end
if d == 'INSUFFICIENT' then
  if HASH ~= '' then
    idem_done(IDEM, HASH, string.format('{"status":402,"balance":%d,"required":%d}', bal, amount), ARGV[9])
  end
  return reply('INSUFFICIENT', s(bal), s(held))
end
local exp = now + tonumber(ARGV[6])
bal = bal - amount
held = held + amount
redis.call('HSET', HOLDS, id, string.format('{"amount":%d,"expires_at_ms":%d}', amount, exp))
save()
if HASH ~= '' then idem_run(IDEM, HASH, id, ARGV[8]) end
return reply('OK', s(bal), s(held), s(exp), '1', id, flag)
"#;

/// After a failed publish of a hold open: KEYS[5] idempotency record; ARGV[3]
/// body hash, ARGV[4] hold id, ARGV[5] '1' to remove the hold (its event
/// surely never reached the broker), ARGV[6] '1' to delete the record (see
/// `idem_undo`). Replies LOST | OK bal held.
const HOLD_UNDO: &str = r#"
if lost() then return reply('LOST') end
if ARGV[3] ~= '' then idem_undo(KEYS[5], ARGV[3], ARGV[4], ARGV[6]) end
if ARGV[5] == '1' and load() then
  local raw = redis.call('HGET', HOLDS, ARGV[4])
  if raw then
    local h = cjson.decode(raw)
    redis.call('HDEL', HOLDS, ARGV[4])
    held = held - h.amount
    bal = bal + h.amount
    save()
  end
end
return reply('OK', s(bal), s(held))
"#;

/// Settles a hold: ARGV[3] hold id, ARGV[4] transaction id, ARGV[5] amount.
/// The hold leaves, the unused rest returns to bal, the amount becomes a
/// pending reservation, and the answer is remembered in `hold_end:ID`.
/// Replies LOST | ENDED remembered | MISSING | GONE | TOO_MUCH held |
/// OK bal held hold_amount hold_json.
const HOLD_SETTLE: &str = r#"
if lost() then return reply('LOST') end
local id = ARGV[3]
local ended = redis.call('GET', END_PREFIX .. id)
if ended then return reply('ENDED', ended) end
if not load() then return reply('MISSING') end
expire_due()
ended = redis.call('GET', END_PREFIX .. id)
if ended then return reply('ENDED', ended) end
local raw = redis.call('HGET', HOLDS, id)
if not raw then return reply('GONE') end
local h = cjson.decode(raw)
local amount = tonumber(ARGV[5])
if amount > h.amount then return reply('TOO_MUCH', s(h.amount)) end
redis.call('HDEL', HOLDS, id)
held = held - h.amount
bal = bal + h.amount - amount
if amount > 0 then redis.call('HSET', PEND, ARGV[4], s(amount) .. ':' .. s(now)) end
save()
redis.call('SET', END_PREFIX .. id,
  string.format('{"state":"settled","transaction_id":"%s","amount":%d,"released":%d,"balance":%d}',
    ARGV[4], amount, h.amount - amount, bal), 'PX', END_TTL)
return reply('OK', s(bal), s(held), s(h.amount), raw)
"#;

/// Restores a hold exactly as it was before a settle whose event surely never
/// reached the broker: ARGV[3] hold id, ARGV[4] transaction id, ARGV[5]
/// settled amount, ARGV[6] the hold's JSON. Replies LOST | OK bal held.
const HOLD_UNSETTLE: &str = r#"
if lost() or not load() then return reply('LOST') end
local id = ARGV[3]
if redis.call('HEXISTS', HOLDS, id) == 0 then
  local h = cjson.decode(ARGV[6])
  local amount = tonumber(ARGV[5])
  redis.call('HSET', HOLDS, id, ARGV[6])
  held = held + h.amount
  bal = bal - h.amount + amount
  if amount > 0 then redis.call('HDEL', PEND, ARGV[4]) end
  redis.call('DEL', END_PREFIX .. id)
  save()
end
return reply('OK', s(bal), s(held))
"#;

/// Releases a hold whole: ARGV[3] hold id. Replies LOST | ENDED remembered |
/// MISSING | GONE | OK bal held hold_amount hold_json.
const HOLD_RELEASE: &str = r#"
if lost() then return reply('LOST') end
local id = ARGV[3]
local ended = redis.call('GET', END_PREFIX .. id)
if ended then return reply('ENDED', ended) end
if not load() then return reply('MISSING') end
expire_due()
ended = redis.call('GET', END_PREFIX .. id)
if ended then return reply('ENDED', ended) end
local raw = redis.call('HGET', HOLDS, id)
if not raw then return reply('GONE') end
local h = cjson.decode(raw)
redis.call('HDEL', HOLDS, id)
held = held - h.amount
bal = bal + h.amount
save()
redis.call('SET', END_PREFIX .. id, '{"state":"released"}', 'PX', END_TTL)
return reply('OK', s(bal), s(held), s(h.amount), raw)
"#;

/// Restores a released hold whose event surely never reached the broker:
/// ARGV[3] hold id, ARGV[4] the hold's JSON. Replies LOST | OK bal held.
const HOLD_UNRELEASE: &str = r#"
if lost() or not load() then return reply('LOST') end
local id = ARGV[3]
if redis.call('HEXISTS', HOLDS, id) == 0 and redis.call('GET', END_PREFIX .. id) == '{"state":"released"}' then
  local h = cjson.decode(ARGV[4])
  redis.call('HSET', HOLDS, id, ARGV[4])
  held = held + h.amount
  bal = bal - h.amount
  redis.call('DEL', END_PREFIX .. id)
  save()
end
return reply('OK', s(bal), s(held))
"#;

/// Reads the balance, releasing holds past their expiry first.
/// Replies LOST | MISSING | OK bal held as_of.
const READ: &str = r#"
if lost() then return reply('LOST') end
if not load() then return reply('MISSING') end
expire_due()
return reply('OK', s(bal), s(held), redis.call('HGET', CRED, 'as_of') or '')
"#;

/// Loads a user from Postgres, only if Redis does not hold them yet:
/// ARGV[3] ledger balance, ARGV[4] as_of ('' if none), then pairs of open
/// hold id and hold JSON. Replies LOST | EXISTS | OK bal held.
const INIT: &str = r#"
if lost() then return reply('LOST') end
if redis.call('HEXISTS', CRED, 'bal') == 1 then return reply('EXISTS') end
redis.call('DEL', PEND, HOLDS)
for i = 5, #ARGV, 2 do
  local h = cjson.decode(ARGV[i + 1])
  held = held + h.amount
  redis.call('HSET', HOLDS, ARGV[i], ARGV[i + 1])
end
bal = tonumber(ARGV[3]) - held
save()
if ARGV[4] ~= '' then redis.call('HSETNX', CRED, 'as_of', ARGV[4]) end
return reply('OK', s(bal), s(held))
"#;

/// Adds an admin grant (already committed in Postgres) to bal, once per grant
/// id: KEYS[5] the applied set; ARGV[3] grant id, ARGV[4] amount, ARGV[5]
/// marker TTL ms. Replies LOST | MISSING | OK bal held applied(1|0).
const GRANT_APPLY: &str = r#"
if lost() then return reply('LOST') end
if not load() then return reply('MISSING') end
if redis.call('SISMEMBER', KEYS[5], ARGV[3]) == 1 then return reply('OK', s(bal), s(held), '0') end
bal = bal + tonumber(ARGV[4])
save()
redis.call('SADD', KEYS[5], ARGV[3])
redis.call('PEXPIRE', KEYS[5], ARGV[5])
return reply('OK', s(bal), s(held), '1')
"#;

/// The reconciler's view: replies LOST | MISSING |
/// OK bal held ver now_ms, then pending pairs (transaction id, "amount:at").
const SNAPSHOT: &str = r#"
if lost() then return reply('LOST') end
if not load() then return reply('MISSING') end
local r = reply('OK', s(bal), s(held), redis.call('HGET', CRED, 'ver') or '0', s(now))
local p = redis.call('HGETALL', PEND)
for i = 1, #p do r[#r + 1] = p[i] end
return r
"#;

/// Removes pending entries whose ledger row exists (settled, but the worker's
/// HDEL was lost); bal already excludes them. ARGV[3..] transaction ids.
/// Replies LOST | OK removed.
const DROP_SETTLED: &str = r#"
if lost() or not load() then return reply('LOST') end
local n = 0
for i = 3, #ARGV do n = n + redis.call('HDEL', PEND, ARGV[i]) end
if n > 0 then redis.call('HINCRBY', CRED, 'ver', 1) end
return reply('OK', s(n))
"#;

/// Gives back reservations older than ARGV[3] ms whose ledger row does not
/// exist (their event never reached the broker). ARGV[4..] transaction ids.
/// Replies LOST | OK released.
const RELEASE_STALE: &str = r#"
if lost() or not load() then return reply('LOST') end
local cutoff = now - tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV do
  local p = redis.call('HGET', PEND, ARGV[i])
  if p and tonumber(string.match(p, ':(%d+)$')) <= cutoff then
    bal = bal + pending_amount(p)
    redis.call('HDEL', PEND, ARGV[i])
    n = n + 1
  end
end
if n > 0 then save() end
return reply('OK', s(n))
"#;

/// Sets bal to the ledger's figure, only if nothing moved since the snapshot:
/// KEYS[5] the applied-grants set; ARGV[3] ver seen, ARGV[4] held seen,
/// ARGV[5] new bal, ARGV[6] marker TTL ms, ARGV[7..] grant ids the ledger
/// figure already contains (their own Redis step must not add them again).
/// Replies LOST | CHANGED | SAME | REPAIRED old_bal.
const REPAIR: &str = r#"
if lost() or not load() then return reply('LOST') end
if redis.call('HLEN', PEND) > 0 or (redis.call('HGET', CRED, 'ver') or '0') ~= ARGV[3]
   or held ~= tonumber(ARGV[4]) then
  return reply('CHANGED')
end
local old = bal
bal = tonumber(ARGV[5])
if old == bal then return reply('SAME') end
save()
for i = 7, #ARGV do redis.call('SADD', KEYS[5], ARGV[i]) end
if #ARGV >= 7 then redis.call('PEXPIRE', KEYS[5], ARGV[6]) end
return reply('REPAIRED', s(old))
"#;

/// The worker's expiry of one hold found open in Postgres: ARGV[3] hold id.
/// Replies LOST | MISSING | ABSENT | NOT_DUE | RELEASED (with every hold of
/// the user now past expiry in the expired list).
const EXPIRE_HOLD: &str = r#"
if lost() then return reply('LOST') end
if not load() then return reply('MISSING') end
local raw = redis.call('HGET', HOLDS, ARGV[3])
if not raw then return reply('ABSENT') end
if cjson.decode(raw).expires_at_ms > now then return reply('NOT_DUE') end
expire_due()
return reply('RELEASED')
"#;

/// A credits-queue consumer's heartbeat (no prelude): KEYS[1] the consumers
/// hash; ARGV[1] consumer tag, ARGV[2] unacked deliveries, ARGV[3] ms since
/// it last took or settled a delivery, ARGV[4] '1' to remove the entry.
/// Stores "unacked:idle_since_ms:beat_ms" on Redis's clock.
const HEARTBEAT: &str = r#"
if ARGV[4] == '1' then return redis.call('HDEL', KEYS[1], ARGV[1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:%d:%d', tonumber(ARGV[2]), now - tonumber(ARGV[3]), now))
return 1
"#;

/// Starts a recovery once (no prelude): KEYS[1] the recovery key. Stores
/// Redis's clock (ms) if no recovery is running; replies the recovery's value.
const RECOVERY_ENTER: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], string.format('%d', now), 'NX')
return redis.call('GET', KEYS[1])
"#;

/// Claims the completion of the recovery that started at ARGV[1] (no
/// prelude): KEYS[1] the recovery key. 1 if it is still that recovery.
const RECOVERY_CLAIM: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == 'completing:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'completing:' .. ARGV[1])
  return 1
end
return 0
"#;

/// The scripts, compiled once. `redis::Script` sends EVALSHA and loads the
/// script on NOSCRIPT by itself (e.g. after a Redis restart).
pub struct Scripts {
    pub consume: redis::Script,
    pub consume_undo: redis::Script,
    pub idem_finish: redis::Script,
    pub idem_restore: redis::Script,
    pub hold_open: redis::Script,
    pub hold_undo: redis::Script,
    pub hold_settle: redis::Script,
    pub hold_unsettle: redis::Script,
    pub hold_release: redis::Script,
    pub hold_unrelease: redis::Script,
    pub read: redis::Script,
    pub init: redis::Script,
    pub grant_apply: redis::Script,
    pub snapshot: redis::Script,
    pub drop_settled: redis::Script,
    pub release_stale: redis::Script,
    pub repair: redis::Script,
    pub expire_hold: redis::Script,
    pub heartbeat: redis::Script,
    pub recovery_enter: redis::Script,
    pub recovery_claim: redis::Script,
}

pub fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let with = |body: &str| {
            redis::Script::new(&format!(
                "{PRELUDE}{IDEM_CHECK}{HOLD_LIMIT}{IDEM_STEPS}{body}"
            ))
        };
        Scripts {
            consume: with(CONSUME),
            consume_undo: with(CONSUME_UNDO),
            idem_finish: redis::Script::new(IDEM_FINISH),
            idem_restore: with(IDEM_RESTORE),
            hold_open: with(HOLD_OPEN),
            hold_undo: with(HOLD_UNDO),
            hold_settle: with(HOLD_SETTLE),
            hold_unsettle: with(HOLD_UNSETTLE),
            hold_release: with(HOLD_RELEASE),
            hold_unrelease: with(HOLD_UNRELEASE),
            read: with(READ),
            init: with(INIT),
            grant_apply: with(GRANT_APPLY),
            snapshot: with(SNAPSHOT),
            drop_settled: with(DROP_SETTLED),
            release_stale: with(RELEASE_STALE),
            repair: with(REPAIR),
            expire_hold: with(EXPIRE_HOLD),
            heartbeat: redis::Script::new(HEARTBEAT),
            recovery_enter: redis::Script::new(RECOVERY_ENTER),
            recovery_claim: redis::Script::new(RECOVERY_CLAIM),
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
    pub fn new(keys: &crate::keys::Keys, user_id: &str) -> Self {
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
        script: &'a redis::Script,
        end_ttl_ms: u64,
    ) -> redis::ScriptInvocation<'a> {
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

/// A script's reply: its tag, the holds it expired, and its own fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub tag: String,
    pub expired: Vec<ExpiredHold>,
    pub fields: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed credit script reply: {0}")]
pub struct ReplyError(pub String);

impl Reply {
    pub fn parse(raw: Vec<String>) -> Result<Self, ReplyError> {
        let mut it = raw.into_iter();
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
        })
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

/// A pending value "amount:reserved_at_ms".
pub fn parse_pending(value: &str) -> Option<(i64, i64)> {
    let (a, t) = value.split_once(':')?;
    Some((a.parse().ok()?, t.parse().ok()?))
}

/// An idempotency record as the scripts store it (the fields `idem_check`
/// reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdemRecord<'a> {
    /// `h`: the body hash.
    pub hash: &'a str,
    /// `st` is `done` (an answer is remembered) rather than `run`.
    pub done: bool,
    /// `tx`: the id the running request uses (absent in records written
    /// before ids were recorded).
    pub id: Option<&'a str>,
    /// `t`: when the running request started, Redis ms.
    pub started_ms: Option<i64>,
}

/// What a keyed request does with the record under its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdemDecision {
    /// No record: a new movement under a new id.
    Fresh,
    /// Another body under this key: 409.
    Conflict,
    /// The first request's answer is remembered: replay it, charge nothing.
    Replay,
    /// The first request may still be running: 409.
    Busy,
    /// The first request started longer ago than the in-progress window and
    /// never stored its answer (it crashed, its answer's write failed, or its
    /// publish was ambiguous): look for its durable record, else retry it
    /// under its recorded id, never a new one.
    Stale,
}

/// The decision `idem_check` makes in Lua (`IDEM_CHECK`), as a plain
/// function. `window_ms` is the in-progress window (confirm timeout + 30 s).
/// A running record without an id or start (an older gateway's marker,
/// which expires by itself within the window) is `Busy`.
pub fn idem_decide(
    record: Option<IdemRecord<'_>>,
    hash: &str,
    now_ms: i64,
    window_ms: i64,
) -> IdemDecision {
    let Some(r) = record else {
        return IdemDecision::Fresh;
    };
    if r.hash != hash {
        return IdemDecision::Conflict;
    }
    if r.done {
        return IdemDecision::Replay;
    }
    match (r.id, r.started_ms) {
        (Some(_), Some(t)) if now_ms - t >= window_ms => IdemDecision::Stale,
        _ => IdemDecision::Busy,
    }
}

/// Whether a hold may open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOpenDecision {
    /// The user already has `credits.max_open_holds` open: 422 naming `holds`.
    TooMany,
    /// The balance cannot cover it: 402.
    Insufficient,
    Open,
}

/// The decision `hold_limit` makes in Lua (`HOLD_LIMIT`), over the holds
/// still open once the expired ones have left. The limit comes first: a
/// refused hold is never remembered as a 402.
pub fn hold_open_decide(open: u64, max_open: u64, bal: i64, amount: i64) -> HoldOpenDecision {
    if open >= max_open {
        HoldOpenDecision::TooMany
    } else if bal < amount {
        HoldOpenDecision::Insufficient
    } else {
        HoldOpenDecision::Open
    }
}

/// `idem_check` alone, for the agreement test with [`idem_decide`]: KEYS[1]
/// the record; ARGV[1] body hash, ARGV[2] window ms, ARGV[3] now ms. Replies
/// `[decision, id or answer or '']`.
pub fn idem_check_twin() -> redis::Script {
    redis::Script::new(&format!(
        "local now = tonumber(ARGV[3])\n{IDEM_CHECK}\n\
         local d, v = idem_check(KEYS[1], ARGV[1], ARGV[2])\nreturn {{d, v or ''}}"
    ))
}

/// `hold_limit` alone, for the agreement test with [`hold_open_decide`]:
/// ARGV open, max, bal, amount. Replies the decision.
pub fn hold_limit_twin() -> redis::Script {
    redis::Script::new(&format!(
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
    fn slots_match_redis_cluster() {
        // CRC16/XMODEM check value, and CLUSTER KEYSLOT answers from the Redis docs.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("somekey"), 11058);
    }

    #[test]
    fn every_slot_has_a_tag_in_that_slot() {
        for slot in [0, 1, 5000, 12182, SLOTS - 1] {
            assert_eq!(slot_of(slot_tag(slot)), slot);
        }
        assert!((0..SLOTS).all(|s| slot_of(slot_tag(s)) == s));
    }

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
    }

    #[test]
    fn broken_replies_are_errors_not_panics() {
        assert!(Reply::parse(vec![]).is_err());
        assert!(Reply::parse(vec!["OK".into()]).is_err());
        assert!(Reply::parse(vec!["OK".into(), "1".into(), "h".into()]).is_err());
        assert!(Reply::parse(vec!["OK".into(), "1".into(), "h".into(), "x".into()]).is_err());
    }

    #[test]
    fn a_keyed_request_is_fresh_conflicting_replayed_busy_or_stale() {
        let rec = |hash, done, id, started_ms| {
            Some(IdemRecord {
                hash,
                done,
                id,
                started_ms,
            })
        };
        let w = 35_000;
        assert_eq!(idem_decide(None, "h", 0, w), IdemDecision::Fresh);
        assert_eq!(
            idem_decide(rec("other", true, None, None), "h", 0, w),
            IdemDecision::Conflict
        );
        assert_eq!(
            idem_decide(rec("other", false, Some("t"), Some(0)), "h", 99_999, w),
            IdemDecision::Conflict,
            "another body is a conflict even once the first is stale"
        );
        assert_eq!(
            idem_decide(rec("h", true, Some("t"), Some(0)), "h", 0, w),
            IdemDecision::Replay
        );
        let run = rec("h", false, Some("t"), Some(1_000));
        assert_eq!(idem_decide(run, "h", 1_000, w), IdemDecision::Busy);
        assert_eq!(idem_decide(run, "h", 1_000 + w - 1, w), IdemDecision::Busy);
        assert_eq!(idem_decide(run, "h", 1_000 + w, w), IdemDecision::Stale);
        // Marked stale at once after an ambiguous publish (t = 0).
        assert_eq!(
            idem_decide(rec("h", false, Some("t"), Some(0)), "h", w, w),
            IdemDecision::Stale
        );
        // An older gateway's marker: no id to reuse, so it stays busy until
        // its own short TTL ends it.
        assert_eq!(
            idem_decide(rec("h", false, None, None), "h", 10 * w, w),
            IdemDecision::Busy
        );
        assert_eq!(
            idem_decide(rec("h", false, Some("t"), None), "h", 10 * w, w),
            IdemDecision::Busy
        );
    }

    #[test]
    fn the_hold_limit_comes_before_the_balance() {
        assert_eq!(hold_open_decide(0, 3, 10, 5), HoldOpenDecision::Open);
        assert_eq!(hold_open_decide(2, 3, 5, 5), HoldOpenDecision::Open);
        assert_eq!(hold_open_decide(3, 3, 100, 5), HoldOpenDecision::TooMany);
        assert_eq!(hold_open_decide(3, 3, 0, 5), HoldOpenDecision::TooMany);
        assert_eq!(hold_open_decide(2, 3, 4, 5), HoldOpenDecision::Insufficient);
        assert_eq!(hold_open_decide(0, 0, 10, 1), HoldOpenDecision::TooMany);
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
