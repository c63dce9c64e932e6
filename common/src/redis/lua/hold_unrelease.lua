-- Restores a released hold whose event surely never reached the broker:
-- ARGV[3] hold id, ARGV[4] the hold's JSON. Replies LOST | OK bal held.
if lost() or not load() then return reply('LOST') end
local id = ARGV[3]
if redis.call('HEXISTS', HOLDS, id) == 0 and redis.call('GET', END_PREFIX .. id) == '{"state":"released"}' then
  local h = cjson.decode(ARGV[4])
  redis.call('HSET', HOLDS, id, ARGV[4])
  held = held + h.amount
  bal = bal - h.amount
  redis.call('DEL', END_PREFIX .. id)
  save()
end
return reply('OK', s(bal), s(held))
