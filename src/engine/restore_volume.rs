//! Restore volumes (R-VOL, seed 001 FIG 13–15 and 20): any restorable generation as a volume
//! that reads and writes without copying the image first.
//!
//! - **Map** (FIG 13, S12001–12006): per block, the oldest history record ≥ N holding it, else
//!   the backup. The R-VOL keeps the maps of the records ≥ N (shared with the volume's map
//!   cache) and looks a block up in them when it is read, so opening costs no pass over the
//!   volume's blocks: with the maps in memory it is independent of the volume's size. A
//!   generation still in the journal opens once the sort has applied it.
//! - **Read** (FIG 14): the R-VOL's own copy of the block if it wrote one, else the map's
//!   history unit, else the backup.
//! - **Write** (FIG 15): redirect-on-write into history units the R-VOL allocates for itself;
//!   history records and the backup are never changed. A partial unit is read first.
//! - **Sort while an R-VOL exists** (FIG 20): before the sort overwrites backup blocks the map
//!   reads through, it has saved them into the new record; reads of a block already saved go
//!   to the saved copy (the sort's map, [`Shared::sorting`]), and the sort waits for R-VOL reads
//!   of the backup that started before the save ([`ReadFence`]). When the record commits, every
//!   R-VOL takes it in as its newest record.
//! - **Merge while an R-VOL exists**: a merge that would give up an R-VOL's generation is
//!   refused; otherwise the merged record takes the place of its sources in every R-VOL's list
//!   (a block's first hit among the sources is the element the merge kept) and the sources'
//!   space is freed only after the reads that started before drain.
//!
//! - **Any point** ("all" journal mode, seed 001 embodiment 4): an R-VOL of sequence S shows
//!   the image right after host write S — image G (the newest generation cut at or before S)
//!   overlaid with the versions of generation G+1 up to S, newest per block, read from G+1's
//!   version record. The versions of G+1 live as long as image G does (a merge or deletion
//!   drops them in the catalog write that gives G up, `merge::prune_versions`), so the R-VOL
//!   pins them by showing G: what gives G up is refused while it is open. Versions still in
//!   the journal move when the sort commits; an R-VOL opens once the sort has applied G+1
//!   (waits for a sealed one; a target in the open generation is refused until a marker
//!   seals it). A time target opens the sequence of the newest write taken by then.
//!
//! R-VOLs live in memory: they end when deleted or when the volume closes, and their own units
//! (not in any catalog) are free again at the next open. Keep an image with `restore` to a file.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::Poll;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::core::allocator::Extent;
use crate::core::element_map::ElementMap;
use crate::core::element_map::ADDRESS_MASK;
use crate::core::format::catalog::{CatalogEntry, EntryKind, EntryState};
use crate::core::format::superblock::JournalMode;
use crate::core::format::version_table::VersionTable;
use crate::device::{IoBuffers, Operation, Payload, Tag};

use super::io::{run_bounded, ControlIo, Role};
use super::merge::{live_records, read_record_map, take_maintenance_lock, MaintenanceError};
use super::meta::Meta;
use super::volume::{generation_list, HostCompletion, HostError, HostRef, HostRequest, SharedRef};
use super::EngineError;

/// Identifies an open R-VOL of a volume.
pub type RestoreId = u32;

/// R-VOLs open at once on one volume.
pub const MAX_RESTORE_VOLUMES: usize = 16;

/// Requests in flight on one R-VOL; more are refused (the host retries).
pub const MAX_RESTORE_IN_FLIGHT: usize = 256;

/// Unit reads or writes of one request in flight at once.
const UNITS_IN_FLIGHT: usize = 16;

/// What an R-VOL shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTarget {
    /// The image of a generation (FIG 13).
    Generation(u64),
    /// "All" mode: the image right after the host write with this sequence.
    Sequence(u64),
    /// "All" mode: the image after every host write taken at or before this time (Unix ns).
    TimeNs(u64),
}

/// What an R-VOL reports about itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreInfo {
    pub id: RestoreId,
    /// The generation whose image the R-VOL shows (the cut under its sequence, if it has one).
    pub generation: u64,
    /// "All" mode: the sequence the R-VOL shows the image right after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// "All" mode: blocks read from the versions of the generation after `generation`.
    pub version_blocks: u64,
    /// Blocks the R-VOL reads from history records (the others from the backup or its own).
    pub history_blocks: u64,
    /// History units holding the R-VOL's own writes.
    pub own_units: u64,
    pub reads: u64,
    pub writes: u64,
}

/// The result of opening an R-VOL, filled in when the map is built.
#[derive(Clone, Default)]
pub struct RestoreHandle {
    result: std::rc::Rc<std::cell::RefCell<Option<Result<RestoreId, MaintenanceError>>>>,
}

impl RestoreHandle {
    pub fn result(&self) -> Option<Result<RestoreId, MaintenanceError>> {
        self.result.borrow().clone()
    }

    fn set(&self, result: Result<RestoreId, MaintenanceError>) {
        *self.result.borrow_mut() = Some(result);
    }

    pub(crate) fn set_error(&self, error: EngineError) {
        self.set(Err(error.into()));
    }
}

/// Every R-VOL of a volume, and the fence that orders their reads against the sort and merges.
#[derive(Default)]
pub(crate) struct RestoreVolumes {
    volumes: BTreeMap<RestoreId, RestoreVolume>,
    next_id: RestoreId,
    /// Opens in progress (counted against the limit).
    opening: usize,
    fence: ReadFence,
}

struct RestoreVolume {
    generation: u64,
    sequence: Option<u64>,
    /// "All" mode: unit → the history unit of its newest version up to `sequence` in the
    /// version record of generation `generation + 1` (pinned by showing `generation`).
    versions: FxHashMap<u64, u64>,
    /// The history records ≥ `generation`, oldest first, by the unit of their control block:
    /// a block reads the first one holding it, else the backup.
    records: Vec<(u64, Arc<ElementMap>)>,
    /// Blocks read from history (computed when asked, forgotten when the records change).
    history_blocks: std::cell::Cell<Option<u64>>,
    /// Unit → the history unit holding the R-VOL's own copy (FIG 15).
    own: FxHashMap<u64, u64>,
    /// Units a write is in flight on (one at a time per unit).
    writing: FxHashSet<u64>,
    in_flight: usize,
    closing: bool,
    reads: u64,
    writes: u64,
}

/// R-VOL device reads in flight, by the epoch they started in. A step that makes what reads
/// see stale (the sort overwriting backup blocks, a merge freeing records) first changes where
/// new reads go, then waits for the reads of earlier epochs ([`fence`]).
#[derive(Default)]
struct ReadFence {
    epoch: u64,
    in_flight: BTreeMap<u64, u32>,
}

impl ReadFence {
    fn enter(&mut self) -> u64 {
        *self.in_flight.entry(self.epoch).or_default() += 1;
        self.epoch
    }

    fn leave(&mut self, epoch: u64) {
        let count = self.in_flight.get_mut(&epoch).expect("entered before");
        *count -= 1;
        if *count == 0 {
            self.in_flight.remove(&epoch);
        }
    }
}

impl RestoreVolumes {
    pub(crate) fn info(&self) -> Vec<RestoreInfo> {
        self.volumes
            .iter()
            .map(|(id, v)| RestoreInfo {
                id: *id,
                generation: v.generation,
                sequence: v.sequence,
                version_blocks: v.versions.len() as u64,
                history_blocks: v.history_blocks(),
                own_units: v.own.len() as u64,
                reads: v.reads,
                writes: v.writes,
            })
            .collect()
    }

    /// The sort committed record H(`record`), control block at `control`: the newest record of
    /// every R-VOL (FIG 20).
    pub(crate) fn sorted(&mut self, record: u64, control: u64, map: &Arc<ElementMap>) {
        for volume in self.volumes.values_mut() {
            debug_assert!(volume.generation <= record, "R-VOLs show sorted generations");
            volume.records.push((control, map.clone()));
            volume.history_blocks.set(None);
        }
    }

    /// A merge replaced the records whose control blocks are at `sources` (consecutive) by the
    /// one at `control`.
    pub(crate) fn merged(
        &mut self,
        from: u64,
        sources: &[u64],
        control: u64,
        merged: &Arc<ElementMap>,
    ) -> Result<(), EngineError> {
        for volume in self.volumes.values_mut().filter(|v| v.generation <= from) {
            // Both lists run oldest first: the sources are a run of the R-VOL's records.
            let is_run = |first: &usize| {
                let window = volume.records.get(*first..*first + sources.len());
                window.is_some_and(|w| w.iter().map(|(c, _)| *c).eq(sources.iter().copied()))
            };
            let Some(first) = volume.records.iter().position(|(c, _)| Some(c) == sources.first()).filter(is_run) else {
                return Err(EngineError::Damaged(format!(
                    "R-VOL of generation {} does not read the records merged into {from} as one run",
                    volume.generation
                )));
            };
            volume.records.splice(first..first + sources.len(), [(control, merged.clone())]);
            volume.history_blocks.set(None);
        }
        Ok(())
    }
}

impl RestoreVolume {
    /// Where block `unit` reads in the history, if a version or a record holds it (else the
    /// backup): the record's control unit (`None` for a version: version records are never
    /// compressed) and the address, its shared flag kept.
    fn history_address(&self, unit: u64) -> Option<(Option<u64>, u64)> {
        if let Some(address) = self.versions.get(&unit) {
            return Some((None, *address));
        }
        self.records.iter().find_map(|(control, map)| map.raw_address_of(unit).map(|raw| (Some(*control), raw)))
    }

    fn history_blocks(&self) -> u64 {
        if let Some(count) = self.history_blocks.get() {
            return count;
        }
        let count = match self.records.split_first() {
            None => self.versions.len() as u64,
            Some(((_, first), rest)) => {
                let mut union = first.bitmap().clone();
                for (_, map) in rest {
                    union.union_with(map.bitmap());
                }
                let outside = self.versions.keys().filter(|unit| !union.test(**unit)).count() as u64;
                union.count_ones() + outside
            }
        };
        self.history_blocks.set(Some(count));
        count
    }
}

/// Refuses to give up `generations` while an R-VOL shows one of them.
pub(crate) fn check_not_shown(
    shared: &SharedRef,
    generations: std::ops::RangeInclusive<u64>,
) -> Result<(), EngineError> {
    let s = shared.borrow();
    match s.restores.volumes.iter().find(|(_, v)| generations.contains(&v.generation)) {
        Some((id, v)) => Err(EngineError::Invalid(format!(
            "restore volume {id} shows generation {}; delete it before giving that generation up",
            v.generation
        ))),
        None => Ok(()),
    }
}

/// Waits until every R-VOL read that started before this call has completed (no-op without
/// R-VOL reads in flight).
pub(crate) async fn fence(shared: &SharedRef) {
    let epoch = {
        let mut s = shared.borrow_mut();
        let fence = &mut s.restores.fence;
        if fence.in_flight.is_empty() {
            return;
        }
        fence.epoch += 1;
        fence.epoch
    };
    std::future::poll_fn(|_| {
        let s = shared.borrow();
        match s.restores.fence.in_flight.keys().next() {
            Some(oldest) if *oldest < epoch => Poll::Pending,
            _ => Poll::Ready(()),
        }
    })
    .await;
}

/// Opens an R-VOL of `target`: waits for the sort to apply the generations it reads if they
/// are still in the journal, then builds its map under the maintenance lock.
pub(crate) async fn run_open(shared: SharedRef, io: ControlIo<HostRef>, target: RestoreTarget, handle: RestoreHandle) {
    let result = open(&shared, &io, target).await;
    shared.borrow_mut().restores.opening -= 1;
    handle.set(result.map_err(MaintenanceError::from));
}

pub(crate) fn reserve_open(shared: &SharedRef) -> Result<(), EngineError> {
    let mut s = shared.borrow_mut();
    let open = s.restores.volumes.len() + s.restores.opening;
    if open >= MAX_RESTORE_VOLUMES {
        return Err(EngineError::Invalid(format!(
            "{open} restore volumes are open; at most {MAX_RESTORE_VOLUMES} may be (delete one first)"
        )));
    }
    s.restores.opening += 1;
    Ok(())
}

async fn open(shared: &SharedRef, io: &ControlIo<HostRef>, target: RestoreTarget) -> Result<RestoreId, EngineError> {
    let sequence = match target {
        RestoreTarget::Generation(_) => None,
        RestoreTarget::Sequence(sequence) => Some(sequence),
        RestoreTarget::TimeNs(time_ns) => {
            // Under the maintenance lock: the version record it reads is not freed meanwhile.
            take_maintenance_lock(shared).await;
            let found = sequence_at_time(shared, io, time_ns).await;
            shared.borrow_mut().maintenance_running = false;
            Some(found?)
        }
    };
    let (generation, versions_of) = match (target, sequence) {
        (RestoreTarget::Generation(generation), _) => (generation, None),
        (_, Some(sequence)) => {
            let s = shared.borrow();
            let cut = resolve_sequence(&s.meta, s.hot.next_seq, sequence)?;
            (cut.generation, cut.versions_of)
        }
        (_, None) => unreachable!("a sequence or time target has a sequence"),
    };
    check_shown(shared, generation)?;
    wait_sorted(shared, versions_of.unwrap_or(generation)).await?;
    take_maintenance_lock(shared).await;
    let built = async {
        let versions = match (versions_of, sequence) {
            (Some(next), Some(sequence)) => gather_versions(shared, io, next, sequence).await?,
            _ => FxHashMap::default(),
        };
        // Last: the R-VOL joins the list the sort's commits update with no wait after the
        // records are gathered, so it misses none.
        let records = gather_records(shared, io, generation).await?;
        Ok::<_, EngineError>((records, versions))
    }
    .await;
    shared.borrow_mut().maintenance_running = false;
    let (records, versions) = built?;
    let mut s = shared.borrow_mut();
    let id = s.restores.next_id;
    s.restores.next_id += 1;
    s.restores.volumes.insert(
        id,
        RestoreVolume {
            generation,
            sequence,
            versions,
            records,
            history_blocks: std::cell::Cell::new(None),
            own: FxHashMap::default(),
            writing: FxHashSet::default(),
            in_flight: 0,
            closing: false,
            reads: 0,
            writes: 0,
        },
    );
    Ok(id)
}

/// Waits until the sort has applied `generation` (a generation still in the journal: the sort
/// applies it, and a sort interrupted by a restart resumes, before maps are built from the
/// history); refused when no sort will.
async fn wait_sorted(shared: &SharedRef, generation: u64) -> Result<(), EngineError> {
    std::future::poll_fn(|_| {
        let s = shared.borrow();
        let backup = s.meta.history_catalog.backup_generation;
        let interrupted = s.meta.cursor.state == crate::core::format::records::SortState::Running
            && s.meta.cursor.generation > backup
            && !s.sort_running;
        if generation <= backup && !interrupted {
            return Poll::Ready(Ok(()));
        }
        // A rollback pauses the sort only for a while.
        let why = if let Some(error) = &s.sort_error {
            format!("the sort stopped: {error}")
        } else if let Some(error) = &s.failed {
            format!("the volume stopped: {error}")
        } else if s.stopping {
            "the volume is closing".to_string()
        } else if !s.options.sort.automatic {
            "automatic sorting is off: sort now".to_string()
        } else {
            return Poll::Pending;
        };
        Poll::Ready(Err(EngineError::Invalid(format!(
            "generation {generation} must be sorted into the history before it can be restored as a volume, and the sort is not running ({why})"
        ))))
    })
    .await
}

/// Where the image after sequence S comes from ("all" mode): image `generation`, the newest
/// cut at or before S, overlaid, when S is past that cut, with the versions of `versions_of`
/// (= `generation` + 1) up to S.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SequenceCut {
    pub generation: u64,
    pub versions_of: Option<u64>,
}

/// Resolves sequence target `sequence` of a volume whose next request gets `next_sequence`;
/// refuses a volume not in "all" mode, a future target, one older than every image kept, one
/// whose versions were given up, and one in the open generation (not sealed yet).
pub(crate) fn resolve_sequence(meta: &Meta, next_sequence: u64, sequence: u64) -> Result<SequenceCut, EngineError> {
    let unavailable = |why: String| EngineError::TargetUnavailable {
        target: format!("sequence {sequence}"),
        why,
        available: restorable_targets(meta, next_sequence),
    };
    if meta.mode() != JournalMode::All {
        return Err(not_all_mode());
    }
    if sequence >= next_sequence {
        return Err(unavailable(format!(
            "it is in the future (the newest host request has sequence {})",
            next_sequence.saturating_sub(1)
        )));
    }
    let generations = generation_list(meta);
    let cut =
        generations.iter().filter(|g| g.state != "open" && g.last_sequence <= sequence).max_by_key(|g| g.generation);
    let Some(cut) = cut else {
        return Err(unavailable("it is older than the oldest image the volume keeps".into()));
    };
    if sequence == cut.last_sequence {
        return Ok(SequenceCut { generation: cut.generation, versions_of: None });
    }
    let next = cut.generation + 1;
    if next == meta.open.generation {
        return Err(unavailable(format!(
            "it falls in the open generation {next}, whose writes a restore volume reads once they are sealed and sorted (set a marker first)"
        )));
    }
    let sealed =
        meta.sealed.iter().any(|s| s.generation == next && s.generation > meta.history_catalog.backup_generation);
    if !sealed {
        match version_record(meta, next) {
            None => {
                return Err(unavailable(format!(
                    "it falls in generation {next}, whose versions are no longer kept (merged away or deleted)"
                )))
            }
            Some(entry) if sequence > entry.last_sequence => {
                return Err(unavailable(format!(
                    "it falls after generation {next} (cut at {}), whose image was merged away or deleted",
                    entry.last_sequence
                )))
            }
            Some(_) => {}
        }
    }
    Ok(SequenceCut { generation: cut.generation, versions_of: Some(next) })
}

fn not_all_mode() -> EngineError {
    EngineError::Invalid(
        "the volume keeps the \"latest\" journal mode (one element per block and generation): restore a generation; any-point restore needs a volume formatted with journal mode \"all\"".into(),
    )
}

/// The live version record of `generation`'s writes ("all" mode), if kept.
pub(crate) fn version_record(meta: &Meta, generation: u64) -> Option<&CatalogEntry> {
    meta.history_catalog
        .entries
        .iter()
        .find(|e| e.kind == EntryKind::Versions && e.state == EntryState::Live && e.generation == generation)
}

/// The sequence targets a restore volume can open, for error messages: each image's cut, and
/// the versions kept of each generation after an image (the open generation's once sealed).
pub(crate) fn restorable_targets(meta: &Meta, next_sequence: u64) -> String {
    let generations = generation_list(meta);
    let mut parts = Vec::new();
    for info in generations.iter().filter(|g| g.state != "open") {
        parts.push(format!("{} (generation {})", info.last_sequence, info.generation));
    }
    for info in &generations {
        let previous = generations.iter().find(|g| g.generation + 1 == info.generation && g.state != "open");
        if let (Some(previous), Some(_)) = (previous, info.versions) {
            if info.state == "open" {
                let newest = next_sequence.saturating_sub(1);
                parts.push(format!(
                    "{}..={newest} (open generation {}, after a marker)",
                    previous.last_sequence, info.generation
                ));
            } else {
                parts.push(format!(
                    "{}..={} (generation {})",
                    previous.last_sequence, info.last_sequence, info.generation
                ));
            }
        }
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

/// Checks a version record's table against its catalog entry: its generation, cut, and that
/// its versions are exactly the record's units, all within the volume.
pub(crate) fn check_version_table(
    entry: &CatalogEntry,
    table: &VersionTable,
    volume_blocks: u64,
) -> Result<(), EngineError> {
    let damaged =
        |why: String| EngineError::Damaged(format!("version record of generation {}: {why}", entry.generation));
    if table.generation != entry.generation
        || table.cut_sequence != entry.last_sequence
        || table.first_address != entry.element_start
        || table.entries.len() as u64 != entry.element_count
    {
        return Err(damaged(format!(
            "its table names generation {} with {} versions at unit {}, the catalog {} at unit {}",
            table.generation,
            table.entries.len(),
            table.first_address,
            entry.element_count,
            entry.element_start
        )));
    }
    if let Some(bad) = table.entries.iter().find(|v| v.block >= volume_blocks) {
        return Err(damaged(format!("block {} is beyond the volume", bad.block)));
    }
    Ok(())
}

/// The version record of the newest generation with a write taken at or before `time_ns`:
/// the one table a time target needs (write times never go back, FORMAT.md §9.3).
pub(crate) fn version_record_by_time(meta: &Meta, time_ns: u64) -> Option<&CatalogEntry> {
    meta.history_catalog
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Versions && e.element_count > 0 && e.time_ns <= time_ns)
        .max_by_key(|e| e.generation)
}

/// The sequence of the newest write taken at or before `time_ns`, and not before the cut of a
/// generation sealed by then; `table` is [`version_record_by_time`]'s table. `None` when the
/// time is older than everything the volume keeps.
pub(crate) fn sequence_by_time(meta: &Meta, time_ns: u64, table: Option<&VersionTable>) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut take = |sequence: u64| best = Some(best.map_or(sequence, |b: u64| b.max(sequence)));
    // Generations sealed by then (their markers' times): at least their cut.
    for info in generation_list(meta).iter().filter(|g| g.state != "open" && g.time_ns <= time_ns) {
        take(info.last_sequence);
    }
    // Versions in the journal.
    for versions in std::iter::once(&meta.open.versions).chain(meta.sealed.iter().map(|s| &s.versions)) {
        versions.iter().filter(|v| !v.lost && v.time_ns <= time_ns).for_each(|v| take(v.sequence));
    }
    if let Some(table) = table {
        table.entries.iter().filter(|v| v.time_ns <= time_ns).for_each(|v| take(v.sequence));
    }
    best
}

/// Reads a version record's table (checked against its entry).
async fn read_version_table(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    entry: &CatalogEntry,
) -> Result<VersionTable, EngineError> {
    let (lba, bytes, blocks) = {
        let s = shared.borrow();
        (s.meta.history_lba(entry.control_start), entry.control_count * s.meta.unit_bytes(), s.meta.shape.volume_blocks)
    };
    let data = io.read(Role::History, lba, bytes as usize).await?.to_vec();
    let table = VersionTable::decode(&data)
        .map_err(|e| EngineError::Damaged(format!("version record of generation {}: {e}", entry.generation)))?;
    check_version_table(entry, &table, blocks)?;
    Ok(table)
}

/// Resolves time target `time_ns` to a sequence (under the maintenance lock).
async fn sequence_at_time(shared: &SharedRef, io: &ControlIo<HostRef>, time_ns: u64) -> Result<u64, EngineError> {
    let unavailable = |why: &str| {
        let s = shared.borrow();
        EngineError::TargetUnavailable {
            target: format!("time {}", crate::core::time::rfc3339(time_ns)),
            why: why.into(),
            available: restorable_targets(&s.meta, s.hot.next_seq),
        }
    };
    if shared.borrow().meta.mode() != JournalMode::All {
        return Err(not_all_mode());
    }
    if time_ns > super::now_ns() {
        return Err(unavailable("it is in the future"));
    }
    let entry = version_record_by_time(&shared.borrow().meta, time_ns).cloned();
    let table = match &entry {
        Some(entry) => Some(read_version_table(shared, io, entry).await?),
        None => None,
    };
    let found = sequence_by_time(&shared.borrow().meta, time_ns, table.as_ref());
    found.ok_or_else(|| unavailable("it is older than every generation and write the volume keeps"))
}

/// The versions of generation `generation` up to `sequence`, newest per block: unit → its
/// history unit in the generation's version record (under the maintenance lock, so the record
/// is not dropped meanwhile).
async fn gather_versions(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    generation: u64,
    sequence: u64,
) -> Result<FxHashMap<u64, u64>, EngineError> {
    let entry = {
        let s = shared.borrow();
        let entry = version_record(&s.meta, generation).cloned();
        match entry {
            Some(entry) if sequence <= entry.last_sequence => entry,
            _ => {
                return Err(EngineError::TargetUnavailable {
                    target: format!("sequence {sequence}"),
                    why: format!("the versions of generation {generation} are no longer kept (merged away or deleted)"),
                    available: restorable_targets(&s.meta, s.hot.next_seq),
                })
            }
        }
    };
    if entry.element_count == 0 {
        return Ok(FxHashMap::default()); // a generation without writes
    }
    let table = read_version_table(shared, io, &entry).await?;
    Ok(table.newest_up_to(sequence).into_iter().map(|(block, k)| (block, table.first_address + k as u64)).collect())
}

/// `generation` is one the volume holds an image of.
fn check_shown(shared: &SharedRef, generation: u64) -> Result<(), EngineError> {
    let s = shared.borrow();
    let generations = generation_list(&s.meta);
    match generations.iter().find(|g| g.generation <= generation && generation <= g.through_generation) {
        Some(g) if g.generation == generation && g.state != "open" => Ok(()),
        Some(g) if g.state == "open" => Err(EngineError::Invalid(format!(
            "generation {generation} is the open generation; mark it first to restore it"
        ))),
        Some(g) => Err(EngineError::Invalid(format!(
            "generation {generation} was merged into generations {}..={}; only {} of them can be restored",
            g.generation, g.through_generation, g.generation
        ))),
        None => Err(EngineError::Invalid(format!("generation {generation} is not held by this volume"))),
    }
}

/// The records ≥ `generation` with their maps (FIG 13); gathered again if a sort committed a
/// record meanwhile.
async fn gather_records(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    generation: u64,
) -> Result<Vec<(u64, Arc<ElementMap>)>, EngineError> {
    loop {
        let backup = shared.borrow().meta.history_catalog.backup_generation;
        let records: Vec<_> = live_records(shared).into_iter().filter(|r| r.through_generation >= generation).collect();
        if generation < backup
            && (records.first().is_none_or(|r| r.generation != generation)
                || records.windows(2).any(|w| w[1].generation != w[0].through_generation + 1))
        {
            return Err(EngineError::Invalid(format!(
                "generation {generation} cannot be restored (it was merged away or deleted)"
            )));
        }
        let mut maps = Vec::with_capacity(records.len());
        for record in &records {
            maps.push((record.control_start, read_record_map(shared, io, record).await?));
        }
        if shared.borrow().meta.history_catalog.backup_generation != backup {
            continue;
        }
        return Ok(maps);
    }
}

/// Closes R-VOL `id`: new requests are refused; once those in flight are done its units are
/// freed.
pub(crate) async fn run_close(shared: SharedRef, id: RestoreId) {
    std::future::poll_fn(|_| {
        let s = shared.borrow();
        if s.restores.volumes.get(&id).is_some_and(|v| v.in_flight > 0) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    let mut s = shared.borrow_mut();
    if let Some(volume) = s.restores.volumes.remove(&id) {
        for unit in volume.own.values() {
            let _ = s.meta.allocator.free(Extent::new(*unit, 1));
        }
        s.space_freed = true;
    }
}

pub(crate) fn begin_close(shared: &SharedRef, id: RestoreId) -> Result<(), EngineError> {
    let mut s = shared.borrow_mut();
    match s.restores.volumes.get_mut(&id) {
        Some(volume) if !volume.closing => {
            volume.closing = true;
            Ok(())
        }
        _ => Err(EngineError::Invalid(format!("restore volume {id} is not open"))),
    }
}

/// Admits a request on R-VOL `id`; `Err` gives the request back with why it was refused.
pub(crate) fn admit(shared: &SharedRef, id: RestoreId) -> Result<(), HostError> {
    let mut s = shared.borrow_mut();
    match s.restores.volumes.get_mut(&id) {
        Some(volume) if !volume.closing && volume.in_flight < MAX_RESTORE_IN_FLIGHT => {
            volume.in_flight += 1;
            Ok(())
        }
        Some(volume) if !volume.closing => {
            Err(HostError::Busy(format!("restore volume {id} has {MAX_RESTORE_IN_FLIGHT} requests in flight")))
        }
        _ => Err(HostError::NoRestoreVolume(id)),
    }
}

/// Runs one admitted request on R-VOL `id` and queues its completion for the host.
pub(crate) async fn run_request(
    shared: SharedRef,
    io: ControlIo<HostRef>,
    id: RestoreId,
    tag: Tag,
    request: HostRequest,
) {
    let (result, payload) = match request {
        HostRequest::Read { offset_blocks, buffers } => {
            let (result, buffers) = read(&shared, &io, id, offset_blocks, buffers).await;
            (result, Payload::Read(buffers))
        }
        HostRequest::Write { offset_blocks, buffers } => {
            let result = write(&shared, &io, id, offset_blocks, Content::Data(&buffers), buffers.len() as u64).await;
            (result, Payload::Write(buffers))
        }
        HostRequest::Unmap { offset_blocks, num_blocks } | HostRequest::WriteZeroes { offset_blocks, num_blocks } => {
            let bytes = num_blocks * shared.borrow().meta.block_size[0];
            (write(&shared, &io, id, offset_blocks, Content::Zeroes, bytes).await, Payload::None)
        }
        HostRequest::Flush => (io.flush(Role::History).await.map_err(HostError::from), Payload::None),
    };
    let mut s = shared.borrow_mut();
    if let Some(volume) = s.restores.volumes.get_mut(&id) {
        volume.in_flight -= 1;
    }
    s.hot.completed.push(HostCompletion { tag, result, payload });
}

/// Where a unit of an R-VOL reads from.
#[derive(Debug, Clone, Copy)]
enum Location {
    /// A device block.
    Device(Role, u64),
    /// Logical unit `address` of the compressed record whose control block is at `control`
    /// (embodiment 8): read through its frame.
    Compressed { control: u64, address: u64 },
}

/// Where unit `unit` of R-VOL `id` reads from now.
fn locate(shared: &SharedRef, id: RestoreId, unit: u64) -> Location {
    let s = shared.borrow();
    let volume = &s.restores.volumes[&id];
    if let Some(own) = volume.own.get(&unit) {
        return Location::Device(Role::History, s.meta.history_lba(*own));
    }
    match volume.history_address(unit) {
        Some((Some(control), raw))
            if super::compress::through_frames(s.meta.compression.is_compressed(control), raw) =>
        {
            Location::Compressed { control, address: raw & ADDRESS_MASK }
        }
        Some((_, raw)) => Location::Device(Role::History, s.meta.history_lba(raw & ADDRESS_MASK)),
        None => {
            // FIG 20: a block the running sort saved (and may have overwritten) reads the copy.
            let cursor = &s.meta.cursor;
            let saved = s.sorting.as_ref().filter(|_| unit < cursor.saved_through).and_then(|m| m.address_of(unit));
            match saved {
                Some(address) => Location::Device(Role::History, s.meta.history_lba(address)),
                None => Location::Device(Role::Backup, s.meta.volume_lba(2, unit)),
            }
        }
    }
}

/// Reads unit `unit` as R-VOL `id` shows it, fenced against the sort and merges.
async fn read_unit(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    id: RestoreId,
    unit: u64,
) -> Result<IoBuffers, HostError> {
    let location = locate(shared, id, unit);
    let len = shared.borrow().meta.unit_bytes() as usize;
    let epoch = shared.borrow_mut().restores.fence.enter();
    let result = match location {
        Location::Device(role, lba) => io.read(role, lba, len).await.map_err(HostError::from),
        Location::Compressed { control, address } => {
            match super::compress::read_element(shared, io, control, address).await {
                Ok(bytes) => {
                    let mut buffer = io.alloc(Role::History, len);
                    buffer.as_mut_slice().copy_from_slice(&bytes);
                    Ok(IoBuffers::single(buffer))
                }
                Err(EngineError::Io(error)) => Err(HostError::from(error)),
                Err(error) => Err(HostError::Damaged(error.to_string())),
            }
        }
    };
    shared.borrow_mut().restores.fence.leave(epoch);
    result
}

fn check_range(shared: &SharedRef, offset_blocks: u64, bytes: u64) -> Result<(u64, u64), HostError> {
    let s = shared.borrow();
    let block_size = s.meta.block_size[0];
    let volume_blocks = s.meta.geometry.volume_device_blocks();
    let blocks = bytes / block_size;
    if bytes % block_size != 0 {
        return Err(HostError::InvalidBuffers { bytes: bytes as usize, block_size: block_size as usize });
    }
    if blocks == 0 || offset_blocks.checked_add(blocks).is_none_or(|end| end > volume_blocks) {
        return Err(HostError::OutOfRange { offset_blocks, num_blocks: blocks, volume_blocks });
    }
    Ok((offset_blocks * block_size, bytes))
}

async fn read(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    id: RestoreId,
    offset_blocks: u64,
    mut buffers: IoBuffers,
) -> (Result<(), HostError>, IoBuffers) {
    let (start, len) = match check_range(shared, offset_blocks, buffers.len() as u64) {
        Ok(range) => range,
        Err(error) => return (Err(error), buffers),
    };
    let unit = shared.borrow().meta.unit_bytes();
    let (first, end) = (start / unit, (start + len).div_ceil(unit));
    let whole_unit = start % unit == 0 && len == unit;
    if let (true, Location::Device(role, lba)) = (whole_unit, locate(shared, id, first)) {
        // One whole unit from a device: straight into the host's buffers.
        let epoch = shared.borrow_mut().restores.fence.enter();
        let completion = io.submit(role, Operation::Read { offset_blocks: lba, buffers }).await;
        shared.borrow_mut().restores.fence.leave(epoch);
        let Payload::Read(buffers) = completion.payload else { unreachable!("a read completes with its buffers") };
        if let Some(volume) = shared.borrow_mut().restores.volumes.get_mut(&id) {
            volume.reads += 1;
        }
        return (completion.result.map_err(HostError::from), buffers);
    }
    let reads = (first..end).map(|u| read_unit(shared, io, id, u));
    match run_bounded(reads, UNITS_IN_FLIGHT).await {
        Ok(units) => {
            for (index, data) in units.iter().enumerate() {
                let unit_start = (first + index as u64) * unit;
                let from = start.max(unit_start);
                let to = (start + len).min(unit_start + unit);
                let bytes = data.to_vec();
                buffers.write_at(
                    (from - start) as usize,
                    &bytes[(from - unit_start) as usize..(to - unit_start) as usize],
                );
            }
            if let Some(volume) = shared.borrow_mut().restores.volumes.get_mut(&id) {
                volume.reads += 1;
            }
            (Ok(()), buffers)
        }
        Err(error) => (Err(error), buffers),
    }
}

enum Content<'a> {
    Data(&'a IoBuffers),
    Zeroes,
}

async fn write(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    id: RestoreId,
    offset_blocks: u64,
    content: Content<'_>,
    bytes: u64,
) -> Result<(), HostError> {
    let (start, len) = check_range(shared, offset_blocks, bytes)?;
    let unit = shared.borrow().meta.unit_bytes();
    let (first, end) = (start / unit, (start + len).div_ceil(unit));
    let content = &content;
    let writes = (first..end).map(|u| async move {
        let unit_start = u * unit;
        let from = start.max(unit_start);
        let to = (start + len).min(unit_start + unit);
        write_unit(
            shared,
            io,
            id,
            u,
            (from - unit_start) as usize,
            move |out: &mut [u8]| match content {
                Content::Data(buffers) => buffers.read_at((from - start) as usize, out),
                Content::Zeroes => out.fill(0),
            },
            (to - from) as usize,
        )
        .await
    });
    run_bounded(writes, UNITS_IN_FLIGHT).await?;
    if let Some(volume) = shared.borrow_mut().restores.volumes.get_mut(&id) {
        volume.writes += 1;
    }
    Ok(())
}

/// Writes `len` bytes at `at` within unit `unit` of R-VOL `id` (FIG 15): into its own history
/// unit, allocated on the first write, the rest of the unit read first when partial.
async fn write_unit(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    id: RestoreId,
    unit: u64,
    at: usize,
    fill: impl FnOnce(&mut [u8]),
    len: usize,
) -> Result<(), HostError> {
    // One write per unit at a time: a partial write reads what the previous one wrote.
    std::future::poll_fn(|_| {
        let mut s = shared.borrow_mut();
        let volume = s.restores.volumes.get_mut(&id).expect("admitted requests keep the R-VOL");
        if volume.writing.insert(unit) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    let result = async {
        let unit_bytes = shared.borrow().meta.unit_bytes() as usize;
        let mut data = if len == unit_bytes {
            io.alloc(Role::History, unit_bytes)
        } else {
            let old = read_unit(shared, io, id, unit).await?;
            let mut buffer = io.alloc(Role::History, unit_bytes);
            old.read_at(0, buffer.as_mut_slice());
            buffer
        };
        fill(&mut data.as_mut_slice()[at..at + len]);
        let (address, fresh) = {
            let mut s = shared.borrow_mut();
            let own = s.restores.volumes[&id].own.get(&unit).copied();
            match own {
                Some(address) => (address, false),
                None => {
                    let free = s.meta.allocator.free_units();
                    let extent =
                        s.meta.allocator.allocate(1).map_err(|_| HostError::RestoreSpace { id, free_units: free })?;
                    (extent.start, true)
                }
            }
        };
        let lba = shared.borrow().meta.history_lba(address);
        let written = io.write(Role::History, lba, Arc::new(IoBuffers::single(data)), false).await;
        let mut s = shared.borrow_mut();
        match written {
            Ok(()) => {
                if fresh {
                    s.restores.volumes.get_mut(&id).expect("admitted").own.insert(unit, address);
                }
                Ok(())
            }
            Err(error) => {
                if fresh {
                    let _ = s.meta.allocator.free(Extent::new(address, 1));
                }
                Err(HostError::from(error))
            }
        }
    }
    .await;
    shared.borrow_mut().restores.volumes.get_mut(&id).expect("admitted").writing.remove(&unit);
    result
}
