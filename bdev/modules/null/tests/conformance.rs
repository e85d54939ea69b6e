use wc_bdev::testing::{conformance, test_runtime, Expect};

#[test]
fn null_passes_conformance_from_two_reactors() {
    let rt = test_runtime(2);
    wc_bdev_null::create(wc_bdev_null::NullOpts::new("NullConf", 1 << 20, 512)).unwrap();
    conformance(
        &rt,
        "NullConf",
        Expect {
            stores_data: false,
            unmap_zeroes: false,
        },
    );
    wc_bdev_null::delete("NullConf").unwrap();
}
