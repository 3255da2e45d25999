//! The four memory devices of a small volume for engine tests: 64 units of 4 KiB, by default
//! with a journal of 4 volumes' worth of elements and a history of 40.

#![allow(dead_code)] // each test binary uses a part of this module

use chronicle::core::format::layout::{self, LayoutOptions, VolumeShape};
use chronicle::device::fault::{FaultController, FaultDevice};
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::{Channel, Device};

pub const UNIT: usize = 4096;
pub const UNITS: u64 = 64;

const NAMES: [&str; 4] = ["base", "journal", "backup", "history"];

/// Bytes of the base, journal, backup and history of a volume of `units` units of 4 KiB.
fn device_bytes(units: u64, journal_elements: u64, history_units: u64, options: &LayoutOptions) -> [u64; 4] {
    let shape = VolumeShape { host_write_size: UNIT as u32, volume_blocks: units };
    [
        units * UNIT as u64,
        layout::journal_bytes_for(&shape, options, journal_elements),
        units * UNIT as u64,
        layout::history_bytes_for(&shape, options, history_units),
    ]
}

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
        let sizes = device_bytes(UNITS, journal_elements, history_units, &options);
        Devices(std::array::from_fn(|i| MemoryDevice::new(NAMES[i], MemoryOptions::new(512, sizes[i] / 512))))
    }

    /// Device `role`: 0 base, 1 journal, 2 backup, 3 history.
    pub fn device(&self, role: usize) -> &MemoryDevice {
        &self.0[role]
    }

    pub fn channels(&self) -> Vec<Box<dyn Channel>> {
        self.0.iter().map(|d| d.open_channel().unwrap()).collect()
    }
}

/// The four memory devices of a volume of `units` units of 4 KiB, shared (`Arc`) so they can
/// also be opened through fault devices for power cuts, and copied and put back whole.
pub struct Media([std::sync::Arc<MemoryDevice>; 4]);

impl Media {
    /// A journal of `journal_elements` elements and a history of `history_units` units.
    pub fn new(units: u64, journal_elements: u64, history_units: u64) -> Self {
        let sizes = device_bytes(units, journal_elements, history_units, &LayoutOptions::default());
        Media(std::array::from_fn(|i| {
            std::sync::Arc::new(MemoryDevice::new(NAMES[i], MemoryOptions::new(512, sizes[i] / 512)))
        }))
    }

    /// Device `role`: 0 base, 1 journal, 2 backup, 3 history.
    pub fn device(&self, role: usize) -> &MemoryDevice {
        &self.0[role]
    }

    pub fn channels(&self) -> Vec<Box<dyn Channel>> {
        self.0.iter().map(|d| d.open_channel().unwrap()).collect()
    }

    /// Channels through fault devices (one per role, seeded from `seed`), for power cuts.
    pub fn fault_channels(&self, seed: u64) -> (Vec<Box<dyn Channel>>, Vec<FaultController>) {
        let mut channels = Vec::new();
        let mut controllers = Vec::new();
        for (i, device) in self.0.iter().enumerate() {
            let inner: std::sync::Arc<dyn Device> = device.clone();
            let (fault, controller) = FaultDevice::new(inner, seed.wrapping_mul(7).wrapping_add(i as u64));
            channels.push(fault.open_channel().unwrap());
            controllers.push(controller);
        }
        (channels, controllers)
    }

    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.0.iter().map(|d| d.snapshot()).collect()
    }

    pub fn restore(&self, snapshot: &[Vec<u8>]) {
        for (device, bytes) in self.0.iter().zip(snapshot) {
            device.write_blocks(0, bytes);
        }
    }
}
