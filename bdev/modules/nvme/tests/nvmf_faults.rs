//! Our initiator against our target (`wc-nvmf`) in one process, with a
//! fault proxy (tests/fault_proxy) between them: dropped connections
//! reconnect and the queued I/O completes; corrupted header and data
//! bytes are caught by the digests (an error or a reconnect, never
//! silent bad data), and without digests by the header checks the
//! initiator makes; a C2HData cut short ends in a reconnect; a stalled
//! target runs into the configured timeouts (fast I/O fail, controller
//! loss), the reactor answering throughout. And namespace changes at
//! runtime: the target's namespace attribute notice makes the initiator
//! add and hot-remove `<name>n<nsid>` bdevs. Data is checked end to end
//! (pattern written through the initiator, read back through it and
//! from the exported bdev itself).
//!
//! The tests run one at a time (`serial()`): the I/O timeout and the
//! keep-alive timeout are process-wide options.

mod common;
mod fault_proxy;

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::{attach_on, wait_for};
use fault_proxy::{pdu, Dir, Fault, Proxy};
use wc_bdev::testing::{pattern, run_on, test_runtime};
use wc_bdev::{DmaBuf, IoStatus, IoType};
use wc_bdev_nvme::{attach, controller_namespaces, controller_state, detach, AttachOpts};
use wc_reactor::Runtime;

const BS: u32 = 512;

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| test_runtime(2))
}

fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

fn on_main<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    rt().main().call_blocking(f).expect("main reactor runs")
}

/// A malloc bdev `bdev` of `blocks` blocks exported as `nqn`.
fn export(nqn: &str, bdev: &str, blocks: u64) -> SocketAddr {
    let (nqn, bdev) = (nqn.to_string(), bdev.to_string());
    on_main(move || {
        wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(&bdev, blocks, BS)).unwrap();
        wc_nvmf::testing::export_bdev(&nqn, &bdev, true)
    })
}

/// Attach options through `port` that reconnect every second for ever.
fn opts(name: &str, port: u16, nqn: &str, digests: bool) -> AttachOpts {
    let mut o = AttachOpts::tcp(name, "127.0.0.1", port, nqn);
    o.hdgst = digests;
    o.ddgst = digests;
    o.ctrlr_loss_timeout_sec = Some(-1);
    o.reconnect_delay_sec = Some(1);
    o.fabrics_connect_timeout_us = Some(2_000_000);
    o
}

fn attach_ok(o: AttachOpts) -> Vec<String> {
    attach_on(rt(), o).expect("attach")
}

fn detach_ok(name: &'static str) {
    run_on(rt().main(), move || async move { detach(name) }).expect("detach");
}

fn resets(name: &str) -> u64 {
    controller_state(name).map(|s| s.0).unwrap_or(0)
}

/// Writes the pattern of (`lba`, `round`) over `len` bytes of `bdev` from
/// reactor `r`.
fn write(bdev: &str, r: usize, lba: u64, len: usize, round: u64) -> Result<(), IoStatus> {
    let bdev = bdev.to_string();
    run_on(&rt().handles()[r], move || async move {
        let d = wc_bdev::open(&bdev, true, None).map_err(|_| IoStatus::Failed(libc::ENODEV))?;
        let ch = d.channel().map_err(|_| IoStatus::Failed(libc::ENODEV))?;
        ch.write_async(lba, pattern(lba, round, len), false).await?;
        Ok(())
    })
}

/// Reads `len` bytes at `lba` of `bdev` from reactor `r`.
fn read(bdev: &str, r: usize, lba: u64, len: usize) -> Result<Vec<u8>, IoStatus> {
    let bdev = bdev.to_string();
    run_on(&rt().handles()[r], move || async move {
        let d = wc_bdev::open(&bdev, false, None).map_err(|_| IoStatus::Failed(libc::ENODEV))?;
        let ch = d.channel().map_err(|_| IoStatus::Failed(libc::ENODEV))?;
        let b = ch.read_async(lba, DmaBuf::new(len)).await?;
        Ok(b.as_slice().to_vec())
    })
}

fn flush(bdev: &str) -> Result<(), IoStatus> {
    let bdev = bdev.to_string();
    run_on(rt().main(), move || async move {
        let d = wc_bdev::open(&bdev, true, None).map_err(|_| IoStatus::Failed(libc::ENODEV))?;
        let ch = d.channel().map_err(|_| IoStatus::Failed(libc::ENODEV))?;
        ch.io_async(IoType::Flush, 0, 1).await
    })
}

fn expected(lba: u64, round: u64, len: usize) -> Vec<u8> {
    pattern(lba, round, len).as_slice().to_vec()
}

/// The data is on the exported bdev (read there directly) and reads back
/// the same through the initiator.
fn assert_end_to_end(local: &str, remote: &str, lba: u64, len: usize, round: u64) {
    let want = expected(lba, round, len);
    assert!(
        read(local, 0, lba, len).unwrap() == want,
        "exported bdev at {lba}"
    );
    assert!(
        read(remote, 1, lba, len).unwrap() == want,
        "initiator read at {lba}"
    );
}

fn cleanup(ctrlr: &'static str, nqn: &str, bdev: &str) {
    if controller_state(ctrlr).is_some() {
        detach_ok(ctrlr);
    }
    let (nqn, bdev) = (nqn.to_string(), bdev.to_string());
    on_main(move || {
        let _ = wc_nvmf::target::delete_subsystem(&nqn);
        let _ = wc_bdev_malloc::delete(&bdev);
    });
}

#[test]
fn dropped_connections_reconnect_and_queued_io_completes() {
    let _s = serial();
    let nqn = "nqn.2026-12.io.writecache:drop";
    let target = export(nqn, "FaultDrop", 8192);
    let proxy = Proxy::start(target);
    attach_ok(opts("FDrop", proxy.port(), nqn, true));
    let bdev = "FDropn1";
    // I/O from both reactors while the connections drop under it, three
    // times: every I/O completes, every byte reads back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut round = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Acquire) {
            round += 1;
            let lba = (round * 37) % 4000;
            let r = (round % 2) as usize;
            write(bdev, r, lba, 16 * 1024, round).expect("write completes after reconnects");
            let got = read(bdev, 1 - r, lba, 16 * 1024).expect("read completes");
            assert!(got == expected(lba, round, 16 * 1024), "round {round}");
        }
        round
    });
    for i in 1..=3 {
        std::thread::sleep(Duration::from_millis(200));
        proxy.drop_connections();
        wait_for("the reconnect", Duration::from_secs(10), || {
            resets("FDrop") >= i && controller_state("FDrop").is_some_and(|s| s.2 == "enabled")
        });
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let rounds = writer
        .join()
        .expect("the I/O thread saw every I/O complete");
    assert!(rounds > 3, "I/O ran across the drops ({rounds} rounds)");
    assert!(resets("FDrop") >= 3, "each drop reset the controller");
    // Drop while idle, then queue I/O before the reconnect is done.
    proxy.drop_connections();
    write(bdev, 0, 100, 64 * 1024, 99).expect("queued write");
    flush(bdev).expect("flush");
    assert_end_to_end("FaultDrop", bdev, 100, 64 * 1024, 99);
    cleanup("FDrop", nqn, "FaultDrop");
}

/// Runs I/O under a one-shot fault: a write (round) then a read back.
/// With the fault fired, each I/O either fails or is right; returns
/// whether any failed.
fn io_under(proxy: &Proxy, f: Fault, bdev: &str, lba: u64, len: usize, round: u64) -> bool {
    let hits = proxy.hits();
    proxy.set(f);
    let w = write(bdev, 0, lba, len, round);
    let r = read(bdev, 1, lba, len);
    proxy.set(Fault::None);
    assert_eq!(proxy.hits(), hits + 1, "{f:?} fired once");
    if let Ok(got) = &r {
        if w.is_ok() {
            assert!(*got == expected(lba, round, len), "{f:?}: silent bad data");
        }
    }
    w.is_err() || r.is_err()
}

#[test]
fn corruption_with_digests_is_detected_never_silent() {
    let _s = serial();
    let nqn = "nqn.2026-12.io.writecache:dgst";
    let target = export(nqn, "FaultDgst", 8192);
    let proxy = Proxy::start(target);
    attach_ok(opts("FDgst", proxy.port(), nqn, true));
    let bdev = "FDgstn1";
    let faults = [
        // Target to host: a C2HData's offset, a C2HData's data, a
        // completion's result dword (harmless to a read if it got
        // through: only the header digest tells).
        Fault::FlipHeader {
            dir: Dir::ToHost,
            pdu: pdu::C2H_DATA,
            at: 12,
        },
        Fault::FlipData {
            dir: Dir::ToHost,
            pdu: pdu::C2H_DATA,
        },
        Fault::FlipHeader {
            dir: Dir::ToHost,
            pdu: pdu::CAPSULE_RESP,
            at: 8,
        },
        // Host to target: in-capsule write data (4 KiB), H2CData of an
        // R2T write (64 KiB), a command's starting LBA.
        Fault::FlipData {
            dir: Dir::ToTarget,
            pdu: pdu::CAPSULE_CMD,
        },
        Fault::FlipData {
            dir: Dir::ToTarget,
            pdu: pdu::H2C_DATA,
        },
        Fault::FlipHeader {
            dir: Dir::ToTarget,
            pdu: pdu::CAPSULE_CMD,
            at: 8 + 40,
        },
    ];
    for (i, f) in faults.into_iter().enumerate() {
        let before = resets("FDgst");
        let len = if matches!(
            f,
            Fault::FlipData {
                pdu: pdu::H2C_DATA,
                ..
            }
        ) {
            64 * 1024
        } else {
            4096
        };
        let lba = 200 * i as u64;
        let failed = io_under(&proxy, f, bdev, lba, len, i as u64 + 1);
        // Detected: the controller reset (the I/O was then sent again)
        // or the I/O failed.
        assert!(
            failed || resets("FDgst") > before,
            "{f:?}: corruption went unnoticed"
        );
        // Afterwards everything works and the data is where it belongs.
        write(bdev, 0, lba, len, 100 + i as u64).expect("write after the fault");
        assert_end_to_end("FaultDgst", bdev, lba, len, 100 + i as u64);
    }
    cleanup("FDgst", nqn, "FaultDgst");
}

#[test]
fn without_digests_header_checks_catch_bad_fields_and_data_flips_pass() {
    let _s = serial();
    let nqn = "nqn.2026-12.io.writecache:nodgst";
    let target = export(nqn, "FaultPlain", 8192);
    let proxy = Proxy::start(target);
    attach_ok(opts("FPlain", proxy.port(), nqn, false));
    let bdev = "FPlainn1";
    // A C2HData at the wrong offset and a completion for an unknown
    // command: protocol errors, the controller resets, the read is sent
    // again and is right.
    for (i, f) in [
        Fault::FlipHeader {
            dir: Dir::ToHost,
            pdu: pdu::C2H_DATA,
            at: 12,
        },
        Fault::FlipHeader {
            dir: Dir::ToHost,
            pdu: pdu::CAPSULE_RESP,
            at: 20,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let before = resets("FPlain");
        let failed = io_under(&proxy, f, bdev, 64 * i as u64, 4096, i as u64 + 1);
        assert!(failed || resets("FPlain") > before, "{f:?} unnoticed");
    }
    // A flipped data byte without a data digest is not detectable: it
    // reaches the reader (why hdgst/ddgst exist).
    write(bdev, 0, 500, 4096, 7).unwrap();
    proxy.set(Fault::FlipData {
        dir: Dir::ToHost,
        pdu: pdu::C2H_DATA,
    });
    let got = read(bdev, 1, 500, 4096).unwrap();
    proxy.set(Fault::None);
    let want = expected(500, 7, 4096);
    let diff: Vec<usize> = (0..4096).filter(|&i| got[i] != want[i]).collect();
    assert_eq!(diff, vec![0], "exactly the flipped byte differs");
    assert_end_to_end("FaultPlain", bdev, 500, 4096, 7);
    cleanup("FPlain", nqn, "FaultPlain");
}

#[test]
fn truncated_c2hdata_ends_in_a_reconnect_and_the_read_is_retried() {
    let _s = serial();
    let nqn = "nqn.2026-12.io.writecache:trunc";
    let target = export(nqn, "FaultTrunc", 8192);
    let proxy = Proxy::start(target);
    for (name, digests) in [("FTrunc", true), ("FTrunc2", false)] {
        attach_ok(opts(name, proxy.port(), nqn, digests));
        let bdev = format!("{name}n1");
        write(&bdev, 0, 300, 32 * 1024, 3).unwrap();
        let before = resets(name);
        proxy.set(Fault::Truncate {
            dir: Dir::ToHost,
            pdu: pdu::C2H_DATA,
        });
        let got = read(&bdev, 1, 300, 32 * 1024);
        proxy.set(Fault::None);
        assert!(proxy.hits() >= 1);
        match got {
            Ok(g) => assert!(g == expected(300, 3, 32 * 1024), "silent short read"),
            Err(e) => panic!("the read should be retried after the reconnect: {e:?}"),
        }
        assert!(
            resets(name) > before,
            "the cut connection reset the controller"
        );
        let name: &'static str = if digests { "FTrunc" } else { "FTrunc2" };
        detach_ok(name);
    }
    cleanup("FTrunc", nqn, "FaultTrunc");
}

#[test]
fn stalled_target_runs_into_fast_io_fail_then_controller_loss() {
    let _s = serial();
    let nqn = "nqn.2026-12.io.writecache:stall";
    let target = export(nqn, "FaultStall", 8192);
    let proxy = Proxy::start(target);
    wc_bdev_nvme::set_keep_alive_timeout_ms(1000);
    wc_bdev_nvme::set_io_timeout_ms(1000);
    let mut o = opts("FStall", proxy.port(), nqn, false);
    o.ctrlr_loss_timeout_sec = Some(5);
    o.reconnect_delay_sec = Some(1);
    o.fast_io_fail_timeout_sec = Some(2);
    o.fabrics_connect_timeout_us = Some(500_000);
    attach_ok(o);
    wc_bdev_nvme::set_keep_alive_timeout_ms(10_000);
    let bdev = "FStalln1";
    write(bdev, 0, 10, 4096, 1).unwrap();
    proxy.set(Fault::Stall);
    let t0 = Instant::now();
    // The read waits: first for the I/O timeout (1 s) or the keep-alive
    // (1 s) to notice, then fast_io_fail_timeout_sec (2 s) of reconnects.
    let r = std::thread::spawn(move || read(bdev, 1, 10, 4096));
    // The reactors keep answering meanwhile.
    for _ in 0..10 {
        let q = Instant::now();
        on_main(|| ());
        assert!(q.elapsed() < Duration::from_millis(500), "a reactor hangs");
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = r.join().unwrap();
    let took = t0.elapsed();
    assert_eq!(got, Err(IoStatus::Failed(libc::EIO)), "after {took:?}");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "failed after {took:?}"
    );
    let st = controller_state("FStall").expect("still there before the loss timeout");
    assert!(st.0 >= 1 && st.2 != "enabled", "{st:?}");
    // ctrlr_loss_timeout_sec (5 s): deleted, its bdev hot-removed.
    wait_for("the controller loss", Duration::from_secs(10), || {
        controller_state("FStall").is_none()
    });
    assert!(t0.elapsed() >= Duration::from_secs(5));
    assert!(wc_bdev::lookup(bdev).is_none());
    wc_bdev_nvme::set_io_timeout_ms(30_000);
    proxy.set(Fault::None);
    drop(proxy);
    cleanup("FStall", nqn, "FaultStall");
}

#[test]
fn namespace_changes_on_the_target_add_and_remove_bdevs() {
    let _s = serial();
    let nqn = "nqn.2026-12.io.writecache:nschg";
    let target = export(nqn, "NsChg1", 4096);
    // nvmf_subsystem_add_ns the moment the attach returns, before the
    // initiator's event task has run: a notice all the same (notices are
    // on before the namespaces are read), a new bdev FNsn3.
    let o = opts("FNs", target.port(), nqn, false);
    let names = run_on(rt().main(), move || async move {
        let names = attach(o).await;
        wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("NsChg3", 2048, BS)).unwrap();
        wc_nvmf::testing::add_namespace("nqn.2026-12.io.writecache:nschg", "NsChg3", Some(3));
        names
    })
    .expect("attach");
    assert_eq!(names, vec!["FNsn1"]);
    wait_for("FNsn3", Duration::from_secs(10), || {
        wc_bdev::lookup("FNsn3").is_some()
    });
    let b = wc_bdev::lookup("FNsn3").unwrap();
    assert_eq!((b.block_size(), b.num_blocks()), (BS, 2048));
    write("FNsn3", 1, 7, 8192, 5).unwrap();
    assert_end_to_end("NsChg3", "FNsn3", 7, 8192, 5);
    // nvmf_subsystem_remove_ns 1: FNsn1 goes, the controller stays.
    on_main(|| wc_nvmf::target::remove_ns("nqn.2026-12.io.writecache:nschg", 1).unwrap());
    wait_for("FNsn1 to go", Duration::from_secs(10), || {
        wc_bdev::lookup("FNsn1").is_none()
    });
    let (notices, names) = controller_namespaces("FNs").expect("the controller stays");
    assert!(notices >= 2, "{notices}");
    assert_eq!(names, vec!["FNsn3"]);
    assert_end_to_end("NsChg3", "FNsn3", 7, 8192, 5);
    // The last namespace goes too: a controller without namespaces stays
    // attached and picks up the next one.
    on_main(|| wc_nvmf::target::remove_ns("nqn.2026-12.io.writecache:nschg", 3).unwrap());
    wait_for("FNsn3 to go", Duration::from_secs(10), || {
        wc_bdev::lookup("FNsn3").is_none()
    });
    assert!(controller_state("FNs").is_some());
    on_main(|| {
        wc_nvmf::testing::add_namespace("nqn.2026-12.io.writecache:nschg", "NsChg1", Some(1))
    });
    wait_for("FNsn1 back", Duration::from_secs(10), || {
        wc_bdev::lookup("FNsn1").is_some()
    });
    assert_eq!(controller_state("FNs").unwrap().2, "enabled");
    detach_ok("FNs");
    assert!(wc_bdev::lookup("FNsn1").is_none());
    on_main(|| {
        let _ = wc_nvmf::target::delete_subsystem("nqn.2026-12.io.writecache:nschg");
        let _ = wc_bdev_malloc::delete("NsChg1");
        let _ = wc_bdev_malloc::delete("NsChg3");
    });
}
