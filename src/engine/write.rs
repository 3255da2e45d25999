//! The host I/O path (seed 001 FIG 8, ARCHITECTURE §5) as explicit state machines.
//!
//! A host write:
//! 1. is widened to whole host-write-size units (read-modify-write of the partial head and
//!    tail units, default mode) or refused (strict mode);
//! 2. waits while it overlaps an earlier write in flight, so base and journal see overlapping
//!    writes in the same order;
//! 3. takes the unit's journal segment in the open generation (FIG 8 S8003/S8004: bit already
//!    set → rewrite in place) or appends a new one (S8005) and its index entry;
//! 4. submits the same buffers to the journal at once, and to the base once the index entries
//!    of its new units are durable (group commit: one FUA page write covers every write that
//!    allocated meanwhile) — so the base never holds data the journal cannot find;
//! 5. is acknowledged when base and journal writes complete (with FUA in write-through mode).
//!
//! The common case — one whole unit the open generation already lists (FIG 8 S8003/S8004: a
//! rewrite in place), nothing overlapping it — takes a shorter way with the same steps:
//! [`Rewrite`], one small record instead of a [`HostWrite`], no widening, no allocation, and
//! the host's buffers carried by the two device writes alone.
//!
//! Reads go to the base. Flushes flush base and journal. Unmap and write-zeroes are journaled
//! as writes of zeroes, in chunks of at most 1 MiB.
//!
//! With the journal-full policy bitmap-only, a write the journal has no room for (or one
//! touching a block already tracked that way) goes to the base only, its bits durable first
//! (`base_only.rs`, FIG 36).

mod base_only;

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use slab::Slab;

use crate::core::checksum::{crc32c, crc32c_append};
use crate::core::format::superblock::{Durability, JournalFullPolicy, JournalMode};
use crate::core::geometry::{div_size, rem_size, Widening};
use crate::device::{Completion, IoBuffers, IoError, Operation, Payload, SharedBuffers, Tag};

use super::io::{HostOwner, IoHub, Role};
use super::meta::{PageState, Version};
use super::volume::{HostCompletion, HostError, HostRequest, Shared, INTERNAL_TAG};

/// Who an in-flight device operation of the hot path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostRef {
    WriteHead(u32),
    WriteTail(u32),
    WriteData(u32),
    /// Either device write of a whole-unit rewrite in place ([`Rewrite`]).
    Rewrite(u32),
    Read(u32),
    Flush(u32),
    Commit,
    /// A group commit of open-bitmap pages (policy bitmap-only).
    BitmapCommit,
}

impl HostOwner for HostRef {
    /// The variant in bits 32..35, the id in bits 0..32.
    fn to_bits(self) -> u64 {
        let (variant, id) = match self {
            HostRef::WriteHead(id) => (0, id),
            HostRef::WriteTail(id) => (1, id),
            HostRef::WriteData(id) => (2, id),
            HostRef::Read(id) => (3, id),
            HostRef::Flush(id) => (4, id),
            HostRef::Commit => (5, 0),
            HostRef::BitmapCommit => (6, 0),
            HostRef::Rewrite(id) => (7, id),
        };
        (variant << 32) | u64::from(id)
    }

    fn from_bits(bits: u64) -> Self {
        let id = bits as u32;
        match bits >> 32 {
            0 => HostRef::WriteHead(id),
            1 => HostRef::WriteTail(id),
            2 => HostRef::WriteData(id),
            3 => HostRef::Read(id),
            4 => HostRef::Flush(id),
            5 => HostRef::Commit,
            6 => HostRef::BitmapCommit,
            7 => HostRef::Rewrite(id),
            other => unreachable!("no host reference has variant {other}"),
        }
    }
}

/// Zero-filled host data of unmap and write-zeroes is written in chunks of this size.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;
/// Chunks of one unmap or write-zeroes in flight at once.
const ZERO_CHUNKS_IN_FLIGHT: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    /// Waiting for an earlier overlapping write.
    Blocked,
    /// Reading the partial head/tail units.
    Reading,
    /// Waiting for journal space (journal-full policy "block").
    WaitingSpace,
    /// Journal data submitted; the base waits for the index entries to be durable.
    WaitingIndex,
    /// Base-only write (policy bitmap-only): the base waits for its bitmap bits to be durable.
    WaitingBitmap,
    /// Base and journal writes in flight.
    Writing,
}

struct HostWrite {
    tag: Tag,
    /// Submission order: a marker includes exactly the writes submitted before it.
    seq: u64,
    parent: Option<u32>,
    offset_blocks: u64,
    widening: Widening,
    host: SharedBuffers,
    /// The whole units written: the merged buffer of a read-modify-write, `None` for a
    /// whole-unit write, whose units are `host` itself ([`HostWrite::data`]). No clone of
    /// `host` is kept: each clone or drop is an atomic operation, and one right after a
    /// submission that copied data (malloc bdevs copy while submitting) waits for the copy's
    /// stores to drain.
    data: Option<SharedBuffers>,
    /// The base write's reference to the data, taken together with the journal write's before
    /// the journal write is submitted (see `data`).
    base_data: Option<SharedBuffers>,
    /// The units' old contents around a partial write (read-modify-write only: boxed, so the
    /// usual whole-unit write moves a smaller record through the slab).
    head: Option<Box<IoBuffers>>,
    tail: Option<Box<IoBuffers>>,
    state: WriteState,
    pending: u32,
    /// Index entries (of the open generation) that must be durable before the base write.
    needed_entries: usize,
    /// Bitmap sets that must be durable before the base write (base-only writes).
    needed_bitmap_sets: u64,
    base_submitted: bool,
    error: Option<HostError>,
}

impl HostWrite {
    /// The whole units this write puts in the journal and the base.
    fn data(&self) -> &SharedBuffers {
        self.data.as_ref().unwrap_or(&self.host)
    }
}

/// A host write of one whole unit the open generation already lists, in flight: its journal
/// element is rewritten in place and the base written at once (no index entry to wait for).
/// Its state is what the two completions need, in less than a cache line: a write's state is
/// read back a queue depth of writes later, and every line of it costs the write path
/// measurably (BENCHMARKS, session "footprint"); a [`HostWrite`] is three.
struct Rewrite {
    tag: Tag,
    unit: u64,
    /// The host's buffers as the first completion gave them back (the two device writes hold
    /// the only references in flight: no third one is cloned and dropped per write).
    buffers: Option<SharedBuffers>,
    error: Option<Box<IoError>>,
    /// Device writes not completed (2, then 1).
    pending: u8,
}

/// An unmap or write-zeroes, split into chunk writes.
struct ZeroRequest {
    tag: Tag,
    seq: u64,
    next_block: u64,
    end_block: u64,
    in_flight: usize,
    error: Option<HostError>,
}

struct HostFlush {
    tag: Tag,
    pending: u32,
    error: Option<HostError>,
}

struct Commit {
    upto: usize,
    pending: u32,
    pages: Vec<(usize, u8, u64)>,
    error: Option<IoError>,
}

/// Counters of the hot path (part of the volume's status).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HotCounters {
    pub host_reads: u64,
    pub host_writes: u64,
    pub host_flushes: u64,
    pub host_bytes_written: u64,
    pub host_bytes_read: u64,
    pub read_modify_writes: u64,
    /// Whole-unit rewrites in place that took the short way ([`Rewrite`]).
    pub rewrites_in_place: u64,
    pub overlap_waits: u64,
    pub index_commits: u64,
    pub index_pages_written: u64,
    pub journal_bounce_copies: u64,
    pub journal_full_waits: u64,
    pub write_errors: u64,
}

pub(crate) struct HotPath {
    writes: Slab<HostWrite>,
    rewrites: Slab<Rewrite>,
    reads: Slab<Tag>,
    flushes: Slab<HostFlush>,
    zeroes: Slab<ZeroRequest>,
    /// Requests not started yet, in arrival order, with their submission sequence.
    queue: VecDeque<(Tag, HostRequest, u64)>,
    /// The volume's own writes (a rollback's), started before the host's and never held.
    internal: VecDeque<(Tag, HostRequest, u64)>,
    /// Sequence the next submitted request gets ("all" mode stores it with each version; it
    /// continues where the previous open ended).
    pub(crate) next_seq: u64,
    /// Writes waiting for an overlapping earlier write, in arrival order.
    blocked: VecDeque<usize>,
    waiting_space: VecDeque<usize>,
    waiting_index: Vec<usize>,
    /// Units held by a general write (its slab key) or the resync: a [`Rewrite`] holds its
    /// unit by a lock bit in the open generation's `entry_of` instead (no hash map per write).
    locked_units: FxHashMap<u64, usize>,
    commit: Option<Commit>,
    /// Writes holding unit locks (started, not finished): what a marker drains.
    pub(crate) writes_in_flight: usize,
    pub(crate) completed: Vec<HostCompletion>,
    pub(crate) counters: HotCounters,
    zero_chunk: Option<SharedBuffers>,
    scratch_segments: Vec<u64>,
    scratch_journal_writes: Vec<(u64, SharedBuffers)>,
    /// Polls in a row that found no host operation outstanding and none submitted since the
    /// poll before ([`HotPath::note_poll`]).
    quiet_polls: u32,
    /// `next_seq` at the last poll.
    seq_at_poll: u64,
}

impl HotPath {
    pub(crate) fn new(first_sequence: u64) -> Self {
        HotPath {
            writes: Slab::new(),
            rewrites: Slab::new(),
            reads: Slab::new(),
            flushes: Slab::new(),
            zeroes: Slab::new(),
            queue: VecDeque::new(),
            internal: VecDeque::new(),
            next_seq: first_sequence,
            blocked: VecDeque::new(),
            waiting_space: VecDeque::new(),
            waiting_index: Vec::new(),
            locked_units: FxHashMap::default(),
            commit: None,
            writes_in_flight: 0,
            completed: Vec::new(),
            counters: HotCounters::default(),
            zero_chunk: None,
            scratch_segments: Vec::new(),
            scratch_journal_writes: Vec::new(),
            quiet_polls: 0,
            seq_at_poll: first_sequence,
        }
    }

    /// Queues one of the volume's own writes, with submission sequence `seq` (below the hold
    /// that keeps the host's writes waiting meanwhile).
    pub(crate) fn enqueue_internal(&mut self, tag: Tag, request: HostRequest, seq: u64) {
        self.internal.push_back((tag, request, seq));
    }

    /// Sequence the next submitted request will get: a marker requested now includes every
    /// request below it.
    /// A submission sequence number of its own for a marker's or rollback's hold: requests
    /// submitted before it are before the barrier, the ones after it after. Taking one (not
    /// peeking) keeps two holds called with no request between them apart.
    pub(crate) fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Writes submitted before `barrier` that have not finished (queued, blocked or started).
    pub(crate) fn writes_before(&self, barrier: u64) -> bool {
        let is_write = |r: &HostRequest| {
            matches!(r, HostRequest::Write { .. } | HostRequest::Unmap { .. } | HostRequest::WriteZeroes { .. })
        };
        self.writes_in_flight > 0
            || self.queue.iter().any(|(_, r, seq)| *seq < barrier && is_write(r))
            || self.blocked.iter().any(|id| self.writes[*id].seq < barrier)
            || self.zeroes.iter().any(|(_, z)| z.seq < barrier)
    }

    /// Host operations started and not completed, plus queued ones.
    pub(crate) fn outstanding(&self) -> usize {
        self.writes.len()
            + self.rewrites.len()
            + self.reads.len()
            + self.flushes.len()
            + self.zeroes.len()
            + self.queue.len()
            + self.internal.len()
    }

    pub(crate) fn commit_in_flight(&self) -> bool {
        self.commit.is_some()
    }

    /// Counts one poll of the volume towards [`quiet`](Self::quiet): a poll that finds nothing
    /// outstanding and nothing submitted since the poll before.
    pub(crate) fn note_poll(&mut self) {
        if self.outstanding() == 0 && self.next_seq == self.seq_at_poll {
            self.quiet_polls = self.quiet_polls.saturating_add(1);
        } else {
            self.quiet_polls = 0;
            self.seq_at_poll = self.next_seq;
        }
    }

    /// The host has been quiet for [`QUIET_POLLS`] polls in a row. A host that submits between
    /// polls (on the volume's own reactor, completions resubmitted at once) has nothing
    /// outstanding for a moment inside a poll at every turn: that moment is not idleness.
    pub(crate) fn quiet(&self) -> bool {
        self.quiet_polls >= QUIET_POLLS
    }
}

/// Polls in a row without host I/O before idle work (checksums ahead of the marker) starts.
pub(crate) const QUIET_POLLS: u32 = 64;

/// crc32c of `len` bytes of `buffers` from `offset` (across segment boundaries).
pub(crate) fn crc_of(buffers: &IoBuffers, offset: usize, len: usize) -> u32 {
    let mut crc: Option<u32> = None;
    buffers.for_each_slice(offset, len, |part| {
        crc = Some(crc.map_or_else(|| crc32c(part), |crc| crc32c_append(crc, part)));
    });
    crc.expect("a unit is never empty")
}

/// The hot path's view of the volume for one step of the poll loop.
pub(crate) struct HotStep<'a> {
    pub shared: &'a mut Shared,
    pub hub: &'a mut IoHub<HostRef>,
}

impl HotStep<'_> {
    fn complete(&mut self, tag: Tag, result: Result<(), HostError>, payload: Payload) {
        self.shared.hot.completed.push(HostCompletion { tag, result, payload });
    }

    /// A host request arrives: it gets the next submission sequence and starts at once when
    /// nothing waits before it and [`admit`](Self::admit) would start it now, else it queues
    /// (and starts as soon as nothing waits before it and the limits allow).
    pub(crate) fn submit(&mut self, tag: Tag, request: HostRequest) {
        let seq = self.shared.hot.take_seq();
        let hot = &self.shared.hot;
        if hot.queue.is_empty() && hot.internal.is_empty() && self.has_room() && !self.waits(tag, &request, seq) {
            // What admit would do with a queue of this one request, without the round trip.
            return self.start(tag, request, seq);
        }
        self.shared.hot.queue.push_back((tag, request, seq));
        if self.shared.hot.queue.len() == 1 {
            self.admit();
        }
    }

    /// Queues a host request without starting it (the volume's devices are being handed over,
    /// [`Volume::begin_handover`](super::Volume::begin_handover)): it keeps its submission
    /// sequence and its place, and `admit` starts it once the devices are back.
    pub(crate) fn queue(&mut self, tag: Tag, request: HostRequest) {
        let seq = self.shared.hot.take_seq();
        self.shared.hot.queue.push_back((tag, request, seq));
    }

    /// Fewer requests started than the in-flight limit.
    fn has_room(&self) -> bool {
        let hot = &self.shared.hot;
        hot.writes.len() + hot.rewrites.len() + hot.reads.len() + hot.flushes.len() + hot.zeroes.len()
            < self.shared.options.max_host_in_flight
    }

    /// Must a host request of submission sequence `seq` wait for a marker (or a rollback) in
    /// progress? (FIG 9: submitted after it, it waits until it is done.)
    fn waits(&self, tag: Tag, request: &HostRequest, seq: u64) -> bool {
        match request {
            HostRequest::Write { .. } | HostRequest::Unmap { .. } | HostRequest::WriteZeroes { .. } => {
                self.held(tag, seq)
            }
            // The volume's own requests never wait in this queue (`hot.internal`).
            HostRequest::Read { .. } => self.shared.read_holds.front().is_some_and(|barrier| seq >= *barrier),
            HostRequest::Flush => false,
        }
    }

    /// Starts queued requests while the in-flight limit allows.
    pub(crate) fn admit(&mut self) {
        loop {
            if !self.has_room() {
                return;
            }
            if let Some((tag, request, seq)) = self.shared.hot.internal.pop_front() {
                self.start(tag, request, seq);
                continue;
            }
            let held = match self.shared.hot.queue.front() {
                Some((tag, request, seq)) => self.waits(*tag, request, *seq),
                None => return,
            };
            if held {
                return;
            }
            let Some((tag, request, seq)) = self.shared.hot.queue.pop_front() else { return };
            self.start(tag, request, seq);
        }
    }

    /// Is a host write of submission sequence `seq` held by a marker (or a rollback) in
    /// progress? The volume's own writes (a rollback's) never are.
    fn held(&self, tag: Tag, seq: u64) -> bool {
        tag & INTERNAL_TAG == 0 && self.shared.holds.front().is_some_and(|barrier| seq >= *barrier)
    }

    fn start(&mut self, tag: Tag, request: HostRequest, seq: u64) {
        let block_size = self.shared.meta.block_size[0];
        match request {
            HostRequest::Read { offset_blocks, buffers } => {
                let blocks = div_size(buffers.len() as u64, block_size);
                if let Some(error) = self.invalid_transfer(offset_blocks, blocks, buffers.len()) {
                    return self.complete(tag, Err(error), Payload::Read(buffers));
                }
                self.shared.hot.counters.host_reads += 1;
                self.shared.hot.counters.host_bytes_read += buffers.len() as u64;
                let id = self.shared.hot.reads.insert(tag) as u32;
                self.hub.submit(Role::Base, Operation::Read { offset_blocks, buffers }, Some(HostRef::Read(id)));
            }
            HostRequest::Write { offset_blocks, buffers } => {
                let blocks = div_size(buffers.len() as u64, block_size);
                if let Some(error) = self.invalid_transfer(offset_blocks, blocks, buffers.len()) {
                    return self.complete(tag, Err(error), Payload::Write(buffers));
                }
                if let Some(error) = self.shared.failed.clone() {
                    return self.complete(tag, Err(HostError::Failed(error)), Payload::Write(buffers));
                }
                let widening = self.shared.meta.geometry.widen(offset_blocks, blocks).expect("range checked above");
                if self.shared.options.strict && !widening.aligned {
                    let unit = self.shared.meta.unit_bytes();
                    return self.complete(
                        tag,
                        Err(HostError::NotWholeUnits { offset_blocks, num_blocks: blocks, unit_bytes: unit }),
                        Payload::Write(buffers),
                    );
                }
                self.shared.hot.counters.host_writes += 1;
                self.shared.hot.counters.host_bytes_written += buffers.len() as u64;
                // Not held here: `start` runs only for requests no marker holds (`waits`).
                if let Some(entry) = self.rewrite_entry(widening) {
                    return self.start_rewrite(tag, widening.first_unit, entry, offset_blocks, buffers);
                }
                self.start_write(tag, seq, None, offset_blocks, widening, buffers);
            }
            HostRequest::Flush => {
                self.shared.hot.counters.host_flushes += 1;
                let id = self.shared.hot.flushes.insert(HostFlush { tag, pending: 2, error: None }) as u32;
                self.hub.submit(Role::Base, Operation::Flush, Some(HostRef::Flush(id)));
                self.hub.submit(Role::Journal, Operation::Flush, Some(HostRef::Flush(id)));
            }
            HostRequest::Unmap { offset_blocks, num_blocks }
            | HostRequest::WriteZeroes { offset_blocks, num_blocks } => {
                if let Some(error) = self.out_of_range(offset_blocks, num_blocks) {
                    return self.complete(tag, Err(error), Payload::None);
                }
                if let Some(error) = self.shared.failed.clone() {
                    return self.complete(tag, Err(HostError::Failed(error)), Payload::None);
                }
                let id = self.shared.hot.zeroes.insert(ZeroRequest {
                    tag,
                    seq,
                    next_block: offset_blocks,
                    end_block: offset_blocks + num_blocks,
                    in_flight: 0,
                    error: None,
                });
                self.advance_zeroes(id as u32);
            }
        }
    }

    /// Blocks `offset_blocks..+num_blocks` are not all in the volume. (Here and below not
    /// `bool::then_some`: it would build, and drop, the error for every valid request.)
    fn out_of_range(&self, offset_blocks: u64, num_blocks: u64) -> Option<HostError> {
        let volume_blocks = self.shared.meta.geometry.volume_device_blocks();
        if num_blocks == 0 || offset_blocks.checked_add(num_blocks).is_none_or(|end| end > volume_blocks) {
            Some(HostError::OutOfRange { offset_blocks, num_blocks, volume_blocks })
        } else {
            None
        }
    }

    /// A read or write of `bytes` (`blocks` whole blocks) at `offset_blocks` that cannot be
    /// done: outside the volume, or buffers that are not whole blocks.
    fn invalid_transfer(&self, offset_blocks: u64, blocks: u64, bytes: usize) -> Option<HostError> {
        let block_size = self.shared.meta.block_size[0];
        if let Some(error) = self.out_of_range(offset_blocks, blocks) {
            Some(error)
        } else if bytes == 0 || rem_size(bytes as u64, block_size) != 0 {
            Some(HostError::InvalidBuffers { bytes, block_size: block_size as usize })
        } else {
            None
        }
    }

    /// Starts the next chunks of an unmap or write-zeroes; completes it when all are done.
    fn advance_zeroes(&mut self, id: u32) {
        let block_size = self.shared.meta.block_size[0];
        let per_unit = self.shared.meta.blocks_per_unit(0);
        let chunk_blocks = (ZERO_CHUNK_BYTES / block_size).max(per_unit) / per_unit * per_unit;
        loop {
            let request = &self.shared.hot.zeroes[id as usize];
            if request.next_block >= request.end_block
                || request.in_flight >= ZERO_CHUNKS_IN_FLIGHT
                || request.error.is_some()
            {
                break;
            }
            let start = request.next_block;
            let boundary = (start / chunk_blocks + 1) * chunk_blocks;
            let end = boundary.min(request.end_block);
            let blocks = end - start;
            let request = &mut self.shared.hot.zeroes[id as usize];
            request.next_block = end;
            request.in_flight += 1;
            let data = if blocks == chunk_blocks {
                self.zero_chunk(chunk_blocks * block_size)
            } else {
                // The backend's allocator: DMA-capable memory under SPDK, zeroed.
                Arc::new(IoBuffers::single(self.hub.alloc(Role::Base, (blocks * block_size) as usize)))
            };
            let widening = self.shared.meta.geometry.widen(start, blocks).expect("range checked at start");
            let seq = self.shared.hot.zeroes[id as usize].seq;
            self.start_write(0, seq, Some(id), start, widening, data);
        }
        let request = &self.shared.hot.zeroes[id as usize];
        if request.in_flight == 0 && (request.next_block >= request.end_block || request.error.is_some()) {
            let request = self.shared.hot.zeroes.remove(id as usize);
            self.complete(request.tag, request.error.map_or(Ok(()), Err), Payload::None);
        }
    }

    fn zero_chunk(&mut self, bytes: u64) -> SharedBuffers {
        let hub = &self.hub;
        self.shared
            .hot
            .zero_chunk
            .get_or_insert_with(|| Arc::new(IoBuffers::single(hub.alloc(Role::Base, bytes as usize))))
            .clone()
    }

    /// The open generation's entry of the unit `widening` rewrites, when the write can take the
    /// short way ([`Rewrite`]): one whole unit, already listed ("latest" mode: "all" appends
    /// a version per write), not tracked by the open bitmap (those stay base-only until
    /// resynced), and nothing in flight or blocked overlapping it.
    #[inline]
    fn rewrite_entry(&self, widening: Widening) -> Option<usize> {
        if !widening.aligned || widening.unit_count != 1 {
            return None;
        }
        let meta = &self.shared.meta;
        let unit = widening.first_unit;
        let (entry, locked) = meta.open.entry_of.lookup(unit)?;
        if locked
            || meta.mode() == JournalMode::All
            || meta.open_bitmap.as_ref().is_some_and(|bitmap| bitmap.tracks_any(widening.units()))
            || self.shared.hot.locked_units.contains_key(&unit)
            || self.overlaps_blocked(widening, usize::MAX)
        {
            return None;
        }
        Some(entry as usize)
    }

    /// Starts a whole-unit rewrite of `entry` (block `unit`): the unit's lock (in its index
    /// slot, not `locked_units`), its checksum left pending, the journal element and the base
    /// written at once (FIG 8 S8003/S8004, S8007): the entry is durable already, so the base
    /// has nothing to wait for.
    fn start_rewrite(&mut self, tag: Tag, unit: u64, entry: usize, offset_blocks: u64, host: SharedBuffers) {
        let locked = self.shared.meta.open.entry_of.lock(unit);
        debug_assert!(locked, "unit {unit} locked twice");
        let hot = &mut self.shared.hot;
        hot.counters.rewrites_in_place += 1;
        let id = hot.rewrites.insert(Rewrite { tag, unit, buffers: None, error: None, pending: 2 });
        hot.writes_in_flight += 1;
        let written_upto = hot.index_written_upto(&self.shared.meta);
        let unit_bytes = self.shared.meta.unit_bytes();
        let pending_limit = div_size(self.shared.options.marker_read_back_bytes, unit_bytes) as usize;
        let meta = &mut self.shared.meta;
        let per_page = meta.entries_per_page();
        meta.open.note_rewrite(entry, pending_limit, written_upto, per_page, || crc_of(&host, 0, unit_bytes as usize));
        let fua = meta.durability() == Durability::WriteThrough;
        let journal_lba = meta.segment_lba(meta.open.element_start + entry as u64);
        // The journal write's reference is taken before either write is submitted (see
        // HostWrite::data: an atomic operation right after a copying submission waits).
        let journal_data = host.clone();
        let owner = Some(HostRef::Rewrite(id as u32));
        self.hub.submit(
            Role::Journal,
            Operation::Write { offset_blocks: journal_lba, buffers: journal_data, fua },
            owner,
        );
        self.hub.submit(Role::Base, Operation::Write { offset_blocks, buffers: host, fua }, owner);
    }

    /// A host write's journal or base write failed: base and journal may now disagree for its
    /// block, so the volume stops taking writes until a reopen rebuilds the open generation
    /// from the base.
    fn device_write_failed(&mut self, error: &IoError) {
        self.shared.hot.counters.write_errors += 1;
        self.shared.failed.get_or_insert_with(|| format!("write failed: {error}"));
    }

    /// One device write of a [`Rewrite`] completed; the second finishes it.
    fn on_rewrite_completion(&mut self, id: usize, completion: Completion) {
        if let Err(error) = completion.result {
            self.device_write_failed(&error);
            self.shared.hot.rewrites[id].error.get_or_insert(error);
        }
        let rewrite = &mut self.shared.hot.rewrites[id];
        rewrite.pending -= 1;
        let payload = match completion.payload {
            Payload::Write(buffers) => Some(buffers),
            _ => None, // Refused before reaching the device (SubmitError::Invalid): none given back.
        };
        if rewrite.pending > 0 {
            rewrite.buffers = payload;
            return;
        }
        let rewrite = self.shared.hot.rewrites.remove(id);
        let unlocked = self.shared.meta.open.entry_of.unlock(rewrite.unit);
        debug_assert!(unlocked, "unit {} was locked by its rewrite", rewrite.unit);
        self.shared.hot.writes_in_flight -= 1;
        let payload = rewrite.buffers.or(payload).map_or(Payload::None, Payload::Write);
        self.complete(rewrite.tag, rewrite.error.map_or(Ok(()), |error| Err(HostError::Io(error))), payload);
        self.unblock();
    }

    fn start_write(
        &mut self,
        tag: Tag,
        seq: u64,
        parent: Option<u32>,
        offset_blocks: u64,
        widening: Widening,
        host: SharedBuffers,
    ) {
        let id = self.shared.hot.writes.insert(HostWrite {
            tag,
            seq,
            parent,
            offset_blocks,
            widening,
            host,
            data: None,
            base_data: None,
            head: None,
            tail: None,
            state: WriteState::Blocked,
            pending: 0,
            needed_entries: 0,
            needed_bitmap_sets: 0,
            base_submitted: false,
            error: None,
        });
        let overlaps = self.overlaps_locked(widening) || self.overlaps_blocked(widening, usize::MAX);
        if overlaps || self.held(tag, seq) {
            self.shared.hot.counters.overlap_waits += u64::from(overlaps);
            self.shared.hot.blocked.push_back(id);
            return;
        }
        self.begin(id);
    }

    /// Does `widening` overlap a unit a write or the resync holds (in `locked_units`, or a
    /// rewrite's lock in the unit's index slot)?
    fn overlaps_locked(&self, widening: Widening) -> bool {
        let entry_of = &self.shared.meta.open.entry_of;
        widening.units().any(|unit| self.shared.hot.locked_units.contains_key(&unit) || entry_of.is_locked(unit))
    }

    /// Does `widening` overlap a blocked write that arrived before position `before`?
    fn overlaps_blocked(&self, widening: Widening, before: usize) -> bool {
        let units = widening.units();
        self.shared.hot.blocked.iter().take(before).any(|other| {
            let other = self.shared.hot.writes[*other].widening.units();
            other.start < units.end && units.start < other.end
        })
    }

    /// Takes the unit locks and starts reading or allocating.
    fn begin(&mut self, id: usize) {
        let widening = self.shared.hot.writes[id].widening;
        for unit in widening.units() {
            let previous = self.shared.hot.locked_units.insert(unit, id);
            debug_assert!(previous.is_none(), "unit {unit} locked twice");
        }
        self.shared.hot.writes_in_flight += 1;
        if widening.aligned {
            return self.allocate(id); // The host's buffers are the units (HostWrite::data).
        }
        self.shared.hot.counters.read_modify_writes += 1;
        let unit = self.shared.meta.unit_bytes() as usize;
        let needs_head = widening.head_gap_blocks > 0;
        let needs_tail = widening.tail_gap_blocks > 0 && (widening.unit_count > 1 || !needs_head);
        let write = &mut self.shared.hot.writes[id];
        write.state = WriteState::Reading;
        if needs_head {
            write.pending += 1;
        }
        if needs_tail {
            write.pending += 1;
        }
        let lba = |unit_index: u64| self.shared.meta.volume_lba(0, unit_index);
        let (head_lba, tail_lba) = (lba(widening.first_unit), lba(widening.first_unit + widening.unit_count - 1));
        if needs_head {
            let buffers = IoBuffers::single(self.hub.alloc(Role::Base, unit));
            self.hub.submit(
                Role::Base,
                Operation::Read { offset_blocks: head_lba, buffers },
                Some(HostRef::WriteHead(id as u32)),
            );
        }
        if needs_tail {
            let buffers = IoBuffers::single(self.hub.alloc(Role::Base, unit));
            self.hub.submit(
                Role::Base,
                Operation::Read { offset_blocks: tail_lba, buffers },
                Some(HostRef::WriteTail(id as u32)),
            );
        }
    }

    /// Builds whole units from the head/tail reads and the host data.
    fn merge_partial(&mut self, id: usize) {
        let unit = self.shared.meta.unit_bytes() as usize;
        let block_size = self.shared.meta.block_size[0] as usize;
        let write = &mut self.shared.hot.writes[id];
        let total = write.widening.unit_count as usize * unit;
        let mut merged = self.hub.alloc(Role::Base, total);
        {
            let bytes = merged.as_mut_slice();
            if let Some(head) = &write.head {
                head.read_at(0, &mut bytes[..unit]);
            }
            if let Some(tail) = &write.tail {
                tail.read_at(0, &mut bytes[total - unit..]);
            } else if write.head.is_some() && write.widening.unit_count == 1 {
                // One unit with gaps at both ends: the head read covered it.
            }
            let offset = write.widening.head_gap_blocks as usize * block_size;
            write.host.read_at(0, &mut bytes[offset..offset + write.host.len()]);
        }
        write.head = None;
        write.tail = None;
        write.data = Some(Arc::new(IoBuffers::single(merged)));
    }

    /// Takes journal segments for the write's units and submits its data.
    fn allocate(&mut self, id: usize) {
        let widening = self.shared.hot.writes[id].widening;
        let meta = &mut self.shared.meta;
        let per_page = meta.entries_per_page();
        if meta.open_bitmap.as_ref().is_some_and(|bitmap| bitmap.tracks_any(widening.units())) {
            return self.write_base_only(id); // Tracked blocks stay base-only until resynced.
        }
        let new_units = meta.new_units(widening.units());
        if new_units > 0 {
            let entries_after = meta.open.blocks.len() + new_units as usize;
            let pages_needed = (entries_after.div_ceil(per_page)).saturating_sub(meta.open.pages.len()) as u64;
            if meta.ring.free() < new_units || meta.pages.free() < pages_needed {
                return self.journal_full(id, new_units);
            }
            for _ in 0..pages_needed {
                let page = meta.pages.append(1).expect("page space checked");
                debug_assert_eq!(page, meta.open.page_start + meta.open.pages.len() as u64);
                meta.open.pages.push(PageState::default());
            }
        }
        // Both device writes' references at once, before either is submitted (HostWrite::data).
        let (data, base_data) = {
            let write = &self.shared.hot.writes[id];
            (write.data().clone(), write.data().clone())
        };
        self.shared.hot.writes[id].base_data = Some(base_data);
        let unit_bytes = meta.unit_bytes() as usize;
        let written_upto = self.shared.hot.index_written_upto(meta);
        // Rewrites whose checksum may wait for the marker (VolumeOptions::marker_read_back_bytes).
        let pending_limit = div_size(self.shared.options.marker_read_back_bytes, unit_bytes as u64) as usize;
        // Scratch lists reused across writes: the hot path allocates nothing of its own.
        let mut segments = std::mem::take(&mut self.shared.hot.scratch_segments);
        segments.clear();
        let mut needed = 0usize;
        // "All" mode (seed 001 embodiment 4): every write appends a version with its
        // submission sequence and time, never rewriting an element in place.
        let version = (meta.mode() == JournalMode::All).then(|| {
            meta.last_write_ns = super::now_ns().max(meta.last_write_ns);
            Version { sequence: self.shared.hot.writes[id].seq, time_ns: meta.last_write_ns, lost: false }
        });
        for (index, unit) in widening.units().enumerate() {
            let rewrite = if version.is_some() { None } else { meta.open.entry_of.get(unit) };
            let entry = match rewrite {
                Some(entry) => {
                    let entry = entry as usize;
                    meta.open.note_rewrite(entry, pending_limit, written_upto, per_page, || {
                        crc_of(&data, index * unit_bytes, unit_bytes)
                    });
                    entry
                }
                None => {
                    let segment = meta.ring.append(1).expect("journal space checked");
                    let entry = meta.open.blocks.len();
                    debug_assert_eq!(
                        segment,
                        meta.open.element_start + entry as u64,
                        "one generation's segments are consecutive"
                    );
                    meta.open.blocks.push(unit);
                    meta.open.crcs.push(crc_of(&data, index * unit_bytes, unit_bytes));
                    meta.open.versions.extend(version);
                    meta.open.entry_of.insert(unit, entry as u32);
                    needed = entry + 1;
                    entry
                }
            };
            segments.push(meta.open.element_start + entry as u64);
        }
        let fua = meta.durability() == Durability::WriteThrough;
        // Journal: the host's buffers themselves when the segments are one physical run.
        let first = segments[0];
        let consecutive = segments.windows(2).all(|w| w[1] == w[0] + 1);
        let no_wrap = meta.ring.physical(first) + segments.len() as u64 <= meta.journal.element_capacity;
        let mut journal_writes = std::mem::take(&mut self.shared.hot.scratch_journal_writes);
        journal_writes.clear();
        if consecutive && no_wrap {
            journal_writes.push((meta.segment_lba(first), data));
        } else {
            // Bounce: copy each run of consecutive physical segments (rare: mixed rewrites).
            self.shared.hot.counters.journal_bounce_copies += 1;
            let mut start = 0;
            while start < segments.len() {
                let mut end = start + 1;
                while end < segments.len()
                    && segments[end] == segments[end - 1] + 1
                    && meta.ring.physical(segments[end]) == meta.ring.physical(segments[end - 1]) + 1
                {
                    end += 1;
                }
                let mut buffer = self.hub.alloc(Role::Journal, (end - start) * unit_bytes);
                data.read_at(start * unit_bytes, buffer.as_mut_slice());
                journal_writes.push((meta.segment_lba(segments[start]), Arc::new(IoBuffers::single(buffer))));
                start = end;
            }
        }
        let write = &mut self.shared.hot.writes[id];
        write.pending += journal_writes.len() as u32;
        write.needed_entries = needed;
        for (lba, buffers) in journal_writes.drain(..) {
            self.hub.submit(
                Role::Journal,
                Operation::Write { offset_blocks: lba, buffers, fua },
                Some(HostRef::WriteData(id as u32)),
            );
        }
        self.shared.hot.scratch_segments = segments;
        self.shared.hot.scratch_journal_writes = journal_writes;
        if needed > self.shared.meta.open.durable {
            self.shared.hot.writes[id].state = WriteState::WaitingIndex;
            self.shared.hot.waiting_index.push(id);
        } else {
            self.submit_base(id);
        }
    }

    fn journal_full(&mut self, id: usize, new_units: u64) {
        if self.shared.meta.bitmap_only() {
            return self.write_base_only(id);
        }
        let policy = self.shared.meta.journal_full_policy();
        // Waiting makes sense only while a sort can still free space.
        let sort_will_free = !self.shared.meta.sealed.is_empty()
            && self.shared.options.sort.automatic
            && !self.shared.sort_paused
            && self.shared.sort_error.is_none()
            && self.shared.failed.is_none();
        if matches!(policy, JournalFullPolicy::Block | JournalFullPolicy::MergeOldest) && sort_will_free {
            self.shared.hot.counters.journal_full_waits += 1;
            self.shared.hot.writes[id].state = WriteState::WaitingSpace;
            self.shared.hot.waiting_space.push_back(id);
            return;
        }
        let shared = &self.shared;
        let why = if policy == JournalFullPolicy::Fail {
            "the volume's journal-full policy is \"fail\"".to_string()
        } else if let Some(error) = &shared.sort_error {
            format!("the sort that would free space stopped: {error}")
        } else if let Some(error) = &shared.failed {
            format!("the volume stopped: {error}")
        } else if shared.sort_paused {
            "a rollback paused the sort".to_string()
        } else if !shared.options.sort.automatic {
            "automatic sorting is off (sort now, or enable it)".to_string()
        } else {
            "nothing is waiting to be sorted (mark a generation, or enlarge the journal)".to_string()
        };
        let meta = &shared.meta;
        let error = HostError::NoSpace {
            needed_elements: new_units,
            free_elements: meta.ring.free(),
            capacity_elements: meta.ring.capacity(),
            why,
        };
        self.shared.hot.writes[id].error = Some(error);
        self.finish_write(id);
    }

    /// Fails the writes waiting for journal space once nothing can free it (the sort stopped).
    pub(crate) fn fail_space_waiters(&mut self) {
        let sort_can_run = self.shared.options.sort.automatic
            && !self.shared.sort_paused
            && self.shared.sort_error.is_none()
            && self.shared.failed.is_none();
        if self.shared.hot.waiting_space.is_empty() || sort_can_run {
            return;
        }
        while let Some(id) = self.shared.hot.waiting_space.pop_front() {
            let widening = self.shared.hot.writes[id].widening;
            let new_units = self.shared.meta.new_units(widening.units());
            self.shared.hot.writes[id].state = WriteState::Writing;
            self.journal_full(id, new_units);
        }
    }

    /// Retries writes waiting for journal space (after the sort freed some).
    pub(crate) fn retry_space(&mut self) {
        let count = self.shared.hot.waiting_space.len();
        for _ in 0..count {
            let Some(id) = self.shared.hot.waiting_space.pop_front() else { break };
            self.shared.hot.writes[id].state = WriteState::Writing;
            self.allocate(id);
        }
    }

    fn submit_base(&mut self, id: usize) {
        let fua = self.shared.meta.durability() == Durability::WriteThrough;
        let write = &mut self.shared.hot.writes[id];
        let offset_blocks = if write.widening.aligned {
            write.offset_blocks
        } else {
            self.shared.meta.volume_lba(0, write.widening.first_unit)
        };
        write.state = WriteState::Writing;
        write.base_submitted = true;
        write.pending += 1;
        let buffers = match write.base_data.take() {
            Some(buffers) => buffers,
            None => write.data().clone(), // Writes that bypassed allocate (base-only).
        };
        self.hub.submit(
            Role::Base,
            Operation::Write { offset_blocks, buffers, fua },
            Some(HostRef::WriteData(id as u32)),
        );
    }

    /// Writes the index pages of entries not yet durable, if no commit is in flight.
    pub(crate) fn maybe_commit(&mut self) {
        if self.shared.hot.commit.is_some() || self.shared.failed.is_some() {
            return;
        }
        let meta = &mut self.shared.meta;
        let target = meta.open.blocks.len();
        if target <= meta.open.durable {
            return;
        }
        let per_page = meta.entries_per_page();
        let mut pages = Vec::new();
        for index in meta.open.durable / per_page..=(target - 1) / per_page {
            let (page, slot, sequence, bytes) = meta.next_index_page(index, target);
            meta.open.stale_pages.remove(index);
            let offset = meta.index_slot_bytes(page, slot) / meta.block_size[1];
            let mut buffer = self.hub.alloc(Role::Journal, bytes.len());
            buffer.as_mut_slice().copy_from_slice(&bytes);
            let buffers = Arc::new(IoBuffers::single(buffer));
            self.hub.submit(
                Role::Journal,
                Operation::Write { offset_blocks: offset, buffers, fua: true },
                Some(HostRef::Commit),
            );
            pages.push((index, slot, sequence));
        }
        self.shared.hot.counters.index_commits += 1;
        self.shared.hot.counters.index_pages_written += pages.len() as u64;
        self.shared.hot.commit = Some(Commit { upto: target, pending: pages.len() as u32, pages, error: None });
    }

    /// Routes one device completion of the hot path.
    pub(crate) fn on_completion(&mut self, owner: HostRef, completion: Completion) {
        match owner {
            HostRef::Read(id) => {
                let tag = self.shared.hot.reads.remove(id as usize);
                let result = completion.result.map_err(HostError::from);
                self.complete(tag, result, completion.payload);
            }
            HostRef::Flush(id) => {
                let flush = &mut self.shared.hot.flushes[id as usize];
                if let Err(error) = completion.result {
                    flush.error.get_or_insert(HostError::from(error));
                }
                flush.pending -= 1;
                if flush.pending == 0 {
                    let flush = self.shared.hot.flushes.remove(id as usize);
                    self.complete(flush.tag, flush.error.map_or(Ok(()), Err), Payload::None);
                }
            }
            HostRef::Commit => self.on_commit(completion),
            HostRef::Rewrite(id) => self.on_rewrite_completion(id as usize, completion),
            HostRef::BitmapCommit => self.on_bitmap_commit(completion),
            HostRef::WriteHead(id) | HostRef::WriteTail(id) => {
                let id = id as usize;
                let write = &mut self.shared.hot.writes[id];
                write.pending -= 1;
                match (completion.result, completion.payload) {
                    (Ok(()), Payload::Read(buffers)) => {
                        if matches!(owner, HostRef::WriteHead(_)) {
                            write.head = Some(Box::new(buffers));
                        } else {
                            write.tail = Some(Box::new(buffers));
                        }
                    }
                    (Err(error), _) => {
                        write.error.get_or_insert(HostError::from(error));
                    }
                    (Ok(()), other) => unreachable!("a read returns its buffers, got {other:?}"),
                }
                if write.pending == 0 {
                    if write.error.is_some() {
                        return self.finish_write(id);
                    }
                    self.merge_partial(id);
                    self.allocate(id);
                }
            }
            HostRef::WriteData(id) => {
                let id = id as usize;
                self.shared.hot.writes[id].pending -= 1;
                if let Err(error) = completion.result {
                    self.device_write_failed(&error);
                    self.shared.hot.writes[id].error.get_or_insert(HostError::Io(error));
                }
                let write = &self.shared.hot.writes[id];
                if write.pending == 0
                    && (write.base_submitted || write.error.is_some())
                    && write.state != WriteState::WaitingIndex
                {
                    self.finish_write(id);
                }
            }
        }
    }

    fn on_commit(&mut self, completion: Completion) {
        let commit = self.shared.hot.commit.as_mut().expect("a commit is in flight");
        commit.pending -= 1;
        if let Err(error) = completion.result {
            commit.error.get_or_insert(*error);
        }
        if commit.pending > 0 {
            return;
        }
        let commit = self.shared.hot.commit.take().expect("checked above");
        if let Some(error) = commit.error {
            self.shared.failed.get_or_insert(format!("element index write failed: {error}"));
            let waiting = std::mem::take(&mut self.shared.hot.waiting_index);
            self.fail_uncommitted(waiting, &error);
            return;
        }
        let meta = &mut self.shared.meta;
        for (index, slot, sequence) in commit.pages {
            meta.open.pages[index] = PageState { sequence, newest_slot: Some(slot) };
        }
        debug_assert!(commit.upto >= meta.open.durable);
        meta.open.durable = commit.upto;
        let durable = meta.open.durable;
        let waiting = std::mem::take(&mut self.shared.hot.waiting_index);
        for id in waiting {
            if self.shared.hot.writes[id].needed_entries <= durable {
                self.submit_base(id);
            } else {
                self.shared.hot.waiting_index.push(id);
            }
        }
        self.maybe_commit();
    }

    /// Fails writes whose metadata commit failed: their data must not reach the base (it
    /// never does: they waited for the commit), and each finishes once nothing is in flight.
    pub(super) fn fail_uncommitted(&mut self, waiting: Vec<usize>, error: &IoError) {
        for id in waiting {
            let write = &mut self.shared.hot.writes[id];
            write.error.get_or_insert_with(|| HostError::from(error.clone()));
            write.state = WriteState::Writing;
            if write.pending == 0 {
                self.finish_write(id);
            }
        }
    }

    fn finish_write(&mut self, id: usize) {
        let write = self.shared.hot.writes.remove(id);
        for unit in write.widening.units() {
            let holder = self.shared.hot.locked_units.remove(&unit);
            debug_assert_eq!(holder, Some(id));
        }
        self.shared.hot.writes_in_flight -= 1;
        let result = write.error.map_or(Ok(()), Err);
        match write.parent {
            None => self.complete(write.tag, result, Payload::Write(write.host)),
            Some(parent) => {
                let request = &mut self.shared.hot.zeroes[parent as usize];
                request.in_flight -= 1;
                if let Err(error) = result {
                    request.error.get_or_insert(error);
                }
                self.advance_zeroes(parent);
            }
        }
        self.unblock();
    }

    /// Starts blocked writes that no longer overlap anything before them.
    #[inline]
    pub(crate) fn unblock(&mut self) {
        // Every finished write asks; usually nothing waits.
        if !self.shared.hot.blocked.is_empty() {
            self.unblock_waiting();
        }
    }

    fn unblock_waiting(&mut self) {
        let mut position = 0;
        while position < self.shared.hot.blocked.len() {
            let id = self.shared.hot.blocked[position];
            let widening = self.shared.hot.writes[id].widening;
            let (tag, seq) = (self.shared.hot.writes[id].tag, self.shared.hot.writes[id].seq);
            if !self.held(tag, seq) && !self.overlaps_locked(widening) && !self.overlaps_blocked(widening, position) {
                self.shared.hot.blocked.remove(position);
                self.begin(id);
            } else {
                position += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host references travel in device tags (IoHub, HOST_TAG): every one comes back as it
    /// went, within 63 bits.
    #[test]
    fn host_references_survive_their_tag_bits() {
        for id in [0, 1, 7, 1 << 20, u32::MAX - 1, u32::MAX] {
            let all = [
                HostRef::WriteHead(id),
                HostRef::WriteTail(id),
                HostRef::WriteData(id),
                HostRef::Read(id),
                HostRef::Flush(id),
                HostRef::Commit,
                HostRef::BitmapCommit,
            ];
            let mut seen = std::collections::HashSet::new();
            for owner in all {
                let bits = owner.to_bits();
                assert!(bits < 1 << 63, "{owner:?} uses the host bit");
                assert!(seen.insert(bits), "{owner:?} shares its bits with another reference");
                assert_eq!(HostRef::from_bits(bits), owner);
            }
        }
    }
}
