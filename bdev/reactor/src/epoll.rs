//! A non-blocking epoll instance for pollers that serve sockets (the NBD
//! and NVMe/TCP exports): registered descriptors carry a caller-chosen id,
//! and `poll_now` reports the ready ones without ever sleeping.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One epoll instance.
pub struct Epoll {
    fd: OwnedFd,
}

/// Ready events of one `poll_now` call: `(id, events)` pairs.
pub type Ready = [libc::epoll_event; Epoll::BATCH];

impl Epoll {
    /// Events reported per `poll_now` call.
    pub const BATCH: usize = 64;

    /// A new, empty instance (close-on-exec).
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    /// `epoll_ctl(op, fd)` with `events`, reporting `id` when ready.
    pub fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, id: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: id };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call;
        // the caller keeps `fd` open while it is registered.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sets a registered connection's interest to readable and/or
    /// writable, with one `EPOLL_CTL_MOD` only when it differs from
    /// `*current` (updated on success).
    pub fn set_interest(
        &self,
        fd: RawFd,
        id: u64,
        current: &mut u32,
        readable: bool,
        writable: bool,
    ) -> io::Result<()> {
        let want = if readable { libc::EPOLLIN as u32 } else { 0 }
            | if writable { libc::EPOLLOUT as u32 } else { 0 };
        if want != *current {
            self.ctl(libc::EPOLL_CTL_MOD, fd, want, id)?;
            *current = want;
        }
        Ok(())
    }

    /// The ready descriptors as `(id, events)`, without blocking.
    pub fn poll_now<'a>(&self, buf: &'a mut Ready) -> impl Iterator<Item = (u64, u32)> + 'a {
        // SAFETY: `buf` has room for BATCH events; timeout 0 never blocks.
        let n = unsafe {
            libc::epoll_wait(self.fd.as_raw_fd(), buf.as_mut_ptr(), Self::BATCH as i32, 0)
        };
        buf.iter()
            .take(n.max(0) as usize)
            .map(|ev| (ev.u64, ev.events))
    }

    /// An empty event buffer for `poll_now`.
    pub fn ready_buf() -> Ready {
        [libc::epoll_event { events: 0, u64: 0 }; Self::BATCH]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_a_readable_socket_by_its_id_and_nothing_else() {
        let ep = Epoll::new().unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        ep.ctl(libc::EPOLL_CTL_ADD, b.as_raw_fd(), libc::EPOLLIN as u32, 7)
            .unwrap();
        let mut buf = Epoll::ready_buf();
        assert_eq!(ep.poll_now(&mut buf).count(), 0);
        a.write_all(b"x").unwrap();
        let ready: Vec<_> = ep.poll_now(&mut buf).collect();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].0, 7);
        assert_ne!(ready[0].1 & libc::EPOLLIN as u32, 0);
        ep.ctl(libc::EPOLL_CTL_DEL, b.as_raw_fd(), 0, 7).unwrap();
        assert_eq!(ep.poll_now(&mut buf).count(), 0);
    }
}
