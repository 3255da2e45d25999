//! The engine: polled state machines over four devices (base, journal, backup, history) that
//! implement seed 001's journal, generations and sort.
//!
//! - `write.rs`: the host write path (FIG 8) — explicit state machines, zero copy.
//! - `marker.rs`: seal the open generation and open the next (FIG 9).
//! - `sort.rs`: apply a sealed generation to the backup in address order with copy-on-write
//!   into history (FIG 10), resumable after a crash.
//! - `setup.rs`: format and open, including crash recovery.
//! - `volume.rs`: the owner object and its poll loop.
//! - `reader.rs`: offline reading of generation images (verify, restore, demo checks).
//! - `merge.rs`: history maintenance — merge, deletion, retention (FIG 11/12).
//! - `rollback.rs`: the base back to an earlier generation's image, as a new generation.
//! - `restore_volume.rs`: restore volumes (R-VOL) — a generation as a volume (FIG 13–15, 20).
//!
//! One owner thread per volume: everything here is single-threaded and non-blocking. Control
//! operations (format, recovery, marker, sort) are `async fn`s driven by the volume's poll
//! loop; the hot path uses no futures.

mod bitmap_only;
mod checksums;
mod compress;
mod dedup;
mod io;
mod marker;
mod merge;
mod meta;
pub mod reader;
mod restore_volume;
mod rollback;
mod setup;
mod sort;
mod volume;
mod write;

use crate::core::format::layout::{CapacityError, LayoutOptions};
use crate::core::format::superblock::{Durability, JournalFullPolicy, JournalMode};
use crate::core::format::FormatError;
use crate::device::IoError;

pub use bitmap_only::BitmapCounters;
pub use compress::{CompressHandle, CompressReport, FRAME_BYTES};
pub use io::Role;
pub use merge::{MaintenanceError, MaintenanceHandle, MergeReport, RetentionPolicy};
pub use restore_volume::{
    RestoreHandle, RestoreId, RestoreInfo, RestoreTarget, MAX_RESTORE_IN_FLIGHT, MAX_RESTORE_VOLUMES,
};
pub use setup::{begin_format, format, FormatProgress, Formatting};
pub use volume::{
    GenerationInfo, HostCompletion, HostError, HostRequest, Identity, MarkerHandle, Opening, Status, VersionRange,
    Volume,
};

/// Everything `format` needs besides the devices.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    pub host_write_size: u32,
    pub durability: Durability,
    pub journal_full_policy: JournalFullPolicy,
    pub journal_mode: JournalMode,
    pub layout: LayoutOptions,
    /// Names recorded in the superblocks so a device opened alone names its partners.
    pub names: [String; 4],
    /// Name the volume is exposed under (the SPDK bdev name), recorded in the superblocks so
    /// that a restarted application finds the volume under the same name; may be empty.
    pub volume_name: String,
    /// Refuse host writes that are not whole host-write-size units (recorded; see
    /// [`VolumeOptions::strict`]).
    pub strict: bool,
    /// Copy the base to the backup (generation 0 = the base as it is now). Not needed when
    /// both are known to be zero, as for freshly created files.
    pub copy_base_to_backup: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            host_write_size: 4096,
            durability: Durability::Flush,
            journal_full_policy: JournalFullPolicy::Block,
            journal_mode: JournalMode::Latest,
            layout: LayoutOptions::default(),
            names: ["base".into(), "journal".into(), "backup".into(), "history".into()],
            volume_name: String::new(),
            strict: false,
            copy_base_to_backup: true,
        }
    }
}

/// Run-time options of an opened volume.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Refuse host writes that are not whole host-write-size blocks instead of widening them
    /// by read-modify-write. A volume formatted strict is strict whatever this says.
    pub strict: bool,
    /// Host operations in flight at once; more wait in the volume's queue.
    pub max_host_in_flight: usize,
    pub sort: SortOptions,
    /// Which history records are kept, merged or dropped (none: everything is kept).
    pub retention: RetentionPolicy,
    /// Bits of the 128-bit content hash merges use to find equal elements (dedup). 128 in
    /// use; tests narrow it so that different contents collide and only the byte compare
    /// keeps them apart.
    pub dedup_hash_bits: u32,
    /// Dedup across records shares runs only: a merge stores the first `dedup_min_run − 1`
    /// elements of a run equal to consecutive units of another record and shares the rest
    /// (scattered shares cost retained extents and an address table and save nothing once
    /// the records shared with leave; BENCHMARKS table 6b). 16 (64 KiB of 4 KiB units) in
    /// use; 1 shares every match (tests of the sharing mechanics).
    pub dedup_min_run: u64,
    /// Bytes of rewritten elements whose checksum waits for the marker (FORMAT.md §9.1): the
    /// most the marker reads back while it holds writes. Rewrites past it checksum their data
    /// as they are written; 0 checksums every write at once. 256 MiB in use.
    pub marker_read_back_bytes: u64,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            strict: false,
            max_host_in_flight: 256,
            sort: SortOptions::default(),
            retention: RetentionPolicy::default(),
            dedup_hash_bits: 128,
            dedup_min_run: 16,
            marker_read_back_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SortOptions {
    /// Elements per sort batch: each batch costs two flushes and one cursor write.
    pub batch_elements: usize,
    /// Sort I/Os in flight at once.
    pub max_in_flight: usize,
    /// Optional limit on sort bandwidth (bytes per second read from the journal).
    pub rate_limit_bytes_per_second: Option<u64>,
    /// Start sorting sealed generations automatically.
    pub automatic: bool,
}

impl Default for SortOptions {
    fn default() -> Self {
        SortOptions { batch_elements: 512, max_in_flight: 32, rate_limit_bytes_per_second: None, automatic: true }
    }
}

/// Why a volume operation failed, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{device} device ({name}): {source}")]
    Format {
        device: &'static str,
        name: String,
        #[source]
        source: FormatError,
    },
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{0}")]
    Geometry(String),
    #[error("{0}")]
    Invalid(String),
    /// Not now: too much is waiting already (retry when some of it is done).
    #[error("{0}")]
    Busy(String),
    /// Not enough free space for the request (nothing changed but what the message says).
    #[error("{0}")]
    NoSpace(String),
    /// A marker, rollback or maintenance request failed (a device error or damaged
    /// metadata); the message says which.
    #[error("{0}")]
    Operation(String),
    #[error("the {role} device ({name}) does not belong with the others: {detail}")]
    Mismatch { role: &'static str, name: String, detail: String },
    #[error("volume metadata is damaged: {0}")]
    Damaged(String),
    #[error("{0} is not supported yet")]
    Unsupported(String),
    /// An any-point-in-time target the volume cannot restore (any more, or yet).
    #[error("{target} cannot be restored: {why}; restorable: {available}")]
    TargetUnavailable { target: String, why: String, available: String },
    #[error("history full: the {operation} of generation {generation} needs {needed} contiguous units, {free} are free (largest run {largest}); enlarge the history or delete old generations")]
    HistoryFull { operation: &'static str, generation: u64, needed: u64, free: u64, largest: u64 },
    #[error("history catalog full: the sort of generation {generation} needs a new record but the catalog holds {capacity}; delete old generations")]
    HistoryCatalogFull { generation: u64, capacity: u32 },
    #[error("{count} generations are waiting for the sort; at most {limit} may (let the sort catch up)")]
    TooManyGenerations { count: usize, limit: usize },
    #[error("the volume stopped after a device error and must be reopened to recover: {0}")]
    Failed(String),
    #[error("generation {generation} cannot be sealed: {tracked} of its blocks are tracked by the bitmap only (the journal was full) and {needed} of them need journal elements, but {free} of {capacity} are free and nothing is waiting to be sorted; writes go on (nothing is lost), but this generation fits the journal only if it is enlarged")]
    BitmapTracked { generation: u64, tracked: u64, needed: u64, free: u64, capacity: u64 },
    #[error("the volume is closing")]
    Closing,
}

impl EngineError {
    pub(crate) fn format(device: &'static str, name: &str, source: FormatError) -> Self {
        EngineError::Format { device, name: name.to_owned(), source }
    }
}

/// Current time as Unix nanoseconds (marker times, open times).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}
