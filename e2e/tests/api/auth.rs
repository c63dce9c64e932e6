//! Authentication over HTTP (docs/api.md "Conventions"): what needs the running gateway. A
//! refused token is a 401 problem+json, a missing or non-bearer header too, and the JWKS
//! is fetched, re-fetched for a rotated-in key at most once per interval, and answers 503
//! while unreachable (authorization and account status: `access.rs`).
//!
//! The JWT attack matrix itself (33 attacks, every key family) checks the verifier
//! alone, without services: gateway/src/auth/tests.rs.
//!
//! Real keys live in `tests/fixtures` (made with openssl; `make_jwks.py` built
//! `jwks.json` from them). Each test serves the JWKS from its own local server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::*;

const ISSUER: &str = "https://clerk.example.test";
const AUDIENCE: &str = "vsc-backend";

const RSA_A: &[u8] = include_bytes!("../fixtures/rsa_a.pem");
const RSA_B: &[u8] = include_bytes!("../fixtures/rsa_b.pem");
const EC_P256: &[u8] = include_bytes!("../fixtures/ec_p256.pem");
const ED25519: &[u8] = include_bytes!("../fixtures/ed25519.pem");
const JWKS: &str = include_str!("../fixtures/jwks.json");

/// A key to sign test tokens with.
#[derive(Clone, Copy)]
enum Signer {
    /// HS256 with the test app's `JWT_SECRET`.
    Secret,
    RsaA,
    RsaB,
    Ec,
    Ed,
}

impl Signer {
    fn alg(self) -> Algorithm {
        match self {
            Self::Secret => Algorithm::HS256,
            Self::RsaA | Self::RsaB => Algorithm::RS256,
            Self::Ec => Algorithm::ES256,
            Self::Ed => Algorithm::EdDSA,
        }
    }

    fn key(self) -> EncodingKey {
        match self {
            Self::Secret => EncodingKey::from_secret(SECRET.as_bytes()),
            Self::RsaA => EncodingKey::from_rsa_pem(RSA_A).unwrap(),
            Self::RsaB => EncodingKey::from_rsa_pem(RSA_B).unwrap(),
            Self::Ec => EncodingKey::from_ec_pem(EC_P256).unwrap(),
            Self::Ed => EncodingKey::from_ed_pem(ED25519).unwrap(),
        }
    }

    /// The `kid` of this key in `jwks.json`.
    fn kid(self) -> Option<&'static str> {
        match self {
            Self::Secret => None,
            Self::RsaA => Some("rsa-a"),
            Self::RsaB => Some("rsa-b"),
            Self::Ec => Some("ec-p256"),
            Self::Ed => Some("ed25519"),
        }
    }
}

/// Signs `claims` with `signer`, naming its own kid.
fn sign(signer: Signer, claims: &Value) -> String {
    sign_as(signer, signer.kid(), claims)
}

/// Signs `claims` with `signer` while the header claims `kid`.
fn sign_as(signer: Signer, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(signer.alg());
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &signer.key()).unwrap()
}

/// Changes one character in the middle of the signature (the last character
/// may carry only padding bits, so flipping it could leave the bytes intact).
fn tamper_signature(token: &str) -> String {
    let (rest, sig) = token.rsplit_once('.').unwrap();
    let mut sig: Vec<u8> = sig.bytes().collect();
    let mid = sig.len() / 2;
    sig[mid] = if sig[mid] == b'A' { b'B' } else { b'A' };
    format!("{rest}.{}", String::from_utf8(sig).unwrap())
}

fn fresh_id() -> String {
    format!("user_{}", uuid::Uuid::new_v4().simple())
}

/// Claims that pass every check of the app made by [`spawn_strict_app`].
fn good_claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "iat": now(), "iss": ISSUER, "aud": AUDIENCE})
}

/// A local JWKS endpoint that serves a chosen subset of the fixture keys and
/// counts how often it is fetched.
struct JwksServer {
    url: String,
    served: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(kids: &[&str]) -> Self {
        let served = Arc::new(Mutex::new(Vec::new()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, f) = (served.clone(), fetches.clone());
        let app = Router::new().route(
            "/.well-known/jwks.json",
            get(move || {
                let (s, f) = (s.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    let keys = s.lock().unwrap().clone();
                    Json(json!({ "keys": keys }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let server = Self {
            url,
            served,
            fetches,
        };
        for kid in kids {
            server.add(kid);
        }
        server
    }

    /// Starts serving the fixture key `kid` too (a key rotation).
    fn add(&self, kid: &str) {
        let all: Value = serde_json::from_str(JWKS).unwrap();
        let key = all["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid)
            .unwrap_or_else(|| panic!("no fixture key {kid}"))
            .clone();
        self.served.lock().unwrap().push(key);
    }

    /// Stops serving the key `kid` (removed upstream).
    fn remove(&self, kid: &str) {
        self.served.lock().unwrap().retain(|k| k["kid"] != kid);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// An app with every key source and every optional check switched on:
/// `JWT_SECRET`, a JWKS of all fixture keys, issuer, audience; no dev tokens.
async fn spawn_strict_app() -> (TestApp, JwksServer) {
    let jwks = JwksServer::start(&["rsa-a", "rsa-b", "ec-p256", "ed25519"]).await;
    let url = jwks.url.clone();
    let app = spawn_app_with(|v| {
        v.insert("JWKS_URL".into(), url);
        v.insert("JWT_ISSUER".into(), ISSUER.into());
        v.insert("JWT_AUDIENCE".into(), AUDIENCE.into());
        v.remove("AUTH_DEV_TOKENS");
    })
    .await;
    (app, jwks)
}

/// GET the caller's own profile with an arbitrary `Authorization` header.
async fn profile_with(app: &TestApp, sub: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut req = app
        .client
        .get(app.url(&format!("/api/users/{sub}/profile")));
    if let Some(h) = authorization {
        req = req.header("authorization", h);
    }
    req.send().await.expect("request")
}

/// Asserts a problem+json answer with this status and `code`.
pub async fn assert_problem(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status(), status, "status");
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct}"
    );
    let body: Value = resp.json().await.expect("problem body");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    body
}

async fn assert_unauthorized(app: &TestApp, sub: &str, token: &str) {
    let r = profile_with(app, sub, Some(&format!("Bearer {token}"))).await;
    assert_problem(r, 401, "unauthorized").await;
}

async fn assert_accepted(app: &TestApp, sub: &str, token: &str) {
    let r = profile_with(app, sub, Some(&format!("Bearer {token}"))).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// A refused token, whichever key path refused it, is a 401 problem+json over HTTP; a good
/// token of every key family is 200 as its own user.
#[tokio::test]
async fn a_refused_token_is_a_401_problem_json_and_every_key_family_is_accepted() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    let good = good_claims(&sub);
    let mut expired = good.clone();
    expired["exp"] = json!(now() - 120);
    let wrong_secret = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-000"),
    )
    .unwrap();
    let refused = [
        ("garbage", "not-a-jwt".to_string()),
        ("HS256 with a wrong secret", wrong_secret),
        (
            "tampered RS256 signature",
            tamper_signature(&sign(Signer::RsaA, &good)),
        ),
        (
            "RS256 under the EC key's kid",
            sign_as(Signer::RsaA, Some("ec-p256"), &good),
        ),
        ("unknown kid", sign_as(Signer::RsaA, Some("nope"), &good)),
        ("expired beyond the leeway", sign(Signer::Ed, &expired)),
        ("dev token while disabled", format!("dev:{sub}")),
    ];
    for (case, token) in &refused {
        let r = profile_with(&app, &sub, Some(&format!("Bearer {token}"))).await;
        assert_eq!(r.status(), 401, "{case}: expected 401");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(ct, "application/problem+json", "{case}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized", "{case}: {body}");
        assert_eq!(body["status"], 401, "{case}: {body}");
    }
    for signer in [
        Signer::Secret,
        Signer::RsaA,
        Signer::RsaB,
        Signer::Ec,
        Signer::Ed,
    ] {
        let sub = fresh_id();
        let r = profile_with(
            &app,
            &sub,
            Some(&format!("Bearer {}", sign(signer, &good_claims(&sub)))),
        )
        .await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["user_id"], sub.as_str());
    }
}

#[tokio::test]
async fn a_missing_or_non_bearer_authorization_header_is_401() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    assert_problem(profile_with(&app, &sub, None).await, 401, "unauthorized").await;
    for h in ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc"] {
        assert_problem(profile_with(&app, &sub, Some(h)).await, 401, "unauthorized").await;
    }
}

#[tokio::test]
async fn a_rotated_in_key_is_fetched_once_and_a_second_unknown_kid_within_30_s_is_not() {
    let jwks = JwksServer::start(&["rsa-a"]).await;
    let url = jwks.url.clone();
    let app = spawn_app_with(|v| {
        v.insert("JWKS_URL".into(), url);
    })
    .await;
    let sub = fresh_id();
    let claims = json!({"sub": sub, "exp": now() + 3600});
    assert_accepted(&app, &sub, &sign(Signer::RsaA, &claims)).await;
    assert_eq!(
        jwks.fetches(),
        1,
        "the key set is fetched once at start or first use"
    );
    assert_accepted(&app, &sub, &sign(Signer::RsaA, &claims)).await;
    assert_eq!(jwks.fetches(), 1, "a known kid is served from the cache");

    jwks.add("ec-p256");
    assert_accepted(&app, &sub, &sign(Signer::Ec, &claims)).await;
    assert_eq!(jwks.fetches(), 2, "an unknown kid re-fetches the key set");

    jwks.add("ed25519");
    assert_unauthorized(&app, &sub, &sign(Signer::Ed, &claims)).await;
    assert_unauthorized(&app, &sub, &sign_as(Signer::RsaA, Some("nope"), &claims)).await;
    assert_eq!(jwks.fetches(), 2, "at most one re-fetch per 30 s");
    // Keys already known keep working meanwhile.
    assert_accepted(&app, &sub, &sign(Signer::Ec, &claims)).await;
    assert_accepted(&app, &sub, &sign(Signer::RsaA, &claims)).await;
}

#[tokio::test]
async fn an_unknown_kid_re_fetches_again_once_the_interval_has_passed() {
    let jwks = JwksServer::start(&["rsa-a"]).await;
    let url = jwks.url.clone();
    let app = spawn_app_with(|v| {
        v.insert("JWKS_URL".into(), url);
        v.insert("APP__AUTH__JWKS_REFETCH_INTERVAL_SECS".into(), "1".into());
    })
    .await;
    let sub = fresh_id();
    let claims = json!({"sub": sub, "exp": now() + 3600});
    assert_unauthorized(&app, &sub, &sign(Signer::Ec, &claims)).await;
    let after_first = jwks.fetches();
    assert!(
        after_first <= 2,
        "one fetch at start and at most one re-fetch: {after_first}"
    );
    jwks.add("ec-p256");
    let token = sign(Signer::Ec, &claims);
    app.eventually(Duration::from_secs(5), || async {
        let r = profile_with(&app, &sub, Some(&format!("Bearer {token}"))).await;
        (r.status() == 200).then_some(())
    })
    .await;
    // Polling every 25 ms for about a second re-fetched about once, not per request.
    assert!(
        jwks.fetches() <= after_first + 2,
        "fetches: {}",
        jwks.fetches()
    );
}

#[tokio::test]
async fn an_unreachable_jwks_is_503_for_kid_tokens_while_hs256_keeps_working() {
    let app = spawn_app_with(|v| {
        v.insert("JWKS_URL".into(), "http://127.0.0.1:1/jwks.json".into());
    })
    .await;
    let sub = fresh_id();
    let claims = json!({"sub": sub, "exp": now() + 3600});
    let r = profile_with(
        &app,
        &sub,
        Some(&format!("Bearer {}", sign(Signer::RsaA, &claims))),
    )
    .await;
    let body = assert_problem(r, 503, "unavailable").await;
    assert!(body["detail"].as_str().unwrap().contains("jwks"), "{body}");
    assert_accepted(&app, &sub, &hs_token(&claims)).await;
}

/// A key removed upstream stops being trusted at the next timed refresh, even
/// for a token it verified before (which the token cache held); the keys kept
/// keep working.
#[tokio::test]
async fn a_key_removed_upstream_stops_being_trusted_after_the_timed_refresh() {
    let jwks = JwksServer::start(&["rsa-a", "rsa-b"]).await;
    let url = jwks.url.clone();
    let app = spawn_app_with(|v| {
        v.insert("JWKS_URL".into(), url);
        v.insert("APP__AUTH__JWKS_REFRESH_SECS".into(), "1".into());
    })
    .await;
    let sub = fresh_id();
    let claims = json!({"sub": sub, "exp": now() + 3600});
    let (a, b) = (sign(Signer::RsaA, &claims), sign(Signer::RsaB, &claims));
    assert_accepted(&app, &sub, &a).await;
    assert_accepted(&app, &sub, &a).await;
    assert_accepted(&app, &sub, &b).await;
    jwks.remove("rsa-a");
    let fetches = jwks.fetches();
    app.eventually(Duration::from_secs(10), || async {
        let r = profile_with(&app, &sub, Some(&format!("Bearer {a}"))).await;
        (r.status() == 401).then_some(())
    })
    .await;
    assert!(jwks.fetches() > fetches, "the timer re-fetched the key set");
    assert_unauthorized(&app, &sub, &a).await;
    assert_accepted(&app, &sub, &b).await;
}

/// `JWT_AUTHORIZED_PARTIES`: a token with a listed `azp` or none is accepted
/// (Clerk's SDK checks `azp` only when present); another `azp` is a 401.
#[tokio::test]
async fn an_azp_outside_the_authorized_parties_is_401_and_a_listed_or_absent_one_passes() {
    let app = spawn_app_with(|v| {
        v.insert(
            "JWT_AUTHORIZED_PARTIES".into(),
            "https://app.example.test, vscode-webview://x".into(),
        );
    })
    .await;
    let sub = fresh_id();
    let exp = now() + 3600;
    let listed = json!({"sub": sub, "exp": exp, "azp": "vscode-webview://x"});
    assert_accepted(&app, &sub, &hs_token(&listed)).await;
    assert_accepted(&app, &sub, &hs_token(&json!({"sub": sub, "exp": exp}))).await;
    for azp in [
        json!("https://evil.example.test"),
        json!(""),
        json!(["https://app.example.test"]),
    ] {
        let token = hs_token(&json!({"sub": sub, "exp": exp, "azp": azp}));
        assert_unauthorized(&app, &sub, &token).await;
    }
    let rs = sign(
        Signer::RsaA,
        &json!({"sub": sub, "exp": exp, "azp": "https://evil.example.test"}),
    );
    assert_unauthorized(&app, &sub, &rs).await;
}
