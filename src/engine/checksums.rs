//! Deferred element checksums (FORMAT.md §9.1). A rewrite in the open generation does not
//! checksum its data: it leaves its entry's crc32c *pending* (write.rs), so a block rewritten
//! many times in a generation costs one checksum, not one per write. Pending elements are read
//! back from the journal and checksummed
//!
//! - by the marker, with writes drained and held, for whatever is still pending
//!   ([`checksum_pending`]): every sealed generation's crcs match its elements;
//! - ahead of it once the volume has had no host I/O for [`QUIET_POLLS`] polls in a row
//!   ([`run_idle`]): under the unit locks of the blocks it reads (host writes to them wait, as
//!   for a bitmap resync), a step at a time, stopping when host I/O arrives or a marker is set,
//!   so a marker after a busy period has little left to read while it holds writes.

use super::io::{run_bounded, ControlIo, Role};
use super::volume::{HostRef, Shared, SharedRef};
use super::write::crc_of;
#[cfg(doc)]
use super::write::QUIET_POLLS;
use super::EngineError;

/// Elements per journal read (128 KiB at 4 KiB).
const RUN_UNITS: u64 = 32;
/// Reads in flight at once (at most 2 MiB of buffers at 4 KiB).
const IN_FLIGHT: usize = 16;
/// Elements per step of the idle task: between steps it looks for host I/O and markers.
const IDLE_STEP: usize = 256;

/// Checksums every pending element; the caller (the marker) has drained and holds writes, so
/// nothing writes these elements meanwhile. On an error the entries stay pending (the volume
/// is failed then; a reopen recomputes every crc of the open generation from the base).
pub(crate) async fn checksum_pending(shared: &SharedRef, io: &ControlIo<HostRef>) -> Result<(), EngineError> {
    let entries = shared.borrow_mut().meta.open.crc_pending.drain_sorted();
    let count = entries.len() as u64;
    checksum_entries(shared, io, &entries).await?;
    shared.borrow_mut().control.marker_checksum_reads += count;
    Ok(())
}

/// Should the volume start the idle checksum task now?
pub(crate) fn idle_wanted(s: &Shared) -> bool {
    idle_due(s) && s.hot.quiet()
}

/// The idle checksum task will start once the host has been quiet for a while
/// ([`HotPath::quiet`](super::write::HotPath::quiet)): the volume is not idle yet.
pub(crate) fn idle_due(s: &Shared) -> bool {
    !s.meta.open.crc_pending.is_empty() && !s.checksums_running && nothing_else_wants(s)
}

/// Nothing else wants the volume: no host operation in flight or queued, no marker or
/// rollback waiting, not closing or failed.
fn nothing_else_wants(s: &Shared) -> bool {
    s.hot.outstanding() == 0 && s.holds.is_empty() && !s.stopping && s.failed.is_none()
}

/// The next step may run: nothing else wants the volume and the host has been quiet.
fn may_step(s: &Shared) -> bool {
    nothing_else_wants(s) && s.hot.quiet()
}

/// Checksums pending elements while the volume is idle, [`IDLE_STEP`] at a time.
pub(crate) async fn run_idle(shared: SharedRef, io: ControlIo<HostRef>) {
    loop {
        let step = pick_step(&shared);
        if step.is_empty() {
            break;
        }
        let entries: Vec<usize> = step.iter().map(|(entry, _)| *entry).collect();
        let result = checksum_entries(&shared, &io, &entries).await;
        let mut s = shared.borrow_mut();
        for (_, block) in &step {
            s.hot.unlock_unit(*block);
        }
        match result {
            Ok(()) => s.control.idle_checksum_reads += entries.len() as u64,
            Err(error) => {
                s.failed.get_or_insert(format!("reading journal elements back to checksum them failed: {error}"));
                break;
            }
        }
    }
    shared.borrow_mut().checksums_running = false;
}

/// Takes up to [`IDLE_STEP`] pending entries whose blocks no write holds, with their unit
/// locks, out of the pending set: `(entry, block)`, ascending.
fn pick_step(shared: &SharedRef) -> Vec<(usize, u64)> {
    let mut s = shared.borrow_mut();
    let s = &mut *s;
    if !may_step(s) {
        return Vec::new();
    }
    let mut step = Vec::with_capacity(IDLE_STEP);
    for entry in s.meta.open.crc_pending.iter() {
        if step.len() == IDLE_STEP {
            break;
        }
        let block = s.meta.open.blocks[entry];
        if s.hot.try_lock_unit(&s.meta.open.entry_of, block) {
            step.push((entry, block));
        }
    }
    for (entry, _) in &step {
        s.meta.open.crc_pending.remove(*entry);
    }
    step
}

/// Reads `entries` (ascending, none of them written meanwhile) back in runs of physically
/// consecutive segments and stores their crcs; an entry whose crc changed and whose index page
/// was written makes that page stale. On an error the entries are pending again.
async fn checksum_entries(shared: &SharedRef, io: &ControlIo<HostRef>, entries: &[usize]) -> Result<(), EngineError> {
    if entries.is_empty() {
        return Ok(());
    }
    let (runs, unit) = {
        let s = shared.borrow();
        let meta = &s.meta;
        let physical = |entry: usize| meta.ring.physical(meta.open.element_start + entry as u64);
        // (first entry, count): consecutive entries whose segments do not wrap the ring.
        let mut runs: Vec<(usize, u64)> = Vec::new();
        for &entry in entries {
            match runs.last_mut() {
                Some((first, count))
                    if *first + *count as usize == entry
                        && *count < RUN_UNITS
                        && physical(entry) == physical(*first) + *count =>
                {
                    *count += 1
                }
                _ => runs.push((entry, 1)),
            }
        }
        let runs: Vec<(usize, u64, u64)> = runs
            .into_iter()
            .map(|(first, count)| (first, count, meta.segment_lba(meta.open.element_start + first as u64)))
            .collect();
        (runs, meta.unit_bytes() as usize)
    };
    let reads = runs.iter().map(|&(first, count, lba)| async move {
        let data = io.read(Role::Journal, lba, count as usize * unit).await?;
        Ok::<_, EngineError>(
            (0..count as usize).map(|k| (first + k, crc_of(&data, k * unit, unit))).collect::<Vec<_>>(),
        )
    });
    let crcs = match run_bounded(reads, IN_FLIGHT).await {
        Ok(crcs) => crcs,
        Err(error) => {
            let mut s = shared.borrow_mut();
            for &entry in entries {
                s.meta.open.crc_pending.insert(entry);
            }
            return Err(error);
        }
    };
    let mut s = shared.borrow_mut();
    let s = &mut *s;
    let written_upto = s.hot.index_written_upto(&s.meta);
    let meta = &mut s.meta;
    let per_page = meta.entries_per_page();
    for (entry, crc) in crcs.into_iter().flatten() {
        meta.open.set_crc(entry, crc, written_upto, per_page);
    }
    Ok(())
}
