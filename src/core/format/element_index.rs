//! Element index: where the journal's online data of a generation is (seed 001 FIG 8 S8009,
//! "update the JNCB"). Segments of a generation are allocated one after another in the
//! journal ring, so the index is simply the list of blocks in allocation order: entry k names
//! the block whose element is in segment `first_segment + k`.
//!
//! Each entry carries the crc32c of its element as of the last time its page was written: the
//! marker rewrites every page whose checksums changed before it seals the generation, so a
//! sealed generation's elements are all covered; the open generation's are rebuilt from the
//! base by recovery.
//!
//! The list is stored in 4 KiB pages. Each page has two slots; a group commit rewrites the
//! last, partly filled page into the slot not holding its newest valid copy, so a torn write
//! never loses entries that were already durable. A rewrite of a block already in the list
//! costs no index write at all (ARCHITECTURE §5 step 4).

use super::header::{seal, Header, HEADER_BYTES};
use super::superblock::JournalMode;
use super::{FormatError, Reader, Writer, METADATA_PAGE_BYTES};

pub const MAGIC: &[u8; 8] = b"CHRNIDXP";
const STRUCTURE: &str = "element index page";
pub const PAGE_PREFIX_BYTES: usize = 64;
/// Bytes of one page slot; a page occupies two slots.
pub const SLOT_BYTES: usize = METADATA_PAGE_BYTES;
/// Bytes of an entry in "latest" mode: block, element crc32c, flags.
pub const LATEST_ENTRY_BYTES: usize = 16;
/// Bytes of an entry in "all" mode: block, element crc32c, flags, sequence, time.
pub const ALL_ENTRY_BYTES: usize = 32;
/// Entries per page in "latest" mode.
pub const LATEST_ENTRIES_PER_PAGE: usize = (METADATA_PAGE_BYTES - PAGE_PREFIX_BYTES) / LATEST_ENTRY_BYTES;
/// Entries per page in "all" mode.
pub const ALL_ENTRIES_PER_PAGE: usize = (METADATA_PAGE_BYTES - PAGE_PREFIX_BYTES) / ALL_ENTRY_BYTES;

/// One element of the online data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub block: u64,
    /// crc32c of the element's bytes.
    pub crc: u32,
    /// Host write sequence ("all" mode; 0 in "latest" mode).
    pub sequence: u64,
    /// Write time, Unix nanoseconds ("all" mode; 0 in "latest" mode).
    pub time_ns: u64,
    /// "All" mode: the element did not survive a power cut (its journal write was not durable
    /// and a newer version of the block followed it); not a restore target. Always false in
    /// "latest" mode.
    pub lost: bool,
}

/// Entry flag bit 0 ("all" mode only): the element was lost in a power cut.
pub const ENTRY_LOST: u32 = 1 << 0;

pub fn entries_per_page(mode: JournalMode) -> usize {
    match mode {
        JournalMode::Latest => LATEST_ENTRIES_PER_PAGE,
        JournalMode::All => ALL_ENTRIES_PER_PAGE,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexPage {
    /// Commit counter; of a page's two slots the valid one with the higher value wins.
    pub sequence: u64,
    pub generation: u64,
    /// Virtual page number in the journal's index ring.
    pub page: u64,
    /// Virtual segment of entry 0.
    pub first_segment: u64,
    pub mode: JournalMode,
    pub entries: Vec<IndexEntry>,
}

impl IndexPage {
    pub fn encode(&self) -> Vec<u8> {
        let per_page = entries_per_page(self.mode);
        assert!(self.entries.len() <= per_page, "index page overflow");
        let entry_bytes = if self.mode == JournalMode::Latest { LATEST_ENTRY_BYTES } else { ALL_ENTRY_BYTES };
        let length = PAGE_PREFIX_BYTES + self.entries.len() * entry_bytes;
        let mut bytes = vec![0u8; SLOT_BYTES];
        Header::write(&mut bytes, MAGIC, length, self.sequence);
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_u64(self.generation);
        w.put_u64(self.page);
        w.put_u64(self.first_segment);
        w.put_u32(self.entries.len() as u32);
        w.put_u8(self.mode as u8);
        w.skip(3);
        for entry in &self.entries {
            w.put_u64(entry.block);
            w.put_u32(entry.crc);
            debug_assert!(!entry.lost || self.mode == JournalMode::All, "only \"all\" mode entries are lost");
            w.put_u32(if entry.lost { ENTRY_LOST } else { 0 });
            if self.mode == JournalMode::All {
                w.put_u64(entry.sequence);
                w.put_u64(entry.time_ns);
            }
        }
        debug_assert_eq!(w.position(), length);
        seal(&mut bytes, length);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (header, body) = Header::read(STRUCTURE, MAGIC, bytes, PAGE_PREFIX_BYTES)?;
        let mut r = Reader::at(STRUCTURE, body, HEADER_BYTES);
        let generation = r.u64()?;
        let page = r.u64()?;
        let first_segment = r.u64()?;
        let count = r.u32()? as usize;
        let mode = JournalMode::from_byte(STRUCTURE, "entry format", r.u8()?)?;
        r.skip(3)?;
        let entry_bytes = if mode == JournalMode::Latest { LATEST_ENTRY_BYTES } else { ALL_ENTRY_BYTES };
        if count > entries_per_page(mode) || PAGE_PREFIX_BYTES + count * entry_bytes != body.len() {
            return Err(FormatError::invalid(
                STRUCTURE,
                "entry count",
                format!("{count} entries do not fit the length"),
            ));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let block = r.u64()?;
            let crc = r.u32()?;
            let flags = r.u32()?;
            let known = if mode == JournalMode::All { ENTRY_LOST } else { 0 };
            if flags & !known != 0 {
                return Err(FormatError::invalid(STRUCTURE, "entry flags", "reserved bits set"));
            }
            let (sequence, time_ns) = if mode == JournalMode::All { (r.u64()?, r.u64()?) } else { (0, 0) };
            entries.push(IndexEntry { block, crc, sequence, time_ns, lost: flags & ENTRY_LOST != 0 });
        }
        Ok(IndexPage { sequence: header.sequence, generation, page, first_segment, mode, entries })
    }
}

/// The page to use from its two slots: the valid one with the higher sequence, if any.
pub fn choose(slot_a: &[u8], slot_b: &[u8]) -> Result<IndexPage, FormatError> {
    super::superblock::newest(IndexPage::decode(slot_a), IndexPage::decode(slot_b), |p| p.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_and_all_pages_round_trip_at_documented_offsets() {
        let page = IndexPage {
            sequence: 4,
            generation: 2,
            page: 17,
            first_segment: 8568,
            mode: JournalMode::Latest,
            entries: (0..LATEST_ENTRIES_PER_PAGE as u64)
                .map(|b| IndexEntry { block: b * 3, crc: b as u32, sequence: 0, time_ns: 0, lost: false })
                .collect(),
        };
        let bytes = page.encode();
        assert_eq!(IndexPage::decode(&bytes).unwrap(), page);
        assert_eq!(LATEST_ENTRIES_PER_PAGE, 252);
        assert_eq!(ALL_ENTRIES_PER_PAGE, 126);
        assert_eq!(u64::from_le_bytes(bytes[48..56].try_into().unwrap()), 8568, "first segment at 48");
        assert_eq!(u32::from_le_bytes(bytes[56..60].try_into().unwrap()), 252, "count at 56");
        assert_eq!(u64::from_le_bytes(bytes[80..88].try_into().unwrap()), 3, "entry 1 at 80");
        assert_eq!(u32::from_le_bytes(bytes[88..92].try_into().unwrap()), 1, "entry 1 crc at 88");

        let all = IndexPage {
            sequence: 1,
            generation: 2,
            page: 0,
            first_segment: 0,
            mode: JournalMode::All,
            entries: vec![IndexEntry { block: 5, crc: 0xDEAD, sequence: 77, time_ns: 99, lost: true }],
        };
        let bytes = all.encode();
        assert_eq!(IndexPage::decode(&bytes).unwrap(), all);
        assert_eq!(u64::from_le_bytes(bytes[80..88].try_into().unwrap()), 77, "sequence at entry + 16");
    }

    #[test]
    fn torn_newer_slot_falls_back_to_older() {
        let mut page = IndexPage {
            sequence: 1,
            generation: 1,
            page: 0,
            first_segment: 0,
            mode: JournalMode::Latest,
            entries: vec![],
        };
        page.entries.push(IndexEntry { block: 1, crc: 0, sequence: 0, time_ns: 0, lost: false });
        let old = page.encode();
        page.sequence = 2;
        page.entries.push(IndexEntry { block: 2, crc: 0, sequence: 0, time_ns: 0, lost: false });
        let mut new = page.encode();
        assert_eq!(choose(&old, &new).unwrap().entries.len(), 2);
        new[70] ^= 4;
        assert_eq!(choose(&old, &new).unwrap().entries.len(), 1);
    }
}
