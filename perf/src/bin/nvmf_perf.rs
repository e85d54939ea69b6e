//! nvmf_perf: a small NVMe/TCP load generator for the loopback benchmark
//! of the NVMe/TCP target (until the NVMe/TCP initiator bdev can run under
//! bdevperf). One thread, one I/O queue pair, `--qd` commands in flight,
//! 4 KiB (or `--bs`) random reads or writes over the namespace; prints one
//! JSON object: iops, mibps, avg/p50/p99 latency in microseconds.
//!
//!   nvmf_perf --addr 127.0.0.1:4420 --nqn NQN --rw randread --qd 32 --time 3

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use wc_nvme_wire::command::{feature, FeatureCommand, RwCommand};
use wc_nvme_wire::identify::{cns, IdentifyNamespace};
use wc_nvme_wire::pdu::flags;
use wc_nvme_wire::{opcode, PduHeader, SglDescriptor};
use wc_nvmf::host::{ok, Host, HostError};

#[derive(Parser)]
#[command(about = "NVMe/TCP random I/O load generator (one queue pair)")]
struct Args {
    /// Target address (IP:port).
    #[arg(long)]
    addr: SocketAddr,
    /// Subsystem NQN.
    #[arg(long)]
    nqn: String,
    /// randread or randwrite.
    #[arg(long, default_value = "randread")]
    rw: String,
    /// Commands in flight.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// I/O size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 3.0)]
    time: f64,
    /// Namespace id.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Header and data digests.
    #[arg(long)]
    digests: bool,
    /// Busy-poll the socket (as SPDK's initiator polls) instead of
    /// sleeping in read.
    #[arg(long)]
    poll: bool,
}

fn run(a: &Args) -> Result<serde_json::Value, HostError> {
    let write = match a.rw.as_str() {
        "randread" => false,
        "randwrite" => true,
        other => {
            return Err(HostError::Protocol(format!(
                "--rw {other}: randread or randwrite"
            )))
        }
    };
    let dg = (a.digests, a.digests);
    let (mut admin, cntlid) = Host::admin(a.addr, &a.nqn, dg, 0)?;
    let cid = admin.cid();
    let nq = FeatureCommand {
        fid: feature::NUMBER_OF_QUEUES,
        sel: 0,
        save: false,
        value: feature::num_queues_value(1, 1),
    };
    ok(admin.exec(nq.build_set(cid), &[], 0)?.0.status)?;
    let (c, id) = admin.identify(cns::NAMESPACE, a.nsid)?;
    ok(c.status)?;
    let ns = IdentifyNamespace::decode(&id)?;
    let bsz = ns
        .block_size()
        .ok_or(HostError::Protocol("bad LBA format".into()))?;
    if a.bs == 0 || a.bs % bsz != 0 {
        return Err(HostError::Protocol(format!(
            "--bs must be a multiple of {bsz}"
        )));
    }
    let nlb = a.bs / bsz;
    let slots = ns.nsze / nlb as u64;
    // The queue holds QD commands (our target accepts SQSIZE in flight).
    let qd = a.qd.clamp(1, 1024);
    let mut q = Host::io(a.addr, &a.nqn, dg, cntlid, 1, qd.max(2))?;
    q.set_polling(a.poll)?;
    let data = vec![0x5au8; a.bs as usize];
    let mut started = vec![Instant::now(); qd as usize];
    let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // Commands are encoded into `out` and sent in one write once the
    // responses received so far are handled.
    let mut out: Vec<u8> = Vec::with_capacity(qd as usize * (a.bs as usize + 128));
    let mut submit = |q: &mut Host,
                      out: &mut Vec<u8>,
                      cid: u16,
                      started: &mut [Instant]|
     -> Result<(), HostError> {
        let rw = RwCommand {
            slba: next(slots) * nlb as u64,
            nlb,
            fua: false,
            deac: false,
        };
        started[cid as usize] = Instant::now();
        if write {
            let sqe = rw.build(opcode::io::WRITE, cid, a.nsid)?;
            if data.len() <= q.icd {
                q.encode_capsule(out, &sqe.with_sgl(SglDescriptor::in_capsule(a.bs)), &data)
            } else {
                q.send_raw(out)?;
                out.clear();
                q.submit(sqe, &data, 0)
            }
        } else {
            let sqe = rw.build(opcode::io::READ, cid, a.nsid)?;
            q.encode_capsule(out, &sqe.with_sgl(SglDescriptor::transport(a.bs)), &[])
        }
    };
    for cid in 0..qd as u16 {
        submit(&mut q, &mut out, cid, &mut started)?;
    }
    q.send_raw(&out)?;
    out.clear();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.time);
    let mut done = 0u64;
    let mut draining = false;
    let mut inflight = qd;
    while inflight > 0 {
        let (header, pflags, _) = q.recv_ref()?;
        let cid = match header {
            PduHeader::C2HData(d) if pflags & flags::DATA_SUCCESS != 0 => d.cccid,
            PduHeader::C2HData(_) => continue,
            PduHeader::R2T(r) => {
                q.answer_r2t(&r, &data)?;
                continue;
            }
            PduHeader::CapsuleResp(c) => {
                ok(c.status)?;
                c.cid
            }
            other => return Err(HostError::Protocol(format!("unexpected {other:?}"))),
        };
        let cid = cid as usize;
        if cid >= started.len() {
            return Err(HostError::Protocol(format!("unknown command id {cid}")));
        }
        lat_us.push(started[cid].elapsed().as_micros().min(u32::MAX as u128) as u32);
        done += 1;
        if !draining && Instant::now() >= end {
            draining = true;
        }
        if draining {
            inflight -= 1;
        } else {
            submit(&mut q, &mut out, cid as u16, &mut started)?;
        }
        if !out.is_empty() && !q.has_buffered() {
            q.send_raw(&out)?;
            out.clear();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    lat_us.sort_unstable();
    let pct = |p: f64| lat_us[((lat_us.len() as f64 - 1.0) * p) as usize];
    let avg = lat_us.iter().map(|&v| v as f64).sum::<f64>() / lat_us.len().max(1) as f64;
    let iops = done as f64 / secs;
    Ok(serde_json::json!({
        "rw": a.rw,
        "qd": qd,
        "bs": a.bs,
        "seconds": secs,
        "ios": done,
        "iops": iops,
        "mibps": iops * a.bs as f64 / (1 << 20) as f64,
        "avg_us": avg,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "digests": a.digests,
        "poll": a.poll,
    }))
}

fn main() {
    let a = Args::parse();
    match run(&a) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("nvmf_perf: {e}");
            std::process::exit(1);
        }
    }
}
