//! SPDK threads (`spdk_thread`): the calling thread, and messages to another thread.
//!
//! [`Thread`] is the handle of an SPDK thread as seen from code running on an SPDK thread; it is
//! `!Send`. [`ThreadHandle`] is the one `Send` handle: all it can do is post a closure to its
//! thread (`spdk_thread_send_msg` is safe to call from any thread) and compare itself with the
//! current thread.

use std::ffi::{c_void, CStr};
use std::ptr::NonNull;
use std::sync::Arc;

use super::{ffi, Errno, NotSend};

/// An SPDK thread, from code running on an SPDK thread.
pub struct Thread {
    raw: NonNull<ffi::spdk_thread>,
    _not_send: NotSend,
}

impl Thread {
    /// The SPDK thread the caller runs on; `None` outside SPDK threads.
    pub fn current() -> Option<Thread> {
        // SAFETY: spdk_get_thread only reads a thread-local pointer.
        let raw = unsafe { ffi::spdk_get_thread() };
        NonNull::new(raw).map(|raw| Thread { raw, _not_send: NotSend::default() })
    }

    /// The application thread (where RPCs, module init and examine run); `None` before the
    /// thread library is initialised.
    pub fn app() -> Option<Thread> {
        // SAFETY: spdk_thread_get_app_thread only reads a global set at thread library init.
        let raw = unsafe { ffi::spdk_thread_get_app_thread() };
        NonNull::new(raw).map(|raw| Thread { raw, _not_send: NotSend::default() })
    }

    /// The thread's name (as given to `spdk_thread_create`).
    pub fn name(&self) -> String {
        // SAFETY: `raw` is a live thread (see ThreadHandle's lifetime rule); the name is a
        // NUL-terminated string owned by the thread, copied before returning.
        let name = unsafe { CStr::from_ptr(ffi::spdk_thread_get_name(self.raw.as_ptr())) };
        name.to_string_lossy().into_owned()
    }

    /// SPDK's numeric id of the thread.
    pub fn id(&self) -> u64 {
        // SAFETY: `raw` is a live thread.
        unsafe { ffi::spdk_thread_get_id(self.raw.as_ptr()) }
    }

    /// Whether the caller runs on this thread.
    pub fn is_current(&self) -> bool {
        self.handle().is_current()
    }

    /// A `Send` handle to post messages to this thread.
    pub fn handle(&self) -> ThreadHandle {
        ThreadHandle { raw: self.raw }
    }
}

/// Something to run on another SPDK thread ([`ThreadHandle::send`]).
pub trait Message: Send + 'static {
    fn run(self);
}

/// What runs when a doorbell rings on a thread ([`ThreadHandle::ring`]): `rang` gets the
/// shared object the ring carried (e.g. a queue to drain).
pub trait Doorbell: 'static {
    type Target: Send + Sync + 'static;
    fn rang(target: Arc<Self::Target>);
}

/// A closure as a [`Message`].
struct Closure<F>(F);

impl<F: FnOnce() + Send + 'static> Message for Closure<F> {
    fn run(self) {
        (self.0)()
    }
}

/// A thread to send messages to, from any thread.
///
/// Lifetime rule (as in C): the target must outlive the handle's use. The module only keeps
/// handles of the app thread and of reactor threads, which live until the application stops.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ThreadHandle {
    raw: NonNull<ffi::spdk_thread>,
}

// SAFETY: a ThreadHandle is only an address used with spdk_thread_send_msg, which SPDK documents
// as callable from any thread, and with pointer comparison; it never touches the thread's state.
unsafe impl Send for ThreadHandle {}
// SAFETY: as above; no method mutates through the pointer.
unsafe impl Sync for ThreadHandle {}

impl std::fmt::Debug for ThreadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadHandle({:p})", self.raw)
    }
}

impl ThreadHandle {
    pub(crate) fn as_ptr(&self) -> *mut ffi::spdk_thread {
        self.raw.as_ptr()
    }

    /// Whether the caller runs on this thread.
    pub fn is_current(&self) -> bool {
        // SAFETY: spdk_get_thread only reads a thread-local pointer.
        let current = unsafe { ffi::spdk_get_thread() };
        current == self.raw.as_ptr()
    }

    /// Runs `message` on the thread, later (never inline, even when called from that thread).
    /// Fails with `ENOMEM` when SPDK's message pool is exhausted; `message` is dropped then.
    pub fn send_msg<F: FnOnce() + Send + 'static>(&self, message: F) -> Result<(), Errno> {
        self.send(Closure(message)).map_err(|(errno, _message)| errno)
    }

    /// Runs `message` on the thread, later; a message SPDK refuses (`ENOMEM`) is given back,
    /// to retry or to handle here, instead of being dropped.
    pub fn send<M: Message>(&self, message: M) -> Result<(), (Errno, M)> {
        unsafe extern "C" fn run<M: Message>(ctx: *mut c_void) {
            // SAFETY: `ctx` is the Box::into_raw below, handed to SPDK once and given back
            // exactly once, to this function.
            let message = unsafe { Box::from_raw(ctx.cast::<M>()) };
            message.run();
        }
        let ctx = Box::into_raw(Box::new(message));
        // SAFETY: `raw` is a live thread; `run::<M>` matches `ctx`'s type; SPDK calls it once.
        let rc = unsafe { ffi::spdk_thread_send_msg(self.raw.as_ptr(), Some(run::<M>), ctx.cast()) };
        if rc != 0 {
            // SAFETY: SPDK refused the message, so `ctx` is still ours and was never run.
            let message = unsafe { Box::from_raw(ctx) };
            return Err((Errno(rc.abs()), *message));
        }
        Ok(())
    }

    /// Runs `D::rang(target)` on the thread, later, without allocating: the `Arc` itself is
    /// SPDK's message argument. Given back if SPDK's message pool is empty (`ENOMEM`).
    pub fn ring<D: Doorbell>(&self, target: Arc<D::Target>) -> Result<(), (Errno, Arc<D::Target>)> {
        unsafe extern "C" fn run<D: Doorbell>(ctx: *mut c_void) {
            // SAFETY: `ctx` is the Arc::into_raw below, handed to SPDK once and given back
            // exactly once, to this function: the reference it counts is taken back here.
            let target = unsafe { Arc::from_raw(ctx.cast::<D::Target>().cast_const()) };
            D::rang(target);
        }
        let ctx = Arc::into_raw(target).cast_mut();
        // SAFETY: `raw` is a live thread; `run::<D>` matches `ctx`'s type; SPDK calls it once.
        let rc = unsafe { ffi::spdk_thread_send_msg(self.raw.as_ptr(), Some(run::<D>), ctx.cast()) };
        if rc != 0 {
            // SAFETY: SPDK refused the message, so the reference `ctx` counts is still ours.
            return Err((Errno(rc.abs()), unsafe { Arc::from_raw(ctx.cast_const()) }));
        }
        Ok(())
    }
}

/// Two SPDK threads that one reactor runs for good: the caller's and another. Of the
/// application's cores (its reactors), each one's cpumask holds only the core the caller runs
/// on now as a reactor (an EAL lcore). SPDK's event framework runs a thread only on a core of
/// its mask (its schedulers never move a thread that has one core to go to, and only a thread
/// itself changes its mask), so the two never run at once: what one of them owns (`Rc`,
/// `RefCell`, thread-locals of the OS thread) the other may use in turn. Hosts that poll SPDK
/// threads themselves (fio's plugin) are not reactors and never qualify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SameReactor {
    here: ThreadHandle,
    there: ThreadHandle,
}

impl SameReactor {
    /// The calling thread and `there`, if one reactor runs both for good.
    pub fn with(there: ThreadHandle) -> Option<SameReactor> {
        let here = Thread::current()?.handle();
        // SAFETY: reads the calling OS thread's EAL lcore id.
        let current = unsafe { ffi::spdk_env_get_current_core() };
        if current == u32::MAX {
            return None; // Not an EAL lcore: no reactor runs this thread.
        }
        let only_this_core = |thread: ThreadHandle| {
            // SAFETY: a live thread (ThreadHandle's rule); its mask is set at creation and
            // changed only by the thread itself, which is not running while this one is (on
            // this core) or has a mask without this core (then the answer is no either way).
            let mask = unsafe { ffi::spdk_thread_get_cpumask(thread.as_ptr()) };
            if mask.is_null() {
                return false;
            }
            // The application's cores, as SPDK_ENV_FOREACH_CORE walks them.
            // SAFETY: reads the environment's core table, fixed after initialisation.
            let mut core = unsafe { ffi::spdk_env_get_first_core() };
            while core != u32::MAX {
                // SAFETY: `mask` points into the live thread.
                if core != current && unsafe { ffi::spdk_cpuset_get_cpu(mask, core) } {
                    return false;
                }
                // SAFETY: as above.
                core = unsafe { ffi::spdk_env_get_next_core(core) };
            }
            // SAFETY: as above.
            unsafe { ffi::spdk_cpuset_get_cpu(mask, current) }
        };
        (only_this_core(here) && only_this_core(there)).then_some(SameReactor { here, there })
    }

    /// The thread that asked ([`SameReactor::with`]'s caller).
    pub fn here(&self) -> ThreadHandle {
        self.here
    }

    /// The other thread.
    pub fn there(&self) -> ThreadHandle {
        self.there
    }

    /// Runs `f` as `target` (one of the two): inside, SPDK's current thread is `target`, so the
    /// channels, pollers and messages `f` uses are `target`'s. The caller runs as either one.
    pub fn run_as<T>(&self, target: ThreadHandle, f: impl FnOnce() -> T) -> T {
        let _running = self.enter(target);
        f()
    }

    /// Runs as `target` (one of the two) until the guard drops, which puts back the thread
    /// that was current: [`run_as`](Self::run_as) for a run of calls (a poll's completions of
    /// one submitter) instead of one.
    pub fn enter(&self, target: ThreadHandle) -> RunningAs {
        assert!(target == self.here || target == self.there, "{target:?} is not one of {self:?}");
        // SAFETY: reads a thread-local pointer.
        let previous = unsafe { ffi::spdk_get_thread() };
        assert!(
            previous == self.here.as_ptr() || previous == self.there.as_ptr(),
            "run_as outside the reactor of {self:?}"
        );
        // SAFETY: only the OS thread's current-SPDK-thread pointer changes, to a thread this
        // reactor runs (`SameReactor`): its state is not in use by anyone else meanwhile. The
        // guard restores it before the caller's thread goes on.
        unsafe { ffi::spdk_set_thread(target.as_ptr()) };
        RunningAs { previous }
    }
}

/// The current SPDK thread switched by [`SameReactor::enter`]; dropping it switches back. Not
/// `Send` (a raw pointer): it restores the OS thread it was made on.
#[must_use = "dropping it switches back at once"]
pub struct RunningAs {
    previous: *mut ffi::spdk_thread,
}

impl Drop for RunningAs {
    fn drop(&mut self) {
        // SAFETY: puts back the pointer that was current (also when the caller unwinds), one
        // of the two threads of the `SameReactor` that made this guard.
        unsafe { ffi::spdk_set_thread(self.previous) };
    }
}

/// Shortens the calling OS thread's timer slack to `slack` (`prctl(PR_SET_TIMERSLACK)`), unless
/// it is that short already; whether it changed. Linux lets a timed sleep end up to the slack
/// late (50 µs by default): a host that polls an SPDK thread from a loop with a timed wait
/// between polls (fio's plugin: its thread waits on a condition variable with a deadline of
/// "now" while pollers are active) loses that much on every turn.
pub fn shorten_timer_slack(slack: std::time::Duration) -> Result<bool, Errno> {
    let target = libc::c_ulong::try_from(slack.as_nanos()).map_err(|_| Errno::EINVAL)?.max(1);
    // SAFETY: PR_GET_TIMERSLACK only reads the calling thread's attribute.
    let current = unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
    if current >= 0 && (current as libc::c_ulong) <= target {
        return Ok(false);
    }
    // SAFETY: PR_SET_TIMERSLACK only changes the calling thread's attribute.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, target, 0, 0, 0) };
    if rc != 0 {
        return Err(Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)));
    }
    Ok(true)
}

/// When the current SPDK thread's previous poll ended, in SPDK's ticks (recorded by SPDK: no
/// clock read here); 0 outside SPDK threads. Between two polls' readings lies one whole poll
/// and whatever the host did (or slept) between them.
pub fn previous_poll_ended_ticks() -> u64 {
    // SAFETY: reads a thread-local pointer.
    let thread = unsafe { ffi::spdk_get_thread() };
    if thread.is_null() {
        return 0;
    }
    // SAFETY: the calling thread's own, live spdk_thread.
    unsafe { ffi::spdk_thread_get_last_tsc(thread) }
}

/// `duration` in SPDK's ticks.
pub fn ticks_in(duration: std::time::Duration) -> u64 {
    // SAFETY: reads the environment's tick rate, fixed after initialisation.
    let hz = unsafe { ffi::spdk_get_ticks_hz() };
    u64::try_from(u128::from(hz) * duration.as_nanos() / 1_000_000_000).unwrap_or(u64::MAX)
}

/// The calling OS thread's voluntary context switches so far (it blocked that many times);
/// `None` if the kernel does not say.
pub fn voluntary_switches() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_THREAD is the calling thread.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    // SAFETY: filled by the successful call (and zeroed before anyway).
    (rc == 0).then(|| u64::try_from(unsafe { usage.assume_init() }.ru_nvcsw).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{shorten_timer_slack, voluntary_switches};

    fn slack_ns() -> i32 {
        // SAFETY: reads the calling thread's timer slack.
        unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) }
    }

    #[test]
    fn timer_slack_is_shortened_on_the_calling_thread_only_and_never_lengthened() {
        let before = slack_ns();
        assert!(before > 0, "{before}");
        std::thread::spawn(move || {
            // A new thread starts with its creator's slack (50 µs unless changed).
            assert_eq!(slack_ns(), before);
            let changed = shorten_timer_slack(Duration::from_micros(1)).expect("prctl");
            assert_eq!(changed, before > 1000, "{before}");
            assert_eq!(slack_ns(), before.min(1000));
            // Asking for a longer slack changes nothing.
            assert!(!shorten_timer_slack(Duration::from_micros(40)).expect("prctl"));
            assert_eq!(slack_ns(), before.min(1000));
        })
        .join()
        .expect("test thread");
        // The creator, and its next threads, keep theirs.
        assert_eq!(slack_ns(), before);
        assert_eq!(std::thread::spawn(slack_ns).join().expect("thread"), before);
    }

    #[test]
    fn voluntary_switches_count_the_calling_threads_blocking_waits() {
        std::thread::spawn(|| {
            let before = voluntary_switches().expect("getrusage");
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let after = voluntary_switches().expect("getrusage");
            assert!(after >= before + 5, "{before} -> {after}");
        })
        .join()
        .expect("test thread");
    }
}
