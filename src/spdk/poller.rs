//! Pollers (`spdk_poller`): a closure SPDK calls on its thread, every time the thread polls or
//! every `period`. Background work (sort, recovery, shipping) runs in pollers.

use std::cell::Cell;
use std::ffi::{c_void, CString};
use std::ptr::NonNull;
use std::time::Duration;

use super::{ffi, Errno, NotSend};

/// What one call of a poller did; SPDK's scheduler uses it to measure load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    /// No work was done.
    Idle,
    /// Some work was done.
    Busy,
}

struct State {
    poll: Box<dyn FnMut() -> PollStatus>,
    /// The closure is running (SPDK is inside `trampoline`).
    running: Cell<bool>,
    /// The Poller was dropped while the closure was running: free the state when it returns.
    orphaned: Cell<bool>,
}

/// A registered poller; unregistered when dropped (on its thread: `Poller` is `!Send`).
///
/// The closure may drop its own `Poller` (e.g. through an `Rc<RefCell<Option<Poller>>>`): the
/// closure's state is then freed after it returns, not while it runs.
pub struct Poller {
    raw: NonNull<ffi::spdk_poller>,
    state: NonNull<State>,
    _not_send: NotSend,
}

unsafe extern "C" fn trampoline(arg: *mut c_void) -> i32 {
    let state = arg.cast::<State>();
    // SAFETY: `arg` is the State leaked in `register`; it stays allocated until both the Poller
    // is dropped and no call is running. Fields are reached through the raw pointer so that the
    // `&mut` to `poll` does not overlap the Cells `Drop` may touch while the closure runs.
    let status = unsafe {
        (*state).running.set(true);
        let status = ((*state).poll)();
        (*state).running.set(false);
        status
    };
    // SAFETY: as above; if the Poller was dropped during the call, nobody else owns the state.
    if unsafe { (*state).orphaned.get() } {
        // SAFETY: the state came from Box::into_raw, and SPDK will not call us again
        // (spdk_poller_unregister already ran in Drop).
        drop(unsafe { Box::from_raw(state) });
    }
    match status {
        PollStatus::Idle => ffi::SPDK_POLLER_IDLE as i32,
        PollStatus::Busy => ffi::SPDK_POLLER_BUSY as i32,
    }
}

impl Poller {
    /// Registers `poll` on the calling SPDK thread, called every `period` (zero: every time the
    /// thread polls). Fails with `EPERM` outside an SPDK thread, `ENOMEM` if SPDK cannot
    /// allocate the poller.
    pub fn register<F>(name: &str, period: Duration, poll: F) -> Result<Poller, Errno>
    where
        F: FnMut() -> PollStatus + 'static,
    {
        // SAFETY: spdk_get_thread only reads a thread-local pointer.
        if unsafe { ffi::spdk_get_thread() }.is_null() {
            return Err(Errno::EPERM);
        }
        let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
        let period_us = u64::try_from(period.as_micros()).map_err(|_| Errno::EINVAL)?;
        let state = Box::into_raw(Box::new(State {
            poll: Box::new(poll),
            running: Cell::new(false),
            orphaned: Cell::new(false),
        }));
        // SAFETY: `trampoline` matches `state`'s type; the name is copied by SPDK.
        let raw = unsafe { ffi::spdk_poller_register_named(Some(trampoline), state.cast(), period_us, name.as_ptr()) };
        match NonNull::new(raw) {
            Some(raw) => Ok(Poller {
                raw,
                // SAFETY: Box::into_raw never returns null.
                state: unsafe { NonNull::new_unchecked(state) },
                _not_send: NotSend::default(),
            }),
            None => {
                // SAFETY: registration failed, SPDK holds no reference to `state`.
                drop(unsafe { Box::from_raw(state) });
                Err(Errno::ENOMEM)
            }
        }
    }

    /// Stops calling the closure until [`resume`](Self::resume).
    pub fn pause(&self) {
        // SAFETY: `raw` is registered on this thread (Poller is !Send) and not unregistered yet.
        unsafe { ffi::spdk_poller_pause(self.raw.as_ptr()) }
    }

    pub fn resume(&self) {
        // SAFETY: as in `pause`.
        unsafe { ffi::spdk_poller_resume(self.raw.as_ptr()) }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        let mut raw = self.raw.as_ptr();
        // SAFETY: unregistering on the registering thread (Poller is !Send); SPDK stops calling
        // the trampoline, also when this runs from inside the closure.
        unsafe { ffi::spdk_poller_unregister(&mut raw) };
        let state = self.state.as_ptr();
        // SAFETY: the state is alive: it is freed either here or by the trampoline after the
        // running call notices `orphaned`.
        if unsafe { (*state).running.get() } {
            // SAFETY: as above; the trampoline frees it when the closure returns.
            unsafe { (*state).orphaned.set(true) };
        } else {
            // SAFETY: no call is running and none will start: the state is ours alone.
            drop(unsafe { Box::from_raw(state) });
        }
    }
}
