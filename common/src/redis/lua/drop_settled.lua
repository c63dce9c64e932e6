-- Removes pending entries whose ledger row exists (settled, but the worker's
-- HDEL was lost); bal already excludes them. ARGV[3..] transaction ids.
-- Replies LOST | OK removed.
if lost() or not load() then return reply('LOST') end
local n = 0
for i = 3, #ARGV do n = n + redis.call('HDEL', PEND, ARGV[i]) end
if n > 0 then redis.call('HINCRBY', CRED, 'ver', 1) end
return reply('OK', s(n))
