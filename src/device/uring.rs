//! Linux files and block devices through io_uring: the standalone host's backend.
//!
//! - A [`UringContext`] (one per thread, shared through `Rc`) owns the ring, a pool of
//!   registered buffers, and routes completions to channels by `user_data`
//!   (channel id in the high 32 bits, slot in the low 32).
//! - A [`UringDevice`] is one opened file or block device; its channels keep each operation
//!   (buffers and iovec array) in a slot until its completion is reaped, so the kernel never
//!   sees freed memory.
//! - Read and write use `READV`/`WRITEV`, or `READ_FIXED`/`WRITE_FIXED` when the operation is
//!   one registered buffer of this context; `fua` is `RWF_DSYNC`; flush is `fdatasync`; unmap
//!   and write-zeroes are `fallocate` (`PUNCH_HOLE` and `ZERO_RANGE`, with `KEEP_SIZE`), which
//!   Linux also accepts on block devices (discard with zeroing, zero-out) — each falls back to
//!   the other when the file system or device refuses it, since both read back as zeroes.
//! - Short reads and writes are resubmitted for the remainder; a read making no progress (end
//!   of file) fails.
//!
//! All `unsafe` of the backend lives in this file, each block with its `SAFETY` reason.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use super::buffer::BUFFER_ALIGNMENT;
use super::{
    validate, Channel, Completion, Device, DeviceError, DeviceGeometry, DmaBuf, ForeignMemory, IoBuffers, IoError,
    Operation, OperationKind, Payload, SharedBuffers, SubmitError, Tag,
};

/// Largest read or write one operation may carry.
const MAX_TRANSFER_BYTES: u32 = 16 << 20;
/// Most buffers in one read or write (the kernel's `UIO_MAXIOV`).
const MAX_SEGMENTS: usize = libc::UIO_MAXIOV as usize;
/// Retries of an operation the kernel answered with `EAGAIN` or `EINTR`.
const MAX_RETRIES: u32 = 16;
/// How long dropping a context waits for operations of dropped channels.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Registered buffers.

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(4096))]
struct Page([u8; BUFFER_ALIGNMENT]);

/// Memory registered with a ring. A buffer's pages are either here (free) or in one
/// [`RegisteredBuffer`]; they are never freed before the pool, which the context keeps alive
/// until after its ring is gone, so the kernel's registration never points at freed memory.
struct BufferPool {
    free: Mutex<Vec<(u16, Vec<Page>)>>,
    buffer_size: usize,
    /// Address of each buffer, to recognise this pool's buffers.
    addresses: Vec<usize>,
}

impl BufferPool {
    fn free_list(&self) -> MutexGuard<'_, Vec<(u16, Vec<Page>)>> {
        // Never lose pages to a poisoned lock: they must outlive the registration.
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `bytes` lies in registered buffer `index` of this pool.
    fn holds(&self, index: u16, bytes: &[u8]) -> bool {
        let start = bytes.as_ptr() as usize;
        self.addresses
            .get(usize::from(index))
            .is_some_and(|base| *base <= start && start + bytes.len() <= base + self.buffer_size)
    }
}

/// A registered buffer lent to a [`DmaBuf`]; its pages go back to the pool on drop.
struct RegisteredBuffer {
    pool: Arc<BufferPool>,
    index: u16,
    pages: Vec<Page>,
    len: usize,
}

impl ForeignMemory for RegisteredBuffer {
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<Page, u8>(&self.pages)[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<Page, u8>(&mut self.pages)[..self.len]
    }

    fn registered_index(&self) -> Option<u16> {
        Some(self.index)
    }
}

impl Drop for RegisteredBuffer {
    fn drop(&mut self) {
        let pages = std::mem::take(&mut self.pages);
        self.pool.free_list().push((self.index, pages));
    }
}

// ---------------------------------------------------------------------------------------------
// Context.

/// Shape of a [`UringContext`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringContextOptions {
    /// Submission queue entries (a power of two); the completion queue has twice as many,
    /// which bounds the operations in flight over all channels of the context.
    pub entries: u32,
    /// Registered buffers; 0 registers none.
    pub registered_buffer_count: usize,
    /// Bytes per registered buffer (a multiple of 4096). [`Channel::alloc`] lends one for
    /// lengths in `(size / 2, size]`.
    pub registered_buffer_size: usize,
}

impl Default for UringContextOptions {
    /// 256 entries, 64 registered buffers of 256 KiB.
    fn default() -> Self {
        UringContextOptions { entries: 256, registered_buffer_count: 64, registered_buffer_size: 256 << 10 }
    }
}

/// One io_uring per thread, shared by the devices and channels of that thread.
pub struct UringContext {
    // Field order is drop order: the ring (and its registration) goes before the pool memory.
    ring: RefCell<IoUring>,
    pool: Option<Arc<BufferPool>>,
    /// Completions reaped for each open channel: (slot, result).
    inboxes: RefCell<BTreeMap<u32, VecDeque<(u32, i32)>>>,
    /// Operations of dropped channels, kept until the kernel is done with their buffers.
    orphans: RefCell<BTreeMap<u64, Slot>>,
    next_channel_id: Cell<u32>,
    /// Submission entries given to the ring whose completion was not reaped yet.
    in_flight: Cell<usize>,
    /// Bound of `in_flight`: the completion queue size, so it can never overflow.
    capacity: usize,
    /// Entries that used a registered buffer (READ_FIXED, WRITE_FIXED).
    fixed_entries: Cell<u64>,
}

impl UringContext {
    pub fn new(options: &UringContextOptions) -> Result<Rc<UringContext>, DeviceError> {
        let error = |detail: String| DeviceError::Channel { device: "io_uring".into(), detail };
        if !options.entries.is_power_of_two() || options.entries > 32768 {
            return Err(error(format!("{} entries: must be a power of two up to 32768", options.entries)));
        }
        let ring = IoUring::new(options.entries).map_err(|e| error(format!("cannot create a ring: {e}")))?;
        let capacity = ring.params().cq_entries() as usize;
        let pool = match options.registered_buffer_count {
            0 => None,
            count => Some(Arc::new(register_pool(&ring, count, options.registered_buffer_size).map_err(error)?)),
        };
        Ok(Rc::new(UringContext {
            ring: RefCell::new(ring),
            pool,
            inboxes: RefCell::new(BTreeMap::new()),
            orphans: RefCell::new(BTreeMap::new()),
            next_channel_id: Cell::new(0),
            in_flight: Cell::new(0),
            capacity,
            fixed_entries: Cell::new(0),
        }))
    }

    /// Submits queued entries and routes finished completions to their channels without
    /// blocking; returns how many completions were reaped. Channels call it from their poll.
    pub fn poll(&self) -> usize {
        self.submit_queued(0);
        self.reap()
    }

    /// Blocks until at least one completion is available or `timeout` passes (`None`: no
    /// limit), then reaps like [`poll`](Self::poll). Returns at once when nothing is in flight.
    pub fn wait(&self, timeout: Option<Duration>) -> usize {
        if self.in_flight.get() == 0 {
            return self.reap();
        }
        let reaped = self.poll();
        if reaped > 0 {
            return reaped;
        }
        match timeout {
            Some(timeout) => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                let result = self.ring.borrow().submitter().submit_with_args(1, &args);
                self.check_enter(result);
            }
            None => self.submit_queued(1),
        }
        self.reap()
    }

    /// Operations of every channel given to the kernel and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Entries submitted with a registered buffer (`READ_FIXED`, `WRITE_FIXED`) so far.
    pub fn fixed_entries(&self) -> u64 {
        self.fixed_entries.get()
    }

    /// Registered buffers free in the pool.
    pub fn registered_buffers_free(&self) -> usize {
        self.pool.as_ref().map_or(0, |pool| pool.free_list().len())
    }

    fn submit_queued(&self, want: usize) {
        let result = self.ring.borrow().submit_and_wait(want);
        self.check_enter(result);
    }

    /// `io_uring_enter` failing for another reason than a busy or interrupted ring means the
    /// ring itself is broken: nothing sensible can continue on it.
    fn check_enter(&self, result: io::Result<usize>) {
        if let Err(error) = result {
            match error.raw_os_error() {
                Some(libc::EBUSY | libc::EAGAIN | libc::EINTR | libc::ETIME) => {}
                _ => panic!("io_uring_enter failed: {error}; the ring is unusable"),
            }
        }
    }

    fn reap(&self) -> usize {
        let mut ring = self.ring.borrow_mut();
        let mut inboxes = self.inboxes.borrow_mut();
        let mut reaped = 0;
        for entry in ring.completion() {
            reaped += 1;
            let user_data = entry.user_data();
            let channel = (user_data >> 32) as u32;
            match inboxes.get_mut(&channel) {
                Some(inbox) => inbox.push_back((user_data as u32, entry.result())),
                None => {
                    let orphan = self.orphans.borrow_mut().remove(&user_data);
                    assert!(orphan.is_some(), "io_uring completion for unknown operation {user_data:#x}");
                }
            }
        }
        assert!(reaped <= self.in_flight.get(), "more completions than operations in flight");
        self.in_flight.set(self.in_flight.get() - reaped);
        reaped
    }

    /// Pushes one entry, making room by submitting when the queue is full. False if the ring
    /// is at capacity.
    ///
    /// # Safety
    /// Every buffer and iovec the entry points to must stay valid and unmoved until its
    /// completion is reaped.
    unsafe fn push(&self, entry: &squeue::Entry) -> bool {
        if self.in_flight.get() >= self.capacity {
            return false;
        }
        if self.ring.borrow_mut().submission().is_full() {
            self.submit_queued(0);
        }
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the caller guarantees the entry's memory outlives the operation.
        let pushed = unsafe { ring.submission().push(entry) }.is_ok();
        if pushed {
            self.in_flight.set(self.in_flight.get() + 1);
        }
        pushed
    }

    fn open_inbox(&self) -> u32 {
        let id = self.next_channel_id.get();
        self.next_channel_id.set(id.checked_add(1).expect("fewer than 2^32 channels per context"));
        self.inboxes.borrow_mut().insert(id, VecDeque::new());
        id
    }

    fn take_inbox(&self, channel: u32) -> VecDeque<(u32, i32)> {
        let mut inboxes = self.inboxes.borrow_mut();
        std::mem::take(inboxes.get_mut(&channel).expect("the channel's inbox is open"))
    }

    fn close_inbox(&self, channel: u32, in_flight: Vec<(u32, Slot)>) {
        // Completions already reaped for the channel: their slots are done.
        let reaped = self.inboxes.borrow_mut().remove(&channel).unwrap_or_default();
        let mut orphans = self.orphans.borrow_mut();
        for (slot, operation) in in_flight {
            if !reaped.iter().any(|(done, _)| *done == slot) {
                orphans.insert(user_data(channel, slot), operation);
            }
        }
    }

    fn alloc(&self, len: usize) -> DmaBuf {
        if let Some(pool) = &self.pool {
            if len > pool.buffer_size / 2 && len <= pool.buffer_size {
                if let Some((index, pages)) = pool.free_list().pop() {
                    let mut buffer = RegisteredBuffer { pool: pool.clone(), index, pages, len };
                    buffer.bytes_mut().fill(0);
                    return DmaBuf::foreign(Box::new(buffer));
                }
            }
        }
        DmaBuf::zeroed(len)
    }

    /// The registered index of a single-buffer operation, when the buffer is this context's.
    fn fixed_index(&self, buffers: &IoBuffers) -> Option<u16> {
        let [segment] = buffers.segments() else { return None };
        let index = segment.registered_index()?;
        self.pool.as_ref().filter(|pool| pool.holds(index, segment.as_slice())).map(|_| index)
    }
}

impl Drop for UringContext {
    /// Waits for the operations of dropped channels; if the kernel never finishes them, their
    /// buffers are leaked rather than freed under it.
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.in_flight.get() > 0 && Instant::now() < deadline {
            self.wait(Some(Duration::from_millis(100)));
        }
        if self.in_flight.get() > 0 {
            std::mem::forget(std::mem::take(self.orphans.get_mut()));
        }
    }
}

fn register_pool(ring: &IoUring, count: usize, buffer_size: usize) -> Result<BufferPool, String> {
    if count > usize::from(u16::MAX) || buffer_size == 0 || buffer_size % BUFFER_ALIGNMENT != 0 || buffer_size > 1 << 30
    {
        return Err(format!(
            "{count} registered buffers of {buffer_size} bytes: need at most 65535 buffers of a multiple of \
             {BUFFER_ALIGNMENT} bytes up to 1 GiB"
        ));
    }
    let mut buffers: Vec<(u16, Vec<Page>)> = (0..count)
        .map(|index| (index as u16, vec![Page([0; BUFFER_ALIGNMENT]); buffer_size / BUFFER_ALIGNMENT]))
        .collect();
    let iovecs: Vec<libc::iovec> = buffers
        .iter_mut()
        .map(|(_, pages)| libc::iovec { iov_base: pages.as_mut_ptr().cast(), iov_len: buffer_size })
        .collect();
    let addresses = iovecs.iter().map(|iovec| iovec.iov_base as usize).collect();
    // SAFETY: each iovec covers one page vector of `buffer_size` bytes. The vectors move into
    // the pool, which only hands them out and takes them back (moving a Vec does not move its
    // heap memory) and outlives the ring (see `UringContext`'s field order and `BufferPool`).
    unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|e| {
        format!(
            "cannot register {count} buffers of {buffer_size} bytes: {e} (raise RLIMIT_MEMLOCK, or register fewer \
             with UringContextOptions::registered_buffer_count)"
        )
    })?;
    Ok(BufferPool { free: Mutex::new(buffers), buffer_size, addresses })
}

fn user_data(channel: u32, slot: u32) -> u64 {
    (u64::from(channel) << 32) | u64::from(slot)
}

// ---------------------------------------------------------------------------------------------
// Device.

/// How to open a [`UringDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringOptions {
    /// Device block size; `None`: 4096 for files, the logical sector size for block devices.
    pub block_size: Option<u32>,
    /// Open with `O_DIRECT`.
    pub direct: bool,
    /// When the file system refuses `O_DIRECT`, use buffered I/O instead of failing.
    pub allow_buffered: bool,
    /// Create the file if missing and extend it to at least this many bytes.
    pub create_size: Option<u64>,
    pub read_only: bool,
    /// Operations a channel accepts before answering [`SubmitError::QueueFull`].
    pub queue_depth: usize,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            block_size: None,
            direct: true,
            allow_buffered: false,
            create_size: None,
            read_only: false,
            queue_depth: 128,
        }
    }
}

struct DeviceShared {
    name: String,
    file: File,
    geometry: DeviceGeometry,
    direct: bool,
    block_device: bool,
    read_only: bool,
    queue_depth: usize,
}

/// A file or block device driven through a [`UringContext`].
pub struct UringDevice {
    shared: Rc<DeviceShared>,
    ctx: Rc<UringContext>,
}

impl UringDevice {
    pub fn open(
        path: impl AsRef<Path>,
        options: &UringOptions,
        ctx: Rc<UringContext>,
    ) -> Result<UringDevice, DeviceError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let error = |detail: String| DeviceError::Open { path: name.clone(), detail };
        if options.queue_depth == 0 || options.queue_depth > u32::MAX as usize {
            return Err(error(format!("queue depth {} is out of range", options.queue_depth)));
        }
        if let (Some(size), false) = (options.create_size, options.read_only) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| error(format!("cannot create: {e}")))?;
            let metadata = file.metadata().map_err(|e| error(format!("cannot stat: {e}")))?;
            if metadata.is_file() && metadata.len() < size {
                file.set_len(size).map_err(|e| error(format!("cannot extend to {size} bytes: {e}")))?;
            }
        }
        let open = |direct: bool| {
            let mut open_options = OpenOptions::new();
            open_options.read(true).write(!options.read_only);
            if direct {
                open_options.custom_flags(libc::O_DIRECT);
            }
            open_options.open(path)
        };
        let mut direct = options.direct;
        let mut file = match open(direct) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                direct = false;
                refuse_or_fall_back(options, &error, &e)?;
                open(false).map_err(|e| error(format!("cannot open: {e}")))?
            }
            result => result.map_err(|e| error(format!("cannot open: {e}")))?,
        };
        let metadata = file.metadata().map_err(|e| error(format!("cannot stat: {e}")))?;
        let block_device = metadata.file_type().is_block_device();
        let (size_bytes, sector_size) = if block_device {
            let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
                .map_err(|e| error(format!("cannot read the device size: {e}")))?;
            (size, logical_sector_size(&file).map_err(|e| error(format!("BLKSSZGET failed: {e}")))?)
        } else if metadata.is_file() {
            (metadata.len(), 1)
        } else {
            return Err(error("is neither a regular file nor a block device".into()));
        };
        let block_size = options.block_size.unwrap_or(if block_device { sector_size } else { 4096 });
        if !block_size.is_power_of_two() || block_size < 512 || block_size % sector_size != 0 {
            return Err(error(format!(
                "block size {block_size} must be a power of two of at least 512 and a multiple of the logical \
                 sector size {sector_size}"
            )));
        }
        let block_count = size_bytes / u64::from(block_size);
        if block_count == 0 {
            return Err(error(format!("{size_bytes} bytes hold no {block_size}-byte block")));
        }
        // Some file systems accept O_DIRECT at open and refuse it at the first I/O.
        if direct {
            let mut probe = DmaBuf::zeroed(block_size as usize);
            if let Err(e) = file.read_at(probe.as_mut_slice(), 0) {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(error(format!("cannot read block 0: {e}")));
                }
                refuse_or_fall_back(options, &error, &e)?;
                direct = false;
                file = open(false).map_err(|e| error(format!("cannot open: {e}")))?;
            }
        }
        let geometry = DeviceGeometry {
            block_size,
            block_count,
            buffer_alignment: if direct { BUFFER_ALIGNMENT as u32 } else { 1 },
            max_transfer_blocks: MAX_TRANSFER_BYTES / block_size,
            volatile_cache: true,
        };
        let shared = DeviceShared {
            name,
            file,
            geometry,
            direct,
            block_device,
            read_only: options.read_only,
            queue_depth: options.queue_depth,
        };
        Ok(UringDevice { shared: Rc::new(shared), ctx })
    }

    /// Whether I/O bypasses the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.shared.direct
    }

    pub fn is_block_device(&self) -> bool {
        self.shared.block_device
    }
}

fn refuse_or_fall_back(
    options: &UringOptions,
    error: &dyn Fn(String) -> DeviceError,
    cause: &io::Error,
) -> Result<(), DeviceError> {
    if options.allow_buffered {
        Ok(())
    } else {
        Err(error(format!(
            "the file system refuses O_DIRECT ({cause}); set allow_buffered to use buffered I/O instead"
        )))
    }
}

fn logical_sector_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int through the pointer, which points at a live local.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size as *mut libc::c_int) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(size).ok().filter(|size| *size > 0).ok_or_else(|| io::Error::other(format!("sector size {size}")))
}

impl Device for UringDevice {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn geometry(&self) -> DeviceGeometry {
        self.shared.geometry
    }

    fn open_channel(&self) -> Result<Box<dyn Channel>, DeviceError> {
        let depth = self.shared.queue_depth;
        Ok(Box::new(UringChannel {
            device: self.shared.clone(),
            ctx: self.ctx.clone(),
            id: self.ctx.open_inbox(),
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as u32).rev().collect(),
            unpushed: VecDeque::new(),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Channel.

#[derive(Debug)]
enum SlotBuffers {
    Read(IoBuffers),
    Write(SharedBuffers),
    None,
}

/// One operation between submit and completion.
#[derive(Debug)]
struct Slot {
    tag: Tag,
    kind: OperationKind,
    offset_bytes: u64,
    len_bytes: u64,
    /// Bytes already transferred by earlier (short) completions.
    done_bytes: u64,
    fua: bool,
    buffers: SlotBuffers,
    /// The iovec array of the entry in flight; the kernel may read it until completion.
    iovecs: Vec<libc::iovec>,
    /// `fallocate` mode of unmap and write-zeroes.
    fallocate_mode: i32,
    fallback_tried: bool,
    retries: u32,
}

const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

struct UringChannel {
    device: Rc<DeviceShared>,
    ctx: Rc<UringContext>,
    id: u32,
    /// Fixed size (the queue depth), so slots never move while the kernel uses them.
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Accepted operations waiting for room in the ring (resubmissions after a short transfer).
    unpushed: VecDeque<u32>,
}

impl UringChannel {
    /// Builds the entry for the (remaining part of the) operation in `slot`.
    fn entry(&mut self, slot_index: u32) -> squeue::Entry {
        let fd = types::Fd(self.device.file.as_raw_fd());
        let fixed = match &self.slots[slot_index as usize].as_ref().expect("slot in use").buffers {
            SlotBuffers::Read(buffers) => self.ctx.fixed_index(buffers),
            SlotBuffers::Write(buffers) => self.ctx.fixed_index(buffers),
            SlotBuffers::None => None,
        };
        let slot = self.slots[slot_index as usize].as_mut().expect("slot in use");
        let offset = slot.offset_bytes + slot.done_bytes;
        let remaining = (slot.len_bytes - slot.done_bytes) as usize;
        let skip = slot.done_bytes as usize;
        let rw_flags = if slot.fua { libc::RWF_DSYNC } else { 0 };
        if fixed.is_some() {
            self.ctx.fixed_entries.set(self.ctx.fixed_entries.get() + 1);
        }
        let entry = match (&mut slot.buffers, fixed) {
            (SlotBuffers::Read(buffers), Some(index)) => {
                let bytes = buffers.segments_mut()[0].as_mut_slice();
                let start = bytes[skip..].as_mut_ptr();
                opcode::ReadFixed::new(fd, start, remaining as u32, index).offset(offset).build()
            }
            (SlotBuffers::Write(buffers), Some(index)) => {
                let start = buffers.segments()[0].as_slice()[skip..].as_ptr();
                opcode::WriteFixed::new(fd, start, remaining as u32, index).offset(offset).rw_flags(rw_flags).build()
            }
            (SlotBuffers::Read(buffers), None) => {
                let segments = buffers.segments_mut().iter_mut().map(|segment| {
                    let bytes = segment.as_mut_slice();
                    (bytes.as_mut_ptr(), bytes.len())
                });
                slot.iovecs = iovecs(segments, skip);
                opcode::Readv::new(fd, slot.iovecs.as_ptr(), slot.iovecs.len() as u32).offset(offset).build()
            }
            (SlotBuffers::Write(buffers), None) => {
                // The kernel only reads through these addresses.
                let segments = buffers.segments().iter().map(|segment| {
                    let bytes = segment.as_slice();
                    (bytes.as_ptr().cast_mut(), bytes.len())
                });
                slot.iovecs = iovecs(segments, skip);
                opcode::Writev::new(fd, slot.iovecs.as_ptr(), slot.iovecs.len() as u32)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build()
            }
            (SlotBuffers::None, _) => match slot.kind {
                OperationKind::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
                OperationKind::Unmap | OperationKind::WriteZeroes => opcode::Fallocate::new(fd, slot.len_bytes)
                    .offset(slot.offset_bytes)
                    .mode(slot.fallocate_mode)
                    .build(),
                OperationKind::Read | OperationKind::Write => unreachable!("transfers carry buffers"),
            },
        };
        entry.user_data(user_data(self.id, slot_index))
    }

    /// Gives the slot's operation to the ring; false if the ring has no room now.
    fn push(&mut self, slot_index: u32) -> bool {
        let entry = self.entry(slot_index);
        // SAFETY: the entry points into the slot's buffers and iovec array. The slot stays in
        // `self.slots` (a vector that never grows) untouched until the completion is reaped;
        // if the channel is dropped first, the slot moves to the context's orphans, which keep
        // it until its completion (moving a slot does not move the heap memory it owns).
        unsafe { self.ctx.push(&entry) }
    }

    fn complete(&mut self, slot_index: u32, result: Result<(), IoError>) -> Completion {
        let slot = self.slots[slot_index as usize].take().expect("slot in use");
        self.free.push(slot_index);
        let payload = match slot.buffers {
            SlotBuffers::Read(buffers) => Payload::Read(buffers),
            SlotBuffers::Write(buffers) => Payload::Write(buffers),
            SlotBuffers::None => Payload::None,
        };
        Completion { tag: slot.tag, kind: slot.kind, result: result.map_err(Box::new), payload }
    }

    fn media_error(&self, slot: &Slot, detail: String) -> IoError {
        let block_size = u64::from(self.device.geometry.block_size);
        IoError::Media {
            device: self.device.name.clone(),
            kind: slot.kind,
            offset_blocks: slot.offset_bytes / block_size,
            num_blocks: slot.len_bytes / block_size,
            detail,
        }
    }

    /// Handles one reaped completion: finishes the operation, or resubmits what is left.
    fn on_completion(&mut self, slot_index: u32, result: i32, completions: &mut Vec<Completion>) {
        let slot = self.slots[slot_index as usize].as_mut().expect("completion for a slot in use");
        let transfer = matches!(slot.kind, OperationKind::Read | OperationKind::Write);
        let outcome = if result < 0 {
            let errno = -result;
            if matches!(errno, libc::EAGAIN | libc::EINTR) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                None
            } else if errno == libc::EOPNOTSUPP && slot.fallocate_mode != 0 && !slot.fallback_tried {
                // Both modes read back as zeroes; use whichever the file system supports.
                slot.fallback_tried = true;
                slot.fallocate_mode = if slot.fallocate_mode == PUNCH_HOLE { ZERO_RANGE } else { PUNCH_HOLE };
                None
            } else {
                let operation = describe(slot.kind);
                let detail = format!("{operation} failed: {}", io::Error::from_raw_os_error(errno));
                Some(Err(self.media_error(self.slots[slot_index as usize].as_ref().unwrap(), detail)))
            }
        } else if transfer {
            slot.done_bytes += result as u64;
            assert!(slot.done_bytes <= slot.len_bytes, "the kernel transferred more than asked");
            if slot.done_bytes == slot.len_bytes {
                Some(Ok(()))
            } else if result == 0 {
                let detail =
                    format!("{} made no progress at byte {}", describe(slot.kind), slot.offset_bytes + slot.done_bytes);
                Some(Err(self.media_error(self.slots[slot_index as usize].as_ref().unwrap(), detail)))
            } else {
                None // short transfer: resubmit the rest
            }
        } else {
            Some(Ok(()))
        };
        match outcome {
            Some(result) => completions.push(self.complete(slot_index, result)),
            None => {
                if !self.unpushed.is_empty() || !self.push(slot_index) {
                    self.unpushed.push_back(slot_index);
                }
            }
        }
    }
}

fn describe(kind: OperationKind) -> &'static str {
    match kind {
        OperationKind::Read => "read",
        OperationKind::Write => "write",
        OperationKind::Flush => "fdatasync",
        OperationKind::Unmap | OperationKind::WriteZeroes => "fallocate",
    }
}

/// The iovec array over segments given as (address, length), skipping the first `skip` bytes.
fn iovecs(segments: impl Iterator<Item = (*mut u8, usize)>, mut skip: usize) -> Vec<libc::iovec> {
    let mut iovecs = Vec::new();
    for (address, len) in segments {
        if skip >= len {
            skip -= len;
            continue;
        }
        iovecs.push(libc::iovec { iov_base: address.wrapping_add(skip).cast(), iov_len: len - skip });
        skip = 0;
    }
    iovecs
}

impl Channel for UringChannel {
    fn geometry(&self) -> DeviceGeometry {
        self.device.geometry
    }

    fn name(&self) -> &str {
        &self.device.name
    }

    fn submit(&mut self, tag: Tag, operation: Operation) -> Result<(), SubmitError> {
        let device = &self.device;
        validate(&device.name, &device.geometry, &operation).map_err(SubmitError::Invalid)?;
        let kind = operation.kind();
        if device.read_only && kind != OperationKind::Read && kind != OperationKind::Flush {
            return Err(SubmitError::Invalid(IoError::Unsupported { device: device.name.clone(), kind }));
        }
        let block_size = u64::from(device.geometry.block_size);
        let (offset_blocks, num_blocks) = operation.extent(device.geometry.block_size).unwrap_or((0, 0));
        let segments = match &operation {
            Operation::Read { buffers, .. } => buffers.segments().len(),
            Operation::Write { buffers, .. } => buffers.segments().len(),
            _ => 0,
        };
        if segments > MAX_SEGMENTS {
            return Err(SubmitError::Invalid(IoError::TooLarge {
                device: device.name.clone(),
                kind,
                num_blocks,
                segments,
                limit: format!("the limit of {MAX_SEGMENTS} buffers per operation"),
            }));
        }
        if !self.unpushed.is_empty() || self.ctx.in_flight() >= self.ctx.capacity {
            return Err(SubmitError::QueueFull(Box::new(operation)));
        }
        let Some(slot_index) = self.free.pop() else {
            return Err(SubmitError::QueueFull(Box::new(operation)));
        };
        let (buffers, fua, fallocate_mode) = match operation {
            Operation::Read { buffers, .. } => (SlotBuffers::Read(buffers), false, 0),
            Operation::Write { buffers, fua, .. } => (SlotBuffers::Write(buffers), fua, 0),
            Operation::Flush => (SlotBuffers::None, false, 0),
            Operation::Unmap { .. } => (SlotBuffers::None, false, PUNCH_HOLE),
            Operation::WriteZeroes { .. } => (SlotBuffers::None, false, ZERO_RANGE),
        };
        self.slots[slot_index as usize] = Some(Slot {
            tag,
            kind,
            offset_bytes: offset_blocks * block_size,
            len_bytes: num_blocks * block_size,
            done_bytes: 0,
            fua,
            buffers,
            iovecs: Vec::new(),
            fallocate_mode,
            fallback_tried: false,
            retries: 0,
        });
        if !self.push(slot_index) {
            // The ring filled up between the check and the push (another channel): give the
            // operation back untouched.
            let slot = self.slots[slot_index as usize].take().expect("just stored");
            self.free.push(slot_index);
            let operation = match slot.buffers {
                SlotBuffers::Read(buffers) => Operation::Read { offset_blocks, buffers },
                SlotBuffers::Write(buffers) => Operation::Write { offset_blocks, buffers, fua },
                SlotBuffers::None => match kind {
                    OperationKind::Flush => Operation::Flush,
                    OperationKind::Unmap => Operation::Unmap { offset_blocks, num_blocks },
                    _ => Operation::WriteZeroes { offset_blocks, num_blocks },
                },
            };
            return Err(SubmitError::QueueFull(Box::new(operation)));
        }
        Ok(())
    }

    fn poll(&mut self, completions: &mut Vec<Completion>) -> usize {
        while let Some(slot_index) = self.unpushed.front().copied() {
            if !self.push(slot_index) {
                break;
            }
            self.unpushed.pop_front();
        }
        self.ctx.poll();
        let before = completions.len();
        for (slot_index, result) in self.ctx.take_inbox(self.id) {
            self.on_completion(slot_index, result, completions);
        }
        completions.len() - before
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn alloc(&self, len: usize) -> DmaBuf {
        self.ctx.alloc(len)
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        let in_flight: Vec<(u32, Slot)> = self
            .slots
            .iter_mut()
            .enumerate()
            .filter_map(|(index, slot)| slot.take().map(|slot| (index as u32, slot)))
            .filter(|(index, _)| !self.unpushed.contains(index))
            .collect();
        self.ctx.close_inbox(self.id, in_flight);
    }
}
