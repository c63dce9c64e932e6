-- Restores durable idempotency records (Postgres) as `done`, while the user is
-- being loaded (only if `bal` is still absent, so no record of a request
-- answered since is overwritten): KEYS[5..] record keys; ARGV[3..] per key
-- body hash, answer, expiry (epoch ms). Replies LOST | EXISTS | OK restored.
if lost() then return reply('LOST') end
if redis.call('HEXISTS', CRED, 'bal') == 1 then return reply('EXISTS') end
local n = 0
for i = 5, #KEYS do
  local j = 3 + (i - 5) * 3
  if redis.call('EXISTS', KEYS[i]) == 0 and tonumber(ARGV[j + 2]) > now then
    redis.call('HSET', KEYS[i], 'h', ARGV[j], 'st', 'done', 'ans', ARGV[j + 1])
    redis.call('PEXPIREAT', KEYS[i], ARGV[j + 2])
    n = n + 1
  end
end
return reply('OK', s(n))
