//! The error vbdev: forwarding, each injection kind, SPDK's validation,
//! claims and lifecycle.

use std::cell::RefCell;
use std::rc::Rc;

use wc_bdev::testing::{conformance, pattern, run_on, test_runtime, Expect};
use wc_bdev::{BdevChannel, DmaBuf, FnCompletion, Io, IoCompletion, IoStatus, IoType};
use wc_bdev_error::{
    clear, create, delete, inject, inject_error, remaining, resume_pending, ErrorType,
    InjectIoType, InjectParams, CORRUPT_VALUE_MSG, NVME_STATUS_MSG,
};
use wc_bdev_malloc::MallocOpts;
use wc_reactor::Harness;

fn malloc(name: &str, blocks: u64) {
    wc_bdev_malloc::create(MallocOpts::new(name, blocks, 512)).unwrap();
}

type Log = Rc<RefCell<Vec<(u64, IoStatus, Option<DmaBuf>)>>>;

fn recorder() -> (Rc<dyn IoCompletion>, Log) {
    let log: Log = Default::default();
    let l = log.clone();
    let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |mut io: Io, tag| {
        let buf = io.take_buf();
        l.borrow_mut().push((tag, io.status(), buf));
    }));
    (cb, log)
}

fn statuses(log: &Log) -> Vec<(u64, IoStatus)> {
    log.borrow().iter().map(|(t, s, _)| (*t, *s)).collect()
}

#[test]
fn forwards_and_passes_conformance_from_two_reactors() {
    malloc("ErrConfBase", 4096);
    create("ErrConfBase", None).unwrap();
    let rt = test_runtime(2);
    conformance(
        &rt,
        "EE_ErrConfBase",
        Expect {
            stores_data: true,
            unmap_zeroes: true,
        },
    );
    let ee = wc_bdev::lookup("EE_ErrConfBase").unwrap();
    let base = wc_bdev::lookup("ErrConfBase").unwrap();
    assert_eq!(ee.num_blocks(), base.num_blocks());
    assert_eq!(ee.block_size(), base.block_size());
    assert_eq!(ee.module_name(), "error");
    // The base saw the forwarded traffic.
    assert!(base.io_stats().num_write_ops >= 8);
    delete("EE_ErrConfBase").unwrap();
}

#[test]
fn failure_counts_are_shared_across_reactors() {
    malloc("ErrFailBase", 256);
    create("ErrFailBase", None).unwrap();
    inject("EE_ErrFailBase", InjectIoType::Write, ErrorType::Failure, 2).unwrap();
    assert_eq!(remaining("EE_ErrFailBase", IoType::Write).unwrap(), 2);
    let rt = test_runtime(2);
    let write_on = |i: usize| {
        run_on(&rt.handles()[i], || async {
            let desc = wc_bdev::open("EE_ErrFailBase", true, None).unwrap();
            let ch = desc.channel().unwrap();
            ch.write_async(0, DmaBuf::new(512), false).await.err()
        })
    };
    assert_eq!(write_on(0), Some(IoStatus::Failed(libc::EIO)));
    assert_eq!(write_on(1), Some(IoStatus::Failed(libc::EIO)));
    assert_eq!(write_on(0), None);
    assert_eq!(write_on(1), None);
    assert_eq!(remaining("EE_ErrFailBase", IoType::Write).unwrap(), 0);
    // Reads were never armed; `all` arms every type, `clear` disarms.
    inject("EE_ErrFailBase", InjectIoType::All, ErrorType::Failure, 5).unwrap();
    assert_eq!(remaining("EE_ErrFailBase", IoType::Flush).unwrap(), 5);
    assert_eq!(remaining("EE_ErrFailBase", IoType::WriteZeroes).unwrap(), 0);
    let r = run_on(rt.main(), || async {
        let desc = wc_bdev::open("EE_ErrFailBase", true, None).unwrap();
        let ch = desc.channel().unwrap();
        let read = ch.read_async(0, DmaBuf::new(512)).await.err();
        let flush = ch.io_async(IoType::Flush, 0, 1).await.err();
        // Never injected: WRITE_ZEROES goes through.
        let wz = ch.io_async(IoType::WriteZeroes, 0, 1).await.err();
        (read, flush, wz)
    });
    assert_eq!(
        r,
        (
            Some(IoStatus::Failed(libc::EIO)),
            Some(IoStatus::Failed(libc::EIO)),
            None
        )
    );
    clear("EE_ErrFailBase").unwrap();
    assert_eq!(remaining("EE_ErrFailBase", IoType::Read).unwrap(), 0);
    let ok = run_on(rt.main(), || async {
        let desc = wc_bdev::open("EE_ErrFailBase", true, None).unwrap();
        let ch = desc.channel().unwrap();
        ch.read_async(0, DmaBuf::new(512)).await.is_ok()
    });
    assert!(ok);
    // num = 0 arms nothing.
    inject("EE_ErrFailBase", InjectIoType::Read, ErrorType::Failure, 0).unwrap();
    assert_eq!(remaining("EE_ErrFailBase", IoType::Read).unwrap(), 0);
    delete("EE_ErrFailBase").unwrap();
}

#[test]
fn corrupt_data_flips_one_byte_and_spares_the_callers_buffer() {
    malloc("ErrCorBase", 256);
    create("ErrCorBase", None).unwrap();
    let mut p = InjectParams::new(
        "EE_ErrCorBase",
        InjectIoType::Write,
        ErrorType::CorruptData,
        1,
    );
    p.corrupt_offset = Some(700);
    p.corrupt_value = Some(0xFF);
    inject_error(&p).unwrap();
    let mut p = InjectParams::new(
        "EE_ErrCorBase",
        InjectIoType::Read,
        ErrorType::CorruptData,
        1,
    );
    p.corrupt_offset = Some(3);
    p.corrupt_value = Some(0x0F);
    inject_error(&p).unwrap();
    let rt = test_runtime(1);
    let (data, via_base, read1, read2) = run_on(rt.main(), || async {
        let data = pattern(4, 1, 1024);
        let ee = wc_bdev::open("EE_ErrCorBase", true, None).unwrap();
        let ch = ee.channel().unwrap();
        let sent = ch.write_async(4, data.clone(), false).await.unwrap();
        assert_eq!(sent.as_slice(), data.as_slice(), "caller's buffer intact");
        // Read the base directly (read-only open of a claimed bdev).
        let base = wc_bdev::open("ErrCorBase", false, None).unwrap();
        let bch = base.channel().unwrap();
        let via_base = bch.read_async(4, DmaBuf::new(1024)).await.unwrap();
        let read1 = ch.read_async(4, DmaBuf::new(1024)).await.unwrap();
        let read2 = ch.read_async(4, DmaBuf::new(1024)).await.unwrap();
        (data, via_base, read1, read2)
    });
    let mut expect = data;
    expect[700] ^= 0xFF;
    assert_eq!(
        via_base.as_slice(),
        expect.as_slice(),
        "the base got the corrupted copy"
    );
    let mut expect_read = expect.clone();
    expect_read[3] ^= 0x0F;
    assert_eq!(
        read1.as_slice(),
        expect_read.as_slice(),
        "read corrupted after completion"
    );
    assert_eq!(read2.as_slice(), expect.as_slice(), "one injection only");
    delete("EE_ErrCorBase").unwrap();
}

/// Opens `name` on reactor `i` of the harness and returns its channel.
fn channel_on(h: &Harness, i: usize, desc: &wc_bdev::Desc) -> Rc<BdevChannel> {
    h.on(i, || desc.channel().unwrap())
}

#[test]
fn pending_io_waits_for_resume() {
    malloc("ErrPendBase", 256);
    create("ErrPendBase", None).unwrap();
    let h = Harness::new(2);
    let desc = wc_bdev::open("EE_ErrPendBase", true, None).unwrap();
    let ch0 = channel_on(&h, 0, &desc);
    let ch1 = channel_on(&h, 1, &desc);
    inject("EE_ErrPendBase", InjectIoType::Write, ErrorType::Pending, 2).unwrap();
    let (cb, log) = recorder();
    h.on(0, || ch0.write(1, DmaBuf::filled(512, 1), false, &cb, 10));
    h.on(1, || ch1.write(2, DmaBuf::filled(512, 2), false, &cb, 11));
    h.on(1, || ch1.write(3, DmaBuf::filled(512, 3), false, &cb, 12));
    h.run_until_idle(100);
    assert_eq!(statuses(&log), vec![(12, IoStatus::Success)]);
    resume_pending("EE_ErrPendBase").unwrap();
    h.run_until_idle(100);
    let mut got = statuses(&log);
    got.sort_by_key(|x| x.0);
    assert_eq!(
        got,
        vec![
            (10, IoStatus::Success),
            (11, IoStatus::Success),
            (12, IoStatus::Success)
        ]
    );
    drop((ch0, ch1));
    drop(desc);
    delete("EE_ErrPendBase").unwrap();
    h.run_until_idle(100);
}

#[test]
fn reset_aborts_pending_io_on_every_channel() {
    malloc("ErrRstBase", 256);
    create("ErrRstBase", None).unwrap();
    let h = Harness::new(2);
    let desc = wc_bdev::open("EE_ErrRstBase", true, None).unwrap();
    let ch0 = channel_on(&h, 0, &desc);
    let ch1 = channel_on(&h, 1, &desc);
    inject("EE_ErrRstBase", InjectIoType::Read, ErrorType::Pending, 10).unwrap();
    let (cb, log) = recorder();
    h.on(0, || ch0.read(1, DmaBuf::new(512), &cb, 1));
    h.on(1, || ch1.read(1, DmaBuf::new(512), &cb, 2));
    h.run_until_idle(100);
    assert!(log.borrow().is_empty());
    h.on(0, || ch0.reset(&cb, 3));
    h.run_until_idle(100);
    let mut got = statuses(&log);
    // The reset completes last, after both held reads were aborted.
    assert_eq!(got.last(), Some(&(3, IoStatus::Success)));
    got.sort_by_key(|x| x.0);
    assert_eq!(
        got,
        vec![
            (1, IoStatus::Aborted),
            (2, IoStatus::Aborted),
            (3, IoStatus::Success)
        ]
    );
    assert_eq!(remaining("EE_ErrRstBase", IoType::Read).unwrap(), 8);
    drop((ch0, ch1));
    drop(desc);
    delete("EE_ErrRstBase").unwrap();
    h.run_until_idle(100);
}

#[test]
fn deleting_aborts_held_io() {
    malloc("ErrDelHeld", 256);
    create("ErrDelHeld", None).unwrap();
    let h = Harness::new(1);
    let desc = wc_bdev::open("EE_ErrDelHeld", true, None).unwrap();
    let ch = channel_on(&h, 0, &desc);
    inject("EE_ErrDelHeld", InjectIoType::Flush, ErrorType::Pending, 1).unwrap();
    let (cb, log) = recorder();
    h.on(0, || ch.flush(0, 1, &cb, 7));
    h.run_until_idle(100);
    assert!(log.borrow().is_empty());
    drop(desc);
    delete("EE_ErrDelHeld").unwrap();
    h.run_until_idle(100);
    assert_eq!(statuses(&log), vec![(7, IoStatus::Aborted)]);
}

#[test]
fn nomem_is_retried_until_the_count_runs_out() {
    malloc("ErrNomemBase", 256);
    create("ErrNomemBase", None).unwrap();
    let h = Harness::new(1);
    let desc = wc_bdev::open("EE_ErrNomemBase", true, None).unwrap();
    let ch = channel_on(&h, 0, &desc);
    inject("EE_ErrNomemBase", InjectIoType::Write, ErrorType::Nomem, 3).unwrap();
    let (cb, log) = recorder();
    h.on(0, || ch.write(9, DmaBuf::filled(512, 9), false, &cb, 1));
    // Each retry consumes one count: the I/O completes once they are gone.
    h.poll(0);
    assert!(log.borrow().is_empty());
    h.run_until_idle(100);
    assert_eq!(statuses(&log), vec![(1, IoStatus::Success)]);
    assert_eq!(remaining("EE_ErrNomemBase", IoType::Write).unwrap(), 0);
    drop(ch);
    drop(desc);
    delete("EE_ErrNomemBase").unwrap();
}

#[test]
fn queue_depth_gates_injection() {
    malloc("ErrQdBase", 256);
    create("ErrQdBase", None).unwrap();
    let h = Harness::new(1);
    let desc = wc_bdev::open("EE_ErrQdBase", true, None).unwrap();
    let ch = channel_on(&h, 0, &desc);
    let mut p = InjectParams::new("EE_ErrQdBase", InjectIoType::Write, ErrorType::Failure, 1);
    p.queue_depth = Some(2);
    inject_error(&p).unwrap();
    let (cb, log) = recorder();
    // QD1: never reaches depth 2.
    h.on(0, || ch.write(0, DmaBuf::new(512), false, &cb, 0));
    h.run_until_idle(100);
    h.on(0, || ch.write(0, DmaBuf::new(512), false, &cb, 1));
    h.run_until_idle(100);
    // Three at once: the third sees two in flight.
    h.on(0, || {
        for t in 2..5 {
            ch.write(t, DmaBuf::new(512), false, &cb, t);
        }
    });
    h.run_until_idle(100);
    let mut got = statuses(&log);
    got.sort_by_key(|x| x.0);
    let failed: Vec<u64> = got
        .iter()
        .filter(|(_, s)| !s.is_success())
        .map(|x| x.0)
        .collect();
    assert_eq!(failed, vec![4], "{got:?}");
    drop(ch);
    drop(desc);
    delete("EE_ErrQdBase").unwrap();
}

#[test]
fn inject_validation_follows_spdk() {
    malloc("ErrValBase", 64);
    create("ErrValBase", None).unwrap();
    let name = "EE_ErrValBase";
    let mut p = InjectParams::new(name, InjectIoType::Read, ErrorType::NvmeFailure, 1);
    let e = inject_error(&p).unwrap_err();
    assert_eq!(
        (e.errno(), e.to_string()),
        (libc::EINVAL, NVME_STATUS_MSG.into())
    );
    p.nvme_sc = Some(2);
    inject_error(&p).unwrap();
    let mut p = InjectParams::new(name, InjectIoType::Read, ErrorType::Failure, 1);
    p.nvme_sct = Some(1);
    assert_eq!(inject_error(&p).unwrap_err().to_string(), NVME_STATUS_MSG);
    let p = InjectParams::new(name, InjectIoType::Write, ErrorType::CorruptData, 1);
    let e = inject_error(&p).unwrap_err();
    assert_eq!(
        (e.errno(), e.to_string()),
        (libc::EINVAL, CORRUPT_VALUE_MSG.into())
    );
    let e = inject("EE_nope", InjectIoType::Read, ErrorType::Failure, 1).unwrap_err();
    assert_eq!(e.errno(), libc::ENODEV);
    // Not an error bdev either.
    let e = inject("ErrValBase", InjectIoType::Read, ErrorType::Failure, 1).unwrap_err();
    assert_eq!(e.errno(), libc::ENODEV);

    // RPC decoding: SPDK's names, strict keys and enums, num defaults to 1.
    let p: InjectParams = serde_json::from_value(serde_json::json!({
        "name": name, "io_type": "flush", "error_type": "failure"
    }))
    .unwrap();
    inject_error(&p).unwrap();
    assert_eq!(remaining(name, IoType::Flush).unwrap(), 1);
    for bad in [
        serde_json::json!({"name": name, "io_type": "reset", "error_type": "failure"}),
        serde_json::json!({"name": name, "io_type": "read", "error_type": "Failure"}),
        serde_json::json!({"name": name, "io_type": "read", "error_type": "failure", "extra": 1}),
        serde_json::json!({"name": name, "io_type": "read", "error_type": "corrupt_data", "corrupt_value": 256}),
        serde_json::json!({"name": name, "io_type": "read"}),
    ] {
        assert!(
            serde_json::from_value::<InjectParams>(bad.clone()).is_err(),
            "{bad}"
        );
    }
    let c: wc_bdev_error::CreateParams =
        serde_json::from_value(serde_json::json!({"base_name": "x"})).unwrap();
    assert!(c.uuid.is_none());
    assert!(serde_json::from_value::<wc_bdev_error::CreateParams>(
        serde_json::json!({"base_name": "x", "name": "y"})
    )
    .is_err());
    delete(name).unwrap();
}

#[test]
fn claims_base_and_reports_spdk_info() {
    malloc("ErrInfoBase", 64);
    let uuid = uuid::Uuid::new_v4();
    create("ErrInfoBase", Some(uuid)).unwrap();
    let base = wc_bdev::lookup("ErrInfoBase").unwrap();
    assert_eq!(base.claim_info().unwrap().module, "error");
    assert_eq!(
        wc_bdev::open("ErrInfoBase", true, None)
            .unwrap_err()
            .errno(),
        libc::EBUSY
    );
    let ee = wc_bdev::lookup("EE_ErrInfoBase").unwrap();
    assert_eq!(ee.uuid(), uuid);
    let info = ee.info_json();
    assert_eq!(info["product_name"], "Error Injection Disk");
    assert_eq!(
        info["driver_specific"],
        serde_json::json!({"error_disk": {"base_bdev": "ErrInfoBase"}})
    );
    assert_eq!(
        ee.ops().config_entry(&ee),
        Some(serde_json::json!({
            "method": "bdev_error_create",
            "params": {"base_name": "ErrInfoBase", "uuid": uuid.to_string()}
        }))
    );
    // Duplicate creation: EEXIST.
    assert_eq!(
        create("ErrInfoBase", None).unwrap_err().errno(),
        libc::EEXIST
    );
    // Deleting releases the claim and closes the base; re-creating works.
    assert_eq!(delete("ErrInfoBase").unwrap_err().errno(), libc::ENODEV);
    delete("EE_ErrInfoBase").unwrap();
    assert!(base.claim_info().is_none());
    assert_eq!(base.open_count(), 0);
    assert_eq!(delete("EE_ErrInfoBase").unwrap_err().errno(), libc::ENODEV);
    create("ErrInfoBase", None).unwrap();
    let ee = wc_bdev::lookup("EE_ErrInfoBase").unwrap();
    assert_eq!(
        ee.ops().config_entry(&ee).unwrap()["params"],
        serde_json::json!({"base_name": "ErrInfoBase"})
    );
    delete("EE_ErrInfoBase").unwrap();
}

#[test]
fn creation_waits_for_a_missing_base_and_follows_its_removal() {
    create("ErrLateBase", None).unwrap();
    assert!(wc_bdev::lookup("EE_ErrLateBase").is_none());
    malloc("ErrLateBase", 64);
    let ee = wc_bdev::lookup("EE_ErrLateBase").expect("created on examine");
    assert_eq!(ee.num_blocks(), 64);
    // The base going away takes the vbdev with it.
    wc_bdev::hot_remove("ErrLateBase").unwrap();
    assert!(wc_bdev::lookup("EE_ErrLateBase").is_none());
    // Its creation is forgotten: a new base of that name stays bare.
    malloc("ErrLateBase", 64);
    assert!(wc_bdev::lookup("EE_ErrLateBase").is_none());
}

#[test]
fn rpc_methods_answer_as_spdk() {
    use serde_json::json;
    let reg = wc_rpc::Registry::new();
    reg.set_state(wc_rpc::RpcState::Runtime);
    wc_bdev_error::rpc::register(&reg).unwrap();
    malloc("ErrRpcBase", 64);
    let call = |m: &str, p: serde_json::Value| reg.call_blocking(m, Some(p));
    assert_eq!(
        call("bdev_error_create", json!({"base_name": "ErrRpcBase"})).unwrap(),
        json!(true)
    );
    let e = call("bdev_error_create", json!({"base_name": "ErrRpcBase"})).unwrap_err();
    assert_eq!(e.code, -libc::EEXIST);
    let inj =
        json!({"name": "EE_ErrRpcBase", "io_type": "write", "error_type": "failure", "num": 3});
    assert_eq!(call("bdev_error_inject_error", inj).unwrap(), json!(true));
    assert_eq!(remaining("EE_ErrRpcBase", IoType::Write).unwrap(), 3);
    let e = call(
        "bdev_error_inject_error",
        json!({"name": "EE_ErrRpcBase", "io_type": "read", "error_type": "nvme_failure"}),
    )
    .unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (-libc::EINVAL, NVME_STATUS_MSG)
    );
    let e = call(
        "bdev_error_inject_error",
        json!({"name": "EE_ErrRpcBase", "io_type": "sideways", "error_type": "failure"}),
    )
    .unwrap_err();
    assert_eq!(e.code, wc_rpc::INVALID_PARAMS);
    let e = call(
        "bdev_error_inject_error",
        json!({"name": "EE_nope", "io_type": "read", "error_type": "failure"}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::ENODEV);
    assert_eq!(
        call(
            "bdev_error_resume_pending",
            json!({"name": "EE_ErrRpcBase"})
        )
        .unwrap(),
        json!(true)
    );
    assert_eq!(
        call("bdev_error_delete", json!({"name": "EE_ErrRpcBase"})).unwrap(),
        json!(true)
    );
    let e = call("bdev_error_delete", json!({"name": "EE_ErrRpcBase"})).unwrap_err();
    assert_eq!(e.code, -libc::ENODEV);
}
