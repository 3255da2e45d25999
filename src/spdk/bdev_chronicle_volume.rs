//! A chronicle volume hosted inside SPDK: the engine's [`Volume`] on the app thread (the
//! volume's owner thread, ARCHITECTURE §4), over four bdevs through the SPDK device backend,
//! driven by a poller, exposed as the chronicle bdev once it is open.
//!
//! Lifecycle of a [`VolumeHost`], one explicit state per step:
//!
//! ```text
//! Inspecting ──► Formatting ──► Opening ──► Running ──► Closing ──► (removed)
//!     │  (blank devices)  │  (recovery)  │   (bdev registered)   ▲
//!     └──────────(chronicle devices)─────┘                       └─ delete RPC, hot-remove,
//!   any failure before Running: descriptors closed, claims released,  application stop
//!   nothing registered, the waiting RPC answered with the reason
//! ```
//!
//! Host I/O reaches the volume from any SPDK thread (directly on the app thread) and completes
//! on the thread that submitted it. Between threads it goes by [`Hop`]: one bounded queue each
//! way per (submitting thread, bdev), with a doorbell, so a burst of I/Os costs one message
//! each way (docs/SPDK.md, "Crossing threads"). When one such channel is the only one, the
//! volume moves to its thread instead ([`residence`]).

mod residence;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use slab::Slab;

use super::bdev::{
    bdev_claimed, bdev_exists, BdevDesc, BdevEvent, BdevIo, ClaimKind, DetachedIo, IoStatus, IoType, SharedDesc,
};
use super::bdev_chronicle::{Chronicle, ChronicleBdev, RestoreBdev, SuperblockRead, SuperblockState};
use super::bdev_module;
use super::device::SpdkDevice;
use super::doorbell::DoorbellQueue;
use super::poller::{PollStatus, Poller};
use super::thread::{Doorbell, RunningAs, SameReactor, Thread, ThreadHandle};
use super::{bdev_chronicle, vbdev, Errno};
use crate::core::format::superblock::{
    DeviceRole, Durability, JournalFullPolicy, JournalMode, Superblock, VOLUME_NAME_BYTES,
};
use crate::device::{Channel, Device, IoBuffers, Payload, SharedBuffers, Tag};
use crate::engine::{
    begin_format, CompressHandle, CompressReport, EngineError, FormatOptions, FormatProgress, Formatting,
    HostCompletion, HostRequest, MaintenanceError, MaintenanceHandle, MarkerHandle, MergeReport, Opening,
    RestoreHandle, RestoreId, RestoreInfo, RestoreTarget, RetentionPolicy, SortOptions, Status, Volume, VolumeOptions,
};
use residence::{Residence, Resident};

/// The four bdev roles, in the engine's device order.
const ROLES: [&str; 4] = ["base", "journal", "backup", "history"];

/// Host I/Os a [`Hop`]'s queue holds at most, each way. The bdev layer bounds the I/Os of a
/// channel well below this (its `bdev_io` pool: 64 Ki by default, for every bdev together); a
/// full queue answers `NoMem` (the bdev layer retries), a full reply queue keeps the rest of
/// the replies with the volume for its next poll.
const HOP_QUEUE_LIMIT: usize = 1 << 16;
/// Host I/Os gathered at most while a poll completes others ([`VolumeHost::gather`]); more
/// enter at once. A poll completes at most what was in flight, so this is far above any
/// queue depth a bdev layer hands over in one poll.
const GATHER_LIMIT: usize = 1 << 16;

/// examine: another module's examine (lvol's, for one) may hold a bdev for a moment; the claim
/// is retried this many times, [`CLAIM_RETRY_DELAY`] apart, before the volume is given up.
const CLAIM_RETRIES: u32 = 50;
const CLAIM_RETRY_DELAY: Duration = Duration::from_millis(100);

/// When a write is acknowledged (superblock `durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityName {
    /// On completion; durable after the next flush (a volatile write cache, like a disk's).
    Flush,
    /// Only once durable.
    WriteThrough,
}

/// What happens when the journal has no room for the open generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalFullName {
    /// Hold writes until the sort frees space (fail them if nothing can).
    Block,
    /// Fail writes with a no-space error.
    Fail,
    /// Like block; and when the history is full, give up its oldest generations so the sort
    /// keeps going (writes never stop for lack of history).
    MergeOldest,
    /// Writes the journal has no room for go to the base only, tracked by a durable bitmap
    /// until space frees (FIG 36); a marker waits until they are in the journal.
    BitmapOnly,
}

/// What the journal keeps of a block written again within a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalModeName {
    /// The newest write (its element is rewritten in place).
    Latest,
    /// Every write, with its sequence and time (restore at any point, seed 001 embodiment 4).
    All,
}

impl JournalModeName {
    fn of(mode: JournalMode) -> Self {
        match mode {
            JournalMode::Latest => JournalModeName::Latest,
            JournalMode::All => JournalModeName::All,
        }
    }
}

fn yes() -> bool {
    true
}

/// Parameters of `bdev_chronicle_create`, also what `save_config` writes to re-create it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Name of the chronicle bdev (recorded on the devices, at most 63 bytes).
    pub name: String,
    pub base_bdev: String,
    pub journal_bdev: String,
    pub backup_bdev: String,
    pub history_bdev: String,
    /// Bytes per journal element (default 4096 for a new volume; an existing volume keeps its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_write_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<DurabilityName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_full: Option<JournalFullName>,
    /// "latest" (default for a new volume) or "all"; recorded at format, an existing volume
    /// keeps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_mode: Option<JournalModeName>,
    /// Refuse writes that are not whole host-write-size units (SPDK splits at unit
    /// boundaries) instead of widening them by read-modify-write. Recorded at format (default
    /// false); an existing volume keeps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
    /// On format: copy the base to the backup (generation 0 = the base as it is). Turn off
    /// only for bases known to be zero, like new files or malloc bdevs.
    #[serde(default = "yes")]
    pub copy_base_to_backup: bool,
    /// Sort sealed generations into the backup in the background.
    #[serde(default = "yes")]
    pub automatic_sort: bool,
    /// Move the volume to the thread of its only channel when that channel is on another
    /// reactor or outside any (fio's plugin): its writes then cross no thread (docs/SPDK.md,
    /// "A volume moves to its submitter").
    #[serde(default = "yes")]
    pub follow_submitter: bool,
    /// Limit on sort bandwidth, bytes per second read from the journal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort_rate_limit_bytes_per_second: Option<u64>,
    /// Which history records are kept, merged or dropped (`bdev_chronicle_set_retention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionPolicy>,
    /// Bytes of rewritten elements whose checksum waits for the marker (default 256 MiB; 0
    /// checksums every write at once): bounds what a marker reads back while it holds writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker_read_back_bytes: Option<u64>,
}

impl VolumeConfig {
    pub fn bdev_names(&self) -> [&str; 4] {
        [&self.base_bdev, &self.journal_bdev, &self.backup_bdev, &self.history_bdev]
    }

    fn volume_options(&self) -> VolumeOptions {
        VolumeOptions {
            strict: self.strict.unwrap_or(false),
            sort: SortOptions {
                automatic: self.automatic_sort,
                rate_limit_bytes_per_second: self.sort_rate_limit_bytes_per_second,
                ..SortOptions::default()
            },
            retention: self.retention.clone().unwrap_or_default(),
            marker_read_back_bytes: self
                .marker_read_back_bytes
                .unwrap_or(VolumeOptions::default().marker_read_back_bytes),
            ..VolumeOptions::default()
        }
    }
}

/// Whether create may format blank devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// `bdev_chronicle_create`: format blank devices, open chronicle ones.
    FormatOrOpen,
    /// examine: only open devices that already hold the volume.
    OpenOnly,
}

/// Why a volume could not be created; each maps to a JSON-RPC error (`-errno`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error("a bdev named {0} already exists")]
    Exists(String),
    #[error("the {role} bdev {name} does not exist")]
    Missing { role: &'static str, name: String },
    #[error("the {role} bdev {name} is already claimed by another module or volume (see claimed and claim_type in bdev_get_bdevs)")]
    Claimed { role: &'static str, name: String },
    #[error("cannot open the {role} bdev {name}: {errno}")]
    Open { role: &'static str, name: String, errno: Errno },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Engine(String),
    #[error("the {0} was removed while the volume was being created")]
    Removed(String),
    #[error("cannot register the chronicle bdev: {0}")]
    Register(Errno),
}

impl CreateError {
    pub fn errno(&self) -> Errno {
        match self {
            CreateError::Invalid(_) | CreateError::Refused(_) => Errno::EINVAL,
            CreateError::Exists(_) => Errno(libc::EEXIST),
            CreateError::Missing { .. } | CreateError::Removed(_) => Errno::ENODEV,
            CreateError::Claimed { .. } => Errno(libc::EBUSY),
            CreateError::Open { errno, .. } | CreateError::Register(errno) => *errno,
            CreateError::Engine(_) => Errno(libc::EIO),
        }
    }
}

fn engine_error(error: &EngineError) -> CreateError {
    match error {
        EngineError::Io(_) | EngineError::Failed(_) => CreateError::Engine(error.to_string()),
        _ => CreateError::Refused(error.to_string()),
    }
}

/// Why a request about an existing volume failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VolumeError {
    #[error("no chronicle volume named {0}")]
    NotFound(String),
    #[error("chronicle volume {name} is {state}; try again when it is running")]
    Busy { name: String, state: &'static str },
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoSpace(String),
    /// Too much is waiting already (markers, rollbacks): retry later.
    #[error("{0}")]
    TryLater(String),
}

impl From<MaintenanceError> for VolumeError {
    fn from(error: MaintenanceError) -> Self {
        match error {
            MaintenanceError::Invalid(message) => VolumeError::Invalid(message),
            MaintenanceError::NoSpace(message) => VolumeError::NoSpace(message),
            MaintenanceError::Busy(message) => VolumeError::TryLater(message),
            MaintenanceError::Failed(message) => VolumeError::Failed(message),
        }
    }
}

impl VolumeError {
    pub fn errno(&self) -> Errno {
        match self {
            VolumeError::Invalid(_) => Errno::EINVAL,
            VolumeError::NoSpace(_) => Errno(libc::ENOSPC),
            VolumeError::NotFound(_) => Errno::ENODEV,
            VolumeError::Busy { .. } | VolumeError::TryLater(_) => Errno(libc::EBUSY),
            VolumeError::Failed(_) => Errno(libc::EIO),
        }
    }
}

type Waiter = Box<dyn FnOnce(Result<String, CreateError>)>;

/// A create waiting for the volume to open: what it asked for (`None` for examine, which
/// asks for nothing) and where its answer goes.
struct CreateWaiter {
    asked: Option<VolumeConfig>,
    done: Waiter,
}
/// Hands every finished request of `pending` to its waiter; whether any finished. The
/// requests are taken out first: a waiter may queue a new request.
fn finish_ready<H, T, E>(
    pending: &RefCell<Vec<(H, RequestWaiter<T>)>>,
    result: impl Fn(&H) -> Option<Result<T, E>>,
) -> bool
where
    VolumeError: From<E>,
{
    let ready: Vec<_> = {
        let mut pending = pending.borrow_mut();
        let (ready, waiting) = pending.drain(..).partition(|(handle, _)| result(handle).is_some());
        *pending = waiting;
        ready
    };
    let any = !ready.is_empty();
    for (handle, waiter) in ready {
        waiter(result(&handle).expect("partitioned on Some").map_err(VolumeError::from));
    }
    any
}

/// Called once with the outcome of a marker, maintenance or compression request.
type RequestWaiter<T> = Box<dyn FnOnce(Result<T, VolumeError>)>;
type MarkerWaiter = RequestWaiter<u64>;
type MaintenanceWaiter = RequestWaiter<MergeReport>;
type CompressWaiter = RequestWaiter<CompressReport>;
type RestoreWaiter = RequestWaiter<String>;

/// An R-VOL being opened for `bdev_chronicle_restore`: the bdev it becomes.
struct RestoreOpen {
    handle: RestoreHandle,
    bdev_name: String,
    target: RestoreTarget,
    done: RestoreWaiter,
}

/// An R-VOL bdev of a volume.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreBdevInfo {
    pub bdev_name: String,
    pub id: RestoreId,
    /// The generation whose image it shows (for a sequence or time target: the image under
    /// the versions it shows on top).
    pub generation: u64,
    /// "All" mode: the sequence it shows the image right after (a time target's resolved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
}
type IoCtx = <Chronicle as bdev_module::BdevModule>::IoCtx;

enum HostState {
    /// Reading the journal's and history's superblocks to decide between format and open.
    Inspecting,
    Formatting(Formatting),
    Opening(Opening),
    Running(Volume),
    Closing(Volume),
    /// Torn down; the host is about to leave the registry.
    Gone,
}

impl HostState {
    fn name(&self) -> &'static str {
        match self {
            HostState::Inspecting => "inspecting",
            HostState::Formatting(_) => "formatting",
            HostState::Opening(_) => "opening",
            HostState::Running(_) => "running",
            HostState::Closing(_) => "closing",
            HostState::Gone => "gone",
        }
    }
}

/// A host I/O waiting for the volume: where to complete it.
enum PendingIo {
    /// Submitted on the app thread: completed in place.
    Local(BdevIo<IoCtx>),
    /// Submitted on another thread: completed there, through the hop (the volume's slot of
    /// it) it came by.
    Remote(DetachedIo<IoCtx>, usize),
    /// Submitted on another thread that the app thread's reactor runs too: completed as that
    /// thread, in place ([`Way::Direct`]).
    Direct(BdevIo<IoCtx>, SameReactor),
}

/// Counters of the module's I/O path (the engine counts the rest).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostCounters {
    pub local_submissions: u64,
    /// Host I/Os taken in place on the thread the volume moved to ([`residence`]).
    pub resident_submissions: u64,
    /// Moves of the volume to its only channel's thread, and back home.
    pub moves: u64,
    pub returns: u64,
    /// Host I/Os from other threads on the app thread's reactor, taken in place (no message).
    pub direct_submissions: u64,
    /// Host I/Os taken in place (of the three kinds above) that their submitter sent from the
    /// completion callback of an earlier one: gathered while a poll completes I/Os and entered
    /// after it in one batch.
    pub gathered_submissions: u64,
    /// Host I/Os that came from other threads, and the doorbell messages that brought them
    /// (I/Os per batch = remote_submissions / remote_batches).
    pub remote_submissions: u64,
    pub remote_batches: u64,
    /// Messages that carried completions home to other threads.
    pub reply_batches: u64,
    /// Doorbells home that SPDK's message pool refused, rung again from the next poll.
    pub reply_retries: u64,
    pub completed_with_error: u64,
}

/// The way between one submitting thread's channel and a volume (its chronicle bdev, or one
/// R-VOL): host I/Os queue towards the volume's thread and their completions back, one
/// doorbell message per batch each way. Created with the channel on the submitting thread;
/// the volume adopts it at its first arrival.
pub(crate) struct Hop {
    volume: u64,
    restore: Option<RestoreId>,
    owner: ThreadHandle,
    home: ThreadHandle,
    /// Detached I/Os with their requests; pushed only by the channel's thread, taken only on
    /// the volume's. The request travels beside the I/O, not in its driver context: the
    /// volume's thread reads the queue in order and never touches the `bdev_io` itself.
    to_volume: DoorbellQueue<(DetachedIo<IoCtx>, HostRequest)>,
    /// Detached I/Os with their status (and a write's emptied buffer list, for reuse at
    /// home); pushed on the volume's thread, taken on the channel's.
    to_home: DoorbellQueue<Reply>,
    /// The hop's slot in its volume's table, `usize::MAX` until adopted; read and written only
    /// on the volume's thread (a hop leads to one volume).
    slot: AtomicUsize,
    /// The volume while it lives on this hop's home thread ([`residence`]).
    resident: Resident,
}

/// Where a channel's host I/Os go ([`Way`]).
pub(crate) struct HostPath {
    restore: Option<RestoreId>,
    way: Way,
    /// The volume's count of open channels (this one included until it drops).
    channels: Arc<AtomicUsize>,
}

impl Drop for HostPath {
    fn drop(&mut self) {
        self.channels.fetch_sub(1, Ordering::AcqRel);
        if let Way::Hop(hop) = &self.way {
            hop.channel_closed();
        }
    }
}

/// The volume of a channel on the app thread's reactor, kept weakly: found in the registry
/// once, at channel creation, instead of per I/O (a thread-local hash lookup measured 1 % of a
/// write), and again after the volume came home from another thread ([`residence`]).
struct Nearby {
    volume: u64,
    host: RefCell<Weak<VolumeHost>>,
}

impl Nearby {
    /// A host I/O of a channel on the app thread's reactor: into the volume at home, or parked
    /// until it comes back ([`residence::park_io`]).
    fn submit(&self, io: BdevIo<IoCtx>, restore: Option<RestoreId>, entry: Entry) {
        match self.host() {
            Some(host) => submit_in_place(&host, io, restore, entry),
            None => residence::park_io(self.volume, io, restore, entry),
        }
    }

    fn host(&self) -> Option<Rc<VolumeHost>> {
        if let Some(host) = self.host.borrow().upgrade() {
            return Some(host);
        }
        let host = host_by_id(self.volume)?;
        *self.host.borrow_mut() = Rc::downgrade(&host);
        Some(host)
    }
}

/// How a channel's host I/Os reach the volume.
///
/// The two ways without a hop keep the volume itself, weakly ([`Nearby`]). An I/O to a volume
/// that is going away fails as before: it is no longer found, or no longer running; one to a
/// volume away on another thread waits for it to come home.
enum Way {
    /// The channel is on the volume's thread: straight to it.
    Local(Nearby),
    /// The channel's thread and the volume's share one reactor for good: straight to the
    /// volume too, run as the volume's thread, and completed in place run as the channel's
    /// (bdevperf's jobs and nvmf's poll group on the app thread's core). No message each way,
    /// no queue: on one core a hop only costs (BENCHMARKS, session "direct entry").
    Direct(SameReactor, Nearby),
    /// Any other thread: by the channel's [`Hop`], a batch per message each way.
    Hop(Arc<Hop>),
}

impl HostPath {
    /// The path of a channel created on the calling thread to volume `volume` (or its R-VOL
    /// `restore`), whose home is `owner`; `channels` counts the volume's open channels.
    pub(crate) fn new(
        volume: u64,
        restore: Option<RestoreId>,
        owner: ThreadHandle,
        channels: Arc<AtomicUsize>,
    ) -> Result<Self, Errno> {
        let home = Thread::current().ok_or(Errno::EPERM)?.handle();
        // The registry is the app thread's (a thread-local of its OS thread), which runs the
        // channel's thread too on the first two ways.
        let host =
            || Nearby { volume, host: RefCell::new(host_by_id(volume).as_ref().map_or_else(Weak::new, Rc::downgrade)) };
        let way = if home == owner {
            Way::Local(host())
        } else if let Some(reactor) = SameReactor::with(owner) {
            Way::Direct(reactor, host())
        } else {
            Way::Hop(Arc::new(Hop {
                volume,
                restore,
                owner,
                home,
                to_volume: DoorbellQueue::new(HOP_QUEUE_LIMIT),
                to_home: DoorbellQueue::new(HOP_QUEUE_LIMIT),
                slot: AtomicUsize::new(usize::MAX),
                resident: Resident::new(),
            }))
        };
        channels.fetch_add(1, Ordering::AcqRel);
        Ok(HostPath { restore, way, channels })
    }
}

/// A finished I/O on its way home: its status, and a write's buffer list emptied for reuse
/// there ([`shared_host_buffers`]).
type Reply = (DetachedIo<IoCtx>, IoStatus, Option<SharedBuffers>);

/// Most emptied buffer lists a thread keeps for reuse (a channel holds far fewer writes).
const SPARE_LISTS_LIMIT: usize = 4096;

thread_local! {
    /// This thread's emptied host buffer lists, for its next writes.
    static SPARE_LISTS: RefCell<Vec<SharedBuffers>> = const { RefCell::new(Vec::new()) };
}

/// `buffers` as the shared list a write's journal and base operations both hold: in a list a
/// finished write of this thread gave back when there is one, so steady writing allocates (and
/// frees) nothing for it.
fn shared_host_buffers(buffers: IoBuffers) -> SharedBuffers {
    reuse(SPARE_LISTS.with(|spares| spares.borrow_mut().pop()), buffers)
}

/// `buffers` in `spare` (an emptied list) when there is one, else in a new list.
fn reuse(spare: Option<SharedBuffers>, buffers: IoBuffers) -> SharedBuffers {
    match spare {
        Some(spare) => {
            debug_assert!(spare.is_empty());
            // SAFETY: a spare is the only reference to its list: `emptied` saw it alone, on the
            // volume's thread, before it came here (on this OS thread, or through a hop's queue:
            // a mutex, so the volume's writes happen before), and nothing cloned it since. As
            // `Arc::get_mut`, without its atomic compare-and-swap (a locked instruction per
            // write, measured).
            unsafe { *Arc::as_ptr(&spare).cast_mut() = buffers };
            spare
        }
        None => Arc::new(buffers),
    }
}

/// Empties a finished write's buffer list: the host's memory is let go here, before the I/O
/// completes (`BdevIo::host_buffers`). The list itself is kept for reuse unless the engine
/// still held it (it never does: debug builds check).
fn emptied(shared: SharedBuffers) -> Option<SharedBuffers> {
    debug_assert_eq!(Arc::strong_count(&shared), 1, "the engine kept a host buffer");
    // Plain loads, where Arc::get_mut takes a locked compare-and-swap: the engine's clones of
    // the list were all made and dropped on this thread, and no Weak is ever made of it.
    if Arc::strong_count(&shared) != 1 || Arc::weak_count(&shared) != 0 {
        return None;
    }
    // SAFETY: the only reference (checked above: no other strong or weak one exists, and none
    // can be made without this one), so nothing else reads or writes the list meanwhile.
    unsafe { *Arc::as_ptr(&shared).cast_mut() = IoBuffers::new() };
    Some(shared)
}

/// Keeps an emptied list for this thread's next writes.
fn keep_spare(spare: Option<SharedBuffers>) {
    if let Some(spare) = spare {
        SPARE_LISTS.with(|spares| keep_in(&mut spares.borrow_mut(), spare));
    }
}

/// Keeps `spare` in `spares` unless they are at [`SPARE_LISTS_LIMIT`].
fn keep_in(spares: &mut Vec<SharedBuffers>, spare: SharedBuffers) {
    if spares.len() < SPARE_LISTS_LIMIT {
        spares.push(spare);
    }
}

/// A gap between two polls of a volume that counts as its host sleeping.
const SLEEP_GAP: Duration = Duration::from_micros(20);
/// Gaps before the polling thread's timer slack is shortened.
const SLEEP_GAPS: u32 = 64;
/// The timer slack a sleeping host's polling thread gets (Linux's default is 50 µs; 1 µs
/// measured as good as 1 ns on fio's plugin, 10 µs clearly worse: BENCHMARKS, session
/// "direct entry").
const TIMER_SLACK: Duration = Duration::from_micros(1);

/// What [`VolumeHost::watch_for_sleep`] keeps between polls.
struct SleepWatch {
    /// [`SLEEP_GAP`] in ticks.
    long: u64,
    /// The previous poll's reading (SPDK's ticks).
    last: u64,
    /// Long gaps counted in this window, and the thread's voluntary context switches when the
    /// window's first one was seen.
    gaps: u32,
    switches_at_first: u64,
    /// The host was seen sleeping: nothing more to watch.
    done: bool,
}

impl SleepWatch {
    fn new(long: u64) -> Self {
        SleepWatch { long, last: 0, gaps: 0, switches_at_first: 0, done: false }
    }

    /// One poll, read at `now` (ticks: when the thread's previous poll ended); a gap of
    /// [`SLEEP_GAP`] or more since the previous reading counts when other threads' I/Os wait
    /// (`waiting`). `switches` reads the polling OS thread's voluntary context switches, called
    /// only at the first and the last counted gap of a window. True once: when a window of
    /// [`SLEEP_GAPS`] counted gaps also saw the thread block at least half as many times. A
    /// reactor busy with other SPDK threads makes long gaps too, but never blocks in them.
    fn poll(&mut self, now: u64, waiting: bool, switches: impl FnOnce() -> u64) -> bool {
        let gap = now.saturating_sub(self.last);
        self.last = now;
        if self.done || !waiting || gap < self.long {
            return false;
        }
        self.gaps += 1;
        if self.gaps == 1 {
            self.switches_at_first = switches();
            return false;
        }
        if self.gaps < SLEEP_GAPS {
            return false;
        }
        self.gaps = 0;
        self.done = switches().saturating_sub(self.switches_at_first) >= u64::from(SLEEP_GAPS / 2);
        self.done
    }
}

/// The volume's side of a hop.
struct HopEntry {
    hop: Arc<Hop>,
    /// Completions gathered during one poll, sent home together.
    outbox: Vec<Reply>,
    /// I/Os of this hop the volume holds (pending or in the outbox).
    held: usize,
    /// The slot is in `VolumeHost::replies_due`.
    due: bool,
}

impl HopEntry {
    /// Its channel is gone (only this table holds the hop: no message carries it either) and
    /// nothing of it is left anywhere.
    fn finished(&self) -> bool {
        Arc::strong_count(&self.hop) == 1
            && self.held == 0
            && !self.due
            && self.hop.to_volume.is_empty()
            && self.hop.to_home.is_empty()
    }
}

/// One volume and everything it holds in SPDK.
pub(crate) struct VolumeHost {
    id: u64,
    config: RefCell<VolumeConfig>,
    state: RefCell<HostState>,
    /// Open descriptors of the four bdevs (claimed), in role order, once opened.
    descs: RefCell<Vec<Rc<BdevDesc>>>,
    poller: RefCell<Option<Poller>>,
    pending: RefCell<Slab<PendingIo>>,
    /// The hops of the channels on other threads that sent I/O here (pruned of finished ones
    /// when a new one arrives: bounded by the live channels).
    hops: RefCell<Slab<HopEntry>>,
    /// Slots of `hops` with replies to send home (or a doorbell to ring again).
    replies_due: RefCell<Vec<usize>>,
    /// The batch buffer arrivals are taken into (reused: no allocation per batch).
    arrivals: RefCell<VecDeque<(DetachedIo<IoCtx>, HostRequest)>>,
    completions: RefCell<Vec<HostCompletion>>,
    /// Set while a poll completes host I/Os: what their submitters send again from the
    /// completion callbacks gathers in `gathered` and enters after the last completion
    /// ([`VolumeHost::submit_gathered`]).
    gathering: Cell<bool>,
    gathered: RefCell<Vec<(PendingIo, HostRequest, Option<RestoreId>)>>,
    /// Emptied buffer lists of finished writes, for the next writes of the channels without a
    /// hop (those of hops go home with their replies, to the submitting thread's spares).
    spare_lists: RefCell<Vec<SharedBuffers>>,
    /// Host I/Os of other threads' hops the volume holds (pending or in an outbox).
    remote_held: Cell<usize>,
    /// Watches for a host that sleeps between polls while I/O waits ([`SleepWatch`]).
    sleep_watch: RefCell<SleepWatch>,
    waiters: RefCell<Vec<CreateWaiter>>,
    /// Claim attempts left (examine retries while another module's examine holds a bdev).
    claim_retries: Cell<u32>,
    /// The sort error last logged, so each one is logged once.
    reported_sort_error: RefCell<Option<String>>,
    markers: RefCell<Vec<(MarkerHandle, MarkerWaiter)>>,
    maintenance: RefCell<Vec<(MaintenanceHandle, MaintenanceWaiter)>>,
    /// Compressions and decompressions of history records waiting for their answer.
    compressions: RefCell<Vec<(CompressHandle, CompressWaiter)>>,
    restore_opens: RefCell<Vec<RestoreOpen>>,
    /// R-VOL bdevs of this volume, by bdev name.
    restores: RefCell<std::collections::BTreeMap<String, RestoreBdevInfo>>,
    destruct: RefCell<Option<vbdev::DestructDone>>,
    /// The chronicle bdev is registered with SPDK.
    registered: Cell<bool>,
    /// A bdev below was hot-removed (its role), while the volume was being created.
    removed: RefCell<Option<String>>,
    uuid: Cell<Option<[u8; 16]>>,
    counters: RefCell<HostCounters>,
    /// Rollbacks not finished; the chronicle bdev sends reads here while there is one.
    rollbacks: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Open channels of the chronicle bdev and its R-VOLs, on any thread.
    channels: Arc<AtomicUsize>,
    /// Where the volume lives and whether it is moving ([`residence`]).
    residence: RefCell<Residence>,
}

/// The volumes at home, by name and id, and what is kept of those away ([`residence`]).
#[derive(Default)]
struct Registry {
    by_name: BTreeMap<String, Rc<VolumeHost>>,
    by_id: FxHashMap<u64, Rc<VolumeHost>>,
    away: FxHashMap<u64, residence::Away>,
    next_id: u64,
}

thread_local! {
    /// The volumes, on the app thread (their owner); other threads reach them by message.
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry { next_id: 1, ..Default::default() });
}

fn host_by_id(id: u64) -> Option<Rc<VolumeHost>> {
    REGISTRY.with(|registry| registry.borrow().by_id.get(&id).cloned())
}

fn host_by_name(name: &str) -> Option<Rc<VolumeHost>> {
    REGISTRY.with(|registry| registry.borrow().by_name.get(name).cloned())
}

fn unregister_host(host: &VolumeHost) {
    REGISTRY.with(|registry| {
        let mut registry = registry.borrow_mut();
        registry.by_id.remove(&host.id);
        let name = host.config.borrow().name.clone();
        if registry.by_name.get(&name).is_some_and(|h| h.id == host.id) {
            registry.by_name.remove(&name);
        }
    });
}

/// Drops every volume left (application stop after every bdev is gone: only failed leftovers).
pub(crate) fn clear() {
    let hosts: Vec<Rc<VolumeHost>> =
        REGISTRY.with(|registry| registry.borrow_mut().by_id.drain().map(|(_, host)| host).collect());
    REGISTRY.with(|registry| registry.borrow_mut().by_name.clear());
    for host in hosts {
        host.teardown();
    }
    for parked in REGISTRY.with(|registry| residence::clear_away(&mut registry.borrow_mut())) {
        parked(None);
    }
}

fn check_config(config: &VolumeConfig) -> Result<(), CreateError> {
    let name = &config.name;
    if name.is_empty() || name.len() >= VOLUME_NAME_BYTES || name.contains('\0') {
        return Err(CreateError::Invalid(format!(
            "name {name:?} must be 1 to {} bytes without NUL (it is recorded on the devices)",
            VOLUME_NAME_BYTES - 1
        )));
    }
    if let Some(retention) = &config.retention {
        retention.validate().map_err(|why| CreateError::Invalid(format!("retention: {why}")))?;
    }
    if let Some(size) = config.host_write_size {
        if !size.is_power_of_two() || !(512..=1 << 20).contains(&size) {
            return Err(CreateError::Invalid(format!(
                "host_write_size {size} is not a power of two from 512 to 1048576 bytes"
            )));
        }
    }
    let names = config.bdev_names();
    for (i, a) in names.iter().enumerate() {
        if a.is_empty() {
            return Err(CreateError::Invalid(format!("{}_bdev is empty", ROLES[i])));
        }
        if *a == name.as_str() {
            return Err(CreateError::Invalid(format!("the {} bdev cannot be the volume itself ({name})", ROLES[i])));
        }
        for (j, b) in names.iter().enumerate().skip(i + 1) {
            if a == b {
                return Err(CreateError::Invalid(format!(
                    "bdev {a} is given as both the {} and the {} device; every role needs its own bdev",
                    ROLES[i], ROLES[j]
                )));
            }
        }
    }
    Ok(())
}

/// Creates (formats or opens) the volume of `config`; `done` runs on the app thread with the
/// bdev's name once it is registered, or with why nothing was created. A second create of
/// the same volume (same name and bdevs, e.g. `load_config` after examine found it) waits for
/// the first and succeeds with it.
pub fn create(config: VolumeConfig, mode: CreateMode, done: Waiter) {
    if let Err(error) = check_config(&config) {
        return done(Err(error));
    }
    if REGISTRY.with(|registry| registry.borrow().away_id(&config.name).is_some()) {
        // Decided at home, like every other request.
        let name = config.name.clone();
        return residence::with_named(&name, move |_| create(config, mode, done));
    }
    if let Some(existing) = host_by_name(&config.name) {
        let same = existing.config.borrow().bdev_names() == config.bdev_names();
        if !same {
            return done(Err(CreateError::Exists(config.name.clone())));
        }
        let asked = (mode == CreateMode::FormatOrOpen).then_some(config);
        let state = existing.state.borrow().name();
        return match state {
            "running" => {
                let name = existing.config.borrow().name.clone();
                done(asked.map_or(Ok(()), |asked| existing.reconcile(&asked)).map(|()| name))
            }
            "inspecting" | "formatting" | "opening" => existing.waiters.borrow_mut().push(CreateWaiter { asked, done }),
            _ => done(Err(CreateError::Exists(existing.config.borrow().name.clone()))),
        };
    }
    if bdev_exists(&config.name) {
        return done(Err(CreateError::Exists(config.name.clone())));
    }
    for (role, name) in ROLES.iter().zip(config.bdev_names()) {
        match bdev_claimed(name) {
            None => return done(Err(CreateError::Missing { role, name: name.to_string() })),
            // Checked before anything is read: a device in use (by another volume, or another
            // module) is busy, whatever it holds. examine retries (another examine may hold it).
            Some(true) if mode == CreateMode::FormatOrOpen => {
                return done(Err(CreateError::Claimed { role, name: name.to_string() }))
            }
            Some(_) => {}
        }
    }
    let host = REGISTRY.with(|registry| {
        let mut registry = registry.borrow_mut();
        let id = registry.next_id;
        registry.next_id += 1;
        let host = Rc::new(VolumeHost {
            id,
            config: RefCell::new(config.clone()),
            state: RefCell::new(HostState::Inspecting),
            descs: RefCell::new(Vec::new()),
            poller: RefCell::new(None),
            pending: RefCell::new(Slab::new()),
            hops: RefCell::new(Slab::new()),
            replies_due: RefCell::new(Vec::new()),
            arrivals: RefCell::new(VecDeque::new()),
            completions: RefCell::new(Vec::with_capacity(256)),
            gathering: Cell::new(false),
            gathered: RefCell::new(Vec::with_capacity(256)),
            spare_lists: RefCell::new(Vec::new()),
            remote_held: Cell::new(0),
            sleep_watch: RefCell::new(SleepWatch::new(super::thread::ticks_in(SLEEP_GAP))),
            waiters: RefCell::new(vec![CreateWaiter { asked: None, done }]),
            claim_retries: Cell::new(if mode == CreateMode::OpenOnly { CLAIM_RETRIES } else { 0 }),
            reported_sort_error: RefCell::new(None),
            markers: RefCell::new(Vec::new()),
            maintenance: RefCell::new(Vec::new()),
            compressions: RefCell::new(Vec::new()),
            restore_opens: RefCell::new(Vec::new()),
            restores: RefCell::new(std::collections::BTreeMap::new()),
            destruct: RefCell::new(None),
            registered: Cell::new(false),
            removed: RefCell::new(None),
            uuid: Cell::new(None),
            counters: RefCell::new(HostCounters::default()),
            rollbacks: Default::default(),
            channels: Default::default(),
            residence: RefCell::new(Residence::Home { from: 0 }),
        });
        registry.by_name.insert(config.name.clone(), host.clone());
        registry.by_id.insert(id, host.clone());
        host
    });
    spdk_info!(bdev_chronicle::LOG, "chronicle: creating {} over {:?}", config.name, config.bdev_names());
    // The journal's and the history's superblocks decide between format and open.
    let journal = config.journal_bdev.clone();
    let history = config.history_bdev.clone();
    bdev_chronicle::read_superblocks(&journal, move |journal_read| {
        bdev_chronicle::read_superblocks(&history, move |history_read| {
            let decision = decide(&host.config.borrow(), mode, journal_read, history_read);
            match decision {
                Ok(format) => host.start(format),
                Err(error) => host.fail(error),
            }
        })
    });
}

/// The mode as the RPC spells it.
fn mode_name(mode: JournalModeName) -> &'static str {
    match mode {
        JournalModeName::Latest => "\"latest\"",
        JournalModeName::All => "\"all\"",
    }
}

/// Format (`true`) or open (`false`), from what the journal and the history hold.
fn decide(
    config: &VolumeConfig,
    mode: CreateMode,
    journal: Result<SuperblockRead, bdev_chronicle::InspectError>,
    history: Result<SuperblockRead, bdev_chronicle::InspectError>,
) -> Result<bool, CreateError> {
    let read_error = |role: &'static str, error: bdev_chronicle::InspectError| CreateError::Open {
        role,
        name: error.bdev_name().to_string(),
        errno: error.errno(),
    };
    let journal = journal.map_err(|e| read_error("journal", e))?;
    let history = history.map_err(|e| read_error("history", e))?;
    let chronicle = |read: &SuperblockRead, role: DeviceRole| -> Result<Option<Superblock>, CreateError> {
        match &read.state {
            SuperblockState::Blank | SuperblockState::TooSmall => Ok(None),
            SuperblockState::Chronicle(superblock) if superblock.role == role => Ok(Some(superblock.clone())),
            SuperblockState::Chronicle(superblock) => Err(CreateError::Refused(format!(
                "bdev {} holds the {:?} device of chronicle volume {} ({}), not a {role:?} device",
                read.bdev_name,
                superblock.role,
                display_name(superblock),
                uuid::Uuid::from_bytes(superblock.volume_uuid)
            ))),
            SuperblockState::Damaged(error) => Err(CreateError::Refused(format!(
                "bdev {} holds a damaged chronicle superblock ({error}); refusing to format over it \
                 (zero its first 8 KiB to reuse it)",
                read.bdev_name
            ))),
        }
    };
    let journal_superblock = chronicle(&journal, DeviceRole::Journal)?;
    let history_superblock = chronicle(&history, DeviceRole::History)?;
    match (journal_superblock, history_superblock) {
        (None, None) if mode == CreateMode::FormatOrOpen => Ok(true),
        (None, None) => Err(CreateError::Refused("the journal and history bdevs hold no chronicle volume".into())),
        (Some(j), Some(h)) if j.volume_uuid == h.volume_uuid => {
            if !j.volume_name.is_empty() && j.volume_name != config.name {
                return Err(CreateError::Refused(format!(
                    "the bdevs hold chronicle volume {} (the name recorded at format); create it as {} \
                     (a restarted application registers it under that name by itself)",
                    j.volume_name, j.volume_name
                )));
            }
            let journal_mode = JournalModeName::of(j.journal_mode);
            if config.journal_mode.is_some_and(|asked| asked != journal_mode) {
                return Err(CreateError::Refused(format!(
                    "volume {} was formatted with journal_mode {}, not {}",
                    display_name(&j),
                    mode_name(journal_mode),
                    mode_name(config.journal_mode.expect("checked"))
                )));
            }
            if config.strict.is_some_and(|strict| strict != j.strict) {
                return Err(CreateError::Refused(format!(
                    "volume {} was formatted with strict {}, not {}",
                    display_name(&j),
                    j.strict,
                    !j.strict
                )));
            }
            if let Some(size) = config.host_write_size {
                if size != j.host_write_size {
                    return Err(CreateError::Refused(format!(
                        "volume {} was formatted with host_write_size {}, not {size}",
                        display_name(&j),
                        j.host_write_size
                    )));
                }
            }
            let durability = match j.durability {
                Durability::Flush => DurabilityName::Flush,
                Durability::WriteThrough => DurabilityName::WriteThrough,
            };
            if config.durability.is_some_and(|asked| asked != durability) {
                return Err(CreateError::Refused(format!(
                    "volume {} was formatted with durability {durability:?}, not {:?}",
                    display_name(&j),
                    config.durability.expect("checked")
                )));
            }
            Ok(false)
        }
        (Some(j), Some(h)) => Err(CreateError::Refused(format!(
            "the journal {} belongs to volume {} and the history {} to volume {}: they are not one volume",
            journal.bdev_name,
            uuid::Uuid::from_bytes(j.volume_uuid),
            history.bdev_name,
            uuid::Uuid::from_bytes(h.volume_uuid)
        ))),
        (Some(j), None) => Err(CreateError::Refused(format!(
            "the journal {} holds chronicle volume {} but the history {} holds none (a replaced history, or \
             a create that failed after formatting); refusing to format over a volume's journal: give its \
             history, or zero the journal's first 8 KiB to start over",
            journal.bdev_name,
            display_name(&j),
            history.bdev_name
        ))),
        (None, Some(h)) => Err(CreateError::Refused(format!(
            "the history {} holds chronicle volume {} but the journal {} holds none; refusing to format \
             over a volume's history: give its journal, or zero the history's first 8 KiB to start over",
            history.bdev_name,
            display_name(&h),
            journal.bdev_name
        ))),
    }
}

fn display_name(superblock: &Superblock) -> String {
    if superblock.volume_name.is_empty() {
        format!("(unnamed) {}", uuid::Uuid::from_bytes(superblock.volume_uuid))
    } else {
        superblock.volume_name.clone()
    }
}

impl VolumeHost {
    /// Opens and claims the four bdevs and starts the format or the open.
    fn start(self: &Rc<Self>, format: bool) {
        let config = self.config.borrow().clone();
        let module = bdev_module::module::<Chronicle>().expect("the module is registered");
        let mut descs = Vec::with_capacity(4);
        for (role, name) in ROLES.iter().zip(config.bdev_names()) {
            let id = self.id;
            let role_name = *role;
            let desc = match BdevDesc::open(name, true, move |event, _bdev| {
                if event == BdevEvent::Remove {
                    on_remove(id, role_name);
                }
            }) {
                Ok(desc) => desc,
                Err(errno) if errno == Errno::ENODEV => {
                    return self.fail(CreateError::Missing { role, name: name.to_string() });
                }
                // SPDK refuses a writable descriptor of a bdev another module claimed.
                Err(errno) if errno == Errno::EPERM => return self.claim_failed(format, role, name),
                Err(errno) => return self.fail(CreateError::Open { role, name: name.to_string(), errno }),
            };
            if desc.claim(module, ClaimKind::ReadManyWriteOne).is_err() {
                return self.claim_failed(format, role, name);
            }
            descs.push(Rc::new(desc));
        }
        let mut channels: Vec<Box<dyn Channel>> = Vec::with_capacity(4);
        for (role, desc) in ROLES.iter().zip(&descs) {
            match SpdkDevice::new(desc.clone()).open_channel() {
                Ok(channel) => channels.push(channel),
                Err(error) => return self.fail(CreateError::Engine(format!("{role}: {error}"))),
            }
        }
        *self.descs.borrow_mut() = descs;
        let state = if format {
            let options = FormatOptions {
                host_write_size: config.host_write_size.unwrap_or(4096),
                durability: match config.durability.unwrap_or(DurabilityName::Flush) {
                    DurabilityName::Flush => Durability::Flush,
                    DurabilityName::WriteThrough => Durability::WriteThrough,
                },
                journal_full_policy: match config.journal_full.unwrap_or(JournalFullName::Block) {
                    JournalFullName::Block => JournalFullPolicy::Block,
                    JournalFullName::Fail => JournalFullPolicy::Fail,
                    JournalFullName::MergeOldest => JournalFullPolicy::MergeOldest,
                    JournalFullName::BitmapOnly => JournalFullPolicy::BitmapOnly,
                },
                journal_mode: match config.journal_mode.unwrap_or(JournalModeName::Latest) {
                    JournalModeName::Latest => JournalMode::Latest,
                    JournalModeName::All => JournalMode::All,
                },
                names: config.bdev_names().map(str::to_owned),
                volume_name: config.name.clone(),
                strict: config.strict.unwrap_or(false),
                copy_base_to_backup: config.copy_base_to_backup,
                ..FormatOptions::default()
            };
            spdk_notice!("chronicle: formatting {} (base {})", config.name, config.base_bdev);
            HostState::Formatting(begin_format(channels, options))
        } else {
            spdk_notice!("chronicle: opening {} (recovering from its journal)", config.name);
            HostState::Opening(Volume::begin_open(channels, config.volume_options()))
        };
        *self.state.borrow_mut() = state;
        let host = self.clone();
        match Poller::register(&format!("chronicle_{}", config.name), Duration::ZERO, move || host.poll()) {
            Ok(poller) => *self.poller.borrow_mut() = Some(poller),
            Err(errno) => self.fail(CreateError::Engine(format!("cannot register the volume's poller: {errno}"))),
        }
    }

    /// A bdev is claimed by someone else: fail, or (examine) try again a little later, since
    /// another module's examine may hold it for a moment.
    fn claim_failed(self: &Rc<Self>, format: bool, role: &'static str, name: &str) {
        let left = self.claim_retries.get();
        if left == 0 {
            return self.fail(CreateError::Claimed { role, name: name.to_string() });
        }
        self.claim_retries.set(left - 1);
        spdk_info!(bdev_chronicle::LOG, "chronicle: the {role} bdev {name} is claimed for now; trying again");
        // Nothing is kept open meanwhile: the descriptors opened so far close here.
        let host = self.clone();
        let retry = Rc::new(RefCell::new(None::<Poller>));
        let slot = retry.clone();
        let poller = Poller::register("chronicle_claim_retry", CLAIM_RETRY_DELAY, move || {
            slot.borrow_mut().take();
            host.start(format);
            PollStatus::Busy
        });
        match poller {
            Ok(poller) => *retry.borrow_mut() = Some(poller),
            Err(_) => self.fail(CreateError::Claimed { role, name: name.to_string() }),
        }
    }

    /// Ends a create that did not succeed: nothing stays open, claimed or registered.
    fn fail(self: &Rc<Self>, error: CreateError) {
        spdk_error!("chronicle: cannot create {}: {error}", self.config.borrow().name);
        self.teardown();
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for waiter in waiters {
            (waiter.done)(Err(error.clone()));
        }
    }

    /// Releases everything: poller, volume, channels, descriptors (claims), registry entry.
    fn teardown(&self) {
        let poller = self.poller.borrow_mut().take();
        let state = std::mem::replace(&mut *self.state.borrow_mut(), HostState::Gone);
        drop(state);
        self.descs.borrow_mut().clear();
        unregister_host(self);
        // I/Os still waiting (none after a close: defensive) fail where they were submitted.
        let pending: Vec<PendingIo> = self.pending.borrow_mut().drain().collect();
        for io in pending {
            self.complete(io, IoStatus::Failed, None);
        }
        // Completions go home now: no poll comes after this one.
        self.send_replies();
        self.send_replies_one_by_one();
        // Requests still waiting (none after a close: the engine finishes its tasks first)
        // are answered, never left hanging.
        let gone = || VolumeError::Failed(format!("chronicle volume {} closed", self.config.borrow().name));
        for (_, waiter) in self.markers.borrow_mut().drain(..).collect::<Vec<_>>() {
            waiter(Err(gone()));
        }
        for (_, waiter) in self.maintenance.borrow_mut().drain(..).collect::<Vec<_>>() {
            waiter(Err(gone()));
        }
        for (_, waiter) in self.compressions.borrow_mut().drain(..).collect::<Vec<_>>() {
            waiter(Err(gone()));
        }
        for open in self.restore_opens.borrow_mut().drain(..).collect::<Vec<_>>() {
            (open.done)(Err(gone()));
        }
        drop(poller);
    }

    /// One turn of the volume's poller.
    fn poll(self: &Rc<Self>) -> PollStatus {
        self.watch_for_sleep();
        let mut busy = false;
        let mut completions = std::mem::take(&mut *self.completions.borrow_mut());
        let event = {
            let mut state = self.state.borrow_mut();
            match &mut *state {
                HostState::Inspecting | HostState::Gone => None,
                HostState::Formatting(formatting) => match formatting.poll() {
                    Poll::Pending => None,
                    Poll::Ready((Ok(()), channels)) => {
                        busy = true;
                        let options = self.config.borrow().volume_options();
                        *state = HostState::Opening(Volume::begin_open(channels, options));
                        None
                    }
                    Poll::Ready((Err(error), _channels)) => Some(Event::CreateFailed(engine_error(&error))),
                },
                HostState::Opening(opening) => match opening.poll() {
                    Poll::Pending => None,
                    Poll::Ready(Ok(volume)) => {
                        *state = HostState::Running(volume);
                        Some(Event::Opened)
                    }
                    Poll::Ready(Err(error)) => Some(Event::CreateFailed(engine_error(&error))),
                },
                HostState::Running(volume) => {
                    busy |= volume.poll(&mut completions) > 0;
                    self.report_sort_error(volume);
                    None
                }
                HostState::Closing(volume) => match volume.poll_close(&mut completions) {
                    Poll::Pending => None,
                    Poll::Ready(result) => Some(Event::Closed(result)),
                },
            }
        };
        // Borrows are released: completing an I/O may submit the next one at once, which
        // gathers until the last completion is done.
        busy |= !completions.is_empty();
        self.gathering.set(true);
        let mut lane = Lane::default();
        for completion in completions.drain(..) {
            self.finish_io(completion, &mut lane);
        }
        drop(lane);
        self.gathering.set(false);
        *self.completions.borrow_mut() = completions;
        self.submit_gathered();
        busy |= self.finish_markers();
        busy |= self.finish_maintenance();
        busy |= self.finish_compressions();
        busy |= self.finish_restore_opens();
        // One message per thread for everything this turn completed.
        busy |= self.send_replies();
        busy |= self.advance_residence();
        match event {
            None => {}
            Some(Event::Opened) => self.opened(),
            Some(Event::CreateFailed(error)) => self.fail(error),
            Some(Event::Closed(result)) => self.closed(result),
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// Counts the polls that come [`SLEEP_GAP`] or more after the previous one while other
    /// threads' I/Os wait here, and whether the thread blocked meanwhile ([`SleepWatch`]). A
    /// reactor never blocks between polls; a host that sleeps between them (fio's plugin) gets
    /// its thread's timer slack shortened, which lets that thread's timed waits end on time.
    fn watch_for_sleep(&self) {
        let mut watch = self.sleep_watch.borrow_mut();
        if watch.done {
            return;
        }
        let waiting = self.remote_held.get() > 0;
        let switches = || super::thread::voluntary_switches().unwrap_or(0);
        if !watch.poll(super::thread::previous_poll_ended_ticks(), waiting, switches) {
            return;
        }
        drop(watch);
        let name = self.config.borrow().name.clone();
        match super::thread::shorten_timer_slack(TIMER_SLACK) {
            Ok(true) => spdk_notice!(
                "chronicle: {name}: the thread polling the volume sleeps between polls while I/O waits (a host \
                 whose loop waits with timeouts, such as fio's plugin); its timer slack is now {} us",
                TIMER_SLACK.as_micros()
            ),
            Ok(false) => {}
            Err(errno) => spdk_warn!("chronicle: {name}: cannot shorten the polling thread's timer slack: {errno}"),
        }
    }

    /// Logs a sort that stopped, once per error: writes fail with "journal full" later.
    fn report_sort_error(&self, volume: &Volume) {
        let error = volume.sort_error();
        let mut reported = self.reported_sort_error.borrow_mut();
        if error != *reported {
            if let Some(error) = &error {
                spdk_error!("chronicle: {}: the sort stopped: {error}", self.config.borrow().name);
            }
            *reported = error;
        }
    }

    /// Registers the chronicle bdev over the opened volume.
    fn opened(self: &Rc<Self>) {
        if let Some(role) = self.removed.borrow().clone() {
            return self.fail_after_open(CreateError::Removed(format!("{role} bdev")));
        }
        let (identity, base_block, alignment) = {
            let state = self.state.borrow();
            let HostState::Running(volume) = &*state else { unreachable!("opened in Running") };
            let descs = self.descs.borrow();
            let base = descs[0].bdev();
            let alignment = descs.iter().map(|d| d.bdev().buffer_alignment()).max().unwrap_or(1).max(1);
            (volume.identity(), base.block_size(), alignment)
        };
        self.uuid.set(Some(identity.volume_uuid));
        {
            // What the volume is, so that save_config replays exactly this volume.
            let mut config = self.config.borrow_mut();
            config.host_write_size = Some(identity.host_write_size);
            config.durability = Some(match identity.durability {
                Durability::Flush => DurabilityName::Flush,
                Durability::WriteThrough => DurabilityName::WriteThrough,
            });
            config.journal_full = Some(match identity.journal_full_policy {
                JournalFullPolicy::Fail => JournalFullName::Fail,
                JournalFullPolicy::MergeOldest => JournalFullName::MergeOldest,
                JournalFullPolicy::Block => JournalFullName::Block,
                JournalFullPolicy::BitmapOnly => JournalFullName::BitmapOnly,
            });
            config.journal_mode = Some(JournalModeName::of(identity.journal_mode));
            config.strict = Some(identity.strict);
        }
        // Creates that joined while the volume opened: each gets its own answer; their
        // run-time options (sorting) apply, the last one winning.
        let mut answers = Vec::new();
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for waiter in waiters {
            let checked = waiter.asked.as_ref().map_or(Ok(()), |asked| self.reconcile(asked));
            answers.push((waiter.done, checked));
        }
        let config = self.config.borrow();
        let properties = vbdev::BdevProperties {
            name: config.name.clone(),
            product_name: "chronicle".into(),
            block_size: base_block,
            num_blocks: identity.volume_bytes / u64::from(base_block),
            write_unit_blocks: identity.host_write_size / base_block,
            split_on_write_unit: identity.strict,
            buffer_alignment: alignment.next_power_of_two(),
            write_cache: identity.durability == Durability::Flush,
            uuid: Some(identity.volume_uuid),
        };
        let owner = Thread::current().expect("on the app thread").handle();
        // A second, read-only descriptor of the base serves reads on every thread; the claim
        // stays with the volume's descriptor. It closes when SPDK frees the bdev.
        let reader = BdevDesc::open(&config.base_bdev, false, |_, _| {});
        let base_name = config.base_bdev.clone();
        let name = config.name.clone();
        drop(config);
        let registered = match reader {
            Ok(desc) => {
                let data = ChronicleBdev::new(
                    self.id,
                    name.clone(),
                    owner,
                    SharedDesc::new(desc),
                    self.rollbacks.clone(),
                    self.channels.clone(),
                );
                vbdev::register(&properties, data).map_err(|(errno, _data)| CreateError::Register(errno))
            }
            Err(errno) => Err(CreateError::Open { role: "base", name: base_name, errno }),
        };
        match registered {
            Ok(()) => {
                self.registered.set(true);
                spdk_notice!(
                    "chronicle: {name} registered ({} bytes, host write size {}, {:?}{})",
                    identity.volume_bytes,
                    identity.host_write_size,
                    identity.durability,
                    if identity.strict { ", strict" } else { "" }
                );
                for (done, checked) in answers {
                    done(checked.map(|()| name.clone()));
                }
            }
            Err(error) => {
                self.fail_after_open(error.clone());
                for (done, _) in answers {
                    done(Err(error.clone()));
                }
            }
        }
    }

    /// A create of this (open) volume with `asked`: the options fixed at format must match
    /// what the volume is; the run-time ones (sorting) are taken over.
    fn reconcile(&self, asked: &VolumeConfig) -> Result<(), CreateError> {
        let mut config = self.config.borrow_mut();
        let name = config.name.clone();
        let mismatch = |what: &str, recorded: String, wanted: String| {
            CreateError::Refused(format!(
                "volume {name} has {what} {recorded}, not {wanted} (fixed when it was formatted)"
            ))
        };
        if let (Some(wanted), Some(recorded)) = (asked.host_write_size, config.host_write_size) {
            if wanted != recorded {
                return Err(mismatch("host_write_size", recorded.to_string(), wanted.to_string()));
            }
        }
        if let (Some(wanted), Some(recorded)) = (asked.durability, config.durability) {
            if wanted != recorded {
                return Err(mismatch("durability", format!("{recorded:?}"), format!("{wanted:?}")));
            }
        }
        if let (Some(wanted), Some(recorded)) = (asked.journal_full, config.journal_full) {
            if wanted != recorded {
                return Err(mismatch("journal_full", format!("{recorded:?}"), format!("{wanted:?}")));
            }
        }
        if let (Some(wanted), Some(recorded)) = (asked.journal_mode, config.journal_mode) {
            if wanted != recorded {
                return Err(mismatch("journal_mode", mode_name(recorded).into(), mode_name(wanted).into()));
            }
        }
        if let (Some(wanted), Some(recorded)) = (asked.strict, config.strict) {
            if wanted != recorded {
                return Err(mismatch("strict", recorded.to_string(), wanted.to_string()));
            }
        }
        config.automatic_sort = asked.automatic_sort;
        config.follow_submitter = asked.follow_submitter;
        config.sort_rate_limit_bytes_per_second = asked.sort_rate_limit_bytes_per_second;
        config.retention.clone_from(&asked.retention);
        config.marker_read_back_bytes = asked.marker_read_back_bytes;
        let (automatic, rate) = (config.automatic_sort, config.sort_rate_limit_bytes_per_second);
        let retention = config.retention.clone().unwrap_or_default();
        let read_back = config.volume_options().marker_read_back_bytes;
        drop(config);
        if let HostState::Running(volume) = &mut *self.state.borrow_mut() {
            volume.set_sort(automatic, rate);
            volume.set_retention(retention);
            volume.set_marker_read_back_bytes(read_back);
        }
        Ok(())
    }

    /// A failure after the volume opened: close it cleanly (flush), then fail the create.
    fn fail_after_open(self: &Rc<Self>, error: CreateError) {
        spdk_error!("chronicle: {}: {error}; closing it", self.config.borrow().name);
        let mut state = self.state.borrow_mut();
        if let HostState::Running(_) = &*state {
            let HostState::Running(mut volume) = std::mem::replace(&mut *state, HostState::Gone) else {
                unreachable!()
            };
            volume.begin_close();
            *state = HostState::Closing(volume);
        }
        drop(state);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for waiter in waiters {
            (waiter.done)(Err(error.clone()));
        }
    }

    fn closed(self: &Rc<Self>, result: Result<(), EngineError>) {
        let name = self.config.borrow().name.clone();
        let taken = {
            let io = self.counters.borrow();
            format!(
                "host I/Os taken: {} on the app thread, {} directly from threads on its reactor, {} by message \
                 from other threads ({} messages), {} on the thread it moved to ({} moves, {} returns); {} of those \
                 taken in place gathered from completion callbacks",
                io.local_submissions,
                io.direct_submissions,
                io.remote_submissions,
                io.remote_batches,
                io.resident_submissions,
                io.moves,
                io.returns,
                io.gathered_submissions
            )
        };
        match &result {
            Ok(()) => spdk_notice!("chronicle: {name} closed; {taken}"),
            Err(error) => spdk_error!("chronicle: {name} closed with an error: {error}; {taken}"),
        }
        self.teardown();
        if let Some(done) = self.destruct.borrow_mut().take() {
            done.finish();
        }
    }

    /// SPDK destructs the chronicle bdev (delete, hot-remove, application stop): close.
    pub(crate) fn begin_destruct(&self, done: vbdev::DestructDone) {
        self.registered.set(false);
        // The volume's R-VOL bdevs go with it (their I/O fails from now on).
        let restores: Vec<String> = self.restores.borrow().keys().cloned().collect();
        for name in restores {
            let bdev = name.clone();
            vbdev::unregister::<Chronicle, _>(&name, move |result| {
                if let Err(errno) = result {
                    spdk_error!("chronicle: cannot unregister restore volume {bdev}: {errno}");
                }
            });
        }
        *self.destruct.borrow_mut() = Some(done);
        let mut state = self.state.borrow_mut();
        match std::mem::replace(&mut *state, HostState::Gone) {
            HostState::Running(mut volume) => {
                volume.begin_close();
                *state = HostState::Closing(volume);
            }
            other => *state = other,
        }
    }

    /// Queues a host I/O (on the app thread), to the volume or one of its R-VOLs.
    fn submit(&self, io: PendingIo, request: HostRequest, restore: Option<RestoreId>) {
        self.stays_for(&io);
        let mut state = self.state.borrow_mut();
        let HostState::Running(volume) = &mut *state else {
            drop(state);
            // The bdev is going away (or not there yet): nothing accepts I/O.
            return self.complete(io, IoStatus::Failed, None);
        };
        let tag = self.pending.borrow_mut().insert(io) as Tag;
        match restore {
            None => volume.submit(tag, request),
            Some(restore) => volume.submit_restore(restore, tag, request),
        }
    }

    /// Registers the bdev of each R-VOL that finished opening.
    fn finish_restore_opens(&self) -> bool {
        let ready: Vec<RestoreOpen> = {
            let mut pending = self.restore_opens.borrow_mut();
            let (ready, waiting) = pending.drain(..).partition(|open| open.handle.result().is_some());
            *pending = waiting;
            ready
        };
        let any = !ready.is_empty();
        for open in ready {
            let id = match open.handle.result().expect("partitioned on Some") {
                Ok(id) => id,
                Err(error) => {
                    (open.done)(Err(error.into()));
                    continue;
                }
            };
            let registered = self.register_restore(id, &open.bdev_name);
            // What the engine resolved the target to (the cut under a sequence, a time's sequence).
            let shown = self.running(|volume| volume.status().restores.into_iter().find(|r| r.id == id));
            let (generation, sequence) = match (shown, open.target) {
                (Ok(Some(info)), _) => (info.generation, info.sequence),
                (_, RestoreTarget::Generation(generation)) => (generation, None),
                (_, RestoreTarget::Sequence(sequence)) => (0, Some(sequence)),
                (_, RestoreTarget::TimeNs(_)) => (0, None),
            };
            match registered {
                Ok(()) => {
                    spdk_notice!(
                        "chronicle: restore volume {} registered (generation {}{} of {})",
                        open.bdev_name,
                        generation,
                        sequence.map(|s| format!(", sequence {s}")).unwrap_or_default(),
                        self.config.borrow().name
                    );
                    self.restores.borrow_mut().insert(
                        open.bdev_name.clone(),
                        RestoreBdevInfo { bdev_name: open.bdev_name.clone(), id, generation, sequence },
                    );
                    (open.done)(Ok(open.bdev_name));
                }
                Err(error) => {
                    let _ = self.running(|volume| volume.close_restore(id));
                    (open.done)(Err(error));
                }
            }
        }
        any
    }

    fn register_restore(&self, id: RestoreId, bdev_name: &str) -> Result<(), VolumeError> {
        let (block_size, num_blocks) = {
            let state = self.state.borrow();
            let HostState::Running(volume) = &*state else {
                return Err(VolumeError::Failed("the volume is closing".into()));
            };
            let identity = volume.identity();
            let block = self.descs.borrow()[0].bdev().block_size();
            (block, identity.volume_bytes / u64::from(block))
        };
        let properties = vbdev::BdevProperties {
            name: bdev_name.to_string(),
            product_name: "chronicle restore".into(),
            block_size,
            num_blocks,
            write_unit_blocks: 1,
            split_on_write_unit: false,
            buffer_alignment: 1,
            write_cache: true,
            uuid: None,
        };
        let owner = Thread::current().expect("on the app thread").handle();
        let data = RestoreBdev::new(self.id, id, bdev_name.to_string(), owner, self.channels.clone());
        vbdev::register(&properties, data)
            .map_err(|(errno, _)| VolumeError::Failed(format!("cannot register restore volume {bdev_name}: {errno}")))
    }

    fn finish_io(&self, completion: HostCompletion, lane: &mut Lane) {
        let HostCompletion { tag, result, payload } = completion;
        // The host's memory is given back before the I/O completes (BdevIo::host_buffers).
        let spare = match payload {
            Payload::Write(buffers) => emptied(buffers),
            _ => None,
        };
        let Some(io) = self.pending.borrow_mut().try_remove(tag as usize) else {
            spdk_error!("chronicle: completion for unknown I/O {tag}");
            return;
        };
        let status = match result {
            Ok(()) => IoStatus::Success,
            Err(error) => {
                let mut counters = self.counters.borrow_mut();
                counters.completed_with_error += 1;
                if counters.completed_with_error.is_power_of_two() {
                    spdk_error!(
                        "chronicle: {}: I/O failed ({} so far): {error}",
                        self.config.borrow().name,
                        counters.completed_with_error
                    );
                }
                IoStatus::Failed
            }
        };
        self.complete_in(io, status, spare, lane);
    }

    /// Completes `io` here or sends it home; `spare` (an emptied buffer list) goes with it to
    /// the thread that will reuse it.
    fn complete(&self, io: PendingIo, status: IoStatus, spare: Option<SharedBuffers>) {
        self.complete_in(io, status, spare, &mut Lane::default());
    }

    /// [`complete`](Self::complete) in a run of completions that share `lane`.
    fn complete_in(&self, io: PendingIo, status: IoStatus, spare: Option<SharedBuffers>, lane: &mut Lane) {
        match io {
            PendingIo::Local(io) => {
                self.keep_spare(spare);
                lane.home();
                io.complete(status)
            }
            PendingIo::Direct(io, reactor) => {
                self.keep_spare(spare);
                // As the submitting thread, which SPDK completes an I/O on: its bdev channel,
                // and whatever the submitter does next from its completion callback.
                lane.as_submitter(reactor);
                io.complete(status)
            }
            PendingIo::Remote(io, slot) => {
                let mut hops = self.hops.borrow_mut();
                let entry = &mut hops[slot];
                entry.held -= 1;
                self.remote_held.set(self.remote_held.get() - 1);
                entry.outbox.push((io, status, spare));
                if !entry.due {
                    entry.due = true;
                    self.replies_due.borrow_mut().push(slot);
                }
            }
        }
    }

    /// Enters the host I/Os gathered while the poll completed others, in the order they came.
    /// Their index slots are fetched first, so the batch's cache misses overlap (as a hop's
    /// batch's do in [`arrive`](Self::arrive)); the volume's thread is current already, where
    /// each one alone would have switched to it and back.
    fn submit_gathered(&self) {
        let mut gathered = std::mem::take(&mut *self.gathered.borrow_mut());
        if gathered.is_empty() {
            return;
        }
        self.counters.borrow_mut().gathered_submissions += gathered.len() as u64;
        if gathered.len() > 1 {
            self.prefetch_index(
                gathered.iter().filter(|(_, _, restore)| restore.is_none()).map(|(_, request, _)| request),
            );
        }
        for (io, request, restore) in gathered.drain(..) {
            self.submit(io, request, restore);
        }
        // Nothing gathers meanwhile (`gathering` is off): the emptied vector is kept for the
        // next poll.
        debug_assert!(self.gathered.borrow().is_empty());
        *self.gathered.borrow_mut() = gathered;
    }

    /// Fetches the open generation's index slots of a batch of writes to the volume (not its
    /// R-VOLs) into the cache before the first one enters, so that their misses overlap
    /// ([`Volume::index_address`]).
    fn prefetch_index<'a>(&self, requests: impl Iterator<Item = &'a HostRequest>) {
        if let HostState::Running(volume) = &*self.state.borrow() {
            requests.filter_map(|request| volume.index_address(request)).for_each(prefetch);
        }
    }

    /// Gathers a host I/O taken in place while the poll completes others; gives it back, to
    /// enter at once, when no poll is completing or the batch is full.
    fn gather(
        &self,
        io: PendingIo,
        request: HostRequest,
        restore: Option<RestoreId>,
    ) -> Result<(), (PendingIo, HostRequest)> {
        if !self.gathering.get() {
            return Err((io, request));
        }
        let mut gathered = self.gathered.borrow_mut();
        if gathered.len() >= GATHER_LIMIT {
            return Err((io, request));
        }
        gathered.push((io, request, restore));
        Ok(())
    }

    /// Keeps an emptied list for the next writes of the channels without a hop.
    fn keep_spare(&self, spare: Option<SharedBuffers>) {
        if let Some(spare) = spare {
            keep_in(&mut self.spare_lists.borrow_mut(), spare);
        }
    }

    /// `buffers` as a write's shared list, for a channel without a hop ([`shared_host_buffers`],
    /// with the volume's own spares: no thread-local lookup per write).
    fn shared_buffers(&self, buffers: IoBuffers) -> SharedBuffers {
        reuse(self.spare_lists.borrow_mut().pop(), buffers)
    }

    /// The doorbell of `hop` rang on the volume's thread: takes its whole batch of I/Os.
    fn arrive(&self, hop: &Arc<Hop>) {
        let slot = self.adopt(hop);
        let mut batch = std::mem::take(&mut *self.arrivals.borrow_mut());
        hop.to_volume.take_all(&mut batch);
        if !batch.is_empty() {
            let mut counters = self.counters.borrow_mut();
            counters.remote_submissions += batch.len() as u64;
            counters.remote_batches += 1;
            self.hops.borrow_mut()[slot].held += batch.len();
            self.remote_held.set(self.remote_held.get() + batch.len());
        }
        if hop.restore.is_none() && batch.len() > 1 {
            self.prefetch_index(batch.iter().map(|(_, request)| request));
        }
        for (io, request) in batch.drain(..) {
            self.submit(PendingIo::Remote(io, slot), request, hop.restore);
        }
        *self.arrivals.borrow_mut() = batch;
        // Refused I/Os (the volume closing) go home at once.
        self.send_replies();
        self.consider_leaving(hop);
    }

    /// The volume's slot of `hop`, adopting it at its first arrival.
    fn adopt(&self, hop: &Arc<Hop>) -> usize {
        let slot = hop.slot.load(Ordering::Relaxed);
        if slot != usize::MAX {
            return slot;
        }
        let mut hops = self.hops.borrow_mut();
        // Hops of channels that are gone leave first: the table holds live channels only.
        hops.retain(|_, entry| !entry.finished());
        let slot = hops.insert(HopEntry { hop: hop.clone(), outbox: Vec::new(), held: 0, due: false });
        hop.slot.store(slot, Ordering::Relaxed);
        slot
    }

    /// Sends the completions gathered since the last call home, one doorbell message per hop
    /// (a doorbell already outstanding takes them too); whether there were any. A doorbell
    /// SPDK refuses is rung again next time.
    fn send_replies(&self) -> bool {
        let mut due = self.replies_due.borrow_mut();
        if due.is_empty() {
            return false;
        }
        let mut hops = self.hops.borrow_mut();
        let mut counters = self.counters.borrow_mut();
        due.retain(|&slot| {
            let entry = &mut hops[slot];
            if entry.hop.to_home.push_all(&mut entry.outbox) {
                match entry.hop.home.ring::<AtHome>(entry.hop.clone()) {
                    Ok(()) => counters.reply_batches += 1,
                    Err(_) => {
                        entry.hop.to_home.ring_failed();
                        counters.reply_retries += 1;
                        return true;
                    }
                }
            }
            // What did not fit (a full queue) goes next time.
            entry.due = !entry.outbox.is_empty();
            entry.due
        });
        true
    }

    /// Teardown, after `send_replies`: replies whose doorbell SPDK refused have no poll left
    /// to ring again; each goes home in a message of its own.
    fn send_replies_one_by_one(&self) {
        let due = std::mem::take(&mut *self.replies_due.borrow_mut());
        let mut hops = self.hops.borrow_mut();
        for slot in due {
            let entry = &mut hops[slot];
            entry.due = false;
            let mut queued = VecDeque::new();
            entry.hop.to_home.take_all(&mut queued);
            queued.into_iter().chain(entry.outbox.drain(..)).for_each(send_one_home);
        }
    }

    fn finish_maintenance(&self) -> bool {
        finish_ready(&self.maintenance, MaintenanceHandle::result)
    }

    fn finish_compressions(&self) -> bool {
        finish_ready(&self.compressions, CompressHandle::result)
    }

    fn finish_markers(&self) -> bool {
        finish_ready(&self.markers, MarkerHandle::result)
    }

    fn running<T>(&self, f: impl FnOnce(&mut Volume) -> T) -> Result<T, VolumeError> {
        let mut state = self.state.borrow_mut();
        match &mut *state {
            HostState::Running(volume) => Ok(f(volume)),
            other => Err(VolumeError::Busy { name: self.config.borrow().name.clone(), state: other.name() }),
        }
    }

    pub(crate) fn config(&self) -> VolumeConfig {
        self.config.borrow().clone()
    }
}

enum Event {
    Opened,
    CreateFailed(CreateError),
    Closed(Result<(), EngineError>),
}

/// What a host I/O carries in its driver context: its status, when it goes home in a message
/// of its own ([`send_one_home`]; hops carry the request and the status beside the I/O).
pub enum HostIoCtx {
    Done(IoStatus),
}

/// A hop's doorbell towards the volume's thread.
enum AtVolume {}

impl Doorbell for AtVolume {
    type Target = Hop;
    fn rang(hop: Arc<Hop>) {
        match host_by_id(hop.volume) {
            Some(host) => host.arrive(&hop),
            None => {
                // Away: the batch follows the volume, or waits for it at home.
                if let Err(hop) = residence::rang_away(hop) {
                    fail_arrivals(hop);
                }
            }
        }
    }
}

/// The volume of `hop` is gone: what it queued fails at home.
fn fail_arrivals(hop: Arc<Hop>) {
    let mut batch = VecDeque::new();
    hop.to_volume.take_all(&mut batch);
    let mut failed: Vec<_> = batch.into_iter().map(|(io, _request)| (io, IoStatus::Failed, None)).collect();
    if hop.to_home.push_all(&mut failed) {
        if let Err((_, hop)) = hop.home.ring::<AtHome>(hop.clone()) {
            // No volume poll will ring again: one message each.
            hop.to_home.ring_failed();
            let mut queued = VecDeque::new();
            hop.to_home.take_all(&mut queued);
            queued.into_iter().for_each(send_one_home);
        }
    }
    failed.into_iter().for_each(send_one_home);
}

/// A hop's doorbell towards the submitting thread: its completions arrive.
enum AtHome {}

thread_local! {
    /// The batch buffer completions are taken into on this thread (reused).
    static HOME_BATCH: RefCell<VecDeque<Reply>> = const { RefCell::new(VecDeque::new()) };
}

impl Doorbell for AtHome {
    type Target = Hop;
    fn rang(hop: Arc<Hop>) {
        let mut batch = HOME_BATCH.with(|batch| std::mem::take(&mut *batch.borrow_mut()));
        hop.to_home.take_all(&mut batch);
        for (io, status, spare) in batch.drain(..) {
            keep_spare(spare);
            match io.attach() {
                Ok(io) => io.complete(status),
                Err(_) => unreachable!("a hop's replies run on the I/O's own thread"),
            }
        }
        HOME_BATCH.with(|spare| *spare.borrow_mut() = batch);
    }
}

/// A completion sent by [`send_one_home`] arrives on the submitting thread.
fn arrive_home(mut io: DetachedIo<IoCtx>) {
    let status = match io.take_ctx() {
        Some(HostIoCtx::Done(status)) => status,
        _ => IoStatus::Failed,
    };
    match io.attach() {
        Ok(io) => io.complete(status),
        Err(_) => unreachable!("a reply runs on the I/O's own thread"),
    }
}

/// Sends one completed I/O home in a message of its own (teardown only, when a doorbell was
/// refused); if that is refused too, its Drop tries once more and logs.
fn send_one_home((mut io, status, _spare): Reply) {
    io.set_ctx(HostIoCtx::Done(status));
    let thread = io.thread();
    if let Err((_, io)) = io.send(thread, arrive_home) {
        spdk_error!("chronicle: cannot send an I/O completion home (no message memory); retrying");
        drop(io);
    }
}

/// Gives an I/O that could not reach the volume's thread back to the bdev layer as `NoMem`
/// (it retries it later), on the submitting thread.
fn give_back((io, request): (DetachedIo<IoCtx>, HostRequest)) {
    // The host's buffers are let go before the I/O completes (BdevIo::host_buffers).
    drop(request);
    match io.attach() {
        Ok(io) => io.complete(IoStatus::NoMem),
        Err(_) => unreachable!("still on the submitting thread"),
    }
}

/// The engine request for a bdev I/O (the host's buffers, not copied, a write's in the list
/// `share` makes); `None` for I/O types the volume does not take.
fn host_request(io: &BdevIo<IoCtx>, share: impl FnOnce(IoBuffers) -> SharedBuffers) -> Option<HostRequest> {
    let (offset_blocks, num_blocks) = (io.offset_blocks(), io.num_blocks());
    Some(match io.io_type() {
        // SAFETY: the engine completes the request (dropping the buffers) before the I/O
        // completes (finish_io).
        IoType::Read => HostRequest::Read { offset_blocks, buffers: unsafe { io.host_buffers() } },
        IoType::Write => {
            // SAFETY: as for reads (the shared list is emptied before the I/O completes).
            let buffers = unsafe { io.host_buffers() };
            HostRequest::Write { offset_blocks, buffers: share(buffers) }
        }
        IoType::Flush => HostRequest::Flush,
        IoType::Unmap => HostRequest::Unmap { offset_blocks, num_blocks },
        IoType::WriteZeroes => HostRequest::WriteZeroes { offset_blocks, num_blocks },
        IoType::Reset | IoType::Other(_) => return None,
    })
}

/// The chronicle bdev's entry for host I/O (and an R-VOL's), on the submitting thread. Zero
/// copy: the request carries the I/O's own buffers. I/O types the volume does not take fail.
pub(crate) fn submit_io(path: &HostPath, io: BdevIo<IoCtx>) {
    let hop = match &path.way {
        Way::Hop(hop) => hop,
        Way::Local(nearby) => return nearby.submit(io, path.restore, Entry::Home),
        Way::Direct(reactor, nearby) => return nearby.submit(io, path.restore, Entry::Direct(*reactor)),
    };
    if let Some(host) = hop.resident() {
        // The volume moved to this thread: in place, no message.
        return submit_in_place(&host, io, path.restore, Entry::Resident);
    }
    let Some(request) = host_request(&io, shared_host_buffers) else { return io.complete(IoStatus::Failed) };
    match hop.to_volume.push((io.detach(), request)) {
        Ok(false) => {}
        Ok(true) => {
            if let Err((_, hop)) = hop.owner.ring::<AtVolume>(hop.clone()) {
                // SPDK's message pool is empty and no doorbell is outstanding, so nothing will
                // take the queue: what it holds (this I/O only: every ring empties it) goes back
                // to the bdev layer, which retries NoMem I/Os later.
                let mut queued = VecDeque::new();
                hop.to_volume.take_all(&mut queued);
                queued.into_iter().for_each(give_back);
            }
        }
        Err(refused) => give_back(refused),
    }
}

/// How a host I/O enters a volume in place, without a message.
#[derive(Clone, Copy)]
enum Entry {
    /// On the app thread, the volume at home.
    Home,
    /// Run as the app thread from a thread of its reactor ([`Way::Direct`]: the volume is the
    /// app thread's, used here because one reactor runs both threads).
    Direct(SameReactor),
    /// On the thread the volume moved to ([`residence`]).
    Resident,
}

fn submit_in_place(host: &Rc<VolumeHost>, io: BdevIo<IoCtx>, restore: Option<RestoreId>, entry: Entry) {
    let Some(request) = host_request(&io, |buffers| host.shared_buffers(buffers)) else {
        return io.complete(IoStatus::Failed);
    };
    {
        let mut counters = host.counters.borrow_mut();
        *match entry {
            Entry::Home => &mut counters.local_submissions,
            Entry::Direct(_) => &mut counters.direct_submissions,
            Entry::Resident => &mut counters.resident_submissions,
        } += 1;
    }
    let pending = match entry {
        Entry::Direct(reactor) => PendingIo::Direct(io, reactor),
        Entry::Home | Entry::Resident => PendingIo::Local(io),
    };
    let Err((pending, request)) = host.gather(pending, request, restore) else { return };
    match entry {
        Entry::Direct(reactor) => reactor.run_as(reactor.there(), || host.submit(pending, request, restore)),
        Entry::Home | Entry::Resident => host.submit(pending, request, restore),
    }
}

/// The SPDK thread a run of completions runs as: the volume's own, or the submitting thread
/// of the last [`PendingIo::Direct`] one, entered once for consecutive I/Os of one submitter
/// (bdevperf's job, an NVMe-oF poll group) instead of once per I/O. Dropping it comes home.
#[derive(Default)]
struct Lane(Option<(ThreadHandle, RunningAs)>);

impl Lane {
    fn as_submitter(&mut self, reactor: SameReactor) {
        if self.0.as_ref().is_some_and(|(here, _)| *here == reactor.here()) {
            return;
        }
        // Home first: `enter` starts from the volume's thread.
        self.0 = None;
        self.0 = Some((reactor.here(), reactor.enter(reactor.here())));
    }

    fn home(&mut self) {
        self.0 = None;
    }
}

/// A bdev below a volume is being removed (on the app thread).
fn on_remove(id: u64, role: &'static str) {
    residence::with_host(id, move |host| {
        if let Some(host) = host {
            removed(host, role);
        }
    });
}

fn removed(host: &VolumeHost, role: &'static str) {
    let name = host.config.borrow().name.clone();
    spdk_notice!("chronicle: the {role} bdev of {name} is being removed; closing {name}");
    if host.registered.get() {
        vbdev::unregister::<Chronicle, _>(&name.clone(), move |result| {
            if let Err(errno) = result {
                spdk_error!("chronicle: cannot unregister {name} after a hot-remove: {errno}");
            }
        });
    } else {
        host.removed.borrow_mut().get_or_insert_with(|| role.to_string());
    }
}

/// Deletes the volume `name`: unregisters its bdev, which closes the volume (every device
/// flushed, the sort stopped at a resumable point) and releases its bdevs.
pub fn delete(name: &str, done: impl FnOnce(Result<(), VolumeError>) + 'static) {
    let name = name.to_string();
    residence::with_named(&name.clone(), move |host| match host {
        Some(host) => delete_host(host, &name, done),
        None => done(Err(VolumeError::NotFound(name))),
    });
}

fn delete_host(host: &VolumeHost, name: &str, done: impl FnOnce(Result<(), VolumeError>) + 'static) {
    if !host.registered.get() {
        let state = host.state.borrow().name();
        return done(Err(VolumeError::Busy { name: name.to_string(), state }));
    }
    let name = name.to_string();
    vbdev::unregister::<Chronicle, _>(&name.clone(), move |result| {
        done(result.map_err(|errno| VolumeError::Failed(format!("cannot delete {name}: {errno}"))))
    });
}

/// Cuts a generation of volume `name`; `done` gets the sealed generation's number.
pub fn mark(name: &str, comment: &str, done: MarkerWaiter) {
    let comment = comment.to_string();
    at_home(name, done, move |host, done| match host.running(|volume| volume.mark(&comment)) {
        Ok(handle) => host.markers.borrow_mut().push((handle, done)),
        Err(error) => done(Err(error)),
    });
}

/// Runs `then` with volume `name` at home ([`residence::with_named`]); `done` hears that there
/// is no such volume.
fn at_home<T: 'static>(
    name: &str,
    done: RequestWaiter<T>,
    then: impl FnOnce(&Rc<VolumeHost>, RequestWaiter<T>) + 'static,
) {
    let missing = name.to_string();
    residence::with_named(name, move |host| match host {
        Some(host) => then(host, done),
        None => done(Err(VolumeError::NotFound(missing))),
    });
}

/// Rolls volume `name` back to the image of `generation` (sealing the current state first as
/// the undo point); `done` gets the number of the generation the rollback sealed.
pub fn rollback(name: &str, generation: u64, comment: &str, done: MarkerWaiter) {
    let comment = comment.to_string();
    at_home(name, done, move |host, done| rollback_host(host, generation, &comment, done));
}

fn rollback_host(host: &VolumeHost, generation: u64, comment: &str, done: MarkerWaiter) {
    match host.running(|volume| volume.rollback(generation, comment)) {
        Ok(handle) => {
            // Reads go through the engine, which holds them, until the rollback is done.
            let rollbacks = host.rollbacks.clone();
            rollbacks.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let done: MarkerWaiter = Box::new(move |result| {
                rollbacks.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                done(result)
            });
            host.markers.borrow_mut().push((handle, done));
        }
        Err(error) => done(Err(error)),
    }
}

/// Opens `target` of volume `name` (a generation, or in "all" journal mode a sequence or a
/// time) as an R-VOL and registers it as bdev `bdev_name` (FIG 13–15); `done` gets the bdev's
/// name. A refused target registers nothing.
pub fn open_restore(name: &str, target: RestoreTarget, bdev_name: &str, done: RestoreWaiter) {
    let bdev_name = bdev_name.to_string();
    at_home(name, done, move |host, done| open_restore_host(host, target, &bdev_name, done));
}

fn open_restore_host(host: &VolumeHost, target: RestoreTarget, bdev_name: &str, done: RestoreWaiter) {
    if bdev_name.is_empty() || bdev_name.contains('\0') {
        return done(Err(VolumeError::Invalid("restore_name must be a non-empty bdev name without NUL".into())));
    }
    let taken = super::bdev::bdev_exists(bdev_name)
        || host_registry_names().contains(&bdev_name.to_string())
        || REGISTRY.with(|r| {
            r.borrow().by_id.values().any(|h| h.restore_opens.borrow().iter().any(|o| o.bdev_name == bdev_name))
        });
    if taken {
        return done(Err(VolumeError::Invalid(format!("a bdev named {bdev_name} exists already"))));
    }
    match host.running(|volume| volume.open_restore_at(target)) {
        Ok(handle) => {
            host.restore_opens.borrow_mut().push(RestoreOpen { handle, bdev_name: bdev_name.to_string(), target, done })
        }
        Err(error) => done(Err(error)),
    }
}

/// Deletes the R-VOL bdev `bdev_name`: unregistering it closes the R-VOL (its own writes are
/// given up, its units freed).
pub fn delete_restore(bdev_name: &str, done: impl FnOnce(Result<(), VolumeError>) + 'static) {
    let known = REGISTRY.with(|r| r.borrow().by_id.values().any(|h| h.restores.borrow().contains_key(bdev_name)));
    if !known {
        return done(Err(VolumeError::NotFound(bdev_name.to_string())));
    }
    let name = bdev_name.to_string();
    vbdev::unregister::<Chronicle, _>(bdev_name, move |result| {
        done(result.map_err(|errno| VolumeError::Failed(format!("cannot delete restore volume {name}: {errno}"))))
    });
}

/// The R-VOL bdev `bdev_name` of volume `volume` is being removed (app thread).
pub(crate) fn restore_destruct(volume: u64, bdev_name: &str, done: vbdev::DestructDone) {
    if let Some(host) = host_by_id(volume) {
        if let Some(info) = host.restores.borrow_mut().remove(bdev_name) {
            // The volume may be closing already: its R-VOLs end with it.
            let _ = host.running(|v| v.close_restore(info.id));
        }
    }
    done.finish();
}

/// What R-VOL `restore` of volume `volume` reports (for `bdev_get_bdevs`).
pub(crate) fn restore_info(volume: u64, restore: RestoreId) -> Option<RestoreInfo> {
    let host = host_by_id(volume)?;
    let state = host.state.borrow();
    let HostState::Running(volume) = &*state else { return None };
    volume.status().restores.into_iter().find(|r| r.id == restore)
}

fn host_registry_names() -> Vec<String> {
    REGISTRY.with(|r| {
        let registry = r.borrow();
        registry.by_name.keys().cloned().chain(registry.away.values().map(|away| away.config.name.clone())).collect()
    })
}

/// Merges the history records of generations `from..=through` of volume `name` (FIG 11/12).
pub fn merge(name: &str, from: u64, through: u64, done: MaintenanceWaiter) {
    maintain(name, done, move |volume| volume.merge(from, through));
}

/// Gives up the image of history generation `generation` of volume `name`.
pub fn delete_generation(name: &str, generation: u64, done: MaintenanceWaiter) {
    maintain(name, done, move |volume| volume.delete_generation(generation));
}

/// Compresses (`compress`) or decompresses the history record of `generation` of volume
/// `name` (embodiment 8, FIG 50).
pub fn compress_generation(name: &str, generation: u64, compress: bool, done: CompressWaiter) {
    at_home(name, done, move |host, done| compress_host(host, generation, compress, done));
}

fn compress_host(host: &VolumeHost, generation: u64, compress: bool, done: CompressWaiter) {
    let request = |volume: &mut Volume| {
        if compress {
            volume.compress_generation(generation)
        } else {
            volume.decompress_generation(generation)
        }
    };
    match host.running(request) {
        Ok(handle) => host.compressions.borrow_mut().push((handle, done)),
        Err(error) => done(Err(error)),
    }
}

fn maintain(name: &str, done: MaintenanceWaiter, request: impl FnOnce(&mut Volume) -> MaintenanceHandle + 'static) {
    at_home(name, done, move |host, done| match host.running(request) {
        Ok(handle) => host.maintenance.borrow_mut().push((handle, done)),
        Err(error) => done(Err(error)),
    });
}

/// Sets the retention policy of volume `name` (also what `save_config` records).
pub fn set_retention(name: &str, policy: RetentionPolicy, done: RequestWaiter<RetentionPolicy>) {
    if let Err(error) = policy.validate() {
        return done(Err(VolumeError::Invalid(error)));
    }
    at_home(name, done, move |host, done| done(set_retention_host(host, policy)));
}

fn set_retention_host(host: &VolumeHost, policy: RetentionPolicy) -> Result<RetentionPolicy, VolumeError> {
    host.running(|volume| volume.set_retention(policy.clone()))?;
    host.config.borrow_mut().retention = (policy != RetentionPolicy::default()).then(|| policy.clone());
    Ok(policy)
}

/// One generation as `bdev_chronicle_get_generations` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationReport {
    pub generation: u64,
    /// A merged record stands for `generation..=through_generation` (only image `generation`
    /// is restorable); otherwise `generation`.
    pub through_generation: u64,
    pub state: &'static str,
    pub time: String,
    pub time_ns: u64,
    pub comment: String,
    pub blocks: u64,
    /// The sequence the image is cut at: every host write up to it is in the image (the open
    /// generation: its newest write).
    pub last_sequence: u64,
    /// "All" mode: the versions (host writes) of the generation kept for any-point restore.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<VersionsReport>,
    /// "All" mode: the sequences `bdev_chronicle_restore` can open in this generation, from the
    /// cut before it through its own (the image before it is kept, its versions are, and it
    /// is sealed: the open generation's writes need a marker first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_sequences: Option<SequenceRange>,
    /// History records: stored compressed, bytes as stored and before compression.
    pub compressed: bool,
    pub stored_bytes: u64,
    pub original_bytes: u64,
}

/// The versions of an "all" mode generation.
#[derive(Debug, Clone, Serialize)]
pub struct VersionsReport {
    pub elements: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub first_time: String,
    pub first_time_ns: u64,
    pub last_time: String,
    pub last_time_ns: u64,
}

/// Sequences `from..=through`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SequenceRange {
    pub from: u64,
    pub through: u64,
}

pub fn generations(name: &str, done: RequestWaiter<Vec<GenerationReport>>) {
    at_home(name, done, |host, done| done(generations_of(host)));
}

fn generations_of(host: &VolumeHost) -> Result<Vec<GenerationReport>, VolumeError> {
    host.running(|volume| {
        let generations = volume.status().generations;
        let all = volume.identity().journal_mode == JournalMode::All;
        let rfc3339 = crate::core::time::rfc3339;
        generations
            .iter()
            .map(|g| {
                // The image before it is listed (kept) and its versions are: sequences inside.
                let previous = generations.iter().find(|p| p.generation + 1 == g.generation);
                let restore_sequences = match (previous, g.versions) {
                    _ if !all => None,
                    (Some(previous), Some(_))
                        if g.state != "open" && previous.through_generation == previous.generation =>
                    {
                        Some(SequenceRange { from: previous.last_sequence, through: g.last_sequence })
                    }
                    // A generation without writes, or whose image before is gone: its cut.
                    _ if g.state != "open" => Some(SequenceRange { from: g.last_sequence, through: g.last_sequence }),
                    _ => None,
                };
                GenerationReport {
                    generation: g.generation,
                    through_generation: g.through_generation,
                    state: g.state,
                    time: rfc3339(g.time_ns),
                    time_ns: g.time_ns,
                    comment: g.comment.clone(),
                    blocks: g.blocks,
                    last_sequence: g.last_sequence,
                    versions: g.versions.map(|v| VersionsReport {
                        elements: v.elements,
                        first_sequence: v.first_sequence,
                        last_sequence: v.last_sequence,
                        first_time: rfc3339(v.first_time_ns),
                        first_time_ns: v.first_time_ns,
                        last_time: rfc3339(v.last_time_ns),
                        last_time_ns: v.last_time_ns,
                    }),
                    restore_sequences,
                    compressed: g.compressed,
                    stored_bytes: g.stored_bytes,
                    original_bytes: g.original_bytes,
                }
            })
            .collect()
    })
}

/// What `bdev_chronicle_get_status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeReport {
    pub name: String,
    /// inspecting, formatting, opening, running, closing.
    pub state: &'static str,
    pub volume_uuid: Option<String>,
    pub base_bdev: String,
    pub journal_bdev: String,
    pub backup_bdev: String,
    pub history_bdev: String,
    /// The volume's options as `save_config` would replay them.
    pub config: VolumeConfig,
    /// Progress of a format's copy of the base to the backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_progress: Option<FormatReport>,
    /// The engine's status (journal and history use, sort progress, counters, generations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<Status>,
    pub io: HostCounters,
    pub io_pending: usize,
    /// R-VOL bdevs of the volume.
    pub restore_bdevs: Vec<RestoreBdevInfo>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct FormatReport {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

impl From<FormatProgress> for FormatReport {
    fn from(progress: FormatProgress) -> Self {
        FormatReport { done_bytes: progress.done_bytes, total_bytes: progress.total_bytes }
    }
}

pub fn status(name: &str, done: RequestWaiter<VolumeReport>) {
    at_home(name, done, |host, done| done(Ok(host.report())));
}

/// Whether a chronicle volume named `name` exists (at home or away).
pub fn exists(name: &str) -> bool {
    REGISTRY.with(|registry| {
        let registry = registry.borrow();
        registry.by_name.contains_key(name) || registry.away_id(name).is_some()
    })
}

pub(crate) fn status_by_id(id: u64) -> Option<VolumeReport> {
    host_by_id(id).map(|host| host.report())
}

pub(crate) fn config_by_id(id: u64) -> Option<VolumeConfig> {
    host_by_id(id)
        .map(|host| host.config())
        .or_else(|| REGISTRY.with(|registry| registry.borrow().away.get(&id).map(|away| away.config.clone())))
}

pub(crate) fn destruct_by_id(id: u64, done: vbdev::DestructDone) {
    residence::with_host(id, move |host| match host {
        Some(host) => host.begin_destruct(done),
        None => done.finish(),
    });
}

impl VolumeHost {
    fn report(&self) -> VolumeReport {
        let config = self.config.borrow();
        let state = self.state.borrow();
        let (format_progress, volume) = match &*state {
            HostState::Formatting(formatting) => (Some(formatting.progress().into()), None),
            HostState::Running(volume) | HostState::Closing(volume) => (None, Some(volume.status())),
            _ => (None, None),
        };
        VolumeReport {
            name: config.name.clone(),
            state: state.name(),
            volume_uuid: self.uuid.get().map(|uuid| uuid::Uuid::from_bytes(uuid).to_string()),
            base_bdev: config.base_bdev.clone(),
            journal_bdev: config.journal_bdev.clone(),
            backup_bdev: config.backup_bdev.clone(),
            history_bdev: config.history_bdev.clone(),
            config: config.clone(),
            format_progress,
            volume,
            io: self.counters.borrow().clone(),
            io_pending: self.pending.borrow().len(),
            restore_bdevs: self.restores.borrow().values().cloned().collect(),
        }
    }
}

/// Asks the CPU to bring the cache line at `address` in without waiting for it (a hint: never
/// faults, reads nothing the program sees).
fn prefetch(address: *const u32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is part of SSE, which every x86_64 CPU has; it does not dereference
    // the address in the language's sense and cannot fault, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

#[cfg(test)]
mod tests {
    use super::{SleepWatch, SLEEP_GAPS};

    #[test]
    fn sleep_watch_fires_once_after_enough_long_gaps_in_which_the_thread_blocked() {
        const LONG: u64 = 1000;
        let mut watch = SleepWatch::new(LONG);
        let mut at = 0u64;
        let never = || -> u64 { panic!("switches are read at counted gaps only") };
        // Polls close together never count, however many.
        for _ in 0..10 * SLEEP_GAPS {
            at += LONG / 4;
            assert!(!watch.poll(at, true, never));
        }
        // Long gaps with nothing waiting do not count either.
        for _ in 0..10 * SLEEP_GAPS {
            at += LONG * 4;
            assert!(!watch.poll(at, false, never));
        }
        // Long gaps while I/O waits, on a busy reactor: whole windows in which the thread
        // never blocked.
        for _ in 0..3 * SLEEP_GAPS {
            at += LONG;
            assert!(!watch.poll(at, true, || 7));
        }
        // Long gaps in which the thread blocked each time: fires once, at the window's end.
        let mut switches = 100u64;
        let mut fired = Vec::new();
        for poll in 0..4 * SLEEP_GAPS {
            at += LONG;
            switches += 1;
            if watch.poll(at, true, || switches) {
                fired.push(poll);
            }
        }
        assert_eq!(fired, vec![SLEEP_GAPS - 1], "the window's last gap");
        assert!(!watch.poll(at + LONG * 10, true, || switches + 1000));
    }
}
