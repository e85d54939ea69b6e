//! A bounded, seeded fuzz of the RPC socket: random and mutated JSON-RPC
//! requests (valid envelopes calling real methods with random params,
//! mutated bytes, batches, garbage). The target must answer every complete
//! request with a well-formed reply and still be alive and serving at the
//! end. Reproduce a run with `WC_FUZZ_SEED=<seed>`; `WC_FUZZ_SECS` changes
//! the duration (default 3).

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::harness::Target;

/// xorshift64*: small, deterministic, good enough for fuzzing.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const KEYS: &[&str] = &[
    "name",
    "names",
    "num_blocks",
    "block_size",
    "uuid",
    "timeout",
    "per_channel",
    "reset_mode",
    "mode",
    "current",
    "include_aliases",
    "physical_block_size",
    "optimal_io_boundary",
    "md_size",
    "md_interleave",
    "dif_type",
    "dif_is_head_of_md",
    "dif_pi_format",
    "with_batches",
    "bdev_io_pool_size",
    "bdev_auto_examine",
    "filename",
    "base_bdev",
    "cache_bdev",
    "enable",
    "flush",
    "",
    "\u{0}",
    "nâme",
];

fn random_string(r: &mut Rng) -> String {
    match r.below(8) {
        0 => String::new(),
        1 => r.pick(&["M0", "Fz0", "Fz1", "Malloc0", "N0"]).to_string(),
        2 => r
            .pick(&["all", "none", "maxmin", "error", "pmem", "ssd"])
            .to_string(),
        3 => "a5a1c0de-1111-4222-8333-444455556666".into(),
        4 => "x".repeat(r.below(600)),
        5 => "é☃\u{0}\u{7f}\"\\/".into(),
        6 => "../fz-file".into(),
        _ => (0..r.below(12))
            .map(|_| char::from(b'!' + r.below(94) as u8))
            .collect(),
    }
}

fn random_number(r: &mut Rng) -> Value {
    match r.below(12) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(-1),
        3 => json!(512),
        4 => json!(4096),
        5 => json!(r.below(100_000)),
        6 => json!(u64::MAX),
        7 => json!(i64::MIN),
        8 => json!(1u64 << 31),
        9 => json!(0.5),
        10 => json!(1e300),
        _ => json!(1u64 << 40),
    }
}

fn random_value(r: &mut Rng, depth: u32) -> Value {
    let kinds = if depth >= 3 { 5 } else { 7 };
    match r.below(kinds) {
        0 => Value::Null,
        1 => json!(r.chance(50)),
        2 | 3 => random_number(r),
        4 => json!(random_string(r)),
        5 => Value::Array(
            (0..r.below(4))
                .map(|_| random_value(r, depth + 1))
                .collect(),
        ),
        _ => random_object(r, depth + 1),
    }
}

fn random_object(r: &mut Rng, depth: u32) -> Value {
    let mut m = Map::new();
    for _ in 0..r.below(6) {
        let k = if r.chance(90) {
            r.pick(KEYS).to_string()
        } else {
            random_string(r)
        };
        m.insert(k, random_value(r, depth));
    }
    Value::Object(m)
}

/// Plausible params for `method`: usually an object of known keys.
fn random_params(r: &mut Rng, method: &str) -> Option<Value> {
    match r.below(10) {
        0 => None,
        1 => Some(random_value(r, 1)),
        2 if method.ends_with("_create") => Some(json!({
            "name": random_string(r),
            "num_blocks": r.pick(&[1u64, 8, 64, 4096]),
            "block_size": r.pick(&[512u64, 4096, 1000, 0]),
        })),
        _ => Some(random_object(r, 0)),
    }
}

fn random_id(r: &mut Rng, n: u64) -> Option<Value> {
    match r.below(10) {
        0 => None,
        1 => Some(Value::Null),
        2 => Some(json!(format!("id-{n}"))),
        3 => Some(json!(-(n as i64))),
        4 => Some(json!(n as f64 + 0.25)),
        _ => Some(json!(n)),
    }
}

/// Keeps requests from touching anything outside the target's directory
/// (modules such as pmem/uring create and size files; CI runs as root) or
/// from asking for gigabytes of real memory. File names are relative (the
/// target runs in its own directory) and start with a letter, so no byte
/// mutation below can turn them into an absolute path.
fn sanitize(req: &mut Value, n: u64) {
    let Some(p) = req.get_mut("params").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(f) = p.get_mut("filename") {
        if f.is_string() {
            *f = json!(format!("fz-{}", n % 8));
        }
    }
    if let Some(size) = p.get_mut("size") {
        if size.as_u64().is_some_and(|s| s > 64 << 20) {
            *size = json!(64u64 << 20);
        }
    }
}

fn random_request(r: &mut Rng, methods: &[String], n: u64) -> Value {
    let method = if r.chance(90) {
        r.pick(methods).clone()
    } else {
        random_string(r)
    };
    let mut req = Map::new();
    if r.chance(95) {
        req.insert("jsonrpc".into(), json!("2.0"));
    }
    req.insert("method".into(), json!(method));
    if let Some(p) = random_params(r, &method) {
        req.insert("params".into(), p);
    }
    if let Some(id) = random_id(r, n) {
        req.insert("id".into(), id);
    }
    if r.chance(3) {
        req.insert(random_string(r), random_value(r, 2));
    }
    Value::Object(req)
}

fn mutate(r: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..=r.below(4) {
        if bytes.is_empty() {
            bytes.push(b'{');
        }
        let at = r.below(bytes.len());
        match r.below(5) {
            0 => bytes[at] ^= 1 << r.below(8),
            1 => bytes.insert(at, *r.pick(b"{}[]\",:\\ \n0e-\xff\x00")),
            2 => {
                bytes.remove(at);
            }
            3 => bytes.truncate(at),
            _ => {
                let end = (at + r.below(16)).min(bytes.len());
                let chunk = bytes[at..end].to_vec();
                bytes.splice(at..at, chunk);
            }
        }
    }
    bytes
}

fn garbage(r: &mut Rng) -> Vec<u8> {
    match r.below(6) {
        0 => (0..r.below(200)).map(|_| r.next() as u8).collect(),
        1 => "[".repeat(1 + r.below(5000)).into_bytes(),
        2 => "{\"a\":".repeat(1 + r.below(2000)).into_bytes(),
        // Over the 256 KiB per-request limit.
        3 => {
            let mut v =
                br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","params":{"name":""#.to_vec();
            v.extend(std::iter::repeat_n(b'x', 300 * 1024));
            v.extend_from_slice(br#""},"id":1}"#);
            v
        }
        4 => b"\xef\xbb\xbf{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":1}".to_vec(),
        _ => b"{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":1}{}[]null 1 \"s\""
            .to_vec(),
    }
}

/// Checks the shape of one reply object.
fn check_reply(v: &Value, counts: &mut BTreeMap<String, u32>) {
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("reply is not an object: {v}"));
    assert_eq!(o.get("jsonrpc"), Some(&json!("2.0")), "{v}");
    assert!(o.contains_key("id"), "reply without id: {v}");
    match (o.get("result"), o.get("error")) {
        (Some(_), None) => *counts.entry("ok".into()).or_default() += 1,
        (None, Some(e)) => {
            let code = e["code"]
                .as_i64()
                .unwrap_or_else(|| panic!("error code not an integer: {v}"));
            assert!(e["message"].is_string(), "error message: {v}");
            *counts.entry(code.to_string()).or_default() += 1;
        }
        _ => panic!("reply needs exactly one of result/error: {v}"),
    }
}

#[test]
fn fuzz_rpc_socket() {
    require_spdk_rpc!();
    let seed = std::env::var("WC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let secs: u64 = std::env::var("WC_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!("fuzz seed: {seed} (rerun with WC_FUZZ_SEED={seed})");
    let mut r = Rng::new(seed);

    let mut t = Target::start("fuzz", &[]);
    let methods: Vec<String> = t
        .client()
        .call("rpc_get_methods", None)
        .expect("rpc_get_methods")
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m.as_str().map(str::to_string))
        // Would end the run; covered by the shutdown tests.
        .filter(|m| m != "spdk_kill_instance")
        .collect();

    let req = |r: &mut Rng, n: u64| {
        let mut v = random_request(r, &methods, n);
        sanitize(&mut v, n);
        v
    };
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut n: u64 = 0;
    while Instant::now() < deadline {
        n += 1;
        let bytes = match r.below(10) {
            0..=4 => serde_json::to_vec(&req(&mut r, n)).expect("json"),
            5 | 6 => {
                let req = req(&mut r, n);
                mutate(&mut r, serde_json::to_vec(&req).expect("json"))
            }
            7 => {
                let batch: Vec<Value> = (0..r.below(4))
                    .map(|i| req(&mut r, n * 10 + i as u64))
                    .collect();
                serde_json::to_vec(&batch).expect("json")
            }
            _ => garbage(&mut r),
        };
        let mut c = match wc_rpc::client::Client::connect(&t.sock) {
            Ok(c) => c,
            Err(e) => panic!(
                "seed {seed}, case {n}: cannot connect ({e}); target alive: {}\n{}",
                t.alive(),
                t.log()
            ),
        };
        c.set_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
        // The server may close on a parse error before reading everything.
        if c.send_raw(&bytes).is_err() {
            *counts.entry("send-closed".into()).or_default() += 1;
            continue;
        }
        let _ = c.stream().shutdown(std::net::Shutdown::Write);
        loop {
            match c.read_value() {
                Ok(Value::Array(items)) => {
                    for it in &items {
                        check_reply(it, &mut counts);
                    }
                }
                Ok(v) => check_reply(&v, &mut counts),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    // A handler that legitimately waits (e.g. a bdev_get_bdevs timeout).
                    *counts.entry("no-reply-yet".into()).or_default() += 1;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!(
                    "seed {seed}, case {n}: bad reply bytes ({e}) for request {:?}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                ),
            }
        }
        assert!(
            t.alive(),
            "seed {seed}, case {n}: the target died on request {:?}\n{}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)]),
            t.log()
        );
    }
    println!("fuzz: {n} cases, outcomes {counts:?}");
    assert!(n > 10, "too few cases ran");

    // Still alive and serving, through the stock client too.
    let v = t.rpc_json(&["spdk_get_version"]);
    assert!(v["version"].is_string(), "{v}");
    t.rpc_json(&["bdev_get_bdevs"]);
    t.stop();
}
