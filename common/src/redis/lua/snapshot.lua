-- The reconciler's view: replies LOST | MISSING | OK bal held ver now_ms, then
-- pending pairs (transaction id, "amount:at").
if lost() then return reply('LOST') end
if not load() then return reply('MISSING') end
local r = reply('OK', s(bal), s(held), redis.call('HGET', CRED, 'ver') or '0', s(now))
local p = redis.call('HGETALL', PEND)
for i = 1, #p do r[#r + 1] = p[i] end
return r
