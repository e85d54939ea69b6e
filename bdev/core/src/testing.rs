//! Test support (feature `testing`): run futures on reactors, and the one
//! conformance suite every bdev module runs against itself.

use std::future::Future;
use std::rc::Rc;

use wc_reactor::{CoreMask, IdleMode, ReactorHandle, Runtime, RuntimeConfig};

use crate::{open, BdevChannel, DmaBuf, IoStatus, IoType, IoVec};

/// A small unpinned runtime in sleep mode (tests share 2 cores).
pub fn test_runtime(reactors: usize) -> Runtime {
    let mut cfg = RuntimeConfig::new(CoreMask::from_cores(0..reactors as u32));
    cfg.pin = false;
    cfg.idle = IdleMode::sleep();
    Runtime::start(cfg).expect("test runtime starts")
}

/// Runs the future built by `make` on reactor `h` and blocks until it
/// resolves.
pub fn run_on<T, F, Fut>(h: &ReactorHandle, make: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    h.send(move || {
        wc_reactor::current()
            .spawn_local(async move {
                let _ = tx.send(make().await);
            })
            .detach();
    });
    rx.recv().expect("reactor ran the future")
}

/// Deterministic pattern for block `lba` written in `round`.
pub fn pattern(lba: u64, round: u64, len: usize) -> DmaBuf {
    let mut b = DmaBuf::new(len);
    let mut x =
        lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 1;
    for chunk in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    b
}

/// What the suite may assume about the bdev's data.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Reads return what was written (false for `null`).
    pub stores_data: bool,
    /// UNMAP makes blocks read as zeroes.
    pub unmap_zeroes: bool,
}

/// The conformance suite: every reactor of `rt` runs the checks at once on
/// its own slice of the bdev. Panics with a precise message on failure.
pub fn conformance(rt: &Runtime, bdev_name: &str, expect: Expect) {
    let n = rt.handles().len() as u64;
    let handles: Vec<ReactorHandle> = rt.handles().to_vec();
    let threads: Vec<_> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let name = bdev_name.to_string();
            std::thread::spawn(move || {
                run_on(&h, move || async move {
                    let desc = open(&name, true, None).expect("open");
                    let ch = desc.channel().expect("channel");
                    suite_on_slice(&ch, i as u64, n, expect).await;
                })
            })
        })
        .collect();
    for t in threads {
        if let Err(e) = t.join() {
            std::panic::resume_unwind(e);
        }
    }
}

async fn suite_on_slice(ch: &Rc<BdevChannel>, slice: u64, slices: u64, expect: Expect) {
    let bdev = ch.bdev().clone();
    let bs = bdev.block_size() as usize;
    let per = bdev.num_blocks() / slices;
    assert!(
        per >= 16,
        "bdev too small for the suite: {} blocks",
        bdev.num_blocks()
    );
    let first = slice * per;

    // Plain write + read back, 1 and 4 blocks.
    for (lba, nblk) in [(first, 1u64), (first + 2, 4)] {
        let data = pattern(lba, 1, bs * nblk as usize);
        ch.write_async(lba, data.clone(), false)
            .await
            .expect("write");
        let got = ch
            .read_async(lba, DmaBuf::new(bs * nblk as usize))
            .await
            .expect("read");
        if expect.stores_data {
            assert!(
                got.as_slice() == data.as_slice(),
                "read back differs at lba {lba}"
            );
        }
    }

    // FUA write.
    let data = pattern(first + 7, 2, bs);
    ch.write_async(first + 7, data.clone(), true)
        .await
        .expect("fua write");

    // Scatter-gather: 3 segments across 2 blocks (splits inside a block).
    let mut src = pattern(first + 8, 3, 2 * bs);
    let seg = [bs / 2, bs, bs / 2];
    let mut iovs = Vec::new();
    let mut off = 0;
    for len in seg {
        // SAFETY: offsets stay inside `src` (sum of seg == 2 * bs).
        let base = unsafe { src.as_mut_ptr().add(off) };
        iovs.push(IoVec { base, len });
        off += len;
    }
    let status = sg(ch, IoType::Write, first + 8, 2, &iovs).await;
    assert_eq!(status, IoStatus::Success, "writev");
    let mut dst = DmaBuf::new(2 * bs);
    let mut iovs = Vec::new();
    let mut off = 0;
    for len in [bs, bs / 2, bs / 2] {
        // SAFETY: offsets stay inside `dst`.
        let base = unsafe { dst.as_mut_ptr().add(off) };
        iovs.push(IoVec { base, len });
        off += len;
    }
    let status = sg(ch, IoType::Read, first + 8, 2, &iovs).await;
    assert_eq!(status, IoStatus::Success, "readv");
    if expect.stores_data {
        assert!(
            dst.as_slice() == src.as_slice(),
            "readv differs from writev"
        );
    }

    // FLUSH (whole device and a range).
    if bdev.io_type_supported(IoType::Flush) {
        ch.io_async(IoType::Flush, 0, bdev.num_blocks())
            .await
            .expect("flush all");
        ch.io_async(IoType::Flush, first, 4)
            .await
            .expect("flush range");
    }

    // WRITE_ZEROES then UNMAP.
    if bdev.io_type_supported(IoType::WriteZeroes) {
        ch.io_async(IoType::WriteZeroes, first + 2, 4)
            .await
            .expect("write_zeroes");
        let got = ch
            .read_async(first + 2, DmaBuf::filled(4 * bs, 0xAA))
            .await
            .expect("read");
        if expect.stores_data {
            assert!(got.iter().all(|&b| b == 0), "write_zeroes left data");
        }
    }
    if bdev.io_type_supported(IoType::Unmap) {
        ch.io_async(IoType::Unmap, first, 1).await.expect("unmap");
        if expect.stores_data && expect.unmap_zeroes {
            let got = ch
                .read_async(first, DmaBuf::filled(bs, 0xAA))
                .await
                .expect("read");
            assert!(got.iter().all(|&b| b == 0), "unmap left data");
        }
    }

    // Boundaries: the last block of the device is fine...
    let last = bdev.num_blocks() - 1;
    if slice == slices - 1 {
        ch.write_async(last, pattern(last, 9, bs), false)
            .await
            .expect("last block write");
        ch.read_async(last, DmaBuf::new(bs))
            .await
            .expect("last block read");
    }
    // ...one past it, straddling it, or overflowing u64 is EINVAL.
    let einval = IoStatus::Failed(libc::EINVAL);
    assert_eq!(
        ch.read_async(bdev.num_blocks(), DmaBuf::new(bs))
            .await
            .err(),
        Some(einval)
    );
    assert_eq!(
        ch.write_async(last, DmaBuf::new(2 * bs), false).await.err(),
        Some(einval)
    );
    assert_eq!(
        ch.read_async(u64::MAX, DmaBuf::new(bs)).await.err(),
        Some(einval)
    );
    assert_eq!(
        ch.io_async(IoType::Unmap, u64::MAX - 1, 4)
            .await
            .err()
            .map(|s| s == einval || s == IoStatus::Failed(libc::ENOTSUP)),
        Some(true)
    );
    // Lengths that are not whole blocks, and empty I/O.
    assert_eq!(
        ch.write_async(first, DmaBuf::new(bs + 1), false)
            .await
            .err(),
        Some(einval)
    );
    assert_eq!(
        ch.read_async(first, DmaBuf::new(0)).await.err(),
        Some(einval)
    );
    if bs > 1 {
        let half = DmaBuf::new(bs / 2);
        assert_eq!(ch.read_async(first, half).await.err(), Some(einval));
    }
    // Misaligned buffers, where the bdev requires alignment.
    let align = bdev.required_alignment() as usize;
    if align > 1 {
        let mut buf = DmaBuf::new(2 * bs);
        // SAFETY: base+1 .. base+1+bs is inside `buf`.
        let base = unsafe { buf.as_mut_ptr().add(1) };
        let iov = [IoVec { base, len: bs }];
        assert_eq!(
            sg(ch, IoType::Read, first, 1, &iov).await,
            einval,
            "misaligned readv"
        );
    }
}

/// Submits a scatter-gather read or write and waits for it.
async fn sg(ch: &Rc<BdevChannel>, t: IoType, lba: u64, n: u64, iovs: &[IoVec]) -> IoStatus {
    let (tx, rx) = futures::channel::oneshot::channel();
    let tx = std::cell::RefCell::new(Some(tx));
    let cb: Rc<dyn crate::IoCompletion> = Rc::new(crate::FnCompletion(move |io: crate::Io, _| {
        if let Some(tx) = tx.borrow_mut().take() {
            let _ = tx.send(io.status());
        }
    }));
    // SAFETY: the caller's buffers outlive this await (they are borrowed
    // for the whole call) and nobody else touches them meanwhile.
    unsafe {
        match t {
            IoType::Read => ch.readv(lba, n, iovs, &cb, 0),
            _ => ch.writev(lba, n, iovs, false, &cb, 0),
        }
    }
    rx.await.unwrap_or(IoStatus::Aborted)
}
