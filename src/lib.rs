//! chronicle: a block journal with generations, a sorted backup kept one generation behind,
//! copy-on-write history, merge, restore and replication (seed 001, "Storage System Group").
//!
//! Layers (dependencies point one way, `spdk → engine → core`, `engine → device`):
//! - [`core`]: pure logic — on-disk formats, bitmaps, allocators, planners. No I/O, no `unsafe`.
//! - [`device`]: the submit-and-poll device interface and its non-SPDK backends.
//! - [`engine`]: polled state machines over devices: write path, marker, sort, recovery.
//! - `spdk` (feature `spdk`): the bdev module hosting the engine inside an SPDK application.

pub mod core;
pub mod device;
pub mod engine;
#[cfg(feature = "spdk")]
pub mod spdk;
