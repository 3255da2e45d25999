//! The device backend over SPDK bdevs (ARCHITECTURE §4): a [`Device`] is an open descriptor
//! (`spdk_bdev_desc`), a [`Channel`] the calling thread's `spdk_io_channel` to it. The engine
//! runs on SPDK unchanged: operations go to the bdev with the buffers they carry (host iovecs
//! on the write path, so the same memory reaches base and journal without a copy), internal
//! buffers come from SPDK's DMA allocator, and `ENOMEM` waits in `spdk_bdev_queue_io_wait` and
//! resubmits — back-pressure, never an error.
//!
//! SPDK bdevs have no FUA flag: on a bdev with a volatile write cache a FUA write is followed
//! by a flush of its range before it completes.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use super::bdev::{BdevDesc, BlockRequest, IoChannel, IoDone};
use super::dma;
use super::Errno;
use crate::device::{
    validate, Channel, Completion, Device, DeviceError, DeviceGeometry, DmaBuf, ForeignMemory, IoBuffers, IoError,
    Operation, OperationKind, Payload, SharedBuffers, SubmitError, Tag,
};

/// Alignment of internal buffers: enough for every bdev (`O_DIRECT` files under bdev_aio).
const DMA_ALIGNMENT: usize = 4096;
/// Operation boxes kept for reuse per channel.
const POOL_LIMIT: usize = 256;

/// An open bdev as an engine device.
pub struct SpdkDevice {
    desc: Rc<BdevDesc>,
    name: String,
    geometry: DeviceGeometry,
}

impl SpdkDevice {
    pub fn new(desc: Rc<BdevDesc>) -> Self {
        let bdev = desc.bdev();
        let geometry = DeviceGeometry {
            block_size: bdev.block_size(),
            block_count: bdev.num_blocks(),
            // The bdev layer bounces misaligned buffers itself; host iovecs are taken as they are.
            buffer_alignment: 1,
            // The bdev layer splits large operations for the bdev below.
            max_transfer_blocks: u32::MAX,
            volatile_cache: bdev.has_write_cache(),
        };
        SpdkDevice { name: bdev.name(), desc, geometry }
    }
}

impl Device for SpdkDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn geometry(&self) -> DeviceGeometry {
        self.geometry
    }

    fn open_channel(&self) -> Result<Box<dyn Channel>, DeviceError> {
        let channel = self.desc.io_channel().map_err(|errno| DeviceError::Channel {
            device: self.name.clone(),
            detail: format!("no I/O channel on this thread: {errno}"),
        })?;
        Ok(Box::new(SpdkChannel {
            shared: Rc::new(ChannelShared {
                desc: self.desc.clone(),
                channel,
                name: self.name.clone(),
                geometry: self.geometry,
                done: RefCell::new(Vec::new()),
                in_flight: Cell::new(0),
                alloc_fallbacks: Cell::new(0),
                pool: RefCell::new(Vec::new()),
            }),
        }))
    }
}

/// What a channel and its operations in flight share: an operation keeps the descriptor and
/// the channel alive until it completes, even if the channel is dropped first.
struct ChannelShared {
    // Field order is drop order: the channel is put back before the descriptor closes.
    channel: IoChannel,
    desc: Rc<BdevDesc>,
    name: String,
    geometry: DeviceGeometry,
    done: RefCell<Vec<Completion>>,
    in_flight: Cell<usize>,
    alloc_fallbacks: Cell<u64>,
    /// Finished operations' boxes, reused by the next ones (no allocation per operation).
    #[allow(clippy::vec_box)] // the boxes are the point: SPDK holds each one as a callback argument
    pool: RefCell<Vec<Box<InFlight>>>,
}

/// This thread's channel to an SPDK bdev.
pub struct SpdkChannel {
    shared: Rc<ChannelShared>,
}

impl Channel for SpdkChannel {
    fn geometry(&self) -> DeviceGeometry {
        self.shared.geometry
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    fn submit(&mut self, tag: Tag, operation: Operation) -> Result<(), SubmitError> {
        validate(&self.shared.name, &self.shared.geometry, &operation).map_err(SubmitError::Invalid)?;
        let fua_flush = matches!(operation, Operation::Write { fua: true, .. }) && self.shared.geometry.volatile_cache;
        self.shared.in_flight.set(self.shared.in_flight.get() + 1);
        InFlight::take(self.shared.clone(), tag, operation, fua_flush).start();
        Ok(())
    }

    fn poll(&mut self, completions: &mut Vec<Completion>) -> usize {
        let mut done = self.shared.done.borrow_mut();
        let count = done.len();
        completions.append(&mut done);
        count
    }

    fn in_flight(&self) -> usize {
        self.shared.in_flight.get()
    }

    fn alloc(&self, len: usize) -> DmaBuf {
        match dma::DmaBuf::zeroed(len.max(1), DMA_ALIGNMENT) {
            Ok(buffer) => DmaBuf::foreign(Box::new(SpdkMemory { buffer, len })),
            Err(errno) => {
                // Heap memory still works for bdevs that do not DMA (malloc, aio, NVMe/TCP);
                // say so once, since PCIe devices would fail the I/O.
                let fallbacks = self.shared.alloc_fallbacks.get();
                self.shared.alloc_fallbacks.set(fallbacks + 1);
                if fallbacks == 0 {
                    spdk_warn!(
                        "chronicle: {}: no DMA memory for {len} bytes ({errno}); using heap memory",
                        self.shared.name
                    );
                }
                DmaBuf::zeroed(len)
            }
        }
    }
}

/// SPDK DMA memory as a device buffer (`len` may be 0, the allocation is never empty).
struct SpdkMemory {
    buffer: dma::DmaBuf,
    len: usize,
}

impl ForeignMemory for SpdkMemory {
    fn bytes(&self) -> &[u8] {
        &self.buffer.as_slice()[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut_slice()[..self.len]
    }
}

/// Steps of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The operation itself.
    Data,
    /// The flush that makes a FUA write durable on a bdev with a volatile cache.
    Flush,
}

/// Iovecs of an operation: inline for the usual single buffer, else in a vector that the
/// pooled box keeps (filled in place: nothing is built elsewhere and moved in).
struct Iovecs {
    inline: libc::iovec,
    heap: Vec<libc::iovec>,
    count: u32,
}

impl Iovecs {
    const EMPTY: libc::iovec = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };

    fn new() -> Self {
        Iovecs { inline: Self::EMPTY, heap: Vec::new(), count: 0 }
    }

    #[inline(always)] // twice per host write
    fn fill(&mut self, buffers: &[DmaBuf]) {
        self.count = buffers.len() as u32;
        if let [only] = buffers {
            // A host write's one iovec, an index page: the usual case, without the loop.
            self.inline = iovec_of(only);
        } else {
            self.heap.clear();
            self.heap.extend(buffers.iter().map(iovec_of));
        }
    }

    /// Pointer and count for SPDK; stable while `self` does not move (it lives in a Box).
    fn raw(&mut self) -> (*mut libc::iovec, i32) {
        if self.count == 1 {
            (&mut self.inline, 1)
        } else {
            (self.heap.as_mut_ptr(), self.count as i32)
        }
    }
}

/// One operation in flight: where its completion goes, its buffers, and the iovecs SPDK reads
/// them through.
///
/// Laid out so that a write's completion reads one cache line: the fields the completion
/// needs come first and the box is line-aligned; the iovecs and a read's buffers follow. A
/// write's box is read back about a queue depth of operations after its submission, when the
/// data copies in between have pushed it out of L1, and every line of per-write state read
/// then costs the write path measurably (BENCHMARKS, session "footprint").
#[repr(C, align(64))]
struct InFlight {
    // The first line: what a completion reads.
    /// The channel; `None` while the box waits in the channel's pool for reuse (a pooled box
    /// holding its channel would keep it alive forever).
    shared: Option<Rc<ChannelShared>>,
    tag: Tag,
    offset_blocks: u64,
    num_blocks: u64,
    /// A write's buffers (given back with its completion).
    written: Option<SharedBuffers>,
    kind: OperationKind,
    stage: Stage,
    /// After the data, flush the range (a FUA write on a bdev with a volatile cache).
    fua_flush: bool,
    // Read at submission (the box comes hot from the pool) and by a read's completion.
    /// A read's buffers (given back with its completion).
    read: Option<IoBuffers>,
    iovecs: Iovecs,
}

impl InFlight {
    /// A box for the operation, from the channel's pool when it has one, filled in place.
    fn take(shared: Rc<ChannelShared>, tag: Tag, operation: Operation, fua_flush: bool) -> Box<InFlight> {
        let pooled = shared.pool.borrow_mut().pop();
        let mut this = pooled.unwrap_or_else(|| {
            Box::new(InFlight {
                shared: None,
                tag: 0,
                offset_blocks: 0,
                num_blocks: 0,
                written: None,
                kind: OperationKind::Flush,
                stage: Stage::Data,
                fua_flush: false,
                read: None,
                iovecs: Iovecs::new(),
            })
        });
        debug_assert!(this.written.is_none() && this.read.is_none(), "a pooled box holds no buffers");
        let geometry = shared.geometry;
        let (offset_blocks, num_blocks) = operation.extent(geometry.block_size).unwrap_or((0, geometry.block_count));
        this.kind = operation.kind();
        match operation {
            Operation::Read { buffers, .. } => {
                this.iovecs.fill(buffers.segments());
                this.read = Some(buffers);
            }
            Operation::Write { buffers, .. } => {
                this.iovecs.fill(buffers.segments());
                this.written = Some(buffers);
            }
            _ => {}
        }
        this.shared = Some(shared);
        this.tag = tag;
        this.offset_blocks = offset_blocks;
        this.num_blocks = num_blocks;
        this.stage = Stage::Data;
        this.fua_flush = fua_flush;
        this
    }

    fn channel(&self) -> &Rc<ChannelShared> {
        self.shared.as_ref().expect("an operation in flight has its channel")
    }

    /// The bdev call of the current stage.
    fn request(&mut self) -> BlockRequest {
        let (offset_blocks, num_blocks) = (self.offset_blocks, self.num_blocks);
        if self.stage == Stage::Flush {
            return BlockRequest::Flush { offset_blocks, num_blocks };
        }
        match self.kind {
            OperationKind::Read => {
                let (iovs, iovcnt) = self.iovecs.raw();
                BlockRequest::Read { iovs, iovcnt, offset_blocks, num_blocks }
            }
            OperationKind::Write => {
                let (iovs, iovcnt) = self.iovecs.raw();
                BlockRequest::Write { iovs, iovcnt, offset_blocks, num_blocks }
            }
            OperationKind::Flush => BlockRequest::Flush { offset_blocks, num_blocks },
            OperationKind::Unmap => BlockRequest::Unmap { offset_blocks, num_blocks },
            OperationKind::WriteZeroes => BlockRequest::WriteZeroes { offset_blocks, num_blocks },
        }
    }

    /// Submits the current stage; `ENOMEM` waits for the bdev to have room and submits again.
    fn start(mut self: Box<Self>) {
        let request = self.request();
        let shared = self.channel().clone();
        // SAFETY: the iovecs live in this box and describe the operation's buffers, which the
        // box owns (`written`/`read`); SPDK gives the box back to `done` exactly once, and the
        // box is neither moved out of nor dropped until then.
        let submitted = unsafe { shared.desc.submit(&shared.channel, request, self) };
        let Err((errno, this)) = submitted else { return };
        if errno == Errno::ENOMEM {
            match shared.desc.queue_io_wait(&shared.channel, move || this.start()) {
                Ok(()) => return,
                Err((errno, retry)) => {
                    spdk_error!("chronicle: {}: cannot wait for I/O resources: {errno}", shared.name);
                    // Not queued: run the retry now; it fails again or goes through.
                    return retry();
                }
            }
        }
        this.finish(Err(format!("submission refused: {errno}")));
    }

    /// Hands the completion to the channel's list and the box back to the pool.
    fn finish(mut self: Box<Self>, result: Result<(), String>) {
        let shared = self.shared.take().expect("an operation in flight has its channel");
        let (tag, kind) = (self.tag, self.kind);
        let result = result.map_err(|detail| {
            let (offset_blocks, num_blocks) = match kind {
                OperationKind::Flush => (0, 0),
                _ => (self.offset_blocks, self.num_blocks),
            };
            Box::new(IoError::Media { device: shared.name.clone(), kind, offset_blocks, num_blocks, detail })
        });
        let payload = match kind {
            OperationKind::Read => Payload::Read(self.read.take().expect("a read holds its buffers")),
            OperationKind::Write => Payload::Write(self.written.take().expect("a write holds its buffers")),
            _ => Payload::None,
        };
        debug_assert!(shared.in_flight.get() > 0);
        shared.in_flight.set(shared.in_flight.get() - 1);
        shared.done.borrow_mut().push(Completion { tag, kind, result, payload });
        let mut pool = shared.pool.borrow_mut();
        if pool.len() < POOL_LIMIT {
            pool.push(self);
        }
    }
}

impl IoDone for InFlight {
    fn done(mut self: Box<Self>, success: bool) {
        if success && self.stage == Stage::Data && self.fua_flush {
            self.stage = Stage::Flush; // The same range (InFlight::request).
            return self.start();
        }
        let failure = match (success, self.stage) {
            (true, _) => None,
            (false, Stage::Data) => Some("the bdev failed the I/O".to_string()),
            (false, Stage::Flush) => Some("the flush after the FUA write failed".to_string()),
        };
        self.finish(failure.map_or(Ok(()), Err));
    }
}

fn iovec_of(buffer: &DmaBuf) -> libc::iovec {
    // SPDK only reads through the iovec of a write; the `*mut` is what its API takes.
    libc::iovec { iov_base: buffer.as_slice().as_ptr().cast_mut().cast(), iov_len: buffer.len() }
}
