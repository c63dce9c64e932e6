//! JSON values into typed bodies, with a 422 naming the member: used by the
//! HTTP extractors and by domain code that receives a parsed value.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

/// `value` → `T`, or a validation error naming the path of the member.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // A missing member is reported at its parent; name the member itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next());
        let field = match (path.as_str(), missing) {
            (".", Some(m)) => m.to_string(),
            (".", None) => "body".to_string(),
            (p, Some(m)) => format!("{p}.{m}"),
            (p, None) => p.to_string(),
        };
        Error::validation(field, message)
    })
}

/// Parses a request body into `T`, which must be a JSON object (serde would
/// also read a struct from an array, by position).
pub fn parse_body<T: DeserializeOwned>(body: Value) -> Result<T> {
    if !body.is_object() {
        return Err(Error::validation("body", "must be a JSON object"));
    }
    from_value(body)
}
