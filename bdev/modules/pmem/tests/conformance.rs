use std::path::PathBuf;

use serde_json::json;
use wc_bdev::testing::{conformance, pattern, run_on, test_runtime, Expect};
use wc_bdev::{DmaBuf, IoType};
use wc_bdev_pmem::{create, delete, PmemOpts};

/// A path in /dev/shm (or the temp dir), removed on drop.
struct TempPath(PathBuf);

/// The strategy the module picks for a file in `path`'s directory: the
/// store + fence one on a RAM file system, msync elsewhere (no DAX here).
fn expected_strategy(path: &std::path::Path) -> &'static str {
    let dir = path.parent().unwrap_or(path);
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .expect("stat -f runs");
    let fs = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if fs == "tmpfs" || fs == "hugetlbfs" {
        "movnt+sfence"
    } else {
        "msync"
    }
}

impl TempPath {
    fn new(tag: &str) -> TempPath {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        TempPath(dir.join(format!(
            "wc-pmem-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        )))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn opts(name: &str, f: &TempPath, size: Option<u64>, bs: Option<u32>) -> PmemOpts {
    let mut o = PmemOpts::new(name, f.path());
    o.size = size;
    o.block_size = bs;
    o
}

#[test]
fn pmem_passes_conformance_from_two_reactors() {
    let rt = test_runtime(2);
    for bs in [512u32, 4096] {
        let f = TempPath::new(&format!("conf{bs}"));
        let name = format!("PmemConf{bs}");
        let b = create(opts(&name, &f, Some(8 << 20), Some(bs))).unwrap();
        assert_eq!(
            (b.block_size(), b.num_blocks()),
            (bs, (8 << 20) / bs as u64)
        );
        let info = b.info_json();
        assert_eq!(info["product_name"], json!("pmem disk"));
        let drv = &info["driver_specific"]["pmem"];
        assert_eq!(drv["filename"], json!(f.path()));
        assert_eq!(drv["size"], json!(8 << 20));
        // /dev/shm and /tmp have no DAX here; a tmpfs file is RAM-backed
        // (store + fence), a file on a disk file system needs msync.
        assert_eq!(drv["map_sync"], json!(false));
        assert_eq!(drv["strategy"], json!(expected_strategy(&f.0)));
        assert_eq!(
            b.ops().config_entry(&b).unwrap(),
            json!({"method": "bdev_pmem_create",
                   "params": {"name": name, "filename": f.path(), "block_size": bs,
                              "uuid": b.uuid().to_string()}})
        );
        conformance(
            &rt,
            &name,
            Expect {
                stores_data: true,
                unmap_zeroes: true,
            },
        );
        let n = name.clone();
        run_on(rt.main(), move || async move { delete(&n) }).unwrap();
        assert!(wc_bdev::lookup(&name).is_none());
    }
}

#[test]
fn block_and_load_store_views_agree_and_persist() {
    let rt = test_runtime(2);
    let f = TempPath::new("views");
    let b = create(opts("PmemViews", &f, Some(1 << 20), None)).unwrap();
    assert_eq!(b.block_size(), 4096);
    let pm = b.pmem().expect("pmem bdev exposes PersistentMemory");
    assert_eq!(pm.len(), 1 << 20);
    assert_eq!(pm.strategy(), expected_strategy(&f.0));

    // Load/store: write_nt, read back through base().
    let msg = b"written through write_nt, not block I/O";
    pm.write_nt(10_001, msg);
    pm.write_u64(4096 * 3, 0x0123_4567_89ab_cdef);
    pm.fence();
    // SAFETY: base() is valid for len() bytes while `pm` lives.
    let seen = unsafe { std::slice::from_raw_parts(pm.base().add(10_001), msg.len()) };
    assert_eq!(seen, msg);

    // Block I/O sees the stores, and the stores see block I/O.
    let (blk, fua) = run_on(&rt.handles()[1], || async {
        let desc = wc_bdev::open("PmemViews", true, None).unwrap();
        let ch = desc.channel().unwrap();
        let blk = ch.read_async(3, DmaBuf::new(4096)).await.unwrap();
        ch.write_async(7, pattern(7, 1, 4096), true).await.unwrap();
        ch.write_async(8, pattern(8, 1, 4096), false).await.unwrap();
        ch.io_async(IoType::Flush, 0, 0).await.unwrap();
        ch.io_async(IoType::WriteZeroes, 9, 1).await.unwrap();
        (blk[..8].to_vec(), true)
    });
    assert!(fua);
    assert_eq!(blk, 0x0123_4567_89ab_cdef_u64.to_le_bytes());
    let mut got = vec![0u8; 4096];
    pm.read(7 * 4096, &mut got);
    assert!(got == pattern(7, 1, 4096).as_slice());

    // Delete the bdev, then drop the last handle: everything fenced or
    // flushed is in the file.
    run_on(rt.main(), || async { delete("PmemViews") }).unwrap();
    drop(pm);
    drop(b);
    let raw = std::fs::read(f.path()).unwrap();
    assert_eq!(raw.len(), 1 << 20);
    assert_eq!(&raw[10_001..10_001 + msg.len()], msg);
    assert!(raw[7 * 4096..8 * 4096] == *pattern(7, 1, 4096).as_slice());
    assert!(raw[8 * 4096..9 * 4096] == *pattern(8, 1, 4096).as_slice());

    // Re-open the existing file without a size: same data.
    let b = create(opts("PmemViews2", &f, None, None)).unwrap();
    assert_eq!(b.num_blocks(), 256);
    let pm = b.pmem().unwrap();
    let mut got = vec![0u8; msg.len()];
    pm.read(10_001, &mut got);
    assert_eq!(got, msg);
    delete("PmemViews2").unwrap();
}

#[test]
fn size_extends_but_never_shrinks_a_file() {
    let f = TempPath::new("extend");
    std::fs::write(f.path(), vec![7u8; 10_000]).unwrap();
    let b = create(opts("PmemExtend", &f, Some(64 << 10), Some(512))).unwrap();
    assert_eq!(b.num_blocks(), 128);
    let mut head = [0u8; 4];
    b.pmem().unwrap().read(0, &mut head);
    assert_eq!(head, [7; 4]);
    delete("PmemExtend").unwrap();
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 64 << 10);
    // A smaller size maps less, and leaves the file alone.
    let b = create(opts("PmemExtend", &f, Some(8192), Some(4096))).unwrap();
    assert_eq!(b.num_blocks(), 2);
    delete("PmemExtend").unwrap();
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 64 << 10);
}

#[test]
fn accepts_its_parameters_only() {
    let o: PmemOpts = serde_json::from_value(json!({
        "name": "p", "filename": "/dev/shm/x", "block_size": 512, "size": 1048576
    }))
    .unwrap();
    assert_eq!((o.block_size, o.size), (Some(512), Some(1 << 20)));
    let o: PmemOpts = serde_json::from_value(json!({"name": "p", "filename": "/x"})).unwrap();
    assert_eq!((o.block_size, o.size), (None, None));
    assert!(serde_json::from_value::<PmemOpts>(json!({
        "name": "p", "filename": "/x", "pmem_file": "/y"
    }))
    .is_err());
}

#[test]
fn rejects_bad_input() {
    // Missing file and no size to create it with.
    let f = TempPath::new("missing");
    let e = create(opts("PBad", &f, None, None)).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    assert!(!f.0.exists());
    // Size smaller than one block.
    let e = create(opts("PBad", &f, Some(4095), None)).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    let e = create(opts("PBad", &f, Some(0), Some(512))).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    // Existing but empty file without a size.
    std::fs::write(f.path(), b"").unwrap();
    let e = create(opts("PBad", &f, None, None)).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    // An existing file smaller than one block.
    std::fs::write(f.path(), [1u8; 100]).unwrap();
    let e = create(opts("PBad", &f, None, Some(512))).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    // Bad block sizes.
    for bs in [0u32, 256, 1000, 8192, 3 * 512] {
        let e = create(opts("PBad", &f, Some(1 << 20), Some(bs))).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "block size {bs}: {e}");
    }
    // Not a file.
    let e = create(PmemOpts::new("PBad", "/tmp")).unwrap_err();
    assert!(
        e.errno() == libc::EISDIR || e.errno() == libc::EINVAL,
        "{e}"
    );
    let e = create(PmemOpts::new("", f.path())).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(wc_bdev::lookup("PBad").is_none());
    // Duplicate name.
    create(opts("PDup", &f, Some(1 << 20), None)).unwrap();
    let e = create(opts("PDup", &f, Some(1 << 20), None)).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    delete("PDup").unwrap();
    assert!(delete("PDup").is_err());
    assert!(delete("nope").is_err());
}
