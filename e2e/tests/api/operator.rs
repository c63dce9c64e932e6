//! `gateway admin grant|plan`, the real binary against the real services: the
//! same ledger, audit and Redis writes as the admin routes, the operator named
//! as the actor, and bad input refused with one clear line, changing nothing.

use std::collections::HashMap;
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

/// Runs the gateway binary with the test app's environment (its database,
/// Redis prefix and AMQP namespace).
async fn gateway(app: &TestApp, args: &[&str]) -> Output {
    gateway_with(&app.vars, args).await
}

async fn gateway_with(vars: &HashMap<String, String>, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_e2e-gateway"))
        .args(args)
        .env_clear()
        .envs(vars)
        .env("RUST_LOG", "warn")
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .await
        .expect("gateway binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A user the gateway has provisioned (100 starting credits).
async fn known_user(app: &TestApp) -> (String, String) {
    let (user, token) = new_user();
    let r = app.get("/api/vscode/user/balance", &token).await;
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["balance"], 100);
    (user, token)
}

async fn balance(app: &TestApp, token: &str) -> i64 {
    let r = app.get("/api/vscode/user/balance", token).await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["balance"]
        .as_i64()
        .unwrap()
}

#[tokio::test]
async fn a_grant_from_the_shell_writes_the_ledger_and_audit_rows_and_is_spendable_at_once() {
    let app = spawn_app().await;
    let (user, token) = known_user(&app).await;

    let out = gateway(
        &app,
        &[
            "admin",
            "grant",
            "--user",
            &user,
            "--amount",
            "250",
            "--reason",
            "ticket 42",
            "--actor",
            "alice",
        ],
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!("granted 250 credits to {user}"))
            && stdout.contains("balance 350"),
        "{stdout}"
    );

    // The ledger row, under the transaction id it printed.
    let (tx_id, amount, after, description): (String, i64, i64, Option<String>) = sqlx::query_as(
        "select id::text, amount, balance_after, description from credit_transactions \
         where user_id = $1 and kind = 'grant' and amount = 250",
    )
    .bind(&user)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!((amount, after), (250, 350));
    assert_eq!(description.as_deref(), Some("ticket 42"));
    assert!(stdout.contains(&format!("transaction {tx_id}")), "{stdout}");

    // The audit row names the operator, under the request id it printed.
    let rows: Vec<(String, String, String, Value)> = sqlx::query_as(
        "select actor, action, request_id, details from audit_log where target = $1",
    )
    .bind(&user)
    .fetch_all(&app.pg)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (actor, action, request_id, details) = &rows[0];
    assert_eq!(
        (actor.as_str(), action.as_str()),
        ("operator:alice", "credits.grant")
    );
    assert_eq!(details["amount"], 250);
    assert_eq!(details["reason"], "ticket 42");
    assert_eq!(details["transaction_id"], tx_id.as_str());
    assert!(
        stdout.contains(&format!(
            "audit: credits.grant by operator:alice, request {request_id}"
        )),
        "{stdout}"
    );

    // Through the API: the balance, the trail, and a spend only the grant covers.
    assert_eq!(balance(&app, &token).await, 350);
    let r = app
        .get(&format!("/api/admin/audit?user_id={user}"), &admin_token())
        .await;
    let trail: Value = r.json().await.unwrap();
    assert_eq!(trail["entries"][0]["actor"], "operator:alice");
    let r = app
        .post(
            &format!("/api/users/{user}/credits/consume"),
            &token,
            &json!({"amount": 300}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["balance"], 50);
}

#[tokio::test]
async fn a_grant_repeated_with_its_idempotency_key_grants_once() {
    let app = spawn_app().await;
    let (user, token) = known_user(&app).await;
    let args = [
        "admin",
        "grant",
        "--user",
        &user,
        "--amount",
        "40",
        "--reason",
        "refund",
        "--idempotency-key",
        "ticket-7",
    ];
    let first = gateway(&app, &args).await;
    assert!(first.status.success(), "{}", text(&first.stderr));
    let again = gateway(&app, &args).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("already granted with this idempotency key"),
        "{}",
        text(&again.stdout)
    );
    let grants: i64 = sqlx::query_scalar(
        "select count(*) from credit_transactions where user_id = $1 and amount = 40",
    )
    .bind(&user)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(grants, 1);
    assert_eq!(balance(&app, &token).await, 140);

    // The same key with another amount is a conflict, and changes nothing.
    let other = gateway(
        &app,
        &[
            "admin",
            "grant",
            "--user",
            &user,
            "--amount",
            "41",
            "--reason",
            "refund",
            "--idempotency-key",
            "ticket-7",
        ],
    )
    .await;
    assert!(!other.status.success());
    assert!(text(&other.stderr).contains("Idempotency-Key was used with another body"));
    assert_eq!(balance(&app, &token).await, 140);
}

#[tokio::test]
async fn a_plan_change_from_the_shell_is_audited_and_its_limits_apply_through_the_api() {
    let app = spawn_app().await;
    let (user, token) = known_user(&app).await;

    let out = gateway(
        &app,
        &[
            "admin", "--actor", "bob", "plan", "--user", &user, "--plan", "pro",
        ],
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!("plan of {user}: free -> pro")),
        "{stdout}"
    );

    let plan: String = sqlx::query_scalar("select plan from users where id = $1")
        .bind(&user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(plan, "pro");
    let (actor, action, details): (String, String, Value) =
        sqlx::query_as("select actor, action, details from audit_log where target = $1")
            .bind(&user)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(
        (actor.as_str(), action.as_str()),
        ("operator:bob", "user.plan")
    );
    assert_eq!(details, json!({"plan": "pro", "previous": "free"}));

    // The running gateway picks it up within its user cache's lifetime (≤ 5 s):
    // the profile shows the plan and the profile class its ×5 limit.
    let pro_limit = (app.settings.rate_limit.classes["profile"].limit * 5).to_string();
    let (a, path, token_ref, want) = (
        &app,
        format!("/api/users/{user}/profile"),
        token.as_str(),
        pro_limit.as_str(),
    );
    let path = path.as_str();
    a.eventually(Duration::from_secs(10), || async move {
        let r = a.get(path, token_ref).await;
        let limit = r
            .headers()
            .get("ratelimit-limit")?
            .to_str()
            .ok()?
            .to_string();
        let body: Value = r.json().await.ok()?;
        (body["plan"] == "pro" && limit == want).then_some(())
    })
    .await;
    // Credits are not touched by a plan change.
    assert_eq!(balance(&app, &token).await, 100);
}

#[tokio::test]
async fn bad_input_exits_non_zero_with_one_clear_line_and_changes_nothing() {
    let app = spawn_app().await;
    let (user, token) = known_user(&app).await;
    let (pg, uid) = (&app.pg, user.as_str());
    let snapshot = || async move {
        let q = "select (select count(*) from users)::text || '/' || \
                 (select count(*) from credit_transactions) || '/' || \
                 (select count(*) from audit_log) || '/' || \
                 (select plan || ':' || credits_balance from users where id = $1)";
        sqlx::query_scalar::<_, String>(q)
            .bind(uid)
            .fetch_one(pg)
            .await
            .unwrap()
    };
    let before = snapshot().await;
    let max = common::settings::MAX_CREDITS.to_string();
    let over = (common::settings::MAX_CREDITS + 1).to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "grant",
                "--user",
                "user_never_seen",
                "--amount",
                "5",
                "--reason",
                "r",
            ],
            "no user user_never_seen",
        ),
        (
            vec!["plan", "--user", "user_never_seen", "--plan", "pro"],
            "no user user_never_seen",
        ),
        (
            vec!["grant", "--user", &user, "--amount", "-5", "--reason", "r"],
            "amount: must be an integer from 1 to 9007199254740991",
        ),
        (
            vec!["grant", "--user", &user, "--amount", "0", "--reason", "r"],
            "amount: must be an integer from 1",
        ),
        (
            vec!["grant", "--user", &user, "--amount", &over, "--reason", "r"],
            "amount: must be an integer from 1",
        ),
        // Valid alone, but the balance would pass 2^53−1: refused by the ledger.
        (
            vec!["grant", "--user", &user, "--amount", &max, "--reason", "r"],
            "amount: the balance would pass",
        ),
        (
            vec!["grant", "--user", &user, "--amount", "5", "--reason", "  "],
            "reason: must be 1 to 500 characters",
        ),
        (
            vec![
                "grant", "--user", "bad id", "--amount", "5", "--reason", "r",
            ],
            "user: must be 1 to 64 of",
        ),
        (
            vec!["plan", "--user", &user, "--plan", "platinum"],
            "plan: unknown plan \"platinum\"; one of enterprise, free, pro, team",
        ),
        (
            vec!["plan", "--user", &user, "--plan", "pro", "--actor", "a:b"],
            "actor: must be 1 to 64 of",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["admin"];
        full.extend(&args);
        let out = gateway(&app, &full).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("gateway admin: ") && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
    }
    assert_eq!(snapshot().await, before);
    assert_eq!(balance(&app, &token).await, 100);
    // Not provisioned by the refusal either.
    let r = app
        .get("/api/admin/audit?user_id=user_never_seen", &admin_token())
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["entries"], json!([]));
}

#[tokio::test]
async fn the_admin_commands_explain_themselves_in_help() {
    // Help needs no configuration and no service.
    let none = HashMap::new();
    let top = text(&gateway_with(&none, &["--help"]).await.stdout);
    assert!(top.contains("admin") && top.contains("serve"), "{top}");
    let admin = text(&gateway_with(&none, &["admin", "--help"]).await.stdout);
    assert!(admin.contains("grant") && admin.contains("plan"), "{admin}");
    assert!(admin.contains("audit"), "{admin}");
    let grant = text(
        &gateway_with(&none, &["admin", "grant", "--help"])
            .await
            .stdout,
    );
    for needle in [
        "--user",
        "--amount",
        "--reason",
        "--idempotency-key",
        "--actor",
        "ledger",
    ] {
        assert!(grant.contains(needle), "{needle}: {grant}");
    }
    let plan = text(
        &gateway_with(&none, &["admin", "plan", "--help"])
            .await
            .stdout,
    );
    for needle in ["--user", "--plan", "5 s", "user.plan"] {
        assert!(plan.contains(needle), "{needle}: {plan}");
    }
}
