//! The SQL functions of docs/reliability.md on a real database: credit settlement in both
//! modes under concurrency, idempotent grants, the Postgres rate-limit
//! fallback, session cleanup, and the append-only ledger.

use std::sync::Arc;

use sqlx::PgPool;
use testkit::TestDb;
use tokio::sync::Barrier;
use uuid::Uuid;

const MAX_CREDITS: i64 = (1 << 53) - 1;

/// A user whose balance came from one `grant` ledger row, as provisioning does.
async fn user_with(pool: &PgPool, balance: i64) -> String {
    let id = format!("user_{}", Uuid::new_v4().simple());
    sqlx::query("insert into users (id) values ($1)")
        .bind(&id)
        .execute(pool)
        .await
        .unwrap();
    if balance > 0 {
        grant(pool, Uuid::new_v4(), &id, balance).await.unwrap();
    }
    id
}

/// `grant_credits`: (applied, balance).
async fn grant(
    pool: &PgPool,
    event: Uuid,
    user: &str,
    amount: i64,
) -> Result<(bool, i64), sqlx::Error> {
    sqlx::query_as("select applied, balance from grant_credits($1, $2, $3)")
        .bind(event)
        .bind(user)
        .bind(amount)
        .fetch_one(pool)
        .await
}

/// `consume_credits_with_session`: (applied, ok, balance).
async fn consume<'e, E>(
    db: E,
    event: Uuid,
    user: &str,
    amount: i64,
    mode: &str,
) -> Result<(bool, bool, i64), sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    sqlx::query_as(
        "select applied, ok, balance from consume_credits_with_session($1, $2, $3, $4, p_model => 'gpt', p_provider => 'openai')",
    )
    .bind(event)
    .bind(user)
    .bind(amount)
    .bind(mode)
    .fetch_one(db)
    .await
}

async fn balance(pool: &PgPool, user: &str) -> i64 {
    sqlx::query_scalar("select credits_balance from users where id = $1")
        .bind(user)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `users.credits_balance` is the sum of the ledger, and every row's
/// `balance_after` is the running sum up to it, in ledger order.
async fn assert_ledger_consistent(pool: &PgPool, user: &str) {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "select amount, balance_after from credit_transactions where user_id = $1 order by created_at, id",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut running = 0;
    for (i, (amount, after)) in rows.iter().enumerate() {
        running += amount;
        assert_eq!(
            *after, running,
            "balance_after of ledger row {i} in {rows:?}"
        );
    }
    assert_eq!(
        balance(pool, user).await,
        running,
        "users.credits_balance = sum of the ledger"
    );
}

fn sql_state(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Runs `n` checked consumes of `amount` at once, each on its own connection.
async fn race_consumes(
    db: &TestDb,
    user: &str,
    n: usize,
    amount: i64,
    same_event: Option<Uuid>,
) -> Vec<(bool, bool, i64)> {
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut conn = db.connect().await;
        let (barrier, user) = (barrier.clone(), user.to_string());
        let event = same_event.unwrap_or_else(Uuid::new_v4);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            consume(&mut conn, event, &user, amount, "check")
                .await
                .unwrap()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn concurrent_checked_consumes_never_overspend_and_apply_exactly_floor_of_balance_over_amount(
) {
    let db = TestDb::migrated().await;
    let pool = db.pool(4).await;
    let user = user_with(&pool, 95).await;
    let results = race_consumes(&db, &user, 20, 10, None).await;
    let applied = results.iter().filter(|r| r.0).count();
    assert_eq!(applied, 9, "floor(95 / 10)");
    assert!(
        results.iter().all(|&(applied, ok, _)| applied == ok),
        "a refusal applies nothing"
    );
    assert!(
        results.iter().all(|r| r.2 >= 0),
        "never below zero: {results:?}"
    );
    assert_eq!(balance(&pool, &user).await, 5);
    assert_ledger_consistent(&pool, &user).await;
}

#[tokio::test]
async fn two_concurrent_checked_consumes_of_60_from_100_apply_exactly_one() {
    let db = TestDb::migrated().await;
    let pool = db.pool(4).await;
    let user = user_with(&pool, 100).await;
    let results = race_consumes(&db, &user, 2, 60, None).await;
    assert_eq!(results.iter().filter(|r| r.0).count(), 1, "{results:?}");
    assert_eq!(
        results.iter().filter(|r| !r.1).count(),
        1,
        "the other is refused"
    );
    assert_eq!(balance(&pool, &user).await, 40);
    assert_ledger_consistent(&pool, &user).await;
}

#[tokio::test]
async fn the_same_event_id_is_applied_once_even_when_sent_concurrently() {
    let db = TestDb::migrated().await;
    let pool = db.pool(4).await;
    let user = user_with(&pool, 100).await;

    let event = Uuid::new_v4();
    assert_eq!(
        consume(&pool, event, &user, 30, "check").await.unwrap(),
        (true, true, 70)
    );
    assert_eq!(
        consume(&pool, event, &user, 30, "check").await.unwrap(),
        (false, true, 70)
    );
    assert_eq!(
        consume(&pool, event, &user, 30, "settle").await.unwrap(),
        (false, true, 70)
    );

    let event = Uuid::new_v4();
    let results = race_consumes(&db, &user, 10, 5, Some(event)).await;
    assert_eq!(results.iter().filter(|r| r.0).count(), 1, "{results:?}");
    assert!(results.iter().all(|r| r.1), "a duplicate is not a refusal");
    assert_eq!(balance(&pool, &user).await, 65);
    let rows: i64 = sqlx::query_scalar("select count(*) from credit_transactions where id = $1")
        .bind(event)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    assert_ledger_consistent(&pool, &user).await;
}

#[tokio::test]
async fn a_checked_consume_the_balance_cannot_cover_is_refused_and_writes_nothing() {
    let db = TestDb::migrated().await;
    let pool = db.pool(2).await;
    let user = user_with(&pool, 10).await;
    assert_eq!(
        consume(&pool, Uuid::new_v4(), &user, 11, "check")
            .await
            .unwrap(),
        (false, false, 10)
    );
    assert_eq!(
        consume(&pool, Uuid::new_v4(), &user, 10, "check")
            .await
            .unwrap(),
        (true, true, 0)
    );
    assert_eq!(
        consume(&pool, Uuid::new_v4(), &user, 1, "check")
            .await
            .unwrap(),
        (false, false, 0)
    );
    let rows: i64 =
        sqlx::query_scalar("select count(*) from credit_transactions where user_id = $1")
            .bind(&user)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, 2, "the grant and one consume");
    assert_ledger_consistent(&pool, &user).await;
}

#[tokio::test]
async fn settle_mode_never_refuses_and_may_take_the_balance_below_zero() {
    let db = TestDb::migrated().await;
    let pool = db.pool(2).await;
    let user = user_with(&pool, 100).await;
    assert_eq!(
        consume(&pool, Uuid::new_v4(), &user, 150, "settle")
            .await
            .unwrap(),
        (true, true, -50)
    );
    assert_eq!(
        consume(&pool, Uuid::new_v4(), &user, 0, "settle")
            .await
            .unwrap(),
        (true, true, -50)
    );
    // A later grant (an out-of-order event) brings it back.
    grant(&pool, Uuid::new_v4(), &user, 80).await.unwrap();
    assert_eq!(balance(&pool, &user).await, 30);
    let (kind, amount, after, model): (String, i64, i64, Option<String>) = sqlx::query_as(
        "select kind, amount, balance_after, model from credit_transactions \
         where user_id = $1 and kind = 'consume' order by created_at limit 1",
    )
    .bind(&user)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (kind.as_str(), amount, after, model.as_deref()),
        ("consume", -150, -50, Some("gpt"))
    );
    assert_ledger_consistent(&pool, &user).await;
}

#[tokio::test]
async fn out_of_range_amounts_unknown_modes_and_unknown_users_are_errors() {
    let db = TestDb::migrated().await;
    let pool = db.pool(2).await;
    let user = user_with(&pool, 100).await;
    for (amount, mode, code) in [
        (-1, "check", "22003"),
        (MAX_CREDITS + 1, "settle", "22003"),
        (1, "steal", "22023"),
    ] {
        let e = consume(&pool, Uuid::new_v4(), &user, amount, mode)
            .await
            .unwrap_err();
        assert_eq!(sql_state(&e).as_deref(), Some(code), "{amount} {mode}: {e}");
    }
    let e = consume(&pool, Uuid::new_v4(), "nobody", 1, "settle")
        .await
        .unwrap_err();
    assert_eq!(sql_state(&e).as_deref(), Some("P0002"));
    assert_eq!(balance(&pool, &user).await, 100);
    assert_ledger_consistent(&pool, &user).await;
}

#[tokio::test]
async fn grant_credits_applies_an_event_id_once_and_keeps_balances_below_2_pow_53() {
    let db = TestDb::migrated().await;
    let pool = db.pool(2).await;
    let user = user_with(&pool, 0).await;
    let event = Uuid::new_v4();
    assert_eq!(grant(&pool, event, &user, 100).await.unwrap(), (true, 100));
    assert_eq!(grant(&pool, event, &user, 100).await.unwrap(), (false, 100));
    assert_eq!(
        grant(&pool, event, &user, 999).await.unwrap(),
        (false, 100),
        "the id decides, not the amount"
    );

    for amount in [0, -5, MAX_CREDITS - 99] {
        let e = grant(&pool, Uuid::new_v4(), &user, amount)
            .await
            .unwrap_err();
        assert_eq!(sql_state(&e).as_deref(), Some("22003"), "{amount}");
    }
    assert_eq!(
        grant(&pool, Uuid::new_v4(), &user, MAX_CREDITS - 100)
            .await
            .unwrap(),
        (true, MAX_CREDITS)
    );
    assert_ledger_consistent(&pool, &user).await;
}

#[tokio::test]
async fn check_rate_limit_allows_the_limit_per_window_then_refuses() {
    let db = TestDb::migrated().await;
    let pool = db.pool(2).await;
    // A window far longer than the test, so no boundary falls inside it.
    let window = 1_000_000_000i64;
    let check = |user: &'static str, class: &'static str| {
        let pool = pool.clone();
        async move {
            let (allowed, remaining, _reset): (bool, i64, i64) = sqlx::query_as(
                "select allowed, remaining, reset_secs from check_rate_limit($1, $2, 3, $3)",
            )
            .bind(user)
            .bind(class)
            .bind(window)
            .fetch_one(&pool)
            .await
            .unwrap();
            (allowed, remaining)
        }
    };
    assert_eq!(check("u1", "usage").await, (true, 2));
    assert_eq!(check("u1", "usage").await, (true, 1));
    assert_eq!(check("u1", "usage").await, (true, 0));
    assert_eq!(check("u1", "usage").await, (false, 0));
    assert_eq!(check("u1", "usage").await, (false, 0));
    // Other users and other classes have their own windows.
    assert_eq!(check("u2", "usage").await, (true, 2));
    assert_eq!(check("u1", "session").await, (true, 2));
}

#[tokio::test]
async fn check_rate_limit_is_exact_under_concurrency() {
    let db = TestDb::migrated().await;
    let n = 12;
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut conn = db.connect().await;
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let allowed: bool = sqlx::query_scalar(
                "select allowed from check_rate_limit('u1', 'usage', 5, 1000000000)",
            )
            .fetch_one(&mut conn)
            .await
            .unwrap();
            allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.unwrap());
    }
    assert_eq!(allowed, 5);
}

#[tokio::test]
async fn cleanup_expired_sessions_deletes_only_expired_rows_and_returns_the_count() {
    let db = TestDb::migrated().await;
    let pool = db.pool(2).await;
    let user = user_with(&pool, 0).await;
    sqlx::query(
        "insert into vscode_sessions (id, user_id, extension_version, expires_at) values \
         ('old-1', $1, '1.0.0', now() - interval '1 day'), \
         ('old-2', $1, '1.0.0', now() - interval '1 second'), \
         ('live-1', $1, '1.0.0', now() + interval '1 hour'), \
         ('live-2', $1, '1.0.0', now() + interval '1 day')",
    )
    .bind(&user)
    .execute(&pool)
    .await
    .unwrap();
    let n: i32 = sqlx::query_scalar("select cleanup_expired_sessions()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let left: Vec<String> = sqlx::query_scalar("select id from vscode_sessions order by id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, vec!["live-1", "live-2"]);
    let n: i32 = sqlx::query_scalar("select cleanup_expired_sessions()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn the_ledger_is_append_only_except_for_nulling_description_and_metadata() {
    let db = TestDb::migrated().await;
    let pool = db.pool(2).await;
    let user = user_with(&pool, 100).await;
    let event = Uuid::new_v4();
    sqlx::query(
        "select * from consume_credits_with_session($1, $2, 10, 'settle', \
         p_description => 'chat', p_metadata => '{\"file\": \"secret.rs\"}')",
    )
    .bind(event)
    .bind(&user)
    .execute(&pool)
    .await
    .unwrap();

    for update in [
        "update credit_transactions set amount = -1 where id = $1",
        "update credit_transactions set balance_after = 1000 where id = $1",
        "update credit_transactions set kind = 'refund' where id = $1",
        "update credit_transactions set user_id = user_id || 'x' where id = $1",
        "update credit_transactions set metadata = '{\"file\": \"other.rs\"}' where id = $1",
        "update credit_transactions set description = 'rewritten' where id = $1",
        "update credit_transactions set model = 'other' where id = $1",
        "update credit_transactions set prompt_tokens = 1 where id = $1",
        "delete from credit_transactions where id = $1",
    ] {
        let r = sqlx::query(update).bind(event).execute(&pool).await;
        assert!(r.is_err(), "{update} should raise");
    }
    let r = sqlx::query("delete from credit_transactions where user_id = $1")
        .bind(&user)
        .execute(&pool)
        .await;
    assert!(r.is_err(), "no ledger row may be deleted");

    // Erasure (docs/api.md "Privacy"): the only update the ledger allows.
    sqlx::query(
        "update credit_transactions set metadata = null, description = null where user_id = $1",
    )
    .bind(&user)
    .execute(&pool)
    .await
    .expect("nulling metadata and description is allowed");
    let (metadata, description, amount): (Option<serde_json::Value>, Option<String>, i64) =
        sqlx::query_as(
            "select metadata, description, amount from credit_transactions where id = $1",
        )
        .bind(event)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((metadata, description, amount), (None, None, -10));

    // The receipt (0005): set once from null, as the worker does, then frozen.
    sqlx::query("update credit_transactions set price = '{\"model\": \"m\"}', cached_tokens = 3 where id = $1")
        .bind(event)
        .execute(&pool)
        .await
        .expect("a receipt may be written once");
    for update in [
        "update credit_transactions set price = '{\"model\": \"cheaper\"}' where id = $1",
        "update credit_transactions set price = null where id = $1",
        "update credit_transactions set cached_tokens = 0 where id = $1",
    ] {
        let r = sqlx::query(update).bind(event).execute(&pool).await;
        assert!(r.is_err(), "{update} should raise");
    }
    assert_ledger_consistent(&pool, &user).await;
}

/// One consume for `settle_consumes`: (transaction id, event id, user, amount, description, metadata).
type Settle<'a> = (Uuid, Uuid, &'a str, i64, Option<&'a str>, Option<&'a str>);

/// (id, balance_after, description, metadata, model) of a ledger row.
type LedgerRow = (
    Uuid,
    i64,
    Option<String>,
    Option<serde_json::Value>,
    Option<String>,
);

/// `settle_consumes` with its arrays built from the consumes; the other
/// context columns carry a model and a provider, as the gateway's do.
async fn settle_consumes(pool: &PgPool, rows: &[Settle<'_>]) -> Result<i64, sqlx::Error> {
    let n = rows.len();
    sqlx::query_scalar("select settle_consumes($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)")
        .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.2).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.3).collect::<Vec<_>>())
        .bind(vec![Some("sess"); n])
        .bind(vec![Some("gpt"); n])
        .bind(vec![Some("openai"); n])
        .bind(vec![Some(3_i64); n])
        .bind(vec![None::<i64>; n])
        .bind(vec![None::<&str>; n])
        .bind(rows.iter().map(|r| r.4).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.5).collect::<Vec<_>>())
        .fetch_one(pool)
        .await
}

#[tokio::test]
async fn settle_consumes_writes_each_transaction_once_with_its_balance_after_chain_and_audit_row() {
    let db = TestDb::migrated().await;
    let pool = db.pool(2).await;
    let a = user_with(&pool, 100).await;
    let b = user_with(&pool, 10).await;
    let (t1, t2, t3, t4) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let rows = [
        (
            t1,
            Uuid::new_v4(),
            a.as_str(),
            30,
            Some("first"),
            Some(r#"{"k": 1}"#),
        ),
        (t2, Uuid::new_v4(), b.as_str(), 25, None, None),
        (t3, Uuid::new_v4(), a.as_str(), 50, None, None),
        // The same transaction id again in the call: counts once.
        (t1, Uuid::new_v4(), a.as_str(), 30, Some("resend"), None),
        // Zero writes nothing.
        (t4, Uuid::new_v4(), a.as_str(), 0, None, None),
    ];
    assert_eq!(settle_consumes(&pool, &rows).await.unwrap(), 3);
    // Settle mode: a granted consume is charged even below zero.
    assert_eq!(
        (balance(&pool, &a).await, balance(&pool, &b).await),
        (20, -15)
    );
    assert_ledger_consistent(&pool, &a).await;
    assert_ledger_consistent(&pool, &b).await;
    let after: Vec<LedgerRow> = sqlx::query_as(
        "select id, balance_after, description, metadata, model from credit_transactions \
         where user_id = $1 and kind = 'consume' order by created_at",
    )
    .bind(&a)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(after.len(), 2);
    assert_eq!(
        (after[0].0, after[0].1, after[0].2.as_deref()),
        (t1, 70, Some("first"))
    );
    assert_eq!(after[0].3, Some(serde_json::json!({"k": 1})));
    assert_eq!(
        (after[1].0, after[1].1, after[1].4.as_deref()),
        (t3, 20, Some("gpt"))
    );
    let audited: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "select target, details from audit_log where action = 'credits.consume' order by id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        audited.len(),
        3,
        "one audit row per new consume: {audited:?}"
    );
    assert!(audited
        .iter()
        .any(|(t, d)| t == &a && d["transaction_id"] == t3.to_string() && d["amount"] == 50));

    // Redelivered: nothing new, nothing moves.
    assert_eq!(settle_consumes(&pool, &rows).await.unwrap(), 0);
    assert_eq!(
        (balance(&pool, &a).await, balance(&pool, &b).await),
        (20, -15)
    );
    let (n,): (i64,) =
        sqlx::query_as("select count(*) from audit_log where action = 'credits.consume'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn settle_consumes_refuses_an_unknown_user_and_keeps_no_text_of_a_deleted_one() {
    let db = TestDb::migrated().await;
    let pool = db.pool(2).await;
    let a = user_with(&pool, 100).await;
    let ghost = "user_nobody";
    let e = settle_consumes(
        &pool,
        &[
            (Uuid::new_v4(), Uuid::new_v4(), a.as_str(), 5, None, None),
            (Uuid::new_v4(), Uuid::new_v4(), ghost, 5, None, None),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(sql_state(&e).as_deref(), Some("P0002"));
    assert_eq!(
        balance(&pool, &a).await,
        100,
        "a refused call writes nothing"
    );

    sqlx::query("update users set status = 'deleted' where id = $1")
        .bind(&a)
        .execute(&pool)
        .await
        .unwrap();
    let t = Uuid::new_v4();
    let rows = [(
        t,
        Uuid::new_v4(),
        a.as_str(),
        5,
        Some("words"),
        Some(r#"{"k": 1}"#),
    )];
    assert_eq!(settle_consumes(&pool, &rows).await.unwrap(), 1);
    let (description, metadata, model): (
        Option<String>,
        Option<serde_json::Value>,
        Option<String>,
    ) = sqlx::query_as(
        "select description, metadata, model from credit_transactions where id = $1",
    )
    .bind(t)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (description, metadata, model.as_deref()),
        (None, None, Some("gpt"))
    );
    assert_eq!(balance(&pool, &a).await, 95);
}

#[tokio::test]
async fn concurrent_settle_consumes_of_the_same_users_never_deadlock_and_charge_once() {
    let db = TestDb::migrated().await;
    let pool = db.pool(8).await;
    let a = user_with(&pool, 1000).await;
    let b = user_with(&pool, 1000).await;
    let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (pool, a, b, ids) = (pool.clone(), a.clone(), b.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            // Users in opposite orders on alternate calls; every call carries every id.
            let (x, y) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            let rows: Vec<Settle<'_>> = ids
                .iter()
                .enumerate()
                .map(|(k, id)| {
                    (
                        *id,
                        *id,
                        if k % 2 == 0 { x.as_str() } else { y.as_str() },
                        10,
                        None,
                        None,
                    )
                })
                .collect();
            settle_consumes(&pool, &rows).await.unwrap()
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    // Each id lands with the user of the call that wrote it first; 8 rows in all.
    assert_eq!(total, 8);
    assert_eq!(
        balance(&pool, &a).await + balance(&pool, &b).await,
        2000 - 80
    );
    assert_ledger_consistent(&pool, &a).await;
    assert_ledger_consistent(&pool, &b).await;
}
