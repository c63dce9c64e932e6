-- Whether one more hold may open, the Lua twin of `common::credits::hold_open_decide`:
-- TOO_MANY | INSUFFICIENT | OPEN.
local function hold_limit(open, max, bal, amount)
  if open >= max then return 'TOO_MANY' end
  if bal < amount then return 'INSUFFICIENT' end
  return 'OPEN'
end
