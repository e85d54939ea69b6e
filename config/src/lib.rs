//! # wc-config: SPDK's JSON config format
//!
//! A config is `{"subsystems": [{"subsystem": NAME, "config": [{"method":
//! M, "params": {...}}, ...]}, ...]}`. Loading replays each entry as a
//! JSON-RPC call, in file order, in two passes as SPDK does: methods
//! callable at STARTUP first, then (after framework init) the RUNTIME ones.
//! The same structure is accepted as YAML (by file extension) and JSON may
//! carry C/C++ comments, as SPDK's loader allows.
//!
//! Saving goes the other way: each subsystem registers a writer, and
//! `framework_get_subsystems` / `framework_get_config` expose them so
//! `spdk-rpc save_config` can build a file that recreates the running state.
//! This crate knows the RPC registry, never a module's internals.

#![warn(missing_docs)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Deserialize;
use serde_json::{json, Value};
use wc_rpc::{
    decode, no_params, RegisterError, Registry, Responder, RpcError, RpcState, StateMask,
};

/// Errors loading or applying a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Read JSON configuration file {path} failed: {msg}")]
    Read {
        /// File.
        path: String,
        /// Reason.
        msg: String,
    },
    /// Not valid JSON/YAML.
    #[error("Parsing JSON configuration failed: {0}")]
    Parse(String),
    /// Valid JSON, wrong shape.
    #[error("Invalid configuration: {0}")]
    Shape(String),
    /// A method in the file does not exist.
    #[error("Method '{method}' was not found (config entry {index} of subsystem '{subsystem}')")]
    UnknownMethod {
        /// Method.
        method: String,
        /// Subsystem.
        subsystem: String,
        /// 1-based position in the file.
        index: usize,
    },
    /// An entry's call failed.
    #[error("config entry {index} ({method} in subsystem '{subsystem}') failed: {code} {message}")]
    Call {
        /// Method.
        method: String,
        /// Subsystem.
        subsystem: String,
        /// 1-based position.
        index: usize,
        /// RPC error code.
        code: i32,
        /// RPC error message.
        message: String,
    },
}

/// One `{method, params}` entry of a config, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigCall {
    /// Subsystem the entry is listed under.
    pub subsystem: String,
    /// RPC method.
    pub method: String,
    /// Its params, if any.
    pub params: Option<Value>,
    /// 1-based position among all entries of the file.
    pub index: usize,
}

/// Reads a config file: YAML for `.yaml`/`.yml`, else JSON (comments allowed).
pub fn load_file(path: &Path) -> Result<Vec<ConfigCall>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    );
    if yaml {
        parse_yaml(&text)
    } else {
        parse_json(&text)
    }
}

/// Parses a JSON config (C and C++ comments allowed).
pub fn parse_json(text: &str) -> Result<Vec<ConfigCall>, ConfigError> {
    let stripped = strip_comments(text);
    let v: Value =
        serde_json::from_str(&stripped).map_err(|e| ConfigError::Parse(e.to_string()))?;
    calls_from_value(&v)
}

/// Parses a YAML config of the same structure.
pub fn parse_yaml(text: &str) -> Result<Vec<ConfigCall>, ConfigError> {
    let v: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    calls_from_value(&v)
}

/// Extracts the ordered calls from a parsed config document.
pub fn calls_from_value(v: &Value) -> Result<Vec<ConfigCall>, ConfigError> {
    let root = v
        .as_object()
        .ok_or_else(|| ConfigError::Shape("the root must be an object".into()))?;
    let Some(subsystems) = root.get("subsystems") else {
        tracing::warn!("No 'subsystems' key JSON configuration file.");
        return Ok(Vec::new());
    };
    let subsystems = subsystems
        .as_array()
        .ok_or_else(|| ConfigError::Shape("'subsystems' must be an array".into()))?;
    let mut calls = Vec::new();
    for (si, s) in subsystems.iter().enumerate() {
        let s = s
            .as_object()
            .ok_or_else(|| ConfigError::Shape(format!("subsystems[{si}] must be an object")))?;
        let name = s.get("subsystem").and_then(Value::as_str).ok_or_else(|| {
            ConfigError::Shape(format!("subsystems[{si}] needs a 'subsystem' string"))
        })?;
        let entries = match s.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(ConfigError::Shape(format!(
                    "'config' of subsystem '{name}' must be an array or null"
                )))
            }
        };
        for (ei, e) in entries.iter().enumerate() {
            // 26.05+ explicit batches: an array of entries, replayed in order.
            let group: Vec<&Value> = match e {
                Value::Array(batch) => batch.iter().collect(),
                other => vec![other],
            };
            for entry in group {
                let obj = entry.as_object().ok_or_else(|| {
                    ConfigError::Shape(format!(
                        "entry {ei} of subsystem '{name}' must be an object"
                    ))
                })?;
                let method = obj.get("method").and_then(Value::as_str).ok_or_else(|| {
                    ConfigError::Shape(format!(
                        "entry {ei} of subsystem '{name}' needs a 'method' string"
                    ))
                })?;
                let params = match obj.get("params") {
                    None | Some(Value::Null) => None,
                    Some(p @ Value::Object(_)) => Some(p.clone()),
                    Some(_) => {
                        return Err(ConfigError::Shape(format!(
                            "params of '{method}' (subsystem '{name}') must be an object"
                        )))
                    }
                };
                calls.push(ConfigCall {
                    subsystem: name.to_string(),
                    method: method.to_string(),
                    params,
                    index: calls.len() + 1,
                });
            }
        }
    }
    Ok(calls)
}

/// Removes `//` and `/* */` comments outside strings.
fn strip_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        let c = b[i];
        if in_str {
            out.push(c as char);
            if c == b'\\' && i + 1 < b.len() {
                out.push(b[i + 1] as char);
                i += 2;
                continue;
            }
            if c == b'"' {
                in_str = false;
            }
            i += 1;
        } else if c == b'"' {
            in_str = true;
            out.push('"');
            i += 1;
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
            out.push(' ');
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    // Non-ASCII bytes were pushed byte-wise above; rebuild them properly.
    if text.is_ascii() {
        out
    } else {
        strip_comments_utf8(text)
    }
}

fn strip_comments_utf8(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            out.push(c);
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if c == '/' && chars.peek() == Some(&'/') {
            for n in chars.by_ref() {
                if n == '\n' {
                    out.push('\n');
                    break;
                }
            }
        } else if c == '/' && chars.peek() == Some(&'*') {
            chars.next();
            let mut prev = ' ';
            for n in chars.by_ref() {
                if prev == '*' && n == '/' {
                    break;
                }
                prev = n;
            }
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// Performs one config call and waits for its reply.
pub type CallFn<'a> = dyn Fn(&str, Option<Value>) -> Result<Value, RpcError> + 'a;

/// Which entries a pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Before framework init: methods callable at STARTUP.
    Startup,
    /// After init: RUNTIME methods not already run at STARTUP.
    Runtime,
}

/// Replays `calls` for one pass. `exec` performs one call and waits for its
/// reply (the target sends it to the main reactor). Stops at the first error
/// unless `ignore_errors`.
pub fn apply(
    reg: &Registry,
    calls: &[ConfigCall],
    pass: Pass,
    ignore_errors: bool,
    exec: &CallFn<'_>,
) -> Result<usize, ConfigError> {
    let all: HashSet<String> = reg.method_names(false, true).into_iter().collect();
    let startup_ok: HashSet<String> = methods_in(reg, RpcState::Startup);
    let runtime_ok: HashSet<String> = methods_in(reg, RpcState::Runtime);
    let mut ran = 0;
    for c in calls {
        if !all.contains(&c.method) {
            let err = ConfigError::UnknownMethod {
                method: c.method.clone(),
                subsystem: c.subsystem.clone(),
                index: c.index,
            };
            if ignore_errors {
                tracing::error!("{err}");
                continue;
            }
            return Err(err);
        }
        let run = match pass {
            Pass::Startup => startup_ok.contains(&c.method),
            Pass::Runtime => runtime_ok.contains(&c.method) && !startup_ok.contains(&c.method),
        };
        if !run {
            continue;
        }
        match exec(&c.method, c.params.clone()) {
            Ok(_) => ran += 1,
            Err(e) => {
                let err = ConfigError::Call {
                    method: c.method.clone(),
                    subsystem: c.subsystem.clone(),
                    index: c.index,
                    code: e.code,
                    message: e.message.clone(),
                };
                tracing::error!("{err}");
                if !ignore_errors {
                    return Err(err);
                }
            }
        }
    }
    Ok(ran)
}

/// Methods callable in `state`, computed from the registry's masks.
fn methods_in(reg: &Registry, state: RpcState) -> HashSet<String> {
    reg.method_names_in(state, true).into_iter().collect()
}

/// A subsystem's config writer: returns its `{method, params}` entries.
pub type ConfigWriter = Arc<dyn Fn() -> Vec<Value> + Send + Sync>;

struct Subsystem {
    name: String,
    depends_on: Vec<String>,
    writer: Option<ConfigWriter>,
}

fn subsystems() -> std::sync::MutexGuard<'static, Vec<Subsystem>> {
    static S: OnceLock<Mutex<Vec<Subsystem>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Registers a subsystem in initialisation order (dependencies first).
/// Re-registering a name replaces it.
pub fn register_subsystem(name: &str, depends_on: &[&str], writer: Option<ConfigWriter>) {
    let mut s = subsystems();
    s.retain(|x| x.name != name);
    s.push(Subsystem {
        name: name.to_string(),
        depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
        writer,
    });
}

/// The whole running config, as `save_config` prints it.
pub fn save_config() -> Value {
    let s = subsystems();
    let list: Vec<Value> = s
        .iter()
        .map(|x| {
            json!({
                "subsystem": x.name,
                "config": x.writer.as_ref().map(|w| Value::Array(w())).unwrap_or(Value::Null),
            })
        })
        .collect();
    json!({ "subsystems": list })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    with_batches: Option<bool>,
}

/// Registers `framework_get_subsystems` and `framework_get_config`.
pub fn register_rpcs(reg: &Registry) -> Result<(), RegisterError> {
    reg.register_fn(
        "framework_get_subsystems",
        StateMask::RUNTIME,
        |p, r: Responder| {
            if let Err(e) = no_params("framework_get_subsystems", p.as_ref()) {
                return r.err(e);
            }
            let v: Vec<Value> = subsystems()
                .iter()
                .map(|s| json!({"subsystem": s.name, "depends_on": s.depends_on}))
                .collect();
            r.ok(Value::Array(v));
        },
    )?;
    reg.register_fn(
        "framework_get_config",
        StateMask::RUNTIME,
        |p, r: Responder| {
            let g: GetConfig = match decode(p) {
                Ok(g) => g,
                Err(e) => return r.err(e),
            };
            let writer = {
                let s = subsystems();
                match s.iter().find(|s| s.name == g.name) {
                    Some(s) => s.writer.clone(),
                    None => {
                        return r.err(RpcError::invalid_params(format!(
                            "Subsystem '{}' not found",
                            g.name
                        )))
                    }
                }
            };
            r.ok(writer.map(|w| Value::Array(w())).unwrap_or(Value::Null));
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spdk_json_with_comments_and_batches() {
        let text = r#"
        // a comment
        { "subsystems": [
            { "subsystem": "bdev", "config": [
                { "method": "bdev_malloc_create", "params": {"name": "M/*x*/0", "num_blocks": 8, "block_size": 512} },
                /* block comment */
                [ { "method": "a" }, { "method": "b", "params": null } ],
                { "method": "bdev_wait_for_examine" }
            ]},
            { "subsystem": "nbd", "config": null }
        ]}"#;
        let calls = parse_json(text).unwrap();
        let names: Vec<&str> = calls.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(
            names,
            ["bdev_malloc_create", "a", "b", "bdev_wait_for_examine"]
        );
        assert_eq!(calls[0].params.as_ref().unwrap()["name"], "M/*x*/0");
        assert_eq!(calls[3].index, 4);
    }

    #[test]
    fn yaml_gives_the_same_calls() {
        let yaml = "subsystems:\n  - subsystem: bdev\n    config:\n      - method: bdev_malloc_create\n        params: {name: M0, num_blocks: 8, block_size: 512}\n";
        let json = r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"M0","num_blocks":8,"block_size":512}}]}]}"#;
        assert_eq!(parse_yaml(yaml).unwrap(), parse_json(json).unwrap());
    }

    #[test]
    fn rejects_bad_shapes_precisely() {
        for (text, needle) in [
            ("[1]", "root must be an object"),
            (r#"{"subsystems": 3}"#, "'subsystems' must be an array"),
            (r#"{"subsystems": [{"config": []}]}"#, "needs a 'subsystem'"),
            (
                r#"{"subsystems": [{"subsystem": "b", "config": 1}]}"#,
                "must be an array or null",
            ),
            (
                r#"{"subsystems": [{"subsystem": "b", "config": [{"params": {}}]}]}"#,
                "needs a 'method'",
            ),
            (
                r#"{"subsystems": [{"subsystem": "b", "config": [{"method": "m", "params": [1]}]}]}"#,
                "must be an object",
            ),
            ("{", "Parsing JSON"),
        ] {
            let e = parse_json(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        assert!(parse_json("{}").unwrap().is_empty());
    }

    #[test]
    fn apply_runs_two_passes_and_stops_at_first_error() {
        let reg = Registry::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        for (name, mask) in [
            ("s", StateMask::STARTUP),
            ("r", StateMask::RUNTIME),
            ("both", StateMask::BOTH),
            ("bad", StateMask::RUNTIME),
        ] {
            reg.register_fn(name, mask, |_, r: Responder| r.ok(json!(true)))
                .unwrap();
        }
        let calls = parse_json(r#"{"subsystems":[{"subsystem":"x","config":[{"method":"r"},{"method":"s"},{"method":"both"},{"method":"bad"},{"method":"r"}]}]}"#).unwrap();
        let l2 = log.clone();
        let exec = move |m: &str, _p: Option<Value>| -> Result<Value, RpcError> {
            l2.lock().unwrap().push(m.to_string());
            if m == "bad" {
                Err(RpcError::from_errno(22))
            } else {
                Ok(json!(true))
            }
        };
        assert_eq!(apply(&reg, &calls, Pass::Startup, false, &exec).unwrap(), 2);
        reg.set_state(RpcState::Runtime);
        let e = apply(&reg, &calls, Pass::Runtime, false, &exec).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Call {
                    index: 4,
                    code: -22,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(*log.lock().unwrap(), ["s", "both", "r", "bad"]);
        // Unknown methods are reported with their position.
        let calls =
            parse_json(r#"{"subsystems":[{"subsystem":"x","config":[{"method":"nope"}]}]}"#)
                .unwrap();
        let e = apply(&reg, &calls, Pass::Runtime, false, &exec).unwrap_err();
        assert!(e.to_string().contains("Method 'nope' was not found"), "{e}");
    }
}
