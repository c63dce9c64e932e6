-- `idem_finish.lua` for many records in one call (no prelude), what the
-- gateway's finish batcher sends: KEYS[i] a record; ARGV[4i-3..4i] its body
-- hash, answer, TTL ms and the id the answer is for. Each record as
-- idem_finish does it: only over the request's own in-progress record (or
-- none). Replies how many were stored.
local n = 0
for i = 1, #KEYS do
  local key, hash, ans, ttl, id = KEYS[i], ARGV[4 * i - 3], ARGV[4 * i - 2], ARGV[4 * i - 1], ARGV[4 * i]
  local rec = redis.call('HMGET', key, 'h', 'st', 'tx')
  if not rec[1] then
    redis.call('HSET', key, 'h', hash, 'st', 'done', 'ans', ans)
    redis.call('PEXPIRE', key, ttl)
    n = n + 1
  elseif rec[1] == hash and rec[2] == 'run' and rec[3] == id then
    -- Its own 'run' record already lives as long as the answer (idem_run).
    redis.call('HSET', key, 'st', 'done', 'ans', ans)
    n = n + 1
  end
end
return n
