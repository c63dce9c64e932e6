-- An organization member's spend (docs/credits.md "Organizations"). A credit
-- script run on an organization's account (its keys under {org:ORG_ID}) for a
-- member is given the member, the organization's member hash and the period
-- (`member_args`). The member hash holds `m:USER` = the member's cap per
-- period ('0': none) for every member, `s:USER` = what the worker settled
-- for USER in `period` (a UTC month, YYYY-MM), and `period`. What the member
-- has outstanding (pending reservations tagged with them, "amount:USER:at",
-- and open holds whose JSON has `"m":"USER"`) counts against the cap too, so
-- a give-back (an undo, a release, an expiry, a stale reservation released)
-- needs no bookkeeping: it leaves the hash it was counted from.
local MEMBER, MEMBERS, PERIOD = nil, nil, nil
-- The member hash beside the account's credits hash (its key names end the same way).
local function members_key() return string.sub(CRED, 1, #CRED - 7) .. 'members' end
local function member_args(i)
  if ARGV[i] and ARGV[i] ~= '' then
    MEMBER, PERIOD, MEMBERS = ARGV[i], ARGV[i + 1], members_key()
  end
end
-- nil when MEMBER may run here; else the reply: MISSING (the organization is
-- not loaded) or NOT_MEMBER (not a member any more). Decided before anything
-- is written, so a refused run leaves no idempotency record behind.
local function member_gate()
  if not MEMBER then return nil end
  if redis.call('HEXISTS', CRED, 'bal') == 0 or redis.call('HEXISTS', MEMBERS, 'period') == 0 then
    return reply('MISSING')
  end
  if redis.call('HEXISTS', MEMBERS, 'm:' .. MEMBER) == 0 then return reply('NOT_MEMBER') end
  return nil
end
-- Moves the member hash to PERIOD: what was settled in an earlier period stops counting.
local function member_period()
  if redis.call('HGET', MEMBERS, 'period') == PERIOD then return end
  for _, f in ipairs(redis.call('HKEYS', MEMBERS)) do
    if string.sub(f, 1, 2) == 's:' then redis.call('HDEL', MEMBERS, f) end
  end
  redis.call('HSET', MEMBERS, 'period', PERIOD)
end
-- The member's cap (nil: none), what counts against it this period, and what the member holds.
local function member_state()
  member_period()
  local v = redis.call('HMGET', MEMBERS, 'm:' .. MEMBER, 's:' .. MEMBER)
  local spent = tonumber(v[2] or '0')
  local tag = ':' .. MEMBER .. ':'
  for _, p in ipairs(redis.call('HVALS', PEND)) do
    if string.find(p, tag, 1, true) then spent = spent + pending_amount(p) end
  end
  local mine = 0
  for _, raw in ipairs(redis.call('HVALS', HOLDS)) do
    local h = cjson.decode(raw)
    if h.m == MEMBER then mine = mine + h.amount end
  end
  local cap = tonumber(v[1] or '0')
  if cap == 0 then cap = nil end
  return cap, spent + mine, mine
end
-- What the member may spend now: the pool's balance, bounded by the cap's room.
local function member_room(cap, counted)
  if not cap then return bal end
  local room = cap - counted
  if room < 0 then room = 0 end
  if room < bal then return room end
  return bal
end
-- A pending value: "amount:at", or "amount:USER:at" for a member's reservation.
local function pending_value(amount, member)
  if member then return s(amount) .. ':' .. member .. ':' .. s(now) end
  return s(amount) .. ':' .. s(now)
end
-- The worker settled pending value `p` (drop_settled): a member's amount now counts as settled.
local function count_settled(p)
  local member = string.match(p, '^%d+:([^:]+):%d+$')
  if not member then return end
  local key = members_key()
  if redis.call('EXISTS', key) == 0 then return end
  redis.call('HINCRBY', key, 's:' .. member, pending_amount(p))
end
-- The remembered 402 of a refused reservation; a member's names the limit that refused it.
local function refused_json(balance, amount, limit)
  if MEMBER then
    return string.format('{"status":402,"balance":%d,"required":%d,"limit":"%s"}', balance, amount, limit)
  end
  return string.format('{"status":402,"balance":%d,"required":%d}', balance, amount)
end
