-- Extension API keys (docs/api.md "API keys"). Postgres is the truth; the
-- gateway verifies keys from a Redis record per key hash, rebuilt from here
-- after a Redis data loss. Only the SHA-256 of a key is stored: keys are 32
-- random bytes, so a plain (unsalted, fast) hash cannot be brute-forced, and
-- it lets a presented key be found by equality.
create table api_keys (
    key_id       uuid primary key,
    user_id      text not null references users (id),
    -- The caller's label for the key (a `Label<64>` in the gateway).
    name         text not null check (char_length(name) between 1 and 64),
    -- The key's first characters (`vsk_` + 8), shown in lists.
    prefix       text not null check (char_length(prefix) between 1 and 16),
    key_hash     bytea not null unique check (octet_length(key_hash) = 32),
    scopes       text[] not null check (
        cardinality(scopes) between 1 and 3
        and scopes <@ array['usage:write', 'credits:write', 'read']::text[]
    ),
    created_at   timestamptz not null default now(),
    -- Written at most once per minute per key (docs/api.md "API keys").
    last_used_at timestamptz,
    -- Set on revocation; a revoked key is refused and no longer listed.
    revoked_at   timestamptz
);

-- The user's keys in creation order (the list, the cap, export, erasure).
create index api_keys_user on api_keys (user_id, created_at);
