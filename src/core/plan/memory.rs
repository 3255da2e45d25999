//! An in-memory executor of the plans: the backup, the history area and the journal as maps of
//! *tokens* (a `u64` standing for a block's contents). It performs each plan's steps in the order
//! the engine must, checks every read hits a written unit, and never shares contents that differ.
//! Tests drive it against a model of volume images; the demo can use it to show the planners
//! without devices.

use std::collections::HashMap;

use super::dedup::{DedupDecision, DedupIndex};
use super::delete::{RecordExtent, ReleasePlan};
use super::merge::{MergeOutput, MergePlan};
use super::restore::{RestoreMap, Source};
use super::sort::SortPlan;
use super::PlanError;
use crate::core::element_map::{Addressing, ElementMap};

/// Contents of one block, abstracted to a number.
pub type Token = u64;

/// The bytes that stand for a token, for hashing and byte compares.
pub fn token_bytes(token: Token) -> [u8; 8] {
    token.to_le_bytes()
}

/// Why the executor could not apply a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error("journal segment {segment} (block {block}) holds no element")]
    MissingJournalSegment { segment: u64, block: u64 },
    #[error("history unit {address} (block {block}) holds no element")]
    MissingHistoryUnit { address: u64, block: u64 },
    #[error("history unit {address} (block {block}) is already in use")]
    HistoryUnitInUse { address: u64, block: u64 },
    #[error("history unit {address} is freed but was not in use")]
    FreeingUnusedUnit { address: u64 },
    #[error("block {block} would share unit {address} holding token {stored} for token {offered}")]
    SharedDifferentContents { block: u64, address: u64, stored: Token, offered: Token },
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// A record written by a merge: its map and the units it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedRecord {
    pub map: ElementMap,
    pub extent: RecordExtent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryStores {
    /// One token per block: the newest sorted image.
    pub backup: Vec<Token>,
    /// History unit → token.
    pub history: HashMap<u64, Token>,
    /// Journal segment → token (online elements).
    pub journal: HashMap<u64, Token>,
}

impl MemoryStores {
    /// A volume of `blocks` blocks whose backup holds token 0 everywhere.
    pub fn new(blocks: u64) -> Self {
        MemoryStores {
            backup: vec![0; usize::try_from(blocks).expect("volume fits in memory")],
            history: HashMap::new(),
            journal: HashMap::new(),
        }
    }

    fn history_at(&self, address: u64, block: u64) -> Result<Token, MemoryError> {
        self.history.get(&address).copied().ok_or(MemoryError::MissingHistoryUnit { address, block })
    }

    fn write_history(&mut self, address: u64, block: u64, token: Token) -> Result<(), MemoryError> {
        if self.history.insert(address, token).is_some() {
            return Err(MemoryError::HistoryUnitInUse { address, block });
        }
        Ok(())
    }

    /// FIG 10: per step, COW-save the backup block to history, then apply the online element.
    pub fn apply_sort(&mut self, plan: &SortPlan) -> Result<(), MemoryError> {
        for step in &plan.steps {
            let online = *self
                .journal
                .get(&step.journal_segment)
                .ok_or(MemoryError::MissingJournalSegment { segment: step.journal_segment, block: step.block })?;
            let saved = self.backup[step.block as usize];
            self.write_history(step.history_address, step.block, saved)?;
            self.backup[step.block as usize] = online;
        }
        Ok(())
    }

    /// FIG 11 without dedup: copy every winning element to its contiguous output unit.
    pub fn apply_merge(&mut self, plan: &MergePlan) -> Result<MergedRecord, MemoryError> {
        for step in &plan.steps {
            let token = self.history_at(step.source_address(), step.block)?;
            self.write_history(step.output_address, step.block, token)?;
        }
        let start = match plan.merged.addressing() {
            Addressing::Contiguous { first } => *first,
            Addressing::Explicit(_) => unreachable!("plan_merge writes contiguous maps"),
        };
        Ok(MergedRecord { map: plan.merged.clone(), extent: RecordExtent::new(start, plan.output_units()) })
    }

    /// FIG 11 with dedup (embodiment 6, S11020/11021): per winning element, hash its bytes with
    /// `hash`, offer it to `index` (byte compare against each candidate), then either store it at
    /// the next output unit from `output_first` or share the candidate.
    pub fn apply_merge_dedup(
        &mut self,
        plan: &MergePlan,
        output_first: u64,
        index: &mut DedupIndex,
        hash: &dyn Fn(&[u8]) -> u128,
    ) -> Result<MergedRecord, MemoryError> {
        let mut output = MergeOutput::new(plan.merged.blocks(), output_first);
        for step in &plan.steps {
            let token = self.history_at(step.source_address(), step.block)?;
            let bytes = token_bytes(token);
            let content_hash = hash(&bytes);
            for candidate in index.lookup(content_hash) {
                self.history_at(candidate, step.block)?;
            }
            match index.offer(content_hash, &bytes, |address| token_bytes(self.history[&address])) {
                DedupDecision::Store => {
                    let address = output.store(step.block);
                    self.write_history(address, step.block, token)?;
                    index.insert(content_hash, address)?;
                }
                DedupDecision::Share(address) => {
                    let stored = self.history_at(address, step.block)?;
                    if stored != token {
                        return Err(MemoryError::SharedDifferentContents {
                            block: step.block,
                            address,
                            stored,
                            offered: token,
                        });
                    }
                    output.share(step.block, address);
                    index.add_reference(address)?;
                }
            }
        }
        let extent = RecordExtent::new(output.output_first(), output.stored());
        Ok(MergedRecord { map: output.finish(), extent })
    }

    /// Applies a release: drops the record's references, then frees the units.
    pub fn apply_release(&mut self, plan: &ReleasePlan, index: &mut DedupIndex) -> Result<(), MemoryError> {
        plan.apply_releases(index)?;
        for extent in &plan.free {
            for address in extent.start..extent.end() {
                if self.history.remove(&address).is_none() {
                    return Err(MemoryError::FreeingUnusedUnit { address });
                }
            }
        }
        Ok(())
    }

    /// FIG 14: a restored block reads its history unit, or the backup.
    pub fn read_restored(&self, map: &RestoreMap, block: u64) -> Result<Token, MemoryError> {
        match map.source(block) {
            Source::History(address) => self.history_at(address, block),
            Source::Backup => Ok(self.backup[block as usize]),
        }
    }

    /// The whole restored image.
    pub fn restore_image(&self, map: &RestoreMap) -> Result<Vec<Token>, MemoryError> {
        (0..map.blocks()).map(|block| self.read_restored(map, block)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::plan::{content_hash, plan_merge, plan_restore, plan_sort};

    /// Two generations over a 4-block volume: sort each, restore both, merge with dedup.
    #[test]
    fn sort_restore_and_merge_in_memory() {
        let mut stores = MemoryStores::new(4);
        // Generation 1 writes 7 to blocks 0 and 2.
        stores.journal.extend([(0, 7), (1, 7)]);
        let sort1 = plan_sort(4, &[(2, 1), (0, 0)], 0).unwrap();
        stores.apply_sort(&sort1).unwrap();
        // Generation 2 writes 9 to block 0 and 3.
        stores.journal.extend([(2, 9), (3, 9)]);
        let sort2 = plan_sort(4, &[(0, 2), (3, 3)], 10).unwrap();
        stores.apply_sort(&sort2).unwrap();
        assert_eq!(stores.backup, vec![9, 0, 7, 9]);

        let h0 = &sort1.history;
        let h1 = &sort2.history;
        let image0 = stores.restore_image(&plan_restore(&[h0, h1], 4).unwrap()).unwrap();
        let image1 = stores.restore_image(&plan_restore(&[h1], 4).unwrap()).unwrap();
        assert_eq!(image0, vec![0, 0, 0, 0]);
        assert_eq!(image1, vec![7, 0, 7, 0]);

        let merge = plan_merge(&[h0, h1], 20).unwrap();
        let mut index = DedupIndex::new();
        let merged = stores.apply_merge_dedup(&merge, 20, &mut index, &content_hash).unwrap();
        // H(0) ∪ H(1) = blocks 0, 2, 3, all holding token 0: one stored, two shared.
        assert_eq!(merged.extent, RecordExtent::new(20, 1));
        assert_eq!(index.saved_elements(), 2);
        let image0 = stores.restore_image(&plan_restore(&[&merged.map], 4).unwrap()).unwrap();
        assert_eq!(image0, vec![0, 0, 0, 0]);
    }
}
