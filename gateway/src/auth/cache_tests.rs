//! The verified-token cache and the JWKS hygiene around the verifier (issue 19),
//! without services: what is cached and what is not, which kids a new key set
//! drops, `azp`, and (ignored, printed) the cost of a cached verify against an
//! RS256 one. The cache's own decisions: `cache.rs`.

use std::time::Instant;

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

const SECRET: &str = "unit-test-secret-of-adequate-length-0123456789";
const RSA_A: &[u8] = include_bytes!("../../../e2e/tests/fixtures/rsa_a.pem");
const JWKS: &str = include_str!("../../../e2e/tests/fixtures/jwks.json");
const SUB: &str = "user_0123456789abcdef";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn settings() -> AuthSettings {
    AuthSettings {
        jwt_secret: Some(SECRET.into()),
        jwks_url: None,
        jwt_issuer: None,
        jwt_audience: None,
        dev_tokens: true,
        leeway_secs: 60,
        jwks_refetch_interval_secs: 30,
        jwks_refresh_secs: 300,
        token_cache_size: 1000,
        authorized_parties: Vec::new(),
    }
}

fn hs(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs(claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-a".into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(RSA_A).unwrap()).unwrap()
}

fn fixture_keys() -> Vec<Value> {
    serde_json::from_str::<Value>(JWKS).unwrap()["keys"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn an_accepted_token_is_cached_and_answers_the_same_claims() {
    let auth = Authenticator::new(&settings());
    let token = hs(&json!({"sub": SUB, "exp": now() + 600, "email": "a@example.test"}));
    let first = auth.verify(&token).await.unwrap();
    assert_eq!(auth.cached_tokens(), 1);
    let again = auth.verify(&token).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(auth.cached_tokens(), 1);
}

#[tokio::test]
async fn refused_leeway_only_early_and_dev_tokens_are_not_cached() {
    let auth = Authenticator::new(&settings());
    let t = now();
    let refused = [
        hs(&json!({"sub": SUB, "exp": t - 3600})),
        hs(&json!({"sub": SUB, "exp": t + 600, "nbf": t + 600})),
        hs(&json!({"sub": "not valid!", "exp": t + 600})),
    ];
    for token in &refused {
        assert!(auth.verify(token).await.is_err());
        assert!(
            auth.verify(token).await.is_err(),
            "still refused the second time"
        );
    }
    // Accepted, but only within the leeway: expired a moment ago, or before its nbf.
    let leeway_only = [
        hs(&json!({"sub": SUB, "exp": t - 5})),
        hs(&json!({"sub": SUB, "exp": t + 600, "nbf": t + 30})),
    ];
    for token in &leeway_only {
        assert!(auth.verify(token).await.is_ok());
    }
    assert!(auth.verify(&format!("dev:{SUB}")).await.is_ok());
    assert_eq!(auth.cached_tokens(), 0);
}

#[tokio::test]
async fn a_cache_size_of_zero_caches_nothing() {
    let auth = Authenticator::new(&AuthSettings {
        token_cache_size: 0,
        ..settings()
    });
    let token = hs(&json!({"sub": SUB, "exp": now() + 600}));
    assert!(auth.verify(&token).await.is_ok());
    assert!(auth.verify(&token).await.is_ok());
    assert_eq!(auth.cached_tokens(), 0);
}

#[test]
fn a_new_key_set_drops_the_kids_it_lost_or_changed_and_keeps_the_rest() {
    let all = fixture_keys();
    let old = KeySet::from_values(all.clone());
    assert!(
        old.dropped_in(&old.clone()).is_empty(),
        "the same set drops nothing"
    );
    let without_a: Vec<Value> = all
        .iter()
        .filter(|k| k["kid"] != "rsa-a")
        .cloned()
        .collect();
    assert_eq!(old.dropped_in(&KeySet::from_values(without_a)), ["rsa-a"]);
    // rsa-b's material served under the kid rsa-a: rsa-a's tokens must go.
    let swapped: Vec<Value> = all
        .iter()
        .map(|k| match k["kid"].as_str() {
            Some("rsa-a") => {
                let mut b = all.iter().find(|k| k["kid"] == "rsa-b").unwrap().clone();
                b["kid"] = json!("rsa-a");
                b
            }
            _ => k.clone(),
        })
        .collect();
    assert_eq!(old.dropped_in(&KeySet::from_values(swapped)), ["rsa-a"]);
    let mut dropped = old.dropped_in(&KeySet::default());
    dropped.sort();
    assert_eq!(dropped, ["ec-p256", "ed25519", "rsa-a", "rsa-b"]);
}

#[test]
fn azp_is_checked_only_when_a_list_is_set_and_the_token_has_one() {
    let list = vec![
        "https://app.example".to_string(),
        "vscode-webview://x".to_string(),
    ];
    assert!(authorized_party(&[], Some(&json!("https://evil.example"))));
    assert!(
        authorized_party(&list, None),
        "no azp: accepted (Clerk's rule)"
    );
    assert!(authorized_party(&list, Some(&Value::Null)));
    assert!(authorized_party(&list, Some(&json!("vscode-webview://x"))));
    assert!(!authorized_party(
        &list,
        Some(&json!("https://evil.example"))
    ));
    assert!(
        !authorized_party(&list, Some(&json!("https://APP.example"))),
        "exact match"
    );
    assert!(!authorized_party(
        &list,
        Some(&json!(["https://app.example"]))
    ));

    let v = Verifier::new(&AuthSettings {
        authorized_parties: list,
        ..settings()
    });
    let keys = KeySet::default();
    let exp = now() + 600;
    assert!(v
        .verify(
            &hs(&json!({"sub": SUB, "exp": exp, "azp": "https://app.example"})),
            &keys
        )
        .is_ok());
    assert!(v
        .verify(&hs(&json!({"sub": SUB, "exp": exp})), &keys)
        .is_ok());
    let other = hs(&json!({"sub": SUB, "exp": exp, "azp": "https://evil.example"}));
    assert!(matches!(
        v.verify(&other, &keys),
        Err(AuthError::Invalid(_))
    ));
}

/// Not a timed assertion: prints what one cached verify costs against a full
/// RS256 verify. `cargo test --release -p gateway --lib cache_tests::timing -- --ignored --nocapture`
#[tokio::test]
#[ignore]
async fn timing_of_a_cached_verify_against_an_rs256_verify() {
    const N: u32 = 2000;
    let claims = json!({"sub": SUB, "exp": now() + 3600, "iat": now(), "email": "a@example.test",
        "azp": "https://app.example", "sid": "sess_2abcdefghijklmnopqrstuvwxyz"});
    let keys = KeySet::from_values(fixture_keys());
    let v = Verifier::new(&settings());
    let token = rs(&claims);
    let t = Instant::now();
    for _ in 0..N {
        v.verify(&token, &keys).unwrap();
    }
    let rs256 = t.elapsed() / N;
    // The hit path of `Authenticator::verify`: hash, one shard lock, a clone.
    let cache = TokenCache::new(100_000);
    let c = v.verify(&token, &keys).unwrap();
    cache.insert(
        cache::token_hash(&token),
        c,
        unix_now() + 3600,
        Some("rsa-a".into()),
        0,
        unix_now(),
    );
    let t = Instant::now();
    for _ in 0..N * 50 {
        cache.get(&cache::token_hash(&token), unix_now()).unwrap();
    }
    let hit = t.elapsed() / (N * 50);
    // The whole `Authenticator::verify` on a cached token (HS256 to need no JWKS server).
    let auth = Authenticator::new(&settings());
    let hs_token = hs(&claims);
    auth.verify(&hs_token).await.unwrap();
    let t = Instant::now();
    for _ in 0..N * 50 {
        auth.verify(&hs_token).await.unwrap();
    }
    let whole = t.elapsed() / (N * 50);
    let auth0 = Authenticator::new(&AuthSettings {
        token_cache_size: 0,
        ..settings()
    });
    let t = Instant::now();
    for _ in 0..N * 5 {
        auth0.verify(&hs_token).await.unwrap();
    }
    let hs_uncached = t.elapsed() / (N * 5);
    println!(
        "token {} bytes: RS256 verify {rs256:?}; cache hit (hash+lookup) {hit:?}; \
         Authenticator::verify cached {whole:?}; HS256 uncached {hs_uncached:?}",
        token.len()
    );
}
