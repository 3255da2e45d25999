//! History maintenance: merge (seed 001 FIG 11/12, S11001–11012), deletion of generations
//! (the "JNL delete program" of S11 and FIG 42's last step) and the retention policy that runs
//! them in the background.
//!
//! - **Merge** of the records H(N)..H(N+m) into one record M(N..N+m) that turns image(N+m+1)
//!   back into image(N): on a block several records hold, the **older** element wins (FIG 12).
//!   The output is written contiguous and address-ordered (like a sorted record, so its map
//!   needs no address table), then its control block, then one catalog write replaces the
//!   sources by the merged record. The images of N+1..N+m are given up; image(N) and every
//!   other generation stay exact. Until that catalog write the merged record is only an entry in
//!   state `Merging` that owns its space: a crash before it leaves the sources untouched, and
//!   the next open forgets the unfinished output.
//! - **Deleting generation g**: the oldest record is dropped from the catalog; a younger one is
//!   merged with the record before it (their merge restores the older image, so image(g) alone
//!   is given up). Space comes back when the catalog write that forgets it is durable.
//! - **Retention**: after each sort, keep the newest `keep_last` records individually, merge the
//!   older ones into one (`merge_older`), and drop records beyond `max_generations` or older than
//!   `max_age_seconds`.
//!
//! One maintenance operation runs at a time; the sort keeps running beside it (both change the
//! history catalog through [`update_history_catalog`], which applies each change to the newest
//! catalog).

use std::sync::Arc;
use std::task::Poll;

use rustc_hash::FxHashMap;

use crate::core::allocator::Extent;
use crate::core::element_map::{Addressing, ElementMap, ADDRESS_MASK, ADDRESS_SHARED};
use crate::core::format::catalog::{flags, CatalogEntry, EntryKind, EntryState};
use crate::core::format::control_block::ControlBlock;
use crate::core::plan::dedup::content_hash;
use crate::core::plan::merge::plan_merge;
use crate::device::IoBuffers;

use super::io::{run_bounded, ControlIo, Role};
use super::volume::{update_history_catalog, HostRef, SharedRef};
use super::{now_ns, restore_volume, EngineError};

/// What the retention policy keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetentionPolicy {
    /// Newest history records kept individually (their generations stay restorable).
    pub keep_last: Option<u32>,
    /// Merge the records older than `keep_last` into one (their oldest image stays restorable).
    #[serde(default)]
    pub merge_older: bool,
    /// At most this many history records; the oldest are dropped.
    pub max_generations: Option<u32>,
    /// Records whose generation is older than this are dropped.
    pub max_age_seconds: Option<u64>,
    /// Compress the records older than `keep_last` (embodiment 8); records that would not get
    /// smaller are left as they are.
    #[serde(default)]
    pub compress_older: bool,
}

impl RetentionPolicy {
    /// Refuses a policy that cannot be carried out as written (nothing would say how many
    /// records `merge_older` keeps).
    pub fn validate(&self) -> Result<(), String> {
        if self.merge_older && self.keep_last.is_none() {
            return Err("merge_older needs keep_last: how many records to keep individually".into());
        }
        if self.compress_older && self.keep_last.is_none() {
            return Err("compress_older needs keep_last: how many records to keep uncompressed".into());
        }
        Ok(())
    }
}

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MergeReport {
    /// The merged record restores image(`generation`)...
    pub generation: u64,
    /// ...and stands for the records up to this generation.
    pub through_generation: u64,
    /// Records merged.
    pub records: usize,
    /// History units the sources held (elements and control blocks).
    pub units_before: u64,
    /// History units the merged record holds.
    pub units_after: u64,
    /// Elements not stored because an equal one (byte compare) was stored by the merge: the
    /// units dedup saved.
    #[serde(default)]
    pub dedup_shared: u64,
    /// Elements whose content hash matched a stored one but whose bytes differed (stored).
    #[serde(default)]
    pub dedup_mismatches: u64,
    /// Of `dedup_shared`, elements pointing at a unit of another record or a retained extent.
    #[serde(default)]
    pub dedup_shared_across: u64,
    /// Elements equal to another record's unit (byte compare) but stored all the same: the
    /// first units of a run of matches (`VolumeOptions::dedup_min_run`), or runs past the
    /// merge's budget of 64 (scattered shares cost retained extents later).
    #[serde(default)]
    pub dedup_declined_scattered: u64,
    /// History units retained extents hold after the operation (kept for other records'
    /// references to records that left the history).
    #[serde(default)]
    pub retained_units: u64,
}

/// Why a maintenance request failed, by what the caller can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaintenanceError {
    /// The request names generations that cannot be merged or deleted (nothing changed).
    #[error("{0}")]
    Invalid(String),
    /// No room: the history for the merged record, the journal for a rollback's rewrite
    /// (nothing changed).
    #[error("{0}")]
    NoSpace(String),
    /// Too much is waiting already (markers, rollbacks, generations for the sort): retry later.
    #[error("{0}")]
    Busy(String),
    /// A device error or damaged metadata.
    #[error("{0}")]
    Failed(String),
}

impl From<EngineError> for MaintenanceError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Invalid(_) | EngineError::TargetUnavailable { .. } => {
                MaintenanceError::Invalid(error.to_string())
            }
            EngineError::HistoryFull { .. }
            | EngineError::HistoryCatalogFull { .. }
            | EngineError::NoSpace(_)
            | EngineError::BitmapTracked { .. } => MaintenanceError::NoSpace(error.to_string()),
            EngineError::Busy(_) | EngineError::TooManyGenerations { .. } => MaintenanceError::Busy(error.to_string()),
            _ => MaintenanceError::Failed(error.to_string()),
        }
    }
}

impl From<MaintenanceError> for EngineError {
    fn from(error: MaintenanceError) -> Self {
        match error {
            MaintenanceError::Invalid(message) => EngineError::Invalid(message),
            MaintenanceError::NoSpace(message) => EngineError::NoSpace(message),
            MaintenanceError::Busy(message) => EngineError::Busy(message),
            MaintenanceError::Failed(message) => EngineError::Operation(message),
        }
    }
}

/// The result of a maintenance request, filled in when it completes.
#[derive(Clone, Default)]
pub struct MaintenanceHandle {
    result: std::rc::Rc<std::cell::RefCell<Option<Result<MergeReport, MaintenanceError>>>>,
}

impl MaintenanceHandle {
    pub fn result(&self) -> Option<Result<MergeReport, MaintenanceError>> {
        self.result.borrow().clone()
    }

    pub(crate) fn set(&self, result: Result<MergeReport, MaintenanceError>) {
        *self.result.borrow_mut() = Some(result);
    }
}

/// A maintenance request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Maintenance {
    Merge { from: u64, through: u64 },
    Delete { generation: u64 },
}

/// Runs one maintenance request (one at a time) and reports into `handle`.
pub(crate) async fn run_maintenance(
    shared: SharedRef,
    io: ControlIo<HostRef>,
    request: Maintenance,
    handle: MaintenanceHandle,
) {
    take_maintenance_lock(&shared).await;
    let result = match request {
        Maintenance::Merge { from, through } => merge(&shared, &io, from, through).await,
        Maintenance::Delete { generation } => delete_generation(&shared, &io, generation).await,
    };
    shared.borrow_mut().maintenance_running = false;
    if let Err(error) = &result {
        if matches!(error, EngineError::Io(_)) {
            shared.borrow_mut().failed.get_or_insert(format!("history maintenance failed: {error}"));
        }
    }
    handle.set(result.map_err(MaintenanceError::from));
}

pub(crate) async fn take_maintenance_lock(shared: &SharedRef) {
    std::future::poll_fn(|_| {
        let mut s = shared.borrow_mut();
        if s.maintenance_running {
            Poll::Pending
        } else {
            s.maintenance_running = true;
            Poll::Ready(())
        }
    })
    .await
}

/// History records (sorted and merged, live), oldest first.
pub(crate) fn live_records(shared: &SharedRef) -> Vec<CatalogEntry> {
    let s = shared.borrow();
    let mut records: Vec<CatalogEntry> = s
        .meta
        .history_catalog
        .entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::History | EntryKind::Merged) && e.state == EntryState::Live)
        .cloned()
        .collect();
    records.sort_by_key(|e| e.generation);
    records
}

fn units_of(entry: &CatalogEntry) -> u64 {
    entry.element_count + entry.control_count
}

/// A record's map: from memory, else read from its control block (bitmap and addresses) and
/// kept.
pub(crate) async fn read_record_map(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    entry: &CatalogEntry,
) -> Result<Arc<ElementMap>, EngineError> {
    if let Some(map) = shared.borrow().meta.record_maps.get(entry.control_start, entry.generation) {
        return Ok(map);
    }
    let (lba, bytes, blocks) = {
        let s = shared.borrow();
        (s.meta.history_lba(entry.control_start), entry.control_count * s.meta.unit_bytes(), s.meta.shape.volume_blocks)
    };
    let data = io.read(Role::History, lba, bytes as usize).await?.to_vec();
    let control = ControlBlock::decode(&data)
        .map_err(|e| EngineError::Damaged(format!("control block of history generation {}: {e}", entry.generation)))?;
    if control.generation != entry.generation
        || control.through_generation != entry.through_generation
        || control.map.blocks() != blocks
    {
        return Err(EngineError::Damaged(format!(
            "control block of history generation {} describes generations {}..{} of a {}-block volume",
            entry.generation,
            control.generation,
            control.through_generation,
            control.map.blocks()
        )));
    }
    let map = Arc::new(control.map);
    // Kept only if the record is still live: one freed while its control block was read (by
    // a merge beside the background loader) must not leave its map under a unit a later
    // record may reuse.
    let mut s = shared.borrow_mut();
    let live = s.meta.history_catalog.entries.iter().any(|e| {
        e.control_start == entry.control_start
            && e.generation == entry.generation
            && e.kind == entry.kind
            && e.state == EntryState::Live
    });
    if live {
        s.meta.record_maps.insert(entry.control_start, entry.generation, map.clone());
    }
    Ok(map)
}

/// Reads the maps of the live history records into memory, newest first (every R-VOL needs
/// the newest ones); stops when the volume closes or the memory for maps is used up. A map
/// that cannot be read is left to whoever needs it (which then reports the damage).
pub(crate) async fn load_record_maps(shared: SharedRef, io: ControlIo<HostRef>) {
    for record in live_records(&shared).into_iter().rev() {
        if shared.borrow().stopping || shared.borrow().meta.record_maps.full() {
            return;
        }
        if read_record_map(&shared, &io, &record).await.is_err() {
            return;
        }
    }
}

/// Merges the records covering generations `from..=through` (at least two, consecutive).
pub(crate) async fn merge(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    from: u64,
    through: u64,
) -> Result<MergeReport, EngineError> {
    let records = live_records(shared);
    let first = records.iter().position(|r| r.generation == from).ok_or_else(|| {
        EngineError::Invalid(format!(
            "no history record starts at generation {from} (restorable history: {})",
            describe(&records)
        ))
    })?;
    let last = records.iter().position(|r| r.through_generation == through).filter(|last| *last >= first).ok_or_else(
        || {
            EngineError::Invalid(format!(
                "no history record ends at generation {through} after {from} (restorable history: {})",
                describe(&records)
            ))
        },
    )?;
    let sources: Vec<CatalogEntry> = records[first..=last].to_vec();
    if sources.len() < 2 {
        return Err(EngineError::Invalid(format!(
            "generations {from}..{through} are one history record already: nothing to merge"
        )));
    }
    debug_assert!(
        sources.windows(2).all(|w| w[1].generation == w[0].through_generation + 1),
        "records are consecutive"
    );
    restore_volume::check_not_shown(shared, from + 1..=through)?;

    // FIG 11: the sources' maps, oldest first; the output, address-ordered and contiguous.
    let mut maps = Vec::with_capacity(sources.len());
    for source in &sources {
        maps.push(read_record_map(shared, io, source).await?);
    }
    let map_refs: Vec<&ElementMap> = maps.iter().map(|m| &**m).collect();
    let plan =
        plan_merge(&map_refs, 0).map_err(|e| EngineError::Damaged(format!("merge of {from}..{through}: {e}")))?;
    let elements = plan.output_units();
    // Room for the worst case: every element stored, an address table in the control block.
    // What dedup saves is given back at the commit. Without room for the table the merge
    // still runs, without dedup (it needs no more than the records it replaces).
    let (output, control, unit, options, hash_bits, dedup_room) = {
        let mut s = shared.borrow_mut();
        let (extents, dedup_room) = match s.meta.allocate_record_with_table("merge", from, elements, elements) {
            Ok(extents) => (extents, true),
            Err(EngineError::HistoryFull { .. }) => {
                (s.meta.allocate_record_with_table("merge", from, elements, 0)?, false)
            }
            Err(error) => return Err(error),
        };
        let hash_bits = s.options.dedup_hash_bits;
        (extents.elements, extents.control, s.meta.unit_bytes() as usize, s.options.sort.clone(), hash_bits, dedup_room)
    };
    let release = |shared: &SharedRef| {
        let mut s = shared.borrow_mut();
        for extent in [output, control] {
            if extent.units > 0 {
                let _ = s.meta.allocator.free(extent);
            }
        }
    };

    // The unfinished output is owned by an entry in state Merging: a crash forgets it.
    let mut merged = CatalogEntry::new(from, EntryKind::Merged, EntryState::Merging);
    merged.through_generation = through;
    merged.time_ns = sources[0].time_ns;
    merged.last_sequence = sources[0].last_sequence;
    merged.comment = sources[0].comment.clone();
    merged.element_start = output.start;
    merged.element_count = output.units;
    merged.control_start = control.start;
    merged.control_count = control.units;
    merged.blocks = elements;
    merged.stored_bytes = elements * unit as u64;
    let pending = merged.clone();
    if let Err(error) = update_history_catalog(shared, io, move |catalog| {
        catalog.entries.push(pending);
        Ok(())
    })
    .await
    {
        release(shared);
        return Err(error);
    }

    // Units outside the output the merge may share (live records but the sources, retained
    // extents): none of them goes away while the merge holds the maintenance lock.
    let kept = match super::dedup::referenced_units(shared, io, &sources, None).await {
        Ok(kept) => kept,
        Err(error) => {
            let _ = update_history_catalog(shared, io, move |catalog| {
                catalog.entries.retain(|e| {
                    !(e.kind == EntryKind::Merged && e.state == EntryState::Merging && e.generation == from)
                });
                Ok(())
            })
            .await
            .map(|()| release(shared));
            return Err(error);
        }
    };
    let owners = super::dedup::Owners::for_merge(&shared.borrow().meta, &sources, &kept);

    // Copy: batches in block order, each batch's reads at once (bounded); each element
    // is stored at the next output unit or shared with an equal one stored before (dedup),
    // by this merge or in another record; the stored ones of a batch are consecutive and go
    // out as one write.
    let copied = async {
        let mut dedup = MergeDedup::new(hash_bits, dedup_room);
        dedup.run_budget = shared_run_budget(&shared.borrow().meta.history_catalog);
        dedup.min_run = shared.borrow().options.dedup_min_run.max(1);
        let mut table = Vec::with_capacity(elements as usize);
        for batch in plan.batches(options.batch_elements.max(1)) {
            let reads = batch.iter().map(|step| {
                let control = sources[step.record_index].control_start;
                let compressed = shared.borrow().meta.compression.is_compressed(control);
                let frames = super::compress::through_frames(compressed, step.source);
                let lba = shared.borrow().meta.history_lba(step.source & ADDRESS_MASK);
                async move {
                    if frames {
                        // Embodiment 8: a compressed source's own elements read through its
                        // frames (its shared ones are other records' units, read as they are).
                        let bytes = super::compress::read_element(shared, io, control, step.source).await?;
                        let mut buffer = io.alloc(Role::History, unit);
                        buffer.as_mut_slice().copy_from_slice(&bytes);
                        return Ok(IoBuffers::single(buffer));
                    }
                    Ok::<_, EngineError>(io.read(Role::History, lba, unit).await?)
                }
            });
            let buffers = run_bounded(reads, options.max_in_flight).await?;
            let batch_first = output.start + dedup.stored;
            let mut stored: Vec<crate::device::DmaBuf> = Vec::with_capacity(batch.len());
            for (step, element) in batch.iter().zip(buffers.into_iter().flat_map(IoBuffers::into_segments)) {
                debug_assert_eq!(element.len(), unit, "one unit per merge step");
                // An element in a unit that stays owned (another record's, a retained one, or a
                // source's that other records point at) is pointed at as it is. A compressed
                // source's own addresses are logical units of its frames, never history units.
                let control = sources[step.record_index].control_start;
                let logical = super::compress::through_frames(
                    shared.borrow().meta.compression.is_compressed(control),
                    step.source,
                );
                if dedup.enabled && !logical && owners.contains(step.source & ADDRESS_MASK) {
                    dedup.run_next = None;
                    table.push(step.source | ADDRESS_SHARED);
                    dedup.shared += 1;
                    dedup.across += 1;
                    continue;
                }
                let bytes = element.as_slice();
                let hash = if dedup.enabled { dedup.hash(bytes) } else { 0 };
                let mut twin = None;
                for candidate in dedup.candidates(hash) {
                    // A byte compare decides: equal hashes of different contents never share.
                    let same = if candidate >= batch_first {
                        stored[(candidate - batch_first) as usize].as_slice() == bytes
                    } else {
                        dedup.equals(shared, io, candidate, bytes).await?
                    };
                    if same {
                        twin = Some(candidate);
                        break;
                    }
                    dedup.mismatches += 1;
                }
                // Else an equal element of another record (FIG 39 across records): the index
                // only proposes; ownership and a byte compare decide.
                let mut across = None;
                if twin.is_none() && dedup.enabled {
                    let mut candidates = shared.borrow().content.candidates(hash);
                    // The unit continuing the current run first: a run costs one retained
                    // extent later, however long it is.
                    if let Some(at) = candidates.iter().position(|c| Some(*c) == dedup.run_next) {
                        candidates[..=at].rotate_right(1);
                    }
                    for candidate in candidates {
                        if !owners.contains(candidate) {
                            if !owners.in_sources(candidate) {
                                shared.borrow_mut().content.forget(hash, candidate);
                            }
                            continue;
                        }
                        if dedup.equals(shared, io, candidate, bytes).await? {
                            across = Some(candidate);
                            break;
                        }
                        dedup.mismatches += 1;
                    }
                }
                // Sharing less is always safe: a match in a run too short (so far) or past
                // the merge's run budget is stored (see `MergeDedup::min_run`).
                if let Some(address) = across {
                    if !dedup.take_run(address) {
                        across = None;
                        dedup.declined_scattered += 1;
                    }
                } else {
                    dedup.run_next = None;
                }
                match (twin, across) {
                    (Some(address), _) => {
                        table.push(address);
                        dedup.shared += 1;
                    }
                    (None, Some(address)) => {
                        table.push(address | ADDRESS_SHARED);
                        dedup.shared += 1;
                        dedup.across += 1;
                    }
                    (None, None) => {
                        let address = output.start + dedup.stored;
                        table.push(address);
                        if dedup.insert(hash, address) {
                            dedup.remember(address, bytes.to_vec());
                        }
                        dedup.stored += 1;
                        stored.push(element);
                    }
                }
            }
            if !stored.is_empty() {
                let lba = shared.borrow().meta.history_lba(batch_first);
                io.write(Role::History, lba, Arc::new(IoBuffers::from_segments(stored)), false).await?;
            }
        }
        debug_assert_eq!(table.len() as u64, elements, "one address per merged block");
        debug_assert_eq!(dedup.stored + dedup.shared, elements, "every element stored or shared");
        io.flush(Role::History).await?;
        let addressing = if dedup.shared == 0 {
            Addressing::Contiguous { first: output.start }
        } else {
            Addressing::Explicit(table)
        };
        let map = ElementMap::new(plan.merged.bitmap().clone(), addressing)
            .map_err(|e| EngineError::Damaged(format!("merged map of {from}..{through}: {e}")))?;
        let block = ControlBlock { generation: from, through_generation: through, map: map.clone() }.encode();
        let control_needed = (block.len() as u64).div_ceil(unit as u64);
        assert!(control_needed <= control.units, "the control block was sized for a full address table");
        let lba = shared.borrow().meta.history_lba(control.start);
        let mut buffer = io.alloc(Role::History, block.len());
        buffer.as_mut_slice().copy_from_slice(&block);
        io.write(Role::History, lba, Arc::new(IoBuffers::single(buffer)), false).await?;
        io.flush(Role::History).await?;
        // FIG 41/42: the sources' units the remaining records (the merged one included) still
        // point at stay as retained extents; retained units nothing points at any more go.
        let referenced = super::dedup::referenced_units(shared, io, &sources, Some(&map)).await?;
        let retention = super::dedup::plan_leaving(&shared.borrow().meta.history_catalog, &sources, &referenced)?;
        Ok::<_, EngineError>((Arc::new(map), dedup, control_needed, retention))
    }
    .await;
    let (merged_map, dedup, control_needed, retention) = match copied {
        Ok(done) => done,
        Err(error) => {
            // The sources are untouched; drop the unfinished output (or leave it to the next open).
            forget_output(shared, io, from, release).await;
            return Err(error);
        }
    };

    // The commit point: one catalog write replaces the sources by the merged record, which
    // owns only the units it used.
    let source_generations: Vec<u64> = sources.iter().map(|s| s.generation).collect();
    let (stored_units, stored_bytes) = (dedup.stored, dedup.stored * unit as u64);
    let pruned = std::cell::RefCell::new(Vec::new());
    let pruned_ref = &pruned;
    let (shared_units, across_units) = (dedup.shared, dedup.across);
    let retained = retention.clone();
    let committed = update_history_catalog(shared, io, move |catalog| {
        catalog.entries.retain(|e| {
            !(matches!(e.kind, EntryKind::History | EntryKind::Merged)
                && e.state == EntryState::Live
                && source_generations.contains(&e.generation))
        });
        let entry = catalog
            .entries
            .iter_mut()
            .find(|e| e.kind == EntryKind::Merged && e.state == EntryState::Merging && e.generation == from)
            .ok_or_else(|| EngineError::Damaged(format!("the merge of {from}..{through} lost its catalog entry")))?;
        entry.state = EntryState::Live;
        entry.element_count = stored_units;
        entry.control_count = control_needed;
        entry.stored_bytes = stored_bytes;
        entry.dedup_saved = shared_units * unit as u64;
        entry.shared_across = across_units;
        if shared_units > 0 {
            entry.flags |= flags::DEDUPLICATED;
        }
        if across_units > 0 {
            entry.flags |= flags::SHARES_ACROSS;
        }
        super::dedup::write_retained(catalog, &retained);
        // With the merged record live: the versions over the images it gave up go with them.
        *pruned_ref.borrow_mut() = prune_versions(catalog);
        Ok(())
    })
    .await;
    if let Err(error) = committed {
        // Refused before anything was written (the catalog has no room for the retained
        // extents): the sources stay, the output is forgotten. After a write error the next
        // open decides.
        if !matches!(error, EngineError::Io(_)) {
            forget_output(shared, io, from, release).await;
        }
        return Err(error);
    }
    {
        // What dedup saved, and the control block's unused table room, are free again.
        let mut s = shared.borrow_mut();
        s.meta.record_maps.insert(control.start, from, merged_map.clone());
        for (start, units) in [
            (output.start + stored_units, output.units - stored_units),
            (control.start + control_needed, control.units - control_needed),
        ] {
            if units > 0 {
                s.meta.allocator.free(Extent::new(start, units)).map_err(|e| {
                    EngineError::Damaged(format!("merge of {from}..{through}: freeing what dedup saved: {e}"))
                })?;
            }
        }
    }
    // R-VOLs that read the sources read the merged record from now on; reads that started
    // earlier finish before the sources' space can be reused.
    let source_controls: Vec<u64> = sources.iter().map(|s| s.control_start).collect();
    shared.borrow_mut().restores.merged(from, &source_controls, control.start, &merged_map)?;
    restore_volume::fence(shared).await;
    {
        let mut s = shared.borrow_mut();
        super::dedup::free_leaving(&mut s.meta, &sources, &retention)?;
        for version in pruned.borrow().iter() {
            s.meta.free_entry_extents(version)?;
        }
        // What the merge stored is a share candidate from now on.
        let stored: Vec<(u128, u64)> = dedup.indexed().collect();
        for (hash, address) in stored {
            s.content.insert(hash, address);
        }
        s.control.version_records_dropped += pruned.borrow().len() as u64;
        s.control.merges += 1;
        s.control.dedup_shared_across += dedup.across;
        s.control.dedup_shared_elements += dedup.shared;
        s.control.dedup_mismatches += dedup.mismatches;
        s.control.dedup_declined_scattered += dedup.declined_scattered;
        s.space_freed = true;
    }
    Ok(MergeReport {
        generation: from,
        through_generation: through,
        records: sources.len(),
        units_before: sources.iter().map(units_of).sum(),
        units_after: stored_units + control_needed,
        dedup_shared: dedup.shared,
        dedup_mismatches: dedup.mismatches,
        dedup_shared_across: dedup.across,
        dedup_declined_scattered: dedup.declined_scattered,
        retained_units: retention.retained_units(),
    })
}

/// Hashes a merge has stored (dedup index of one merge output): content hash → the first
/// output unit holding those contents, further candidates only after a hash collision.
/// Within one merge the output owns every unit it points at, so no reference counts are
/// needed (sharing across records, with `core::plan::dedup`'s counted index, is the next
/// step). Bounded: past `MERGE_DEDUP_MAX` stored elements new contents are no longer indexed.
struct MergeDedup {
    /// Off when the control block has no room for an address table: every element is stored.
    enabled: bool,
    first: FxHashMap<u128, u64>,
    more: FxHashMap<u128, Vec<u64>>,
    /// Contents of recently stored or compared elements, so that contents repeating often
    /// (zeros, templates) are compared in memory instead of read back each time; FIFO,
    /// `MERGE_DEDUP_RECENT` at most.
    recent: FxHashMap<u64, Vec<u8>>,
    recent_order: std::collections::VecDeque<u64>,
    mask: u128,
    stored: u64,
    shared: u64,
    /// Of `shared`, elements pointing at another record's or a retained extent's unit.
    across: u64,
    mismatches: u64,
    /// Sharing across records goes by runs: consecutive output elements equal to consecutive
    /// units of another record. Each run of units a record points at becomes one retained
    /// extent (a catalog entry) once its owner leaves, and a record that shares at all pays
    /// an address table (8 bytes per element); scattered matches (one run each) outran the
    /// catalog, whose retained extents then got coarsened and kept unshared units too
    /// (BENCHMARKS table 6b: +38 % at 25 % repeated content). So a run's first `min_run − 1`
    /// matches are stored, the rest shared ([`VolumeOptions::dedup_min_run`](super::VolumeOptions)).
    min_run: u64,
    /// Runs this merge may still start sharing (at most `MERGE_SHARED_RUNS`).
    run_budget: u64,
    /// The unit that continues the run the previous element matched, if it matched one.
    run_next: Option<u64>,
    /// Matches in the current run, and whether it is shared.
    run_length: u64,
    run_taken: bool,
    /// Matches across records stored all the same (a run's first units, or past the budget).
    declined_scattered: u64,
}

/// Runs of units in other records one merge may share (each a retained extent later): 64
/// keeps the catalog's 1,023 entries clear of coarsening for many merges (retained extents
/// take at most half the free entries per change), and a file saved again is a few runs.
const MERGE_SHARED_RUNS: u64 = 64;

/// The merge's run budget: [`MERGE_SHARED_RUNS`], at most a quarter of the catalog's free
/// entries (retained extents take at most half of them per change).
fn shared_run_budget(catalog: &crate::core::format::catalog::Catalog) -> u64 {
    let free = (catalog.capacity_entries as u64).saturating_sub(catalog.entries.len() as u64);
    MERGE_SHARED_RUNS.min(free / 4)
}

/// Stored elements a merge indexes (about 32 bytes each: 32 MiB at most).
const MERGE_DEDUP_MAX: usize = 1 << 20;
/// Candidates kept per hash (more than one only after a collision).
const MERGE_DEDUP_CHAIN: usize = 4;
/// Elements whose contents a merge keeps for byte compares (4 MiB of 4 KiB units).
const MERGE_DEDUP_RECENT: usize = 1024;

impl MergeDedup {
    fn new(hash_bits: u32, enabled: bool) -> Self {
        assert!((1..=128).contains(&hash_bits), "dedup hash bits {hash_bits} outside 1..=128");
        let mask = if hash_bits == 128 { u128::MAX } else { (1u128 << hash_bits) - 1 };
        MergeDedup {
            enabled,
            first: FxHashMap::default(),
            more: FxHashMap::default(),
            recent: FxHashMap::default(),
            recent_order: std::collections::VecDeque::new(),
            mask,
            stored: 0,
            shared: 0,
            across: 0,
            mismatches: 0,
            min_run: 1,
            run_budget: 0,
            run_next: None,
            run_length: 0,
            run_taken: false,
            declined_scattered: 0,
        }
    }

    /// Whether a confirmed match with another record's unit `address` is shared: when it
    /// continues the run the previous element was shared into, or a new run fits the budget.
    fn take_run(&mut self, address: u64) -> bool {
        if self.run_next != Some(address) {
            (self.run_length, self.run_taken) = (0, false);
        }
        self.run_length += 1;
        self.run_next = Some(address + 1);
        if !self.run_taken && self.run_length >= self.min_run && self.run_budget > 0 {
            self.run_budget -= 1;
            self.run_taken = true;
        }
        self.run_taken
    }

    fn hash(&self, bytes: &[u8]) -> u128 {
        content_hash(bytes) & self.mask
    }

    /// Stored elements with `hash`, oldest first (none when dedup is off). Collected, since
    /// the caller reads candidates back while it changes the index.
    fn candidates(&self, hash: u128) -> Vec<u64> {
        let Some(first) = self.first.get(&hash) else { return Vec::new() };
        std::iter::once(*first).chain(self.more.get(&hash).into_iter().flatten().copied()).collect()
    }

    /// Indexes a stored element; whether it became a candidate.
    fn insert(&mut self, hash: u128, address: u64) -> bool {
        if !self.enabled || self.first.len() + self.more.len() >= MERGE_DEDUP_MAX {
            return false;
        }
        match self.first.entry(hash) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(address);
                true
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                let chain = self.more.entry(hash).or_default();
                if chain.len() + 1 < MERGE_DEDUP_CHAIN {
                    chain.push(address);
                    return true;
                }
                false
            }
        }
    }

    /// Every indexed stored element: (hash, output address).
    fn indexed(&self) -> impl Iterator<Item = (u128, u64)> + '_ {
        self.first
            .iter()
            .map(|(hash, address)| (*hash, *address))
            .chain(self.more.iter().flat_map(|(hash, chain)| chain.iter().map(move |address| (*hash, *address))))
    }

    /// Whether history unit `address` holds `bytes`: compared from memory when it was read
    /// lately, else read (and kept for the next compare).
    async fn equals(
        &mut self,
        shared: &SharedRef,
        io: &ControlIo<HostRef>,
        address: u64,
        bytes: &[u8],
    ) -> Result<bool, EngineError> {
        if let Some(recent) = self.recent.get(&address) {
            return Ok(recent.as_slice() == bytes);
        }
        let lba = shared.borrow().meta.history_lba(address);
        let read = io.read(Role::History, lba, bytes.len()).await?.to_vec();
        let same = read == bytes;
        self.remember(address, read);
        Ok(same)
    }

    fn remember(&mut self, address: u64, contents: Vec<u8>) {
        if self.recent.insert(address, contents).is_none() {
            self.recent_order.push_back(address);
        }
        while self.recent_order.len() > MERGE_DEDUP_RECENT {
            if let Some(oldest) = self.recent_order.pop_front() {
                self.recent.remove(&oldest);
            }
        }
    }
}

/// Drops the catalog entry of an unfinished merge's output (state merging, generation `from`)
/// and, once that is written, gives its units back with `release`; a failed write leaves
/// both to the next open.
async fn forget_output(shared: &SharedRef, io: &ControlIo<HostRef>, from: u64, release: impl FnOnce(&SharedRef)) {
    let forgotten = update_history_catalog(shared, io, move |catalog| {
        catalog
            .entries
            .retain(|e| !(e.kind == EntryKind::Merged && e.state == EntryState::Merging && e.generation == from));
        Ok(())
    })
    .await;
    if forgotten.is_ok() {
        release(shared);
    }
}

/// Gives up image(`generation`): drops the oldest record, or merges a younger one into the
/// record before it.
pub(crate) async fn delete_generation(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    generation: u64,
) -> Result<MergeReport, EngineError> {
    let records = live_records(shared);
    let Some(index) = records.iter().position(|r| r.generation == generation) else {
        let backup = shared.borrow().meta.history_catalog.backup_generation;
        return Err(EngineError::Invalid(if generation >= backup {
            format!("generation {generation} is not in the history yet (the backup holds {backup}; newer ones wait for the sort)")
        } else {
            format!("generation {generation} is not a restorable generation (history: {})", describe(&records))
        }));
    };
    if index == 0 {
        return drop_oldest(shared, io, 1).await;
    }
    merge(shared, io, records[index - 1].generation, records[index].through_generation).await
}

/// "All" mode: the versions of generation g resolve targets on top of image g−1 only. Removes
/// from `catalog` (in the same write that gives images up) the version records whose image
/// g−1 is no longer restorable, and returns them so their units can be freed after it.
pub(crate) fn prune_versions(catalog: &mut crate::core::format::catalog::Catalog) -> Vec<CatalogEntry> {
    let images: rustc_hash::FxHashSet<u64> = catalog
        .entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::History | EntryKind::Merged) && e.state == EntryState::Live)
        .map(|e| e.generation)
        .chain([catalog.backup_generation])
        .collect();
    let (kept, pruned) = std::mem::take(&mut catalog.entries).into_iter().partition(|e| {
        e.kind != EntryKind::Versions || e.generation.checked_sub(1).is_some_and(|g| images.contains(&g))
    });
    catalog.entries = kept;
    pruned
}

/// Drops the `count` oldest records: their generations are no longer restorable.
pub(crate) async fn drop_oldest(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    count: usize,
) -> Result<MergeReport, EngineError> {
    let records = live_records(shared);
    let dropped: Vec<CatalogEntry> = records.into_iter().take(count).collect();
    let Some(first) = dropped.first() else {
        return Err(EngineError::Invalid("the history holds no record to drop".into()));
    };
    let (generation, through) = (first.generation, dropped.last().expect("not empty").through_generation);
    restore_volume::check_not_shown(shared, generation..=through)?;
    let gone: Vec<u64> = dropped.iter().map(|d| d.generation).collect();
    let pruned = std::cell::RefCell::new(Vec::new());
    let pruned_ref = &pruned;
    // FIG 41/42: units the remaining records point at stay (retained), in the same write.
    let referenced = super::dedup::referenced_units(shared, io, &dropped, None).await?;
    let retention = super::dedup::plan_leaving(&shared.borrow().meta.history_catalog, &dropped, &referenced)?;
    let retained = retention.clone();
    update_history_catalog(shared, io, move |catalog| {
        catalog.entries.retain(|e| {
            !(matches!(e.kind, EntryKind::History | EntryKind::Merged)
                && e.state == EntryState::Live
                && gone.contains(&e.generation))
        });
        super::dedup::write_retained(catalog, &retained);
        *pruned_ref.borrow_mut() = prune_versions(catalog);
        Ok(())
    })
    .await?;
    // Reads that started before (an R-VOL following a share) end before units are reused.
    restore_volume::fence(shared).await;
    let mut s = shared.borrow_mut();
    super::dedup::free_leaving(&mut s.meta, &dropped, &retention)?;
    for version in pruned.borrow().iter() {
        s.meta.free_entry_extents(version)?;
    }
    s.control.version_records_dropped += pruned.borrow().len() as u64;
    s.control.generations_deleted += dropped.len() as u64;
    s.space_freed = true;
    Ok(MergeReport {
        generation,
        through_generation: through,
        records: dropped.len(),
        units_before: dropped.iter().map(units_of).sum(),
        units_after: 0,
        dedup_shared: 0,
        dedup_mismatches: 0,
        dedup_shared_across: 0,
        dedup_declined_scattered: 0,
        retained_units: retention.retained_units(),
    })
}

/// Drops the oldest history record to make room for the sort (journal-full policy
/// "merge-oldest"), waiting for any maintenance in progress.
pub(crate) async fn drop_oldest_for_space(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
) -> Result<MergeReport, EngineError> {
    take_maintenance_lock(shared).await;
    let result = drop_oldest(shared, io, 1).await;
    shared.borrow_mut().maintenance_running = false;
    if result.is_ok() {
        shared.borrow_mut().control.dropped_for_space += 1;
    }
    result
}

/// Applies the retention policy once: drops what is beyond the limits, then merges what is
/// older than `keep_last`. Returns whether anything changed.
pub(crate) async fn apply_retention(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    policy: &RetentionPolicy,
) -> Result<bool, EngineError> {
    let records = live_records(shared);
    let mut drop = 0usize;
    if let Some(max) = policy.max_generations {
        drop = drop.max(records.len().saturating_sub(max as usize));
    }
    if let Some(age) = policy.max_age_seconds {
        let limit = now_ns().saturating_sub(age.saturating_mul(1_000_000_000));
        drop = drop.max(records.iter().take_while(|r| r.time_ns < limit).count());
    }
    let mut changed = false;
    if drop > 0 {
        drop_oldest(shared, io, drop).await?;
        changed = true;
    }
    if let (Some(keep), true) = (policy.keep_last, policy.merge_older) {
        let records = live_records(shared);
        let older = records.len().saturating_sub(keep as usize);
        if older >= 2 {
            merge(shared, io, records[0].generation, records[older - 1].through_generation).await?;
            changed = true;
        }
    }
    if let (Some(keep), true) = (policy.keep_last, policy.compress_older) {
        changed |= super::compress::compress_older(shared, io, keep).await?;
    }
    Ok(changed)
}

/// Runs the retention policy after the sort changed the history, when one is set.
pub(crate) async fn run_retention(shared: SharedRef, io: ControlIo<HostRef>) {
    take_maintenance_lock(&shared).await;
    let policy = shared.borrow().options.retention.clone();
    let result = apply_retention(&shared, &io, &policy).await;
    let mut s = shared.borrow_mut();
    s.maintenance_running = false;
    match result {
        Ok(_) => s.retention_error = None,
        Err(error) => {
            if matches!(error, EngineError::Io(_)) {
                s.failed.get_or_insert(format!("retention failed: {error}"));
            }
            s.retention_error = Some(error.to_string());
        }
    }
}

fn describe(records: &[CatalogEntry]) -> String {
    if records.is_empty() {
        return "none".into();
    }
    records
        .iter()
        .map(|r| {
            if r.through_generation == r.generation {
                r.generation.to_string()
            } else {
                format!("{}..{}", r.generation, r.through_generation)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
