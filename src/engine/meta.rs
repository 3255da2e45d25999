//! In-memory metadata of an opened volume: superblocks and layouts, the catalogs and which of
//! their slots is newest, the journal rings, the history allocator, the open generation's
//! element list and the sealed generations waiting for the sort. Owned by the volume's thread.

use std::collections::VecDeque;

use crate::core::allocator::{RingAllocator, SegmentAllocator};
use crate::core::element_map::{Addressing, ElementMap};
use crate::core::format::catalog::{Catalog, CatalogEntry, EntryKind, EntryState};
use crate::core::format::element_index::{entries_per_page, IndexEntry, IndexPage, SLOT_BYTES};
use crate::core::format::layout::{HistoryLayout, JournalLayout, LayoutOptions, VolumeShape};
use crate::core::format::records::SortCursor;
use crate::core::format::superblock::{Durability, JournalFullPolicy, JournalMode, Superblock};
use crate::core::geometry::{div_size, VolumeGeometry};
use crate::core::unit_index::UnitIndex;

/// State of one element-index page's two slots.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PageState {
    /// Sequence of the newest valid copy (0: never written).
    pub sequence: u64,
    /// Slot holding the newest valid copy.
    pub newest_slot: Option<u8>,
}

/// History extents of one record: its elements and its control block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordExtents {
    pub elements: crate::core::allocator::Extent,
    pub control: crate::core::allocator::Extent,
}

impl Meta {
    /// Allocates a contiguous record of `elements` units plus a (contiguous-map) control block
    /// for generation `generation`, or says how much is missing.
    pub fn allocate_record(&mut self, generation: u64, elements: u64) -> Result<RecordExtents, super::EngineError> {
        self.allocate_record_with_table("sort", generation, elements, 0)
    }

    /// As [`allocate_record`](Self::allocate_record), for `operation` (named in the error),
    /// with room in the control block for `explicit_elements` addresses (a merge that may
    /// share elements through dedup).
    pub fn allocate_record_with_table(
        &mut self,
        operation: &'static str,
        generation: u64,
        elements: u64,
        explicit_elements: u64,
    ) -> Result<RecordExtents, super::EngineError> {
        let control_units = crate::core::format::layout::control_block_units(&self.shape, explicit_elements);
        self.allocate_record_extents(operation, generation, elements, control_units)
    }

    /// Allocates `elements` units and a separate extent of `control_units` for `operation`
    /// on `generation` (a version record and its table), or says how much is missing.
    pub fn allocate_record_extents(
        &mut self,
        operation: &'static str,
        generation: u64,
        elements: u64,
        control_units: u64,
    ) -> Result<RecordExtents, super::EngineError> {
        let full = |allocator: &SegmentAllocator| super::EngineError::HistoryFull {
            operation,
            generation,
            needed: control_units + elements,
            free: allocator.free_units(),
            largest: allocator.largest_free(),
        };
        let control = self.allocator.allocate(control_units).map_err(|_| full(&self.allocator))?;
        if elements == 0 {
            return Ok(RecordExtents { elements: crate::core::allocator::Extent::new(0, 0), control });
        }
        match self.allocator.allocate(elements) {
            Ok(elements) => Ok(RecordExtents { elements, control }),
            Err(_) => {
                self.allocator.free(control).expect("just allocated");
                Err(full(&self.allocator))
            }
        }
    }

    /// Frees the history extents a catalog entry owns.
    pub fn free_entry_extents(&mut self, entry: &CatalogEntry) -> Result<(), super::EngineError> {
        if entry.control_count > 0 {
            // An entry without units (a versions entry of a generation without writes) has
            // control_start 0, which may be another record's control unit: nothing to forget.
            self.record_maps.remove(entry.control_start);
            self.compression.forget(entry.control_start, entry.generation);
        }
        for (start, units) in [(entry.element_start, entry.element_count), (entry.control_start, entry.control_count)] {
            if units > 0 {
                self.allocator.free(crate::core::allocator::Extent::new(start, units)).map_err(|e| {
                    super::EngineError::Damaged(format!("history generation {}: {e}", entry.generation))
                })?;
            }
        }
        Ok(())
    }
}

/// A set of small numbers (index pages, entries of the open generation) as a growable
/// bitset: every rewrite in the open generation marks its page and its entry, so this is on the
/// hot path.
#[derive(Debug, Default)]
pub(crate) struct IndexSet {
    words: Vec<u64>,
    len: usize,
}

impl IndexSet {
    pub fn insert(&mut self, index: usize) {
        let word = index / 64;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let bit = 1 << (index % 64);
        self.len += usize::from(self.words[word] & bit == 0);
        self.words[word] |= bit;
    }

    pub fn remove(&mut self, index: usize) {
        if let Some(word) = self.words.get_mut(index / 64) {
            let bit = 1 << (index % 64);
            self.len -= usize::from(*word & bit != 0);
            *word &= !bit;
        }
    }

    pub fn contains(&self, index: usize) -> bool {
        self.words.get(index / 64).is_some_and(|word| word & (1 << (index % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every number in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(index, word)| {
            let mut bits = *word;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let bit = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    index * 64 + bit
                })
            })
        })
    }

    /// Every number in the set, ascending; the set is empty afterwards.
    pub fn drain_sorted(&mut self) -> Vec<usize> {
        let indexes: Vec<usize> = self.iter().collect();
        debug_assert_eq!(indexes.len(), self.len, "the count follows the bits");
        self.words.fill(0);
        self.len = 0;
        indexes
    }
}

/// What "all" mode keeps of one element besides its block and checksum (seed 001 embodiment
/// 4, "All"): the write's sequence and time, and whether a power cut lost it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    pub sequence: u64,
    pub time_ns: u64,
    pub lost: bool,
}

/// The generation collecting host writes.
#[derive(Debug)]
pub(crate) struct OpenGeneration {
    pub generation: u64,
    pub opened_ns: u64,
    /// Virtual journal segment of entry 0.
    pub element_start: u64,
    /// Virtual element-index page of page 0.
    pub page_start: u64,
    /// Blocks in allocation order: entry k is in segment `element_start + k`.
    pub blocks: Vec<u64>,
    /// crc32c of each entry's element as last written, except the entries in `crc_pending`.
    pub crcs: Vec<u32>,
    /// Entries rewritten since their crc was computed (FORMAT.md §9.1): a rewrite does not
    /// checksum the new data, the marker reads the element back and does: a block rewritten
    /// many times in a generation costs one checksum, not one per write.
    pub crc_pending: IndexSet,
    /// "All" mode: each entry's version (empty in "latest" mode).
    pub versions: Vec<Version>,
    /// Block → entry (in "all" mode its newest entry).
    pub entry_of: UnitIndex,
    /// Pages holding entries whose crc changed since the page was last written.
    pub stale_pages: IndexSet,
    /// Entries whose index page is durable.
    pub durable: usize,
    pub pages: Vec<PageState>,
}

impl OpenGeneration {
    pub fn new(generation: u64, element_start: u64, page_start: u64) -> Self {
        OpenGeneration {
            generation,
            opened_ns: super::now_ns(),
            element_start,
            page_start,
            blocks: Vec::new(),
            crcs: Vec::new(),
            crc_pending: Default::default(),
            versions: Vec::new(),
            entry_of: UnitIndex::new(),
            stale_pages: Default::default(),
            durable: 0,
            pages: Vec::new(),
        }
    }

    /// A rewrite of `entry`'s block: its checksum is left to the marker, which reads the
    /// element back and marks the entry's page stale if the crc changed (FORMAT.md §9.1; until
    /// then the open generation's crcs may be stale, and recovery recomputes them). Past
    /// `pending_limit` pending entries (VolumeOptions::marker_read_back_bytes) `crc` computes
    /// it now, as for a new element.
    pub fn note_rewrite(
        &mut self,
        entry: usize,
        pending_limit: usize,
        written_upto: usize,
        per_page: usize,
        crc: impl FnOnce() -> u32,
    ) {
        if self.crc_pending.len() < pending_limit || self.crc_pending.contains(entry) {
            self.crc_pending.insert(entry);
        } else {
            self.set_crc(entry, crc(), written_upto, per_page);
        }
    }

    /// Records `crc` as `entry`'s checksum, no longer pending. Its index page becomes stale
    /// if the crc changed and the page was written (entries below `written_upto`, §9.1); an
    /// unwritten page takes the new crc when the group commit writes it.
    pub fn set_crc(&mut self, entry: usize, crc: u32, written_upto: usize, per_page: usize) {
        self.crc_pending.remove(entry);
        if self.crcs[entry] != crc {
            self.crcs[entry] = crc;
            if entry < written_upto {
                self.stale_pages.insert(entry / per_page);
            }
        }
    }
}

/// A sealed generation waiting for (or in) the sort.
#[derive(Debug, Clone)]
pub(crate) struct SealedGeneration {
    pub generation: u64,
    pub time_ns: u64,
    pub comment: String,
    pub element_start: u64,
    pub page_start: u64,
    pub page_count: u64,
    pub blocks: Vec<u64>,
    pub crcs: Vec<u32>,
    /// "All" mode: each entry's version (empty in "latest" mode).
    pub versions: Vec<Version>,
    /// Every write of the generation has a lower sequence, every later write a higher one
    /// (the marker's barrier − 1).
    pub last_sequence: u64,
    /// The catalog write that seals it is durable: only then may the sort touch it.
    pub durable: bool,
}

impl SealedGeneration {
    /// `(block, virtual segment)` of the element that holds each block's content at the seal:
    /// every element in "latest" mode, the newest version of each block in "all" mode.
    pub fn elements(&self) -> Vec<(u64, u64)> {
        if self.versions.is_empty() {
            return self.blocks.iter().enumerate().map(|(k, block)| (*block, self.element_start + k as u64)).collect();
        }
        newest_versions(&self.blocks, &self.versions, u64::MAX)
            .into_iter()
            .map(|(block, k)| (block, self.element_start + k as u64))
            .collect()
    }

    /// Blocks the generation holds content for: `elements().len()` without building the list
    /// in "latest" mode (status asks for it often).
    pub fn block_count(&self) -> u64 {
        if self.versions.is_empty() {
            return self.blocks.len() as u64;
        }
        let held: rustc_hash::FxHashSet<u64> =
            self.blocks.iter().zip(&self.versions).filter(|(_, v)| !v.lost).map(|(block, _)| *block).collect();
        held.len() as u64
    }
}

/// "All" mode: for each block, the entry index of its newest version with sequence at most
/// `upto` that was not lost, ascending by block. Per block, versions are in allocation order,
/// which is sequence order (overlapping writes keep their submission order).
pub(crate) fn newest_versions(blocks: &[u64], versions: &[Version], upto: u64) -> Vec<(u64, usize)> {
    debug_assert_eq!(blocks.len(), versions.len());
    let mut newest: std::collections::BTreeMap<u64, usize> = Default::default();
    for (k, (block, version)) in blocks.iter().zip(versions).enumerate() {
        if version.sequence <= upto && !version.lost {
            newest.insert(*block, k);
        }
    }
    newest.into_iter().collect()
}

pub(crate) struct Meta {
    pub geometry: VolumeGeometry,
    pub shape: VolumeShape,
    pub options: LayoutOptions,
    pub journal_superblock: Superblock,
    pub history_superblock: Superblock,
    pub journal: JournalLayout,
    pub history: HistoryLayout,
    /// Block size of each device, by role.
    pub block_size: [u64; 4],
    pub journal_catalog: Catalog,
    pub journal_catalog_slot: usize,
    pub history_catalog: Catalog,
    pub history_catalog_slot: usize,
    pub cursor: SortCursor,
    pub cursor_slot: usize,
    pub ring: RingAllocator,
    pub pages: RingAllocator,
    pub allocator: SegmentAllocator,
    pub open: OpenGeneration,
    /// Blocks of the open generation whose content is in the base only (journal-full policy
    /// bitmap-only, FIG 36); `None` when the journal has no bitmap area.
    pub open_bitmap: Option<super::bitmap_only::OpenBitmap>,
    pub sealed: VecDeque<SealedGeneration>,
    /// Maps of live history records already read or written (restore volumes, merges and
    /// rollbacks need them without reading every control block again).
    pub record_maps: RecordMaps,
    /// Submission sequence the next host request gets: above every sequence any catalog or
    /// index entry names, so sequences grow across restarts.
    pub next_sequence: u64,
    /// "All" mode: time of the newest write, so write times never go back.
    pub last_write_ns: u64,
    /// Compressed history records, their frame tables and recent frames (embodiment 8).
    pub compression: super::compress::Compression,
}

/// Bytes of record maps kept in memory per volume; past it, maps are read from their control
/// blocks each time.
pub(crate) const RECORD_MAPS_MAX_BYTES: usize = 256 << 20;

/// The maps of live history records, by the unit of their control block (unique among live
/// records; a merged record has its first generation's number, so generation numbers are not).
#[derive(Debug, Default)]
pub(crate) struct RecordMaps {
    maps: rustc_hash::FxHashMap<u64, (u64, std::sync::Arc<ElementMap>)>,
    bytes: usize,
}

impl RecordMaps {
    /// The cached map of the record whose control block starts at `control_start`, if it is
    /// the one of `generation`.
    pub fn get(&self, control_start: u64, generation: u64) -> Option<std::sync::Arc<ElementMap>> {
        self.maps.get(&control_start).filter(|(g, _)| *g == generation).map(|(_, map)| map.clone())
    }

    /// Keeps a record's map (skipped when the cache is full).
    pub fn insert(&mut self, control_start: u64, generation: u64, map: std::sync::Arc<ElementMap>) {
        let bytes = map_bytes(&map);
        self.remove(control_start);
        if self.bytes + bytes <= RECORD_MAPS_MAX_BYTES {
            self.bytes += bytes;
            self.maps.insert(control_start, (generation, map));
        }
    }

    /// Whether the cache has reached its size.
    pub fn full(&self) -> bool {
        self.bytes >= RECORD_MAPS_MAX_BYTES * 15 / 16
    }

    /// Forgets the map of a record whose space is freed.
    pub fn remove(&mut self, control_start: u64) {
        if let Some((_, map)) = self.maps.remove(&control_start) {
            self.bytes -= map_bytes(&map);
        }
    }
}

fn map_bytes(map: &ElementMap) -> usize {
    let table = match map.addressing() {
        Addressing::Contiguous { .. } => 0,
        Addressing::Explicit(table) => table.len(),
    };
    // Bitmap words, the rank index (one word per 8) and the address table.
    8 * (map.bitmap().words().len() * 9 / 8 + table + 1)
}

impl Meta {
    pub fn unit_bytes(&self) -> u64 {
        u64::from(self.shape.host_write_size)
    }

    pub fn mode(&self) -> JournalMode {
        self.journal_superblock.journal_mode
    }

    pub fn durability(&self) -> Durability {
        self.journal_superblock.durability
    }

    pub fn journal_full_policy(&self) -> JournalFullPolicy {
        self.journal_superblock.journal_full_policy
    }

    pub fn entries_per_page(&self) -> usize {
        entries_per_page(self.mode())
    }

    /// Units of a write that need a new element: every unit in "all" mode (each write is a
    /// new version), the units the open generation does not list yet in "latest" mode.
    pub fn new_units(&self, units: std::ops::Range<u64>) -> u64 {
        match self.mode() {
            JournalMode::All => units.end - units.start,
            JournalMode::Latest => units.filter(|unit| !self.open.entry_of.contains(*unit)).count() as u64,
        }
    }

    /// Device blocks of the base or backup per unit.
    pub fn blocks_per_unit(&self, role_index: usize) -> u64 {
        div_size(self.unit_bytes(), self.block_size[role_index])
    }

    /// Block of the base (or backup) where unit `unit` starts.
    pub fn volume_lba(&self, role_index: usize, unit: u64) -> u64 {
        unit * self.blocks_per_unit(role_index)
    }

    /// Journal block where virtual segment `segment` starts.
    pub fn segment_lba(&self, segment: u64) -> u64 {
        let physical = self.ring.physical(segment);
        div_size(self.journal.elements.start_bytes + physical * self.unit_bytes(), self.block_size[1])
    }

    /// Byte offset of slot `slot` of virtual index page `page`.
    pub fn index_slot_bytes(&self, page: u64, slot: u8) -> u64 {
        let physical = page % self.journal.index_pages;
        self.journal.index.start_bytes + physical * 2 * SLOT_BYTES as u64 + u64::from(slot) * SLOT_BYTES as u64
    }

    /// History block where history unit `unit` starts.
    pub fn history_lba(&self, unit: u64) -> u64 {
        (self.history.units.start_bytes + unit * self.unit_bytes()) / self.block_size[3]
    }

    /// Byte offset of the sort cursor's slot.
    pub fn cursor_bytes(&self, slot: usize) -> u64 {
        self.history.sort_cursors.start_bytes + slot as u64 * 4096
    }

    /// The journal catalog describing the current state (online generations and rings).
    pub fn build_journal_catalog(&self) -> Catalog {
        let mut catalog = self.journal_catalog.clone();
        catalog.next_generation = self.open.generation;
        catalog.write_sequence = self.next_sequence;
        catalog.ring_tail = self.ring.tail();
        catalog.index_tail = self.pages.tail();
        catalog.entries.clear();
        for sealed in &self.sealed {
            let mut entry = CatalogEntry::new(sealed.generation, EntryKind::Online, EntryState::Sealed);
            entry.first_sequence = sealed.versions.first().map_or(0, |v| v.sequence);
            entry.last_sequence = sealed.last_sequence;
            entry.time_ns = sealed.time_ns;
            entry.comment = sealed.comment.clone();
            entry.element_start = sealed.element_start;
            entry.element_count = sealed.blocks.len() as u64;
            entry.control_start = sealed.page_start;
            entry.control_count = sealed.page_count;
            entry.blocks = if sealed.versions.is_empty() {
                sealed.blocks.len() as u64
            } else {
                sealed.blocks.iter().collect::<rustc_hash::FxHashSet<_>>().len() as u64
            };
            catalog.entries.push(entry);
        }
        let mut open = CatalogEntry::new(self.open.generation, EntryKind::Online, EntryState::Open);
        open.time_ns = self.open.opened_ns;
        open.element_start = self.open.element_start;
        open.control_start = self.open.page_start;
        catalog.entries.push(open);
        catalog
    }

    /// Encoded index page `index` (relative to the open generation) holding its entries up to
    /// `upto`, written with the next sequence into the slot not holding the newest copy.
    pub fn next_index_page(&self, index: usize, upto: usize) -> (u64, u8, u64, Vec<u8>) {
        let per_page = self.entries_per_page();
        let state = self.open.pages.get(index).copied().unwrap_or_default();
        let slot = match state.newest_slot {
            Some(slot) => 1 - slot,
            None => 0,
        };
        let sequence = state.sequence + 1;
        let first = index * per_page;
        let last = upto.min(first + per_page);
        assert!(first < last, "an index page write carries at least one entry");
        let page = IndexPage {
            sequence,
            generation: self.open.generation,
            page: self.open.page_start + index as u64,
            first_segment: self.open.element_start + first as u64,
            mode: self.mode(),
            entries: (first..last)
                .map(|k| {
                    let version = self.open.versions.get(k).copied();
                    IndexEntry {
                        block: self.open.blocks[k],
                        crc: self.open.crcs[k],
                        sequence: version.map_or(0, |v| v.sequence),
                        time_ns: version.map_or(0, |v| v.time_ns),
                        lost: version.is_some_and(|v| v.lost),
                    }
                })
                .collect(),
        };
        (self.open.page_start + index as u64, slot, sequence, page.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::IndexSet;

    #[test]
    fn index_set_counts_drains_ascending_and_empties() {
        let mut set = IndexSet::default();
        for page in [130, 3, 64, 3, 0, 63, 200] {
            set.insert(page);
        }
        assert_eq!(set.len(), 6, "3 was inserted twice");
        assert!(set.contains(64) && set.contains(200) && !set.contains(1) && !set.contains(5000));
        set.remove(64);
        set.remove(64);
        set.remove(1000);
        assert_eq!(set.len(), 5, "a removed number counts once");
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 3, 63, 130, 200]);
        assert!(!set.contains(64));
        assert_eq!(set.drain_sorted(), vec![0, 3, 63, 130, 200]);
        assert!(set.is_empty() && set.drain_sorted().is_empty());
    }
}
