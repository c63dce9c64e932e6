-- Loads ONE user with :rows usage events spread over the last 365 days, the
-- matching usage_daily rollup, and one ledger consume per model event.
-- Used by scripts/bench-analytics.sh; run on a scratch database:
--   psql -v user=bench_user -v rows=1000000 -f scripts/bench-analytics.sql
\set ON_ERROR_STOP on
\timing on

select ensure_usage_partitions((now() - interval '366 days')::date, now()::date);

insert into users (id, email, name, plan, status, credits_balance)
values (:'user', 'bench@example.com', 'Bench', 'enterprise', 'active', 0)
on conflict (id) do nothing;

-- 70 % model events (6 models of 3 providers), 30 % feature events (5
-- features); about 4 sessions a day; times spread evenly over 365 days.
create temp table gen as
select g as n,
       now() - (g::float8 / :rows) * interval '365 days' as occurred_at,
       (g % 10) < 7 as is_model,
       (array['openai','openai','anthropic','anthropic','google','google'])[1 + g % 6] as provider,
       (array['gpt-4o','gpt-4o-mini','claude-3-5-sonnet','claude-3-haiku','gemini-1.5-pro','gemini-1.5-flash'])[1 + g % 6] as model,
       (array['chat','edit','explain','tests','review'])[1 + g % 5] as feature,
       100 + g % 900 as prompt_tokens,
       10 + g % 190 as completion_tokens,
       1 + g % 5 as credits
from generate_series(1, :rows) g;

with s as (
  select *, 'sess_' || to_char(occurred_at, 'YYYYMMDD') || '_' || (n % 4) as session_id from gen
)
insert into model_usage (id, user_id, session_id, provider, model, prompt_tokens, completion_tokens,
                         latency_ms, success, metadata, occurred_at, received_at, stored_at)
select gen_random_uuid(), :'user', session_id, provider, model, prompt_tokens, completion_tokens,
       400, true, '{"file": "main.rs"}', occurred_at, occurred_at, occurred_at
from s where is_model;

with s as (
  select *, 'sess_' || to_char(occurred_at, 'YYYYMMDD') || '_' || (n % 4) as session_id from gen
)
insert into feature_usage (id, user_id, session_id, feature, action, duration_ms, metadata,
                           occurred_at, received_at, stored_at)
select gen_random_uuid(), :'user', session_id, feature, 'run', 1200, '{"file": "main.rs"}',
       occurred_at, occurred_at, occurred_at
from s where not is_model;

-- The rollup exactly as the worker keeps it, derived from the raw rows.
insert into usage_daily (user_id, day, kind, provider, model, feature, session_id,
                         requests, prompt_tokens, completion_tokens, updated_at)
select user_id, (occurred_at at time zone 'UTC')::date, 'model', provider, model, '', coalesce(session_id, ''),
       count(*), sum(prompt_tokens), sum(completion_tokens), max(stored_at)
from model_usage where user_id = :'user' group by 1, 2, 4, 5, 7
union all
select user_id, (occurred_at at time zone 'UTC')::date, 'feature', '', '', feature, coalesce(session_id, ''),
       count(*), 0, 0, max(stored_at)
from feature_usage where user_id = :'user' group by 1, 2, 6, 7;

-- The ledger: a grant, then one consume per model event, balances running.
insert into credit_transactions (id, user_id, kind, amount, balance_after, description, created_at)
values (gen_random_uuid(), :'user', 'grant', 1000000000, 1000000000, 'bench grant', now() - interval '366 days');
insert into credit_transactions (id, user_id, kind, amount, balance_after, session_id, model, provider,
                                 prompt_tokens, completion_tokens, created_at)
select gen_random_uuid(), :'user', 'consume', -credits,
       1000000000 - sum(credits) over (order by occurred_at, n),
       'sess_' || to_char(occurred_at, 'YYYYMMDD') || '_' || (n % 4), model, provider,
       prompt_tokens, completion_tokens, occurred_at
from gen where is_model;
update users set credits_balance = (select sum(amount) from credit_transactions where user_id = :'user')
where id = :'user';

analyze model_usage; analyze feature_usage; analyze usage_daily; analyze credit_transactions;

select (select count(*) from model_usage where user_id = :'user') as model_rows,
       (select count(*) from feature_usage where user_id = :'user') as feature_rows,
       (select count(*) from usage_daily where user_id = :'user') as rollup_rows,
       (select count(*) from credit_transactions where user_id = :'user') as ledger_rows;
