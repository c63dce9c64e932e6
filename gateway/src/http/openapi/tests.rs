//! The derived document holds what docs/api.md promises of it.

use std::collections::HashMap;
use std::path::Path;

use super::*;

/// The document as a gateway with the default settings serves it.
fn served() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let vars = HashMap::from([("JWT_SECRET".to_string(), "x".repeat(32))]);
        configured(
            &common::settings::Settings::load_from(Path::new("/nonexistent"), &vars).unwrap(),
        )
    })
}

/// Every operation of the served document.
fn served_operations() -> Vec<(&'static str, String, &'static Value)> {
    let mut out = Vec::new();
    for (path, item) in served()["paths"].as_object().into_iter().flatten() {
        for method in ["get", "post", "put", "patch", "delete"] {
            if let Some(op) = item.get(method) {
                out.push((method, path.clone(), op));
            }
        }
    }
    out
}

/// `$ref`s resolved against the components, `oneOf`/`anyOf [null, x]` to `x`.
fn resolve(v: &Value) -> Value {
    let schemas = &served()["components"]["schemas"];
    if let Some(r) = v["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return resolve(&schemas[name]);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = v[key].as_array() {
            let some: Vec<_> = alts.iter().filter(|a| a["type"] != "null").collect();
            if some.len() == 1 && alts.len() == 2 {
                return resolve(some[0]);
            }
        }
    }
    v.clone()
}

fn types(v: &Value) -> Vec<String> {
    match &v["type"] {
        Value::String(t) => vec![t.clone()],
        Value::Array(ts) => ts
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
        _ => vec![],
    }
}

fn json_schema(content: &Value) -> Option<&Value> {
    content.get("application/json").map(|c| &c["schema"])
}

#[test]
fn the_document_is_a_valid_openapi_3_1_model() {
    let doc = document().clone();
    assert_eq!(doc["openapi"], "3.1.0");
    let parsed: utoipa::openapi::OpenApi = serde_json::from_value(doc).expect("OpenAPI 3 model");
    assert!(parsed.paths.paths.contains_key("/api/vscode/usage/track"));
}

#[test]
fn every_operation_has_a_summary_one_tag_a_unique_id_and_a_success() {
    let mut ids = std::collections::HashSet::new();
    for (method, path, op) in operations() {
        let what = format!("{method} {path}");
        assert!(
            op["summary"].as_str().is_some_and(|s| !s.is_empty()),
            "{what}: summary"
        );
        let tags = op["tags"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: tags"));
        assert_eq!(tags.len(), 1, "{what}: one tag");
        let tag = tags[0].as_str().unwrap();
        let class = super::super::Class::parse(tag);
        if path.starts_with("/api/") {
            assert!(
                class.is_some(),
                "{what}: an /api route's tag is its class, not {tag}"
            );
            assert_eq!(op["x-rate-limit-class"], tag, "{what}");
            assert!(op["responses"].get("401").is_some(), "{what}: 401");
        } else {
            assert_eq!(tag, "ops", "{what}");
        }
        assert!(
            ids.insert(op["operationId"].as_str().unwrap().to_string()),
            "{what}: id"
        );
        let ok = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|s| s.starts_with('2'))
            .count();
        assert_eq!(ok, 1, "{what}: one success status");
    }
    assert!(
        operations().len() >= 24,
        "{} operations",
        operations().len()
    );
}

/// Walks a schema; `problems` gets every member without a type, every body
/// string without a length bound or enum, every body integer without bounds.
fn check(v: &Value, at: &str, body: bool, described: bool, problems: &mut Vec<String>) {
    let v = resolve(v);
    let described = described || v.get("description").is_some();
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(alts) = v[key].as_array() {
            for (i, a) in alts.iter().enumerate() {
                check(a, &format!("{at}/{key}{i}"), body, described, problems);
            }
            return;
        }
    }
    let ts = types(&v);
    if ts.is_empty() && v.get("enum").is_none() {
        problems.push(format!("{at}: no type"));
        return;
    }
    if ts.iter().any(|t| t == "object") {
        if let Some(props) = v["properties"].as_object() {
            for (name, p) in props {
                check(p, &format!("{at}.{name}"), body, false, problems);
            }
        } else if !described {
            problems.push(format!(
                "{at}: an object with neither members nor a description"
            ));
        }
    }
    if ts.iter().any(|t| t == "array") {
        check(&v["items"], &format!("{at}[]"), body, described, problems);
        if body && v.get("maxItems").is_none() {
            problems.push(format!("{at}: a body array without maxItems"));
        }
    }
    if body && ts.iter().any(|t| t == "string") {
        let bounded =
            v.get("maxLength").is_some() || v.get("enum").is_some() || v.get("format").is_some();
        if !bounded {
            problems.push(format!(
                "{at}: a body string without maxLength, enum or format"
            ));
        }
    }
    if body && ts.iter().any(|t| t == "integer") && v.get("maximum").is_none() {
        problems.push(format!("{at}: a body integer without maximum"));
    }
}

#[test]
fn every_body_and_answer_lists_its_members_with_their_types_and_every_body_its_limits() {
    let mut problems = Vec::new();
    for (method, path, op) in served_operations() {
        let what = format!("{method} {path}");
        let body = &op["requestBody"];
        if let Some(schema) = body.get("content").and_then(json_schema) {
            let described = body.get("description").is_some();
            check(
                schema,
                &format!("{what} body"),
                true,
                described,
                &mut problems,
            );
        }
        for (status, resp) in op["responses"].as_object().unwrap() {
            if let Some(schema) = resp.get("content").and_then(json_schema) {
                check(
                    schema,
                    &format!("{what} {status}"),
                    false,
                    false,
                    &mut problems,
                );
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_limits_are_the_parsers() {
    let consume = resolve(
        &served_operations()
            .into_iter()
            .find(|(m, p, _)| *m == "post" && p == "/api/users/{id}/credits/consume")
            .unwrap()
            .2["requestBody"]["content"]["application/json"]["schema"],
    );
    let amount = resolve(&consume["properties"]["amount"]);
    assert_eq!(amount["minimum"], 1);
    assert_eq!(amount["maximum"], json!(common::settings::MAX_CREDITS));
    let description = resolve(&consume["properties"]["description"]);
    assert_eq!(description["maxLength"], 1024);
    assert_eq!(description["pattern"], common::valid::FREE_TEXT_PATTERN);
}

#[test]
fn the_hold_lifetime_bound_is_the_setting() {
    let hold = resolve(&served()["components"]["schemas"]["HoldBody"]);
    assert_eq!(resolve(&hold["properties"]["ttl_secs"])["maximum"], 3600);
}

#[test]
fn the_override_bounds_are_the_handlers() {
    use super::super::admin::{RateLimitBody, MAX_OVERRIDE_LIMIT, MAX_OVERRIDE_WINDOW_SECS};
    let body = serde_json::to_value(<RateLimitBody as utoipa::PartialSchema>::schema()).unwrap();
    assert_eq!(
        body["properties"]["limit"]["maximum"],
        json!(MAX_OVERRIDE_LIMIT)
    );
    assert_eq!(
        body["properties"]["window_secs"]["maximum"],
        json!(MAX_OVERRIDE_WINDOW_SECS)
    );
}

#[test]
fn every_error_answers_the_problem_document() {
    let problem = resolve(&json!({"$ref": "#/components/schemas/Problem"}));
    let codes = resolve(&problem["properties"]["code"]);
    assert!(codes["enum"]
        .as_array()
        .unwrap()
        .contains(&json!("insufficient_credits")));
    for (method, path, op) in operations() {
        for (status, resp) in op["responses"].as_object().unwrap() {
            if path.starts_with("/api/") && (status.starts_with('4') || status.starts_with('5')) {
                assert_eq!(
                    resp["content"]["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{method} {path} {status}"
                );
            }
        }
    }
}
