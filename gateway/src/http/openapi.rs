//! `GET /openapi.json`: the OpenAPI 3 document of every route, built here from
//! one table of operations and checked against utoipa's OpenAPI model (and, in
//! tests, against the router: every documented route answers, none is missing).

use std::sync::OnceLock;

use axum::routing::get;
use axum::{Json, Router};
use common::valid::{FREE_TEXT_PATTERN, LABEL_PATTERN};
use serde_json::{json, Map, Value};

use crate::state::AppState;

pub(crate) mod track;

/// `class` of a rate-limit override: the names of `Class::ALL`.
pub(crate) fn class_schema() -> utoipa::openapi::Object {
    let names = super::Class::ALL.iter().map(|c| c.as_str());
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(names))
        .build()
}

/// `status` an admin may set: a user is erased, never set to `deleted`.
pub(crate) fn settable_status_schema() -> utoipa::openapi::Object {
    use crate::users::Status;
    let names = [Status::Active, Status::Suspended].map(Status::as_str);
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(names))
        .build()
}

/// The body schemas derived from the types that parse them (`Credits<MIN>`,
/// `common::valid`'s fields and the bodies built from them). Not yet served:
/// the document below still comes from the hand-written table until every
/// operation is derived too (see the tests: each derived body agrees with it).
#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(
    crate::credits::amount::ConsumeBody,
    crate::credits::amount::HoldBody,
    crate::credits::amount::SettleBody,
    crate::credits::amount::GrantBody,
    super::admin::PlanBody,
    super::admin::RateLimitBody,
    super::admin::StatusBody,
    super::sessions::Body,
    track::TrackBody,
)))]
pub struct DerivedBodies;

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(|| async { Json(document().clone()) }))
}

/// One documented operation.
pub struct Op {
    pub method: &'static str,
    pub path: &'static str,
    pub class: Option<&'static str>,
    pub summary: &'static str,
    pub body: Option<fn() -> Value>,
    pub ok: (u16, fn() -> Value),
    /// Error statuses beyond the ones every `/api/` route may answer.
    pub errors: &'static [u16],
    pub query: &'static [(&'static str, &'static str)],
}

fn int() -> Value {
    json!({"type": "integer", "format": "int64"})
}
fn amount() -> Value {
    json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": 9007199254740991i64})
}
/// A label (`common::valid`): 1..=max characters, no control character.
fn string(max: usize) -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": LABEL_PATTERN})
}
/// Free text (`common::valid`): tab, CR and LF allowed, no other control character.
fn text(max: usize) -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": FREE_TEXT_PATTERN})
}
/// A token count, latency or duration: 0..=10^9.
fn count() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": common::valid::MAX_COUNT})
}
fn time() -> Value {
    json!({"type": "string", "format": "date-time"})
}
/// Metadata (`common::valid`): at most 4 KiB and 8 levels; keys are labels,
/// strings free text.
fn object() -> Value {
    json!({"type": "object", "additionalProperties": true,
           "description": "at most 4096 bytes of JSON, nested at most 8 levels; keys without control characters, strings without control characters other than tab, CR and LF"})
}
fn obj(props: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": props, "required": required})
}
fn balance() -> Value {
    obj(
        json!({"balance": int(), "held": int(), "as_of": {"type": ["string", "null"], "format": "date-time"}}),
        &["balance"],
    )
}

fn usage_event() -> Value {
    json!({"type": "object", "required": ["kind"], "properties": {
        "event_id": {"type": "string", "format": "uuid"},
        "kind": {"type": "string", "enum": ["model", "feature"]},
        "session_id": string(128),
        "occurred_at": time(),
        "metadata": object(),
        "provider": string(64), "model": string(128),
        "prompt_tokens": count(), "completion_tokens": count(),
        "latency_ms": count(), "success": {"type": "boolean"},
        "feature": string(64), "action": string(64), "duration_ms": count(),
        "sessionToken": string(128), "modelId": string(128), "tokensUsed": count(),
        "costInCredits": {"type": "number", "minimum": 0}
    }})
}

fn totals() -> Value {
    obj(
        json!({"requests": int(), "prompt_tokens": int(), "completion_tokens": int(), "credits_consumed": int(), "feature_events": int()}),
        &[],
    )
}

/// Every route of the API (docs/api.md), in one table.
pub fn operations() -> Vec<Op> {
    vec![
        Op {
            method: "post",
            path: "/api/vscode/session/validate",
            class: Some("session"),
            summary: "Validate or create a VS Code session",
            body: Some(|| {
                obj(
                    json!({"session_id": string(128), "extension_version": string(64), "vscode_version": string(64),
                        "platform": string(64), "machine_id": string(128), "sessionToken": string(128),
                        "extensionVersion": string(64)}),
                    &[],
                )
            }),
            ok: (200, || {
                obj(
                    json!({"session_id": {"type": "string"}, "status": {"type": "string", "enum": ["created",
                        "active"]}, "expires_at": time(), "user": object(), "credits": object(),
                        "rate_limits": object(), "valid": {"type": "boolean"}, "session": object(),
                        "permissions": {"type": "array", "items": {"type": "string"}}}),
                    &[
                        "session_id",
                        "status",
                        "expires_at",
                        "user",
                        "credits",
                        "rate_limits",
                    ],
                )
            }),
            errors: &[426, 503],
            query: &[],
        },
        Op {
            method: "post",
            path: "/api/vscode/usage/track",
            class: Some("usage"),
            summary: "Track one usage event or a batch (1..=500)",
            body: Some(
                || json!({"oneOf": [usage_event(), obj(json!({"events": {"type": "array", "minItems": 1, "maxItems": 500, "items": usage_event()}}), &["events"])]}),
            ),
            ok: (202, || {
                obj(
                    json!({"accepted": int(), "event_ids": {"type": "array", "items": {"type": "string"}}, "success": {"type": "boolean"}, "remainingCredits": {"type": ["integer", "null"]}}),
                    &["accepted", "event_ids"],
                )
            }),
            errors: &[413, 503],
            query: &[],
        },
        Op {
            method: "get",
            path: "/api/vscode/analytics",
            class: Some("analytics"),
            summary: "Usage analytics of the caller",
            body: None,
            ok: (200, || {
                obj(
                    json!({"user_id": {"type": "string"}, "from": time(), "to": time(), "generated_at": time(),
                        "totals": object(), "by_model": {"type": "array", "items": object()},
                        "by_provider": {"type": "array", "items": object()}, "by_feature": {"type": "array",
                        "items": object()}, "daily": {"type": "array", "items": object()}, "summary": object()}),
                    &["user_id", "totals"],
                )
            }),
            errors: &[503],
            query: &[
                ("days", "integer 1..=365, default 30"),
                ("timeframe", "1d | 7d | 30d"),
            ],
        },
        Op {
            method: "get",
            path: "/api/users/{id}/profile",
            class: Some("profile"),
            summary: "A user's profile",
            body: None,
            ok: (200, || {
                obj(
                    json!({"user_id": {"type": "string"}, "email": {"type": ["string", "null"]},
                        "name": {"type": ["string", "null"]}, "plan": {"type": "string"}, "status": {"type": "string"},
                        "created_at": time(), "last_active_at": {"type": ["string", "null"]}, "credits": balance(),
                        "subscription": {"type": ["object", "null"]}, "preferences": object(), "vscode": object()}),
                    &["user_id", "plan", "status", "credits"],
                )
            }),
            errors: &[404, 503],
            query: &[],
        },
        Op {
            method: "patch",
            path: "/api/users/{id}/preferences",
            class: Some("profile"),
            summary: "Merge preferences (object ≤ 8 KiB)",
            body: Some(object),
            ok: (202, object),
            errors: &[413, 503],
            query: &[],
        },
        Op {
            method: "post",
            path: "/api/users/{id}/credits/consume",
            class: Some("credits"),
            summary: "Consume credits (idempotent with Idempotency-Key)",
            body: Some(|| {
                obj(
                    json!({"amount": amount(), "session_id": string(128), "model": string(128), "provider": string(64),
                        "prompt_tokens": count(), "completion_tokens": count(), "feature": string(64),
                        "description": text(1024), "metadata": object(), "sessionId": string(128),
                        "modelId": string(128), "tokensUsed": count()}),
                    &["amount"],
                )
            }),
            ok: (200, || {
                obj(
                    json!({"transaction_id": {"type": "string"}, "user_id": {"type": "string"}, "amount": int(), "balance": int(), "success": {"type": "boolean"}, "remaining_credits": int()}),
                    &["transaction_id", "user_id", "amount", "balance"],
                )
            }),
            errors: &[402, 409, 503],
            query: &[],
        },
        Op {
            method: "post",
            path: "/api/users/{id}/credits/holds",
            class: Some("credits"),
            summary: "Hold credits before a model call",
            body: Some(|| {
                obj(
                    json!({"amount": amount(), "ttl_secs": {"type": "integer", "minimum": 1, "maximum": 3600},
                        "session_id": string(128), "model": string(128), "provider": string(64), "metadata": object()}),
                    &["amount"],
                )
            }),
            ok: (200, || {
                obj(
                    json!({"hold_id": {"type": "string"}, "amount": int(), "balance": int(), "expires_at": time()}),
                    &["hold_id", "amount", "balance", "expires_at"],
                )
            }),
            errors: &[402, 409, 503],
            query: &[],
        },
        Op {
            method: "post",
            path: "/api/users/{id}/credits/holds/{hold_id}/settle",
            class: Some("credits"),
            summary: "Settle a hold with the real amount",
            body: Some(|| {
                obj(
                    json!({"amount": {"type": "integer", "minimum": 0, "maximum": 9007199254740991i64},
                        "model": string(128), "provider": string(64), "prompt_tokens": count(),
                        "completion_tokens": count()}),
                    &["amount"],
                )
            }),
            ok: (200, || {
                obj(
                    json!({"transaction_id": {"type": "string"}, "amount": int(), "released": int(), "balance": int()}),
                    &["transaction_id", "amount", "released", "balance"],
                )
            }),
            errors: &[404, 409, 503],
            query: &[],
        },
        Op {
            method: "delete",
            path: "/api/users/{id}/credits/holds/{hold_id}",
            class: Some("credits"),
            summary: "Release a hold whole",
            body: None,
            ok: (204, Value::default),
            errors: &[404, 409, 503],
            query: &[],
        },
        Op {
            method: "get",
            path: "/api/users/{id}/usage/stats",
            class: Some("analytics"),
            summary: "Usage statistics grouped by day, model, provider, feature or session",
            body: None,
            ok: (200, || {
                obj(
                    json!({"user_id": {"type": "string"}, "from": time(), "to": time(), "group_by": {"type": "string"}, "rows": {"type": "array", "items": totals()}, "totals": totals()}),
                    &["user_id", "rows", "totals"],
                )
            }),
            errors: &[503],
            query: &[
                ("from", "RFC 3339 time or date"),
                ("to", "RFC 3339 time or date"),
                ("group_by", "day | model | provider | feature | session"),
            ],
        },
        Op {
            method: "post",
            path: "/api/admin/users/{id}/credits/grant",
            class: Some("admin"),
            summary: "Grant credits (admin)",
            body: Some(|| {
                obj(
                    json!({"amount": amount(), "reason": text(500)}),
                    &["amount", "reason"],
                )
            }),
            ok: (200, || {
                obj(
                    json!({"transaction_id": {"type": "string"}, "balance": int()}),
                    &["transaction_id", "balance"],
                )
            }),
            errors: &[409, 503],
            query: &[],
        },
        Op {
            method: "put",
            path: "/api/admin/users/{id}/plan",
            class: Some("admin"),
            summary: "Change a user's plan (admin)",
            body: Some(|| obj(json!({"plan": {"type": "string"}}), &["plan"])),
            ok: (200, object),
            errors: &[503],
            query: &[],
        },
        Op {
            method: "put",
            path: "/api/admin/users/{id}/rate-limits",
            class: Some("admin"),
            summary: "Set a per-user rate-limit override (admin)",
            body: Some(|| {
                obj(
                    json!({"class": {"type": "string", "enum": ["session", "usage", "analytics", "profile", "credits",
                        "admin"]}, "limit": {"type": "integer", "minimum": 1}, "window_secs": {"type": "integer",
                        "minimum": 1}}),
                    &["class", "limit", "window_secs"],
                )
            }),
            ok: (200, object),
            errors: &[503],
            query: &[],
        },
        Op {
            method: "delete",
            path: "/api/admin/users/{id}/rate-limits",
            class: Some("admin"),
            summary: "Remove a per-user rate-limit override (admin)",
            body: None,
            ok: (200, object),
            errors: &[503],
            query: &[("class", "the class whose override to remove")],
        },
        Op {
            method: "put",
            path: "/api/admin/users/{id}/status",
            class: Some("admin"),
            summary: "Suspend or reactivate a user (admin)",
            body: Some(|| {
                obj(
                    json!({"status": {"type": "string", "enum": ["active", "suspended"]}}),
                    &["status"],
                )
            }),
            ok: (200, object),
            errors: &[503],
            query: &[],
        },
        Op {
            method: "get",
            path: "/api/admin/audit",
            class: Some("admin"),
            summary: "The audit trail, newest first (admin)",
            body: None,
            ok: (200, || {
                obj(
                    json!({"entries": {"type": "array", "items": obj(json!({"at": time(), "actor": {"type": "string"},
                        "action": {"type": "string"}, "target": {"type": ["string", "null"]},
                        "request_id": {"type": ["string", "null"]}, "details": object()}), &["at", "actor",
                        "action"])}}),
                    &["entries"],
                )
            }),
            errors: &[503],
            query: &[
                ("user_id", "only entries about this user"),
                ("limit", "1..=1000, default 50"),
            ],
        },
        Op {
            method: "get",
            path: "/api/users/{id}/export",
            class: Some("profile"),
            summary: "Everything stored about a user",
            body: None,
            ok: (200, object),
            errors: &[503],
            query: &[],
        },
        Op {
            method: "delete",
            path: "/api/users/{id}",
            class: Some("profile"),
            summary: "Erase a user's personal data",
            body: None,
            ok: (202, object),
            errors: &[503],
            query: &[],
        },
        Op {
            method: "get",
            path: "/api/vscode/user/balance",
            class: Some("profile"),
            summary: "The caller's balance (original client)",
            body: None,
            ok: (200, || {
                obj(
                    json!({"balance": int(), "held": int(), "as_of": {"type": ["string", "null"]}, "plan": {"type": "string"}}),
                    &["balance", "held", "plan"],
                )
            }),
            errors: &[503],
            query: &[],
        },
        Op {
            method: "get",
            path: "/api/vscode/user/subscription",
            class: Some("profile"),
            summary: "The caller's plan and subscription (original client)",
            body: None,
            ok: (200, || {
                obj(
                    json!({"plan": {"type": "string"}, "status": {"type": "string"}, "subscription": {"type": ["object", "null"]}}),
                    &["plan", "status"],
                )
            }),
            errors: &[503],
            query: &[],
        },
        Op {
            method: "get",
            path: "/api/auth/user-info",
            class: Some("profile"),
            summary: "The caller's identity (original client)",
            body: None,
            ok: (200, || {
                obj(
                    json!({"user_id": {"type": "string"}, "email": {"type": ["string", "null"]},
                        "firstName": {"type": ["string", "null"]}, "lastName": {"type": ["string", "null"]},
                        "plan": {"type": "string"}}),
                    &["user_id", "plan"],
                )
            }),
            errors: &[503],
            query: &[],
        },
        Op {
            method: "get",
            path: "/healthz",
            class: None,
            summary: "Liveness",
            body: None,
            ok: (200, object),
            errors: &[],
            query: &[],
        },
        Op {
            method: "get",
            path: "/readyz",
            class: None,
            summary: "Readiness: Postgres, Redis and RabbitMQ",
            body: None,
            ok: (200, object),
            errors: &[503],
            query: &[],
        },
        Op {
            method: "get",
            path: "/metrics",
            class: None,
            summary: "Prometheus metrics",
            body: None,
            ok: (200, || json!({"type": "string"})),
            errors: &[],
            query: &[],
        },
    ]
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Body is not JSON",
        401 => "Missing or invalid token",
        402 => "Insufficient credits",
        403 => "Forbidden, suspended or deleted account",
        404 => "Not found",
        409 => "Idempotency conflict or hold expired",
        413 => "Payload too large",
        415 => "Body is not application/json",
        422 => "Validation failed (detail names the field)",
        426 => "Extension upgrade required",
        429 => "Rate limited",
        503 => "A dependency is unavailable",
        _ => "Response",
    }
}

/// The document, built once.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

fn build() -> Value {
    let problem = json!({"type": "object", "required": ["type", "title", "status", "detail", "code"], "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"},
        "code": {"type": "string", "enum": ["unauthorized", "forbidden", "account_suspended", "account_deleted",
            "not_found", "validation_failed", "payload_too_large", "unsupported_media_type", "rate_limited",
            "insufficient_credits", "idempotency_conflict", "hold_expired", "upgrade_required", "unavailable",
            "internal"]},
        "error": {"type": "string"}, "message": {"type": "string"}, "balance": {"type": "integer"}, "required": {"type": "integer"}
    }});
    let mut paths = Map::new();
    for op in operations() {
        let mut o = Map::new();
        o.insert("summary".into(), json!(op.summary));
        o.insert(
            "operationId".into(),
            json!(format!(
                "{}{}",
                op.method,
                op.path.replace(['/', '{', '}', '-'], "_")
            )),
        );
        let mut params: Vec<Value> = op
            .path
            .split('/')
            .filter(|s| s.starts_with('{'))
            .map(|s| json!({"name": s.trim_matches(|c| c == '{' || c == '}'), "in": "path", "required": true, "schema": {"type": "string", "maxLength": 64}}))
            .collect();
        for (name, desc) in op.query {
            params.push(json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": "string"}}));
        }
        if op.path.contains("/credits/") && op.method == "post" {
            params.push(json!({"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255}}));
        }
        if !params.is_empty() {
            o.insert("parameters".into(), Value::Array(params));
        }
        if let Some(body) = op.body {
            o.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": body()}}}),
            );
        }
        let mut responses = Map::new();
        let (status, schema) = op.ok;
        let ok = if status == 204 {
            json!({"description": reason(status)})
        } else {
            json!({"description": reason(status), "content": {"application/json": {"schema": schema()}}})
        };
        responses.insert(status.to_string(), ok);
        let mut errors: Vec<u16> = op.errors.to_vec();
        if op.path.contains('{') {
            // A malformed or unknown id in the path.
            errors.push(404);
        }
        if op.class.is_some() {
            errors.extend([401, 403, 422, 429]);
            if op.body.is_some() {
                errors.extend([400, 415]);
            }
        }
        errors.sort_unstable();
        errors.dedup();
        for e in errors {
            responses.insert(
                e.to_string(),
                json!({"description": reason(e), "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}),
            );
        }
        o.insert("responses".into(), Value::Object(responses));
        if op.class.is_some() {
            o.insert("security".into(), json!([{"bearer": []}]));
            o.insert("x-rate-limit-class".into(), json!(op.class));
        }
        let entry = paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}));
        entry[op.method] = Value::Object(o);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "vsc-backend", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Usage, credits and rate-limit backend of the VS Code extension (docs/api.md)."},
        "paths": paths,
        "components": {
            "schemas": {"Problem": problem},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_a_valid_openapi_3_model() {
        let doc = document().clone();
        let parsed: utoipa::openapi::OpenApi =
            serde_json::from_value(doc).expect("OpenAPI 3 model");
        assert!(parsed.paths.paths.contains_key("/api/vscode/usage/track"));
    }
}

#[cfg(test)]
mod derived_tests {
    use super::*;
    use utoipa::OpenApi;

    /// `$ref`s resolved against the derived components, `oneOf [null, x]` to `x`.
    fn resolve(v: &Value, schemas: &Value) -> Value {
        if let Some(r) = v["$ref"].as_str() {
            let name = r.trim_start_matches("#/components/schemas/");
            return resolve(&schemas[name], schemas);
        }
        if let Some(alts) = v["oneOf"].as_array() {
            let some: Vec<_> = alts.iter().filter(|a| a["type"] != "null").collect();
            if some.len() == 1 && alts.len() == 2 {
                return resolve(some[0], schemas);
            }
        }
        v.clone()
    }

    #[test]
    fn the_override_bounds_are_the_handlers() {
        use super::super::admin::{RateLimitBody, MAX_OVERRIDE_LIMIT, MAX_OVERRIDE_WINDOW_SECS};
        let body =
            serde_json::to_value(<RateLimitBody as utoipa::PartialSchema>::schema()).unwrap();
        assert_eq!(
            body["properties"]["limit"]["maximum"],
            serde_json::json!(MAX_OVERRIDE_LIMIT)
        );
        assert_eq!(
            body["properties"]["window_secs"]["maximum"],
            serde_json::json!(MAX_OVERRIDE_WINDOW_SECS)
        );
    }

    /// Where the table was wrong, and the derived schema states the real rule.
    fn differs_on_purpose(body: &str, field: &str, key: &str) -> bool {
        matches!(
            (body, field, key),
            // The bound is a setting (`credits.hold_max_ttl_secs`); 3600 is its default.
            ("HoldBody", "ttl_secs", "maximum")
                // A semantic version, not a label: `semver` decides.
                | ("SessionValidateBody", "extension_version", _)
                // `valid_session_id` / `valid_session_token`: a narrower pattern
                // (and 8..=128 for the token) than the table's label.
                | ("SessionValidateBody", "session_id" | "sessionToken", "pattern" | "minLength")
        )
    }

    /// Every field the hand-written table documents for a body is derived
    /// from the body's type with the same type and limits (aliases aside:
    /// utoipa lists a field under its own name only).
    #[test]
    fn every_derived_body_states_the_fields_and_limits_of_the_table() {
        let derived = serde_json::to_value(DerivedBodies::openapi()).unwrap();
        let schemas = &derived["components"]["schemas"];
        let aliases = ["sessionId", "modelId", "tokensUsed", "extensionVersion"];
        let pairs = [
            ("/api/users/{id}/credits/consume", "ConsumeBody"),
            ("/api/users/{id}/credits/holds", "HoldBody"),
            (
                "/api/users/{id}/credits/holds/{hold_id}/settle",
                "SettleBody",
            ),
            ("/api/admin/users/{id}/credits/grant", "GrantBody"),
            ("/api/admin/users/{id}/plan", "PlanBody"),
            ("/api/admin/users/{id}/rate-limits", "RateLimitBody"),
            ("/api/admin/users/{id}/status", "StatusBody"),
            ("/api/vscode/session/validate", "SessionValidateBody"),
        ];
        let mut wrong = Vec::new();
        for (path, name) in pairs {
            let op = operations()
                .into_iter()
                .find(|o| o.path == path && o.body.is_some());
            let table = (op.expect(path).body.unwrap())();
            let body = resolve(&schemas[name], schemas);
            for (field, want) in table["properties"].as_object().unwrap() {
                if aliases.contains(&field.as_str()) {
                    continue;
                }
                let mut got = resolve(&body["properties"][field], schemas);
                // An optional field is `["x", "null"]`: serde reads `null` as absent.
                if let Some(types) = got["type"].as_array() {
                    let some: Vec<_> = types.iter().filter(|t| *t != "null").cloned().collect();
                    if some.len() == 1 {
                        got["type"] = some[0].clone();
                    }
                }
                for key in [
                    "type",
                    "minLength",
                    "maxLength",
                    "pattern",
                    "minimum",
                    "maximum",
                    "enum",
                ] {
                    if want.get(key).is_some()
                        && want[key] != got[key]
                        && !differs_on_purpose(name, field, key)
                    {
                        wrong.push(format!(
                            "{name}.{field}.{key}: table {} derived {}",
                            want[key], got[key]
                        ));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
