//! Request extractors that turn every malformed input into our problem+json:
//! 415 for a body that is not JSON, 413 over the limit, 400 for bytes that do
//! not parse, 422 (naming the field) for JSON of the wrong shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::audit::RequestId;

/// A JSON body; like `axum::Json` but with our error mapping.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(CONTENT_TYPE)) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(1 << 20);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(limit)
            } else {
                ApiError::MalformedJson("the body could not be read".into())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The configured body limit, put on requests so errors can say it.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

fn is_json(value: Option<&axum::http::HeaderValue>) -> bool {
    let Some(v) = value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Bytes → value (400 when not JSON) → `T` (422 naming the path of the member).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::MalformedJson(format!("the body is not valid JSON: {e}")))?;
    from_value(value)
}

/// `value` → `T` (422 naming the path of the member); see [`crate::decode::from_value`].
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    Ok(crate::decode::from_value(value)?)
}

/// Query parameters with 422 naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded_de(q)?;
        Ok(ApiQuery(de))
    }
}

fn serde_urlencoded_de<T: DeserializeOwned>(q: &str) -> Result<T, ApiError> {
    // Collect into a map of strings first so the error can name the parameter.
    let pairs: Vec<(String, String)> = url_pairs(q);
    let mut map = serde_json::Map::new();
    for (k, v) in pairs {
        map.insert(k, serde_json::Value::String(v));
    }
    serde_path_to_error::deserialize(serde_json::Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        ApiError::validation(
            if path == "." { "query".into() } else { path },
            e.inner().to_string(),
        )
    })
}

fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The audit row's request id, read from `x-request-id` (see [`RequestId::from_header`]).
impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok());
        Ok(RequestId::from_header(header))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        amount: i64,
        inner: Option<Vec<Inner>>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[test]
    fn bytes_that_are_not_json_are_400_and_wrong_shapes_422_with_the_path() {
        assert!(matches!(
            parse_json::<Body>(b"{nope"),
            Err(ApiError::MalformedJson(_))
        ));
        match parse_json::<Body>(br#"{"amount": 1, "inner": [{"n": 1}, {"n": -1}]}"#) {
            Err(ApiError::Domain(crate::error::Error::Validation { field, .. })) => {
                assert_eq!(field, "inner[1].n")
            }
            other => panic!("{other:?}"),
        }
        match parse_json::<Body>(br#"{"amount": 1e400}"#) {
            Err(ApiError::MalformedJson(_))
            | Err(ApiError::Domain(crate::error::Error::Validation { .. })) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn query_pairs_decode() {
        assert_eq!(
            url_pairs("a=1&b=x%20y&c"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), "".into())
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
