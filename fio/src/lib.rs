//! # wc-fio-engine: fio drives our bdev stack in-process
//!
//! The Rust half of the `writecache_bdev` fio ioengine (the C half,
//! `fio/ioengine.c`, is compiled against the headers of the fio that runs
//! it and calls the `wc_fio_*` functions below). Like SPDK's `spdk_bdev`
//! plugin:
//!
//! * the first job's `setup` starts the framework ([`env`]): reactors, the
//!   `spdk_json_conf` config replayed by the same code as
//!   `writecache_tgt --json`, and an RPC server at `spdk_rpc_listen_addr`;
//! * each fio job thread attaches to its own hosted reactor and opens its
//!   bdevs there ([`job`]); `queue` submits on that reactor, `getevents`
//!   polls it;
//! * process exit stops the framework as `writecache_tgt` stops (bdevs
//!   top-down, so a writecache commits).
//!
//! Errors cross the C boundary as a negative return and a message written
//! into the caller's buffer, which the shim logs with fio's `log_err`.

#![warn(missing_docs)]

pub mod env;
pub mod job;

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::time::Duration;

use wc_reactor::IdleMode;

use crate::job::{Job, Op};

/// Copies `msg` (NUL-terminated, truncated) into the caller's buffer.
fn set_err(buf: *mut c_char, len: usize, msg: &str) {
    if buf.is_null() || len == 0 {
        return;
    }
    let n = msg.len().min(len - 1);
    // SAFETY: the shim passes a writable buffer of `len` bytes; we write
    // n + 1 <= len bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
        *buf.add(n) = 0;
    }
}

/// A C string argument as UTF-8 (`None` for NULL or empty).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn arg(p: *const c_char) -> Result<Option<String>, String> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: per the function's contract.
    let s = unsafe { CStr::from_ptr(p) };
    let s = s
        .to_str()
        .map_err(|_| "option value is not UTF-8".to_string())?;
    Ok((!s.is_empty()).then(|| s.to_string()))
}

/// Runs `f`, turning a panic into an error message (nothing unwinds into
/// fio).
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("internal error (panic); see the log above".into()))
}

/// Starts the framework (first call) for `jobs` fio job threads.
/// Returns 0, or -1 with a message in `err`.
///
/// # Safety
/// `json_conf` and `rpc_addr` are NULL or NUL-terminated strings; `err`
/// is NULL or a writable buffer of `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn wc_fio_env_start(
    json_conf: *const c_char,
    rpc_addr: *const c_char,
    jobs: u32,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    let r = guarded(|| {
        // SAFETY: per this function's contract.
        let conf = unsafe { arg(json_conf) }?.ok_or_else(|| {
            "spdk_json_conf=FILE is required (the bdev configuration)".to_string()
        })?;
        // SAFETY: per this function's contract.
        let rpc = unsafe { arg(rpc_addr) }?;
        env::start(&env::EnvOptions {
            config: PathBuf::from(conf),
            rpc_listen_addr: rpc.map(PathBuf::from),
            jobs: jobs as usize,
        })
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            set_err(err, errlen, &e);
            -1
        }
    }
}

/// Stops the framework (bdevs, then reactors). Idempotent.
#[no_mangle]
pub extern "C" fn wc_fio_env_stop() {
    let _ = std::panic::catch_unwind(env::stop);
}

/// Block size and count of `bdev`. Returns 0, or -1 with a message.
///
/// # Safety
/// `bdev` is a NUL-terminated string; the out pointers are writable; `err`
/// as for [`wc_fio_env_start`].
#[no_mangle]
pub unsafe extern "C" fn wc_fio_bdev_geometry(
    bdev: *const c_char,
    block_size: *mut u32,
    num_blocks: *mut u64,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    let r = guarded(|| {
        // SAFETY: per this function's contract.
        let name = unsafe { arg(bdev) }?.ok_or_else(|| "empty filename".to_string())?;
        job::geometry(&name)
    });
    match r {
        Ok((bs, n)) => {
            // SAFETY: the caller passes writable out pointers.
            unsafe {
                *block_size = bs;
                *num_blocks = n;
            }
            0
        }
        Err(e) => {
            set_err(err, errlen, &e);
            -1
        }
    }
}

/// Attaches the calling fio thread (job `index`, 0-based) to its reactor.
/// Returns the job handle, or NULL with a message.
///
/// # Safety
/// `err` as for [`wc_fio_env_start`].
#[no_mangle]
pub unsafe extern "C" fn wc_fio_job_new(
    index: u32,
    iodepth: u32,
    interrupt_mode: c_int,
    err: *mut c_char,
    errlen: usize,
) -> *mut c_void {
    let idle = if interrupt_mode != 0 {
        IdleMode::sleep()
    } else {
        IdleMode::Busy
    };
    match guarded(|| Job::new(index as usize, iodepth as usize, idle)) {
        Ok(j) => Box::into_raw(Box::new(j)).cast(),
        Err(e) => {
            set_err(err, errlen, &e);
            std::ptr::null_mut()
        }
    }
}

/// Borrows the job behind a handle.
///
/// # Safety
/// `job` comes from [`wc_fio_job_new`], is not freed, and is used only on
/// the thread that created it.
unsafe fn job<'a>(job: *mut c_void) -> &'a mut Job {
    // SAFETY: per the function's contract.
    unsafe { &mut *job.cast::<Job>() }
}

/// Opens `bdev` for the job; returns its target index (>= 0), or -1 with a
/// message.
///
/// # Safety
/// `j` as for [`job`]; `bdev` NUL-terminated; `err` as above.
#[no_mangle]
pub unsafe extern "C" fn wc_fio_job_open(
    j: *mut c_void,
    bdev: *const c_char,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    let r = guarded(|| {
        // SAFETY: per this function's contract.
        let name = unsafe { arg(bdev) }?.ok_or_else(|| "empty filename".to_string())?;
        // SAFETY: per this function's contract.
        unsafe { job(j) }.open(&name)
    });
    match r {
        Ok(i) => i as c_int,
        Err(e) => {
            set_err(err, errlen, &e);
            -1
        }
    }
}

/// Closes a target of the job.
///
/// # Safety
/// `j` as for [`job`].
#[no_mangle]
pub unsafe extern "C" fn wc_fio_job_close(j: *mut c_void, target: c_int) {
    if target >= 0 {
        // SAFETY: per this function's contract.
        unsafe { job(j) }.close(target as usize);
    }
}

/// Submits an I/O (`op`: 0 read, 1 write, 2 trim, 3 flush) tagged `tag`.
/// Returns 0 when queued, or a positive errno when it failed at once.
///
/// # Safety
/// `j` as for [`job`]; for reads and writes `buf` points to `len` bytes
/// that stay valid until `tag` comes back from [`wc_fio_job_event`].
#[no_mangle]
pub unsafe extern "C" fn wc_fio_job_queue(
    j: *mut c_void,
    target: c_int,
    op: c_int,
    buf: *mut c_void,
    len: u64,
    offset: u64,
    tag: *mut c_void,
) -> c_int {
    let Some(op) = Op::from_code(op) else {
        return libc::ENOTSUP;
    };
    if target < 0 {
        return libc::EBADF;
    }
    // SAFETY: per this function's contract (the buffer outlives the I/O).
    match unsafe { job(j).queue(target as usize, op, buf.cast(), len, offset, tag as u64) } {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// fio's `getevents`: polls until `min` completions (or `timeout_ns`
/// passes; negative: no timeout); returns how many are ready, all for fio
/// (fio's `max` is no bound: see [`Job::getevents`]).
///
/// # Safety
/// `j` as for [`job`].
#[no_mangle]
pub unsafe extern "C" fn wc_fio_job_getevents(j: *mut c_void, min: u32, timeout_ns: i64) -> c_int {
    let timeout = u64::try_from(timeout_ns).ok().map(Duration::from_nanos);
    // SAFETY: per this function's contract.
    let n = unsafe { job(j) }.getevents(min as usize, timeout);
    n.min(c_int::MAX as usize) as c_int
}

/// fio's `event`: the tag of completion `i` of the last `getevents`, with
/// its errno in `*errno` (0 on success); NULL when out of range.
///
/// # Safety
/// `j` as for [`job`]; `errno` writable.
#[no_mangle]
pub unsafe extern "C" fn wc_fio_job_event(
    j: *mut c_void,
    i: c_int,
    errno: *mut c_int,
) -> *mut c_void {
    // SAFETY: per this function's contract.
    let j = unsafe { job(j) };
    match usize::try_from(i).ok().and_then(|i| j.event(i)) {
        Some((tag, e)) => {
            // SAFETY: the caller passes a writable pointer.
            unsafe { *errno = e };
            tag as *mut c_void
        }
        None => std::ptr::null_mut(),
    }
}

/// Ends the job: waits for its I/O, closes its bdevs, hands the reactor
/// back.
///
/// # Safety
/// `j` comes from [`wc_fio_job_new`] on this thread; not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn wc_fio_job_free(j: *mut c_void) {
    if j.is_null() {
        return;
    }
    // SAFETY: per this function's contract, we own the box now.
    let j = unsafe { Box::from_raw(j.cast::<Job>()) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || j.finish()));
}

#[cfg(test)]
mod tests;
