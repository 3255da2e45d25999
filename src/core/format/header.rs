//! The 32-byte header every on-disk structure starts with.
//!
//! | offset | size | field                                                             |
//! |-------:|-----:|-------------------------------------------------------------------|
//! | 0      | 8    | magic (ASCII, names the structure)                                 |
//! | 8      | 2    | major version                                                      |
//! | 10     | 2    | minor version                                                      |
//! | 12     | 4    | length: bytes of the structure including this header, no padding |
//! | 16     | 8    | sequence: grows with every rewrite; picks the newer of two copies |
//! | 24     | 4    | crc32c over bytes `[0, length)` with this field taken as zero     |
//! | 28     | 4    | reserved, zero                                                     |

use super::{FormatError, Reader, Writer, FORMAT_MAJOR, FORMAT_MINOR};
use crate::core::checksum::{crc32c, crc32c_append};

pub const HEADER_BYTES: usize = 32;
const CRC_OFFSET: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: [u8; 8],
    pub major: u16,
    pub minor: u16,
    pub length: u32,
    pub sequence: u64,
    pub crc: u32,
}

impl Header {
    /// Writes a header for a structure of `length` bytes at the start of `bytes`; the crc is
    /// filled in by [`seal`] once the body is written.
    pub(crate) fn write(bytes: &mut [u8], magic: &[u8; 8], length: usize, sequence: u64) {
        assert!(length >= HEADER_BYTES && length <= bytes.len());
        assert!(u32::try_from(length).is_ok());
        let mut writer = Writer::new(bytes);
        writer.put_bytes(magic);
        writer.put_u16(FORMAT_MAJOR);
        writer.put_u16(FORMAT_MINOR);
        writer.put_u32(length as u32);
        writer.put_u64(sequence);
        writer.put_u32(0);
        writer.put_u32(0);
    }

    /// Reads and validates the header and the crc of the structure that starts at `bytes[0]`.
    /// Returns the header and the structure's bytes `[0, length)`.
    pub(crate) fn read<'a>(
        structure: &'static str,
        magic: &[u8; 8],
        bytes: &'a [u8],
        minimum_length: usize,
    ) -> Result<(Header, &'a [u8]), FormatError> {
        let mut reader = Reader::new(structure, bytes);
        let found: [u8; 8] = reader.array()?;
        if &found != magic {
            return Err(FormatError::BadMagic { structure, found });
        }
        let major = reader.u16()?;
        let minor = reader.u16()?;
        let length = reader.u32()?;
        let sequence = reader.u64()?;
        let crc = reader.u32()?;
        let _reserved = reader.u32()?;
        if major != FORMAT_MAJOR {
            return Err(FormatError::UnsupportedVersion { structure, major, minor, supported_major: FORMAT_MAJOR });
        }
        let length_bytes = length as usize;
        if length_bytes < minimum_length.max(HEADER_BYTES) || length_bytes > bytes.len() {
            return Err(FormatError::BadLength {
                structure,
                length,
                minimum: minimum_length.max(HEADER_BYTES),
                available: bytes.len(),
            });
        }
        let body = &bytes[..length_bytes];
        let computed = structure_crc(body);
        if computed != crc {
            return Err(FormatError::ChecksumMismatch { structure, stored: crc, computed });
        }
        Ok((Header { magic: found, major, minor, length, sequence, crc }, body))
    }
}

/// crc32c over a structure with its crc field taken as zero.
fn structure_crc(body: &[u8]) -> u32 {
    let crc = crc32c(&body[..CRC_OFFSET]);
    let crc = crc32c_append(crc, &[0u8; 4]);
    crc32c_append(crc, &body[CRC_OFFSET + 4..])
}

/// Computes and stores the crc of the structure occupying `bytes[0..length]`.
pub(crate) fn seal(bytes: &mut [u8], length: usize) {
    let crc = structure_crc(&bytes[..length]);
    bytes[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_header_reads_back_and_detects_a_flipped_bit() {
        let mut bytes = vec![0u8; 64];
        Header::write(&mut bytes, b"TESTTEST", 48, 7);
        bytes[40] = 0xAB;
        seal(&mut bytes, 48);
        let (header, body) = Header::read("test", b"TESTTEST", &bytes, 32).unwrap();
        assert_eq!(header.sequence, 7);
        assert_eq!(header.length, 48);
        assert_eq!(body.len(), 48);
        for bit in 0..48 * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(Header::read("test", b"TESTTEST", &damaged, 32).is_err(), "bit {bit}");
        }
    }
}
