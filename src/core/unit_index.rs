//! The open generation's unit → element map: which journal element (entry) holds a volume
//! unit's data in the open generation (seed 001 FIG 8 S8003: "is the bit already set?").
//!
//! A paged direct map rather than a hash map: a write looks its unit up once per host write,
//! and a hash table of a large generation costs two cache misses per lookup where a direct
//! map costs one. Pages of [`PAGE_UNITS`] entries are allocated when a unit in them is first
//! written, so memory follows the written regions: at most 4 bytes per unit of the volume
//! (a hash map needs about 17 bytes per written unit), at least one 1 KiB page per written
//! 1 MiB region (at 4 KiB units).

/// Units per page.
pub const PAGE_UNITS: usize = 256;
const ABSENT: u32 = u32::MAX;

type Page = Box<[u32; PAGE_UNITS]>;

#[derive(Debug, Default, Clone)]
pub struct UnitIndex {
    pages: Vec<Option<Page>>,
    len: usize,
}

impl UnitIndex {
    pub fn new() -> Self {
        UnitIndex::default()
    }

    fn split(unit: u64) -> (usize, usize) {
        ((unit / PAGE_UNITS as u64) as usize, (unit % PAGE_UNITS as u64) as usize)
    }

    /// `unit`'s slot, if its page exists (the slot may be `ABSENT`).
    #[inline]
    fn slot(&self, unit: u64) -> Option<&u32> {
        let (page, slot) = Self::split(unit);
        match self.pages.get(page) {
            Some(Some(entries)) => Some(&entries[slot]),
            _ => None,
        }
    }

    /// The entry holding `unit`, if the generation has written it.
    #[inline]
    pub fn get(&self, unit: u64) -> Option<u32> {
        self.slot(unit).copied().filter(|entry| *entry != ABSENT)
    }

    /// Where `unit`'s entry lives (for a prefetch hint), if its page exists. Nothing is read.
    #[inline]
    pub fn entry_address(&self, unit: u64) -> Option<*const u32> {
        self.slot(unit).map(std::ptr::from_ref)
    }

    pub fn contains(&self, unit: u64) -> bool {
        self.get(unit).is_some()
    }

    /// Records that `entry` holds `unit`; returns the entry it replaces.
    pub fn insert(&mut self, unit: u64, entry: u32) -> Option<u32> {
        assert_ne!(entry, ABSENT, "entry {ABSENT} is reserved");
        let (page, slot) = Self::split(unit);
        if page >= self.pages.len() {
            self.pages.resize_with(page + 1, || None);
        }
        let entries = self.pages[page].get_or_insert_with(|| Box::new([ABSENT; PAGE_UNITS]));
        let previous = std::mem::replace(&mut entries[slot], entry);
        if previous == ABSENT {
            self.len += 1;
            None
        } else {
            Some(previous)
        }
    }

    /// Units recorded.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory held (pages and directory), for status and sizing.
    pub fn memory_bytes(&self) -> usize {
        let pages = self.pages.iter().filter(|page| page.is_some()).count();
        pages * PAGE_UNITS * 4 + self.pages.capacity() * std::mem::size_of::<Option<Page>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn behaves_like_a_map_of_units_to_entries() {
        let mut index = UnitIndex::new();
        let mut model: HashMap<u64, u32> = HashMap::new();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for step in 0..20_000u32 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Clustered and sparse units, far apart and close together.
            let unit = if step % 3 == 0 { state % 1_000_000_007 } else { state % 5_000 };
            assert_eq!(index.get(unit), model.get(&unit).copied(), "unit {unit}");
            if step % 2 == 0 {
                assert_eq!(index.insert(unit, step), model.insert(unit, step), "unit {unit}");
            }
            assert_eq!(index.len(), model.len());
        }
        for (unit, entry) in &model {
            assert_eq!(index.get(*unit), Some(*entry));
        }
        assert!(!index.contains(1_000_000_008));
    }

    #[test]
    fn memory_follows_the_written_regions() {
        let mut index = UnitIndex::new();
        for unit in 0..(4 * PAGE_UNITS as u64) {
            index.insert(unit, unit as u32);
        }
        let dense = index.memory_bytes();
        assert!(dense < 4 * PAGE_UNITS * 4 + 1024, "{dense}");
        index.insert(10 * PAGE_UNITS as u64, 7);
        assert_eq!(index.memory_bytes() - dense, PAGE_UNITS * 4 + (index.pages.capacity() - 4) * 8);
    }
}
