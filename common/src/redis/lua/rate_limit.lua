-- The rate limit of the request's class, decided as the first step of the
-- credit script that serves it (consume, hold open, settle, release), on the
-- user's slot: the arithmetic of `GCRA_LUA` in gateway/src/rate_limit.rs
-- (cost 1; the agreement test in common/tests/credit_model.rs runs both). `key`
-- the GCRA key `{USER}:rl:credits`, `limit` and `window` (seconds) the
-- effective limit; an absent `limit` (a second run of the script within one
-- request, or a caller that decided the limit elsewhere) skips it. Refused:
-- the reply LIMITED, before anything else is read or written. Either way `rl`
-- holds the decision, which `reply` puts before the tag. `now_us` (ARGV after
-- `window`) exists only for the agreement test.
local function rate_limit(key, limit, window, now_us)
  if (not limit) or limit == '' then return nil end
  limit = tonumber(limit)
  window = tonumber(window) * 1000000
  local t = math.floor(window / limit)
  if t < 1 then t = 1 end
  local now = tonumber(now_us or '')
  if not now then now = tonumber(clock[1]) * 1000000 + tonumber(clock[2]) end
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local room = now - tat + window
  if room < 0 then room = 0 end
  local new_tat = tat + t
  local allow_at = new_tat - window
  if t > window then
    rl = {'0', s(math.floor(room / t)), s(tat - now), s(window)}
    return reply('LIMITED')
  end
  if allow_at > now then
    rl = {'0', s(math.floor(room / t)), s(tat - now), s(allow_at - now)}
    return reply('LIMITED')
  end
  redis.call('SET', key, s(new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  rl = {'1', s(math.floor((now - allow_at) / t)), s(new_tat - now), '0'}
  return nil
end
