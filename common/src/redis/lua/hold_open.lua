-- Opens a hold: KEYS[5] idempotency record; ARGV[3] body hash, ARGV[4] a fresh
-- hold id, ARGV[5] amount, ARGV[6] lifetime ms, ARGV[7] in-progress window ms,
-- ARGV[8] answer TTL ms, ARGV[9] 402 TTL ms, ARGV[10] '1' to reuse the id of a
-- stale record, ARGV[11] most open holds per user. Replies LOST | CONFLICT |
-- BUSY | REPLAY answer | STALE id | MISSING | ENDED | TOO_MANY max |
-- INSUFFICIENT bal held | OK bal held expires_at_ms created(1|0) hold_id
-- reused(1|0) | LIMITED. KEYS[6], ARGV[12..13] (optional): the rate limit
-- decided first (rate_limit.lua). Expired holds leave first, so the limit counts open ones only,
-- and every script's scan of a user's holds stays bounded by it.
local limited = rate_limit(KEYS[6], ARGV[12], ARGV[13], ARGV[14])
if limited then return limited end
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
