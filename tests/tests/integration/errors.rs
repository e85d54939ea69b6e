//! Error paths: the wire (parse errors, bad envelopes), method lookup,
//! parameter decoding, and errno-style handler errors.

use serde_json::{json, Value};

use crate::harness::Target;

fn error_of(reply: &Value) -> (i64, String) {
    let e = &reply["error"];
    (
        e["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("no error code: {reply}")),
        e["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn malformed_json_gets_parse_error_and_server_keeps_serving() {
    require_spdk_rpc!();
    let t = Target::start("parseerr", &[]);
    for garbage in [
        &br#"{"jsonrpc":"2.0","method":"spdk_get_version",,"id":1}"#[..],
        b"}",
        b"not json at all",
        b"{\"jsonrpc\": \"2.0\", \"method\": \"x\", \"id\": \xff}",
    ] {
        let mut c = t.client();
        c.send_raw(garbage).expect("send");
        let reply = c.read_value().expect("a -32700 reply before the close");
        assert_eq!(reply["jsonrpc"], "2.0", "{reply}");
        assert_eq!(reply["id"], Value::Null, "{reply}");
        let (code, msg) = error_of(&reply);
        assert_eq!(code, -32700, "{reply}");
        assert_eq!(msg, "Parse error");
        // The connection is closed after a parse error (no resync point).
        let next = c.read_value();
        assert!(next.is_err(), "connection should be closed, got {next:?}");
        // New connections are still served.
        let mut c2 = t.client();
        assert!(c2.call("spdk_get_version", None).is_ok());
    }
    // And through the stock client too.
    t.rpc_ok(&["spdk_get_version"]);
    t.stop();
}

#[test]
fn envelope_and_method_errors() {
    require_spdk_rpc!();
    let t = Target::start("envelope", &[]);
    let mut c = t.client();

    // Unknown method.
    let e = c.call("no_such_method", None).unwrap_err();
    assert_eq!((e.code, e.message.as_str()), (-32601, "Method not found"));

    // Invalid requests: -32600 with a null id.
    for bad in [
        r#"{"jsonrpc":"2.0","method":5,"id":1}"#,
        r#"{"jsonrpc":"1.0","method":"spdk_get_version","id":1}"#,
        r#"{"jsonrpc":"2.0","id":1}"#,
        r#"{"jsonrpc":"2.0","method":"spdk_get_version","id":{"a":1}}"#,
        r#"{"jsonrpc":"2.0","method":"spdk_get_version","id":1,"extra":true}"#,
        r#"{"jsonrpc":"2.0","method":"spdk_get_version","params":5,"id":1}"#,
        r#"[]"#,
        r#"42"#,
    ] {
        c.send_raw(bad.as_bytes()).expect("send");
        let reply = c.read_value().expect("reply");
        assert_eq!(error_of(&reply).0, -32600, "{bad} -> {reply}");
        assert_eq!(reply["id"], Value::Null, "{bad} -> {reply}");
    }

    // ids are echoed verbatim; notifications get no reply.
    c.send_raw(br#"{"jsonrpc":"2.0","method":"spdk_get_version"}"#)
        .expect("send");
    c.send_raw(br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":"abc"}"#)
        .expect("send");
    let reply = c.read_value().expect("reply");
    assert_eq!(
        reply["id"], "abc",
        "the notification must not be answered: {reply}"
    );
    assert!(reply["result"]["version"].is_string(), "{reply}");

    // A batch: one reply array, in request order.
    c.send_raw(
        br#"[{"jsonrpc":"2.0","method":"spdk_get_version","id":1},
             {"jsonrpc":"2.0","method":"nope","id":2}]"#,
    )
    .expect("send");
    let reply = c.read_value().expect("reply");
    let arr = reply
        .as_array()
        .unwrap_or_else(|| panic!("batch reply: {reply}"));
    assert_eq!(arr.len(), 2, "{reply}");
    assert_eq!(arr[0]["id"], 1);
    assert_eq!(arr[1]["id"], 2);
    assert_eq!(error_of(&arr[1]).0, -32601);

    // Methods without params reject params.
    let e = c
        .call("spdk_get_version", Some(json!({"x": 1})))
        .unwrap_err();
    assert_eq!(e.code, -32602);
    assert_eq!(e.message, "spdk_get_version method requires no parameters");
    t.stop();
}

#[test]
fn parameter_decoding_errors_name_the_field() {
    require_spdk_rpc!();
    let t = Target::start("params", &[]);
    let mut c = t.client();
    let cases = [
        // wrong type
        (
            json!({"name": "X", "num_blocks": "8", "block_size": 512}),
            "num_blocks",
        ),
        (
            json!({"name": "X", "num_blocks": 8, "block_size": -512}),
            "block_size",
        ),
        (
            json!({"name": 7, "num_blocks": 8, "block_size": 512}),
            "name",
        ),
        // missing required
        (json!({"name": "X", "block_size": 512}), "num_blocks"),
        // unknown key
        (
            json!({"name": "X", "num_blocks": 8, "block_size": 512, "bogus_key": 1}),
            "bogus_key",
        ),
    ];
    for (params, field) in cases {
        for method in ["bdev_malloc_create", "bdev_null_create"] {
            let e = c.call(method, Some(params.clone())).unwrap_err();
            assert_eq!(e.code, -32602, "{method} {params}: {e:?}");
            assert!(
                e.message.contains(field),
                "{method} {params}: message should name `{field}`: {:?}",
                e.message
            );
        }
    }
    // params must be an object.
    let e = c.call("bdev_get_bdevs", Some(json!(["M0"]))).unwrap_err();
    assert_eq!(e.code, -32602, "{e:?}");
    // The same through spdk-rpc: rpc_get_methods with an unknown key is not
    // expressible, but a bad enum value is (argparse catches it: exit 2).
    let out = t.rpc(&["bdev_get_iostat", "--reset-mode", "sideways"]);
    assert_eq!(out.code, 2, "{out:?}");
    // Nothing was created by the failed calls.
    assert_eq!(t.rpc_json(&["bdev_get_bdevs"]), json!([]));
    t.stop();
}

#[test]
fn duplicate_name_is_eexist() {
    require_spdk_rpc!();
    let t = Target::start("dup", &[]);
    t.rpc_ok(&["bdev_malloc_create", "-b", "D0", "1", "512"]);
    let err = t.rpc_err(&["bdev_malloc_create", "-b", "D0", "1", "512"]);
    assert!(err.contains("-17"), "{err}");
    // Names are global across modules.
    let err = t.rpc_err(&["bdev_null_create", "D0", "1", "512"]);
    assert!(err.contains("-17"), "{err}");
    // Deleting through the wrong module does not delete it.
    let out = t.rpc(&["bdev_null_delete", "D0"]);
    assert_ne!(
        out.code, 0,
        "bdev_null_delete must not delete a malloc bdev: {out:?}"
    );
    t.rpc_ok(&["bdev_malloc_delete", "D0"]);
    t.stop();
}

#[test]
fn deleting_a_claimed_bdev_is_ebusy() {
    require_spdk_rpc!();
    let t = Target::start("claimed", &[]);
    let methods = t.rpc_json(&["rpc_get_methods"]);
    let has = |m: &str| methods.as_array().is_some_and(|a| a.contains(&json!(m)));
    t.rpc_ok(&["bdev_malloc_create", "-b", "Base0", "4", "512"]);
    // Claim Base0 with whatever stacking module this build has.
    let claimed = if has("bdev_delay_create") {
        t.rpc_ok(&[
            "bdev_delay_create",
            "-b",
            "Base0",
            "-d",
            "Dly0",
            "-r",
            "1",
            "-t",
            "1",
            "-w",
            "1",
            "-n",
            "1",
        ]);
        Some(("bdev_delay_delete", "Dly0"))
    } else if has("bdev_error_create") {
        t.rpc_ok(&["bdev_error_create", "Base0"]);
        Some(("bdev_error_delete", "EE_Base0"))
    } else {
        None
    };
    let Some((del, vbdev)) = claimed else {
        println!(
            "SKIP: no RPC can claim a bdev in this build (no delay/error/writecache module \
             registered); -16 on deleting a claimed bdev is untested"
        );
        t.stop();
        return;
    };
    let b = t.rpc_json(&["bdev_get_bdevs", "-b", "Base0"]);
    assert_eq!(b[0]["claimed"], true, "{b}");
    let err = t.rpc_err(&["bdev_malloc_delete", "Base0"]);
    assert!(err.contains("-16"), "{err}");
    t.rpc_ok(&[del, vbdev]);
    t.rpc_ok(&["bdev_malloc_delete", "Base0"]);
    t.stop();
}

/// Regression: an unsatisfiable size used to abort the whole target
/// (`DmaBuf::new` -> `handle_alloc_error`).
#[test]
fn huge_malloc_fails_without_killing_the_target() {
    require_spdk_rpc!();
    let mut t = Target::start("hugemalloc", &[]);
    let mut c = t.client();
    // 4 PiB: no machine has it; must be an error reply, not an abort.
    let e = c
        .call(
            "bdev_malloc_create",
            Some(json!({"name": "Huge", "num_blocks": 1u64 << 40, "block_size": 4096})),
        )
        .unwrap_err();
    assert_eq!(e.code, -12, "{e:?}");
    assert!(t.alive(), "target died:\n{}", t.log());
    t.rpc_ok(&["spdk_get_version"]);
    t.stop();
}
