-- Releases a hold whole: ARGV[3] hold id. Replies LOST | ENDED remembered |
-- MISSING | GONE | OK bal held hold_amount hold_json | LIMITED. KEYS[5],
-- ARGV[4..5] (optional): the rate limit decided first (rate_limit.lua).
-- ARGV[7..8] (optional, with '' for ARGV[4..6]): the organization member
-- releasing and the period (member.lua): a hold of another member is GONE.
local limited = rate_limit(KEYS[5], ARGV[4], ARGV[5], ARGV[6])
if limited then return limited end
if lost() then return reply('LOST') end
member_args(7)
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
if h.m ~= MEMBER then return reply('GONE') end
redis.call('HDEL', HOLDS, id)
held = held - h.amount
bal = bal + h.amount
save()
redis.call('SET', END_PREFIX .. id, '{"state":"released"}', 'PX', END_TTL)
return reply('OK', s(bal), s(held), s(h.amount), raw)
