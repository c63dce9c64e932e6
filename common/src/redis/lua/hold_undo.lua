-- After a failed publish of a hold open: KEYS[5] idempotency record; ARGV[3]
-- body hash, ARGV[4] hold id, ARGV[5] '1' to remove the hold (its event surely
-- never reached the broker), ARGV[6] '1' to delete the record (see
-- `idem_undo`). Replies LOST | OK bal held.
if lost() then return reply('LOST') end
if ARGV[3] ~= '' then idem_undo(KEYS[5], ARGV[3], ARGV[4], ARGV[6]) end
if ARGV[5] == '1' and load() then
  local raw = redis.call('HGET', HOLDS, ARGV[4])
  if raw then
    local h = cjson.decode(raw)
    redis.call('HDEL', HOLDS, ARGV[4])
    held = held - h.amount
    bal = bal + h.amount
    save()
  end
end
return reply('OK', s(bal), s(held))
