-- The prelude every credit script starts from (common/src/redis/scripts.rs
-- concatenates it, idem_check, hold_limit and idem_steps before the body).
-- KEYS[1] is the data-loss sentinel of the user's slot, KEYS[2..4] the
-- credits, pending and holds hashes; ARGV[1] is the `hold_end:` prefix and
-- ARGV[2] how long an ended hold is remembered (ms). A missing sentinel means
-- Redis lost its data: the script answers LOST and changes nothing. Amounts
-- are computed in doubles (exact below 2^53) and formatted with %d (`s`),
-- never `tostring`, which rounds past 14 digits. Every reply is a flat array
-- of strings: TAG, N, (hold id, amount) x N, fields..., where the N pairs are
-- holds this call found past their expiry and released.
local SENT, CRED, PEND, HOLDS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local END_PREFIX, END_TTL = ARGV[1], ARGV[2]
local function s(x) return string.format('%d', x) end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local bal, held = 0, 0
local expired = {}
-- Set by `rate_limit` (rate_limit.lua) when this call decided the request's
-- rate limit: the reply then opens with 'RL', allowed, remaining, reset_us,
-- retry_us before its tag.
local rl = nil
local function reply(tag, ...)
  local r = {}
  if rl then r = {'RL', rl[1], rl[2], rl[3], rl[4]} end
  r[#r + 1] = tag
  r[#r + 1] = s(#expired / 2)
  for i = 1, #expired do r[#r + 1] = expired[i] end
  for i = 1, select('#', ...) do r[#r + 1] = tostring((select(i, ...))) end
  return r
end
local function lost() return redis.call('EXISTS', SENT) == 0 end
-- `ver` counts every change of bal or held (the reconciler's snapshot compares
-- it): read with them by `load`, so `save` writes all three in one HSET; a
-- script that saves without loading (init) increments it in Redis instead.
local ver = nil
local function load()
  local v = redis.call('HMGET', CRED, 'bal', 'held', 'ver')
  if not v[1] then return false end
  bal = tonumber(v[1])
  held = tonumber(v[2] or '0')
  ver = tonumber(v[3] or '0')
  return true
end
local function save()
  if ver then
    ver = ver + 1
    redis.call('HSET', CRED, 'bal', s(bal), 'held', s(held), 'ver', s(ver))
  else
    redis.call('HSET', CRED, 'bal', s(bal), 'held', s(held))
    redis.call('HINCRBY', CRED, 'ver', 1)
  end
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
