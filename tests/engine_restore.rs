//! Restore volumes (R-VOL, seed 001 FIG 13–15, 20) on memory devices, against a model of every
//! generation's image: an R-VOL reads its generation exactly — while the volume keeps taking
//! writes, the sort overwrites the backup under it and merges rewrite the history — and its
//! own writes never reach the volume's generations.

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle::device::{DmaBuf, IoBuffers, Payload};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{
    format, FormatOptions, HostCompletion, HostRequest, RestoreId, SortOptions, Volume, VolumeOptions,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod support;

use support::memory::{Devices, UNIT, UNITS};

const BLOCKS_PER_UNIT: u64 = (UNIT / 512) as u64;

struct Scenario {
    devices: Devices,
    volume: Volume,
    current: Vec<u8>,
    images: BTreeMap<u64, Vec<u8>>,
    rng: ChaCha8Rng,
    next_tag: u64,
    completions: Vec<HostCompletion>,
}

impl Scenario {
    fn new(seed: u64, options: VolumeOptions) -> Self {
        let devices = Devices::new();
        format(devices.channels(), &FormatOptions { copy_base_to_backup: false, ..Default::default() }, &mut |_| {})
            .unwrap();
        let volume = Volume::open(devices.channels(), options).unwrap();
        let zero = vec![0u8; UNITS as usize * UNIT];
        Scenario {
            devices,
            volume,
            current: zero.clone(),
            images: BTreeMap::from([(0, zero)]),
            rng: ChaCha8Rng::seed_from_u64(seed),
            next_tag: 0,
            completions: Vec::new(),
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Submits `units` random unit writes to the volume (not waiting for them).
    fn submit_writes(&mut self, units: usize) {
        for _ in 0..units {
            let unit = self.rng.random_range(0..UNITS);
            let mut data = vec![0u8; UNIT];
            self.rng.fill_bytes(&mut data);
            self.current[unit as usize * UNIT..(unit as usize + 1) * UNIT].copy_from_slice(&data);
            let tag = self.tag();
            let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(&data)));
            self.volume.submit(tag, HostRequest::Write { offset_blocks: unit * BLOCKS_PER_UNIT, buffers });
        }
    }

    /// Writes, then marks a generation.
    fn generation(&mut self, units: usize) -> u64 {
        self.submit_writes(units);
        let mut completions = Vec::new();
        let generation = self.volume.mark_and_wait("g", &mut completions).unwrap();
        assert!(completions.iter().all(|c| c.result.is_ok()));
        self.images.insert(generation, self.current.clone());
        generation
    }

    fn open_restore(&mut self, generation: u64) -> Result<RestoreId, String> {
        let handle = self.volume.open_restore(generation);
        loop {
            if let Some(result) = handle.result() {
                return result.map_err(|e| e.to_string());
            }
            self.volume.poll(&mut self.completions);
        }
    }

    /// Runs one R-VOL request to completion.
    fn restore_io(&mut self, restore: RestoreId, request: HostRequest) -> HostCompletion {
        let tag = self.tag();
        self.volume.submit_restore(restore, tag, request);
        loop {
            if let Some(at) = self.completions.iter().position(|c| c.tag == tag) {
                return self.completions.remove(at);
            }
            self.volume.poll(&mut self.completions);
        }
    }

    fn read_restore(&mut self, restore: RestoreId, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset % 512 == 0 && len % 512 == 0);
        let request =
            HostRequest::Read { offset_blocks: offset as u64 / 512, buffers: IoBuffers::single(DmaBuf::zeroed(len)) };
        let completion = self.restore_io(restore, request);
        completion.result.expect("R-VOL read");
        match completion.payload {
            Payload::Read(buffers) => buffers.to_vec(),
            other => panic!("a read gives its buffers back, got {other:?}"),
        }
    }

    fn write_restore(&mut self, restore: RestoreId, offset: usize, data: &[u8]) {
        let request = HostRequest::Write {
            offset_blocks: offset as u64 / 512,
            buffers: Arc::new(IoBuffers::single(DmaBuf::copy_from(data))),
        };
        self.restore_io(restore, request).result.expect("R-VOL write");
    }

    fn read_image(&mut self, restore: RestoreId) -> Vec<u8> {
        self.read_restore(restore, 0, UNITS as usize * UNIT)
    }

    fn settle(&mut self) {
        self.volume.run_until_idle(&mut self.completions);
        assert!(self.completions.iter().all(|c| c.result.is_ok()), "host writes succeed");
        self.completions.clear();
    }

    /// Every generation of the model reads back exactly from the closed volume.
    fn check_generations(self) {
        let Scenario { devices, volume, images, .. } = self;
        volume.close().unwrap();
        let reader = VolumeReader::open(devices.channels()).unwrap();
        for (generation, image) in &images {
            assert!(reader.read_image(*generation).unwrap() == *image, "generation {generation} is exact");
        }
    }
}

fn status_restores(volume: &Volume) -> Vec<(RestoreId, u64, u64)> {
    volume.status().restores.iter().map(|r| (r.id, r.generation, r.own_units)).collect()
}

#[test]
fn a_restore_volume_reads_its_generation_while_writes_sorts_and_merges_go_on() {
    // Small sort batches: R-VOL reads land between the sort's saves and its backup writes.
    let options = VolumeOptions {
        sort: SortOptions { batch_elements: 2, max_in_flight: 2, ..SortOptions::default() },
        ..VolumeOptions::default()
    };
    let mut s = Scenario::new(1, options);
    for _ in 0..4 {
        s.generation(30);
        s.settle();
    }
    // Generations 1..3 are history records, 4 is the backup's.
    let r2 = s.open_restore(2).unwrap();
    let r4 = s.open_restore(4).unwrap();
    assert!(s.read_image(r2) == s.images[&2], "R-VOL 2 reads image 2");
    assert!(s.read_image(r4) == s.images[&4], "R-VOL 4 reads image 4 (the backup's)");

    // More generations: every sort overwrites backup blocks both R-VOLs read through. Reads
    // go on meanwhile, one unit at a time, and are checked as they complete.
    let mut checked = 0;
    for round in 0..6 {
        s.submit_writes(40);
        let handle = s.volume.mark(&format!("round {round}"));
        let mut sealed = None;
        while sealed.is_none() || !s.volume.is_idle() {
            if sealed.is_none() {
                if let Some(result) = handle.result() {
                    let generation = result.unwrap();
                    s.images.insert(generation, s.current.clone());
                    sealed = Some(generation);
                }
            }
            for (restore, generation) in [(r2, 2), (r4, 4)] {
                let unit = s.rng.random_range(0..UNITS as usize);
                let data = s.read_restore(restore, unit * UNIT, UNIT);
                assert!(
                    data == s.images[&generation][unit * UNIT..(unit + 1) * UNIT],
                    "round {round}: unit {unit} of R-VOL {generation} while the sort runs"
                );
                checked += 1;
            }
        }
        s.settle();
    }
    assert!(checked > 50, "reads interleaved with the sorts: {checked}");
    assert!(s.read_image(r2) == s.images[&2] && s.read_image(r4) == s.images[&4]);

    // A merge that keeps image 2 (2..3) repoints R-VOL 2 into the merged record; one that would
    // give up image 4 is refused while R-VOL 4 is open; one that keeps 4 (4..5) is done.
    let handle = s.volume.merge(2, 3);
    s.volume.wait_maintenance(&handle, &mut s.completions).unwrap();
    s.images.remove(&3);
    let handle = s.volume.merge(2, 4);
    let refused = s.volume.wait_maintenance(&handle, &mut s.completions).unwrap_err();
    assert!(refused.to_string().contains("restore volume"), "{refused}");
    let handle = s.volume.merge(4, 5);
    s.volume.wait_maintenance(&handle, &mut s.completions).unwrap();
    s.images.remove(&5);
    // The freed records' space is reused by later sorts; the R-VOLs still read exactly.
    for _ in 0..3 {
        s.generation(40);
        s.settle();
    }
    assert!(s.read_image(r2) == s.images[&2], "R-VOL 2 after merges and more sorts");
    assert!(s.read_image(r4) == s.images[&4], "R-VOL 4 after merges and more sorts");
    // Partial reads: any 512-byte-aligned range.
    let image2 = s.images[&2].clone();
    for _ in 0..20 {
        let offset = s.rng.random_range(0..UNITS as usize * 8 - 1) * 512;
        let len = s.rng.random_range(1..=(UNITS as usize * 8 - offset / 512).min(24)) * 512;
        assert!(s.read_restore(r2, offset, len) == image2[offset..offset + len], "{offset}+{len}");
    }
    s.check_generations();
}

#[test]
fn restore_volume_writes_are_redirected_and_leave_every_generation_alone() {
    let mut s = Scenario::new(2, VolumeOptions::default());
    for _ in 0..3 {
        s.generation(30);
        s.settle();
    }
    let used_before = s.volume.status().history_used_units;
    let restore = s.open_restore(1).unwrap();
    let mut model = s.images[&1].clone();
    for _ in 0..40 {
        // Whole units, partial units and ranges across units.
        let offset = s.rng.random_range(0..UNITS as usize * 8 - 1) * 512;
        let len = s.rng.random_range(1..=(UNITS as usize * 8 - offset / 512).min(20)) * 512;
        let mut data = vec![0u8; len];
        s.rng.fill_bytes(&mut data);
        s.write_restore(restore, offset, &data);
        model[offset..offset + len].copy_from_slice(&data);
    }
    // Zeroes too.
    let request = HostRequest::WriteZeroes { offset_blocks: 3 * BLOCKS_PER_UNIT + 2, num_blocks: 9 };
    s.restore_io(restore, request).result.unwrap();
    model[3 * UNIT + 1024..3 * UNIT + 1024 + 9 * 512].fill(0);
    assert!(s.read_image(restore) == model, "the R-VOL reads its own writes over image 1");
    let own = status_restores(&s.volume)[0].2;
    assert!(own > 0 && s.volume.status().history_used_units == used_before + own);

    // The volume goes on; the R-VOL keeps its writes through the sorts.
    for _ in 0..2 {
        s.generation(30);
        s.settle();
    }
    assert!(s.read_image(restore) == model, "after more sorts");

    // Out of range: refused, nothing written.
    let request =
        HostRequest::Read { offset_blocks: UNITS * BLOCKS_PER_UNIT, buffers: IoBuffers::single(DmaBuf::zeroed(512)) };
    let refused = s.restore_io(restore, request);
    assert!(refused.result.is_err());

    // Closing frees its units; later requests are refused.
    let used_with_restore = s.volume.status().history_used_units;
    s.volume.close_restore(restore).unwrap();
    s.settle();
    assert!(status_restores(&s.volume).is_empty());
    assert_eq!(s.volume.status().history_used_units, used_with_restore - own, "its units are free again");
    let request = HostRequest::Flush;
    let refused = s.restore_io(restore, request);
    assert!(refused.result.unwrap_err().to_string().contains("not open"));
    assert!(s.volume.close_restore(restore).is_err(), "closing twice is refused");
    s.check_generations();
}

#[test]
fn opening_a_restore_volume_refuses_what_the_volume_does_not_hold_and_waits_for_the_sort() {
    let manual =
        VolumeOptions { sort: SortOptions { automatic: false, ..SortOptions::default() }, ..VolumeOptions::default() };
    let mut s = Scenario::new(3, manual);
    for _ in 0..3 {
        s.generation(20);
        s.settle();
    }
    let open = s.volume.status().open_generation;
    for (generation, why) in [(open, "open generation"), (99, "not held"), (2, "sorted into the history")] {
        let error = s.open_restore(generation).unwrap_err();
        assert!(error.contains(why), "{generation}: {error}");
    }
    assert!(status_restores(&s.volume).is_empty(), "nothing opened");
    // Once the sort runs, a generation that was in the journal opens.
    s.volume.sort_now();
    let restore = s.open_restore(2).unwrap();
    assert!(s.read_image(restore) == s.images[&2]);
    // Limits: at most MAX_RESTORE_VOLUMES at once.
    let mut opened = vec![restore];
    for _ in 1..chronicle::engine::MAX_RESTORE_VOLUMES {
        opened.push(s.open_restore(1).unwrap());
    }
    let error = s.open_restore(1).unwrap_err();
    assert!(error.contains("at most"), "{error}");
    for restore in opened {
        s.volume.close_restore(restore).unwrap();
    }
    s.settle();
    s.check_generations();
}
