//! `chronicle bench`: host I/O through the engine on a volume directory, with latency
//! percentiles. The last line is JSON so scripts can compare it with fio's numbers.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chronicle::device::{DmaBuf, IoBuffers, Payload};
use chronicle::engine::{HostRequest, Volume, VolumeOptions};
use clap::ValueEnum;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::host;

#[derive(Clone, Copy, Debug, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Randwrite,
    Randread,
    Seqwrite,
    /// Random writes within the first 1/256 of the volume: overwrite-heavy (what "all"
    /// journal mode pays for most).
    Hotwrite,
}

/// Device block size of volumes made by `chronicle format`.
const BLOCK: u64 = 4096;

pub fn run(
    dir: &Path,
    workload: Workload,
    block_size: u64,
    queue_depth: usize,
    seconds: f64,
    marker_every_ms: Option<u64>,
    json: bool,
) -> Result<ExitCode> {
    if block_size == 0 || block_size % BLOCK != 0 {
        bail!("--block-size {block_size} must be a positive multiple of {BLOCK} bytes");
    }
    if queue_depth == 0 {
        bail!("--queue-depth must be at least 1");
    }
    let mut volume = Volume::open(host::open_channels(dir, None, false, None)?, VolumeOptions::default())
        .with_context(|| format!("cannot open {}", dir.display()))?;
    let volume_bytes = volume.status().volume_bytes;
    let slots = volume_bytes / block_size;
    if slots == 0 {
        bail!("the volume ({volume_bytes} bytes) is smaller than one {block_size}-byte I/O");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // A pool of buffers reused across I/Os: the benchmark measures the engine, not malloc.
    let mut write_pool: Vec<Arc<IoBuffers>> = (0..queue_depth)
        .map(|_| {
            let mut buffer = DmaBuf::zeroed(block_size as usize);
            rng.fill_bytes(buffer.as_mut_slice());
            Arc::new(IoBuffers::single(buffer))
        })
        .collect();
    let mut read_pool: Vec<IoBuffers> =
        (0..queue_depth).map(|_| IoBuffers::single(DmaBuf::zeroed(block_size as usize))).collect();
    let mut started_at: Vec<Instant> = vec![Instant::now(); queue_depth];
    let mut free_slots: Vec<usize> = (0..queue_depth).collect();
    let mut latencies_ns: Vec<u64> = Vec::with_capacity(1 << 20);
    let mut sequential = 0u64;
    let mut errors = host::ErrorTally::default();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut completions = Vec::with_capacity(queue_depth);
    // Markers cut generations so the sort frees journal space ("all" mode needs them: every
    // write takes a new element).
    let marker_every = marker_every_ms.map(Duration::from_millis);
    let mut next_marker = marker_every.map(|every| started + every);
    let mut markers = Vec::new();
    loop {
        let running = Instant::now() < deadline;
        if let (Some(due), Some(every)) = (next_marker, marker_every) {
            if running && Instant::now() >= due {
                markers.push(volume.mark("bench"));
                next_marker = Some(due + every);
            }
        }
        // Keep the queue full until the deadline.
        while let Some(slot) = if running { free_slots.pop() } else { None } {
            let offset = match workload {
                Workload::Seqwrite => {
                    let offset = sequential % slots;
                    sequential += 1;
                    offset
                }
                Workload::Hotwrite => rng.random_range(0..slots.div_ceil(256)),
                _ => rng.random_range(0..slots),
            } * (block_size / BLOCK);
            let request = match workload {
                Workload::Randread => {
                    HostRequest::Read { offset_blocks: offset, buffers: read_pool.pop().expect("one buffer per slot") }
                }
                _ => HostRequest::Write {
                    offset_blocks: offset,
                    buffers: write_pool.pop().expect("one buffer per slot"),
                },
            };
            started_at[slot] = Instant::now();
            volume.submit(slot as u64, request);
        }
        if !running && free_slots.len() == queue_depth {
            break;
        }
        volume.poll(&mut completions);
        for completion in completions.drain(..) {
            let slot = completion.tag as usize;
            latencies_ns.push(started_at[slot].elapsed().as_nanos() as u64);
            if let Err(error) = &completion.result {
                if errors.add(error) {
                    eprintln!("chronicle bench: I/O failed: {error}");
                }
            }
            match completion.payload {
                Payload::Read(buffers) => read_pool.push(buffers),
                Payload::Write(buffers) => write_pool.push(buffers),
                Payload::None => {}
            }
            free_slots.push(slot);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut marker_errors = 0;
    for marker in &markers {
        while marker.result().is_none() {
            volume.poll(&mut completions);
        }
        marker_errors += u64::from(marker.result().is_some_and(|r| r.is_err()));
    }
    // Let the sort catch up, so the history's space is measured after it.
    volume.run_until_idle(&mut completions);
    let status = volume.status();
    let journal_mode = volume.identity().journal_mode;
    volume.close()?;
    let error_count = errors.total();
    latencies_ns.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies_ns.is_empty() {
            return 0.0;
        }
        let index = ((latencies_ns.len() as f64 * p).ceil() as usize).clamp(1, latencies_ns.len()) - 1;
        latencies_ns[index] as f64 / 1000.0
    };
    let ios = latencies_ns.len() as f64;
    let result = serde_json::json!({
        "workload": workload,
        "block_size": block_size,
        "queue_depth": queue_depth,
        "seconds": elapsed,
        "ios": ios as u64,
        "errors": error_count,
        "errors_by_kind": errors.to_json(),
        "iops": ios / elapsed,
        "mib_per_s": ios * block_size as f64 / elapsed / (1 << 20) as f64,
        "p50_us": percentile(0.50),
        "p99_us": percentile(0.99),
        // Where write time goes: each index commit is one FUA page write to the journal.
        "index_commits": status.host.index_commits,
        "index_pages_written": status.host.index_pages_written,
        "journal_full_waits": status.host.journal_full_waits,
        "journal_used_elements": status.journal_used_elements,
        "journal_capacity_elements": status.journal_capacity_elements,
        // Space: what the journal mode costs (FIG 8 "latest" vs "all").
        "journal_mode": format!("{journal_mode:?}").to_lowercase(),
        "markers": markers.len(),
        "marker_errors": marker_errors,
        // How long markers held writes, and the rewritten elements they read back to checksum.
        "marker_hold_max_us": status.control.marker_hold_max_us,
        "marker_checksum_reads": status.control.marker_checksum_reads,
        "generations_sorted": status.control.generations_sorted,
        "elements_sorted": status.control.elements_sorted,
        "versions_kept": status.control.versions_kept,
        "history_used_units": status.history_used_units,
        // Journal-full policy bitmap-only: writes that went to the base only, their bitmap
        // commits, and the blocks still tracked that way at the end.
        "journal_full_mode": status.journal_full_mode,
        "bitmap_tracked_blocks": status.bitmap_tracked_blocks,
        "bitmap_writes": status.bitmap.as_ref().map_or(0, |b| b.bitmap_writes),
        "bitmap_commits": status.bitmap.as_ref().map_or(0, |b| b.bitmap_commits),
    });
    if !json {
        println!(
            "{:?} {} B QD{}: {:.0} IOPS, {:.1} MiB/s, p50 {:.1} µs, p99 {:.1} µs, {} errors",
            workload,
            block_size,
            queue_depth,
            result["iops"].as_f64().unwrap_or(0.0),
            result["mib_per_s"].as_f64().unwrap_or(0.0),
            percentile(0.5),
            percentile(0.99),
            error_count
        );
        for line in errors.lines() {
            eprintln!("chronicle bench: errors: {line}");
        }
    }
    println!("{result}");
    Ok(if error_count == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
