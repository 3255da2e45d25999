//! Version table: the versions of one "all" mode generation kept in the history after its sort
//! (seed 001 embodiment 4, "All"), so that any write of a sorted generation stays a restore
//! target. The generation's versions are stored in one contiguous extent in (block, sequence)
//! order; entry k of the table describes the element at unit `first_address + k`. Written once
//! into freshly allocated units and never rewritten in place (header `sequence` 0).

use super::header::{seal, Header, HEADER_BYTES};
use super::{pad_to_pages, FormatError, Reader, Writer};

pub const MAGIC: &[u8; 8] = b"CHRNVERS";
const STRUCTURE: &str = "version table";
pub const VERSION_PREFIX_BYTES: usize = 128;
pub const VERSION_ENTRY_BYTES: usize = 32;

/// One kept version: a host write's content of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionEntry {
    pub block: u64,
    /// Submission sequence of the write.
    pub sequence: u64,
    /// Time of the write, Unix nanoseconds.
    pub time_ns: u64,
    /// crc32c of the element.
    pub crc: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionTable {
    /// The generation whose writes these are.
    pub generation: u64,
    /// The sequence the generation's image is cut at: the versions resolve targets up to it.
    pub cut_sequence: u64,
    /// Unit address of the first version's element; entry k is at `first_address + k`.
    pub first_address: u64,
    /// Ascending by (block, sequence), no pair twice.
    pub entries: Vec<VersionEntry>,
}

impl VersionTable {
    pub fn encoded_len(&self) -> usize {
        VERSION_PREFIX_BYTES + self.entries.len() * VERSION_ENTRY_BYTES
    }

    /// Bytes on disk of a table of `entries` versions, page aligned.
    pub fn disk_bytes(entries: u64) -> u64 {
        pad_to_pages(VERSION_PREFIX_BYTES + entries as usize * VERSION_ENTRY_BYTES) as u64
    }

    fn check(&self) -> Result<(), FormatError> {
        if self.entries.windows(2).any(|w| (w[0].block, w[0].sequence) >= (w[1].block, w[1].sequence)) {
            return Err(FormatError::invalid(STRUCTURE, "entries", "not strictly ascending by (block, sequence)"));
        }
        if let Some(entry) = self.entries.iter().find(|e| e.sequence > self.cut_sequence) {
            return Err(FormatError::invalid(
                STRUCTURE,
                "entries",
                format!("sequence {} is after the generation's cut {}", entry.sequence, self.cut_sequence),
            ));
        }
        if self.first_address.checked_add(self.entries.len() as u64).is_none_or(|end| end > 1 << 56) {
            return Err(FormatError::invalid(STRUCTURE, "first address", "the elements end beyond 2^56"));
        }
        Ok(())
    }

    /// Encodes into whole pages; asserts what `decode` checks.
    pub fn encode(&self) -> Vec<u8> {
        if let Err(error) = self.check() {
            panic!("version table of generation {}: {error}", self.generation);
        }
        let length = self.encoded_len();
        let mut bytes = vec![0u8; pad_to_pages(length)];
        Header::write(&mut bytes, MAGIC, length, 0);
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_u64(self.generation);
        w.put_u64(self.cut_sequence);
        w.put_u64(self.first_address);
        w.put_u64(self.entries.len() as u64);
        w.skip(VERSION_PREFIX_BYTES - w.position());
        for entry in &self.entries {
            w.put_u64(entry.block);
            w.put_u64(entry.sequence);
            w.put_u64(entry.time_ns);
            w.put_u32(entry.crc);
            w.put_u32(0);
        }
        debug_assert_eq!(w.position(), length);
        seal(&mut bytes, length);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (_, body) = Header::read(STRUCTURE, MAGIC, bytes, VERSION_PREFIX_BYTES)?;
        let mut r = Reader::at(STRUCTURE, body, HEADER_BYTES);
        let generation = r.u64()?;
        let cut_sequence = r.u64()?;
        let first_address = r.u64()?;
        let count = r.u64()?;
        let expected = (count as u128) * VERSION_ENTRY_BYTES as u128 + VERSION_PREFIX_BYTES as u128;
        if expected != body.len() as u128 {
            return Err(FormatError::invalid(
                STRUCTURE,
                "entry count",
                format!("{count} entries do not fit the length"),
            ));
        }
        let mut r = Reader::at(STRUCTURE, body, VERSION_PREFIX_BYTES);
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let block = r.u64()?;
            let sequence = r.u64()?;
            let time_ns = r.u64()?;
            let crc = r.u32()?;
            if r.u32()? != 0 {
                return Err(FormatError::invalid(STRUCTURE, "entry reserved", "not zero"));
            }
            entries.push(VersionEntry { block, sequence, time_ns, crc });
        }
        let table = VersionTable { generation, cut_sequence, first_address, entries };
        table.check()?;
        Ok(table)
    }

    /// For each block, the entry index of its newest version with sequence at most `upto`,
    /// ascending by block.
    pub fn newest_up_to(&self, upto: u64) -> Vec<(u64, usize)> {
        let mut newest: Vec<(u64, usize)> = Vec::new();
        for (k, entry) in self.entries.iter().enumerate() {
            if entry.sequence > upto {
                continue;
            }
            match newest.last_mut() {
                Some((block, index)) if *block == entry.block => *index = k,
                _ => newest.push((entry.block, k)),
            }
        }
        newest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> VersionTable {
        let entry = |block, sequence| VersionEntry { block, sequence, time_ns: sequence * 10, crc: block as u32 };
        VersionTable {
            generation: 7,
            cut_sequence: 40,
            first_address: 1000,
            entries: vec![entry(1, 3), entry(1, 9), entry(1, 30), entry(4, 5), entry(9, 31)],
        }
    }

    #[test]
    fn round_trips_and_resolves_the_newest_version_up_to_a_sequence() {
        let table = table();
        let bytes = table.encode();
        assert_eq!(bytes.len(), 4096);
        assert_eq!(VersionTable::decode(&bytes).unwrap(), table);
        assert_eq!(table.newest_up_to(2), vec![]);
        assert_eq!(table.newest_up_to(9), vec![(1, 1), (4, 3)]);
        assert_eq!(table.newest_up_to(40), vec![(1, 2), (4, 3), (9, 4)]);
    }

    #[test]
    fn refuses_unordered_entries_and_versions_after_the_cut() {
        let mut unordered = table();
        unordered.entries.swap(0, 1);
        assert!(unordered.check().is_err());
        let mut late = table();
        late.cut_sequence = 30;
        assert!(late.check().is_err());
        let mut bytes = table().encode();
        bytes[VERSION_PREFIX_BYTES + 40] ^= 1; // entry 1's sequence: checksum catches it
        assert!(VersionTable::decode(&bytes).is_err());
    }
}
