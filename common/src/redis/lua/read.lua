-- Reads the balance, releasing holds past their expiry first. Replies LOST |
-- MISSING | OK bal held as_of. ARGV[3..4] (optional): an organization member
-- and the period, on the organization's account (member.lua): bal is then
-- what the member may spend now and held what the member holds; MISSING
-- also when the organization is not loaded, NOT_MEMBER when not a member.
if lost() then return reply('LOST') end
member_args(3)
local gate = member_gate()
if gate then return gate end
if not load() then return reply('MISSING') end
expire_due()
if MEMBER then
  local cap, counted, mine = member_state()
  return reply('OK', s(member_room(cap, counted)), s(mine), redis.call('HGET', CRED, 'as_of') or '')
end
return reply('OK', s(bal), s(held), redis.call('HGET', CRED, 'as_of') or '')
