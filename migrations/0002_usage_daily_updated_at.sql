-- Freshness of the rollup (SPEC §8 `as_of`): when a cell last received an
-- event. Analytics report the newest such time in their window without
-- touching the raw usage partitions.
alter table usage_daily add column updated_at timestamptz not null default now();
