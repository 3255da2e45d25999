//! Bdevs of our own module (`struct spdk_bdev` + `spdk_bdev_fn_table`): registration, the
//! per-thread channels (`spdk_io_device_register`, the channel state a Rust value in SPDK's
//! channel buffer), the submit hook, and an asynchronous destruct.
//!
//! The lifecycle reads top to bottom, as in SPDK's passthru: [`register`] → SPDK asks for a
//! channel per thread ([`VirtualBdev::create_channel`]) → I/O arrives in
//! [`VirtualBdev::submit_request`] (reads without a buffer get one first) → [`unregister`]
//! (or a hot-remove) → SPDK calls [`VirtualBdev::destruct`] on the app thread → the module
//! finishes its [`DestructDone`] when its work is stopped → the io_device is unregistered once
//! every channel is gone → `spdk_bdev_destruct_done` → the bdev's memory is freed.

use std::ffi::{c_int, c_void, CString};
use std::mem::{align_of, size_of};
use std::ptr::NonNull;

use super::bdev::{BdevIo, IoStatus, IoType};
use super::bdev_module::{self, BdevModule};
use super::json::JsonWriter;
use super::{ffi, Errno, NotSend};

/// One bdev of the module `Module`. Shared by every thread that has a channel to it (hence
/// `Send + Sync`): thread-bound state lives in [`Channel`](Self::Channel) or on the owner
/// thread, reached by message.
pub trait VirtualBdev: Send + Sync + Sized + 'static {
    type Module: BdevModule;
    /// Per-thread channel state (SPDK `io_channel` context).
    type Channel: 'static;

    /// A channel for the calling thread (the first I/O of a thread to the bdev).
    fn create_channel(&self) -> Result<Self::Channel, Errno>;
    /// An I/O to the bdev, on `channel`'s thread. Reads always carry a data buffer.
    fn submit_request(&self, channel: &mut Self::Channel, io: BdevIo<<Self::Module as BdevModule>::IoCtx>);
    fn io_type_supported(&self, io_type: IoType) -> bool;
    /// The bdev is being removed (every descriptor is closed): stop, then finish `done`.
    /// Runs on the app thread.
    fn destruct(&self, done: DestructDone);
    /// `bdev_get_bdevs`' `driver_specific` part (an object to write named values into).
    fn dump_info_json(&self, writer: &mut JsonWriter<'_>) {
        let _ = writer;
    }
    /// One complete JSON-RPC call (`{"method": …, "params": …}`) that re-creates the bdev,
    /// for `save_config`.
    fn write_config_json(&self, writer: &mut JsonWriter<'_>) {
        let _ = writer;
    }
}

/// What SPDK is told about a new bdev.
#[derive(Debug, Clone)]
pub struct BdevProperties {
    pub name: String,
    pub product_name: String,
    pub block_size: u32,
    pub num_blocks: u64,
    /// Writes are made of units of this many blocks (SPDK `write_unit_size`).
    pub write_unit_blocks: u32,
    /// Let SPDK split writes at unit boundaries and refuse writes smaller than a unit.
    pub split_on_write_unit: bool,
    /// Alignment data buffers must have, in bytes (a power of two; 1 = none).
    pub buffer_alignment: usize,
    /// Completed writes need a flush to be durable.
    pub write_cache: bool,
    pub uuid: Option<[u8; 16]>,
}

/// The memory SPDK knows a bdev by: `ctxt` and the io_device point at it.
#[repr(C)]
struct Container<B> {
    bdev: ffi::spdk_bdev,
    fn_table: ffi::spdk_bdev_fn_table,
    name: CString,
    product_name: CString,
    data: B,
}

/// Registers a bdev with `data` behind it. On failure nothing stays registered and `data`
/// is given back.
pub fn register<B: VirtualBdev>(properties: &BdevProperties, data: B) -> Result<(), (Errno, B)> {
    const {
        assert!(align_of::<B::Channel>() <= 8, "channel state must not need more than 8-byte alignment");
    }
    let Some(module) = bdev_module::module::<B::Module>() else { return Err((Errno::EPERM, data)) };
    let (Ok(name), Ok(product_name)) =
        (CString::new(properties.name.as_str()), CString::new(properties.product_name.as_str()))
    else {
        return Err((Errno::EINVAL, data));
    };
    if !properties.buffer_alignment.is_power_of_two() || properties.write_unit_blocks == 0 {
        return Err((Errno::EINVAL, data));
    }
    let fn_table = ffi::spdk_bdev_fn_table {
        destruct: Some(destruct::<B>),
        submit_request: Some(submit_request::<B>),
        io_type_supported: Some(io_type_supported::<B>),
        get_io_channel: Some(get_io_channel),
        dump_info_json: Some(dump_info_json::<B>),
        write_config_json: Some(write_config_json::<B>),
        ..Default::default()
    };
    let container =
        Box::into_raw(Box::new(Container { bdev: ffi::spdk_bdev::default(), fn_table, name, product_name, data }));
    // SAFETY: `container` is a live allocation owned here until registration succeeds; the
    // strings and the fn_table live inside it, as long as SPDK uses the bdev.
    unsafe {
        let bdev = &mut (*container).bdev;
        bdev.name = (*container).name.as_ptr().cast_mut();
        bdev.product_name = (*container).product_name.as_ptr().cast_mut();
        bdev.blocklen = properties.block_size;
        bdev.blockcnt = properties.num_blocks;
        bdev.write_cache = i32::from(properties.write_cache);
        bdev.write_unit_size = properties.write_unit_blocks;
        bdev.__bindgen_anon_1.set_split_on_write_unit(u32::from(properties.split_on_write_unit));
        bdev.required_alignment = properties.buffer_alignment.trailing_zeros() as u8;
        if let Some(uuid) = properties.uuid {
            std::ptr::copy_nonoverlapping(uuid.as_ptr(), std::ptr::addr_of_mut!(bdev.uuid).cast::<u8>(), 16);
        }
        bdev.ctxt = container.cast();
        bdev.fn_table = std::ptr::addr_of!((*container).fn_table);
        bdev.module = module.as_ptr();
    }
    let io_device = container.cast::<c_void>();
    // SAFETY: the container is the io_device's unique address; the callbacks match
    // `Container<B>` and a channel context of `B::Channel`; the name is copied by SPDK.
    unsafe {
        ffi::spdk_io_device_register(
            io_device,
            Some(channel_create::<B>),
            Some(channel_destroy::<B>),
            size_of::<B::Channel>() as u32,
            (*container).name.as_ptr(),
        )
    };
    // SAFETY: a fully initialised bdev inside the container, which outlives its registration.
    let rc = unsafe { ffi::spdk_bdev_register(std::ptr::addr_of_mut!((*container).bdev)) };
    if let Err(errno) = Errno::check(rc) {
        // SAFETY: no channel exists (the bdev was never visible); the io_device is removed and
        // the container freed in its callback, after which `data` would be gone: take it first.
        let data = unsafe { std::ptr::read(std::ptr::addr_of!((*container).data)) };
        // SAFETY: as above; `forget_container` frees the allocation without dropping `data`.
        unsafe { ffi::spdk_io_device_unregister(io_device, Some(forget_container::<B>)) };
        return Err((errno, data));
    }
    Ok(())
}

/// Unregisters the bdev named `name` of module `M`; `done` runs once it is destructed (or
/// with the error when it cannot be unregistered).
pub fn unregister<M: BdevModule, F: FnOnce(Result<(), Errno>) + 'static>(name: &str, done: F) {
    unsafe extern "C" fn unregistered<F: FnOnce(Result<(), Errno>)>(arg: *mut c_void, rc: c_int) {
        // SAFETY: `arg` is the Box::into_raw below; SPDK calls this once.
        let done = unsafe { Box::from_raw(arg.cast::<F>()) };
        done(Errno::check(rc));
    }
    let Some(module) = bdev_module::module::<M>() else { return done(Err(Errno::EPERM)) };
    let Ok(name) = CString::new(name) else { return done(Err(Errno::EINVAL)) };
    let arg = Box::into_raw(Box::new(done)).cast::<c_void>();
    // SAFETY: on the app thread (RPC, hot-remove); `arg` matches `unregistered::<F>`, which
    // SPDK calls once if and only if this returns 0.
    let rc = unsafe { ffi::spdk_bdev_unregister_by_name(name.as_ptr(), module.as_ptr(), Some(unregistered::<F>), arg) };
    if let Err(errno) = Errno::check(rc) {
        // SAFETY: refused synchronously: the callback will not run, `arg` is ours again.
        let done = unsafe { Box::from_raw(arg.cast::<F>()) };
        done(Err(errno));
    }
}

/// The pending end of a `destruct`: finishing it (or dropping it) unregisters the bdev's
/// io_device and, once every channel is gone, tells SPDK the bdev is destructed and frees it.
pub struct DestructDone {
    container: NonNull<c_void>,
    free: unsafe fn(NonNull<c_void>),
    _not_send: NotSend,
}

impl DestructDone {
    pub fn finish(self) {
        drop(self)
    }
}

impl Drop for DestructDone {
    fn drop(&mut self) {
        // SAFETY: `free` is `finish_destruct::<B>` for the container's type; called once.
        unsafe { (self.free)(self.container) }
    }
}

/// # Safety
/// `container` is the `Container<B>` of a bdev SPDK has called `destruct` on.
unsafe fn finish_destruct<B: VirtualBdev>(container: NonNull<c_void>) {
    // SAFETY: the container is the io_device; `free_container::<B>` runs once every channel
    // is destroyed, on this (the app) thread.
    unsafe { ffi::spdk_io_device_unregister(container.as_ptr(), Some(free_container::<B>)) };
}

unsafe extern "C" fn free_container<B: VirtualBdev>(io_device: *mut c_void) {
    let container = io_device.cast::<Container<B>>();
    // SAFETY: the bdev was destructed (finish_destruct) and no channel is left: tell SPDK the
    // destruct is done (it only calls the unregister callback), then free the container, once.
    unsafe {
        ffi::spdk_bdev_destruct_done(std::ptr::addr_of_mut!((*container).bdev), 0);
        drop(Box::from_raw(container));
    }
}

unsafe extern "C" fn forget_container<B: VirtualBdev>(io_device: *mut c_void) {
    let container = io_device.cast::<Container<B>>();
    // SAFETY: `data` was moved out before (failed registration): free the rest only.
    unsafe {
        std::ptr::drop_in_place(std::ptr::addr_of_mut!((*container).name));
        std::ptr::drop_in_place(std::ptr::addr_of_mut!((*container).product_name));
        std::alloc::dealloc(container.cast(), std::alloc::Layout::new::<Container<B>>());
    }
}

/// # Safety
/// `ctx` is the `ctxt` of a registered bdev of type `B`.
unsafe fn container<'a, B: VirtualBdev>(ctx: *mut c_void) -> &'a Container<B> {
    // SAFETY: caller contract; the container outlives every callback SPDK makes for the bdev.
    unsafe { &*ctx.cast::<Container<B>>() }
}

unsafe extern "C" fn destruct<B: VirtualBdev>(ctx: *mut c_void) -> c_int {
    // SAFETY: SPDK passes our ctxt.
    let data = &unsafe { container::<B>(ctx) }.data;
    let done = DestructDone {
        // SAFETY: ctxt is never null for our bdevs.
        container: unsafe { NonNull::new_unchecked(ctx) },
        free: finish_destruct::<B>,
        _not_send: NotSend::default(),
    };
    data.destruct(done);
    // Asynchronous: SPDK waits for spdk_bdev_destruct_done.
    1
}

unsafe extern "C" fn submit_request<B: VirtualBdev>(ch: *mut ffi::spdk_io_channel, bdev_io: *mut ffi::spdk_bdev_io) {
    let Some(raw) = NonNull::new(bdev_io) else { return };
    // SAFETY: a fresh I/O submitted to a bdev of module B::Module, whose get_ctx_size is
    // driver_ctx_size::<IoCtx>() (bdev_module::register).
    let io = unsafe { BdevIo::<<B::Module as BdevModule>::IoCtx>::begin(raw) };
    let needs_buffer = io.io_type() == IoType::Read && io.iovs().first().is_none_or(|iov| iov.iov_base.is_null());
    if needs_buffer {
        let len = io.num_blocks() * u64::from(io.bdev().block_size());
        std::mem::forget(io);
        // SAFETY: a read of ours without a buffer: SPDK allocates one and calls get_buf_done
        // on this thread (possibly at once).
        unsafe { ffi::spdk_bdev_io_get_buf(bdev_io, Some(get_buf_done::<B>), len) };
        return;
    }
    // SAFETY: `ch` is a channel of our io_device (SPDK got it through get_io_channel).
    unsafe { dispatch::<B>(ch, io) }
}

unsafe extern "C" fn get_buf_done<B: VirtualBdev>(
    ch: *mut ffi::spdk_io_channel,
    bdev_io: *mut ffi::spdk_bdev_io,
    success: bool,
) {
    let Some(raw) = NonNull::new(bdev_io) else { return };
    // SAFETY: the I/O `submit_request` began and forgot while it waited for its buffer.
    let io = unsafe { BdevIo::<<B::Module as BdevModule>::IoCtx>::resume(raw) };
    if !success {
        return io.complete(IoStatus::NoMem);
    }
    // SAFETY: as in submit_request.
    unsafe { dispatch::<B>(ch, io) }
}

/// # Safety
/// `ch` is a live channel of a `Container<B>` io_device, on the calling thread.
unsafe fn dispatch<B: VirtualBdev>(ch: *mut ffi::spdk_io_channel, io: BdevIo<<B::Module as BdevModule>::IoCtx>) {
    // SAFETY: the io_device of our channels is the container; the channel context holds the
    // B::Channel written by channel_create, used only on this thread (no other borrow lives:
    // SPDK does not re-enter submit_request for the same channel during this call).
    unsafe {
        let container = &*ffi::spdk_io_channel_get_io_device(ch).cast::<Container<B>>();
        let channel = &mut *ffi::spdk_io_channel_get_ctx(ch).cast::<B::Channel>();
        container.data.submit_request(channel, io);
    }
}

unsafe extern "C" fn io_type_supported<B: VirtualBdev>(ctx: *mut c_void, io_type: ffi::spdk_bdev_io_type) -> bool {
    // SAFETY: SPDK passes our ctxt.
    unsafe { container::<B>(ctx) }.data.io_type_supported(IoType::from_raw(io_type))
}

unsafe extern "C" fn get_io_channel(ctx: *mut c_void) -> *mut ffi::spdk_io_channel {
    // SAFETY: our ctxt is the registered io_device.
    unsafe { ffi::spdk_get_io_channel(ctx) }
}

unsafe extern "C" fn dump_info_json<B: VirtualBdev>(ctx: *mut c_void, w: *mut ffi::spdk_json_write_ctx) -> c_int {
    // SAFETY: SPDK passes our ctxt and a write context for this call.
    unsafe { container::<B>(ctx).data.dump_info_json(&mut JsonWriter::from_raw(w)) };
    0
}

unsafe extern "C" fn write_config_json<B: VirtualBdev>(bdev: *mut ffi::spdk_bdev, w: *mut ffi::spdk_json_write_ctx) {
    // SAFETY: one of our bdevs: its ctxt is our container; the writer is live for this call.
    unsafe { container::<B>((*bdev).ctxt).data.write_config_json(&mut JsonWriter::from_raw(w)) };
}

unsafe extern "C" fn channel_create<B: VirtualBdev>(io_device: *mut c_void, ctx_buf: *mut c_void) -> c_int {
    // SAFETY: the io_device is our container.
    let data = &unsafe { container::<B>(io_device) }.data;
    match data.create_channel() {
        Ok(channel) => {
            // SAFETY: SPDK's context buffer has size_of::<B::Channel>() bytes, suitably aligned
            // (checked at compile time in `register`), uninitialised: written, not assigned.
            unsafe { ctx_buf.cast::<B::Channel>().write(channel) };
            0
        }
        Err(errno) => -errno.0,
    }
}

unsafe extern "C" fn channel_destroy<B: VirtualBdev>(_io_device: *mut c_void, ctx_buf: *mut c_void) {
    // SAFETY: written by channel_create; SPDK destroys each channel once, on its thread.
    unsafe { std::ptr::drop_in_place(ctx_buf.cast::<B::Channel>()) };
}
