-- Opens a hold: KEYS[5] idempotency record; ARGV[3] body hash, ARGV[4] a fresh
-- hold id, ARGV[5] amount, ARGV[6] lifetime ms, ARGV[7] in-progress window ms,
-- ARGV[8] answer TTL ms, ARGV[9] 402 TTL ms, ARGV[10] '1' to reuse the id of a
-- stale record, ARGV[11] most open holds per user. Replies LOST | CONFLICT |
-- BUSY | REPLAY answer | STALE id | MISSING | ENDED | TOO_MANY max |
-- INSUFFICIENT bal held | OK bal held expires_at_ms created(1|0) hold_id
-- reused(1|0) | LIMITED. KEYS[6], ARGV[12..13] (optional): the rate limit
-- decided first (rate_limit.lua). Expired holds leave first, so the limit counts open ones only,
-- and every script's scan of a user's holds stays bounded by it.
-- ARGV[15..16] (optional, with '' for ARGV[12..14]): an organization member
-- and the period (member.lua): NOT_MEMBER, and CAP room held when the cap
-- cannot cover the hold; the hold's JSON names its member (`m`), and the most
-- open holds counts the member's own; an OK's bal is what the member may spend now.
local limited = rate_limit(KEYS[6], ARGV[12], ARGV[13], ARGV[14])
if limited then return limited end
if lost() then return reply('LOST') end
member_args(15)
local gate = member_gate()
if gate then return gate end
local IDEM, HASH = KEYS[5], ARGV[3]
local early, id, reused = idem_begin(IDEM, HASH, ARGV[7], ARGV[4], ARGV[10])
if early then return early end
if not load() then return reply('MISSING') end
expire_due()
local amount = tonumber(ARGV[5])
local flag = reused and '1' or '0'
local cap, counted = nil, 0
if MEMBER then cap, counted = member_state() end
local raw = redis.call('HGET', HOLDS, id)
if raw then
  if HASH ~= '' then idem_run(IDEM, HASH, id, ARGV[8]) end
  return reply('OK', s(member_room(cap, counted)), s(held), s(cjson.decode(raw).expires_at_ms), '0', id, flag)
end
if redis.call('EXISTS', END_PREFIX .. id) == 1 then return reply('ENDED') end
local open = redis.call('HLEN', HOLDS)
if MEMBER then
  open = 0
  for _, r in ipairs(redis.call('HVALS', HOLDS)) do
    if cjson.decode(r).m == MEMBER then open = open + 1 end
  end
end
local d = hold_limit(open, tonumber(ARGV[11]), bal, amount)
if d == 'TOO_MANY' then return reply('TOO_MANY', ARGV[11]) end
if d == 'INSUFFICIENT' then
  if HASH ~= '' then
    idem_done(IDEM, HASH, refused_json(bal, amount, 'pool'), ARGV[9])
  end
  return reply('INSUFFICIENT', s(bal), s(held))
end
if cap and counted + amount > cap then
  local room = member_room(cap, counted)
  if HASH ~= '' then idem_done(IDEM, HASH, refused_json(room, amount, 'member_cap'), ARGV[9]) end
  return reply('CAP', s(room), s(held))
end
local exp = now + tonumber(ARGV[6])
bal = bal - amount
held = held + amount
if MEMBER then
  redis.call('HSET', HOLDS, id,
    string.format('{"amount":%d,"expires_at_ms":%d,"m":"%s"}', amount, exp, MEMBER))
else
  redis.call('HSET', HOLDS, id, string.format('{"amount":%d,"expires_at_ms":%d}', amount, exp))
end
save()
if HASH ~= '' then idem_run(IDEM, HASH, id, ARGV[8]) end
return reply('OK', s(member_room(cap, counted + amount)), s(held), s(exp), '1', id, flag)
