//! x86-64 persistence primitives: cache-line write-back, non-temporal
//! stores and the store fence. Everything here is `unsafe` to call with a
//! range outside a live, writable mapping; callers check ranges first.

use std::arch::asm;
use std::arch::x86_64::{
    __cpuid, __cpuid_count, __m128i, __m256i, _mm256_loadu_si256, _mm256_setzero_si256,
    _mm256_stream_si256, _mm_clflush, _mm_loadu_si128, _mm_stream_si128, _mm_stream_si64,
};

/// Cache line size on every x86-64 CPU this targets.
pub(crate) const LINE: usize = 64;

/// Instruction that writes a dirty cache line back towards memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlushInsn {
    /// Write back, keep the line cached (needs `sfence` to order).
    Clwb,
    /// Write back and invalidate, weakly ordered (needs `sfence`).
    Clflushopt,
    /// Write back and invalidate, ordered with stores (always present).
    Clflush,
}

impl FlushInsn {
    /// The best instruction this CPU has.
    pub(crate) fn best() -> FlushInsn {
        if has_clwb() {
            FlushInsn::Clwb
        } else if has_clflushopt() {
            FlushInsn::Clflushopt
        } else {
            FlushInsn::Clflush
        }
    }
}

/// CPU has `clwb` (CPUID.(EAX=7,ECX=0):EBX bit 24).
pub(crate) fn has_clwb() -> bool {
    leaf7_ebx() & (1 << 24) != 0
}

/// CPU has `clflushopt` (CPUID.(EAX=7,ECX=0):EBX bit 23).
pub(crate) fn has_clflushopt() -> bool {
    leaf7_ebx() & (1 << 23) != 0
}

/// EBX of CPUID leaf 7 (0 where the leaf does not exist). `std`'s feature
/// detection does not know these two flags.
fn leaf7_ebx() -> u32 {
    // `__cpuid` became a safe function in newer Rust; keep building on both.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU and has no side effects.
    let max = unsafe { __cpuid(0) }.eax;
    if max < 7 {
        return 0;
    }
    #[allow(unused_unsafe)]
    // SAFETY: as above; leaf 7 exists (max >= 7).
    unsafe { __cpuid_count(7, 0) }.ebx
}

/// Writes back every cache line touching `[p, p + len)`.
///
/// # Safety
/// The range must lie inside one live mapping; `insn` must be supported by
/// this CPU.
pub(crate) unsafe fn flush_range(p: *const u8, len: usize, insn: FlushInsn) {
    if len == 0 {
        return;
    }
    let end = p as usize + len;
    let mut line = p as usize & !(LINE - 1);
    while line < end {
        // SAFETY: `line` starts a cache line overlapping the caller's range,
        // so it is inside the same page-aligned mapping (pages are whole
        // lines); the caller vouches for the instruction.
        unsafe { flush_line(line as *const u8, insn) };
        line += LINE;
    }
}

/// # Safety
/// `p` must point into a live mapping; `insn` must be supported.
unsafe fn flush_line(p: *const u8, insn: FlushInsn) {
    match insn {
        // No `nomem`: the asm is a compiler barrier, so earlier stores to
        // the line are emitted before the write-back.
        // SAFETY: clwb only writes back the line holding `p`, a valid
        // address (caller); the CPU supports it (caller).
        FlushInsn::Clwb => unsafe {
            asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags))
        },
        // SAFETY: as above, for clflushopt.
        FlushInsn::Clflushopt => unsafe {
            asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
        },
        // SAFETY: clflush is baseline SSE2; `p` is a valid address.
        FlushInsn::Clflush => unsafe { _mm_clflush(p) },
    }
}

/// `sfence`: orders (and completes, for persistence) earlier non-temporal
/// stores, `clwb` and `clflushopt` of this core. Also a compiler barrier.
pub(crate) fn sfence() {
    // SAFETY: sfence has no operands and no preconditions (SSE, baseline
    // on x86-64).
    unsafe { asm!("sfence", options(nostack, preserves_flags)) };
}

/// Copies `len` bytes from `src` to `dst` with non-temporal stores for the
/// 16-byte aligned middle, ordinary stores + write-back for the unaligned
/// head and tail.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes, `dst` inside
/// one live mapping, the two not overlapping; `insn` must be supported.
pub(crate) unsafe fn copy_nt(dst: *mut u8, src: *const u8, len: usize, insn: FlushInsn) {
    let misalign = dst as usize % 16;
    let head = if misalign == 0 {
        0
    } else {
        (16 - misalign).min(len)
    };
    // SAFETY: head <= len; both ranges are valid for len bytes (caller).
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        flush_range(dst, head, insn);
    }
    let mut off = head;
    // A cache block (page-aligned, 4 KiB) goes through the AVX2 loop: a
    // quarter of the instructions of the 16-byte loop (the write path's
    // largest cost). The 16-byte loop takes what is left, and all of it
    // on CPUs without AVX2.
    if len - off >= STREAM_CHUNK && (dst as usize + off) % 32 == 0 && has_avx2() {
        let n = (len - off) & !(STREAM_CHUNK - 1);
        // SAFETY: off + n <= len keeps the accesses inside the caller's
        // ranges; `dst + off` is 32-byte aligned (checked); AVX2 is there.
        unsafe { stream_copy_avx2(dst.add(off), src.add(off), n) };
        off += n;
    }
    while len - off >= 16 {
        // SAFETY: off + 16 <= len keeps both 16-byte accesses inside the
        // caller's ranges; `dst + off` is 16-byte aligned (head brought it
        // there), as `_mm_stream_si128` requires; the load is unaligned.
        unsafe {
            let v = _mm_loadu_si128(src.add(off) as *const __m128i);
            _mm_stream_si128(dst.add(off) as *mut __m128i, v);
        }
        off += 16;
    }
    let tail = len - off;
    // SAFETY: off + tail == len, inside both ranges.
    unsafe {
        std::ptr::copy_nonoverlapping(src.add(off), dst.add(off), tail);
        flush_range(dst.add(off), tail, insn);
    }
}

/// Bytes one iteration of [`stream_copy_avx2`] moves: four cache lines.
const STREAM_CHUNK: usize = 256;

/// Whether the CPU has AVX2 (std caches the answer: one load).
#[inline]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// Non-temporal copy of `n` bytes (a multiple of [`STREAM_CHUNK`]) in
/// 32-byte stores, four whole cache lines per iteration (loads first, so
/// the stores of a line go out back to back and fill its write-combining
/// buffer at once).
///
/// # Safety
/// The CPU has AVX2; `src` readable and `dst` writable for `n` bytes, not
/// overlapping; `dst` 32-byte aligned.
#[target_feature(enable = "avx2")]
unsafe fn stream_copy_avx2(dst: *mut u8, src: *const u8, n: usize) {
    const WORDS: usize = STREAM_CHUNK / 32;
    let mut off = 0;
    while off < n {
        // off + STREAM_CHUNK <= n (n is a multiple of it); dst is 32-byte
        // aligned and off a multiple of 32; the loads are unaligned.
        // SAFETY: in the caller's ranges; stream stores 32-byte aligned.
        unsafe {
            let s = src.add(off) as *const __m256i;
            let d = dst.add(off) as *mut __m256i;
            let mut v = [_mm256_setzero_si256(); WORDS];
            for (k, w) in v.iter_mut().enumerate() {
                *w = _mm256_loadu_si256(s.add(k));
            }
            for (k, w) in v.iter().enumerate() {
                _mm256_stream_si256(d.add(k), *w);
            }
        }
        off += STREAM_CHUNK;
    }
}

/// Zeroes `len` bytes at `dst` the way [`copy_nt`] writes them.
///
/// # Safety
/// `dst` must be writable for `len` bytes inside one live mapping; `insn`
/// must be supported.
pub(crate) unsafe fn zero_nt(dst: *mut u8, len: usize, insn: FlushInsn) {
    let misalign = dst as usize % 16;
    let head = if misalign == 0 {
        0
    } else {
        (16 - misalign).min(len)
    };
    // SAFETY: head <= len, inside the caller's range.
    unsafe {
        std::ptr::write_bytes(dst, 0, head);
        flush_range(dst, head, insn);
    }
    let mut off = head;
    // SAFETY: all-zero bits are a valid __m128i.
    let zero: __m128i = unsafe { std::mem::zeroed() };
    while len - off >= 16 {
        // SAFETY: off + 16 <= len, and `dst + off` is 16-byte aligned.
        unsafe { _mm_stream_si128(dst.add(off) as *mut __m128i, zero) };
        off += 16;
    }
    let tail = len - off;
    // SAFETY: off + tail == len, inside the caller's range.
    unsafe {
        std::ptr::write_bytes(dst.add(off), 0, tail);
        flush_range(dst.add(off), tail, insn);
    }
}

/// Non-temporal 8-byte store (`movnti`): a single aligned quadword store,
/// so it cannot tear.
///
/// # Safety
/// `dst` must be 8-byte aligned and writable, inside a live mapping.
pub(crate) unsafe fn stream_u64(dst: *mut u64, value: u64) {
    // SAFETY: the caller guarantees an aligned, writable quadword.
    unsafe { _mm_stream_si64(dst as *mut i64, value as i64) };
}
