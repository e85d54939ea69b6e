//! A connected client socket: Unix or TCP, always non-blocking once a
//! reactor owns it.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// A client connection's socket.
#[derive(Debug)]
pub enum NbdStream {
    /// A Unix-domain stream socket.
    Unix(UnixStream),
    /// A TCP socket.
    Tcp(TcpStream),
}

impl NbdStream {
    /// Switches the socket to non-blocking mode (and TCP_NODELAY on TCP:
    /// replies are small and latency-bound).
    pub fn prepare(&self) -> io::Result<()> {
        match self {
            NbdStream::Unix(s) => s.set_nonblocking(true),
            NbdStream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)
            }
        }
    }

    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NbdStream::Unix(s) => s.read(buf),
            NbdStream::Tcp(s) => s.read(buf),
        }
    }

    pub(crate) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            NbdStream::Unix(s) => s.write_vectored(bufs),
            NbdStream::Tcp(s) => s.write_vectored(bufs),
        }
    }

    pub(crate) fn shutdown(&self) {
        let _ = match self {
            NbdStream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            NbdStream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl AsRawFd for NbdStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            NbdStream::Unix(s) => s.as_raw_fd(),
            NbdStream::Tcp(s) => s.as_raw_fd(),
        }
    }
}
