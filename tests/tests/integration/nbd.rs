//! The NBD export target (`exports/nbd`, crate `wc-nbd`) driven by real
//! NBD clients nobody here wrote: `nbdinfo` and `nbdcopy` (libnbd-bin),
//! `qemu-io` (qemu-utils) and fio's `nbd` engine, plus raw sockets that
//! misbehave. The RPCs go through SPDK's `spdk-rpc` with our plugin
//! `scripts/writecache_rpc.py`.
//!
//! A client binary that is missing skips its test with a printed reason,
//! unless `WC_REQUIRE_SPDK_RPC=1` (as `scripts/test.sh` sets), which makes
//! it a failure.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{
    have, run_bounded, scripts_dir, signal, spdk_rpc_cmd, Out, Target, EXIT_TIMEOUT, RPC_TIMEOUT,
};

/// How long one client run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// `spdk-rpc --plugin writecache_rpc ...` against `t` (the project's one
/// plugin has the `nbd_*` commands too).
fn nbd_rpc(t: &Target, args: &[&str]) -> Out {
    let mut cmd = spdk_rpc_cmd(
        &["-s", t.sock_str(), "-t", "10", "--plugin", "writecache_rpc"],
        args,
    );
    cmd.env("PYTHONPATH", scripts_dir());
    run_bounded(cmd, RPC_TIMEOUT)
}

fn nbd_ok(t: &Target, args: &[&str]) -> String {
    let out = nbd_rpc(t, args);
    assert_eq!(
        out.code,
        0,
        "spdk-rpc {args:?}: {}\n--- target log ---\n{}",
        out.all(),
        t.log()
    );
    out.stdout
}

fn nbd_json(t: &Target, args: &[&str]) -> Value {
    let s = nbd_ok(t, args);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {s}"))
}

/// The errno-style code of a failed call (`-17`, `-19`, ...).
fn nbd_err(t: &Target, args: &[&str]) -> i64 {
    let out = nbd_rpc(t, args);
    assert_eq!(out.code, 1, "spdk-rpc {args:?} should fail: {out:?}");
    let all = out.all();
    let at = all
        .find("\"code\": ")
        .unwrap_or_else(|| panic!("no error code in {all}"));
    let rest = &all[at + 8..];
    let end = rest
        .find(|c: char| c != '-' && !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().expect("an integer code")
}

fn uri(export: &str, sock: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Runs a client with a wall-clock bound.
fn client(program: &str, args: &[&str]) -> Out {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_bounded(cmd, CLIENT_TIMEOUT)
}

fn client_ok(t: &Target, program: &str, args: &[&str]) -> Out {
    let out = client(program, args);
    assert_eq!(
        out.code,
        0,
        "{program} {args:?}: {}\n--- target log ---\n{}",
        out.all(),
        t.log()
    );
    out
}

/// A target with malloc bdev `Malloc0` (64 MiB, 512-byte blocks), an NBD
/// server on `<dir>/nbd.sock` and export `disk0`.
fn nbd_target(tag: &str) -> (Target, PathBuf) {
    let t = Target::start(tag, &[]);
    let sock = t.dir.join("nbd.sock");
    t.rpc_ok(&["bdev_malloc_create", "-b", "Malloc0", "64", "512"]);
    let s = sock.to_str().expect("utf-8");
    assert_eq!(nbd_ok(&t, &["nbd_server_start", s]).trim(), s);
    assert_eq!(
        nbd_ok(&t, &["nbd_export_create", "Malloc0", "disk0"]).trim(),
        "disk0"
    );
    (t, sock)
}

#[test]
fn nbd_nbdinfo_shows_size_block_size_and_list() {
    require_spdk_rpc!();
    require_clients!("nbdinfo");
    let (t, sock) = nbd_target("nbdinfo");
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the NBD socket is owner-only");
    let out = client_ok(&t, "nbdinfo", &[&uri("disk0", &sock)]);
    let text = out.stdout;
    for want in [
        "export-size: 67108864",
        "block_size_minimum: 512",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "is_read_only: false",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
    ] {
        assert!(text.contains(want), "nbdinfo lacks '{want}':\n{text}");
    }
    // A 4 KiB-block read-only export.
    t.rpc_ok(&["bdev_malloc_create", "-b", "Malloc1", "8", "4096"]);
    nbd_ok(&t, &["nbd_export_create", "Malloc1", "ro", "--readonly"]);
    let text = client_ok(&t, "nbdinfo", &[&uri("ro", &sock)]).stdout;
    for want in [
        "export-size: 8388608",
        "block_size_minimum: 4096",
        "is_read_only: true",
        "can_trim: false",
    ] {
        assert!(text.contains(want), "nbdinfo lacks '{want}':\n{text}");
    }
    // NBD_OPT_LIST.
    let list = client_ok(
        &t,
        "nbdinfo",
        &["--list", &format!("nbd+unix://?socket={}", sock.display())],
    )
    .stdout;
    assert!(list.contains("disk0") && list.contains("ro"), "{list}");
    // An unknown export is an error, not a hang.
    let out = client("nbdinfo", &[&uri("nope", &sock)]);
    assert_ne!(out.code, 0, "{out:?}");
    let exports = nbd_json(&t, &["nbd_get_exports"]);
    assert_eq!(
        exports,
        json!([
            {"export_name": "disk0", "bdev_name": "Malloc0", "readonly": false, "connections": 0},
            {"export_name": "ro", "bdev_name": "Malloc1", "readonly": true, "connections": 0},
        ])
    );
    t.stop();
}

#[test]
fn nbd_qemu_io_write_read_flush() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let (t, sock) = nbd_target("qemuio");
    let u = uri("disk0", &sock);
    let qio = |cmds: &[&str]| {
        let mut a = vec!["-f", "raw", u.as_str()];
        for c in cmds {
            a.push("-c");
            a.push(c);
        }
        client("qemu-io", &a)
    };
    let out = qio(&["write -P 0xab 0 1M", "read -P 0xab 0 1M", "flush"]);
    assert_eq!(out.code, 0, "{out:?}\n{}", t.log());
    assert!(!out.all().contains("failed"), "{out:?}");
    // A different pattern does not verify: the data really is on the bdev.
    let out = qio(&["read -P 0xcd 0 1M"]);
    assert_ne!(out.code, 0, "a mismatching pattern must fail: {out:?}");
    assert!(out.all().contains("Pattern verification failed"), "{out:?}");
    // FUA writes, write-zeroes (with FUA), discard, an unaligned read
    // (qemu widens it to the block size).
    let out = qio(&[
        "write -f -P 0x11 128k 4k",
        "read -P 0x11 128k 4k",
        "write -z -f 0 64k",
        "read -P 0 0 64k",
        "discard 1M 64k",
        "read -P 0xab 64k 64k",
        "read 3 5",
    ]);
    assert_eq!(out.code, 0, "{out:?}\n{}", t.log());
    assert!(!out.all().contains("failed"), "{out:?}");
    // A read-only export refuses writes.
    nbd_ok(&t, &["nbd_export_create", "Malloc0", "ro0", "-r"]);
    let ro = uri("ro0", &sock);
    let out = client(
        "qemu-io",
        &["-f", "raw", "-r", &ro, "-c", "read -P 0x11 128k 4k"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let out = client("qemu-io", &["-f", "raw", &ro, "-c", "write 0 4k"]);
    assert!(
        out.code != 0 || out.all().contains("failed"),
        "writing a read-only export must fail: {out:?}"
    );
    t.stop();
}

#[test]
fn nbd_nbdcopy_round_trip() {
    require_spdk_rpc!();
    require_clients!("nbdcopy");
    let (t, sock) = nbd_target("nbdcopy");
    let input = t.dir.join("in.img");
    let output = t.dir.join("out.img");
    let mut data = vec![0u8; 8 << 20];
    let mut x = 0x1234_5678_9abc_def1u64;
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&input, &data).expect("write input");
    let u = uri("disk0", &sock);
    // nbdcopy uses several connections (CAN_MULTI_CONN) and many requests
    // in flight.
    client_ok(&t, "nbdcopy", &[input.to_str().expect("utf-8"), &u]);
    client_ok(&t, "nbdcopy", &[&u, output.to_str().expect("utf-8")]);
    let back = std::fs::read(&output).expect("read output");
    assert_eq!(back.len(), 64 << 20);
    assert!(
        back[..data.len()] == data[..],
        "data differs after the round trip"
    );
    assert!(back[data.len()..].iter().all(|&b| b == 0));
    t.stop();
}

#[test]
fn nbd_fio_verify_job() {
    require_spdk_rpc!();
    require_clients!("fio");
    let (t, sock) = nbd_target("nbdfio");
    let engines = client("fio", &["--enghelp"]);
    if !engines.all().contains("nbd") {
        if std::env::var("WC_REQUIRE_SPDK_RPC").as_deref() == Ok("1") {
            panic!("fio lacks the nbd engine: {engines:?}");
        }
        println!("SKIP: this fio has no nbd engine");
        t.stop();
        return;
    }
    let job = t.dir.join("verify.fio");
    std::fs::write(
        &job,
        format!(
            "[verify]\nioengine=nbd\nuri={}\nrw=randwrite\nverify=crc32c\nsize=16m\nbs=4k\niodepth=8\n",
            uri("disk0", &sock)
        ),
    )
    .expect("write job");
    let mut cmd = Command::new("fio");
    cmd.arg(&job).current_dir(&t.dir);
    let out = run_bounded(cmd, CLIENT_TIMEOUT);
    assert_eq!(out.code, 0, "{out:?}\n{}", t.log());
    assert!(out.stdout.contains("err= 0"), "{}", out.stdout);
    t.stop();
}

#[test]
fn nbd_tcp_listener() {
    require_spdk_rpc!();
    require_clients!("qemu-io", "nbdinfo");
    let (t, _) = nbd_target("nbdtcp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    assert_eq!(nbd_ok(&t, &["nbd_server_start", &listen]).trim(), listen);
    let u = format!("nbd://127.0.0.1:{port}/disk0");
    let out = client_ok(
        &t,
        "qemu-io",
        &[
            "-f",
            "raw",
            &u,
            "-c",
            "write -P 0x5a 4k 64k",
            "-c",
            "read -P 0x5a 4k 64k",
        ],
    );
    assert!(!out.all().contains("failed"), "{out:?}");
    let info = client_ok(&t, "nbdinfo", &["--size", &u]).stdout;
    assert_eq!(info.trim(), "67108864");
    // The same address again: exists. Someone else's port: in use.
    assert_eq!(nbd_err(&t, &["nbd_server_start", &listen]), -17);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let other = busy.local_addr().expect("addr").to_string();
    assert_eq!(nbd_err(&t, &["nbd_server_start", &other]), -98);
    let servers = nbd_json(&t, &["nbd_get_servers"]);
    assert!(
        servers
            .as_array()
            .expect("array")
            .iter()
            .any(|s| s["listen"] == listen.as_str() && s["transport"] == "tcp"),
        "{servers}"
    );
    assert_eq!(nbd_ok(&t, &["nbd_server_stop", &listen]).trim(), "true");
    assert!(std::net::TcpStream::connect(&listen).is_err());
    t.stop();
}

#[test]
fn nbd_rpc_errors_are_precise() {
    require_spdk_rpc!();
    let (t, sock) = nbd_target("nbderrs");
    let s = sock.to_str().expect("utf-8");
    assert_eq!(nbd_err(&t, &["nbd_server_start", s]), -17);
    assert_eq!(nbd_err(&t, &["nbd_export_create", "Malloc0", "disk0"]), -17);
    assert_eq!(nbd_err(&t, &["nbd_export_create", "NoSuchBdev", "x"]), -19);
    assert_eq!(nbd_err(&t, &["nbd_export_delete", "nope"]), -19);
    assert_eq!(nbd_err(&t, &["nbd_server_stop", "/nowhere/x.sock"]), -19);
    assert_eq!(nbd_err(&t, &["nbd_get_exports", "-e", "nope"]), -19);
    for bad in ["nbd.sock", "example.com:10809", "127.0.0.1:99999", "::1:5"] {
        assert_eq!(nbd_err(&t, &["nbd_server_start", bad]), -22, "{bad}");
    }
    // A live Unix socket of someone else: address in use; a regular file
    // is not clobbered either.
    let theirs = t.dir.join("theirs.sock");
    let _l = std::os::unix::net::UnixListener::bind(&theirs).expect("bind");
    assert_eq!(
        nbd_err(&t, &["nbd_server_start", theirs.to_str().expect("utf-8")]),
        -98
    );
    let file = t.dir.join("file");
    std::fs::write(&file, b"keep").expect("write");
    assert_eq!(
        nbd_err(&t, &["nbd_server_start", file.to_str().expect("utf-8")]),
        -98
    );
    assert_eq!(std::fs::read(&file).expect("read"), b"keep");
    // Strict parameter decoding.
    let mut c = t.client();
    for (m, p) in [
        (
            "nbd_server_start",
            json!({"listen": "/tmp/x.sock", "port": 1}),
        ),
        ("nbd_server_start", json!({})),
        ("nbd_export_create", json!({"bdev_name": "Malloc0"})),
        (
            "nbd_export_create",
            json!({"bdev_name": "Malloc0", "export_name": "y", "readonly": "yes"}),
        ),
        ("nbd_export_delete", json!({"name": "disk0"})),
        ("nbd_get_servers", json!({"x": 1})),
    ] {
        let e = c.call(m, Some(p.clone())).unwrap_err();
        assert_eq!(e.code, -32602, "{m} {p}: {e:?}");
    }
    // Deleting the export, then the bdev: nothing left behind.
    assert_eq!(nbd_ok(&t, &["nbd_export_delete", "disk0"]).trim(), "true");
    assert_eq!(nbd_json(&t, &["nbd_get_exports"]), json!([]));
    t.rpc_ok(&["bdev_malloc_delete", "Malloc0"]);
    // Exporting a bdev that goes away removes the export.
    t.rpc_ok(&["bdev_malloc_create", "-b", "Gone", "8", "512"]);
    nbd_ok(&t, &["nbd_export_create", "Gone", "gone"]);
    t.rpc_ok(&["bdev_malloc_delete", "Gone"]);
    let mut left = Value::Null;
    for _ in 0..100 {
        left = nbd_json(&t, &["nbd_get_exports"]);
        if left == json!([]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(left, json!([]));
    assert_eq!(nbd_ok(&t, &["nbd_server_stop", s]).trim(), "true");
    assert!(!sock.exists(), "stopping removes the socket file");
    t.stop();
}

// ------------------------------------------------------- misbehaving clients

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;

fn raw_connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

fn option(o: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend(o.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    v
}

fn go_option(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend(0u16.to_be_bytes());
    option(7, &d)
}

fn request(typ: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend(0u16.to_be_bytes());
    v.extend(typ.to_be_bytes());
    v.extend(handle.to_be_bytes());
    v.extend(offset.to_be_bytes());
    v.extend(len.to_be_bytes());
    v
}

/// Reads GO's replies up to the final one; true on NBD_REP_ACK.
fn read_go_replies(s: &mut UnixStream) -> bool {
    loop {
        let mut h = [0u8; 20];
        if s.read_exact(&mut h).is_err() {
            return false;
        }
        let typ = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut d = vec![0u8; len];
        if s.read_exact(&mut d).is_err() {
            return false;
        }
        if typ != 3 {
            return typ == 1;
        }
    }
}

/// Reads until the server closes (true) or the timeout (false).
fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut sink = Vec::new();
    s.read_to_end(&mut sink).is_ok()
}

#[test]
fn nbd_malformed_clients_do_not_hurt_others() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let (mut t, sock) = nbd_target("nbdbad");
    let u = uri("disk0", &sock);
    // A well-behaved client before...
    client_ok(
        &t,
        "qemu-io",
        &["-f", "raw", &u, "-c", "write -P 0x42 0 256k"],
    );

    // An oldstyle / non-fixed-newstyle client is dropped.
    let mut s = raw_connect(&sock);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    s.write_all(&0u32.to_be_bytes()).expect("flags");
    assert!(closed_by_server(&mut s));

    // Garbage of every kind, in the handshake and in transmission: the
    // protocol violations make the server hang up (`true`), the rest get
    // error replies or are simply waited for until the client leaves.
    let hello = 1u32.to_be_bytes();
    let cases: Vec<(Vec<u8>, bool)> = vec![
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), true),
        ([&hello[..], &[0xff; 64][..]].concat(), true),
        // An option longer than anything sane.
        (
            [
                &hello[..],
                &IHAVEOPT.to_be_bytes()[..],
                &7u32.to_be_bytes()[..],
                &u32::MAX.to_be_bytes()[..],
            ]
            .concat(),
            true,
        ),
        // Transmission: a bad magic; a write larger than the maximum.
        (
            [&hello[..], &go_option("disk0"), &[0u8; 28][..]].concat(),
            true,
        ),
        (
            [
                &hello[..],
                &go_option("disk0"),
                &request(1, 1, 0, u32::MAX)[..],
            ]
            .concat(),
            true,
        ),
        // A write cut short: the server waits for the rest.
        (
            [
                &hello[..],
                &go_option("disk0"),
                &request(1, 1, 0, 1 << 20)[..],
                &[7u8; 1000][..],
            ]
            .concat(),
            false,
        ),
    ];
    for (i, (bytes, closes)) in cases.iter().enumerate() {
        let mut s = raw_connect(&sock);
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        s.write_all(bytes).expect("send");
        if *closes {
            assert!(closed_by_server(&mut s), "case {i}: the server hangs up");
        }
    }
    // A GO whose name length lies: an error reply, and the session goes on.
    let mut s = raw_connect(&sock);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    s.write_all(&[&hello[..], &option(7, &[0, 0, 0x10, 0, b'x'])[..]].concat())
        .expect("send");
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("an option reply");
    assert_eq!(
        u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
        0x8000_0003
    );
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
    let mut msg = vec![0u8; len];
    s.read_exact(&mut msg).expect("its message");
    // Reads past the end, unaligned or empty, unknown commands: EINVAL
    // replies, each with its handle, on a connection that stays usable.
    s.write_all(&go_option("disk0")).expect("send");
    assert!(read_go_replies(&mut s), "GO accepted");
    let mut reqs = Vec::new();
    for (h, (typ, off, len)) in [
        (0u16, u64::MAX - 511, 512u32),
        (0, 3, 512),
        (42, 0, 0),
        (0, 0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        reqs.extend(request(typ, h as u64, off, len));
    }
    reqs.extend(request(0, 99, 0, 512));
    s.write_all(&reqs).expect("send");
    for h in 0..4u64 {
        let mut r = [0u8; 16];
        s.read_exact(&mut r).expect("an error reply");
        assert_eq!(
            u32::from_be_bytes([r[4], r[5], r[6], r[7]]),
            22,
            "EINVAL for {h}"
        );
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().expect("8 bytes")), h);
    }
    let mut r = [0u8; 16 + 512];
    s.read_exact(&mut r).expect("a read reply");
    assert_eq!(u32::from_be_bytes([r[4], r[5], r[6], r[7]]), 0);
    assert!(
        r[16..].iter().all(|&b| b == 0x42),
        "the data written before"
    );
    drop(s);
    // Clients that vanish mid-handshake or with requests in flight.
    for i in 0..20 {
        let mut s = raw_connect(&sock);
        let mut msg = 1u32.to_be_bytes().to_vec();
        if i % 2 == 0 {
            msg.extend(go_option("disk0"));
            for h in 0..64 {
                msg.extend(request(0, h, 0, 65536));
            }
        } else {
            msg.extend(&go_option("disk0")[..10]);
        }
        let _ = s.write_all(&msg);
    }
    // ... and after: the target is alive, data intact, new clients served.
    assert!(t.alive(), "the target survived:\n{}", t.log());
    let out = client_ok(
        &t,
        "qemu-io",
        &["-f", "raw", &u, "-c", "read -P 0x42 0 256k"],
    );
    assert!(!out.all().contains("failed"), "{out:?}");
    t.rpc_ok(&["bdev_get_bdevs"]);
    t.stop();
}

/// With a slow bdev (delay: 200 ms per I/O), clients that vanish with
/// requests in flight, and an export deleted under active connections,
/// leave the target serving: the I/O completes and its replies are dropped.
#[test]
fn nbd_disconnect_with_io_in_flight() {
    require_spdk_rpc!();
    let (mut t, sock) = nbd_target("nbdinflight");
    t.rpc_ok(&[
        "bdev_delay_create",
        "-b",
        "Malloc0",
        "-d",
        "Slow0",
        "-r",
        "200000",
        "-t",
        "200000",
        "-w",
        "200000",
        "-n",
        "200000",
    ]);
    nbd_ok(&t, &["nbd_export_create", "Slow0", "slow", "--readonly"]);
    let hello = 1u32.to_be_bytes();
    let mut open = Vec::new();
    for i in 0..6 {
        let mut s = raw_connect(&sock);
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        s.write_all(&[&hello[..], &go_option("slow")].concat())
            .expect("GO");
        assert!(read_go_replies(&mut s), "GO accepted");
        let mut reqs = Vec::new();
        for h in 0..32 {
            reqs.extend(request(0, h, h * 4096, 4096));
        }
        s.write_all(&reqs).expect("reads");
        if i < 3 {
            drop(s); // gone with 32 reads in flight
        } else {
            open.push(s);
        }
    }
    let exports = nbd_json(&t, &["nbd_get_exports", "-e", "slow"]);
    assert!(exports[0]["connections"].as_u64().is_some(), "{exports}");
    // Deleting the export closes the remaining connections at once, with
    // their reads still in flight.
    assert_eq!(nbd_ok(&t, &["nbd_export_delete", "slow"]).trim(), "true");
    for mut s in open {
        assert!(
            closed_by_server(&mut s),
            "connection of a deleted export closed"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(t.alive(), "target survived:\n{}", t.log());
    // The delay bdev is no longer held open: it can be deleted.
    t.rpc_ok(&["bdev_delay_delete", "Slow0"]);
    let u = uri("disk0", &sock);
    if have("qemu-io") {
        client_ok(
            &t,
            "qemu-io",
            &["-f", "raw", &u, "-c", "write 0 4k", "-c", "read 0 4k"],
        );
    }
    t.stop();
}

// ------------------------------------------------------ save_config/restart

#[test]
fn nbd_save_config_restart_restores_servers_and_exports() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let (mut t, sock) = nbd_target("nbdsave");
    t.rpc_ok(&["bdev_malloc_create", "-b", "Malloc1", "8", "4096"]);
    nbd_ok(&t, &["nbd_export_create", "Malloc1", "ro1", "--readonly"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let tcp = format!("127.0.0.1:{port}");
    nbd_ok(&t, &["nbd_server_start", &tcp]);
    let saved: Value = serde_json::from_str(&t.rpc_ok(&["save_config"])).expect("JSON");
    let subsystems: Vec<&str> = saved["subsystems"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["subsystem"].as_str())
        .collect();
    let (b, n) = (
        subsystems.iter().position(|s| *s == "bdev").expect("bdev"),
        subsystems.iter().position(|s| *s == "nbd").expect("nbd"),
    );
    assert!(b < n, "nbd comes after bdev: {subsystems:?}");
    let nbd = saved["subsystems"][n]["config"].clone();
    assert_eq!(
        nbd,
        json!([
            {"method": "nbd_server_start", "params": {"listen": sock.to_str().expect("utf-8")}},
            {"method": "nbd_server_start", "params": {"listen": tcp}},
            {"method": "nbd_export_create", "params": {"bdev_name": "Malloc0", "export_name": "disk0", "readonly": false}},
            {"method": "nbd_export_create", "params": {"bdev_name": "Malloc1", "export_name": "ro1", "readonly": true}},
        ])
    );
    let cfg = t.dir.join("saved.json");
    std::fs::write(&cfg, serde_json::to_string_pretty(&saved).expect("json")).expect("write");
    let exports = nbd_json(&t, &["nbd_get_exports"]);
    let servers = nbd_json(&t, &["nbd_get_servers"]);
    t.keep_dir();
    let dir = t.dir.clone();
    t.stop();
    assert!(!sock.exists(), "a clean stop removes the NBD socket");

    let mut t = Target::spawn_in(dir.clone(), &["--json", cfg.to_str().expect("utf-8")]);
    t.wait_ready();
    assert_eq!(nbd_json(&t, &["nbd_get_exports"]), exports);
    assert_eq!(nbd_json(&t, &["nbd_get_servers"]), servers);
    let u = uri("disk0", &sock);
    let out = client_ok(
        &t,
        "qemu-io",
        &[
            "-f",
            "raw",
            &u,
            "-c",
            "write -P 0x77 0 4k",
            "-c",
            "read -P 0x77 0 4k",
        ],
    );
    assert!(!out.all().contains("failed"), "{out:?}");
    let tu = format!("nbd://{tcp}/ro1");
    client_ok(&t, "qemu-io", &["-f", "raw", "-r", &tu, "-c", "read 0 4k"]);
    t.stop();
    let _ = std::fs::remove_dir_all(dir);
}

/// With a writecache (pmem cache file over a uring origin file) exported
/// over NBD: data written and flushed through NBD survives SIGKILL, and
/// the restarted target (same config) serves it back.
#[test]
fn nbd_writecache_data_survives_sigkill() {
    writecache_data_survives_sigkill("pmem");
}

/// The same in ssd mode, the cache a uring bdev over a file: the saved
/// config recreates it in ssd mode and recovery finds the flushed data.
#[test]
fn nbd_writecache_ssd_mode_data_survives_sigkill() {
    writecache_data_survives_sigkill("ssd");
}

fn writecache_data_survives_sigkill(mode: &str) {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let mut t = Target::start(&format!("nbdwc{mode}"), &[]);
    let methods = t.rpc_json(&["rpc_get_methods"]);
    let has = |m: &str| methods.as_array().is_some_and(|a| a.contains(&json!(m)));
    if !has("bdev_pmem_create") || !has("bdev_writecache_create") || !has("bdev_uring_create") {
        println!("SKIP: this build lacks the pmem, uring or writecache RPCs");
        t.stop();
        return;
    }
    let origin = t.dir.join("origin.img");
    std::fs::File::create(&origin)
        .and_then(|f| f.set_len(32 << 20))
        .expect("origin file");
    let cache = t.dir.join("cache.img");
    let o = origin.to_str().expect("utf-8");
    let out = t.rpc(&["bdev_uring_create", o, "Origin0", "4096"]);
    if out.code != 0 {
        if std::env::var("WC_REQUIRE_SPDK_RPC").as_deref() == Ok("1") {
            panic!("bdev_uring_create failed: {out:?}\n{}", t.log());
        }
        println!("SKIP: no io_uring here: {}", out.all());
        t.stop();
        return;
    }
    if mode == "ssd" {
        std::fs::File::create(&cache)
            .and_then(|f| f.set_len(16 << 20))
            .expect("cache file");
        nbd_ok(
            &t,
            &[
                "bdev_uring_create",
                cache.to_str().expect("utf-8"),
                "Cache0",
                "4096",
            ],
        );
    } else {
        nbd_ok(
            &t,
            &[
                "bdev_pmem_create",
                cache.to_str().expect("utf-8"),
                "-n",
                "Cache0",
                "--size-mb",
                "16",
            ],
        );
    }
    nbd_ok(
        &t,
        &[
            "bdev_writecache_create",
            "wc0",
            "-o",
            "Origin0",
            "-c",
            "Cache0",
            "--mode",
            mode,
        ],
    );
    let sock = t.dir.join("nbd.sock");
    nbd_ok(&t, &["nbd_server_start", sock.to_str().expect("utf-8")]);
    // The origin is claimed by the cache: it cannot be exported writable.
    assert_eq!(nbd_err(&t, &["nbd_export_create", "Origin0", "raw"]), -16);
    nbd_ok(&t, &["nbd_export_create", "wc0", "cached"]);
    let cfg = t.dir.join("saved.json");
    let saved = t.rpc_ok(&["save_config"]);
    assert!(
        saved.contains(&format!("\"mode\": \"{mode}\"")),
        "save_config keeps the mode: {saved}"
    );
    std::fs::write(&cfg, saved).expect("save");
    let u = uri("cached", &sock);
    let out = client_ok(
        &t,
        "qemu-io",
        &[
            "-f",
            "raw",
            &u,
            "-c",
            "write -P 0xc3 0 1M",
            "-c",
            "write -P 0x3c 8M 256k",
            "-c",
            "flush",
        ],
    );
    assert!(!out.all().contains("failed"), "{out:?}");

    t.keep_dir();
    let dir = t.dir.clone();
    signal(t.pid(), libc::SIGKILL);
    t.wait_exit(EXIT_TIMEOUT);
    drop(t);

    let mut t = Target::spawn_in(dir.clone(), &["--json", cfg.to_str().expect("utf-8")]);
    t.wait_ready();
    let out = client_ok(
        &t,
        "qemu-io",
        &[
            "-f",
            "raw",
            &u,
            "-c",
            "read -P 0xc3 0 1M",
            "-c",
            "read -P 0x3c 8M 256k",
            "-c",
            "read -P 0 2M 64k",
        ],
    );
    assert!(
        !out.all().contains("failed"),
        "data lost across SIGKILL: {out:?}\n{}",
        t.log()
    );
    t.stop();
    let _ = std::fs::remove_dir_all(dir);
}
