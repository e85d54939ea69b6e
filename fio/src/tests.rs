//! The engine's Rust half without fio: framework start, a job on its
//! hosted reactor, writes and reads through queue/getevents/event, bad
//! input. One test: the framework is one per process.

use super::*;
use std::ffi::CString;

fn err_buf() -> Vec<c_char> {
    vec![0; 256]
}

fn msg(b: &[c_char]) -> String {
    // SAFETY: set_err always NUL-terminates inside the buffer.
    unsafe { CStr::from_ptr(b.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn job_writes_and_reads_back_through_its_hosted_reactor() {
    let dir = std::env::temp_dir().join(format!("wc-fio-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let conf = dir.join("bdev.json");
    let cfg = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_malloc_create",
         "params": {"name": "Malloc0", "num_blocks": 2048, "block_size": 512}}]}]});
    std::fs::write(&conf, cfg.to_string()).expect("write config");
    let mut e = err_buf();

    // A missing config is refused with a message, nothing started.
    let missing = CString::new(dir.join("nope.json").display().to_string()).expect("c");
    // SAFETY: valid strings and buffer.
    let rc = unsafe {
        wc_fio_env_start(
            missing.as_ptr(),
            std::ptr::null(),
            1,
            e.as_mut_ptr(),
            e.len(),
        )
    };
    assert_eq!(rc, -1);
    assert!(
        msg(&e).contains("cannot read spdk_json_conf"),
        "{}",
        msg(&e)
    );
    assert!(!env::running());

    let c = CString::new(conf.display().to_string()).expect("c");
    // SAFETY: valid strings and buffer.
    let rc = unsafe { wc_fio_env_start(c.as_ptr(), std::ptr::null(), 2, e.as_mut_ptr(), e.len()) };
    assert_eq!(rc, 0, "{}", msg(&e));

    let (mut bs, mut nb) = (0u32, 0u64);
    let name = CString::new("Malloc0").expect("c");
    // SAFETY: valid pointers.
    let rc =
        unsafe { wc_fio_bdev_geometry(name.as_ptr(), &mut bs, &mut nb, e.as_mut_ptr(), e.len()) };
    assert_eq!((rc, bs, nb), (0, 512, 2048));
    let bad = CString::new("Nvme9n1").expect("c");
    // SAFETY: valid pointers.
    let rc =
        unsafe { wc_fio_bdev_geometry(bad.as_ptr(), &mut bs, &mut nb, e.as_mut_ptr(), e.len()) };
    assert_eq!(rc, -1);
    assert!(msg(&e).contains("does not exist"));

    // The job runs on this thread, as a fio thread would.
    // SAFETY: valid buffer.
    let j = unsafe { wc_fio_job_new(1, 4, 1, e.as_mut_ptr(), e.len()) };
    assert!(!j.is_null(), "{}", msg(&e));
    assert_eq!(
        wc_reactor::current().index(),
        2,
        "job 1 runs reactor 2 (main is 0)"
    );
    // SAFETY: j is live on this thread.
    let t = unsafe { wc_fio_job_open(j, name.as_ptr(), e.as_mut_ptr(), e.len()) };
    assert_eq!(t, 0, "{}", msg(&e));

    let mut w: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let mut r = vec![0u8; 4096];
    let (wtag, rtag) = (0x1000usize, 0x2000usize);
    // SAFETY: the buffers outlive their I/O (we reap before touching them).
    unsafe {
        assert_eq!(
            wc_fio_job_queue(
                j,
                t,
                1,
                w.as_mut_ptr().cast(),
                4096,
                8192,
                wtag as *mut c_void
            ),
            0
        );
        assert_eq!(wc_fio_job_getevents(j, 1, -1), 1);
        let mut en = -1;
        assert_eq!(wc_fio_job_event(j, 0, &mut en) as usize, wtag);
        assert_eq!(en, 0);
        assert_eq!(
            wc_fio_job_queue(
                j,
                t,
                0,
                r.as_mut_ptr().cast(),
                4096,
                8192,
                rtag as *mut c_void
            ),
            0
        );
        assert_eq!(wc_fio_job_getevents(j, 1, -1), 1);
        assert_eq!(wc_fio_job_event(j, 0, &mut en) as usize, rtag);
        assert_eq!(en, 0);
        assert!(wc_fio_job_event(j, 1, &mut en).is_null());
        // Unaligned offsets fail at once; out of range fails on completion.
        assert_eq!(
            wc_fio_job_queue(
                j,
                t,
                0,
                r.as_mut_ptr().cast(),
                4096,
                100,
                rtag as *mut c_void
            ),
            libc::EINVAL
        );
        assert_eq!(
            wc_fio_job_queue(
                j,
                t,
                0,
                r.as_mut_ptr().cast(),
                4096,
                2048 * 512,
                rtag as *mut c_void
            ),
            0
        );
        assert_eq!(wc_fio_job_getevents(j, 1, 1_000_000_000), 1);
        assert_eq!(wc_fio_job_event(j, 0, &mut en) as usize, rtag);
        assert_eq!(en, libc::EINVAL);
        // Every completion ready goes to fio at once (fio's `max` is no
        // bound, as in SPDK's plugin), in completion order.
        let tags = [0x3000usize, 0x4000, 0x5000];
        let mut three = vec![0u8; 3 * 512];
        for (k, &tag) in tags.iter().enumerate() {
            assert_eq!(
                wc_fio_job_queue(
                    j,
                    t,
                    0,
                    three[k * 512..].as_mut_ptr().cast(),
                    512,
                    k as u64 * 512,
                    tag as *mut c_void
                ),
                0
            );
        }
        assert_eq!(wc_fio_job_getevents(j, 3, -1), 3);
        let mut got = Vec::new();
        for i in 0..3 {
            got.push(wc_fio_job_event(j, i, &mut en) as usize);
            assert_eq!(en, 0);
        }
        assert!(wc_fio_job_event(j, 3, &mut en).is_null());
        assert_eq!(got, tags);
        // Handed out once only.
        assert_eq!(wc_fio_job_getevents(j, 0, -1), 0);
        // Nothing in flight: a timed wait returns empty.
        assert_eq!(wc_fio_job_getevents(j, 1, 1_000_000), 0);
    }
    assert_eq!(w, r);
    // SAFETY: j is live, not used afterwards.
    unsafe {
        wc_fio_job_close(j, t);
        wc_fio_job_free(j);
    }
    assert!(wc_reactor::try_current().is_none());
    wc_fio_env_stop();
    assert!(!env::running());
    let _ = std::fs::remove_dir_all(&dir);
}
