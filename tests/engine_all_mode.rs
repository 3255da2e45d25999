//! "All" journal mode (seed 001 embodiment 4, mechanism 17 "All") on memory devices: every host
//! write is a version with its submission sequence, and the image after any write restores
//! exactly — from the open generation, from sealed generations still in the journal, after a
//! reopen (recovery rebuilds the open generation with several versions per block) — against a
//! model that applies the writes in sequence order.

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle::core::format::superblock::JournalMode;
use chronicle::device::{DmaBuf, IoBuffers, Payload};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{
    format, EngineError, FormatOptions, HostCompletion, HostRequest, RestoreId, RestoreTarget, SortOptions, Volume,
    VolumeOptions,
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

    /// Opens a restore volume of `target` and waits for it (the sort runs meanwhile).
    fn open_restore(&mut self, target: RestoreTarget) -> Result<RestoreId, String> {
        let handle = self.volume().open_restore_at(target);
        let mut completions = std::mem::take(&mut self.completions);
        let result = loop {
            if let Some(result) = handle.result() {
                break result.map_err(|e| e.to_string());
            }
            self.volume().poll(&mut completions);
        };
        self.completions = completions;
        result
    }

    /// Runs one request on R-VOL `restore` to completion (host writes go on meanwhile).
    fn restore_io(&mut self, restore: RestoreId, request: HostRequest) -> HostCompletion {
        self.tag += 1;
        let tag = self.tag;
        self.volume().submit_restore(restore, tag, request);
        let mut completions = std::mem::take(&mut self.completions);
        let completion = loop {
            if let Some(at) = completions.iter().position(|c| c.tag == tag) {
                break completions.remove(at);
            }
            self.volume().poll(&mut completions);
        };
        self.completions = completions;
        completion
    }

    fn read_restore(&mut self, restore: RestoreId, unit: u64, units: u64) -> Vec<u8> {
        let buffers = IoBuffers::single(DmaBuf::zeroed(units as usize * UNIT));
        let completion = self.restore_io(restore, HostRequest::Read { offset_blocks: unit * BLOCKS_PER_UNIT, buffers });
        completion.result.expect("R-VOL read");
        match completion.payload {
            Payload::Read(buffers) => buffers.to_vec(),
            other => panic!("a read gives its buffers back, got {other:?}"),
        }
    }

    fn write_restore(&mut self, restore: RestoreId, unit: u64, data: &[u8]) {
        let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(data)));
        let request = HostRequest::Write { offset_blocks: unit * BLOCKS_PER_UNIT, buffers };
        self.restore_io(restore, request).result.expect("R-VOL write");
    }

    /// A sequence strictly inside generation `generation`'s writes (after the cut before it,
    /// before its own), chosen by the scenario's generator.
    fn sequence_inside(&mut self, generation: u64) -> u64 {
        let after = self.markers.get(&(generation - 1)).map_or(0, |m| m - 1);
        let cut = self.markers[&generation] - 1;
        assert!(cut > after + 1, "generation {generation} has writes");
        self.rng.random_range(after + 1..cut)
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

/// Restore volumes at any sequence (seed 001 embodiment 4 with FIG 13–15, 20): R-VOLs at
/// sequences inside sorted generations, at a cut, and inside a generation still waiting for the
/// sort read exactly the model's image right after that write — while more generations are
/// written and sorted (the sort overwrites backup blocks they read through), after a merge that
/// keeps their image, and with writes of their own that change neither the volume's history
/// nor the other R-VOLs. A merge that would give up the image under one is refused.
#[test]
fn restore_volumes_at_any_sequence_read_exactly_while_the_sort_and_merges_go_on() {
    let mut s = Scenario::new(21, true);
    for _ in 0..4 {
        s.submit_writes(14);
        s.settle();
        s.mark();
    }
    s.settle();
    assert_eq!(s.volume().status().backup_generation, 4, "generations 1..=4 are sorted");
    // Inside generations 2 and 3 (versions in their version records), at the cut of 1, and
    // inside generation 5, sealed just now: it opens once the sort has applied it.
    let mut targets = vec![s.sequence_inside(2), s.sequence_inside(2), s.sequence_inside(3), s.markers[&1] - 1];
    s.submit_writes(10);
    s.settle();
    let sealed = s.mark();
    targets.push(s.sequence_inside(sealed));
    let mut rvols = Vec::new();
    for sequence in &targets {
        let restore = s.open_restore(RestoreTarget::Sequence(*sequence)).unwrap();
        let image = s.read_restore(restore, 0, UNITS);
        assert!(image == *s.model.at(*sequence), "R-VOL of sequence {sequence} reads its image");
        rvols.push((restore, *sequence, s.model.at(*sequence).clone()));
    }
    let info = s.volume().status().restores;
    assert_eq!(info.iter().filter_map(|r| r.sequence).collect::<Vec<_>>(), targets, "{info:?}");
    assert!(info.iter().filter(|r| r.sequence != Some(s.markers[&1] - 1)).all(|r| r.version_blocks > 0), "{info:?}");

    // Writes to one R-VOL: its own units, read back; the others and the history unchanged.
    let (written, _, _) = rvols[0];
    for unit in [0u64, 5, 63] {
        let mut data = vec![0u8; UNIT];
        s.rng.fill_bytes(&mut data);
        s.write_restore(written, unit, &data);
        rvols[0].2[unit as usize * UNIT..(unit as usize + 1) * UNIT].copy_from_slice(&data);
    }

    // More generations while reading: each sort overwrites backup blocks under every R-VOL.
    let mut checked = 0;
    for round in 0..3 {
        s.submit_writes(12);
        let handle = s.volume().mark(&format!("round {round}"));
        let mut completions = std::mem::take(&mut s.completions);
        loop {
            let sealed = handle.result().is_some();
            if sealed && s.volume().is_idle() {
                break;
            }
            s.volume().poll(&mut completions);
            if let Some(Ok(generation)) = handle.result() {
                s.markers.entry(generation).or_insert(0);
            }
            for (restore, sequence, image) in rvols.clone() {
                let unit = s.rng.random_range(0..UNITS);
                let data = s.read_restore(restore, unit, 1);
                let expected = &image[unit as usize * UNIT..(unit as usize + 1) * UNIT];
                assert!(data == expected, "round {round}: unit {unit} of the R-VOL of sequence {sequence}");
                checked += 1;
            }
        }
        s.completions = completions;
        s.settle();
    }
    assert!(checked >= 30, "reads interleaved with the sorts: {checked}");

    // Merging 2..=3 keeps image 2 (under the R-VOLs inside generation 3) and gives up image 3
    // (the versions of 4 over it); merging 1 with 2..=3 would give up image 2 and is refused.
    let mut completions = std::mem::take(&mut s.completions);
    let merge = s.volume().merge(2, 3);
    s.volume().wait_maintenance(&merge, &mut completions).unwrap();
    let merge = s.volume().merge(1, 3);
    let refused = s.volume().wait_maintenance(&merge, &mut completions).unwrap_err();
    assert!(refused.to_string().contains("restore volume"), "{refused}");
    s.completions = completions;
    for (restore, sequence, image) in rvols.clone() {
        assert!(s.read_restore(restore, 0, UNITS) == image, "R-VOL of sequence {sequence} after the merge");
    }
    for (restore, ..) in &rvols {
        s.volume().close_restore(*restore).unwrap();
    }
    s.settle();
    assert!(s.volume().status().restores.is_empty());
    // The R-VOLs' writes left the history alone: every target still restores offline.
    s.volume.take().unwrap().close().unwrap();
    let reader = VolumeReader::open(s.devices.channels()).unwrap();
    reader.verify().unwrap();
    for sequence in &targets {
        assert!(reader.read_sequence(*sequence).unwrap() == *s.model.at(*sequence), "sequence {sequence} offline");
    }
}

/// R-VOLs end with the volume (as generation R-VOLs do); after a reopen the same sequence
/// opens again with the same image, and a time target opens the image after every write taken
/// by then.
#[test]
fn restore_volumes_by_sequence_and_time_open_again_after_a_reopen() {
    let mut s = Scenario::new(22, true);
    let mut instants = Vec::new();
    for _ in 0..3 {
        for _ in 0..2 {
            s.submit_writes(6);
            s.settle();
            std::thread::sleep(std::time::Duration::from_millis(2));
            instants.push((chronicle::engine::now_ns(), s.model.current.clone()));
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        s.mark();
    }
    s.settle();
    let sequence = s.sequence_inside(2);
    let before = s.open_restore(RestoreTarget::Sequence(sequence)).unwrap();
    assert!(s.read_restore(before, 0, UNITS) == *s.model.at(sequence));
    for (time_ns, image) in instants.clone() {
        let restore = s.open_restore(RestoreTarget::TimeNs(time_ns)).unwrap();
        assert!(s.read_restore(restore, 0, UNITS) == image, "the R-VOL of time {time_ns} reads its image");
        s.volume().close_restore(restore).unwrap();
    }
    s.settle();
    s.reopen();
    assert!(s.volume().status().restores.is_empty(), "R-VOLs live in memory");
    let after = s.open_restore(RestoreTarget::Sequence(sequence)).unwrap();
    assert!(s.read_restore(after, 0, UNITS) == *s.model.at(sequence), "the same image after a reopen");
    let (time_ns, image) = instants[1].clone();
    let by_time = s.open_restore(RestoreTarget::TimeNs(time_ns)).unwrap();
    assert!(s.read_restore(by_time, 0, UNITS) == image);
}

/// Targets a restore volume cannot show are refused with what can be restored, and nothing is
/// opened: the open generation (not sealed yet), the future, a time before every write, versions
/// given up with the image under them, and any sequence or time on a "latest" mode volume.
#[test]
fn restore_volume_targets_that_are_not_kept_are_refused() {
    let mut s = Scenario::new(23, true);
    let start_ns = chronicle::engine::now_ns();
    for _ in 0..3 {
        s.submit_writes(8);
        s.settle();
        s.mark();
    }
    s.submit_writes(8);
    s.settle();
    let open = s.volume().next_sequence() - 1;
    let refusal = |s: &mut Scenario, target| s.open_restore(target).unwrap_err();
    let error = refusal(&mut s, RestoreTarget::Sequence(open));
    assert!(error.contains("open generation 4") && error.contains("restorable:"), "{error}");
    let error = refusal(&mut s, RestoreTarget::Sequence(open + 100));
    assert!(error.contains("future"), "{error}");
    let error = refusal(&mut s, RestoreTarget::TimeNs(start_ns / 2));
    assert!(error.contains("older than every"), "{error}");
    let error = refusal(&mut s, RestoreTarget::TimeNs(chronicle::engine::now_ns() + 60_000_000_000));
    assert!(error.contains("future"), "{error}");
    // Deleting generation 0 gives up image 0 and the versions of generation 1 over it.
    let inside_one = s.sequence_inside(1);
    assert!(s.open_restore(RestoreTarget::Sequence(inside_one)).is_ok_and(|r| s.volume().close_restore(r).is_ok()));
    s.settle();
    let mut completions = Vec::new();
    let delete = s.volume().delete_generation(0);
    s.volume().wait_maintenance(&delete, &mut completions).unwrap();
    let error = refusal(&mut s, RestoreTarget::Sequence(inside_one));
    assert!(error.contains(&format!("sequence {inside_one} cannot be restored")), "{error}");
    assert!(s.volume().status().restores.is_empty(), "nothing was opened");
    // The image at generation 1's cut stays restorable.
    let cut = s.markers[&1] - 1;
    assert!(s.open_restore(RestoreTarget::Sequence(cut)).is_ok());

    let devices = Devices::new();
    format(devices.channels(), &FormatOptions { copy_base_to_backup: false, ..Default::default() }, &mut |_| {})
        .unwrap();
    let mut latest = Volume::open(devices.channels(), options(true)).unwrap();
    for target in [RestoreTarget::Sequence(0), RestoreTarget::TimeNs(chronicle::engine::now_ns())] {
        let handle = latest.open_restore_at(target);
        let mut completions = Vec::new();
        let error = loop {
            if let Some(result) = handle.result() {
                break result.unwrap_err().to_string();
            }
            latest.poll(&mut completions);
        };
        assert!(error.contains("\"latest\" journal mode"), "{error}");
    }
    assert!(latest.status().restores.is_empty());
}
