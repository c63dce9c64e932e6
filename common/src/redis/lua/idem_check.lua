-- The idempotency decision, the Lua twin of `common::credits::idem_decide` (an agreement test
-- runs both): FRESH | CONFLICT | REPLAY ans | BUSY | STALE id. Needs `now`
-- (ms); a record is a hash `h`, `st` (run|done), `ans` (when done), `tx` and
-- `t` (the id in use and its start, when run).
local function idem_check(key, hash, window)
  local rec = redis.call('HMGET', key, 'h', 'st', 'ans', 'tx', 't')
  if not rec[1] then return 'FRESH' end
  if rec[1] ~= hash then return 'CONFLICT' end
  if rec[2] == 'done' then return 'REPLAY', rec[3] end
  local t = tonumber(rec[5] or '')
  if (not t) or (not rec[4]) or now - t < tonumber(window) then return 'BUSY' end
  return 'STALE', rec[4]
end
