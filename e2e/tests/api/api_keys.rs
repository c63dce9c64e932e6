//! SPEC §5.11 (api_keys) against the real gateway, worker and services: a key is shown once
//! and works as a bearer token, within its scopes only; unknown, malformed and revoked keys
//! are 401 (revoked ones on every gateway within 5 s); only the key's SHA-256 is stored, in
//! Postgres and Redis; a loss of the Redis records is rebuilt from Postgres; bad bodies
//! are 422 naming the member and create nothing.

use std::time::{Duration, Instant};

use common::redis::keys::Keys;
use redis::AsyncCommands;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::auth::assert_problem;
use crate::credits::{api_balance, drained, ledger, read};
use crate::helpers::*;
use crate::privacy::{redis_dump, rows_containing};

const WITHIN: Duration = Duration::from_secs(5);
const BALANCE: &str = "/api/vscode/user/balance";
const TRACK: &str = "/api/vscode/usage/track";

fn keys_path(user: &str) -> String {
    format!("/api/users/{user}/api-keys")
}

/// `POST .../api-keys` with any body: status and answer.
async fn try_create(app: &TestApp, user: &str, token: &str, body: Value) -> (u16, Value) {
    let (status, answer, _) = read(app.post(&keys_path(user), token, &body).await).await;
    (status, answer)
}

/// A new key of `user` (201), as the answer shows it.
async fn create(app: &TestApp, user: &str, token: &str, name: &str, scopes: &[&str]) -> Value {
    let (status, key) = try_create(app, user, token, json!({"name": name, "scopes": scopes})).await;
    assert_eq!(status, 201, "{key}");
    key
}

fn text<'a>(v: &'a Value, member: &str) -> &'a str {
    v[member]
        .as_str()
        .unwrap_or_else(|| panic!("{member} in {v}"))
}

async fn list(app: &TestApp, user: &str, token: &str) -> Vec<Value> {
    let r = app.get(&keys_path(user), token).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    body["api_keys"].as_array().expect("a list of keys").clone()
}

async fn delete(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .delete(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

async fn revoke(app: &TestApp, user: &str, token: &str, key_id: &str) -> u16 {
    let path = format!("{}/{key_id}", keys_path(user));
    delete(app, &path, token).await.status().as_u16()
}

/// A 401 problem+json that challenges for a bearer token and says the sent one was refused.
async fn assert_refused(r: reqwest::Response) -> Value {
    let challenge = r
        .headers()
        .get("www-authenticate")
        .expect("WWW-Authenticate")
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.starts_with("Bearer") && challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );
    assert_problem(r, 401, "unauthorized").await
}

/// A 403 problem+json `forbidden`.
async fn assert_forbidden(r: reqwest::Response) -> Value {
    assert_problem(r, 403, "forbidden").await
}

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The Redis record of a key, by the SHA-256 of its text.
async fn record(app: &TestApp, key: &str) -> Option<String> {
    let name = Keys::new(&app.settings.redis.key_prefix).api_key(&sha256_hex(key));
    let mut c = app.redis.get().await.unwrap();
    c.get(name).await.unwrap()
}

/// A well-formed key that was never issued.
fn unknown_key() -> String {
    let hex = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    format!("vsk_{}", &hex[..43])
}

async fn feature_rows(app: &TestApp, user: &str) -> i64 {
    sqlx::query_scalar("select count(*) from feature_usage where user_id = $1")
        .bind(user)
        .fetch_one(&app.pg)
        .await
        .unwrap()
}

fn features(n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|_| json!({"kind": "feature", "feature": "completion"}))
        .collect();
    json!({ "events": events })
}

#[tokio::test]
async fn a_created_key_is_shown_once_listed_without_it_and_works_as_a_bearer_token() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let made = create(&app, &user, &token, "laptop", &["read"]).await;
    let key = text(&made, "key");
    assert!(key.starts_with("vsk_") && key.len() == 47, "{key}");
    assert_eq!(text(&made, "prefix"), &key[..12]);
    assert_eq!(made["name"], "laptop");
    assert_eq!(made["scopes"], json!(["read"]));
    let key_id: uuid::Uuid = text(&made, "key_id").parse().expect("a uuid key_id");
    let created_at = chrono::DateTime::parse_from_rfc3339(text(&made, "created_at")).unwrap();
    assert!(created_at > before && created_at < chrono::Utc::now() + chrono::Duration::seconds(5));

    // The list shows it without the key, never used yet.
    let listed = list(&app, &user, &token).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let view = &listed[0];
    assert_eq!(view["key_id"], key_id.to_string());
    for member in ["prefix", "name", "scopes", "created_at"] {
        assert_eq!(view[member], made[member], "{member}");
    }
    assert!(view.get("key").is_none(), "{view}");
    assert!(
        view.get("last_used_at").is_some_and(Value::is_null),
        "{view}"
    );
    assert!(
        !view.to_string().contains(&key[4..]),
        "the list shows the key: {view}"
    );

    // It works as `Authorization: Bearer`, as its user.
    assert_eq!(api_balance(&app, key).await["balance"], 100);
    let r = app.get(&format!("/api/users/{user}/profile"), key).await;
    assert_eq!(r.status(), 200);
    let profile: Value = r.json().await.unwrap();
    assert_eq!(profile["user_id"], user.as_str(), "{profile}");
    let used = Instant::now();

    // ... and the list then says when it was last used.
    let last_used = app
        .eventually(WITHIN, || async {
            let listed = list(&app, &user, &token).await;
            listed[0]["last_used_at"].as_str().map(str::to_string)
        })
        .await;
    println!(
        "last_used_at listed {:?} after the first use",
        used.elapsed()
    );
    let last_used = chrono::DateTime::parse_from_rfc3339(&last_used).unwrap();
    assert!(
        last_used >= created_at - chrono::Duration::seconds(1),
        "{last_used} vs {created_at}"
    );
    // The key is never shown again.
    let r = app.get(&keys_path(&user), &token).await;
    assert!(!r.text().await.unwrap().contains(&key[4..]));
}

#[tokio::test]
async fn each_scope_reaches_its_routes_and_nothing_else() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    let (other, other_token) = new_user();
    let usage = create(&app, &user, &token, "usage", &["usage:write"]).await;
    let reads = create(&app, &user, &token, "reads", &["read"]).await;
    let credits = create(&app, &user, &token, "credits", &["credits:write"]).await;
    let (usage, reads, credits) = (
        text(&usage, "key"),
        text(&reads, "key"),
        text(&credits, "key"),
    );
    let consume = format!("/api/users/{user}/credits/consume");

    // usage:write tracks events, and they are stored.
    let r = app.post(TRACK, usage, &features(2)).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    app.eventually(Duration::from_secs(10), || async {
        (feature_rows(&app, &user).await == 2).then_some(())
    })
    .await;
    // ... but cannot consume (nothing reserved, nothing charged) nor read.
    let problem = assert_forbidden(app.post(&consume, usage, &json!({"amount": 5})).await).await;
    assert!(
        text(&problem, "detail").contains("credits:write"),
        "{problem}"
    );
    assert_eq!(api_balance(&app, &token).await["balance"], 100);
    assert_forbidden(app.get(BALANCE, usage).await).await;

    // read reads the balance and the profile, and cannot write.
    assert_eq!(api_balance(&app, reads).await["balance"], 100);
    assert_eq!(
        app.get(&format!("/api/users/{user}/profile"), reads)
            .await
            .status(),
        200
    );
    assert_forbidden(app.post(TRACK, reads, &features(1)).await).await;
    assert_forbidden(app.post(&consume, reads, &json!({"amount": 5})).await).await;

    // credits:write consumes (a ledger row), and cannot track or read.
    let (status, charged, _) = read(app.post(&consume, credits, &json!({"amount": 5})).await).await;
    assert_eq!(status, 200, "{charged}");
    assert_eq!(charged["balance"], 95);
    assert_forbidden(app.post(TRACK, credits, &features(1)).await).await;
    assert_forbidden(app.get(BALANCE, credits).await).await;

    // No key manages keys, reaches admin routes, exports, or reaches another user.
    let admin_calls = [
        ("GET", "/api/admin/users".to_string(), Value::Null),
        ("GET", "/api/admin/audit".to_string(), Value::Null),
        (
            "PUT",
            "/api/admin/pricing".to_string(),
            json!({"provider": "openai", "model": "*", "prompt_per_mtok": 0, "completion_per_mtok": 0}),
        ),
        (
            "POST",
            format!("/api/admin/users/{user}/credits/grant"),
            json!({"amount": 1000, "reason": "key"}),
        ),
        (
            "PUT",
            format!("/api/admin/users/{user}/plan"),
            json!({"plan": "pro"}),
        ),
    ];
    for key in [usage, reads, credits] {
        assert_forbidden(app.get(&keys_path(&user), key).await).await;
        let (status, body) =
            try_create(&app, &user, key, json!({"name": "x", "scopes": ["read"]})).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("forbidden")),
            "{body}"
        );
        let victim = list(&app, &user, &token).await[0]["key_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_forbidden(delete(&app, &format!("{}/{victim}", keys_path(&user)), key).await).await;
        assert_forbidden(app.get(&format!("/api/users/{user}/export"), key).await).await;
        for (method, path, body) in &admin_calls {
            let r = match *method {
                "GET" => app.get(path, key).await,
                "PUT" => app.put(path, key, body).await,
                _ => app.post(path, key, body).await,
            };
            assert_forbidden(r).await;
        }
        let r = app.get(&format!("/api/users/{other}/profile"), key).await;
        assert_eq!(r.status(), 403, "another user's data");
    }
    let r = app
        .get(&format!("/api/users/{other}/profile"), &other_token)
        .await;
    assert_eq!(r.status(), 200);

    // One more event through usage:write: only the accepted ones were stored.
    assert_eq!(app.post(TRACK, usage, &features(1)).await.status(), 202);
    app.eventually(Duration::from_secs(10), || async {
        (feature_rows(&app, &user).await == 3).then_some(())
    })
    .await;
    // The ledger: the starting credits and the one consume, nothing granted, nothing else.
    drained(&app, &user, 95).await;
    assert_eq!(ledger(&app, &user).await, (95, 95, 2));
    assert_eq!(feature_rows(&app, &user).await, 3);
    assert_eq!(
        list(&app, &user, &token).await.len(),
        3,
        "no key created or revoked by a key"
    );
    let plan: String = sqlx::query_scalar("select plan from users where id = $1")
        .bind(&user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(plan, "free");
    println!(
        "3 keys x {} refused routes: all 403 forbidden",
        4 + admin_calls.len() + 1
    );
}

#[tokio::test]
async fn unknown_and_malformed_keys_are_401_and_store_nothing() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let real = create(&app, &user, &token, "real", &["read", "usage:write"]).await;
    let real = text(&real, "key").to_string();
    let mut flipped = real.clone().into_bytes();
    flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let unknown = unknown_key();
    let malformed = [
        "vsk_".to_string(),
        "vsk_short".to_string(),
        format!("{real}A"),
        real[..46].to_string(),
        format!("vsk_{}!", &real[4..46]),
        format!("vsk_{}", "+".repeat(43)),
    ];
    let users_before = app.count("select count(*) from users").await;
    for bad in [unknown.as_str(), flipped.as_str()]
        .into_iter()
        .chain(malformed.iter().map(String::as_str))
    {
        assert_refused(app.get(BALANCE, bad).await).await;
        assert_refused(app.post(TRACK, bad, &features(1)).await).await;
        let r = app
            .post(
                &format!("/api/users/{user}/credits/consume"),
                bad,
                &json!({"amount": 1}),
            )
            .await;
        assert_refused(r).await;
    }
    // Nothing was stored: no user, no key, no record, no charge, no event.
    assert_eq!(app.count("select count(*) from users").await, users_before);
    assert_eq!(app.count("select count(*) from api_keys").await, 1);
    assert_eq!(record(&app, &unknown).await, None);
    assert_eq!(record(&app, &flipped).await, None);
    assert_eq!(api_balance(&app, &token).await["balance"], 100);
    app.start_worker_on(&["usage"]).await;
    // The real key's one event passes: the refused ones before it did not.
    assert_eq!(app.post(TRACK, &real, &features(1)).await.status(), 202);
    app.eventually(Duration::from_secs(10), || async {
        (feature_rows(&app, &user).await == 1).then_some(())
    })
    .await;
    assert_eq!(app.count("select count(*) from feature_usage").await, 1);
    assert_eq!(
        app.count("select count(*) from credit_transactions where kind = 'consume'")
            .await,
        0
    );
    println!(
        "{} unknown or malformed keys x 3 routes: all 401",
        2 + malformed.len()
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_on_a_second_gateway_within_5_s() {
    let a = spawn_app().await;
    let b = spawn_twin(&a).await;
    let (user, token) = new_user();
    let (other, other_token) = new_user();
    let made = create(&a, &user, &token, "ci", &["read"]).await;
    let kept = create(&a, &user, &token, "kept", &["read"]).await;
    let theirs = create(&b, &other, &other_token, "theirs", &["read"]).await;
    let (key, key_id) = (text(&made, "key"), text(&made, "key_id"));
    // Both gateways take it (and B now holds it in its cache).
    assert_eq!(api_balance(&a, key).await["balance"], 100);
    assert_eq!(api_balance(&b, key).await["balance"], 100);

    assert_eq!(revoke(&a, &user, &token, key_id).await, 204);
    let revoked = Instant::now();
    assert_refused(a.get(BALANCE, key).await).await;
    let took = b
        .eventually(WITHIN, || async {
            let r = b.get(BALANCE, key).await;
            match r.status().as_u16() {
                200 => None,
                401 => Some(revoked.elapsed()),
                s => panic!("gateway B answered {s}"),
            }
        })
        .await;
    println!(
        "revoked key refused on gateway B after {:.2} s",
        took.as_secs_f64()
    );
    assert_refused(b.get(BALANCE, key).await).await;
    assert_refused(a.get(BALANCE, key).await).await;

    // Revoking again is 204; another user's key, an unknown one and a non-id are 404.
    assert_eq!(revoke(&b, &user, &token, key_id).await, 204);
    assert_eq!(revoke(&a, &user, &token, key_id).await, 204);
    let theirs_id = text(&theirs, "key_id");
    let r = delete(&a, &format!("{}/{theirs_id}", keys_path(&user)), &token).await;
    assert_problem(r, 404, "not_found").await;
    let r = delete(
        &a,
        &format!("{}/{}", keys_path(&user), uuid::Uuid::new_v4()),
        &token,
    )
    .await;
    assert_problem(r, 404, "not_found").await;
    assert_eq!(revoke(&a, &user, &token, "not-a-uuid").await, 404);
    // ... and another user's key under their own id is 403.
    let r = delete(&a, &format!("{}/{theirs_id}", keys_path(&other)), &token).await;
    assert_problem(r, 403, "forbidden").await;

    // The revoked key is gone from the list; the others still work on both.
    let listed = list(&b, &user, &token).await;
    let ids: Vec<&str> = listed.iter().map(|k| text(k, "key_id")).collect();
    assert_eq!(ids, [text(&kept, "key_id")]);
    for gw in [&a, &b] {
        assert_eq!(api_balance(gw, text(&kept, "key")).await["balance"], 100);
        assert_eq!(api_balance(gw, text(&theirs, "key")).await["balance"], 100);
    }
    let revoked_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select revoked_at from api_keys where key_id = $1::uuid")
            .bind(key_id)
            .fetch_one(&a.pg)
            .await
            .unwrap();
    assert!(revoked_at.is_some());
    let audited = a
        .count(&format!(
            "select count(*) from audit_log where action = 'api_key.revoke' and target = '{user}'"
        ))
        .await;
    assert_eq!(audited, 1, "revoked once, audited once");
}

#[tokio::test]
async fn only_the_keys_hash_is_stored_in_postgres_and_redis() {
    let app = spawn_app().await;
    let (user, token) = new_user();
    let made = create(
        &app,
        &user,
        &token,
        "desk",
        &["usage:write", "credits:write", "read"],
    )
    .await;
    let gone = create(&app, &user, &token, "gone", &["read"]).await;
    let key = text(&made, "key").to_string();
    // Used once (a last-used marker) and a revoked one (a tombstone), so each kind of record is there.
    assert_eq!(api_balance(&app, &key).await["balance"], 100);
    assert_eq!(
        revoke(&app, &user, &token, text(&gone, "key_id")).await,
        204
    );
    app.eventually(WITHIN, || async {
        let used: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("select last_used_at from api_keys where key_id = $1::uuid")
                .bind(text(&made, "key_id"))
                .fetch_one(&app.pg)
                .await
                .unwrap();
        used.map(|_| ())
    })
    .await;

    let rows: Vec<String> = sqlx::query_scalar("select row_to_json(k)::text from api_keys k")
        .fetch_all(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let dump = redis_dump(&app).await;
    for (k, made) in [(key.as_str(), &made), (text(&gone, "key"), &gone)] {
        let secret = &k[4..];
        for row in &rows {
            assert!(!row.contains(secret), "the key is in its row: {row}");
        }
        // key_hash is the SHA-256 of the key's text (checked by Postgres and here).
        let (matches, stored): (bool, String) = sqlx::query_as(
            "select key_hash = sha256(convert_to($1, 'UTF8')), encode(key_hash, 'hex') \
             from api_keys where key_id = $2::uuid",
        )
        .bind(k)
        .bind(text(made, "key_id"))
        .fetch_one(&app.pg)
        .await
        .unwrap();
        assert!(matches, "key_hash is sha256(key)");
        assert_eq!(stored, sha256_hex(k));
        // No table holds it (the audit trail included).
        let found = rows_containing(&app, secret).await;
        assert!(found.is_empty(), "{found:?}");
        // Redis: no key name and no value holds it; its record is named by the hash.
        for (name, value) in &dump {
            assert!(
                !name.contains(secret) && !value.contains(secret),
                "{name} = {value}"
            );
        }
        let named = format!(":apikey:{stored}");
        assert!(
            dump.iter().any(|(name, _)| name.ends_with(&named)),
            "no record {named}"
        );
    }
    // The records: the live key's grant (who and what), the revoked one's tombstone.
    let live: Value = serde_json::from_str(&record(&app, &key).await.expect("the record")).unwrap();
    assert_eq!(live["user_id"], user.as_str(), "{live}");
    assert_eq!(live["revoked"], false, "{live}");
    let tomb: Value =
        serde_json::from_str(&record(&app, text(&gone, "key")).await.expect("a tombstone"))
            .unwrap();
    assert_eq!(tomb["revoked"], true, "{tomb}");
    assert!(tomb.get("user_id").is_none(), "{tomb}");
    println!(
        "2 keys: neither in api_keys rows, any table, or {} Redis entries",
        dump.len()
    );
}

/// A loss of this test's key records only (the shared Redis serves other tests): every
/// record, tombstone and marker of the key buckets, the global marker last (as a rebuild
/// writes it last). Returns the names deleted.
async fn lose_key_records(app: &TestApp) -> Vec<String> {
    let prefix = &app.settings.redis.key_prefix;
    let mut c = app.redis.get().await.unwrap();
    let mut names: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:{{ak:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut *c)
            .await
            .unwrap();
        names.extend(found);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    names.push(Keys::new(prefix).api_keys_loaded_all());
    let mut deleted = 0;
    for chunk in names.chunks(500) {
        let n: usize = c.del(chunk).await.unwrap();
        deleted += n;
    }
    assert_eq!(deleted, names.len(), "each name found was deleted");
    names
}

#[tokio::test]
async fn after_redis_loses_the_key_records_keys_verify_from_postgres_and_revoked_ones_stay_refused()
{
    // A short in-process cache, so the next requests go to Redis.
    let app = spawn_app_with(|v| {
        v.insert("APP__API_KEYS__CACHE_TTL_MS".into(), "100".into());
    })
    .await;
    let (user, token) = new_user();
    let live = create(&app, &user, &token, "live", &["read"]).await;
    let gone = create(&app, &user, &token, "gone", &["read"]).await;
    let (live, gone_key) = (text(&live, "key"), text(&gone, "key"));
    assert_eq!(
        revoke(&app, &user, &token, text(&gone, "key_id")).await,
        204
    );
    assert_eq!(api_balance(&app, live).await["balance"], 100);
    assert_refused(app.get(BALANCE, gone_key).await).await;
    assert!(record(&app, live).await.is_some());

    let keys = Keys::new(&app.settings.redis.key_prefix);
    let lost = lose_key_records(&app).await;
    for name in [
        keys.api_key(&sha256_hex(live)),
        keys.api_key(&sha256_hex(gone_key)),
        keys.api_keys_loaded("00"),
    ] {
        assert!(lost.contains(&name), "{name} was there to lose");
    }
    assert!(lost.len() >= 256 + 1 + 2, "{}", lost.len());
    let at = Instant::now();
    // Past the in-process cache's 100 ms: what the gateway read before is no longer trusted.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(api_balance(&app, live).await["balance"], 100);
    assert_refused(app.get(BALANCE, gone_key).await).await;
    assert_refused(app.get(BALANCE, &unknown_key()).await).await;
    println!(
        "after the loss the live key verified and the revoked one was refused ({:?})",
        at.elapsed()
    );

    // The watcher rebuilds: the global marker and the live key's record come back, the
    // revoked key never as a grant.
    let rebuilt = app
        .eventually(Duration::from_secs(10), || async {
            let mut c = app.redis.get().await.unwrap();
            let all: bool = c.exists(keys.api_keys_loaded_all()).await.unwrap();
            (all && record(&app, live).await.is_some()).then(|| at.elapsed())
        })
        .await;
    println!(
        "key records rebuilt from Postgres {:.2} s after the loss",
        rebuilt.as_secs_f64()
    );
    let grant: Value = serde_json::from_str(&record(&app, live).await.unwrap()).unwrap();
    assert_eq!(
        (grant["user_id"].as_str(), grant["revoked"].as_bool()),
        (Some(user.as_str()), Some(false))
    );
    if let Some(r) = record(&app, gone_key).await {
        let r: Value = serde_json::from_str(&r).unwrap();
        assert_eq!(
            r["revoked"], true,
            "a revoked key is never a grant again: {r}"
        );
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(api_balance(&app, live).await["balance"], 100);
    assert_refused(app.get(BALANCE, gone_key).await).await;
    // A second gateway, started after the loss, agrees.
    let b = spawn_twin(&app).await;
    assert_eq!(api_balance(&b, live).await["balance"], 100);
    assert_refused(b.get(BALANCE, gone_key).await).await;
}

#[tokio::test]
async fn bad_bodies_are_422_naming_the_member_and_create_nothing() {
    let app = spawn_app_with(|v| {
        v.insert("APP__API_KEYS__MAX_PER_USER".into(), "2".into());
    })
    .await;
    let (user, token) = new_user();
    let cases = [
        (json!({"name": "", "scopes": ["read"]}), "name"),
        (json!({"name": "x".repeat(65), "scopes": ["read"]}), "name"),
        (json!({"name": "é".repeat(65), "scopes": ["read"]}), "name"),
        (json!({"name": "a\u{0}b", "scopes": ["read"]}), "name"),
        (json!({"name": "bell\u{7}", "scopes": ["read"]}), "name"),
        (json!({"name": "two\nlines", "scopes": ["read"]}), "name"),
        (json!({"name": 7, "scopes": ["read"]}), "name"),
        (json!({"scopes": ["read"]}), "name"),
        (json!({"name": "k", "scopes": ["write"]}), "scopes"),
        (json!({"name": "k", "scopes": ["read", "admin"]}), "scopes"),
        (json!({"name": "k", "scopes": ["read", "read"]}), "scopes"),
        (json!({"name": "k", "scopes": []}), "scopes"),
        (json!({"name": "k", "scopes": "read"}), "scopes"),
        (json!({"name": "k"}), "scopes"),
    ];
    for (body, member) in &cases {
        let (status, problem) = try_create(&app, &user, &token, body.clone()).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (422, Some("validation_failed")),
            "{body}: {problem}"
        );
        let field = text(&problem, "field");
        assert!(
            field.starts_with(member),
            "{body}: names {field}, not {member}"
        );
        assert!(text(&problem, "detail").starts_with(member), "{problem}");
    }
    let created = "select count(*) from audit_log where action = 'api_key.create'";
    assert_eq!(app.count("select count(*) from api_keys").await, 0);
    assert_eq!(app.count(created).await, 0);

    // At the bounds: 64 characters (not bytes) is a name; two keys are the cap.
    let first = create(&app, &user, &token, &"é".repeat(64), &["read"]).await;
    create(
        &app,
        &user,
        &token,
        &"x".repeat(64),
        &["usage:write", "credits:write", "read"],
    )
    .await;
    let (status, problem) = try_create(
        &app,
        &user,
        &token,
        json!({"name": "third", "scopes": ["read"]}),
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "api_keys", "{problem}");
    assert_eq!(app.count("select count(*) from api_keys").await, 2);
    assert_eq!(app.count(created).await, 2);
    // The cap counts live keys: one revoked makes room for one more.
    assert_eq!(
        revoke(&app, &user, &token, text(&first, "key_id")).await,
        204
    );
    create(&app, &user, &token, "third", &["read"]).await;
    assert_eq!(list(&app, &user, &token).await.len(), 2);
    println!(
        "{} bad bodies: all 422 naming the member; the cap of 2 holds",
        cases.len() + 1
    );
}

/// SPEC §5.10b: export and erasure cover the keys (as their hashes' metadata).
#[tokio::test]
async fn the_export_lists_the_keys_without_secrets_and_erasure_deletes_them_on_every_gateway() {
    let a = spawn_app().await;
    let b = spawn_twin(&a).await;
    let (user, token) = new_user();
    let live = create(&a, &user, &token, "my work laptop", &["read"]).await;
    let gone = create(&a, &user, &token, "old desktop", &["usage:write"]).await;
    assert_eq!(revoke(&a, &user, &token, text(&gone, "key_id")).await, 204);
    let key = text(&live, "key");
    assert_eq!(api_balance(&b, key).await["balance"], 100);

    let r = a.get(&format!("/api/users/{user}/export"), &token).await;
    assert_eq!(r.status(), 200);
    let export = r.text().await.unwrap();
    let doc: Value = serde_json::from_str(&export).unwrap();
    let listed = doc["api_keys"].as_array().expect("an api_keys section");
    let ids: Vec<&str> = listed.iter().map(|k| text(k, "key_id")).collect();
    assert_eq!(ids, [text(&live, "key_id"), text(&gone, "key_id")]);
    assert_eq!(listed[0]["name"], "my work laptop");
    assert!(listed[0]["revoked_at"].is_null() && listed[1]["revoked_at"].is_string());
    for k in [key, text(&gone, "key")] {
        assert!(
            !export.contains(&k[4..]) && !export.contains(&sha256_hex(k)),
            "{export}"
        );
    }

    let r = delete(&a, &format!("/api/users/{user}"), &token).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let erased = Instant::now();
    assert_refused(a.get(BALANCE, key).await).await;
    let took = b
        .eventually(WITHIN, || async {
            match b.get(BALANCE, key).await.status().as_u16() {
                401 => Some(erased.elapsed()),
                s => {
                    assert!(s == 200 || s == 403, "gateway B answered {s}");
                    None
                }
            }
        })
        .await;
    println!(
        "an erased user's key refused on gateway B after {:.2} s",
        took.as_secs_f64()
    );
    let q = format!("select count(*) from api_keys where user_id = '{user}'");
    assert_eq!(a.count(&q).await, 0);
    assert!(rows_containing(&a, "my work laptop").await.is_empty());
    let tomb: Value = serde_json::from_str(&record(&a, key).await.expect("a tombstone")).unwrap();
    assert_eq!(tomb["revoked"], true, "{tomb}");
    let q = format!("select (details->'scrubbed'->>'api_keys')::bigint from audit_log where action = 'user.delete' and target = '{user}'");
    assert_eq!(a.count(&q).await, 2);
}
