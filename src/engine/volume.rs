//! The volume: owner of a chronicle volume's state on one thread, driven by [`Volume::poll`].
//!
//! Host requests are queued with [`Volume::submit`] and complete through `poll` — the shape of
//! an SPDK bdev's submit_request and completion callbacks. Markers and the background sort
//! run as control tasks polled from the same loop.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::core::format::catalog::{Catalog, EntryKind, EntryState};
use crate::core::geometry::div_size;
use crate::device::{Channel, DeviceGeometry, IoBuffers, IoError, Payload, SharedBuffers, Tag};

use super::io::{ControlIo, Executor, Hub, IoHub, Role};
use super::merge::{self, MaintenanceError, MaintenanceHandle, MergeReport, RetentionPolicy};
use super::meta::Meta;
use super::restore_volume::{self, RestoreHandle, RestoreId, RestoreInfo, RestoreTarget, RestoreVolumes};
use super::write::{HotCounters, HotPath, HotStep};
use super::{bitmap_only, checksums, marker, rollback, setup, sort, EngineError, VolumeOptions};

pub(crate) use super::write::HostRef;

/// A host operation, in the volume's (the base's) blocks.
#[derive(Debug)]
pub enum HostRequest {
    Read { offset_blocks: u64, buffers: IoBuffers },
    Write { offset_blocks: u64, buffers: SharedBuffers },
    Flush,
    Unmap { offset_blocks: u64, num_blocks: u64 },
    WriteZeroes { offset_blocks: u64, num_blocks: u64 },
}

/// Why a host operation failed; maps to an SPDK bdev I/O status. Device errors are boxed:
/// every host write carries an `Option<HostError>` and every completion a result, and they
/// move through several queues (56 bytes instead of 136).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Io(#[from] Box<IoError>),
    #[error("blocks {offset_blocks}..+{num_blocks} are outside the volume's {volume_blocks} blocks")]
    OutOfRange { offset_blocks: u64, num_blocks: u64, volume_blocks: u64 },
    #[error("buffers of {bytes} bytes are not a whole number of {block_size}-byte blocks")]
    InvalidBuffers { bytes: usize, block_size: usize },
    #[error(
        "blocks {offset_blocks}..+{num_blocks} are not whole {unit_bytes}-byte host-write-size units (strict mode)"
    )]
    NotWholeUnits { offset_blocks: u64, num_blocks: u64, unit_bytes: u64 },
    #[error("journal full: {needed_elements} elements needed, {free_elements} of {capacity_elements} free, and {why}")]
    NoSpace { needed_elements: u64, free_elements: u64, capacity_elements: u64, why: String },
    #[error("the volume stopped after a device error and must be reopened: {0}")]
    Failed(String),
    #[error("restore volume {0} is not open")]
    NoRestoreVolume(u32),
    #[error("restore volume {id}: no history unit is free for its write ({free_units} free)")]
    RestoreSpace { id: u32, free_units: u64 },
    #[error("busy: {0}")]
    Busy(String),
    #[error("history data is damaged: {0}")]
    Damaged(String),
}

impl From<IoError> for HostError {
    fn from(error: IoError) -> Self {
        HostError::Io(Box::new(error))
    }
}

/// A completed host operation with its buffers.
#[derive(Debug)]
pub struct HostCompletion {
    pub tag: Tag,
    pub result: Result<(), HostError>,
    pub payload: Payload,
}

/// Progress of the sort of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SortProgress {
    pub generation: u64,
    pub elements_done: u64,
    pub elements_total: u64,
}

/// Counters of markers and the sort.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ControlCounters {
    pub merges: u64,
    /// Elements merges did not store because an equal one was stored (units dedup saved).
    pub dedup_shared_elements: u64,
    /// Hash matches whose bytes differed (the element was stored).
    pub dedup_mismatches: u64,
    /// Of `dedup_shared_elements`, elements shared with another record's (or a retained
    /// extent's) unit.
    pub dedup_shared_across: u64,
    /// Matches across records merges stored instead of sharing: the first units of a run
    /// (`VolumeOptions::dedup_min_run`) or runs past a merge's budget of 64.
    pub dedup_declined_scattered: u64,
    pub generations_deleted: u64,
    /// History records compressed and decompressed (embodiment 8).
    pub compressions: u64,
    pub decompressions: u64,
    /// Oldest generations given up for space (journal-full policy "merge-oldest").
    pub dropped_for_space: u64,
    pub markers: u64,
    pub marker_hold_last_us: u64,
    pub marker_hold_max_us: u64,
    /// Elements the markers read back to checksum (rewritten in their generation, §9.1).
    pub marker_checksum_reads: u64,
    /// Elements read back to checksum ahead of the marker while the volume was idle.
    pub idle_checksum_reads: u64,
    pub generations_sorted: u64,
    pub elements_sorted: u64,
    pub sort_busy_us: u64,
    /// "All" mode: versions the sorts kept in the history (version records).
    pub versions_kept: u64,
    /// "All" mode: version records dropped because the image under them was given up.
    pub version_records_dropped: u64,
}

/// State shared by the hot path and the control tasks (one thread; borrowed briefly).
pub(crate) struct Shared {
    pub meta: Meta,
    pub options: VolumeOptions,
    pub hot: HotPath,
    /// Barriers of the markers and rollbacks not finished, in call order (set at the call, so
    /// no later write slips into the generation they seal): host writes submitted at or after
    /// the first wait; each runs when its barrier is first. At most [`MAX_HOLDS`].
    pub holds: std::collections::VecDeque<u64>,
    /// Barriers of the rollbacks not finished (a subset of `holds`): host reads submitted at or
    /// after the first wait too, so that no reader sees the image half rolled back.
    pub read_holds: std::collections::VecDeque<u64>,
    /// Set after a device error on the write path; writes fail until reopened.
    pub failed: Option<String>,
    pub sort_running: bool,
    /// The idle task checksumming rewritten elements runs (checksums.rs).
    pub checksums_running: bool,
    /// The volume is closing: the sort stops at its next batch boundary and none starts.
    pub stopping: bool,
    /// A merge, deletion or retention pass is running (one at a time).
    pub maintenance_running: bool,
    /// No new sort starts (a rollback reads the backup as it is).
    pub sort_paused: bool,
    /// Completions of the volume's own writes, by tag.
    pub internal_done: rustc_hash::FxHashMap<Tag, Result<(), HostError>>,
    pub internal_pending: usize,
    /// The sort changed the history since the retention policy last ran.
    pub retention_pending: bool,
    pub retention_error: Option<String>,
    pub sort_error: Option<String>,
    pub sort_progress: Option<SortProgress>,
    pub space_freed: bool,
    pub catalog_busy: [bool; 2],
    pub control: ControlCounters,
    /// Open restore volumes (R-VOLs).
    pub restores: RestoreVolumes,
    /// The map of the record the running sort is writing (FIG 20: R-VOL reads of blocks it
    /// saved go to the saved copy); set until the record commits.
    pub sorting: Option<crate::core::element_map::ElementMap>,
    /// Contents the sort and merges stored, for merges to share across records (a hint:
    /// bounded, in memory, see `engine::dedup`).
    pub content: crate::core::plan::dedup::ContentIndex,
}

pub(crate) type SharedRef = Rc<RefCell<Shared>>;

/// One generation as the status reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationInfo {
    pub generation: u64,
    /// A merged record stands for `generation..=through_generation` and restores only the image
    /// of `generation`; otherwise equal to `generation`.
    pub through_generation: u64,
    /// "open", "sealed" (waiting for the sort), "backup" (the backup's image), "history" (a
    /// sorted record) or "merged".
    pub state: &'static str,
    pub time_ns: u64,
    pub comment: String,
    /// Blocks written in the generation (open, sealed) or saved in its record (history).
    pub blocks: u64,
    /// The sequence the generation's image is cut at: every host write with a sequence up to
    /// it is in the image, every later one is not (0 for the format's generation 0 and for
    /// generations written before sequences were recorded; the newest write's for the open one).
    pub last_sequence: u64,
    /// "All" mode: the versions (host writes) of the generation still kept for any-point
    /// restore, with their first and last sequence and time; `None` when none are kept.
    pub versions: Option<VersionRange>,
    /// History records: stored compressed (embodiment 8).
    pub compressed: bool,
    /// History records: bytes the elements take as stored (frames and frame table when
    /// compressed), and before compression (equal when not compressed).
    pub stored_bytes: u64,
    pub original_bytes: u64,
}

/// The versions an "all" mode generation keeps (`chronicle generations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct VersionRange {
    /// Block versions kept (a write of n blocks makes n).
    pub elements: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub first_time_ns: u64,
    pub last_time_ns: u64,
}

impl VersionRange {
    /// The range of the versions not lost to a power cut, if any.
    pub(crate) fn of(versions: &[super::meta::Version]) -> Option<VersionRange> {
        let kept = versions.iter().filter(|v| !v.lost);
        kept.fold(None, |range: Option<VersionRange>, v| {
            Some(match range {
                None => VersionRange {
                    elements: 1,
                    first_sequence: v.sequence,
                    last_sequence: v.sequence,
                    first_time_ns: v.time_ns,
                    last_time_ns: v.time_ns,
                },
                Some(r) => VersionRange {
                    elements: r.elements + 1,
                    first_sequence: r.first_sequence.min(v.sequence),
                    last_sequence: r.last_sequence.max(v.sequence),
                    first_time_ns: r.first_time_ns.min(v.time_ns),
                    last_time_ns: r.last_time_ns.max(v.time_ns),
                },
            })
        })
    }
}

/// What a volume reports about itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub open_generation: u64,
    pub backup_generation: u64,
    pub volume_bytes: u64,
    pub host_write_size: u32,
    pub journal_capacity_elements: u64,
    pub journal_used_elements: u64,
    /// Elements of the open generation rewritten since their checksum was computed: what the
    /// next marker reads back (FORMAT.md §9.1).
    pub checksums_pending: u64,
    pub history_capacity_units: u64,
    pub history_used_units: u64,
    /// History units the live merged records do not use thanks to dedup (their blocks minus
    /// the units they hold).
    pub history_dedup_saved_units: u64,
    /// Of `history_dedup_saved_units`, elements that point at units of other records or of
    /// retained extents (dedup across records).
    pub history_dedup_saved_across_units: u64,
    /// History units kept only because live records point at them through dedup after the
    /// record that stored them left the history (retained extents, FIG 41/42).
    pub history_retained_units: u64,
    /// Bytes the compressed records save: original minus stored (embodiment 8).
    pub history_compression_saved_bytes: u64,
    pub sealed_waiting: usize,
    /// How the open generation tracks writes: "journaling", or "bitmap-only" while some of its
    /// blocks are in the base only because the journal was full (policy bitmap-only, FIG 36).
    pub journal_full_mode: &'static str,
    /// Blocks of the open generation tracked by the bitmap only (copied into the journal as
    /// space frees; a marker waits for them).
    pub bitmap_tracked_blocks: u64,
    /// Counters of the bitmap-only mode (volumes formatted with that policy).
    pub bitmap: Option<super::BitmapCounters>,
    pub sort: Option<SortProgress>,
    pub sort_error: Option<String>,
    pub retention: RetentionPolicy,
    pub retention_error: Option<String>,
    pub failed: Option<String>,
    pub generations: Vec<GenerationInfo>,
    /// Open restore volumes.
    pub restores: Vec<RestoreInfo>,
    pub host: HotCounters,
    pub control: ControlCounters,
}

/// A volume's identity and the choices fixed when it was formatted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub volume_uuid: [u8; 16],
    pub volume_name: String,
    pub host_write_size: u32,
    pub volume_bytes: u64,
    pub durability: crate::core::format::superblock::Durability,
    pub journal_full_policy: crate::core::format::superblock::JournalFullPolicy,
    pub journal_mode: crate::core::format::superblock::JournalMode,
    pub strict: bool,
}

/// The result of a marker, filled in when it completes.
#[derive(Clone, Default)]
pub struct MarkerHandle {
    result: Rc<RefCell<Option<Result<u64, MaintenanceError>>>>,
}

impl MarkerHandle {
    /// `Some(Ok(generation))` once the generation is sealed; a refusal says why by kind
    /// (invalid request, no room, failure), so callers need not check ahead.
    pub fn result(&self) -> Option<Result<u64, MaintenanceError>> {
        self.result.borrow().clone()
    }

    pub(crate) fn set(&self, result: Result<u64, EngineError>) {
        *self.result.borrow_mut() = Some(result.map_err(MaintenanceError::from));
    }
}

pub struct Volume {
    shared: SharedRef,
    hub: Hub<HostRef>,
    executor: Executor,
    closing: Option<Closing>,
    handover: Option<Handover>,
}

/// Steps of handing the volume's devices over to other channels of the same devices
/// ([`Volume::begin_handover`]).
enum Handover {
    /// Host requests queue, nothing new starts; the operations in flight finish.
    Draining,
    /// The channels are out: each device's name and geometry, to check the new ones against.
    Released(Vec<(String, DeviceGeometry)>),
}

/// Markers and rollbacks waiting or running at once; more are refused.
pub(crate) const MAX_HOLDS: usize = 64;

/// Tags of the volume's own writes (a rollback's) carry this bit; host tags must not.
pub(crate) const INTERNAL_TAG: Tag = 1 << 63;

/// Steps of a non-blocking close ([`Volume::begin_close`]).
enum Closing {
    /// Waiting for host operations, the index commit, a marker and the sort's current batch.
    Draining,
    /// Flushing every device.
    Flushing(Pin<Box<dyn Future<Output = Result<(), IoError>>>>),
    Done(Result<(), IoError>),
}

/// A volume being opened (recovery in progress); poll until it yields the volume.
pub struct Opening {
    hub: Hub<HostRef>,
    future: Pin<Box<dyn Future<Output = Result<Meta, EngineError>>>>,
    options: Option<VolumeOptions>,
}

impl Opening {
    pub fn poll(&mut self) -> Poll<Result<Volume, EngineError>> {
        self.hub.borrow_mut().poll();
        let mut context = Context::from_waker(Waker::noop());
        match self.future.as_mut().poll(&mut context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Ready(Ok(meta)) => {
                let options = self.options.take().expect("an opening yields once");
                Poll::Ready(Ok(Volume::from_meta(self.hub.clone(), meta, options)))
            }
        }
    }
}

impl Volume {
    /// Starts opening (and recovering) the volume on `channels` (in [`Role`] order).
    pub fn begin_open(channels: Vec<Box<dyn Channel>>, options: VolumeOptions) -> Opening {
        let hub = Rc::new(RefCell::new(IoHub::new(channels)));
        let io = ControlIo { hub: hub.clone() };
        Opening { hub, future: Box::pin(async move { setup::open_volume(&io, false).await }), options: Some(options) }
    }

    /// Opens the volume, blocking until recovery is done (standalone host and tests).
    pub fn open(channels: Vec<Box<dyn Channel>>, options: VolumeOptions) -> Result<Volume, EngineError> {
        let mut opening = Volume::begin_open(channels, options);
        loop {
            if let Poll::Ready(result) = opening.poll() {
                return result;
            }
        }
    }

    fn from_meta(hub: Hub<HostRef>, meta: Meta, mut options: VolumeOptions) -> Volume {
        options.strict |= meta.journal_superblock.strict;
        let first_sequence = meta.next_sequence;
        let shared = Rc::new(RefCell::new(Shared {
            meta,
            options,
            hot: HotPath::new(first_sequence),
            holds: Default::default(),
            read_holds: Default::default(),
            failed: None,
            sort_running: false,
            checksums_running: false,
            stopping: false,
            maintenance_running: false,
            sort_paused: false,
            internal_done: Default::default(),
            internal_pending: 0,
            retention_pending: true,
            retention_error: None,
            sort_error: None,
            sort_progress: None,
            space_freed: false,
            catalog_busy: [false; 2],
            control: ControlCounters::default(),
            restores: RestoreVolumes::default(),
            sorting: None,
            content: crate::core::plan::dedup::ContentIndex::new(super::dedup::CONTENT_INDEX_CAPACITY),
        }));
        let mut volume = Volume { shared, hub, executor: Executor::default(), closing: None, handover: None };
        // The history records' maps come into memory in the background (R-VOL opens, merges
        // and rollbacks then read no control block).
        volume.executor.spawn(merge::load_record_maps(volume.shared.clone(), volume.control_io()));
        // So does the index of stored contents that merges share across records.
        volume.executor.spawn(super::dedup::rebuild_content_index(volume.shared.clone(), volume.control_io()));
        volume
    }

    fn control_io(&self) -> ControlIo<HostRef> {
        ControlIo { hub: self.hub.clone() }
    }

    /// A hint before [`submit`](Self::submit), changing nothing: where the open generation's
    /// index entry of a write's first unit lives. A random write's entry is a cache miss on a
    /// large volume (the largest single cost of placing a write, BENCHMARKS "SPDK module");
    /// the SPDK module prefetches the entries of a batch of writes that arrived together
    /// before submitting them, so those misses overlap instead of each write waiting for its
    /// own.
    pub fn index_address(&self, request: &HostRequest) -> Option<*const u32> {
        let HostRequest::Write { offset_blocks, .. } = request else { return None };
        let shared = self.shared.borrow();
        let unit = div_size(*offset_blocks, shared.meta.blocks_per_unit(0));
        shared.meta.open.entry_of.entry_address(unit)
    }

    /// Queues a host operation; its completion comes from [`poll`](Self::poll). When nothing
    /// waits before it, it starts at once (its device operations are submitted now): one trip
    /// through the queue less, with the host's data still in cache.
    pub fn submit(&mut self, tag: Tag, request: HostRequest) {
        let mut shared = self.shared.borrow_mut();
        let mut hub = self.hub.borrow_mut();
        let mut step = HotStep { shared: &mut shared, hub: &mut hub };
        if self.handover.is_some() {
            return step.queue(tag, request);
        }
        step.submit(tag, request);
    }

    /// Advances everything once: device completions, host state machines, control tasks.
    /// Moves finished host operations into `completions`; returns the number of device
    /// completions processed (0 means nothing happened).
    pub fn poll(&mut self, completions: &mut Vec<HostCompletion>) -> usize {
        if let Some(handover) = &self.handover {
            // Only what is in flight goes on: its completions are reaped for the steps (and
            // futures) to take once the devices are back.
            let reaped = match handover {
                Handover::Draining => self.hub.borrow_mut().poll(),
                Handover::Released(_) => 0,
            };
            self.deliver(completions);
            return reaped;
        }
        let reaped = {
            let mut hub = self.hub.borrow_mut();
            let reaped = hub.poll();
            let mut shared = self.shared.borrow_mut();
            let mut step = HotStep { shared: &mut shared, hub: &mut hub };
            while let Some((owner, completion)) = step.hub.next_host_completion() {
                step.on_completion(owner, completion);
            }
            if step.shared.space_freed {
                step.shared.space_freed = false;
                step.retry_space();
                if let Some(bitmap) = step.shared.meta.open_bitmap.as_mut() {
                    bitmap.resync_due = true; // Back to journaling as space allows (FIG 36).
                }
            }
            step.fail_space_waiters();
            step.unblock();
            step.admit();
            step.maybe_commit();
            step.maybe_commit_bitmap();
            step.shared.hot.note_poll();
            reaped
        };
        self.start_sort_if_needed();
        self.start_resync_if_needed();
        self.start_retention_if_needed();
        self.start_checksums_if_needed();
        self.executor.poll();
        self.deliver(completions);
        reaped
    }

    /// Moves finished host operations into `completions`.
    fn deliver(&self, completions: &mut Vec<HostCompletion>) {
        let mut shared = self.shared.borrow_mut();
        if shared.internal_pending == 0 {
            completions.append(&mut shared.hot.completed);
        } else {
            // The volume's own writes (tags with INTERNAL_TAG) go to the task that made them.
            let completed = std::mem::take(&mut shared.hot.completed);
            for completion in completed {
                if completion.tag & INTERNAL_TAG != 0 {
                    shared.internal_pending -= 1;
                    shared.internal_done.insert(completion.tag, completion.result);
                } else {
                    completions.push(completion);
                }
            }
        }
    }

    /// Starts handing the volume's devices over to other channels of the same devices (SPDK:
    /// the volume moving to the thread that submits its I/O, docs/SPDK.md "Next steps"). From
    /// now on host requests queue in submission order and nothing new starts: no host step,
    /// marker, sort or other background step runs until
    /// [`adopt_channels`](Self::adopt_channels); [`poll`](Self::poll) only reaps what is in
    /// flight and delivers finished host operations. Refused while closing or handing over.
    pub fn begin_handover(&mut self) -> Result<(), EngineError> {
        if self.closing.is_some() {
            return Err(EngineError::Busy("the volume is closing".into()));
        }
        if self.handover.is_some() {
            return Err(EngineError::Busy("the volume's devices are being handed over already".into()));
        }
        self.handover = Some(Handover::Draining);
        Ok(())
    }

    /// Whether [`release_channels`](Self::release_channels) may run: a hand-over is draining
    /// and nothing is in flight on the channels any more.
    pub fn handover_ready(&self) -> bool {
        matches!(self.handover, Some(Handover::Draining)) && self.hub.borrow().devices_idle()
    }

    /// Calls off a hand-over whose channels are not released yet: queued host requests and
    /// background work go on from where they stopped, on the channels the volume kept (SPDK: a
    /// move given up because another caller came). Refused once the channels are released
    /// ([`adopt_channels`](Self::adopt_channels) ends that one) or when none was begun.
    pub fn cancel_handover(&mut self) -> Result<(), EngineError> {
        match self.handover {
            Some(Handover::Draining) => {
                self.handover = None;
                Ok(())
            }
            Some(Handover::Released(_)) => {
                Err(EngineError::Busy("the channels are released: adopt channels to end the hand-over".into()))
            }
            None => Err(EngineError::Busy("no hand-over was begun".into())),
        }
    }

    /// The volume's channels, in [`Role`] order, once [`handover_ready`](Self::handover_ready)
    /// (to be dropped on the thread they belong to); the volume has none until
    /// [`adopt_channels`](Self::adopt_channels).
    pub fn release_channels(&mut self) -> Result<Vec<Box<dyn Channel>>, EngineError> {
        if !self.handover_ready() {
            return Err(EngineError::Busy(match self.handover {
                None => "no hand-over was begun".into(),
                Some(Handover::Released(_)) => "the channels are released already".into(),
                Some(Handover::Draining) => "operations are still in flight".into(),
            }));
        }
        let channels = self.hub.borrow_mut().take_channels();
        let devices = channels.iter().map(|channel| (channel.name().to_string(), channel.geometry())).collect();
        self.handover = Some(Handover::Released(devices));
        Ok(channels)
    }

    /// Takes `channels` (in [`Role`] order, to the devices released, on the calling thread) and
    /// ends the hand-over: queued host requests and background work go on from where they
    /// stopped. Channels to other devices are refused and given back, nothing changed.
    pub fn adopt_channels(
        &mut self,
        channels: Vec<Box<dyn Channel>>,
    ) -> Result<(), (EngineError, Vec<Box<dyn Channel>>)> {
        let Some(Handover::Released(devices)) = &self.handover else {
            return Err((EngineError::Busy("no channels were released".into()), channels));
        };
        if channels.len() != devices.len() {
            let detail = format!("{} channels for {} devices", channels.len(), devices.len());
            return Err((EngineError::Invalid(detail), channels));
        }
        let mismatch =
            Role::ALL.into_iter().zip(devices).zip(&channels).find_map(|((role, (name, geometry)), channel)| {
                let detail = if channel.name() != name {
                    format!("a channel to {} instead", channel.name())
                } else if channel.geometry() != *geometry {
                    format!("its geometry changed from {geometry:?} to {:?}", channel.geometry())
                } else {
                    return None;
                };
                Some(EngineError::Mismatch { role: role.name(), name: name.clone(), detail })
            });
        if let Some(error) = mismatch {
            return Err((error, channels));
        }
        self.hub.borrow_mut().put_channels(channels);
        self.handover = None;
        Ok(())
    }

    fn start_sort_if_needed(&mut self) {
        let start = {
            let shared = self.shared.borrow();
            shared.options.sort.automatic
                && !shared.stopping
                && !shared.sort_paused
                && !shared.sort_running
                && shared.sort_error.is_none()
                && shared.failed.is_none()
                && shared.meta.sealed.front().is_some_and(|g| g.durable)
        };
        if start {
            self.shared.borrow_mut().sort_running = true;
            self.executor.spawn(sort::run_sorts(self.shared.clone(), self.control_io()));
        }
    }

    fn start_resync_if_needed(&mut self) {
        let start = bitmap_only::resync_wanted(&self.shared.borrow());
        if start {
            let mut shared = self.shared.borrow_mut();
            shared.meta.open_bitmap.as_mut().expect("resync wanted").resync_running = true;
            drop(shared);
            self.executor.spawn(bitmap_only::run_resync(self.shared.clone(), self.control_io()));
        }
    }

    fn start_checksums_if_needed(&mut self) {
        if checksums::idle_wanted(&self.shared.borrow()) {
            self.shared.borrow_mut().checksums_running = true;
            self.executor.spawn(checksums::run_idle(self.shared.clone(), self.control_io()));
        }
    }

    fn start_retention_if_needed(&mut self) {
        let start = {
            let shared = self.shared.borrow();
            shared.retention_pending
                && !shared.maintenance_running
                && !shared.stopping
                && shared.failed.is_none()
                && shared.options.retention != RetentionPolicy::default()
        };
        if start {
            // Cleared now so the pass is spawned once; a sort finishing meanwhile sets it again.
            self.shared.borrow_mut().retention_pending = false;
            self.executor.spawn(merge::run_retention(self.shared.clone(), self.control_io()));
        }
    }

    /// Merges the history records of generations `from..=through` into one (seed 001 FIG 11):
    /// image(`from`) stays restorable, the generations after it up to `through` are given up.
    pub fn merge(&mut self, from: u64, through: u64) -> MaintenanceHandle {
        self.maintain(merge::Maintenance::Merge { from, through })
    }

    /// Gives up the image of `generation` (a history generation): the oldest is dropped, a
    /// younger one merged into the one before it.
    pub fn delete_generation(&mut self, generation: u64) -> MaintenanceHandle {
        self.maintain(merge::Maintenance::Delete { generation })
    }

    /// Compresses the history record of `generation` (embodiment 8, FIG 50); the report says
    /// whether it got smaller (a record that would not is left as it is).
    pub fn compress_generation(&mut self, generation: u64) -> super::CompressHandle {
        self.compression(generation, true)
    }

    /// Decompresses the history record of `generation`.
    pub fn decompress_generation(&mut self, generation: u64) -> super::CompressHandle {
        self.compression(generation, false)
    }

    fn compression(&mut self, generation: u64, compress: bool) -> super::CompressHandle {
        let handle = super::CompressHandle::default();
        let task = super::compress::run(self.shared.clone(), self.control_io(), generation, compress, handle.clone());
        self.executor.spawn(task);
        handle
    }

    /// Blocks until a compression request completes (standalone host and tests).
    pub fn wait_compression(
        &mut self,
        handle: &super::CompressHandle,
        completions: &mut Vec<HostCompletion>,
    ) -> Result<super::CompressReport, EngineError> {
        loop {
            if let Some(result) = handle.result() {
                return result.map_err(EngineError::from);
            }
            if self.poll(completions) == 0 {
                std::hint::spin_loop();
            }
        }
    }

    fn maintain(&mut self, request: merge::Maintenance) -> MaintenanceHandle {
        let handle = MaintenanceHandle::default();
        self.executor.spawn(merge::run_maintenance(self.shared.clone(), self.control_io(), request, handle.clone()));
        handle
    }

    /// Sets the retention policy; it runs now and after every sort.
    pub fn set_retention(&mut self, policy: RetentionPolicy) {
        let mut shared = self.shared.borrow_mut();
        shared.options.retention = policy;
        shared.retention_pending = true;
        shared.retention_error = None;
    }

    /// Blocks until a maintenance request completes (standalone host and tests).
    pub fn wait_maintenance(
        &mut self,
        handle: &MaintenanceHandle,
        completions: &mut Vec<HostCompletion>,
    ) -> Result<MergeReport, EngineError> {
        loop {
            if let Some(result) = handle.result() {
                return result.map_err(EngineError::from);
            }
            if self.poll(completions) == 0 {
                std::hint::spin_loop();
            }
        }
    }

    /// Rolls the base back to the image of `generation` (FIG 13/14 restore, applied to the
    /// volume itself): seals the current state as a generation (so the rollback can be undone
    /// by rolling back to it), rewrites every block changed since `generation` with its content
    /// then — as journaled writes, while the host's writes wait — and seals that as a new
    /// generation with `comment`. The handle gives the new generation's number.
    pub fn rollback(&mut self, generation: u64, comment: &str) -> MarkerHandle {
        let handle = MarkerHandle::default();
        let Some(barrier) = self.hold(&handle) else { return handle };
        self.shared.borrow_mut().read_holds.push_back(barrier);
        self.executor.spawn(rollback::run_rollback(
            self.shared.clone(),
            self.control_io(),
            generation,
            comment.to_owned(),
            barrier,
            handle.clone(),
        ));
        handle
    }

    /// Opens generation `generation` as a restore volume (R-VOL, FIG 13–15): readable and
    /// writable at once, without copying the image; its writes go to units of its own, the
    /// history is never changed. A generation still in the journal opens once the sort has
    /// applied it. The handle gives the R-VOL's id for [`submit_restore`](Self::submit_restore).
    pub fn open_restore(&mut self, generation: u64) -> RestoreHandle {
        self.open_restore_at(RestoreTarget::Generation(generation))
    }

    /// Opens `target` as a restore volume: a generation as [`open_restore`](Self::open_restore)
    /// does, or ("all" journal mode, seed 001 embodiment 4) the image right after a host write
    /// given by its sequence, or the image after every write taken by a time. It reads the
    /// versions of the generation after the target's cut from that generation's version record,
    /// so a target in a sealed generation opens once the sort has applied it; one in the open
    /// generation is refused until a marker seals it. Refusals (a volume not in "all" mode, a
    /// target not kept, in the future, or older than everything kept) come through the handle.
    pub fn open_restore_at(&mut self, target: RestoreTarget) -> RestoreHandle {
        let handle = RestoreHandle::default();
        match restore_volume::reserve_open(&self.shared) {
            Ok(()) => self.executor.spawn(restore_volume::run_open(
                self.shared.clone(),
                self.control_io(),
                target,
                handle.clone(),
            )),
            Err(error) => handle.set_error(error),
        }
        handle
    }

    /// Queues a request on R-VOL `restore`, in the volume's blocks; it completes through
    /// [`poll`](Self::poll) like a host request (tags must be unique across both).
    pub fn submit_restore(&mut self, restore: RestoreId, tag: Tag, request: HostRequest) {
        match restore_volume::admit(&self.shared, restore) {
            Ok(()) => self.executor.spawn(restore_volume::run_request(
                self.shared.clone(),
                self.control_io(),
                restore,
                tag,
                request,
            )),
            Err(error) => {
                let payload = match request {
                    HostRequest::Read { buffers, .. } => Payload::Read(buffers),
                    HostRequest::Write { buffers, .. } => Payload::Write(buffers),
                    _ => Payload::None,
                };
                self.shared.borrow_mut().hot.completed.push(HostCompletion { tag, result: Err(error), payload });
            }
        }
    }

    /// Closes R-VOL `restore`: requests submitted from now on are refused, those in flight
    /// finish, then its own units are freed.
    pub fn close_restore(&mut self, restore: RestoreId) -> Result<(), EngineError> {
        restore_volume::begin_close(&self.shared, restore)?;
        self.executor.spawn(restore_volume::run_close(self.shared.clone(), restore));
        Ok(())
    }

    /// The submission sequence the next host request will get ("all" mode stores it with the
    /// write's version; `restore --sequence` targets it).
    pub fn next_sequence(&self) -> u64 {
        self.shared.borrow().hot.next_seq
    }

    /// Whether [`rollback`](Self::rollback) to `generation` would be accepted now: the volume
    /// holds its image (a sealed generation, the backup's, or the first of a history record).
    pub fn check_rollback(&self, generation: u64) -> Result<(), EngineError> {
        rollback::check_restorable(&self.shared, generation)
    }

    /// Holds host writes submitted from now on until a marker or rollback is done with them;
    /// `None` (and the handle answered) when too many are waiting already.
    fn hold(&mut self, handle: &MarkerHandle) -> Option<u64> {
        let mut shared = self.shared.borrow_mut();
        if shared.holds.len() >= MAX_HOLDS {
            handle.set(Err(EngineError::Busy(format!(
                "{MAX_HOLDS} markers or rollbacks are waiting already; try again when one is done"
            ))));
            return None;
        }
        let barrier = shared.hot.take_seq();
        debug_assert!(shared.holds.back().is_none_or(|b| *b < barrier), "barriers unique, in call order");
        shared.holds.push_back(barrier);
        Some(barrier)
    }

    /// Cuts a generation: seals the open generation with `comment` and opens the next.
    pub fn mark(&mut self, comment: &str) -> MarkerHandle {
        let handle = MarkerHandle::default();
        // The marker covers every write submitted before this call, and none after.
        let Some(barrier) = self.hold(&handle) else { return handle };
        self.executor.spawn(marker::run_marker(
            self.shared.clone(),
            self.control_io(),
            comment.to_owned(),
            barrier,
            handle.clone(),
        ));
        handle
    }

    /// Starts sorting sealed generations now (when automatic sorting is off), and clears a
    /// previous sort error so the sort is retried.
    pub fn sort_now(&mut self) {
        let mut shared = self.shared.borrow_mut();
        shared.sort_error = None;
        shared.options.sort.automatic = true;
    }

    /// Nothing in flight: no host operation, no marker, no sort work pending.
    pub fn is_idle(&self) -> bool {
        let shared = self.shared.borrow();
        let retention_due = shared.retention_pending
            && shared.options.retention != RetentionPolicy::default()
            && !shared.stopping
            && shared.failed.is_none();
        shared.hot.outstanding() == 0
            && shared.hot.completed.is_empty()
            && !retention_due
            && !shared.hot.commit_in_flight()
            && !bitmap_only::resync_wanted(&shared)
            && !checksums::idle_due(&shared)
            && self.executor.is_empty()
            && (shared.meta.sealed.is_empty() || shared.sort_error.is_some() || !shared.options.sort.automatic)
    }

    /// Polls until [`is_idle`](Self::is_idle) (standalone host and tests). Host completions
    /// that arrive meanwhile are appended to `completions`.
    pub fn run_until_idle(&mut self, completions: &mut Vec<HostCompletion>) {
        while !self.is_idle() {
            if self.poll(completions) == 0 {
                std::hint::spin_loop();
            }
        }
    }

    /// Blocks until the marker completes (standalone host and tests).
    pub fn mark_and_wait(&mut self, comment: &str, completions: &mut Vec<HostCompletion>) -> Result<u64, EngineError> {
        let handle = self.mark(comment);
        loop {
            if let Some(result) = handle.result() {
                return result.map_err(EngineError::from);
            }
            if self.poll(completions) == 0 {
                std::hint::spin_loop();
            }
        }
    }

    /// What the volume is, as recorded when it was formatted.
    pub fn identity(&self) -> Identity {
        let shared = self.shared.borrow();
        let meta = &shared.meta;
        Identity {
            volume_uuid: meta.journal_superblock.volume_uuid,
            volume_name: meta.journal_superblock.volume_name.clone(),
            host_write_size: meta.shape.host_write_size,
            volume_bytes: meta.geometry.volume_bytes(),
            durability: meta.durability(),
            journal_full_policy: meta.journal_full_policy(),
            journal_mode: meta.mode(),
            strict: meta.journal_superblock.strict,
        }
    }

    /// Why the sort stopped, if it did (the volume keeps taking writes until the journal fills).
    pub fn sort_error(&self) -> Option<String> {
        self.shared.borrow().sort_error.clone()
    }

    /// Starts or stops sorting sealed generations in the background, and limits its bandwidth
    /// (bytes per second read from the journal). Starting clears a previous sort error, so the
    /// sort is retried.
    /// Changes [`VolumeOptions::marker_read_back_bytes`](super::VolumeOptions): entries already
    /// pending stay so (the next marker or idle step checksums them), later rewrites follow
    /// the new bound.
    pub fn set_marker_read_back_bytes(&mut self, bytes: u64) {
        self.shared.borrow_mut().options.marker_read_back_bytes = bytes;
    }

    pub fn set_sort(&mut self, automatic: bool, rate_limit_bytes_per_second: Option<u64>) {
        let mut shared = self.shared.borrow_mut();
        if automatic && !shared.options.sort.automatic {
            shared.sort_error = None;
        }
        shared.options.sort.automatic = automatic;
        shared.options.sort.rate_limit_bytes_per_second = rate_limit_bytes_per_second;
    }

    pub fn status(&self) -> Status {
        let shared = self.shared.borrow();
        let meta = &shared.meta;
        let generations = generation_list(meta);
        Status {
            open_generation: meta.open.generation,
            backup_generation: meta.history_catalog.backup_generation,
            volume_bytes: meta.geometry.volume_bytes(),
            host_write_size: meta.shape.host_write_size,
            journal_capacity_elements: meta.ring.capacity(),
            journal_used_elements: meta.ring.used(),
            checksums_pending: meta.open.crc_pending.len() as u64,
            history_capacity_units: meta.allocator.capacity(),
            history_used_units: meta.allocator.used_units(),
            history_dedup_saved_units: meta
                .history_catalog
                .entries
                .iter()
                .filter(|e| e.kind == EntryKind::Merged && e.state == EntryState::Live)
                .map(|e| {
                    let compressed = e.flags & crate::core::format::catalog::flags::COMPRESSED != 0;
                    e.blocks.saturating_sub(if compressed {
                        e.original_bytes / meta.unit_bytes()
                    } else {
                        e.element_count
                    })
                })
                .sum(),
            history_compression_saved_bytes: meta
                .history_catalog
                .entries
                .iter()
                .filter(|e| super::compress::is_compressed_record(e))
                .map(|e| e.original_bytes.saturating_sub(e.stored_bytes))
                .sum(),
            history_dedup_saved_across_units: meta
                .history_catalog
                .entries
                .iter()
                .filter(|e| e.kind == EntryKind::Merged && e.state == EntryState::Live)
                .map(|e| e.shared_across)
                .sum(),
            history_retained_units: super::dedup::retained_units(&meta.history_catalog),
            sealed_waiting: meta.sealed.len(),
            journal_full_mode: if meta.open_bitmap.as_ref().is_some_and(|b| b.tracked > 0) {
                "bitmap-only"
            } else {
                "journaling"
            },
            bitmap_tracked_blocks: meta.open_bitmap.as_ref().map_or(0, |b| b.tracked),
            bitmap: meta.open_bitmap.as_ref().map(|b| b.counters.clone()),
            sort: shared.sort_progress.clone(),
            sort_error: shared.sort_error.clone(),
            retention: shared.options.retention.clone(),
            retention_error: shared.retention_error.clone(),
            failed: shared.failed.clone(),
            generations,
            restores: shared.restores.info(),
            host: shared.hot.counters.clone(),
            control: shared.control.clone(),
        }
    }

    /// Finishes in-flight work and flushes every device (standalone host and tests).
    pub fn close(mut self) -> Result<(), EngineError> {
        self.begin_close();
        let mut completions = Vec::new();
        loop {
            if let Poll::Ready(result) = self.poll_close(&mut completions) {
                return result;
            }
        }
    }

    /// Starts closing without blocking (SPDK: delete and hot-remove): the sort stops at its
    /// next batch boundary (resumed from its cursor at the next open), operations already
    /// submitted finish, then every device is flushed. Submit nothing more; drive it with
    /// [`poll_close`](Self::poll_close).
    pub fn begin_close(&mut self) {
        assert!(self.handover.is_none(), "a volume closes on its channels: adopt them first");
        if self.closing.is_none() {
            self.shared.borrow_mut().stopping = true;
            self.closing = Some(Closing::Draining);
        }
    }

    /// Advances a close begun with [`begin_close`](Self::begin_close); host completions that
    /// arrive meanwhile go to `completions`. Ready once every device is flushed; the volume
    /// may then be dropped (nothing of it is in flight on any device).
    pub fn poll_close(&mut self, completions: &mut Vec<HostCompletion>) -> Poll<Result<(), EngineError>> {
        self.begin_close();
        loop {
            match self.closing.as_mut().expect("closing was begun") {
                Closing::Draining => {
                    self.poll(completions);
                    let drained = {
                        let shared = self.shared.borrow();
                        shared.hot.outstanding() == 0 && !shared.hot.commit_in_flight()
                    } && self.executor.is_empty();
                    if !drained {
                        return Poll::Pending;
                    }
                    let io = self.control_io();
                    self.closing = Some(Closing::Flushing(Box::pin(async move {
                        let flushes: Vec<_> = Role::ALL.into_iter().map(|role| io.flush(role)).collect();
                        let mut first_error = None;
                        for flush in flushes {
                            if let Err(error) = flush.await {
                                first_error.get_or_insert(error);
                            }
                        }
                        first_error.map_or(Ok(()), Err)
                    })));
                }
                Closing::Flushing(future) => {
                    self.hub.borrow_mut().poll();
                    let mut context = Context::from_waker(Waker::noop());
                    match future.as_mut().poll(&mut context) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(result) => self.closing = Some(Closing::Done(result)),
                    }
                }
                Closing::Done(result) => return Poll::Ready(result.clone().map_err(EngineError::Io)),
            }
        }
    }
}

/// Every generation the volume knows, oldest first: history records (sorted or merged), the
/// backup's, the sealed ones waiting for the sort, and the open one.
pub(crate) fn generation_list(meta: &Meta) -> Vec<GenerationInfo> {
    let mut generations = Vec::new();
    for entry in &meta.history_catalog.entries {
        let state = match (entry.kind, entry.state) {
            (EntryKind::History, EntryState::Live) => "history",
            (EntryKind::Merged, EntryState::Live) => "merged",
            (EntryKind::Backup, _) => "backup",
            _ => continue,
        };
        // "All" mode: the version record of the generation's writes, if kept.
        let versions = meta
            .history_catalog
            .entries
            .iter()
            .find(|v| v.kind == EntryKind::Versions && v.state == EntryState::Live && v.generation == entry.generation)
            .map(|v| VersionRange {
                elements: v.element_count,
                first_sequence: v.first_sequence,
                last_sequence: v.last_sequence,
                first_time_ns: v.time_ns,
                last_time_ns: v.last_time_ns,
            });
        generations.push(GenerationInfo {
            generation: entry.generation,
            through_generation: entry.through_generation,
            state,
            time_ns: entry.time_ns,
            comment: entry.comment.clone(),
            blocks: entry.blocks,
            last_sequence: entry.last_sequence,
            versions,
            compressed: entry.flags & crate::core::format::catalog::flags::COMPRESSED != 0,
            stored_bytes: entry.stored_bytes,
            original_bytes: if entry.original_bytes > 0 { entry.original_bytes } else { entry.stored_bytes },
        });
    }
    // A generation the sort has committed (the history catalog names it the backup's) is no
    // longer sealed, though it stays in the journal's list until the journal catalog write
    // that frees it: listing it twice would count one marker twice.
    let backup = meta.history_catalog.backup_generation;
    for sealed in meta.sealed.iter().filter(|s| s.generation > backup) {
        generations.push(GenerationInfo {
            generation: sealed.generation,
            through_generation: sealed.generation,
            state: "sealed",
            time_ns: sealed.time_ns,
            comment: sealed.comment.clone(),
            blocks: sealed.block_count(),
            last_sequence: sealed.last_sequence,
            versions: VersionRange::of(&sealed.versions),
            compressed: false,
            stored_bytes: 0,
            original_bytes: 0,
        });
    }
    generations.push(GenerationInfo {
        generation: meta.open.generation,
        through_generation: meta.open.generation,
        state: "open",
        time_ns: meta.open.opened_ns,
        comment: String::new(),
        blocks: meta.open.entry_of.len() as u64,
        last_sequence: meta.open.versions.iter().map(|v| v.sequence).max().unwrap_or(0),
        versions: VersionRange::of(&meta.open.versions),
        compressed: false,
        stored_bytes: 0,
        original_bytes: 0,
    });
    generations.sort_by_key(|g| g.generation);
    generations
}

/// Serialises catalog writes per device: waits until no other task is writing it.
async fn lock_catalog(shared: &SharedRef, index: usize) {
    std::future::poll_fn(|_| {
        let mut s = shared.borrow_mut();
        if s.catalog_busy[index] {
            Poll::Pending
        } else {
            s.catalog_busy[index] = true;
            Poll::Ready(())
        }
    })
    .await
}

/// Writes the journal catalog describing the current state into the older slot (FUA).
pub(crate) async fn write_journal_catalog(shared: &SharedRef, io: &ControlIo<HostRef>) -> Result<(), EngineError> {
    lock_catalog(shared, 0).await;
    let (catalog, slot, offset) = {
        let mut s = shared.borrow_mut();
        // Sequences keep growing across restarts: the next open starts above this one.
        s.meta.next_sequence = s.meta.next_sequence.max(s.hot.next_seq);
        let mut catalog = s.meta.build_journal_catalog();
        catalog.sequence = s.meta.journal_catalog.sequence + 1;
        let slot = 1 - s.meta.journal_catalog_slot;
        (catalog, slot, s.meta.journal.catalogs[slot].start_bytes)
    };
    let result = io.write_bytes(Role::Journal, offset, &catalog.encode(), true).await;
    let mut s = shared.borrow_mut();
    s.catalog_busy[0] = false;
    result?;
    s.meta.journal_catalog = catalog;
    s.meta.journal_catalog_slot = slot;
    Ok(())
}

/// Changes the history catalog with `change` and writes it into the older slot (FUA). The
/// change is applied to the newest catalog while no other task writes it (the sort and merges
/// both change it), so no update is lost.
pub(crate) async fn update_history_catalog(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    change: impl FnOnce(&mut Catalog) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    lock_catalog(shared, 1).await;
    let prepared = {
        let s = shared.borrow();
        let mut catalog = s.meta.history_catalog.clone();
        change(&mut catalog).map(|()| {
            catalog.sequence = s.meta.history_catalog.sequence + 1;
            let slot = 1 - s.meta.history_catalog_slot;
            (catalog, slot, s.meta.history.catalogs[slot].start_bytes)
        })
    };
    let (catalog, slot, offset) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            shared.borrow_mut().catalog_busy[1] = false;
            return Err(error);
        }
    };
    if catalog.entries.len() > catalog.capacity_entries as usize {
        shared.borrow_mut().catalog_busy[1] = false;
        return Err(EngineError::HistoryCatalogFull {
            generation: catalog.backup_generation,
            capacity: catalog.capacity_entries,
        });
    }
    let result = io.write_bytes(Role::History, offset, &catalog.encode(), true).await;
    let mut s = shared.borrow_mut();
    s.catalog_busy[1] = false;
    result?;
    s.meta.history_catalog = catalog;
    s.meta.history_catalog_slot = slot;
    Ok(())
}

/// Microseconds since `start`.
pub(crate) fn elapsed_us(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}
