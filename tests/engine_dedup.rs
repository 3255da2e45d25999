//! Dedup across history records (seed 001 embodiment 6, FIG 39–42) on memory devices: a merge
//! shares elements with equal ones stored in other records; deleting a record whose units are
//! shared keeps those units (retained) until the last record pointing at them goes; images,
//! restore volumes and `verify` follow the shared addresses; a power cut at every step of
//! every operation loses nothing and leaks nothing.
//!
//! The script (5 generations of a 64-unit volume; H(g) holds image(g)'s blocks that g+1 wrote):
//! generation 1 writes X at block 0, 2 writes Y there, 3 writes X at block 1, 4 writes Y at
//! block 1 and Z at block 2, 5 writes Z at block 3. So H1 holds X, H3 holds X too, H0, H2, H3
//! and H4 hold zeros. Then:
//! - A: merge 3..4 — M3 points at H1's X and at a zero unit of H2 (no unit stored);
//! - B: delete 1 — H0 and H1 merge into M0; H1 leaves, its X stays retained for M3;
//! - C: delete 2 — M0 and H2 merge; H2's zero stays retained for M3;
//! - D: delete 0 — M0 is dropped, the retained units stay;
//! - E: delete 3 — M3, the last record pointing at them, is dropped: everything is freed.

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle::device::fault::FaultController;
use chronicle::device::{DmaBuf, IoBuffers, OperationKind, Payload};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{format, FormatOptions, HostRequest, MergeReport, Volume, VolumeOptions};

mod support;
use support::memory::Media;

const UNIT: usize = 4096;
const UNITS: u64 = 64;
const BLOCKS_PER_UNIT: u64 = UNIT as u64 / 512;

fn content(seed: u8) -> Vec<u8> {
    (0..UNIT).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)).collect()
}

fn write(volume: &mut Volume, unit: u64, data: &[u8]) {
    let mut completions = Vec::new();
    let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(data)));
    volume.submit(unit, HostRequest::Write { offset_blocks: unit * BLOCKS_PER_UNIT, buffers });
    volume.run_until_idle(&mut completions);
    assert!(completions.iter().all(|c| c.result.is_ok()));
}

fn close(mut volume: Volume) {
    let mut completions = Vec::new();
    volume.run_until_idle(&mut completions);
    volume.begin_close();
    while volume.poll_close(&mut completions).is_pending() {}
}

/// One maintenance operation of the script and what it gives up.
struct Step {
    name: &'static str,
    delete: Option<u64>,
    merge: Option<(u64, u64)>,
    gone: &'static [u64],
}

const STEPS: [Step; 5] = [
    Step { name: "A merge 3..4", delete: None, merge: Some((3, 4)), gone: &[4] },
    Step { name: "B delete 1", delete: Some(1), merge: None, gone: &[1] },
    Step { name: "C delete 2", delete: Some(2), merge: None, gone: &[2] },
    Step { name: "D delete 0", delete: Some(0), merge: None, gone: &[0] },
    Step { name: "E delete 3", delete: Some(3), merge: None, gone: &[3] },
];

fn start(volume: &mut Volume, step: &Step) -> chronicle::engine::MaintenanceHandle {
    match (step.delete, step.merge) {
        (Some(generation), _) => volume.delete_generation(generation),
        (_, Some((from, through))) => volume.merge(from, through),
        _ => unreachable!("a step merges or deletes"),
    }
}

/// Formats and writes the script's generations 1..=5; returns every image.
fn prepare(media: &Media) -> BTreeMap<u64, Vec<u8>> {
    format(media.channels(), &FormatOptions { copy_base_to_backup: false, ..Default::default() }, &mut |_| {}).unwrap();
    let mut volume = Volume::open(media.channels(), script_options()).unwrap();
    let (x, y, z) = (content(3), content(5), content(7));
    let mut image = vec![0u8; UNITS as usize * UNIT];
    let mut images = BTreeMap::from([(0, image.clone())]);
    let script: [&[(u64, &Vec<u8>)]; 5] = [&[(0, &x)], &[(0, &y)], &[(1, &x)], &[(1, &y), (2, &z)], &[(3, &z)]];
    let mut completions = Vec::new();
    for writes in script {
        for (unit, data) in writes {
            write(&mut volume, *unit, data);
            image[*unit as usize * UNIT..][..UNIT].copy_from_slice(data);
        }
        let generation = volume.mark_and_wait("g", &mut completions).unwrap();
        images.insert(generation, image.clone());
        volume.run_until_idle(&mut completions);
    }
    assert_eq!(volume.status().backup_generation, 5, "every generation sorted");
    close(volume);
    images
}

/// What the media hold: every image in `images` exact, every generation in `gone` refused,
/// `maybe` either; `verify` passes (every shared pointer lands in a live record's or a retained
/// extent's units, every retained extent is pointed at).
fn check_media(media: &Media, images: &BTreeMap<u64, Vec<u8>>, maybe: &[u64], context: &str) -> VolumeReader {
    let reader = VolumeReader::open(media.channels()).unwrap_or_else(|e| panic!("{context}: open: {e}"));
    reader.verify().unwrap_or_else(|e| panic!("{context}: verify: {e}"));
    for (generation, image) in images {
        if reader.source(*generation).is_none() {
            assert!(maybe.contains(generation), "{context}: generation {generation} is no longer restorable");
            continue;
        }
        let read = reader.read_image(*generation).unwrap_or_else(|e| panic!("{context}: {generation}: {e}"));
        assert!(read == *image, "{context}: generation {generation} differs from its image");
    }
    reader
}

fn run_step(volume: &mut Volume, step: &Step) -> MergeReport {
    let mut completions = Vec::new();
    let handle = start(volume, step);
    volume.wait_maintenance(&handle, &mut completions).unwrap_or_else(|e| panic!("{}: {e}", step.name))
}

fn read_restore(volume: &mut Volume, restore: chronicle::engine::RestoreId, tag: u64) -> Vec<u8> {
    let mut completions = Vec::new();
    let buffers = IoBuffers::single(DmaBuf::zeroed(UNITS as usize * UNIT));
    volume.submit_restore(restore, tag, HostRequest::Read { offset_blocks: 0, buffers });
    volume.run_until_idle(&mut completions);
    let done = completions.iter().find(|c| c.tag == tag).expect("the restore read completed");
    assert!(done.result.is_ok(), "{:?}", done.result);
    let Payload::Read(buffers) = &done.payload else { panic!("a read returns its buffers") };
    buffers.to_vec()
}

/// The script's shares are single units: every match is shared (no minimum run), so these
/// tests exercise the sharing and retention mechanics; the run policy has its own test.
fn script_options() -> VolumeOptions {
    VolumeOptions { dedup_min_run: 1, ..VolumeOptions::default() }
}

fn open(media: &Media) -> Volume {
    let mut volume = Volume::open(media.channels(), script_options()).unwrap();
    // The content index is rebuilt in the background after open.
    volume.run_until_idle(&mut Vec::new());
    volume
}

#[test]
fn deleting_a_record_keeps_units_another_record_shares_until_the_last_reference_goes() {
    let media = Media::new(UNITS, 4 * UNITS, 8 * UNITS);
    let mut images = prepare(&media);
    let mut volume = open(&media);

    // A: M3 shares with H1 (X) and H2 (zeros) instead of storing anything.
    let report = run_step(&mut volume, &STEPS[0]);
    images.remove(&4);
    assert_eq!(report.dedup_shared_across, 3, "{report:?}");
    assert_eq!(report.units_after, 1, "only the control block is stored: {report:?}");
    let status = volume.status();
    assert_eq!((status.history_dedup_saved_units, status.history_dedup_saved_across_units), (3, 3));
    assert_eq!(status.control.dedup_shared_across, 3);

    // A restore volume of generation 3 (the merged record) stays exact while the records it
    // points into go.
    let mut completions = Vec::new();
    let handle = volume.open_restore(3);
    let restore = loop {
        if let Some(result) = handle.result() {
            break result.unwrap();
        }
        volume.poll(&mut completions);
    };
    assert!(read_restore(&mut volume, restore, 100) == images[&3]);

    // B: H1 leaves; its X unit is retained for M3, the rest of H0 and H1 is freed.
    let used = volume.status().history_used_units;
    let report = run_step(&mut volume, &STEPS[1]);
    images.remove(&1);
    assert_eq!(report.retained_units, 1, "{report:?}");
    assert_eq!(volume.status().history_retained_units, 1);
    assert!(volume.status().history_used_units < used, "the rest of H0 and H1 is freed");
    assert!(read_restore(&mut volume, restore, 101) == images[&3], "the restore volume still reads image 3");

    // C: H2 leaves; its zero unit is retained too.
    let report = run_step(&mut volume, &STEPS[2]);
    images.remove(&2);
    assert_eq!(report.retained_units, 2, "{report:?}");
    assert!(read_restore(&mut volume, restore, 102) == images[&3]);

    // D: the oldest record goes, the retained units stay.
    let report = run_step(&mut volume, &STEPS[3]);
    images.remove(&0);
    assert_eq!(report.retained_units, 2, "{report:?}");
    assert!(read_restore(&mut volume, restore, 103) == images[&3]);
    volume.close_restore(restore).unwrap();
    let used = volume.status().history_used_units;
    close(volume);
    let reader = check_media(&media, &images, &[], "after D");
    let verified = reader.verify().unwrap();
    assert_eq!((verified.retained_extents, verified.retained_units, verified.shared_across_elements), (2, 2, 3));
    drop(reader);

    // The allocator rebuilt from the catalog alone agrees with the running volume's.
    let mut volume = open(&media);
    assert_eq!(volume.status().history_used_units, used, "nothing leaked, nothing freed twice");
    assert_eq!(volume.status().history_retained_units, 2);

    // E: the last record pointing at the retained units goes: all history space is free.
    let report = run_step(&mut volume, &STEPS[4]);
    images.remove(&3);
    assert_eq!(report.retained_units, 0, "{report:?}");
    let status = volume.status();
    assert_eq!((status.history_used_units, status.history_retained_units), (0, 0), "{status:?}");
    close(volume);
    let reader = check_media(&media, &images, &[], "after E");
    assert_eq!(reader.verify().unwrap().retained_units, 0);
}

fn used_units(reader: &VolumeReader) -> u64 {
    reader.describe()["history"]["used_units"].as_u64().expect("used units")
}

/// FIG 41/42 under power cuts: each step of the script is cut after every write or flush of
/// the history device it makes (one run per cut point, from the same starting media). After
/// each cut the media hold either the state before the step or the state after it: images
/// exact (the step's given-up generation may be gone), `verify` passes (no pointer to a freed
/// unit, no retained extent nothing points at), and the history space in use is exactly the
/// before or the after amount (nothing leaked).
#[test]
fn a_power_cut_at_every_step_of_sharing_and_deleting_loses_nothing_and_leaks_nothing() {
    let media = Media::new(UNITS, 4 * UNITS, 8 * UNITS);
    let mut images = prepare(&media);
    let mut cut_points = 0u64;
    for (index, step) in STEPS.iter().enumerate() {
        let before = media.snapshot();
        let used_before = used_units(&check_media(&media, &images, &[], step.name));
        // The step without a cut: the state after it.
        let mut volume = open(&media);
        let report = run_step(&mut volume, step);
        if index == 0 {
            assert_eq!(report.dedup_shared_across, 3, "{report:?}");
        }
        close(volume);
        let mut after_images = images.clone();
        for generation in step.gone {
            after_images.remove(generation);
        }
        let used_after = used_units(&check_media(&media, &after_images, &[], step.name));
        let after = media.snapshot();

        for k in 1.. {
            media.restore(&before);
            let (channels, controllers) = media.fault_channels(k * 31 + index as u64);
            let mut volume = Volume::open(channels, script_options()).unwrap();
            volume.run_until_idle(&mut Vec::new());
            let history = &controllers[3];
            let done = |c: &FaultController| {
                let stats = c.stats();
                stats.kind(OperationKind::Write).completed + stats.kind(OperationKind::Flush).completed
            };
            let start_ops = done(history);
            let handle = start(&mut volume, step);
            let mut completions = Vec::new();
            while handle.result().is_none() && done(history) < start_ops + k {
                volume.poll(&mut completions);
            }
            let finished = handle.result().is_some();
            for controller in &controllers {
                controller.power_cut();
            }
            drop(volume);
            for controller in &controllers {
                controller.settle().unwrap();
            }
            let context = format!("{} cut after {k} history writes and flushes", step.name);
            let reader = check_media(&media, &images, step.gone, &context);
            let used = used_units(&reader);
            assert!(
                used == used_before || used == used_after,
                "{context}: {used} units in use, {used_before} before, {used_after} after"
            );
            drop(reader);
            // Recovery opens the volume and leaves it verified too.
            let volume = Volume::open(media.channels(), script_options()).unwrap();
            close(volume);
            check_media(&media, &images, step.gone, &context);
            cut_points += 1;
            if finished {
                break;
            }
        }
        media.restore(&after);
        images = after_images;
    }
    assert!(cut_points >= 15, "{cut_points} cut points");
    eprintln!("{cut_points} power cuts across the five steps, none lost or leaked anything");
}

/// Contents unique to (`generation`, `block`).
fn stamped(generation: u64, block: u64) -> Vec<u8> {
    let mut bytes = content((generation * 31 + block % 251) as u8 | 1);
    bytes[..16].copy_from_slice(&[generation.to_le_bytes(), block.to_le_bytes()].concat());
    bytes
}

/// Merges whose output repeats another live record's contents at the blocks `unchanged`
/// picks (every generation rewrites all `blocks`; generation 3 rewrites those with generation
/// 2's contents, so H3 repeats H2 there, block for block). Deleting generation 4 merges H3
/// and H4: the output (H3's elements) may point at H2's units. Then deleting generation 2
/// merges H2 away and the units shared with it stay retained. Default options (the run
/// policy in force). Returns the first merge's report and the retained extents and units
/// after the second; every image is checked and `verify` passes.
fn merge_repeating(blocks: u64, unchanged: impl Fn(u64) -> bool) -> (MergeReport, usize, u64) {
    let media = Media::new(blocks, 4 * blocks, 8 * blocks);
    format(media.channels(), &FormatOptions { copy_base_to_backup: false, ..Default::default() }, &mut |_| {}).unwrap();
    let mut volume = Volume::open(media.channels(), VolumeOptions::default()).unwrap();
    let mut image = vec![0u8; blocks as usize * UNIT];
    let mut images = BTreeMap::from([(0, image.clone())]);
    let mut completions = Vec::new();
    for generation in 1..=5u64 {
        for block in 0..blocks {
            let from = if generation == 3 && unchanged(block) { 2 } else { generation };
            image[block as usize * UNIT..][..UNIT].copy_from_slice(&stamped(from, block));
        }
        for (chunk, data) in image.chunks(64 * UNIT).enumerate() {
            write(&mut volume, chunk as u64 * 64, data);
        }
        let marked = volume.mark_and_wait("g", &mut completions).unwrap();
        images.insert(marked, image.clone());
        volume.run_until_idle(&mut completions);
    }
    close(volume);
    let mut volume = Volume::open(media.channels(), VolumeOptions::default()).unwrap();
    volume.run_until_idle(&mut completions);
    let report = run_step(&mut volume, &Step { name: "delete 4", delete: Some(4), merge: None, gone: &[4] });
    images.remove(&4);
    run_step(&mut volume, &Step { name: "delete 2", delete: Some(2), merge: None, gone: &[2] });
    images.remove(&2);
    close(volume);
    let verified = check_media(&media, &images, &[], "after the merges").verify().unwrap();
    (report, verified.retained_extents, verified.retained_units)
}

/// Dedup across records shares runs only (minimum run 16, at most 64 runs per merge): 128
/// scattered single-unit matches are all stored (without the policy: 128 shares and 128
/// retained extents later); 128 matches in one run store their first 15 and share 113 (one
/// retained extent); 70 runs of 20 share 5 units in each of the first 64 runs and store the
/// rest.
#[test]
fn scattered_matches_across_records_are_declined_and_runs_are_shared() {
    let (scattered, extents, units) = merge_repeating(256, |block| block % 2 == 0);
    assert_eq!((scattered.dedup_shared_across, scattered.dedup_declined_scattered), (0, 128), "{scattered:?}");
    assert_eq!((extents, units), (0, 0), "nothing shared, nothing retained");

    let (run, extents, units) = merge_repeating(256, |block| block < 128);
    assert_eq!((run.dedup_shared_across, run.dedup_declined_scattered), (113, 15), "{run:?}");
    assert_eq!((extents, units), (1, 113), "one run, one retained extent");

    let (runs, extents, units) = merge_repeating(70 * 21, |block| block % 21 != 20);
    assert_eq!((runs.dedup_shared_across, runs.dedup_declined_scattered), (64 * 5, 64 * 15 + 6 * 20), "{runs:?}");
    assert_eq!((extents, units), (64, 64 * 5), "one retained extent per shared run, 64 at most");
}
