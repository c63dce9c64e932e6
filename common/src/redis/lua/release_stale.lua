-- Gives back reservations older than ARGV[3] ms whose ledger row does not
-- exist (their event never reached the broker). ARGV[4..] transaction ids.
-- Replies LOST | OK released.
if lost() or not load() then return reply('LOST') end
local cutoff = now - tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV do
  local p = redis.call('HGET', PEND, ARGV[i])
  if p and tonumber(string.match(p, ':(%d+)$')) <= cutoff then
    bal = bal + pending_amount(p)
    redis.call('HDEL', PEND, ARGV[i])
    n = n + 1
  end
end
if n > 0 then save() end
return reply('OK', s(n))
