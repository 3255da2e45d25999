//! Merge planning (seed 001 FIG 11/12, S11001–11012): combine history records N..N+m into one
//! record; on a block present in several records the **older** element wins (FIG 12: generation
//! N's "A" is kept, N+m's "G" is dropped). The merged record restores image(N); the images of
//! N+1..N+m are given up.
//!
//! The patent's walk (generation first, then address) leaves the output ordered by generation.
//! chronicle writes the output in block-address order instead, so a merged record is contiguous
//! *and* address-ordered like a sorted one: its map is `Contiguous` and reads of a restored range
//! stay sequential.
//!
//! With dedup (embodiment 6) some output elements are not written but shared, so the output is no
//! longer one element per unit: [`MergeOutput`] builds that map (`Explicit`) step by step while the
//! engine decides store-or-share per element with a [`DedupIndex`](super::DedupIndex).

use super::{check_address_range, check_volume, union_of, walk_first_hits, PlanError, PLAN_ELEMENTS_MAX};
use crate::core::bitmap::DifferenceBitmap;
use crate::core::element_map::{Addressing, ElementMap, ADDRESS_MASK, ADDRESS_SHARED};

/// One element of the merged record: copy the element at `source` (raw address: flags included;
/// strip them with [`ADDRESS_MASK`] to read) of `records[record_index]` to `output_address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeStep {
    pub block: u64,
    pub source: u64,
    pub record_index: usize,
    /// Where the element goes without dedup: `output_first + k` for the k-th step.
    pub output_address: u64,
}

impl MergeStep {
    /// Source address with flags stripped: where to read the element.
    pub fn source_address(&self) -> u64 {
        self.source & ADDRESS_MASK
    }
}

/// The merge of several records into one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergePlan {
    /// Ascending by block, one per block present in any record.
    pub steps: Vec<MergeStep>,
    /// Map of the merged record without dedup: `Contiguous { first: output_first }`.
    pub merged: ElementMap,
}

impl MergePlan {
    /// Output units the merged record occupies without dedup.
    pub fn output_units(&self) -> u64 {
        self.steps.len() as u64
    }

    /// The steps in runs of at most `max` (the engine's in-flight limit), in block order.
    pub fn batches(&self, max: usize) -> impl Iterator<Item = &[MergeStep]> {
        assert!(max > 0, "a merge batch holds at least one step");
        self.steps.chunks(max)
    }
}

/// Plans the merge of `records` (oldest first, all over one volume) into one contiguous record
/// at `output_first..`. Older wins.
pub fn plan_merge(records: &[&ElementMap], output_first: u64) -> Result<MergePlan, PlanError> {
    let first = records.first().ok_or(PlanError::NoRecords)?;
    let blocks = first.blocks();
    check_volume(records, blocks)?;
    let bitmap = union_of(records, blocks);
    let units = bitmap.count_ones();
    if units > PLAN_ELEMENTS_MAX {
        return Err(PlanError::TooManyElements { count: units, limit: PLAN_ELEMENTS_MAX });
    }
    check_address_range(output_first, units)?;
    let mut steps = Vec::with_capacity(units as usize);
    walk_first_hits(records, blocks, |block, record_index, source| {
        let output_address = output_first + steps.len() as u64;
        steps.push(MergeStep { block, source, record_index, output_address });
    });
    debug_assert_eq!(steps.len() as u64, units);
    let merged = ElementMap::new(bitmap, Addressing::Contiguous { first: output_first })
        .expect("a contiguous map needs no table");
    Ok(MergePlan { steps, merged })
}

/// Builds the map of a merged record written with dedup: stored elements take the next
/// contiguous output unit, shared elements point at an existing element with
/// [`ADDRESS_SHARED`] set. Blocks must arrive strictly ascending (the order of
/// [`MergePlan::steps`]).
#[derive(Debug, Clone)]
pub struct MergeOutput {
    bitmap: DifferenceBitmap,
    table: Vec<u64>,
    output_first: u64,
    stored: u64,
    shared: u64,
    last_block: Option<u64>,
}

impl MergeOutput {
    pub fn new(blocks: u64, output_first: u64) -> Self {
        assert!(output_first <= ADDRESS_MASK, "output address {output_first} beyond 56 bits");
        MergeOutput {
            bitmap: DifferenceBitmap::new(blocks),
            table: Vec::new(),
            output_first,
            stored: 0,
            shared: 0,
            last_block: None,
        }
    }

    fn admit(&mut self, block: u64) {
        if let Some(last) = self.last_block {
            assert!(block > last, "merge output blocks must be strictly ascending: {block} after {last}");
        }
        self.last_block = Some(block);
        self.bitmap.set(block);
    }

    /// Records `block` as stored and returns the output address to write its element to.
    pub fn store(&mut self, block: u64) -> u64 {
        let address = self.output_first + self.stored;
        assert!(address <= ADDRESS_MASK, "output address {address} beyond 56 bits");
        self.admit(block);
        self.stored += 1;
        self.table.push(address);
        address
    }

    /// Records `block` as sharing the element stored at `address` (flags are ignored).
    pub fn share(&mut self, block: u64, address: u64) {
        self.admit(block);
        self.shared += 1;
        self.table.push((address & ADDRESS_MASK) | ADDRESS_SHARED);
    }

    /// Units written so far: the record's extent is `output_first .. output_first + stored()`.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Elements shared instead of written.
    pub fn shared(&self) -> u64 {
        self.shared
    }

    pub fn output_first(&self) -> u64 {
        self.output_first
    }

    /// The merged record's map (`Explicit`).
    pub fn finish(self) -> ElementMap {
        ElementMap::new(self.bitmap, Addressing::Explicit(self.table)).expect("one table entry per admitted block")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(blocks: u64, set: &[u64], first: u64) -> ElementMap {
        let mut bitmap = DifferenceBitmap::new(blocks);
        for block in set {
            bitmap.set(*block);
        }
        ElementMap::new(bitmap, Addressing::Contiguous { first }).unwrap()
    }

    /// FIG 12: generation N holds "A" at block 0, generation N+m holds "G" at block 0 and others;
    /// the merge keeps A and drops G.
    #[test]
    fn fig12_older_element_wins() {
        let generation_n = record(8, &[0, 2], 100); // A at 100 (block 0), B at 101 (block 2)
        let generation_n1 = record(8, &[1, 2], 200); // block 2 also here: dropped
        let generation_nm = record(8, &[0, 5], 300); // G at 300 (block 0): dropped
        let plan = plan_merge(&[&generation_n, &generation_n1, &generation_nm], 1000).unwrap();
        let got: Vec<_> = plan.steps.iter().map(|s| (s.block, s.source, s.record_index, s.output_address)).collect();
        assert_eq!(got, vec![(0, 100, 0, 1000), (1, 200, 1, 1001), (2, 101, 0, 1002), (5, 301, 2, 1003)]);
        assert_eq!(plan.merged.addressing(), &Addressing::Contiguous { first: 1000 });
        assert_eq!(plan.merged.address_of(5), Some(1003));
        assert_eq!(plan.output_units(), 4);
    }

    #[test]
    fn shared_sources_keep_their_flag_in_the_step() {
        let mut bitmap = DifferenceBitmap::new(4);
        bitmap.set(1);
        let shared = ElementMap::new(bitmap, Addressing::Explicit(vec![77 | ADDRESS_SHARED])).unwrap();
        let plan = plan_merge(&[&shared], 0).unwrap();
        assert_eq!(plan.steps[0].source, 77 | ADDRESS_SHARED);
        assert_eq!(plan.steps[0].source_address(), 77);
    }

    #[test]
    fn merge_refuses_no_records_and_mixed_volumes() {
        assert_eq!(plan_merge(&[], 0).unwrap_err(), PlanError::NoRecords);
        let a = record(8, &[1], 0);
        let b = record(9, &[1], 0);
        assert_eq!(
            plan_merge(&[&a, &b], 0).unwrap_err(),
            PlanError::VolumeMismatch { index: 1, found: 9, expected: 8 }
        );
    }

    #[test]
    fn merge_output_mixes_stored_and_shared_elements() {
        let mut output = MergeOutput::new(16, 40);
        assert_eq!(output.store(2), 40);
        output.share(3, 40);
        assert_eq!(output.store(9), 41);
        assert_eq!((output.stored(), output.shared()), (2, 1));
        let map = output.finish();
        assert_eq!(map.iter().collect::<Vec<_>>(), vec![(2, 40), (3, 40 | ADDRESS_SHARED), (9, 41)]);
        assert_eq!(map.address_of(3), Some(40));
    }

    #[test]
    #[should_panic(expected = "strictly ascending")]
    fn merge_output_refuses_blocks_out_of_order() {
        let mut output = MergeOutput::new(16, 0);
        output.store(5);
        output.store(5);
    }
}
