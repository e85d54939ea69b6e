//! End-to-end tests of the NVMe/TCP target with a small host built on the
//! wire crate: Connect and properties, Identify, features, I/O (in-capsule,
//! R2T, C2HData with and without SUCCESS, digests), discovery, host
//! checks, keep-alive, hot-remove with a changed-namespace event.

mod common;

use std::time::Duration;

use common::*;
use wc_nvme_wire::command::{
    async_event, feature, AsyncEvent, DsmCommand, DsmRange, FeatureCommand, GetLogPageCommand,
    RwCommand,
};
use wc_nvme_wire::fabrics::{property, Capabilities, DISCOVERY_NQN};
use wc_nvme_wire::identify::{
    active_ns_list, cns, nidt, ns_id_descriptors, IdentifyController, IdentifyNamespace,
};
use wc_nvme_wire::log::{lid, DiscoveryLogEntry, DiscoveryLogHeader};
use wc_nvme_wire::{opcode, Sqe, Status};

fn io_round_trip(nqn: &str, bdev: &str, digests: (bool, bool)) {
    let addr = setup_subsystem(nqn, bdev, 8192, true);
    let (mut a, cntlid) = Host::admin(addr, nqn, digests, 0);

    let cap = Capabilities::from_u64(a.prop_get(property::CAP, true));
    assert_eq!(cap.mqes, 128);
    assert!(cap.css_nvm);
    assert_eq!(a.prop_get(property::VS, false), property::VS_1_3 as u64);

    let (c, id) = a.identify(cns::CONTROLLER, 0);
    assert!(c.status.is_success());
    let ic = IdentifyController::decode(&id).unwrap();
    assert_eq!(ic.subnqn, nqn);
    assert_eq!(ic.serial, "WC123");
    assert_eq!(ic.model, "SPDK bdev Controller");
    assert_eq!(ic.cntlid, cntlid);
    assert_eq!(ic.vwc & 1, 1, "volatile write cache reported");
    assert_eq!(ic.ioccsz, (64 + 4096) / 16);

    let (c, list) = a.identify(cns::ACTIVE_NS_LIST, 0);
    assert!(c.status.is_success());
    assert_eq!(active_ns_list(&list).collect::<Vec<_>>(), vec![1]);
    let (_, nsd) = a.identify(cns::NAMESPACE, 1);
    let ns = IdentifyNamespace::decode(&nsd).unwrap();
    assert_eq!(ns.nsze, 8192);
    assert_eq!(ns.block_size(), Some(512));
    let (_, descs) = a.identify(cns::NS_ID_DESCRIPTOR_LIST, 1);
    let uuid = wc_bdev::lookup(bdev).unwrap().uuid();
    assert!(ns_id_descriptors(&descs)
        .map(|d| d.unwrap())
        .any(|d| d.nidt == nidt::UUID && d.nid == uuid.as_bytes()));
    // Inactive nsid in range: zeroes; beyond NN: invalid namespace.
    let (c, _) = a.identify(cns::NAMESPACE, 2);
    assert!(c.status.is_success());
    let (c, _) = a.identify(cns::NAMESPACE, 100_000);
    assert_eq!(c.status.sc(), Status::INVALID_NAMESPACE.sc());

    let cid = a.cid();
    let set = FeatureCommand {
        fid: feature::NUMBER_OF_QUEUES,
        sel: 0,
        save: false,
        value: feature::num_queues_value(4, 4),
    };
    let (c, _) = a.exec(set.build_set(cid), &[], 0);
    assert!(c.status.is_success());
    assert_eq!(feature::num_queues_parse(c.dw0), (4, 4));

    let mut q = Host::io(addr, nqn, digests, cntlid, 1);
    // In-capsule 4 KiB write, then a 128 KiB write through R2T/H2CData,
    // FUA, read back both.
    let small = pattern(1, 4096);
    assert!(q.write(1, 0, &small, false).status.is_success());
    let big = pattern(2, 128 * 1024);
    assert!(q.write(1, 100, &big, true).status.is_success());
    let (c, got) = q.read(1, 0, 4096);
    assert!(c.status.is_success());
    assert_eq!(got, small);
    let (c, got) = q.read(1, 100, 128 * 1024);
    assert!(c.status.is_success());
    assert_eq!(got, big);

    // Flush.
    let cid = q.cid();
    let (c, _) = q.exec(wc_nvme_wire::command::flush(cid, 1), &[], 0);
    assert!(c.status.is_success());
    // Compare: equal, then different.
    let cid = q.cid();
    let rw = RwCommand {
        slba: 0,
        nlb: 8,
        fua: false,
        deac: false,
    };
    let (c, _) = q.exec(rw.build(opcode::io::COMPARE, cid, 1).unwrap(), &small, 0);
    assert!(c.status.is_success(), "{}", c.status);
    let cid = q.cid();
    let (c, _) = q.exec(
        rw.build(opcode::io::COMPARE, cid, 1).unwrap(),
        &big[..4096],
        0,
    );
    assert_eq!(c.status.sc(), Status::COMPARE_FAILURE.sc());
    // Write zeroes, then read zeroes.
    let cid = q.cid();
    let (c, _) = q.exec(rw.build(opcode::io::WRITE_ZEROES, cid, 1).unwrap(), &[], 0);
    assert!(c.status.is_success());
    let (_, got) = q.read(1, 0, 4096);
    assert!(got.iter().all(|&b| b == 0));
    // Dataset management: deallocate two ranges.
    let dsm = DsmCommand {
        nr: 2,
        deallocate: true,
        integral_read: false,
        integral_write: false,
    };
    let mut ranges = [0u8; 32];
    DsmRange {
        context_attributes: 0,
        nlb: 8,
        slba: 100,
    }
    .encode(&mut ranges[..16])
    .unwrap();
    DsmRange {
        context_attributes: 0,
        nlb: 8,
        slba: 200,
    }
    .encode(&mut ranges[16..])
    .unwrap();
    let cid = q.cid();
    let (c, _) = q.exec(dsm.build(cid, 1).unwrap(), &ranges, 0);
    assert!(c.status.is_success(), "{}", c.status);

    // Errors: LBA out of range, unknown nsid, unknown opcode.
    let (c, _) = q.read(1, 8190, 4096);
    assert_eq!(c.status, Status::LBA_OUT_OF_RANGE.with_dnr());
    let (c, _) = q.read(9, 0, 512);
    assert_eq!(c.status, Status::INVALID_NAMESPACE.with_dnr());
    let cid = q.cid();
    let (c, _) = q.exec(
        Sqe {
            opcode: 0x7e,
            cid,
            nsid: 1,
            ..Sqe::default()
        },
        &[],
        0,
    );
    assert_eq!(c.status, Status::INVALID_OPCODE.with_dnr());
    let cid = a.cid();
    let (c, _) = a.exec(
        Sqe {
            opcode: 0xc5,
            cid,
            ..Sqe::default()
        },
        &[],
        0,
    );
    assert_eq!(c.status, Status::INVALID_OPCODE.with_dnr());

    // The qpairs and controller are visible to the RPCs.
    let n2 = nqn.to_string();
    let qp = on_main(move || wc_nvmf::target::get_qpairs(&n2).unwrap());
    assert_eq!(qp.as_array().unwrap().len(), 2, "{qp}");
    let n2 = nqn.to_string();
    let ctrl = on_main(move || wc_nvmf::target::get_controllers(&n2).unwrap());
    assert_eq!(ctrl[0]["num_io_qpairs"], 1);
    assert_eq!(ctrl[0]["hostnqn"], HOSTNQN);

    // Shutdown notification completes.
    assert!(a
        .prop_set(
            property::CC,
            (property::cc::EN | (1 << property::cc::SHN_SHIFT)) as u64
        )
        .status
        .is_success());
    let csts = a.prop_get(property::CSTS, false) as u32;
    assert_eq!(csts & (3 << 2), property::csts::SHST_COMPLETE);
    drop(q);
    drop(a);
    let n2 = nqn.to_string();
    assert!(wait_for(5, || on_main({
        let n2 = n2.clone();
        move || wc_nvmf::target::get_controllers(&n2).unwrap()
    }) == serde_json::json!([])));
}

#[test]
fn io_without_digests() {
    io_round_trip(
        "nqn.2026-12.io.writecache:plain",
        "nvmf_plain",
        (false, false),
    );
}

#[test]
fn io_with_header_and_data_digests() {
    io_round_trip("nqn.2026-12.io.writecache:digests", "nvmf_dg", (true, true));
}

#[test]
fn discovery_log_lists_allowed_subsystems() {
    let nqn = "nqn.2026-12.io.writecache:disc";
    let addr = setup_subsystem(nqn, "nvmf_disc", 1024, false);
    on_main(|| {
        wc_nvmf::target::add_host("nqn.2026-12.io.writecache:disc", HOSTNQN).unwrap();
    });
    let (mut d, _) = Host::admin(addr, DISCOVERY_NQN, (false, false), 0);
    let (c, id) = d.identify(cns::CONTROLLER, 0);
    assert!(c.status.is_success());
    assert_eq!(IdentifyController::decode(&id).unwrap().cntrltype, 2);
    let cid = d.cid();
    let glp = GetLogPageCommand {
        lid: lid::DISCOVERY,
        lsp: 0,
        rae: false,
        len: 4096,
        offset: 0,
        nsid: 0,
    };
    let (c, log) = d.exec(glp.build(cid).unwrap(), &[], 4096);
    assert!(c.status.is_success(), "{}", c.status);
    let h = DiscoveryLogHeader::decode(&log).unwrap();
    assert!(h.numrec >= 1);
    let found = (0..h.numrec.min(3) as usize)
        .map(|i| DiscoveryLogEntry::decode(&log[1024 + i * 1024..]).unwrap())
        .any(|e| {
            e.subnqn == nqn && e.traddr == "127.0.0.1" && e.trsvcid == addr.port().to_string()
        });
    assert!(found, "discovery log lists {nqn}");
}

#[test]
fn unknown_host_is_refused() {
    let nqn = "nqn.2026-12.io.writecache:closed";
    let addr = setup_subsystem(nqn, "nvmf_closed", 1024, false);
    let mut h = Host::connect(addr, false, false);
    let c = h.fabric_connect(0, 32, nqn, "nqn.2026-12.io.writecache:stranger", 0xffff, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_HOST.with_dnr());
    // A subsystem that does not exist.
    let mut h = Host::connect(addr, false, false);
    let c = h.fabric_connect(0, 32, "nqn.2026-12.io.writecache:none", HOSTNQN, 0xffff, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAMETERS.with_dnr());
}

#[test]
fn empty_host_nqn_connects_only_where_any_host_may() {
    // SPDK's spdk_nvme_perf sends an empty HOSTNQN unless given one, and
    // SPDK's nvmf_tgt takes it: the host list decides, not the decoder.
    let open = "nqn.2026-12.io.writecache:anyhost";
    let addr = setup_subsystem(open, "nvmf_anyhost", 1024, true);
    let mut h = Host::connect(addr, false, false);
    let c = h.fabric_connect(0, 32, open, "", 0xffff, 0);
    assert!(c.status.is_success(), "{}", c.status);
    let closed = "nqn.2026-12.io.writecache:hostlist";
    let addr = setup_subsystem(closed, "nvmf_hostlist", 1024, false);
    let mut h = Host::connect(addr, false, false);
    let c = h.fabric_connect(0, 32, closed, "", 0xffff, 0);
    assert_eq!(c.status, Status::CONNECT_INVALID_HOST.with_dnr());
}

#[test]
fn keep_alive_expiry_tears_the_controller_down() {
    let nqn = "nqn.2026-12.io.writecache:kato";
    let addr = setup_subsystem(nqn, "nvmf_kato", 1024, true);
    let (mut a, cntlid) = Host::admin(addr, nqn, (false, false), 1000);
    let mut q = Host::io(addr, nqn, (false, false), cntlid, 1);
    // Keep-alives keep it up.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        let cid = a.cid();
        let (c, _) = a.exec(wc_nvme_wire::command::keep_alive(cid), &[], 0);
        assert!(c.status.is_success());
    }
    // Silence: the controller goes, and both queues close.
    std::thread::sleep(Duration::from_millis(2200));
    assert!(a.try_recv().is_err());
    assert!(q.try_recv().is_err());
    let ctrls =
        on_main(|| wc_nvmf::target::get_controllers("nqn.2026-12.io.writecache:kato").unwrap());
    assert_eq!(ctrls, serde_json::json!([]));
}

#[test]
fn hot_removed_bdev_fails_io_and_raises_changed_ns_event() {
    let nqn = "nqn.2026-12.io.writecache:hotrm";
    let addr = setup_subsystem(nqn, "nvmf_hotrm", 1024, true);
    let (mut a, cntlid) = Host::admin(addr, nqn, (false, false), 0);
    let cid = a.cid();
    let aec = FeatureCommand {
        fid: feature::ASYNC_EVENT_CONFIG,
        sel: 0,
        save: false,
        value: feature::AEC_NS_ATTRIBUTE_NOTICES,
    };
    assert!(a.exec(aec.build_set(cid), &[], 0).0.status.is_success());
    let aer_cid = a.cid();
    a.send_capsule(&wc_nvme_wire::command::async_event_request(aer_cid), &[]);
    let mut q = Host::io(addr, nqn, (false, false), cntlid, 1);
    assert!(q.write(1, 0, &pattern(3, 4096), false).status.is_success());

    on_main(|| wc_bdev_malloc::delete("nvmf_hotrm").unwrap());

    // The AER completes with a namespace attribute notice.
    let rx = a.recv();
    let wc_nvme_wire::PduHeader::CapsuleResp(c) = rx.header else {
        panic!("{rx:?}")
    };
    assert_eq!(c.cid, aer_cid);
    let ev = AsyncEvent::from_dw0(c.dw0);
    assert_eq!(ev.event_type, async_event::TYPE_NOTICE);
    assert_eq!(ev.log_page, lid::CHANGED_NS_LIST);
    let cid = a.cid();
    let glp = GetLogPageCommand {
        lid: lid::CHANGED_NS_LIST,
        lsp: 0,
        rae: false,
        len: 4096,
        offset: 0,
        nsid: 0xffff_ffff,
    };
    let (c, log) = a.exec(glp.build(cid).unwrap(), &[], 4096);
    assert!(c.status.is_success());
    assert_eq!(&log[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    // I/O to it now fails with an NVMe status; the target stays up.
    let (c, _) = q.read(1, 0, 4096);
    assert!(!c.status.is_success());
    let (c, list) = a.identify(cns::ACTIVE_NS_LIST, 0);
    assert!(c.status.is_success());
    assert_eq!(active_ns_list(&list).count(), 0);
}

#[test]
fn removed_namespace_releases_its_bdev_and_notifies() {
    let nqn = "nqn.2026-12.io.writecache:rmns";
    let addr = setup_subsystem(nqn, "nvmf_rmns", 1024, true);
    let (mut a, cntlid) = Host::admin(addr, nqn, (false, false), 0);
    let mut q = Host::io(addr, nqn, (false, false), cntlid, 1);
    assert!(q.write(1, 0, &pattern(4, 4096), false).status.is_success());
    let bdev = wc_bdev::lookup("nvmf_rmns").unwrap();
    assert!(bdev.open_count() >= 1);
    on_main(|| wc_nvmf::target::remove_ns("nqn.2026-12.io.writecache:rmns", 1).unwrap());
    // The queue pair's cache lets go of the descriptor on its next sweep,
    // without any I/O.
    assert!(
        wait_for(5, || bdev.open_count() == 0),
        "descriptor still open"
    );
    let (c, _) = q.read(1, 0, 4096);
    assert_eq!(c.status, Status::INVALID_NAMESPACE.with_dnr());
    // The changed namespace list names it (no AER was configured, so the
    // host finds it by reading the log).
    let cid = a.cid();
    let glp = GetLogPageCommand {
        lid: lid::CHANGED_NS_LIST,
        lsp: 0,
        rae: false,
        len: 4096,
        offset: 0,
        nsid: 0xffff_ffff,
    };
    let (c, log) = a.exec(glp.build(cid).unwrap(), &[], 4096);
    assert!(c.status.is_success());
    assert_eq!(&log[..4], &[1, 0, 0, 0]);
    // And the namespace can come back.
    on_main(|| {
        wc_nvmf::target::add_ns(
            "nqn.2026-12.io.writecache:rmns",
            wc_nvmf::target::NsArgs {
                bdev_name: "nvmf_rmns".into(),
                nsid: Some(1),
                nguid: None,
                eui64: None,
                uuid: None,
            },
        )
        .unwrap()
    });
    let (c, got) = q.read(1, 0, 4096);
    assert!(c.status.is_success());
    assert_eq!(got, pattern(4, 4096));
}
