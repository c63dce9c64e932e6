-- After a failed publish of a consume: KEYS[5] idempotency record; ARGV[3]
-- body hash, ARGV[4] transaction id, ARGV[5] '1' to give the reservation back
-- (only if still pending: the event surely never reached the broker), ARGV[6]
-- '1' to delete the record (see `idem_undo`). Replies LOST | OK bal held.
if lost() then return reply('LOST') end
if ARGV[3] ~= '' then idem_undo(KEYS[5], ARGV[3], ARGV[4], ARGV[6]) end
if ARGV[5] == '1' and load() then
  local p = redis.call('HGET', PEND, ARGV[4])
  if p then
    bal = bal + pending_amount(p)
    redis.call('HDEL', PEND, ARGV[4])
    save()
  end
end
return reply('OK', s(bal), s(held))
