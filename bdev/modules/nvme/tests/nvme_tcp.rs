//! The NVMe/TCP initiator against a small target built on the shared wire
//! crate (tests/mock_target): the bdev conformance suite from two
//! reactors (so two I/O queue pairs), with and without digests, in-capsule
//! and R2T writes, large I/O split into commands, reads finished by
//! C2HData SUCCESS, and SPDK's failure behaviour: reconnect with I/O
//! queued, fast I/O fail, controller loss, and hostile targets (bad
//! digests, short reads, garbage PDUs, silence).

mod common;
mod mock_target;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{attach_on, wait_for};
use mock_target::MockTarget;
use wc_bdev::testing::{conformance, pattern, run_on, test_runtime, Expect};
use wc_bdev::{DmaBuf, IoStatus, IoType};
use wc_bdev_nvme::{controller_state, detach, AttachOpts};
use wc_reactor::Runtime;

const NQN: &str = "nqn.2016-06.io.spdk:mock";

fn opts(name: &str, t: &MockTarget) -> AttachOpts {
    AttachOpts::tcp(name, "127.0.0.1", t.port, NQN)
}

#[test]
fn conformance_from_two_reactors_without_digests() {
    let t = MockTarget::start(NQN, 512, 8192);
    let rt = test_runtime(2);
    let names = attach_on(&rt, opts("NvmeConf", &t)).unwrap();
    assert_eq!(names, vec!["NvmeConfn1".to_string()]);
    let b = wc_bdev::lookup("NvmeConfn1").unwrap();
    assert_eq!((b.block_size(), b.num_blocks()), (512, 8192));
    assert_eq!(b.module_name(), "nvme");
    conformance(
        &rt,
        "NvmeConfn1",
        Expect {
            stores_data: true,
            unmap_zeroes: true,
        },
    );
    assert!(t.shared.stats.flushes.load(Ordering::Relaxed) > 0);
    assert_eq!(
        t.shared.stats.connects.load(Ordering::Relaxed),
        3,
        "one admin and one I/O queue per reactor"
    );
    run_on(rt.main(), || async { detach("NvmeConf") }).unwrap();
    assert!(wc_bdev::lookup("NvmeConfn1").is_none());
    rt.shutdown();
}

#[test]
fn conformance_with_header_and_data_digests() {
    let t = MockTarget::start(NQN, 4096, 2048);
    let rt = test_runtime(2);
    let mut o = opts("NvmeDgst", &t);
    o.hdgst = true;
    o.ddgst = true;
    attach_on(&rt, o).unwrap();
    conformance(
        &rt,
        "NvmeDgstn1",
        Expect {
            stores_data: true,
            unmap_zeroes: true,
        },
    );
    run_on(rt.main(), || async { detach("NvmeDgst") }).unwrap();
    rt.shutdown();
}

/// Writes then reads `len` bytes at `lba` on the main reactor.
fn write_read(
    rt: &Runtime,
    bdev: &'static str,
    lba: u64,
    len: usize,
    round: u64,
) -> Result<bool, IoStatus> {
    run_on(rt.main(), move || async move {
        let d = wc_bdev::open(bdev, true, None).unwrap();
        let ch = d.channel().unwrap();
        let data = pattern(lba, round, len);
        ch.write_async(lba, data.clone(), false).await?;
        let got = ch.read_async(lba, DmaBuf::new(len)).await?;
        Ok(got.as_slice() == data.as_slice())
    })
}

#[test]
fn large_io_is_split_and_uses_r2t_small_writes_go_in_capsule() {
    let t = MockTarget::start(NQN, 512, 16384);
    let rt = test_runtime(1);
    let mut o = opts("NvmeBig", &t);
    o.ddgst = true;
    attach_on(&rt, o).unwrap();
    // 1 MiB: 8 commands of 128 KiB, each answered by R2T and 16 H2CData
    // PDUs of 8 KiB.
    assert_eq!(write_read(&rt, "NvmeBign1", 100, 1 << 20, 1), Ok(true));
    assert!(t.shared.stats.r2ts.load(Ordering::Relaxed) >= 8);
    let before = t.shared.stats.in_capsule_writes.load(Ordering::Relaxed);
    assert_eq!(write_read(&rt, "NvmeBign1", 7, 4096, 2), Ok(true));
    assert_eq!(
        t.shared.stats.in_capsule_writes.load(Ordering::Relaxed),
        before + 1
    );
    // What the target stored is what was written.
    assert_eq!(t.block(7), pattern(7, 2, 4096)[..512].to_vec());
    // Reads that end with C2HData SUCCESS (no CapsuleResp).
    t.shared.faults.c2h_success.store(true, Ordering::SeqCst);
    assert_eq!(write_read(&rt, "NvmeBign1", 300, 64 * 1024, 3), Ok(true));
    t.shared.faults.c2h_success.store(false, Ordering::SeqCst);
    run_on(rt.main(), || async { detach("NvmeBig") }).unwrap();
    rt.shutdown();
}

#[test]
fn attach_errors_are_precise() {
    let rt = test_runtime(1);
    // Nothing listens on this port (bound, then closed).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = attach_on(&rt, AttachOpts::tcp("NvmeNone", "127.0.0.1", port, NQN)).unwrap_err();
    assert_eq!(e.errno(), libc::ECONNREFUSED, "{e}");
    assert!(controller_state("NvmeNone").is_none());
    // Wrong subsystem: the target refuses Fabrics Connect.
    let t = MockTarget::start(NQN, 512, 1024);
    let e = attach_on(
        &rt,
        AttachOpts::tcp("NvmeWrong", "127.0.0.1", t.port, "nqn.x:other"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("Fabrics Connect"), "{e}");
    // A name in use.
    attach_on(&rt, opts("NvmeDup", &t)).unwrap();
    let e = attach_on(&rt, opts("NvmeDup", &t)).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    run_on(rt.main(), || async { detach("NvmeDup") }).unwrap();
    rt.shutdown();
}

#[test]
fn reconnects_with_io_queued_and_nothing_lost() {
    let mut t = MockTarget::start(NQN, 512, 4096);
    let rt = test_runtime(2);
    let mut o = opts("NvmeRecon", &t);
    o.ctrlr_loss_timeout_sec = Some(-1);
    o.reconnect_delay_sec = Some(1);
    attach_on(&rt, o).unwrap();
    assert_eq!(write_read(&rt, "NvmeReconn1", 1, 4096, 1), Ok(true));
    t.kill();
    // I/O submitted while the target is away waits...
    let (tx, rx) = std::sync::mpsc::channel();
    rt.main().send(move || {
        wc_reactor::current()
            .spawn_local(async move {
                let d = wc_bdev::open("NvmeReconn1", true, None).unwrap();
                let ch = d.channel().unwrap();
                let r = ch.write_async(50, pattern(50, 7, 8192), true).await;
                let _ = tx.send(r.map(|_| ()));
            })
            .detach();
    });
    wait_for("the reset", Duration::from_secs(5), || {
        controller_state("NvmeRecon").is_some_and(|(resets, _, _)| resets >= 1)
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "I/O must wait"
    );
    let (_, gen0, state) = controller_state("NvmeRecon").unwrap();
    assert!(
        state == "resetting" || state == "reconnect_is_delayed",
        "{state}"
    );
    // ...and completes once the target is back.
    t.restart();
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("I/O completes after reconnect");
    assert_eq!(r, Ok(()));
    let (_, gen1, state) = controller_state("NvmeRecon").unwrap();
    assert_eq!(state, "enabled");
    assert!(gen1 > gen0);
    assert_eq!(t.block(50), pattern(50, 7, 8192)[..512].to_vec());
    assert_eq!(write_read(&rt, "NvmeReconn1", 1, 4096, 2), Ok(true));
    run_on(rt.main(), || async { detach("NvmeRecon") }).unwrap();
    rt.shutdown();
}

#[test]
fn fast_io_fail_then_controller_loss_removes_the_bdev() {
    let mut t = MockTarget::start(NQN, 512, 4096);
    let rt = test_runtime(1);
    let mut o = opts("NvmeLoss", &t);
    o.ctrlr_loss_timeout_sec = Some(4);
    o.reconnect_delay_sec = Some(1);
    o.fast_io_fail_timeout_sec = Some(2);
    attach_on(&rt, o).unwrap();
    assert_eq!(write_read(&rt, "NvmeLossn1", 1, 512, 1), Ok(true));
    t.kill();
    let t0 = Instant::now();
    // Queued I/O fails once fast_io_fail_timeout_sec has passed (not
    // before the first reconnect attempts).
    let r = write_read(&rt, "NvmeLossn1", 2, 512, 2);
    let waited = t0.elapsed();
    assert_eq!(r, Err(IoStatus::Failed(libc::EIO)));
    assert!(
        waited >= Duration::from_millis(1500),
        "failed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(4), "failed after {waited:?}");
    // After ctrlr_loss_timeout_sec the controller and its bdev are gone.
    wait_for("controller loss", Duration::from_secs(8), || {
        wc_bdev::lookup("NvmeLossn1").is_none()
    });
    assert!(controller_state("NvmeLoss").is_none());
    assert!(t0.elapsed() >= Duration::from_secs(4));
    rt.shutdown();
}

#[test]
fn no_reconnect_delay_leaves_the_controller_failed() {
    let mut t = MockTarget::start(NQN, 512, 1024);
    let rt = test_runtime(1);
    attach_on(&rt, opts("NvmeNoDelay", &t)).unwrap();
    t.kill();
    let r = write_read(&rt, "NvmeNoDelayn1", 2, 512, 2);
    assert_eq!(r, Err(IoStatus::Failed(libc::EIO)));
    wait_for("failed state", Duration::from_secs(15), || {
        controller_state("NvmeNoDelay").is_some_and(|s| s.2 == "failed")
    });
    assert!(wc_bdev::lookup("NvmeNoDelayn1").is_some());
    run_on(rt.main(), || async { detach("NvmeNoDelay") }).unwrap();
    rt.shutdown();
}

#[test]
fn hostile_target_ends_in_reconnects_or_errors_never_a_hang() {
    wc_bdev_nvme::set_keep_alive_timeout_ms(1000);
    let t = MockTarget::start(NQN, 512, 4096);
    let rt = test_runtime(1);
    let mut o = opts("NvmeHostile", &t);
    o.ddgst = true;
    o.hdgst = true;
    o.ctrlr_loss_timeout_sec = Some(-1);
    o.reconnect_delay_sec = Some(1);
    attach_on(&rt, o).unwrap();
    let resets = || controller_state("NvmeHostile").unwrap().0;

    // A wrong data digest on a read: the connection is dropped, the read
    // is sent again after the reconnect and succeeds.
    t.shared.faults.corrupt_ddgst.store(1, Ordering::SeqCst);
    let r0 = resets();
    assert_eq!(write_read(&rt, "NvmeHostilen1", 10, 4096, 1), Ok(true));
    assert!(resets() > r0, "digest error must reset");

    // A short read reported as success: the read fails (EIO).
    t.shared.faults.short_reads.store(1, Ordering::SeqCst);
    assert_eq!(
        write_read(&rt, "NvmeHostilen1", 20, 4096, 2),
        Err(IoStatus::Failed(libc::EIO))
    );

    // A garbage PDU instead of a response: reconnect and retry.
    let r0 = resets();
    t.shared.faults.garbage.store(1, Ordering::SeqCst);
    assert_eq!(write_read(&rt, "NvmeHostilen1", 30, 2048, 3), Ok(true));
    assert!(resets() > r0, "garbage must reset");

    // Silence: the keep alive times out, the controller resets, the I/O
    // is retried once the target answers again.
    let r0 = resets();
    t.shared.faults.stop_answering.store(true, Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    rt.main().send(move || {
        wc_reactor::current()
            .spawn_local(async move {
                let d = wc_bdev::open("NvmeHostilen1", true, None).unwrap();
                let ch = d.channel().unwrap();
                let r = ch.io_async(IoType::Flush, 0, 0).await;
                let _ = tx.send(r);
            })
            .detach();
    });
    wait_for("keep-alive timeout", Duration::from_secs(6), || {
        resets() > r0
    });
    t.shared
        .faults
        .stop_answering
        .store(false, Ordering::SeqCst);
    t.drop_connections();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Ok(()));
    // Keep Alives go out every half KATO on a healthy connection.
    wait_for("keep alives", Duration::from_secs(3), || {
        t.shared.stats.keep_alives.load(Ordering::Relaxed) >= 2
    });
    run_on(rt.main(), || async { detach("NvmeHostile") }).unwrap();
    wc_bdev_nvme::set_keep_alive_timeout_ms(10_000);
    rt.shutdown();
}

#[test]
fn refused_reconnects_keep_retrying_until_the_target_accepts() {
    let t = MockTarget::start(NQN, 512, 1024);
    let rt = test_runtime(1);
    let mut o = opts("NvmeRefuse", &t);
    o.ctrlr_loss_timeout_sec = Some(-1);
    o.reconnect_delay_sec = Some(1);
    attach_on(&rt, o).unwrap();
    t.shared.faults.refuse.store(true, Ordering::SeqCst);
    t.drop_connections();
    wait_for("a reset", Duration::from_secs(5), || {
        controller_state("NvmeRefuse").unwrap().0 >= 1
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_ne!(controller_state("NvmeRefuse").unwrap().2, "enabled");
    t.shared.faults.refuse.store(false, Ordering::SeqCst);
    wait_for("reconnect", Duration::from_secs(5), || {
        controller_state("NvmeRefuse").unwrap().2 == "enabled"
    });
    assert_eq!(write_read(&rt, "NvmeRefusen1", 3, 512, 1), Ok(true));
    run_on(rt.main(), || async { detach("NvmeRefuse") }).unwrap();
    rt.shutdown();
}
