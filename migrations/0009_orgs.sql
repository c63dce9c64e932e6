-- Organizations with a shared credit pool (SPEC 5.11, docs/credits.md "Organizations").
--
-- An organization owns a balance: orgs.credits_balance = Σ of the ledger rows
-- with its org_id, as users.credits_balance = Σ of the user's rows without
-- one. A member's consume or settle is one ledger row with both user_id (the
-- member) and org_id; a grant to the pool has org_id and no user.
create table orgs (
    id              text primary key,
    name            text not null,
    plan            text not null check (plan in ('team', 'enterprise')),
    credits_balance bigint not null default 0,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);

-- A user belongs to at most one organization (user_id unique). A cap bounds
-- what the member may spend from the pool per period (a calendar month, UTC).
create table org_members (
    org_id     text not null references orgs (id),
    user_id    text not null unique references users (id),
    role       text not null check (role in ('member', 'admin')),
    cap_amount bigint check (cap_amount between 1 and 9007199254740991),
    cap_period text check (cap_period = 'month'),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (org_id, user_id),
    check ((cap_amount is null) = (cap_period is null))
);

alter table credit_transactions add column org_id text references orgs (id);
alter table credit_transactions alter column user_id drop not null;
alter table credit_transactions add constraint credit_transactions_owner
    check (user_id is not null or org_id is not null);
create index credit_transactions_org_idx on credit_transactions (org_id, created_at)
    where org_id is not null;

alter table credit_holds add column org_id text references orgs (id);
create index credit_holds_org_open_idx on credit_holds (org_id) where status = 'open' and org_id is not null;

-- org_id is frozen like every other column of a ledger row (0001, 0008).
create or replace function credit_transactions_append_only() returns trigger
language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        raise exception 'credit_transactions is append-only';
    end if;
    if new.id is distinct from old.id or new.user_id is distinct from old.user_id
       or new.org_id is distinct from old.org_id
       or new.kind is distinct from old.kind or new.amount is distinct from old.amount
       or new.balance_after is distinct from old.balance_after
       or new.created_at is distinct from old.created_at
       or new.session_id is distinct from old.session_id
       or new.model is distinct from old.model or new.provider is distinct from old.provider
       or new.prompt_tokens is distinct from old.prompt_tokens
       or new.completion_tokens is distinct from old.completion_tokens
       or new.feature is distinct from old.feature or new.hold_id is distinct from old.hold_id
       or (old.price is not null and new.price is distinct from old.price)
       or (old.cached_tokens is not null and new.cached_tokens is distinct from old.cached_tokens)
       or (new.description is not null and new.description is distinct from old.description)
       or (new.metadata is not null and new.metadata is distinct from old.metadata) then
        raise exception 'credit_transactions is append-only (only description/metadata may be nulled, a receipt set once)';
    end if;
    return new;
end $$;

-- Settles a batch of consumes as settle_consumes (0004) does, where a consume
-- with an org_id draws from its organization's pool: its ledger row carries
-- user_id (the member) and org_id, its balance_after is the pool's, and
-- orgs.credits_balance moves instead of the member's balance. Users are
-- locked in id order and then organizations in id order (every pool write
-- takes its organization's row lock after the users'), so concurrent workers
-- never deadlock. An unknown user or organization refuses the call (P0002).
create function settle_consumes(
    p_ids uuid[],
    p_event_ids uuid[],
    p_user_ids text[],
    p_amounts bigint[],
    p_session_ids text[],
    p_models text[],
    p_providers text[],
    p_prompt_tokens bigint[],
    p_completion_tokens bigint[],
    p_features text[],
    p_descriptions text[],
    p_metadata text[],
    p_org_ids text[]
) returns bigint
language plpgsql as $$
declare
    v_users text[];
    v_orgs text[];
    v_locked integer;
    v_new bigint;
begin
    select coalesce(array_agg(distinct u order by u), '{}') into v_users from unnest(p_user_ids) u;
    select count(*) into v_locked
    from (select id from users where id = any(v_users) order by id for update) l;
    if v_locked <> cardinality(v_users) then
        raise exception 'unknown user among %', v_users using errcode = 'P0002';
    end if;
    select coalesce(array_agg(distinct o order by o), '{}') into v_orgs
    from unnest(p_org_ids) o where o is not null;
    select count(*) into v_locked
    from (select id from orgs where id = any(v_orgs) order by id for update) l;
    if v_locked <> cardinality(v_orgs) then
        raise exception 'unknown organization among %', v_orgs using errcode = 'P0002';
    end if;
    with input as (
        select distinct on (i.id) i.*
        from unnest(p_ids, p_event_ids, p_user_ids, p_amounts, p_session_ids, p_models,
                    p_providers, p_prompt_tokens, p_completion_tokens, p_features, p_descriptions,
                    p_metadata, p_org_ids)
          with ordinality as i(id, event_id, user_id, amount, session_id, model, provider,
                               prompt_tokens, completion_tokens, feature, description, metadata,
                               org_id, ord)
        where i.amount > 0
        order by i.id, i.ord
    ),
    fresh as (
        select i.*, coalesce(o.credits_balance, u.credits_balance) as credits_balance, u.status,
               row_number() over w as n, sum(i.amount) over w as running
        from input i join users u on u.id = i.user_id left join orgs o on o.id = i.org_id
        where not exists (select 1 from credit_transactions t where t.id = i.id)
        window w as (partition by coalesce('org:' || i.org_id, i.user_id) order by i.ord)
    ),
    at as (select clock_timestamp() as ts),
    ins as (
        insert into credit_transactions (id, user_id, org_id, kind, amount, balance_after, session_id,
            model, provider, prompt_tokens, completion_tokens, feature, description, metadata, created_at)
        select f.id, f.user_id, f.org_id, 'consume', -f.amount, f.credits_balance - f.running, f.session_id,
            f.model, f.provider, f.prompt_tokens, f.completion_tokens, f.feature,
            case when f.status = 'deleted' then null else f.description end,
            case when f.status = 'deleted' then null else f.metadata::jsonb end,
            at.ts + f.n * interval '1 microsecond'
        from fresh f, at
        returning user_id, org_id, amount
    ),
    moved as (
        update users u set credits_balance = u.credits_balance + s.total, updated_at = now()
        from (select user_id, sum(amount) as total from ins where org_id is null group by user_id) s
        where u.id = s.user_id
    ),
    pooled as (
        update orgs o set credits_balance = o.credits_balance + s.total, updated_at = now()
        from (select org_id, sum(amount) as total from ins where org_id is not null group by org_id) s
        where o.id = s.org_id
    ),
    audited as (
        insert into audit_log (actor, action, target, request_id, details)
        select f.user_id, 'credits.consume', f.user_id, f.event_id::text,
               jsonb_build_object('amount', f.amount, 'transaction_id', f.id)
                 || case when f.org_id is null then '{}'::jsonb else jsonb_build_object('org_id', f.org_id) end
        from fresh f
    )
    select count(*) into v_new from ins;
    return v_new;
end $$;

-- The twelve-argument form (0004) is the thirteen-argument one without organizations.
create or replace function settle_consumes(
    p_ids uuid[],
    p_event_ids uuid[],
    p_user_ids text[],
    p_amounts bigint[],
    p_session_ids text[],
    p_models text[],
    p_providers text[],
    p_prompt_tokens bigint[],
    p_completion_tokens bigint[],
    p_features text[],
    p_descriptions text[],
    p_metadata text[]
) returns bigint
language sql as $$
    select settle_consumes(p_ids, p_event_ids, p_user_ids, p_amounts, p_session_ids, p_models,
        p_providers, p_prompt_tokens, p_completion_tokens, p_features, p_descriptions, p_metadata,
        array_fill(null::text, array[coalesce(cardinality(p_ids), 0)]));
$$;

-- Grants to an organization's pool once per event id: a ledger row with its
-- org_id and no user (admin grants; the audit row is the caller's).
create function grant_org_credits(
    p_event_id uuid,
    p_org_id text,
    p_amount bigint,
    p_description text,
    p_metadata jsonb
) returns table (applied boolean, balance bigint)
language plpgsql as $$
declare
    v_balance bigint;
begin
    select o.credits_balance into v_balance from orgs o where o.id = p_org_id for update;
    if not found then
        raise exception 'unknown organization %', p_org_id using errcode = 'P0002';
    end if;
    if exists (select 1 from credit_transactions t where t.id = p_event_id) then
        return query select false, v_balance;
        return;
    end if;
    if p_amount < 1 or v_balance + p_amount > 9007199254740991 then
        raise exception 'grant out of range' using errcode = '22003';
    end if;
    v_balance := v_balance + p_amount;
    insert into credit_transactions (id, user_id, org_id, kind, amount, balance_after, description, metadata, created_at)
    values (p_event_id, null, p_org_id, 'grant', p_amount, v_balance, p_description, p_metadata, clock_timestamp());
    update orgs set credits_balance = v_balance, updated_at = now() where id = p_org_id;
    return query select true, v_balance;
end $$;

-- Settles one granted amount of an organization member (a hold's settle):
-- consume_credits_with_session's 'settle' mode on the pool. The member's row
-- is locked first, then the organization's (the order settle_consumes takes),
-- and the ledger row carries both. Returns applied (a new row was written).
create function settle_member_charge(
    p_event_id uuid,
    p_user_id text,
    p_org_id text,
    p_amount bigint,
    p_session_id text,
    p_model text,
    p_provider text,
    p_prompt_tokens bigint,
    p_completion_tokens bigint,
    p_feature text,
    p_description text,
    p_metadata jsonb,
    p_hold_id uuid
) returns boolean
language plpgsql as $$
declare
    v_status text;
    v_balance bigint;
begin
    if p_amount is null or p_amount < 0 or p_amount > 9007199254740991 then
        raise exception 'amount out of range: %', p_amount using errcode = '22003';
    end if;
    select u.status into v_status from users u where u.id = p_user_id for update;
    if not found then
        raise exception 'unknown user: %', p_user_id using errcode = 'P0002';
    end if;
    select o.credits_balance into v_balance from orgs o where o.id = p_org_id for update;
    if not found then
        raise exception 'unknown organization: %', p_org_id using errcode = 'P0002';
    end if;
    if exists (select 1 from credit_transactions t where t.id = p_event_id) then
        return false;
    end if;
    v_balance := v_balance - p_amount;
    insert into credit_transactions (id, user_id, org_id, kind, amount, balance_after, session_id, model,
        provider, prompt_tokens, completion_tokens, feature, hold_id, description, metadata, created_at)
    values (p_event_id, p_user_id, p_org_id, 'consume', -p_amount, v_balance, p_session_id, p_model,
        p_provider, p_prompt_tokens, p_completion_tokens, p_feature, p_hold_id,
        case when v_status = 'deleted' then null else p_description end,
        case when v_status = 'deleted' then null else p_metadata end,
        clock_timestamp());
    update orgs set credits_balance = v_balance, updated_at = now() where id = p_org_id;
    return true;
end $$;
