//! The decisions of API keys, without any service.

use super::*;

fn get() -> Method {
    Method::GET
}

#[test]
fn a_key_is_the_prefix_and_43_base64url_characters_and_lists_show_twelve() {
    assert_eq!(SECRET_CHARS, 43);
    assert_eq!(KEY_CHARS, 47);
    let k = generate();
    assert_eq!(k.key.len(), KEY_CHARS);
    assert!(k.key.starts_with("vsk_"));
    assert!(well_formed(&k.key), "{}", k.key);
    assert_eq!(k.prefix, &k.key[..12]);
    assert_eq!(k.hash, hash(&k.key));
    assert_ne!(generate().key, k.key);
}

#[test]
fn a_known_secret_gives_a_known_key_and_hash() {
    let k = from_secret(&[0u8; 32]);
    assert_eq!(k.key, format!("vsk_{}", "A".repeat(43)));
    // sha256 of the text, as `printf %s KEY | sha256sum` shows it.
    assert_eq!(hex(&k.hash).len(), 64);
    assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    assert_eq!(
        hex(&hash("abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn only_the_exact_shape_is_a_well_formed_key() {
    let good = format!("vsk_{}", "a".repeat(43));
    assert!(well_formed(&good));
    for bad in [
        "vsk_".to_string(),
        format!("vsk_{}", "a".repeat(42)),
        format!("vsk_{}", "a".repeat(44)),
        format!("vsk_{}=", "a".repeat(42)),
        format!("vsk_{}+", "a".repeat(42)),
        format!("vsk_{}\0", "a".repeat(42)),
        format!("vsx_{}", "a".repeat(43)),
        format!("vsk_{}é", "a".repeat(41)),
    ] {
        assert!(!well_formed(&bad), "{bad:?}");
    }
    assert!(is_api_key("vsk_anything") && !is_api_key("eyJhbGciOi") && !is_api_key("dev:u1"));
}

#[test]
fn scopes_need_one_and_never_twice_and_unknown_names_do_not_parse() {
    assert!(check_scopes(&[Scope::Read]).is_ok());
    assert!(check_scopes(&Scope::ALL).is_ok());
    assert!(check_scopes(&[]).is_err());
    assert!(check_scopes(&[Scope::Read, Scope::UsageWrite, Scope::Read]).is_err());
    assert_eq!(
        serde_json::from_str::<Vec<Scope>>(r#"["usage:write","credits:write","read"]"#).unwrap(),
        Scope::ALL
    );
    assert!(serde_json::from_str::<Scope>(r#""admin""#).is_err());
    for s in Scope::ALL {
        assert_eq!(Scope::parse(s.as_str()), Some(s));
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
    }
}

#[test]
fn each_class_and_method_needs_its_scope() {
    let post = Method::POST;
    let cases = [
        (
            Class::Usage,
            &post,
            "/api/vscode/usage/track",
            Some(Scope::UsageWrite),
        ),
        (
            Class::Session,
            &post,
            "/api/vscode/session/validate",
            Some(Scope::UsageWrite),
        ),
        (
            Class::Credits,
            &post,
            "/api/users/u/credits/consume",
            Some(Scope::CreditsWrite),
        ),
        (
            Class::Credits,
            &Method::DELETE,
            "/api/users/u/credits/holds/h",
            Some(Scope::CreditsWrite),
        ),
        (
            Class::Profile,
            &get(),
            "/api/users/u/profile",
            Some(Scope::Read),
        ),
        (
            Class::Profile,
            &get(),
            "/api/users/u/credits/transactions",
            Some(Scope::Read),
        ),
        (
            Class::Profile,
            &get(),
            "/api/vscode/user/balance",
            Some(Scope::Read),
        ),
        (
            Class::Analytics,
            &get(),
            "/api/vscode/analytics",
            Some(Scope::Read),
        ),
        (
            Class::Analytics,
            &get(),
            "/api/users/u/usage/stats",
            Some(Scope::Read),
        ),
    ];
    for (class, method, path, want) in cases {
        assert_eq!(required_scope(class, method, path), want, "{method} {path}");
    }
}

#[test]
fn admin_routes_key_management_export_and_other_writes_never_take_a_key() {
    let never = [
        (Class::Admin, get(), "/api/admin/audit"),
        (
            Class::Admin,
            Method::POST,
            "/api/admin/users/u/credits/grant",
        ),
        (Class::Profile, get(), "/api/users/u/api-keys"),
        (Class::Profile, Method::POST, "/api/users/u/api-keys"),
        (Class::Profile, Method::DELETE, "/api/users/u/api-keys/k"),
        (Class::Profile, get(), "/api/users/u/export"),
        (Class::Profile, Method::DELETE, "/api/users/u"),
        (Class::Profile, Method::PATCH, "/api/users/u/preferences"),
        (Class::Profile, Method::PUT, "/api/users/u/alerts"),
    ];
    for (class, method, path) in never {
        assert_eq!(
            required_scope(class, &method, path),
            None,
            "{method} {path}"
        );
        assert!(
            refusal(&Scope::ALL, class, &method, path).is_some(),
            "{method} {path}"
        );
    }
}

#[test]
fn a_key_passes_only_with_the_scope_the_route_needs() {
    let track = "/api/vscode/usage/track";
    assert_eq!(
        refusal(&[Scope::UsageWrite], Class::Usage, &Method::POST, track),
        None
    );
    let why = refusal(&[Scope::Read], Class::Usage, &Method::POST, track).unwrap();
    assert!(why.contains("usage:write"), "{why}");
    assert_eq!(
        refusal(
            &[Scope::Read],
            Class::Profile,
            &get(),
            "/api/users/u/profile"
        ),
        None
    );
    assert!(refusal(
        &[Scope::UsageWrite],
        Class::Profile,
        &get(),
        "/api/users/u/profile"
    )
    .is_some());
}

#[test]
fn a_record_reads_back_and_a_missing_one_is_unknown_only_beside_its_marker() {
    let g = Grant {
        user_id: "user_1".into(),
        key_id: Uuid::from_u128(7),
        scopes: vec![Scope::UsageWrite, Scope::Read],
    };
    let live = encode_record(Some(&g));
    assert_eq!(decide(Some(&live), true), Found::Grant(g.clone()));
    assert_eq!(decide(Some(&live), false), Found::Grant(g));
    let tomb = encode_record(None);
    assert_eq!(tomb, r#"{"revoked":true}"#, "a tombstone names no user");
    assert_eq!(decide(Some(&tomb), true), Found::Revoked);
    assert_eq!(decide(None, true), Found::Unknown);
    assert_eq!(decide(None, false), Found::AskPostgres);
    assert_eq!(decide(Some("garbage"), true), Found::AskPostgres);
    assert_eq!(
        decide(Some(r#"{"revoked":false}"#), true),
        Found::AskPostgres
    );
}
