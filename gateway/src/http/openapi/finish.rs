//! What every operation of the document has in common, added in one place
//! after utoipa has derived each operation from its handler
//! (`#[utoipa::path]`): the rules below are the router's and the guard's, so
//! the handlers do not repeat them.
//!
//! - a path parameter per `{name}` in the path (a string of at most 64
//!   characters: user ids and hold ids);
//! - for an operation whose tag is an endpoint class ([`Class`]): bearer
//!   security, `x-rate-limit-class`, and the errors the guard and the body
//!   extractor may answer on every `/api/` route (401, 403, 422, 429; 400 and
//!   415 with a body; 404 with a path parameter);
//! - a problem+json body (`#/components/schemas/Problem`) on every error
//!   that does not document a body of its own;
//! - `operationId` from the method and the path (stable across handler
//!   renames: generated clients name their functions after it).

use common::class::Class;
use serde_json::{json, Map, Value};

/// Path parameters are ids: at most this many characters.
pub const PATH_PARAM_MAX: usize = 64;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Applies the rules above to every operation of `doc` (an OpenAPI 3 document
/// as JSON).
pub fn finish(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        for method in METHODS {
            if let Some(op) = item.get_mut(method).and_then(Value::as_object_mut) {
                finish_operation(method, path, op);
            }
        }
    }
}

/// The class an operation is guarded by: its tag, when the tag names one.
pub fn class_of(op: &Map<String, Value>) -> Option<Class> {
    op.get("tags")?
        .as_array()?
        .iter()
        .find_map(|t| Class::parse(t.as_str()?))
}

fn finish_operation(method: &str, path: &str, op: &mut Map<String, Value>) {
    op.insert("operationId".into(), json!(operation_id(method, path)));
    add_path_params(path, op);
    let class = class_of(op);
    let has_body = op.contains_key("requestBody");
    let responses = op
        .entry("responses")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("responses is an object");
    for status in common_errors(class.is_some(), has_body, path.contains('{')) {
        responses
            .entry(status.to_string())
            .or_insert_with(|| json!({"description": reason(status)}));
    }
    for (status, response) in responses.iter_mut() {
        // An error without a body of its own (`/readyz`'s 503 has one).
        let errs = status.starts_with('4') || status.starts_with('5');
        if errs && response.get("content").is_none() {
            response["content"] = json!({"application/problem+json":
                {"schema": {"$ref": "#/components/schemas/Problem"}}});
        }
        // Every answer carries it (SPEC §5, `http::request_id`).
        if let Some(r) = response.as_object_mut() {
            let headers = r.entry("headers").or_insert_with(|| json!({}));
            if let Some(h) = headers.as_object_mut() {
                h.entry("X-Request-Id").or_insert_with(|| {
                    json!({"description": "The caller's id when 1..=128 of [A-Za-z0-9._:-], else a new one.",
                           "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}})
                });
            }
        }
    }
    if let Some(class) = class {
        op.insert("security".into(), json!([{"bearer": []}]));
        op.insert("x-rate-limit-class".into(), json!(class.as_str()));
    }
}

/// `post /api/users/{id}/credits/consume` → `post_api_users__id__credits_consume`.
pub fn operation_id(method: &str, path: &str) -> String {
    format!("{method}{}", path.replace(['/', '{', '}', '-'], "_"))
}

fn add_path_params(path: &str, op: &mut Map<String, Value>) {
    let names: Vec<&str> = path
        .split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .collect();
    if names.is_empty() {
        return;
    }
    let params = op
        .entry("parameters")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .expect("parameters is an array");
    for (i, name) in names.into_iter().enumerate() {
        let declared = params
            .iter()
            .any(|p| p["in"] == "path" && p["name"] == name);
        if !declared {
            params.insert(
                i,
                json!({"name": name, "in": "path", "required": true,
                       "schema": {"type": "string", "minLength": 1, "maxLength": PATH_PARAM_MAX}}),
            );
        }
    }
}

/// The errors any guarded route may answer, whatever its handler does.
fn common_errors(guarded: bool, has_body: bool, has_param: bool) -> Vec<u16> {
    let mut out = Vec::new();
    if guarded {
        out.extend([401, 403, 422, 429]);
        if has_body {
            out.extend([400, 415]);
        }
    }
    if has_param {
        // A malformed or unknown id in the path (`http::target`).
        out.push(404);
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Body is not JSON",
        401 => "Missing or invalid token",
        403 => "Forbidden, suspended or deleted account",
        404 => "Not found",
        415 => "Body is not application/json",
        422 => "Validation failed (detail names the field)",
        429 => "Rate limited",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        json!({"paths": {
            "/api/users/{id}/credits/holds/{hold_id}/settle": {"post": {
                "tags": ["credits"], "requestBody": {"content": {}},
                "responses": {"200": {"description": "ok"}, "409": {"description": "conflict"}}
            }},
            "/healthz": {"get": {"tags": ["ops"], "responses": {"200": {"description": "ok"}}}}
        }})
    }

    #[test]
    fn a_guarded_operation_gets_security_its_class_the_common_errors_and_its_path_params() {
        let mut d = doc();
        finish(&mut d);
        let op = &d["paths"]["/api/users/{id}/credits/holds/{hold_id}/settle"]["post"];
        assert_eq!(op["x-rate-limit-class"], "credits");
        assert_eq!(op["security"], json!([{"bearer": []}]));
        assert_eq!(
            op["operationId"],
            "post_api_users__id__credits_holds__hold_id__settle"
        );
        let names: Vec<_> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["id", "hold_id"]);
        let statuses: Vec<_> = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        for s in [
            "200", "400", "401", "403", "404", "409", "415", "422", "429",
        ] {
            assert!(statuses.iter().any(|k| k == s), "{s} in {statuses:?}");
        }
        // The handler's own description is kept; every error gets the problem body.
        assert_eq!(op["responses"]["409"]["description"], "conflict");
        assert_eq!(
            op["responses"]["409"]["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/Problem"
        );
        assert!(op["responses"]["200"].get("content").is_none());
    }

    #[test]
    fn an_ops_operation_has_no_security_and_no_guard_errors() {
        let mut d = doc();
        finish(&mut d);
        let op = &d["paths"]["/healthz"]["get"];
        assert!(op.get("security").is_none());
        assert!(op.get("x-rate-limit-class").is_none());
        assert!(op.get("parameters").is_none());
        assert_eq!(op["responses"].as_object().unwrap().len(), 1);
    }

    #[test]
    fn a_declared_path_param_is_not_added_twice() {
        let mut d = json!({"paths": {"/x/{id}": {"get": {"parameters": [
            {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
            {"name": "limit", "in": "query", "schema": {"type": "integer"}}
        ], "responses": {}}}}});
        finish(&mut d);
        assert_eq!(
            d["paths"]["/x/{id}"]["get"]["parameters"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
