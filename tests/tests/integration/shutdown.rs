//! Clean shutdown: SIGTERM, SIGINT and `spdk_kill_instance` all end with
//! exit status 0 and remove the socket and its `.lock` file.

use crate::harness::{Target, EXIT_TIMEOUT};

fn with_bdevs(tag: &str) -> Target {
    let t = Target::start(tag, &[]);
    t.rpc_ok(&["bdev_malloc_create", "-b", "M0", "4", "512"]);
    t.rpc_ok(&["bdev_null_create", "N0", "4", "512"]);
    t
}

#[test]
fn sigterm_exits_cleanly() {
    require_spdk_rpc!();
    with_bdevs("sigterm").stop_with(libc::SIGTERM);
}

#[test]
fn sigint_exits_cleanly() {
    require_spdk_rpc!();
    with_bdevs("sigint").stop_with(libc::SIGINT);
}

#[test]
fn spdk_kill_instance_sigterm_exits_cleanly() {
    require_spdk_rpc!();
    let mut t = with_bdevs("killterm");
    // rpc.py tolerates the connection closing under it for this method.
    t.rpc_ok(&["spdk_kill_instance", "SIGTERM"]);
    let st = t.wait_exit(EXIT_TIMEOUT);
    t.assert_clean_exit(st);
}

#[test]
fn spdk_kill_instance_sigint_exits_cleanly() {
    require_spdk_rpc!();
    let mut t = with_bdevs("killint");
    t.rpc_ok(&["spdk_kill_instance", "SIGINT"]);
    let st = t.wait_exit(EXIT_TIMEOUT);
    t.assert_clean_exit(st);
}

#[test]
fn sigterm_during_wait_for_rpc_exits_cleanly() {
    require_spdk_rpc!();
    Target::start("termwait", &["--wait-for-rpc"]).stop();
}

#[test]
fn second_instance_on_the_same_socket_is_refused() {
    require_spdk_rpc!();
    let t = Target::start("twice", &[]);
    let mut second = Target::spawn_at(Target::new_dir("twice2"), t.sock.clone(), &[]);
    let st = second.wait_exit(EXIT_TIMEOUT);
    assert_ne!(
        st.code(),
        Some(0),
        "second instance must fail: {}",
        second.log()
    );
    assert!(
        second.log().contains("in use"),
        "should say the socket is in use:\n{}",
        second.log()
    );
    // The first one is unaffected.
    t.rpc_ok(&["spdk_get_version"]);
    t.stop();
}

/// A signal that lands while a (long) `--json` config is being replayed must
/// still end in a clean exit, not the default "terminate" with the socket
/// and lock left behind.
#[test]
fn sigterm_during_config_replay_exits_cleanly() {
    let dir = Target::new_dir("termreplay");
    let entries: Vec<serde_json::Value> = (0..20_000)
        .map(|i| {
            serde_json::json!({"method": "bdev_null_create",
                "params": {"name": format!("N{i}"), "num_blocks": 8, "block_size": 512}})
        })
        .collect();
    let cfg = dir.join("big.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": entries}]}).to_string(),
    )
    .expect("write config");
    let mut t = Target::spawn_in(dir, &["--json", cfg.to_str().expect("utf-8")]);
    // Wait until the replay has begun (bounded), then signal.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !t.log().contains("registered bdev") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    crate::harness::signal(t.pid(), libc::SIGTERM);
    let st = t.wait_exit(EXIT_TIMEOUT);
    t.assert_clean_exit(st);
}
