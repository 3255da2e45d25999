//! Sort (seed 001 FIG 10, S10001–S10006): apply the oldest sealed generation g to the backup in
//! address order, saving each overwritten backup block (image g−1) copy-on-write into the next
//! contiguous unit of history record H(g−1).
//!
//! Crash safety: the sort works in batches of blocks in address order. A batch first saves the
//! backup blocks into history, flushes history and records `saved_through` in the sort cursor;
//! only then are the journal elements written to the backup and the backup flushed
//! (`applied_through` is recorded with the next cursor write). On resume, blocks in
//! `[applied_through, saved_through)` are re-applied (idempotent) and never re-saved — saving
//! them again would store the new data as history. Completion writes the record's control
//! block, then the history catalog (record live, backup generation g), then the journal catalog
//! (generation g dropped, its journal space freed); a crash between the catalogs is recognised
//! at open because the history catalog's backup generation already equals g.
//!
//! Host writes never touch what the sort reads: they go to the base and to the open
//! generation's segments, while the sort reads only the sealed generation's segments and the
//! backup.

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::core::checksum::crc32c;
use crate::core::element_map::{Addressing, ElementMap};
use crate::core::format::catalog::{CatalogEntry, EntryKind, EntryState};
use crate::core::format::control_block::ControlBlock;
use crate::core::format::records::{SortCursor, SortState};
use crate::core::plan::sort::{plan_sort, SortStep};
use crate::device::IoBuffers;

use super::io::{run_bounded, ControlIo, Role};
use super::meta::SealedGeneration;
use super::volume::{elapsed_us, update_history_catalog, write_journal_catalog, HostRef, SharedRef, SortProgress};
use super::{restore_volume, EngineError};
use crate::core::format::superblock::{JournalFullPolicy, JournalMode};

/// Sorts sealed generations oldest first until none is left or one fails.
pub(crate) async fn run_sorts(shared: SharedRef, io: ControlIo<HostRef>) {
    loop {
        let next = {
            let s = shared.borrow();
            if s.failed.is_some() || s.stopping || s.sort_paused {
                None
            } else {
                // Only a generation whose seal is durable: a power cut could otherwise undo
                // the seal after the sort had started on it.
                s.meta.sealed.front().filter(|g| g.durable).cloned()
            }
        };
        let Some(sealed) = next else { break };
        let started = Instant::now();
        let mut result = sort_generation(&shared, &io, sealed.clone()).await;
        // Journal-full policy "merge-oldest": the history makes room by giving up its oldest
        // generations, one at a time, rather than stopping the sort (and, once the journal
        // fills, the writes).
        while matches!(result, Err(EngineError::HistoryFull { .. } | EngineError::HistoryCatalogFull { .. }))
            && shared.borrow().meta.journal_full_policy() == JournalFullPolicy::MergeOldest
        {
            if super::merge::drop_oldest_for_space(&shared, &io).await.is_err() {
                break;
            }
            result = sort_generation(&shared, &io, sealed.clone()).await;
        }
        let mut s = shared.borrow_mut();
        s.control.sort_busy_us += elapsed_us(started);
        s.sort_progress = None;
        match result {
            Ok(()) => {}
            // Stopped between batches for a close: the cursor resumes it at the next open.
            Err(EngineError::Closing) => break,
            Err(error) => {
                s.sort_error = Some(error.to_string());
                break;
            }
        }
    }
    shared.borrow_mut().sort_running = false;
}

async fn write_cursor(shared: &SharedRef, io: &ControlIo<HostRef>, mut cursor: SortCursor) -> Result<(), EngineError> {
    let (slot, offset) = {
        let s = shared.borrow();
        cursor.sequence = s.meta.cursor.sequence + 1;
        let slot = 1 - s.meta.cursor_slot;
        (slot, s.meta.cursor_bytes(slot))
    };
    io.write_bytes(Role::History, offset, &cursor.encode(), true).await?;
    let mut s = shared.borrow_mut();
    s.meta.cursor = cursor;
    s.meta.cursor_slot = slot;
    Ok(())
}

/// Consecutive runs of `steps` by `key` (e.g. blocks next to each other on a device).
fn runs<'a>(steps: &'a [SortStep], key: impl Fn(&SortStep) -> u64 + 'a) -> impl Iterator<Item = &'a [SortStep]> + 'a {
    let mut rest = steps;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = 1;
        while end < rest.len() && key(&rest[end]) == key(&rest[end - 1]) + 1 {
            end += 1;
        }
        let (run, tail) = rest.split_at(end);
        rest = tail;
        Some(run)
    })
}

async fn sort_generation(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    sealed: SealedGeneration,
) -> Result<(), EngineError> {
    let generation = sealed.generation;
    let record = generation - 1;
    let (unit, blocks, options, backup_per_unit) = {
        let s = shared.borrow();
        debug_assert_eq!(s.meta.history_catalog.backup_generation, record, "generations are sorted in order");
        (s.meta.unit_bytes() as usize, s.meta.shape.volume_blocks, s.options.sort.clone(), s.meta.blocks_per_unit(2))
    };
    // "All" mode: the newest version of each block goes to the backup (seed 001 embodiment 4).
    let online = sealed.elements();
    let elements = online.len() as u64;

    // Extents: those of an interrupted sort of this generation, or new ones.
    let resumed = {
        let s = shared.borrow();
        (s.meta.cursor.state == SortState::Running && s.meta.cursor.generation == generation)
            .then(|| s.meta.cursor.clone())
    };
    {
        let s = shared.borrow();
        let catalog = &s.meta.history_catalog;
        // The sort adds a record (and, in "all" mode, a version record) to the catalog.
        let adds = if s.meta.mode() == JournalMode::All { 2 } else { 1 };
        if catalog.entries.len() + adds > catalog.capacity_entries as usize {
            return Err(EngineError::HistoryCatalogFull { generation, capacity: catalog.capacity_entries });
        }
    }
    let mut cursor = match resumed {
        Some(cursor) => cursor,
        None => {
            let extents = shared.borrow_mut().meta.allocate_record(generation, elements)?;
            let (history_extent, control_extent) = (extents.elements, extents.control);
            let cursor = SortCursor {
                sequence: 0,
                generation,
                record_generation: record,
                state: SortState::Running,
                saved_through: 0,
                applied_through: 0,
                history_start: history_extent.start,
                history_units: history_extent.units,
                control_start: control_extent.start,
                control_units: control_extent.units,
                elements_saved: 0,
            };
            write_cursor(shared, io, cursor.clone()).await?;
            cursor
        }
    };
    let plan = plan_sort(blocks, &online, cursor.history_start)
        .map_err(|e| EngineError::Damaged(format!("sort of generation {generation}: {e}")))?;
    let crc_of_segment: rustc_hash::FxHashMap<u64, u32> =
        (0..sealed.blocks.len()).map(|k| (sealed.element_start + k as u64, sealed.crcs[k])).collect();
    {
        let mut s = shared.borrow_mut();
        s.sort_progress = Some(SortProgress { generation, elements_done: 0, elements_total: elements });
        // FIG 20: R-VOL reads of the blocks saved so far go to the saved copies.
        s.sorting = Some(plan.history.clone());
    }

    let mut done = 0u64;
    let rate_start = Instant::now();
    for batch in plan.batches(options.batch_elements.max(1)) {
        if shared.borrow().stopping {
            // A batch boundary is a resumable point: everything before it is recorded in the
            // cursor (saved) or idempotent to redo (applied).
            return Err(EngineError::Closing);
        }
        let last = batch.last().expect("batches are not empty").block;
        // Save: backup blocks (image g−1) into the record's contiguous history units.
        let to_save: Vec<SortStep> = batch.iter().copied().filter(|s| s.block >= cursor.saved_through).collect();
        if !to_save.is_empty() {
            let reads = runs(&to_save, |s| s.block).map(|run| {
                let lba = run[0].block * backup_per_unit;
                let len = run.len() * unit;
                async move { io.read(Role::Backup, lba, len).await }
            });
            let buffers = run_bounded(reads, options.max_in_flight).await?;
            let segments: Vec<_> = buffers.into_iter().flat_map(IoBuffers::into_segments).collect();
            // Share candidates for later merges (embodiment 6 across records).
            super::dedup::note_stored(
                shared,
                to_save[0].history_address,
                segments.iter().flat_map(|s| s.as_slice().chunks(unit)),
            );
            let lba = shared.borrow().meta.history_lba(to_save[0].history_address);
            io.write(Role::History, lba, Arc::new(IoBuffers::from_segments(segments)), false).await?;
            io.flush(Role::History).await?;
            cursor.saved_through = last + 1;
            cursor.elements_saved += to_save.len() as u64;
            write_cursor(shared, io, cursor.clone()).await?;
            // R-VOL reads now go to the saved copies; those that started earlier on the
            // backup finish before the backup changes under them (FIG 20).
            restore_volume::fence(shared).await;
        }
        // Apply: journal elements of generation g onto the backup.
        let to_apply: Vec<SortStep> = batch.iter().copied().filter(|s| s.block >= cursor.applied_through).collect();
        if !to_apply.is_empty() {
            let reads = to_apply.iter().map(|step| {
                let (lba, expected) = {
                    let s = shared.borrow();
                    (s.meta.segment_lba(step.journal_segment), crc_of_segment[&step.journal_segment])
                };
                let block = step.block;
                async move {
                    let data = io.read(Role::Journal, lba, unit).await?;
                    let actual = crc32c(&data.to_vec());
                    if actual != expected {
                        return Err(EngineError::Damaged(format!(
                            "generation {generation}: the journal element of block {block} is damaged (crc32c {actual:#010x}, expected {expected:#010x}); the sort stopped"
                        )));
                    }
                    Ok(data)
                }
            });
            let elements_read = run_bounded(reads, options.max_in_flight).await?;
            let mut segments = elements_read.into_iter().flat_map(IoBuffers::into_segments);
            let mut writes = Vec::new();
            for run in runs(&to_apply, |s| s.block) {
                let run_buffers = IoBuffers::from_segments(segments.by_ref().take(run.len()).collect());
                writes.push(io.write(Role::Backup, run[0].block * backup_per_unit, Arc::new(run_buffers), false));
            }
            run_bounded(writes, options.max_in_flight).await?;
            io.flush(Role::Backup).await?;
            cursor.applied_through = last + 1;
        }
        done += batch.len() as u64;
        {
            let mut s = shared.borrow_mut();
            s.control.elements_sorted += batch.len() as u64;
            if let Some(progress) = s.sort_progress.as_mut() {
                progress.elements_done = done;
            }
        }
        if let Some(rate) = options.rate_limit_bytes_per_second {
            pace(rate_start, done * unit as u64, rate).await;
        }
    }

    // "All" mode: every version of the generation into the history, then the record's control
    // block, then the catalogs (the catalog write commits both records).
    let versions = write_versions(shared, io, &sealed).await?;
    let committed = commit(shared, io, &sealed, &cursor, &plan, versions.clone()).await;
    if let (Err(_), Some(versions)) = (&committed, &versions) {
        // Not owned by any catalog entry: free again (a reopen would find them free as well).
        shared.borrow_mut().meta.free_entry_extents(versions)?;
    }
    committed?;
    let control_start = cursor.control_start;
    {
        // Every R-VOL takes the record in as its newest (FIG 20).
        let mut s = shared.borrow_mut();
        let map = Arc::new(plan.history.clone());
        s.restores.sorted(record, control_start, &map);
        s.meta.record_maps.insert(control_start, record, map);
        s.sorting = None;
    }
    cursor.state = SortState::Idle;
    write_cursor(shared, io, cursor).await?;

    {
        let mut s = shared.borrow_mut();
        let meta = &mut s.meta;
        let done = meta.sealed.pop_front().expect("the sorted generation is the oldest");
        debug_assert_eq!(done.generation, generation);
        let (element_tail, page_tail) = match meta.sealed.front() {
            Some(next) => (next.element_start, next.page_start),
            None => (meta.open.element_start, meta.open.page_start),
        };
        meta.ring.release_to(element_tail);
        meta.pages.release_to(page_tail);
    }
    write_journal_catalog(shared, io).await?;
    let mut s = shared.borrow_mut();
    s.space_freed = true;
    s.retention_pending = true;
    s.control.generations_sorted += 1;
    Ok(())
}

/// Writes the record's control block and commits the sort with one history catalog write:
/// the backup's previous generation becomes record H(g−1), the backup entry names g, and in
/// "all" mode the version record of g joins them.
async fn commit(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    sealed: &SealedGeneration,
    cursor: &SortCursor,
    plan: &crate::core::plan::sort::SortPlan,
    versions: Option<CatalogEntry>,
) -> Result<(), EngineError> {
    let (generation, record) = (sealed.generation, sealed.generation - 1);
    let unit = shared.borrow().meta.unit_bytes() as usize;
    let elements = plan.history_units();
    let map = ElementMap::new(plan.history.bitmap().clone(), Addressing::Contiguous { first: cursor.history_start })
        .expect("contiguous maps have no table");
    debug_assert_eq!(&map, &plan.history);
    let control = ControlBlock { generation: record, through_generation: record, map }.encode();
    let lba = shared.borrow().meta.history_lba(cursor.control_start);
    let mut buffer = io.alloc(Role::History, control.len());
    buffer.as_mut_slice().copy_from_slice(&control);
    io.write(Role::History, lba, Arc::new(IoBuffers::single(buffer)), false).await?;
    io.flush(Role::History).await?;

    let (time_ns, comment, last_sequence) = (sealed.time_ns, sealed.comment.clone(), sealed.last_sequence);
    let (history_start, history_units, control_start, control_units) =
        (cursor.history_start, cursor.history_units, cursor.control_start, cursor.control_units);
    update_history_catalog(shared, io, move |catalog| {
        let previous = catalog
            .entries
            .iter()
            .position(|e| e.kind == EntryKind::Backup)
            .ok_or_else(|| EngineError::Damaged("the history catalog has no backup entry".into()))?;
        let backup = catalog.entries.remove(previous);
        let mut history = CatalogEntry::new(record, EntryKind::History, EntryState::Live);
        history.time_ns = backup.time_ns;
        history.last_sequence = backup.last_sequence;
        history.comment = backup.comment;
        history.element_start = history_start;
        history.element_count = history_units;
        history.control_start = control_start;
        history.control_count = control_units;
        history.blocks = elements;
        history.stored_bytes = elements * unit as u64;
        catalog.entries.push(history);
        let mut backup = CatalogEntry::new(generation, EntryKind::Backup, EntryState::Live);
        backup.time_ns = time_ns;
        backup.comment = comment;
        backup.last_sequence = last_sequence;
        backup.blocks = elements;
        catalog.entries.push(backup);
        catalog.entries.extend(versions);
        catalog.backup_generation = generation;
        Ok(())
    })
    .await
}

/// "All" mode (seed 001 embodiment 4): copies every version of the sealed generation, in
/// (block, sequence) order, from the journal into one contiguous history extent, and its
/// version table (FORMAT.md §8.1) behind it; returns the catalog entry that will own both.
/// Until the sort's catalog write adds it, nothing owns the units: a crash before leaves them
/// free and the resumed sort writes them again (the generation is still in the journal).
async fn write_versions(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    sealed: &SealedGeneration,
) -> Result<Option<CatalogEntry>, EngineError> {
    use crate::core::format::version_table::{VersionEntry, VersionTable};
    let generation = sealed.generation;
    if shared.borrow().meta.mode() != JournalMode::All {
        return Ok(None);
    }
    // Lost versions (a power cut took their journal write) are no restore targets.
    let mut order: Vec<usize> = (0..sealed.versions.len()).filter(|k| !sealed.versions[*k].lost).collect();
    order.sort_by_key(|k| (sealed.blocks[*k], sealed.versions[*k].sequence, *k));
    // One version per (block, sequence): the later element if a request wrote a block twice.
    let key = |k: usize| (sealed.blocks[k], sealed.versions[k].sequence);
    order = order
        .iter()
        .enumerate()
        .filter(|(i, k)| order.get(i + 1).is_none_or(|n| key(*n) != key(**k)))
        .map(|(_, k)| *k)
        .collect();
    let mut entry = CatalogEntry::new(generation, EntryKind::Versions, EntryState::Live);
    // The versions resolve targets up to the generation's cut, also once its image is merged
    // away (a generation without writes keeps an entry without units: its targets are image
    // g−1).
    entry.last_sequence = sealed.last_sequence;
    if order.is_empty() {
        return Ok(Some(entry));
    }
    let (unit, max_in_flight) = {
        let s = shared.borrow();
        (s.meta.unit_bytes(), s.options.sort.max_in_flight.max(1))
    };
    let count = order.len() as u64;
    let table_units = VersionTable::disk_bytes(count).div_ceil(unit);
    let extents =
        shared.borrow_mut().meta.allocate_record_extents("sort (versions)", generation, count, table_units)?;
    let entries: Vec<VersionEntry> = order
        .iter()
        .map(|k| VersionEntry {
            block: sealed.blocks[*k],
            sequence: sealed.versions[*k].sequence,
            time_ns: sealed.versions[*k].time_ns,
            crc: sealed.crcs[*k],
        })
        .collect();
    let written = async {
        for (batch, chunk) in order.chunks(max_in_flight.max(8)).enumerate() {
            let reads = chunk.iter().map(|k| {
                let (lba, expected, block) = {
                    let s = shared.borrow();
                    (s.meta.segment_lba(sealed.element_start + *k as u64), sealed.crcs[*k], sealed.blocks[*k])
                };
                async move {
                    let data = io.read(Role::Journal, lba, unit as usize).await?;
                    let actual = crc32c(&data.to_vec());
                    if actual != expected {
                        return Err(EngineError::Damaged(format!(
                            "generation {generation}: a journal version of block {block} is damaged (crc32c {actual:#010x}, expected {expected:#010x}); the sort stopped"
                        )));
                    }
                    Ok(data)
                }
            });
            let data = run_bounded(reads, max_in_flight).await?;
            let segments: Vec<_> = data.into_iter().flat_map(IoBuffers::into_segments).collect();
            let first = extents.elements.start + (batch * max_in_flight.max(8)) as u64;
            let lba = shared.borrow().meta.history_lba(first);
            io.write(Role::History, lba, Arc::new(IoBuffers::from_segments(segments)), false).await?;
        }
        let table = VersionTable {
            generation,
            cut_sequence: sealed.last_sequence,
            first_address: extents.elements.start,
            entries: entries.clone(),
        }
        .encode();
        let lba = shared.borrow().meta.history_lba(extents.control.start);
        let mut buffer = io.alloc(Role::History, table.len());
        buffer.as_mut_slice().copy_from_slice(&table);
        io.write(Role::History, lba, Arc::new(IoBuffers::single(buffer)), false).await?;
        io.flush(Role::History).await?;
        Ok::<(), EngineError>(())
    }
    .await;
    entry.first_sequence = entries.iter().map(|e| e.sequence).min().expect("not empty");
    entry.time_ns = entries.iter().map(|e| e.time_ns).min().expect("not empty");
    entry.last_time_ns = entries.iter().map(|e| e.time_ns).max().expect("not empty");
    entry.element_start = extents.elements.start;
    entry.element_count = extents.elements.units;
    entry.control_start = extents.control.start;
    entry.control_count = extents.control.units;
    entry.blocks = entries.windows(2).filter(|w| w[0].block != w[1].block).count() as u64 + 1;
    entry.stored_bytes = count * unit;
    if let Err(error) = written {
        shared.borrow_mut().meta.free_entry_extents(&entry)?;
        return Err(error);
    }
    shared.borrow_mut().control.versions_kept += count;
    Ok(Some(entry))
}

/// Waits until `bytes` moved since `start` fit within `rate` bytes per second.
async fn pace(start: Instant, bytes: u64, rate: u64) {
    let due = start + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
    std::future::poll_fn(|_| if Instant::now() >= due { Poll::Ready(()) } else { Poll::Pending }).await;
}
