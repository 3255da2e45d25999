//! Deterministic simulation of the engine under power cuts (ARCHITECTURE §10).
//!
//! Four memory devices, each behind a fault device with a volatile write cache, carry a small
//! volume. Each seed formats it, then repeats: open (recovery) — sometimes cut power during the
//! recovery itself and recover again — check every invariant against a model, run a random
//! workload (aligned and partial writes, overlapping writes, flushes, markers, the background
//! sort in small batches) for a random number of steps, and cut power at that instant.
//!
//! Invariants checked after every recovery:
//! - recovery succeeds: all metadata decodes;
//! - no acknowledged write is lost: every device block of the base holds its newest write that
//!   was durable at the cut (acknowledged before a completed flush or marker; every
//!   acknowledged write in write-through mode) or a write submitted after it — never anything
//!   else, so no torn unit is read as valid data from a durable write;
//! - every sealed generation is exact: its image (from history and backup, or from the
//!   journal while unsorted) equals the model's image at its marker, byte for byte;
//! - recovery is idempotent: a cut during recovery is recovered from the same way;
//! - history maintenance (merges of adjacent records, deletions of generations, seed 001
//!   FIG 11/12) is atomic: after a cut, every generation it would give up is either still
//!   exact or gone, and every other generation is exact; merges deduplicate (a share of the
//!   writes use a few common unit contents) with a 3-bit content hash, so most candidates are
//!   collisions only the byte compare rejects, and every image stays exact; merges share with
//!   other records too, and deleting or merging away a record whose units others point at
//!   keeps those units (retained): `verify` passes after every recovery (every shared pointer
//!   lands in a live record's or a retained extent's units, every retained extent is pointed
//!   at — nothing freed while referenced, nothing leaked);
//! - compressions and decompressions of random records (embodiment 8), in both journal modes,
//!   beside merges that share across records: every generation, any-point target and R-VOL
//!   read stays exact whether they commit before the cut or not, and `verify` holds (units
//!   others point at stay retained when their record is compressed; no pointer lands in a
//!   compressed record's frames);
//! - a rollback (rewrite of the changed blocks through the journal between an undo point and a
//!   final seal) cut anywhere leaves every acknowledged write, the undo point's image if it
//!   was sealed, and the rolled-back image if the final seal was;
//! - restore volumes (R-VOL, FIG 13–15, 20) opened at random read their generation overlaid
//!   with their own writes, exactly, while writes, sorts, merges and rollbacks go on (checked
//!   on every read, between the cuts); in "all" mode, R-VOLs opened at any-point targets (a
//!   sequence checked offline after the recovery, in a sealed or sorted generation) read that
//!   image the same way.
//! - a third of the seeds use the journal-full policy bitmap-only (FIG 36) with the smallest
//!   journal: writes the journal has no room for go to the base only, tracked by a durable
//!   bitmap, and come back into the journal as the sort frees space; every invariant above
//!   holds for them too (a marker seals only once they are in the journal).
//!
//! The seed of a failing run is printed; `CHRONICLE_SIM_SEEDS` and `CHRONICLE_SIM_CYCLES` scale
//! the run (defaults: 200 seeds × 50 cycles = 10,000 power cuts, plus cuts during recovery).

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle::core::format::layout::{self, LayoutOptions, VolumeShape};
use chronicle::core::format::superblock::{Durability, JournalFullPolicy, JournalMode};
use chronicle::device::fault::{FaultController, FaultDevice};
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::Payload;
use chronicle::device::{Channel, Device, DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{
    format, FormatOptions, HostCompletion, HostRequest, MaintenanceError, MaintenanceHandle, MarkerHandle,
    RestoreHandle, RestoreId, RestoreTarget, SortOptions, Volume, VolumeOptions,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BLOCK: usize = 512;
const UNIT: usize = 4096;
const UNITS: u64 = 48;
const BLOCKS_PER_UNIT: u64 = (UNIT / BLOCK) as u64;
const VOLUME_BLOCKS: u64 = UNITS * BLOCKS_PER_UNIT;
const QUEUE_DEPTH: usize = 12;
/// Generations per seed: Engine I keeps all of them, so a seed stays within the history.
const MAX_GENERATIONS: u64 = 50;

/// Maintenance operations that committed, over the whole run (to show the sim exercises them).
static MAINTENANCE_DONE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Restore volume reads checked against the model, over the whole run.
static DEDUP_SHARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DEDUP_MISMATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Elements merges shared with another record's (or a retained extent's) unit.
static DEDUP_ACROSS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DEDUP_DECLINED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Recoveries after which some units were retained (kept for another record's pointers after
/// their own record left), and the retained units seen over them.
static RETAINED_SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static RETAINED_UNITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static READS_CHECKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Rollbacks that completed, over the whole run.
static ROLLBACKS_DONE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Base-only writes (policy bitmap-only) and blocks resynced into the journal, over the run.
static BITMAP_WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static BITMAP_RESYNCED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Cuts taken while some blocks were tracked by the bitmap only.
static BITMAP_CUTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Rewritten elements read back to checksum by markers and while idle, and cuts with some
/// still pending (FORMAT.md §9.1).
static MARKER_CHECKSUMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static IDLE_CHECKSUMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static PENDING_CUTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static REWRITES_IN_PLACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The journal-full policy of a seed: bitmap-only for a third of the "latest" mode seeds (with
/// a journal as small as allowed, so the mode engages often; "all" mode refuses it), block for
/// the others.
fn policy_of(seed: u64, mode: JournalMode) -> JournalFullPolicy {
    if mode == JournalMode::Latest && seed % 3 == 1 {
        JournalFullPolicy::BitmapOnly
    } else {
        JournalFullPolicy::Block
    }
}
/// Records compressed and decompressed (embodiment 8), over the whole run.
static COMPRESSIONS_DONE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DECOMPRESSIONS_DONE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Compressions of records pointing at other records' units, and units compressions kept
/// retained for other records (dedup across records with compression), over the whole run.
static COMPRESSED_SHARING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static COMPRESSION_RETAINED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Compressions on "all" journal mode volumes.
static COMPRESSIONS_ALL_MODE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Media {
    devices: [Arc<MemoryDevice>; 4],
}

impl Media {
    fn new(seed: u64, mode: JournalMode) -> Self {
        let shape = VolumeShape { host_write_size: UNIT as u32, volume_blocks: UNITS };
        let bitmap_only = policy_of(seed, mode) == JournalFullPolicy::BitmapOnly;
        let options = LayoutOptions { open_bitmap: bitmap_only, ..layout_options(mode) };
        let journal_elements = match (mode, bitmap_only) {
            (JournalMode::All, _) => 4 * UNITS,
            (_, true) => layout::MIN_JOURNAL_ELEMENTS,
            _ => UNITS + UNITS / 2,
        };
        let sizes = [
            UNITS * UNIT as u64,
            // A small journal: the journal-full path and ring wrap are exercised too. "All" mode
            // keeps every write: it gets a larger one (and the workload marks when it fills).
            layout::journal_bytes_for(&shape, &options, journal_elements),
            UNITS * UNIT as u64,
            // History for every generation of a seed (Engine I keeps them all).
            // ("All" mode keeps every generation's versions too.)
            layout::history_bytes_for(&shape, &options, if mode == JournalMode::All { 192 } else { 64 } * UNITS),
        ];
        let names = ["base", "journal", "backup", "history"];
        let devices = std::array::from_fn(|i| {
            let mut options = MemoryOptions::new(BLOCK as u32, sizes[i].div_ceil(BLOCK as u64));
            options.reorder_seed = Some(seed.wrapping_mul(31).wrapping_add(i as u64));
            Arc::new(MemoryDevice::new(names[i], options))
        });
        Media { devices }
    }

    /// Channels straight to the media (after settle: the durable state).
    fn plain_channels(&self) -> Vec<Box<dyn Channel>> {
        self.devices.iter().map(|d| d.open_channel().unwrap()).collect()
    }

    /// Channels through fresh fault devices (a machine after boot).
    fn fault_channels(&self, seed: u64) -> (Vec<Box<dyn Channel>>, Vec<FaultController>) {
        let mut channels = Vec::new();
        let mut controllers = Vec::new();
        for (i, device) in self.devices.iter().enumerate() {
            let inner: Arc<dyn Device> = device.clone();
            let (fault, controller) = FaultDevice::new(inner, seed.wrapping_mul(7).wrapping_add(i as u64));
            channels.push(fault.open_channel().unwrap());
            controllers.push(controller);
        }
        (channels, controllers)
    }

    fn base_image(&self) -> Vec<u8> {
        self.devices[0].read_blocks(0, VOLUME_BLOCKS)
    }
}

fn layout_options(mode: JournalMode) -> LayoutOptions {
    // "All" mode: a version record per sorted generation beside its history record.
    let catalog_entries = if mode == JournalMode::All { 127 } else { 63 };
    LayoutOptions { catalog_entries, site_slots: 1, max_online_generations: 16, mode, open_bitmap: false }
}

/// Unit contents written at many blocks (zeros among them): merges find equal elements.
static DEDUP_POOL: std::sync::LazyLock<Vec<Vec<u8>>> = std::sync::LazyLock::new(|| {
    (0u8..4)
        .map(|k| if k == 0 { vec![0u8; UNIT] } else { (0..UNIT).map(|i| (i as u8).wrapping_mul(k)).collect() })
        .collect()
});

fn volume_options(seed: u64) -> VolumeOptions {
    VolumeOptions {
        // A 3-bit content hash: most dedup candidates are collisions the byte compare rejects.
        dedup_hash_bits: 3,
        // Mostly every match shared (tiny volumes have few runs), so the cuts exercise the
        // sharing mechanics; one seed in four shares runs of two or more only, so merges
        // that decline scattered matches are cut too.
        dedup_min_run: if seed % 4 == 3 { 2 } else { 1 },
        // Rewrites' checksums: mostly left to the marker; one seed in five checksums every
        // write at once, and about a third of the others leave only three to the marker (the
        // rest are checksummed at once: both kinds in one generation).
        marker_read_back_bytes: if seed % 5 == 0 {
            0
        } else if seed % 3 == 1 {
            3 * UNIT as u64
        } else {
            VolumeOptions::default().marker_read_back_bytes
        },
        strict: false,
        max_host_in_flight: 64,
        sort: SortOptions { batch_elements: 3, max_in_flight: 4, rate_limit_bytes_per_second: None, automatic: true },
        ..VolumeOptions::default()
    }
}

fn cut(controllers: &[FaultController]) {
    for controller in controllers {
        controller.power_cut();
    }
}

fn settle(controllers: &[FaultController]) {
    for controller in controllers {
        controller.settle().expect("the fault device settles after a cut");
    }
}

/// One write as the model sees it: whole units, with the bytes the engine writes to them.
struct WriteRecord {
    first_block: u64,
    data: Vec<u8>,
    acked: Option<u64>,
    /// Submission sequence ("all" mode: the version's sequence).
    sequence: u64,
}

/// A write of an earlier cycle, for any-point targets ("all" mode): whether it was durable at
/// the cut that ended its cycle (certain to be a version) or may have been lost.
struct LoggedWrite {
    sequence: u64,
    first_block: u64,
    data: Vec<u8>,
    certain: bool,
}

/// Any-point targets checked (exactly, or against the values the durability rule allows),
/// and refused, over the whole run.
static SEQUENCES_CHECKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static SEQUENCES_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Reads of R-VOLs opened at a sequence, checked.
static SEQUENCE_READS_CHECKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What the volume must hold.
struct Model {
    /// Base content at the last recovery (every block's floor before any write since).
    checkpoint: Vec<u8>,
    /// The image in submission order (what the host reads once everything completes).
    current: Vec<u8>,
    writes: Vec<WriteRecord>,
    /// Writes with an ack number up to this are durable.
    durable_upto: u64,
    acked: u64,
    /// Sealed generations' images.
    images: BTreeMap<u64, Vec<u8>>,
    /// "All" mode: every write of the earlier cycles.
    log: Vec<LoggedWrite>,
}

impl Model {
    /// Device blocks whose content is not allowed, per the durability rule.
    fn violations(&self, base: &[u8]) -> Vec<String> {
        let mut problems = Vec::new();
        for block in 0..VOLUME_BLOCKS as usize {
            let range = block * BLOCK..(block + 1) * BLOCK;
            let actual = &base[range.clone()];
            // Writes touching this block, in submission order.
            let touching: Vec<&WriteRecord> = self
                .writes
                .iter()
                .filter(|w| {
                    let start = w.first_block as usize * BLOCK;
                    start <= range.start && range.end <= start + w.data.len()
                })
                .collect();
            let floor = touching.iter().rposition(|w| w.acked.is_some_and(|a| a <= self.durable_upto));
            let value = |w: &WriteRecord| {
                let at = range.start - w.first_block as usize * BLOCK;
                w.data[at..at + BLOCK].to_vec()
            };
            let mut allowed: Vec<Vec<u8>> = Vec::new();
            match floor {
                Some(k) => allowed.extend(touching[k..].iter().map(|w| value(w))),
                None => {
                    allowed.push(self.checkpoint[range.clone()].to_vec());
                    allowed.extend(touching.iter().map(|w| value(w)));
                }
            }
            if !allowed.iter().any(|a| a == actual) {
                problems.push(format!(
                    "base block {block}: holds none of the {} allowed values (durable floor: {})",
                    allowed.len(),
                    floor.map_or("checkpoint".into(), |k| format!("write {k} of {}", touching.len()))
                ));
            }
        }
        problems
    }
}

impl Model {
    /// Device blocks of `actual` (the image restored at `sequence`) that hold a value the
    /// writes up to `sequence` do not allow: on top of `floor` (the image of the generation cut
    /// at `cut` ≤ `sequence`), each block holds its newest write up to `sequence` that was
    /// certain at its cut, or a later one up to `sequence` (a write not durable at a cut may
    /// be lost; torn units are allowed per device block, as on the base).
    fn sequence_violations(&self, floor: &[u8], cut: u64, sequence: u64, actual: &[u8]) -> Vec<usize> {
        let writes: Vec<&LoggedWrite> =
            self.log.iter().filter(|w| w.sequence > cut && w.sequence <= sequence).collect();
        let mut bad = Vec::new();
        for block in 0..VOLUME_BLOCKS as usize {
            let range = block * BLOCK..(block + 1) * BLOCK;
            let touching: Vec<&&LoggedWrite> = writes
                .iter()
                .filter(|w| {
                    let start = w.first_block as usize * BLOCK;
                    start <= range.start && range.end <= start + w.data.len()
                })
                .collect();
            let value = |w: &LoggedWrite| {
                let at = range.start - w.first_block as usize * BLOCK;
                w.data[at..at + BLOCK].to_vec()
            };
            let mut allowed: Vec<Vec<u8>> = Vec::new();
            match touching.iter().rposition(|w| w.certain) {
                Some(k) => allowed.extend(touching[k..].iter().map(|w| value(w))),
                None => {
                    allowed.push(floor[range.clone()].to_vec());
                    allowed.extend(touching.iter().map(|w| value(w)));
                }
            }
            if !allowed.iter().any(|a| a == &actual[range.clone()]) {
                bad.push(block);
            }
        }
        bad
    }
}

/// Restore volumes of one cycle (they end at the cut): each with the image it must read (its
/// generation's, overlaid with its own writes), and its requests in flight — at most one
/// write, or reads, at a time per R-VOL, so what a read must return is known when it starts.
#[derive(Default)]
struct Restores {
    /// Handle, generation, sequence ("all" mode targets), image.
    opening: Option<(RestoreHandle, u64, Option<u64>, Vec<u8>)>,
    open: Vec<SimRestore>,
    /// "All" mode: sequences in sealed or sorted generations, with the image checked offline
    /// after this cycle's recovery (an R-VOL opened at one must read it).
    targets: Vec<(u64, Vec<u8>)>,
    /// Tag → (R-VOL index, byte offset, expected bytes or `None` for a write).
    pending: BTreeMap<u64, (usize, usize, Option<Vec<u8>>)>,
}

struct SimRestore {
    id: RestoreId,
    generation: u64,
    sequence: Option<u64>,
    image: Vec<u8>,
    in_flight: usize,
    writing: bool,
}

impl Restores {
    fn step(
        &mut self,
        rng: &mut ChaCha8Rng,
        volume: &mut Volume,
        model: &Model,
        uncertain: &[u64],
        next_tag: &mut u64,
    ) {
        if let Some((handle, generation, sequence, image)) = &self.opening {
            if let Some(result) = handle.result() {
                match result {
                    Ok(id) => self.open.push(SimRestore {
                        id,
                        generation: *generation,
                        sequence: *sequence,
                        image: image.clone(),
                        in_flight: 0,
                        writing: false,
                    }),
                    // Merged away or dropped meanwhile: refused.
                    Err(error) => assert!(
                        ["merged", "not held", "cannot be restored"].iter().any(|w| error.to_string().contains(w)),
                        "opening a restore volume of generation {generation} (sequence {sequence:?}): {error}"
                    ),
                }
                self.opening = None;
            }
        }
        if self.opening.is_none() && self.open.len() < 3 && rng.random_bool(0.01) {
            if !self.targets.is_empty() && rng.random_bool(0.5) {
                let (sequence, image) = self.targets[rng.random_range(0..self.targets.len())].clone();
                let handle = volume.open_restore_at(RestoreTarget::Sequence(sequence));
                self.opening = Some((handle, 0, Some(sequence), image));
            } else {
                let candidates: Vec<u64> = model.images.keys().copied().filter(|g| !uncertain.contains(g)).collect();
                let generation = candidates[rng.random_range(0..candidates.len())];
                let image = model.images[&generation].clone();
                self.opening = Some((volume.open_restore(generation), generation, None, image));
            }
        }
        if self.open.is_empty() || !rng.random_bool(0.3) {
            return;
        }
        let index = rng.random_range(0..self.open.len());
        let restore = &mut self.open[index];
        if restore.writing {
            return;
        }
        let tag = *next_tag;
        *next_tag += 1;
        let offset = rng.random_range(0..VOLUME_BLOCKS as usize - 8) * BLOCK;
        let len = rng.random_range(1..=8) * BLOCK;
        if rng.random_bool(0.2) {
            if restore.in_flight > 0 {
                return;
            }
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            restore.image[offset..offset + len].copy_from_slice(&data);
            restore.writing = true;
            let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(&data)));
            volume.submit_restore(
                restore.id,
                tag,
                HostRequest::Write { offset_blocks: (offset / BLOCK) as u64, buffers },
            );
            self.pending.insert(tag, (index, offset, None));
        } else {
            let expected = restore.image[offset..offset + len].to_vec();
            let buffers = IoBuffers::single(DmaBuf::zeroed(len));
            volume.submit_restore(
                restore.id,
                tag,
                HostRequest::Read { offset_blocks: (offset / BLOCK) as u64, buffers },
            );
            self.pending.insert(tag, (index, offset, Some(expected)));
        }
        restore.in_flight += 1;
    }

    /// Takes a completion of an R-VOL request (checking it); gives back any other.
    fn complete(
        &mut self,
        completion: HostCompletion,
        images: &BTreeMap<u64, Vec<u8>>,
        volume_state: String,
    ) -> Result<Option<HostCompletion>, String> {
        let Some((index, offset, expected)) = self.pending.remove(&completion.tag) else { return Ok(Some(completion)) };
        let restore = &mut self.open[index];
        restore.in_flight -= 1;
        restore.writing = false;
        completion.result.map_err(|e| format!("restore volume request failed: {e}"))?;
        if let (Some(expected), Payload::Read(buffers)) = (expected, completion.payload) {
            if buffers.to_vec() != expected {
                let got = buffers.to_vec();
                let bad: Vec<usize> = (0..expected.len() / BLOCK)
                    .filter(|b| got[b * BLOCK..(b + 1) * BLOCK] != expected[b * BLOCK..(b + 1) * BLOCK])
                    .map(|b| offset / BLOCK + b)
                    .collect();
                let zero = bad
                    .iter()
                    .filter(|b| got[(*b - offset / BLOCK) * BLOCK..][..BLOCK].iter().all(|x| *x == 0))
                    .count();
                let notes: Vec<String> = bad
                    .iter()
                    .map(|b| {
                        let actual = &got[(*b - offset / BLOCK) * BLOCK..][..BLOCK];
                        let same: Vec<u64> = images
                            .iter()
                            .filter(|(_, i)| &i[b * BLOCK..(b + 1) * BLOCK] == actual)
                            .map(|(g, _)| *g)
                            .collect();
                        format!("block {b} = images {same:?}")
                    })
                    .collect();
                return Err(format!("restore volume {} (generation {}, sequence {:?}) read {} bytes at {offset} wrong: blocks {bad:?} ({zero} zero) {notes:?} {}", restore.id, restore.generation, restore.sequence, expected.len(), volume_state));
            }
            READS_CHECKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if restore.sequence.is_some() {
                SEQUENCE_READS_CHECKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(None)
    }
}

/// A rollback in flight: the images before and after, and the model's records of its rewrites.
struct Rollback {
    handle: MarkerHandle,
    before: Vec<u8>,
    image: Vec<u8>,
    records: Vec<usize>,
}

struct Outstanding {
    record: usize,
}

fn run_seed(seed: u64, cycles: u64, durability: Durability, mode: JournalMode) -> Result<u64, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let media = Media::new(seed, mode);
    let options = FormatOptions {
        host_write_size: UNIT as u32,
        durability,
        journal_full_policy: policy_of(seed, mode),
        layout: layout_options(mode),
        copy_base_to_backup: false,
        journal_mode: mode,
        ..Default::default()
    };
    format(media.plain_channels(), &options, &mut |_| {}).map_err(|e| format!("format: {e}"))?;
    let zero = vec![0u8; (VOLUME_BLOCKS as usize) * BLOCK];
    let mut model = Model {
        checkpoint: zero.clone(),
        current: zero.clone(),
        writes: Vec::new(),
        durable_upto: 0,
        acked: 0,
        images: BTreeMap::from([(0, zero)]),
        log: Vec::new(),
    };
    let mut next_generation = 1u64;
    let mut cuts = 0u64;
    // Generations a maintenance in flight at the last cut would give up: gone or exact.
    let mut uncertain: Vec<u64> = Vec::new();
    // Generations a marker or rollback in flight at the last cut may have sealed.
    let mut unseen_seals = 0u64;
    for cycle in 0..cycles {
        let boot = seed.wrapping_mul(1_000_003).wrapping_add(cycle);
        // Sometimes the power fails during recovery too.
        if rng.random_bool(0.15) {
            let (channels, controllers) = media.fault_channels(boot ^ 0xABCD);
            let mut opening = Volume::begin_open(channels, volume_options(seed));
            let polls = rng.random_range(1..40);
            let mut opened = None;
            for _ in 0..polls {
                if let std::task::Poll::Ready(result) = opening.poll() {
                    opened = Some(result.map_err(|e| format!("cycle {cycle}: recovery failed: {e}"))?);
                    break;
                }
            }
            cut(&controllers);
            drop(opened);
            drop(opening);
            settle(&controllers);
            cuts += 1;
        }

        // Recover, then make everything durable so the media can be inspected directly.
        let (channels, controllers) = media.fault_channels(boot);
        let volume =
            Volume::open(channels, volume_options(seed)).map_err(|e| format!("cycle {cycle}: recovery failed: {e}"))?;
        let status = volume.status();
        if (next_generation..=next_generation + unseen_seals).contains(&status.open_generation) {
            // Seals of the last marker or rollback may be durable though their completion was
            // not seen.
            next_generation = status.open_generation;
        } else {
            return Err(format!(
                "cycle {cycle}: open generation {} after recovery, expected {next_generation}..={}",
                status.open_generation,
                next_generation + unseen_seals
            ));
        }
        unseen_seals = 0;
        model.images.retain(|g, _| *g < next_generation);
        volume.close().map_err(|e| format!("cycle {cycle}: close: {e}"))?;
        // Close flushed every device: the media now hold everything.
        assert!(controllers.iter().all(|c| c.unflushed_blocks() == 0), "close leaves nothing unflushed");
        drop(controllers);

        let base = media.base_image();
        let problems = model.violations(&base);
        if !problems.is_empty() {
            return Err(format!(
                "cycle {cycle}: acknowledged data lost or torn:\n  {}",
                problems[..problems.len().min(8)].join("\n  ")
            ));
        }
        let reader = VolumeReader::open(media.plain_channels()).map_err(|e| format!("cycle {cycle}: reader: {e}"))?;
        // Dedup across records: every shared pointer lands in a live record's or a retained
        // extent's units, and every retained extent is pointed at (nothing leaks).
        let verified = reader.verify().map_err(|e| format!("cycle {cycle}: verify: {e}"))?;
        if verified.retained_units > 0 {
            RETAINED_SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            RETAINED_UNITS.fetch_add(verified.retained_units, std::sync::atomic::Ordering::Relaxed);
        }
        for generation in uncertain.drain(..) {
            if reader.source(generation).is_none() {
                model.images.remove(&generation);
            }
        }
        for generation in model.images.keys() {
            if reader.source(*generation).is_none() {
                return Err(format!("cycle {cycle}: generation {generation} is no longer restorable"));
            }
        }
        // Every sealed generation, oldest and newest always, others sampled.
        let generations: Vec<u64> = model.images.keys().copied().collect();
        for (index, generation) in generations.iter().enumerate() {
            if index != 0 && index + 1 != generations.len() && !rng.random_bool(0.3) {
                continue;
            }
            let image =
                reader.read_image(*generation).map_err(|e| format!("cycle {cycle}: generation {generation}: {e}"))?;
            if image != model.images[generation] {
                let differing: Vec<usize> = image
                    .chunks(BLOCK)
                    .zip(model.images[generation].chunks(BLOCK))
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(i, _)| i)
                    .collect();
                let explain = |block: usize| {
                    let actual = &image[block * BLOCK..(block + 1) * BLOCK];
                    let mut notes = Vec::new();
                    for (g, other) in &model.images {
                        if &other[block * BLOCK..(block + 1) * BLOCK] == actual {
                            notes.push(format!("= image {g}"));
                        }
                    }
                    if &model.checkpoint[block * BLOCK..(block + 1) * BLOCK] == actual {
                        notes.push("= base now".into());
                    }
                    if actual.iter().all(|b| *b == 0) {
                        notes.push("zero".into());
                    }
                    for (g, other) in &model.images {
                        for (other_block, chunk) in other.chunks(BLOCK).enumerate() {
                            if chunk == actual && other_block != block {
                                notes.push(format!("= image {g} block {other_block}"));
                            }
                        }
                    }
                    let expected = &model.images[generation][block * BLOCK..(block + 1) * BLOCK];
                    for (g, other) in &model.images {
                        if &other[block * BLOCK..(block + 1) * BLOCK] == expected {
                            notes.push(format!("(expected value is image {g}'s)"));
                        }
                    }
                    format!("block {block} (unit {}): {}", block / BLOCKS_PER_UNIT as usize, notes.join(" "))
                };
                let sample: Vec<String> =
                    differing.iter().step_by(BLOCKS_PER_UNIT as usize).take(6).map(|b| explain(*b)).collect();
                eprintln!("DESCRIBE {}", serde_json::to_string(&reader.describe()).unwrap_or_default());
                if let Some(block) = differing.first() {
                    let actual = &image[block * BLOCK..(block + 1) * BLOCK];
                    for (index, device) in media.devices.iter().enumerate() {
                        let bytes = device.snapshot();
                        for (offset, chunk) in bytes.chunks(BLOCK).enumerate() {
                            if chunk == actual {
                                eprintln!("FOUND on device {index} at block {offset} (byte {})", offset * BLOCK);
                            }
                        }
                    }
                    let expected = &model.images[generation][block * BLOCK..(block + 1) * BLOCK];
                    for (index, device) in media.devices.iter().enumerate() {
                        let bytes = device.snapshot();
                        for (offset, chunk) in bytes.chunks(BLOCK).enumerate() {
                            if chunk == expected {
                                eprintln!("EXPECTED on device {index} at block {offset} (byte {})", offset * BLOCK);
                            }
                        }
                    }
                }
                return Err(format!(
                    "cycle {cycle}: sealed generation {generation} ({:?}) differs from its marker's image in {} blocks (backup generation {}):\n  {}",
                    reader.source(*generation),
                    differing.len(),
                    reader.backup_generation(),
                    sample.join("\n  ")
                ));
            }
        }
        let targets = if mode == JournalMode::All {
            check_sequences(&mut rng, &reader, &model).map_err(|e| format!("cycle {cycle}: {e}"))?
        } else {
            Vec::new()
        };
        drop(reader);
        model.checkpoint = base.clone();
        model.current = base;
        model.writes.clear();
        model.durable_upto = 0;
        model.acked = 0;

        // Workload until the cut.
        let (channels, controllers) = media.fault_channels(boot ^ 0x5EED);
        let mut volume =
            Volume::open(channels, volume_options(seed)).map_err(|e| format!("cycle {cycle}: reopen: {e}"))?;
        let steps = rng.random_range(1..400);
        let mut outstanding: BTreeMap<u64, Outstanding> = BTreeMap::new();
        let mut flushes: BTreeMap<u64, u64> = BTreeMap::new();
        let mut marker: Option<(MarkerHandle, Vec<u8>)> = None;
        let mut maintenance: Option<(MaintenanceHandle, Vec<u64>)> = None;
        // A compression or decompression gives up no generation: every image stays exact
        // whether it commits before the cut or not.
        let mut compression: Option<(chronicle::engine::CompressHandle, bool)> = None;
        let mut rollback: Option<Rollback> = None;
        let mut restores = Restores { targets, ..Restores::default() };
        let mut next_tag = 0u64;
        let mut completions = Vec::new();
        // Steps left of a pause of the host (no new requests), long enough now and then for
        // the volume's idle work to start.
        let mut pause = 0u32;
        for _ in 0..steps {
            // Restore volumes: open one now and then, read and write them beside everything.
            restores.step(&mut rng, &mut volume, &model, &uncertain, &mut next_tag);
            if pause > 0 {
                pause -= 1;
            } else if rng.random_bool(0.005) {
                pause = rng.random_range(48..=112);
            }
            if pause == 0 && marker.is_none() && rollback.is_none() && outstanding.len() < QUEUE_DEPTH {
                let mut choice = rng.random_range(0..100);
                if mode == JournalMode::All && choice < 70 {
                    // "All" mode fills the journal with every write: with too little room for
                    // the writes in flight, mark a generation instead so the sort frees it.
                    let status = volume.status();
                    if status.journal_capacity_elements - status.journal_used_elements < 3 * QUEUE_DEPTH as u64 + 4 {
                        choice = 76;
                    }
                }
                if choice < 70 {
                    // A write: whole units or a partial range (read-modify-write).
                    let (offset, blocks) = if rng.random_bool(0.6) {
                        let units = rng.random_range(1..=3u64);
                        let first = rng.random_range(0..=UNITS - units);
                        (first * BLOCKS_PER_UNIT, units * BLOCKS_PER_UNIT)
                    } else {
                        let blocks = rng.random_range(1..=12u64);
                        (rng.random_range(0..=VOLUME_BLOCKS - blocks), blocks)
                    };
                    let mut data = vec![0u8; blocks as usize * BLOCK];
                    if offset % BLOCKS_PER_UNIT == 0 && blocks % BLOCKS_PER_UNIT == 0 && rng.random_bool(0.4) {
                        // Contents many blocks share, so that merges deduplicate.
                        for unit in data.chunks_mut(UNIT) {
                            unit.copy_from_slice(&DEDUP_POOL[rng.random_range(0..DEDUP_POOL.len())]);
                        }
                    } else {
                        rng.fill_bytes(&mut data);
                    }
                    let at = offset as usize * BLOCK;
                    model.current[at..at + data.len()].copy_from_slice(&data);
                    // The engine writes whole units: record what they hold after this write.
                    let first_unit = offset / BLOCKS_PER_UNIT;
                    let end_unit = (offset + blocks).div_ceil(BLOCKS_PER_UNIT);
                    let unit_range = first_unit as usize * UNIT..end_unit as usize * UNIT;
                    model.writes.push(WriteRecord {
                        first_block: first_unit * BLOCKS_PER_UNIT,
                        data: model.current[unit_range].to_vec(),
                        acked: None,
                        sequence: volume.next_sequence(),
                    });
                    let tag = next_tag;
                    next_tag += 1;
                    outstanding.insert(tag, Outstanding { record: model.writes.len() - 1 });
                    volume.submit(
                        tag,
                        HostRequest::Write {
                            offset_blocks: offset,
                            buffers: Arc::new(IoBuffers::single(DmaBuf::copy_from(&data))),
                        },
                    );
                } else if choice < 76 {
                    let tag = next_tag;
                    next_tag += 1;
                    flushes.insert(tag, model.acked);
                    volume.submit(tag, HostRequest::Flush);
                } else if choice < 77 && next_generation < MAX_GENERATIONS {
                    // Writes submitted so far belong to the generation; none are submitted
                    // until the marker completes.
                    marker = Some((volume.mark(&format!("s{seed} c{cycle}")), model.current.clone()));
                } else if choice < 78 && next_generation + 2 < MAX_GENERATIONS {
                    // Roll back to a generation the model knows exactly.
                    let targets: Vec<u64> = model
                        .images
                        .keys()
                        .copied()
                        .filter(|g| !uncertain.contains(g) && volume.check_rollback(*g).is_ok())
                        .collect();
                    if !targets.is_empty() {
                        let target = targets[rng.random_range(0..targets.len())];
                        let image = model.images[&target].clone();
                        // The rollback's writes carry its barrier's sequence.
                        let barrier = volume.next_sequence();
                        // Every unit that changes is rewritten by the rollback, unacknowledged
                        // until it ends.
                        let mut records = Vec::new();
                        for unit in 0..UNITS as usize {
                            let range = unit * UNIT..(unit + 1) * UNIT;
                            if model.current[range.clone()] != image[range.clone()] {
                                model.writes.push(WriteRecord {
                                    first_block: unit as u64 * BLOCKS_PER_UNIT,
                                    data: image[range].to_vec(),
                                    acked: None,
                                    sequence: barrier,
                                });
                                records.push(model.writes.len() - 1);
                            }
                        }
                        let before = std::mem::replace(&mut model.current, image.clone());
                        rollback = Some(Rollback {
                            handle: volume.rollback(target, &format!("s{seed} c{cycle} back to {target}")),
                            before,
                            image,
                            records,
                        });
                    }
                } else if choice < 83 && maintenance.is_none() {
                    // Merge two adjacent history records, or give up one generation.
                    let records: Vec<(u64, u64)> = volume
                        .status()
                        .generations
                        .iter()
                        .filter(|g| g.state == "history" || g.state == "merged")
                        .map(|g| (g.generation, g.through_generation))
                        .collect();
                    if records.len() >= 2 && rng.random_bool(0.5) {
                        let i = rng.random_range(0..records.len() - 1);
                        let (from, through) = (records[i].0, records[i + 1].1);
                        maintenance = Some((volume.merge(from, through), (from + 1..=through).collect()));
                    } else if !records.is_empty() {
                        let i = rng.random_range(0..records.len());
                        let gone: Vec<u64> = if i == 0 {
                            (records[0].0..=records[0].1).collect()
                        } else {
                            (records[i - 1].0 + 1..=records[i].1).collect()
                        };
                        maintenance = Some((volume.delete_generation(records[i].0), gone));
                    }
                } else if choice < 83 && compression.is_none() {
                    // Compress a record, or decompress a compressed one.
                    let records: Vec<(u64, bool)> = volume
                        .status()
                        .generations
                        .iter()
                        .filter(|g| g.state == "history" || g.state == "merged")
                        .map(|g| (g.generation, g.compressed))
                        .collect();
                    if !records.is_empty() {
                        let (generation, compressed) = records[rng.random_range(0..records.len())];
                        let handle = if compressed {
                            volume.decompress_generation(generation)
                        } else {
                            volume.compress_generation(generation)
                        };
                        compression = Some((handle, !compressed));
                    }
                }
            }
            volume.poll(&mut completions);
            for completion in completions.drain(..) {
                let state = format!(
                    "{:?}",
                    volume.status().generations.iter().map(|g| (g.generation, g.state)).collect::<Vec<_>>()
                );
                let Some(completion) =
                    restores.complete(completion, &model.images, state).map_err(|e| format!("cycle {cycle}: {e}"))?
                else {
                    continue;
                };
                if let Some(covers) = flushes.remove(&completion.tag) {
                    completion.result.map_err(|e| format!("cycle {cycle}: flush failed: {e}"))?;
                    model.durable_upto = model.durable_upto.max(covers);
                    continue;
                }
                let write = outstanding.remove(&completion.tag).expect("a write completion");
                completion.result.map_err(|e| format!("cycle {cycle}: write failed: {e}"))?;
                model.acked += 1;
                model.writes[write.record].acked = Some(model.acked);
            }
            if durability == Durability::WriteThrough {
                model.durable_upto = model.acked;
            }
            if let Some((handle, _)) = &maintenance {
                if let Some(result) = handle.result() {
                    let (_, gone) = maintenance.take().expect("checked");
                    match result {
                        Ok(report) => {
                            MAINTENANCE_DONE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            DEDUP_SHARED.fetch_add(report.dedup_shared, std::sync::atomic::Ordering::Relaxed);
                            DEDUP_MISMATCHES.fetch_add(report.dedup_mismatches, std::sync::atomic::Ordering::Relaxed);
                            DEDUP_ACROSS.fetch_add(report.dedup_shared_across, std::sync::atomic::Ordering::Relaxed);
                            DEDUP_DECLINED
                                .fetch_add(report.dedup_declined_scattered, std::sync::atomic::Ordering::Relaxed);
                            for generation in gone {
                                model.images.remove(&generation);
                            }
                        }
                        Err(MaintenanceError::NoSpace(_)) => {}
                        // Refused: it would give up a generation a restore volume shows.
                        Err(MaintenanceError::Invalid(why)) if why.contains("restore volume") => {}
                        Err(error) => return Err(format!("cycle {cycle}: history maintenance failed: {error}")),
                    }
                }
            }
            if let Some(result) = compression.as_ref().and_then(|(handle, _)| handle.result()) {
                let (_, compress) = compression.take().expect("checked");
                match result {
                    Ok(report) if compress && report.compressed => {
                        COMPRESSIONS_DONE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        COMPRESSED_SHARING
                            .fetch_add(u64::from(report.shared_across > 0), std::sync::atomic::Ordering::Relaxed);
                        COMPRESSION_RETAINED
                            .fetch_add(report.retained_for_others, std::sync::atomic::Ordering::Relaxed);
                        if mode == JournalMode::All {
                            COMPRESSIONS_ALL_MODE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(_) if !compress => {
                        DECOMPRESSIONS_DONE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) | Err(chronicle::engine::MaintenanceError::NoSpace(_)) => {}
                    // A merge or deletion queued before it changed the record.
                    Err(chronicle::engine::MaintenanceError::Invalid(why))
                        if why.contains("no history record") || why.contains("compressed") => {}
                    Err(error) => return Err(format!("cycle {cycle}: compression failed: {error}")),
                }
            }
            if let Some(result) = rollback.as_ref().and_then(|r| r.handle.result()) {
                let done = rollback.take().expect("checked");
                match result {
                    Ok(generation) => {
                        if generation != next_generation + 1 {
                            return Err(format!(
                                "cycle {cycle}: rollback sealed {generation}, expected {}",
                                next_generation + 1
                            ));
                        }
                        ROLLBACKS_DONE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        model.images.insert(next_generation, done.before);
                        model.images.insert(generation, done.image);
                        for record in done.records {
                            model.acked += 1;
                            model.writes[record].acked = Some(model.acked);
                        }
                        model.durable_upto = model.acked;
                        next_generation = generation + 1;
                    }
                    // Refused (no journal room, or the target was merged away meanwhile): at
                    // most the undo point was sealed, nothing was rewritten.
                    Err(error)
                        if matches!(&error, MaintenanceError::NoSpace(_) | MaintenanceError::Busy(_))
                            || matches!(&error, MaintenanceError::Invalid(why) if why.contains("merged") || why.contains("not held")) =>
                    {
                        let open = volume.status().open_generation;
                        if open == next_generation + 1 {
                            model.images.insert(next_generation, done.before.clone());
                            model.durable_upto = model.acked;
                            next_generation = open;
                        }
                        model.current = done.before;
                        for record in done.records {
                            model.writes[record].data =
                                model.current[model.writes[record].first_block as usize * BLOCK..][..UNIT].to_vec();
                        }
                    }
                    Err(error) => return Err(format!("cycle {cycle}: rollback failed: {error}")),
                }
            }
            if let Some((handle, _)) = &marker {
                if let Some(result) = handle.result() {
                    let (_, image) = marker.take().expect("checked");
                    match result {
                        Ok(generation) => {
                            if generation != next_generation {
                                return Err(format!(
                                    "cycle {cycle}: marker sealed {generation}, expected {next_generation}"
                                ));
                            }
                            model.images.insert(generation, image);
                            next_generation += 1;
                            model.durable_upto = model.acked;
                        }
                        Err(MaintenanceError::Busy(_)) => {}
                        Err(error) => return Err(format!("cycle {cycle}: marker failed: {error}")),
                    }
                }
            }
        }
        // A marker in flight at the cut may or may not have sealed: the next recovery says.
        if let Some((_, image)) = marker {
            model.images.insert(next_generation, image);
            unseen_seals = 1;
        }
        if let Some(pending) = rollback {
            model.images.insert(next_generation, pending.before);
            model.images.insert(next_generation + 1, pending.image);
            unseen_seals = 2;
        }
        // A maintenance in flight may or may not have committed.
        if let Some((_, gone)) = maintenance {
            uncertain = gone;
        }
        let status = volume.status();
        MARKER_CHECKSUMS.fetch_add(status.control.marker_checksum_reads, std::sync::atomic::Ordering::Relaxed);
        IDLE_CHECKSUMS.fetch_add(status.control.idle_checksum_reads, std::sync::atomic::Ordering::Relaxed);
        PENDING_CUTS.fetch_add(u64::from(status.checksums_pending > 0), std::sync::atomic::Ordering::Relaxed);
        REWRITES_IN_PLACE.fetch_add(status.host.rewrites_in_place, std::sync::atomic::Ordering::Relaxed);
        if let Some(bitmap) = &status.bitmap {
            BITMAP_WRITES.fetch_add(bitmap.bitmap_writes, std::sync::atomic::Ordering::Relaxed);
            BITMAP_RESYNCED.fetch_add(bitmap.bitmap_resynced_blocks, std::sync::atomic::Ordering::Relaxed);
            if status.bitmap_tracked_blocks > 0 {
                BITMAP_CUTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        cut(&controllers);
        drop(volume);
        settle(&controllers);
        cuts += 1;
        // The cycle's writes, certain if durable at the cut.
        for write in &model.writes {
            model.log.push(LoggedWrite {
                sequence: write.sequence,
                first_block: write.first_block,
                data: write.data.clone(),
                certain: write.acked.is_some_and(|a| a <= model.durable_upto),
            });
        }
    }
    Ok(cuts)
}

/// "All" mode: any-point targets after a recovery — every generation's cut and a sample of
/// sequences — restore what the writes up to them allow, on top of the model's image of the
/// generation cut before them; a refused target must be one the volume no longer (or never)
/// keeps versions for. Returns the targets checked in sealed or sorted generations (not the
/// open one), with their images, for R-VOLs.
fn check_sequences(rng: &mut ChaCha8Rng, reader: &VolumeReader, model: &Model) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let generations = reader.generations();
    let newest = reader.next_sequence();
    let newest_cut = generations.iter().filter(|g| g.state != "open").map(|g| g.last_sequence).max().unwrap_or(0);
    let mut checked = Vec::new();
    let cuts: Vec<u64> = generations.iter().filter(|g| g.state != "open").map(|g| g.last_sequence).collect();
    let mut targets = cuts.clone();
    targets.extend((0..8).map(|_| rng.random_range(0..newest)));
    // Between the cuts: where R-VOLs read versions.
    targets.extend((0..4).map(|_| rng.random_range(0..=newest_cut)));
    targets.push(newest - 1);
    for sequence in targets {
        let cut = generations
            .iter()
            .filter(|g| g.state != "open" && g.last_sequence <= sequence)
            .max_by_key(|g| g.generation);
        let image = match (reader.read_sequence(sequence), cut) {
            (Ok(image), Some(_)) => image,
            (Ok(_), None) => return Err(format!("sequence {sequence} restored though no generation is cut before it")),
            // Older than every generation kept (the oldest were deleted).
            (Err(chronicle::engine::EngineError::TargetUnavailable { .. }), None) => {
                SEQUENCES_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            (Err(chronicle::engine::EngineError::TargetUnavailable { why, .. }), Some(cut)) => {
                // Only a target over an image given up (merged away or deleted), or past a
                // generation merged away (its cut is no longer listed), may be refused: the
                // versions of every generation over a kept image are kept.
                let merged_away = !generations.iter().any(|g| g.generation == cut.generation + 1);
                let gone = !model.images.contains_key(&cut.generation);
                if sequence == cut.last_sequence && !gone {
                    return Err(format!("sequence {sequence} (generation {}'s cut) refused: {why}", cut.generation));
                }
                if !(merged_away || gone) {
                    return Err(format!("sequence {sequence} refused: {why}"));
                }
                SEQUENCES_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            (Err(error), _) => return Err(format!("sequence {sequence}: {error}")),
        };
        let cut = cut.expect("restored only with a cut");
        let Some(floor) = model.images.get(&cut.generation) else {
            return Err(format!("sequence {sequence} restored though generation {} is gone", cut.generation));
        };
        let bad = model.sequence_violations(floor, cut.last_sequence, sequence, &image);
        if !bad.is_empty() {
            return Err(format!(
                "the image at sequence {sequence} (after generation {} cut at {}) holds values no write allows in device blocks {:?}",
                cut.generation,
                cut.last_sequence,
                &bad[..bad.len().min(8)]
            ));
        }
        SEQUENCES_CHECKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if sequence <= newest_cut && !cuts.contains(&sequence) {
            checked.push((sequence, image));
        }
    }
    Ok(checked)
}

fn run(durability: Durability, mode: JournalMode, seeds: u64, first_seed: u64) -> u64 {
    let cycles = env_or("CHRONICLE_SIM_CYCLES", 50);
    let mut total = 0;
    for seed in first_seed..first_seed + seeds {
        match run_seed(seed, cycles, durability, mode) {
            Ok(cuts) => total += cuts,
            Err(error) => {
                panic!("simulation seed {seed} ({durability:?}, {mode:?}) failed: {error}\nrerun: CHRONICLE_SIM_SEED={seed}")
            }
        }
    }
    total
}

#[test]
fn power_cuts_lose_no_acknowledged_write_and_keep_generations_exact() {
    if let Ok(seed) = std::env::var("CHRONICLE_SIM_SEED") {
        let seed: u64 = seed.parse().expect("CHRONICLE_SIM_SEED is a number");
        // The seed says the run it came from: below 1,000,000 flush, then write-through;
        // from 2,000,000 the "all" journal mode, flush, then (from 3,000,000) write-through.
        let mode = if seed >= 2_000_000 { JournalMode::All } else { JournalMode::Latest };
        let durability = match seed {
            1_000_000..2_000_000 | 3_000_000.. => Durability::WriteThrough,
            _ => Durability::Flush,
        };
        run_seed(seed, env_or("CHRONICLE_SIM_CYCLES", 50), durability, mode).unwrap();
        return;
    }
    let seeds = env_or("CHRONICLE_SIM_SEEDS", 200);
    let flush = run(Durability::Flush, JournalMode::Latest, seeds * 4 / 5, 0);
    let write_through = run(Durability::WriteThrough, JournalMode::Latest, seeds - seeds * 4 / 5, 1_000_000);
    let all_seeds = (seeds / 10).max(2);
    let all = run(Durability::Flush, JournalMode::All, all_seeds - all_seeds / 2, 2_000_000)
        + run(Durability::WriteThrough, JournalMode::All, all_seeds / 2, 3_000_000);
    let total = flush + write_through + all;
    let maintenance = MAINTENANCE_DONE.load(std::sync::atomic::Ordering::Relaxed);
    let rollbacks = ROLLBACKS_DONE.load(std::sync::atomic::Ordering::Relaxed);
    let reads = READS_CHECKED.load(std::sync::atomic::Ordering::Relaxed);
    let shared = DEDUP_SHARED.load(std::sync::atomic::Ordering::Relaxed);
    let mismatches = DEDUP_MISMATCHES.load(std::sync::atomic::Ordering::Relaxed);
    let sequences = SEQUENCES_CHECKED.load(std::sync::atomic::Ordering::Relaxed);
    let refused = SEQUENCES_REFUSED.load(std::sync::atomic::Ordering::Relaxed);
    let sequence_reads = SEQUENCE_READS_CHECKED.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "\"all\" journal mode: {all} power cuts, {sequences} any-point targets restored as the writes allow, {refused} refused (over images given up), {sequence_reads} reads of restore volumes at a sequence checked"
    );
    assert!(sequences > 0, "any-point targets were checked");
    assert!(sequence_reads > 0, "restore volumes at a sequence were read");
    let compressions = COMPRESSIONS_DONE.load(std::sync::atomic::Ordering::Relaxed);
    let decompressions = DECOMPRESSIONS_DONE.load(std::sync::atomic::Ordering::Relaxed);
    let compressed_sharing = COMPRESSED_SHARING.load(std::sync::atomic::Ordering::Relaxed);
    let compression_retained = COMPRESSION_RETAINED.load(std::sync::atomic::Ordering::Relaxed);
    let compressions_all = COMPRESSIONS_ALL_MODE.load(std::sync::atomic::Ordering::Relaxed);
    let bitmap_writes = BITMAP_WRITES.load(std::sync::atomic::Ordering::Relaxed);
    let bitmap_resynced = BITMAP_RESYNCED.load(std::sync::atomic::Ordering::Relaxed);
    let bitmap_cuts = BITMAP_CUTS.load(std::sync::atomic::Ordering::Relaxed);
    let marker_checksums = MARKER_CHECKSUMS.load(std::sync::atomic::Ordering::Relaxed);
    let idle_checksums = IDLE_CHECKSUMS.load(std::sync::atomic::Ordering::Relaxed);
    let pending_cuts = PENDING_CUTS.load(std::sync::atomic::Ordering::Relaxed);
    let rewrites_in_place = REWRITES_IN_PLACE.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "deferred checksums: {marker_checksums} rewritten elements checksummed by markers, {idle_checksums} while idle, {pending_cuts} cuts with some pending; {rewrites_in_place} whole-unit rewrites took the short way"
    );
    assert!(rewrites_in_place > 0, "the short way of whole-unit rewrites was exercised");
    let across = DEDUP_ACROSS.load(std::sync::atomic::Ordering::Relaxed);
    let declined = DEDUP_DECLINED.load(std::sync::atomic::Ordering::Relaxed);
    let retained_seen = RETAINED_SEEN.load(std::sync::atomic::Ordering::Relaxed);
    let retained_units = RETAINED_UNITS.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{total} power cuts ({flush} in flush mode, {write_through} in write-through mode), {maintenance} merges and deletions ({shared} elements shared by dedup, {across} of them with another record, {declined} matches declined as scattered, {mismatches} hash collisions told apart by the byte compare; {retained_seen} recoveries found units retained for other records, {retained_units} units in all), {compressions} records compressed ({compressions_all} on \"all\" mode volumes, {compressed_sharing} pointing at other records' units, {compression_retained} units retained for other records by compressions) and {decompressions} decompressed, {rollbacks} rollbacks, {reads} restore volume reads checked, {bitmap_writes} base-only writes (journal-full policy bitmap-only), {bitmap_resynced} blocks resynced into the journal, {bitmap_cuts} cuts with blocks tracked by the bitmap only, no invariant violated"
    );
    if seeds >= 3 {
        assert!(bitmap_writes > 0 && bitmap_resynced > 0, "the bitmap-only mode engaged and switched back");
    }
    assert!(compressions > 0 && decompressions > 0, "records were compressed and decompressed");
    if seeds >= 20 {
        assert!(compressions_all > 0, "records of \"all\" mode volumes were compressed");
    }
    assert!(shared > 0 && mismatches > 0, "merges deduplicated and met collisions");
    assert!(across > 0, "merges shared elements across records");
    if seeds >= 8 {
        assert!(declined > 0, "merges declined scattered matches (the seeds sharing runs only)");
    }
    assert!(retained_seen > 0, "deletions kept units other records point at");
    if seeds >= 5 {
        assert!(
            marker_checksums > 0 && idle_checksums > 0 && pending_cuts > 0,
            "checksums were deferred both ways and cut"
        );
    }
    assert!(reads > 0, "restore volumes were read");
    assert!(maintenance > 0, "history maintenance ran");
    assert!(rollbacks > 0, "rollbacks ran");
    assert!(total >= seeds * env_or("CHRONICLE_SIM_CYCLES", 50), "every cycle cuts power at least once");
}
