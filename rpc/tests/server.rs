//! Wire-level tests of the RPC server over a real Unix socket.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use wc_rpc::client::Client;
use wc_rpc::{
    decode, inline_dispatcher, register_builtin, Registry, Responder, RpcError, RpcServer,
    RpcState, ServerOptions, StateMask,
};

// ---------------------------------------------------------------------------------------
// Harness

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique, empty directory under /tmp, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/wc-rpc-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("rpc.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictParams {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    readonly: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaterParams {
    ms: u64,
}

type Parked = Arc<Mutex<Vec<Responder>>>;

/// Builtins plus the test methods.
fn test_registry(hits: Arc<AtomicUsize>, parked: Parked) -> Registry {
    let r = Registry::new();
    register_builtin(&r).unwrap();
    // Keeps the responder; the test answers it whenever it likes.
    r.register_fn("park", StateMask::RUNTIME, move |_, resp| {
        parked.lock().unwrap().push(resp)
    })
    .unwrap();
    r.register_fn("echo", StateMask::BOTH, move |p, resp| {
        hits.fetch_add(1, Ordering::SeqCst);
        resp.ok(p.unwrap_or(Value::Null))
    })
    .unwrap();
    r.register_fn("strict", StateMask::RUNTIME, |p, resp| {
        match decode::<StrictParams>(p) {
            Ok(p) => resp.ok(json!(p.name)),
            Err(e) => resp.err(e),
        }
    })
    .unwrap();
    r.register_fn("startup_only", StateMask::STARTUP, |_, resp| {
        resp.ok(json!(true))
    })
    .unwrap();
    r.register_fn("runtime_only", StateMask::RUNTIME, |_, resp| {
        resp.ok(json!(true))
    })
    .unwrap();
    r.register_fn("enodev", StateMask::RUNTIME, |_, resp| {
        resp.err(RpcError::from_errno(19))
    })
    .unwrap();
    r.register_fn("later", StateMask::RUNTIME, |p, resp| {
        let ms = match decode::<LaterParams>(p) {
            Ok(p) => p.ms,
            Err(e) => return resp.err(e),
        };
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(ms));
            resp.ok(json!({ "later": ms }));
        });
    })
    .unwrap();
    r.register_fn("drop", StateMask::RUNTIME, |_, resp| drop(resp))
        .unwrap();
    r.register_fn("panic", StateMask::RUNTIME, |_, _resp| {
        panic!("handler panic (expected by the test)")
    })
    .unwrap();
    r.register_alias("old_echo", "echo").unwrap();
    r
}

struct Harness {
    server: RpcServer,
    registry: Registry,
    hits: Arc<AtomicUsize>,
    parked: Parked,
    // Declared last: removed after the server is stopped.
    dir: TempDir,
}

impl Harness {
    fn new(tag: &str) -> Harness {
        Self::with_options(tag, ServerOptions::default())
    }

    fn with_options(tag: &str, opts: ServerOptions) -> Harness {
        let dir = TempDir::new(tag);
        let hits = Arc::new(AtomicUsize::new(0));
        let parked = Parked::default();
        let registry = test_registry(Arc::clone(&hits), Arc::clone(&parked));
        registry.set_state(RpcState::Runtime);
        let server =
            RpcServer::start_with_options(dir.sock(), registry.clone(), inline_dispatcher(), opts)
                .unwrap();
        Harness {
            server,
            registry,
            hits,
            parked,
            dir,
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.sock()
    }

    /// Waits for `n` parked requests and takes them.
    fn take_parked(&self, n: usize) -> Vec<Responder> {
        wait_until(|| self.parked.lock().unwrap().len() >= n, "parked requests");
        std::mem::take(&mut *self.parked.lock().unwrap())
    }

    fn client(&self) -> Client {
        let c = Client::connect(self.sock()).unwrap();
        c.set_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }
}

/// Reads one reply, failing the test on timeout or EOF.
fn read(c: &mut Client) -> Value {
    c.read_value().expect("expected a reply")
}

/// Asserts that nothing arrives within `ms`.
fn assert_silent(c: &mut Client, ms: u64) {
    c.set_timeout(Some(Duration::from_millis(ms))).unwrap();
    match c.read_value() {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    c.set_timeout(Some(Duration::from_secs(10))).unwrap();
}

/// Asserts that the server closed the connection (after any queued replies were read).
fn assert_closed(c: &mut Client) {
    match c.read_value() {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
}

fn error_of(v: &Value) -> (i64, String) {
    (
        v["error"]["code"].as_i64().expect("error code"),
        v["error"]["message"].as_str().expect("message").to_owned(),
    )
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------
// Framing

#[test]
fn framing_two_requests_in_one_write() {
    let h = Harness::new("two");
    let mut c = h.client();
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","id":1,"params":{"a":1}}{"jsonrpc":"2.0","method":"echo","id":2,"params":{"a":2}}"#)
        .unwrap();
    let a = read(&mut c);
    let b = read(&mut c);
    assert_eq!(a, json!({"jsonrpc": "2.0", "id": 1, "result": {"a": 1}}));
    assert_eq!(b, json!({"jsonrpc": "2.0", "id": 2, "result": {"a": 2}}));
}

#[test]
fn framing_split_byte_by_byte() {
    let h = Harness::new("bytes");
    let mut c = h.client();
    // Multi-byte UTF-8 characters get split across writes too.
    let req = json!({"jsonrpc": "2.0", "method": "echo", "id": 7, "params": {"s": "héllo ✓ 日本"}});
    let text = serde_json::to_string_pretty(&req).unwrap();
    for b in text.as_bytes() {
        c.send_raw(std::slice::from_ref(b)).unwrap();
        thread::sleep(Duration::from_micros(300));
    }
    let v = read(&mut c);
    assert_eq!(v["id"], 7);
    assert_eq!(v["result"]["s"], "héllo ✓ 日本");
}

#[test]
fn framing_pretty_printed_like_rpc_py() {
    let h = Harness::new("pretty");
    let mut c = h.client();
    // rpc.py: json.dumps(indent=2), no trailing newline; queued requests joined with "\n".
    let one = "{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"rpc_get_methods\",\n  \"id\": 1,\n  \"params\": {\n    \"current\": false,\n    \"include_aliases\": false\n  }\n}";
    let two = "{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"spdk_get_version\",\n  \"id\": 2\n}";
    c.send_raw(format!("{one}\n{two}").as_bytes()).unwrap();
    let a = read(&mut c);
    assert_eq!(a["id"], 1);
    assert!(a["result"]
        .as_array()
        .unwrap()
        .contains(&json!("rpc_get_methods")));
    let b = read(&mut c);
    assert_eq!(b["id"], 2);
    assert!(b["result"]["version"]
        .as_str()
        .unwrap()
        .starts_with("SPDK v26.09-pre"));
}

#[test]
fn reply_is_compact_ordered_and_newline_terminated() {
    let h = Harness::new("exact");
    let mut s = UnixStream::connect(h.sock()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(br#"{"method":"echo","params":{"k":[1, 2]},"id":"x","jsonrpc":"2.0"} {"method":"enodev","id":9}"#)
        .unwrap();
    let expected = "{\"jsonrpc\":\"2.0\",\"id\":\"x\",\"result\":{\"k\":[1,2]}}\n\
                    {\"jsonrpc\":\"2.0\",\"id\":9,\"error\":{\"code\":-19,\"message\":\"No such device\"}}\n";
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while got.len() < expected.len() {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(String::from_utf8(got).unwrap(), expected);
}

#[test]
fn oversized_request_gets_parse_error_and_close() {
    let h = Harness::new("big");
    // Just under the limit is fine.
    let mut c = h.client();
    let big = "x".repeat(200 * 1024);
    assert_eq!(
        c.call("echo", Some(json!({ "s": big.clone() }))).unwrap()["s"]
            .as_str()
            .unwrap()
            .len(),
        big.len()
    );
    // An unterminated request over 256 KiB is refused.
    let mut c = h.client();
    let mut req = br#"{"method":"echo","id":1,"params":{"s":""#.to_vec();
    req.extend(std::iter::repeat_n(b'y', 300 * 1024));
    let _ = c.send_raw(&req);
    let v = read(&mut c);
    assert_eq!(error_of(&v), (-32700, "Parse error".into()));
    assert_closed(&mut c);
}

#[test]
fn half_closed_client_still_gets_its_reply() {
    let h = Harness::new("half");
    let mut c = h.client();
    c.send_raw(br#"{"method":"later","params":{"ms":100},"id":1}"#)
        .unwrap();
    c.stream().shutdown(Shutdown::Write).unwrap();
    let v = read(&mut c);
    assert_eq!(v["result"], json!({"later": 100}));
    assert_closed(&mut c);
}

// ---------------------------------------------------------------------------------------
// Ids and notifications

#[test]
fn id_is_echoed_verbatim() {
    let h = Harness::new("ids");
    let mut s = UnixStream::connect(h.sock()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for id in [
        "1",
        "0",
        "-3",
        "1e3",
        "2.50",
        "123456789012345678901234567890",
        "\"abc\"",
        "\"日本\"",
        "\"\"",
    ] {
        s.write_all(format!(r#"{{"method":"spdk_get_version","id":{id}}}"#).as_bytes())
            .unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            assert_eq!(s.read(&mut byte).unwrap(), 1);
            line.push(byte[0]);
        }
        let line = String::from_utf8(line).unwrap();
        assert!(
            line.starts_with(&format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":")),
            "{id}: {line}"
        );
    }
}

#[test]
fn notifications_get_no_success_reply_but_errors_are_sent() {
    let h = Harness::new("notif");
    let mut c = h.client();
    // Absent id and null id: executed, no reply.
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","params":{"n":1}}"#)
        .unwrap();
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","params":{"n":2},"id":null}"#)
        .unwrap();
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","params":{"n":3},"id":3}"#)
        .unwrap();
    let v = read(&mut c);
    assert_eq!(v["id"], 3);
    assert_eq!(h.hits.load(Ordering::SeqCst), 3);
    // Errors for notifications are still sent, with id null.
    c.send_raw(br#"{"jsonrpc":"2.0","method":"no_such_method"}"#)
        .unwrap();
    let v = read(&mut c);
    assert_eq!(v["id"], Value::Null);
    assert_eq!(error_of(&v).0, -32601);
    c.send_raw(br#"{"method":"enodev","id":null}"#).unwrap();
    let v = read(&mut c);
    assert_eq!(v["id"], Value::Null);
    assert_eq!(error_of(&v), (-19, "No such device".into()));
    assert_silent(&mut c, 100);
}

// ---------------------------------------------------------------------------------------
// Error paths

#[test]
fn parse_error_replies_then_closes() {
    let h = Harness::new("parse");
    for bad in [
        &br#"{"method": }"#[..],
        b"}",
        b"\xff\xfe",
        br#"{"method":"echo","id":1} garbage"#,
        br#"{"method":"echo","params":{"s":"\x01"},"id":1}"#,
    ] {
        let mut c = h.client();
        c.send_raw(bad).unwrap();
        let mut v = read(&mut c);
        if v.get("result").is_some() {
            // The valid request before the garbage is answered first.
            assert_eq!(v["id"], 1);
            v = read(&mut c);
        }
        assert_eq!(
            v,
            json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "Parse error"}}),
            "{}",
            String::from_utf8_lossy(bad)
        );
        assert_closed(&mut c);
    }
    // The server itself is fine.
    assert!(h.client().call("rpc_get_methods", None).is_ok());
}

#[test]
fn invalid_requests_get_32600_with_null_id_and_keep_the_connection() {
    let h = Harness::new("invreq");
    let mut c = h.client();
    for bad in [
        r#"{"jsonrpc":"2.0","method":"echo","id":1,"extra":true}"#,
        r#"{"jsonrpc":"1.0","method":"echo","id":1}"#,
        r#"{"jsonrpc":2,"method":"echo","id":1}"#,
        r#"{"jsonrpc":"2.0","id":1}"#,
        r#"{"jsonrpc":"2.0","method":7,"id":1}"#,
        r#"{"jsonrpc":"2.0","method":"echo","id":{"a":1}}"#,
        r#"{"jsonrpc":"2.0","method":"echo","id":[1]}"#,
        r#"{"jsonrpc":"2.0","method":"echo","id":true}"#,
        r#"{"jsonrpc":"2.0","method":"echo","id":1,"params":"s"}"#,
        r#"{"jsonrpc":"2.0","method":"echo","id":1,"params":5}"#,
        r#"42"#,
        r#""just a string""#,
        r#"null"#,
        r#"[]"#,
    ] {
        c.send_raw(bad.as_bytes()).unwrap();
        let v = read(&mut c);
        assert_eq!(
            v,
            json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32600, "message": "Invalid request"}}),
            "{bad}"
        );
    }
    assert_eq!(
        c.call("echo", Some(json!({"ok": 1}))).unwrap(),
        json!({"ok": 1})
    );
    // params null is the same as no params.
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","id":5,"params":null}"#)
        .unwrap();
    assert_eq!(read(&mut c)["result"], Value::Null);
}

#[test]
fn unknown_method_is_32601() {
    let h = Harness::new("nomethod");
    let mut c = h.client();
    assert_eq!(
        c.call("bdev_nothing", None),
        Err(RpcError::new(-32601, "Method not found"))
    );
}

#[test]
fn strict_params_are_32602_naming_the_field() {
    let h = Harness::new("params");
    let mut c = h.client();
    assert_eq!(
        c.call("strict", Some(json!({"name": "a", "readonly": false}))),
        Ok(json!("a"))
    );
    let e = c
        .call("strict", Some(json!({"name": "a", "colour": "red"})))
        .unwrap_err();
    assert_eq!(e.code, -32602);
    assert!(
        e.message.contains("unknown field `colour`"),
        "{}",
        e.message
    );
    let e = c
        .call("strict", Some(json!({"readonly": true})))
        .unwrap_err();
    assert_eq!(e.code, -32602);
    assert!(e.message.contains("missing field `name`"), "{}", e.message);
    let e = c.call("strict", Some(json!({"name": 5}))).unwrap_err();
    assert_eq!(e.code, -32602);
    let e = c.call("strict", Some(json!(["a"]))).unwrap_err();
    assert_eq!(e.code, -32602);
    let e = c
        .call("spdk_get_version", Some(json!({"x": 1})))
        .unwrap_err();
    assert_eq!(
        e,
        RpcError::new(-32602, "spdk_get_version method requires no parameters")
    );
}

#[test]
fn state_errors_are_minus_one_with_spdk_messages() {
    let h = Harness::new("state");
    let mut c = h.client();
    let e = c.call("startup_only", None).unwrap_err();
    assert_eq!(e, RpcError::invalid_state_runtime());
    assert_eq!(e.code, -1);
    h.registry.set_state(RpcState::Startup);
    let e = c.call("runtime_only", None).unwrap_err();
    assert_eq!(
        e,
        RpcError::new(
            -1,
            "Method may only be called after framework is initialized using framework_start_init RPC."
        )
    );
    assert_eq!(c.call("startup_only", None), Ok(json!(true)));
    // rpc_get_methods --current follows the state.
    let cur = c
        .call("rpc_get_methods", Some(json!({"current": true})))
        .unwrap();
    assert!(cur.as_array().unwrap().contains(&json!("startup_only")));
    assert!(!cur.as_array().unwrap().contains(&json!("runtime_only")));
}

#[test]
fn errno_errors_carry_strerror_text() {
    let h = Harness::new("errno");
    let mut c = h.client();
    assert_eq!(
        c.call("enodev", None),
        Err(RpcError::new(-19, "No such device"))
    );
}

#[test]
fn dropped_responder_and_panicking_handler_give_32603() {
    let h = Harness::new("drop");
    let mut c = h.client();
    assert_eq!(
        c.call("drop", None),
        Err(RpcError::new(-32603, "Internal error"))
    );
    assert_eq!(
        c.call("panic", None),
        Err(RpcError::new(-32603, "Internal error"))
    );
    // The connection (whose handler ran inline on the event loop) still works.
    assert_eq!(c.call("echo", Some(json!({"a": 1}))), Ok(json!({"a": 1})));
}

// ---------------------------------------------------------------------------------------
// Batches

#[test]
fn batch_replies_in_request_order_without_notifications() {
    let h = Harness::new("batch");
    let mut c = h.client();
    c.send_raw(
        br#"[
            {"jsonrpc":"2.0","method":"later","params":{"ms":150},"id":1},
            {"jsonrpc":"2.0","method":"echo","params":{"n":2}},
            {"jsonrpc":"2.0","method":"echo","params":{"n":3},"id":"three"},
            5,
            {"jsonrpc":"2.0","method":"nope","id":4},
            {"jsonrpc":"2.0","method":"enodev"}
        ]"#,
    )
    .unwrap();
    let v = read(&mut c);
    assert_eq!(
        v,
        json!([
            {"jsonrpc": "2.0", "id": 1, "result": {"later": 150}},
            {"jsonrpc": "2.0", "id": "three", "result": {"n": 3}},
            {"jsonrpc": "2.0", "id": null, "error": {"code": -32600, "message": "Invalid request"}},
            {"jsonrpc": "2.0", "id": 4, "error": {"code": -32601, "message": "Method not found"}},
            {"jsonrpc": "2.0", "id": null, "error": {"code": -19, "message": "No such device"}},
        ])
    );
}

#[test]
fn batch_of_notifications_gets_no_reply_and_empty_batch_is_invalid() {
    let h = Harness::new("batchn");
    let mut c = h.client();
    c.send_raw(br#"[{"method":"echo"},{"method":"echo","id":null}]"#)
        .unwrap();
    c.send_raw(b"[]").unwrap();
    let v = read(&mut c);
    assert_eq!(
        v,
        json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32600, "message": "Invalid request"}})
    );
    assert_eq!(h.hits.load(Ordering::SeqCst), 2);
    assert_silent(&mut c, 100);
}

// ---------------------------------------------------------------------------------------
// Asynchrony, pausing

#[test]
fn handler_may_reply_later_from_another_thread_out_of_order() {
    let h = Harness::new("later");
    let mut c = h.client();
    c.send_raw(br#"{"method":"park","id":1}{"method":"echo","params":{"fast":true},"id":2}"#)
        .unwrap();
    // The parked request has not answered, so the second one's reply comes first.
    assert_eq!(read(&mut c)["id"], 2);
    let parked = h.take_parked(1);
    thread::spawn(move || {
        for r in parked {
            r.ok(json!("from another thread"));
        }
    })
    .join()
    .unwrap();
    let v = read(&mut c);
    assert_eq!(v["id"], 1);
    assert_eq!(v["result"], "from another thread");
    // A handler that spawns its own thread works the same way.
    assert_eq!(
        c.call("later", Some(json!({"ms": 20}))),
        Ok(json!({"later": 20}))
    );
}

#[test]
fn pending_handler_does_not_block_other_connections() {
    let h = Harness::new("slow");
    let mut slow = h.client();
    slow.send_raw(br#"{"method":"park","id":1}"#).unwrap();
    let parked = h.take_parked(1);
    let mut other = h.client();
    assert!(other.call("rpc_get_methods", None).is_ok());
    assert_silent(&mut slow, 50);
    for r in parked {
        r.ok(json!(true));
    }
    assert_eq!(read(&mut slow)["id"], 1);
}

#[test]
fn pause_holds_requests_until_resume() {
    let h = Harness::new("pause");
    h.server.pause();
    assert!(h.server.is_paused());
    let mut a = h.client();
    let mut b = h.client();
    a.send_raw(br#"{"method":"echo","params":{"n":1},"id":1}"#)
        .unwrap();
    b.send_raw(br#"{"method":"echo","params":{"n":2},"id":2}"#)
        .unwrap();
    a.send_raw(br#"{"method":"echo","params":{"n":3},"id":3}"#)
        .unwrap();
    assert_silent(&mut a, 200);
    assert_silent(&mut b, 10);
    assert_eq!(
        h.hits.load(Ordering::SeqCst),
        0,
        "nothing may run while paused"
    );
    // Held, not rejected: resume dispatches them.
    h.server.resume();
    assert_eq!(read(&mut a)["id"], 1);
    assert_eq!(read(&mut a)["id"], 3);
    assert_eq!(read(&mut b)["id"], 2);
    assert_eq!(h.hits.load(Ordering::SeqCst), 3);
    // A pause handle works from elsewhere too.
    let gate = h.server.pause_handle();
    gate.pause();
    a.send_raw(br#"{"method":"echo","id":4}"#).unwrap();
    assert_silent(&mut a, 100);
    thread::spawn(move || gate.resume()).join().unwrap();
    assert_eq!(read(&mut a)["id"], 4);
}

#[test]
fn start_paused_option_holds_from_the_first_request() {
    let h = Harness::with_options(
        "startp",
        ServerOptions {
            start_paused: true,
            ..ServerOptions::default()
        },
    );
    let mut c = h.client();
    c.send_raw(br#"{"method":"rpc_get_methods","id":1}"#)
        .unwrap();
    assert_silent(&mut c, 150);
    h.server.resume();
    assert_eq!(read(&mut c)["id"], 1);
}

#[test]
fn framework_wait_init_replies_when_runtime_is_reached() {
    let h = Harness::new("waitinit");
    h.registry.set_state(RpcState::Startup);
    let mut c = h.client();
    c.send_raw(br#"{"method":"framework_wait_init","id":1}"#)
        .unwrap();
    assert_silent(&mut c, 150);
    let reg = h.registry.clone();
    thread::spawn(move || reg.set_state(RpcState::Runtime));
    assert_eq!(read(&mut c)["result"], json!(true));
    assert_eq!(c.call("framework_wait_init", None), Ok(json!(true)));
}

#[test]
fn builtins_and_aliases_over_the_wire() {
    let h = Harness::new("builtin");
    let mut c = h.client();
    // Exactly what rpc.py sends for `rpc_get_methods`.
    let all = c
        .call(
            "rpc_get_methods",
            Some(json!({"current": false, "include_aliases": false})),
        )
        .unwrap();
    let all = all.as_array().unwrap();
    for m in [
        "rpc_get_methods",
        "spdk_get_version",
        "framework_wait_init",
        "echo",
    ] {
        assert!(all.contains(&json!(m)), "{m}");
    }
    assert!(!all.contains(&json!("old_echo")));
    let with = c
        .call("rpc_get_methods", Some(json!({"include_aliases": true})))
        .unwrap();
    assert!(with.as_array().unwrap().contains(&json!("old_echo")));
    assert_eq!(
        c.call("old_echo", Some(json!({"z": 0}))),
        Ok(json!({"z": 0}))
    );
    let v = c.call("spdk_get_version", None).unwrap();
    assert_eq!(v["fields"]["major"], 26);
    assert_eq!(v["fields"]["minor"], 9);
    assert_eq!(v["fields"]["suffix"], "-pre");
    assert_eq!(v["writecache"], env!("CARGO_PKG_VERSION"));
}

// ---------------------------------------------------------------------------------------
// Listener: limits, permissions, lock, lifecycle

#[test]
fn connection_65_is_closed() {
    let h = Harness::new("conns");
    let mut clients: Vec<Client> = (0..64).map(|_| h.client()).collect();
    // Make sure every one of them has been accepted and served.
    for c in clients.iter_mut() {
        assert!(c.call("spdk_get_version", None).is_ok());
    }
    // The count is published once per event-loop pass: a reply can arrive before it.
    wait_until(|| h.server.connection_count() == 64, "64 connections");
    let mut extra = Client::connect(h.sock()).unwrap();
    extra.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = extra.send_raw(br#"{"method":"spdk_get_version","id":1}"#);
    assert_closed(&mut extra);
    // Free a slot and a new connection works.
    clients.pop();
    wait_until(|| h.server.connection_count() == 63, "a free slot");
    assert!(h.client().call("spdk_get_version", None).is_ok());
    drop(clients);
    wait_until(
        || h.server.connection_count() == 0,
        "all connections to close",
    );
}

#[test]
fn socket_is_owner_only_by_default_and_mode_can_be_overridden() {
    let h = Harness::new("mode");
    let mode = std::fs::metadata(h.sock()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let h2 = Harness::with_options(
        "mode2",
        ServerOptions {
            socket_mode: Some(0o660),
            ..ServerOptions::default()
        },
    );
    let mode = std::fs::metadata(h2.sock()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

fn lock_path(sock: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", sock.display()))
}

#[test]
fn lock_file_prevents_a_second_server() {
    let dir = TempDir::new("lock");
    let sock = dir.sock();
    let reg = Registry::new();
    register_builtin(&reg).unwrap();
    let mut first = RpcServer::start(&sock, reg.clone(), inline_dispatcher()).unwrap();
    assert!(lock_path(&sock).exists());
    let err = RpcServer::start(&sock, reg.clone(), inline_dispatcher()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    assert_eq!(
        err.to_string(),
        format!(
            "RPC Unix domain socket path {} in use. Specify another.",
            sock.display()
        )
    );
    // The first server is unaffected.
    assert!(Client::connect(&sock)
        .unwrap()
        .call("spdk_get_version", None)
        .is_ok());
    first.stop();
    assert!(!sock.exists());
    assert!(!lock_path(&sock).exists());
    first.stop(); // idempotent
    let second = RpcServer::start(&sock, reg, inline_dispatcher()).unwrap();
    assert!(Client::connect(&sock)
        .unwrap()
        .call("rpc_get_methods", None)
        .is_ok());
    drop(second);
    assert!(!sock.exists());
    assert!(!lock_path(&sock).exists());
}

#[test]
fn stale_socket_is_replaced_but_other_files_are_not() {
    let dir = TempDir::new("stale");
    let sock = dir.sock();
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let reg = Registry::new();
    register_builtin(&reg).unwrap();
    let server = RpcServer::start(&sock, reg.clone(), inline_dispatcher()).unwrap();
    assert!(Client::connect(&sock)
        .unwrap()
        .call("spdk_get_version", None)
        .is_ok());
    drop(server);

    std::fs::write(&sock, b"precious").unwrap();
    let err = RpcServer::start(&sock, reg, inline_dispatcher()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
    assert!(!lock_path(&sock).exists());
}

#[test]
fn stop_closes_open_connections() {
    let mut h = Harness::new("stop");
    let mut c = h.client();
    assert!(c.call("spdk_get_version", None).is_ok());
    h.server.stop();
    assert_closed(&mut c);
    assert!(!h.sock().exists());
    assert!(UnixStream::connect(h.sock()).is_err());
}

// ---------------------------------------------------------------------------------------
// Client

#[test]
fn client_ids_count_from_one_and_empty_params_are_omitted() {
    let dir = TempDir::new("client");
    let listener = UnixListener::bind(dir.sock()).unwrap();
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut rd =
            serde_json::Deserializer::from_reader(s.try_clone().unwrap()).into_iter::<Value>();
        let mut w = s;
        let mut seen = Vec::new();
        for reply in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"ok":true}}"#,
            "\n{\"jsonrpc\":\"2.0\",\"id\":2,\n \"error\":{\"code\":-17,\"message\":\"File exists\"}}",
        ] {
            seen.push(rd.next().unwrap().unwrap());
            w.write_all(reply.as_bytes()).unwrap();
        }
        seen
    });
    let mut c = Client::connect(dir.sock()).unwrap();
    assert_eq!(c.call("a", Some(json!({}))), Ok(json!({"ok": true})));
    assert_eq!(
        c.call("b", Some(json!({"x": 1}))),
        Err(RpcError::new(-17, "File exists"))
    );
    let seen = server.join().unwrap();
    assert_eq!(seen[0], json!({"jsonrpc": "2.0", "method": "a", "id": 1}));
    assert_eq!(
        seen[1],
        json!({"jsonrpc": "2.0", "method": "b", "id": 2, "params": {"x": 1}})
    );
    // Transport failure after the server went away.
    let e = c.call("c", None).unwrap_err();
    assert!(
        e.message.starts_with("RPC transport error"),
        "{}",
        e.message
    );
}

// ---------------------------------------------------------------------------------------
// Fuzz

/// splitmix64: small, seedable, good enough to drive a fuzzer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SEEDS: &[&str] = &[
    r#"{"jsonrpc":"2.0","method":"rpc_get_methods","id":1,"params":{"current":true}}"#,
    r#"{"jsonrpc":"2.0","method":"echo","id":"s","params":{"a":[1,2,{"b":null}]}}"#,
    r#"[{"method":"echo","id":1},{"method":"spdk_get_version"},{"method":"nope","id":2}]"#,
    r#"{"method":"spdk_get_version","id":null}"#,
    r#"{"method":"framework_wait_init","id":3.5e2}"#,
    r#"{"jsonrpc":"2.0","method":"echo","params":["x",true,false,-1.5e-3]}"#,
];

const ALPHABET: &[u8] = b"{}[]\":,0123456789.-+eEtrufalsn \n\t\\/abcxyz\xc3\xa9\xff";

fn fuzz_input(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        // Pure noise from JSON-ish bytes.
        0 => (0..1 + rng.below(64))
            .map(|_| ALPHABET[rng.below(ALPHABET.len())])
            .collect(),
        // A valid request, untouched (keeps the connection doing real work).
        1 => SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec(),
        // A mutated request.
        _ => {
            let mut v = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let pos = rng.below(v.len());
                match rng.below(5) {
                    0 => v[pos] = ALPHABET[rng.below(ALPHABET.len())],
                    1 => v.insert(pos, ALPHABET[rng.below(ALPHABET.len())]),
                    2 => {
                        v.remove(pos);
                    }
                    3 => v.truncate(pos),
                    _ => {
                        let tail = v[pos..].to_vec();
                        v.extend_from_slice(&tail);
                    }
                }
                if v.is_empty() {
                    v.push(b'{');
                }
            }
            v
        }
    }
}

#[test]
fn fuzz_random_and_mutated_json_keeps_server_alive() {
    let dir = TempDir::new("fuzz");
    let reg = Registry::new();
    register_builtin(&reg).unwrap();
    reg.register_fn("echo", StateMask::BOTH, |p, resp| {
        resp.ok(p.unwrap_or(Value::Null))
    })
    .unwrap();
    reg.set_state(RpcState::Runtime);
    let server = RpcServer::start(dir.sock(), reg, inline_dispatcher()).unwrap();

    let seed = std::env::var("WC_RPC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    eprintln!("fuzz seed {seed} (set WC_RPC_FUZZ_SEED to replay)");
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut inputs = 0usize;
    let mut replies = 0usize;
    let mut reconnects = 0usize;
    let mut stream: Option<UnixStream> = None;
    let mut drain = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        let s = match stream.as_mut() {
            Some(s) => s,
            None => {
                reconnects += 1;
                let s = UnixStream::connect(dir.sock()).unwrap();
                // Give the server a moment to answer each input before the next one.
                s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                s.set_write_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                stream.insert(s)
            }
        };
        // Several inputs back to back (one write each, sometimes split in two).
        let mut dead = false;
        for _ in 0..1 + rng.below(8) {
            let input = fuzz_input(&mut rng);
            inputs += 1;
            let cut = rng.below(input.len() + 1);
            for part in [&input[..cut], &input[cut..]] {
                if part.is_empty() || dead {
                    continue;
                }
                match s.write_all(part) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => dead = true,
                }
            }
        }
        // Read whatever came back; EOF means the server closed us (parse error).
        loop {
            match s.read(&mut drain) {
                Ok(0) => {
                    dead = true;
                    break;
                }
                Ok(n) => replies += drain[..n].iter().filter(|&&b| b == b'\n').count(),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(_) => {
                    dead = true;
                    break;
                }
            }
        }
        // Occasionally start over even if alive (drops a partial request).
        if dead || rng.below(50) == 0 {
            stream = None;
        }
    }
    drop(stream);
    eprintln!("fuzz: {inputs} inputs, {replies} replies, {reconnects} connections");
    assert!(replies > 100 && reconnects > 1);

    let mut c = Client::connect(dir.sock()).unwrap();
    c.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let methods = c.call("rpc_get_methods", None).unwrap();
    assert!(methods
        .as_array()
        .unwrap()
        .contains(&json!("rpc_get_methods")));
    drop(c);
    wait_until(
        || server.connection_count() == 0,
        "fuzz connections to close",
    );
}
