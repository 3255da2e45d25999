//! SPDK logging (`spdk_log`) and log components (`SPDK_LOG_REGISTER_COMPONENT`).
//!
//! Messages go through SPDK's logger, so they land where the application's other messages do
//! and obey `--logflag` / `log_set_flag` / `log_set_print_level`. Use the macros:
//! `spdk_error!`, `spdk_warn!`, `spdk_notice!` (always shown at the default print level),
//! `spdk_info!(FLAG, ..)` and `spdk_debug!(FLAG, ..)` (only when the component `FLAG` is
//! enabled, as `SPDK_INFOLOG` / `SPDK_DEBUGLOG`).

use std::cell::UnsafeCell;
use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};

use super::rpc::on_registration_thread;
use super::{ffi, Errno};

/// Severity of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Notice,
    Info,
    Debug,
}

impl Level {
    fn raw(self) -> ffi::spdk_log_level {
        match self {
            Level::Error => ffi::SPDK_LOG_ERROR,
            Level::Warn => ffi::SPDK_LOG_WARN,
            Level::Notice => ffi::SPDK_LOG_NOTICE,
            Level::Info => ffi::SPDK_LOG_INFO,
            Level::Debug => ffi::SPDK_LOG_DEBUG,
        }
    }
}

/// A log component (SPDK "log flag"): `--logflag chronicle` or `log_set_flag chronicle` enables
/// its info and debug messages. Must be a `static`, registered once with
/// [`register`](Self::register) from a constructor.
pub struct LogFlag {
    raw: UnsafeCell<ffi::spdk_log_flag>,
    registered: AtomicBool,
}

// SAFETY: SPDK links the flag into its global list at registration (before main, one thread)
// and flips `enabled` from RPCs; we only read `enabled`, with a volatile read, as the C macros
// read it without synchronisation.
unsafe impl Sync for LogFlag {}

impl LogFlag {
    pub const fn new(name: &'static CStr) -> Self {
        LogFlag {
            raw: UnsafeCell::new(ffi::spdk_log_flag {
                tailq: ffi::spdk_log_flag__bindgen_ty_1 {
                    tqe_next: std::ptr::null_mut(),
                    tqe_prev: std::ptr::null_mut(),
                },
                name: name.as_ptr(),
                enabled: false,
            }),
            registered: AtomicBool::new(false),
        }
    }

    /// Adds the component to SPDK's list; later calls do nothing (linking the same flag twice
    /// would corrupt SPDK's list). From a constructor or the app thread only (`EPERM`).
    pub fn register(&'static self) -> Result<(), Errno> {
        if !on_registration_thread() {
            return Err(Errno::EPERM);
        }
        if self.registered.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let raw = self.raw.get();
        // SAFETY: `raw` is a 'static, never-moved flag; SPDK keeps the pointer in its list and
        // reads the name from it. No other thread changes the list (checked above).
        unsafe { ffi::spdk_log_register_flag((*raw).name, raw) };
        Ok(())
    }

    /// Whether info/debug messages of this component are shown.
    pub fn enabled(&self) -> bool {
        // SAFETY: reading a bool field of a live static; SPDK may write it concurrently from an
        // RPC, as in C, hence the volatile read of a single byte.
        unsafe { std::ptr::addr_of!((*self.raw.get()).enabled).read_volatile() }
    }
}

/// Writes one message through `spdk_log`. Prefer the macros, which fill in `file` and `line`.
pub fn write(level: Level, file: &str, line: u32, function: &str, message: &str) {
    let to_c = |text: &str| CString::new(text.replace('\0', " ")).unwrap_or_default();
    let (file, function) = (to_c(file), to_c(function));
    // SPDK's log lines end with the caller's newline, as in C.
    let message = to_c(&format!("{message}\n"));
    // SAFETY: all strings are NUL-terminated and live across the call; the format is "%s" with
    // exactly one string argument.
    unsafe {
        ffi::spdk_log(level.raw(), file.as_ptr(), line as i32, function.as_ptr(), c"%s".as_ptr(), message.as_ptr())
    }
}

macro_rules! spdk_log_at {
    ($level:expr, $($arg:tt)+) => {
        $crate::spdk::log::write($level, file!(), line!(), module_path!(), &format!($($arg)+))
    };
}

/// `SPDK_ERRLOG`.
macro_rules! spdk_error {
    ($($arg:tt)+) => { spdk_log_at!($crate::spdk::log::Level::Error, $($arg)+) };
}

/// `SPDK_WARNLOG`.
#[allow(unused_macros)] // part of the layer; the module has no warning to give yet
macro_rules! spdk_warn {
    ($($arg:tt)+) => { spdk_log_at!($crate::spdk::log::Level::Warn, $($arg)+) };
}

/// `SPDK_NOTICELOG`.
macro_rules! spdk_notice {
    ($($arg:tt)+) => { spdk_log_at!($crate::spdk::log::Level::Notice, $($arg)+) };
}

/// `SPDK_INFOLOG(flag, ..)`.
macro_rules! spdk_info {
    ($flag:expr, $($arg:tt)+) => {
        if $flag.enabled() {
            spdk_log_at!($crate::spdk::log::Level::Info, $($arg)+)
        }
    };
}

/// `SPDK_DEBUGLOG(flag, ..)`.
macro_rules! spdk_debug {
    ($flag:expr, $($arg:tt)+) => {
        if $flag.enabled() {
            spdk_log_at!($crate::spdk::log::Level::Debug, $($arg)+)
        }
    };
}
