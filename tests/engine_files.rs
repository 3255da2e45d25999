//! The engine on real files through io_uring (O_DIRECT), the way `chronicle` runs it: format,
//! write with markers, sort, close or crash (drop without close), reopen, and read every
//! generation back against a model. The memory-device versions are in `engine_smoke.rs`.
//!
//! Files live in `CHRONICLE_TEST_DIR` (default: the system's temporary directory).

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle::core::format::layout::{self, LayoutOptions, VolumeShape};
use chronicle::device::uring::{UringContext, UringContextOptions, UringDevice, UringOptions};
use chronicle::device::{Channel, Device, DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{format, FormatOptions, HostRequest, Volume, VolumeOptions};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const UNIT: u64 = 4096;
const VOLUME_BYTES: u64 = 8 << 20;
const UNITS: u64 = VOLUME_BYTES / UNIT;
const FILES: [&str; 4] = ["base.img", "journal.img", "backup.img", "history.img"];

fn test_dir() -> tempfile::TempDir {
    let base = std::env::var("CHRONICLE_TEST_DIR").map(Into::into).unwrap_or_else(|_| std::env::temp_dir());
    tempfile::Builder::new().prefix("chronicle-files-").tempdir_in(base).expect("temporary directory")
}

/// A volume directory on files with device blocks of `block_size` bytes.
struct Files {
    dir: tempfile::TempDir,
    block_size: u32,
}

impl Files {
    /// Creates and formats the four files: a journal that holds twice the volume's blocks (the
    /// tests keep several generations unsorted, and with the automatic sort off a full journal
    /// would hold writes until someone sorts) and a history large enough for every generation.
    fn format(block_size: u32) -> Files {
        Files::format_with_journal(block_size, 2 * UNITS)
    }

    fn format_with_journal(block_size: u32, journal_elements: u64) -> Files {
        let files = Files { dir: test_dir(), block_size };
        let shape = VolumeShape { host_write_size: UNIT as u32, volume_blocks: UNITS };
        let options = LayoutOptions::default();
        let sizes = [
            VOLUME_BYTES,
            layout::journal_bytes_for(&shape, &options, journal_elements),
            VOLUME_BYTES,
            layout::history_bytes_for(&shape, &options, 4 * UNITS),
        ]
        .map(|bytes| bytes.div_ceil(4096) * 4096);
        let options = FormatOptions {
            names: FILES.map(String::from),
            // Fresh files are zero on both sides: generation 0 is all zeros.
            copy_base_to_backup: false,
            ..Default::default()
        };
        format(files.channels_with(Some(sizes), false), &options, &mut |_| {}).expect("format");
        files
    }

    fn channels_with(&self, create: Option<[u64; 4]>, read_only: bool) -> Vec<Box<dyn Channel>> {
        let context = UringContext::new(&UringContextOptions {
            entries: 256,
            registered_buffer_count: 8,
            registered_buffer_size: 256 << 10,
        })
        .expect("io_uring context (is io_uring disabled? see /proc/sys/kernel/io_uring_disabled)");
        FILES
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let options = UringOptions {
                    block_size: Some(self.block_size),
                    direct: true,
                    allow_buffered: true,
                    create_size: create.map(|sizes| sizes[index]),
                    read_only,
                    queue_depth: 256,
                };
                let device = UringDevice::open(self.dir.path().join(name), &options, context.clone()).expect("open");
                device.open_channel().expect("channel")
            })
            .collect()
    }

    fn open(&self, options: VolumeOptions) -> Volume {
        Volume::open(self.channels_with(None, false), options).expect("open (recover) the volume")
    }

    fn reader(&self) -> VolumeReader {
        VolumeReader::open(self.channels_with(None, true)).expect("open the volume read-only")
    }

    fn device_blocks(&self) -> u64 {
        VOLUME_BYTES / u64::from(self.block_size)
    }

    fn hashes(&self) -> Vec<u64> {
        FILES.map(|name| xxhash_rust::xxh3::xxh3_64(&std::fs::read(self.dir.path().join(name)).expect("read"))).to_vec()
    }
}

/// What the host wrote: the current image and the image of every sealed generation.
struct Model {
    image: Vec<u8>,
    generations: Vec<Vec<u8>>,
    block_size: u64,
}

impl Model {
    fn new(block_size: u32) -> Model {
        let image = vec![0u8; VOLUME_BYTES as usize];
        Model { generations: vec![image.clone()], image, block_size: u64::from(block_size) }
    }

    /// Submits a write of `data` at device block `offset` and records it in the model. The
    /// engine keeps overlapping writes in submission order, so the model follows that order.
    fn write(&mut self, volume: &mut Volume, tag: u64, offset: u64, data: &[u8]) {
        let at = (offset * self.block_size) as usize;
        self.image[at..at + data.len()].copy_from_slice(data);
        volume.submit(
            tag,
            HostRequest::Write { offset_blocks: offset, buffers: Arc::new(IoBuffers::single(DmaBuf::copy_from(data))) },
        );
    }

    fn seal(&mut self) {
        self.generations.push(self.image.clone());
    }
}

/// Polls until idle; every host operation must have succeeded.
fn drain(volume: &mut Volume) {
    let mut completions = Vec::new();
    volume.run_until_idle(&mut completions);
    for completion in completions {
        completion.result.expect("host write succeeds");
    }
}

/// `count` writes of 1–`max_units` whole units at unit-aligned offsets, random data.
fn write_units(volume: &mut Volume, model: &mut Model, rng: &mut ChaCha8Rng, count: usize, max_units: u64) {
    let per_unit = UNIT / model.block_size;
    for tag in 0..count as u64 {
        let units = rng.random_range(1..=max_units);
        let first = rng.random_range(0..=UNITS - units);
        let mut data = vec![0u8; (units * UNIT) as usize];
        rng.fill_bytes(&mut data);
        model.write(volume, tag, first * per_unit, &data);
        if tag % 32 == 31 {
            // Keep a bounded number in flight, as a host would.
            drain(volume);
        }
    }
    drain(volume);
}

fn mark(volume: &mut Volume, model: &mut Model, comment: &str) -> u64 {
    let mut completions = Vec::new();
    let generation = volume.mark_and_wait(comment, &mut completions).expect("marker");
    assert!(completions.iter().all(|c| c.result.is_ok()));
    model.seal();
    generation
}

/// Every generation the model knows reads back exactly; the open one is the base.
#[track_caller]
fn assert_generations(files: &Files, model: &Model) {
    let reader = files.reader();
    for (generation, image) in model.generations.iter().enumerate() {
        let actual = reader.read_image(generation as u64).expect("read generation");
        assert!(
            actual == *image,
            "generation {generation} differs from the model ({})",
            first_difference(&actual, image)
        );
    }
    let open = reader.open_generation();
    assert_eq!(open, model.generations.len() as u64, "the open generation follows the sealed ones");
    let actual = reader.read_image(open).expect("read the open generation");
    assert!(actual == model.image, "the open generation (base) differs ({})", first_difference(&actual, &model.image));
    reader.verify().expect("every structure verifies");
}

fn first_difference(actual: &[u8], expected: &[u8]) -> String {
    match actual.iter().zip(expected).position(|(a, b)| a != b) {
        Some(at) => format!("first at byte {at}, unit {}", at as u64 / UNIT),
        None if actual.len() != expected.len() => format!("{} bytes instead of {}", actual.len(), expected.len()),
        None => "identical".into(),
    }
}

fn manual_sort() -> VolumeOptions {
    let mut options = VolumeOptions::default();
    options.sort.automatic = false;
    options
}

#[test]
fn generations_on_files_are_sorted_and_read_back_exactly() {
    let files = Files::format(4096);
    let mut volume = files.open(VolumeOptions::default());
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let mut model = Model::new(files.block_size);
    for generation in 1..=4u64 {
        // Mixed sizes: one to eight units per write, overlapping across writes.
        write_units(&mut volume, &mut model, &mut rng, 150, 8);
        assert_eq!(mark(&mut volume, &mut model, &format!("g{generation}")), generation);
    }
    // Writes into the open generation, rewrites of blocks it already holds among them.
    write_units(&mut volume, &mut model, &mut rng, 100, 2);
    drain(&mut volume);
    let status = volume.status();
    assert_eq!(status.backup_generation, 4, "the sort caught up: {status:?}");
    assert!(status.sort_error.is_none() && status.failed.is_none(), "{status:?}");
    assert!(status.host.index_commits > 0 && status.control.elements_sorted > 0, "{status:?}");
    volume.close().expect("close");
    assert_generations(&files, &model);
}

/// Device blocks of 512 bytes: writes that cover parts of 4 KiB units are widened by
/// read-modify-write, on O_DIRECT files as on memory.
#[test]
fn partial_unit_writes_on_512_byte_blocks_are_widened_exactly() {
    let files = Files::format(512);
    let mut volume = files.open(VolumeOptions::default());
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let mut model = Model::new(files.block_size);
    for generation in 1..=3u64 {
        for tag in 0..200u64 {
            let blocks = rng.random_range(1..=24u64);
            let offset = rng.random_range(0..=files.device_blocks() - blocks);
            let mut data = vec![0u8; (blocks * 512) as usize];
            rng.fill_bytes(&mut data);
            model.write(&mut volume, tag, offset, &data);
            if tag % 16 == 15 {
                drain(&mut volume);
            }
        }
        drain(&mut volume);
        mark(&mut volume, &mut model, &format!("g{generation}"));
    }
    drain(&mut volume);
    let status = volume.status();
    assert!(status.host.read_modify_writes > 0, "the test must exercise widening: {status:?}");
    assert_eq!(status.backup_generation, 3, "{status:?}");
    volume.close().expect("close");
    assert_generations(&files, &model);
}

/// Three sealed generations left unsorted and an open one, then the process "crashes" (the
/// volume is dropped without close) with writes in flight. Reopening recovers the sealed
/// generations exactly; each in-flight write's unit holds its old or its new data; every
/// acknowledged write is there.
#[test]
fn crash_without_close_recovers_sealed_and_open_generations() {
    let files = Files::format(4096);
    let mut volume = files.open(manual_sort());
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    let mut model = Model::new(files.block_size);
    for generation in 1..=3u64 {
        write_units(&mut volume, &mut model, &mut rng, 120, 4);
        mark(&mut volume, &mut model, &format!("g{generation}"));
    }
    write_units(&mut volume, &mut model, &mut rng, 80, 4);
    assert_eq!(volume.status().sealed_waiting, 3);

    // In flight at the crash: single-unit writes to distinct units, some acknowledged.
    let before_crash = model.image.clone();
    let mut in_flight: BTreeMap<u64, u64> = BTreeMap::new(); // tag -> unit
    let mut units: Vec<u64> = (0..UNITS).collect();
    for tag in 0..48u64 {
        let unit = units.swap_remove(rng.random_range(0..units.len()));
        let mut data = vec![0u8; UNIT as usize];
        rng.fill_bytes(&mut data);
        model.write(&mut volume, 1000 + tag, unit, &data);
        in_flight.insert(1000 + tag, unit);
    }
    let mut acknowledged = Vec::new();
    let mut completions = Vec::new();
    for _ in 0..20 {
        volume.poll(&mut completions);
    }
    for completion in completions.drain(..) {
        completion.result.expect("write succeeds");
        acknowledged.push(in_flight[&completion.tag]);
    }
    drop(volume); // no close: as after `kill -9`

    let mut volume = files.open(VolumeOptions::default());
    assert_eq!(volume.status().open_generation, 4);
    drain(&mut volume);
    assert_eq!(volume.status().backup_generation, 3);
    volume.close().expect("close");

    let reader = files.reader();
    for (generation, image) in model.generations.iter().enumerate() {
        let actual = reader.read_image(generation as u64).expect("read");
        assert!(actual == *image, "sealed generation {generation} differs ({})", first_difference(&actual, image));
    }
    let base = reader.read_image(4).expect("read the open generation");
    let unit_of = |image: &[u8], unit: u64| image[(unit * UNIT) as usize..((unit + 1) * UNIT) as usize].to_vec();
    let uncertain: Vec<u64> = in_flight.values().copied().collect();
    for unit in 0..UNITS {
        let found = unit_of(&base, unit);
        if uncertain.contains(&unit) {
            let (old, new) = (unit_of(&before_crash, unit), unit_of(&model.image, unit));
            assert!(
                found == old || found == new,
                "unit {unit} written at the crash holds neither its old nor new data"
            );
            if acknowledged.contains(&unit) {
                assert!(found == new, "unit {unit}: an acknowledged write is lost");
            }
        } else {
            assert!(found == unit_of(&model.image, unit), "unit {unit} differs after recovery");
        }
    }
    reader.verify().expect("verify");
}

/// Recovery writes only what it would write again: opening twice after a crash (each open
/// dropped at once, as if the process died right after recovery) leaves the same bytes in every
/// file and the same images, and the volume then sorts to the model.
#[test]
fn recovery_is_idempotent() {
    let files = Files::format(4096);
    let mut volume = files.open(manual_sort());
    let mut rng = ChaCha8Rng::seed_from_u64(34);
    let mut model = Model::new(files.block_size);
    for generation in 1..=2u64 {
        write_units(&mut volume, &mut model, &mut rng, 100, 4);
        mark(&mut volume, &mut model, &format!("g{generation}"));
    }
    write_units(&mut volume, &mut model, &mut rng, 150, 4);
    drop(volume);

    drop(files.open(manual_sort()));
    let after_first = files.hashes();
    let images_first: Vec<Vec<u8>> = {
        let reader = files.reader();
        (0..=3).map(|g| reader.read_image(g).expect("read")).collect()
    };
    drop(files.open(manual_sort()));
    assert_eq!(files.hashes(), after_first, "a second recovery changed the files");
    let reader = files.reader();
    for (generation, image) in images_first.iter().enumerate() {
        assert!(reader.read_image(generation as u64).expect("read") == *image, "generation {generation} changed");
    }
    drop(reader);

    let mut volume = files.open(VolumeOptions::default());
    drain(&mut volume);
    assert_eq!(volume.status().backup_generation, 2);
    volume.close().expect("close");
    assert_generations(&files, &model);
}

/// The sort is interrupted by crashes at several points of its progress (small batches, so
/// that each crash falls between or inside batches), resumes from its cursor each time, and the
/// backup and history still hold exactly the model's generations.
#[test]
fn sort_interrupted_by_crashes_resumes_exactly() {
    let files = Files::format(4096);
    let mut volume = files.open(manual_sort());
    let mut rng = ChaCha8Rng::seed_from_u64(35);
    let mut model = Model::new(files.block_size);
    for generation in 1..=3u64 {
        write_units(&mut volume, &mut model, &mut rng, 150, 4);
        mark(&mut volume, &mut model, &format!("g{generation}"));
    }
    write_units(&mut volume, &mut model, &mut rng, 40, 1);
    drop(volume);

    let mut options = VolumeOptions::default();
    options.sort.batch_elements = 16;
    options.sort.max_in_flight = 8;
    let mut crashes = 0;
    for crash_at in [10u64, 150, 301, 40, 5000] {
        let mut volume = files.open(options.clone());
        let mut completions = Vec::new();
        // Poll until the sort has done `crash_at` elements of some generation, then crash.
        loop {
            volume.poll(&mut completions);
            let status = volume.status();
            assert!(status.sort_error.is_none(), "{status:?}");
            if status.sort.as_ref().is_some_and(|s| s.elements_done >= crash_at.min(s.elements_total)) {
                break;
            }
            if volume.is_idle() {
                break;
            }
        }
        let idle = volume.is_idle();
        drop(volume);
        if idle {
            break;
        }
        crashes += 1;
    }
    assert!(crashes >= 3, "the sort must be interrupted several times (was {crashes})");
    let mut volume = files.open(VolumeOptions::default());
    drain(&mut volume);
    let status = volume.status();
    assert_eq!(status.backup_generation, 3, "{status:?}");
    volume.close().expect("close");
    assert_generations(&files, &model);
}

/// With the automatic sort off, a write that finds the journal full must still complete (with
/// a no-space error, as when the sort has stopped): nothing will free space unless the host
/// calls `sort_now`, and until then `run_until_idle` and `close` never return.
#[test]
fn journal_full_with_the_sort_off_fails_writes_instead_of_hanging() {
    let files = Files::format_with_journal(4096, 128);
    let mut volume = files.open(manual_sort());
    let mut model = Model::new(files.block_size);
    let data = vec![7u8; UNIT as usize];
    for unit in 0..100 {
        model.write(&mut volume, unit, unit, &data);
    }
    drain(&mut volume);
    mark(&mut volume, &mut model, "g1");
    // 100 more new elements do not fit in the 28 left.
    for unit in 100..200 {
        model.write(&mut volume, unit, unit, &data);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut completions = Vec::new();
    while completions.len() < 100 && std::time::Instant::now() < deadline {
        volume.poll(&mut completions);
    }
    let status = volume.status();
    assert_eq!(completions.len(), 100, "writes still waiting for journal space after 3 s: {status:?}");
    volume.sort_now();
    drain(&mut volume);
    volume.close().expect("close");
}

/// Superblock copies: FORMAT.md §6 keeps two, so that one bad sector at byte 0 does not lose
/// the volume.
#[test]
fn format_writes_both_superblock_copies() {
    let files = Files::format(4096);
    for name in ["journal.img", "history.img"] {
        let bytes = std::fs::read(files.dir.path().join(name)).expect("read");
        assert!(bytes[4096..8192].iter().any(|b| *b != 0), "{name}: superblock copy 1 is empty");
        assert_eq!(bytes[..4096], bytes[4096..8192], "{name}: the copies differ after format");
    }
}
