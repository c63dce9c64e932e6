-- Stores the final answer of a request under its idempotency key (no prelude):
-- KEYS[1] record; ARGV[1] body hash, ARGV[2] answer, ARGV[3] TTL ms, ARGV[4]
-- the id the answer is for. Only over the request's own in-progress record (or
-- none).
local rec = redis.call('HMGET', KEYS[1], 'h', 'st', 'tx')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'h', ARGV[1], 'st', 'done', 'ans', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
-- The request's own 'run' record already lives as long as the answer
-- (idem_run): it only becomes 'done' (its tx and t are no longer read).
if rec[1] == ARGV[1] and rec[2] == 'run' and rec[3] == ARGV[4] then
  redis.call('HSET', KEYS[1], 'st', 'done', 'ans', ARGV[2])
  return 1
end
return 0
