//! `chronicle load` and `chronicle check`: a crash-consistency pair. `load` writes random
//! host-write-size blocks whose payload identifies itself — magic, block, sequence, seed and a
//! crc32c of the rest — and logs every acknowledged write. `check` recovers the volume and
//! verifies that every block is self-consistent, holds the newest acknowledged write or a newer
//! one, and that every sealed generation is self-consistent and no newer than the next.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chronicle::core::payload::{fill, parse, Content};
use chronicle::device::{DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{HostRequest, Volume, VolumeOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::host;

/// What `chronicle load` writes and when it cuts markers.
pub struct LoadOptions {
    pub seconds: f64,
    pub queue_depth: usize,
    pub marker_every_ms: Option<u64>,
    /// A marker after every so many writes submitted, exactly.
    pub marker_every_writes: Option<u64>,
    /// At most so many writes.
    pub writes: Option<u64>,
    pub seed: u64,
}

pub fn load(dir: &Path, options: &LoadOptions, ack_log: Option<&Path>) -> Result<ExitCode> {
    let LoadOptions { seconds, queue_depth, marker_every_ms, marker_every_writes, writes, seed } = *options;
    let mut volume = Volume::open(host::open_channels(dir, None, false, None)?, VolumeOptions::default())
        .with_context(|| format!("cannot open {}", dir.display()))?;
    let status = volume.status();
    let unit = status.host_write_size as usize;
    let units = status.volume_bytes / unit as u64;
    let blocks_per_unit = unit as u64 / 4096;
    let mut log = match ack_log {
        Some(path) => Some(BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        )),
        None => None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Sequences grow across runs: a run starts above every earlier run's sequences.
    let base_sequence =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut next = 0u64;
    let mut in_flight: HashMap<u64, (u64, u64)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut next_marker = marker_every_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
    // The write before which the next counted marker is cut (submission stops there for it).
    let mut marker_write = marker_every_writes.unwrap_or(u64::MAX);
    let last_write = writes.unwrap_or(u64::MAX);
    let (mut acknowledged, mut markers) = (0u64, 0u64);
    let mut failures = host::ErrorTally::default();
    let started = Instant::now();
    let mut completions = Vec::new();
    loop {
        let now = Instant::now();
        let running = now < deadline && next < last_write;
        if running && next == marker_write {
            volume.mark(&format!("load marker {markers}"));
            markers += 1;
            marker_write += marker_every_writes.expect("counted markers");
        }
        while running && in_flight.len() < queue_depth && next < marker_write && next < last_write {
            let block = rng.random_range(0..units);
            let sequence = base_sequence + next;
            let mut buffer = DmaBuf::zeroed(unit);
            fill(buffer.as_mut_slice(), block, sequence, seed);
            volume.submit(
                next,
                HostRequest::Write {
                    offset_blocks: block * blocks_per_unit,
                    buffers: Arc::new(IoBuffers::single(buffer)),
                },
            );
            in_flight.insert(next, (block, sequence));
            next += 1;
        }
        if let Some(at) = next_marker {
            if running && now >= at {
                volume.mark(&format!("load marker {markers}"));
                markers += 1;
                next_marker = marker_every_ms.map(|ms| now + Duration::from_millis(ms));
            }
        }
        if !running && in_flight.is_empty() {
            break;
        }
        volume.poll(&mut completions);
        let logged = acknowledged;
        for completion in completions.drain(..) {
            let (block, sequence) = in_flight.remove(&completion.tag).expect("every completion was submitted");
            match completion.result {
                Ok(()) => {
                    acknowledged += 1;
                    if let Some(log) = log.as_mut() {
                        writeln!(log, "{block} {sequence}")?;
                    }
                }
                Err(error) => {
                    if failures.add(&error) {
                        eprintln!("chronicle load: write to block {block} failed: {error}");
                    }
                }
            }
        }
        // Hand acknowledgements to the kernel at once, so that a `kill -9` loses none of them
        // (the page cache keeps them; a power loss is not what this log is for).
        if acknowledged > logged {
            if let Some(log) = log.as_mut() {
                log.flush()?;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(mut log) = log {
        log.flush()?;
    }
    let flushed = std::cell::Cell::new(false);
    volume.submit(u64::MAX, HostRequest::Flush);
    host::drive(&mut volume, |_, _| flushed.set(true), |_| flushed.get());
    let status = volume.status();
    volume.close()?;
    let failed = failures.total();
    println!(
        "chronicle load: {acknowledged} writes acknowledged ({:.0} IOPS), {failed} failed, {markers} markers; open generation {}, backup generation {}, marker hold max {} µs",
        acknowledged as f64 / elapsed,
        status.open_generation,
        status.backup_generation,
        status.control.marker_hold_max_us
    );
    for line in failures.lines() {
        eprintln!("chronicle load: failed writes: {line}");
    }
    if let Some(error) = &status.sort_error {
        eprintln!("chronicle load: the sort stopped: {error}");
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The sequences found in one generation's image (0: never written), and its problems.
fn scan_generation(reader: &VolumeReader, generation: u64, problems: &mut Vec<String>) -> Result<Vec<u64>> {
    let unit = reader.unit_bytes() as usize;
    let image = reader.read_image(generation).with_context(|| format!("cannot read generation {generation}"))?;
    let mut sequences = Vec::with_capacity(image.len() / unit);
    for (block, data) in image.chunks(unit).enumerate() {
        match parse(data, block as u64) {
            Content::Zero => sequences.push(0),
            Content::Write { sequence } => sequences.push(sequence),
            Content::Invalid(why) => {
                problems.push(format!("generation {generation}, block {block}: {why}"));
                sequences.push(0);
            }
        }
    }
    Ok(sequences)
}

/// Blocks of `newer` that hold an older write than `older`.
fn regressions(older: &[u64], newer: &[u64]) -> usize {
    older.iter().zip(newer).filter(|(a, b)| a > b).count()
}

/// What one checker thread found over a run of consecutive generations.
struct Scanned {
    first: Vec<u64>,
    last: Vec<u64>,
    problems: Vec<String>,
}

/// Scans consecutive `generations` with a reader of its own, comparing each with the previous.
fn scan_run(dir: &Path, generations: &[u64]) -> Result<Scanned> {
    let reader = VolumeReader::open(host::open_channels(dir, None, true, None)?)
        .with_context(|| format!("{} cannot be opened", dir.display()))?;
    let mut problems = Vec::new();
    let mut first = Vec::new();
    let mut previous: Option<(u64, Vec<u64>)> = None;
    for generation in generations {
        let sequences = scan_generation(&reader, *generation, &mut problems)?;
        match &previous {
            None => first = sequences.clone(),
            Some((older, older_sequences)) => {
                let count = regressions(older_sequences, &sequences);
                if count > 0 {
                    problems.push(format!(
                        "{count} blocks of generation {generation} are older than in generation {older}"
                    ));
                }
            }
        }
        previous = Some((*generation, sequences));
    }
    Ok(Scanned { first, last: previous.map(|(_, s)| s).unwrap_or_default(), problems })
}

pub fn check(dir: &Path, ack_log: Option<&Path>, since_generation: u64, threads: usize) -> Result<ExitCode> {
    // Recovery first: open and close the volume read-write (closing lets the sort catch up).
    let mut volume = Volume::open(host::open_channels(dir, None, false, None)?, VolumeOptions::default())
        .with_context(|| format!("{} cannot be opened", dir.display()))?;
    let mut completions = Vec::new();
    volume.run_until_idle(&mut completions);
    let status = volume.status();
    volume.close()?;
    if let Some(error) = &status.sort_error {
        // Not a consistency problem: the sealed generations stay in the journal and are
        // checked from there.
        eprintln!("chronicle check: warning: the sort stopped: {error}");
    }
    let reader = VolumeReader::open(host::open_channels(dir, None, true, None)?)?;
    let mut problems = Vec::new();

    let mut newest_acknowledged: HashMap<u64, u64> = HashMap::new();
    let mut log_lines = 0u64;
    if let Some(path) = ack_log {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        for line in BufReader::new(file).lines() {
            let line = line?;
            let mut fields = line.split_whitespace();
            // A torn last line (the writer was killed) is skipped.
            if let (Some(block), Some(sequence), None) = (fields.next(), fields.next(), fields.next()) {
                if let (Ok(block), Ok(sequence)) = (block.parse::<u64>(), sequence.parse::<u64>()) {
                    let entry = newest_acknowledged.entry(block).or_default();
                    *entry = (*entry).max(sequence);
                    log_lines += 1;
                }
            }
        }
    }

    // Every readable generation from `since_generation` on, oldest first; the base (open
    // generation) last. Generations are read by up to `threads` readers at once, each over a
    // run of consecutive generations (reading is mostly waiting for single-unit reads), with
    // no more than about 1 GiB of images in memory at once.
    let open_generation = reader.open_generation();
    let generations: Vec<u64> = reader
        .generations()
        .iter()
        .map(|g| g.generation)
        .filter(|g| *g >= since_generation.min(open_generation) && reader.source(*g).is_some())
        .collect();
    let volume_bytes = reader.volume_bytes();
    drop(reader);
    let threads = threads.clamp(1, ((1u64 << 30) / volume_bytes.max(1)).max(1) as usize).min(generations.len().max(1));
    let run_length = generations.len().div_ceil(threads).max(1);
    let scanned: Vec<Result<Scanned>> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            generations.chunks(run_length).map(|run| scope.spawn(move || scan_run(dir, run))).collect();
        handles.into_iter().map(|h| h.join().expect("a checker thread panicked")).collect()
    });
    let mut final_sequences = Vec::new();
    let mut previous_last: Option<(u64, Vec<u64>)> = None;
    for (run, scanned) in generations.chunks(run_length).zip(scanned) {
        let scanned = scanned?;
        if let Some((older, older_sequences)) = &previous_last {
            let count = regressions(older_sequences, &scanned.first);
            if count > 0 {
                problems.push(format!("{count} blocks of generation {} are older than in generation {older}", run[0]));
            }
        }
        problems.extend(scanned.problems);
        final_sequences = scanned.last.clone();
        previous_last = Some((*run.last().expect("chunks are not empty"), scanned.last));
    }
    let mut lost = 0u64;
    for (block, sequence) in &newest_acknowledged {
        if final_sequences.get(*block as usize).is_none_or(|found| found < sequence) {
            lost += 1;
            if lost <= 5 {
                problems.push(format!("block {block}: acknowledged write {sequence} is missing"));
            }
        }
    }
    if lost > 5 {
        problems.push(format!("... {lost} acknowledged writes missing in all"));
    }
    println!(
        "chronicle check: {} generations checked ({}), {} acknowledged writes in the log over {} blocks",
        generations.len(),
        generations.iter().map(u64::to_string).collect::<Vec<_>>().join(" "),
        log_lines,
        newest_acknowledged.len()
    );
    if problems.is_empty() {
        println!("chronicle check: ok");
        Ok(ExitCode::SUCCESS)
    } else {
        for problem in problems.iter().take(20) {
            eprintln!("  {problem}");
        }
        eprintln!("chronicle check: FAILED ({} problems)", problems.len());
        Ok(ExitCode::FAILURE)
    }
}
