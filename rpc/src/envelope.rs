//! JSON-RPC 2.0 envelope validation (SPDK's `parse_single_request`) and reply formatting.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::RpcError;

/// A request id as it will be echoed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Id {
    /// No `id` key: a notification.
    Absent,
    /// `"id": null`: also treated as a notification (SPDK quirk).
    Null,
    /// A string or number id, as JSON text to echo verbatim.
    Json(String),
}

impl Id {
    pub(crate) fn is_notification(&self) -> bool {
        !matches!(self, Id::Json(_))
    }

    fn as_json(&self) -> &str {
        match self {
            Id::Json(s) => s,
            Id::Absent | Id::Null => "null",
        }
    }
}

/// A validated request.
#[derive(Debug)]
pub(crate) struct Request {
    pub method: String,
    /// `None` when absent or `null`; otherwise an object or array.
    pub params: Option<Value>,
    pub id: Id,
}

/// One top-level JSON value from the stream, classified.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// An object (or anything that is answered by a single reply).
    Single(Result<Request, RpcError>),
    /// A non-empty array: one entry per element.
    Batch(Vec<Result<Request, RpcError>>),
}

#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

/// The id's exact JSON text, taken from the raw request (so `1e3` stays `1e3`).
fn raw_id(raw: Option<&str>) -> Option<String> {
    let raw = raw?;
    let parsed: IdOnly<'_> = serde_json::from_str(raw).ok()?;
    parsed.id.map(|r| r.get().to_owned())
}

/// Validates one request object (SPDK `parse_single_request`). `raw` is the object's JSON
/// text, used only to echo a numeric id verbatim.
fn validate(mut obj: Map<String, Value>, raw: Option<&str>) -> Result<Request, RpcError> {
    if obj
        .keys()
        .any(|k| !matches!(k.as_str(), "jsonrpc" | "method" | "params" | "id"))
    {
        return Err(RpcError::invalid_request());
    }
    match obj.get("jsonrpc") {
        None => {}
        Some(Value::String(v)) if v == "2.0" => {}
        Some(_) => return Err(RpcError::invalid_request()),
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return Err(RpcError::invalid_request()),
    };
    let id = match obj.get("id") {
        None => Id::Absent,
        Some(Value::Null) => Id::Null,
        Some(s @ Value::String(_)) => Id::Json(s.to_string()),
        Some(Value::Number(n)) => Id::Json(raw_id(raw).unwrap_or_else(|| n.to_string())),
        Some(_) => return Err(RpcError::invalid_request()),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => None,
        Some(p @ (Value::Object(_) | Value::Array(_))) => Some(p),
        Some(_) => return Err(RpcError::invalid_request()),
    };
    Ok(Request { method, params, id })
}

/// Classifies one complete top-level JSON text. `Err` means it is not parseable after all
/// (for example nested too deeply): the caller treats that as a parse error.
pub(crate) fn parse_incoming(raw: &str) -> Result<Incoming, RpcError> {
    let value: Value = serde_json::from_str(raw).map_err(|_| RpcError::parse_error())?;
    Ok(match value {
        Value::Object(obj) => Incoming::Single(validate(obj, Some(raw))),
        Value::Array(items) if items.is_empty() => {
            Incoming::Single(Err(RpcError::invalid_request()))
        }
        Value::Array(items) => {
            let raws: Option<Vec<&RawValue>> = serde_json::from_str(raw).ok();
            Incoming::Batch(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| match item {
                        Value::Object(obj) => {
                            validate(obj, raws.as_ref().and_then(|r| r.get(i)).map(|r| r.get()))
                        }
                        _ => Err(RpcError::invalid_request()),
                    })
                    .collect(),
            )
        }
        _ => Incoming::Single(Err(RpcError::invalid_request())),
    })
}

/// Formats a reply object (compact, keys in the order `jsonrpc`, `id`, `result|error`, no
/// trailing newline). `None`: a successful notification, which gets no reply.
pub(crate) fn format_reply(id: &Id, result: &Result<Value, RpcError>) -> Option<String> {
    match result {
        Ok(_) if id.is_notification() => None,
        Ok(v) => match serde_json::to_string(v) {
            Ok(text) => Some(format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{text}}}",
                id.as_json()
            )),
            Err(e) => Some(format_error(
                id,
                &RpcError::internal(format!("Failed to encode result: {e}")),
            )),
        },
        Err(e) => Some(format_error(id, e)),
    }
}

/// Formats an error reply. A notification's error is sent with `"id": null`.
pub(crate) fn format_error(id: &Id, e: &RpcError) -> String {
    let msg = serde_json::to_string(&e.message).unwrap_or_else(|_| "\"\"".to_owned());
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{},\"error\":{{\"code\":{},\"message\":{msg}}}}}",
        id.as_json(),
        e.code
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn single(raw: &str) -> Result<Request, RpcError> {
        match parse_incoming(raw).unwrap() {
            Incoming::Single(r) => r,
            Incoming::Batch(_) => panic!("unexpected batch"),
        }
    }

    #[test]
    fn valid_requests() {
        let r = single(r#"{"jsonrpc":"2.0","method":"m","id":1,"params":{"a":1}}"#).unwrap();
        assert_eq!(r.method, "m");
        assert_eq!(r.params, Some(json!({"a": 1})));
        assert_eq!(r.id, Id::Json("1".into()));
        // jsonrpc is optional, params null == absent, array params pass the envelope.
        let r = single(r#"{"method":"m","params":null}"#).unwrap();
        assert_eq!(r.params, None);
        assert_eq!(r.id, Id::Absent);
        let r = single(r#"{"method":"m","params":[1,2],"id":null}"#).unwrap();
        assert_eq!(r.params, Some(json!([1, 2])));
        assert_eq!(r.id, Id::Null);
    }

    #[test]
    fn ids_are_echoed_verbatim() {
        for (text, echo) in [
            ("1", "1"),
            ("-7", "-7"),
            ("1e3", "1e3"),
            ("1.50", "1.50"),
            ("18446744073709551616", "18446744073709551616"),
            (r#""abc""#, r#""abc""#),
            (r#""a\"b""#, r#""a\"b""#),
        ] {
            let raw = format!(r#"{{"method":"m","id": {text} }}"#);
            assert_eq!(single(&raw).unwrap().id, Id::Json(echo.into()), "{raw}");
        }
    }

    #[test]
    fn invalid_envelopes() {
        for raw in [
            r#"{"method":"m","extra":1}"#,
            r#"{"jsonrpc":"1.0","method":"m"}"#,
            r#"{"jsonrpc":2.0,"method":"m"}"#,
            r#"{"jsonrpc":null,"method":"m"}"#,
            r#"{"jsonrpc":"2.0"}"#,
            r#"{"method":5}"#,
            r#"{"method":null}"#,
            r#"{"method":"m","id":{}}"#,
            r#"{"method":"m","id":[1]}"#,
            r#"{"method":"m","id":true}"#,
            r#"{"method":"m","params":"x"}"#,
            r#"{"method":"m","params":3}"#,
            r#"{"method":"m","params":false}"#,
            "[]",
            "5",
            r#""str""#,
            "null",
            "true",
        ] {
            assert_eq!(
                single(raw).unwrap_err(),
                RpcError::invalid_request(),
                "{raw}"
            );
        }
    }

    #[test]
    fn batches() {
        let Incoming::Batch(items) =
            parse_incoming(r#"[{"method":"a","id":1}, 5, {"method":"b","id":2.0}, {"x":1}]"#)
                .unwrap()
        else {
            panic!("not a batch")
        };
        assert_eq!(items.len(), 4);
        assert_eq!(items[0].as_ref().unwrap().method, "a");
        assert!(items[1].is_err());
        assert_eq!(items[2].as_ref().unwrap().id, Id::Json("2.0".into()));
        assert!(items[3].is_err());
    }

    #[test]
    fn too_deep_is_parse_error() {
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert_eq!(parse_incoming(&deep).unwrap_err().code, -32700);
    }

    #[test]
    fn reply_format() {
        let id = Id::Json("7".into());
        assert_eq!(
            format_reply(&id, &Ok(json!(true))).unwrap(),
            r#"{"jsonrpc":"2.0","id":7,"result":true}"#
        );
        assert_eq!(
            format_reply(&id, &Err(RpcError::from_errno(19))).unwrap(),
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":-19,"message":"No such device"}}"#
        );
        assert_eq!(format_reply(&Id::Absent, &Ok(json!(1))), None);
        assert_eq!(format_reply(&Id::Null, &Ok(json!(1))), None);
        assert_eq!(
            format_reply(&Id::Null, &Err(RpcError::method_not_found())).unwrap(),
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32601,"message":"Method not found"}}"#
        );
        let s = format_error(&Id::Absent, &RpcError::internal("quote \" and \n newline"));
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["error"]["message"], "quote \" and \n newline");
    }
}
