//! Fault injection around any [`Device`]: error and delay rules, and a volatile write cache
//! with power cuts — the crash model of the engine's simulation.
//!
//! # Crash model
//! The fault device presents `volatile_cache: true`:
//! - a plain write (and unmap, write-zeroes: writes of zeroes) completes into an *overlay* held
//!   here, not in the inner device; reads see the overlay over the inner device;
//! - a flush makes durable every write that completed before the flush was submitted: their
//!   newest covered versions are written to the inner device, the inner device is flushed, and
//!   only then does the flush complete;
//! - a write with `fua` is written through to the inner device (with `fua`) and is durable
//!   when it completes.
//!
//! [`FaultController::power_cut`] stops the device at once: every channel rejects submits
//! with [`IoError::PowerLost`] and no pending completion is ever delivered. The post-cut image
//! of each block is a seeded-random choice among the values the block may hold after a real
//! power loss: its durable value, every completed-but-unflushed version, and the data of every
//! write to it still in flight (so a multi-block write tears at block granularity).
//! [`FaultController::settle`] then writes that image to the inner device; a fresh
//! [`FaultDevice::new`] over the same inner device is the machine after reboot.
//!
//! # Durability pipeline
//! Flushes and FUA writes are *durability jobs*, run one at a time device-wide, so two inner
//! writes of the same block are never in flight together (the inner device may reorder). A job
//! first reads the blocks it will overwrite from the inner device (the *prior* values), so a
//! cut in the middle of the job can still choose "the write never reached the media".
//!
//! Everything here is single-threaded like the channels it wraps: the device, its channels and
//! its controller share one state through `Rc<RefCell<..>>`, and the inner device is driven
//! through one inner channel by whichever fault channel polls.

use std::cell::{RefCell, RefMut};
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{
    validate, Channel, Completion, Device, DeviceError, DeviceGeometry, DmaBuf, IoBuffers, IoError, Operation,
    OperationKind, Payload, SharedBuffers, SubmitError, Tag,
};

/// Operations a fault channel accepts before answering [`SubmitError::QueueFull`].
pub const QUEUE_DEPTH: usize = 128;
/// Unflushed versions kept per block; beyond it the oldest one no waiting flush needs is
/// forgotten, which only narrows the choices of a power cut (memory stays bounded even if the
/// user never flushes).
pub const MAX_VERSIONS_PER_BLOCK: usize = 8;
/// How long [`FaultController::settle`] waits for the inner device before giving up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// When a rule fires, counted over the operations the rule matches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    /// Every matching operation.
    Always,
    /// Only the nth matching operation (1-based).
    Nth(u64),
    /// Each matching operation with this probability, drawn from the device's seed.
    Probability(f64),
    /// The first matching operation only.
    Once,
}

/// What a fired rule does to the operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The operation does nothing and completes with [`IoError::Media`].
    Error,
    /// The completion is withheld for this many polls of its channel.
    Delay { polls: u32 },
}

/// A fault to inject into the operations it matches.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// Kinds of operation matched; empty matches every kind.
    pub kinds: Vec<OperationKind>,
    /// Blocks matched: an operation matches when its extent overlaps the range. A flush has no
    /// extent and never matches a rule with a range.
    pub range: Option<Range<u64>>,
    pub trigger: Trigger,
    pub effect: Effect,
}

impl FaultRule {
    /// A rule matching every operation.
    pub fn new(trigger: Trigger, effect: Effect) -> Self {
        FaultRule { kinds: Vec::new(), range: None, trigger, effect }
    }

    /// Restricts the rule to these kinds of operation.
    pub fn kinds(mut self, kinds: &[OperationKind]) -> Self {
        self.kinds = kinds.to_vec();
        self
    }

    /// Restricts the rule to operations overlapping these blocks.
    pub fn range(mut self, blocks: Range<u64>) -> Self {
        self.range = Some(blocks);
        self
    }

    fn matches(&self, operation: &Operation, block_size: u32) -> bool {
        let kind_matches = self.kinds.is_empty() || self.kinds.contains(&operation.kind());
        let range_matches = match (&self.range, operation.extent(block_size)) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(range), Some((offset, count))) => offset < range.end && range.start < offset + count,
        };
        kind_matches && range_matches
    }
}

/// Identifies a rule for [`FaultController::remove_rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(u64);

/// Counts of one kind of operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    /// Accepted by submit.
    pub submitted: u64,
    /// Delivered by poll with success.
    pub completed: u64,
    /// Delivered by poll with an error.
    pub failed: u64,
}

/// Counts per kind of operation since the device was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    by_kind: [KindStats; 5],
}

impl FaultStats {
    pub fn kind(&self, kind: OperationKind) -> KindStats {
        self.by_kind[kind_index(kind)]
    }

    fn kind_mut(&mut self, kind: OperationKind) -> &mut KindStats {
        &mut self.by_kind[kind_index(kind)]
    }
}

fn kind_index(kind: OperationKind) -> usize {
    match kind {
        OperationKind::Read => 0,
        OperationKind::Write => 1,
        OperationKind::Flush => 2,
        OperationKind::Unmap => 3,
        OperationKind::WriteZeroes => 4,
    }
}

/// Why a controller action failed.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("{device}: settle needs a power cut first")]
    PowerOn { device: String },
    #[error("{device}: writing the post-cut image to the inner device failed: {source}")]
    Inner { device: String, source: IoError },
    #[error("{device}: the inner device still had {in_flight} operations in flight after {waited_ms} ms")]
    Stalled { device: String, in_flight: usize, waited_ms: u128 },
    #[error(transparent)]
    Channel(#[from] DeviceError),
}

/// A device that injects faults into the operations of an inner device and models its
/// volatile write cache. See the module documentation for the crash model.
pub struct FaultDevice {
    core: Rc<RefCell<Core>>,
    name: String,
    geometry: DeviceGeometry,
}

/// Handle on a [`FaultDevice`] for tests: rules, statistics, power cuts.
#[derive(Clone)]
pub struct FaultController {
    core: Rc<RefCell<Core>>,
}

impl FaultDevice {
    /// Wraps `inner`; `seed` drives probability triggers and power-cut choices.
    pub fn new(inner: Arc<dyn Device>, seed: u64) -> (FaultDevice, FaultController) {
        let name = format!("fault({})", inner.name());
        let geometry = DeviceGeometry { volatile_cache: true, ..inner.geometry() };
        let core = Core {
            name: name.clone(),
            geometry,
            inner,
            inner_channel: None,
            rules: Vec::new(),
            next_rule_id: 0,
            trigger_rng: ChaCha8Rng::seed_from_u64(seed),
            cut_rng: {
                // A separate stream, so cut choices do not depend on how many triggers drew.
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(1);
                rng
            },
            stats: FaultStats::default(),
            channels: Vec::new(),
            ops: BTreeMap::new(),
            next_op_id: 0,
            overlay: BTreeMap::new(),
            next_seq: 0,
            jobs: VecDeque::new(),
            active_job: None,
            inner_ops: BTreeMap::new(),
            inner_backlog: VecDeque::new(),
            next_inner_tag: 0,
            power: Power::On,
        };
        let core = Rc::new(RefCell::new(core));
        (FaultDevice { core: core.clone(), name, geometry }, FaultController { core })
    }
}

impl Device for FaultDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn geometry(&self) -> DeviceGeometry {
        self.geometry
    }

    fn open_channel(&self) -> Result<Box<dyn Channel>, DeviceError> {
        let mut core = self.core.borrow_mut();
        if core.inner_channel.is_none() {
            core.inner_channel = Some(core.inner.open_channel()?);
        }
        let id = core.channels.len();
        core.channels.push(ChannelState { in_flight: 0 });
        Ok(Box::new(FaultChannel { core: self.core.clone(), id, name: self.name.clone(), geometry: self.geometry }))
    }
}

impl FaultController {
    /// Adds a rule; rules are checked in the order they were added, and every rule that fires
    /// applies (an error and a delay combine).
    ///
    /// # Panics
    /// If a probability is outside `0.0..=1.0`.
    pub fn add_rule(&self, rule: FaultRule) -> RuleId {
        if let Trigger::Probability(p) = rule.trigger {
            assert!((0.0..=1.0).contains(&p), "fault rule probability {p} is outside 0..=1");
        }
        let mut core = self.core();
        let id = RuleId(core.next_rule_id);
        core.next_rule_id += 1;
        core.rules.push(RuleState { id, rule, matched: 0, spent: false });
        id
    }

    /// Removes one rule; false if it was not there.
    pub fn remove_rule(&self, id: RuleId) -> bool {
        let mut core = self.core();
        let before = core.rules.len();
        core.rules.retain(|rule| rule.id != id);
        core.rules.len() != before
    }

    pub fn clear_rules(&self) {
        self.core().rules.clear();
    }

    pub fn stats(&self) -> FaultStats {
        self.core().stats
    }

    /// Blocks with completed writes that are not yet durable.
    pub fn unflushed_blocks(&self) -> usize {
        self.core().overlay.len()
    }

    /// Completed-but-unflushed versions held, over all blocks.
    pub fn unflushed_versions(&self) -> usize {
        self.core().overlay.values().map(Vec::len).sum()
    }

    pub fn is_powered(&self) -> bool {
        matches!(self.core().power, Power::On)
    }

    /// Cuts the power now: decides the post-cut image (see the module documentation), rejects
    /// every later submit with [`IoError::PowerLost`] and drops every pending completion.
    /// A second cut does nothing.
    pub fn power_cut(&self) {
        self.core().power_cut();
    }

    /// After [`power_cut`](Self::power_cut): waits for the inner device to finish what it was
    /// given, then writes the post-cut image to it and flushes it. Blocks (spinning on the
    /// inner channel's poll); calling it again does nothing.
    pub fn settle(&self) -> Result<(), FaultError> {
        self.core().settle()
    }

    fn core(&self) -> RefMut<'_, Core> {
        self.core.borrow_mut()
    }
}

struct FaultChannel {
    core: Rc<RefCell<Core>>,
    id: usize,
    name: String,
    geometry: DeviceGeometry,
}

impl Channel for FaultChannel {
    fn geometry(&self) -> DeviceGeometry {
        self.geometry
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn submit(&mut self, tag: Tag, operation: Operation) -> Result<(), SubmitError> {
        self.core.borrow_mut().submit(self.id, tag, operation)
    }

    fn poll(&mut self, completions: &mut Vec<Completion>) -> usize {
        self.core.borrow_mut().poll(self.id, completions)
    }

    /// Zero once the power is cut: those operations will never complete.
    fn in_flight(&self) -> usize {
        let core = self.core.borrow();
        match core.power {
            Power::On => core.channels[self.id].in_flight,
            Power::Cut { .. } => 0,
        }
    }

    fn alloc(&self, len: usize) -> DmaBuf {
        let core = self.core.borrow();
        core.inner_channel.as_ref().expect("a fault channel exists only with its inner channel").alloc(len)
    }
}

impl Drop for FaultChannel {
    /// Abandons the channel's operations: they will never be delivered.
    fn drop(&mut self) {
        if let Ok(mut core) = self.core.try_borrow_mut() {
            core.close_channel(self.id);
        }
    }
}

/// Contents of one block in the overlay or a job.
#[derive(Debug, Clone)]
enum BlockData {
    Zeroes,
    Bytes(Rc<[u8]>),
}

impl BlockData {
    fn copy_to(&self, out: &mut [u8]) {
        match self {
            BlockData::Zeroes => out.fill(0),
            BlockData::Bytes(bytes) => out.copy_from_slice(bytes),
        }
    }
}

/// A completed, not yet durable write of one block.
#[derive(Debug)]
struct Version {
    /// Order of completion among writes and flush submissions.
    seq: u64,
    data: BlockData,
}

/// Data of a write not yet completed.
#[derive(Debug)]
enum WriteData {
    Buffers(SharedBuffers),
    Zeroes { num_blocks: u64 },
}

impl WriteData {
    fn block(&self, index: u64, block_size: u32) -> BlockData {
        match self {
            WriteData::Buffers(buffers) => BlockData::Bytes(block_of(buffers, index, block_size)),
            WriteData::Zeroes { .. } => BlockData::Zeroes,
        }
    }

    fn num_blocks(&self, block_size: u32) -> u64 {
        match self {
            WriteData::Buffers(buffers) => (buffers.len() / block_size as usize) as u64,
            WriteData::Zeroes { num_blocks } => *num_blocks,
        }
    }
}

fn block_of(buffers: &IoBuffers, index: u64, block_size: u32) -> Rc<[u8]> {
    let mut bytes = vec![0; block_size as usize];
    buffers.read_at(index as usize * block_size as usize, &mut bytes);
    bytes.into()
}

#[derive(Debug)]
enum OpState {
    /// A read at the inner device; `patch` is the overlay over its extent when it was submitted.
    Reading { patch: Vec<(u64, BlockData)> },
    /// A plain write, unmap or write-zeroes: it completes (joins the overlay) when delivered.
    Writing { offset_blocks: u64, data: WriteData },
    /// A flush or FUA write in the durability pipeline.
    InJob,
    /// Finished; waiting for its channel to poll.
    Ready { result: Result<(), IoError>, payload: Payload },
}

#[derive(Debug)]
struct Op {
    channel: usize,
    tag: Tag,
    kind: OperationKind,
    /// Polls of its channel still to skip once deliverable.
    delay_polls: u32,
    state: OpState,
}

#[derive(Debug)]
enum JobKind {
    /// Makes durable the versions with `seq < covers_below`.
    Flush {
        covers_below: u64,
    },
    Fua {
        offset_blocks: u64,
        buffers: SharedBuffers,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobPhase {
    /// Reading the prior values of the blocks to overwrite.
    Capturing,
    /// Writing the new values to the inner device.
    Writing,
    /// Flushing the inner device (flush jobs only).
    Flushing,
}

#[derive(Debug)]
struct Job {
    op_id: u64,
    kind: JobKind,
    phase: JobPhase,
    /// Inner operations of the current phase not yet completed.
    pending: usize,
    /// Blocks the job writes: the version's seq (flush jobs) and the data.
    blocks: BTreeMap<u64, (Option<u64>, BlockData)>,
    /// Inner values of `blocks` before the job wrote them.
    prior: BTreeMap<u64, Rc<[u8]>>,
    error: Option<IoError>,
}

/// Why an inner operation was submitted.
#[derive(Debug)]
enum InnerOp {
    UserRead { op_id: u64 },
    Capture { first_block: u64 },
    JobWrite,
    JobFlush,
}

struct RuleState {
    id: RuleId,
    rule: FaultRule,
    matched: u64,
    spent: bool,
}

struct ChannelState {
    in_flight: usize,
}

enum Power {
    On,
    /// `image` holds the blocks to rewrite on the inner device.
    Cut {
        image: BTreeMap<u64, BlockData>,
        settled: bool,
    },
}

struct Core {
    name: String,
    geometry: DeviceGeometry,
    inner: Arc<dyn Device>,
    inner_channel: Option<Box<dyn Channel>>,
    rules: Vec<RuleState>,
    next_rule_id: u64,
    trigger_rng: ChaCha8Rng,
    cut_rng: ChaCha8Rng,
    stats: FaultStats,
    channels: Vec<ChannelState>,
    /// Accepted operations not yet delivered, by id (submission order).
    ops: BTreeMap<u64, Op>,
    next_op_id: u64,
    /// Completed, unflushed versions per block, oldest first; never an empty list.
    overlay: BTreeMap<u64, Vec<Version>>,
    /// Orders write completions and flush submissions.
    next_seq: u64,
    /// Durability jobs waiting, by op id; `active_job` runs alone.
    jobs: VecDeque<(u64, JobKind)>,
    active_job: Option<Job>,
    inner_ops: BTreeMap<Tag, InnerOp>,
    /// Inner operations refused with QueueFull, resubmitted in order before anything new.
    /// Holds at most one read per user read plus the runs of the active job.
    inner_backlog: VecDeque<(Tag, Operation)>,
    next_inner_tag: u64,
    power: Power,
}

impl Core {
    fn submit(&mut self, channel: usize, tag: Tag, operation: Operation) -> Result<(), SubmitError> {
        if !matches!(self.power, Power::On) {
            return Err(SubmitError::Invalid(IoError::PowerLost { device: self.name.clone() }));
        }
        validate(&self.name, &self.geometry, &operation).map_err(SubmitError::Invalid)?;
        if self.channels[channel].in_flight >= QUEUE_DEPTH {
            return Err(SubmitError::QueueFull(Box::new(operation)));
        }
        let kind = operation.kind();
        let (fail, delay_polls) = self.fire_rules(&operation);
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        self.channels[channel].in_flight += 1;
        self.stats.kind_mut(kind).submitted += 1;

        let state = if fail {
            let (offset_blocks, num_blocks) = operation.extent(self.geometry.block_size).unwrap_or((0, 0));
            let error = IoError::Media {
                device: self.name.clone(),
                kind,
                offset_blocks,
                num_blocks,
                detail: "injected by a fault rule".into(),
            };
            OpState::Ready { result: Err(error), payload: payload_of(operation) }
        } else {
            match operation {
                Operation::Read { offset_blocks, buffers } => {
                    let num_blocks = (buffers.len() / self.geometry.block_size as usize) as u64;
                    let patch = self.overlay_patch(offset_blocks, num_blocks);
                    // Recorded before the inner submit, which may complete it at once.
                    self.ops.insert(op_id, Op { channel, tag, kind, delay_polls, state: OpState::Reading { patch } });
                    let inner_tag = self.inner_tag(InnerOp::UserRead { op_id });
                    self.submit_inner(inner_tag, Operation::Read { offset_blocks, buffers });
                    return Ok(());
                }
                Operation::Write { offset_blocks, buffers, fua: false } => {
                    OpState::Writing { offset_blocks, data: WriteData::Buffers(buffers) }
                }
                Operation::Unmap { offset_blocks, num_blocks }
                | Operation::WriteZeroes { offset_blocks, num_blocks } => {
                    OpState::Writing { offset_blocks, data: WriteData::Zeroes { num_blocks } }
                }
                Operation::Write { offset_blocks, buffers, fua: true } => {
                    self.jobs.push_back((op_id, JobKind::Fua { offset_blocks, buffers }));
                    OpState::InJob
                }
                Operation::Flush => {
                    // Covers exactly the writes completed before this submission.
                    let covers_below = self.next_seq;
                    self.next_seq += 1;
                    self.jobs.push_back((op_id, JobKind::Flush { covers_below }));
                    OpState::InJob
                }
            }
        };
        self.ops.insert(op_id, Op { channel, tag, kind, delay_polls, state });
        Ok(())
    }

    /// Evaluates every rule against a new operation: (fail it, polls to delay it).
    fn fire_rules(&mut self, operation: &Operation) -> (bool, u32) {
        let block_size = self.geometry.block_size;
        let mut fail = false;
        let mut delay_polls = 0u32;
        for state in &mut self.rules {
            if state.spent || !state.rule.matches(operation, block_size) {
                continue;
            }
            state.matched += 1;
            let fires = match state.rule.trigger {
                Trigger::Always => true,
                Trigger::Nth(n) => state.matched == n,
                Trigger::Probability(p) => self.trigger_rng.random_bool(p),
                Trigger::Once => true,
            };
            if !fires {
                continue;
            }
            state.spent = matches!(state.rule.trigger, Trigger::Once | Trigger::Nth(_));
            match state.rule.effect {
                Effect::Error => fail = true,
                Effect::Delay { polls } => delay_polls = delay_polls.saturating_add(polls),
            }
        }
        (fail, delay_polls)
    }

    /// Newest overlay version of each block of an extent, by block index within the extent.
    fn overlay_patch(&self, offset_blocks: u64, num_blocks: u64) -> Vec<(u64, BlockData)> {
        self.overlay
            .range(offset_blocks..offset_blocks + num_blocks)
            .map(|(block, versions)| {
                let newest = versions.last().expect("overlay lists are never empty");
                (block - offset_blocks, newest.data.clone())
            })
            .collect()
    }

    fn inner_tag(&mut self, purpose: InnerOp) -> Tag {
        let tag = self.next_inner_tag;
        self.next_inner_tag += 1;
        self.inner_ops.insert(tag, purpose);
        tag
    }

    fn inner_channel(&mut self) -> &mut dyn Channel {
        self.inner_channel.as_deref_mut().expect("the inner channel opens with the first fault channel")
    }

    /// Submits to the inner device, keeping order behind earlier refused operations.
    fn submit_inner(&mut self, tag: Tag, operation: Operation) {
        if !self.inner_backlog.is_empty() {
            self.inner_backlog.push_back((tag, operation));
            return;
        }
        match self.inner_channel().submit(tag, operation) {
            Ok(()) => {}
            Err(SubmitError::QueueFull(operation)) => self.inner_backlog.push_back((tag, *operation)),
            // The fault device has the inner geometry, so this is the inner device's own refusal.
            Err(SubmitError::Invalid(error)) => self.inner_completed(tag, Err(error), Payload::None),
        }
    }

    fn drain_backlog(&mut self) {
        while let Some((tag, operation)) = self.inner_backlog.pop_front() {
            match self.inner_channel().submit(tag, operation) {
                Ok(()) => {}
                Err(SubmitError::QueueFull(operation)) => {
                    self.inner_backlog.push_front((tag, *operation));
                    return;
                }
                Err(SubmitError::Invalid(error)) => self.inner_completed(tag, Err(error), Payload::None),
            }
        }
    }

    /// Advances everything that does not belong to one channel: the backlog, the durability
    /// pipeline and the inner completions.
    fn pump(&mut self) {
        self.drain_backlog();
        if self.active_job.is_none() {
            self.start_job();
        }
        let mut completions = Vec::new();
        self.inner_channel().poll(&mut completions);
        for completion in completions {
            self.inner_completed(completion.tag, completion.result.map_err(|error| *error), completion.payload);
        }
        if self.active_job.is_none() {
            self.start_job();
        }
        self.drain_backlog();
    }

    fn poll(&mut self, channel: usize, completions: &mut Vec<Completion>) -> usize {
        if !matches!(self.power, Power::On) {
            return 0;
        }
        self.pump();
        let ids: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, op)| op.channel == channel)
            .filter(|(_, op)| matches!(op.state, OpState::Ready { .. } | OpState::Writing { .. }))
            .map(|(id, _)| *id)
            .collect();
        let mut delivered = 0;
        for id in ids {
            let op = self.ops.get_mut(&id).expect("listed above");
            if op.delay_polls > 0 {
                op.delay_polls -= 1;
                continue;
            }
            let op = self.ops.remove(&id).expect("listed above");
            let (result, payload) = match op.state {
                OpState::Writing { offset_blocks, data } => {
                    self.complete_write(offset_blocks, &data);
                    let payload = match data {
                        WriteData::Buffers(buffers) => Payload::Write(buffers),
                        WriteData::Zeroes { .. } => Payload::None,
                    };
                    (Ok(()), payload)
                }
                OpState::Ready { result, payload } => (result, payload),
                OpState::Reading { .. } | OpState::InJob => unreachable!("filtered above"),
            };
            let stats = self.stats.kind_mut(op.kind);
            if result.is_ok() {
                stats.completed += 1;
            } else {
                stats.failed += 1;
            }
            self.channels[channel].in_flight -= 1;
            completions.push(Completion { tag: op.tag, kind: op.kind, result: result.map_err(Box::new), payload });
            delivered += 1;
        }
        delivered
    }

    /// A plain write completes: each of its blocks gets a new newest version.
    fn complete_write(&mut self, offset_blocks: u64, data: &WriteData) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let block_size = self.geometry.block_size;
        let flushes_waiting: Vec<u64> = self
            .jobs
            .iter()
            .filter_map(|(_, kind)| match kind {
                JobKind::Flush { covers_below } => Some(*covers_below),
                JobKind::Fua { .. } => None,
            })
            .collect();
        for index in 0..data.num_blocks(block_size) {
            let versions = self.overlay.entry(offset_blocks + index).or_default();
            if versions.len() >= MAX_VERSIONS_PER_BLOCK {
                // Forget the oldest version no waiting flush has to make durable: that only
                // narrows what a cut may choose. (All needed: the bound yields to correctness.)
                let needed = |position: usize| {
                    let seq = versions[position].seq;
                    let next_seq = versions.get(position + 1).map_or(u64::MAX, |next| next.seq);
                    flushes_waiting.iter().any(|covers_below| seq < *covers_below && next_seq >= *covers_below)
                };
                if let Some(position) = (0..versions.len()).find(|position| !needed(*position)) {
                    versions.remove(position);
                }
            }
            versions.push(Version { seq, data: data.block(index, block_size) });
        }
    }

    fn start_job(&mut self) {
        debug_assert!(self.active_job.is_none());
        let Some((op_id, kind)) = self.jobs.pop_front() else { return };
        let block_size = self.geometry.block_size;
        let blocks: BTreeMap<u64, (Option<u64>, BlockData)> = match &kind {
            JobKind::Flush { covers_below } => self
                .overlay
                .iter()
                .filter_map(|(block, versions)| {
                    let newest_covered = versions.iter().rev().find(|version| version.seq < *covers_below)?;
                    Some((*block, (Some(newest_covered.seq), newest_covered.data.clone())))
                })
                .collect(),
            JobKind::Fua { offset_blocks, buffers } => {
                let num_blocks = (buffers.len() / block_size as usize) as u64;
                (0..num_blocks)
                    .map(|index| {
                        (offset_blocks + index, (None, BlockData::Bytes(block_of(buffers, index, block_size))))
                    })
                    .collect()
            }
        };
        let mut job =
            Job { op_id, kind, phase: JobPhase::Capturing, pending: 0, blocks, prior: BTreeMap::new(), error: None };
        if job.blocks.is_empty() {
            // A flush with nothing to forward still flushes the inner device's own cache.
            job.phase = JobPhase::Flushing;
            job.pending = 1;
            self.active_job = Some(job);
            let tag = self.inner_tag(InnerOp::JobFlush);
            self.submit_inner(tag, Operation::Flush);
            return;
        }
        let runs = runs(job.blocks.keys().copied(), self.geometry.max_transfer_blocks);
        job.pending = runs.len();
        self.active_job = Some(job);
        for (first_block, count) in runs {
            let buffers = IoBuffers::single(self.inner_channel().alloc(count as usize * block_size as usize));
            let tag = self.inner_tag(InnerOp::Capture { first_block });
            self.submit_inner(tag, Operation::Read { offset_blocks: first_block, buffers });
        }
    }

    fn inner_completed(&mut self, tag: Tag, result: Result<(), IoError>, payload: Payload) {
        let Some(purpose) = self.inner_ops.remove(&tag) else {
            unreachable!("{}: inner completion with unknown tag {tag}", self.name)
        };
        match purpose {
            InnerOp::UserRead { op_id } => {
                let Some(op) = self.ops.get_mut(&op_id) else { return }; // its channel closed
                let OpState::Reading { patch } = &op.state else {
                    unreachable!("{}: op {op_id} got a read completion in state {:?}", self.name, op.state)
                };
                let Payload::Read(mut buffers) = payload else {
                    // The inner device refused the read at submit and kept its buffers.
                    assert!(result.is_err(), "{}: inner read completed without its buffers", self.name);
                    op.state = OpState::Ready { result, payload: Payload::None };
                    return;
                };
                if result.is_ok() {
                    let block_size = self.geometry.block_size as usize;
                    let mut bytes = vec![0; block_size];
                    for (index, data) in patch {
                        data.copy_to(&mut bytes);
                        buffers.write_at(*index as usize * block_size, &bytes);
                    }
                }
                op.state = OpState::Ready { result, payload: Payload::Read(buffers) };
            }
            InnerOp::Capture { first_block } => {
                let job = self.active_job.as_mut().expect("captures belong to the active job");
                debug_assert_eq!(job.phase, JobPhase::Capturing);
                match (result, payload) {
                    (Ok(()), Payload::Read(buffers)) => {
                        let count = (buffers.len() / self.geometry.block_size as usize) as u64;
                        for index in 0..count {
                            job.prior.insert(first_block + index, block_of(&buffers, index, self.geometry.block_size));
                        }
                    }
                    (Err(error), _) => job.error = job.error.take().or(Some(error)),
                    (Ok(()), payload) => unreachable!("inner read completed with {payload:?}"),
                }
                self.job_step_done();
            }
            InnerOp::JobWrite | InnerOp::JobFlush => {
                let job = self.active_job.as_mut().expect("job writes belong to the active job");
                if let Err(error) = result {
                    job.error = job.error.take().or(Some(error));
                }
                self.job_step_done();
            }
        }
    }

    /// One inner operation of the active job finished; starts the next phase when it was the
    /// last of its phase.
    fn job_step_done(&mut self) {
        let block_size = self.geometry.block_size;
        let max_transfer_blocks = self.geometry.max_transfer_blocks;
        let job = self.active_job.as_mut().expect("a step belongs to the active job");
        assert!(job.pending > 0, "{}: job step completed with nothing pending", self.name);
        job.pending -= 1;
        if job.pending > 0 {
            return;
        }
        if job.error.is_some() {
            return self.finish_job();
        }
        match (job.phase, &job.kind) {
            (JobPhase::Capturing, JobKind::Fua { offset_blocks, buffers }) => {
                job.phase = JobPhase::Writing;
                job.pending = 1;
                let operation = Operation::Write { offset_blocks: *offset_blocks, buffers: buffers.clone(), fua: true };
                let tag = self.inner_tag(InnerOp::JobWrite);
                self.submit_inner(tag, operation);
            }
            (JobPhase::Capturing, JobKind::Flush { .. }) => {
                job.phase = JobPhase::Writing;
                let runs = runs(job.blocks.keys().copied(), max_transfer_blocks);
                job.pending = runs.len();
                let writes: Vec<Operation> = runs
                    .into_iter()
                    .map(|(first_block, count)| {
                        let mut bytes = vec![0; count as usize * block_size as usize];
                        for (index, chunk) in bytes.chunks_exact_mut(block_size as usize).enumerate() {
                            job.blocks[&(first_block + index as u64)].1.copy_to(chunk);
                        }
                        let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(&bytes)));
                        Operation::Write { offset_blocks: first_block, buffers, fua: false }
                    })
                    .collect();
                for operation in writes {
                    let tag = self.inner_tag(InnerOp::JobWrite);
                    self.submit_inner(tag, operation);
                }
            }
            (JobPhase::Writing, JobKind::Flush { .. }) => {
                job.phase = JobPhase::Flushing;
                job.pending = 1;
                let tag = self.inner_tag(InnerOp::JobFlush);
                self.submit_inner(tag, Operation::Flush);
            }
            (JobPhase::Writing, JobKind::Fua { .. }) | (JobPhase::Flushing, _) => self.finish_job(),
        }
    }

    /// The active job is done: its versions are durable (unless it failed) and its operation
    /// is ready.
    fn finish_job(&mut self) {
        let job = self.active_job.take().expect("finishing the active job");
        let result = match job.error {
            Some(error) => Err(error),
            None => {
                // A FUA write orders after every version completed so far.
                let fua_seq = self.next_seq;
                if matches!(job.kind, JobKind::Fua { .. }) {
                    self.next_seq += 1;
                }
                for (block, (seq, _)) in &job.blocks {
                    let durable_seq = seq.unwrap_or(fua_seq);
                    if let Some(versions) = self.overlay.get_mut(block) {
                        versions.retain(|version| version.seq > durable_seq);
                        if versions.is_empty() {
                            self.overlay.remove(block);
                        }
                    }
                }
                Ok(())
            }
        };
        let payload = match job.kind {
            JobKind::Fua { buffers, .. } => Payload::Write(buffers),
            JobKind::Flush { .. } => Payload::None,
        };
        // The operation is gone if its channel closed.
        if let Some(op) = self.ops.get_mut(&job.op_id) {
            op.state = OpState::Ready { result, payload };
        }
    }

    fn close_channel(&mut self, channel: usize) {
        self.channels[channel].in_flight = 0;
        // Jobs and inner operations of the channel still run (a flush still makes data
        // durable); their results are discarded because their operations are gone.
        self.ops.retain(|_, op| op.channel != channel);
    }

    fn power_cut(&mut self) {
        if !matches!(self.power, Power::On) {
            return;
        }
        let block_size = self.geometry.block_size;
        // Every value each block may hold after the cut; `None` is "what the inner device
        // holds", valid only where no inner write may have changed it.
        let mut choices: BTreeMap<u64, Vec<Option<BlockData>>> = BTreeMap::new();
        if let Some(job) = &self.active_job {
            let writing = job.phase != JobPhase::Capturing;
            for (block, (seq, data)) in &job.blocks {
                let options = choices.entry(*block).or_default();
                if writing {
                    let prior = job.prior.get(block).expect("every job block is captured before writing");
                    options.push(Some(BlockData::Bytes(prior.clone())));
                    // The version being forwarded, unless the overlay still lists it below.
                    let listed = seq.is_some_and(|seq| {
                        self.overlay.get(block).is_some_and(|versions| versions.iter().any(|v| v.seq == seq))
                    });
                    if !listed {
                        options.push(Some(data.clone()));
                    }
                } else {
                    options.push(None);
                    if seq.is_none() {
                        options.push(Some(data.clone())); // a FUA write in flight
                    }
                }
            }
        }
        for (block, versions) in &self.overlay {
            let options = choices.entry(*block).or_insert_with(|| vec![None]);
            options.extend(versions.iter().map(|version| Some(version.data.clone())));
        }
        let queued_fua = self.jobs.iter().filter_map(|(_, kind)| match kind {
            JobKind::Fua { offset_blocks, buffers } => Some((*offset_blocks, WriteData::Buffers(buffers.clone()))),
            JobKind::Flush { .. } => None,
        });
        let plain = self.ops.values().filter_map(|op| match &op.state {
            OpState::Writing { offset_blocks, data } => Some((
                *offset_blocks,
                match data {
                    WriteData::Buffers(buffers) => WriteData::Buffers(buffers.clone()),
                    WriteData::Zeroes { num_blocks } => WriteData::Zeroes { num_blocks: *num_blocks },
                },
            )),
            _ => None,
        });
        let in_flight: Vec<(u64, WriteData)> = queued_fua.chain(plain).collect();
        for (offset_blocks, data) in &in_flight {
            for index in 0..data.num_blocks(block_size) {
                let options = choices.entry(offset_blocks + index).or_insert_with(|| vec![None]);
                options.push(Some(data.block(index, block_size)));
            }
        }
        let mut image = BTreeMap::new();
        for (block, options) in choices {
            let pick = self.cut_rng.random_range(0..options.len());
            if let Some(data) = &options[pick] {
                image.insert(block, data.clone());
            }
        }
        // Nothing will be delivered: drop the state that only served completions.
        self.ops.clear();
        self.jobs.clear();
        self.active_job = None;
        self.overlay.clear();
        for channel in &mut self.channels {
            channel.in_flight = 0;
        }
        self.power = Power::Cut { image, settled: false };
    }

    fn settle(&mut self) -> Result<(), FaultError> {
        let image = match &mut self.power {
            Power::On => return Err(FaultError::PowerOn { device: self.name.clone() }),
            Power::Cut { settled: true, .. } => return Ok(()),
            Power::Cut { image, .. } => std::mem::take(image),
        };
        if self.inner_channel.is_none() {
            self.inner_channel = Some(self.inner.open_channel()?);
        }
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        // What never reached the inner device never will; what did must finish first, so it
        // cannot land on top of the image.
        self.inner_backlog.clear();
        self.inner_ops.clear();
        self.wait_inner_idle(deadline, &mut |_| Ok(()))?;

        let block_size = self.geometry.block_size as usize;
        let runs = runs(image.keys().copied(), self.geometry.max_transfer_blocks);
        let mut writes: VecDeque<Operation> = runs
            .into_iter()
            .map(|(first_block, count)| {
                let mut bytes = vec![0; count as usize * block_size];
                for (index, chunk) in bytes.chunks_exact_mut(block_size).enumerate() {
                    image[&(first_block + index as u64)].copy_to(chunk);
                }
                let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(&bytes)));
                Operation::Write { offset_blocks: first_block, buffers, fua: false }
            })
            .collect();
        writes.push_back(Operation::Flush);
        let name = self.name.clone();
        let mut check = |completion: Completion| {
            completion.result.map_err(|source| FaultError::Inner { device: name.clone(), source: *source })
        };
        while let Some(operation) = writes.pop_front() {
            // The flush goes alone, after every image write completed.
            if matches!(operation, Operation::Flush) {
                self.wait_inner_idle(deadline, &mut check)?;
            }
            match self.inner_channel().submit(0, operation) {
                Ok(()) => {}
                Err(SubmitError::QueueFull(operation)) => {
                    writes.push_front(*operation);
                    self.poll_inner_once(deadline, &mut check)?;
                }
                Err(SubmitError::Invalid(source)) => {
                    return Err(FaultError::Inner { device: self.name.clone(), source })
                }
            }
        }
        self.wait_inner_idle(deadline, &mut check)?;
        self.power = Power::Cut { image: BTreeMap::new(), settled: true };
        Ok(())
    }

    fn wait_inner_idle(
        &mut self,
        deadline: Instant,
        check: &mut dyn FnMut(Completion) -> Result<(), FaultError>,
    ) -> Result<(), FaultError> {
        while self.inner_channel().in_flight() > 0 {
            self.poll_inner_once(deadline, check)?;
        }
        Ok(())
    }

    fn poll_inner_once(
        &mut self,
        deadline: Instant,
        check: &mut dyn FnMut(Completion) -> Result<(), FaultError>,
    ) -> Result<(), FaultError> {
        let mut completions = Vec::new();
        if self.inner_channel().poll(&mut completions) == 0 {
            let in_flight = self.inner_channel().in_flight();
            if Instant::now() > deadline {
                let waited_ms = SETTLE_TIMEOUT.as_millis();
                return Err(FaultError::Stalled { device: self.name.clone(), in_flight, waited_ms });
            }
            std::thread::yield_now();
        }
        completions.into_iter().try_for_each(check)
    }
}

/// Buffers of an operation, given back when it fails without reaching the inner device.
fn payload_of(operation: Operation) -> Payload {
    match operation {
        Operation::Read { buffers, .. } => Payload::Read(buffers),
        Operation::Write { buffers, .. } => Payload::Write(buffers),
        Operation::Flush | Operation::Unmap { .. } | Operation::WriteZeroes { .. } => Payload::None,
    }
}

/// Contiguous runs `(first_block, count)` of ascending blocks, each at most `max_blocks` long.
fn runs(blocks: impl Iterator<Item = u64>, max_blocks: u32) -> Vec<(u64, u64)> {
    let max_blocks = u64::from(max_blocks.max(1));
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for block in blocks {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == block && *count < max_blocks => *count += 1,
            _ => runs.push((block, 1)),
        }
    }
    runs
}
