-- Settles a batch of consumes the gateway already granted (worker, credits
-- queue), set-based: one call per transaction instead of one per consume.
-- The arrays are columns, one element per consume, in arrival order.
--
-- 1. The users' rows are locked in id order: the lock every ledger write takes
--    first, so concurrent workers serialise per user and never deadlock among
--    themselves. A user Postgres does not know refuses the whole call
--    (P0002): refused data, which the worker isolates and dead-letters.
-- 2. One statement, with a snapshot taken after the locks (so every committed
--    ledger row of these users is visible and `not exists` is the once-only
--    check by transaction id), writes the new ledger rows with their
--    balance_after chain (the running sum per user in arrival order), moves
--    each balance once by the sum, and audits each new consume.
--    A transaction id repeated in the call counts once (its first element);
--    amounts of 0 write nothing. Deleted users' rows keep no free text.
-- Returns how many ledger rows are new. The idempotency records of keyed
-- consumes are written by the caller in the same transaction.
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
    p_metadata text[]
) returns bigint
language plpgsql as $$
declare
    v_users text[];
    v_locked integer;
    v_new bigint;
begin
    select coalesce(array_agg(distinct u order by u), '{}') into v_users from unnest(p_user_ids) u;
    select count(*) into v_locked
    from (select id from users where id = any(v_users) order by id for update) l;
    if v_locked <> cardinality(v_users) then
        raise exception 'unknown user among %', v_users using errcode = 'P0002';
    end if;
    with input as (
        select distinct on (i.id) i.*
        from unnest(p_ids, p_event_ids, p_user_ids, p_amounts, p_session_ids, p_models,
                    p_providers, p_prompt_tokens, p_completion_tokens, p_features, p_descriptions, p_metadata)
          with ordinality as i(id, event_id, user_id, amount, session_id, model, provider,
                               prompt_tokens, completion_tokens, feature, description, metadata, ord)
        where i.amount > 0
        order by i.id, i.ord
    ),
    fresh as (
        select i.*, u.credits_balance, u.status,
               row_number() over w as n, sum(i.amount) over w as running
        from input i join users u on u.id = i.user_id
        where not exists (select 1 from credit_transactions t where t.id = i.id)
        window w as (partition by i.user_id order by i.ord)
    ),
    at as (select clock_timestamp() as ts),
    ins as (
        insert into credit_transactions (id, user_id, kind, amount, balance_after, session_id,
            model, provider, prompt_tokens, completion_tokens, feature, description, metadata, created_at)
        select f.id, f.user_id, 'consume', -f.amount, f.credits_balance - f.running, f.session_id,
            f.model, f.provider, f.prompt_tokens, f.completion_tokens, f.feature,
            case when f.status = 'deleted' then null else f.description end,
            case when f.status = 'deleted' then null else f.metadata::jsonb end,
            at.ts + f.n * interval '1 microsecond'
        from fresh f, at
        returning user_id, amount
    ),
    moved as (
        update users u set credits_balance = u.credits_balance + s.total, updated_at = now()
        from (select user_id, sum(amount) as total from ins group by user_id) s
        where u.id = s.user_id
    ),
    audited as (
        insert into audit_log (actor, action, target, request_id, details)
        select f.user_id, 'credits.consume', f.user_id, f.event_id::text,
               jsonb_build_object('amount', f.amount, 'transaction_id', f.id)
        from fresh f
    )
    select count(*) into v_new from ins;
    return v_new;
end $$;
