-- Analytics read rollups only, so a year of a heavy user costs a few thousand
-- rows, not millions (docs/analytics.md).

-- Freshness of the usage rollup (SPEC §8 `as_of`): when a cell last received
-- an event. The worker sets it on every upsert.
alter table usage_daily add column updated_at timestamptz not null default now();

-- Credits consumed per user, UTC day and attribution, kept by a statement
-- trigger on the ledger in the same transaction as the ledger rows, so it is
-- exact whoever inserts (the settle function, grants, tests, repairs). The
-- ledger is append-only, so inserts are the only change to follow. '' stands
-- for "none" in the key columns (they are part of the primary key).
create table credit_daily (
    user_id    text not null,
    day        date not null,
    model      text not null default '',
    provider   text not null default '',
    feature    text not null default '',
    session_id text not null default '',
    consumed   bigint not null default 0,
    -- created_at of the newest ledger row in the cell (analytics `as_of`).
    updated_at timestamptz not null,
    primary key (user_id, day, model, provider, feature, session_id)
);

create function credit_daily_add() returns trigger
language plpgsql as $$
begin
    -- Sorted, so concurrent inserts take row locks in one order.
    insert into credit_daily as c (user_id, day, model, provider, feature, session_id, consumed, updated_at)
    select user_id, (created_at at time zone 'UTC')::date, coalesce(model, ''), coalesce(provider, ''),
           coalesce(feature, ''), coalesce(session_id, ''), -sum(amount), max(created_at)
    from added where kind = 'consume'
    group by 1, 2, 3, 4, 5, 6
    order by 1, 2, 3, 4, 5, 6
    on conflict (user_id, day, model, provider, feature, session_id) do update
        set consumed = c.consumed + excluded.consumed,
            updated_at = greatest(c.updated_at, excluded.updated_at);
    return null;
end $$;

create trigger credit_daily_add
    after insert on credit_transactions
    referencing new table as added
    for each statement execute function credit_daily_add();

-- Rows written before this migration.
insert into credit_daily (user_id, day, model, provider, feature, session_id, consumed, updated_at)
select user_id, (created_at at time zone 'UTC')::date, coalesce(model, ''), coalesce(provider, ''),
       coalesce(feature, ''), coalesce(session_id, ''), -sum(amount), max(created_at)
from credit_transactions where kind = 'consume'
group by 1, 2, 3, 4, 5, 6;
