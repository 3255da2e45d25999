//! The four memory devices of a small volume for engine tests: 64 units of 4 KiB, by default
//! with a journal of 4 volumes' worth of elements and a history of 40.

#![allow(dead_code)] // each test binary uses a part of this module

use chronicle::core::format::layout::{self, LayoutOptions, VolumeShape};
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::{Channel, Device};

pub const UNIT: usize = 4096;
pub const UNITS: u64 = 64;

pub struct Devices([MemoryDevice; 4]);

impl Devices {
    pub fn new() -> Self {
        Devices::sized(4 * UNITS, 40 * UNITS)
    }

    /// A journal of `journal_elements` elements and a history of `history_units` units.
    pub fn sized(journal_elements: u64, history_units: u64) -> Self {
        Devices::sized_with(journal_elements, history_units, LayoutOptions::default())
    }

    /// As [`sized`](Self::sized), for a journal laid out with `options` (an open bitmap area
    /// for the journal-full policy bitmap-only, for one).
    pub fn sized_with(journal_elements: u64, history_units: u64, options: LayoutOptions) -> Self {
        let shape = VolumeShape { host_write_size: UNIT as u32, volume_blocks: UNITS };
        let sizes = [
            UNITS * UNIT as u64,
            layout::journal_bytes_for(&shape, &options, journal_elements),
            UNITS * UNIT as u64,
            layout::history_bytes_for(&shape, &options, history_units),
        ];
        let names = ["base", "journal", "backup", "history"];
        Devices(std::array::from_fn(|i| MemoryDevice::new(names[i], MemoryOptions::new(512, sizes[i] / 512))))
    }

    /// Device `role`: 0 base, 1 journal, 2 backup, 3 history.
    pub fn device(&self, role: usize) -> &MemoryDevice {
        &self.0[role]
    }

    pub fn channels(&self) -> Vec<Box<dyn Channel>> {
        self.0.iter().map(|d| d.open_channel().unwrap()).collect()
    }
}
