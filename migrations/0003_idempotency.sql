-- Durable idempotency records (SPEC §5.5, docs/credits.md "Idempotency"):
-- the 200 answer of a keyed consume or hold open, written by the worker in
-- the same transaction as the ledger row (or hold row) it answers for, so a
-- record exists exactly when its movement does. When the gateway loads a user
-- into Redis (first use, or the rebuild after a Redis loss) it restores the
-- user's unexpired records, so a retry after a loss replays instead of
-- charging again. Expired rows are deleted by the worker's housekeeping.
create table idempotency_records (
    user_id        text not null references users (id),
    route          text not null,
    key            text not null,
    body_hash      text not null,
    answer         jsonb not null,
    transaction_id uuid not null,
    created_at     timestamptz not null default now(),
    expires_at     timestamptz not null,
    primary key (user_id, route, key)
);
create index idempotency_records_expires_idx on idempotency_records (expires_at);
