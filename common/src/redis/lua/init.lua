-- Loads a user from Postgres, only if Redis does not hold them yet: ARGV[3]
-- ledger balance, ARGV[4] as_of ('' if none), ARGV[5] the organization the
-- user is a member of ('' if none), then pairs of open hold id and hold JSON.
-- Replies LOST | EXISTS | OK bal held.
if lost() then return reply('LOST') end
if redis.call('HEXISTS', CRED, 'bal') == 1 then return reply('EXISTS') end
redis.call('DEL', PEND, HOLDS)
for i = 6, #ARGV, 2 do
  local h = cjson.decode(ARGV[i + 1])
  held = held + h.amount
  redis.call('HSET', HOLDS, ARGV[i], ARGV[i + 1])
end
bal = tonumber(ARGV[3]) - held
save()
if ARGV[4] ~= '' then redis.call('HSETNX', CRED, 'as_of', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', CRED, 'org', ARGV[5]) end
return reply('OK', s(bal), s(held))
