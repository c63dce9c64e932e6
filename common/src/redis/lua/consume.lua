-- Consume: KEYS[5] idempotency record; ARGV[3] body hash ('' without a key),
-- ARGV[4] a fresh transaction id, ARGV[5] amount, ARGV[6] in-progress window
-- ms, ARGV[7] answer TTL ms, ARGV[8] TTL of a remembered 402 ms, ARGV[9] '1'
-- to reuse the id of a stale record while it is still pending ('2': and
-- reserve it again when it is not). Replies LOST | CONFLICT | BUSY | REPLAY
-- answer | STALE id | UNPENDING id | MISSING | INSUFFICIENT bal held | OK bal
-- held created(1|0) tx reused(1|0) | LIMITED. KEYS[6], ARGV[10..11] (optional): the
-- rate limit decided first (rate_limit.lua). `created` 0: this transaction id is
-- already reserved (a retry), nothing moved; `tx` is the id used (the recorded
-- one when `reused`). ARGV[13..14] (optional, with '' for ARGV[10..12]): an
-- organization member and the period, on the organization's account
-- (member.lua): NOT_MEMBER, and CAP room held when the member's cap cannot
-- cover it; an OK's bal is then what the member may spend now.
local limited = rate_limit(KEYS[6], ARGV[10], ARGV[11], ARGV[12])
if limited then return limited end
if lost() then return reply('LOST') end
member_args(13)
local gate = member_gate()
if gate then return gate end
local IDEM, HASH = KEYS[5], ARGV[3]
local early, tx, reused = idem_begin(IDEM, HASH, ARGV[6], ARGV[4], ARGV[9])
if early then return early end
if not load() then return reply('MISSING') end
expire_due()
local amount = tonumber(ARGV[5])
local flag = reused and '1' or '0'
local cap, counted = nil, 0
if MEMBER then cap, counted = member_state() end
if redis.call('HEXISTS', PEND, tx) == 1 then
  if HASH ~= '' then idem_run(IDEM, HASH, tx, ARGV[7]) end
  return reply('OK', s(member_room(cap, counted)), s(held), '0', tx, flag)
end
-- A recorded id no longer pending was either settled (the worker removes it
-- only after its commit) or given back (its event is gone): the gateway
-- tells which from Postgres before it may reserve again ('2').
if reused and ARGV[9] ~= '2' then return reply('UNPENDING', tx) end
if bal < amount then
  if HASH ~= '' then
    idem_done(IDEM, HASH, refused_json(bal, amount, 'pool'), ARGV[8])
  end
  return reply('INSUFFICIENT', s(bal), s(held))
end
if cap and counted + amount > cap then
  local room = member_room(cap, counted)
  if HASH ~= '' then
    idem_done(IDEM, HASH, refused_json(room, amount, 'member_cap'), ARGV[8])
  end
  return reply('CAP', s(room), s(held))
end
bal = bal - amount
redis.call('HSET', PEND, tx, pending_value(amount, MEMBER))
save()
if HASH ~= '' then idem_run(IDEM, HASH, tx, ARGV[7]) end
return reply('OK', s(member_room(cap, counted + amount)), s(held), '1', tx, flag)
