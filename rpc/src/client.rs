//! A tiny blocking JSON-RPC client, behaving like SPDK's `rpc.py` `JSONRPCClient`.
//!
//! Meant for tests (this crate's and other crates') and small tools:
//!
//! ```no_run
//! let mut c = wc_rpc::client::Client::connect("/var/tmp/spdk.sock").unwrap();
//! let methods = c.call("rpc_get_methods", None).unwrap();
//! println!("{methods}");
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::RpcError;

/// rpc.py's default timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to an RPC server.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u64,
    buf: Vec<u8>,
}

fn transport_error(e: &io::Error) -> RpcError {
    RpcError::errno_msg(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("RPC transport error: {e}"),
    )
}

impl Client {
    /// Connects to the Unix socket at `path`, with a 60 s read timeout.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Client> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Client {
            stream,
            next_id: 1,
            buf: Vec::new(),
        })
    }

    /// Changes the read timeout (`None`: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// The underlying socket (for tests that need to write odd bytes or shut it down).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Calls `method` and waits for the reply.
    ///
    /// Like rpc.py: ids count from 1 per connection, `params` is sent only when it is
    /// present and not an empty object, and the first complete JSON value read is taken as
    /// the reply (its id is not checked). An `error` member becomes `Err`; a transport
    /// failure becomes `Err` with code `-errno` and a message starting "RPC transport error".
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
        match params {
            None => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(p) => req["params"] = p,
        }
        let text = serde_json::to_string(&req)
            .map_err(|e| RpcError::internal(format!("Failed to encode request: {e}")))?;
        self.send_raw(text.as_bytes())
            .map_err(|e| transport_error(&e))?;
        let reply = self.read_value().map_err(|e| transport_error(&e))?;
        match reply.get("error") {
            Some(err) => {
                let code = err
                    .get("code")
                    .and_then(Value::as_i64)
                    .and_then(|c| i32::try_from(c).ok())
                    .unwrap_or(crate::error::INTERNAL_ERROR);
                let message = err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                Err(RpcError { code, message })
            }
            None => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// Writes raw bytes to the socket.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the next complete JSON value (bytes after it are kept for the next read).
    /// `UnexpectedEof` if the server closes the connection first.
    pub fn read_value(&mut self) -> io::Result<Value> {
        let mut chunk = [0u8; 4096];
        loop {
            let mut values =
                serde_json::Deserializer::from_slice(self.buf.as_slice()).into_iter::<Value>();
            match values.next() {
                Some(Ok(v)) => {
                    let used = values.byte_offset();
                    self.buf.drain(..used);
                    return Ok(v);
                }
                Some(Err(e)) if !e.is_eof() => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
                // Nothing or an incomplete value: read more.
                _ => {}
            }
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                let msg = if self.buf.iter().all(u8::is_ascii_whitespace) {
                    "Connection closed"
                } else {
                    "Connection closed with partial response"
                };
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg));
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }
}
