//! Dedup across history records (seed 001 embodiment 6, FIG 39–42), with reference accounting
//! derived from the records' maps instead of the patent's EMI chains and save area.
//!
//! - **Finding equal contents**: the sort and merges note what they store in the volume's
//!   [`ContentIndex`] (in memory, bounded, a hint only). A merge shares an output element with
//!   a unit of another record only when a live record or a retained extent owns that unit
//!   ([`Owners`], taken when the merge starts; only maintenance, which runs one at a time,
//!   removes owners) and a byte compare finds it equal.
//! - **References**: a shared unit's address carries [`ADDRESS_SHARED`] in the record's map and
//!   the record's catalog entry the `SHARES_ACROSS` flag. Whenever records leave the history
//!   (dropped, or merged away) the units the remaining records point at are collected from
//!   those maps ([`referenced_units`]) and the leaving records' units among them stay, as
//!   catalog entries of kind `Retained`, written in the same catalog write that removes the
//!   records; retained units no record points at any more are freed in that write too. A
//!   compression or decompression (embodiment 8) moves a record's elements the same way: its
//!   old units leave like a deleted record's.
//! - **Compressed records** hold frames, not elements: they are never owners (no new pointer
//!   lands in them) and the content index skips them; their own shared addresses stay history
//!   units and are read as they are. So the
//!   catalog alone says what is owned (the allocator is rebuilt from it) and no crash can lose
//!   or leak a reference: there is no count to get wrong.

use std::sync::Arc;

use crate::core::allocator::Extent;
use crate::core::element_map::{ElementMap, ADDRESS_MASK, ADDRESS_SHARED};
use crate::core::format::catalog::{flags, Catalog, CatalogEntry, EntryKind, EntryState};
use crate::core::plan::dedup::content_hash;
use crate::core::plan::delete::{plan_retention, HeldExtent, RecordExtent, RetentionPlan};

use super::io::ControlIo;
use super::merge::{live_records, read_record_map};
use super::meta::Meta;
use super::volume::{HostRef, SharedRef};
use super::EngineError;

/// Addresses the volume-wide content index holds (about 80 bytes each: 20 MiB at most).
pub(crate) const CONTENT_INDEX_CAPACITY: usize = 1 << 18;

/// Masks a content hash to the volume's dedup hash bits (128 in use; tests narrow it).
pub(crate) fn masked_hash(bytes: &[u8], hash_bits: u32) -> u128 {
    let mask = if hash_bits >= 128 { u128::MAX } else { (1u128 << hash_bits) - 1 };
    content_hash(bytes) & mask
}

/// Notes elements just stored at `first..` (one unit each) as share candidates.
pub(crate) fn note_stored<'a>(shared: &SharedRef, first: u64, elements: impl IntoIterator<Item = &'a [u8]>) {
    let mut s = shared.borrow_mut();
    let bits = s.options.dedup_hash_bits;
    for (k, bytes) in elements.into_iter().enumerate() {
        let hash = masked_hash(bytes, bits);
        s.content.insert(hash, first + k as u64);
    }
}

/// Units a merge may point at outside its own output: the element extents of live records
/// other than its sources, retained extents, and the units of its sources other records point
/// at (they stay retained after the merge anyway, so pointing at them costs nothing). Sorted,
/// disjoint.
pub(crate) struct Owners {
    extents: Vec<(u64, u64)>,
    /// The sources' element extents: candidates there (other than `kept`) are skipped, not
    /// forgotten — they may be retained later.
    sources: Vec<(u64, u64)>,
}

impl Owners {
    pub(crate) fn for_merge(meta: &Meta, sources: &[CatalogEntry], kept: &[u64]) -> Self {
        let is_source = |e: &CatalogEntry| {
            sources.iter().any(|s| s.generation == e.generation && s.control_start == e.control_start)
        };
        let mut extents: Vec<(u64, u64)> = meta
            .history_catalog
            .entries
            .iter()
            .filter(|e| {
                // A compressed record's extent holds frames, not elements: never pointed at.
                (matches!(e.kind, EntryKind::History | EntryKind::Merged)
                    && e.state == EntryState::Live
                    && e.flags & flags::COMPRESSED == 0
                    && !is_source(e))
                    || (e.kind == EntryKind::Retained && e.state == EntryState::Held)
            })
            .filter(|e| e.element_count > 0)
            .map(|e| (e.element_start, e.element_start + e.element_count))
            .collect();
        let source_extents: Vec<(u64, u64)> =
            sources.iter().map(|s| (s.element_start, s.element_start + s.element_count)).collect();
        extents.extend(
            kept.iter()
                .filter(|unit| source_extents.iter().any(|(start, end)| (*start..*end).contains(*unit)))
                .map(|unit| (*unit, unit + 1)),
        );
        extents.sort_unstable();
        Owners { extents, sources: source_extents }
    }

    pub(crate) fn contains(&self, address: u64) -> bool {
        let at = self.extents.partition_point(|(start, _)| *start <= address);
        at > 0 && address < self.extents[at - 1].1
    }

    /// In one of the merge's sources (and not kept): not a candidate now, maybe later.
    pub(crate) fn in_sources(&self, address: u64) -> bool {
        self.sources.iter().any(|(start, end)| (*start..*end).contains(&address))
    }
}

/// The units that live records other than `leaving` (by control block) point at through
/// dedup, plus those `extra` (a merged record about to become live) points at: ascending,
/// distinct. Reads the maps of the records flagged `SHARES_ACROSS` (kept in memory mostly).
pub(crate) async fn referenced_units(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    leaving: &[CatalogEntry],
    extra: Option<&ElementMap>,
) -> Result<Vec<u64>, EngineError> {
    let mut units = Vec::new();
    let collect = |map: &ElementMap, units: &mut Vec<u64>| {
        units.extend(map.iter().filter(|(_, raw)| raw & ADDRESS_SHARED != 0).map(|(_, raw)| raw & ADDRESS_MASK));
    };
    for record in live_records(shared) {
        if record.flags & flags::SHARES_ACROSS == 0
            || leaving.iter().any(|l| l.generation == record.generation && l.control_start == record.control_start)
        {
            continue;
        }
        let map: Arc<ElementMap> = read_record_map(shared, io, &record).await?;
        collect(&map, &mut units);
    }
    if let Some(map) = extra {
        collect(map, &mut units);
    }
    units.sort_unstable();
    units.dedup();
    Ok(units)
}

/// Catalog entries kept free of retained extents for the sort (and a merge's own entry).
const RETAINED_SLACK_ENTRIES: usize = 8;

/// What happens to the element units of `leaving` records and to the retained extents when
/// the remaining records reference `referenced`. Retained extents leave
/// [`RETAINED_SLACK_ENTRIES`] of the catalog free, and one change takes at most half of the
/// entries left (so records leaving later still find room, with coarser extents).
pub(crate) fn plan_leaving(
    catalog: &Catalog,
    leaving: &[CatalogEntry],
    referenced: &[u64],
) -> Result<RetentionPlan, EngineError> {
    let capacity = catalog.capacity_entries as usize;
    let others = catalog.entries.iter().filter(|e| e.kind != EntryKind::Retained).count().saturating_sub(leaving.len());
    let existing = catalog.entries.iter().filter(|e| e.kind == EntryKind::Retained).count();
    let room = capacity.saturating_sub(others + RETAINED_SLACK_ENTRIES);
    let max_extents = existing.min(room) + room.saturating_sub(existing) / 2;
    let held: Vec<HeldExtent> = leaving
        .iter()
        .chain(catalog.entries.iter().filter(|e| e.kind == EntryKind::Retained))
        .map(|e| HeldExtent {
            generation: e.generation,
            through_generation: e.through_generation,
            extent: RecordExtent::new(e.element_start, e.element_count),
        })
        .collect();
    plan_retention(&held, referenced, max_extents).map_err(|e| match e {
        crate::core::plan::PlanError::TooManyRetained { .. } => EngineError::HistoryCatalogFull {
            generation: catalog.backup_generation,
            capacity: catalog.capacity_entries,
        },
        e => EngineError::Damaged(format!("retained history units: {e}")),
    })
}

/// Replaces the catalog's retained entries by the plan's (in the catalog write that removes
/// the leaving records).
pub(crate) fn write_retained(catalog: &mut Catalog, plan: &RetentionPlan) {
    catalog.entries.retain(|e| e.kind != EntryKind::Retained);
    for held in &plan.retained {
        let mut entry = CatalogEntry::new(held.generation, EntryKind::Retained, EntryState::Held);
        entry.through_generation = held.through_generation;
        entry.element_start = held.extent.start;
        entry.element_count = held.extent.units;
        entry.stored_bytes = 0;
        catalog.entries.push(entry);
    }
}

/// After the catalog write: frees the leaving records' control blocks and what the plan frees.
pub(crate) fn free_leaving(meta: &mut Meta, leaving: &[CatalogEntry], plan: &RetentionPlan) -> Result<(), EngineError> {
    for record in leaving {
        if record.control_count > 0 {
            // A compressed record is known by its control unit, which the next record may take.
            meta.record_maps.remove(record.control_start);
            meta.compression.forget(record.control_start, record.generation);
            meta.allocator.free(Extent::new(record.control_start, record.control_count)).map_err(|e| {
                EngineError::Damaged(format!("control block of history generation {}: {e}", record.generation))
            })?;
        }
    }
    for extent in &plan.free {
        meta.allocator.free(Extent::new(extent.start, extent.units)).map_err(|e| {
            EngineError::Damaged(format!("freeing history units {}+{}: {e}", extent.start, extent.units))
        })?;
    }
    Ok(())
}

/// History units held by retained extents.
pub(crate) fn retained_units(catalog: &Catalog) -> u64 {
    catalog.entries.iter().filter(|e| e.kind == EntryKind::Retained).map(|e| e.element_count).sum()
}

/// Units read at once while rebuilding the content index (256 KiB of 4 KiB units).
const REBUILD_CHUNK_UNITS: u64 = 64;

/// Rebuilds the content index after the volume opens, in the background: the retained
/// extents and the element units of the newest live records, [`CONTENT_INDEX_CAPACITY`] units
/// at most, read in chunks and hashed oldest first — so the index proposes the newest record
/// first, as after the sort's and merges' own notes (retention gives up the oldest records
/// first: sharing with newer ones retains less). Stops when the volume closes. Opening waits
/// for none of it; a merge that starts earlier finds fewer candidates. An error stops it
/// quietly (whoever reads the units reports it).
pub(crate) async fn rebuild_content_index(shared: SharedRef, io: ControlIo<HostRef>) {
    let mut budget = CONTENT_INDEX_CAPACITY as u64;
    let mut newest: Vec<CatalogEntry> = Vec::new();
    let mut room = budget;
    // Compressed records hold frames: nothing there can be shared (see `Owners`).
    for record in live_records(&shared).into_iter().rev().filter(|r| r.flags & flags::COMPRESSED == 0) {
        if room == 0 {
            break;
        }
        room = room.saturating_sub(record.element_count);
        newest.push(record);
    }
    let mut sources: Vec<CatalogEntry> = shared
        .borrow()
        .meta
        .history_catalog
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Retained)
        .cloned()
        .collect();
    sources.extend(newest.into_iter().rev());
    let unit = shared.borrow().meta.unit_bytes();
    for source in sources {
        let end = source.element_start + source.element_count;
        let mut next = source.element_start;
        while next < end && budget > 0 {
            if shared.borrow().stopping {
                return;
            }
            let units = (end - next).min(REBUILD_CHUNK_UNITS).min(budget);
            let lba = shared.borrow().meta.history_lba(next);
            let Ok(data) = io.read(super::io::Role::History, lba, (units * unit) as usize).await else { return };
            let data = data.to_vec();
            // Units of a record freed meanwhile may hold anything by now: not noted.
            let still_owned = shared.borrow().meta.history_catalog.entries.iter().any(|e| {
                e.kind == source.kind
                    && e.control_start == source.control_start
                    && e.element_start == source.element_start
                    && e.generation == source.generation
            });
            if !still_owned {
                break;
            }
            note_stored(&shared, next, data.chunks(unit as usize));
            next += units;
            budget -= units;
        }
    }
}
