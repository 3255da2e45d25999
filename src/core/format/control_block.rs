//! Control block: a history record's difference bitmap and element addresses on disk — the
//! JNCB of seed 001 (FIG 6, "second JNL management table"), and the map of a restore volume
//! (FIG 13, table 209). A record written by the sort is contiguous in address order and stores
//! no address table; merged, deduplicated and restore maps store one address per element.

use super::header::{seal, Header, HEADER_BYTES};
use super::{pad_to_pages, FormatError, Reader, Writer};
use crate::core::bitmap::DifferenceBitmap;
use crate::core::element_map::{Addressing, ElementMap, ElementMapError};

pub const MAGIC: &[u8; 8] = b"CHRNCTRL";
const STRUCTURE: &str = "control block";
pub const CONTROL_PREFIX_BYTES: usize = 128;
const ADDRESSING_CONTIGUOUS: u8 = 0;
const ADDRESSING_EXPLICIT: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlBlock {
    pub generation: u64,
    pub through_generation: u64,
    pub map: ElementMap,
}

impl ControlBlock {
    /// Bytes of the encoded structure (before page padding).
    pub fn encoded_len(&self) -> usize {
        let words = self.map.bitmap().words().len();
        let table = match self.map.addressing() {
            Addressing::Contiguous { .. } => 0,
            Addressing::Explicit(table) => table.len(),
        };
        CONTROL_PREFIX_BYTES + 8 * (words + table)
    }

    /// Bytes on disk for a control block of a volume of `blocks` blocks with `elements`
    /// explicit addresses (0 for a contiguous record), page aligned.
    pub fn disk_bytes(blocks: u64, explicit_elements: u64) -> u64 {
        pad_to_pages(CONTROL_PREFIX_BYTES + 8 * (blocks.div_ceil(64) + explicit_elements) as usize) as u64
    }

    /// Encodes into whole pages. Asserts what `decode` checks of the addresses: a contiguous
    /// range ends at or below 2^56, explicit addresses have no reserved bit (56..62) set.
    pub fn encode(&self) -> Vec<u8> {
        if let Err(error) = self.map.validate() {
            panic!("control block of generation {}: {error}", self.generation);
        }
        assert!(self.through_generation >= self.generation, "through generation older than the generation");
        let length = self.encoded_len();
        let mut bytes = vec![0u8; pad_to_pages(length)];
        Header::write(&mut bytes, MAGIC, length, 0);
        let words = self.map.bitmap().words();
        let table_offset = CONTROL_PREFIX_BYTES + 8 * words.len();
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_u64(self.generation);
        w.put_u64(self.through_generation);
        w.put_u64(self.map.blocks());
        w.put_u64(self.map.len());
        match self.map.addressing() {
            Addressing::Contiguous { first } => {
                w.put_u8(ADDRESSING_CONTIGUOUS);
                w.skip(7);
                w.put_u64(*first);
            }
            Addressing::Explicit(_) => {
                w.put_u8(ADDRESSING_EXPLICIT);
                w.skip(7);
                w.put_u64(0);
            }
        }
        w.put_u64(table_offset as u64);
        w.skip(CONTROL_PREFIX_BYTES - w.position());
        for word in words {
            w.put_u64(*word);
        }
        if let Addressing::Explicit(table) = self.map.addressing() {
            for address in table {
                w.put_u64(*address);
            }
        }
        debug_assert_eq!(w.position(), length);
        seal(&mut bytes, length);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (_, body) = Header::read(STRUCTURE, MAGIC, bytes, CONTROL_PREFIX_BYTES)?;
        let mut r = Reader::at(STRUCTURE, body, HEADER_BYTES);
        let generation = r.u64()?;
        let through_generation = r.u64()?;
        let blocks = r.u64()?;
        let elements = r.u64()?;
        let addressing = r.u8()?;
        r.skip(7)?;
        let first = r.u64()?;
        let table_offset = r.u64()?;
        let words = blocks.div_ceil(64);
        let expected_table_offset = (CONTROL_PREFIX_BYTES as u64).checked_add(words.saturating_mul(8));
        if expected_table_offset != Some(table_offset) {
            return Err(FormatError::invalid(STRUCTURE, "table offset", "does not follow the bitmap"));
        }
        let table_entries = match addressing {
            ADDRESSING_CONTIGUOUS => 0,
            ADDRESSING_EXPLICIT => elements,
            other => return Err(FormatError::invalid(STRUCTURE, "addressing", format!("unknown value {other}"))),
        };
        if table_offset.checked_add(table_entries.saturating_mul(8)) != Some(body.len() as u64) {
            return Err(FormatError::invalid(STRUCTURE, "length", "bitmap and table do not fill the structure"));
        }
        let mut r = Reader::at(STRUCTURE, body, CONTROL_PREFIX_BYTES);
        let mut bitmap_words = Vec::with_capacity(words as usize);
        for _ in 0..words {
            bitmap_words.push(r.u64()?);
        }
        let bitmap = DifferenceBitmap::from_words(blocks, bitmap_words)?;
        if bitmap.count_ones() != elements {
            return Err(FormatError::invalid(STRUCTURE, "elements", "does not match the bitmap"));
        }
        let addressing = if addressing == ADDRESSING_CONTIGUOUS {
            Addressing::Contiguous { first }
        } else {
            let mut table = Vec::with_capacity(elements as usize);
            for _ in 0..elements {
                table.push(r.u64()?);
            }
            Addressing::Explicit(table)
        };
        if through_generation < generation {
            return Err(FormatError::invalid(STRUCTURE, "through generation", "older than the generation"));
        }
        let map = ElementMap::new(bitmap, addressing).map_err(|e| {
            let field = match e {
                ElementMapError::ContiguousOverflow { .. } => "first address",
                ElementMapError::ReservedAddressBits { .. } => "address table",
                ElementMapError::TableLength { .. } => "elements",
            };
            FormatError::invalid(STRUCTURE, field, e.to_string())
        })?;
        Ok(ControlBlock { generation, through_generation, map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_and_explicit_round_trip_at_documented_offsets() {
        let mut bitmap = DifferenceBitmap::new(200);
        for b in [1u64, 64, 199] {
            bitmap.set(b);
        }
        let contiguous = ControlBlock {
            generation: 7,
            through_generation: 7,
            map: ElementMap::new(bitmap.clone(), Addressing::Contiguous { first: 5000 }).unwrap(),
        };
        let bytes = contiguous.encode();
        assert_eq!(ControlBlock::decode(&bytes).unwrap(), contiguous);
        assert_eq!(contiguous.encoded_len(), 128 + 4 * 8);
        assert_eq!(u64::from_le_bytes(bytes[48..56].try_into().unwrap()), 200, "blocks at 48");
        assert_eq!(bytes[64], 0, "addressing at 64");
        assert_eq!(u64::from_le_bytes(bytes[72..80].try_into().unwrap()), 5000, "first address at 72");
        assert_eq!(u64::from_le_bytes(bytes[128..136].try_into().unwrap()), 2, "bitmap word 0 at 128");
        assert_eq!(ControlBlock::disk_bytes(200, 0), 4096);

        let explicit = ControlBlock {
            generation: 3,
            through_generation: 6,
            map: ElementMap::new(bitmap, Addressing::Explicit(vec![9, 4, 1 << 63 | 2])).unwrap(),
        };
        let bytes = explicit.encode();
        assert_eq!(ControlBlock::decode(&bytes).unwrap(), explicit);
        assert_eq!(u64::from_le_bytes(bytes[160..168].try_into().unwrap()), 9, "table after 4 bitmap words");
    }
}
