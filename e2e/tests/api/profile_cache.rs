//! The profile cache (docs/architecture.md "Profile cache"): a profile is
//! served from Redis until something it shows changes, the credits in it are
//! always live, and an erasure leaves no cached copy behind.

use std::time::Duration;

use common::redis::keys::Keys;
use serde_json::{json, Value};

use crate::helpers::*;

async fn profile(app: &TestApp, id: &str, token: &str) -> Value {
    let r = app.get(&format!("/api/users/{id}/profile"), token).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The cached profile's TTL in seconds (-2: no key).
async fn cached_ttl(app: &TestApp, id: &str) -> i64 {
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let mut conn = app.redis.get().await.unwrap();
    redis::cmd("TTL")
        .arg(keys.profile(id))
        .query_async(&mut *conn)
        .await
        .unwrap()
}

/// Changes the name behind the services' backs: nothing invalidates this.
async fn rename_in_postgres(app: &TestApp, id: &str, name: &str) {
    sqlx::query("update users set name = $2 where id = $1")
        .bind(id)
        .bind(name)
        .execute(&app.pg)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_second_read_is_served_from_the_cache_until_a_worker_commits_for_the_user() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (id, token) = new_user();
    assert_eq!(cached_ttl(&app, &id).await, -2);
    let first = profile(&app, &id, &token).await;
    assert!(first["name"].is_null());
    let ttl = cached_ttl(&app, &id).await;
    assert!((1..=60).contains(&ttl), "cached for 60 s, TTL {ttl}");

    rename_in_postgres(&app, &id, "Ada").await;
    let second = profile(&app, &id, &token).await;
    assert!(second["name"].is_null(), "served from the cache: {second}");
    assert_eq!(second, first);

    // A preferences event for the user: its commit drops the cached profile.
    let r = app
        .client
        .patch(app.url(&format!("/api/users/{id}/preferences")))
        .bearer_auth(&token)
        .json(&json!({"theme": "dark"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let seen = app
        .eventually(Duration::from_secs(10), || async {
            let p = profile(&app, &id, &token).await;
            (p["preferences"] == json!({"theme": "dark"})).then_some(p)
        })
        .await;
    assert_eq!(seen["name"], "Ada", "read from Postgres after the commit");
    assert!(cached_ttl(&app, &id).await > 0, "and cached again");
}

#[tokio::test]
async fn the_balance_in_a_cached_profile_is_live() {
    // No worker: nothing invalidates the cached profile here.
    let app = spawn_app().await;
    let (id, token) = new_user();
    let first = profile(&app, &id, &token).await;
    assert_eq!(first["credits"]["balance"], 100);
    rename_in_postgres(&app, &id, "Ada").await;

    let r = app
        .post(
            &format!("/api/users/{id}/credits/consume"),
            &token,
            &json!({"amount": 7}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let p = profile(&app, &id, &token).await;
    assert!(p["name"].is_null(), "still the cached profile: {p}");
    assert_eq!(p["credits"]["balance"], 93);
    assert_eq!(p["credits"]["held"], 0);
    assert!(cached_ttl(&app, &id).await > 0);
}

#[tokio::test]
async fn an_admin_plan_change_is_shown_at_once() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    assert_eq!(profile(&app, &id, &token).await["plan"], "free");
    let r = app
        .put(
            &format!("/api/admin/users/{id}/plan"),
            &admin_token(),
            &json!({"plan": "pro"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(cached_ttl(&app, &id).await, -2, "the change dropped it");
    assert_eq!(profile(&app, &id, &token).await["plan"], "pro");
}

#[tokio::test]
async fn an_erasure_leaves_no_cached_profile() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    let before = profile(&app, &id, &token).await;
    assert_eq!(before["email"], format!("{id}@example.com"));
    assert!(cached_ttl(&app, &id).await > 0);

    let r = app
        .client
        .delete(app.url(&format!("/api/users/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(cached_ttl(&app, &id).await, -2);
    let after = profile(&app, &id, &admin_token()).await;
    assert!(after["email"].is_null(), "{after}");
    assert_eq!(after["status"], "deleted");
    assert_eq!(after["preferences"], json!({}));
}
