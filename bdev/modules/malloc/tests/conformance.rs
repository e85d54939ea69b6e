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
