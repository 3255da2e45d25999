//! Model test of the planners (sort, merge, dedup, restore, delete) executed by the in-memory
//! executor against a plain model: a `Vec<Token>` image per live generation.
//!
//! A random history of host writes, markers (seal + sort), merges of adjacent records (with and
//! without dedup, with a real or a deliberately weak hash), and deletions of generations' images
//! runs step by step. After every step:
//! - every live generation restores exactly its model image (FIG 13/14);
//! - the backup equals the newest sorted image;
//! - the history area holds exactly the units live records reference (no leak, no dangling unit);
//! - the dedup index counts exactly the live references to each stored element, and each
//!   indexed element is still stored;
//! - an R-VOL map built before a sort and extended with the sort's record (FIG 20) still restores
//!   its image.
//!
//! Dedup never shares different contents: the executor refuses such a share (byte compare plus a
//! token check), and the weak hash makes different tokens collide on purpose.
//! On failure proptest shrinks to, and prints, the shortest failing history.

use std::collections::{BTreeMap, HashMap, HashSet};

use chronicle::core::element_map::{ElementMap, ADDRESS_MASK};
use chronicle::core::plan::memory::{MemoryStores, MergedRecord, Token};
use chronicle::core::plan::{
    content_hash, plan_delete, plan_merge, plan_release, plan_restore, plan_sort, plan_sort_all_mode, DedupIndex,
    DeletePlan, MergePlan, RecordExtent, RecordView,
};
use proptest::prelude::*;

/// One step of a history. Indices are taken modulo what exists when the step runs.
#[derive(Debug, Clone)]
enum Step {
    Write { block: u64, token: Token },
    Marker,
    Merge { at: usize, span: usize, dedup: bool },
    Delete { pick: usize, dedup: bool },
}

/// How the dedup merges hash contents.
#[derive(Debug, Clone, Copy)]
enum HashKind {
    /// xxh3-128.
    Content,
    /// Three buckets: different tokens collide, so only the byte compare keeps them apart.
    Weak,
}

impl HashKind {
    fn hash(self, bytes: &[u8]) -> u128 {
        match self {
            HashKind::Content => content_hash(bytes),
            HashKind::Weak => u128::from(bytes[0] % 3),
        }
    }
}

#[derive(Debug)]
struct Record {
    /// The generation whose image this record restores (from the next record's, or the backup).
    restores: u64,
    map: ElementMap,
    extent: RecordExtent,
}

/// The system under test: stores, records, dedup index, open generation's journal.
struct System {
    blocks: u64,
    all_mode: bool,
    hash: HashKind,
    stores: MemoryStores,
    index: DedupIndex,
    records: Vec<Record>,
    backup_generation: u64,
    /// Latest mode: block → journal segment.
    online_latest: BTreeMap<u64, u64>,
    /// All mode: (block, segment, sequence).
    online_all: Vec<(u64, u64, u64)>,
    next_segment: u64,
    next_history: u64,
}

/// The reference: images of live generations and the host's current view.
struct Model {
    images: BTreeMap<u64, Vec<Token>>,
    primary: Vec<Token>,
}

impl System {
    fn new(blocks: u64, all_mode: bool, hash: HashKind) -> Self {
        System {
            blocks,
            all_mode,
            hash,
            stores: MemoryStores::new(blocks),
            index: DedupIndex::new(),
            records: Vec::new(),
            backup_generation: 0,
            online_latest: BTreeMap::new(),
            online_all: Vec::new(),
            next_segment: 0,
            next_history: 0,
        }
    }

    fn write(&mut self, block: u64, token: Token) {
        if !self.all_mode {
            if let Some(segment) = self.online_latest.get(&block) {
                // FIG 8 step 8004: the block is already in the open generation; overwrite.
                self.stores.journal.insert(*segment, token);
                return;
            }
        }
        let segment = self.next_segment;
        self.next_segment += 1;
        self.stores.journal.insert(segment, token);
        if self.all_mode {
            // Sequences are the segment numbers, listed newest first to exercise the rule.
            self.online_all.insert(0, (block, segment, segment));
        } else {
            self.online_latest.insert(block, segment);
        }
    }

    /// Seals the open generation and sorts it: returns the new record's map.
    fn marker(&mut self) -> Result<(), TestCaseError> {
        let plan = if self.all_mode {
            plan_sort_all_mode(self.blocks, &self.online_all, self.next_history)
        } else {
            // Journal order is not block order: hand the planner the elements by segment.
            let mut online: Vec<(u64, u64)> = self.online_latest.iter().map(|(b, s)| (*b, *s)).collect();
            online.sort_by_key(|(_, segment)| std::cmp::Reverse(*segment));
            plan_sort(self.blocks, &online, self.next_history)
        }
        .map_err(fail)?;
        self.stores.apply_sort(&plan).map_err(fail)?;
        let extent = RecordExtent::new(self.next_history, plan.history_units());
        self.next_history += plan.history_units();
        self.records.push(Record { restores: self.backup_generation, map: plan.history, extent });
        self.backup_generation += 1;
        self.online_latest.clear();
        self.online_all.clear();
        self.stores.journal.clear();
        Ok(())
    }

    fn execute_merge(&mut self, plan: &MergePlan, dedup: bool) -> Result<MergedRecord, TestCaseError> {
        let output_first = self.next_history;
        let merged = if dedup {
            let hash = self.hash;
            self.stores.apply_merge_dedup(plan, output_first, &mut self.index, &move |bytes| hash.hash(bytes))
        } else {
            self.stores.apply_merge(plan)
        }
        .map_err(fail)?;
        prop_assert_eq!(merged.extent.start, output_first);
        self.next_history += merged.extent.units;
        Ok(merged)
    }

    /// Releases records that no image needs any more, one after the other.
    fn release(&mut self, released: Vec<Record>) -> Result<(), TestCaseError> {
        for record in released {
            let view = RecordView { map: &record.map, extent: record.extent };
            let plan = plan_release(&view, &self.index).map_err(fail)?;
            self.stores.apply_release(&plan, &mut self.index).map_err(fail)?;
        }
        Ok(())
    }

    /// Merges records `first..=last` into one that restores `records[first]`'s image.
    fn merge(&mut self, first: usize, last: usize, dedup: bool) -> Result<Vec<u64>, TestCaseError> {
        let maps: Vec<&ElementMap> = self.records[first..=last].iter().map(|r| &r.map).collect();
        let plan = plan_merge(&maps, self.next_history).map_err(fail)?;
        let merged = self.execute_merge(&plan, dedup)?;
        let restores = self.records[first].restores;
        let sources: Vec<Record> =
            self.records.splice(first..=last, [Record { restores, map: merged.map, extent: merged.extent }]).collect();
        let given_up = sources[1..].iter().map(|r| r.restores).collect();
        self.release(sources)?;
        Ok(given_up)
    }

    /// Deletes the image that `records[index]` restores; returns that generation.
    fn delete(&mut self, index: usize, dedup: bool) -> Result<u64, TestCaseError> {
        let generation = self.records[index].restores;
        let views: Vec<RecordView> =
            self.records.iter().map(|r| RecordView { map: &r.map, extent: r.extent }).collect();
        let plan = plan_delete(&views, index, &self.index, self.next_history).map_err(fail)?;
        match plan {
            DeletePlan::FreeOldest(release) => {
                prop_assert_eq!(index, 0);
                self.stores.apply_release(&release, &mut self.index).map_err(fail)?;
                self.records.remove(0);
            }
            DeletePlan::MergeIntoPrevious { previous, merge } => {
                prop_assert_eq!(previous + 1, index);
                let merged = self.execute_merge(&merge, dedup)?;
                let restores = self.records[previous].restores;
                let sources: Vec<Record> = self
                    .records
                    .splice(previous..=index, [Record { restores, map: merged.map, extent: merged.extent }])
                    .collect();
                self.release(sources)?;
            }
        }
        Ok(generation)
    }

    fn maps_from(&self, index: usize) -> Vec<&ElementMap> {
        self.records[index..].iter().map(|r| &r.map).collect()
    }

    fn check(&self, model: &Model) -> Result<(), TestCaseError> {
        // The live generations are the records' plus the backup's.
        let live: Vec<u64> = self.records.iter().map(|r| r.restores).chain([self.backup_generation]).collect();
        prop_assert_eq!(&live, &model.images.keys().copied().collect::<Vec<_>>());
        prop_assert_eq!(&self.stores.backup, &model.images[&self.backup_generation], "backup ≠ newest sorted image");

        // Every live generation restores exactly.
        for (index, &generation) in live.iter().enumerate() {
            let map = plan_restore(&self.maps_from(index), self.blocks).map_err(fail)?;
            let image = self.stores.restore_image(&map).map_err(fail)?;
            prop_assert_eq!(&image, &model.images[&generation], "generation {} restores wrongly", generation);
        }

        // History holds exactly the referenced units; the index counts exactly the references.
        let mut references: HashMap<u64, u32> = HashMap::new();
        for record in &self.records {
            for (_, raw) in record.map.iter() {
                *references.entry(raw & ADDRESS_MASK).or_default() += 1;
            }
        }
        let stored: HashSet<u64> = self.stores.history.keys().copied().collect();
        let referenced: HashSet<u64> = references.keys().copied().collect();
        prop_assert_eq!(&stored, &referenced, "history units ≠ referenced units");
        let mut saved = 0u64;
        for entry in self.index.entries() {
            prop_assert_eq!(
                references.get(&entry.address).copied().unwrap_or(0),
                entry.references,
                "dedup index miscounts address {}",
                entry.address
            );
            saved += u64::from(entry.references - 1);
        }
        prop_assert_eq!(self.index.saved_elements(), saved);
        Ok(())
    }
}

fn fail(error: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(error.to_string())
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..64, 0u64..5).prop_map(|(block, token)| Step::Write { block, token }),
        3 => Just(Step::Marker),
        1 => (0usize..64, 0usize..64, any::<bool>()).prop_map(|(at, span, dedup)| Step::Merge { at, span, dedup }),
        1 => (0usize..64, any::<bool>()).prop_map(|(pick, dedup)| Step::Delete { pick, dedup }),
    ]
}

fn run(blocks: u64, all_mode: bool, hash: HashKind, steps: &[Step]) -> Result<(), TestCaseError> {
    let mut system = System::new(blocks, all_mode, hash);
    let mut model =
        Model { images: BTreeMap::from([(0, vec![0; blocks as usize])]), primary: vec![0; blocks as usize] };
    for step in steps {
        match *step {
            Step::Write { block, token } => {
                let block = block % blocks;
                system.write(block, token);
                model.primary[block as usize] = token;
            }
            Step::Marker => {
                // FIG 20: R-VOL maps built before the sort, extended with the sort's record after.
                let before: Vec<_> = (0..=system.records.len())
                    .map(|index| plan_restore(&system.maps_from(index), blocks).map(|map| (index, map)))
                    .collect::<Result<_, _>>()
                    .map_err(fail)?;
                system.marker()?;
                model.images.insert(system.backup_generation, model.primary.clone());
                let newest = &system.records.last().expect("the sort added a record").map;
                for (index, mut map) in before {
                    map.extend_with_newer(newest).map_err(fail)?;
                    let generation = system.records[index].restores;
                    let image = system.stores.restore_image(&map).map_err(fail)?;
                    prop_assert_eq!(&image, &model.images[&generation], "R-VOL of {} broken by the sort", generation);
                }
            }
            Step::Merge { at, span, dedup } => {
                let records = system.records.len();
                if records < 2 {
                    continue;
                }
                let first = at % (records - 1);
                let last = first + 1 + span % (records - first - 1);
                for generation in system.merge(first, last, dedup)? {
                    model.images.remove(&generation);
                }
            }
            Step::Delete { pick, dedup } => {
                if system.records.is_empty() {
                    continue;
                }
                let generation = system.delete(pick % system.records.len(), dedup)?;
                model.images.remove(&generation);
            }
        }
        system.check(&model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Scenario: any history of writes, markers, merges and deletions; every live generation
    /// restores exactly, after every step.
    #[test]
    fn every_live_generation_restores_exactly(
        blocks in 1u64..20,
        all_mode in any::<bool>(),
        weak_hash in any::<bool>(),
        steps in proptest::collection::vec(step(), 0..96),
    ) {
        let hash = if weak_hash { HashKind::Weak } else { HashKind::Content };
        run(blocks, all_mode, hash, &steps)?;
    }
}

/// Scenario: the same zero block saved by many sorts is stored once after a dedup merge, and the
/// saving survives deleting the oldest image.
#[test]
fn dedup_across_generations_stores_repeated_contents_once() {
    let blocks = 8;
    let mut steps = Vec::new();
    for block in 0..blocks {
        steps.push(Step::Write { block, token: 1 + block % 2 });
        steps.push(Step::Marker);
    }
    steps.push(Step::Merge { at: 0, span: 100, dedup: true });
    let mut system = System::new(blocks, false, HashKind::Content);
    let mut model = Model { images: BTreeMap::from([(0, vec![0; 8])]), primary: vec![0; 8] };
    for step in &steps {
        match *step {
            Step::Write { block, token } => {
                system.write(block, token);
                model.primary[block as usize] = token;
            }
            Step::Marker => {
                system.marker().unwrap();
                model.images.insert(system.backup_generation, model.primary.clone());
            }
            Step::Merge { .. } => {
                let last = system.records.len() - 1;
                for generation in system.merge(0, last, true).unwrap() {
                    model.images.remove(&generation);
                }
            }
            Step::Delete { .. } => unreachable!(),
        }
        system.check(&model).unwrap();
    }
    // Eight history elements, all token 0 (the initial image): one stored, seven shared.
    assert_eq!(system.records.len(), 1);
    assert_eq!(system.records[0].extent.units, 1);
    assert_eq!(system.index.saved_elements(), 7);
    assert_eq!(system.stores.history.len(), 1);
}

/// Scenario: with a three-bucket hash, different contents always collide, and byte compares
/// keep them apart; restores stay exact.
#[test]
fn weak_hash_collisions_never_share_different_contents() {
    let mut steps = Vec::new();
    for round in 0..4u64 {
        for block in 0..6 {
            steps.push(Step::Write { block, token: (block + round) % 5 });
        }
        steps.push(Step::Marker);
    }
    steps.push(Step::Merge { at: 0, span: 1, dedup: true });
    steps.push(Step::Merge { at: 0, span: 100, dedup: true });
    steps.push(Step::Delete { pick: 0, dedup: true });
    run(6, false, HashKind::Weak, &steps).unwrap();
}
