//! "All" journal mode (seed 001 embodiment 4, mechanism 17 "All") on memory devices: every host
//! write is a version with its submission sequence, and the image after any write restores
//! exactly — from the open generation, from sealed generations still in the journal, after a
//! reopen (recovery rebuilds the open generation with several versions per block) — against a
//! model that applies the writes in sequence order.

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle::core::format::superblock::JournalMode;
use chronicle::device::{DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{
    format, EngineError, FormatOptions, HostCompletion, HostRequest, SortOptions, Volume, VolumeOptions,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod support;

use support::memory::{Devices, UNIT, UNITS};

const BLOCKS_PER_UNIT: u64 = (UNIT / 512) as u64;

fn options(sort: bool) -> VolumeOptions {
    VolumeOptions { sort: SortOptions { automatic: sort, ..SortOptions::default() }, ..VolumeOptions::default() }
}

/// Writes in sequence order and the images they leave.
struct Model {
    /// Sequence of each write → the image right after it (markers take sequences too, so
    /// some sequences are not writes).
    images: BTreeMap<u64, Vec<u8>>,
    current: Vec<u8>,
}

impl Model {
    fn new() -> Self {
        let zero = vec![0u8; UNITS as usize * UNIT];
        Model { images: BTreeMap::from([(0, zero.clone())]), current: zero }
    }

    /// The image after every write with a sequence up to `sequence`.
    fn at(&self, sequence: u64) -> &Vec<u8> {
        self.images.range(..=sequence).next_back().expect("sequence 0 is the format's image").1
    }
}

struct Scenario {
    devices: Devices,
    volume: Option<Volume>,
    model: Model,
    rng: ChaCha8Rng,
    tag: u64,
    completions: Vec<HostCompletion>,
    markers: BTreeMap<u64, u64>,
    units_written: u64,
}

impl Scenario {
    fn new(seed: u64, sort: bool) -> Self {
        let devices = Devices::new();
        let format_options =
            FormatOptions { journal_mode: JournalMode::All, copy_base_to_backup: false, ..Default::default() };
        format(devices.channels(), &format_options, &mut |_| {}).unwrap();
        let volume = Volume::open(devices.channels(), options(sort)).unwrap();
        Scenario {
            devices,
            volume: Some(volume),
            model: Model::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            tag: 0,
            completions: Vec::new(),
            markers: BTreeMap::new(),
            units_written: 0,
        }
    }

    fn volume(&mut self) -> &mut Volume {
        self.volume.as_mut().expect("open")
    }

    /// Submits `count` writes of 1–3 units, half of them over the first 8 units (overwrites),
    /// without waiting: several are in flight at once.
    fn submit_writes(&mut self, count: usize) {
        for _ in 0..count {
            let units = self.rng.random_range(1..=3u64);
            let first = if self.rng.random_bool(0.5) {
                self.rng.random_range(0..8)
            } else {
                self.rng.random_range(0..=UNITS - units)
            };
            let mut data = vec![0u8; units as usize * UNIT];
            self.rng.fill_bytes(&mut data);
            self.units_written += units;
            let at = first as usize * UNIT;
            self.model.current[at..at + data.len()].copy_from_slice(&data);
            let sequence = self.volume().next_sequence();
            self.model.images.insert(sequence, self.model.current.clone());
            self.tag += 1;
            let (tag, buffers) = (self.tag, Arc::new(IoBuffers::single(DmaBuf::copy_from(&data))));
            self.volume().submit(tag, HostRequest::Write { offset_blocks: first * BLOCKS_PER_UNIT, buffers });
        }
    }

    fn mark(&mut self) -> u64 {
        let mut completions = std::mem::take(&mut self.completions);
        let sequence = self.volume().next_sequence();
        let generation = self.volume().mark_and_wait("g", &mut completions).unwrap();
        self.completions = completions;
        self.markers.insert(generation, sequence);
        generation
    }

    fn settle(&mut self) {
        let mut completions = std::mem::take(&mut self.completions);
        self.volume().run_until_idle(&mut completions);
        assert!(completions.iter().all(|c| c.result.is_ok()), "host writes succeed");
    }

    fn reopen(&mut self) {
        self.settle();
        self.volume.take().expect("open").close().unwrap();
        self.volume = Some(Volume::open(self.devices.channels(), options(false)).unwrap());
    }

    /// Closes the volume and reads every sequence from 0 to the newest back.
    fn check_every_sequence(&mut self) -> VolumeReader {
        self.settle();
        self.volume.take().expect("open").close().unwrap();
        let reader = VolumeReader::open(self.devices.channels()).unwrap();
        let newest = reader.next_sequence();
        assert!(newest > *self.model.images.keys().next_back().unwrap());
        for sequence in 0..newest {
            let image = reader.read_sequence(sequence).unwrap_or_else(|e| panic!("sequence {sequence}: {e}"));
            assert!(image == *self.model.at(sequence), "the image at sequence {sequence} is exact");
        }
        reader
    }
}

#[test]
fn every_sequence_restores_exactly_from_the_open_and_sealed_generations() {
    let mut scenario = Scenario::new(1, false);
    for _ in 0..3 {
        scenario.submit_writes(12);
        scenario.mark();
    }
    scenario.submit_writes(20);
    let reader = scenario.check_every_sequence();
    let generations = reader.generations();
    // Four generations of writes: three sealed in the journal, the open one.
    let with_versions: Vec<_> = generations.iter().filter_map(|g| g.versions.map(|v| (g.generation, v))).collect();
    assert_eq!(with_versions.len(), 4, "{generations:?}");
    let versions = with_versions.iter().map(|(_, v)| v.elements).sum::<u64>();
    assert_eq!(versions, scenario.units_written, "every block of every write is a version");
    for (generation, sequence) in &scenario.markers {
        let info = generations.iter().find(|g| g.generation == *generation).unwrap();
        assert_eq!(info.last_sequence, sequence - 1, "generation {generation} is cut just before its marker");
    }
    // Beyond the newest write: refused, naming what is restorable.
    let future = reader.next_sequence();
    match reader.read_sequence(future) {
        Err(EngineError::TargetUnavailable { why, available, .. }) => {
            assert!(why.contains("future"), "{why}");
            assert!(available.contains("generation 0"), "{available}");
        }
        other => panic!("a future sequence is refused, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn recovery_keeps_every_version_of_the_open_generation_and_sequences_keep_growing() {
    let mut scenario = Scenario::new(2, false);
    scenario.submit_writes(10);
    scenario.mark();
    scenario.submit_writes(15);
    let before = scenario.volume().next_sequence();
    scenario.reopen();
    let after = scenario.volume().next_sequence();
    assert!(after >= before, "sequences continue after a reopen ({before} then {after})");
    // More versions of the same blocks after the restart, in the same open generation.
    scenario.submit_writes(15);
    scenario.mark();
    scenario.submit_writes(5);
    scenario.reopen();
    scenario.submit_writes(5);
    scenario.check_every_sequence();
}

#[test]
fn the_sort_writes_each_blocks_newest_version_to_the_backup() {
    let mut scenario = Scenario::new(3, true);
    let mut sealed = Vec::new();
    for _ in 0..3 {
        scenario.submit_writes(16);
        scenario.settle();
        sealed.push((scenario.mark(), scenario.model.current.clone()));
    }
    scenario.submit_writes(4);
    scenario.settle();
    scenario.volume.take().unwrap().close().unwrap();
    let reader = VolumeReader::open(scenario.devices.channels()).unwrap();
    assert_eq!(reader.backup_generation(), sealed.last().unwrap().0, "every sealed generation was sorted");
    for (generation, image) in &sealed {
        assert!(reader.read_image(*generation).unwrap() == *image, "generation {generation} is exact");
    }
    // The open generation's versions restore; so does each sorted generation's cut.
    for sequence in reader.generations().iter().filter(|g| g.state != "open").map(|g| g.last_sequence) {
        assert!(reader.read_sequence(sequence).unwrap() == *scenario.model.at(sequence));
    }
    let newest = reader.next_sequence() - 1;
    assert!(reader.read_sequence(newest).unwrap() == scenario.model.current);
}

#[test]
fn versions_survive_the_sort_and_merges_give_up_only_those_over_a_lost_image() {
    let mut scenario = Scenario::new(4, true);
    for _ in 0..5 {
        scenario.submit_writes(14);
        scenario.settle();
        scenario.mark();
    }
    scenario.submit_writes(6);
    scenario.settle();
    // Generations 1..=5 are sorted: their versions are in the history now.
    let status = scenario.volume().status();
    assert_eq!(status.backup_generation, 5);
    assert!(status.control.versions_kept > 0, "the sorts kept versions");
    // Merging 1..=3 gives up images 2 and 3: the versions of 3 and 4 (over them) go, those of
    // 2 (over image 1) stay. Deleting generation 0 gives up image 0 and the versions of 1.
    let mut completions = Vec::new();
    let merge = scenario.volume().merge(1, 3);
    scenario.volume().wait_maintenance(&merge, &mut completions).unwrap();
    let delete = scenario.volume().delete_generation(0);
    scenario.volume().wait_maintenance(&delete, &mut completions).unwrap();
    assert_eq!(scenario.volume().status().control.version_records_dropped, 3);
    scenario.volume.take().unwrap().close().unwrap();

    let reader = VolumeReader::open(scenario.devices.channels()).unwrap();
    reader.verify().unwrap();
    let cut = |generation: u64| scenario.markers[&generation] - 1;
    let mut restored = 0;
    for sequence in 0..reader.next_sequence() {
        // Generation g's writes lie in (cut(g − 1), cut(g)]; the open generation's after cut(5).
        let generation = (1..=5).find(|g| sequence <= cut(*g)).unwrap_or(6);
        let kept = matches!(generation, 2 | 5 | 6) || [cut(1), cut(4)].contains(&sequence);
        match reader.read_sequence(sequence) {
            Ok(image) => {
                assert!(kept, "sequence {sequence} (generation {generation}) restored though its versions are gone");
                assert!(image == *scenario.model.at(sequence), "the image at sequence {sequence} is exact");
                restored += 1;
            }
            Err(EngineError::TargetUnavailable { available, .. }) => {
                assert!(!kept, "sequence {sequence} (generation {generation}) refused; restorable: {available}");
                assert!(available.contains(&format!("{} (generation 1)", cut(1))), "{available}");
            }
            Err(error) => panic!("sequence {sequence}: {error}"),
        }
    }
    assert!(restored > 30, "{restored} sequences restored");
}

#[test]
fn a_time_target_restores_every_write_taken_by_then() {
    let mut scenario = Scenario::new(5, true);
    let mut instants = Vec::new();
    for round in 0..6 {
        scenario.submit_writes(5);
        scenario.settle();
        // Between two writes: after every write so far, before every later one.
        std::thread::sleep(std::time::Duration::from_millis(2));
        instants.push((chronicle::engine::now_ns(), scenario.model.current.clone()));
        std::thread::sleep(std::time::Duration::from_millis(2));
        if round % 2 == 1 {
            scenario.mark();
        }
    }
    scenario.settle();
    scenario.volume.take().unwrap().close().unwrap();
    let reader = VolumeReader::open(scenario.devices.channels()).unwrap();
    // Sorted generations, sealed ones and the open one alike.
    assert!(reader.backup_generation() >= 1);
    for (time_ns, image) in &instants {
        let sequence = reader.sequence_at_time(*time_ns).unwrap();
        assert!(reader.read_sequence(sequence).unwrap() == *image, "the image at {time_ns} is exact");
    }
    let future = chronicle::engine::now_ns() + 60_000_000_000;
    assert!(matches!(reader.sequence_at_time(future), Err(EngineError::TargetUnavailable { .. })));
    assert!(matches!(reader.sequence_at_time(1), Err(EngineError::TargetUnavailable { .. })));
}

#[test]
fn a_latest_mode_volume_refuses_sequence_targets() {
    let devices = Devices::new();
    format(devices.channels(), &FormatOptions { copy_base_to_backup: false, ..Default::default() }, &mut |_| {})
        .unwrap();
    let reader = VolumeReader::open(devices.channels()).unwrap();
    let error = reader.read_sequence(0).map(|_| ()).unwrap_err();
    assert!(error.to_string().contains("\"latest\" journal mode"), "{error}");
}

#[test]
fn a_catalog_naming_an_impossible_write_sequence_is_refused_as_damaged() {
    use chronicle::core::format::catalog::{self, Catalog};
    use chronicle::core::format::superblock::{AreaKind, Superblock};
    use chronicle::core::format::METADATA_PAGE_BYTES;

    let mut s = Scenario::new(11, false);
    s.submit_writes(20);
    s.settle();
    s.volume.take().expect("open").close().unwrap();
    // The journal's newest catalog, rewritten (valid checksum, next sequence) with a write
    // sequence no volume reaches: the open must refuse it, not wrap or overflow.
    let journal = s.devices.device(1);
    let bytes = journal.snapshot();
    let superblock = Superblock::decode(&bytes[..METADATA_PAGE_BYTES]).expect("journal superblock");
    let area = |kind: AreaKind| superblock.area(kind).expect("catalog area");
    let slot = |kind: AreaKind| &bytes[area(kind).start_bytes as usize..area(kind).end_bytes() as usize];
    let mut newest = catalog::choose(slot(AreaKind::CatalogA), slot(AreaKind::CatalogB)).expect("a catalog");
    let older_slot = if Catalog::decode(slot(AreaKind::CatalogA)).is_ok_and(|c| c.sequence == newest.sequence) {
        AreaKind::CatalogB
    } else {
        AreaKind::CatalogA
    };
    newest.sequence += 1;
    newest.write_sequence = u64::MAX;
    journal.write_blocks(area(older_slot).start_bytes / 512, &newest.encode());
    match Volume::open(s.devices.channels(), options(false)) {
        Err(EngineError::Damaged(why)) => assert!(why.contains("write sequence"), "{why}"),
        Err(other) => panic!("refused, but not as damaged: {other}"),
        Ok(_) => panic!("a write sequence of 2^64 - 1 was accepted"),
    }
}
