//! CRC32C header and data digests (NVMe/TCP HDGST / DDGST).

/// CRC32C of `data`, as carried in a digest field (little-endian on the wire).
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continues a CRC32C over another piece of the same data (data that arrives
/// or leaves in several buffers).
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn append_equals_whole() {
        let data: Vec<u8> = (0..200u8).collect();
        let c = crc32c_append(crc32c(&data[..77]), &data[77..]);
        assert_eq!(c, crc32c(&data));
    }
}
