//! The SPDK bdev module (feature `spdk`): `chronicle` inside a stock SPDK application.
//!
//! Two parts, kept apart:
//! - the **thin safe layer** over SPDK's C API — [`thread`], [`poller`], [`dma`], [`json`],
//!   [`rpc`], [`log`], [`bdev`], [`bdev_module`]. Every `unsafe` block of the crate's SPDK code
//!   lives in these files, each with a `// SAFETY:` comment. Handles are `!Send` (SPDK objects
//!   belong to the SPDK thread that made them); a bdev I/O completes by value; descriptors close
//!   on the thread that opened them; `ENOMEM` from a base bdev queues the I/O with
//!   `spdk_bdev_queue_io_wait` instead of failing it.
//! - the **module** — [`bdev_chronicle`] (the `chronicle` bdev module, registered by an ELF
//!   constructor when `libchronicle.so` is loaded, e.g. with `LD_PRELOAD` into `spdk_tgt`) and
//!   [`bdev_chronicle_rpc`] (its JSON-RPC methods, which only decode parameters and call the
//!   module), named after SPDK's `vbdev_passthru.c` / `vbdev_passthru_rpc.c`.
//!
//! The raw bindings ([`ffi`], generated from the installed SPDK headers) are private to this
//! module: nothing above the safe layer names an SPDK C type. See `docs/SPDK.md`.
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]

pub(crate) mod ffi;

#[macro_use]
pub mod log;

pub mod bdev;
pub mod bdev_module;
pub mod dma;
pub mod json;
pub mod poller;
pub mod rpc;
pub mod thread;
pub mod vbdev;

pub mod device;
pub mod doorbell;

pub mod bdev_chronicle;
pub mod bdev_chronicle_load;
pub mod bdev_chronicle_rpc;
pub mod bdev_chronicle_volume;

use std::fmt;

/// SPDK release the module was built against, `MAJOR.MINOR` (from `spdk/version.h`).
pub const SPDK_VERSION: &str = env!("CHRONICLE_SPDK_VERSION");

/// A positive `errno` value reported by SPDK (SPDK functions return `-errno`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    pub const EPERM: Errno = Errno(libc::EPERM);

    /// `Ok(())` for `rc >= 0`, the error for a negative SPDK return code.
    pub fn check(rc: i32) -> Result<(), Errno> {
        if rc < 0 {
            Err(Errno(-rc))
        } else {
            Ok(())
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({}: {})", self.0, self)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let error = std::io::Error::from_raw_os_error(self.0);
        write!(f, "{error}")
    }
}

impl std::error::Error for Errno {}

/// `*mut ()` makes a handle `!Send + !Sync`: SPDK objects belong to the SPDK thread that made them.
type NotSend = std::marker::PhantomData<*mut ()>;
