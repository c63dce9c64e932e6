//! SPEC 5.11 (organizations) against the real gateway, worker and services:
//! members of one organization spend its pool at once, through two gateways,
//! never past the pool or their caps, and the pool = Σ its ledger rows = the
//! API; the routes and who may call them; a membership change reaches a second
//! gateway within 5 s; a pool Redis no longer holds, or after a Redis data
//! loss, is rebuilt from Postgres with its caps' spend, its holds and its
//! members' idempotency records; export and erasure; the pool's analytics.

use std::time::{Duration, Instant};

use common::redis::keys::Keys;
use serde_json::{json, Value};

use crate::credits::{api_balance, read};
use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(5);
const SECS: Duration = Duration::from_secs(1);

fn org_id() -> String {
    format!("org_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn put(app: &TestApp, path: &str, token: &str, body: Value) -> (u16, Value) {
    let (status, answer, _) = read(app.put(path, token, &body).await).await;
    (status, answer)
}

async fn create_org(app: &TestApp, org: &str) {
    let (s, v) = put(
        app,
        &format!("/api/admin/orgs/{org}"),
        &admin_token(),
        json!({"name": "Acme", "plan": "team"}),
    )
    .await;
    assert_eq!((s, &v["created"]), (200, &json!(true)), "{v}");
}

async fn grant_pool(app: &TestApp, org: &str, amount: i64) -> Value {
    let (s, v, _) = read(
        app.post(
            &format!("/api/admin/orgs/{org}/credits/grant"),
            &admin_token(),
            &json!({"amount": amount, "reason": "team top-up"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn add_member(
    app: &TestApp,
    org: &str,
    user: &str,
    token: &str,
    body: Value,
) -> (u16, Value) {
    put(app, &format!("/api/orgs/{org}/members/{user}"), token, body).await
}

async fn consume(
    app_addr: std::net::SocketAddr,
    client: &reqwest::Client,
    user: &str,
    token: &str,
    amount: i64,
) -> (u16, Value) {
    let r = client
        .post(format!(
            "http://{app_addr}/api/users/{user}/credits/consume"
        ))
        .bearer_auth(token)
        .json(&json!({"amount": amount}))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `orgs.credits_balance`, Σ of the ledger rows with the organization, their count.
async fn pool_ledger(app: &TestApp, org: &str) -> (i64, i64, i64) {
    let bal: i64 = sqlx::query_scalar("select credits_balance from orgs where id = $1")
        .bind(org)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    let (sum, rows): (i64, i64) = sqlx::query_as(
        "select coalesce(sum(amount), 0)::int8, count(*) from credit_transactions where org_id = $1",
    )
    .bind(org)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    (bal, sum, rows)
}

/// A user's own balance and Σ of their ledger rows without an organization.
async fn own_ledger(app: &TestApp, user: &str) -> (i64, i64) {
    sqlx::query_as(
        "select u.credits_balance, \
                (select coalesce(sum(amount), 0)::int8 from credit_transactions t \
                 where t.user_id = u.id and t.org_id is null) \
         from users u where u.id = $1",
    )
    .bind(user)
    .fetch_one(&app.pg)
    .await
    .unwrap()
}

async fn read_pool(app: &TestApp, org: &str, token: &str) -> (u16, Value) {
    let r = app.get(&format!("/api/orgs/{org}"), token).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn members_consume_at_once_never_past_the_pool_or_their_caps() {
    let app = spawn_app().await;
    let twin = spawn_twin(&app).await;
    app.start_worker().await;
    let org = org_id();
    create_org(&app, &org).await;
    assert_eq!(grant_pool(&app, &org, 1000).await["balance"], 1000);
    // Eight members: four capped at 60 a month, four without a cap. Each asks
    // for 40 × 5 = 200 at once: the caps hold the capped ones to 60 each, and
    // the uncapped ones ask for 800 of the 1000 − 240 = 760 left.
    let members: Vec<(String, String)> = (0..8).map(|_| new_user()).collect();
    for (i, (user, _)) in members.iter().enumerate() {
        let body = if i < 4 {
            json!({"role": "member", "cap": {"amount": 60, "period": "month"}})
        } else {
            json!({"role": "member"})
        };
        let (s, v) = add_member(&app, &org, user, &admin_token(), body).await;
        assert_eq!(s, 200, "{v}");
    }
    let mut tasks = Vec::new();
    for (i, (user, token)) in members.iter().enumerate() {
        for j in 0..40 {
            let gw = if (i + j) % 2 == 0 {
                app.addr
            } else {
                twin.addr
            };
            let (client, user, token) = (app.client.clone(), user.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let (s, v) = consume(gw, &client, &user, &token, 5).await;
                (i, s, v)
            }));
        }
    }
    let mut spent = [0i64; 8];
    let mut refused = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let (i, s, v) = t.await.unwrap();
        match s {
            200 => spent[i] += 5,
            402 => {
                let limit = v["limit"].as_str().unwrap_or("none").to_string();
                assert!(limit == "pool" || limit == "member_cap", "{v}");
                if limit == "member_cap" {
                    assert!(i < 4, "an uncapped member refused by a cap: {v}");
                }
                *refused.entry(limit).or_default() += 1;
            }
            other => panic!("consume answered {other}: {v}"),
        }
    }
    let total: i64 = spent.iter().sum();
    for (i, s) in spent.iter().enumerate().take(4) {
        assert!(*s <= 60, "member {i} spent {s} past a cap of 60");
    }
    assert!(total <= 1000, "the pool was overspent: {total}");
    assert_eq!(
        total, 1000,
        "demand was 1200, so the pool ends empty: {spent:?}"
    );
    // Settled: the pool = Σ its ledger rows = the API; the members' own balances untouched.
    app.eventually(20 * SECS, || async {
        let (bal, sum, rows) = pool_ledger(&app, &org).await;
        (bal == 0 && sum == 0 && rows == 1 + 200).then_some(())
    })
    .await;
    let (s, pool) = read_pool(&app, &org, &admin_token()).await;
    assert_eq!(s, 200, "{pool}");
    assert_eq!(pool["balance"], 0, "{pool}");
    let by_member: i64 = pool["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["spent"].as_i64().unwrap())
        .sum();
    assert_eq!(by_member, 1000, "{pool}");
    for (user, token) in &members {
        assert_eq!(
            own_ledger(&app, user).await,
            (100, 100),
            "{user}'s own balance moved"
        );
        assert_eq!(api_balance(&app, token).await["balance"], 0);
    }
    // The organization's analytics add up with the ledger; members may not read them.
    let r = app
        .get(&format!("/api/orgs/{org}/analytics?days=7"), &admin_token())
        .await;
    assert_eq!(r.status(), 200);
    let a: Value = r.json().await.unwrap();
    assert_eq!(
        (&a["credits"], &a["charges"], &a["granted"]),
        (&json!(1000), &json!(200), &json!(1000)),
        "{a}"
    );
    let per_member: Vec<i64> = a["by_member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["credits"].as_i64().unwrap())
        .collect();
    assert_eq!(
        (per_member.len(), per_member.iter().sum::<i64>()),
        (8, 1000),
        "{a}"
    );
    let per_day: i64 = a["by_day"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["credits"].as_i64().unwrap())
        .sum();
    assert_eq!(per_day, 1000, "{a}");
    let r = app
        .get(&format!("/api/orgs/{org}/analytics"), &members[0].1)
        .await;
    assert_eq!(r.status(), 403);
    println!(
        "pool: 8 members × 40 consumes of 5 at once through two gateways: spent {spent:?} = 1000 of 1000, \
         caps of 60 held, refused {refused:?}; pool = ledger = API = 0; overspend 0"
    );
}

#[tokio::test]
async fn holds_of_members_count_against_their_caps_and_settle_into_the_pool() {
    let app = spawn_app().await;
    app.start_worker().await;
    let org = org_id();
    create_org(&app, &org).await;
    grant_pool(&app, &org, 500).await;
    let (user, token) = new_user();
    let body = json!({"role": "member", "cap": {"amount": 100, "period": "month"}});
    assert_eq!(
        add_member(&app, &org, &user, &admin_token(), body).await.0,
        200
    );
    let holds = format!("/api/users/{user}/credits/holds");
    let (s, hold, _) = read(app.post(&holds, &token, &json!({"amount": 80})).await).await;
    assert_eq!(s, 200, "{hold}");
    assert_eq!(hold["balance"], 20, "what the member may spend now: {hold}");
    // 80 held + 30 > the cap of 100.
    let (s, v, _) = read(app.post(&holds, &token, &json!({"amount": 30})).await).await;
    assert_eq!((s, v["limit"].as_str()), (402, Some("member_cap")), "{v}");
    let settle = format!("{holds}/{}/settle", hold["hold_id"].as_str().unwrap());
    let (s, v, _) = read(app.post(&settle, &token, &json!({"amount": 50})).await).await;
    assert_eq!(s, 200, "{v}");
    // 50 spent of 100: a consume of 50 fits, one more credit does not.
    let (s, v) = consume(app.addr, &app.client, &user, &token, 50).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = consume(app.addr, &app.client, &user, &token, 1).await;
    assert_eq!((s, v["limit"].as_str()), (402, Some("member_cap")), "{v}");
    app.eventually(20 * SECS, || async {
        let (bal, sum, _) = pool_ledger(&app, &org).await;
        (bal == 400 && sum == 400).then_some(())
    })
    .await;
    let hold_org: Option<String> =
        sqlx::query_scalar("select org_id from credit_holds where user_id = $1")
            .bind(&user)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(hold_org.as_deref(), Some(org.as_str()));
    let (s, pool) = read_pool(&app, &org, &admin_token()).await;
    assert_eq!(s, 200);
    assert_eq!(pool["members"][0]["spent"], 100, "{pool}");
    assert_eq!(own_ledger(&app, &user).await, (100, 100));
}

#[tokio::test]
async fn who_may_manage_an_organization_and_what_its_routes_refuse() {
    let app = spawn_app().await;
    app.start_worker().await;
    let org = org_id();
    let (stranger, stranger_token) = new_user();
    // Only admins create organizations; the same PUT again updates.
    let (s, _) = put(
        &app,
        &format!("/api/admin/orgs/{org}"),
        &stranger_token,
        json!({"name": "X", "plan": "team"}),
    )
    .await;
    assert_eq!(s, 403);
    create_org(&app, &org).await;
    let (s, v) = put(
        &app,
        &format!("/api/admin/orgs/{org}"),
        &admin_token(),
        json!({"name": "Acme Inc", "plan": "enterprise"}),
    )
    .await;
    assert_eq!(
        (s, &v["plan"], &v["created"]),
        (200, &json!("enterprise"), &json!(false)),
        "{v}"
    );
    for bad in [
        json!({"name": "A", "plan": "free"}),
        json!({"name": "", "plan": "team"}),
        json!({"name": "A\u{0}", "plan": "team"}),
    ] {
        let (s, v) = put(
            &app,
            &format!("/api/admin/orgs/{org}"),
            &admin_token(),
            bad.clone(),
        )
        .await;
        assert_eq!(s, 422, "{bad}: {v}");
    }
    // An organization admin manages members; a member or a stranger may not, nor read the pool.
    let (boss, boss_token) = new_user();
    let (s, _) = add_member(&app, &org, &boss, &admin_token(), json!({"role": "admin"})).await;
    assert_eq!(s, 200);
    let (member, member_token) = new_user();
    // Signed in once, so the account exists for the organization's admin to add.
    api_balance(&app, &member_token).await;
    let (s, v) = add_member(
        &app,
        &org,
        &member,
        &boss_token,
        json!({"role": "member", "cap": {"amount": 10, "period": "month"}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["cap"], json!({"amount": 10, "period": "month"}));
    let (s, _) = add_member(
        &app,
        &org,
        &stranger,
        &member_token,
        json!({"role": "member"}),
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(read_pool(&app, &org, &member_token).await.0, 403);
    assert_eq!(read_pool(&app, &org, &stranger_token).await.0, 403);
    assert_eq!(read_pool(&app, &org, &boss_token).await.0, 200);
    assert_eq!(read_pool(&app, "org_nope", &admin_token()).await.0, 404);
    // An organization's admin cannot create accounts: a user never seen is 404, nothing written.
    let (ghost, _) = new_user();
    let (s, _) = add_member(&app, &org, &ghost, &boss_token, json!({"role": "member"})).await;
    assert_eq!(s, 404);
    let ghosts: i64 = sqlx::query_scalar("select count(*) from users where id = $1")
        .bind(&ghost)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(ghosts, 0);
    for bad in [
        json!({"role": "member", "cap": {"amount": 9_223_372_036_854_775_808u64, "period": "month"}}),
        json!({"role": "member", "cap": {"amount": 9_007_199_254_740_992u64, "period": "month"}}),
        json!({"role": "member", "cap": {"amount": 5.0, "period": "month"}}),
        json!({"role": "owner"}),
        json!({"role": "member", "cap": {"amount": 0, "period": "month"}}),
        json!({"role": "member", "cap": {"amount": 5, "period": "week"}}),
    ] {
        let (s, v) = add_member(&app, &org, &stranger, &boss_token, bad.clone()).await;
        assert_eq!(s, 422, "{bad}: {v}");
    }
    // A user belongs to at most one organization.
    let other = org_id();
    create_org(&app, &other).await;
    let (s, v) = add_member(
        &app,
        &other,
        &member,
        &admin_token(),
        json!({"role": "member"}),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("user_id")), "{v}");
    // A pool grant replays under its key and is one ledger row.
    let path = format!("/api/admin/orgs/{org}/credits/grant");
    let body = json!({"amount": 40, "reason": "seed"});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = app
            .client
            .post(app.url(&path))
            .bearer_auth(admin_token())
            .header("Idempotency-Key", "grant-1")
            .json(&body)
            .send()
            .await
            .unwrap();
        let (s, v, _) = read(r).await;
        assert_eq!(s, 200, "{v}");
        ids.push(v["transaction_id"].clone());
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(pool_ledger(&app, &org).await, (40, 40, 1));
    let audited: i64 = sqlx::query_scalar(
        "select count(*) from audit_log where action in ('org.put', 'org.member.set', 'org.credits.grant')",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(
        audited,
        3 + 2 + 1,
        "org.put ×3, org.member.set ×2, org.credits.grant ×1"
    );
    // Removed, the member spends their own balance again.
    let r = app
        .client
        .delete(app.url(&format!("/api/orgs/{org}/members/{member}")))
        .bearer_auth(&boss_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, v) = consume(app.addr, &app.client, &member, &member_token, 30).await;
    assert_eq!((s, &v["balance"]), (200, &json!(70)), "{v}");
}

#[tokio::test]
async fn a_membership_change_reaches_a_second_gateway_within_5_s() {
    let app = spawn_app().await;
    let twin = spawn_twin(&app).await;
    app.start_worker().await;
    let org = org_id();
    create_org(&app, &org).await;
    grant_pool(&app, &org, 1000).await;
    let (user, token) = new_user();
    // The twin has read the user's (lack of) membership already.
    let (s, v) = consume(twin.addr, &twin.client, &user, &token, 1).await;
    assert_eq!((s, &v["balance"]), (200, &json!(99)), "{v}");
    let (s, _) = add_member(&app, &org, &user, &admin_token(), json!({"role": "member"})).await;
    assert_eq!(s, 200);
    let joined = Instant::now();
    loop {
        let (s, v) = consume(twin.addr, &twin.client, &user, &token, 1).await;
        assert_eq!(s, 200, "{v}");
        if v["balance"].as_i64().unwrap() > 500 {
            break;
        }
        assert!(
            joined.elapsed() < WITHIN,
            "the twin still spends the user's own balance"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = joined.elapsed();
    let r = app
        .client
        .delete(app.url(&format!("/api/orgs/{org}/members/{user}")))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let left = Instant::now();
    loop {
        let (s, v) = consume(twin.addr, &twin.client, &user, &token, 1).await;
        assert_eq!(s, 200, "{v}");
        if v["balance"].as_i64().unwrap() < 100 {
            break;
        }
        assert!(left.elapsed() < WITHIN, "the twin still spends the pool");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "membership on a second gateway: joined after {took:?}, left after {:?}",
        left.elapsed()
    );
}

#[tokio::test]
async fn a_pool_redis_no_longer_holds_is_rebuilt_with_its_caps_spend() {
    let app = spawn_app().await;
    app.start_worker().await;
    let org = org_id();
    create_org(&app, &org).await;
    grant_pool(&app, &org, 300).await;
    let (user, token) = new_user();
    let body = json!({"role": "member", "cap": {"amount": 50, "period": "month"}});
    assert_eq!(
        add_member(&app, &org, &user, &admin_token(), body).await.0,
        200
    );
    for _ in 0..4 {
        assert_eq!(
            consume(app.addr, &app.client, &user, &token, 10).await.0,
            200
        );
    }
    app.eventually(20 * SECS, || async {
        (pool_ledger(&app, &org).await.0 == 260).then_some(())
    })
    .await;
    // The pool's keys go (as after an eviction or a FLUSH of its slot's keys):
    // the next request loads it from Postgres, the 40 spent this month included.
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let account = Keys::org_account(&org);
    {
        let mut c = app.redis.get().await.unwrap();
        let _: () = redis::cmd("DEL")
            .arg(keys.credits(&account))
            .arg(keys.org_members(&org))
            .arg(keys.pending(&account))
            .arg(keys.holds(&account))
            .query_async(&mut *c)
            .await
            .unwrap();
    }
    let (s, v) = consume(app.addr, &app.client, &user, &token, 11).await;
    assert_eq!((s, v["limit"].as_str()), (402, Some("member_cap")), "{v}");
    let (s, v) = consume(app.addr, &app.client, &user, &token, 10).await;
    assert_eq!((s, &v["balance"]), (200, &json!(0)), "{v}");
    app.eventually(20 * SECS, || async {
        let (bal, sum, _) = pool_ledger(&app, &org).await;
        (bal == 250 && sum == 250).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_members_export_shows_the_membership_and_erasure_ends_it() {
    let app = spawn_app().await;
    app.start_worker().await;
    let org = org_id();
    create_org(&app, &org).await;
    grant_pool(&app, &org, 100).await;
    let (user, token) = new_user();
    let body = json!({"role": "member", "cap": {"amount": 40, "period": "month"}});
    assert_eq!(
        add_member(&app, &org, &user, &admin_token(), body).await.0,
        200
    );
    assert_eq!(
        consume(app.addr, &app.client, &user, &token, 7).await.0,
        200
    );
    app.eventually(20 * SECS, || async {
        (pool_ledger(&app, &org).await == (93, 93, 2)).then_some(())
    })
    .await;
    let r = app.get(&format!("/api/users/{user}/export"), &token).await;
    assert_eq!(r.status(), 200);
    let export: Value = r.json().await.unwrap();
    let memberships = export["org_memberships"]
        .as_array()
        .expect("org_memberships");
    assert_eq!(memberships.len(), 1, "{export}");
    assert_eq!(memberships[0]["org_id"], json!(org));
    assert_eq!(memberships[0]["cap_amount"], 40);
    let charges: Vec<&Value> = export["credit_transactions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["org_id"] == json!(org))
        .collect();
    assert_eq!(
        charges.len(),
        1,
        "the member's charge on the pool is theirs to see"
    );
    let r = app
        .client
        .delete(app.url(&format!("/api/users/{user}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let members: i64 = sqlx::query_scalar("select count(*) from org_members where user_id = $1")
        .bind(&user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(members, 0);
    // The pool keeps its ledger: the charge stays, its free text gone.
    assert_eq!(pool_ledger(&app, &org).await, (93, 93, 2));
    let (s, pool) = read_pool(&app, &org, &admin_token()).await;
    assert_eq!(
        (s, pool["members"].as_array().unwrap().len()),
        (200, 0),
        "{pool}"
    );
}

#[tokio::test]
async fn after_a_redis_data_loss_the_pool_its_caps_and_a_members_keyed_consume_are_rebuilt() {
    let app = spawn_app_with(crate::idempotency::fast_recovery).await;
    app.start_worker().await;
    let org = org_id();
    create_org(&app, &org).await;
    grant_pool(&app, &org, 300).await;
    let (user, token) = new_user();
    let body = json!({"role": "member", "cap": {"amount": 50, "period": "month"}});
    assert_eq!(
        add_member(&app, &org, &user, &admin_token(), body).await.0,
        200
    );
    let (s, first, _) = keyed_consume(&app, &user, &token, "K", 30).await;
    assert_eq!(s, 200, "{first}");
    let holds = format!("/api/users/{user}/credits/holds");
    let (s, hold, _) = read(app.post(&holds, &token, &json!({"amount": 10})).await).await;
    assert_eq!(s, 200, "{hold}");
    app.eventually(20 * SECS, || async {
        let open: i64 = sqlx::query_scalar(
            "select count(*) from credit_holds where org_id = $1 and status = 'open'",
        )
        .bind(&org)
        .fetch_one(&app.pg)
        .await
        .unwrap();
        let records: i64 =
            sqlx::query_scalar("select count(*) from idempotency_records where user_id = $1")
                .bind(&user)
                .fetch_one(&app.pg)
                .await
                .unwrap();
        (pool_ledger(&app, &org).await.0 == 270 && open == 1 && records == 1).then_some(())
    })
    .await;

    crate::idempotency::lose_redis_data(&app).await;
    // 503 until the recovery completes; then the key replays the first answer, charged once.
    let (s, again, replayed) = app
        .eventually(30 * SECS, || async {
            let r = keyed_consume(&app, &user, &token, "K", 30).await;
            (r.0 != 503).then_some(r)
        })
        .await;
    assert_eq!((s, replayed), (200, true), "{again}");
    assert_eq!(again["transaction_id"], first["transaction_id"]);
    // The cap counts the 30 settled and the 10 held, rebuilt from Postgres: 11 more pass it.
    let (s, v) = consume(app.addr, &app.client, &user, &token, 11).await;
    assert_eq!((s, v["limit"].as_str()), (402, Some("member_cap")), "{v}");
    let (s, v) = consume(app.addr, &app.client, &user, &token, 10).await;
    assert_eq!((s, &v["balance"]), (200, &json!(0)), "{v}");
    let release = format!("{holds}/{}", hold["hold_id"].as_str().unwrap());
    let r = app
        .client
        .delete(app.url(&release))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, v) = consume(app.addr, &app.client, &user, &token, 10).await;
    assert_eq!((s, &v["balance"]), (200, &json!(0)), "{v}");
    app.eventually(20 * SECS, || async {
        let (bal, sum, rows) = pool_ledger(&app, &org).await;
        (bal == 250 && sum == 250 && rows == 4).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_keyed_consume_retried_across_a_membership_change_replays_and_charges_once() {
    let app = spawn_app().await;
    app.start_worker().await;
    let org = org_id();
    create_org(&app, &org).await;
    grant_pool(&app, &org, 500).await;
    let (user, token) = new_user();
    // The pool is loaded (another member spent from it), so the load's restore cannot help.
    let (other, other_token) = new_user();
    assert_eq!(
        add_member(
            &app,
            &org,
            &other,
            &admin_token(),
            json!({"role": "member"})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        consume(app.addr, &app.client, &other, &other_token, 1)
            .await
            .0,
        200
    );
    // On the user's own balance, then the user joins: the retry replays, the pool is not charged.
    let (s, own, _) = keyed_consume(&app, &user, &token, "A", 10).await;
    assert_eq!(s, 200, "{own}");
    records_landed(&app, &user, 1).await;
    assert_eq!(
        add_member(&app, &org, &user, &admin_token(), json!({"role": "member"}))
            .await
            .0,
        200
    );
    let (s, again, replayed) = keyed_consume(&app, &user, &token, "A", 10).await;
    assert_eq!(
        (s, replayed, &again["transaction_id"]),
        (200, true, &own["transaction_id"]),
        "{again}"
    );
    // On the pool, then the user leaves: the retry replays, their own balance is not charged.
    let (s, pooled, _) = keyed_consume(&app, &user, &token, "B", 20).await;
    assert_eq!((s, &pooled["balance"]), (200, &json!(479)), "{pooled}");
    records_landed(&app, &user, 2).await;
    let r = app
        .client
        .delete(app.url(&format!("/api/orgs/{org}/members/{user}")))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, again, replayed) = keyed_consume(&app, &user, &token, "B", 20).await;
    assert_eq!(
        (s, replayed, &again["transaction_id"]),
        (200, true, &pooled["transaction_id"]),
        "{again}"
    );
    app.eventually(20 * SECS, || async {
        (pool_ledger(&app, &org).await == (479, 479, 3)
            && own_ledger(&app, &user).await == (90, 90))
            .then_some(())
    })
    .await;
}

/// Waits until the user has `n` durable idempotency records.
async fn records_landed(app: &TestApp, user: &str, n: i64) {
    app.eventually(20 * SECS, || async {
        let got: i64 =
            sqlx::query_scalar("select count(*) from idempotency_records where user_id = $1")
                .bind(user)
                .fetch_one(&app.pg)
                .await
                .unwrap();
        (got == n).then_some(())
    })
    .await;
}

/// A consume of `amount` under `Idempotency-Key: key`: status, answer, replayed.
async fn keyed_consume(
    app: &TestApp,
    user: &str,
    token: &str,
    key: &str,
    amount: i64,
) -> (u16, Value, bool) {
    let r = app
        .client
        .post(app.url(&format!("/api/users/{user}/credits/consume")))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&json!({"amount": amount}))
        .send()
        .await
        .unwrap();
    read(r).await
}
