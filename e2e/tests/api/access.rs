//! Authorization after authentication (docs/api.md "Conventions"): users
//! reach only their own `/api/users/:id/...` and admins anyone (BOLA), roles,
//! provisioning of unseen users, and suspended or deleted accounts. The JWT
//! checks themselves are in `auth.rs`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::auth::assert_problem;
use crate::helpers::*;

fn fresh_id() -> String {
    format!("user_{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn users_reach_only_their_own_profile_and_admins_reach_anyone() {
    let app = spawn_app().await;
    let (a, token_a) = new_user();
    let (b, token_b) = new_user();
    assert_eq!(
        app.get(&format!("/api/users/{b}/profile"), &token_b)
            .await
            .status(),
        200
    );

    let r = app.get(&format!("/api/users/{b}/profile"), &token_a).await;
    let body = assert_problem(r, 403, "forbidden").await;
    assert!(
        !body.to_string().contains(&format!("{b}@example.com")),
        "no data of B leaks"
    );
    let r = app
        .client
        .patch(app.url(&format!("/api/users/{b}/preferences")))
        .bearer_auth(&token_a)
        .json(&json!({"theme": "dark"}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;

    let r = app.get(&format!("/api/users/{a}/profile"), &token_a).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["user_id"], a.as_str());

    let r = app
        .get(&format!("/api/users/{b}/profile"), &admin_token())
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["user_id"], b.as_str());
    assert_eq!(body["email"], format!("{b}@example.com"));
}

#[tokio::test]
async fn a_role_claim_other_than_admin_grants_nothing() {
    let app = spawn_app().await;
    let (b, _) = new_user();
    for role in [
        json!("Admin"),
        json!(["admin"]),
        json!({"admin": true}),
        json!("user"),
    ] {
        let token = hs_token(&json!({"sub": fresh_id(), "exp": now() + 60, "role": role}));
        let r = app.get(&format!("/api/users/{b}/profile"), &token).await;
        assert_problem(r, 403, "forbidden").await;
    }
}

#[tokio::test]
async fn an_admin_naming_an_unseen_user_provisions_it() {
    let app = spawn_app().await;
    let id = fresh_id();
    let r = app
        .get(&format!("/api/users/{id}/profile"), &admin_token())
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["user_id"], id.as_str());
    assert_eq!(body["plan"], "free");
    assert_eq!(body["credits"]["balance"], 100);
    let n = app
        .count(&format!("select count(*) from users where id = '{id}'"))
        .await;
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_suspended_user_gets_403_account_suspended() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    sqlx::query("insert into users (id, status) values ($1, 'suspended')")
        .bind(&id)
        .execute(&app.pg)
        .await
        .unwrap();
    let r = app.get(&format!("/api/users/{id}/profile"), &token).await;
    assert_problem(r, 403, "account_suspended").await;
}

#[tokio::test]
async fn suspending_a_known_user_applies_within_5_s() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    assert_eq!(
        app.get(&format!("/api/users/{id}/profile"), &token)
            .await
            .status(),
        200
    );
    sqlx::query("update users set status = 'suspended' where id = $1")
        .bind(&id)
        .execute(&app.pg)
        .await
        .unwrap();
    // What an admin route does after its Postgres write: drop the shared cache.
    let keys = common::redis::keys::Keys::new(&app.settings.redis.key_prefix);
    let mut conn = app.redis.get().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(keys.user_info(&id))
        .query_async(&mut *conn)
        .await
        .unwrap();
    let path = format!("/api/users/{id}/profile");
    let r = app
        .eventually(Duration::from_secs(5), || async {
            let r = app.get(&path, &token).await;
            (r.status() == 403).then_some(r)
        })
        .await;
    assert_problem(r, 403, "account_suspended").await;
}

#[tokio::test]
async fn a_deleted_user_gets_403_account_deleted() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    sqlx::query("insert into users (id, status) values ($1, 'deleted')")
        .bind(&id)
        .execute(&app.pg)
        .await
        .unwrap();
    let r = app.get(&format!("/api/users/{id}/profile"), &token).await;
    assert_problem(r, 403, "account_deleted").await;
    let r = app
        .client
        .patch(app.url(&format!("/api/users/{id}/preferences")))
        .bearer_auth(&token)
        .json(&json!({"theme": "dark"}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "account_deleted").await;
}

#[tokio::test]
async fn dev_tokens_are_refused_unless_enabled() {
    let app = spawn_app_with(|v| {
        v.remove("AUTH_DEV_TOKENS");
    })
    .await;
    assert_problem(
        app.get("/api/users/user_1/profile", "dev:user_1").await,
        401,
        "unauthorized",
    )
    .await;
    assert_problem(
        app.get("/api/users/user_1/profile", "dev:user_1:admin")
            .await,
        401,
        "unauthorized",
    )
    .await;
    let n = app.count("select count(*) from users").await;
    assert_eq!(n, 0, "a refused token provisions nobody");
}

#[tokio::test]
async fn dev_tokens_act_as_the_user_and_as_an_admin_when_enabled() {
    let app = spawn_app().await;
    let id = fresh_id();
    let other = fresh_id();
    let r = app
        .get(&format!("/api/users/{id}/profile"), &format!("dev:{id}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["user_id"], id.as_str());
    let r = app
        .get(&format!("/api/users/{other}/profile"), &format!("dev:{id}"))
        .await;
    assert_problem(r, 403, "forbidden").await;
    let r = app
        .get(&format!("/api/users/{id}/profile"), "dev:ops_1:admin")
        .await;
    assert_eq!(r.status(), 200);
    for bad in ["dev:", "dev:a b", "dev:x:root", "dev:x:admin:admin"] {
        assert_problem(
            app.get(&format!("/api/users/{id}/profile"), bad).await,
            401,
            "unauthorized",
        )
        .await;
    }
}

#[tokio::test]
async fn a_new_sub_is_provisioned_on_first_call_with_the_free_plan_and_100_credits() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    let r = app.get(&format!("/api/users/{id}/profile"), &token).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["plan"], "free");
    assert_eq!(body["status"], "active");
    assert_eq!(body["credits"]["balance"], 100);

    let (plan, status, balance): (String, String, i64) =
        sqlx::query_as("select plan, status, credits_balance from users where id = $1")
            .bind(&id)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(
        (plan.as_str(), status.as_str(), balance),
        ("free", "active", 100)
    );
    // A second call provisions nothing more.
    assert_eq!(
        app.get(&format!("/api/users/{id}/profile"), &token)
            .await
            .status(),
        200
    );
    let ledger: Vec<(String, i64, i64)> = sqlx::query_as(
        "select kind, amount, balance_after from credit_transactions where user_id = $1",
    )
    .bind(&id)
    .fetch_all(&app.pg)
    .await
    .unwrap();
    assert_eq!(ledger, vec![("grant".to_string(), 100, 100)]);
}
