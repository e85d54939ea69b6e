use std::path::PathBuf;

use serde_json::json;
use wc_bdev::testing::{conformance, pattern, run_on, test_runtime, Expect};
use wc_bdev::{DmaBuf, IoStatus, IoType, IoVec};
use wc_bdev_uring::{create, delete, UringOpts};

/// A file of `len` bytes in the temp dir (ext4 here: O_DIRECT works),
/// removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, len: u64) -> TempFile {
        let p = std::env::temp_dir().join(format!(
            "wc-uring-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        TempFile(p)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const STORES: Expect = Expect {
    stores_data: true,
    unmap_zeroes: true,
};

#[test]
fn uring_passes_conformance_from_two_reactors() {
    let rt = test_runtime(2);
    for bs in [512u32, 4096] {
        let f = TempFile::new(&format!("conf{bs}"), 8 << 20);
        let name = format!("UringConf{bs}");
        let mut opts = UringOpts::new(&name, f.path());
        opts.block_size = Some(bs);
        let b = create(opts).unwrap();
        assert_eq!(b.block_size(), bs);
        assert_eq!(b.num_blocks(), (8 << 20) / bs as u64);
        assert!(b.required_alignment() > 1, "O_DIRECT needs alignment");
        let info = b.info_json();
        assert_eq!(info["product_name"], json!("URING bdev"));
        assert_eq!(
            info["driver_specific"],
            json!({"uring": {"filename": f.path(), "direct_io": true, "inline_io": false}})
        );
        for t in ["read", "write", "flush", "reset", "unmap", "write_zeroes"] {
            assert_eq!(info["supported_io_types"][t], json!(true), "{t}");
        }
        conformance(&rt, &name, STORES);
        let s = b.io_stats();
        assert!(s.num_write_ops >= 8 && s.num_read_ops >= 8, "{s:?}");
        let entry = b.ops().config_entry(&b).unwrap();
        assert_eq!(entry["method"], json!("bdev_uring_create"));
        assert_eq!(
            entry["params"],
            json!({"name": name, "filename": f.path(), "block_size": bs,
                   "uuid": b.uuid().to_string()})
        );
        let n = name.clone();
        run_on(rt.main(), move || async move { delete(&n) }).unwrap();
        assert!(wc_bdev::lookup(&name).is_none());
    }
}

#[test]
fn conformance_on_tmpfs() {
    // /dev/shm: tmpfs, served inline (one system call per request), no
    // ZERO_RANGE (WRITE_ZEROES falls back to punching).
    let dir = std::path::Path::new("/dev/shm");
    if !dir.is_dir() {
        return;
    }
    let p = dir.join(format!("wc-uring-shm-{}", std::process::id()));
    std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    let path = p.to_str().unwrap().to_string();
    let rt = test_runtime(2);
    let b = create(UringOpts::new("UringShm", &path)).unwrap();
    // Opened buffered even though tmpfs accepts O_DIRECT since Linux 6.6.
    assert_eq!(
        b.info_json()["driver_specific"],
        json!({"uring": {"filename": path, "direct_io": false, "inline_io": true}})
    );
    assert_eq!(b.required_alignment(), 1);
    conformance(&rt, "UringShm", STORES);
    // Scatter-gather lists longer than one pwritev/preadv takes (IOV_MAX
    // 1024), with segments that do not line up between write and read.
    let (wseg, rseg, blocks) = (512usize, 384usize, 1536u64);
    let len = blocks as usize * 512;
    let data = pattern(9, 4, len);
    let got = run_on(rt.main(), move || async move {
        let desc = wc_bdev::open("UringShm", true, None).unwrap();
        let ch = desc.channel().unwrap();
        let wiovs: Vec<IoVec> = (0..len / wseg)
            .map(|i| IoVec {
                // SAFETY: i * wseg < len, inside `data`, which outlives the I/O.
                base: unsafe { data.as_ptr().add(i * wseg) }.cast_mut(),
                len: wseg,
            })
            .collect();
        let (cb, rx) = completion();
        // SAFETY: `data` stays alive and unchanged until the completion.
        unsafe { ch.writev(100, blocks, &wiovs, false, &cb, 0) };
        assert_eq!(rx.await.unwrap(), IoStatus::Success);
        let mut back = DmaBuf::new(len);
        let riovs: Vec<IoVec> = (0..len / rseg)
            .map(|i| IoVec {
                // SAFETY: i * rseg < len, inside `back`, which outlives the I/O.
                base: unsafe { back.as_mut_ptr().add(i * rseg) },
                len: rseg,
            })
            .collect();
        let (cb, rx) = completion();
        // SAFETY: `back` stays alive and unaliased until the completion.
        unsafe { ch.readv(100, blocks, &riovs, &cb, 0) };
        assert_eq!(rx.await.unwrap(), IoStatus::Success);
        drop(ch);
        drop(desc);
        delete("UringShm").unwrap();
        (back, data)
    });
    assert!(got.0.as_slice() == got.1.as_slice());
    // The file itself holds the data.
    let raw = std::fs::read(&p).unwrap();
    assert!(&raw[100 * 512..100 * 512 + len] == got.1.as_slice());
    let _ = std::fs::remove_file(p);
}

/// A completion callback and the receiver of its status.
fn completion() -> (
    std::rc::Rc<dyn wc_bdev::IoCompletion>,
    futures::channel::oneshot::Receiver<IoStatus>,
) {
    let (tx, rx) = futures::channel::oneshot::channel();
    let tx = std::cell::RefCell::new(Some(tx));
    let cb: std::rc::Rc<dyn wc_bdev::IoCompletion> =
        std::rc::Rc::new(wc_bdev::FnCompletion(move |io: wc_bdev::Io, _| {
            if let Some(tx) = tx.borrow_mut().take() {
                let _ = tx.send(io.status());
            }
        }));
    (cb, rx)
}

#[test]
fn data_survives_delete_and_recreate() {
    let rt = test_runtime(2);
    let f = TempFile::new("persist", 4 << 20);
    let mut opts = UringOpts::new("UringPersist", f.path());
    opts.block_size = Some(4096);
    create(opts.clone()).unwrap();
    run_on(rt.main(), || async {
        let desc = wc_bdev::open("UringPersist", true, None).unwrap();
        let ch = desc.channel().unwrap();
        for lba in [0u64, 5, 1023] {
            ch.write_async(lba, pattern(lba, 7, 4096), lba == 5)
                .await
                .unwrap();
        }
        // A big multi-block write, and a FLUSH.
        ch.write_async(100, pattern(100, 7, 64 * 4096), false)
            .await
            .unwrap();
        ch.io_async(IoType::Flush, 0, 0).await.unwrap();
        drop(ch);
        drop(desc);
        delete("UringPersist")
    })
    .unwrap();
    // The file itself holds the data.
    let raw = std::fs::read(f.path()).unwrap();
    assert_eq!(&raw[5 * 4096..6 * 4096], pattern(5, 7, 4096).as_slice());
    create(opts).unwrap();
    run_on(rt.main(), || async {
        let desc = wc_bdev::open("UringPersist", false, None).unwrap();
        let ch = desc.channel().unwrap();
        for lba in [0u64, 5, 1023] {
            let got = ch.read_async(lba, DmaBuf::new(4096)).await.unwrap();
            assert!(
                got.as_slice() == pattern(lba, 7, 4096).as_slice(),
                "lba {lba}"
            );
        }
        let got = ch.read_async(100, DmaBuf::new(64 * 4096)).await.unwrap();
        assert!(got.as_slice() == pattern(100, 7, 64 * 4096).as_slice());
        drop(ch);
        drop(desc);
        delete("UringPersist")
    })
    .unwrap();
}

#[test]
fn many_concurrent_ios_overflow_the_ring() {
    // More requests than the ring holds at once: the overflow queue takes
    // the rest, and everything completes with the right data.
    let rt = test_runtime(1);
    let f = TempFile::new("deep", 8 << 20);
    create(UringOpts::new("UringDeep", f.path())).unwrap();
    run_on(rt.main(), || async {
        let desc = wc_bdev::open("UringDeep", true, None).unwrap();
        let ch = desc.channel().unwrap();
        let writes: Vec<_> = (0..1000u64)
            .map(|lba| ch.write_async(lba * 3, pattern(lba, 3, 512), false))
            .collect();
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        let reads: Vec<_> = (0..1000u64)
            .map(|lba| ch.read_async(lba * 3, DmaBuf::new(512)))
            .collect();
        for (lba, r) in futures::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            assert!(r.unwrap().as_slice() == pattern(lba as u64, 3, 512).as_slice());
        }
        drop(ch);
        drop(desc);
        delete("UringDeep")
    })
    .unwrap();
}

#[test]
fn shrunk_file_gives_eio_not_a_hang() {
    // Reads past a file that shrank under the bdev: a short read (resubmitted)
    // then end of file, which fails with EIO.
    let rt = test_runtime(1);
    let f = TempFile::new("shrink", 1 << 20);
    let mut opts = UringOpts::new("UringShrink", f.path());
    opts.block_size = Some(4096);
    create(opts).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(f.path())
        .unwrap()
        .set_len((512 << 10) + 512)
        .unwrap();
    let st = run_on(rt.main(), || async {
        let desc = wc_bdev::open("UringShrink", true, None).unwrap();
        let ch = desc.channel().unwrap();
        let straddle = ch.read_async(128, DmaBuf::new(4096)).await.err();
        let beyond = ch.read_async(200, DmaBuf::new(4096)).await.err();
        let inside = ch.read_async(0, DmaBuf::new(4096)).await.is_ok();
        drop(ch);
        drop(desc);
        delete("UringShrink").unwrap();
        (straddle, beyond, inside)
    });
    assert_eq!(st.0, Some(IoStatus::Failed(libc::EIO)));
    assert_eq!(st.1, Some(IoStatus::Failed(libc::EIO)));
    assert!(st.2);
}

#[test]
fn readonly_refuses_writes() {
    let rt = test_runtime(1);
    let f = TempFile::new("ro", 1 << 20);
    let mut opts = UringOpts::new("UringRo", f.path());
    opts.readonly = Some(true);
    let b = create(opts).unwrap();
    assert!(!b.io_type_supported(IoType::Write));
    assert!(!b.io_type_supported(IoType::Unmap));
    let st = run_on(rt.main(), || async {
        let desc = wc_bdev::open("UringRo", true, None).unwrap();
        let ch = desc.channel().unwrap();
        let w = ch.write_async(0, DmaBuf::new(512), false).await.err();
        let r = ch.read_async(0, DmaBuf::new(512)).await.is_ok();
        drop(ch);
        drop(desc);
        delete("UringRo").unwrap();
        (w, r)
    });
    assert_eq!(st, (Some(IoStatus::Failed(libc::ENOTSUP)), true));
}

#[test]
fn accepts_spdk_parameters() {
    // bdev_aio_create as rpc.py sends it.
    let o: UringOpts = serde_json::from_value(json!({
        "name": "a", "filename": "/x", "block_size": 4096,
        "readonly": false, "fallocate": false, "nowait": false,
        "uuid": "8a3c7f1e-3b4d-4d2e-9f00-0123456789ab"
    }))
    .unwrap();
    assert_eq!(o.block_size, Some(4096));
    assert_eq!(o.readonly, Some(false));
    // bdev_uring_create.
    let o: UringOpts = serde_json::from_value(json!({"name": "u", "filename": "/y"})).unwrap();
    assert_eq!((o.block_size, o.uuid), (None, None));
    assert!(serde_json::from_value::<UringOpts>(json!({
        "name": "u", "filename": "/y", "bogus": 1
    }))
    .is_err());
    assert!(serde_json::from_value::<UringOpts>(json!({"name": "u"})).is_err());
}

#[test]
fn rejects_bad_files_and_geometry() {
    let missing = create(UringOpts::new("UBadMissing", "/nonexistent/wc-uring-file"));
    assert_eq!(missing.unwrap_err().errno(), libc::ENOENT);

    let tiny = TempFile::new("tiny", 100);
    let e = create(UringOpts::new("UBadTiny", tiny.path())).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");

    let small = TempFile::new("small", 2048);
    let mut o = UringOpts::new("UBadSmall", small.path());
    o.block_size = Some(4096);
    assert_eq!(create(o).unwrap_err().errno(), libc::EINVAL);

    let f = TempFile::new("geom", 1 << 20);
    for bad in [1000u32, 3 * 512, 256] {
        let mut o = UringOpts::new("UBadBs", f.path());
        o.block_size = Some(bad);
        let e = create(o).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "block_size {bad}: {e}");
    }
    assert!(wc_bdev::lookup("UBadBs").is_none());

    let e = create(UringOpts::new("", f.path())).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);

    let dir = create(UringOpts::new("UBadDir", "/tmp")).unwrap_err();
    assert!(
        dir.errno() == libc::EINVAL || dir.errno() == libc::EISDIR,
        "{dir}"
    );

    create(UringOpts::new("UDup", f.path())).unwrap();
    let e = create(UringOpts::new("UDup", f.path())).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    delete("UDup").unwrap();
    assert!(delete("UDup").is_err());
    assert!(delete("nope").is_err());
}
