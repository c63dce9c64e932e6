//! Authentication and authorization (docs/api.md "Conventions"): the JWT attack matrix, JWKS
//! keys of every family with rotation and the re-fetch limit, account status,
//! dev tokens (authorization and account status: `access.rs`).
//!
//! Real keys live in `tests/fixtures` (made with openssl; `make_jwks.py` built
//! `jwks.json` from them). Each test serves the JWKS from its own local server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::*;

const ISSUER: &str = "https://clerk.example.test";
const AUDIENCE: &str = "vsc-backend";

const RSA_A: &[u8] = include_bytes!("../fixtures/rsa_a.pem");
const RSA_A_PUBLIC: &[u8] = include_bytes!("../fixtures/rsa_a.pub.pem");
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

/// A token assembled by hand: any header, any payload, any signature bytes.
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!(
        "{}.{}.{}",
        part(header),
        part(claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
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

/// Swaps the payload of a signed token for another, keeping the signature.
fn tamper_payload(token: &str, claims: &Value) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
    parts.join(".")
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

    /// Serves an arbitrary JSON member of `keys`.
    fn add_raw(&self, key: Value) {
        self.served.lock().unwrap().push(key);
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

#[tokio::test]
async fn every_attack_in_the_jwt_matrix_is_refused_and_every_key_family_is_accepted() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    let good = good_claims(&sub);
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let hs_with_public_key = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-a".into());
        jsonwebtoken::encode(&h, &good, &EncodingKey::from_secret(RSA_A_PUBLIC)).unwrap()
    };
    let hs_with_public_key_no_kid = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(RSA_A_PUBLIC),
    )
    .unwrap();
    let wrong_secret = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-000"),
    )
    .unwrap();
    let other = fresh_id();

    // (case, Authorization header or None for no header)
    let attacks: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("empty bearer", Some("Bearer ".into())),
        ("basic scheme", Some("Basic dXNlcjpwYXNz".into())),
        ("token without scheme", Some(sign(Signer::Secret, &good))),
        ("garbage", Some("Bearer not-a-jwt".into())),
        ("three garbage parts", Some("Bearer a.b.c".into())),
        (
            "alg none",
            Some(format!(
                "Bearer {}",
                raw_token(&json!({"alg": "none", "typ": "JWT"}), &good, b"")
            )),
        ),
        (
            "alg none with a kid",
            Some(format!(
                "Bearer {}",
                raw_token(&json!({"alg": "none", "kid": "rsa-a"}), &good, b"")
            )),
        ),
        (
            "HS256 without signature",
            Some(format!(
                "Bearer {}",
                raw_token(&json!({"alg": "HS256"}), &good, b"")
            )),
        ),
        (
            "HS/RS confusion with the RSA kid",
            Some(format!("Bearer {hs_with_public_key}")),
        ),
        (
            "HS/RS confusion without kid",
            Some(format!("Bearer {hs_with_public_key_no_kid}")),
        ),
        (
            "HS256 with a wrong secret",
            Some(format!("Bearer {wrong_secret}")),
        ),
        (
            "tampered RS256 signature",
            Some(format!(
                "Bearer {}",
                tamper_signature(&sign(Signer::RsaA, &good))
            )),
        ),
        (
            "tampered HS256 signature",
            Some(format!(
                "Bearer {}",
                tamper_signature(&sign(Signer::Secret, &good))
            )),
        ),
        (
            "tampered payload",
            Some(format!(
                "Bearer {}",
                tamper_payload(&sign(Signer::Ec, &good_claims(&other)), &good)
            )),
        ),
        (
            "RS256 signed under the EC key's kid",
            Some(format!(
                "Bearer {}",
                sign_as(Signer::RsaA, Some("ec-p256"), &good)
            )),
        ),
        (
            "RSA key B under key A's kid",
            Some(format!(
                "Bearer {}",
                sign_as(Signer::RsaB, Some("rsa-a"), &good)
            )),
        ),
        (
            "EdDSA under the EC key's kid",
            Some(format!(
                "Bearer {}",
                sign_as(Signer::Ed, Some("ec-p256"), &good)
            )),
        ),
        (
            "unknown kid",
            Some(format!(
                "Bearer {}",
                sign_as(Signer::RsaA, Some("nope"), &good)
            )),
        ),
        (
            "expired beyond the leeway",
            Some(format!(
                "Bearer {}",
                sign(Signer::RsaA, &with("exp", json!(now() - 120)))
            )),
        ),
        (
            "nbf in the future",
            Some(format!(
                "Bearer {}",
                sign(Signer::Ec, &with("nbf", json!(now() + 300)))
            )),
        ),
        (
            "wrong iss",
            Some(format!(
                "Bearer {}",
                sign(Signer::Ed, &with("iss", json!("https://evil.test")))
            )),
        ),
        (
            "missing iss",
            Some(format!("Bearer {}", sign(Signer::Secret, &without("iss")))),
        ),
        (
            "iss of the wrong type",
            Some(format!(
                "Bearer {}",
                sign(Signer::Secret, &with("iss", json!(42)))
            )),
        ),
        (
            "wrong aud",
            Some(format!(
                "Bearer {}",
                sign(Signer::RsaA, &with("aud", json!("someone-else")))
            )),
        ),
        (
            "missing aud",
            Some(format!("Bearer {}", sign(Signer::Secret, &without("aud")))),
        ),
        (
            "exp as a string",
            Some(format!(
                "Bearer {}",
                sign(
                    Signer::Secret,
                    &with("exp", json!((now() + 3600).to_string()))
                )
            )),
        ),
        (
            "missing exp",
            Some(format!("Bearer {}", sign(Signer::Secret, &without("exp")))),
        ),
        (
            "missing sub",
            Some(format!("Bearer {}", sign(Signer::Secret, &without("sub")))),
        ),
        (
            "sub with spaces",
            Some(format!(
                "Bearer {}",
                sign(Signer::Secret, &with("sub", json!("user 1")))
            )),
        ),
        (
            "sub of 65 characters",
            Some(format!(
                "Bearer {}",
                sign(Signer::Secret, &with("sub", json!("a".repeat(65))))
            )),
        ),
        (
            "numeric sub",
            Some(format!(
                "Bearer {}",
                sign(Signer::Secret, &with("sub", json!(7)))
            )),
        ),
        (
            "dev token while disabled",
            Some(format!("Bearer dev:{sub}")),
        ),
    ];
    for (case, header) in &attacks {
        let r = profile_with(&app, &sub, header.as_deref()).await;
        assert_eq!(r.status(), 401, "{case}: expected 401");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(ct, "application/problem+json", "{case}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized", "{case}: {body}");
    }

    let accepted: Vec<(&str, String)> = vec![
        ("HS256 without kid", sign(Signer::Secret, &good)),
        ("RS256", sign(Signer::RsaA, &good)),
        ("RS256 with the second RSA key", sign(Signer::RsaB, &good)),
        ("ES256", sign(Signer::Ec, &good)),
        ("EdDSA", sign(Signer::Ed, &good)),
        (
            "expired within the leeway",
            sign(Signer::RsaA, &with("exp", json!(now() - 30))),
        ),
        (
            "nbf within the leeway",
            sign(Signer::Ec, &with("nbf", json!(now() + 30))),
        ),
    ];
    for (case, token) in &accepted {
        let r = profile_with(&app, &sub, Some(&format!("Bearer {token}"))).await;
        assert_eq!(r.status(), 200, "{case}: {}", r.text().await.unwrap());
    }
}

#[tokio::test]
async fn a_token_with_alg_none_is_401() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    for header in [
        json!({"alg": "none"}),
        json!({"alg": "none", "kid": "rsa-a"}),
        json!({"alg": "NONE"}),
    ] {
        assert_unauthorized(&app, &sub, &raw_token(&header, &good_claims(&sub), b"")).await;
    }
    assert_accepted(&app, &sub, &sign(Signer::Secret, &good_claims(&sub))).await;
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_rsa_public_key_under_its_kid_is_401() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-a".into());
    let token = jsonwebtoken::encode(
        &header,
        &good_claims(&sub),
        &EncodingKey::from_secret(RSA_A_PUBLIC),
    )
    .unwrap();
    assert_unauthorized(&app, &sub, &token).await;
    // The same key, used as the key says, is fine.
    assert_accepted(&app, &sub, &sign(Signer::RsaA, &good_claims(&sub))).await;
}

#[tokio::test]
async fn a_token_with_a_tampered_signature_or_payload_is_401() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    for signer in [Signer::Secret, Signer::RsaA, Signer::Ec, Signer::Ed] {
        let token = sign(signer, &good_claims(&sub));
        assert_unauthorized(&app, &sub, &tamper_signature(&token)).await;
        let mut admin = good_claims(&sub);
        admin["role"] = json!("admin");
        assert_unauthorized(&app, &sub, &tamper_payload(&token, &admin)).await;
        assert_accepted(&app, &sub, &token).await;
    }
}

#[tokio::test]
async fn a_token_expired_beyond_the_60_s_leeway_is_401_and_one_within_it_is_accepted() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    let mut claims = good_claims(&sub);
    claims["exp"] = json!(now() - 120);
    assert_unauthorized(&app, &sub, &sign(Signer::RsaA, &claims)).await;
    assert_unauthorized(&app, &sub, &sign(Signer::Secret, &claims)).await;
    claims["exp"] = json!(now() - 30);
    assert_accepted(&app, &sub, &sign(Signer::RsaA, &claims)).await;
    assert_accepted(&app, &sub, &sign(Signer::Secret, &claims)).await;
}

#[tokio::test]
async fn a_token_used_before_its_nbf_is_401() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    let mut claims = good_claims(&sub);
    claims["nbf"] = json!(now() + 300);
    assert_unauthorized(&app, &sub, &sign(Signer::Ec, &claims)).await;
    claims["nbf"] = json!((now() + 300).to_string());
    assert_unauthorized(&app, &sub, &sign(Signer::Ec, &claims)).await;
    claims["nbf"] = json!(now() - 5);
    assert_accepted(&app, &sub, &sign(Signer::Ec, &claims)).await;
}

#[tokio::test]
async fn a_wrong_or_missing_issuer_is_401_when_jwt_issuer_is_set() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    let mut claims = good_claims(&sub);
    for iss in [
        json!("https://evil.test"),
        json!(""),
        json!(42),
        json!(["https://evil.test"]),
    ] {
        claims["iss"] = iss;
        assert_unauthorized(&app, &sub, &sign(Signer::RsaA, &claims)).await;
    }
    claims.as_object_mut().unwrap().remove("iss");
    assert_unauthorized(&app, &sub, &sign(Signer::RsaA, &claims)).await;
    claims["iss"] = json!(ISSUER);
    assert_accepted(&app, &sub, &sign(Signer::RsaA, &claims)).await;
}

#[tokio::test]
async fn a_wrong_or_missing_audience_is_401_when_jwt_audience_is_set() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    let mut claims = good_claims(&sub);
    for aud in [json!("someone-else"), json!(["someone-else"]), json!(7)] {
        claims["aud"] = aud;
        assert_unauthorized(&app, &sub, &sign(Signer::Ed, &claims)).await;
    }
    claims.as_object_mut().unwrap().remove("aud");
    assert_unauthorized(&app, &sub, &sign(Signer::Ed, &claims)).await;
    claims["aud"] = json!([AUDIENCE, "another-service"]);
    assert_accepted(&app, &sub, &sign(Signer::Ed, &claims)).await;
    claims["aud"] = json!(AUDIENCE);
    assert_accepted(&app, &sub, &sign(Signer::Ed, &claims)).await;
}

#[tokio::test]
async fn issuer_and_audience_are_not_required_when_not_configured() {
    let app = spawn_app().await;
    let sub = fresh_id();
    let token =
        hs_token(&json!({"sub": sub, "exp": now() + 60, "iss": "anyone", "aud": "anything"}));
    assert_accepted(&app, &sub, &token).await;
    assert_accepted(
        &app,
        &sub,
        &hs_token(&json!({"sub": sub, "exp": now() + 60})),
    )
    .await;
}

#[tokio::test]
async fn an_exp_given_as_a_string_is_401() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    let mut claims = good_claims(&sub);
    claims["exp"] = json!((now() + 3600).to_string());
    assert_unauthorized(&app, &sub, &sign(Signer::Secret, &claims)).await;
    assert_unauthorized(&app, &sub, &sign(Signer::Ec, &claims)).await;
}

#[tokio::test]
async fn a_malformed_sub_is_401() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    for bad in [
        json!("user 1"),
        json!("a".repeat(65)),
        json!(""),
        json!("üser"),
        json!("a/b"),
        json!(1),
        json!(null),
    ] {
        let mut claims = good_claims(&sub);
        claims["sub"] = bad;
        assert_unauthorized(&app, &sub, &sign(Signer::RsaA, &claims)).await;
    }
    let longest = "a".repeat(64);
    assert_accepted(&app, &longest, &sign(Signer::RsaA, &good_claims(&longest))).await;
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
async fn a_garbage_token_is_401() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    for token in [
        "garbage",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9..",
        &"x".repeat(4000),
    ] {
        assert_unauthorized(&app, &sub, token).await;
    }
}

#[tokio::test]
async fn rs256_es256_and_eddsa_tokens_from_the_jwks_are_accepted() {
    let (app, _jwks) = spawn_strict_app().await;
    for signer in [Signer::RsaA, Signer::RsaB, Signer::Ec, Signer::Ed] {
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
async fn a_token_is_checked_only_against_the_key_its_kid_names() {
    let (app, _jwks) = spawn_strict_app().await;
    let sub = fresh_id();
    let claims = good_claims(&sub);
    // Each token is validly signed by some key in the set, but not the one named.
    assert_unauthorized(&app, &sub, &sign_as(Signer::RsaA, Some("ec-p256"), &claims)).await;
    assert_unauthorized(&app, &sub, &sign_as(Signer::RsaB, Some("rsa-a"), &claims)).await;
    assert_unauthorized(&app, &sub, &sign_as(Signer::Ec, Some("ed25519"), &claims)).await;
    assert_unauthorized(&app, &sub, &sign_as(Signer::Ed, Some("rsa-a"), &claims)).await;
    // A JWKS-signed token without a kid is checked against JWT_SECRET only.
    assert_unauthorized(&app, &sub, &sign_as(Signer::RsaA, None, &claims)).await;
    // An HS256 token naming a kid is not checked against JWT_SECRET.
    assert_unauthorized(&app, &sub, &sign_as(Signer::Secret, Some("rsa-a"), &claims)).await;
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

#[tokio::test]
async fn keys_of_unknown_types_or_for_encryption_do_not_spoil_the_rest_of_the_jwks() {
    let jwks = JwksServer::start(&[]).await;
    jwks.add_raw(json!({"kty": "XYZ", "kid": "future", "crv": "nothing"}));
    let mut enc: Value = serde_json::from_str::<Value>(JWKS).unwrap()["keys"][1].clone();
    enc["use"] = json!("enc");
    jwks.add_raw(enc);
    jwks.add_raw(json!({"kty": "oct", "kid": "symmetric", "k": URL_SAFE_NO_PAD.encode(SECRET)}));
    jwks.add("ec-p256");
    let url = jwks.url.clone();
    let app = spawn_app_with(|v| {
        v.insert("JWKS_URL".into(), url);
    })
    .await;
    let sub = fresh_id();
    let claims = json!({"sub": sub, "exp": now() + 3600});
    assert_accepted(&app, &sub, &sign(Signer::Ec, &claims)).await;
    assert_unauthorized(&app, &sub, &sign(Signer::RsaB, &claims)).await;
    // A symmetric key in a JWKS is never used, even under its own kid.
    assert_unauthorized(
        &app,
        &sub,
        &sign_as(Signer::Secret, Some("symmetric"), &claims),
    )
    .await;
}
