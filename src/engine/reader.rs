//! Offline reading of a volume: every generation's image (FIG 13/14: a block comes from the
//! oldest history record at or after the generation that holds it, else from the backup),
//! sealed generations not yet sorted (backup overlaid with their journal elements), and a
//! structural check of all metadata. Opens read-only: nothing is written.

use std::cell::RefCell;
use std::rc::Rc;

use crate::core::element_map::ElementMap;
use crate::core::format::catalog::{CatalogEntry, EntryKind};
use crate::core::format::control_block::ControlBlock;
use crate::device::Channel;

use super::io::{block_on, ControlIo, Hub, IoHub, Role};
use super::meta::Meta;
use super::volume::GenerationInfo;
use super::{setup, EngineError};

/// A volume opened read-only for inspection.
pub struct VolumeReader {
    hub: Hub<()>,
    meta: Meta,
}

/// Where one generation's image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource {
    /// History records and the backup.
    History,
    /// The backup itself.
    Backup,
    /// The backup overlaid with sealed, not yet sorted, journal generations.
    Journal,
    /// The base: the open generation, still changing.
    Base,
}

/// What [`VolumeReader::verify`] checked.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub history_records: usize,
    pub history_elements: u64,
    pub sealed_generations: usize,
    pub sealed_elements: u64,
    pub open_elements: u64,
    /// Elements of the open generation that differ from the base: expected after a crash
    /// (recovery rebuilds them from the base), a sign of damage after a clean close.
    pub open_elements_differing: u64,
}

impl VolumeReader {
    /// Opens the volume on `channels` (in [`Role`] order) without writing anything. Damaged
    /// metadata and damaged elements of sealed generations are refused here.
    pub fn open(channels: Vec<Box<dyn Channel>>) -> Result<Self, EngineError> {
        let hub = Rc::new(RefCell::new(IoHub::<()>::new(channels)));
        let io = ControlIo { hub: hub.clone() };
        let meta = block_on(&hub, setup::open_volume(&io, true))?;
        Ok(VolumeReader { hub, meta })
    }

    fn io(&self) -> ControlIo<()> {
        ControlIo { hub: self.hub.clone() }
    }

    pub fn volume_bytes(&self) -> u64 {
        self.meta.geometry.volume_bytes()
    }

    pub fn unit_bytes(&self) -> u64 {
        self.meta.unit_bytes()
    }

    pub fn backup_generation(&self) -> u64 {
        self.meta.history_catalog.backup_generation
    }

    pub fn open_generation(&self) -> u64 {
        self.meta.open.generation
    }

    /// Every generation the volume knows, oldest first.
    pub fn generations(&self) -> Vec<GenerationInfo> {
        super::volume::generation_list(&self.meta)
    }

    /// The superblocks and catalogs as JSON, for `chronicle inspect`.
    pub fn describe(&self) -> serde_json::Value {
        let meta = &self.meta;
        let entry = |e: &CatalogEntry| {
            serde_json::json!({
                "generation": e.generation, "kind": format!("{:?}", e.kind), "state": format!("{:?}", e.state),
                "time_ns": e.time_ns, "comment": e.comment, "blocks": e.blocks,
                "element_start": e.element_start, "element_count": e.element_count,
                "control_start": e.control_start, "control_count": e.control_count,
            })
        };
        serde_json::json!({
            "volume_uuid": uuid::Uuid::from_bytes(meta.journal_superblock.volume_uuid).to_string(),
            "journal_device_uuid": uuid::Uuid::from_bytes(meta.journal_superblock.device_uuid).to_string(),
            "history_device_uuid": uuid::Uuid::from_bytes(meta.history_superblock.device_uuid).to_string(),
            "volume_bytes": meta.geometry.volume_bytes(),
            "host_write_size": meta.shape.host_write_size,
            "volume_blocks": meta.shape.volume_blocks,
            "journal_mode": format!("{:?}", meta.journal_superblock.journal_mode),
            "durability": format!("{:?}", meta.journal_superblock.durability),
            "journal_full_policy": format!("{:?}", meta.journal_superblock.journal_full_policy),
            "journal": {
                "capacity_elements": meta.journal.element_capacity,
                "used_elements": meta.ring.used(),
                "index_pages": meta.journal.index_pages,
                "catalog_sequence": meta.journal_catalog.sequence,
                "entries": meta.journal_catalog.entries.iter().map(entry).collect::<Vec<_>>(),
            },
            "history": {
                "capacity_units": meta.allocator.capacity(),
                "used_units": meta.allocator.used_units(),
                "backup_generation": meta.history_catalog.backup_generation,
                "catalog_sequence": meta.history_catalog.sequence,
                "entries": meta.history_catalog.entries.iter().map(entry).collect::<Vec<_>>(),
                "sort_cursor": {
                    "state": format!("{:?}", meta.cursor.state), "generation": meta.cursor.generation,
                    "saved_through": meta.cursor.saved_through, "applied_through": meta.cursor.applied_through,
                },
            },
            "open_generation": { "generation": meta.open.generation, "elements": meta.open.blocks.len() },
            "generations": self.generations(),
        })
    }

    fn history_records(&self, from: u64) -> Vec<&CatalogEntry> {
        let mut records: Vec<&CatalogEntry> = self
            .meta
            .history_catalog
            .entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::History | EntryKind::Merged) && e.through_generation >= from)
            .collect();
        records.sort_by_key(|e| e.generation);
        records
    }

    fn read_control(&self, entry: &CatalogEntry) -> Result<ElementMap, EngineError> {
        let io = self.io();
        let lba = self.meta.history_lba(entry.control_start);
        let bytes = entry.control_count * self.meta.unit_bytes();
        let data = block_on(&self.hub, io.read(Role::History, lba, bytes as usize))?.to_vec();
        let control = ControlBlock::decode(&data).map_err(|e| {
            EngineError::Damaged(format!("control block of history generation {}: {e}", entry.generation))
        })?;
        if control.generation != entry.generation || control.map.blocks() != self.meta.shape.volume_blocks {
            return Err(EngineError::Damaged(format!(
                "control block of history generation {} describes generation {} of a {}-block volume",
                entry.generation,
                control.generation,
                control.map.blocks()
            )));
        }
        Ok(control.map)
    }

    fn read_units(&self, role: Role, lba: u64, bytes: u64) -> Result<Vec<u8>, EngineError> {
        let io = self.io();
        Ok(block_on(&self.hub, io.read(role, lba, bytes as usize))?.to_vec())
    }

    /// Where generation `generation`'s image comes from, if it is known.
    pub fn source(&self, generation: u64) -> Option<ImageSource> {
        let backup = self.backup_generation();
        if generation == backup {
            Some(ImageSource::Backup)
        } else if generation < backup {
            let records = self.history_records(generation);
            // Every generation from `generation` to backup − 1 must be covered, in order, and
            // the first record must start at `generation`: a merged record M(a..b) restores
            // image(a) only, the images after a up to b were given up.
            let mut next = generation;
            for record in records {
                if record.generation != next {
                    return None;
                }
                next = record.through_generation + 1;
            }
            (next >= backup).then_some(ImageSource::History)
        } else if self.meta.sealed.iter().any(|s| s.generation == generation) {
            Some(ImageSource::Journal)
        } else if generation == self.meta.open.generation {
            Some(ImageSource::Base)
        } else {
            None
        }
    }

    /// The whole image of `generation` (held in memory: for checks and small volumes).
    pub fn read_image(&self, generation: u64) -> Result<Vec<u8>, EngineError> {
        let mut image = Vec::with_capacity(self.meta.geometry.volume_bytes() as usize);
        self.restore_to(generation, &mut |_, chunk| {
            image.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(image)
    }

    /// Streams the image of `generation` to `sink` in order, a chunk of at most 4 MiB at a
    /// time (`sink(offset_bytes, bytes)`): the base, the backup, or the backup overlaid with the
    /// elements the generation differs by (seed 001 FIG 13/14: for a history generation the
    /// first hit walking its record and the newer ones wins, else the backup). Memory: the
    /// overlay's addresses and one chunk, whatever the volume's size.
    pub fn restore_to(
        &self,
        generation: u64,
        sink: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), EngineError> {
        let unit = self.meta.unit_bytes();
        let source = self.source(generation).ok_or_else(|| {
            EngineError::Invalid(format!("generation {generation} cannot be restored from this volume"))
        })?;
        // Blocks that do not come from the underlying device: (block, device, lba), ascending.
        let (device, overlay) = match source {
            ImageSource::Base => (Role::Base, Vec::new()),
            ImageSource::Backup => (Role::Backup, self.interrupted_sort_overlay()),
            ImageSource::Journal => {
                let mut overlay: std::collections::BTreeMap<u64, (Role, u64)> =
                    self.interrupted_sort_overlay().into_iter().map(|(b, r, l)| (b, (r, l))).collect();
                for sealed in self.meta.sealed.iter().take_while(|s| s.generation <= generation) {
                    for (block, segment) in sealed.elements() {
                        overlay.insert(block, (Role::Journal, self.meta.segment_lba(segment)));
                    }
                }
                (Role::Backup, overlay.into_iter().map(|(b, (r, l))| (b, r, l)).collect())
            }
            ImageSource::History => {
                let mut overlay: std::collections::BTreeMap<u64, (Role, u64)> =
                    self.interrupted_sort_overlay().into_iter().map(|(b, r, l)| (b, (r, l))).collect();
                let maps = self
                    .history_records(generation)
                    .into_iter()
                    .map(|record| self.read_control(record))
                    .collect::<Result<Vec<_>, _>>()?;
                let refs: Vec<&ElementMap> = maps.iter().collect();
                let map = crate::core::plan::plan_restore(&refs, self.meta.shape.volume_blocks)
                    .map_err(|e| EngineError::Damaged(format!("restore of generation {generation}: {e}")))?;
                for (block, address) in map.iter_history() {
                    overlay.insert(block, (Role::History, self.meta.history_lba(address)));
                }
                (Role::Backup, overlay.into_iter().map(|(b, (r, l))| (b, r, l)).collect())
            }
        };
        let total = self.meta.geometry.volume_bytes();
        let chunk_bytes = (4u64 << 20) / unit * unit;
        let block_size = self.meta.block_size[device as usize];
        let mut next_override = 0;
        let mut offset = 0u64;
        while offset < total {
            let len = chunk_bytes.min(total - offset);
            let mut chunk = self.read_units(device, offset / block_size, len)?;
            let (first_block, end_block) = (offset / unit, (offset + len) / unit);
            while next_override < overlay.len() && overlay[next_override].0 < end_block {
                let (block, role, lba) = overlay[next_override];
                debug_assert!(block >= first_block);
                let data = self.read_units(role, lba, unit)?;
                let at = ((block - first_block) * unit) as usize;
                chunk[at..at + unit as usize].copy_from_slice(&data);
                next_override += 1;
            }
            sink(offset, &chunk).map_err(|e| EngineError::Invalid(format!("cannot write the restored image: {e}")))?;
            offset += len;
        }
        Ok(())
    }

    /// While a sort is interrupted the backup is part old, part new: blocks the sort already
    /// saved read from the history units it saved them to (so the backup still reads as the
    /// backup generation's image).
    fn interrupted_sort_overlay(&self) -> Vec<(u64, Role, u64)> {
        let cursor = &self.meta.cursor;
        let interrupted = cursor.state == crate::core::format::records::SortState::Running
            && cursor.generation == self.backup_generation() + 1;
        let mut overlay = Vec::new();
        if let (true, Some(sealed)) = (interrupted, self.meta.sealed.front()) {
            let mut blocks = sealed.blocks.clone();
            blocks.sort_unstable();
            for (rank, block) in blocks.iter().enumerate().take_while(|(_, b)| **b < cursor.saved_through) {
                overlay.push((*block, Role::History, self.meta.history_lba(cursor.history_start + rank as u64)));
            }
        }
        overlay
    }

    /// Checks every structure: superblocks, catalogs, element indexes and sealed elements (at
    /// open), every history control block, and that history records chain without gaps.
    pub fn verify(&self) -> Result<VerifyReport, EngineError> {
        let mut report = VerifyReport::default();
        for record in self.history_records(0) {
            let map = self.read_control(record)?;
            if map.len() != record.blocks {
                return Err(EngineError::Damaged(format!(
                    "history generation {}: control block holds {} elements, the catalog says {}",
                    record.generation,
                    map.len(),
                    record.blocks
                )));
            }
            // Every element lies in the record's own units (a merge's dedup shares units only
            // within its record), so freeing a record frees nothing another record reads.
            let own = record.element_start..record.element_start + record.element_count;
            if let Some((block, address)) = map.iter().find(|(_, address)| !own.contains(address)) {
                return Err(EngineError::Damaged(format!(
                    "history generation {}: block {block} is at unit {address}, outside the record's units {}..{}",
                    record.generation, own.start, own.end
                )));
            }
            report.history_records += 1;
            report.history_elements += map.len();
        }
        for generation in 0..self.backup_generation() {
            if self.source(generation).is_none() {
                // Gaps appear only when generations were deleted on purpose (retention).
                continue;
            }
        }
        report.sealed_generations = self.meta.sealed.len();
        report.sealed_elements = self.meta.sealed.iter().map(|s| s.blocks.len() as u64).sum();
        report.open_elements = self.meta.open.blocks.len() as u64;
        let unit = self.meta.unit_bytes();
        for (k, block) in self.meta.open.blocks.iter().enumerate() {
            let element =
                self.read_units(Role::Journal, self.meta.segment_lba(self.meta.open.element_start + k as u64), unit)?;
            let base = self.read_units(Role::Base, self.meta.volume_lba(0, *block), unit)?;
            if element != base {
                report.open_elements_differing += 1;
            }
        }
        Ok(report)
    }
}
