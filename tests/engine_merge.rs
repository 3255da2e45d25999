//! History maintenance on memory devices, against a model of every generation's image:
//! merge (seed 001 FIG 11/12: the older element wins, image(N) stays, N+1..N+m are given up),
//! deletion of generations, and the retention policy (keep the last K, merge the older ones,
//! drop beyond a count) — each checked again after a reopen.

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle::device::{DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{format, FormatOptions, HostRequest, RetentionPolicy, Volume, VolumeOptions};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod support;

use support::memory::{Devices, UNIT, UNITS};

/// A volume and the image of every generation it sealed.
struct Scenario {
    devices: Devices,
    volume: Volume,
    current: Vec<u8>,
    images: BTreeMap<u64, Vec<u8>>,
    rng: ChaCha8Rng,
    /// What the volume is opened with, also when a check reopens it.
    options: VolumeOptions,
}

impl Scenario {
    fn new(seed: u64, options: VolumeOptions) -> Self {
        let devices = Devices::new();
        format(devices.channels(), &FormatOptions { copy_base_to_backup: false, ..Default::default() }, &mut |_| {})
            .unwrap();
        let volume = Volume::open(devices.channels(), options.clone()).unwrap();
        let zero = vec![0u8; UNITS as usize * UNIT];
        Scenario {
            devices,
            volume,
            current: zero.clone(),
            images: BTreeMap::from([(0, zero)]),
            rng: ChaCha8Rng::seed_from_u64(seed),
            options,
        }
    }

    /// Writes `units` random units out of the first `span` (overlap between generations grows
    /// as `span` shrinks), then marks a generation.
    fn generation(&mut self, units: usize, span: u64) -> u64 {
        self.generation_of(units, span, |rng| {
            let mut data = vec![0u8; UNIT];
            rng.fill_bytes(&mut data);
            data
        })
    }

    /// Writes `units` units out of the first `span`, each with one of `pool` contents (so
    /// equal contents sit at many blocks and in many generations), then marks a generation.
    fn generation_from_pool(&mut self, units: usize, span: u64, pool: &[Vec<u8>]) -> u64 {
        self.generation_of(units, span, |rng| pool[rng.random_range(0..pool.len())].clone())
    }

    /// Writes `units` units out of the first `span` with the contents `content` makes, then
    /// marks a generation and records its image.
    fn generation_of(&mut self, units: usize, span: u64, mut content: impl FnMut(&mut ChaCha8Rng) -> Vec<u8>) -> u64 {
        let mut completions = Vec::new();
        for tag in 0..units as u64 {
            let unit = self.rng.random_range(0..span);
            let data = content(&mut self.rng);
            self.current[unit as usize * UNIT..(unit as usize + 1) * UNIT].copy_from_slice(&data);
            let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(&data)));
            self.volume.submit(tag, HostRequest::Write { offset_blocks: unit * (UNIT as u64 / 512), buffers });
            self.volume.run_until_idle(&mut completions);
        }
        assert!(completions.iter().all(|c| c.result.is_ok()), "writes succeed");
        let generation = self.volume.mark_and_wait("g", &mut completions).unwrap();
        self.images.insert(generation, self.current.clone());
        self.volume.run_until_idle(&mut completions);
        generation
    }

    fn records(&self) -> Vec<(u64, u64, &'static str)> {
        self.volume
            .status()
            .generations
            .iter()
            .filter(|g| g.state == "history" || g.state == "merged")
            .map(|g| (g.generation, g.through_generation, g.state))
            .collect()
    }

    fn history_units(&self) -> u64 {
        self.volume.status().history_used_units
    }

    /// Every generation of the model reads back exactly, and every other one is refused;
    /// the same after a reopen.
    fn check(mut self, gone: &[u64]) -> Self {
        for pass in 0..2 {
            let reader = VolumeReader::open(self.devices.channels()).unwrap();
            for (generation, image) in &self.images {
                assert!(reader.source(*generation).is_some(), "pass {pass}: generation {generation} is restorable");
                assert!(
                    reader.read_image(*generation).unwrap() == *image,
                    "pass {pass}: generation {generation} is exact"
                );
            }
            for generation in gone {
                assert!(reader.source(*generation).is_none(), "pass {pass}: generation {generation} was given up");
                assert!(reader.read_image(*generation).is_err());
            }
            drop(reader);
            if pass == 0 {
                let options = self.options.clone();
                self.volume.close_in_place();
                self.volume = Volume::open(self.devices.channels(), options).unwrap();
            }
        }
        self
    }
}

trait CloseInPlace {
    fn close_in_place(&mut self);
}

impl CloseInPlace for Volume {
    /// Flushes everything so a reader sees the media as the volume left them.
    fn close_in_place(&mut self) {
        let mut completions = Vec::new();
        self.run_until_idle(&mut completions);
        self.begin_close();
        while self.poll_close(&mut completions).is_pending() {}
    }
}

#[test]
fn merge_keeps_the_oldest_image_gives_up_the_ones_between_and_frees_the_overlap() {
    let mut s = Scenario::new(1, VolumeOptions::default());
    for _ in 0..6 {
        s.generation(40, 24);
    }
    // Generations 0..5 are history records, 6 is the backup's.
    assert_eq!(s.records().len(), 6, "{:?}", s.records());
    let before = s.history_units();
    let mut completions = Vec::new();
    let handle = s.volume.merge(1, 3);
    let report = s.volume.wait_maintenance(&handle, &mut completions).unwrap();
    assert_eq!((report.generation, report.through_generation, report.records), (1, 3, 3));
    assert!(report.units_after < report.units_before, "overlapping records merge smaller: {report:?}");
    assert_eq!(s.history_units(), before - (report.units_before - report.units_after));
    assert_eq!(s.records(), vec![(0, 0, "history"), (1, 3, "merged"), (4, 4, "history"), (5, 5, "history")]);
    s.images.remove(&2);
    s.images.remove(&3);
    let mut s = s.check(&[2, 3]);

    // A merged record merges again, with the records next to it.
    let handle = s.volume.merge(0, 4);
    s.volume.wait_maintenance(&handle, &mut completions).unwrap();
    assert_eq!(s.records(), vec![(0, 4, "merged"), (5, 5, "history")]);
    for generation in 1..=4 {
        s.images.remove(&generation);
    }
    s.check(&[1, 2, 3, 4]);
}

#[test]
fn deleting_a_generation_drops_the_oldest_or_merges_into_the_one_before() {
    let mut s = Scenario::new(2, VolumeOptions::default());
    for _ in 0..5 {
        s.generation(30, 40);
    }
    let mut completions = Vec::new();
    // The oldest: dropped, its space freed.
    let before = s.history_units();
    let handle = s.volume.delete_generation(0);
    let report = s.volume.wait_maintenance(&handle, &mut completions).unwrap();
    assert_eq!(report.units_after, 0);
    assert_eq!(s.history_units(), before - report.units_before);
    s.images.remove(&0);
    // A younger one: merged into the one before (which stays restorable).
    let handle = s.volume.delete_generation(3);
    s.volume.wait_maintenance(&handle, &mut completions).unwrap();
    s.images.remove(&3);
    assert_eq!(s.records(), vec![(1, 1, "history"), (2, 3, "merged"), (4, 4, "history")]);
    let mut s = s.check(&[0, 3]);

    // What cannot be done is refused, and nothing changes.
    let records = s.records();
    for (generation, why) in
        [(3, "not a restorable generation"), (5, "not in the history yet"), (99, "not in the history yet")]
    {
        let handle = s.volume.delete_generation(generation);
        let error = s.volume.wait_maintenance(&handle, &mut completions).unwrap_err().to_string();
        assert!(error.contains(why), "delete {generation}: {error}");
    }
    for (from, through, why) in
        [(1, 1, "nothing to merge"), (3, 4, "no history record starts"), (1, 9, "no history record ends")]
    {
        let handle = s.volume.merge(from, through);
        let error = s.volume.wait_maintenance(&handle, &mut completions).unwrap_err().to_string();
        assert!(error.contains(why), "merge {from}..{through}: {error}");
    }
    assert_eq!(s.records(), records);
    s.check(&[0, 3]);
}

#[test]
fn retention_keeps_the_last_records_merges_the_older_and_drops_beyond_the_count() {
    let policy = RetentionPolicy { keep_last: Some(2), merge_older: true, ..RetentionPolicy::default() };
    let mut s = Scenario::new(3, VolumeOptions { retention: policy, ..VolumeOptions::default() });
    for _ in 0..7 {
        s.generation(20, 30);
    }
    // Records 0..6: the two newest kept, the older ones merged into one after every sort.
    assert_eq!(s.records(), vec![(0, 4, "merged"), (5, 5, "history"), (6, 6, "history")]);
    for generation in 1..=4 {
        s.images.remove(&generation);
    }
    let mut s = s.check(&[1, 2, 3, 4]);
    assert_eq!(s.volume.status().retention_error, None);

    // A count limit drops the oldest record (the merged one) as soon as it is set.
    s.volume.set_retention(RetentionPolicy { max_generations: Some(2), ..RetentionPolicy::default() });
    let mut completions = Vec::new();
    s.volume.run_until_idle(&mut completions);
    while s.records().len() > 2 {
        s.volume.poll(&mut completions);
    }
    assert_eq!(s.records(), vec![(5, 5, "history"), (6, 6, "history")]);
    s.images.remove(&0);
    s.check(&[0, 1, 2, 3, 4]);
}

#[test]
fn journal_full_policy_merge_oldest_gives_up_old_generations_instead_of_stopping_the_sort() {
    use chronicle::core::format::superblock::JournalFullPolicy;
    // A history for about three generations that write half the volume each.
    let devices = Devices::sized(2 * UNITS, 3 * UNITS / 2 + 8);
    let format_options = FormatOptions {
        journal_full_policy: JournalFullPolicy::MergeOldest,
        copy_base_to_backup: false,
        ..Default::default()
    };
    format(devices.channels(), &format_options, &mut |_| {}).unwrap();
    let volume = Volume::open(devices.channels(), VolumeOptions::default()).unwrap();
    let zero = vec![0u8; UNITS as usize * UNIT];
    let mut s = Scenario {
        devices,
        volume,
        current: zero.clone(),
        images: BTreeMap::from([(0, zero)]),
        rng: ChaCha8Rng::seed_from_u64(4),
        options: VolumeOptions::default(),
    };
    for _ in 0..10 {
        s.generation(48, UNITS);
    }
    let status = s.volume.status();
    assert_eq!(status.sort_error, None, "the sort never stopped");
    assert!(status.control.dropped_for_space > 0, "old generations were given up: {:?}", status.control);
    assert_eq!(status.sealed_waiting, 0, "every generation was sorted");
    // What is left is exact; what was given up is refused.
    let oldest = s.records()[0].0;
    let gone: Vec<u64> = (0..oldest).collect();
    for generation in &gone {
        s.images.remove(generation);
    }
    s.check(&gone);
}

/// The open generation's image, i.e. the base.
fn base_image(s: &mut Scenario) -> Vec<u8> {
    s.volume.close_in_place();
    let image = {
        let reader = VolumeReader::open(s.devices.channels()).unwrap();
        reader.read_image(reader.open_generation()).unwrap()
    };
    s.volume = Volume::open(s.devices.channels(), s.options.clone()).unwrap();
    image
}

#[test]
fn rollback_rewrites_the_base_to_an_old_image_as_a_new_generation_that_can_be_undone() {
    let mut s = Scenario::new(5, VolumeOptions::default());
    for _ in 0..5 {
        s.generation(30, 40);
    }
    let mut completions = Vec::new();
    let before = s.current.clone();
    // Generation 2 is a history generation; the rollback seals the current state first.
    let handle = s.volume.rollback(2, "back to 2");
    let rolled = loop {
        if let Some(result) = handle.result() {
            break result.unwrap();
        }
        s.volume.poll(&mut completions);
    };
    let undo_point = rolled - 1;
    assert!(base_image(&mut s) == s.images[&2], "the base holds image 2");
    s.images.insert(undo_point, before.clone());
    s.images.insert(rolled, s.images[&2].clone());
    s.current = s.images[&2].clone();
    let generations = s.volume.status().generations;
    assert!(generations.iter().any(|g| g.generation == rolled && g.comment == "back to 2"), "{generations:?}");
    let mut s = s.check(&[]);

    // Undo: roll back to the undo point.
    let handle = s.volume.rollback(undo_point, "undo");
    let undone = loop {
        if let Some(result) = handle.result() {
            break result.unwrap();
        }
        s.volume.poll(&mut completions);
    };
    assert!(base_image(&mut s) == before, "the base is back where it was");
    s.images.insert(undone - 1, s.images[&2].clone());
    s.images.insert(undone, before);
    s.check(&[]);
}

#[test]
fn rollback_to_a_generation_still_in_the_journal_and_host_writes_wait_for_it() {
    let manual = VolumeOptions {
        sort: chronicle::engine::SortOptions { automatic: false, ..Default::default() },
        ..VolumeOptions::default()
    };
    let mut s = Scenario::new(6, manual);
    for _ in 0..3 {
        s.generation(20, 30);
    }
    assert_eq!(s.volume.status().sealed_waiting, 3, "nothing sorted");
    let mut completions = Vec::new();
    let handle = s.volume.rollback(1, "back to 1");
    // A host read submitted during the rollback waits for it: it sees image 1 whole, never a
    // mix of the blocks rewritten so far and the ones not yet.
    let whole = IoBuffers::single(DmaBuf::zeroed(UNITS as usize * UNIT));
    s.volume.submit(76, HostRequest::Read { offset_blocks: 0, buffers: whole });
    // A host write submitted during the rollback lands after it.
    let mut data = vec![0u8; UNIT];
    s.rng.fill_bytes(&mut data);
    s.volume.submit(
        77,
        HostRequest::Write { offset_blocks: 0, buffers: Arc::new(IoBuffers::single(DmaBuf::copy_from(&data))) },
    );
    let rolled = loop {
        if let Some(result) = handle.result() {
            break result.unwrap();
        }
        s.volume.poll(&mut completions);
    };
    assert!(completions.iter().all(|c| c.tag != 76), "the read waited for the rollback");
    s.volume.run_until_idle(&mut completions);
    assert!(completions.iter().any(|c| c.tag == 77 && c.result.is_ok()), "the held write completed");
    let read = completions.iter().find(|c| c.tag == 76).expect("the held read completed");
    assert!(read.result.is_ok(), "{:?}", read.result);
    let chronicle::device::Payload::Read(buffers) = &read.payload else { panic!("a read returns its buffers") };
    assert!(buffers.to_vec() == s.images[&1], "the read saw image 1 whole");
    let mut expected = s.images[&1].clone();
    s.images.insert(rolled - 1, s.current.clone());
    s.images.insert(rolled, s.images[&1].clone());
    expected[..UNIT].copy_from_slice(&data);
    assert!(base_image(&mut s) == expected, "image 1, then the host's write");
    s.volume.sort_now();
    s.volume.run_until_idle(&mut completions);
    s.check(&[]);
}

#[test]
fn rollback_refuses_generations_it_cannot_restore_and_changes_nothing() {
    let mut s = Scenario::new(7, VolumeOptions::default());
    for _ in 0..4 {
        s.generation(10, 20);
    }
    let mut completions = Vec::new();
    let handle = s.volume.merge(1, 2);
    s.volume.wait_maintenance(&handle, &mut completions).unwrap();
    let before = s.volume.status().generations;
    let open = before.last().expect("the open generation").generation;
    for (target, why) in [(2, "merged into generations 1..=2"), (open, "the open generation"), (99, "not held")] {
        let handle = s.volume.rollback(target, "no");
        let error = loop {
            if let Some(result) = handle.result() {
                break result.expect_err("refused");
            }
            s.volume.poll(&mut completions);
        };
        assert!(
            matches!(&error, chronicle::engine::MaintenanceError::Invalid(message) if message.contains(why)),
            "{target}: {error:?}"
        );
        assert_eq!(s.volume.status().generations.len(), before.len(), "no generation was added");
    }
    s.images.remove(&2);
    s.check(&[2]);
}

#[test]
fn a_write_submitted_after_a_marker_call_belongs_to_the_next_generation() {
    let mut s = Scenario::new(8, VolumeOptions::default());
    s.generation(5, 10);
    let mut completions = Vec::new();
    // The marker is called and, before the volume is polled, a write arrives.
    let handle = s.volume.mark("m");
    let mut data = vec![0u8; UNIT];
    s.rng.fill_bytes(&mut data);
    s.volume.submit(
        5,
        HostRequest::Write { offset_blocks: 0, buffers: Arc::new(IoBuffers::single(DmaBuf::copy_from(&data))) },
    );
    let sealed = loop {
        if let Some(result) = handle.result() {
            break result.unwrap();
        }
        s.volume.poll(&mut completions);
    };
    s.volume.run_until_idle(&mut completions);
    assert!(completions.iter().any(|c| c.tag == 5 && c.result.is_ok()));
    s.images.insert(sealed, s.current.clone());
    s.current[..UNIT].copy_from_slice(&data);
    let next = s.volume.mark_and_wait("n", &mut completions).unwrap();
    s.images.insert(next, s.current.clone());
    s.check(&[]);
}

fn content_pool(rng: &mut ChaCha8Rng, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|_| {
            let mut data = vec![0u8; UNIT];
            rng.fill_bytes(&mut data);
            data
        })
        .collect()
}

/// Dedup in merge (embodiment 6): elements with equal contents are stored once in the merged
/// record; the space accounting shows what it saved; every image stays exact (after a reopen
/// too) and the volume verifies.
#[test]
fn merge_stores_equal_elements_once() {
    let mut s = Scenario::new(11, VolumeOptions::default());
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let pool = content_pool(&mut rng, 3);
    for _ in 0..6 {
        s.generation_from_pool(40, 64, &pool);
    }
    assert_eq!(s.records().len(), 6, "{:?}", s.records());
    let before = s.history_units();
    let mut completions = Vec::new();
    // Records 1..=5 merge into one that restores image(1): each block it holds has one of
    // four contents there (the pool's three or zeros, never written before generation 1).
    let handle = s.volume.merge(1, 5);
    let report = s.volume.wait_maintenance(&handle, &mut completions).unwrap();
    let merged_blocks = s.volume.status().generations.iter().find(|g| g.generation == 1).unwrap().blocks;
    let control_units = 1; // a 64-block volume's control block fits one unit
    let stored = report.units_after - control_units;
    assert!((1..=4).contains(&stored), "{stored} units stored for at most 4 contents: {report:?}");
    assert!(merged_blocks > 8, "the merged record holds {merged_blocks} blocks");
    assert_eq!(report.dedup_shared, merged_blocks - stored, "{report:?}");
    assert_eq!(report.dedup_mismatches, 0, "{report:?}");
    assert_eq!(s.history_units(), before - (report.units_before - report.units_after), "{report:?}");
    let control = s.volume.status().control;
    assert_eq!((control.dedup_shared_elements, control.dedup_mismatches), (report.dedup_shared, 0));
    assert_eq!(s.volume.status().history_dedup_saved_units, report.dedup_shared, "space accounting");
    for generation in 2..=5 {
        s.images.remove(&generation);
    }
    let s = s.check(&[2, 3, 4, 5]);
    assert_eq!(s.volume.status().history_dedup_saved_units, report.dedup_shared, "after a reopen too");
    let reader = VolumeReader::open(s.devices.channels()).unwrap();
    reader.verify().expect("a deduplicated record verifies");
}

/// Dedup never shares different contents: with the content hash narrowed to 2 bits nearly
/// every element collides with another, and only the byte compare tells them apart.
#[test]
fn dedup_hash_collisions_never_share_different_contents() {
    let options = VolumeOptions { dedup_hash_bits: 2, ..VolumeOptions::default() };
    let mut s = Scenario::new(21, options);
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let pool = content_pool(&mut rng, 6);
    // Generation 1 writes contents of its own (20 random units), the later ones pool contents;
    // the merge of records 1..=5 restores image(1): random contents and zeros in 4 hash buckets.
    s.generation(20, 64);
    for _ in 0..5 {
        s.generation_from_pool(30, 64, &pool);
    }
    let mut completions = Vec::new();
    let handle = s.volume.merge(1, 5);
    let report = s.volume.wait_maintenance(&handle, &mut completions).unwrap();
    assert!(report.dedup_mismatches > 0, "2-bit hashes collide: {report:?}");
    assert!(report.dedup_shared > 0, "equal contents (zeros) are still shared: {report:?}");
    for generation in 2..=5 {
        s.images.remove(&generation);
    }
    s.check(&[2, 3, 4, 5]);
}

/// Markers called back to back, with no write between them, run one after the other: each
/// seals its own generation, in call order (their holds must not be mistaken for one).
#[test]
fn markers_called_back_to_back_seal_one_generation_each_in_order() {
    let mut s = Scenario::new(9, VolumeOptions::default());
    s.generation(5, 10);
    let mut completions = Vec::new();
    let handles: Vec<_> = (0..4).map(|k| s.volume.mark(&format!("m{k}"))).collect();
    let sealed: Vec<u64> = handles
        .iter()
        .map(|handle| loop {
            if let Some(result) = handle.result() {
                break result.unwrap();
            }
            s.volume.poll(&mut completions);
        })
        .collect();
    let first = sealed[0];
    assert_eq!(sealed, (first..first + 4).collect::<Vec<_>>(), "one generation each, in call order");
    s.volume.run_until_idle(&mut completions);
    for generation in &sealed {
        s.images.insert(*generation, s.current.clone());
    }
    s.check(&[]);
}
