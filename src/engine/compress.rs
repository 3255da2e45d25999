//! Compression of sealed history (seed 001 embodiment 8, FIG 50): a live history record —
//! sorted or merged — is rewritten compressed into free history space and replaces itself with
//! one catalog write, and back.
//!
//! - **Compress generation g**: reserve room for the worst case (the frame table plus every
//!   frame stored raw) and a control block; cut the record's elements into frames of
//!   [`FRAME_BYTES`], compress each alone (lz4; a frame that does not shrink is stored
//!   raw), write them packed after the frame table, write a control block whose addresses are
//!   the elements' logical units (`0..element_count`, the record's own numbering), flush; then
//!   one catalog write switches the entry to the new extents with the `compressed` flag, its
//!   stored and original sizes. R-VOLs reading the record are switched to the new one, reads
//!   started before drain, and only then is the source freed. A crash before the catalog write
//!   leaves the source as it was; the copy's units are free at the next open, since no entry
//!   owns them. A record whose copy would not be smaller is left as it is.
//! - **Decompress**: the same in reverse — frames expanded into a contiguous extent of the
//!   original size, addresses back to units.
//! - **Reads** of a compressed record (R-VOLs, restores, rollbacks, merges) read and check one
//!   frame ([`read_element`]); the last frames read are kept ([`FRAME_CACHE_FRAMES`]).

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::core::allocator::Extent;
use crate::core::element_map::{Addressing, ElementMap, ADDRESS_MASK, ADDRESS_SHARED};
use crate::core::format::catalog::{flags, Catalog, CatalogEntry, EntryKind, EntryState};
use crate::core::format::control_block::ControlBlock;
use crate::core::format::frame_table::{encode_frame, FrameEntry, FrameTable, CODEC_LZ4};
use crate::core::format::pad_to_pages;
use crate::device::IoBuffers;

use super::io::{run_bounded, ControlIo, HostOwner, Role};
use super::merge::{live_records, read_record_map, take_maintenance_lock, MaintenanceError};
use super::meta::Meta;
use super::volume::{update_history_catalog, HostRef, SharedRef};
use super::{restore_volume, EngineError};

/// Bytes per frame (16 units of 4 KiB): lz4 finds matches only within 64 KiB back, so larger
/// frames would barely compress better, while a read of one element decompresses its whole
/// frame.
pub const FRAME_BYTES: u64 = 64 << 10;
/// Decompressed frames kept per volume (1 MiB): sequential reads of a record decompress each
/// frame once.
pub(crate) const FRAME_CACHE_FRAMES: usize = 16;
/// Frames a compression or decompression reads at once (1 MiB).
const FRAMES_IN_FLIGHT: usize = 16;

/// Units per frame for `unit_bytes`-byte units.
fn frame_units(unit_bytes: u64) -> u32 {
    (FRAME_BYTES / unit_bytes).max(1) as u32
}
/// Bytes a compression writes at once.
const WRITE_BATCH_BYTES: usize = 1 << 20;

/// What a compression or decompression did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompressReport {
    pub generation: u64,
    pub through_generation: u64,
    /// Whether the record is compressed now (false: it would not have got smaller and was
    /// left as it was, or it was decompressed).
    pub compressed: bool,
    /// Bytes of the record's elements uncompressed.
    pub original_bytes: u64,
    /// Bytes the elements take as stored now (frame table and frames when compressed).
    pub stored_bytes: u64,
    pub frames: u64,
    /// Frames stored raw because they did not shrink.
    pub raw_frames: u64,
    /// History units of the record (elements and control block) before and after.
    pub units_before: u64,
    pub units_after: u64,
    /// Units of the record's old extent kept, retained, because other records point at them
    /// (dedup across records, FIG 41/42); they count in neither `units_*`.
    pub retained_for_others: u64,
    /// Elements of the record that point at other records' or retained units, kept as they are.
    pub shared_across: u64,
}

/// The result of a compression request, filled in when it completes.
#[derive(Clone, Default)]
pub struct CompressHandle {
    result: std::rc::Rc<std::cell::RefCell<Option<Result<CompressReport, MaintenanceError>>>>,
}

impl CompressHandle {
    pub fn result(&self) -> Option<Result<CompressReport, MaintenanceError>> {
        self.result.borrow().clone()
    }

    fn set(&self, result: Result<CompressReport, MaintenanceError>) {
        *self.result.borrow_mut() = Some(result);
    }
}

/// A frame of a record: (control unit of the record, frame index).
pub(crate) type FrameKey = (u64, usize);

/// A live compressed record, by the unit of its control block.
#[derive(Debug, Clone)]
struct CompressedRecord {
    generation: u64,
    element_start: u64,
    element_count: u64,
    /// Read at the first read of the record.
    table: Option<Arc<FrameTable>>,
}

/// The volume's compressed records, their frame tables and the last frames read.
#[derive(Debug, Default)]
pub(crate) struct Compression {
    records: FxHashMap<u64, CompressedRecord>,
    /// (control unit, frame) → decompressed frame, oldest first.
    frames: VecDeque<(FrameKey, Arc<Vec<u8>>)>,
    /// Frames being read (at most one read per frame at a time).
    loading: FxHashSet<FrameKey>,
    /// (control unit, generation) of records whose compression did not make them smaller:
    /// the retention policy does not try them again (forgotten at close).
    incompressible: FxHashSet<(u64, u64)>,
}

impl Compression {
    /// The compressed records a catalog lists (at open).
    pub fn from_catalog(catalog: &Catalog) -> Self {
        let mut compression = Compression::default();
        for entry in catalog.entries.iter().filter(|e| is_compressed_record(e)) {
            compression.records.insert(
                entry.control_start,
                CompressedRecord {
                    generation: entry.generation,
                    element_start: entry.element_start,
                    element_count: entry.element_count,
                    table: None,
                },
            );
        }
        compression
    }

    /// Whether the record whose control block is at `control` is compressed.
    pub fn is_compressed(&self, control: u64) -> bool {
        self.records.contains_key(&control)
    }

    /// Forgets the record of `generation` whose space is freed. Both numbers must match: a
    /// control unit alone may name another record (one that took the unit since, or an
    /// entry without units whose control_start reads 0).
    pub fn forget(&mut self, control: u64, generation: u64) {
        if self.records.get(&control).is_some_and(|record| record.generation == generation) {
            self.records.remove(&control);
            self.frames.retain(|((c, _), _)| *c != control);
        }
    }

    fn frame(&self, control: u64, index: usize) -> Option<Arc<Vec<u8>>> {
        self.frames.iter().find(|(key, _)| *key == (control, index)).map(|(_, frame)| frame.clone())
    }

    fn keep_frame(&mut self, control: u64, index: usize, frame: Arc<Vec<u8>>) {
        if self.records.contains_key(&control) && self.frame(control, index).is_none() {
            self.frames.push_back(((control, index), frame));
            while self.frames.len() > FRAME_CACHE_FRAMES {
                self.frames.pop_front();
            }
        }
    }
}

pub(crate) fn is_compressed_record(entry: &CatalogEntry) -> bool {
    matches!(entry.kind, EntryKind::History | EntryKind::Merged)
        && entry.state == EntryState::Live
        && entry.flags & flags::COMPRESSED != 0
}

/// Whether the element at `raw` (an address of a record's map, flags included) reads through
/// the record's frames: a compressed record's own elements do; its shared addresses (dedup
/// across records) are history units of other records or retained extents, read as they are.
pub(crate) fn through_frames(compressed: bool, raw: u64) -> bool {
    compressed && raw & ADDRESS_SHARED == 0
}

/// Where history units are on the history device (copied out of [`Meta`] to use across awaits).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HistoryUnits {
    start_bytes: u64,
    unit_bytes: u64,
    block_size: u64,
}

impl HistoryUnits {
    pub fn of(meta: &Meta) -> Self {
        HistoryUnits {
            start_bytes: meta.history.units.start_bytes,
            unit_bytes: meta.unit_bytes(),
            block_size: meta.block_size[3],
        }
    }

    fn lba(&self, unit: u64) -> u64 {
        (self.start_bytes + unit * self.unit_bytes) / self.block_size
    }
}

fn damaged(generation: u64, what: impl std::fmt::Display) -> EngineError {
    EngineError::Damaged(format!("compressed history generation {generation}: {what}"))
}

/// Reads and checks the frame table at the start of a compressed record's extent.
pub(crate) async fn read_frame_table<H: HostOwner>(
    io: &ControlIo<H>,
    units: HistoryUnits,
    generation: u64,
    element_start: u64,
    element_count: u64,
) -> Result<FrameTable, EngineError> {
    let unit = units.unit_bytes;
    if element_count == 0 {
        return Err(damaged(generation, "the record owns no units for its frame table"));
    }
    let first = io.read(Role::History, units.lba(element_start), unit as usize).await?.to_vec();
    let length = FrameTable::length_from_header(&first).map_err(|e| damaged(generation, e))?;
    let table_units = (length as u64).div_ceil(unit);
    if table_units > element_count {
        return Err(damaged(generation, format!("a frame table of {length} bytes in {element_count} units")));
    }
    let bytes = if table_units > 1 {
        io.read(Role::History, units.lba(element_start), (table_units * unit) as usize).await?.to_vec()
    } else {
        first
    };
    let table = FrameTable::decode(&bytes).map_err(|e| damaged(generation, e))?;
    if table.generation != generation || u64::from(table.unit_bytes) != unit {
        return Err(damaged(
            generation,
            format!("its frame table describes generation {} in {}-byte units", table.generation, table.unit_bytes),
        ));
    }
    table.validate(Some(element_count * unit)).map_err(|e| damaged(generation, e))?;
    Ok(table)
}

/// Reads, checks and decompresses frame `index` of a compressed record.
pub(crate) async fn read_frame<H: HostOwner>(
    io: &ControlIo<H>,
    units: HistoryUnits,
    element_start: u64,
    table: &FrameTable,
    index: usize,
) -> Result<Vec<u8>, EngineError> {
    let unit = units.unit_bytes;
    let frame = table
        .frames
        .get(index)
        .ok_or_else(|| damaged(table.generation, format!("frame {index} of {} is read", table.frames.len())))?;
    let first = frame.offset_bytes / unit;
    let end = (frame.offset_bytes + u64::from(frame.stored_bytes)).div_ceil(unit);
    let data = io.read(Role::History, units.lba(element_start + first), ((end - first) * unit) as usize).await?;
    let data = data.to_vec();
    let at = (frame.offset_bytes - first * unit) as usize;
    table.decode_frame(index, &data[at..at + frame.stored_bytes as usize]).map_err(|e| damaged(table.generation, e))
}

/// The contents of logical unit `address` of the compressed record whose control block is at
/// `control` (one unit), through the frame cache.
pub(crate) async fn read_element(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    control: u64,
    address: u64,
) -> Result<Vec<u8>, EngineError> {
    let (record, units) = {
        let s = shared.borrow();
        let record = s.meta.compression.records.get(&control).cloned().ok_or_else(|| {
            EngineError::Damaged(format!("the history record at unit {control} is read as compressed and is not"))
        })?;
        (record, HistoryUnits::of(&s.meta))
    };
    let table = match &record.table {
        Some(table) => table.clone(),
        None => {
            let table = Arc::new(
                read_frame_table(io, units, record.generation, record.element_start, record.element_count).await?,
            );
            if let Some(kept) = shared.borrow_mut().meta.compression.records.get_mut(&control) {
                if kept.generation == record.generation {
                    kept.table = Some(table.clone());
                }
            }
            table
        }
    };
    let address = address & ADDRESS_MASK;
    if address >= table.logical_units {
        return Err(damaged(
            record.generation,
            format!("element at logical unit {address} of {}", table.logical_units),
        ));
    }
    let index = (address / u64::from(table.frame_units)) as usize;
    // One read per frame: concurrent readers of a frame being read wait for it.
    let frame = loop {
        if let Some(frame) = shared.borrow().meta.compression.frame(control, index) {
            break frame;
        }
        if shared.borrow_mut().meta.compression.loading.insert((control, index)) {
            let read = read_frame(io, units, record.element_start, &table, index).await.map(Arc::new);
            let mut s = shared.borrow_mut();
            s.meta.compression.loading.remove(&(control, index));
            let frame = read?;
            s.meta.compression.keep_frame(control, index, frame.clone());
            break frame;
        }
        std::future::poll_fn(|_| {
            if shared.borrow().meta.compression.loading.contains(&(control, index)) {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
    };
    let unit = units.unit_bytes as usize;
    let at = (address % u64::from(table.frame_units)) as usize * unit;
    Ok(frame[at..at + unit].to_vec())
}

/// Runs one compression (`compress`) or decompression request under the maintenance lock.
pub(crate) async fn run(
    shared: SharedRef,
    io: ControlIo<HostRef>,
    generation: u64,
    compress: bool,
    handle: CompressHandle,
) {
    take_maintenance_lock(&shared).await;
    let result = if compress {
        compress_record(&shared, &io, generation).await
    } else {
        decompress_record(&shared, &io, generation).await
    };
    shared.borrow_mut().maintenance_running = false;
    if let Err(EngineError::Io(error)) = &result {
        shared.borrow_mut().failed.get_or_insert(format!("history compression failed: {error}"));
    }
    handle.set(result.map_err(MaintenanceError::from));
}

fn find_record(shared: &SharedRef, generation: u64) -> Result<CatalogEntry, EngineError> {
    let records = live_records(shared);
    records.iter().find(|r| r.generation == generation).cloned().ok_or_else(|| {
        let held: Vec<String> = records.iter().map(|r| r.generation.to_string()).collect();
        EngineError::Invalid(format!(
            "generation {generation} has no history record (records start at generations: {})",
            if held.is_empty() { "none".to_string() } else { held.join(", ") }
        ))
    })
}

/// The record's map with `rebase` applied to the address of every element it stores itself
/// (flags kept); `None` from it means the address lies outside the record. Addresses flagged
/// shared point at units of other records or retained extents (dedup across records, FIG 39):
/// they are kept as they are, so the record goes on pointing at the same units whether it is
/// compressed or not.
fn rebased_map(
    generation: u64,
    map: &ElementMap,
    rebase: impl Fn(u64) -> Option<u64>,
) -> Result<ElementMap, EngineError> {
    let addressing = match map.addressing() {
        Addressing::Contiguous { first } => Addressing::Contiguous {
            first: rebase(*first).ok_or_else(|| damaged(generation, "its first element is outside its units"))?,
        },
        Addressing::Explicit(table) => Addressing::Explicit(
            table
                .iter()
                .map(|raw| {
                    if raw & ADDRESS_SHARED != 0 {
                        return Ok(*raw);
                    }
                    rebase(raw & ADDRESS_MASK).map(|address| (raw & !ADDRESS_MASK) | address).ok_or_else(|| {
                        damaged(generation, format!("an element at unit {} is outside its units", raw & ADDRESS_MASK))
                    })
                })
                .collect::<Result<Vec<u64>, _>>()?,
        ),
    };
    ElementMap::new(map.bitmap().clone(), addressing).map_err(|e| damaged(generation, e))
}

/// Writes `bytes` (whole units) at history unit `unit`.
async fn write_units(io: &ControlIo<HostRef>, units: HistoryUnits, unit: u64, bytes: &[u8]) -> Result<(), EngineError> {
    debug_assert_eq!(bytes.len() as u64 % units.unit_bytes, 0);
    let mut buffer = io.alloc(Role::History, bytes.len());
    buffer.as_mut_slice().copy_from_slice(bytes);
    io.write(Role::History, units.lba(unit), Arc::new(IoBuffers::single(buffer)), false).await?;
    Ok(())
}

/// The commit shared by both directions: the source entry takes the new extents (one catalog
/// write), R-VOLs switch to the new record, earlier reads drain, the source's units are freed.
struct Replacement {
    elements: Extent,
    control: Extent,
    map: Arc<ElementMap>,
    table: Option<Arc<FrameTable>>,
    stored_bytes: u64,
    original_bytes: u64,
}

async fn replace(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    source: &CatalogEntry,
    new: Replacement,
) -> Result<u64, EngineError> {
    let (kind, generation, old_control) = (source.kind, source.generation, source.control_start);
    let (elements, control, stored_bytes, original_bytes) =
        (new.elements, new.control, new.stored_bytes, new.original_bytes);
    // The source's units leave like a deleted record's (FIG 41/42): those other records point
    // at through dedup stay, as retained extents, in the same catalog write; the rest is
    // freed after it. The record's own shared addresses are the same in its new map.
    let planned = async {
        let referenced =
            super::dedup::referenced_units(shared, io, std::slice::from_ref(source), Some(&new.map)).await?;
        super::dedup::plan_leaving(&shared.borrow().meta.history_catalog, std::slice::from_ref(source), &referenced)
    }
    .await;
    let retention = match planned {
        Ok(retention) => retention,
        Err(error) => {
            // Nothing references the copy yet: the source stays as it was.
            release(shared, &[elements, control]);
            return Err(error);
        }
    };
    let retained = retention.clone();
    let retained_before = super::dedup::retained_units(&shared.borrow().meta.history_catalog);
    let retained_after = retention.retained_units();
    update_history_catalog(shared, io, move |catalog| {
        super::dedup::write_retained(catalog, &retained);
        let entry = catalog
            .entries
            .iter_mut()
            .find(|e| {
                e.kind == kind
                    && e.state == EntryState::Live
                    && e.generation == generation
                    && e.control_start == old_control
            })
            .ok_or_else(|| EngineError::Damaged(format!("history generation {generation} lost its catalog entry")))?;
        entry.element_start = elements.start;
        entry.element_count = elements.units;
        entry.control_start = control.start;
        entry.control_count = control.units;
        entry.stored_bytes = stored_bytes;
        entry.original_bytes = original_bytes;
        if original_bytes > 0 {
            entry.flags |= flags::COMPRESSED;
        } else {
            entry.flags &= !flags::COMPRESSED;
        }
        Ok(())
    })
    .await?;
    {
        let mut s = shared.borrow_mut();
        s.meta.record_maps.insert(control.start, generation, new.map.clone());
        if let Some(table) = new.table {
            s.meta.compression.records.insert(
                control.start,
                CompressedRecord {
                    generation,
                    element_start: elements.start,
                    element_count: elements.units,
                    table: Some(table),
                },
            );
        }
        s.restores.merged(generation, &[old_control], control.start, &new.map)?;
    }
    // Reads that started on the source finish before its units can be reused.
    restore_volume::fence(shared).await;
    let mut s = shared.borrow_mut();
    super::dedup::free_leaving(&mut s.meta, std::slice::from_ref(source), &retention)?;
    s.space_freed = true;
    Ok(retained_after.saturating_sub(retained_before))
}

fn release(shared: &SharedRef, extents: &[Extent]) {
    let mut s = shared.borrow_mut();
    for extent in extents.iter().filter(|e| e.units > 0) {
        let _ = s.meta.allocator.free(*extent);
    }
}

/// Compresses the live record of `generation` (see the module doc).
pub(crate) async fn compress_record(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    generation: u64,
) -> Result<CompressReport, EngineError> {
    let source = find_record(shared, generation)?;
    if source.flags & flags::COMPRESSED != 0 {
        return Err(EngineError::Invalid(format!("generation {generation}'s history record is compressed already")));
    }
    let logical_units = source.element_count;
    if logical_units == 0 {
        // A generation that changed nothing: there is nothing to make smaller.
        return Ok(CompressReport {
            generation,
            through_generation: source.through_generation,
            stored_bytes: source.stored_bytes,
            units_before: source.control_count,
            units_after: source.control_count,
            ..Default::default()
        });
    }
    let map = read_record_map(shared, io, &source).await?;
    let (start, end) = (source.element_start, source.element_start + logical_units);
    let logical = rebased_map(generation, &map, |a| (start..end).contains(&a).then(|| a - start))?;
    let units = HistoryUnits::of(&shared.borrow().meta);
    let unit = units.unit_bytes;
    let frame_units = frame_units(unit);
    let frame_count = FrameTable::frame_count(logical_units, frame_units);
    let table_bytes = pad_to_pages(FrameTable::encoded_len(frame_count as usize)) as u64;
    let data_offset = table_bytes.div_ceil(unit) * unit;
    let explicit = if matches!(logical.addressing(), Addressing::Explicit(_)) { logical.len() } else { 0 };
    // Room for the worst case: every frame stored raw; what the frames saved is freed at the
    // commit.
    let extents = shared.borrow_mut().meta.allocate_record_with_table(
        "compression",
        generation,
        data_offset / unit + logical_units,
        explicit,
    )?;
    let (output, control) = (extents.elements, extents.control);
    let mut report = CompressReport {
        generation,
        through_generation: source.through_generation,
        original_bytes: logical_units * unit,
        frames: frame_count,
        units_before: source.element_count + source.control_count,
        ..Default::default()
    };
    let written = async {
        let mut frames = Vec::with_capacity(frame_count as usize);
        // Bytes not yet written, from byte `flushed` of the output extent.
        let mut pending: Vec<u8> = Vec::with_capacity(2 * WRITE_BATCH_BYTES);
        let mut flushed = data_offset;
        let mut next = data_offset;
        let indexes: Vec<u64> = (0..frame_count).collect();
        for batch in indexes.chunks(FRAMES_IN_FLIGHT) {
            // A batch of frames is read at once (bounded), then compressed in order.
            let reads = batch.iter().map(|index| {
                let first = index * u64::from(frame_units);
                let count = u64::from(frame_units).min(logical_units - first);
                io.read(Role::History, units.lba(start + first), (count * unit) as usize)
            });
            for raw in run_bounded(reads, FRAMES_IN_FLIGHT).await? {
                let (stored, is_raw) = encode_frame(&raw.to_vec());
                frames.push(FrameEntry {
                    offset_bytes: next,
                    stored_bytes: stored.len() as u32,
                    crc: crate::core::checksum::crc32c(&stored),
                    raw: is_raw,
                });
                report.raw_frames += u64::from(is_raw);
                next += stored.len() as u64;
                pending.extend_from_slice(&stored);
            }
            if next.div_ceil(unit) >= logical_units {
                // It will not be smaller: stop reading.
                return Ok(None);
            }
            if pending.len() >= WRITE_BATCH_BYTES {
                let whole = pending.len() / unit as usize * unit as usize;
                write_units(io, units, output.start + flushed / unit, &pending[..whole]).await?;
                pending.drain(..whole);
                flushed += whole as u64;
            }
        }
        if !pending.is_empty() {
            pending.resize(pending.len().div_ceil(unit as usize) * unit as usize, 0);
            write_units(io, units, output.start + flushed / unit, &pending).await?;
        }
        let table = FrameTable {
            generation,
            through_generation: source.through_generation,
            logical_units,
            unit_bytes: unit as u32,
            frame_units,
            codec: CODEC_LZ4,
            data_offset,
            frames,
        };
        let mut table_bytes = table.encode();
        table_bytes.resize(data_offset as usize, 0);
        write_units(io, units, output.start, &table_bytes).await?;
        let block =
            ControlBlock { generation, through_generation: source.through_generation, map: logical.clone() }.encode();
        let control_needed = (block.len() as u64).div_ceil(unit);
        assert!(control_needed <= control.units, "the control block was sized for its address table");
        write_units(io, units, control.start, &{
            let mut padded = block;
            padded.resize((control_needed * unit) as usize, 0);
            padded
        })
        .await?;
        io.flush(Role::History).await?;
        Ok::<_, EngineError>(Some((table, next.div_ceil(unit), control_needed, next)))
    }
    .await;
    let (table, used_units, control_needed, used_bytes) = match written {
        Ok(Some(done)) => done,
        Ok(None) => {
            release(shared, &[output, control]);
            shared.borrow_mut().meta.compression.incompressible.insert((source.control_start, generation));
            report.stored_bytes = source.stored_bytes;
            report.units_after = report.units_before;
            return Ok(report);
        }
        Err(error) => {
            // Nothing references the copy: the source is as it was.
            release(shared, &[output, control]);
            return Err(error);
        }
    };
    release(
        shared,
        &[
            Extent::new(output.start + used_units, output.units - used_units),
            Extent::new(control.start + control_needed, control.units - control_needed),
        ],
    );
    let replacement = Replacement {
        elements: Extent::new(output.start, used_units),
        control: Extent::new(control.start, control_needed),
        map: Arc::new(logical),
        table: Some(Arc::new(table)),
        stored_bytes: used_bytes,
        original_bytes: logical_units * unit,
    };
    report.retained_for_others = replace(shared, io, &source, replacement).await?;
    report.shared_across = source.shared_across;
    shared.borrow_mut().control.compressions += 1;
    report.compressed = true;
    report.stored_bytes = used_bytes;
    report.units_after = used_units + control_needed;
    Ok(report)
}

/// Decompresses the live record of `generation` back into a contiguous extent.
pub(crate) async fn decompress_record(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    generation: u64,
) -> Result<CompressReport, EngineError> {
    let source = find_record(shared, generation)?;
    if source.flags & flags::COMPRESSED == 0 {
        return Err(EngineError::Invalid(format!("generation {generation}'s history record is not compressed")));
    }
    let map = read_record_map(shared, io, &source).await?;
    let units = HistoryUnits::of(&shared.borrow().meta);
    let unit = units.unit_bytes;
    let table = read_frame_table(io, units, generation, source.element_start, source.element_count).await?;
    let logical_units = table.logical_units;
    if source.original_bytes != logical_units * unit {
        return Err(damaged(
            generation,
            format!(
                "the catalog says {} bytes uncompressed, the frame table {}",
                source.original_bytes,
                logical_units * unit
            ),
        ));
    }
    let explicit = if matches!(map.addressing(), Addressing::Explicit(_)) { map.len() } else { 0 };
    let extents =
        shared.borrow_mut().meta.allocate_record_with_table("decompression", generation, logical_units, explicit)?;
    let (output, control) = (extents.elements, extents.control);
    let expanded = rebased_map(generation, &map, |a| (a < logical_units).then(|| output.start + a));
    let written = async {
        let expanded = expanded?;
        let indexes: Vec<usize> = (0..table.frames.len()).collect();
        for batch in indexes.chunks(FRAMES_IN_FLIGHT) {
            // A batch of frames is read and expanded at once (bounded), then written at once.
            let reads = batch.iter().map(|index| read_frame(io, units, source.element_start, &table, *index));
            let frames = run_bounded(reads, FRAMES_IN_FLIGHT).await?;
            let writes = batch
                .iter()
                .zip(&frames)
                .map(|(index, frame)| write_units(io, units, output.start + table.frame_units_of(*index).0, frame));
            run_bounded(writes, FRAMES_IN_FLIGHT).await?;
        }
        let block =
            ControlBlock { generation, through_generation: source.through_generation, map: expanded.clone() }.encode();
        let control_needed = (block.len() as u64).div_ceil(unit);
        assert!(control_needed <= control.units, "the control block was sized for its address table");
        let mut padded = block;
        padded.resize((control_needed * unit) as usize, 0);
        write_units(io, units, control.start, &padded).await?;
        io.flush(Role::History).await?;
        Ok::<_, EngineError>((expanded, control_needed))
    }
    .await;
    let (expanded, control_needed) = match written {
        Ok(done) => done,
        Err(error) => {
            release(shared, &[output, control]);
            return Err(error);
        }
    };
    release(shared, &[Extent::new(control.start + control_needed, control.units - control_needed)]);
    let replacement = Replacement {
        elements: output,
        control: Extent::new(control.start, control_needed),
        map: Arc::new(expanded),
        table: None,
        stored_bytes: logical_units * unit,
        original_bytes: 0,
    };
    let retained_for_others = replace(shared, io, &source, replacement).await?;
    shared.borrow_mut().control.decompressions += 1;
    Ok(CompressReport {
        generation,
        through_generation: source.through_generation,
        compressed: false,
        original_bytes: logical_units * unit,
        stored_bytes: logical_units * unit,
        frames: table.frames.len() as u64,
        raw_frames: table.frames.iter().filter(|f| f.raw).count() as u64,
        units_before: source.element_count + source.control_count,
        units_after: logical_units + control_needed,
        retained_for_others,
        shared_across: source.shared_across,
    })
}

/// Retention's `compress_older`: compresses the live, uncompressed records older than the
/// newest `keep_last`, oldest first, skipping those found not to shrink. Whether any changed.
pub(crate) async fn compress_older(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    keep_last: u32,
) -> Result<bool, EngineError> {
    let records = live_records(shared);
    let older = records.len().saturating_sub(keep_last as usize);
    let mut changed = false;
    for record in &records[..older] {
        let skip = record.flags & flags::COMPRESSED != 0
            || shared.borrow().meta.compression.incompressible.contains(&(record.control_start, record.generation));
        if skip || shared.borrow().stopping {
            continue;
        }
        changed |= compress_record(shared, io, record.generation).await?.compressed;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgetting_needs_the_control_unit_and_the_generation() {
        let mut compression = Compression::default();
        compression
            .records
            .insert(0, CompressedRecord { generation: 4, element_start: 9, element_count: 3, table: None });
        // An entry without units (control_start 0) of generation 2 is not the record at unit 0.
        compression.forget(0, 2);
        assert!(compression.is_compressed(0));
        compression.forget(0, 4);
        assert!(!compression.is_compressed(0));
    }
}
