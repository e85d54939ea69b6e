//! Benchmark: the raw-copy limit of a cache block write or read hit — the
//! copy alone, on one core, no framework. Maps a file of the cache's size
//! (MAP_SHARED, as `bdev_pmem` maps its file), faults it in, then for a
//! fixed time copies IO_SIZE bytes to (or from) random block-aligned
//! offsets of it:
//!
//! * `nt_write`: non-temporal 16-byte stores (what a pmem-mode cache write
//!   does with the `movnt+sfence` strategy), one `sfence` per 64 copies (a
//!   commit fences once for many writes);
//! * `memcpy_write`: plain `memcpy` into the mapping;
//! * `memcpy_read`: plain `memcpy` out of the mapping (a read hit's copy).
//!
//! The sources / destinations rotate through 32 buffers of IO_SIZE bytes
//! (bdevperf's QD 32 buffers). Prints one line per mode:
//! `copy_limit MODE IO_SIZE: N ops/s, G GiB/s`.
//!
//! `--anon-huge` maps anonymous memory with transparent huge pages instead
//! (what a malloc bdev's buffer gets): the same copies without a TLB miss
//! per block, to tell the mapping's cost from the copy's.
//!
//! Usage: copy_limit [--dir /dev/shm] [--mib 1088] [--secs 1] [--io-size 4096]
//!        [--anon-huge] [--modes nt_write,memcpy_write,memcpy_read]

use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
#[command(about = "Raw-copy limit: 4 KiB copies into/out of a cache-sized mapping")]
struct Args {
    /// Directory of the mapped file (RAM: /dev/shm, as the cache file).
    #[arg(long, default_value = "/dev/shm")]
    dir: String,
    /// Size of the mapping in MiB (the cache's size).
    #[arg(long, default_value_t = 1088)]
    mib: usize,
    /// Seconds per mode.
    #[arg(long, default_value_t = 1.0)]
    secs: f64,
    /// Bytes per copy (a multiple of 64).
    #[arg(long, default_value_t = 4096)]
    io_size: usize,
    /// Anonymous memory with transparent huge pages instead of a file.
    #[arg(long)]
    anon_huge: bool,
    /// Modes to run (default: all three).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "nt_write,memcpy_write,memcpy_read"
    )]
    modes: Vec<String>,
}

/// A file mapping (or anonymous memory) that is unmapped (and the file
/// removed) on drop.
struct Mapping {
    base: *mut u8,
    len: usize,
    path: Option<String>,
}

impl Mapping {
    /// Anonymous memory, huge pages asked for, every page faulted in.
    fn anon_huge(len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to
        // the returned address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: advice on the mapping just made; no effect on its contents.
        unsafe { libc::madvise(base, len, libc::MADV_HUGEPAGE) };
        let map = Mapping {
            base: base as *mut u8,
            len,
            path: None,
        };
        map.fault_in();
        Ok(map)
    }

    fn fault_in(&self) {
        let mut off = 0;
        while off < self.len {
            // SAFETY: off < len: inside the mapping.
            unsafe { self.base.add(off).write_volatile(1) };
            off += 4096;
        }
    }

    fn new(dir: &str, len: usize) -> std::io::Result<Mapping> {
        use std::os::unix::io::AsRawFd;
        let path = format!("{dir}/copy-limit-{}.map", std::process::id());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let m = |e| {
            let _ = std::fs::remove_file(&path);
            e
        };
        f.set_len(len as u64).map_err(m)?;
        // SAFETY: a fresh shared mapping of a file we own, `len` bytes long;
        // nothing else refers to the returned address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                f.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(m(std::io::Error::last_os_error()));
        }
        let map = Mapping {
            base: base as *mut u8,
            len,
            path: Some(path),
        };
        // Fault every page in for writing (tmpfs allocates on first write).
        map.fault_in();
        Ok(map)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base/len are the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// xorshift64*: cheap, so the generator does not dominate a 4 KiB copy.
struct Rng(u64);

impl Rng {
    #[inline]
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) * n) >> 32
    }
}

/// Non-temporal copy of `len` bytes (a multiple of 64, `dst` 16-byte aligned).
///
/// # Safety
/// `src` readable and `dst` writable for `len` bytes; `dst` 16-byte aligned.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn copy_nt(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    let mut off = 0;
    while off < len {
        // SAFETY: off + 16 <= len (len is a multiple of 16); dst + off is
        // 16-byte aligned (dst is, off is a multiple of 16).
        unsafe {
            let v = _mm_loadu_si128(src.add(off) as *const __m128i);
            _mm_stream_si128(dst.add(off) as *mut __m128i, v);
        }
        off += 16;
    }
}

#[cfg(target_arch = "x86_64")]
fn sfence() {
    // SAFETY: sfence has no operands or preconditions (SSE, baseline).
    unsafe { std::arch::x86_64::_mm_sfence() };
}

const BUFS: usize = 32;

/// Runs `mode` for `secs`: copies per second.
fn run(map: &Mapping, bufs: &mut [u8], io: usize, mode: &str, secs: f64) -> Option<f64> {
    let blocks = (map.len / io) as u64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let dur = Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut ops = 0u64;
    let bp = bufs.as_mut_ptr();
    loop {
        // 64 copies between clock reads and fences.
        for _ in 0..64 {
            let at = rng.below(blocks) as usize * io;
            let slot = (ops as usize % BUFS) * io;
            // SAFETY: at + io <= map len, slot + io <= bufs len; disjoint;
            // page-aligned mapping + `at` a multiple of io (64) => 16-aligned.
            unsafe {
                let m = map.base.add(at);
                let b = bp.add(slot);
                match mode {
                    #[cfg(target_arch = "x86_64")]
                    "nt_write" => copy_nt(m, b, io),
                    "memcpy_write" => std::ptr::copy_nonoverlapping(b, m, io),
                    "memcpy_read" => std::ptr::copy_nonoverlapping(m, b, io),
                    _ => return None,
                }
            }
            ops += 1;
        }
        #[cfg(target_arch = "x86_64")]
        if mode == "nt_write" {
            sfence();
        }
        if t0.elapsed() >= dur {
            break;
        }
    }
    std::hint::black_box(&bufs);
    Some(ops as f64 / t0.elapsed().as_secs_f64())
}

fn main() {
    let a = Args::parse();
    if a.io_size == 0 || a.io_size % 64 != 0 {
        eprintln!("copy_limit: --io-size must be a positive multiple of 64");
        std::process::exit(2);
    }
    let len = a.mib << 20;
    if len < a.io_size {
        eprintln!("copy_limit: --mib must hold at least one copy");
        std::process::exit(2);
    }
    let map = if a.anon_huge {
        Mapping::anon_huge(len)
    } else {
        Mapping::new(&a.dir, len)
    };
    let map = match map {
        Ok(m) => m,
        Err(e) => {
            eprintln!("copy_limit: cannot map {} MiB in {}: {e}", a.mib, a.dir);
            std::process::exit(1);
        }
    };
    let suffix = if a.anon_huge { "_anon_thp" } else { "" };
    let mut bufs = vec![0xA5u8; BUFS * a.io_size];
    for mode in &a.modes {
        match run(&map, &mut bufs, a.io_size, mode, a.secs) {
            Some(r) => println!(
                "copy_limit {mode}{suffix} {}: {r:.0} ops/s, {:.2} GiB/s",
                a.io_size,
                r * a.io_size as f64 / (1u64 << 30) as f64
            ),
            None => {
                eprintln!("copy_limit: unknown mode {mode}");
                std::process::exit(2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every mode copies what it says: the data lands in (or comes out of)
    /// the mapping, and the rate is positive.
    #[test]
    fn every_mode_copies_its_data() {
        let dir = std::env::temp_dir();
        for map in [
            Mapping::new(dir.to_str().unwrap(), 1 << 20).unwrap(),
            Mapping::anon_huge(1 << 20).unwrap(),
        ] {
            let io = 4096;
            let mut bufs = vec![0xA5u8; BUFS * io];
            for mode in ["nt_write", "memcpy_write"] {
                // SAFETY: the whole mapping, which lives in `map`.
                unsafe { std::ptr::write_bytes(map.base, 0, map.len) };
                assert!(run(&map, &mut bufs, io, mode, 0.01).unwrap() > 0.0);
                // SAFETY: as above.
                let m = unsafe { std::slice::from_raw_parts(map.base, map.len) };
                let written = m
                    .chunks(io)
                    .filter(|c| c.iter().all(|&x| x == 0xA5))
                    .count();
                assert!(written > 0, "{mode} wrote no block");
                assert!(
                    m.iter().all(|&x| x == 0 || x == 0xA5),
                    "{mode}: stray bytes"
                );
            }
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(map.base, 0x3C, map.len) };
            assert!(run(&map, &mut bufs, io, "memcpy_read", 0.01).unwrap() > 0.0);
            assert!(
                bufs.iter().all(|&x| x == 0x3C),
                "memcpy_read filled every buffer"
            );
            assert!(run(&map, &mut bufs, io, "nope", 0.01).is_none());
        }
    }
}
