-- The keyed-request steps every keyed script shares (after idem_check.lua).
-- Returns (early reply or nil, the id to use, whether it is a recorded one).
-- A STALE record (its request started longer ago than the in-progress
-- window and never finished) is answered STALE unless `may_reuse` is '1':
-- the gateway first looks for the durable record in Postgres.
local function idem_begin(key, hash, window, id, may_reuse)
  if hash == '' then return nil, id, false end
  local d, v = idem_check(key, hash, window)
  if d == 'CONFLICT' or d == 'BUSY' then return reply(d), id, false end
  if d == 'REPLAY' then return reply('REPLAY', v), id, false end
  if d == 'STALE' then
    if may_reuse ~= '1' and may_reuse ~= '2' then return reply('STALE', v), id, false end
    return nil, v, true
  end
  return nil, id, false
end
-- In progress: the id in use and the start, kept as long as the answer
-- would be, so a retry never gets a new id while the first may still land.
-- Only a FRESH key or a STALE 'run' record gets here (idem_begin), and a
-- 'run' record has no other field, so the HSET replaces it whole.
local function idem_run(key, hash, id, ttl)
  redis.call('HSET', key, 'h', hash, 'st', 'run', 'tx', id, 't', s(now))
  redis.call('PEXPIRE', key, ttl)
end
local function idem_done(key, hash, ans, ttl)
  redis.call('DEL', key)
  redis.call('HSET', key, 'h', hash, 'st', 'done', 'ans', ans)
  redis.call('PEXPIRE', key, ttl)
end
-- After a failed publish: `forget` '1' (the id surely never reached the
-- broker and was fresh) deletes the record; otherwise it stays with its id,
-- marked stale so the next retry reuses the id at once.
local function idem_undo(key, hash, id, forget)
  local rec = redis.call('HMGET', key, 'h', 'st', 'tx')
  if rec[1] ~= hash or rec[2] ~= 'run' or rec[3] ~= id then return end
  if forget == '1' then redis.call('DEL', key) else redis.call('HSET', key, 't', '0') end
end
-- Stores durable records as `done` (idem_restore, idem_adopt): KEYS[5..] record
-- keys, ARGV[3..] per key body hash, answer, expiry (epoch ms); a key Redis
-- holds, or an expired record, is skipped. Returns how many were stored.
local function idem_put_records()
  local n = 0
  for i = 5, #KEYS do
    local j = 3 + (i - 5) * 3
    if redis.call('EXISTS', KEYS[i]) == 0 and tonumber(ARGV[j + 2]) > now then
      redis.call('HSET', KEYS[i], 'h', ARGV[j], 'st', 'done', 'ans', ARGV[j + 1])
      redis.call('PEXPIREAT', KEYS[i], ARGV[j + 2])
      n = n + 1
    end
  end
  return n
end
