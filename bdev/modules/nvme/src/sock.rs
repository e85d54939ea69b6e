//! Non-blocking TCP connections for queue pairs: a connect that never
//! blocks the reactor, polled for completion, and reads and writes that
//! report "would block" instead of waiting.

use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// A TCP connection in progress or established.
pub(crate) struct Conn {
    stream: TcpStream,
    established: bool,
}

/// Outcome of polling a connect in progress.
pub(crate) enum ConnectPoll {
    /// Still in progress.
    Pending,
    /// Connected.
    Ready,
}

impl Conn {
    /// Starts a non-blocking connect to `addr`.
    pub(crate) fn start(addr: SocketAddr) -> io::Result<Conn> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_nonblocking(true)?;
        // socket2 opens sockets close-on-exec on Linux.
        s.set_nodelay(true)?;
        match s.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(Conn {
            stream: s.into(),
            established: false,
        })
    }

    /// Polls a connect in progress (no waiting).
    pub(crate) fn poll_connect(&mut self) -> io::Result<ConnectPoll> {
        if self.established {
            return Ok(ConnectPoll::Ready);
        }
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the call; timeout 0 never
        // blocks.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(ConnectPoll::Pending);
        }
        if let Some(e) = self.stream.take_error()? {
            return Err(e);
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        }
        self.established = true;
        Ok(ConnectPoll::Ready)
    }

    /// Reads what the socket has; `Ok(0)` is the peer closing.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }

    /// Writes what the socket takes.
    pub(crate) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.stream.write_vectored(bufs)
    }

    /// Closes both directions now (the descriptor closes on drop).
    pub(crate) fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
