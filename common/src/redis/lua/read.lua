-- Reads the balance, releasing holds past their expiry first. Replies LOST |
-- MISSING | OK bal held as_of.
if lost() then return reply('LOST') end
if not load() then return reply('MISSING') end
expire_due()
return reply('OK', s(bal), s(held), redis.call('HGET', CRED, 'as_of') or '')
