//! NBD wire constants, the geometry an export advertises, and the little
//! big-endian encoders both protocol phases use.
//!
//! Values follow the NBD protocol document (`doc/proto.md` of
//! NetworkBlockDevice/nbd). Everything on the wire is big-endian.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of a fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can skip the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: FLUSH and FUA are visible across connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: pick an export and enter transmission (no error path).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: TLS (refused: this server has no TLS).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (refused).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item.
pub const REP_INFO: u32 = 3;
/// Option reply error: unknown or unsupported option.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option reply error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// Option reply error: malformed option.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
/// Option reply error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;

/// Information item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information item: the export's name.
pub const INFO_NAME: u16 = 1;
/// Information item: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information item: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (unmap).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Protocol error values (the reply's `error` field).
pub mod errno {
    /// Operation not permitted (writes to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device (writes past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// Largest option payload accepted; a larger one ends the connection
/// (an export name is at most 4096 bytes; INFO/GO add a few requests).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest export name accepted (the protocol's string limit).
pub const MAX_NAME_LEN: usize = 4096;
/// Largest READ/WRITE payload (the advertised maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Options a client may send before it picks an export.
pub const MAX_OPTIONS: u32 = 1024;

/// What an export looks like to a client, and what the decoder checks
/// requests against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Block size: minimum request granularity (power of two, <= 64 KiB).
    pub block_size: u32,
    /// Largest READ/WRITE payload; a multiple of `block_size`.
    pub max_payload: u32,
    /// Writes, trims and write-zeroes fail with EPERM.
    pub readonly: bool,
    /// FLUSH (and so FUA) is supported.
    pub flush: bool,
    /// TRIM is supported.
    pub trim: bool,
    /// WRITE_ZEROES is supported.
    pub write_zeroes: bool,
}

impl Geometry {
    /// The transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_CAN_MULTI_CONN;
        if self.readonly {
            f |= TFLAG_READ_ONLY;
        }
        if self.flush {
            f |= TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        }
        if self.trim && !self.readonly {
            f |= TFLAG_SEND_TRIM;
        }
        if self.write_zeroes && !self.readonly {
            f |= TFLAG_SEND_WRITE_ZEROES;
        }
        f
    }

    /// `(minimum, preferred, maximum)` of `NBD_INFO_BLOCK_SIZE`.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let min = self.block_size;
        let max = self.max_payload;
        let pref = min.max(4096).min(max).max(min);
        (min, pref, max)
    }
}

/// Appends big-endian integers to a byte vector.
pub(crate) trait PutBe {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl PutBe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

/// Reads a big-endian `u16` at `at` (None when out of bounds).
pub(crate) fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

/// Reads a big-endian `u32` at `at`.
pub(crate) fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads a big-endian `u64` at `at`.
pub(crate) fn be64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// Appends one option reply.
pub(crate) fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    // Callers pass short, bounded data (names <= 4096 bytes, messages).
    out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(data);
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..].copy_from_slice(&handle.to_be_bytes());
    h
}

/// Maps a bdev errno to one of the values the protocol allows.
pub fn wire_errno(e: i32) -> u32 {
    match e {
        libc::EPERM | libc::EROFS => errno::EPERM,
        libc::EINVAL | libc::ENOTSUP => errno::EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => errno::ENOSPC,
        libc::ENOMEM => errno::ENOMEM,
        libc::EOVERFLOW => errno::EOVERFLOW,
        libc::ESHUTDOWN => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_block_sizes() {
        let g = Geometry {
            size: 1 << 20,
            block_size: 512,
            max_payload: MAX_PAYLOAD,
            readonly: false,
            flush: true,
            trim: true,
            write_zeroes: false,
        };
        let f = g.transmission_flags();
        assert_eq!(
            f,
            TFLAG_HAS_FLAGS
                | TFLAG_CAN_MULTI_CONN
                | TFLAG_SEND_FLUSH
                | TFLAG_SEND_FUA
                | TFLAG_SEND_TRIM
        );
        assert_eq!(g.block_sizes(), (512, 4096, MAX_PAYLOAD));
        let ro = Geometry {
            readonly: true,
            block_size: 8192,
            ..g
        };
        assert_eq!(ro.transmission_flags() & TFLAG_SEND_TRIM, 0);
        assert_ne!(ro.transmission_flags() & TFLAG_READ_ONLY, 0);
        assert_eq!(ro.block_sizes(), (8192, 8192, MAX_PAYLOAD));
        assert_eq!(wire_errno(libc::EBADF), errno::EIO);
        assert_eq!(wire_errno(libc::EDQUOT), errno::ENOSPC);
        assert_eq!(be32(&[0, 0, 1], 0), None);
        assert_eq!(be16(&[1, 2], usize::MAX), None);
    }
}
