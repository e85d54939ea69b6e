//! JSON-RPC error objects with SPDK's codes and messages.

use std::ffi::CStr;

/// `-32700`: the bytes on the socket are not JSON. The connection is closed after it.
pub const PARSE_ERROR: i32 = -32700;
/// `-32600`: the envelope is not a valid JSON-RPC 2.0 request (always answered with `"id": null`).
pub const INVALID_REQUEST: i32 = -32600;
/// `-32601`: no such method (or hidden by the allow-list).
pub const METHOD_NOT_FOUND: i32 = -32601;
/// `-32602`: the method's parameters could not be decoded.
pub const INVALID_PARAMS: i32 = -32602;
/// `-32603`: internal error (also sent when a handler never answers).
pub const INTERNAL_ERROR: i32 = -32603;
/// `-1` (`SPDK_JSONRPC_ERROR_INVALID_STATE`): the method exists but is not callable in the
/// current state. Note that `-EPERM` is also `-1`; SPDK does not tell them apart either.
pub const INVALID_STATE: i32 = -1;

/// Message SPDK sends for a RUNTIME-only method called while in STARTUP.
pub const INVALID_STATE_STARTUP_MSG: &str =
    "Method may only be called after framework is initialized using framework_start_init RPC.";
/// Message SPDK sends for a STARTUP-only method called while in RUNTIME.
pub const INVALID_STATE_RUNTIME_MSG: &str = "Method may only be called before framework is \
     initialized. Use --wait-for-rpc command line parameter and then issue this RPC before the \
     framework_start_init RPC.";

/// A JSON-RPC error object: `{"code": <i32>, "message": <string>}` (SPDK never sends `data`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (JSON-RPC error {code})")]
pub struct RpcError {
    /// The JSON-RPC error code (`-32xxx`, `-1`, or a negative errno).
    pub code: i32,
    /// Human-readable message, sent verbatim.
    pub message: String,
}

impl RpcError {
    /// Any code with any message.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// `-32700 "Parse error"`.
    pub fn parse_error() -> Self {
        Self::new(PARSE_ERROR, "Parse error")
    }

    /// `-32600 "Invalid request"`.
    pub fn invalid_request() -> Self {
        Self::new(INVALID_REQUEST, "Invalid request")
    }

    /// `-32601 "Method not found"`.
    pub fn method_not_found() -> Self {
        Self::new(METHOD_NOT_FOUND, "Method not found")
    }

    /// `-32602` with the given message (SPDK's generic text is `"Invalid parameters"`).
    pub fn invalid_params(msg: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, msg)
    }

    /// `-32603` with the given message (SPDK's generic text is `"Internal error"`).
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(INTERNAL_ERROR, msg)
    }

    /// `-1` with SPDK's message for "called in STARTUP, needs RUNTIME".
    pub fn invalid_state_startup() -> Self {
        Self::new(INVALID_STATE, INVALID_STATE_STARTUP_MSG)
    }

    /// `-1` with SPDK's message for "called in RUNTIME, needs STARTUP".
    pub fn invalid_state_runtime() -> Self {
        Self::new(INVALID_STATE, INVALID_STATE_RUNTIME_MSG)
    }

    /// `-errno` with the C library's `strerror` text, as most SPDK handlers reply
    /// (`from_errno(19)` → `-19 "No such device"`). A negative argument is accepted too
    /// (`from_errno(-19)` is the same), because SPDK code passes both.
    pub fn from_errno(errno: i32) -> Self {
        let e = errno.saturating_abs();
        Self::new(-e, strerror(e))
    }

    /// `-errno` with a custom message. A negative `errno` is accepted as in [`from_errno`](Self::from_errno).
    pub fn errno_msg(errno: i32, msg: impl Into<String>) -> Self {
        Self::new(-errno.saturating_abs(), msg)
    }

    /// The wire form of the error object, `{"code":..,"message":..}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code, "message": self.message })
    }
}

/// The C library's message for `errno` (e.g. 19 → `"No such device"`).
pub fn strerror(errno: i32) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes for the duration of the
    // call. libc's `strerror_r` binds the XSI variant (`__xpg_strerror_r` on glibc), which
    // writes a NUL-terminated string into `buf` and returns 0 on success.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        if let Ok(s) = CStr::from_bytes_until_nul(&buf) {
            if let Ok(s) = s.to_str() {
                if !s.is_empty() {
                    return s.to_owned();
                }
            }
        }
    }
    format!("Unknown error {errno}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_messages_match_spdk_table() {
        let cases = [
            (19, "No such device"),
            (17, "File exists"),
            (22, "Invalid argument"),
            (16, "Device or resource busy"),
            (2, "No such file or directory"),
            (12, "Cannot allocate memory"),
            (95, "Operation not supported"),
            (110, "Connection timed out"),
            (5, "Input/output error"),
            (1, "Operation not permitted"),
        ];
        for (errno, msg) in cases {
            let e = RpcError::from_errno(errno);
            assert_eq!(e.code, -errno);
            assert_eq!(e.message, msg, "errno {errno}");
            assert_eq!(RpcError::from_errno(-errno), e);
        }
    }

    #[test]
    fn unknown_errno_does_not_panic() {
        let e = RpcError::from_errno(99999);
        assert_eq!(e.code, -99999);
        assert!(!e.message.is_empty());
        let e = RpcError::from_errno(i32::MIN);
        assert_eq!(e.code, -i32::MAX);
    }

    #[test]
    fn fixed_codes_and_messages() {
        assert_eq!(RpcError::parse_error().code, -32700);
        assert_eq!(RpcError::parse_error().message, "Parse error");
        assert_eq!(RpcError::invalid_request().code, -32600);
        assert_eq!(RpcError::invalid_request().message, "Invalid request");
        assert_eq!(RpcError::method_not_found().code, -32601);
        assert_eq!(RpcError::method_not_found().message, "Method not found");
        assert_eq!(RpcError::invalid_params("x").code, -32602);
        assert_eq!(RpcError::internal("y").code, -32603);
        assert_eq!(RpcError::invalid_state_startup().code, -1);
        assert_eq!(RpcError::invalid_state_runtime().code, -1);
        assert!(RpcError::invalid_state_runtime().message.starts_with(
            "Method may only be called before framework is initialized. Use --wait-for-rpc"
        ));
        assert_eq!(
            RpcError::errno_msg(19, "Bdev foo not found"),
            RpcError::new(-19, "Bdev foo not found")
        );
        assert_eq!(
            RpcError::from_errno(22).to_json(),
            serde_json::json!({"code": -22, "message": "Invalid argument"})
        );
    }
}
