use wc_bdev::testing::{conformance, run_on, test_runtime, Expect};

#[test]
fn malloc_passes_conformance_from_two_reactors() {
    let rt = test_runtime(2);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("MallocConf", 4096, 512)).unwrap();
    conformance(
        &rt,
        "MallocConf",
        Expect {
            stores_data: true,
            unmap_zeroes: true,
        },
    );
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("MallocConf4k", 256, 4096)).unwrap();
    conformance(
        &rt,
        "MallocConf4k",
        Expect {
            stores_data: true,
            unmap_zeroes: true,
        },
    );
    // Stats saw the traffic.
    let s = wc_bdev::lookup("MallocConf").unwrap().io_stats();
    assert!(s.num_write_ops >= 8 && s.num_read_ops >= 8, "{s:?}");
    wc_bdev_malloc::delete("MallocConf").unwrap();
    assert!(wc_bdev::lookup("MallocConf").is_none());
    run_on(rt.main(), || async {});
}

#[test]
fn malloc_rejects_bad_geometry_and_duplicates() {
    use wc_bdev_malloc::{create, MallocOpts};
    assert!(create(MallocOpts::new("MBad", 0, 512)).is_err());
    assert!(create(MallocOpts::new("MBad", 8, 100)).is_err());
    assert!(create(MallocOpts::new("MBad", u64::MAX, 4096)).is_err());
    create(MallocOpts::new("MDup", 8, 512)).unwrap();
    let e = create(MallocOpts::new("MDup", 8, 512)).unwrap_err();
    assert_eq!(e.errno(), 17);
    assert!(wc_bdev_malloc::delete("nope").is_err());
}

/// More I/O at once than a reactor's descriptor pool holds: the extra
/// submissions wait for free descriptors (SPDK's io_wait) and none fails.
#[test]
fn a_dry_io_pool_queues_instead_of_failing() {
    use std::cell::Cell;
    use std::rc::Rc;
    let rt = test_runtime(1);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("MallocPool", 64, 512)).unwrap();
    let n = wc_bdev::IO_POOL_SIZE + 4000;
    let (ok, failed) = run_on(rt.main(), move || async move {
        let d = wc_bdev::open("MallocPool", true, None).unwrap();
        let ch = d.channel().unwrap();
        let ok = Rc::new(Cell::new(0usize));
        let failed = Rc::new(Cell::new(0usize));
        let (o, f) = (ok.clone(), failed.clone());
        let cb: Rc<dyn wc_bdev::IoCompletion> =
            Rc::new(wc_bdev::FnCompletion(move |io: wc_bdev::Io, _| {
                if io.status().is_success() {
                    o.set(o.get() + 1);
                } else {
                    f.set(f.get() + 1);
                }
            }));
        // All submitted in one go, before any completion can run.
        for i in 0..n {
            ch.read(i as u64 % 64, wc_bdev::DmaBuf::new(512), &cb, 0);
        }
        let mut spins = 0;
        while ok.get() + failed.get() < n && spins < 1_000_000 {
            futures_yield().await;
            spins += 1;
        }
        (ok.get(), failed.get())
    });
    assert_eq!((ok, failed), (n, 0));
}

/// Yields once to the reactor (lets pollers run).
async fn futures_yield() {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}
