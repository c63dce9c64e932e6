-- The price book (SPEC §5.11; docs/credits.md "Price book"): credits per
-- million prompt, completion and cached tokens per provider and model, the
-- model `*` being the provider's default. Admins edit it (PUT
-- /api/admin/pricing, audited); every gateway keeps a copy in memory and
-- reloads it at most every `pricing.refresh_ms`.
create table price_book (
    provider            text not null check (provider <> ''),
    model               text not null check (model <> ''),
    prompt_per_mtok     bigint not null check (prompt_per_mtok between 0 and 9007199254740991),
    completion_per_mtok bigint not null check (completion_per_mtok between 0 and 9007199254740991),
    cached_per_mtok     bigint not null default 0 check (cached_per_mtok between 0 and 9007199254740991),
    updated_at          timestamptz not null default now(),
    updated_by          text not null,
    primary key (provider, model)
);

-- A charge's receipt: the entry and token counts it was priced by (null for
-- an explicit amount), set by the worker in the transaction that writes the
-- row. Cached tokens are counted beside the prompt and completion ones.
alter table credit_transactions add column price jsonb;
alter table credit_transactions add column cached_tokens bigint;

-- What a usage event would cost by the book when the gateway accepted it
-- (null: no price for its provider); the client's own figure stays in metadata.
alter table model_usage add column credits bigint;
