//! The open generation's unit → element map: which journal element (entry) holds a volume
//! unit's data in the open generation (seed 001 FIG 8 S8003: "is the bit already set?").
//!
//! A paged direct map rather than a hash map: a write looks its unit up once per host write,
//! and a hash table of a large generation costs two cache misses per lookup where a direct
//! map costs one. Pages of [`PAGE_UNITS`] entries are allocated when a unit in them is first
//! written, so memory follows the written regions: at most 4 bytes per unit of the volume
//! (a hash map needs about 17 bytes per written unit), at least one 1 KiB page per written
//! 1 MiB region (at 4 KiB units).
//!
//! A listed unit can also be locked while a write of it is in flight: the lock is the top bit
//! of the slot the write has just looked up, so taking it touches no other memory and
//! releasing it one line that is usually still cached (a hash map of locks cost the write
//! path 2.7 %, BENCHMARKS session "short way").

/// Units per page.
pub const PAGE_UNITS: usize = 256;
/// The largest entry: below the lock bit, and not `ABSENT` when locked.
pub const MAX_ENTRY: u32 = LOCKED - 2;
const ABSENT: u32 = u32::MAX;
const LOCKED: u32 = 1 << 31;

type Page = Box<[u32; PAGE_UNITS]>;

#[derive(Debug, Default, Clone)]
pub struct UnitIndex {
    pages: Vec<Option<Page>>,
    len: usize,
    /// Units locked now.
    locked: usize,
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

    /// `unit`'s slot if the unit is listed.
    #[inline]
    fn listed_slot_mut(&mut self, unit: u64) -> Option<&mut u32> {
        let (page, slot) = Self::split(unit);
        match self.pages.get_mut(page) {
            Some(Some(entries)) if entries[slot] != ABSENT => Some(&mut entries[slot]),
            _ => None,
        }
    }

    /// The entry holding `unit`, if the generation has written it (locked or not).
    #[inline]
    pub fn get(&self, unit: u64) -> Option<u32> {
        self.lookup(unit).map(|(entry, _)| entry)
    }

    /// The entry holding `unit` and whether the unit is locked, from one slot read.
    #[inline]
    pub fn lookup(&self, unit: u64) -> Option<(u32, bool)> {
        let slot = *self.slot(unit)?;
        (slot != ABSENT).then_some((slot & !LOCKED, slot & LOCKED != 0))
    }

    /// Is `unit` locked?
    #[inline]
    pub fn is_locked(&self, unit: u64) -> bool {
        self.lookup(unit).is_some_and(|(_, locked)| locked)
    }

    /// Locks the listed `unit`; false (nothing changed) if it is not listed or already locked.
    #[inline]
    pub fn lock(&mut self, unit: u64) -> bool {
        match self.listed_slot_mut(unit) {
            Some(slot) if *slot & LOCKED == 0 => {
                *slot |= LOCKED;
                self.locked += 1;
                true
            }
            _ => false,
        }
    }

    /// Releases `unit`'s lock; false (nothing changed) if it was not locked.
    #[inline]
    pub fn unlock(&mut self, unit: u64) -> bool {
        match self.listed_slot_mut(unit) {
            Some(slot) if *slot & LOCKED != 0 => {
                *slot &= !LOCKED;
                self.locked -= 1;
                true
            }
            _ => false,
        }
    }

    /// Units locked now.
    pub fn locked(&self) -> usize {
        self.locked
    }

    /// Where `unit`'s entry lives (for a prefetch hint), if its page exists. Nothing is read.
    #[inline]
    pub fn entry_address(&self, unit: u64) -> Option<*const u32> {
        self.slot(unit).map(std::ptr::from_ref)
    }

    pub fn contains(&self, unit: u64) -> bool {
        self.get(unit).is_some()
    }

    /// Records that `entry` holds `unit`; returns the entry it replaces. The unit's lock, if
    /// any, stays.
    pub fn insert(&mut self, unit: u64, entry: u32) -> Option<u32> {
        assert!(entry <= MAX_ENTRY, "entry {entry} is above the limit {MAX_ENTRY}");
        let (page, slot) = Self::split(unit);
        if page >= self.pages.len() {
            self.pages.resize_with(page + 1, || None);
        }
        let entries = self.pages[page].get_or_insert_with(|| Box::new([ABSENT; PAGE_UNITS]));
        let previous = entries[slot];
        if previous == ABSENT {
            entries[slot] = entry;
            self.len += 1;
            None
        } else {
            entries[slot] = entry | (previous & LOCKED);
            Some(previous & !LOCKED)
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
    fn locks_only_listed_units_once_and_keeps_them_across_inserts() {
        let mut index = UnitIndex::new();
        assert!(!index.lock(5), "an unlisted unit cannot be locked");
        assert_eq!(index.insert(5, 9), None);
        assert_eq!(index.lookup(5), Some((9, false)));
        assert!(index.lock(5));
        assert!(!index.lock(5), "locked twice");
        assert_eq!((index.lookup(5), index.get(5), index.locked()), (Some((9, true)), Some(9), 1));
        assert_eq!(index.insert(5, 11), Some(9), "the entry changes, the lock stays");
        assert_eq!(index.lookup(5), Some((11, true)));
        assert_eq!(index.insert(6, MAX_ENTRY), None);
        assert_eq!(index.lookup(6), Some((MAX_ENTRY, false)), "the largest entry is not a locked one");
        assert!(index.lock(6));
        assert_eq!(index.lookup(6), Some((MAX_ENTRY, true)), "nor, locked, an absent one");
        assert!(index.unlock(6));
        assert!(index.unlock(5));
        assert!(!index.unlock(5), "unlocked twice");
        assert!(!index.unlock(7) && !index.is_locked(7));
        assert_eq!((index.lookup(5), index.locked(), index.len()), (Some((11, false)), 0, 2));
    }

    #[test]
    #[should_panic(expected = "above the limit")]
    fn refuses_entries_that_would_read_as_locked() {
        UnitIndex::new().insert(1, MAX_ENTRY + 1);
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
