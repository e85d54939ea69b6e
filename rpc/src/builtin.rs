//! Core methods every SPDK app answers: `rpc_get_methods`, `spdk_get_version`,
//! `framework_wait_init`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::RpcError;
use crate::params::{decode, no_params};
use crate::registry::{RegisterError, Registry, StateMask};

/// The SPDK release whose wire behaviour we mirror (`spdk_get_version` reports it, because
/// SPDK's tools parse that shape).
pub const SPDK_VERSION_MAJOR: u32 = 26;
/// See [`SPDK_VERSION_MAJOR`].
pub const SPDK_VERSION_MINOR: u32 = 9;
/// See [`SPDK_VERSION_MAJOR`].
pub const SPDK_VERSION_PATCH: u32 = 0;
/// See [`SPDK_VERSION_MAJOR`].
pub const SPDK_VERSION_SUFFIX: &str = "-pre";

/// The result of `spdk_get_version`.
///
/// Same shape as SPDK 26.09-pre (`version`, `fields.{major,minor,patch,suffix[,commit]}`),
/// plus `"writecache": "<this crate's version>"` so that our build is identifiable. The
/// `git sha1` part and `fields.commit` come from the `WC_GIT_SHA1` environment variable at
/// compile time; without it they are left out, exactly as SPDK does for non-git builds.
pub fn version_info() -> Value {
    let commit = option_env!("WC_GIT_SHA1").filter(|s| !s.is_empty());
    let mut version = format!("SPDK v{SPDK_VERSION_MAJOR}.{SPDK_VERSION_MINOR:02}");
    if SPDK_VERSION_PATCH != 0 {
        version.push_str(&format!(".{SPDK_VERSION_PATCH}"));
    }
    version.push_str(SPDK_VERSION_SUFFIX);
    let mut fields = json!({
        "major": SPDK_VERSION_MAJOR,
        "minor": SPDK_VERSION_MINOR,
        "patch": SPDK_VERSION_PATCH,
        "suffix": SPDK_VERSION_SUFFIX,
    });
    if let Some(c) = commit {
        version.push_str(&format!(" git sha1 {c}"));
        fields["commit"] = json!(c);
    }
    json!({
        "version": version,
        "fields": fields,
        "writecache": env!("CARGO_PKG_VERSION"),
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct GetMethodsParams {
    current: bool,
    include_aliases: bool,
}

/// Registers `rpc_get_methods`, `spdk_get_version` and `framework_wait_init` (all callable
/// in STARTUP and RUNTIME). Call it once per registry; a second call fails with
/// [`RegisterError::Duplicate`].
pub fn register_builtin(registry: &Registry) -> Result<(), RegisterError> {
    let weak = registry.downgrade();
    registry.register(
        "rpc_get_methods",
        StateMask::BOTH,
        Arc::new(move |params, resp| {
            let p: GetMethodsParams = match decode(params) {
                Ok(p) => p,
                Err(e) => return resp.err(e),
            };
            match weak.upgrade() {
                Some(reg) => resp.respond_with(Ok(reg.method_names(p.current, p.include_aliases))),
                None => resp.err(RpcError::internal("Internal error")),
            }
        }),
    )?;

    registry.register(
        "spdk_get_version",
        StateMask::BOTH,
        Arc::new(|params, resp| {
            if let Err(e) = no_params("spdk_get_version", params.as_ref()) {
                return resp.err(e);
            }
            resp.ok(version_info());
        }),
    )?;

    let weak = registry.downgrade();
    registry.register(
        "framework_wait_init",
        StateMask::BOTH,
        Arc::new(move |params, resp| {
            if let Err(e) = no_params("framework_wait_init", params.as_ref()) {
                return resp.err(e);
            }
            match weak.upgrade() {
                Some(reg) => reg.wait_for_runtime(resp),
                None => resp.err(RpcError::internal("Internal error")),
            }
        }),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Responder, RpcState};

    #[test]
    fn builtins_register_once() {
        let r = Registry::new();
        register_builtin(&r).unwrap();
        assert!(matches!(
            register_builtin(&r),
            Err(RegisterError::Duplicate(_))
        ));
    }

    #[test]
    fn get_methods_params() {
        let r = Registry::new();
        register_builtin(&r).unwrap();
        r.register_fn("rt", StateMask::RUNTIME, |_, resp| resp.ok(Value::Null))
            .unwrap();
        r.register_alias("old_rt", "rt").unwrap();
        let all = r.call_blocking("rpc_get_methods", None).unwrap();
        assert_eq!(
            all,
            json!([
                "rpc_get_methods",
                "spdk_get_version",
                "framework_wait_init",
                "rt"
            ])
        );
        // What rpc.py sends by default.
        let cur = r
            .call_blocking(
                "rpc_get_methods",
                Some(json!({"current": true, "include_aliases": false})),
            )
            .unwrap();
        assert_eq!(
            cur,
            json!(["rpc_get_methods", "spdk_get_version", "framework_wait_init"])
        );
        let with_alias = r
            .call_blocking("rpc_get_methods", Some(json!({"include_aliases": true})))
            .unwrap();
        assert_eq!(with_alias.as_array().unwrap().len(), 5);
        let e = r
            .call_blocking("rpc_get_methods", Some(json!({"bogus": true})))
            .unwrap_err();
        assert_eq!(e.code, -32602);
        assert!(e.message.contains("bogus"));
    }

    #[test]
    fn version_shape() {
        let r = Registry::new();
        register_builtin(&r).unwrap();
        let v = r.call_blocking("spdk_get_version", None).unwrap();
        let s = v["version"].as_str().unwrap();
        assert!(s.starts_with("SPDK v26.09-pre"), "{s}");
        assert_eq!(v["fields"]["major"], 26);
        assert_eq!(v["fields"]["minor"], 9);
        assert_eq!(v["fields"]["patch"], 0);
        assert_eq!(v["fields"]["suffix"], "-pre");
        assert_eq!(v["writecache"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            r.call_blocking("spdk_get_version", Some(json!({"a": 1}))),
            Err(RpcError::invalid_params(
                "spdk_get_version method requires no parameters"
            ))
        );
    }

    #[test]
    fn wait_init_blocks_until_runtime() {
        let r = Registry::new();
        register_builtin(&r).unwrap();
        let (resp, rx) = Responder::channel();
        r.dispatch("framework_wait_init", None, resp);
        assert!(rx.try_recv().is_err());
        r.set_state(RpcState::Runtime);
        assert_eq!(rx.try_recv().unwrap(), Ok(Value::Bool(true)));
        assert_eq!(
            r.call_blocking("framework_wait_init", None),
            Ok(json!(true))
        );
    }
}
