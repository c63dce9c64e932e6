-- Restores durable idempotency records (Postgres) as `done`, while the user is
-- being loaded (only if `bal` is still absent, so no record of a request
-- answered since is overwritten): KEYS[5..] record keys; ARGV[3..] per key
-- body hash, answer, expiry (epoch ms). Replies LOST | EXISTS | OK restored.
if lost() then return reply('LOST') end
if redis.call('HEXISTS', CRED, 'bal') == 1 then return reply('EXISTS') end
return reply('OK', s(idem_put_records()))
