-- A membership change, after its commit in Postgres (docs/credits.md
-- "Organizations"), on the organization's account: ARGV[3] user id, ARGV[4]
-- the cap ('0': none) or '' when the user left. Only while the organization
-- is loaded: otherwise its next load reads the membership from Postgres.
-- Replies LOST | MISSING | OK.
if lost() then return reply('LOST') end
local key = members_key()
if redis.call('HEXISTS', CRED, 'bal') == 0 or redis.call('HEXISTS', key, 'period') == 0 then
  return reply('MISSING')
end
if ARGV[4] == '' then
  redis.call('HDEL', key, 'm:' .. ARGV[3])
else
  redis.call('HSET', key, 'm:' .. ARGV[3], ARGV[4])
end
return reply('OK')
