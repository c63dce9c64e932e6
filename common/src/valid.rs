//! One definition of a valid stored value (docs/reliability.md, "A valid stored value"), used by every route that
//! stores something and by the worker before it writes: what the gateway
//! accepts, Postgres and Redis accept.
//!
//! - **Labels** (model, provider, feature, action, versions, platform, ids):
//!   no control character at all, and never U+0000 (Postgres `text` refuses
//!   it, `jsonb` refuses its escape).
//! - **Free text** (descriptions, reasons): the same, except that tab, CR and
//!   LF are allowed.
//! - **Metadata**: a JSON object of at most [`MAX_METADATA_BYTES`] and
//!   [`MAX_METADATA_DEPTH`] levels, every key a label of at most
//!   [`MAX_METADATA_KEY_CHARS`] and every string value free text.
//! - **Counts** (tokens, latency, duration): integers `0..=`[`MAX_COUNT`].
//!   A sum over them stays within bigint: a user's events are bounded by the
//!   per-event rate limit, and every sum in Rust is checked or saturating
//!   (docs/reliability.md, "Bounds").
//! - **Dates in queries**: years [`MIN_YEAR`]`..=`[`MAX_YEAR`].
//!
//! The typed forms ([`Label`], [`FreeText`], [`Metadata`], [`TokenCount`])
//! carry each rule on the field of a request body: deserializing one refuses a
//! bad value with a message that `serde_path_to_error` attaches to the field's
//! path, so a 422 names it. The plain `check_*` functions are the same rules
//! for hand-written parsers and for the worker's own check before a write.

use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// Largest token count, latency or duration accepted.
pub const MAX_COUNT: i64 = 1_000_000_000;
/// Largest metadata object, in bytes of compact JSON.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Deepest nesting of metadata: the object itself is level 1.
pub const MAX_METADATA_DEPTH: usize = 8;
/// Longest metadata key, in characters.
pub const MAX_METADATA_KEY_CHARS: usize = 128;
/// Dates in queries lie in these years (inclusive).
pub const MIN_YEAR: i32 = 1970;
pub const MAX_YEAR: i32 = 9999;

/// Which characters a text field may hold besides printable ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextRule {
    /// No control character at all.
    Label,
    /// Tab, CR and LF allowed; no other control character.
    Free,
}

/// Why a value is refused, without its field (the caller names it).
pub type Reason = String;

fn allowed(c: char, rule: TextRule) -> bool {
    // char::is_control covers C0 (incl. NUL), DEL and C1.
    !c.is_control() || (rule == TextRule::Free && matches!(c, '\t' | '\r' | '\n'))
}

/// A text value: 1..=`max` characters, no
/// forbidden character.
pub fn check_text(s: &str, rule: TextRule, max: usize) -> Result<(), Reason> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().count() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if let Some(c) = s.chars().find(|c| !allowed(*c, rule)) {
        return Err(if c == '\0' {
            "must not contain U+0000".into()
        } else if rule == TextRule::Free {
            "must not contain control characters other than tab, CR and LF".into()
        } else {
            "must not contain control characters".into()
        });
    }
    Ok(())
}

/// Whether a text could be stored at all (no U+0000, no forbidden control
/// character), ignoring length: the worker's last check before a write.
pub fn storable_text(s: &str, rule: TextRule) -> bool {
    s.chars().all(|c| allowed(c, rule))
}

/// A JSON object whose keys are labels and whose strings are free text,
/// nested at most [`MAX_METADATA_DEPTH`] levels; no size bound (preferences
/// have their own). `Err` says where and why.
pub fn check_json_object(v: &Value) -> Result<(), Reason> {
    if !v.is_object() {
        return Err("must be an object".into());
    }
    walk(v, 1, &mut String::new())
}

/// A metadata object (see the module docs). `Err` says where and why.
pub fn check_metadata(v: &Value) -> Result<(), Reason> {
    check_json_object(v)?;
    let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > MAX_METADATA_BYTES {
        return Err(format!(
            "must be at most {MAX_METADATA_BYTES} bytes of JSON"
        ));
    }
    Ok(())
}

fn walk(v: &Value, depth: usize, path: &mut String) -> Result<(), Reason> {
    let at = |path: &str| {
        if path.is_empty() {
            String::new()
        } else {
            format!(" (at {path})")
        }
    };
    match v {
        Value::Object(map) => {
            if depth > MAX_METADATA_DEPTH {
                return Err(format!(
                    "must nest at most {MAX_METADATA_DEPTH} levels{}",
                    at(path)
                ));
            }
            for (k, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(&k.escape_debug().to_string());
                if let Err(r) = check_text(k, TextRule::Label, MAX_METADATA_KEY_CHARS) {
                    return Err(format!("keys {r}{}", at(path)));
                }
                walk(item, depth + 1, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Array(items) => {
            if depth > MAX_METADATA_DEPTH {
                return Err(format!(
                    "must nest at most {MAX_METADATA_DEPTH} levels{}",
                    at(path)
                ));
            }
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, depth + 1, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::String(s) if !storable_text(s, TextRule::Free) => Err(format!(
            "strings must not contain U+0000 or control characters other than tab, CR and LF{}",
            at(path)
        )),
        _ => Ok(()),
    }
}

/// Whether metadata could be stored at all (the worker's last check).
pub fn storable_metadata(v: &Value) -> bool {
    check_metadata(v).is_ok()
}

/// A count: an integer `0..=MAX_COUNT`.
pub fn check_count(v: i64) -> Result<i64, Reason> {
    if (0..=MAX_COUNT).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be an integer from 0 to {MAX_COUNT}"))
    }
}

/// A date of a query: years `MIN_YEAR..=MAX_YEAR`.
pub fn check_date(d: NaiveDate) -> Result<NaiveDate, Reason> {
    if (MIN_YEAR..=MAX_YEAR).contains(&d.year()) {
        Ok(d)
    } else {
        Err(format!(
            "must be a date in the years {MIN_YEAR} to {MAX_YEAR}"
        ))
    }
}

/// A time of a query or body: years `MIN_YEAR..=MAX_YEAR`.
pub fn check_time(t: DateTime<Utc>) -> Result<DateTime<Utc>, Reason> {
    check_date(t.date_naive()).map(|_| t)
}

/// The largest label lengths of the contract, named once.
pub mod len {
    pub const PROVIDER: usize = 64;
    pub const MODEL: usize = 128;
    pub const FEATURE: usize = 64;
    pub const ACTION: usize = 64;
    pub const SESSION_ID: usize = 128;
    pub const DESCRIPTION: usize = 1024;
    pub const REASON: usize = 500;
    pub const VERSION: usize = 64;
    pub const PLATFORM: usize = 64;
    pub const MACHINE_ID: usize = 256;
}

// ─────────────────────────── typed fields ───────────────────────────

/// A label of at most `MAX` characters, checked when deserialized.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label<const MAX: usize>(String);

/// Free text of at most `MAX` characters, checked when deserialized.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FreeText<const MAX: usize>(String);

macro_rules! text_type {
    ($name:ident, $rule:expr, $what:literal) => {
        impl<const MAX: usize> $name<MAX> {
            pub fn parse(s: String) -> Result<Self, Reason> {
                check_text(&s, $rule, MAX)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_inner(self) -> String {
                self.0
            }
        }

        impl<'de, const MAX: usize> Deserialize<'de> for $name<MAX> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V<const MAX: usize>(PhantomData<[(); MAX]>);
                impl<const MAX: usize> Visitor<'_> for V<MAX> {
                    type Value = $name<MAX>;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        write!(f, "{} of 1 to {} characters", $what, MAX)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                        $name::parse(s.to_string()).map_err(E::custom)
                    }
                    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                        $name::parse(s).map_err(E::custom)
                    }
                }
                d.deserialize_string(V::<MAX>(PhantomData))
            }
        }

        impl<const MAX: usize> Serialize for $name<MAX> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

text_type!(
    Label,
    TextRule::Label,
    "a string without control characters"
);
text_type!(
    FreeText,
    TextRule::Free,
    "a string without control characters other than tab, CR and LF"
);

/// A metadata object, checked when deserialized (`null` is "no metadata":
/// use `Option<Metadata>` with `#[serde(default)]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata(Value);

impl Metadata {
    pub fn parse(v: Value) -> Result<Self, Reason> {
        check_metadata(&v)?;
        Ok(Self(v))
    }
    pub fn into_inner(self) -> Value {
        self.0
    }
    pub fn as_value(&self) -> &Value {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Metadata::parse(v).map_err(de::Error::custom)
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A token count, latency or duration: a JSON integer `0..=MAX_COUNT`
/// (floats, even `1.0`, and strings are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenCount(i64);

impl TokenCount {
    pub fn new(v: i64) -> Option<Self> {
        check_count(v).ok().map(Self)
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for TokenCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TokenCount;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an integer from 0 to {MAX_COUNT}")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                check_count(v).map(TokenCount).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map_err(|_| ())
                    .and_then(|v| check_count(v).map_err(|_| ()))
                    .map(TokenCount)
                    .map_err(|_| E::custom(format!("must be an integer from 0 to {MAX_COUNT}")))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "must be an integer from 0 to {MAX_COUNT}"
                )))
            }
        }
        d.deserialize_i64(V)
    }
}

impl Serialize for TokenCount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.0)
    }
}

// ─────────────────────────── schemas ───────────────────────────
//
// The OpenAPI form of each typed field, written once beside its rule so the
// document carries the same limits the deserializer enforces.

/// The JSON Schema `pattern` of a label: no C0, DEL or C1 character.
pub const LABEL_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";
/// The JSON Schema `pattern` of free text: as a label, but tab, LF and CR allowed.
pub const FREE_TEXT_PATTERN: &str =
    "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$";

fn text_schema(
    max: usize,
    pattern: &str,
    what: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(pattern))
        .description(Some(format!("{what}, 1 to {max} characters")))
        .into()
}

impl<const MAX: usize> utoipa::PartialSchema for Label<MAX> {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        text_schema(MAX, LABEL_PATTERN, "a string without control characters")
    }
}
impl<const MAX: usize> utoipa::ToSchema for Label<MAX> {
    fn name() -> std::borrow::Cow<'static, str> {
        format!("Label{MAX}").into()
    }
}

impl<const MAX: usize> utoipa::PartialSchema for FreeText<MAX> {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        text_schema(
            MAX,
            FREE_TEXT_PATTERN,
            "a string without control characters other than tab, CR and LF",
        )
    }
}
impl<const MAX: usize> utoipa::ToSchema for FreeText<MAX> {
    fn name() -> std::borrow::Cow<'static, str> {
        format!("FreeText{MAX}").into()
    }
}

impl utoipa::PartialSchema for Metadata {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .description(Some(format!(
                "at most {MAX_METADATA_BYTES} bytes of JSON, nested at most {MAX_METADATA_DEPTH} levels; \
                 keys of 1 to {MAX_METADATA_KEY_CHARS} characters without control characters, \
                 strings without control characters other than tab, CR and LF"
            )))
            .into()
    }
}
impl utoipa::ToSchema for Metadata {}

impl utoipa::PartialSchema for TokenCount {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
            .maximum(Some(MAX_COUNT))
            .into()
    }
}
impl utoipa::ToSchema for TokenCount {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_refuse_every_control_character_and_nul() {
        for bad in ["a\0b", "a\tb", "a\nb", "\u{7f}", "\u{85}", "x\u{1b}[31m"] {
            assert!(check_text(bad, TextRule::Label, 64).is_err(), "{bad:?}");
        }
        assert!(check_text("gpt-4o / ünïcødé 🚀", TextRule::Label, 64).is_ok());
        assert!(check_text("", TextRule::Label, 64).is_err());
        assert!(check_text(&"é".repeat(64), TextRule::Label, 64).is_ok());
        assert!(check_text(&"é".repeat(65), TextRule::Label, 64).is_err());
    }

    #[test]
    fn free_text_allows_tab_cr_lf_only() {
        assert!(check_text("line 1\r\nline\t2", TextRule::Free, 64).is_ok());
        for bad in ["a\0b", "a\u{1}", "\u{7f}", "\u{9b}"] {
            assert!(check_text(bad, TextRule::Free, 64).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_text("a\0", TextRule::Free, 8).unwrap_err(),
            "must not contain U+0000"
        );
    }

    #[test]
    fn metadata_is_checked_in_keys_values_size_and_depth() {
        assert!(check_metadata(&json!({"a": "b\nc", "n": [1, 2.5, true, null]})).is_ok());
        assert!(check_metadata(&json!({"k\u{0}": 1})).is_err());
        assert!(check_metadata(&json!({"k": "\u{0}"})).is_err());
        assert!(check_metadata(&json!({"k": ["ok", {"deep": "\u{1}"}]})).is_err());
        assert!(check_metadata(&json!({"k\tx": 1})).is_err());
        assert!(check_metadata(&json!({"": 1})).is_err());
        assert!(check_metadata(&json!({"x": "y".repeat(4100)})).is_err());
        assert!(check_metadata(&json!([1])).is_err());
        let mut deep = json!(1);
        for _ in 0..MAX_METADATA_DEPTH {
            deep = json!({ "d": deep });
        }
        assert!(check_metadata(&deep).is_ok());
        assert!(check_metadata(&json!({ "d": deep })).is_err());
        let err = check_metadata(&json!({"a": {"b": "\u{0}"}})).unwrap_err();
        assert!(err.contains(".a.b"), "{err}");
    }

    #[test]
    fn counts_stop_at_a_billion() {
        assert_eq!(check_count(0), Ok(0));
        assert_eq!(check_count(MAX_COUNT), Ok(MAX_COUNT));
        assert!(check_count(MAX_COUNT + 1).is_err());
        assert!(check_count(-1).is_err());
        for bad in [
            json!(1.0),
            json!("1"),
            json!(-1),
            json!(1_000_000_001),
            json!(u64::MAX),
        ] {
            assert!(
                serde_json::from_value::<TokenCount>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            serde_json::from_value::<TokenCount>(json!(42))
                .unwrap()
                .get(),
            42
        );
    }

    #[test]
    fn dates_lie_between_1970_and_9999() {
        assert!(check_date(NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).is_ok());
        assert!(check_date(NaiveDate::from_ymd_opt(9999, 12, 31).unwrap()).is_ok());
        assert!(check_date(NaiveDate::from_ymd_opt(1969, 12, 31).unwrap()).is_err());
        assert!(check_date(NaiveDate::from_ymd_opt(-4713, 1, 1).unwrap()).is_err());
        assert!(check_date(NaiveDate::MIN).is_err());
    }

    #[test]
    fn typed_fields_refuse_with_a_reason() {
        let e = serde_json::from_value::<Label<8>>(json!("a\u{0}")).unwrap_err();
        assert!(e.to_string().contains("U+0000"), "{e}");
        assert!(serde_json::from_value::<Label<8>>(json!(5)).is_err());
        assert!(serde_json::from_value::<FreeText<8>>(json!("a\nb")).is_ok());
        assert!(serde_json::from_value::<Metadata>(json!({"k": "\u{0}"})).is_err());
        assert_eq!(
            serde_json::to_value(serde_json::from_value::<Label<8>>(json!("gpt")).unwrap())
                .unwrap(),
            json!("gpt")
        );
    }

    proptest::proptest! {
        #[test]
        fn a_checked_text_never_holds_what_postgres_refuses(s in ".*") {
            if check_text(&s, TextRule::Free, 10_000).is_ok() {
                proptest::prop_assert!(!s.contains('\0'));
            }
            if check_text(&s, TextRule::Label, 10_000).is_ok() {
                proptest::prop_assert!(!s.chars().any(char::is_control));
            }
        }
    }
}
