-- Consume: KEYS[5] idempotency record; ARGV[3] body hash ('' without a key),
-- ARGV[4] a fresh transaction id, ARGV[5] amount, ARGV[6] in-progress window
-- ms, ARGV[7] answer TTL ms, ARGV[8] TTL of a remembered 402 ms, ARGV[9] '1'
-- to reuse the id of a stale record while it is still pending ('2': and
-- reserve it again when it is not). Replies LOST | CONFLICT | BUSY | REPLAY
-- answer | STALE id | UNPENDING id | MISSING | INSUFFICIENT bal held | OK bal
-- held created(1|0) tx reused(1|0) | LIMITED. KEYS[6], ARGV[10..11] (optional): the
-- rate limit decided first (rate_limit.lua). `created` 0: this transaction id is
-- already reserved (a retry), nothing moved; `tx` is the id used (the recorded
-- one when `reused`).
local limited = rate_limit(KEYS[6], ARGV[10], ARGV[11], ARGV[12])
if limited then return limited end
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
