//! Journal-full policy bitmap-only (seed 001 FIG 36): with the journal full, writes go on to
//! the base only, tracked by a durable bitmap; a marker brings them into the journal (waiting
//! for the sort) or is refused with the numbers; every generation restores exactly and no
//! acknowledged write is lost at any power cut, recovery included.

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle::core::format::layout::{self, LayoutOptions, VolumeShape};
use chronicle::core::format::superblock::{Durability, JournalFullPolicy};
use chronicle::device::fault::{FaultController, FaultDevice};
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::{Channel, Device, DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{format, FormatOptions, HostCompletion, HostRequest, SortOptions, Volume, VolumeOptions};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod support;

use support::memory::{Devices, UNIT, UNITS};

const BLOCKS_PER_UNIT: u64 = (UNIT / 512) as u64;

fn bitmap_layout() -> LayoutOptions {
    LayoutOptions { open_bitmap: true, ..LayoutOptions::default() }
}

fn format_options(durability: Durability) -> FormatOptions {
    FormatOptions {
        journal_full_policy: JournalFullPolicy::BitmapOnly,
        durability,
        copy_base_to_backup: false,
        ..Default::default()
    }
}

fn manual_sort() -> VolumeOptions {
    VolumeOptions {
        sort: SortOptions { batch_elements: 8, max_in_flight: 4, rate_limit_bytes_per_second: None, automatic: false },
        ..VolumeOptions::default()
    }
}

fn write_unit(volume: &mut Volume, tag: u64, unit: u64, data: &[u8]) {
    let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(data)));
    volume.submit(tag, HostRequest::Write { offset_blocks: unit * BLOCKS_PER_UNIT, buffers });
}

/// Writes each unit once (one at a time), recording it in `image`; every write must succeed.
fn write_units(volume: &mut Volume, rng: &mut ChaCha8Rng, image: &mut [u8], units: impl Iterator<Item = u64>) {
    let mut completions: Vec<HostCompletion> = Vec::new();
    for unit in units {
        let mut data = vec![0u8; UNIT];
        rng.fill_bytes(&mut data);
        image[unit as usize * UNIT..][..UNIT].copy_from_slice(&data);
        write_unit(volume, unit, unit, &data);
        volume.run_until_idle(&mut completions);
        for completion in completions.drain(..) {
            completion.result.expect("a write with the journal full still succeeds (bitmap-only)");
        }
    }
}

#[test]
fn a_full_journal_tracks_writes_by_bitmap_and_a_marker_brings_them_into_the_journal() {
    let devices = Devices::sized_with(64, 40 * UNITS, bitmap_layout());
    format(devices.channels(), &format_options(Durability::Flush), &mut |_| {}).unwrap();
    let mut volume = Volume::open(devices.channels(), manual_sort()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut current = vec![0u8; UNITS as usize * UNIT];
    let mut images = BTreeMap::from([(0u64, current.clone())]);
    let mut completions = Vec::new();
    let capacity = volume.status().journal_capacity_elements;
    assert!(capacity >= 60, "a journal of about 64 elements ({capacity})");

    // Generation 1 takes 40 elements; with the sort off they stay.
    write_units(&mut volume, &mut rng, &mut current, 0..40);
    assert_eq!(volume.mark_and_wait("one", &mut completions).unwrap(), 1);
    images.insert(1, current.clone());

    // Generation 2 writes 44 blocks: those beyond the free journal go to the base only.
    write_units(&mut volume, &mut rng, &mut current, 20..64);
    let status = volume.status();
    let tracked = 44 - (capacity - 40);
    assert_eq!(status.journal_full_mode, "bitmap-only");
    assert_eq!(status.bitmap_tracked_blocks, tracked);
    assert_eq!(status.journal_used_elements, capacity);
    let counters = status.bitmap.clone().expect("a bitmap-only volume reports its counters");
    assert_eq!(counters.bitmap_writes, tracked);
    assert!(counters.bitmap_commits >= 1 && counters.bitmap_pages_written >= counters.bitmap_commits);
    // Rewrites of tracked and of journaled blocks go on.
    write_units(&mut volume, &mut rng, &mut current, [63, 62, 20, 21].into_iter());
    assert_eq!(volume.status().bitmap_tracked_blocks, tracked);

    // With the sort off nothing can free the journal: the marker is refused with the numbers
    // and the generation stays open, writes still taken.
    let refused = volume.mark_and_wait("two, too early", &mut completions).unwrap_err().to_string();
    assert!(refused.contains("cannot be sealed") && refused.contains(&format!("{tracked} of its blocks")), "{refused}");
    let status = volume.status();
    assert_eq!(status.open_generation, 2);
    assert_eq!(status.bitmap.as_ref().unwrap().bitmap_markers_refused, 1);
    write_units(&mut volume, &mut rng, &mut current, [50].into_iter());

    // With the sort on, the marker waits for it to free generation 1, the tracked blocks come
    // into the journal, and generation 2 is sealed whole.
    volume.sort_now();
    assert_eq!(volume.mark_and_wait("two", &mut completions).unwrap(), 2);
    images.insert(2, current.clone());
    let status = volume.status();
    assert_eq!(status.journal_full_mode, "journaling");
    assert_eq!(status.bitmap_tracked_blocks, 0);
    assert!(status.bitmap.as_ref().unwrap().bitmap_resynced_blocks >= tracked);

    write_units(&mut volume, &mut rng, &mut current, 0..10);
    assert_eq!(volume.mark_and_wait("three", &mut completions).unwrap(), 3);
    images.insert(3, current.clone());
    volume.run_until_idle(&mut completions);
    volume.close().unwrap();

    let reader = VolumeReader::open(devices.channels()).unwrap();
    for (generation, image) in &images {
        assert!(reader.read_image(*generation).unwrap() == *image, "generation {generation} restores exactly");
    }
}

#[test]
fn the_mode_switches_back_to_journaling_when_the_sort_frees_space() {
    let devices = Devices::sized_with(64, 40 * UNITS, bitmap_layout());
    format(devices.channels(), &format_options(Durability::Flush), &mut |_| {}).unwrap();
    let mut volume = Volume::open(devices.channels(), manual_sort()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut current = vec![0u8; UNITS as usize * UNIT];
    let mut completions = Vec::new();
    write_units(&mut volume, &mut rng, &mut current, 0..50);
    volume.mark_and_wait("one", &mut completions).unwrap();
    write_units(&mut volume, &mut rng, &mut current, 10..40);
    let tracked = volume.status().bitmap_tracked_blocks;
    assert!(tracked > 10, "{tracked} blocks tracked");
    // No marker: the sort's freed space alone brings the blocks into the journal.
    volume.sort_now();
    volume.run_until_idle(&mut completions);
    let status = volume.status();
    assert_eq!((status.journal_full_mode, status.bitmap_tracked_blocks), ("journaling", 0));
    assert_eq!(status.bitmap.unwrap().bitmap_resynced_blocks, tracked);
    assert_eq!(status.generations.last().unwrap().blocks, 30, "the open generation lists its 30 blocks");
    volume.close().unwrap();
}

/// Four memory devices behind fault devices with volatile write caches.
struct Media {
    devices: [Arc<MemoryDevice>; 4],
}

impl Media {
    fn new() -> Self {
        let shape = VolumeShape { host_write_size: UNIT as u32, volume_blocks: UNITS };
        let sizes = [
            UNITS * UNIT as u64,
            layout::journal_bytes_for(&shape, &bitmap_layout(), 64),
            UNITS * UNIT as u64,
            layout::history_bytes_for(&shape, &bitmap_layout(), 40 * UNITS),
        ];
        let names = ["base", "journal", "backup", "history"];
        Media {
            devices: std::array::from_fn(|i| {
                Arc::new(MemoryDevice::new(names[i], MemoryOptions::new(512, sizes[i] / 512)))
            }),
        }
    }

    fn plain(&self) -> Vec<Box<dyn Channel>> {
        self.devices.iter().map(|d| d.open_channel().unwrap()).collect()
    }

    fn faulty(&self, seed: u64) -> (Vec<Box<dyn Channel>>, Vec<FaultController>) {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, device)| {
                let inner: Arc<dyn Device> = device.clone();
                let (fault, controller) = FaultDevice::new(inner, seed.wrapping_mul(4).wrapping_add(i as u64));
                (fault.open_channel().unwrap(), controller)
            })
            .unzip()
    }
}

/// One write of the scenario: unit, data, and whether it was acknowledged before the cut.
struct Written {
    unit: u64,
    data: Vec<u8>,
    acked: bool,
}

/// The scenario, cut after `cut_at` polls (never, if it ends first).
struct Run {
    volume: Volume,
    polls: u64,
    cut_at: u64,
    rng: ChaCha8Rng,
    current: Vec<u8>,
    writes: Vec<Written>,
    /// Sealed images by generation, and the image a marker in flight at the cut would seal.
    images: BTreeMap<u64, Vec<u8>>,
    marker_in_flight: Option<(u64, Vec<u8>)>,
}

struct Cut;

impl Run {
    fn poll(&mut self) -> Result<(), Cut> {
        if self.polls == self.cut_at {
            return Err(Cut);
        }
        self.polls += 1;
        let mut completions = Vec::new();
        self.volume.poll(&mut completions);
        for completion in completions {
            completion.result.expect("writes succeed with the journal full (bitmap-only)");
            self.writes[completion.tag as usize].acked = true;
        }
        Ok(())
    }

    /// Writes random data to `units`, eight in flight, and waits for them.
    fn write(&mut self, units: &[u64]) -> Result<(), Cut> {
        for chunk in units.chunks(8) {
            for unit in chunk {
                let mut data = vec![0u8; UNIT];
                self.rng.fill_bytes(&mut data);
                self.current[*unit as usize * UNIT..][..UNIT].copy_from_slice(&data);
                write_unit(&mut self.volume, self.writes.len() as u64, *unit, &data);
                self.writes.push(Written { unit: *unit, data, acked: false });
            }
            while self.writes.iter().any(|w| !w.acked) {
                self.poll()?;
            }
        }
        Ok(())
    }

    fn mark(&mut self, generation: u64) -> Result<(), Cut> {
        let handle = self.volume.mark(&format!("g{generation}"));
        self.marker_in_flight = Some((generation, self.current.clone()));
        loop {
            if let Some(result) = handle.result() {
                assert_eq!(result.expect("the marker seals"), generation);
                self.images.insert(generation, self.current.clone());
                self.marker_in_flight = None;
                return Ok(());
            }
            self.poll()?;
        }
    }

    /// Journal full (sort off), writes tracked by the bitmap, then the sort on and markers
    /// that bring them into the journal.
    fn scenario(&mut self) -> Result<(), Cut> {
        let first: Vec<u64> = (0..40).collect();
        self.write(&first)?;
        self.mark(1)?;
        let second: Vec<u64> = (0..44).map(|_| self.rng.random_range(0..UNITS)).collect();
        self.write(&second)?;
        self.volume.sort_now();
        let third: Vec<u64> = (0..24).map(|_| self.rng.random_range(0..UNITS)).collect();
        self.write(&third)?;
        self.mark(2)?;
        let fourth: Vec<u64> = (0..30).map(|_| self.rng.random_range(0..UNITS)).collect();
        self.write(&fourth)?;
        self.mark(3)?;
        while !self.volume.is_idle() {
            self.poll()?;
        }
        Ok(())
    }
}

fn run_to(cut_at: u64) -> (Media, Run) {
    let media = Media::new();
    format(media.plain(), &format_options(Durability::WriteThrough), &mut |_| {}).unwrap();
    let (channels, controllers) = media.faulty(cut_at);
    let zero = vec![0u8; UNITS as usize * UNIT];
    let mut run = Run {
        volume: Volume::open(channels, manual_sort()).unwrap(),
        polls: 0,
        cut_at,
        rng: ChaCha8Rng::seed_from_u64(11),
        current: zero.clone(),
        writes: Vec::new(),
        images: BTreeMap::from([(0, zero)]),
        marker_in_flight: None,
    };
    let _ = run.scenario();
    for controller in &controllers {
        controller.power_cut();
    }
    for controller in &controllers {
        controller.settle().unwrap();
    }
    (media, run)
}

/// Power is cut at points spread over the whole scenario (bitmap writes and commits, the
/// resync, the marker waiting for it, the sort), then again during the recovery: every
/// acknowledged write is in the base (write-through), every sealed generation is exact, and
/// the recovered open generation — bitmap-tracked blocks included — seals exactly.
#[test]
fn power_cuts_in_bitmap_mode_lose_no_acknowledged_write_and_keep_generations_exact() {
    let total = run_to(u64::MAX).1.polls;
    let points = 150;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut tracked_at_cut = 0;
    for point in 0..points {
        let cut_at = total * point / points + rng.random_range(0..total / points);
        let (media, run) = run_to(cut_at);
        // A cut during recovery first, sometimes.
        if point % 3 == 0 {
            let (channels, controllers) = media.faulty(cut_at ^ 0xF00D);
            let mut opening = Volume::begin_open(channels, manual_sort());
            for _ in 0..rng.random_range(1..30) {
                if opening.poll().is_ready() {
                    break;
                }
            }
            drop(opening);
            controllers.iter().for_each(|c| c.power_cut());
            controllers.iter().for_each(|c| c.settle().unwrap());
        }
        let mut volume = Volume::open(media.plain(), manual_sort()).unwrap();
        let status = volume.status();
        tracked_at_cut += u64::from(status.bitmap_tracked_blocks > 0);
        let here = format!("cut after {cut_at} of {total} polls");

        // Write-through: an acknowledged write is durable; a later one may have landed too
        // (torn at device-block granularity, like a real disk).
        let base = media.devices[0].read_blocks(0, UNITS * BLOCKS_PER_UNIT);
        for block in 0..(UNITS * BLOCKS_PER_UNIT) as usize {
            let unit = block as u64 / BLOCKS_PER_UNIT;
            let at = block % BLOCKS_PER_UNIT as usize * 512;
            let touching: Vec<&Written> = run.writes.iter().filter(|w| w.unit == unit).collect();
            let actual = &base[block * 512..][..512];
            let holds = |w: &&Written| &w.data[at..at + 512] == actual;
            let allowed = match touching.iter().rposition(|w| w.acked) {
                Some(floor) => touching[floor..].iter().any(holds),
                None => actual.iter().all(|b| *b == 0) || touching.iter().any(holds),
            };
            assert!(allowed, "{here}: device block {block} (unit {unit}) lost an acknowledged write");
        }
        let mut images = run.images.clone();
        if let Some((generation, image)) = &run.marker_in_flight {
            if status.open_generation > *generation {
                images.insert(*generation, image.clone());
            }
        }
        assert_eq!(status.open_generation, images.len() as u64, "{here}");

        // The recovered open generation (tracked blocks and all) seals as the base is now.
        volume.sort_now();
        let mut completions = Vec::new();
        let sealed = volume.mark_and_wait("after the cut", &mut completions).expect("the marker seals after recovery");
        volume.run_until_idle(&mut completions);
        assert_eq!(volume.status().bitmap_tracked_blocks, 0);
        volume.close().unwrap();
        images.insert(sealed, media.devices[0].read_blocks(0, UNITS * BLOCKS_PER_UNIT));

        let reader = VolumeReader::open(media.plain()).unwrap();
        for (generation, image) in &images {
            assert!(reader.read_image(*generation).unwrap() == *image, "{here}: generation {generation} is exact");
        }
    }
    assert!(tracked_at_cut >= points / 8, "cuts found blocks tracked by the bitmap ({tracked_at_cut} of {points})");
}

/// "All" mode keeps every write's version, which base-only writes would not: the combination
/// is refused at format with nothing written.
#[test]
fn bitmap_only_with_the_all_journal_mode_is_refused() {
    let devices = Devices::sized_with(64, 40 * UNITS, bitmap_layout());
    let options = FormatOptions {
        journal_mode: chronicle::core::format::superblock::JournalMode::All,
        ..format_options(Durability::Flush)
    };
    let error = format(devices.channels(), &options, &mut |_| {}).unwrap_err().to_string();
    assert!(error.contains("bitmap-only") && error.contains("\"all\""), "{error}");
    assert!(Volume::open(devices.channels(), manual_sort()).is_err(), "nothing was formatted");
}
