//! `chronicle demo`: the main job on files. Formats a volume, writes random data in several
//! generations cut by markers, lets the sorts bring the backup up to date, then reads every
//! generation back — the backup and each image restored from history — and compares it with a
//! model of what was written. Prints "verified" only if every block of every generation matches.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use chronicle::core::checksum::crc32c;
use chronicle::core::format::layout::human;
use chronicle::core::format::superblock::Durability;
use chronicle::device::{DmaBuf, IoBuffers};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{HostRequest, Volume, VolumeOptions};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::host;

const QUEUE_DEPTH: usize = 32;

fn unit_crcs(image: &[u8], unit: usize) -> Vec<u32> {
    image.chunks(unit).map(crc32c).collect()
}

pub fn run(dir: Option<PathBuf>, size: u64, generations: u32, seed: u64) -> Result<ExitCode> {
    let temporary = match &dir {
        None => Some(
            tempfile::Builder::new()
                .prefix("chronicle-demo-")
                .tempdir()
                .context("cannot create a temporary directory")?,
        ),
        Some(_) => None,
    };
    let dir = dir.unwrap_or_else(|| temporary.as_ref().expect("created above").path().to_path_buf());
    if generations == 0 {
        bail!("--generations must be at least 1");
    }
    let unit = 4096usize;
    // Engine I keeps every generation's history (no retention yet): give the history room for
    // all of them.
    crate::format_dir(
        &dir,
        size,
        unit as u32,
        (None, Some(size + (8 << 20))),
        Durability::Flush,
        (
            chronicle::core::format::superblock::JournalFullPolicy::Block,
            chronicle::core::format::superblock::JournalMode::Latest,
        ),
        false,
    )?;
    println!(
        "chronicle demo: {} volume in {}, host write size {} B, {} generations",
        human(size),
        dir.display(),
        unit,
        generations
    );

    let mut volume = Volume::open(host::open_channels(&dir, None, false, None)?, VolumeOptions::default())
        .context("cannot open the new volume")?;
    let units = size / unit as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model = vec![0u8; size as usize];
    let mut expected: Vec<Vec<u32>> = vec![unit_crcs(&model, unit)];
    // About a tenth of the volume per generation: each generation fits the journal (a quarter
    // of the volume) and all of them fit the history.
    let writes_per_generation = (units / 25).max(64);
    let progress = ProgressBar::new(u64::from(generations));
    progress.set_style(
        ProgressStyle::with_template("  writing  {bar:30} generation {pos}/{len} {msg}").expect("valid template"),
    );

    let started = Instant::now();
    let mut bytes_written = 0u64;
    let mut writes = 0u64;
    let mut failures = Vec::new();
    for generation in 1..=generations {
        let mut submitted = 0u64;
        let mut in_flight = 0usize;
        let mut next_tag = 0u64;
        let mut last_progress = Instant::now();
        while submitted < writes_per_generation || in_flight > 0 {
            while submitted < writes_per_generation && in_flight < QUEUE_DEPTH {
                let length = rng.random_range(1..=4u64).min(units);
                let first = rng.random_range(0..=units - length);
                let mut buffer = DmaBuf::zeroed(length as usize * unit);
                rng.fill_bytes(buffer.as_mut_slice());
                // The engine keeps overlapping writes in submission order, so the model is
                // updated in submission order too.
                let at = first as usize * unit;
                model[at..at + buffer.len()].copy_from_slice(buffer.as_slice());
                bytes_written += buffer.len() as u64;
                volume.submit(
                    next_tag,
                    HostRequest::Write { offset_blocks: first, buffers: Arc::new(IoBuffers::single(buffer)) },
                );
                next_tag += 1;
                submitted += 1;
                in_flight += 1;
            }
            let mut completions = Vec::new();
            volume.poll(&mut completions);
            if !completions.is_empty() {
                last_progress = Instant::now();
            } else if last_progress.elapsed().as_secs() > 30 {
                bail!(
                    "no write completed for 30 s; volume status: {}",
                    serde_json::to_string_pretty(&volume.status())?
                );
            }
            for completion in completions {
                in_flight -= 1;
                writes += 1;
                if let Err(error) = completion.result {
                    failures.push(format!("write failed: {error}"));
                }
            }
        }
        let mut completions = Vec::new();
        let sealed = volume.mark_and_wait(&format!("demo generation {generation}"), &mut completions)?;
        if sealed != u64::from(generation) {
            bail!("marker sealed generation {sealed}, expected {generation}");
        }
        expected.push(unit_crcs(&model, unit));
        progress.inc(1);
        progress.set_message(format!("({} journal elements used)", volume.status().journal_used_elements));
    }
    let write_seconds = started.elapsed().as_secs_f64();
    progress.finish_and_clear();

    let sort_started = Instant::now();
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("sorting generations into the backup");
    let mut completions = Vec::new();
    while !volume.is_idle() {
        volume.poll(&mut completions);
        spinner.tick();
    }
    spinner.finish_and_clear();
    let sort_seconds = sort_started.elapsed().as_secs_f64();
    let status = volume.status();
    if let Some(error) = &status.sort_error {
        bail!("the sort failed: {error}");
    }
    volume.close()?;

    // Read every generation back and compare it block by block with the model.
    let reader =
        VolumeReader::open(host::open_channels(&dir, None, true, None)?).context("cannot reopen the volume")?;
    let check = ProgressBar::new(expected.len() as u64);
    check
        .set_style(ProgressStyle::with_template("  checking {bar:30} generation {pos}/{len}").expect("valid template"));
    let mut blocks_checked = 0u64;
    for (generation, crcs) in expected.iter().enumerate() {
        let image =
            reader.read_image(generation as u64).with_context(|| format!("cannot read generation {generation}"))?;
        let actual = unit_crcs(&image, unit);
        let wrong = actual.iter().zip(crcs).filter(|(a, b)| a != b).count();
        if wrong > 0 {
            failures.push(format!(
                "generation {generation}: {wrong} of {} blocks differ from what was written",
                crcs.len()
            ));
        }
        blocks_checked += crcs.len() as u64;
        check.inc(1);
    }
    check.finish_and_clear();
    let report = reader.verify().context("structure check failed")?;

    println!(
        "  writes        {writes} ({}), {:.0} IOPS, {:.1} MiB/s",
        human(bytes_written),
        writes as f64 / write_seconds,
        bytes_written as f64 / write_seconds / (1 << 20) as f64
    );
    println!(
        "  markers       {} (hold max {} µs), sort {} elements in {:.2} s",
        status.control.markers, status.control.marker_hold_max_us, status.control.elements_sorted, sort_seconds
    );
    println!(
        "  backup        generation {} (one generation behind the open generation {})",
        status.backup_generation, status.open_generation
    );
    println!(
        "  journal       {} of {} elements in use; history {} of {} units ({} records)",
        status.journal_used_elements,
        status.journal_capacity_elements,
        status.history_used_units,
        status.history_capacity_units,
        report.history_records
    );
    println!(
        "  checked       {} generations × {} blocks = {} blocks against the model",
        expected.len(),
        units,
        blocks_checked
    );
    if failures.is_empty() {
        println!("verified");
        Ok(ExitCode::SUCCESS)
    } else {
        for failure in &failures {
            eprintln!("  MISMATCH: {failure}");
        }
        eprintln!("NOT verified");
        Ok(ExitCode::FAILURE)
    }
}
