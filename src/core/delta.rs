//! Delta codec for replication (seed 000 mechanisms 3 and 7: the sender ships the difference
//! between the new element and the block the receiver already holds, not the element).
//!
//! A delta is the XOR of the new element against the base element, compressed with LZ4: where
//! few bytes changed the XOR is mostly zeros and compresses to little. When that does not make
//! the frame smaller than the element, the frame carries the element raw; when nothing
//! changed, the frame carries nothing. Seed 000 leaves open how the receiver knows that its
//! base is the one the sender used ("[gap] Nothing checks this"): here the frame carries the
//! crc32c of the new element, and decoding verifies the rebuilt element against it, so a wrong
//! base (or a damaged frame) is an error, never silently wrong data.
//!
//! # Frame
//!
//! All integers little-endian. 16 bytes of header, then the payload:
//!
//! | offset | size | field                                                                |
//! |-------:|-----:|----------------------------------------------------------------------|
//! | 0      | 2    | magic, ASCII `"CD"` (0x43 0x44)                                      |
//! | 2      | 1    | version, 1                                                           |
//! | 3      | 1    | kind: 0 identical, 1 XOR compressed with LZ4, 2 raw                  |
//! | 4      | 4    | element length in bytes (at most [`MAX_ELEMENT_BYTES`])              |
//! | 8      | 4    | crc32c of the new element                                            |
//! | 12     | 4    | payload length in bytes                                              |
//! | 16     | n    | payload                                                              |
//!
//! Payload by kind:
//! - 0 identical: empty; the element equals the base.
//! - 1 XOR-LZ4: an LZ4 *block* (no frame, no size prefix) that decompresses to exactly
//!   `element length` bytes, the XOR of new and base; `0 < payload length < element length`.
//! - 2 raw: the new element itself; `payload length == element length`; the base is not used.
//!
//! A frame is exactly `16 + payload length` bytes; decoding refuses trailing bytes. Decoding
//! any bytes returns a typed [`DeltaError`] and never panics, and it allocates at most the
//! declared element length, which is refused above [`MAX_ELEMENT_BYTES`] before anything is
//! allocated.

use super::checksum::crc32c;
use super::geometry::HOST_WRITE_BYTES_MAX;

/// Magic at the start of every frame.
pub const MAGIC: [u8; 2] = *b"CD";
/// Version written, and the only one read.
pub const VERSION: u8 = 1;
/// Bytes of the frame header.
pub const FRAME_HEADER_BYTES: usize = 16;
/// Largest element a frame may carry: the largest host write size.
pub const MAX_ELEMENT_BYTES: usize = HOST_WRITE_BYTES_MAX as usize;

/// What a frame's payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeltaKind {
    Identical = 0,
    XorLz4 = 1,
    Raw = 2,
}

impl DeltaKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(DeltaKind::Identical),
            1 => Some(DeltaKind::XorLz4),
            2 => Some(DeltaKind::Raw),
            _ => None,
        }
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta frame truncated: needs {needed} bytes, only {available} present")]
    Truncated { needed: usize, available: usize },
    #[error("delta frame has bad magic {found:02x?} (not a delta frame)")]
    BadMagic { found: [u8; 2] },
    #[error("delta frame version {version} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion { version: u8 },
    #[error("delta frame kind {kind} is unknown")]
    UnknownKind { kind: u8 },
    #[error("delta frame declares an element of {length} bytes, more than the largest element ({maximum} bytes)")]
    ElementTooLarge { length: u32, maximum: usize },
    #[error(
        "delta frame of kind {kind:?} has an impossible payload of {payload} bytes for an element of {element} bytes"
    )]
    BadPayloadLength { kind: DeltaKind, payload: u32, element: u32 },
    #[error("delta frame is followed by {extra} unexpected bytes")]
    TrailingBytes { extra: usize },
    #[error("delta frame is for an element of {element} bytes but the base block has {base} bytes")]
    BaseLengthMismatch { element: usize, base: usize },
    #[error("output buffer has {actual} bytes but the element has {expected} bytes")]
    OutputLength { expected: usize, actual: usize },
    #[error("delta frame payload is corrupt: {reason}")]
    Corrupt { reason: String },
    #[error(
        "rebuilt element fails its checksum (stored {stored:#010x}, computed {computed:#010x}): the frame is damaged or the base block is not the one the delta was made against"
    )]
    ChecksumMismatch { stored: u32, computed: u32 },
}

/// The validated header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: DeltaKind,
    pub element_bytes: usize,
    pub crc: u32,
    pub payload_bytes: usize,
}

impl FrameHeader {
    /// Bytes of the whole frame.
    pub fn frame_bytes(&self) -> usize {
        FRAME_HEADER_BYTES + self.payload_bytes
    }
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([bytes[offset], bytes[offset + 1], bytes[offset + 2], bytes[offset + 3]])
}

/// Reads and validates the header at the start of `frame` (which may hold more bytes after
/// the frame): tells a reader of a stream how long the frame is and how big the element is.
pub fn header(frame: &[u8]) -> Result<FrameHeader, DeltaError> {
    if frame.len() < FRAME_HEADER_BYTES {
        return Err(DeltaError::Truncated { needed: FRAME_HEADER_BYTES, available: frame.len() });
    }
    let found = [frame[0], frame[1]];
    if found != MAGIC {
        return Err(DeltaError::BadMagic { found });
    }
    if frame[2] != VERSION {
        return Err(DeltaError::UnsupportedVersion { version: frame[2] });
    }
    let kind = DeltaKind::from_byte(frame[3]).ok_or(DeltaError::UnknownKind { kind: frame[3] })?;
    let element = u32_at(frame, 4);
    let crc = u32_at(frame, 8);
    let payload = u32_at(frame, 12);
    if element as usize > MAX_ELEMENT_BYTES {
        return Err(DeltaError::ElementTooLarge { length: element, maximum: MAX_ELEMENT_BYTES });
    }
    let payload_fits = match kind {
        DeltaKind::Identical => payload == 0,
        DeltaKind::XorLz4 => payload > 0 && payload < element,
        DeltaKind::Raw => payload == element,
    };
    if !payload_fits {
        return Err(DeltaError::BadPayloadLength { kind, payload, element });
    }
    Ok(FrameHeader { kind, element_bytes: element as usize, crc, payload_bytes: payload as usize })
}

/// The frame that rebuilds `new` from `base`. Panics if the two differ in length or are longer
/// than [`MAX_ELEMENT_BYTES`]: elements are host-write-size blocks, so that is a caller's bug.
pub fn encode(base: &[u8], new: &[u8]) -> Vec<u8> {
    assert_eq!(base.len(), new.len(), "a delta is made between elements of one size");
    assert!(new.len() <= MAX_ELEMENT_BYTES, "element of {} bytes is larger than any host write size", new.len());
    let crc = crc32c(new);
    if base == new {
        let mut frame = vec![0; FRAME_HEADER_BYTES];
        write_header(&mut frame, DeltaKind::Identical, new.len(), crc, 0);
        return frame;
    }
    let xor: Vec<u8> = new.iter().zip(base).map(|(n, b)| n ^ b).collect();
    let mut frame = vec![0; FRAME_HEADER_BYTES + lz4_flex::block::get_maximum_output_size(xor.len())];
    let compressed = lz4_flex::block::compress_into(&xor, &mut frame[FRAME_HEADER_BYTES..])
        .expect("the output buffer has lz4's maximum output size");
    if compressed < new.len() {
        frame.truncate(FRAME_HEADER_BYTES + compressed);
        write_header(&mut frame, DeltaKind::XorLz4, new.len(), crc, compressed);
    } else {
        frame.truncate(FRAME_HEADER_BYTES + new.len());
        frame[FRAME_HEADER_BYTES..].copy_from_slice(new);
        write_header(&mut frame, DeltaKind::Raw, new.len(), crc, new.len());
    }
    debug_assert_eq!(header(&frame).map(|h| h.frame_bytes()), Ok(frame.len()));
    frame
}

fn write_header(frame: &mut [u8], kind: DeltaKind, element: usize, crc: u32, payload: usize) {
    frame[0..2].copy_from_slice(&MAGIC);
    frame[2] = VERSION;
    frame[3] = kind as u8;
    frame[4..8].copy_from_slice(&(element as u32).to_le_bytes());
    frame[8..12].copy_from_slice(&crc.to_le_bytes());
    frame[12..16].copy_from_slice(&(payload as u32).to_le_bytes());
}

/// Rebuilds the element from `base` and `frame` (exactly one frame, no trailing bytes).
pub fn decode(base: &[u8], frame: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let header = check_frame(base, frame)?;
    // Bounded: the header refused anything above MAX_ELEMENT_BYTES.
    let mut out = vec![0; header.element_bytes];
    rebuild(&header, base, frame, &mut out)?;
    Ok(out)
}

/// Rebuilds the element into `out`, which must be exactly the element's length. On error the
/// contents of `out` are unspecified.
pub fn decode_into(base: &[u8], frame: &[u8], out: &mut [u8]) -> Result<(), DeltaError> {
    let header = check_frame(base, frame)?;
    if out.len() != header.element_bytes {
        return Err(DeltaError::OutputLength { expected: header.element_bytes, actual: out.len() });
    }
    rebuild(&header, base, frame, out)
}

fn check_frame(base: &[u8], frame: &[u8]) -> Result<FrameHeader, DeltaError> {
    let header = header(frame)?;
    let frame_bytes = header.frame_bytes();
    if frame.len() < frame_bytes {
        return Err(DeltaError::Truncated { needed: frame_bytes, available: frame.len() });
    }
    if frame.len() > frame_bytes {
        return Err(DeltaError::TrailingBytes { extra: frame.len() - frame_bytes });
    }
    if header.kind != DeltaKind::Raw && base.len() != header.element_bytes {
        return Err(DeltaError::BaseLengthMismatch { element: header.element_bytes, base: base.len() });
    }
    Ok(header)
}

fn rebuild(header: &FrameHeader, base: &[u8], frame: &[u8], out: &mut [u8]) -> Result<(), DeltaError> {
    let payload = &frame[FRAME_HEADER_BYTES..];
    match header.kind {
        DeltaKind::Identical => out.copy_from_slice(base),
        DeltaKind::Raw => out.copy_from_slice(payload),
        DeltaKind::XorLz4 => {
            let written = lz4_flex::block::decompress_into(payload, out)
                .map_err(|error| DeltaError::Corrupt { reason: error.to_string() })?;
            if written != out.len() {
                return Err(DeltaError::Corrupt {
                    reason: format!("payload expands to {written} bytes, the element has {}", out.len()),
                });
            }
            for (byte, base_byte) in out.iter_mut().zip(base) {
                *byte ^= base_byte;
            }
        }
    }
    let computed = crc32c(out);
    if computed != header.crc {
        return Err(DeltaError::ChecksumMismatch { stored: header.crc, computed });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_bytes(rng: &mut ChaCha8Rng, length: usize) -> Vec<u8> {
        let mut bytes = vec![0; length];
        rng.fill_bytes(&mut bytes);
        bytes
    }

    /// `base` with `changed` random bytes rewritten.
    fn sparse_change(rng: &mut ChaCha8Rng, base: &[u8], changed: usize) -> Vec<u8> {
        let mut new = base.to_vec();
        for _ in 0..changed {
            let at = rng.random_range(0..new.len());
            new[at] = rng.random();
        }
        new
    }

    #[test]
    fn identical_elements_give_an_empty_delta() {
        let base = vec![7u8; 4096];
        let frame = encode(&base, &base);
        assert_eq!(frame.len(), FRAME_HEADER_BYTES);
        assert_eq!(header(&frame).unwrap().kind, DeltaKind::Identical);
        assert_eq!(decode(&base, &frame).unwrap(), base);
        // Empty elements are identical too.
        assert_eq!(decode(&[], &encode(&[], &[])).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn frame_layout_is_as_documented() {
        let base = vec![0u8; 4096];
        let mut new = base.clone();
        new[100] = 1;
        let frame = encode(&base, &new);
        assert_eq!(&frame[0..2], b"CD");
        assert_eq!(frame[2], 1);
        assert_eq!(frame[3], DeltaKind::XorLz4 as u8);
        assert_eq!(u32_at(&frame, 4), 4096);
        assert_eq!(u32_at(&frame, 8), crc32c(&new));
        assert_eq!(u32_at(&frame, 12) as usize, frame.len() - FRAME_HEADER_BYTES);
        assert!(frame.len() < 64, "one changed byte in 4 KiB is a small delta, got {}", frame.len());
    }

    #[test]
    fn incompressible_change_falls_back_to_raw() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let base = random_bytes(&mut rng, 4096);
        let new = random_bytes(&mut rng, 4096);
        let frame = encode(&base, &new);
        assert_eq!(header(&frame).unwrap().kind, DeltaKind::Raw);
        assert_eq!(frame.len(), FRAME_HEADER_BYTES + 4096);
        assert_eq!(decode(&base, &frame).unwrap(), new);
        // A raw frame does not need the base.
        assert_eq!(decode(&[], &frame).unwrap(), new);
    }

    #[test]
    fn wrong_base_is_detected() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let base = random_bytes(&mut rng, 4096);
        let new = sparse_change(&mut rng, &base, 40);
        let frame = encode(&base, &new);
        let other_base = sparse_change(&mut rng, &base, 1);
        assert!(matches!(decode(&other_base, &frame), Err(DeltaError::ChecksumMismatch { .. })));
        assert!(matches!(decode(&base[..512], &frame), Err(DeltaError::BaseLengthMismatch { .. })));
        let mut out = vec![0; 512];
        assert!(matches!(decode_into(&base, &frame, &mut out), Err(DeltaError::OutputLength { .. })));
    }

    #[test]
    fn oversized_and_malformed_headers_are_refused_before_allocating() {
        let mut frame = vec![0u8; FRAME_HEADER_BYTES];
        write_header(&mut frame, DeltaKind::Raw, 0, 0, 0);
        frame[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        frame[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&[], &frame), Err(DeltaError::ElementTooLarge { .. })));
        let mut frame = encode(&[1], &[2]);
        frame[3] = 9;
        assert_eq!(decode(&[1], &frame), Err(DeltaError::UnknownKind { kind: 9 }));
        let mut frame = encode(&[1], &[2]);
        frame.push(0);
        assert_eq!(decode(&[1], &frame), Err(DeltaError::TrailingBytes { extra: 1 }));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let base = random_bytes(&mut rng, 4096);
        for changed in [0, 10, 4096] {
            let new = sparse_change(&mut rng, &base, changed);
            let frame = encode(&base, &new);
            for cut in 0..frame.len() {
                assert!(decode(&base, &frame[..cut]).is_err(), "cut at {cut} of {}", frame.len());
            }
        }
    }

    #[test]
    fn bit_flips_never_yield_wrong_data() {
        // Every single-bit flip of a few frames: either an error, or (a flip the LZ4 stream
        // does not notice, e.g. a match offset inside a run of zeros) exactly the right element.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let base = random_bytes(&mut rng, 4096);
        for changed in [1, 50, 400] {
            let new = sparse_change(&mut rng, &base, changed);
            let frame = encode(&base, &new);
            for bit in 0..frame.len() * 8 {
                let mut damaged = frame.clone();
                damaged[bit / 8] ^= 1 << (bit % 8);
                if let Ok(element) = decode(&base, &damaged) {
                    assert!(bit >= FRAME_HEADER_BYTES * 8, "header bit {bit} flip not detected");
                    assert_eq!(element, new, "bit {bit} decoded to wrong data");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip_of_random_elements(base in proptest::collection::vec(any::<u8>(), 0..5000), seed in any::<u64>()) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let new = random_bytes(&mut rng, base.len());
            let frame = encode(&base, &new);
            prop_assert_eq!(decode(&base, &frame).unwrap(), new.clone());
            let mut out = vec![0; base.len()];
            decode_into(&base, &frame, &mut out).unwrap();
            prop_assert_eq!(out, new);
        }

        #[test]
        fn round_trip_of_sparse_changes(seed in any::<u64>(), length in 1usize..9000, changed in 0usize..200) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let base = random_bytes(&mut rng, length);
            let new = sparse_change(&mut rng, &base, changed);
            let frame = encode(&base, &new);
            prop_assert!(frame.len() <= FRAME_HEADER_BYTES + length);
            prop_assert_eq!(decode(&base, &frame).unwrap(), new);
        }

        #[test]
        fn random_frames_never_panic(base in proptest::collection::vec(any::<u8>(), 0..600), mut frame in proptest::collection::vec(any::<u8>(), 0..700), kind in 0u8..3) {
            // Make most frames get past the magic so the payload paths are exercised.
            if frame.len() >= FRAME_HEADER_BYTES {
                frame[0..2].copy_from_slice(&MAGIC);
                frame[2] = VERSION;
                frame[3] = kind;
                frame[4..8].copy_from_slice(&(base.len() as u32).to_le_bytes());
                let payload = (frame.len() - FRAME_HEADER_BYTES) as u32;
                frame[12..16].copy_from_slice(&payload.to_le_bytes());
            }
            let _ = decode(&base, &frame);
        }
    }
}
