//! One conformance check for every Device backend: seeded random reads, writes (multi-segment,
//! FUA), flushes, unmaps and write-zeroes checked against an in-memory model; back-pressure;
//! typed rejection of invalid operations.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use chronicle::device::fault::FaultDevice;
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::uring::{UringContext, UringContextOptions, UringDevice, UringOptions};
use chronicle::device::{
    Channel, Completion, Device, DmaBuf, ForeignMemory, IoBuffers, IoError, Operation, OperationKind, Payload,
    SubmitError,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEEDS: u64 = 4;
const BATCHES: usize = 60;
const BLOCK_COUNT: u64 = 256;

/// A backend under test: the device, and what to do when a poll found nothing (an io_uring
/// backend waits for the kernel; in-memory backends must always make progress).
struct Backend {
    label: String,
    device: Box<dyn Device>,
    idle: Box<dyn Fn()>,
}

fn memory_backend(seed: u64) -> Backend {
    let mut options = MemoryOptions::new(512, BLOCK_COUNT);
    options.reorder_seed = Some(seed);
    options.queue_depth = 16;
    Backend {
        label: format!("memory (reorder seed {seed})"),
        device: Box::new(MemoryDevice::new("mem", options)),
        idle: Box::new(|| {}),
    }
}

fn fault_backend(seed: u64) -> Backend {
    let inner = MemoryDevice::new("mem", MemoryOptions::new(4096, BLOCK_COUNT));
    let (device, _controller) = FaultDevice::new(Arc::new(inner), seed);
    Backend { label: "fault over memory, no rules".into(), device: Box::new(device), idle: Box::new(|| {}) }
}

fn uring_context() -> Rc<UringContext> {
    let options = UringContextOptions { entries: 64, registered_buffer_count: 8, registered_buffer_size: 256 << 10 };
    UringContext::new(&options).expect("io_uring context")
}

fn test_dir() -> tempfile::TempDir {
    let base = std::env::var("CHRONICLE_TEST_DIR").map(Into::into).unwrap_or_else(|_| std::env::temp_dir());
    tempfile::tempdir_in(base).expect("temporary directory")
}

/// Opens a file with O_DIRECT, or buffered (and says so) where the file system refuses it.
fn open_uring(
    dir: &tempfile::TempDir,
    file: &str,
    blocks: u64,
    queue_depth: usize,
    ctx: &Rc<UringContext>,
) -> UringDevice {
    let options =
        UringOptions { create_size: Some(blocks * 4096), allow_buffered: true, queue_depth, ..UringOptions::default() };
    let device = UringDevice::open(dir.path().join(file), &options, ctx.clone()).expect("open the file");
    if !device.is_direct() {
        println!("{}: O_DIRECT refused by the file system; testing buffered I/O", dir.path().display());
    }
    device
}

/// A fresh (zeroed) file per backend, so each starts like the model.
fn uring_backend(dir: &tempfile::TempDir, file: &str) -> Backend {
    let ctx = uring_context();
    let device = open_uring(dir, file, BLOCK_COUNT, 32, &ctx);
    let label = format!("io_uring on a file (direct: {})", device.is_direct());
    Backend { label, device: Box::new(device), idle: Box::new(move || _ = ctx.wait(Some(Duration::from_millis(20)))) }
}

/// Polls until every operation came back, waiting through `idle` when nothing is ready.
fn drain(backend: &Backend, channel: &mut dyn Channel, completions: &mut Vec<Completion>) {
    for _ in 0..100_000 {
        if channel.in_flight() == 0 {
            return;
        }
        if channel.poll(completions) == 0 {
            (backend.idle)();
        }
    }
    panic!("{}: {} operations never completed", backend.label, channel.in_flight());
}

/// `len` bytes as 1–4 segments from the channel's allocator; with an alignment above one,
/// segment lengths are multiples of it.
fn segments(rng: &mut ChaCha8Rng, channel: &dyn Channel, len: usize) -> IoBuffers {
    let alignment = channel.geometry().buffer_alignment.max(1) as usize;
    let unit = if alignment > 1 { alignment } else { 1 };
    let units = len / unit;
    let mut cuts: Vec<usize> = (0..rng.random_range(0..4)).map(|_| rng.random_range(1..units.max(2)) * unit).collect();
    cuts.retain(|cut| *cut < len);
    cuts.push(0);
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    IoBuffers::from_segments(cuts.windows(2).map(|pair| channel.alloc(pair[1] - pair[0])).collect())
}

enum Expect {
    /// A read whose bytes must equal these.
    Read(Vec<u8>),
    /// A write whose buffers must come back (the same allocation).
    Write(Arc<IoBuffers>),
    Nothing,
}

fn conformance(backend: &Backend, seed: u64) {
    let label = &backend.label;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut channel = backend.device.open_channel().expect("channel");
    let geometry = channel.geometry();
    let block_size = geometry.block_size as usize;
    let blocks = geometry.block_count.min(BLOCK_COUNT);
    let mut model = vec![0u8; blocks as usize * block_size];
    let mut completions = Vec::new();
    // Start from zeroes whatever the device held (a block device under test may hold anything).
    channel.submit(0, Operation::WriteZeroes { offset_blocks: 0, num_blocks: blocks }).expect("zero the device");
    drain(backend, channel.as_mut(), &mut completions);
    assert!(completions.drain(..).all(|c| c.result.is_ok()), "{label}, seed {seed}: zeroing failed");
    for batch in 0..BATCHES {
        // Operations of one batch never overlap, so any completion order is correct.
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut expected: BTreeMap<u64, (OperationKind, Expect)> = BTreeMap::new();
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for index in 0..rng.random_range(1..12u64) {
            let tag = batch as u64 * 100 + index;
            let num_blocks = if rng.random_bool(0.1) { rng.random_range(33..=64) } else { rng.random_range(1..=8) };
            let offset_blocks = rng.random_range(0..=blocks - num_blocks);
            let extent = (offset_blocks, offset_blocks + num_blocks);
            let kind = rng.random_range(0..100);
            if kind >= 10 && taken.iter().any(|(start, end)| extent.0 < *end && *start < extent.1) {
                continue;
            }
            let bytes = |offset_blocks: u64, num_blocks: u64| {
                offset_blocks as usize * block_size..(offset_blocks + num_blocks) as usize * block_size
            };
            let (operation, expect) = if kind < 10 {
                (Operation::Flush, Expect::Nothing)
            } else if kind < 45 {
                let buffers = segments(&mut rng, channel.as_ref(), num_blocks as usize * block_size);
                let expect = Expect::Read(model[bytes(offset_blocks, num_blocks)].to_vec());
                (Operation::Read { offset_blocks, buffers }, expect)
            } else if kind < 88 {
                let mut buffers = segments(&mut rng, channel.as_ref(), num_blocks as usize * block_size);
                let data: Vec<u8> = (0..buffers.len()).map(|_| rng.random()).collect();
                buffers.write_at(0, &data);
                writes.push((offset_blocks, data));
                let buffers = Arc::new(buffers);
                let fua = rng.random_bool(0.25);
                (Operation::Write { offset_blocks, buffers: buffers.clone(), fua }, Expect::Write(buffers))
            } else if kind < 94 {
                writes.push((offset_blocks, vec![0; num_blocks as usize * block_size]));
                (Operation::Unmap { offset_blocks, num_blocks }, Expect::Nothing)
            } else {
                writes.push((offset_blocks, vec![0; num_blocks as usize * block_size]));
                (Operation::WriteZeroes { offset_blocks, num_blocks }, Expect::Nothing)
            };
            if kind >= 10 {
                taken.push(extent);
            }
            expected.insert(tag, (operation.kind(), expect));
            let mut operation = operation;
            // Back-pressure: poll until the channel takes it.
            for attempt in 0.. {
                match channel.submit(tag, operation) {
                    Ok(()) => break,
                    Err(SubmitError::QueueFull(returned)) => {
                        assert!(attempt < 100_000, "{label}, seed {seed}: queue never drained");
                        operation = *returned;
                        if channel.poll(&mut completions) == 0 {
                            (backend.idle)();
                        }
                    }
                    Err(SubmitError::Invalid(error)) => {
                        panic!("{label}, seed {seed}: valid operation refused: {error}")
                    }
                }
            }
        }
        drain(backend, channel.as_mut(), &mut completions);
        for completion in completions.drain(..) {
            let (kind, expect) = expected
                .remove(&completion.tag)
                .unwrap_or_else(|| panic!("{label}, seed {seed}: unknown or repeated tag {}", completion.tag));
            assert_eq!(completion.kind, kind, "{label}, seed {seed}");
            if let Err(error) = &completion.result {
                panic!("{label}, seed {seed}: {kind:?} failed: {error}");
            }
            match (expect, completion.payload) {
                (Expect::Read(bytes), Payload::Read(buffers)) => {
                    assert!(
                        buffers.to_vec() == bytes,
                        "{label}, seed {seed}: read {} returned other bytes",
                        completion.tag
                    )
                }
                (Expect::Write(sent), Payload::Write(returned)) => {
                    assert!(Arc::ptr_eq(&sent, &returned), "{label}, seed {seed}: write buffers not given back")
                }
                (Expect::Nothing, Payload::None) => {}
                (_, payload) => panic!("{label}, seed {seed}: {kind:?} completed with {payload:?}"),
            }
        }
        assert!(expected.is_empty(), "{label}, seed {seed}: missing completions {:?}", expected.keys());
        for (offset_blocks, data) in writes {
            let start = offset_blocks as usize * block_size;
            model[start..start + data.len()].copy_from_slice(&data);
        }
    }
    // The whole device reads back as the model.
    let buffers = IoBuffers::single(channel.alloc(model.len()));
    channel.submit(1, Operation::Read { offset_blocks: 0, buffers }).expect("full read");
    drain(backend, channel.as_mut(), &mut completions);
    match completions.pop().map(|c| (c.result, c.payload)) {
        Some((Ok(()), Payload::Read(buffers))) => {
            assert!(buffers.to_vec() == model, "{label}, seed {seed}: the device differs from the model")
        }
        other => panic!("{label}, seed {seed}: final read gave {other:?}"),
    }
}

/// Submits without polling until the channel answers QueueFull, which must give the
/// operation back; then everything accepted completes and the channel accepts again.
fn back_pressure(backend: &Backend) {
    let label = &backend.label;
    let mut channel = backend.device.open_channel().expect("channel");
    let block_size = channel.geometry().block_size as usize;
    let mut accepted = 0;
    let refused = loop {
        assert!(accepted < 10_000, "{label}: no back-pressure after {accepted} operations");
        let buffers = IoBuffers::single(channel.alloc(block_size));
        match channel.submit(accepted, Operation::Read { offset_blocks: accepted % 8, buffers }) {
            Ok(()) => accepted += 1,
            Err(SubmitError::QueueFull(operation)) => break operation,
            Err(SubmitError::Invalid(error)) => panic!("{label}: {error}"),
        }
    };
    assert!(
        matches!(&*refused, Operation::Read { offset_blocks, buffers } if *offset_blocks == accepted % 8 && buffers.len() == block_size),
        "{label}: QueueFull must return the operation untouched"
    );
    assert_eq!(channel.in_flight(), accepted as usize, "{label}");
    let mut completions = Vec::new();
    drain(backend, channel.as_mut(), &mut completions);
    assert_eq!(completions.len(), accepted as usize, "{label}: every accepted operation completes once");
    assert!(completions.iter().all(|c| c.result.is_ok()), "{label}");
    channel.submit(0, *refused).expect("accepted once the queue drained");
    drain(backend, channel.as_mut(), &mut completions);
}

/// Memory lent to an I/O buffer one byte past an aligned address.
struct Misaligned(Vec<u8>);

impl ForeignMemory for Misaligned {
    fn bytes(&self) -> &[u8] {
        &self.0[1..]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0[1..]
    }
}

fn rejections(backend: &Backend) {
    let label = &backend.label;
    let mut channel = backend.device.open_channel().expect("channel");
    let geometry = channel.geometry();
    let block_size = geometry.block_size as usize;
    let end = geometry.block_count;
    let read = |offset_blocks, len| Operation::Read { offset_blocks, buffers: IoBuffers::single(DmaBuf::zeroed(len)) };
    let cases: Vec<(&str, Operation)> = vec![
        ("read past the end", read(end, block_size)),
        ("read straddling the end", read(end - 1, 2 * block_size)),
        ("unmap past the end", Operation::Unmap { offset_blocks: end - 2, num_blocks: 3 }),
        ("empty write-zeroes", Operation::WriteZeroes { offset_blocks: 0, num_blocks: 0 }),
        ("offset overflow", Operation::Unmap { offset_blocks: u64::MAX, num_blocks: 2 }),
    ];
    for (case, operation) in cases {
        match channel.submit(7, operation) {
            Err(SubmitError::Invalid(IoError::OutOfRange { .. })) => {}
            other => panic!("{label}: {case}: expected OutOfRange, got {other:?}"),
        }
    }
    let misaligned_cases: Vec<(&str, Operation)> = vec![
        ("partial block", read(0, block_size + 1)),
        ("empty read", Operation::Read { offset_blocks: 0, buffers: IoBuffers::new() }),
        ("empty write", Operation::Write { offset_blocks: 0, buffers: Arc::new(IoBuffers::new()), fua: false }),
    ];
    for (case, operation) in misaligned_cases {
        match channel.submit(7, operation) {
            Err(SubmitError::Invalid(IoError::Misaligned { .. })) => {}
            other => panic!("{label}: {case}: expected Misaligned, got {other:?}"),
        }
    }
    let unaligned = IoBuffers::single(DmaBuf::foreign(Box::new(Misaligned(vec![0; block_size + 1]))));
    let result = channel.submit(7, Operation::Read { offset_blocks: 0, buffers: unaligned });
    if geometry.buffer_alignment > 1 {
        assert!(
            matches!(result, Err(SubmitError::Invalid(IoError::Misaligned { .. }))),
            "{label}: a buffer off its {}-byte alignment is refused, got {result:?}",
            geometry.buffer_alignment
        );
    } else {
        result.expect("no alignment needed");
        drain(backend, channel.as_mut(), &mut Vec::new());
    }
    assert_eq!(channel.in_flight(), 0, "{label}: refused operations are not in flight");
}

fn all_checks(make: &dyn Fn(u64) -> Backend) {
    for seed in 0..SEEDS {
        conformance(&make(seed), seed);
    }
    back_pressure(&make(0));
    rejections(&make(0));
}

#[test]
fn memory_device_conforms() {
    all_checks(&memory_backend);
}

#[test]
fn fault_device_without_rules_conforms() {
    all_checks(&fault_backend);
}

#[test]
fn uring_device_on_a_file_conforms() {
    let dir = test_dir();
    let files = std::cell::Cell::new(0);
    all_checks(&|_| {
        files.set(files.get() + 1);
        uring_backend(&dir, &format!("device-{}.img", files.get()))
    });
}

#[test]
fn uring_registered_buffers_use_fixed_io_and_return_to_the_pool() {
    let dir = test_dir();
    let ctx = uring_context();
    let device = open_uring(&dir, "fixed.img", 512, 8, &ctx);
    let mut channel = device.open_channel().unwrap();
    assert_eq!(ctx.registered_buffers_free(), 8);
    let mut buffer = channel.alloc(256 << 10);
    assert!(buffer.registered_index().is_some(), "a full-size allocation is registered");
    assert!(channel.alloc(4096).registered_index().is_none(), "small allocations are not");
    assert_eq!(ctx.registered_buffers_free(), 7);
    let data: Vec<u8> = (0..buffer.len()).map(|i| (i % 251) as u8).collect();
    buffer.as_mut_slice().copy_from_slice(&data);
    let sent = Arc::new(IoBuffers::single(buffer));
    let backend = Backend { label: "io_uring".into(), device: Box::new(device), idle: Box::new(|| {}) };
    let idle_ctx = ctx.clone();
    let wait = move || _ = idle_ctx.wait(Some(Duration::from_millis(20)));
    let backend = Backend { idle: Box::new(wait), ..backend };
    let mut completions = Vec::new();
    channel.submit(1, Operation::Write { offset_blocks: 3, buffers: sent.clone(), fua: true }).unwrap();
    drain(&backend, channel.as_mut(), &mut completions);
    let read_buffer = channel.alloc(256 << 10);
    channel.submit(2, Operation::Read { offset_blocks: 3, buffers: IoBuffers::single(read_buffer) }).unwrap();
    drain(&backend, channel.as_mut(), &mut completions);
    assert!(completions.iter().all(|c| c.result.is_ok()), "{completions:?}");
    let Some(Completion { payload: Payload::Read(buffers), .. }) = completions.pop() else { panic!("read payload") };
    assert!(buffers.to_vec() == data);
    assert_eq!(ctx.fixed_entries(), 2, "the write and the read used WRITE_FIXED and READ_FIXED");
    drop((buffers, completions, sent));
    assert_eq!(ctx.registered_buffers_free(), 8, "dropped registered buffers return to the pool");
}

#[test]
fn uring_refuses_more_segments_than_the_kernel_takes() {
    let dir = test_dir();
    let ctx = uring_context();
    let device = open_uring(&dir, "segments.img", 1100, 8, &ctx);
    let mut channel = device.open_channel().unwrap();
    let buffers = IoBuffers::from_segments((0..1025).map(|_| DmaBuf::zeroed(4096)).collect());
    match channel.submit(1, Operation::Read { offset_blocks: 0, buffers }) {
        Err(SubmitError::Invalid(IoError::TooLarge { segments: 1025, .. })) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn uring_read_only_devices_refuse_writes_and_missing_files_fail_to_open() {
    let dir = test_dir();
    let ctx = uring_context();
    drop(open_uring(&dir, "device.img", 16, 8, &ctx));
    let options = UringOptions { read_only: true, allow_buffered: true, ..UringOptions::default() };
    let device = UringDevice::open(dir.path().join("device.img"), &options, ctx.clone()).unwrap();
    assert_eq!(device.geometry().block_count, 16);
    let mut channel = device.open_channel().unwrap();
    match channel.submit(1, Operation::WriteZeroes { offset_blocks: 0, num_blocks: 1 }) {
        Err(SubmitError::Invalid(IoError::Unsupported { kind: OperationKind::WriteZeroes, .. })) => {}
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let missing = UringDevice::open(dir.path().join("missing.img"), &UringOptions::default(), ctx);
    assert!(matches!(missing, Err(chronicle::device::DeviceError::Open { .. })));
}

/// Runs the conformance check on a real block device when `CHRONICLE_TEST_BLOCK_DEVICE`
/// names one (its first blocks are overwritten), e.g. a loop device; otherwise says so.
#[test]
fn uring_device_on_a_block_device_conforms_when_one_is_given() {
    let Ok(path) = std::env::var("CHRONICLE_TEST_BLOCK_DEVICE") else {
        println!("CHRONICLE_TEST_BLOCK_DEVICE is not set: no block device tested");
        return;
    };
    all_checks(&|_| {
        let ctx = uring_context();
        let device = UringDevice::open(&path, &UringOptions::default(), ctx.clone()).expect("open the block device");
        assert!(device.is_block_device(), "{path} is not a block device");
        let label = format!("io_uring on block device {path} ({:?})", device.geometry());
        Backend {
            label,
            device: Box::new(device),
            idle: Box::new(move || _ = ctx.wait(Some(Duration::from_millis(20)))),
        }
    });
}
