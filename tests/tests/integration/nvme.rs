//! The NVMe/TCP initiator (`bdev_nvme_*`, issue 15) across two
//! `writecache_tgt` processes: one exports the origin over NVMe/TCP
//! (`nvmf_*`), the other attaches it with `bdev_nvme_attach_controller`
//! and caches it with a writecache. Driven by the stock `spdk-rpc`; data
//! goes in and out with `qemu-io` over the cache target's NBD export.
//!
//! * `nvme_rpcs_errors_and_config_restore`: every method and its errors,
//!   SPDK's result shapes, digests, `save_config` and `--json` restore.
//! * `nvme_writecache_over_remote_origin_survives_origin_loss`: the
//!   origin's target is killed while the cache target keeps taking writes;
//!   with `fast_io_fail_timeout_sec` the writeback's I/O fails meanwhile
//!   and retries within `writeback_retry_ms` without entering the error
//!   state; after the origin comes back (from its saved config) the
//!   controller reconnects, the writeback drains and the origin holds
//!   every write.
//! * `nvme_set_options_and_reset_controller`: SPDK's option names and
//!   rules, the defaults reaching an attach, EPERM once a controller
//!   exists, the options first in `save_config` and restored by `--json`;
//!   resets under I/O with the data intact.
//! * `nvme_in_process_loopback_with_writecache`: one target exports a bdev
//!   and attaches its own export (reactors shared), a writecache on top:
//!   write, flush, read back, the data on the exported bdev; a namespace
//!   added and removed on the target comes and goes as a bdev; detach,
//!   delete.

use std::fs::File;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{signal, unique_dir, Target};
use crate::nvme_common::*;

const NQN: &str = "nqn.2016-06.io.spdk:origin";

/// An origin target: a uring bdev over `<dir>/origin.img` (32 MiB, 4 KiB
/// blocks) exported as NQN on 127.0.0.1:`port`.
fn origin_target(tag: &str, dir: &Path, port: u16) -> Target {
    let img = dir.join("origin.img");
    if !img.exists() {
        File::create(&img)
            .and_then(|f| f.set_len(32 * MIB))
            .expect("origin file");
    }
    let t = Target::start(tag, &[]);
    ok(
        &t,
        &[
            "bdev_uring_create",
            img.to_str().unwrap(),
            "Origin0",
            "4096",
        ],
    );
    export_over_tcp(&t, "Origin0", NQN, port, true);
    t
}

fn attach_nv0(port: &str, extra: &[&str]) -> Vec<String> {
    attach_args("Nv0", port, NQN, extra)
}

#[test]
fn nvme_rpcs_errors_and_config_restore() {
    require_spdk_rpc!();
    let data = unique_dir("nvme-rpc-data");
    let port = free_port();
    let ps = port.to_string();
    let a = origin_target("nvme-rpc-origin", &data, port);
    let b = Target::start("nvme-rpc-host", &[]);

    // pcie: the precise pointer to bdev_uring_create.
    let (code, msg) = err(
        &b,
        &[
            "bdev_nvme_attach_controller",
            "-b",
            "P0",
            "-t",
            "pcie",
            "-a",
            "0000:01:00.0",
        ],
    );
    assert_eq!(code, -95, "{msg}");
    assert!(msg.contains("bdev_uring_create"), "{msg}");
    // SPDK's timer rules.
    let (code, msg) = err(&b, &strs(&attach_nv0(&ps, &["-l", "0", "-o", "1"])));
    assert_eq!(code, -22, "{msg}");
    assert!(msg.contains("reconnect_delay_sec"), "{msg}");
    // Nothing listens there.
    let (code, _) = err(&b, &strs(&attach_nv0(&free_port().to_string(), &[])));
    assert_eq!(code, -111);
    let (code, _) = err(&b, &["bdev_nvme_detach_controller", "Nope"]);
    assert_eq!(code, -19);

    // With both digests, through the stock CLI.
    let names = ok(
        &b,
        &strs(&attach_nv0(&ps, &["-e", "-d", "-l", "-1", "-o", "2"])),
    );
    assert_eq!(names, "Nv0n1");
    let (code, _) = err(&b, &strs(&attach_nv0(&ps, &[])));
    assert_eq!(code, -17, "a second controller named Nv0");
    let c = okj(&b, &["bdev_nvme_get_controllers"]);
    assert_eq!(c[0]["name"], "Nv0");
    let ctrlr = &c[0]["ctrlrs"][0];
    assert_eq!(ctrlr["state"], "enabled");
    assert_eq!(ctrlr["trid"]["trtype"], "TCP");
    assert_eq!(ctrlr["trid"]["adrfam"], "IPv4");
    assert_eq!(ctrlr["trid"]["trsvcid"], ps.as_str());
    assert_eq!(ctrlr["trid"]["subnqn"], NQN);
    let bdev = &b.rpc_json(&["bdev_get_bdevs", "-b", "Nv0n1"])[0];
    assert_eq!(bdev["block_size"], 4096);
    assert_eq!(bdev["num_blocks"], 32 * MIB / 4096);
    assert_eq!(bdev["product_name"], "NVMe disk");
    assert_eq!(
        bdev["driver_specific"]["nvme"][0]["ctrlr_data"]["serial_number"],
        "SPDK0001"
    );
    // The origin target sees one controller from us.
    let hosts = a.rpc_json(&["nvmf_subsystem_get_controllers", NQN]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");

    // save_config → a new host target restores the controller from --json.
    let cfg = bdev_config(&b);
    let attach: Vec<&Value> = cfg
        .iter()
        .filter(|e| e["method"] == "bdev_nvme_attach_controller")
        .collect();
    assert_eq!(attach.len(), 1, "{cfg:?}");
    let p = &attach[0]["params"];
    assert_eq!(p["hdgst"], true);
    assert_eq!(p["ddgst"], true);
    assert_eq!(p["ctrlr_loss_timeout_sec"], -1);
    assert_eq!(p["reconnect_delay_sec"], 2);
    let saved = b.rpc_ok(&["save_config"]);
    let dir = Target::new_dir("nvme-rpc-restore");
    std::fs::write(dir.join("config.json"), saved).expect("write config");
    // (The CLI prints nothing for this method.)
    ok(&b, &["bdev_nvme_detach_controller", "Nv0"]);
    assert!(b
        .rpc_json(&["bdev_get_bdevs"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        okj(&b, &["bdev_nvme_get_controllers"]),
        Value::Array(vec![])
    );
    b.stop();
    let cfg_path = dir.join("config.json");
    let mut c = Target::spawn_in(dir.clone(), &["--json", cfg_path.to_str().unwrap()]);
    c.wait_ready();
    assert_eq!(ctrlr_state(&c, "Nv0"), "enabled");
    assert_eq!(
        c.rpc_json(&["bdev_get_bdevs", "-b", "Nv0n1"])[0]["num_blocks"],
        8192
    );
    c.stop();
    a.stop();
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn nvme_writecache_over_remote_origin_survives_origin_loss() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = unique_dir("nvme-wc-data");
    let origin_img = data.join("origin.img");
    let port = free_port();
    let ps = port.to_string();
    let a = origin_target("nvme-wc-origin", &data, port);
    let a_cfg = data.join("origin.json");
    std::fs::write(&a_cfg, a.rpc_ok(&["save_config"])).expect("origin config");

    let b = Target::start("nvme-wc-host", &[]);
    // Reconnect every second for ever; queued I/O fails after 2 s
    // (fast_io_fail_timeout_sec), so the writecache's writeback sees
    // errors for as long as the origin is away and must keep retrying
    // (writeback_retry_ms) instead of giving up.
    assert_eq!(
        ok(
            &b,
            &strs(&attach_nv0(&ps, &["-l", "-1", "-o", "1", "-u", "2"]))
        ),
        "Nv0n1"
    );
    let cache = data.join("cache.img");
    ok(
        &b,
        &[
            "bdev_pmem_create",
            cache.to_str().unwrap(),
            "-n",
            "Cache0",
            "--size-mb",
            "16",
        ],
    );
    ok(
        &b,
        &[
            "bdev_writecache_create",
            "wc0",
            "-o",
            "Nv0n1",
            "-c",
            "Cache0",
            "--max-age-ms",
            "100",
            "--writeback-retry-ms",
            "60000",
        ],
    );
    let uri = nbd_export(&b, &data, "wc0");

    // Before the outage: written back to the remote origin.
    let before = [(0x11, 0, 256 * KIB), (0x22, 5 * MIB, 64 * KIB)];
    qio_ok(&b, &uri, &writes(&before));
    wait_until(Duration::from_secs(20), "writeback to the origin", || {
        wc_stat(&b, "wc0", "dirty") == 0
    });
    assert!(file_holds(&origin_img, &before));

    // The origin's target dies.
    signal(a.pid(), libc::SIGKILL);
    drop(a);
    let during = [(0x33, 8 * MIB, 512 * KIB), (0x44, MIB, 16 * KIB)];
    let t0 = Instant::now();
    qio_ok(&b, &uri, &writes(&during));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "writes must land in the cache while the origin is away"
    );
    wait_until(Duration::from_secs(10), "the controller to notice", || {
        ctrlr_state(&b, "Nv0") != "enabled"
    });
    // Past fast_io_fail_timeout_sec the writeback's I/O fails: it retries
    // within its window, the instance stays out of the error state.
    wait_until(Duration::from_secs(15), "failed writebacks", || {
        wc_stat(&b, "wc0", "writeback_retries") > 0
    });
    thread::sleep(Duration::from_millis(3000));
    assert!(
        wc_stat(&b, "wc0", "dirty") > 0,
        "nothing can be written back yet"
    );
    assert_eq!(
        wc_stat(&b, "wc0", "error"),
        0,
        "the writecache must not give up"
    );
    // Writes keep landing in the cache meanwhile.
    let late = [(0x55, 12 * MIB, 64 * KIB)];
    qio_ok(&b, &uri, &writes(&late));
    // Reads of cached data are served meanwhile.
    qio_ok(&b, &uri, &reads(&during));

    // The origin comes back from its saved config: the controller
    // reconnects and the writeback drains.
    let a2 = Target::start("nvme-wc-origin2", &["--json", a_cfg.to_str().unwrap()]);
    wait_until(Duration::from_secs(20), "reconnect", || {
        ctrlr_state(&b, "Nv0") == "enabled"
    });
    wait_until(Duration::from_secs(30), "writeback after reconnect", || {
        wc_stat(&b, "wc0", "dirty") == 0
    });
    assert_eq!(wc_stat(&b, "wc0", "error"), 0);
    qio_ok(&b, &uri, &reads(&before));
    qio_ok(&b, &uri, &reads(&during));
    qio_ok(&b, &uri, &reads(&late));
    // The attach is saved before the writecache that stacks on it, the
    // retry window with the writecache.
    let cfg = bdev_config(&b);
    let pos = |m: &str| cfg.iter().position(|e| e["method"] == m);
    assert!(
        pos("bdev_nvme_attach_controller") < pos("bdev_writecache_create"),
        "{cfg:?}"
    );
    let wc = &cfg[pos("bdev_writecache_create").unwrap()];
    assert_eq!(wc["params"]["writeback_retry_ms"], 60000, "{wc}");
    b.stop();
    a2.stop();
    assert!(
        file_holds(&origin_img, &before),
        "origin lost pre-outage data"
    );
    assert!(
        file_holds(&origin_img, &during) && file_holds(&origin_img, &late),
        "origin lost data written during the outage"
    );
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn nvme_set_options_and_reset_controller() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = unique_dir("nvme-opts-data");
    let port = free_port();
    let ps = port.to_string();
    let a = origin_target("nvme-opts-origin", &data, port);
    let b = Target::start("nvme-opts-host", &[]);

    // SPDK's names through the stock CLI; its rules; unknown names refused.
    let (code, msg) = err(&b, &["bdev_nvme_set_options", "-l", "0", "-o", "1"]);
    assert_eq!(code, -22, "{msg}");
    assert!(msg.contains("reconnect_delay_sec"), "{msg}");
    let mut c = b.client();
    let e = c
        .call(
            "bdev_nvme_set_options",
            Some(serde_json::json!({"no_such_option": 1})),
        )
        .expect_err("an unknown option");
    assert!(format!("{e:?}").contains("no_such_option"), "{e:?}");
    // (The CLI prints nothing for these two methods.)
    ok(
        &b,
        &[
            "bdev_nvme_set_options",
            "-l",
            "-1",
            "-o",
            "1",
            "-u",
            "3",
            "-k",
            "5000",
            "-t",
            "20000000",
            "-c",
            "6",
        ],
    );
    // An attach without timers takes them.
    assert_eq!(ok(&b, &strs(&attach_nv0(&ps, &[]))), "Nv0n1");
    let (code, msg) = err(&b, &["bdev_nvme_set_options", "-k", "1000"]);
    assert_eq!(code, -1, "{msg}");
    assert_eq!(
        msg, "RPC not permitted with nvme controllers already attached",
        "SPDK's words"
    );
    let cfg = bdev_config(&b);
    let methods: Vec<&str> = cfg.iter().filter_map(|e| e["method"].as_str()).collect();
    assert_eq!(
        &methods[..3],
        [
            "bdev_set_options",
            "bdev_nvme_set_options",
            "bdev_nvme_attach_controller"
        ],
        "{cfg:?}"
    );
    let o = &cfg[1]["params"];
    assert_eq!(o["keep_alive_timeout_ms"], 5000);
    assert_eq!(o["timeout_us"], 20_000_000);
    assert_eq!(o["transport_retry_count"], 6);
    assert_eq!(o["ctrlr_loss_timeout_sec"], -1);
    let p = &cfg[2]["params"];
    assert_eq!(
        (
            &p["ctrlr_loss_timeout_sec"],
            &p["reconnect_delay_sec"],
            &p["fast_io_fail_timeout_sec"]
        ),
        (&(-1).into(), &1.into(), &3.into()),
        "{p}"
    );

    // Reset: unknown names and controller IDs are ENODEV; a reset under
    // I/O disconnects and reconnects every queue pair, nothing is lost.
    assert_eq!(err(&b, &["bdev_nvme_reset_controller", "Nope"]).0, -19);
    assert_eq!(
        err(&b, &["bdev_nvme_reset_controller", "Nv0", "-c", "999"]).0,
        -19
    );
    let uri = nbd_export(&b, &data, "Nv0n1");
    let regions: Vec<(u8, u64, u64)> = (0..24u64)
        .map(|i| (0x10 + i as u8, i * 256 * KIB, 128 * KIB))
        .collect();
    let before = a.rpc_json(&["nvmf_subsystem_get_qpairs", NQN]);
    let io = {
        let uri = uri.clone();
        let regions = regions.clone();
        thread::spawn(move || qio(&uri, &writes(&regions)))
    };
    for _ in 0..3 {
        ok(&b, &["bdev_nvme_reset_controller", "Nv0"]);
        assert_eq!(ctrlr_state(&b, "Nv0"), "enabled");
    }
    let out = io.join().expect("qemu-io thread");
    assert!(
        out.code == 0 && !out.all().contains("failed"),
        "writes across resets: {out:?}\n{}",
        b.log()
    );
    qio_ok(&b, &uri, &reads(&regions));
    assert!(file_holds(&data.join("origin.img"), &regions));
    let after = a.rpc_json(&["nvmf_subsystem_get_qpairs", NQN]);
    assert_ne!(before, after, "the queue pairs are new connections");

    // Restored from save_config: the options come first, then the attach.
    let dir = Target::new_dir("nvme-opts-restore");
    std::fs::write(dir.join("config.json"), b.rpc_ok(&["save_config"])).expect("config");
    b.stop();
    let cfg_path = dir.join("config.json");
    let mut r = Target::spawn_in(dir.clone(), &["--json", cfg_path.to_str().unwrap()]);
    r.wait_ready();
    assert_eq!(ctrlr_state(&r, "Nv0"), "enabled");
    let cfg = bdev_config(&r);
    assert_eq!(cfg[1]["params"]["keep_alive_timeout_ms"], 5000, "{cfg:?}");
    r.stop();
    a.stop();
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn nvme_in_process_loopback_with_writecache() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = unique_dir("nvme-loop-data");
    let port = free_port();
    let ps = port.to_string();
    let t = Target::start("nvme-loop", &[]);
    ok(&t, &["bdev_malloc_create", "-b", "Local0", "32", "4096"]);
    export_over_tcp(&t, "Local0", NQN, port, true);
    // The same process attaches its own export: its reactors run both
    // ends of the connection.
    assert_eq!(
        ok(&t, &strs(&attach_args("Loop0", &ps, NQN, &["-e", "-d"]))),
        "Loop0n1"
    );
    let cache = data.join("cache.img");
    ok(
        &t,
        &[
            "bdev_pmem_create",
            cache.to_str().unwrap(),
            "-n",
            "Cache0",
            "--size-mb",
            "8",
        ],
    );
    ok(
        &t,
        &[
            "bdev_writecache_create",
            "wc0",
            "-o",
            "Loop0n1",
            "-c",
            "Cache0",
        ],
    );
    let uri = nbd_export(&t, &data, "wc0");
    let regions = [
        (0xa1, 0, 64 * KIB),
        (0xb2, 3 * MIB, 512 * KIB),
        (0xc3, 31 * MIB, MIB),
    ];
    qio_ok(&t, &uri, &writes(&regions));
    qio_ok(&t, &uri, &reads(&regions));
    // Written back through the loopback connection: the exported bdev
    // holds it.
    ok(&t, &["bdev_writecache_flush", "wc0"]);
    assert_eq!(wc_stat(&t, "wc0", "dirty"), 0);
    ok(&t, &["nbd_export_create", "Local0", "local"]);
    let local = uri.replace("/wc0?", "/local?");
    qio_ok(&t, &local, &reads(&regions));
    // A namespace added on the target shows up as Loop0n2 (Namespace
    // Attribute Changed notice), and goes when it is removed.
    ok(&t, &["bdev_malloc_create", "-b", "Local1", "4", "512"]);
    ok(&t, &["nvmf_subsystem_add_ns", NQN, "Local1", "-n", "2"]);
    let has = |b: &str| t.rpc(&["bdev_get_bdevs", "-b", b]).code == 0;
    wait_until(Duration::from_secs(10), "Loop0n2", || has("Loop0n2"));
    let n2 = &t.rpc_json(&["bdev_get_bdevs", "-b", "Loop0n2"])[0];
    assert_eq!(
        (&n2["block_size"], &n2["num_blocks"]),
        (&512.into(), &8192.into())
    );
    ok(&t, &["nvmf_subsystem_remove_ns", NQN, "2"]);
    wait_until(Duration::from_secs(10), "Loop0n2 to go", || !has("Loop0n2"));
    assert!(has("Loop0n1") && has("wc0"));
    ok(&t, &["bdev_malloc_delete", "Local1"]);
    // Detach under the stack: the writecache goes first, then the
    // controller, the export, the bdev.
    ok(&t, &["bdev_writecache_delete", "wc0"]);
    ok(&t, &["bdev_nvme_detach_controller", "Loop0"]);
    assert_eq!(
        okj(&t, &["bdev_nvme_get_controllers"]),
        Value::Array(vec![])
    );
    assert_eq!(err(&t, &["bdev_get_bdevs", "-b", "Loop0n1"]).0, -19);
    ok(&t, &["nvmf_delete_subsystem", NQN]);
    ok(&t, &["nbd_export_delete", "local"]);
    ok(&t, &["bdev_malloc_delete", "Local0"]);
    t.stop();
    let _ = std::fs::remove_dir_all(&data);
}
