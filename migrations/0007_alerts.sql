-- Spend alerts (SPEC §5.11; docs/credits.md "Spend alerts").
--
-- An owner is a user today (`owner_kind = 'user'`, `owner_id` = users.id);
-- organizations add `owner_kind = 'org'` with the same tables.
--
-- alert_configs: one per owner, the webhook and its signing secret (shown to
-- the owner once, when it is made; the worker needs it in clear to sign).
create table alert_configs (
    owner_kind     text not null check (owner_kind in ('user', 'org')),
    owner_id       text not null,
    webhook_url    text,
    webhook_secret text,
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now(),
    primary key (owner_kind, owner_id),
    check ((webhook_url is null) = (webhook_secret is null))
);

-- The owner's thresholds; the worker reads them once per batch user (the
-- primary key's prefix is the index). `created_at`: a crossing older than
-- the threshold (a batch replayed from the dead-letter queue) raises nothing.
create table alert_thresholds (
    owner_kind text not null,
    owner_id   text not null,
    kind       text not null check (kind in ('balance_below', 'spent_pct')),
    value      bigint not null check (value >= 0),
    created_at timestamptz not null default now(),
    primary key (owner_kind, owner_id, kind, value),
    foreign key (owner_kind, owner_id) references alert_configs on delete cascade
);

-- One row per crossing: the event itself (a transactional outbox, written in
-- the transaction that moved the balance) and its delivery state.
-- `crossing` is what makes it once only: the ledger row that took the balance
-- below the value (balance_below), or the period `YYYY-MM` (spent_pct).
-- `next_attempt_at` is null when nothing is to be sent (no webhook when it
-- was raised, or the webhook removed since); `delivered_at` once a 2xx came
-- back; `failed_at` once the attempts ran out.
create table alerts (
    id              uuid primary key default gen_random_uuid(),
    owner_kind      text not null,
    owner_id        text not null,
    kind            text not null,
    value           bigint not null,
    crossing        text not null,
    balance         bigint not null,
    spent           bigint,
    allowance       bigint,
    transaction_id  uuid,
    at              timestamptz not null default now(),
    attempts        integer not null default 0,
    next_attempt_at timestamptz,
    delivered_at    timestamptz,
    failed_at       timestamptz,
    last_error      text,
    unique (owner_kind, owner_id, kind, value, crossing)
);
create index alerts_owner_at_idx on alerts (owner_kind, owner_id, at desc);
create index alerts_due_idx on alerts (next_attempt_at)
    where next_attempt_at is not null and delivered_at is null and failed_at is null;
