//! Stock bdev and framework RPCs through `spdk-rpc`.

use serde_json::Value;

use crate::harness::{bdev_names, Target};

/// The 22 I/O type names SPDK lists in `supported_io_types`, in enum order.
pub const IO_TYPES: [&str; 22] = [
    "read",
    "write",
    "unmap",
    "flush",
    "reset",
    "nvme_admin",
    "nvme_io",
    "nvme_io_md",
    "write_zeroes",
    "zcopy",
    "get_zone_info",
    "zone_management",
    "zone_append",
    "compare",
    "compare_and_write",
    "abort",
    "seek_hole",
    "seek_data",
    "copy",
    "nvme_iov_md",
    "nvme_nssr",
    "write_uncorrectable",
];

/// Every method this build of the target must offer.
pub const REQUIRED_METHODS: [&str; 18] = [
    "rpc_get_methods",
    "spdk_get_version",
    "framework_wait_init",
    "framework_start_init",
    "framework_get_reactors",
    "framework_get_subsystems",
    "framework_get_config",
    "thread_get_stats",
    "spdk_kill_instance",
    "bdev_get_bdevs",
    "bdev_get_iostat",
    "bdev_reset_iostat",
    "bdev_wait_for_examine",
    "bdev_set_options",
    "bdev_malloc_create",
    "bdev_malloc_delete",
    "bdev_null_create",
    "bdev_null_delete",
];

fn is_u64(v: &Value) -> bool {
    v.as_u64().is_some()
}

/// Checks one `bdev_get_bdevs` entry against SPDK's schema (§5.2).
pub fn check_bdev_schema(b: &Value) {
    let o = b
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {b}"));
    assert!(o["name"].is_string(), "name: {b}");
    let aliases = o["aliases"].as_array().expect("aliases is an array");
    assert!(aliases.iter().all(Value::is_string), "aliases: {b}");
    assert!(o["product_name"].is_string(), "product_name: {b}");
    assert!(is_u64(&o["block_size"]), "block_size: {b}");
    assert!(is_u64(&o["num_blocks"]), "num_blocks: {b}");
    let uuid = o["uuid"].as_str().expect("uuid is a string");
    assert_eq!(uuid.len(), 36, "uuid: {uuid}");
    assert_eq!(uuid.matches('-').count(), 4, "uuid: {uuid}");
    let limits = o["assigned_rate_limits"]
        .as_object()
        .expect("assigned_rate_limits is an object");
    for k in [
        "rw_ios_per_sec",
        "rw_mbytes_per_sec",
        "r_mbytes_per_sec",
        "w_mbytes_per_sec",
    ] {
        assert!(is_u64(&limits[k]), "assigned_rate_limits.{k}: {b}");
    }
    let claimed = o["claimed"].as_bool().expect("claimed is a bool");
    if claimed {
        assert!(o["claim_type"].is_string(), "claim_type: {b}");
    }
    let types = o["supported_io_types"]
        .as_object()
        .expect("supported_io_types is an object");
    for t in IO_TYPES {
        assert!(
            types.get(t).is_some_and(Value::is_boolean),
            "io type {t}: {b}"
        );
    }
    assert_eq!(types.len(), IO_TYPES.len(), "extra io types: {b}");
    assert!(o["driver_specific"].is_object(), "driver_specific: {b}");
    for k in [
        "preferred_write_alignment",
        "preferred_write_granularity",
        "optimal_write_size",
        "preferred_unmap_alignment",
        "preferred_unmap_granularity",
    ] {
        assert!(is_u64(&o[k]), "{k}: {b}");
    }
}

#[test]
fn malloc_and_null_create_get_delete() {
    require_spdk_rpc!();
    let t = Target::start("bdevs", &[]);

    assert_eq!(t.rpc_json(&["bdev_get_bdevs"]), serde_json::json!([]));
    assert_eq!(
        t.rpc_ok(&["bdev_malloc_create", "-b", "M0", "16", "512"])
            .trim(),
        "M0"
    );
    assert_eq!(
        t.rpc_ok(&["bdev_null_create", "N0", "8", "4096"]).trim(),
        "N0"
    );

    let all = t.rpc_json(&["bdev_get_bdevs"]);
    assert_eq!(bdev_names(&all), ["M0", "N0"]);
    for b in all.as_array().expect("array") {
        check_bdev_schema(b);
    }
    let m0 = &all[0];
    assert_eq!(m0["product_name"], "Malloc disk");
    assert_eq!(m0["block_size"], 512);
    assert_eq!(m0["num_blocks"], 16 * 1024 * 1024 / 512);
    assert_eq!(m0["claimed"], false);
    assert_eq!(m0["supported_io_types"]["read"], true);
    assert_eq!(m0["supported_io_types"]["write"], true);
    assert_eq!(m0["supported_io_types"]["nvme_admin"], false);
    let n0 = &all[1];
    assert_eq!(n0["block_size"], 4096);
    assert_eq!(n0["num_blocks"], 8 * 1024 * 1024 / 4096);
    assert_ne!(m0["uuid"], n0["uuid"]);

    // -b NAME filter.
    let one = t.rpc_json(&["bdev_get_bdevs", "-b", "N0"]);
    assert_eq!(bdev_names(&one), ["N0"]);
    assert_eq!(one[0], all[1]);

    // Unknown name: exit 1, -19 in the printed error.
    let err = t.rpc_err(&["bdev_get_bdevs", "-b", "nope"]);
    assert!(err.contains("-19"), "{err}");

    // Deletes print nothing and succeed; a second delete is -19.
    t.rpc_ok(&["bdev_malloc_delete", "M0"]);
    let err = t.rpc_err(&["bdev_malloc_delete", "M0"]);
    assert!(err.contains("-19"), "{err}");
    t.rpc_ok(&["bdev_null_delete", "N0"]);
    assert_eq!(t.rpc_json(&["bdev_get_bdevs"]), serde_json::json!([]));
    t.stop();
}

#[test]
fn framework_info_rpcs() {
    require_spdk_rpc!();
    let t = Target::start("info", &[]);
    t.rpc_ok(&["bdev_malloc_create", "-b", "M0", "1", "512"]);

    let io = t.rpc_json(&["bdev_get_iostat"]);
    assert!(
        is_u64(&io["tick_rate"]) && io["tick_rate"].as_u64() > Some(0),
        "{io}"
    );
    assert!(is_u64(&io["ticks"]), "{io}");
    let bdevs = io["bdevs"].as_array().expect("bdevs");
    assert_eq!(bdevs.len(), 1, "{io}");
    assert_eq!(bdevs[0]["name"], "M0");
    for k in [
        "bytes_read",
        "num_read_ops",
        "bytes_written",
        "num_write_ops",
        "bytes_unmapped",
        "num_unmap_ops",
        "read_latency_ticks",
        "write_latency_ticks",
    ] {
        assert!(is_u64(&bdevs[0][k]), "iostat.{k}: {io}");
    }
    let io = t.rpc_json(&["bdev_get_iostat", "--names", "M0"]);
    assert_eq!(io["bdevs"][0]["name"], "M0");
    let err = t.rpc_err(&["bdev_get_iostat", "--names", "nope"]);
    assert!(err.contains("-19"), "{err}");
    t.rpc_ok(&["bdev_reset_iostat", "-b", "M0"]);

    let r = t.rpc_json(&["framework_get_reactors"]);
    assert!(is_u64(&r["tick_rate"]), "{r}");
    assert_eq!(r["pid"].as_u64(), Some(u64::from(t.pid())), "{r}");
    let reactors = r["reactors"].as_array().expect("reactors");
    assert_eq!(reactors.len(), 1, "-m 0x1 has one reactor: {r}");
    assert_eq!(reactors[0]["lcore"], 0);
    assert!(reactors[0]["in_interrupt"].is_boolean(), "{r}");
    let lw = reactors[0]["lw_threads"].as_array().expect("lw_threads");
    assert_eq!(lw[0]["name"], "app_thread", "{r}");
    assert_eq!(
        lw[0]["cpumask"], "1",
        "SPDK prints the mask without 0x: {r}"
    );

    let s = t.rpc_json(&["thread_get_stats"]);
    let threads = s["threads"].as_array().expect("threads");
    assert_eq!(threads[0]["name"], "app_thread", "{s}");
    for k in [
        "id",
        "busy",
        "idle",
        "active_pollers_count",
        "timed_pollers_count",
        "paused_pollers_count",
    ] {
        assert!(is_u64(&threads[0][k]), "thread.{k}: {s}");
    }

    let v = t.rpc_json(&["spdk_get_version"]);
    let version = v["version"].as_str().expect("version");
    assert!(version.starts_with("SPDK v26.09"), "{v}");
    assert_eq!(v["fields"]["major"], 26);
    assert_eq!(v["fields"]["minor"], 9);
    assert_eq!(v["fields"]["patch"], 0);
    assert!(v["fields"]["suffix"].is_string(), "{v}");

    let methods = t.rpc_json(&["rpc_get_methods"]);
    let methods: Vec<&str> = methods
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m.as_str().expect("string"))
        .collect();
    for m in REQUIRED_METHODS {
        assert!(
            methods.contains(&m),
            "rpc_get_methods lacks {m}: {methods:?}"
        );
    }
    // --current in RUNTIME hides STARTUP-only methods.
    let current = t.rpc_json(&["rpc_get_methods", "--current"]);
    let current: Vec<&str> = current
        .as_array()
        .expect("array")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(!current.contains(&"framework_start_init"), "{current:?}");
    assert!(!current.contains(&"bdev_set_options"), "{current:?}");
    assert!(current.contains(&"bdev_get_bdevs"), "{current:?}");
    t.stop();
}
