//! Offline reading of a volume: every generation's image (FIG 13/14: a block comes from the
//! oldest history record at or after the generation that holds it, else from the backup),
//! sealed generations not yet sorted (backup overlaid with their journal elements), and a
//! structural check of all metadata. Opens read-only: nothing is written.

use std::cell::RefCell;
use std::rc::Rc;

use crate::core::element_map::{ElementMap, ADDRESS_MASK, ADDRESS_SHARED};
use crate::core::format::catalog::{CatalogEntry, EntryKind};
use crate::core::format::control_block::ControlBlock;
use crate::core::format::frame_table::FrameTable;
use crate::core::format::version_table::VersionTable;
use crate::device::Channel;

use super::io::{block_on, ControlIo, Hub, IoHub, Role};
use super::meta::{newest_versions, Meta};
use super::volume::GenerationInfo;
use super::{restore_volume, setup, EngineError};

/// An image as layers: the device most blocks come from, and the blocks that come from
/// elsewhere, `(block, device, lba)` ascending by block.
type Layers = (Role, Vec<(u64, Piece)>);

/// A volume opened read-only for inspection.
pub struct VolumeReader {
    hub: Hub<()>,
    meta: Meta,
    /// Frame tables of compressed records read so far, by control unit, and the last frame
    /// decompressed (restores read in block order: a frame is decompressed once).
    frame_tables: RefCell<rustc_hash::FxHashMap<u64, Rc<FrameTable>>>,
    last_frame: RefCell<Option<(super::compress::FrameKey, Rc<Vec<u8>>)>>,
}

/// Where one block of a restored image comes from.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Device(Role, u64),
    /// Logical unit `address` of the compressed record whose control block is at `control`.
    Compressed {
        control: u64,
        address: u64,
    },
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
    /// Compressed records, and their frames read back, checksummed and decompressed.
    pub compressed_records: usize,
    pub compressed_frames: u64,
    pub sealed_generations: usize,
    pub sealed_elements: u64,
    pub open_elements: u64,
    /// Elements of the open generation that differ from the base: expected after a crash
    /// (recovery rebuilds them from the base), a sign of damage after a clean close.
    pub open_elements_differing: u64,
    /// "All" mode: version records and the versions they keep.
    pub version_records: usize,
    pub versions: u64,
    /// History elements pointing at another record's or a retained extent's unit (dedup
    /// across records).
    pub shared_across_elements: u64,
    /// Retained extents (units kept for such pointers after their record left) and their units.
    pub retained_extents: usize,
    pub retained_units: u64,
}

impl VolumeReader {
    /// Opens the volume on `channels` (in [`Role`] order) without writing anything. Damaged
    /// metadata and damaged elements of sealed generations are refused here.
    pub fn open(channels: Vec<Box<dyn Channel>>) -> Result<Self, EngineError> {
        let hub = Rc::new(RefCell::new(IoHub::<()>::new(channels)));
        let io = ControlIo { hub: hub.clone() };
        let meta = block_on(&hub, setup::open_volume(&io, true))?;
        Ok(VolumeReader { hub, meta, frame_tables: Default::default(), last_frame: Default::default() })
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
                "flags": e.flags, "dedup_saved_bytes": e.dedup_saved, "shared_across": e.shared_across,
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
                "dedup_saved_units": meta.history_catalog.entries.iter()
                    .filter(|e| e.kind == EntryKind::Merged)
                    .map(|e| e.blocks.saturating_sub(if super::compress::is_compressed_record(e) {
                        e.original_bytes / meta.unit_bytes()
                    } else {
                        e.element_count
                    })).sum::<u64>(),
                "dedup_saved_across_units": meta.history_catalog.entries.iter()
                    .filter(|e| e.kind == EntryKind::Merged).map(|e| e.shared_across).sum::<u64>(),
                "retained_units": meta.history_catalog.entries.iter()
                    .filter(|e| e.kind == EntryKind::Retained).map(|e| e.element_count).sum::<u64>(),
                "backup_generation": meta.history_catalog.backup_generation,
                "catalog_sequence": meta.history_catalog.sequence,
                "entries": meta.history_catalog.entries.iter().map(entry).collect::<Vec<_>>(),
                "sort_cursor": {
                    "state": format!("{:?}", meta.cursor.state), "generation": meta.cursor.generation,
                    "saved_through": meta.cursor.saved_through, "applied_through": meta.cursor.applied_through,
                },
            },
            "open_generation": {
                "generation": meta.open.generation, "elements": meta.open.blocks.len(),
                // Policy bitmap-only: blocks written to the base only, not yet in the journal.
                "bitmap_tracked_blocks": meta.open_bitmap.as_ref().map_or(0, |b| b.tracked),
                "journal_full_mode": if meta.open_bitmap.as_ref().is_some_and(|b| b.tracked > 0) { "bitmap-only" } else { "journaling" },
            },
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

    /// The frame table of the compressed record `entry`, read and checked once.
    fn frame_table(&self, entry: &CatalogEntry) -> Result<Rc<FrameTable>, EngineError> {
        if let Some(table) = self.frame_tables.borrow().get(&entry.control_start) {
            return Ok(table.clone());
        }
        let units = super::compress::HistoryUnits::of(&self.meta);
        let io = self.io();
        let table = Rc::new(block_on(
            &self.hub,
            super::compress::read_frame_table(&io, units, entry.generation, entry.element_start, entry.element_count),
        )?);
        self.frame_tables.borrow_mut().insert(entry.control_start, table.clone());
        Ok(table)
    }

    /// Frame `index` of the compressed record `entry`, decompressed and checked.
    fn frame(&self, entry: &CatalogEntry, index: usize) -> Result<Rc<Vec<u8>>, EngineError> {
        if let Some((key, frame)) = &*self.last_frame.borrow() {
            if *key == (entry.control_start, index) {
                return Ok(frame.clone());
            }
        }
        let table = self.frame_table(entry)?;
        let units = super::compress::HistoryUnits::of(&self.meta);
        let io = self.io();
        let frame =
            Rc::new(block_on(&self.hub, super::compress::read_frame(&io, units, entry.element_start, &table, index))?);
        *self.last_frame.borrow_mut() = Some(((entry.control_start, index), frame.clone()));
        Ok(frame)
    }

    /// Logical unit `address` of the compressed record whose control block is at `control`.
    fn compressed_unit(&self, control: u64, address: u64) -> Result<Vec<u8>, EngineError> {
        let entry = self.history_records(0).into_iter().find(|e| e.control_start == control).ok_or_else(|| {
            EngineError::Damaged(format!("no history record has its control block at unit {control}"))
        })?;
        let table = self.frame_table(entry)?;
        if address >= table.logical_units {
            return Err(EngineError::Damaged(format!(
                "compressed history generation {}: element at logical unit {address} of {}",
                entry.generation, table.logical_units
            )));
        }
        let index = (address / u64::from(table.frame_units)) as usize;
        let frame = self.frame(entry, index)?;
        let unit = self.meta.unit_bytes() as usize;
        let at = (address % u64::from(table.frame_units)) as usize * unit;
        Ok(frame[at..at + unit].to_vec())
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
        let (device, overlay) = self.image_layers(generation)?;
        self.stream(device, &overlay, sink)
    }

    /// The device an image of `generation` is read from and the blocks that come from
    /// elsewhere, `(block, where it reads from)` ascending.
    fn image_layers(&self, generation: u64) -> Result<Layers, EngineError> {
        let source = self.source(generation).ok_or_else(|| {
            EngineError::Invalid(format!("generation {generation} cannot be restored from this volume"))
        })?;
        // Blocks that do not come from the underlying device, ascending.
        let interrupted = || -> std::collections::BTreeMap<u64, Piece> {
            self.interrupted_sort_overlay().into_iter().map(|(b, r, l)| (b, Piece::Device(r, l))).collect()
        };
        let (device, overlay): (Role, Vec<(u64, Piece)>) = match source {
            ImageSource::Base => (Role::Base, Vec::new()),
            ImageSource::Backup => (Role::Backup, interrupted().into_iter().collect()),
            ImageSource::Journal => {
                let mut overlay = interrupted();
                for sealed in self.meta.sealed.iter().take_while(|s| s.generation <= generation) {
                    for (block, segment) in sealed.elements() {
                        overlay.insert(block, Piece::Device(Role::Journal, self.meta.segment_lba(segment)));
                    }
                }
                (Role::Backup, overlay.into_iter().collect())
            }
            ImageSource::History => {
                let mut overlay = interrupted();
                let records = self.history_records(generation);
                let maps = records.iter().map(|record| self.read_control(record)).collect::<Result<Vec<_>, _>>()?;
                let refs: Vec<&ElementMap> = maps.iter().collect();
                // FIG 13: the oldest record ≥ generation holding a block wins; a compressed
                // record's blocks read through its frames.
                crate::core::plan::walk_first_hits(&refs, self.meta.shape.volume_blocks, |block, index, raw| {
                    let (control, address) = (records[index].control_start, raw & ADDRESS_MASK);
                    let compressed = super::compress::is_compressed_record(records[index]);
                    let piece = if super::compress::through_frames(compressed, raw) {
                        Piece::Compressed { control, address }
                    } else {
                        Piece::Device(Role::History, self.meta.history_lba(address))
                    };
                    overlay.insert(block, piece);
                });
                (Role::Backup, overlay.into_iter().collect())
            }
        };
        Ok((device, overlay))
    }

    /// Streams `device` overlaid with `overlay` to `sink`, 4 MiB at a time.
    fn stream(
        &self,
        device: Role,
        overlay: &[(u64, Piece)],
        sink: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), EngineError> {
        let unit = self.meta.unit_bytes();
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
                let (block, piece) = overlay[next_override];
                debug_assert!(block >= first_block);
                let data = match piece {
                    Piece::Device(role, lba) => self.read_units(role, lba, unit)?,
                    Piece::Compressed { control, address } => self.compressed_unit(control, address)?,
                };
                let at = ((block - first_block) * unit) as usize;
                chunk[at..at + unit as usize].copy_from_slice(&data);
                next_override += 1;
            }
            sink(offset, &chunk).map_err(|e| EngineError::Invalid(format!("cannot write the restored image: {e}")))?;
            offset += len;
        }
        Ok(())
    }

    /// The submission sequence the next host request would get: every write the volume holds
    /// has a lower one.
    pub fn next_sequence(&self) -> u64 {
        self.meta.next_sequence
    }

    /// The image after every host write with a sequence up to `sequence` ("all" mode, seed 001
    /// embodiment 4): the image of the generation cut at or before it, overlaid with the
    /// versions of the next generation up to `sequence`, newest per block. Targets whose
    /// generation's versions are no longer kept, older than the oldest restorable image, or
    /// beyond the newest write are refused with [`EngineError::TargetUnavailable`].
    pub fn restore_sequence_to(
        &self,
        sequence: u64,
        sink: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), EngineError> {
        let (device, overlay) = self.sequence_layers(sequence)?;
        self.stream(device, &overlay, sink)
    }

    /// The sequence of the newest write taken at or before `time_ns` (and not before the cut of
    /// a generation sealed by then): `restore --time` restores it. Write times never go back
    /// (FORMAT.md §9.3), so this is the image after every write up to `time_ns`.
    pub fn sequence_at_time(&self, time_ns: u64) -> Result<u64, EngineError> {
        let target = crate::core::time::rfc3339(time_ns);
        if self.meta.mode() != crate::core::format::superblock::JournalMode::All {
            return self.sequence_layers(0).map(|_| 0); // the "latest" mode refusal
        }
        if time_ns > super::now_ns() {
            return Err(EngineError::TargetUnavailable {
                target: format!("time {target}"),
                why: "it is in the future".into(),
                available: self.restorable_sequences(),
            });
        }
        // The newest version record with a version by then (restore volumes resolve times alike).
        let table = match restore_volume::version_record_by_time(&self.meta, time_ns) {
            Some(entry) => Some(self.read_versions(entry)?),
            None => None,
        };
        restore_volume::sequence_by_time(&self.meta, time_ns, table.as_ref()).ok_or_else(|| {
            EngineError::TargetUnavailable {
                target: format!("time {target}"),
                why: "it is older than every generation and write the volume keeps".into(),
                available: self.restorable_sequences(),
            }
        })
    }

    /// Whether the volume keeps every write ("all" journal mode).
    pub fn journal_mode_all(&self) -> bool {
        self.meta.mode() == crate::core::format::superblock::JournalMode::All
    }

    /// Whether `sequence` can be restored (the error says why not and what can).
    pub fn check_sequence(&self, sequence: u64) -> Result<(), EngineError> {
        self.sequence_layers(sequence).map(|_| ())
    }

    /// The whole image at `sequence` (in memory: for checks and small volumes).
    pub fn read_sequence(&self, sequence: u64) -> Result<Vec<u8>, EngineError> {
        let mut image = Vec::with_capacity(self.meta.geometry.volume_bytes() as usize);
        self.restore_sequence_to(sequence, &mut |_, chunk| {
            image.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(image)
    }

    /// The sequence targets this volume can restore, for error messages and `generations`:
    /// each restorable generation's cut, and the ranges the journal keeps versions for.
    pub fn restorable_sequences(&self) -> String {
        let mut parts = Vec::new();
        let generations = self.generations();
        for info in &generations {
            if info.state != "open" && self.source(info.generation).is_some() {
                parts.push(format!("{} (generation {})", info.last_sequence, info.generation));
            }
        }
        for info in &generations {
            let previous = generations.iter().find(|g| g.generation + 1 == info.generation);
            if let (Some(previous), Some(_)) = (previous, info.versions) {
                if self.source(previous.generation).is_some() {
                    let end =
                        if info.state == "open" { self.next_sequence().saturating_sub(1) } else { info.last_sequence };
                    parts.push(format!("{}..={} (generation {})", previous.last_sequence, end, info.generation));
                }
            }
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }

    fn sequence_layers(&self, sequence: u64) -> Result<Layers, EngineError> {
        use crate::core::format::superblock::JournalMode;
        let unavailable = |why: String| EngineError::TargetUnavailable {
            target: format!("sequence {sequence}"),
            why,
            available: self.restorable_sequences(),
        };
        if self.meta.mode() != JournalMode::All {
            return Err(EngineError::Invalid(
                "the volume keeps the \"latest\" journal mode (one element per block and generation): restore a generation; any-point restore needs a volume formatted with journal mode \"all\"".into(),
            ));
        }
        if sequence >= self.next_sequence() {
            return Err(unavailable(format!(
                "it is in the future (the newest host request has sequence {})",
                self.next_sequence().saturating_sub(1)
            )));
        }
        // The newest generation whose image is cut at or before the target.
        let generations = self.generations();
        let cut = generations
            .iter()
            .filter(|g| g.state != "open" && g.last_sequence <= sequence)
            .max_by_key(|g| g.generation);
        let Some(cut) = cut else {
            return Err(unavailable("it is older than the oldest image the volume keeps".into()));
        };
        if self.source(cut.generation).is_none() {
            return Err(unavailable(format!("generation {} was merged away or deleted", cut.generation)));
        }
        let (device, overlay) = self.image_layers(cut.generation)?;
        if sequence == cut.last_sequence {
            return Ok((device, overlay));
        }
        // The versions of the next generation, up to the target.
        let next = cut.generation + 1;
        let open = &self.meta.open;
        let (start, blocks, mut versions, newest_in_base) = if next == open.generation {
            (open.element_start, &open.blocks, open.versions.clone(), true)
        } else if let Some(sealed) = self.meta.sealed.iter().find(|s| s.generation == next) {
            (sealed.element_start, &sealed.blocks, sealed.versions.clone(), false)
        } else if let Some(entry) = self.version_record(next) {
            // Sorted: the generation's version record in the history.
            if sequence > entry.last_sequence {
                return Err(unavailable(format!(
                    "it falls after generation {next} (cut at {}), whose image was merged away or deleted",
                    entry.last_sequence
                )));
            }
            if entry.element_count == 0 {
                return Ok((device, overlay)); // a generation without writes
            }
            let table = self.read_versions(entry)?;
            let mut layers: std::collections::BTreeMap<u64, Piece> = overlay.into_iter().collect();
            for (block, k) in table.newest_up_to(sequence) {
                let lba = self.meta.history_lba(table.first_address + k as u64);
                layers.insert(block, Piece::Device(Role::History, lba));
            }
            return Ok((device, layers.into_iter().collect()));
        } else {
            return Err(unavailable(format!(
                "it falls in generation {next}, whose versions are no longer kept (merged away or deleted)"
            )));
        };
        let newest: rustc_hash::FxHashSet<usize> =
            newest_versions(blocks, &versions, u64::MAX).into_iter().map(|(_, k)| k).collect();
        let unit = self.unit_bytes();
        if newest_in_base {
            // Opened without recovery: an older version of the open generation whose journal
            // write did not survive a power cut is lost, as recovery would mark it.
            for (k, version) in versions.iter_mut().enumerate() {
                if !newest.contains(&k) && !version.lost {
                    let data = self.read_units(Role::Journal, self.meta.segment_lba(start + k as u64), unit)?;
                    if crate::core::checksum::crc32c(&data) != open.crcs[k] {
                        version.lost = true;
                    }
                }
            }
        }
        let mut layers: std::collections::BTreeMap<u64, Piece> = overlay.into_iter().collect();
        for (block, k) in newest_versions(blocks, &versions, sequence) {
            // The open generation's newest version of a block is what the base holds.
            let layer = if newest_in_base && newest.contains(&k) {
                Piece::Device(Role::Base, self.meta.volume_lba(0, block))
            } else {
                Piece::Device(Role::Journal, self.meta.segment_lba(start + k as u64))
            };
            layers.insert(block, layer);
        }
        Ok((device, layers.into_iter().collect()))
    }

    /// The live version record of `generation`'s writes ("all" mode), if kept.
    fn version_record(&self, generation: u64) -> Option<&CatalogEntry> {
        restore_volume::version_record(&self.meta, generation)
    }

    /// Reads and checks a version record's table: its generation, and that its elements are
    /// exactly the record's units.
    fn read_versions(&self, entry: &CatalogEntry) -> Result<VersionTable, EngineError> {
        let lba = self.meta.history_lba(entry.control_start);
        let data = self.read_units(Role::History, lba, entry.control_count * self.meta.unit_bytes())?;
        let damaged =
            |why: String| EngineError::Damaged(format!("version record of generation {}: {why}", entry.generation));
        let table = VersionTable::decode(&data).map_err(|e| damaged(e.to_string()))?;
        restore_volume::check_version_table(entry, &table, self.meta.shape.volume_blocks)?;
        Ok(table)
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
            // The sort's record holds one unit per block (the newest version in "all" mode).
            let mut blocks: Vec<u64> = sealed.elements().into_iter().map(|(block, _)| block).collect();
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
        // Units a shared pointer may land in: uncompressed live records' and retained extents'
        // (a compressed record's extent holds frames, never elements another points at).
        let retained: Vec<&CatalogEntry> =
            self.meta.history_catalog.entries.iter().filter(|e| e.kind == EntryKind::Retained).collect();
        let mut owners: Vec<(u64, u64)> = self
            .history_records(0)
            .into_iter()
            .filter(|e| !super::compress::is_compressed_record(e))
            .chain(retained.iter().copied())
            .filter(|e| e.element_count > 0)
            .map(|e| (e.element_start, e.element_start + e.element_count))
            .collect();
        owners.sort_unstable();
        let owner_of = |address: u64| {
            let at = owners.partition_point(|(start, _)| *start <= address);
            at > 0 && address < owners[at - 1].1
        };
        let mut referenced: Vec<u64> = Vec::new();
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
            // Every element lies in the record's own units, or (flagged shared) in another
            // record's or a retained extent's: freeing a record frees nothing another reads.
            // A compressed record numbers its own elements' units 0..logical units (its frames
            // lie in its extent and each must pass its checksum and decompress to its length);
            // its shared addresses stay history units of their owners.
            let own = if super::compress::is_compressed_record(record) {
                let table = self.frame_table(record)?;
                if record.original_bytes != table.logical_units * self.meta.unit_bytes() {
                    return Err(EngineError::Damaged(format!(
                        "compressed history generation {}: the catalog says {} bytes uncompressed, the frame table {} units",
                        record.generation, record.original_bytes, table.logical_units
                    )));
                }
                for index in 0..table.frames.len() {
                    self.frame(record, index)?;
                }
                report.compressed_records += 1;
                report.compressed_frames += table.frames.len() as u64;
                0..table.logical_units
            } else {
                record.element_start..record.element_start + record.element_count
            };
            for (block, raw) in map.iter() {
                let address = raw & ADDRESS_MASK;
                if raw & ADDRESS_SHARED == 0 {
                    if !own.contains(&address) {
                        return Err(EngineError::Damaged(format!(
                            "history generation {}: block {block} is at unit {address}, outside the record's units {}..{}",
                            record.generation, own.start, own.end
                        )));
                    }
                    continue;
                }
                if !super::compress::is_compressed_record(record) && own.contains(&address) {
                    return Err(EngineError::Damaged(format!(
                        "history generation {}: block {block} flags its own unit {address} as shared",
                        record.generation
                    )));
                }
                if !owner_of(address) {
                    return Err(EngineError::Damaged(format!(
                        "history generation {}: block {block} shares unit {address}, which no other uncompressed record and no retained extent holds",
                        record.generation
                    )));
                }
                report.shared_across_elements += 1;
                referenced.push(address);
            }
            report.history_records += 1;
            report.history_elements += map.len();
        }
        // Every retained extent is still pointed at (none is kept forever for nothing).
        referenced.sort_unstable();
        for extent in &retained {
            let (start, end) = (extent.element_start, extent.element_start + extent.element_count);
            let at = referenced.partition_point(|a| *a < start);
            if referenced.get(at).is_none_or(|a| *a >= end) {
                return Err(EngineError::Damaged(format!(
                    "retained history units {start}..{end} (of generation {}) are referenced by no record",
                    extent.generation
                )));
            }
            report.retained_extents += 1;
            report.retained_units += extent.element_count;
        }
        for generation in 0..self.backup_generation() {
            if self.source(generation).is_none() {
                // Gaps appear only when generations were deleted on purpose (retention).
                continue;
            }
        }
        // "All" mode: every version record's table decodes and matches its catalog entry.
        let version_records: Vec<&CatalogEntry> =
            self.meta.history_catalog.entries.iter().filter(|e| e.kind == EntryKind::Versions).collect();
        for entry in version_records {
            report.version_records += 1;
            if entry.element_count > 0 || entry.control_count > 0 {
                report.versions += self.read_versions(entry)?.entries.len() as u64;
            }
        }
        report.sealed_generations = self.meta.sealed.len();
        report.sealed_elements = self.meta.sealed.iter().map(|s| s.blocks.len() as u64).sum();
        report.open_elements = self.meta.open.blocks.len() as u64;
        let unit = self.meta.unit_bytes();
        // "All" mode: only a block's newest version is its current content.
        let newest: Option<rustc_hash::FxHashSet<usize>> = (!self.meta.open.versions.is_empty()).then(|| {
            newest_versions(&self.meta.open.blocks, &self.meta.open.versions, u64::MAX)
                .into_iter()
                .map(|(_, k)| k)
                .collect()
        });
        for (k, block) in self.meta.open.blocks.iter().enumerate() {
            if newest.as_ref().is_some_and(|newest| !newest.contains(&k)) {
                continue;
            }
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
