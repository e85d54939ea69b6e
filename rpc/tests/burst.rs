//! A burst of bad clients never locks the operator out (issue 12, part 2).
//!
//! Its own test binary, with one test, so that the process's thread and descriptor counts
//! are the server's alone.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use wc_rpc::client::Client;
use wc_rpc::{inline_dispatcher, register_builtin, Registry, RpcServer, RpcState};

/// splitmix64: small, seedable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SEED_REQUEST: &[u8] = br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":1}"#;
const ALPHABET: &[u8] = b"{}[]\":,0123456789.-+eEtrufalsn \n\t\\/abcxyz\xc3\xa9\xff";

/// Garbage, a mutated request, a truncated one, or a well-formed but invalid request.
fn bad_input(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => (0..1 + rng.below(64))
            .map(|_| ALPHABET[rng.below(ALPHABET.len())])
            .collect(),
        1 => {
            let mut v = SEED_REQUEST.to_vec();
            for _ in 0..1 + rng.below(4) {
                let pos = rng.below(v.len());
                v[pos] = ALPHABET[rng.below(ALPHABET.len())];
            }
            v
        }
        2 => SEED_REQUEST[..rng.below(SEED_REQUEST.len())].to_vec(),
        _ => br#"{"jsonrpc":"1.0","id":{}}"#.to_vec(),
    }
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn threads() -> usize {
    count_entries("/proc/self/task")
}

fn fds() -> usize {
    count_entries("/proc/self/fd")
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn five_thousand_bad_clients_never_lock_out_a_good_one() {
    let dir = PathBuf::from(format!("/tmp/wc-rpc-burst-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("rpc.sock");
    let reg = Registry::new();
    register_builtin(&reg).unwrap();
    reg.set_state(RpcState::Runtime);
    let server = RpcServer::start(&sock, reg, inline_dispatcher()).unwrap();

    // Settle: one served client, so that lazily created runtime state exists. The count is
    // published once per event-loop pass, so a reply can arrive before it reads 1: wait for
    // 1 while the client is open, then for 0 after it closed, so that the baseline below is
    // taken after the server closed its end.
    let mut first = Client::connect(&sock).unwrap();
    assert!(first.call("spdk_get_version", None).is_ok());
    wait_until(
        || server.connection_count() == 1,
        "the first client to count",
    );
    drop(first);
    wait_until(|| server.connection_count() == 0, "the first client to go");
    let (threads0, fds0) = (threads(), fds());

    let mut rng = Rng(0x0b57_12e5);
    let mut answered = 0;
    let mut peak_threads = threads0;
    for i in 1..=5000 {
        if i % 100 == 0 {
            let mut c = Client::connect(&sock).expect("a good client connects");
            c.set_timeout(Some(Duration::from_secs(10))).unwrap();
            let v: Value = c
                .call("spdk_get_version", None)
                .unwrap_or_else(|e| panic!("good client {i} not answered: {e:?}"));
            assert!(v["version"].as_str().is_some(), "{v}");
            answered += 1;
            peak_threads = peak_threads.max(threads());
            continue;
        }
        // A bad client: connect, send, close without reading anything back.
        let mut s = UnixStream::connect(&sock).expect("a bad client connects");
        let _ = s.write_all(&bad_input(&mut rng));
        drop(s);
    }
    assert_eq!(answered, 50);
    // No thread per connection, ever.
    assert_eq!(peak_threads, threads0, "threads grew during the burst");
    wait_until(
        || server.connection_count() == 0,
        "every connection to be reaped",
    );
    wait_until(|| threads() == threads0, "the thread count to return");
    wait_until(|| fds() == fds0, "the descriptor count to return");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
