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
