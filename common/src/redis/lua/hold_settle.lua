-- Settles a hold: ARGV[3] hold id, ARGV[4] transaction id, ARGV[5] amount. The
-- hold leaves, the unused rest returns to bal, the amount becomes a pending
-- reservation, and the answer is remembered in `hold_end:ID`. Replies LOST |
-- ENDED remembered | MISSING | GONE | TOO_MUCH held | OK bal held hold_amount
-- hold_json | LIMITED. KEYS[5], ARGV[6..7] (optional): the rate limit decided
-- first (rate_limit.lua). ARGV[9..10] (optional, with '' for ARGV[6..8]): the
-- organization member settling and the period (member.lua): a hold of another
-- member is GONE; the settled amount stays pending under the hold's member.
local limited = rate_limit(KEYS[5], ARGV[6], ARGV[7], ARGV[8])
if limited then return limited end
if lost() then return reply('LOST') end
member_args(9)
local id = ARGV[3]
local ended = redis.call('GET', END_PREFIX .. id)
if ended then return reply('ENDED', ended) end
if not load() then return reply('MISSING') end
expire_due()
-- Only a hold expire_due just released can have ended since the first look.
if #expired > 0 then
  ended = redis.call('GET', END_PREFIX .. id)
  if ended then return reply('ENDED', ended) end
end
local raw = redis.call('HGET', HOLDS, id)
if not raw then return reply('GONE') end
local h = cjson.decode(raw)
if h.m ~= MEMBER then return reply('GONE') end
local amount = tonumber(ARGV[5])
if amount > h.amount then return reply('TOO_MUCH', s(h.amount)) end
redis.call('HDEL', HOLDS, id)
held = held - h.amount
bal = bal + h.amount - amount
if amount > 0 then redis.call('HSET', PEND, ARGV[4], pending_value(amount, h.m)) end
save()
redis.call('SET', END_PREFIX .. id,
  string.format('{"state":"settled","transaction_id":"%s","amount":%d,"released":%d,"balance":%d}',
    ARGV[4], amount, h.amount - amount, bal), 'PX', END_TTL)
return reply('OK', s(bal), s(held), s(h.amount), raw)
