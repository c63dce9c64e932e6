//! `GET /openapi.json`: the OpenAPI 3.1 document, derived. Each handler states
//! its method, path, class (as its tag), body, answer and own errors in its
//! `#[utoipa::path]`, and its module lists them in a `Doc`; the body and answer
//! schemas come from the types that parse and build them (their limits with
//! them); [`finish`] adds what every operation shares (path parameters, the
//! guard's errors, security, problem bodies). Tests hold the document to the
//! router: every documented route answers, none is missing.

use std::sync::OnceLock;

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use utoipa::OpenApi;

use crate::state::AppState;

pub(crate) mod finish;
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

/// What is not an operation: the title, the problem body, the security scheme.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "vsc-backend",
        description = "Usage, credits and rate-limit backend of the VS Code extension (docs/api.md)."
    ),
    components(schemas(super::error::Problem))
)]
struct Base;

/// `GET /openapi.json`: [`document`] with the limits this process runs with.
pub fn router(state: &AppState) -> Router<AppState> {
    let doc = std::sync::Arc::new(configured(&state.settings));
    Router::new().route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { Json((*doc).clone()) }
        }),
    )
}

/// The document with the bounds that are settings filled in from `settings`:
/// the longest hold (`credits.hold_max_ttl_secs`).
pub fn configured(settings: &common::settings::Settings) -> Value {
    let mut doc = document().clone();
    let ttl = &mut doc["components"]["schemas"]["HoldBody"]["properties"]["ttl_secs"];
    if ttl.is_object() {
        ttl["maximum"] = json!(settings.credits.hold_max_ttl_secs);
    }
    doc
}

/// Every module's operations, merged into the base.
pub fn derived() -> utoipa::openapi::OpenApi {
    let mut doc = Base::openapi();
    for part in [
        super::sessions::Doc::openapi(),
        super::usage::Doc::openapi(),
        super::analytics::Doc::openapi(),
        super::users::Doc::openapi(),
        super::credits::Doc::openapi(),
        super::admin::Doc::openapi(),
        super::compat::Doc::openapi(),
        super::privacy::Doc::openapi(),
        super::reads::Doc::openapi(),
        super::api_keys::Doc::openapi(),
        super::pricing::Doc::openapi(),
        super::alerts::Doc::openapi(),
        super::orgs::Doc::openapi(),
        super::ops::Doc::openapi(),
    ] {
        doc.merge(part);
    }
    doc
}

/// The document, built once.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(derived()).expect("the document is JSON");
        finish::finish(&mut doc);
        doc["components"]["securitySchemes"] =
            json!({"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}});
        doc
    })
}

/// Every documented operation: (method, path, its operation).
pub fn operations() -> Vec<(&'static str, String, &'static Value)> {
    let mut out = Vec::new();
    for (path, item) in document()["paths"].as_object().into_iter().flatten() {
        for method in ["get", "post", "put", "patch", "delete"] {
            if let Some(op) = item.get(method) {
                out.push((method, path.clone(), op));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
