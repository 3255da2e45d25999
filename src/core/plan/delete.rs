//! Deleting a generation's image (seed 001 FIG 9 "deleting old generations", FIG 41/42 for
//! records other records reference through dedup).
//!
//! Records run oldest first; `records[i]` restores image(g_i) from image(g_{i+1}).
//! - If the image's record is the **oldest**, the record goes: its units are freed.
//! - Otherwise its record is merged into the previous one (older element wins, FIG 11): the merged
//!   record turns image(g_{i+1}) straight into image(g_{i−1}), so every older image still
//!   restores exactly. After the engine wrote the merged record, both sources are released.
//!
//! Releasing a record respects dedup references with reference counts in place of the patent's
//! save-area moves (FIG 42): each reference the record holds is released in the
//! [`DedupIndex`]; a unit of the record's extent that other maps still reference is **retained**
//! (not freed) and lives on alone until its last reference is released — then the release that
//! drops it to zero frees that single unit, wherever it lies. Everything else of the extent is
//! freed at once.
//!
//! Extents are this module's own minimal [`RecordExtent`] (start, units in history units); the
//! allocator's extent type lives elsewhere and converts trivially.

use std::collections::HashMap;

use super::dedup::DedupIndex;
use super::merge::{plan_merge, MergePlan};
use super::PlanError;
use crate::core::element_map::{ElementMap, ADDRESS_MASK, ADDRESS_SHARED};

/// A run of history units: `start .. start + units`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordExtent {
    pub start: u64,
    pub units: u64,
}

impl RecordExtent {
    pub fn new(start: u64, units: u64) -> Self {
        RecordExtent { start, units }
    }

    pub fn end(&self) -> u64 {
        self.start + self.units
    }

    pub fn contains(&self, address: u64) -> bool {
        (self.start..self.end()).contains(&address)
    }
}

/// A history record as the deletion planner sees it: its map and the units it owns.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub map: &'a ElementMap,
    /// The units the record's writer allocated: every element of the map without the shared
    /// flag lies here, one per unit.
    pub extent: RecordExtent,
}

/// What releasing one record does to the history area and the dedup index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleasePlan {
    /// Units to return to the allocator, ascending and coalesced: the record's extent minus the
    /// retained units, plus units of other (already deleted) records whose last reference this
    /// record held.
    pub free: Vec<RecordExtent>,
    /// Addresses whose reference count drops, once per reference the record holds (its own
    /// indexed elements and its shares), in block order. Apply with
    /// [`ReleasePlan::apply_releases`].
    pub releases: Vec<u64>,
    /// Units of the record's extent kept alive by other records' references, ascending.
    pub retained: Vec<u64>,
}

impl ReleasePlan {
    /// True when some of the record's units outlive it.
    pub fn is_retained(&self) -> bool {
        !self.retained.is_empty()
    }

    /// Units freed in total.
    pub fn freed_units(&self) -> u64 {
        self.free.iter().map(|extent| extent.units).sum()
    }

    /// Releases the record's references in `index`. Must run against the index the plan was
    /// made from.
    pub fn apply_releases(&self, index: &mut DedupIndex) -> Result<(), PlanError> {
        for &address in &self.releases {
            index.release(address)?;
        }
        Ok(())
    }
}

/// How to delete one generation's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeletePlan {
    /// The image's record is the oldest: release it.
    FreeOldest(ReleasePlan),
    /// Merge `records[previous]` and `records[previous + 1]` (the deleted image's record) into one
    /// record that replaces both; then release both sources with [`plan_release`] against the
    /// dedup index as the merge left it (a merge with dedup may add references to them).
    MergeIntoPrevious { previous: usize, merge: MergePlan },
}

/// Plans deleting the image that `records[deleted]` restores. `records` run oldest first;
/// `output_first` is where a merged record would be written.
pub fn plan_delete(
    records: &[RecordView<'_>],
    deleted: usize,
    dedup: &DedupIndex,
    output_first: u64,
) -> Result<DeletePlan, PlanError> {
    if deleted >= records.len() {
        return Err(PlanError::NoSuchRecord { index: deleted, records: records.len() });
    }
    if deleted == 0 {
        return Ok(DeletePlan::FreeOldest(plan_release(&records[0], dedup)?));
    }
    let previous = deleted - 1;
    let merge = plan_merge(&[records[previous].map, records[deleted].map], output_first)?;
    Ok(DeletePlan::MergeIntoPrevious { previous, merge })
}

/// Plans releasing a record that no image needs any more.
pub fn plan_release(record: &RecordView<'_>, dedup: &DedupIndex) -> Result<ReleasePlan, PlanError> {
    let extent = record.extent;
    let mut releases = Vec::new();
    // References this record holds per indexed address.
    let mut held: HashMap<u64, u64> = HashMap::new();
    let mut owned = 0u64;
    for (block, raw) in record.map.iter() {
        let address = raw & ADDRESS_MASK;
        let shared = raw & ADDRESS_SHARED != 0;
        if !shared {
            if !extent.contains(address) {
                return Err(PlanError::OutsideExtent { block, address, start: extent.start, units: extent.units });
            }
            owned += 1;
        }
        if dedup.references(address) > 0 {
            *held.entry(address).or_default() += 1;
            releases.push(address);
        } else if shared {
            return Err(PlanError::DanglingShare { block, address });
        }
    }
    if owned != extent.units {
        return Err(PlanError::ExtentMismatch { owned, start: extent.start, units: extent.units });
    }
    let mut retained = Vec::new();
    let mut orphans = Vec::new();
    for (&address, &count) in &held {
        let counted = dedup.references(address);
        let left =
            u64::from(counted).checked_sub(count).ok_or(PlanError::OverRelease { address, held: count, counted })?;
        match (extent.contains(address), left > 0) {
            (true, true) => retained.push(address),
            (false, false) => orphans.push(address),
            _ => {}
        }
    }
    retained.sort_unstable();
    let mut free = Vec::with_capacity(retained.len() + orphans.len() + 1);
    let mut cursor = extent.start;
    for &address in &retained {
        if address > cursor {
            free.push(RecordExtent::new(cursor, address - cursor));
        }
        cursor = address + 1;
    }
    if cursor < extent.end() {
        free.push(RecordExtent::new(cursor, extent.end() - cursor));
    }
    free.extend(orphans.into_iter().map(|address| RecordExtent::new(address, 1)));
    Ok(ReleasePlan { free: coalesce(free), releases, retained })
}

/// Sorts extents and joins adjacent ones; they must not overlap.
fn coalesce(mut extents: Vec<RecordExtent>) -> Vec<RecordExtent> {
    extents.sort_unstable();
    let mut joined: Vec<RecordExtent> = Vec::with_capacity(extents.len());
    for extent in extents {
        match joined.last_mut() {
            Some(last) if last.end() == extent.start => last.units += extent.units,
            last => {
                if let Some(previous) = last {
                    debug_assert!(previous.end() <= extent.start, "freed extents {previous:?} and {extent:?} overlap");
                }
                joined.push(extent);
            }
        }
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bitmap::DifferenceBitmap;
    use crate::core::element_map::Addressing;

    fn explicit(blocks: u64, entries: &[(u64, u64)]) -> ElementMap {
        let mut bitmap = DifferenceBitmap::new(blocks);
        for (block, _) in entries {
            bitmap.set(*block);
        }
        ElementMap::new(bitmap, Addressing::Explicit(entries.iter().map(|e| e.1).collect())).unwrap()
    }

    fn contiguous(blocks: u64, set: &[u64], first: u64) -> ElementMap {
        let mut bitmap = DifferenceBitmap::new(blocks);
        for block in set {
            bitmap.set(*block);
        }
        ElementMap::new(bitmap, Addressing::Contiguous { first }).unwrap()
    }

    #[test]
    fn deleting_the_oldest_unshared_record_frees_its_extent() {
        let map = contiguous(16, &[1, 4, 9], 100);
        let records = [RecordView { map: &map, extent: RecordExtent::new(100, 3) }];
        let plan = plan_delete(&records, 0, &DedupIndex::new(), 0).unwrap();
        assert_eq!(
            plan,
            DeletePlan::FreeOldest(ReleasePlan {
                free: vec![RecordExtent::new(100, 3)],
                releases: vec![],
                retained: vec![]
            })
        );
    }

    #[test]
    fn deleting_a_later_image_merges_it_into_the_previous_record() {
        let older = contiguous(16, &[1, 4], 100);
        let newer = contiguous(16, &[4, 7], 200);
        let records = [
            RecordView { map: &older, extent: RecordExtent::new(100, 2) },
            RecordView { map: &newer, extent: RecordExtent::new(200, 2) },
        ];
        let DeletePlan::MergeIntoPrevious { previous, merge } =
            plan_delete(&records, 1, &DedupIndex::new(), 300).unwrap()
        else {
            panic!("expected a merge");
        };
        assert_eq!(previous, 0);
        let sources: Vec<_> = merge.steps.iter().map(|s| (s.block, s.source)).collect();
        assert_eq!(sources, vec![(1, 100), (4, 101), (7, 201)], "older wins on block 4");
    }

    /// FIG 41/42 with reference counts: record A owns units 10..13 (indexed); record B shares
    /// unit 11. Deleting A frees 10 and 12 but retains 11; deleting B afterwards frees 11.
    #[test]
    fn a_referenced_unit_is_retained_until_its_last_reference_goes() {
        let mut index = DedupIndex::new();
        for address in 10..13 {
            index.insert(address as u128, address).unwrap();
        }
        index.add_reference(11).unwrap();
        let a = explicit(8, &[(0, 10), (1, 11), (2, 12)]);
        let b = explicit(8, &[(3, 11 | ADDRESS_SHARED), (5, 50)]);
        let a_view = RecordView { map: &a, extent: RecordExtent::new(10, 3) };
        let b_view = RecordView { map: &b, extent: RecordExtent::new(50, 1) };

        let plan_a = plan_release(&a_view, &index).unwrap();
        assert_eq!(plan_a.free, vec![RecordExtent::new(10, 1), RecordExtent::new(12, 1)]);
        assert_eq!(plan_a.retained, vec![11]);
        assert_eq!(plan_a.releases, vec![10, 11, 12]);
        plan_a.apply_releases(&mut index).unwrap();
        assert_eq!(index.references(11), 1);

        let plan_b = plan_release(&b_view, &index).unwrap();
        assert_eq!(plan_b.free, vec![RecordExtent::new(11, 1), RecordExtent::new(50, 1)]);
        assert!(!plan_b.is_retained());
        plan_b.apply_releases(&mut index).unwrap();
        assert!(index.is_empty());
    }

    #[test]
    fn a_record_sharing_its_own_unit_frees_it() {
        // Two blocks of one merged record with equal contents: one stored, one shared.
        let mut index = DedupIndex::new();
        index.insert(1, 20).unwrap();
        index.add_reference(20).unwrap();
        let map = explicit(8, &[(0, 20), (6, 20 | ADDRESS_SHARED)]);
        let plan = plan_release(&RecordView { map: &map, extent: RecordExtent::new(20, 1) }, &index).unwrap();
        assert_eq!(plan.free, vec![RecordExtent::new(20, 1)]);
        assert_eq!(plan.releases, vec![20, 20]);
        assert!(plan.retained.is_empty());
    }

    #[test]
    fn inconsistent_records_are_refused() {
        let index = DedupIndex::new();
        let dangling = explicit(8, &[(2, 5 | ADDRESS_SHARED)]);
        let view = RecordView { map: &dangling, extent: RecordExtent::new(0, 0) };
        assert_eq!(plan_release(&view, &index), Err(PlanError::DanglingShare { block: 2, address: 5 }));

        let outside = explicit(8, &[(2, 5)]);
        let view = RecordView { map: &outside, extent: RecordExtent::new(0, 1) };
        assert_eq!(
            plan_release(&view, &index),
            Err(PlanError::OutsideExtent { block: 2, address: 5, start: 0, units: 1 })
        );

        let short = explicit(8, &[(2, 5)]);
        let view = RecordView { map: &short, extent: RecordExtent::new(5, 2) };
        assert_eq!(plan_release(&view, &index), Err(PlanError::ExtentMismatch { owned: 1, start: 5, units: 2 }));

        let records = [view];
        assert_eq!(plan_delete(&records, 1, &index, 0), Err(PlanError::NoSuchRecord { index: 1, records: 1 }));
    }
}
