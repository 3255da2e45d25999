//! Compression of sealed history (seed 001 embodiment 8, FIG 50) on memory devices, against a
//! model of every generation's image: compress and decompress round trips, restores, R-VOL
//! reads, rollbacks and merges of compressed records, a damaged frame, and power cuts at
//! every step of a compression and a decompression.

use std::collections::BTreeMap;
use std::sync::Arc;

use chronicle::device::{DmaBuf, IoBuffers, Payload};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{
    format, CompressReport, FormatOptions, HostError, HostRequest, RestoreId, Volume, VolumeOptions,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod support;
use support::memory::Media;

const UNIT: usize = 4096;
/// 512 units (2 MiB): a record of the whole volume has 8 frames.
const UNITS: u64 = 512;
const BLOCKS_PER_UNIT: u64 = UNIT as u64 / 512;

/// Contents of one unit: compressible text-like bytes, or random (incompressible) ones.
fn content(rng: &mut ChaCha8Rng, compressible: bool) -> Vec<u8> {
    let mut data = vec![0u8; UNIT];
    if compressible {
        let words: [&[u8]; 6] = [b"chronicle ", b"generation ", b"history ", b"record ", b"frame ", b"0123456789 "];
        let mut at = 0;
        while at < UNIT {
            let word = words[rng.random_range(0..words.len())];
            let n = word.len().min(UNIT - at);
            data[at..at + n].copy_from_slice(&word[..n]);
            at += n;
        }
    } else {
        rng.fill_bytes(&mut data);
    }
    data
}

/// Every match across records shared (no minimum run): the scenarios' shares are scattered
/// single units, and what is tested is how compression moves shared and retained units.
fn volume_options() -> VolumeOptions {
    VolumeOptions { dedup_min_run: 1, ..VolumeOptions::default() }
}

struct Scenario {
    media: Media,
    volume: Volume,
    current: Vec<u8>,
    images: BTreeMap<u64, Vec<u8>>,
    rng: ChaCha8Rng,
    completions: Vec<chronicle::engine::HostCompletion>,
    next_tag: u64,
}

impl Scenario {
    fn new(seed: u64) -> Self {
        Scenario::with_format(seed, FormatOptions { copy_base_to_backup: false, ..Default::default() })
    }

    fn with_format(seed: u64, options: FormatOptions) -> Self {
        let media = Media::new(UNITS, 4 * UNITS, 24 * UNITS);
        format(media.channels(), &options, &mut |_| {}).unwrap();
        let volume = Volume::open(media.channels(), volume_options()).unwrap();
        let zero = vec![0u8; UNITS as usize * UNIT];
        Scenario {
            media,
            volume,
            current: zero.clone(),
            images: BTreeMap::from([(0, zero)]),
            rng: ChaCha8Rng::seed_from_u64(seed),
            completions: Vec::new(),
            next_tag: 0,
        }
    }

    /// Writes `units` units (a share `compressible` of them compressible), marks a generation
    /// and records its image.
    fn generation(&mut self, units: usize, compressible: f64) -> u64 {
        let picks: Vec<u64> = (0..units).map(|_| self.rng.random_range(0..UNITS)).collect();
        self.generation_at(&picks, compressible)
    }

    /// Writes every unit of the volume once, then marks a generation.
    fn generation_all(&mut self, compressible: f64) -> u64 {
        self.generation_at(&(0..UNITS).collect::<Vec<_>>(), compressible)
    }

    fn generation_at(&mut self, units: &[u64], compressible: f64) -> u64 {
        self.generation_from(units, |rng| {
            let squeezable = rng.random_bool(compressible);
            content(rng, squeezable)
        })
    }

    /// Writes `units` with the contents `make` gives, then marks a generation.
    fn generation_from(&mut self, units: &[u64], mut make: impl FnMut(&mut ChaCha8Rng) -> Vec<u8>) -> u64 {
        for unit in units.iter().copied() {
            let data = make(&mut self.rng);
            self.current[unit as usize * UNIT..(unit as usize + 1) * UNIT].copy_from_slice(&data);
            let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(&data)));
            self.next_tag += 1;
            self.volume.submit(self.next_tag, HostRequest::Write { offset_blocks: unit * BLOCKS_PER_UNIT, buffers });
            self.volume.run_until_idle(&mut self.completions);
        }
        assert!(self.completions.iter().all(|c| c.result.is_ok()), "writes succeed");
        self.completions.clear();
        let generation = self.volume.mark_and_wait("g", &mut self.completions).unwrap();
        self.images.insert(generation, self.current.clone());
        self.volume.run_until_idle(&mut self.completions);
        generation
    }

    fn compress(&mut self, generation: u64) -> CompressReport {
        let handle = self.volume.compress_generation(generation);
        self.volume.wait_compression(&handle, &mut self.completions).unwrap()
    }

    fn decompress(&mut self, generation: u64) -> CompressReport {
        let handle = self.volume.decompress_generation(generation);
        self.volume.wait_compression(&handle, &mut self.completions).unwrap()
    }

    /// History records: (generation, compressed, stored bytes, original bytes).
    fn records(&self) -> Vec<(u64, bool, u64, u64)> {
        self.volume
            .status()
            .generations
            .iter()
            .filter(|g| g.state == "history" || g.state == "merged")
            .map(|g| (g.generation, g.compressed, g.stored_bytes, g.original_bytes))
            .collect()
    }

    fn open_restore(&mut self, generation: u64) -> RestoreId {
        let handle = self.volume.open_restore(generation);
        loop {
            if let Some(result) = handle.result() {
                return result.unwrap();
            }
            self.volume.poll(&mut self.completions);
        }
    }

    /// Reads `units` units at `first` from R-VOL `restore`, `per_read` units a request.
    fn read_restore(&mut self, restore: RestoreId, first: u64, units: u64) -> Result<Vec<u8>, HostError> {
        self.next_tag += 1;
        let tag = self.next_tag;
        let request = HostRequest::Read {
            offset_blocks: first * BLOCKS_PER_UNIT,
            buffers: IoBuffers::single(DmaBuf::zeroed(units as usize * UNIT)),
        };
        self.volume.submit_restore(restore, tag, request);
        let completion = loop {
            if let Some(at) = self.completions.iter().position(|c| c.tag == tag) {
                break self.completions.remove(at);
            }
            self.volume.poll(&mut self.completions);
        };
        completion.result?;
        match completion.payload {
            Payload::Read(buffers) => Ok(buffers.to_vec()),
            other => panic!("a read gives its buffers back, got {other:?}"),
        }
    }

    /// The whole R-VOL, one unit a read (the single-unit path) and in 16-unit reads.
    fn restore_image(&mut self, restore: RestoreId) -> Vec<u8> {
        let by_unit: Vec<u8> = (0..UNITS).flat_map(|u| self.read_restore(restore, u, 1).expect("R-VOL read")).collect();
        let by_run: Vec<u8> =
            (0..UNITS / 16).flat_map(|r| self.read_restore(restore, r * 16, 16).expect("R-VOL read")).collect();
        assert!(by_unit == by_run, "single-unit and multi-unit R-VOL reads agree");
        by_unit
    }

    /// Every generation of the model restores exactly and verify passes; the same after a
    /// reopen. Returns the compressed records verify checked.
    fn check(&mut self) -> usize {
        let mut compressed = 0;
        for pass in 0..2 {
            self.volume.run_until_idle(&mut self.completions);
            let reader = VolumeReader::open(self.media.channels()).unwrap();
            for (generation, image) in &self.images {
                assert!(
                    reader.read_image(*generation).unwrap() == *image,
                    "pass {pass}: generation {generation} exact"
                );
            }
            let report = reader.verify().unwrap();
            compressed = report.compressed_records;
            drop(reader);
            if pass == 0 {
                self.volume.begin_close();
                while self.volume.poll_close(&mut self.completions).is_pending() {}
                self.volume = Volume::open(self.media.channels(), volume_options()).unwrap();
            }
        }
        compressed
    }
}

#[test]
fn compress_and_decompress_keep_every_generation_exact_and_save_space() {
    let mut s = Scenario::new(1);
    // H(0): zeros of the whole volume (8 frames); H(1): random contents of the whole volume
    // (does not shrink); then records of mixed contents.
    s.generation_all(0.0);
    s.generation_all(0.8);
    for share in [0.9, 0.5, 0.7, 1.0] {
        s.generation(120, share);
    }
    s.generation(10, 1.0);
    let used_before = s.volume.status().history_used_units;
    let mut saved = 0;
    for (generation, _, _, _) in s.records() {
        let report = s.compress(generation);
        if report.compressed {
            assert!(report.units_after < report.units_before, "{report:?}");
            assert!(report.stored_bytes < report.original_bytes);
            saved += report.units_before - report.units_after;
        } else {
            assert_eq!(report.units_after, report.units_before, "left as it was: {report:?}");
        }
    }
    let records = s.records();
    let compressed: Vec<u64> = records.iter().filter(|r| r.1).map(|r| r.0).collect();
    assert!(compressed.len() >= 4, "the compressible records shrink: {records:?}");
    assert!(records.iter().any(|r| !r.1), "the random record does not shrink: {records:?}");
    assert_eq!(s.volume.status().history_used_units, used_before - saved, "what compression saved is free");
    let status = s.volume.status();
    assert_eq!(
        status.history_compression_saved_bytes,
        records.iter().filter(|r| r.1).map(|r| r.3 - r.2).sum::<u64>(),
        "status counts what the compressed records save"
    );
    // Compressing twice is refused, with nothing changed.
    let handle = s.volume.compress_generation(compressed[0]);
    let error = s.volume.wait_compression(&handle, &mut s.completions).unwrap_err().to_string();
    assert!(error.contains("compressed already"), "{error}");
    assert_eq!(s.check(), compressed.len(), "verify checks every compressed record's frames");

    // Back: every decompressed record holds its original size again.
    for generation in compressed.iter().step_by(2) {
        let report = s.decompress(*generation);
        assert!(!report.compressed && report.stored_bytes == report.original_bytes, "{report:?}");
    }
    let handle = s.volume.decompress_generation(records.iter().find(|r| !r.1).unwrap().0);
    assert!(s.volume.wait_compression(&handle, &mut s.completions).unwrap_err().to_string().contains("not compressed"));
    assert_eq!(s.check(), compressed.len() / 2);
}

#[test]
fn restore_volumes_rollbacks_and_merges_read_compressed_records() {
    let mut s = Scenario::new(2);
    for share in [1.0, 0.8, 0.6, 0.9, 0.7] {
        s.generation(150, share);
    }
    // An R-VOL opened before its records are compressed keeps showing its generation.
    let restore = s.open_restore(1);
    let before = s.restore_image(restore);
    assert!(before == s.images[&1]);
    for (generation, _, _, _) in s.records() {
        s.compress(generation);
    }
    assert!(s.records().iter().all(|r| r.1), "every record compressed: {:?}", s.records());
    assert!(s.restore_image(restore) == s.images[&1], "R-VOL of 1 after compression of its records");
    // One opened on compressed records.
    let second = s.open_restore(3);
    assert!(s.restore_image(second) == s.images[&3]);
    // R-VOL writes still redirect; the compressed history is not changed.
    s.volume.close_restore(second).unwrap();

    // A merge of compressed records (the merged record is not compressed) gives up 3.
    let handle = s.volume.merge(2, 3);
    let report = s.volume.wait_maintenance(&handle, &mut s.completions).unwrap();
    assert_eq!(report.records, 2);
    s.images.remove(&3);
    assert!(s.restore_image(restore) == s.images[&1], "R-VOL of 1 after the merge");
    let records = s.records();
    assert!(records.iter().any(|r| r.0 == 2 && !r.1), "{records:?}");
    // Deleting a compressed generation merges it into the one before.
    let handle = s.volume.delete_generation(4);
    s.volume.wait_maintenance(&handle, &mut s.completions).unwrap();
    s.images.remove(&4);
    s.volume.close_restore(restore).unwrap();
    s.volume.run_until_idle(&mut s.completions);
    s.check();

    // Roll the base back to generation 1, whose record is compressed.
    let records = s.records();
    assert!(records.iter().any(|r| r.0 == 1 && r.1), "{records:?}");
    let handle = s.volume.rollback(1, "back to 1");
    let rolled = loop {
        if let Some(result) = handle.result() {
            break result.unwrap();
        }
        s.volume.poll(&mut s.completions);
    };
    s.volume.run_until_idle(&mut s.completions);
    s.images.insert(rolled - 1, s.current.clone());
    s.current = s.images[&1].clone();
    s.images.insert(rolled, s.current.clone());
    s.check();
}

#[test]
fn retention_compresses_the_records_older_than_keep_last() {
    let mut s = Scenario::new(3);
    s.volume.set_retention(chronicle::engine::RetentionPolicy {
        keep_last: Some(2),
        compress_older: true,
        ..Default::default()
    });
    for share in [1.0, 0.0, 0.9, 0.8, 0.7, 1.0] {
        s.generation(100, share);
    }
    s.volume.run_until_idle(&mut s.completions);
    let records = s.records();
    let (older, newest) = records.split_at(records.len() - 2);
    assert!(newest.iter().all(|r| !r.1), "the newest two stay as they are: {records:?}");
    assert!(older.len() >= 3 && older.iter().all(|r| r.1), "older ones compressed: {records:?}");
    let policy = chronicle::engine::RetentionPolicy { compress_older: true, ..Default::default() };
    assert!(policy.validate().is_err(), "compress_older needs keep_last");
    s.check();
}

/// Offset on the history device of the first frame table (found by its magic).
fn frame_table_offset(media: &Media) -> usize {
    let history = media.device(3).snapshot();
    (0..history.len() / UNIT)
        .map(|u| u * UNIT)
        .find(|at| &history[*at..*at + 8] == b"CHRNFRMT")
        .expect("a compressed record's frame table")
}

#[test]
fn a_damaged_frame_is_a_typed_error_for_restore_verify_and_restore_volumes() {
    let mut s = Scenario::new(4);
    s.generation(300, 1.0);
    s.generation(50, 1.0);
    // H(0) holds zeros of about 230 units: four frames.
    let report = s.compress(0);
    assert!(report.compressed && report.frames > 1, "{report:?}");
    // Flip a byte of frame 0 (right after the table's unit).
    let at = frame_table_offset(&s.media) + UNIT + 100;
    let mut byte = s.media.device(3).read_blocks((at / 512) as u64, 1);
    byte[at % 512] ^= 0x20;
    s.media.device(3).write_blocks((at / 512) as u64, &byte);

    // The volume opened before the damage reads it through an R-VOL: a damaged error, no panic.
    let restore = s.open_restore(0);
    let error = (0..UNITS).find_map(|u| s.read_restore(restore, u, 1).err()).expect("a damaged unit fails");
    assert!(matches!(error, HostError::Damaged(ref why) if why.contains("checksum")), "{error:?}");
    s.volume.close_restore(restore).unwrap();

    let reader = VolumeReader::open(s.media.channels()).unwrap();
    let error = reader.read_image(0).unwrap_err().to_string();
    assert!(error.contains("damaged") && error.contains("checksum"), "{error}");
    assert!(reader.verify().unwrap_err().to_string().contains("compressed frame"));
    // Generations that do not read the damaged record still restore.
    assert!(reader.read_image(1).unwrap() == s.images[&1]);
    // Decompressing it fails cleanly and leaves it compressed.
    let handle = s.volume.decompress_generation(0);
    assert!(s.volume.wait_compression(&handle, &mut s.completions).is_err());
    assert!(s.records().iter().any(|r| r.0 == 0 && r.1));

    // A damaged frame table is refused at the read too.
    let table = frame_table_offset(&s.media);
    let mut block = s.media.device(3).read_blocks((table / 512) as u64, 1);
    block[40] ^= 1;
    s.media.device(3).write_blocks((table / 512) as u64, &block);
    let reader = VolumeReader::open(s.media.channels()).unwrap();
    let error = reader.read_image(0).unwrap_err().to_string();
    assert!(error.contains("frame table"), "{error}");
}

/// Runs a compression (or decompression) of `generation` on fault devices and cuts the power
/// after `steps` polls; returns whether it had finished.
fn cut_during(media: &Media, seed: u64, generation: u64, compress: bool, steps: usize) -> bool {
    let (channels, controllers) = media.fault_channels(seed);
    let mut volume = Volume::open(channels, volume_options()).unwrap();
    let mut completions = Vec::new();
    volume.run_until_idle(&mut completions);
    let handle =
        if compress { volume.compress_generation(generation) } else { volume.decompress_generation(generation) };
    for _ in 0..steps {
        if handle.result().is_some() {
            break;
        }
        volume.poll(&mut completions);
    }
    let done = handle.result().is_some();
    for controller in &controllers {
        controller.power_cut();
    }
    drop(volume);
    for controller in &controllers {
        controller.settle().unwrap();
    }
    done
}

#[test]
fn power_cuts_during_compression_and_decompression_lose_nothing() {
    let mut s = Scenario::new(5);
    for share in [0.9, 0.7, 0.95] {
        s.generation(200, share);
    }
    let images = s.images.clone();
    drop(s.volume);
    let media = s.media;
    let mut cuts = 0;
    for (round, compress) in [(0u64, true), (1, false), (2, true), (3, false)] {
        let generation = 1 + round / 2;
        let mut steps = 1;
        loop {
            let done = cut_during(&media, 100 * round + steps as u64, generation, compress, steps);
            cuts += 1;
            // After every cut: each generation exact, verify clean, the record either as it was
            // or fully switched.
            let reader = VolumeReader::open(media.channels()).unwrap();
            for (g, image) in &images {
                assert!(
                    reader.read_image(*g).unwrap() == *image,
                    "round {round} cut after {steps} polls: generation {g}"
                );
            }
            reader.verify().unwrap();
            let state = reader.generations().iter().find(|g| g.generation == generation).map(|g| g.compressed);
            if done {
                assert_eq!(state, Some(compress), "a completed request is durable");
                break;
            }
            if state == Some(compress) {
                // Committed before the cut: the request is done.
                break;
            }
            steps += 1 + steps / 4;
        }
    }
    eprintln!("{cuts} power cuts during compressions and decompressions");
    assert!(cuts >= 8, "{cuts} power cuts");
}

/// Contents from `pool` (repeated across generations, so merges share them across records)
/// or fresh, half and half; all text-like, so records compress.
fn pooled(pool: &[Vec<u8>]) -> impl FnMut(&mut ChaCha8Rng) -> Vec<u8> + '_ {
    |rng| if rng.random_bool(0.5) { pool[rng.random_range(0..pool.len())].clone() } else { content(rng, true) }
}

/// Dedup across records (FIG 39–42) with compression: compressing a record whose units other
/// records point at keeps those units, retained, in the same catalog write; a record that
/// points at other records' units keeps pointing at them, compressed and decompressed; merges
/// of compressed records share nothing inside them. Every image, an R-VOL and `verify` (every
/// shared pointer lands in an uncompressed record or a retained extent, every retained extent
/// is pointed at) hold throughout, and after reopens.
#[test]
fn compression_keeps_the_units_other_records_share_and_its_own_shares() {
    let mut s = Scenario::new(5);
    let pool: Vec<Vec<u8>> = {
        let mut rng = ChaCha8Rng::seed_from_u64(55);
        (0..8).map(|_| content(&mut rng, true)).collect()
    };
    for _ in 0..8 {
        let units: Vec<u64> = (0..80).map(|_| s.rng.random_range(0..UNITS)).collect();
        s.generation_from(&units, pooled(&pool));
    }
    // Every other generation deleted, newest first: each merge points at equal units of the
    // record before it.
    let records = s.records();
    for index in (1..records.len()).rev().step_by(2) {
        let handle = s.volume.delete_generation(records[index].0);
        s.volume.wait_maintenance(&handle, &mut s.completions).unwrap();
        s.images.remove(&records[index].0);
    }
    let shared_across = |s: &mut Scenario| {
        s.volume.run_until_idle(&mut s.completions);
        VolumeReader::open(s.media.channels()).unwrap().verify().unwrap().shared_across_elements
    };
    let across = shared_across(&mut s);
    assert!(across > 0, "merges shared units across records");
    let retained_before = s.volume.status().history_retained_units;
    let viewed = s.records()[1].0;
    let restore = s.open_restore(viewed);

    let (mut compressed, mut kept, mut sharing) = (Vec::new(), 0, 0);
    for (generation, _, _, _) in s.records() {
        let report = s.compress(generation);
        if report.compressed {
            compressed.push(generation);
            kept += report.retained_for_others;
            sharing += u64::from(report.shared_across > 0);
        }
    }
    assert!(compressed.len() >= 3, "records compress: {:?}", s.records());
    assert!(sharing > 0, "records pointing at other records' units were compressed");
    assert_eq!(shared_across(&mut s), across, "compressed records keep pointing at the same units");
    let retained = s.volume.status().history_retained_units;
    assert!(retained > retained_before, "units others point at stay: {retained_before} -> {retained}");
    assert_eq!(retained - retained_before, kept, "the compressions report the units they kept");
    assert!(s.restore_image(restore) == s.images[&viewed], "R-VOL of {viewed} after the compressions");
    assert_eq!(s.check(), compressed.len());

    // A merge of two compressed records (its output is not compressed); a new merge never
    // points into a compressed record's frames (verify checks it).
    let records = s.records();
    let handle = s.volume.delete_generation(records[2].0);
    s.volume.wait_maintenance(&handle, &mut s.completions).unwrap();
    s.images.remove(&records[2].0);
    s.check();
    let restore = s.open_restore(viewed);
    assert!(s.restore_image(restore) == s.images[&viewed], "R-VOL of {viewed} after the merge");
    s.volume.close_restore(restore).unwrap();

    // Back: decompressed records point at the same units again; nothing leaks.
    for (generation, is_compressed, _, _) in s.records() {
        if is_compressed {
            s.decompress(generation);
        }
    }
    s.check();
    let used = s.volume.status().history_used_units;
    s.volume.begin_close();
    while s.volume.poll_close(&mut s.completions).is_pending() {}
    s.volume = Volume::open(s.media.channels(), volume_options()).unwrap();
    assert_eq!(s.volume.status().history_used_units, used, "the allocator rebuilt from the catalog agrees");
}

/// "All" journal mode: a generation without writes keeps a versions entry without units
/// (`control_start` 0). Giving up the image below it drops that entry — which once also made
/// the volume forget that the record whose control block is at unit 0 is compressed, so
/// R-VOLs and merges read its logical addresses as history units (the wrong R-VOL data the
/// simulation found, seed 2000004). The record here is placed at unit 0 on purpose.
#[test]
fn all_mode_dropping_an_empty_versions_entry_keeps_compressed_records_readable() {
    let options = FormatOptions {
        journal_mode: chronicle::core::format::superblock::JournalMode::All,
        copy_base_to_backup: false,
        ..Default::default()
    };
    let mut s = Scenario::with_format(6, options);
    s.generation(100, 1.0);
    s.generation(100, 1.0);
    let empty = s.generation(0, 1.0);
    s.generation(60, 1.0);
    s.generation(60, 1.0);
    // H(0)'s control block is at unit 0; compressing H(0) frees it, and H(4)'s compression takes it.
    assert!(s.compress(0).compressed);
    assert!(s.compress(4).compressed);
    s.volume.run_until_idle(&mut s.completions);
    let described = VolumeReader::open(s.media.channels()).unwrap().describe();
    let at_zero = described["history"]["entries"]
        .as_array()
        .expect("catalog entries")
        .iter()
        .find(|e| e["control_start"] == 0 && e["kind"] == "History")
        .cloned();
    assert!(
        at_zero.as_ref().is_some_and(|e| e["generation"] == 4 && e["flags"].as_u64().unwrap() & 1 == 1),
        "compressed H(4) has its control block at unit 0: {at_zero:?}\n{described:#}"
    );
    // Giving up image `empty - 1` drops the versions entry of `empty`.
    let handle = s.volume.delete_generation(empty - 1);
    s.volume.wait_maintenance(&handle, &mut s.completions).unwrap();
    s.images.remove(&(empty - 1));
    let restore = s.open_restore(4);
    assert!(s.restore_image(restore) == s.images[&4], "R-VOL of 4 reads its compressed record");
    s.volume.close_restore(restore).unwrap();
    let handle = s.volume.merge(3, 4);
    s.volume.wait_maintenance(&handle, &mut s.completions).unwrap();
    s.images.remove(&4);
    s.check();
}
