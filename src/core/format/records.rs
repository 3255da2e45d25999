//! Small records: the sort cursor (resumable sort, FIG 10), the site record (replication state
//! with its out-of-sync bitmap, FIG 36/37) and the dedup table (embodiment 6, FIG 39/40).

use super::header::{seal, Header, HEADER_BYTES};
use super::superblock::byte_enum;
use super::{get_fixed_str, pad_to_pages, put_fixed_str, FormatError, Reader, Writer, METADATA_PAGE_BYTES};
use crate::core::bitmap::DifferenceBitmap;

pub const SORT_CURSOR_MAGIC: &[u8; 8] = b"CHRNSORT";
pub const SITE_MAGIC: &[u8; 8] = b"CHRNSITE";
pub const DEDUP_MAGIC: &[u8; 8] = b"CHRNDDUP";
pub const SORT_CURSOR_BYTES: usize = 128;
pub const SITE_PREFIX_BYTES: usize = 192;
pub const SITE_NAME_BYTES: usize = 64;
pub const DEDUP_PREFIX_BYTES: usize = 64;
pub const DEDUP_ENTRY_BYTES: usize = 32;

byte_enum!(
    /// Phase of the sort of one generation.
    SortState { Idle = 0, Running = 1, Finished = 2 }
);

/// Progress of the sort (FIG 10), kept on the history device in two slots so a crash at any
/// point resumes: blocks below `saved_through` have their backup image saved in history;
/// blocks below `applied_through` have the journal element written to the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortCursor {
    pub sequence: u64,
    /// Online generation being applied to the backup.
    pub generation: u64,
    /// History record receiving the backup's previous image (generation − 1).
    pub record_generation: u64,
    pub state: SortState,
    pub saved_through: u64,
    pub applied_through: u64,
    pub history_start: u64,
    pub history_units: u64,
    pub control_start: u64,
    pub control_units: u64,
    pub elements_saved: u64,
}

impl SortCursor {
    pub fn idle(sequence: u64) -> Self {
        SortCursor {
            sequence,
            generation: 0,
            record_generation: 0,
            state: SortState::Idle,
            saved_through: 0,
            applied_through: 0,
            history_start: 0,
            history_units: 0,
            control_start: 0,
            control_units: 0,
            elements_saved: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        assert!(self.applied_through <= self.saved_through, "a block is applied only after it is saved");
        let mut bytes = vec![0u8; METADATA_PAGE_BYTES];
        Header::write(&mut bytes, SORT_CURSOR_MAGIC, SORT_CURSOR_BYTES, self.sequence);
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_u64(self.generation);
        w.put_u64(self.record_generation);
        w.put_u8(self.state as u8);
        w.skip(7);
        for value in [
            self.saved_through,
            self.applied_through,
            self.history_start,
            self.history_units,
            self.control_start,
            self.control_units,
            self.elements_saved,
        ] {
            w.put_u64(value);
        }
        debug_assert!(w.position() <= SORT_CURSOR_BYTES);
        seal(&mut bytes, SORT_CURSOR_BYTES);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        const S: &str = "sort cursor";
        let (header, body) = Header::read(S, SORT_CURSOR_MAGIC, bytes, SORT_CURSOR_BYTES)?;
        let mut r = Reader::at(S, body, HEADER_BYTES);
        let generation = r.u64()?;
        let record_generation = r.u64()?;
        let state = SortState::from_byte(S, "state", r.u8()?)?;
        r.skip(7)?;
        let mut v = [0u64; 7];
        for value in &mut v {
            *value = r.u64()?;
        }
        let [saved_through, applied_through, history_start, history_units, control_start, control_units, elements_saved] =
            v;
        if applied_through > saved_through {
            return Err(FormatError::invalid(S, "applied through", "ahead of saved through"));
        }
        Ok(SortCursor {
            sequence: header.sequence,
            generation,
            record_generation,
            state,
            saved_through,
            applied_through,
            history_start,
            history_units,
            control_start,
            control_units,
            elements_saved,
        })
    }
}

byte_enum!(
    /// Synchronous: acknowledged after the site has the element. Asynchronous: shipped after.
    SiteMode { Sync = 0, Async = 1 }
);
byte_enum!(
    /// Replication state of a site.
    SiteState { InSync = 0, Shipping = 1, OutOfSync = 2, Resyncing = 3, Failed = 4, Detached = 5 }
);
byte_enum!(
    /// Per write (schemes 1/2) or per marker (schemes 3/4).
    SiteTransfer { PerWrite = 0, PerMarker = 1 }
);

/// A replication site as the primary's journal records it. The out-of-sync bitmap is made
/// durable before any write the site missed is acknowledged (ARCHITECTURE §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRecord {
    pub sequence: u64,
    pub site_uuid: [u8; 16],
    pub mode: SiteMode,
    pub state: SiteState,
    pub transfer: SiteTransfer,
    pub delta: bool,
    pub shipped_sequence: u64,
    pub shipped_generation: u64,
    pub acknowledged_generation: u64,
    pub lag_limit_bytes: u64,
    pub lag_limit_ms: u64,
    pub out_of_sync_since_generation: u64,
    pub name: String,
    pub out_of_sync: Option<DifferenceBitmap>,
}

impl SiteRecord {
    /// Bytes of one slot for a volume of `blocks` blocks (page aligned).
    pub fn slot_bytes(blocks: u64) -> usize {
        pad_to_pages(SITE_PREFIX_BYTES + 8 * blocks.div_ceil(64) as usize)
    }

    pub fn encode(&self) -> Vec<u8> {
        assert!(self.name.len() < SITE_NAME_BYTES, "site names are checked before encoding");
        let words = self.out_of_sync.as_ref().map_or(&[][..], |b| b.words());
        let length = SITE_PREFIX_BYTES + 8 * words.len();
        let mut bytes = vec![0u8; pad_to_pages(length)];
        Header::write(&mut bytes, SITE_MAGIC, length, self.sequence);
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_bytes(&self.site_uuid);
        w.put_u8(self.mode as u8);
        w.put_u8(self.state as u8);
        w.put_u8(self.transfer as u8);
        w.put_u8(u8::from(self.delta));
        w.put_u32(0);
        for value in [
            self.shipped_sequence,
            self.shipped_generation,
            self.acknowledged_generation,
            self.lag_limit_bytes,
            self.lag_limit_ms,
            self.out_of_sync_since_generation,
            self.out_of_sync.as_ref().map_or(0, |b| b.len()),
        ] {
            w.put_u64(value);
        }
        put_fixed_str(&mut w, &self.name, SITE_NAME_BYTES);
        w.skip(SITE_PREFIX_BYTES - w.position());
        for word in words {
            w.put_u64(*word);
        }
        seal(&mut bytes, length);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        const S: &str = "site record";
        let (header, body) = Header::read(S, SITE_MAGIC, bytes, SITE_PREFIX_BYTES)?;
        let mut r = Reader::at(S, body, HEADER_BYTES);
        let site_uuid = r.array()?;
        let mode = SiteMode::from_byte(S, "mode", r.u8()?)?;
        let state = SiteState::from_byte(S, "state", r.u8()?)?;
        let transfer = SiteTransfer::from_byte(S, "transfer", r.u8()?)?;
        let delta = match r.u8()? {
            0 => false,
            1 => true,
            other => return Err(FormatError::invalid(S, "delta", format!("unknown value {other}"))),
        };
        r.u32()?;
        let mut v = [0u64; 7];
        for value in &mut v {
            *value = r.u64()?;
        }
        let [shipped_sequence, shipped_generation, acknowledged_generation, lag_limit_bytes, lag_limit_ms, out_of_sync_since_generation, bitmap_blocks] =
            v;
        let name = get_fixed_str(&mut r, S, "name", SITE_NAME_BYTES)?;
        if name.len() >= SITE_NAME_BYTES {
            return Err(FormatError::invalid(S, "name", "no terminating zero"));
        }
        let words = bitmap_blocks.div_ceil(64);
        if (SITE_PREFIX_BYTES as u64).checked_add(words.saturating_mul(8)) != Some(body.len() as u64) {
            return Err(FormatError::invalid(S, "bitmap blocks", "do not match the length"));
        }
        let out_of_sync = if bitmap_blocks == 0 {
            None
        } else {
            let mut r = Reader::at(S, body, SITE_PREFIX_BYTES);
            let mut bitmap_words = Vec::with_capacity(words as usize);
            for _ in 0..words {
                bitmap_words.push(r.u64()?);
            }
            Some(DifferenceBitmap::from_words(bitmap_blocks, bitmap_words)?)
        };
        Ok(SiteRecord {
            sequence: header.sequence,
            site_uuid,
            mode,
            state,
            transfer,
            delta,
            shipped_sequence,
            shipped_generation,
            acknowledged_generation,
            lag_limit_bytes,
            lag_limit_ms,
            out_of_sync_since_generation,
            name,
            out_of_sync,
        })
    }
}

/// One stored element known to dedup: its content hash, address and reference count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupEntry {
    pub hash: u128,
    pub address: u64,
    pub references: u32,
}

/// The dedup table of the history area (hash table 682 of FIG 39, with reference counts in
/// place of the patent's bidirectional EMI pointers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupTable {
    pub sequence: u64,
    pub entries: Vec<DedupEntry>,
}

impl DedupTable {
    pub fn encoded_len(&self) -> usize {
        DEDUP_PREFIX_BYTES + self.entries.len() * DEDUP_ENTRY_BYTES
    }

    /// Encodes into whole pages. Asserts what `decode` checks: every entry has at least one
    /// reference (an entry whose count reached zero is removed, not written).
    pub fn encode(&self) -> Vec<u8> {
        if let Some(entry) = self.entries.iter().find(|e| e.references == 0) {
            panic!("dedup entry for address {} has no references; it must be removed, not written", entry.address);
        }
        let length = self.encoded_len();
        let mut bytes = vec![0u8; pad_to_pages(length)];
        Header::write(&mut bytes, DEDUP_MAGIC, length, self.sequence);
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_u64(self.entries.len() as u64);
        w.skip(DEDUP_PREFIX_BYTES - w.position());
        for entry in &self.entries {
            w.put_bytes(&entry.hash.to_le_bytes());
            w.put_u64(entry.address);
            w.put_u32(entry.references);
            w.put_u32(0);
        }
        seal(&mut bytes, length);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        const S: &str = "dedup table";
        let (header, body) = Header::read(S, DEDUP_MAGIC, bytes, DEDUP_PREFIX_BYTES)?;
        let mut r = Reader::at(S, body, HEADER_BYTES);
        let count = r.u64()?;
        if (DEDUP_PREFIX_BYTES as u64).checked_add(count.saturating_mul(DEDUP_ENTRY_BYTES as u64))
            != Some(body.len() as u64)
        {
            return Err(FormatError::invalid(S, "entry count", "does not match the length"));
        }
        let mut r = Reader::at(S, body, DEDUP_PREFIX_BYTES);
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let hash = u128::from_le_bytes(r.array()?);
            let address = r.u64()?;
            let references = r.u32()?;
            r.u32()?;
            if references == 0 {
                return Err(FormatError::invalid(S, "references", format!("entry for address {address} has none")));
            }
            entries.push(DedupEntry { hash, address, references });
        }
        Ok(DedupTable { sequence: header.sequence, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_cursor_round_trips_at_documented_offsets() {
        let cursor = SortCursor {
            sequence: 5,
            generation: 8,
            record_generation: 7,
            state: SortState::Running,
            saved_through: 4096,
            applied_through: 2048,
            history_start: 100,
            history_units: 300,
            control_start: 90,
            control_units: 10,
            elements_saved: 250,
        };
        let bytes = cursor.encode();
        assert_eq!(SortCursor::decode(&bytes).unwrap(), cursor);
        assert_eq!(bytes[48], SortState::Running as u8, "state at 48");
        assert_eq!(u64::from_le_bytes(bytes[56..64].try_into().unwrap()), 4096, "saved through at 56");
        assert_eq!(u64::from_le_bytes(bytes[64..72].try_into().unwrap()), 2048, "applied through at 64");
    }

    #[test]
    fn site_record_round_trips_with_and_without_bitmap() {
        let mut bitmap = DifferenceBitmap::new(1000);
        bitmap.set(999);
        let mut site = SiteRecord {
            sequence: 2,
            site_uuid: [3; 16],
            mode: SiteMode::Async,
            state: SiteState::OutOfSync,
            transfer: SiteTransfer::PerWrite,
            delta: true,
            shipped_sequence: 10,
            shipped_generation: 4,
            acknowledged_generation: 3,
            lag_limit_bytes: 1 << 30,
            lag_limit_ms: 5000,
            out_of_sync_since_generation: 4,
            name: "dr-site".into(),
            out_of_sync: Some(bitmap),
        };
        let bytes = site.encode();
        assert_eq!(SiteRecord::decode(&bytes).unwrap(), site);
        assert_eq!(&bytes[112..119], b"dr-site", "name at 112");
        assert_eq!(u64::from_le_bytes(bytes[104..112].try_into().unwrap()), 1000, "bitmap blocks at 104");
        site.out_of_sync = None;
        assert_eq!(SiteRecord::decode(&site.encode()).unwrap(), site);
        assert_eq!(SiteRecord::slot_bytes(1000), 4096);
    }

    #[test]
    fn dedup_table_round_trips_and_refuses_zero_references() {
        let table =
            DedupTable { sequence: 1, entries: vec![DedupEntry { hash: u128::MAX - 5, address: 77, references: 3 }] };
        let bytes = table.encode();
        assert_eq!(DedupTable::decode(&bytes).unwrap(), table);
        assert_eq!(u64::from_le_bytes(bytes[80..88].try_into().unwrap()), 77, "address at entry + 16");
        // A zero count can only come from the disk: write it by hand and reseal.
        let mut zero = bytes.clone();
        zero[88..92].fill(0);
        seal(&mut zero, table.encoded_len());
        assert!(matches!(DedupTable::decode(&zero), Err(FormatError::Invalid { field: "references", .. })));
    }

    /// Regression: the encoder wrote entries with zero references, which its own decoder refuses.
    #[test]
    #[should_panic(expected = "has no references")]
    fn dedup_table_encode_refuses_zero_references() {
        let table = DedupTable { sequence: 1, entries: vec![DedupEntry { hash: 1, address: 77, references: 0 }] };
        table.encode();
    }
}
