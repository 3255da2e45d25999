//! Restore planning (seed 001 FIG 13–15, S12001–12006): the R-VOL access table of generation N.
//!
//! Walk H(N), H(N+1), … up to the newest record; the first record holding a block (the **oldest**
//! record ≥ N) gives that block's element; a block in no record reads the backup, which holds the
//! newest sorted image (FIG 14). Merged records take part like any other: a merged record that
//! restores image(N) sits where H(N) would.
//!
//! The map is computed a word of 64 blocks at a time; each record only fills blocks that no older
//! record covered, so the cost is O(records × blocks / 64 + elements), not a per-block search.
//!
//! Sort while an R-VOL exists (FIG 20): the sort overwrites backup blocks the map reads through.
//! Its new record is the newest, so [`RestoreMap::extend_with_newer`] points exactly those
//! blocks at the COW-saved copies — the same map a fresh [`plan_restore`] would build. (The
//! engine's restore volumes keep the record list itself and resolve blocks at read time,
//! `engine::restore_volume`; offline restores and rollbacks use this table.)

use super::{check_volume, union_of, walk_first_hits, PlanError};
use crate::core::bitmap::DifferenceBitmap;
use crate::core::element_map::{Addressing, ElementMap, ADDRESS_MASK};

/// Where a restored block's contents live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A history unit (flags stripped).
    History(u64),
    /// The same block of the backup.
    Backup,
}

/// The R-VOL access table of one generation: an element map whose explicit addresses are the
/// first hits, flags stripped; blocks outside its bitmap read the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreMap {
    map: ElementMap,
}

/// Plans the restore of the generation whose record is `records[0]`; `records` runs oldest first
/// up to the newest record (H(N), H(N+1), …). With no records the generation is the backup's own
/// image and every block reads the backup.
pub fn plan_restore(records: &[&ElementMap], blocks: u64) -> Result<RestoreMap, PlanError> {
    check_volume(records, blocks)?;
    Ok(RestoreMap { map: first_hits(records, blocks) })
}

fn first_hits(records: &[&ElementMap], blocks: u64) -> ElementMap {
    let bitmap = union_of(records, blocks);
    let mut table = Vec::with_capacity(bitmap.count_ones() as usize);
    walk_first_hits(records, blocks, |_, _, raw| table.push(raw & ADDRESS_MASK));
    ElementMap::new(bitmap, Addressing::Explicit(table)).expect("one address per block set")
}

impl RestoreMap {
    /// Where `block` reads from.
    pub fn source(&self, block: u64) -> Source {
        assert!(block < self.blocks(), "block {block} beyond the volume of {} blocks", self.blocks());
        self.map.address_of(block).map_or(Source::Backup, Source::History)
    }

    /// `(block, history address)` of every block read from history, ascending by block.
    pub fn iter_history(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter()
    }

    /// Blocks read from history; the others read the backup.
    pub fn history_blocks(&self) -> &DifferenceBitmap {
        self.map.bitmap()
    }

    pub fn blocks(&self) -> u64 {
        self.map.blocks()
    }

    /// The table as an element map (explicit addresses, no flags).
    pub fn map(&self) -> &ElementMap {
        &self.map
    }

    pub fn into_map(self) -> ElementMap {
        self.map
    }

    /// Adds a record newer than every record the map was built from — the record a sort just
    /// wrote (FIG 20): blocks that read the backup and that the sort overwrote now read their
    /// COW-saved copy. Blocks already read from history keep their (older) element.
    pub fn extend_with_newer(&mut self, record: &ElementMap) -> Result<(), PlanError> {
        check_volume(&[&self.map, record], self.blocks())?;
        self.map = first_hits(&[&self.map, record], self.blocks());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::element_map::ADDRESS_SHARED;

    fn record(blocks: u64, entries: &[(u64, u64)]) -> ElementMap {
        let mut bitmap = DifferenceBitmap::new(blocks);
        for (block, _) in entries {
            bitmap.set(*block);
        }
        ElementMap::new(bitmap, Addressing::Explicit(entries.iter().map(|e| e.1).collect())).unwrap()
    }

    /// FIG 13: restoring N takes block 1 from H(N), block 3 from H(N+1) (not in H(N)), block 1 is
    /// not taken again from H(N+2), and untouched blocks read the backup.
    #[test]
    fn fig13_oldest_record_at_or_after_n_wins() {
        let h_n = record(6, &[(1, 10)]);
        let h_n1 = record(6, &[(1, 20), (3, 21)]);
        let h_n2 = record(6, &[(1, 30), (4, 31 | ADDRESS_SHARED)]);
        let map = plan_restore(&[&h_n, &h_n1, &h_n2], 6).unwrap();
        let sources: Vec<_> = (0..6).map(|b| map.source(b)).collect();
        use Source::*;
        assert_eq!(sources, vec![Backup, History(10), Backup, History(21), History(31), Backup]);
        assert_eq!(map.iter_history().collect::<Vec<_>>(), vec![(1, 10), (3, 21), (4, 31)]);
        assert_eq!(map.history_blocks().count_ones(), 3);

        // Restoring N+1 instead skips H(N).
        let map = plan_restore(&[&h_n1, &h_n2], 6).unwrap();
        assert_eq!(map.source(1), History(20));
    }

    #[test]
    fn no_records_means_the_backup_image() {
        let map = plan_restore(&[], 5).unwrap();
        assert!((0..5).all(|b| map.source(b) == Source::Backup));
    }

    #[test]
    fn a_sort_after_the_map_was_built_repoints_only_backup_reads() {
        let h_n = record(6, &[(1, 10)]);
        let mut map = plan_restore(&[&h_n], 6).unwrap();
        let sorted = record(6, &[(1, 50), (2, 51)]);
        map.extend_with_newer(&sorted).unwrap();
        assert_eq!(map, plan_restore(&[&h_n, &sorted], 6).unwrap());
        assert_eq!(map.source(1), Source::History(10));
        assert_eq!(map.source(2), Source::History(51));
    }

    #[test]
    fn records_of_another_volume_are_refused() {
        let other = record(7, &[]);
        assert_eq!(
            plan_restore(&[&other], 6).unwrap_err(),
            PlanError::VolumeMismatch { index: 0, found: 7, expected: 6 }
        );
    }

    /// A merge of H(N+1)..H(N+2) into one record: an R-VOL of N may read the merged record in
    /// place of its sources (the engine splices it into the R-VOL's records) — the same blocks
    /// read from history, each from the merged copy of the element it read before; H(N) stays.
    #[test]
    fn a_merged_record_stands_in_for_its_sources() {
        let h_n = record(6, &[(1, 10)]);
        let h_n1 = record(6, &[(1, 20), (3, 21)]);
        let h_n2 = record(6, &[(3, 30), (4, 31)]);
        let before = plan_restore(&[&h_n, &h_n1, &h_n2], 6).unwrap();
        let merged = record(6, &[(1, 40), (3, 41), (4, 42)]);
        let map = plan_restore(&[&h_n, &merged], 6).unwrap();
        assert_eq!(map.history_blocks(), before.history_blocks());
        assert_eq!(map.source(1), Source::History(10), "H(N) is not a source");
        assert_eq!(before.source(3), Source::History(21));
        assert_eq!(map.source(3), Source::History(41));
        assert_eq!(map.source(4), Source::History(42));
    }
}
