//! Frame table of a compressed history record (seed 001 embodiment 8, FIG 50).
//!
//! A compressed record's element extent starts with this table, then holds its frames: the
//! record's uncompressed elements (its "logical units", numbered as the record's map numbers
//! them) cut into frames of `frame_units` units, each compressed on its own (lz4 block format)
//! or stored raw when compressing does not make it smaller. A read of one element reads and
//! decompresses one frame; the table gives each frame's place, stored length and crc32c.

use super::header::{seal, Header, HEADER_BYTES};
use super::{FormatError, Reader, Writer};
use crate::core::checksum::crc32c;

pub const MAGIC: &[u8; 8] = b"CHRNFRMT";
const STRUCTURE: &str = "frame table";
const FRAME: &str = "compressed frame";
pub const FRAME_TABLE_PREFIX_BYTES: usize = 96;
pub const FRAME_ENTRY_BYTES: usize = 24;
/// Codec 1: lz4 block format (`lz4_flex::block`), no dictionary.
pub const CODEC_LZ4: u8 = 1;
/// Entry flag: the frame is stored uncompressed.
pub const FRAME_RAW: u8 = 1 << 0;

/// Where one frame is and how to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameEntry {
    /// Byte offset of the stored frame from the start of the element extent.
    pub offset_bytes: u64,
    /// Bytes stored (compressed, or the raw frame).
    pub stored_bytes: u32,
    /// crc32c of the stored bytes.
    pub crc: u32,
    pub raw: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameTable {
    pub generation: u64,
    pub through_generation: u64,
    /// Units of the record's uncompressed elements (its map addresses are `0..logical_units`).
    pub logical_units: u64,
    pub unit_bytes: u32,
    pub frame_units: u32,
    pub codec: u8,
    /// Byte offset of the first frame from the start of the extent (the table's units).
    pub data_offset: u64,
    pub frames: Vec<FrameEntry>,
}

impl FrameTable {
    pub fn encoded_len(frames: usize) -> usize {
        FRAME_TABLE_PREFIX_BYTES + FRAME_ENTRY_BYTES * frames
    }

    /// Frames a record of `logical_units` units has with frames of `frame_units` units.
    pub fn frame_count(logical_units: u64, frame_units: u32) -> u64 {
        logical_units.div_ceil(u64::from(frame_units.max(1)))
    }

    /// First logical unit and units of frame `index`.
    pub fn frame_units_of(&self, index: usize) -> (u64, u64) {
        let first = index as u64 * u64::from(self.frame_units);
        (first, u64::from(self.frame_units).min(self.logical_units.saturating_sub(first)))
    }

    /// Uncompressed bytes of frame `index`.
    pub fn frame_raw_bytes(&self, index: usize) -> usize {
        (self.frame_units_of(index).1 * u64::from(self.unit_bytes)) as usize
    }

    /// Bytes from the extent's start through the end of the last frame.
    pub fn used_bytes(&self) -> u64 {
        self.frames.last().map_or(self.data_offset, |f| f.offset_bytes + u64::from(f.stored_bytes))
    }

    /// Checks what decoding checks, and that every frame lies within an extent of
    /// `extent_bytes` bytes.
    pub fn validate(&self, extent_bytes: Option<u64>) -> Result<(), FormatError> {
        if self.codec != CODEC_LZ4 {
            return Err(FormatError::invalid(STRUCTURE, "codec", format!("unknown codec {}", self.codec)));
        }
        if self.frame_units == 0 || self.unit_bytes == 0 {
            return Err(FormatError::invalid(STRUCTURE, "frame units", "frame or unit size is zero"));
        }
        if self.through_generation < self.generation {
            return Err(FormatError::invalid(STRUCTURE, "through generation", "older than the generation"));
        }
        if Self::frame_count(self.logical_units, self.frame_units) != self.frames.len() as u64 {
            return Err(FormatError::invalid(
                STRUCTURE,
                "frame count",
                format!(
                    "{} frames for {} units of {} per frame",
                    self.frames.len(),
                    self.logical_units,
                    self.frame_units
                ),
            ));
        }
        if self.data_offset < Self::encoded_len(self.frames.len()) as u64 {
            return Err(FormatError::invalid(STRUCTURE, "data offset", "frames would overlap the table"));
        }
        let mut next = self.data_offset;
        for (index, frame) in self.frames.iter().enumerate() {
            let raw_bytes = self.frame_raw_bytes(index) as u64;
            let stored = u64::from(frame.stored_bytes);
            let valid_size = if frame.raw { stored == raw_bytes } else { stored > 0 && stored < raw_bytes };
            if !valid_size {
                return Err(FormatError::invalid(
                    STRUCTURE,
                    "stored bytes",
                    format!("frame {index} stores {stored} bytes of {raw_bytes} (raw: {})", frame.raw),
                ));
            }
            if frame.offset_bytes < next {
                return Err(FormatError::invalid(STRUCTURE, "frame offset", format!("frame {index} overlaps")));
            }
            next = frame.offset_bytes.checked_add(stored).ok_or_else(|| {
                FormatError::invalid(STRUCTURE, "frame offset", format!("frame {index} ends past 2^64"))
            })?;
        }
        if let Some(extent) = extent_bytes {
            if next > extent {
                return Err(FormatError::invalid(
                    STRUCTURE,
                    "frame offset",
                    format!("frames end at byte {next}, outside the record's {extent}-byte extent"),
                ));
            }
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        if let Err(error) = self.validate(None) {
            panic!("frame table of generation {}: {error}", self.generation);
        }
        let length = Self::encoded_len(self.frames.len());
        let mut bytes = vec![0u8; super::pad_to_pages(length)];
        Header::write(&mut bytes, MAGIC, length, 0);
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_u64(self.generation);
        w.put_u64(self.through_generation);
        w.put_u64(self.logical_units);
        w.put_u32(self.unit_bytes);
        w.put_u32(self.frame_units);
        w.put_u32(self.frames.len() as u32);
        w.put_u8(self.codec);
        w.skip(3);
        w.put_u64(self.data_offset);
        w.skip(FRAME_TABLE_PREFIX_BYTES - w.position());
        for frame in &self.frames {
            w.put_u64(frame.offset_bytes);
            w.put_u32(frame.stored_bytes);
            w.put_u32(frame.crc);
            w.put_u8(if frame.raw { FRAME_RAW } else { 0 });
            w.skip(7);
        }
        debug_assert_eq!(w.position(), length);
        seal(&mut bytes, length);
        bytes
    }

    /// Decodes a table; `bytes` may run past its length (the rest of its units).
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (_, body) = Header::read(STRUCTURE, MAGIC, bytes, FRAME_TABLE_PREFIX_BYTES)?;
        let mut r = Reader::at(STRUCTURE, body, HEADER_BYTES);
        let generation = r.u64()?;
        let through_generation = r.u64()?;
        let logical_units = r.u64()?;
        let unit_bytes = r.u32()?;
        let frame_units = r.u32()?;
        let frame_count = r.u32()? as usize;
        let codec = r.u8()?;
        r.skip(3)?;
        let data_offset = r.u64()?;
        if Self::encoded_len(frame_count) != body.len() {
            return Err(FormatError::invalid(STRUCTURE, "frame count", "does not match the length"));
        }
        let mut r = Reader::at(STRUCTURE, body, FRAME_TABLE_PREFIX_BYTES);
        let mut frames = Vec::with_capacity(frame_count);
        for _ in 0..frame_count {
            let offset_bytes = r.u64()?;
            let stored_bytes = r.u32()?;
            let crc = r.u32()?;
            let flags = r.u8()?;
            r.skip(7)?;
            if flags & !FRAME_RAW != 0 {
                return Err(FormatError::UnknownFeatures { structure: STRUCTURE, flags: u64::from(flags) });
            }
            frames.push(FrameEntry { offset_bytes, stored_bytes, crc, raw: flags & FRAME_RAW != 0 });
        }
        let table = FrameTable {
            generation,
            through_generation,
            logical_units,
            unit_bytes,
            frame_units,
            codec,
            data_offset,
            frames,
        };
        table.validate(None)?;
        Ok(table)
    }

    /// Bytes the table occupies, from the header at the start of `first` (the table's first
    /// unit): how much to read before decoding. The checksum is checked by [`decode`](Self::decode).
    pub fn length_from_header(first: &[u8]) -> Result<usize, FormatError> {
        if first.len() < HEADER_BYTES {
            return Err(FormatError::Truncated { structure: STRUCTURE, needed: HEADER_BYTES, available: first.len() });
        }
        let found: [u8; 8] = first[..8].try_into().expect("8 bytes");
        if &found != MAGIC {
            return Err(FormatError::BadMagic { structure: STRUCTURE, found });
        }
        let length = u32::from_le_bytes(first[12..16].try_into().expect("4 bytes"));
        // At most one entry per frame of a 2^40-unit record: anything larger is damage.
        if (length as usize) < FRAME_TABLE_PREFIX_BYTES || length > 1 << 30 {
            return Err(FormatError::BadLength {
                structure: STRUCTURE,
                length,
                minimum: FRAME_TABLE_PREFIX_BYTES,
                available: 1 << 30,
            });
        }
        Ok(length as usize)
    }

    /// Decompresses frame `index` from its stored bytes: checks the crc, the codec's result and
    /// the decompressed length.
    pub fn decode_frame(&self, index: usize, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
        let frame = self
            .frames
            .get(index)
            .ok_or_else(|| FormatError::invalid(FRAME, "index", format!("frame {index} of {}", self.frames.len())))?;
        if stored.len() != frame.stored_bytes as usize {
            return Err(FormatError::invalid(
                FRAME,
                "stored bytes",
                format!("frame {index}: {} bytes given, {} stored", stored.len(), frame.stored_bytes),
            ));
        }
        let computed = crc32c(stored);
        if computed != frame.crc {
            return Err(FormatError::ChecksumMismatch { structure: FRAME, stored: frame.crc, computed });
        }
        let raw_bytes = self.frame_raw_bytes(index);
        if frame.raw {
            return Ok(stored.to_vec());
        }
        let mut out = vec![0u8; raw_bytes];
        let written = lz4_flex::block::decompress_into(stored, &mut out)
            .map_err(|e| FormatError::invalid(FRAME, "data", format!("frame {index} does not decompress: {e}")))?;
        if written != raw_bytes {
            return Err(FormatError::invalid(
                FRAME,
                "decompressed length",
                format!("frame {index} decompresses to {written} bytes, {raw_bytes} expected"),
            ));
        }
        Ok(out)
    }
}

/// Compresses one frame: `(stored bytes, raw)` — raw when compressing does not make it smaller.
pub fn encode_frame(raw: &[u8]) -> (Vec<u8>, bool) {
    let compressed = lz4_flex::block::compress(raw);
    if compressed.is_empty() || compressed.len() >= raw.len() {
        (raw.to_vec(), true)
    } else {
        (compressed, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (FrameTable, Vec<u8>) {
        let unit = 512usize;
        let mut data = vec![0u8; unit * 5];
        // Frame 0 (units 0, 1) compressible, frame 1 (2, 3) random, frame 2 (unit 4) zeros.
        let mut x = 7u64;
        for byte in &mut data[2 * unit..4 * unit] {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *byte = (x >> 56) as u8;
        }
        data[..2 * unit].iter_mut().enumerate().for_each(|(i, b)| *b = (i % 7) as u8);
        let mut payload = Vec::new();
        let mut frames = Vec::new();
        let data_offset = 4096u64;
        for chunk in data.chunks(2 * unit) {
            let (stored, raw) = encode_frame(chunk);
            frames.push(FrameEntry {
                offset_bytes: data_offset + payload.len() as u64,
                stored_bytes: stored.len() as u32,
                crc: crc32c(&stored),
                raw,
            });
            payload.extend_from_slice(&stored);
        }
        let table = FrameTable {
            generation: 3,
            through_generation: 5,
            logical_units: 5,
            unit_bytes: unit as u32,
            frame_units: 2,
            codec: CODEC_LZ4,
            data_offset,
            frames,
        };
        (table, payload)
    }

    #[test]
    fn frames_round_trip_and_incompressible_ones_are_raw() {
        let (table, payload) = sample();
        let bytes = table.encode();
        assert_eq!(FrameTable::decode(&bytes).unwrap(), table);
        assert_eq!(FrameTable::length_from_header(&bytes[..512]).unwrap(), FrameTable::encoded_len(3));
        assert!(!table.frames[0].raw && table.frames[1].raw && !table.frames[2].raw);
        for (index, frame) in table.frames.iter().enumerate() {
            let at = (frame.offset_bytes - table.data_offset) as usize;
            let out = table.decode_frame(index, &payload[at..at + frame.stored_bytes as usize]).unwrap();
            assert_eq!(out.len(), table.frame_raw_bytes(index));
        }
    }

    #[test]
    fn damaged_frames_and_tables_are_typed_errors() {
        let (table, payload) = sample();
        let stored = &payload[..table.frames[0].stored_bytes as usize];
        let mut damaged = stored.to_vec();
        damaged[1] ^= 0x40;
        assert!(matches!(table.decode_frame(0, &damaged), Err(FormatError::ChecksumMismatch { .. })));
        // A frame whose crc matches but whose data is not lz4 (or decompresses short).
        let mut lying = table.clone();
        let garbage = vec![0xF0u8; 9];
        lying.frames[0].crc = crc32c(&garbage);
        lying.frames[0].stored_bytes = 9;
        assert!(matches!(lying.decode_frame(0, &garbage), Err(FormatError::Invalid { .. })));
        assert!(table.decode_frame(7, stored).is_err());
        // Frames outside the extent, overlapping frames, a wrong count.
        assert!(table.validate(Some(table.used_bytes() - 1)).is_err());
        assert!(table.validate(Some(table.used_bytes())).is_ok());
        let mut overlap = table.clone();
        overlap.frames[1].offset_bytes = overlap.frames[0].offset_bytes;
        assert!(overlap.validate(None).is_err());
        let mut bytes = table.encode();
        bytes[64] = 9; // frame count
        assert!(FrameTable::decode(&bytes).is_err());
        for bit in 0..FrameTable::encoded_len(3) * 8 {
            let mut flipped = table.encode();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(FrameTable::decode(&flipped).is_err(), "bit {bit}");
        }
    }
}
