//! An in-memory block device: the backend of unit tests and of the engine's simulation.
//!
//! The media is one byte vector shared by every channel of the device (and by every clone of
//! the [`MemoryDevice`] handle, so a test can inspect or prepare it directly). Operations are
//! queued at submit and executed at [`Channel::poll`]: in submission order, or, with a
//! `reorder_seed`, a seeded-random non-empty subset in random order, to shake out code that
//! assumes the device completes in order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{
    validate, Channel, Completion, Device, DeviceError, DeviceGeometry, DmaBuf, Operation, Payload, SubmitError, Tag,
};

/// Largest read or write one operation may carry, in blocks (no real limit: memory is flat).
const MAX_TRANSFER_BLOCKS: u32 = 1 << 24;

/// Shape and behaviour of a [`MemoryDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryOptions {
    pub block_size: u32,
    pub block_count: u64,
    /// Operations a channel accepts before answering [`SubmitError::QueueFull`].
    pub queue_depth: usize,
    /// When set, each poll completes a seeded-random non-empty subset of the queue in random
    /// order instead of the whole queue in submission order.
    pub reorder_seed: Option<u64>,
}

impl MemoryOptions {
    /// In-order device of `block_count` blocks of `block_size` bytes, queue depth 128.
    pub fn new(block_size: u32, block_count: u64) -> Self {
        MemoryOptions { block_size, block_count, queue_depth: 128, reorder_seed: None }
    }
}

impl Default for MemoryOptions {
    /// 4 MiB of 4 KiB blocks.
    fn default() -> Self {
        MemoryOptions::new(4096, 1024)
    }
}

struct Shared {
    name: String,
    geometry: DeviceGeometry,
    queue_depth: usize,
    reorder_seed: Option<u64>,
    media: Mutex<Vec<u8>>,
    /// Channels opened so far; each reordering channel gets its own stream of the seed.
    channels_opened: Mutex<u64>,
}

/// An in-memory block device. Cloning gives another handle to the same media.
#[derive(Clone)]
pub struct MemoryDevice {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryDevice({}, {:?})", self.shared.name, self.shared.geometry)
    }
}

impl MemoryDevice {
    /// A zero-filled device.
    ///
    /// # Panics
    /// If the block size is zero, or the device is empty or does not fit in memory, or the
    /// queue depth is zero: these are programming errors of the test that builds it.
    pub fn new(name: &str, options: MemoryOptions) -> MemoryDevice {
        assert!(options.block_size > 0, "memory device {name}: block size must not be zero");
        assert!(options.block_count > 0, "memory device {name}: block count must not be zero");
        assert!(options.queue_depth > 0, "memory device {name}: queue depth must not be zero");
        let size_bytes = options
            .block_count
            .checked_mul(u64::from(options.block_size))
            .and_then(|bytes| usize::try_from(bytes).ok())
            .unwrap_or_else(|| panic!("memory device {name}: {options:?} does not fit in memory"));
        let geometry = DeviceGeometry {
            block_size: options.block_size,
            block_count: options.block_count,
            buffer_alignment: 1,
            max_transfer_blocks: MAX_TRANSFER_BLOCKS,
            volatile_cache: false,
        };
        MemoryDevice {
            shared: Arc::new(Shared {
                name: name.to_string(),
                geometry,
                queue_depth: options.queue_depth,
                reorder_seed: options.reorder_seed,
                media: Mutex::new(vec![0; size_bytes]),
                channels_opened: Mutex::new(0),
            }),
        }
    }

    /// A device whose media is `bytes` (a whole number of blocks), in-order, queue depth 128.
    pub fn from_bytes(name: &str, block_size: u32, bytes: Vec<u8>) -> MemoryDevice {
        assert!(
            block_size > 0 && !bytes.is_empty() && bytes.len() % block_size as usize == 0,
            "memory device {name}: {} bytes are not a whole number of {block_size}-byte blocks",
            bytes.len()
        );
        let device =
            MemoryDevice::new(name, MemoryOptions::new(block_size, (bytes.len() / block_size as usize) as u64));
        *device.media() = bytes;
        device
    }

    /// A copy of the whole media.
    pub fn snapshot(&self) -> Vec<u8> {
        self.media().clone()
    }

    /// A copy of `count` blocks starting at block `offset`, read directly (not through a channel).
    pub fn read_blocks(&self, offset: u64, count: u64) -> Vec<u8> {
        let range = self.byte_range(offset, count);
        self.media()[range].to_vec()
    }

    /// Writes whole blocks at block `offset` directly (not through a channel), for test setup.
    pub fn write_blocks(&self, offset: u64, bytes: &[u8]) {
        let block_size = self.shared.geometry.block_size as usize;
        assert!(bytes.len() % block_size == 0, "write_blocks: {} bytes are not whole blocks", bytes.len());
        let range = self.byte_range(offset, (bytes.len() / block_size) as u64);
        self.media()[range].copy_from_slice(bytes);
    }

    fn byte_range(&self, offset: u64, count: u64) -> std::ops::Range<usize> {
        let geometry = &self.shared.geometry;
        assert!(
            offset.checked_add(count).is_some_and(|end| end <= geometry.block_count),
            "{}: blocks {offset}+{count} are beyond the device's {} blocks",
            self.shared.name,
            geometry.block_count
        );
        let block_size = geometry.block_size as usize;
        offset as usize * block_size..(offset + count) as usize * block_size
    }

    fn media(&self) -> MutexGuard<'_, Vec<u8>> {
        lock(&self.shared.media)
    }
}

/// The media is plain bytes: a panic while it was held leaves nothing half-updated that a
/// test could not see, so a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Device for MemoryDevice {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn geometry(&self) -> DeviceGeometry {
        self.shared.geometry
    }

    fn open_channel(&self) -> Result<Box<dyn Channel>, DeviceError> {
        let channel_index = {
            let mut opened = lock(&self.shared.channels_opened);
            *opened += 1;
            *opened
        };
        let rng = self.shared.reorder_seed.map(|seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(channel_index);
            rng
        });
        Ok(Box::new(MemoryChannel {
            device: self.clone(),
            queue: VecDeque::with_capacity(self.shared.queue_depth),
            rng,
        }))
    }
}

struct MemoryChannel {
    device: MemoryDevice,
    /// Accepted operations, in submission order; bounded by the device's queue depth.
    queue: VecDeque<(Tag, Operation)>,
    rng: Option<ChaCha8Rng>,
}

impl MemoryChannel {
    fn execute(&self, media: &mut [u8], tag: Tag, operation: Operation) -> Completion {
        let block_size = self.device.shared.geometry.block_size as usize;
        let kind = operation.kind();
        let byte_range = |offset_blocks: u64, bytes: usize| {
            let start = offset_blocks as usize * block_size;
            start..start + bytes
        };
        let payload = match operation {
            Operation::Read { offset_blocks, mut buffers } => {
                let range = byte_range(offset_blocks, buffers.len());
                buffers.write_at(0, &media[range]);
                Payload::Read(buffers)
            }
            Operation::Write { offset_blocks, buffers, fua: _ } => {
                let range = byte_range(offset_blocks, buffers.len());
                buffers.read_at(0, &mut media[range]);
                Payload::Write(buffers)
            }
            Operation::Flush => Payload::None,
            Operation::Unmap { offset_blocks, num_blocks } | Operation::WriteZeroes { offset_blocks, num_blocks } => {
                media[byte_range(offset_blocks, num_blocks as usize * block_size)].fill(0);
                Payload::None
            }
        };
        Completion { tag, kind, result: Ok(()), payload }
    }
}

impl Channel for MemoryChannel {
    fn geometry(&self) -> DeviceGeometry {
        self.device.shared.geometry
    }

    fn name(&self) -> &str {
        &self.device.shared.name
    }

    fn submit(&mut self, tag: Tag, operation: Operation) -> Result<(), SubmitError> {
        let shared = &self.device.shared;
        validate(&shared.name, &shared.geometry, &operation).map_err(SubmitError::Invalid)?;
        if self.queue.len() >= shared.queue_depth {
            return Err(SubmitError::QueueFull(Box::new(operation)));
        }
        self.queue.push_back((tag, operation));
        Ok(())
    }

    fn poll(&mut self, completions: &mut Vec<Completion>) -> usize {
        if self.queue.is_empty() {
            return 0;
        }
        let batch: Vec<(Tag, Operation)> = match self.rng.as_mut() {
            None => self.queue.drain(..).collect(),
            Some(rng) => {
                let count = rng.random_range(1..=self.queue.len());
                (0..count)
                    .map(|_| {
                        let index = rng.random_range(0..self.queue.len());
                        self.queue.remove(index).expect("index is within the queue")
                    })
                    .collect()
            }
        };
        let device = self.device.clone();
        let mut media = device.media();
        let done = batch.len();
        for (tag, operation) in batch {
            completions.push(self.execute(&mut media, tag, operation));
        }
        done
    }

    fn in_flight(&self) -> usize {
        self.queue.len()
    }

    fn alloc(&self, len: usize) -> DmaBuf {
        DmaBuf::zeroed(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::IoBuffers;

    fn write(channel: &mut dyn Channel, tag: Tag, offset_blocks: u64, bytes: &[u8]) {
        let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(bytes)));
        channel.submit(tag, Operation::Write { offset_blocks, buffers, fua: false }).expect("write accepted");
    }

    #[test]
    fn operations_execute_at_poll_in_submission_order() {
        let device = MemoryDevice::new("mem0", MemoryOptions::new(512, 8));
        let mut channel = device.open_channel().unwrap();
        write(channel.as_mut(), 1, 2, &[0xAA; 512]);
        write(channel.as_mut(), 2, 2, &[0xBB; 512]);
        assert_eq!(device.read_blocks(2, 1), vec![0; 512], "nothing executes before poll");
        let mut completions = Vec::new();
        assert_eq!(channel.poll(&mut completions), 2);
        assert_eq!(completions.iter().map(|c| c.tag).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(device.read_blocks(2, 1), vec![0xBB; 512], "the later write wins");
        assert_eq!(channel.in_flight(), 0);
    }

    #[test]
    fn reordering_is_deterministic_per_seed_and_completes_everything() {
        let order = |seed: u64| {
            let mut options = MemoryOptions::new(512, 64);
            options.reorder_seed = Some(seed);
            let device = MemoryDevice::new("mem0", options);
            let mut channel = device.open_channel().unwrap();
            for tag in 0..32 {
                write(channel.as_mut(), tag, tag, &[tag as u8; 512]);
            }
            let mut completions = Vec::new();
            let mut polls = 0;
            while channel.in_flight() > 0 {
                assert!(channel.poll(&mut completions) > 0, "every poll of a non-empty queue completes something");
                polls += 1;
            }
            let mut tags: Vec<Tag> = completions.iter().map(|c| c.tag).collect();
            let order = tags.clone();
            tags.sort_unstable();
            assert_eq!(tags, (0..32).collect::<Vec<_>>());
            (order, polls)
        };
        assert_eq!(order(7), order(7));
        let (first, _) = order(7);
        assert_ne!(first, (0..32).collect::<Vec<_>>(), "seed 7 reorders");
        assert!((1..=200).any(|seed| order(seed).1 > 1), "some seed spreads completions over several polls");
    }

    #[test]
    fn queue_full_returns_the_operation() {
        let mut options = MemoryOptions::new(512, 8);
        options.queue_depth = 2;
        let device = MemoryDevice::new("mem0", options);
        let mut channel = device.open_channel().unwrap();
        channel.submit(1, Operation::Flush).unwrap();
        channel.submit(2, Operation::Unmap { offset_blocks: 0, num_blocks: 1 }).unwrap();
        match channel.submit(3, Operation::WriteZeroes { offset_blocks: 5, num_blocks: 3 }) {
            Err(SubmitError::QueueFull(operation)) => {
                assert!(matches!(*operation, Operation::WriteZeroes { offset_blocks: 5, num_blocks: 3 }))
            }
            other => panic!("expected QueueFull, got {other:?}"),
        }
    }
}
