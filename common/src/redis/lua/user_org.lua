-- A membership change, after its commit in Postgres, on the user's account:
-- ARGV[3] the organization's id, or '' when the user left it. Only while the
-- user is loaded (init writes the field from Postgres otherwise). Replies
-- LOST | MISSING | OK.
if lost() then return reply('LOST') end
if redis.call('HEXISTS', CRED, 'bal') == 0 then return reply('MISSING') end
if ARGV[3] == '' then
  redis.call('HDEL', CRED, 'org')
else
  redis.call('HSET', CRED, 'org', ARGV[3])
end
return reply('OK')
