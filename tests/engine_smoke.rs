//! End-to-end scenarios of the engine on memory devices: format, write (aligned and widened),
//! mark, sort, reopen, and read every generation back against a model.

use std::sync::Arc;

use chronicle::core::format::layout::{self, LayoutOptions, VolumeShape};
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::{Channel, Device, DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{format, EngineError, FormatOptions, HostRequest, Volume, VolumeOptions};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BLOCK: u32 = 512;
const UNIT: u32 = 4096;
/// Blocks in one unit (the offsets of whole-unit writes).
const BLOCKS_PER_UNIT: u64 = (UNIT / BLOCK) as u64;
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

    /// Formats the four devices with the default options and opens the volume.
    fn format_and_open(&self, options: VolumeOptions) -> Volume {
        format(self.channels(), &FormatOptions::default(), &mut |_| {}).unwrap();
        Volume::open(self.channels(), options).unwrap()
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

/// `len` random bytes.
fn random_bytes(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

/// The default options without the automatic sort (the tests mark and sort themselves).
fn sort_by_hand() -> VolumeOptions {
    let mut options = VolumeOptions::default();
    options.sort.automatic = false;
    options
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
    let mut volume = devices.format_and_open(VolumeOptions::default());
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut images = vec![model.clone()];
    let device_blocks = VOLUME_BYTES / u64::from(BLOCK);
    for generation in 1..=4u64 {
        for _ in 0..200 {
            // Mixed sizes and alignments: whole units and partial units (read-modify-write).
            let blocks = rng.random_range(1..=24u64);
            let offset = rng.random_range(0..device_blocks - blocks);
            let data = random_bytes(&mut rng, (blocks * u64::from(BLOCK)) as usize);
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
    let options = sort_by_hand();
    let mut volume = devices.format_and_open(options.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut images = vec![model.clone()];
    for generation in 1..=3u64 {
        for _ in 0..300 {
            let unit = rng.random_range(0..VOLUME_BYTES / u64::from(UNIT));
            let data = random_bytes(&mut rng, UNIT as usize);
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
    let mut volume = devices.format_and_open(VolumeOptions::default());
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut images = vec![model.clone()];
    // Generation 1 fits (80 units); generation 2 needs more than the space left until the
    // sort of generation 1 frees it.
    for (generation, count) in [(1u64, 80u64), (2, 90), (3, 60)] {
        for _ in 0..count {
            let unit = rng.random_range(0..VOLUME_BYTES / u64::from(UNIT));
            let data = random_bytes(&mut rng, UNIT as usize);
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

#[test]
fn unmap_and_write_zeroes_are_journaled_into_generations() {
    let devices = Devices::new();
    let mut volume = devices.format_and_open(VolumeOptions::default());
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let data = random_bytes(&mut rng, VOLUME_BYTES as usize);
    write(&mut volume, &mut model, 0, data);
    drain(&mut volume);
    let mut completions = Vec::new();
    volume.mark_and_wait("full", &mut completions).unwrap();
    let full = model.clone();
    // Unmap 1.5 MiB from a partial unit onwards (chunks and read-modify-write), write-zeroes a
    // few blocks inside one unit.
    let device_blocks = VOLUME_BYTES / u64::from(BLOCK);
    let (unmap_start, unmap_blocks) = (3u64, device_blocks * 3 / 4);
    volume.submit(1, HostRequest::Unmap { offset_blocks: unmap_start, num_blocks: unmap_blocks });
    let start = (unmap_start * u64::from(BLOCK)) as usize;
    model[start..start + (unmap_blocks * u64::from(BLOCK)) as usize].fill(0);
    volume.submit(2, HostRequest::WriteZeroes { offset_blocks: device_blocks - 5, num_blocks: 2 });
    let start = ((device_blocks - 5) * u64::from(BLOCK)) as usize;
    model[start..start + 2 * BLOCK as usize].fill(0);
    drain(&mut volume);
    volume.mark_and_wait("zeroed", &mut completions).unwrap();
    drain(&mut volume);
    volume.close().unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    assert!(reader.read_image(1).unwrap() == full);
    assert!(reader.read_image(2).unwrap() == model, "the unmapped ranges read back as zeroes in generation 2");
}

#[test]
fn strict_mode_refuses_partial_units_and_changes_nothing() {
    let devices = Devices::new();
    let options = VolumeOptions { strict: true, ..VolumeOptions::default() };
    let mut volume = devices.format_and_open(options);
    volume.submit(
        7,
        HostRequest::Write { offset_blocks: 1, buffers: Arc::new(IoBuffers::single(DmaBuf::copy_from(&[9u8; 512]))) },
    );
    let mut completions = Vec::new();
    volume.run_until_idle(&mut completions);
    assert_eq!(completions.len(), 1);
    let error = completions[0].result.as_ref().unwrap_err().to_string();
    assert!(error.contains("not whole 4096-byte"), "{error}");
    assert_eq!(volume.status().journal_used_elements, 0);
    volume.close().unwrap();
    assert!(devices.0[0].snapshot().iter().all(|b| *b == 0), "the base is untouched");
}

#[test]
fn a_marker_comment_that_would_not_read_back_is_refused_and_the_volume_still_opens() {
    let devices = Devices::new();
    let mut volume = devices.format_and_open(VolumeOptions::default());
    let mut completions = Vec::new();
    // A NUL would end the zero-terminated comment field early: the catalog would not decode.
    let refused = volume.mark_and_wait("before\0after", &mut completions);
    assert!(refused.is_err(), "{refused:?}");
    let too_long = volume.mark_and_wait(&"x".repeat(200), &mut completions);
    assert!(too_long.is_err(), "{too_long:?}");
    assert_eq!(volume.mark_and_wait("fine", &mut completions).unwrap(), 1);
    volume.close().unwrap();
    let reopened = Volume::open(devices.channels(), VolumeOptions::default()).unwrap();
    assert_eq!(reopened.status().open_generation, 2);
}

/// A rewrite in the open generation does not checksum its data; the marker reads each
/// rewritten element back and does (FORMAT.md §9.1), and so does the volume while it is idle,
/// ahead of the marker. The sealed checksums must then match the elements: a reopen checks every
/// sealed element against them and the sort checks again.
#[test]
fn rewritten_elements_are_checksummed_by_the_marker_or_while_idle_and_the_sealed_checksums_hold() {
    let devices = Devices::new();
    let options = sort_by_hand();
    let mut volume = devices.format_and_open(options);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let random_unit = |rng: &mut ChaCha8Rng| random_bytes(rng, UNIT as usize);
    let mut first_data = Vec::new();
    for unit in 0..96u64 {
        let data = random_unit(&mut rng);
        first_data.push(data.clone());
        write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, data);
    }
    drain(&mut volume);
    assert_eq!(volume.status().checksums_pending, 0, "new elements are checksummed as they are written");
    // Rewrites submitted right before the marker: its hold starts before any of them runs, so
    // the volume is never idle and the marker checksums them all — 40 units (every other one
    // of the first 80, so reads break into runs) rewritten three times, and unit 90 with the
    // bytes it holds (its crc does not change).
    for _ in 0..3 {
        for unit in (0..80u64).step_by(2) {
            write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, random_unit(&mut rng));
        }
    }
    write(&mut volume, &mut model, 90 * BLOCKS_PER_UNIT, first_data[90].clone());
    let mut completions = Vec::new();
    assert_eq!(volume.mark_and_wait("g1", &mut completions).unwrap(), 1);
    assert!(completions.iter().all(|c| c.result.is_ok()));
    let status = volume.status();
    assert_eq!(status.checksums_pending, 0);
    assert_eq!(status.control.marker_checksum_reads, 41, "each rewritten element is read back once");
    assert_eq!(status.control.idle_checksum_reads, 0, "{status:?}");
    let image1 = model.clone();
    // Rewrites in generation 2 are pending until the volume is idle, which checksums them.
    for unit in [3u64, 4, 5] {
        write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, random_unit(&mut rng));
        write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, random_unit(&mut rng));
    }
    drain(&mut volume);
    let status = volume.status();
    assert_eq!(status.checksums_pending, 0, "{status:?}");
    assert_eq!(status.control.idle_checksum_reads, 3, "{status:?}");
    // Two more rewrites right before the next marker: it reads those two back.
    for unit in [3u64, 4] {
        write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, random_unit(&mut rng));
    }
    let mut completions = Vec::new();
    assert_eq!(volume.mark_and_wait("g2", &mut completions).unwrap(), 2);
    assert_eq!(volume.status().control.marker_checksum_reads, 41 + 2);
    let image2 = model.clone();
    write(&mut volume, &mut model, 8 * BLOCKS_PER_UNIT, random_unit(&mut rng));
    drain(&mut volume);
    drop(volume); // no close: as after a crash of the process

    // The reopen reads every element of sealed generations 1 and 2 and checks it against its crc.
    let mut volume = Volume::open(devices.channels(), VolumeOptions::default()).unwrap();
    let mut completions = Vec::new();
    assert_eq!(volume.mark_and_wait("g3", &mut completions).unwrap(), 3);
    drain(&mut volume);
    let status = volume.status();
    assert_eq!(status.backup_generation, 3, "the sort checked every generation's elements: {status:?}");
    assert!(status.sort_error.is_none(), "{status:?}");
    volume.close().unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    assert!(reader.read_image(1).unwrap() == image1, "generation 1 holds the last of each rewrite");
    assert!(reader.read_image(2).unwrap() == image2);
    assert!(reader.read_image(3).unwrap() == model);
    reader.verify().unwrap();
}

/// A host that submits its next write as soon as the last one completes (bdevperf on the
/// volume's own reactor) leaves nothing outstanding for a moment in every poll. That is not
/// idleness: the idle checksums wait until the host has been quiet for some polls in a row,
/// then run.
#[test]
fn idle_checksums_wait_for_a_quiet_host_not_a_gap_between_completion_and_resubmission() {
    let devices = Devices::new();
    let mut volume = devices.format_and_open(sort_by_hand());
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    for unit in 0..8u64 {
        write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, random_bytes(&mut rng, UNIT as usize));
    }
    drain(&mut volume);
    // Pending checksums: units 0 to 3 rewritten.
    for unit in 0..4u64 {
        write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, random_bytes(&mut rng, UNIT as usize));
    }
    let mut completions = Vec::new();
    while completions.len() < 4 {
        volume.poll(&mut completions);
    }
    for round in 0..300u64 {
        // Submitted right after the last completion, before the next poll, to a unit of its
        // own (whose checksum is pending then too).
        let unit = 4 + round % 4;
        write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, random_bytes(&mut rng, UNIT as usize));
        completions.clear();
        while completions.is_empty() {
            volume.poll(&mut completions);
        }
        assert!(completions.iter().all(|c| c.result.is_ok()));
    }
    let status = volume.status();
    assert_eq!(status.control.idle_checksum_reads, 0, "idle checksums ran under load: {status:?}");
    assert!(status.checksums_pending >= 4, "{status:?}");
    drain(&mut volume);
    let status = volume.status();
    assert_eq!(status.checksums_pending, 0, "a quiet host lets the idle checksums run: {status:?}");
    assert_eq!(status.control.idle_checksum_reads, 8, "{status:?}");
    let mut completions = Vec::new();
    assert_eq!(volume.mark_and_wait("g1", &mut completions).unwrap(), 1);
    assert_eq!(volume.status().control.marker_checksum_reads, 0, "nothing was left for the marker");
    volume.close().unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    assert!(reader.read_image(1).unwrap() == model);
    reader.verify().unwrap();
}

/// Past `marker_read_back_bytes`, rewrites checksum their data as they are written: the marker
/// reads back at most that much, and the sealed checksums still hold.
#[test]
fn rewrites_past_the_read_back_limit_are_checksummed_at_once() {
    let devices = Devices::new();
    let mut options = sort_by_hand();
    options.marker_read_back_bytes = 10 * u64::from(UNIT);
    let mut volume = devices.format_and_open(options);
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    for round in 0..4 {
        for unit in 0..64u64 {
            let data = random_bytes(&mut rng, UNIT as usize);
            write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, data);
        }
        if round == 0 {
            drain(&mut volume); // new elements; the rewrites below run under the marker's hold
        }
    }
    let mut completions = Vec::new();
    assert_eq!(volume.mark_and_wait("g1", &mut completions).unwrap(), 1);
    let status = volume.status();
    assert_eq!(status.control.marker_checksum_reads, 10, "the limit bounds the read-back: {status:?}");
    drop(volume);
    let mut volume = Volume::open(devices.channels(), VolumeOptions::default()).unwrap();
    drain(&mut volume);
    let status = volume.status();
    assert_eq!(status.backup_generation, 1, "open and sort checked every element: {status:?}");
    volume.close().unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    assert!(reader.read_image(1).unwrap() == model);
}

/// A whole-unit rewrite of a unit the open generation lists takes the short way (one small
/// record, journal element and base written at once); one that overlaps a write in flight, a
/// partial one and a two-unit one take the general way, and overlapping rewrites still finish
/// in submission order. Generation 1 then holds exactly the last of each.
#[test]
fn whole_unit_rewrites_take_the_short_way_and_overlapping_ones_wait_their_turn() {
    let devices = Devices::new();
    let options = sort_by_hand();
    let mut volume = devices.format_and_open(options);
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut random = |bytes: u32| random_bytes(&mut rng, bytes as usize);
    for unit in 0..8u64 {
        write(&mut volume, &mut model, unit * BLOCKS_PER_UNIT, random(UNIT));
    }
    drain(&mut volume);
    let status = volume.status();
    assert_eq!(status.host.rewrites_in_place, 0, "new units are allocated: {status:?}");

    // All submitted before any completes: unit 2 three times, units 3 and 4 once, one block
    // inside unit 5, units 6 and 7 in one write.
    for _ in 0..3 {
        write(&mut volume, &mut model, 2 * BLOCKS_PER_UNIT, random(UNIT));
    }
    write(&mut volume, &mut model, 3 * BLOCKS_PER_UNIT, random(UNIT));
    write(&mut volume, &mut model, 4 * BLOCKS_PER_UNIT, random(UNIT));
    write(&mut volume, &mut model, 5 * BLOCKS_PER_UNIT + 1, random(BLOCK));
    write(&mut volume, &mut model, 6 * BLOCKS_PER_UNIT, random(2 * UNIT));
    drain(&mut volume);
    let status = volume.status();
    assert_eq!(status.host.rewrites_in_place, 3, "unit 2's first rewrite, units 3 and 4: {status:?}");
    assert_eq!(status.host.overlap_waits, 2, "unit 2's second and third rewrites waited: {status:?}");
    assert_eq!(status.host.read_modify_writes, 1, "{status:?}");
    assert_eq!(status.host.host_writes, 8 + 7);

    let mut completions = Vec::new();
    assert_eq!(volume.mark_and_wait("g1", &mut completions).unwrap(), 1);
    drain(&mut volume);
    volume.close().unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    assert!(reader.read_image(1).unwrap() == model, "generation 1 holds the last write of each unit");
    assert!(reader.read_image(2).unwrap() == model, "the base (open generation 2's image) agrees");
    reader.verify().unwrap();
}

/// Submits a whole-unit write of random bytes at a random unit with tag `tag`, in the model too.
fn write_unit(volume: &mut Volume, model: &mut [u8], rng: &mut ChaCha8Rng, tag: u64) {
    let unit = rng.random_range(0..VOLUME_BYTES / u64::from(UNIT));
    let data = random_bytes(rng, UNIT as usize);
    let offset = unit * BLOCKS_PER_UNIT;
    let at = (offset * u64::from(BLOCK)) as usize;
    model[at..at + data.len()].copy_from_slice(&data);
    let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(&data)));
    volume.submit(tag, HostRequest::Write { offset_blocks: offset, buffers });
}

#[test]
fn devices_are_handed_over_to_new_channels_mid_flight_and_nothing_is_lost() {
    let devices = Devices::new();
    let mut volume = devices.format_and_open(VolumeOptions::default());
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut completions = Vec::new();
    let mut tag = 0;
    // Generation 1 sealed and sorting, generation 2 taking writes.
    for _ in 0..300 {
        tag += 1;
        write_unit(&mut volume, &mut model, &mut rng, tag);
    }
    volume.run_until_idle(&mut completions);
    // In flight on the memory channels' queues (nothing polled since), then the marker, then
    // writes that wait for it.
    for _ in 0..40 {
        tag += 1;
        write_unit(&mut volume, &mut model, &mut rng, tag);
    }
    let image_1 = model.clone();
    let marker = volume.mark("g1");
    for _ in 0..40 {
        tag += 1;
        write_unit(&mut volume, &mut model, &mut rng, tag);
    }
    volume.begin_handover().unwrap();
    assert!(!volume.handover_ready(), "operations are in flight on the channels");
    assert!(matches!(volume.release_channels(), Err(EngineError::Busy(_))));
    // Submitted during the hand-over: queued, in order, behind the ones before.
    for _ in 0..40 {
        tag += 1;
        write_unit(&mut volume, &mut model, &mut rng, tag);
    }
    let mut polls = 0;
    while !volume.handover_ready() {
        volume.poll(&mut completions);
        polls += 1;
        assert!(polls < 1000, "the hand-over drains");
    }
    let old = volume.release_channels().unwrap();
    assert_eq!(old.len(), 4);
    assert!(old.iter().all(|channel| channel.in_flight() == 0));
    drop(old);
    // Without channels nothing moves, and a write still queues.
    tag += 1;
    write_unit(&mut volume, &mut model, &mut rng, tag);
    let finished = completions.len();
    assert_eq!(volume.poll(&mut completions), 0);
    assert_eq!(completions.len(), finished, "nothing finishes without channels");
    assert!(finished < tag as usize, "writes wait for the new channels");
    volume.adopt_channels(devices.channels()).map_err(|(error, _)| error).unwrap();
    // Again while the sort of generation 1 runs (its record not yet committed).
    let mut polls = 0;
    let progress = loop {
        if let Some(sort) = volume.status().sort.filter(|sort| sort.elements_done > 0) {
            break sort;
        }
        volume.poll(&mut completions);
        polls += 1;
        assert!(polls < 100_000, "the sort starts");
    };
    assert_eq!(progress.generation, 1);
    assert_eq!(volume.status().backup_generation, 0, "the sort of generation 1 has not committed");
    volume.begin_handover().unwrap();
    while !volume.handover_ready() {
        volume.poll(&mut completions);
    }
    drop(volume.release_channels().unwrap());
    volume.adopt_channels(devices.channels()).map_err(|(error, _)| error).unwrap();
    volume.run_until_idle(&mut completions);
    assert_eq!(marker.result(), Some(Ok(1)), "the marker finished on the new channels");
    let mut tags: Vec<u64> = completions.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (1..=tag).collect::<Vec<_>>(), "every write completed once");
    assert!(completions.iter().all(|c| c.result.is_ok()));
    assert_eq!(volume.mark_and_wait("g2", &mut completions).unwrap(), 2);
    volume.run_until_idle(&mut completions);
    assert_eq!(volume.status().backup_generation, 2, "the sort went on after the hand-over");
    volume.close().unwrap();

    let reader = VolumeReader::open(devices.channels()).unwrap();
    assert!(reader.read_image(1).unwrap() == image_1, "generation 1 holds the writes before its marker");
    assert!(reader.read_image(2).unwrap() == model, "generation 2 holds every write after it");
    reader.verify().unwrap();
}

#[test]
fn a_hand_over_called_off_while_draining_goes_on_with_every_queued_write() {
    let devices = Devices::new();
    let mut volume = devices.format_and_open(sort_by_hand());
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut completions = Vec::new();
    assert!(matches!(volume.cancel_handover(), Err(EngineError::Busy(_))), "nothing to call off");
    for tag in 1..=20 {
        write_unit(&mut volume, &mut model, &mut rng, tag);
    }
    volume.begin_handover().unwrap();
    // Queued behind the twenty in flight, then the hand-over is called off mid-drain.
    for tag in 21..=40 {
        write_unit(&mut volume, &mut model, &mut rng, tag);
    }
    volume.poll(&mut completions);
    volume.cancel_handover().unwrap();
    assert!(!volume.handover_ready(), "no hand-over any more");
    volume.run_until_idle(&mut completions);
    let mut tags: Vec<u64> = completions.iter().map(|completion| completion.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (1..=40).collect::<Vec<u64>>(), "every write finished once");
    assert!(completions.iter().all(|completion| completion.result.is_ok()));
    // Once released, only adopting ends it.
    volume.begin_handover().unwrap();
    while !volume.handover_ready() {
        volume.poll(&mut completions);
    }
    drop(volume.release_channels().unwrap());
    assert!(matches!(volume.cancel_handover(), Err(EngineError::Busy(_))), "released: adopt instead");
    volume.adopt_channels(devices.channels()).map_err(|(error, _)| error).unwrap();
    assert_eq!(volume.mark_and_wait("g1", &mut completions).unwrap(), 1);
    volume.close().unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    assert!(reader.read_image(1).unwrap() == model);
}

#[test]
fn a_hand_over_out_of_order_or_to_other_devices_is_refused_and_changes_nothing() {
    let devices = Devices::new();
    let mut volume = devices.format_and_open(sort_by_hand());
    let mut completions = Vec::new();
    assert!(matches!(volume.release_channels(), Err(EngineError::Busy(_))), "no hand-over begun");
    let refused = volume.adopt_channels(devices.channels());
    assert!(matches!(&refused, Err((EngineError::Busy(_), channels)) if channels.len() == 4));
    volume.begin_handover().unwrap();
    assert!(matches!(volume.begin_handover(), Err(EngineError::Busy(_))));
    while !volume.handover_ready() {
        volume.poll(&mut completions);
    }
    drop(volume.release_channels().unwrap());
    assert!(matches!(volume.release_channels(), Err(EngineError::Busy(_))), "released once");
    // The base's and the journal's channels swapped, then one short: refused, given back.
    let mut swapped = devices.channels();
    swapped.swap(0, 1);
    match volume.adopt_channels(swapped) {
        Err((EngineError::Mismatch { role: "base", .. }, back)) => assert_eq!(back.len(), 4),
        other => panic!("expected a mismatch of the base, got {:?}", other.map_err(|(error, _)| error)),
    }
    let mut short = devices.channels();
    short.pop();
    assert!(matches!(volume.adopt_channels(short), Err((EngineError::Invalid(_), back)) if back.len() == 3));
    volume.adopt_channels(devices.channels()).map_err(|(error, _)| error).unwrap();
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    write_unit(&mut volume, &mut model, &mut rng, 1);
    drain(&mut volume);
    assert_eq!(volume.mark_and_wait("g1", &mut completions).unwrap(), 1);
    volume.close().unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    assert!(reader.read_image(1).unwrap() == model);
}
