//! Config files (`--json` / `-c`, JSON and YAML), `save_config`, and the
//! `--wait-for-rpc` start-up state machine.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{bdev_names, Target, EXIT_TIMEOUT};

/// What must survive a save/restore: names, UUIDs and geometry.
fn identity(bdevs: &Value) -> Vec<Value> {
    bdevs
        .as_array()
        .expect("array")
        .iter()
        .map(|b| {
            json!({
                "name": b["name"],
                "uuid": b["uuid"],
                "block_size": b["block_size"],
                "num_blocks": b["num_blocks"],
                "product_name": b["product_name"],
            })
        })
        .collect()
}

fn yaml_scalar(v: &Value) -> String {
    match v {
        // A JSON string literal is a valid double-quoted YAML scalar.
        Value::String(_) | Value::Null | Value::Bool(_) | Value::Number(_) => v.to_string(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        _ => unreachable!("not a scalar"),
    }
}

fn is_scalar(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => true,
    }
}

fn yaml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

/// Block-style YAML for a JSON value (written by hand on purpose: the
/// target's YAML loader must accept what a person would type).
pub fn to_yaml(v: &Value) -> String {
    fn go(v: &Value, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match v {
            Value::Object(o) if !o.is_empty() => {
                for (k, x) in o {
                    if is_scalar(x) {
                        out.push_str(&format!("{pad}{}: {}\n", yaml_key(k), yaml_scalar(x)));
                    } else {
                        out.push_str(&format!("{pad}{}:\n", yaml_key(k)));
                        go(x, indent + 2, out);
                    }
                }
            }
            Value::Array(a) if !a.is_empty() => {
                for x in a {
                    if is_scalar(x) {
                        out.push_str(&format!("{pad}- {}\n", yaml_scalar(x)));
                    } else {
                        out.push_str(&format!("{pad}-\n"));
                        go(x, indent + 2, out);
                    }
                }
            }
            scalar => out.push_str(&format!("{pad}{}\n", yaml_scalar(scalar))),
        }
    }
    let mut out = String::from("# writecache_tgt config (YAML form of save_config output)\n");
    go(v, 0, &mut out);
    out
}

#[test]
fn save_config_restores_via_json_and_yaml() {
    require_spdk_rpc!();
    let t = Target::start("savecfg", &[]);
    t.rpc_ok(&["bdev_malloc_create", "-b", "M0", "16", "512"]);
    t.rpc_ok(&[
        "bdev_malloc_create",
        "-b",
        "M1",
        "-u",
        "a5a1c0de-1111-4222-8333-444455556666",
        "4",
        "4096",
    ]);
    t.rpc_ok(&["bdev_null_create", "N0", "8", "4096"]);
    let before = t.rpc_json(&["bdev_get_bdevs"]);
    assert_eq!(bdev_names(&before), ["M0", "M1", "N0"]);
    assert_eq!(before[1]["uuid"], "a5a1c0de-1111-4222-8333-444455556666");

    let saved_text = t.rpc_ok(&["save_config"]);
    let saved: Value = serde_json::from_str(&saved_text).expect("save_config prints JSON");
    let subsystems = saved["subsystems"].as_array().expect("subsystems");
    let bdev = subsystems
        .iter()
        .find(|s| s["subsystem"] == "bdev")
        .expect("bdev subsystem saved");
    let methods: Vec<&str> = bdev["config"]
        .as_array()
        .expect("bdev config")
        .iter()
        .map(|e| e["method"].as_str().expect("method"))
        .collect();
    assert_eq!(
        methods.last(),
        Some(&"bdev_wait_for_examine"),
        "SPDK always ends the bdev config with bdev_wait_for_examine: {methods:?}"
    );
    let json_path = t.dir.join("saved.json");
    std::fs::write(&json_path, &saved_text).expect("write saved.json");
    let yaml_path = t.dir.join("saved.yaml");
    std::fs::write(&yaml_path, to_yaml(&saved)).expect("write saved.yaml");
    let mut keep = t;
    keep.keep_dir();
    let dir = keep.dir.clone();
    keep.stop();

    // Restart from the JSON file.
    let t = Target::start("fromjson", &["--json", json_path.to_str().expect("utf-8")]);
    let after = t.rpc_json(&["bdev_get_bdevs"]);
    assert_eq!(identity(&after), identity(&before));
    // And saving again gives the same config (a fixed point).
    let again: Value = serde_json::from_str(&t.rpc_ok(&["save_config"])).expect("JSON");
    assert_eq!(again, saved);
    t.stop();

    // The same config as YAML, with -c.
    let t = Target::start("fromyaml", &["-c", yaml_path.to_str().expect("utf-8")]);
    let after = t.rpc_json(&["bdev_get_bdevs"]);
    assert_eq!(identity(&after), identity(&before));
    t.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn yaml_writer_round_trips_through_the_target_format() {
    // A self-check of to_yaml (no target needed): nested shapes survive.
    let v = json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_malloc_create", "params": {"name": "M 0:x", "num_blocks": 8, "flag": false}},
        {"method": "bdev_wait_for_examine"}
    ]}, {"subsystem": "accel", "config": null}, {"subsystem": "iobuf", "config": []}]});
    let y = to_yaml(&v);
    assert!(y.contains("- method: ") || y.contains("-\n"), "{y}");
    assert!(y.contains("name: \"M 0:x\""), "{y}");
}

#[test]
fn wait_for_rpc_state_machine() {
    require_spdk_rpc!();
    let t = Target::start("waitrpc", &["--wait-for-rpc"]);
    // RUNTIME methods are refused with SPDK's -1 state error.
    let err = t.rpc_err(&["bdev_malloc_create", "-b", "M0", "16", "512"]);
    assert!(err.contains("\"code\": -1"), "{err}");
    assert!(
        err.contains("Method may only be called after framework is initialized"),
        "{err}"
    );
    // STARTUP methods and the both-state ones work.
    t.rpc_ok(&["bdev_set_options", "-p", "1024", "-c", "64"]);
    t.rpc_ok(&["spdk_get_version"]);
    let current = t.rpc_json(&["rpc_get_methods", "--current"]);
    assert!(
        current
            .as_array()
            .expect("array")
            .contains(&json!("framework_start_init")),
        "{current}"
    );

    // framework_wait_init blocks until init is done.
    let mut waiter = t.client();
    waiter
        .send_raw(br#"{"jsonrpc":"2.0","method":"framework_wait_init","id":7}"#)
        .expect("send");
    std::thread::sleep(Duration::from_millis(200));

    let mut c = t.client();
    assert_eq!(c.call("framework_start_init", None), Ok(json!(true)));
    let reply = waiter.read_value().expect("framework_wait_init reply");
    assert_eq!(reply["id"], 7, "{reply}");
    assert_eq!(reply["result"], true, "{reply}");

    assert_eq!(
        t.rpc_ok(&["bdev_malloc_create", "-b", "M0", "16", "512"])
            .trim(),
        "M0"
    );
    // Now STARTUP-only methods are refused, with the other message.
    let err = t.rpc_err(&["framework_start_init"]);
    assert!(err.contains("\"code\": -1"), "{err}");
    assert!(
        err.contains("Method may only be called before framework is initialized"),
        "{err}"
    );
    t.stop();
}

fn write_config(dir: &std::path::Path, name: &str, entries: &[Value]) -> String {
    let cfg = json!({"subsystems": [{"subsystem": "bdev", "config": entries}]});
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).expect("write config");
    p.to_str().expect("utf-8").to_string()
}

#[test]
fn wait_for_rpc_applies_json_config_at_start_init() {
    require_spdk_rpc!();
    let dir = Target::new_dir("waitjson");
    let cfg = write_config(
        &dir,
        "cfg.json",
        &[
            json!({"method": "bdev_set_options", "params": {"bdev_io_pool_size": 1024, "bdev_io_cache_size": 64}}),
            json!({"method": "bdev_malloc_create", "params": {
                "name": "Mcfg", "num_blocks": 2048, "block_size": 512,
                "uuid": "0b0e5ba3-aaaa-4bbb-8ccc-0123456789ab"}}),
            json!({"method": "bdev_null_create", "params": {"name": "Ncfg", "num_blocks": 64, "block_size": 4096}}),
            json!({"method": "bdev_wait_for_examine"}),
        ],
    );
    let mut t = Target::spawn_in(dir, &["--wait-for-rpc", "--json", &cfg]);
    t.wait_ready();
    // Nothing RUNTIME has run yet.
    let err = t.rpc_err(&["bdev_get_bdevs"]);
    assert!(err.contains("\"code\": -1"), "{err}");

    let mut c = t.client();
    assert_eq!(c.call("framework_start_init", None), Ok(json!(true)));
    let bdevs = t.rpc_json(&["bdev_get_bdevs"]);
    assert_eq!(bdev_names(&bdevs), ["Mcfg", "Ncfg"]);
    assert_eq!(bdevs[0]["uuid"], "0b0e5ba3-aaaa-4bbb-8ccc-0123456789ab");
    assert_eq!(bdevs[0]["num_blocks"], 2048);
    t.stop();
}

#[test]
fn missing_config_file_exits_1() {
    let dir = Target::new_dir("nocfg");
    let missing = dir.join("does-not-exist.json");
    let mut t = Target::spawn_in(dir, &["--json", missing.to_str().expect("utf-8")]);
    let st = t.wait_exit(EXIT_TIMEOUT);
    assert_eq!(st.code(), Some(1), "{st}\n{}", t.log());
    let log = t.log();
    assert!(log.contains("Read JSON configuration file"), "{log}");
    assert!(log.contains("does-not-exist.json"), "{log}");
    assert!(!t.sock.exists(), "socket left behind");
    assert!(!t.lock_path().exists(), "lock file left behind");
}

#[test]
fn failing_config_entry_stops_the_target() {
    let dir = Target::new_dir("badcfg");
    let cfg = write_config(
        &dir,
        "bad.json",
        &[
            json!({"method": "bdev_set_options", "params": {"bdev_io_pool_size": 1024}}),
            json!({"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 64, "block_size": 512}}),
            json!({"method": "bdev_malloc_create", "params": {"name": "M1", "num_blocks": 64, "block_size": 512}}),
            json!({"method": "bdev_null_create", "params": {"name": "N0", "num_blocks": 64, "block_size": 512}}),
            // 5th entry: duplicate name -> -17.
            json!({"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 64, "block_size": 512}}),
            json!({"method": "bdev_null_create", "params": {"name": "N1", "num_blocks": 64, "block_size": 512}}),
        ],
    );
    let mut t = Target::spawn_in(dir, &["--json", &cfg]);
    let st = t.wait_exit(EXIT_TIMEOUT);
    let log = t.log();
    assert_ne!(
        st.code(),
        Some(0),
        "a failing config must fail start-up: {st}\n{log}"
    );
    assert!(
        st.code().is_some(),
        "exited by a signal ({st}), not an error path:\n{log}"
    );
    assert!(
        log.contains("entry 5"),
        "log should name the failing entry:\n{log}"
    );
    assert!(log.contains("bdev_malloc_create"), "{log}");
    assert!(log.contains("-17"), "{log}");
    assert!(!t.sock.exists(), "socket left behind after failed start-up");
    assert!(
        !t.lock_path().exists(),
        "lock file left behind after failed start-up"
    );
}

#[test]
fn failing_config_entry_is_skipped_with_ignore_init_errors() {
    require_spdk_rpc!();
    let dir = Target::new_dir("ignorecfg");
    let cfg = write_config(
        &dir,
        "bad.json",
        &[
            json!({"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 64, "block_size": 512}}),
            json!({"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 64, "block_size": 512}}),
            json!({"method": "bdev_null_create", "params": {"name": "N1", "num_blocks": 64, "block_size": 512}}),
        ],
    );
    let mut t = Target::spawn_in(dir, &["--json", &cfg, "--json-ignore-init-errors"]);
    t.wait_ready();
    assert_eq!(bdev_names(&t.rpc_json(&["bdev_get_bdevs"])), ["M0", "N1"]);
    t.stop();
}

#[test]
fn unknown_method_in_config_exits_1() {
    let dir = Target::new_dir("unkcfg");
    let cfg = write_config(
        &dir,
        "unk.json",
        &[
            json!({"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 8, "block_size": 512}}),
            json!({"method": "bdev_no_such_method"}),
        ],
    );
    let mut t = Target::spawn_in(dir, &["-c", &cfg]);
    let st = t.wait_exit(EXIT_TIMEOUT);
    let log = t.log();
    assert_eq!(st.code(), Some(1), "{st}\n{log}");
    assert!(
        log.contains("Method 'bdev_no_such_method' was not found"),
        "{log}"
    );
    assert!(
        !t.sock.exists() && !t.lock_path().exists(),
        "files left behind"
    );
}

/// SPDK stops the app with a non-zero status when `framework_start_init`
/// fails (here: the RUNTIME pass of the `--json` config hits -17).
#[test]
fn failed_framework_start_init_exits_nonzero() {
    require_spdk_rpc!();
    let dir = Target::new_dir("failinit");
    let cfg = write_config(
        &dir,
        "dup.json",
        &[
            json!({"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 8, "block_size": 512}}),
            json!({"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 8, "block_size": 512}}),
        ],
    );
    let mut t = Target::spawn_in(dir, &["--wait-for-rpc", "--json", &cfg]);
    t.wait_ready();
    let err = t.rpc_err(&["framework_start_init"]);
    assert!(err.contains("-32603"), "{err}");
    assert!(err.contains("framework_initialization failed"), "{err}");
    let st = t.wait_exit(EXIT_TIMEOUT);
    let log = t.log();
    assert_eq!(
        st.code(),
        Some(1),
        "failed init must give a non-zero exit: {st}\n{log}"
    );
    assert!(log.contains("entry 2"), "{log}");
    assert!(
        !t.sock.exists() && !t.lock_path().exists(),
        "files left behind"
    );
}

/// rpc.py's client-side loaders: `load_config` drives a `--wait-for-rpc`
/// target through framework_start_init; `load_subsystem_config` adds to a
/// running one; `save_subsystem_config` prints one subsystem.
#[test]
fn client_side_load_config_and_load_subsystem_config() {
    require_spdk_rpc!();
    let t = Target::start("loadcfg", &["--wait-for-rpc"]);
    let cfg = write_config(
        &t.dir,
        "a.json",
        &[
            json!({"method": "bdev_set_options", "params": {"bdev_io_pool_size": 2048}}),
            json!({"method": "bdev_malloc_create", "params": {"name": "A0", "num_blocks": 8, "block_size": 512}}),
            json!({"method": "bdev_wait_for_examine"}),
        ],
    );
    t.rpc_ok(&["load_config", "-j", &cfg]);
    // load_config called framework_start_init: RUNTIME methods work now.
    assert_eq!(bdev_names(&t.rpc_json(&["bdev_get_bdevs"])), ["A0"]);

    let sub = t.dir.join("b.json");
    std::fs::write(
        &sub,
        json!({"subsystem": "bdev", "config": [
            {"method": "bdev_null_create", "params": {"name": "B0", "num_blocks": 8, "block_size": 512}}
        ]})
        .to_string(),
    )
    .expect("write");
    t.rpc_ok(&["load_subsystem_config", "-j", sub.to_str().expect("utf-8")]);
    assert_eq!(bdev_names(&t.rpc_json(&["bdev_get_bdevs"])), ["A0", "B0"]);

    let one = t.rpc_json(&["save_subsystem_config", "-n", "bdev"]);
    assert_eq!(one["subsystem"], "bdev", "{one}");
    let created: Vec<&str> = one["config"]
        .as_array()
        .expect("config")
        .iter()
        .filter_map(|e| e["params"]["name"].as_str())
        .collect();
    assert_eq!(created, ["A0", "B0"], "{one}");
    let err = t.rpc_err(&["save_subsystem_config", "-n", "nosuch"]);
    assert!(err.contains("-32602") && err.contains("nosuch"), "{err}");
    t.stop();
}
