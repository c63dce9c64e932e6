//! Rate limits (docs/rate-limits.md) and the admin routes that change them (§5.7): exact
//! across gateways, plan-scaled, overridden, propagated within 5 s, audited,
//! and degraded visibly when Redis is unreachable.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::helpers::*;

pub(crate) const PROBE: &str = "/api/auth/user-info";
const FIVE_SECS: Duration = Duration::from_secs(5);

pub(crate) fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn header_u64(r: &reqwest::Response, name: &str) -> Option<u64> {
    header(r, name).and_then(|v| v.parse().ok())
}

fn assert_ratelimit_headers(r: &reqwest::Response) {
    for h in [
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "ratelimit-policy",
    ] {
        assert!(
            r.headers().contains_key(h),
            "{} answer lacks {h}",
            r.status()
        );
    }
}

pub(crate) async fn admin_put(
    app: &TestApp,
    path: &str,
    body: &Value,
    request_id: &str,
) -> reqwest::Response {
    app.client
        .put(app.url(path))
        .bearer_auth(admin_token())
        .header("x-request-id", request_id)
        .json(body)
        .send()
        .await
        .expect("request")
}

async fn admin_delete(app: &TestApp, path: &str, request_id: &str) -> reqwest::Response {
    app.client
        .delete(app.url(path))
        .bearer_auth(admin_token())
        .header("x-request-id", request_id)
        .send()
        .await
        .expect("request")
}

/// Polls the probe route until its `RateLimit-Limit` is `want`.
async fn wait_for_limit(app: &TestApp, token: &str, want: u64) {
    app.eventually(FIVE_SECS, || async {
        let r = app.get(PROBE, token).await;
        (header_u64(&r, "ratelimit-limit") == Some(want)).then_some(())
    })
    .await
}

#[tokio::test]
async fn sixty_concurrent_requests_on_two_gateways_pass_exactly_the_limit() {
    let a = spawn_app_with(|v| {
        v.insert(
            "APP__RATE_LIMIT__CLASSES__PROFILE__LIMIT".into(),
            "20".into(),
        );
        v.insert(
            "APP__RATE_LIMIT__CLASSES__PROFILE__WINDOW_SECS".into(),
            "3600".into(),
        );
    })
    .await;
    let b = spawn_twin(&a).await;
    let (id, token) = new_user();
    // Provision through another class, so all 60 probes meet a known user.
    let r = admin_put(
        &a,
        &format!("/api/admin/users/{id}/plan"),
        &json!({"plan": "free"}),
        "prov",
    )
    .await;
    assert_eq!(r.status(), 200);

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let (client, url, token) = (
            a.client.clone(),
            if i % 2 == 0 {
                a.url(PROBE)
            } else {
                b.url(PROBE)
            },
            token.clone(),
        );
        tasks.spawn(async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("request")
        });
    }
    let (mut allowed, mut refused) = (0u64, 0u64);
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_ratelimit_headers(&r);
        assert_eq!(header_u64(&r, "ratelimit-limit"), Some(20));
        match r.status().as_u16() {
            200 => allowed += 1,
            429 => {
                refused += 1;
                let retry = header_u64(&r, "retry-after").expect("429 carries Retry-After");
                assert!(retry >= 1);
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["code"], "rate_limited");
            }
            s => panic!("unexpected status {s}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // GCRA admits at most limit + ⌊t·limit/window⌋ in t seconds.
    let bound = 20 + (elapsed * 20.0 / 3600.0).floor() as u64;
    assert!(
        allowed >= 20 && allowed <= bound,
        "allowed {allowed}, bound {bound} after {elapsed:.2}s"
    );
    assert_eq!(
        allowed, 20,
        "window 3600 s: nothing refills during the test"
    );
    assert_eq!(allowed + refused, 60);
}

#[tokio::test]
async fn a_pro_user_sees_five_times_the_class_limit_on_every_gateway() {
    let a = spawn_app().await;
    let b = spawn_twin(&a).await;
    let (id, token) = new_user();
    let r = b.get(PROBE, &token).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header_u64(&r, "ratelimit-limit"), Some(300));
    assert_eq!(header(&r, "ratelimit-policy"), Some("300;w=60"));

    let r = admin_put(
        &a,
        &format!("/api/admin/users/{id}/plan"),
        &json!({"plan": "pro"}),
        "plan-1",
    )
    .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["plan"], "pro");
    assert_eq!(body["rate_limits"]["profile"]["limit"], 1500);
    assert_eq!(body["rate_limits"]["usage"]["limit"], 6000);

    // The gateway that made the change shows it at once; the other within 5 s.
    let r = a.get(PROBE, &token).await;
    assert_eq!(header_u64(&r, "ratelimit-limit"), Some(1500));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["plan"], "pro");
    wait_for_limit(&b, &token, 1500).await;
    let plan: String = sqlx::query_scalar("select plan from users where id = $1")
        .bind(&id)
        .fetch_one(&a.pg)
        .await
        .unwrap();
    assert_eq!(plan, "pro");
}

#[tokio::test]
async fn an_override_applies_on_both_gateways_within_5s_is_removed_by_delete_and_is_audited() {
    let a = spawn_app().await;
    let b = spawn_twin(&a).await;
    let (id, token) = new_user();
    // Both gateways hold the user's record in their local cache.
    assert_eq!(
        header_u64(&a.get(PROBE, &token).await, "ratelimit-limit"),
        Some(300)
    );
    assert_eq!(
        header_u64(&b.get(PROBE, &token).await, "ratelimit-limit"),
        Some(300)
    );

    let set_rid = format!("req-set-{}", uuid::Uuid::new_v4());
    let path = format!("/api/admin/users/{id}/rate-limits");
    let body = json!({"class": "profile", "limit": 7, "window_secs": 30});
    let r = admin_put(&a, &path, &body, &set_rid).await;
    assert_eq!(r.status(), 200);
    let view: Value = r.json().await.unwrap();
    assert_eq!(
        view["rate_limits"]["profile"],
        json!({"limit": 7, "window_secs": 30, "source": "override"})
    );
    let answered = Instant::now();
    for app in [&a, &b] {
        wait_for_limit(app, &token, 7).await;
    }
    assert!(answered.elapsed() <= FIVE_SECS);
    let r = b.get(PROBE, &token).await;
    assert_eq!(header(&r, "ratelimit-policy"), Some("7;w=30"));
    // An override replaces the plan's limit; it is not scaled by the plan.
    let r = admin_put(
        &a,
        &format!("/api/admin/users/{id}/plan"),
        &json!({"plan": "team"}),
        "plan-team",
    )
    .await;
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["rate_limits"]["profile"]["limit"], 7);
    assert_eq!(view["rate_limits"]["analytics"]["limit"], 3000);

    let del_rid = format!("req-del-{}", uuid::Uuid::new_v4());
    let r = admin_delete(&a, &format!("{path}?class=profile"), &del_rid).await;
    assert_eq!(r.status(), 200);
    let answered = Instant::now();
    for app in [&a, &b] {
        wait_for_limit(app, &token, 3000).await; // team: 300 × 10
    }
    assert!(answered.elapsed() <= FIVE_SECS);
    let rows: i64 = sqlx::query_scalar("select count(*) from api_rate_limits where user_id = $1")
        .bind(&id)
        .fetch_one(&a.pg)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    // Deleting it again finds nothing.
    let r = admin_delete(&a, &format!("{path}?class=profile"), "again").await;
    assert_eq!(r.status(), 404);

    let r = a
        .get(&format!("/api/admin/audit?user_id={id}"), &admin_token())
        .await;
    assert_eq!(r.status(), 200);
    let audit: Value = r.json().await.unwrap();
    let entries = audit["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["user.rate_limit.delete", "user.plan", "user.rate_limit.set"],
        "newest first"
    );
    let (del, set) = (&entries[0], &entries[2]);
    for e in entries {
        assert_eq!(e["actor"], "admin_1");
        assert_eq!(e["target"], id.as_str());
        assert!(chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).is_ok());
    }
    assert_eq!(set["request_id"], set_rid.as_str());
    assert_eq!(set["details"]["class"], "profile");
    assert_eq!(set["details"]["limit"], 7);
    assert_eq!(set["details"]["window_secs"], 30);
    assert_eq!(del["request_id"], del_rid.as_str());
    assert_eq!(del["details"]["class"], "profile");
    assert_eq!(del["details"]["previous"]["limit"], 7);
    assert_eq!(entries[1]["details"]["plan"], "team");
    // The trail is in Postgres, one row per change (the 404 wrote none).
    let n = a
        .count(&format!(
            "select count(*) from audit_log where target = '{id}'"
        ))
        .await;
    assert_eq!(n, 3);
    let r = a.get("/api/admin/audit?limit=1", &admin_token()).await;
    let audit: Value = r.json().await.unwrap();
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_suspended_user_gets_403_within_5s_and_200_again_once_reactivated() {
    let a = spawn_app().await;
    let b = spawn_twin(&a).await;
    let (id, token) = new_user();
    assert_eq!(b.get(PROBE, &token).await.status(), 200);
    let path = format!("/api/admin/users/{id}/status");
    let r = admin_put(&a, &path, &json!({"status": "suspended"}), "susp").await;
    assert_eq!(r.status(), 200);
    for app in [&a, &b] {
        app.eventually(FIVE_SECS, || async {
            let r = app.get(PROBE, &token).await;
            if r.status() != 403 {
                return None;
            }
            assert_ratelimit_headers(&r);
            let body: Value = r.json().await.unwrap();
            (body["code"] == "account_suspended").then_some(())
        })
        .await;
    }
    let r = admin_put(&a, &path, &json!({"status": "active"}), "react").await;
    assert_eq!(r.status(), 200);
    for app in [&a, &b] {
        app.eventually(FIVE_SECS, || async {
            (app.get(PROBE, &token).await.status() == 200).then_some(())
        })
        .await;
    }
    let r = a
        .get(&format!("/api/admin/audit?user_id={id}"), &admin_token())
        .await;
    let audit: Value = r.json().await.unwrap();
    let details: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["details"])
        .collect();
    assert_eq!(
        details[0],
        &json!({"status": "active", "previous": "suspended"})
    );
    assert_eq!(
        details[1],
        &json!({"status": "suspended", "previous": "active"})
    );
}

#[tokio::test]
async fn admin_routes_refuse_non_admins_and_bad_input_with_problem_json() {
    let app = spawn_app().await;
    let (id, token) = new_user();
    let plan = format!("/api/admin/users/{id}/plan");
    let limits = format!("/api/admin/users/{id}/rate-limits");

    let r = app.put(&plan, &token, &json!({"plan": "pro"})).await;
    assert_eq!(r.status(), 403);
    // Refused before its input is even looked at.
    let r2 = app
        .put(
            "/api/admin/users/bad%20id/plan",
            &token,
            &json!({"plan": 5}),
        )
        .await;
    assert_eq!(r2.status(), 403);
    assert_ratelimit_headers(&r);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "forbidden");
    assert_eq!(app.get("/api/admin/audit", &token).await.status(), 403);

    let admin = admin_token();
    let cases: Vec<(String, Value, &str)> = vec![
        (plan.clone(), json!({"plan": "platinum"}), "plan"),
        (plan.clone(), json!({}), "plan"),
        (
            limits.clone(),
            json!({"class": "nope", "limit": 5, "window_secs": 60}),
            "class",
        ),
        (
            limits.clone(),
            json!({"class": "usage", "limit": 0, "window_secs": 60}),
            "limit",
        ),
        (
            limits.clone(),
            json!({"class": "usage", "limit": -3, "window_secs": 60}),
            "limit",
        ),
        (
            limits.clone(),
            json!({"class": "usage", "limit": 2_000_000, "window_secs": 60}),
            "limit",
        ),
        (
            limits.clone(),
            json!({"class": "usage", "limit": 5, "window_secs": 0}),
            "window_secs",
        ),
        (
            limits.clone(),
            json!({"class": "usage", "limit": 5, "window_secs": 86_401}),
            "window_secs",
        ),
        (
            format!("/api/admin/users/{id}/status"),
            json!({"status": "deleted"}),
            "status",
        ),
    ];
    for (path, body, field) in cases {
        let r = app.put(&path, &admin, &body).await;
        assert_eq!(r.status(), 422, "{path} {body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        assert_ratelimit_headers(&r);
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["code"], "validation_failed");
        assert!(
            problem["detail"].as_str().unwrap().contains(field),
            "{problem}"
        );
    }
    // A malformed id is 404 on every /api/users/:id and admin route (the
    // one target-user rule, docs/architecture.md); it was 422 `id` here.
    let r = app
        .put(
            "/api/admin/users/bad%20id/plan",
            &admin,
            &json!({"plan": "pro"}),
        )
        .await;
    assert_eq!(r.status(), 404);
    assert_ratelimit_headers(&r);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "not_found");
    for query in ["", "?class=", "?class=bogus"] {
        let r = app
            .client
            .delete(app.url(&format!("{limits}{query}")))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{query}");
    }
    for query in ["?limit=0", "?limit=1001", "?limit=ten", "?user_id=no%20pe"] {
        assert_eq!(
            app.get(&format!("/api/admin/audit{query}"), &admin)
                .await
                .status(),
            422,
            "{query}"
        );
    }
    // Nothing of the refused requests was written.
    assert_eq!(app.count("select count(*) from audit_log").await, 0);
    assert_eq!(app.count("select count(*) from api_rate_limits").await, 0);

    // An id never seen is provisioned first (free plan, starting credits).
    let (fresh, _) = new_user();
    let r = app
        .put(
            &format!("/api/admin/users/{fresh}/plan"),
            &admin,
            &json!({"plan": "enterprise"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let row: (String, i64) =
        sqlx::query_as("select plan, credits_balance from users where id = $1")
            .bind(&fresh)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(row, ("enterprise".to_string(), 100));
}

#[tokio::test]
async fn failed_auth_is_limited_per_address_and_valid_tokens_still_pass() {
    let app = spawn_app_with(|v| {
        v.insert("APP__RATE_LIMIT__AUTH_FAILURES__LIMIT".into(), "5".into());
    })
    .await;
    for i in 0..5 {
        let r = app.get(PROBE, "not-a-token").await;
        assert_eq!(r.status(), 401, "failure {i}");
        assert_eq!(header_u64(&r, "ratelimit-limit"), Some(5));
        assert_ratelimit_headers(&r);
    }
    let r = app.get(PROBE, "not-a-token").await;
    assert_eq!(r.status(), 429);
    assert!(header_u64(&r, "retry-after").unwrap() >= 1);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    let (_, token) = new_user();
    let r = app.get(PROBE, &token).await;
    assert_eq!(
        r.status(),
        200,
        "a valid token is never refused by the auth-failure limit"
    );
    assert_eq!(header_u64(&r, "ratelimit-limit"), Some(300));
    // Missing credentials count as failures too.
    let r = app.client.get(app.url(PROBE)).send().await.unwrap();
    assert_eq!(r.status(), 429);
}

#[tokio::test]
async fn user_info_answers_the_original_clients_shape() {
    let app = spawn_app().await;
    let id = format!("user_{}", uuid::Uuid::new_v4().simple());
    let token = hs_token(
        &json!({"sub": id, "exp": now() + 600, "email": "ada@example.com", "name": "Ada King Lovelace"}),
    );
    let r = app.get(PROBE, &token).await;
    assert_eq!(r.status(), 200);
    assert_ratelimit_headers(&r);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"user_id": id, "email": "ada@example.com", "firstName": "Ada", "lastName": "King Lovelace", "plan": "free"})
    );
    // Without the claims, the stored profile answers.
    let bare = hs_token(&json!({"sub": id, "exp": now() + 600}));
    let body: Value = app.get(PROBE, &bare).await.json().await.unwrap();
    assert_eq!(body["email"], "ada@example.com");
    assert_eq!(body["lastName"], "King Lovelace");
}

/// A gateway whose Redis is unreachable, with the given fallback policy.
async fn spawn_without_redis(policy: &str) -> TestApp {
    let policy = policy.to_string();
    spawn_app_with(move |v| {
        v.insert("REDIS_URL".into(), "redis://127.0.0.1:1".into());
        v.insert("APP__REDIS__TIMEOUT_MS".into(), "200".into());
        v.insert("APP__RATE_LIMIT__ON_REDIS_ERROR".into(), policy);
        v.insert(
            "APP__RATE_LIMIT__CLASSES__PROFILE__LIMIT".into(),
            "3".into(),
        );
        // One fixed Postgres window spans the whole test.
        v.insert(
            "APP__RATE_LIMIT__CLASSES__PROFILE__WINDOW_SECS".into(),
            "86400".into(),
        );
    })
    .await
}

async fn metrics_text(app: &TestApp) -> String {
    app.client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn without_redis_the_postgres_policy_limits_through_check_rate_limit() {
    let app = spawn_without_redis("postgres").await;
    let (id, token) = new_user();
    for i in 0..3 {
        let r = app.get(PROBE, &token).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(header(&r, "ratelimit-degraded"), Some("postgres"));
        assert_eq!(header_u64(&r, "ratelimit-remaining"), Some(2 - i));
    }
    let r = app.get(PROBE, &token).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "ratelimit-degraded"), Some("postgres"));
    assert!(header_u64(&r, "retry-after").unwrap() >= 1);
    let count: i64 = sqlx::query_scalar(
        "select sum(count)::bigint from rate_limit_windows where user_id = $1 and class = 'profile'",
    )
    .bind(&id)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(count, 4);
    let users = app
        .count(&format!("select count(*) from users where id = '{id}'"))
        .await;
    assert_eq!(users, 1, "provisioned through Postgres");
    assert!(metrics_text(&app).await.contains("degraded=\"postgres\""));
}

#[tokio::test]
async fn without_redis_the_allow_policy_passes_and_says_so() {
    let app = spawn_without_redis("allow").await;
    let (_, token) = new_user();
    for _ in 0..5 {
        let r = app.get(PROBE, &token).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "ratelimit-degraded"), Some("allow"));
        assert_ratelimit_headers(&r);
    }
    assert!(metrics_text(&app).await.contains("degraded=\"allow\""));
}

#[tokio::test]
async fn without_redis_the_deny_policy_refuses_and_says_so() {
    let app = spawn_without_redis("deny").await;
    let (_, token) = new_user();
    let r = app.get(PROBE, &token).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "ratelimit-degraded"), Some("deny"));
    assert!(header_u64(&r, "retry-after").unwrap() >= 1);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert!(metrics_text(&app).await.contains("degraded=\"deny\""));
}

/// A TCP server that accepts and never answers (a hung Redis); it closes
/// each connection after 2 s so that nothing waits on it forever.
fn mute_redis() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for socket in listener.incoming().flatten() {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(2));
                drop(socket);
            });
        }
    });
    port
}

#[tokio::test]
async fn a_hung_redis_costs_one_timeout_per_probe_not_one_per_request() {
    let port = mute_redis();
    let app = spawn_app_with(move |v| {
        v.insert("REDIS_URL".into(), format!("redis://127.0.0.1:{port}"));
        v.insert("APP__REDIS__TIMEOUT_MS".into(), "300".into());
        v.insert("APP__RATE_LIMIT__ON_REDIS_ERROR".into(), "allow".into());
    })
    .await;
    let (_, token) = new_user();
    let started = Instant::now();
    for _ in 0..12 {
        let r = app.get(PROBE, &token).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "ratelimit-degraded"), Some("allow"));
    }
    // Without the breaker each request waits ≥ 300 ms (12 × 0.3 = 3.6 s);
    // with it, the first request and one probe per second do.
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

/// The Lua script on real Redis and the plain `gcra_n()` make the same
/// decisions for the same arrivals and costs (a synthetic clock passed as
/// ARGV[4]; costs mostly 1, some of several units, some above the limit).
#[tokio::test]
async fn the_lua_script_and_gcra_agree_on_every_arrival() {
    use common::settings::ClassLimit;
    use gateway::rate_limit::{decision_from_reply, gcra_n, script};

    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    // Emission intervals of ≥ 3 s keep the key's real-time expiry out of play.
    let limits = [(7, 60), (20, 60), (1000, 3600), (1, 10), (13, 60)];
    let mut refused_somewhere = false;
    for (limit, window_secs) in limits {
        let l = ClassLimit { limit, window_secs };
        let key = format!("rltest:{{{}}}:gcra", uuid::Uuid::new_v4().simple());
        let interval_us = (window_secs * 1_000_000 / limit) as i64;
        let mut now: i64 = 1_700_000_000_000_000;
        let mut tat: Option<i64> = None;
        let mut allowed = 0;
        for i in 0..200 {
            now += match rng.random_range(0..10) {
                0..=3 => 0,
                4..=8 => rng.random_range(0..2 * interval_us),
                _ => rng.random_range(0..window_secs as i64 * 1_000_000),
            };
            let cost: u64 = match rng.random_range(0..10) {
                0..=5 => 1,
                6..=8 => rng.random_range(1..=limit),
                _ => rng.random_range(1..=2 * limit + 1),
            };
            let reply: Vec<i64> = script()
                .key(&key)
                .arg(l.limit)
                .arg(l.window_secs)
                .arg(cost)
                .arg(now)
                .invoke_async(&mut conn)
                .await
                .unwrap();
            let lua = decision_from_reply(&reply, l);
            let (plain, next) = gcra_n(tat, now, l, cost);
            assert_eq!(
                lua, plain,
                "limit {limit}/{window_secs}s, arrival {i} at {now}, cost {cost}"
            );
            // A refusal writes nothing: the script leaves the key as it was.
            if plain.allowed {
                tat = Some(next);
            }
            allowed += u32::from(plain.allowed);
            let stored: Option<i64> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(stored, tat, "stored TAT, arrival {i}");
        }
        assert!(allowed > 0);
        refused_somewhere |= allowed < 200;
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert!(refused_somewhere, "the sequences exercised refusals too");
}

/// A 429 decided inside a credit script carries the same `RateLimit-*` and
/// `Retry-After` as one the guard decides (a request that ends before any
/// script: a bad body), and both count against one budget.
#[tokio::test]
async fn a_credit_429_from_the_script_carries_the_guards_headers() {
    let app = spawn_app_with(|v| {
        v.insert(
            "APP__RATE_LIMIT__CLASSES__CREDITS__LIMIT".into(),
            "2".into(),
        );
        v.insert(
            "APP__RATE_LIMIT__CLASSES__CREDITS__WINDOW_SECS".into(),
            "600".into(),
        );
    })
    .await;
    let (user, token) = new_user();
    let path = format!("/api/users/{user}/credits/consume");
    let shown = |r: &reqwest::Response| {
        let names = [
            "ratelimit-limit",
            "ratelimit-remaining",
            "ratelimit-policy",
            "x-ratelimit-limit",
        ];
        let values: Vec<String> = names
            .iter()
            .map(|h| header(r, h).unwrap_or("-").to_string())
            .collect();
        (
            r.status().as_u16(),
            values,
            header_u64(r, "retry-after"),
            header_u64(r, "ratelimit-reset"),
        )
    };
    let ok = app.post(&path, &token, &json!({"amount": 1})).await;
    let (s, values, _, _) = shown(&ok);
    assert_eq!(
        (s, values[1].as_str(), values[2].as_str()),
        (200, "1", "2;w=600")
    );
    let bad = shown(&app.post(&path, &token, &json!({"amount": -1})).await);
    assert_eq!(
        (bad.0, bad.1[1].as_str()),
        (422, "0"),
        "the guard counted the 422"
    );
    let by_script = shown(&app.post(&path, &token, &json!({"amount": 1})).await);
    let by_guard = shown(&app.post(&path, &token, &json!({"amount": -1})).await);
    assert_eq!(by_script.0, 429);
    assert_eq!((by_script.0, &by_script.1), (by_guard.0, &by_guard.1));
    // 600 s / 2 = 300 s per request; a second may pass between the two.
    for (retry, reset) in [(by_script.2, by_script.3), (by_guard.2, by_guard.3)] {
        assert!(retry.is_some_and(|r| (299..=300).contains(&r)), "{retry:?}");
        assert!(reset.is_some_and(|r| (599..=600).contains(&r)), "{reset:?}");
    }
    let balance = crate::credits::api_balance(&app, &token).await;
    assert_eq!(
        balance["balance"], 99,
        "the refused consume charged nothing"
    );
}
