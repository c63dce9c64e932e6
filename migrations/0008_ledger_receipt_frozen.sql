-- The ledger's append-only rule (0001) extended to every column added since
-- and to the charge's context: a row's receipt (`price`, `cached_tokens`,
-- 0005) is written once by the worker in the transaction that inserts the row
-- (null → value) and never changed after; model, provider, token counts,
-- session, feature and hold are frozen from the insert. Erasure still nulls
-- description and metadata, the one other update allowed.
create or replace function credit_transactions_append_only() returns trigger
language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        raise exception 'credit_transactions is append-only';
    end if;
    if new.id is distinct from old.id or new.user_id is distinct from old.user_id
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
