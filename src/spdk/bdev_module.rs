//! Bdev modules (`struct spdk_bdev_module`): a module is a type implementing [`BdevModule`];
//! [`register`] fills its [`ModuleSlot`] with monomorphised `extern "C"` trampolines and adds it
//! to SPDK's module list (`spdk_bdev_module_list_add`, what `SPDK_BDEV_MODULE_REGISTER` does).
//! Registration must happen before the bdev subsystem initialises: from an ELF constructor.

use std::cell::UnsafeCell;
use std::ffi::{c_int, CStr};
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use super::bdev::{driver_ctx_size, Bdev};
use super::rpc::on_registration_thread;
use super::{ffi, Errno, NotSend};

/// A bdev module. All hooks run on the app thread.
pub trait BdevModule: 'static {
    /// Module name, as `bdev_get_bdevs` and claims report it.
    const NAME: &'static CStr;
    /// Whether SPDK calls [`examine_disk`](Self::examine_disk) for every new bdev.
    const EXAMINE_DISK: bool = false;
    /// Per-I/O state kept in the driver context of the module's bdev I/Os.
    type IoCtx: 'static;

    /// The static storage SPDK links into its module list.
    fn slot() -> &'static ModuleSlot;
    /// Bdev subsystem start (synchronous). An error stops the application's startup.
    fn init() -> Result<(), Errno>;
    /// Bdev subsystem stop, after every bdev is unregistered.
    fn fini() {}
    /// A new bdev appeared: look at it (I/O allowed), then drop `done` — now or later.
    fn examine_disk(bdev: Bdev<'_>, done: ExamineDone) {
        let _ = bdev;
        done.finish();
    }
}

/// Static storage of one `spdk_bdev_module`: SPDK keeps a pointer to it and writes its
/// `internal` fields, so it must be a never-moved `static`.
pub struct ModuleSlot {
    raw: UnsafeCell<MaybeUninit<ffi::spdk_bdev_module>>,
    registered: AtomicBool,
}

// SAFETY: the slot is written once, in `register`, before it is published to SPDK; afterwards
// only SPDK touches it (under its own locks) and Rust only takes its address.
unsafe impl Sync for ModuleSlot {}

impl ModuleSlot {
    #[allow(clippy::new_without_default)] // only meaningful as a `static`
    pub const fn new() -> Self {
        ModuleSlot { raw: UnsafeCell::new(MaybeUninit::uninit()), registered: AtomicBool::new(false) }
    }

    fn module_ref(&'static self) -> ModuleRef {
        // SAFETY: UnsafeCell::get never returns null.
        ModuleRef(unsafe { NonNull::new_unchecked(self.raw.get().cast()) })
    }
}

/// The address of a registered module, for claims and `examine_done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleRef(NonNull<ffi::spdk_bdev_module>);

// SAFETY: the address of a 'static module; passing it around touches nothing.
unsafe impl Send for ModuleRef {}
// SAFETY: as above.
unsafe impl Sync for ModuleRef {}

impl ModuleRef {
    pub(crate) fn as_ptr(self) -> *mut ffi::spdk_bdev_module {
        self.0.as_ptr()
    }
}

/// The module `M`, once registered.
pub fn module<M: BdevModule>() -> Option<ModuleRef> {
    let slot = M::slot();
    slot.registered.load(Ordering::Acquire).then(|| slot.module_ref())
}

/// Adds `M` to SPDK's module list, once (later calls return the same module). Only before the
/// bdev subsystem starts is this useful, and only from a constructor or the app thread is it
/// safe: `EPERM` elsewhere.
pub fn register<M: BdevModule>() -> Result<ModuleRef, Errno> {
    if !on_registration_thread() {
        return Err(Errno::EPERM);
    }
    let slot = M::slot();
    if slot.registered.swap(true, Ordering::AcqRel) {
        return Ok(slot.module_ref());
    }
    let module = ffi::spdk_bdev_module {
        name: M::NAME.as_ptr(),
        module_init: Some(module_init::<M>),
        module_fini: Some(module_fini::<M>),
        get_ctx_size: Some(get_ctx_size::<M>),
        examine_disk: if M::EXAMINE_DISK { Some(examine_disk::<M>) } else { None },
        ..Default::default()
    };
    let raw = slot.raw.get();
    // SAFETY: first and only write to the slot (guarded by `registered`), before SPDK knows it.
    unsafe { (*raw).write(module) };
    // SAFETY: the slot is a 'static, initialised module; SPDK links it into its list and
    // initialises its `internal` fields.
    unsafe { ffi::spdk_bdev_module_list_add((*raw).as_mut_ptr()) };
    Ok(slot.module_ref())
}

unsafe extern "C" fn module_init<M: BdevModule>() -> c_int {
    match M::init() {
        Ok(()) => 0,
        Err(errno) => -errno.0,
    }
}

unsafe extern "C" fn module_fini<M: BdevModule>() {
    M::fini()
}

unsafe extern "C" fn get_ctx_size<M: BdevModule>() -> c_int {
    // Evaluated at compile time, so the alignment check in driver_ctx_size fails the build.
    let size = const { driver_ctx_size::<M::IoCtx>() };
    c_int::try_from(size).expect("per-I/O state larger than 2 GiB")
}

unsafe extern "C" fn examine_disk<M: BdevModule>(bdev: *mut ffi::spdk_bdev) {
    let done = ExamineDone { module: M::slot().module_ref(), _not_send: NotSend::default() };
    match NonNull::new(bdev) {
        // SAFETY: SPDK passes a registered bdev that stays registered during examine.
        Some(bdev) => M::examine_disk(unsafe { Bdev::from_raw(bdev) }, done),
        None => done.finish(),
    }
}

/// The pending answer to one `examine_disk` call: SPDK waits for it (`bdev_wait_for_examine`,
/// startup). Finishing or dropping it calls `spdk_bdev_module_examine_done` exactly once, on the
/// app thread (`!Send`).
pub struct ExamineDone {
    module: ModuleRef,
    _not_send: NotSend,
}

impl ExamineDone {
    pub fn finish(self) {
        drop(self)
    }
}

impl Drop for ExamineDone {
    fn drop(&mut self) {
        // SAFETY: one examine_done per examine_disk call (this value is not Clone); the module
        // is registered.
        unsafe { ffi::spdk_bdev_module_examine_done(self.module.as_ptr()) }
    }
}
