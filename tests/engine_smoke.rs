//! End-to-end scenarios of the engine on memory devices: format, write (aligned and widened),
//! mark, sort, reopen, and read every generation back against a model.

use std::sync::Arc;

use chronicle::core::format::layout::{self, LayoutOptions, VolumeShape};
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::{Channel, Device, DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{format, FormatOptions, HostRequest, Volume, VolumeOptions};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BLOCK: u32 = 512;
const UNIT: u32 = 4096;
const VOLUME_BYTES: u64 = 2 << 20;

struct Devices([MemoryDevice; 4]);

impl Devices {
    fn new() -> Self {
        let shape = VolumeShape { host_write_size: UNIT, volume_blocks: VOLUME_BYTES / u64::from(UNIT) };
        let options = LayoutOptions::default();
        let sizes = [
            VOLUME_BYTES,
            layout::recommended_journal_bytes(&shape, &options),
            VOLUME_BYTES,
            layout::recommended_history_bytes(&shape, &options) * 6,
        ];
        let names = ["base", "journal", "backup", "history"];
        Devices(std::array::from_fn(|i| {
            MemoryDevice::new(names[i], MemoryOptions::new(BLOCK, sizes[i].div_ceil(u64::from(BLOCK))))
        }))
    }

    fn channels(&self) -> Vec<Box<dyn Channel>> {
        self.0.iter().map(|d| d.open_channel().unwrap()).collect()
    }
}

fn write(volume: &mut Volume, model: &mut [u8], offset: u64, data: Vec<u8>) {
    let at = (offset * u64::from(BLOCK)) as usize;
    model[at..at + data.len()].copy_from_slice(&data);
    volume.submit(
        offset,
        HostRequest::Write { offset_blocks: offset, buffers: Arc::new(IoBuffers::single(DmaBuf::copy_from(&data))) },
    );
}

fn drain(volume: &mut Volume) {
    let mut completions = Vec::new();
    volume.run_until_idle(&mut completions);
    for completion in completions {
        completion.result.expect("host write succeeds");
    }
}

#[test]
fn generations_sorted_into_backup_and_history_restore_exactly() {
    let devices = Devices::new();
    format(devices.channels(), &FormatOptions::default(), &mut |_| {}).unwrap();
    let mut volume = Volume::open(devices.channels(), VolumeOptions::default()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut images = vec![model.clone()];
    let device_blocks = VOLUME_BYTES / u64::from(BLOCK);
    for generation in 1..=4u64 {
        for _ in 0..200 {
            // Mixed sizes and alignments: whole units and partial units (read-modify-write).
            let blocks = rng.random_range(1..=24u64);
            let offset = rng.random_range(0..device_blocks - blocks);
            let mut data = vec![0u8; (blocks * u64::from(BLOCK)) as usize];
            rng.fill_bytes(&mut data);
            write(&mut volume, &mut model, offset, data);
        }
        drain(&mut volume);
        let mut completions = Vec::new();
        assert_eq!(volume.mark_and_wait(&format!("g{generation}"), &mut completions).unwrap(), generation);
        images.push(model.clone());
    }
    drain(&mut volume);
    let status = volume.status();
    assert_eq!(status.backup_generation, 4, "{status:?}");
    assert!(status.sort_error.is_none());
    volume.close().unwrap();

    let reader = VolumeReader::open(devices.channels()).unwrap();
    for (generation, image) in images.iter().enumerate() {
        assert!(reader.read_image(generation as u64).unwrap() == *image, "generation {generation} differs");
    }
    assert!(reader.read_image(5).unwrap() == model, "the base holds the open generation");
    reader.verify().unwrap();
}

#[test]
fn reopen_keeps_open_and_sealed_generations() {
    let devices = Devices::new();
    format(devices.channels(), &FormatOptions::default(), &mut |_| {}).unwrap();
    let mut options = VolumeOptions::default();
    options.sort.automatic = false;
    let mut volume = Volume::open(devices.channels(), options.clone()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut images = vec![model.clone()];
    for generation in 1..=3u64 {
        for _ in 0..300 {
            let unit = rng.random_range(0..VOLUME_BYTES / u64::from(UNIT));
            let mut data = vec![0u8; UNIT as usize];
            rng.fill_bytes(&mut data);
            write(&mut volume, &mut model, unit * u64::from(UNIT / BLOCK), data);
        }
        drain(&mut volume);
        let mut completions = Vec::new();
        volume.mark_and_wait(&format!("g{generation}"), &mut completions).unwrap();
        images.push(model.clone());
    }
    for _ in 0..100 {
        let unit = rng.random_range(0..VOLUME_BYTES / u64::from(UNIT));
        write(&mut volume, &mut model, unit * u64::from(UNIT / BLOCK), vec![0xAB; UNIT as usize]);
    }
    drain(&mut volume);
    assert_eq!(volume.status().sealed_waiting, 3);
    drop(volume); // no close: as after a crash of the process

    let mut volume = Volume::open(devices.channels(), VolumeOptions::default()).unwrap();
    assert_eq!(volume.status().open_generation, 4);
    drain(&mut volume);
    assert_eq!(volume.status().backup_generation, 3);
    volume.close().unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    for (generation, image) in images.iter().enumerate() {
        assert!(reader.read_image(generation as u64).unwrap() == *image, "generation {generation} differs");
    }
    assert!(reader.read_image(4).unwrap() == model);
}

#[test]
fn journal_full_blocks_until_the_sort_frees_space() {
    let shape = VolumeShape { host_write_size: UNIT, volume_blocks: VOLUME_BYTES / u64::from(UNIT) };
    let options = LayoutOptions::default();
    let sizes = [
        VOLUME_BYTES,
        layout::journal_bytes_for(&shape, &options, 100),
        VOLUME_BYTES,
        layout::recommended_history_bytes(&shape, &options) * 8,
    ];
    let names = ["base", "journal", "backup", "history"];
    let devices = Devices(std::array::from_fn(|i| {
        MemoryDevice::new(names[i], MemoryOptions::new(BLOCK, sizes[i].div_ceil(u64::from(BLOCK))))
    }));
    format(devices.channels(), &FormatOptions::default(), &mut |_| {}).unwrap();
    let mut volume = Volume::open(devices.channels(), VolumeOptions::default()).unwrap();
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut images = vec![model.clone()];
    // Generation 1 fits (80 units); generation 2 needs more than the space left until the
    // sort of generation 1 frees it.
    for (generation, count) in [(1u64, 80u64), (2, 90), (3, 60)] {
        for _ in 0..count {
            let unit = rng.random_range(0..VOLUME_BYTES / u64::from(UNIT));
            let mut data = vec![0u8; UNIT as usize];
            rng.fill_bytes(&mut data);
            write(&mut volume, &mut model, unit * u64::from(UNIT / BLOCK), data);
        }
        drain(&mut volume);
        let mut completions = Vec::new();
        volume.mark_and_wait(&format!("g{generation}"), &mut completions).unwrap();
        images.push(model.clone());
    }
    drain(&mut volume);
    assert!(volume.status().host.journal_full_waits > 0, "the test must exercise the wait");
    volume.close().unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    for (generation, image) in images.iter().enumerate() {
        assert!(reader.read_image(generation as u64).unwrap() == *image, "generation {generation} differs");
    }
}
