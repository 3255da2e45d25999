//! Pure logic of chronicle: on-disk formats, the difference bitmap, geometry and capacity
//! planning, segment allocation, and the planners for sort, merge, dedup, restore and
//! deletion. Nothing here performs I/O; everything here is deterministic and testable alone.
#![forbid(unsafe_code)]

pub mod allocator;
pub mod bitmap;
pub mod checksum;
pub mod delta;
pub mod element_map;
pub mod format;
pub mod geometry;
pub mod payload;
pub mod plan;
pub mod time;
pub mod unit_index;
