-- The worker's expiry of one hold found open in Postgres: ARGV[3] hold id.
-- Replies LOST | MISSING | ABSENT | NOT_DUE | RELEASED (with every hold of the
-- user now past expiry in the expired list).
if lost() then return reply('LOST') end
if not load() then return reply('MISSING') end
local raw = redis.call('HGET', HOLDS, ARGV[3])
if not raw then return reply('ABSENT') end
if cjson.decode(raw).expires_at_ms > now then return reply('NOT_DUE') end
expire_due()
return reply('RELEASED')
