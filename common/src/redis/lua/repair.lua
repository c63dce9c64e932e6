-- Sets bal to the ledger's figure, only if nothing moved since the snapshot:
-- KEYS[5] the applied-grants set; ARGV[3] ver seen, ARGV[4] held seen, ARGV[5]
-- new bal, ARGV[6] marker TTL ms, ARGV[7..] grant ids the ledger figure
-- already contains (their own Redis step must not add them again). Replies
-- LOST | CHANGED | SAME | REPAIRED old_bal.
if lost() or not load() then return reply('LOST') end
if redis.call('HLEN', PEND) > 0 or (redis.call('HGET', CRED, 'ver') or '0') ~= ARGV[3]
   or held ~= tonumber(ARGV[4]) then
  return reply('CHANGED')
end
local old = bal
bal = tonumber(ARGV[5])
if old == bal then return reply('SAME') end
save()
for i = 7, #ARGV do redis.call('SADD', KEYS[5], ARGV[i]) end
if #ARGV >= 7 then redis.call('PEXPIRE', KEYS[5], ARGV[6]) end
return reply('REPAIRED', s(old))
