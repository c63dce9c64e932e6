//! Property tests: arbitrary bytes and arbitrary JSON into every request
//! parser and the event decoder get a clean error or a valid parse, never a
//! panic. (They call the parsers directly: no IO, thousands of cases.)

use common::events::Envelope;
use gateway::http::error::ApiError;
use gateway::http::extract::parse_json;
use proptest::prelude::*;
use serde_json::{json, Value};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        prop_oneof![
            Just("model"),
            Just("feature"),
            Just("events"),
            Just("2026-11-25T12:00:00Z")
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::hash_map(
                prop_oneof![
                    Just("kind".to_string()),
                    Just("events".to_string()),
                    Just("provider".to_string()),
                    Just("model".to_string()),
                    Just("prompt_tokens".to_string()),
                    Just("completion_tokens".to_string()),
                    Just("feature".to_string()),
                    Just("metadata".to_string()),
                    Just("occurred_at".to_string()),
                    Just("event_id".to_string()),
                    Just("modelId".to_string()),
                    Just("tokensUsed".to_string()),
                    Just("amount".to_string()),
                    ".{0,12}".prop_map(|s| s)
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn is_client_error(e: &ApiError) -> bool {
    let s = e.status().as_u16();
    (400..500).contains(&s)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_a_400_or_a_value(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        match parse_json::<Value>(&bytes) {
            Ok(_) => {}
            Err(e) => prop_assert!(is_client_error(&e)),
        }
    }

    #[test]
    fn arbitrary_json_into_usage_track_is_a_422_or_valid_events(body in arb_json()) {
        match gateway::usage::parse_track(&body, "user_1", chrono::Utc::now()) {
            Ok((_, events)) => {
                prop_assert!(!events.is_empty() && events.len() <= 500);
                for e in events {
                    prop_assert_eq!(e.user_id.as_str(), "user_1");
                }
            }
            Err(e) => prop_assert_eq!(ApiError::from(e).status().as_u16(), 422),
        }
    }

    #[test]
    fn arbitrary_bytes_and_json_into_the_event_decoder_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        value in arb_json(),
    ) {
        let _ = Envelope::from_bytes(&bytes);
        let _ = Envelope::from_bytes(&serde_json::to_vec(&value).unwrap());
        let mut env = json!({"id": "00000000-0000-0000-0000-000000000000", "version": 1, "occurred_at": "2026-11-25T12:00:00Z", "received_at": "2026-11-25T12:00:00Z"});
        env["type"] = json!("usage.batch");
        env["data"] = value;
        let _ = Envelope::from_bytes(&serde_json::to_vec(&env).unwrap());
    }

    #[test]
    fn arbitrary_tokens_are_refused_without_panic(token in ".{0,300}") {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let settings = common::settings::AuthSettings {
            jwt_secret: Some("s".into()), jwks_url: None, jwt_issuer: None, jwt_audience: None,
            dev_tokens: false, leeway_secs: 60, jwks_refetch_interval_secs: 30,
            jwks_refresh_secs: 300, token_cache_size: 0, authorized_parties: Vec::new(),
        };
        let auth = gateway::auth::Authenticator::new(&settings);
        let header = format!("Bearer {token}");
        prop_assert!(rt.block_on(auth.verify_header(Some(&header))).is_err());
    }
}
