//! Planners: pure functions that turn metadata into ordered steps for the engine.
//!
//! Each planner implements one procedure of seed 001 (US 9,164,941) and does no I/O: it reads
//! element maps (JNCBs) and returns the steps, in the order the engine must perform them, plus the
//! map the procedure leaves behind.
//!
//! | module | procedure | seed 001 |
//! |---|---|---|
//! | [`sort`] | apply a sealed generation to the backup, COW-saving history | FIG 10, S10001–10006 |
//! | [`merge`] | combine history records N..N+m, older element wins | FIG 11/12, S11001–11012 |
//! | [`dedup`] | content-hash index verified by byte compare | embodiment 6, FIG 39/40/31A–D |
//! | [`restore`] | R-VOL map: oldest record ≥ N wins, else the backup | FIG 13–15, S12001–12006 |
//! | [`delete`] | delete a generation's image, respecting dedup references | FIG 41/42 |
//! | [`memory`] | an in-memory executor of the plans, for tests and the demo | — |
//!
//! Vocabulary: H(g) is the history record that turns image(g+1) back into image(g). It is
//! produced by the sort of generation g+1, is contiguous and address-ordered. Records are always
//! passed **oldest first**.

pub mod dedup;
pub mod delete;
pub mod memory;
pub mod merge;
pub mod restore;
pub mod sort;

pub use dedup::{content_hash, ContentIndex, DedupDecision, DedupEntry, DedupIndex};
pub use delete::{
    plan_delete, plan_release, plan_retention, DeletePlan, HeldExtent, RecordExtent, RecordView, ReleasePlan,
    RetentionPlan,
};
pub use merge::{plan_merge, MergeOutput, MergePlan, MergeStep};
pub use restore::{plan_restore, RestoreMap, Source};
pub use sort::{plan_sort, plan_sort_all_mode, SortPlan, SortStep};

use super::bitmap::DifferenceBitmap;
use super::element_map::{Addressing, ElementMap, ADDRESS_MASK};

/// Why a plan cannot be made. Every variant names the blocks, addresses or counts involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("online element for block {block} lies beyond the volume of {blocks} blocks")]
    BlockOutOfRange { block: u64, blocks: u64 },
    #[error(
        "block {block} has two online elements (journal segments {first} and {second}); the latest \
         mode keeps one element per block"
    )]
    DuplicateBlock { block: u64, first: u64, second: u64 },
    #[error("block {block} has two online elements with the same sequence {sequence} (journal segments {first} and {second})")]
    DuplicateSequence { block: u64, sequence: u64, first: u64, second: u64 },
    #[error("{count} elements exceed the planner's limit of {limit} per plan")]
    TooManyElements { count: u64, limit: u64 },
    #[error("{count} elements from address {first} overflow the 56-bit address space")]
    AddressOverflow { first: u64, count: u64 },
    #[error("record {index} covers {found} blocks but the volume has {expected}")]
    VolumeMismatch { index: usize, found: u64, expected: u64 },
    #[error("a merge needs at least one record")]
    NoRecords,
    #[error("record {index} does not exist: there are {records} records")]
    NoSuchRecord { index: usize, records: usize },
    #[error("block {block} shares address {address}, which the dedup index does not hold")]
    DanglingShare { block: u64, address: u64 },
    #[error("block {block}'s element at address {address} lies outside its record's extent {start}+{units}")]
    OutsideExtent { block: u64, address: u64, start: u64, units: u64 },
    #[error("the record's extent {start}+{units} does not match its {owned} owned elements")]
    ExtentMismatch { owned: u64, start: u64, units: u64 },
    #[error("the record holds {held} references to address {address} but the dedup index counts only {counted}")]
    OverRelease { address: u64, held: u64, counted: u32 },
    #[error("dedup entry for address {address} appears twice")]
    DuplicateDedupAddress { address: u64 },
    #[error("dedup entry for address {address} has no references")]
    ZeroReferences { address: u64 },
    #[error("the dedup index holds no element at address {address}")]
    UnknownDedupAddress { address: u64 },
    #[error("the element at address {address} already has the maximum number of references")]
    TooManyReferences { address: u64 },
    #[error("held extents starting at units {first} and {second} overlap")]
    HeldOverlap { first: u64, second: u64 },
    #[error("{needed} retained extents are needed but the catalog has room for {max}")]
    TooManyRetained { needed: usize, max: usize },
}

/// Largest number of elements one plan handles: steps index with `u32` in the dense tables.
pub const PLAN_ELEMENTS_MAX: u64 = u32::MAX as u64 - 1;

/// Checks that `count` addresses from `first` stay within [`ADDRESS_MASK`].
fn check_address_range(first: u64, count: u64) -> Result<(), PlanError> {
    match first.checked_add(count) {
        Some(end) if end <= ADDRESS_MASK + 1 => Ok(()),
        _ => Err(PlanError::AddressOverflow { first, count }),
    }
}

/// Checks that every record covers a volume of `blocks` blocks.
fn check_volume(records: &[&ElementMap], blocks: u64) -> Result<(), PlanError> {
    for (index, record) in records.iter().enumerate() {
        if record.blocks() != blocks {
            return Err(PlanError::VolumeMismatch { index, found: record.blocks(), expected: blocks });
        }
    }
    Ok(())
}

/// Visits, in ascending block order, every block present in at least one of `records` (oldest
/// first) together with the **first** (oldest) record holding it and that record's raw address
/// (flags included).
///
/// This is the one walk behind both merge (FIG 11: older element wins) and restore (FIG 13: the
/// oldest record ≥ N wins). It runs a word (64 blocks) at a time: per word, each record takes the
/// bits no older record has taken; ranks are kept per record so addresses cost no rank lookups.
/// Cost: O(records × words + elements visited).
pub fn walk_first_hits(records: &[&ElementMap], blocks: u64, mut visit: impl FnMut(u64, usize, u64)) {
    debug_assert!(records.iter().all(|r| r.blocks() == blocks));
    let words: Vec<&[u64]> = records.iter().map(|r| r.bitmap().words()).collect();
    let word_count = usize::try_from(blocks.div_ceil(64)).expect("bitmap fits in memory");
    let mut ranks = vec![0u64; records.len()];
    // Per bit of the current word: (record index, raw address) of its winner.
    let mut winners = [(0usize, 0u64); 64];
    for word_index in 0..word_count {
        let mut covered = 0u64;
        for (record_index, record_words) in words.iter().enumerate() {
            let word = record_words[word_index];
            if word == 0 {
                continue;
            }
            let mut take = word & !covered;
            covered |= word;
            let rank_base = ranks[record_index];
            ranks[record_index] += u64::from(word.count_ones());
            while take != 0 {
                let bit = take.trailing_zeros();
                let rank = rank_base + u64::from((word & ((1u64 << bit) - 1)).count_ones());
                winners[bit as usize] = (record_index, raw_at(records[record_index].addressing(), rank));
                take &= take - 1;
            }
        }
        let block_base = word_index as u64 * 64;
        while covered != 0 {
            let bit = covered.trailing_zeros();
            let (record_index, raw) = winners[bit as usize];
            visit(block_base + u64::from(bit), record_index, raw);
            covered &= covered - 1;
        }
    }
}

/// Blocks present in any of `records`: the walk's output bitmap, built a word at a time.
fn union_of(records: &[&ElementMap], blocks: u64) -> DifferenceBitmap {
    let mut union = DifferenceBitmap::new(blocks);
    for record in records {
        union.union_with(record.bitmap());
    }
    union
}

/// Raw address (flags included) of the element at `rank`.
#[inline]
fn raw_at(addressing: &Addressing, rank: u64) -> u64 {
    match addressing {
        Addressing::Contiguous { first } => first + rank,
        Addressing::Explicit(table) => table[rank as usize],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(blocks: u64, set: &[u64], first: u64) -> ElementMap {
        let mut bitmap = DifferenceBitmap::new(blocks);
        for block in set {
            bitmap.set(*block);
        }
        ElementMap::new(bitmap, Addressing::Contiguous { first }).unwrap()
    }

    #[test]
    fn first_hit_walk_takes_the_oldest_record_per_block_in_block_order() {
        let old = map(200, &[3, 64, 130], 1000);
        let new = map(200, &[1, 3, 130, 199], 2000);
        let mut seen = Vec::new();
        walk_first_hits(&[&old, &new], 200, |block, record, raw| seen.push((block, record, raw)));
        assert_eq!(seen, vec![(1, 1, 2000), (3, 0, 1000), (64, 0, 1001), (130, 0, 1002), (199, 1, 2003)]);
    }

    #[test]
    fn address_range_stops_at_56_bits() {
        assert!(check_address_range(ADDRESS_MASK, 1).is_ok());
        assert_eq!(
            check_address_range(ADDRESS_MASK, 2),
            Err(PlanError::AddressOverflow { first: ADDRESS_MASK, count: 2 })
        );
    }
}
