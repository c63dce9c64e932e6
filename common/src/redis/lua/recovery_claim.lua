-- Claims the completion of the recovery that started at ARGV[1] (no prelude):
-- KEYS[1] the recovery key. 1 if it is still that recovery.
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == 'completing:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'completing:' .. ARGV[1])
  return 1
end
return 0
