//! FaultDevice: rules fire as specified, and the volatile cache + power cut model keeps its
//! contract over many seeded workloads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chronicle::device::fault::{Effect, FaultController, FaultDevice, FaultRule, Trigger};
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::{
    Channel, Completion, Device, DmaBuf, IoBuffers, IoError, Operation, OperationKind, SubmitError,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BLOCK_SIZE: u32 = 512;

fn memory(block_count: u64, reorder_seed: Option<u64>) -> MemoryDevice {
    let mut options = MemoryOptions::new(BLOCK_SIZE, block_count);
    options.reorder_seed = reorder_seed;
    MemoryDevice::new("mem", options)
}

fn fault_over(inner: &MemoryDevice, seed: u64) -> (FaultDevice, FaultController, Box<dyn Channel>) {
    let (device, controller) = FaultDevice::new(Arc::new(inner.clone()), seed);
    let channel = device.open_channel().expect("fault channel");
    (device, controller, channel)
}

fn write_op(offset_blocks: u64, fill: u8, blocks: usize, fua: bool) -> Operation {
    let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(&vec![fill; blocks * BLOCK_SIZE as usize])));
    Operation::Write { offset_blocks, buffers, fua }
}

fn read_op(offset_blocks: u64, blocks: usize) -> Operation {
    Operation::Read { offset_blocks, buffers: IoBuffers::single(DmaBuf::zeroed(blocks * BLOCK_SIZE as usize)) }
}

/// Polls until nothing is in flight (bounded), returning the completions in delivery order.
fn drain(channel: &mut dyn Channel) -> Vec<Completion> {
    let mut completions = Vec::new();
    for _ in 0..1000 {
        if channel.in_flight() == 0 {
            return completions;
        }
        channel.poll(&mut completions);
    }
    panic!("channel did not drain: {} in flight", channel.in_flight());
}

fn run(channel: &mut dyn Channel, tag: u64, operation: Operation) -> Completion {
    channel.submit(tag, operation).expect("accepted");
    let mut completions = drain(channel);
    assert_eq!(completions.len(), 1);
    completions.pop().unwrap()
}

fn read_back(channel: &mut dyn Channel, offset_blocks: u64, blocks: usize) -> Vec<u8> {
    match run(channel, 999, read_op(offset_blocks, blocks)) {
        Completion { result: Ok(()), payload: chronicle::device::Payload::Read(buffers), .. } => buffers.to_vec(),
        other => panic!("read failed: {other:?}"),
    }
}

#[test]
fn nth_error_rule_fails_only_the_nth_matching_write() {
    let inner = memory(64, None);
    let (_device, controller, mut channel) = fault_over(&inner, 1);
    controller.add_rule(FaultRule::new(Trigger::Nth(3), Effect::Error).kinds(&[OperationKind::Write]));
    let mut failed = Vec::new();
    for tag in 1..=5u64 {
        read_back(channel.as_mut(), 0, 1); // reads do not count toward the write rule
        let completion = run(channel.as_mut(), tag, write_op(tag, tag as u8, 1, false));
        if let Err(error) = completion.result {
            assert!(matches!(*error, IoError::Media { kind: OperationKind::Write, offset_blocks: 3, .. }), "{error}");
            failed.push(tag);
        }
    }
    assert_eq!(failed, vec![3]);
    assert_eq!(read_back(channel.as_mut(), 3, 1), vec![0; BLOCK_SIZE as usize], "a failed write changes nothing");
    let writes = controller.stats().kind(OperationKind::Write);
    assert_eq!((writes.submitted, writes.completed, writes.failed), (5, 4, 1));
    assert_eq!(controller.stats().kind(OperationKind::Read).failed, 0);
}

#[test]
fn once_rule_with_a_range_fails_the_first_overlapping_operation_only() {
    let inner = memory(64, None);
    let (_device, controller, mut channel) = fault_over(&inner, 2);
    controller.add_rule(FaultRule::new(Trigger::Once, Effect::Error).range(10..20));
    assert!(run(channel.as_mut(), 1, write_op(5, 1, 5, false)).result.is_ok(), "blocks 5..10 do not overlap");
    assert!(run(channel.as_mut(), 2, Operation::Flush).result.is_ok(), "a flush has no extent");
    assert!(run(channel.as_mut(), 3, write_op(8, 2, 4, false)).result.is_err(), "blocks 8..12 overlap");
    assert!(run(channel.as_mut(), 4, write_op(15, 3, 1, false)).result.is_ok(), "the rule is spent");
}

#[test]
fn probability_rule_is_seeded_and_removable() {
    let failures = |seed: u64| {
        let inner = memory(64, None);
        let (_device, controller, mut channel) = fault_over(&inner, seed);
        let rule = controller.add_rule(FaultRule::new(Trigger::Probability(0.25), Effect::Error));
        let pattern: Vec<bool> =
            (0..400).map(|tag| run(channel.as_mut(), tag, read_op(tag % 64, 1)).result.is_err()).collect();
        assert!(controller.remove_rule(rule));
        assert!(run(channel.as_mut(), 0, read_op(0, 1)).result.is_ok(), "removed rules do not fire");
        pattern
    };
    let first = failures(7);
    let count = first.iter().filter(|failed| **failed).count();
    assert!((60..=140).contains(&count), "about a quarter of 400 reads fail, got {count}");
    assert_eq!(first, failures(7), "same seed, same failures");
    assert_ne!(first, failures(8), "another seed, other failures");
}

#[test]
fn delay_rule_withholds_the_completion_for_n_polls() {
    let inner = memory(64, None);
    let (_device, controller, mut channel) = fault_over(&inner, 3);
    controller.add_rule(FaultRule::new(Trigger::Always, Effect::Delay { polls: 3 }).kinds(&[OperationKind::Flush]));
    channel.submit(1, Operation::Flush).unwrap();
    channel.submit(2, write_op(0, 9, 1, false)).unwrap();
    let mut completions = Vec::new();
    channel.poll(&mut completions);
    assert_eq!(completions.iter().map(|c| c.tag).collect::<Vec<_>>(), vec![2], "the write is not delayed");
    for poll in 2..=3 {
        assert_eq!(channel.poll(&mut completions), 0, "poll {poll} still withholds the flush");
    }
    assert_eq!(channel.poll(&mut completions), 1, "the fourth poll delivers the flush");
    assert_eq!(completions[1].tag, 1);
    assert_eq!(channel.in_flight(), 0);
}

#[test]
fn writes_stay_in_the_cache_until_a_flush_covers_them() {
    let inner = memory(64, None);
    let (_device, controller, mut channel) = fault_over(&inner, 4);
    assert!(run(channel.as_mut(), 1, write_op(4, 0xA1, 2, false)).result.is_ok());
    assert_eq!(inner.read_blocks(4, 2), vec![0; 2 * BLOCK_SIZE as usize], "not yet on the inner device");
    assert_eq!(read_back(channel.as_mut(), 4, 2), vec![0xA1; 2 * BLOCK_SIZE as usize], "reads see the cache");
    assert_eq!(controller.unflushed_blocks(), 2);

    // A write that completes after the flush was submitted is not covered by it.
    channel.submit(2, Operation::Flush).unwrap();
    channel.submit(3, write_op(10, 0xB2, 1, false)).unwrap();
    assert!(drain(channel.as_mut()).iter().all(|c| c.result.is_ok()));
    assert_eq!(inner.read_blocks(4, 2), vec![0xA1; 2 * BLOCK_SIZE as usize]);
    assert_eq!(inner.read_blocks(10, 1), vec![0; BLOCK_SIZE as usize]);
    assert_eq!(controller.unflushed_blocks(), 1, "only the uncovered write is still cached");

    assert!(run(channel.as_mut(), 4, write_op(20, 0xC3, 1, true)).result.is_ok());
    assert_eq!(inner.read_blocks(20, 1), vec![0xC3; BLOCK_SIZE as usize], "FUA is durable at completion");
    assert!(run(channel.as_mut(), 5, Operation::WriteZeroes { offset_blocks: 4, num_blocks: 1 }).result.is_ok());
    assert_eq!(read_back(channel.as_mut(), 4, 2)[..BLOCK_SIZE as usize], vec![0; BLOCK_SIZE as usize]);
}

#[test]
fn cache_memory_is_bounded_without_flushes() {
    let inner = memory(8, None);
    let (_device, controller, mut channel) = fault_over(&inner, 5);
    for tag in 0..100u64 {
        assert!(run(channel.as_mut(), tag, write_op(1, tag as u8, 1, false)).result.is_ok());
    }
    assert!(controller.unflushed_versions() <= chronicle::device::fault::MAX_VERSIONS_PER_BLOCK);
    assert_eq!(read_back(channel.as_mut(), 1, 1), vec![99; BLOCK_SIZE as usize], "the newest version is kept");
    assert!(run(channel.as_mut(), 100, Operation::Flush).result.is_ok());
    assert_eq!(controller.unflushed_versions(), 0, "durable versions leave the cache");
    assert_eq!(inner.read_blocks(1, 1), vec![99; BLOCK_SIZE as usize]);
}

// ---------------------------------------------------------------------------------------------
// Power cuts.
//
// The checker records, per write, when it was submitted and completed (as the caller saw it)
// and whether it became durable (a FUA write that completed, or a write that completed before
// the submission of a flush that completed). After the cut, each block must hold exactly the
// bytes of one write W covering it such that no durable write D of that block was submitted
// after W completed (D happened after W, so W can no longer be there). The initial contents
// count as a durable write that completed at time 0.

const CUT_DEVICE_BLOCKS: u64 = 24;
const CUT_SEEDS: u64 = 1200;

#[derive(Debug, Clone)]
struct WriteRecord {
    tag: u64,
    offset_blocks: u64,
    num_blocks: u64,
    /// Identifies the bytes written; 0 for zeroes (unmap, write-zeroes).
    fill: u32,
    fua: bool,
    submitted_at: u64,
    completed_at: Option<u64>,
    failed: bool,
    durable: bool,
}

impl WriteRecord {
    fn covers(&self, block: u64) -> bool {
        (self.offset_blocks..self.offset_blocks + self.num_blocks).contains(&block)
    }

    fn in_flight(&self) -> bool {
        self.completed_at.is_none()
    }
}

/// Bytes a write puts in `block`: its fill and the block number, so a block from the wrong
/// write or the wrong place is recognized.
fn block_bytes(fill: u32, block: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_SIZE as usize];
    if fill != 0 {
        for chunk in bytes.chunks_exact_mut(16) {
            chunk[..4].copy_from_slice(&fill.to_le_bytes());
            chunk[4..12].copy_from_slice(&block.to_le_bytes());
        }
    }
    bytes
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct CutOutcome {
    image: Vec<u8>,
    /// Multi-block writes in flight at the cut that ended partly new, partly not.
    torn_writes: usize,
    /// Blocks whose newest completed write was unflushed and is not what survived.
    reverted_unflushed: usize,
    /// Blocks that ended with a completed but unflushed write.
    kept_unflushed: usize,
    /// Blocks with a durable write besides the initial contents.
    durable_blocks: usize,
}

struct Scenario {
    rng: ChaCha8Rng,
    inner: MemoryDevice,
    controller: FaultController,
    channel: Box<dyn Channel>,
    writes: Vec<WriteRecord>,
    /// Pending flushes: tag -> submission time.
    flushes: BTreeMap<u64, u64>,
    clock: u64,
}

impl Scenario {
    fn new(seed: u64) -> (Scenario, FaultDevice) {
        let inner = memory(CUT_DEVICE_BLOCKS, (seed % 2 == 0).then_some(seed));
        for block in 0..CUT_DEVICE_BLOCKS {
            inner.write_blocks(block, &block_bytes(1, block));
        }
        let initial = WriteRecord {
            tag: 0,
            offset_blocks: 0,
            num_blocks: CUT_DEVICE_BLOCKS,
            fill: 1,
            fua: false,
            submitted_at: 0,
            completed_at: Some(0),
            failed: false,
            durable: true,
        };
        let (device, controller, channel) = fault_over(&inner, seed);
        // Delays keep writes and flushes in flight across polls, so cuts catch them there.
        controller.add_rule(FaultRule::new(Trigger::Probability(0.3), Effect::Delay { polls: 2 }));
        controller.add_rule(FaultRule::new(Trigger::Probability(0.05), Effect::Error).kinds(&[OperationKind::Write]));
        let scenario = Scenario {
            rng: ChaCha8Rng::seed_from_u64(seed),
            inner,
            controller,
            channel,
            writes: vec![initial],
            flushes: BTreeMap::new(),
            clock: 1,
        };
        (scenario, device)
    }

    fn submit_random(&mut self) {
        self.clock += 1;
        let tag = self.clock;
        let choice = self.rng.random_range(0..100);
        let operation = if choice < 70 {
            let num_blocks = self.rng.random_range(1..=4u64);
            let offset_blocks = self.rng.random_range(0..=CUT_DEVICE_BLOCKS - num_blocks);
            let zeroes = choice >= 60;
            let fill = if zeroes { 0 } else { tag as u32 };
            let fua = !zeroes && self.rng.random_bool(0.2);
            self.writes.push(WriteRecord {
                tag,
                offset_blocks,
                num_blocks,
                fill,
                fua,
                submitted_at: self.clock,
                completed_at: None,
                failed: false,
                durable: false,
            });
            if zeroes && choice % 2 == 0 {
                Operation::Unmap { offset_blocks, num_blocks }
            } else if zeroes {
                Operation::WriteZeroes { offset_blocks, num_blocks }
            } else {
                let bytes: Vec<u8> =
                    (offset_blocks..offset_blocks + num_blocks).flat_map(|block| block_bytes(fill, block)).collect();
                // Two segments split mid-block, so copies cross buffer boundaries.
                let split = self.rng.random_range(1..bytes.len());
                let buffers = IoBuffers::from_segments(vec![
                    DmaBuf::copy_from(&bytes[..split]),
                    DmaBuf::copy_from(&bytes[split..]),
                ]);
                Operation::Write { offset_blocks, buffers: Arc::new(buffers), fua }
            }
        } else if choice < 85 {
            self.flushes.insert(tag, self.clock);
            Operation::Flush
        } else {
            read_op(self.rng.random_range(0..CUT_DEVICE_BLOCKS), 1)
        };
        self.channel.submit(tag, operation).expect("the queue is deep enough for this workload");
    }

    fn poll(&mut self) {
        let mut completions = Vec::new();
        self.channel.poll(&mut completions);
        for completion in completions {
            self.clock += 1;
            let failed = completion.result.is_err();
            match completion.kind {
                OperationKind::Read => {}
                OperationKind::Flush => {
                    let submitted_at = self.flushes.remove(&completion.tag).expect("a known flush");
                    if !failed {
                        for write in &mut self.writes {
                            if write.completed_at.is_some_and(|completed_at| completed_at < submitted_at)
                                && !write.failed
                            {
                                write.durable = true;
                            }
                        }
                    }
                }
                OperationKind::Write | OperationKind::Unmap | OperationKind::WriteZeroes => {
                    let write = self.writes.iter_mut().find(|w| w.tag == completion.tag).expect("a known write");
                    write.completed_at = Some(self.clock);
                    write.failed = failed;
                    write.durable = write.fua && !failed;
                }
            }
        }
    }

    /// Cuts the power, checks the dead device, settles and checks the image.
    fn cut_and_check(mut self, seed: u64) -> CutOutcome {
        self.controller.power_cut();
        assert!(!self.controller.is_powered());
        assert_eq!(self.channel.in_flight(), 0, "seed {seed}: nothing completes after a cut");
        match self.channel.submit(1, write_op(0, 1, 1, false)) {
            Err(SubmitError::Invalid(IoError::PowerLost { .. })) => {}
            other => panic!("seed {seed}: submit after the cut gave {other:?}"),
        }
        assert_eq!(self.channel.poll(&mut Vec::new()), 0, "seed {seed}: no completion after the cut");
        self.controller.settle().unwrap_or_else(|error| panic!("seed {seed}: settle failed: {error}"));
        let image = self.inner.snapshot();
        check_image(seed, &self.writes, image)
    }
}

fn check_image(seed: u64, writes: &[WriteRecord], image: Vec<u8>) -> CutOutcome {
    let mut outcome = CutOutcome::default();
    let block_size = BLOCK_SIZE as usize;
    let mut survivors: BTreeMap<u64, u32> = BTreeMap::new();
    for block in 0..CUT_DEVICE_BLOCKS {
        let bytes = &image[block as usize * block_size..(block as usize + 1) * block_size];
        let fill = u32::from_le_bytes(bytes[..4].try_into().unwrap());
        assert_eq!(bytes, block_bytes(fill, block), "seed {seed}: block {block} holds bytes no write put there");
        let covering: Vec<&WriteRecord> = writes.iter().filter(|w| w.covers(block) && !w.failed).collect();
        let durable: Vec<&WriteRecord> = covering.iter().copied().filter(|w| w.durable).collect();
        let allowed = |write: &WriteRecord| {
            !durable.iter().any(|d| d.tag != write.tag && write.completed_at.is_some_and(|c| c < d.submitted_at))
        };
        assert!(
            covering.iter().any(|w| w.fill == fill && allowed(w)),
            "seed {seed}: block {block} holds fill {fill}, which a durable write superseded; writes: {covering:#?}"
        );
        survivors.insert(block, fill);
        if durable.iter().any(|d| d.tag != 0) {
            outcome.durable_blocks += 1;
        }
        let newest_completed = covering.iter().filter(|w| w.completed_at.is_some()).max_by_key(|w| w.completed_at);
        if let Some(newest) = newest_completed.filter(|w| !w.durable) {
            let survivor_in_flight = covering.iter().any(|w| w.in_flight() && w.fill == fill && w.fill != 0);
            if newest.fill != fill && !survivor_in_flight {
                outcome.reverted_unflushed += 1;
            }
        }
        if covering.iter().any(|w| !w.durable && !w.in_flight() && w.fill == fill && w.fill != 0) {
            outcome.kept_unflushed += 1;
        }
    }
    for write in writes.iter().filter(|w| w.in_flight() && w.num_blocks > 1 && w.fill != 0) {
        let landed = (write.offset_blocks..write.offset_blocks + write.num_blocks)
            .filter(|block| survivors[block] == write.fill)
            .count() as u64;
        if landed > 0 && landed < write.num_blocks {
            outcome.torn_writes += 1;
        }
    }
    outcome.image = image;
    outcome
}

fn cut_scenario(seed: u64) -> CutOutcome {
    let (mut scenario, _device) = Scenario::new(seed);
    let steps = scenario.rng.random_range(1..50);
    for _ in 0..steps {
        scenario.submit_random();
        for _ in 0..scenario.rng.random_range(0..3) {
            scenario.poll();
        }
    }
    scenario.cut_and_check(seed)
}

#[test]
fn power_cuts_keep_durable_data_and_choose_only_possible_versions() {
    let mut totals = CutOutcome::default();
    for seed in 0..CUT_SEEDS {
        let outcome = cut_scenario(seed);
        totals.torn_writes += outcome.torn_writes;
        totals.reverted_unflushed += outcome.reverted_unflushed;
        totals.kept_unflushed += outcome.kept_unflushed;
        totals.durable_blocks += outcome.durable_blocks;
    }
    println!(
        "{CUT_SEEDS} cuts: {} torn in-flight writes, {} unflushed blocks reverted, {} kept, {} blocks with durable writes",
        totals.torn_writes, totals.reverted_unflushed, totals.kept_unflushed, totals.durable_blocks
    );
    // The model must exercise every outcome, or the checks above prove little.
    assert!(totals.torn_writes > 0, "no multi-block write tore");
    assert!(totals.reverted_unflushed > 0, "no unflushed write was lost");
    assert!(totals.kept_unflushed > 0, "no unflushed write survived");
    assert!(totals.durable_blocks > 0, "no durable write was checked");
}

#[test]
fn power_cuts_are_deterministic_per_seed() {
    for seed in [3, 17, 256, 1001] {
        assert_eq!(cut_scenario(seed), cut_scenario(seed), "seed {seed}");
    }
    let images: BTreeSet<Vec<u8>> = (0..20).map(|seed| cut_scenario(seed).image).collect();
    assert!(images.len() > 10, "different seeds give different images");
}

#[test]
fn a_cut_during_a_flush_may_lose_the_flush_and_a_new_device_sees_the_settled_image() {
    let mut lost = 0;
    let mut kept = 0;
    for seed in 0..200 {
        let inner = memory(16, None);
        let (_device, controller, mut channel) = fault_over(&inner, seed);
        assert!(run(channel.as_mut(), 1, write_op(2, 0x5A, 4, false)).result.is_ok());
        // The flush is submitted and polled once: its job is part way when the power goes.
        channel.submit(2, Operation::Flush).unwrap();
        channel.poll(&mut Vec::new());
        controller.power_cut();
        controller.settle().unwrap();
        let blocks = inner.read_blocks(2, 4);
        for block in blocks.chunks_exact(BLOCK_SIZE as usize) {
            assert!(block.iter().all(|b| *b == 0x5A) || block.iter().all(|b| *b == 0), "seed {seed}: old or new");
            if block[0] == 0x5A {
                kept += 1;
            } else {
                lost += 1;
            }
        }
        // Reboot: a fresh fault device over the same media reads the settled image.
        let (_rebooted, _controller, mut channel) = fault_over(&inner, seed);
        assert_eq!(read_back(channel.as_mut(), 2, 4), blocks, "seed {seed}");
    }
    assert!(lost > 0 && kept > 0, "a cut during a flush can go either way ({lost} lost, {kept} kept)");
}

#[test]
fn settle_needs_a_cut() {
    let inner = memory(4, None);
    let (_device, controller, _channel) = fault_over(&inner, 0);
    assert!(matches!(controller.settle(), Err(chronicle::device::fault::FaultError::PowerOn { .. })));
}

#[test]
// FaultDevice::new takes Arc<dyn Device> like every wrapper; a fault device is single-threaded.
#[allow(clippy::arc_with_non_send_sync)]
fn inner_device_failures_reach_the_caller() {
    let memory_device = memory(16, None);
    let (inner, inner_controller) = FaultDevice::new(Arc::new(memory_device), 0);
    let (outer, _controller) = FaultDevice::new(Arc::new(inner), 0);
    let mut channel = outer.open_channel().unwrap();
    inner_controller.power_cut();
    // The inner device refuses everything now: reads and flushes fail; a plain write still
    // completes into the outer cache.
    let read = run(channel.as_mut(), 1, read_op(0, 1));
    assert!(matches!(read.result.as_ref().map_err(|e| &**e), Err(IoError::PowerLost { .. })), "{read:?}");
    assert!(run(channel.as_mut(), 2, write_op(0, 7, 1, false)).result.is_ok());
    let flush = run(channel.as_mut(), 3, Operation::Flush);
    assert!(matches!(flush.result.as_ref().map_err(|e| &**e), Err(IoError::PowerLost { .. })), "{flush:?}");
}
