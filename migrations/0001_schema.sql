-- The whole schema of SPEC §3. Money is bigint everywhere; event rows are keyed
-- by the event's uuid so a redelivered event is stored once.

create table users (
    id              text primary key check (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    email           text,
    name            text,
    plan            text not null default 'free',
    status          text not null default 'active' check (status in ('active', 'suspended', 'deleted')),
    credits_balance bigint not null default 0,
    preferences     jsonb not null default '{}'::jsonb,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    last_active_at  timestamptz,
    deleted_at      timestamptz
);

create table subscriptions (
    id                   uuid primary key,
    user_id              text not null references users (id),
    plan                 text not null,
    status               text not null default 'active',
    current_period_start timestamptz,
    current_period_end   timestamptz,
    external_id          text,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now()
);
create index subscriptions_user_idx on subscriptions (user_id, created_at desc);

-- Append-only ledger: grant, consume, refund, adjustment. The sum of a user's
-- rows is users.credits_balance.
create table credit_transactions (
    id                uuid primary key,
    user_id           text not null references users (id),
    kind              text not null check (kind in ('grant', 'consume', 'refund', 'adjustment')),
    amount            bigint not null,
    balance_after     bigint not null,
    session_id        text,
    model             text,
    provider          text,
    prompt_tokens     bigint,
    completion_tokens bigint,
    feature           text,
    hold_id           uuid,
    description       text,
    metadata          jsonb,
    created_at        timestamptz not null default now()
);
create index credit_transactions_user_idx on credit_transactions (user_id, created_at);

-- The ledger allows exactly one update: nulling description/metadata on erasure.
create function credit_transactions_append_only() returns trigger
language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        raise exception 'credit_transactions is append-only';
    end if;
    if new.id is distinct from old.id or new.user_id is distinct from old.user_id
       or new.kind is distinct from old.kind or new.amount is distinct from old.amount
       or new.balance_after is distinct from old.balance_after
       or new.created_at is distinct from old.created_at
       or (new.description is not null and new.description is distinct from old.description)
       or (new.metadata is not null and new.metadata is distinct from old.metadata) then
        raise exception 'credit_transactions is append-only (only description/metadata may be nulled)';
    end if;
    return new;
end $$;
create trigger credit_transactions_append_only
    before update or delete on credit_transactions
    for each row execute function credit_transactions_append_only();

-- Open holds live here (not in the ledger) so they survive a Redis loss.
create table credit_holds (
    id             uuid primary key,
    user_id        text not null references users (id),
    amount         bigint not null check (amount > 0),
    status         text not null default 'open' check (status in ('open', 'settled', 'released', 'expired')),
    settled_amount bigint,
    transaction_id uuid,
    session_id     text,
    model          text,
    provider       text,
    metadata       jsonb,
    expires_at     timestamptz not null,
    created_at     timestamptz not null default now(),
    ended_at       timestamptz
);
create index credit_holds_open_idx on credit_holds (user_id) where status = 'open';

create table vscode_sessions (
    id                text primary key,
    user_id           text not null references users (id),
    session_token     text,
    extension_version text not null,
    vscode_version    text,
    platform          text,
    machine_id        text,
    created_at        timestamptz not null default now(),
    last_seen_at      timestamptz not null default now(),
    expires_at        timestamptz not null
);
create index vscode_sessions_user_idx on vscode_sessions (user_id, last_seen_at desc);
create index vscode_sessions_expiry_idx on vscode_sessions (expires_at);

-- Once-only guard for usage events: the partitioned tables' unique keys must
-- hold the partition key, and a resent event without occurred_at gets another.
create table usage_event_ids (
    id      uuid primary key,
    user_id text not null,
    seen_at timestamptz not null default now()
);

create table model_usage (
    id                uuid not null,
    user_id           text not null,
    session_id        text,
    provider          text not null,
    model             text not null,
    prompt_tokens     bigint not null default 0,
    completion_tokens bigint not null default 0,
    latency_ms        bigint,
    success           boolean,
    metadata          jsonb,
    occurred_at       timestamptz not null,
    received_at       timestamptz not null default now(),
    stored_at         timestamptz not null default now(),
    primary key (id, occurred_at)
) partition by range (occurred_at);
create index model_usage_user_time_idx on model_usage (user_id, occurred_at);

create table feature_usage (
    id          uuid not null,
    user_id     text not null,
    session_id  text,
    feature     text not null,
    action      text,
    duration_ms bigint,
    metadata    jsonb,
    occurred_at timestamptz not null,
    received_at timestamptz not null default now(),
    stored_at   timestamptz not null default now(),
    primary key (id, occurred_at)
) partition by range (occurred_at);
create index feature_usage_user_time_idx on feature_usage (user_id, occurred_at);

-- Monthly partitions, made ahead by the worker (and here, for a fresh install).
create function ensure_usage_partitions(p_from date, p_to date) returns integer
language plpgsql as $$
declare
    m date := date_trunc('month', p_from)::date;
    made integer := 0;
    t text;
begin
    while m <= p_to loop
        foreach t in array array['model_usage', 'feature_usage'] loop
            if to_regclass(format('%s_%s', t, to_char(m, 'YYYYMM'))) is null then
                execute format(
                    'create table if not exists %I partition of %I for values from (%L) to (%L)',
                    format('%s_%s', t, to_char(m, 'YYYYMM')), t, m, (m + interval '1 month')::date);
                made := made + 1;
            end if;
        end loop;
        m := (m + interval '1 month')::date;
    end loop;
    return made;
end $$;
select ensure_usage_partitions((now() - interval '13 months')::date, (now() + interval '3 months')::date);

-- Daily rollup maintained by the worker in the same transaction as the raw
-- rows, so analytics over a year read a few hundred rows, not millions.
create table usage_daily (
    user_id           text not null,
    day               date not null,
    kind              text not null check (kind in ('model', 'feature')),
    provider          text not null default '',
    model             text not null default '',
    feature           text not null default '',
    session_id        text not null default '',
    requests          bigint not null default 0,
    prompt_tokens     bigint not null default 0,
    completion_tokens bigint not null default 0,
    primary key (user_id, day, kind, provider, model, feature, session_id)
);

-- Per-user rate-limit overrides (SPEC §5.7), read into Redis by gateways.
create table api_rate_limits (
    user_id     text not null references users (id),
    class       text not null,
    "limit"     bigint not null check ("limit" >= 1),
    window_secs bigint not null check (window_secs >= 1),
    updated_at  timestamptz not null default now(),
    primary key (user_id, class)
);

-- Fixed-window counters used only by check_rate_limit() when Redis is down.
create table rate_limit_windows (
    user_id      text not null,
    class        text not null,
    window_start timestamptz not null,
    count        bigint not null default 0,
    primary key (user_id, class, window_start)
);

create table audit_log (
    id         bigserial primary key,
    at         timestamptz not null default now(),
    actor      text not null,
    action     text not null,
    target     text,
    -- The user an action concerns, for tools that join every table on user_id
    -- (SPEC §3); admin actions target users, so it is the target itself.
    user_id    text generated always as (target) stored,
    request_id text,
    details    jsonb not null default '{}'::jsonb
);
create index audit_log_target_idx on audit_log (target, at desc);
create index audit_log_at_idx on audit_log (at desc);

-- Settles a credit movement into the ledger, once per event id.
--   p_mode 'settle': the gateway already granted it; never refuses (the
--                    balance may dip below zero while events arrive out of order).
--   p_mode 'check':  refuses what the balance cannot cover; the row lock on
--                    users makes concurrent calls serialize, so none overspend.
-- Returns applied (a new row was written), ok (not refused), the balance after.
create function consume_credits_with_session(
    p_event_id uuid,
    p_user_id text,
    p_amount bigint,
    p_mode text default 'check',
    p_session_id text default null,
    p_model text default null,
    p_provider text default null,
    p_prompt_tokens bigint default null,
    p_completion_tokens bigint default null,
    p_feature text default null,
    p_description text default null,
    p_metadata jsonb default null,
    p_hold_id uuid default null
) returns table (applied boolean, ok boolean, balance bigint)
language plpgsql as $$
declare
    v_balance bigint;
begin
    if p_amount is null or p_amount < 0 or p_amount > 9007199254740991 then
        raise exception 'amount out of range: %', p_amount using errcode = '22003';
    end if;
    if p_mode not in ('settle', 'check') then
        raise exception 'unknown mode: %', p_mode using errcode = '22023';
    end if;
    -- The lock first: a concurrent call with the same id waits here, then sees the row.
    select u.credits_balance into v_balance from users u where u.id = p_user_id for update;
    if not found then
        raise exception 'unknown user: %', p_user_id using errcode = 'P0002';
    end if;
    if exists (select 1 from credit_transactions t where t.id = p_event_id) then
        return query select false, true, v_balance;
        return;
    end if;
    if p_mode = 'check' and v_balance < p_amount then
        return query select false, false, v_balance;
        return;
    end if;
    v_balance := v_balance - p_amount;
    -- clock_timestamp(), not now(): taken after the lock, so ordering the ledger
    -- by created_at follows the balance_after chain even for concurrent calls.
    insert into credit_transactions (id, user_id, kind, amount, balance_after, session_id, model,
        provider, prompt_tokens, completion_tokens, feature, hold_id, description, metadata, created_at)
    values (p_event_id, p_user_id, 'consume', -p_amount, v_balance, p_session_id, p_model,
        p_provider, p_prompt_tokens, p_completion_tokens, p_feature, p_hold_id, p_description, p_metadata,
        clock_timestamp());
    update users set credits_balance = v_balance, updated_at = now() where id = p_user_id;
    return query select true, true, v_balance;
end $$;

-- Grants credits once per event id (admin grants, starting credits).
create function grant_credits(
    p_event_id uuid,
    p_user_id text,
    p_amount bigint,
    p_description text default null,
    p_metadata jsonb default null,
    p_kind text default 'grant'
) returns table (applied boolean, balance bigint)
language plpgsql as $$
declare
    v_balance bigint;
begin
    select u.credits_balance into v_balance from users u where u.id = p_user_id for update;
    if not found then
        raise exception 'unknown user: %', p_user_id using errcode = 'P0002';
    end if;
    if exists (select 1 from credit_transactions t where t.id = p_event_id) then
        return query select false, v_balance;
        return;
    end if;
    if p_amount < 1 or v_balance + p_amount > 9007199254740991 then
        raise exception 'grant out of range' using errcode = '22003';
    end if;
    v_balance := v_balance + p_amount;
    insert into credit_transactions (id, user_id, kind, amount, balance_after, description, metadata, created_at)
    values (p_event_id, p_user_id, p_kind, p_amount, v_balance, p_description, p_metadata, clock_timestamp());
    update users set credits_balance = v_balance, updated_at = now() where id = p_user_id;
    return query select true, v_balance;
end $$;

-- The Postgres fallback for rate limits when Redis is unreachable: a fixed
-- window counter (coarser than the Redis GCRA, but shared by every gateway).
create function check_rate_limit(
    p_user_id text,
    p_class text,
    p_limit bigint,
    p_window_secs bigint
) returns table (allowed boolean, remaining bigint, reset_secs bigint)
language plpgsql as $$
declare
    v_start timestamptz := to_timestamp(floor(extract(epoch from clock_timestamp()) / p_window_secs) * p_window_secs);
    v_count bigint;
begin
    insert into rate_limit_windows (user_id, class, window_start, count)
    values (p_user_id, p_class, v_start, 1)
    on conflict (user_id, class, window_start) do update set count = rate_limit_windows.count + 1
    returning count into v_count;
    delete from rate_limit_windows
    where user_id = p_user_id and class = p_class and window_start < v_start - make_interval(secs => p_window_secs);
    return query select v_count <= p_limit,
        greatest(p_limit - v_count, 0),
        ceil(extract(epoch from (v_start + make_interval(secs => p_window_secs) - clock_timestamp())))::bigint;
end $$;

-- Deletes sessions past their expiry; returns how many. Run by the worker on a
-- schedule under an advisory lock.
create function cleanup_expired_sessions() returns integer
language plpgsql as $$
declare
    n integer;
begin
    delete from vscode_sessions where expires_at < now();
    get diagnostics n = row_count;
    return n;
end $$;
