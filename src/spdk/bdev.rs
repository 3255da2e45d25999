//! Block devices: [`Bdev`] (a borrowed view), [`BdevDesc`] (an open descriptor, closed on the
//! thread that opened it), [`IoChannel`] (a per-thread channel, put back on drop) and
//! [`BdevIo`] (an I/O submitted to a bdev of ours, completed by value).

use std::cell::Cell;
use std::ffi::{c_void, CStr, CString};
use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::ptr::NonNull;

use super::bdev_module::ModuleRef;
use super::dma::DmaBuf;
use super::thread::{Thread, ThreadHandle};
use super::{ffi, Errno, NotSend};
use crate::device::IoBuffers;

/// Kinds of bdev I/O the module deals with; everything else is [`IoType::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    Unmap,
    Flush,
    Reset,
    WriteZeroes,
    Other(u32),
}

impl IoType {
    pub(crate) fn from_raw(raw: u32) -> Self {
        match raw {
            ffi::SPDK_BDEV_IO_TYPE_READ => IoType::Read,
            ffi::SPDK_BDEV_IO_TYPE_WRITE => IoType::Write,
            ffi::SPDK_BDEV_IO_TYPE_UNMAP => IoType::Unmap,
            ffi::SPDK_BDEV_IO_TYPE_FLUSH => IoType::Flush,
            ffi::SPDK_BDEV_IO_TYPE_RESET => IoType::Reset,
            ffi::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => IoType::WriteZeroes,
            other => IoType::Other(other),
        }
    }

    fn raw(self) -> ffi::spdk_bdev_io_type {
        match self {
            IoType::Read => ffi::SPDK_BDEV_IO_TYPE_READ,
            IoType::Write => ffi::SPDK_BDEV_IO_TYPE_WRITE,
            IoType::Unmap => ffi::SPDK_BDEV_IO_TYPE_UNMAP,
            IoType::Flush => ffi::SPDK_BDEV_IO_TYPE_FLUSH,
            IoType::Reset => ffi::SPDK_BDEV_IO_TYPE_RESET,
            IoType::WriteZeroes => ffi::SPDK_BDEV_IO_TYPE_WRITE_ZEROES,
            IoType::Other(other) => other,
        }
    }
}

/// How a bdev I/O ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Success,
    Failed,
    /// Out of resources: the bdev layer retries the I/O later (back-pressure, not an error).
    NoMem,
    Aborted,
}

impl IoStatus {
    fn raw(self) -> ffi::spdk_bdev_io_status {
        match self {
            IoStatus::Success => ffi::SPDK_BDEV_IO_STATUS_SUCCESS,
            IoStatus::Failed => ffi::SPDK_BDEV_IO_STATUS_FAILED,
            IoStatus::NoMem => ffi::SPDK_BDEV_IO_STATUS_NOMEM,
            IoStatus::Aborted => ffi::SPDK_BDEV_IO_STATUS_ABORTED,
        }
    }
}

/// A bdev, borrowed for `'a` (the life of a descriptor, or of one callback).
#[derive(Clone, Copy)]
pub struct Bdev<'a> {
    raw: NonNull<ffi::spdk_bdev>,
    _borrow: PhantomData<&'a ffi::spdk_bdev>,
    _not_send: NotSend,
}

impl Bdev<'_> {
    /// # Safety
    /// `raw` must be a registered bdev that stays registered for `'a`.
    pub(crate) unsafe fn from_raw(raw: NonNull<ffi::spdk_bdev>) -> Self {
        Bdev { raw, _borrow: PhantomData, _not_send: NotSend::default() }
    }

    pub(crate) fn as_ptr(&self) -> *mut ffi::spdk_bdev {
        self.raw.as_ptr()
    }

    pub fn name(&self) -> String {
        // SAFETY: a registered bdev has a NUL-terminated name that lives as long as the bdev.
        unsafe { CStr::from_ptr(ffi::spdk_bdev_get_name(self.raw.as_ptr())) }.to_string_lossy().into_owned()
    }

    pub fn product_name(&self) -> String {
        // SAFETY: as for the name.
        unsafe { CStr::from_ptr(ffi::spdk_bdev_get_product_name(self.raw.as_ptr())) }.to_string_lossy().into_owned()
    }

    /// Bytes per block (SPDK `blocklen`).
    pub fn block_size(&self) -> u32 {
        // SAFETY: reads a field of a registered bdev.
        unsafe { ffi::spdk_bdev_get_block_size(self.raw.as_ptr()) }
    }

    /// Number of blocks (SPDK `blockcnt`).
    pub fn num_blocks(&self) -> u64 {
        // SAFETY: reads a field of a registered bdev.
        unsafe { ffi::spdk_bdev_get_num_blocks(self.raw.as_ptr()) }
    }

    /// Alignment data buffers must have, in bytes.
    pub fn buffer_alignment(&self) -> usize {
        // SAFETY: reads a field of a registered bdev.
        unsafe { ffi::spdk_bdev_get_buf_align(self.raw.as_ptr()) }
    }

    /// Blocks a write must be a multiple of (1 for most bdevs).
    pub fn write_unit_size(&self) -> u32 {
        // SAFETY: reads a field of a registered bdev.
        unsafe { ffi::spdk_bdev_get_write_unit_size(self.raw.as_ptr()) }
    }

    /// Completed writes need a flush to be durable.
    pub fn has_write_cache(&self) -> bool {
        // SAFETY: reads a field of a registered bdev.
        unsafe { ffi::spdk_bdev_has_write_cache(self.raw.as_ptr()) }
    }

    pub fn io_type_supported(&self, io_type: IoType) -> bool {
        // SAFETY: asks the bdev's module through its fn_table; the bdev is registered.
        unsafe { ffi::spdk_bdev_io_type_supported(self.raw.as_ptr(), io_type.raw()) }
    }

    /// Name of the module that created the bdev (`"malloc"`, `"aio"`, `"chronicle"`, …).
    pub fn module_name(&self) -> String {
        // SAFETY: a registered bdev names its module with a static string.
        unsafe { CStr::from_ptr(ffi::spdk_bdev_get_module_name(self.raw.as_ptr())) }.to_string_lossy().into_owned()
    }

    /// Whether a module has claimed the bdev (it can then not be claimed for writing again).
    pub fn is_claimed(&self) -> bool {
        // SAFETY: reads the claim state of a registered bdev (on the app thread, where claims
        // are made); `internal.claim_type` is the public header's record of it.
        unsafe { (*self.raw.as_ptr()).internal.claim_type != ffi::SPDK_BDEV_CLAIM_NONE }
    }
}

/// Whether the bdev named `name` is claimed by a module (`None` if there is no such bdev).
pub fn bdev_claimed(name: &str) -> Option<bool> {
    let name = CString::new(name).ok()?;
    // SAFETY: looks the name up in SPDK's bdev list (app thread); the bdev is only read here,
    // while registered.
    let raw = NonNull::new(unsafe { ffi::spdk_bdev_get_by_name(name.as_ptr()) })?;
    // SAFETY: registered now (just found), read on the app thread where claims change.
    Some(unsafe { Bdev::from_raw(raw) }.is_claimed())
}

/// Whether a bdev named `name` is registered now.
pub fn bdev_exists(name: &str) -> bool {
    let Ok(name) = CString::new(name) else { return false };
    // SAFETY: looks the name up in SPDK's bdev list (app thread); the pointer is not kept.
    !unsafe { ffi::spdk_bdev_get_by_name(name.as_ptr()) }.is_null()
}

/// What happened to an opened bdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BdevEvent {
    /// The bdev is going away: close the descriptor (drop the [`BdevDesc`]) soon.
    Remove,
    Resize,
    MediaManagement,
    Other(u32),
}

/// How a module claims a bdev it builds on (`spdk_bdev_module_claim_bdev_desc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    /// Only this descriptor writes; others may read.
    ReadManyWriteOne,
    /// Nobody writes.
    ReadManyWriteNone,
}

type EventHandler = Box<dyn FnMut(BdevEvent, Bdev<'_>)>;

struct EventState {
    handler: EventHandler,
    running: Cell<bool>,
    /// The descriptor was closed while the handler ran: free the state when it returns.
    orphaned: Cell<bool>,
}

unsafe extern "C" fn event_trampoline(kind: ffi::spdk_bdev_event_type, bdev: *mut ffi::spdk_bdev, ctx: *mut c_void) {
    let state = ctx.cast::<EventState>();
    let event = match kind {
        ffi::SPDK_BDEV_EVENT_REMOVE => BdevEvent::Remove,
        ffi::SPDK_BDEV_EVENT_RESIZE => BdevEvent::Resize,
        ffi::SPDK_BDEV_EVENT_MEDIA_MANAGEMENT => BdevEvent::MediaManagement,
        other => BdevEvent::Other(other),
    };
    let Some(bdev) = NonNull::new(bdev) else { return };
    // SAFETY: SPDK only delivers events to an open descriptor, on its opening thread, and the
    // bdev stays registered during the callback. `state` is the EventState of that descriptor,
    // freed only after close and not while `running` (see BdevDesc::drop). Fields are reached
    // through the raw pointer so the `&mut` to the handler does not overlap the Cells.
    unsafe {
        (*state).running.set(true);
        ((*state).handler)(event, Bdev::from_raw(bdev));
        (*state).running.set(false);
        if (*state).orphaned.get() {
            drop(Box::from_raw(state));
        }
    }
}

/// An open bdev descriptor (`spdk_bdev_open_ext`). Dropping it closes it on the SPDK thread
/// that opened it (by message if dropped on another one), as SPDK requires.
pub struct BdevDesc {
    raw: NonNull<ffi::spdk_bdev_desc>,
    opener: ThreadHandle,
    events: NonNull<EventState>,
    _not_send: NotSend,
}

impl BdevDesc {
    /// Opens bdev `name` on the calling SPDK thread; `on_event` runs on this thread when the bdev
    /// is removed or resized. `ENODEV` if there is no such bdev, `EPERM` if it is claimed for
    /// writing and `write` is asked, `EPERM` outside an SPDK thread.
    pub fn open<F>(name: &str, write: bool, on_event: F) -> Result<BdevDesc, Errno>
    where
        F: FnMut(BdevEvent, Bdev<'_>) + 'static,
    {
        let opener = Thread::current().ok_or(Errno::EPERM)?.handle();
        let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
        let events = Box::into_raw(Box::new(EventState {
            handler: Box::new(on_event),
            running: Cell::new(false),
            orphaned: Cell::new(false),
        }));
        let mut raw = std::ptr::null_mut();
        // SAFETY: on an SPDK thread; `events` matches event_trampoline and outlives the
        // descriptor (freed after close); `raw` receives the descriptor.
        let rc =
            unsafe { ffi::spdk_bdev_open_ext(name.as_ptr(), write, Some(event_trampoline), events.cast(), &mut raw) };
        match (Errno::check(rc), NonNull::new(raw)) {
            (Ok(()), Some(raw)) => Ok(BdevDesc {
                raw,
                opener,
                // SAFETY: Box::into_raw never returns null.
                events: unsafe { NonNull::new_unchecked(events) },
                _not_send: NotSend::default(),
            }),
            (result, _) => {
                // SAFETY: the open failed, SPDK holds no reference to `events`.
                drop(unsafe { Box::from_raw(events) });
                Err(result.err().unwrap_or(Errno::ENODEV))
            }
        }
    }

    /// The opened bdev, valid while the descriptor is open.
    pub fn bdev(&self) -> Bdev<'_> {
        // SAFETY: an open descriptor keeps its bdev registered.
        let raw = unsafe { ffi::spdk_bdev_desc_get_bdev(self.raw.as_ptr()) };
        // SAFETY: never null for an open descriptor; borrowed for the descriptor's life.
        unsafe { Bdev::from_raw(NonNull::new(raw).expect("open descriptor without bdev")) }
    }

    /// A channel to the bdev for the calling SPDK thread.
    pub fn io_channel(&self) -> Result<IoChannel, Errno> {
        // SAFETY: spdk_get_thread only reads a thread-local pointer.
        if unsafe { ffi::spdk_get_thread() }.is_null() {
            return Err(Errno::EPERM);
        }
        // SAFETY: the descriptor is open; the channel belongs to the calling thread.
        let raw = unsafe { ffi::spdk_bdev_get_io_channel(self.raw.as_ptr()) };
        NonNull::new(raw).map(|raw| IoChannel { raw, _not_send: NotSend::default() }).ok_or(Errno::ENOMEM)
    }

    /// Reads `num_blocks` blocks at `offset_blocks` into `buffer`; `done` gets the result and
    /// the buffer back, later, on this thread. Gives the buffer back with `ENOMEM` when the bdev
    /// layer is out of I/O structures: then wait with [`queue_io_wait`](Self::queue_io_wait)
    /// and submit again (back-pressure, not a failure); `EINVAL` when the range is outside the
    /// bdev or the buffer is too small.
    pub fn read_blocks<F>(
        &self,
        channel: &IoChannel,
        buffer: DmaBuf,
        offset_blocks: u64,
        num_blocks: u64,
        done: F,
    ) -> Result<(), (Errno, DmaBuf)>
    where
        F: FnOnce(Result<(), Errno>, DmaBuf) + 'static,
    {
        struct Pending<F> {
            buffer: DmaBuf,
            done: F,
        }
        unsafe extern "C" fn complete<F: FnOnce(Result<(), Errno>, DmaBuf)>(
            bdev_io: *mut ffi::spdk_bdev_io,
            success: bool,
            arg: *mut c_void,
        ) {
            // SAFETY: the child I/O is ours to free, once, and nothing below uses it.
            unsafe { ffi::spdk_bdev_free_io(bdev_io) };
            // SAFETY: `arg` is the Box::into_raw below; SPDK calls this once.
            let pending = unsafe { Box::from_raw(arg.cast::<Pending<F>>()) };
            let result = if success { Ok(()) } else { Err(Errno(libc::EIO)) };
            (pending.done)(result, pending.buffer);
        }
        let bytes = u64::from(self.bdev().block_size()).checked_mul(num_blocks);
        if bytes.is_none_or(|bytes| bytes > buffer.len() as u64) {
            return Err((Errno::EINVAL, buffer));
        }
        let mut pending = Box::new(Pending { buffer, done });
        let data = pending.buffer.iovec().iov_base;
        let arg = Box::into_raw(pending);
        // SAFETY: open descriptor and this thread's channel; `data` holds `num_blocks` blocks
        // and stays allocated (inside `pending`) until `complete` runs, exactly once on success.
        let rc = unsafe {
            ffi::spdk_bdev_read_blocks(
                self.raw.as_ptr(),
                channel.as_ptr(),
                data,
                offset_blocks,
                num_blocks,
                Some(complete::<F>),
                arg.cast(),
            )
        };
        if let Err(error) = Errno::check(rc) {
            // SAFETY: submission failed, the callback will not run: `pending` is ours again.
            pending = unsafe { Box::from_raw(arg) };
            return Err((error, pending.buffer));
        }
        Ok(())
    }

    /// Calls `retry` on this thread once the bdev layer has I/O structures for `channel` again
    /// (`spdk_bdev_queue_io_wait`), after a submission failed with `ENOMEM`.
    /// `retry` is given back if it cannot be queued.
    pub fn queue_io_wait<F: FnOnce() + 'static>(&self, channel: &IoChannel, retry: F) -> Result<(), (Errno, F)> {
        #[repr(C)]
        struct Waiting<F> {
            // First field: SPDK links this entry into its wait queue until the callback.
            entry: ffi::spdk_bdev_io_wait_entry,
            retry: F,
        }
        unsafe extern "C" fn resume<F: FnOnce()>(arg: *mut c_void) {
            // SAFETY: `arg` is the Box::into_raw below; SPDK unlinks the entry and calls this once.
            let waiting = unsafe { Box::from_raw(arg.cast::<Waiting<F>>()) };
            (waiting.retry)();
        }
        let bdev = self.bdev().as_ptr();
        let waiting = Box::into_raw(Box::new(Waiting { entry: ffi::spdk_bdev_io_wait_entry::default(), retry }));
        // SAFETY: `waiting` is a live allocation; the entry names the bdev and channel the
        // submission failed on, as SPDK requires, and stays allocated until `resume`.
        let rc = unsafe {
            (*waiting).entry.bdev = bdev;
            (*waiting).entry.cb_fn = Some(resume::<F>);
            (*waiting).entry.cb_arg = waiting.cast();
            ffi::spdk_bdev_queue_io_wait(bdev, channel.as_ptr(), std::ptr::addr_of_mut!((*waiting).entry))
        };
        if let Err(error) = Errno::check(rc) {
            // SAFETY: not queued, the callback will not run: the entry is ours again.
            let waiting = unsafe { Box::from_raw(waiting) };
            return Err((error, waiting.retry));
        }
        Ok(())
    }

    /// Submits one block operation through `channel`; `done(success)` runs later, on this
    /// thread, exactly once. On failure to submit, `done` is given back with the error
    /// (`ENOMEM`: wait with [`queue_io_wait`](Self::queue_io_wait) and submit again).
    ///
    /// # Safety
    /// For reads and writes, `iovs` and the memory they describe must stay valid (and, for a
    /// read, not be accessed) until `done` runs; the usual way is for `done` to own them.
    pub unsafe fn submit<F>(
        &self,
        channel: &IoChannel,
        request: BlockRequest,
        done: Box<F>,
    ) -> Result<(), (Errno, Box<F>)>
    where
        F: IoDone,
    {
        unsafe extern "C" fn complete<F: IoDone>(bdev_io: *mut ffi::spdk_bdev_io, success: bool, arg: *mut c_void) {
            // SAFETY: the child I/O is ours to free, once, and nothing below uses it.
            unsafe { ffi::spdk_bdev_free_io(bdev_io) };
            // SAFETY: `arg` is the Box::into_raw below; SPDK calls this once.
            let done = unsafe { Box::from_raw(arg.cast::<F>()) };
            done.done(success);
        }
        let arg = Box::into_raw(done).cast::<c_void>();
        let (desc, ch, cb) = (self.raw.as_ptr(), channel.as_ptr(), Some(complete::<F> as _));
        // SAFETY: open descriptor and this thread's channel (IoChannel is !Send); iovecs valid
        // until completion (caller contract); `arg` matches `complete::<F>`, called once.
        let rc = unsafe {
            match request {
                BlockRequest::Read { iovs, iovcnt, offset_blocks, num_blocks } => {
                    ffi::spdk_bdev_readv_blocks(desc, ch, iovs, iovcnt, offset_blocks, num_blocks, cb, arg)
                }
                BlockRequest::Write { iovs, iovcnt, offset_blocks, num_blocks } => {
                    ffi::spdk_bdev_writev_blocks(desc, ch, iovs, iovcnt, offset_blocks, num_blocks, cb, arg)
                }
                BlockRequest::Flush { offset_blocks, num_blocks } => {
                    ffi::spdk_bdev_flush_blocks(desc, ch, offset_blocks, num_blocks, cb, arg)
                }
                BlockRequest::Unmap { offset_blocks, num_blocks } => {
                    ffi::spdk_bdev_unmap_blocks(desc, ch, offset_blocks, num_blocks, cb, arg)
                }
                BlockRequest::WriteZeroes { offset_blocks, num_blocks } => {
                    ffi::spdk_bdev_write_zeroes_blocks(desc, ch, offset_blocks, num_blocks, cb, arg)
                }
            }
        };
        match Errno::check(rc) {
            Ok(()) => Ok(()),
            // SAFETY: submission failed, the callback will not run: the closure is ours again.
            Err(error) => Err((error, unsafe { Box::from_raw(arg.cast::<F>()) })),
        }
    }

    /// Claims the bdev for `module`; the claim ends when the descriptor closes.
    pub fn claim(&self, module: ModuleRef, kind: ClaimKind) -> Result<(), Errno> {
        let kind = match kind {
            ClaimKind::ReadManyWriteOne => ffi::SPDK_BDEV_CLAIM_READ_MANY_WRITE_ONE,
            ClaimKind::ReadManyWriteNone => ffi::SPDK_BDEV_CLAIM_READ_MANY_WRITE_NONE,
        };
        // SAFETY: open descriptor, registered module; NULL opts means defaults.
        let rc = unsafe {
            ffi::spdk_bdev_module_claim_bdev_desc(self.raw.as_ptr(), kind, std::ptr::null_mut(), module.as_ptr())
        };
        Errno::check(rc)
    }
}

/// What runs when an operation of [`BdevDesc::submit`] completes; given back, unchanged, when
/// the submission fails (so that it can be retried).
pub trait IoDone: 'static {
    fn done(self: Box<Self>, success: bool);
}

/// One block operation for [`BdevDesc::submit`]; offsets and lengths in the bdev's blocks.
#[derive(Debug, Clone, Copy)]
pub enum BlockRequest {
    Read { iovs: *mut libc::iovec, iovcnt: i32, offset_blocks: u64, num_blocks: u64 },
    Write { iovs: *mut libc::iovec, iovcnt: i32, offset_blocks: u64, num_blocks: u64 },
    Flush { offset_blocks: u64, num_blocks: u64 },
    Unmap { offset_blocks: u64, num_blocks: u64 },
    WriteZeroes { offset_blocks: u64, num_blocks: u64 },
}

/// A descriptor every SPDK thread may use for its own I/O channel and submissions, as SPDK
/// allows (passthru gets its per-thread base channels this way). Still closed on the thread
/// that opened it, by message if dropped elsewhere.
pub struct SharedDesc(BdevDesc);

// SAFETY: SPDK descriptors are meant to be used from every thread for getting that thread's
// I/O channel and submitting I/O on it; the descriptor's event state is touched only on the
// opening thread (events are delivered there), and Drop closes it there.
unsafe impl Send for SharedDesc {}
// SAFETY: as above; no method mutates the descriptor.
unsafe impl Sync for SharedDesc {}

impl SharedDesc {
    pub fn new(desc: BdevDesc) -> Self {
        SharedDesc(desc)
    }

    pub fn desc(&self) -> &BdevDesc {
        &self.0
    }
}

/// Closes `raw` and frees its event state; runs on the opening thread.
///
/// # Safety
/// `raw` is an open descriptor and `events` its state; neither is used afterwards.
unsafe fn close(raw: *mut ffi::spdk_bdev_desc, events: *mut EventState) {
    // SAFETY: caller contract; after spdk_bdev_close SPDK delivers no more events.
    unsafe { ffi::spdk_bdev_close(raw) };
    // SAFETY: the state is alive until freed here or by the running trampoline.
    if unsafe { (*events).running.get() } {
        // SAFETY: as above; the trampoline frees it when the handler returns.
        unsafe { (*events).orphaned.set(true) };
    } else {
        // SAFETY: no handler runs and none will: the state is ours alone.
        drop(unsafe { Box::from_raw(events) });
    }
}

/// Raw pointers carried to the opening thread by message.
struct ClosingDesc {
    raw: *mut ffi::spdk_bdev_desc,
    events: *mut EventState,
}

// SAFETY: the pointers are only used on the opening thread, by the message that owns them.
unsafe impl Send for ClosingDesc {}

impl Drop for BdevDesc {
    fn drop(&mut self) {
        let (raw, events) = (self.raw.as_ptr(), self.events.as_ptr());
        if self.opener.is_current() {
            // SAFETY: on the opening thread; the descriptor is not used again.
            unsafe { close(raw, events) };
            return;
        }
        let closing = ClosingDesc { raw, events };
        let sent = self.opener.send_msg(move || {
            let closing = closing;
            // SAFETY: running on the opening thread; the descriptor is not used again.
            unsafe { close(closing.raw, closing.events) };
        });
        if let Err(error) = sent {
            // Leaking the descriptor keeps the bdev open: visible, and safer than closing it on
            // the wrong thread.
            spdk_error!("chronicle: cannot close a bdev descriptor on its thread ({error}); leaking it");
        }
    }
}

/// A per-thread I/O channel; put back (`spdk_put_io_channel`) when dropped, on its thread.
pub struct IoChannel {
    raw: NonNull<ffi::spdk_io_channel>,
    _not_send: NotSend,
}

impl IoChannel {
    pub(crate) fn as_ptr(&self) -> *mut ffi::spdk_io_channel {
        self.raw.as_ptr()
    }
}

impl Drop for IoChannel {
    fn drop(&mut self) {
        // SAFETY: the channel was got on this thread (IoChannel is !Send) and is put once.
        unsafe { ffi::spdk_put_io_channel(self.raw.as_ptr()) }
    }
}

/// What the module keeps in each bdev I/O's `driver_ctx` (sized by `get_ctx_size`).
#[repr(C)]
struct DriverCtx<C: 'static> {
    /// Entry for `spdk_bdev_queue_io_wait`: must live in the I/O while it waits.
    wait: ffi::spdk_bdev_io_wait_entry,
    retry: Option<fn(BdevIo<C>)>,
    /// The submitting thread, once detached.
    home: Option<ThreadHandle>,
    /// What runs when the detached I/O arrives on another thread ([`DetachedIo::send`]).
    arrive: Option<fn(DetachedIo<C>)>,
    user: Option<C>,
}

/// Bytes of `driver_ctx` a module whose per-I/O state is `C` needs (its `get_ctx_size`).
pub const fn driver_ctx_size<C: 'static>() -> usize {
    // `driver_ctx` follows u64 fields of spdk_bdev_io: 8-byte alignment is what it guarantees.
    assert!(align_of::<DriverCtx<C>>() <= 8, "per-I/O state must not need more than 8-byte alignment");
    size_of::<DriverCtx<C>>()
}

/// An I/O submitted to one of the module's bdevs, with per-I/O state `C` in its driver context.
///
/// Completed by value ([`complete`](Self::complete)), so it cannot complete twice; dropped
/// without completing, it completes as failed (and logs), so it cannot hang either. `!Send`:
/// it completes on the thread it was submitted on.
pub struct BdevIo<C: 'static> {
    raw: NonNull<ffi::spdk_bdev_io>,
    _ctx: PhantomData<C>,
    _not_send: NotSend,
}

impl<C: 'static> BdevIo<C> {
    /// Takes a freshly submitted I/O (from `submit_request`) and initialises its driver context.
    ///
    /// # Safety
    /// `raw` is an I/O just submitted to a bdev of the module whose `get_ctx_size` is
    /// `driver_ctx_size::<C>()`, not wrapped by any other BdevIo.
    pub(crate) unsafe fn begin(raw: NonNull<ffi::spdk_bdev_io>) -> Self {
        let io = BdevIo { raw, _ctx: PhantomData, _not_send: NotSend::default() };
        debug_assert_eq!(io.ctx_ptr() as usize % align_of::<DriverCtx<C>>(), 0);
        // SAFETY: driver_ctx has room for DriverCtx<C> (caller contract) and holds garbage from a
        // previous use: written without dropping.
        unsafe {
            io.ctx_ptr().write(DriverCtx {
                wait: ffi::spdk_bdev_io_wait_entry::default(),
                retry: None,
                home: None,
                arrive: None,
                user: None,
            })
        };
        io
    }

    /// Takes back an I/O that [`begin`](Self::begin) initialised and that was forgotten while
    /// SPDK held it (waiting for a buffer).
    ///
    /// # Safety
    /// `raw` went through `begin` for this `C`, and no other BdevIo wraps it.
    pub(crate) unsafe fn resume(raw: NonNull<ffi::spdk_bdev_io>) -> Self {
        BdevIo { raw, _ctx: PhantomData, _not_send: NotSend::default() }
    }

    fn ctx_ptr(&self) -> *mut DriverCtx<C> {
        // SAFETY: `driver_ctx` is the flexible array at the end of a live spdk_bdev_io.
        unsafe { std::ptr::addr_of_mut!((*self.raw.as_ptr()).driver_ctx).cast::<DriverCtx<C>>() }
    }

    fn block_params(&self) -> &ffi::spdk_bdev_io_block_params {
        // SAFETY: `u.bdev` is the member of the union SPDK fills for block I/O (read, write,
        // unmap, flush, write zeroes); for other types the fields are zero or unused.
        unsafe { &*std::ptr::addr_of!((*self.raw.as_ptr()).u.bdev).cast::<ffi::spdk_bdev_io_block_params>() }
    }

    pub fn io_type(&self) -> IoType {
        // SAFETY: reads the type of a live I/O.
        IoType::from_raw(u32::from(unsafe { (*self.raw.as_ptr()).type_ }))
    }

    /// The bdev the I/O was submitted to.
    pub fn bdev(&self) -> Bdev<'_> {
        // SAFETY: a submitted I/O points at its registered bdev, which outlives the I/O.
        unsafe { Bdev::from_raw(NonNull::new((*self.raw.as_ptr()).bdev).expect("I/O without bdev")) }
    }

    pub fn offset_blocks(&self) -> u64 {
        self.block_params().offset_blocks
    }

    pub fn num_blocks(&self) -> u64 {
        self.block_params().num_blocks
    }

    /// The data buffers (empty for I/O types without data, or a read not given a buffer yet).
    pub fn iovs(&self) -> &[libc::iovec] {
        let params = self.block_params();
        if params.iovs.is_null() || params.iovcnt <= 0 {
            return &[];
        }
        // SAFETY: SPDK sets `iovcnt` iovecs at `iovs` for the life of the I/O.
        unsafe { std::slice::from_raw_parts(params.iovs, params.iovcnt as usize) }
    }

    /// The I/O's data buffers as device-layer buffers over the same memory (zero copy): what
    /// the engine reads from (writes) or fills (reads) and passes on to the base bdevs.
    ///
    /// # Safety
    /// Every returned buffer (and clone of the list) must be dropped before the I/O completes:
    /// the memory belongs to whoever submitted the I/O once it has completed.
    pub unsafe fn host_buffers(&self) -> IoBuffers {
        let buffer = |iov: &libc::iovec| {
            // SAFETY: SPDK gives non-null buffers to submit_request (reads without one got
            // one through spdk_bdev_io_get_buf first); valid until completion (contract).
            let ptr = NonNull::new(iov.iov_base.cast::<u8>()).expect("a data buffer");
            // SAFETY: `iov_len` bytes at `ptr` are the submitter's, lent to this I/O until it
            // completes; the `'static` stands for "until then", which this function's contract
            // makes the caller keep (every buffer dropped first). The engine reads or fills
            // them from the volume's thread while the I/O waits: plain memory, no thread tie.
            let bytes = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), iov.iov_len) };
            crate::device::DmaBuf::lent(bytes)
        };
        let iovs = self.iovs();
        if let [iov] = iovs {
            if iov.iov_len > 0 {
                return IoBuffers::single(buffer(iov)); // the usual case: one iovec
            }
        }
        let mut buffers = IoBuffers::new();
        // No list collected first: one iovec stays inline in the IoBuffers.
        for iov in iovs.iter().filter(|iov| iov.iov_len > 0) {
            buffers.push(buffer(iov));
        }
        buffers
    }

    /// Hands the I/O to another thread (for the volume's owner thread); only the submitting
    /// thread can take it back ([`DetachedIo::attach`]) and complete it.
    pub fn detach(self) -> DetachedIo<C> {
        let thread = Thread::current().expect("bdev I/O is submitted on an SPDK thread").handle();
        // SAFETY: the context was initialised in `begin`; the I/O is ours.
        unsafe { (*self.ctx_ptr()).home = Some(thread) };
        let raw = self.raw;
        std::mem::forget(self);
        DetachedIo { raw, thread, _ctx: PhantomData }
    }

    /// Passes a read on to the same blocks of another bdev (`base` through this thread's
    /// `channel`) with the I/O's own buffers, and completes it with the base read's outcome —
    /// what passthru does, with no allocation: the I/O itself is the callback's argument.
    /// Gives the I/O back if the base refuses it (`ENOMEM`: complete it as
    /// [`IoStatus::NoMem`] and the bdev layer retries it).
    pub fn forward_read(self, base: &BdevDesc, channel: &IoChannel) -> Result<(), (Errno, Self)> {
        unsafe extern "C" fn read_done<C: 'static>(child: *mut ffi::spdk_bdev_io, success: bool, arg: *mut c_void) {
            // SAFETY: the child I/O is ours to free, once.
            unsafe { ffi::spdk_bdev_free_io(child) };
            let io = BdevIo::<C> {
                // SAFETY: `arg` is the forwarded I/O (forgotten below), given back once, here,
                // on its thread (SPDK completes the child on the submitting thread).
                raw: unsafe { NonNull::new_unchecked(arg.cast()) },
                _ctx: PhantomData,
                _not_send: NotSend::default(),
            };
            io.complete(if success { IoStatus::Success } else { IoStatus::Failed });
        }
        debug_assert_eq!(self.io_type(), IoType::Read);
        let params = self.block_params();
        let (iovs, iovcnt, offset, blocks) = (params.iovs, params.iovcnt, params.offset_blocks, params.num_blocks);
        let arg = self.raw.as_ptr().cast::<c_void>();
        // SAFETY: open descriptor, this thread's channel; the iovecs are this I/O's, valid
        // until it completes, which only `read_done` does.
        let rc = unsafe {
            ffi::spdk_bdev_readv_blocks(
                base.raw.as_ptr(),
                channel.as_ptr(),
                iovs,
                iovcnt,
                offset,
                blocks,
                Some(read_done::<C>),
                arg,
            )
        };
        match Errno::check(rc) {
            Ok(()) => {
                std::mem::forget(self);
                Ok(())
            }
            Err(errno) => Err((errno, self)),
        }
    }

    /// The module's per-I/O state.
    pub fn ctx(&self) -> Option<&C> {
        // SAFETY: initialised in `begin`; shared borrow tied to &self.
        unsafe { (*self.ctx_ptr()).user.as_ref() }
    }

    pub fn ctx_mut(&mut self) -> &mut Option<C> {
        // SAFETY: initialised in `begin`; exclusive borrow tied to &mut self.
        unsafe { &mut (*self.ctx_ptr()).user }
    }

    /// Completes the I/O: drops the per-I/O state, then `spdk_bdev_io_complete`.
    pub fn complete(self, status: IoStatus) {
        let raw = self.raw.as_ptr();
        let ctx = self.ctx_ptr();
        std::mem::forget(self);
        // SAFETY: the context was initialised in `begin` and is dropped once, before SPDK may
        // reuse the I/O; the I/O is completed once (self was consumed).
        unsafe {
            std::ptr::drop_in_place(ctx);
            ffi::spdk_bdev_io_complete(raw, status.raw());
        }
    }

    /// After a base bdev refused a child I/O with `ENOMEM`: calls `retry` with this I/O once the
    /// base (`base` through `channel`) has resources again (`spdk_bdev_queue_io_wait`). Gives
    /// the I/O back if it cannot be queued.
    pub fn queue_io_wait(
        self,
        base: &BdevDesc,
        channel: &IoChannel,
        retry: fn(BdevIo<C>),
    ) -> Result<(), (Errno, Self)> {
        unsafe extern "C" fn resume<C: 'static>(arg: *mut c_void) {
            let io = BdevIo::<C> {
                // SAFETY: `arg` is the (non-null) I/O queued below; SPDK calls this once, on its
                // thread, and the context was initialised before queueing.
                raw: unsafe { NonNull::new_unchecked(arg.cast()) },
                _ctx: PhantomData,
                _not_send: NotSend::default(),
            };
            // SAFETY: as above; `retry` was stored before queueing.
            let retry = unsafe { (*io.ctx_ptr()).retry.take() };
            match retry {
                Some(retry) => retry(io),
                None => io.complete(IoStatus::Failed),
            }
        }
        let bdev = base.bdev().as_ptr();
        let ctx = self.ctx_ptr();
        // SAFETY: the context is initialised and lives inside the I/O, which stays allocated
        // until completed; the entry is only read by SPDK while the I/O waits.
        let rc = unsafe {
            (*ctx).retry = Some(retry);
            (*ctx).wait.bdev = bdev;
            (*ctx).wait.cb_fn = Some(resume::<C>);
            (*ctx).wait.cb_arg = self.raw.as_ptr().cast();
            ffi::spdk_bdev_queue_io_wait(bdev, channel.as_ptr(), std::ptr::addr_of_mut!((*ctx).wait))
        };
        match Errno::check(rc) {
            Ok(()) => {
                std::mem::forget(self);
                Ok(())
            }
            Err(error) => Err((error, self)),
        }
    }
}

/// A [`BdevIo`] on its way to or from another SPDK thread. `Send`, but it can only become a
/// `BdevIo` again (and be completed) on the thread that submitted it, as SPDK requires.
pub struct DetachedIo<C: 'static> {
    raw: NonNull<ffi::spdk_bdev_io>,
    thread: ThreadHandle,
    _ctx: PhantomData<C>,
}

// SAFETY: the pointer is not dereferenced while detached; `attach` gives it back only on the
// submitting thread. The per-I/O state `C` is not touched in between.
unsafe impl<C: 'static> Send for DetachedIo<C> {}

impl<C: 'static> DetachedIo<C> {
    /// The thread that submitted the I/O: send the completion there.
    pub fn thread(&self) -> ThreadHandle {
        self.thread
    }

    fn ctx_ptr(&self) -> *mut DriverCtx<C> {
        // SAFETY: `driver_ctx` is the flexible array at the end of a live spdk_bdev_io.
        unsafe { std::ptr::addr_of_mut!((*self.raw.as_ptr()).driver_ctx).cast::<DriverCtx<C>>() }
    }

    /// The per-I/O state, moved out (e.g. the request the I/O carried to another thread).
    pub fn take_ctx(&mut self) -> Option<C>
    where
        C: Send,
    {
        // SAFETY: the context was initialised in `begin`; a detached I/O is owned by this
        // value alone, and the message that carried it across threads ordered the accesses.
        unsafe { (*self.ctx_ptr()).user.take() }
    }

    /// Stores per-I/O state (e.g. the request to carry, or the status for the trip home).
    pub fn set_ctx(&mut self, value: C)
    where
        C: Send,
    {
        // SAFETY: as in `take_ctx`.
        unsafe { (*self.ctx_ptr()).user = Some(value) }
    }

    /// Runs `arrive` with this I/O on thread `to`, later, without allocating anything: the
    /// I/O itself is SPDK's message argument and its per-I/O state carries the payload.
    /// Given back if SPDK's message pool is empty.
    pub fn send(self, to: ThreadHandle, arrive: fn(DetachedIo<C>)) -> Result<(), (Errno, Self)> {
        unsafe extern "C" fn run<C: 'static>(arg: *mut c_void) {
            let raw = NonNull::new(arg.cast::<ffi::spdk_bdev_io>()).expect("a bdev I/O");
            // SAFETY: `arg` is the I/O `send` forgot; its context holds the home thread and the
            // arrival, both set before sending; it is taken back exactly once, here.
            let (thread, arrive) = unsafe {
                let ctx = std::ptr::addr_of_mut!((*raw.as_ptr()).driver_ctx).cast::<DriverCtx<C>>();
                ((*ctx).home.expect("detached I/Os know their thread"), (*ctx).arrive.take().expect("an arrival"))
            };
            arrive(DetachedIo { raw, thread, _ctx: PhantomData });
        }
        // SAFETY: the context is initialised and owned by this detached I/O.
        unsafe { (*self.ctx_ptr()).arrive = Some(arrive) };
        // SAFETY: `to` is a live thread; `run::<C>` matches the argument; SPDK calls it once.
        let rc = unsafe { ffi::spdk_thread_send_msg(to.as_ptr(), Some(run::<C>), self.raw.as_ptr().cast()) };
        if rc != 0 {
            return Err((Errno(rc.abs()), self));
        }
        std::mem::forget(self);
        Ok(())
    }

    /// The I/O again, on its submitting thread; given back unchanged on any other thread.
    pub fn attach(self) -> Result<BdevIo<C>, Self> {
        if !self.thread.is_current() {
            return Err(self);
        }
        let raw = self.raw;
        std::mem::forget(self);
        Ok(BdevIo { raw, _ctx: PhantomData, _not_send: NotSend::default() })
    }
}

impl<C: 'static> Drop for DetachedIo<C> {
    fn drop(&mut self) {
        // Never complete on a foreign thread: send it home to fail there (BdevIo's Drop).
        fn fail_at_home<C: 'static>(io: DetachedIo<C>) {
            if let Ok(io) = io.attach() {
                drop(io);
            }
        }
        let detached = DetachedIo { raw: self.raw, thread: self.thread, _ctx: PhantomData::<C> };
        if let Err((errno, detached)) = detached.send(self.thread, fail_at_home::<C>) {
            // Dropping it would come back here: leak it (the I/O stays pending).
            std::mem::forget(detached);
            spdk_error!("chronicle: a detached bdev I/O could not be sent home ({errno}); it stays pending");
        }
    }
}

impl<C: 'static> Drop for BdevIo<C> {
    fn drop(&mut self) {
        spdk_error!("chronicle: a bdev I/O was dropped without completion; completing it as failed");
        let raw = self.raw.as_ptr();
        // SAFETY: as in `complete`; Drop runs only for an I/O not completed nor queued.
        unsafe {
            std::ptr::drop_in_place(self.ctx_ptr());
            ffi::spdk_bdev_io_complete(raw, IoStatus::Failed.raw());
        }
    }
}
