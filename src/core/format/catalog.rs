//! Catalog: the table of generations and of everything that owns space (seed 001 FIG 5:
//! backup generation table 205, first JNL table 207, JNL area table 203 — merged into one
//! structure so that one atomic write changes them together).
//!
//! The journal device's catalog lists the online generations (open, sealed, sorting) with their
//! place in the journal ring. The history device's catalog lists history records (sorted,
//! merged), restore volumes, the dedup index and retained extents: every allocation of the
//! history area is owned by exactly one entry, so the allocator is rebuilt from the catalog alone.
//!
//! Two slots (A, B) on the device; each update writes the slot not holding the newest valid
//! copy with sequence + 1, so a torn catalog write leaves the previous catalog intact.

use super::header::{seal, Header, HEADER_BYTES};
use super::superblock::{byte_enum, DeviceRole};
use super::{pad_to_pages, FormatError, Reader, Writer};

pub const MAGIC: &[u8; 8] = b"CHRNCATL";
const STRUCTURE: &str = "catalog";
pub const CATALOG_PREFIX_BYTES: usize = 128;
pub const ENTRY_BYTES: usize = 256;
pub const COMMENT_BYTES: usize = 128;
/// Entries a catalog slot holds by default (a 256 KiB slot).
pub const DEFAULT_CAPACITY_ENTRIES: u32 = 1023;

byte_enum!(
    /// What an entry describes.
    EntryKind {
        Online = 1,
        History = 2,
        Merged = 3,
        RestoreVolume = 4,
        DedupIndex = 5,
        Retained = 6,
        Backup = 7,
        Versions = 8,
    }
);
byte_enum!(
    /// Life-cycle state of an entry (which states are valid depends on the kind).
    EntryState {
        Open = 1,
        Sealed = 2,
        Sorting = 3,
        Live = 4,
        Merging = 5,
        Deleting = 6,
        Active = 7,
        Held = 8,
    }
);

/// Entry flags.
pub mod flags {
    /// Elements are stored compressed (embodiment 8).
    pub const COMPRESSED: u16 = 1 << 0;
    /// Addresses are explicit and some elements are shared through dedup.
    pub const DEDUPLICATED: u16 = 1 << 1;
    /// Data lives on an external device (embodiment 5).
    pub const EXTERNAL: u16 = 1 << 2;
    /// The external device is offline and must be brought online before reading.
    pub const PATH_OFFLINE: u16 = 1 << 3;
    /// Creating this generation failed (table 205 status "failure").
    pub const FAILED: u16 = 1 << 4;
    /// Some explicit addresses (flagged shared) point at units of other records or of
    /// retained extents: deleting those keeps the units (FIG 41/42).
    pub const SHARES_ACROSS: u16 = 1 << 5;
    pub const KNOWN: u16 = COMPRESSED | DEDUPLICATED | EXTERNAL | PATH_OFFLINE | FAILED | SHARES_ACROSS;
}

/// One row of the catalog. A history catalog has exactly one `Backup` entry: the generation,
/// time and comment of the image the backup holds. Field meanings per kind are in `docs/FORMAT.md` §Catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub generation: u64,
    pub kind: EntryKind,
    pub state: EntryState,
    pub flags: u16,
    /// Marker receipt time (sealed generations) or open time, Unix nanoseconds.
    pub time_ns: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// Newest generation folded into a merged record; equals `generation` otherwise.
    pub through_generation: u64,
    /// Journal: virtual segment of the first element. History: unit address of the elements.
    pub element_start: u64,
    /// Journal: elements allocated. History: units of the element extent.
    pub element_count: u64,
    /// Journal: virtual element-index page. History: unit address of the control block.
    pub control_start: u64,
    /// Journal: element-index pages. History: units of the control block.
    pub control_count: u64,
    pub stored_bytes: u64,
    pub dedup_saved: u64,
    /// Elements pointing at units other entries own (shared across records); part of what
    /// `dedup_saved` counts.
    pub shared_across: u64,
    /// Blocks the record covers (population count of its bitmap).
    pub blocks: u64,
    /// Versions ("all" mode): time of the generation's last version, Unix nanoseconds (its first
    /// is `time_ns`); 0 for other kinds.
    pub last_time_ns: u64,
    /// Compressed records: bytes of the elements before compression (0 otherwise).
    pub original_bytes: u64,
    /// User comment of the marker, or the name of a restore volume (UTF-8, < 128 bytes).
    pub comment: String,
}

impl CatalogEntry {
    /// A fresh entry of `kind` for `generation` with every other field zero.
    pub fn new(generation: u64, kind: EntryKind, state: EntryState) -> Self {
        CatalogEntry {
            generation,
            kind,
            state,
            flags: 0,
            time_ns: 0,
            first_sequence: 0,
            last_sequence: 0,
            through_generation: generation,
            element_start: 0,
            element_count: 0,
            control_start: 0,
            control_count: 0,
            stored_bytes: 0,
            dedup_saved: 0,
            shared_across: 0,
            blocks: 0,
            last_time_ns: 0,
            original_bytes: 0,
            comment: String::new(),
        }
    }

    fn validate(&self) -> Result<(), FormatError> {
        use EntryKind::*;
        use EntryState::*;
        let valid = matches!(
            (self.kind, self.state),
            (Online, Open | Sealed | Sorting)
                | (History | Merged, Live | Merging | Deleting)
                | (RestoreVolume, Active | Deleting)
                | (DedupIndex | Backup | Versions, Live)
                | (Retained, Held)
        );
        if !valid {
            return Err(FormatError::invalid(
                STRUCTURE,
                "entry state",
                format!("{:?} is not a state of a {:?} entry (generation {})", self.state, self.kind, self.generation),
            ));
        }
        if self.flags & !flags::KNOWN != 0 {
            return Err(FormatError::UnknownFeatures { structure: STRUCTURE, flags: u64::from(self.flags) });
        }
        if self.comment.len() >= COMMENT_BYTES {
            return Err(FormatError::invalid(
                STRUCTURE,
                "comment",
                format!("{} bytes, at most {}", self.comment.len(), COMMENT_BYTES - 1),
            ));
        }
        // The field is zero-terminated: a NUL inside would not read back.
        if self.comment.contains('\0') {
            return Err(FormatError::invalid(STRUCTURE, "comment", "holds a NUL character"));
        }
        if self.through_generation < self.generation {
            return Err(FormatError::invalid(STRUCTURE, "through generation", "older than the generation"));
        }
        Ok(())
    }

    fn encode_into(&self, w: &mut Writer<'_>) {
        let start = w.position();
        w.put_u64(self.generation);
        w.put_u8(self.kind as u8);
        w.put_u8(self.state as u8);
        w.put_u16(self.flags);
        w.put_u16(self.comment.len() as u16);
        w.put_u16(0);
        for value in [
            self.time_ns,
            self.first_sequence,
            self.last_sequence,
            self.through_generation,
            self.element_start,
            self.element_count,
            self.control_start,
            self.control_count,
            self.stored_bytes,
            self.dedup_saved,
            self.blocks,
            self.last_time_ns,
            self.shared_across,
            self.original_bytes,
        ] {
            w.put_u64(value);
        }
        debug_assert_eq!(w.position() - start, ENTRY_BYTES - COMMENT_BYTES);
        w.put_bytes(self.comment.as_bytes());
        w.skip(COMMENT_BYTES - self.comment.len());
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, FormatError> {
        let generation = r.u64()?;
        let kind = EntryKind::from_byte(STRUCTURE, "entry kind", r.u8()?)?;
        let state = EntryState::from_byte(STRUCTURE, "entry state", r.u8()?)?;
        let flags = r.u16()?;
        let comment_len = r.u16()? as usize;
        r.u16()?;
        let mut values = [0u64; 14];
        for value in &mut values {
            *value = r.u64()?;
        }
        let comment_bytes = r.take(COMMENT_BYTES)?;
        if comment_len >= COMMENT_BYTES || comment_bytes[comment_len..].iter().any(|b| *b != 0) {
            return Err(FormatError::invalid(STRUCTURE, "comment", "length and padding disagree"));
        }
        let comment = std::str::from_utf8(&comment_bytes[..comment_len])
            .map_err(|_| FormatError::invalid(STRUCTURE, "comment", "not UTF-8"))?
            .to_owned();
        let [time_ns, first_sequence, last_sequence, through_generation, element_start, element_count, control_start, control_count, stored_bytes, dedup_saved, blocks, last_time_ns, shared_across, original_bytes] =
            values;
        let entry = CatalogEntry {
            generation,
            kind,
            state,
            flags,
            time_ns,
            first_sequence,
            last_sequence,
            through_generation,
            element_start,
            element_count,
            control_start,
            control_count,
            stored_bytes,
            dedup_saved,
            shared_across,
            blocks,
            last_time_ns,
            original_bytes,
            comment,
        };
        entry.validate()?;
        Ok(entry)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub sequence: u64,
    pub role: DeviceRole,
    /// Journal: number of the open generation.
    pub next_generation: u64,
    /// Generation whose image the backup holds.
    pub backup_generation: u64,
    /// Journal: host write sequence at the time of this catalog.
    pub write_sequence: u64,
    /// Journal: virtual segment where the oldest online generation starts.
    pub ring_tail: u64,
    /// Journal: virtual element-index page where the oldest online generation starts.
    pub index_tail: u64,
    /// Entries this catalog's slot can hold.
    pub capacity_entries: u32,
    pub entries: Vec<CatalogEntry>,
}

impl Catalog {
    pub fn new(role: DeviceRole, capacity_entries: u32) -> Self {
        Catalog {
            sequence: 0,
            role,
            next_generation: 1,
            backup_generation: 0,
            write_sequence: 0,
            ring_tail: 0,
            index_tail: 0,
            capacity_entries,
            entries: Vec::new(),
        }
    }

    /// Bytes of a slot that holds `capacity_entries` entries (page aligned).
    pub fn slot_bytes(capacity_entries: u32) -> usize {
        pad_to_pages(CATALOG_PREFIX_BYTES + capacity_entries as usize * ENTRY_BYTES)
    }

    pub fn encoded_len(&self) -> usize {
        CATALOG_PREFIX_BYTES + self.entries.len() * ENTRY_BYTES
    }

    pub fn entry(&self, generation: u64, kind: EntryKind) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| e.generation == generation && e.kind == kind)
    }

    /// Checks the catalog as a whole: capacity, entry validity and order.
    pub fn validate(&self) -> Result<(), FormatError> {
        if self.entries.len() > self.capacity_entries as usize {
            return Err(FormatError::invalid(
                STRUCTURE,
                "entry count",
                format!("{} entries in a slot of {}", self.entries.len(), self.capacity_entries),
            ));
        }
        if !matches!(self.role, DeviceRole::Journal | DeviceRole::History) {
            return Err(FormatError::invalid(STRUCTURE, "role", format!("{:?}", self.role)));
        }
        let mut previous_online: Option<u64> = None;
        for entry in &self.entries {
            entry.validate()?;
            if entry.kind == EntryKind::Online {
                if previous_online.is_some_and(|p| entry.generation <= p) {
                    return Err(FormatError::invalid(STRUCTURE, "online generations", "not strictly ascending"));
                }
                previous_online = Some(entry.generation);
            }
        }
        Ok(())
    }

    /// Encodes into whole pages, ready to write into a slot.
    pub fn encode(&self) -> Vec<u8> {
        self.validate().expect("only valid catalogs are encoded");
        let length = self.encoded_len();
        let mut bytes = vec![0u8; pad_to_pages(length)];
        Header::write(&mut bytes, MAGIC, length, self.sequence);
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_u8(self.role as u8);
        w.skip(7);
        w.put_u64(self.next_generation);
        w.put_u64(self.backup_generation);
        w.put_u64(self.write_sequence);
        w.put_u64(self.ring_tail);
        w.put_u64(self.index_tail);
        w.put_u32(self.entries.len() as u32);
        w.put_u32(ENTRY_BYTES as u32);
        w.put_u32(self.capacity_entries);
        w.skip(CATALOG_PREFIX_BYTES - w.position());
        for entry in &self.entries {
            entry.encode_into(&mut w);
        }
        debug_assert_eq!(w.position(), length);
        seal(&mut bytes, length);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (header, body) = Header::read(STRUCTURE, MAGIC, bytes, CATALOG_PREFIX_BYTES)?;
        let mut r = Reader::at(STRUCTURE, body, HEADER_BYTES);
        let role = DeviceRole::from_byte(STRUCTURE, "role", r.u8()?)?;
        r.skip(7)?;
        let next_generation = r.u64()?;
        let backup_generation = r.u64()?;
        let write_sequence = r.u64()?;
        let ring_tail = r.u64()?;
        let index_tail = r.u64()?;
        let entry_count = r.u32()? as usize;
        let entry_bytes = r.u32()? as usize;
        let capacity_entries = r.u32()?;
        if entry_bytes != ENTRY_BYTES {
            return Err(FormatError::invalid(
                STRUCTURE,
                "entry size",
                format!("{entry_bytes}, expected {ENTRY_BYTES}"),
            ));
        }
        if CATALOG_PREFIX_BYTES as u64 + entry_count as u64 * ENTRY_BYTES as u64 != body.len() as u64 {
            return Err(FormatError::invalid(STRUCTURE, "entry count", "does not match the length"));
        }
        let mut r = Reader::at(STRUCTURE, body, CATALOG_PREFIX_BYTES);
        let mut entries = Vec::with_capacity(entry_count);
        for _ in 0..entry_count {
            entries.push(CatalogEntry::decode_from(&mut r)?);
        }
        let catalog = Catalog {
            sequence: header.sequence,
            role,
            next_generation,
            backup_generation,
            write_sequence,
            ring_tail,
            index_tail,
            capacity_entries,
            entries,
        };
        catalog.validate()?;
        Ok(catalog)
    }
}

/// The catalog to use from the two slots: the valid one with the higher sequence.
pub fn choose(slot_a: &[u8], slot_b: &[u8]) -> Result<Catalog, FormatError> {
    super::superblock::newest(Catalog::decode(slot_a), Catalog::decode(slot_b), |c| c.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Catalog {
        let mut catalog = Catalog::new(DeviceRole::Journal, 16);
        catalog.sequence = 9;
        catalog.next_generation = 5;
        catalog.backup_generation = 3;
        catalog.ring_tail = 100;
        let mut sealed = CatalogEntry::new(4, EntryKind::Online, EntryState::Sealed);
        sealed.time_ns = 123;
        sealed.element_start = 100;
        sealed.element_count = 40;
        sealed.comment = "before upgrade — ünïcode".into();
        let open = CatalogEntry::new(5, EntryKind::Online, EntryState::Open);
        catalog.entries = vec![sealed, open];
        catalog
    }

    #[test]
    fn round_trips_at_documented_offsets() {
        let catalog = sample();
        let bytes = catalog.encode();
        assert_eq!(Catalog::decode(&bytes).unwrap(), catalog);
        assert_eq!(bytes.len(), 4096);
        assert_eq!(u64::from_le_bytes(bytes[40..48].try_into().unwrap()), 5, "next generation at 40");
        assert_eq!(u64::from_le_bytes(bytes[48..56].try_into().unwrap()), 3, "backup generation at 48");
        assert_eq!(u32::from_le_bytes(bytes[80..84].try_into().unwrap()), 2, "entry count at 80");
        let first = CATALOG_PREFIX_BYTES;
        assert_eq!(u64::from_le_bytes(bytes[first..first + 8].try_into().unwrap()), 4);
        assert_eq!(bytes[first + 8], EntryKind::Online as u8);
        assert_eq!(bytes[first + 9], EntryState::Sealed as u8);
        assert_eq!(u64::from_le_bytes(bytes[first + 48..first + 56].try_into().unwrap()), 100, "element start at +48");
        assert_eq!(&bytes[first + 128..first + 136], b"before u");
        assert_eq!(Catalog::slot_bytes(DEFAULT_CAPACITY_ENTRIES), 256 * 1024);
    }

    #[test]
    fn invalid_state_for_kind_is_refused() {
        let mut catalog = sample();
        catalog.entries[0].state = EntryState::Live;
        assert!(catalog.validate().is_err());
    }

    #[test]
    fn newest_valid_slot_wins() {
        let a = sample();
        let mut b = sample();
        b.sequence = 10;
        b.next_generation = 6;
        b.entries.push(CatalogEntry::new(6, EntryKind::Online, EntryState::Open));
        b.entries[1].state = EntryState::Sealed;
        let mut b_bytes = b.encode();
        assert_eq!(choose(&a.encode(), &b_bytes).unwrap().next_generation, 6);
        b_bytes[200] ^= 1;
        assert_eq!(choose(&a.encode(), &b_bytes).unwrap().next_generation, 5);
    }
}
