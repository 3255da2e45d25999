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
use chronicle::core::checksum::crc32c;
use chronicle::device::{DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{HostRequest, Volume, VolumeOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::host;

const MAGIC: &[u8; 8] = b"CHRNLOAD";
const HEADER: usize = 36;

/// Fills `buffer` with the payload of (block, sequence, seed).
fn fill(buffer: &mut [u8], block: u64, sequence: u64, seed: u64) {
    buffer[..8].copy_from_slice(MAGIC);
    buffer[8..16].copy_from_slice(&block.to_le_bytes());
    buffer[16..24].copy_from_slice(&sequence.to_le_bytes());
    buffer[24..32].copy_from_slice(&seed.to_le_bytes());
    let mut state = block ^ sequence.rotate_left(17) ^ seed.rotate_left(41) ^ 0x9E37_79B9_7F4A_7C15;
    for chunk in buffer[HEADER..].chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let crc = crc32c(&buffer[HEADER..]);
    buffer[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// What a block holds: never written (all zero), a valid payload, or garbage.
#[derive(Debug, PartialEq, Eq)]
enum Content {
    Zero,
    Write { sequence: u64 },
    Invalid(String),
}

fn parse(buffer: &[u8], block: u64) -> Content {
    if buffer.iter().all(|b| *b == 0) {
        return Content::Zero;
    }
    if &buffer[..8] != MAGIC {
        return Content::Invalid("no payload magic".into());
    }
    let field = |at: usize| u64::from_le_bytes(buffer[at..at + 8].try_into().expect("8 bytes"));
    if field(8) != block {
        return Content::Invalid(format!("payload of block {} found at block {block}", field(8)));
    }
    let stored = u32::from_le_bytes(buffer[32..36].try_into().expect("4 bytes"));
    if crc32c(&buffer[HEADER..]) != stored {
        return Content::Invalid("payload checksum mismatch (torn or corrupt)".into());
    }
    Content::Write { sequence: field(16) }
}

pub fn load(
    dir: &Path,
    seconds: f64,
    queue_depth: usize,
    marker_every_ms: Option<u64>,
    seed: u64,
    ack_log: Option<&Path>,
) -> Result<ExitCode> {
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
    let (mut acknowledged, mut failed, mut markers) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut completions = Vec::new();
    loop {
        let now = Instant::now();
        let running = now < deadline;
        while running && in_flight.len() < queue_depth {
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
                    failed += 1;
                    if failed <= 5 {
                        eprintln!("chronicle load: write to block {block} failed: {error}");
                    }
                }
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
    println!(
        "chronicle load: {acknowledged} writes acknowledged ({:.0} IOPS), {failed} failed, {markers} markers; open generation {}, backup generation {}",
        acknowledged as f64 / elapsed,
        status.open_generation,
        status.backup_generation
    );
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub fn check(dir: &Path, ack_log: Option<&Path>) -> Result<ExitCode> {
    // Recovery first: open and close the volume read-write.
    let volume = Volume::open(host::open_channels(dir, None, false, None)?, VolumeOptions::default())
        .with_context(|| format!("{} cannot be opened", dir.display()))?;
    volume.close()?;
    let reader = VolumeReader::open(host::open_channels(dir, None, true, None)?)?;
    let unit = reader.unit_bytes() as usize;
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

    // Every readable generation, oldest first; the base (open generation) last.
    let generations: Vec<u64> =
        reader.generations().iter().map(|g| g.generation).filter(|g| reader.source(*g).is_some()).collect();
    let mut previous: Option<(u64, Vec<u64>)> = None;
    let mut final_sequences = Vec::new();
    for generation in &generations {
        let image = reader.read_image(*generation)?;
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
        if let Some((older, older_sequences)) = &previous {
            let regressions = older_sequences.iter().zip(&sequences).filter(|(a, b)| a > b).count();
            if regressions > 0 {
                problems.push(format!(
                    "{regressions} blocks of generation {generation} are older than in generation {older}"
                ));
            }
        }
        final_sequences = sequences.clone();
        previous = Some((*generation, sequences));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_detects_damage() {
        let mut buffer = vec![0u8; 4096];
        fill(&mut buffer, 7, 99, 3);
        assert_eq!(parse(&buffer, 7), Content::Write { sequence: 99 });
        assert!(matches!(parse(&buffer, 8), Content::Invalid(_)));
        buffer[2000] ^= 1;
        assert!(matches!(parse(&buffer, 7), Content::Invalid(_)));
        assert_eq!(parse(&[0u8; 4096], 1), Content::Zero);
    }
}
