//! Test support: one runtime with the TCP transport, a subsystem maker,
//! and the library's blocking test host (`wc_nvmf::host`) with its calls
//! unwrapped, so tests can also break the protocol on purpose.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use wc_nvme_wire::{Cqe, Sqe};
use wc_reactor::Runtime;

/// One runtime for the whole test binary (the target's state is global).
pub fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let rt = wc_bdev::testing::test_runtime(2);
        rt.main()
            .call_blocking(wc_nvmf::testing::ensure_transport)
            .expect("reactor runs");
        rt
    })
}

/// Runs `f` on the main reactor (the control plane's home).
pub fn on_main<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    rt().main().call_blocking(f).expect("main reactor runs")
}

/// Creates subsystem `nqn` with a malloc namespace and a listener; returns
/// the listener's address.
pub fn setup_subsystem(nqn: &str, bdev: &str, blocks: u64, allow_any: bool) -> SocketAddr {
    rt();
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(bdev, blocks, 512)).unwrap();
    let (nqn, bdev) = (nqn.to_string(), bdev.to_string());
    on_main(move || wc_nvmf::testing::export_bdev(&nqn, &bdev, allow_any))
}

pub use wc_nvmf::host::{Rx, HOSTNQN};

/// The library's test host with every call unwrapped (a failure is the
/// test's failure); [`Host::try_recv`] keeps the error for tests that
/// expect the connection to close.
pub struct Host(pub wc_nvmf::host::Host);

impl std::ops::Deref for Host {
    type Target = wc_nvmf::host::Host;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Host {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Host {
    pub fn connect(addr: SocketAddr, hdgst: bool, ddgst: bool) -> Host {
        Host(wc_nvmf::host::Host::connect(addr, hdgst, ddgst).expect("ICReq/ICResp"))
    }

    pub fn admin(addr: SocketAddr, subnqn: &str, digests: (bool, bool), kato: u32) -> (Host, u16) {
        let (h, c) = wc_nvmf::host::Host::admin(addr, subnqn, digests, kato).expect("admin queue");
        (Host(h), c)
    }

    pub fn io(
        addr: SocketAddr,
        subnqn: &str,
        digests: (bool, bool),
        cntlid: u16,
        qid: u16,
    ) -> Host {
        Host(wc_nvmf::host::Host::io(addr, subnqn, digests, cntlid, qid, 128).expect("I/O queue"))
    }

    pub fn recv(&mut self) -> Rx {
        self.0.recv().expect("a PDU")
    }

    pub fn try_recv(&mut self) -> Result<Rx, String> {
        self.0.recv().map_err(|e| e.to_string())
    }

    pub fn send_capsule(&mut self, sqe: &Sqe, data: &[u8]) {
        self.0.send_capsule(sqe, data).expect("send capsule")
    }

    pub fn send_h2c(&mut self, cccid: u16, ttag: u16, datao: u32, data: &[u8], last: bool) {
        self.0
            .send_h2c(cccid, ttag, datao, data, last)
            .expect("send H2CData")
    }

    pub fn exec(&mut self, sqe: Sqe, out: &[u8], in_len: usize) -> (Cqe, Vec<u8>) {
        self.0.exec(sqe, out, in_len).expect("command completes")
    }

    pub fn fabric_connect(
        &mut self,
        qid: u16,
        sqsize: u32,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        kato: u32,
    ) -> Cqe {
        self.0
            .fabric_connect(qid, sqsize, subnqn, hostnqn, cntlid, kato)
            .expect("Connect completes")
    }

    pub fn prop_get(&mut self, offset: u32, size8: bool) -> u64 {
        self.0.prop_get(offset, size8).expect("Property Get")
    }

    pub fn prop_set(&mut self, offset: u32, value: u64) -> Cqe {
        self.0.prop_set(offset, value).expect("Property Set")
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> (Cqe, Vec<u8>) {
        self.0.identify(cns, nsid).expect("Identify")
    }

    pub fn write(&mut self, nsid: u32, slba: u64, data: &[u8], fua: bool) -> Cqe {
        self.0.write(nsid, slba, data, fua).expect("Write")
    }

    pub fn read(&mut self, nsid: u32, slba: u64, len: usize) -> (Cqe, Vec<u8>) {
        self.0.read(nsid, slba, len).expect("Read")
    }
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits until `cond` holds or `secs` pass.
pub fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 31 + seed * 7) % 251) as u8)
        .collect()
}

pub type Shared<T> = Arc<T>;
