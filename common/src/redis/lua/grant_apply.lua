-- Adds an admin grant (already committed in Postgres) to bal, once per grant
-- id: KEYS[5] the applied set; ARGV[3] grant id, ARGV[4] amount, ARGV[5]
-- marker TTL ms. Replies LOST | MISSING | OK bal held applied(1|0).
if lost() then return reply('LOST') end
if not load() then return reply('MISSING') end
if redis.call('SISMEMBER', KEYS[5], ARGV[3]) == 1 then return reply('OK', s(bal), s(held), '0') end
bal = bal + tonumber(ARGV[4])
save()
redis.call('SADD', KEYS[5], ARGV[3])
redis.call('PEXPIRE', KEYS[5], ARGV[5])
return reply('OK', s(bal), s(held), '1')
