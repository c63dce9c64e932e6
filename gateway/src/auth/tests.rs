//! The JWT attack matrix of docs/api.md "Conventions", on the verifier alone: no
//! gateway, no JWKS server, no service. The keys are the e2e fixtures (made with
//! openssl; `make_jwks.py` built `jwks.json` from them). What needs HTTP (a
//! refused token's 401 problem+json, the JWKS fetch, re-fetch and an
//! unreachable JWKS, the `Authorization` header over the wire) stays in
//! e2e/tests/api/auth.rs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

const SECRET: &str = "unit-test-secret-of-adequate-length-0123456789";
const ISSUER: &str = "https://clerk.example.test";
const AUDIENCE: &str = "vsc-backend";

const RSA_A: &[u8] = include_bytes!("../../../e2e/tests/fixtures/rsa_a.pem");
const RSA_A_PUBLIC: &[u8] = include_bytes!("../../../e2e/tests/fixtures/rsa_a.pub.pem");
const RSA_B: &[u8] = include_bytes!("../../../e2e/tests/fixtures/rsa_b.pem");
const EC_P256: &[u8] = include_bytes!("../../../e2e/tests/fixtures/ec_p256.pem");
const ED25519: &[u8] = include_bytes!("../../../e2e/tests/fixtures/ed25519.pem");
const JWKS: &str = include_str!("../../../e2e/tests/fixtures/jwks.json");

/// A key to sign test tokens with.
#[derive(Clone, Copy, Debug)]
enum Signer {
    /// HS256 with [`SECRET`].
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

fn now() -> i64 {
    chrono::Utc::now().timestamp()
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

/// HS256 with `secret` as the key, naming `kid`.
fn sign_hs_with(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
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

const SUB: &str = "user_0123456789abcdef";

/// Claims that pass every check of [`strict`].
fn good_claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "iat": now(), "iss": ISSUER, "aud": AUDIENCE})
}

fn with(claims: &Value, k: &str, v: Value) -> Value {
    let mut c = claims.clone();
    c[k] = v;
    c
}

fn without(claims: &Value, k: &str) -> Value {
    let mut c = claims.clone();
    c.as_object_mut().unwrap().remove(k);
    c
}

/// Every key source and every optional check switched on, as the strict app of
/// the e2e tests: `JWT_SECRET`, the JWKS of all fixture keys, issuer, audience,
/// the default 60 s leeway, no dev tokens.
fn strict_settings() -> AuthSettings {
    AuthSettings {
        jwt_secret: Some(SECRET.into()),
        jwks_url: Some("http://127.0.0.1:1/unused/jwks.json".into()),
        jwt_issuer: Some(ISSUER.into()),
        jwt_audience: Some(AUDIENCE.into()),
        dev_tokens: false,
        leeway_secs: 60,
        jwks_refetch_interval_secs: 30,
        jwks_refresh_secs: 300,
        token_cache_size: 1000,
        authorized_parties: Vec::new(),
    }
}

/// The verifier and key set of [`strict_settings`].
fn strict() -> (Verifier, KeySet) {
    let keys = KeySet::from_json(JWKS).expect("fixture JWKS");
    assert_eq!(keys.len(), 4, "every fixture key is usable");
    (Verifier::new(&strict_settings()), keys)
}

/// The whole path of a request's `Authorization` header, minus HTTP.
fn check(v: &Verifier, keys: &KeySet, header: Option<&str>) -> Result<Claims, AuthError> {
    bearer_token(header).and_then(|t| v.verify(t, keys))
}

/// Refused as a 401 answers it: missing or invalid, never "keys unavailable".
fn assert_refused(v: &Verifier, keys: &KeySet, case: &str, header: Option<&str>) {
    match check(v, keys, header) {
        Err(AuthError::Missing | AuthError::Invalid(_)) => {}
        Err(e @ AuthError::KeysUnavailable) => panic!("{case}: {e} (a 503, not a 401)"),
        Ok(c) => panic!("{case}: accepted as {c:?}"),
    }
}

fn assert_token_refused(v: &Verifier, keys: &KeySet, case: &str, token: &str) {
    assert_refused(v, keys, case, Some(&format!("Bearer {token}")));
}

fn assert_token_accepted(v: &Verifier, keys: &KeySet, case: &str, token: &str) -> Claims {
    check(v, keys, Some(&format!("Bearer {token}")))
        .unwrap_or_else(|e| panic!("{case}: refused: {e}"))
}

#[test]
fn user_ids_follow_clerks_form() {
    assert!(valid_user_id("user_2abcXYZ-9"));
    assert!(!valid_user_id(""));
    assert!(!valid_user_id(&"a".repeat(65)));
    assert!(!valid_user_id("user 1"));
    assert!(!valid_user_id("user/../1"));
    assert!(!valid_user_id("üser"));
}

/// The 33 attacks the e2e matrix ran over HTTP (docs/reliability.md), and
/// every key family accepted.
#[test]
fn every_attack_in_the_jwt_matrix_is_refused_and_every_key_family_is_accepted() {
    let (v, keys) = strict();
    let good = good_claims(SUB);
    let other = "user_someone_else";
    let bearer = |t: String| Some(format!("Bearer {t}"));

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
            bearer(raw_token(&json!({"alg": "none", "typ": "JWT"}), &good, b"")),
        ),
        (
            "alg none with a kid",
            bearer(raw_token(
                &json!({"alg": "none", "kid": "rsa-a"}),
                &good,
                b"",
            )),
        ),
        (
            "HS256 without signature",
            bearer(raw_token(&json!({"alg": "HS256"}), &good, b"")),
        ),
        (
            "HS/RS confusion with the RSA kid",
            bearer(sign_hs_with(RSA_A_PUBLIC, Some("rsa-a"), &good)),
        ),
        (
            "HS/RS confusion without kid",
            bearer(sign_hs_with(RSA_A_PUBLIC, None, &good)),
        ),
        (
            "HS256 with a wrong secret",
            bearer(sign_hs_with(
                b"not-the-secret-not-the-secret-000",
                None,
                &good,
            )),
        ),
        (
            "tampered RS256 signature",
            bearer(tamper_signature(&sign(Signer::RsaA, &good))),
        ),
        (
            "tampered HS256 signature",
            bearer(tamper_signature(&sign(Signer::Secret, &good))),
        ),
        (
            "tampered payload",
            bearer(tamper_payload(
                &sign(Signer::Ec, &good_claims(other)),
                &good,
            )),
        ),
        (
            "RS256 signed under the EC key's kid",
            bearer(sign_as(Signer::RsaA, Some("ec-p256"), &good)),
        ),
        (
            "RSA key B under key A's kid",
            bearer(sign_as(Signer::RsaB, Some("rsa-a"), &good)),
        ),
        (
            "EdDSA under the EC key's kid",
            bearer(sign_as(Signer::Ed, Some("ec-p256"), &good)),
        ),
        (
            "unknown kid",
            bearer(sign_as(Signer::RsaA, Some("nope"), &good)),
        ),
        (
            "expired beyond the leeway",
            bearer(sign(Signer::RsaA, &with(&good, "exp", json!(now() - 120)))),
        ),
        (
            "nbf in the future",
            bearer(sign(Signer::Ec, &with(&good, "nbf", json!(now() + 300)))),
        ),
        (
            "wrong iss",
            bearer(sign(
                Signer::Ed,
                &with(&good, "iss", json!("https://evil.test")),
            )),
        ),
        (
            "missing iss",
            bearer(sign(Signer::Secret, &without(&good, "iss"))),
        ),
        (
            "iss of the wrong type",
            bearer(sign(Signer::Secret, &with(&good, "iss", json!(42)))),
        ),
        (
            "wrong aud",
            bearer(sign(
                Signer::RsaA,
                &with(&good, "aud", json!("someone-else")),
            )),
        ),
        (
            "missing aud",
            bearer(sign(Signer::Secret, &without(&good, "aud"))),
        ),
        (
            "exp as a string",
            bearer(sign(
                Signer::Secret,
                &with(&good, "exp", json!((now() + 3600).to_string())),
            )),
        ),
        (
            "missing exp",
            bearer(sign(Signer::Secret, &without(&good, "exp"))),
        ),
        (
            "missing sub",
            bearer(sign(Signer::Secret, &without(&good, "sub"))),
        ),
        (
            "sub with spaces",
            bearer(sign(Signer::Secret, &with(&good, "sub", json!("user 1")))),
        ),
        (
            "sub of 65 characters",
            bearer(sign(
                Signer::Secret,
                &with(&good, "sub", json!("a".repeat(65))),
            )),
        ),
        (
            "numeric sub",
            bearer(sign(Signer::Secret, &with(&good, "sub", json!(7)))),
        ),
        (
            "dev token while disabled",
            Some(format!("Bearer dev:{SUB}")),
        ),
    ];
    assert_eq!(attacks.len(), 33);
    for (case, header) in &attacks {
        assert_refused(&v, &keys, case, header.as_deref());
    }

    let accepted: Vec<(&str, String)> = vec![
        ("HS256 without kid", sign(Signer::Secret, &good)),
        ("RS256", sign(Signer::RsaA, &good)),
        ("RS256 with the second RSA key", sign(Signer::RsaB, &good)),
        ("ES256", sign(Signer::Ec, &good)),
        ("EdDSA", sign(Signer::Ed, &good)),
        (
            "expired within the leeway",
            sign(Signer::RsaA, &with(&good, "exp", json!(now() - 30))),
        ),
        (
            "nbf within the leeway",
            sign(Signer::Ec, &with(&good, "nbf", json!(now() + 30))),
        ),
    ];
    for (case, token) in &accepted {
        let claims = assert_token_accepted(&v, &keys, case, token);
        assert_eq!(claims.sub, SUB, "{case}");
    }
}

#[test]
fn a_token_with_alg_none_is_refused() {
    let (v, keys) = strict();
    for header in [
        json!({"alg": "none"}),
        json!({"alg": "none", "kid": "rsa-a"}),
        json!({"alg": "NONE"}),
    ] {
        let token = raw_token(&header, &good_claims(SUB), b"");
        assert_token_refused(&v, &keys, &header.to_string(), &token);
    }
    assert_token_accepted(&v, &keys, "HS256", &sign(Signer::Secret, &good_claims(SUB)));
}

#[test]
fn an_hs256_token_signed_with_the_rsa_public_key_under_its_kid_is_refused() {
    let (v, keys) = strict();
    let token = sign_hs_with(RSA_A_PUBLIC, Some("rsa-a"), &good_claims(SUB));
    assert_token_refused(&v, &keys, "HS with the public key", &token);
    // The same key, used as the key says, is fine.
    assert_token_accepted(&v, &keys, "RS256", &sign(Signer::RsaA, &good_claims(SUB)));
}

#[test]
fn a_token_with_a_tampered_signature_or_payload_is_refused() {
    let (v, keys) = strict();
    for signer in [Signer::Secret, Signer::RsaA, Signer::Ec, Signer::Ed] {
        let case = format!("{signer:?}");
        let token = sign(signer, &good_claims(SUB));
        assert_token_refused(&v, &keys, &case, &tamper_signature(&token));
        let admin = with(&good_claims(SUB), "role", json!("admin"));
        assert_token_refused(&v, &keys, &case, &tamper_payload(&token, &admin));
        let claims = assert_token_accepted(&v, &keys, &case, &token);
        assert!(!claims.admin);
    }
}

#[test]
fn a_token_expired_beyond_the_60_s_leeway_is_refused_and_one_within_it_is_accepted() {
    let (v, keys) = strict();
    let claims = with(&good_claims(SUB), "exp", json!(now() - 120));
    assert_token_refused(&v, &keys, "RS256", &sign(Signer::RsaA, &claims));
    assert_token_refused(&v, &keys, "HS256", &sign(Signer::Secret, &claims));
    let claims = with(&good_claims(SUB), "exp", json!(now() - 30));
    assert_token_accepted(&v, &keys, "RS256", &sign(Signer::RsaA, &claims));
    assert_token_accepted(&v, &keys, "HS256", &sign(Signer::Secret, &claims));
}

#[test]
fn a_token_used_before_its_nbf_is_refused() {
    let (v, keys) = strict();
    let good = good_claims(SUB);
    let early = with(&good, "nbf", json!(now() + 300));
    assert_token_refused(&v, &keys, "nbf + 300", &sign(Signer::Ec, &early));
    let as_string = with(&good, "nbf", json!((now() + 300).to_string()));
    assert_token_refused(&v, &keys, "nbf as a string", &sign(Signer::Ec, &as_string));
    let past = with(&good, "nbf", json!(now() - 5));
    assert_token_accepted(&v, &keys, "nbf - 5", &sign(Signer::Ec, &past));
}

#[test]
fn a_wrong_or_missing_issuer_is_refused_when_jwt_issuer_is_set() {
    let (v, keys) = strict();
    let good = good_claims(SUB);
    for iss in [
        json!("https://evil.test"),
        json!(""),
        json!(42),
        json!(["https://evil.test"]),
    ] {
        let case = iss.to_string();
        assert_token_refused(
            &v,
            &keys,
            &case,
            &sign(Signer::RsaA, &with(&good, "iss", iss)),
        );
    }
    assert_token_refused(
        &v,
        &keys,
        "no iss",
        &sign(Signer::RsaA, &without(&good, "iss")),
    );
    assert_token_accepted(&v, &keys, "iss", &sign(Signer::RsaA, &good));
}

#[test]
fn a_wrong_or_missing_audience_is_refused_when_jwt_audience_is_set() {
    let (v, keys) = strict();
    let good = good_claims(SUB);
    for aud in [json!("someone-else"), json!(["someone-else"]), json!(7)] {
        let case = aud.to_string();
        assert_token_refused(
            &v,
            &keys,
            &case,
            &sign(Signer::Ed, &with(&good, "aud", aud)),
        );
    }
    assert_token_refused(
        &v,
        &keys,
        "no aud",
        &sign(Signer::Ed, &without(&good, "aud")),
    );
    let several = with(&good, "aud", json!([AUDIENCE, "another-service"]));
    assert_token_accepted(&v, &keys, "aud among others", &sign(Signer::Ed, &several));
    assert_token_accepted(&v, &keys, "aud", &sign(Signer::Ed, &good));
}

#[test]
fn issuer_and_audience_are_not_required_when_not_configured() {
    let settings = AuthSettings {
        jwt_issuer: None,
        jwt_audience: None,
        ..strict_settings()
    };
    let v = Verifier::new(&settings);
    let keys = KeySet::default();
    let any = json!({"sub": SUB, "exp": now() + 60, "iss": "anyone", "aud": "anything"});
    assert_token_accepted(&v, &keys, "any iss and aud", &sign(Signer::Secret, &any));
    let bare = json!({"sub": SUB, "exp": now() + 60});
    assert_token_accepted(&v, &keys, "no iss, no aud", &sign(Signer::Secret, &bare));
    // An empty setting is no setting.
    let empty = AuthSettings {
        jwt_issuer: Some(String::new()),
        jwt_audience: Some(String::new()),
        ..strict_settings()
    };
    let v = Verifier::new(&empty);
    assert_token_accepted(&v, &keys, "empty settings", &sign(Signer::Secret, &bare));
}

#[test]
fn an_exp_given_as_a_string_is_refused() {
    let (v, keys) = strict();
    let claims = with(&good_claims(SUB), "exp", json!((now() + 3600).to_string()));
    assert_token_refused(&v, &keys, "HS256", &sign(Signer::Secret, &claims));
    assert_token_refused(&v, &keys, "ES256", &sign(Signer::Ec, &claims));
}

#[test]
fn a_malformed_sub_is_refused() {
    let (v, keys) = strict();
    for bad in [
        json!("user 1"),
        json!("a".repeat(65)),
        json!(""),
        json!("üser"),
        json!("a/b"),
        json!(1),
        json!(null),
    ] {
        let case = bad.to_string();
        let token = sign(Signer::RsaA, &with(&good_claims(SUB), "sub", bad));
        assert_token_refused(&v, &keys, &case, &token);
    }
    let longest = "a".repeat(64);
    let claims = assert_token_accepted(
        &v,
        &keys,
        "64 characters",
        &sign(Signer::RsaA, &good_claims(&longest)),
    );
    assert_eq!(claims.sub, longest);
}

#[test]
fn a_missing_or_non_bearer_authorization_header_is_missing() {
    for h in [
        None,
        Some(""),
        Some("Bearer"),
        Some("Basic dXNlcjpwYXNz"),
        Some("Token abc"),
    ] {
        assert!(matches!(bearer_token(h), Err(AuthError::Missing)), "{h:?}");
    }
    assert_eq!(bearer_token(Some("Bearer  abc ")).unwrap(), "abc");
    assert_eq!(bearer_token(Some("bearer abc")).unwrap(), "abc");
    // An empty token is no token either (refused by the verifier).
    let (v, keys) = strict();
    assert_refused(&v, &keys, "Bearer ", Some("Bearer "));
}

#[test]
fn a_garbage_token_is_refused() {
    let (v, keys) = strict();
    for token in [
        "garbage",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9..",
        &"x".repeat(4000),
    ] {
        assert_token_refused(&v, &keys, token, token);
    }
}

#[test]
fn rs256_es256_and_eddsa_tokens_from_the_jwks_are_accepted() {
    let (v, keys) = strict();
    for signer in [Signer::RsaA, Signer::RsaB, Signer::Ec, Signer::Ed] {
        let sub = format!("user_{signer:?}");
        let mut claims = good_claims(&sub);
        claims["email"] = json!("a@example.com");
        claims["name"] = json!("A");
        claims["role"] = json!("admin");
        let c = assert_token_accepted(&v, &keys, &sub, &sign(signer, &claims));
        assert_eq!(
            c,
            Claims {
                sub,
                email: Some("a@example.com".into()),
                name: Some("A".into()),
                admin: true,
            }
        );
    }
}

#[test]
fn a_token_is_checked_only_against_the_key_its_kid_names() {
    let (v, keys) = strict();
    let claims = good_claims(SUB);
    // Each token is validly signed by some key in the set, but not the one named.
    for (signer, kid) in [
        (Signer::RsaA, "ec-p256"),
        (Signer::RsaB, "rsa-a"),
        (Signer::Ec, "ed25519"),
        (Signer::Ed, "rsa-a"),
    ] {
        let case = format!("{signer:?} under {kid}");
        assert_token_refused(&v, &keys, &case, &sign_as(signer, Some(kid), &claims));
    }
    // A JWKS-signed token without a kid is checked against JWT_SECRET only.
    assert_token_refused(
        &v,
        &keys,
        "RS256 without kid",
        &sign_as(Signer::RsaA, None, &claims),
    );
    // An HS256 token naming a kid is not checked against JWT_SECRET.
    let hs_kid = sign_as(Signer::Secret, Some("rsa-a"), &claims);
    assert_token_refused(&v, &keys, "HS256 with a kid", &hs_kid);
}

#[test]
fn without_a_secret_a_token_without_kid_is_refused() {
    let settings = AuthSettings {
        jwt_secret: Some(String::new()),
        ..strict_settings()
    };
    let (_, keys) = strict();
    let v = Verifier::new(&settings);
    let token = sign(Signer::Secret, &good_claims(SUB));
    assert_token_refused(&v, &keys, "empty JWT_SECRET", &token);
    assert_token_accepted(&v, &keys, "RS256", &sign(Signer::RsaA, &good_claims(SUB)));
}

#[test]
fn dev_tokens_are_accepted_only_when_enabled_and_well_formed() {
    let (_, keys) = strict();
    let v = Verifier::new(&AuthSettings {
        dev_tokens: true,
        ..strict_settings()
    });
    let c = assert_token_accepted(&v, &keys, "dev", &format!("dev:{SUB}"));
    assert_eq!((c.sub.as_str(), c.admin), (SUB, false));
    let c = assert_token_accepted(&v, &keys, "dev admin", &format!("dev:{SUB}:admin"));
    assert_eq!((c.sub.as_str(), c.admin), (SUB, true));
    for bad in ["dev:", "dev:a b", "dev:user:root", "dev::admin"] {
        assert_token_refused(&v, &keys, bad, bad);
    }
    let (strict, _) = strict();
    assert_token_refused(&strict, &keys, "disabled", &format!("dev:{SUB}"));
}

#[test]
fn keys_of_unknown_types_symmetric_or_for_encryption_do_not_spoil_the_rest_of_the_jwks() {
    let all: Value = serde_json::from_str(JWKS).unwrap();
    let mut enc = all["keys"][1].clone();
    enc["use"] = json!("enc");
    let keys = KeySet::from_values(vec![
        json!({"kty": "XYZ", "kid": "future", "crv": "nothing"}),
        enc,
        json!({"kty": "oct", "kid": "symmetric", "k": URL_SAFE_NO_PAD.encode(SECRET)}),
        json!("not even an object"),
        all["keys"][2].clone(),
    ]);
    assert_eq!(keys.len(), 1);
    assert!(keys.get("ec-p256").is_some());
    let (v, _) = strict();
    let claims = good_claims(SUB);
    assert_token_accepted(&v, &keys, "ES256", &sign(Signer::Ec, &claims));
    assert_token_refused(&v, &keys, "encryption key", &sign(Signer::RsaB, &claims));
    // A symmetric key in a JWKS is never used, even under its own kid.
    let symmetric = sign_as(Signer::Secret, Some("symmetric"), &claims);
    assert_token_refused(&v, &keys, "symmetric", &symmetric);
}

#[test]
fn the_key_decides_the_algorithm() {
    let all: Value = serde_json::from_str(JWKS).unwrap();
    let jwk = |i: usize, alg: Option<&str>| {
        let mut k = all["keys"][i].clone();
        match alg {
            Some(a) => k["alg"] = json!(a),
            None => {
                k.as_object_mut().unwrap().remove("alg");
            }
        }
        serde_json::from_value::<Jwk>(k).unwrap()
    };
    assert_eq!(algorithm_of(&jwk(0, None)), Some(Algorithm::RS256));
    assert_eq!(algorithm_of(&jwk(0, Some("PS256"))), Some(Algorithm::PS256));
    assert_eq!(algorithm_of(&jwk(0, Some("ES256"))), None);
    assert_eq!(algorithm_of(&jwk(2, None)), Some(Algorithm::ES256));
    assert_eq!(algorithm_of(&jwk(2, Some("RS256"))), None);
    assert_eq!(algorithm_of(&jwk(3, None)), Some(Algorithm::EdDSA));
    assert_eq!(algorithm_of(&jwk(3, Some("ES256"))), None);
}

/// Without a JWKS URL a token naming a kid is refused at once (no fetch).
#[tokio::test]
async fn a_kid_token_without_a_configured_jwks_is_refused_without_a_fetch() {
    let auth = Authenticator::new(&AuthSettings {
        jwks_url: None,
        ..strict_settings()
    });
    let token = sign(Signer::RsaA, &good_claims(SUB));
    let header = format!("Bearer {token}");
    assert!(matches!(
        auth.verify_header(Some(&header)).await,
        Err(AuthError::Invalid(_))
    ));
    let hs = format!("Bearer {}", sign(Signer::Secret, &good_claims(SUB)));
    assert_eq!(auth.verify_header(Some(&hs)).await.unwrap().sub, SUB);
}
