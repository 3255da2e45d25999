//! The device interface: submit-and-poll block I/O shaped like SPDK's bdev API, so the SPDK
//! backend (`src/spdk`) is a thin adapter.
//!
//! - A [`Device`] is an opened block device (SPDK: an `spdk_bdev_desc`); it hands out
//!   per-thread [`Channel`]s (SPDK: `spdk_io_channel`).
//! - [`Channel::submit`] never blocks: it queues an [`Operation`] with a caller tag and its
//!   buffers, or gives the operation back as [`SubmitError::QueueFull`] (SPDK `ENOMEM`:
//!   back-pressure, never a fault).
//! - Completions come back, with the buffers, only from [`Channel::poll`].
//! - Buffers are [`DmaBuf`]s from [`Channel::alloc`] (aligned, and registered with io_uring
//!   where the backend can), or foreign memory such as SPDK's host iovecs. A write's buffers are
//!   shared ([`SharedBuffers`]) so the same bytes can go to several devices without a copy.
//!
//! Backends: [`memory`] (tests, simulation), [`uring`] (Linux files and block devices through
//! io_uring with `O_DIRECT`), [`fault`] (error, delay and power-cut injection around any
//! device).

pub mod buffer;
pub mod fault;
pub mod memory;
#[cfg(target_os = "linux")]
pub mod uring;

use std::sync::Arc;

pub use buffer::{DmaBuf, ForeignMemory, IoBuffers};

/// Buffers of a write, shared between the devices it goes to.
pub type SharedBuffers = Arc<IoBuffers>;

/// Opaque value chosen by the submitter and returned with the completion.
pub type Tag = u64;

/// Shape of a device, as SPDK's `spdk_bdev` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceGeometry {
    /// Bytes per device block (SPDK `blocklen`).
    pub block_size: u32,
    /// Number of device blocks (SPDK `blockcnt`).
    pub block_count: u64,
    /// Alignment that buffers must have, in bytes (a power of two).
    pub buffer_alignment: u32,
    /// Largest transfer accepted by one operation, in blocks.
    pub max_transfer_blocks: u32,
    /// Completed writes need a flush to survive a power cut (a volatile write cache).
    pub volatile_cache: bool,
}

impl DeviceGeometry {
    pub fn size_bytes(&self) -> u64 {
        self.block_count * u64::from(self.block_size)
    }
}

/// One block operation. Offsets and lengths are in device blocks; the length of a read or write
/// is the byte length of its buffers, which must be a whole number of blocks.
#[derive(Debug)]
pub enum Operation {
    /// Fill `buffers` from the device; they come back in the completion.
    Read { offset_blocks: u64, buffers: IoBuffers },
    /// Write `buffers`; `fua` asks that the data be durable when the write completes.
    Write { offset_blocks: u64, buffers: SharedBuffers, fua: bool },
    /// Make every write completed before this flush was submitted durable.
    Flush,
    /// Deallocate blocks; they read back as zeroes.
    Unmap { offset_blocks: u64, num_blocks: u64 },
    /// Write zeroes without a data buffer.
    WriteZeroes { offset_blocks: u64, num_blocks: u64 },
}

impl Operation {
    pub fn kind(&self) -> OperationKind {
        match self {
            Operation::Read { .. } => OperationKind::Read,
            Operation::Write { .. } => OperationKind::Write,
            Operation::Flush => OperationKind::Flush,
            Operation::Unmap { .. } => OperationKind::Unmap,
            Operation::WriteZeroes { .. } => OperationKind::WriteZeroes,
        }
    }

    /// `(offset_blocks, num_blocks)` of the operation, given the block size; `None` for flush.
    pub fn extent(&self, block_size: u32) -> Option<(u64, u64)> {
        let blocks = |bytes: usize| crate::core::geometry::div_size(bytes as u64, u64::from(block_size));
        match self {
            Operation::Read { offset_blocks, buffers } => Some((*offset_blocks, blocks(buffers.len()))),
            Operation::Write { offset_blocks, buffers, .. } => Some((*offset_blocks, blocks(buffers.len()))),
            Operation::Flush => None,
            Operation::Unmap { offset_blocks, num_blocks } | Operation::WriteZeroes { offset_blocks, num_blocks } => {
                Some((*offset_blocks, *num_blocks))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperationKind {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
}

/// Buffers given back with a completion.
#[derive(Debug)]
pub enum Payload {
    None,
    Read(IoBuffers),
    Write(SharedBuffers),
}

/// Result of one operation. The error is boxed: a completion is moved through several queues
/// on the way to its submitter, and an inline `IoError` (72 bytes) made every move a 144-byte
/// `memcpy` call (about 4 % of a write's CPU in the SPDK module's profile).
#[derive(Debug)]
pub struct Completion {
    pub tag: Tag,
    pub kind: OperationKind,
    pub result: Result<(), Box<IoError>>,
    pub payload: Payload,
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("{device}: {kind:?} of {num_blocks} blocks at block {offset_blocks} failed: {detail}")]
    Media { device: String, kind: OperationKind, offset_blocks: u64, num_blocks: u64, detail: String },
    #[error("{device}: {kind:?} of {num_blocks} blocks at block {offset_blocks} is beyond the device's {block_count} blocks")]
    OutOfRange { device: String, kind: OperationKind, offset_blocks: u64, num_blocks: u64, block_count: u64 },
    #[error("{device}: buffers of {bytes} bytes are not a whole number of {block_size}-byte blocks or are misaligned")]
    Misaligned { device: String, bytes: usize, block_size: u32 },
    #[error("{device}: {kind:?} of {num_blocks} blocks in {segments} buffers exceeds {limit}")]
    TooLarge { device: String, kind: OperationKind, num_blocks: u64, segments: usize, limit: String },
    #[error("{device}: {kind:?} is not supported")]
    Unsupported { device: String, kind: OperationKind },
    #[error("{device}: power was lost")]
    PowerLost { device: String },
}

/// Why an operation was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    /// The channel's queue is full: retry after polling (SPDK `ENOMEM`). The operation is
    /// returned untouched.
    QueueFull(Box<Operation>),
    /// The operation can never succeed as given.
    Invalid(IoError),
}

/// Why a device or channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{path}: {detail}")]
    Open { path: String, detail: String },
    #[error("{device}: {detail}")]
    Channel { device: String, detail: String },
}

/// A per-thread queue to a device (SPDK `spdk_io_channel`). Not shared between threads.
pub trait Channel {
    fn geometry(&self) -> DeviceGeometry;
    /// Name of the device, for messages.
    fn name(&self) -> &str;
    /// Queues `operation`; its completion, carrying `tag`, comes from a later [`poll`](Self::poll).
    fn submit(&mut self, tag: Tag, operation: Operation) -> Result<(), SubmitError>;
    /// Moves finished operations into `completions` without blocking; returns how many.
    fn poll(&mut self, completions: &mut Vec<Completion>) -> usize;
    /// Operations submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;
    /// A zeroed buffer of `len` bytes suitable for I/O on this device.
    fn alloc(&self, len: usize) -> DmaBuf;
}

/// An opened block device (SPDK `spdk_bdev_desc`).
pub trait Device {
    fn name(&self) -> &str;
    fn geometry(&self) -> DeviceGeometry;
    /// A channel for the calling thread.
    fn open_channel(&self) -> Result<Box<dyn Channel>, DeviceError>;
}

/// Checks an operation against a geometry; backends call it on submit.
#[inline]
pub fn validate(name: &str, geometry: &DeviceGeometry, operation: &Operation) -> Result<(), IoError> {
    // Every operation of the write path passes: a short check inline, the error's details
    // (names, messages) built out of line only when it fails.
    if is_valid(geometry, operation) {
        debug_assert!(explain_invalid(name, geometry, operation).is_ok(), "the two checks disagree");
        return Ok(());
    }
    explain_invalid(name, geometry, operation)
}

/// The checks of [`explain_invalid`] without building an error (block sizes are powers of
/// two on every bdev chronicle takes; other sizes take the general path).
#[inline(always)] // on every operation of the write path; a call costs as much as the checks
fn is_valid(geometry: &DeviceGeometry, operation: &Operation) -> bool {
    let block_size = geometry.block_size as usize;
    if !block_size.is_power_of_two() || !(geometry.buffer_alignment as usize).is_power_of_two() {
        return false;
    }
    let alignment_mask = geometry.buffer_alignment as usize - 1;
    let in_range = |offset_blocks: u64, num_blocks: u64| {
        num_blocks != 0 && offset_blocks.checked_add(num_blocks).is_some_and(|end| end <= geometry.block_count)
    };
    let data = |offset_blocks: u64, buffers: &IoBuffers| {
        let bytes_ok = !buffers.is_empty()
            && buffers.len() & (block_size - 1) == 0
            && (alignment_mask == 0
                || buffers.segments().iter().all(|s| s.as_slice().as_ptr() as usize & alignment_mask == 0));
        let num_blocks = (buffers.len() >> block_size.trailing_zeros()) as u64;
        bytes_ok && num_blocks <= u64::from(geometry.max_transfer_blocks) && in_range(offset_blocks, num_blocks)
    };
    match operation {
        Operation::Read { offset_blocks, buffers } => data(*offset_blocks, buffers),
        Operation::Write { offset_blocks, buffers, .. } => data(*offset_blocks, buffers),
        Operation::Flush => true,
        Operation::Unmap { offset_blocks, num_blocks } | Operation::WriteZeroes { offset_blocks, num_blocks } => {
            in_range(*offset_blocks, *num_blocks)
        }
    }
}

#[cold]
#[inline(never)]
fn explain_invalid(name: &str, geometry: &DeviceGeometry, operation: &Operation) -> Result<(), IoError> {
    let block_size = geometry.block_size;
    let bytes_ok = |buffers: &IoBuffers| {
        !buffers.is_empty()
            && buffers.len() % block_size as usize == 0
            && buffers.segments().iter().all(|s| s.is_aligned(geometry.buffer_alignment as usize))
    };
    match operation {
        Operation::Read { buffers, .. } if !bytes_ok(buffers) => {
            return Err(IoError::Misaligned { device: name.into(), bytes: buffers.len(), block_size })
        }
        Operation::Write { buffers, .. } if !bytes_ok(buffers) => {
            return Err(IoError::Misaligned { device: name.into(), bytes: buffers.len(), block_size })
        }
        _ => {}
    }
    if let Some((offset_blocks, num_blocks)) = operation.extent(block_size) {
        let end = offset_blocks.checked_add(num_blocks);
        if num_blocks == 0 || end.is_none_or(|end| end > geometry.block_count) {
            return Err(IoError::OutOfRange {
                device: name.into(),
                kind: operation.kind(),
                offset_blocks,
                num_blocks,
                block_count: geometry.block_count,
            });
        }
        // Only data transfers are limited; unmap and write-zeroes carry no buffers.
        let segments = match operation {
            Operation::Read { buffers, .. } => buffers.segments().len(),
            Operation::Write { buffers, .. } => buffers.segments().len(),
            _ => 0,
        };
        if segments > 0 && num_blocks > u64::from(geometry.max_transfer_blocks) {
            return Err(IoError::TooLarge {
                device: name.into(),
                kind: operation.kind(),
                num_blocks,
                segments,
                limit: format!("the limit of {} blocks per operation", geometry.max_transfer_blocks),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The inline check passes exactly the operations the full check passes.
    #[test]
    fn short_check_agrees_with_the_full_check() {
        let mut checked = 0;
        for (block_size, buffer_alignment) in [(512, 1), (4096, 1), (4096, 4096), (520, 1), (4096, 0)] {
            let geometry = DeviceGeometry {
                block_size,
                block_count: 64,
                buffer_alignment,
                max_transfer_blocks: 8,
                volatile_cache: false,
            };
            for bytes in [0, 512, 520, 1000, 4096, 4 * 4096, 8 * 4096, 9 * 4096, 8 * 520, 9 * 520] {
                for offset_blocks in [0, 1, 56, 60, 63, 64, u64::MAX - 1] {
                    let buffers = || IoBuffers::from_segments(vec![DmaBuf::zeroed(bytes)]);
                    let operations = [
                        Operation::Read { offset_blocks, buffers: buffers() },
                        Operation::Write { offset_blocks, buffers: Arc::new(buffers()), fua: true },
                        Operation::Unmap { offset_blocks, num_blocks: bytes as u64 / 512 },
                        Operation::WriteZeroes { offset_blocks, num_blocks: bytes as u64 / 512 },
                        Operation::Flush,
                    ];
                    for operation in &operations {
                        let full = explain_invalid("dev", &geometry, operation);
                        assert_eq!(
                            validate("dev", &geometry, operation).is_ok(),
                            full.is_ok(),
                            "{block_size}/{buffer_alignment} {operation:?}: {full:?}"
                        );
                        checked += usize::from(full.is_ok());
                    }
                }
            }
        }
        assert!(checked > 50, "the grid has valid operations too ({checked})");
    }
}
