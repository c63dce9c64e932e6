-- Copies a user's durable idempotency records (Postgres) as `done` onto the
-- account the user spends from after a membership change (docs/credits.md
-- "Organizations"), so a retry of a request answered on the other account
-- replays there instead of charging again: KEYS[5..] record keys; ARGV[3..]
-- per key body hash, answer, expiry (epoch ms). A key Redis holds already is
-- left as it is. Replies LOST | OK copied.
if lost() then return reply('LOST') end
return reply('OK', s(idem_put_records()))
