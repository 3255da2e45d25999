//! Sort planning (seed 001 FIG 10, S10001–10006): apply a sealed generation's online elements to
//! the backup in block-address order, COW-saving each overwritten backup block to the next
//! contiguous unit of the new history record.
//!
//! Sealing generation g+1 and sorting it produces H(g): for every block written in g+1, image(g)'s
//! content, stored contiguously and address-ordered, so its map needs no address table
//! ([`Addressing::Contiguous`]).
//!
//! Per step the engine must (1) copy `backup[block]` to `history_address`, and only then (2) copy
//! the journal segment to `backup[block]`. Steps are independent across blocks, so the engine may
//! issue a batch of them at once ([`SortPlan::batches`]); within one block the order is the
//! COW-before-write rule that keeps an interrupted sort recoverable and concurrent R-VOLs correct
//! (FIG 20).
//!
//! Planning cost: the online elements arrive in journal order, not block order. The planner needs
//! the generation's bitmap anyway (it is the history record's bitmap), so it sets the bits first,
//! builds the map's rank index, and then drops every element straight into its slot: the k-th
//! set bit's step is `steps[k]`, and k is the block's rank (O(1) through the rank index). No
//! comparison sort and no per-block table: O(blocks / 64 + elements), with the bitmap as the only
//! volume-sized structure. (`benches/plan.rs` compares it with a comparison sort.)

use super::{check_address_range, PlanError, PLAN_ELEMENTS_MAX};
use crate::core::bitmap::DifferenceBitmap;
use crate::core::element_map::{Addressing, ElementMap};

/// One block of the sort: COW-save `backup[block]` to `history_address`, then write journal
/// segment `journal_segment` to `backup[block]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortStep {
    pub block: u64,
    pub journal_segment: u64,
    pub history_address: u64,
}

/// The sort of one sealed generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortPlan {
    /// Ascending by block; `steps[k].history_address == history_first + k`.
    pub steps: Vec<SortStep>,
    /// Map of the history record the sort writes: H(g), `Contiguous { first: history_first }`.
    pub history: ElementMap,
    /// Blocks whose backup content the sort replaces (the generation's difference bitmap, equal
    /// to `history`'s bitmap); the engine clears the online bits from it as steps complete.
    pub applied: DifferenceBitmap,
}

impl SortPlan {
    /// The steps in runs of at most `max` (the engine's in-flight limit), in block order.
    pub fn batches(&self, max: usize) -> impl Iterator<Item = &[SortStep]> {
        assert!(max > 0, "a sort batch holds at least one step");
        self.steps.chunks(max)
    }

    /// History units the record occupies: `history_first .. history_first + units`.
    pub fn history_units(&self) -> u64 {
        self.steps.len() as u64
    }
}

/// How the planner puts elements into block order. Exposed for the benchmark only.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortStrategy {
    /// Bitmap, rank index, then each element straight into its rank's slot (the default).
    Rank,
    /// Comparison sort of the elements (the benchmark's and the tests' reference).
    ComparisonSort,
}

/// Plans the sort of a sealed generation kept in the *latest* mode (one online element per block,
/// FIG 8 step 8004). `online` holds `(block, journal segment)` in any order; a block listed twice
/// is an error. History units are numbered from `history_first`.
pub fn plan_sort(blocks: u64, online: &[(u64, u64)], history_first: u64) -> Result<SortPlan, PlanError> {
    plan_sort_with(SortStrategy::Rank, blocks, online, history_first)
}

/// [`plan_sort`] with a chosen strategy. Exposed for the benchmark only.
#[doc(hidden)]
pub fn plan_sort_with(
    strategy: SortStrategy,
    blocks: u64,
    online: &[(u64, u64)],
    history_first: u64,
) -> Result<SortPlan, PlanError> {
    let element = |index: usize| Element { block: online[index].0, segment: online[index].1, index };
    plan(strategy, blocks, online.len(), element, history_first, &|block, kept, other| {
        Err(PlanError::DuplicateBlock { block, first: online[kept].1, second: online[other].1 })
    })
}

/// Plans the sort of a sealed generation kept in the *all* mode (seed 001 embodiment 4, "All":
/// every write appended). `online` holds `(block, journal segment, sequence)`; per block the
/// element with the highest sequence is applied and the others are skipped (FIG 28, option 1).
/// Two elements of one block with the same sequence are an error.
pub fn plan_sort_all_mode(blocks: u64, online: &[(u64, u64, u64)], history_first: u64) -> Result<SortPlan, PlanError> {
    plan_sort_all_mode_with(SortStrategy::Rank, blocks, online, history_first)
}

/// [`plan_sort_all_mode`] with a chosen strategy. Exposed for tests and the benchmark only.
#[doc(hidden)]
pub fn plan_sort_all_mode_with(
    strategy: SortStrategy,
    blocks: u64,
    online: &[(u64, u64, u64)],
    history_first: u64,
) -> Result<SortPlan, PlanError> {
    let element = |index: usize| Element { block: online[index].0, segment: online[index].1, index };
    plan(strategy, blocks, online.len(), element, history_first, &|block, kept, other| {
        let (kept_sequence, other_sequence) = (online[kept].2, online[other].2);
        match kept_sequence.cmp(&other_sequence) {
            std::cmp::Ordering::Greater => Ok(Keep::Kept),
            std::cmp::Ordering::Less => Ok(Keep::Other),
            std::cmp::Ordering::Equal => Err(PlanError::DuplicateSequence {
                block,
                sequence: kept_sequence,
                first: online[kept].1,
                second: online[other].1,
            }),
        }
    })
}

#[derive(Debug, Clone, Copy)]
struct Element {
    block: u64,
    segment: u64,
    /// Position in the caller's slice, for the conflict rule.
    index: usize,
}

/// Which of two elements of one block to apply.
enum Keep {
    Kept,
    Other,
}

/// Decides between the element already kept for a block and another one (indices into the
/// caller's slice).
type Conflict<'a> = dyn Fn(u64, usize, usize) -> Result<Keep, PlanError> + 'a;

fn plan(
    strategy: SortStrategy,
    blocks: u64,
    count: usize,
    element: impl Fn(usize) -> Element,
    history_first: u64,
    conflict: &Conflict<'_>,
) -> Result<SortPlan, PlanError> {
    let count_u64 = count as u64;
    if count_u64 > PLAN_ELEMENTS_MAX {
        return Err(PlanError::TooManyElements { count: count_u64, limit: PLAN_ELEMENTS_MAX });
    }
    check_address_range(history_first, count_u64)?;
    let (history, steps) = match strategy {
        SortStrategy::Rank => order_by_rank(blocks, count, element, history_first, conflict)?,
        SortStrategy::ComparisonSort => order_by_comparison(blocks, count, element, history_first, conflict)?,
    };
    debug_assert!(steps.windows(2).all(|pair| pair[0].block < pair[1].block));
    debug_assert_eq!(history.len(), steps.len() as u64);
    let applied = history.bitmap().clone();
    Ok(SortPlan { steps, history, applied })
}

fn check_block(block: u64, blocks: u64) -> Result<(), PlanError> {
    if block >= blocks {
        return Err(PlanError::BlockOutOfRange { block, blocks });
    }
    Ok(())
}

fn contiguous(bitmap: DifferenceBitmap, history_first: u64) -> ElementMap {
    ElementMap::new(bitmap, Addressing::Contiguous { first: history_first }).expect("a contiguous map needs no table")
}

/// Pass 1 sets the bits; the map's rank index then gives each block its slot; pass 2 fills the
/// slots. Only when a block repeats does it keep, per slot, which element holds it.
fn order_by_rank(
    blocks: u64,
    count: usize,
    element: impl Fn(usize) -> Element,
    history_first: u64,
    conflict: &Conflict<'_>,
) -> Result<(ElementMap, Vec<SortStep>), PlanError> {
    let mut bitmap = DifferenceBitmap::new(blocks);
    let mut repeats = false;
    for index in 0..count {
        let block = element(index).block;
        check_block(block, blocks)?;
        repeats |= bitmap.set(block);
    }
    let history = contiguous(bitmap, history_first);
    let unset = SortStep { block: u64::MAX, journal_segment: 0, history_address: 0 };
    let mut steps = vec![unset; history.len() as usize];
    // Index (into the caller's slice) of the element holding each slot; only with repeats.
    let mut kept: Vec<u32> = if repeats { vec![u32::MAX; steps.len()] } else { Vec::new() };
    for index in 0..count {
        let Element { block, segment, .. } = element(index);
        let rank = history.rank_of(block).expect("pass 1 set every block");
        let slot = &mut steps[rank as usize];
        if repeats {
            let holder = &mut kept[rank as usize];
            if *holder != u32::MAX {
                if let Keep::Kept = conflict(block, *holder as usize, index)? {
                    continue;
                }
            }
            *holder = index as u32;
        }
        *slot = SortStep { block, journal_segment: segment, history_address: history_first + rank };
    }
    Ok((history, steps))
}

/// Comparison sort of the elements by (block, position), then one pass resolving repeats.
fn order_by_comparison(
    blocks: u64,
    count: usize,
    element: impl Fn(usize) -> Element,
    history_first: u64,
    conflict: &Conflict<'_>,
) -> Result<(ElementMap, Vec<SortStep>), PlanError> {
    let mut sorted = Vec::with_capacity(count);
    for index in 0..count {
        let element = element(index);
        check_block(element.block, blocks)?;
        sorted.push(element);
    }
    sorted.sort_unstable_by_key(|element| (element.block, element.index));
    let mut bitmap = DifferenceBitmap::new(blocks);
    let mut steps: Vec<SortStep> = Vec::with_capacity(count);
    let mut kept_index = 0usize;
    for element in sorted {
        if let Some(last) = steps.last_mut().filter(|last| last.block == element.block) {
            if let Keep::Other = conflict(element.block, kept_index, element.index)? {
                last.journal_segment = element.segment;
                kept_index = element.index;
            }
            continue;
        }
        bitmap.set(element.block);
        kept_index = element.index;
        let history_address = history_first + steps.len() as u64;
        steps.push(SortStep { block: element.block, journal_segment: element.segment, history_address });
    }
    Ok((contiguous(bitmap, history_first), steps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strategies() -> [SortStrategy; 2] {
        [SortStrategy::Rank, SortStrategy::ComparisonSort]
    }

    #[test]
    fn steps_are_block_ordered_and_history_is_contiguous() {
        let online = [(9u64, 100u64), (2, 101), (5, 102), (0, 103)];
        for strategy in strategies() {
            let plan = plan_sort_with(strategy, 10, &online, 500).unwrap();
            let got: Vec<_> = plan.steps.iter().map(|s| (s.block, s.journal_segment, s.history_address)).collect();
            assert_eq!(got, vec![(0, 103, 500), (2, 101, 501), (5, 102, 502), (9, 100, 503)], "{strategy:?}");
            assert_eq!(plan.history.addressing(), &Addressing::Contiguous { first: 500 });
            assert_eq!(plan.history.address_of(5), Some(502));
            assert_eq!(plan.applied.iter_ones().collect::<Vec<_>>(), vec![0, 2, 5, 9]);
            assert_eq!(plan.history_units(), 4);
        }
    }

    #[test]
    fn latest_mode_refuses_two_elements_for_one_block() {
        for strategy in strategies() {
            let error = plan_sort_with(strategy, 10, &[(3, 7), (4, 8), (3, 9)], 0).unwrap_err();
            assert_eq!(error, PlanError::DuplicateBlock { block: 3, first: 7, second: 9 }, "{strategy:?}");
        }
    }

    #[test]
    fn blocks_beyond_the_volume_are_refused() {
        for strategy in strategies() {
            let error = plan_sort_with(strategy, 10, &[(10, 1)], 0).unwrap_err();
            assert_eq!(error, PlanError::BlockOutOfRange { block: 10, blocks: 10 });
        }
    }

    #[test]
    fn all_mode_applies_the_newest_sequence_per_block() {
        // Block 4 written three times; the newest (sequence 9, segment 22) must win whatever the
        // order the elements are listed in.
        let online = [(4u64, 20u64, 3u64), (1, 21, 4), (4, 22, 9), (4, 23, 5)];
        for strategy in strategies() {
            let plan = plan_sort_all_mode_with(strategy, 8, &online, 0).unwrap();
            let got: Vec<_> = plan.steps.iter().map(|s| (s.block, s.journal_segment)).collect();
            assert_eq!(got, vec![(1, 21), (4, 22)], "{strategy:?}");
        }
    }

    #[test]
    fn all_mode_refuses_equal_sequences() {
        for strategy in strategies() {
            let error = plan_sort_all_mode_with(strategy, 8, &[(4, 20, 3), (4, 21, 3)], 0).unwrap_err();
            assert_eq!(error, PlanError::DuplicateSequence { block: 4, sequence: 3, first: 20, second: 21 });
        }
    }

    #[test]
    fn batches_cover_every_step_once() {
        let online: Vec<(u64, u64)> = (0..10).map(|b| (b * 3, b)).collect();
        let plan = plan_sort(30, &online, 0).unwrap();
        let batches: Vec<_> = plan.batches(4).collect();
        assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
        assert_eq!(batches.concat(), plan.steps);
    }

    #[test]
    fn an_empty_generation_sorts_to_an_empty_record() {
        let plan = plan_sort(64, &[], 7).unwrap();
        assert!(plan.steps.is_empty());
        assert!(plan.history.is_empty());
    }

    #[test]
    fn history_addresses_must_fit_56_bits() {
        let error = plan_sort(4, &[(0, 0), (1, 1)], crate::core::element_map::ADDRESS_MASK).unwrap_err();
        assert!(matches!(error, PlanError::AddressOverflow { count: 2, .. }));
    }
}

#[cfg(test)]
mod strategy_tests {
    use super::*;
    use proptest::prelude::*;

    /// Equal plans, or the same kind of error (the two may name different offending blocks).
    fn same_outcome(a: Result<SortPlan, PlanError>, b: Result<SortPlan, PlanError>) -> Result<(), TestCaseError> {
        match (a, b) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => prop_assert_eq!(std::mem::discriminant(&a), std::mem::discriminant(&b)),
            (a, b) => prop_assert!(false, "outcomes differ: {:?} vs {:?}", a, b),
        }
        Ok(())
    }

    proptest! {
        /// Rank placement and a comparison sort plan the same sort, in both modes.
        #[test]
        fn rank_placement_matches_a_comparison_sort(
            blocks in 1u64..300,
            raw in proptest::collection::vec((0u64..300, 0u64..4), 0..200),
            history_first in 0u64..1000,
        ) {
            let all: Vec<(u64, u64, u64)> =
                raw.iter().enumerate().map(|(i, (b, s))| (b % blocks, i as u64, s * 1000 + i as u64)).collect();
            let rank = plan_sort_all_mode_with(SortStrategy::Rank, blocks, &all, history_first);
            let comparison = plan_sort_all_mode_with(SortStrategy::ComparisonSort, blocks, &all, history_first);
            same_outcome(rank, comparison)?;
            let latest: Vec<(u64, u64)> = all.iter().map(|(b, s, _)| (*b, *s)).collect();
            let rank = plan_sort_with(SortStrategy::Rank, blocks, &latest, history_first);
            let comparison = plan_sort_with(SortStrategy::ComparisonSort, blocks, &latest, history_first);
            same_outcome(rank, comparison)?;
        }
    }
}
