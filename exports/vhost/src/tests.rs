//! The request engine against virtio-queue's mock split queue and a malloc
//! bdev on a test runtime: good requests, and malformed chains that must
//! get an error status (or no status) without a panic.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::rc::Rc;
use virtio_queue::desc::split::Descriptor as SplitDesc;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::blk::*;
use crate::ctrl::{add_used, needs_interrupt, pop_chains, set_notification};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MEM_SIZE: usize = 0x20_0000;

struct MockQ(RefCell<Queue>);

impl QueueOps for MockQ {
    fn pop(&self, mem: &Mem, max: usize) -> Option<(u64, Chains)> {
        Some((0, pop_chains(&mut self.0.borrow_mut(), mem, max)))
    }
    fn push_used(&self, mem: &Mem, head: u16, len: u32, _epoch: u64) -> bool {
        add_used(&mut self.0.borrow_mut(), mem, head, len)
    }
    fn signal(&self, mem: &Mem) -> bool {
        needs_interrupt(&mut self.0.borrow_mut(), mem)
    }
    fn set_notification(&self, mem: &Mem, enable: bool) -> bool {
        set_notification(&mut self.0.borrow_mut(), mem, enable)
    }
}

struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

async fn until(mut f: impl FnMut() -> bool) {
    for _ in 0..1_000_000 {
        if f() {
            return;
        }
        YieldNow(false).await;
    }
    panic!("condition not reached");
}

/// A request: descriptors as (addr, len, device-writable).
type Chain = Vec<(u64, u32, bool)>;

struct Outcome {
    head: u32,
    used_len: u32,
}

/// Runs `chains` (each a list of descriptors) through an engine on a
/// malloc bdev `bdev` and returns the used entries and the memory.
fn run(
    bdev: &'static str,
    readonly: bool,
    setup: impl FnOnce(&Mem) -> Vec<Chain> + Send + 'static,
    check: impl FnOnce(&Mem, &[Outcome]) + Send + 'static,
) {
    let rt = wc_bdev::testing::test_runtime(1);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(bdev, 1024, 512)).unwrap();
    wc_bdev::testing::run_on(&rt.handles()[0], move || async move {
        let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let chains = setup(&mem);
        let mock = MockSplitQueue::new(&*mem, 256);
        let mut raw = Vec::new();
        for c in &chains {
            let base = raw.len() as u16;
            for (i, &(addr, len, w)) in c.iter().enumerate() {
                let last = i + 1 == c.len();
                let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                let next = if last { 0 } else { base + i as u16 + 1 };
                raw.push(RawDescriptor::from(SplitDesc::new(addr, len, flags, next)));
            }
        }
        mock.add_desc_chains(&raw, 0).unwrap();
        let q: Queue = mock.create_queue().unwrap();
        let desc = wc_bdev::open(bdev, !readonly, None).unwrap();
        let chan = desc.channel().unwrap();
        let geom = Geometry {
            block_size: 512,
            num_blocks: 1024,
            readonly,
            id: bdev.as_bytes().to_vec(),
        };
        let eng = QueueEngine::new(MockQ(RefCell::new(q)), Some(chan), geom);
        let mut taken = 0;
        while taken < chains.len() {
            let n = eng.poll(&mem);
            assert!(n > 0, "queue ran dry after {taken} of {}", chains.len());
            taken += n;
        }
        let e2 = eng.clone();
        until(move || e2.inflight() == 0).await;
        assert_eq!(eng.completed.get(), chains.len() as u64);
        let used = mock.used();
        let n = used.idx().load();
        assert_eq!(n as usize, chains.len());
        let out: Vec<Outcome> = (0..n as usize)
            .map(|i| {
                let e = used.ring().ref_at(i).unwrap().load();
                Outcome {
                    head: e.id(),
                    used_len: e.len(),
                }
            })
            .collect();
        check(&mem, &out);
        drop(eng);
        drop(desc);
    });
    wc_bdev_malloc::delete(bdev).unwrap();
    rt.shutdown();
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const DATA2: u64 = 0x12_0000;
const STATUS: u64 = 0x13_0000;

fn hdr(mem: &Mem, at: u64, t: u32, sector: u64) {
    mem.write_obj(t.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
}

fn status(mem: &Mem, i: u64) -> u8 {
    mem.read_obj(GuestAddress(STATUS + i)).unwrap()
}

fn init_status(mem: &Mem, n: u64) {
    for i in 0..n {
        mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
    }
}

#[test]
fn write_read_flush_get_id() {
    run(
        "VhT0",
        false,
        |mem| {
            init_status(mem, 4);
            let pat: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
            mem.write_slice(&pat, GuestAddress(DATA)).unwrap();
            hdr(mem, HDR, T_OUT, 8);
            hdr(mem, HDR + 16, T_IN, 8);
            hdr(mem, HDR + 32, T_FLUSH, 0);
            hdr(mem, HDR + 48, T_GET_ID, 0);
            vec![
                // write 4 KiB in two segments
                vec![
                    (HDR, 16, false),
                    (DATA, 1024, false),
                    (DATA + 1024, 3072, false),
                    (STATUS, 1, true),
                ],
                vec![
                    (HDR + 16, 16, false),
                    (DATA2, 4096, true),
                    (STATUS + 1, 1, true),
                ],
                vec![(HDR + 32, 16, false), (STATUS + 2, 1, true)],
                vec![
                    (HDR + 48, 16, false),
                    (DATA2 + 8192, 20, true),
                    (STATUS + 3, 1, true),
                ],
            ]
        },
        |mem, out| {
            // Written before read: the engine submits in order, malloc
            // completes in order.
            assert_eq!(status(mem, 0), S_OK);
            assert_eq!(status(mem, 1), S_OK);
            assert_eq!(status(mem, 2), S_OK);
            assert_eq!(status(mem, 3), S_OK);
            let mut a = vec![0u8; 4096];
            let mut b = vec![0u8; 4096];
            mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
            mem.read_slice(&mut b, GuestAddress(DATA2)).unwrap();
            assert_eq!(a, b);
            let mut id = [0u8; 20];
            mem.read_slice(&mut id, GuestAddress(DATA2 + 8192)).unwrap();
            assert_eq!(&id[..4], b"VhT0");
            assert!(id[4..].iter().all(|&x| x == 0));
            let lens: Vec<(u32, u32)> = out.iter().map(|o| (o.head, o.used_len)).collect();
            assert!(lens.contains(&(0, 1)));
            assert!(lens.contains(&(4, 4097)));
            assert!(lens.contains(&(7, 1)));
            assert!(lens.contains(&(9, 21)));
        },
    );
}

fn dwz(mem: &Mem, at: u64, sector: u64, n: u32) {
    mem.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(n.to_le(), GuestAddress(at + 8)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 12)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    run(
        "VhT1",
        false,
        |mem| {
            init_status(mem, 4);
            mem.write_slice(&[0xabu8; 2048], GuestAddress(DATA))
                .unwrap();
            hdr(mem, HDR, T_OUT, 16);
            hdr(mem, HDR + 16, T_WRITE_ZEROES, 0);
            dwz(mem, DATA + 4096, 16, 4);
            hdr(mem, HDR + 32, T_IN, 16);
            mem.write_slice(&[0x55u8; 2048], GuestAddress(DATA2))
                .unwrap();
            hdr(mem, HDR + 48, T_DISCARD, 0);
            dwz(mem, DATA + 8192, 100, 8);
            vec![
                vec![(HDR, 16, false), (DATA, 2048, false), (STATUS, 1, true)],
                vec![
                    (HDR + 16, 16, false),
                    (DATA + 4096, 16, false),
                    (STATUS + 1, 1, true),
                ],
                vec![
                    (HDR + 32, 16, false),
                    (DATA2, 2048, true),
                    (STATUS + 2, 1, true),
                ],
                vec![
                    (HDR + 48, 16, false),
                    (DATA + 8192, 16, false),
                    (STATUS + 3, 1, true),
                ],
            ]
        },
        |mem, _| {
            for i in 0..4 {
                assert_eq!(status(mem, i), S_OK, "request {i}");
            }
            let mut b = vec![0xffu8; 2048];
            mem.read_slice(&mut b, GuestAddress(DATA2)).unwrap();
            assert!(b.iter().all(|&x| x == 0), "write_zeroes read back zeros");
        },
    );
}

#[test]
fn malformed_chains_get_errors_without_panic() {
    run(
        "VhT2",
        false,
        |mem| {
            init_status(mem, 16);
            hdr(mem, HDR, T_IN, 0);
            hdr(mem, HDR + 16, 77, 0);
            hdr(mem, HDR + 32, T_IN, 1020); // 8 blocks from 1020: past the end
            hdr(mem, HDR + 48, T_OUT, 0);
            let mut long: Chain = vec![(HDR, 16, false)];
            for i in 0..(SEG_MAX as u64 + 5) {
                long.push((DATA + i * 512, 512, true));
            }
            long.push((STATUS + 9, 1, true));
            vec![
                // 0: data outside guest memory
                vec![
                    (HDR, 16, false),
                    (0x4000_0000, 512, true),
                    (STATUS, 1, true),
                ],
                // 1: header too short
                vec![(HDR, 8, false), (DATA, 512, true), (STATUS + 1, 1, true)],
                // 2: no status descriptor (last one is device-readable)
                vec![(HDR, 16, false), (DATA, 512, false)],
                // 3: unknown request type
                vec![(HDR + 16, 16, false), (STATUS + 3, 1, true)],
                // 4: past the end of the bdev
                vec![
                    (HDR + 32, 16, false),
                    (DATA, 4096, true),
                    (STATUS + 4, 1, true),
                ],
                // 5: length not a multiple of the block size
                vec![(HDR, 16, false), (DATA, 100, true), (STATUS + 5, 1, true)],
                // 6: write with a device-writable data buffer
                vec![
                    (HDR + 48, 16, false),
                    (DATA, 512, true),
                    (STATUS + 6, 1, true),
                ],
                // 7: data straddling the end of guest memory
                vec![
                    (HDR, 16, false),
                    (MEM_SIZE as u64 - 256, 512, true),
                    (STATUS + 7, 1, true),
                ],
                // 8: status outside guest memory
                vec![(HDR, 16, false), (DATA, 512, true), (0x4000_0000, 1, true)],
                // 9: too many segments
                long,
                // 10: header only
                vec![(HDR, 16, false)],
            ]
        },
        |mem, out| {
            assert_eq!(status(mem, 0), S_IOERR);
            assert_eq!(status(mem, 1), S_IOERR);
            assert_eq!(status(mem, 3), S_UNSUPP);
            assert_eq!(status(mem, 4), S_IOERR);
            assert_eq!(status(mem, 5), S_IOERR);
            assert_eq!(status(mem, 6), S_IOERR);
            assert_eq!(status(mem, 7), S_IOERR);
            assert_eq!(status(mem, 9), S_IOERR);
            assert_eq!(out.len(), 11);
            // Nothing was read into guest memory; each got at most a status.
            assert!(out.iter().all(|o| o.used_len <= 1));
        },
    );
}

#[test]
fn readonly_refuses_writes() {
    run(
        "VhT3",
        true,
        |mem| {
            init_status(mem, 3);
            hdr(mem, HDR, T_OUT, 0);
            hdr(mem, HDR + 16, T_IN, 0);
            hdr(mem, HDR + 32, T_DISCARD, 0);
            dwz(mem, DATA + 4096, 0, 1);
            vec![
                vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
                vec![
                    (HDR + 16, 16, false),
                    (DATA, 512, true),
                    (STATUS + 1, 1, true),
                ],
                vec![
                    (HDR + 32, 16, false),
                    (DATA + 4096, 16, false),
                    (STATUS + 2, 1, true),
                ],
            ]
        },
        |mem, _| {
            assert_eq!(status(mem, 0), S_IOERR);
            assert_eq!(status(mem, 1), S_OK);
            assert_eq!(status(mem, 2), S_IOERR);
        },
    );
}

#[test]
fn config_space_layout() {
    let g = Geometry {
        block_size: 4096,
        num_blocks: 100,
        readonly: false,
        id: vec![],
    };
    let c = config_space(&g, 3);
    assert_eq!(c.len(), 60);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 800);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
}

#[test]
fn rpc_create_get_delete_controller() {
    let dir = std::env::temp_dir().join(format!("wc-vhost-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    crate::set_socket_dir(&dir);
    let rt = wc_bdev::testing::test_runtime(1);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("VhT4", 1024, 512)).unwrap();
    let r = wc_bdev::testing::run_on(&rt.handles()[0], || async {
        crate::create_controller(crate::CreateOpts {
            ctrlr: "vhost.0".into(),
            dev_name: "VhT4".into(),
            ..Default::default()
        })
        .map_err(|e| e.to_string())
    });
    assert_eq!(r.unwrap(), "vhost.0");
    let sock = dir.join("vhost.0");
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(&sock).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    let all = crate::controllers();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].backend_specific["block"]["bdev"], "VhT4");
    let cfg = crate::config_entries();
    assert_eq!(cfg[0]["method"], "vhost_create_blk_controller");
    let dup = wc_bdev::testing::run_on(&rt.handles()[0], || async {
        crate::create_controller(crate::CreateOpts {
            ctrlr: "vhost.0".into(),
            dev_name: "VhT4".into(),
            ..Default::default()
        })
        .is_err()
    });
    assert!(dup);
    crate::delete_controller("vhost.0").unwrap();
    assert!(!sock.exists());
    assert!(crate::delete_controller("vhost.0").is_err());
    wc_bdev::testing::run_on(&rt.handles()[0], || async {});
    wc_bdev_malloc::delete("VhT4").unwrap();
    rt.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bdev that logs on which reactor each channel is created and each I/O
/// submitted, and through which channel.
#[derive(Default)]
struct Spy {
    next_chan: std::sync::atomic::AtomicUsize,
    log: Arc<std::sync::Mutex<Vec<SpyEvent>>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SpyEvent {
    Channel {
        id: usize,
        reactor: usize,
    },
    Submit {
        chan: usize,
        reactor: usize,
        lba: u64,
    },
}

struct SpyChan {
    id: usize,
    log: Arc<std::sync::Mutex<Vec<SpyEvent>>>,
}

impl wc_bdev::BdevOps for Spy {
    fn module_name(&self) -> &'static str {
        "spy"
    }
    fn product_name(&self) -> &'static str {
        "Spy disk"
    }
    fn io_type_supported(&self, t: wc_bdev::IoType) -> bool {
        matches!(
            t,
            wc_bdev::IoType::Read | wc_bdev::IoType::Write | wc_bdev::IoType::Flush
        )
    }
    fn create_channel(&self) -> Result<Box<dyn wc_bdev::IoChannel>, wc_bdev::BdevError> {
        let id = self
            .next_chan
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reactor = wc_reactor::current().index();
        self.log
            .lock()
            .unwrap()
            .push(SpyEvent::Channel { id, reactor });
        Ok(Box::new(SpyChan {
            id,
            log: self.log.clone(),
        }))
    }
}

impl wc_bdev::IoChannel for SpyChan {
    fn submit(&self, io: wc_bdev::Io) {
        self.log.lock().unwrap().push(SpyEvent::Submit {
            chan: self.id,
            reactor: wc_reactor::current().index(),
            lba: io.offset_blocks(),
        });
        io.complete(wc_bdev::IoStatus::Success);
    }
}

/// A mock queue usable from any reactor; each used entry is reported as
/// (queue, head, reactor that completed it).
struct SharedMockQ {
    index: usize,
    q: std::sync::Mutex<Queue>,
    tx: std::sync::Mutex<std::sync::mpsc::Sender<(usize, u16, usize)>>,
}

impl QueueOps for SharedMockQ {
    fn pop(&self, mem: &Mem, max: usize) -> Option<(u64, Chains)> {
        Some((0, pop_chains(&mut self.q.lock().unwrap(), mem, max)))
    }
    fn push_used(&self, mem: &Mem, head: u16, len: u32, _epoch: u64) -> bool {
        let added = add_used(&mut self.q.lock().unwrap(), mem, head, len);
        let reactor = wc_reactor::current().index();
        let _ = self.tx.lock().unwrap().send((self.index, head, reactor));
        added
    }
    fn signal(&self, mem: &Mem) -> bool {
        needs_interrupt(&mut self.q.lock().unwrap(), mem)
    }
    fn set_notification(&self, mem: &Mem, enable: bool) -> bool {
        set_notification(&mut self.q.lock().unwrap(), mem, enable)
    }
}

/// Puts one chain on a fresh mock queue at `ring` and returns the queue.
fn mock_queue_with(mem: &Mem, ring: u64, chain: &Chain) -> Queue {
    let mock = MockSplitQueue::create(mem, GuestAddress(ring), 16);
    let raw: Vec<RawDescriptor> = chain
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, w))| {
            let last = i + 1 == chain.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { i as u16 + 1 };
            RawDescriptor::from(SplitDesc::new(addr, len, flags, next))
        })
        .collect();
    mock.add_desc_chains(&raw, 0).unwrap();
    mock.create_queue().unwrap()
}

#[test]
fn queues_are_served_by_the_reactors_of_the_mask() {
    use crate::ctrl::{start_pollers, DynQueue, Shared};
    use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

    let rt = wc_bdev::testing::test_runtime(2);
    let spy = Arc::new(Spy::default());
    let log = spy.log.clone();
    wc_bdev::register(wc_bdev::BdevConfig::new("VhSpy", 512, 1024), spy).unwrap();

    // The mask's reactors, in order, as create_controller picks them.
    let masked = wc_bdev::testing::run_on(&rt.handles()[0], || async {
        let one = crate::ctrl::serving_reactors(Some(&wc_reactor::CoreMask::parse("0x2").unwrap()))
            .map(|v| v.iter().map(|h| h.index()).collect::<Vec<_>>())
            .map_err(|e| e.to_string());
        let none =
            crate::ctrl::serving_reactors(Some(&wc_reactor::CoreMask::parse("0x4").unwrap()))
                .is_err();
        let all = crate::ctrl::serving_reactors(None)
            .map(|v| v.iter().map(|h| h.index()).collect::<Vec<_>>())
            .map_err(|e| e.to_string());
        (one, none, all)
    });
    assert_eq!(masked.0.unwrap(), vec![1]);
    assert!(masked.1, "a mask without reactors is refused");
    assert_eq!(masked.2.unwrap(), vec![0, 1]);

    // Three queues on two reactors: queue i on reactor i % 2. Each queue
    // carries one write (queue i writes block 8 * i).
    const QUEUES: usize = 3;
    let atomic = GuestMemoryAtomic::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let mem = atomic.memory().into_inner();
    init_status(&mem, QUEUES as u64);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut queues: Vec<DynQueue> = Vec::new();
    for i in 0..QUEUES as u64 {
        hdr(&mem, HDR + 16 * i, T_OUT, 8 * i);
        let chain = vec![
            (HDR + 16 * i, 16, false),
            (DATA + 4096 * i, 512, false),
            (STATUS + i, 1, true),
        ];
        let q = mock_queue_with(&mem, 0x4000 * i, &chain);
        queues.push(Arc::new(SharedMockQ {
            index: i as usize,
            q: std::sync::Mutex::new(q),
            tx: std::sync::Mutex::new(tx.clone()),
        }));
    }
    let desc = wc_bdev::open("VhSpy", true, None).unwrap();
    let geom = Geometry {
        block_size: 512,
        num_blocks: 1024,
        readonly: false,
        id: b"VhSpy".to_vec(),
    };
    let sh = Shared::new(geom, QUEUES, rt.handles().to_vec(), desc);
    sh.set_memory(atomic.clone());
    sh.set_queues(queues);
    start_pollers(&sh);

    let mut served = [usize::MAX; QUEUES];
    for _ in 0..QUEUES {
        // Generous bound: only a hang fails here.
        let (q, head, reactor) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("every queue completes its request");
        assert_eq!(head, 0);
        served[q] = reactor;
    }
    assert_eq!(served, [0, 1, 0], "queue i is completed on reactor i % 2");
    for i in 0..QUEUES as u64 {
        assert_eq!(status(&mem, i), S_OK);
    }

    // Each write went to the bdev from the reactor serving its queue,
    // through a channel created on that reactor; the two reactors used
    // different channels.
    let log = log.lock().unwrap().clone();
    let created_on = |chan: usize| {
        log.iter().find_map(|e| match *e {
            SpyEvent::Channel { id, reactor } if id == chan => Some(reactor),
            _ => None,
        })
    };
    let mut chan_of_reactor = [None; 2];
    for i in 0..QUEUES {
        let (chan, reactor) = log
            .iter()
            .find_map(|e| match *e {
                SpyEvent::Submit { chan, reactor, lba } if lba == 8 * i as u64 => {
                    Some((chan, reactor))
                }
                _ => None,
            })
            .expect("the write reached the bdev");
        assert_eq!(reactor, i % 2, "queue {i} submitted on reactor {reactor}");
        assert_eq!(
            created_on(chan),
            Some(reactor),
            "channel of another reactor"
        );
        assert!(chan_of_reactor[reactor].is_none_or(|c| c == chan));
        chan_of_reactor[reactor] = Some(chan);
    }
    assert_ne!(chan_of_reactor[0], chan_of_reactor[1]);

    sh.stop.store(true, std::sync::atomic::Ordering::Release);
    drop(sh);
    rt.shutdown();
    wc_bdev::unregister("VhSpy").unwrap();
}

/// Queue size of the notification tests.
const QSIZE: u16 = 256;

/// Makes FLUSH requests `from..from + n` available: request `j` uses
/// descriptors `2j` (header) and `2j + 1` (status byte `STATUS + j`).
fn add_flushes(mem: &Mem, mock: &MockSplitQueue<'_, Mem>, from: u16, n: u16) {
    for j in from..from + n {
        let h = HDR + 16 * u64::from(j);
        hdr(mem, h, T_FLUSH, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS + u64::from(j)))
            .unwrap();
        let chain = [
            RawDescriptor::from(SplitDesc::new(h, 16, F_NEXT, 2 * j + 1)),
            RawDescriptor::from(SplitDesc::new(STATUS + u64::from(j), 1, F_WRITE, 0)),
        ];
        mock.add_desc_chains(&chain, 2 * j).unwrap();
    }
}

/// Polls until `n` chains were taken and completed, then once more (the
/// poll that considers notifying the driver).
async fn serve(eng: &Rc<QueueEngine<MockQ>>, mem: &Arc<Mem>, n: usize) {
    let mut taken = 0;
    while taken < n {
        let got = eng.poll(mem);
        assert!(got > 0, "queue ran dry after {taken} of {n}");
        taken += got;
    }
    let e = eng.clone();
    until(move || e.inflight() == 0).await;
    eng.poll(mem);
}

fn load16(mem: &Mem, at: GuestAddress) -> u16 {
    u16::from_le(mem.read_obj(at).unwrap())
}

/// Runs `body` on a 1-reactor runtime with a malloc bdev and an engine on
/// a mock queue (EVENT_IDX as given).
fn with_engine<F>(bdev: &'static str, event_idx: bool, body: F)
where
    F: FnOnce(
            Arc<Mem>,
            MockSplitQueue<'_, Mem>,
            Rc<QueueEngine<MockQ>>,
        ) -> Pin<Box<dyn Future<Output = ()> + '_>>
        + Send
        + 'static,
{
    let rt = wc_bdev::testing::test_runtime(1);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(bdev, 1024, 512)).unwrap();
    wc_bdev::testing::run_on(&rt.handles()[0], move || async move {
        let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let mem2 = mem.clone();
        let mock = MockSplitQueue::new(&*mem2, QSIZE);
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_event_idx(event_idx);
        let desc = wc_bdev::open(bdev, true, None).unwrap();
        let geom = Geometry {
            block_size: 512,
            num_blocks: 1024,
            readonly: false,
            id: bdev.as_bytes().to_vec(),
        };
        let eng = QueueEngine::new(MockQ(RefCell::new(q)), Some(desc.channel().unwrap()), geom);
        body(mem, mock, eng).await;
        drop(desc);
    });
    wc_bdev_malloc::delete(bdev).unwrap();
    rt.shutdown();
}

#[test]
fn event_idx_suppresses_needless_interrupts_and_kicks() {
    with_engine("VhT5", true, |mem, mock, eng| {
        Box::pin(async move {
            let size = u64::from(QSIZE);
            let used_event = GuestAddress(mock.avail_addr().0 + 4 + 2 * size);
            let avail_event = GuestAddress(mock.used_addr().0 + 4 + 8 * size);
            let used_idx = |m: &Mem| load16(m, mock.used_addr().unchecked_add(2));
            eng.set_kicks(Some(true)); // as on a sleeping reactor
            assert!(eng.queue().0.borrow().event_idx_enabled());

            // The driver wants an interrupt once entry 1 is used; four
            // requests complete in one batch: one interrupt, not four.
            mem.write_obj(1u16.to_le(), used_event).unwrap();
            add_flushes(&mem, &mock, 0, 4);
            serve(&eng, &mem, 4).await;
            assert_eq!(used_idx(&mem), 4);
            assert_eq!(eng.signals.get(), 1);
            // Kicks re-armed at the next chain (avail_event = next avail).
            assert_eq!(load16(&mem, avail_event), 4);

            // used_event stays behind (the driver has not re-armed): three
            // more completions, no interrupt.
            add_flushes(&mem, &mock, 4, 3);
            serve(&eng, &mem, 3).await;
            assert_eq!(used_idx(&mem), 7);
            assert_eq!(eng.signals.get(), 1);
            assert_eq!(load16(&mem, avail_event), 7);

            // Re-armed at entry 7: the next batch interrupts once.
            mem.write_obj(7u16.to_le(), used_event).unwrap();
            add_flushes(&mem, &mock, 7, 2);
            serve(&eng, &mem, 2).await;
            assert_eq!(used_idx(&mem), 9);
            assert_eq!(eng.signals.get(), 2);

            // A used_event ahead of everything: no interrupt at all.
            mem.write_obj(100u16.to_le(), used_event).unwrap();
            add_flushes(&mem, &mock, 9, 2);
            serve(&eng, &mem, 2).await;
            assert_eq!(eng.signals.get(), 2);

            // Busy polling: kicks are not re-armed (avail_event stays put,
            // so the driver stops kicking).
            eng.set_kicks(Some(false));
            let before = load16(&mem, avail_event);
            add_flushes(&mem, &mock, 11, 3);
            serve(&eng, &mem, 3).await;
            assert_eq!(load16(&mem, avail_event), before);
            assert_eq!(used_idx(&mem), 14);
            for j in 0..14 {
                assert_eq!(status(&mem, j), S_OK, "request {j}");
            }
        })
    });
}

#[test]
fn without_event_idx_flags_are_honoured() {
    with_engine("VhT6", false, |mem, mock, eng| {
        Box::pin(async move {
            let used_flags = mock.used_addr();
            let avail_flags = mock.avail_addr();
            let used_idx = |m: &Mem| load16(m, mock.used_addr().unchecked_add(2));

            // Busy polling: the driver is told not to kick.
            eng.set_kicks(Some(false));
            eng.poll(&mem);
            assert_eq!(load16(&mem, used_flags), 1, "VRING_USED_F_NO_NOTIFY");

            // The driver does not want interrupts (VRING_AVAIL_F_NO_INTERRUPT).
            mem.write_obj(1u16.to_le(), avail_flags).unwrap();
            add_flushes(&mem, &mock, 0, 2);
            serve(&eng, &mem, 2).await;
            assert_eq!(used_idx(&mem), 2);
            assert_eq!(eng.signals.get(), 0);

            // It wants them again: one per batch of completions.
            mem.write_obj(0u16.to_le(), avail_flags).unwrap();
            add_flushes(&mem, &mock, 2, 3);
            serve(&eng, &mem, 3).await;
            assert_eq!(used_idx(&mem), 5);
            assert_eq!(eng.signals.get(), 1);

            // A sleeping reactor asks for kicks again once drained.
            eng.set_kicks(Some(true));
            eng.poll(&mem);
            assert_eq!(load16(&mem, used_flags), 0);
            for j in 0..5 {
                assert_eq!(status(&mem, j), S_OK, "request {j}");
            }
        })
    });
}
