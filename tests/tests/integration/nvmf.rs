//! The NVMe-oF target's RPCs through SPDK's stock `spdk-rpc` CLI, every
//! method in the forms the CLI sends, with a real NVMe/TCP host
//! (`wc_nvmf::host`) connected to see controllers and queue pairs, and
//! `save_config` / `--json` restoring a target that hosts can use again.

use serde_json::{json, Value};
use wc_nvme_wire::identify::{cns, IdentifyController};
use wc_nvmf::host::Host;

use crate::harness::Target;
use crate::nvme_common::{free_port, rpc_error};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const DISC: &str = "nqn.2014-08.org.nvmexpress.discovery";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";

fn code_of(out: &str) -> i64 {
    rpc_error(out).0
}

fn subsystem<'a>(list: &'a Value, nqn: &str) -> &'a Value {
    list.as_array()
        .expect("array")
        .iter()
        .find(|s| s["nqn"] == nqn)
        .unwrap_or_else(|| panic!("{nqn} not in {list}"))
}

#[test]
fn nvmf_rpcs_through_spdk_rpc() {
    require_spdk_rpc!();
    let t = Target::start("nvmf_rpcs", &[]);
    let port = free_port();
    let dport = free_port();
    let ps = port.to_string();
    let dps = dport.to_string();
    t.rpc_ok(&["bdev_malloc_create", "-b", "Malloc0", "32", "512"]);
    t.rpc_ok(&["bdev_malloc_create", "-b", "Malloc1", "8", "4096"]);

    // A listener needs the transport first.
    t.rpc_ok(&[
        "nvmf_create_subsystem",
        NQN,
        "-s",
        "SPDK00000000000001",
        "-d",
        "writecache ctrl",
        "-m",
        "8",
    ]);
    let out = t.rpc_err(&[
        "nvmf_subsystem_add_listener",
        NQN,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &ps,
    ]);
    assert_eq!(code_of(&out), -32602, "{out}");

    // Transport: created once, listed with what was asked.
    t.rpc_ok(&[
        "nvmf_create_transport",
        "-t",
        "TCP",
        "-q",
        "64",
        "-c",
        "4096",
        "-i",
        "131072",
        "-o",
    ]);
    let out = t.rpc_err(&["nvmf_create_transport", "-t", "TCP"]);
    assert_eq!(code_of(&out), -32603);
    assert!(out.contains("Transport type 'TCP' already exists"), "{out}");
    let tr = t.rpc_json(&["nvmf_get_transports"]);
    assert_eq!(tr[0]["trtype"], "TCP");
    assert_eq!(tr[0]["max_queue_depth"], 64);
    assert_eq!(tr[0]["c2h_success"], false);
    assert_eq!(
        t.rpc_json(&["nvmf_get_transports", "--trtype", "tcp"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let out = t.rpc_err(&["nvmf_get_transports", "--trtype", "RDMA"]);
    assert_eq!(code_of(&out), -32602);

    // Subsystems: duplicate and malformed NQNs refused.
    let out = t.rpc_err(&["nvmf_create_subsystem", NQN]);
    assert!(out.contains("Unable to create subsystem"), "{out}");
    t.rpc_err(&["nvmf_create_subsystem", "not-an-nqn"]);
    t.rpc_ok(&["nvmf_create_subsystem", "nqn.2016-06.io.spdk:cnode2", "-a"]);

    // Namespaces: the raw result is the nsid; an explicit nsid and UUID.
    let mut c = t.client();
    let nsid = c
        .call(
            "nvmf_subsystem_add_ns",
            Some(json!({"nqn": NQN, "namespace": {"bdev_name": "Malloc0"}})),
        )
        .expect("add_ns");
    assert_eq!(nsid, json!(1));
    t.rpc_ok(&[
        "nvmf_subsystem_add_ns",
        NQN,
        "Malloc1",
        "-n",
        "5",
        "-u",
        "a5a1c0de-1111-4222-8333-444455556666",
    ]);
    let out = t.rpc_err(&["nvmf_subsystem_add_ns", NQN, "Malloc1", "-n", "5"]);
    assert_eq!(code_of(&out), -32602);
    let out = t.rpc_err(&["nvmf_subsystem_add_ns", NQN, "NoSuchBdev"]);
    assert_eq!(code_of(&out), -32602);
    let out = t.rpc_err(&[
        "nvmf_subsystem_add_ns",
        "nqn.2016-06.io.spdk:nope",
        "Malloc0",
    ]);
    assert!(out.contains("Unable to find subsystem with NQN"), "{out}");

    // Listeners (and the CLI's `discovery` shortcut); duplicates refused.
    t.rpc_ok(&[
        "nvmf_subsystem_add_listener",
        NQN,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &ps,
        "-f",
        "ipv4",
    ]);
    let out = t.rpc_err(&[
        "nvmf_subsystem_add_listener",
        NQN,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &ps,
    ]);
    assert_eq!(code_of(&out), -32602);
    t.rpc_ok(&[
        "nvmf_subsystem_add_listener",
        "discovery",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &dps,
    ]);
    t.rpc_ok(&[
        "nvmf_subsystem_add_listener",
        "nqn.2016-06.io.spdk:cnode2",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &ps,
    ]);

    // Hosts.
    t.rpc_ok(&["nvmf_subsystem_add_host", NQN, HOST]);
    t.rpc_err(&["nvmf_subsystem_add_host", NQN, HOST]);
    t.rpc_ok(&[
        "nvmf_subsystem_add_host",
        NQN,
        "nqn.2016-06.io.spdk:other-host",
    ]);
    t.rpc_ok(&[
        "nvmf_subsystem_remove_host",
        NQN,
        "nqn.2016-06.io.spdk:other-host",
    ]);
    t.rpc_err(&[
        "nvmf_subsystem_remove_host",
        NQN,
        "nqn.2016-06.io.spdk:other-host",
    ]);
    t.rpc_ok(&[
        "nvmf_subsystem_allow_any_host",
        "nqn.2016-06.io.spdk:cnode2",
        "--no-allow-any-host",
    ]);
    t.rpc_ok(&[
        "nvmf_subsystem_allow_any_host",
        "nqn.2016-06.io.spdk:cnode2",
        "--allow-any-host",
    ]);

    let subs = t.rpc_json(&["nvmf_get_subsystems"]);
    assert_eq!(subs[0]["nqn"], DISC);
    assert_eq!(subs[0]["subtype"], "Discovery");
    assert_eq!(subs[0]["listen_addresses"][0]["trsvcid"], dps.as_str());
    let s = subsystem(&subs, NQN);
    assert_eq!(s["subtype"], "NVMe");
    assert_eq!(s["serial_number"], "SPDK00000000000001");
    assert_eq!(s["model_number"], "writecache ctrl");
    assert_eq!(s["max_namespaces"], 8);
    assert_eq!(s["allow_any_host"], false);
    assert_eq!(s["hosts"], json!([{"nqn": HOST}]));
    assert_eq!(
        s["listen_addresses"],
        json!([{"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": ps}])
    );
    assert_eq!(s["namespaces"][0]["nsid"], 1);
    assert_eq!(s["namespaces"][0]["bdev_name"], "Malloc0");
    assert_eq!(s["namespaces"][1]["nsid"], 5);
    assert_eq!(
        s["namespaces"][1]["uuid"],
        "a5a1c0de-1111-4222-8333-444455556666"
    );
    assert_eq!(
        t.rpc_json(&["nvmf_get_subsystems", NQN])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let out = t.rpc_err(&["nvmf_get_subsystems", "nqn.2016-06.io.spdk:nope"]);
    assert_eq!(code_of(&out), -32602);

    // A host connects: controllers and queue pairs show it.
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let (mut admin, cntlid) = Host::admin(addr, NQN, (false, false), 0).expect("admin queue");
    let io = Host::io(addr, NQN, (true, true), cntlid, 1, 32).expect("I/O queue");
    let (cqe, id) = admin.identify(cns::CONTROLLER, 0).expect("identify");
    assert!(cqe.status.is_success());
    assert_eq!(
        IdentifyController::decode(&id).expect("decode").serial,
        "SPDK00000000000001"
    );
    let ctrls = t.rpc_json(&["nvmf_subsystem_get_controllers", NQN]);
    assert_eq!(ctrls[0]["cntlid"], cntlid);
    assert_eq!(ctrls[0]["hostnqn"], HOST);
    assert_eq!(ctrls[0]["num_io_qpairs"], 1);
    let qps = t.rpc_json(&["nvmf_subsystem_get_qpairs", NQN]);
    assert_eq!(qps.as_array().map(Vec::len), Some(2), "{qps}");
    assert_eq!(qps[0]["listen_address"]["trsvcid"], ps.as_str());
    assert_eq!(qps[0]["state"], "active");

    // Removing a namespace is seen by the RPCs.
    t.rpc_ok(&["nvmf_subsystem_remove_ns", NQN, "5"]);
    t.rpc_err(&["nvmf_subsystem_remove_ns", NQN, "5"]);
    assert_eq!(
        subsystem(&t.rpc_json(&["nvmf_get_subsystems"]), NQN)["namespaces"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // save_config has the nvmf section, in an order that replays.
    let saved_text = t.rpc_ok(&["save_config"]);
    let saved: Value = serde_json::from_str(&saved_text).expect("JSON");
    let nvmf = saved["subsystems"]
        .as_array()
        .expect("subsystems")
        .iter()
        .find(|s| s["subsystem"] == "nvmf")
        .expect("nvmf section");
    let methods: Vec<&str> = nvmf["config"]
        .as_array()
        .expect("config")
        .iter()
        .map(|e| e["method"].as_str().expect("method"))
        .collect();
    assert_eq!(methods[0], "nvmf_create_transport");
    for m in [
        "nvmf_create_subsystem",
        "nvmf_subsystem_add_listener",
        "nvmf_subsystem_add_host",
        "nvmf_subsystem_add_ns",
    ] {
        assert!(methods.contains(&m), "{m} saved: {methods:?}");
    }
    drop(io);
    drop(admin);

    // Listener removal and subsystem deletion.
    t.rpc_ok(&[
        "nvmf_subsystem_remove_listener",
        "nqn.2016-06.io.spdk:cnode2",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &ps,
    ]);
    t.rpc_err(&[
        "nvmf_subsystem_remove_listener",
        "nqn.2016-06.io.spdk:cnode2",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &ps,
    ]);
    t.rpc_ok(&["nvmf_delete_subsystem", "nqn.2016-06.io.spdk:cnode2"]);
    let out = t.rpc_err(&["nvmf_delete_subsystem", "nqn.2016-06.io.spdk:cnode2"]);
    assert!(out.contains("Unable to find subsystem with NQN"), "{out}");
    let before = t.rpc_json(&["nvmf_get_subsystems"]);

    let json_path = t.dir.join("saved.json");
    std::fs::write(&json_path, &saved_text).expect("write");
    let mut keep = t;
    keep.keep_dir();
    keep.stop();

    // Restarted from the saved file: same subsystems (cnode2 was deleted
    // after saving, so it comes back), hosts can connect again.
    let t = Target::start(
        "nvmf_restored",
        &["--json", json_path.to_str().expect("utf-8")],
    );
    let after = t.rpc_json(&["nvmf_get_subsystems"]);
    assert_eq!(subsystem(&after, NQN), subsystem(&before, NQN));
    assert_eq!(
        subsystem(&after, "nqn.2016-06.io.spdk:cnode2")["allow_any_host"],
        true
    );
    let (mut admin, _) =
        Host::admin(addr, NQN, (false, false), 0).expect("admin queue after restore");
    let (cqe, _) = admin.identify(cns::NAMESPACE, 1).expect("identify ns");
    assert!(cqe.status.is_success());
    // And saving again gives the same config.
    let again: Value = serde_json::from_str(&t.rpc_ok(&["save_config"])).expect("JSON");
    assert_eq!(again, saved);
    drop(admin);
    t.stop();
}
