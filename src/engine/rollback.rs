//! Rollback: the base goes back to the image of an earlier generation, and the rollback is
//! itself a generation, so it can be undone by rolling back to the one before it.
//!
//! 1. Host writes submitted from now on wait (they belong after the rollback); the sort
//!    finishes the generation it is sorting and starts no other, so the backup is exactly the
//!    backup generation's image while the rollback reads it.
//! 2. A marker seals the current state: generation P, the rollback's undo point.
//! 3. Every block some generation after the target changed — the union of the history records
//!    from the target on and of the sealed generations after it — is read back as it was in
//!    the target (seed 001 FIG 13/14: the oldest record ≥ target holding the block, else the
//!    backup; for a target still in the journal, its newest journal element, else the backup)
//!    and written to the volume through the ordinary write path: journaled in the open
//!    generation, base last, nothing bypassed.
//! 4. A marker seals the rolled-back state as generation R; host writes go on after it.
//!
//! A crash in the middle leaves P sealed and some of the blocks rewritten in the open
//! generation: the volume is consistent (every acknowledged host write before the rollback is
//! in P), and the rollback can simply be run again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::Poll;

use crate::core::element_map::{ElementMap, ADDRESS_MASK};
use crate::core::format::records::SortState;
use crate::core::plan::walk_first_hits;

use super::io::{run_bounded, ControlIo, Role};
use super::marker;
use super::merge::{live_records, read_record_map, take_maintenance_lock};
use super::volume::{generation_list, HostRef, MarkerHandle, SharedRef, INTERNAL_TAG};
use super::{EngineError, HostRequest};

/// Blocks read and rewritten at once.
const IN_FLIGHT: usize = 32;

pub(crate) async fn run_rollback(
    shared: SharedRef,
    io: ControlIo<HostRef>,
    target: u64,
    comment: String,
    barrier: u64,
    handle: MarkerHandle,
) {
    marker::wait_for_turn(&shared, barrier).await;
    let result = rollback(&shared, &io, target, comment, barrier).await;
    marker::end_turn(&shared, barrier);
    let released = shared.borrow_mut().read_holds.pop_front();
    assert_eq!(released, Some(barrier), "rollbacks release their reads in call order");
    {
        let mut s = shared.borrow_mut();
        if s.sort_paused {
            s.sort_paused = false;
            // Taken right after the pause (errors before it return earlier).
            s.maintenance_running = false;
        }
        if matches!(result, Err(EngineError::Io(_))) {
            s.failed.get_or_insert(format!("rollback failed: {:?}", result.as_ref().err()));
        }
    }
    handle.set(result);
}

/// `target` is a generation whose image the volume holds (sealed, backup, or the first of a
/// history record).
pub(crate) fn check_restorable(shared: &SharedRef, target: u64) -> Result<(), EngineError> {
    let s = shared.borrow();
    let generations = generation_list(&s.meta);
    match generations.iter().find(|g| g.generation <= target && target <= g.through_generation) {
        Some(g) if g.generation == target && g.state != "open" => Ok(()),
        Some(g) if g.state == "open" => Err(EngineError::Invalid(format!(
            "generation {target} is the open generation; roll back to a sealed one (mark first to keep its writes)"
        ))),
        Some(g) => Err(EngineError::Invalid(format!(
            "generation {target} was merged into generations {}..={}; only {} of them can be restored",
            g.generation, g.through_generation, g.generation
        ))),
        None => Err(EngineError::Invalid(format!(
            "generation {target} is not held by this volume (it holds {})",
            describe(&generations)
        ))),
    }
}

fn describe(generations: &[crate::engine::GenerationInfo]) -> String {
    match (generations.first(), generations.iter().rev().find(|g| g.state != "open")) {
        (Some(first), Some(last)) => format!("generations {}..={}", first.generation, last.generation),
        _ => "no sealed generation".into(),
    }
}

/// A sort stopped between batches of a generation (its catalog commit not done): the backup is
/// part old, part new until it resumes.
fn interrupted_sort(meta: &super::meta::Meta) -> bool {
    meta.cursor.state == SortState::Running && meta.cursor.generation > meta.history_catalog.backup_generation
}

/// Where a block's content in the target image is.
#[derive(Debug, Clone, Copy)]
enum Content {
    /// Address in the record whose control block is at `control`, flags included (a
    /// compressed record's shared addresses are history units, its own logical ones).
    History {
        control: u64,
        address: u64,
    },
    Journal(u64),
    Backup,
}

async fn rollback(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    target: u64,
    comment: String,
    barrier: u64,
) -> Result<u64, EngineError> {
    if comment.len() >= crate::core::format::catalog::COMMENT_BYTES || comment.contains('\0') {
        return Err(EngineError::Invalid(format!(
            "a rollback comment is at most {} bytes of UTF-8 without NUL",
            crate::core::format::catalog::COMMENT_BYTES - 1
        )));
    }
    check_restorable(shared, target)?;
    {
        // Two seals: the undo point and the result (the second must not be refused after
        // the rewrite).
        let s = shared.borrow();
        let limit = s.meta.options.max_online_generations as usize;
        if s.meta.sealed.len() + 3 > limit {
            return Err(EngineError::TooManyGenerations { count: s.meta.sealed.len(), limit: limit - 1 });
        }
    }

    // 2. The undo point: the current state, sealed (the host's writes are held since the
    //    call; the sort still runs, so writes waiting for journal space drain).
    let undo = marker::mark(shared, io, format!("before rollback to {target}"), barrier).await?;

    // 1. The sort finishes the generation it is on and starts no other; then no merge or
    //    deletion runs either (one that the sort waits for would otherwise never end).
    // A sort interrupted by a restart resumes first (it is between batches of a generation).
    std::future::poll_fn(|_| {
        let mut s = shared.borrow_mut();
        let resumable = interrupted_sort(&s.meta)
            && !s.sort_running
            && s.options.sort.automatic
            && s.sort_error.is_none()
            && s.failed.is_none()
            && !s.stopping;
        if resumable {
            return Poll::Pending;
        }
        s.sort_paused = true;
        Poll::Ready(())
    })
    .await;
    std::future::poll_fn(|_| if shared.borrow().sort_running { Poll::Pending } else { Poll::Ready(()) }).await;
    if interrupted_sort(&shared.borrow().meta) {
        shared.borrow_mut().sort_paused = false;
        let error = shared.borrow().sort_error.clone().unwrap_or_else(|| "interrupted".into());
        return Err(EngineError::Invalid(format!(
            "the sort stopped in the middle of a generation ({error}); it must finish before a rollback"
        )));
    }
    take_maintenance_lock(shared).await;
    check_restorable(shared, target)?;

    // 3. The target image's content of every block changed since.
    let (backup, unit, blocks_per_unit) = {
        let s = shared.borrow();
        (s.meta.history_catalog.backup_generation, s.meta.unit_bytes() as usize, s.meta.blocks_per_unit(0))
    };
    let mut changed: BTreeMap<u64, Content> = BTreeMap::new();
    if target < backup {
        let records: Vec<_> = live_records(shared).into_iter().filter(|r| r.through_generation >= target).collect();
        if records.first().is_none_or(|r| r.generation != target)
            || records.windows(2).any(|w| w[1].generation != w[0].through_generation + 1)
        {
            return Err(EngineError::Invalid(format!(
                "generation {target} cannot be restored (it was merged away or deleted)"
            )));
        }
        let mut maps = Vec::with_capacity(records.len());
        for record in &records {
            maps.push(read_record_map(shared, io, record).await?);
        }
        let refs: Vec<&ElementMap> = maps.iter().map(|m| &**m).collect();
        let volume_blocks = shared.borrow().meta.shape.volume_blocks;
        // FIG 13: the oldest record ≥ target holding a block wins (the record is kept: a
        // compressed one reads through its frames).
        walk_first_hits(&refs, volume_blocks, |block, index, raw| {
            changed.insert(block, Content::History { control: records[index].control_start, address: raw });
        });
        // Every sealed generation (the undo point included) changed its blocks after the target.
        let s = shared.borrow();
        for sealed in &s.meta.sealed {
            for block in &sealed.blocks {
                changed.entry(*block).or_insert(Content::Backup);
            }
        }
    } else {
        let s = shared.borrow();
        if target != backup && !s.meta.sealed.iter().any(|g| g.generation == target) {
            return Err(EngineError::Invalid(format!(
                "generation {target} is not a generation of this volume (the newest sealed one is {})",
                s.meta.sealed.back().map_or(backup, |g| g.generation)
            )));
        }
        // Blocks of the generations after the target read from the target's newest journal
        // element of them, else the backup.
        let mut target_content: BTreeMap<u64, u64> = BTreeMap::new();
        for sealed in s.meta.sealed.iter().filter(|g| g.generation <= target) {
            for (block, segment) in sealed.elements() {
                target_content.insert(block, segment);
            }
        }
        for sealed in s.meta.sealed.iter().filter(|g| g.generation > target) {
            for block in &sealed.blocks {
                let content = target_content.get(block).map_or(Content::Backup, |segment| Content::Journal(*segment));
                changed.insert(*block, content);
            }
        }
    }

    // The sort is paused, so the journal must hold every rewritten block.
    let free = shared.borrow().meta.ring.free();
    if changed.len() as u64 > free {
        return Err(EngineError::NoSpace(format!(
            "the rollback rewrites {} blocks and the journal has room for {free} now; let the sort catch up (or enlarge the journal) and retry, or restore generation {target} to a new volume (only the undo point, generation {undo}, was sealed)",
            changed.len()
        )));
    }

    // Rewrite them through the write path, a bounded number at a time.
    let mut blocks = changed.into_iter().peekable();
    let mut next_tag = INTERNAL_TAG;
    while blocks.peek().is_some() {
        let batch: Vec<(u64, Content)> = blocks.by_ref().take(IN_FLIGHT).collect();
        // The batch's image-N contents are read at once, then written in block order.
        // (block, device, lba, or (control, logical unit) of a compressed record).
        type Source = (u64, Role, u64, Option<(u64, u64)>);
        let sources: Vec<Source> = {
            let s = shared.borrow();
            batch
                .iter()
                .map(|(block, content)| match content {
                    Content::History { control, address }
                        if super::compress::through_frames(s.meta.compression.is_compressed(*control), *address) =>
                    {
                        (*block, Role::History, 0, Some((*control, *address)))
                    }
                    Content::History { address, .. } => {
                        (*block, Role::History, s.meta.history_lba(*address & ADDRESS_MASK), None)
                    }
                    Content::Journal(segment) => (*block, Role::Journal, s.meta.segment_lba(*segment), None),
                    Content::Backup => (*block, Role::Backup, s.meta.volume_lba(2, *block), None),
                })
                .collect()
        };
        let reads = sources.iter().map(|(_, role, lba, compressed)| async move {
            match compressed {
                Some((control, address)) => {
                    let bytes = super::compress::read_element(shared, io, *control, *address).await?;
                    let mut buffer = io.alloc(Role::History, unit);
                    buffer.as_mut_slice().copy_from_slice(&bytes);
                    Ok(crate::device::IoBuffers::single(buffer))
                }
                None => Ok::<_, EngineError>(io.read(*role, *lba, unit).await?),
            }
        });
        let contents = run_bounded(reads, IN_FLIGHT).await?;
        let mut tags = Vec::with_capacity(batch.len());
        {
            let mut s = shared.borrow_mut();
            for ((block, _, _, _), data) in sources.iter().zip(contents) {
                let tag = next_tag;
                next_tag += 1;
                s.internal_pending += 1;
                s.hot.enqueue_internal(
                    tag,
                    HostRequest::Write { offset_blocks: block * blocks_per_unit, buffers: Arc::new(data) },
                    // The rollback's writes are one step in sequence order, at its barrier: after
                    // the undo point (sealed through barrier − 1), before the host's held writes.
                    barrier,
                );
                tags.push(tag);
            }
        }
        // The volume's poll starts them and routes their completions here.
        let results = std::future::poll_fn(|_| {
            let mut s = shared.borrow_mut();
            if tags.iter().all(|t| s.internal_done.contains_key(t)) {
                Poll::Ready(tags.iter().map(|t| s.internal_done.remove(t).expect("checked")).collect::<Vec<_>>())
            } else {
                Poll::Pending
            }
        })
        .await;
        for result in results {
            result.map_err(|e| EngineError::Failed(format!("a rollback write failed: {e}")))?;
        }
    }

    // 4. The rolled-back state, sealed; the host's writes follow it.
    marker::mark(shared, io, comment, barrier).await
}
