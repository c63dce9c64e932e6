-- Removes pending entries whose ledger row exists (settled: the worker's
-- removal of an organization's after its commit, or a removal the worker
-- lost); bal already excludes them. A member's amount now counts as settled
-- in the member hash's period (member.lua). ARGV[3..] transaction ids.
-- Replies LOST | OK removed.
if lost() or not load() then return reply('LOST') end
local n = 0
for i = 3, #ARGV do
  local p = redis.call('HGET', PEND, ARGV[i])
  if p then
    redis.call('HDEL', PEND, ARGV[i])
    count_settled(p)
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', CRED, 'ver', 1) end
return reply('OK', s(n))
