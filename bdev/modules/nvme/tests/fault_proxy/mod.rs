//! A TCP proxy for fault tests, loopback only: it forwards NVMe/TCP PDUs
//! between a host and a target (one thread per direction of each
//! connection, whole PDUs at a time, framed by their common header) and,
//! when told, stalls, drops every connection, flips a byte in the header
//! or the data of the next PDU of a type, or cuts such a PDU short and
//! closes the connection. A fault on one PDU fires once
//! ([`Proxy::hits`] counts them), then the proxy forwards again.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// PDU types (NVMe/TCP common header byte 0).
pub mod pdu {
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

/// Common header flags: a header digest follows the header, a data
/// digest the data.
const HDGSTF: u8 = 0x01;
const DDGSTF: u8 = 0x02;

/// Which way a PDU goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToTarget,
    ToHost,
}

/// What the proxy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Forward nothing (connections stay open; new ones stall too).
    Stall,
    /// Flip (xor 0x5a) byte `at` of the next `pdu` PDU going `dir` (an
    /// offset into the PDU: 8.. is its own header).
    FlipHeader { dir: Dir, pdu: u8, at: usize },
    /// Flip the first data byte of the next `pdu` PDU going `dir` that
    /// carries data.
    FlipData { dir: Dir, pdu: u8 },
    /// Send the first half of the next `pdu` PDU going `dir` that carries
    /// data, then close the connection.
    Truncate { dir: Dir, pdu: u8 },
}

struct Shared {
    fault: Mutex<Fault>,
    hits: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
    accepted: AtomicU64,
    stop: AtomicBool,
}

/// A proxy listening on 127.0.0.1 in front of `target`.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
        let addr = l.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            hits: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let acceptor = thread::spawn(move || {
            for c in l.incoming() {
                if sh.stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(host) = c else { continue };
                let Ok(tgt) = TcpStream::connect(target) else {
                    let _ = host.shutdown(Shutdown::Both);
                    continue;
                };
                sh.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = host.set_nodelay(true);
                let _ = tgt.set_nodelay(true);
                {
                    let mut cs = sh.conns.lock().unwrap();
                    cs.retain(|s| s.peer_addr().is_ok());
                    cs.push(host.try_clone().expect("clone"));
                    cs.push(tgt.try_clone().expect("clone"));
                }
                let (h2, t2) = (
                    host.try_clone().expect("clone"),
                    tgt.try_clone().expect("clone"),
                );
                let (sa, sb) = (sh.clone(), sh.clone());
                thread::spawn(move || pump(host, tgt, Dir::ToTarget, sa));
                thread::spawn(move || pump(t2, h2, Dir::ToHost, sb));
            }
        });
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set(&self, f: Fault) {
        *self.shared.fault.lock().unwrap() = f;
    }

    /// Faults on a PDU that fired so far.
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Closes every connection now (both ends).
    pub fn drop_connections(&self) {
        for s in self.shared.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.set(Fault::None);
        self.drop_connections();
        // Wake the acceptor.
        let _ = TcpStream::connect(self.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Moves whole PDUs from `from` to `to`, applying the fault.
fn pump(mut from: TcpStream, mut to: TcpStream, dir: Dir, sh: Arc<Shared>) {
    let close = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    let mut buf = Vec::with_capacity(256 * 1024);
    loop {
        buf.resize(8, 0);
        if from.read_exact(&mut buf[..8]).is_err() {
            break;
        }
        let plen = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        if !(8..=16 << 20).contains(&plen) {
            break;
        }
        buf.resize(plen, 0);
        if from.read_exact(&mut buf[8..]).is_err() {
            break;
        }
        // Held while stalled.
        while *sh.fault.lock().unwrap() == Fault::Stall {
            if sh.stop.load(Ordering::Acquire) {
                return close(&from, &to);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let mut cut = None;
        {
            let mut f = sh.fault.lock().unwrap();
            let (ty, flags, hlen, pdo) = (buf[0], buf[1], buf[2] as usize, buf[3] as usize);
            let data_start = if pdo != 0 {
                pdo
            } else {
                hlen + if flags & HDGSTF != 0 { 4 } else { 0 }
            };
            let data_end = plen - if flags & DDGSTF != 0 { 4 } else { 0 };
            let has_data = data_start < data_end;
            match *f {
                Fault::FlipHeader { dir: d, pdu, at } if d == dir && pdu == ty && at < hlen => {
                    buf[at] ^= 0x5a;
                    *f = Fault::None;
                    sh.hits.fetch_add(1, Ordering::Relaxed);
                }
                Fault::FlipData { dir: d, pdu } if d == dir && pdu == ty && has_data => {
                    buf[data_start] ^= 0x5a;
                    *f = Fault::None;
                    sh.hits.fetch_add(1, Ordering::Relaxed);
                }
                Fault::Truncate { dir: d, pdu } if d == dir && pdu == ty && has_data => {
                    cut = Some(data_start + (data_end - data_start) / 2);
                    *f = Fault::None;
                    sh.hits.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        if let Some(n) = cut {
            let _ = to.write_all(&buf[..n]);
            let _ = to.flush();
            thread::sleep(Duration::from_millis(50));
            break;
        }
        if to.write_all(&buf).is_err() {
            break;
        }
    }
    close(&from, &to);
}
