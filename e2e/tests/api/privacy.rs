//! Privacy end to end: the export holds what is stored about the user; after
//! DELETE no personal data is left in Postgres or Redis (including events
//! that were still queued), the account is refused, and the ledger stays.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::redis_server::OwnRedis;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// A worker this test can stop and replace (the app's own cannot restart).
struct Worker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    async fn start(app: &TestApp) -> Self {
        let stop = CancellationToken::new();
        let w = worker::startup::Worker::build(app.settings.clone(), stop.clone())
            .await
            .expect("worker");
        Self {
            stop,
            task: tokio::spawn(w.run_until_stopped()),
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Someone with an email, a name, a session on a machine, usage with
/// metadata, ledger rows with descriptions, preferences and a hold.
struct Person {
    id: String,
    token: String,
    email: String,
    name: String,
    marker: String,
    machine: String,
}

impl Person {
    fn new() -> Self {
        let id = format!("user_{}", uuid::Uuid::new_v4().simple());
        let marker = format!("mk{}", uuid::Uuid::new_v4().simple());
        let email = format!("{id}@example.com");
        let name = format!("Ada {marker}");
        let token =
            hs_token(&json!({"sub": id, "exp": now() + 3600, "email": email, "name": name}));
        Self {
            machine: format!("machine-{}", uuid::Uuid::new_v4().simple()),
            id,
            token,
            email,
            name,
            marker,
        }
    }

    fn needles(&self) -> Vec<String> {
        vec![
            self.email.clone(),
            self.name.clone(),
            self.marker.clone(),
            self.machine.clone(),
        ]
    }
}

async fn validate_session(app: &TestApp, p: &Person, machine: &str) -> String {
    let r = app
        .post(
            "/api/vscode/session/validate",
            &p.token,
            &json!({"extension_version": "1.4.0", "platform": "linux", "machine_id": machine}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["session_id"].as_str().unwrap().to_string()
}

async fn track(app: &TestApp, p: &Person, session: &str, n: usize) {
    let events: Vec<Value> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                json!({"kind": "model", "provider": "openai", "model": "gpt-4o", "prompt_tokens": 5,
                       "completion_tokens": 1, "session_id": session,
                       "metadata": {"note": format!("about {}", p.marker), "who": p.email}})
            } else {
                json!({"kind": "feature", "feature": "chat", "session_id": session,
                       "metadata": {"note": p.marker}})
            }
        })
        .collect();
    let r = app
        .post(
            "/api/vscode/usage/track",
            &p.token,
            &json!({"events": events}),
        )
        .await;
    assert_eq!(r.status(), 202);
}

async fn usage_rows(app: &TestApp, user: &str) -> i64 {
    sqlx::query_scalar(
        "select (select count(*) from model_usage where user_id = $1) + (select count(*) from feature_usage where user_id = $1)",
    )
    .bind(user)
    .fetch_one(&app.pg)
    .await
    .unwrap()
}

async fn sessions_stored(app: &TestApp, user: &str) -> i64 {
    sqlx::query_scalar("select count(*) from vscode_sessions where user_id = $1")
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

/// Everything but HTTP: ledger rows with free-form data, preferences, a hold.
async fn seed_postgres(app: &TestApp, p: &Person) {
    for amount in [4i64, 6] {
        sqlx::query(
            "select * from consume_credits_with_session($1, $2, $3, 'settle', null, 'gpt-4o', 'openai', 1, 1, null, $4, $5)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(&p.id)
        .bind(amount)
        .bind(format!("charged for {}", p.marker))
        .bind(json!({"note": p.marker, "email": p.email}))
        .execute(&app.pg)
        .await
        .unwrap();
    }
    sqlx::query(
        "update users set preferences = jsonb_build_object('signature', $2::text) where id = $1",
    )
    .bind(&p.id)
    .bind(format!("{} <{}>", p.name, p.email))
    .execute(&app.pg)
    .await
    .unwrap();
    sqlx::query(
        "insert into credit_holds (id, user_id, amount, status, metadata, expires_at) \
         values ($1, $2, 3, 'released', $3, now())",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(&p.id)
    .bind(json!({"note": p.marker}))
    .execute(&app.pg)
    .await
    .unwrap();
}

/// A user with stored sessions and usage (the worker has written them).
async fn populated(app: &TestApp, p: &Person) -> String {
    let session = validate_session(app, p, &p.machine).await;
    track(app, p, &session, 6).await;
    seed_postgres(app, p).await;
    app.eventually(Duration::from_secs(10), || async {
        (usage_rows(app, &p.id).await == 6 && sessions_stored(app, &p.id).await == 1).then_some(())
    })
    .await;
    session
}

#[tokio::test]
async fn an_export_holds_the_users_email_sessions_usage_and_ledger() {
    let app = spawn_app().await;
    let w = Worker::start(&app).await;
    let p = Person::new();
    let session = populated(&app, &p).await;

    let r = app
        .get(&format!("/api/users/{}/export", p.id), &p.token)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.expect("the export is one JSON document");
    assert_eq!(v["user_id"], p.id);
    assert_eq!(v["user"]["email"], p.email);
    assert_eq!(v["user"]["name"], p.name);
    assert_eq!(v["user"]["status"], "active");
    let sessions = v["vscode_sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["id"], session);
    assert_eq!(sessions[0]["machine_id"], p.machine);
    assert_eq!(v["model_usage"].as_array().unwrap().len(), 3);
    assert_eq!(v["feature_usage"].as_array().unwrap().len(), 3);
    assert_eq!(v["model_usage"][0]["metadata"]["who"], p.email);
    assert_eq!(v["usage_daily"].as_array().unwrap().len(), 2);
    assert_eq!(v["credit_daily"][0]["consumed"], 10);
    // The starting grant and the two consumes, in order.
    let ledger: Vec<i64> = v["credit_transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(ledger, vec![100, -4, -6]);
    assert_eq!(v["credit_balance"]["credits_balance"], 90);
    assert_eq!(v["credit_holds"].as_array().unwrap().len(), 1);
    for member in ["subscriptions", "api_rate_limits", "rate_limit_windows"] {
        assert!(v[member].is_array(), "{member}");
    }
    let audit = v["audit_log"].as_array().unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["action"], "user.export");

    // Only the owner and admins.
    let (_, other) = new_user();
    let r = app
        .get(&format!("/api/users/{}/export", p.id), &other)
        .await;
    assert_eq!(r.status(), 403);
    let r = app
        .get(&format!("/api/users/{}/export", p.id), &admin_token())
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .get("/api/users/user_never_seen_here/export", &admin_token())
        .await;
    assert_eq!(r.status(), 404);
    w.stop().await;
}

/// Every row of every table whose text contains `needle`, as `table: row`.
pub(crate) async fn rows_containing(app: &TestApp, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables \
         where table_schema = 'public' and table_type = 'BASE TABLE'",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap();
    assert!(tables.len() > 10);
    let mut found = Vec::new();
    for t in tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "select t::text from \"{t}\" t where t::text ilike '%' || $1 || '%'"
        ))
        .bind(needle)
        .fetch_all(&app.pg)
        .await
        .unwrap();
        found.extend(rows.into_iter().map(|r| format!("{t}: {r}")));
    }
    found
}

/// Every key of the app's prefix with its value(s) as text.
pub(crate) async fn redis_dump(app: &TestApp) -> Vec<(String, String)> {
    let mut conn = app.redis.get().await.unwrap();
    let pattern = format!("{}:*", app.settings.redis.key_prefix);
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut *conn)
            .await
            .unwrap();
        for k in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&k)
                .query_async(&mut *conn)
                .await
                .unwrap();
            let value: Vec<String> = match kind.as_str() {
                "string" => vec![redis::cmd("GET")
                    .arg(&k)
                    .query_async(&mut *conn)
                    .await
                    .unwrap()],
                "hash" => redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async(&mut *conn)
                    .await
                    .unwrap(),
                "set" => redis::cmd("SMEMBERS")
                    .arg(&k)
                    .query_async(&mut *conn)
                    .await
                    .unwrap(),
                "list" => redis::cmd("LRANGE")
                    .arg(&k)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut *conn)
                    .await
                    .unwrap(),
                "zset" => redis::cmd("ZRANGE")
                    .arg(&k)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut *conn)
                    .await
                    .unwrap(),
                _ => vec![],
            };
            out.push((k, value.join("\u{1f}")));
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    out
}

#[tokio::test]
async fn deleting_a_user_erases_personal_data_everywhere_but_keeps_the_ledger() {
    let app = spawn_app().await;
    let w = Worker::start(&app).await;
    let p = Person::new();
    let session = populated(&app, &p).await;
    // Cached views in Redis: analytics, and a profile cache holding the email.
    let r = app.get("/api/vscode/analytics", &p.token).await;
    assert_eq!(r.status(), 200);
    {
        let mut conn = app.redis.get().await.unwrap();
        let key = format!("{}:{{{}}}:profile", app.settings.redis.key_prefix, p.id);
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(json!({"email": p.email, "name": p.name}).to_string())
            .query_async(&mut *conn)
            .await
            .unwrap();
    }
    // Events still in the queues when the account is deleted: a new session
    // on another machine and usage with metadata.
    w.stop().await;
    let late_machine = format!("machine-{}", uuid::Uuid::new_v4().simple());
    validate_session(&app, &p, &late_machine).await;
    track(&app, &p, &session, 4).await;
    let ledger_before: Vec<(uuid::Uuid, i64, i64)> = sqlx::query_as(
        "select id, amount, balance_after from credit_transactions where user_id = $1 order by id",
    )
    .bind(&p.id)
    .fetch_all(&app.pg)
    .await
    .unwrap();
    assert_eq!(ledger_before.len(), 3);

    // Someone else may not delete this account.
    let (_, other) = new_user();
    let r = app
        .client
        .delete(app.url(&format!("/api/users/{}", p.id)))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let rid = format!("req-{}", uuid::Uuid::new_v4().simple());
    let r = app
        .client
        .delete(app.url(&format!("/api/users/{}", p.id)))
        .bearer_auth(&p.token)
        .header("x-request-id", &rid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "deleted");
    assert_eq!(body["request_id"], rid);

    // Refused from the moment the DELETE was answered.
    for path in [
        "/api/vscode/analytics",
        &format!("/api/users/{}/export", p.id),
    ] {
        let r = app.get(path, &p.token).await;
        assert_eq!(r.status(), 403, "{path}");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["code"], "account_deleted");
    }
    let r = app
        .post(
            "/api/vscode/session/validate",
            &p.token,
            &json!({"extension_version": "1.4.0"}),
        )
        .await;
    assert_eq!(r.status(), 403);

    // The queued events land now, stripped of personal data.
    let w = Worker::start(&app).await;
    app.eventually(Duration::from_secs(10), || async {
        (usage_rows(&app, &p.id).await == 10 && sessions_stored(&app, &p.id).await == 2)
            .then_some(())
    })
    .await;

    let mut needles = p.needles();
    needles.push(late_machine);
    for needle in &needles {
        let found = rows_containing(&app, needle).await;
        assert!(
            found.is_empty(),
            "{needle} is still in Postgres: {found:#?}"
        );
    }
    let user: (String, Option<String>, Option<String>, Value, bool, i64) = sqlx::query_as(
        "select status, email, name, preferences, deleted_at is not null, credits_balance from users where id = $1",
    )
    .bind(&p.id)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(user.0, "deleted");
    assert_eq!((user.1, user.2), (None, None));
    assert_eq!(user.3, json!({}));
    assert!(user.4);
    // The ledger stays, amounts intact, only its free-form data gone.
    let ledger_after: Vec<(uuid::Uuid, i64, i64)> = sqlx::query_as(
        "select id, amount, balance_after from credit_transactions where user_id = $1 order by id",
    )
    .bind(&p.id)
    .fetch_all(&app.pg)
    .await
    .unwrap();
    assert_eq!(ledger_after, ledger_before);
    assert_eq!(user.5, ledger_after.iter().map(|r| r.1).sum::<i64>());
    let free_form: i64 = sqlx::query_scalar(
        "select count(*) from credit_transactions where user_id = $1 and (description is not null or metadata is not null)",
    )
    .bind(&p.id)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(free_form, 0);
    let audit: (String, String, String) = sqlx::query_as(
        "select actor, target, request_id from audit_log where action = 'user.delete'",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(audit, (p.id.clone(), p.id.clone(), rid));

    // Redis: nothing personal, no session, cache or token keys; the account
    // is marked deleted for every gateway.
    let dump = redis_dump(&app).await;
    for (k, v) in &dump {
        for needle in &needles {
            assert!(
                !k.contains(needle.as_str()) && !v.contains(needle.as_str()),
                "{needle} in {k} = {v}"
            );
        }
    }
    let tag = format!("{{{}}}:", p.id);
    let left: Vec<&String> = dump
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains(&tag))
        .collect();
    for k in &left {
        let rest = k.split(&tag).nth(1).unwrap();
        assert!(
            !rest.starts_with("session:")
                && !rest.starts_with("stoken:")
                && !rest.starts_with("analytics:")
                && !rest.starts_with("idem:")
                && rest != "profile",
            "{k} should be gone"
        );
    }
    let status: Option<String> = {
        let mut conn = app.redis.get().await.unwrap();
        redis::cmd("HGET")
            .arg(format!(
                "{}:{{{}}}:user",
                app.settings.redis.key_prefix, p.id
            ))
            .arg("status")
            .query_async(&mut *conn)
            .await
            .unwrap()
    };
    assert_eq!(status.as_deref(), Some("deleted"));
    // A twin gateway (its own user cache) refuses the account too.
    let twin = spawn_twin(&app).await;
    let r = twin.get("/api/vscode/analytics", &p.token).await;
    assert_eq!(r.status(), 403);
    // An admin can still export what is left: the pseudonym and the ledger.
    let r = app
        .get(&format!("/api/users/{}/export", p.id), &admin_token())
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["user"]["email"].is_null());
    assert_eq!(v["credit_transactions"].as_array().unwrap().len(), 3);
    w.stop().await;
}

async fn delete_user(app: &TestApp, id: &str, token: &str) -> reqwest::Response {
    app.client
        .delete(app.url(&format!("/api/users/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// An erasure while Redis is unreachable is 503 with Retry-After, never a
/// 202 that leaves the account active in Redis: nothing was erased, and the
/// retry once Redis is back erases.
#[tokio::test]
async fn an_erasure_while_redis_is_down_is_503_and_erases_nothing_until_retried() {
    let mut redis = OwnRedis::start();
    let app = spawn_app_with(|v| {
        v.insert("REDIS_URL".into(), redis.url());
        v.insert("APP__REDIS__TIMEOUT_MS".into(), "300".into());
    })
    .await;
    let p = Person::new();
    let r = app
        .get(&format!("/api/users/{}/profile", p.id), &p.token)
        .await;
    assert_eq!(r.status(), 200);

    redis.kill();
    let r = delete_user(&app, &p.id, &p.token).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["code"], "unavailable");
    let (status, email): (String, Option<String>) =
        sqlx::query_as("select status, email from users where id = $1")
            .bind(&p.id)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), email.as_deref()),
        ("active", Some(p.email.as_str()))
    );

    // Back (empty): the retry erases, and says so in Redis too.
    redis.start_again();
    let r = app
        .eventually(Duration::from_secs(15), || async {
            let r = delete_user(&app, &p.id, &p.token).await;
            (r.status() == 202).then_some(r)
        })
        .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "deleted");
    let status: String = sqlx::query_scalar("select status from users where id = $1")
        .bind(&p.id)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(status, "deleted");
    let mut conn = app.redis.get().await.unwrap();
    let in_redis: Option<String> = redis::cmd("HGET")
        .arg(format!(
            "{}:{{{}}}:user",
            app.settings.redis.key_prefix, p.id
        ))
        .arg("status")
        .query_async(&mut *conn)
        .await
        .unwrap();
    assert_eq!(in_redis.as_deref(), Some("deleted"));
    // Retry-safe: the same DELETE again is answered 202, the rest stays 403.
    assert_eq!(delete_user(&app, &p.id, &p.token).await.status(), 202);
    let r = app
        .get(&format!("/api/users/{}/profile", p.id), &p.token)
        .await;
    assert_eq!(r.status(), 403);
}

/// At most one export per user runs at a time: while one holds the user's
/// export lock (here the test holds it, as a running export would), another
/// is 429 with Retry-After; other users are not affected.
#[tokio::test]
async fn a_second_concurrent_export_of_one_user_is_429() {
    let app = spawn_app().await;
    let p = Person::new();
    let export = format!("/api/users/{}/export", p.id);
    let r = app.get(&export, &p.token).await;
    assert_eq!(r.status(), 200);
    // Read whole: the export's lock is released before its body ends.
    r.json::<Value>().await.unwrap();

    let mut holder = app.pg.acquire().await.unwrap();
    let got: bool = sqlx::query_scalar(gateway::http::privacy::EXPORT_LOCK_SQL)
        .bind(&p.id)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert!(got);
    let r = app.get(&export, &p.token).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited");
    let other = Person::new();
    let r = app
        .get(&format!("/api/users/{}/export", other.id), &other.token)
        .await;
    assert_eq!(r.status(), 200);

    sqlx::query("select pg_advisory_unlock_all()")
        .execute(&mut *holder)
        .await
        .unwrap();
    let r = app.get(&export, &p.token).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["user_id"], p.id);
}

/// An export runs under `users.export_timeout_ms`: a statement stuck (here
/// behind a lock the test holds) is cancelled and the export cut, instead
/// of holding a connection for ever; the lock is free again afterwards.
#[tokio::test]
async fn an_export_stuck_past_its_statement_timeout_is_cut() {
    let app = spawn_app_with(|v| {
        v.insert("APP__USERS__EXPORT_TIMEOUT_MS".into(), "300".into());
    })
    .await;
    let p = Person::new();
    let export = format!("/api/users/{}/export", p.id);
    let r = app.get(&export, &p.token).await;
    assert_eq!(r.status(), 200);
    // Read whole: the export's lock is released before its body ends.
    r.json::<Value>().await.unwrap();

    let mut blocker = app.pg.begin().await.unwrap();
    sqlx::query("lock table model_usage in access exclusive mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r = app.get(&export, &p.token).await;
    let cut = match r.status().as_u16() {
        200 => r.json::<Value>().await.is_err(),
        _ => true,
    };
    assert!(cut, "the export should not complete");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    blocker.rollback().await.unwrap();
    // Its lock went with it.
    let r = app.get(&export, &p.token).await;
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().await.is_ok());
}
