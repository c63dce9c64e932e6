-- Starts a recovery once (no prelude): KEYS[1] the recovery key. Stores
-- Redis's clock (ms) if no recovery is running; replies the recovery's value.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], string.format('%d', now), 'NX')
return redis.call('GET', KEYS[1])
