//! `chronicle bench-history`: what history maintenance and restore volumes cost on a volume of
//! files (issue 5). Six sections, on volumes of their own under DIR (removed afterwards):
//!
//! 1. **merge**: throughput of merging the history records of several generations into one;
//! 2. **overlap**: history units before and after that merge as the share of each generation's
//!    blocks also written by the previous one goes from 0 % to 100 % (seed 001 FIG 11/12);
//! 3. **rvol-open**: time from `open_restore` of the oldest generation to its first completed
//!    read, on volumes of different sizes holding the same history (FIG 13–15);
//! 4. **rvol-read**: random reads of an R-VOL against the volume's own;
//! 5. **latency**: host write latency while markers, the sort and merges run, against the
//!    same load alone;
//! 6. **dedup**: history units a merge stores as the share of the volume's blocks whose
//!    contents repeat (one of a few common contents) grows: what dedup in merge saves; and
//!    across records: generations that rewrite a share of their blocks unchanged, thinned by
//!    deleting every other generation — the units merges share with other records, the units
//!    kept (retained) for them, and merge throughput with the volume-wide content index;
//! 7. **compress**: compression of the generations' records (embodiment 8) as the share of
//!    text-like 4 KiB blocks goes from 0 % to 100 % (the rest random): ratio, compression and
//!    decompression throughput, decompression time per record, and random R-VOL reads of the
//!    oldest generation with its records compressed against uncompressed.
//!
//! Every 4 KiB written is different (a counter stamped on random bytes), and the volumes of
//! sections 1, 2, 4 and 5 are written whole before the generations: the history then saves
//! distinct data, as on a volume in use, instead of the zeros of never-written blocks, which
//! a merge that shares equal elements would store once. Section 1 and 4 share one volume.
//! Each run is one sample: repeat it and compare.

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chronicle::core::format::control_block::ControlBlock;
use chronicle::core::format::layout::{self, human, LayoutOptions, VolumeShape};
use chronicle::core::format::superblock::{Durability, JournalFullPolicy};
use chronicle::core::plan::plan_restore;
use chronicle::device::{DmaBuf, IoBuffers, Payload, SharedBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{HostCompletion, HostRequest, MaintenanceHandle, RestoreId, Status, Volume, VolumeOptions};
use clap::ValueEnum;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::host;

/// Host write size and device block size of the volumes formatted here.
const UNIT: u64 = 4096;

/// Overlaps between consecutive generations measured by the overlap section, in percent.
const OVERLAPS_PERCENT: [u64; 5] = [0, 25, 50, 75, 100];

/// Shares of the prefill's 4 KiB blocks that repeat a common content, in percent (dedup section).
const DUPLICATES_PERCENT: [u64; 5] = [0, 25, 50, 75, 100];

/// Shares of the 4 KiB blocks written with text-like contents, in percent (compression section).
const COMPRESSIBLE_PERCENT: [u64; 3] = [0, 50, 100];

/// Common contents the repeated blocks take (as in a volume of VM images: zeros, a few
/// templates).
const COMMON_CONTENTS: usize = 16;

/// Blocks per prefill write (1 MiB): the prefill is setup, not what is measured.
const PREFILL_BLOCKS: u64 = 256;

/// The first R-VOL read is called independent of the volume's size when the largest volume's
/// median is within this factor of the smallest's (run-to-run noise on a shared machine).
const INDEPENDENT_FACTOR: f64 = 1.25;

/// The target: host p99 write latency during a merge at most this times the idle p99.
const LATENCY_TARGET_FACTOR: f64 = 1.5;

/// Markers are skipped while this many generations wait for the sort (the journal's index ring
/// holds 64 online generations by default; a marker beyond is refused).
const MAX_WAITING_GENERATIONS: usize = 56;

/// Host writes per second no volume on files reaches here (sizes the latency volume's history).
const MAX_WRITES_PER_SECOND: f64 = 100_000.0;

/// Status is sampled this often during a latency phase (which of sort and merge run, space).
const SAMPLE_EVERY: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Section {
    Merge,
    Overlap,
    RvolOpen,
    RvolRead,
    Latency,
    Dedup,
    Compress,
}

#[derive(clap::Args)]
pub struct Options {
    /// Directory for the benchmark's volumes (one per section, removed after it).
    pub dir: PathBuf,
    /// Size of the volumes of the merge, overlap and R-VOL read sections (written whole first).
    #[arg(long, value_parser = host::parse_size, default_value = "256M")]
    pub size: u64,
    /// Size of the volume of the latency section (written whole first).
    #[arg(long, value_parser = host::parse_size, default_value = "1G")]
    pub latency_size: u64,
    /// Generations (history records) built before a merge or an R-VOL open.
    #[arg(long, default_value_t = 8)]
    pub generations: u64,
    /// Distinct random 4 KiB blocks written in each of those generations.
    #[arg(long, default_value_t = 8192)]
    pub writes: u64,
    /// Volume sizes whose time to the first R-VOL read is compared (same history on each).
    #[arg(long, value_parser = host::parse_size, value_delimiter = ',', default_value = "1G,8G")]
    pub rvol_sizes: Vec<u64>,
    /// R-VOL opens (open, first read, close) per volume size; the first is the cold one.
    #[arg(long, default_value_t = 5)]
    pub rvol_opens: usize,
    #[arg(long, default_value_t = 32)]
    pub read_queue_depth: usize,
    /// Seconds of random reads, on the volume and on the R-VOL each.
    #[arg(long, default_value_t = 5.0)]
    pub read_seconds: f64,
    #[arg(long, default_value_t = 8)]
    pub write_queue_depth: usize,
    /// Seconds of each of the four write-latency phases.
    #[arg(long, default_value_t = 10.0)]
    pub latency_seconds: f64,
    /// Marker interval of the latency phases with markers.
    #[arg(long, default_value_t = 500)]
    pub marker_every_ms: u64,
    /// Sections to run, comma-separated (default: all).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "merge,overlap,rvol-open,rvol-read,latency,dedup,compress"
    )]
    pub sections: Vec<Section>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the volumes instead of removing each after its section.
    #[arg(long)]
    pub keep: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(options: &Options) -> Result<ExitCode> {
    check(options)?;
    std::fs::create_dir_all(&options.dir).with_context(|| format!("cannot create {}", options.dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut report = Report {
        parameters: serde_json::json!({
            "generations": options.generations,
            "writes_per_generation": options.writes,
            "write_bytes": UNIT,
            "size": options.size,
            "latency_size": options.latency_size,
            "seed": options.seed,
        }),
        ..Default::default()
    };
    let wants = |section| options.sections.contains(&section);
    if wants(Section::Merge) || wants(Section::RvolRead) {
        let (scratch, mut built) =
            build_history(options, "merge", options.writes, &mut rng, Mix::UNIQUE, |rng, blocks| {
                (0..options.generations).map(|_| distinct_blocks(rng, blocks, options.writes)).collect()
            })
            .context("building the history of the merge and R-VOL read sections")?;
        if wants(Section::RvolRead) {
            report.rvol_read = Some(bench_rvol_read(options, &mut built, &mut rng).context("R-VOL read section")?);
        }
        if wants(Section::Merge) {
            report.merge = Some(bench_merge(&mut built).context("merge section")?);
        }
        built.volume.close()?;
        drop(scratch);
    }
    if wants(Section::Overlap) {
        let mut rows = Vec::with_capacity(OVERLAPS_PERCENT.len());
        for overlap in OVERLAPS_PERCENT {
            rows.push(bench_overlap(options, overlap, &mut rng).with_context(|| format!("overlap {overlap} %"))?);
        }
        report.overlap = Some(rows);
    }
    if wants(Section::RvolOpen) {
        let mut rows = Vec::with_capacity(options.rvol_sizes.len());
        for size in &options.rvol_sizes {
            rows.push(
                bench_rvol_open(options, *size, &mut rng).with_context(|| format!("R-VOL open, {}", human(*size)))?,
            );
        }
        report.rvol_open = Some(RvolOpenSection::new(rows));
    }
    if wants(Section::Latency) {
        report.latency = Some(bench_latency(options, &mut rng).context("latency section")?);
    }
    if wants(Section::Dedup) {
        let mut rows = Vec::with_capacity(DUPLICATES_PERCENT.len());
        for percent in DUPLICATES_PERCENT {
            rows.push(bench_dedup(options, percent, &mut rng).with_context(|| format!("dedup, {percent} % repeated"))?);
        }
        report.dedup = Some(rows);
        let mut rows = Vec::with_capacity(DUPLICATES_PERCENT.len());
        for percent in DUPLICATES_PERCENT {
            rows.push(
                bench_dedup_across(options, percent, &mut rng)
                    .with_context(|| format!("dedup across records, {percent} % unchanged"))?,
            );
        }
        report.dedup_across = Some(rows);
    }
    if wants(Section::Compress) {
        let mut rows = Vec::with_capacity(COMPRESSIBLE_PERCENT.len());
        for percent in COMPRESSIBLE_PERCENT {
            rows.push(
                bench_compress(options, percent, &mut rng).with_context(|| format!("compress, {percent} % text"))?,
            );
        }
        report.compress = Some(rows);
    }
    if options.json {
        return crate::print_out(&(serde_json::to_string_pretty(&report)? + "\n"));
    }
    crate::print_out(&report.table(options)?)
}

/// Refuses parameters that cannot give a measurement, before anything is written.
fn check(options: &Options) -> Result<()> {
    let size_ok = |name: &str, bytes: u64| {
        if bytes == 0 || bytes % UNIT != 0 {
            bail!("{name} {bytes} must be a positive multiple of {UNIT} bytes");
        }
        Ok(bytes / UNIT)
    };
    if options.generations < 2 {
        bail!("--generations {} must be at least 2 (a merge needs two records)", options.generations);
    }
    if options.writes == 0 {
        bail!("--writes must be at least 1");
    }
    let blocks = size_ok("--size", options.size)?;
    // Overlap 0 %: every generation writes blocks no earlier one wrote.
    let needed = options.generations.saturating_mul(options.writes);
    if options.sections.contains(&Section::Overlap) && needed > blocks {
        bail!(
            "--size {} holds {blocks} blocks; the overlap section needs {needed} (--generations × --writes)",
            human(options.size)
        );
    }
    if options.writes > blocks {
        bail!("--writes {} is more than the {blocks} blocks of --size {}", options.writes, human(options.size));
    }
    if options.rvol_sizes.is_empty() {
        bail!("--rvol-sizes names no size");
    }
    for size in &options.rvol_sizes {
        if size_ok("--rvol-sizes", *size)? < options.writes {
            bail!("--rvol-sizes {} holds fewer blocks than --writes {}", human(*size), options.writes);
        }
    }
    size_ok("--latency-size", options.latency_size)?;
    if options.rvol_opens == 0 {
        bail!("--rvol-opens must be at least 1");
    }
    // R-VOLs take at most this many requests in flight, the volume as many by default.
    let limit = chronicle::engine::MAX_RESTORE_IN_FLIGHT;
    for (name, depth) in
        [("--read-queue-depth", options.read_queue_depth), ("--write-queue-depth", options.write_queue_depth)]
    {
        if depth == 0 || depth > limit {
            bail!("{name} {depth} must be from 1 to {limit}");
        }
    }
    for (name, seconds) in [("--read-seconds", options.read_seconds), ("--latency-seconds", options.latency_seconds)] {
        if !(seconds.is_finite() && seconds > 0.0 && seconds < 1e6) {
            bail!("{name} {seconds} must be a positive number of seconds");
        }
    }
    if options.marker_every_ms == 0 {
        bail!("--marker-every-ms must be at least 1");
    }
    if options.sections.is_empty() {
        bail!("--sections names no section");
    }
    Ok(())
}

/// Everything measured, as printed with `--json`.
#[derive(Default, Serialize)]
struct Report {
    parameters: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    merge: Option<MergeResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    overlap: Option<Vec<OverlapResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rvol_open: Option<RvolOpenSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rvol_read: Option<RvolReadResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<LatencySection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dedup: Option<Vec<DedupResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dedup_across: Option<Vec<DedupAcrossResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compress: Option<Vec<CompressResult>>,
}

// ---------------------------------------------------------------------------------------------
// Volumes

/// A volume directory of the benchmark, removed when dropped (also on errors: an 8 GiB
/// volume must not be left behind) unless `--keep`.
struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Formats a volume of `volume_bytes` in `root/name` whose journal holds `journal_elements`
/// and whose history holds `history_elements` plus `records` control blocks, and opens it.
fn make_volume(
    options: &Options,
    name: &str,
    volume_bytes: u64,
    journal_elements: u64,
    history_elements: u64,
    records: u64,
) -> Result<(Scratch, Volume)> {
    let dir = options.dir.join(name);
    let shape = VolumeShape { host_write_size: UNIT as u32, volume_blocks: volume_bytes / UNIT };
    let layout_options = LayoutOptions::default();
    let journal_elements = journal_elements.max(layout::MIN_JOURNAL_ELEMENTS);
    let history_elements = history_elements.max(layout::MIN_HISTORY_ELEMENTS);
    let journal = layout::journal_bytes_for(&shape, &layout_options, journal_elements);
    let history_units = history_elements + records.max(2) * layout::control_block_units(&shape, 0);
    let history = layout::history_bytes_for(&shape, &layout_options, history_units);
    crate::format_dir(
        &dir,
        volume_bytes,
        UNIT as u32,
        (Some(journal), Some(history)),
        Durability::Flush,
        (JournalFullPolicy::Block, chronicle::core::format::superblock::JournalMode::Latest),
        false,
    )
    .with_context(|| format!("{} is left from an earlier run? remove it", dir.display()))?;
    let scratch = Scratch { dir, keep: options.keep };
    let volume = Volume::open(host::open_channels(&scratch.dir, None, false, None)?, VolumeOptions::default())
        .with_context(|| format!("cannot open {}", scratch.dir.display()))?;
    Ok((scratch, volume))
}

/// Polls until nothing is in flight and every sealed generation is sorted.
fn settle(volume: &mut Volume) -> Result<()> {
    volume.run_until_idle(&mut Vec::new());
    if let Some(error) = volume.sort_error() {
        bail!("the sort stopped: {error}");
    }
    Ok(())
}

/// History records (sorted or merged), oldest first: (generation, through generation, blocks).
fn records(status: &Status) -> Vec<(u64, u64, u64)> {
    status
        .generations
        .iter()
        .filter(|g| g.state == "history" || g.state == "merged")
        .map(|g| (g.generation, g.through_generation, g.blocks))
        .collect()
}

/// Merges every history record into one, waiting for it.
fn merge_all(volume: &mut Volume) -> Result<()> {
    let list = records(&volume.status());
    let (Some(first), Some(last)) = (list.first(), list.last()) else { bail!("the history holds no record") };
    merge_range(volume, first.0, last.1).map(|_| ())
}

/// `count` distinct random blocks of `0..blocks`, in random order.
fn distinct_blocks(rng: &mut ChaCha8Rng, blocks: u64, count: u64) -> Vec<u64> {
    rand::seq::index::sample(rng, blocks as usize, count as usize).into_iter().map(|b| b as u64).collect()
}

/// Writes each generation's blocks (4 KiB each) and seals it with a marker; the sorts run in
/// the background meanwhile. Returns the sealed generations' numbers.
fn write_generations(volume: &mut Volume, driver: &mut Driver, generations: &[Vec<u64>]) -> Result<Vec<u64>> {
    let mut sealed = Vec::with_capacity(generations.len());
    for (index, blocks) in generations.iter().enumerate() {
        driver.write_all(volume, blocks)?;
        let generation =
            volume.mark_and_wait(&format!("bench {index}"), &mut Vec::new()).context("marker after a generation")?;
        sealed.push(generation);
    }
    Ok(sealed)
}

/// Writes every block of the volume once (1 MiB writes) and seals that as a generation, whose
/// number it returns.
/// `duplicate_percent` of its 4 KiB blocks take one of [`COMMON_CONTENTS`] contents.
fn prefill(volume: &mut Volume, rng: &mut ChaCha8Rng, mix: Mix) -> Result<u64> {
    let blocks = volume.status().volume_bytes / UNIT;
    let chunk = if blocks % PREFILL_BLOCKS == 0 { PREFILL_BLOCKS } else { 1 };
    let offsets: Vec<u64> = (0..blocks / chunk).map(|i| i * chunk).collect();
    let mut driver = Driver::new(8, (chunk * UNIT) as usize, rng);
    mix.apply(&mut driver, rng);
    driver.write_all(volume, &offsets)?;
    volume.mark_and_wait("prefill", &mut Vec::new()).context("marker after the prefill")
}

/// A prefilled volume with the history of the generations written after the prefill.
struct Built {
    volume: Volume,
    volume_bytes: u64,
    /// The prefill's generation: the first of the generations' records restores its image.
    prefill: u64,
    /// The record of the last generation's writes.
    last: u64,
}

/// Formats `root/name` (`--size`), prefills it, writes the generations `plan` makes from the
/// volume's blocks (`writes` each at most) and lets the sorts finish. The records
/// `prefill..=last` then hold the image each generation overwrote.
fn build_history(
    options: &Options,
    name: &str,
    writes: u64,
    rng: &mut ChaCha8Rng,
    mix: Mix,
    plan: impl FnOnce(&mut ChaCha8Rng, u64) -> Vec<Vec<u64>>,
) -> Result<(Scratch, Built)> {
    let blocks = options.size / UNIT;
    let generations = options.generations;
    progress(&format!("{name}: prefill {}, then {generations} generations × {writes} blocks", human(options.size)));
    // Journal: the prefill, then room for two generations while its sort runs. History: the
    // prefill's record (the blocks' previous zeros), the generations' records and a merged one,
    // whose control block a merge sizes for a full address table (dedup may need one).
    let table_units = ControlBlock::disk_bytes(blocks, generations * writes).div_ceil(UNIT);
    let history = blocks + 2 * generations * writes + table_units;
    let (scratch, mut volume) =
        make_volume(options, name, options.size, blocks + 2 * writes, history, generations + 3)?;
    let prefill = prefill(&mut volume, rng, mix)?;
    let plan = plan(rng, blocks);
    let mut driver = Driver::new(32, UNIT as usize, rng);
    // The generations write the same mix of compressible contents as the prefill.
    Mix { duplicate_percent: 0, ..mix }.apply(&mut driver, rng);
    let sealed = write_generations(&mut volume, &mut driver, &plan)?;
    settle(&mut volume)?;
    // Sorting generation g writes the record of g − 1 (DESIGN.md, "Record numbering").
    let last = sealed.last().map(|g| g - 1).context("no generation was written")?;
    Ok((scratch, Built { volume, volume_bytes: options.size, prefill, last }))
}

/// Merges the records `from..=through` into one, waiting for it: the seconds it took and what
/// the merge reports.
fn merge_range(volume: &mut Volume, from: u64, through: u64) -> Result<(f64, chronicle::engine::MergeReport)> {
    let started = Instant::now();
    let handle = volume.merge(from, through);
    let report = volume
        .wait_maintenance(&handle, &mut Vec::new())
        .with_context(|| format!("merge of generations {from}..={through}"))?;
    Ok((started.elapsed().as_secs_f64(), report))
}

// ---------------------------------------------------------------------------------------------
// I/O

/// Where an I/O goes.
#[derive(Clone, Copy)]
enum Target {
    Volume,
    Restore(RestoreId),
}

/// Keeps up to `queue_depth` I/Os of one size in flight and times each. Buffers are pooled:
/// the benchmark measures the engine, not the allocator.
struct Driver {
    queue_depth: usize,
    write_pool: Vec<SharedBuffers>,
    read_pool: Vec<IoBuffers>,
    started_at: Vec<Instant>,
    free_slots: Vec<usize>,
    completions: Vec<HostCompletion>,
    errors: host::ErrorTally,
    /// Stamped on every 4 KiB written, so no two are equal.
    sequence: u64,
    /// Writes whose buffers were still shared and went out unstamped (expected: none).
    unstamped: u64,
    /// When set, a share of the 4 KiB written repeat common contents instead.
    duplicates: Option<Duplicates>,
    /// When set, every 4 KiB written is new: text-like (compressible) for a share, random for
    /// the rest (compression section).
    compressible: Option<Compressible>,
}

/// Common contents a share of the blocks written take (dedup section).
struct Duplicates {
    percent: u64,
    contents: Vec<Vec<u8>>,
    rng: ChaCha8Rng,
}

impl Duplicates {
    fn new(percent: u64, rng: &mut ChaCha8Rng) -> Duplicates {
        let contents = (0..COMMON_CONTENTS)
            .map(|k| {
                let mut data = vec![0u8; UNIT as usize];
                if k > 0 {
                    rng.fill_bytes(&mut data); // content 0 stays zeros
                }
                data
            })
            .collect();
        Duplicates { percent, contents, rng: ChaCha8Rng::seed_from_u64(rng.next_u64()) }
    }

    /// A common content for the next 4 KiB, or `None` for a unique one.
    fn pick(&mut self) -> Option<&[u8]> {
        if self.rng.random_range(0..100) < self.percent {
            let k = self.rng.random_range(0..self.contents.len());
            Some(&self.contents[k])
        } else {
            None
        }
    }
}

/// What the 4 KiB blocks a driver writes hold, besides a unique stamp.
#[derive(Clone, Copy)]
struct Mix {
    /// Share repeating one of [`COMMON_CONTENTS`] contents (dedup section).
    duplicate_percent: u64,
    /// Share of text-like contents, the rest fresh random bytes (compression section); `None`
    /// leaves the driver's random buffers as they are (stamped only: fine for every section
    /// but this one, where lz4 would find the reused bytes within its 64 KiB window).
    compressible_percent: Option<u64>,
}

impl Mix {
    const UNIQUE: Mix = Mix { duplicate_percent: 0, compressible_percent: None };

    fn apply(self, driver: &mut Driver, rng: &mut ChaCha8Rng) {
        if self.duplicate_percent > 0 {
            driver.duplicates = Some(Duplicates::new(self.duplicate_percent, rng));
        }
        if let Some(percent) = self.compressible_percent {
            driver.compressible = Some(Compressible::new(percent, rng));
        }
    }
}

/// Contents for a share of text-like 4 KiB blocks (log lines: words from a small vocabulary,
/// numbers), the rest random — what a volume of logs, documents and compressed media holds.
struct Compressible {
    percent: u64,
    rng: ChaCha8Rng,
}

/// Words of the text-like blocks.
const WORDS: [&str; 24] = [
    "INFO",
    "WARN",
    "DEBUG",
    "request",
    "completed",
    "generation",
    "volume",
    "user",
    "session",
    "GET",
    "POST",
    "/api/v1/items",
    "status=200",
    "status=404",
    "latency_ms=",
    "bytes=",
    "host=db-01",
    "host=web-03",
    "retry",
    "timeout",
    "cache",
    "hit",
    "miss",
    "id=",
];

impl Compressible {
    fn new(percent: u64, rng: &mut ChaCha8Rng) -> Compressible {
        Compressible { percent, rng: ChaCha8Rng::seed_from_u64(rng.next_u64()) }
    }

    /// The next 4 KiB (the caller stamps it).
    fn next(&mut self) -> Vec<u8> {
        let mut data = vec![0u8; UNIT as usize];
        if self.rng.random_range(0..100) >= self.percent {
            self.rng.fill_bytes(&mut data);
            return data;
        }
        let mut text = String::with_capacity(UNIT as usize + 64);
        while text.len() < UNIT as usize {
            let _ = write!(
                text,
                "2026-11-30T{:02}:{:02}:{:02}.{:03}Z",
                self.rng.random_range(0..24),
                self.rng.random_range(0..60),
                self.rng.random_range(0..60),
                self.rng.random_range(0..1000)
            );
            for _ in 0..self.rng.random_range(4..10) {
                text.push(' ');
                text.push_str(WORDS[self.rng.random_range(0..WORDS.len())]);
                if self.rng.random_bool(0.3) {
                    let _ = write!(text, "{}", self.rng.random_range(0..100_000));
                }
            }
            text.push('\n');
        }
        data.copy_from_slice(&text.as_bytes()[..UNIT as usize]);
        data
    }
}

impl Driver {
    fn new(queue_depth: usize, io_bytes: usize, rng: &mut ChaCha8Rng) -> Driver {
        let write_pool = (0..queue_depth)
            .map(|_| {
                let mut buffer = DmaBuf::zeroed(io_bytes);
                rng.fill_bytes(buffer.as_mut_slice());
                Arc::new(IoBuffers::single(buffer))
            })
            .collect();
        Driver {
            queue_depth,
            write_pool,
            read_pool: (0..queue_depth).map(|_| IoBuffers::single(DmaBuf::zeroed(io_bytes))).collect(),
            started_at: vec![Instant::now(); queue_depth],
            free_slots: (0..queue_depth).rev().collect(),
            completions: Vec::with_capacity(queue_depth),
            errors: host::ErrorTally::default(),
            sequence: rng.next_u64(),
            unstamped: 0,
            duplicates: None,
            compressible: None,
        }
    }

    fn has_room(&self) -> bool {
        !self.free_slots.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.queue_depth - self.free_slots.len()
    }

    /// Submits a write (`write`) or a read at `offset_blocks`; the caller checked
    /// [`has_room`](Self::has_room). Returns the slot, the completion's tag.
    fn submit(&mut self, volume: &mut Volume, target: Target, write: bool, offset_blocks: u64) -> usize {
        let slot = self.free_slots.pop().expect("submitted with room");
        let request = if write {
            let mut buffers = self.write_pool.pop().expect("one buffer per slot");
            // Unique contents: equal elements are what a merge's dedup would share, and a
            // volume's data are seldom equal. The engine holds no reference after completion.
            if let Some(buffers) = Arc::get_mut(&mut buffers) {
                for at in (0..buffers.len()).step_by(UNIT as usize) {
                    if let Some(common) = self.duplicates.as_mut().and_then(Duplicates::pick) {
                        buffers.write_at(at, common);
                        continue;
                    }
                    if let Some(compressible) = self.compressible.as_mut() {
                        buffers.write_at(at, &compressible.next());
                    }
                    self.sequence = self.sequence.wrapping_add(1);
                    buffers.write_at(at, &self.sequence.to_le_bytes());
                }
            } else {
                self.unstamped += 1;
            }
            HostRequest::Write { offset_blocks, buffers }
        } else {
            HostRequest::Read { offset_blocks, buffers: self.read_pool.pop().expect("one buffer per slot") }
        };
        self.started_at[slot] = Instant::now();
        match target {
            Target::Volume => volume.submit(slot as u64, request),
            Target::Restore(id) => volume.submit_restore(id, slot as u64, request),
        }
        slot
    }

    /// Polls the volume once; `done(slot, latency_ns)` for each completed I/O. Returns whether
    /// anything happened.
    fn poll(&mut self, volume: &mut Volume, mut done: impl FnMut(usize, u64)) -> bool {
        let mut completions = std::mem::take(&mut self.completions);
        let reaped = volume.poll(&mut completions);
        let any = reaped > 0 || !completions.is_empty();
        for completion in completions.drain(..) {
            let slot = completion.tag as usize;
            done(slot, self.started_at[slot].elapsed().as_nanos() as u64);
            if let Err(error) = &completion.result {
                self.errors.add(error);
            }
            match completion.payload {
                Payload::Read(buffers) => self.read_pool.push(buffers),
                Payload::Write(buffers) => self.write_pool.push(buffers),
                Payload::None => {}
            }
            self.free_slots.push(slot);
        }
        self.completions = completions;
        any
    }

    fn drain(&mut self, volume: &mut Volume) {
        while self.in_flight() > 0 {
            if !self.poll(volume, |_, _| {}) {
                std::hint::spin_loop();
            }
        }
    }

    /// Fails when any I/O failed: the numbers would not mean what they say.
    fn check(&self, what: &str) -> Result<()> {
        if self.unstamped > 0 {
            bail!("{what}: {} writes went out with repeated contents (a buffer was still shared)", self.unstamped);
        }
        if self.errors.total() > 0 {
            let lines: Vec<String> = self.errors.lines().collect();
            bail!("{what}: {} I/Os failed ({})", self.errors.total(), lines.join("; "));
        }
        Ok(())
    }

    /// Writes one I/O (the size of the driver's buffers) at each of `offsets`, in blocks, with
    /// the queue kept full, and waits for them.
    fn write_all(&mut self, volume: &mut Volume, offsets: &[u64]) -> Result<()> {
        let mut next = offsets.iter();
        let mut pending = offsets.len();
        while pending > 0 {
            while self.has_room() {
                let Some(offset) = next.next() else { break };
                self.submit(volume, Target::Volume, true, *offset);
            }
            if !self.poll(volume, |_, _| pending -= 1) {
                std::hint::spin_loop();
            }
        }
        self.check("writing a generation")
    }

    /// Random 4 KiB reads of `target` for `seconds`.
    fn random_reads(
        &mut self,
        volume: &mut Volume,
        target: Target,
        blocks: u64,
        seconds: f64,
        rng: &mut ChaCha8Rng,
    ) -> Result<Latency> {
        let mut latencies = Vec::with_capacity(1 << 20);
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(seconds);
        while Instant::now() < deadline {
            while self.has_room() {
                self.submit(volume, target, false, rng.random_range(0..blocks));
            }
            if !self.poll(volume, |_, ns| latencies.push(ns)) {
                std::hint::spin_loop();
            }
        }
        self.drain(volume);
        self.check("random reads")?;
        Ok(Latency::new(latencies, started.elapsed().as_secs_f64()))
    }
}

/// Latency percentiles of a set of I/Os.
#[derive(Clone, Serialize)]
struct Latency {
    ios: u64,
    /// I/Os per second of the phase they ran in (0 for a subset of a phase's I/Os).
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

impl Latency {
    /// `seconds`: the duration the I/Os ran in, or 0 for a subset.
    fn new(mut ns: Vec<u64>, seconds: f64) -> Latency {
        ns.sort_unstable();
        let percentile = |p: f64| -> f64 {
            if ns.is_empty() {
                return 0.0;
            }
            let index = ((ns.len() as f64 * p).ceil() as usize).clamp(1, ns.len()) - 1;
            ns[index] as f64 / 1000.0
        };
        Latency {
            ios: ns.len() as u64,
            iops: if seconds > 0.0 { ns.len() as f64 / seconds } else { 0.0 },
            p50_us: percentile(0.50),
            p99_us: percentile(0.99),
            p999_us: percentile(0.999),
            max_us: percentile(1.0),
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

fn progress(text: &str) {
    eprintln!("bench-history: {text}");
}

// ---------------------------------------------------------------------------------------------
// 1. Merge throughput

#[derive(Serialize)]
struct MergeResult {
    volume_bytes: u64,
    records: usize,
    /// Elements of the records merged, and their bytes.
    source_elements: u64,
    source_mib: f64,
    /// Elements of the merged record (on a block several records hold, only the oldest's).
    output_elements: u64,
    seconds: f64,
    source_mib_per_s: f64,
    source_elements_per_s: f64,
    output_elements_per_s: f64,
}

/// Times the merge of the generations' records (not the prefill's) into one.
fn bench_merge(built: &mut Built) -> Result<MergeResult> {
    progress("merge: merging the generations' records");
    let list = records(&built.volume.status());
    let sources: Vec<_> = list.iter().filter(|r| r.0 >= built.prefill).collect();
    let source_elements: u64 = sources.iter().map(|r| r.2).sum();
    let (seconds, report) = merge_range(&mut built.volume, built.prefill, built.last)?;
    let output_elements = records(&built.volume.status()).iter().find(|r| r.0 == built.prefill).map_or(0, |r| r.2);
    let source_mib = (source_elements * UNIT) as f64 / f64::from(1 << 20);
    Ok(MergeResult {
        volume_bytes: built.volume_bytes,
        records: report.records,
        source_elements,
        source_mib,
        output_elements,
        seconds,
        source_mib_per_s: source_mib / seconds,
        source_elements_per_s: source_elements as f64 / seconds,
        output_elements_per_s: output_elements as f64 / seconds,
    })
}

// ---------------------------------------------------------------------------------------------
// 6. Capacity saved by dedup in merge, by the share of repeated contents

#[derive(Serialize)]
struct DedupResult {
    duplicate_percent: u64,
    records: usize,
    /// Elements of the merged record (blocks), and units it stores after dedup.
    merged_elements: u64,
    units_before: u64,
    units_after: u64,
    /// Elements stored once for several blocks (units dedup saved).
    dedup_shared: u64,
    /// Share of the merged record's elements dedup did not store.
    dedup_saved_percent: f64,
    dedup_mismatches: u64,
    seconds: f64,
}

/// A prefill whose blocks repeat common contents `duplicate_percent` of the time, then the
/// merge section's generations (distinct random blocks, unique contents): merging every
/// record restores the prefill's image, whose repeated contents dedup stores once.
fn bench_dedup(options: &Options, duplicate_percent: u64, rng: &mut ChaCha8Rng) -> Result<DedupResult> {
    let (generations, writes) = (options.generations, options.writes);
    let (_scratch, mut built) = build_history(
        options,
        &format!("dedup-{duplicate_percent}"),
        writes,
        rng,
        Mix { duplicate_percent, compressible_percent: None },
        |rng, blocks| (0..generations).map(|_| distinct_blocks(rng, blocks, writes)).collect(),
    )?;
    progress(&format!("dedup {duplicate_percent} %: merging"));
    let (seconds, report) = merge_range(&mut built.volume, built.prefill, built.last)?;
    let merged_elements = records(&built.volume.status()).iter().find(|r| r.0 == built.prefill).map_or(0, |r| r.2);
    built.volume.close()?;
    Ok(DedupResult {
        duplicate_percent,
        records: report.records,
        merged_elements,
        units_before: report.units_before,
        units_after: report.units_after,
        dedup_shared: report.dedup_shared,
        dedup_saved_percent: 100.0 * report.dedup_shared as f64 / merged_elements.max(1) as f64,
        dedup_mismatches: report.dedup_mismatches,
        seconds,
    })
}

// 6b. Dedup across records, by the share of blocks a generation rewrites unchanged

#[derive(Serialize)]
struct DedupAcrossResult {
    /// Share of the written blocks each generation rewrites with the contents they had.
    unchanged_percent: u64,
    generations: u64,
    /// Deletions of every other generation (each a merge of two records), newest first.
    merges: usize,
    /// Elements of the merged records, and those that point at another record's (or a retained
    /// extent's) unit instead of being stored.
    merged_elements: u64,
    shared_across: u64,
    /// Matches across records stored all the same (past each merge's run budget).
    declined_scattered: u64,
    saved_across_percent: f64,
    /// History units in use before and after the thinning, and the units retained for other
    /// records' pointers after it.
    units_before: u64,
    units_after: u64,
    retained_units: u64,
    /// Time of the merges, and merged elements per second (throughput with the volume-wide
    /// content index: lookups, candidate reads and byte compares included).
    merge_seconds: f64,
    merged_elements_per_s: f64,
}

/// The 4 KiB contents of `block` at `version`: distinct for every pair.
fn versioned_content(block: u64, version: u64) -> DmaBuf {
    let mut buffer = DmaBuf::zeroed(UNIT as usize);
    let mut rng = ChaCha8Rng::seed_from_u64(block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version);
    rng.fill_bytes(buffer.as_mut_slice());
    buffer.as_mut_slice()[..16].copy_from_slice(&[block.to_le_bytes(), version.to_le_bytes()].concat());
    buffer
}

/// Writes `blocks` with the contents of their `versions`, 32 in flight.
fn write_versions(volume: &mut Volume, blocks: &[u64], versions: &[u64]) -> Result<()> {
    let mut completions = Vec::new();
    let (mut next, mut in_flight) = (0usize, 0usize);
    while next < blocks.len() || in_flight > 0 {
        while in_flight < 32 && next < blocks.len() {
            let buffers = Arc::new(IoBuffers::single(versioned_content(blocks[next], versions[next])));
            volume.submit(next as u64, HostRequest::Write { offset_blocks: blocks[next], buffers });
            (next, in_flight) = (next + 1, in_flight + 1);
        }
        if volume.poll(&mut completions) == 0 {
            std::hint::spin_loop();
        }
        for completion in completions.drain(..) {
            completion.result.map_err(|e| anyhow::anyhow!("write of block {}: {e:?}", completion.tag))?;
            in_flight -= 1;
        }
    }
    Ok(())
}

/// Generations (at least 4) that each rewrite the same `--writes` blocks, `unchanged_percent`
/// of them with the contents they had (a file saved again with most of it unchanged): each
/// record then repeats that share of the record before it. Deleting every other generation,
/// newest first, merges pairs of records; each merged record points at the equal elements of
/// the older record next to it, and when that one is merged away in turn its shared units
/// stay, retained.
fn bench_dedup_across(options: &Options, unchanged_percent: u64, rng: &mut ChaCha8Rng) -> Result<DedupAcrossResult> {
    let generations = options.generations.max(4);
    let writes = options.writes.min(options.size / UNIT);
    let blocks = options.size / UNIT;
    progress(&format!(
        "dedup across records, {unchanged_percent} % unchanged: {generations} generations × {writes} blocks"
    ));
    let table_units = ControlBlock::disk_bytes(blocks, writes).div_ceil(UNIT);
    let history = (generations + 2) * (writes + table_units);
    let (_scratch, mut volume) = make_volume(
        options,
        &format!("dedup-across-{unchanged_percent}"),
        options.size,
        2 * writes,
        history,
        2 * generations + 3,
    )?;
    let set = distinct_blocks(rng, blocks, writes);
    let mut versions = vec![0u64; set.len()];
    let mut next_version = 1u64;
    for generation in 0..generations {
        for version in versions.iter_mut() {
            if generation == 0 || rng.random_range(0..100) >= unchanged_percent {
                *version = next_version;
                next_version += 1;
            }
        }
        write_versions(&mut volume, &set, &versions)?;
        volume.mark_and_wait("across", &mut Vec::new()).context("marker after a generation")?;
    }
    settle(&mut volume)?;
    let units_before = volume.status().history_used_units;
    let list = records(&volume.status());
    let (mut merges, mut merged_elements, mut shared_across, mut declined, mut retained_units, mut seconds) =
        (0, 0, 0, 0, 0, 0.0);
    for index in (1..list.len()).rev().step_by(2) {
        progress(&format!("dedup across records, {unchanged_percent} %: deleting generation {}", list[index].0));
        let started = Instant::now();
        let handle = volume.delete_generation(list[index].0);
        let report = volume
            .wait_maintenance(&handle, &mut Vec::new())
            .with_context(|| format!("deleting generation {}", list[index].0))?;
        seconds += started.elapsed().as_secs_f64();
        merges += 1;
        merged_elements += records(&volume.status()).iter().find(|r| r.0 == report.generation).map_or(0, |r| r.2);
        shared_across += report.dedup_shared_across;
        declined += report.dedup_declined_scattered;
        retained_units = report.retained_units;
    }
    let units_after = volume.status().history_used_units;
    volume.close()?;
    Ok(DedupAcrossResult {
        unchanged_percent,
        generations,
        merges,
        merged_elements,
        shared_across,
        declined_scattered: declined,
        saved_across_percent: 100.0 * shared_across as f64 / merged_elements.max(1) as f64,
        units_before,
        units_after,
        retained_units,
        merge_seconds: seconds,
        merged_elements_per_s: merged_elements as f64 / seconds.max(1e-9),
    })
}

// ---------------------------------------------------------------------------------------------
// 7. Compression of sealed history (embodiment 8)

#[derive(Serialize)]
struct CompressResult {
    compressible_percent: u64,
    /// The generations' records (the prefill's generation on).
    records: u64,
    /// Records left uncompressed because they would not have got smaller.
    records_left: u64,
    frames: u64,
    raw_frames: u64,
    original_bytes: u64,
    stored_bytes: u64,
    /// Original over stored bytes, over the records compressed.
    ratio: f64,
    compress_seconds: f64,
    /// Original bytes of every record, per second of compressing them (a record that does
    /// not shrink is read and compressed as far as it takes to know).
    compress_mib_per_s: f64,
    decompress_seconds: f64,
    /// Original bytes per second of decompressing them (frames read and expanded into a new
    /// extent).
    decompress_mib_per_s: f64,
    /// Median per record of the time to decompress it.
    decompress_ms_per_record: f64,
    /// Random 4 KiB reads of an R-VOL of the prefill's generation, its records uncompressed
    /// and then compressed.
    rvol_uncompressed: Latency,
    rvol_compressed: Latency,
    /// Compressed over uncompressed R-VOL IOPS.
    rvol_ratio: f64,
}

fn bench_compress(options: &Options, compressible_percent: u64, rng: &mut ChaCha8Rng) -> Result<CompressResult> {
    let (generations, writes) = (options.generations, options.writes);
    let (_scratch, mut built) = build_history(
        options,
        &format!("compress-{compressible_percent}"),
        writes,
        rng,
        Mix { duplicate_percent: 0, compressible_percent: Some(compressible_percent) },
        |rng, blocks| (0..generations).map(|_| distinct_blocks(rng, blocks, writes)).collect(),
    )?;
    let blocks = built.volume_bytes / UNIT;
    let volume = &mut built.volume;
    let rvol_reads = |volume: &mut Volume, rng: &mut ChaCha8Rng| -> Result<Latency> {
        let handle = volume.open_restore(built.prefill);
        let id = wait_restore(volume, &handle)?;
        let mut reader = Driver::new(options.read_queue_depth, UNIT as usize, rng);
        let reads = reader.random_reads(volume, Target::Restore(id), blocks, options.read_seconds, rng)?;
        close_restore(volume, id)?;
        Ok(reads)
    };
    progress(&format!("compress {compressible_percent} %: R-VOL reads, records uncompressed"));
    let rvol_uncompressed = rvol_reads(volume, rng)?;
    let generations: Vec<u64> =
        records(&volume.status()).iter().map(|r| r.0).filter(|g| (built.prefill..=built.last).contains(g)).collect();
    progress(&format!("compress {compressible_percent} %: compressing {} records", generations.len()));
    let (mut original, mut stored, mut frames, mut raw_frames, mut left, mut attempted) = (0, 0, 0, 0, 0, 0);
    let mut compressed = Vec::new();
    let started = Instant::now();
    for generation in &generations {
        let handle = volume.compress_generation(*generation);
        let report = volume.wait_compression(&handle, &mut Vec::new())?;
        frames += report.frames;
        raw_frames += report.raw_frames;
        attempted += report.original_bytes;
        if report.compressed {
            original += report.original_bytes;
            stored += report.stored_bytes;
            compressed.push(*generation);
        } else {
            left += 1;
        }
    }
    let compress_seconds = started.elapsed().as_secs_f64();
    progress(&format!("compress {compressible_percent} %: R-VOL reads, records compressed"));
    let rvol_compressed = rvol_reads(volume, rng)?;
    progress(&format!("compress {compressible_percent} %: decompressing {} records", compressed.len()));
    let mut per_record_ms = Vec::with_capacity(compressed.len());
    let started = Instant::now();
    for generation in &compressed {
        let one = Instant::now();
        let handle = volume.decompress_generation(*generation);
        volume.wait_compression(&handle, &mut Vec::new())?;
        per_record_ms.push(ms(one));
    }
    let decompress_seconds = started.elapsed().as_secs_f64();
    built.volume.close()?;
    let per_second =
        |bytes: u64, seconds: f64| if seconds > 0.0 { bytes as f64 / (1 << 20) as f64 / seconds } else { 0.0 };
    Ok(CompressResult {
        compressible_percent,
        records: generations.len() as u64,
        records_left: left,
        frames,
        raw_frames,
        original_bytes: original,
        stored_bytes: stored,
        ratio: if stored > 0 { original as f64 / stored as f64 } else { 1.0 },
        compress_mib_per_s: per_second(attempted, compress_seconds),
        compress_seconds,
        decompress_mib_per_s: per_second(original, decompress_seconds),
        decompress_seconds,
        decompress_ms_per_record: median(&per_record_ms),
        rvol_ratio: if rvol_uncompressed.iops > 0.0 { rvol_compressed.iops / rvol_uncompressed.iops } else { 0.0 },
        rvol_uncompressed,
        rvol_compressed,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Capacity saved by merge, by overlap

#[derive(Serialize)]
struct OverlapResult {
    overlap_percent: u64,
    records: usize,
    /// History units used (elements and control blocks) before and after merging every record.
    units_before: u64,
    units_after: u64,
    saved_percent: f64,
    /// Blocks written by any generation: what the merged record must hold.
    distinct_blocks: u64,
    merged_elements: u64,
}

/// Generations of `writes` distinct blocks where `overlap_percent` of each generation's blocks
/// were written by the previous one and the rest by no earlier one.
fn overlapping_generations(
    blocks: u64,
    generations: u64,
    writes: u64,
    overlap_percent: u64,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<u64>> {
    let kept = (writes * overlap_percent / 100) as usize;
    let fresh_count = writes + (generations - 1) * (writes - kept as u64);
    let mut fresh = distinct_blocks(rng, blocks, fresh_count).into_iter();
    let mut plan: Vec<Vec<u64>> = Vec::with_capacity(generations as usize);
    for _ in 0..generations {
        let mut set: Vec<u64> = match plan.last() {
            Some(previous) => previous.choose_multiple(rng, kept).copied().collect(),
            None => Vec::new(),
        };
        let missing = writes as usize - set.len();
        set.extend(fresh.by_ref().take(missing));
        set.shuffle(rng);
        plan.push(set);
    }
    plan
}

fn bench_overlap(options: &Options, overlap_percent: u64, rng: &mut ChaCha8Rng) -> Result<OverlapResult> {
    let (generations, writes) = (options.generations, options.writes);
    let mut union = 0;
    let (_scratch, mut built) =
        build_history(options, &format!("overlap-{overlap_percent}"), writes, rng, Mix::UNIQUE, |rng, blocks| {
            let plan = overlapping_generations(blocks, generations, writes, overlap_percent, rng);
            let mut all: Vec<u64> = plan.iter().flatten().copied().collect();
            all.sort_unstable();
            all.dedup();
            union = all.len() as u64;
            plan
        })?;
    progress(&format!("overlap {overlap_percent} %: merging"));
    let (_, report) = merge_range(&mut built.volume, built.prefill, built.last)?;
    let merged_elements = records(&built.volume.status()).iter().find(|r| r.0 == built.prefill).map_or(0, |r| r.2);
    built.volume.close()?;
    let (units_before, units_after) = (report.units_before, report.units_after);
    Ok(OverlapResult {
        overlap_percent,
        records: report.records,
        units_before,
        units_after,
        saved_percent: 100.0 * units_before.saturating_sub(units_after) as f64 / units_before.max(1) as f64,
        distinct_blocks: union,
        merged_elements,
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Time to the first R-VOL read, by volume size

#[derive(Serialize)]
struct RvolOpenResult {
    volume_bytes: u64,
    generation: u64,
    /// Records the R-VOL's map is built from, and the bytes of each one's control block
    /// (its bitmap grows with the volume: one bit per block).
    records: usize,
    control_block_bytes: u64,
    /// Per open: `open_restore` until the map is built, then the first 4 KiB read.
    open_ms: Vec<f64>,
    first_read_ms: Vec<f64>,
    total_ms: Vec<f64>,
    total_ms_median: f64,
    /// Where the open's time goes: its steps repeated outside the engine (after each open).
    map_steps: Vec<MapSteps>,
}

/// The steps of building an R-VOL's map (FIG 13), timed one by one: read each record's
/// control block (one after the other, as the engine does), decode them, plan the map.
#[derive(Clone, Copy, Default, Serialize)]
struct MapSteps {
    read_ms: f64,
    decode_ms: f64,
    plan_ms: f64,
}

impl MapSteps {
    fn median(steps: &[MapSteps]) -> MapSteps {
        let of = |field: fn(&MapSteps) -> f64| median(&steps.iter().map(field).collect::<Vec<_>>());
        MapSteps { read_ms: of(|s| s.read_ms), decode_ms: of(|s| s.decode_ms), plan_ms: of(|s| s.plan_ms) }
    }
}

/// Builds the map of `generation` of the volume in `dir` the way `open_restore` does, with the
/// same core functions, timing each step. The catalog comes from an offline reader (the
/// history catalog on disk is current: every change to it is a FUA write).
fn time_map_steps(dir: &Path, volume_blocks: u64, generation: u64) -> Result<MapSteps> {
    let reader = VolumeReader::open(host::open_channels(dir, None, true, None)?)
        .with_context(|| format!("cannot read {}", dir.display()))?;
    let description = reader.describe();
    drop(reader);
    let mut controls: Vec<(u64, u64, u64)> = description["history"]["entries"]
        .as_array()
        .context("no history entries")?
        .iter()
        .filter(|e| (e["kind"] == "History" || e["kind"] == "Merged") && e["state"] == "Live")
        .filter_map(|e| Some((e["generation"].as_u64()?, e["control_start"].as_u64()?, e["control_count"].as_u64()?)))
        .filter(|(g, _, _)| *g >= generation)
        .collect();
    controls.sort_unstable();
    let path = dir.join(host::FILES[3]);
    let file = open_direct(&path)?;
    let shape = VolumeShape { host_write_size: UNIT as u32, volume_blocks };
    let units_start = layout::plan_history(&shape, &LayoutOptions::default(), file.metadata()?.len())
        .context("history layout")?
        .units
        .start_bytes;
    let started = Instant::now();
    let mut blocks = Vec::with_capacity(controls.len());
    for (_, start, count) in &controls {
        let mut buffer = DmaBuf::zeroed((count * UNIT) as usize);
        file.read_exact_at(buffer.as_mut_slice(), units_start + start * UNIT)
            .with_context(|| format!("cannot read {}", path.display()))?;
        blocks.push(buffer.as_slice().to_vec());
    }
    let read_ms = ms(started);
    let started = Instant::now();
    let maps = blocks
        .iter()
        .map(|bytes| ControlBlock::decode(bytes).map(|c| c.map))
        .collect::<Result<Vec<_>, _>>()
        .context("a control block does not decode")?;
    let decode_ms = ms(started);
    let started = Instant::now();
    let refs: Vec<_> = maps.iter().collect();
    plan_restore(&refs, volume_blocks).context("planning the restore map")?;
    Ok(MapSteps { read_ms, decode_ms, plan_ms: ms(started) })
}

/// Opens `path` for reads that bypass the page cache, as the engine's devices do (buffered
/// where the file system refuses O_DIRECT, as they do too).
fn open_direct(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .or_else(|_| std::fs::File::open(path))
        .with_context(|| format!("cannot open {}", path.display()))
}

#[derive(Serialize)]
struct RvolOpenSection {
    sizes: Vec<RvolOpenResult>,
    /// Median time to first read of the largest volume over the smallest's.
    growth: f64,
    independent_of_size: bool,
}

impl RvolOpenSection {
    fn new(sizes: Vec<RvolOpenResult>) -> RvolOpenSection {
        let smallest = sizes.iter().min_by_key(|r| r.volume_bytes).map_or(0.0, |r| r.total_ms_median);
        let largest = sizes.iter().max_by_key(|r| r.volume_bytes).map_or(0.0, |r| r.total_ms_median);
        let growth = if smallest > 0.0 { largest / smallest } else { 0.0 };
        RvolOpenSection { sizes, growth, independent_of_size: growth <= INDEPENDENT_FACTOR }
    }
}

/// Polls until the R-VOL open behind `handle` is done.
fn wait_restore(volume: &mut Volume, handle: &chronicle::engine::RestoreHandle) -> Result<RestoreId> {
    loop {
        if let Some(result) = handle.result() {
            return result.context("open_restore");
        }
        if volume.poll(&mut Vec::new()) == 0 {
            std::hint::spin_loop();
        }
    }
}

/// Closes an R-VOL and polls until it is gone (its units freed).
fn close_restore(volume: &mut Volume, id: RestoreId) -> Result<()> {
    volume.close_restore(id).context("close_restore")?;
    while volume.status().restores.iter().any(|r| r.id == id) {
        volume.poll(&mut Vec::new());
    }
    Ok(())
}

fn bench_rvol_open(options: &Options, volume_bytes: u64, rng: &mut ChaCha8Rng) -> Result<RvolOpenResult> {
    let (generations, writes) = (options.generations, options.writes);
    let blocks = volume_bytes / UNIT;
    progress(&format!("R-VOL open: {} volume, {generations} generations × {writes} blocks", human(volume_bytes)));
    // Small journal and history: the files stay far smaller than the volume.
    let (scratch, mut volume) = make_volume(
        options,
        &format!("rvol-{}", volume_bytes / UNIT),
        volume_bytes,
        2 * writes,
        generations * writes,
        generations + 1,
    )?;
    let plan: Vec<Vec<u64>> = (0..generations).map(|_| distinct_blocks(rng, blocks, writes)).collect();
    let mut driver = Driver::new(32, UNIT as usize, rng);
    write_generations(&mut volume, &mut driver, &plan)?;
    settle(&mut volume)?;
    let list = records(&volume.status());
    // The oldest generation: its map is built from every record.
    let generation = list.first().map(|r| r.0).context("no history record after the sorts")?;
    // A block the first generation wrote: the oldest record saved its previous content.
    let block = plan[0][0];
    let mut result = RvolOpenResult {
        volume_bytes,
        generation,
        records: list.len(),
        control_block_bytes: ControlBlock::disk_bytes(blocks, 0),
        open_ms: Vec::new(),
        first_read_ms: Vec::new(),
        total_ms: Vec::new(),
        total_ms_median: 0.0,
        map_steps: Vec::new(),
    };
    let mut reader = Driver::new(1, UNIT as usize, rng);
    for _ in 0..options.rvol_opens {
        let started = Instant::now();
        let handle = volume.open_restore(generation);
        let id = wait_restore(&mut volume, &handle)?;
        let opened = Instant::now();
        reader.submit(&mut volume, Target::Restore(id), false, block);
        reader.drain(&mut volume);
        result.total_ms.push(ms(started));
        result.first_read_ms.push(ms(opened));
        result.open_ms.push(opened.duration_since(started).as_secs_f64() * 1000.0);
        reader.check("the first R-VOL read")?;
        close_restore(&mut volume, id)?;
        result.map_steps.push(time_map_steps(&scratch.dir, blocks, generation)?);
    }
    result.total_ms_median = median(&result.total_ms);
    volume.close()?;
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// 4. R-VOL random reads against the volume's

#[derive(Serialize)]
struct RvolReadResult {
    volume_bytes: u64,
    queue_depth: usize,
    generation: u64,
    /// Share of the R-VOL's blocks read from history records (the rest from the backup).
    history_percent: f64,
    volume: Latency,
    rvol: Latency,
    /// R-VOL IOPS over the volume's.
    ratio: f64,
}

/// Random reads of the volume, then of an R-VOL of the prefill's generation (its blocks come
/// from the generations' records and the backup).
fn bench_rvol_read(options: &Options, built: &mut Built, rng: &mut ChaCha8Rng) -> Result<RvolReadResult> {
    progress("R-VOL reads");
    let volume = &mut built.volume;
    let blocks = built.volume_bytes / UNIT;
    let depth = options.read_queue_depth;
    let mut reader = Driver::new(depth, UNIT as usize, rng);
    let own = reader.random_reads(volume, Target::Volume, blocks, options.read_seconds, rng)?;
    let handle = volume.open_restore(built.prefill);
    let id = wait_restore(volume, &handle)?;
    let history_blocks = volume.status().restores.iter().find(|r| r.id == id).map_or(0, |r| r.history_blocks);
    let rvol = reader.random_reads(volume, Target::Restore(id), blocks, options.read_seconds, rng)?;
    close_restore(volume, id)?;
    Ok(RvolReadResult {
        volume_bytes: built.volume_bytes,
        queue_depth: depth,
        generation: built.prefill,
        history_percent: 100.0 * history_blocks as f64 / blocks as f64,
        ratio: if own.iops > 0.0 { rvol.iops / own.iops } else { 0.0 },
        volume: own,
        rvol,
    })
}

// ---------------------------------------------------------------------------------------------
// 5. Host write latency while the sort and merges run

/// What runs beside the writes in a latency phase.
#[derive(Clone, Copy)]
struct PhaseSpec {
    name: &'static str,
    markers: bool,
    sort: bool,
    merges: bool,
}

const PHASES: [PhaseSpec; 4] = [
    PhaseSpec { name: "idle", markers: false, sort: false, merges: false },
    PhaseSpec { name: "markers", markers: true, sort: false, merges: false },
    PhaseSpec { name: "markers+sort", markers: true, sort: true, merges: false },
    PhaseSpec { name: "markers+sort+merge", markers: true, sort: true, merges: true },
];

#[derive(Serialize)]
struct PhaseResult {
    phase: &'static str,
    seconds: f64,
    writes: Latency,
    /// Writes submitted while a merge ran, and while the sort ran (status sampled every ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    during_merge: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    during_sort: Option<Latency>,
    markers: u64,
    /// Longest marker of the phase, from `mark` until sealed (host writes are held meanwhile).
    marker_ms_max: f64,
    /// Share of the phase's status samples in which the sort, and a merge, was running.
    sort_busy_percent: f64,
    merges: u64,
    merge_busy_percent: f64,
    /// Ended before its time because the journal filled (markers with the sort paused).
    ended_early: bool,
}

#[derive(Serialize)]
struct LatencySection {
    volume_bytes: u64,
    queue_depth: usize,
    marker_every_ms: u64,
    phases: Vec<PhaseResult>,
    /// p99 of the writes submitted during a merge over the idle phase's p99.
    merge_p99_over_idle: f64,
    target_met: bool,
}

fn bench_latency(options: &Options, rng: &mut ChaCha8Rng) -> Result<LatencySection> {
    let blocks = options.latency_size / UNIT;
    progress(&format!(
        "write latency: {} volume, QD{}, {} s per phase",
        human(options.latency_size),
        options.write_queue_depth,
        options.latency_seconds
    ));
    // A journal of twice the volume so the phase without sort rarely fills it. The history
    // holds the prefill's record and what the phases' sorts save before a merge gives space
    // back: up to every write of a phase, bounded by a write rate far above this engine's on
    // files. Sparse files: only what is written takes space.
    let phase_writes = (options.latency_seconds * MAX_WRITES_PER_SECOND) as u64;
    let history = 3 * blocks + 2 * phase_writes;
    let (_scratch, mut volume) = make_volume(options, "latency", options.latency_size, 2 * blocks, history, 64)?;
    prefill(&mut volume, rng, Mix::UNIQUE)?;
    settle(&mut volume)?;
    // The prefill's record (the zeros it overwrote) goes: merges copy what the phases wrote.
    let oldest = records(&volume.status()).first().map(|r| r.0).context("no record after the prefill")?;
    let handle = volume.delete_generation(oldest);
    volume.wait_maintenance(&handle, &mut Vec::new()).context("dropping the prefill's record")?;
    let mut driver = Driver::new(options.write_queue_depth, UNIT as usize, rng);
    let mut phases = Vec::with_capacity(PHASES.len());
    for spec in PHASES {
        progress(&format!("write latency: phase {}", spec.name));
        phases.push(latency_phase(&mut volume, &mut driver, spec, options, blocks, rng)?);
        // Each phase starts alike: an empty open generation, everything sorted, one record.
        volume.mark_and_wait("phase end", &mut Vec::new()).context("marker after a phase")?;
        volume.set_sort(true, None);
        settle(&mut volume)?;
        if records(&volume.status()).len() >= 2 {
            merge_all(&mut volume)?;
        }
    }
    volume.close()?;
    let idle_p99 = phases[0].writes.p99_us;
    let merge_p99 = phases.last().and_then(|p| p.during_merge.as_ref()).map_or(0.0, |l| l.p99_us);
    let ratio = if idle_p99 > 0.0 { merge_p99 / idle_p99 } else { 0.0 };
    Ok(LatencySection {
        volume_bytes: options.latency_size,
        queue_depth: options.write_queue_depth,
        marker_every_ms: options.marker_every_ms,
        phases,
        merge_p99_over_idle: ratio,
        target_met: merge_p99 > 0.0 && ratio <= LATENCY_TARGET_FACTOR,
    })
}

/// Random 4 KiB writes at the driver's queue depth for `--latency-seconds`, with markers every
/// `--marker-every-ms` and merges of every record back to back as `spec` says.
fn latency_phase(
    volume: &mut Volume,
    driver: &mut Driver,
    spec: PhaseSpec,
    options: &Options,
    blocks: u64,
    rng: &mut ChaCha8Rng,
) -> Result<PhaseResult> {
    volume.set_sort(spec.sort, None);
    let marker_every = Duration::from_millis(options.marker_every_ms);
    let counters_before = volume.status().control;
    // Per slot: whether a merge / the sort ran when its write was submitted.
    let mut submitted_during = vec![(false, false); driver.queue_depth];
    let (mut all, mut during_merge, mut during_sort) = (Vec::with_capacity(1 << 20), Vec::new(), Vec::new());
    let mut marker: Option<(chronicle::engine::MarkerHandle, Instant)> = None;
    let mut marker_ms_max = 0.0f64;
    let mut merge: Option<MaintenanceHandle> = None;
    let mut last_marker = Instant::now();
    let mut last_sample = Instant::now() - SAMPLE_EVERY;
    let (mut samples, mut sort_samples, mut merge_samples) = (0u64, 0u64, 0u64);
    let mut sort_active = false;
    let mut ended_early = false;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(options.latency_seconds);
    loop {
        let now = Instant::now();
        let running = now < deadline && !ended_early;
        if now.duration_since(last_sample) >= SAMPLE_EVERY {
            last_sample = now;
            let status = volume.status();
            sort_active = status.sort.is_some();
            samples += 1;
            sort_samples += u64::from(sort_active);
            merge_samples += u64::from(merge.is_some());
            // With the sort paused nothing frees the journal: stop before writes fail for space.
            if !spec.sort && status.journal_used_elements * 10 >= status.journal_capacity_elements * 9 {
                ended_early = true;
            }
            if running && spec.merges && merge.is_none() {
                let list = records(&status);
                if let (true, Some(first), Some(last)) = (list.len() >= 2, list.first(), list.last()) {
                    merge = Some(volume.merge(first.0, last.1));
                }
            }
            if running
                && spec.markers
                && marker.is_none()
                && now.duration_since(last_marker) >= marker_every
                && status.sealed_waiting < MAX_WAITING_GENERATIONS
            {
                last_marker = now;
                marker = Some((volume.mark("bench"), now));
            }
        }
        while running && driver.has_room() {
            let slot = driver.submit(volume, Target::Volume, true, rng.random_range(0..blocks));
            submitted_during[slot] = (merge.is_some(), sort_active);
        }
        let progressed = driver.poll(volume, |slot, ns| {
            all.push(ns);
            let (merging, sorting) = submitted_during[slot];
            if merging {
                during_merge.push(ns);
            }
            if sorting {
                during_sort.push(ns);
            }
        });
        if let Some((result, called)) = marker.as_ref().and_then(|(m, called)| Some((m.result()?, *called))) {
            marker = None;
            marker_ms_max = marker_ms_max.max(ms(called));
            if let Err(error) = result {
                bail!("a marker failed in phase {}: {error}", spec.name);
            }
        }
        if let Some(result) = merge.as_ref().and_then(MaintenanceHandle::result) {
            merge = None;
            if let Err(error) = result {
                bail!("a merge failed in phase {}: {error}", spec.name);
            }
        }
        if !running && driver.in_flight() == 0 && marker.is_none() && merge.is_none() {
            break;
        }
        if !progressed {
            std::hint::spin_loop();
        }
    }
    let seconds = (Instant::now().min(deadline)).duration_since(started).as_secs_f64();
    driver.check(&format!("writes of phase {}", spec.name))?;
    let counters = volume.status().control;
    let percent = |part: u64| 100.0 * part as f64 / samples.max(1) as f64;
    Ok(PhaseResult {
        phase: spec.name,
        seconds,
        writes: Latency::new(all, seconds),
        during_merge: spec.merges.then(|| Latency::new(during_merge, 0.0)),
        during_sort: spec.sort.then(|| Latency::new(during_sort, 0.0)),
        markers: counters.markers - counters_before.markers,
        marker_ms_max,
        sort_busy_percent: percent(sort_samples),
        merges: counters.merges - counters_before.merges,
        merge_busy_percent: percent(merge_samples),
        ended_early,
    })
}

// ---------------------------------------------------------------------------------------------
// The table

impl Report {
    fn table(&self, options: &Options) -> Result<String> {
        let mut out = String::new();
        writeln!(
            out,
            "chronicle bench-history: {} generations × {} random 4 KiB writes per history, seed {}",
            options.generations, options.writes, options.seed
        )?;
        if let Some(m) = &self.merge {
            writeln!(
                out,
                "\n1. merge throughput ({} volume, {} records merged into one)",
                human(m.volume_bytes),
                m.records
            )?;
            writeln!(
                out,
                "   {:>15} {:>11} {:>15} {:>9} {:>12} {:>17} {:>17}",
                "source elements",
                "source MiB",
                "output elements",
                "seconds",
                "source MiB/s",
                "source elements/s",
                "output elements/s"
            )?;
            writeln!(
                out,
                "   {:>15} {:>11.1} {:>15} {:>9.3} {:>12.1} {:>17.0} {:>17.0}",
                m.source_elements,
                m.source_mib,
                m.output_elements,
                m.seconds,
                m.source_mib_per_s,
                m.source_elements_per_s,
                m.output_elements_per_s
            )?;
        }
        if let Some(rows) = &self.overlap {
            writeln!(out, "\n2. history units before and after merging every record, by overlap between generations")?;
            writeln!(
                out,
                "   {:>7} {:>8} {:>13} {:>12} {:>7} {:>15} {:>15}",
                "overlap", "records", "units before", "units after", "saved", "distinct blocks", "merged elements"
            )?;
            for r in rows {
                writeln!(
                    out,
                    "   {:>6}% {:>8} {:>13} {:>12} {:>6.1}% {:>15} {:>15}",
                    r.overlap_percent,
                    r.records,
                    r.units_before,
                    r.units_after,
                    r.saved_percent,
                    r.distinct_blocks,
                    r.merged_elements
                )?;
            }
        }
        if let Some(section) = &self.rvol_open {
            writeln!(
                out,
                "\n3. time to the first R-VOL read (open_restore of the oldest generation, then one 4 KiB read)"
            )?;
            writeln!(
                out,
                "   {:>8} {:>7} {:>13} {:>9} {:>9} {:>12} {:>12} | {:>12} {:>10} {:>8}",
                "volume",
                "records",
                "control block",
                "open ms",
                "read ms",
                "total ms 1st",
                "total ms med",
                "ctl reads ms",
                "decode ms",
                "plan ms"
            )?;
            for r in &section.sizes {
                let steps = MapSteps::median(&r.map_steps);
                writeln!(
                    out,
                    "   {:>8} {:>7} {:>13} {:>9.2} {:>9.2} {:>12.2} {:>12.2} | {:>12.2} {:>10.2} {:>8.2}",
                    human(r.volume_bytes),
                    r.records,
                    human(r.control_block_bytes),
                    median(&r.open_ms),
                    median(&r.first_read_ms),
                    r.total_ms.first().copied().unwrap_or(0.0),
                    r.total_ms_median,
                    steps.read_ms,
                    steps.decode_ms,
                    steps.plan_ms
                )?;
            }
            writeln!(out, "   (medians; right of | the map's steps repeated outside the engine)")?;
            writeln!(
                out,
                "   largest / smallest volume: {:.2}× ({})",
                section.growth,
                if section.independent_of_size {
                    format!("independent of the volume's size: within {INDEPENDENT_FACTOR}×")
                } else {
                    format!("grows with the volume's size: more than {INDEPENDENT_FACTOR}×")
                }
            )?;
        }
        if let Some(r) = &self.rvol_read {
            writeln!(
                out,
                "\n4. random 4 KiB reads QD{} ({} volume, prefilled; R-VOL of generation {}, {:.1} % of its blocks from history)",
                r.queue_depth,
                human(r.volume_bytes),
                r.generation,
                r.history_percent
            )?;
            writeln!(out, "   {:<8} {:>10} {:>10} {:>10}", "target", "IOPS", "p50 µs", "p99 µs")?;
            for (name, l) in [("volume", &r.volume), ("R-VOL", &r.rvol)] {
                writeln!(out, "   {name:<8} {:>10.0} {:>10.1} {:>10.1}", l.iops, l.p50_us, l.p99_us)?;
            }
            writeln!(out, "   R-VOL / volume: {:.2}", r.ratio)?;
        }
        if let Some(section) = &self.latency {
            writeln!(
                out,
                "\n5. host write latency, 4 KiB random writes QD{} ({} volume, markers every {} ms)",
                section.queue_depth,
                human(section.volume_bytes),
                section.marker_every_ms
            )?;
            writeln!(
                out,
                "   {:<26} {:>8} {:>8} {:>9} {:>9} {:>10} {:>8} {:>10} {:>7} {:>11}",
                "phase",
                "writes",
                "IOPS",
                "p50 µs",
                "p99 µs",
                "p99.9 µs",
                "markers",
                "sort busy",
                "merges",
                "merge busy"
            )?;
            for p in &section.phases {
                let name = if p.ended_early { format!("{} (journal full)", p.phase) } else { p.phase.to_string() };
                writeln!(
                    out,
                    "   {name:<26} {:>8} {:>8.0} {:>9.1} {:>9.1} {:>10.1} {:>8} {:>9.0}% {:>7} {:>10.0}%",
                    p.writes.ios,
                    p.writes.iops,
                    p.writes.p50_us,
                    p.writes.p99_us,
                    p.writes.p999_us,
                    p.markers,
                    p.sort_busy_percent,
                    p.merges,
                    p.merge_busy_percent
                )?;
                for (what, subset) in [("during a merge", &p.during_merge), ("during the sort", &p.during_sort)] {
                    if let Some(l) = subset {
                        let name = format!("  {what}");
                        writeln!(
                            out,
                            "   {name:<26} {:>8} {:>8} {:>9.1} {:>9.1} {:>10.1}",
                            l.ios, "", l.p50_us, l.p99_us, l.p999_us
                        )?;
                    }
                }
            }
            writeln!(
                out,
                "   p99 during a merge / idle p99: {:.2} (target ≤ {LATENCY_TARGET_FACTOR}: {})",
                section.merge_p99_over_idle,
                if section.target_met { "met" } else { "missed" }
            )?;
        }
        if let Some(rows) = &self.dedup {
            writeln!(
                out,
                "\n6. history units a merge stores, by the share of blocks repeating one of {COMMON_CONTENTS} contents"
            )?;
            writeln!(
                out,
                "   {:>8} {:>8} {:>15} {:>13} {:>12} {:>13} {:>10} {:>8}",
                "repeated",
                "records",
                "merged elements",
                "units before",
                "units after",
                "dedup shared",
                "dedup saved",
                "seconds"
            )?;
            for r in rows {
                writeln!(
                    out,
                    "   {:>7}% {:>8} {:>15} {:>13} {:>12} {:>13} {:>9.1}% {:>8.3}",
                    r.duplicate_percent,
                    r.records,
                    r.merged_elements,
                    r.units_before,
                    r.units_after,
                    r.dedup_shared,
                    r.dedup_saved_percent,
                    r.seconds
                )?;
            }
        }
        if let Some(rows) = &self.dedup_across {
            writeln!(
                out,
                "\n6b. dedup across records: generations rewrite the same blocks, a share unchanged; every other generation deleted"
            )?;
            writeln!(
                out,
                "   {:>9} {:>6} {:>15} {:>13} {:>9} {:>12} {:>12} {:>11} {:>9} {:>9} {:>12}",
                "unchanged",
                "merges",
                "merged elements",
                "shared across",
                "declined",
                "saved across",
                "units before",
                "units after",
                "retained",
                "seconds",
                "elements/s"
            )?;
            for r in rows {
                writeln!(
                    out,
                    "   {:>8}% {:>6} {:>15} {:>13} {:>9} {:>11.1}% {:>12} {:>11} {:>9} {:>9.3} {:>12.0}",
                    r.unchanged_percent,
                    r.merges,
                    r.merged_elements,
                    r.shared_across,
                    r.declined_scattered,
                    r.saved_across_percent,
                    r.units_before,
                    r.units_after,
                    r.retained_units,
                    r.merge_seconds,
                    r.merged_elements_per_s
                )?;
            }
        }
        if let Some(rows) = &self.compress {
            writeln!(
                out,
                "\n7. compression of the generations' records (lz4, {} KiB frames), by the share of text-like 4 KiB blocks (the rest random)",
                chronicle::engine::FRAME_BYTES >> 10
            )?;
            writeln!(
                out,
                "   {:>5} {:>8} {:>5} {:>11} {:>6} {:>12} {:>14} {:>12} | {:>13} {:>13} {:>7}",
                "text",
                "records",
                "left",
                "raw frames",
                "ratio",
                "compr MiB/s",
                "decompr MiB/s",
                "decompr ms",
                "R-VOL IOPS",
                "compressed",
                "ratio"
            )?;
            for r in rows {
                writeln!(
                    out,
                    "   {:>4}% {:>8} {:>5} {:>5}/{:<5} {:>6.2} {:>12.1} {:>14.1} {:>12.2} | {:>13.0} {:>13.0} {:>7.2}",
                    r.compressible_percent,
                    r.records,
                    r.records_left,
                    r.raw_frames,
                    r.frames,
                    r.ratio,
                    r.compress_mib_per_s,
                    r.decompress_mib_per_s,
                    r.decompress_ms_per_record,
                    r.rvol_uncompressed.iops,
                    r.rvol_compressed.iops,
                    r.rvol_ratio
                )?;
            }
            writeln!(
                out,
                "   (decompr ms: median per record; right of |: random 4 KiB R-VOL reads of the oldest generation, records uncompressed, then compressed)"
            )?;
        }
        Ok(out)
    }
}
