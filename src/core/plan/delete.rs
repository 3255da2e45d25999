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
//! The engine uses [`plan_retention`] instead: references derived from the remaining records'
//! maps, no counts to keep (FIG 41/42; `engine::dedup`). [`plan_release`] is the counted model.
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

/// Units that may be kept for dedup references: the element extent of a record leaving the
/// history, or a retained extent already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldExtent {
    /// Generation (and newest generation folded in) of the record the units came from.
    pub generation: u64,
    pub through_generation: u64,
    pub extent: RecordExtent,
}

/// What a change to the live records does to held units: the retained extents after it (every
/// one holds at least one referenced unit) and what is freed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    pub retained: Vec<HeldExtent>,
    pub free: Vec<RecordExtent>,
}

impl RetentionPlan {
    pub fn retained_units(&self) -> u64 {
        self.retained.iter().map(|held| held.extent.units).sum()
    }

    pub fn freed_units(&self) -> u64 {
        self.free.iter().map(|extent| extent.units).sum()
    }
}

/// Plans what happens to `held` extents (records leaving the history and the retained extents
/// so far) when `referenced` are the units the remaining live records point at through dedup
/// (ascending, distinct; the engine collects them from the records' maps, so a crash never
/// loses a count — FIG 41/42 with references derived instead of stored). Referenced units
/// are kept (retained), all others freed; nothing referenced is ever freed.
///
/// Each run of referenced units becomes one retained extent, at most `max_extents` in all
/// (catalog entries are bounded): beyond that the smallest gaps between runs of one held
/// extent are kept too (their units are freed with the run, when its last reference goes).
/// Fewer extents than held extents with references cannot be: [`PlanError::TooManyRetained`].
pub fn plan_retention(held: &[HeldExtent], referenced: &[u64], max_extents: usize) -> Result<RetentionPlan, PlanError> {
    let mut sorted: Vec<HeldExtent> = held.iter().copied().filter(|h| h.extent.units > 0).collect();
    sorted.sort_by_key(|h| h.extent.start);
    for pair in sorted.windows(2) {
        if pair[0].extent.end() > pair[1].extent.start {
            return Err(PlanError::HeldOverlap { first: pair[0].extent.start, second: pair[1].extent.start });
        }
    }
    debug_assert!(referenced.windows(2).all(|w| w[0] < w[1]), "referenced units ascending and distinct");
    // Exact runs per held extent.
    let mut runs: Vec<Vec<RecordExtent>> = Vec::with_capacity(sorted.len());
    for held in &sorted {
        let from = referenced.partition_point(|a| *a < held.extent.start);
        let to = referenced.partition_point(|a| *a < held.extent.end());
        let mut extent_runs: Vec<RecordExtent> = Vec::new();
        for &address in &referenced[from..to] {
            match extent_runs.last_mut() {
                Some(run) if run.end() == address => run.units += 1,
                _ => extent_runs.push(RecordExtent::new(address, 1)),
            }
        }
        runs.push(extent_runs);
    }
    // Bounded entries: join across the smallest gaps (within one held extent).
    let total: usize = runs.iter().map(Vec::len).sum();
    if total > max_extents {
        let needed = runs.iter().filter(|r| !r.is_empty()).count();
        if needed > max_extents {
            return Err(PlanError::TooManyRetained { needed, max: max_extents });
        }
        let mut gaps: Vec<(u64, usize, usize)> = Vec::with_capacity(total);
        for (index, extent_runs) in runs.iter().enumerate() {
            for k in 1..extent_runs.len() {
                gaps.push((extent_runs[k].start - extent_runs[k - 1].end(), index, k));
            }
        }
        gaps.sort_unstable();
        let mut join = vec![Vec::new(); runs.len()];
        for &(_, index, k) in &gaps[..total - max_extents] {
            join[index].push(k);
        }
        for (extent_runs, mut joined) in runs.iter_mut().zip(join) {
            if joined.is_empty() {
                continue;
            }
            joined.sort_unstable();
            let mut merged: Vec<RecordExtent> = Vec::with_capacity(extent_runs.len() - joined.len());
            let mut next_join = joined.iter().peekable();
            for (k, run) in extent_runs.iter().enumerate() {
                if next_join.peek() == Some(&&k) {
                    next_join.next();
                    let last = merged.last_mut().expect("a joined run has one before it");
                    last.units = run.end() - last.start;
                } else {
                    merged.push(*run);
                }
            }
            *extent_runs = merged;
        }
    }
    let mut plan = RetentionPlan::default();
    let mut free = Vec::new();
    for (held, extent_runs) in sorted.iter().zip(runs) {
        let extent = held.extent;
        let mut cursor = extent.start;
        for run in extent_runs {
            if run.start > cursor {
                free.push(RecordExtent::new(cursor, run.start - cursor));
            }
            cursor = run.end();
            plan.retained.push(HeldExtent {
                generation: held.generation,
                through_generation: held.through_generation,
                extent: run,
            });
        }
        if cursor < extent.end() {
            free.push(RecordExtent::new(cursor, extent.end() - cursor));
        }
    }
    plan.free = coalesce(free);
    Ok(plan)
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

    fn held(generation: u64, start: u64, units: u64) -> HeldExtent {
        HeldExtent { generation, through_generation: generation, extent: RecordExtent::new(start, units) }
    }

    /// FIG 41/42 with derived references: record A (units 10..20) leaves while B points at
    /// 12, 13 and 17: those are retained, the rest of A is freed. When B goes too (nothing
    /// referenced) the retained units are freed.
    #[test]
    fn referenced_units_are_retained_and_freed_with_the_last_reference() {
        let plan = plan_retention(&[held(4, 10, 10)], &[3, 12, 13, 17, 40], 16).unwrap();
        assert_eq!(plan.retained, vec![held(4, 12, 2), held(4, 17, 1)]);
        assert_eq!(plan.free, vec![RecordExtent::new(10, 2), RecordExtent::new(14, 3), RecordExtent::new(18, 2)]);
        assert_eq!(plan.retained_units() + plan.freed_units(), 10, "every unit kept or freed, once");

        let later = plan_retention(&plan.retained, &[17], 16).unwrap();
        assert_eq!(later.retained, vec![held(4, 17, 1)]);
        assert_eq!(later.free, vec![RecordExtent::new(12, 2)]);
        let last = plan_retention(&later.retained, &[], 16).unwrap();
        assert!(last.retained.is_empty());
        assert_eq!(last.free, vec![RecordExtent::new(17, 1)]);
    }

    #[test]
    fn retained_extents_are_bounded_by_joining_the_smallest_gaps() {
        // 12 isolated referenced units: gaps of 1 except one gap of 5.
        let referenced: Vec<u64> = (0..12).map(|k| if k < 6 { 2 * k } else { 2 * k + 4 }).collect();
        let exact = plan_retention(&[held(1, 0, 40)], &referenced, 100).unwrap();
        assert_eq!(exact.retained.len(), 12, "room enough: exactly the referenced units");
        assert_eq!(exact.retained_units(), 12);
        let plan = plan_retention(&[held(1, 0, 40)], &referenced, 2).unwrap();
        assert_eq!(plan.retained, vec![held(1, 0, 11), held(1, 16, 11)], "the gap of 5 stays free");
        for address in &referenced {
            assert!(plan.retained.iter().any(|h| h.extent.contains(*address)), "unit {address} kept");
            assert!(!plan.free.iter().any(|e| e.contains(*address)), "unit {address} not freed");
        }
        assert_eq!(plan.retained_units() + plan.freed_units(), 40);
        // Two held extents with references need two entries at least.
        assert_eq!(
            plan_retention(&[held(1, 0, 4), held(2, 10, 4)], &[1, 11], 1),
            Err(PlanError::TooManyRetained { needed: 2, max: 1 })
        );
    }

    #[test]
    fn free_extents_coalesce_across_held_extents_and_overlap_is_refused() {
        let plan = plan_retention(&[held(1, 0, 4), held(2, 4, 4)], &[], 0).unwrap();
        assert_eq!(plan.free, vec![RecordExtent::new(0, 8)]);
        assert_eq!(
            plan_retention(&[held(1, 0, 4), held(2, 3, 4)], &[], 0),
            Err(PlanError::HeldOverlap { first: 0, second: 3 })
        );
    }
}
