//! Format and open (with crash recovery) of a volume — seed 001 FIG 7 S7005 (format creates
//! the tables) and ARCHITECTURE §8 (recovery).
//!
//! Recovery on open, in order:
//! 1. superblocks (newest valid copy), identity and geometry of all four devices;
//! 2. catalogs (newest valid slot) and the sort cursor;
//! 3. online generations already sorted (the history catalog's backup generation has reached
//!    them) are dropped from the journal;
//! 4. element index of every remaining online generation; sealed generations must read back
//!    whole, and their elements must match their checksums, or the open is refused;
//! 5. the open generation's elements are rewritten from the base (their last writes may have
//!    been in flight) and their checksums recomputed: cost ∝ the open generation, not the volume;
//! 6. rings and the history allocator are rebuilt from the catalogs; an interrupted sort is
//!    resumed by the volume from the cursor.
//!
//! Every step only reads, or writes idempotently through the double-buffer protocol, so a crash
//! during recovery is recovered the same way.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::core::allocator::{Extent, RingAllocator, SegmentAllocator};
use crate::core::checksum::crc32c;
use crate::core::format::catalog::{self, Catalog, CatalogEntry, EntryKind, EntryState};
use crate::core::format::element_index::{IndexPage, SLOT_BYTES};
use crate::core::format::layout::{self, HistoryLayout, JournalLayout, VolumeShape};
use crate::core::format::records::{SortCursor, SortState};
use crate::core::format::superblock::{self, DeviceRole, JournalFullPolicy, JournalMode, PeerDevice, Superblock};
use crate::core::format::{FormatError, METADATA_PAGE_BYTES};
use crate::core::geometry::{DeviceBlockSize, HostWriteSize, VolumeGeometry};
use crate::device::{Channel, DeviceGeometry};

use super::io::{block_on, run_bounded, ControlIo, HostOwner, IoHub, Role};
use super::meta::{newest_versions, Meta, OpenGeneration, PageState, SealedGeneration, Version};
use super::{now_ns, EngineError, FormatOptions};

/// Write sequences at or above this are damaged metadata, never a real volume's.
const MAX_SEQUENCE: u64 = 1 << 62;

const PAGE: u64 = METADATA_PAGE_BYTES as u64;
/// Bytes copied per I/O by format's base-to-backup copy and by recovery.
const COPY_CHUNK_BYTES: u64 = 1 << 20;
/// Copy I/Os in flight at once.
const COPY_IN_FLIGHT: usize = 8;

/// Progress of a long format step.
#[derive(Debug, Clone, Copy)]
pub struct FormatProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// Formats the four devices (channels in [`Role`] order) as one new volume. Blocking: for the
/// standalone host and tests.
pub fn format(
    channels: Vec<Box<dyn Channel>>,
    options: &FormatOptions,
    progress: &mut dyn FnMut(FormatProgress),
) -> Result<(), EngineError> {
    let hub = Rc::new(RefCell::new(IoHub::<()>::new(channels)));
    let io = ControlIo { hub: hub.clone() };
    block_on(&hub, format_volume(&io, options, progress))
}

type FormatFuture = Pin<Box<dyn Future<Output = Result<(), EngineError>>>>;

/// A volume's four channels, in [`Role`] order.
pub type Channels = Vec<Box<dyn Channel>>;

/// A format in progress ([`begin_format`]): poll it from the owner's loop (an SPDK poller)
/// until it gives the channels back, ready for [`Volume::begin_open`](super::Volume::begin_open).
pub struct Formatting {
    hub: Rc<RefCell<IoHub<()>>>,
    future: Option<FormatFuture>,
    progress: Rc<Cell<FormatProgress>>,
}

/// Starts formatting the four devices (channels in [`Role`] order) without blocking.
pub fn begin_format(channels: Vec<Box<dyn Channel>>, options: FormatOptions) -> Formatting {
    let hub = Rc::new(RefCell::new(IoHub::<()>::new(channels)));
    let io = ControlIo { hub: hub.clone() };
    let progress = Rc::new(Cell::new(FormatProgress { done_bytes: 0, total_bytes: 0 }));
    let report = progress.clone();
    let future = Box::pin(async move {
        let mut report = move |step: FormatProgress| report.set(step);
        format_volume(&io, &options, &mut report).await
    });
    Formatting { hub, future: Some(future), progress }
}

impl Formatting {
    /// Bytes of the base copied to the backup so far (the long step of a format).
    pub fn progress(&self) -> FormatProgress {
        self.progress.get()
    }

    /// Ready with the channels once the format has finished, successfully or not (then with
    /// the error too): nothing is in flight on them any more.
    pub fn poll(&mut self) -> Poll<(Result<(), EngineError>, Channels)> {
        let future = self.future.as_mut().expect("a format yields once");
        self.hub.borrow_mut().poll();
        let mut context = Context::from_waker(Waker::noop());
        let Poll::Ready(result) = future.as_mut().poll(&mut context) else { return Poll::Pending };
        // The future held the other reference to the hub (through its ControlIo).
        self.future = None;
        let hub = std::mem::replace(&mut self.hub, Rc::new(RefCell::new(IoHub::new_empty())));
        let hub = Rc::try_unwrap(hub).ok().expect("the finished format released the hub").into_inner();
        Poll::Ready((result, hub.into_channels()))
    }
}

fn geometries<O: HostOwner>(io: &ControlIo<O>) -> [DeviceGeometry; 4] {
    let hub = io.hub.borrow();
    Role::ALL.map(|role| hub.geometry(role))
}

fn names<O: HostOwner>(io: &ControlIo<O>) -> [String; 4] {
    let hub = io.hub.borrow();
    Role::ALL.map(|role| hub.device_name(role).to_owned())
}

/// Checks that the devices can hold a volume of the base's size at `host_write_size`.
/// `recorded_bytes`: the size of an existing volume (open), else the base's size (format).
fn volume_geometry(
    devices: &[DeviceGeometry; 4],
    names: &[String; 4],
    host_write_size: u32,
    recorded_bytes: Option<u64>,
) -> Result<VolumeGeometry, EngineError> {
    let geometry_error = |e: crate::core::geometry::GeometryError| EngineError::Geometry(e.to_string());
    let base_block = DeviceBlockSize::new(devices[0].block_size).map_err(geometry_error)?;
    let unit = HostWriteSize::for_device(host_write_size, base_block).map_err(geometry_error)?;
    for role in [Role::Journal, Role::Backup, Role::History] {
        let block = devices[role as usize].block_size;
        let block_size = DeviceBlockSize::new(block).map_err(geometry_error)?;
        HostWriteSize::for_device(host_write_size, block_size)
            .map_err(|e| EngineError::Geometry(format!("{} device {}: {e}", role.name(), names[role as usize])))?;
    }
    let unit_bytes = u64::from(unit.bytes());
    let volume_bytes = match recorded_bytes {
        Some(bytes) if devices[0].size_bytes() < bytes => {
            return Err(EngineError::Mismatch {
                role: "base",
                name: names[0].clone(),
                detail: format!(
                    "it holds {}, the volume needs {}",
                    layout::human(devices[0].size_bytes()),
                    layout::human(bytes)
                ),
            })
        }
        Some(bytes) => bytes,
        None => devices[0].size_bytes() / unit_bytes * unit_bytes,
    };
    let geometry = VolumeGeometry::new(base_block, unit, volume_bytes).map_err(|e| {
        EngineError::Geometry(format!("base device {} ({} bytes): {e}", names[0], devices[0].size_bytes()))
    })?;
    if devices[Role::Backup as usize].size_bytes() < volume_bytes {
        return Err(EngineError::Geometry(format!(
            "the backup device {} is {}, smaller than the volume ({}): the backup holds a full image",
            names[2],
            layout::human(devices[2].size_bytes()),
            layout::human(volume_bytes)
        )));
    }
    Ok(geometry)
}

pub(crate) async fn format_volume<O: HostOwner>(
    io: &ControlIo<O>,
    options: &FormatOptions,
    progress: &mut dyn FnMut(FormatProgress),
) -> Result<(), EngineError> {
    if options.journal_full_policy == JournalFullPolicy::BitmapOnly && options.journal_mode == JournalMode::All {
        // "All" promises every write's version; a base-only write would keep none.
        return Err(EngineError::Unsupported("journal-full policy bitmap-only with journal mode \"all\"".into()));
    }
    if options.volume_name.len() >= superblock::VOLUME_NAME_BYTES || options.volume_name.contains('\0') {
        return Err(EngineError::Invalid(format!(
            "volume name {:?} is longer than {} bytes or holds a NUL",
            options.volume_name,
            superblock::VOLUME_NAME_BYTES - 1
        )));
    }
    let devices = geometries(io);
    let device_names = names(io);
    let geometry = volume_geometry(&devices, &device_names, options.host_write_size, None)?;
    let shape = VolumeShape { host_write_size: options.host_write_size, volume_blocks: geometry.volume_blocks() };
    // The element index is sized for the journal mode's entries (126 per page in "all" mode,
    // 252 in "latest"): the mode recorded in the superblock is the one the layout is planned for.
    // The policy bitmap-only adds the open bitmap area (FIG 36).
    let bitmap_only = options.journal_full_policy == JournalFullPolicy::BitmapOnly;
    let layout_options =
        layout::LayoutOptions { mode: options.journal_mode, open_bitmap: bitmap_only, ..options.layout };
    let journal = layout::plan_journal(&shape, &layout_options, devices[1].size_bytes())?;
    let history = layout::plan_history(&shape, &layout_options, devices[3].size_bytes())?;
    let volume_uuid = *uuid::Uuid::new_v4().as_bytes();
    let created_ns = now_ns();

    // 1. Invalidate what a previous format left: superblocks first, so that a crash during
    //    format leaves devices that are plainly not chronicle devices.
    for role in [Role::Journal, Role::History] {
        let zero = vec![0u8; 2 * METADATA_PAGE_BYTES];
        io.write_bytes(role, 0, &zero, true).await?;
    }
    let zero_area = |role: Role, start: u64, length: u64| {
        let block = io.block_size(role);
        io.write_zeroes(role, start / block, length / block)
    };
    zero_area(Role::Journal, journal.catalogs[1].start_bytes, journal.catalogs[1].length_bytes).await?;
    zero_area(Role::Journal, journal.sites.start_bytes, journal.sites.length_bytes).await?;
    zero_area(Role::Journal, journal.index.start_bytes, journal.index.length_bytes).await?;
    if let Some(area) = journal.open_bitmap {
        zero_area(Role::Journal, area.start_bytes, area.length_bytes).await?;
    }
    zero_area(Role::History, history.catalogs[1].start_bytes, history.catalogs[1].length_bytes).await?;
    zero_area(Role::History, history.sort_cursors.start_bytes, history.sort_cursors.length_bytes).await?;

    // 2. Generation 0 is the base as it is now: the backup starts as its copy.
    if options.copy_base_to_backup {
        copy_volume(io, Role::Base, Role::Backup, geometry.volume_bytes(), progress).await?;
    }

    // 3. Catalogs and the sort cursor.
    let mut history_catalog = Catalog::new(DeviceRole::History, options.layout.catalog_entries);
    history_catalog.sequence = 1;
    history_catalog.backup_generation = 0;
    let mut backup = CatalogEntry::new(0, EntryKind::Backup, EntryState::Live);
    backup.time_ns = created_ns;
    backup.comment = "format".into();
    history_catalog.entries.push(backup);
    io.write_bytes(Role::History, history.catalogs[0].start_bytes, &history_catalog.encode(), false).await?;
    io.write_bytes(Role::History, history.sort_cursors.start_bytes, &SortCursor::idle(1).encode(), false).await?;

    let mut journal_catalog = Catalog::new(DeviceRole::Journal, options.layout.catalog_entries);
    journal_catalog.sequence = 1;
    journal_catalog.next_generation = 1;
    // Generation 0 (the format's image) ends at sequence 0; the first host request gets 1.
    journal_catalog.write_sequence = 1;
    let mut open = CatalogEntry::new(1, EntryKind::Online, EntryState::Open);
    open.time_ns = created_ns;
    journal_catalog.entries.push(open);
    io.write_bytes(Role::Journal, journal.catalogs[0].start_bytes, &journal_catalog.encode(), false).await?;
    for role in [Role::Journal, Role::Backup, Role::History] {
        io.flush(role).await?;
    }

    // 4. Superblocks last: the volume exists once the journal's superblock is durable.
    let peer = |role: Role| PeerDevice {
        role: match role {
            Role::Base => DeviceRole::Base,
            Role::Journal => DeviceRole::Journal,
            Role::Backup => DeviceRole::Backup,
            Role::History => DeviceRole::History,
        },
        bytes: devices[role as usize].size_bytes(),
        name: truncate_name(&options.names[role as usize]),
    };
    let make = |role: DeviceRole, device: usize, areas, peers| Superblock {
        sequence: 1,
        volume_uuid,
        device_uuid: *uuid::Uuid::new_v4().as_bytes(),
        role,
        journal_mode: options.journal_mode,
        journal_full_policy: options.journal_full_policy,
        durability: options.durability,
        device_block_size: devices[device].block_size,
        host_write_size: options.host_write_size,
        volume_blocks: geometry.volume_blocks(),
        device_bytes: devices[device].size_bytes(),
        features_compat: 0,
        // Only the journal has the bitmap area; an older build must not open it.
        features_incompat: if role == DeviceRole::Journal && bitmap_only {
            superblock::FEATURE_INCOMPAT_OPEN_BITMAP
        } else {
            0
        },
        features_ro_compat: 0,
        created_ns,
        areas,
        peers,
        volume_name: options.volume_name.clone(),
        strict: options.strict,
    };
    let history_superblock =
        make(DeviceRole::History, 3, history.areas(), vec![peer(Role::Base), peer(Role::Journal), peer(Role::Backup)]);
    // Both copies, so a damaged sector holding one of them leaves the other.
    let encoded = history_superblock.encode();
    io.write_bytes(Role::History, PAGE, &encoded, true).await?;
    io.write_bytes(Role::History, 0, &encoded, true).await?;
    let journal_superblock =
        make(DeviceRole::Journal, 1, journal.areas(), vec![peer(Role::Base), peer(Role::Backup), peer(Role::History)]);
    let encoded = journal_superblock.encode();
    io.write_bytes(Role::Journal, PAGE, &encoded, true).await?;
    io.write_bytes(Role::Journal, 0, &encoded, true).await?;
    Ok(())
}

fn truncate_name(name: &str) -> String {
    let mut end = name.len().min(superblock::PEER_NAME_BYTES - 1);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Copies the first `bytes` of one device to another, in bounded chunks.
async fn copy_volume<O: HostOwner>(
    io: &ControlIo<O>,
    from: Role,
    to: Role,
    bytes: u64,
    progress: &mut dyn FnMut(FormatProgress),
) -> Result<(), EngineError> {
    let from_block = io.block_size(from);
    let to_block = io.block_size(to);
    let mut done = 0u64;
    while done < bytes {
        let group_end = (done + COPY_CHUNK_BYTES * COPY_IN_FLIGHT as u64).min(bytes);
        let chunks: Vec<(u64, u64)> = (done..group_end)
            .step_by(COPY_CHUNK_BYTES as usize)
            .map(|start| (start, (group_end - start).min(COPY_CHUNK_BYTES)))
            .collect();
        run_bounded(
            chunks.into_iter().map(|(start, len)| async move {
                let data = io.read(from, start / from_block, len as usize).await?;
                io.write(to, start / to_block, Arc::new(data), false).await
            }),
            COPY_IN_FLIGHT,
        )
        .await?;
        done = group_end;
        progress(FormatProgress { done_bytes: done, total_bytes: bytes });
    }
    io.flush(to).await?;
    Ok(())
}

/// Reads a double-buffered structure's two copies.
async fn read_pair<O: HostOwner>(
    io: &ControlIo<O>,
    role: Role,
    first: u64,
    second: u64,
    len: usize,
) -> Result<(Vec<u8>, Vec<u8>), EngineError> {
    Ok((io.read_bytes(role, first, len).await?, io.read_bytes(role, second, len).await?))
}

/// Which slot holds the newest valid copy, given both decode results.
fn newest_slot<T>(a: &Result<T, FormatError>, b: &Result<T, FormatError>, sequence: impl Fn(&T) -> u64) -> usize {
    match (a, b) {
        (Ok(a), Ok(b)) if sequence(b) > sequence(a) => 1,
        (Err(_), Ok(_)) => 1,
        _ => 0,
    }
}

/// Opens the volume. `read_only` skips the one recovery step that writes (rebuilding the open
/// generation's elements from the base), for offline inspection that must change nothing.
pub(crate) async fn open_volume<O: HostOwner>(io: &ControlIo<O>, read_only: bool) -> Result<Meta, EngineError> {
    let devices = geometries(io);
    let device_names = names(io);
    let journal_name = &device_names[1];
    let history_name = &device_names[3];

    // 1. Superblocks and identity.
    let (a, b) = read_pair(io, Role::Journal, 0, PAGE, METADATA_PAGE_BYTES).await?;
    let journal_superblock = superblock::choose(&a, &b).map_err(|e| EngineError::format("journal", journal_name, e))?;
    let (a, b) = read_pair(io, Role::History, 0, PAGE, METADATA_PAGE_BYTES).await?;
    let history_superblock = superblock::choose(&a, &b).map_err(|e| EngineError::format("history", history_name, e))?;
    let mismatch = |role: Role, detail: String| EngineError::Mismatch {
        role: role.name(),
        name: device_names[role as usize].clone(),
        detail,
    };
    if journal_superblock.role != DeviceRole::Journal {
        return Err(mismatch(Role::Journal, format!("it is a {:?} device", journal_superblock.role)));
    }
    if history_superblock.role != DeviceRole::History {
        return Err(mismatch(Role::History, format!("it is a {:?} device", history_superblock.role)));
    }
    if history_superblock.volume_uuid != journal_superblock.volume_uuid {
        return Err(mismatch(Role::History, "it belongs to another volume (volume uuid differs)".into()));
    }
    if (history_superblock.host_write_size, history_superblock.volume_blocks)
        != (journal_superblock.host_write_size, journal_superblock.volume_blocks)
    {
        return Err(mismatch(Role::History, "its geometry differs from the journal's".into()));
    }
    let geometry = volume_geometry(
        &devices,
        &device_names,
        journal_superblock.host_write_size,
        Some(journal_superblock.volume_bytes()),
    )?;
    let geometry = VolumeGeometry::new(
        geometry.device_block_size(),
        geometry.host_write_size(),
        journal_superblock.volume_bytes(),
    )
    .map_err(|e| EngineError::Geometry(e.to_string()))?;
    for (role, superblock) in [(Role::Journal, &journal_superblock), (Role::History, &history_superblock)] {
        if devices[role as usize].size_bytes() < superblock.device_bytes {
            return Err(mismatch(
                role,
                format!("it shrank from {} to {} bytes", superblock.device_bytes, devices[role as usize].size_bytes()),
            ));
        }
        if devices[role as usize].block_size != superblock.device_block_size {
            return Err(mismatch(
                role,
                format!(
                    "its block size changed from {} to {}",
                    superblock.device_block_size, devices[role as usize].block_size
                ),
            ));
        }
    }
    let shape = VolumeShape {
        host_write_size: journal_superblock.host_write_size,
        volume_blocks: journal_superblock.volume_blocks,
    };
    let journal = JournalLayout::from_areas(&journal_superblock.areas, &shape, journal_superblock.journal_mode)
        .ok_or_else(|| {
            EngineError::Damaged(format!("journal {journal_name}: the superblock's areas are incomplete"))
        })?;
    let mut options = layout::LayoutOptions {
        mode: journal_superblock.journal_mode,
        max_online_generations: journal.max_online_generations(journal_superblock.journal_mode) as u32,
        open_bitmap: journal.open_bitmap.is_some(),
        ..Default::default()
    };
    let history = HistoryLayout::from_areas(&history_superblock.areas, &shape)
        .ok_or_else(|| EngineError::Damaged(format!("history {history_name}: the superblock lacks an area")))?;

    // 2. Catalogs and the sort cursor.
    let catalog_len = journal.catalogs[0].length_bytes as usize;
    let (a, b) =
        read_pair(io, Role::Journal, journal.catalogs[0].start_bytes, journal.catalogs[1].start_bytes, catalog_len)
            .await?;
    let (slot_a, slot_b) = (Catalog::decode(&a), Catalog::decode(&b));
    let journal_catalog_slot = newest_slot(&slot_a, &slot_b, |c| c.sequence);
    let journal_catalog = catalog::choose(&a, &b).map_err(|e| EngineError::format("journal", journal_name, e))?;
    options.catalog_entries = journal_catalog.capacity_entries;
    let catalog_len = history.catalogs[0].length_bytes as usize;
    let (a, b) =
        read_pair(io, Role::History, history.catalogs[0].start_bytes, history.catalogs[1].start_bytes, catalog_len)
            .await?;
    let (slot_a, slot_b) = (Catalog::decode(&a), Catalog::decode(&b));
    let history_catalog_slot = newest_slot(&slot_a, &slot_b, |c| c.sequence);
    let history_catalog = catalog::choose(&a, &b).map_err(|e| EngineError::format("history", history_name, e))?;
    let (a, b) = read_pair(
        io,
        Role::History,
        history.sort_cursors.start_bytes,
        history.sort_cursors.start_bytes + PAGE,
        METADATA_PAGE_BYTES,
    )
    .await?;
    let (cursor_a, cursor_b) = (SortCursor::decode(&a), SortCursor::decode(&b));
    let cursor_slot = newest_slot(&cursor_a, &cursor_b, |c| c.sequence);
    let cursor = superblock::newest(cursor_a, cursor_b, |c| c.sequence)
        .map_err(|e| EngineError::format("history", history_name, e))?;
    if journal_catalog.role != DeviceRole::Journal || history_catalog.role != DeviceRole::History {
        return Err(EngineError::Damaged("a catalog names the wrong device role".into()));
    }

    // 3. Drop online generations the sort has already applied.
    let backup_generation = history_catalog.backup_generation;
    let online: Vec<&CatalogEntry> = journal_catalog
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Online && e.generation > backup_generation)
        .collect();
    let Some((open_entry, sealed_entries)) = online.split_last() else {
        return Err(EngineError::Damaged("the journal catalog has no open generation".into()));
    };
    if open_entry.state != EntryState::Open || sealed_entries.iter().any(|e| e.state == EntryState::Open) {
        return Err(EngineError::Damaged("the journal catalog's newest generation is not the open one".into()));
    }

    let mut meta = Meta {
        geometry,
        shape,
        options,
        journal_superblock,
        history_superblock,
        block_size: devices.map(|d| u64::from(d.block_size)),
        ring: RingAllocator::new(journal.element_capacity).map_err(|e| EngineError::Damaged(e.to_string()))?,
        pages: RingAllocator::new(journal.index_pages).map_err(|e| EngineError::Damaged(e.to_string()))?,
        allocator: SegmentAllocator::new(history.unit_count),
        journal,
        history,
        journal_catalog: journal_catalog.clone(),
        journal_catalog_slot,
        history_catalog: history_catalog.clone(),
        history_catalog_slot,
        cursor,
        cursor_slot,
        open: OpenGeneration::new(open_entry.generation, open_entry.element_start, open_entry.control_start),
        open_bitmap: None,
        sealed: VecDeque::new(),
        record_maps: Default::default(),
        next_sequence: 0,
        last_write_ns: 0,
        compression: Default::default(),
    };
    meta.open.opened_ns = open_entry.time_ns;

    // 4. Element indexes. Ring positions must be consistent before addresses are computed.
    let tail_entry = sealed_entries.first().copied().unwrap_or(*open_entry);
    meta.ring =
        RingAllocator::from_state(meta.journal.element_capacity, tail_entry.element_start, open_entry.element_start)
            .map_err(|e| EngineError::Damaged(format!("journal ring: {e}")))?;
    meta.pages =
        RingAllocator::from_state(meta.journal.index_pages, tail_entry.control_start, open_entry.control_start)
            .map_err(|e| EngineError::Damaged(format!("journal index ring: {e}")))?;
    for entry in sealed_entries {
        let (blocks, crcs, versions, _) = read_index(
            io,
            &meta,
            entry.generation,
            entry.element_start,
            entry.control_start,
            Some(entry.control_count),
        )
        .await?;
        if blocks.len() as u64 != entry.element_count {
            return Err(EngineError::Damaged(format!(
                "sealed generation {}: its element index holds {} elements, the catalog says {}",
                entry.generation,
                blocks.len(),
                entry.element_count
            )));
        }
        meta.sealed.push_back(SealedGeneration {
            generation: entry.generation,
            time_ns: entry.time_ns,
            comment: entry.comment.clone(),
            element_start: entry.element_start,
            page_start: entry.control_start,
            page_count: entry.control_count,
            blocks,
            crcs,
            versions,
            last_sequence: entry.last_sequence,
            durable: true,
        });
    }
    for sealed in &meta.sealed {
        verify_sealed_elements(io, &meta, sealed).await?;
    }
    let (blocks, crcs, versions, pages) =
        read_index(io, &meta, open_entry.generation, open_entry.element_start, open_entry.control_start, None).await?;
    let open_elements = blocks.len() as u64;
    let open_pages = pages.len() as u64;
    meta.ring = RingAllocator::from_state(
        meta.journal.element_capacity,
        tail_entry.element_start,
        open_entry.element_start + open_elements,
    )
    .map_err(|e| EngineError::Damaged(format!("journal ring: {e}")))?;
    meta.pages = RingAllocator::from_state(
        meta.journal.index_pages,
        tail_entry.control_start,
        open_entry.control_start + open_pages,
    )
    .map_err(|e| EngineError::Damaged(format!("journal index ring: {e}")))?;
    meta.open.durable = blocks.len();
    meta.open.pages = pages;
    for (k, block) in blocks.iter().enumerate() {
        meta.open.entry_of.insert(*block, k as u32);
    }
    meta.open.blocks = blocks;
    meta.open.crcs = crcs;
    meta.open.versions = versions;
    // Sequences continue above every one a catalog or an index names (a write whose index entry
    // never became durable never reached the base either: its number may be given again).
    let named = meta.open.versions.iter().chain(meta.sealed.iter().flat_map(|s| s.versions.iter())).map(|v| v.sequence);
    let sealed = journal_catalog.entries.iter().chain(&history_catalog.entries).map(|e| e.last_sequence);
    let newest_named = named.chain(sealed).max();
    // No volume takes 2^62 writes: a larger number is damaged metadata (and would overflow
    // the counters that continue from it).
    let newest = newest_named.unwrap_or(0).max(journal_catalog.write_sequence);
    if newest >= MAX_SEQUENCE {
        return Err(EngineError::Damaged(format!(
            "a catalog or index entry names write sequence {newest}, more than any volume writes ({MAX_SEQUENCE})"
        )));
    }
    meta.next_sequence = newest_named.map_or(0, |s| s + 1).max(journal_catalog.write_sequence);
    // Write times never go back, across restarts too.
    let journal_times = meta.open.versions.iter().chain(meta.sealed.iter().flat_map(|s| s.versions.iter()));
    let history_times = history_catalog.entries.iter().filter(|e| e.kind == EntryKind::Versions);
    meta.last_write_ns =
        journal_times.map(|v| v.time_ns).chain(history_times.map(|e| e.last_time_ns)).max().unwrap_or(0);

    // 5. The open generation's elements follow the base again.
    if !read_only {
        resync_open_generation(io, &mut meta).await?;
    }
    // Blocks written to the base only (policy bitmap-only) and not in the index.
    super::bitmap_only::load(io, &mut meta).await?;

    // 6. History space: every extent is owned by a catalog entry (or by the running sort). A
    //    merge that did not commit is forgotten: its sources are intact, its output is free.
    meta.history_catalog.entries.retain(|e| !(e.kind == EntryKind::Merged && e.state == EntryState::Merging));
    meta.compression = super::compress::Compression::from_catalog(&meta.history_catalog);
    for entry in &meta.history_catalog.entries {
        for (start, units) in [(entry.element_start, entry.element_count), (entry.control_start, entry.control_count)] {
            if matches!(
                entry.kind,
                EntryKind::History
                    | EntryKind::Merged
                    | EntryKind::RestoreVolume
                    | EntryKind::DedupIndex
                    | EntryKind::Retained
                    | EntryKind::Versions
            ) && units > 0
            {
                meta.allocator.reserve(Extent::new(start, units)).map_err(|e| {
                    EngineError::Damaged(format!("history catalog generation {}: {e}", entry.generation))
                })?;
            }
        }
    }
    if meta.cursor.state == SortState::Running && meta.cursor.generation > backup_generation {
        for (start, units) in [
            (meta.cursor.history_start, meta.cursor.history_units),
            (meta.cursor.control_start, meta.cursor.control_units),
        ] {
            if units > 0 {
                meta.allocator
                    .reserve(Extent::new(start, units))
                    .map_err(|e| EngineError::Damaged(format!("sort cursor: {e}")))?;
            }
        }
    }
    Ok(meta)
}

/// Reads an online generation's element index: `(blocks, crcs, page states)`. With
/// `page_count` (sealed generations) every page must be valid; without it (the open
/// generation) reading stops at the first page that is not part of the generation.
async fn read_index<O: HostOwner>(
    io: &ControlIo<O>,
    meta: &Meta,
    generation: u64,
    element_start: u64,
    page_start: u64,
    page_count: Option<u64>,
) -> Result<(Vec<u64>, Vec<u32>, Vec<Version>, Vec<PageState>), EngineError> {
    let per_page = meta.entries_per_page();
    let all = meta.mode() == JournalMode::All;
    let mut blocks = Vec::new();
    let mut crcs = Vec::new();
    let mut versions = Vec::new();
    let mut states = Vec::new();
    let limit = page_count.unwrap_or(meta.journal.index_pages);
    let mut index = 0u64;
    while index < limit {
        let page = page_start + index;
        let bytes = io.read_bytes(Role::Journal, meta.index_slot_bytes(page, 0), 2 * SLOT_BYTES).await?;
        let (slot_a, slot_b) = bytes.split_at(SLOT_BYTES);
        let expected_first = element_start + index * per_page as u64;
        let belongs = |p: &IndexPage| {
            p.generation == generation && p.page == page && p.first_segment == expected_first && p.mode == meta.mode()
        };
        let a = IndexPage::decode(slot_a).ok().filter(belongs);
        let b = IndexPage::decode(slot_b).ok().filter(belongs);
        let (chosen, slot) = match (a, b) {
            (Some(a), Some(b)) if b.sequence > a.sequence => (b, 1u8),
            (Some(a), _) => (a, 0u8),
            (None, Some(b)) => (b, 1u8),
            (None, None) => {
                if page_count.is_some() {
                    return Err(EngineError::Damaged(format!(
                        "sealed generation {generation}: element index page {index} is unreadable (damaged or overwritten)"
                    )));
                }
                // The open generation ends here, unless a later page of it is valid: then
                // this page was damaged, not merely never written.
                if next_page_belongs(io, meta, generation, page + 1, expected_first + per_page as u64).await? {
                    return Err(EngineError::Damaged(format!(
                        "open generation {generation}: element index page {index} is damaged but later pages exist"
                    )));
                }
                break;
            }
        };
        let full = chosen.entries.len() == per_page;
        for entry in &chosen.entries {
            if entry.block >= meta.shape.volume_blocks {
                return Err(EngineError::Damaged(format!(
                    "generation {generation}: element index names block {} beyond the volume's {} blocks",
                    entry.block, meta.shape.volume_blocks
                )));
            }
            blocks.push(entry.block);
            crcs.push(entry.crc);
            if all {
                versions.push(Version { sequence: entry.sequence, time_ns: entry.time_ns, lost: entry.lost });
            }
        }
        states.push(PageState { sequence: chosen.sequence, newest_slot: Some(slot) });
        index += 1;
        if !full && page_count.is_none() {
            break;
        }
    }
    // "Latest" mode lists a block once per generation; "all" mode once per write.
    let mut seen = rustc_hash::FxHashSet::default();
    if let Some(duplicate) = blocks.iter().find(|b| !all && !seen.insert(**b)) {
        return Err(EngineError::Damaged(format!(
            "generation {generation}: block {duplicate} appears twice in its element index"
        )));
    }
    Ok((blocks, crcs, versions, states))
}

async fn next_page_belongs<O: HostOwner>(
    io: &ControlIo<O>,
    meta: &Meta,
    generation: u64,
    page: u64,
    first: u64,
) -> Result<bool, EngineError> {
    if page >= meta.open.page_start + meta.journal.index_pages {
        return Ok(false);
    }
    let bytes = io.read_bytes(Role::Journal, meta.index_slot_bytes(page, 0), 2 * SLOT_BYTES).await?;
    let (slot_a, slot_b) = bytes.split_at(SLOT_BYTES);
    Ok([slot_a, slot_b].iter().any(|slot| {
        IndexPage::decode(slot).is_ok_and(|p| p.generation == generation && p.page == page && p.first_segment == first)
    }))
}

/// Checks every element of a sealed generation against its checksum.
async fn verify_sealed_elements<O: HostOwner>(
    io: &ControlIo<O>,
    meta: &Meta,
    sealed: &SealedGeneration,
) -> Result<(), EngineError> {
    let unit = meta.unit_bytes() as usize;
    let lost = |k: usize| sealed.versions.get(k).is_some_and(|v| v.lost);
    let checks = sealed.blocks.iter().zip(&sealed.crcs).enumerate().filter(|(k, _)| !lost(*k)).map(|(k, (block, crc))| {
        let lba = meta.segment_lba(sealed.element_start + k as u64);
        async move {
            let data = io.read(Role::Journal, lba, unit).await?;
            let actual = crc32c(&data.to_vec());
            if actual != *crc {
                return Err(EngineError::Damaged(format!(
                    "sealed generation {}: the journal element of block {block} is damaged (crc32c {actual:#010x}, expected {crc:#010x})",
                    sealed.generation
                )));
            }
            Ok(())
        }
    });
    run_bounded(checks, 32).await?;
    Ok(())
}

/// Rewrites every element of the open generation from the base and recomputes its checksum.
/// In "all" mode that is each block's newest version (the base holds the block's current
/// content); an older version whose journal write did not survive the cut no longer matches
/// its checksum and is marked lost (FORMAT.md §9.3).
async fn resync_open_generation<O: HostOwner>(io: &ControlIo<O>, meta: &mut Meta) -> Result<(), EngineError> {
    if meta.open.blocks.is_empty() {
        return Ok(());
    }
    let unit = meta.unit_bytes() as usize;
    if meta.mode() == JournalMode::All {
        let newest: rustc_hash::FxHashSet<usize> =
            newest_versions(&meta.open.blocks, &meta.open.versions, u64::MAX).into_iter().map(|(_, k)| k).collect();
        let older: Vec<usize> =
            (0..meta.open.blocks.len()).filter(|k| !newest.contains(k) && !meta.open.versions[*k].lost).collect();
        let checks = older.iter().map(|k| {
            let (lba, crc) = (meta.segment_lba(meta.open.element_start + *k as u64), meta.open.crcs[*k]);
            async move { Ok::<bool, EngineError>(crc32c(&io.read(Role::Journal, lba, unit).await?.to_vec()) != crc) }
        });
        let lost = run_bounded(checks, 32).await?;
        let per_page = meta.entries_per_page();
        for (k, lost) in older.into_iter().zip(lost) {
            if lost {
                meta.open.versions[k].lost = true;
                meta.open.stale_pages.insert(k / per_page);
            }
        }
    }
    // The entries to refill: each block's newest version ("all" mode), else every entry (no
    // list of them: an open generation may hold millions).
    let newest: Option<Vec<usize>> = (meta.mode() == JournalMode::All).then(|| {
        newest_versions(&meta.open.blocks, &meta.open.versions, u64::MAX).into_iter().map(|(_, k)| k).collect()
    });
    let count = newest.as_ref().map_or(meta.open.blocks.len(), Vec::len);
    let target = |i: usize| newest.as_ref().map_or(i, |entries| entries[i]);
    let copies = (0..count).map(target).map(|k| (k, meta.open.blocks[k])).map(|(k, block)| {
        let base_lba = meta.volume_lba(0, block);
        let journal_lba = meta.segment_lba(meta.open.element_start + k as u64);
        async move {
            let data = io.read(Role::Base, base_lba, unit).await?;
            let crc = crc32c(&data.to_vec());
            io.write(Role::Journal, journal_lba, Arc::new(data), false).await?;
            Ok::<u32, EngineError>(crc)
        }
    });
    let crcs = run_bounded(copies, 32).await?;
    io.flush(Role::Journal).await?;
    let per_page = meta.entries_per_page();
    for (k, crc) in (0..count).map(target).zip(crcs) {
        if meta.open.crcs[k] != crc {
            meta.open.crcs[k] = crc;
            meta.open.stale_pages.insert(k / per_page);
        }
    }
    Ok(())
}
