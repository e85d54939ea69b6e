//! Fuzzing of the parsers, and end-to-end handshake and I/O tests over
//! socket pairs and real listeners (malloc bdevs on a test runtime).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::decode::tests::req;
use crate::negotiate::tests::{geom, FakeCatalog};
use crate::proto::*;
use crate::{Decoder, Event, HsEvent, Negotiator};

// ---------------------------------------------------------------- fuzzing

/// Runs one byte stream through the handshake and then the request parser,
/// delivered in random pieces, as a connection would. Returns the number
/// of events; panics only if a parser does.
fn drive(stream: &[u8], rng: &mut StdRng) -> usize {
    let mut cat = FakeCatalog(vec![
        ("disk".into(), geom()),
        (
            "ro".into(),
            Geometry {
                readonly: true,
                block_size: 4096,
                ..geom()
            },
        ),
    ]);
    let mut neg = Negotiator::new();
    let mut dec: Option<Decoder> = None;
    let mut rx: Vec<u8> = Vec::new();
    let mut pos = 0;
    let mut events = 0;
    let mut out = Vec::new();
    while pos < stream.len() {
        let n = rng.gen_range(1..=stream.len() - pos);
        rx.extend_from_slice(&stream[pos..pos + n]);
        pos += n;
        loop {
            let (used, progressed) = match &mut dec {
                None => {
                    out.clear();
                    let (used, ev) = neg.next(&rx, &mut cat, &mut out);
                    assert!(used <= rx.len());
                    let p = used > 0 || ev.is_some();
                    match ev {
                        Some(HsEvent::Go { geometry, .. }) => {
                            dec = Some(Decoder::new(geometry));
                        }
                        Some(HsEvent::Abort) | Some(HsEvent::Close(_)) => return events + 1,
                        None => {}
                    }
                    events += usize::from(p);
                    (used, p)
                }
                Some(d) => {
                    let (used, ev) = d.next(&rx);
                    assert!(used <= rx.len());
                    let p = used > 0 || ev.is_some();
                    match ev {
                        Some(Event::Request { cmd, .. }) => {
                            if let crate::Command::Write { data, .. } = &cmd {
                                assert!(data.len() as u64 <= d.geometry().size);
                            }
                            events += 1;
                        }
                        Some(Event::Error { error, .. }) => {
                            assert!(error != 0);
                            events += 1;
                        }
                        Some(Event::Disconnect) | Some(Event::Close(_)) => return events + 1,
                        None => {}
                    }
                    (used, p)
                }
            };
            rx.drain(..used);
            if !progressed {
                break;
            }
        }
    }
    events
}

fn opt(o: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(IHAVEOPT);
    v.put_u32(o);
    v.put_u32(data.len() as u32);
    v.extend_from_slice(data);
    v
}

fn go(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u32(name.len() as u32);
    d.extend_from_slice(name.as_bytes());
    d.put_u16(reqs.len() as u16);
    for r in reqs {
        d.put_u16(*r);
    }
    opt(OPT_GO, &d)
}

/// A plausible session: some options, GO, a mix of requests, DISC.
fn valid_session(rng: &mut StdRng) -> Vec<u8> {
    let mut s = 1u32.to_be_bytes().to_vec();
    for _ in 0..rng.gen_range(0..4) {
        match rng.gen_range(0..4) {
            0 => s.extend(opt(OPT_LIST, &[])),
            1 => s.extend(opt(OPT_STRUCTURED_REPLY, &[])),
            2 => s.extend(opt(OPT_INFO, &go("disk", &[INFO_BLOCK_SIZE])[16..])),
            _ => s.extend(opt(rng.gen(), &[1, 2, 3])),
        }
    }
    if rng.gen_bool(0.2) {
        s.extend(opt(OPT_EXPORT_NAME, b"disk"));
    } else {
        s.extend(go(if rng.gen_bool(0.8) { "disk" } else { "ro" }, &[]));
    }
    for h in 0..rng.gen_range(0..20u64) {
        let typ = [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES][rng.gen_range(0..5)];
        let off = rng.gen_range(0..2048u64) * 512;
        let len = rng.gen_range(1..16u32) * 512;
        let flags = if rng.gen_bool(0.3) { CMD_FLAG_FUA } else { 0 };
        s.extend(req(typ, flags, h, off, len));
        if typ == CMD_WRITE {
            s.extend(std::iter::repeat_n(h as u8, len as usize));
        }
    }
    if rng.gen_bool(0.5) {
        s.extend(req(CMD_DISC, 0, 0, 0, 0));
    }
    s
}

/// Overwrites a big-endian u32 at a random offset with an extreme value.
fn poke_len(s: &mut [u8], rng: &mut StdRng) {
    if s.len() < 4 {
        return;
    }
    let at = rng.gen_range(0..s.len() - 3);
    let v: u32 =
        [0, 1, 511, 512, 4096, MAX_PAYLOAD, MAX_PAYLOAD + 1, u32::MAX][rng.gen_range(0..8)];
    s[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn mutate(s: &mut Vec<u8>, rng: &mut StdRng) {
    for _ in 0..rng.gen_range(1..8) {
        if s.is_empty() {
            s.push(rng.gen());
            continue;
        }
        let at = rng.gen_range(0..s.len());
        match rng.gen_range(0..6) {
            0 => s[at] ^= 1 << rng.gen_range(0..8),
            1 => s[at] = rng.gen(),
            2 => s.insert(at, rng.gen()),
            3 => {
                s.remove(at);
            }
            4 => s.truncate(at),
            _ => poke_len(s, rng),
        }
    }
}

/// Seeded random and mutated byte streams, for a bounded time: the
/// parsers must never panic, never consume more than they were given and
/// never allocate a write buffer larger than the export.
#[test]
fn fuzz_parsers_never_panic() {
    let secs: u64 = std::env::var("WC_NBD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let seed: u64 = std::env::var("WC_NBD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e_6264);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut runs = 0u64;
    let mut events = 0usize;
    while Instant::now() < deadline || runs < 2000 {
        let stream = match runs % 3 {
            // Pure noise, sometimes behind a valid prefix.
            0 => {
                let mut s = if rng.gen_bool(0.5) {
                    let mut p = 1u32.to_be_bytes().to_vec();
                    p.extend(go("disk", &[]));
                    p
                } else {
                    Vec::new()
                };
                let n = rng.gen_range(0..512);
                s.extend((0..n).map(|_| rng.gen::<u8>()));
                s
            }
            // Valid sessions, mutated.
            1 => {
                let mut s = valid_session(&mut rng);
                mutate(&mut s, &mut rng);
                s
            }
            // Valid sessions, whole.
            _ => valid_session(&mut rng),
        };
        events += drive(&stream, &mut rng);
        runs += 1;
    }
    assert!(events > runs as usize, "the fuzzer reached the parsers");
    println!("fuzz: {runs} streams, {events} events, seed {seed}");
}

// ------------------------------------------------------- test NBD client

/// A small blocking NBD client (the test's own; real clients are covered
/// by the integration tests).
struct Client {
    s: UnixStream,
    size: u64,
    flags: u16,
    sizes: (u32, u32, u32),
    reads: HashMap<u64, usize>,
}

fn read_exact(s: &mut UnixStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

impl Client {
    /// Greeting, client flags, GO `name` with a block-size request.
    fn go(mut s: UnixStream, name: &str) -> Result<Client, u32> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let g = read_exact(&mut s, 18).unwrap();
        assert_eq!(&g[..], &greeting());
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(&go(name, &[INFO_BLOCK_SIZE])).unwrap();
        let (mut size, mut flags, mut sizes) = (0, 0, (0, 0, 0));
        loop {
            let h = read_exact(&mut s, 20).unwrap();
            assert_eq!(be64(&h, 0), Some(OPT_REPLY_MAGIC));
            assert_eq!(be32(&h, 8), Some(OPT_GO));
            let t = be32(&h, 12).unwrap();
            let d = read_exact(&mut s, be32(&h, 16).unwrap() as usize).unwrap();
            match t {
                REP_ACK => break,
                REP_INFO if be16(&d, 0) == Some(INFO_EXPORT) => {
                    size = be64(&d, 2).unwrap();
                    flags = be16(&d, 10).unwrap();
                }
                REP_INFO if be16(&d, 0) == Some(INFO_BLOCK_SIZE) => {
                    sizes = (
                        be32(&d, 2).unwrap(),
                        be32(&d, 6).unwrap(),
                        be32(&d, 10).unwrap(),
                    );
                }
                REP_INFO => {}
                e => return Err(e),
            }
        }
        Ok(Client {
            s,
            size,
            flags,
            sizes,
            reads: HashMap::new(),
        })
    }

    fn send(&mut self, typ: u16, flags: u16, handle: u64, off: u64, len: u32, data: &[u8]) {
        let mut m = req(typ, flags, handle, off, len);
        m.extend_from_slice(data);
        if typ == CMD_READ {
            self.reads.insert(handle, len as usize);
        }
        self.s.write_all(&m).unwrap();
    }

    /// One reply: (handle, error, data).
    fn recv(&mut self) -> (u64, u32, Vec<u8>) {
        let h = read_exact(&mut self.s, 16).unwrap();
        assert_eq!(be32(&h, 0), Some(SIMPLE_REPLY_MAGIC));
        let (err, handle) = (be32(&h, 4).unwrap(), be64(&h, 8).unwrap());
        let len = self.reads.remove(&handle).unwrap_or(0);
        let data = if err == 0 && len > 0 {
            read_exact(&mut self.s, len).unwrap()
        } else {
            Vec::new()
        };
        (handle, err, data)
    }

    fn call(&mut self, typ: u16, flags: u16, off: u64, len: u32, data: &[u8]) -> (u32, Vec<u8>) {
        self.send(typ, flags, 7, off, len, data);
        let (h, e, d) = self.recv();
        assert_eq!(h, 7);
        (e, d)
    }
}

// ------------------------------------------------- end-to-end on reactors

struct Env {
    rt: wc_reactor::Runtime,
}

fn env(bdev: &str, export: &str, block: u32, blocks: u64, readonly: bool) -> Env {
    let rt = wc_bdev::testing::test_runtime(2);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(bdev, blocks, block)).unwrap();
    crate::create_export(bdev, export, readonly).unwrap();
    Env { rt }
}

fn pair_client(e: &Env, export: &str, reactor: usize) -> Result<Client, u32> {
    let (a, b) = UnixStream::pair().unwrap();
    crate::serve_on(&e.rt.handles()[reactor], crate::NbdStream::Unix(a));
    Client::go(b, export)
}

#[test]
fn handshake_and_io_over_a_socketpair() {
    let e = env("NbdT0", "exp0", 512, 2048, false);
    let mut c = pair_client(&e, "exp0", 1).unwrap();
    assert_eq!(c.size, 2048 * 512);
    assert_eq!(c.sizes, (512, 4096, MAX_PAYLOAD));
    let want = TFLAG_HAS_FLAGS
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES;
    assert_eq!(c.flags, want);
    assert_eq!(
        crate::exports()[..]
            .iter()
            .find(|x| x.export_name == "exp0")
            .unwrap()
            .connections,
        1
    );

    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(c.call(CMD_WRITE, CMD_FLAG_FUA, 4096, 8192, &data).0, 0);
    let (err, back) = c.call(CMD_READ, 0, 4096, 8192, &[]);
    assert_eq!((err, back == data), (0, true));
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).0, 0);
    assert_eq!(c.call(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 4096, 512, &[]).0, 0);
    assert_eq!(c.call(CMD_TRIM, 0, 8192, 512, &[]).0, 0);
    let (_, back) = c.call(CMD_READ, 0, 4096, 1024, &[]);
    assert!(back[..512].iter().all(|&b| b == 0));
    assert_eq!(&back[512..], &data[512..1024]);
    // Errors keep the connection usable.
    assert_eq!(c.call(CMD_READ, 0, 100, 512, &[]).0, errno::EINVAL);
    assert_eq!(c.call(CMD_READ, 0, c.size, 512, &[]).0, errno::EINVAL);
    assert_eq!(
        c.call(CMD_WRITE, 0, c.size, 512, &[0; 512]).0,
        errno::ENOSPC
    );
    assert_eq!(c.call(9, 0, 0, 0, &[]).0, errno::EINVAL);
    assert_eq!(c.call(CMD_READ, 0, 0, 512, &[]).0, 0);

    // Many requests in flight; replies matched by handle.
    let mut want = HashMap::new();
    for h in 0..200u64 {
        let off = (h % 64) * 4096;
        if h % 2 == 0 {
            let buf = vec![h as u8; 4096];
            c.send(CMD_WRITE, 0, 1000 + h, off + 2048 * 512 / 2, 4096, &buf);
            want.insert(1000 + h, 0usize);
        } else {
            c.send(CMD_READ, 0, 1000 + h, off, 4096, &[]);
            want.insert(1000 + h, 4096);
        }
    }
    for _ in 0..200 {
        let (h, err, d) = c.recv();
        assert_eq!(err, 0);
        assert_eq!(want.remove(&h), Some(d.len()));
    }
    assert!(want.is_empty());
    // DISC: the server finishes and closes.
    c.send(CMD_DISC, 0, 0, 0, 0, &[]);
    let mut rest = Vec::new();
    assert_eq!(c.s.read_to_end(&mut rest).unwrap(), 0);
    crate::delete_export("exp0").unwrap();
}

#[test]
fn readonly_export_and_refusals() {
    let e = env("NbdT1", "exp1", 4096, 256, true);
    let mut c = pair_client(&e, "exp1", 0).unwrap();
    assert_ne!(c.flags & TFLAG_READ_ONLY, 0);
    assert_eq!(c.flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
    assert_eq!(c.sizes.0, 4096);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[1; 4096]).0, errno::EPERM);
    assert_eq!(c.call(CMD_TRIM, 0, 0, 4096, &[]).0, errno::EPERM);
    assert_eq!(c.call(CMD_READ, 0, 512, 512, &[]).0, errno::EINVAL);
    assert_eq!(c.call(CMD_READ, 0, 0, 4096, &[]).0, 0);
    // Unknown export: an error reply, the option phase goes on.
    assert!(matches!(pair_client(&e, "nope", 1), Err(REP_ERR_UNKNOWN)));
    // A client that is not fixed-newstyle is dropped after the greeting.
    let (a, mut b) = UnixStream::pair().unwrap();
    crate::serve_on(&e.rt.handles()[1], crate::NbdStream::Unix(a));
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    read_exact(&mut b, 18).unwrap();
    b.write_all(&0u32.to_be_bytes()).unwrap();
    let mut rest = Vec::new();
    assert_eq!(b.read_to_end(&mut rest).unwrap(), 0);
    // A write too large for the protocol ends the session.
    c.send(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 4096, &[]);
    let mut rest = Vec::new();
    assert_eq!(c.s.read_to_end(&mut rest).unwrap(), 0);
    // Deleting the export closes its connections.
    let c2 = pair_client(&e, "exp1", 1).unwrap();
    crate::delete_export("exp1").unwrap();
    let mut s = c2.s;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(crate::delete_export("exp1").is_err());
}

#[test]
fn client_vanishing_mid_request_leaves_the_server_working() {
    let e = env("NbdT2", "exp2", 512, 4096, false);
    for i in 0..20 {
        let mut c = pair_client(&e, "exp2", i % 2).unwrap();
        // Half a write payload, or many reads never collected.
        if i % 2 == 0 {
            c.send(CMD_WRITE, 0, 1, 0, 65536, &[5; 1000]);
        } else {
            for h in 0..50 {
                c.send(CMD_READ, 0, h, 0, 65536, &[]);
            }
        }
        drop(c);
    }
    let mut c = pair_client(&e, "exp2", 1).unwrap();
    assert_eq!(c.call(CMD_WRITE, 0, 0, 512, &[9; 512]).0, 0);
    assert_eq!(c.call(CMD_READ, 0, 0, 512, &[]).1, vec![9; 512]);
    crate::delete_export("exp2").unwrap();
}

#[test]
fn listeners_unix_and_tcp() {
    let e = env("NbdT3", "exp3", 512, 1024, false);
    let main = e.rt.main().clone();
    let dir = std::env::temp_dir().join(format!("wcnbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nbd.sock");
    let p = path.to_str().unwrap().to_string();
    let p2 = p.clone();
    assert_eq!(
        main.call_blocking(move || crate::start_server(&p2))
            .unwrap(),
        Ok(p.clone())
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let p2 = p.clone();
    let dup = main
        .call_blocking(move || crate::start_server(&p2))
        .unwrap();
    assert_eq!(dup.unwrap_err().errno(), libc::EEXIST);
    let mut c = Client::go(UnixStream::connect(&path).unwrap(), "exp3").unwrap();
    assert_eq!(c.call(CMD_WRITE, 0, 512, 512, &[3; 512]).0, 0);
    assert_eq!(
        crate::servers()
            .iter()
            .find(|s| s.listen == p)
            .unwrap()
            .connections,
        1
    );

    // TCP on an ephemeral port: the reply names the port.
    let tcp = main
        .call_blocking(|| crate::start_server("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    assert!(
        tcp.starts_with("127.0.0.1:") && !tcp.ends_with(":0"),
        "{tcp}"
    );
    let mut t = std::net::TcpStream::connect(&tcp).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    t.read_exact(&mut g).unwrap();
    assert_eq!(g, greeting());
    // IPv6 literals, where the host has IPv6.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let v6 = main
            .call_blocking(|| crate::start_server("[::1]:0"))
            .unwrap()
            .unwrap();
        assert!(v6.starts_with("[::1]:"), "{v6}");
        let mut s = std::net::TcpStream::connect(&v6).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_exact(&mut g).unwrap();
        assert_eq!(g, greeting());
        crate::stop_server(&v6).unwrap();
    }
    // Someone else's port: address in use.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let r = main
        .call_blocking(move || crate::start_server(&addr))
        .unwrap();
    assert_eq!(r.unwrap_err().errno(), libc::EADDRINUSE);
    let r = main
        .call_blocking(|| crate::start_server("nowhere"))
        .unwrap();
    assert_eq!(r.unwrap_err().errno(), libc::EINVAL);

    // Stopping closes the listener, its connections and the socket file.
    crate::stop_server(&p).unwrap();
    assert!(!path.exists());
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(UnixStream::connect(&path).is_err());
    crate::stop_server(&tcp).unwrap();
    assert_eq!(crate::stop_server(&tcp).unwrap_err().errno(), libc::ENODEV);
    // A stale socket file is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let p2 = p.clone();
    main.call_blocking(move || crate::start_server(&p2))
        .unwrap()
        .unwrap();
    let cfg = crate::config_entries();
    assert!(cfg.iter().any(|v| v["params"]["listen"] == p.as_str()));
    assert!(cfg.iter().any(|v| v["params"]["export_name"] == "exp3"));
    crate::stop_server(&p).unwrap();
    crate::delete_export("exp3").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn export_errors() {
    let _e = env("NbdT4", "exp4", 512, 64, false);
    assert_eq!(
        crate::create_export("NbdT4", "exp4", false)
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(
        crate::create_export("NoSuchBdev", "x", false)
            .unwrap_err()
            .errno(),
        libc::ENODEV
    );
    assert_eq!(
        crate::create_export("NbdT4", &"n".repeat(5000), false)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    // Deleting the bdev removes its export.
    wc_bdev_malloc::delete("NbdT4").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while crate::exports().iter().any(|e| e.export_name == "exp4") {
        assert!(Instant::now() < deadline, "export outlived its bdev");
        std::thread::sleep(Duration::from_millis(10));
    }
}
