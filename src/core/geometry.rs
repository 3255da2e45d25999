//! Volume geometry: the host write size as the one unit of the journal (seed 001 mechanism 1,
//! FIG 7, S7001–7005).
//!
//! Seed 001 sizes everything by the host's write size: a volume block, a journal segment, a
//! history element and a difference-bitmap bit are all one host-write-size *unit*, so a journal
//! carries no padding. The device underneath has its own, smaller or equal, block size. This
//! module holds the validated sizes and the arithmetic between the two: unit ↔ device LBA, and
//! the *widening* of a host request to whole units that a read-modify-write needs when the host
//! writes less than a unit.
//!
//! Every size is a power of two, so "a multiple of the device block size" is the same as "at
//! least the device block size", and the divisions below are exact shifts.

use std::ops::Range;

/// Smallest device block size accepted, in bytes.
pub const DEVICE_BLOCK_BYTES_MIN: u32 = 512;
/// Largest device block size accepted, in bytes.
pub const DEVICE_BLOCK_BYTES_MAX: u32 = 4096;
/// Smallest host write size accepted, in bytes.
pub const HOST_WRITE_BYTES_MIN: u32 = 512;
/// Largest host write size accepted, in bytes (1 MiB: one element must fit one DMA buffer).
pub const HOST_WRITE_BYTES_MAX: u32 = 1 << 20;

/// Why a size, a volume or a request does not fit the geometry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("device block size {bytes} bytes is not a power of two")]
    DeviceBlockSizeNotPowerOfTwo { bytes: u32 },
    #[error(
        "device block size {bytes} bytes is outside the supported range {DEVICE_BLOCK_BYTES_MIN}..={DEVICE_BLOCK_BYTES_MAX} bytes"
    )]
    DeviceBlockSizeOutOfRange { bytes: u32 },
    #[error("host write size {bytes} bytes is not a power of two")]
    HostWriteSizeNotPowerOfTwo { bytes: u32 },
    #[error(
        "host write size {bytes} bytes is outside the supported range {HOST_WRITE_BYTES_MIN} bytes..=1 MiB ({HOST_WRITE_BYTES_MAX} bytes)"
    )]
    HostWriteSizeOutOfRange { bytes: u32 },
    #[error(
        "host write size {host_write_bytes} bytes is smaller than the device block size {device_block_bytes} bytes"
    )]
    HostWriteSizeBelowDeviceBlock { host_write_bytes: u32, device_block_bytes: u32 },
    #[error("volume of 0 bytes is empty; a volume needs at least one {unit_bytes}-byte host-write-size block")]
    EmptyVolume { unit_bytes: u32 },
    #[error("volume of {volume_bytes} bytes is not a whole number of {unit_bytes}-byte host-write-size blocks")]
    VolumeNotWholeUnits { volume_bytes: u64, unit_bytes: u32 },
    #[error("request of 0 device blocks at block {offset_blocks} is empty")]
    EmptyRequest { offset_blocks: u64 },
    #[error(
        "request of {num_blocks} device blocks at block {offset_blocks} runs past the end of the volume ({volume_device_blocks} device blocks)"
    )]
    RequestOutOfRange { offset_blocks: u64, num_blocks: u64, volume_device_blocks: u64 },
}

/// Bytes per block of the device that holds a volume (SPDK `blocklen`): a power of two,
/// 512 ..= 4096.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceBlockSize(u32);

impl DeviceBlockSize {
    pub fn new(bytes: u32) -> Result<Self, GeometryError> {
        if !bytes.is_power_of_two() {
            return Err(GeometryError::DeviceBlockSizeNotPowerOfTwo { bytes });
        }
        if !(DEVICE_BLOCK_BYTES_MIN..=DEVICE_BLOCK_BYTES_MAX).contains(&bytes) {
            return Err(GeometryError::DeviceBlockSizeOutOfRange { bytes });
        }
        Ok(DeviceBlockSize(bytes))
    }

    pub fn bytes(self) -> u32 {
        self.0
    }
}

/// The host write size (seed 001 "I/O size"): the unit of the journal, a power of two,
/// 512 B ..= 1 MiB. That it is a multiple of the device block size is checked where both are
/// known, by [`HostWriteSize::for_device`] or [`VolumeGeometry::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostWriteSize(u32);

impl HostWriteSize {
    pub fn new(bytes: u32) -> Result<Self, GeometryError> {
        if !bytes.is_power_of_two() {
            return Err(GeometryError::HostWriteSizeNotPowerOfTwo { bytes });
        }
        if !(HOST_WRITE_BYTES_MIN..=HOST_WRITE_BYTES_MAX).contains(&bytes) {
            return Err(GeometryError::HostWriteSizeOutOfRange { bytes });
        }
        Ok(HostWriteSize(bytes))
    }

    /// A host write size that is also a whole number of `device` blocks.
    pub fn for_device(bytes: u32, device: DeviceBlockSize) -> Result<Self, GeometryError> {
        let size = HostWriteSize::new(bytes)?;
        size.check_device(device)?;
        Ok(size)
    }

    fn check_device(self, device: DeviceBlockSize) -> Result<(), GeometryError> {
        // Both are powers of two: a multiple exactly when not smaller.
        if self.0 < device.0 {
            return Err(GeometryError::HostWriteSizeBelowDeviceBlock {
                host_write_bytes: self.0,
                device_block_bytes: device.0,
            });
        }
        Ok(())
    }

    pub fn bytes(self) -> u32 {
        self.0
    }
}

/// `value / size` for the sizes of the write path (device blocks, units, entries per page),
/// which are powers of two on every device chronicle takes: a shift, where a division costs
/// 10 to 40 cycles and a write used to do a dozen. Any other size divides.
#[inline]
pub fn div_size(value: u64, size: u64) -> u64 {
    if size.is_power_of_two() {
        value >> size.trailing_zeros()
    } else {
        value / size
    }
}

/// `value % size`, as [`div_size`].
#[inline]
pub fn rem_size(value: u64, size: u64) -> u64 {
    if size.is_power_of_two() {
        value & (size - 1)
    } else {
        value % size
    }
}

/// The shape of one volume: its device block size, its host write size and its length in
/// units. A *unit* (volume block) is one host-write-size block: one journal element, one bit
/// of the difference bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeGeometry {
    device_block_size: DeviceBlockSize,
    host_write_size: HostWriteSize,
    volume_blocks: u64,
}

/// A host request widened to the whole units it touches. The request covers device blocks
/// `[head_gap_blocks, unit_count * device_blocks_per_unit - tail_gap_blocks)` of the widened
/// range; the gaps are what a read-modify-write must read before writing whole units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Widening {
    /// First unit touched.
    pub first_unit: u64,
    /// Number of units touched (at least 1).
    pub unit_count: u64,
    /// Device blocks of the first unit before the request starts.
    pub head_gap_blocks: u64,
    /// Device blocks of the last unit after the request ends.
    pub tail_gap_blocks: u64,
    /// The request is exactly whole units: no gap, no read-modify-write.
    pub aligned: bool,
}

impl Widening {
    /// The units touched.
    pub fn units(&self) -> Range<u64> {
        self.first_unit..self.first_unit + self.unit_count
    }
}

impl VolumeGeometry {
    /// The geometry of a volume of `volume_bytes` on a device of `device_block_size` journaled
    /// at `host_write_size`. Refuses a host write size below the device block size and a
    /// volume that is empty or not a whole number of units.
    pub fn new(
        device_block_size: DeviceBlockSize,
        host_write_size: HostWriteSize,
        volume_bytes: u64,
    ) -> Result<Self, GeometryError> {
        host_write_size.check_device(device_block_size)?;
        let unit_bytes = host_write_size.bytes();
        if volume_bytes == 0 {
            return Err(GeometryError::EmptyVolume { unit_bytes });
        }
        if volume_bytes % u64::from(unit_bytes) != 0 {
            return Err(GeometryError::VolumeNotWholeUnits { volume_bytes, unit_bytes });
        }
        let geometry =
            VolumeGeometry { device_block_size, host_write_size, volume_blocks: volume_bytes / u64::from(unit_bytes) };
        debug_assert_eq!(geometry.volume_bytes(), volume_bytes);
        Ok(geometry)
    }

    pub fn device_block_size(&self) -> DeviceBlockSize {
        self.device_block_size
    }

    pub fn host_write_size(&self) -> HostWriteSize {
        self.host_write_size
    }

    /// Length of the volume in units (= bits of a difference bitmap).
    pub fn volume_blocks(&self) -> u64 {
        self.volume_blocks
    }

    /// Device blocks in one unit (a power of two, 1 ..= 2048).
    pub fn device_blocks_per_unit(&self) -> u64 {
        1 << self.unit_shift()
    }

    /// log2 of [`device_blocks_per_unit`](Self::device_blocks_per_unit): both sizes are powers
    /// of two (checked when made), so device blocks become units by a shift.
    fn unit_shift(&self) -> u32 {
        self.host_write_size.bytes().trailing_zeros() - self.device_block_size.bytes().trailing_zeros()
    }

    /// Bytes of one unit (= the host write size).
    pub fn unit_bytes(&self) -> u64 {
        u64::from(self.host_write_size.bytes())
    }

    /// Bytes of the volume.
    pub fn volume_bytes(&self) -> u64 {
        // Cannot overflow: the volume was given in bytes as a u64.
        self.volume_blocks * self.unit_bytes()
    }

    /// Length of the volume in device blocks.
    pub fn volume_device_blocks(&self) -> u64 {
        self.volume_blocks * self.device_blocks_per_unit()
    }

    /// The unit holding device block `lba`. Panics if `lba` is beyond the volume.
    pub fn unit_of_device_lba(&self, lba: u64) -> u64 {
        assert!(
            lba < self.volume_device_blocks(),
            "device block {lba} beyond a volume of {} blocks",
            self.volume_device_blocks()
        );
        lba >> self.unit_shift()
    }

    /// The first device block of `unit`. `unit == volume_blocks()` is allowed and gives the
    /// end of the volume. Panics beyond that.
    pub fn device_lba_of_unit(&self, unit: u64) -> u64 {
        assert!(unit <= self.volume_blocks, "unit {unit} beyond a volume of {} units", self.volume_blocks);
        unit * self.device_blocks_per_unit()
    }

    /// The units a host request of `num_blocks` device blocks at `offset_blocks` touches, and
    /// the device blocks of those units that the request does not cover.
    #[inline]
    pub fn widen(&self, offset_blocks: u64, num_blocks: u64) -> Result<Widening, GeometryError> {
        if num_blocks == 0 {
            return Err(GeometryError::EmptyRequest { offset_blocks });
        }
        let volume_device_blocks = self.volume_device_blocks();
        let end_blocks = offset_blocks
            .checked_add(num_blocks)
            .filter(|end| *end <= volume_device_blocks)
            .ok_or(GeometryError::RequestOutOfRange { offset_blocks, num_blocks, volume_device_blocks })?;
        let per_unit = self.device_blocks_per_unit();
        let shift = self.unit_shift();
        let first_unit = offset_blocks >> shift;
        let end_unit = (end_blocks >> shift) + u64::from(end_blocks & (per_unit - 1) != 0);
        let head_gap_blocks = offset_blocks - first_unit * per_unit;
        let tail_gap_blocks = end_unit * per_unit - end_blocks;
        let widening = Widening {
            first_unit,
            unit_count: end_unit - first_unit,
            head_gap_blocks,
            tail_gap_blocks,
            aligned: head_gap_blocks == 0 && tail_gap_blocks == 0,
        };
        debug_assert!(
            widening.unit_count >= 1 && widening.head_gap_blocks < per_unit && widening.tail_gap_blocks < per_unit
        );
        debug_assert_eq!(widening.unit_count * per_unit, head_gap_blocks + num_blocks + tail_gap_blocks);
        Ok(widening)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geometry(device: u32, host: u32, volume_bytes: u64) -> VolumeGeometry {
        VolumeGeometry::new(DeviceBlockSize::new(device).unwrap(), HostWriteSize::new(host).unwrap(), volume_bytes)
            .unwrap()
    }

    #[test]
    fn sizes_are_validated_with_messages_that_name_the_numbers() {
        assert_eq!(
            HostWriteSize::new(3000).unwrap_err().to_string(),
            "host write size 3000 bytes is not a power of two"
        );
        assert!(matches!(HostWriteSize::new(256), Err(GeometryError::HostWriteSizeOutOfRange { bytes: 256 })));
        assert!(matches!(HostWriteSize::new(2 << 20), Err(GeometryError::HostWriteSizeOutOfRange { .. })));
        assert!(HostWriteSize::new(0).is_err());
        assert_eq!(HostWriteSize::new(512).unwrap().bytes(), 512);
        assert_eq!(HostWriteSize::new(1 << 20).unwrap().bytes(), 1 << 20);
        assert!(matches!(DeviceBlockSize::new(8192), Err(GeometryError::DeviceBlockSizeOutOfRange { .. })));
        assert!(matches!(DeviceBlockSize::new(520), Err(GeometryError::DeviceBlockSizeNotPowerOfTwo { .. })));
        let device = DeviceBlockSize::new(4096).unwrap();
        assert_eq!(
            HostWriteSize::for_device(512, device).unwrap_err().to_string(),
            "host write size 512 bytes is smaller than the device block size 4096 bytes"
        );
        assert_eq!(HostWriteSize::for_device(8192, device).unwrap().bytes(), 8192);
    }

    #[test]
    fn volume_must_be_whole_units() {
        let device = DeviceBlockSize::new(512).unwrap();
        let host = HostWriteSize::new(4096).unwrap();
        assert_eq!(
            VolumeGeometry::new(device, host, 10_000).unwrap_err().to_string(),
            "volume of 10000 bytes is not a whole number of 4096-byte host-write-size blocks"
        );
        assert!(matches!(VolumeGeometry::new(device, host, 0), Err(GeometryError::EmptyVolume { .. })));
        let big = DeviceBlockSize::new(4096).unwrap();
        let small = HostWriteSize::new(512).unwrap();
        assert!(matches!(
            VolumeGeometry::new(big, small, 1 << 20),
            Err(GeometryError::HostWriteSizeBelowDeviceBlock { .. })
        ));
    }

    #[test]
    fn unit_and_lba_arithmetic() {
        // 512-byte device blocks, 8 KiB host writes: 16 device blocks per unit.
        let g = geometry(512, 8192, 1 << 30);
        assert_eq!(g.device_blocks_per_unit(), 16);
        assert_eq!(g.unit_bytes(), 8192);
        assert_eq!(g.volume_blocks(), (1 << 30) / 8192);
        assert_eq!(g.volume_bytes(), 1 << 30);
        assert_eq!(g.volume_device_blocks(), (1 << 30) / 512);
        assert_eq!(g.unit_of_device_lba(0), 0);
        assert_eq!(g.unit_of_device_lba(15), 0);
        assert_eq!(g.unit_of_device_lba(16), 1);
        assert_eq!(g.device_lba_of_unit(3), 48);
        assert_eq!(g.device_lba_of_unit(g.volume_blocks()), g.volume_device_blocks());
    }

    #[test]
    fn widening_of_aligned_and_partial_requests() {
        let g = geometry(512, 4096, 1 << 20); // 8 device blocks per unit, 256 units
        assert_eq!(
            g.widen(8, 16).unwrap(),
            Widening { first_unit: 1, unit_count: 2, head_gap_blocks: 0, tail_gap_blocks: 0, aligned: true }
        );
        assert_eq!(
            g.widen(3, 1).unwrap(),
            Widening { first_unit: 0, unit_count: 1, head_gap_blocks: 3, tail_gap_blocks: 4, aligned: false }
        );
        assert_eq!(
            g.widen(6, 4).unwrap(),
            Widening { first_unit: 0, unit_count: 2, head_gap_blocks: 6, tail_gap_blocks: 6, aligned: false }
        );
        assert_eq!(g.widen(2040, 8).unwrap().units(), 255..256);
        assert!(matches!(g.widen(2041, 8), Err(GeometryError::RequestOutOfRange { .. })));
        assert!(matches!(g.widen(u64::MAX, 2), Err(GeometryError::RequestOutOfRange { .. })));
        assert!(matches!(g.widen(0, 0), Err(GeometryError::EmptyRequest { .. })));
        // Host write size equal to the device block: every request is aligned.
        let g = geometry(4096, 4096, 1 << 20);
        assert!(g.widen(5, 7).unwrap().aligned);
    }

    proptest! {
        #[test]
        fn div_size_and_rem_size_are_division_and_remainder(value in any::<u64>(), shift in 0u32..40, other in 1u64..10_000) {
            for size in [1u64 << shift, other] {
                prop_assert_eq!(div_size(value, size), value / size);
                prop_assert_eq!(rem_size(value, size), value % size);
            }
        }
    }

    proptest! {
        /// Every requested block lies inside the widened units, and the gaps are exactly the
        /// device blocks of those units that the request does not cover.
        #[test]
        fn widening_covers_the_request_and_the_gaps_are_the_rest(
            device_shift in 9u32..=12,
            unit_shift in 0u32..=6,
            units in 1u64..64,
            offset in 0u64..100_000,
            num in 1u64..1000,
        ) {
            let device = 1u32 << device_shift;
            let host = (device << unit_shift).min(HOST_WRITE_BYTES_MAX);
            let g = geometry(device, host, units * u64::from(host));
            let total = g.volume_device_blocks();
            let offset = offset % total;
            let num = 1 + (num - 1) % (total - offset);
            let w = g.widen(offset, num).unwrap();
            let per_unit = g.device_blocks_per_unit();
            let first = g.device_lba_of_unit(w.first_unit);
            let end = g.device_lba_of_unit(w.first_unit + w.unit_count);
            prop_assert!(first <= offset && offset + num <= end);
            let uncovered: u64 = (first..end).filter(|b| !(offset..offset + num).contains(b)).count() as u64;
            prop_assert_eq!(uncovered, w.head_gap_blocks + w.tail_gap_blocks);
            prop_assert_eq!(first + w.head_gap_blocks, offset);
            prop_assert_eq!(end - w.tail_gap_blocks, offset + num);
            prop_assert!(w.head_gap_blocks < per_unit && w.tail_gap_blocks < per_unit);
            prop_assert_eq!(w.aligned, w.head_gap_blocks == 0 && w.tail_gap_blocks == 0);
            prop_assert_eq!(g.unit_of_device_lba(offset), w.first_unit);
            prop_assert_eq!(g.unit_of_device_lba(offset + num - 1), w.first_unit + w.unit_count - 1);
        }
    }
}
