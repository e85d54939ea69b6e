//! The delay vbdev: conformance, measured latencies, p99 share, latency
//! updates, reset, SPDK's parameters and lifecycle.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use wc_bdev::testing::{conformance, run_on, test_runtime, Expect};
use wc_bdev::{DmaBuf, FnCompletion, Io, IoCompletion, IoStatus};
use wc_bdev_delay::{
    create, delete, latencies, update_latency, update_latency_with, DelayOpts, LatencyType,
    UpdateLatencyParams, BAD_LATENCY_TYPE_MSG, P99_BELOW_AVG_MSG, UUID_NAMESPACE,
};
use wc_bdev_malloc::MallocOpts;
use wc_reactor::tick::{duration_to_ticks, ticks, ticks_to_duration};
use wc_reactor::Harness;

fn malloc(name: &str, blocks: u64) {
    wc_bdev_malloc::create(MallocOpts::new(name, blocks, 512)).unwrap();
}

#[test]
fn passes_conformance_over_malloc_from_two_reactors() {
    malloc("DlyConfBase", 4096);
    let b = create(DelayOpts::new(
        "DlyConf",
        "DlyConfBase",
        (10, 50),
        (20, 100),
    ))
    .unwrap()
    .unwrap();
    assert_eq!(b.num_blocks(), 4096);
    let rt = test_runtime(2);
    conformance(
        &rt,
        "DlyConf",
        Expect {
            stores_data: true,
            unmap_zeroes: true,
        },
    );
    delete("DlyConf").unwrap();
}

/// Runs `n` QD1 writes on `bdev` and returns each one's latency in ticks.
fn qd1_write_latencies(rt: &wc_reactor::Runtime, bdev: &'static str, n: usize) -> Vec<u64> {
    run_on(rt.main(), move || async move {
        let desc = wc_bdev::open(bdev, true, None).unwrap();
        let ch = desc.channel().unwrap();
        let mut buf = DmaBuf::filled(512, 3);
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let t0 = ticks();
            buf = ch.write_async(i as u64 % 64, buf, false).await.unwrap();
            lat.push(ticks() - t0);
        }
        lat
    })
}

fn median(ticks: &[u64]) -> Duration {
    let mut v = ticks.to_vec();
    v.sort_unstable();
    ticks_to_duration(v[v.len() / 2])
}

#[test]
fn qd1_writes_take_the_average_latency() {
    malloc("DlyLatBase", 256);
    create(DelayOpts::new("DlyLat", "DlyLatBase", (0, 0), (200, 200))).unwrap();
    let rt = test_runtime(1);
    let lat = qd1_write_latencies(&rt, "DlyLat", 100);
    let min = duration_to_ticks(Duration::from_micros(200));
    assert!(lat.iter().all(|&l| l >= min), "an I/O beat its latency");
    let med = median(&lat);
    let mean = ticks_to_duration(lat.iter().sum::<u64>() / lat.len() as u64);
    eprintln!("QD1 write latency with avg 200 us: median {med:?}, mean {mean:?}");
    // Median: robust to a test machine that stalls now and then.
    assert!(med < Duration::from_micros(1000), "median {med:?}");
    // Reads were configured with no delay.
    let reads = run_on(rt.main(), || async {
        let desc = wc_bdev::open("DlyLat", true, None).unwrap();
        let ch = desc.channel().unwrap();
        let mut lat = Vec::new();
        for _ in 0..20 {
            let t0 = ticks();
            ch.read_async(0, DmaBuf::new(512)).await.unwrap();
            lat.push(ticks() - t0);
        }
        lat
    });
    assert!(median(&reads) < Duration::from_micros(150), "{reads:?}");

    // Lowering the latency takes effect for later I/O.
    update_latency("DlyLat", LatencyType::AvgWrite, 0).unwrap();
    update_latency("DlyLat", LatencyType::P99Write, 0).unwrap();
    assert_eq!(latencies("DlyLat").unwrap(), (0, 0, 0, 0));
    let lat = qd1_write_latencies(&rt, "DlyLat", 20);
    assert!(median(&lat) < Duration::from_micros(150), "after update");
    delete("DlyLat").unwrap();
}

#[test]
fn about_one_percent_of_io_get_the_p99_latency() {
    malloc("DlyP99Base", 256);
    create(DelayOpts::new("DlyP99", "DlyP99Base", (0, 2000), (0, 0))).unwrap();
    let rt = test_runtime(1);
    let n = 3000;
    let slow = run_on(rt.main(), move || async move {
        let desc = wc_bdev::open("DlyP99", true, None).unwrap();
        let ch = desc.channel().unwrap();
        let p99 = duration_to_ticks(Duration::from_micros(2000));
        let mut buf = DmaBuf::new(512);
        let mut slow = 0;
        for i in 0..n {
            let t0 = ticks();
            buf = ch.read_async(i % 64, buf).await.unwrap();
            if ticks() - t0 >= p99 {
                slow += 1;
            }
        }
        slow
    });
    eprintln!("{slow} of {n} reads took the p99 latency");
    // Expect ~30; wide bounds (a stalled test machine only adds slow ones).
    assert!(
        (5..=180).contains(&slow),
        "{slow} of {n} reads took the p99 latency"
    );
    delete("DlyP99").unwrap();
}

type Log = Rc<RefCell<Vec<(u64, IoStatus)>>>;

fn recorder() -> (Rc<dyn IoCompletion>, Log) {
    let log: Log = Default::default();
    let l = log.clone();
    let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |io: Io, tag| {
        l.borrow_mut().push((tag, io.status()));
    }));
    (cb, log)
}

#[test]
fn reset_aborts_held_io_on_every_channel() {
    malloc("DlyRstBase", 256);
    create(DelayOpts::new(
        "DlyRst",
        "DlyRstBase",
        (5_000_000, 5_000_000),
        (0, 0),
    ))
    .unwrap();
    let h = Harness::new(2);
    let desc = wc_bdev::open("DlyRst", true, None).unwrap();
    let ch0 = h.on(0, || desc.channel().unwrap());
    let ch1 = h.on(1, || desc.channel().unwrap());
    let (cb, log) = recorder();
    h.on(0, || ch0.read(0, DmaBuf::new(512), &cb, 1));
    h.on(1, || ch1.read(1, DmaBuf::new(512), &cb, 2));
    h.on(1, || ch1.write(1, DmaBuf::new(512), false, &cb, 3));
    h.run_until_idle(1000);
    assert_eq!(*log.borrow(), vec![(3, IoStatus::Success)]);
    h.on(0, || ch0.reset(&cb, 4));
    assert!(h.run_until(1000, || log.borrow().len() == 4));
    let got = log.borrow().clone();
    assert_eq!(got.last(), Some(&(4, IoStatus::Success)));
    let mut got = got;
    got.sort_by_key(|x| x.0);
    assert_eq!(
        got,
        vec![
            (1, IoStatus::Aborted),
            (2, IoStatus::Aborted),
            (3, IoStatus::Success),
            (4, IoStatus::Success)
        ]
    );
    drop((ch0, ch1, desc));
    delete("DlyRst").unwrap();
    h.run_until_idle(100);
}

#[test]
fn deleting_releases_held_io_early() {
    malloc("DlyDelBase", 256);
    create(DelayOpts::new(
        "DlyDel",
        "DlyDelBase",
        (0, 0),
        (5_000_000, 5_000_000),
    ))
    .unwrap();
    let h = Harness::new(1);
    let desc = wc_bdev::open("DlyDel", true, None).unwrap();
    let ch = h.on(0, || desc.channel().unwrap());
    let (cb, log) = recorder();
    h.on(0, || ch.write(0, DmaBuf::new(512), false, &cb, 1));
    h.run_until_idle(1000);
    assert!(log.borrow().is_empty());
    drop(desc);
    delete("DlyDel").unwrap();
    h.run_until_idle(100);
    assert_eq!(*log.borrow(), vec![(1, IoStatus::Success)]);
}

#[test]
fn parameters_follow_spdk() {
    malloc("DlyPrmBase", 64);
    let e = create(DelayOpts::new("DlyPrm", "DlyPrmBase", (10, 5), (1, 1))).unwrap_err();
    assert_eq!(
        (e.errno(), e.to_string()),
        (libc::EINVAL, P99_BELOW_AVG_MSG.into())
    );
    let b = create(DelayOpts::new("DlyPrm", "DlyPrmBase", (1, 2), (3, 4)))
        .unwrap()
        .unwrap();
    let base = wc_bdev::lookup("DlyPrmBase").unwrap();
    assert_eq!(base.claim_info().unwrap().module, "delay");
    let uuid = uuid::Uuid::new_v5(&UUID_NAMESPACE, base.uuid().as_bytes());
    assert_eq!(b.uuid(), uuid, "derived from the base's UUID");
    let params = serde_json::json!({
        "name": "DlyPrm", "base_bdev_name": "DlyPrmBase", "uuid": uuid.to_string(),
        "avg_read_latency": 1, "p99_read_latency": 2,
        "avg_write_latency": 3, "p99_write_latency": 4,
    });
    assert_eq!(
        b.info_json()["driver_specific"],
        serde_json::json!({"delay": params})
    );
    assert_eq!(b.info_json()["product_name"], "delay");
    assert_eq!(
        b.ops().config_entry(&b),
        Some(serde_json::json!({"method": "bdev_delay_create", "params": params}))
    );
    // The saved params decode as create params.
    let o: DelayOpts = serde_json::from_value(params).unwrap();
    assert_eq!(o.uuid, Some(uuid));
    assert!(serde_json::from_value::<DelayOpts>(serde_json::json!({
        "name": "x", "base_bdev_name": "y", "avg_read_latency": 1, "p99_read_latency": 2,
        "avg_write_latency": 3, "p99_write_latency": 4, "bogus": 1
    }))
    .is_err());
    assert!(serde_json::from_value::<DelayOpts>(serde_json::json!({
        "name": "x", "base_bdev_name": "y", "avg_read_latency": 1
    }))
    .is_err());
    // Duplicate name: EEXIST.
    let e = create(DelayOpts::new("DlyPrm", "Other", (1, 2), (3, 4))).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);

    // update_latency: SPDK's names and messages.
    let p: UpdateLatencyParams = serde_json::from_value(serde_json::json!({
        "delay_bdev_name": "DlyPrm", "latency_type": "p99_write", "latency_us": 40
    }))
    .unwrap();
    update_latency_with(&p).unwrap();
    assert_eq!(latencies("DlyPrm").unwrap(), (1, 2, 3, 40));
    let mut bad = p.clone();
    bad.latency_type = "p50_write".into();
    assert_eq!(
        update_latency_with(&bad).unwrap_err().to_string(),
        BAD_LATENCY_TYPE_MSG
    );
    let e = update_latency("nope", LatencyType::AvgRead, 1).unwrap_err();
    assert_eq!(e.errno(), libc::ENODEV);

    // Delete: only delay bdevs; releases the base.
    assert_eq!(delete("DlyPrmBase").unwrap_err().errno(), libc::ENODEV);
    delete("DlyPrm").unwrap();
    assert!(base.claim_info().is_none());
    assert_eq!(base.open_count(), 0);
    assert_eq!(delete("DlyPrm").unwrap_err().errno(), libc::ENODEV);
}

#[test]
fn creation_waits_for_a_missing_base() {
    let mut o = DelayOpts::new("DlyLate", "DlyLateBase", (1, 1), (1, 1));
    let uuid = uuid::Uuid::new_v4();
    o.uuid = Some(uuid);
    assert!(create(o).unwrap().is_none());
    assert!(wc_bdev::lookup("DlyLate").is_none());
    malloc("DlyLateBase", 64);
    let b = wc_bdev::lookup("DlyLate").expect("created on examine");
    assert_eq!(b.uuid(), uuid);
    // Hot-removing the base removes the vbdev but keeps its creation: it
    // comes back with the base (SPDK's association list).
    wc_bdev::hot_remove("DlyLateBase").unwrap();
    assert!(wc_bdev::lookup("DlyLate").is_none());
    malloc("DlyLateBase", 64);
    assert!(wc_bdev::lookup("DlyLate").is_some());
    delete("DlyLate").unwrap();
}

#[test]
fn rpc_methods_answer_as_spdk() {
    use serde_json::json;
    let reg = wc_rpc::Registry::new();
    reg.set_state(wc_rpc::RpcState::Runtime);
    wc_bdev_delay::rpc::register(&reg).unwrap();
    malloc("DlyRpcBase", 64);
    let call = |m: &str, p: serde_json::Value| reg.call_blocking(m, Some(p));
    let create = json!({
        "name": "DlyRpc", "base_bdev_name": "DlyRpcBase",
        "avg_read_latency": 1, "p99_read_latency": 2, "avg_write_latency": 3, "p99_write_latency": 4
    });
    assert_eq!(
        call("bdev_delay_create", create.clone()).unwrap(),
        json!("DlyRpc")
    );
    assert_eq!(
        call("bdev_delay_create", create).unwrap_err().code,
        -libc::EEXIST
    );
    let upd = |t: &str, name: &str| {
        call(
            "bdev_delay_update_latency",
            json!({"delay_bdev_name": name, "latency_type": t, "latency_us": 9}),
        )
    };
    assert_eq!(upd("avg_read", "DlyRpc").unwrap(), json!(true));
    assert_eq!(latencies("DlyRpc").unwrap().0, 9);
    let e = upd("max_read", "DlyRpc").unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (wc_rpc::INVALID_PARAMS, BAD_LATENCY_TYPE_MSG)
    );
    let e = upd("avg_read", "nope").unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            wc_rpc::INVALID_PARAMS,
            wc_bdev_delay::rpc::NO_SUCH_DELAY_BDEV_MSG
        )
    );
    assert_eq!(
        call("bdev_delay_delete", json!({"name": "DlyRpc"})).unwrap(),
        json!(true)
    );
    assert_eq!(
        call("bdev_delay_delete", json!({"name": "DlyRpc"}))
            .unwrap_err()
            .code,
        -libc::ENODEV
    );
}
