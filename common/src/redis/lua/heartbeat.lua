-- A credits-queue consumer's heartbeat (no prelude): KEYS[1] the consumers
-- hash; ARGV[1] consumer tag, ARGV[2] unacked deliveries, ARGV[3] ms since it
-- last took or settled a delivery, ARGV[4] '1' to remove the entry. Stores
-- "unacked:idle_since_ms:beat_ms" on Redis's clock.
if ARGV[4] == '1' then return redis.call('HDEL', KEYS[1], ARGV[1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:%d:%d', tonumber(ARGV[2]), now - tonumber(ARGV[3]), now))
return 1
