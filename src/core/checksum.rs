//! crc32c (Castagnoli) as used by every on-disk structure. The `crc32c` crate uses the SSE4.2
//! / ARMv8 CRC instructions when the CPU has them and a table otherwise.

/// crc32c of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// crc32c continued over `bytes` from a previous value.
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_matches_rfc3720() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        // "123456789" check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn append_equals_whole() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let split = crc32c_append(crc32c(&data[..333]), &data[333..]);
        assert_eq!(split, crc32c(&data));
    }
}
