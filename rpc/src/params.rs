//! Parameter decoding helpers with SPDK's strictness.
//!
//! SPDK's `spdk_json_decode_object` rejects unknown keys, missing required keys and wrong
//! types. Handlers here get the same behaviour by decoding into a struct marked
//! `#[serde(deny_unknown_fields)]` with [`decode`]:
//!
//! ```
//! use serde::Deserialize;
//! use serde_json::json;
//!
//! #[derive(Debug, Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct CreateParams {
//!     name: String,
//!     #[serde(default)]
//!     readonly: bool,
//! }
//!
//! let p: CreateParams = wc_rpc::decode(Some(json!({"name": "wc0"}))).unwrap();
//! assert_eq!(p.name, "wc0");
//! let err = wc_rpc::decode::<CreateParams>(Some(json!({"name": "wc0", "bogus": 1}))).unwrap_err();
//! assert_eq!(err.code, -32602);
//! assert!(err.message.contains("bogus"));
//! ```
//!
//! Remember that rpc.py sends `false` for every `store_true` flag that was not given, so a
//! strict struct must still declare those keys (usually with `#[serde(default)]`).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::RpcError;

/// Decodes a method's `params` into `T`.
///
/// - absent params decode as `{}` (so a struct whose fields all have defaults succeeds);
/// - params must be a JSON object: an array is rejected, as SPDK's object decoder does
///   (serde would otherwise happily decode a struct from a positional array);
/// - any serde error becomes `-32602 "Invalid parameters: <serde message>"`, which names the
///   offending field (`unknown field `x``, `missing field `name``, `invalid type: ...
///   for field `size``).
pub fn decode<T: DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let value = match params {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v,
        Some(other) => {
            return Err(RpcError::invalid_params(format!(
                "Invalid parameters: expected a JSON object, got {}",
                type_name(&other)
            )))
        }
    };
    match T::deserialize(&value) {
        Ok(t) => Ok(t),
        Err(e) => {
            let mut msg = format!("Invalid parameters: {e}");
            // serde names the field for unknown/missing/duplicate keys but not for a
            // wrong type or value ("invalid type: string \"8\", expected u64"): find it.
            if !msg.contains(" field `") {
                if let Some(field) = value.as_object().and_then(failing_field::<T>) {
                    msg.push_str(&format!(" for field `{field}`"));
                }
            }
            Err(RpcError::invalid_params(msg))
        }
    }
}

/// The top-level key of `obj` whose value `T` fails to decode.
///
/// Decodes the compact JSON text of `obj` again, which gives the error a byte position, and
/// returns the last key that starts before that position (the text is written in the map's
/// iteration order, so key offsets can be computed the same way).
fn failing_field<T: DeserializeOwned>(obj: &Map<String, Value>) -> Option<String> {
    let text = serde_json::to_string(obj).ok()?;
    let err = serde_json::from_str::<T>(&text).err()?;
    if err.line() != 1 {
        return None;
    }
    let pos = err.column(); // 1-based byte column on the single line
    let mut offset = 1; // after '{'
    let mut found = None;
    for (i, (k, v)) in obj.iter().enumerate() {
        if i > 0 {
            offset += 1; // ','
        }
        if offset >= pos {
            break;
        }
        found = Some(k);
        offset += serde_json::to_string(k).ok()?.len() + 1 + serde_json::to_string(v).ok()?.len();
    }
    found.cloned()
}

/// Checks that a method that takes no parameters got none.
///
/// Absent, `null`, `{}` and `[]` are accepted (rpc.py never sends an empty `params`; other
/// clients might). Anything else gives `-32602 "<method> method requires no parameters"`, the
/// text SPDK uses for `spdk_get_version`.
pub fn no_params(method: &str, params: Option<&Value>) -> Result<(), RpcError> {
    let empty = match params {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    };
    if empty {
        Ok(())
    } else {
        Err(RpcError::invalid_params(format!(
            "{method} method requires no parameters"
        )))
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct P {
        name: String,
        #[serde(default)]
        size: u32,
        #[serde(default)]
        readonly: bool,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct AllDefault {
        current: bool,
        include_aliases: bool,
    }

    #[test]
    fn decodes_valid_params() {
        let p: P = decode(Some(json!({"name": "a", "size": 4, "readonly": false}))).unwrap();
        assert_eq!(
            p,
            P {
                name: "a".into(),
                size: 4,
                readonly: false
            }
        );
    }

    #[test]
    fn absent_params_are_empty_object() {
        let p: AllDefault = decode(None).unwrap();
        assert_eq!(p, AllDefault::default());
        let p: AllDefault = decode(Some(Value::Null)).unwrap();
        assert_eq!(p, AllDefault::default());
        let e = decode::<P>(None).unwrap_err();
        assert_eq!(e.code, -32602);
        assert!(e.message.contains("missing field `name`"), "{}", e.message);
    }

    #[test]
    fn unknown_field_is_rejected_and_named() {
        let e = decode::<P>(Some(json!({"name": "a", "colour": 1}))).unwrap_err();
        assert_eq!(e.code, -32602);
        assert!(e.message.starts_with("Invalid parameters: "));
        assert!(
            e.message.contains("unknown field `colour`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn wrong_types_and_overflow_are_rejected() {
        for bad in [
            json!({"name": 5}),
            json!({"name": "a", "size": -1}),
            json!({"name": "a", "size": 4294967296u64}),
            json!({"name": "a", "size": "4"}),
            json!({"name": "a", "readonly": "false"}),
        ] {
            let e = decode::<P>(Some(bad.clone())).unwrap_err();
            assert_eq!(e.code, -32602, "{bad}");
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (bad, field) in [
            (json!({"name": 5}), "name"),
            (json!({"name": "a", "size": -1}), "size"),
            (json!({"name": "a", "size": 4294967296u64}), "size"),
            (json!({"readonly": false, "name": "a", "size": "4"}), "size"),
            (
                json!({"name": "a", "readonly": "false", "size": 1}),
                "readonly",
            ),
            (
                json!({"name": "é\"\\{,:", "readonly": [1], "size": 1}),
                "readonly",
            ),
        ] {
            let e = decode::<P>(Some(bad.clone())).unwrap_err();
            assert!(
                e.message.ends_with(&format!(" for field `{field}`")),
                "{bad}: {}",
                e.message
            );
            assert!(e.message.contains("invalid"), "{bad}: {}", e.message);
        }
        // Messages that already name the field are left alone.
        let e = decode::<P>(Some(json!({"name": "a", "x": 1}))).unwrap_err();
        assert!(!e.message.contains(" for field"), "{}", e.message);
    }

    #[test]
    fn non_object_params_are_rejected() {
        for bad in [json!(["a", 4, false]), json!("a"), json!(3), json!(true)] {
            let e = decode::<P>(Some(bad)).unwrap_err();
            assert_eq!(e.code, -32602);
            assert!(e.message.contains("expected a JSON object"));
        }
    }

    #[test]
    fn no_params_helper() {
        assert!(no_params("m", None).is_ok());
        assert!(no_params("m", Some(&Value::Null)).is_ok());
        assert!(no_params("m", Some(&json!({}))).is_ok());
        assert!(no_params("m", Some(&json!([]))).is_ok());
        let e = no_params("spdk_get_version", Some(&json!({"x": 1}))).unwrap_err();
        assert_eq!(
            e,
            RpcError::invalid_params("spdk_get_version method requires no parameters")
        );
        assert!(no_params("m", Some(&json!([1]))).is_err());
    }
}
