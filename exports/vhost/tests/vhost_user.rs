//! A vhost-user frontend written with rust-vmm's `vhost` crate drives a
//! controller through its socket, as QEMU would: memfd guest memory, two
//! virtqueues on two reactors, real kicks, a reconnect. Then the bdev is
//! deleted under the live controller: the controller lets go of it (the
//! delete is not held up), fails requests with `VIRTIO_BLK_S_IOERR`,
//! reports the bdev as gone, and is still deleted normally; the target
//! keeps serving. Rings of every size up to 32768 entries carry I/O, and a
//! size virtio does not allow is refused (logged, connection closed) with
//! other controllers untouched.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

type GuestMem = GuestMemoryMmap<()>;

const MEM_SIZE: usize = 16 << 20;
/// Default ring size.
const N: u16 = 64;
/// Where request headers, status bytes and data buffers live.
const HDRS: u64 = 0x10_0000;
const STATS: u64 = 0x18_0000;
const DATA: u64 = 0x20_0000;
/// Queue `i`'s rings start at `RINGS + i * RING_SPAN` (room for 32768
/// entries: 512 KiB of descriptors, 64 KiB avail, 256 KiB used).
const RINGS: u64 = 0x40_0000;
const RING_SPAN: u64 = 0x10_0000;
/// Bounds a wait for the backend; only a hang reaches it.
const WAIT: Duration = Duration::from_secs(60);

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One virtqueue, driven from the driver's side.
struct DriverQueue {
    /// Guest address of the descriptor table (avail and used follow).
    base: u64,
    /// Ring size (entries).
    size: u16,
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }
    fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(self.size) + 3) & !3
    }
}

/// A minimal virtio-blk driver over a vhost-user connection.
struct Guest {
    fe: Frontend,
    mem: GuestMem,
    _file: File,
    queues: Vec<DriverQueue>,
    next_req: u64,
}

fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the returned fd is
    // checked and then owned by the File only.
    let fd = unsafe { libc::memfd_create(c"wc-vhost-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size as u64).expect("memfd size");
    f
}

/// A connection up to its memory table, before any ring is set up.
struct Handshake {
    fe: Frontend,
    mem: GuestMem,
    file: File,
    /// Our address of guest address 0 (vring addresses are in it).
    host: u64,
}

impl Handshake {
    /// Connects, negotiates features as QEMU does and sends the memory table.
    fn new(sock: &Path, queues: usize) -> Handshake {
        let file = memfd(MEM_SIZE);
        let region =
            MmapRegion::from_file(FileOffset::new(file.try_clone().expect("dup"), 0), MEM_SIZE)
                .expect("map guest memory");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("region");
        let mem = GuestMem::from_regions(vec![region]).expect("guest memory");
        let host = mem.get_host_address(GuestAddress(0)).expect("host address") as u64;

        let mut fe = Frontend::connect(sock, queues as u64).expect("connect");
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        assert_ne!(
            offered & (1 << VIRTIO_RING_F_EVENT_IDX),
            0,
            "EVENT_IDX offered"
        );
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )
        .expect("SET_PROTOCOL_FEATURES");
        assert!(fe.get_queue_num().expect("GET_QUEUE_NUM") >= queues as u64);
        let want = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        fe.set_features(offered & want).expect("SET_FEATURES");
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).expect("SET_MEM_TABLE");
        Handshake {
            fe,
            mem,
            file,
            host,
        }
    }
}

impl Guest {
    /// Connects and sets up `queues` virtqueues of [`N`] entries, as QEMU
    /// does.
    fn connect(sock: &Path, queues: usize) -> Guest {
        Guest::connect_sized(sock, queues, N, 0)
    }

    /// Connects and sets up `queues` virtqueues of `size` entries whose
    /// indexes start at `base` (near 65535 to see them wrap early), as a
    /// driver that already used its rings that far.
    fn connect_sized(sock: &Path, queues: usize, size: u16, base: u16) -> Guest {
        let Handshake {
            mut fe,
            mem,
            file,
            host,
        } = Handshake::new(sock, queues);
        let mut qs = Vec::new();
        for i in 0..queues {
            let q = DriverQueue {
                base: RINGS + RING_SPAN * i as u64,
                size,
                kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                _call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                avail_idx: base,
                used_seen: base,
            };
            // The driver's indexes, which SET_VRING_BASE (avail) and
            // SET_VRING_ADDR (used, read from the ring) take over.
            mem.write_obj(base.to_le(), GuestAddress(q.avail() + 2))
                .unwrap();
            mem.write_obj(base.to_le(), GuestAddress(q.used() + 2))
                .unwrap();
            fe.set_vring_num(i, size).expect("SET_VRING_NUM");
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: size,
                    queue_size: size,
                    flags: 0,
                    desc_table_addr: host + q.desc(),
                    used_ring_addr: host + q.used(),
                    avail_ring_addr: host + q.avail(),
                    log_addr: None,
                },
            )
            .expect("SET_VRING_ADDR");
            fe.set_vring_base(i, base).expect("SET_VRING_BASE");
            fe.set_vring_call(i, &q._call).expect("SET_VRING_CALL");
            fe.set_vring_kick(i, &q.kick).expect("SET_VRING_KICK");
            fe.set_vring_enable(i, true).expect("SET_VRING_ENABLE");
            qs.push(q);
        }
        // A request with a reply: everything above was handled.
        fe.get_features().expect("GET_FEATURES");
        Guest {
            fe,
            mem,
            _file: file,
            queues: qs,
            next_req: 0,
        }
    }

    /// Sends one request (header, optional data, status) on queue `q` and
    /// waits for its used entry; returns the status byte and used length.
    fn request(
        &mut self,
        q: usize,
        t: u32,
        sector: u64,
        data: Option<(u64, u32, bool)>,
    ) -> (u8, u32) {
        let r = self.next_req;
        self.next_req += 1;
        let hdr = HDRS + 16 * (r % 1024);
        let status = STATS + r % 1024;
        self.mem.write_obj(t.to_le(), GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(hdr + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut chain = vec![(hdr, 16u32, false)];
        if let Some(d) = data {
            chain.push(d);
        }
        chain.push((status, 1, true));
        let dq = &mut self.queues[q];
        let n = dq.size;
        // Descriptors: 3 slots per request, reused round the table.
        let slot0 = (dq.avail_idx % (n / 3)) * 3;
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { slot0 + i as u16 + 1 };
            let at = GuestAddress(dq.desc() + 16 * u64::from(slot0 + i as u16));
            self.mem.write_obj(addr.to_le(), at).unwrap();
            self.mem
                .write_obj(len.to_le(), at.unchecked_add(8))
                .unwrap();
            self.mem
                .write_obj(flags.to_le(), at.unchecked_add(12))
                .unwrap();
            self.mem
                .write_obj(next.to_le(), at.unchecked_add(14))
                .unwrap();
        }
        let ring = GuestAddress(dq.avail() + 4 + 2 * u64::from(dq.avail_idx % n));
        self.mem.write_obj(slot0.to_le(), ring).unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        self.mem
            .store(
                dq.avail_idx.to_le(),
                GuestAddress(dq.avail() + 2),
                Ordering::Release,
            )
            .unwrap();
        dq.kick.write(1).expect("kick");
        let used_idx = GuestAddress(dq.used() + 2);
        let deadline = Instant::now() + WAIT;
        loop {
            let idx: u16 = u16::from_le(self.mem.load(used_idx, Ordering::Acquire).unwrap());
            if idx != dq.used_seen {
                break;
            }
            assert!(Instant::now() < deadline, "no completion on queue {q}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let elem = GuestAddress(dq.used() + 4 + 8 * u64::from(dq.used_seen % n));
        let id: u32 = u32::from_le(self.mem.read_obj(elem).unwrap());
        let len: u32 = u32::from_le(self.mem.read_obj(elem.unchecked_add(4)).unwrap());
        dq.used_seen = dq.used_seen.wrapping_add(1);
        assert_eq!(id, u32::from(slot0), "used entry of our chain");
        (self.mem.read_obj(GuestAddress(status)).unwrap(), len)
    }

    fn write(&mut self, q: usize, sector: u64, bytes: &[u8]) -> u8 {
        self.mem.write_slice(bytes, GuestAddress(DATA)).unwrap();
        self.request(q, T_OUT, sector, Some((DATA, bytes.len() as u32, false)))
            .0
    }

    fn read(&mut self, q: usize, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let at = DATA + 0x10_0000;
        self.mem
            .write_slice(&vec![0u8; len], GuestAddress(at))
            .unwrap();
        let (st, used) = self.request(q, T_IN, sector, Some((at, len as u32, true)));
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        if st == S_OK {
            assert_eq!(used as usize, len + 1, "used length of a read");
        } else {
            assert_eq!(used, 1, "a failed read only writes its status");
        }
        (st, v)
    }
}

fn socket_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("wc-vhost-it-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    wc_vhost::set_socket_dir(&d);
    d
}

/// The tests look at every controller of the process: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn two_queues_then_bdev_deleted_under_a_live_controller() {
    let _serial = serial();
    let dir = socket_dir();
    let rt = wc_bdev::testing::test_runtime(2);
    let main = rt.handles()[0].clone();
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("VhHr", 2048, 512)).unwrap();
    let bdev = wc_bdev::lookup("VhHr").unwrap();
    let created = wc_bdev::testing::run_on(&main, || async {
        wc_vhost::create_controller(wc_vhost::CreateOpts {
            ctrlr: "vhost.hr".into(),
            dev_name: "VhHr".into(),
            cpumask: Some("0x3".into()),
            ..Default::default()
        })
        .map_err(|e| e.to_string())
    });
    assert_eq!(created.unwrap(), "vhost.hr");
    let c = wc_vhost::controllers();
    assert_eq!(c[0].cpumask, "0x3");
    assert_eq!(c[0].backend_specific["block"]["bdev"], "VhHr");
    assert_eq!(c[0].sessions, serde_json::json!([]));
    let saved = wc_vhost::config_entries();
    assert_eq!(
        saved[0]["params"]["cpumask"], "3",
        "saved as SPDK: hex, no 0x"
    );
    assert_eq!(saved[0]["params"]["transport"], "vhost_user_blk");

    let mut g = Guest::connect(&dir.join("vhost.hr"), 2);
    // Config space: capacity in 512-byte sectors.
    let (_, cfg) =
        g.fe.get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .expect("GET_CONFIG");
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 2048);

    // Written on queue 0 (reactor 0), read back on queue 1 (reactor 1).
    let pat: Vec<u8> = (0..8192u32).map(|i| (i * 31 + 7) as u8).collect();
    assert_eq!(g.write(0, 16, &pat), S_OK);
    let (st, back) = g.read(1, 16, pat.len());
    assert_eq!(st, S_OK);
    assert_eq!(back, pat);
    let c = wc_vhost::controllers();
    assert_eq!(c[0].sessions[0]["started"], true, "{:?}", c[0].sessions);

    // The VM goes away and comes back (a restart): the new connection is
    // served, and the data is still there.
    drop(g);
    let mut g = Guest::connect(&dir.join("vhost.hr"), 2);
    assert_eq!(g.read(1, 16, pat.len()), (S_OK, pat.clone()));
    assert_eq!(g.write(0, 32, &pat[..4096]), S_OK);

    // The bdev is deleted (as bdev_malloc_delete does, on the main
    // reactor) while the VM is connected: the delete succeeds at once and
    // the controller closes its descriptor.
    let deleted = wc_bdev::testing::run_on(&main, || async {
        wc_bdev_malloc::delete("VhHr").map_err(|e| e.to_string())
    });
    deleted.unwrap();
    assert!(wc_bdev::lookup("VhHr").is_none());
    wait_for("the controller to close the bdev", || {
        bdev.open_count() == 0
    });

    // Requests now fail with VIRTIO_BLK_S_IOERR on both queues.
    assert_eq!(g.write(0, 16, &pat), S_IOERR);
    assert_eq!(g.read(1, 16, 4096).0, S_IOERR);
    assert_eq!(g.read(0, 0, 512).0, S_IOERR);

    // The controller is still listed (bdev null, as SPDK), not saved.
    let c = wc_vhost::controllers();
    assert_eq!(c.len(), 1);
    assert!(c[0].backend_specific["block"]["bdev"].is_null());
    assert!(wc_vhost::config_entries().is_empty());

    // The vhost-user side still answers: stopping queue 0 reports the
    // chains this connection put on it (1 before the removal, 2 after).
    assert_eq!(g.fe.get_vring_base(0).expect("GET_VRING_BASE"), 3);

    // The target keeps serving: another controller on another bdev.
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("VhHr2", 2048, 512)).unwrap();
    let other = wc_bdev::testing::run_on(&main, || async {
        wc_vhost::create_controller(wc_vhost::CreateOpts {
            ctrlr: "vhost.hr2".into(),
            dev_name: "VhHr2".into(),
            ..Default::default()
        })
        .map_err(|e| e.to_string())
    });
    assert_eq!(other.unwrap(), "vhost.hr2");
    let mut g2 = Guest::connect(&dir.join("vhost.hr2"), 1);
    assert_eq!(g2.write(0, 0, &pat[..4096]), S_OK);
    assert_eq!(g2.read(0, 0, 4096), (S_OK, pat[..4096].to_vec()));

    // As SPDK, a controller with a connected VM is not deleted (EBUSY);
    // once the VM is gone, deleting the controller of the removed bdev
    // works as usual.
    let e = wc_vhost::delete_controller("vhost.hr").unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    assert!(dir.join("vhost.hr").exists());
    drop(g);
    delete_once_disconnected("vhost.hr");
    assert!(!dir.join("vhost.hr").exists());
    drop(g2);
    delete_once_disconnected("vhost.hr2");
    wc_bdev::testing::run_on(&main, || async {
        wc_bdev_malloc::delete("VhHr2").map_err(|e| e.to_string())
    })
    .unwrap();
    rt.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Deletes a controller whose VM just went away (the controller notices the
/// closed connection on its own thread, so EBUSY may answer for a moment).
fn delete_once_disconnected(name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match wc_vhost::delete_controller(name) {
            Ok(()) => return,
            Err(e) if e.errno() == libc::EBUSY && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("delete {name}: {e}"),
        }
    }
}

/// Everything logged by this test binary (installed once).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn create_controller(main: &wc_reactor::ReactorHandle, ctrlr: &str, bdev: &str) {
    let (c, b) = (ctrlr.to_string(), bdev.to_string());
    let created = wc_bdev::testing::run_on(main, move || async move {
        wc_vhost::create_controller(wc_vhost::CreateOpts {
            ctrlr: c,
            dev_name: b,
            ..Default::default()
        })
        .map_err(|e| e.to_string())
    });
    assert_eq!(created.unwrap(), ctrlr);
}

/// Writes a pattern through queue 0 and reads it back, `rounds` times.
fn write_read_rounds(g: &mut Guest, rounds: u64, tag: u8) {
    for k in 0..rounds {
        let pat: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(tag).wrapping_add(k as u8))
            .collect();
        let sector = (k % 64) * 8;
        assert_eq!(g.write(0, sector, &pat), S_OK, "write {k}");
        assert_eq!(g.read(0, sector, pat.len()), (S_OK, pat), "read {k}");
    }
}

#[test]
fn rings_of_every_allowed_size_carry_io_and_others_are_refused() {
    let _serial = serial();
    let logs = captured_logs();
    let dir = socket_dir();
    let rt = wc_bdev::testing::test_runtime(1);
    let main = rt.handles()[0].clone();
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("VhRs", 2048, 512)).unwrap();
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("VhRs2", 2048, 512)).unwrap();
    create_controller(&main, "vhost.rs", "VhRs");
    create_controller(&main, "vhost.rs2", "VhRs2");
    let sock = dir.join("vhost.rs");
    // Another controller with a live VM throughout.
    let mut other = Guest::connect(&dir.join("vhost.rs2"), 1);
    write_read_rounds(&mut other, 2, 3);

    // Indexes start 8 short of 65536: both the 16-bit index and the ring
    // position wrap within the first rounds; the 128-entry ring also
    // wraps its used ring several times.
    for (size, rounds) in [(128u16, 300u64), (512, 24), (1024, 24), (32768, 24)] {
        let mut g = Guest::connect_sized(&sock, 1, size, 0u16.wrapping_sub(8));
        write_read_rounds(&mut g, rounds, size.trailing_zeros() as u8);
        drop(g);
        wait_for("the controller to see the VM go", || {
            wc_vhost::controllers()
                .iter()
                .any(|c| c.ctrlr == "vhost.rs" && c.sessions == serde_json::json!([]))
        });
    }

    // A ring size that is not a power of two: refused with a log line
    // naming the message and the value, and the connection closed (the
    // frontend did not negotiate REPLY_ACK, so it learns it from the
    // socket).
    let Handshake { fe, host, .. } = Handshake::new(&sock, 1);
    fe.set_vring_num(0, 1000).expect("SET_VRING_NUM is sent");
    let _ = fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 1000,
            queue_size: 1000,
            flags: 0,
            desc_table_addr: host + RINGS,
            used_ring_addr: host + RINGS + 0x8000,
            avail_ring_addr: host + RINGS + 0x4000,
            log_addr: None,
        },
    );
    assert!(
        fe.get_features().is_err(),
        "the connection is closed after the refused ring size"
    );
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.contains("vhost-vhost.rs: vhost-user SET_VRING_NUM 1000 refused: ring size is not a power of two"),
        "{text}"
    );
    drop(fe);

    // The other controller's VM never noticed; the refused controller
    // serves the next VM.
    write_read_rounds(&mut other, 2, 5);
    wait_for("the refused connection to end", || {
        wc_vhost::controllers()
            .iter()
            .any(|c| c.ctrlr == "vhost.rs" && c.sessions == serde_json::json!([]))
    });
    let mut g = Guest::connect_sized(&sock, 1, 256, 0);
    write_read_rounds(&mut g, 2, 7);

    drop(g);
    drop(other);
    delete_once_disconnected("vhost.rs");
    delete_once_disconnected("vhost.rs2");
    wc_bdev::testing::run_on(&main, || async {
        wc_bdev_malloc::delete("VhRs")
            .and_then(|_| wc_bdev_malloc::delete("VhRs2"))
            .map_err(|e| e.to_string())
    })
    .unwrap();
    rt.shutdown();
}
