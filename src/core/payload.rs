//! Self-identifying test payloads for crash-consistency checks (`chronicle load` / `check`,
//! and the SPDK module's `bdev_chronicle_load`): each block written holds a magic, its block
//! number, a write sequence, the seed and a crc32c of the rest, so a reader can tell a block's
//! newest write, a misplaced block and a torn or damaged one apart.

use super::checksum::crc32c;

pub const MAGIC: &[u8; 8] = b"CHRNLOAD";
/// Bytes before the filler: magic, block, sequence, seed, crc.
pub const HEADER_BYTES: usize = 36;

/// Fills `buffer` (at least [`HEADER_BYTES`] long) with the payload of (block, sequence, seed).
pub fn fill(buffer: &mut [u8], block: u64, sequence: u64, seed: u64) {
    assert!(buffer.len() >= HEADER_BYTES, "a payload needs {HEADER_BYTES} bytes");
    buffer[..8].copy_from_slice(MAGIC);
    buffer[8..16].copy_from_slice(&block.to_le_bytes());
    buffer[16..24].copy_from_slice(&sequence.to_le_bytes());
    buffer[24..32].copy_from_slice(&seed.to_le_bytes());
    let mut state = block ^ sequence.rotate_left(17) ^ seed.rotate_left(41) ^ 0x9E37_79B9_7F4A_7C15;
    for chunk in buffer[HEADER_BYTES..].chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let crc = crc32c(&buffer[HEADER_BYTES..]);
    buffer[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// What a block holds: never written (all zero), a valid payload, or garbage.
#[derive(Debug, PartialEq, Eq)]
pub enum Content {
    Zero,
    Write { sequence: u64 },
    Invalid(String),
}

/// Reads the payload of `buffer`, expected at `block`.
pub fn parse(buffer: &[u8], block: u64) -> Content {
    if buffer.iter().all(|b| *b == 0) {
        return Content::Zero;
    }
    if buffer.len() < HEADER_BYTES || &buffer[..8] != MAGIC {
        return Content::Invalid("no payload magic".into());
    }
    let field = |at: usize| u64::from_le_bytes(buffer[at..at + 8].try_into().expect("8 bytes"));
    if field(8) != block {
        return Content::Invalid(format!("payload of block {} found at block {block}", field(8)));
    }
    let stored = u32::from_le_bytes(buffer[32..36].try_into().expect("4 bytes"));
    if crc32c(&buffer[HEADER_BYTES..]) != stored {
        return Content::Invalid("payload checksum mismatch (torn or corrupt)".into());
    }
    Content::Write { sequence: field(16) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_detects_damage() {
        let mut buffer = vec![0u8; 4096];
        fill(&mut buffer, 7, 99, 3);
        assert_eq!(parse(&buffer, 7), Content::Write { sequence: 99 });
        assert!(matches!(parse(&buffer, 8), Content::Invalid(_)));
        buffer[2000] ^= 1;
        assert!(matches!(parse(&buffer, 7), Content::Invalid(_)));
        assert_eq!(parse(&[0u8; 4096], 1), Content::Zero);
    }
}
