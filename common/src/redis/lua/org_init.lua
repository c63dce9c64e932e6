-- Loads an organization's account from Postgres, only if Redis does not hold
-- it yet (init.lua for a pool): ARGV[3] the pool's ledger balance, ARGV[4]
-- as_of ('' if none), ARGV[5] the period (YYYY-MM), ARGV[6] how many members
-- follow, then per member: user id, cap ('0': none), settled spend this
-- period; then pairs of open hold id and hold JSON. The member hash is
-- written first, then the credits hash (member.lua). Replies LOST | EXISTS |
-- OK bal held.
if lost() then return reply('LOST') end
if redis.call('HEXISTS', CRED, 'bal') == 1 then return reply('EXISTS') end
local key = members_key()
redis.call('DEL', key, PEND, HOLDS)
redis.call('HSET', key, 'period', ARGV[5])
local n = tonumber(ARGV[6])
local i = 7
for _ = 1, n do
  redis.call('HSET', key, 'm:' .. ARGV[i], ARGV[i + 1])
  if tonumber(ARGV[i + 2]) > 0 then redis.call('HSET', key, 's:' .. ARGV[i], ARGV[i + 2]) end
  i = i + 3
end
for j = i, #ARGV, 2 do
  local h = cjson.decode(ARGV[j + 1])
  held = held + h.amount
  redis.call('HSET', HOLDS, ARGV[j], ARGV[j + 1])
end
bal = tonumber(ARGV[3]) - held
save()
if ARGV[4] ~= '' then redis.call('HSETNX', CRED, 'as_of', ARGV[4]) end
return reply('OK', s(bal), s(held))
