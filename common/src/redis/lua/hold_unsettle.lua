-- Restores a hold exactly as it was before a settle whose event surely never
-- reached the broker: ARGV[3] hold id, ARGV[4] transaction id, ARGV[5] settled
-- amount, ARGV[6] the hold's JSON. Replies LOST | OK bal held.
if lost() or not load() then return reply('LOST') end
local id = ARGV[3]
if redis.call('HEXISTS', HOLDS, id) == 0 then
  local h = cjson.decode(ARGV[6])
  local amount = tonumber(ARGV[5])
  redis.call('HSET', HOLDS, id, ARGV[6])
  held = held + h.amount
  bal = bal - h.amount + amount
  if amount > 0 then redis.call('HDEL', PEND, ARGV[4]) end
  redis.call('DEL', END_PREFIX .. id)
  save()
end
return reply('OK', s(bal), s(held))
